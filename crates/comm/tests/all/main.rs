//! Integration tests for referee-comm: one binary, real sockets on loopback and in temp dirs.

mod api;
mod cli;
mod handshake;
mod helpers;
mod interop;
mod quic;
mod refusals;
mod rekey;
mod scale;

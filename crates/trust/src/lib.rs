//! A referee's home directory: its key files and its trust store.
//!
//! - [`Home`]: the directory layout; creates keys with owner-only permissions and never
//!   overwrites one; refuses to read secret key files that other users can read.
//! - [`TrustStore`]: trusted publishers, revocations and anti-rollback marks in an embedded
//!   redb database; implements [`referee_muscle::TrustView`] for the open pipeline.
//!
//! This crate knows nothing of wasm or of the CLI; it only does file and database I/O.

mod home;
mod store;

pub use home::{Home, HomeError, KeyFileOutcome, KeygenReport, read_publisher_public, read_referee_public};
pub use store::{AcceptedEntry, AddOutcome, PublisherEntry, Revocation, RevocationEntry, TrustError, TrustStore};

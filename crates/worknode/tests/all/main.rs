//! Integration tests of referee-worknode: one binary, one module per area. Child processes (crash
//! and replica tests) re-run this binary's `child_role` test with `WN_CHILD_ROLE` set.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test helpers and child roles"
)]

mod cli;
mod crash;
mod muscle;
mod replicas;
mod sim;
mod store;
mod system;
mod util;

/// Entry point of child processes; a no-op in a normal test run.
#[test]
fn child_role() {
    util::run_child_role();
}

//! The referee runtime: sealed muscles in isolated, capability-limited, audited cells.
//!
//! ```no_run
//! use referee_runtime::{Runtime, RuntimeOptions};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let home = referee_trust::Home::new("/var/lib/referee");
//! let runtime = Runtime::open(&home, RuntimeOptions::default())?;
//! let info = runtime.load(&std::fs::read("feanor.muscle")?)?;
//! let y = runtime.invoke(&info.header.name, &[1.0, 2.0, 3.0, 4.0])?;
//! # let _ = y; Ok(()) }
//! ```
//!
//! - [`Runtime`]: one referee. `load` runs the full open pipeline (signature, binding,
//!   anti-rollback, decryption), checks every import against header ∩ policy, compiles with
//!   wasmtime (Cranelift, pooling allocator, copy-on-write memory images, SIMD, NaN
//!   canonicalisation) and instantiates a first cell; `invoke`/`train` run entry points.
//! - Cells: a stateless muscle has a pool of up to `concurrency` cells; a trainable muscle one
//!   serialised cell whose parameters persist (and survive a fault via the last good state).
//!   A trap fails only that call, with a typed [`Fault`]; the cell is discarded.
//! - [`Scheduler`]: bounded worker threads, bounded per-muscle queues, round-robin fairness
//!   across muscles, two priorities.
//! - [`AuditLog`]: hash-chained, append-only records in the state database.
//! - [`attest`]: signed reports of what runs here.

mod attest;
mod audit;
mod cell;
mod engine;
mod error;
mod host;
mod kv;
mod policy;
mod runtime;
mod scheduler;

pub use attest::{AttestError, REPORT_VERSION, attest, verify as verify_attestation};
pub use audit::{AuditHead, AuditLog, AuditRecord, AuditViolation, GENESIS};
pub use engine::MAX_CELL_MEMORY;
pub use error::{Fault, RuntimeError};
pub use host::LogLine;
pub use kv::{MAX_KEY_LEN, MAX_VALUE_LEN};
pub use policy::{CAPABILITIES, Grant, Policy, PolicyRule};
pub use runtime::{Entry, MuscleInfo, Runtime, RuntimeOptions, state_db_path};
pub use scheduler::{Output, Priority, Scheduler, SchedulerConfig, Ticket};

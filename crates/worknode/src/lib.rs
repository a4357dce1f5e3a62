//! Worknodes: a fractal actor runtime. Every entity (a project, a task, an agent, a muscle host)
//! is a *worknode*: a lightweight actor in a tree, whose state is a set of CRDTs and whose history
//! is an event log.
//!
//! ```
//! use referee_worknode::{Authority, Consistency, Op, System, SystemConfig, WnPath};
//!
//! let sys = System::start(SystemConfig::default(), None, None)?;
//! let root = WnPath::root();
//! sys.create(&Authority::System, &root, "acme", "data", Consistency::Local)?;
//! let acme: WnPath = "/acme".parse()?;
//! let task = sys.create(&Authority::System, &acme, "task-1", "data", Consistency::Local)?;
//! // `update` answers once the change is durable (here: applied; there is no store).
//! let done = sys.update(&Authority::System, task, vec![("done".into(), Op::Add(3))])?.wait()?;
//! assert_eq!(done.version, 1);
//! let view = sys.query(&Authority::System, task, Consistency::Local)?;
//! assert_eq!(view.state.to_json()["done"], 3);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Core concepts, one per type:
//! - [`System`]: one node's worknodes in a slab arena (idle worknodes are plain data, ~270
//!   bytes each, measured with a million), run by a small pool of worker threads.
//!   `Send + Sync`; drop it to stop the workers.
//! - [`Behaviour`]: the code of a worknode kind (a Rust handler, or `MuscleBehaviour`, feature
//!   `muscle`, hosted in a referee cell). A failing behaviour (error or panic) restarts the worknode from its event log;
//!   the parent receives [`Signal::ChildRestarted`] (or [`Signal::ChildStopped`] past the limit).
//! - [`State`] of named CRDTs ([`crdt`]): every change is a delta, and every delta is an event.
//! - [`EventStore`]: redb, an append-only stream per worknode with optimistic concurrency,
//!   idempotency by event id, group commit, snapshots; replayed on start.
//! - [`Capabilities`] / [`Issuer`]: biscuit tokens scoped to a subtree; every message carries an
//!   [`Authority`].
//! - [`Consistency`]: `Local`, `Eventual` (deltas shipped by [`replication`] over referee-comm),
//!   `Strong` (reserved: [`Unsupported`]).

#![deny(missing_docs)]

mod caps;
pub mod cli;
pub mod crdt;
mod error;
mod id;
#[cfg(feature = "muscle")]
mod muscle;
pub mod replication;
mod sched;
mod state;
mod store;
mod system;
pub mod tools;

pub use caps::{Authority, Capabilities, Grant, Issuer, Right, attenuate, revocation_ids};
pub use error::{
    CapError, CreateError, PathError, QueryError, SendError, StateError, StoreError, Unsupported, WriteError,
};
pub use id::{MAX_SEGMENT_LEN, WnPath, WorknodeId};
#[cfg(feature = "muscle")]
pub use muscle::{MuscleBehaviour, decode_f32s};
pub use state::{Crdt, Delta, Op, State};
pub use store::{
    Appended, DETACHED_MAX_BYTES, EventId, EventStore, Expected, KeptRow, NewEvent, StoreConfig, StoreStats,
    StoredEvent,
};
pub use system::{
    Behaviour, BehaviourError, Body, Committed, Completion, Consistency, Ctx, DataBehaviour, DigestCache, Envelope,
    Handle, MAX_CLOCK_AHEAD_MS, MAX_GAPS, MAX_GAPS_PER_AUTHOR, MAX_IDEMPOTENCY_KEY, Meta, NodeView, ROOT_ID, ROOT_KIND,
    Refused, Replicated, Shipment, Signal, Stats, System, SystemBuilder, SystemConfig, TreeEntry,
};

//! Typed errors, one enum per operation family. Messages say what was wrong and what to do.

use crate::id::{WnPath, WorknodeId};

/// A malformed worknode path or id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PathError {
    /// The path does not start with `/`.
    #[error("worknode path {0:?} is not absolute: write it as /segment/segment")]
    NotAbsolute(String),
    /// A segment is empty, too long, `.`/`..`, or has characters outside `[A-Za-z0-9._-]`.
    #[error("worknode path segment {0:?} is invalid: use 1 to 64 characters of A-Z a-z 0-9 . _ -")]
    BadSegment(String),
    /// Not a UUID.
    #[error("{0:?} is not a worknode id: expected a UUID such as 0190a5b2-...")]
    BadId(String),
}

/// A state operation that does not fit the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// The field already holds another CRDT kind.
    #[error("field holds a {have} but the operation needs a {got}: use another field name")]
    TypeMismatch {
        /// Kind stored.
        have: &'static str,
        /// Kind the operation needs.
        got: &'static str,
    },
    /// The field would leave its range: a counter past `u64` (grow) or `i64` (add; one
    /// replica's side of it past `u64`), or a replica's dots used up. The update is refused
    /// rather than clamped or lost.
    #[error("field {field:?} would overflow: nothing was applied")]
    Overflow {
        /// The field.
        field: String,
    },
    /// The field would grow past its size limit (`SystemConfig::max_field_bytes`, encoded): the
    /// change is refused, the field unchanged.
    #[error("field {field:?} would hold {bytes} bytes, above the limit of {max}: use more fields")]
    FieldFull {
        /// The field.
        field: String,
        /// Its encoded size with the change.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// The change is larger than `SystemConfig::max_delta_bytes` (encoded).
    #[error("a change of {bytes} bytes to field {field:?} is above the limit of {max}: split the value")]
    TooLarge {
        /// The field.
        field: String,
        /// Its encoded size.
        bytes: usize,
        /// The limit.
        max: usize,
    },
}

/// Event store failures.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Optimistic concurrency: the stream is not at the expected version.
    #[error("stream {stream} is at version {actual}, not the expected {expected}: reload and retry")]
    Conflict {
        /// The stream (worknode).
        stream: WorknodeId,
        /// What the caller expected (`None`: the stream must not exist).
        expected: u64,
        /// Where it is.
        actual: u64,
    },
    /// The database failed (I/O, full disk, corruption detected by redb).
    #[error("event store {path}: {reason}")]
    Database {
        /// The database file.
        path: String,
        /// What redb said.
        reason: String,
    },
    /// A stored record could not be decoded.
    #[error("event store record {what} is corrupt ({reason}): restore the file from a backup")]
    Corrupt {
        /// Which record.
        what: String,
        /// Decoder message.
        reason: String,
    },
    /// The store's writer thread stopped (after a database failure or shutdown).
    #[error("the event store writer has stopped: reopen the store")]
    Closed,
}

/// Capability (biscuit token) failures.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CapError {
    /// Not a token signed by this system's root key, or malformed.
    #[error("capability token is invalid ({0}): ask the issuer for a new one")]
    Invalid(String),
    /// One of the token's blocks was revoked.
    #[error("capability token was revoked (revocation id {0}): ask the issuer for a new one")]
    Revoked(String),
    /// The token does not grant `op` on `path`.
    #[error("capability token does not allow {op} on {path}: use a token scoped to that subtree")]
    Denied {
        /// Target path.
        path: WnPath,
        /// Operation.
        op: &'static str,
    },
    /// The attenuation asked for is not a narrowing of the token.
    #[error("cannot attenuate: {0}")]
    BadAttenuation(String),
}

/// Why a message was not delivered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// Backpressure: the mailbox is full. Retry later or slow down.
    #[error("mailbox of worknode {id} is full ({capacity} messages): back off and retry")]
    Full {
        /// Target.
        id: WorknodeId,
        /// Mailbox bound.
        capacity: u32,
    },
    /// No such worknode.
    #[error("no worknode {0} on this node: check the id (`referee node tree`)")]
    NotFound(String),
    /// The worknode exceeded its restart limit and was stopped.
    #[error("worknode {0} was stopped after repeated failures: see its parent's ChildStopped message")]
    Stopped(WorknodeId),
    /// The sender's authority does not cover the target.
    #[error(transparent)]
    Denied(#[from] CapError),
    /// The system is shutting down.
    #[error("the worknode system is shutting down")]
    ShuttingDown,
}

/// Why an acknowledged write ([`crate::Completion`]) did not become durable. Every variant but
/// [`WriteError::Store`] means nothing of the message was stored; after a store failure the
/// outcome is unknown to the caller, so retry with the same idempotency key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WriteError {
    /// The message was not queued (no such worknode, denied, mailbox full, stopped).
    #[error(transparent)]
    Send(#[from] SendError),
    /// The worknode's behaviour failed (error or panic) on this message; it restarted from its log.
    #[error("worknode {id}'s behaviour failed on this message ({reason}): nothing of it was stored")]
    Behaviour {
        /// The worknode.
        id: WorknodeId,
        /// The error or panic message.
        reason: String,
    },
    /// An operation does not fit its field; no operation of the update was applied.
    #[error("update of field {field:?} refused: {reason}; nothing of the update was stored")]
    Rejected {
        /// The field.
        field: String,
        /// Why.
        reason: StateError,
    },
    /// The worknode stopped (or the system shut down) before it handled the message.
    #[error("worknode {0} stopped before handling the message: nothing of it was stored")]
    Stopped(WorknodeId),
    /// The idempotency key is empty or too long.
    #[error("idempotency key of {len} bytes: use 1 to {max} bytes (a UUID is a good key)")]
    BadKey {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The event store failed to commit: retry with the same idempotency key.
    #[error("the update may not be durable ({0}): retry it with the same idempotency key")]
    Store(StoreError),
}

/// Why a worknode could not be created.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CreateError {
    /// Bad name or path.
    #[error(transparent)]
    Path(#[from] PathError),
    /// The parent does not exist.
    #[error("parent worknode {0} does not exist: create it first")]
    NoParent(String),
    /// A sibling already has this name.
    #[error("worknode {0} already exists")]
    Exists(WnPath),
    /// Bounded execution: the tree would get too deep.
    #[error("worknode {path} would be at depth {depth}, above the limit {max}: flatten the tree or raise max_depth")]
    TooDeep {
        /// The refused path.
        path: WnPath,
        /// Its depth.
        depth: usize,
        /// Configured limit.
        max: usize,
    },
    /// Bounded execution: the parent has too many children.
    #[error("worknode {parent} already has {max} children (the limit): group them under intermediate worknodes")]
    TooManyChildren {
        /// The parent.
        parent: WnPath,
        /// Configured limit.
        max: usize,
    },
    /// The arena is full.
    #[error("this node holds the maximum of {0} worknodes: raise SystemConfig::max_worknodes")]
    Capacity(usize),
    /// No behaviour registered for the kind.
    #[error("no behaviour registered for kind {0:?}: register it with System::register")]
    UnknownKind(String),
    /// The root kind belongs to `/` alone.
    #[error("kind \"root\" is reserved for the root worknode /: use another kind (\"data\")")]
    ReservedKind,
    /// The consistency level is not available yet.
    #[error(transparent)]
    Unsupported(#[from] Unsupported),
    /// The caller's token does not allow it.
    #[error(transparent)]
    Denied(#[from] CapError),
    /// Persisting the creation failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A feature reserved in the API but not implemented yet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0} is not supported yet: it is reserved for the cluster issue (Raft); use Local or Eventual")]
pub struct Unsupported(pub &'static str);

/// Why a query failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum QueryError {
    /// No such worknode.
    #[error("no worknode {0} on this node: check the id (`referee node tree`)")]
    NotFound(String),
    /// The caller's token does not allow reading it.
    #[error(transparent)]
    Denied(#[from] CapError),
    /// Strong reads are reserved.
    #[error(transparent)]
    Unsupported(#[from] Unsupported),
    /// The event store cannot be read (it is recovering from an I/O error): retry later.
    #[error("{0}: retry once the event store recovers")]
    Unavailable(String),
}

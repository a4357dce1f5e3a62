//! Runtime errors: load refusals, call failures and guest faults.

use referee_muscle::OpenError;

/// Why a call into a muscle faulted. The cell that faulted is discarded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Fault {
    /// Out-of-bounds memory or table access.
    #[error("out-of-bounds memory or table access")]
    OutOfBounds,
    /// The `unreachable` instruction.
    #[error("`unreachable` executed")]
    Unreachable,
    /// The wasm call stack was exhausted (unbounded recursion).
    #[error("call stack exhausted")]
    StackOverflow,
    /// Integer division or remainder by zero.
    #[error("integer divide by zero")]
    DivideByZero,
    /// Integer overflow (e.g. `i32::MIN / -1`) or invalid float-to-int conversion.
    #[error("integer overflow or invalid conversion")]
    IntegerOverflow,
    /// Indirect call to a null or mismatched table entry.
    #[error("bad indirect call")]
    BadIndirectCall,
    /// The call used up its fuel budget.
    #[error("fuel budget exhausted")]
    OutOfFuel,
    /// The call ran past its deadline.
    #[error("deadline exceeded")]
    Deadline,
    /// The muscle tried to grow its memory beyond its limit.
    #[error("memory limit exceeded")]
    MemoryLimit,
    /// The muscle tried to grow a table beyond its limit.
    #[error("table limit exceeded")]
    TableLimit,
    /// A host capability refused the call and aborted it (e.g. kv quota, bad pointer).
    #[error("host capability aborted the call: {0}")]
    Capability(String),
    /// The muscle's entry point returned a non-zero status.
    #[error("muscle returned error status {0}")]
    Status(i32),
    /// Any other trap.
    #[error("trap: {0}")]
    Other(String),
}

impl Fault {
    /// A stable machine-readable name.
    pub fn code(&self) -> &'static str {
        match self {
            Self::OutOfBounds => "out_of_bounds",
            Self::Unreachable => "unreachable",
            Self::StackOverflow => "stack_overflow",
            Self::DivideByZero => "divide_by_zero",
            Self::IntegerOverflow => "integer_overflow",
            Self::BadIndirectCall => "bad_indirect_call",
            Self::OutOfFuel => "out_of_fuel",
            Self::Deadline => "deadline",
            Self::MemoryLimit => "memory_limit",
            Self::TableLimit => "table_limit",
            Self::Capability(_) => "capability",
            Self::Status(_) => "status",
            Self::Other(_) => "trap",
        }
    }
}

/// Errors of the runtime API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    /// The sealed muscle was refused by the open pipeline.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// Keys or trust store could not be used.
    #[error(transparent)]
    Home(#[from] referee_trust::HomeError),
    /// The state database (audit log, kv) failed.
    #[error("state store: {0}")]
    Store(String),
    /// The policy file is invalid.
    #[error("policy: {0}")]
    Policy(String),
    /// The muscle imports a capability that policy does not grant.
    #[error("muscle `{muscle}` imports capability `{capability}`, which is {reason}; it was refused at load")]
    CapabilityDenied {
        /// Muscle name.
        muscle: String,
        /// The capability.
        capability: String,
        /// "not requested in its header" or "not granted by policy".
        reason: &'static str,
    },
    /// The module does not follow ABI v1.
    #[error("muscle `{muscle}` does not follow ABI v1: {why} (see docs/muscle-abi.md)")]
    Abi {
        /// Muscle name.
        muscle: String,
        /// What is wrong.
        why: String,
    },
    /// wasmtime refused to compile or instantiate the module.
    #[error("muscle `{muscle}` could not be compiled or instantiated: {why}")]
    Compile {
        /// Muscle name.
        muscle: String,
        /// The engine's message.
        why: String,
    },
    /// No muscle of that name is loaded.
    #[error("no muscle named `{0}` is loaded (see the list of loaded muscles)")]
    NotLoaded(String),
    /// The muscle is quarantined after repeated faults.
    #[error("muscle `{name}` is quarantined after {faults} faults; an operator must release it")]
    Quarantined {
        /// Muscle name.
        name: String,
        /// Faults in the window that triggered quarantine.
        faults: u32,
    },
    /// The muscle's queue is full.
    #[error("muscle `{name}` is busy ({queued} calls queued); retry later")]
    Busy {
        /// Muscle name.
        name: String,
        /// Calls queued.
        queued: usize,
    },
    /// The call faulted; the cell was replaced.
    #[error("muscle `{muscle}` faulted: {fault}")]
    Fault {
        /// Muscle name.
        muscle: String,
        /// The cause.
        fault: Fault,
    },
    /// The input does not match the muscle's declared shape.
    #[error("bad input for `{muscle}`: {why}")]
    BadInput {
        /// Muscle name.
        muscle: String,
        /// What is wrong.
        why: String,
    },
    /// The requested entry point does not exist.
    #[error("muscle `{muscle}` has no `{entry}` entry point")]
    NoEntry {
        /// Muscle name.
        muscle: String,
        /// The entry.
        entry: String,
    },
    /// The runtime is shutting down.
    #[error("the referee is shutting down")]
    ShuttingDown,
}

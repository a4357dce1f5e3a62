//! Command-line grammar. Names here are part of the user contract (PRODUCT.md); keep them stable.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Referee: sealed, signed muscles run in isolated, audited cells.
#[derive(Debug, Parser)]
#[command(name = "referee", version, about)]
pub(crate) struct Cli {
    /// Directory holding keys, trust store and data.
    #[arg(long, global = true, env = "REFEREE_HOME", value_name = "DIR")]
    pub(crate) home: Option<PathBuf>,

    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub(crate) json: bool,

    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Create the publisher key, referee identity and master key (existing keys are kept).
    Keygen,
    /// Compile INPUT (.wasm, .wat; .py and .onnx later) and seal it into a .muscle.
    Compile(CompileArgs),
    /// Show a muscle's header (no keys needed).
    Inspect {
        /// The .muscle file.
        file: PathBuf,
    },
    /// Fully open a muscle with this home's keys and trust store; exit 0 only if it would load.
    Verify {
        /// The .muscle file.
        file: PathBuf,
        /// Also record its version as accepted (raises the anti-rollback mark), as loading does.
        #[arg(long)]
        accept: bool,
    },
    /// Manage trusted publishers, revocations and anti-rollback marks.
    #[command(subcommand)]
    Trust(TrustCommand),
    /// Load a muscle into a referee cell and run one entry point; prints the output as JSON.
    Run(RunArgs),
    /// Check or show the hash-chained audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Produce (or verify) a signed attestation report of this referee.
    Attest(AttestArgs),
    /// Noise-encrypted messaging between nodes: keygen, id, listen, send, request, bench.
    #[command(subcommand)]
    Comm(referee_comm::cli::CommCommand),
    /// Worknodes: create, send, get, tree against a local store; `serve` runs a replica.
    #[command(subcommand)]
    Node(referee_worknode::cli::NodeCommand),
    /// Serve tools and muscles over REST and MCP on TCP and a Unix socket (prints an admin token).
    #[command(visible_alias = "up")]
    Serve(ServeArgs),
    /// Serve MCP over stdin/stdout for a local client (tools and muscles, operator rights).
    Mcp(McpArgs),
    /// Create, attenuate, revoke and list the gateway's capability tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Measure the runtime on this machine (a throwaway home; prints a table).
    Bench {
        /// Calls per latency measurement.
        #[arg(long, default_value_t = 200_000)]
        calls: u64,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub(crate) enum EntryArg {
    /// Inference.
    Forward,
    /// One training step (needs --target); prints the loss.
    Train,
}

#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// The .muscle file.
    pub(crate) file: PathBuf,
    /// Input tensor as a JSON array, flat or nested to the declared input shape.
    #[arg(long)]
    pub(crate) input: String,
    /// Entry point.
    #[arg(long, value_enum, default_value = "forward")]
    pub(crate) entry: EntryArg,
    /// Training target as a JSON array (with --entry train).
    #[arg(long)]
    pub(crate) target: Option<String>,
    /// Learning rate (with --entry train).
    #[arg(long, default_value_t = 0.01)]
    pub(crate) lr: f32,
    /// Policy file (TOML); default: grant every capability the muscle requests.
    #[arg(long, value_name = "POLICY.toml")]
    pub(crate) policy: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum AuditCommand {
    /// Walk the whole chain; exit 0 only if no record was modified, deleted, inserted or reordered.
    Verify,
    /// Show the most recent records.
    Tail {
        /// How many records.
        #[arg(short = 'n', long, default_value_t = 20)]
        count: usize,
    },
}

#[derive(Debug, Args)]
pub(crate) struct AttestArgs {
    /// `verify REPORT.json` checks a report instead of producing one.
    #[command(subcommand)]
    pub(crate) verify: Option<AttestVerify>,
    /// The verifier's fresh nonce (hex, at least 32 digits).
    #[arg(long, global = true)]
    pub(crate) nonce: Option<String>,
    /// Muscles to load before reporting (the report lists what is loaded).
    #[arg(long = "load", value_name = "X.muscle")]
    pub(crate) load: Vec<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum AttestVerify {
    /// Verify a signed report: signature, referee key, nonce and freshness.
    Verify {
        /// The report (JSON, as printed by `referee attest`).
        report: PathBuf,
        /// The referee's public key file (referee.pub).
        #[arg(long, value_name = "REFEREE.pub")]
        referee_key: PathBuf,
        /// Largest accepted age of the report, seconds.
        #[arg(long, default_value_t = 300)]
        max_age: u64,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum ModeArg {
    /// Wrap the content key under this home's master key.
    Master,
    /// Seal the content key with HPKE to each --recipient referee.
    Recipient,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum SuiteArg {
    /// AES-256-GCM.
    #[value(name = "aes-256-gcm")]
    Aes256Gcm,
    /// ChaCha20-Poly1305.
    #[value(name = "chacha20-poly1305")]
    ChaCha20Poly1305,
}

#[derive(Debug, Args)]
pub(crate) struct CompileArgs {
    /// Source file; the extension picks the frontend.
    pub(crate) input: PathBuf,
    /// Output .muscle path.
    #[arg(short, long, value_name = "OUT.muscle")]
    pub(crate) output: PathBuf,
    /// Muscle name (default: derived from the input file name).
    #[arg(long)]
    pub(crate) name: Option<String>,
    /// Muscle version; referees refuse versions lower than one they accepted.
    #[arg(long, default_value_t = 1)]
    pub(crate) version: u64,
    /// Muscle id as 32 hex digits (default: derived from publisher key and name).
    #[arg(long, value_name = "HEX")]
    pub(crate) muscle_id: Option<String>,
    /// Requested capability (repeatable; default: the module's `referee.*` imports).
    #[arg(long = "cap", value_name = "NAME")]
    pub(crate) capabilities: Vec<String>,
    /// Memory limit, e.g. 65536, 64KiB, 16MiB (0: referee default).
    #[arg(long, default_value = "0", value_name = "BYTES")]
    pub(crate) memory: String,
    /// Wall-clock limit per call in milliseconds (0: referee default).
    #[arg(long, default_value_t = 0, value_name = "MS")]
    pub(crate) time_ms: u32,
    /// Fuel (instruction budget) per call (0: none).
    #[arg(long, default_value_t = 0)]
    pub(crate) fuel: u64,
    /// Referee key id allowed to load it, or `any` (repeatable).
    #[arg(long = "bind", value_name = "KEY_ID|any")]
    pub(crate) bind: Vec<String>,
    /// Key delivery mode.
    #[arg(long, value_enum, default_value = "master")]
    pub(crate) mode: ModeArg,
    /// Referee public key file (recipient mode; repeatable; default: this home's referee.pub).
    #[arg(long = "recipient", value_name = "REFEREE.pub")]
    pub(crate) recipients: Vec<PathBuf>,
    /// Payload cipher.
    #[arg(long, value_enum, default_value = "aes-256-gcm")]
    pub(crate) suite: SuiteArg,
    /// Add an ML-DSA-65 signature (hybrid post-quantum).
    #[arg(long)]
    pub(crate) pq: bool,
    /// Input tensor shape, comma-separated, e.g. 1,4.
    #[arg(long, value_name = "DIMS")]
    pub(crate) input_shape: Option<String>,
    /// Output tensor shape, comma-separated, e.g. 1,1.
    #[arg(long, value_name = "DIMS")]
    pub(crate) output_shape: Option<String>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum TrustCommand {
    /// Trust a publisher public key file.
    Add {
        /// The publisher.pub file.
        file: PathBuf,
        /// A label for listings.
        #[arg(long, default_value = "")]
        label: String,
        /// Require hybrid ML-DSA-65 signatures from this publisher.
        #[arg(long)]
        require_pq: bool,
    },
    /// Stop trusting a publisher.
    Remove {
        /// Publisher key id (64 hex digits).
        publisher: String,
    },
    /// List trusted publishers, revocations and accepted versions.
    List,
    /// Revoke a publisher, a muscle id, or one version of a muscle id.
    Revoke {
        /// Publisher key id to revoke.
        #[arg(long, conflicts_with_all = ["muscle", "version"], required_unless_present = "muscle")]
        publisher: Option<String>,
        /// Muscle id (32 hex digits) to revoke.
        #[arg(long)]
        muscle: Option<String>,
        /// Only this version of --muscle.
        #[arg(long, requires = "muscle")]
        version: Option<u64>,
        /// Why (kept in the store).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Explicitly allow versions from --to upward again (lowers the anti-rollback mark).
    AllowRollback {
        /// Publisher key id.
        #[arg(long)]
        publisher: String,
        /// Muscle name.
        #[arg(long)]
        name: String,
        /// Lowest version to accept from now on.
        #[arg(long)]
        to: u64,
    },
}

/// Options shared by `serve` and `mcp`.
#[derive(Debug, Args)]
pub(crate) struct GatewayArgs {
    /// TOML configuration file (see docs/gateway.md); flags and environment override it.
    #[arg(long, env = "REFEREE_CONFIG", value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// Do not compile and load the bundled example muscles.
    #[arg(long)]
    pub(crate) no_examples: bool,
    /// Directory the file and git tools may use (repeatable; default HOME/files).
    #[arg(long = "root", env = "REFEREE_ROOTS", value_delimiter = ':', value_name = "DIR")]
    pub(crate) roots: Vec<PathBuf>,
    /// Per-token requests a second (0: unlimited).
    #[arg(long, env = "REFEREE_RATE", value_name = "N")]
    pub(crate) rate: Option<f64>,
    /// Per-token burst (requests saved up).
    #[arg(long, env = "REFEREE_BURST", value_name = "N")]
    pub(crate) burst: Option<u32>,
    /// Per-token requests in flight.
    #[arg(long, env = "REFEREE_CONCURRENCY", value_name = "N")]
    pub(crate) concurrency: Option<usize>,
    /// Largest request body, bytes.
    #[arg(long, env = "REFEREE_BODY_LIMIT", value_name = "BYTES")]
    pub(crate) body_limit: Option<usize>,
    /// Deadline of one tool call, milliseconds.
    #[arg(long, env = "REFEREE_TOOL_TIMEOUT_MS", value_name = "MS")]
    pub(crate) tool_timeout_ms: Option<u64>,
    /// Most calls in one batch.
    #[arg(long, env = "REFEREE_BATCH_MAX", value_name = "N")]
    pub(crate) batch_max: Option<usize>,
}

#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    #[command(flatten)]
    pub(crate) common: GatewayArgs,
    /// TCP address (port 0 picks a free one; the ready line says which).
    #[arg(long, env = "REFEREE_LISTEN", value_name = "ADDR")]
    pub(crate) listen: Option<std::net::SocketAddr>,
    /// No TCP listener (Unix socket only).
    #[arg(long)]
    pub(crate) no_tcp: bool,
    /// Unix socket path (default: HOME/gateway.sock).
    #[arg(long, env = "REFEREE_SOCKET", value_name = "PATH")]
    pub(crate) unix: Option<PathBuf>,
    /// No Unix socket.
    #[arg(long, conflicts_with = "unix")]
    pub(crate) no_unix: bool,
}

#[derive(Debug, Args)]
pub(crate) struct McpArgs {
    #[command(flatten)]
    pub(crate) common: GatewayArgs,
}

/// Narrowing options shared by `token create` and `token attenuate`.
#[derive(Debug, Args)]
pub(crate) struct TokenScopeArgs {
    /// Allowed tool (repeatable; `*` for all).
    #[arg(long = "tool", value_name = "NAME")]
    pub(crate) tools: Vec<String>,
    /// Allowed muscle (repeatable; `*` for all).
    #[arg(long = "muscle", value_name = "NAME")]
    pub(crate) muscles: Vec<String>,
    /// Allowed path prefix (repeatable, absolute; `*` for every root).
    #[arg(long = "path", value_name = "PREFIX")]
    pub(crate) paths: Vec<String>,
    /// Worknode subtree the node tools may act on (repeatable, e.g. /acme/research; `*` for the
    /// whole tree). Without one a token has no worknode rights.
    #[arg(long = "node", value_name = "SUBTREE")]
    pub(crate) nodes: Vec<String>,
    /// Lifetime: seconds or 30s, 15m, 2h, 7d.
    #[arg(long, value_name = "DURATION")]
    pub(crate) ttl: Option<String>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum TokenCommand {
    /// Mint a token with the gateway's root key (through the running server if there is one).
    Create {
        #[command(flatten)]
        scope: TokenScopeArgs,
        /// May manage muscles and tokens (implies every tool, muscle and path).
        #[arg(long)]
        admin: bool,
        /// Label shown by `token list`.
        #[arg(long, default_value = "")]
        label: String,
        /// The server's Unix socket (default: HOME/gateway.sock).
        #[arg(long, env = "REFEREE_SOCKET", value_name = "PATH")]
        unix: Option<PathBuf>,
    },
    /// Narrow a token offline (no key needed); the result can never do more than the original.
    Attenuate {
        /// The token to narrow.
        token: String,
        #[command(flatten)]
        scope: TokenScopeArgs,
    },
    /// Revoke a token id (and every token attenuated from it).
    Revoke {
        /// Revocation id (from `token create` or `token list`).
        id: String,
        /// The server's Unix socket (default: HOME/gateway.sock).
        #[arg(long, env = "REFEREE_SOCKET", value_name = "PATH")]
        unix: Option<PathBuf>,
    },
    /// List issued tokens (ids, rights, expiry, revoked).
    List {
        /// The server's Unix socket (default: HOME/gateway.sock).
        #[arg(long, env = "REFEREE_SOCKET", value_name = "PATH")]
        unix: Option<PathBuf>,
    },
}

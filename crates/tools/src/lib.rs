//! The gateway's native tools and the reality check.
//!
//! A [`Tool`] is a named operation with a JSON input schema, a JSON output schema and MCP
//! annotations. The gateway (REST and MCP) only ever sees tools through this trait, so a tool
//! added here appears on every surface at once. Tools are synchronous: they do blocking file,
//! git and process work, and the gateway runs them on its blocking pool with a deadline.
//!
//! Every path a tool touches goes through the reality check first (resolved against the
//! configured roots, refused if it escapes one, opened race-free beneath the root).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use serde_json::Value;

pub mod config;
pub mod exec;
pub mod fs;
#[cfg(feature = "git")]
pub mod git;
pub mod process;
pub mod reality;
mod util;

pub use config::{CommandSpec, ConfigError, ExecConfig, Limits, ToolsConfig};
pub use reality::Reality;

/// How a tool behaves, as MCP annotations describe it (hints for agents and UIs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ToolAnnotations {
    /// The tool does not change anything.
    pub read_only: bool,
    /// The tool may destroy or overwrite data (meaningful only when not read-only).
    pub destructive: bool,
    /// Calling the tool twice with the same input has no further effect.
    pub idempotent: bool,
    /// The tool reaches outside the referee's own world (network, other processes).
    pub open_world: bool,
}

/// A tool's public description: what it is called, what it takes and what it returns.
#[derive(Debug, Clone, Serialize)]
pub struct ToolSpec {
    /// Unique name, `[a-z][a-z0-9_]*`, e.g. `fs_read`.
    pub name: String,
    /// One or two sentences for a human or an agent.
    pub description: String,
    /// JSON Schema (draft 2020-12) of the `params` object.
    pub input_schema: Value,
    /// JSON Schema of the `data` object a successful call returns.
    pub output_schema: Value,
    /// MCP behaviour hints.
    pub annotations: ToolAnnotations,
    /// Cost class of the execution path: 0.0 native, 0.1 sandboxed.
    pub torsion: f64,
}

/// What the caller is allowed to touch, already derived from its verified token.
#[derive(Debug, Clone, Default)]
pub struct CallScope {
    /// Path prefixes (absolute, inside the configured roots) the caller may use; `None` means
    /// every configured root.
    pub path_prefixes: Option<Vec<PathBuf>>,
    /// Worknode subtrees the caller may act on, each ending in `/` (`/acme/research/`); `None`
    /// means the whole tree, an empty list no worknode at all.
    pub node_prefixes: Option<Vec<String>>,
    /// The call must finish before this instant; tools that can stop early check it.
    pub deadline: Option<Instant>,
}

/// A successful call's result.
#[derive(Debug, Clone, Serialize)]
pub struct ToolOutput {
    /// The tool's result, matching its output schema.
    pub data: Value,
    /// 1.0 when every path the call touched passed the reality check (always, on success).
    pub reality_index: f64,
    /// The tool's cost class (see [`ToolSpec::torsion`]).
    pub torsion: f64,
}

/// Why a tool call was refused or failed. Every variant says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// The parameters do not match the tool's input schema.
    #[error("invalid parameters: {0}")]
    InvalidParams(String),
    /// A path failed the reality check (outside every root, through an escaping symlink, a
    /// device/fifo/socket, NUL, overlong, ...). Counted as a reality violation.
    #[error("path refused by the reality check: {0}")]
    RealityViolation(String),
    /// The caller's token does not cover this path or tool.
    #[error("not permitted: {0}")]
    Forbidden(String),
    /// The target does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The target exists and the call was create-only.
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// A size, count or output limit was hit.
    #[error("limit exceeded: {0}")]
    TooLarge(String),
    /// The call did not finish before its deadline.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The tool needs something this host does not have (e.g. bubblewrap for `exec`).
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// An unexpected I/O or library failure; the message names the operation.
    #[error("tool failed: {0}")]
    Failed(String),
}

/// A tool the gateway can expose over REST and MCP.
pub trait Tool: Send + Sync {
    /// The tool's description and schemas.
    fn spec(&self) -> &ToolSpec;
    /// Runs the tool. Blocking; the gateway calls it from its blocking pool.
    fn call(&self, params: Value, scope: &CallScope) -> Result<ToolOutput, ToolError>;
}

/// A shared, type-erased tool.
pub type SharedTool = Arc<dyn Tool>;

/// Every built-in tool, configured: `fs_read`, `fs_write`, `fs_list`, `fs_stat`, `fs_search`,
/// `process_list`, `git_status`, `git_log`, `git_diff` (feature `git`, on by default) and `exec`.
///
/// Validates the roots (they must exist, be directories and not be symlinks) and the `exec`
/// allow-list. `exec` is always listed; when bubblewrap cannot sandbox on this host it answers
/// [`ToolError::Unavailable`] instead of running anything.
pub fn builtin_tools(config: &ToolsConfig) -> Result<Vec<SharedTool>, ConfigError> {
    let reality = Arc::new(Reality::new(&config.roots, &config.limits)?);
    let mut tools = fs::tools(&reality, &config.limits);
    tools.extend(process::tools(&config.limits));
    #[cfg(feature = "git")]
    tools.extend(git::tools(&reality, &config.limits));
    tools.push(Arc::new(exec::ExecTool::new(&config.exec, &config.limits)?));
    Ok(tools)
}

//! Configuration of the built-in tools: roots, limits and the `exec` allow-list.
//!
//! Deserializes from the gateway's TOML (a `[tools]` table); every field has a default so an
//! empty table plus `roots = [...]` is a working configuration.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

/// Everything the built-in tools need: where they may touch files, how much, and what `exec`
/// may run.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ToolsConfig {
    /// Directories the file and git tools may use. Each must exist, be a directory and not be
    /// a symlink. Relative request paths are relative to the first one.
    pub roots: Vec<PathBuf>,
    /// Size and count limits.
    pub limits: Limits,
    /// The `exec` tool's sandbox and allow-list.
    pub exec: ExecConfig,
}

/// Size and count limits applied by the tools.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Most bytes `fs_read` returns in one call.
    pub max_read_bytes: u64,
    /// Most bytes `fs_write` writes in one call.
    pub max_write_bytes: u64,
    /// Most entries `fs_list` and `process_list` return.
    pub max_list_entries: usize,
    /// Most matches `fs_search` returns.
    pub max_search_results: usize,
    /// Most directory entries `fs_search` looks at before it stops.
    pub max_search_visited: usize,
    /// Longest accepted request path, in bytes.
    pub max_path_bytes: usize,
    /// Longest accepted path component, in bytes (Linux `NAME_MAX` is 255).
    pub max_component_bytes: usize,
    /// Most commits `git_log` returns.
    pub max_log_entries: usize,
    /// Most bytes of patch text `git_diff` returns.
    pub max_diff_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_read_bytes: 8 << 20,
            max_write_bytes: 8 << 20,
            max_list_entries: 1000,
            max_search_results: 1000,
            max_search_visited: 100_000,
            max_path_bytes: 4096,
            max_component_bytes: 255,
            max_log_entries: 500,
            max_diff_bytes: 1 << 20,
        }
    }
}

/// The `exec` tool: which commands it may run and the sandbox around them.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExecConfig {
    /// The bubblewrap binary.
    pub bwrap: PathBuf,
    /// The only directory a command can write to (bound read-write into the sandbox at the
    /// same path). `None` disables `exec`.
    pub work_root: Option<PathBuf>,
    /// Allow-list: tool-visible name -> program and fixed leading arguments.
    pub commands: BTreeMap<String, CommandSpec>,
    /// Host paths bound read-only into the sandbox (skipped when missing; symlinks such as a
    /// merged-usr `/bin` are recreated as symlinks). Not `/etc`: only the files programs need
    /// from it (the loader cache, the alternatives links); `/etc/passwd` and `/etc/group` inside
    /// hold only the sandbox's own user.
    pub ro_binds: Vec<PathBuf>,
    /// The host uid commands run as. Default: the server's own uid, or 65534 (`nobody`) when
    /// the server runs as root. Never 0; another uid than the server's needs a root server.
    /// The work root must be readable, writable and searchable by it.
    pub run_as_uid: Option<u32>,
    /// The host gid commands run as (default like [`ExecConfig::run_as_uid`]: 65534 for a root
    /// server); no supplementary groups.
    pub run_as_gid: Option<u32>,
    /// Wall-clock limit per command, in milliseconds; the sandbox is killed at the deadline.
    pub timeout_ms: u64,
    /// Most bytes kept from each of stdout and stderr; the rest is discarded.
    pub max_output_bytes: usize,
    /// Size of the sandbox's private `/tmp` (memory), bytes.
    pub tmp_bytes: u64,
    /// Largest file a command may write (`RLIMIT_FSIZE`), bytes; 0: no limit.
    pub max_file_bytes: u64,
    /// Address space of each sandboxed process (`RLIMIT_AS`), bytes; 0: no limit.
    pub max_memory_bytes: u64,
    /// Processes the sandbox user may have at once (`RLIMIT_NPROC`), counted over every
    /// sandbox; applied when commands run as their own user (a root server). 0: no limit.
    pub max_processes: u64,
}

impl Default for ExecConfig {
    fn default() -> Self {
        Self {
            bwrap: PathBuf::from("/usr/bin/bwrap"),
            work_root: None,
            commands: BTreeMap::new(),
            ro_binds: ["/usr", "/bin", "/sbin", "/lib", "/lib64", "/etc/ld.so.cache", "/etc/alternatives"]
                .iter()
                .map(PathBuf::from)
                .collect(),
            run_as_uid: None,
            run_as_gid: None,
            timeout_ms: 10_000,
            max_output_bytes: 1 << 20,
            tmp_bytes: 256 << 20,
            max_file_bytes: 1 << 30,
            max_memory_bytes: 4 << 30,
            max_processes: 256,
        }
    }
}

/// One allow-listed command.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandSpec {
    /// Absolute path of the program (inside one of the read-only binds or the work root).
    pub program: PathBuf,
    /// Arguments always passed first; the caller's arguments follow.
    #[serde(default)]
    pub args: Vec<String>,
}

/// Why a [`ToolsConfig`] cannot be used. Each message names the offending setting.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `roots` is empty.
    #[error("tools.roots is empty: configure at least one directory the tools may use")]
    NoRoots,
    /// A root (or the exec work root) cannot be inspected.
    #[error("root {path}: {source} (create it or fix the path)")]
    RootUnreadable {
        /// The configured path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A root is not a directory.
    #[error("root {path} is not a directory")]
    RootNotDirectory {
        /// The configured path.
        path: PathBuf,
    },
    /// A root is itself a symlink; configure its target instead.
    #[error("root {path} is a symlink to {target}: configure the real directory {target} instead")]
    RootIsSymlink {
        /// The configured path.
        path: PathBuf,
        /// Where the symlink leads (fully resolved when possible).
        target: PathBuf,
    },
    /// The uid or gid `exec` would run as is not allowed.
    #[error("tools.exec.run_as: {0}")]
    BadUser(String),
    /// An `exec` command is misconfigured.
    #[error("exec command {name:?}: {reason}")]
    BadCommand {
        /// The allow-list name.
        name: String,
        /// What is wrong.
        reason: String,
    },
}

//! `referee serve` configuration: a TOML file, every key optional; the CLI applies flags and
//! environment variables on top.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

/// The whole configuration file.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// Where to listen.
    pub listen: ListenConfig,
    /// Request limits.
    pub limits: LimitsConfig,
    /// Token verification.
    pub auth: AuthConfig,
    /// MCP over Streamable HTTP.
    pub mcp: McpConfig,
    /// The native tools' configuration (roots, exec, ...), handed to `referee-tools` as is.
    pub tools: toml::Table,
    /// Load the bundled example muscles at startup.
    pub examples: bool,
    /// The code's VDR score as measured at build time, reported by `/vdr` (unknown if unset).
    pub vdr_score: Option<f64>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: ListenConfig::default(),
            limits: LimitsConfig::default(),
            auth: AuthConfig::default(),
            mcp: McpConfig::default(),
            tools: toml::Table::new(),
            examples: true,
            vdr_score: None,
        }
    }
}

/// Listeners.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ListenConfig {
    /// TCP address; port 0 picks a free port (the readiness line says which).
    pub tcp: Option<SocketAddr>,
    /// Unix socket path; default `<home>/gateway.sock`.
    pub unix: Option<PathBuf>,
    /// Disable the Unix socket.
    pub no_unix: bool,
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self { tcp: Some(SocketAddr::from(([127, 0, 0, 1], 8080))), unix: None, no_unix: false }
    }
}

/// Limits on requests.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest request body, bytes (413 above it). Muscle uploads are limited by the muscle format.
    pub body_bytes: usize,
    /// Largest muscle upload, bytes.
    pub upload_bytes: usize,
    /// Requests a second per token (0: unlimited).
    pub rate_per_second: f64,
    /// Requests a token may save up.
    pub burst: u32,
    /// Requests of one token in flight at once.
    pub concurrency: usize,
    /// Deadline of one tool call, milliseconds.
    pub tool_timeout_ms: u64,
    /// Most items in one batch.
    pub batch_max: usize,
    /// Items of one batch running at once.
    pub batch_concurrency: usize,
    /// How long shutdown waits for requests in flight, milliseconds.
    pub drain_ms: u64,
    /// How long a connection may take to send a request's headers, from the moment it waits
    /// for one (so also how long a keep-alive HTTP/1 connection may sit between requests),
    /// milliseconds. Closed after it.
    pub header_read_timeout_ms: u64,
    /// How long a connection may go with no byte read or written, in any state (a slow body,
    /// a client that stops reading its answer), milliseconds; it must exceed the longest call.
    pub idle_timeout_ms: u64,
    /// Connections open at once, per listener; past it a new connection is closed at once
    /// (and counted). Lowered at startup to what the open-file limit allows.
    pub max_connections: usize,
    /// Denials of one (reason, source) pair within this interval are one audit record (after
    /// the first, which is recorded at once), milliseconds; at least 100.
    pub denial_window_ms: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            body_bytes: 1 << 20,
            upload_bytes: 64 << 20,
            rate_per_second: 10_000.0,
            burst: 20_000,
            concurrency: 256,
            tool_timeout_ms: 30_000,
            batch_max: 64,
            batch_concurrency: 16,
            drain_ms: 10_000,
            header_read_timeout_ms: 10_000,
            idle_timeout_ms: 120_000,
            max_connections: 4096,
            denial_window_ms: 10_000,
        }
    }
}

/// Token verification.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// How long a verified token's scope is reused before it is verified again, seconds.
    pub cache_ttl_secs: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self { cache_ttl_secs: 10 }
    }
}

/// MCP over Streamable HTTP.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct McpConfig {
    /// Serve `/mcp`.
    pub enabled: bool,
    /// Host headers accepted on `/mcp` (DNS-rebinding protection); empty: loopback names only.
    pub allowed_hosts: Vec<String>,
}

impl Default for McpConfig {
    fn default() -> Self {
        Self { enabled: true, allowed_hosts: Vec::new() }
    }
}

/// Why a configuration file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("config {path}: {why}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong (unknown key, wrong type, ...).
        why: String,
    },
}

impl GatewayConfig {
    /// Reads a TOML file.
    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.to_owned(), why: e.to_string() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_default_and_unknown_keys_are_refused() {
        let c: GatewayConfig = toml::from_str("").unwrap();
        assert_eq!(c.listen.tcp, Some("127.0.0.1:8080".parse().unwrap()));
        assert_eq!(c.limits.batch_max, 64);
        let c: GatewayConfig = toml::from_str("[limits]\nbatch_max = 3\n[tools]\nroots = [\"/tmp\"]\n").unwrap();
        assert_eq!(c.limits.batch_max, 3);
        assert!(c.tools.contains_key("roots"));
        assert!(toml::from_str::<GatewayConfig>("[limits]\nbatch_mx = 3\n").is_err());
    }
}

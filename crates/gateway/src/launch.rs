//! What the `referee` command runs: `serve`, `mcp` (stdio) and the token commands, which talk
//! to a running server over its Unix socket (the server holds the stores' locks) or, when
//! none runs, use the stores directly.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use referee_runtime::{Runtime, RuntimeOptions};
use referee_tools::SharedTool;
use referee_trust::Home;
use serde::Serialize;
use serde_json::{Value, json};

use crate::auth::{AuthError, Authority, Grant, RootKey, now_unix};
use crate::config::GatewayConfig;
use crate::gateway::{Gateway, StartError};
use crate::server::{SOCKET_FILE, Server, shutdown_signal};
use crate::store::{GatewayStore, STORE_FILE, StoreError, TokenRecord};

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// Keys, runtime or home.
    #[error("{0}")]
    Setup(String),
    /// Gateway start-up.
    #[error(transparent)]
    Start(#[from] StartError),
    /// Tokens.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// The running server refused or failed.
    #[error("server at {socket}: {why}")]
    Server {
        /// The socket.
        socket: PathBuf,
        /// Status and message.
        why: String,
    },
}

impl From<StoreError> for LaunchError {
    fn from(e: StoreError) -> Self {
        Self::Auth(AuthError::from(e))
    }
}

fn setup(e: impl std::fmt::Display) -> LaunchError {
    LaunchError::Setup(e.to_string())
}

/// What `referee serve` reports once it listens.
#[derive(Clone, Debug, Serialize)]
pub struct Ready {
    /// Always `ready`.
    pub event: &'static str,
    /// The bound TCP address.
    pub tcp: Option<SocketAddr>,
    /// The Unix socket.
    pub unix: Option<PathBuf>,
    /// A fresh admin token (7 days).
    pub admin_token: String,
    /// Its revocation id.
    pub admin_token_id: String,
    /// Muscles loaded at start.
    pub muscles: Vec<String>,
}

/// The admin token printed at start lives this long.
const STARTUP_TOKEN_SECS: u64 = 7 * 24 * 3600;

/// The Unix socket path the configuration asks for.
pub fn socket_path(home: &Home, config: &GatewayConfig) -> Option<PathBuf> {
    if config.listen.no_unix {
        None
    } else {
        Some(config.listen.unix.clone().unwrap_or_else(|| home.root().join(SOCKET_FILE)))
    }
}

fn tokio_runtime() -> Result<tokio::runtime::Runtime, LaunchError> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(setup)
}

fn open_gateway(
    home: &Home,
    config: GatewayConfig,
    native: Vec<SharedTool>,
    preload: &[Vec<u8>],
) -> Result<(Arc<Gateway>, Vec<String>), LaunchError> {
    home.keygen().map_err(setup)?;
    let runtime = Arc::new(Runtime::open(home, RuntimeOptions::default()).map_err(setup)?);
    let mut loaded = Vec::new();
    for sealed in preload {
        loaded.push(runtime.load(sealed).map_err(setup)?.header.name);
    }
    Ok((Arc::new(Gateway::new(home, runtime, native, config)?), loaded))
}

/// `referee serve`: creates the home if needed, loads `preload` (sealed muscles), listens,
/// calls `on_ready`, and serves until SIGINT or SIGTERM.
pub fn serve(
    home: &Home,
    config: GatewayConfig,
    native: Vec<SharedTool>,
    preload: &[Vec<u8>],
    on_ready: impl FnOnce(&Ready),
) -> Result<(), LaunchError> {
    let tcp = config.listen.tcp;
    let unix = socket_path(home, &config);
    let (gateway, muscles) = open_gateway(home, config, native, preload)?;
    let grant = Grant::admin("serve", Some(now_unix() + STARTUP_TOKEN_SECS));
    let (admin_token, record) = gateway.authority().mint(&grant)?;
    let rt = tokio_runtime()?;
    rt.block_on(async move {
        let server = Server::bind(gateway, tcp, unix).await?;
        on_ready(&Ready {
            event: "ready",
            tcp: server.tcp_addr(),
            unix: server.unix_path().map(Path::to_owned),
            admin_token,
            admin_token_id: record.id,
            muscles,
        });
        server.run(shutdown_signal()).await?;
        Ok(())
    })
}

/// `referee mcp`: MCP over stdin/stdout for the local operator (an admin scope).
pub fn mcp_stdio(
    home: &Home,
    config: GatewayConfig,
    native: Vec<SharedTool>,
    preload: &[Vec<u8>],
) -> Result<(), LaunchError> {
    let (gateway, _) = open_gateway(home, config, native, preload)?;
    let token = RootKey::load_or_create(&home.root().join("keys"))?.mint(&Grant::admin("stdio", None))?;
    let scope = gateway.authority().verify(&token)?;
    // One client on one pair of pipes: the transport, rmcp's service loop and the handlers
    // all run on this thread, so a call crosses threads only to run its tool (on the blocking
    // pool) and back, never between workers.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(setup)?;
    rt.block_on(crate::mcp::serve_stdio(gateway, scope)).map_err(setup)
}

/// Where token commands go.
enum Backend {
    Server { socket: PathBuf, token: String },
    Local(Box<Authority>),
}

fn backend(home: &Home, socket: &Path) -> Result<Backend, LaunchError> {
    let keys = home.root().join("keys");
    if UnixStream::connect(socket).is_ok() {
        let token = RootKey::load_or_create(&keys)?.ephemeral_admin(60)?;
        return Ok(Backend::Server { socket: socket.to_owned(), token });
    }
    home.ensure_dirs().map_err(setup)?;
    let store = Arc::new(GatewayStore::open(&home.root().join(STORE_FILE))?);
    Ok(Backend::Local(Box::new(Authority::open(&keys, store, Duration::from_secs(1))?)))
}

/// One HTTP/1.1 request over the Unix socket; returns the JSON body of a 2xx response.
fn request(socket: &Path, token: &str, method: &str, path: &str, body: Option<&Value>) -> Result<Value, LaunchError> {
    let fail = |why: String| LaunchError::Server { socket: socket.to_owned(), why };
    let mut stream = UnixStream::connect(socket).map_err(|e| fail(e.to_string()))?;
    stream.set_read_timeout(Some(Duration::from_secs(30))).map_err(|e| fail(e.to_string()))?;
    let body = body.map(Value::to_string).unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.write_all(body.as_bytes()))
        .map_err(|e| fail(e.to_string()))?;
    let mut raw = Vec::new();
    stream.take(16 << 20).read_to_end(&mut raw).map_err(|e| fail(e.to_string()))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| fail("malformed HTTP response".into()))?;
    let status: u16 = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    if !(200..300).contains(&status) {
        return Err(fail(format!("HTTP {status}: {}", body.trim())));
    }
    if body.trim().is_empty() { Ok(Value::Null) } else { serde_json::from_str(body).map_err(|e| fail(e.to_string())) }
}

fn decode<T: serde::de::DeserializeOwned>(socket: &Path, v: Value) -> Result<T, LaunchError> {
    serde_json::from_value(v).map_err(|e| LaunchError::Server { socket: socket.to_owned(), why: e.to_string() })
}

/// The audit record of a minted token (never the token itself): who minted it (`by`, the
/// minting token's id; `None` for the CLI with the root key) and from where.
pub fn mint_event(record: &TokenRecord, by: Option<&str>, source: &str) -> Value {
    json!({
        "kind": "token_mint", "id": record.id, "label": record.label, "tools": record.tools,
        "muscles": record.muscles, "paths": record.paths, "nodes": record.nodes, "admin": record.admin,
        "expires_at": record.expires_at, "by": by, "source": source,
    })
}

/// The audit record of a revocation.
pub fn revoke_event(id: &str, by: Option<&str>, source: &str) -> Value {
    json!({ "kind": "token_revoke", "id": id, "by": by, "source": source })
}

/// Appends `event` to the home's audit log when no server holds it (the CLI's own mint and
/// revoke). Refuses to go on if it cannot: a token is never handed out unaudited.
fn audit_locally(home: &Home, event: &Value) -> Result<(), LaunchError> {
    let path = referee_runtime::state_db_path(home);
    let db = redb::Database::create(&path).map_err(|e| setup(format!("audit log {}: {e}", path.display())))?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(|e| setup(format!("chmod 600 {}: {e}", path.display())))?;
    let log = referee_runtime::AuditLog::new(Arc::new(db)).map_err(setup)?;
    log.append(event).map(|_| ()).map_err(|e| setup(format!("audit log {}: {e}", path.display())))
}

/// Mints and records a token (through the running server if there is one).
pub fn token_create(home: &Home, socket: &Path, grant: &Grant) -> Result<(String, TokenRecord), LaunchError> {
    match backend(home, socket)? {
        Backend::Local(auth) => {
            let (token, record) = auth.mint(grant)?;
            audit_locally(home, &mint_event(&record, None, "cli"))?;
            Ok((token, record))
        }
        Backend::Server { socket, token } => {
            let body = json!({
                "tools": grant.tools, "muscles": grant.muscles, "paths": grant.paths, "nodes": grant.nodes,
                "admin": grant.admin,
                "ttl_secs": grant.expires_at.map(|t| t.saturating_sub(now_unix())), "label": grant.label,
            });
            let v = request(&socket, &token, "POST", "/v1/tokens", Some(&body))?;
            let token: String = decode(&socket, v.get("token").cloned().unwrap_or_default())?;
            let record = decode(&socket, v.get("record").cloned().unwrap_or_default())?;
            Ok((token, record))
        }
    }
}

/// Revokes a token id (through the running server if there is one).
pub fn token_revoke(home: &Home, socket: &Path, id: &str) -> Result<(), LaunchError> {
    match backend(home, socket)? {
        Backend::Local(auth) => {
            auth.revoke(id)?;
            audit_locally(home, &revoke_event(id, None, "cli"))
        }
        Backend::Server { socket, token } => {
            if hex::decode(id).is_err() {
                return Err(AuthError::Build(format!("revocation id {id:?} must be hex")).into());
            }
            request(&socket, &token, "POST", &format!("/v1/tokens/{id}/revoke"), None).map(|_| ())
        }
    }
}

/// Lists issued tokens (through the running server if there is one).
pub fn token_list(home: &Home, socket: &Path) -> Result<Vec<TokenRecord>, LaunchError> {
    match backend(home, socket)? {
        Backend::Local(auth) => Ok(auth.store().list()?),
        Backend::Server { socket, token } => {
            let v = request(&socket, &token, "GET", "/v1/tokens", None)?;
            decode(&socket, v.get("tokens").cloned().unwrap_or_default())
        }
    }
}

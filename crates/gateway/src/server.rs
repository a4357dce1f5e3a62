//! Listeners: TCP and a Unix socket (mode 0600, inside the 0700 home) serving the same router,
//! a readiness line, and graceful shutdown that drains requests in flight.

use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::serve::{Listener, ListenerExt};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio_util::sync::CancellationToken;

use crate::conn::Hygiene;
use crate::gateway::{Gateway, StartError};

/// File name of the default Unix socket in the home.
pub const SOCKET_FILE: &str = "gateway.sock";

/// Bound listeners, ready to serve.
#[derive(Debug)]
pub struct Server {
    gateway: Arc<Gateway>,
    tcp: Option<(TcpListener, SocketAddr)>,
    unix: Option<(UnixListener, PathBuf)>,
}

fn listen_err(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> StartError {
    move |source| StartError::Listen { what: what.to_string(), source }
}

/// Sets `TCP_NODELAY` on every accepted connection: a response must not wait for the
/// client's delayed ACK of the previous one (Nagle), which costs keep-alive clients that
/// pipeline or send a request in more than one write up to tens of milliseconds.
fn no_delay(listener: TcpListener) -> impl Listener<Io = TcpStream, Addr = SocketAddr> {
    listener.tap_io(|stream: &mut TcpStream| {
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY on an accepted connection");
        }
    })
}

/// Removes a socket file left by a server that is gone; refuses to touch anything else or a
/// socket someone still answers on.
fn clear_stale_socket(path: &Path) -> Result<(), StartError> {
    let Ok(meta) = std::fs::symlink_metadata(path) else { return Ok(()) };
    let what = path.display().to_string();
    if !meta.file_type().is_socket() {
        return Err(StartError::Listen {
            what,
            source: std::io::Error::new(std::io::ErrorKind::AlreadyExists, "exists and is not a socket"),
        });
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(StartError::Listen {
            what,
            source: std::io::Error::new(std::io::ErrorKind::AddrInUse, "another server is listening on it"),
        });
    }
    std::fs::remove_file(path).map_err(listen_err(what))
}

impl Server {
    /// Binds the configured listeners (`unix` is the socket path, `None` for none).
    pub async fn bind(
        gateway: Arc<Gateway>,
        tcp: Option<SocketAddr>,
        unix: Option<PathBuf>,
    ) -> Result<Self, StartError> {
        let tcp = match tcp {
            Some(addr) => {
                let listener = TcpListener::bind(addr).await.map_err(listen_err(addr))?;
                let local = listener.local_addr().map_err(listen_err(addr))?;
                Some((listener, local))
            }
            None => None,
        };
        let unix = match unix {
            Some(path) => {
                clear_stale_socket(&path)?;
                let listener = UnixListener::bind(&path).map_err(listen_err(path.display()))?;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                    .map_err(listen_err(path.display()))?;
                Some((listener, path))
            }
            None => None,
        };
        Ok(Self { gateway, tcp, unix })
    }

    /// The bound TCP address (with the real port when 0 was asked for).
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().map(|(_, a)| *a)
    }

    /// The Unix socket path.
    pub fn unix_path(&self) -> Option<&Path> {
        self.unix.as_ref().map(|(_, p)| p.as_path())
    }

    /// Serves until `shutdown` resolves, then stops accepting and waits (at most the configured
    /// drain time) for requests in flight.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), StartError> {
        let token = CancellationToken::new();
        let mcp =
            self.gateway.config().mcp.enabled.then(|| crate::mcp::router(self.gateway.clone(), token.child_token()));
        let app: Router = crate::rest::router(self.gateway.clone(), mcp);
        let limits = &self.gateway.config().limits;
        let drain = Duration::from_millis(limits.drain_ms);
        let hygiene = Hygiene::new(limits, usize::from(self.tcp.is_some()) + usize::from(self.unix.is_some()));
        let mut tasks = tokio::task::JoinSet::new();
        if let Some((listener, _)) = self.tcp {
            tasks.spawn(crate::conn::serve(no_delay(listener), app.clone(), hygiene, token.clone()));
        }
        let socket = self.unix.as_ref().map(|(_, p)| p.clone());
        if let Some((listener, _)) = self.unix {
            tasks.spawn(crate::conn::serve(listener, app.clone(), hygiene, token.clone()));
        }
        let watcher = token.clone();
        tokio::spawn(async move {
            shutdown.await;
            tracing::info!("shutting down: draining requests in flight");
            watcher.cancel();
        });
        token.cancelled().await;
        let drained = tokio::time::timeout(drain, async { while tasks.join_next().await.is_some() {} }).await;
        if let Some(path) = socket {
            let _ = std::fs::remove_file(path);
        }
        match drained {
            Ok(()) => Ok(()),
            Err(_) => {
                tracing::warn!(drain_ms = drain.as_millis() as u64, "drain time over; dropping connections");
                Ok(())
            }
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).ok();
    let terminated = async {
        match term.as_mut() {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminated => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_tcp_connections_have_nodelay() -> Result<(), Box<dyn std::error::Error>> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let mut listener = no_delay(listener);
        let client = TcpStream::connect(addr).await?;
        let (accepted, _) = listener.accept().await;
        assert!(accepted.nodelay()?, "the server side of the connection must have TCP_NODELAY");
        drop(client);
        Ok(())
    }
}

//! Connection hygiene for every listener: a cap on connections open at once (the excess is
//! closed on accept, never left to exhaust file descriptors), a header-read timeout (hyper's,
//! from the moment a connection waits for a request), and an idle timeout (no byte moved in
//! either direction), with graceful shutdown that lets requests in flight finish.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::serve::Listener;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

use crate::config::LimitsConfig;

/// What each listener enforces on its connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hygiene {
    /// Time to send a request's headers (and between requests on a keep-alive connection).
    pub header_read: Duration,
    /// Time with no byte read or written.
    pub idle: Duration,
    /// Connections open at once.
    pub max_connections: usize,
}

/// File descriptors kept for everything but connections (stores, muscles, tool calls).
const RESERVED_FDS: u64 = 256;

impl Hygiene {
    /// From the configuration, with the cap lowered so that `listeners` listeners at their cap
    /// stay inside the open-file limit (raised first to its hard limit, as far as allowed).
    pub fn new(limits: &LimitsConfig, listeners: usize) -> Self {
        let configured = limits.max_connections.max(1);
        let budget = open_file_budget().map(|fds| fds.saturating_sub(RESERVED_FDS) / listeners.max(1) as u64);
        let max_connections = match budget {
            Some(fds) if (fds as usize) < configured => {
                let capped = (fds as usize).max(1);
                tracing::warn!(
                    configured,
                    capped,
                    "the open-file limit allows fewer connections than limits.max_connections; \
                     raise it (ulimit -n) to serve more"
                );
                capped
            }
            _ => configured,
        };
        Self {
            header_read: Duration::from_millis(limits.header_read_timeout_ms.max(1)),
            idle: Duration::from_millis(limits.idle_timeout_ms.max(1)),
            max_connections,
        }
    }
}

/// Raises the soft open-file limit to the hard one and returns it (`None`: unknown or infinite).
fn open_file_budget() -> Option<u64> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let raised = Rlimit { current: limit.maximum, maximum: limit.maximum };
    if setrlimit(Resource::Nofile, raised).is_ok() { limit.maximum } else { limit.current }
}

/// Serves `app` on `listener` until `stop` is cancelled, then waits for the open connections to
/// finish their requests (the caller bounds that wait).
pub async fn serve<L>(mut listener: L, app: Router, hygiene: Hygiene, stop: CancellationToken)
where
    L: Listener,
    L::Io: Unpin,
{
    let slots = Arc::new(Semaphore::new(hygiene.max_connections));
    let graceful = GracefulShutdown::new();
    let mut builder = Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(hygiene.header_read);
    builder.http2().timer(TokioTimer::new());
    loop {
        let (io, _addr) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics::counter!("referee_gateway_connections_refused_total").increment(1);
            drop(io);
            continue;
        };
        metrics::gauge!("referee_gateway_connections").increment(1.0);
        let service = TowerToHyperService::new(app.clone());
        let connection = builder.serve_connection_with_upgrades(TokioIo::new(Idle::new(io, hygiene.idle)), service);
        let watched = graceful.watch(connection.into_owned());
        tokio::spawn(async move {
            if let Err(e) = watched.await {
                tracing::debug!(error = %e, "connection closed with an error");
            }
            metrics::gauge!("referee_gateway_connections").decrement(1.0);
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// An I/O object that fails with `TimedOut` once no byte has moved in either direction for
/// `limit` while someone waits on it.
struct Idle<T> {
    inner: T,
    limit: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl<T> Idle<T> {
    fn new(inner: T, limit: Duration) -> Self {
        Self { inner, limit, deadline: Box::pin(tokio::time::sleep(limit)) }
    }

    fn moved(&mut self) {
        let next = Instant::now() + self.limit;
        self.deadline.as_mut().reset(next);
    }

    fn waiting<R>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "connection idle"))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Idle<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    self.moved();
                }
                Poll::Ready(result)
            }
            Poll::Pending => self.waiting(cx),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Idle<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Ready(result) => {
                if matches!(result, Ok(n) if n > 0) {
                    self.moved();
                }
                Poll::Ready(result)
            }
            Poll::Pending => self.waiting(cx),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write_vectored(cx, bufs) {
            Poll::Ready(result) => {
                if matches!(result, Ok(n) if n > 0) {
                    self.moved();
                }
                Poll::Ready(result)
            }
            Poll::Pending => self.waiting(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn idle_io_times_out_only_when_nothing_moves() {
        let (near, mut far) = tokio::io::duplex(64);
        let limit = Duration::from_millis(300);
        let mut idle = Idle::new(near, limit);
        let started = std::time::Instant::now();
        let mut buf = [0u8; 1];
        // Progress every 150 ms keeps the connection open past the limit.
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(150)).await;
            far.write_all(b"a").await.unwrap();
            idle.read_exact(&mut buf).await.unwrap();
        }
        assert!(started.elapsed() > limit);
        // Then nothing moves: the read fails once the limit has passed, not before.
        let quiet = std::time::Instant::now();
        let err = idle.read_exact(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(quiet.elapsed() >= limit - Duration::from_millis(20), "{:?}", quiet.elapsed());
    }

    #[test]
    fn the_cap_fits_the_open_file_limit() {
        let limits = LimitsConfig { max_connections: usize::MAX, ..LimitsConfig::default() };
        let hygiene = Hygiene::new(&limits, 2);
        if let Some(fds) = open_file_budget() {
            assert_eq!(hygiene.max_connections as u64, (fds.saturating_sub(RESERVED_FDS) / 2).max(1));
        }
        let small = LimitsConfig { max_connections: 3, ..LimitsConfig::default() };
        assert_eq!(Hygiene::new(&small, 2).max_connections, 3);
    }
}

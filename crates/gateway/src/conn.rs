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

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::response::Response;
use axum::serve::Listener;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tower_service::Service as _;

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

/// One open connection, as the accept loop sees it.
#[derive(Debug)]
struct Tracked {
    /// Requests whose answer has not been sent in full.
    in_flight: AtomicUsize,
    /// When the connection last had no request in flight (ms since the listener started).
    quiet_since: AtomicU64,
    /// Cancelled to close the connection (evicted to make room).
    close: CancellationToken,
}

/// The open connections of one listener, so that a new one can take an idle one's place.
#[derive(Debug, Default)]
struct Connections {
    open: Mutex<HashMap<u64, Arc<Tracked>>>,
}

impl Connections {
    /// Closes the connection that has been idle (no request in flight) the longest; false when
    /// every connection has a request in flight.
    fn evict_idlest(&self) -> bool {
        let Ok(open) = self.open.lock() else { return false };
        let idlest = open
            .values()
            .filter(|t| t.in_flight.load(Ordering::Acquire) == 0 && !t.close.is_cancelled())
            .min_by_key(|t| t.quiet_since.load(Ordering::Acquire));
        match idlest {
            Some(t) => {
                t.close.cancel();
                true
            }
            None => false,
        }
    }
}

/// Counts a request in flight until its answer's body is dropped (sent in full, or given up).
struct InFlight {
    tracked: Arc<Tracked>,
    epoch: Instant,
}

impl InFlight {
    fn start(tracked: Arc<Tracked>, epoch: Instant) -> Self {
        tracked.in_flight.fetch_add(1, Ordering::AcqRel);
        Self { tracked, epoch }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let now = millis_since(self.epoch);
        // Quiet from now on if this was the last one.
        if self.tracked.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.tracked.quiet_since.store(now, Ordering::Release);
        }
    }
}

fn millis_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// A response body that keeps `guard` alive until the body is dropped: sent in full, or the
/// connection gone. What a request holds (a connection's in-flight count, a token's
/// concurrency permit) is then held until its answer has left, not only until it was made.
pub(crate) struct Guarded<G> {
    body: Body,
    _guard: G,
}

impl<G: Send + Unpin + 'static> Guarded<G> {
    /// `response` whose body holds `guard`.
    pub(crate) fn response(response: Response, guard: G) -> Response {
        response.map(|body| Body::new(Self { body, _guard: guard }))
    }
}

impl<G: Unpin> http_body::Body for Guarded<G> {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Streams one HTTP/2 connection may have open at once (each may hold an answer in memory).
const MAX_STREAMS: u32 = 32;

/// Serves `app` on `listener` until `stop` is cancelled, then waits for the open connections to
/// finish their requests (the caller bounds that wait).
///
/// A connection with no request in flight for the header-read time (since it was accepted, or
/// since its last answer left) is closed, whatever the protocol: HTTP/1 with no request yet,
/// an HTTP/2 connection kept open by pings, a client that never finishes choosing a protocol.
/// At the cap, a new connection takes the place of the connection idle the longest; only when
/// every connection has a request in flight is the new one closed.
pub async fn serve<L>(mut listener: L, app: Router, hygiene: Hygiene, stop: CancellationToken)
where
    L: Listener,
    L::Io: Unpin,
{
    let slots = Arc::new(Semaphore::new(hygiene.max_connections));
    let connections = Arc::new(Connections::default());
    let epoch = Instant::now();
    let graceful = GracefulShutdown::new();
    let mut builder = Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(hygiene.header_read);
    builder.http2().timer(TokioTimer::new()).max_concurrent_streams(MAX_STREAMS);
    let mut next_id = 0u64;
    loop {
        let (io, _addr) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => break,
        };
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => Some(slot),
            Err(_) if connections.evict_idlest() => {
                metrics::counter!("referee_gateway_connections_evicted_total").increment(1);
                // The evicted connection's task wakes, drops it and frees its slot.
                tokio::time::timeout(EVICTION_WAIT, slots.clone().acquire_owned()).await.ok().and_then(Result::ok)
            }
            Err(_) => None,
        };
        let Some(slot) = slot else {
            metrics::counter!("referee_gateway_connections_refused_total").increment(1);
            drop(io);
            continue;
        };
        next_id += 1;
        let id = next_id;
        let tracked = Arc::new(Tracked {
            in_flight: AtomicUsize::new(0),
            quiet_since: AtomicU64::new(millis_since(epoch)),
            close: CancellationToken::new(),
        });
        if let Ok(mut open) = connections.open.lock() {
            open.insert(id, tracked.clone());
        }
        metrics::gauge!("referee_gateway_connections").increment(1.0);
        let service = {
            let (app, tracked) = (app.clone(), tracked.clone());
            hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let in_flight = InFlight::start(tracked.clone(), epoch);
                let mut app = app.clone();
                async move {
                    let response = app.call(req.map(Body::new)).await?;
                    Ok::<_, std::convert::Infallible>(Guarded::response(response, in_flight))
                }
            })
        };
        let connection = builder.serve_connection_with_upgrades(TokioIo::new(Idle::new(io, hygiene.idle)), service);
        let watched = graceful.watch(connection.into_owned());
        let connections = connections.clone();
        let header_read = hygiene.header_read;
        tokio::spawn(async move {
            tokio::pin!(watched);
            loop {
                let quiet = tracked.quiet_since.load(Ordering::Acquire);
                let deadline = epoch + Duration::from_millis(quiet) + header_read;
                tokio::select! {
                    done = &mut watched => {
                        if let Err(e) = done {
                            tracing::debug!(error = %e, "connection closed with an error");
                        }
                        break;
                    }
                    () = tracked.close.cancelled() => break,
                    () = tokio::time::sleep_until(deadline) => {
                        let idle = tracked.in_flight.load(Ordering::Acquire) == 0
                            && tracked.quiet_since.load(Ordering::Acquire) == quiet;
                        if idle {
                            break;
                        }
                    }
                }
            }
            if let Ok(mut open) = connections.open.lock() {
                open.remove(&id);
            }
            metrics::gauge!("referee_gateway_connections").decrement(1.0);
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// How long a new connection at the cap waits for the connection it evicted to close.
const EVICTION_WAIT: Duration = Duration::from_millis(250);

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

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
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::response::Response;
use axum::serve::Listener;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tower_service::Service as _;

use crate::audit::PeerOrigin;
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

/// One open connection, as the accept loop sees it. Times are milliseconds since the
/// listener started.
#[derive(Debug)]
struct Tracked {
    epoch: Instant,
    /// Requests whose handler is still running (never evicted, never closed for quiet).
    handling: AtomicUsize,
    /// Answers made but not yet taken in full by the connection.
    sending: AtomicUsize,
    /// Last byte read or written, request started, answer made or answer frame taken.
    active_at: AtomicU64,
    /// Last answer frame taken by the connection (or answer made), or last write that went
    /// through after the client's socket was full.
    progress_at: AtomicU64,
    /// A write is waiting for the client to take what was already sent (its socket is full):
    /// the connection is busy sending even when hyper holds no answer body any more.
    blocked: AtomicBool,
    /// Woken when `handling` or `sending` drops.
    changed: Notify,
    /// Cancelled to close the connection (evicted to make room).
    close: CancellationToken,
}

impl Tracked {
    fn new(epoch: Instant) -> Self {
        let now = millis_since(epoch);
        Self {
            epoch,
            handling: AtomicUsize::new(0),
            sending: AtomicUsize::new(0),
            active_at: AtomicU64::new(now),
            progress_at: AtomicU64::new(now),
            blocked: AtomicBool::new(false),
            changed: Notify::new(),
            close: CancellationToken::new(),
        }
    }

    fn now(&self) -> u64 {
        millis_since(self.epoch)
    }

    fn touch(&self) {
        self.active_at.store(self.now(), Ordering::Release);
    }

    fn progressed(&self) {
        let now = self.now();
        self.progress_at.store(now, Ordering::Release);
        self.active_at.store(now, Ordering::Release);
    }

    /// Whether answers are on their way out: a body not yet taken, or bytes the client has not
    /// yet made room for.
    fn sending(&self) -> bool {
        self.sending.load(Ordering::Acquire) > 0 || self.blocked.load(Ordering::Acquire)
    }

    /// A write went through: progress if the client had to make room for it first, else only
    /// activity (a ping's answer is not progress).
    fn wrote(&self) {
        if self.blocked.swap(false, Ordering::AcqRel) {
            self.progressed();
        } else {
            self.touch();
        }
    }

    fn at(&self, millis: u64) -> Instant {
        self.epoch + Duration::from_millis(millis)
    }
}

/// The open connections of one listener, so that a new one can take an idle one's place.
#[derive(Debug, Default)]
struct Connections {
    open: Mutex<HashMap<u64, Arc<Tracked>>>,
}

impl Connections {
    /// Closes the connection that is doing the least: of those with no handler running, one
    /// with nothing to send that has been quiet the longest, else the one whose answers have
    /// gone untaken the longest (a client that stopped reading). False when every connection
    /// has a handler running.
    fn evict_idlest(&self) -> bool {
        let Ok(open) = self.open.lock() else { return false };
        let idlest = open
            .values()
            .filter(|t| t.handling.load(Ordering::Acquire) == 0 && !t.close.is_cancelled())
            .min_by_key(|t| {
                let sending = t.sending.load(Ordering::Acquire) > 0;
                let since =
                    if sending { t.progress_at.load(Ordering::Acquire) } else { t.active_at.load(Ordering::Acquire) };
                (sending, since)
            });
        match idlest {
            Some(t) => {
                t.close.cancel();
                true
            }
            None => false,
        }
    }
}

/// Counts a request's handler as running until dropped.
struct Handling(Arc<Tracked>);

impl Handling {
    fn start(tracked: Arc<Tracked>) -> Self {
        tracked.handling.fetch_add(1, Ordering::AcqRel);
        tracked.touch();
        Self(tracked)
    }
}

impl Drop for Handling {
    fn drop(&mut self) {
        self.0.handling.fetch_sub(1, Ordering::AcqRel);
        self.0.touch();
        self.0.changed.notify_waiters();
    }
}

/// An answer on its way out: counts as sending until its body is dropped, and stamps each
/// frame the connection takes as progress.
struct Sending(Arc<Tracked>);

impl Sending {
    fn response(response: Response, tracked: Arc<Tracked>) -> Response {
        tracked.sending.fetch_add(1, Ordering::AcqRel);
        tracked.progressed();
        Guarded::response(response, Self(tracked))
    }
}

impl BodyGuard for Sending {
    fn frame_taken(&self) {
        self.0.progressed();
    }
}

impl Drop for Sending {
    fn drop(&mut self) {
        self.0.sending.fetch_sub(1, Ordering::AcqRel);
        self.0.touch();
        self.0.changed.notify_waiters();
    }
}

fn millis_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// What the watchdog of one connection decides.
enum Watch {
    /// Close the connection.
    Close,
    /// Look again at this instant.
    At(Instant),
    /// Look again when a handler finishes or an answer has been taken.
    Changed,
}

/// A connection is closed when no handler runs and, either nothing is to be sent and nothing
/// has moved for `quiet`, or answers wait and none has been taken for `stalled`.
fn watch(tracked: &Tracked, quiet: Duration, stalled: Duration) -> Watch {
    if tracked.handling.load(Ordering::Acquire) > 0 {
        return Watch::Changed;
    }
    let now = Instant::now();
    let (since, limit) = if tracked.sending() {
        (tracked.progress_at.load(Ordering::Acquire), stalled)
    } else {
        (tracked.active_at.load(Ordering::Acquire), quiet)
    };
    let deadline = tracked.at(since) + limit;
    if deadline <= now { Watch::Close } else { Watch::At(deadline) }
}

/// A response body that keeps `guard` alive until the body is dropped: sent in full, or the
/// connection gone. What a request holds (a connection's in-flight count, a token's
/// concurrency permit) is then held until its answer has left, not only until it was made.
pub(crate) struct Guarded<G> {
    body: Body,
    guard: G,
}

/// What a [`Guarded`] body holds; told of each frame the connection takes.
pub(crate) trait BodyGuard: Send + Unpin + 'static {
    /// A frame of the body was taken.
    fn frame_taken(&self) {}
}

impl BodyGuard for crate::limits::Permit {}

impl<G: BodyGuard> Guarded<G> {
    /// `response` whose body holds `guard`.
    pub(crate) fn response(response: Response, guard: G) -> Response {
        response.map(|body| Body::new(Self { body, guard }))
    }
}

impl<G: BodyGuard> http_body::Body for Guarded<G> {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if polled.is_ready() {
            self.guard.frame_taken();
        }
        polled
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
    L::Addr: PeerOrigin,
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
        let (io, addr) = tokio::select! {
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
        let tracked = Arc::new(Tracked::new(epoch));
        if let Ok(mut open) = connections.open.lock() {
            open.insert(id, tracked.clone());
        }
        metrics::gauge!("referee_gateway_connections").increment(1.0);
        let service = {
            let (app, tracked, origin) = (app.clone(), tracked.clone(), addr.origin());
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                let handling = Handling::start(tracked.clone());
                let (mut app, tracked) = (app.clone(), tracked.clone());
                req.extensions_mut().insert(origin.clone());
                async move {
                    let response = app.call(req.map(Body::new)).await?;
                    let response = Sending::response(response, tracked);
                    drop(handling);
                    Ok::<_, std::convert::Infallible>(response)
                }
            })
        };
        let io = Idle::new(io, hygiene.idle, tracked.clone());
        let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
        let watched = graceful.watch(connection.into_owned());
        let connections = connections.clone();
        let (quiet, stalled) = (hygiene.header_read, hygiene.idle);
        tokio::spawn(async move {
            tokio::pin!(watched);
            loop {
                // Registered before looking, so a change between the look and the wait is seen.
                let changed = tracked.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                let next = match watch(&tracked, quiet, stalled) {
                    Watch::Close => break,
                    Watch::At(deadline) => deadline,
                    // A handler may run for as long as its deadline allows: wait for it.
                    Watch::Changed => Instant::now() + Duration::from_secs(3600),
                };
                tokio::select! {
                    done = &mut watched => {
                        if let Err(e) = done {
                            tracing::debug!(error = %e, "connection closed with an error");
                        }
                        break;
                    }
                    () = tracked.close.cancelled() => break,
                    () = &mut changed => {}
                    () = tokio::time::sleep_until(next) => {}
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
    tracked: Option<Arc<Tracked>>,
}

impl<T> Idle<T> {
    fn new(inner: T, limit: Duration, tracked: Arc<Tracked>) -> Self {
        Self { inner, limit, deadline: Box::pin(tokio::time::sleep(limit)), tracked: Some(tracked) }
    }

    fn moved(&mut self) {
        let next = Instant::now() + self.limit;
        self.deadline.as_mut().reset(next);
    }

    fn read_some(&mut self) {
        self.moved();
        if let Some(tracked) = &self.tracked {
            tracked.touch();
        }
    }

    fn wrote_some(&mut self) {
        self.moved();
        if let Some(tracked) = &self.tracked {
            tracked.wrote();
        }
    }

    /// Accounts for one write: bytes out are activity (progress if the client had to make room
    /// first); a write that must wait marks the connection as blocked on the client.
    fn after_write(&mut self, polled: Poll<io::Result<usize>>, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        match polled {
            Poll::Ready(result) => {
                if matches!(result, Ok(n) if n > 0) {
                    self.wrote_some();
                }
                Poll::Ready(result)
            }
            Poll::Pending => {
                if let Some(tracked) = &self.tracked {
                    tracked.blocked.store(true, Ordering::Release);
                }
                self.waiting(cx)
            }
        }
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
                    self.read_some();
                }
                Poll::Ready(result)
            }
            Poll::Pending => self.waiting(cx),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Idle<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.after_write(polled, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.after_write(polled, cx)
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
        let mut idle = Idle { tracked: None, ..Idle::new(near, limit, Arc::new(Tracked::new(Instant::now()))) };
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
    fn the_watchdog_never_spins_and_closes_only_what_does_nothing() {
        let (quiet, stalled) = (Duration::from_millis(50), Duration::from_millis(200));
        let t = Tracked::new(Instant::now());
        // Fresh: look again later, never now.
        assert!(matches!(watch(&t, quiet, stalled), Watch::At(at) if at > Instant::now()));
        // A running handler: wait for it to finish, whatever the time.
        let handling = Handling::start(Arc::new(Tracked::new(Instant::now() - Duration::from_secs(60))));
        assert!(matches!(watch(&handling.0, quiet, stalled), Watch::Changed));
        drop(handling);
        std::thread::sleep(Duration::from_millis(60));
        assert!(matches!(watch(&t, quiet, stalled), Watch::Close));
        // An answer waiting to be taken: closed once it has waited `stalled`, not `quiet`.
        t.sending.fetch_add(1, Ordering::AcqRel);
        t.progressed();
        std::thread::sleep(Duration::from_millis(60));
        assert!(matches!(watch(&t, quiet, stalled), Watch::At(at) if at > Instant::now()));
        std::thread::sleep(Duration::from_millis(160));
        assert!(matches!(watch(&t, quiet, stalled), Watch::Close));
    }

    #[test]
    fn a_download_the_client_is_slow_to_take_is_sending_not_quiet() {
        let (quiet, stalled) = (Duration::from_millis(50), Duration::from_millis(400));
        let t = Tracked::new(Instant::now());
        // hyper holds no body any more, but the client's socket is full.
        t.blocked.store(true, Ordering::Release);
        std::thread::sleep(Duration::from_millis(80));
        assert!(matches!(watch(&t, quiet, stalled), Watch::At(_)), "a slow download is not quiet");
        // The client made room: progress; a write with room to spare (a ping's answer) is not.
        t.wrote();
        let progressed = t.progress_at.load(Ordering::Acquire);
        std::thread::sleep(Duration::from_millis(20));
        t.wrote();
        assert_eq!(t.progress_at.load(Ordering::Acquire), progressed);
        assert!(!t.sending());
    }

    #[test]
    fn eviction_takes_the_idlest_and_never_a_running_handler() {
        let epoch = Instant::now() - Duration::from_secs(10);
        let connections = Connections::default();
        let tracked: Vec<Arc<Tracked>> = (0..3).map(|_| Arc::new(Tracked::new(epoch))).collect();
        let [busy, stalled, idle] = [&tracked[0], &tracked[1], &tracked[2]];
        busy.handling.fetch_add(1, Ordering::AcqRel);
        stalled.sending.fetch_add(1, Ordering::AcqRel);
        stalled.progress_at.store(1, Ordering::Release);
        idle.active_at.store(5_000, Ordering::Release);
        if let Ok(mut open) = connections.open.lock() {
            for (i, t) in tracked.iter().enumerate() {
                open.insert(i as u64, t.clone());
            }
        }
        assert!(connections.evict_idlest());
        assert!(idle.close.is_cancelled() && !stalled.close.is_cancelled());
        assert!(connections.evict_idlest());
        assert!(stalled.close.is_cancelled() && !busy.close.is_cancelled());
        assert!(!connections.evict_idlest(), "a running handler is never evicted");
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

//! Shared helpers: node pairs, an echo server, a frame-mutating TCP proxy, event waits.

use std::error::Error;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use referee_comm::{Addr, AllowList, Config, Event, Identity, Inbox, Listener, Node};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, mpsc};

pub(crate) type TestResult = Result<(), Box<dyn Error + Send + Sync>>;
pub(crate) type Res<T> = Result<T, Box<dyn Error + Send + Sync>>;

/// Generous guard so a broken test fails instead of hanging; never used to wait for progress.
pub(crate) const GUARD: Duration = Duration::from_secs(20);

pub(crate) struct Pair {
    pub(crate) server: Node,
    pub(crate) server_inbox: Option<Inbox>,
    pub(crate) listener: Listener,
    pub(crate) client: Node,
    pub(crate) _client_inbox: Option<Inbox>,
    pub(crate) server_id: Identity,
    pub(crate) client_id: Identity,
}

/// A server listening on `addr` and a client, each allowing the other.
pub(crate) async fn pair_on(addr: &str, server_cfg: Config, client_cfg: Config) -> Res<Pair> {
    let server_id = Identity::generate()?;
    let client_id = Identity::generate()?;
    let (server, server_inbox) = Node::new(server_id.clone(), AllowList::new([client_id.id()]), server_cfg);
    let listener = server.listen(&addr.parse()?).await?;
    let (client, client_inbox) = Node::new(client_id.clone(), AllowList::new([server_id.id()]), client_cfg);
    Ok(Pair {
        server,
        server_inbox: Some(server_inbox),
        listener,
        client,
        _client_inbox: Some(client_inbox),
        server_id,
        client_id,
    })
}

pub(crate) async fn tcp_pair() -> Res<Pair> {
    pair_on("tcp://127.0.0.1:0", Config::default(), Config::default()).await
}

/// Echoes requests; forwards one-way messages to the returned channel.
pub(crate) fn spawn_echo(mut inbox: Inbox) -> mpsc::UnboundedReceiver<Bytes> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(m) = inbox.recv().await {
            if m.is_request() {
                let p = m.payload().clone();
                if p.as_ref() == b"fail" {
                    let _ = m.reply_error("you asked for it").await;
                } else if p.as_ref() != b"ignore" {
                    let _ = m.reply(p).await;
                }
            } else if tx.send(m.into_payload()).is_err() {
                return;
            }
        }
    });
    rx
}

pub(crate) fn tcp_addr(l: &Listener) -> Res<SocketAddr> {
    match l.local_addr() {
        Addr::Tcp(a) => Ok(a.parse()?),
        other => Err(format!("not tcp: {other}").into()),
    }
}

/// Waits for the first event matching `f`.
pub(crate) async fn wait_event<T>(
    events: &mut broadcast::Receiver<Event>,
    mut f: impl FnMut(&Event) -> Option<T>,
) -> Res<T> {
    tokio::time::timeout(GUARD, async {
        loop {
            match events.recv().await {
                Ok(e) => {
                    if let Some(t) = f(&e) {
                        return Ok(t);
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    })
    .await?
}

pub(crate) async fn wait_closed(events: &mut broadcast::Receiver<Event>) -> Res<String> {
    wait_event(events, |e| match e {
        Event::Closed { reason, .. } => Some(reason.clone()),
        _ => None,
    })
    .await
}

pub(crate) async fn wait_refused(events: &mut broadcast::Receiver<Event>) -> Res<String> {
    wait_event(events, |e| match e {
        Event::Refused { reason, .. } => Some(reason.clone()),
        _ => None,
    })
    .await
}

/// How the proxy alters the client-to-server frame stream (frame 0 = first handshake message).
#[derive(Debug, Clone)]
pub(crate) enum Mutation {
    Duplicate(usize),
    Swap(usize),
    Flip(usize),
    InjectBefore(usize, Vec<u8>),
}

pub(crate) struct Proxy {
    pub(crate) addr: Addr,
    /// Indices of client frames the proxy has read (before forwarding them).
    pub(crate) seen: mpsc::UnboundedReceiver<usize>,
}

impl Proxy {
    pub(crate) async fn wait_seen(&mut self, index: usize) -> TestResult {
        tokio::time::timeout(GUARD, async {
            while let Some(i) = self.seen.recv().await {
                if i >= index {
                    return Ok(());
                }
            }
            Err("proxy ended".into())
        })
        .await?
    }
}

/// A man in the middle that parses referee-comm frames from the client and mutates one.
pub(crate) async fn proxy(target: SocketAddr, m: Mutation) -> Res<Proxy> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = Addr::Tcp(l.local_addr()?.to_string());
    let (seen_tx, seen) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let Ok((c, _)) = l.accept().await else { return };
        let Ok(s) = TcpStream::connect(target).await else { return };
        let (mut cr, mut cw) = c.into_split();
        let (mut sr, mut sw) = s.into_split();
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut sr, &mut cw).await;
            let _ = cw.shutdown().await;
        });
        let _ = forward_frames(&mut cr, &mut sw, m, seen_tx).await;
        let _ = sw.shutdown().await;
    });
    Ok(Proxy { addr, seen })
}

async fn forward_frames(
    cr: &mut tokio::net::tcp::OwnedReadHalf,
    sw: &mut tokio::net::tcp::OwnedWriteHalf,
    m: Mutation,
    seen: mpsc::UnboundedSender<usize>,
) -> std::io::Result<()> {
    let mut pre = [0u8; 6];
    cr.read_exact(&mut pre).await?;
    sw.write_all(&pre).await?;
    let mut held: Option<Vec<u8>> = None;
    let mut index = 0usize;
    loop {
        let mut len = [0u8; 2];
        cr.read_exact(&mut len).await?;
        let mut frame = len.to_vec();
        frame.resize(2 + usize::from(u16::from_be_bytes(len)), 0);
        cr.read_exact(frame.get_mut(2..).unwrap_or_default()).await?;
        let _ = seen.send(index);
        match &m {
            Mutation::Duplicate(k) if *k == index => {
                sw.write_all(&frame).await?;
                sw.write_all(&frame).await?;
            }
            Mutation::Swap(k) if *k == index => held = Some(frame),
            Mutation::Swap(k) if *k + 1 == index => {
                sw.write_all(&frame).await?;
                if let Some(h) = held.take() {
                    sw.write_all(&h).await?;
                }
            }
            Mutation::Flip(k) if *k == index => {
                if let Some(b) = frame.last_mut() {
                    *b ^= 0x01;
                }
                sw.write_all(&frame).await?;
            }
            Mutation::InjectBefore(k, bytes) if *k == index => {
                sw.write_all(bytes).await?;
                sw.write_all(&frame).await?;
            }
            _ => sw.write_all(&frame).await?,
        }
        index += 1;
    }
}

pub(crate) async fn recv_guarded<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> Res<T> {
    tokio::time::timeout(GUARD, rx.recv()).await?.ok_or_else(|| "channel closed".into())
}

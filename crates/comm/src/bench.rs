//! In-process benchmarks behind `referee comm bench` (and the NATS comparison example).
//!
//! Both ends run in this process on loopback / a Unix socket in a temp dir, on the caller's tokio
//! runtime. Numbers are for the whole encrypted path: envelope encoding, batching, Noise
//! ChaCha20-Poly1305, socket, decryption, dispatch to the application.

use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;

use crate::{Addr, AllowList, Config, ConnectOptions, Identity, Inbox, Listener, Node};

/// Benchmark sizes.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Sequential request/reply round trips measured per transport.
    pub rtt_samples: usize,
    /// 64-byte one-way messages sent per transport.
    pub messages: u64,
    /// Idle connections opened for the memory measurement (0 = skip).
    pub idle_connections: usize,
    /// Transports to measure: "unix", "tcp", "quic".
    pub transports: Vec<String>,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            rtt_samples: 20_000,
            messages: 2_000_000,
            idle_connections: 1000,
            transports: vec!["unix".into(), "tcp".into()],
        }
    }
}

/// One measured line.
#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    /// System measured ("referee-comm", "nats").
    pub system: String,
    /// What was measured.
    pub metric: String,
    /// Transport.
    pub transport: String,
    /// Value.
    pub value: f64,
    /// Unit of `value`.
    pub unit: String,
}

impl BenchRow {
    /// A row.
    pub fn new(system: &str, metric: &str, transport: &str, value: f64, unit: &str) -> Self {
        Self { system: system.into(), metric: metric.into(), transport: transport.into(), value, unit: unit.into() }
    }
}

/// Percentile (0..=100) of sorted samples.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() - 1) as f64 * p / 100.0).round() as usize;
    sorted.get(idx.min(sorted.len() - 1)).copied().unwrap_or_default()
}

/// Resident set size of this process in bytes (Linux `/proc/self/statm`).
pub fn rss_bytes() -> Option<u64> {
    rss_of("self")
}

/// Resident set size of process `pid` ("self" for this one) in bytes.
pub fn rss_of(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

struct Setup {
    server: Node,
    client: Node,
    listener: Listener,
    inbox: Option<Inbox>,
    _dir: Option<tempfile_dir::TempDir>,
}

/// A tiny temp-dir holder so the library does not depend on `tempfile`.
mod tempfile_dir {
    use std::path::{Path, PathBuf};

    pub(crate) struct TempDir(PathBuf);
    impl TempDir {
        pub(crate) fn new() -> std::io::Result<Self> {
            let mut rnd = [0u8; 8];
            getrandom::fill(&mut rnd).map_err(|e| std::io::Error::other(e.to_string()))?;
            let p = std::env::temp_dir().join(format!("referee-comm-bench-{}", hex::encode(rnd)));
            std::fs::create_dir(&p)?;
            Ok(Self(p))
        }
        pub(crate) fn path(&self) -> &Path {
            &self.0
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

async fn setup(transport: &str, cfg: Config) -> anyhow::Result<Setup> {
    let (sid, cid) = (Identity::generate()?, Identity::generate()?);
    let (server, inbox) = Node::new(sid.clone(), AllowList::new([cid.id()]), cfg.clone());
    let (client, _ci) = Node::new(cid, AllowList::new([sid.id()]), cfg);
    let (addr, dir): (Addr, _) = match transport {
        "unix" => {
            let dir = tempfile_dir::TempDir::new()?;
            (Addr::Unix(dir.path().join("bench.sock")), Some(dir))
        }
        "tcp" => (Addr::Tcp("127.0.0.1:0".into()), None),
        "quic" => (Addr::Quic("127.0.0.1:0".into()), None),
        other => anyhow::bail!("unknown transport `{other}`: use unix, tcp or quic"),
    };
    let listener = server.listen(&addr).await?;
    Ok(Setup { server, client, listener, inbox: Some(inbox), _dir: dir })
}

fn spawn_echo(mut inbox: Inbox) {
    tokio::spawn(async move {
        while let Some(m) = inbox.recv().await {
            let p = m.payload().clone();
            let _ = m.reply(p).await;
        }
    });
}

/// Round-trip latency: sequential 64-byte requests, echoed.
pub async fn rtt(transport: &str, samples: usize) -> anyhow::Result<(Duration, Duration)> {
    let mut s = setup(transport, Config::default()).await?;
    spawn_echo(s.inbox.take().ok_or_else(|| anyhow::anyhow!("inbox"))?);
    let conn = s.client.connect(s.listener.local_addr()).await?;
    let payload = Bytes::from(vec![0x5a; 64]);
    for _ in 0..1000.min(samples) {
        conn.request(payload.clone(), Duration::from_secs(5)).await?;
    }
    let mut times = Vec::with_capacity(samples);
    for _ in 0..samples {
        let t = Instant::now();
        conn.request(payload.clone(), Duration::from_secs(5)).await?;
        times.push(t.elapsed());
    }
    times.sort_unstable();
    drop(s.server);
    Ok((percentile(&times, 50.0), percentile(&times, 99.0)))
}

/// One-way throughput of 64-byte messages (batched); returns messages per second.
pub async fn throughput(transport: &str, messages: u64) -> anyhow::Result<f64> {
    let cfg = Config { send_queue: 8192, inbox_capacity: 65536, ..Config::default() };
    let mut s = setup(transport, cfg).await?;
    let mut inbox = s.inbox.take().ok_or_else(|| anyhow::anyhow!("inbox"))?;
    let conn = s.client.connect(s.listener.local_addr()).await?;
    let payload = Bytes::from(vec![0xa5; 64]);
    let start = Instant::now();
    let sender = {
        let conn = conn.clone();
        let payload = payload.clone();
        tokio::spawn(async move {
            for _ in 0..messages {
                conn.send(payload.clone()).await?;
            }
            Ok::<_, crate::SendError>(())
        })
    };
    let mut got = 0u64;
    while got < messages {
        match tokio::time::timeout(Duration::from_secs(30), inbox.recv()).await {
            Ok(Some(_)) => got += 1,
            _ => anyhow::bail!("throughput run stalled after {got} of {messages} messages"),
        }
    }
    let secs = start.elapsed().as_secs_f64();
    sender.await??;
    drop(s.server);
    Ok(messages as f64 / secs)
}

/// Memory per idle connection: RSS growth while `n` connections are held, divided by `n`.
/// Both ends live in this process, so the figure counts the client *and* the server side.
pub async fn idle_memory(transport: &str, n: usize) -> anyhow::Result<f64> {
    let s = setup(transport, Config::default()).await?;
    let target = s.listener.local_addr().clone();
    // Warm up allocator arenas and runtime structures.
    let mut warm = Vec::new();
    for _ in 0..20 {
        warm.push(s.client.connect_with(&target, ConnectOptions::default().reuse(false)).await?);
    }
    let before = rss_bytes().unwrap_or(0);
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        conns.push(s.client.connect_with(&target, ConnectOptions::default().reuse(false)).await?);
    }
    // Let every reader reach its idle read.
    for c in conns.iter().step_by(97) {
        c.send(Bytes::from_static(b"x")).await?;
    }
    tokio::task::yield_now().await;
    let after = rss_bytes().unwrap_or(0);
    let live = s.server.connections().len();
    anyhow::ensure!(live >= n, "only {live} of {n} connections are live");
    Ok(after.saturating_sub(before) as f64 / n as f64)
}

/// Runs the whole referee-comm benchmark.
pub async fn run_all(opts: &BenchOptions) -> anyhow::Result<Vec<BenchRow>> {
    let mut rows = Vec::new();
    for t in &opts.transports {
        if opts.rtt_samples > 0 {
            let (p50, p99) = rtt(t, opts.rtt_samples).await?;
            rows.push(BenchRow::new("referee-comm", "rtt p50 (64 B)", t, p50.as_secs_f64() * 1e6, "us"));
            rows.push(BenchRow::new("referee-comm", "rtt p99 (64 B)", t, p99.as_secs_f64() * 1e6, "us"));
        }
        if opts.messages > 0 {
            let rate = throughput(t, opts.messages).await?;
            rows.push(BenchRow::new("referee-comm", "one-way 64 B msgs", t, rate, "msg/s"));
        }
        if opts.idle_connections > 0 {
            let per = idle_memory(t, opts.idle_connections).await?;
            rows.push(BenchRow::new("referee-comm", "RSS per idle connection (both ends)", t, per, "bytes"));
        }
    }
    Ok(rows)
}

/// Renders rows as an aligned text table.
pub fn table(rows: &[BenchRow]) -> String {
    let mut out = format!("{:<14} {:<38} {:<6} {:>14} {}\n", "system", "metric", "via", "value", "unit");
    for r in rows {
        out.push_str(&format!("{:<14} {:<38} {:<6} {:>14.1} {}\n", r.system, r.metric, r.transport, r.value, r.unit));
    }
    out
}

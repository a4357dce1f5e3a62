//! Benchmarks referee-comm and NATS side by side on this machine, in one run: round-trip latency
//! (p50/p99), one-way throughput of 64-byte messages, and memory per idle connection.
//!
//! Run: `cargo run --release -p referee-comm --features nats --example bench_vs_nats`
//! (add `-- --quick` for a smoke run, `-- --current-thread` for a single-threaded runtime). Needs Debian's `nats-server` on PATH
//! (`apt-get install nats-server`); the example starts and stops its own server on loopback.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use futures_util::StreamExt as _;
use referee_comm::bench::{self, BenchOptions, BenchRow};

struct NatsServer(Child);

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

async fn start_nats() -> anyhow::Result<(NatsServer, String)> {
    let port = free_port()?;
    let child = Command::new("nats-server")
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting nats-server (apt-get install nats-server)")?;
    let server = NatsServer(child);
    let url = format!("nats://127.0.0.1:{port}");
    // Wait for it to accept connections (bounded).
    for attempt in 0..100u32 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return Ok((server, url));
        }
        tokio::time::sleep(Duration::from_millis(10 * u64::from(attempt.min(10)) + 5)).await;
    }
    anyhow::bail!("nats-server did not start on port {port}")
}

async fn nats_rtt(url: &str, samples: usize) -> anyhow::Result<(Duration, Duration)> {
    let responder = async_nats::connect(url).await?;
    let requester = async_nats::connect(url).await?;
    let mut sub = responder.subscribe("echo").await?;
    let r2 = responder.clone();
    tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            if let Some(reply) = m.reply {
                let _ = r2.publish(reply, m.payload).await;
            }
        }
    });
    responder.flush().await?;
    let payload = Bytes::from(vec![0x5a; 64]);
    // The responder's interest may take a moment to propagate: retry "no responders" (bounded).
    let mut ready = false;
    for _ in 0..200 {
        if requester.request("echo", payload.clone()).await.is_ok() {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    anyhow::ensure!(ready, "the NATS responder never became reachable");
    for _ in 0..1000.min(samples) {
        requester.request("echo", payload.clone()).await?;
    }
    let mut times = Vec::with_capacity(samples);
    for _ in 0..samples {
        let t = Instant::now();
        requester.request("echo", payload.clone()).await?;
        times.push(t.elapsed());
    }
    times.sort_unstable();
    Ok((bench::percentile(&times, 50.0), bench::percentile(&times, 99.0)))
}

async fn nats_throughput(url: &str, messages: u64) -> anyhow::Result<(f64, u64)> {
    let sub_client = async_nats::connect(url).await?;
    let pub_client = async_nats::connect(url).await?;
    let mut sub = sub_client.subscribe("thr").await?;
    sub_client.flush().await?;
    let payload = Bytes::from(vec![0xa5; 64]);
    let start = Instant::now();
    let publisher = tokio::spawn(async move {
        for _ in 0..messages {
            pub_client.publish("thr", payload.clone()).await?;
        }
        pub_client.flush().await?;
        Ok::<_, anyhow::Error>(())
    });
    let mut got = 0u64;
    while got < messages {
        match tokio::time::timeout(Duration::from_secs(5), sub.next()).await {
            Ok(Some(_)) => got += 1,
            _ => break, // NATS drops messages for slow consumers; report what arrived.
        }
    }
    let secs = start.elapsed().as_secs_f64();
    publisher.await??;
    Ok((got as f64 / secs, got))
}

async fn nats_idle_memory(url: &str, server_pid: u32, n: usize) -> anyhow::Result<(f64, f64)> {
    let mut warm = Vec::new();
    for _ in 0..20 {
        warm.push(async_nats::connect(url).await?);
    }
    let pid = server_pid.to_string();
    let (srv0, cli0) = (bench::rss_of(&pid).unwrap_or(0), bench::rss_bytes().unwrap_or(0));
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        clients.push(async_nats::connect(url).await?);
    }
    for c in clients.iter().step_by(97) {
        c.flush().await?;
    }
    let (srv1, cli1) = (bench::rss_of(&pid).unwrap_or(0), bench::rss_bytes().unwrap_or(0));
    Ok((srv1.saturating_sub(srv0) as f64 / n as f64, cli1.saturating_sub(cli0) as f64 / n as f64))
}

fn main() -> anyhow::Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let opts = if quick {
        BenchOptions { rtt_samples: 2000, messages: 200_000, idle_connections: 200, ..BenchOptions::default() }
    } else {
        BenchOptions::default()
    };
    // `--current-thread`: both ends and NATS' client on one thread (no cross-thread wake-ups).
    let rt = if std::env::args().any(|a| a == "--current-thread") {
        tokio::runtime::Builder::new_current_thread().enable_all().build()?
    } else {
        tokio::runtime::Builder::new_multi_thread().enable_all().build()?
    };
    let mut rows: Vec<BenchRow> = rt.block_on(bench::run_all(&opts))?;
    rt.block_on(async {
        let (server, url) = start_nats().await?;
        let (p50, p99) = nats_rtt(&url, opts.rtt_samples).await?;
        rows.push(BenchRow::new("nats", "rtt p50 (64 B)", "tcp", p50.as_secs_f64() * 1e6, "us"));
        rows.push(BenchRow::new("nats", "rtt p99 (64 B)", "tcp", p99.as_secs_f64() * 1e6, "us"));
        let (rate, got) = nats_throughput(&url, opts.messages).await?;
        rows.push(BenchRow::new("nats", "one-way 64 B msgs", "tcp", rate, "msg/s"));
        if got < opts.messages {
            rows.push(BenchRow::new(
                "nats",
                "messages lost (slow consumer)",
                "tcp",
                (opts.messages - got) as f64,
                "msgs",
            ));
        }
        let (srv, cli) = nats_idle_memory(&url, server.0.id(), opts.idle_connections).await?;
        rows.push(BenchRow::new("nats", "RSS per idle connection (both ends)", "tcp", srv + cli, "bytes"));
        rows.push(BenchRow::new("nats", "  of which nats-server", "tcp", srv, "bytes"));
        rows.push(BenchRow::new("nats", "  of which async-nats client", "tcp", cli, "bytes"));
        drop(server);
        Ok::<_, anyhow::Error>(())
    })?;
    print!("{}", bench::table(&rows));
    Ok(())
}

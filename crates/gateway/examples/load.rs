//! A closed-loop HTTP/1.1 keep-alive load generator for TCP and Unix sockets (wrk cannot
//! reach a Unix socket), used by `bench/run.sh`:
//!
//! ```text
//! load (tcp HOST:PORT | unix PATH) CONNECTIONS SECONDS PATH TOKEN BODY
//! ```
//!
//! Each connection sends one POST, reads the whole response (Content-Length), repeats. The
//! MCP headers are always sent, so `/mcp` JSON-RPC bodies work too.
//! Prints one JSON line: requests, non-2xx, seconds, requests/s and latency percentiles (µs).

use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

type Error = Box<dyn std::error::Error + Send + Sync>;

async fn one_connection<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    request: Vec<u8>,
    until: Instant,
) -> Result<(Vec<u32>, u64), Error> {
    let mut stream = BufReader::new(stream);
    let mut latencies = Vec::new();
    let mut failures = 0;
    let mut line = String::new();
    let mut body = Vec::new();
    while Instant::now() < until {
        let start = Instant::now();
        stream.get_mut().write_all(&request).await?;
        line.clear();
        stream.read_line(&mut line).await?;
        let ok = line.split_whitespace().nth(1).is_some_and(|s| s.starts_with('2'));
        let mut length = 0usize;
        loop {
            line.clear();
            stream.read_line(&mut line).await?;
            if line == "\r\n" || line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                length = v.trim().parse()?;
            }
        }
        body.resize(length, 0);
        stream.read_exact(&mut body).await?;
        latencies.push(u32::try_from(start.elapsed().as_micros()).unwrap_or(u32::MAX));
        if !ok {
            failures += 1;
        }
    }
    Ok((latencies, failures))
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().collect();
    let [_, kind, target, conns, secs, path, token, body] = args.as_slice() else {
        return Err("usage: load (tcp HOST:PORT | unix PATH) CONNECTIONS SECONDS PATH TOKEN BODY".into());
    };
    let conns: usize = conns.parse()?;
    let until = Instant::now() + Duration::from_secs(secs.parse()?);
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nAccept: application/json, text/event-stream\r\n\
         MCP-Protocol-Version: 2025-06-18\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..conns {
        let request = request.clone();
        match kind.as_str() {
            "tcp" => {
                let s = tokio::net::TcpStream::connect(target.as_str()).await?;
                s.set_nodelay(true)?;
                tasks.spawn(one_connection(s, request, until));
            }
            "unix" => {
                let s = tokio::net::UnixStream::connect(target.as_str()).await?;
                tasks.spawn(one_connection(s, request, until));
            }
            other => return Err(format!("unknown transport {other}").into()),
        }
    }
    let mut all = Vec::new();
    let mut failures = 0;
    while let Some(done) = tasks.join_next().await {
        let (lat, fail) = done??;
        all.extend(lat);
        failures += fail;
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_unstable();
    println!(
        "{{\"transport\":\"{kind}\",\"connections\":{conns},\"requests\":{},\"non_2xx\":{failures},\"seconds\":{elapsed:.2},\
         \"rps\":{:.0},\"p50_us\":{},\"p99_us\":{},\"max_us\":{}}}",
        all.len(),
        all.len() as f64 / elapsed,
        percentile(&all, 0.5),
        percentile(&all, 0.99),
        all.last().copied().unwrap_or_default()
    );
    Ok(())
}

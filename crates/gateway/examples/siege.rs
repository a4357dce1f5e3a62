//! `/health` latency from a bystander while the gateway is under attack, used by
//! `bench/siege.sh`:
//!
//! ```text
//! siege HOST:PORT TOKEN SECONDS [SLOW_CLIENTS]
//! ```
//!
//! Three phases of SECONDS each; in every phase a bystander opens a new connection, sends
//! `GET /health` and reads the answer, every 10 ms:
//!
//! 1. `quiet`: nothing else.
//! 2. `tokens`: 8 attackers send `POST /tool` in a closed loop, each request with a token never
//!    seen before, genuinely signed (appending needs no key): half carry the old CPU attack (64
//!    facts and a five-way join), half the costliest token the gateway reads (16 blocks, each a
//!    valid narrowing, so 16 signatures to check). The tokens are made before the phase, so the
//!    attackers' own signing does not compete for the CPU.
//! 3. `slow`: SLOW_CLIENTS (default 2000) connections trickle a request's headers, one byte a
//!    second, reopening when the server closes them.
//!
//! Prints one JSON line per phase: the bystander's latency percentiles (µs), its failures, the
//! attackers' requests and statuses, and how many slow connections the server closed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use biscuit_auth::UnverifiedBiscuit;
use biscuit_auth::builder::BlockBuilder;
use referee_gateway::auth::{MAX_BLOCKS, Narrowing, attenuate};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Sends one request on a new connection; the status code and the time to the whole answer.
async fn once(addr: &str, request: &[u8]) -> Result<(u16, Duration), Error> {
    let start = Instant::now();
    let stream = TcpStream::connect(addr).await?;
    let mut stream = BufReader::new(stream);
    stream.get_mut().write_all(request).await?;
    read_answer(&mut stream).await.map(|status| (status, start.elapsed()))
}

async fn read_answer(stream: &mut BufReader<TcpStream>) -> Result<u16, Error> {
    let mut line = String::new();
    stream.read_line(&mut line).await?;
    let status = line.split_whitespace().nth(1).ok_or("no status line")?.parse()?;
    let mut length = 0usize;
    loop {
        line.clear();
        if stream.read_line(&mut line).await? == 0 || line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse()?;
        }
    }
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await?;
    Ok(status)
}

/// The bystander: `GET /health` on a new connection every 10 ms until `until`.
async fn bystander(addr: String, until: Instant) -> (Vec<u64>, u64) {
    let request = b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    let (mut latencies, mut failures) = (Vec::new(), 0);
    while Instant::now() < until {
        let started = Instant::now();
        match tokio::time::timeout(Duration::from_secs(5), once(&addr, request)).await {
            Ok(Ok((200, took))) => latencies.push(u64::try_from(took.as_micros()).unwrap_or(u64::MAX)),
            _ => {
                failures += 1;
                latencies.push(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX));
            }
        }
        tokio::time::sleep(Duration::from_millis(10).saturating_sub(started.elapsed())).await;
    }
    latencies.sort_unstable();
    (latencies, failures)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

/// Fresh, genuinely signed tokens: the join attack and the 16-block maximum, alternating.
fn expensive_tokens(token: &str, count: usize) -> Result<Vec<String>, Error> {
    let facts: String = (0..64).map(|i| format!("f({i});")).collect();
    let base = UnverifiedBiscuit::from_base64(token)?;
    let mut deep = token.to_owned();
    for _ in 1..MAX_BLOCKS - 1 {
        deep = attenuate(&deep, &Narrowing { tools: vec!["fs_read".into()], ..Narrowing::default() })?;
    }
    let mut tokens = Vec::with_capacity(count);
    for n in 0..count {
        if n % 2 == 0 {
            let code = format!(
                "{facts}nonce({n});\ng($a, $b, $c, $d, $e) <- f($a), f($b), f($c), f($d), f($e);\n\
                 check if g($a, $b, $c, $d, $e), $a + $b + $c + $d + $e > 0;\n"
            );
            tokens.push(base.append(BlockBuilder::new().code(&code)?)?.to_base64()?);
        } else {
            // A different expiry makes each one new; the last block keeps the chain at 16.
            let narrowing = Narrowing { expires_at: Some(4_000_000_000 - n as u64), ..Narrowing::default() };
            tokens.push(attenuate(&deep, &narrowing)?);
        }
    }
    Ok(tokens)
}

async fn attacker(addr: String, tokens: Vec<String>, until: Instant, statuses: Arc<[AtomicU64; 6]>) {
    for token in tokens.iter().cycle() {
        if Instant::now() >= until {
            break;
        }
        let body = r#"{"tool":"fs_read","params":{"path":"/nonexistent"}}"#;
        let request = format!(
            "POST /tool HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let slot = match once(&addr, request.as_bytes()).await {
            Ok((status, _)) => usize::from(status / 100).min(5),
            Err(_) => 0,
        };
        if let Some(counter) = statuses.get(slot) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One slow client: a request's headers, one byte a second; reopens when closed.
async fn slow_client(addr: String, until: Instant, closed: Arc<AtomicU64>) {
    let trickle = b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    while Instant::now() < until {
        let Ok(mut stream) = TcpStream::connect(&addr).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        for byte in trickle {
            if Instant::now() >= until {
                return;
            }
            if stream.write_all(std::slice::from_ref(byte)).await.is_err() {
                closed.fetch_add(1, Ordering::Relaxed);
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

fn report(phase: &str, seconds: u64, latencies: &[u64], failures: u64, extra: BTreeMap<&str, u64>) {
    let extra: String = extra.iter().map(|(k, v)| format!(",\"{k}\":{v}")).collect();
    println!(
        "{{\"phase\":\"{phase}\",\"seconds\":{seconds},\"health_requests\":{},\"health_failures\":{failures},\
         \"p50_us\":{},\"p90_us\":{},\"p99_us\":{},\"max_us\":{}{extra}}}",
        latencies.len(),
        percentile(latencies, 0.50),
        percentile(latencies, 0.90),
        percentile(latencies, 0.99),
        latencies.last().copied().unwrap_or_default(),
    );
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().collect();
    let [_, addr, token, seconds, rest @ ..] = args.as_slice() else {
        return Err("usage: siege HOST:PORT TOKEN SECONDS [SLOW_CLIENTS]".into());
    };
    let seconds: u64 = seconds.parse()?;
    let slow: usize = rest.first().map(|s| s.parse()).transpose()?.unwrap_or(2000);
    let phase = Duration::from_secs(seconds);

    let (latencies, failures) = bystander(addr.clone(), Instant::now() + phase).await;
    report("quiet", seconds, &latencies, failures, BTreeMap::new());

    // Enough fresh tokens that no attacker repeats one (a repeat is a cache hit), within reason.
    let per_attacker = 1500;
    let made = Instant::now();
    let tokens = tokio::task::spawn_blocking({
        let token = token.clone();
        move || expensive_tokens(&token, 8 * per_attacker)
    })
    .await??;
    eprintln!("siege: made {} tokens in {:.1} s", tokens.len(), made.elapsed().as_secs_f64());
    let statuses: Arc<[AtomicU64; 6]> = Arc::new(Default::default());
    let until = Instant::now() + phase;
    let mut attackers = Vec::new();
    for chunk in tokens.chunks(per_attacker) {
        attackers.push(tokio::spawn(attacker(addr.clone(), chunk.to_vec(), until, statuses.clone())));
    }
    let (latencies, failures) = bystander(addr.clone(), until).await;
    for a in attackers {
        a.await?;
    }
    let counts: Vec<u64> = statuses.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    let extra = BTreeMap::from([
        ("attack_requests", counts.iter().sum()),
        ("attack_errors", counts.first().copied().unwrap_or_default()),
        ("attack_2xx", counts.get(2).copied().unwrap_or_default()),
        ("attack_4xx", counts.get(4).copied().unwrap_or_default()),
        ("attack_5xx", counts.get(5).copied().unwrap_or_default()),
    ]);
    report("tokens", seconds, &latencies, failures, extra);

    let closed = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + phase;
    let mut clients = Vec::new();
    for _ in 0..slow {
        clients.push(tokio::spawn(slow_client(addr.clone(), until, closed.clone())));
    }
    // Let the slow clients connect before the bystander measures.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (latencies, failures) = bystander(addr.clone(), until).await;
    for c in clients {
        c.await?;
    }
    let extra =
        BTreeMap::from([("slow_clients", slow as u64), ("slow_closed_by_server", closed.load(Ordering::Relaxed))]);
    report("slow", seconds, &latencies, failures, extra);
    Ok(())
}

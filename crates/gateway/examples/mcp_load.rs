//! An MCP-over-stdio load client, fast enough that the server is what it measures (the Python
//! client was the bottleneck for both servers). Used by `bench/run.sh`:
//!
//! ```text
//! mcp_load CALLS IN_FLIGHT TOOL ARGS_JSON -- SERVER_COMMAND [ARGS…]
//! ```
//!
//! Spawns the server as a child, does the MCP handshake (`initialize`, its response,
//! `notifications/initialized`), checks with `tools/list` that TOOL exists, then sends CALLS
//! `tools/call` requests of TOOL with ARGS_JSON, newline-delimited JSON-RPC with distinct ids,
//! keeping IN_FLIGHT outstanding (MCP allows concurrent requests). With IN_FLIGHT 1 one thread
//! writes a call and reads its reply; above that one writer thread and one reader thread; no
//! async runtime. Prints one JSON line: calls, errors (JSON-RPC errors and
//! `isError` results), seconds, calls/s and latency percentiles (µs).

use std::io::{BufRead, BufReader, BufWriter, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Instant;

use serde::Deserialize;
use serde_json::{Value, json};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Protocol version the client offers; the server answers with the one it speaks.
const PROTOCOL: &str = "2025-06-18";

/// The parts of a response the client looks at (the content itself is skipped, not built).
#[derive(Deserialize)]
struct Reply {
    id: Option<u64>,
    error: Option<serde::de::IgnoredAny>,
    result: Option<ReplyResult>,
}

#[derive(Deserialize)]
struct ReplyResult {
    #[serde(rename = "isError", default)]
    is_error: bool,
}

/// Reads lines until the response with `id` (skipping notifications and server requests).
fn wait_for(out: &mut BufReader<ChildStdout>, id: u64) -> Result<Value, Error> {
    let mut line = String::new();
    loop {
        line.clear();
        if out.read_line(&mut line)? == 0 {
            return Err(format!("server closed stdout before answering request {id}").into());
        }
        let msg: Value = serde_json::from_str(&line)?;
        if msg.get("id").and_then(Value::as_u64) == Some(id) {
            if let Some(e) = msg.get("error") {
                return Err(format!("request {id} failed: {e}").into());
            }
            return Ok(msg);
        }
    }
}

fn send(to: &mut BufWriter<ChildStdin>, msg: &Value) -> Result<(), Error> {
    serde_json::to_writer(&mut *to, msg)?;
    to.write_all(b"\n")?;
    to.flush()?;
    Ok(())
}

/// The handshake and the tool check; returns the server's name and version.
fn handshake(to: &mut BufWriter<ChildStdin>, out: &mut BufReader<ChildStdout>, tool: &str) -> Result<String, Error> {
    send(
        to,
        &json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": PROTOCOL, "capabilities": {},
            "clientInfo": {"name": "referee-mcp-load", "version": env!("CARGO_PKG_VERSION")}}}),
    )?;
    let init = wait_for(out, 0)?;
    let field = |name: &str| init.pointer(&format!("/result/serverInfo/{name}")).and_then(Value::as_str).unwrap_or("?");
    let server = format!("{} {}", field("name"), field("version"));
    send(to, &json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))?;
    send(to, &json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}))?;
    let list = wait_for(out, 1)?;
    let names: Vec<&str> = list
        .pointer("/result/tools")
        .and_then(Value::as_array)
        .map(|tools| tools.iter().filter_map(|t| t.get("name").and_then(Value::as_str)).collect())
        .unwrap_or_default();
    if !names.contains(&tool) {
        return Err(format!("{server} has no tool `{tool}`; it lists {names:?}").into());
    }
    Ok(server)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

/// Ids of the calls start here (0 and 1 are the handshake's).
const FIRST_ID: u64 = 2;

/// What the calls came to: one latency (µs) per reply, and the replies that were errors.
struct Tally {
    latencies: Vec<u64>,
    errors: u64,
}

impl Tally {
    fn for_calls(calls: u64) -> Result<Self, Error> {
        Ok(Self { latencies: Vec::with_capacity(usize::try_from(calls)?), errors: 0 })
    }

    fn record(&mut self, reply: &Reply, latency_ns: u64) {
        self.latencies.push(latency_ns / 1000);
        if reply.error.is_some() || reply.result.as_ref().is_some_and(|r| r.is_error) {
            self.errors += 1;
        }
    }
}

/// The `tools/call` request with `id`, newline-terminated, into `buf`.
fn call_line(buf: &mut Vec<u8>, id: u64, tool: &str, args: &Value) -> Result<(), Error> {
    buf.clear();
    let msg = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": tool, "arguments": args}});
    serde_json::to_writer(&mut *buf, &msg)?;
    buf.push(b'\n');
    Ok(())
}

/// One call at a time on this thread: write, flush, read until its reply. Nothing crosses a
/// thread, so the client adds no wake-up of its own to a round trip.
fn run_sequential(
    to: &mut BufWriter<ChildStdin>,
    out: &mut BufReader<ChildStdout>,
    calls: u64,
    tool: &str,
    args: &Value,
) -> Result<Tally, Error> {
    let mut tally = Tally::for_calls(calls)?;
    let (mut buf, mut line) = (Vec::with_capacity(512), Vec::new());
    for i in 0..calls {
        let id = i + FIRST_ID;
        call_line(&mut buf, id, tool, args)?;
        let sent = Instant::now();
        to.write_all(&buf)?;
        to.flush()?;
        loop {
            line.clear();
            if out.read_until(b'\n', &mut line)? == 0 {
                return Err("server closed stdout".into());
            }
            let reply: Reply = serde_json::from_slice(&line)?;
            if reply.id == Some(id) {
                tally.record(&reply, sent.elapsed().as_nanos() as u64);
                break;
            }
        }
    }
    Ok(tally)
}

/// `in_flight` calls outstanding: this thread writes while a reader thread takes the replies
/// and hands back one credit per reply.
fn run_pipelined(
    mut to: BufWriter<ChildStdin>,
    mut out: BufReader<ChildStdout>,
    calls: u64,
    in_flight: u64,
    tool: &str,
    args: &Value,
) -> Result<Tally, Error> {
    // Send times (ns since `start`) by call index, read by the reader thread.
    let sent: Arc<Vec<AtomicU64>> = Arc::new((0..calls).map(|_| AtomicU64::new(0)).collect());
    let (credit, credits) = mpsc::channel::<()>();
    for _ in 0..in_flight {
        credit.send(())?;
    }
    let start = Instant::now();
    let reader = {
        let sent = sent.clone();
        std::thread::spawn(move || -> Result<Tally, Error> {
            let mut tally = Tally::for_calls(calls)?;
            let mut line = Vec::new();
            while (tally.latencies.len() as u64) < calls {
                line.clear();
                if out.read_until(b'\n', &mut line)? == 0 {
                    return Err("server closed stdout".into());
                }
                let reply: Reply = serde_json::from_slice(&line)?;
                let Some(i) = reply.id.and_then(|id| id.checked_sub(FIRST_ID)) else { continue };
                let now = start.elapsed().as_nanos() as u64;
                let at = sent.get(usize::try_from(i)?).ok_or("reply to an id never sent")?.load(Ordering::Acquire);
                tally.record(&reply, now.saturating_sub(at));
                // The writer may have finished: a closed channel is fine.
                let _ = credit.send(());
            }
            Ok(tally)
        })
    };
    let mut buf = Vec::with_capacity(512);
    // Credits in hand: requests that may be written without waiting. Writes are buffered and
    // flushed only before waiting for a credit, so a full window goes out in few syscalls.
    let mut available = 0u64;
    for i in 0..calls {
        while available == 0 {
            if credits.try_recv().is_ok() {
                available += 1;
            } else {
                to.flush()?;
                credits.recv()?;
                available += 1;
            }
        }
        available -= 1;
        call_line(&mut buf, i + FIRST_ID, tool, args)?;
        if let Some(slot) = usize::try_from(i).ok().and_then(|i| sent.get(i)) {
            slot.store(start.elapsed().as_nanos() as u64, Ordering::Release);
        }
        to.write_all(&buf)?;
    }
    to.flush()?;
    reader.join().map_err(|_| "reader thread panicked")?
}

fn run(mut child: Child, calls: u64, in_flight: u64, tool: &str, args: &Value) -> Result<(), Error> {
    let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
        return Err("child has no stdin/stdout".into());
    };
    let mut to = BufWriter::with_capacity(1 << 16, stdin);
    let mut out = BufReader::with_capacity(1 << 16, stdout);
    let server = handshake(&mut to, &mut out, tool)?;
    let start = Instant::now();
    let tally = if in_flight == 1 {
        let tally = run_sequential(&mut to, &mut out, calls, tool, args)?;
        drop(to);
        tally
    } else {
        run_pipelined(to, out, calls, in_flight, tool, args)?
    };
    let seconds = start.elapsed().as_secs_f64();
    let _ = child.wait();
    let Tally { mut latencies, errors } = tally;
    latencies.sort_unstable();
    println!(
        "{}",
        json!({
            "server": server, "tool": tool, "calls": calls, "in_flight": in_flight, "errors": errors,
            "seconds": (seconds * 1000.0).round() / 1000.0,
            "calls_per_s": (calls as f64 / seconds).round(),
            "p50_us": percentile(&latencies, 0.5), "p99_us": percentile(&latencies, 0.99),
            "max_us": latencies.last().copied().unwrap_or_default(),
        })
    );
    Ok(())
}

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: mcp_load CALLS IN_FLIGHT TOOL ARGS_JSON -- SERVER_COMMAND [ARGS…]";
    let split = args.iter().position(|a| a == "--").ok_or(usage)?;
    let ([_, calls, in_flight, tool, tool_args], [program, server_args @ ..]) =
        (args.get(..split).ok_or(usage)?, args.get(split + 1..).ok_or(usage)?)
    else {
        return Err(usage.into());
    };
    let calls: u64 = calls.parse()?;
    let in_flight: u64 = in_flight.parse::<u64>()?.max(1);
    let tool_args: Value = serde_json::from_str(tool_args)?;
    let child = Command::new(program)
        .args(server_args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    run(child, calls, in_flight, tool, &tool_args)
}

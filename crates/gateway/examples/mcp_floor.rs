//! The floor of an MCP tool call over stdio on this machine: a measuring instrument for
//! `bench/run.sh`, not a server. It answers what `examples/mcp_load` sends (`initialize`,
//! `tools/list`, `tools/call`) with the least work an honest answer takes: one thread, blocking
//! reads, `std::fs::read` of the named file with **no** reality check, no authorisation, no
//! limits, no timeouts, and replies written in one `write` per batch of requests read. The result
//! has the shape of `referee mcp`'s `fs_read` (structured content plus its text mirror), so the
//! bytes on the pipe are the same.
//!
//! ```text
//! mcp_floor    (speaks MCP on stdin/stdout until stdin closes)
//! ```
//!
//! Whatever a real server does per call comes on top of this; a goal beyond what this reaches
//! against a peer is beyond the machine.

use std::io::{BufRead, BufReader, Write};

use serde_json::{Value, json};

/// Replies written at the latest once this many bytes wait (half the default pipe capacity).
const FLUSH_BYTES: usize = 32 << 10;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// The answer to one request: its `result`, or a JSON-RPC error (code, message).
fn answer(method: &str, params: &Value) -> Result<Value, (i64, String)> {
    match method {
        "initialize" => Ok(json!({
            "protocolVersion": params.get("protocolVersion").cloned().unwrap_or(json!("2025-06-18")),
            "capabilities": {"tools": {}},
            "serverInfo": {"name": "mcp-floor", "version": env!("CARGO_PKG_VERSION")},
        })),
        "tools/list" => Ok(json!({"tools": [{
            "name": "fs_read",
            "description": "Reads a file, unchecked (a benchmark floor).",
            "inputSchema": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]},
        }]})),
        "tools/call" => {
            let path = params.pointer("/arguments/path").and_then(Value::as_str).unwrap_or_default();
            let data = match std::fs::read(path).map(String::from_utf8) {
                Ok(Ok(content)) => json!({
                    "path": path, "size": content.len(), "offset": 0, "length": content.len(),
                    "encoding": "utf8", "content": content, "eof": true,
                }),
                Ok(Err(_)) => return Err((-32602, format!("{path} is not UTF-8"))),
                Err(e) => return Err((-32602, format!("{path}: {e}"))),
            };
            let text = data.to_string();
            Ok(json!({"content": [{"type": "text", "text": text}], "structuredContent": data, "isError": false}))
        }
        "ping" => Ok(json!({})),
        other => Err((-32601, format!("no method {other}"))),
    }
}

fn main() -> Result<(), Error> {
    let mut input = BufReader::with_capacity(1 << 16, std::io::stdin().lock());
    let mut output = std::io::stdout().lock();
    let (mut line, mut replies) = (Vec::new(), Vec::with_capacity(1 << 16));
    loop {
        line.clear();
        if input.read_until(b'\n', &mut line)? == 0 {
            return Ok(());
        }
        let msg: Value = serde_json::from_slice(&line)?;
        // Notifications (no id) get no reply.
        if let Some(id) = msg.get("id") {
            let method = msg.get("method").and_then(Value::as_str).unwrap_or_default();
            let reply = match answer(method, msg.get("params").unwrap_or(&Value::Null)) {
                Ok(result) => json!({"jsonrpc": "2.0", "id": id, "result": result}),
                Err((code, message)) => {
                    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
                }
            };
            serde_json::to_writer(&mut replies, &reply)?;
            replies.push(b'\n');
        }
        // Write when every request already read has its reply, so a batch costs one write, or
        // when half a pipe's worth is waiting, so the client can start on it.
        if (input.buffer().is_empty() && !replies.is_empty()) || replies.len() >= FLUSH_BYTES {
            output.write_all(&replies)?;
            output.flush()?;
            replies.clear();
        }
    }
}

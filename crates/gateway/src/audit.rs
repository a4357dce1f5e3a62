//! The gateway's security events, in the referee's hash-chained audit log (`referee audit
//! tail`, `referee audit verify`).
//!
//! What is recorded:
//!
//! - every **denial** (401 token refusals, 403 rights refusals — of a route, a tool, a muscle, a
//!   path or a worknode — and 429 rate refusals), with its reason code, the source (the peer's IP
//!   address, `unix` or `stdio`), the token id when the token was verified (never the token) and
//!   what was asked for;
//! - every call of a **privileged tool** (one not annotated read-only: `fs_write`, `exec`,
//!   `node_update`, `node_create`, muscle training) with its outcome, written before the answer
//!   is sent;
//! - token **mint** and **revoke** (through the server, or by the CLI when no server runs), and
//!   the first use of each **attenuated** token seen (attenuation itself happens offline);
//! - muscle **uploads** and **unloads** (the runtime adds its own `load`/`unload` records).
//!
//! Denials are aggregated so a flood cannot grow the log without bound or bury other records:
//! within an interval ([`WINDOW`]), the first denial of each (reason, subject) pair is recorded
//! as it happens and the rest are counted into one `gateway_denied_repeated` record (with up to
//! four of their targets and sources) when the interval closes. The subject is the verified
//! token's root id, or the source when no token was verified. Sources are cheap to vary, so
//! they share a budget of [`MAX_PAIRS`] pairs per interval, past which the rest go into one
//! overflow record. Tokens are not: only an admin mints them, so each verified token keeps its
//! own first record per reason, up to [`MAX_TOKEN_PAIRS`] pairs per interval (a memory bound
//! far above any token population; past it, the overflow record names up to 16 of the tokens).
//! A tenant holding many tokens therefore cannot crowd another token's denials out of the log,
//! and an interval adds at most `2 * MAX_PAIRS + 1` records for sources and two per reason per
//! token issued, whatever the traffic. New attenuations are counted the same way per root
//! token id.
//!
//! One writer thread appends; events that arrive while it writes are appended together, in one
//! transaction and one disk sync. Callers recording a privileged action wait for it to be
//! durable; denials never wait.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use referee_runtime::AuditLog;
use serde_json::{Value, json};
use tokio::sync::oneshot;

/// How long denials of one (reason, source) pair are counted into one record.
pub const WINDOW: Duration = Duration::from_secs(10);
/// Most (reason, source) pairs tracked in one interval for callers without a verified token;
/// the rest share one overflow record.
pub const MAX_PAIRS: usize = 64;
/// Most (reason, token) pairs tracked in one interval (and root tokens with new attenuations):
/// a memory bound, not a budget anyone can exhaust without an admin minting the tokens.
pub const MAX_TOKEN_PAIRS: usize = 4096;
/// Longest text (a target, a reason's detail) kept in a record, in characters.
const MAX_TEXT: usize = 160;
/// Most attenuated tokens remembered as already seen (forgotten all at once past it).
const MAX_SEEN: usize = 4096;
/// How long a caller waits for its privileged record to be durable.
const DURABLE_WAIT: Duration = Duration::from_secs(5);

/// Where a request came from: the peer's IP address for TCP (not its port, so one client's
/// connections count as one source), `unix` for the Unix socket, `stdio` for `referee mcp`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Origin(pub Arc<str>);

impl Origin {
    /// A request whose listener did not say (a router driven directly, in tests).
    pub fn unknown() -> Self {
        Self(Arc::from("unknown"))
    }

    /// The local operator over `referee mcp` (stdio).
    pub fn stdio() -> Self {
        Self(Arc::from("stdio"))
    }

    /// The source as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What a listener's peer address says about its origin.
pub trait PeerOrigin {
    /// The origin of a connection from this address.
    fn origin(&self) -> Origin;
}

impl PeerOrigin for std::net::SocketAddr {
    fn origin(&self) -> Origin {
        Origin(Arc::from(self.ip().to_canonical().to_string()))
    }
}

impl PeerOrigin for tokio::net::unix::SocketAddr {
    fn origin(&self) -> Origin {
        Origin(Arc::from("unix"))
    }
}

fn clip(text: &str) -> String {
    text.chars().take(MAX_TEXT).collect()
}

/// What a privileged call's record keeps of its parameters: the ones naming what it touched or
/// ran (`path`, `cwd`, `command`, `args`, `field`, `op`), each string cut to 160
/// characters and each list to eight items; never contents.
pub fn call_detail(params: &Value) -> Value {
    let mut out = serde_json::Map::new();
    for key in ["path", "cwd", "command", "args", "field", "op"] {
        let kept = match params.get(key) {
            Some(Value::String(text)) => json!(clip(text)),
            Some(Value::Array(items)) => {
                json!(items.iter().take(8).map(|i| clip(i.as_str().unwrap_or("…"))).collect::<Vec<_>>())
            }
            _ => continue,
        };
        out.insert(key.to_owned(), kept);
    }
    Value::Object(out)
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Whom a denial is counted against: the verified token (its root id, so every attenuation
/// of one minted token is one subject), or, when no token was verified, the source.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Subject {
    Token(String),
    Source(Origin),
}

/// Denials of one (reason, subject) pair in the current interval.
#[derive(Debug)]
struct Tally {
    count: u64,
    sources: Vec<Origin>,
    targets: Vec<String>,
    first_ms: u64,
    last_ms: u64,
}

/// Keeps up to four distinct items.
fn keep<T: PartialEq>(items: &mut Vec<T>, item: T) {
    keep_up_to(items, item, 4);
}

/// Keeps up to `most` distinct items.
fn keep_up_to<T: PartialEq>(items: &mut Vec<T>, item: T, most: usize) {
    if items.len() < most && !items.contains(&item) {
        items.push(item);
    }
}

/// The denials of the current interval: see the module documentation for the budgets.
#[derive(Debug, Default)]
struct Window {
    opened: Option<Instant>,
    pairs: HashMap<(&'static str, Subject), Tally>,
    by_tokens: usize,
    by_sources: usize,
    /// Denials past the budget: (by tokens, by sources).
    overflow: (u64, u64),
    /// Up to 16 of the tokens whose denials went to the overflow.
    overflow_tokens: Vec<String>,
    /// New attenuations seen per root token id (a holder can make any number offline).
    attenuations: HashMap<String, u64>,
    attenuation_overflow: u64,
}

impl Window {
    /// The records that close the interval: one per pair denied more than once, the overflow,
    /// and the attenuations counted.
    fn close(&mut self) -> Vec<Value> {
        let mut out: Vec<Value> = self
            .pairs
            .drain()
            .filter(|(_, t)| t.count > 1)
            .map(|((reason, subject), t)| {
                let (token_id, sources): (Option<String>, Vec<&str>) = match &subject {
                    Subject::Token(id) => (Some(id.clone()), t.sources.iter().map(Origin::as_str).collect()),
                    Subject::Source(origin) => (None, vec![origin.as_str()]),
                };
                json!({
                    "kind": "gateway_denied_repeated", "reason": reason, "token_id": token_id, "sources": sources,
                    "count": t.count - 1, "targets": t.targets, "from_ms": t.first_ms, "to_ms": t.last_ms,
                })
            })
            .collect();
        if self.overflow.0 > 0 {
            out.push(json!({
                "kind": "gateway_denied_repeated", "reason": "*", "count": self.overflow.0,
                "token_ids": std::mem::take(&mut self.overflow_tokens),
                "note": format!("denials past {MAX_TOKEN_PAIRS} reason/token pairs in one interval"),
            }));
        }
        if self.overflow.1 > 0 {
            out.push(json!({
                "kind": "gateway_denied_repeated", "reason": "*", "count": self.overflow.1,
                "note": format!("denials past {MAX_PAIRS} reason/source pairs in one interval"),
            }));
        }
        for (token_id, count) in self.attenuations.drain().filter(|(_, n)| *n > 1) {
            out.push(json!({ "kind": "token_attenuation_seen_repeated", "token_id": token_id, "count": count - 1 }));
        }
        if self.attenuation_overflow > 0 {
            out.push(json!({
                "kind": "token_attenuation_seen_repeated", "token_id": "*", "count": self.attenuation_overflow,
                "note": format!("attenuations past {MAX_TOKEN_PAIRS} tokens in one interval"),
            }));
        }
        self.by_tokens = 0;
        self.by_sources = 0;
        self.overflow = (0, 0);
        self.overflow_tokens.clear();
        self.attenuation_overflow = 0;
        self.opened = None;
        out
    }
}

#[derive(Debug, Default)]
struct State {
    events: Vec<Value>,
    acks: Vec<oneshot::Sender<bool>>,
    window: Window,
    seen: HashSet<String>,
    stop: bool,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    window: Duration,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The gateway's writer of security events (see the module documentation).
#[derive(Debug)]
pub struct SecurityLog {
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl SecurityLog {
    /// Starts the writer over `log`, aggregating denials per [`WINDOW`].
    pub fn start(log: AuditLog) -> Self {
        Self::with_window(log, WINDOW)
    }

    /// Like [`SecurityLog::start`] with another interval (tests).
    pub fn with_window(log: AuditLog, window: Duration) -> Self {
        let shared = Arc::new(Shared { state: Mutex::new(State::default()), wake: Condvar::new(), window });
        let writer = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("referee-audit".into())
                .spawn(move || write_loop(&shared, &log))
                .map_err(
                    |e| tracing::error!(error = %e, "cannot start the audit writer; security events are not recorded"),
                )
                .ok()
        };
        Self { shared, writer: Mutex::new(writer) }
    }

    /// Records a denial (never waits). `token_id` only for a verified token.
    pub fn denied(&self, origin: &Origin, reason: &'static str, token_id: Option<&str>, target: &str, detail: &str) {
        metrics::counter!("referee_gateway_denials_total", "reason" => reason).increment(1);
        let now = now_ms();
        let subject = match token_id {
            Some(id) => Subject::Token(id.to_owned()),
            None => Subject::Source(origin.clone()),
        };
        let mut state = self.shared.lock();
        let window = &mut state.window;
        if window.opened.is_none() {
            window.opened = Some(Instant::now());
        }
        if let Some(tally) = window.pairs.get_mut(&(reason, subject.clone())) {
            tally.count += 1;
            tally.last_ms = now;
            keep(&mut tally.targets, clip(target));
            keep(&mut tally.sources, origin.clone());
            return;
        }
        let (used, budget, overflow) = match &subject {
            Subject::Token(id) => {
                if window.by_tokens >= MAX_TOKEN_PAIRS {
                    keep_up_to(&mut window.overflow_tokens, id.clone(), 16);
                }
                (&mut window.by_tokens, MAX_TOKEN_PAIRS, &mut window.overflow.0)
            }
            Subject::Source(_) => (&mut window.by_sources, MAX_PAIRS, &mut window.overflow.1),
        };
        if *used >= budget {
            *overflow += 1;
            return;
        }
        *used += 1;
        // The first denial has its own record; the tally keeps what the repeats touched.
        let tally = Tally { count: 1, sources: Vec::new(), targets: Vec::new(), first_ms: now, last_ms: now };
        window.pairs.insert((reason, subject), tally);
        state.events.push(json!({
            "kind": "gateway_denied", "reason": reason, "source": origin.as_str(), "token_id": token_id,
            "target": clip(target), "detail": clip(detail),
        }));
        drop(state);
        self.shared.wake.notify_one();
    }

    /// Records `event` without waiting for it to be durable.
    pub fn record_now(&self, event: Value) {
        self.shared.lock().events.push(event);
        self.shared.wake.notify_one();
    }

    /// Records `event` and waits until it is durable (at most a few seconds; a failure to write
    /// is logged and counted, and does not fail the caller's request).
    pub async fn record(&self, event: Value) {
        let (tx, rx) = oneshot::channel();
        {
            let mut state = self.shared.lock();
            state.events.push(event);
            state.acks.push(tx);
        }
        self.shared.wake.notify_one();
        match tokio::time::timeout(DURABLE_WAIT, rx).await {
            Ok(Ok(true)) => {}
            Ok(Ok(false) | Err(_)) => tracing::error!("a security event could not be written to the audit log"),
            Err(_) => tracing::error!("the audit log did not confirm a security event within 5 s"),
        }
    }

    /// Records the first use of the attenuated token whose last block has revocation id `leaf`.
    pub fn attenuation_seen(&self, origin: &Origin, token_id: &str, leaf: &str, blocks: usize) {
        {
            let mut state = self.shared.lock();
            if state.seen.contains(leaf) {
                return;
            }
            if state.seen.len() >= MAX_SEEN {
                state.seen.clear();
            }
            state.seen.insert(leaf.to_owned());
            // Like denials: the first new attenuation of a token in an interval is recorded at
            // once, the rest are counted, so a holder minting attenuations offline cannot grow
            // the log at its request rate.
            let window = &mut state.window;
            if window.opened.is_none() {
                window.opened = Some(Instant::now());
            }
            if let Some(count) = window.attenuations.get_mut(token_id) {
                *count += 1;
                return;
            }
            if window.attenuations.len() >= MAX_TOKEN_PAIRS {
                window.attenuation_overflow += 1;
                return;
            }
            window.attenuations.insert(token_id.to_owned(), 1);
            state.events.push(json!({
                "kind": "token_attenuation_seen", "token_id": token_id, "leaf_id": leaf, "blocks": blocks,
                "source": origin.as_str(),
            }));
        }
        self.shared.wake.notify_one();
    }

    /// Writes what is pending (closing the current interval) and stops the writer.
    pub fn stop(&self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_one();
        let writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(writer) = writer {
            let _ = writer.join();
        }
    }
}

impl Drop for SecurityLog {
    fn drop(&mut self) {
        self.stop();
    }
}

fn write_loop(shared: &Shared, log: &AuditLog) {
    loop {
        let (events, acks, stop) = {
            let mut state = shared.lock();
            loop {
                let due = state.window.opened.is_some_and(|t| t.elapsed() >= shared.window);
                if due || state.stop {
                    let closing = state.window.close();
                    state.events.extend(closing);
                }
                if !state.events.is_empty() || state.stop {
                    break;
                }
                let wait = state.window.opened.map_or(Duration::from_secs(3600), |t| {
                    shared.window.saturating_sub(t.elapsed()).max(Duration::from_millis(1))
                });
                state = shared.wake.wait_timeout(state, wait).unwrap_or_else(PoisonError::into_inner).0;
            }
            (std::mem::take(&mut state.events), std::mem::take(&mut state.acks), state.stop)
        };
        let written = events.is_empty()
            || match log.append_batch(&events) {
                Ok(_) => true,
                Err(e) => {
                    metrics::counter!("referee_gateway_audit_failures_total").increment(1);
                    tracing::error!(error = %e, events = events.len(), "writing security events to the audit log failed");
                    false
                }
            };
        for ack in acks {
            let _ = ack.send(written);
        }
        if stop {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log() -> (tempfile::TempDir, AuditLog) {
        let dir = tempfile::tempdir().unwrap();
        let db = redb::Database::create(dir.path().join("state.redb")).unwrap();
        let log = AuditLog::new(Arc::new(db)).unwrap();
        (dir, log)
    }

    fn kinds(log: &AuditLog) -> Vec<String> {
        log.tail(100_000).unwrap().iter().map(|r| r.event["kind"].as_str().unwrap_or_default().to_owned()).collect()
    }

    #[test]
    fn a_flood_of_denials_adds_a_bounded_number_of_records() {
        let (_dir, audit) = log();
        let security = SecurityLog::with_window(audit.clone(), Duration::from_millis(50));
        let started = Instant::now();
        let mut intervals = 1;
        let mut last = Instant::now();
        // 100k denials: most from one source, the rest from 1,000 distinct ones.
        for i in 0..100_000u32 {
            let source = if i % 10 == 0 { format!("10.0.0.{}", i / 10 % 1000) } else { "192.0.2.7".to_owned() };
            let origin = Origin(Arc::from(source));
            let reason = if i % 3 == 0 { "invalid_token" } else { "forbidden" };
            security.denied(&origin, reason, None, "/v1/tools/fs_read", "x");
            if last.elapsed() >= Duration::from_millis(50) {
                intervals += 1;
                last = Instant::now();
            }
        }
        // A privileged record in the middle of the flood is kept, in order.
        security.record_now(json!({"kind": "gateway_tool", "tool": "fs_write"}));
        security.stop();
        let elapsed = started.elapsed();
        let records = audit.verify().unwrap().unwrap().records as usize;
        let bound = (2 * MAX_PAIRS + 1) * (intervals + 2);
        assert!(records <= bound, "{records} records for 100k denials over {elapsed:?} ({intervals} intervals)");
        let kinds = kinds(&audit);
        assert!(kinds.iter().any(|k| k == "gateway_tool"));
        assert!(kinds.iter().any(|k| k == "gateway_denied_repeated"));
        // Every denial is counted: first records plus repeats plus overflow.
        let total: u64 = audit
            .tail(100_000)
            .unwrap()
            .iter()
            .map(|r| match r.event["kind"].as_str() {
                Some("gateway_denied") => 1,
                Some("gateway_denied_repeated") => r.event["count"].as_u64().unwrap_or(0),
                _ => 0,
            })
            .sum();
        assert_eq!(total, 100_000);
    }

    #[tokio::test]
    async fn a_privileged_record_is_durable_when_record_returns() {
        let (_dir, audit) = log();
        let security = SecurityLog::start(audit.clone());
        security.record(json!({"kind": "token_mint", "id": "abc"})).await;
        // Read without stopping the writer: the record is already committed.
        assert_eq!(kinds(&audit), ["token_mint"]);
        // The first denial of a pair is written at once; repeats wait for the interval.
        security.denied(&Origin::unknown(), "forbidden", Some("abc"), "/v1/tokens", "this needs an admin token");
        security.denied(&Origin::unknown(), "forbidden", Some("abc"), "/v1/tokens", "this needs an admin token");
        security.record(json!({"kind": "gateway_tool"})).await;
        assert_eq!(kinds(&audit), ["token_mint", "gateway_denied", "gateway_tool"]);
        security.stop();
        assert_eq!(kinds(&audit), ["token_mint", "gateway_denied", "gateway_tool", "gateway_denied_repeated"]);
        assert!(audit.verify().unwrap().is_ok());
    }

    #[test]
    fn an_attenuated_token_is_recorded_once_and_a_flood_of_them_is_counted() {
        let (_dir, audit) = log();
        let security = SecurityLog::start(audit.clone());
        for _ in 0..3 {
            security.attenuation_seen(&Origin::unknown(), "root-id", "leaf-id", 2);
        }
        // One holder appending a fresh block to every request: one record, then a count.
        for i in 0..10_000 {
            security.attenuation_seen(&Origin::unknown(), "other-root", &format!("leaf-{i}"), 2);
        }
        security.stop();
        assert_eq!(
            kinds(&audit),
            ["token_attenuation_seen", "token_attenuation_seen", "token_attenuation_seen_repeated"]
        );
        let tail = audit.tail(1).unwrap();
        assert_eq!(tail[0].event["count"], 9_999);
    }

    #[test]
    fn sources_without_a_token_cannot_crowd_out_a_tokens_denials() {
        let (_dir, audit) = log();
        let security = SecurityLog::start(audit.clone());
        for i in 0..200 {
            let origin = Origin(Arc::from(format!("127.2.0.{i}")));
            security.denied(&origin, "invalid_token", None, "/v1/stats", "junk");
        }
        let origin = Origin(Arc::from("127.0.0.1"));
        for target in ["/acme/secret", "/other", "/other/evil"] {
            security.denied(&origin, "forbidden", Some("real-token"), target, "outside its subtrees");
        }
        security.stop();
        let records = audit.tail(1000).unwrap();
        let first = records.iter().find(|r| r.event["token_id"] == "real-token" && r.event["kind"] == "gateway_denied");
        assert_eq!(first.unwrap().event["target"], "/acme/secret");
        let rest = records.iter().find(|r| r.event["token_id"] == "real-token" && r.event["kind"] != "gateway_denied");
        assert_eq!(rest.unwrap().event["targets"], json!(["/other", "/other/evil"]));
        assert!(records.len() <= 2 * MAX_PAIRS + 4, "{}", records.len());
    }

    #[test]
    fn a_tenant_with_many_tokens_cannot_crowd_out_another_tokens_denials() {
        let (_dir, audit) = log();
        let security = SecurityLog::start(audit.clone());
        let origin = Origin(Arc::from("127.0.0.1"));
        for reason in ["forbidden", "reality_violation", "rate_limited"] {
            for i in 0..100 {
                security.denied(&origin, reason, Some(&format!("attacker-{i}")), "fs_write", "x");
            }
        }
        security.denied(&origin, "forbidden", Some("victim"), "exec", "not allowed");
        security.stop();
        let records = audit.tail(1000).unwrap();
        assert!(records.iter().any(|r| r.event["token_id"] == "victim" && r.event["target"] == "exec"));
        assert_eq!(records.len(), 301);
    }
}

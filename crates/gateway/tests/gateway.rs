//! The gateway in-process over real TCP and Unix sockets: auth, tools, batches, muscles,
//! limits, metrics, OpenAPI, shutdown. Clients are raw HTTP/1.1 so nothing hides a header.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing, reason = "test helpers")]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use referee_gateway::auth::{Grant, Narrowing, attenuate, now_unix};
use referee_gateway::{Gateway, GatewayConfig, Server};
use referee_muscle::MuscleSpec;
use referee_runtime::{Runtime, RuntimeOptions};
use referee_tools::{CallScope, SharedTool, Tool, ToolAnnotations, ToolError, ToolOutput, ToolSpec};
use referee_trust::Home;
use serde_json::{Value, json};

const FEANOR_WAT: &str = include_str!("../../../examples/feanor.wat");
const LINEAR_WAT: &str = include_str!("../../../examples/linear-trainable.wat");

/// A test tool whose behaviour is a closure.
/// What a test tool does.
type Behaviour = Box<dyn Fn(Value, &CallScope) -> Result<ToolOutput, ToolError> + Send + Sync>;

struct FnTool {
    spec: ToolSpec,
    run: Behaviour,
}

impl Tool for FnTool {
    fn spec(&self) -> &ToolSpec {
        &self.spec
    }
    fn call(&self, params: Value, scope: &CallScope) -> Result<ToolOutput, ToolError> {
        (self.run)(params, scope)
    }
}

fn tool(
    name: &str,
    run: impl Fn(Value, &CallScope) -> Result<ToolOutput, ToolError> + Send + Sync + 'static,
) -> SharedTool {
    Arc::new(FnTool {
        spec: ToolSpec {
            name: name.into(),
            description: format!("test tool {name}"),
            input_schema: json!({"type": "object"}),
            output_schema: json!({"type": "object"}),
            annotations: ToolAnnotations { read_only: true, destructive: false, idempotent: true, open_world: false },
            torsion: 0.0,
        },
        run: Box::new(run),
    })
}

fn out(data: Value) -> Result<ToolOutput, ToolError> {
    Ok(ToolOutput { data, reality_index: 1.0, torsion: 0.0 })
}

/// Lets a test hold a call in flight: the tool reports entry, then waits for release.
#[derive(Clone)]
struct Gate {
    entered: Arc<Mutex<mpsc::Sender<()>>>,
    release: Arc<Mutex<mpsc::Receiver<()>>>,
}

fn gate() -> (Gate, mpsc::Receiver<()>, mpsc::Sender<()>) {
    let (entered_tx, entered_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel();
    (
        Gate { entered: Arc::new(Mutex::new(entered_tx)), release: Arc::new(Mutex::new(release_rx)) },
        entered_rx,
        release_tx,
    )
}

fn test_tools(gate: Gate) -> Vec<SharedTool> {
    vec![
        tool("echo", |params, scope| {
            let prefixes =
                scope.path_prefixes.as_ref().map(|p| p.iter().map(|p| p.display().to_string()).collect::<Vec<_>>());
            out(json!({ "params": params, "prefixes": prefixes }))
        }),
        tool("other", |_, _| out(json!({}))),
        tool("escape", |_, _| Err(ToolError::RealityViolation("../../etc/passwd escapes the root".into()))),
        tool("sleep", |params, _| {
            let ms = params.get("ms").and_then(Value::as_u64).unwrap_or(0);
            std::thread::sleep(Duration::from_millis(ms));
            out(json!({ "slept": ms }))
        }),
        tool("gate", move |_, _| {
            gate.entered.lock().unwrap().send(()).unwrap();
            gate.release.lock().unwrap().recv().unwrap();
            out(json!({ "released": true }))
        }),
    ]
}

struct Running {
    home: tempfile::TempDir,
    tcp: SocketAddr,
    unix: PathBuf,
    admin: String,
    gateway: Arc<Gateway>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    entered: mpsc::Receiver<()>,
    release: mpsc::Sender<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Running {
    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }

    fn home(&self) -> Home {
        Home::new(self.home.path())
    }

    fn token(&self, grant: &Grant) -> String {
        self.gateway.authority().mint(grant).unwrap().0
    }
}

fn seal(home: &Home, wat: &str, name: &str, version: u64) -> Vec<u8> {
    let wasm = wat::parse_str(wat).unwrap();
    let mut spec = MuscleSpec::new(name, &[1, 4], &[1, 1]);
    spec.version = version;
    home.seal_for_self(&spec, &wasm).unwrap()
}

fn start(tune: impl FnOnce(&mut GatewayConfig)) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let home = Home::new(dir.path());
    home.keygen().unwrap();
    let runtime = Arc::new(Runtime::open(&home, RuntimeOptions::default()).unwrap());
    runtime.load(&seal(&home, FEANOR_WAT, "feanor", 1)).unwrap();
    let mut config = GatewayConfig::default();
    config.listen.tcp = Some("127.0.0.1:0".parse().unwrap());
    tune(&mut config);
    let (g, entered, release) = gate();
    let gateway = Arc::new(Gateway::new(&home, runtime, test_tools(g), config).unwrap());
    let admin = gateway.authority().mint(&Grant::admin("test", None)).unwrap().0;
    let (ready_tx, ready_rx) = mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let socket = dir.path().join("gw.sock");
    let (gw, sock) = (gateway.clone(), socket.clone());
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            let tcp = gw.config().listen.tcp;
            let server = Server::bind(gw, tcp, Some(sock)).await.unwrap();
            ready_tx.send(server.tcp_addr().unwrap()).unwrap();
            server
                .run(async {
                    let _ = stop_rx.await;
                })
                .await
                .unwrap();
        });
    });
    let tcp = ready_rx.recv().unwrap();
    Running {
        home: dir,
        tcp,
        unix: socket,
        admin,
        gateway,
        stop: Some(stop_tx),
        thread: Some(thread),
        entered,
        release,
    }
}

/// A parsed HTTP response.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

enum Via<'a> {
    Tcp(SocketAddr),
    Unix(&'a Path),
}

fn http(via: Via<'_>, method: &str, path: &str, token: Option<&str>, content_type: &str, body: &[u8]) -> Reply {
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Type: {content_type}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut raw = Vec::new();
    match via {
        Via::Tcp(addr) => {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(head.as_bytes()).unwrap();
            // The server may answer (413) before reading a large body and close; ignore that.
            let _ = s.write_all(body);
            s.read_to_end(&mut raw).unwrap();
        }
        Via::Unix(path) => {
            let mut s = UnixStream::connect(path).unwrap();
            s.write_all(head.as_bytes()).unwrap();
            let _ = s.write_all(body);
            s.read_to_end(&mut raw).unwrap();
        }
    }
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("response head");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines.next().unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':').map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned())))
        .collect::<Vec<_>>();
    let mut body = raw[split + 4..].to_vec();
    if headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked")) {
        body = dechunk(&body);
    }
    Reply { status, headers, body }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n").unwrap();
        let size = usize::from_str_radix(std::str::from_utf8(&data[..line_end]).unwrap().trim(), 16).unwrap();
        data = &data[line_end + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

impl Running {
    fn get(&self, path: &str, token: Option<&str>) -> Reply {
        http(Via::Tcp(self.tcp), "GET", path, token, "application/json", b"")
    }
    fn post(&self, path: &str, token: Option<&str>, body: &Value) -> Reply {
        http(Via::Tcp(self.tcp), "POST", path, token, "application/json", body.to_string().as_bytes())
    }
}

#[test]
fn health_and_routes_answer_on_tcp_and_the_unix_socket() {
    let s = start(|_| {});
    let tcp = s.get("/health", None);
    assert_eq!(tcp.status, 200);
    assert_eq!(tcp.json()["status"], "ok");
    assert!(tcp.header("x-request-id").is_some_and(|id| !id.is_empty()), "{:?}", tcp.headers);
    let unix = http(Via::Unix(&s.unix), "GET", "/health", None, "application/json", b"");
    assert_eq!(unix.status, 200);
    let mode = std::fs::metadata(&s.unix).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // Same router: an authenticated call over the socket.
    let call = http(
        Via::Unix(&s.unix),
        "POST",
        "/v1/muscles/feanor/invoke",
        Some(&s.admin),
        "application/json",
        br#"{"input": [1, 2, 3, 4]}"#,
    );
    assert_eq!(call.status, 200, "{}", call.text());
    // relu(0.5*1 - 0.25*2 + 0.125*3 + 1.0*4 + 0.1) = 4.475
    let y = call.json()["data"]["output"][0].as_f64().unwrap();
    assert!((y - 4.475).abs() < 1e-5, "{y}");
    assert_eq!(s.get("/nope", None).status, 404);
}

#[test]
fn tokens_are_required_and_checked() {
    let s = start(|_| {});
    let no = s.get("/v1/tools", None);
    assert_eq!(no.status, 401);
    assert_eq!(no.json()["error"]["code"], "unauthenticated");
    assert_eq!(no.header("www-authenticate"), Some("Bearer"));
    assert_eq!(s.get("/v1/tools", Some("garbage")).json()["error"]["code"], "invalid_token");

    let expired = s.token(&Grant { expires_at: Some(now_unix() - 5), ..Grant::admin("old", None) });
    assert_eq!(s.get("/v1/tools", Some(&expired)).json()["error"]["code"], "token_refused");

    let echo_only = s.token(&Grant { tools: vec!["echo".into()], paths: vec!["*".into()], ..Grant::default() });
    let wider =
        attenuate(&echo_only, &Narrowing { tools: vec!["echo".into(), "other".into()], ..Narrowing::default() })
            .unwrap();
    assert_eq!(s.post("/v1/tools/echo", Some(&wider), &json!({})).status, 200);
    let r = s.post("/v1/tools/other", Some(&wider), &json!({}));
    assert_eq!(r.status, 403, "attenuation must not widen: {}", r.text());

    // Revocation of the parent revokes the attenuated child too.
    let id = referee_gateway::auth::token_id(&echo_only).unwrap();
    let revoke = s.post(&format!("/v1/tokens/{id}/revoke"), Some(&s.admin), &json!({}));
    assert_eq!(revoke.status, 204, "{}", revoke.text());
    assert_eq!(s.post("/v1/tools/echo", Some(&wider), &json!({})).json()["error"]["code"], "token_revoked");
    assert_eq!(s.post("/v1/tools/echo", Some(&echo_only), &json!({})).status, 401);
    // A non-admin token cannot mint or revoke.
    let user = s.token(&Grant { tools: vec!["*".into()], ..Grant::default() });
    assert_eq!(s.post("/v1/tokens", Some(&user), &json!({"tools": ["*"]})).status, 403);
}

#[test]
fn tool_lists_are_filtered_and_calls_carry_the_seed_shape() {
    let s = start(|_| {});
    let names = |token: &str| -> Vec<String> {
        let r = s.get("/v1/tools", Some(token));
        assert_eq!(r.status, 200);
        r.json()["tools"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap().to_owned()).collect()
    };
    let all = names(&s.admin);
    for expected in ["echo", "other", "escape", "sleep", "gate", "muscle.feanor"] {
        assert!(all.contains(&expected.to_owned()), "{expected} missing from {all:?}");
    }
    let limited = s.token(&Grant {
        tools: vec!["echo".into()],
        muscles: vec!["feanor".into()],
        paths: vec!["/srv/data".into()],
        ..Grant::default()
    });
    assert_eq!(names(&limited), vec!["echo", "muscle.feanor"]);

    let r = s.post("/tool", Some(&limited), &json!({"tool": "echo", "params": {"a": 1}}));
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["status"], "SUCCESS");
    assert_eq!(v["data"]["params"], json!({"a": 1}));
    assert_eq!(v["data"]["prefixes"], json!(["/srv/data"]));
    assert_eq!(v["reality_index"], 1.0);
    assert_eq!(v["torsion_score"], 0.0);
    assert!(v["execution_time_ms"].as_f64().unwrap() >= 0.0);
    assert_eq!(s.post("/tool", Some(&limited), &json!({"tool": "other"})).status, 403);
    assert_eq!(s.post("/tool", Some(&s.admin), &json!({"tool": "nope"})).status, 404);

    // A reality violation is refused and counted.
    let r = s.post("/v1/tools/escape", Some(&s.admin), &json!({}));
    assert_eq!((r.status, r.json()["error"]["code"].clone()), (403, json!("reality_violation")));
    let stats = s.get("/v1/stats", Some(&s.admin)).json();
    assert_eq!(stats["total_requests"], 4);
    assert_eq!(stats["successful_requests"], 1);
    assert_eq!(stats["reality_violations"], 1);
    // One success at 1.0, one violation at 0.0.
    assert_eq!(stats["avg_reality_index"], 0.5);
    let vdr = s.get("/vdr", Some(&s.admin)).json();
    assert_eq!(vdr["status"], "DEGRADED");
    assert!(vdr["vdr_score"].is_null());
}

#[test]
fn batches_keep_request_order_and_are_bounded() {
    let s = start(|c| c.limits.batch_max = 4);
    // The first item finishes last; results must still come back in request order.
    let body = json!({"requests": [
        {"tool": "sleep", "params": {"ms": 150}},
        {"tool": "sleep", "params": {"ms": 0}},
        {"tool": "nope"},
        {"tool": "echo", "params": {"i": 3}},
    ]});
    for path in ["/batch", "/v1/batch"] {
        let r = s.post(path, Some(&s.admin), &body);
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        assert_eq!(v["batch_size"], 4);
        let results = v["results"].as_array().unwrap();
        assert_eq!(results[0]["data"]["slept"], 150);
        assert_eq!(results[1]["data"]["slept"], 0);
        assert_eq!((results[2]["status"].clone(), results[2]["http_status"].clone()), (json!("ERROR"), json!(404)));
        assert_eq!(results[3]["data"]["params"]["i"], 3);
    }
    let too_many = json!({"requests": vec![json!({"tool": "echo"}); 5]});
    assert_eq!(s.post("/batch", Some(&s.admin), &too_many).status, 413);
}

#[test]
fn muscles_list_invoke_train_upload_and_unload() {
    let s = start(|_| {});
    let list = s.get("/v1/muscles", Some(&s.admin)).json();
    assert_eq!(list["muscles"][0]["name"], "feanor");
    assert_eq!(list["muscles"][0]["inputs"], 4);

    // Upload a trainable muscle sealed with the home's keys: full verification, then callable.
    let blob = seal(&s.home(), LINEAR_WAT, "linear", 1);
    let up = http(Via::Tcp(s.tcp), "POST", "/v1/muscles", Some(&s.admin), "application/octet-stream", &blob);
    assert_eq!(up.status, 201, "{}", up.text());
    assert_eq!(up.json()["tools"], json!(["muscle.linear", "train.linear"]));
    // Tampered blob: refused by the open pipeline.
    let mut bad = blob.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    let refused = http(Via::Tcp(s.tcp), "POST", "/v1/muscles", Some(&s.admin), "application/octet-stream", &bad);
    assert_eq!(refused.status, 422, "{}", refused.text());
    // Only admins upload.
    let user = s.token(&Grant { muscles: vec!["*".into()], ..Grant::default() });
    let denied = http(Via::Tcp(s.tcp), "POST", "/v1/muscles", Some(&user), "application/octet-stream", &blob);
    assert_eq!(denied.status, 403);

    // Training on y = 2 for x = e0 lowers the loss step after step.
    let step = |lr: f64| {
        let r =
            s.post("/v1/muscles/linear/train", Some(&user), &json!({"input": [1, 0, 0, 0], "target": [2], "lr": lr}));
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["data"]["loss"].as_f64().unwrap()
    };
    let first = step(0.1);
    let mut last_loss = first;
    for _ in 0..5 {
        last_loss = step(0.1);
    }
    assert!(last_loss < first, "loss {first} -> {last_loss}");
    let wrong = s.post("/v1/muscles/feanor/invoke", Some(&user), &json!({"input": [1, 2, 3]}));
    assert_eq!(wrong.status, 400, "{}", wrong.text());

    let del = http(Via::Tcp(s.tcp), "DELETE", "/v1/muscles/linear", Some(&s.admin), "application/json", b"");
    assert_eq!(del.status, 204);
    assert_eq!(s.post("/v1/muscles/linear/invoke", Some(&user), &json!({"input": [1, 0, 0, 0]})).status, 404);
    assert_eq!(s.get("/v1/muscles/linear", Some(&user)).status, 404);
}

#[test]
fn bodies_over_the_limit_get_413() {
    let s = start(|c| c.limits.body_bytes = 1024);
    let big = json!({"tool": "echo", "params": {"pad": "x".repeat(4096)}});
    let r = s.post("/tool", Some(&s.admin), &big);
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(s.post("/tool", Some(&s.admin), &json!({"tool": "echo"})).status, 200);
}

#[test]
fn rate_limits_answer_429_with_retry_after() {
    let s = start(|c| {
        c.limits.rate_per_second = 0.5;
        c.limits.burst = 2;
    });
    assert_eq!(s.get("/v1/stats", Some(&s.admin)).status, 200);
    assert_eq!(s.get("/v1/stats", Some(&s.admin)).status, 200);
    let r = s.get("/v1/stats", Some(&s.admin));
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"]["code"], "rate_limited");
    // At 0.5/s an empty bucket needs 2 s for the next token.
    assert_eq!(r.header("retry-after"), Some("2"));
    // Another token has its own bucket; public routes are not limited.
    let other = s.token(&Grant::admin("other", None));
    assert_eq!(s.get("/v1/stats", Some(&other)).status, 200);
    assert_eq!(s.get("/health", None).status, 200);
}

#[test]
fn concurrency_per_token_is_bounded_and_shutdown_drains() {
    let mut s = start(|c| c.limits.concurrency = 1);
    let (addr, admin) = (s.tcp, s.admin.clone());
    let held = std::thread::spawn(move || {
        http(Via::Tcp(addr), "POST", "/v1/tools/gate", Some(&admin), "application/json", b"{}")
    });
    s.entered.recv().unwrap();
    let r = s.post("/v1/tools/echo", Some(&s.admin), &json!({}));
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"]["code"], "too_many_in_flight");
    assert_eq!(r.header("retry-after"), Some("1"));
    // Shut down while the call is in flight: it must still complete.
    let stop = s.stop.take().unwrap();
    stop.send(()).unwrap();
    s.release.send(()).unwrap();
    let done = held.join().unwrap();
    assert_eq!(done.status, 200, "{}", done.text());
    assert_eq!(done.json()["data"]["released"], true);
    s.shutdown();
    assert!(TcpStream::connect(s.tcp).is_err(), "listener must be closed after shutdown");
    assert!(!s.unix.exists(), "socket file must be removed");
}

#[test]
fn slow_tools_time_out_with_504() {
    let s = start(|c| c.limits.tool_timeout_ms = 50);
    let r = s.post("/v1/tools/sleep", Some(&s.admin), &json!({"ms": 2000}));
    assert_eq!(r.status, 504, "{}", r.text());
}

/// A tool stuck in a call (here: until released) holds one blocking thread: other calls still
/// answer, and the stuck call's own caller gets its 504 at the deadline.
#[test]
fn a_stuck_tool_does_not_stall_other_calls_and_times_out() {
    let s = start(|c| c.limits.tool_timeout_ms = 300);
    let (addr, admin) = (s.tcp, s.admin.clone());
    let held = std::thread::spawn(move || {
        http(Via::Tcp(addr), "POST", "/v1/tools/gate", Some(&admin), "application/json", b"{}")
    });
    s.entered.recv().unwrap();
    for i in 0..20 {
        let r = s.post("/v1/tools/echo", Some(&s.admin), &json!({ "i": i }));
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let stuck = held.join().unwrap();
    assert_eq!(stuck.status, 504, "{}", stuck.text());
    assert_eq!(stuck.json()["error"]["code"], "timeout");
    s.release.send(()).unwrap();
}

#[test]
fn metrics_count_calls_by_tool_and_status() {
    let s = start(|_| {});
    assert_eq!(s.post("/v1/tools/echo", Some(&s.admin), &json!({})).status, 200);
    assert_eq!(s.post("/v1/tools/escape", Some(&s.admin), &json!({})).status, 403);
    let text = s.get("/metrics", None).text();
    assert!(text.contains("referee_gateway_calls_total{"), "{text}");
    let has = |tool: &str, status: &str| {
        text.lines().any(|l| {
            l.starts_with("referee_gateway_calls_total{")
                && l.contains(&format!("tool=\"{tool}\""))
                && l.contains(&format!("status=\"{status}\""))
        })
    };
    assert!(has("echo", "ok"), "{text}");
    assert!(has("escape", "reality_violation"), "{text}");
    assert!(text.contains("referee_gateway_call_duration_seconds_bucket{"), "{text}");
    assert!(text.contains("referee_gateway_muscles_loaded 1"), "{text}");
}

#[test]
fn openapi_document_is_3_1_and_lists_every_route() {
    let s = start(|_| {});
    let doc = s.get("/openapi.json", None).json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"), "{}", doc["openapi"]);
    let paths = doc["paths"].as_object().unwrap();
    for p in [
        "/health",
        "/metrics",
        "/tool",
        "/batch",
        "/v1/batch",
        "/v1/tools",
        "/v1/tools/{tool}",
        "/v1/stats",
        "/vdr",
        "/v1/muscles",
        "/v1/muscles/{name}",
        "/v1/muscles/{name}/invoke",
        "/v1/muscles/{name}/train",
        "/v1/tokens",
    ] {
        assert!(paths.contains_key(p), "{p} missing");
    }
    assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
}

#[test]
fn mcp_over_http_lists_and_calls_tools_for_the_token() {
    let s = start(|_| {});
    let limited = s.token(&Grant { tools: vec!["echo".into()], muscles: vec!["feanor".into()], ..Grant::default() });
    let rpc = |token: Option<&str>, body: Value| {
        let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
        let body = body.to_string();
        let head = format!(
            "POST /mcp HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Type: application/json\r\n\
             Accept: application/json, text/event-stream\r\nMCP-Protocol-Version: 2025-06-18\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let mut stream = TcpStream::connect(s.tcp).unwrap();
        stream.write_all(head.as_bytes()).unwrap();
        let mut raw = String::new();
        stream.read_to_string(&mut raw).unwrap();
        raw
    };
    assert!(rpc(None, json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"})).starts_with("HTTP/1.1 401"));
    let init = rpc(
        Some(&limited),
        json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}),
    );
    assert!(init.starts_with("HTTP/1.1 200"), "{init}");
    let list = rpc(Some(&limited), json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}));
    assert!(list.starts_with("HTTP/1.1 200"), "{list}");
    assert!(list.contains("\"muscle.feanor\"") && list.contains("\"echo\"") && !list.contains("\"other\""), "{list}");
    assert!(list.contains("readOnlyHint"), "{list}");
    let call = rpc(
        Some(&limited),
        json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "muscle.feanor", "arguments": {"input": [1, 2, 3, 4]}}}),
    );
    let body: Value = serde_json::from_str(call.split_once("\r\n\r\n").unwrap().1).unwrap();
    assert_eq!(body["result"]["isError"], false, "{call}");
    let y = body["result"]["structuredContent"]["output"][0].as_f64().unwrap();
    assert!((y - 4.475).abs() < 1e-5, "{call}");
}

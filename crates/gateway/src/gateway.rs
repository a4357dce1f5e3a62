//! The state every surface shares and the one call path REST, batch and MCP all go through:
//! permission → resolve → run on the blocking pool with a deadline → stats and metrics.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::PrometheusHandle;
use referee_runtime::Runtime;
use referee_tools::{CallScope, SharedTool, ToolError};
use referee_trust::Home;
use serde::Serialize;
use serde_json::{Value, json};

use crate::audit::{Origin, SecurityLog};
use crate::auth::{AuthError, Authority, Scope};
use crate::config::GatewayConfig;
use crate::limits::Limiter;
use crate::registry::{Registry, Target, runtime_to_tool};
use crate::store::{GatewayStore, STORE_FILE, StoreError};

/// An error as every HTTP surface returns it: a status, a stable code and a message that says
/// what to do.
#[derive(Clone, Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code.
    pub code: &'static str,
    /// Human-readable explanation.
    pub message: String,
    /// Seconds to wait before retrying (429).
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// An error with no retry hint.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), retry_after: None }
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        json!({ "status": "ERROR", "error": { "code": self.code, "message": self.message } })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(secs) = self.retry_after
            && let Ok(value) = axum::http::HeaderValue::from_str(&secs.to_string())
        {
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, value);
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(axum::http::header::WWW_AUTHENTICATE, axum::http::HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        let (status, code) = match e.cause() {
            AuthError::Missing => (StatusCode::UNAUTHORIZED, "unauthenticated"),
            AuthError::Invalid(_) => (StatusCode::UNAUTHORIZED, "invalid_token"),
            AuthError::Refused(_) => (StatusCode::UNAUTHORIZED, "token_refused"),
            AuthError::Revoked(_) => (StatusCode::UNAUTHORIZED, "token_revoked"),
            AuthError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            AuthError::Busy(_) => (StatusCode::SERVICE_UNAVAILABLE, "busy"),
            AuthError::Build(_) => (StatusCode::BAD_REQUEST, "bad_grant"),
            AuthError::Key { .. } | AuthError::Store(_) | AuthError::Cached(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        };
        let busy = status == StatusCode::SERVICE_UNAVAILABLE;
        Self { retry_after: busy.then_some(1), ..Self::new(status, code, e.to_string()) }
    }
}

impl From<ToolError> for ApiError {
    fn from(e: ToolError) -> Self {
        let (status, code) = match &e {
            ToolError::InvalidParams(_) => (StatusCode::BAD_REQUEST, "invalid_params"),
            ToolError::RealityViolation(_) => (StatusCode::FORBIDDEN, "reality_violation"),
            ToolError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ToolError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ToolError::AlreadyExists(_) => (StatusCode::CONFLICT, "already_exists"),
            ToolError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            ToolError::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
            ToolError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ToolError::Failed(_) => (StatusCode::INTERNAL_SERVER_ERROR, "tool_failed"),
        };
        Self::new(status, code, e.to_string())
    }
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Tokens or root key.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// The gateway store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A listener could not be bound or configured.
    #[error("listen on {what}: {source}")]
    Listen {
        /// The address or socket path.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// A successful call.
#[derive(Clone, Debug, Serialize)]
pub struct CallOutcome {
    /// The tool's result.
    pub data: Value,
    /// 1.0 when every path passed the reality check.
    pub reality_index: f64,
    /// Wall-clock time of the call, milliseconds.
    pub execution_time_ms: f64,
    /// The tool's cost class.
    pub torsion_score: f64,
}

/// Totals since start (lock-free).
#[derive(Debug, Default)]
pub(crate) struct Stats {
    total: AtomicU64,
    ok: AtomicU64,
    failed: AtomicU64,
    reality_violations: AtomicU64,
    /// Sum of reality indices of calls that reached a tool, in millionths.
    reality_sum: AtomicU64,
    /// Sum of torsion of successful calls, in millionths.
    torsion_sum: AtomicU64,
}

/// Stats as `/v1/stats` returns them.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct StatsReport {
    /// Tool calls received.
    pub total_requests: u64,
    /// Calls that succeeded.
    pub successful_requests: u64,
    /// Calls that failed or were refused.
    pub failed_requests: u64,
    /// Calls refused by the reality check.
    pub reality_violations: u64,
    /// Mean reality index of the calls that reached a tool (1.0 before any).
    pub avg_reality_index: f64,
    /// Mean torsion of the successful calls.
    pub avg_torsion: f64,
    /// Seconds since start.
    pub uptime_seconds: u64,
}

const MICRO: f64 = 1_000_000.0;

impl Stats {
    fn record(&self, outcome: &Result<CallOutcome, ApiError>) {
        self.total.fetch_add(1, Ordering::Relaxed);
        match outcome {
            Ok(o) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
                self.reality_sum.fetch_add((o.reality_index * MICRO) as u64, Ordering::Relaxed);
                self.torsion_sum.fetch_add((o.torsion_score * MICRO) as u64, Ordering::Relaxed);
            }
            Err(e) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                if e.code == "reality_violation" {
                    self.reality_violations.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    fn report(&self, uptime: Duration) -> StatsReport {
        let ok = self.ok.load(Ordering::Relaxed);
        let violations = self.reality_violations.load(Ordering::Relaxed);
        let reached = ok + violations;
        let mean = |sum: &AtomicU64, n: u64, empty: f64| {
            if n == 0 { empty } else { sum.load(Ordering::Relaxed) as f64 / MICRO / n as f64 }
        };
        StatsReport {
            total_requests: self.total.load(Ordering::Relaxed),
            successful_requests: ok,
            failed_requests: self.failed.load(Ordering::Relaxed),
            reality_violations: violations,
            avg_reality_index: mean(&self.reality_sum, reached, 1.0),
            avg_torsion: mean(&self.torsion_sum, ok, 0.0),
            uptime_seconds: uptime.as_secs(),
        }
    }
}

/// Checks of one token id (new tokens derived from it) waiting or running at once.
pub(crate) const PENDING_PER_TOKEN: usize = 4;
/// Longest wait for a verification slot.
pub(crate) const VERIFY_WAIT: Duration = Duration::from_secs(2);

/// One pending verification of a token id; leaves the count when dropped.
struct Pending<'a> {
    map: &'a Mutex<HashMap<u64, usize>>,
    id: u64,
}

impl<'a> Pending<'a> {
    fn enter(map: &'a Mutex<HashMap<u64, usize>>, id: u64) -> Option<Self> {
        let mut counts = map.lock().ok()?;
        let count = counts.entry(id).or_default();
        if *count >= PENDING_PER_TOKEN {
            return None;
        }
        *count += 1;
        Some(Self { map, id })
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if let Ok(mut counts) = self.map.lock()
            && let Some(count) = counts.get_mut(&self.id)
        {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(&self.id);
            }
        }
    }
}

fn verify_slots() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

/// The gateway: tools, tokens, limits and counters shared by every listener.
pub struct Gateway {
    registry: Registry,
    authority: Authority,
    /// Uncached verifications running at once (on the blocking pool, never the async workers).
    verifying: tokio::sync::Semaphore,
    /// Verifications waiting or running, per token id.
    pending: Mutex<HashMap<u64, usize>>,
    limiter: Limiter,
    stats: Stats,
    config: GatewayConfig,
    metrics: Option<PrometheusHandle>,
    started: Instant,
    security: SecurityLog,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").field("registry", &self.registry).finish_non_exhaustive()
    }
}

impl Gateway {
    /// A gateway over `runtime` and `native` tools, with tokens rooted in `home`.
    pub fn new(
        home: &Home,
        runtime: Arc<Runtime>,
        native: Vec<SharedTool>,
        config: GatewayConfig,
    ) -> Result<Self, StartError> {
        let store = Arc::new(GatewayStore::open(&home.root().join(STORE_FILE))?);
        let keys_dir = home.root().join("keys");
        let authority = Authority::open(&keys_dir, store, Duration::from_secs(config.auth.cache_ttl_secs))?;
        let l = &config.limits;
        let limiter = Limiter::new(l.rate_per_second, l.burst, l.concurrency);
        let window = Duration::from_millis(config.limits.denial_window_ms.max(100));
        let security = SecurityLog::with_window(runtime.audit().clone(), window);
        Ok(Self {
            security,
            registry: Registry::new(native, runtime),
            authority,
            verifying: tokio::sync::Semaphore::new(verify_slots()),
            pending: Mutex::new(HashMap::new()),
            limiter,
            stats: Stats::default(),
            metrics: crate::telemetry::prometheus(),
            config,
            started: Instant::now(),
        })
    }

    /// Tokens.
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// The security events in the audit log.
    pub fn security(&self) -> &SecurityLog {
        &self.security
    }

    /// Verifies a bearer token: from the caches when they know it. Else everything that can
    /// refuse it without a signature is checked here (bounded by the token's size); then its
    /// signatures are checked on the blocking pool, at most half the cores at once (at least
    /// one), so a flood of new tokens never takes the async workers that serve everyone else.
    /// At most four checks of one token id wait or run at once, and none waits longer than two
    /// seconds: past either, 503 with `Retry-After`. Outcomes are cached.
    pub async fn verify(self: &Arc<Self>, token: &str) -> Result<Arc<Scope>, AuthError> {
        if let Some(known) = self.authority.cached(token) {
            return known;
        }
        let inspected = match self.authority.inspect(token) {
            Ok(inspected) => inspected,
            Err(e) => return Err(self.authority.remember_refusal(token, e)),
        };
        // Counted by the authority block's bytes, which only a holder can present: a forger who
        // knows another token's (public) revocation id cannot use up that token's places.
        let key = self.authority.principal_key(&inspected);
        let Some(_pending) = Pending::enter(&self.pending, key) else {
            metrics::counter!("referee_gateway_refusals_total", "reason" => "verify_busy").increment(1);
            return Err(AuthError::Busy(format!(
                "{PENDING_PER_TOKEN} new tokens derived from this one are already being verified"
            )));
        };
        let Ok(Ok(_slot)) = tokio::time::timeout(VERIFY_WAIT, self.verifying.acquire()).await else {
            metrics::counter!("referee_gateway_refusals_total", "reason" => "verify_busy").increment(1);
            return Err(AuthError::Busy("too many new tokens are waiting to be verified".into()));
        };
        let (gw, token) = (self.clone(), token.to_owned());
        match tokio::task::spawn_blocking(move || gw.authority.finish(&token, inspected)).await {
            Ok(verified) => verified,
            Err(e) => Err(AuthError::Invalid(format!("verification did not finish: {e}"))),
        }
    }

    /// Per-token limits.
    pub fn limiter(&self) -> &Limiter {
        &self.limiter
    }

    /// Tools and muscles.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The configuration in force.
    pub fn config(&self) -> &GatewayConfig {
        &self.config
    }

    /// The runtime.
    pub fn runtime(&self) -> &Arc<Runtime> {
        self.registry.runtime()
    }

    /// Totals since start.
    pub fn stats(&self) -> StatsReport {
        self.stats.report(self.started.elapsed())
    }

    /// Prometheus exposition text.
    pub fn metrics_text(&self) -> String {
        let mut text = self.metrics.as_ref().map(PrometheusHandle::render).unwrap_or_default();
        let s = self.stats();
        text.push_str(&format!(
            "# TYPE referee_gateway_uptime_seconds gauge\nreferee_gateway_uptime_seconds {}\n\
             # TYPE referee_gateway_muscles_loaded gauge\nreferee_gateway_muscles_loaded {}\n\
             # TYPE referee_gateway_reality_violations_total counter\nreferee_gateway_reality_violations_total {}\n",
            s.uptime_seconds,
            self.runtime().list().len(),
            s.reality_violations
        ));
        text
    }

    /// Whether `scope` may call the tool `name` (names that do not exist are allowed here and
    /// refused by resolution, so refusals do not reveal which tools exist).
    pub fn permits(&self, scope: &Scope, name: &str) -> bool {
        match Target::parse(name).muscle() {
            Some(m) => scope.allows_muscle(m),
            None => scope.allows_tool(name),
        }
    }

    /// The tools `scope` may call.
    pub fn visible_tools(&self, scope: &Scope) -> Vec<SharedTool> {
        self.registry.all().into_iter().filter(|t| self.permits(scope, &t.spec().name)).collect()
    }

    /// Calls a tool for `scope`, from `origin`: the one path every surface uses. A refusal is
    /// recorded in the audit log as a denial; a call of a privileged tool (one not annotated
    /// read-only), whatever its outcome, is recorded before its answer is returned.
    pub async fn call(
        &self,
        scope: &Scope,
        origin: &Origin,
        name: &str,
        params: Value,
    ) -> Result<CallOutcome, ApiError> {
        let started = Instant::now();
        // Resolved once, and only for a caller who may call it (refusals reveal nothing).
        let tool = if self.permits(scope, name) { self.registry.get(name) } else { None };
        let privileged = tool.as_ref().is_some_and(|tool| !tool.spec().annotations.read_only);
        let detail = if privileged { crate::audit::call_detail(&params) } else { Value::Null };
        let result = self.call_inner(scope, name, tool, params, started).await;
        self.stats.record(&result);
        crate::telemetry::record_call(name, &result, started.elapsed());
        match &result {
            Err(e) if e.status == StatusCode::FORBIDDEN => {
                self.security.denied(origin, e.code, Some(&scope.id), name, &e.message);
            }
            _ if privileged => {
                let error = result.as_ref().err().map(|e| e.code);
                self.security
                    .record(json!({
                        "kind": "gateway_tool", "tool": name, "token_id": scope.id, "source": origin.as_str(),
                        "params": detail, "ok": error.is_none(), "error": error,
                    }))
                    .await;
            }
            _ => {}
        }
        result
    }

    async fn call_inner(
        &self,
        scope: &Scope,
        name: &str,
        tool: Option<SharedTool>,
        params: Value,
        started: Instant,
    ) -> Result<CallOutcome, ApiError> {
        if !self.permits(scope, name) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("the token does not allow `{name}`"),
            ));
        }
        let tool = tool.ok_or_else(|| {
            ApiError::new(StatusCode::NOT_FOUND, "unknown_tool", format!("no tool `{name}`; GET /v1/tools lists them"))
        })?;
        let timeout = Duration::from_millis(self.config.limits.tool_timeout_ms);
        let call_scope = CallScope {
            path_prefixes: scope.path_prefixes.clone(),
            node_prefixes: scope.node_prefixes.clone(),
            deadline: started.checked_add(timeout),
        };
        let task = tokio::task::spawn_blocking(move || tool.call(params, &call_scope));
        let output = match tokio::time::timeout(timeout, task).await {
            Err(_) => {
                return Err(ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "timeout",
                    format!("`{name}` did not finish within {} ms", timeout.as_millis()),
                ));
            }
            Ok(Err(join)) => {
                return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "tool_crashed", join.to_string()));
            }
            Ok(Ok(result)) => result?,
        };
        Ok(CallOutcome {
            data: output.data,
            reality_index: output.reality_index,
            execution_time_ms: started.elapsed().as_secs_f64() * 1000.0,
            torsion_score: output.torsion,
        })
    }

    /// Loads a sealed muscle through the full open pipeline.
    pub async fn upload(&self, sealed: Vec<u8>) -> Result<referee_runtime::MuscleInfo, ApiError> {
        let runtime = self.runtime().clone();
        let loaded = tokio::task::spawn_blocking(move || runtime.load(&sealed))
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "load_crashed", e.to_string()))?;
        loaded.map_err(|e| {
            use referee_runtime::RuntimeError as R;
            let status = match &e {
                R::Open(_) | R::Abi { .. } | R::Compile { .. } | R::CapabilityDenied { .. } => {
                    StatusCode::UNPROCESSABLE_ENTITY
                }
                _ => return ApiError::from(runtime_to_tool(e)),
            };
            ApiError::new(status, "muscle_refused", e.to_string())
        })
    }
}

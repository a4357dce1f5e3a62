//! REST routes, their OpenAPI 3.1 description, and the middleware in front of them
//! (request id, tracing, authentication, per-token limits, body limits).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::handler::Handler;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use futures_util::StreamExt;
use referee_runtime::MuscleInfo;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tower_http::classify::StatusInRangeAsFailures;
use tower_http::request_id::{MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

use crate::audit::Origin;
use crate::auth::{AuthError, Grant, Scope, now_unix};
use crate::gateway::{ApiError, CallOutcome, Gateway, StatsReport};
use crate::limits::Refusal;
use crate::registry::{MUSCLE_PREFIX, TRAIN_PREFIX};
use crate::store::TokenRecord;

type Shared = State<Arc<Gateway>>;
type Caller = Extension<Arc<Scope>>;
/// Where the request came from (set by the listener; `authenticate` makes sure it is there).
type Source = Extension<Origin>;

/// A tool call in the seeds' shape.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ToolRequest {
    /// Tool name (`GET /v1/tools`).
    pub tool: String,
    /// The tool's parameters (its input schema); default `{}`.
    #[serde(default = "empty_object")]
    #[schema(value_type = Object)]
    pub params: Value,
}

fn empty_object() -> Value {
    json!({})
}

/// A successful call in the seeds' shape.
#[derive(Debug, Serialize, ToSchema)]
pub struct ToolResponse {
    /// Always `SUCCESS` (errors use the error shape and an HTTP error status).
    pub status: String,
    /// The tool's result (its output schema).
    #[schema(value_type = Object)]
    pub data: Value,
    /// 1.0 when every path passed the reality check.
    pub reality_index: f64,
    /// Time spent in the call, milliseconds.
    pub execution_time_ms: f64,
    /// The tool's cost class: 0.0 native, 0.1 sandboxed.
    pub torsion_score: f64,
}

impl From<CallOutcome> for ToolResponse {
    fn from(o: CallOutcome) -> Self {
        Self {
            status: "SUCCESS".into(),
            data: o.data,
            reality_index: o.reality_index,
            execution_time_ms: o.execution_time_ms,
            torsion_score: o.torsion_score,
        }
    }
}

/// An error: `{"status": "ERROR", "error": {"code", "message"}}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorResponse {
    /// Always `ERROR`.
    pub status: String,
    /// What went wrong.
    pub error: ErrorDetail,
}

/// The error detail.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable code, e.g. `forbidden`, `invalid_params`, `rate_limited`.
    pub code: String,
    /// What went wrong and what to do.
    pub message: String,
}

/// Several calls at once.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    /// The calls; at most `limits.batch_max`.
    pub requests: Vec<ToolRequest>,
}

/// One batch item's result, in request order.
#[derive(Debug, Serialize, ToSchema)]
pub struct BatchItem {
    /// The tool called.
    pub tool: String,
    /// `SUCCESS` or `ERROR`.
    pub status: String,
    /// The HTTP status the call alone would have had.
    pub http_status: u16,
    /// The result on success.
    #[schema(value_type = Option<Object>)]
    pub data: Option<Value>,
    /// The error on failure.
    pub error: Option<ErrorDetail>,
    /// Reality index (0.0 on failure).
    pub reality_index: f64,
    /// Time of this call, milliseconds.
    pub execution_time_ms: f64,
    /// Cost class.
    pub torsion_score: f64,
}

/// A batch's results.
#[derive(Debug, Serialize, ToSchema)]
pub struct BatchResponse {
    /// One per request, in request order.
    pub results: Vec<BatchItem>,
    /// Wall-clock time of the whole batch, milliseconds.
    pub total_execution_time_ms: f64,
    /// Number of requests.
    pub batch_size: usize,
}

/// Liveness.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok`.
    pub status: String,
    /// Server version.
    pub version: String,
    /// Seconds since start.
    pub uptime_seconds: u64,
}

/// The seeds' VDR report.
#[derive(Debug, Serialize, ToSchema)]
pub struct VdrReport {
    /// The code's VDR score as configured (`vdr_score`), `null` if unknown.
    pub vdr_score: Option<f64>,
    /// Mean torsion of successful calls.
    pub avg_torsion: f64,
    /// Mean reality index.
    pub avg_reality_index: f64,
    /// `OPTIMAL` when the reality index is at least 0.95 and VDR (if known) at least 1.0, else `DEGRADED`.
    pub status: String,
}

/// MCP-style behaviour hints.
#[derive(Debug, Serialize, ToSchema)]
pub struct Annotations {
    /// Changes nothing.
    pub read_only: bool,
    /// May destroy or overwrite data.
    pub destructive: bool,
    /// Repeating has no further effect.
    pub idempotent: bool,
    /// Reaches outside the referee's world.
    pub open_world: bool,
}

/// A tool as listed.
#[derive(Debug, Serialize, ToSchema)]
pub struct ToolInfo {
    /// Name to call.
    pub name: String,
    /// What it does.
    pub description: String,
    /// JSON Schema of `params`.
    #[schema(value_type = Object)]
    pub input_schema: Value,
    /// JSON Schema of `data`.
    #[schema(value_type = Object)]
    pub output_schema: Value,
    /// Behaviour hints.
    pub annotations: Annotations,
    /// Cost class.
    pub torsion: f64,
}

/// The tools a token may call.
#[derive(Debug, Serialize, ToSchema)]
pub struct ToolList {
    /// Tools, native first.
    pub tools: Vec<ToolInfo>,
}

/// A loaded muscle.
#[derive(Debug, Serialize, ToSchema)]
pub struct MuscleView {
    /// Name.
    pub name: String,
    /// Version.
    pub version: u64,
    /// Publisher key id.
    pub publisher: String,
    /// SHA-256 of the code, hex.
    pub code_hash: String,
    /// Has a `train` entry.
    pub trainable: bool,
    /// Quarantined after faults.
    pub quarantined: bool,
    /// Successful calls.
    pub calls: u64,
    /// Faults.
    pub faults: u64,
    /// Input values per call.
    pub inputs: u64,
    /// Output values per call.
    pub outputs: u64,
    /// Tool names that reach it.
    pub tools: Vec<String>,
}

impl From<&MuscleInfo> for MuscleView {
    fn from(i: &MuscleInfo) -> Self {
        let h = &i.header;
        let mut tools = vec![format!("{MUSCLE_PREFIX}{}", h.name)];
        if i.trainable {
            tools.push(format!("{TRAIN_PREFIX}{}", h.name));
        }
        Self {
            name: h.name.clone(),
            version: h.version,
            publisher: h.publisher.to_string(),
            code_hash: hex::encode(h.code_hash),
            trainable: i.trainable,
            quarantined: i.quarantined,
            calls: i.calls,
            faults: i.faults,
            inputs: h.inputs.iter().map(|t| t.elements()).sum(),
            outputs: h.outputs.iter().map(|t| t.elements()).sum(),
            tools,
        }
    }
}

/// Loaded muscles the token may use.
#[derive(Debug, Serialize, ToSchema)]
pub struct MuscleList {
    /// Muscles by name.
    pub muscles: Vec<MuscleView>,
}

/// A forward pass.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InvokeRequest {
    /// The flattened input.
    pub input: Vec<f64>,
}

/// A training step.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainRequest {
    /// The flattened input.
    pub input: Vec<f64>,
    /// The flattened expected output.
    pub target: Vec<f64>,
    /// Learning rate (default 0.01).
    pub lr: Option<f64>,
}

/// A new token's rights.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// Tool names or `*`.
    #[serde(default)]
    pub tools: Vec<String>,
    /// Muscle names or `*`.
    #[serde(default)]
    pub muscles: Vec<String>,
    /// Absolute path prefixes or `*`.
    #[serde(default)]
    pub paths: Vec<String>,
    /// Worknode subtrees (`/acme/research`) or `*`; none: no worknode rights.
    #[serde(default)]
    pub nodes: Vec<String>,
    /// May manage muscles and tokens.
    #[serde(default)]
    pub admin: bool,
    /// Lifetime, seconds (none: no expiry).
    pub ttl_secs: Option<u64>,
    /// Label for listings.
    #[serde(default)]
    pub label: String,
}

/// A minted token (shown once).
#[derive(Debug, Serialize, ToSchema)]
pub struct TokenCreated {
    /// The bearer token.
    pub token: String,
    /// What the store keeps about it.
    pub record: TokenRecord,
}

/// Issued tokens.
#[derive(Debug, Serialize, ToSchema)]
pub struct TokenList {
    /// Tokens (never the secret part).
    pub tokens: Vec<TokenRecord>,
}

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("biscuit").build()),
        );
    }
}

/// The OpenAPI document of the REST surface.
#[derive(OpenApi)]
#[openapi(
    info(title = "referee gateway", description = "Tools and sealed muscles over REST; MCP at /mcp."),
    paths(
        health, metrics_text, openapi_json, stats, vdr, list_tools, call_tool, seed_tool, batch, v1_batch,
        list_muscles, upload_muscle, muscle_info, unload_muscle, invoke_muscle, train_muscle,
        list_tokens, create_token, revoke_token
    ),
    components(schemas(ErrorResponse, ErrorDetail)),
    modifiers(&BearerAuth),
    security(("bearer" = []))
)]
pub struct ApiDoc;

fn ok<T: Serialize>(value: T) -> Json<T> {
    Json(value)
}

/// Liveness (no token needed).
#[utoipa::path(get, path = "/health", security(), responses((status = 200, body = Health)))]
async fn health(State(gw): Shared) -> Json<Health> {
    ok(Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        uptime_seconds: gw.stats().uptime_seconds,
    })
}

/// Prometheus metrics (no token needed).
#[utoipa::path(get, path = "/metrics", security(), responses((status = 200, description = "Prometheus text exposition", body = String, content_type = "text/plain")))]
async fn metrics_text(State(gw): Shared) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], gw.metrics_text()).into_response()
}

/// This document (no token needed).
#[utoipa::path(get, path = "/openapi.json", security(), responses((status = 200, description = "OpenAPI 3.1 document", body = Object)))]
async fn openapi_json() -> Response {
    match ApiDoc::openapi().to_json() {
        Ok(text) => ([(header::CONTENT_TYPE, "application/json")], text).into_response(),
        Err(e) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()).into_response(),
    }
}

/// Totals since start.
#[utoipa::path(get, path = "/v1/stats", responses((status = 200, body = StatsReport), (status = 401, body = ErrorResponse)))]
async fn stats(State(gw): Shared) -> Json<StatsReport> {
    ok(gw.stats())
}

/// The seeds' VDR report.
#[utoipa::path(get, path = "/vdr", responses((status = 200, body = VdrReport), (status = 401, body = ErrorResponse)))]
async fn vdr(State(gw): Shared) -> Json<VdrReport> {
    let s = gw.stats();
    let vdr_score = gw.config().vdr_score;
    let optimal = s.avg_reality_index >= 0.95 && vdr_score.is_none_or(|v| v >= 1.0);
    ok(VdrReport {
        vdr_score,
        avg_torsion: s.avg_torsion,
        avg_reality_index: s.avg_reality_index,
        status: if optimal { "OPTIMAL" } else { "DEGRADED" }.into(),
    })
}

/// Tools the token may call (native tools and muscles).
#[utoipa::path(get, path = "/v1/tools", responses((status = 200, body = ToolList), (status = 401, body = ErrorResponse)))]
async fn list_tools(State(gw): Shared, Extension(scope): Caller) -> Json<ToolList> {
    let tools = gw
        .visible_tools(&scope)
        .iter()
        .map(|t| {
            let s = t.spec();
            ToolInfo {
                name: s.name.clone(),
                description: s.description.clone(),
                input_schema: s.input_schema.clone(),
                output_schema: s.output_schema.clone(),
                annotations: Annotations {
                    read_only: s.annotations.read_only,
                    destructive: s.annotations.destructive,
                    idempotent: s.annotations.idempotent,
                    open_world: s.annotations.open_world,
                },
                torsion: s.torsion,
            }
        })
        .collect();
    ok(ToolList { tools })
}

/// Calls one tool; the body is its parameters.
#[utoipa::path(post, path = "/v1/tools/{tool}", params(("tool" = String, Path, description = "Tool name")),
    request_body(content = Object, description = "The tool's parameters"),
    responses((status = 200, body = ToolResponse), (status = 400, body = ErrorResponse), (status = 403, body = ErrorResponse),
        (status = 404, body = ErrorResponse), (status = 429, body = ErrorResponse)))]
async fn call_tool(
    State(gw): Shared,
    Extension(scope): Caller,
    Extension(origin): Source,
    Path(tool): Path<String>,
    Json(params): Json<Value>,
) -> Result<Json<ToolResponse>, ApiError> {
    Ok(Json(gw.call(&scope, &origin, &tool, params).await?.into()))
}

/// Calls one tool, the seeds' shape.
#[utoipa::path(post, path = "/tool", request_body = ToolRequest,
    responses((status = 200, body = ToolResponse), (status = 400, body = ErrorResponse), (status = 403, body = ErrorResponse),
        (status = 404, body = ErrorResponse), (status = 429, body = ErrorResponse)))]
async fn seed_tool(
    State(gw): Shared,
    Extension(scope): Caller,
    Extension(origin): Source,
    Json(req): Json<ToolRequest>,
) -> Result<Json<ToolResponse>, ApiError> {
    Ok(Json(gw.call(&scope, &origin, &req.tool, req.params).await?.into()))
}

async fn run_batch(
    gw: Arc<Gateway>,
    scope: Arc<Scope>,
    origin: Origin,
    req: BatchRequest,
) -> Result<Json<BatchResponse>, ApiError> {
    let limits = &gw.config().limits;
    if req.requests.len() > limits.batch_max {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "batch_too_large",
            format!("{} requests; a batch holds at most {}", req.requests.len(), limits.batch_max),
        ));
    }
    let started = Instant::now();
    let batch_size = req.requests.len();
    // `buffered` runs up to N at once and yields in request order.
    let results = futures_util::stream::iter(req.requests)
        .map(|item| {
            let (gw, scope, origin) = (gw.clone(), scope.clone(), origin.clone());
            async move {
                let started = Instant::now();
                match gw.call(&scope, &origin, &item.tool, item.params).await {
                    Ok(o) => BatchItem {
                        tool: item.tool,
                        status: "SUCCESS".into(),
                        http_status: 200,
                        data: Some(o.data),
                        error: None,
                        reality_index: o.reality_index,
                        execution_time_ms: o.execution_time_ms,
                        torsion_score: o.torsion_score,
                    },
                    Err(e) => BatchItem {
                        tool: item.tool,
                        status: "ERROR".into(),
                        http_status: e.status.as_u16(),
                        data: None,
                        error: Some(ErrorDetail { code: e.code.into(), message: e.message }),
                        reality_index: 0.0,
                        execution_time_ms: started.elapsed().as_secs_f64() * 1000.0,
                        torsion_score: 0.0,
                    },
                }
            }
        })
        .buffered(limits.batch_concurrency.max(1))
        .collect::<Vec<_>>()
        .await;
    Ok(Json(BatchResponse { results, total_execution_time_ms: started.elapsed().as_secs_f64() * 1000.0, batch_size }))
}

/// Runs calls concurrently (bounded); results in request order.
#[utoipa::path(post, path = "/batch", request_body = BatchRequest,
    responses((status = 200, body = BatchResponse), (status = 413, body = ErrorResponse), (status = 429, body = ErrorResponse)))]
async fn batch(
    State(gw): Shared,
    Extension(scope): Caller,
    Extension(origin): Source,
    Json(req): Json<BatchRequest>,
) -> Result<Json<BatchResponse>, ApiError> {
    run_batch(gw, scope, origin, req).await
}

/// Same as `/batch`.
#[utoipa::path(post, path = "/v1/batch", request_body = BatchRequest,
    responses((status = 200, body = BatchResponse), (status = 413, body = ErrorResponse), (status = 429, body = ErrorResponse)))]
async fn v1_batch(
    State(gw): Shared,
    Extension(scope): Caller,
    Extension(origin): Source,
    Json(req): Json<BatchRequest>,
) -> Result<Json<BatchResponse>, ApiError> {
    run_batch(gw, scope, origin, req).await
}

/// Loaded muscles the token may use.
#[utoipa::path(get, path = "/v1/muscles", responses((status = 200, body = MuscleList), (status = 401, body = ErrorResponse)))]
async fn list_muscles(State(gw): Shared, Extension(scope): Caller) -> Json<MuscleList> {
    let muscles =
        gw.runtime().list().iter().filter(|m| scope.allows_muscle(&m.header.name)).map(MuscleView::from).collect();
    ok(MuscleList { muscles })
}

/// Uploads a sealed muscle (admin): full verification, then it is callable.
#[utoipa::path(post, path = "/v1/muscles", request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "A sealed .muscle file"),
    responses((status = 201, body = MuscleView), (status = 403, body = ErrorResponse), (status = 413, body = ErrorResponse),
        (status = 422, body = ErrorResponse)))]
async fn upload_muscle(
    State(gw): Shared,
    Extension(scope): Caller,
    Extension(origin): Source,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    // `admin_first` has refused everyone else already; only now are bytes read, up to the limit.
    scope.require_admin()?;
    let sealed = read_limited(&headers, body, gw.config().limits.upload_bytes, "muscle upload").await?;
    let bytes = sealed.len();
    let result = gw.upload(sealed).await;
    let (muscle, error) = match &result {
        Ok(info) => (Some(info.header.name.clone()), None),
        Err(e) => (None, Some(e.code)),
    };
    let event = json!({
        "kind": "gateway_upload", "token_id": scope.id, "source": origin.as_str(), "bytes": bytes,
        "ok": result.is_ok(), "muscle": muscle, "error": error,
    });
    gw.security().record(event).await;
    let info = result?;
    Ok((StatusCode::CREATED, Json(MuscleView::from(&info))).into_response())
}

fn too_large(what: &str, limit: usize) -> ApiError {
    ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", format!("the {what} is over the limit of {limit} bytes"))
}

/// Reads a body of at most `limit` bytes: a declared `Content-Length` over it is refused before
/// any byte is read, and a body that grows past it is refused as soon as it does.
async fn read_limited(headers: &HeaderMap, body: Body, limit: usize, what: &str) -> Result<Vec<u8>, ApiError> {
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large(what, limit));
    }
    // Grow with what arrives: a declared length alone reserves at most 1 MiB.
    let capacity = declared.map_or(0, |n| usize::try_from(n).unwrap_or(limit).min(limit).min(1 << 20));
    let mut bytes = Vec::with_capacity(capacity);
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::new(StatusCode::BAD_REQUEST, "bad_body", format!("reading the {what} failed: {e}"))
        })?;
        if bytes.len().saturating_add(chunk.len()) > limit {
            return Err(too_large(what, limit));
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

/// Rights before bytes: routes only an admin may use refuse everyone else before their
/// extractors read the body.
async fn admin_first(
    State(gw): Shared,
    Extension(scope): Caller,
    Extension(origin): Source,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if let Err(e) = scope.require_admin() {
        return Err(denied(&gw, &origin, &scope, req.uri().path(), e.into()));
    }
    Ok(next.run(req).await)
}

/// Records a 403 decided from the token and the URL in the audit log, and returns it.
fn denied(gw: &Gateway, origin: &Origin, scope: &Scope, target: &str, e: ApiError) -> ApiError {
    gw.security().denied(origin, e.code, Some(&scope.id), target, &e.message);
    e
}

/// Rights before bytes: `/v1/tools/{tool}` refuses a tool the token does not allow before the
/// body (its parameters) is read.
async fn tool_first(
    State(gw): Shared,
    Extension(scope): Caller,
    Extension(origin): Source,
    Path(tool): Path<String>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if !gw.permits(&scope, &tool) {
        let e = ApiError::new(StatusCode::FORBIDDEN, "forbidden", format!("the token does not allow `{tool}`"));
        return Err(denied(&gw, &origin, &scope, &tool, e));
    }
    Ok(next.run(req).await)
}

/// Rights before bytes: `/v1/muscles/{name}/…` refuses a muscle the token does not allow before
/// the body (its input) is read.
async fn muscle_first(
    State(gw): Shared,
    Extension(scope): Caller,
    Extension(origin): Source,
    Path(name): Path<String>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if let Err(e) = muscle_allowed(&scope, &name) {
        return Err(denied(&gw, &origin, &scope, req.uri().path(), e));
    }
    Ok(next.run(req).await)
}

fn muscle_allowed(scope: &Scope, name: &str) -> Result<(), ApiError> {
    if scope.allows_muscle(name) {
        Ok(())
    } else {
        Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", format!("the token does not allow muscle `{name}`")))
    }
}

/// One loaded muscle.
#[utoipa::path(get, path = "/v1/muscles/{name}", params(("name" = String, Path, description = "Muscle name")),
    responses((status = 200, body = MuscleView), (status = 403, body = ErrorResponse), (status = 404, body = ErrorResponse)))]
async fn muscle_info(
    State(gw): Shared,
    Extension(scope): Caller,
    Extension(origin): Source,
    Path(name): Path<String>,
) -> Result<Json<MuscleView>, ApiError> {
    if let Err(e) = muscle_allowed(&scope, &name) {
        return Err(denied(&gw, &origin, &scope, &format!("/v1/muscles/{name}"), e));
    }
    let info = gw.runtime().info(&name).map_err(|e| ApiError::from(crate::registry::runtime_to_tool(e)))?;
    Ok(Json(MuscleView::from(&info)))
}

/// Unloads a muscle (admin); calls in flight finish.
#[utoipa::path(delete, path = "/v1/muscles/{name}", params(("name" = String, Path, description = "Muscle name")),
    responses((status = 204, description = "Unloaded"), (status = 403, body = ErrorResponse), (status = 404, body = ErrorResponse)))]
async fn unload_muscle(
    State(gw): Shared,
    Extension(scope): Caller,
    Extension(origin): Source,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    scope.require_admin()?;
    let result = gw.runtime().unload(&name).map_err(|e| ApiError::from(crate::registry::runtime_to_tool(e)));
    let error = result.as_ref().err().map(|e| e.code);
    gw.security()
        .record(json!({
            "kind": "gateway_unload", "muscle": name, "token_id": scope.id, "source": origin.as_str(),
            "ok": error.is_none(), "error": error,
        }))
        .await;
    result?;
    Ok(StatusCode::NO_CONTENT)
}

/// Runs a muscle's forward pass.
#[utoipa::path(post, path = "/v1/muscles/{name}/invoke", params(("name" = String, Path, description = "Muscle name")),
    request_body = InvokeRequest,
    responses((status = 200, body = ToolResponse), (status = 400, body = ErrorResponse), (status = 403, body = ErrorResponse),
        (status = 404, body = ErrorResponse)))]
async fn invoke_muscle(
    State(gw): Shared,
    Extension(scope): Caller,
    Extension(origin): Source,
    Path(name): Path<String>,
    Json(req): Json<InvokeRequest>,
) -> Result<Json<ToolResponse>, ApiError> {
    let params = json!({ "input": req.input });
    Ok(Json(gw.call(&scope, &origin, &format!("{MUSCLE_PREFIX}{name}"), params).await?.into()))
}

/// Runs one training step of a trainable muscle.
#[utoipa::path(post, path = "/v1/muscles/{name}/train", params(("name" = String, Path, description = "Muscle name")),
    request_body = TrainRequest,
    responses((status = 200, body = ToolResponse), (status = 400, body = ErrorResponse), (status = 403, body = ErrorResponse),
        (status = 404, body = ErrorResponse)))]
async fn train_muscle(
    State(gw): Shared,
    Extension(scope): Caller,
    Extension(origin): Source,
    Path(name): Path<String>,
    Json(req): Json<TrainRequest>,
) -> Result<Json<ToolResponse>, ApiError> {
    let mut params = json!({ "input": req.input, "target": req.target });
    if let (Some(lr), Some(map)) = (req.lr, params.as_object_mut()) {
        map.insert("lr".into(), json!(lr));
    }
    Ok(Json(gw.call(&scope, &origin, &format!("{TRAIN_PREFIX}{name}"), params).await?.into()))
}

/// Issued tokens (admin).
#[utoipa::path(get, path = "/v1/tokens", responses((status = 200, body = TokenList), (status = 403, body = ErrorResponse)))]
async fn list_tokens(State(gw): Shared, Extension(scope): Caller) -> Result<Json<TokenList>, ApiError> {
    scope.require_admin()?;
    let tokens = gw.authority().store().list().map_err(AuthError::from)?;
    Ok(Json(TokenList { tokens }))
}

/// Mints a token (admin).
#[utoipa::path(post, path = "/v1/tokens", request_body = TokenRequest,
    responses((status = 201, body = TokenCreated), (status = 400, body = ErrorResponse), (status = 403, body = ErrorResponse)))]
async fn create_token(
    State(gw): Shared,
    Extension(scope): Caller,
    Extension(origin): Source,
    Json(req): Json<TokenRequest>,
) -> Result<Response, ApiError> {
    scope.require_admin()?;
    let expires_at = req.ttl_secs.map(|ttl| now_unix().saturating_add(ttl).min(253_402_300_799));
    let grant = Grant {
        tools: req.tools,
        muscles: req.muscles,
        paths: req.paths,
        nodes: req.nodes,
        admin: req.admin,
        expires_at,
        label: req.label,
    };
    let (token, record) = gw.authority().mint(&grant)?;
    gw.security().record(crate::launch::mint_event(&record, Some(&scope.id), origin.as_str())).await;
    Ok((StatusCode::CREATED, Json(TokenCreated { token, record })).into_response())
}

/// Revokes a token by id (admin); every attenuation of it is revoked too.
#[utoipa::path(post, path = "/v1/tokens/{id}/revoke", params(("id" = String, Path, description = "Revocation id (hex)")),
    responses((status = 204, description = "Revoked"), (status = 400, body = ErrorResponse), (status = 403, body = ErrorResponse)))]
async fn revoke_token(
    State(gw): Shared,
    Extension(scope): Caller,
    Extension(origin): Source,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    scope.require_admin()?;
    gw.authority().revoke(&id)?;
    gw.security().record(crate::launch::revoke_event(&id, Some(&scope.id), origin.as_str())).await;
    Ok(StatusCode::NO_CONTENT)
}

fn bearer(headers: &HeaderMap) -> Result<&str, ApiError> {
    let value = headers.get(header::AUTHORIZATION).ok_or(AuthError::Missing)?;
    let text = value.to_str().map_err(|_| AuthError::Invalid("authorization header is not text".into()))?;
    let token = text
        .strip_prefix("Bearer ")
        .or_else(|| text.strip_prefix("bearer "))
        .ok_or_else(|| AuthError::Invalid("authorization header must be `Bearer <token>`".into()))?;
    Ok(token.trim())
}

/// Verifies the bearer token and applies the token's rate and concurrency limits.
async fn authenticate(State(gw): Shared, mut req: Request, next: Next) -> Result<Response, ApiError> {
    let origin = match req.extensions().get::<Origin>() {
        Some(origin) => origin.clone(),
        None => {
            req.extensions_mut().insert(Origin::unknown());
            Origin::unknown()
        }
    };
    let verified = match bearer(req.headers()) {
        Ok(token) => gw.verify(token).await.map_err(ApiError::from),
        Err(e) => Err(e),
    };
    let scope = match verified {
        Ok(scope) => scope,
        // Load shedding is not a denial; every other refusal is.
        Err(e) if e.status == StatusCode::SERVICE_UNAVAILABLE => return Err(e),
        Err(e) => {
            gw.security().denied(&origin, e.code, None, req.uri().path(), &e.message);
            return Err(e);
        }
    };
    if scope.blocks > 1 {
        gw.security().attenuation_seen(&origin, &scope.id, &scope.leaf_id, scope.blocks);
    }
    let permit = gw.limiter().admit(&scope.id).map_err(|refusal| {
        let (code, retry_after, why) = match refusal {
            Refusal::Rate { retry_after } => ("rate_limited", retry_after, "request rate"),
            Refusal::Concurrency => ("too_many_in_flight", 1, "concurrent requests"),
        };
        metrics::counter!("referee_gateway_refusals_total", "reason" => code).increment(1);
        ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            code,
            message: format!("this token exceeded its {why} limit; retry after {retry_after} s"),
            retry_after: Some(retry_after),
        }
    });
    let permit = match permit {
        Ok(permit) => permit,
        Err(e) => return Err(denied(&gw, &origin, &scope, req.uri().path(), e)),
    };
    req.extensions_mut().insert(scope);
    let response = next.run(req).await;
    // The token's in-flight slot is held until the answer has left, not only until it was made:
    // a client that never reads its answers runs out of slots, not the server out of memory.
    Ok(crate::conn::Guarded::response(response, permit))
}

/// Request ids: a per-process random prefix and a counter (unique, cheap, sortable).
#[derive(Clone, Debug)]
struct Ids {
    prefix: Arc<str>,
    next: Arc<AtomicU64>,
}

impl MakeRequestId for Ids {
    fn make_request_id<B>(&mut self, _: &axum::http::Request<B>) -> Option<RequestId> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        HeaderValue::from_str(&format!("{}-{n:x}", self.prefix)).ok().map(RequestId::new)
    }
}

fn ids() -> Ids {
    let mut bytes = [0u8; 4];
    // Without randomness ids are still unique within the process.
    let _ = getrandom::fill(&mut bytes);
    Ids { prefix: hex::encode(bytes).into(), next: Arc::new(AtomicU64::new(1)) }
}

/// The whole router: public routes, authenticated routes, MCP, and the layers around them.
pub fn router(gw: Arc<Gateway>, mcp: Option<Router<Arc<Gateway>>>) -> Router {
    let limits = &gw.config().limits;
    // Rights before bytes: each route whose rights can be decided from the token and the URL
    // decides them in a layer, before the handler's extractors read the body.
    let admin = || middleware::from_fn_with_state(gw.clone(), admin_first);
    let named_tool = middleware::from_fn_with_state(gw.clone(), tool_first);
    let named_muscle = || middleware::from_fn_with_state(gw.clone(), muscle_first);
    let mut protected = Router::new()
        .route("/v1/stats", get(stats))
        .route("/vdr", get(vdr))
        .route("/v1/tools", get(list_tools))
        .route("/v1/tools/{tool}", post(call_tool).route_layer(named_tool))
        .route("/tool", post(seed_tool))
        .route("/batch", post(batch))
        .route("/v1/batch", post(v1_batch))
        .route("/v1/muscles", get(list_muscles).post(upload_muscle.layer(admin())))
        .route("/v1/muscles/{name}", get(muscle_info).delete(unload_muscle.layer(admin())))
        .route("/v1/muscles/{name}/invoke", post(invoke_muscle).route_layer(named_muscle()))
        .route("/v1/muscles/{name}/train", post(train_muscle).route_layer(named_muscle()))
        .route("/v1/tokens", get(list_tokens).post(create_token).route_layer(admin()))
        .route("/v1/tokens/{id}/revoke", post(revoke_token).route_layer(admin()));
    if let Some(mcp) = mcp {
        protected = protected.merge(mcp);
    }
    let protected = protected.route_layer(middleware::from_fn_with_state(gw.clone(), authenticate));
    let request_id = axum::http::HeaderName::from_static("x-request-id");
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .route("/openapi.json", get(openapi_json))
        .merge(protected)
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "no_route", "no such route; GET /openapi.json lists them")
        })
        .layer(DefaultBodyLimit::max(limits.body_bytes))
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        // 503 `busy` and 504 are load shedding and deadlines, counted in the metrics; logging
        // each at ERROR would let anyone grow the log at will.
        .layer(TraceLayer::new(StatusInRangeAsFailures::new(500..=502).into_make_classifier()).make_span_with(
            |req: &axum::http::Request<_>| {
                let id = req.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("-");
                tracing::info_span!("request", method = %req.method(), path = %req.uri().path(), request_id = %id)
            },
        ))
        .layer(SetRequestIdLayer::new(request_id, ids()))
        .with_state(gw)
}

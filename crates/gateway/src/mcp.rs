//! MCP (via rmcp): the same tools and call path as REST, over Streamable HTTP at `/mcp` (behind
//! the same authentication and limits) and over stdio (`referee mcp`, the local operator).

use std::sync::Arc;

use axum::Router;
use referee_tools::SharedTool;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation, ListToolsResult,
    PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool as McpTool, ToolAnnotations as McpAnnotations,
};
use rmcp::service::RequestContext;
use rmcp::transport::streamable_http_server::session::never::NeverSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData, RoleServer, ServerHandler};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::audit::Origin;
use crate::auth::Scope;
use crate::gateway::Gateway;

/// The MCP face of the gateway.
#[derive(Clone)]
pub struct McpServer {
    gateway: Arc<Gateway>,
    /// The caller when there is no HTTP request to carry one (stdio).
    fixed: Option<Arc<Scope>>,
}

impl std::fmt::Debug for McpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("McpServer").finish_non_exhaustive()
    }
}

fn object(v: &Value) -> Arc<serde_json::Map<String, Value>> {
    Arc::new(v.as_object().cloned().unwrap_or_default())
}

fn to_mcp(tool: &SharedTool) -> McpTool {
    let s = tool.spec();
    let a = s.annotations;
    let annotations = McpAnnotations::new()
        .read_only(a.read_only)
        .destructive(a.destructive)
        .idempotent(a.idempotent)
        .open_world(a.open_world);
    McpTool::new(s.name.clone(), s.description.clone(), object(&s.input_schema))
        .with_raw_output_schema(object(&s.output_schema))
        .with_annotations(annotations)
}

impl McpServer {
    /// A server whose callers come from HTTP requests (the auth middleware's scope).
    pub fn http(gateway: Arc<Gateway>) -> Self {
        Self { gateway, fixed: None }
    }

    /// A server for one local caller (stdio).
    pub fn fixed(gateway: Arc<Gateway>, scope: Arc<Scope>) -> Self {
        Self { gateway, fixed: Some(scope) }
    }

    /// The HTTP request's origin, or stdio's.
    fn origin(&self, ctx: &RequestContext<RoleServer>) -> Origin {
        ctx.extensions
            .get::<axum::http::request::Parts>()
            .and_then(|parts| parts.extensions.get::<Origin>().cloned())
            .unwrap_or_else(|| if self.fixed.is_some() { Origin::stdio() } else { Origin::unknown() })
    }

    fn scope(&self, ctx: &RequestContext<RoleServer>) -> Result<Arc<Scope>, ErrorData> {
        ctx.extensions
            .get::<axum::http::request::Parts>()
            .and_then(|parts| parts.extensions.get::<Arc<Scope>>().cloned())
            .or_else(|| self.fixed.clone())
            .ok_or_else(|| ErrorData::invalid_request("no verified bearer token on this request", None))
    }
}

impl ServerHandler for McpServer {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("referee", env!("CARGO_PKG_VERSION")))
            .with_instructions("Native tools (files, git, processes) and sealed muscles (`muscle.<name>`).")
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let scope = self.scope(&ctx)?;
        let tools = self.gateway.visible_tools(&scope).iter().map(to_mcp).collect();
        Ok(ListToolsResult::with_all_items(tools))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let scope = self.scope(&ctx)?;
        let origin = self.origin(&ctx);
        let params = Value::Object(request.arguments.unwrap_or_default());
        let result = match self.gateway.call(&scope, &origin, &request.name, params).await {
            Ok(outcome) => CallToolResult::structured(outcome.data),
            // An unknown tool is a protocol error; everything else is the tool's error result.
            Err(e) if e.code == "unknown_tool" => return Err(ErrorData::invalid_params(e.message, None)),
            Err(e) => CallToolResult::error(vec![ContentBlock::text(format!("{}: {}", e.code, e.message))]),
        };
        Ok(result.into())
    }
}

/// `/mcp`: stateless Streamable HTTP, JSON responses, body limited like REST.
pub fn router<S: Clone + Send + Sync + 'static>(gateway: Arc<Gateway>, shutdown: CancellationToken) -> Router<S> {
    let mcp = &gateway.config().mcp;
    let mut config = StreamableHttpServerConfig::default()
        .with_legacy_session_mode(false)
        .with_json_response(true)
        .with_sse_keep_alive(None)
        .with_cancellation_token(shutdown)
        .with_max_request_body_bytes(gateway.config().limits.body_bytes);
    if !mcp.allowed_hosts.is_empty() {
        config = config.with_allowed_hosts(mcp.allowed_hosts.clone());
    }
    let server = McpServer::http(gateway.clone());
    let service =
        StreamableHttpService::new(move || Ok(server.clone()), Arc::new(NeverSessionManager::default()), config);
    Router::new().route_service("/mcp", service)
}

/// Serves MCP on stdin/stdout until the client closes it.
///
/// When both streams are pipes (how MCP clients start a server) they are driven by the I/O
/// reactor on descriptors of their own (`rmcp::transport::stdio_pipes`), instead of Tokio's
/// blocking stdio, which hands every read and write to another thread; anything else (a
/// terminal, a file) falls back to the blocking handles.
pub async fn serve_stdio(gateway: Arc<Gateway>, scope: Arc<Scope>) -> Result<(), std::io::Error> {
    use rmcp::ServiceExt;
    let running = McpServer::fixed(gateway, scope)
        .serve(rmcp::transport::stdio_pipes())
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    running.waiting().await.map(|_| ()).map_err(|e| std::io::Error::other(e.to_string()))
}

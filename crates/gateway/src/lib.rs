//! `referee serve`: the gateway. REST and MCP over TCP and a Unix socket, in front of native
//! tools and sealed muscles, behind capability tokens and per-token limits.
//!
//! - [`Gateway`]: the shared state and the one call path (permission → resolve → blocking
//!   pool with a deadline → stats and metrics) that REST, batches and MCP all use.
//! - [`auth`]: biscuit capability tokens (mint, offline attenuation, cached verification,
//!   revocation by id) rooted in `keys/gateway.key`.
//! - [`registry`]: native tools plus muscles as tools (`muscle.<name>`, `train.<name>`).
//! - [`rest`]: routes, OpenAPI 3.1 at `/openapi.json`, middleware (request id, tracing,
//!   authentication, limits); [`mcp`]: MCP over Streamable HTTP at `/mcp` and over stdio.
//! - [`server`]: TCP and Unix listeners, graceful shutdown; [`conn`]: per-listener connection
//!   cap, header-read and idle timeouts; [`limits`]: per-token rate and
//!   concurrency; [`store`]: `gateway.redb` (issued tokens, revocations); [`telemetry`]:
//!   Prometheus metrics and JSON logs.

pub mod audit;
pub mod auth;
pub mod config;
pub mod conn;
mod gateway;
pub mod launch;
pub mod limits;
pub mod mcp;
pub mod registry;
pub mod rest;
pub mod server;
pub mod store;
pub mod telemetry;

pub use config::GatewayConfig;
pub use gateway::{ApiError, CallOutcome, Gateway, StartError, StatsReport};
pub use server::{SOCKET_FILE, Server, shutdown_signal};

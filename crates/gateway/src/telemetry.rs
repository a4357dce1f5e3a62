//! Metrics (Prometheus, by tool and status, with latency histograms) and JSON logs.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::gateway::{ApiError, CallOutcome};

/// Latency buckets, seconds: 50 µs to 10 s.
const BUCKETS: &[f64] = &[0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 10.0];

/// Calls by tool and status.
pub const CALLS: &str = "referee_gateway_calls_total";
/// Call latency by tool.
pub const LATENCY: &str = "referee_gateway_call_duration_seconds";

/// The process-wide recorder (installed once; `None` if another recorder was installed first).
pub fn prometheus() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(LATENCY.into()), BUCKETS)
                .ok()?
                .install_recorder()
                .ok()
        })
        .clone()
}

/// Counts one call and its latency.
pub fn record_call(tool: &str, result: &Result<CallOutcome, ApiError>, elapsed: Duration) {
    let (tool, status) = match result {
        Ok(_) => (tool, "ok"),
        // Names from refused calls are caller-chosen: one label keeps the series bounded.
        Err(e) if matches!(e.code, "unknown_tool" | "forbidden") => ("_refused", e.code),
        Err(e) => (tool, e.code),
    };
    metrics::counter!(CALLS, "tool" => tool.to_owned(), "status" => status).increment(1);
    metrics::histogram!(LATENCY, "tool" => tool.to_owned()).record(elapsed.as_secs_f64());
}

/// Structured JSON logs on stderr; `RUST_LOG` filters (default `info`).
pub fn init_json_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // A second call (tests starting several servers) keeps the first subscriber.
    let _ = tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_current_span(true)
        .try_init();
}

//! Metrics (Prometheus, by tool and status, with latency histograms) and JSON logs.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::gateway::{ApiError, CallOutcome};

/// Latency buckets, seconds: 50 µs to 10 s.
const BUCKETS: &[f64] = &[0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 10.0];

/// Calls by tool and status.
pub const CALLS: &str = "referee_gateway_calls_total";
/// Call latency by tool.
pub const LATENCY: &str = "referee_gateway_call_duration_seconds";

/// How often recorded histogram samples are folded into their buckets.
const UPKEEP: Duration = Duration::from_secs(1);
/// Name of the thread that does it.
const UPKEEP_THREAD: &str = "metrics-upkeep";
/// Upkeep threads started in this process (one at most; tests check it).
static UPKEEP_THREADS: AtomicUsize = AtomicUsize::new(0);

/// The process-wide recorder (installed once; `None` if another recorder was installed first).
///
/// The recorder keeps every histogram sample until upkeep folds it into the buckets; an
/// installed recorder does not do that by itself (only a scrape would), so without a scraper
/// a busy gateway would grow by every call's latency sample. A background thread runs the
/// upkeep every second (`UPKEEP`).
pub fn prometheus() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(LATENCY.into()), BUCKETS)
                .ok()?
                .install_recorder()
                .ok()?;
            let upkeep = handle.clone();
            let spawned = std::thread::Builder::new().name(UPKEEP_THREAD.into()).spawn(move || {
                loop {
                    std::thread::sleep(UPKEEP);
                    upkeep.run_upkeep();
                }
            });
            match spawned {
                Ok(_) => {
                    UPKEEP_THREADS.fetch_add(1, Ordering::Relaxed);
                }
                // Scrapes still drain the samples; only an unscraped gateway grows.
                Err(e) => tracing::warn!(error = %e, "could not start the metrics upkeep thread"),
            }
            Some(handle)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installing_the_recorder_starts_the_upkeep_thread_once() {
        let Some(handle) = prometheus() else { return };
        assert!(prometheus().is_some());
        assert_eq!(UPKEEP_THREADS.load(Ordering::Relaxed), 1);
        let ok: Result<CallOutcome, ApiError> = Ok(CallOutcome {
            data: serde_json::Value::Null,
            reality_index: 1.0,
            execution_time_ms: 0.0,
            torsion_score: 0.0,
        });
        record_call("upkeep_probe", &ok, Duration::from_micros(70));
        let text = handle.render();
        assert!(text.contains("referee_gateway_call_duration_seconds_count{tool=\"upkeep_probe\"} 1"), "{text}");
        assert!(text.contains("referee_gateway_calls_total{tool=\"upkeep_probe\",status=\"ok\"} 1"), "{text}");
    }
}

//! Logs (`tracing`) and the Prometheus metrics endpoint.
//!
//! Logs never contain row values or secrets: components log ids, positions and counts only.

use std::io::IsTerminal;
use std::net::SocketAddr;

use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Logs to stderr; the level comes from `RUST_LOG` (default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,tokio_postgres=warn"));
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal());
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Buckets of every `*_seconds` metric: from a millisecond to half a minute.
const SECONDS_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// Serves metrics at `addr` (any path) when given. Durations (`*_seconds`) are Prometheus
/// histograms, so they aggregate across processes; other distributions are summaries.
pub fn install_metrics(addr: Option<SocketAddr>) -> Result<(), BuildError> {
    if let Some(addr) = addr {
        PrometheusBuilder::new()
            .with_http_listener(addr)
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)?
            .install()?;
        tracing::info!(%addr, "metrics endpoint listening");
    }
    Ok(())
}

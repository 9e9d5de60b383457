//! Logs (`tracing`) and the Prometheus metrics endpoint.
//!
//! Logs never contain row values or secrets: components log ids, positions and counts only.

use std::io::IsTerminal;
use std::net::SocketAddr;

use metrics_exporter_prometheus::{BuildError, PrometheusBuilder};
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

/// Serves metrics at `addr` (any path) when given. Histograms are exported as summaries.
pub fn install_metrics(addr: Option<SocketAddr>) -> Result<(), BuildError> {
    if let Some(addr) = addr {
        PrometheusBuilder::new().with_http_listener(addr).install()?;
        tracing::info!(%addr, "metrics endpoint listening");
    }
    Ok(())
}

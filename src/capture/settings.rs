//! Capture's command-line settings.

use super::snapshot::SnapshotMode;

#[derive(Debug, Clone, clap::Args)]
pub struct CaptureSettings {
    /// Logical replication slot (created with the pgoutput plugin on first start).
    #[arg(long = "slot", env = "PGFANOUT_SLOT", default_value = "pgfanout")]
    pub slot: String,
    /// Milliseconds between status updates sent to PostgreSQL (each asks the server for
    /// its position, which moves the slot and the watermark while tables are idle).
    #[arg(long = "status-interval-ms", env = "PGFANOUT_STATUS_INTERVAL_MS", default_value_t = 500, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub status_interval_ms: u64,
    /// Milliseconds between watermark deltas (sent to every partition when the watermark
    /// moved).
    #[arg(long = "watermark-interval-ms", env = "PGFANOUT_WATERMARK_INTERVAL_MS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub watermark_interval_ms: u64,
    /// When to copy the published tables' existing rows as `snapshot` deltas before
    /// streaming: on the slot's first start (`initial`), on every start, or never.
    #[arg(long = "snapshot", env = "PGFANOUT_SNAPSHOT", value_enum, default_value_t = SnapshotMode::Initial)]
    pub snapshot: SnapshotMode,
    /// Seconds the slot may stand still, with nothing pending in capture while the
    /// server's WAL moves on, before capture writes a heartbeat (a non-transactional
    /// logical message) so that the slot follows; 0 disables heartbeats.
    #[arg(long = "heartbeat-secs", env = "PGFANOUT_HEARTBEAT_SECS", default_value_t = 30)]
    pub heartbeat_secs: u64,
}

//! The confirmation service's settings.

use std::time::Duration;

#[derive(Debug, Clone, clap::Args)]
pub struct ConfirmSettings {
    /// Seconds a committed instruction may wait for the fleet before a `pending`
    /// confirmation names the devices still missing.
    #[arg(long = "deadline-secs", env = "PGFANOUT_CONFIRM_DEADLINE_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub deadline_secs: u64,
    /// Seconds during which a result read again for an id already confirmed is not
    /// confirmed again (the executor re-publishes the stored result when an id is
    /// resubmitted).
    #[arg(long = "dedupe-window-secs", env = "PGFANOUT_CONFIRM_DEDUPE_WINDOW_SECS", default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=604_800))]
    pub dedupe_window_secs: u64,
}

/// How often the registry is read again and a checkpoint written.
pub const REFRESH: Duration = Duration::from_secs(1);

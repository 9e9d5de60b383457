//! `pgfanout fleet status`: every device as the confirmation service last recorded it in
//! the registry (it writes its readings there every second), with its lag behind the
//! server's WAL. Times are the service's and the server's, never a device's own.

use std::fmt::Write as _;
use std::time::{Duration, UNIX_EPOCH};

use tokio_postgres::Client;

use super::error::FleetError;

/// A device silent this long (no valid acknowledgement; devices send one at least every
/// 5 s) is `offline`.
pub const OFFLINE_SECS: f64 = 30.0;
/// A device whose first missing instruction has waited this long is `behind`.
pub const BEHIND_SECS: f64 = 5.0;
/// Readings older than this mean the confirmation service is not recording.
const STALE_SECS: f64 = 10.0;

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DeviceStatus {
    pub id: String,
    pub state: &'static str,
    pub watermark_lsn: Option<i64>,
    /// The server's current WAL position minus the watermark.
    pub lag_bytes: Option<i64>,
    pub lag_seconds: Option<f64>,
    /// Unix microseconds.
    pub last_seen: Option<i64>,
    pub subscription: Option<String>,
    #[serde(skip)]
    readings_age_secs: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct FleetStatus {
    pub devices: Vec<DeviceStatus>,
}

pub async fn read(client: &Client) -> Result<FleetStatus, FleetError> {
    let rows = client
        .query(
            "SELECT id, retired_at IS NOT NULL, watermark_lsn,
                    ((pg_current_wal_lsn() - '0/0'::pg_lsn)::int8 - watermark_lsn),
                    lag_seconds, (extract(epoch FROM last_seen_at) * 1e6)::int8,
                    extract(epoch FROM now() - last_seen_at)::float8, subscription,
                    extract(epoch FROM now() - observed_at)::float8
             FROM pgfanout.devices ORDER BY id",
            &[],
        )
        .await?;
    let devices = rows
        .iter()
        .map(|r| {
            let (retired, lag_seconds, seen_ago): (bool, Option<f64>, Option<f64>) = (r.get(1), r.get(4), r.get(6));
            let state = match (retired, seen_ago, lag_seconds) {
                (true, _, _) => "retired",
                (_, None, _) => "offline",
                (_, Some(ago), _) if ago > OFFLINE_SECS => "offline",
                (_, _, Some(lag)) if lag >= BEHIND_SECS => "behind",
                _ => "current",
            };
            DeviceStatus {
                id: r.get(0),
                state,
                watermark_lsn: r.get(2),
                lag_bytes: r.get::<_, Option<i64>>(3).map(|b| b.max(0)),
                lag_seconds: if retired { None } else { lag_seconds },
                last_seen: r.get(5),
                subscription: r.get(7),
                readings_age_secs: r.get(8),
            }
        })
        .collect();
    Ok(FleetStatus { devices })
}

impl FleetStatus {
    pub fn render(&self, json: bool) -> String {
        let mut out = String::new();
        if json {
            for d in &self.devices {
                let _ = writeln!(out, "{}", serde_json::to_string(d).unwrap_or_default());
            }
            return out;
        }
        let _ = writeln!(
            out,
            "{:<24} {:<8} {:>14} {:>12} {:>8} {:<20} SUBSCRIPTION",
            "DEVICE", "STATE", "WATERMARK", "LAG BYTES", "LAG S", "LAST SEEN"
        );
        for d in &self.devices {
            let lsn = d.watermark_lsn.and_then(|l| crate::contract::Lsn::try_from(l).ok()).map_or("-".into(), |l| l.to_string());
            let _ = writeln!(
                out,
                "{:<24} {:<8} {:>14} {:>12} {:>8} {:<20} {}",
                d.id,
                d.state,
                lsn,
                d.lag_bytes.map_or("-".into(), |b| b.to_string()),
                d.lag_seconds.map_or("-".into(), |s| format!("{s:.1}")),
                d.last_seen.map_or("never".into(), rfc3339),
                d.subscription.as_deref().unwrap_or("all"),
            );
        }
        let active = self.devices.iter().filter(|d| d.state != "retired");
        if let Some(age) = active.filter_map(|d| d.readings_age_secs).reduce(f64::min).filter(|a| *a > STALE_SECS) {
            let _ = writeln!(out, "warning: these readings are {age:.0} s old; is `pgfanout confirm` running?");
        }
        out
    }
}

/// Unix microseconds as an RFC 3339 time to the second.
pub fn rfc3339(micros: i64) -> String {
    let at = UNIX_EPOCH + Duration::from_micros(micros.max(0) as u64);
    humantime::format_rfc3339_seconds(at).to_string()
}

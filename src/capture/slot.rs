//! Watching the slot from the side: how far it trails the server, and heartbeats when it
//! stands still.
//!
//! Monitoring only: nothing here moves a position. Keepalives normally carry the server's
//! position and move the slot while only unpublished tables change; the heartbeat (a
//! non-transactional logical message) is the fallback that gives the walsender a record to
//! decode and confirm when they do not, so that the slot does not retain WAL for ever.

use std::time::Instant;

use super::flush::FlushLsnTracker;

/// Prefix of capture's heartbeat messages.
pub(super) const HEARTBEAT_PREFIX: &str = "pgfanout.heartbeat";

pub(super) struct SlotMonitor {
    slot: String,
    /// Seconds the slot may stand still before a heartbeat; 0: never.
    heartbeat_secs: u64,
    /// The slot's confirmed position at the last check, and since when it has not moved.
    confirmed: Option<String>,
    since: Instant,
}

impl SlotMonitor {
    pub(super) fn new(slot: &str, heartbeat_secs: u64) -> SlotMonitor {
        SlotMonitor { slot: slot.to_string(), heartbeat_secs, confirmed: None, since: Instant::now() }
    }

    /// Publishes how far the slot trails the server (WAL bytes not yet confirmed, WAL bytes
    /// the slot retains, how long the oldest unconfirmed transaction has waited) and, when
    /// the slot has stood still for the heartbeat interval with nothing pending here while
    /// the server's WAL moved on, writes a heartbeat.
    pub(super) async fn check(
        &mut self,
        client: &tokio_postgres::Client,
        tracker: &FlushLsnTracker,
    ) -> Result<(), tokio_postgres::Error> {
        let row = client
            .query_opt(
                "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::float8, (pg_current_wal_lsn() - restart_lsn)::float8,
                        confirmed_flush_lsn::text
                   FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.slot],
            )
            .await?;
        metrics::gauge!("pgfanout_capture_slot_lag_seconds").set(tracker.oldest_pending_age().as_secs_f64());
        let Some(row) = row else { return Ok(()) };
        let lag = row.get::<_, Option<f64>>(0).unwrap_or(0.0);
        metrics::gauge!("pgfanout_capture_slot_lag_bytes").set(lag);
        metrics::gauge!("pgfanout_capture_slot_retained_bytes").set(row.get::<_, Option<f64>>(1).unwrap_or(0.0));
        let confirmed: Option<String> = row.get(2);
        if confirmed != self.confirmed {
            self.confirmed = confirmed;
            self.since = Instant::now();
            return Ok(());
        }
        let idle = tracker.in_flight() == 0 && tracker.oldest_pending_age().is_zero();
        if self.heartbeat_secs > 0 && idle && lag > 0.0 && self.since.elapsed().as_secs() >= self.heartbeat_secs {
            client.execute("SELECT pg_logical_emit_message(false, $1, '')", &[&HEARTBEAT_PREFIX]).await?;
            metrics::counter!("pgfanout_capture_heartbeats_total").increment(1);
            tracing::debug!(lag_bytes = lag, "slot stood still; heartbeat written");
            self.since = Instant::now();
        }
        Ok(())
    }
}

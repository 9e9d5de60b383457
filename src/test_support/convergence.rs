//! Comparing a [`Pipeline`]'s device stores with PostgreSQL, and what PostgreSQL says of the
//! slot, for the assertions and their failure messages.

use std::collections::BTreeMap;
use std::time::Duration;

use super::pipeline::Pipeline;
use super::process::log_tail;
use super::wait::{Deadline, TIMEOUT};
use crate::pg::{self, TableInfo};
use crate::verify::{self, Rows};

/// Every published table's canonical rows, by table name.
type TableRows = BTreeMap<String, Rows>;

impl Pipeline {
    pub async fn tables(&self) -> Vec<TableInfo> {
        let client = self.client().await;
        let mut out = Vec::new();
        for name in pg::publication_tables(&client, &self.postgres.publication).await.unwrap() {
            // As capture replicates them: published columns, refused tables left out.
            if let verify::Replicated::Table(t) =
                verify::replicated_table(&client, &self.postgres.publication, &name).await.unwrap()
            {
                out.push(t);
            }
        }
        out
    }

    /// Every published table's rows, canonical, from PostgreSQL.
    pub async fn postgres_rows(&self) -> TableRows {
        let client = self.client().await;
        let mut out = BTreeMap::new();
        for t in self.tables().await {
            out.insert(t.name.to_string(), verify::postgres_rows(&client, &t).await.unwrap());
        }
        out
    }

    pub async fn device_rows(&self, device: &str) -> TableRows {
        let conn = verify::open_store_read_only(&self.store(device)).unwrap();
        let mut out = BTreeMap::new();
        for t in self.tables().await {
            out.insert(t.name.to_string(), verify::device_rows(&conn, &t).unwrap_or_default());
        }
        out
    }

    /// PostgreSQL's rows, and the devices whose rows differ from them now.
    async fn diverged_now(&self, devices: &[&str]) -> (TableRows, Vec<String>) {
        let expected = self.postgres_rows().await;
        let mut diverged = Vec::new();
        for d in devices {
            if !self.store(d).exists() || self.device_rows(d).await != expected {
                diverged.push(d.to_string());
            }
        }
        (expected, diverged)
    }

    /// Waits up to `timeout` for every device's rows to equal PostgreSQL's; returns the
    /// devices that still differ.
    pub async fn diverged_after(&mut self, devices: &[&str], timeout: Duration) -> Vec<String> {
        let deadline = Deadline::after(timeout, "the devices to converge").polling_every(Duration::from_millis(250));
        loop {
            let (_, diverged) = self.diverged_now(devices).await;
            if diverged.is_empty() || deadline.passed() {
                return diverged;
            }
            deadline.sleep().await;
        }
    }

    /// Polls until every device's rows equal PostgreSQL's, row by row; panics with the
    /// first difference, the slot's state and the components' logs at the deadline, or
    /// when a component exits.
    pub async fn wait_converged(&mut self, devices: &[&str]) {
        let deadline = Deadline::after(TIMEOUT, "the devices to converge").polling_every(Duration::from_millis(250));
        loop {
            let (expected, diverged) = self.diverged_now(devices).await;
            if diverged.is_empty() {
                return;
            }
            if deadline.passed() {
                let first_difference = self.first_difference(devices, &expected).await;
                panic!(
                    "devices did not converge within {TIMEOUT:?}; first difference: {first_difference}\n{}\n{}",
                    self.slot_state().await,
                    self.log_tails()
                );
            }
            self.assert_all_running();
            deadline.sleep().await;
        }
    }

    /// The last device row (over `devices`, in order) that differs from `expected`, for a
    /// failure message.
    async fn first_difference(&self, devices: &[&str], expected: &TableRows) -> String {
        let mut first_difference = String::new();
        for d in devices {
            let got = self.device_rows(d).await;
            for (table, rows) in expected {
                let theirs = got.get(table).cloned().unwrap_or_default();
                if let Some((k, v)) = rows.iter().find(|(k, v)| theirs.get(*k) != Some(*v)) {
                    first_difference = format!("device {d}, {table}, key {k}:\n postgres {v}\n device   {:?}", theirs.get(k));
                    break;
                }
                if let Some((k, v)) = theirs.iter().find(|(k, _)| !rows.contains_key(*k)) {
                    first_difference = format!("device {d}, {table}, key {k}: not in postgres\n device   {v}");
                    break;
                }
            }
        }
        first_difference
    }

    /// The slot's confirmed flush position, as a number of bytes of WAL.
    pub async fn slot_flushed(&self) -> i64 {
        let sql = "SELECT (confirmed_flush_lsn - '0/0'::pg_lsn)::bigint FROM pg_replication_slots WHERE slot_name = $1";
        self.client().await.query_one(sql, &[&self.name]).await.unwrap().get(0)
    }

    /// The server's current WAL position, as a number of bytes of WAL.
    pub async fn wal_position(&self) -> i64 {
        self.client().await.query_one("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint", &[]).await.unwrap().get(0)
    }

    /// The replication slot and its walsender as PostgreSQL sees them, and the deltas in
    /// Kafka, for a failure message.
    async fn slot_state(&self) -> String {
        let client = self.client().await;
        let row = client
            .query_opt(
                "SELECT s.active, s.confirmed_flush_lsn::text, r.state, r.sent_lsn::text, pg_current_wal_lsn()::text
                 FROM pg_replication_slots s LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid
                 WHERE s.slot_name = $1",
                &[&self.name],
            )
            .await;
        let slot = match row {
            Ok(Some(r)) => format!(
                "slot active={:?} confirmed_flush={:?} walsender={:?} sent={:?} server_wal={:?}",
                r.get::<_, bool>(0),
                r.get::<_, Option<String>>(1),
                r.get::<_, Option<String>>(2),
                r.get::<_, Option<String>>(3),
                r.get::<_, Option<String>>(4)
            ),
            Ok(None) => "no slot".to_string(),
            Err(e) => format!("slot state unknown: {e}"),
        };
        format!("{slot}; {} records in the deltas topic", self.delta_records())
    }

    /// The last lines of every component's log, for a failure message.
    fn log_tails(&self) -> String {
        let mut out = String::new();
        for label in self.children.keys() {
            out.push_str(&format!("--- {label}.log (last 30 lines)\n"));
            out.push_str(&log_tail(&self.log(label), 30));
        }
        out
    }

    /// A durable counter of a device store (0 before the store exists).
    pub fn store_counter(&self, device: &str, name: &str) -> i64 {
        if !self.store(device).exists() {
            return 0;
        }
        let conn = verify::open_store_read_only(&self.store(device)).unwrap();
        let created: i64 =
            conn.query_row("SELECT count(*) FROM sqlite_master WHERE name = '_pgfanout_counters'", [], |r| r.get(0)).unwrap();
        if created == 0 {
            return 0;
        }
        conn.query_row("SELECT coalesce((SELECT value FROM _pgfanout_counters WHERE name = ?1), 0)", [name], |r| r.get(0))
            .unwrap()
    }
}

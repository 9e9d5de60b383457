//! PostgreSQL's own logical replication as the benchmarks' reference: `pg_recvlogical`
//! streaming pgoutput from a slot of its own, over the same publication as capture.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{env, Process};

/// Creates logical slot `slot` (pgoutput) and starts `pg_recvlogical` (`PG_BINDIR`) on it,
/// writing what it receives to `output` without fsync and confirming each second; returns
/// once its walsender streams.
pub async fn start_recvlogical(client: &tokio_postgres::Client, conninfo: &str, slot: &str, output: &Path) -> Process {
    let recvlogical = format!("{}/pg_recvlogical", env("PG_BINDIR"));
    let created =
        Command::new(&recvlogical).args(["-d", conninfo, "--slot", slot, "--create-slot", "--plugin", "pgoutput"]).status();
    assert!(created.is_ok_and(|s| s.success()), "pg_recvlogical --create-slot {slot}");
    let process = Process(
        Command::new(&recvlogical)
            .args(["-d", conninfo, "--slot", slot, "--start", "--no-loop", "-F", "0", "-s", "1", "-f"])
            .arg(output)
            .args(["-o", "proto_version=1", "-o", "publication_names=pgfanout", "-o", "messages=true"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start pg_recvlogical: {e}")),
    );
    wait_streaming(client, slot).await;
    process
}

/// Waits until `slot`'s walsender is catching up or streaming.
pub async fn wait_streaming(client: &tokio_postgres::Client, slot: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let row = client
            .query_opt(
                "SELECT r.state FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid
                 WHERE s.slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap();
        if row.is_some_and(|r| matches!(r.get::<_, Option<String>>(0).as_deref(), Some("catchup" | "streaming"))) {
            return;
        }
        assert!(Instant::now() < deadline, "slot {slot} is not streaming");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Drops `slot` once its walsender has gone: a stopped `pg_recvlogical`'s walsender may
/// hold the slot a moment longer, all the more on a busy core.
pub async fn drop_slot_when_released(client: &tokio_postgres::Client, slot: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let active: bool = client
            .query_one("SELECT coalesce(bool_or(active), false) FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
            .await
            .unwrap()
            .get(0);
        if !active {
            break;
        }
        assert!(Instant::now() < deadline, "slot {slot} is still active");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    client.execute("SELECT pg_drop_replication_slot($1)", &[&slot]).await.unwrap();
}

/// Whether `slot`'s consumer has confirmed a position past `lsn` (text form).
pub async fn flushed_past(client: &tokio_postgres::Client, slot: &str, lsn: &str) -> bool {
    client
        .query_one(
            "SELECT coalesce(confirmed_flush_lsn > $2::text::pg_lsn, false) FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot, &lsn],
        )
        .await
        .unwrap()
        .get(0)
}

/// The current WAL insert position, in text form.
pub async fn current_lsn(client: &tokio_postgres::Client) -> String {
    client.query_one("SELECT pg_current_wal_insert_lsn()::text", &[]).await.unwrap().get(0)
}

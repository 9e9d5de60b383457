//! Plain SQL connections and queries the tests share.

use crate::pg;

/// A SQL connection to `conninfo` (TLS as its `sslmode` asks), served by a task of its own.
pub async fn sql_client(conninfo: &str) -> tokio_postgres::Client {
    pg::connect(conninfo).await.unwrap_or_else(|e| panic!("connect to {conninfo}: {e}"))
}

/// Rows in `pgfanout.instruction_log`: one per instruction that took effect or was refused.
pub async fn logged_count(client: &tokio_postgres::Client) -> i64 {
    client.query_one("SELECT count(*) FROM pgfanout.instruction_log", &[]).await.unwrap().get(0)
}

/// The ids in the executor's instruction log, in no particular order.
pub async fn logged_ids(client: &tokio_postgres::Client) -> Vec<String> {
    let rows = client.query("SELECT instruction_id FROM pgfanout.instruction_log", &[]).await.unwrap();
    rows.iter().map(|r| r.get(0)).collect()
}

/// Whether `slot`'s walsender streams: a slot being created is already `active` while it
/// waits for running transactions; its walsender reports `catchup` or `streaming` only
/// once START_REPLICATION runs from the consistent point.
pub async fn slot_streaming(client: &tokio_postgres::Client, slot: &str) -> bool {
    let sql = "SELECT r.state FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid
               WHERE s.slot_name = $1";
    let row = client.query_opt(sql, &[&slot]).await.unwrap();
    row.is_some_and(|r| matches!(r.get::<_, Option<String>>(0).as_deref(), Some("catchup" | "streaming")))
}

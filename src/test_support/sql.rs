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

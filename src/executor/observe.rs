//! The executor's metrics that more than one of its parts records.

use crate::pg;

/// Counts a PostgreSQL error by its SQLSTATE class (`status="23"`, …; `connection` when the
/// error carries no SQLSTATE because the connection itself failed).
pub(super) fn count_postgres_error(e: &tokio_postgres::Error) {
    let class = pg::sqlstate(e).and_then(|code| code.get(..2)).unwrap_or("connection").to_string();
    metrics::counter!("pgfanout_executor_postgres_errors_total", "status" => class).increment(1);
}

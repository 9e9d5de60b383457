//! PostgreSQL access shared by the components: connecting, the `pgfanout` schema, and
//! catalog look-ups (tables, columns, primary keys, publications).
//!
//! Identifiers that reach SQL text always come from the catalog and are quoted with
//! [`crate::quote::quote_ident`]; values are always bound parameters.

use std::fmt;

use postgres_openssl::MakeTlsConnector;
use tokio_postgres::{Client, NoTls};

use crate::conninfo::Conninfo;
use crate::contract::value::type_name_for_oid;
// Callers in capture still reach the quoting through here.
pub use crate::quote::{quote_ident, quote_literal};
use crate::tls::SslMode;

/// Connects with TLS as the connection string's `sslmode` and `sslrootcert` say
/// ([`crate::tls`]; [`check_conninfo`] explains bad values before the first connection).
pub async fn connect(conninfo: &str) -> Result<Client, tokio_postgres::Error> {
    let Ok(parsed) = Conninfo::parse(conninfo) else {
        // Left to tokio-postgres, which reports what is wrong with the string.
        let (client, connection) = tokio_postgres::connect(conninfo, NoTls).await?;
        spawn_connection(connection);
        return Ok(client);
    };
    let plain = parsed.to_tokio_postgres();
    let tls = parsed.tls;
    let client = match tls.connector() {
        Ok(connector) => {
            let mut connector = MakeTlsConnector::new(connector);
            let full = tls.mode == SslMode::VerifyFull;
            connector.set_callback(move |config, _| {
                config.set_verify_hostname(full);
                Ok(())
            });
            let (client, connection) = tokio_postgres::connect(&plain, connector).await?;
            spawn_connection(connection);
            client
        }
        Err(e) => {
            // Without a connector, only a connection that needs no TLS can be made: the
            // server's refusal (or tokio-postgres's) becomes the error.
            tracing::warn!(error = %e, "cannot set up TLS for postgres");
            let (client, connection) = tokio_postgres::connect(&plain, NoTls).await?;
            spawn_connection(connection);
            client
        }
    };
    Ok(client)
}

fn spawn_connection<S, T>(connection: tokio_postgres::Connection<S, T>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "postgres connection ended");
        }
    });
}

/// The primary key's columns of a table, in key order; empty when it has none.
pub async fn primary_key_columns(client: &Client, table_oid: u32) -> Result<Vec<String>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT a.attname::text
               FROM pg_index i
               CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, n)
               JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
              WHERE i.indrelid = $1 AND i.indisprimary
              ORDER BY k.n",
            &[&table_oid],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Explains what is wrong with a connection string's TLS settings, if anything.
pub fn check_conninfo(conninfo: &str) -> Result<(), String> {
    let Conninfo { tls, .. } = Conninfo::parse(conninfo).map_err(|e| e.to_string())?;
    tls.connector().map(drop).map_err(|e| format!("cannot set up TLS for postgres: {e}"))
}

/// The executor's bookkeeping: one row per instruction, written in the same transaction as
/// the instruction's effects, so a redelivered instruction finds its outcome.
pub const SCHEMA_SQL: &str = "
CREATE SCHEMA IF NOT EXISTS pgfanout;
CREATE TABLE IF NOT EXISTS pgfanout.instruction_log (
    instruction_id text PRIMARY KEY,
    issued_by text NOT NULL,
    status text NOT NULL CHECK (status IN ('committed', 'rejected', 'failed')),
    error_code text,
    error_message text,
    rows_affected bigint NOT NULL,
    commit_lsn bigint,
    executed_at bigint NOT NULL
);
-- SHA-256 of the instruction's content (issued_by and operations): a reused id with other
-- content is refused instead of answered with this row's result.
ALTER TABLE pgfanout.instruction_log ADD COLUMN IF NOT EXISTS content_digest bytea;
-- Capture's initial snapshots, one row per slot: started, and finished once Kafka has
-- acknowledged every row of it.
CREATE TABLE IF NOT EXISTS pgfanout.capture_snapshots (
    slot text PRIMARY KEY,
    snapshot_lsn pg_lsn,
    started_at timestamptz NOT NULL,
    finished_at timestamptz,
    rows bigint NOT NULL DEFAULT 0
);
";

pub async fn ensure_schema(client: &Client) -> Result<(), tokio_postgres::Error> {
    client.batch_execute(SCHEMA_SQL).await
}

/// A table name as written in instructions and deltas: `schema.table`, or `table` in
/// schema `public`. Parsing is strict: exactly one optional dot, no quoting.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

impl TableName {
    pub fn new(schema: impl Into<String>, name: impl Into<String>) -> Self {
        TableName { schema: schema.into(), name: name.into() }
    }

    pub fn parse(s: &str) -> Option<TableName> {
        let (schema, name) = match s.split_once('.') {
            Some((schema, name)) => (schema, name),
            None => ("public", s),
        };
        if schema.is_empty() || name.is_empty() || name.contains('.') {
            return None;
        }
        Some(TableName::new(schema, name))
    }

    /// `"schema"."table"` for SQL text.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnInfo {
    pub name: String,
    /// `format_type(atttypid, NULL)`: the type as SQL accepts it in a cast, without its
    /// modifier (which the assignment to the column applies and checks).
    pub type_sql: String,
    /// The type's name as capture reports it (`pg_type.typname`).
    pub type_name: String,
    pub is_key: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableInfo {
    pub name: TableName,
    pub columns: Vec<ColumnInfo>,
}

impl TableInfo {
    pub fn column(&self, name: &str) -> Option<&ColumnInfo> {
        self.columns.iter().find(|c| c.name == name)
    }

    pub fn key_columns(&self) -> impl Iterator<Item = &ColumnInfo> {
        self.columns.iter().filter(|c| c.is_key)
    }
}

/// Columns of an ordinary or partitioned table, with its primary key; `None` if there is
/// no such table.
pub async fn table_info(client: &Client, table: &TableName) -> Result<Option<TableInfo>, tokio_postgres::Error> {
    let rows = client
        .query(
            // A domain is carried as its base type, a domain over a domain too (as pgoutput describes it). The cast type
            // has no modifier: a cast to varchar(5) truncates silently, while the assignment
            // to the column checks the modifier and refuses (22001), as a hand-written
            // INSERT does.
            "SELECT a.attname::text, format_type(a.atttypid, NULL), coalesce(bt.typname, t.typname)::text,
                    coalesce(bt.oid, t.oid), coalesce(a.attnum = ANY(i.indkey), false)
               FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace
               JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
               JOIN pg_type t ON t.oid = a.atttypid
               LEFT JOIN LATERAL (WITH RECURSIVE d(oid, typname, typtype, typbasetype) AS (
                                        SELECT t.oid, t.typname, t.typtype, t.typbasetype
                                        UNION ALL
                                        SELECT b.oid, b.typname, b.typtype, b.typbasetype FROM d JOIN pg_type b ON b.oid = d.typbasetype WHERE d.typtype = 'd')
                                      SELECT oid, typname FROM d WHERE typtype <> 'd') bt ON t.typtype = 'd'
               LEFT JOIN pg_index i ON i.indrelid = c.oid AND i.indisprimary
              WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')
              ORDER BY a.attnum",
            &[&table.schema, &table.name],
        )
        .await?;
    if rows.is_empty() {
        return Ok(None);
    }
    let columns = rows
        .iter()
        .map(|r| {
            let oid: u32 = r.get(3);
            let typname: String = r.get(2);
            ColumnInfo {
                name: r.get(0),
                type_sql: r.get(1),
                type_name: type_name_for_oid(oid).map(str::to_string).unwrap_or(typname),
                is_key: r.get(4),
            }
        })
        .collect();
    Ok(Some(TableInfo { name: table.clone(), columns }))
}

/// The tables of a publication, sorted.
pub async fn publication_tables(client: &Client, publication: &str) -> Result<Vec<TableName>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1 ORDER BY 1, 2",
            &[&publication],
        )
        .await?;
    Ok(rows.iter().map(|r| TableName::new(r.get::<_, String>(0), r.get::<_, String>(1))).collect())
}

pub async fn publication_exists(client: &Client, publication: &str) -> Result<bool, tokio_postgres::Error> {
    let row = client.query_one("SELECT count(*) FROM pg_publication WHERE pubname = $1", &[&publication]).await?;
    Ok(row.get::<_, i64>(0) > 0)
}

/// Why the publication gives capture and the executor nothing to work on, if it does: it
/// does not exist, or it has no tables.
pub async fn publication_problem(client: &Client, publication: &str) -> Result<Option<String>, tokio_postgres::Error> {
    if !publication_exists(client, publication).await? {
        return Ok(Some(format!(
            "publication {publication:?} does not exist: create it with `CREATE PUBLICATION {} FOR TABLE <schema.table>, ...`",
            quote_ident(publication)
        )));
    }
    if publication_tables(client, publication).await?.is_empty() {
        return Ok(Some(format!(
            "publication {publication:?} has no tables: add them with `ALTER PUBLICATION {} ADD TABLE <schema.table>`",
            quote_ident(publication)
        )));
    }
    Ok(None)
}

/// The SQLSTATE of a PostgreSQL error, if the server sent one.
pub fn sqlstate(err: &tokio_postgres::Error) -> Option<&str> {
    crate::sqlstate::of(err)
}

/// Errors that may go away by retrying ([`crate::sqlstate::is_transient`]).
pub fn is_transient(err: &tokio_postgres::Error) -> bool {
    crate::sqlstate::is_transient(sqlstate(err))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_parse_strictly() {
        assert_eq!(TableName::parse("items"), Some(TableName::new("public", "items")));
        assert_eq!(TableName::parse("s.t"), Some(TableName::new("s", "t")));
        assert_eq!(TableName::parse("a.b.c"), None);
        assert_eq!(TableName::parse(".t"), None);
        assert_eq!(TableName::parse("s."), None);
        assert_eq!(TableName::new("a\"b", "c").quoted(), "\"a\"\"b\".\"c\"");
    }
}

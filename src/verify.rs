//! Compares device stores with PostgreSQL, table by table: row count and an
//! order-independent checksum of the rows' values, plus the keys of the first differences.
//!
//! Both sides are reduced to the same canonical form through the project's one value
//! conversion ([`crate::contract::Value`]), so a match means every row holds the same typed
//! values, not merely similar text.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rusqlite::Connection;
use tokio_postgres::SimpleQueryMessage;

use crate::capture::refused::publishes_generated_columns;
use crate::conninfo::text_output_settings_sql;
use crate::contract::Value;
use crate::device::store::{open_read_only, value_from_sqlite, StoreReader};
use crate::pg::{self, TableInfo};
use crate::quote::quote_ident;

/// The rows of one table: canonical key → canonical row.
pub type Rows = BTreeMap<String, String>;

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("device store {path}: {source}")]
    Store { path: PathBuf, source: rusqlite::Error },
    #[error("{0}")]
    Other(String),
}

/// Count and checksum of a table's rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub rows: usize,
    pub checksum: u64,
}

pub fn summarize(rows: &Rows) -> Summary {
    let checksum =
        rows.iter().fold(0u64, |acc, (k, v)| acc.wrapping_add(fnv1a(k.as_bytes()) ^ fnv1a(v.as_bytes()).rotate_left(1)));
    Summary { rows: rows.len(), checksum }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

fn canonical(columns: &[(String, Value)]) -> String {
    let mut s = String::new();
    for (name, value) in columns {
        s.push_str(name);
        s.push('=');
        value.write_canonical(&mut s);
        s.push(';');
    }
    s
}

/// Reads every row of a table from PostgreSQL in canonical form. The simple query protocol
/// returns each value as its type's text output — the same text pgoutput sends (a `::text`
/// cast would differ, e.g. it trims `char(n)` padding).
pub async fn postgres_rows(client: &tokio_postgres::Client, table: &TableInfo) -> Result<Rows, VerifyError> {
    let select = table.columns.iter().map(|c| quote_ident(&c.name)).collect::<Vec<_>>().join(", ");
    // In PostgreSQL's text as capture reads it, whatever the session's own settings; SET
    // LOCAL leaves the caller's session as it was.
    let sql = format!("BEGIN; {}SELECT {select} FROM {}; COMMIT", text_output_settings_sql(true), table.name.quoted());
    let messages = client.simple_query(&sql).await?;
    let mut out = Rows::new();
    for message in messages {
        let SimpleQueryMessage::Row(row) = message else { continue };
        let mut key = Vec::new();
        let mut all = Vec::new();
        for (i, c) in table.columns.iter().enumerate() {
            let value = match row.get(i) {
                None => Value::Null,
                Some(t) => Value::from_pg_text(&c.type_name, t).map_err(|e| VerifyError::Other(e.to_string()))?,
            };
            if c.is_key {
                key.push((c.name.clone(), value.clone()));
            }
            all.push((c.name.clone(), value));
        }
        out.insert(canonical(&key), canonical(&all));
    }
    Ok(out)
}

/// Reads the live (not deleted) rows of a table from a device store in canonical form,
/// with the columns PostgreSQL has; a column the device never saw reads as NULL.
pub fn device_rows(conn: &Connection, table: &TableInfo) -> Result<Rows, rusqlite::Error> {
    let name = table.name.to_string();
    let reader = StoreReader::new(conn);
    let known = reader.known_columns(&name)?;
    let mut out = Rows::new();
    if known.is_empty() {
        return Ok(out);
    }
    let present: Vec<&crate::pg::ColumnInfo> = table.columns.iter().filter(|c| known.contains(&c.name)).collect();
    let columns: Vec<&str> = present.iter().map(|c| c.name.as_str()).collect();
    reader.for_each_live_row(&name, &columns, |row| {
        let mut key = Vec::new();
        let mut all = Vec::new();
        for c in &table.columns {
            let value = match present.iter().position(|p| p.name == c.name) {
                Some(i) => value_from_sqlite(&c.type_name, row.get_ref(i)?),
                None => Value::Null,
            };
            if c.is_key {
                key.push((c.name.clone(), value.clone()));
            }
            all.push((c.name.clone(), value));
        }
        out.insert(canonical(&key), canonical(&all));
        Ok(())
    })?;
    Ok(out)
}

pub fn open_store_read_only(path: &Path) -> Result<Connection, VerifyError> {
    open_read_only(path).map_err(|source| VerifyError::Store { path: path.to_path_buf(), source })
}

/// A published table as capture replicates it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replicated {
    /// The columns capture sends, keyed as devices key the rows.
    Table(TableInfo),
    /// Capture refuses the table (no key); why.
    Refused(String),
    /// No such table.
    Missing,
}

/// The table as capture replicates it: only the columns the publication sends (its column
/// list; never generated columns before PostgreSQL 18, nor on 18 unless the publication has
/// `publish_generated_columns = stored`), keyed by the primary key or else, as capture
/// keys it, the replica identity index; refused when it has neither, as capture refuses it.
pub async fn replicated_table(
    client: &tokio_postgres::Client,
    publication: &str,
    name: &pg::TableName,
) -> Result<Replicated, VerifyError> {
    let Some(mut info) = pg::table_info(client, name).await? else { return Ok(Replicated::Missing) };
    let published: Option<Vec<String>> = client
        .query_opt(
            "SELECT attnames::text[] FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
            &[&publication, &name.schema, &name.name],
        )
        .await?
        .and_then(|r| r.get(0));
    if let Some(published) = published {
        info.columns.retain(|c| published.contains(&c.name));
    }
    if !publishes_generated_columns(client, publication).await? {
        // PostgreSQL 15 lists generated columns among a publication's columns, yet sends none.
        let generated: Vec<String> = client
            .query(
                "SELECT a.attname::text FROM pg_attribute a
                   JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE n.nspname = $1 AND c.relname = $2 AND a.attgenerated <> ''",
                &[&name.schema, &name.name],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        info.columns.retain(|c| !generated.contains(&c.name));
    }
    if info.key_columns().next().is_none() {
        let identity: Vec<String> = client
            .query(
                "SELECT a.attname::text FROM pg_index i
                   JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace
                   JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = ANY (i.indkey)
                  WHERE n.nspname = $1 AND c.relname = $2 AND i.indisreplident",
                &[&name.schema, &name.name],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        for c in &mut info.columns {
            c.is_key = identity.contains(&c.name);
        }
    }
    if info.key_columns().next().is_none() {
        return Ok(Replicated::Refused(format!("{name} has no primary key and no replica identity index; capture refuses it")));
    }
    Ok(Replicated::Table(info))
}

/// How one table of one device compares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableComparison {
    pub table: String,
    pub postgres: Summary,
    pub device: Summary,
    /// Up to five keys that are missing, extra or different on the device.
    pub sample_differences: Vec<String>,
}

impl TableComparison {
    pub fn matches(&self) -> bool {
        self.postgres == self.device && self.sample_differences.is_empty()
    }
}

pub fn compare(table: &str, postgres: &Rows, device: &Rows) -> TableComparison {
    let mut diffs = Vec::new();
    for (k, v) in postgres {
        if diffs.len() >= 5 {
            break;
        }
        match device.get(k) {
            None => diffs.push(format!("missing {k}")),
            Some(d) if d != v => diffs.push(format!("different {k}")),
            Some(_) => {}
        }
    }
    for k in device.keys() {
        if diffs.len() >= 5 {
            break;
        }
        if !postgres.contains_key(k) {
            diffs.push(format!("extra {k}"));
        }
    }
    TableComparison {
        table: table.to_string(),
        postgres: summarize(postgres),
        device: summarize(device),
        sample_differences: diffs,
    }
}

/// The outcome for every device.
#[derive(Debug, Clone)]
pub struct Report {
    pub postgres_rows: usize,
    pub devices: Vec<(PathBuf, Vec<TableComparison>)>,
    /// Published tables not compared, each with why.
    pub skipped: Vec<String>,
}

impl Report {
    pub fn matching_devices(&self) -> usize {
        self.devices.iter().filter(|(_, t)| t.iter().all(TableComparison::matches)).count()
    }

    /// The last line of `pgfanout verify`.
    pub fn summary_line(&self) -> String {
        let skipped: String = self.skipped.iter().map(|s| format!("; not compared: {s}")).collect();
        format!(
            "verified: {} of {} devices match postgres ({} rows){skipped}",
            self.matching_devices(),
            self.devices.len(),
            self.postgres_rows
        )
    }
}

/// Compares every store with the publication's tables in PostgreSQL.
pub async fn verify(conninfo: &str, publication: &str, stores: &[PathBuf]) -> Result<Report, VerifyError> {
    let client = pg::connect(conninfo).await?;
    let mut tables = Vec::new();
    let mut skipped = Vec::new();
    for name in pg::publication_tables(&client, publication).await? {
        match replicated_table(&client, publication, &name).await? {
            Replicated::Table(info) => {
                let rows = postgres_rows(&client, &info).await?;
                tables.push((info, rows));
            }
            Replicated::Refused(why) => skipped.push(why),
            Replicated::Missing => {}
        }
    }
    let postgres_rows = tables.iter().map(|(_, r)| r.len()).sum();
    let mut devices = Vec::new();
    for path in stores {
        let conn = open_store_read_only(path)?;
        let mut comparisons = Vec::new();
        for (info, pg_rows) in &tables {
            let rows = device_rows(&conn, info).map_err(|source| VerifyError::Store { path: path.clone(), source })?;
            comparisons.push(compare(&info.name.to_string(), pg_rows, &rows));
        }
        devices.push((path.clone(), comparisons));
    }
    Ok(Report { postgres_rows, devices, skipped })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_ignores_order_but_not_content() {
        let mut a = Rows::new();
        a.insert("k1".into(), "v1".into());
        a.insert("k2".into(), "v2".into());
        let mut b = Rows::new();
        b.insert("k2".into(), "v2".into());
        b.insert("k1".into(), "v1".into());
        assert_eq!(summarize(&a), summarize(&b));
        b.insert("k1".into(), "v1'".into());
        assert_ne!(summarize(&a), summarize(&b));
        let c = compare("t", &a, &b);
        assert!(!c.matches());
        assert_eq!(c.sample_differences, vec!["different k1".to_string()]);
    }
}

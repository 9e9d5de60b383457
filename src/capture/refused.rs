//! Published tables capture cannot replicate, refused by name instead of sent broken.
//!
//! A table without a primary key and without a replica identity index (`REPLICA IDENTITY
//! DEFAULT` with no primary key, or `NOTHING`) gives pgoutput no key columns: its deltas
//! would carry an empty key, which every device rejects, and its updates and deletes cannot
//! name a row at all. Capture refuses such a table when its Relation message arrives (and
//! the initial snapshot does not copy it): one error in the log naming the table and what
//! to do, the `pgfanout_capture_refused_tables` gauge, and its changes skipped and counted
//! in `pgfanout_capture_refused_changes_total`. Every other table goes on. Once the table
//! has a key (`ALTER TABLE … ADD PRIMARY KEY`, or `REPLICA IDENTITY USING INDEX` on a
//! unique index of NOT NULL columns), PostgreSQL sends a new Relation message before its
//! next change and capture takes the table again; rows written while it was refused reach
//! devices only when they change again or with a new snapshot (`--snapshot always`).

use std::collections::HashSet;

use super::pgoutput::Relation;

/// Why `rel` cannot be replicated, if it cannot: the error message, naming what to do.
pub fn refusal(rel: &Relation) -> Option<String> {
    if rel.columns.iter().any(|c| c.is_key) {
        return None;
    }
    let table = format!("{}.{}", rel.namespace, rel.name);
    Some(format!(
        "table {table} has no primary key and no replica identity index, so its rows cannot be told apart on devices; \
         its changes are skipped until it has one: ALTER TABLE {table} ADD PRIMARY KEY (…), or \
         ALTER TABLE {table} REPLICA IDENTITY USING INDEX <unique index on NOT NULL columns>; \
         or remove it from the publication"
    ))
}

/// The relations refused so far in this replication session, by id (PostgreSQL describes
/// every relation again in each session, before its first change).
pub struct RefusedTables {
    ids: HashSet<u32>,
}

impl Default for RefusedTables {
    /// None refused yet; both metrics are exported from the start.
    fn default() -> Self {
        metrics::gauge!("pgfanout_capture_refused_tables").set(0.0);
        metrics::counter!("pgfanout_capture_refused_changes_total").increment(0);
        RefusedTables { ids: HashSet::new() }
    }
}

impl RefusedTables {
    /// Takes a Relation message: refuses the table (logging why, once per description) or
    /// takes it back once it has a key.
    pub fn on_relation(&mut self, rel: &Relation) {
        match refusal(rel) {
            Some(why) => {
                if self.ids.insert(rel.id) {
                    tracing::error!(table = %format!("{}.{}", rel.namespace, rel.name), "{why}");
                }
            }
            None => {
                if self.ids.remove(&rel.id) {
                    tracing::info!(table = %format!("{}.{}", rel.namespace, rel.name), "table has a key now; its changes are captured again");
                }
            }
        }
        metrics::gauge!("pgfanout_capture_refused_tables").set(self.ids.len() as f64);
    }

    /// Whether a change of `relation_id` is skipped; counts it if so.
    pub fn skips(&self, relation_id: u32) -> bool {
        let refused = self.ids.contains(&relation_id);
        if refused {
            metrics::counter!("pgfanout_capture_refused_changes_total").increment(1);
        }
        refused
    }
}

/// Whether pgoutput sends the publication's stored generated columns: from PostgreSQL 18
/// on, when the publication has `publish_generated_columns = stored`; never before.
pub async fn publishes_generated_columns(
    client: &tokio_postgres::Client,
    publication: &str,
) -> Result<bool, tokio_postgres::Error> {
    let version: i32 = client.query_one("SELECT current_setting('server_version_num')::int", &[]).await?.get(0);
    if version < 180_000 {
        return Ok(false);
    }
    let row = client.query_opt("SELECT pubgencols::text = 's' FROM pg_publication WHERE pubname = $1", &[&publication]).await?;
    Ok(row.is_some_and(|r| r.get(0)))
}

/// Logs, at start, the published tables whose generated columns devices will not get:
/// pgoutput sends stored generated columns only from PostgreSQL 18 on, and only when the
/// publication has `publish_generated_columns = stored`. Only a warning: the other columns
/// replicate, and `verify` compares only the columns capture sends.
pub async fn warn_unpublished_generated_columns(
    client: &tokio_postgres::Client,
    publication: &str,
) -> Result<(), tokio_postgres::Error> {
    if publishes_generated_columns(client, publication).await? {
        return Ok(());
    }
    let version: i32 = client.query_one("SELECT current_setting('server_version_num')::int", &[]).await?.get(0);
    let rows = client
        .query(
            "SELECT pt.schemaname::text || '.' || pt.tablename::text, string_agg(a.attname::text, ', ' ORDER BY a.attnum)
               FROM pg_publication_tables pt
               JOIN pg_namespace n ON n.nspname = pt.schemaname
               JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename
               JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated <> ''
              WHERE pt.pubname = $1
              GROUP BY 1 ORDER BY 1",
            &[&publication],
        )
        .await?;
    for row in rows {
        let (table, columns): (String, String) = (row.get(0), row.get(1));
        let todo = if version >= 180_000 {
            format!(
                "ALTER PUBLICATION {} SET (publish_generated_columns = stored) sends them",
                crate::pg::quote_ident(publication)
            )
        } else {
            "PostgreSQL 18 and later can send them (publish_generated_columns); devices can compute them".to_string()
        };
        tracing::warn!(table = %table, columns = %columns, "generated columns are not published, so devices do not get them; {todo}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::pgoutput::RelationColumn;

    fn rel(key: bool) -> Relation {
        Relation {
            id: 3,
            namespace: "public".into(),
            name: "logs".into(),
            replica_identity: b'd',
            columns: vec![RelationColumn { is_key: key, name: "line".into(), type_oid: 25, type_modifier: -1 }],
        }
    }

    #[test]
    fn a_table_without_key_is_refused_until_it_has_one() {
        let mut refused = RefusedTables::default();
        let why = refusal(&rel(false)).unwrap();
        assert!(why.contains("public.logs") && why.contains("ADD PRIMARY KEY") && why.contains("USING INDEX"), "{why}");
        refused.on_relation(&rel(false));
        assert!(refused.skips(3));
        assert!(!refused.skips(4));
        refused.on_relation(&rel(true));
        assert!(!refused.skips(3));
    }
}

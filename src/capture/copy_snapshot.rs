//! The snapshot a copy reads under (the initial snapshot, and the online copy after DDL):
//! exported by a temporary slot, read by a connection that has a cursor open over every
//! table to copy, and checked to show each of those tables as it still is.
//!
//! Why the check. The tables' columns are read under the snapshot, but a cursor's query is
//! parsed against a table's current definition, and a table rewritten (`ALTER COLUMN …
//! TYPE`, a volatile default) or truncated after the snapshot looks empty under it (neither
//! is MVCC-safe). DDL committed on a table between the snapshot and its cursor would make
//! the copy fail, or copy nothing and so empty the table on devices until a later copy. An
//! open cursor keeps its table locked (`ACCESS SHARE`) until the copy ends, so no DDL
//! commits on it after that; what committed before is found by comparing each table's
//! storage and columns under the snapshot with the catalog as it is now. When they differ,
//! or a cursor cannot be opened, the snapshot is given up before anything was sent and a
//! new one is taken: its consistent point is later, which every argument about the copy's
//! version allows (`snapshot`, `recopy`).

use tokio_postgres::Client;

use super::error::CaptureError;
use super::flush::Lsn;
use super::pgoutput::{Relation, RelationColumn};
use super::replication::{ReplicationClient, ReplicationConfig};
use crate::{pg, quote};

/// Snapshots given up, one after another, before capture gives up the copy.
const ATTEMPTS: u32 = 20;

/// Each table's relation OID, storage and columns (dropped ones included): what a rewrite,
/// a truncate or a change of columns changes.
const SHAPE_SQL: &str = "
SELECT c.oid::text || ' ' || c.relfilenode::text || ' '
       || coalesce(string_agg(a.attnum || ':' || a.attname || ':' || a.atttypid || ':' || a.atttypmod || ':' || a.attisdropped,
                              ',' ORDER BY a.attnum), '')
  FROM pg_class c
  LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0
 WHERE c.oid IN (SELECT t.oid FROM unnest($1::oid[]) t(oid)
                 UNION SELECT p.relid FROM unnest($1::oid[]) t(oid), pg_partition_tree(t.oid) p)
 GROUP BY c.oid, c.relfilenode
 ORDER BY c.oid";

/// A snapshot with the cursors of its tables open.
pub(super) struct CopySnapshot {
    /// The temporary slot's consistent point: transactions committed before it are in the
    /// snapshot, those after are not.
    pub(super) consistent_point: Lsn,
    /// The connection reading under the snapshot; table `i`'s cursor is [`cursor`]`(i)`.
    pub(super) reader: Client,
    /// The tables to copy, as the snapshot sees them.
    pub(super) tables: Vec<SnapshotTable>,
    /// Keeps the snapshot alive; idle while it is in use.
    holder: ReplicationClient,
}

/// The name of the cursor over table `i` of a [`CopySnapshot`].
pub(super) fn cursor(i: usize) -> String {
    format!("pgfanout_copy_{i}")
}

impl CopySnapshot {
    /// Takes a snapshot of the publication's tables that `wanted` keeps (temporary slots
    /// named after `name`, at most 50 characters), with their cursors open and nothing
    /// changed under it.
    pub(super) async fn take(
        cfg: &ReplicationConfig,
        conninfo: &str,
        publication: &str,
        name: &str,
        wanted: impl Fn(&SnapshotTable) -> bool,
    ) -> Result<CopySnapshot, CaptureError> {
        for attempt in 1..=ATTEMPTS {
            // A slot ends with its session, which the server may not have finished when the
            // next is created: each attempt has its own name.
            let slot = format!("{name}_{}_{attempt}", std::process::id());
            let mut holder = ReplicationClient::connect(cfg).await?;
            let created = holder.create_temporary_slot_with_snapshot(&slot).await?;
            let snapshot = created.snapshot_name.ok_or_else(|| CaptureError::Config("the server exported no snapshot".into()))?;
            let reader = pg::connect(conninfo).await?;
            reader
                .batch_execute(&format!(
                    "{}BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
                    crate::conninfo::text_output_settings_sql(false),
                    quote::quote_literal(&snapshot)
                ))
                .await?;
            let tables: Vec<SnapshotTable> = published_tables(&reader, publication).await?.into_iter().filter(&wanted).collect();
            match open_cursors(&reader, conninfo, &tables).await {
                Ok(true) => return Ok(CopySnapshot { consistent_point: created.consistent_point, reader, tables, holder }),
                Ok(false) => tracing::info!(attempt, "a table to copy changed after the snapshot was taken; taking another"),
                Err(e) if changed_meanwhile(&e) => {
                    let error = e.as_db_error().map_or_else(|| e.to_string(), |db| db.message().to_string());
                    tracing::info!(attempt, error, "a table to copy changed after the snapshot was taken; taking another");
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(CaptureError::Config(format!(
            "{ATTEMPTS} snapshots in a row saw a table to copy change before its copy could begin; \
             is DDL running on the published tables without pause?"
        )))
    }

    /// Ends the snapshot.
    pub(super) async fn finish(self) -> Result<(), CaptureError> {
        self.reader.batch_execute("COMMIT").await?;
        drop(self.holder);
        Ok(())
    }
}

/// Opens a cursor over each of `tables` in `reader`'s snapshot; true when each table is, now
/// that the cursors lock them, what the snapshot sees (module doc).
async fn open_cursors(reader: &Client, conninfo: &str, tables: &[SnapshotTable]) -> Result<bool, tokio_postgres::Error> {
    for (i, table) in tables.iter().enumerate() {
        let relation = &table.relation;
        let columns: Vec<String> = relation.columns.iter().map(|c| quote::quote_ident(&c.name)).collect();
        let filter = table.filter.as_ref().map(|f| format!(" WHERE ({f})")).unwrap_or_default();
        let source = format!("{}.{}", quote::quote_ident(&relation.namespace), quote::quote_ident(&relation.name));
        reader
            .batch_execute(&format!(
                "DECLARE {} NO SCROLL CURSOR FOR SELECT {} FROM {}{source}{filter}",
                cursor(i),
                columns.join(", "),
                // A partitioned table published through its root holds its rows in its
                // partitions; any other table's own rows only.
                if table.partitioned { "" } else { "ONLY " }
            ))
            .await?;
    }
    if tables.is_empty() {
        return Ok(true);
    }
    let oids: Vec<u32> = tables.iter().map(|t| t.relation.id).collect();
    let shapes = |rows: Vec<tokio_postgres::Row>| rows.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>();
    let seen = shapes(reader.query(SHAPE_SQL, &[&oids]).await?);
    let now = shapes(pg::connect(conninfo).await?.query(SHAPE_SQL, &[&oids]).await?);
    Ok(seen == now)
}

/// An error opening a cursor because a table or column the snapshot sees is gone.
fn changed_meanwhile(e: &tokio_postgres::Error) -> bool {
    matches!(pg::sqlstate(e), Some("42P01" | "42703"))
}

/// A published table as the snapshot sees it.
pub(super) struct SnapshotTable {
    pub(super) relation: Relation,
    /// Non-built-in column types: (oid, namespace, name), as pgoutput's Type messages.
    pub(super) types: Vec<(u32, String, String)>,
    /// The publication's row filter, if any.
    pub(super) filter: Option<String>,
    pub(super) partitioned: bool,
}

/// The publication's tables as the snapshot transaction sees them, described the way
/// pgoutput's Relation and Type messages describe them: published columns only (column
/// lists), generated columns only where pgoutput sends them, key flags from the replica identity (the primary
/// key under `REPLICA IDENTITY FULL`, as streaming uses).
pub(super) async fn published_tables(reader: &Client, publication: &str) -> Result<Vec<SnapshotTable>, CaptureError> {
    let tables = reader
        .query(
            "SELECT c.oid, pt.schemaname::text, pt.tablename::text, c.relreplident::text, pt.attnames::text[], pt.rowfilter,
                    c.relkind = 'p'
               FROM pg_publication_tables pt
               JOIN pg_namespace n ON n.nspname = pt.schemaname
               JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename
              WHERE pt.pubname = $1
              ORDER BY 2, 3",
            &[&publication],
        )
        .await?;
    let generated = super::refused::publishes_generated_columns(reader, publication).await?;
    let mut out = Vec::with_capacity(tables.len());
    for t in tables {
        let oid: u32 = t.get(0);
        let published: Option<Vec<String>> = t.get(4);
        let columns = reader
            .query(
                // A domain is described by its base type, as pgoutput's Type message does.
                "SELECT a.attname::text, ty.oid, a.atttypmod,
                        CASE c.relreplident
                          WHEN 'f' THEN coalesce(a.attnum = ANY ((SELECT i.indkey FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)::int2[]),
                                                 NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary))
                          WHEN 'd' THEN coalesce(a.attnum = ANY ((SELECT i.indkey FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)::int2[]), false)
                          WHEN 'i' THEN coalesce(a.attnum = ANY ((SELECT i.indkey FROM pg_index i WHERE i.indrelid = c.oid AND i.indisreplident)::int2[]), false)
                          ELSE false END,
                        tn.nspname::text, ty.typname::text
                   FROM pg_attribute a
                   JOIN pg_class c ON c.oid = a.attrelid
                   JOIN LATERAL (WITH RECURSIVE b(oid, typtype, typbasetype) AS (
                                   SELECT t.oid, t.typtype, t.typbasetype FROM pg_type t WHERE t.oid = a.atttypid
                                   UNION ALL
                                   SELECT t.oid, t.typtype, t.typbasetype FROM b JOIN pg_type t ON t.oid = b.typbasetype WHERE b.typtype = 'd')
                                 SELECT oid FROM b WHERE typtype <> 'd') base ON true
                   JOIN pg_type ty ON ty.oid = base.oid
                   JOIN pg_namespace tn ON tn.oid = ty.typnamespace
                  WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
                    AND (a.attgenerated = '' OR $2)
                  ORDER BY a.attnum",
                &[&oid, &generated],
            )
            .await?;
        let mut relation = Relation {
            id: oid,
            namespace: t.get(1),
            name: t.get(2),
            replica_identity: t.get::<_, String>(3).bytes().next().unwrap_or(b'd'),
            columns: Vec::with_capacity(columns.len()),
        };
        let mut types = Vec::new();
        for c in columns {
            let name: String = c.get(0);
            if published.as_ref().is_some_and(|p| !p.contains(&name)) {
                continue;
            }
            let type_oid: u32 = c.get(1);
            // pgoutput describes only types outside the built-in range with a Type message.
            if type_oid >= FIRST_NON_BUILTIN_OID {
                types.push((type_oid, c.get(4), c.get(5)));
            }
            relation.columns.push(RelationColumn { is_key: c.get(3), name, type_oid, type_modifier: c.get(2) });
        }
        out.push(SnapshotTable { relation, types, filter: t.get(5), partitioned: t.get(6) });
    }
    Ok(out)
}

/// PostgreSQL's `FirstGenbkiObjectId`: OIDs below it are built in.
const FIRST_NON_BUILTIN_OID: u32 = 10_000;

//! Turns decoded pgoutput messages, and rows read outside the stream, into deltas.
//!
//! Pure: keeps the relation and type descriptions PostgreSQL sent, the open transaction's
//! identity (commit LSN, timestamp, xid), the position of each change inside it (`seq`,
//! advanced here with every delta produced, so no caller numbers changes) and the
//! instruction id announced by the executor's logical message, and produces one [`Delta`]
//! per row change and per truncated table. Unchanged TOASTed values are marked `unchanged`
//! and never turned into NULL.
//!
//! [`RowDeltas`] types and versions the snapshot's rows exactly as streamed rows are, from
//! the same [`Relation`] description, without going through pgoutput messages.

use std::collections::HashMap;

use super::pgoutput::{OldTuple, PgOutputMessage, Relation, TupleValue};
use super::refused::RefusedTables;
use crate::contract::value::type_name_for_oid;
use crate::contract::{Column, Delta, DeltaOp, Value, CORRELATION_PREFIX, PG_EPOCH_OFFSET_MICROS};

#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Begin,
    Delta(Delta),
    /// One delta per truncated table. A truncate touches rows in every partition, so each
    /// goes to every partition.
    Truncate(Vec<Delta>),
    Commit {
        end_lsn: u64,
    },
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ChangeError {
    #[error("change for relation {0} arrived before its Relation message")]
    UnknownRelation(u32),
    #[error("{0} message outside a transaction")]
    OutsideTransaction(&'static str),
    #[error("tuple of {table} has {got} values for {expected} columns")]
    TupleShape { table: String, got: usize, expected: usize },
}

/// The transaction the deltas being produced belong to: their version (commit LSN, then
/// `seq`) and what each of them carries.
struct TxFrame {
    commit_lsn: u64,
    /// Unix microseconds.
    commit_ts: i64,
    xid: u32,
    /// Position of the next delta inside the transaction.
    seq: i64,
    instruction_id: Option<String>,
}

impl TxFrame {
    /// The next delta of this transaction; advances `seq`.
    fn delta(&mut self, lsn: u64, rel: &Relation, op: DeltaOp, row: RowImage) -> Delta {
        let delta = Delta {
            table: format!("{}.{}", rel.namespace, rel.name),
            op,
            key: row.key,
            after: row.after,
            old_key: row.old_key,
            commit_lsn: lsn_i64(self.commit_lsn),
            lsn: lsn_i64(lsn),
            xid: i64::from(self.xid),
            commit_ts: self.commit_ts,
            seq: self.seq,
            instruction_id: self.instruction_id.clone(),
        };
        self.seq += 1;
        delta
    }
}

/// The row part of a delta.
#[derive(Default)]
struct RowImage {
    key: Vec<Column>,
    after: Option<Vec<Column>>,
    old_key: Option<Vec<Column>>,
}

/// Names of the column types: built-in ones by OID, others as PostgreSQL described them.
#[derive(Default)]
struct TypeNames(HashMap<u32, String>);

impl TypeNames {
    fn insert(&mut self, oid: u32, namespace: &str, name: String) {
        let qualified = if namespace.is_empty() || namespace == "pg_catalog" { name } else { format!("{namespace}.{name}") };
        self.0.insert(oid, qualified);
    }

    fn name(&self, oid: u32) -> String {
        type_name_for_oid(oid).map(str::to_string).or_else(|| self.0.get(&oid).cloned()).unwrap_or_else(|| format!("oid:{oid}"))
    }

    /// A row image as typed columns. The values are taken out of `tuple`, so that a large
    /// one can become its typed value in its own buffer ([`Value::from_pg_text_bytes`]).
    fn columns(&self, rel: &Relation, tuple: &mut [TupleValue]) -> Result<Vec<Column>, ChangeError> {
        if tuple.len() != rel.columns.len() {
            return Err(ChangeError::TupleShape {
                table: format!("{}.{}", rel.namespace, rel.name),
                got: tuple.len(),
                expected: rel.columns.len(),
            });
        }
        Ok(rel
            .columns
            .iter()
            .zip(tuple)
            .map(|(col, v)| {
                let type_name = self.name(col.type_oid);
                let (value, unchanged) = match std::mem::replace(v, TupleValue::Null) {
                    TupleValue::Null => (Value::Null, false),
                    TupleValue::UnchangedToast => (Value::Null, true),
                    TupleValue::Text(bytes) => (Value::from_pg_text_bytes(&type_name, bytes), false),
                    TupleValue::Binary(bytes) => (Value::Bytes(bytes.into()), false),
                };
                Column { name: col.name.clone(), type_name, value, unchanged }
            })
            .collect())
    }
}

#[derive(Default)]
pub struct ChangeDecoder {
    relations: HashMap<u32, Relation>,
    types: TypeNames,
    tx: Option<TxFrame>,
    /// Tables without a key: their changes are skipped (see [`super::refused`]).
    refused: RefusedTables,
}

impl ChangeDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds one message that started at WAL position `lsn`.
    pub fn on_message(&mut self, lsn: u64, message: PgOutputMessage) -> Result<Option<Change>, ChangeError> {
        match message {
            PgOutputMessage::Begin { final_lsn, commit_ts, xid } => {
                self.tx = Some(TxFrame {
                    commit_lsn: final_lsn,
                    commit_ts: commit_ts.saturating_add(PG_EPOCH_OFFSET_MICROS),
                    xid,
                    seq: 0,
                    instruction_id: None,
                });
                Ok(Some(Change::Begin))
            }
            PgOutputMessage::Commit { end_lsn, .. } => {
                if self.tx.take().is_none() {
                    return Err(ChangeError::OutsideTransaction("Commit"));
                }
                Ok(Some(Change::Commit { end_lsn }))
            }
            PgOutputMessage::Relation(rel) => {
                self.refused.on_relation(&rel);
                self.relations.insert(rel.id, rel);
                Ok(None)
            }
            PgOutputMessage::Type { oid, namespace, name } => {
                self.types.insert(oid, &namespace, name);
                Ok(None)
            }
            PgOutputMessage::Origin { .. } => Ok(None),
            PgOutputMessage::Message { transactional, prefix, content, .. } => {
                if transactional && prefix == CORRELATION_PREFIX {
                    if let Some(tx) = self.tx.as_mut() {
                        tx.instruction_id = Some(String::from_utf8_lossy(&content).into_owned());
                    }
                }
                Ok(None)
            }
            PgOutputMessage::Truncate { relation_ids, .. } => {
                self.truncate(lsn, &relation_ids).map(|d| Some(Change::Truncate(d)))
            }
            PgOutputMessage::Insert { relation_id, .. }
            | PgOutputMessage::Update { relation_id, .. }
            | PgOutputMessage::Delete { relation_id, .. }
                if self.refused.skips(relation_id) =>
            {
                Ok(None)
            }
            PgOutputMessage::Insert { relation_id, mut new } => {
                self.row_change(lsn, relation_id, DeltaOp::Insert, Some(&mut new), None).map(|d| Some(Change::Delta(d)))
            }
            PgOutputMessage::Update { relation_id, mut old, mut new } => {
                if let Some(OldTuple::Full(full)) = &old {
                    fill_unchanged_from_old(&mut new, full);
                }
                let old = old.as_mut().map(|(OldTuple::Key(t) | OldTuple::Full(t))| t.as_mut_slice());
                self.row_change(lsn, relation_id, DeltaOp::Update, Some(&mut new), old).map(|d| Some(Change::Delta(d)))
            }
            PgOutputMessage::Delete { relation_id, mut old } => {
                let (OldTuple::Key(t) | OldTuple::Full(t)) = &mut old;
                self.row_change(lsn, relation_id, DeltaOp::Delete, None, Some(t)).map(|d| Some(Change::Delta(d)))
            }
        }
    }

    /// The delta of an insert (`new`), update (`new`, `old` when pgoutput sent one) or
    /// delete (`old` only).
    fn row_change(
        &mut self,
        lsn: u64,
        relation_id: u32,
        op: DeltaOp,
        new: Option<&mut [TupleValue]>,
        old: Option<&mut [TupleValue]>,
    ) -> Result<Delta, ChangeError> {
        let rel = self.relations.get(&relation_id).ok_or(ChangeError::UnknownRelation(relation_id))?;
        let old_key = old.map(|t| self.types.columns(rel, t).map(|c| key_of(rel, &c))).transpose()?;
        let row = match new {
            Some(new) => {
                let after = self.types.columns(rel, new)?;
                let key = key_of(rel, &after);
                // Only an old key that differs says something: the row moved.
                let old_key = old_key.filter(|k| *k != key);
                RowImage { key, after: Some(after), old_key }
            }
            None => RowImage { key: old_key.unwrap_or_default(), ..RowImage::default() },
        };
        let tx = self.tx.as_mut().ok_or(ChangeError::OutsideTransaction(op.as_str()))?;
        Ok(tx.delta(lsn, rel, op, row))
    }

    /// One truncate delta per truncated relation.
    fn truncate(&mut self, lsn: u64, relation_ids: &[u32]) -> Result<Vec<Delta>, ChangeError> {
        let tx = self.tx.as_mut().ok_or(ChangeError::OutsideTransaction("Truncate"))?;
        relation_ids
            .iter()
            .map(|id| {
                let rel = self.relations.get(id).ok_or(ChangeError::UnknownRelation(*id))?;
                Ok(tx.delta(lsn, rel, DeltaOp::Truncate, RowImage::default()))
            })
            .collect()
    }
}

/// With `REPLICA IDENTITY FULL` the old row comes whole, its TOASTed values inline: an
/// unchanged value of the new row is that value, so the delta carries it and needs nothing
/// from a device's earlier state (nor from records a compacted topic may have dropped).
fn fill_unchanged_from_old(new: &mut [TupleValue], old: &[TupleValue]) {
    for (n, o) in new.iter_mut().zip(old) {
        if matches!(n, TupleValue::UnchangedToast) && !matches!(o, TupleValue::UnchangedToast) {
            *n = o.clone();
        }
    }
}

/// The deltas of rows read from the tables themselves (the snapshot's copy), typed and
/// versioned as streamed rows are: one version `lsn`, every delta numbered after the one
/// before.
pub struct RowDeltas {
    types: TypeNames,
    frame: TxFrame,
    lsn: u64,
}

impl RowDeltas {
    /// `commit_ts` in Unix microseconds.
    pub fn new(lsn: u64, commit_ts: i64) -> Self {
        let frame = TxFrame { commit_lsn: lsn, commit_ts, xid: 0, seq: 0, instruction_id: None };
        RowDeltas { types: TypeNames::default(), frame, lsn }
    }

    /// Names a non-built-in column type, as pgoutput's Type message would.
    pub fn add_type(&mut self, oid: u32, namespace: &str, name: String) {
        self.types.insert(oid, namespace, name);
    }

    /// A truncate of `rel`: what devices hold of it from before this version goes.
    pub fn truncate(&mut self, rel: &Relation) -> Delta {
        self.frame.delta(self.lsn, rel, DeltaOp::Truncate, RowImage::default())
    }

    /// A `snapshot` delta of one row of `rel`, its values in the relation's column order.
    pub fn row(&mut self, rel: &Relation, values: &mut [TupleValue]) -> Result<Delta, ChangeError> {
        let after = self.types.columns(rel, values)?;
        let key = key_of(rel, &after);
        Ok(self.frame.delta(self.lsn, rel, DeltaOp::Snapshot, RowImage { key, after: Some(after), old_key: None }))
    }
}

fn lsn_i64(lsn: u64) -> i64 {
    i64::try_from(lsn).unwrap_or(i64::MAX)
}

/// The replica-identity (primary-key) columns of a row.
fn key_of(rel: &Relation, row: &[Column]) -> Vec<Column> {
    rel.columns.iter().zip(row).filter(|(c, _)| c.is_key).map(|(_, v)| Column { unchanged: false, ..v.clone() }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::pgoutput::RelationColumn;

    fn rel() -> Relation {
        Relation {
            id: 7,
            namespace: "public".into(),
            name: "items".into(),
            replica_identity: b'd',
            columns: vec![
                RelationColumn { is_key: true, name: "id".into(), type_oid: 20, type_modifier: -1 },
                RelationColumn { is_key: false, name: "doc".into(), type_oid: 25, type_modifier: -1 },
            ],
        }
    }

    fn text(s: &str) -> TupleValue {
        TupleValue::Text(s.as_bytes().to_vec().into())
    }

    #[test]
    fn a_transaction_becomes_tagged_versioned_deltas() {
        let mut d = ChangeDecoder::new();
        assert_eq!(d.on_message(1, PgOutputMessage::Relation(rel())).unwrap(), None);
        assert_eq!(
            d.on_message(2, PgOutputMessage::Begin { final_lsn: 500, commit_ts: 0, xid: 9 }).unwrap(),
            Some(Change::Begin)
        );
        d.on_message(
            3,
            PgOutputMessage::Message { transactional: true, lsn: 3, prefix: CORRELATION_PREFIX.into(), content: b"abc".to_vec() },
        )
        .unwrap();
        let Some(Change::Delta(ins)) =
            d.on_message(4, PgOutputMessage::Insert { relation_id: 7, new: vec![text("1"), text("x")] }).unwrap()
        else {
            panic!("expected a delta")
        };
        assert_eq!(ins.op, DeltaOp::Insert);
        assert_eq!(ins.key[0].value, Value::Long(1));
        assert_eq!(ins.commit_lsn, 500);
        assert_eq!(ins.seq, 0);
        assert_eq!(ins.commit_ts, PG_EPOCH_OFFSET_MICROS);
        assert_eq!(ins.instruction_id.as_deref(), Some("abc"));
        let Some(Change::Delta(upd)) = d
            .on_message(
                5,
                PgOutputMessage::Update {
                    relation_id: 7,
                    old: Some(OldTuple::Key(vec![text("0"), TupleValue::Null])),
                    new: vec![text("1"), TupleValue::UnchangedToast],
                },
            )
            .unwrap()
        else {
            panic!("expected a delta")
        };
        assert_eq!(upd.seq, 1);
        assert_eq!(upd.old_key.as_ref().unwrap()[0].value, Value::Long(0));
        let doc = &upd.after.as_ref().unwrap()[1];
        assert!(doc.unchanged, "unchanged TOAST must be marked, not nulled silently");
        assert_eq!(
            d.on_message(6, PgOutputMessage::Commit { flags: 0, commit_lsn: 500, end_lsn: 520, commit_ts: 0 }).unwrap(),
            Some(Change::Commit { end_lsn: 520 })
        );
    }

    #[test]
    fn unknown_relation_and_bad_tuples_are_errors() {
        let mut d = ChangeDecoder::new();
        d.on_message(1, PgOutputMessage::Begin { final_lsn: 5, commit_ts: 0, xid: 1 }).unwrap();
        assert_eq!(
            d.on_message(2, PgOutputMessage::Insert { relation_id: 3, new: vec![] }).unwrap_err(),
            ChangeError::UnknownRelation(3)
        );
        d.on_message(3, PgOutputMessage::Relation(rel())).unwrap();
        assert!(matches!(
            d.on_message(4, PgOutputMessage::Insert { relation_id: 7, new: vec![text("1")] }),
            Err(ChangeError::TupleShape { .. })
        ));
    }

    #[test]
    fn truncates_and_snapshot_rows_are_numbered_by_the_decoder() {
        let mut d = ChangeDecoder::new();
        d.on_message(1, PgOutputMessage::Relation(rel())).unwrap();
        d.on_message(2, PgOutputMessage::Begin { final_lsn: 90, commit_ts: 0, xid: 4 }).unwrap();
        d.on_message(3, PgOutputMessage::Insert { relation_id: 7, new: vec![text("1"), text("x")] }).unwrap();
        let Some(Change::Truncate(deltas)) =
            d.on_message(4, PgOutputMessage::Truncate { options: 0, relation_ids: vec![7, 7] }).unwrap()
        else {
            panic!("expected truncates")
        };
        assert_eq!(deltas.iter().map(|t| (t.op, t.seq)).collect::<Vec<_>>(), [(DeltaOp::Truncate, 1), (DeltaOp::Truncate, 2)]);
        assert_eq!(
            d.on_message(5, PgOutputMessage::Truncate { options: 0, relation_ids: vec![8] }).unwrap_err(),
            ChangeError::UnknownRelation(8)
        );

        let mut rows = RowDeltas::new(41, 17);
        let truncate = rows.truncate(&rel());
        let row = rows.row(&rel(), &mut [text("5"), TupleValue::Null]).unwrap();
        assert_eq!((truncate.op, truncate.seq, truncate.commit_lsn), (DeltaOp::Truncate, 0, 41));
        assert_eq!((row.op, row.seq, row.commit_lsn, row.commit_ts), (DeltaOp::Snapshot, 1, 41, 17));
        assert_eq!(row.key[0].value, Value::Long(5));
        assert!(matches!(rows.row(&rel(), &mut [text("5")]), Err(ChangeError::TupleShape { .. })));
    }
}

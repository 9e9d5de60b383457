//! Turns decoded pgoutput messages into delta events.
//!
//! Pure: keeps the relation and type descriptions PostgreSQL sent, the open transaction's
//! identity (commit LSN, timestamp, xid), the position of each change inside it (`seq`)
//! and the instruction id announced by the executor's logical message, and produces one
//! [`Delta`] per row change. Unchanged TOASTed values are marked `unchanged` and never
//! turned into NULL.

use std::collections::HashMap;

use super::pgoutput::{OldTuple, PgOutputMessage, Relation, TupleValue};
use crate::contract::value::type_name_for_oid;
use crate::contract::{Column, Delta, DeltaOp, Value, CORRELATION_PREFIX, PG_EPOCH_OFFSET_MICROS};

#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Begin,
    Delta(Delta),
    Commit { end_lsn: u64 },
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

struct OpenTx {
    commit_lsn: u64,
    commit_ts: i64,
    xid: u32,
    seq: i64,
    instruction_id: Option<String>,
}

#[derive(Default)]
pub struct ChangeDecoder {
    relations: HashMap<u32, Relation>,
    types: HashMap<u32, String>,
    tx: Option<OpenTx>,
}

impl ChangeDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds one message that started at WAL position `lsn`.
    pub fn on_message(&mut self, lsn: u64, message: PgOutputMessage) -> Result<Option<Change>, ChangeError> {
        match message {
            PgOutputMessage::Begin { final_lsn, commit_ts, xid } => {
                self.tx = Some(OpenTx {
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
                self.relations.insert(rel.id, rel);
                Ok(None)
            }
            PgOutputMessage::Type { oid, namespace, name } => {
                let qualified =
                    if namespace.is_empty() || namespace == "pg_catalog" { name } else { format!("{namespace}.{name}") };
                self.types.insert(oid, qualified);
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
            PgOutputMessage::Insert { relation_id, new } => {
                let rel = self.relation(relation_id)?;
                let after = self.columns(rel, &new)?;
                let key = key_of(rel, &after);
                self.delta(lsn, rel, DeltaOp::Insert, key, Some(after), None).map(|d| Some(Change::Delta(d)))
            }
            PgOutputMessage::Update { relation_id, old, new } => {
                let rel = self.relation(relation_id)?;
                let after = self.columns(rel, &new)?;
                let key = key_of(rel, &after);
                let old_key = match old {
                    Some(OldTuple::Key(t) | OldTuple::Full(t)) => Some(key_of(rel, &self.columns(rel, &t)?)),
                    None => None,
                };
                // Only an old key that differs says something: the row moved.
                let old_key = old_key.filter(|k| *k != key);
                self.delta(lsn, rel, DeltaOp::Update, key, Some(after), old_key).map(|d| Some(Change::Delta(d)))
            }
            PgOutputMessage::Delete { relation_id, old } => {
                let rel = self.relation(relation_id)?;
                let (OldTuple::Key(t) | OldTuple::Full(t)) = old;
                let key = key_of(rel, &self.columns(rel, &t)?);
                self.delta(lsn, rel, DeltaOp::Delete, key, None, None).map(|d| Some(Change::Delta(d)))
            }
            PgOutputMessage::Truncate { .. } => Err(ChangeError::OutsideTransaction("Truncate (use on_truncate)")),
        }
    }

    /// One truncate delta per truncated relation.
    pub fn on_truncate(&mut self, lsn: u64, relation_ids: &[u32]) -> Result<Vec<Delta>, ChangeError> {
        relation_ids
            .iter()
            .map(|id| {
                let rel = self.relation(*id)?;
                self.delta(lsn, rel, DeltaOp::Truncate, Vec::new(), None, None)
            })
            .collect()
    }

    fn relation(&self, id: u32) -> Result<&Relation, ChangeError> {
        self.relations.get(&id).ok_or(ChangeError::UnknownRelation(id))
    }

    fn type_name(&self, oid: u32) -> String {
        type_name_for_oid(oid)
            .map(str::to_string)
            .or_else(|| self.types.get(&oid).cloned())
            .unwrap_or_else(|| format!("oid:{oid}"))
    }

    fn columns(&self, rel: &Relation, tuple: &[TupleValue]) -> Result<Vec<Column>, ChangeError> {
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
                let type_name = self.type_name(col.type_oid);
                let (value, unchanged) = match v {
                    TupleValue::Null => (Value::Null, false),
                    TupleValue::UnchangedToast => (Value::Null, true),
                    TupleValue::Text(bytes) => {
                        let text = String::from_utf8_lossy(bytes);
                        (Value::from_pg_text(&type_name, &text).unwrap_or_else(|_| Value::String(text.into_owned())), false)
                    }
                    TupleValue::Binary(bytes) => (Value::Bytes(bytes.clone()), false),
                };
                Column { name: col.name.clone(), type_name, value, unchanged }
            })
            .collect())
    }

    fn delta(
        &self,
        lsn: u64,
        rel: &Relation,
        op: DeltaOp,
        key: Vec<Column>,
        after: Option<Vec<Column>>,
        old_key: Option<Vec<Column>>,
    ) -> Result<Delta, ChangeError> {
        let tx = self.tx.as_ref().ok_or(ChangeError::OutsideTransaction(op.as_str()))?;
        Ok(Delta {
            table: format!("{}.{}", rel.namespace, rel.name),
            op,
            key,
            after,
            old_key,
            commit_lsn: lsn_i64(tx.commit_lsn),
            lsn: lsn_i64(lsn),
            xid: i64::from(tx.xid),
            commit_ts: tx.commit_ts,
            seq: tx.seq,
            instruction_id: tx.instruction_id.clone(),
        })
    }

    /// Advances the position inside the open transaction (after each emitted delta).
    pub fn next_seq(&mut self) {
        if let Some(tx) = self.tx.as_mut() {
            tx.seq += 1;
        }
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
        TupleValue::Text(s.as_bytes().to_vec())
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
        d.next_seq();
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
}

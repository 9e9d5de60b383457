//! Deltas borrowed from their encoded bytes, for the device's apply path.
//!
//! A device decodes every record of the deltas topic once and writes it to SQLite right
//! away; nothing of it outlives the batch. [`DeltaView`] refers to the table name, the
//! column names and types and the text and bytes values inside the record itself
//! ([`codec::decode_delta_view`](super::codec::decode_delta_view)), so applying a delta
//! allocates only its lists of columns. [`Delta::view`] gives the same view of an owned
//! delta.

use super::{Column, Delta, DeltaOp, Value};

/// A [`Delta`] whose strings and bytes are borrowed.
#[derive(Debug, Clone, PartialEq)]
pub struct DeltaView<'a> {
    pub table: &'a str,
    pub op: DeltaOp,
    pub key: Vec<ColumnView<'a>>,
    pub after: Option<Vec<ColumnView<'a>>>,
    pub old_key: Option<Vec<ColumnView<'a>>>,
    pub commit_lsn: i64,
    pub lsn: i64,
    pub xid: i64,
    pub commit_ts: i64,
    pub seq: i64,
    pub instruction_id: Option<&'a str>,
}

/// A [`Column`] whose name, type name and value are borrowed.
#[derive(Debug, Clone, PartialEq)]
pub struct ColumnView<'a> {
    pub name: &'a str,
    pub type_name: &'a str,
    pub value: ValueView<'a>,
    pub unchanged: bool,
}

/// A [`Value`] whose text or bytes are borrowed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ValueView<'a> {
    Null,
    Boolean(bool),
    Long(i64),
    Double(f64),
    String(&'a str),
    Bytes(&'a [u8]),
}

impl DeltaView<'_> {
    /// The version a device compares before applying: newer wins.
    pub fn version(&self) -> (i64, i64) {
        (self.commit_lsn, self.seq)
    }

    pub fn to_delta(&self) -> Delta {
        let columns = |cs: &[ColumnView<'_>]| cs.iter().map(ColumnView::to_column).collect();
        Delta {
            table: self.table.to_string(),
            op: self.op,
            key: columns(&self.key),
            after: self.after.as_deref().map(columns),
            old_key: self.old_key.as_deref().map(columns),
            commit_lsn: self.commit_lsn,
            lsn: self.lsn,
            xid: self.xid,
            commit_ts: self.commit_ts,
            seq: self.seq,
            instruction_id: self.instruction_id.map(str::to_string),
        }
    }
}

impl ColumnView<'_> {
    pub fn to_column(&self) -> Column {
        Column {
            name: self.name.to_string(),
            type_name: self.type_name.to_string(),
            value: self.value.to_value(),
            unchanged: self.unchanged,
        }
    }
}

impl ValueView<'_> {
    pub fn to_value(self) -> Value {
        match self {
            ValueView::Null => Value::Null,
            ValueView::Boolean(b) => Value::Boolean(b),
            ValueView::Long(n) => Value::Long(n),
            ValueView::Double(f) => Value::Double(f),
            ValueView::String(s) => Value::String(s.to_string()),
            ValueView::Bytes(b) => Value::Bytes(b.to_vec()),
        }
    }
}

impl Delta {
    pub fn view(&self) -> DeltaView<'_> {
        fn columns(cs: &[Column]) -> Vec<ColumnView<'_>> {
            cs.iter().map(Column::view).collect()
        }
        DeltaView {
            table: &self.table,
            op: self.op,
            key: columns(&self.key),
            after: self.after.as_deref().map(columns),
            old_key: self.old_key.as_deref().map(columns),
            commit_lsn: self.commit_lsn,
            lsn: self.lsn,
            xid: self.xid,
            commit_ts: self.commit_ts,
            seq: self.seq,
            instruction_id: self.instruction_id.as_deref(),
        }
    }
}

impl Column {
    pub fn view(&self) -> ColumnView<'_> {
        ColumnView { name: &self.name, type_name: &self.type_name, value: self.value.view(), unchanged: self.unchanged }
    }
}

impl Value {
    pub fn view(&self) -> ValueView<'_> {
        match self {
            Value::Null => ValueView::Null,
            Value::Boolean(b) => ValueView::Boolean(*b),
            Value::Long(n) => ValueView::Long(*n),
            Value::Double(f) => ValueView::Double(*f),
            Value::String(s) => ValueView::String(s),
            Value::Bytes(b) => ValueView::Bytes(b),
        }
    }
}

//! The data contracts that travel on Kafka: instructions, results, deltas, device
//! acknowledgements, the fleet registry and confirmations, as Rust types matching the Avro
//! schemas in `schemas/`.
//!
//! The Avro encoding lives in [`codec`]; typed column values and their conversion from
//! PostgreSQL's text output live in [`value`]; deltas borrowed from their encoded bytes, for
//! the device's apply path, in [`view`]; deltas too large for one Kafka record travel as
//! [`fragment`]s.

pub mod codec;
mod codec_error;
mod delta_reader;
mod delta_writer;
mod fleet;
pub mod fragment;
pub mod lsn;
pub mod value;
pub mod view;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use fleet::{Confirmation, ConfirmationStatus, FleetDevice, MissingDevice};
pub use lsn::Lsn;
pub use value::Value;

/// Prefix of the logical message (`pg_logical_emit_message`) with which the executor
/// announces, inside an instruction's transaction, the instruction id that capture puts on
/// the deltas that follow.
pub const CORRELATION_PREFIX: &str = "pgfanout";

/// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01), the offset
/// between PostgreSQL's timestamps and the contracts' (Unix microseconds).
pub const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// A named, typed value inside an operation (`key` or `values`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Field {
    pub name: String,
    pub value: Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OperationKind {
    Insert,
    Update,
    Upsert,
    Delete,
}

impl OperationKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OperationKind::Insert => "insert",
            OperationKind::Update => "update",
            OperationKind::Upsert => "upsert",
            OperationKind::Delete => "delete",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Operation {
    pub op: OperationKind,
    pub table: String,
    pub key: Vec<Field>,
    pub values: Vec<Field>,
    /// Precondition of an update or delete: the current values the row must hold.
    #[serde(default)]
    pub expect: Vec<Field>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instruction {
    pub instruction_id: String,
    pub issued_by: String,
    /// Microseconds since the Unix epoch.
    pub issued_at: i64,
    pub operations: Vec<Operation>,
    /// Which devices the instruction's confirmation waits for; `None`: the whole active
    /// fleet.
    #[serde(default)]
    pub target: Option<Target>,
}

/// A part of the fleet: the active devices whose labels include every one of `labels` (all
/// active devices when it is empty), and of those all, or `at_least` of them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Target {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub at_least: Option<i32>,
}

impl Target {
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResultStatus {
    Committed,
    Rejected,
    Failed,
}

impl ResultStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ResultStatus::Committed => "committed",
            ResultStatus::Rejected => "rejected",
            ResultStatus::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "committed" => Some(ResultStatus::Committed),
            "rejected" => Some(ResultStatus::Rejected),
            "failed" => Some(ResultStatus::Failed),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstructionResult {
    pub instruction_id: String,
    pub status: ResultStatus,
    #[serde(default)]
    pub error_code: Option<String>,
    #[serde(default)]
    pub error_message: Option<String>,
    pub rows_affected: i64,
    #[serde(default)]
    pub commit_lsn: Option<i64>,
    /// Microseconds since the Unix epoch.
    pub executed_at: i64,
    /// The instruction's [`Instruction::target`].
    #[serde(default)]
    pub target: Option<Target>,
}

/// A column of a delta: name, PostgreSQL type name and typed value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Column {
    pub name: String,
    #[serde(rename = "type")]
    pub type_name: String,
    pub value: Value,
    /// An unchanged TOASTed value that the WAL did not carry: the device keeps its own.
    #[serde(default)]
    pub unchanged: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeltaOp {
    Insert,
    Update,
    Delete,
    Truncate,
    Snapshot,
    Watermark,
    /// The table left the publication under this name (dropped, renamed, removed from it):
    /// devices remove its rows older than this version, and the table when none is left.
    Drop,
}

impl DeltaOp {
    pub fn as_str(self) -> &'static str {
        match self {
            DeltaOp::Insert => "insert",
            DeltaOp::Update => "update",
            DeltaOp::Delete => "delete",
            DeltaOp::Truncate => "truncate",
            DeltaOp::Snapshot => "snapshot",
            DeltaOp::Watermark => "watermark",
            DeltaOp::Drop => "drop",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delta {
    pub table: String,
    pub op: DeltaOp,
    pub key: Vec<Column>,
    #[serde(default)]
    pub after: Option<Vec<Column>>,
    #[serde(default)]
    pub old_key: Option<Vec<Column>>,
    pub commit_lsn: i64,
    pub lsn: i64,
    pub xid: i64,
    /// Microseconds since the Unix epoch.
    pub commit_ts: i64,
    pub seq: i64,
    #[serde(default)]
    pub instruction_id: Option<String>,
}

impl Delta {
    /// The version a device compares before applying: newer wins.
    pub fn version(&self) -> (i64, i64) {
        (self.commit_lsn, self.seq)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceAck {
    pub device_id: String,
    pub applied_lsn: i64,
    /// Microseconds since the Unix epoch, by the device's clock: shown, never trusted.
    pub at: i64,
    /// HMAC-SHA256 with the device's key ([`crate::fleet::signature`]).
    #[serde(default)]
    pub signature: Option<serde_bytes::ByteBuf>,
}

/// Microseconds since the Unix epoch, now.
pub fn now_micros() -> i64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(since.as_micros()).unwrap_or(i64::MAX)
}

/// Header of the Kafka tombstone that follows a delete delta: the delete delta itself, so
/// that a consumer reading a compacted topic, where the delete delta (same key) may be gone,
/// still learns the delete and its version.
pub const TOMBSTONE_DELTA_HEADER: &str = "pgfanout.delta";

/// Kafka key of a delta: canonical bytes of (table, primary key), so one row's history
/// stays in one partition, in WAL order.
pub fn delta_kafka_key(table: &str, key: &[Column]) -> Vec<u8> {
    let mut s = String::with_capacity(table.len() + 16 * key.len());
    s.push_str(table);
    for c in key {
        s.push('\u{1f}');
        s.push_str(&c.name);
        s.push('=');
        c.value.write_canonical(&mut s);
    }
    s.into_bytes()
}

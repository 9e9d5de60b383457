//! Avro binary encoding of the contracts, with the schemas in `schemas/` compiled in.
//!
//! `serde_avro_fast` decodes with the writer's schema only. The schemas evolve by appending
//! fields with defaults (`#[serde(default)]` on the Rust side), and a record written with an
//! earlier version of its schema (kept in `schemas/history/`) still decodes: what the
//! current schema cannot read is read with the earlier ones, newest first, and the fields
//! they lack take their defaults. Readers with an earlier schema read current records too,
//! since the fields they do not know come last. Decoding never panics: any byte string
//! gives either a value or a [`CodecError`].

use std::sync::LazyLock;

use std::io::BufRead;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_avro_fast::de::read::SliceRead;
use serde_avro_fast::de::{DeserializerConfig, DeserializerState};
use serde_avro_fast::ser::SerializerConfig;
use serde_avro_fast::Schema;

pub use super::codec_error::CodecError;
use super::codec_error::MAX_ARRAY_LEN;
use super::view::DeltaView;
use super::{delta_reader, delta_writer, Confirmation, Delta, DeviceAck, FleetDevice, Instruction, InstructionResult};

/// The Avro schemas, as shipped in `schemas/`.
pub struct Schemas {
    pub instruction: Schema,
    /// Earlier versions of the instruction schema, newest first.
    pub earlier_instruction: Vec<Schema>,
    pub result: Schema,
    pub earlier_result: Vec<Schema>,
    pub delta: Schema,
    pub device_ack: Schema,
    pub fleet_device: Schema,
    pub confirmation: Schema,
}

pub const INSTRUCTION_AVSC: &str = include_str!("../../schemas/instruction.avsc");
pub const RESULT_AVSC: &str = include_str!("../../schemas/result.avsc");
/// Version 1 of the instruction and result schemas: before `target`.
pub const INSTRUCTION_V1_AVSC: &str = include_str!("../../schemas/history/instruction.v1.avsc");
pub const RESULT_V1_AVSC: &str = include_str!("../../schemas/history/result.v1.avsc");
pub const DELTA_AVSC: &str = include_str!("../../schemas/delta.avsc");
pub const DEVICE_ACK_AVSC: &str = include_str!("../../schemas/device_ack.avsc");
pub const FLEET_DEVICE_AVSC: &str = include_str!("../../schemas/fleet_device.avsc");
pub const CONFIRMATION_AVSC: &str = include_str!("../../schemas/confirmation.avsc");

pub static SCHEMAS: LazyLock<Schemas> = LazyLock::new(|| Schemas {
    instruction: parse(INSTRUCTION_AVSC, "instruction"),
    earlier_instruction: vec![parse(INSTRUCTION_V1_AVSC, "history/instruction.v1")],
    result: parse(RESULT_AVSC, "result"),
    earlier_result: vec![parse(RESULT_V1_AVSC, "history/result.v1")],
    delta: parse(DELTA_AVSC, "delta"),
    device_ack: parse(DEVICE_ACK_AVSC, "device_ack"),
    fleet_device: parse(FLEET_DEVICE_AVSC, "fleet_device"),
    confirmation: parse(CONFIRMATION_AVSC, "confirmation"),
});

fn parse(json: &str, name: &str) -> Schema {
    // The schemas are compiled into the binary and covered by tests: a failure here is a
    // build defect, never a consequence of outside input.
    json.parse().unwrap_or_else(|e| panic!("schemas/{name}.avsc is not a valid Avro schema: {e}"))
}

fn encode<T: Serialize>(value: &T, schema: &Schema, what: &'static str) -> Result<Vec<u8>, CodecError> {
    serde_avro_fast::to_datum_vec(value, &mut SerializerConfig::new(schema))
        .map_err(|e| CodecError::Encode { what, reason: e.to_string() })
}

fn decode<T: DeserializeOwned>(bytes: &[u8], schema: &Schema, what: &'static str) -> Result<T, CodecError> {
    let mut config = DeserializerConfig::new(schema);
    config.max_seq_size = MAX_ARRAY_LEN;
    let mut state = DeserializerState::with_config(SliceRead::new(bytes), config);
    let value = T::deserialize(state.deserializer()).map_err(|e| CodecError::Decode { what, reason: e.to_string() })?;
    let rest = state.into_reader().fill_buf().map(|r| r.len()).unwrap_or(0);
    if rest > 0 {
        return Err(CodecError::Decode { what, reason: format!("{rest} bytes left after the record") });
    }
    Ok(value)
}

/// [`decode`] with `current`, else with the first of `earlier` that reads the bytes; the
/// error is the current schema's.
fn decode_any<T: DeserializeOwned>(
    bytes: &[u8],
    current: &Schema,
    earlier: &[Schema],
    what: &'static str,
) -> Result<T, CodecError> {
    decode(bytes, current, what).or_else(|e| earlier.iter().find_map(|s| decode(bytes, s, what).ok()).ok_or(e))
}

pub fn encode_instruction(v: &Instruction) -> Result<Vec<u8>, CodecError> {
    encode(v, &SCHEMAS.instruction, "instruction")
}
pub fn decode_instruction(bytes: &[u8]) -> Result<Instruction, CodecError> {
    decode_any(bytes, &SCHEMAS.instruction, &SCHEMAS.earlier_instruction, "instruction")
}
pub fn encode_result(v: &InstructionResult) -> Result<Vec<u8>, CodecError> {
    encode(v, &SCHEMAS.result, "result")
}
pub fn decode_result(bytes: &[u8]) -> Result<InstructionResult, CodecError> {
    decode_any(bytes, &SCHEMAS.result, &SCHEMAS.earlier_result, "result")
}
/// Encodes a delta (see [`delta_writer`]: the same bytes as through serde, written field by
/// field). Never fails; the `Result` keeps the shape of the other encoders.
pub fn encode_delta(v: &Delta) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::with_capacity(256);
    delta_writer::write_delta(v, &mut out);
    Ok(out)
}
/// Encodes a delta into `out`, replacing what it held: capture's buffer reused for every
/// record.
pub fn encode_delta_into(v: &Delta, out: &mut Vec<u8>) {
    out.clear();
    delta_writer::write_delta(v, out);
}
/// Encodes a delta read in place ([`decode_delta_view`]) into `out`, replacing what it
/// held: the bytes it was read from, without making an owned [`Delta`] first.
pub fn encode_delta_view_into(v: &DeltaView<'_>, out: &mut Vec<u8>) {
    out.clear();
    delta_writer::write_delta_view(v, out);
}
pub fn decode_delta(bytes: &[u8]) -> Result<Delta, CodecError> {
    decode(bytes, &SCHEMAS.delta, "delta")
}
/// A delta borrowing its strings from `bytes`: the device's apply path (see
/// [`delta_reader`]). Accepts and reads the same as [`decode_delta`].
pub fn decode_delta_view(bytes: &[u8]) -> Result<DeltaView<'_>, CodecError> {
    delta_reader::read_delta(bytes)
}
pub fn encode_device_ack(v: &DeviceAck) -> Result<Vec<u8>, CodecError> {
    encode(v, &SCHEMAS.device_ack, "device ack")
}
pub fn decode_device_ack(bytes: &[u8]) -> Result<DeviceAck, CodecError> {
    decode(bytes, &SCHEMAS.device_ack, "device ack")
}
pub fn encode_fleet_device(v: &FleetDevice) -> Result<Vec<u8>, CodecError> {
    encode(v, &SCHEMAS.fleet_device, "fleet device")
}
pub fn decode_fleet_device(bytes: &[u8]) -> Result<FleetDevice, CodecError> {
    decode(bytes, &SCHEMAS.fleet_device, "fleet device")
}
pub fn encode_confirmation(v: &Confirmation) -> Result<Vec<u8>, CodecError> {
    encode(v, &SCHEMAS.confirmation, "confirmation")
}
pub fn decode_confirmation(bytes: &[u8]) -> Result<Confirmation, CodecError> {
    decode(bytes, &SCHEMAS.confirmation, "confirmation")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::{
        Column, ConfirmationStatus, DeltaOp, Field, MissingDevice, Operation, OperationKind, ResultStatus, Target, Value,
    };

    fn sample_values() -> Vec<Value> {
        vec![
            Value::Null,
            Value::Boolean(true),
            Value::Long(-42),
            Value::Double(2.5),
            Value::String("héllo".into()),
            Value::Bytes(vec![0, 1, 255]),
        ]
    }

    #[test]
    fn instruction_round_trip() {
        let ins = Instruction {
            instruction_id: "0b6a7c1e-8a7b-4c55-9a59-000000000001".into(),
            issued_by: "device-a".into(),
            issued_at: 1_700_000_000_000_000,
            operations: vec![Operation {
                op: OperationKind::Upsert,
                table: "public.items".into(),
                key: vec![Field { name: "id".into(), value: Value::Long(7) }],
                values: sample_values()
                    .into_iter()
                    .enumerate()
                    .map(|(i, value)| Field { name: format!("c{i}"), value })
                    .collect(),
                expect: vec![Field { name: "c2".into(), value: Value::Long(1) }],
            }],
            target: None,
        };
        let bytes = encode_instruction(&ins).unwrap();
        assert_eq!(decode_instruction(&bytes).unwrap(), ins);
    }

    #[test]
    fn delta_and_result_round_trip() {
        let col = |name: &str, value: Value| Column { name: name.into(), type_name: "text".into(), value, unchanged: false };
        let delta = Delta {
            table: "public.items".into(),
            op: DeltaOp::Update,
            key: vec![col("id", Value::Long(1))],
            after: Some(sample_values().into_iter().map(|v| col("c", v)).collect()),
            old_key: Some(vec![col("id", Value::Long(0))]),
            commit_lsn: 123,
            lsn: 100,
            xid: 9,
            commit_ts: 5,
            seq: 2,
            instruction_id: Some("x".into()),
        };
        assert_eq!(decode_delta(&encode_delta(&delta).unwrap()).unwrap(), delta);
        let result = InstructionResult {
            instruction_id: "x".into(),
            status: ResultStatus::Rejected,
            error_code: Some("23505".into()),
            error_message: Some("duplicate".into()),
            rows_affected: 0,
            commit_lsn: None,
            executed_at: 1,
            target: None,
        };
        assert_eq!(decode_result(&encode_result(&result).unwrap()).unwrap(), result);
        let ack = DeviceAck { device_id: "d".into(), applied_lsn: 77, at: 3, signature: Some(vec![1, 2, 3].into()) };
        assert_eq!(decode_device_ack(&encode_device_ack(&ack).unwrap()).unwrap(), ack);
        let device = FleetDevice {
            id: "d".into(),
            labels: [("site".to_string(), "berlin".to_string())].into(),
            subscription: None,
            registered_at: 4,
            retired_at: Some(5),
            key_fingerprint: "00ff".into(),
        };
        assert_eq!(decode_fleet_device(&encode_fleet_device(&device).unwrap()).unwrap(), device);
        let confirmation = Confirmation {
            instruction_id: "x".into(),
            status: ConfirmationStatus::Pending,
            commit_lsn: 9,
            devices: 2,
            missing: vec![MissingDevice { device_id: "d".into(), applied_lsn: 3, lag_bytes: 6, last_seen: None }],
            slowest_device: None,
            last_applied_at: None,
            committed_at: 1,
            confirmed_at: 2,
        };
        assert_eq!(decode_confirmation(&encode_confirmation(&confirmation).unwrap()).unwrap(), confirmation);
    }

    #[test]
    fn an_acknowledgement_without_a_signature_still_decodes() {
        let old_schema: Schema = r#"{"type": "record", "name": "DeviceAck", "namespace": "pgfanout", "fields": [
            {"name": "device_id", "type": "string"}, {"name": "applied_lsn", "type": "long"},
            {"name": "at", "type": {"type": "long", "logicalType": "timestamp-micros"}}]}"#
            .parse()
            .unwrap();
        #[derive(Serialize)]
        struct OldAck<'a> {
            device_id: &'a str,
            applied_lsn: i64,
            at: i64,
        }
        let bytes = encode(&OldAck { device_id: "d", applied_lsn: 7, at: 1 }, &old_schema, "old ack").unwrap();
        assert!(decode_device_ack(&bytes).is_err(), "the writer's schema decides: an old record is read with the old schema");
        let ack: DeviceAck = decode(&bytes, &old_schema, "old ack").unwrap();
        assert_eq!((ack.applied_lsn, ack.signature), (7, None));
    }

    #[test]
    fn instructions_and_results_of_version_1_decode_without_a_target_and_readers_of_it_read_current_ones() {
        let v1 = |avsc: &str| avsc.parse::<Schema>().unwrap();
        let (ins_v1, result_v1) = (v1(INSTRUCTION_V1_AVSC), v1(RESULT_V1_AVSC));
        let target = Target { labels: [("site".to_string(), "berlin".to_string())].into(), at_least: Some(2) };
        let ins = Instruction {
            instruction_id: "id".into(),
            issued_by: "d".into(),
            issued_at: 5,
            operations: vec![],
            target: Some(target.clone()),
        };
        #[derive(Serialize)]
        struct InstructionV1<'a> {
            instruction_id: &'a str,
            issued_by: &'a str,
            issued_at: i64,
            operations: &'a [Operation],
        }
        let written = InstructionV1 { instruction_id: "id", issued_by: "d", issued_at: 5, operations: &[] };
        let old = encode(&written, &ins_v1, "v1").unwrap();
        assert_eq!(decode_instruction(&old).unwrap(), Instruction { target: None, ..ins.clone() });
        let current = encode_instruction(&ins).unwrap();
        assert_eq!(decode_instruction(&current).unwrap(), ins);
        assert!(current.starts_with(&old), "a reader of version 1 reads the fields it knows, first");
        let result = InstructionResult {
            instruction_id: "id".into(),
            status: ResultStatus::Committed,
            error_code: None,
            error_message: None,
            rows_affected: 1,
            commit_lsn: Some(9),
            executed_at: 3,
            target: Some(target),
        };
        #[derive(Serialize)]
        struct ResultV1<'a> {
            instruction_id: &'a str,
            status: ResultStatus,
            error_code: Option<&'a str>,
            error_message: Option<&'a str>,
            rows_affected: i64,
            commit_lsn: Option<i64>,
            executed_at: i64,
        }
        let written = ResultV1 {
            instruction_id: "id",
            status: ResultStatus::Committed,
            error_code: None,
            error_message: None,
            rows_affected: 1,
            commit_lsn: Some(9),
            executed_at: 3,
        };
        let old = encode(&written, &result_v1, "v1").unwrap();
        assert_eq!(decode_result(&old).unwrap().target, None);
        assert_eq!(decode_result(&encode_result(&result).unwrap()).unwrap(), result);
    }

    #[test]
    fn garbage_and_truncations_are_errors() {
        let ins =
            Instruction { instruction_id: "id".into(), issued_by: "d".into(), issued_at: 0, operations: vec![], target: None };
        let bytes = encode_instruction(&ins).unwrap();
        // Without its last byte (no target) it is the same instruction in version 1.
        let v1 = bytes.len() - 1;
        for n in 0..v1 {
            assert!(decode_instruction(&bytes[..n]).is_err(), "prefix {n}");
        }
        assert_eq!(decode_instruction(&bytes[..v1]).unwrap(), ins);
        assert!(decode_delta(&[0xff; 40]).is_err());
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode_instruction(&longer).is_err(), "trailing bytes are refused");
        assert!(decode_instruction(b"{\"json\": true}").is_err());
    }
}

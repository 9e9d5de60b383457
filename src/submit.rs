//! Submitting instructions: JSON-lines or command-line input turned into Avro instructions
//! on the instructions topic, and an optional wait for their results.
//!
//! JSON form of one instruction (one per line):
//! `{"instruction_id": "<uuid, optional>", "issued_by": "<device, optional>",
//!   "operations": [{"op": "upsert", "table": "public.items", "key": {"id": 1},
//!   "values": {"name": "x", "blob": {"$hex": "00ff"}}}]}`
//! JSON numbers without a fraction become longs, others doubles; `{"$hex": ...}` is bytes.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value as Json;

use crate::config::KafkaSettings;
use crate::contract::codec::{decode_device_ack, decode_result, encode_instruction};
use crate::contract::{now_micros, DeviceAck, Field, Instruction, InstructionResult, Operation, OperationKind, Value};
use crate::kafka;

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("line {line}: {reason}")]
    Input { line: usize, reason: String },
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("{0}")]
    Other(String),
}

/// Parses one JSON instruction. Missing ids are generated; `issued_by` defaults to `default_issuer`.
pub fn instruction_from_json(json: &Json, default_issuer: &str) -> Result<Instruction, String> {
    let obj = json.as_object().ok_or("an instruction is a JSON object")?;
    let instruction_id = match obj.get("instruction_id") {
        None | Some(Json::Null) => uuid::Uuid::new_v4().to_string(),
        // The executor answers with the canonical spelling; wait for that one.
        Some(Json::String(s)) => uuid::Uuid::try_parse(s).map_or_else(|_| s.clone(), |id| id.hyphenated().to_string()),
        Some(_) => return Err("instruction_id must be a string".into()),
    };
    let issued_by = match obj.get("issued_by") {
        None | Some(Json::Null) => default_issuer.to_string(),
        Some(Json::String(s)) => s.clone(),
        Some(_) => return Err("issued_by must be a string".into()),
    };
    let ops = obj.get("operations").and_then(Json::as_array).ok_or("operations must be an array")?;
    let operations = ops.iter().map(operation_from_json).collect::<Result<_, _>>()?;
    Ok(Instruction { instruction_id, issued_by, issued_at: now_micros(), operations })
}

fn operation_from_json(json: &Json) -> Result<Operation, String> {
    let op = match json.get("op").and_then(Json::as_str) {
        Some("insert") => OperationKind::Insert,
        Some("update") => OperationKind::Update,
        Some("upsert") => OperationKind::Upsert,
        Some("delete") => OperationKind::Delete,
        _ => return Err("op must be one of insert, update, upsert, delete".into()),
    };
    let table = json.get("table").and_then(Json::as_str).ok_or("table must be a string")?.to_string();
    let fields = |name: &str| -> Result<Vec<Field>, String> {
        match json.get(name) {
            None | Some(Json::Null) => Ok(Vec::new()),
            Some(Json::Object(map)) => {
                map.iter().map(|(k, v)| Ok(Field { name: k.clone(), value: value_from_json(v)? })).collect()
            }
            Some(_) => Err(format!("{name} must be an object of column: value")),
        }
    };
    Ok(Operation { op, table, key: fields("key")?, values: fields("values")?, expect: fields("expect")? })
}

/// A JSON value as a typed value.
pub fn value_from_json(json: &Json) -> Result<Value, String> {
    Ok(match json {
        Json::Null => Value::Null,
        Json::Bool(b) => Value::Boolean(*b),
        Json::Number(n) => match n.as_i64() {
            Some(i) => Value::Long(i),
            None => Value::Double(n.as_f64().ok_or("number out of range")?),
        },
        Json::String(s) => Value::String(s.clone()),
        Json::Object(map) if map.len() == 1 => match map.get("$hex").and_then(Json::as_str) {
            Some(hex) => Value::Bytes(decode_hex(hex).ok_or("$hex must be an even number of hex digits")?),
            None => Value::String(json.to_string()),
        },
        // Arrays and objects are JSON documents for json/jsonb (or array) columns.
        Json::Array(_) | Json::Object(_) => Value::String(json.to_string()),
    })
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// Reads JSON-lines text (blank lines and `#` comments skipped).
pub fn parse_json_lines(text: &str, default_issuer: &str) -> Result<Vec<Instruction>, SubmitError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let json: Json = serde_json::from_str(line).map_err(|e| SubmitError::Input { line: i + 1, reason: e.to_string() })?;
        out.push(instruction_from_json(&json, default_issuer).map_err(|reason| SubmitError::Input { line: i + 1, reason })?);
    }
    Ok(out)
}

/// Produces instructions keyed by `issued_by` (one issuer's instructions keep their order)
/// and waits until Kafka acknowledged all of them.
pub async fn produce_instructions(
    producer: &FutureProducer,
    topic: &str,
    instructions: &[Instruction],
) -> Result<(), SubmitError> {
    const WINDOW: usize = 5000;
    for chunk in instructions.chunks(WINDOW) {
        let payloads: Vec<Vec<u8>> =
            chunk.iter().map(encode_instruction).collect::<Result<_, _>>().map_err(|e| SubmitError::Other(e.to_string()))?;
        let sends = chunk.iter().zip(&payloads).map(|(ins, payload)| {
            producer.send(
                FutureRecord::to(topic).key(ins.issued_by.as_bytes()).payload(payload),
                Timeout::After(Duration::from_secs(60)),
            )
        });
        for outcome in futures::future::join_all(sends).await {
            outcome.map_err(|(e, _)| e)?;
        }
    }
    Ok(())
}

/// Polls a topic follower; a broker that is away yields nothing this time, not an error.
fn poll_follower(consumer: &BaseConsumer, wait: Duration) -> Result<Vec<rdkafka::message::OwnedMessage>, SubmitError> {
    match kafka::poll_batch(consumer, 10_000, wait, Duration::from_millis(5)) {
        Ok(batch) => Ok(batch),
        Err(e) if kafka::is_transient(&e) => {
            tracing::debug!(error = %e, "topic not readable yet; retrying");
            Ok(Vec::new())
        }
        Err(e) => Err(e.into()),
    }
}

/// Follows the results topic from its end at creation time, collecting results by id.
pub struct ResultWatcher {
    consumer: BaseConsumer,
    results: HashMap<String, InstructionResult>,
    deliveries: usize,
    differing: Vec<(InstructionResult, InstructionResult)>,
}

impl ResultWatcher {
    /// Positions at the current end of every results partition: results of instructions
    /// submitted after this call cannot be missed. Blocking.
    pub fn start(settings: &KafkaSettings) -> Result<Self, SubmitError> {
        let topic = settings.topics().results;
        let consumer = kafka::reader_at(settings, &topic, |c, p| {
            let (_, high) = c.fetch_watermarks(&topic, p, Duration::from_secs(10))?;
            Ok(Offset::Offset(high))
        })?
        .ok_or_else(|| SubmitError::Other(format!("topic {topic} does not exist")))?;
        Ok(ResultWatcher { consumer, results: HashMap::new(), deliveries: 0, differing: Vec::new() })
    }

    /// Polls until every id in `ids` has a result or `timeout` passes; calls `progress` with
    /// the number of results seen so far. Blocking.
    pub fn wait_for(
        &mut self,
        ids: &HashSet<String>,
        timeout: Duration,
        mut progress: impl FnMut(usize),
    ) -> Result<(), SubmitError> {
        let deadline = Instant::now() + timeout;
        let mut last = 0;
        while ids.iter().any(|id| !self.results.contains_key(id)) {
            if Instant::now() > deadline {
                let missing = ids.iter().filter(|id| !self.results.contains_key(*id)).count();
                return Err(SubmitError::Timeout(format!("{missing} instructions have no result after {timeout:?}")));
            }
            for m in poll_follower(&self.consumer, Duration::from_millis(200))? {
                if let Some(Ok(r)) = m.payload().map(decode_result) {
                    self.deliveries += 1;
                    if let Some(old) = self.results.insert(r.instruction_id.clone(), r.clone()) {
                        if old != r {
                            self.differing.push((old, r));
                        }
                    }
                }
            }
            let seen = ids.iter().filter(|id| self.results.contains_key(*id)).count();
            if seen != last {
                progress(seen);
                last = seen;
            }
        }
        Ok(())
    }

    pub fn results(&self) -> &HashMap<String, InstructionResult> {
        &self.results
    }

    /// Results received, duplicates included.
    pub fn deliveries(&self) -> usize {
        self.deliveries
    }

    /// Pairs of results for the same instruction that differ (there should be none).
    pub fn differing(&self) -> &[(InstructionResult, InstructionResult)] {
        &self.differing
    }

    pub fn close(self) {
        kafka::close_consumer(self.consumer);
    }
}

/// Follows the `device-acks` topic: the latest acknowledgement of every device.
pub struct AckWatcher {
    consumer: BaseConsumer,
    latest: HashMap<String, DeviceAck>,
}

impl AckWatcher {
    /// Starts reading acknowledgements published during the last `history` (so devices
    /// that are alive but idle are known at once). Blocking.
    pub fn start(settings: &KafkaSettings, history: Duration) -> Result<Self, SubmitError> {
        let topic = settings.topics().device_acks;
        let since_ms = (now_micros() / 1000).saturating_sub(history.as_millis() as i64);
        let consumer = kafka::reader_at(settings, &topic, |c, p| {
            let mut query = TopicPartitionList::new();
            query.add_partition_offset(&topic, p, Offset::Offset(since_ms))?;
            let found = c.offsets_for_times(query, Duration::from_secs(10))?;
            // Nothing that recent in this partition: start at its end.
            Ok(match found.elements().first().map(|e| e.offset()) {
                Some(Offset::Offset(o)) if o >= 0 => Offset::Offset(o),
                _ => Offset::End,
            })
        })?
        .ok_or_else(|| SubmitError::Other(format!("topic {topic} does not exist")))?;
        Ok(AckWatcher { consumer, latest: HashMap::new() })
    }

    fn poll(&mut self, wait: Duration) -> Result<(), SubmitError> {
        for m in poll_follower(&self.consumer, wait)? {
            if let Some(Ok(ack)) = m.payload().map(decode_device_ack) {
                let newer = self.latest.get(&ack.device_id).is_none_or(|old| old.at <= ack.at);
                if newer {
                    self.latest.insert(ack.device_id.clone(), ack);
                }
            }
        }
        Ok(())
    }

    /// Waits until every device that acknowledged within `live` (and every device in
    /// `required`) has applied everything up to `target`. Calls `progress` whenever a
    /// device's position changes. Returns the devices counted. Blocking.
    pub fn wait_applied(
        &mut self,
        target: i64,
        required: &[String],
        live: Duration,
        timeout: Duration,
        mut progress: impl FnMut(&str, i64, bool),
    ) -> Result<Vec<String>, SubmitError> {
        let deadline = Instant::now() + timeout;
        let mut shown: HashMap<String, i64> = HashMap::new();
        loop {
            self.poll(Duration::from_millis(100))?;
            let live_since = now_micros() - live.as_micros() as i64;
            let mut devices: Vec<String> =
                self.latest.values().filter(|a| a.at >= live_since).map(|a| a.device_id.clone()).collect();
            for r in required {
                if !devices.contains(r) {
                    devices.push(r.clone());
                }
            }
            devices.sort();
            for d in &devices {
                let applied = self.latest.get(d).map_or(-1, |a| a.applied_lsn);
                if shown.get(d) != Some(&applied) {
                    progress(d, applied, applied >= target);
                    shown.insert(d.clone(), applied);
                }
            }
            let done = !devices.is_empty() && devices.iter().all(|d| self.latest.get(d).is_some_and(|a| a.applied_lsn >= target));
            if done {
                return Ok(devices);
            }
            if Instant::now() > deadline {
                let pending: Vec<&String> =
                    devices.iter().filter(|d| self.latest.get(*d).is_none_or(|a| a.applied_lsn < target)).collect();
                return Err(SubmitError::Timeout(if devices.is_empty() {
                    format!("no device acknowledged anything in the last {live:?}")
                } else {
                    format!("not applied on {pending:?} after {timeout:?}")
                }));
            }
        }
    }

    pub fn close(self) {
        kafka::close_consumer(self.consumer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_become_typed_instructions() {
        let text = r#"
# a comment
{"instruction_id": "i1", "operations": [{"op": "upsert", "table": "items", "key": {"id": 1}, "values": {"price": 1.5, "ok": true, "b": {"$hex": "00ff"}, "doc": {"a": [1]}, "n": null}}]}
"#;
        let ins = parse_json_lines(text, "dev").unwrap();
        assert_eq!(ins.len(), 1);
        assert_eq!(ins[0].issued_by, "dev");
        let op = &ins[0].operations[0];
        assert_eq!(op.key, vec![Field { name: "id".into(), value: Value::Long(1) }]);
        let get = |n: &str| op.values.iter().find(|f| f.name == n).unwrap().value.clone();
        assert_eq!(get("price"), Value::Double(1.5));
        assert_eq!(get("ok"), Value::Boolean(true));
        assert_eq!(get("b"), Value::Bytes(vec![0, 255]));
        assert_eq!(get("doc"), Value::String("{\"a\":[1]}".into()));
        assert_eq!(get("n"), Value::Null);
    }

    #[test]
    fn bad_lines_say_where() {
        let err = parse_json_lines("{}\n", "d").unwrap_err();
        assert!(err.to_string().starts_with("line 1:"), "{err}");
        assert!(parse_json_lines("{\"operations\": [{\"op\": \"merge\", \"table\": \"t\"}]}", "d").is_err());
        assert!(value_from_json(&serde_json::json!({"$hex": "abc"})).is_err());
    }
}

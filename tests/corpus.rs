//! The bad-input corpus (`tests/corpus/`, one file per case with its expected outcome)
//! through the real pipeline: every case gets its documented outcome, and the pipeline
//! goes on — a valid instruction still reaches the device, and nothing but the cases
//! expected there lands in the dead-letter topic.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use pgfanout::contract::codec::{encode_delta, encode_instruction};
use pgfanout::contract::{Delta, Instruction, ResultStatus, Value};
use pgfanout::test_support::{wait_for, Pipeline, TIMEOUT};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::FutureRecord;
use rdkafka::util::Timeout;
use serde_json::Value as Json;

struct Case {
    name: String,
    expect: String,
    spec: Json,
}

fn load(dir: &str) -> Vec<Case> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus").join(dir);
    let mut paths: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let spec: Json = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let expect = spec["expect"].as_str().unwrap_or_else(|| panic!("{}: no expect", path.display())).to_string();
            Case { name: path.file_stem().unwrap().to_string_lossy().into_owned(), expect, spec }
        })
        .collect()
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

fn instruction(json: &Json) -> Instruction {
    pgfanout::submit::instruction_from_json(json, "corpus").unwrap()
}

/// The record a case sends, and the instruction it encodes, if any.
fn record(case: &Case) -> (Vec<u8>, Option<Instruction>) {
    let spec = &case.spec;
    let (mut bytes, parsed) = if let Some(h) = spec["payload_hex"].as_str() {
        (hex(h), None)
    } else if spec["instruction"].is_object() {
        let mut i = instruction(&spec["instruction"]);
        if let Some([column, n]) = spec["pad_value"].as_array().map(Vec::as_slice) {
            let field = i.operations[0].values.iter_mut().find(|f| f.name == column.as_str().unwrap()).unwrap();
            field.value = Value::String("x".repeat(n.as_u64().unwrap() as usize));
        }
        (encode_instruction(&i).unwrap(), Some(i))
    } else {
        let delta: Delta = serde_json::from_value(spec["delta"].clone()).unwrap_or_else(|e| panic!("{}: {e}", case.name));
        (encode_delta(&delta).unwrap(), None)
    };
    if let Some(n) = spec["cut_to"].as_u64() {
        bytes.truncate(n as usize);
    }
    if let Some(h) = spec["append_hex"].as_str() {
        bytes.extend(hex(h));
    }
    (bytes, parsed)
}

/// Sends a record; returns its partition and offset.
async fn send(p: &Pipeline, topic: &str, partition: Option<i32>, payload: &[u8]) -> (i32, i64) {
    let producer = p.producer().await;
    let mut r: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).key(&b"corpus"[..]).payload(payload);
    if let Some(part) = partition {
        r = r.partition(part);
    }
    let delivery = producer.send(r, Timeout::After(Duration::from_secs(30))).await.map_err(|(e, _)| e).unwrap();
    (delivery.partition, delivery.offset)
}

/// The dead-letter topic's records: (source partition, source offset) → error header.
fn dead_letters(p: &Pipeline) -> HashMap<(i32, i64), String> {
    let topic = p.kafka.topics().dlq;
    let mut ends = Vec::new();
    let consumer: BaseConsumer = pgfanout::kafka::reader_at(&p.kafka, &topic, |c: &BaseConsumer, part| {
        ends.push(c.fetch_watermarks(&topic, part, Duration::from_secs(10))?.1);
        Ok(rdkafka::Offset::Beginning)
    })
    .unwrap()
    .unwrap();
    let total: i64 = ends.iter().sum();
    let mut out = HashMap::new();
    let mut read = 0;
    while read < total {
        let Some(Ok(m)) = consumer.poll(Duration::from_millis(500)) else { continue };
        read += 1;
        let header = |name: &str| {
            m.headers()
                .and_then(|h| h.iter().find(|x| x.key == name).and_then(|x| x.value))
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default()
        };
        let source = (header("pgfanout.source.partition").parse().unwrap(), header("pgfanout.source.offset").parse().unwrap());
        out.insert(source, header("pgfanout.error"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_gets_its_documented_outcome_and_the_pipeline_goes_on() {
    let mut p = Pipeline::new("corpus").await;
    p.start_executor();
    p.start_capture().await;
    p.start_device("a", &[]);
    let topics = p.kafka.topics();

    // Instructions: results for the decodable ones, the dead-letter topic for the others.
    let cases = load("instructions");
    assert!(cases.len() >= 15, "the corpus has its cases");
    let mut dead = HashMap::new();
    let mut awaited = Vec::new();
    for case in &cases {
        if let Some(before) = case.spec["before"].as_array() {
            let before: Vec<Instruction> = before.iter().map(instruction).collect();
            let results = p.submit_and_wait(&before).await;
            assert!(results.values().all(|r| r.status == ResultStatus::Committed), "{}: setup", case.name);
        }
        let (payload, parsed) = record(case);
        let position = send(&p, &topics.instructions, None, &payload).await;
        match (case.expect.as_str(), parsed) {
            ("dead_letter", _) => {
                dead.insert(position, case.name.clone());
            }
            (_, Some(i)) => awaited.push((case, i)),
            (other, None) => panic!("{}: {other} needs an instruction", case.name),
        }
    }
    let watcher = p.watch_results().await;
    // Results may have been published before the watcher started: submit the awaited ones
    // again (same ids; the executor answers a redelivery with the stored result).
    let instructions: Vec<Instruction> = awaited.iter().map(|(_, i)| i.clone()).collect();
    p.submit(&instructions).await;
    let results = p.await_results(watcher, &instructions).await;
    for (case, i) in &awaited {
        let r = &results[&i.instruction_id];
        let got = match r.status {
            ResultStatus::Committed => "committed".to_string(),
            other => format!("{} {}", other.as_str(), r.error_code.as_deref().unwrap_or("")),
        };
        assert_eq!(got, case.expect, "{}: {:?}", case.name, r.error_message);
    }
    let letters = wait_for("the dead letters", TIMEOUT, || async {
        let letters = dead_letters(&p);
        (letters.len() >= dead.len()).then_some(letters)
    })
    .await;
    for (position, name) in &dead {
        let reason = letters.get(position).unwrap_or_else(|| panic!("{name}: not dead-lettered"));
        assert!(!reason.is_empty(), "{name}: the dead letter says why");
    }
    assert_eq!(letters.len(), dead.len(), "only the expected records were dead-lettered");

    // Deltas the device cannot apply: recorded and counted, and the device goes on.
    let cases = load("deltas");
    let mut rejected = HashSet::new();
    for case in &cases {
        assert_eq!(case.expect, "device_rejected", "{}", case.name);
        let (payload, _) = record(case);
        rejected.insert(send(&p, &topics.deltas, Some(0), &payload).await);
    }
    wait_for("the device to record the bad deltas", TIMEOUT, || async {
        (p.store_counter("a", "rejected") >= rejected.len() as i64).then_some(())
    })
    .await;
    let conn = pgfanout::verify::open_store_read_only(&p.store("a")).unwrap();
    let recorded: HashSet<(i32, i64)> = pgfanout::device::store::StoreReader::new(&conn)
        .rejected()
        .unwrap()
        .into_iter()
        .map(|r| (r.partition, r.offset))
        .collect();
    assert_eq!(recorded, rejected, "each bad delta is recorded at its position, nothing else");

    // The pipeline goes on.
    let after = instruction(
        &serde_json::json!({"operations": [{"op": "upsert", "table": "public.items", "key": {"id": 99}, "values": {"name": "after", "qty": 1}}]}),
    );
    let results = p.submit_and_wait(&[after]).await;
    assert!(results.values().all(|r| r.status == ResultStatus::Committed));
    p.wait_converged(&["a"]).await;
    p.stop("device-a");
    p.stop("capture");
    p.stop("executor");
}

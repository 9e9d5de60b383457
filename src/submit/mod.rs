//! Submitting instructions: JSON-lines or command-line input turned into Avro instructions
//! on the instructions topic, and an optional wait for their results.
//!
//! JSON form of one instruction (one per line):
//! `{"instruction_id": "<uuid, optional>", "issued_by": "<device, optional>",
//!   "operations": [{"op": "upsert", "table": "public.items", "key": {"id": 1},
//!   "values": {"name": "x", "blob": {"$hex": "00ff"}}}]}`
//! JSON numbers without a fraction become longs, others doubles; `{"$hex": ...}` is bytes.
//!
//! Parts: [`json`] (the JSON form), [`watch`] (following results and acknowledgements);
//! here, producing and [`submit_and_wait`], what `pgfanout submit` does.

mod error;
mod json;
mod watch;

use std::collections::HashSet;
use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;

pub use error::SubmitError;
pub use json::{instruction_from_json, parse_json_lines, value_from_json};
pub use watch::{AckWatcher, ConfirmationWatcher, ResultWatcher};

use crate::config::KafkaSettings;
use crate::contract::codec::encode_instruction;
use crate::contract::{Confirmation, Instruction, Lsn, ResultStatus, Target};
use crate::fleet::registry;
use crate::kafka::{self, ClientRole};

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

/// What `pgfanout submit` reads: instructions from a file or one operation from flags, and
/// how long to wait for what.
#[derive(Debug, Clone, clap::Args)]
pub struct SubmitArgs {
    /// JSON-lines file of instructions.
    #[arg(long = "file", conflicts_with_all = ["op", "table"])]
    pub file: Option<PathBuf>,
    /// Single operation: insert, update, upsert or delete.
    #[arg(long = "op", requires = "table")]
    pub op: Option<String>,
    /// Table of the single operation (schema.table).
    #[arg(long = "table", requires = "op")]
    pub table: Option<String>,
    /// Key column of the single operation, as name=value (value parsed as JSON if it can be).
    #[arg(long = "key")]
    pub key: Vec<String>,
    /// Value of the single operation, as name=value (value parsed as JSON if it can be).
    #[arg(long = "value")]
    pub value: Vec<String>,
    /// Precondition of the single update or delete: a current value the row must
    /// hold, as name=value.
    #[arg(long = "expect")]
    pub expect: Vec<String>,
    /// Confirm on the devices with this label only, as name=value (repeatable: all of
    /// them), for every instruction submitted (with `--wait fleet`, the confirmation waits
    /// for those devices).
    #[arg(long = "target", value_parser = registry::parse_label)]
    pub target: Vec<(String, String)>,
    /// Confirm once this many of the targeted devices applied it (a quorum), instead of all.
    #[arg(long = "at-least", value_parser = clap::value_parser!(i32).range(1..))]
    pub at_least: Option<i32>,
    /// Issuing device id.
    #[arg(long = "issued-by", env = "PGFANOUT_DEVICE_ID", default_value = "cli")]
    pub issued_by: String,
    /// Wait for every instruction's result and print it (`committed`, the default); with
    /// `fleet` also for the confirmation service's final `applied` on the registered
    /// fleet; with `all-devices` until every device that acknowledged lately has applied
    /// it. Exit status: 0 done, 1 an instruction was rejected or failed, 2 timed out.
    #[arg(long = "wait", value_enum, num_args = 0..=1, default_missing_value = "committed")]
    pub wait: Option<WaitFor>,
    /// Devices that must acknowledge (with `--wait all-devices`), besides every device
    /// that acknowledged within the live window.
    #[arg(long = "devices", value_delimiter = ',')]
    pub devices: Vec<String>,
    /// A device counts as live when it acknowledged within this many seconds.
    #[arg(long = "live-window-secs", default_value_t = 30)]
    pub live_window_secs: u64,
    /// Longest wait, in seconds.
    #[arg(long = "timeout-secs", default_value_t = 60)]
    pub timeout_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WaitFor {
    /// The instruction's result.
    Committed,
    /// The result, then the confirmation that every active registered device applied it
    /// (`pgfanout confirm` must run).
    Fleet,
    /// The result, then every live device's applied watermark (read from the
    /// acknowledgements directly, without the registry).
    AllDevices,
}

/// How a submission ended (the command's exit status: 0, 1, 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitOutcome {
    /// Submitted, and as far as waited for, committed (and applied).
    Done,
    /// An instruction was rejected or failed.
    NotCommitted,
    /// The wait ended before everything arrived.
    TimedOut,
}

impl SubmitArgs {
    /// The instructions to submit: the file's (`-` for standard input), or the one
    /// operation given by flags.
    pub fn instructions(&self) -> Result<Vec<Instruction>, SubmitError> {
        let mut instructions = self.read_instructions()?;
        if !self.target.is_empty() || self.at_least.is_some() {
            let target = Target { labels: self.target.iter().cloned().collect(), at_least: self.at_least };
            instructions.iter_mut().for_each(|i| i.target = Some(target.clone()));
        }
        Ok(instructions)
    }

    fn read_instructions(&self) -> Result<Vec<Instruction>, SubmitError> {
        match (&self.file, &self.op, &self.table) {
            (Some(path), _, _) => {
                let mut text = String::new();
                let read = if path.as_os_str() == "-" {
                    std::io::stdin().read_to_string(&mut text).map(drop)
                } else {
                    std::fs::read_to_string(path).map(|t| text = t)
                };
                read.map_err(|e| SubmitError::Other(format!("{}: {e}", path.display())))?;
                parse_json_lines(&text, &self.issued_by)
            }
            (None, Some(op), Some(table)) => {
                let json = serde_json::json!({"operations": [{"op": op, "table": table, "key": name_values(&self.key)?, "values": name_values(&self.value)?, "expect": name_values(&self.expect)?}]});
                Ok(vec![instruction_from_json(&json, &self.issued_by).map_err(SubmitError::Other)?])
            }
            _ => Err(SubmitError::Other("give --file, or --op and --table".into())),
        }
    }
}

/// `name=value` flags as a JSON object; a value is JSON if it parses, a string otherwise.
fn name_values(items: &[String]) -> Result<serde_json::Map<String, serde_json::Value>, SubmitError> {
    items
        .iter()
        .map(|kv| {
            let (k, v) = kv.split_once('=').ok_or_else(|| SubmitError::Other(format!("{kv:?} is not name=value")))?;
            let json = serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.to_string()));
            Ok((k.to_string(), json))
        })
        .collect()
}

fn joined<T>(r: Result<T, tokio::task::JoinError>) -> Result<T, SubmitError> {
    r.map_err(|e| SubmitError::Other(e.to_string()))
}

/// Submits, then waits as `args` asks, printing each result and device as it arrives.
pub async fn submit_and_wait(kafka_settings: &KafkaSettings, args: &SubmitArgs) -> Result<SubmitOutcome, SubmitError> {
    let instructions = args.instructions()?;
    let timeout = Duration::from_secs(args.timeout_secs);
    let started = std::time::Instant::now();
    let watcher = match args.wait {
        Some(_) => {
            let ks = kafka_settings.clone();
            Some(joined(tokio::task::spawn_blocking(move || ResultWatcher::start(&ks)).await)??)
        }
        None => None,
    };
    let confirmations = match args.wait {
        Some(WaitFor::Fleet) => {
            let ks = kafka_settings.clone();
            Some(joined(tokio::task::spawn_blocking(move || ConfirmationWatcher::start(&ks)).await)??)
        }
        _ => None,
    };
    let producer: FutureProducer = kafka::client_config(kafka_settings, ClientRole::Producer).create()?;
    produce_instructions(&producer, &kafka_settings.topics().instructions, &instructions).await?;
    for i in &instructions {
        println!("submitted {}", i.instruction_id);
    }
    let Some(mut watcher) = watcher else { return Ok(SubmitOutcome::Done) };
    let ids = instructions.iter().map(|i| i.instruction_id.clone()).collect();
    let (watcher, waited) = joined(
        tokio::task::spawn_blocking(move || {
            let r = watcher.wait_for(&ids, timeout, |_| {});
            (watcher, r)
        })
        .await,
    )?;
    let results: Vec<_> = instructions.iter().filter_map(|i| watcher.results().get(&i.instruction_id).cloned()).collect();
    joined(tokio::task::spawn_blocking(move || watcher.close()).await)?;
    for r in &results {
        println!("{}", serde_json::to_string(r).map_err(|e| SubmitError::Other(e.to_string()))?);
    }
    if let Err(e) = waited {
        eprintln!("error: {e}");
        return Ok(SubmitOutcome::TimedOut);
    }
    if results.iter().any(|r| r.status != ResultStatus::Committed) {
        return Ok(SubmitOutcome::NotCommitted);
    }
    let left = timeout.saturating_sub(started.elapsed());
    if let Some(confirmations) = confirmations {
        let ids = results.iter().map(|r| r.instruction_id.clone()).collect();
        return wait_fleet(confirmations, ids, left, started).await;
    }
    if args.wait != Some(WaitFor::AllDevices) {
        return Ok(SubmitOutcome::Done);
    }
    let target = results.iter().filter_map(|r| r.commit_lsn).max().unwrap_or(0);
    wait_all_devices(kafka_settings, args, target, left, started).await
}

/// Waits for the final confirmation of every id, printing each confirmation as it comes.
async fn wait_fleet(
    mut confirmations: ConfirmationWatcher,
    ids: HashSet<String>,
    left: Duration,
    started: std::time::Instant,
) -> Result<SubmitOutcome, SubmitError> {
    let waited = joined(
        tokio::task::spawn_blocking(move || {
            let r = confirmations.wait_final(&ids, left, |c| {
                println!("{}", serde_json::to_string(&confirmation_json(c)).unwrap_or_default());
            });
            confirmations.close();
            r
        })
        .await,
    )?;
    match waited {
        Ok(finals) => {
            let devices = finals.values().map(|c| c.devices).max().unwrap_or(0);
            println!("applied on the fleet ({devices} devices) in {:.2}s", started.elapsed().as_secs_f64());
            Ok(SubmitOutcome::Done)
        }
        Err(e) => {
            eprintln!("error: {e}");
            Ok(SubmitOutcome::TimedOut)
        }
    }
}

fn confirmation_json(c: &Confirmation) -> serde_json::Value {
    let missing: Vec<serde_json::Value> = c
        .missing
        .iter()
        .map(|m| serde_json::json!({"device": m.device_id, "applied_lsn": lsn_text(m.applied_lsn), "lag_bytes": m.lag_bytes}))
        .collect();
    serde_json::json!({
        "instruction_id": c.instruction_id,
        "confirmation": c.status,
        "commit_lsn": lsn_text(c.commit_lsn),
        "devices": c.devices,
        "missing": missing,
        "slowest_device": c.slowest_device,
    })
}

/// Waits until every live device (and every one `args` requires) has applied `target`.
async fn wait_all_devices(
    kafka_settings: &KafkaSettings,
    args: &SubmitArgs,
    target: i64,
    left: Duration,
    started: std::time::Instant,
) -> Result<SubmitOutcome, SubmitError> {
    let ks = kafka_settings.clone();
    let required = args.devices.clone();
    let live = Duration::from_secs(args.live_window_secs);
    let outcome = joined(
        tokio::task::spawn_blocking(move || -> Result<Result<Vec<String>, SubmitError>, SubmitError> {
            let mut acks = AckWatcher::start(&ks, live + Duration::from_secs(5))?;
            let r = acks.wait_applied(target, &required, live, left, |device, applied, done| {
                let state = if done { "applied" } else { "waiting" };
                println!("device {device}: {state} (watermark {}, instruction at {})", lsn_text(applied), lsn_text(target));
            });
            acks.close();
            Ok(r)
        })
        .await,
    )??;
    match outcome {
        Ok(devices) => {
            println!(
                "applied on all {} live devices ({}) in {:.2}s",
                devices.len(),
                devices.join(", "),
                started.elapsed().as_secs_f64()
            );
            Ok(SubmitOutcome::Done)
        }
        Err(e) => {
            eprintln!("error: {e}");
            Ok(SubmitOutcome::TimedOut)
        }
    }
}

fn lsn_text(lsn: i64) -> String {
    Lsn::try_from(lsn).map_or_else(|_| "none".to_string(), |l| l.to_string())
}

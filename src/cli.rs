//! The command line: one subcommand per component. Each parses its typed settings and
//! calls the component's `run` with a shutdown signal; nothing else happens here.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use rdkafka::producer::FutureProducer;

use crate::config::{KafkaSettings, MetricsSettings, PostgresSettings};
use crate::kafka::{self, ClientRole};
use crate::submit::{self, AckWatcher, ResultWatcher};
use crate::telemetry::{self, LogFormat};
use crate::{capture, demo, device, executor, pg, shutdown, verify};

#[derive(Debug, Parser)]
#[command(
    name = "pgfanout",
    version,
    about = "One instruction in, every device in step: PostgreSQL changes fanned out through Kafka to every device's SQLite store."
)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long = "log-format", env = "PGFANOUT_LOG_FORMAT", value_enum, default_value = "text", global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the pgfanout schema in PostgreSQL and the pipeline's topics in Kafka.
    Setup {
        #[command(flatten)]
        kafka: KafkaSettings,
        #[command(flatten)]
        postgres: PostgresSettings,
    },
    /// Apply instructions to PostgreSQL, once each, and publish their results.
    Executor {
        #[command(flatten)]
        kafka: KafkaSettings,
        #[command(flatten)]
        postgres: PostgresSettings,
        #[command(flatten)]
        metrics: MetricsSettings,
        #[command(flatten)]
        settings: executor::ExecutorSettings,
    },
    /// Stream committed changes from the WAL to the deltas topic.
    Capture {
        #[command(flatten)]
        kafka: KafkaSettings,
        #[command(flatten)]
        postgres: PostgresSettings,
        #[command(flatten)]
        metrics: MetricsSettings,
        #[command(flatten)]
        settings: capture::CaptureSettings,
    },
    /// Apply deltas to this device's SQLite store.
    Device {
        #[command(flatten)]
        kafka: KafkaSettings,
        #[command(flatten)]
        metrics: MetricsSettings,
        #[command(flatten)]
        settings: device::DeviceSettings,
    },
    /// Rewind a device's stored offsets and apply the deltas again from there, until it has
    /// caught up (stop the device first).
    Replay {
        #[command(flatten)]
        kafka: KafkaSettings,
        #[command(flatten)]
        settings: device::replay::ReplaySettings,
    },
    /// Build a fresh store from the whole deltas topic and swap it in atomically (stop the
    /// device first).
    Rebuild {
        #[command(flatten)]
        kafka: KafkaSettings,
        #[command(flatten)]
        settings: device::DeviceSettings,
    },
    /// Show a device's position per partition, its lag, watermark and counters.
    Status {
        #[command(flatten)]
        kafka: KafkaSettings,
        /// The device's store.
        #[arg(long = "store", env = "PGFANOUT_DEVICE_STORE")]
        store: PathBuf,
    },
    /// Submit instructions from a JSON-lines file (`-` for stdin) or from flags.
    Submit {
        #[command(flatten)]
        kafka: KafkaSettings,
        /// JSON-lines file of instructions.
        #[arg(long = "file", conflicts_with_all = ["op", "table"])]
        file: Option<PathBuf>,
        /// Single operation: insert, update, upsert or delete.
        #[arg(long = "op", requires = "table")]
        op: Option<String>,
        /// Table of the single operation (schema.table).
        #[arg(long = "table", requires = "op")]
        table: Option<String>,
        /// Key column of the single operation, as name=value (value parsed as JSON if it can be).
        #[arg(long = "key")]
        key: Vec<String>,
        /// Value of the single operation, as name=value (value parsed as JSON if it can be).
        #[arg(long = "value")]
        value: Vec<String>,
        /// Precondition of the single update or delete: a current value the row must
        /// hold, as name=value.
        #[arg(long = "expect")]
        expect: Vec<String>,
        /// Issuing device id.
        #[arg(long = "issued-by", env = "PGFANOUT_DEVICE_ID", default_value = "cli")]
        issued_by: String,
        /// Wait for every instruction's result and print it (`committed`, the default), and
        /// with `all-devices` also until every live device has applied it. Exit status: 0
        /// done, 1 an instruction was rejected or failed, 2 timed out.
        #[arg(long = "wait", value_enum, num_args = 0..=1, default_missing_value = "committed")]
        wait: Option<WaitFor>,
        /// Devices that must acknowledge (with `--wait all-devices`), besides every device
        /// that acknowledged within the live window.
        #[arg(long = "devices", value_delimiter = ',')]
        devices: Vec<String>,
        /// A device counts as live when it acknowledged within this many seconds.
        #[arg(long = "live-window-secs", default_value_t = 30)]
        live_window_secs: u64,
        /// Longest wait, in seconds.
        #[arg(long = "timeout-secs", default_value_t = 60)]
        timeout_secs: u64,
    },
    /// Compare device stores with PostgreSQL (row count and checksum per table).
    Verify {
        #[command(flatten)]
        postgres: PostgresSettings,
        /// Device stores to compare: `--store a.sqlite b.sqlite` or `--store a.sqlite --store b.sqlite`.
        #[arg(long = "store", required = true, num_args = 1..)]
        stores: Vec<PathBuf>,
    },
    /// Run the whole pipeline locally with a sample workload, then verify.
    Demo {
        #[command(flatten)]
        kafka: KafkaSettings,
        #[command(flatten)]
        postgres: PostgresSettings,
        #[command(flatten)]
        settings: demo::DemoSettings,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WaitFor {
    /// The instruction's result.
    Committed,
    /// The result, then every live device's applied watermark.
    AllDevices,
}

/// Submits, then waits as asked; the exit status tells the outcome.
async fn submit_and_wait(
    kafka: &KafkaSettings,
    instructions: &[crate::contract::Instruction],
    wait: Option<WaitFor>,
    required: &[String],
    live: Duration,
    timeout: Duration,
) -> anyhow::Result<ExitCode> {
    let started = std::time::Instant::now();
    let watcher = match wait {
        Some(_) => {
            let ks = kafka.clone();
            Some(tokio::task::spawn_blocking(move || ResultWatcher::start(&ks)).await??)
        }
        None => None,
    };
    let producer: FutureProducer = kafka::client_config(kafka, ClientRole::Producer).create()?;
    submit::produce_instructions(&producer, &kafka.topics().instructions, instructions).await?;
    for i in instructions {
        println!("submitted {}", i.instruction_id);
    }
    let Some(mut watcher) = watcher else { return Ok(ExitCode::SUCCESS) };
    let ids = instructions.iter().map(|i| i.instruction_id.clone()).collect();
    let (watcher, waited) = tokio::task::spawn_blocking(move || {
        let r = watcher.wait_for(&ids, timeout, |_| {});
        (watcher, r)
    })
    .await?;
    let results: Vec<_> = instructions.iter().filter_map(|i| watcher.results().get(&i.instruction_id).cloned()).collect();
    tokio::task::spawn_blocking(move || watcher.close()).await?;
    for r in &results {
        println!("{}", serde_json::to_string(r)?);
    }
    if let Err(e) = waited {
        eprintln!("error: {e}");
        return Ok(ExitCode::from(2));
    }
    if results.iter().any(|r| r.status != crate::contract::ResultStatus::Committed) {
        return Ok(ExitCode::FAILURE);
    }
    if wait != Some(WaitFor::AllDevices) {
        return Ok(ExitCode::SUCCESS);
    }
    let target = results.iter().filter_map(|r| r.commit_lsn).max().unwrap_or(0);
    let ks = kafka.clone();
    let required = required.to_vec();
    let left = timeout.saturating_sub(started.elapsed());
    let outcome = tokio::task::spawn_blocking(move || -> anyhow::Result<Result<Vec<String>, submit::SubmitError>> {
        let mut acks = AckWatcher::start(&ks, live + Duration::from_secs(5))?;
        let r = acks.wait_applied(target, &required, live, left, |device, applied, done| {
            let state = if done { "applied" } else { "waiting" };
            println!("device {device}: {state} (watermark {}, instruction at {})", lsn_text(applied), lsn_text(target));
        });
        acks.close();
        Ok(r)
    })
    .await??;
    match outcome {
        Ok(devices) => {
            println!(
                "applied on all {} live devices ({}) in {:.2}s",
                devices.len(),
                devices.join(", "),
                started.elapsed().as_secs_f64()
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("error: {e}");
            Ok(ExitCode::from(2))
        }
    }
}

fn lsn_text(lsn: i64) -> String {
    crate::contract::Lsn::try_from(lsn).map_or_else(|_| "none".to_string(), |l| l.to_string())
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> ExitCode {
    telemetry::init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    if let Command::Setup { postgres, .. }
    | Command::Executor { postgres, .. }
    | Command::Capture { postgres, .. }
    | Command::Verify { postgres, .. }
    | Command::Demo { postgres, .. } = &command
    {
        pg::check_conninfo(&postgres.conninfo).map_err(|e| anyhow::anyhow!("--postgres: {e}"))?;
    }
    match command {
        Command::Setup { kafka, postgres } => {
            let client = pg::connect(&postgres.conninfo).await?;
            pg::ensure_schema(&client).await?;
            kafka::ensure_pipeline_topics(&kafka).await?;
            println!("schema pgfanout and topics {:?} are in place", kafka.topics().all());
            if let Some(problem) = pg::publication_problem(&client, &postgres.publication).await? {
                println!("warning: {problem}; until then capture sends no changes and the executor may write no table");
            }
        }
        Command::Executor { kafka, postgres, metrics, settings } => {
            telemetry::install_metrics(metrics.listen)?;
            executor::run(&kafka, &postgres, &settings, shutdown::on_signals()).await?;
        }
        Command::Capture { kafka, postgres, metrics, settings } => {
            telemetry::install_metrics(metrics.listen)?;
            capture::run(&kafka, &postgres, &settings, shutdown::on_signals()).await?;
        }
        Command::Device { kafka, metrics, settings } => {
            telemetry::install_metrics(metrics.listen)?;
            let shutdown = shutdown::on_signals();
            tokio::task::spawn_blocking(move || device::run_blocking(&kafka, &settings, shutdown)).await??;
        }
        Command::Replay { kafka, settings } => {
            let shutdown = shutdown::on_signals();
            let report =
                tokio::task::spawn_blocking(move || device::replay::replay_blocking(&kafka, &settings, shutdown)).await??;
            let mut from: Vec<_> = report.from.into_iter().collect();
            from.sort();
            println!("replayed {} deltas from {from:?}", report.processed);
        }
        Command::Rebuild { kafka, settings } => {
            let shutdown = shutdown::on_signals();
            let report =
                tokio::task::spawn_blocking(move || device::rebuild::rebuild_blocking(&kafka, &settings, shutdown)).await??;
            println!("rebuilt {} from {} deltas", report.store.display(), report.processed);
        }
        Command::Status { kafka, store } => {
            let status = tokio::task::spawn_blocking(move || device::status::status_blocking(&kafka, &store)).await??;
            print!("{}", status.render());
        }
        Command::Submit {
            kafka,
            file,
            op,
            table,
            key,
            value,
            expect,
            issued_by,
            wait,
            devices,
            live_window_secs,
            timeout_secs,
        } => {
            let instructions = match (file, op, table) {
                (Some(path), _, _) => {
                    let mut text = String::new();
                    if path.as_os_str() == "-" {
                        std::io::stdin().read_to_string(&mut text)?;
                    } else {
                        text = std::fs::read_to_string(&path)?;
                    }
                    submit::parse_json_lines(&text, &issued_by)?
                }
                (None, Some(op), Some(table)) => {
                    let pairs = |items: &[String]| -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
                        items
                            .iter()
                            .map(|kv| {
                                let (k, v) = kv.split_once('=').ok_or_else(|| anyhow::anyhow!("{kv:?} is not name=value"))?;
                                let json = serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.to_string()));
                                Ok((k.to_string(), json))
                            })
                            .collect()
                    };
                    let json = serde_json::json!({"operations": [{"op": op, "table": table, "key": pairs(&key)?, "values": pairs(&value)?, "expect": pairs(&expect)?}]});
                    vec![submit::instruction_from_json(&json, &issued_by).map_err(|e| anyhow::anyhow!(e))?]
                }
                _ => anyhow::bail!("give --file, or --op and --table"),
            };
            return submit_and_wait(
                &kafka,
                &instructions,
                wait,
                &devices,
                Duration::from_secs(live_window_secs),
                Duration::from_secs(timeout_secs),
            )
            .await;
        }
        Command::Verify { postgres, stores } => {
            let report = verify::verify(&postgres.conninfo, &postgres.publication, &stores).await?;
            demo::print_report(&report);
            if report.matching_devices() != report.devices.len() {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Demo { kafka, postgres, settings } => {
            if !demo::run(&kafka, &postgres, &settings, shutdown::on_signals()).await? {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

//! The command line: one subcommand per component. Each parses its typed settings and
//! calls the component's `run` with a shutdown signal; nothing else happens here.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{KafkaSettings, MetricsSettings, PostgresSettings};
use crate::kafka;
use crate::submit;
use crate::telemetry::{self, LogFormat};
use crate::{capture, confirm, demo, device, executor, fleet, pg, shutdown, verify};

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
    /// Confirm every committed instruction once it is applied on every active device of
    /// the registered fleet.
    Confirm {
        #[command(flatten)]
        kafka: KafkaSettings,
        #[command(flatten)]
        postgres: PostgresSettings,
        #[command(flatten)]
        metrics: MetricsSettings,
        #[command(flatten)]
        settings: confirm::ConfirmSettings,
    },
    /// Manage the fleet registry: the devices confirmations wait for.
    Fleet {
        #[command(flatten)]
        kafka: KafkaSettings,
        #[command(flatten)]
        postgres: PostgresSettings,
        #[command(subcommand)]
        command: fleet::cli::FleetCommand,
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
        #[command(flatten)]
        args: submit::SubmitArgs,
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

/// Creates the pgfanout schema (with the fleet registry) and the pipeline's topics.
async fn setup(kafka: &KafkaSettings, postgres: &PostgresSettings) -> anyhow::Result<()> {
    let client = pg::connect(&postgres.conninfo).await?;
    pg::ensure_schema(&client).await?;
    fleet::registry::ensure(&client).await?;
    if let capture::ddl::DdlTrigger::NotPermitted(why) = capture::ddl::install_trigger(&client).await? {
        println!("warning: {why}");
    }
    kafka::ensure_pipeline_topics(kafka).await?;
    println!("schema pgfanout and topics {:?} are in place", kafka.topics().all());
    if let Some(problem) = pg::publication_problem(&client, &postgres.publication).await? {
        println!("warning: {problem}; until then capture sends no changes and the executor may write no table");
    }
    Ok(())
}

async fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    if let Command::Setup { postgres, .. }
    | Command::Executor { postgres, .. }
    | Command::Capture { postgres, .. }
    | Command::Confirm { postgres, .. }
    | Command::Fleet { postgres, .. }
    | Command::Verify { postgres, .. }
    | Command::Demo { postgres, .. } = &command
    {
        pg::check_conninfo(&postgres.conninfo).map_err(|e| anyhow::anyhow!("--postgres: {e}"))?;
    }
    match command {
        Command::Setup { kafka, postgres } => setup(&kafka, &postgres).await?,
        Command::Executor { kafka, postgres, metrics, settings } => {
            telemetry::install_metrics(metrics.listen)?;
            executor::run(&kafka, &postgres, &settings, shutdown::on_signals()).await?;
        }
        Command::Capture { kafka, postgres, metrics, settings } => {
            telemetry::install_metrics(metrics.listen)?;
            capture::run(&kafka, &postgres, &settings, shutdown::on_signals()).await?;
        }
        Command::Confirm { kafka, postgres, metrics, settings } => {
            telemetry::install_metrics(metrics.listen)?;
            confirm::run(&kafka, &postgres, &settings, shutdown::on_signals()).await?;
        }
        Command::Fleet { kafka, postgres, command } => fleet::cli::run(&kafka, &postgres, command).await?,
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
        Command::Submit { kafka, args } => {
            return Ok(match submit::submit_and_wait(&kafka, &args).await? {
                submit::SubmitOutcome::Done => ExitCode::SUCCESS,
                submit::SubmitOutcome::NotCommitted => ExitCode::FAILURE,
                submit::SubmitOutcome::TimedOut => ExitCode::from(2),
            });
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

//! `pgfanout demo`: the whole pipeline on local services. Prepares the sample tables and
//! the topics, starts executor, capture and the devices as child processes, submits the
//! sample workload, waits for every result and for every device to match PostgreSQL, and
//! prints the verification.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rdkafka::producer::FutureProducer;
use tokio::process::{Child, Command};

use crate::component::component_command;
use crate::config::{KafkaSettings, PostgresSettings};
use crate::fleet::{self, signature::DeviceKey};
use crate::kafka::{self, ClientRole};
use crate::shutdown::Shutdown;
use crate::submit::{produce_instructions, ResultWatcher};
use crate::workload::{self, Workload};
use crate::{pg, verify};

#[derive(Debug, Clone, clap::Args)]
pub struct DemoSettings {
    /// Folder for device stores and component logs.
    #[arg(long = "data-dir", default_value = ".data/demo")]
    pub data_dir: PathBuf,
    /// Number of instructions to submit.
    #[arg(long = "instructions", default_value_t = 10_000)]
    pub instructions: usize,
    /// Number of target devices.
    #[arg(long = "devices", default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub devices: u16,
    /// Seed of the workload (random when absent).
    #[arg(long = "seed")]
    pub seed: Option<u64>,
    /// First metrics port: executor, capture, then one per device; 0 for no endpoints.
    #[arg(long = "metrics-base-port", default_value_t = 9181)]
    pub metrics_base_port: u16,
    /// Longest wait for results and for the devices to converge, in seconds.
    #[arg(long = "timeout-secs", default_value_t = 300)]
    pub timeout_secs: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("{0}")]
    Other(String),
}

fn other(e: impl std::fmt::Display) -> DemoError {
    DemoError::Other(e.to_string())
}

/// Runs the demo; `Ok(true)` when every device matches PostgreSQL.
pub async fn run(
    kafka_settings: &KafkaSettings,
    pg_settings: &PostgresSettings,
    settings: &DemoSettings,
    shutdown: Shutdown,
) -> Result<bool, DemoError> {
    let client = pg::connect(&pg_settings.conninfo).await?;
    pg::ensure_schema(&client).await?;
    client.batch_execute(&workload::schema_sql(&pg_settings.publication)).await?;
    kafka::ensure_pipeline_topics(kafka_settings).await?;
    let logs = settings.data_dir.join("logs");
    std::fs::create_dir_all(&logs).map_err(other)?;
    let stores: Vec<PathBuf> =
        (0..settings.devices).map(|i| settings.data_dir.join(format!("device-{}.sqlite", device_name(i)))).collect();

    let mut children = Vec::new();
    let port = |i: u16| (settings.metrics_base_port != 0).then(|| settings.metrics_base_port.saturating_add(i));
    children.push(spawn("executor", &["executor"], None, port(0), kafka_settings, pg_settings, &logs)?);
    children.push(spawn("capture", &["capture"], None, port(1), kafka_settings, pg_settings, &logs)?);
    for (i, store) in stores.iter().enumerate() {
        let id = device_name(i as u16);
        let key = fleet::register_for_local_run(&client, kafka_settings, &id).await.map_err(other)?;
        let store = store.to_string_lossy().into_owned();
        let args = ["device", "--id", &id, "--store", &store];
        children.push(spawn(&format!("device-{id}"), &args, Some(&key), port(2 + i as u16), kafka_settings, pg_settings, &logs)?);
    }
    println!("started executor, capture and {} devices (logs in {})", settings.devices, logs.display());
    if settings.metrics_base_port != 0 {
        println!(
            "metrics: executor http://127.0.0.1:{}/metrics, capture :{}, devices :{}..:{}",
            settings.metrics_base_port,
            settings.metrics_base_port + 1,
            settings.metrics_base_port + 2,
            settings.metrics_base_port + 1 + settings.devices
        );
    }

    let outcome = tokio::select! {
        outcome = drive(kafka_settings, pg_settings, settings, &stores, shutdown) => outcome,
        exited = first_exit(&mut children) => Err(DemoError::Other(format!("{exited}; see {}", logs.display()))),
    };
    for (name, child) in &mut children {
        stop_child(name, child).await;
    }
    outcome
}

async fn drive(
    kafka_settings: &KafkaSettings,
    pg_settings: &PostgresSettings,
    settings: &DemoSettings,
    stores: &[PathBuf],
    shutdown: Shutdown,
) -> Result<bool, DemoError> {
    let timeout = Duration::from_secs(settings.timeout_secs);
    let seed = settings.seed.unwrap_or_else(|| crate::contract::now_micros() as u64);
    let instructions = Workload::new(seed, "demo").instructions(settings.instructions);
    let ids: HashSet<String> = instructions.iter().map(|i| i.instruction_id.clone()).collect();

    let ks = kafka_settings.clone();
    let mut watcher = tokio::task::spawn_blocking(move || ResultWatcher::start(&ks)).await.map_err(other)?.map_err(other)?;
    let producer: FutureProducer = kafka::client_config(kafka_settings, ClientRole::Producer).create()?;
    let started = Instant::now();
    produce_instructions(&producer, &kafka_settings.topics().instructions, &instructions).await.map_err(other)?;
    println!("submitted {} instructions (seed {seed}) in {:.1}s", instructions.len(), started.elapsed().as_secs_f64());

    let total = ids.len();
    let waited = tokio::task::spawn_blocking(move || {
        let step = (total / 10).max(1);
        let mut shown = 0;
        let r = watcher.wait_for(&ids, timeout, |seen| {
            // A line each time another tenth has arrived (results come in batches).
            if seen / step > shown / step || seen == total {
                println!("results: {seen} of {total}");
                shown = seen;
            }
        });
        (watcher, r)
    })
    .await
    .map_err(other)?;
    let (watcher, waited) = waited;
    let mut by_status: BTreeMap<&str, usize> = BTreeMap::new();
    for r in watcher.results().values() {
        *by_status.entry(r.status.as_str()).or_default() += 1;
    }
    watcher.close();
    waited.map_err(other)?;
    println!("all results in after {:.1}s: {by_status:?}", started.elapsed().as_secs_f64());

    let deadline = Instant::now() + timeout;
    let mut last_line = String::new();
    let report = loop {
        let report = verify::verify(&pg_settings.conninfo, &pg_settings.publication, stores).await.map_err(other)?;
        let line = format!("devices matching postgres: {} of {}", report.matching_devices(), report.devices.len());
        if line != last_line {
            println!("{line}");
            last_line = line;
        }
        if report.matching_devices() == report.devices.len() || Instant::now() > deadline || shutdown.is_triggered() {
            break report;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    println!("converged {:.1}s after the first submit", started.elapsed().as_secs_f64());
    print_report(&report);
    Ok(report.matching_devices() == report.devices.len())
}

/// Prints one line per device and table, then the summary line.
pub fn print_report(report: &verify::Report) {
    for (path, tables) in &report.devices {
        for t in tables {
            println!(
                "{} {}: postgres {} rows / {:016x}, device {} rows / {:016x} {}",
                path.display(),
                t.table,
                t.postgres.rows,
                t.postgres.checksum,
                t.device.rows,
                t.device.checksum,
                if t.matches() { "ok".to_string() } else { format!("DIFFERENT {:?}", t.sample_differences) }
            );
        }
    }
    println!("{}", report.summary_line());
}

fn device_name(i: u16) -> String {
    ((b'a' + (i % 26) as u8) as char).to_string() + &if i >= 26 { (i / 26).to_string() } else { String::new() }
}

/// Starts `pgfanout args…` (a device with its `key`), its output in `<logs>/<name>.log`.
fn spawn(
    name: &str,
    args: &[&str],
    key: Option<&DeviceKey>,
    metrics_port: Option<u16>,
    kafka_settings: &KafkaSettings,
    pg_settings: &PostgresSettings,
    logs: &Path,
) -> Result<(String, Child), DemoError> {
    let exe = std::env::current_exe().map_err(other)?;
    let log = std::fs::File::create(logs.join(format!("{name}.log"))).map_err(other)?;
    let mut cmd = Command::from(component_command(exe, args, kafka_settings, pg_settings));
    cmd.stdout(log.try_clone().map_err(other)?).stderr(log).kill_on_drop(true);
    if let Some(port) = metrics_port {
        cmd.env("PGFANOUT_METRICS_ADDR", format!("127.0.0.1:{port}"));
    }
    if let Some(key) = key {
        cmd.env("PGFANOUT_DEVICE_KEY", key.to_hex());
    }
    let child = cmd.spawn().map_err(other)?;
    Ok((name.to_string(), child))
}

/// Resolves when a component exits on its own, naming it.
async fn first_exit(children: &mut [(String, Child)]) -> String {
    loop {
        for (name, child) in children.iter_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                return format!("{name} exited with {status}");
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// SIGTERM, then SIGKILL if the child has not exited after 15 s.
async fn stop_child(name: &str, child: &mut Child) {
    if let Some(pid) = child.id() {
        // SAFETY: plain kill(2) on a child we spawned and have not reaped yet.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
    }
    match tokio::time::timeout(Duration::from_secs(15), child.wait()).await {
        Ok(Ok(status)) if status.success() => {}
        Ok(Ok(status)) => eprintln!("{name} exited with {status}"),
        Ok(Err(e)) => eprintln!("{name}: {e}"),
        Err(_) => {
            eprintln!("{name} did not stop in 15 s; killing it");
            let _ = child.kill().await;
        }
    }
}

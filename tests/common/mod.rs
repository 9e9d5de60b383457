//! Test harness: a real PostgreSQL and a real Kafka-protocol broker (started by
//! `deploy/local/test.sh`, which exports their addresses), with one fresh database and one
//! topic prefix per test, and the `pgfanout` binary run as child processes.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pgfanout::config::{KafkaSettings, PostgresSettings, Properties};
use pgfanout::contract::{Instruction, InstructionResult};
use pgfanout::kafka::{self, ClientRole};
use pgfanout::pg::{self, TableInfo};
use pgfanout::submit::{produce_instructions, ResultWatcher};
use pgfanout::verify::{self, Rows};
use pgfanout::workload;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::FutureProducer;

pub const TIMEOUT: Duration = Duration::from_secs(120);

fn required_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the suite with ./deploy/local/test.sh, which starts PostgreSQL and the broker")
    })
}

/// A pipeline under test: its own database, topics, stores and processes.
pub struct Pipeline {
    pub name: String,
    /// A broker of this pipeline's own (see [`Pipeline::with_own_broker`]).
    broker: Option<OwnBroker>,
    /// A PostgreSQL of this pipeline's own (see [`Pipeline::with_own_services`]).
    postgres_server: Option<OwnPostgres>,
    pub kafka: KafkaSettings,
    pub postgres: PostgresSettings,
    pub dir: PathBuf,
    children: HashMap<String, Child>,
}

fn unique_name(test: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("t_{}_{}_{:08x}", test, std::process::id(), nanos)
}

fn with_dbname(admin: &str, db: &str) -> String {
    let kept: Vec<&str> = admin.split_whitespace().filter(|kv| !kv.starts_with("dbname=")).collect();
    format!("{} dbname={db}", kept.join(" "))
}

impl Pipeline {
    /// Creates the database (sample tables, publication, pgfanout schema) and the topics.
    pub async fn new(test: &str) -> Pipeline {
        Self::new_on(test, &required_env("PGFANOUT_TEST_BROKERS"), &required_env("PGFANOUT_TEST_POSTGRES")).await
    }

    /// Like [`Pipeline::new`] on `brokers` that cannot create topics (librdkafka's mock
    /// cluster): the caller creates `p.kafka.topics().all()` itself.
    pub async fn without_topics(test: &str, brokers: &str) -> Pipeline {
        Self::build(test, brokers, &required_env("PGFANOUT_TEST_POSTGRES"), false).await
    }

    async fn new_on(test: &str, brokers: &str, admin_conninfo: &str) -> Pipeline {
        Self::build(test, brokers, admin_conninfo, true).await
    }

    async fn build(test: &str, brokers: &str, admin_conninfo: &str, create_topics: bool) -> Pipeline {
        let name = unique_name(test);
        let admin = pg::connect(admin_conninfo).await.expect("connect to the test PostgreSQL");
        admin.batch_execute(&format!("CREATE DATABASE {name}")).await.expect("create test database");
        let postgres = PostgresSettings { conninfo: with_dbname(admin_conninfo, &name), publication: "pgfanout".into() };
        let client = pg::connect(&postgres.conninfo).await.unwrap();
        pg::ensure_schema(&client).await.unwrap();
        client.batch_execute(&workload::schema_sql(&postgres.publication)).await.unwrap();
        let properties = std::env::var("PGFANOUT_TEST_KAFKA_PROPERTIES").unwrap_or_default();
        let kafka = KafkaSettings {
            brokers: brokers.to_string(),
            topic_prefix: format!("{name}."),
            properties: Properties(
                properties.split(',').filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ),
            partitions: 3,
            replication_factor: 1,
        };
        if create_topics {
            kafka::ensure_pipeline_topics(&kafka).await.expect("create topics");
        }
        let dir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&dir).unwrap();
        Pipeline { name, broker: None, postgres_server: None, kafka, postgres, dir, children: HashMap::new() }
    }

    /// Like [`Pipeline::new`], with a broker of its own on durable (SQLite) storage, so
    /// that a test can kill and restart it.
    pub async fn with_own_broker(test: &str) -> Pipeline {
        let dir = std::env::temp_dir().join(format!("{}-broker", unique_name(test)));
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut broker = OwnBroker { dir, port, child: None };
        broker.start();
        let mut p = Pipeline::new_on(test, &format!("127.0.0.1:{port}"), &required_env("PGFANOUT_TEST_POSTGRES")).await;
        p.broker = Some(broker);
        p
    }

    /// A broker (on SQLite storage) and a PostgreSQL of its own, so that a test can kill and
    /// restart either.
    pub async fn with_own_services(test: &str) -> Pipeline {
        let broker_dir = std::env::temp_dir().join(format!("{}-broker", unique_name(test)));
        let broker_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut broker = OwnBroker { dir: broker_dir, port: broker_port, child: None };
        broker.start();
        let server = OwnPostgres {
            dir: std::env::temp_dir().join(format!("{}-pg", unique_name(test))),
            port: std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port(),
        };
        server.start();
        let admin = format!("host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=disable", server.port);
        let mut p = Pipeline::new_on(test, &format!("127.0.0.1:{broker_port}"), &admin).await;
        p.broker = Some(broker);
        p.postgres_server = Some(server);
        p
    }

    /// Stops this pipeline's own PostgreSQL: `fast` (a clean shutdown) or `immediate` (a
    /// crash: recovery on the next start).
    pub fn stop_postgres(&mut self, mode: &str) {
        self.postgres_server.as_ref().expect("a PostgreSQL of its own").stop(mode);
    }

    pub fn start_postgres(&mut self) {
        self.postgres_server.as_ref().expect("a PostgreSQL of its own").start();
    }

    pub fn kill_broker(&mut self) {
        self.broker.as_mut().expect("a broker of its own").kill();
    }

    pub fn start_broker(&mut self) {
        self.broker.as_mut().expect("a broker of its own").start();
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        pg::connect(&self.postgres.conninfo).await.unwrap()
    }

    pub fn store(&self, device: &str) -> PathBuf {
        self.dir.join(format!("{device}.sqlite"))
    }

    fn command(&self, args: &[&str]) -> Command {
        // PGFANOUT_BIN runs the tests against another build (to show a test fails without a fix).
        let bin = std::env::var_os("PGFANOUT_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_pgfanout").into());
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .env("PGFANOUT_BROKERS", &self.kafka.brokers)
            .env("PGFANOUT_TOPIC_PREFIX", &self.kafka.topic_prefix)
            .env("PGFANOUT_KAFKA_PROPERTIES", self.kafka.properties.to_string())
            .env("PGFANOUT_POSTGRES", &self.postgres.conninfo)
            .env("PGFANOUT_PUBLICATION", &self.postgres.publication)
            .env("PGFANOUT_EXECUTOR_GROUP", format!("{}-executor", self.name))
            .env("PGFANOUT_SLOT", &self.name)
            .env_remove("PGFANOUT_METRICS_ADDR")
            .stdin(Stdio::null());
        cmd
    }

    /// Runs a `pgfanout` command to completion (with a deadline) and returns its output.
    pub async fn run_cli(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = tokio::process::Command::from(self.command(args));
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
        tokio::time::timeout(TIMEOUT, cmd.output()).await.expect("command finished in time").expect("command ran")
    }

    /// Starts a component; its output goes to `<dir>/<label>.log` (appended across restarts).
    pub fn start(&mut self, label: &str, args: &[&str]) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join(format!("{label}.log"))).unwrap();
        let child = self.command(args).stdout(log.try_clone().unwrap()).stderr(log).spawn().expect("spawn pgfanout");
        assert!(self.children.insert(label.to_string(), child).is_none(), "{label} already running");
    }

    pub fn start_executor(&mut self) {
        self.start("executor", &["executor"]);
    }

    /// Starts capture and waits until it streams from its slot (after its initial
    /// snapshot, when one is due).
    pub async fn start_capture(&mut self) {
        self.start_capture_with(&[]).await;
    }

    /// [`Pipeline::start_capture`] with extra arguments.
    pub async fn start_capture_with(&mut self, extra: &[&str]) {
        let mut args = vec!["capture"];
        args.extend_from_slice(extra);
        self.start("capture", &args);
        let client = self.client().await;
        let deadline = Instant::now() + TIMEOUT;
        loop {
            // A slot being created is already `active` while it waits for running
            // transactions; its walsender reports `catchup` or `streaming` only once
            // START_REPLICATION runs from the consistent point.
            let row = client
                .query_opt(
                    "SELECT r.state FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid
                     WHERE s.slot_name = $1",
                    &[&self.name],
                )
                .await
                .unwrap();
            if row.is_some_and(|r| matches!(r.get::<_, Option<String>>(0).as_deref(), Some("catchup" | "streaming"))) {
                return;
            }
            self.assert_running("capture");
            assert!(Instant::now() < deadline, "capture did not start streaming");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn start_device(&mut self, id: &str, extra: &[&str]) {
        let store = self.store(id).to_string_lossy().into_owned();
        let mut args = vec!["device", "--id", id, "--store", &store];
        args.extend_from_slice(extra);
        self.start(&format!("device-{id}"), &args);
    }

    /// SIGKILL: no chance to flush, commit or say goodbye.
    pub fn kill(&mut self, label: &str) {
        let mut child = self.children.remove(label).unwrap_or_else(|| panic!("{label} is not running"));
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// SIGTERM and wait; panics if the process does not exit cleanly in time.
    pub fn stop(&mut self, label: &str) {
        let mut child = self.children.remove(label).unwrap_or_else(|| panic!("{label} is not running"));
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "{label} exited with {status}; see {}",
                    self.dir.join(format!("{label}.log")).display()
                );
                return;
            }
            assert!(Instant::now() < deadline, "{label} did not stop within 30 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Panics with the component's log if it has exited.
    pub fn assert_running(&mut self, label: &str) {
        let child = self.children.get_mut(label).unwrap();
        if let Some(status) = child.try_wait().unwrap() {
            let log = std::fs::read_to_string(self.dir.join(format!("{label}.log"))).unwrap_or_default();
            panic!("{label} exited with {status}:\n{log}");
        }
    }

    pub async fn producer(&self) -> FutureProducer {
        kafka::client_config(&self.kafka, ClientRole::Producer).create().unwrap()
    }

    /// Follows the results topic from now on.
    pub async fn watch_results(&self) -> ResultWatcher {
        let ks = self.kafka.clone();
        tokio::task::spawn_blocking(move || ResultWatcher::start(&ks)).await.unwrap().unwrap()
    }

    /// Produces instructions (acknowledged by Kafka) without waiting for their results.
    pub async fn submit(&self, instructions: &[Instruction]) {
        produce_instructions(&self.producer().await, &self.kafka.topics().instructions, instructions).await.unwrap();
    }

    /// Submits and waits for every result; returns them by id.
    pub async fn submit_and_wait(&mut self, instructions: &[Instruction]) -> HashMap<String, InstructionResult> {
        let watcher = self.watch_results().await;
        self.submit(instructions).await;
        self.await_results(watcher, instructions).await
    }

    /// Waits until `watcher` has seen a result for every instruction.
    pub async fn await_results(
        &mut self,
        watcher: ResultWatcher,
        instructions: &[Instruction],
    ) -> HashMap<String, InstructionResult> {
        let watcher = self.await_watcher(watcher, instructions).await;
        let results = watcher.results().clone();
        tokio::task::spawn_blocking(move || watcher.close()).await.unwrap();
        results
    }

    /// Waits until `watcher` has seen a result for every instruction; returns it open.
    pub async fn await_watcher(&mut self, mut watcher: ResultWatcher, instructions: &[Instruction]) -> ResultWatcher {
        let ids: HashSet<String> = instructions.iter().map(|i| i.instruction_id.clone()).collect();
        let (watcher, waited) = tokio::task::spawn_blocking(move || {
            let r = watcher.wait_for(&ids, TIMEOUT, |_| {});
            (watcher, r)
        })
        .await
        .unwrap();
        if let Err(e) = waited {
            if self.children.contains_key("executor") {
                self.assert_running("executor");
            }
            panic!("{e}");
        }
        watcher
    }

    pub async fn tables(&self) -> Vec<TableInfo> {
        let client = self.client().await;
        let mut out = Vec::new();
        for name in pg::publication_tables(&client, &self.postgres.publication).await.unwrap() {
            out.push(pg::table_info(&client, &name).await.unwrap().unwrap());
        }
        out
    }

    /// Every published table's rows, canonical, from PostgreSQL.
    pub async fn postgres_rows(&self) -> BTreeMap<String, Rows> {
        let client = self.client().await;
        let mut out = BTreeMap::new();
        for t in self.tables().await {
            out.insert(t.name.to_string(), verify::postgres_rows(&client, &t).await.unwrap());
        }
        out
    }

    pub async fn device_rows(&self, device: &str) -> BTreeMap<String, Rows> {
        let conn = verify::open_store_read_only(&self.store(device)).unwrap();
        let mut out = BTreeMap::new();
        for t in self.tables().await {
            out.insert(t.name.to_string(), verify::device_rows(&conn, &t).unwrap_or_default());
        }
        out
    }

    /// Waits up to `timeout` for every device's rows to equal PostgreSQL's; returns the
    /// devices that still differ.
    pub async fn diverged_after(&mut self, devices: &[&str], timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let expected = self.postgres_rows().await;
            let mut diverged = Vec::new();
            for d in devices {
                if !self.store(d).exists() || self.device_rows(d).await != expected {
                    diverged.push(d.to_string());
                }
            }
            if diverged.is_empty() || Instant::now() > deadline {
                return diverged;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Polls until every device's rows equal PostgreSQL's, row by row; panics with the
    /// differences at the deadline.
    pub async fn wait_converged(&mut self, devices: &[&str]) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let expected = self.postgres_rows().await;
            let mut all = true;
            for d in devices {
                if !self.store(d).exists() || self.device_rows(d).await != expected {
                    all = false;
                    break;
                }
            }
            if all {
                return;
            }
            if Instant::now() > deadline {
                let mut first_difference = String::new();
                for d in devices {
                    let got = self.device_rows(d).await;
                    for (table, rows) in &expected {
                        let theirs = got.get(table).cloned().unwrap_or_default();
                        if let Some((k, v)) = rows.iter().find(|(k, v)| theirs.get(*k) != Some(*v)) {
                            first_difference =
                                format!("device {d}, {table}, key {k}:\n postgres {v}\n device   {:?}", theirs.get(k));
                            break;
                        }
                        if let Some((k, v)) = theirs.iter().find(|(k, _)| !rows.contains_key(*k)) {
                            first_difference = format!("device {d}, {table}, key {k}: not in postgres\n device   {v}");
                            break;
                        }
                    }
                }
                panic!(
                    "devices did not converge within {TIMEOUT:?}; first difference: {first_difference}\n{}\n{}",
                    self.slot_state().await,
                    self.log_tails()
                );
            }
            for label in self.children.keys().cloned().collect::<Vec<_>>() {
                self.assert_running(&label);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The slot's confirmed flush position, as a number of bytes of WAL.
    pub async fn slot_flushed(&self) -> i64 {
        let sql = "SELECT (confirmed_flush_lsn - '0/0'::pg_lsn)::bigint FROM pg_replication_slots WHERE slot_name = $1";
        self.client().await.query_one(sql, &[&self.name]).await.unwrap().get(0)
    }

    /// The server's current WAL position, as a number of bytes of WAL.
    pub async fn wal_position(&self) -> i64 {
        self.client().await.query_one("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint", &[]).await.unwrap().get(0)
    }

    /// The replication slot and its walsender as PostgreSQL sees them, and the deltas in
    /// Kafka, for a failure message.
    async fn slot_state(&self) -> String {
        let client = self.client().await;
        let row = client
            .query_opt(
                "SELECT s.active, s.confirmed_flush_lsn::text, r.state, r.sent_lsn::text, pg_current_wal_lsn()::text
                 FROM pg_replication_slots s LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid
                 WHERE s.slot_name = $1",
                &[&self.name],
            )
            .await;
        let slot = match row {
            Ok(Some(r)) => format!(
                "slot active={:?} confirmed_flush={:?} walsender={:?} sent={:?} server_wal={:?}",
                r.get::<_, bool>(0),
                r.get::<_, Option<String>>(1),
                r.get::<_, Option<String>>(2),
                r.get::<_, Option<String>>(3),
                r.get::<_, Option<String>>(4)
            ),
            Ok(None) => "no slot".to_string(),
            Err(e) => format!("slot state unknown: {e}"),
        };
        format!("{slot}; {} records in the deltas topic", self.delta_records())
    }

    /// The last lines of every component's log, for a failure message.
    fn log_tails(&self) -> String {
        let mut out = String::new();
        for label in self.children.keys() {
            let log = std::fs::read_to_string(self.dir.join(format!("{label}.log"))).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            out.push_str(&format!("--- {label}.log (last 30 lines)\n"));
            for line in &lines[lines.len().saturating_sub(30)..] {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    /// Number of records in the deltas topic (sum over partitions).
    pub fn delta_records(&self) -> i64 {
        let topic = self.kafka.topics().deltas;
        let consumer: BaseConsumer =
            kafka::client_config(&self.kafka, ClientRole::UncommittedConsumer { group_id: "watermarks" }).create().unwrap();
        let mut total = 0;
        for p in 0..self.kafka.partitions {
            let (low, high) = consumer.fetch_watermarks(&topic, p, Duration::from_secs(10)).unwrap();
            total += high - low;
        }
        total
    }

    /// Waits until the deltas topic stops growing (capture has published what was committed).
    pub async fn wait_deltas_settled(&self) {
        let mut last = (self.delta_records(), Instant::now());
        let deadline = Instant::now() + TIMEOUT;
        while last.1.elapsed() < Duration::from_millis(500) {
            assert!(Instant::now() < deadline, "the deltas topic kept growing");
            tokio::time::sleep(Duration::from_millis(50)).await;
            let n = self.delta_records();
            if n != last.0 {
                last = (n, Instant::now());
            }
        }
    }

    /// A durable counter of a device store (0 before the store exists).
    pub fn store_counter(&self, device: &str, name: &str) -> i64 {
        if !self.store(device).exists() {
            return 0;
        }
        let conn = verify::open_store_read_only(&self.store(device)).unwrap();
        let created: i64 =
            conn.query_row("SELECT count(*) FROM sqlite_master WHERE name = '_pgfanout_counters'", [], |r| r.get(0)).unwrap();
        if created == 0 {
            return 0;
        }
        conn.query_row("SELECT coalesce((SELECT value FROM _pgfanout_counters WHERE name = ?1), 0)", [name], |r| r.get(0))
            .unwrap()
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        for (_, mut child) in self.children.drain() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(b) = self.broker.as_mut() {
            b.kill();
        }
        if let Some(server) = &self.postgres_server {
            server.stop("immediate");
        }
    }
}

/// A PostgreSQL server in `dir`, started and stopped with the local scripts' functions.
struct OwnPostgres {
    dir: PathBuf,
    port: u16,
}

impl OwnPostgres {
    fn script(&self, commands: &str) -> bool {
        let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/local/lib.sh");
        Command::new("bash")
            .arg("-c")
            .arg(format!("source '{}' && {commands}", lib.display()))
            .stdin(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn start(&self) {
        let (dir, port) = (self.dir.display(), self.port);
        assert!(self.script(&format!("pg_start '{dir}' {port}")), "PostgreSQL in {dir} did not start");
    }

    fn stop(&self, mode: &str) {
        let dir = self.dir.display();
        self.script(&format!("as_pg \"$(pg_bindir)/pg_ctl\" -D '{dir}' -m {mode} -w -t 60 stop >/dev/null 2>&1"));
    }
}

/// A Kafka-protocol broker process on SQLite storage in `dir`.
struct OwnBroker {
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl OwnBroker {
    fn start(&mut self) {
        assert!(self.child.is_none(), "broker already running");
        std::fs::create_dir_all(&self.dir).unwrap();
        let bin = required_env("PGFANOUT_TEST_BROKER_BIN");
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("broker.log")).unwrap();
        let mut cmd = Command::new(&bin);
        cmd.current_dir(&self.dir)
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url, "--storage-engine", "sqlite://broker.db"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if bin.ends_with("nisshi") {
            cmd.arg("--group-initial-rebalance-delay=0s");
        }
        self.child = Some(cmd.spawn().expect("start the broker"));
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "the broker did not listen within 20 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Polls `f` until it returns `Some`, or panics with `what` after `timeout`.
/// Rows in `pgfanout.instruction_log`: one per instruction that took effect or was refused.
pub async fn logged_count(client: &tokio_postgres::Client) -> i64 {
    client.query_one("SELECT count(*) FROM pgfanout.instruction_log", &[]).await.unwrap().get(0)
}

pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

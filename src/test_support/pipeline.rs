//! [`Pipeline`]: one test's database, topics, device stores and component processes.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::clock;
use super::env::{self, unique_name, with_dbname};
use super::process::{append_log, pgfanout_bin, register_device, terminate_and_wait};
use super::services::{OwnBroker, OwnPostgres};
use super::sql::slot_streaming;
use super::wait::{Deadline, TIMEOUT};
use crate::component::component_command;
use crate::config::{KafkaSettings, PostgresSettings};
use crate::{fleet, kafka, pg, workload};

/// A pipeline under test: its own database, topics, stores and processes. Dropping it
/// kills what it started.
pub struct Pipeline {
    /// The database, the slot and the start of every topic name.
    pub name: String,
    /// A broker of this pipeline's own (see [`Pipeline::with_own_broker`]).
    pub(super) broker: Option<OwnBroker>,
    /// A PostgreSQL of this pipeline's own (see [`Pipeline::with_own_services`]).
    pub(super) postgres_server: Option<OwnPostgres>,
    pub kafka: KafkaSettings,
    pub postgres: PostgresSettings,
    /// Where the device stores and the components' logs are.
    pub dir: PathBuf,
    pub(super) children: HashMap<String, Child>,
    /// The keys of the devices registered so far, by id.
    keys: HashMap<String, String>,
}

impl Pipeline {
    /// Creates the database (sample tables, publication, pgfanout schema) and the topics.
    pub async fn new(test: &str) -> Pipeline {
        Self::build(test, &env::brokers(), &env::admin_conninfo(), true).await
    }

    /// Like [`Pipeline::new`] on `brokers` that cannot create topics (librdkafka's mock
    /// cluster): the caller creates `p.kafka.topics().all()` itself.
    pub async fn without_topics(test: &str, brokers: &str) -> Pipeline {
        Self::build(test, brokers, &env::admin_conninfo(), false).await
    }

    /// Like [`Pipeline::new`], with a broker of its own on durable (SQLite) storage, so
    /// that a test can kill and restart it.
    pub async fn with_own_broker(test: &str) -> Pipeline {
        let mut broker = OwnBroker::new(test);
        broker.start();
        let mut p = Self::build(test, &broker.bootstrap_servers(), &env::admin_conninfo(), true).await;
        p.broker = Some(broker);
        p
    }

    /// A broker (on SQLite storage) and a PostgreSQL of its own, so that a test can kill and
    /// restart either.
    pub async fn with_own_services(test: &str) -> Pipeline {
        let mut broker = OwnBroker::new(test);
        broker.start();
        let server = OwnPostgres::new(test);
        server.start();
        let mut p = Self::build(test, &broker.bootstrap_servers(), &server.admin_conninfo(), true).await;
        p.broker = Some(broker);
        p.postgres_server = Some(server);
        p
    }

    async fn build(test: &str, brokers: &str, admin_conninfo: &str, create_topics: bool) -> Pipeline {
        let name = unique_name(&format!("t_{test}"));
        let admin = pg::connect(admin_conninfo).await.expect("connect to the test PostgreSQL");
        admin.batch_execute(&format!("CREATE DATABASE {name}")).await.expect("create test database");
        let postgres = PostgresSettings { conninfo: with_dbname(admin_conninfo, &name), publication: "pgfanout".into() };
        let client = pg::connect(&postgres.conninfo).await.unwrap();
        pg::ensure_schema(&client).await.unwrap();
        fleet::registry::ensure(&client).await.unwrap();
        client.batch_execute(&workload::schema_sql(&postgres.publication)).await.unwrap();
        let kafka = env::kafka_settings(brokers, &format!("{name}."));
        if create_topics {
            kafka::ensure_pipeline_topics(&kafka).await.expect("create topics");
        }
        let dir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&dir).unwrap();
        Pipeline {
            name,
            broker: None,
            postgres_server: None,
            kafka,
            postgres,
            dir,
            children: HashMap::new(),
            keys: HashMap::new(),
        }
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

    /// The store file of device `device`.
    pub fn store(&self, device: &str) -> PathBuf {
        self.dir.join(format!("{device}.sqlite"))
    }

    /// The log file of the component started as `label`.
    pub fn log(&self, label: &str) -> PathBuf {
        self.dir.join(format!("{label}.log"))
    }

    /// `pgfanout args…` with this pipeline's settings, executor group and slot.
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = component_command(pgfanout_bin(), args, &self.kafka, &self.postgres);
        cmd.env("PGFANOUT_EXECUTOR_GROUP", format!("{}-executor", self.name)).env("PGFANOUT_SLOT", &self.name);
        cmd
    }

    /// Runs a `pgfanout` command to completion (with a deadline) and returns its output.
    pub async fn run_cli(&self, args: &[&str]) -> std::process::Output {
        self.run_cli_with(args, &[]).await
    }

    /// [`Pipeline::run_cli`] with extra environment variables.
    pub async fn run_cli_with(&self, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
        let mut cmd = self.command(args);
        cmd.envs(env.iter().copied());
        let mut cmd = tokio::process::Command::from(cmd);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
        tokio::time::timeout(TIMEOUT, cmd.output()).await.expect("command finished in time").expect("command ran")
    }

    /// Starts a component; its output goes to `<dir>/<label>.log` (appended across restarts).
    pub fn start(&mut self, label: &str, args: &[&str]) {
        self.spawn(label, self.command(args));
    }

    /// Spawns `cmd` as the component `label`, its output appended to its log.
    fn spawn(&mut self, label: &str, mut cmd: Command) {
        let (out, err) = append_log(&self.log(label));
        let child = cmd.stdout(out).stderr(err).spawn().expect("spawn pgfanout");
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
        let deadline = Deadline::after(TIMEOUT, "capture to start streaming");
        while !slot_streaming(&client, &self.name).await {
            self.assert_running("capture");
            deadline.pause().await;
        }
    }

    /// Starts device `id`, registering it in the fleet first if this pipeline has not.
    pub fn start_device(&mut self, id: &str, extra: &[&str]) {
        let cmd = self.device_command(id, extra);
        self.spawn(&format!("device-{id}"), cmd);
    }

    /// [`Pipeline::start_device`] with the device's clock shifted by `shift` (`faketime`'s
    /// offset, for example `+1h`).
    pub fn start_device_shifted(&mut self, id: &str, shift: &str, extra: &[&str]) {
        let cmd = clock::shifted(&self.device_command(id, extra), shift, &self.dir);
        self.spawn(&format!("device-{id}"), cmd);
    }

    fn device_command(&mut self, id: &str, extra: &[&str]) -> Command {
        let key = self.device_key(id);
        let store = self.store(id).to_string_lossy().into_owned();
        let mut args = vec!["device", "--id", id, "--store", &store];
        args.extend_from_slice(extra);
        let mut cmd = self.command(&args);
        cmd.env("PGFANOUT_DEVICE_KEY", &key);
        cmd
    }

    /// The key of device `id`, registering it on first use.
    pub fn device_key(&mut self, id: &str) -> String {
        self.register(id, &[])
    }

    /// Registers device `id` with `labels` (`site=berlin`) unless it is registered
    /// already; returns its key.
    pub fn register(&mut self, id: &str, labels: &[&str]) -> String {
        if !self.keys.contains_key(id) {
            let key = register_device(&self.kafka, &self.postgres, id, labels);
            self.keys.insert(id.to_string(), key);
        }
        self.keys[id].clone()
    }

    /// The process id of the component started as `label`.
    pub fn pid(&self, label: &str) -> u32 {
        self.children.get(label).unwrap_or_else(|| panic!("{label} is not running")).id()
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
        let status = terminate_and_wait(&mut child, label, Duration::from_secs(30));
        assert!(status.success(), "{label} exited with {status}; see {}", self.log(label).display());
    }

    /// Panics with the component's log if it has exited.
    pub fn assert_running(&mut self, label: &str) {
        let child = self.children.get_mut(label).unwrap();
        if let Some(status) = child.try_wait().unwrap() {
            let log = std::fs::read_to_string(self.log(label)).unwrap_or_default();
            panic!("{label} exited with {status}:\n{log}");
        }
    }

    /// [`Pipeline::assert_running`] for every component started.
    pub fn assert_all_running(&mut self) {
        for label in self.children.keys().cloned().collect::<Vec<_>>() {
            self.assert_running(&label);
        }
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

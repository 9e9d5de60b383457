//! A PostgreSQL or a broker of a test's own, so that the test can stop, kill and restart it
//! without disturbing the other tests (they share the ones `deploy/local/test.sh` started).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::env::{free_port, required_env, unique_name};
use super::process::append_log;
use super::wait::Deadline;

/// A PostgreSQL server in `dir`, started and stopped with the local scripts' functions
/// (`deploy/local/lib.sh`).
pub struct OwnPostgres {
    dir: PathBuf,
    port: u16,
}

impl OwnPostgres {
    /// A server for `test` on a free port (not started yet).
    pub fn new(test: &str) -> OwnPostgres {
        OwnPostgres { dir: std::env::temp_dir().join(format!("{}-pg", unique_name(&format!("t_{test}")))), port: free_port() }
    }

    /// Conninfo of its superuser on the `postgres` database.
    pub fn admin_conninfo(&self) -> String {
        format!("host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=disable", self.port)
    }

    fn script(&self, commands: &str) -> bool {
        let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/local/lib.sh");
        Command::new("bash")
            .arg("-c")
            .arg(format!("source '{}' && {commands}", lib.display()))
            .stdin(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    pub fn start(&self) {
        let (dir, port) = (self.dir.display(), self.port);
        assert!(self.script(&format!("pg_start '{dir}' {port}")), "PostgreSQL in {dir} did not start");
    }

    /// `fast` (a clean shutdown) or `immediate` (a crash: recovery on the next start).
    pub fn stop(&self, mode: &str) {
        let dir = self.dir.display();
        self.script(&format!("as_pg \"$(pg_bindir)/pg_ctl\" -D '{dir}' -m {mode} -w -t 60 stop >/dev/null 2>&1"));
    }
}

/// A Kafka-protocol broker process (`PGFANOUT_TEST_BROKER_BIN`) on SQLite storage in `dir`,
/// so that its topics survive a kill.
pub struct OwnBroker {
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl OwnBroker {
    /// A broker for `test` on a free port (not started yet).
    pub fn new(test: &str) -> OwnBroker {
        let dir = std::env::temp_dir().join(format!("{}-broker", unique_name(&format!("t_{test}"))));
        OwnBroker { dir, port: free_port(), child: None }
    }

    pub fn bootstrap_servers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts the broker and waits until it listens.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "broker already running");
        std::fs::create_dir_all(&self.dir).unwrap();
        let bin = required_env("PGFANOUT_TEST_BROKER_BIN");
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let (out, err) = append_log(&self.dir.join("broker.log"));
        let mut cmd = Command::new(&bin);
        cmd.current_dir(&self.dir)
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url, "--storage-engine", "sqlite://broker.db"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        if bin.ends_with("nisshi") {
            cmd.arg("--group-initial-rebalance-delay=0s");
        }
        self.child = Some(cmd.spawn().expect("start the broker"));
        let deadline = Deadline::after(Duration::from_secs(20), "the broker to listen").polling_every(Duration::from_millis(20));
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            deadline.pause_blocking();
        }
    }

    /// SIGKILL, if it runs.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

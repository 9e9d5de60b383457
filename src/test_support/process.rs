//! `pgfanout` components run as child processes, with their output in a log file of
//! their own.

use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::time::Duration;

use super::wait::Deadline;
use crate::component::component_command;
use crate::config::{KafkaSettings, PostgresSettings};

/// The `pgfanout` binary the tests and benchmarks run: `PGFANOUT_BIN` when set (to run the
/// tests against another build, or the benchmarks against a release build), otherwise the
/// one cargo built beside the running test (`target/<profile>/pgfanout`, one folder up from
/// the test's own `deps/`).
pub fn pgfanout_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("PGFANOUT_BIN") {
        return bin.into();
    }
    let exe = std::env::current_exe().expect("the path of the running test");
    let profile_dir = exe.parent().and_then(Path::parent).expect("the test runs from target/<profile>/deps");
    profile_dir.join(OsString::from(format!("pgfanout{}", std::env::consts::EXE_SUFFIX)))
}

/// Registers device `id` in the fleet through `pgfanout fleet` (`add` with `labels`, or
/// `rotate-key` when it is registered already) and returns its key in hex, as a device takes it in
/// `PGFANOUT_DEVICE_KEY`.
pub fn register_device(kafka: &KafkaSettings, postgres: &PostgresSettings, id: &str, labels: &[&str]) -> String {
    let run = |verb: &str| {
        let mut args = vec!["fleet", verb, id, "--key-only"];
        if verb == "add" {
            args.extend(labels.iter().flat_map(|l| ["--label", l]));
        }
        component_command(pgfanout_bin(), &args, kafka, postgres)
            .output()
            .unwrap_or_else(|e| panic!("run pgfanout fleet {verb}: {e}"))
    };
    let mut out = run("add");
    if !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("already registered") {
        out = run("rotate-key");
    }
    assert!(out.status.success(), "register device {id}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A log file opened for appending (output of several runs of one component follows on),
/// as a child's standard output and standard error.
pub fn append_log(path: &Path) -> (File, File) {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let copy = log.try_clone().expect("a second handle on the log file");
    (copy, log)
}

/// Sends SIGTERM to `child`, asking it to stop cleanly.
pub fn terminate(child: &Child) {
    // SAFETY: kill(2) on the pid of a child the caller owns and has not reaped yet.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
}

/// SIGTERM, then waits up to `timeout` for the child to exit; panics naming `label` if it
/// does not.
pub fn terminate_and_wait(child: &mut Child, label: &str, timeout: Duration) -> ExitStatus {
    terminate(child);
    let deadline = Deadline::after(timeout, format!("{label} to stop"));
    loop {
        if let Some(status) = child.try_wait().expect("wait for a child") {
            return status;
        }
        deadline.pause_blocking();
    }
}

/// The last `n` lines of the log at `path` (empty when there is none), for a failure message.
pub fn log_tail(path: &Path, n: usize) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    let mut out = String::new();
    for line in &lines[lines.len().saturating_sub(n)..] {
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// The peak resident memory of process `pid` (`VmHWM`), in MB.
pub fn peak_rss_mb(pid: u32) -> f64 {
    status_mb(pid, "VmHWM:").expect("VmHWM in /proc/<pid>/status")
}

/// The resident memory of process `pid` now (`VmRSS`), in MB; 0 once it is gone.
pub fn rss_mb(pid: u32) -> f64 {
    status_mb(pid, "VmRSS:").unwrap_or(0.0)
}

/// A `kB` field of `/proc/<pid>/status`, in MB.
fn status_mb(pid: u32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb: f64 = status.lines().find_map(|l| l.strip_prefix(field))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb / 1024.0)
}

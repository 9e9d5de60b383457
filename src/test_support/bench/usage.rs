//! What processes on this machine used: CPU seconds (from `/proc`), bytes received over
//! TCP (from `ss`), and PostgreSQL's CPU as a whole (the postmaster and every process it
//! started, including those that have exited since).

use std::path::Path;

/// Clock ticks per second of `/proc/<pid>/stat`'s times.
fn ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a constant of the system.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// The fields of `/proc/<pid>/stat` after the command name (field 3 on, state first);
/// `None` once the process is gone.
fn stat(pid: u32) -> Option<Vec<u64>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    // The state is a letter: counted as 0, so that indices match proc(5) less three.
    Some(rest.split_whitespace().map(|f| f.parse().unwrap_or(0)).collect())
}

/// CPU seconds (user and system) used so far by `pid`; with `reaped`, also those of its
/// children that have exited and been waited for. 0 once the process is gone.
pub fn cpu_seconds(pid: u32, reaped: bool) -> f64 {
    let Some(f) = stat(pid) else { return 0.0 };
    // utime, stime, cutime, cstime are fields 14–17 of proc(5).
    let own = f[11] + f[12];
    let children = if reaped { f[13] + f[14] } else { 0 };
    (own + children) as f64 / ticks_per_second()
}

/// CPU seconds used so far by PostgreSQL: the postmaster, the children that have exited
/// (the postmaster waits for each), and those running now.
pub fn postgres_cpu_seconds(postmaster: u32) -> f64 {
    let live: f64 = children(postmaster).into_iter().map(|pid| cpu_seconds(pid, false)).sum();
    cpu_seconds(postmaster, true) + live
}

/// The processes whose parent is `parent`.
fn children(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        // The parent's pid is field 4 of proc(5).
        .filter(|pid| stat(*pid).is_some_and(|f| f[1] == u64::from(parent)))
        .collect()
}

/// Bytes the TCP connections of `pid` have received so far (`bytes_received` of `ss -tinp`:
/// payload as on the wire, counted by the kernel); 0 once they are closed.
pub fn tcp_received_bytes(pid: u32) -> u64 {
    let out = std::process::Command::new("ss").args(["-tinpH"]).output().expect("run ss (iproute2)");
    let text = String::from_utf8_lossy(&out.stdout);
    let owner = format!("pid={pid},");
    let mut lines = text.lines();
    let mut total = 0;
    // Each socket is a line naming its process, followed by an indented line of figures.
    while let Some(line) = lines.next() {
        if !line.contains(&owner) {
            continue;
        }
        let figures = lines.next().unwrap_or_default();
        total += figures
            .split_whitespace()
            .find_map(|f| f.strip_prefix("bytes_received:"))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    total
}

/// The process id on the first line of a pid file (PostgreSQL's `postmaster.pid`, the
/// broker's pid file of `bench/run`).
pub fn pid_in(file: &Path) -> u32 {
    let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
    text.lines().next().and_then(|l| l.trim().parse().ok()).unwrap_or_else(|| panic!("no pid in {}", file.display()))
}

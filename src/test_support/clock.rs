//! Components run with a shifted clock: Debian's `faketime`, and a shim so that librdkafka
//! keeps working under it.
//!
//! libfaketime shifts what `clock_gettime(CLOCK_REALTIME)` returns and converts back the
//! absolute deadlines given to `pthread_cond_timedwait`, but not those given to C11's
//! `cnd_timedwait`, which librdkafka waits with: an hour ahead, each of its timed waits
//! would last an hour longer; an hour behind, none would wait at all. The shim routes
//! `cnd_timedwait` (a `pthread_cond_t` in glibc) through `pthread_cond_timedwait`, which
//! libfaketime then sees.

use std::path::{Path, PathBuf};
use std::process::Command;

const SHIM: &str = r#"
#include <errno.h>
#include <pthread.h>
#include <threads.h>

int cnd_timedwait(cnd_t *restrict cond, mtx_t *restrict mutex, const struct timespec *restrict at) {
    int r = pthread_cond_timedwait((pthread_cond_t *)cond, (pthread_mutex_t *)mutex, at);
    return r == 0 ? thrd_success : r == ETIMEDOUT ? thrd_timedout : thrd_error;
}
"#;

/// Builds the shim into `dir` (with `cc`) and returns its path.
fn shim(dir: &Path) -> PathBuf {
    let source = dir.join("cnd_timedwait.c");
    let library = dir.join("cnd_timedwait.so");
    if !library.exists() {
        std::fs::write(&source, SHIM).expect("write the clock shim's source");
        let status = Command::new("cc")
            .args(["-O2", "-shared", "-fPIC", "-o"])
            .arg(&library)
            .arg(&source)
            .status()
            .expect("run cc to build the clock shim");
        assert!(status.success(), "cc could not build the clock shim");
    }
    library
}

/// `cmd` run under `faketime -f <shift>` (for example `+1h`), with the shim built in `dir`.
pub fn shifted(cmd: &Command, shift: &str, dir: &Path) -> Command {
    assert!(
        Command::new("faketime").arg("--version").output().is_ok(),
        "faketime is not installed: Debian's package faketime (deploy/local/test.sh installs it)"
    );
    let mut out = Command::new("faketime");
    out.args(["-f", shift]).arg(cmd.get_program()).args(cmd.get_args());
    for (name, value) in cmd.get_envs() {
        match value {
            Some(v) => out.env(name, v),
            None => out.env_remove(name),
        };
    }
    out.env("LD_PRELOAD", shim(dir));
    out
}

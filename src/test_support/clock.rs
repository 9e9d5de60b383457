//! Components run with a shifted clock: Debian's libfaketime, and a shim so that librdkafka
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

/// libfaketime as Debian installs it; the dynamic loader expands `$LIB` (as the `faketime`
/// wrapper has it load the library).
const LIBFAKETIME: &str = "/usr/$LIB/faketime/libfaketime.so.1";

/// `cmd` with its clock shifted by `shift` (libfaketime's `FAKETIME`, for example `+1h`):
/// libfaketime and the shim built in `dir` preloaded into the process itself. Not through
/// the `faketime` wrapper, which runs the command as a child of its own: stopping or killing
/// the wrapper left the component running.
pub fn shifted(cmd: &Command, shift: &str, dir: &Path) -> Command {
    assert!(
        Command::new("faketime").arg("--version").output().is_ok(),
        "faketime is not installed: Debian's package faketime (deploy/local/test.sh installs it)"
    );
    let mut out = Command::new(cmd.get_program());
    out.args(cmd.get_args());
    for (name, value) in cmd.get_envs() {
        match value {
            Some(v) => out.env(name, v),
            None => out.env_remove(name),
        };
    }
    out.env("LD_PRELOAD", format!("{}:{LIBFAKETIME}", shim(dir).display())).env("FAKETIME", shift);
    out
}

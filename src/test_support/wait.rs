//! Waiting for a condition: poll it, pause, and give up at a deadline with a message that
//! says what did not happen.

use std::future::Future;
use std::time::{Duration, Instant};

/// The longest a test waits for the pipeline (results, convergence, a component starting).
pub const TIMEOUT: Duration = Duration::from_secs(120);

const POLL: Duration = Duration::from_millis(50);

/// When a wait for `what` gives up, and how long it pauses between two polls.
pub struct Deadline {
    what: String,
    at: Instant,
    poll: Duration,
}

impl Deadline {
    /// A deadline `timeout` from now, polling every 50 ms.
    pub fn after(timeout: Duration, what: impl Into<String>) -> Deadline {
        Deadline { what: what.into(), at: Instant::now() + timeout, poll: POLL }
    }

    /// The same deadline, polling every `poll`.
    pub fn polling_every(self, poll: Duration) -> Deadline {
        Deadline { poll, ..self }
    }

    pub fn passed(&self) -> bool {
        Instant::now() > self.at
    }

    /// Panics if the deadline has passed; pauses one poll interval otherwise.
    pub async fn pause(&self) {
        self.assert_not_passed();
        tokio::time::sleep(self.poll).await;
    }

    /// One poll interval, for a loop that checks [`Deadline::passed`] itself.
    pub async fn sleep(&self) {
        tokio::time::sleep(self.poll).await;
    }

    /// [`Deadline::pause`] for a thread outside the runtime.
    pub fn pause_blocking(&self) {
        self.assert_not_passed();
        std::thread::sleep(self.poll);
    }

    fn assert_not_passed(&self) {
        assert!(!self.passed(), "timed out waiting for {}", self.what);
    }
}

/// Polls `f` (every 100 ms) until it returns `Some`; panics naming `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Deadline::after(timeout, what).polling_every(Duration::from_millis(100));
    loop {
        if let Some(v) = f().await {
            return v;
        }
        deadline.pause().await;
    }
}

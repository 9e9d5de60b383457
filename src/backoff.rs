//! Exponential backoff for retrying transient failures, cut short by shutdown.

use std::time::Duration;

use crate::shutdown::Shutdown;

/// Waits 100 ms, then twice as long each time, up to 5 s.
pub struct Backoff {
    next: Duration,
}

impl Backoff {
    pub fn new() -> Self {
        Backoff { next: Duration::from_millis(100) }
    }

    pub async fn wait(&mut self, shutdown: &mut Shutdown) {
        tokio::select! {
            _ = tokio::time::sleep(self.next) => {}
            _ = shutdown.wait() => {}
        }
        self.next = (self.next * 2).min(Duration::from_secs(5));
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

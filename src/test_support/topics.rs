//! What a [`Pipeline`]'s topics hold.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};

use super::pipeline::Pipeline;
use super::wait::{Deadline, TIMEOUT};
use crate::kafka::{self, ClientRole};

impl Pipeline {
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

    /// Waits until the deltas topic has not grown for 500 ms (capture has published what
    /// was committed).
    pub async fn wait_deltas_settled(&self) {
        let mut last = (self.delta_records(), Instant::now());
        let deadline = Deadline::after(TIMEOUT, "the deltas topic to stop growing");
        while last.1.elapsed() < Duration::from_millis(500) {
            deadline.pause().await;
            let n = self.delta_records();
            if n != last.0 {
                last = (n, Instant::now());
            }
        }
    }
}

//! The fleet side of a [`Pipeline`]: the confirmation service, the confirmations topic and
//! what each device store has applied.

use std::time::Duration;

use rdkafka::consumer::BaseConsumer;
use rdkafka::message::Message;

use super::pipeline::Pipeline;
use super::wait::{Deadline, TIMEOUT};
use crate::contract::codec::decode_confirmation;
use crate::contract::Confirmation;
use crate::kafka;

/// Follows the confirmations topic from its beginning.
pub struct Confirmations {
    consumer: BaseConsumer,
}

impl Confirmations {
    /// The confirmations that arrived, waiting up to `wait` for the first.
    pub fn poll(&self, wait: Duration) -> Vec<Confirmation> {
        kafka::poll_batch(&self.consumer, 10_000, wait, Duration::from_millis(5))
            .unwrap_or_default()
            .iter()
            .map(|m| decode_confirmation(m.payload().expect("a confirmation has a payload")).expect("a valid confirmation"))
            .collect()
    }
}

impl Pipeline {
    /// Starts the confirmation service and waits until it follows the topics.
    pub async fn start_confirm(&mut self, extra: &[&str]) {
        let mut args = vec!["confirm"];
        args.extend_from_slice(extra);
        let before =
            std::fs::read_to_string(self.log("confirm")).map_or(0, |l| l.matches("confirmation service started").count());
        self.start("confirm", &args);
        let deadline = Deadline::after(TIMEOUT, "the confirmation service to start");
        while std::fs::read_to_string(self.log("confirm")).map_or(0, |l| l.matches("confirmation service started").count())
            == before
        {
            self.assert_running("confirm");
            deadline.pause().await;
        }
    }

    pub fn confirmations(&self) -> Confirmations {
        let topic = self.kafka.topics().confirmations;
        let consumer = kafka::reader_at(&self.kafka, &topic, |_, _| Ok(rdkafka::Offset::Beginning)).unwrap().unwrap();
        Confirmations { consumer }
    }

    /// The watermark of device `device`'s store: every transaction at or below it is
    /// applied there (0 until every partition has one).
    pub fn store_watermark(&self, device: &str) -> i64 {
        let Ok(conn) = crate::verify::open_store_read_only(&self.store(device)) else { return 0 };
        let row = conn.query_row(
            "SELECT count(*), coalesce(min(applied_lsn), 0) FROM _pgfanout_offsets WHERE topic = ?1",
            [self.kafka.topics().deltas],
            |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
        );
        match row {
            Ok((n, lsn)) if n == i64::from(self.kafka.partitions) => lsn,
            _ => 0,
        }
    }
}

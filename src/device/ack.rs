//! The device's applied watermark and its publication on the `device-acks` topic.
//!
//! Per partition, the store knows the LSN at or below which every transaction is fully
//! applied: the last watermark delta it applied there (capture sends a watermark only past
//! deltas Kafka acknowledged, so they all precede it in the partition; a data delta moves
//! nothing, since an earlier transaction's delta may have been lost while it got through).
//! The device's watermark is the minimum over all partitions: every
//! transaction at or below it is applied on this device. Comparing it with an
//! instruction's `commit_lsn` is the one confirmation a submitter needs.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, BaseRecord};

use crate::config::KafkaSettings;
use crate::contract::codec::encode_device_ack;
use crate::contract::{now_micros, DeviceAck};
use crate::fleet::signature::DeviceKey;
use crate::kafka::{self, ClientRole, MetricsContext};

/// Applied positions per partition and their minimum.
#[derive(Debug, Clone, Default)]
pub struct AppliedPositions {
    partitions: Vec<i32>,
    applied: HashMap<i32, i64>,
}

impl AppliedPositions {
    pub fn new(partitions: Vec<i32>, applied: HashMap<i32, i64>) -> Self {
        AppliedPositions { partitions, applied }
    }

    pub fn update(&mut self, applied: &HashMap<i32, i64>) {
        for (p, lsn) in applied {
            let e = self.applied.entry(*p).or_insert(0);
            *e = (*e).max(*lsn);
        }
    }

    /// Minimum over the assigned partitions (0 while a partition has seen nothing).
    pub fn value(&self) -> i64 {
        self.partitions.iter().map(|p| self.applied.get(p).copied().unwrap_or(0)).min().unwrap_or(0)
    }

    pub fn per_partition(&self) -> impl Iterator<Item = (i32, i64)> + '_ {
        self.partitions.iter().map(|p| (*p, self.applied.get(p).copied().unwrap_or(0)))
    }
}

/// Publishes the watermark when it moved (at most every `min_gap`) and, as a sign of life,
/// every `HEARTBEAT` even when it did not.
///
/// The producer is polled by the device's own loop, every step: a producer thread of its
/// own (rdkafka's `ThreadedProducer`) was half of an idle device's CPU.
pub struct AckPublisher {
    kafka_settings: KafkaSettings,
    producer: BaseProducer<MetricsContext>,
    topic: String,
    device_id: String,
    key: Option<DeviceKey>,
    min_gap: Duration,
    last: Option<(i64, Instant)>,
}

pub const HEARTBEAT: Duration = Duration::from_secs(5);

impl AckPublisher {
    /// Acknowledgements are signed with `key` when there is one; unsigned ones count for
    /// nothing with the confirmation service.
    pub fn new(
        kafka_settings: &KafkaSettings,
        device_id: String,
        key: Option<DeviceKey>,
        min_gap: Duration,
    ) -> Result<Self, KafkaError> {
        let producer = Self::producer(kafka_settings, &device_id)?;
        let topic = kafka_settings.topics().device_acks;
        Ok(AckPublisher { kafka_settings: kafka_settings.clone(), producer, topic, device_id, key, min_gap, last: None })
    }

    fn producer(kafka_settings: &KafkaSettings, device_id: &str) -> Result<BaseProducer<MetricsContext>, KafkaError> {
        MetricsContext::new("device", Some(device_id)).create(kafka_settings, ClientRole::ReportProducer)
    }

    /// How long until a moved watermark may be published (zero: now); `None` when it did
    /// not move.
    pub fn due_in(&self, watermark: i64) -> Option<Duration> {
        match self.last {
            None => Some(Duration::ZERO),
            Some((sent, _)) if sent == watermark => None,
            Some((_, at)) => Some(self.min_gap.saturating_sub(at.elapsed())),
        }
    }

    /// Call once per step of the device: serves the producer's events (delivery reports,
    /// statistics) and publishes `watermark` when it is due.
    pub fn maybe_publish(&mut self, watermark: i64) {
        self.producer.poll(Duration::ZERO);
        let due = match self.last {
            None => true,
            Some((_, at)) => self.due_in(watermark).is_some_and(|d| d.is_zero()) || at.elapsed() >= HEARTBEAT,
        };
        if !due {
            return;
        }
        let mut ack = DeviceAck { device_id: self.device_id.clone(), applied_lsn: watermark, at: now_micros(), signature: None };
        if let Some(key) = &self.key {
            if let Err(e) = key.sign(&mut ack) {
                tracing::warn!(error = %e, "cannot sign the acknowledgement");
                return;
            }
        }
        let Ok(payload) = encode_device_ack(&ack) else { return };
        // Fire and forget: a lost ack is replaced by the next one.
        match self.producer.send(BaseRecord::to(&self.topic).key(self.device_id.as_bytes()).payload(&payload)) {
            Ok(()) => self.last = Some((watermark, Instant::now())),
            Err((e, _)) if kafka::is_fatal(&e) => {
                tracing::warn!(error = %e, "the acknowledgement producer failed for good; replacing it");
                match Self::producer(&self.kafka_settings, &self.device_id) {
                    Ok(p) => self.producer = p,
                    Err(e) => tracing::warn!(error = %e, "no new acknowledgement producer yet"),
                }
            }
            Err((e, _)) => tracing::debug!(error = %e, "device ack not queued"),
        }
        metrics::gauge!("pgfanout_device_watermark_lsn", "device" => self.device_id.clone()).set(watermark as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watermark_is_the_slowest_partition() {
        let mut w = AppliedPositions::new(vec![0, 1, 2], HashMap::new());
        assert_eq!(w.value(), 0);
        w.update(&HashMap::from([(0, 50), (1, 70)]));
        assert_eq!(w.value(), 0, "partition 2 has seen nothing yet");
        w.update(&HashMap::from([(2, 60), (0, 40)]));
        assert_eq!(w.value(), 50, "positions never move back");
    }
}

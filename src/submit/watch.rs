//! Following the results and device-acknowledgement topics while a submitter waits.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::Offset;

use super::error::SubmitError;
use crate::config::KafkaSettings;
use crate::contract::codec::{decode_confirmation, decode_device_ack, decode_result};
use crate::contract::{now_micros, Confirmation, ConfirmationStatus, DeviceAck, InstructionResult};
use crate::kafka;

/// Polls a topic follower; a broker that is away yields nothing this time, not an error.
fn poll_follower(consumer: &BaseConsumer, wait: Duration) -> Result<Vec<rdkafka::message::OwnedMessage>, SubmitError> {
    match kafka::poll_batch(consumer, 10_000, wait, Duration::from_millis(5)) {
        Ok(batch) => Ok(batch),
        Err(e) if kafka::is_transient(&e) => {
            tracing::debug!(error = %e, "topic not readable yet; retrying");
            Ok(Vec::new())
        }
        Err(e) => Err(e.into()),
    }
}

/// A reader of every partition of `topic` from its end now. Blocking.
fn follower_at_end(settings: &KafkaSettings, topic: &str) -> Result<BaseConsumer, SubmitError> {
    kafka::reader_at(settings, topic, |c, p| {
        let (_, high) = c.fetch_watermarks(topic, p, Duration::from_secs(10))?;
        Ok(Offset::Offset(high))
    })?
    .ok_or_else(|| SubmitError::Other(format!("topic {topic} does not exist")))
}

/// Follows the confirmations topic from its end at creation time.
pub struct ConfirmationWatcher {
    consumer: BaseConsumer,
}

impl ConfirmationWatcher {
    /// Positions at the current end of every confirmations partition. Blocking.
    pub fn start(settings: &KafkaSettings) -> Result<Self, SubmitError> {
        Ok(ConfirmationWatcher { consumer: follower_at_end(settings, &settings.topics().confirmations)? })
    }

    /// Polls until every id in `ids` has its final confirmation or `timeout` passes,
    /// handing every confirmation of those ids to `each`; returns the finals by id.
    /// Blocking.
    pub fn wait_final(
        &mut self,
        ids: &HashSet<String>,
        timeout: Duration,
        mut each: impl FnMut(&Confirmation),
    ) -> Result<HashMap<String, Confirmation>, SubmitError> {
        let deadline = Instant::now() + timeout;
        let mut finals = HashMap::new();
        while finals.len() < ids.len() {
            if Instant::now() > deadline {
                let missing = ids.len() - finals.len();
                return Err(SubmitError::Timeout(format!("{missing} instructions not confirmed on the fleet after {timeout:?}")));
            }
            for m in poll_follower(&self.consumer, Duration::from_millis(200))? {
                let Some(Ok(c)) = m.payload().map(decode_confirmation) else { continue };
                if !ids.contains(&c.instruction_id) {
                    continue;
                }
                each(&c);
                if c.status == ConfirmationStatus::Applied {
                    finals.insert(c.instruction_id.clone(), c);
                }
            }
        }
        Ok(finals)
    }

    pub fn close(self) {
        kafka::close_consumer(self.consumer);
    }
}

/// Follows the results topic from its end at creation time, collecting results by id.
pub struct ResultWatcher {
    consumer: BaseConsumer,
    results: HashMap<String, InstructionResult>,
    deliveries: usize,
    differing: Vec<(InstructionResult, InstructionResult)>,
}

impl ResultWatcher {
    /// Positions at the current end of every results partition: results of instructions
    /// submitted after this call cannot be missed. Blocking.
    pub fn start(settings: &KafkaSettings) -> Result<Self, SubmitError> {
        let consumer = follower_at_end(settings, &settings.topics().results)?;
        Ok(ResultWatcher { consumer, results: HashMap::new(), deliveries: 0, differing: Vec::new() })
    }

    /// Polls until every id in `ids` has a result or `timeout` passes; calls `progress` with
    /// the number of results seen so far. Blocking.
    pub fn wait_for(
        &mut self,
        ids: &HashSet<String>,
        timeout: Duration,
        mut progress: impl FnMut(usize),
    ) -> Result<(), SubmitError> {
        let deadline = Instant::now() + timeout;
        let mut last = 0;
        while ids.iter().any(|id| !self.results.contains_key(id)) {
            if Instant::now() > deadline {
                let missing = ids.iter().filter(|id| !self.results.contains_key(*id)).count();
                return Err(SubmitError::Timeout(format!("{missing} instructions have no result after {timeout:?}")));
            }
            for m in poll_follower(&self.consumer, Duration::from_millis(200))? {
                if let Some(Ok(r)) = m.payload().map(decode_result) {
                    self.deliveries += 1;
                    if let Some(old) = self.results.insert(r.instruction_id.clone(), r.clone()) {
                        if old != r {
                            self.differing.push((old, r));
                        }
                    }
                }
            }
            let seen = ids.iter().filter(|id| self.results.contains_key(*id)).count();
            if seen != last {
                progress(seen);
                last = seen;
            }
        }
        Ok(())
    }

    pub fn results(&self) -> &HashMap<String, InstructionResult> {
        &self.results
    }

    /// Results received, duplicates included.
    pub fn deliveries(&self) -> usize {
        self.deliveries
    }

    /// Pairs of results for the same instruction that differ (there should be none).
    pub fn differing(&self) -> &[(InstructionResult, InstructionResult)] {
        &self.differing
    }

    pub fn close(self) {
        kafka::close_consumer(self.consumer);
    }
}

/// Follows the `device-acks` topic: the latest acknowledgement of every device.
pub struct AckWatcher {
    consumer: BaseConsumer,
    latest: HashMap<String, DeviceAck>,
}

impl AckWatcher {
    /// Starts reading acknowledgements published during the last `history` (so devices
    /// that are alive but idle are known at once). Blocking.
    pub fn start(settings: &KafkaSettings, history: Duration) -> Result<Self, SubmitError> {
        let topic = settings.topics().device_acks;
        let since_ms = (now_micros() / 1000).saturating_sub(history.as_millis() as i64);
        let consumer = kafka::reader_at(settings, &topic, |c, p| {
            // Nothing that recent in this partition: start at its end.
            Ok(kafka::offset_for_time(c, &topic, p, since_ms)?.map_or(Offset::End, Offset::Offset))
        })?
        .ok_or_else(|| SubmitError::Other(format!("topic {topic} does not exist")))?;
        Ok(AckWatcher { consumer, latest: HashMap::new() })
    }

    fn poll(&mut self, wait: Duration) -> Result<(), SubmitError> {
        for m in poll_follower(&self.consumer, wait)? {
            if let Some(Ok(ack)) = m.payload().map(decode_device_ack) {
                let newer = self.latest.get(&ack.device_id).is_none_or(|old| old.at <= ack.at);
                if newer {
                    self.latest.insert(ack.device_id.clone(), ack);
                }
            }
        }
        Ok(())
    }

    /// Waits until every device that acknowledged within `live` (and every device in
    /// `required`) has applied everything up to `target`. Calls `progress` whenever a
    /// device's position changes. Returns the devices counted. Blocking.
    pub fn wait_applied(
        &mut self,
        target: i64,
        required: &[String],
        live: Duration,
        timeout: Duration,
        mut progress: impl FnMut(&str, i64, bool),
    ) -> Result<Vec<String>, SubmitError> {
        let deadline = Instant::now() + timeout;
        let mut shown: HashMap<String, i64> = HashMap::new();
        loop {
            self.poll(Duration::from_millis(100))?;
            let live_since = now_micros() - live.as_micros() as i64;
            let mut devices: Vec<String> =
                self.latest.values().filter(|a| a.at >= live_since).map(|a| a.device_id.clone()).collect();
            for r in required {
                if !devices.contains(r) {
                    devices.push(r.clone());
                }
            }
            devices.sort();
            for d in &devices {
                let applied = self.latest.get(d).map_or(-1, |a| a.applied_lsn);
                if shown.get(d) != Some(&applied) {
                    progress(d, applied, applied >= target);
                    shown.insert(d.clone(), applied);
                }
            }
            let done = !devices.is_empty() && devices.iter().all(|d| self.latest.get(d).is_some_and(|a| a.applied_lsn >= target));
            if done {
                return Ok(devices);
            }
            if Instant::now() > deadline {
                let pending: Vec<&String> =
                    devices.iter().filter(|d| self.latest.get(*d).is_none_or(|a| a.applied_lsn < target)).collect();
                return Err(SubmitError::Timeout(if devices.is_empty() {
                    format!("no device acknowledged anything in the last {live:?}")
                } else {
                    format!("not applied on {pending:?} after {timeout:?}")
                }));
            }
        }
    }

    pub fn close(self) {
        kafka::close_consumer(self.consumer);
    }
}

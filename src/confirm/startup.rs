//! What the service reads before its loop: the final confirmations it already published,
//! and where its consumer starts.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use super::error::ConfirmError;
use super::positions::Checkpoint;
use super::tracker::Finalized;
use crate::config::KafkaSettings;
use crate::contract::codec::decode_confirmation;
use crate::contract::{now_micros, ConfirmationStatus};
use crate::kafka::{self, ClientRole, MetricsContext};

/// How far back acknowledgements are read on a first start: devices re-acknowledge every
/// few seconds ([`crate::device::ack::HEARTBEAT`]).
const FIRST_ACKS: Duration = Duration::from_secs(15);

/// The ids of the final confirmations published since the checkpoint's confirmation
/// positions or the dedupe window, whichever is earlier, and the topic's end per
/// partition. Blocking.
pub(super) fn read_back(
    settings: &KafkaSettings,
    checkpoint: &Checkpoint,
    window_micros: i64,
) -> Result<(Finalized, HashMap<i32, i64>), ConfirmError> {
    let topic = settings.topics().confirmations;
    let since_ms = (now_micros() - window_micros) / 1000;
    let mut finalized = Finalized::default();
    // The earlier of the checkpoint's position and the window's start; the end when
    // neither has one.
    let start = |c: &BaseConsumer, p: i32| {
        let by_time = kafka::offset_for_time(c, &topic, p, since_ms)?;
        Ok(match (checkpoint.confirmations.get(&p).copied(), by_time) {
            (Some(o), Some(t)) => Offset::Offset(o.min(t)),
            (Some(o), None) | (None, Some(o)) => Offset::Offset(o),
            (None, None) => Offset::End,
        })
    };
    let ends = kafka::read_to_end(settings, &topic, start, Duration::from_secs(10), |m| {
        if let Some(Ok(c)) = m.payload().map(decode_confirmation) {
            if c.status == ConfirmationStatus::Applied {
                finalized.insert(c.instruction_id, c.confirmed_at);
            }
        }
    })?;
    Ok((finalized, ends.ok_or_else(|| ConfirmError::NoTopic(topic.clone()))?))
}

/// Per partition, where the consumer starts.
pub(super) type Starts = HashMap<i32, i64>;

/// The consumer, assigned to every results partition at the checkpoint (a first start: the
/// beginning, so that no committed instruction goes unconfirmed because the service started
/// after it) and every device-acks partition at the checkpoint (a first start: the last
/// [`FIRST_ACKS`]), with those offsets. Blocking.
pub(super) fn assign(
    settings: &KafkaSettings,
    checkpoint: &Checkpoint,
) -> Result<(BaseConsumer<MetricsContext>, Starts, Starts), ConfirmError> {
    let consumer: BaseConsumer<MetricsContext> = MetricsContext::new("confirm", None)
        .create(settings, ClientRole::UncommittedConsumer { group_id: "pgfanout-confirm" })?;
    let topics = settings.topics();
    let first_acks_ms = (now_micros() - FIRST_ACKS.as_micros() as i64) / 1000;
    let mut tpl = TopicPartitionList::new();
    let (mut results, mut acks) = (HashMap::new(), HashMap::new());
    for (topic, stored, starts, since_ms) in [
        (&topics.results, &checkpoint.results, &mut results, None),
        (&topics.device_acks, &checkpoint.acks, &mut acks, Some(first_acks_ms)),
    ] {
        let partitions = kafka::partition_count(consumer.client(), topic)?;
        if partitions == 0 {
            return Err(ConfirmError::NoTopic(topic.clone()));
        }
        for p in 0..partitions as i32 {
            let offset = match stored.get(&p) {
                Some(o) => *o,
                None => {
                    let (low, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?;
                    match since_ms {
                        Some(ms) => kafka::offset_for_time(&consumer, topic, p, ms)?.unwrap_or(high),
                        None => low,
                    }
                }
            };
            starts.insert(p, offset);
            tpl.add_partition_offset(topic, p, Offset::Offset(offset))?;
        }
    }
    consumer.assign(&tpl)?;
    Ok((consumer, results, acks))
}

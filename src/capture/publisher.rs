//! Capture's producer: hands deltas to Kafka and moves the [`FlushLsnTracker`] as Kafka
//! acknowledges them.
//!
//! Guarantees and why they hold:
//! - *Only what Kafka acknowledged counts as acknowledged.* Each record carries its
//!   transaction's [`TxHandle`] as librdkafka's per-record opaque value, and librdkafka
//!   reports each record's outcome exactly once, to [`DeliveryInbox::delivery`] on the
//!   producer's polling thread. That callback only notes the outcome in an inbox: one more
//!   acknowledged record of that handle, or the refusal.
//!   The capture loop alone empties the inbox ([`Publisher::take_deliveries`]) into the
//!   tracker, so the tracker, the only source of the flush LSN (see [`super::flush`]), is
//!   never touched from two threads.
//! - *A record is outstanding before its outcome can count.* The tracker counts a record
//!   as sent as soon as librdkafka has taken it, on the capture loop, before the loop next
//!   empties the inbox.
//! - *A refused record stops the session.* [`Publisher::take_deliveries`] returns the first
//!   error it finds; the refused record's transaction never becomes fully acknowledged, so
//!   the flush LSN stays below it, and the next session reads it again from the slot.
//! - *An earlier session's records cannot acknowledge this one's.* Each session starts a
//!   tracker whose handles continue after the earlier one's ([`Publisher::restart`]): a late
//!   outcome of an earlier session names no transaction tracked now and is dropped, error or
//!   not. A producer replaced after a fatal error comes with a new inbox.
//! - *Bounded memory.* The inbox counts consecutive acknowledgements of one transaction in
//!   one entry, so it holds about one entry per transaction in flight (a 1,000,000-row
//!   transaction takes a few), never more than one per record librdkafka holds; and
//!   librdkafka's queue is bounded (`queue.buffering.max.messages`, `.kbytes`): when it is
//!   full, [`Publisher::send`] waits for outcomes. Deltas are encoded into one reused buffer
//!   that librdkafka copies.
//!
//! Why an inbox rather than one future per record (rdkafka's `FutureProducer`): each record
//! then cost a oneshot channel, a boxed task in a `FuturesUnordered` and a wake-up of the
//! capture loop; the futures alone took a tenth of capture's CPU with the benchmark on one
//! core, the channels more on the producer's threads (BENCHMARKS.md, "Capture's CPU per
//! change"). The inbox wakes the loop only when it goes from empty to non-empty, and the
//! loop takes everything in it at once.

use std::sync::Mutex;
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::statistics::Statistics;
use rdkafka::util::Timeout;
use tokio::sync::Notify;

use super::error::CaptureError;
use super::flush::{FlushLsnTracker, Lsn, TxHandle};
use crate::config::KafkaSettings;
use crate::contract::codec::encode_delta_into;
use crate::contract::{delta_kafka_key, Delta, DeltaOp, TOMBSTONE_DELTA_HEADER};
use crate::kafka::{self, ClientRole, MetricsContext};

/// How long [`Publisher::send`] waits for outcomes at most before trying a full queue again.
const QUEUE_FULL_WAIT: Duration = Duration::from_millis(100);

/// Outcomes reported by the delivery callback and not taken yet.
#[derive(Default)]
struct Outcomes {
    /// Acknowledged records, consecutive ones of one transaction counted together.
    acknowledged: Vec<(TxHandle, u64)>,
    refused: Vec<(TxHandle, KafkaError)>,
}

impl Outcomes {
    fn is_empty(&self) -> bool {
        self.acknowledged.is_empty() && self.refused.is_empty()
    }

    fn clear(&mut self) {
        self.acknowledged.clear();
        self.refused.clear();
    }
}

/// The producer's context: outcomes wait here until the capture loop takes them; librdkafka
/// statistics go on to [`MetricsContext`].
pub struct DeliveryInbox {
    observed: MetricsContext,
    outcomes: Mutex<Outcomes>,
    /// Notified when `outcomes` goes from empty to non-empty.
    arrived: Notify,
    latency: metrics::Histogram,
}

impl ClientContext for DeliveryInbox {
    fn stats(&self, statistics: Statistics) {
        self.observed.stats(statistics);
    }
}

impl ProducerContext for DeliveryInbox {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: usize) {
        let (message, error) = match result {
            Ok(m) => (m, None),
            Err((e, m)) => (m, Some(e.clone())),
        };
        // SAFETY: the message is valid for the duration of this callback.
        let micros = unsafe { rdkafka::bindings::rd_kafka_message_latency(message.ptr()) };
        if error.is_none() && micros >= 0 {
            self.latency.record(micros as f64 / 1e6);
        }
        let tx = TxHandle::from_opaque(opaque);
        let was_empty = {
            let mut outcomes = self.outcomes.lock().unwrap_or_else(|e| e.into_inner());
            let was_empty = outcomes.is_empty();
            match error {
                Some(e) => outcomes.refused.push((tx, e)),
                None => match outcomes.acknowledged.last_mut() {
                    Some((last, n)) if *last == tx => *n += 1,
                    _ => outcomes.acknowledged.push((tx, 1)),
                },
            }
            was_empty
        };
        if was_empty {
            self.arrived.notify_one();
        }
    }
}

type CaptureProducer = ThreadedProducer<DeliveryInbox>;

fn new_producer(settings: &KafkaSettings) -> Result<CaptureProducer, KafkaError> {
    let inbox = DeliveryInbox {
        observed: MetricsContext::new("capture", None),
        outcomes: Mutex::new(Outcomes::default()),
        arrived: Notify::new(),
        latency: metrics::histogram!("pgfanout_capture_produce_latency_seconds"),
    };
    kafka::observed_config(settings, ClientRole::Producer).create_with_context(inbox)
}

/// The producer, the tracker of the current session, and capture's per-record metrics.
pub struct Publisher {
    producer: CaptureProducer,
    topic: String,
    partitions: i32,
    tracker: FlushLsnTracker,
    /// Swapped with the inbox's outcomes on each take, so both keep their capacity.
    taken: Outcomes,
    payload: Vec<u8>,
    changes: ChangeCounters,
    in_flight_gauge: metrics::Gauge,
}

impl Publisher {
    /// A producer for the deltas topic, which must exist.
    pub async fn new(settings: &KafkaSettings) -> Result<Publisher, CaptureError> {
        let producer = new_producer(settings)?;
        let topic = settings.topics().deltas;
        let n = tokio::task::block_in_place(|| kafka::partition_count(producer.client(), &topic))?;
        if n == 0 {
            return Err(CaptureError::Config(format!("topic {topic} does not exist; create the pipeline's topics first")));
        }
        Ok(Publisher {
            producer,
            topic,
            partitions: i32::try_from(n).unwrap_or(i32::MAX),
            tracker: FlushLsnTracker::new(0),
            taken: Outcomes::default(),
            payload: Vec::with_capacity(1024),
            changes: ChangeCounters::new(),
            in_flight_gauge: metrics::gauge!("pgfanout_capture_in_flight_deltas"),
        })
    }

    /// Replaces a producer that failed for good. What the old one still held is lost with
    /// its inbox; the next session reads it again from the slot.
    pub fn replace_producer(&mut self, settings: &KafkaSettings) -> Result<(), CaptureError> {
        self.producer = new_producer(settings)?;
        Ok(())
    }

    /// The deltas topic's partition count.
    pub fn partitions(&self) -> i32 {
        self.partitions
    }

    /// Starts a session whose flush position begins at `confirmed`: forgets the transactions
    /// of the earlier one, and the outcomes of its records that already arrived.
    pub fn restart(&mut self, confirmed: Lsn) {
        self.tracker.restart(confirmed);
        self.inbox().outcomes.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.in_flight_gauge.set(0.0);
    }

    pub fn tracker(&self) -> &FlushLsnTracker {
        &self.tracker
    }

    /// A transaction began; its deltas follow.
    pub fn begin(&mut self) -> TxHandle {
        self.tracker.begin()
    }

    /// `tx` committed; its commit record ends at `end_lsn` (0: it moves nothing itself).
    pub fn committed(&mut self, tx: TxHandle, end_lsn: Lsn) {
        self.tracker.committed(tx, end_lsn);
    }

    /// Nothing is pending below `lsn` on the server's side (see [`FlushLsnTracker::idle_at`]).
    pub fn idle_at(&mut self, lsn: Lsn) {
        self.tracker.idle_at(lsn);
    }

    fn inbox(&self) -> &DeliveryInbox {
        self.producer.context()
    }

    /// Resolves when outcomes wait in the inbox (possibly, rarely, when none do). Cancel-safe.
    pub async fn delivered(&self) {
        let inbox = self.inbox();
        if inbox.outcomes.lock().unwrap_or_else(|e| e.into_inner()).is_empty() {
            inbox.arrived.notified().await;
        }
    }

    /// Hands the outcomes that arrived to the tracker, and says whether there were any.
    /// Every acknowledgement counts; the first refusal of a record of this session is
    /// returned.
    pub fn take_deliveries(&mut self) -> Result<bool, CaptureError> {
        std::mem::swap(&mut *self.producer.context().outcomes.lock().unwrap_or_else(|e| e.into_inner()), &mut self.taken);
        let took = !self.taken.is_empty();
        for (tx, records) in self.taken.acknowledged.drain(..) {
            self.tracker.acknowledged_records(tx, records);
        }
        let mut refused = None;
        for (tx, e) in self.taken.refused.drain(..) {
            // A delta Kafka refused after all retries cannot be skipped: stop, and let the
            // next session read it again from the slot.
            if self.tracker.tracks(tx) {
                refused.get_or_insert(e);
            } else {
                tracing::debug!(error = %e, "a record of an earlier session was refused");
            }
        }
        self.in_flight_gauge.set(self.tracker.in_flight() as f64);
        match refused {
            Some(e) => Err(e.into()),
            None => Ok(took),
        }
    }

    /// Waits until every record sent is acknowledged, or a refusal.
    pub async fn all_acknowledged(&mut self) -> Result<(), CaptureError> {
        while self.tracker.in_flight() > 0 {
            self.delivered().await;
            self.take_deliveries()?;
        }
        Ok(())
    }

    /// Waits up to `timeout` for what is in flight, then waits no more; refusals do not
    /// end the wait (the flush position stays below them anyway).
    pub async fn settle(&mut self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.tracker.in_flight() > 0 {
            if tokio::time::timeout_at(deadline, self.delivered()).await.is_err() {
                break;
            }
            let _ = self.take_deliveries();
        }
    }

    /// Lets librdkafka send what it still holds (on stop).
    pub fn flush(&self, timeout: Duration) -> Result<(), CaptureError> {
        Ok(self.producer.flush(Timeout::After(timeout))?)
    }

    /// Hands one delta of `tx` to the producer; a delete is followed by a Kafka tombstone
    /// (same key, no value), so a compacted deltas topic eventually forgets deleted rows.
    pub async fn send(&mut self, delta: &Delta, partition: Option<i32>, tx: TxHandle) -> Result<(), CaptureError> {
        let mut payload = std::mem::take(&mut self.payload);
        encode_delta_into(delta, &mut payload);
        let key = delta_kafka_key(&delta.table, &delta.key);
        let mut result = self.send_record(&key, Some(&payload), None, partition, tx).await;
        if result.is_ok() && delta.op == DeltaOp::Delete {
            // The Kafka tombstone carries the delete in a header: compaction may remove the
            // delete delta (same key) before a lagging device reads it.
            result = self.send_record(&key, None, Some(&payload), partition, tx).await;
        }
        self.payload = payload;
        result?;
        self.changes.count(delta.op);
        Ok(())
    }

    /// Enqueues one record. When the producer's queue is full, takes outcomes first (waiting
    /// for them if none are there): that is the back-pressure that bounds memory.
    async fn send_record(
        &mut self,
        key: &[u8],
        payload: Option<&[u8]>,
        tombstone_of: Option<&[u8]>,
        partition: Option<i32>,
        tx: TxHandle,
    ) -> Result<(), CaptureError> {
        loop {
            let mut record: BaseRecord<'_, [u8], [u8], usize> = BaseRecord::with_opaque_to(&self.topic, tx.to_opaque()).key(key);
            if let Some(p) = payload {
                record = record.payload(p);
            }
            if let Some(delete) = tombstone_of {
                record = record.headers(OwnedHeaders::new().insert(Header { key: TOMBSTONE_DELTA_HEADER, value: Some(delete) }));
            }
            if let Some(p) = partition {
                record = record.partition(p);
            }
            match self.producer.send(record).map_err(|(e, _)| e) {
                Ok(()) => {
                    self.tracker.sent(tx);
                    return Ok(());
                }
                Err(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)) => {
                    if !self.take_deliveries()? {
                        let _ = tokio::time::timeout(QUEUE_FULL_WAIT, self.delivered()).await;
                        self.take_deliveries()?;
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// `pgfanout_capture_changes_total` by op, looked up once instead of for every record.
struct ChangeCounters([metrics::Counter; 6]);

impl ChangeCounters {
    fn new() -> ChangeCounters {
        let counter = |op: DeltaOp| metrics::counter!("pgfanout_capture_changes_total", "op" => op.as_str());
        ChangeCounters([
            counter(DeltaOp::Insert),
            counter(DeltaOp::Update),
            counter(DeltaOp::Delete),
            counter(DeltaOp::Truncate),
            counter(DeltaOp::Snapshot),
            counter(DeltaOp::Drop),
        ])
    }

    /// Counts one delta; watermarks are not changes.
    fn count(&self, op: DeltaOp) {
        let i = match op {
            DeltaOp::Insert => 0,
            DeltaOp::Update => 1,
            DeltaOp::Delete => 2,
            DeltaOp::Truncate => 3,
            DeltaOp::Snapshot => 4,
            DeltaOp::Drop => 5,
            DeltaOp::Watermark => return,
        };
        self.0[i].increment(1);
    }
}

impl Publisher {
    /// After an update that changed its row's key: a Kafka tombstone under the old key, in
    /// the old key's partition, so that a compacted deltas topic forgets the old key instead
    /// of bringing the old row back on `rebuild`. Its header carries the move (the update's
    /// version, new key and old key, no row; see `device::store::moved`): a device that reads
    /// it before the update, or after compaction removed the old key's other records, still
    /// learns that the old key is gone and loses no value the update needs. Sent after the
    /// update, in the same transaction.
    pub async fn send_old_key_tombstone(&mut self, update: &Delta, tx: TxHandle) -> Result<(), CaptureError> {
        let Some(old_key) = &update.old_key else { return Ok(()) };
        let moved = Delta {
            table: update.table.clone(),
            op: DeltaOp::Update,
            key: update.key.clone(),
            after: None,
            old_key: Some(old_key.clone()),
            commit_lsn: update.commit_lsn,
            lsn: update.lsn,
            xid: update.xid,
            commit_ts: update.commit_ts,
            seq: update.seq,
            instruction_id: update.instruction_id.clone(),
        };
        let mut header = Vec::with_capacity(128);
        encode_delta_into(&moved, &mut header);
        self.send_record(&delta_kafka_key(&update.table, old_key), None, Some(&header), None, tx).await
    }
}

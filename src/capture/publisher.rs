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
//!   librdkafka's queue is bounded (`queue.buffering.max.messages`, and `.kbytes` at
//!   128 MiB rather than librdkafka's 1 GiB, so a large row's fragments wait for
//!   acknowledgements instead of piling up): when it is full, [`Publisher::send`] waits for
//!   outcomes. Deltas are encoded into one reused buffer
//!   that librdkafka copies.
//! - *Any row fits.* A delta whose encoding exceeds `--fragment-bytes` goes out as
//!   fragments ([`crate::contract::fragment`]): consecutive records in the delta's partition
//!   ([`partition_of`]), each a slice of the encoding written straight from the delta into
//!   the reused buffer, so no second whole copy of a large value is made. They
//!   count as records of the transaction like any other: the flush position passes the
//!   transaction only once Kafka acknowledged every fragment.
//! - *A refusal says what was refused.* The error names the table, the transaction's commit
//!   position and the partition, and for a record too large, the settings involved.
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
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::statistics::Statistics;
use rdkafka::util::Timeout;
use tokio::sync::Notify;

use super::error::CaptureError;
use super::flush::{FlushLsnTracker, Lsn, TxHandle};
use crate::config::KafkaSettings;
use crate::contract::fragment::{
    encode_bounded, encode_window, fragment_count, fragment_key, FragmentHeader, DEFAULT_FRAGMENT_BYTES, FRAGMENT_HEADER,
};
use crate::contract::{delta_kafka_key, Delta, DeltaOp, TOMBSTONE_DELTA_HEADER};
use crate::kafka::{self, ClientRole, MetricsContext};

/// How long [`Publisher::send`] waits for outcomes at most before trying a full queue again.
const QUEUE_FULL_WAIT: Duration = Duration::from_millis(100);

/// Outcomes reported by the delivery callback and not taken yet.
#[derive(Default)]
struct Outcomes {
    /// Acknowledged records, consecutive ones of one transaction counted together.
    acknowledged: Vec<(TxHandle, u64)>,
    refused: Vec<Refusal>,
}

/// A record Kafka refused: its transaction, the error, the table (from the record's key)
/// and the partition.
struct Refusal {
    tx: TxHandle,
    error: KafkaError,
    table: String,
    partition: i32,
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
                Some(error) => outcomes.refused.push(Refusal {
                    tx,
                    error,
                    table: table_of_key(message.key().unwrap_or_default()),
                    partition: message.partition(),
                }),
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
    /// Largest encoding sent as one record; larger deltas go out as fragments.
    fragment_bytes: usize,
    fragments_sent: metrics::Counter,
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
            fragment_bytes: DEFAULT_FRAGMENT_BYTES,
            fragments_sent: metrics::counter!("pgfanout_capture_fragments_total"),
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

    /// Sends deltas whose encoding exceeds `bytes` as fragments of at most `bytes` each.
    pub fn set_fragment_bytes(&mut self, bytes: usize) {
        self.fragment_bytes = bytes.max(1);
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
        for r in self.taken.refused.drain(..) {
            // A delta Kafka refused after all retries cannot be skipped: stop, and let the
            // next session read it again from the slot.
            match self.tracker.position(r.tx) {
                Some(lsn) => {
                    refused.get_or_insert_with(|| refusal(r.error, &r.table, lsn, r.partition));
                }
                None => tracing::debug!(error = %r.error, "a record of an earlier session was refused"),
            }
        }
        self.in_flight_gauge.set(self.tracker.in_flight() as f64);
        match refused {
            Some(e) => Err(e),
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
    /// (same key, no value), so a compacted deltas topic eventually forgets deleted rows. A
    /// delta too large for one record goes out as fragments.
    pub async fn send(&mut self, delta: &Delta, partition: Option<i32>, tx: TxHandle) -> Result<(), CaptureError> {
        self.tracker.note_position(tx, delta.commit_lsn as Lsn);
        let mut payload = std::mem::take(&mut self.payload);
        let len = encode_bounded(delta, self.fragment_bytes, &mut payload);
        let key = delta_kafka_key(&delta.table, &delta.key);
        let partition = partition.unwrap_or_else(|| partition_of(&key, self.partitions));
        let mut result = if len > self.fragment_bytes {
            self.send_fragments(delta, &key, len, partition, tx, &mut payload).await
        } else {
            self.send_record(&key, Some(&payload), None, partition, tx).await
        };
        if result.is_ok() && delta.op == DeltaOp::Delete {
            // The Kafka tombstone carries the delete in a header: compaction may remove the
            // delete delta (same key) before a lagging device reads it.
            let header = (TOMBSTONE_DELTA_HEADER, &payload[..]);
            result = self.send_record(&key, None, Some(header), partition, tx).await;
        }
        if payload.capacity() > 4 * 1024 * 1024 {
            payload = Vec::with_capacity(1024); // a large delta's buffer is not kept
        }
        self.payload = payload;
        match result {
            Err(CaptureError::Kafka(e)) if !kafka::is_fatal(&e) => {
                return Err(refusal(e, &delta.table, delta.commit_lsn as Lsn, partition));
            }
            r => r?,
        }
        self.changes.count(delta.op);
        Ok(())
    }

    /// Sends `delta`, whose encoding is `len` bytes, as consecutive fragments to its
    /// partition, each with a key of its own ([`fragment_key`]); each is encoded into
    /// `buffer` just before it is handed on.
    async fn send_fragments(
        &mut self,
        delta: &Delta,
        key: &[u8],
        len: usize,
        partition: i32,
        tx: TxHandle,
        buffer: &mut Vec<u8>,
    ) -> Result<(), CaptureError> {
        let size = self.fragment_bytes;
        let count = fragment_count(len, size);
        let mut header = FragmentHeader {
            commit_lsn: delta.commit_lsn,
            seq: delta.seq,
            index: 0,
            count: u32::try_from(count).unwrap_or(u32::MAX),
            total_len: len as u64,
        };
        for i in 0..count {
            header.index = u32::try_from(i).unwrap_or(u32::MAX);
            encode_window(delta, i * size, (i + 1) * size, buffer);
            let encoded = header.encode();
            let key = fragment_key(key, &header);
            self.send_record(&key, Some(buffer), Some((FRAGMENT_HEADER, &encoded)), partition, tx).await?;
            self.fragments_sent.increment(1);
        }
        Ok(())
    }

    /// Enqueues one record. When the producer's queue is full, takes outcomes first (waiting
    /// for them if none are there): that is the back-pressure that bounds memory.
    async fn send_record(
        &mut self,
        key: &[u8],
        payload: Option<&[u8]>,
        header: Option<(&str, &[u8])>,
        partition: i32,
        tx: TxHandle,
    ) -> Result<(), CaptureError> {
        loop {
            let mut record: BaseRecord<'_, [u8], [u8], usize> =
                BaseRecord::with_opaque_to(&self.topic, tx.to_opaque()).key(key).partition(partition);
            if let Some(p) = payload {
                record = record.payload(p);
            }
            if let Some((name, value)) = header {
                record = record.headers(OwnedHeaders::new().insert(Header { key: name, value: Some(value) }));
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

/// The partition of a record keyed `key`: the CRC-32 of the key modulo the partition count,
/// which is what librdkafka's default partitioner (`consistent_random`) picks for a
/// non-empty key, so rows stay in the partitions they always had. Capture names it on every
/// record because a delta's fragments have keys of their own and must still land in the
/// delta's partition, whatever `partitioner` a user sets.
pub fn partition_of(key: &[u8], partitions: i32) -> i32 {
    let n = u32::try_from(partitions.max(1)).unwrap_or(1);
    i32::try_from(crc32fast::hash(key) % n).unwrap_or(0)
}

/// The error for a record Kafka refused: which table, transaction and partition, and for
/// a record too large, the settings involved. A fatal error stays [`CaptureError::Kafka`]:
/// the producer is replaced and the session starts over.
fn refusal(error: KafkaError, table: &str, lsn: Lsn, partition: i32) -> CaptureError {
    if kafka::is_fatal(&error) {
        return CaptureError::Kafka(error);
    }
    let advice = match error.rdkafka_error_code() {
        Some(RDKafkaErrorCode::MessageSizeTooLarge) => {
            "; the record is above the topic's max.message.bytes or the producer's message.max.bytes: \
             lower --fragment-bytes below both (with room for the key and headers), or raise them"
        }
        _ => "",
    };
    let table = if table.is_empty() { "(watermark)" } else { table };
    let position = super::replication::format_lsn(lsn);
    let what = format!("{table} (transaction at {position}, partition {partition}): {error}{advice}");
    CaptureError::Refused { what: what.into(), error }
}

/// The table a delta's Kafka key names (the key's text up to the first separator).
fn table_of_key(key: &[u8]) -> String {
    let end = key.iter().position(|b| *b == 0x1f).unwrap_or(key.len());
    String::from_utf8_lossy(key.get(..end).unwrap_or_default()).into_owned()
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
        crate::contract::codec::encode_delta_into(&moved, &mut header);
        let key = delta_kafka_key(&update.table, old_key);
        let partition = partition_of(&key, self.partitions);
        self.send_record(&key, None, Some((TOMBSTONE_DELTA_HEADER, &header)), partition, tx).await
    }
}

#[cfg(test)]
#[path = "publisher_tests.rs"]
mod tests;

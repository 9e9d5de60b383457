//! Kafka client set-up: the one place that turns [`KafkaSettings`] into an rdkafka
//! `ClientConfig`, topic creation, batch polling and dead-lettering.
//!
//! Consumers are `BaseConsumer`s polled on blocking threads (`spawn_blocking` or a
//! dedicated thread), never rdkafka's `StreamConsumer`: it has open stall reports, and a
//! plain poll loop makes the moment an offset is stored explicit. Consumers are closed
//! explicitly ([`close_consumer`]) off the async runtime, because dropping one can block
//! for up to `session.timeout.ms`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::{ClientConfig, FromClientConfigAndContext};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{DeliveryResult, FutureProducer, FutureRecord, ProducerContext};
use rdkafka::statistics::Statistics;
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};

use crate::config::KafkaSettings;

/// What a client is for; each role gets the defaults it needs.
#[derive(Debug, Clone)]
pub enum ClientRole<'a> {
    /// Idempotent producer: `acks=all`, ordered retries, lz4 batches.
    Producer,
    /// Producer of reports that the next one supersedes (a device's acknowledgements), as
    /// [`ClientRole::Producer`] but not idempotent: a lost, repeated or reordered report
    /// changes nothing, and each idempotent producer holds a producer id and sequence state
    /// on every partition leader it writes to — one per device, for a whole fleet.
    ReportProducer,
    /// Group consumer whose offsets are stored by the application after the downstream
    /// acknowledged (`enable.auto.offset.store=false`), then committed in the background.
    Consumer {
        group_id: &'a str,
    },
    /// Consumer whose positions live outside Kafka (a device store); it never commits.
    UncommittedConsumer {
        group_id: &'a str,
    },
    Admin,
}

/// Builds the rdkafka configuration for a role. User properties override the defaults.
pub fn client_config(settings: &KafkaSettings, role: ClientRole<'_>) -> ClientConfig {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", &settings.brokers);
    cfg.set("client.id", "pgfanout");
    match role {
        ClientRole::Producer | ClientRole::ReportProducer => {
            let idempotent = matches!(role, ClientRole::Producer);
            cfg.set("enable.idempotence", idempotent.to_string())
                .set("acks", "all")
                .set("linger.ms", "5")
                .set("compression.type", "lz4")
                // At most 128 MiB waiting in librdkafka (its default is 1 GiB): a large row's
                // fragments are held back until earlier ones are acknowledged. Less costs
                // large rows throughput when one request is in flight (BENCHMARKS.md).
                .set("queue.buffering.max.kbytes", "131072")
                // A record not acknowledged in 30 s fails back to the caller, which retries
                // it (executor) or restarts from its last safe position (capture), rather
                // than waiting on librdkafka's own 5-minute default.
                .set("message.timeout.ms", "30000");
        }
        ClientRole::Consumer { group_id } | ClientRole::UncommittedConsumer { group_id } => {
            let commits = matches!(role, ClientRole::Consumer { .. });
            cfg.set("group.id", group_id)
                .set("enable.auto.commit", if commits { "true" } else { "false" })
                .set("enable.auto.offset.store", "false")
                .set("auto.offset.reset", "earliest");
            if commits {
                cfg.set("partition.assignment.strategy", "cooperative-sticky");
            } else {
                // A device reads every partition: librdkafka's default prefetch (64 MB of
                // records, several times that in memory) would be most of its memory. 2 MB
                // keep it busy as long as a full queue pauses fetching for a few ms, not
                // for librdkafka's default second (which held a replay to 170k records/s
                // however fast the device applied).
                cfg.set("queued.max.messages.kbytes", "2048").set("fetch.queue.backoff.ms", "5");
            }
        }
        ClientRole::Admin => {}
    }
    let is_consumer = matches!(role, ClientRole::Consumer { .. } | ClientRole::UncommittedConsumer { .. });
    for (k, v) in &settings.properties.0 {
        if !is_consumer && is_consumer_only_property(k) {
            continue;
        }
        if is_consumer && is_producer_only_property(k) {
            continue;
        }
        cfg.set(k, v);
    }
    cfg
}

fn is_consumer_only_property(key: &str) -> bool {
    key.starts_with("fetch.")
        || key.starts_with("session.")
        || key.starts_with("heartbeat.")
        || key.starts_with("group.")
        || key.starts_with("auto.offset")
        || key.starts_with("max.poll")
        || key == "isolation.level"
        || key == "partition.assignment.strategy"
}

fn is_producer_only_property(key: &str) -> bool {
    key.starts_with("linger.")
        || key.starts_with("batch.")
        || key.starts_with("queue.buffering")
        || key == "acks"
        || key == "compression.type"
        || key == "enable.idempotence"
        || key == "message.timeout.ms"
        || key.starts_with("max.in.flight")
}

/// Client context of the long-running components: logs partition assignments and
/// revocations, and turns librdkafka's statistics (every [`STATISTICS_INTERVAL_MS`]) into
/// the process's `pgfanout_<component>_kafka_*` metrics, summed over its clients (the
/// counters include clients that are gone).
pub struct MetricsContext {
    component: &'static str,
    labels: Vec<metrics::Label>,
    /// librdkafka's name of the client, once its first statistics arrived.
    client: std::sync::Mutex<Option<String>>,
}

/// How often librdkafka reports statistics to [`MetricsContext`] clients.
pub const STATISTICS_INTERVAL_MS: u32 = 5000;

/// The figures of one client, kept so that the process-wide metrics add up its clients.
#[derive(Default, Clone, Copy)]
struct ClientFigures {
    queued: i64,
    rtt_seconds: f64,
    errors: u64,
    /// Bytes a consumer received from the brokers (fetch responses above all).
    consumed_bytes: u64,
}

impl ClientFigures {
    fn add(self, other: ClientFigures) -> ClientFigures {
        ClientFigures {
            queued: self.queued + other.queued,
            rtt_seconds: self.rtt_seconds.max(other.rtt_seconds),
            errors: self.errors + other.errors,
            consumed_bytes: self.consumed_bytes + other.consumed_bytes,
        }
    }
}

/// The live clients' latest figures, and the counters of those that are gone.
static CLIENT_FIGURES: std::sync::Mutex<(Vec<(String, ClientFigures)>, ClientFigures)> =
    std::sync::Mutex::new((Vec::new(), ClientFigures { queued: 0, rtt_seconds: 0.0, errors: 0, consumed_bytes: 0 }));

impl MetricsContext {
    /// `device` labels the metrics of a device process.
    pub fn new(component: &'static str, device: Option<&str>) -> MetricsContext {
        let labels = device.map(|d| vec![metrics::Label::new("device", d.to_string())]).unwrap_or_default();
        MetricsContext { component, labels, client: std::sync::Mutex::new(None) }
    }

    /// Creates a client of `role` with this context and statistics enabled.
    pub fn create<T: FromClientConfigAndContext<MetricsContext>>(
        self,
        settings: &KafkaSettings,
        role: ClientRole<'_>,
    ) -> Result<T, KafkaError> {
        observed_config(settings, role).create_with_context(self)
    }
}

/// [`client_config`] with librdkafka's statistics enabled (every [`STATISTICS_INTERVAL_MS`]
/// unless the user's properties say otherwise), for a client whose context hands them to
/// an [`MetricsContext`].
pub fn observed_config(settings: &KafkaSettings, role: ClientRole<'_>) -> ClientConfig {
    let mut cfg = client_config(settings, role);
    if cfg.get("statistics.interval.ms").is_none() {
        cfg.set("statistics.interval.ms", STATISTICS_INTERVAL_MS.to_string());
    }
    cfg
}

impl ClientContext for MetricsContext {
    fn stats(&self, statistics: Statistics) {
        let mut figures = ClientFigures { queued: statistics.msg_cnt as i64, ..ClientFigures::default() };
        for topic in statistics.topics.values() {
            figures.queued += topic.partitions.values().map(|p| p.fetchq_cnt.max(0)).sum::<i64>();
        }
        let consumer = statistics.client_type == "consumer";
        for broker in statistics.brokers.values() {
            figures.errors += broker.txerrs + broker.rxerrs + broker.req_timeouts;
            if consumer {
                figures.consumed_bytes += broker.rxbytes;
            }
            if let Some(rtt) = &broker.rtt {
                figures.rtt_seconds = figures.rtt_seconds.max(rtt.avg as f64 / 1e6);
            }
        }
        *self.client.lock().unwrap_or_else(|e| e.into_inner()) = Some(statistics.name.clone());
        let total = {
            let mut all = CLIENT_FIGURES.lock().unwrap_or_else(|e| e.into_inner());
            let (live, gone) = &mut *all;
            match live.iter_mut().find(|(name, _)| *name == statistics.name) {
                Some((_, f)) => *f = figures,
                None => live.push((statistics.name, figures)),
            }
            live.iter().fold(*gone, |t, (_, f)| t.add(*f))
        };
        let c = self.component;
        metrics::gauge!(format!("pgfanout_{c}_kafka_queue_messages"), self.labels.clone()).set(total.queued as f64);
        metrics::gauge!(format!("pgfanout_{c}_kafka_broker_rtt_seconds"), self.labels.clone()).set(total.rtt_seconds);
        metrics::counter!(format!("pgfanout_{c}_kafka_errors_total"), self.labels.clone()).absolute(total.errors);
        metrics::counter!(format!("pgfanout_{c}_kafka_consumed_bytes_total"), self.labels.clone()).absolute(total.consumed_bytes);
    }
}

/// A client that is gone no longer counts in the process's gauges; its counts stay in the
/// counters.
impl Drop for MetricsContext {
    fn drop(&mut self) {
        if let Some(name) = self.client.get_mut().unwrap_or_else(|e| e.into_inner()).take() {
            let mut all = CLIENT_FIGURES.lock().unwrap_or_else(|e| e.into_inner());
            let (live, gone) = &mut *all;
            if let Some(i) = live.iter().position(|(n, _)| *n == name) {
                let (_, f) = live.swap_remove(i);
                gone.errors += f.errors;
                gone.consumed_bytes += f.consumed_bytes;
            }
        }
    }
}

/// Acknowledgements are fire-and-forget for the one producer that uses this (device acks:
/// the next one supersedes a lost one).
impl ProducerContext for MetricsContext {
    type DeliveryOpaque = ();
    fn delivery(&self, _result: &DeliveryResult<'_>, _opaque: ()) {}
}

impl ConsumerContext for MetricsContext {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                tracing::info!(?partitions, "partitions assigned");
            }
            Rebalance::Revoke(tpl) => {
                let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                tracing::info!(?partitions, "partitions revoked");
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }
}

/// A topic the pipeline needs, with its configuration.
pub struct TopicSpec<'a> {
    pub name: &'a str,
    pub partitions: i32,
    pub config: Vec<(&'a str, &'a str)>,
}

/// Creates the topics that do not exist yet. Existing topics are left as they are.
pub async fn ensure_topics(settings: &KafkaSettings, topics: &[TopicSpec<'_>]) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = client_config(settings, ClientRole::Admin).create()?;
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| {
            let mut nt = NewTopic::new(t.name, t.partitions, TopicReplication::Fixed(settings.replication_factor));
            for (k, v) in &t.config {
                nt = nt.set(k, v);
            }
            nt
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in admin.create_topics(&new_topics, &opts).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                return Err(KafkaError::AdminOp(code)).inspect_err(|_| {
                    tracing::error!(topic = %name, error = %code, "cannot create topic");
                })
            }
        }
    }
    Ok(())
}

/// The pipeline's own topics. The deltas topic is compacted: its records are keyed by row
/// and every delete is followed by a tombstone, so it keeps the newest change of every
/// live row for ever — what `pgfanout rebuild` needs — while its size follows the tables'.
/// The fleet topic is compacted too: the newest record of every device.
pub async fn ensure_pipeline_topics(settings: &KafkaSettings) -> Result<(), KafkaError> {
    let topics = settings.topics();
    let specs: Vec<TopicSpec<'_>> = topics
        .all()
        .into_iter()
        .map(|name| {
            let compacted = name == topics.deltas || name == topics.fleet;
            let config = if compacted { vec![("cleanup.policy", "compact")] } else { vec![] };
            // The registry is small and read whole by every starting device: one partition.
            let partitions = if name == topics.fleet { 1 } else { settings.partitions };
            TopicSpec { name, partitions, config }
        })
        .collect();
    ensure_topics(settings, &specs).await
}

/// Polls up to `max` messages: waits up to `first_wait` for the first one, then takes
/// what is already fetched (bounded by `linger`). Runs on a blocking thread.
///
/// A message handed out by `poll` has moved the consumer's position past it, so it must
/// never be dropped: an error after some messages ends the batch early and is returned
/// only when nothing was collected.
pub fn poll_batch<C: rdkafka::consumer::ConsumerContext>(
    consumer: &BaseConsumer<C>,
    max: usize,
    first_wait: Duration,
    linger: Duration,
) -> Result<Vec<OwnedMessage>, KafkaError> {
    let mut batch = Vec::new();
    match consumer.poll(whole_ms(first_wait)) {
        None => return Ok(batch),
        Some(m) => batch.push(m?.detach()),
    }
    let deadline = Instant::now() + linger;
    while batch.len() < max {
        let left = deadline.saturating_duration_since(Instant::now());
        match consumer.poll(whole_ms(left)) {
            None => break,
            Some(Ok(m)) => batch.push(m.detach()),
            Some(Err(e)) => {
                tracing::debug!(error = %e, "consumer error; ending the batch early");
                break;
            }
        }
        if left.is_zero() {
            break;
        }
    }
    Ok(batch)
}

/// The offsets `consumer`'s group has committed, for each partition of `topic` (of
/// `partitions`) that has one. Blocking.
pub fn committed_offsets<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    partitions: i32,
    timeout: Duration,
) -> Result<HashMap<i32, i64>, KafkaError> {
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let committed = consumer.committed_offsets(tpl, timeout)?;
    Ok(committed
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some((e.partition(), o)),
            _ => None,
        })
        .collect())
}

/// `d` rounded up to whole milliseconds. rdkafka hands librdkafka whole milliseconds and,
/// while a fraction of the timeout is left, polls again without blocking: a poll for 0.7 ms
/// spins for 0.7 ms. Whole milliseconds block instead.
fn whole_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_micros().div_ceil(1000) as u64)
}

/// Number of partitions of `topic` (0 when it does not exist). Blocking.
pub fn partition_count<C: ClientContext>(client: &rdkafka::client::Client<C>, topic: &str) -> Result<usize, KafkaError> {
    let md = client.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    Ok(md.topics().iter().find(|t| t.name() == topic).map_or(0, |t| t.partitions().len()))
}

/// A consumer outside any group's assignment (`assign`, never `subscribe`), for reading a
/// topic from chosen offsets.
fn reader(settings: &KafkaSettings) -> Result<BaseConsumer, KafkaError> {
    let group = format!("pgfanout-reader-{}", uuid::Uuid::new_v4());
    client_config(settings, ClientRole::UncommittedConsumer { group_id: &group }).create()
}

/// A reader assigned to every partition of `topic`, each at the offset `start` chooses
/// for it; `None` when the topic does not exist. Blocking.
pub fn reader_at(
    settings: &KafkaSettings,
    topic: &str,
    mut start: impl FnMut(&BaseConsumer, i32) -> Result<Offset, KafkaError>,
) -> Result<Option<BaseConsumer>, KafkaError> {
    let consumer = reader(settings)?;
    let partitions = partition_count(consumer.client(), topic)?;
    if partitions == 0 {
        return Ok(None);
    }
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions as i32 {
        let offset = start(&consumer, p)?;
        tpl.add_partition_offset(topic, p, offset)?;
    }
    consumer.assign(&tpl)?;
    Ok(Some(consumer))
}

/// The first offset of `partition` with a record at or after `since_ms` (Unix
/// milliseconds); `None` when there is none that recent. Blocking.
pub fn offset_for_time<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    partition: i32,
    since_ms: i64,
) -> Result<Option<i64>, KafkaError> {
    let mut query = TopicPartitionList::new();
    query.add_partition_offset(topic, partition, Offset::Offset(since_ms))?;
    let found = consumer.offsets_for_times(query, Duration::from_secs(10))?;
    Ok(match found.elements().first().map(|e| e.offset()) {
        Some(Offset::Offset(o)) if o >= 0 => Some(o),
        _ => None,
    })
}

/// Reads every partition of `topic` from the offsets `start` chooses up to its end as of
/// now, handing each record to `each`; returns those ends per partition, `None` when the
/// topic does not exist. Blocking; gives up after `timeout` without a record while records
/// are still due.
pub fn read_to_end(
    settings: &KafkaSettings,
    topic: &str,
    mut start: impl FnMut(&BaseConsumer, i32) -> Result<Offset, KafkaError>,
    timeout: Duration,
    mut each: impl FnMut(&BorrowedMessage<'_>),
) -> Result<Option<HashMap<i32, i64>>, KafkaError> {
    // Per partition, the first offset still to read and the end to read to.
    let mut due: HashMap<i32, (i64, i64)> = HashMap::new();
    let consumer = reader_at(settings, topic, |c, p| {
        let offset = start(c, p)?;
        let (low, high) = c.fetch_watermarks(topic, p, Duration::from_secs(10))?;
        let first = match offset {
            Offset::Offset(o) => o.max(low),
            Offset::End => high,
            _ => low,
        };
        due.insert(p, (first, high));
        Ok(offset)
    })?;
    let Some(consumer) = consumer else { return Ok(None) };
    let ends = due.iter().map(|(p, (_, high))| (*p, *high)).collect();
    due.retain(|_, (first, high)| first < high);
    while !due.is_empty() {
        let m = consumer.poll(timeout).ok_or(KafkaError::MessageConsumption(RDKafkaErrorCode::RequestTimedOut))??;
        each(&m);
        if due.get(&m.partition()).is_some_and(|(_, high)| m.offset() + 1 >= *high) {
            due.remove(&m.partition());
        }
    }
    consumer.unsubscribe();
    Ok(Some(ends))
}

/// Sends an undecodable or unusable record to the dead-letter topic, with the reason and
/// its origin in headers, and waits for Kafka's acknowledgement.
pub async fn dead_letter<C: ClientContext + 'static>(
    producer: &FutureProducer<C>,
    dlq_topic: &str,
    source: &OwnedMessage,
    component: &str,
    reason: &str,
) -> Result<(), KafkaError> {
    let partition = source.partition().to_string();
    let offset = source.offset().to_string();
    let headers = OwnedHeaders::new()
        .insert(Header { key: "pgfanout.error", value: Some(reason) })
        .insert(Header { key: "pgfanout.component", value: Some(component) })
        .insert(Header { key: "pgfanout.source.topic", value: Some(source.topic()) })
        .insert(Header { key: "pgfanout.source.partition", value: Some(&partition) })
        .insert(Header { key: "pgfanout.source.offset", value: Some(&offset) });
    let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(dlq_topic).headers(headers);
    if let Some(k) = source.key() {
        record = record.key(k);
    }
    if let Some(p) = source.payload() {
        record = record.payload(p);
    }
    producer.send(record, Timeout::After(Duration::from_secs(30))).await.map(|_| ()).map_err(|(e, _)| e)?;
    metrics::counter!(format!("pgfanout_{component}_dead_letters_total")).increment(1);
    Ok(())
}

/// Closes a consumer (leaving its group) on the current, blocking thread.
pub fn close_consumer<C: rdkafka::consumer::ConsumerContext>(consumer: BaseConsumer<C>) {
    consumer.unsubscribe();
    drop(consumer);
}

/// A partition's low and high watermarks as the consumer last learnt them from a fetch
/// response, without asking the broker; `None` before the first response.
pub fn cached_watermarks<C: ConsumerContext>(consumer: &BaseConsumer<C>, topic: &str, partition: i32) -> Option<(i64, i64)> {
    let topic = std::ffi::CString::new(topic).ok()?;
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the client pointer is valid while `consumer` lives; librdkafka only reads its
    // cached offsets into the two out-parameters, under its own lock.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    (err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0).then_some((low, high))
}

/// True when the client failed for good: a producer that reported this can send nothing
/// more (an idempotent producer whose sequence the broker refused); only a new producer can
/// go on.
pub fn is_fatal(err: &KafkaError) -> bool {
    err.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal)
}

/// True for errors worth retrying: the broker or network is away, not the input wrong.
pub fn is_transient(err: &KafkaError) -> bool {
    match err.rdkafka_error_code() {
        Some(code) => !matches!(
            code,
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessage
                | RDKafkaErrorCode::UnknownTopicOrPartition
                | RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::ClusterAuthorizationFailed
                | RDKafkaErrorCode::InvalidConfig
                | RDKafkaErrorCode::Fatal
        ),
        None => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Properties;

    fn settings(props: &[(&str, &str)]) -> KafkaSettings {
        KafkaSettings {
            brokers: "b:1".into(),
            topic_prefix: "p.".into(),
            properties: Properties(props.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
            partitions: 3,
            replication_factor: 1,
        }
    }

    #[test]
    fn poll_timeouts_are_whole_milliseconds() {
        assert_eq!(whole_ms(Duration::from_micros(700)), Duration::from_millis(1));
        assert_eq!(whole_ms(Duration::from_micros(2001)), Duration::from_millis(3));
        assert_eq!(whole_ms(Duration::from_millis(200)), Duration::from_millis(200));
        assert_eq!(whole_ms(Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn roles_get_their_defaults_and_user_overrides() {
        let s = settings(&[("fetch.wait.max.ms", "20"), ("linger.ms", "1")]);
        let p = client_config(&s, ClientRole::Producer);
        assert_eq!(p.get("enable.idempotence"), Some("true"));
        assert_eq!(p.get("linger.ms"), Some("1"));
        assert_eq!(p.get("fetch.wait.max.ms"), None);
        let r = client_config(&s, ClientRole::ReportProducer);
        assert_eq!((r.get("enable.idempotence"), r.get("acks")), (Some("false"), Some("all")));
        let c = client_config(&s, ClientRole::Consumer { group_id: "g" });
        assert_eq!(c.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(c.get("fetch.wait.max.ms"), Some("20"));
        assert_eq!(c.get("linger.ms"), None);
        assert_eq!(s.topics().deltas, "p.deltas");
    }
}

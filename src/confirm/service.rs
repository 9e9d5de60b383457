//! The service's loop and everything it owns: PostgreSQL (registry, checkpoint, lock), one
//! consumer assigned to the results and device-acks partitions, the producer of
//! confirmations and the confirmations on their way to Kafka.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio_postgres::Client;

use super::error::ConfirmError;
use super::positions::{self, Reading, Window};
use super::settings::{ConfirmSettings, REFRESH};
use super::startup::{assign, read_back};
use super::tracker::{ActiveDevice, Due, Finalized, ResultPosition, Tracker};
use crate::config::{KafkaSettings, PostgresSettings, Topics};
use crate::contract::codec::{decode_device_ack, decode_result, encode_confirmation};
use crate::contract::{now_micros, ConfirmationStatus, ResultStatus};
use crate::fleet::signature::DeviceKey;
use crate::fleet::{registry, topic as fleet_topic};
use crate::kafka::{self, ClientRole, MetricsContext};
use crate::pg;
use crate::shutdown::Shutdown;

/// A confirmation to (re)send.
struct Outgoing {
    id: String,
    payload: Vec<u8>,
    /// Set on a final confirmation: its result.
    position: Option<ResultPosition>,
}

type Sent = (Outgoing, Result<(i32, i64), rdkafka::error::KafkaError>);

pub(super) struct Service {
    topics: Topics,
    pg: Client,
    consumer: Arc<BaseConsumer<MetricsContext>>,
    producer: FutureProducer<MetricsContext>,
    tracker: Tracker,
    window: Window,
    finalized: Finalized,
    dedupe_window_micros: i64,
    keys: HashMap<String, DeviceKey>,
    retired: HashSet<String>,
    /// Devices whose gauges this service has exported.
    exported: HashSet<String>,
    acks_next: HashMap<i32, i64>,
    in_flight: FuturesUnordered<BoxFuture<'static, Sent>>,
    unsent: VecDeque<Outgoing>,
    refused_logged: HashMap<String, Instant>,
    refreshed: Instant,
    shutdown: Shutdown,
}

impl Service {
    /// Takes the lock, republishes the registry, reads back the confirmations already
    /// published and assigns the consumer at the last checkpoint.
    pub(super) async fn start(
        kafka_settings: &KafkaSettings,
        postgres: &PostgresSettings,
        settings: &ConfirmSettings,
        shutdown: Shutdown,
    ) -> Result<Service, ConfirmError> {
        let pg = pg::connect(&postgres.conninfo).await?;
        registry::ensure(&pg).await?;
        take_lock(&pg, &shutdown).await?;
        let devices = registry::list(&pg).await?;
        fleet_topic::publish(kafka_settings, &devices).await?;
        let checkpoint = positions::load(&pg).await?;
        let dedupe_window_micros = settings.dedupe_window_secs as i64 * 1_000_000;
        let (finalized, confirmations_end) = {
            let (kafka_settings, checkpoint) = (kafka_settings.clone(), checkpoint.clone());
            tokio::task::spawn_blocking(move || read_back(&kafka_settings, &checkpoint, dedupe_window_micros)).await??
        };
        let topics = kafka_settings.topics();
        let (consumer, results_next, acks_next) = {
            let (kafka_settings, checkpoint) = (kafka_settings.clone(), checkpoint.clone());
            tokio::task::spawn_blocking(move || assign(&kafka_settings, &checkpoint)).await??
        };
        let producer = MetricsContext::new("confirm", None).create(kafka_settings, ClientRole::Producer)?;
        for status in ["applied", "pending"] {
            metrics::counter!("pgfanout_confirm_confirmations_total", "status" => status).increment(0);
        }
        for reason in ["unregistered", "signature", "undecodable"] {
            metrics::counter!("pgfanout_confirm_acks_refused_total", "reason" => reason).increment(0);
        }
        let mut service = Service {
            topics,
            pg,
            consumer: Arc::new(consumer),
            producer,
            tracker: super::tracker::Tracker::new(settings.deadline_secs as i64 * 1_000_000),
            window: Window::new(results_next, confirmations_end),
            finalized,
            dedupe_window_micros,
            keys: HashMap::new(),
            retired: HashSet::new(),
            exported: HashSet::new(),
            acks_next,
            in_flight: FuturesUnordered::new(),
            unsent: VecDeque::new(),
            refused_logged: HashMap::new(),
            refreshed: Instant::now(),
            shutdown,
        };
        service.set_fleet(devices);
        // At once: a first start's positions (the topics' ends now) must hold for the next
        // start too, however soon this one stops.
        service.checkpoint().await?;
        tracing::info!(devices = service.keys.len(), already_confirmed = service.finalized.len(), "confirmation service started");
        Ok(service)
    }

    pub(super) async fn run(&mut self) -> Result<(), ConfirmError> {
        while !self.shutdown.is_triggered() {
            self.step().await?;
        }
        self.stop().await
    }

    async fn step(&mut self) -> Result<(), ConfirmError> {
        let consumer = Arc::clone(&self.consumer);
        let wait = if self.in_flight.is_empty() { Duration::from_millis(50) } else { Duration::from_millis(5) };
        let polled = tokio::task::spawn_blocking(move || kafka::poll_batch(&consumer, 10_000, wait, Duration::ZERO)).await?;
        let batch = polled.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "poll failed; retrying");
            Vec::new()
        });
        let now = now_micros();
        for m in &batch {
            if m.topic() == self.topics.results {
                self.on_result(m, now);
            } else {
                self.on_ack(m, now);
            }
        }
        for due in self.tracker.due(now) {
            self.queue(due);
        }
        self.send_queued();
        self.collect_deliveries();
        if self.refreshed.elapsed() >= REFRESH {
            self.refreshed = Instant::now();
            self.set_fleet(registry::list(&self.pg).await?);
            self.checkpoint().await?;
            self.finalized.prune(now - self.dedupe_window_micros);
        }
        Ok(())
    }

    fn on_result(&mut self, m: &OwnedMessage, now: i64) {
        let position = (m.partition(), m.offset());
        self.window.read(position);
        let Some(Ok(result)) = m.payload().map(decode_result) else {
            tracing::warn!(partition = position.0, offset = position.1, "undecodable result skipped");
            self.window.close(position);
            return;
        };
        // Only a committed instruction not confirmed yet, nor waiting already, waits.
        let id = &result.instruction_id;
        match (result.status, result.commit_lsn) {
            (ResultStatus::Committed, Some(lsn)) if !self.finalized.contains(id) && !self.tracker.is_waiting(id, lsn) => {
                self.tracker.add(id, lsn, result.executed_at, result.target.clone(), position, now)
            }
            _ => self.window.close(position),
        }
    }

    fn on_ack(&mut self, m: &OwnedMessage, now: i64) {
        self.acks_next.insert(m.partition(), m.offset() + 1);
        let Some(Ok(ack)) = m.payload().map(decode_device_ack) else {
            metrics::counter!("pgfanout_confirm_acks_refused_total", "reason" => "undecodable").increment(1);
            return;
        };
        let refused = match self.keys.get(&ack.device_id) {
            Some(key) if key.verifies(&ack) => None,
            Some(_) => Some("signature"),
            None if self.retired.contains(&ack.device_id) => return,
            None => Some("unregistered"),
        };
        match refused {
            None => self.tracker.ack(&ack.device_id, ack.applied_lsn, now),
            Some(reason) => {
                metrics::counter!("pgfanout_confirm_acks_refused_total", "reason" => reason).increment(1);
                let logged = self.refused_logged.get(&ack.device_id).is_some_and(|at| at.elapsed() < Duration::from_secs(10));
                if !logged {
                    tracing::warn!(claimed_device = %ack.device_id, reason, "acknowledgement refused: not counted");
                    self.refused_logged.insert(ack.device_id.clone(), Instant::now());
                }
            }
        }
    }

    fn set_fleet(&mut self, devices: Vec<registry::RegisteredDevice>) {
        self.keys.clear();
        self.retired.clear();
        let mut active = Vec::new();
        for d in devices {
            if d.active() {
                active.push(ActiveDevice {
                    id: d.id.clone(),
                    labels: d.labels,
                    watermark: d.watermark.unwrap_or(0),
                    last_seen: d.last_seen_at,
                });
                self.keys.insert(d.id, d.key);
            } else {
                if self.exported.remove(&d.id) {
                    // No reading any more: a retired device's gauges go blank (NaN), so
                    // that neither a dashboard nor an alert takes its last value as current.
                    set_device_gauges(&d.id, f64::NAN, f64::NAN, f64::NAN);
                }
                self.retired.insert(d.id);
            }
        }
        self.tracker.set_fleet(active);
    }

    fn queue(&mut self, due: Due) {
        let c = &due.confirmation;
        let status = match c.status {
            ConfirmationStatus::Applied => "applied",
            ConfirmationStatus::Pending => "pending",
        };
        metrics::counter!("pgfanout_confirm_confirmations_total", "status" => status).increment(1);
        if c.status == ConfirmationStatus::Applied {
            metrics::histogram!("pgfanout_confirm_latency_seconds").record((c.confirmed_at - c.committed_at).max(0) as f64 / 1e6);
            // Recorded now, not on delivery: the final is resent until delivered, and a
            // result read again meanwhile must not get another.
            self.finalized.insert(c.instruction_id.clone(), c.confirmed_at);
        }
        match encode_confirmation(c) {
            Ok(payload) => self.unsent.push_back(Outgoing { id: c.instruction_id.clone(), payload, position: due.position }),
            Err(e) => tracing::error!(error = %e, "confirmation not encodable"),
        }
    }

    fn send_queued(&mut self) {
        while let Some(out) = self.unsent.pop_front() {
            let record = FutureRecord::to(&self.topics.confirmations).key(out.id.as_bytes()).payload(&out.payload);
            match self.producer.send_result(record) {
                Ok(delivery) => self.in_flight.push(
                    async move {
                        let outcome = match delivery.await {
                            Ok(Ok(d)) => Ok((d.partition, d.offset)),
                            Ok(Err((e, _))) => Err(e),
                            Err(_) => Err(rdkafka::error::KafkaError::Canceled),
                        };
                        (out, outcome)
                    }
                    .boxed(),
                ),
                Err((e, _)) => {
                    tracing::debug!(error = %e, "confirmation not queued yet");
                    self.unsent.push_front(out);
                    return;
                }
            }
        }
    }

    /// Takes in the deliveries that completed, without waiting.
    fn collect_deliveries(&mut self) {
        while let Some(Some((out, outcome))) = self.in_flight.next().now_or_never() {
            self.delivered(out, outcome);
        }
    }

    /// A confirmation's delivery: acknowledged (its result needs nothing more once it was
    /// the final one), or failed and resent.
    fn delivered(&mut self, out: Outgoing, outcome: Result<(i32, i64), rdkafka::error::KafkaError>) {
        match outcome {
            Ok((partition, offset)) => {
                self.window.confirmed_at(partition, offset);
                if let Some(position) = out.position {
                    self.window.close(position);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, instruction = %out.id, "confirmation not acknowledged; resending");
                self.unsent.push_back(out);
            }
        }
    }

    async fn checkpoint(&mut self) -> Result<(), ConfirmError> {
        let checkpoint = self.window.checkpoint(self.acks_next.clone());
        let now = now_micros();
        let readings: Vec<Reading> = self
            .tracker
            .devices()
            .map(|(id, watermark, last_seen)| Reading {
                id: id.to_string(),
                watermark,
                last_seen,
                lag_seconds: self.tracker.lag_micros(id, now) as f64 / 1e6,
            })
            .collect();
        positions::save(&mut self.pg, &checkpoint, &readings).await?;
        tracing::debug!(
            waiting = self.tracker.waiting(),
            open = self.window.open_results(),
            fleet_watermark = ?self.tracker.fleet_watermark(),
            ?checkpoint,
            "checkpoint"
        );
        for r in &readings {
            let age = r.last_seen.map_or(f64::INFINITY, |s| (now - s).max(0) as f64 / 1e6);
            set_device_gauges(&r.id, r.watermark as f64, age, r.lag_seconds);
            if !self.exported.contains(&r.id) {
                self.exported.insert(r.id.clone());
            }
        }
        metrics::gauge!("pgfanout_confirm_waiting_instructions").set(self.tracker.waiting() as f64);
        metrics::gauge!("pgfanout_confirm_open_results").set(self.window.open_results() as f64);
        Ok(())
    }

    /// Waits (up to 10 s) for the confirmations on their way, then writes a last checkpoint.
    async fn stop(&mut self) -> Result<(), ConfirmError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !self.in_flight.is_empty() || !self.unsent.is_empty() {
            self.send_queued();
            match tokio::time::timeout_at(deadline, self.in_flight.next()).await {
                Ok(Some((out, outcome))) => self.delivered(out, outcome),
                Ok(None) => tokio::time::sleep(Duration::from_millis(10)).await,
                Err(_) => break,
            }
        }
        self.checkpoint().await?;
        let consumer = Arc::clone(&self.consumer);
        tokio::task::spawn_blocking(move || consumer.unsubscribe()).await?;
        tracing::info!("confirmation service stopped");
        Ok(())
    }
}

/// Waits for the advisory lock that makes this the only running service.
async fn take_lock(pg: &Client, shutdown: &Shutdown) -> Result<(), ConfirmError> {
    let mut warned = false;
    loop {
        let row = pg.query_one("SELECT pg_try_advisory_lock(hashtext('pgfanout.confirm'))", &[]).await?;
        if row.get::<_, bool>(0) {
            return Ok(());
        }
        if !warned {
            tracing::warn!("another confirmation service runs (it holds the lock); waiting for it to stop");
            warned = true;
        }
        if shutdown.is_triggered() {
            return Err(ConfirmError::Stopped);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn set_device_gauges(id: &str, watermark: f64, last_seen_age: f64, lag_seconds: f64) {
    metrics::gauge!("pgfanout_fleet_device_watermark_lsn", "device" => id.to_string()).set(watermark);
    metrics::gauge!("pgfanout_fleet_device_last_seen_age_seconds", "device" => id.to_string()).set(last_seen_age);
    metrics::gauge!("pgfanout_fleet_device_lag_seconds", "device" => id.to_string()).set(lag_seconds);
}

//! The executor: consumes instructions, applies each to PostgreSQL at most once, and
//! publishes exactly one result per instruction.
//!
//! Guarantees and why they hold:
//! - *At most once in PostgreSQL*: [`batch`] writes each outcome to
//!   `pgfanout.instruction_log` in the transaction that carries its effects, and skips ids
//!   already logged.
//! - *A result for every instruction*: the consumer offset of a record is stored only after
//!   its result (or, for an undecodable record, its dead letter) has been acknowledged by
//!   Kafka. A crash before that redelivers the record, and the redelivery re-publishes the
//!   stored result. While a batch's results are on their way, the next batches are applied
//!   (at most `MAX_BATCHES_IN_FLIGHT`); offsets are stored strictly in batch order, each
//!   batch's once its results are acknowledged (`Published::store_offsets_once_acknowledged`, the only
//!   place that stores executor offsets).
//! - *Correlation*: each instruction's rows are preceded in the WAL by
//!   `pg_logical_emit_message(true, 'pgfanout', instruction_id)`
//!   ([`crate::contract::CORRELATION_PREFIX`]), so capture tags the deltas.

pub mod admit;
pub mod batch;
pub mod catalog;
mod observe;
pub mod plan;

use std::collections::{HashMap, VecDeque};
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};
use tokio_postgres::Client;

use crate::backoff::Backoff;
use crate::config::{KafkaSettings, PostgresSettings, Topics};
use crate::contract::codec::{decode_instruction, encode_result, CodecError};
use crate::contract::{Instruction, InstructionResult};
use crate::error_kind::ErrorKind;
use crate::kafka::{self, ClientRole, MetricsContext};
use crate::pg;
use crate::pg::TableName;
use crate::shutdown::Shutdown;
use catalog::{AllowedTables, Catalog, Statements};
use observe::count_postgres_error;

#[derive(Debug, Clone, clap::Args)]
pub struct ExecutorSettings {
    /// Consumer group of the executors; several processes in it split the partitions.
    #[arg(long = "group", env = "PGFANOUT_EXECUTOR_GROUP", default_value = "pgfanout-executor")]
    pub group_id: String,
    /// Most instructions applied in one PostgreSQL transaction.
    #[arg(long = "batch-size", env = "PGFANOUT_EXECUTOR_BATCH_SIZE", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub batch_size: u32,
    /// Tables instructions may write (schema.table, comma separated); default: the
    /// publication's tables.
    #[arg(long = "allowed-tables", env = "PGFANOUT_ALLOWED_TABLES", value_delimiter = ',', value_parser = parse_table_name)]
    pub allowed_tables: Option<Vec<TableName>>,
    /// Longest wait (ms) for more instructions once a batch has one.
    #[arg(long = "linger-ms", env = "PGFANOUT_EXECUTOR_LINGER_MS", default_value_t = 1)]
    pub linger_ms: u64,
}

fn parse_table_name(s: &str) -> Result<TableName, String> {
    TableName::parse(s.trim()).ok_or_else(|| format!("{s:?} is not a table name (schema.table)"))
}

/// Why the executor stopped (or, for [`ErrorKind::Fatal`], started over with new
/// clients). Errors an instruction's content causes never get here: they are that
/// instruction's result.
#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("postgres: {0}{advice}", advice = postgres_advice(.0))]
    Postgres(#[from] tokio_postgres::Error),
    /// A task of the executor (a poll, a publication, the final commit) panicked or was
    /// cancelled.
    #[error("internal: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("internal: {0}")]
    EncodeResult(#[from] CodecError),
    /// The consumer is still borrowed by a poll when the executor stops.
    #[error("internal: consumer still shared")]
    ConsumerShared,
}

impl ExecutorError {
    /// [`ErrorKind::Fatal`] (librdkafka's producer failed for good) is the one [`run`]
    /// recovers from, with new clients; transient errors are retried where they happen,
    /// so one that gets here stops the executor like a definite one.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ExecutorError::Kafka(e) => ErrorKind::of_kafka(e),
            ExecutorError::Postgres(e) => ErrorKind::of_postgres(e),
            ExecutorError::Task(_) | ExecutorError::EncodeResult(_) | ExecutorError::ConsumerShared => ErrorKind::Definite,
        }
    }
}

/// What to look at for a PostgreSQL error that stopped the executor, by its cause. Errors
/// an instruction's content causes never get here: they are that instruction's result.
fn postgres_advice(e: &tokio_postgres::Error) -> String {
    let advice = match pg::sqlstate(e) {
        None => "is PostgreSQL reachable at the connection string's host and port?",
        Some(c) if c.starts_with("28") => "check the connection string's user and password, and pg_hba.conf",
        Some("3D000") => "the database does not exist: check the connection string",
        Some("42501") => "the role lacks a privilege: grant it on the allowed tables and on schema pgfanout",
        Some("42P01" | "42703" | "3F000") => "the executor's tables are missing or older than this version: run `pgfanout setup`",
        Some(c) => return format!(" (SQLSTATE {c})"),
    };
    format!(" ({advice})")
}

/// Runs the executor until `shutdown`. A producer that failed for good is replaced by
/// starting over with new clients: the instructions whose results were not acknowledged
/// are redelivered and answered from the log.
pub async fn run(
    kafka_settings: &KafkaSettings,
    pg_settings: &PostgresSettings,
    settings: &ExecutorSettings,
    shutdown: Shutdown,
) -> Result<(), ExecutorError> {
    loop {
        match run_clients(kafka_settings, pg_settings, settings, shutdown.clone()).await {
            Err(e) if e.kind() == ErrorKind::Fatal && !shutdown.is_triggered() => {
                tracing::warn!(error = %e, "the Kafka producer failed for good; starting over with new clients");
            }
            outcome => return outcome,
        }
    }
}

async fn run_clients(
    kafka_settings: &KafkaSettings,
    pg_settings: &PostgresSettings,
    settings: &ExecutorSettings,
    shutdown: Shutdown,
) -> Result<(), ExecutorError> {
    let mut executor = ExecutorLoop::start(kafka_settings, pg_settings, settings, shutdown).await?;
    while executor.step().await?.is_continue() {}
    executor.stop().await
}

/// The executor's loop and everything it owns: the consumer and the producer, the
/// PostgreSQL connection with its catalog and prepared statements, and the batches whose
/// results are on their way to Kafka (whose offsets it stores, in order, once acknowledged).
struct ExecutorLoop<'a> {
    pg_settings: &'a PostgresSettings,
    topics: Topics,
    consumer: Arc<BaseConsumer<MetricsContext>>,
    producer: FutureProducer<MetricsContext>,
    pg_conn: Option<Client>,
    catalog: Catalog,
    statements: Statements,
    max_batch: usize,
    linger: Duration,
    in_flight: VecDeque<Published>,
    shutdown: Shutdown,
}

impl<'a> ExecutorLoop<'a> {
    /// Creates the clients and subscribes to the instructions topic.
    async fn start(
        kafka_settings: &KafkaSettings,
        pg_settings: &'a PostgresSettings,
        settings: &ExecutorSettings,
        shutdown: Shutdown,
    ) -> Result<ExecutorLoop<'a>, ExecutorError> {
        let topics = kafka_settings.topics();
        let consumer: Arc<BaseConsumer<MetricsContext>> = Arc::new(
            MetricsContext::new("executor", None)
                .create(kafka_settings, ClientRole::Consumer { group_id: &settings.group_id })?,
        );
        consumer.subscribe(&[&topics.instructions])?;
        let producer: FutureProducer<MetricsContext> =
            MetricsContext::new("executor", None).create(kafka_settings, ClientRole::Producer)?;

        // Counters exist from the start, so that a dashboard shows 0 rather than nothing.
        for status in ["committed", "rejected", "failed"] {
            metrics::counter!("pgfanout_executor_instructions_total", "status" => status).increment(0);
        }
        metrics::counter!("pgfanout_executor_retries_total").increment(0);
        metrics::counter!("pgfanout_executor_dead_letters_total").increment(0);

        let allowed = match &settings.allowed_tables {
            Some(list) => AllowedTables::List(list.iter().cloned().collect()),
            None => AllowedTables::Publication(pg_settings.publication.clone()),
        };
        tracing::info!(topic = %topics.instructions, group = %settings.group_id, "executor started");
        if settings.allowed_tables.is_none() {
            warn_if_nothing_writable(pg_settings).await;
        }
        Ok(ExecutorLoop {
            pg_settings,
            topics,
            consumer,
            producer,
            pg_conn: None,
            catalog: Catalog::new(allowed),
            statements: Statements::default(),
            max_batch: settings.batch_size as usize,
            linger: Duration::from_millis(settings.linger_ms),
            in_flight: VecDeque::new(),
            shutdown,
        })
    }

    /// One batch: stores the offsets of the batches already acknowledged, polls, applies
    /// and starts publishing the results. `Break` once shutdown is asked for.
    async fn step(&mut self) -> Result<ControlFlow<()>, ExecutorError> {
        if self.shutdown.is_triggered() {
            return Ok(ControlFlow::Break(()));
        }
        while self.in_flight.front().is_some_and(|b| b.publish.is_finished()) {
            if let Some(batch) = self.in_flight.pop_front() {
                batch.store_offsets_once_acknowledged(&self.consumer).await?;
            }
        }
        let Some(messages) = self.poll().await? else {
            return Ok(ControlFlow::Continue(()));
        };
        let started = Instant::now();
        let instructions = self.decode_or_dead_letter(&messages).await?;
        let Some(results) = apply_with_retry(
            self.pg_settings,
            &mut self.pg_conn,
            &mut self.catalog,
            &mut self.statements,
            &instructions,
            &mut self.shutdown,
        )
        .await?
        else {
            return Ok(ControlFlow::Break(())); // shut down while PostgreSQL was away; nothing stored
        };
        for r in &results {
            metrics::counter!("pgfanout_executor_instructions_total", "status" => r.status.as_str()).increment(1);
        }
        metrics::histogram!("pgfanout_executor_batch_size").record(instructions.len() as f64);
        let publish =
            tokio::spawn(publish_results(self.producer.clone(), self.topics.results.clone(), results, self.shutdown.clone()));
        self.in_flight.push_back(Published { publish, messages, started });
        if self.in_flight.len() >= MAX_BATCHES_IN_FLIGHT {
            if let Some(oldest) = self.in_flight.pop_front() {
                oldest.store_offsets_once_acknowledged(&self.consumer).await?;
            }
        }
        Ok(ControlFlow::Continue(()))
    }

    /// The next records (off the async runtime); `None` when there were none, or the poll
    /// failed (it is retried after a pause).
    async fn poll(&self) -> Result<Option<Vec<OwnedMessage>>, ExecutorError> {
        let consumer = Arc::clone(&self.consumer);
        let (max, linger) = (self.max_batch, self.linger);
        let polled =
            tokio::task::spawn_blocking(move || kafka::poll_batch(&consumer, max, Duration::from_millis(200), linger)).await?;
        match polled {
            Ok(messages) if messages.is_empty() => Ok(None),
            Ok(messages) => Ok(Some(messages)),
            Err(e) => {
                tracing::warn!(error = %e, "poll failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
                Ok(None)
            }
        }
    }

    /// The instructions of the records that decode; each other record goes to the
    /// dead-letter topic.
    async fn decode_or_dead_letter(&mut self, messages: &[OwnedMessage]) -> Result<Vec<Instruction>, ExecutorError> {
        let mut instructions = Vec::with_capacity(messages.len());
        for m in messages {
            match m.payload().map(decode_instruction) {
                Some(Ok(instruction)) => instructions.push(instruction),
                Some(Err(e)) => send_dead_letter(&self.producer, &self.topics.dlq, m, &e.to_string(), &mut self.shutdown).await?,
                None => send_dead_letter(&self.producer, &self.topics.dlq, m, "record has no value", &mut self.shutdown).await?,
            }
        }
        Ok(instructions)
    }

    /// Stores the offsets of every batch once its results are acknowledged, commits them,
    /// leaves the group and flushes the producer.
    async fn stop(mut self) -> Result<(), ExecutorError> {
        while let Some(batch) = self.in_flight.pop_front() {
            batch.store_offsets_once_acknowledged(&self.consumer).await?;
        }
        // Commit what was stored, then leave the group; both off the async runtime.
        let consumer = Arc::try_unwrap(self.consumer).map_err(|_| ExecutorError::ConsumerShared)?;
        tokio::task::spawn_blocking(move || {
            if let Err(e) = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync) {
                tracing::debug!(error = %e, "final offset commit");
            }
            kafka::close_consumer(consumer);
        })
        .await?;
        self.producer.flush(Timeout::After(Duration::from_secs(10)))?;
        tracing::info!("executor stopped");
        Ok(())
    }
}

/// Says, once at start, when the publication gives the executor no table it may write:
/// every instruction would be rejected `PGF01`. Not an error: the publication may be
/// created later, and the executor reads it again when a table is not found.
async fn warn_if_nothing_writable(pg_settings: &PostgresSettings) {
    let problem = match pg::connect(&pg_settings.conninfo).await {
        Ok(client) => pg::publication_problem(&client, &pg_settings.publication).await,
        Err(e) => Err(e),
    };
    match problem {
        Ok(Some(problem)) => tracing::warn!("{problem}; until then every instruction is rejected (PGF01)"),
        Ok(None) => {}
        Err(e) => tracing::debug!(error = %e, "could not read the publication at start"),
    }
}

/// Applies the batch, retrying transient failures with backoff (reconnecting when the
/// connection is gone). `None` when shutdown came first.
async fn apply_with_retry(
    pg_settings: &PostgresSettings,
    conn: &mut Option<Client>,
    catalog: &mut Catalog,
    statements: &mut Statements,
    instructions: &[Instruction],
    shutdown: &mut Shutdown,
) -> Result<Option<Vec<InstructionResult>>, ExecutorError> {
    if instructions.is_empty() {
        return Ok(Some(Vec::new()));
    }
    let mut backoff = Backoff::new();
    loop {
        if shutdown.is_triggered() {
            return Ok(None);
        }
        if conn.as_ref().is_none_or(Client::is_closed) {
            match pg::connect(&pg_settings.conninfo).await {
                Ok(c) => {
                    *statements = Statements::default();
                    *conn = Some(c);
                }
                Err(e) if pg::is_transient(&e) => {
                    count_postgres_error(&e);
                    tracing::warn!(error = %e, "cannot reach postgres; retrying");
                    backoff.wait(shutdown).await;
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
        }
        let Some(client) = conn.as_ref() else { continue };
        match batch::execute_batch(client, catalog, statements, instructions).await {
            Ok(results) => return Ok(Some(results)),
            Err(e) if pg::is_transient(&e) => {
                metrics::counter!("pgfanout_executor_retries_total").increment(1);
                count_postgres_error(&e);
                tracing::warn!(error = %e, sqlstate = pg::sqlstate(&e).unwrap_or(""), "transient postgres error; retrying the batch");
                if client.is_closed() {
                    *conn = None;
                }
                backoff.wait(shutdown).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Batches whose results may be on their way to Kafka while the next batch is applied.
/// Their offsets are stored in batch order, each once its results are acknowledged.
const MAX_BATCHES_IN_FLIGHT: usize = 4;

struct Published {
    publish: tokio::task::JoinHandle<Result<(), ExecutorError>>,
    messages: Vec<OwnedMessage>,
    started: Instant,
}

impl Published {
    /// Waits for the batch's results to be acknowledged, then stores its offsets.
    async fn store_offsets_once_acknowledged(self, consumer: &BaseConsumer<MetricsContext>) -> Result<(), ExecutorError> {
        self.publish.await??;
        store_offsets(consumer, &self.messages)?;
        metrics::histogram!("pgfanout_executor_batch_duration_seconds").record(self.started.elapsed().as_secs_f64());
        Ok(())
    }
}

async fn publish_results(
    producer: FutureProducer<MetricsContext>,
    topic: String,
    results: Vec<InstructionResult>,
    mut shutdown: Shutdown,
) -> Result<(), ExecutorError> {
    let payloads: Vec<Vec<u8>> = results.iter().map(encode_result).collect::<Result<_, _>>()?;
    let mut backoff = Backoff::new();
    let mut pending: Vec<usize> = (0..results.len()).collect();
    while !pending.is_empty() {
        let sends = pending.iter().map(|&i| {
            let record = FutureRecord::to(&topic).key(results[i].instruction_id.as_bytes()).payload(&payloads[i]);
            producer.send(record, Timeout::After(Duration::from_secs(30)))
        });
        let outcomes = futures::future::join_all(sends).await;
        let mut failed = Vec::new();
        for (&i, outcome) in pending.iter().zip(outcomes) {
            if let Err((e, _)) = outcome {
                if !kafka::is_transient(&e) {
                    return Err(e.into());
                }
                tracing::warn!(error = %e, "result not acknowledged; retrying");
                failed.push(i);
            }
        }
        pending = failed;
        if !pending.is_empty() {
            backoff.wait(&mut shutdown).await;
        }
    }
    Ok(())
}

async fn send_dead_letter(
    producer: &FutureProducer<MetricsContext>,
    dlq: &str,
    message: &OwnedMessage,
    reason: &str,
    shutdown: &mut Shutdown,
) -> Result<(), ExecutorError> {
    tracing::warn!(
        partition = message.partition(),
        offset = message.offset(),
        reason,
        "undecodable instruction sent to the dead-letter topic"
    );
    let mut backoff = Backoff::new();
    loop {
        match kafka::dead_letter(producer, dlq, message, "executor", reason).await {
            Ok(()) => return Ok(()),
            Err(e) if kafka::is_transient(&e) => backoff.wait(shutdown).await,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Stores, per partition, the offset after the last record of the batch. Offsets of
/// partitions revoked meanwhile are refused by librdkafka, which is harmless: the records
/// are redelivered to the new owner and answered from the log.
fn store_offsets(consumer: &BaseConsumer<MetricsContext>, messages: &[OwnedMessage]) -> Result<(), ExecutorError> {
    let mut next: HashMap<(String, i32), i64> = HashMap::new();
    for m in messages {
        let e = next.entry((m.topic().to_string(), m.partition())).or_insert(0);
        *e = (*e).max(m.offset() + 1);
    }
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), offset) in next {
        tpl.add_partition_offset(&topic, partition, Offset::Offset(offset))?;
    }
    if let Err(e) = consumer.store_offsets(&tpl) {
        tracing::debug!(error = %e, "offsets not stored (partition revoked?)");
    }
    Ok(())
}

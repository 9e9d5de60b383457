//! The fleet benchmark's anchor: the same load with N native subscribers instead of
//! pgfanout's fleet. Each is a `pg_recvlogical` on a slot of its own (pgoutput, the same
//! publication), so each walsender decodes the whole WAL again, as it does for N
//! PostgreSQL subscribers. Capture and the confirmation service are stopped; the executor
//! still applies the instructions, so PostgreSQL does the same writes as in the fleet
//! phases.

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use pgfanout::config::KafkaSettings;
use pgfanout::contract::codec::decode_result;
use pgfanout::contract::ResultStatus;
use pgfanout::test_support::bench::flow::{follow, produce, trim, Positions, Producer_, Reader};
use pgfanout::test_support::bench::measure::{open_loop, settle, Chain};
use pgfanout::test_support::bench::native::{current_lsn, drop_slot_when_released, flushed_past, start_recvlogical};
use pgfanout::test_support::bench::usage::{postgres_cpu_seconds, tcp_received_bytes};
use pgfanout::test_support::bench::{env, upsert_item, Process};

/// What N native subscribers measured.
pub struct Anchor {
    pub n: usize,
    /// PostgreSQL's CPU seconds per 1,000 instructions.
    pub pg_cpu: f64,
    /// Bytes one subscriber received per change.
    pub bytes_per_change: f64,
}

/// Instructions in, results out.
struct Executed {
    producer: Producer_,
    topic: String,
    results: mpsc::Receiver<(String, bool)>,
    outstanding: HashSet<String>,
    committed: usize,
    counter: u64,
}

impl Chain for Executed {
    fn submit(&mut self) {
        let (id, payload) = upsert_item(self.counter);
        self.counter += 1;
        produce(&self.producer, &self.topic, b"bench", &payload);
        self.outstanding.insert(id);
    }

    fn pending(&mut self) -> usize {
        while let Ok((id, committed)) = self.results.try_recv() {
            if self.outstanding.remove(&id) && committed {
                self.committed += 1;
            }
        }
        self.outstanding.len()
    }
}

/// For each N of `sizes`: N subscribers streaming while instructions go in at 1,000/s for
/// `duration`; PostgreSQL's CPU (postmaster `postmaster`) from the load's start until every
/// subscriber has confirmed its end.
pub fn measure(settings: &KafkaSettings, postmaster: u32, sizes: &[usize], duration: Duration) -> Vec<Anchor> {
    let stop = Arc::new(AtomicBool::new(false));
    let topics = settings.topics();
    let (tx, results) = mpsc::channel();
    let read = Positions::default();
    follow(settings, &topics.results, stop.clone(), read.clone(), move |p, _| {
        if let Ok(r) = decode_result(p) {
            let _ = tx.send((r.instruction_id, r.status == ResultStatus::Committed));
        }
    });
    trim(
        settings,
        vec![
            (topics.instructions.clone(), vec![Reader::Group("pgfanout-executor".into())]),
            (topics.results.clone(), vec![Reader::Local(read)]),
        ],
        stop.clone(),
    );
    let mut chain = Executed {
        producer: super::bench_producer(settings),
        topic: topics.instructions,
        results,
        outstanding: HashSet::new(),
        committed: 0,
        counter: 0,
    };
    let conninfo = env("PGFANOUT_POSTGRES");
    // One runtime for the one connection: it drives the connection while a query waits.
    let pg = Pg { runtime: tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap(), conninfo };
    let client = pg.runtime.block_on(pgfanout::pg::connect(&pg.conninfo)).expect("connect to PostgreSQL");
    let anchors = sizes.iter().map(|n| subscribers(&pg, &client, &mut chain, postmaster, *n, duration)).collect();
    stop.store(true, Ordering::Relaxed);
    anchors
}

struct Pg {
    runtime: tokio::runtime::Runtime,
    conninfo: String,
}

fn subscribers(
    pg: &Pg,
    client: &tokio_postgres::Client,
    chain: &mut Executed,
    postmaster: u32,
    n: usize,
    duration: Duration,
) -> Anchor {
    let slots: Vec<String> = (1..=n).map(|i| format!("native_{n}_{i}")).collect();
    let on = |f| pg.runtime.block_on(f);
    let streams: Vec<Process> =
        slots.iter().map(|s| on(start_recvlogical(client, &pg.conninfo, s, Path::new("/dev/null")))).collect();
    for _ in 0..100 {
        chain.submit();
    }
    settle(chain, Duration::from_secs(300));
    let received = |streams: &[Process]| tcp_received_bytes(streams[0].0.id()) as f64;
    let (bytes_before, cpu_before, committed_before) = (received(&streams), postgres_cpu_seconds(postmaster), chain.committed);
    open_loop(chain, 1000.0, duration);
    settle(chain, Duration::from_secs(300));
    // Every subscriber has confirmed past the load's end: a message after it has come back.
    let end = pg.runtime.block_on(current_lsn(client));
    pg.runtime.block_on(client.batch_execute("SELECT pg_logical_emit_message(true, 'pgfanout-bench', 'end')")).unwrap();
    for slot in &slots {
        while !pg.runtime.block_on(flushed_past(client, slot, &end)) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let instructions = (chain.committed - committed_before) as f64;
    let pg_cpu = (postgres_cpu_seconds(postmaster) - cpu_before) / (instructions / 1000.0);
    let bytes_per_change = (received(&streams) - bytes_before) / instructions;
    println!(
        "{n} native subscribers: {instructions} instructions at 1,000/s; PostgreSQL {pg_cpu:.3} CPU s per 1,000, \
         {bytes_per_change:.0} bytes received per change by one subscriber"
    );
    drop(streams);
    for slot in &slots {
        pg.runtime.block_on(drop_slot_when_released(client, slot));
    }
    Anchor { n, pg_cpu, bytes_per_change }
}

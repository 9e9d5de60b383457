//! How the end-to-end bench measures: an open-loop load against a chain of stages with
//! the backlog sampled, the search for the highest sustained rate, latency percentiles,
//! and the broker's own round trip as the floor under every figure.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use crate::config::KafkaSettings;
use crate::contract::now_micros;
use crate::kafka::{self, ClientRole, TopicSpec};
use rdkafka::producer::Producer;

use super::flow::{block_on, follow, produce, trim, Positions, Producer_, Reader};

/// Something records go into at one end and come out of at the other; the throughput
/// search drives it.
pub trait Chain {
    fn submit(&mut self);
    /// How many submitted records have not come out at the far end yet.
    fn pending(&mut self) -> usize;
}

/// Submits at `rate` per second for `duration`; returns the backlog sampled every second.
pub fn open_loop(chain: &mut impl Chain, rate: f64, duration: Duration) -> Vec<usize> {
    let started = Instant::now();
    let mut submitted = 0usize;
    let mut backlog = Vec::new();
    let mut next_sample = started + Duration::from_secs(1);
    while started.elapsed() < duration {
        let due = (started.elapsed().as_secs_f64() * rate) as usize;
        while submitted < due {
            chain.submit();
            submitted += 1;
        }
        if Instant::now() >= next_sample {
            backlog.push(chain.pending());
            next_sample += Duration::from_secs(1);
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    backlog
}

/// Waits until nothing is pending.
pub fn settle(chain: &mut impl Chain, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let pending = chain.pending();
        if pending == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "{pending} records still pending after {timeout:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Whether the backlog grew over the second half of an open loop: the mean of its last five
/// samples against the five before the half, with a quarter of a second's submissions of
/// slack for the records in flight.
pub fn grew(backlog: &[usize], rate: f64) -> bool {
    let n = backlog.len();
    let w = 5.min(n / 4).max(1);
    let mean = |s: &[usize]| s.iter().sum::<usize>() as f64 / s.len() as f64;
    mean(&backlog[n - w..]) > mean(&backlog[n / 2 - w..n / 2]) + rate / 4.0
}

/// The chain's capacity (a burst of `burst` records) and the highest rate from 90% of it,
/// down by 10% a step, that it sustains for `duration`.
pub fn sustained(label: &str, chain: &mut impl Chain, burst: usize, duration: Duration) -> (f64, f64) {
    let started = Instant::now();
    for _ in 0..burst {
        chain.submit();
    }
    settle(chain, Duration::from_secs(600));
    let capacity = burst as f64 / started.elapsed().as_secs_f64();
    let mut rate = (capacity * 0.9).floor();
    loop {
        let backlog = open_loop(chain, rate, duration);
        settle(chain, Duration::from_secs(600));
        let half = backlog.len() / 2;
        println!(
            "{label}: {rate:.0}/s for {}s, backlog at the half {}, at the end {}",
            duration.as_secs(),
            backlog[half.saturating_sub(1)],
            backlog[backlog.len() - 1]
        );
        if !grew(&backlog, rate) || rate < 100.0 {
            return (capacity, rate);
        }
        rate = (rate * 0.9).floor();
    }
}

/// Microsecond differences as milliseconds, sorted for [`percentile`].
pub fn sorted_ms(us: impl Iterator<Item = i64>) -> Vec<f64> {
    let mut ms: Vec<f64> = us.map(|us| us as f64 / 1e3).collect();
    ms.sort_by(f64::total_cmp);
    ms
}

pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// The broker's hop: records at 1,000/s, each carrying its send time; p99 of produce to
/// receipt, in milliseconds.
pub fn broker_hop(settings: &KafkaSettings, duration: Duration) -> f64 {
    let topic = format!("{}hop", settings.topic_prefix);
    block_on(kafka::ensure_topics(settings, &[TopicSpec { name: &topic, partitions: 3, config: vec![] }])).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let positions = Positions::default();
    let reader = follow(settings, &topic, stop.clone(), positions.clone(), move |p, _| {
        let sent = i64::from_le_bytes(p[..8].try_into().unwrap());
        let _ = tx.send(now_micros() - sent);
    });
    let trimmer = trim(settings, vec![(topic.clone(), vec![Reader::Local(positions)])], stop.clone());
    let producer: Producer_ = kafka::client_config(settings, ClientRole::Producer).create().unwrap();
    // Warm up: the producer has its metadata and connections, the reader its positions.
    for n in 0..2000u64 {
        produce(&producer, &topic, &n.to_le_bytes(), &now_micros().to_le_bytes());
        std::thread::sleep(Duration::from_millis(1));
    }
    producer.flush(Duration::from_secs(10)).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    while rx.try_recv().is_ok() {}
    let started = Instant::now();
    let mut sent = 0u64;
    let mut payload = vec![0u8; 200];
    while started.elapsed() < duration {
        while sent < (started.elapsed().as_secs_f64() * 1000.0) as u64 {
            payload[..8].copy_from_slice(&now_micros().to_le_bytes());
            produce(&producer, &topic, &sent.to_le_bytes(), &payload);
            sent += 1;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    producer.flush(Duration::from_secs(10)).unwrap();
    let mut latencies = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while (latencies.len() as u64) < sent && Instant::now() < deadline {
        if let Ok(us) = rx.recv_timeout(Duration::from_millis(100)) {
            latencies.push(us as f64 / 1e3);
        }
    }
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    trimmer.into_iter().for_each(|t| t.join().unwrap());
    assert_eq!(latencies.len() as u64, sent, "every hop record arrived");
    latencies.sort_by(f64::total_cmp);
    println!("broker hop: p50 {:.1} ms, p99 {:.1} ms", percentile(&latencies, 0.5), percentile(&latencies, 0.99));

    percentile(&latencies, 0.99)
}

/// When the last of the devices in `acks` (per device, every rise of its acknowledged
/// watermark: (LSN, when)) had acknowledged `lsn`; `None` while one has not.
pub fn applied_everywhere_at(acks: &std::collections::HashMap<String, Vec<(i64, i64)>>, lsn: i64) -> Option<i64> {
    let mut latest = None;
    for history in acks.values() {
        let (_, at) = history.get(history.partition_point(|(w, _)| *w < lsn))?;
        latest = latest.max(Some(*at));
    }
    latest
}

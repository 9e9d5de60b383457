//! `pgfanout replay`: rewinds a device's stored offsets and applies the deltas again from
//! there, then stops once it has caught up with the topic's end as it was at the start.
//!
//! Safe by construction: a delta changes a row only if it is newer than what the row
//! holds, so replaying history never moves the store backwards; it repairs rows that were
//! changed or lost locally. The store is locked for the replay: stop the device first.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::str::FromStr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::Consumer;
use rdkafka::{Offset, TopicPartitionList};

use super::store::Store;
use super::{topic_bounds, Device, DeviceError, DeviceSettings};
use crate::config::KafkaSettings;
use crate::shutdown::Shutdown;

/// Where a replay starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplayFrom {
    /// The oldest record the topic still holds, in every partition.
    Beginning,
    /// One partition, from an offset.
    Offset { partition: i32, offset: i64 },
    /// Every partition, from the first record at or after this time.
    Time(SystemTime),
}

impl FromStr for ReplayFrom {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "beginning" {
            return Ok(ReplayFrom::Beginning);
        }
        if let Some(rest) = s.strip_prefix("offset:") {
            let (p, o) = rest.split_once(':').ok_or("use offset:<partition>:<offset>")?;
            let partition = p.parse().map_err(|_| format!("{p:?} is not a partition number"))?;
            let offset: i64 = o.parse().map_err(|_| format!("{o:?} is not an offset"))?;
            if offset < 0 {
                return Err("offsets are not negative".into());
            }
            return Ok(ReplayFrom::Offset { partition, offset });
        }
        if let Some(t) = s.strip_prefix("time:") {
            let at = humantime::parse_rfc3339_weak(t).map_err(|e| format!("{t:?} is not an RFC 3339 time: {e}"))?;
            return Ok(ReplayFrom::Time(at));
        }
        Err(format!("{s:?}: use beginning, offset:<partition>:<offset> or time:<RFC 3339>"))
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct ReplaySettings {
    #[command(flatten)]
    pub device: DeviceSettings,
    /// Where to start: `beginning`, `offset:<partition>:<offset>` or `time:<RFC 3339>`.
    #[arg(long = "from")]
    pub from: ReplayFrom,
}

/// What a replay did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayReport {
    /// Offsets the replay started from, per rewound partition.
    pub from: HashMap<i32, i64>,
    /// Records processed.
    pub processed: u64,
}

/// Runs a replay on the current thread. Blocking.
pub fn replay_blocking(
    kafka_settings: &KafkaSettings,
    settings: &ReplaySettings,
    shutdown: Shutdown,
) -> Result<ReplayReport, DeviceError> {
    let kafka_settings = &settings.device.kafka(kafka_settings);
    let topic = kafka_settings.topics().deltas;
    let (probe, bounds) = topic_bounds(kafka_settings)?;
    let partitions = bounds.len();
    let ends: HashMap<i32, i64> = bounds.iter().map(|(p, _, high)| (*p, *high)).collect();
    let starts: HashMap<i32, i64> = bounds.iter().map(|(p, low, _)| (*p, *low)).collect();
    let from: HashMap<i32, i64> = match &settings.from {
        ReplayFrom::Beginning => starts.clone(),
        ReplayFrom::Offset { partition, offset } => {
            let (Some(low), Some(high)) = (starts.get(partition), ends.get(partition)) else {
                return Err(DeviceError::NoSuchPartition { topic, partition: *partition });
            };
            if offset < low || offset > high {
                return Err(DeviceError::OffsetOutOfRange { partition: *partition, low: *low, high: *high, offset: *offset });
            }
            HashMap::from([(*partition, *offset)])
        }
        ReplayFrom::Time(at) => {
            let ms = at.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
            let mut query = TopicPartitionList::new();
            for p in 0..partitions as i32 {
                query.add_partition_offset(&topic, p, Offset::Offset(ms))?;
            }
            let found = probe.offsets_for_times(query, Duration::from_secs(10))?;
            found
                .elements()
                .iter()
                .map(|e| {
                    let offset = match e.offset() {
                        Offset::Offset(o) if o >= 0 => o,
                        _ => ends.get(&e.partition()).copied().unwrap_or(0), // nothing after that time
                    };
                    (e.partition(), offset)
                })
                .collect()
        }
    };
    drop(probe);
    {
        let mut store = Store::open(&settings.device.store)?;
        store.rewind(&topic, &from)?;
    }
    let total: i64 = from.iter().map(|(p, o)| ends.get(p).copied().unwrap_or(0) - o).sum();
    tracing::info!(device = %settings.device.id, ?from, deltas = total, "replay started");

    let mut device = Device::open(kafka_settings, &settings.device, &shutdown)?;
    let mut positions = from.clone();
    let mut progress = ReplayProgressBar::new(total.max(0) as u64);
    let mut processed = 0u64;
    while !shutdown.is_triggered() && ends.iter().any(|(p, end)| positions.get(p).is_some_and(|pos| pos < end)) {
        let step = device.step(&shutdown)?;
        processed += step.processed;
        for (p, pos) in step.positions {
            positions.insert(p, pos);
        }
        progress.show(processed);
    }
    progress.show_final(processed);
    device.close();
    Ok(ReplayReport { from, processed })
}

/// A progress bar on a terminal, a log line every 2 s otherwise.
struct ReplayProgressBar {
    total: u64,
    started: Instant,
    last: Instant,
    terminal: bool,
}

impl ReplayProgressBar {
    fn new(total: u64) -> Self {
        let now = Instant::now();
        ReplayProgressBar { total, started: now, last: now, terminal: std::io::stderr().is_terminal() }
    }

    fn line(&self, done: u64) -> String {
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = done as f64 / secs;
        let left = self.total.saturating_sub(done);
        let eta = if rate > 0.0 { format!("{:.0}s", left as f64 / rate) } else { "?".into() };
        let pct = (done.min(self.total) * 100).checked_div(self.total).unwrap_or(100) as usize;
        let bar: String = (0..20).map(|i| if i * 5 < pct { '#' } else { '.' }).collect();
        format!("replay [{bar}] {done}/{} deltas, {rate:.0}/s, ETA {eta}", self.total)
    }

    fn show(&mut self, done: u64) {
        if self.terminal && self.last.elapsed() >= Duration::from_millis(100) {
            let mut err = std::io::stderr();
            let _ = write!(err, "\r{}", self.line(done));
            let _ = err.flush();
            self.last = Instant::now();
        } else if !self.terminal && self.last.elapsed() >= Duration::from_secs(2) {
            tracing::info!("{}", self.line(done));
            self.last = Instant::now();
        }
    }

    fn show_final(&self, done: u64) {
        if self.terminal {
            eprintln!("\r{}", self.line(done));
        } else {
            tracing::info!("{}", self.line(done));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_starts_parse() {
        assert_eq!("beginning".parse::<ReplayFrom>(), Ok(ReplayFrom::Beginning));
        assert_eq!("offset:2:40".parse::<ReplayFrom>(), Ok(ReplayFrom::Offset { partition: 2, offset: 40 }));
        let t = "time:2026-11-25T17:00:00Z".parse::<ReplayFrom>().unwrap();
        assert_eq!(t, ReplayFrom::Time(UNIX_EPOCH + Duration::from_secs(1_795_626_000)));
        for bad in ["", "begin", "offset:1", "offset:a:1", "offset:1:-5", "time:yesterday"] {
            assert!(bad.parse::<ReplayFrom>().is_err(), "{bad}");
        }
    }
}

//! Where the confirmation service resumes, so that it neither loses nor repeats a final
//! confirmation across restarts.
//!
//! Results are read in order per partition; a result stays *open* until its final
//! confirmation is acknowledged by Kafka (or it needs none). The service resumes reading
//! each results partition at its oldest open result, so nothing is lost. What it re-reads
//! may have been confirmed already: to know, it reads the confirmations topic back from a
//! point before any final of a re-read result. That point is the confirmations topic's
//! known end when the oldest open result was read — every final sent later lands after it,
//! since one producer appends in order — recorded per checkpoint *epoch*.
//!
//! A checkpoint (every second and at a clean stop) writes the results, acknowledgement and
//! confirmations positions and every device's watermark to PostgreSQL in one transaction.

use std::collections::{BTreeMap, HashMap, VecDeque};

use tokio_postgres::Client;

use super::tracker::ResultPosition;

#[derive(Debug, Default)]
pub struct Window {
    /// Per results partition: open results, by offset, with the epoch each was read in.
    open: HashMap<i32, BTreeMap<i64, u64>>,
    /// Per results partition: the offset after the last result read.
    next: HashMap<i32, i64>,
    epoch: u64,
    /// (epoch, the confirmations topic's known end per partition when that epoch began).
    starts: VecDeque<(u64, HashMap<i32, i64>)>,
    /// Per confirmations partition: the offset after the last confirmation acknowledged.
    confirmations_end: HashMap<i32, i64>,
}

/// What a checkpoint writes: per partition, where to resume.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Checkpoint {
    pub results: HashMap<i32, i64>,
    pub acks: HashMap<i32, i64>,
    pub confirmations: HashMap<i32, i64>,
}

impl Window {
    /// Starts from the loaded positions: results resume at `results`, and the confirmations
    /// topic ends at `confirmations_end` (read back to there on start).
    pub fn new(results: HashMap<i32, i64>, confirmations_end: HashMap<i32, i64>) -> Window {
        Window {
            open: HashMap::new(),
            next: results,
            epoch: 0,
            starts: VecDeque::from([(0, confirmations_end.clone())]),
            confirmations_end,
        }
    }

    /// A result read at `position`; open until [`Window::close`].
    pub fn read(&mut self, (partition, offset): ResultPosition) {
        self.open.entry(partition).or_default().insert(offset, self.epoch);
        self.next.insert(partition, offset + 1);
    }

    /// The result at `position` needs nothing more: its final confirmation is acknowledged,
    /// or it needed none.
    pub fn close(&mut self, (partition, offset): ResultPosition) {
        if let Some(open) = self.open.get_mut(&partition) {
            open.remove(&offset);
        }
    }

    /// A confirmation acknowledged by Kafka at `offset` of confirmations `partition`.
    pub fn confirmed_at(&mut self, partition: i32, offset: i64) {
        let end = self.confirmations_end.entry(partition).or_insert(0);
        *end = (*end).max(offset + 1);
    }

    /// The positions to resume from if the service stopped now; starts the next epoch.
    pub fn checkpoint(&mut self, acks: HashMap<i32, i64>) -> Checkpoint {
        let mut results = self.next.clone();
        for (p, open) in &self.open {
            if let Some((offset, _)) = open.first_key_value() {
                results.insert(*p, *offset);
            }
        }
        let oldest = self.open.values().filter_map(|o| o.values().min()).min().copied();
        if let Some(oldest) = oldest {
            while self.starts.len() > 1 && self.starts[1].0 <= oldest {
                self.starts.pop_front();
            }
        }
        let confirmations = match oldest {
            Some(_) => self.starts.front().map(|(_, s)| s.clone()).unwrap_or_default(),
            None => self.confirmations_end.clone(),
        };
        self.epoch += 1;
        self.starts.push_back((self.epoch, self.confirmations_end.clone()));
        if oldest.is_none() {
            self.starts.retain(|(e, _)| *e == self.epoch);
        }
        Checkpoint { results, acks, confirmations }
    }

    pub fn open_results(&self) -> usize {
        self.open.values().map(BTreeMap::len).sum()
    }
}

pub const RESULTS: &str = "results";
pub const ACKS: &str = "device-acks";
pub const CONFIRMATIONS: &str = "confirmations";

/// The positions of the last checkpoint (empty maps on a first start).
pub async fn load(client: &Client) -> Result<Checkpoint, tokio_postgres::Error> {
    let mut out = Checkpoint::default();
    for row in client.query("SELECT topic, partition, next_offset FROM pgfanout.confirm_positions", &[]).await? {
        let (topic, partition, offset): (String, i32, i64) = (row.get(0), row.get(1), row.get(2));
        let map = match topic.as_str() {
            RESULTS => &mut out.results,
            ACKS => &mut out.acks,
            CONFIRMATIONS => &mut out.confirmations,
            _ => continue,
        };
        map.insert(partition, offset);
    }
    Ok(out)
}

/// What the service records of an active device at a checkpoint.
#[derive(Debug, Clone)]
pub struct Reading {
    pub id: String,
    pub watermark: i64,
    /// Unix microseconds, by the service's clock.
    pub last_seen: Option<i64>,
    pub lag_seconds: f64,
}

/// Writes a checkpoint and the devices' readings in one transaction.
pub async fn save(client: &mut Client, checkpoint: &Checkpoint, devices: &[Reading]) -> Result<(), tokio_postgres::Error> {
    let (mut topics, mut partitions, mut offsets) = (Vec::new(), Vec::new(), Vec::new());
    for (topic, map) in [(RESULTS, &checkpoint.results), (ACKS, &checkpoint.acks), (CONFIRMATIONS, &checkpoint.confirmations)] {
        for (p, o) in map {
            topics.push(topic);
            partitions.push(*p);
            offsets.push(*o);
        }
    }
    let ids: Vec<&str> = devices.iter().map(|d| d.id.as_str()).collect();
    let watermarks: Vec<i64> = devices.iter().map(|d| d.watermark).collect();
    let seen: Vec<Option<i64>> = devices.iter().map(|d| d.last_seen).collect();
    let lags: Vec<f64> = devices.iter().map(|d| d.lag_seconds).collect();
    let tx = client.transaction().await?;
    tx.execute(
        "INSERT INTO pgfanout.confirm_positions (topic, partition, next_offset)
         SELECT * FROM unnest($1::text[], $2::int4[], $3::int8[])
         ON CONFLICT (topic, partition) DO UPDATE SET next_offset = excluded.next_offset",
        &[&topics, &partitions, &offsets],
    )
    .await?;
    tx.execute(
        "UPDATE pgfanout.devices d
            SET watermark_lsn = v.w, last_seen_at = to_timestamp(v.s / 1e6), lag_seconds = v.l, observed_at = now()
         FROM unnest($1::text[], $2::int8[], $3::int8[], $4::float8[]) AS v(id, w, s, l) WHERE d.id = v.id",
        &[&ids, &watermarks, &seen, &lags],
    )
    .await?;
    tx.commit().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_resume_at_the_oldest_open_one_and_confirmations_are_read_back_from_before_its_final() {
        let mut w = Window::new(HashMap::new(), HashMap::from([(0, 10)]));
        w.read((0, 5));
        w.read((0, 6));
        w.read((1, 3));
        w.close((0, 6));
        w.confirmed_at(0, 10);
        let c = w.checkpoint(HashMap::new());
        assert_eq!(c.results, HashMap::from([(0, 5), (1, 3)]));
        assert_eq!(c.confirmations, HashMap::from([(0, 10)]), "0/6's final is at 10 or later");
        w.close((0, 5));
        w.close((1, 3));
        w.confirmed_at(0, 11);
        w.read((0, 7));
        let c = w.checkpoint(HashMap::new());
        assert_eq!(c.results, HashMap::from([(0, 7), (1, 4)]));
        assert_eq!(c.confirmations, HashMap::from([(0, 11)]), "0/7 was read after the end was 11");
        w.close((0, 7));
        w.confirmed_at(0, 12);
        let c = w.checkpoint(HashMap::new());
        assert_eq!((c.results[&0], c.confirmations[&0]), (8, 13), "nothing open: resume after everything");
    }
}

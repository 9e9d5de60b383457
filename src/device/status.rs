//! `pgfanout status`: where a device stands — per partition its next offset, the topic's
//! end, the lag between them and the applied position — and its watermark and counters.
//! Reads the store without locking it, so it works while the device runs.

use super::store::{open_read_only, StoreReader};
use super::{topic_bounds, DeviceError};
use crate::config::KafkaSettings;
use crate::contract::Lsn;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionStatus {
    pub partition: i32,
    pub next_offset: i64,
    pub end: i64,
    pub applied_lsn: i64,
}

impl PartitionStatus {
    pub fn lag(&self) -> i64 {
        (self.end - self.next_offset).max(0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceStatus {
    pub partitions: Vec<PartitionStatus>,
    pub counters: Vec<(String, i64)>,
}

impl DeviceStatus {
    /// Every transaction at or below it is applied on the device.
    pub fn watermark(&self) -> i64 {
        self.partitions.iter().map(|p| p.applied_lsn).min().unwrap_or(0)
    }

    pub fn render(&self) -> String {
        let lsn = |l: i64| Lsn::try_from(l).unwrap_or(Lsn::ZERO);
        let mut out = String::from("partition  next_offset        end        lag  applied\n");
        for p in &self.partitions {
            out.push_str(&format!(
                "{:>9}  {:>11}  {:>9}  {:>9}  {}\n",
                p.partition,
                p.next_offset,
                p.end,
                p.lag(),
                lsn(p.applied_lsn)
            ));
        }
        let total: i64 = self.partitions.iter().map(PartitionStatus::lag).sum();
        out.push_str(&format!("lag {total} records; watermark {}\n", lsn(self.watermark())));
        let counters: Vec<String> = self.counters.iter().map(|(k, v)| format!("{k}={v}")).collect();
        out.push_str(&format!("counters: {}\n", counters.join(" ")));
        out
    }
}

/// Reads the status of the store at `path`. Blocking.
pub fn status_blocking(kafka_settings: &KafkaSettings, path: &std::path::Path) -> Result<DeviceStatus, DeviceError> {
    let topic = kafka_settings.topics().deltas;
    let conn = open_read_only(path).map_err(|source| DeviceError::OpenStore { path: path.to_path_buf(), source })?;
    let not_a_store = |source| DeviceError::NotAStore { path: path.to_path_buf(), source };
    let reader = StoreReader::new(&conn);
    let stored = reader.positions(&topic).map_err(not_a_store)?;
    let counters = reader.counters().map_err(not_a_store)?;
    let (_, bounds) = topic_bounds(kafka_settings)?;
    let partitions = bounds
        .into_iter()
        .map(|(partition, _, end)| {
            let (next_offset, applied_lsn) =
                stored.iter().find(|p| p.partition == partition).map_or((0, 0), |p| (p.next_offset, p.applied_lsn));
            PartitionStatus { partition, next_offset, end, applied_lsn }
        })
        .collect();
    Ok(DeviceStatus { partitions, counters })
}

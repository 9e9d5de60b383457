//! `pgfanout rebuild`: builds a fresh store from the whole deltas topic next to the old
//! one, then swaps it in with one atomic rename.
//!
//! A rebuild is only as complete as the topic's history. With `cleanup.policy=compact` on
//! the deltas topic (records keyed by row, a tombstone after each delete) the topic keeps
//! the newest change of every row for ever, which is exactly what a rebuild needs. With
//! time- or size-based retention the oldest records are gone; the rebuild refuses and says
//! so instead of building an incomplete store.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::store::StoreLock;
use super::{topic_bounds, Device, DeviceError, DeviceSettings};
use crate::config::KafkaSettings;
use crate::shutdown::Shutdown;

/// What a rebuild did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebuildReport {
    pub processed: u64,
    pub store: PathBuf,
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Rebuilds `settings.store` from the topic. Blocking; the device must be stopped.
pub fn rebuild_blocking(
    kafka_settings: &KafkaSettings,
    settings: &DeviceSettings,
    shutdown: Shutdown,
) -> Result<RebuildReport, DeviceError> {
    let _live = StoreLock::acquire(&settings.store)?;
    let kafka_settings = &settings.kafka(kafka_settings);
    let (probe, bounds) = topic_bounds(kafka_settings)?;
    let mut ends = HashMap::new();
    for (p, low, high) in bounds {
        if low > 0 {
            return Err(DeviceError::HistoryIncomplete { partition: p, low });
        }
        ends.insert(p, high);
    }
    drop(probe);

    let fresh = with_suffix(&settings.store, ".rebuild");
    for stale in [fresh.clone(), with_suffix(&fresh, "-wal"), with_suffix(&fresh, "-shm")] {
        remove_if_present(&stale)?;
    }
    let building = DeviceSettings { store: fresh.clone(), ..settings.clone() };
    let mut device = Device::open(kafka_settings, &building, &shutdown)?;
    let mut positions: HashMap<i32, i64> = ends.keys().map(|p| (*p, 0)).collect();
    let mut processed = 0u64;
    while ends.iter().any(|(p, end)| positions.get(p).is_some_and(|pos| pos < end)) {
        if shutdown.is_triggered() {
            device.close();
            return Err(DeviceError::RebuildInterrupted);
        }
        let step = device.step(&shutdown)?;
        processed += step.processed;
        positions.extend(step.positions);
    }
    device.close(); // closes SQLite: its WAL is checkpointed into the file
                    // The old store's WAL must not outlive it: SQLite would replay it into the new file.
    for old in [with_suffix(&settings.store, "-wal"), with_suffix(&settings.store, "-shm")] {
        remove_if_present(&old)?;
    }
    std::fs::rename(&fresh, &settings.store).map_err(DeviceError::SwapStore)?;
    Ok(RebuildReport { processed, store: settings.store.clone() })
}

fn remove_if_present(path: &Path) -> Result<(), DeviceError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DeviceError::RemoveFile { path: path.to_path_buf(), source }),
    }
}

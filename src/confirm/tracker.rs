//! What the confirmation service knows, without I/O: the active devices' watermarks and the
//! committed instructions still waiting for them. A device's watermark is the LSN at or
//! below which every transaction is applied on it, so an instruction is applied on the
//! whole fleet once the smallest watermark among the active devices reaches its
//! `commit_lsn`: instructions are released in `commit_lsn` order, by one comparison with
//! that minimum.
//!
//! Times are the service's own clock (microseconds since the Unix epoch) at which it
//! received something, never a device's.

use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::contract::{Confirmation, ConfirmationStatus, MissingDevice};

/// Where a result was read: (partition, offset) on the results topic.
pub type ResultPosition = (i32, i64);

#[derive(Debug, Clone, Default)]
struct DeviceState {
    watermark: i64,
    last_seen: Option<i64>,
    /// (watermark, time the acknowledgement carrying it arrived), ascending, kept back to
    /// the smallest pending `commit_lsn`: when the device reached an LSN.
    history: VecDeque<(i64, i64)>,
}

impl DeviceState {
    /// When this device's acknowledgements first showed `lsn` applied.
    fn reached(&self, lsn: i64) -> Option<i64> {
        let i = self.history.partition_point(|(w, _)| *w < lsn);
        self.history.get(i).map(|(_, at)| *at)
    }
}

#[derive(Debug)]
struct Waiting {
    position: ResultPosition,
    committed_at: i64,
    received: i64,
    pending_sent: bool,
}

/// A confirmation to publish; a final one carries the position of its result.
#[derive(Debug, Clone, PartialEq)]
pub struct Due {
    pub confirmation: Confirmation,
    pub position: Option<ResultPosition>,
}

#[derive(Debug)]
pub struct Tracker {
    devices: BTreeMap<String, DeviceState>,
    waiting: BTreeMap<(i64, String), Waiting>,
    /// Waiting instructions in the order they arrived, for their deadlines.
    arrivals: VecDeque<(i64, (i64, String))>,
    deadline_micros: i64,
}

impl Tracker {
    pub fn new(deadline_micros: i64) -> Tracker {
        Tracker { devices: BTreeMap::new(), waiting: BTreeMap::new(), arrivals: VecDeque::new(), deadline_micros }
    }

    /// The active devices from now on, with what is known of each (a device new to the
    /// tracker starts at the watermark given, usually the one the service last recorded).
    /// Devices not listed — retired ones — stop counting at once.
    pub fn set_fleet(&mut self, active: impl IntoIterator<Item = (String, i64, Option<i64>)>) {
        let mut next = BTreeMap::new();
        for (id, watermark, last_seen) in active {
            let state = self.devices.remove(&id).unwrap_or_else(|| DeviceState {
                watermark,
                last_seen,
                history: VecDeque::from([(watermark, last_seen.unwrap_or(0))]),
            });
            next.insert(id, state);
        }
        self.devices = next;
    }

    /// A verified acknowledgement of an active device, received at `now`. Watermarks never
    /// move back: an older acknowledgement read late changes nothing.
    pub fn ack(&mut self, device: &str, applied_lsn: i64, now: i64) {
        let Some(d) = self.devices.get_mut(device) else { return };
        d.last_seen = Some(d.last_seen.map_or(now, |s| s.max(now)));
        if applied_lsn > d.watermark {
            d.watermark = applied_lsn;
            d.history.push_back((applied_lsn, now));
        }
    }

    /// A committed instruction whose result was read at `position`, received at `now`.
    pub fn add(&mut self, id: &str, commit_lsn: i64, committed_at: i64, position: ResultPosition, now: i64) {
        let key = (commit_lsn, id.to_string());
        self.arrivals.push_back((now, key.clone()));
        self.waiting.insert(key, Waiting { position, committed_at, received: now, pending_sent: false });
    }

    pub fn is_waiting(&self, id: &str, commit_lsn: i64) -> bool {
        self.waiting.contains_key(&(commit_lsn, id.to_string()))
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// The smallest watermark among the active devices; `None` without any.
    pub fn fleet_watermark(&self) -> Option<i64> {
        self.devices.values().map(|d| d.watermark).min()
    }

    /// Each active device: (id, watermark, last seen).
    pub fn devices(&self) -> impl Iterator<Item = (&str, i64, Option<i64>)> {
        self.devices.iter().map(|(id, d)| (id.as_str(), d.watermark, d.last_seen))
    }

    /// How long, at `now`, the first instruction (in commit order) that a device at
    /// `watermark` still misses has waited for it (0 when it misses none): its lag in time.
    pub fn lag_micros(&self, watermark: i64, now: i64) -> i64 {
        let missed = self.waiting.range((watermark + 1, String::new())..).next();
        missed.map_or(0, |(_, w)| (now - w.received).max(0))
    }

    /// The confirmations due at `now`: the final `applied` of every waiting instruction the
    /// whole fleet has reached, and a `pending` for each that passed its deadline without.
    pub fn due(&mut self, now: i64) -> Vec<Due> {
        let mut out = Vec::new();
        if let Some(reached) = self.fleet_watermark() {
            while let Some(entry) = self.waiting.first_entry() {
                if entry.key().0 > reached {
                    break;
                }
                let ((commit_lsn, id), w) = entry.remove_entry();
                out.push(Due { confirmation: self.applied(id, commit_lsn, &w, now), position: Some(w.position) });
            }
            self.forget_history_below(self.waiting.first_key_value().map_or(reached, |((lsn, _), _)| *lsn));
        }
        while let Some((received, _)) = self.arrivals.front() {
            if received + self.deadline_micros > now {
                break;
            }
            let (_, key) = self.arrivals.pop_front().unwrap_or_default();
            // Most instructions are confirmed before their deadline: nothing to say of them.
            let Some(committed_at) = self.waiting.get(&key).filter(|w| !w.pending_sent).map(|w| w.committed_at) else {
                continue;
            };
            let missing = self.missing(key.0);
            if let Some(w) = self.waiting.get_mut(&key) {
                w.pending_sent = true;
            }
            out.push(Due {
                confirmation: Confirmation {
                    instruction_id: key.1,
                    status: ConfirmationStatus::Pending,
                    commit_lsn: key.0,
                    devices: self.devices.len() as i32,
                    missing,
                    slowest_device: None,
                    last_applied_at: None,
                    committed_at,
                    confirmed_at: now,
                },
                position: None,
            });
        }
        out
    }

    fn applied(&self, id: String, commit_lsn: i64, w: &Waiting, now: i64) -> Confirmation {
        // The last device to reach the commit: the latest first acknowledgement at or past it.
        let last =
            self.devices.iter().map(|(device, d)| (d.reached(commit_lsn).unwrap_or(w.received).max(w.received), device)).max();
        Confirmation {
            instruction_id: id,
            status: ConfirmationStatus::Applied,
            commit_lsn,
            devices: self.devices.len() as i32,
            missing: Vec::new(),
            slowest_device: last.map(|(_, d)| d.clone()),
            last_applied_at: last.map(|(at, _)| at),
            committed_at: w.committed_at,
            confirmed_at: now,
        }
    }

    fn missing(&self, commit_lsn: i64) -> Vec<MissingDevice> {
        self.devices
            .iter()
            .filter(|(_, d)| d.watermark < commit_lsn)
            .map(|(id, d)| MissingDevice {
                device_id: id.clone(),
                applied_lsn: d.watermark,
                lag_bytes: commit_lsn - d.watermark,
                last_seen: d.last_seen,
            })
            .collect()
    }

    /// Keeps of each device's history only what can still answer `reached` for an LSN at
    /// or above `lsn`.
    fn forget_history_below(&mut self, lsn: i64) {
        for d in self.devices.values_mut() {
            while d.history.len() > 1 && d.history[1].0 <= lsn {
                d.history.pop_front();
            }
        }
    }
}

/// Ids of the final confirmations published during the last `window`, so that a result
/// read again (after a restart, or re-published by the executor for a resubmitted id) is
/// not confirmed twice.
#[derive(Debug, Default)]
pub struct Finalized {
    ids: HashMap<String, i64>,
    order: VecDeque<(i64, String)>,
}

impl Finalized {
    pub fn insert(&mut self, id: String, at: i64) {
        if self.ids.insert(id.clone(), at).is_none() {
            self.order.push_back((at, id));
        }
    }

    pub fn contains(&self, id: &str) -> bool {
        self.ids.contains_key(id)
    }

    /// Forgets ids finalized before `since`.
    pub fn prune(&mut self, since: i64) {
        while self.order.front().is_some_and(|(at, _)| *at < since) {
            if let Some((_, id)) = self.order.pop_front() {
                self.ids.remove(&id);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: i64 = 1_000_000;

    fn fleet(t: &mut Tracker, ids: &[&str]) {
        t.set_fleet(ids.iter().map(|id| (id.to_string(), 0, None)));
    }

    fn finals(due: &[Due]) -> Vec<(&str, Option<&str>)> {
        due.iter()
            .filter(|d| d.confirmation.status == ConfirmationStatus::Applied)
            .map(|d| (d.confirmation.instruction_id.as_str(), d.confirmation.slowest_device.as_deref()))
            .collect()
    }

    #[test]
    fn an_instruction_is_applied_once_every_active_device_reached_its_commit() {
        let mut t = Tracker::new(30 * SEC);
        fleet(&mut t, &["a", "b", "c"]);
        t.add("i1", 100, 0, (0, 0), 1);
        t.add("i2", 200, 0, (1, 0), 1);
        t.ack("a", 250, 2);
        t.ack("b", 150, 3);
        assert!(finals(&t.due(4)).is_empty(), "c has nothing");
        t.ack("c", 120, 5);
        assert_eq!(finals(&t.due(6)), vec![("i1", Some("c"))]);
        t.ack("c", 300, 7);
        assert!(finals(&t.due(8)).is_empty(), "b is at 150");
        t.ack("b", 200, 9);
        let due = t.due(10);
        assert_eq!(finals(&due), vec![("i2", Some("b"))]);
        assert_eq!(due[0].confirmation.last_applied_at, Some(9));
        assert_eq!(due[0].position, Some((1, 0)));
        assert!(t.due(11).is_empty(), "each instruction once");
        t.add("i3", 400, 0, (0, 1), 20);
        assert_eq!((t.lag_micros(300, 25), t.lag_micros(400, 25)), (5, 0), "c at 300 misses i3, received at 20");
    }

    #[test]
    fn a_late_old_acknowledgement_moves_nothing_back() {
        let mut t = Tracker::new(30 * SEC);
        fleet(&mut t, &["a"]);
        t.ack("a", 500, 1);
        t.ack("a", 100, 2);
        t.add("i", 400, 0, (0, 0), 3);
        assert_eq!(finals(&t.due(3)).len(), 1);
        assert_eq!(t.fleet_watermark(), Some(500));
    }

    #[test]
    fn a_missing_device_is_named_after_the_deadline_and_retiring_it_releases_the_instruction() {
        let mut t = Tracker::new(30 * SEC);
        fleet(&mut t, &["a", "b"]);
        t.add("i", 100, 0, (0, 7), 0);
        t.ack("a", 100, SEC);
        assert!(t.due(29 * SEC).is_empty());
        let due = t.due(30 * SEC);
        assert_eq!(due.len(), 1);
        let c = &due[0].confirmation;
        assert_eq!(c.status, ConfirmationStatus::Pending);
        assert_eq!(c.missing.iter().map(|m| (m.device_id.as_str(), m.lag_bytes)).collect::<Vec<_>>(), vec![("b", 100)]);
        assert!(t.due(60 * SEC).is_empty(), "one pending notice");
        t.set_fleet([("a".to_string(), 0, None)]);
        assert_eq!(finals(&t.due(61 * SEC)), vec![("i", Some("a"))]);
    }

    #[test]
    fn without_active_devices_nothing_is_confirmed_applied() {
        let mut t = Tracker::new(SEC);
        t.add("i", 1, 0, (0, 0), 0);
        let due = t.due(2 * SEC);
        assert_eq!(due.len(), 1);
        assert_eq!((due[0].confirmation.status, due[0].confirmation.devices), (ConfirmationStatus::Pending, 0));
    }

    #[test]
    fn acknowledgements_of_devices_outside_the_fleet_count_for_nothing() {
        let mut t = Tracker::new(SEC);
        fleet(&mut t, &["a"]);
        t.ack("intruder", 1_000, 1);
        t.add("i", 10, 0, (0, 0), 1);
        assert!(finals(&t.due(2)).is_empty());
        assert_eq!(t.devices().map(|d| d.0).collect::<Vec<_>>(), ["a"]);
    }

    #[test]
    fn finalized_ids_are_forgotten_after_the_window() {
        let mut f = Finalized::default();
        f.insert("a".into(), 1);
        f.insert("b".into(), 5);
        f.prune(3);
        assert!(!f.contains("a") && f.contains("b"));
        assert_eq!(f.len(), 1);
    }
}

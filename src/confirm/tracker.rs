//! What the confirmation service knows, without I/O: the active devices' watermarks and
//! labels, and the committed instructions still waiting for them. A device's watermark is
//! the LSN at or below which every transaction is applied on it.
//!
//! An instruction waits for its *target*: by default every active device, else the active
//! devices whose labels include the target's, and of those all or `at_least` of them. For
//! each distinct target the LSN it has *reached* is the smallest watermark among its
//! devices (with `at_least = k`, the k-th largest): every instruction of that target at or
//! below it is applied. Instructions of one target are released in `commit_lsn` order, by
//! one comparison with that LSN. A target that selects fewer devices than it needs (none
//! at all, or fewer than `at_least`) reaches nothing: its instructions stay waiting, and
//! are reported `pending` at their deadline.
//!
//! Times are the service's own clock (microseconds since the Unix epoch) at which it
//! received something, never a device's.

use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::contract::{Confirmation, ConfirmationStatus, MissingDevice, Target};

/// Where a result was read: (partition, offset) on the results topic.
pub type ResultPosition = (i32, i64);

/// A waiting instruction: (commit LSN, instruction id).
type Key = (i64, String);

/// An active device as the registry lists it, with what the service last recorded of it.
#[derive(Debug, Clone, Default)]
pub struct ActiveDevice {
    pub id: String,
    pub labels: BTreeMap<String, String>,
    pub watermark: i64,
    pub last_seen: Option<i64>,
}

#[derive(Debug, Clone, Default)]
struct DeviceState {
    labels: BTreeMap<String, String>,
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
    /// Waiting instructions by target (`None`: the whole fleet), each in commit order.
    waiting: HashMap<Option<Target>, BTreeMap<Key, Waiting>>,
    /// The target of each waiting instruction.
    targets: HashMap<Key, Option<Target>>,
    /// Waiting instructions in the order they arrived, for their deadlines.
    arrivals: VecDeque<(i64, Key)>,
    deadline_micros: i64,
}

impl Tracker {
    pub fn new(deadline_micros: i64) -> Tracker {
        Tracker {
            devices: BTreeMap::new(),
            waiting: HashMap::new(),
            targets: HashMap::new(),
            arrivals: VecDeque::new(),
            deadline_micros,
        }
    }

    /// The active devices from now on (a device new to the tracker starts at the watermark
    /// given, usually the one the service last recorded; a known one keeps its own and
    /// takes the labels given). Devices not listed — retired ones — stop counting at once.
    pub fn set_fleet(&mut self, active: impl IntoIterator<Item = ActiveDevice>) {
        let mut next = BTreeMap::new();
        for d in active {
            let mut state = self.devices.remove(&d.id).unwrap_or_else(|| DeviceState {
                labels: BTreeMap::new(),
                watermark: d.watermark,
                last_seen: d.last_seen,
                history: VecDeque::from([(d.watermark, d.last_seen.unwrap_or(0))]),
            });
            state.labels = d.labels;
            next.insert(d.id, state);
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

    /// A committed instruction for `target` whose result was read at `position`, received
    /// at `now`.
    pub fn add(
        &mut self,
        id: &str,
        commit_lsn: i64,
        committed_at: i64,
        target: Option<Target>,
        position: ResultPosition,
        now: i64,
    ) {
        let key = (commit_lsn, id.to_string());
        self.arrivals.push_back((now, key.clone()));
        self.targets.insert(key.clone(), target.clone());
        let waiting = Waiting { position, committed_at, received: now, pending_sent: false };
        self.waiting.entry(target).or_default().insert(key, waiting);
    }

    pub fn is_waiting(&self, id: &str, commit_lsn: i64) -> bool {
        self.targets.contains_key(&(commit_lsn, id.to_string()))
    }

    pub fn waiting(&self) -> usize {
        self.targets.len()
    }

    /// The smallest watermark among the active devices; `None` without any.
    pub fn fleet_watermark(&self) -> Option<i64> {
        self.devices.values().map(|d| d.watermark).min()
    }

    /// Each active device: (id, watermark, last seen).
    pub fn devices(&self) -> impl Iterator<Item = (&str, i64, Option<i64>)> {
        self.devices.iter().map(|(id, d)| (id.as_str(), d.watermark, d.last_seen))
    }

    /// How long, at `now`, the first instruction (in commit order) that device `id` still
    /// misses of those targeting it has waited for it (0 when it misses none): its lag in
    /// time.
    pub fn lag_micros(&self, id: &str, now: i64) -> i64 {
        let Some(d) = self.devices.get(id) else { return 0 };
        let first_missed = self
            .waiting
            .iter()
            .filter(|(target, _)| target.as_ref().is_none_or(|t| t.selects(&d.labels)))
            .filter_map(|(_, waiting)| waiting.range((d.watermark + 1, String::new())..).next())
            .map(|(_, w)| w.received)
            .min();
        first_missed.map_or(0, |received| (now - received).max(0))
    }

    /// The devices `target` selects.
    fn selected<'a>(&'a self, target: &'a Option<Target>) -> impl Iterator<Item = (&'a String, &'a DeviceState)> + 'a {
        self.devices.iter().filter(move |(_, d)| target.as_ref().is_none_or(|t| t.selects(&d.labels)))
    }

    /// The LSN `target`'s devices have reached (see the module documentation).
    fn reached(&self, target: &Option<Target>) -> Option<i64> {
        let mut watermarks: Vec<i64> = self.selected(target).map(|(_, d)| d.watermark).collect();
        let needed = needed(target, watermarks.len());
        if needed == 0 || watermarks.len() < needed {
            return None;
        }
        watermarks.sort_unstable_by(|a, b| b.cmp(a));
        Some(watermarks[needed - 1])
    }

    /// The confirmations due at `now`: the final `applied` of every waiting instruction its
    /// target has reached, and a `pending` for each that passed its deadline without.
    pub fn due(&mut self, now: i64) -> Vec<Due> {
        let mut out = Vec::new();
        let reached: Vec<(Option<Target>, i64)> =
            self.waiting.keys().filter_map(|t| self.reached(t).map(|lsn| (t.clone(), lsn))).collect();
        for (target, lsn) in reached {
            let mut released = Vec::new();
            if let Some(waiting) = self.waiting.get_mut(&target) {
                while waiting.first_key_value().is_some_and(|(k, _)| k.0 <= lsn) {
                    released.extend(waiting.pop_first());
                }
            }
            for ((commit_lsn, id), w) in released {
                self.targets.remove(&(commit_lsn, id.clone()));
                out.push(Due { confirmation: self.applied(id, commit_lsn, &target, &w, now), position: Some(w.position) });
            }
        }
        self.waiting.retain(|_, w| !w.is_empty());
        let floor = self.waiting.values().filter_map(|w| w.first_key_value().map(|(k, _)| k.0)).min();
        if let Some(floor) = floor.or_else(|| self.fleet_watermark()) {
            self.forget_history_below(floor);
        }
        while let Some((received, _)) = self.arrivals.front() {
            if received + self.deadline_micros > now {
                break;
            }
            let (_, key) = self.arrivals.pop_front().unwrap_or_default();
            if let Some(due) = self.pending(key, now) {
                out.push(due);
            }
        }
        out
    }

    /// The `pending` of an instruction at its deadline, unless it is confirmed or reported
    /// already (most instructions are confirmed before their deadline: nothing to say).
    fn pending(&mut self, key: Key, now: i64) -> Option<Due> {
        let target = self.targets.get(&key)?.clone();
        let w = self.waiting.get_mut(&target)?.get_mut(&key).filter(|w| !w.pending_sent)?;
        w.pending_sent = true;
        let committed_at = w.committed_at;
        let missing = self.missing(&target, key.0);
        Some(Due {
            confirmation: Confirmation {
                instruction_id: key.1,
                status: ConfirmationStatus::Pending,
                commit_lsn: key.0,
                devices: self.selected(&target).count() as i32,
                missing,
                slowest_device: None,
                last_applied_at: None,
                committed_at,
                confirmed_at: now,
            },
            position: None,
        })
    }

    fn applied(&self, id: String, commit_lsn: i64, target: &Option<Target>, w: &Waiting, now: i64) -> Confirmation {
        // When each device reached the commit, in order; the device that completed the
        // target is the last one needed.
        let mut reached: Vec<(i64, &String)> = self
            .selected(target)
            .filter(|(_, d)| d.watermark >= commit_lsn)
            .map(|(device, d)| (d.reached(commit_lsn).unwrap_or(w.received).max(w.received), device))
            .collect();
        reached.sort();
        let needed = needed(target, self.selected(target).count());
        let last = reached.get(needed.saturating_sub(1)).or(reached.last());
        Confirmation {
            instruction_id: id,
            status: ConfirmationStatus::Applied,
            commit_lsn,
            devices: reached.len() as i32,
            missing: Vec::new(),
            slowest_device: last.map(|(_, d)| (*d).clone()),
            last_applied_at: last.map(|(at, _)| *at),
            committed_at: w.committed_at,
            confirmed_at: now,
        }
    }

    fn missing(&self, target: &Option<Target>, commit_lsn: i64) -> Vec<MissingDevice> {
        self.selected(target)
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

/// How many of the `selected` devices `target` needs: all, or its `at_least`.
fn needed(target: &Option<Target>, selected: usize) -> usize {
    target.as_ref().and_then(|t| t.at_least).map_or(selected, |k| k.max(1) as usize)
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
        t.set_fleet(ids.iter().map(|id| ActiveDevice { id: id.to_string(), ..Default::default() }));
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
        t.add("i1", 100, 0, None, (0, 0), 1);
        t.add("i2", 200, 0, None, (1, 0), 1);
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
        t.add("i3", 400, 0, None, (0, 1), 20);
        t.ack("a", 400, 21);
        assert_eq!((t.lag_micros("c", 25), t.lag_micros("a", 25)), (5, 0), "c at 300 misses i3, received at 20");
    }

    #[test]
    fn a_late_old_acknowledgement_moves_nothing_back() {
        let mut t = Tracker::new(30 * SEC);
        fleet(&mut t, &["a"]);
        t.ack("a", 500, 1);
        t.ack("a", 100, 2);
        t.add("i", 400, 0, None, (0, 0), 3);
        assert_eq!(finals(&t.due(3)).len(), 1);
        assert_eq!(t.fleet_watermark(), Some(500));
    }

    #[test]
    fn a_missing_device_is_named_after_the_deadline_and_retiring_it_releases_the_instruction() {
        let mut t = Tracker::new(30 * SEC);
        fleet(&mut t, &["a", "b"]);
        t.add("i", 100, 0, None, (0, 7), 0);
        t.ack("a", 100, SEC);
        assert!(t.due(29 * SEC).is_empty());
        let due = t.due(30 * SEC);
        assert_eq!(due.len(), 1);
        let c = &due[0].confirmation;
        assert_eq!(c.status, ConfirmationStatus::Pending);
        assert_eq!(c.missing.iter().map(|m| (m.device_id.as_str(), m.lag_bytes)).collect::<Vec<_>>(), vec![("b", 100)]);
        assert!(t.due(60 * SEC).is_empty(), "one pending notice");
        t.set_fleet([ActiveDevice { id: "a".into(), ..Default::default() }]);
        assert_eq!(finals(&t.due(61 * SEC)), vec![("i", Some("a"))]);
    }

    #[test]
    fn without_active_devices_nothing_is_confirmed_applied() {
        let mut t = Tracker::new(SEC);
        t.add("i", 1, 0, None, (0, 0), 0);
        let due = t.due(2 * SEC);
        assert_eq!(due.len(), 1);
        assert_eq!((due[0].confirmation.status, due[0].confirmation.devices), (ConfirmationStatus::Pending, 0));
    }

    #[test]
    fn acknowledgements_of_devices_outside_the_fleet_count_for_nothing() {
        let mut t = Tracker::new(SEC);
        fleet(&mut t, &["a"]);
        t.ack("intruder", 1_000, 1);
        t.add("i", 10, 0, None, (0, 0), 1);
        assert!(finals(&t.due(2)).is_empty());
        assert_eq!(t.devices().map(|d| d.0).collect::<Vec<_>>(), ["a"]);
    }

    fn labelled(id: &str, site: &str) -> ActiveDevice {
        ActiveDevice { id: id.into(), labels: [("site".to_string(), site.to_string())].into(), ..Default::default() }
    }

    fn target(site: Option<&str>, at_least: Option<i32>) -> Option<Target> {
        Some(Target { labels: site.map(|s| ("site".to_string(), s.to_string())).into_iter().collect(), at_least })
    }

    #[test]
    fn a_label_selector_waits_for_the_devices_it_selects_only() {
        let mut t = Tracker::new(30 * SEC);
        t.set_fleet([labelled("a", "berlin"), labelled("b", "berlin"), labelled("c", "paris")]);
        t.add("berlin", 100, 0, target(Some("berlin"), None), (0, 0), 1);
        t.add("everyone", 150, 0, None, (0, 1), 1);
        t.ack("a", 200, 2);
        t.ack("b", 200, 3);
        let due = t.due(4);
        assert_eq!(finals(&due), vec![("berlin", Some("b"))], "c, in paris, is not waited for; everyone waits for c");
        assert_eq!(due[0].confirmation.devices, 2);
        assert_eq!((t.lag_micros("c", 10), t.lag_micros("a", 10)), (9, 0), "c misses only what targets it");
        t.ack("c", 150, 11);
        assert_eq!(finals(&t.due(12)), vec![("everyone", Some("c"))]);
    }

    #[test]
    fn a_quorum_is_applied_when_enough_devices_have_it_and_names_the_one_that_completed_it() {
        let mut t = Tracker::new(30 * SEC);
        fleet(&mut t, &["a", "b", "c"]);
        t.add("two", 100, 0, target(None, Some(2)), (0, 0), 1);
        t.ack("a", 100, 2);
        assert!(finals(&t.due(3)).is_empty(), "one of two");
        t.ack("c", 120, 4);
        t.ack("b", 130, 5);
        let due = t.due(6);
        assert_eq!(finals(&due), vec![("two", Some("c"))], "c was the second to have it");
        assert_eq!((due[0].confirmation.devices, due[0].confirmation.last_applied_at), (3, Some(4)));
    }

    #[test]
    fn a_target_with_too_few_devices_stays_pending_until_the_fleet_has_them() {
        let mut t = Tracker::new(SEC);
        t.set_fleet([labelled("a", "berlin")]);
        t.ack("a", 500, 1);
        t.add("rome", 100, 0, target(Some("rome"), None), (0, 0), 1);
        t.add("three", 100, 0, target(None, Some(3)), (0, 1), 1);
        let due = t.due(2 * SEC);
        let pending: Vec<(&str, i32)> =
            due.iter().map(|d| (d.confirmation.instruction_id.as_str(), d.confirmation.devices)).collect();
        assert!(due.iter().all(|d| d.confirmation.status == ConfirmationStatus::Pending), "{due:?}");
        assert_eq!(pending, vec![("rome", 0), ("three", 1)]);
        // a is re-labelled rome; two more devices join.
        t.set_fleet([labelled("a", "rome"), labelled("b", "x"), labelled("c", "y")]);
        assert_eq!(finals(&t.due(3 * SEC)), vec![("rome", Some("a"))]);
        t.ack("b", 100, 3 * SEC);
        t.ack("c", 100, 3 * SEC);
        assert_eq!(finals(&t.due(4 * SEC)).len(), 1, "three of three");
        assert_eq!(t.waiting(), 0);
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

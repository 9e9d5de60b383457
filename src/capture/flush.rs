//! Which LSN capture may report to PostgreSQL as flushed.
//!
//! Transactions are tracked in commit order, each with the number of its deltas Kafka has
//! not acknowledged yet. The flush LSN advances to a transaction's end LSN only when that
//! transaction and every earlier one are committed *and* fully acknowledged. PostgreSQL
//! therefore never discards WAL whose changes are not safely in Kafka; after a crash it
//! re-sends from the last reported point, so Kafka may hold a delta twice, never zero
//! times.

use std::collections::VecDeque;

pub type Lsn = u64;

/// Identifies a transaction inside the tracker. Handles are never reused, not even across
/// [`FlushLsnTracker::restart`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxHandle(u64);

// A handle travels with each record as librdkafka's pointer-sized opaque value.
const _: () = assert!(usize::BITS >= u64::BITS, "capture needs a 64-bit target");

impl TxHandle {
    /// The handle as a record's delivery opaque value.
    pub fn to_opaque(self) -> usize {
        self.0 as usize
    }

    /// The handle a record's delivery opaque value carries.
    pub fn from_opaque(opaque: usize) -> TxHandle {
        TxHandle(opaque as u64)
    }
}

#[derive(Debug)]
struct TxSlot {
    end_lsn: Option<Lsn>,
    /// The commit LSN its deltas carry, for naming it in an error.
    position: Lsn,
    outstanding: u64,
    began: std::time::Instant,
}

#[derive(Debug)]
pub struct FlushLsnTracker {
    txs: VecDeque<TxSlot>,
    first: u64,
    flushed: Lsn,
    /// Sum of the transactions' `outstanding`.
    in_flight: u64,
}

impl FlushLsnTracker {
    /// Starts from the slot's confirmed position.
    pub fn new(confirmed: Lsn) -> Self {
        FlushLsnTracker { txs: VecDeque::new(), first: 0, flushed: confirmed, in_flight: 0 }
    }

    /// Starts over from `confirmed` (a new replication session), forgetting every
    /// transaction. New handles continue after the ones given so far, so a handle of an
    /// earlier session names nothing any more: its late acknowledgement is ignored.
    pub fn restart(&mut self, confirmed: Lsn) {
        self.first += self.txs.len() as u64;
        self.txs.clear();
        self.flushed = confirmed;
        self.in_flight = 0;
    }

    /// Whether `tx` is a transaction still tracked: false for one flushed already, and for
    /// one of an earlier session (before [`restart`](Self::restart)).
    pub fn tracks(&self, tx: TxHandle) -> bool {
        self.index(tx).is_some()
    }

    /// A transaction began (its deltas follow).
    pub fn begin(&mut self) -> TxHandle {
        self.txs.push_back(TxSlot { end_lsn: None, position: 0, outstanding: 0, began: std::time::Instant::now() });
        TxHandle(self.first + self.txs.len() as u64 - 1)
    }

    fn index(&self, tx: TxHandle) -> Option<usize> {
        let i = usize::try_from(tx.0.checked_sub(self.first)?).ok()?;
        (i < self.txs.len()).then_some(i)
    }

    fn slot(&mut self, tx: TxHandle) -> Option<&mut TxSlot> {
        let i = self.index(tx)?;
        self.txs.get_mut(i)
    }

    /// A delta of `tx` was handed to the producer.
    pub fn sent(&mut self, tx: TxHandle) {
        if let Some(s) = self.slot(tx) {
            s.outstanding += 1;
            self.in_flight += 1;
        }
    }

    /// The deltas of `tx` carry commit LSN `lsn` (see [`position`](Self::position)).
    pub fn note_position(&mut self, tx: TxHandle, lsn: Lsn) {
        if let Some(s) = self.slot(tx) {
            s.position = lsn;
        }
    }

    /// The commit LSN noted for `tx`, while it is tracked.
    pub fn position(&self, tx: TxHandle) -> Option<Lsn> {
        self.txs.get(self.index(tx)?).map(|s| s.position)
    }

    /// Kafka acknowledged a delta of `tx`.
    pub fn acknowledged(&mut self, tx: TxHandle) {
        self.acknowledged_records(tx, 1);
    }

    /// Kafka acknowledged `records` deltas of `tx`.
    pub fn acknowledged_records(&mut self, tx: TxHandle, records: u64) {
        if let Some(s) = self.slot(tx) {
            let n = records.min(s.outstanding);
            s.outstanding -= n;
            self.in_flight -= n;
        }
        self.advance();
    }

    /// `tx` committed; its commit record ends at `end_lsn`.
    pub fn committed(&mut self, tx: TxHandle, end_lsn: Lsn) {
        if let Some(s) = self.slot(tx) {
            s.end_lsn = Some(end_lsn);
        }
        self.advance();
    }

    fn advance(&mut self) {
        while let Some(front) = self.txs.front() {
            match front.end_lsn {
                Some(end) if front.outstanding == 0 => {
                    self.flushed = self.flushed.max(end);
                    self.txs.pop_front();
                    self.first += 1;
                }
                _ => break,
            }
        }
    }

    /// The server has decoded and sent everything before `lsn` (a keepalive outside any
    /// transaction). If every delta sent so far is acknowledged, nothing published lies
    /// below `lsn` unacknowledged, so the slot may move there: this keeps it advancing
    /// while only unpublished tables are written.
    pub fn idle_at(&mut self, lsn: Lsn) {
        if self.txs.is_empty() {
            self.flushed = self.flushed.max(lsn);
        }
    }

    /// The LSN up to which everything is in Kafka.
    pub fn flushed(&self) -> Lsn {
        self.flushed
    }

    /// How long the oldest transaction not yet flushed has been waiting (zero when none).
    pub fn oldest_pending_age(&self) -> std::time::Duration {
        self.txs.front().map(|t| t.began.elapsed()).unwrap_or_default()
    }

    /// Deltas handed to the producer and not yet acknowledged.
    pub fn in_flight(&self) -> u64 {
        self.in_flight
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn advances_only_past_fully_acknowledged_prefixes() {
        let mut t = FlushLsnTracker::new(10);
        let a = t.begin();
        t.sent(a);
        t.sent(a);
        t.committed(a, 100);
        let b = t.begin();
        t.sent(b);
        t.committed(b, 200);
        t.acknowledged(b);
        assert_eq!(t.flushed(), 10, "b is acknowledged but a is not");
        t.acknowledged(a);
        assert_eq!(t.flushed(), 10);
        t.acknowledged(a);
        assert_eq!(t.flushed(), 200);
        let c = t.begin();
        assert_eq!(t.flushed(), 200, "an open transaction holds nothing back yet");
        t.committed(c, 300);
        assert_eq!(t.flushed(), 300, "an empty transaction flushes at commit");
    }

    #[test]
    fn idle_positions_move_the_slot_only_when_nothing_is_pending() {
        let mut t = FlushLsnTracker::new(10);
        t.idle_at(50);
        assert_eq!(t.flushed(), 50);
        let a = t.begin();
        t.sent(a);
        t.committed(a, 60);
        t.idle_at(90);
        assert_eq!(t.flushed(), 50, "a delta below 90 is not acknowledged yet");
        t.acknowledged(a);
        assert_eq!(t.flushed(), 60);
        t.idle_at(90);
        assert_eq!(t.flushed(), 90);
    }

    #[test]
    fn a_restart_forgets_the_earlier_session() {
        let mut t = FlushLsnTracker::new(10);
        let a = t.begin();
        t.sent(a);
        t.sent(a);
        t.committed(a, 100);
        assert_eq!(t.in_flight(), 2);
        t.restart(50);
        assert!(!t.tracks(a));
        assert_eq!((t.flushed(), t.in_flight()), (50, 0));
        let b = t.begin();
        assert_ne!(a, b, "handles are not reused");
        t.sent(b);
        t.committed(b, 200);
        t.acknowledged(a); // late, of the earlier session
        assert_eq!((t.flushed(), t.in_flight()), (50, 1), "an earlier session's acknowledgement moves nothing");
        t.acknowledged_records(b, 5);
        assert_eq!((t.flushed(), t.in_flight()), (200, 0), "never more than were sent");
        assert!(!t.tracks(b), "flushed");
        assert_eq!(TxHandle::from_opaque(b.to_opaque()), b);
    }

    proptest! {
        /// Whatever the order of acknowledgements, the flush LSN never passes a transaction
        /// with an unacknowledged delta, and reaches the last commit once all are in.
        #[test]
        fn never_passes_an_unacknowledged_delta(sizes in prop::collection::vec(0u8..4, 1..12), seed in any::<u64>()) {
            let mut t = FlushLsnTracker::new(0);
            let mut pending = Vec::new();
            let mut ends = Vec::new();
            for (i, n) in sizes.iter().enumerate() {
                let h = t.begin();
                for _ in 0..*n { t.sent(h); pending.push((i, h)); }
                let end = (i as u64 + 1) * 100;
                t.committed(h, end);
                ends.push(end);
            }
            let mut rng = seed;
            while !pending.is_empty() {
                rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let k = (rng >> 33) as usize % pending.len();
                let (_, h) = pending.swap_remove(k);
                t.acknowledged(h);
                prop_assert_eq!(t.in_flight(), pending.len() as u64);
                if let Some(oldest) = pending.iter().map(|(i, _)| *i).min() {
                    prop_assert!(t.flushed() < ends[oldest]);
                }
            }
            prop_assert_eq!(t.flushed(), *ends.last().unwrap());
        }
    }
}

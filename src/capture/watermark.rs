//! Watermarks: the promise, to every device, that every transaction committed at or before
//! an LSN has all its deltas ahead of the watermark in each partition.
//!
//! Why the promise holds: the candidate moves only past transactions whose deltas were all
//! handed to the producer (a commit, or a keepalive or heartbeat with no transaction
//! open), and what is sent is the candidate only as far as the flush position, below which
//! Kafka has acknowledged every delta. A delivery that failed holds the flush position, so
//! no watermark — and no confirmation a device derives from one — passes a change that no
//! device has.

use super::error::CaptureError;
use super::flush::Lsn;
use super::publisher::Publisher;
use crate::contract::{Delta, DeltaOp};

/// The newest LSN below which every committed transaction has been handed to the producer
/// (`candidate`), and the last one sent to the partitions.
pub(super) struct Watermark {
    candidate: Lsn,
    sent: Lsn,
}

impl Watermark {
    /// Starts at the slot's confirmed position: everything before it was published by an
    /// earlier session.
    pub(super) fn new(confirmed: Lsn) -> Watermark {
        Watermark { candidate: confirmed, sent: confirmed }
    }

    /// Every transaction committed before `lsn` has been handed to the producer.
    pub(super) fn passed(&mut self, lsn: Lsn) {
        self.candidate = self.candidate.max(lsn);
    }

    /// Sends a watermark when it can move: to the candidate, but never past `flushed`, the
    /// position up to which Kafka has acknowledged every delta.
    pub(super) async fn send_due(&mut self, publisher: &mut Publisher) -> Result<(), CaptureError> {
        let due = self.candidate.min(publisher.tracker().flushed());
        if due > self.sent {
            send(publisher, due).await?;
            self.sent = due;
        }
        Ok(())
    }
}

/// Sends a watermark delta for `lsn` to every partition.
async fn send(publisher: &mut Publisher, lsn: Lsn) -> Result<(), CaptureError> {
    let lsn_i64 = i64::try_from(lsn).unwrap_or(i64::MAX);
    let delta = Delta {
        table: String::new(),
        op: DeltaOp::Watermark,
        key: Vec::new(),
        after: None,
        old_key: None,
        commit_lsn: lsn_i64,
        lsn: lsn_i64,
        xid: 0,
        commit_ts: crate::contract::now_micros(),
        seq: 0,
        instruction_id: None,
    };
    // Tracked like a transaction that moves nothing: the flush LSN waits for it only
    // through the transactions before it.
    let tx = publisher.begin();
    for partition in 0..publisher.partitions() {
        publisher.send(&delta, Some(partition), tx).await?;
    }
    publisher.committed(tx, 0);
    metrics::gauge!("pgfanout_capture_watermark_lsn").set(lsn as f64);
    Ok(())
}

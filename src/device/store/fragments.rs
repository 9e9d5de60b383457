//! Reassembling deltas that capture sent as fragments ([`crate::contract::fragment`]).
//!
//! Guarantees and why they hold:
//! - *Never a partial row.* A fragment is only staged, in `_pgfanout_fragments`, in the same
//!   SQLite transaction as the offset that consumed it. The delta is applied only when its
//!   last fragment arrives and every slice of the same version `(commit_lsn, seq)` is
//!   staged with the expected total length; then the reassembled bytes are decoded and
//!   applied exactly as a delta that came whole (same checks, same version rule).
//! - *Bounded memory.* Fragments wait in the store, not in memory; only a complete delta
//!   is read back, once, to be applied.
//! - *A restart mid-delta ends right.* Staged fragments and offsets commit together, so
//!   after a crash the device resumes at the first fragment it has not staged, with the
//!   earlier ones still there. A capture that restarts mid-delta sends the whole delta
//!   again: its slices replace the staged ones of the same version and index.
//! - *Compaction keeps a row's newest version whole.* Each fragment has a key of its own
//!   (the last one the row's key), so a compacted topic keeps every slice of the row's
//!   newest version, in order. It may also keep slices of an older version that no newer
//!   one overwrote: they form a set whose last fragment never comes. Fragments of one
//!   delta are consecutive in their partition, so when a last fragment arrives its set is
//!   complete or never will be: an incomplete set is dropped, not applied, and the row
//!   keeps what an older or newer complete version gave it.
//! - *Nothing stays staged for ever.* A watermark `W` in a partition follows every delta of
//!   every transaction committed before `W`, with all its fragments: a set of such a
//!   delta still incomplete at `W` can no longer complete, and is dropped.

use rusqlite::{params, Connection, OptionalExtension};

use crate::contract::codec::decode_delta_view;
use crate::contract::fragment::FragmentHeader;
use crate::contract::view::DeltaView;

/// The staging table, created with the store's own tables.
pub(super) const FRAGMENTS_SQL: &str = "CREATE TABLE IF NOT EXISTS _pgfanout_fragments (
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    commit_lsn INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    count INTEGER NOT NULL,
    total_len INTEGER NOT NULL,
    bytes BLOB NOT NULL,
    PRIMARY KEY (topic, partition, commit_lsn, seq, idx)
)";

/// A fragment record: its header and its slice of the delta's encoding.
#[derive(Debug, Clone, Copy)]
pub struct Fragment<'a> {
    pub header: FragmentHeader,
    pub bytes: &'a [u8],
}

/// Stages `fragment` of `partition`; on the last one of a complete set, takes the whole
/// delta's encoding off the stage and returns it. Counts in `staged` each fragment that
/// applies nothing (staged, or the last one of an incomplete set, which is dropped).
pub(super) fn stage(
    tx: &Connection,
    topic: &str,
    partition: i32,
    fragment: &Fragment<'_>,
    staged: &mut u64,
) -> Result<Option<Vec<u8>>, rusqlite::Error> {
    let whole = stage_inner(tx, topic, partition, fragment)?;
    if whole.is_none() {
        *staged += 1;
    }
    Ok(whole)
}

fn stage_inner(
    tx: &Connection,
    topic: &str,
    partition: i32,
    fragment: &Fragment<'_>,
) -> Result<Option<Vec<u8>>, rusqlite::Error> {
    let h = fragment.header;
    if h.count == 1 {
        return Ok((fragment.bytes.len() as u64 == h.total_len).then(|| fragment.bytes.to_vec()));
    }
    if !h.is_last() {
        tx.prepare_cached(
            "INSERT OR REPLACE INTO _pgfanout_fragments (topic, partition, commit_lsn, seq, idx, count, total_len, bytes)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )?
        .execute(params![
            topic,
            partition,
            h.commit_lsn,
            h.seq,
            h.index,
            h.count,
            h.total_len as i64,
            fragment.bytes
        ])?;
        return Ok(None);
    }
    let set = params![topic, partition, h.commit_lsn, h.seq, h.count, h.total_len as i64];
    let staged: Option<(i64, i64)> = tx
        .prepare_cached(
            "SELECT count(*), coalesce(sum(length(bytes)), 0) FROM _pgfanout_fragments
              WHERE topic = ?1 AND partition = ?2 AND commit_lsn = ?3 AND seq = ?4 AND count = ?5 AND total_len = ?6
                AND idx < ?5",
        )?
        .query_row(set, |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let (pieces, len) = staged.unwrap_or((0, 0));
    let expected_len = h.total_len.checked_sub(fragment.bytes.len() as u64);
    let complete = pieces == i64::from(h.count - 1) && expected_len == u64::try_from(len).ok();
    let mut whole = Vec::new();
    if complete {
        whole.reserve_exact(usize::try_from(h.total_len).unwrap_or(0));
        let mut read = tx.prepare_cached(
            "SELECT bytes FROM _pgfanout_fragments
              WHERE topic = ?1 AND partition = ?2 AND commit_lsn = ?3 AND seq = ?4 AND count = ?5 AND total_len = ?6
                AND idx < ?5 ORDER BY idx",
        )?;
        let mut rows = read.query(set)?;
        while let Some(row) = rows.next()? {
            if let rusqlite::types::ValueRef::Blob(piece) = row.get_ref(0)? {
                whole.extend_from_slice(piece);
            }
        }
        whole.extend_from_slice(fragment.bytes);
    }
    tx.prepare_cached("DELETE FROM _pgfanout_fragments WHERE topic = ?1 AND partition = ?2 AND commit_lsn = ?3 AND seq = ?4")?
        .execute(params![topic, partition, h.commit_lsn, h.seq])?;
    Ok(complete.then_some(whole))
}

/// The delta of a complete set, decoded as one that came whole.
pub(super) fn decoded(whole: &[u8]) -> Result<Option<DeltaView<'_>>, String> {
    decode_delta_view(whole).map(Some).map_err(|e| format!("reassembled fragments: {e}"))
}

/// Drops the staged fragments that a batch's watermarks passed (see the module doc), per
/// `(partition, _, highest watermark)`; a watermark of 0 passes nothing.
pub(super) fn discard_passed(tx: &Connection, topic: &str, watermarks: &[(i32, i64, i64)]) -> Result<(), rusqlite::Error> {
    for (partition, _, watermark) in watermarks.iter().filter(|w| w.2 > 0) {
        tx.prepare_cached("DELETE FROM _pgfanout_fragments WHERE topic = ?1 AND partition = ?2 AND commit_lsn < ?3")?
            .execute(params![topic, partition, watermark])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::{Record, Store};
    use super::*;
    use crate::contract::fragment::{encode_bounded, encode_window, fragment_count};
    use crate::contract::{Column, Delta, DeltaOp, Value};

    fn big(commit_lsn: i64, fill: u8, len: usize) -> Delta {
        let c = |name: &str, type_name: &str, value| Column {
            name: name.into(),
            type_name: type_name.into(),
            value,
            unchanged: false,
        };
        Delta {
            table: "public.blobs".into(),
            op: DeltaOp::Insert,
            key: vec![c("id", "int8", Value::Long(1))],
            after: Some(vec![c("id", "int8", Value::Long(1)), c("body", "bytea", Value::Bytes(vec![fill; len]))]),
            old_key: None,
            commit_lsn,
            lsn: commit_lsn - 10,
            xid: 7,
            commit_ts: 0,
            seq: 0,
            instruction_id: None,
        }
    }

    /// The fragments of `d` at `size` bytes each: (header, bytes).
    fn fragments_of(d: &Delta, size: usize) -> Vec<(FragmentHeader, Vec<u8>)> {
        let mut buf = Vec::new();
        let len = encode_bounded(d, size, &mut buf);
        let count = fragment_count(len, size);
        (0..count)
            .map(|i| {
                encode_window(d, i * size, (i + 1) * size, &mut buf);
                let header = FragmentHeader {
                    commit_lsn: d.commit_lsn,
                    seq: d.seq,
                    index: i as u32,
                    count: count as u32,
                    total_len: len as u64,
                };
                (header, buf.clone())
            })
            .collect()
    }

    fn records(pieces: &[(FragmentHeader, Vec<u8>)], first_offset: i64) -> Vec<Record<'_>> {
        pieces
            .iter()
            .enumerate()
            .map(|(i, (header, bytes))| Record {
                partition: 0,
                offset: first_offset + i as i64,
                delta: Ok(None),
                tombstone: false,
                fragment: Some(Fragment { header: *header, bytes }),
                encoded: None,
            })
            .collect()
    }

    fn temp_store(tag: &str) -> std::path::PathBuf {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        std::env::temp_dir().join(format!("pgfanout-fragments-{}-{tag}-{nanos}.sqlite", std::process::id()))
    }

    fn body(store: &Store) -> Option<Vec<u8>> {
        let sql = "SELECT body FROM \"public.blobs\" WHERE id = 1 AND _pgfanout_deleted = 0";
        store.connection().query_row(sql, [], |r| r.get(0)).ok()
    }

    fn staged(store: &Store) -> i64 {
        store.connection().query_row("SELECT count(*) FROM _pgfanout_fragments", [], |r| r.get(0)).unwrap()
    }

    #[test]
    fn a_restart_between_fragments_still_applies_the_whole_row_once() {
        let path = temp_store("restart");
        let d = big(1000, 0xab, 10_000);
        let pieces = fragments_of(&d, 1024);
        assert_eq!(pieces.len(), 10);
        let all = records(&pieces, 0);
        // The watermark after the row: its delta applies once complete and passed.
        let w = Delta { table: String::new(), op: DeltaOp::Watermark, key: vec![], after: None, ..big(1001, 0, 0) };
        {
            let mut store = Store::open(&path).unwrap();
            store.apply_batch("t", &all[..4]).unwrap();
            assert_eq!(body(&store), None, "never a partial row");
            assert_eq!(staged(&store), 4);
        }
        // Reopened: resumes at the stored offset, with the staged fragments.
        let mut store = Store::open(&path).unwrap();
        let next = store.offsets("t").unwrap()[&0] as usize;
        assert_eq!(next, 4);
        store.apply_batch("t", &all[next..7]).unwrap();
        assert_eq!(body(&store), None);
        let mut last = records(&pieces[7..], 7);
        last.push(Record {
            partition: 0,
            offset: 10,
            delta: Ok(Some(w.view())),
            tombstone: false,
            fragment: None,
            encoded: None,
        });
        let stats = store.apply_batch("t", &last).unwrap();
        assert_eq!(stats.applied, 1, "{stats:?}");
        assert_eq!(body(&store), Some(vec![0xab; 10_000]));
        assert_eq!(staged(&store), 0, "nothing left on the stage");
        // Capture sent the whole delta again (it restarted): nothing changes.
        let again = records(&pieces, 11);
        let stats = store.apply_batch("t", &again).unwrap();
        assert_eq!((stats.applied, stats.skipped_older), (0, 1));
    }

    #[test]
    fn an_incomplete_set_is_never_applied_and_never_kept() {
        let mut store = Store::open(&temp_store("incomplete")).unwrap();
        let pieces = fragments_of(&big(1000, 1, 5000), 1024);
        // Compaction kept only the last fragment.
        let stats = store.apply_batch("t", &records(&pieces[4..], 0)).unwrap();
        assert_eq!((stats.applied, stats.rejected, stats.fragments), (0, 0, 1));
        assert_eq!(body(&store), None);
        assert_eq!(staged(&store), 0);
        // A set whose last fragment never comes is dropped at the watermark past it.
        store.apply_batch("t", &records(&pieces[..3], 1)).unwrap();
        assert_eq!(staged(&store), 3);
        let w = |commit_lsn| Delta {
            table: String::new(),
            op: DeltaOp::Watermark,
            key: vec![],
            after: None,
            ..big(commit_lsn, 0, 0)
        };
        let (w1, w2) = (w(1000), w(1001));
        fn at(d: &Delta, offset: i64) -> Record<'_> {
            Record { partition: 0, offset, delta: Ok(Some(d.view())), tombstone: false, fragment: None, encoded: None }
        }
        store.apply_batch("t", &[at(&w1, 8)]).unwrap();
        assert_eq!(staged(&store), 3, "a watermark at the commit itself does not pass it");
        store.apply_batch("t", &[at(&w2, 9)]).unwrap();
        assert_eq!(staged(&store), 0);
        // Slices of two versions do not mix: the newer complete set is the row (once a
        // watermark passed it).
        let newer = fragments_of(&big(2000, 2, 5000), 1024);
        store.apply_batch("t", &records(&pieces[..4], 10)).unwrap();
        store.apply_batch("t", &records(&newer, 20)).unwrap();
        let w3 = w(2001);
        store.apply_batch("t", &[at(&w3, 29)]).unwrap();
        assert_eq!(body(&store), Some(vec![2; 5000]));
        store.apply_batch("t", &records(&pieces[4..], 30)).unwrap();
        assert_eq!(body(&store), Some(vec![2; 5000]), "the older set completes but is older");
    }
}

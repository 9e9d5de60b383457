use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;
use crate::contract::{Column, Delta, DeltaOp, Value};

/// One change in WAL order: a row written (`Some(v)`), deleted (`None`), or the table
/// truncated.
#[derive(Debug, Clone)]
enum Change {
    Write(i64, Option<i64>),
    Truncate,
}

fn column(name: &str, value: Value) -> Column {
    Column { name: name.into(), type_name: "int8".into(), value, unchanged: false }
}

/// Deltas of the changes, with versions in WAL order (several changes per transaction).
fn deltas(changes: &[(Change, bool)]) -> Vec<Delta> {
    let mut out = Vec::new();
    let (mut lsn, mut seq) = (100i64, 0i64);
    for (change, new_tx) in changes {
        if *new_tx {
            lsn += 100;
            seq = 0;
        }
        let base = Delta {
            table: "public.t".into(),
            op: DeltaOp::Truncate,
            key: vec![],
            after: None,
            old_key: None,
            commit_lsn: lsn,
            lsn: lsn - 50 + seq,
            xid: lsn,
            commit_ts: 0,
            seq,
            instruction_id: None,
        };
        out.push(match change {
            Change::Truncate => base,
            Change::Write(id, Some(v)) => Delta {
                op: DeltaOp::Update,
                key: vec![column("id", Value::Long(*id))],
                after: Some(vec![column("id", Value::Long(*id)), column("v", Value::Long(*v))]),
                ..base
            },
            Change::Write(id, None) => Delta { op: DeltaOp::Delete, key: vec![column("id", Value::Long(*id))], ..base },
        });
        seq += 1;
    }
    out
}

/// The table after applying the changes in WAL order.
fn expected(changes: &[(Change, bool)]) -> BTreeMap<i64, i64> {
    let mut rows = BTreeMap::new();
    for (change, _) in changes {
        match change {
            Change::Write(id, Some(v)) => {
                rows.insert(*id, *v);
            }
            Change::Write(id, None) => {
                rows.remove(id);
            }
            Change::Truncate => rows.clear(),
        }
    }
    rows
}

const PARTITIONS: i32 = 3;

/// Where capture puts a delta: a row's partition by its key; a truncate in every partition.
fn partitions_of(delta: &Delta) -> Vec<i32> {
    match delta.key.first().map(|c| &c.value) {
        Some(Value::Long(id)) => vec![(*id % i64::from(PARTITIONS)) as i32],
        _ => (0..PARTITIONS).collect(),
    }
}

fn temp_store(tag: u64) -> std::path::PathBuf {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    std::env::temp_dir().join(format!("pgfanout-store-prop-{}-{tag}-{nanos}.sqlite", std::process::id()))
}

fn live_rows(store: &Store) -> BTreeMap<i64, i64> {
    live_rows_in(store.connection())
}

/// The rows a reader of the store sees, through its own connection.
fn seen_by_reader(path: &std::path::Path) -> BTreeMap<i64, i64> {
    live_rows_in(&rusqlite::Connection::open(path).unwrap())
}

fn live_rows_in(conn: &rusqlite::Connection) -> BTreeMap<i64, i64> {
    let exists: i64 = conn.query_row("SELECT count(*) FROM sqlite_master WHERE name = 'public.t'", [], |r| r.get(0)).unwrap();
    if exists == 0 {
        return BTreeMap::new();
    }
    let has_v: i64 =
        conn.query_row("SELECT count(*) FROM pragma_table_info('public.t') WHERE name = 'v'", [], |r| r.get(0)).unwrap();
    if has_v == 0 {
        // Only deletes reached the table so far: it may hold tombstones, nothing live.
        let live: i64 =
            conn.query_row("SELECT count(*) FROM \"public.t\" WHERE _pgfanout_deleted = 0", [], |r| r.get(0)).unwrap();
        assert_eq!(live, 0);
        return BTreeMap::new();
    }
    let mut stmt = conn.prepare("SELECT id, v FROM \"public.t\" WHERE _pgfanout_deleted = 0").unwrap();
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
    rows.collect::<Result<_, _>>().unwrap()
}

fn change() -> impl Strategy<Value = (Change, bool)> {
    let write = (0i64..6, prop::option::weighted(0.75, 0i64..100)).prop_map(|(id, v)| Change::Write(id, v));
    (prop_oneof![12 => write, 1 => Just(Change::Truncate)], prop::bool::weighted(0.4))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Partitions interleaved at random, records delivered twice and partitions replayed
    /// from the start, in batches of random sizes, with capture's watermarks after each
    /// transaction: after every batch the store holds exactly the changes of the
    /// transactions below the cut (the least watermark over the partitions), applied in
    /// WAL order — never part of a transaction — and in the end all of them. With nothing
    /// held in memory, transactions are applied in a SQLite transaction left open until
    /// the cut passes them: a reader then sees the transactions below an earlier cut.
    #[test]
    fn any_interleaving_with_duplicates_and_replays_shows_only_whole_transactions(
        changes in prop::collection::vec(change(), 1..40),
        seed in any::<u64>(),
        batch in 1usize..7,
        hold_nothing in any::<bool>(),
    ) {
        let all = deltas(&changes);
        let per_partition = with_watermarks(&all);
        // Interleave, duplicating and replaying on the way.
        let mut rng = seed | 1;
        let mut next = || { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; rng };
        let mut cursor = vec![0usize; PARTITIONS as usize];
        let mut replays_left = 2;
        let mut stream: Vec<(i32, &Delta)> = Vec::new();
        while cursor.iter().zip(&per_partition).any(|(c, p)| *c < p.len()) {
            let p = (next() % PARTITIONS as u64) as usize;
            if cursor[p] >= per_partition[p].len() {
                continue;
            }
            stream.push((p as i32, &per_partition[p][cursor[p]]));
            match next() % 10 {
                // An earlier record of this partition delivered again, late.
                0 => stream.push((p as i32, &per_partition[p][(next() % (cursor[p] as u64 + 1)) as usize])),
                1 if replays_left > 0 => {
                    replays_left -= 1;
                    cursor[p] = 0; // the partition is replayed from its beginning
                    continue;
                }
                _ => {}
            }
            cursor[p] += 1;
        }
        let path = temp_store(seed);
        let mut store = Store::open(&path).unwrap();
        store.set_partitions((0..PARTITIONS).collect());
        if hold_nothing {
            store.set_hold_bytes(0);
        }
        let whole_below = |cut: i64| {
            let whole: Vec<_> = changes.iter().zip(&all).filter(|(_, d)| d.commit_lsn < cut).map(|(c, _)| c.clone()).collect();
            expected(&whole)
        };
        let mut offset = 0i64;
        let mut seen = vec![0i64; PARTITIONS as usize];
        for chunk in stream.chunks(batch) {
            let records: Vec<Record> = chunk
                .iter()
                .map(|(p, d)| { offset += 1; Record { partition: *p, offset, delta: Ok(Some(d.view())), tombstone: false, fragment: None, encoded: None } })
                .collect();
            for (p, d) in chunk {
                if d.op == DeltaOp::Watermark {
                    seen[*p as usize] = seen[*p as usize].max(d.commit_lsn);
                }
            }
            store.apply_batch("t", &records).unwrap();
            let cut = seen.iter().copied().min().unwrap_or(0);
            let visible = seen_by_reader(&path);
            if hold_nothing {
                let earlier = all.iter().map(|d| d.commit_lsn + 1).chain([0, cut]).filter(|c| *c <= cut);
                prop_assert!(earlier.map(whole_below).any(|w| w == visible), "after a batch, below cut {}: {:?}", cut, visible);
            } else {
                prop_assert_eq!(visible, whole_below(cut), "after a batch, at cut {}", cut);
            }
        }
        let got = seen_by_reader(&path);
        drop(store);
        for suffix in ["", "-wal", "-shm", ".lock"] {
            let mut f = path.as_os_str().to_owned();
            f.push(suffix);
            let _ = std::fs::remove_file(f);
        }
        prop_assert_eq!(got, expected(&changes));
    }
}

/// Each partition's records as capture sends them: a transaction's deltas, then after its
/// commit a watermark just past it in every partition.
fn with_watermarks(all: &[Delta]) -> Vec<Vec<Delta>> {
    let mut per_partition: Vec<Vec<Delta>> = vec![Vec::new(); PARTITIONS as usize];
    let watermark =
        |lsn: i64| Delta { table: String::new(), op: DeltaOp::Watermark, key: vec![], after: None, ..row_delta(lsn, 0, &[]) };
    for (i, d) in all.iter().enumerate() {
        for p in partitions_of(d) {
            per_partition[p as usize].push(d.clone());
        }
        if all.get(i + 1).is_none_or(|n| n.commit_lsn != d.commit_lsn) {
            for p in &mut per_partition {
                p.push(watermark(d.commit_lsn + 1));
            }
        }
    }
    per_partition
}

fn row_delta(lsn: i64, id: i64, columns: &[(&str, i64)]) -> Delta {
    let mut after = vec![column("id", Value::Long(id))];
    after.extend(columns.iter().map(|(n, v)| column(n, Value::Long(*v))));
    Delta {
        table: "public.t".into(),
        op: DeltaOp::Update,
        key: vec![column("id", Value::Long(id))],
        after: Some(after),
        old_key: None,
        commit_lsn: lsn,
        lsn,
        xid: lsn,
        commit_ts: 0,
        seq: 0,
        instruction_id: None,
    }
}

/// An offset no record of these tests had before: each record is news to the store.
fn fresh_offset() -> i64 {
    static NEXT: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(1_000);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// `d` in a record of partition 0 at an offset no record had before.
fn fresh_record(d: &Delta) -> Record<'_> {
    Record { partition: 0, offset: fresh_offset(), delta: Ok(Some(d.view())), tombstone: false, fragment: None, encoded: None }
}

/// A watermark on partition 0 past every delta of these tests: their deltas apply at once,
/// as deltas of complete transactions do.
fn open_cut(store: &mut Store) {
    let w = Delta { table: String::new(), op: DeltaOp::Watermark, key: vec![], after: None, ..row_delta(i64::MAX, 0, &[]) };
    store
        .apply_batch(
            "t",
            &[Record { partition: 0, offset: -1, delta: Ok(Some(w.view())), tombstone: false, fragment: None, encoded: None }],
        )
        .unwrap();
}

fn table_columns(store: &Store) -> Vec<String> {
    let conn = store.connection();
    let mut stmt =
        conn.prepare("SELECT name FROM pragma_table_info('public.t') WHERE name NOT LIKE '\\_pgfanout\\_%' ESCAPE '\\'").unwrap();
    let names = stmt.query_map([], |r| r.get(0)).unwrap();
    names.collect::<Result<_, _>>().unwrap()
}

#[test]
fn a_dropped_column_leaves_the_table_and_older_deltas_do_not_bring_it_back() {
    let path = temp_store(7);
    let mut store = Store::open(&path).unwrap();
    open_cut(&mut store);
    let added = row_delta(100, 1, &[("v", 1), ("x", 1)]);
    let after_drop = row_delta(300, 2, &[("v", 2)]);
    // Written before the drop, delivered after it (another partition).
    let late = row_delta(200, 1, &[("v", 3), ("x", 3)]);
    fn batch<'a>(ds: &[&'a Delta]) -> Vec<Record<'a>> {
        ds.iter().map(|d| fresh_record(d)).collect()
    }
    store.apply_batch("t", &batch(&[&added])).unwrap();
    assert_eq!(table_columns(&store), ["id", "v", "x"]);
    store.apply_batch("t", &batch(&[&after_drop, &late])).unwrap();
    assert_eq!(table_columns(&store), ["id", "v"], "the newer full row without x dropped it");
    assert_eq!(live_rows(&store), BTreeMap::from([(1, 3), (2, 2)]), "the late delta still applied, without x");
    // A replay of everything changes nothing.
    store.apply_batch("t", &batch(&[&added, &late, &after_drop])).unwrap();
    assert_eq!(table_columns(&store), ["id", "v"]);
    assert_eq!(live_rows(&store), BTreeMap::from([(1, 3), (2, 2)]));
    // Reopened, the store remembers when x was dropped.
    drop(store);
    let mut store = Store::open(&path).unwrap();
    store.apply_batch("t", &batch(&[&added])).unwrap();
    assert_eq!(table_columns(&store), ["id", "v"]);
    // Added again in PostgreSQL: a newer row brings it back.
    store.apply_batch("t", &batch(&[&row_delta(400, 3, &[("v", 4), ("x", 4)])])).unwrap();
    assert_eq!(table_columns(&store), ["id", "v", "x"]);
}

#[test]
fn columns_change_in_the_middle_of_a_batch_while_its_statements_are_prepared() {
    let path = temp_store(8);
    let mut store = Store::open(&path).unwrap();
    open_cut(&mut store);
    fn batch(ds: &[Delta]) -> Vec<Record<'_>> {
        ds.iter().map(fresh_record).collect()
    }
    let mut tombstone = row_delta(600, 2, &[]);
    tombstone.op = DeltaOp::Delete;
    store
        .apply_batch(
            "t",
            &batch(&[
                row_delta(100, 1, &[("v", 1), ("x", 1)]),
                row_delta(200, 2, &[("v", 2), ("x", 2)]),
                // Drops x while the statement writing (id, v, x) is prepared.
                row_delta(300, 3, &[("v", 3)]),
                row_delta(400, 1, &[("v", 4)]),
                // Adds y back in the same batch, then writes with and without it.
                row_delta(500, 2, &[("v", 5), ("y", 5)]),
                row_delta(550, 3, &[("v", 6), ("y", 6)]),
                tombstone,
            ]),
        )
        .unwrap();
    assert_eq!(table_columns(&store), ["id", "v", "y"]);
    assert_eq!(live_rows(&store), BTreeMap::from([(1, 4), (3, 6)]));
    let y: Vec<(i64, Option<i64>)> = {
        let conn = store.connection();
        let mut stmt = conn.prepare("SELECT id, y FROM \"public.t\" ORDER BY id").unwrap();
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
        rows.collect::<Result<_, _>>().unwrap()
    };
    assert_eq!(y, [(1, None), (2, None), (3, Some(6))], "the tombstone cleared y too");
}

#[test]
fn a_truncate_that_arrives_before_its_table_still_hides_older_rows() {
    let path = temp_store(9);
    let mut store = Store::open(&path).unwrap();
    open_cut(&mut store);
    let truncate = Delta { op: DeltaOp::Truncate, key: vec![], after: None, ..row_delta(200, 0, &[]) };
    let older = row_delta(100, 1, &[("v", 1)]);
    let newer = row_delta(300, 2, &[("v", 2)]);
    fn record(d: &Delta, offset: i64) -> Record<'_> {
        Record { partition: 0, offset, delta: Ok(Some(d.view())), tombstone: false, fragment: None, encoded: None }
    }
    // The truncate's partition is read first, before any row of the table exists here.
    let stats = store.apply_batch("t", &[record(&truncate, 0)]).unwrap();
    assert_eq!(stats.applied, 1, "the truncate is recorded");
    store.apply_batch("t", &[record(&older, 1), record(&newer, 2)]).unwrap();
    assert_eq!(live_rows(&store), BTreeMap::from([(2, 2)]), "the row older than the truncate stays out");
    // Reopened, the store still knows.
    drop(store);
    let mut store = Store::open(&path).unwrap();
    store.apply_batch("t", &[record(&older, 3)]).unwrap();
    assert_eq!(live_rows(&store), BTreeMap::from([(2, 2)]));
}

#[test]
fn a_tombstone_carrying_its_delete_deletes_when_compaction_removed_the_delete_delta() {
    let path = temp_store(10);
    let mut store = Store::open(&path).unwrap();
    open_cut(&mut store);
    let insert = row_delta(100, 1, &[("v", 1)]);
    let delete = Delta { op: DeltaOp::Delete, after: None, ..row_delta(200, 1, &[]) };
    let reinsert = row_delta(300, 1, &[("v", 3)]);
    fn tombstone(d: &Delta, offset: i64) -> Record<'_> {
        Record { partition: 0, offset, delta: Ok(Some(d.view())), tombstone: true, fragment: None, encoded: None }
    }
    fn row(d: &Delta, offset: i64) -> Record<'_> {
        Record { partition: 0, offset, delta: Ok(Some(d.view())), tombstone: false, fragment: None, encoded: None }
    }
    store.apply_batch("t", &[row(&insert, 0)]).unwrap();
    // The delete delta was compacted away; only the tombstone, with the delete in a header, is left.
    let stats = store.apply_batch("t", &[tombstone(&delete, 2)]).unwrap();
    assert_eq!((stats.tombstones, stats.applied), (1, 0), "counted as a tombstone");
    assert_eq!(live_rows(&store), BTreeMap::new(), "the row is gone");
    // A newer write wins over a replayed tombstone.
    store.apply_batch("t", &[row(&reinsert, 3), tombstone(&delete, 2)]).unwrap();
    assert_eq!(live_rows(&store), BTreeMap::from([(1, 3)]));
}

#[test]
fn only_a_watermark_moves_a_partitions_applied_position_and_releases_what_it_passed() {
    let path = temp_store(11);
    let mut store = Store::open(&path).unwrap();
    store.set_partitions(vec![0]);
    let watermark =
        |lsn: i64| Delta { table: String::new(), op: DeltaOp::Watermark, key: vec![], after: None, ..row_delta(lsn, 0, &[]) };
    fn record(d: &Delta, offset: i64) -> Record<'_> {
        Record { partition: 0, offset, delta: Ok(Some(d.view())), tombstone: false, fragment: None, encoded: None }
    }
    // A transaction at 300 got through while one at 200 (a delta in this partition) did not:
    // its delta says nothing about 200, and waits for a watermark past it.
    let later = row_delta(300, 1, &[("v", 1)]);
    let stats = store.apply_batch("t", &[record(&later, 0)]).unwrap();
    assert_eq!((stats.applied, stats.held), (0, 1), "held until a watermark passes it");
    assert_eq!(stats.applied_lsn.get(&0).copied(), Some(0), "a data delta moves no position: {:?}", stats.applied_lsn);
    assert_eq!(stats.next_offset.get(&0).copied(), Some(0), "the stored offset stays at the held delta");
    let (w150, w400) = (watermark(150), watermark(400));
    store.apply_batch("t", &[record(&w150, 1)]).unwrap();
    assert_eq!(store.applied_lsns("t").unwrap().get(&0).copied(), Some(150));
    assert_eq!(live_rows(&store), BTreeMap::new());
    let stats = store.apply_batch("t", &[record(&row_delta(500, 2, &[("v", 2)]), 2), record(&w400, 3)]).unwrap();
    assert_eq!(store.applied_lsns("t").unwrap().get(&0).copied(), Some(400), "the watermark, not the later delta");
    assert_eq!(live_rows(&store), BTreeMap::from([(1, 1)]), "300 is below the watermark, 500 is not");
    assert_eq!((stats.applied, stats.held, stats.next_offset.get(&0).copied()), (1, 1, Some(2)));
}

#[test]
fn a_transaction_over_the_hold_bound_applies_in_an_open_transaction_a_restart_gives_up() {
    let path = temp_store(12);
    let watermark =
        |lsn: i64| Delta { table: String::new(), op: DeltaOp::Watermark, key: vec![], after: None, ..row_delta(lsn, 0, &[]) };
    fn record(d: &Delta, partition: i32, offset: i64) -> Record<'_> {
        Record { partition, offset, delta: Ok(Some(d.view())), tombstone: false, fragment: None, encoded: None }
    }
    // One transaction at 300 writing rows in two partitions.
    let commit_ts = 1_700_000_000_000_000;
    let (a, b) = (Delta { commit_ts, ..row_delta(300, 1, &[("v", 1)]) }, Delta { commit_ts, ..row_delta(300, 2, &[("v", 2)]) });
    let (w200, w400) = (watermark(200), watermark(400));
    let first = [record(&w200, 1, 0), record(&a, 0, 0), record(&w400, 0, 1)];
    let second = [record(&b, 1, 1)];
    {
        let mut store = Store::open(&path).unwrap();
        store.set_partitions(vec![0, 1]);
        store.set_hold_bytes(0);
        let stats = store.apply_batch("t", &first).unwrap();
        assert_eq!(stats.held, 0, "a plain row applies at once, in the open transaction");
        assert_eq!(stats.next_offset, HashMap::new(), "nothing is committed while the transaction is open");
        assert_eq!(seen_by_reader(&path), BTreeMap::new(), "the cut is below 300");
        store.apply_batch("t", &second).unwrap();
        assert_eq!(live_rows(&store), BTreeMap::from([(1, 1), (2, 2)]), "both applied");
        assert_eq!(seen_by_reader(&path), BTreeMap::new(), "but not committed: the cut is still below 300");
    }
    // Killed here: nothing of the open transaction is kept, and the records are read again.
    let mut store = Store::open(&path).unwrap();
    store.set_partitions(vec![0, 1]);
    assert_eq!(store.offsets("t").unwrap(), HashMap::new());
    assert_eq!(live_rows(&store), BTreeMap::new());
    store.set_hold_bytes(0);
    store.apply_batch("t", &first).unwrap();
    store.apply_batch("t", &second).unwrap();
    assert_eq!(seen_by_reader(&path), BTreeMap::new(), "partition 1's watermark has not passed 300 yet");
    let stats = store.apply_batch("t", &[record(&w400, 1, 2)]).unwrap();
    assert_eq!(seen_by_reader(&path), BTreeMap::from([(1, 1), (2, 2)]), "both rows of the transaction at once");
    assert_eq!((stats.held, stats.next_offset.get(&0).copied(), stats.next_offset.get(&1).copied()), (0, Some(2), Some(3)));
    let state = StoreState { lsn: 400, commit_lsn: 300, commit_time: commit_ts };
    assert_eq!(store.reader().state("t").unwrap(), Some(state), "the store says it shows the transaction at 300");
    let staged: i64 = store.connection().query_row("SELECT count(*) FROM _pgfanout_staged", [], |r| r.get(0)).unwrap();
    assert_eq!(staged, 0);
}

/// A transaction of 200 key changes over two partitions, the second read only after the
/// first: what partition 0 delivers is held from its records' bytes (a key change applies
/// in version order) and staged many rows a statement, then applied from the stage merged
/// with partition 1's in version order, later rows of the same key overwriting earlier
/// ones. It appears whole, with each row's last version, once both partitions' watermarks
/// passed it.
#[test]
fn a_large_transaction_staged_from_its_records_bytes_applies_whole_and_in_order() {
    let watermark =
        |lsn: i64| Delta { table: String::new(), op: DeltaOp::Watermark, key: vec![], after: None, ..row_delta(lsn, 0, &[]) };
    // Ids 0..100, each written twice (seq 2i and 2i + 1): the second write wins.
    let writes: Vec<Delta> = (0..200)
        .map(|seq| Delta {
            seq,
            old_key: Some(vec![column("id", Value::Long(1000 + seq / 2))]),
            ..row_delta(300, seq / 2, &[("v", seq)])
        })
        .collect();
    let encoded: Vec<Vec<u8>> = writes.iter().map(|d| crate::contract::codec::encode_delta(d).unwrap()).collect();
    let decoded: Vec<_> = encoded.iter().map(|b| crate::contract::codec::decode_delta_view(b).unwrap()).collect();
    let (p0, p1): (Vec<Record>, Vec<Record>) = decoded
        .into_iter()
        .zip(&encoded)
        .enumerate()
        .map(|(i, (d, b))| Record {
            partition: (i % 2) as i32,
            offset: (i / 2) as i64,
            delta: Ok(Some(d)),
            tombstone: false,
            fragment: None,
            encoded: Some(b),
        })
        .partition(|r| r.partition == 0);
    let path = temp_store(13);
    let mut store = Store::open(&path).unwrap();
    store.set_partitions(vec![0, 1]);
    store.set_hold_bytes(0);
    let stats = store.apply_batch("t", &p0).unwrap();
    assert_eq!(stats.held, 100);
    let staged: i64 = store.connection().query_row("SELECT count(*) FROM _pgfanout_staged", [], |r| r.get(0)).unwrap();
    assert_eq!(staged, 100, "every held delta staged");
    let stats = store.apply_batch("t", &p1).unwrap();
    assert_eq!(stats.held, 1, "the last write is not below partition 0's frontier");
    assert_eq!(seen_by_reader(&path), BTreeMap::new());
    let w = watermark(400);
    let wm = |partition, offset| Record {
        partition,
        offset,
        delta: Ok(Some(w.view())),
        tombstone: false,
        fragment: None,
        encoded: None,
    };
    store.apply_batch("t", &[wm(0, 100)]).unwrap();
    assert_eq!(seen_by_reader(&path), BTreeMap::new(), "partition 1 has not passed 300");
    let stats = store.apply_batch("t", &[wm(1, 100)]).unwrap();
    let expected: BTreeMap<i64, i64> = (0..100).map(|id| (id, 2 * id + 1)).collect();
    assert_eq!(seen_by_reader(&path), expected);
    assert_eq!(stats.held, 0);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// A device killed at random points and restarted from its stored offsets, reading each
    /// partition as Kafka would (same offsets again): every state it shows is whole
    /// transactions, it ends as PostgreSQL, and each record is counted once — also when
    /// it applies transactions in a SQLite transaction left open across batches.
    #[test]
    fn restarts_from_the_stored_offsets_count_each_record_once(
        changes in prop::collection::vec(change(), 1..40),
        seed in any::<u64>(),
        hold_nothing in any::<bool>(),
    ) {
        let all = deltas(&changes);
        let per_partition = with_watermarks(&all);
        let total: usize = per_partition.iter().map(Vec::len).sum();
        let mut rng = seed | 1;
        let mut next = move || { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; rng };
        let path = temp_store(seed ^ 0x5eed);
        let open = |path: &std::path::Path| {
            let mut store = Store::open(path).unwrap();
            store.set_partitions((0..PARTITIONS).collect());
            if hold_nothing {
                store.set_hold_bytes(0);
            }
            store
        };
        let mut store = open(&path);
        let mut cursor = vec![0i64; PARTITIONS as usize];
        let mut steps = 0;
        while cursor.iter().zip(&per_partition).any(|(c, p)| (*c as usize) < p.len()) {
            steps += 1;
            // Kills at random, then none: the device must get through at the end.
            if steps < 4 * total && next() % 7 == 0 {
                drop(store);
                store = open(&path);
                let stored = store.offsets("t").unwrap();
                for (p, c) in cursor.iter_mut().enumerate() {
                    *c = stored.get(&(p as i32)).copied().unwrap_or(0);
                }
            }
            let p = (next() % PARTITIONS as u64) as usize;
            let Some(d) = per_partition[p].get(cursor[p] as usize) else { continue };
            let record = Record { partition: p as i32, offset: cursor[p], delta: Ok(Some(d.view())), tombstone: false, fragment: None, encoded: None };
            store.apply_batch("t", &[record]).unwrap();
            cursor[p] += 1;
        }
        prop_assert_eq!(seen_by_reader(&path), expected(&changes));
        prop_assert_eq!(store.counter("processed").unwrap(), total as i64);
    }
}

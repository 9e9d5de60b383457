//! A device's store shows only states PostgreSQL had: money moves between accounts in
//! PostgreSQL transactions spread over every partition, and a reader beside each device,
//! polling its store through its own SQLite connection, never sees a total PostgreSQL
//! never had — while a device is killed and restarted, replayed from the beginning, and
//! rebuilt.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pgfanout::device::store::open_read_only;
use pgfanout::test_support::process::peak_rss_mb;
use pgfanout::test_support::{wait_for, Pipeline, TIMEOUT};
use pgfanout::workload::Rng;

const ACCOUNTS: i64 = 200;
const OPENING_BALANCE: i64 = 1_000;
const TOTAL: i64 = ACCOUNTS * OPENING_BALANCE;

/// What a reader saw.
#[derive(Debug, Default)]
struct Reads {
    /// Reads that found the table (all its rows, or it would count as wrong).
    reads: u64,
    /// Reads whose account count or total PostgreSQL never had.
    wrong: u64,
    worst: i64,
}

/// Polls `store` until `stop`, reopening its connection now and then (a rebuild swaps the
/// file).
fn reader(store: std::path::PathBuf, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Reads> {
    std::thread::spawn(move || {
        let mut seen = Reads::default();
        while !stop.load(Ordering::Relaxed) {
            let Ok(conn) = open_read_only(&store) else {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            };
            for _ in 0..200 {
                let read = conn.query_row(
                    "SELECT count(*), coalesce(sum(balance), 0) FROM \"public.accounts\" WHERE _pgfanout_deleted = 0",
                    [],
                    |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
                );
                let Ok((count, total)) = read else { break }; // not created yet, or busy
                if count == 0 {
                    continue;
                }
                seen.reads += 1;
                if count != ACCOUNTS || total != TOTAL {
                    seen.wrong += 1;
                    seen.worst = seen.worst.max((total - TOTAL).abs()).max(ACCOUNTS - count);
                }
            }
        }
        seen
    })
}

/// Transfers between random accounts, one PostgreSQL transaction each, until `stop`.
async fn transfers(client: tokio_postgres::Client, stop: Arc<AtomicBool>) -> u64 {
    let mut rng = Rng::new(pgfanout::contract::now_micros() as u64);
    let mut done = 0;
    while !stop.load(Ordering::Relaxed) {
        let (from, to, amount) = (rng.below(ACCOUNTS as u64), rng.below(ACCOUNTS as u64), 1 + rng.below(50));
        client
            .batch_execute(&format!(
                "BEGIN; UPDATE public.accounts SET balance = balance - {amount} WHERE id = {from};
                 UPDATE public.accounts SET balance = balance + {amount} WHERE id = {to}; COMMIT"
            ))
            .await
            .unwrap();
        done += 1;
    }
    done
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_of_device_stores_only_ever_see_totals_postgres_had() {
    let mut p = Pipeline::new("consistent").await;
    p.client()
        .await
        .batch_execute(&format!(
            "CREATE TABLE public.accounts (id int8 PRIMARY KEY, balance int8 NOT NULL);
             INSERT INTO public.accounts SELECT g, {OPENING_BALANCE} FROM generate_series(0, {}) g;
             ALTER PUBLICATION pgfanout ADD TABLE public.accounts",
            ACCOUNTS - 1
        ))
        .await
        .unwrap();
    p.start_capture().await;
    p.start_device("a", &[]);
    p.start_device("b", &["--batch-size", "7"]);
    let stop_reading = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = ["a", "b"].iter().map(|d| reader(p.store(d), stop_reading.clone())).collect();
    let stop_writing = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(transfers(p.client().await, stop_writing.clone()));

    tokio::time::sleep(Duration::from_secs(4)).await;
    p.kill("device-a"); // mid-stream, holding deltas in memory
    tokio::time::sleep(Duration::from_secs(1)).await;
    p.start_device("a", &[]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    p.stop("device-b");
    let store_b = p.store("b").to_string_lossy().into_owned();
    let replay = p.run_cli(&["replay", "--device", "b", "--store", &store_b, "--from", "beginning"]).await;
    assert!(replay.status.success(), "replay: {}", String::from_utf8_lossy(&replay.stderr));
    let rebuild = p.run_cli(&["rebuild", "--device", "b", "--store", &store_b]).await;
    assert!(rebuild.status.success(), "rebuild: {}", String::from_utf8_lossy(&rebuild.stderr));
    p.start_device("b", &["--batch-size", "7"]);
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop_writing.store(true, Ordering::Relaxed);
    let transfers = writer.await.unwrap();
    p.wait_converged(&["a", "b"]).await;
    stop_reading.store(true, Ordering::Relaxed);
    for (device, reader) in ["a", "b"].iter().zip(readers) {
        let seen = reader.join().unwrap();
        eprintln!("device {device}: {seen:?} over {transfers} transfers");
        assert_eq!(seen.wrong, 0, "device {device}: {seen:?} — states PostgreSQL never had");
        assert!(seen.reads >= 20_000, "device {device}: only {} reads", seen.reads);
    }
    assert!(transfers > 100, "transfers ran: {transfers}");
    p.stop("device-a");
    p.stop("device-b");
    p.stop("capture");
}

const MILLION: i64 = 1_000_000;

/// Rows of `public.million` on the store, and how many of them hold `v = 1`.
fn million_counts(store: &std::path::Path) -> Option<(i64, i64)> {
    let conn = open_read_only(store).ok()?;
    conn.query_row(
        "SELECT count(*), count(*) FILTER (WHERE v = 1) FROM \"public.million\" WHERE _pgfanout_deleted = 0",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .ok()
}

/// One UPDATE of a million rows: a reader of the store sees none or all of them changed,
/// never a mix, and the device's memory stays bounded (held deltas go to the store).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_row_update_appears_all_at_once_in_bounded_memory() {
    let mut p = Pipeline::new("million").await;
    let client = p.client().await;
    client
        .batch_execute(&format!(
            "CREATE TABLE public.million (id int8 PRIMARY KEY, v int8 NOT NULL);
             INSERT INTO public.million SELECT g, 0 FROM generate_series(1, {MILLION}) g;
             ALTER PUBLICATION pgfanout ADD TABLE public.million"
        ))
        .await
        .unwrap();
    p.start_capture().await;
    p.start_device("a", &[]);
    let store = p.store("a");
    wait_for("the snapshot's million rows on the device", TIMEOUT * 3, || {
        let counts = million_counts(&store);
        async move { (counts == Some((MILLION, 0))).then_some(()) }
    })
    .await;
    eprintln!("after the snapshot: device peak RSS {:.0} MB", peak_rss_mb(p.pid("device-a")));

    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (store, stop) = (store.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut reads, mut mixed) = (0u64, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                if let Some((rows, changed)) = million_counts(&store) {
                    reads += 1;
                    if rows != MILLION || (changed != 0 && changed != MILLION) {
                        mixed.push((rows, changed));
                    }
                }
            }
            (reads, mixed)
        })
    };
    client.batch_execute("UPDATE public.million SET v = 1").await.unwrap();
    wait_for("the update on the device", TIMEOUT * 3, || {
        let counts = million_counts(&store);
        async move { (counts == Some((MILLION, MILLION))).then_some(()) }
    })
    .await;
    let rss = peak_rss_mb(p.pid("device-a"));
    stop.store(true, Ordering::Relaxed);
    let (reads, mixed) = reader.join().unwrap();
    eprintln!("{reads} reads while the update arrived; device peak RSS {rss:.0} MB");
    assert!(mixed.is_empty(), "{} of {reads} reads saw part of the update: {:?}", mixed.len(), &mixed[..mixed.len().min(5)]);
    assert!(reads > 10, "the reader read while the update arrived ({reads} reads)");
    assert!(rss < 200.0, "the device's peak RSS was {rss:.0} MB");
    p.stop("device-a");
    p.stop("capture");
}

//! Rows larger than a Kafka record, and a delivery Kafka refuses after later ones got
//! through: on real PostgreSQL, broker and SQLite.

use std::time::Duration;

use pgfanout::test_support::{wait_for, Pipeline, TIMEOUT};

/// A published table of large values.
async fn blobs_table(p: &Pipeline) {
    p.client()
        .await
        .batch_execute(
            "CREATE TABLE public.blobs (id int PRIMARY KEY, body bytea); ALTER PUBLICATION pgfanout ADD TABLE public.blobs",
        )
        .await
        .unwrap();
}

/// Writes row `id` with `bytes` random (incompressible) bytes, in a transaction of its own.
async fn write_blob(client: &tokio_postgres::Client, id: i32, bytes: i32) {
    client
        .execute(
            "INSERT INTO public.blobs VALUES ($1, (SELECT decode(string_agg(md5(random()::text || g), ''), 'hex')
                                                     FROM generate_series(1, $2 / 16) g))
             ON CONFLICT (id) DO UPDATE SET body = excluded.body",
            &[&id, &bytes],
        )
        .await
        .unwrap();
}

/// The device's watermark as its store holds it: the least applied position over the
/// partitions (0 before every partition has one).
fn device_watermark(p: &Pipeline, device: &str) -> i64 {
    let conn = pgfanout::verify::open_store_read_only(&p.store(device)).unwrap();
    let (n, min): (i64, Option<i64>) =
        conn.query_row("SELECT count(*), min(applied_lsn) FROM _pgfanout_offsets", [], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
    if n < i64::from(p.kafka.partitions) {
        0
    } else {
        min.unwrap_or(0)
    }
}

/// Rows with id 100 or more in the device's copy of the table.
fn later_rows_on(p: &Pipeline, device: &str) -> i64 {
    let conn = pgfanout::verify::open_store_read_only(&p.store(device)).unwrap();
    conn.query_row("SELECT count(*) FROM \"public.blobs\" WHERE id >= 100", [], |r| r.get(0)).unwrap_or(0)
}

/// Deltas of rows with id 100 or more in the deltas topic.
fn later_deltas_in_topic(p: &Pipeline) -> usize {
    let later = |d: &pgfanout::contract::Delta| {
        d.table == "public.blobs"
            && matches!(d.key.first().map(|c| &c.value), Some(pgfanout::contract::Value::Long(id)) if *id >= 100)
    };
    p.delta_topic_records()
        .iter()
        .filter_map(|r| r.payload.as_deref().and_then(|b| pgfanout::contract::codec::decode_delta(b).ok()))
        .filter(later)
        .count()
}

async fn wal_insert_position(client: &tokio_postgres::Client) -> i64 {
    client.query_one("SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint", &[]).await.unwrap().get(0)
}

/// Rows of 1 MB, 20 MB and 100 MB, above Kafka's default record limit, reach the device
/// equal to PostgreSQL, also when a large row changes again; a second device started
/// afterwards reads them from the topic's history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_larger_than_a_kafka_record_reach_devices_whole() {
    let mut p = Pipeline::new("large_rows").await;
    blobs_table(&p).await;
    p.start_capture().await;
    p.start_device("a", &[]);
    let client = p.client().await;
    write_blob(&client, 1, 1 << 20).await;
    write_blob(&client, 2, 20 << 20).await;
    write_blob(&client, 3, 1000).await;
    write_blob(&client, 4, 100 << 20).await;
    p.wait_converged(&["a"]).await;
    write_blob(&client, 1, 3 << 20).await; // a newer large version of a row
    client.execute("UPDATE public.blobs SET body = 'small' WHERE id = 2", &[]).await.unwrap();
    p.wait_converged(&["a"]).await;
    p.start_device("b", &[]);
    p.wait_converged(&["a", "b"]).await;
    assert!(p.store_counter("a", "fragments") >= 20 + 1 + 3 + 100, "the rows went out as fragments");
    p.assert_all_running();
    p.stop("device-a");
    p.stop("device-b");
    p.stop("capture");
}

/// The broker refuses a delta (a record above the topic's `max.message.bytes`, sent whole
/// because capture's fragment size was set above it) while later transactions' deltas
/// are acknowledged: capture stops naming the table, and neither the device's watermark nor
/// the slot's flush position passes the refused transaction. Once capture runs with
/// fragments that fit, the device holds every row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_delivery_is_never_passed_by_a_watermark_or_the_slot() {
    let mut p = Pipeline::new("refused").await;
    blobs_table(&p).await;
    let refusing = ["--fragment-bytes", "16000000", "--kafka-properties", "message.max.bytes=32000000"];
    p.start_capture_with(&refusing).await;
    p.start_device("a", &[]);
    let client = p.client().await;
    write_blob(&client, 0, 100).await;
    p.wait_converged(&["a"]).await;

    // The refused transaction, then many small ones right behind it.
    let before = wal_insert_position(&client).await;
    write_blob(&client, 1, 12 << 20).await;
    let after_refused = wal_insert_position(&client).await;
    let later = (100..400).map(|i| format!("INSERT INTO public.blobs VALUES ({i}, 'later');")).collect::<String>();
    client.batch_execute(&later).await.unwrap();

    // Capture stops on the refused delta. Whether the later transaction's 300 deliveries got
    // through before the refusal came back is a race: capture runs again, from its slot,
    // until they have.
    let log = p.log("capture");
    for attempt in 1..=10 {
        wait_for("capture to stop on the refused delta", TIMEOUT, || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            async move { (text.matches("Kafka refused a delta of public.blobs").count() >= attempt).then_some(()) }
        })
        .await;
        p.kill("capture"); // it has exited; this reaps it
        if later_deltas_in_topic(&p) >= 300 {
            break;
        }
        assert!(attempt < 10, "no later delivery got through before the refusal in {attempt} runs of capture");
        p.start("capture", &[&["capture"][..], &refusing].concat());
    }
    // Later deliveries got through (their records are in the topic), and the device shows
    // none of them: a transaction after the refused one is never visible before it.
    // Time for any watermark still in flight to land.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(later_rows_on(&p, "a"), 0, "rows committed after the refused transaction are not shown before it");
    let watermark = device_watermark(&p, "a");
    assert!(
        watermark > 0 && watermark < after_refused,
        "the device's watermark {watermark} passed the refused transaction (before {before}, ends by {after_refused})"
    );
    let flushed = p.slot_flushed().await;
    assert!(
        flushed < after_refused,
        "the slot's flush position {flushed} passed the refused transaction (ends by {after_refused})"
    );

    // Capture again, with fragments that fit: nothing was lost.
    p.start_capture().await;
    p.wait_converged(&["a"]).await;
    assert!(device_watermark(&p, "a") > after_refused);
    p.stop("device-a");
    p.stop("capture");
}

/// A compacted deltas topic keeps a large row's newest version whole, because each fragment
/// has a key of its own: a store rebuilt from what compaction leaves (tombstones kept, then
/// dropped) equals PostgreSQL. Slices of older versions stay behind where a newer version
/// has fewer slices, became small or was deleted; the rebuild drops them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compacted_topic_keeps_the_newest_version_of_a_large_row_whole() {
    let mut p = Pipeline::new("large_compacted").await;
    blobs_table(&p).await;
    p.start_capture().await;
    p.start_device("a", &[]);
    let client = p.client().await;
    write_blob(&client, 1, 3 << 20).await; // four fragments
    write_blob(&client, 1, 2 << 20).await; // three: the first version's third slice stays behind
    write_blob(&client, 2, 2 << 20).await;
    write_blob(&client, 3, 2 << 20).await;
    client
        .batch_execute("UPDATE public.blobs SET body = 'small' WHERE id = 2; DELETE FROM public.blobs WHERE id = 3")
        .await
        .unwrap();
    write_blob(&client, 4, 1000).await;
    p.wait_converged(&["a"]).await;
    p.wait_deltas_settled().await;

    let records = p.delta_topic_records();
    let fragments = records.iter().filter(|r| r.fragment.is_some()).count();
    assert_eq!(fragments, 4 + 3 + 3 + 3, "the large versions went out as fragments");
    p.assert_rebuilt_from_compacted_equals_postgres(&records).await;
    p.stop("device-a");
    p.stop("capture");
}

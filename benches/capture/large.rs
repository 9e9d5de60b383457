//! The capture benchmark's large rows: 20 MB rows streaming through capture (sent as
//! fragments), and capture's peak RSS while one 100 MB `bytea` value streams through a
//! freshly started capture, against the bound 3 × the value + 30 MB.

use std::path::Path;
use std::time::{Duration, Instant};

use super::{current_lsn, flushed_past, peak_rss_mb, start_capture};

const MB: i32 = 1 << 20;

/// What the large-row phase measured.
pub struct Large {
    pub rows_20mb: usize,
    pub secs_20mb: f64,
    pub peak_rss_mb_100mb: f64,
}

/// Writes row `id` of table `blobs` with `bytes` random bytes, in a transaction of its own.
async fn write_blob(client: &tokio_postgres::Client, id: i32, bytes: i32) {
    client
        .execute(
            "INSERT INTO blobs VALUES ($1, (SELECT decode(string_agg(md5(random()::text || g), ''), 'hex')
                                              FROM generate_series(1, $2 / 16) g))",
            &[&id, &bytes],
        )
        .await
        .unwrap();
}

async fn wait_flushed(client: &tokio_postgres::Client, lsn: &str, what: &str) {
    let started = Instant::now();
    while !flushed_past(client, "pgfanout", lsn).await {
        assert!(started.elapsed() < Duration::from_secs(600), "{what} did not get through");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs the phase with captures of its own, on the benchmark's slot (the caller's capture
/// is stopped).
pub async fn run(client: &tokio_postgres::Client, dir: &Path) -> Large {
    client
        .batch_execute("CREATE TABLE blobs (id int PRIMARY KEY, body bytea); ALTER PUBLICATION pgfanout ADD TABLE blobs")
        .await
        .unwrap();
    // 20 MB rows: written while capture is stopped, then streamed from its slot, so that
    // the time is capture's alone.
    let rows_20mb = 5;
    for id in 0..rows_20mb {
        write_blob(client, id as i32, 20 * MB).await;
    }
    let end: String = current_lsn(client).await;
    let started = Instant::now();
    let capture = start_capture(dir);
    wait_flushed(client, &end, "the 20 MB rows").await;
    let secs_20mb = started.elapsed().as_secs_f64();
    drop(capture);

    // One 100 MB value through a freshly started capture.
    write_blob(client, 1000, 100 * MB).await;
    let end: String = current_lsn(client).await;
    let capture = start_capture(dir);
    wait_flushed(client, &end, "the 100 MB value").await;
    let peak_rss_mb_100mb = peak_rss_mb(capture.0.id());
    drop(capture);
    Large { rows_20mb, secs_20mb, peak_rss_mb_100mb }
}

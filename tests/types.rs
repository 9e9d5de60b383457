//! Every common PostgreSQL type through the whole path, a table added to the publication
//! while capture runs, a column added and another dropped later, unchanged TOASTed values,
//! and a slot that keeps moving while only unpublished tables change.

use pgfanout::test_support::{self, Pipeline};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_reaches_the_device_intact() {
    let mut p = Pipeline::new("types").await;
    p.start_capture().await;
    p.start_device("a", &[]);
    let client = p.client().await;
    // Created and published while capture streams.
    client
        .batch_execute(
            "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
             CREATE DOMAIN positive AS integer CHECK (VALUE > 0);
             CREATE TABLE public.kinds (
                 id bigint PRIMARY KEY, b bool, i2 int2, i4 int4, f4 float4, f8 float8,
                 n numeric, n2 numeric(12,2), t text, vc varchar(20), c char(4), by bytea, u uuid,
                 d date, tm time, tmz timetz, ts timestamp, tsz timestamptz, iv interval,
                 j json, jb jsonb, ai int4[], at text[], e mood, dm positive);
             ALTER PUBLICATION pgfanout ADD TABLE public.kinds;",
        )
        .await
        .unwrap();
    client
        .batch_execute(
            "INSERT INTO public.kinds VALUES
              (1, true, -32768, 2147483647, 1.5, -0.1, 123456789012345678901234567890.000000000123, 12.50,
               'héllo ''quoted'' \\ back', 'varchar', 'ab', '\\x00ff10', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
               '2026-11-25', '17:00:01.5', '17:00:01+02', '2026-11-25 17:00:00.123456', '2026-11-25 17:00:00.123456+00',
               '1 year 2 mons 3 days 04:05:06.7', '{\"a\": [1, 2]}', '{\"b\": null, \"a\": 1}',
               '{1,NULL,3}', '{\"x y\",\"z\"}', 'happy', 7),
              (2, false, 0, 0, 'NaN', 'Infinity', 'NaN', 0, '', '', '', '\\x', '00000000-0000-0000-0000-000000000000',
               '-infinity', '00:00', '00:00+00', 'infinity', '-infinity', '-1 days', 'null', '[]', '{}', '{}', 'sad', 1),
              (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
               NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);",
        )
        .await
        .unwrap();
    p.wait_converged(&["a"]).await;

    // A column added later reaches the device without restarting anything.
    client
        .batch_execute("ALTER TABLE public.kinds ADD COLUMN extra text; UPDATE public.kinds SET extra = 'x' || id WHERE id < 3")
        .await
        .unwrap();
    p.wait_converged(&["a"]).await;

    // An update that leaves a TOASTed value unchanged does not send it; the device keeps it.
    let big: String = (0..20_000).map(|i| char::from(b'a' + (i * 7 % 26) as u8)).collect();
    client.execute("UPDATE public.kinds SET t = $1 WHERE id = 1", &[&big]).await.unwrap();
    p.wait_converged(&["a"]).await;
    client.batch_execute("UPDATE public.kinds SET i4 = 42 WHERE id = 1").await.unwrap();
    p.wait_converged(&["a"]).await;
    let conn = pgfanout::verify::open_store_read_only(&p.store("a")).unwrap();
    let (t, i4): (String, i64) =
        conn.query_row("SELECT t, i4 FROM \"public.kinds\" WHERE id = 1", [], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
    assert_eq!((t.len(), i4), (big.len(), 42), "the unchanged TOASTed text survived the update");
    // Native storage classes where PostgreSQL's type has one.
    let classes: (String, String, String, String) = conn
        .query_row("SELECT typeof(b), typeof(f8), typeof(by), typeof(n) FROM \"public.kinds\" WHERE id = 1", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })
        .unwrap();
    assert_eq!(classes, ("integer".into(), "real".into(), "blob".into(), "text".into()));

    // A dropped column leaves the device's table with the next change of the table.
    client
        .batch_execute("ALTER TABLE public.kinds DROP COLUMN extra; UPDATE public.kinds SET i2 = 7 WHERE id = 2")
        .await
        .unwrap();
    p.wait_converged(&["a"]).await;
    let conn = pgfanout::verify::open_store_read_only(&p.store("a")).unwrap();
    let extra: i64 =
        conn.query_row("SELECT count(*) FROM pragma_table_info('public.kinds') WHERE name = 'extra'", [], |r| r.get(0)).unwrap();
    assert_eq!(extra, 0, "the device dropped the column");
    p.stop("device-a");
    p.stop("capture");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_slot_keeps_moving_while_only_unpublished_tables_change() {
    let mut p = Pipeline::new("idle_slot").await;
    p.start_capture().await;
    let client = p.client().await;
    client.batch_execute("CREATE TABLE public.not_published (id bigserial PRIMARY KEY, payload text)").await.unwrap();
    let before = p.slot_flushed().await;
    client
        .batch_execute("INSERT INTO public.not_published (payload) SELECT repeat('x', 200) FROM generate_series(1, 20000)")
        .await
        .unwrap();
    let written = p.wal_position().await;
    assert!(written - before > 4_000_000, "the test wrote megabytes of WAL");
    // No delta is published, yet the slot follows the server instead of holding WAL back.
    test_support::wait_for("the slot to pass the unpublished writes", test_support::TIMEOUT, || async {
        (p.slot_flushed().await >= written).then_some(())
    })
    .await;
    // Stopped first so that no round of watermarks is half-published when counting.
    p.stop("capture");
    assert_eq!(p.delta_records() % 3, 0, "only watermarks (one per partition each time) were published");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_moves_a_slot_that_status_updates_leave_behind() {
    let mut p = Pipeline::new("heartbeat").await;
    // Status updates once a minute: between them only a heartbeat can move the slot.
    p.start_capture_with(&["--status-interval-ms", "60000", "--heartbeat-secs", "1"]).await;
    let client = p.client().await;
    client.batch_execute("CREATE TABLE public.not_published (id bigserial PRIMARY KEY, payload text)").await.unwrap();
    client
        .batch_execute("INSERT INTO public.not_published (payload) SELECT repeat('x', 200) FROM generate_series(1, 5000)")
        .await
        .unwrap();
    let written = p.wal_position().await;
    test_support::wait_for("a heartbeat to move the slot", std::time::Duration::from_secs(25), || async {
        (p.slot_flushed().await >= written).then_some(())
    })
    .await;
    p.stop("capture");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_identity_full_keeps_rows_keyed_by_their_primary_key() {
    let mut p = Pipeline::new("identity_full").await;
    let client = p.client().await;
    client
        .batch_execute(
            "CREATE TABLE public.full_identity (id int PRIMARY KEY, note text, n int);
             ALTER TABLE public.full_identity REPLICA IDENTITY FULL;
             INSERT INTO public.full_identity VALUES (1, 'copied by the snapshot', 0);
             ALTER PUBLICATION pgfanout ADD TABLE public.full_identity;",
        )
        .await
        .unwrap();
    p.start_capture().await;
    p.start_device("a", &[]);
    client
        .batch_execute(
            "INSERT INTO public.full_identity VALUES (2, 'two', 0), (3, 'three', 0);
             UPDATE public.full_identity SET note = 'changed', n = n + 1 WHERE id IN (1, 2);
             UPDATE public.full_identity SET id = 4 WHERE id = 3;
             DELETE FROM public.full_identity WHERE id = 2;",
        )
        .await
        .unwrap();
    p.wait_converged(&["a"]).await;
    let conn = pgfanout::verify::open_store_read_only(&p.store("a")).unwrap();
    let rows: i64 = conn.query_row("SELECT count(*) FROM \"public.full_identity\"", [], |r| r.get(0)).unwrap();
    assert_eq!(rows, 4, "one row per primary key ever seen (two of them tombstones), not one per row image");
    p.stop("device-a");
    p.stop("capture");
}

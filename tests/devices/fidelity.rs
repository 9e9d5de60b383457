//! Devices hold exactly what PostgreSQL holds, whatever the server's settings and however
//! a row changes: values in a text that does not depend on the session's settings, TOASTed
//! values kept across a key change, and the old key forgotten by a compacted topic.

use pgfanout::test_support::Pipeline;

/// The text of one device column, as the device stores it.
fn device_text(p: &Pipeline, device: &str, sql: &str) -> String {
    let conn = pgfanout::verify::open_store_read_only(&p.store(device)).unwrap();
    conn.query_row(sql, [], |r| r.get(0)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_read_the_same_whatever_the_server_time_zone_and_styles() {
    let mut p = Pipeline::new("timezone").await;
    let client = p.client().await;
    client
        .batch_execute(
            "CREATE TABLE public.zoned (id int PRIMARY KEY, tsz timestamptz, ts timestamp, d date, iv interval,
                                        f8 float8, by bytea);
             ALTER PUBLICATION pgfanout ADD TABLE public.zoned;
             INSERT INTO public.zoned VALUES
               (1, '2024-06-01 17:30:00+05:30', '2024-06-01 12:00:00', '2024-06-01', '1 day 02:03:04', 0.1 + 0.2, '\\x00ff');",
        )
        .await
        .unwrap();
    // Every setting that changes how a value is written as text, set where a DBA would.
    let db = p.name.clone();
    client
        .batch_execute(&format!(
            "ALTER DATABASE {db} SET TimeZone = 'Asia/Kolkata';
             ALTER DATABASE {db} SET DateStyle = 'SQL, DMY';
             ALTER DATABASE {db} SET IntervalStyle = 'iso_8601';
             ALTER DATABASE {db} SET extra_float_digits = 0;
             ALTER DATABASE {db} SET bytea_output = 'escape';"
        ))
        .await
        .unwrap();
    let client = p.client().await;
    client
        .batch_execute(
            "INSERT INTO public.zoned VALUES (2, '2024-12-31 23:59:59.5+00', NULL, '1999-01-08', '-3 mons', 1e-300, '\\x')",
        )
        .await
        .unwrap();
    // The initial snapshot copies rows 1 and 2; rows written while streaming follow.
    p.start_capture().await;
    p.start_device("a", &[]);
    client
        .batch_execute("INSERT INTO public.zoned VALUES (3, '2000-01-01 00:00:00+14', '2000-01-01', 'infinity', '1 year', -2.5e10, '\\x5c27')")
        .await
        .unwrap();
    p.wait_converged(&["a"]).await;
    assert_eq!(device_text(&p, "a", "SELECT tsz FROM \"public.zoned\" WHERE id = 1"), "2024-06-01 12:00:00+00");
    assert_eq!(device_text(&p, "a", "SELECT d FROM \"public.zoned\" WHERE id = 2"), "1999-01-08");
    assert_eq!(device_text(&p, "a", "SELECT iv FROM \"public.zoned\" WHERE id = 1"), "1 day 02:03:04");
    assert_eq!(device_text(&p, "a", "SELECT tsz FROM \"public.zoned\" WHERE id = 3"), "1999-12-31 10:00:00+00");

    // Another zone while capture is down: the next replication session starts in it.
    p.stop("capture");
    client.batch_execute(&format!("ALTER DATABASE {db} SET TimeZone = 'America/St_Johns'")).await.unwrap();
    let client = p.client().await;
    client.batch_execute("UPDATE public.zoned SET tsz = tsz + interval '1 minute' WHERE id = 1").await.unwrap();
    p.start_capture().await;
    client
        .batch_execute(
            "INSERT INTO public.zoned VALUES (4, '2024-03-10 02:30:00-02:30', NULL, NULL, '00:00:00.000001', 'NaN', NULL)",
        )
        .await
        .unwrap();
    p.wait_converged(&["a"]).await;
    assert_eq!(device_text(&p, "a", "SELECT tsz FROM \"public.zoned\" WHERE id = 1"), "2024-06-01 12:01:00+00");
    assert_eq!(device_text(&p, "a", "SELECT tsz FROM \"public.zoned\" WHERE id = 4"), "2024-03-10 05:00:00+00");
    // `verify` reads PostgreSQL in the same pinned text, so it agrees.
    let store = p.store("a").to_string_lossy().into_owned();
    let out = p.run_cli(&["verify", "--store", &store]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("verified: 1 of 1 devices match"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    p.stop("device-a");
    p.stop("capture");
}

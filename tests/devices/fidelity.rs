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

/// The three tables of the key-change tests, one per replica identity; on `moved_index`
/// the devices' key is `code` (the identity index), PostgreSQL's primary key `id`.
const MOVED_TABLES: &str = "
    CREATE TABLE public.moved_default (id int PRIMARY KEY, code int NOT NULL, n int, doc text);
    CREATE TABLE public.moved_full (id int PRIMARY KEY, code int NOT NULL, n int, doc text);
    ALTER TABLE public.moved_full REPLICA IDENTITY FULL;
    CREATE TABLE public.moved_index (id int PRIMARY KEY, code int NOT NULL, n int, doc text);
    CREATE UNIQUE INDEX moved_index_code ON public.moved_index (code);
    ALTER TABLE public.moved_index REPLICA IDENTITY USING INDEX moved_index_code;
    ALTER PUBLICATION pgfanout ADD TABLE public.moved_default, public.moved_full, public.moved_index;";

/// Incompressible text of about 32 KB, different per `seed`: stored out of line (TOAST).
fn big_doc_sql(seed: &str) -> String {
    format!("(SELECT string_agg(md5({seed}::text || '/' || i), '') FROM generate_series(1, 1000) i)")
}

/// Runs `statement` on each of the three tables; `{t}` stands for the table, `{key}` for
/// the column the devices key it by.
async fn on_each_table(client: &tokio_postgres::Client, statement: &str) {
    for (table, key) in [("moved_default", "id"), ("moved_full", "id"), ("moved_index", "code")] {
        let sql = statement.replace("{t}", &format!("public.{table}")).replace("{key}", key);
        client.batch_execute(&sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_change_keeps_unchanged_toasted_values_on_every_replica_identity() {
    let mut p = Pipeline::new("toastmove").await;
    let client = p.client().await;
    client.batch_execute(MOVED_TABLES).await.unwrap();
    let insert = |ids: &str| format!("INSERT INTO {{t}} SELECT i, i, 0, {} FROM unnest('{{{ids}}}'::int[]) i", big_doc_sql("i"));
    // Rows 1 and 2 reach the device through the initial snapshot, 3 and 4 streamed.
    on_each_table(&client, &insert("1,2")).await;
    p.start_capture().await;
    p.start_device("a", &[]);
    p.start_device("b", &["--batch-size", "7"]);
    on_each_table(&client, &insert("3,4,5")).await;
    p.wait_converged(&["a", "b"]).await;
    for table in ["moved_default", "moved_full", "moved_index"] {
        let out_of_line: i64 = client
            .query_one(
                &format!("SELECT pg_relation_size(reltoastrelid) FROM pg_class WHERE oid = 'public.{table}'::regclass"),
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(out_of_line > 0, "{table}'s docs are TOASTed out of line");
    }

    // Key changes that leave the doc as it is, among other writes: a move alone, a move with
    // another column changed, moves of several rows in one statement.
    on_each_table(
        &client,
        "BEGIN;
         UPDATE {t} SET {key} = {key} + 100 WHERE id = 1;
         UPDATE {t} SET n = n + 1 WHERE id = 2;
         UPDATE {t} SET {key} = {key} + 100, n = 7 WHERE id = 3;
         COMMIT;
         UPDATE {t} SET {key} = {key} + 1000 WHERE id IN (4, 5);",
    )
    .await;
    on_each_table(&client, &insert("7")).await;
    p.wait_converged(&["a", "b"]).await;

    // After: the moved rows change again with the doc unchanged, and an old key is used
    // again by a new row.
    on_each_table(
        &client,
        &format!(
            "UPDATE {{t}} SET n = n + 10 WHERE {{key}} IN (101, 103, 1004);
             INSERT INTO {{t}} VALUES (CASE WHEN '{{key}}' = 'id' THEN 1 ELSE 6 END, 1, 0, {})",
            big_doc_sql("600")
        ),
    )
    .await;
    p.wait_converged(&["a", "b"]).await;
    let conn = pgfanout::verify::open_store_read_only(&p.store("b")).unwrap();
    for (table, moved_key) in [("moved_default", "id = 101"), ("moved_full", "id = 101"), ("moved_index", "code = 101")] {
        let len: i64 =
            conn.query_row(&format!("SELECT length(doc) FROM \"public.{table}\" WHERE {moved_key}"), [], |r| r.get(0)).unwrap();
        assert_eq!(len, 32_000, "{table}: the moved row kept its doc");
    }

    // A device that reads the whole history now may read a move before the old row it
    // moves: with REPLICA IDENTITY FULL the delta carries the unchanged value itself, so it
    // needs nothing from the device; on every table no old key comes back.
    p.start_device("c", &["--batch-size", "5"]);
    let tables = p.tables().await;
    pgfanout::test_support::wait_for("device c to hold every row", pgfanout::test_support::TIMEOUT, || async {
        // The device makes its store when it starts; until then there is nothing to read.
        if !p.store("c").exists() {
            return None;
        }
        let (pg, dev) = (p.postgres_rows().await, p.device_rows("c").await);
        let keys = |rows: &std::collections::BTreeMap<String, pgfanout::verify::Rows>, t: &str| {
            rows.get(t).map(|r| r.keys().cloned().collect::<Vec<_>>())
        };
        let same_keys = tables.iter().all(|t| keys(&pg, &t.name.to_string()) == keys(&dev, &t.name.to_string()));
        (same_keys && pg.get("public.moved_full") == dev.get("public.moved_full")).then_some(())
    })
    .await;
    p.stop("device-a");
    p.stop("device-b");
    p.stop("device-c");
    p.stop("capture");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_change_leaves_a_tombstone_so_a_compacted_topic_never_brings_the_old_row_back() {
    use pgfanout::contract::{codec::decode_delta, delta_kafka_key, Column, DeltaOp, Value};
    let mut p = Pipeline::new("movetomb").await;
    let client = p.client().await;
    client
        .batch_execute(&format!(
            "{MOVED_TABLES}
             INSERT INTO public.moved_default SELECT i, i, 0, 'small ' || i FROM generate_series(1, 3) i;
             INSERT INTO public.moved_full SELECT i, i, 0, {} FROM generate_series(1, 3) i;",
            big_doc_sql("i")
        ))
        .await
        .unwrap();
    p.start_capture().await;
    p.start_device("a", &[]);
    // Moves, then later changes of the moved rows: compaction keeps those under the new
    // keys and drops the moves' own deltas.
    client
        .batch_execute(
            "UPDATE public.moved_default SET id = id + 100 WHERE id IN (1, 2);
             UPDATE public.moved_full SET id = id + 100 WHERE id IN (1, 2);
             INSERT INTO public.moved_default VALUES (4, 4, 0, 'during');
             UPDATE public.moved_default SET n = n + 1 WHERE id IN (101, 102);
             UPDATE public.moved_full SET n = n + 1 WHERE id IN (101, 102);
             INSERT INTO public.moved_default VALUES (2, 2, 5, 'the old key again');",
        )
        .await
        .unwrap();
    p.wait_converged(&["a"]).await;
    p.wait_deltas_settled().await;

    let records = p.delta_topic_records();
    let old_key = |id| vec![Column { name: "id".into(), type_name: "int4".into(), value: Value::Long(id), unchanged: false }];
    let tombstone = records.iter().find(|r| r.key == delta_kafka_key("public.moved_default", &old_key(1)) && r.payload.is_none());
    let tombstone = tombstone.expect("a Kafka tombstone under the old key of the moved row");
    let moved = decode_delta(tombstone.header.as_deref().expect("the tombstone carries the move")).unwrap();
    assert_eq!((moved.op, moved.after.is_none()), (DeltaOp::Update, true));
    assert_eq!((moved.key[0].value.clone(), moved.old_key.unwrap()[0].value.clone()), (Value::Long(101), Value::Long(1)));
    let update_partition = records
        .iter()
        .find(|r| {
            r.payload
                .as_deref()
                .and_then(|v| decode_delta(v).ok())
                .is_some_and(|d| d.old_key.is_some() && d.key[0].value == Value::Long(101))
        })
        .map(|r| r.partition);
    assert!(update_partition.is_some(), "the move's own delta is on the topic");

    // Rebuilt from what compaction leaves, before and after it drops the tombstones: the
    // old keys stay gone, every column equals PostgreSQL.
    p.assert_rebuilt_from_compacted_equals_postgres(&records).await;
    p.stop("device-a");
    p.stop("capture");
}

/// The body of `http://addr/metrics` (plain HTTP/1.0, no chunking).
fn metrics_body(addr: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(addr) else { return String::new() };
    let _ = write!(stream, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domains_negative_zero_generated_columns_and_keyless_tables() {
    let mut p = Pipeline::new("smaller").await;
    let client = p.client().await;
    client
        .batch_execute(
            "CREATE DOMAIN positive AS integer CHECK (VALUE > 0);
             CREATE DOMAIN small_positive AS positive CHECK (VALUE < 1000);
             CREATE TABLE public.odd (id int PRIMARY KEY, dm positive, dm2 small_positive, r real, d float8,
                                      twice int GENERATED ALWAYS AS (id * 2) STORED);
             CREATE TABLE public.nokey (id int, v text);
             ALTER PUBLICATION pgfanout ADD TABLE public.odd, public.nokey;
             INSERT INTO public.odd VALUES (1, 7, 8, '-0', '-0'), (2, 1, 2, '0', '0');
             INSERT INTO public.nokey VALUES (1, 'before');",
        )
        .await
        .unwrap();
    let metrics = format!("127.0.0.1:{}", pgfanout::test_support::env::free_port());
    p.start_capture_with(&["--metrics-addr", &metrics]).await;
    p.start_device("a", &[]);
    client
        .batch_execute(
            "INSERT INTO public.odd VALUES (3, 9, 10, '-0', '-0'), (4, 2, 3, 1.5, -0.0::float8 * 1);
             INSERT INTO public.nokey VALUES (2, 'during');
             UPDATE public.odd SET r = -r, d = -d WHERE id = 2;",
        )
        .await
        .unwrap();
    p.wait_converged(&["a"]).await;
    let conn = pgfanout::verify::open_store_read_only(&p.store("a")).unwrap();
    let (dm_type, r): (String, pgfanout::contract::Value) = conn
        .query_row("SELECT typeof(dm) || '/' || typeof(dm2), r FROM \"public.odd\" WHERE id = 1", [], |r| {
            Ok((r.get(0)?, pgfanout::device::store::value_from_sqlite("float4", r.get_ref(1)?)))
        })
        .unwrap();
    assert_eq!(dm_type, "integer/integer", "a domain over an integer is an integer on both paths");
    assert!(matches!(r, pgfanout::contract::Value::Double(f) if f == 0.0 && f.is_sign_negative()), "-0 kept its sign: {r:?}");
    let rejected: i64 = conn.query_row("SELECT count(*) FROM _pgfanout_rejected", [], |r| r.get(0)).unwrap();
    assert_eq!(rejected, 0, "nothing the device had to reject");

    // The keyless table is refused by name, counted and alerted on; the rest goes on.
    let log = std::fs::read_to_string(p.log("capture")).unwrap();
    assert!(log.contains("table public.nokey has no primary key") && log.contains("ADD PRIMARY KEY"), "{log}");
    pgfanout::test_support::wait_for("the refusal metrics", pgfanout::test_support::TIMEOUT, || async {
        let body = metrics_body(&metrics);
        (body.contains("pgfanout_capture_refused_tables 1") && body.contains("pgfanout_capture_refused_changes_total"))
            .then_some(())
    })
    .await;
    let store = p.store("a").to_string_lossy().into_owned();
    let out = p.run_cli(&["verify", "--store", &store]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("1 of 1 devices match") && stdout.contains("not compared: public.nokey"), "{stdout}");

    // Given a key, the table is captured again; its rows reach devices as they change.
    client
        .batch_execute(
            "ALTER TABLE public.nokey ADD PRIMARY KEY (id);
             UPDATE public.nokey SET v = v || ' and after';
             INSERT INTO public.nokey VALUES (3, 'after');
             INSERT INTO public.odd VALUES (5, 5, 5, '-0', 'NaN');",
        )
        .await
        .unwrap();
    p.wait_converged(&["a"]).await;
    let rows = p.device_rows("a").await;
    assert_eq!(rows.get("public.nokey").map(|r| r.len()), Some(3), "{rows:?}");
    pgfanout::test_support::wait_for("the refusal to end", pgfanout::test_support::TIMEOUT, || async {
        metrics_body(&metrics).contains("pgfanout_capture_refused_tables 0").then_some(())
    })
    .await;
    p.stop("device-a");
    p.stop("capture");
}

//! DDL on published tables, written straight to PostgreSQL while rows change around it:
//! devices end with PostgreSQL's tables, columns and rows. Device `a` runs throughout;
//! device `b` starts afterwards and reads the deltas topic from its beginning.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pgfanout::test_support::Pipeline;

const ROWS: i32 = 300;

/// A pipeline with `pgfanout setup` run, tables `public.<name>(id, n, note, amount)` of
/// [`ROWS`] rows each in the publication, capture and device `a` running, and some
/// streamed changes behind them.
async fn pipeline_with_tables(test: &str, tables: &[&str]) -> Pipeline {
    let mut p = Pipeline::new(test).await;
    let client = p.client().await;
    for t in tables {
        client
            .batch_execute(&format!(
                "CREATE TABLE public.{t} (id int PRIMARY KEY, n int NOT NULL DEFAULT 0, note text, amount int);
                 INSERT INTO public.{t} SELECT g, g, 'note ' || g, g * 10 FROM generate_series(1, {ROWS}) g;
                 ALTER PUBLICATION pgfanout ADD TABLE public.{t};"
            ))
            .await
            .unwrap();
    }
    let out = p.run_cli(&["setup"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    p.start_capture().await;
    p.start_device("a", &[]);
    for t in tables {
        client.batch_execute(&format!("UPDATE public.{t} SET n = n + 1000 WHERE id % 10 = 0")).await.unwrap();
    }
    p
}

/// Writes to `tables` (each by any of its names; statements on a name that does not exist
/// fail and are skipped) in small transactions until stopped: updates, inserts, deletes.
struct Writer {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<u64>,
}

impl Writer {
    async fn start(p: &Pipeline, tables: &[&[&str]]) -> Writer {
        let client = p.client().await;
        let tables: Vec<Vec<String>> = tables.iter().map(|names| names.iter().map(|n| n.to_string()).collect()).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut written = 0u64;
            let mut i = 0i32;
            while !flag.load(Ordering::Relaxed) {
                i += 1;
                for names in &tables {
                    for t in names {
                        let sql = match i % 5 {
                            0 => format!("INSERT INTO public.{t} (id, n) VALUES ({}, {i}) ON CONFLICT DO NOTHING", 10_000 + i),
                            1 => format!("DELETE FROM public.{t} WHERE id = {}", (i * 7) % ROWS + 1),
                            _ => format!("UPDATE public.{t} SET n = n + 1 WHERE id = {}", (i * 13) % ROWS + 1),
                        };
                        if client.batch_execute(&sql).await.is_ok() {
                            written += 1;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            written
        });
        Writer { stop, task }
    }

    async fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

/// The non-bookkeeping tables of a device store and their columns.
fn device_shape(p: &Pipeline, device: &str) -> Vec<(String, BTreeSet<String>)> {
    let conn = pgfanout::verify::open_store_read_only(&p.store(device)).unwrap();
    let mut stmt = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE '\\_pgfanout\\_%' ESCAPE '\\' ORDER BY 1")
        .unwrap();
    let names: Vec<String> = stmt.query_map([], |r| r.get(0)).unwrap().map(Result::unwrap).collect();
    names
        .into_iter()
        .map(|name| {
            let mut stmt = conn.prepare(&format!("SELECT name FROM pragma_table_info('{}')", name.replace('\'', "''"))).unwrap();
            let columns = stmt
                .query_map([], |r| r.get::<_, String>(0))
                .unwrap()
                .map(Result::unwrap)
                .filter(|c| !c.starts_with("_pgfanout_"))
                .collect();
            (name, columns)
        })
        .collect()
}

/// PostgreSQL's published tables that hold rows, and their columns.
async fn postgres_shape(p: &Pipeline) -> Vec<(String, BTreeSet<String>)> {
    let client = p.client().await;
    let mut out = Vec::new();
    for t in p.tables().await {
        let rows: i64 = client.query_one(&format!("SELECT count(*) FROM {}", t.name.quoted()), &[]).await.unwrap().get(0);
        if rows > 0 {
            out.push((t.name.to_string(), t.columns.iter().map(|c| c.name.clone()).collect()));
        }
    }
    out.sort();
    out
}

/// Devices `a` and then a new device `b` hold exactly PostgreSQL's published tables, with
/// its columns and rows.
async fn assert_devices_equal_postgres(p: &mut Pipeline) {
    for device in ["a", "b"] {
        if device == "b" {
            p.start_device("b", &[]);
        }
        let diverged = p.diverged_after(&[device], Duration::from_secs(40)).await;
        assert!(diverged.is_empty(), "device {device}'s rows differ from PostgreSQL's: {}", rows_difference(p, device).await);
        // PostgreSQL's side is read once: with the race test's thousand padding tables one
        // reading takes seconds on a loaded machine, and it does not change while we wait.
        let expected = postgres_shape(p).await;
        let published: BTreeSet<String> = p.tables().await.iter().map(|t| t.name.to_string()).collect();
        let matches = || {
            let got = device_shape(p, device);
            let extra_or_wrong =
                got.iter().any(|(t, cols)| !published.contains(t) || expected.iter().any(|(e, c)| e == t && c != cols));
            let missing = expected.iter().any(|(t, _)| !got.iter().any(|(g, _)| g == t));
            !extra_or_wrong && !missing
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(25);
        while !matches() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(matches(), "device {device} has tables {:?}, PostgreSQL publishes {expected:?}", device_shape(p, device));
    }
}

async fn rows_difference(p: &Pipeline, device: &str) -> String {
    let expected = p.postgres_rows().await;
    let got = p.device_rows(device).await;
    for (table, rows) in &expected {
        let theirs = got.get(table).cloned().unwrap_or_default();
        for (key, row) in rows {
            if theirs.get(key) != Some(row) {
                return format!(
                    "{table} {key}: postgres {row}, device {:?} ({} rows against {})",
                    theirs.get(key),
                    theirs.len(),
                    rows.len()
                );
            }
        }
        if theirs.len() != rows.len() {
            return format!("{table}: {} rows on the device against {}", theirs.len(), rows.len());
        }
    }
    "none found on a second look".into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn added_columns_with_defaults_reach_rows_no_change_touched() {
    let mut p = pipeline_with_tables("ddl_add", &["ddl_add"]).await;
    let writer = Writer::start(&p, &[&["ddl_add"]]).await;
    let client = p.client().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Constant defaults (kept in the catalog as the rows' missing value), a stable one
    // (now(): evaluated once, also a missing value) and a volatile one (random(): the table
    // is rewritten, outside the logical stream).
    for ddl in [
        "ALTER TABLE public.ddl_add ADD COLUMN seven int DEFAULT 7",
        "ALTER TABLE public.ddl_add ADD COLUMN eight int NOT NULL DEFAULT 8",
        "ALTER TABLE public.ddl_add ADD COLUMN added_at timestamptz DEFAULT now()",
        "ALTER TABLE public.ddl_add ADD COLUMN dice float8 NOT NULL DEFAULT random()",
        "BEGIN; ALTER TABLE public.ddl_add ADD COLUMN label text NOT NULL DEFAULT 'x'; UPDATE public.ddl_add SET label = 'y' WHERE id = 2; COMMIT",
    ] {
        client.batch_execute(ddl).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(writer.finish().await > 0);
    client.batch_execute("UPDATE public.ddl_add SET seven = 70 WHERE id = 3").await.unwrap();
    assert_devices_equal_postgres(&mut p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renamed_and_retyped_columns_keep_every_value() {
    let mut p = pipeline_with_tables("ddl_cols", &["ddl_cols"]).await;
    let writer = Writer::start(&p, &[&["ddl_cols"]]).await;
    let client = p.client().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for ddl in [
        "ALTER TABLE public.ddl_cols RENAME COLUMN note TO remark",
        "ALTER TABLE public.ddl_cols ALTER COLUMN amount TYPE text USING 'amount ' || amount",
        "ALTER TABLE public.ddl_cols ALTER COLUMN n TYPE bigint USING n * 2",
        "ALTER TABLE public.ddl_cols DROP COLUMN remark",
    ] {
        client.batch_execute(ddl).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(writer.finish().await > 0);
    client.batch_execute("UPDATE public.ddl_cols SET amount = 'later' WHERE id = 4").await.unwrap();
    assert_devices_equal_postgres(&mut p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renamed_dropped_and_unpublished_tables_leave_devices() {
    let tables = ["ddl_old", "ddl_gone", "ddl_unpub", "ddl_kept"];
    let mut p = pipeline_with_tables("ddl_tables", &tables).await;
    let writer = Writer::start(&p, &[&["ddl_old", "ddl_new"], &["ddl_gone"], &["ddl_unpub"], &["ddl_kept"]]).await;
    let client = p.client().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for ddl in [
        "ALTER TABLE public.ddl_old RENAME TO ddl_new",
        "DROP TABLE public.ddl_gone",
        "ALTER PUBLICATION pgfanout DROP TABLE public.ddl_unpub",
    ] {
        client.batch_execute(ddl).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(writer.finish().await > 0);
    assert_devices_equal_postgres(&mut p).await;
    let names: Vec<String> = device_shape(&p, "a").into_iter().map(|(t, _)| t).collect();
    assert_eq!(names, ["public.ddl_kept", "public.ddl_new"], "device a's tables");
}

/// A primary key changed while rows are written: devices make the table anew with the new
/// key from an online copy, so rows only the new key tells apart stay apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_primary_key_reaches_devices() {
    let mut p = pipeline_with_tables("ddl_pkey", &["ddl_pkey"]).await;
    let writer = Writer::start(&p, &[&["ddl_pkey"]]).await;
    let client = p.client().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    client.batch_execute("ALTER TABLE public.ddl_pkey DROP CONSTRAINT ddl_pkey_pkey, ADD PRIMARY KEY (id, n)").await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(writer.finish().await > 0);
    client
        .batch_execute(
            "INSERT INTO public.ddl_pkey (id, n, note) SELECT id, n + 100000, 'twin' FROM public.ddl_pkey WHERE id <= 20",
        )
        .await
        .unwrap();
    assert_devices_equal_postgres(&mut p).await;
    for device in ["a", "b"] {
        let conn = pgfanout::verify::open_store_read_only(&p.store(device)).unwrap();
        let mut stmt = conn.prepare("SELECT name FROM pragma_table_info('public.ddl_pkey') WHERE pk > 0 ORDER BY pk").unwrap();
        let key: Vec<String> = stmt.query_map([], |r| r.get(0)).unwrap().map(Result::unwrap).collect();
        assert_eq!(key, ["id", "n"], "device {device}'s table is keyed as PostgreSQL's");
    }
}

/// Capture SIGKILLed twice in the middle of copying a table again after DDL, writes going
/// on: each next capture reads the statement's transaction again from its slot and copies
/// again, and devices end with PostgreSQL's rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_killed_in_the_middle_of_a_copy_copies_again() {
    let mut p = pipeline_with_tables("ddl_kill", &["ddl_kill"]).await;
    let client = p.client().await;
    client
        .batch_execute("INSERT INTO public.ddl_kill SELECT g, g, 'bulk ' || g, g FROM generate_series(20000, 150000) g")
        .await
        .unwrap();
    let writer = Writer::start(&p, &[&["ddl_kill"]]).await;
    client.batch_execute("ALTER TABLE public.ddl_kill ADD COLUMN seven int DEFAULT 7").await.unwrap();
    let log = p.log("capture");
    let copies = || std::fs::read_to_string(&log).unwrap_or_default().matches("copying it again").count();
    for killed in 1..=2 {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while copies() < killed {
            assert!(std::time::Instant::now() < deadline, "capture never began copy {killed}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        p.kill("capture");
        p.start_capture().await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(writer.finish().await > 0);
    assert_devices_equal_postgres(&mut p).await;
    assert!(copies() >= 3, "the copy ran again after each kill");
}

/// Published tables besides the one the race test copies: capture reads every published
/// table's columns under a copy's snapshot before it opens the copy's cursor, so they make
/// that window long enough to commit a statement in.
const PADDING_TABLES: usize = 1000;

/// A column renamed after capture took the snapshot for a copy and before the copy's
/// cursor opened: capture takes another snapshot instead of failing on the column the
/// first one saw, and devices end with PostgreSQL's rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_renamed_while_a_copy_begins_is_copied_under_a_new_snapshot() {
    let mut p = Pipeline::new("ddl_race").await;
    let client = p.client().await;
    client
        .batch_execute(&format!(
            "CREATE TABLE public.ddl_race (id int PRIMARY KEY, n int NOT NULL DEFAULT 0, note text, amount int);
             INSERT INTO public.ddl_race SELECT g, g, 'note ' || g, g * 10 FROM generate_series(1, {ROWS}) g;
             ALTER PUBLICATION pgfanout ADD TABLE public.ddl_race;
             DO $$ BEGIN FOR i IN 1..{PADDING_TABLES} LOOP
                 EXECUTE format('CREATE TABLE public.pad_%s (id int PRIMARY KEY); ALTER PUBLICATION pgfanout ADD TABLE public.pad_%s', i, i);
             END LOOP; END $$;"
        ))
        .await
        .unwrap();
    let out = p.run_cli(&["setup"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    p.start_capture().await;
    p.start_device("a", &[]);
    client.batch_execute("ALTER TABLE public.ddl_race ADD COLUMN extra int DEFAULT 3").await.unwrap();
    // The copy's temporary slot is made and its snapshot exported (the slot's session waits,
    // idle in its transaction), the cursor not yet open. Other tests' captures copy too.
    let copying = "SELECT count(*) FROM pg_stat_activity
                    WHERE backend_type = 'walsender' AND datname = current_database() AND state = 'idle in transaction'
                      AND query LIKE 'CREATE_REPLICATION_SLOT %recopy%'";
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while client.query_one(copying, &[]).await.unwrap().get::<_, i64>(0) == 0 {
        assert!(std::time::Instant::now() < deadline, "capture never began the copy");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    client.batch_execute("ALTER TABLE public.ddl_race RENAME COLUMN note TO remark").await.unwrap();
    client.batch_execute("UPDATE public.ddl_race SET remark = 'later' WHERE id = 5").await.unwrap();
    assert_devices_equal_postgres(&mut p).await;
    p.assert_running("capture");
    let log = std::fs::read_to_string(p.log("capture")).unwrap();
    assert!(log.contains("taking another"), "the rename did not land between the snapshot and the cursor:\n{log}");
}

/// With PostgreSQL's default JIT settings, the event trigger that runs after every DDL
/// statement compiles nothing: its catalog query looks costly to the planner (about 650,000
/// for a one-table publication, past `jit_above_cost`), and compiling it took 0.6 s of CPU
/// after every statement, `CREATE … IF NOT EXISTS` that changed nothing included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ddl_statements_compile_nothing_in_the_event_trigger() {
    use futures::StreamExt;
    let p = Pipeline::new("ddl_jit").await;
    let out = p.run_cli(&["setup"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (client, mut connection) = tokio_postgres::connect(&p.postgres.conninfo, tokio_postgres::NoTls).await.unwrap();
    let (tx, mut notices) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(tokio_postgres::AsyncMessage::Notice(n))) = messages.next().await {
            let _ = tx.send(n.message().to_string());
        }
    });
    let jit: bool = client.query_one("SELECT pg_jit_available()", &[]).await.unwrap().get(0);
    assert!(jit, "this PostgreSQL has no JIT; the test would show nothing");
    // Every plan executed, nested ones included, comes back as a notice, with a "JIT:"
    // section when it was compiled.
    client
        .batch_execute(
            "LOAD 'auto_explain';
             SET auto_explain.log_min_duration = 0; SET auto_explain.log_nested_statements = on;
             SET auto_explain.log_level = notice; SET client_min_messages = notice;
             SET jit = on; RESET jit_above_cost;
             CREATE TABLE IF NOT EXISTS public.ddl_jit (id int PRIMARY KEY);
             ALTER PUBLICATION pgfanout ADD TABLE public.ddl_jit;",
        )
        .await
        .unwrap();
    drop(client);
    let mut plans = Vec::new();
    while let Some(n) = notices.recv().await {
        plans.push(n);
    }
    assert!(plans.iter().any(|n| n.contains("published_now")), "the trigger's statements were explained: {plans:?}");
    let compiled: Vec<&String> = plans.iter().filter(|n| n.contains("JIT:")).collect();
    assert!(compiled.is_empty(), "compiled in the trigger: {compiled:?}");
}

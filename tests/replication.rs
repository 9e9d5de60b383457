//! End-to-end tests of the replication client and the pgoutput decoder
//! against a real PostgreSQL (15+) server.
//!
//! Environment (set by `deploy/local/test.sh`):
//! - `PGFANOUT_TEST_POSTGRES`: libpq conninfo of a superuser that connects
//!   without a password (trust), on a server with `wal_level = logical`.
//! - `PGFANOUT_TEST_PG_MD5`, `PGFANOUT_TEST_PG_SCRAM`, `PGFANOUT_TEST_PG_PASSWORD`:
//!   conninfo (with password) of roles with REPLICATION whose pg_hba.conf
//!   lines use md5, scram-sha-256 and password respectively.
//! - `PGFANOUT_TEST_PG_UNIX`: conninfo using a Unix-domain socket directory as host.

use std::time::{Duration, Instant};

use pgfanout::capture::pgoutput::{self, OldTuple, PgOutputMessage, TupleValue};
use pgfanout::capture::replication::{
    format_lsn, parse_lsn, Lsn, ReplicationClient, ReplicationConfig, ReplicationError, ReplicationEvent, ReplicationStream,
};
use pgfanout::test_support::{required_env, sql_client, unique_name, wait_for};

const WAIT: Duration = Duration::from_secs(30);

/// The conninfo in `var` (the suite runner sets it) as a replication configuration.
fn replication_config(var: &str) -> ReplicationConfig {
    ReplicationConfig::from_conninfo(&required_env(var)).unwrap()
}

/// The test server's superuser, as a replication configuration and a SQL connection.
async fn superuser() -> (ReplicationConfig, tokio_postgres::Client) {
    (replication_config("PGFANOUT_TEST_POSTGRES"), sql_client(&required_env("PGFANOUT_TEST_POSTGRES")).await)
}

/// Reads events until `done` says the collected messages are complete,
/// answering keepalives that ask for a reply.
async fn collect_until(stream: &mut ReplicationStream, mut done: impl FnMut(&[PgOutputMessage]) -> bool) -> Vec<PgOutputMessage> {
    let deadline = Instant::now() + WAIT;
    let mut out = Vec::new();
    let mut last_end: Lsn = 0;
    while !done(&out) {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = tokio::time::timeout(left, stream.next_event())
            .await
            .expect("timed out waiting for replication data")
            .expect("replication stream error")
            .expect("stream ended early");
        match event {
            ReplicationEvent::XLogData { wal_start, data, .. } => {
                let msg = pgoutput::decode(&data).expect("decodable pgoutput payload");
                assert!(wal_start >= last_end || wal_start == 0, "WAL start went backwards");
                last_end = last_end.max(wal_start);
                out.push(msg);
            }
            ReplicationEvent::Keepalive { reply_requested, .. } => {
                if reply_requested {
                    stream.send_status(0, 0, 0, false).await.expect("status reply");
                }
            }
        }
    }
    out
}

async fn slot_row(sql: &tokio_postgres::Client, slot: &str) -> (bool, Option<Lsn>) {
    let row = sql
        .query_one("SELECT active, confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
        .await
        .expect("slot row");
    let lsn: Option<String> = row.get(1);
    (row.get(0), lsn.map(|s| parse_lsn(&s).unwrap()))
}

/// Waits until the slot is no longer in use.
async fn wait_inactive(sql: &tokio_postgres::Client, slot: &str) {
    wait_for("the slot to become inactive", WAIT, || async { (!slot_row(sql, slot).await.0).then_some(()) }).await;
}

fn text(s: &str) -> TupleValue {
    TupleValue::Text(s.as_bytes().to_vec().into())
}

/// Checks the messages of the first test transaction (an insert, an update and a delete of
/// one row of `table`, and a transactional message); returns its end LSN.
fn assert_first_transaction(msgs: &[PgOutputMessage], table: &str) -> Lsn {
    assert_eq!(msgs.len(), 7, "{msgs:#?}");
    let PgOutputMessage::Begin { final_lsn, xid, .. } = msgs[0] else { panic!("expected Begin, got {:?}", msgs[0]) };
    assert!(xid > 0);
    let PgOutputMessage::Relation(rel) = &msgs[1] else { panic!("expected Relation, got {:?}", msgs[1]) };
    assert_eq!(rel.namespace, "public");
    assert_eq!(rel.name, table);
    assert_eq!(rel.replica_identity, b'd');
    let cols: Vec<_> = rel.columns.iter().map(|c| (c.name.as_str(), c.is_key, c.type_oid)).collect();
    assert_eq!(cols, [("id", true, 23), ("name", false, 25)]);
    let rel_id = rel.id;
    assert_eq!(msgs[2], PgOutputMessage::Insert { relation_id: rel_id, new: vec![text("1"), text("a")] });
    assert_eq!(msgs[3], PgOutputMessage::Update { relation_id: rel_id, old: None, new: vec![text("1"), text("b")] });
    assert_eq!(msgs[4], PgOutputMessage::Delete { relation_id: rel_id, old: OldTuple::Key(vec![text("1"), TupleValue::Null]) });
    let PgOutputMessage::Message { transactional, prefix, content, .. } = &msgs[5] else {
        panic!("expected Message, got {:?}", msgs[5])
    };
    assert!(*transactional);
    assert_eq!(prefix, "pgfanout");
    assert_eq!(content, b"x");
    let PgOutputMessage::Commit { commit_lsn, end_lsn, .. } = msgs[6] else { panic!("expected Commit, got {:?}", msgs[6]) };
    assert_eq!(commit_lsn, final_lsn);
    assert!(end_lsn > commit_lsn);
    end_lsn
}

/// The new rows of the inserts among `msgs`; panics on an update or a delete.
fn inserted_rows_only(msgs: &[PgOutputMessage]) -> Vec<Vec<TupleValue>> {
    msgs.iter()
        .filter_map(|m| match m {
            PgOutputMessage::Insert { new, .. } => Some(new.clone()),
            PgOutputMessage::Update { .. } | PgOutputMessage::Delete { .. } => {
                panic!("replayed {m:?}")
            }
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn stream_decode_and_confirm() {
    let (cfg, sql) = superuser().await;
    let table = unique_name("it_items");
    let publication = unique_name("it_pub");
    let slot = unique_name("it_slot");
    sql.batch_execute(&format!(
        "CREATE TABLE {table} (id int PRIMARY KEY, name text NOT NULL);
         CREATE PUBLICATION {publication} FOR TABLE {table};"
    ))
    .await
    .unwrap();

    let mut repl = ReplicationClient::connect(&cfg).await.unwrap();
    assert!(repl.backend_pid().is_some());
    assert!(repl.parameter("server_version").is_some());
    let sys = repl.identify_system().await.unwrap();
    assert!(sys.timeline >= 1);
    assert!(sys.xlogpos > 0);
    assert!(!sys.systemid.is_empty());
    assert_eq!(sys.dbname.as_deref(), Some(cfg.dbname.as_str()));

    let created = repl.create_logical_slot(&slot, false).await.unwrap();
    assert_eq!(created.slot_name, slot);
    assert!(created.consistent_point >= sys.xlogpos);
    assert_eq!(created.snapshot_name, None);
    let dup = repl.create_logical_slot(&slot, false).await.unwrap_err();
    assert_eq!(dup.sqlstate(), Some("42710"), "{dup}");

    let mut stream = repl.start_replication(&slot, 0, &publication).await.unwrap();

    sql.batch_execute(&format!(
        "BEGIN;
         INSERT INTO {table} VALUES (1, 'a');
         UPDATE {table} SET name = 'b' WHERE id = 1;
         DELETE FROM {table} WHERE id = 1;
         SELECT pg_logical_emit_message(true, 'pgfanout', 'x');
         COMMIT;"
    ))
    .await
    .unwrap();

    let msgs = collect_until(&mut stream, |m| matches!(m.last(), Some(PgOutputMessage::Commit { .. }))).await;
    let end_lsn = assert_first_transaction(&msgs, &table);

    let (active, before) = slot_row(&sql, &slot).await;
    assert!(active);
    assert!(before.unwrap_or(0) < end_lsn, "slot already confirmed {:?}", before.map(format_lsn));
    stream.send_status(end_lsn, end_lsn, end_lsn, false).await.unwrap();
    wait_for("confirmed_flush_lsn to advance", WAIT, || async { (slot_row(&sql, &slot).await.1 == Some(end_lsn)).then_some(()) })
        .await;

    stream.close().await.unwrap();
    wait_inactive(&sql, &slot).await;

    // Resuming streams only what was not confirmed.
    let repl = ReplicationClient::connect(&cfg).await.unwrap();
    let mut stream = repl.start_replication(&slot, 0, &publication).await.unwrap();
    sql.execute(&format!("INSERT INTO {table} VALUES (2, 'c')"), &[]).await.unwrap();
    let msgs = collect_until(&mut stream, |m| matches!(m.last(), Some(PgOutputMessage::Commit { .. }))).await;
    let inserts = inserted_rows_only(&msgs);
    assert_eq!(inserts, vec![vec![text("2"), text("c")]]);

    // A second consumer of an active slot gets a transient "in use" error.
    let other = ReplicationClient::connect(&cfg).await.unwrap();
    let busy = other.start_replication(&slot, 0, &publication).await.unwrap_err();
    assert_eq!(busy.sqlstate(), Some("55006"), "{busy}");
    assert!(busy.is_transient());

    // A terminated walsender surfaces as a transient server error.
    sql.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
        .await
        .unwrap();
    let err = loop {
        match tokio::time::timeout(WAIT, stream.next_event()).await.expect("timed out") {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("stream ended without an error"),
            Err(e) => break e,
        }
    };
    assert!(err.is_transient(), "{err}");
    let again = stream.next_event().await.unwrap_err();
    assert!(again.is_transient(), "{again}");
    assert!(stream.send_status(0, 0, 0, false).await.is_err());
    let _ = stream.close().await;

    wait_inactive(&sql, &slot).await;
    let mut repl = ReplicationClient::connect(&cfg).await.unwrap();
    repl.drop_slot(&slot, true).await.unwrap();
    let err = repl.drop_slot(&slot, false).await.unwrap_err();
    assert_eq!(err.sqlstate(), Some("42704"), "{err}");
    sql.batch_execute(&format!("DROP PUBLICATION {publication}; DROP TABLE {table};")).await.unwrap();
}

#[tokio::test]
async fn large_values_arrive_intact() {
    let (cfg, sql) = superuser().await;
    let table = unique_name("it_big");
    let publication = unique_name("it_bigpub");
    let slot = unique_name("it_bigslot");
    sql.batch_execute(&format!(
        "CREATE TABLE {table} (id int PRIMARY KEY, body text, raw bytea);
         CREATE PUBLICATION {publication} FOR TABLE {table};"
    ))
    .await
    .unwrap();
    let mut repl = ReplicationClient::connect(&cfg).await.unwrap();
    repl.create_logical_slot(&slot, false).await.unwrap();
    let mut stream = repl.start_replication(&slot, 0, &publication).await.unwrap();

    const LEN: usize = 6 * 1024 * 1024;
    sql.batch_execute(&format!(
        "INSERT INTO {table} SELECT 1, string_agg(md5(i::text), ''), NULL FROM generate_series(1, {}) i;
         INSERT INTO {table} SELECT g, repeat('y', g), decode('00ff', 'hex') FROM generate_series(2, 500) g;",
        LEN / 32
    ))
    .await
    .unwrap();
    let msgs =
        collect_until(&mut stream, |m| m.iter().filter(|m| matches!(m, PgOutputMessage::Commit { .. })).count() == 2).await;
    let inserts: Vec<_> = msgs
        .iter()
        .filter_map(|m| match m {
            PgOutputMessage::Insert { new, .. } => Some(new),
            _ => None,
        })
        .collect();
    assert_eq!(inserts.len(), 500);
    let TupleValue::Text(big) = &inserts[0][1] else { panic!("{:?}", inserts[0][0]) };
    assert_eq!(big.len(), LEN);
    assert_eq!(inserts[0][2], TupleValue::Null);
    for (i, row) in inserts.iter().enumerate().skip(1) {
        assert_eq!(row[0], text(&(i + 1).to_string()));
        assert_eq!(row[1], text(&"y".repeat(i + 1)));
        assert_eq!(row[2], text("\\x00ff"));
    }
    stream.close().await.unwrap();
    wait_inactive(&sql, &slot).await;
    sql.batch_execute(&format!("SELECT pg_drop_replication_slot('{slot}'); DROP PUBLICATION {publication}; DROP TABLE {table};"))
        .await
        .unwrap();
}

#[tokio::test]
async fn keepalives_are_answered() {
    let (cfg, sql) = superuser().await;
    let slot = unique_name("it_ka");
    let publication = unique_name("it_kapub");
    sql.batch_execute(&format!("CREATE PUBLICATION {publication}")).await.unwrap();
    let mut repl = ReplicationClient::connect(&cfg).await.unwrap();
    // Replication connections to a database also run plain SQL.
    repl.simple_query("SET wal_sender_timeout = '2s'").await.unwrap();
    let shown = repl.simple_query("SHOW wal_sender_timeout").await.unwrap();
    assert_eq!(shown.rows, vec![vec![Some("2s".to_owned())]]);
    let created = repl.create_logical_slot(&slot, false).await.unwrap();
    let mut stream = repl.start_replication(&slot, created.consistent_point, &publication).await.unwrap();
    // Outlive several timeouts by answering the server's requests.
    let until = Instant::now() + Duration::from_secs(5);
    let mut requested = 0;
    while Instant::now() < until {
        match tokio::time::timeout(Duration::from_secs(3), stream.next_event()).await {
            Err(_) => continue,
            Ok(event) => {
                if let ReplicationEvent::Keepalive { wal_end, reply_requested: true, .. } = event.unwrap().unwrap() {
                    requested += 1;
                    stream.send_status(wal_end, wal_end, wal_end, false).await.unwrap();
                }
            }
        }
    }
    assert!(requested >= 2, "only {requested} keepalive requests");
    stream.close().await.unwrap();
    wait_inactive(&sql, &slot).await;
    sql.batch_execute(&format!("SELECT pg_drop_replication_slot('{slot}'); DROP PUBLICATION {publication};")).await.unwrap();
}

#[tokio::test]
async fn exported_snapshot_is_usable() {
    let (cfg, sql) = superuser().await;
    let slot = unique_name("it_snap");
    let mut repl = ReplicationClient::connect(&cfg).await.unwrap();
    let created = repl.create_logical_slot(&slot, true).await.unwrap();
    let snapshot = created.snapshot_name.expect("exported snapshot name");
    sql.batch_execute(&format!(
        "BEGIN ISOLATION LEVEL REPEATABLE READ; SET TRANSACTION SNAPSHOT '{snapshot}'; SELECT 1; COMMIT;"
    ))
    .await
    .unwrap();
    repl.drop_slot(&slot, false).await.unwrap();
}

#[tokio::test]
async fn server_errors_are_explained() {
    let cfg = replication_config("PGFANOUT_TEST_POSTGRES");

    let repl = ReplicationClient::connect(&cfg).await.unwrap();
    let err = repl.start_replication("it_no_such_slot", 0, "it_no_such_pub").await.unwrap_err();
    assert_eq!(err.sqlstate(), Some("42704"), "{err}");
    assert!(!err.is_transient());
    assert!(err.to_string().contains("slot"), "{err}");

    // The connection stays usable after a failed command.
    let mut repl = ReplicationClient::connect(&cfg).await.unwrap();
    assert!(repl.simple_query("DROP_REPLICATION_SLOT it_no_such_slot").await.is_err());
    repl.identify_system().await.unwrap();

    if cfg.password.is_none() {
        let sql = sql_client(&required_env("PGFANOUT_TEST_POSTGRES")).await;
        let role = unique_name("it_norepl");
        sql.batch_execute(&format!("CREATE ROLE {role} LOGIN")).await.unwrap();
        let mut c = cfg.clone();
        c.user = role.clone();
        let err = ReplicationClient::connect(&c).await.unwrap_err();
        assert_eq!(err.sqlstate(), Some("42501"), "{err}");
        assert!(err.to_string().contains("REPLICATION"), "{err}");
        sql.batch_execute(&format!("DROP ROLE {role}")).await.unwrap();
    }

    let mut c = cfg.clone();
    c.dbname = "it_no_such_database".into();
    let err = ReplicationClient::connect(&c).await.unwrap_err();
    assert_eq!(err.sqlstate(), Some("3D000"), "{err}");
}

async fn check_auth(var: &str) {
    let cfg = replication_config(var);
    assert!(cfg.password.is_some(), "{var} must include a password");
    let mut repl = ReplicationClient::connect(&cfg).await.unwrap();
    let sys = repl.identify_system().await.unwrap();
    assert!(sys.xlogpos > 0);

    let mut wrong = cfg.clone();
    wrong.password = Some("definitely-wrong".into());
    let err = ReplicationClient::connect(&wrong).await.unwrap_err();
    assert_eq!(err.sqlstate(), Some("28P01"), "{err}");
    assert!(!err.to_string().contains("definitely-wrong"));

    let mut missing = cfg.clone();
    missing.password = None;
    let err = ReplicationClient::connect(&missing).await.unwrap_err();
    assert!(matches!(err, ReplicationError::Auth(_)), "{err}");
}

#[tokio::test]
async fn auth_trust() {
    let cfg = replication_config("PGFANOUT_TEST_POSTGRES");
    let mut repl = ReplicationClient::connect(&cfg).await.unwrap();
    repl.identify_system().await.unwrap();
}

#[tokio::test]
async fn auth_md5() {
    check_auth("PGFANOUT_TEST_PG_MD5").await;
}

#[tokio::test]
async fn auth_scram_sha_256() {
    check_auth("PGFANOUT_TEST_PG_SCRAM").await;
}

#[tokio::test]
async fn auth_cleartext_password() {
    check_auth("PGFANOUT_TEST_PG_PASSWORD").await;
}

#[tokio::test]
async fn unix_socket() {
    let cfg = replication_config("PGFANOUT_TEST_PG_UNIX");
    assert!(cfg.host.starts_with('/'));
    let mut repl = ReplicationClient::connect(&cfg).await.unwrap();
    repl.identify_system().await.unwrap();
}

/// A role that pg_hba.conf admits only over TLS (`hostssl`), and the test CA.
fn tls_setup() -> (String, String, String) {
    let conninfo = required_env("PGFANOUT_TEST_PG_TLS");
    let dir = required_env("PGFANOUT_TEST_TLS_DIR");
    (conninfo, format!("{dir}/ca.crt"), format!("{dir}/other-ca.crt"))
}

#[tokio::test]
async fn tls_is_negotiated_and_the_certificate_verified() {
    let (conninfo, ca, other_ca) = tls_setup();
    // The role is refused without TLS, so a working connection is an encrypted one.
    for ok in [
        format!("{conninfo} sslmode=require"),
        format!("{conninfo} sslmode=verify-full sslrootcert={ca}"),
        format!("{} sslmode=verify-full sslrootcert={ca}", conninfo.replace("host=localhost", "host=127.0.0.1")),
        conninfo.clone(), // prefer, the default
    ] {
        let cfg = ReplicationConfig::from_conninfo(&ok).unwrap();
        let mut repl = ReplicationClient::connect(&cfg).await.unwrap_or_else(|e| panic!("{ok}: {e}"));
        repl.identify_system().await.unwrap();
        let client = pgfanout::pg::connect(&ok).await.unwrap_or_else(|e| panic!("{ok}: {e}"));
        let ssl: bool = client.query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[]).await.unwrap().get(0);
        assert!(ssl, "{ok}");
    }

    let plain = ReplicationConfig::from_conninfo(&format!("{conninfo} sslmode=disable")).unwrap();
    let err = ReplicationClient::connect(&plain).await.unwrap_err();
    assert_eq!(err.sqlstate(), Some("28000"), "{err}");
    assert!(pgfanout::pg::connect(&format!("{conninfo} sslmode=disable")).await.is_err());

    // A certificate that does not chain to the given CA is refused by both clients.
    let wrong = format!("{conninfo} sslmode=verify-ca sslrootcert={other_ca}");
    let err = ReplicationClient::connect(&ReplicationConfig::from_conninfo(&wrong).unwrap()).await.unwrap_err();
    assert!(err.to_string().contains("certificate verify failed"), "{err}");
    let err = pgfanout::pg::connect(&wrong).await.unwrap_err();
    assert!(format!("{err:?}").contains("certificate verify failed"), "{err:?}");
}

use super::stream::parse_copy_data;
use super::*;
use bytes::Bytes;

#[test]
fn lsn_round_trip() {
    assert_eq!(format_lsn(0), "0/0");
    assert_eq!(format_lsn(0x16_B374_D848), "16/B374D848");
    assert_eq!(parse_lsn("16/B374D848").unwrap(), 0x16_B374_D848);
    assert_eq!(parse_lsn("0/1a").unwrap(), 0x1a);
    assert_eq!(parse_lsn("FFFFFFFF/FFFFFFFF").unwrap(), u64::MAX);
    for bad in ["", "/", "1/", "/1", "1", "1/2/3", "+1/2", "1/-2", "123456789/0", "g/0"] {
        assert!(parse_lsn(bad).is_err(), "{bad:?}");
    }
    for lsn in [1u64, 0xFFFF_FFFF, 0x1_0000_0000, u64::MAX] {
        assert_eq!(parse_lsn(&format_lsn(lsn)).unwrap(), lsn);
    }
}

#[test]
fn conninfo_key_values() {
    let c = ReplicationConfig::from_conninfo("host=127.0.0.1 port=5433 user=app password='it''s \\'x\\' me' dbname = shop");
    // libpq does not treat '' as an escape: the value ends at the second quote.
    assert!(c.is_err());
    let c = ReplicationConfig::from_conninfo(
        "host=127.0.0.1 port=5433 user=app password='a \\'b\\' c' dbname = shop application_name=x",
    )
    .unwrap();
    assert_eq!(c.host, "127.0.0.1");
    assert_eq!(c.port, 5433);
    assert_eq!(c.user, "app");
    assert_eq!(c.password.as_deref(), Some("a 'b' c"));
    assert_eq!(c.dbname, "shop");
    assert_eq!(c.application_name, "x");
}

#[test]
fn conninfo_defaults() {
    let c = ReplicationConfig::from_conninfo("").unwrap();
    assert_eq!(c.host, "localhost");
    assert_eq!(c.port, 5432);
    assert_eq!(c.user, "postgres");
    assert_eq!(c.password, None);
    assert_eq!(c.dbname, "postgres");
    assert_eq!(c.application_name, "pgfanout");
    let c = ReplicationConfig::from_conninfo("user=bob").unwrap();
    assert_eq!(c.dbname, "bob");
}

#[test]
fn conninfo_urls() {
    let c = ReplicationConfig::from_conninfo(
        "postgres://rep%40l:p%3Ass@db.example:6543/my%20db?application_name=cdc&sslmode=disable",
    )
    .unwrap();
    assert_eq!(c.host, "db.example");
    assert_eq!(c.port, 6543);
    assert_eq!(c.user, "rep@l");
    assert_eq!(c.password.as_deref(), Some("p:ss"));
    assert_eq!(c.dbname, "my db");
    assert_eq!(c.application_name, "cdc");

    let c = ReplicationConfig::from_conninfo("postgresql://[::1]:5000").unwrap();
    assert_eq!(c.host, "::1");
    assert_eq!(c.port, 5000);
    assert_eq!(c.dbname, "postgres");

    let c = ReplicationConfig::from_conninfo("postgresql:///d?host=%2Ftmp%2Fpg").unwrap();
    assert_eq!(c.host, "/tmp/pg");
    assert_eq!(c.dbname, "d");

    let c = ReplicationConfig::from_conninfo("postgres://u@h").unwrap();
    assert_eq!((c.user.as_str(), c.host.as_str(), c.port), ("u", "h", 5432));
}

#[test]
fn conninfo_errors() {
    for bad in [
        "host",
        "port=abc",
        "password='open",
        "sslmode=sometimes",
        "sslmode=verify-ca sslrootcert=/no/such/ca.pem",
        "frobnicate=1",
        "postgres://h:99999",
        "postgres://h/db?x",
        "postgres://u%zz@h",
        "host=a,b",
    ] {
        assert!(matches!(ReplicationConfig::from_conninfo(bad), Err(ReplicationError::Config(_))), "{bad:?}");
    }
}

#[test]
fn debug_redacts_password() {
    let c = ReplicationConfig::from_conninfo("password=hunter2").unwrap();
    let s = format!("{c:?}");
    assert!(!s.contains("hunter2"), "{s}");
    assert!(s.contains("redacted"));
}

#[test]
fn transient_classification() {
    let server = |code: &str| ReplicationError::Server { code: code.into(), message: "m".into(), detail: None, hint: None };
    for code in ["57P01", "57P02", "57P03", "08006", "08P01", "55006"] {
        assert!(server(code).is_transient(), "{code}");
    }
    for code in ["42704", "55000", "42501", "28P01", "XX000"] {
        assert!(!server(code).is_transient(), "{code}");
    }
    assert!(ReplicationError::Io(std::io::ErrorKind::ConnectionReset.into()).is_transient());
    assert!(!ReplicationError::Protocol("x".into()).is_transient());
    let msg = server("42501").to_string();
    assert!(msg.contains("REPLICATION"), "{msg}");
    let msg = ReplicationError::Server {
        code: "55000".into(),
        message: "logical decoding requires wal_level >= logical".into(),
        detail: None,
        hint: None,
    }
    .to_string();
    assert!(msg.contains("wal_level = logical"), "{msg}");
}

fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
    v.extend_from_slice(body);
    v
}

fn conn_with(bytes: &[u8]) -> Conn {
    let (client, _server) = tokio::io::duplex(64);
    Conn { socket: Box::new(client), rbuf: BytesMut::from(bytes), wbuf: BytesMut::new() }
}

#[test]
fn frames_split_from_buffer() {
    let mut bytes = frame(b'Z', b"I");
    bytes.extend(frame(b'd', b"kxyz"));
    let full = bytes.len();
    // Every prefix yields only the complete frames it contains.
    for len in 0..=full {
        let mut c = conn_with(&bytes[..len]);
        let mut n = 0;
        while let Some(f) = c.try_frame().unwrap() {
            assert!(f.tag == b'Z' || f.tag == b'd');
            n += 1;
        }
        assert_eq!(
            n,
            if len == full {
                2
            } else if len >= 6 {
                1
            } else {
                0
            }
        );
    }
}

#[test]
fn garbled_frames_are_errors() {
    let mut c = conn_with(&[b'd', 0, 0, 0, 3]);
    assert!(c.try_frame().is_err());
    let mut c = conn_with(&[b'd', 0xff, 0xff, 0xff, 0xff]);
    assert!(c.try_frame().is_err());
    let mut c = conn_with(&[b'd', 0x7f, 0xff, 0xff, 0xff]);
    assert!(matches!(c.try_frame(), Err(ReplicationError::Protocol(_))));
}

#[tokio::test]
async fn reads_frames_across_partial_socket_reads() {
    use tokio::io::AsyncWriteExt as _;
    let (client, mut server) = tokio::io::duplex(7);
    let mut c = Conn { socket: Box::new(client), rbuf: BytesMut::new(), wbuf: BytesMut::new() };
    let mut bytes = frame(b'd', &[b'k'; 100]);
    bytes.extend(frame(b'Z', b"I"));
    let writer = tokio::spawn(async move {
        server.write_all(&bytes).await.unwrap();
    });
    let f = c.read_frame().await.unwrap().unwrap();
    assert_eq!((f.tag, f.body.len()), (b'd', 100));
    let f = c.read_frame().await.unwrap().unwrap();
    assert_eq!((f.tag, &f.body[..]), (b'Z', &b"I"[..]));
    writer.await.unwrap();
    assert!(c.read_frame().await.unwrap().is_none());
}

#[tokio::test]
async fn eof_inside_a_frame_is_an_error() {
    let (client, server) = tokio::io::duplex(64);
    drop(server);
    let mut c = Conn { socket: Box::new(client), rbuf: BytesMut::from(&[b'd', 0, 0, 0, 9, 1][..]), wbuf: BytesMut::new() };
    assert!(matches!(c.read_frame().await, Err(ReplicationError::Io(_))));
}

#[test]
fn copy_data_parsing() {
    let mut w = vec![b'w'];
    w.extend_from_slice(&1u64.to_be_bytes());
    w.extend_from_slice(&2u64.to_be_bytes());
    w.extend_from_slice(&3i64.to_be_bytes());
    w.extend_from_slice(b"Bpayload");
    assert_eq!(
        parse_copy_data(Bytes::from(w.clone())).unwrap(),
        ReplicationEvent::XLogData { wal_start: 1, wal_end: 2, send_time: 3, data: Bytes::from_static(b"Bpayload") }
    );
    for len in 0..25 {
        assert!(parse_copy_data(Bytes::copy_from_slice(&w[..len])).is_err());
    }
    let mut k = vec![b'k'];
    k.extend_from_slice(&9u64.to_be_bytes());
    k.extend_from_slice(&8i64.to_be_bytes());
    k.push(1);
    assert_eq!(
        parse_copy_data(Bytes::from(k.clone())).unwrap(),
        ReplicationEvent::Keepalive { wal_end: 9, send_time: 8, reply_requested: true }
    );
    for len in 0..k.len() {
        assert!(parse_copy_data(Bytes::copy_from_slice(&k[..len])).is_err());
    }
    assert!(parse_copy_data(Bytes::from_static(b"zzz")).is_err());
}

#[test]
fn error_fields() {
    let body = b"SERROR\0VERROR\0C42704\0Mreplication slot \"s\" does not exist\0\0";
    let e = server_error(body);
    assert_eq!(e.sqlstate(), Some("42704"));
    let msg = e.to_string();
    assert!(msg.contains("does not exist"), "{msg}");
    assert!(msg.contains("create it"), "{msg}");
    // Garbled fields do not panic.
    let _ = server_error(b"C4270");
    let _ = server_error(b"");
}

#[test]
fn buffered_events_are_taken_without_the_socket() {
    let keepalive = |end: u8| frame(b'd', &[&[b'k'][..], &[0, 0, 0, 0, 0, 0, 0, end], &[0; 8], &[0]].concat());
    let mut bytes = [keepalive(1), keepalive(2), frame(b'N', b"")].concat();
    bytes.extend(&keepalive(3)[..6]); // a partial message
    let mut stream = stream::ReplicationStream::new(conn_with(&bytes));
    for end in [1, 2] {
        let ev = stream.next_buffered_event().unwrap();
        assert!(matches!(ev, Some(ReplicationEvent::Keepalive { wal_end, .. }) if wal_end == end), "{ev:?}");
    }
    // A notice is not CopyData: it is left for next_event.
    assert!(stream.next_buffered_event().unwrap().is_none());
    let mut garbled = stream::ReplicationStream::new(conn_with(&frame(b'd', b"x")));
    assert!(garbled.next_buffered_event().is_err());
    assert!(garbled.next_buffered_event().unwrap().is_none(), "a failed stream gives nothing more");
}

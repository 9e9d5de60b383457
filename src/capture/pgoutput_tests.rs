use super::*;
use proptest::prelude::*;

/// The decoder over a copy of `bytes`, for fixtures built as plain byte vectors.
fn decode(bytes: &[u8]) -> Result<PgOutputMessage, DecodeError> {
    super::decode(&Bytes::copy_from_slice(bytes))
}

#[test]
fn large_values_share_the_payload_and_small_ones_are_copied() {
    let big = vec![b'a'; SHARED_VALUE_BYTES];
    let len = i32::try_from(big.len()).unwrap();
    let payload = Bytes::from(Buf::tag(b'I').u32(1).u8(b'N').u16(2).u8(b't').i32(1).raw(b"7").u8(b't').i32(len).raw(&big).done());
    let range = payload.as_ptr_range();
    let PgOutputMessage::Insert { new, .. } = super::decode(&payload).unwrap() else { panic!("not an insert") };
    let [TupleValue::Text(small), TupleValue::Text(large)] = &new[..] else { panic!("{new:?}") };
    assert!(range.contains(&large.as_ptr()), "a large value is a slice of the payload");
    assert!(!range.contains(&small.as_ptr()), "a small value is a copy");
    assert_eq!((&small[..], &large[..]), (&b"7"[..], &big[..]));
}

/// Builds payloads the way the server lays them out (network byte order).
#[derive(Default)]
struct Buf(Vec<u8>);

impl Buf {
    fn tag(t: u8) -> Self {
        Buf(vec![t])
    }
    fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }
    fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn i32(mut self, v: i32) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn i64(mut self, v: i64) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn cstr(mut self, s: &str) -> Self {
        self.0.extend_from_slice(s.as_bytes());
        self.0.push(0);
        self
    }
    fn raw(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
    fn text(self, v: &[u8]) -> Self {
        self.u8(b't').i32(v.len() as i32).raw(v)
    }
    fn bin(self, v: &[u8]) -> Self {
        self.u8(b'b').i32(v.len() as i32).raw(v)
    }
    fn done(self) -> Vec<u8> {
        self.0
    }
}

type Fixture = (&'static str, Vec<u8>, PgOutputMessage);

fn fixtures() -> Vec<Fixture> {
    [transaction_fixtures(), relation_fixtures(), row_fixtures(), other_fixtures()].concat()
}

fn transaction_fixtures() -> Vec<Fixture> {
    vec![
        (
            "begin",
            Buf::tag(b'B').u64(0x0000_0001_0000_00A0).i64(776_000_000_000_123).u32(742).done(),
            PgOutputMessage::Begin { final_lsn: 0x0000_0001_0000_00A0, commit_ts: 776_000_000_000_123, xid: 742 },
        ),
        (
            "commit",
            Buf::tag(b'C').u8(0).u64(0x16B_3748).u64(0x16B_3778).i64(-5).done(),
            PgOutputMessage::Commit { flags: 0, commit_lsn: 0x16B_3748, end_lsn: 0x16B_3778, commit_ts: -5 },
        ),
        (
            "origin",
            Buf::tag(b'O').u64(99).cstr("node_a").done(),
            PgOutputMessage::Origin { commit_lsn: 99, name: "node_a".into() },
        ),
    ]
}

fn relation_fixtures() -> Vec<Fixture> {
    vec![
        (
            "relation",
            Buf::tag(b'R')
                .u32(16385)
                .cstr("public")
                .cstr("items")
                .u8(b'd')
                .u16(3)
                .u8(1)
                .cstr("id")
                .u32(23)
                .i32(-1)
                .u8(0)
                .cstr("name")
                .u32(1043)
                .i32(68)
                .u8(0)
                .cstr("prix€")
                .u32(1700)
                .i32(655366)
                .done(),
            PgOutputMessage::Relation(Relation {
                id: 16385,
                namespace: "public".into(),
                name: "items".into(),
                replica_identity: b'd',
                columns: vec![
                    RelationColumn { is_key: true, name: "id".into(), type_oid: 23, type_modifier: -1 },
                    RelationColumn { is_key: false, name: "name".into(), type_oid: 1043, type_modifier: 68 },
                    RelationColumn { is_key: false, name: "prix€".into(), type_oid: 1700, type_modifier: 655366 },
                ],
            }),
        ),
        (
            "relation without columns",
            Buf::tag(b'R').u32(7).cstr("s").cstr("").u8(b'n').u16(0).done(),
            PgOutputMessage::Relation(Relation {
                id: 7,
                namespace: "s".into(),
                name: "".into(),
                replica_identity: b'n',
                columns: vec![],
            }),
        ),
        (
            "type",
            Buf::tag(b'Y').u32(16390).cstr("public").cstr("mood").done(),
            PgOutputMessage::Type { oid: 16390, namespace: "public".into(), name: "mood".into() },
        ),
    ]
}

fn row_fixtures() -> Vec<Fixture> {
    vec![
        (
            "insert",
            Buf::tag(b'I').u32(16385).u8(b'N').u16(4).text(b"1").u8(b'n').bin(&[0, 1, 2]).text(b"").done(),
            PgOutputMessage::Insert {
                relation_id: 16385,
                new: vec![
                    TupleValue::Text(Bytes::from_static(b"1")),
                    TupleValue::Null,
                    TupleValue::Binary(Bytes::from_static(&[0, 1, 2])),
                    TupleValue::Text(Bytes::new()),
                ],
            },
        ),
        (
            "update without old tuple",
            Buf::tag(b'U').u32(16385).u8(b'N').u16(2).text(b"1").u8(b'u').done(),
            PgOutputMessage::Update {
                relation_id: 16385,
                old: None,
                new: vec![TupleValue::Text(Bytes::from_static(b"1")), TupleValue::UnchangedToast],
            },
        ),
        (
            "update with key",
            Buf::tag(b'U').u32(16385).u8(b'K').u16(2).text(b"1").u8(b'n').u8(b'N').u16(2).text(b"2").text(b"b").done(),
            PgOutputMessage::Update {
                relation_id: 16385,
                old: Some(OldTuple::Key(vec![TupleValue::Text(Bytes::from_static(b"1")), TupleValue::Null])),
                new: vec![TupleValue::Text(Bytes::from_static(b"2")), TupleValue::Text(Bytes::from_static(b"b"))],
            },
        ),
        (
            "update with full old row",
            Buf::tag(b'U').u32(9).u8(b'O').u16(1).text(b"a").u8(b'N').u16(1).text(b"b").done(),
            PgOutputMessage::Update {
                relation_id: 9,
                old: Some(OldTuple::Full(vec![TupleValue::Text(Bytes::from_static(b"a"))])),
                new: vec![TupleValue::Text(Bytes::from_static(b"b"))],
            },
        ),
        (
            "delete with key",
            Buf::tag(b'D').u32(16385).u8(b'K').u16(2).text(b"2").u8(b'n').done(),
            PgOutputMessage::Delete {
                relation_id: 16385,
                old: OldTuple::Key(vec![TupleValue::Text(Bytes::from_static(b"2")), TupleValue::Null]),
            },
        ),
        (
            "delete with full old row",
            Buf::tag(b'D').u32(5).u8(b'O').u16(1).bin(b"\xff").done(),
            PgOutputMessage::Delete {
                relation_id: 5,
                old: OldTuple::Full(vec![TupleValue::Binary(Bytes::from_static(&[0xff]))]),
            },
        ),
    ]
}

/// Truncates and logical messages.
fn other_fixtures() -> Vec<Fixture> {
    vec![
        (
            "truncate",
            Buf::tag(b'T').i32(2).u8(3).u32(16385).u32(16400).done(),
            PgOutputMessage::Truncate { options: 3, relation_ids: vec![16385, 16400] },
        ),
        (
            "transactional message",
            Buf::tag(b'M').u8(1).u64(0x16B_3700).cstr("pgfanout").i32(1).raw(b"x").done(),
            PgOutputMessage::Message { transactional: true, lsn: 0x16B_3700, prefix: "pgfanout".into(), content: b"x".to_vec() },
        ),
        (
            "non-transactional message with binary content",
            Buf::tag(b'M').u8(0).u64(1).cstr("p").i32(3).raw(&[0, 0xfe, 0]).done(),
            PgOutputMessage::Message { transactional: false, lsn: 1, prefix: "p".into(), content: vec![0, 0xfe, 0] },
        ),
    ]
}

#[test]
fn decodes_every_fixture() {
    for (name, bytes, expected) in fixtures() {
        let got = decode(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(got, expected, "{name}");
    }
}

#[test]
fn every_truncation_is_an_error() {
    for (name, bytes, _) in fixtures() {
        for len in 0..bytes.len() {
            assert!(decode(&bytes[..len]).is_err(), "{name}: prefix of {len} of {} bytes decoded", bytes.len());
        }
    }
}

#[test]
fn trailing_bytes_are_an_error() {
    for (name, mut bytes, _) in fixtures() {
        bytes.push(0);
        assert!(matches!(decode(&bytes), Err(DecodeError::TrailingBytes { count: 1, .. })), "{name}");
    }
}

#[test]
fn empty_payload() {
    assert!(matches!(decode(&[]), Err(DecodeError::Empty)));
}

#[test]
fn unknown_and_streaming_tags() {
    for tag in [b'S', b'E', b'c', b'A', b'z', 0] {
        let err = decode(&[tag, 0, 0, 0, 0]).unwrap_err();
        assert!(matches!(err, DecodeError::UnknownTag(t) if t == tag));
    }
    let msg = DecodeError::UnknownTag(b'S').to_string();
    assert!(msg.contains("protocol version 1"), "{msg}");
}

#[test]
fn truncation_names_the_field() {
    let err = decode(&[b'B', 0, 0]).unwrap_err();
    assert_eq!(err.to_string(), "pgoutput payload truncated while reading Begin final LSN");
}

#[test]
fn invalid_utf8_in_names() {
    let bytes = Buf::tag(b'Y').u32(1).cstr("ns").raw(&[0xc3, 0x28, 0]).done();
    assert!(matches!(decode(&bytes), Err(DecodeError::InvalidUtf8 { what: "Type name" })));
}

#[test]
fn negative_lengths_are_rejected() {
    let bytes = Buf::tag(b'I').u32(1).u8(b'N').u16(1).u8(b't').i32(-1).done();
    assert!(matches!(decode(&bytes), Err(DecodeError::InvalidLength { len: -1, .. })));
    let bytes = Buf::tag(b'M').u8(0).u64(0).cstr("p").i32(i32::MIN).done();
    assert!(matches!(decode(&bytes), Err(DecodeError::InvalidLength { .. })));
    let bytes = Buf::tag(b'T').i32(-2).u8(0).done();
    assert!(matches!(decode(&bytes), Err(DecodeError::InvalidLength { len: -2, .. })));
}

#[test]
fn huge_counts_do_not_allocate_or_panic() {
    let bytes = Buf::tag(b'T').i32(i32::MAX).u8(0).u32(1).done();
    assert!(matches!(decode(&bytes), Err(DecodeError::Truncated { .. })));
    let bytes = Buf::tag(b'I').u32(1).u8(b'N').u16(u16::MAX).u8(b'n').done();
    assert!(matches!(decode(&bytes), Err(DecodeError::Truncated { .. })));
    let bytes = Buf::tag(b'I').u32(1).u8(b'N').u16(1).u8(b't').i32(i32::MAX).done();
    assert!(matches!(decode(&bytes), Err(DecodeError::Truncated { .. })));
}

#[test]
fn bad_markers_and_column_kinds() {
    let bytes = Buf::tag(b'I').u32(1).u8(b'K').u16(0).done();
    assert!(matches!(decode(&bytes), Err(DecodeError::UnexpectedMarker { found: b'K', .. })));
    let bytes = Buf::tag(b'U').u32(1).u8(b'X').u16(0).done();
    assert!(matches!(decode(&bytes), Err(DecodeError::UnexpectedMarker { found: b'X', .. })));
    let bytes = Buf::tag(b'U').u32(1).u8(b'K').u16(0).u8(b'K').u16(0).done();
    assert!(matches!(decode(&bytes), Err(DecodeError::UnexpectedMarker { found: b'K', .. })));
    let bytes = Buf::tag(b'D').u32(1).u8(b'N').u16(0).done();
    assert!(matches!(decode(&bytes), Err(DecodeError::UnexpectedMarker { found: b'N', .. })));
    let bytes = Buf::tag(b'I').u32(1).u8(b'N').u16(1).u8(b'x').done();
    assert!(matches!(decode(&bytes), Err(DecodeError::UnknownColumnKind(b'x'))));
}

fn any_tag() -> impl Strategy<Value = u8> {
    prop_oneof![
        Just(b'B'),
        Just(b'C'),
        Just(b'O'),
        Just(b'R'),
        Just(b'Y'),
        Just(b'I'),
        Just(b'U'),
        Just(b'D'),
        Just(b'T'),
        Just(b'M'),
        any::<u8>(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode(&bytes);
    }

    #[test]
    fn random_bodies_after_known_tags_never_panic(
        tag in any_tag(),
        body in proptest::collection::vec(
            prop_oneof![Just(0u8), Just(1u8), Just(b'N'), Just(b'K'), Just(b't'), any::<u8>()],
            0..128,
        ),
    ) {
        let mut bytes = vec![tag];
        bytes.extend_from_slice(&body);
        let _ = decode(&bytes);
    }

    #[test]
    fn corrupted_fixtures_never_panic(idx in 0usize..15, pos in any::<usize>(), byte in any::<u8>()) {
        let all = fixtures();
        let (_, mut bytes, _) = all[idx % all.len()].clone();
        let at = pos % bytes.len();
        bytes[at] = byte;
        let _ = decode(&bytes);
    }
}

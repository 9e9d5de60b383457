//! Typed column values: the Avro union `null | boolean | long | double | string | bytes`.
//!
//! PostgreSQL hands values out as text (pgoutput, `::text`); [`Value::from_pg_text`] turns
//! that text into the typed form by the column's type name, and is the only such conversion
//! in the project, so capture and `verify` agree on every value. Types without an exact
//! native Avro form (numeric, dates, times, json, arrays, enums, ...) travel as their
//! PostgreSQL text, which is exact and round-trips through `$n::text::type`.

use std::fmt::Write as _;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Deserialized from the Avro union by branch name; serialized by hand so that each
/// variant selects its own branch of the union (a derived unit variant `Null` would be
/// written as the string "Null").
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub enum Value {
    Null,
    Boolean(bool),
    Long(i64),
    Double(f64),
    String(String),
    Bytes(#[serde(with = "serde_bytes")] Vec<u8>),
}

impl Serialize for Value {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Value::Null => serializer.serialize_unit(),
            Value::Boolean(b) => serializer.serialize_bool(*b),
            Value::Long(n) => serializer.serialize_i64(*n),
            Value::Double(f) => serializer.serialize_f64(*f),
            Value::String(s) => serializer.serialize_str(s),
            Value::Bytes(b) => serializer.serialize_bytes(b),
        }
    }
}

/// How a PostgreSQL type is carried in a [`Value`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueKind {
    Boolean,
    Long,
    Double,
    Bytes,
    Text,
}

impl ValueKind {
    /// The kind of a PostgreSQL type, by the name [`type_name_for_oid`] gives it.
    pub fn of_pg_type(type_name: &str) -> ValueKind {
        match type_name {
            "bool" => ValueKind::Boolean,
            "int2" | "int4" | "int8" | "oid" => ValueKind::Long,
            "float4" | "float8" => ValueKind::Double,
            "bytea" => ValueKind::Bytes,
            _ => ValueKind::Text,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("value {text:?} is not a valid {type_name}")]
pub struct ValueParseError {
    pub type_name: String,
    pub text: String,
}

impl Value {
    /// Converts PostgreSQL's text output of a value of type `type_name` to a typed value.
    pub fn from_pg_text(type_name: &str, text: &str) -> Result<Value, ValueParseError> {
        let bad = || ValueParseError { type_name: type_name.to_string(), text: text.chars().take(64).collect() };
        Ok(match ValueKind::of_pg_type(type_name) {
            ValueKind::Boolean => match text {
                "t" | "true" => Value::Boolean(true),
                "f" | "false" => Value::Boolean(false),
                _ => return Err(bad()),
            },
            ValueKind::Long => Value::Long(text.parse().map_err(|_| bad())?),
            ValueKind::Double => Value::Double(match text {
                "NaN" => f64::NAN,
                "Infinity" => f64::INFINITY,
                "-Infinity" => f64::NEG_INFINITY,
                _ => text.parse().map_err(|_| bad())?,
            }),
            ValueKind::Bytes => Value::Bytes(decode_bytea_hex(text).ok_or_else(bad)?),
            ValueKind::Text => Value::String(text.to_string()),
        })
    }

    /// [`from_pg_text`](Self::from_pg_text) for text that arrived as bytes, taking them:
    /// a `bytea` value is decoded where it lies when `text` is the only handle on its
    /// buffer ([`bytea_from_hex_in_place`]). Text that is not valid for the type is kept
    /// as a string, lossily where it is not UTF-8.
    pub fn from_pg_text_bytes(type_name: &str, text: Bytes) -> Value {
        let text = match ValueKind::of_pg_type(type_name) {
            ValueKind::Bytes => match bytea_from_hex_in_place(text) {
                Ok(bytes) => return Value::Bytes(bytes),
                Err(text) => text,
            },
            _ => text,
        };
        let text = String::from_utf8_lossy(&text);
        Value::from_pg_text(type_name, &text).unwrap_or_else(|_| Value::String(text.into_owned()))
    }

    /// The text PostgreSQL accepts for this value as input to `$n::text::type`, or `None`
    /// for SQL NULL. Bytes are accepted only for `bytea` columns (hex form).
    pub fn to_pg_text(&self, type_kind: ValueKind) -> Result<Option<String>, &'static str> {
        Ok(Some(match self {
            Value::Null => return Ok(None),
            Value::Boolean(b) => if *b { "true" } else { "false" }.to_string(),
            Value::Long(n) => n.to_string(),
            Value::Double(f) if f.is_nan() => "NaN".to_string(),
            Value::Double(f) if f.is_infinite() => if *f > 0.0 { "Infinity" } else { "-Infinity" }.to_string(),
            Value::Double(f) => f.to_string(),
            Value::String(s) => s.clone(),
            Value::Bytes(b) if type_kind == ValueKind::Bytes => encode_bytea_hex(b),
            Value::Bytes(_) => return Err("a bytes value fits only a bytea column"),
        }))
    }

    /// A canonical, unambiguous text form used for checksums and comparisons.
    pub fn write_canonical(&self, out: &mut String) {
        match self {
            Value::Null => out.push('N'),
            Value::Boolean(b) => out.push_str(if *b { "b1" } else { "b0" }),
            Value::Long(n) => {
                let _ = write!(out, "i{n}");
            }
            Value::Double(f) => {
                // One NaN for all NaN payloads; otherwise the exact bits.
                let bits = if f.is_nan() { f64::NAN.to_bits() } else { f.to_bits() };
                let _ = write!(out, "f{bits:016x}");
            }
            Value::String(s) => {
                let _ = write!(out, "s{}:{s}", s.len());
            }
            Value::Bytes(b) => {
                let _ = write!(out, "x{}:", b.len());
                for byte in b {
                    let _ = write!(out, "{byte:02x}");
                }
            }
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }
}

fn decode_bytea_hex(text: &str) -> Option<Vec<u8>> {
    let hex = text.strip_prefix("\\x")?.as_bytes();
    if hex.len() % 2 != 0 {
        return None;
    }
    let mut out = Vec::with_capacity(hex.len() / 2);
    for pair in hex.chunks_exact(2) {
        out.push((hex_digit(pair[0])? << 4) | hex_digit(pair[1])?);
    }
    Some(out)
}

/// `bytea` hex text (`\x…`) decoded in its own buffer, byte `i` written over the text
/// already read (hex digits `2 + 2i` and `3 + 2i`), so that no second buffer is needed.
/// The returned vector keeps the text's allocation; the pages of its unused second half go
/// back to the kernel ([`release_spare_pages`]). `Err` gives `text` back when it is not hex
/// or other handles share its buffer.
pub fn bytea_from_hex_in_place(text: Bytes) -> Result<Vec<u8>, Bytes> {
    let is_hex = text.strip_prefix(b"\\x").is_some_and(|hex| hex.len() % 2 == 0 && hex.iter().all(|c| hex_digit(*c).is_some()));
    if !is_hex {
        return Err(text);
    }
    let mut buf = text.try_into_mut()?;
    let len = (buf.len() - 2) / 2;
    for i in 0..len {
        let (high, low) = (buf[2 + 2 * i], buf[3 + 2 * i]);
        buf[i] = (hex_digit(high).unwrap_or(0) << 4) | hex_digit(low).unwrap_or(0);
    }
    buf.truncate(len);
    let mut bytes = Vec::from(buf);
    release_spare_pages(&mut bytes);
    Ok(bytes)
}

/// Tells the kernel that the whole pages of `bytes`' spare capacity hold nothing, so they
/// stop counting in the process's memory until written again. Only for a megabyte or more:
/// below that the call costs more than it saves.
fn release_spare_pages(bytes: &mut Vec<u8>) {
    let spare = bytes.spare_capacity_mut();
    if spare.len() < 1 << 20 {
        return;
    }
    // SAFETY: sysconf has no preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(0);
    if page == 0 {
        return;
    }
    let start = spare.as_mut_ptr() as usize;
    let first = start.next_multiple_of(page);
    let last = (start + spare.len()) / page * page;
    if last > first {
        // SAFETY: [first, last) lies within this vector's allocation, past its length: memory
        // the vector owns and holds nothing in. MADV_DONTNEED on private anonymous memory
        // only makes those pages read as zeros when touched again, which uninitialized
        // capacity may.
        unsafe { libc::madvise(first as *mut libc::c_void, last - first, libc::MADV_DONTNEED) };
    }
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn encode_bytea_hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(2 + bytes.len() * 2);
    s.push_str("\\x");
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// The name of a built-in PostgreSQL type by OID (`pg_type.typname`), or `None` for types
/// that are not built in (enums, domains, composites, extension types).
pub fn type_name_for_oid(oid: u32) -> Option<&'static str> {
    Some(match oid {
        16 => "bool",
        17 => "bytea",
        18 => "char",
        19 => "name",
        20 => "int8",
        21 => "int2",
        23 => "int4",
        25 => "text",
        26 => "oid",
        114 => "json",
        142 => "xml",
        700 => "float4",
        701 => "float8",
        790 => "money",
        829 => "macaddr",
        869 => "inet",
        650 => "cidr",
        1042 => "bpchar",
        1043 => "varchar",
        1082 => "date",
        1083 => "time",
        1114 => "timestamp",
        1184 => "timestamptz",
        1186 => "interval",
        1266 => "timetz",
        1560 => "bit",
        1562 => "varbit",
        1700 => "numeric",
        2950 => "uuid",
        3802 => "jsonb",
        3614 => "tsvector",
        1000 => "_bool",
        1001 => "_bytea",
        1005 => "_int2",
        1007 => "_int4",
        1009 => "_text",
        1014 => "_bpchar",
        1015 => "_varchar",
        1016 => "_int8",
        1021 => "_float4",
        1022 => "_float8",
        1115 => "_timestamp",
        1182 => "_date",
        1185 => "_timestamptz",
        1231 => "_numeric",
        2951 => "_uuid",
        199 => "_json",
        3807 => "_jsonb",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pg_text_round_trips_through_typed_values() {
        let cases = [
            ("bool", "t", Value::Boolean(true)),
            ("bool", "f", Value::Boolean(false)),
            ("int8", "-9223372036854775808", Value::Long(i64::MIN)),
            ("float8", "1.5", Value::Double(1.5)),
            ("float8", "-Infinity", Value::Double(f64::NEG_INFINITY)),
            ("bytea", "\\x00ff10", Value::Bytes(vec![0, 255, 16])),
            ("numeric", "12345678901234567890.000000001", Value::String("12345678901234567890.000000001".into())),
        ];
        for (ty, text, expected) in cases {
            let v = Value::from_pg_text(ty, text).unwrap();
            assert_eq!(v, expected, "{ty} {text}");
            let back = v.to_pg_text(ValueKind::of_pg_type(ty)).unwrap().unwrap();
            assert_eq!(Value::from_pg_text(ty, &back).unwrap(), expected);
        }
    }

    #[test]
    fn bytea_is_decoded_where_it_lies() {
        let bytes: Vec<u8> = (0..=255u8).chain([0, 255, 16]).collect();
        let text = encode_bytea_hex(&bytes);
        // A value at the end of a larger buffer (a replication frame), the frame dropped.
        let mut frame = b"header bytes".to_vec();
        frame.extend_from_slice(text.as_bytes());
        let frame = Bytes::from(frame);
        let start = frame.as_ptr();
        let value = frame.slice(12..);
        drop(frame);
        let decoded = bytea_from_hex_in_place(value).unwrap();
        assert_eq!(decoded, bytes);
        assert_eq!(decoded.as_ptr(), start, "decoded in the frame's own buffer, not a copy");
        // Upper-case digits too, and the empty value.
        assert_eq!(bytea_from_hex_in_place(Bytes::from(b"\\x0A".to_vec())).unwrap(), [10]);
        assert_eq!(bytea_from_hex_in_place(Bytes::from(b"\\x".to_vec())).unwrap(), Vec::<u8>::new());
    }

    #[test]
    fn bytea_that_is_shared_or_not_hex_is_given_back_untouched() {
        let frame = Bytes::from(b"\\x00ff".to_vec());
        let other = frame.clone();
        assert_eq!(bytea_from_hex_in_place(frame).unwrap_err(), other);
        for text in [&b"\\x0"[..], b"\\x0g", b"00ff", b""] {
            let given = Bytes::from(text.to_vec());
            assert_eq!(bytea_from_hex_in_place(given).unwrap_err(), text);
        }
        assert_eq!(Value::from_pg_text_bytes("bytea", Bytes::from_static(b"\\x0g")), Value::String("\\x0g".into()));
        assert_eq!(Value::from_pg_text_bytes("int8", Bytes::from_static(b"-7")), Value::Long(-7));
    }

    #[test]
    fn negative_zero_keeps_its_sign() {
        for ty in ["float4", "float8"] {
            let v = Value::from_pg_text(ty, "-0").unwrap();
            assert!(matches!(v, Value::Double(f) if f == 0.0 && f.is_sign_negative()), "{ty}");
            assert_eq!(v.to_pg_text(ValueKind::Double).unwrap().as_deref(), Some("-0"));
            let (mut neg, mut pos) = (String::new(), String::new());
            v.write_canonical(&mut neg);
            Value::Double(0.0).write_canonical(&mut pos);
            assert_ne!(neg, pos, "-0 and 0 are different values to verify");
        }
    }

    #[test]
    fn malformed_pg_text_is_an_error_not_a_panic() {
        assert!(Value::from_pg_text("int4", "12a").is_err());
        assert!(Value::from_pg_text("bool", "yes").is_err());
        assert!(Value::from_pg_text("bytea", "\\x0").is_err());
        assert!(Value::from_pg_text("bytea", "\\xzz").is_err());
        assert!(Value::from_pg_text("bytea", "00").is_err());
    }

    #[test]
    fn bytes_only_fit_bytea() {
        assert!(Value::Bytes(vec![1]).to_pg_text(ValueKind::Text).is_err());
        assert_eq!(Value::Null.to_pg_text(ValueKind::Long).unwrap(), None);
    }

    #[test]
    fn canonical_form_is_unambiguous() {
        let mut a = String::new();
        Value::String("a".into()).write_canonical(&mut a);
        Value::String("b".into()).write_canonical(&mut a);
        let mut b = String::new();
        Value::String("ab".into()).write_canonical(&mut b);
        assert_ne!(a, b);
        let mut nan1 = String::new();
        Value::Double(f64::NAN).write_canonical(&mut nan1);
        let mut nan2 = String::new();
        Value::Double(-f64::NAN).write_canonical(&mut nan2);
        assert_eq!(nan1, nan2);
    }
}

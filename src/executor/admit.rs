//! Admission: every field of an instruction is checked before any of it reaches
//! PostgreSQL, and the instruction gets the two things its idempotency rests on.
//!
//! - *Nothing PostgreSQL cannot hold*: a text value, identifier or `issued_by` with U+0000
//!   is a valid Avro string but no PostgreSQL `text` can store it; such an instruction is
//!   rejected here (`PGF10`) instead of failing inside a statement, the marker or the log
//!   write, where the error would look like the executor's own.
//! - *One spelling per key*: `instruction_id` must be a UUID, in any spelling the `uuid`
//!   crate parses (hyphenated, 32 digits, braced, `urn:uuid:`, either case); from here on it
//!   is its canonical form (lower-case, hyphenated) in the log, the result and the deltas,
//!   so differently spelled copies are one instruction.
//! - *A key means one content*: [`Admitted::digest`] is a SHA-256 of what the instruction
//!   asks (`issued_by` and the operations, in order; not `issued_at`, which a resubmission
//!   may stamp anew). It is logged with the outcome; a later instruction with the same id
//!   and another digest is rejected (`PGF09`) and changes nothing.
//!
//! - *A target that can be met*: labels with names, a quorum (`at_least`) of one device or
//!   more. The target is not part of the digest: it says whom the confirmation waits for,
//!   not what the instruction does.
//!
//! An instruction refused here never reaches PostgreSQL and is not logged: refusing it
//! again on redelivery gives the same result.

use sha2::{Digest, Sha256};

use super::plan::{printable, Rejection, BAD_ID, BAD_SHAPE};
use crate::contract::{Field, Instruction, OperationKind, Target, Value};

/// A string field holds U+0000.
pub const NUL_CHARACTER: &str = "PGF10";

/// An instruction that passed admission: canonical id, and the digest of its content.
#[derive(Debug, Clone)]
pub struct Admitted {
    pub instruction: Instruction,
    pub digest: [u8; 32],
}

/// Checks every field; on success the instruction carries its canonical id.
pub fn admit(raw: &Instruction) -> Result<Admitted, Rejection> {
    let id = uuid::Uuid::try_parse(&raw.instruction_id)
        .map_err(|_| Rejection::new(BAD_ID, format!("instruction_id \"{}\" is not a UUID", printable(&raw.instruction_id))))?;
    if raw.operations.is_empty() {
        return Err(Rejection::new(BAD_SHAPE, "an instruction needs at least one operation"));
    }
    refuse_nul("issued_by", &raw.issued_by)?;
    if let Some(target) = &raw.target {
        check_target(target)?;
    }
    for (i, op) in raw.operations.iter().enumerate() {
        let at = |what: &str| format!("operation {}: {what}", i + 1);
        refuse_nul(&at("table"), &op.table)?;
        for (part, fields) in [("key", &op.key), ("values", &op.values), ("expect", &op.expect)] {
            for f in fields {
                refuse_nul(&at(&format!("{part} column name")), &f.name)?;
                if let Value::String(s) = &f.value {
                    refuse_nul(&at(&format!("{part} column \"{}\"", printable(&f.name))), s)?;
                }
            }
        }
    }
    let instruction = Instruction { instruction_id: id.hyphenated().to_string(), ..raw.clone() };
    let digest = content_digest(&instruction);
    Ok(Admitted { instruction, digest })
}

/// A target names labels by non-empty keys, and a quorum of at least one device.
fn check_target(target: &Target) -> Result<(), Rejection> {
    if target.labels.keys().any(String::is_empty) {
        return Err(Rejection::new(BAD_SHAPE, "target: a label needs a name"));
    }
    match target.at_least {
        Some(k) if k < 1 => Err(Rejection::new(BAD_SHAPE, format!("target: at_least must be 1 or more, not {k}"))),
        _ => Ok(()),
    }
}

fn refuse_nul(what: &str, s: &str) -> Result<(), Rejection> {
    if s.contains('\0') {
        return Err(Rejection::new(
            NUL_CHARACTER,
            format!("{what} contains the character U+0000, which PostgreSQL text cannot hold: \"{}\"", printable(s)),
        ));
    }
    Ok(())
}

/// SHA-256 over an unambiguous text form of `issued_by` and the operations.
fn content_digest(instruction: &Instruction) -> [u8; 32] {
    let mut text = String::new();
    let mut push = |s: &str| {
        text.push_str(&s.len().to_string());
        text.push(':');
        text.push_str(s);
    };
    push(&instruction.issued_by);
    for op in &instruction.operations {
        let kind = match op.op {
            OperationKind::Insert => "insert",
            OperationKind::Update => "update",
            OperationKind::Upsert => "upsert",
            OperationKind::Delete => "delete",
        };
        push(kind);
        push(&op.table);
        for fields in [&op.key, &op.values, &op.expect] {
            push(&fields.len().to_string());
            for Field { name, value } in fields {
                push(name);
                let mut v = String::new();
                value.write_canonical(&mut v);
                push(&v);
            }
        }
    }
    Sha256::digest(text.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::Operation;

    fn instruction(id: &str, name: &str) -> Instruction {
        Instruction {
            instruction_id: id.into(),
            issued_by: "device-1".into(),
            issued_at: 1,
            operations: vec![Operation {
                op: OperationKind::Upsert,
                table: "public.items".into(),
                key: vec![Field { name: "id".into(), value: Value::Long(1) }],
                values: vec![Field { name: "name".into(), value: Value::String(name.into()) }],
                expect: vec![],
            }],
            target: None,
        }
    }

    #[test]
    fn every_spelling_of_a_uuid_is_one_canonical_id_with_one_digest() {
        let canonical = "8c1c7a2e-4f0b-4c39-9a52-2b7f6f1d0e11";
        let spellings = [
            canonical.to_string(),
            canonical.to_uppercase(),
            canonical.replace('-', ""),
            format!("{{{canonical}}}"),
            format!("urn:uuid:{canonical}"),
        ];
        let admitted: Vec<Admitted> = spellings.iter().map(|s| admit(&instruction(s, "a")).unwrap()).collect();
        for a in &admitted {
            assert_eq!(a.instruction.instruction_id, canonical);
            assert_eq!(a.digest, admitted[0].digest);
        }
    }

    #[test]
    fn the_digest_covers_the_content_but_not_the_time_of_issue() {
        let id = "8c1c7a2e-4f0b-4c39-9a52-2b7f6f1d0e11";
        let a = admit(&instruction(id, "a")).unwrap();
        let later = admit(&Instruction { issued_at: 99, ..instruction(id, "a") }).unwrap();
        let other = admit(&instruction(id, "b")).unwrap();
        let other_issuer = admit(&Instruction { issued_by: "device-2".into(), ..instruction(id, "a") }).unwrap();
        assert_eq!(a.digest, later.digest);
        assert_ne!(a.digest, other.digest);
        assert_ne!(a.digest, other_issuer.digest);
        // Length prefixes keep field boundaries: "ab" + "c" is not "a" + "bc".
        let mut split = instruction(id, "c");
        split.issued_by = "ab".into();
        let mut moved = instruction(id, "bc");
        moved.issued_by = "a".into();
        assert_ne!(admit(&split).unwrap().digest, admit(&moved).unwrap().digest);
    }

    #[test]
    fn a_target_needs_named_labels_and_a_quorum_of_one_or_more_and_leaves_the_digest_alone() {
        let id = "8c1c7a2e-4f0b-4c39-9a52-2b7f6f1d0e11";
        let with = |labels: &[(&str, &str)], at_least| Instruction {
            target: Some(Target { labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(), at_least }),
            ..instruction(id, "a")
        };
        let plain = admit(&instruction(id, "a")).unwrap();
        let targeted = admit(&with(&[("site", "berlin")], Some(2))).unwrap();
        assert_eq!(targeted.digest, plain.digest);
        assert_eq!(targeted.instruction.target, with(&[("site", "berlin")], Some(2)).target, "kept as sent");
        for (bad, says) in [(with(&[("", "x")], None), "a name"), (with(&[], Some(0)), "1 or more")] {
            let r = admit(&bad).unwrap_err();
            assert!(r.code == BAD_SHAPE && r.message.contains(says), "{}", r.message);
        }
    }

    #[test]
    fn nul_is_refused_in_every_string_field() {
        let id = "8c1c7a2e-4f0b-4c39-9a52-2b7f6f1d0e11";
        let mut cases = Vec::new();
        cases.push(Instruction { issued_by: "a\0b".into(), ..instruction(id, "x") });
        let mut table = instruction(id, "x");
        table.operations[0].table = "public.it\0ems".into();
        cases.push(table);
        let mut column = instruction(id, "x");
        column.operations[0].values[0].name = "na\0me".into();
        cases.push(column);
        cases.push(instruction(id, "x\0"));
        let mut key = instruction(id, "x");
        key.operations[0].key[0].value = Value::String("\0".into());
        cases.push(key);
        let mut expect = instruction(id, "x");
        expect.operations[0].expect = vec![Field { name: "name".into(), value: Value::String("\0".into()) }];
        cases.push(expect);
        for case in &cases {
            let r = admit(case).unwrap_err();
            assert_eq!(r.code, NUL_CHARACTER, "{case:?}");
            assert!(r.message.contains("U+0000"), "{}", r.message);
        }
        let r = admit(&instruction("8c1c7a2e-4f0b-4c39-9a52-2b7f6f1d0e1\0", "x")).unwrap_err();
        assert_eq!(r.code, BAD_ID);
        assert!(r.message.contains("\\u{0}"), "the id is echoed printably: {}", r.message);
    }
}

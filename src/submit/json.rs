//! Instructions from their JSON form (see [`super`]).

use serde_json::Value as Json;

use super::error::SubmitError;
use crate::contract::{now_micros, Field, Instruction, Operation, OperationKind, Target, Value};

/// Parses one JSON instruction. Missing ids are generated; `issued_by` defaults to `default_issuer`.
pub fn instruction_from_json(json: &Json, default_issuer: &str) -> Result<Instruction, String> {
    let obj = json.as_object().ok_or("an instruction is a JSON object")?;
    let instruction_id = match obj.get("instruction_id") {
        None | Some(Json::Null) => uuid::Uuid::new_v4().to_string(),
        // The executor answers with the canonical spelling; wait for that one.
        Some(Json::String(s)) => uuid::Uuid::try_parse(s).map_or_else(|_| s.clone(), |id| id.hyphenated().to_string()),
        Some(_) => return Err("instruction_id must be a string".into()),
    };
    let issued_by = match obj.get("issued_by") {
        None | Some(Json::Null) => default_issuer.to_string(),
        Some(Json::String(s)) => s.clone(),
        Some(_) => return Err("issued_by must be a string".into()),
    };
    let ops = obj.get("operations").and_then(Json::as_array).ok_or("operations must be an array")?;
    let operations = ops.iter().map(operation_from_json).collect::<Result<_, _>>()?;
    let target = match obj.get("target") {
        None | Some(Json::Null) => None,
        Some(t) => Some(
            serde_json::from_value::<Target>(t.clone())
                .map_err(|e| format!("target must be {{\"labels\": {{name: value}}, \"at_least\": k}}: {e}"))?,
        ),
    };
    Ok(Instruction { instruction_id, issued_by, issued_at: now_micros(), operations, target })
}

fn operation_from_json(json: &Json) -> Result<Operation, String> {
    let op = match json.get("op").and_then(Json::as_str) {
        Some("insert") => OperationKind::Insert,
        Some("update") => OperationKind::Update,
        Some("upsert") => OperationKind::Upsert,
        Some("delete") => OperationKind::Delete,
        _ => return Err("op must be one of insert, update, upsert, delete".into()),
    };
    let table = json.get("table").and_then(Json::as_str).ok_or("table must be a string")?.to_string();
    let fields = |name: &str| -> Result<Vec<Field>, String> {
        match json.get(name) {
            None | Some(Json::Null) => Ok(Vec::new()),
            Some(Json::Object(map)) => {
                map.iter().map(|(k, v)| Ok(Field { name: k.clone(), value: value_from_json(v)? })).collect()
            }
            Some(_) => Err(format!("{name} must be an object of column: value")),
        }
    };
    Ok(Operation { op, table, key: fields("key")?, values: fields("values")?, expect: fields("expect")? })
}

/// A JSON value as a typed value.
pub fn value_from_json(json: &Json) -> Result<Value, String> {
    Ok(match json {
        Json::Null => Value::Null,
        Json::Bool(b) => Value::Boolean(*b),
        Json::Number(n) => match n.as_i64() {
            Some(i) => Value::Long(i),
            None => Value::Double(n.as_f64().ok_or("number out of range")?),
        },
        Json::String(s) => Value::String(s.clone()),
        Json::Object(map) if map.len() == 1 => match map.get("$hex").and_then(Json::as_str) {
            Some(hex) => Value::Bytes(decode_hex(hex).ok_or("$hex must be an even number of hex digits")?),
            None => Value::String(json.to_string()),
        },
        // Arrays and objects are JSON documents for json/jsonb (or array) columns.
        Json::Array(_) | Json::Object(_) => Value::String(json.to_string()),
    })
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// Reads JSON-lines text (blank lines and `#` comments skipped).
pub fn parse_json_lines(text: &str, default_issuer: &str) -> Result<Vec<Instruction>, SubmitError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let json: Json = serde_json::from_str(line).map_err(|e| SubmitError::Input { line: i + 1, reason: e.to_string() })?;
        out.push(instruction_from_json(&json, default_issuer).map_err(|reason| SubmitError::Input { line: i + 1, reason })?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_become_typed_instructions() {
        let text = r#"
# a comment
{"instruction_id": "i1", "operations": [{"op": "upsert", "table": "items", "key": {"id": 1}, "values": {"price": 1.5, "ok": true, "b": {"$hex": "00ff"}, "doc": {"a": [1]}, "n": null}}]}
"#;
        let ins = parse_json_lines(text, "dev").unwrap();
        assert_eq!(ins.len(), 1);
        assert_eq!(ins[0].issued_by, "dev");
        let op = &ins[0].operations[0];
        assert_eq!(op.key, vec![Field { name: "id".into(), value: Value::Long(1) }]);
        let get = |n: &str| op.values.iter().find(|f| f.name == n).unwrap().value.clone();
        assert_eq!(get("price"), Value::Double(1.5));
        assert_eq!(get("ok"), Value::Boolean(true));
        assert_eq!(get("b"), Value::Bytes(vec![0, 255]));
        assert_eq!(get("doc"), Value::String("{\"a\":[1]}".into()));
        assert_eq!(get("n"), Value::Null);
    }

    #[test]
    fn bad_lines_say_where() {
        let err = parse_json_lines("{}\n", "d").unwrap_err();
        assert!(err.to_string().starts_with("line 1:"), "{err}");
        assert!(parse_json_lines("{\"operations\": [{\"op\": \"merge\", \"table\": \"t\"}]}", "d").is_err());
        assert!(value_from_json(&serde_json::json!({"$hex": "abc"})).is_err());
    }
}

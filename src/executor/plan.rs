//! Turns one validated operation into a parameterized SQL statement.
//!
//! Pure: given the table's catalog description, an operation either becomes SQL text made
//! only of catalog identifiers plus bound text parameters cast to each column's real type
//! (`$n::text::numeric(12,2)`), or a [`Rejection`] that says what is wrong with the input.

use std::collections::HashSet;

use crate::contract::value::ValueKind;
use crate::contract::{Field, Operation, OperationKind, CORRELATION_PREFIX};
use crate::pg::{ColumnInfo, TableInfo};
use crate::quote::{quote_ident, quote_literal};

/// A statement ready to run: SQL text and its text parameters (`None` is SQL NULL).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedStatement {
    pub sql: String,
    pub params: Vec<Option<String>>,
    /// A compare-and-set: zero rows affected means the precondition did not hold.
    pub has_precondition: bool,
    /// The same statement for a set of operations of this shape, each affecting exactly one
    /// row (an insert, or an upsert that updates on conflict): one `text[]` per parameter,
    /// then a `text[]` of instruction ids. Every row is preceded by its instruction's
    /// correlation marker (the filter runs on each row as the insert pulls it).
    pub set_sql: Option<String>,
    /// How many leading parameters are the key.
    pub key_params: usize,
}

/// Why an instruction is refused before it touches PostgreSQL. `code` is a stable
/// `PGFxx` identifier for programs; `message` is for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Rejection {
    pub code: &'static str,
    pub message: String,
}

impl Rejection {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Rejection { code, message: message.into() }
    }
}

pub const UNKNOWN_TABLE: &str = "PGF01";
pub const UNKNOWN_COLUMN: &str = "PGF02";
pub const BAD_KEY: &str = "PGF03";
pub const BAD_VALUE: &str = "PGF04";
pub const BAD_SHAPE: &str = "PGF05";
pub const BAD_ID: &str = "PGF06";
pub const PRECONDITION_FAILED: &str = "PGF08";

struct Bound<'a> {
    column: &'a ColumnInfo,
    param: usize,
}

/// An operation's fields bound to the table's columns, each to its parameter.
struct BoundOperation<'a> {
    params: Vec<Option<String>>,
    key: Vec<Bound<'a>>,
    values: Vec<Bound<'a>>,
    expect: Vec<Bound<'a>>,
}

/// Plans `op` against `table`. The key must name exactly the primary-key columns; values
/// name other existing columns, each at most once.
pub fn plan_operation(table: &TableInfo, op: &Operation) -> Result<PlannedStatement, Rejection> {
    let BoundOperation { params, key, values, expect } = bind_operation(table, op)?;
    let t = table.name.quoted();
    let cast = |b: &Bound<'_>| format!("${}::text::{}", b.param + 1, b.column.type_sql);
    let name = |b: &Bound<'_>| quote_ident(&b.column.name);
    let where_key = key
        .iter()
        .map(|b| format!("{} = {}", name(b), cast(b)))
        .chain(expect.iter().map(|b| format!("{} IS NOT DISTINCT FROM {}", name(b), cast(b))))
        .collect::<Vec<_>>()
        .join(" AND ");
    let mut set_sql = None;
    let sql = match op.op {
        OperationKind::Insert | OperationKind::Upsert => {
            let (sql, set) = insert_sql(&t, op.op, &key, &values);
            set_sql = set;
            sql
        }
        OperationKind::Update => {
            if values.is_empty() {
                return Err(Rejection::new(BAD_SHAPE, "an update needs at least one value"));
            }
            let set = values.iter().map(|b| format!("{} = {}", name(b), cast(b))).collect::<Vec<_>>().join(", ");
            format!("UPDATE {t} SET {set} WHERE {where_key}")
        }
        OperationKind::Delete => {
            if !values.is_empty() {
                return Err(Rejection::new(BAD_SHAPE, "a delete takes only a key, no values"));
            }
            format!("DELETE FROM {t} WHERE {where_key}")
        }
    };
    Ok(PlannedStatement { sql, params, has_precondition: !expect.is_empty(), set_sql, key_params: key.len() })
}

/// Binds the key (exactly the primary key, no nulls), the values (no key column) and the
/// precondition (update and delete only), in that order of parameters.
fn bind_operation<'a>(table: &'a TableInfo, op: &Operation) -> Result<BoundOperation<'a>, Rejection> {
    let key_names: HashSet<&str> = table.key_columns().map(|c| c.name.as_str()).collect();
    if key_names.is_empty() {
        return Err(Rejection::new(BAD_KEY, format!("table {} has no primary key", table.name)));
    }
    let mut params = Vec::new();
    let key = bind_fields(table, &op.key, &mut params, "key")?;
    let given: HashSet<&str> = key.iter().map(|b| b.column.name.as_str()).collect();
    if given != key_names {
        let mut expected: Vec<&str> = key_names.into_iter().collect();
        expected.sort_unstable();
        return Err(Rejection::new(
            BAD_KEY,
            format!("key of {} must be exactly its primary key ({})", table.name, expected.join(", ")),
        ));
    }
    if key.iter().any(|b| params[b.param].is_none()) {
        return Err(Rejection::new(BAD_KEY, "key values must not be null"));
    }
    let values = bind_fields(table, &op.values, &mut params, "values")?;
    if let Some(b) = values.iter().find(|b| b.column.is_key) {
        return Err(Rejection::new(
            BAD_SHAPE,
            format!("column {:?} is part of the key; give it in `key`, not in `values`", b.column.name),
        ));
    }
    let expect = bind_fields(table, &op.expect, &mut params, "expect")?;
    if !expect.is_empty() && !matches!(op.op, OperationKind::Update | OperationKind::Delete) {
        return Err(Rejection::new(BAD_SHAPE, "`expect` (a precondition) applies to update and delete only"));
    }
    Ok(BoundOperation { params, key, values, expect })
}

/// An insert or upsert of table `t` (quoted): the statement for one row, and the one for a
/// set of rows of this shape when each affects exactly one row (see
/// [`PlannedStatement::set_sql`]).
fn insert_sql(t: &str, kind: OperationKind, key: &[Bound<'_>], values: &[Bound<'_>]) -> (String, Option<String>) {
    let cast = |b: &Bound<'_>| format!("${}::text::{}", b.param + 1, b.column.type_sql);
    let name = |b: &Bound<'_>| quote_ident(&b.column.name);
    let all: Vec<&Bound<'_>> = key.iter().chain(values.iter()).collect();
    let cols = all.iter().map(|b| name(b)).collect::<Vec<_>>().join(", ");
    let vals = all.iter().map(|b| cast(b)).collect::<Vec<_>>().join(", ");
    let mut conflict = String::new();
    if kind == OperationKind::Upsert {
        let target = key.iter().map(name).collect::<Vec<_>>().join(", ");
        if values.is_empty() {
            conflict = format!(" ON CONFLICT ({target}) DO NOTHING");
        } else {
            let set = values.iter().map(|b| format!("{0} = EXCLUDED.{0}", name(b))).collect::<Vec<_>>().join(", ");
            conflict = format!(" ON CONFLICT ({target}) DO UPDATE SET {set}");
        }
    }
    let mut set_sql = None;
    if kind == OperationKind::Insert || !values.is_empty() {
        let arrays = (1..=all.len() + 1).map(|i| format!("${i}::text[]")).collect::<Vec<_>>().join(", ");
        let names = (1..=all.len()).map(|i| format!("p{i}")).collect::<Vec<_>>().join(", ");
        let casts = all.iter().map(|b| format!("u.p{}::{}", b.param + 1, b.column.type_sql)).collect::<Vec<_>>().join(", ");
        let prefix = quote_literal(CORRELATION_PREFIX);
        set_sql = Some(format!(
            "INSERT INTO {t} ({cols}) SELECT {casts} FROM unnest({arrays}) AS u({names}, instruction_id) \
             WHERE pg_logical_emit_message(true, {prefix}, u.instruction_id) IS NOT NULL{conflict}"
        ));
    }
    (format!("INSERT INTO {t} ({cols}) VALUES ({vals}){conflict}"), set_sql)
}

fn bind_fields<'a>(
    table: &'a TableInfo,
    fields: &[Field],
    params: &mut Vec<Option<String>>,
    part: &str,
) -> Result<Vec<Bound<'a>>, Rejection> {
    let mut seen = HashSet::new();
    let mut bound = Vec::with_capacity(fields.len());
    for field in fields {
        let column = table.column(&field.name).ok_or_else(|| {
            Rejection::new(UNKNOWN_COLUMN, format!("table {} has no column {:?}", table.name, printable(&field.name)))
        })?;
        if !seen.insert(column.name.as_str()) {
            return Err(Rejection::new(BAD_SHAPE, format!("column {:?} appears twice in {part}", column.name)));
        }
        let text = field
            .value
            .to_pg_text(ValueKind::of_pg_type(&column.type_name))
            .map_err(|why| Rejection::new(BAD_VALUE, format!("column {:?}: {why}", column.name)))?;
        bound.push(Bound { column, param: params.len() });
        params.push(text);
    }
    Ok(bound)
}

/// Input echoed in a message: at most 64 characters, control characters escaped.
pub fn printable(s: &str) -> String {
    let mut out: String = s.chars().take(64).flat_map(char::escape_default).collect();
    if s.chars().count() > 64 {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::Value;
    use crate::pg::TableName;

    fn items() -> TableInfo {
        let col = |name: &str, type_sql: &str, type_name: &str, is_key| ColumnInfo {
            name: name.into(),
            type_sql: type_sql.into(),
            type_name: type_name.into(),
            is_key,
        };
        TableInfo {
            name: TableName::new("public", "items"),
            columns: vec![
                col("id", "bigint", "int8", true),
                col("name", "text", "text", false),
                col("price", "numeric(12,2)", "numeric", false),
                col("blob", "bytea", "bytea", false),
            ],
        }
    }

    fn field(name: &str, value: Value) -> Field {
        Field { name: name.into(), value }
    }

    fn op(kind: OperationKind, key: Vec<Field>, values: Vec<Field>) -> Operation {
        Operation { op: kind, table: "public.items".into(), key, values, expect: vec![] }
    }

    #[test]
    fn upsert_binds_every_value_as_cast_text() {
        let p = plan_operation(
            &items(),
            &op(
                OperationKind::Upsert,
                vec![field("id", Value::Long(7))],
                vec![field("price", Value::String("1.50".into())), field("name", Value::Null)],
            ),
        )
        .unwrap();
        assert_eq!(
            p.sql,
            "INSERT INTO \"public\".\"items\" (\"id\", \"price\", \"name\") VALUES ($1::text::bigint, $2::text::numeric(12,2), $3::text::text) ON CONFLICT (\"id\") DO UPDATE SET \"price\" = EXCLUDED.\"price\", \"name\" = EXCLUDED.\"name\""
        );
        assert_eq!(p.params, vec![Some("7".into()), Some("1.50".into()), None]);
        assert_eq!(
            p.set_sql.as_deref(),
            Some("INSERT INTO \"public\".\"items\" (\"id\", \"price\", \"name\") SELECT u.p1::bigint, u.p2::numeric(12,2), u.p3::text FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS u(p1, p2, p3, instruction_id) WHERE pg_logical_emit_message(true, 'pgfanout', u.instruction_id) IS NOT NULL ON CONFLICT (\"id\") DO UPDATE SET \"price\" = EXCLUDED.\"price\", \"name\" = EXCLUDED.\"name\"")
        );
        assert_eq!(p.key_params, 1);
        let nothing = plan_operation(&items(), &op(OperationKind::Upsert, vec![field("id", Value::Long(7))], vec![])).unwrap();
        assert_eq!(nothing.set_sql, None, "an upsert that may affect no row runs alone");
    }

    #[test]
    fn update_and_delete_filter_on_the_key() {
        let u = plan_operation(
            &items(),
            &op(OperationKind::Update, vec![field("id", Value::Long(1))], vec![field("name", Value::String("x".into()))]),
        )
        .unwrap();
        assert_eq!(u.sql, "UPDATE \"public\".\"items\" SET \"name\" = $2::text::text WHERE \"id\" = $1::text::bigint");
        let d = plan_operation(&items(), &op(OperationKind::Delete, vec![field("id", Value::Long(1))], vec![])).unwrap();
        assert_eq!(d.sql, "DELETE FROM \"public\".\"items\" WHERE \"id\" = $1::text::bigint");
    }

    #[test]
    fn a_precondition_becomes_a_compare_and_set() {
        let mut o =
            op(OperationKind::Update, vec![field("id", Value::Long(1))], vec![field("name", Value::String("new".into()))]);
        o.expect = vec![field("name", Value::String("old".into())), field("price", Value::Null)];
        let p = plan_operation(&items(), &o).unwrap();
        assert_eq!(
            p.sql,
            "UPDATE \"public\".\"items\" SET \"name\" = $2::text::text WHERE \"id\" = $1::text::bigint AND \"name\" IS NOT DISTINCT FROM $3::text::text AND \"price\" IS NOT DISTINCT FROM $4::text::numeric(12,2)"
        );
        assert!(p.has_precondition);
        let mut ins = op(OperationKind::Upsert, vec![field("id", Value::Long(1))], vec![]);
        ins.expect = vec![field("name", Value::Null)];
        assert_eq!(plan_operation(&items(), &ins).unwrap_err().code, BAD_SHAPE);
    }

    #[test]
    fn hostile_or_wrong_input_is_rejected_with_a_code() {
        let t = items();
        let id = || vec![field("id", Value::Long(1))];
        let cases = [
            (op(OperationKind::Insert, id(), vec![field("name\"; DROP TABLE items; --", Value::Null)]), UNKNOWN_COLUMN),
            (op(OperationKind::Insert, vec![field("name", Value::Long(1))], vec![]), BAD_KEY),
            (op(OperationKind::Insert, vec![], vec![]), BAD_KEY),
            (op(OperationKind::Insert, vec![field("id", Value::Null)], vec![]), BAD_KEY),
            (op(OperationKind::Insert, id(), vec![field("id", Value::Long(2))]), BAD_SHAPE),
            (op(OperationKind::Insert, id(), vec![field("name", Value::Null), field("name", Value::Null)]), BAD_SHAPE),
            (op(OperationKind::Update, id(), vec![]), BAD_SHAPE),
            (op(OperationKind::Delete, id(), vec![field("name", Value::Null)]), BAD_SHAPE),
            (op(OperationKind::Insert, id(), vec![field("name", Value::Bytes(vec![1]))]), BAD_VALUE),
        ];
        for (o, code) in cases {
            assert_eq!(plan_operation(&t, &o).unwrap_err().code, code, "{o:?}");
        }
        let ok = plan_operation(&t, &op(OperationKind::Insert, id(), vec![field("blob", Value::Bytes(vec![0xab]))])).unwrap();
        assert_eq!(ok.params[1].as_deref(), Some("\\xab"));
    }

    #[test]
    fn printable_escapes_and_truncates() {
        assert_eq!(printable("a\0b"), "a\\u{0}b");
        assert_eq!(printable(&"x".repeat(100)).chars().count(), 65);
    }
}

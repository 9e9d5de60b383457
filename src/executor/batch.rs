//! Applies a batch of instructions to PostgreSQL in one transaction.
//!
//! Exactly-once effect: every instruction's outcome is written to
//! `pgfanout.instruction_log` in the same transaction as its effects. An instruction whose
//! id is already logged is not executed again; its stored outcome is returned, so a
//! redelivery yields an identical result. Transient errors (lost connection, serialization
//! failure, deadlock) abort the whole batch, which is then retried: nothing of it was
//! committed, so nothing takes effect twice.
//!
//! Two paths, one outcome:
//! - *Pipelined*: the statements of all instructions are sent without waiting for each
//!   other, then all outcomes are logged with one statement. Consecutive single-row inserts
//!   and upserts of one shape with distinct keys go as one set statement
//!   ([`PlannedStatement::set_sql`]): one round of parsing, planning and executing for many
//!   instructions, each row still preceded by its instruction's marker. One failure anywhere (an
//!   error, a precondition that does not hold) rolls this attempt back.
//! - *One by one*: each instruction inside its own SAVEPOINT, so a failing one fails alone
//!   and its `rejected`/`failed` outcome is logged while the others commit.

use std::collections::{HashMap, HashSet};

use futures::future::join_all;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Statement};

use super::admit::{admit, Admitted};
use super::catalog::{Catalog, Statements};
use super::observe::count_postgres_error;
use super::plan::{plan_operation, PlannedStatement, Rejection, PRECONDITION_FAILED};
use crate::contract::{now_micros, Instruction, InstructionResult, ResultStatus, CORRELATION_PREFIX};
use crate::pg;
use crate::quote::quote_literal;

/// The correlation marker: announces the instruction id to capture in the WAL.
fn marker_sql() -> String {
    format!("SELECT pg_logical_emit_message(true, {}, $1::text)", quote_literal(CORRELATION_PREFIX))
}

/// An id used again by an instruction with other content.
pub const REUSED_ID: &str = "PGF09";

/// One instruction to execute: its statements, or why it is refused before execution.
enum Prepared<'a> {
    Run { admitted: &'a Admitted, statements: Vec<(Statement, PlannedStatement)> },
    Refuse { admitted: &'a Admitted, code: String, message: String },
}

impl Prepared<'_> {
    fn admitted(&self) -> &Admitted {
        match self {
            Prepared::Run { admitted, .. } | Prepared::Refuse { admitted, .. } => admitted,
        }
    }
}

fn refused(instruction: &Instruction, code: &str, message: String, status: ResultStatus) -> InstructionResult {
    InstructionResult {
        instruction_id: instruction.instruction_id.clone(),
        status,
        error_code: Some(code.to_string()),
        error_message: Some(message),
        rows_affected: 0,
        commit_lsn: None,
        executed_at: now_micros(),
        target: None,
    }
}

fn committed(instruction: &Instruction, rows: i64) -> InstructionResult {
    InstructionResult {
        instruction_id: instruction.instruction_id.clone(),
        status: ResultStatus::Committed,
        error_code: None,
        error_message: None,
        rows_affected: rows,
        commit_lsn: None,
        executed_at: now_micros(),
        target: None,
    }
}

/// Runs the batch; returns one result per instruction, in order, each carrying the
/// instruction's canonical id (or, refused at admission for a malformed id, the id as
/// sent). An `Err` means nothing of the batch was committed: retry it if
/// [`pg::is_transient`], stop otherwise.
pub async fn execute_batch(
    client: &Client,
    catalog: &mut Catalog,
    statements: &mut Statements,
    batch: &[Instruction],
) -> Result<Vec<InstructionResult>, tokio_postgres::Error> {
    let checked: Vec<Result<Admitted, Box<InstructionResult>>> = batch
        .iter()
        .map(|raw| admit(raw).map_err(|r| Box::new(refused(raw, r.code, r.message, ResultStatus::Rejected))))
        .collect();
    let admitted: Vec<&Admitted> = checked.iter().filter_map(|c| c.as_ref().ok()).collect();
    let mut results = execute_admitted(client, catalog, statements, &admitted).await?.into_iter();
    Ok(checked
        .into_iter()
        .zip(batch)
        .map(|(c, raw)| {
            let mut result = match c {
                Ok(_) => results.next().unwrap_or_else(|| {
                    refused(raw, "PGF07", "the outcome of this instruction could not be read back".into(), ResultStatus::Failed)
                }),
                Err(refusal) => *refusal,
            };
            // The confirmation service reads whom to wait for from the result.
            result.target.clone_from(&raw.target);
            result
        })
        .collect())
}

/// [`execute_batch`] for admitted instructions: one result per instruction, in order.
async fn execute_admitted(
    client: &Client,
    catalog: &mut Catalog,
    statements: &mut Statements,
    batch: &[&Admitted],
) -> Result<Vec<InstructionResult>, tokio_postgres::Error> {
    if batch.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<&str> = batch.iter().map(|a| a.instruction.instruction_id.as_str()).collect();
    let logged = load_logged(client, &ids).await?;
    let mut seen = HashSet::new();
    let fresh: Vec<&Admitted> = batch
        .iter()
        .copied()
        .filter(|a| !logged.contains_key(&a.instruction.instruction_id) && seen.insert(a.instruction.instruction_id.as_str()))
        .collect();
    let mut prepared = Vec::with_capacity(fresh.len());
    for admitted in fresh {
        prepared.push(prepare(client, catalog, statements, admitted).await?);
    }
    let marker = statements.get(client, &marker_sql()).await?;

    let outcomes = match pipelined(client, &marker, statements, &prepared).await? {
        Some(outcomes) => outcomes,
        None => one_by_one(client, catalog, &marker, &prepared).await?,
    };
    // The content each id stands for: logged before, or executed now by its first copy.
    let mut digests: HashMap<String, Option<Vec<u8>>> =
        prepared.iter().map(|p| (p.admitted().instruction.instruction_id.clone(), Some(p.admitted().digest.to_vec()))).collect();
    let mut stored = HashMap::with_capacity(logged.len());
    for (id, l) in logged {
        digests.insert(id.clone(), l.digest);
        stored.insert(id, l.result);
    }
    let results = stamp_and_assemble_results(client, batch, stored, outcomes).await?;
    Ok(batch.iter().zip(results).map(|(a, r)| answer_reuse(a, r, &digests)).collect())
}

/// A result for an id whose logged content differs from this instruction's is not this
/// instruction's: it is rejected with [`REUSED_ID`], and the stored result stands. A log
/// row without a digest (written before digests were kept) matches any content.
fn answer_reuse(admitted: &Admitted, result: InstructionResult, digests: &HashMap<String, Option<Vec<u8>>>) -> InstructionResult {
    let id = admitted.instruction.instruction_id.as_str();
    match digests.get(id) {
        Some(Some(digest)) if digest.as_slice() != admitted.digest.as_slice() => refused(
            &admitted.instruction,
            REUSED_ID,
            format!(
                "instruction_id {id} was already used by an instruction with other content (its result was {}); this one was not applied",
                result.status.as_str()
            ),
            ResultStatus::Rejected,
        ),
        _ => result,
    }
}

/// Validates an instruction against the catalog and prepares its statements.
async fn prepare<'a>(
    client: &Client,
    catalog: &mut Catalog,
    statements: &mut Statements,
    admitted: &'a Admitted,
) -> Result<Prepared<'a>, tokio_postgres::Error> {
    let instruction = &admitted.instruction;
    let refuse = |r: Rejection| Ok(Prepared::Refuse { admitted, code: r.code.to_string(), message: r.message });
    let mut planned = Vec::with_capacity(instruction.operations.len());
    for (i, op) in instruction.operations.iter().enumerate() {
        let plan = match catalog.lookup(client, &op.table).await? {
            Ok(table) => plan_operation(&table, op),
            Err(r) => Err(r),
        };
        match plan {
            Ok(p) => match statements.get(client, &p.sql).await {
                Ok(stmt) => planned.push((stmt, p)),
                Err(e) if pg::is_transient(&e) => return Err(e),
                Err(e) => {
                    // The catalog said yes but PostgreSQL disagrees: it changed meanwhile.
                    catalog.invalidate();
                    count_postgres_error(&e);
                    let code = pg::sqlstate(&e).unwrap_or("XX000").to_string();
                    return Ok(Prepared::Refuse { admitted, code, message: format!("operation {}: {}", i + 1, db_message(&e)) });
                }
            },
            Err(r) => return refuse(Rejection { code: r.code, message: format!("operation {}: {}", i + 1, r.message) }),
        }
    }
    Ok(Prepared::Run { admitted, statements: planned })
}

fn db_message(e: &tokio_postgres::Error) -> String {
    e.as_db_error().map(|d| d.message().to_string()).unwrap_or_else(|| e.to_string())
}

/// Sends the correlation marker and the instruction's statements without waiting in
/// between (tokio-postgres pipelines requests polled together), in this order.
async fn run_statements(
    client: &Client,
    marker: &Statement,
    instruction: &Instruction,
    planned: &[(Statement, PlannedStatement)],
) -> Vec<Result<u64, tokio_postgres::Error>> {
    let id: &(dyn ToSql + Sync) = &instruction.instruction_id;
    let mark = client.execute(marker, std::slice::from_ref(&id));
    let ops = join_all(planned.iter().map(|(stmt, p)| {
        let params: Vec<&(dyn ToSql + Sync)> = p.params.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
        client.execute_raw(stmt, params)
    }));
    let (m, o) = futures::join!(mark, ops);
    std::iter::once(m).chain(o).collect()
}

/// What the pipelined attempt sends, in order: an instruction's own statements, or a run
/// of consecutive single-row inserts/upserts of one shape with distinct keys as one
/// statement (their [`PlannedStatement::set_sql`]).
enum Unit<'p> {
    One(&'p Instruction, &'p [(Statement, PlannedStatement)]),
    Set(Statement, Vec<(&'p Instruction, &'p PlannedStatement)>),
}

async fn units<'p>(
    client: &Client,
    statements: &mut Statements,
    prepared: &'p [Prepared<'_>],
) -> Result<Vec<Unit<'p>>, tokio_postgres::Error> {
    let mut units = Vec::new();
    let mut keys: HashSet<&[Option<String>]> = HashSet::new();
    for p in prepared {
        let Prepared::Run { admitted, statements: planned } = p else { continue };
        let instruction = &admitted.instruction;
        let single = match planned.as_slice() {
            [(_, plan)] => plan.set_sql.as_deref().map(|sql| (sql, plan)),
            _ => None,
        };
        let Some((sql, plan)) = single else {
            units.push(Unit::One(instruction, planned));
            continue;
        };
        let key = &plan.params[..plan.key_params];
        match units.last_mut() {
            Some(Unit::Set(_, rows)) if rows[0].1.set_sql == plan.set_sql && !keys.contains(key) => {
                rows.push((instruction, plan));
            }
            _ => {
                keys.clear();
                units.push(Unit::Set(statements.get(client, sql).await?, vec![(instruction, plan)]));
            }
        }
        keys.insert(key);
    }
    Ok(units)
}

/// Runs a set statement: column `j` of the statement is parameter `j` of every row.
async fn run_set(
    client: &Client,
    statement: &Statement,
    rows: &[(&Instruction, &PlannedStatement)],
) -> Result<u64, tokio_postgres::Error> {
    let width = rows[0].1.params.len();
    let columns: Vec<Vec<Option<&str>>> =
        (0..width).map(|j| rows.iter().map(|(_, plan)| plan.params[j].as_deref()).collect()).collect();
    let ids: Vec<&str> = rows.iter().map(|(i, _)| i.instruction_id.as_str()).collect();
    let params: Vec<&(dyn ToSql + Sync)> =
        columns.iter().map(|c| c as &(dyn ToSql + Sync)).chain(std::iter::once(&ids as &(dyn ToSql + Sync))).collect();
    client.execute_raw(statement, params).await
}

/// The pipelined attempt. `Ok(None)`: something failed and was rolled back; run the batch
/// one by one instead.
async fn pipelined(
    client: &Client,
    marker: &Statement,
    statements: &mut Statements,
    prepared: &[Prepared<'_>],
) -> Result<Option<Vec<InstructionResult>>, tokio_postgres::Error> {
    let units = match units(client, statements, prepared).await {
        Ok(units) => units,
        Err(e) if pg::is_transient(&e) => return Err(e),
        Err(_) => return Ok(None), // a set statement no longer prepares: the catalog moved
    };
    client.batch_execute("BEGIN").await?;
    let runs = units.iter().map(|unit| async move {
        match unit {
            Unit::One(instruction, planned) => (unit, run_statements(client, marker, instruction, planned).await),
            Unit::Set(statement, rows) => (unit, vec![run_set(client, statement, rows).await]),
        }
    });
    let mut failed = false;
    let mut outcomes = Vec::with_capacity(prepared.len());
    for (unit, mut results) in join_all(runs).await {
        if let Some(i) = results.iter().position(|r| r.as_ref().is_err_and(pg::is_transient)) {
            let _ = client.batch_execute("ROLLBACK").await;
            results.swap_remove(i)?; // returns the transient error
        }
        match unit {
            Unit::Set(_, rows) => match results[0] {
                // Each row is one instruction that affects exactly one row.
                Ok(n) if n == rows.len() as u64 => outcomes.extend(rows.iter().map(|(i, _)| committed(i, 1))),
                _ => failed = true,
            },
            Unit::One(instruction, planned) => {
                let mut rows: i64 = 0;
                for (i, r) in results.iter().enumerate() {
                    match r {
                        Err(_) => failed = true,
                        // i == 0 is the correlation marker.
                        Ok(n) if i > 0 => {
                            if *n == 0 && planned[i - 1].1.has_precondition {
                                failed = true;
                            }
                            rows = rows.saturating_add(i64::try_from(*n).unwrap_or(i64::MAX));
                        }
                        Ok(_) => {}
                    }
                }
                outcomes.push(committed(instruction, rows));
            }
        }
    }
    if failed {
        client.batch_execute("ROLLBACK").await?;
        return Ok(None);
    }
    for p in prepared {
        if let Prepared::Refuse { admitted, code, message } = p {
            outcomes.push(refused(&admitted.instruction, code, message.clone(), ResultStatus::Rejected));
        }
    }
    match log_outcomes(client, prepared, &outcomes).await {
        Ok(()) => match client.batch_execute("COMMIT").await {
            Ok(()) => Ok(Some(outcomes)),
            Err(e) if pg::is_transient(&e) => Err(e),
            // A deferred constraint failed at commit: find its instruction one by one.
            Err(_) => Ok(None),
        },
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            if pg::is_transient(&e) {
                return Err(e);
            }
            Ok(None) // e.g. logged concurrently by another executor: sort it out one by one
        }
    }
}

async fn log_outcomes(
    client: &Client,
    prepared: &[Prepared<'_>],
    outcomes: &[InstructionResult],
) -> Result<(), tokio_postgres::Error> {
    let by_id: HashMap<&str, &Admitted> =
        prepared.iter().map(|p| (p.admitted().instruction.instruction_id.as_str(), p.admitted())).collect();
    let ids: Vec<&str> = outcomes.iter().map(|r| r.instruction_id.as_str()).collect();
    let issued_by: Vec<&str> = ids.iter().map(|id| by_id.get(id).map_or("", |a| a.instruction.issued_by.as_str())).collect();
    let digests: Vec<Option<&[u8]>> = ids.iter().map(|id| by_id.get(id).map(|a| &a.digest[..])).collect();
    let status: Vec<&str> = outcomes.iter().map(|r| r.status.as_str()).collect();
    let codes: Vec<Option<&str>> = outcomes.iter().map(|r| r.error_code.as_deref()).collect();
    let messages: Vec<Option<&str>> = outcomes.iter().map(|r| r.error_message.as_deref()).collect();
    let rows: Vec<i64> = outcomes.iter().map(|r| r.rows_affected).collect();
    let at: Vec<i64> = outcomes.iter().map(|r| r.executed_at).collect();
    client
        .execute(
            "INSERT INTO pgfanout.instruction_log
                 (instruction_id, issued_by, status, error_code, error_message, rows_affected, executed_at, content_digest)
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int8[], $7::int8[], $8::bytea[])",
            &[&ids, &issued_by, &status, &codes, &messages, &rows, &at, &digests],
        )
        .await?;
    Ok(())
}

/// Each instruction inside its own SAVEPOINT: a failing one is rolled back and logged as
/// `rejected`/`failed`, the others commit. Deferred constraints are checked at each
/// statement, so that their violations, too, fail the instruction that caused them rather
/// than the commit of all.
async fn one_by_one(
    client: &Client,
    catalog: &mut Catalog,
    marker: &Statement,
    prepared: &[Prepared<'_>],
) -> Result<Vec<InstructionResult>, tokio_postgres::Error> {
    client.batch_execute("BEGIN; SET CONSTRAINTS ALL IMMEDIATE").await?;
    let mut outcomes = Vec::with_capacity(prepared.len());
    for p in prepared {
        match one(client, catalog, marker, p).await {
            Ok(Some(outcome)) => outcomes.push(outcome),
            Ok(None) => {} // logged concurrently elsewhere; read back after commit
            Err(e) => {
                let _ = client.batch_execute("ROLLBACK").await;
                return Err(e);
            }
        }
    }
    client.batch_execute("COMMIT").await?;
    Ok(outcomes)
}

async fn one(
    client: &Client,
    catalog: &mut Catalog,
    marker: &Statement,
    p: &Prepared<'_>,
) -> Result<Option<InstructionResult>, tokio_postgres::Error> {
    client.batch_execute("SAVEPOINT pgfanout_instruction").await?;
    let outcome = match p {
        Prepared::Refuse { admitted, code, message } => {
            refused(&admitted.instruction, code, message.clone(), ResultStatus::Rejected)
        }
        Prepared::Run { admitted, statements } => {
            let instruction = &admitted.instruction;
            let mut outcome = None;
            let mut rows: i64 = 0;
            for (i, r) in run_statements(client, marker, instruction, statements).await.into_iter().enumerate() {
                match r {
                    Err(e) if pg::is_transient(&e) => return Err(e),
                    Err(e) => {
                        let code = pg::sqlstate(&e).unwrap_or("XX000").to_string();
                        if code == "25P02" {
                            continue; // a later statement of the same failed pipeline
                        }
                        count_postgres_error(&e);
                        if code.starts_with("42") {
                            catalog.invalidate();
                        }
                        let status = classify_definite(&code);
                        outcome.get_or_insert_with(|| {
                            refused(instruction, &code, format!("operation {i}: {}", db_message(&e)), status)
                        });
                    }
                    Ok(0) if i > 0 && statements[i - 1].1.has_precondition => {
                        outcome.get_or_insert_with(|| {
                            refused(
                                instruction,
                                PRECONDITION_FAILED,
                                format!("operation {i}: the precondition does not hold (no row with that key has the expected values)"),
                                ResultStatus::Rejected,
                            )
                        });
                    }
                    Ok(n) if i > 0 => rows = rows.saturating_add(i64::try_from(n).unwrap_or(i64::MAX)),
                    Ok(_) => {}
                }
            }
            match outcome {
                Some(failure) => {
                    client.batch_execute("ROLLBACK TO SAVEPOINT pgfanout_instruction").await?;
                    failure
                }
                None => committed(instruction, rows),
            }
        }
    };
    client.batch_execute("SAVEPOINT pgfanout_log").await?;
    match log_outcomes(client, std::slice::from_ref(p), std::slice::from_ref(&outcome)).await {
        Ok(()) => {
            client.batch_execute("RELEASE SAVEPOINT pgfanout_instruction").await?;
            Ok(Some(outcome))
        }
        Err(e) if pg::sqlstate(&e) == Some("23505") => {
            // Another executor logged this id concurrently: its outcome stands, undo ours.
            client.batch_execute("ROLLBACK TO SAVEPOINT pgfanout_instruction").await?;
            client.batch_execute("RELEASE SAVEPOINT pgfanout_instruction").await?;
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Definite PostgreSQL errors: those of the statement's own making (bad data, constraint
/// violations, references to things that do not exist) are the instruction's fault
/// (`rejected`); anything else is `failed`.
fn classify_definite(sqlstate: &str) -> ResultStatus {
    if crate::sqlstate::is_statement_fault(sqlstate) {
        ResultStatus::Rejected
    } else {
        ResultStatus::Failed
    }
}

fn result_from_row(r: &tokio_postgres::Row) -> InstructionResult {
    InstructionResult {
        instruction_id: r.get(0),
        status: ResultStatus::parse(r.get(1)).unwrap_or(ResultStatus::Failed),
        error_code: r.get(2),
        error_message: r.get(3),
        rows_affected: r.get(4),
        commit_lsn: r.get(5),
        executed_at: r.get(6),
        target: None,
    }
}

/// A log row: the stored result and the digest of the content it was for.
struct Logged {
    result: InstructionResult,
    digest: Option<Vec<u8>>,
}

async fn load_logged(client: &Client, ids: &[&str]) -> Result<HashMap<String, Logged>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT instruction_id, status, error_code, error_message, rows_affected, commit_lsn, executed_at, content_digest
               FROM pgfanout.instruction_log WHERE instruction_id = ANY($1)",
            &[&ids],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| {
            let result = result_from_row(row);
            (result.instruction_id.clone(), Logged { result, digest: row.get(7) })
        })
        .collect())
}

/// After COMMIT: stamps committed instructions with an LSN at or after their commit record
/// (`pg_current_wal_insert_lsn()` read after the commit returned) and assembles the results.
/// They equal what a redelivery reads back from the log, field for field.
async fn stamp_and_assemble_results(
    client: &Client,
    batch: &[&Admitted],
    mut logged: HashMap<String, InstructionResult>,
    outcomes: Vec<InstructionResult>,
) -> Result<Vec<InstructionResult>, tokio_postgres::Error> {
    for o in outcomes {
        logged.insert(o.instruction_id.clone(), o);
    }
    let stamp: Vec<&str> = logged
        .values()
        .filter(|r| r.status == ResultStatus::Committed && r.commit_lsn.is_none())
        .map(|r| r.instruction_id.as_str())
        .collect();
    if !stamp.is_empty() {
        let rows = client
            .query(
                "UPDATE pgfanout.instruction_log
                    SET commit_lsn = (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint
                  WHERE instruction_id = ANY($1) AND status = 'committed' AND commit_lsn IS NULL
              RETURNING instruction_id, commit_lsn",
                &[&stamp],
            )
            .await?;
        let stamped: HashMap<String, i64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        for (id, lsn) in stamped {
            if let Some(r) = logged.get_mut(&id) {
                r.commit_lsn = Some(lsn);
            }
        }
    }
    // Ids logged by a concurrent executor: read their stored outcome.
    let missing: Vec<&str> =
        batch.iter().map(|a| a.instruction.instruction_id.as_str()).filter(|id| !logged.contains_key(*id)).collect();
    if !missing.is_empty() {
        logged.extend(load_logged(client, &missing).await?.into_iter().map(|(id, l)| (id, l.result)));
    }
    Ok(batch
        .iter()
        .map(|a| &a.instruction)
        .map(|i| {
            logged.get(&i.instruction_id).cloned().unwrap_or_else(|| {
                refused(i, "PGF07", "the outcome of this instruction could not be read back".into(), ResultStatus::Failed)
            })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_marker_carries_the_correlation_prefix() {
        assert_eq!(marker_sql(), "SELECT pg_logical_emit_message(true, 'pgfanout', $1::text)");
    }

    #[test]
    fn definite_errors_are_classified() {
        assert_eq!(classify_definite("23505"), ResultStatus::Rejected);
        assert_eq!(classify_definite("22P02"), ResultStatus::Rejected);
        assert_eq!(classify_definite("42703"), ResultStatus::Rejected);
        assert_eq!(classify_definite("XX000"), ResultStatus::Failed);
    }
}

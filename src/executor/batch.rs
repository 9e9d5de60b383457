//! Applies a batch of instructions to PostgreSQL in one transaction, each inside its own
//! SAVEPOINT so that a failing instruction fails alone.
//!
//! Exactly-once effect: every instruction's outcome is written to
//! `pgfanout.instruction_log` in the same transaction as its effects. An instruction whose
//! id is already logged is not executed again; its stored outcome is returned, so a
//! redelivery yields an identical result. Transient errors (lost connection, serialization
//! failure, deadlock) abort the whole batch, which is then retried: nothing of it was
//! committed, so nothing takes effect twice.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Statement};

use super::plan::{plan_operation, printable, Rejection, UNKNOWN_TABLE};
use crate::contract::{now_micros, Instruction, InstructionResult, ResultStatus};
use crate::pg::{self, TableInfo, TableName};

/// Tables the executor may write and their catalog descriptions, cached.
pub struct Catalog {
    publication: String,
    allowed: HashSet<TableName>,
    allowed_loaded: Option<Instant>,
    tables: HashMap<TableName, TableInfo>,
}

/// How long a miss in the allowed set waits before the publication is read again.
const ALLOWED_REFRESH: Duration = Duration::from_secs(2);

impl Catalog {
    pub fn new(publication: &str) -> Self {
        Catalog {
            publication: publication.to_string(),
            allowed: HashSet::new(),
            allowed_loaded: None,
            tables: HashMap::new(),
        }
    }

    /// Forgets cached table descriptions (after a schema change showed up as an error).
    pub fn invalidate(&mut self) {
        self.tables.clear();
        self.allowed_loaded = None;
    }

    async fn lookup(&mut self, client: &Client, raw: &str) -> Result<Result<TableInfo, Rejection>, tokio_postgres::Error> {
        let Some(name) = TableName::parse(raw) else {
            return Ok(Err(Rejection::new(UNKNOWN_TABLE, format!("{:?} is not a table name (schema.table)", printable(raw)))));
        };
        if !self.allowed.contains(&name) && self.allowed_loaded.is_none_or(|t| t.elapsed() > ALLOWED_REFRESH) {
            self.allowed = pg::publication_tables(client, &self.publication).await?.into_iter().collect();
            self.allowed_loaded = Some(Instant::now());
        }
        if !self.allowed.contains(&name) {
            return Ok(Err(Rejection::new(
                UNKNOWN_TABLE,
                format!("table {:?} is not in publication {:?}", printable(raw), self.publication),
            )));
        }
        if let Some(info) = self.tables.get(&name) {
            return Ok(Ok(info.clone()));
        }
        match pg::table_info(client, &name).await? {
            Some(info) => {
                self.tables.insert(name, info.clone());
                Ok(Ok(info))
            }
            None => Ok(Err(Rejection::new(UNKNOWN_TABLE, format!("table {name} does not exist")))),
        }
    }
}

/// Per-connection state: prepared statements by SQL text.
#[derive(Default)]
pub struct Statements {
    cache: HashMap<String, Statement>,
}

impl Statements {
    async fn get(&mut self, client: &Client, sql: &str) -> Result<Statement, tokio_postgres::Error> {
        if let Some(s) = self.cache.get(sql) {
            return Ok(s.clone());
        }
        let s = client.prepare(sql).await?;
        if self.cache.len() > 1000 {
            self.cache.clear();
        }
        self.cache.insert(sql.to_string(), s.clone());
        Ok(s)
    }
}

enum Outcome {
    Done(InstructionResult),
    /// Logged by a concurrent executor; read its stored result after commit.
    LoggedElsewhere,
}

/// Runs the batch; returns one result per instruction, in order. An `Err` means nothing of
/// the batch was committed: retry it if [`pg::is_transient`], stop otherwise.
pub async fn execute_batch(
    client: &Client,
    catalog: &mut Catalog,
    statements: &mut Statements,
    batch: &[Instruction],
) -> Result<Vec<InstructionResult>, tokio_postgres::Error> {
    client.batch_execute("BEGIN").await?;
    match execute_in_transaction(client, catalog, statements, batch).await {
        Ok(outcomes) => {
            client.batch_execute("COMMIT").await?;
            finish(client, batch, outcomes).await
        }
        Err(e) => {
            // The connection may be gone; the server rolls back on its own then.
            let _ = client.batch_execute("ROLLBACK").await;
            Err(e)
        }
    }
}

async fn execute_in_transaction(
    client: &Client,
    catalog: &mut Catalog,
    statements: &mut Statements,
    batch: &[Instruction],
) -> Result<Vec<Option<Outcome>>, tokio_postgres::Error> {
    let ids: Vec<&str> = batch.iter().map(|i| i.instruction_id.as_str()).collect();
    let mut logged = load_logged(client, &ids).await?;
    let mut outcomes = Vec::with_capacity(batch.len());
    for instruction in batch {
        if logged.contains_key(&instruction.instruction_id) {
            // Already executed (earlier delivery, or earlier in this batch).
            outcomes.push(None);
            continue;
        }
        let outcome = execute_one(client, catalog, statements, instruction).await?;
        if let Outcome::Done(result) = &outcome {
            logged.insert(instruction.instruction_id.clone(), result.clone());
        }
        outcomes.push(Some(outcome));
    }
    Ok(outcomes)
}

async fn execute_one(
    client: &Client,
    catalog: &mut Catalog,
    statements: &mut Statements,
    instruction: &Instruction,
) -> Result<Outcome, tokio_postgres::Error> {
    let rejected = |code: &str, message: String| InstructionResult {
        instruction_id: instruction.instruction_id.clone(),
        status: ResultStatus::Rejected,
        error_code: Some(code.to_string()),
        error_message: Some(message),
        rows_affected: 0,
        commit_lsn: None,
        executed_at: now_micros(),
    };
    if let Some(r) = validate_header(instruction) {
        return log_outcome(client, instruction, rejected(r.code, r.message)).await;
    }
    let mut planned = Vec::with_capacity(instruction.operations.len());
    for (i, op) in instruction.operations.iter().enumerate() {
        let plan = match catalog.lookup(client, &op.table).await? {
            Ok(table) => plan_operation(&table, op),
            Err(r) => Err(r),
        };
        match plan {
            Ok(p) => planned.push(p),
            Err(r) => {
                let message = format!("operation {}: {}", i + 1, r.message);
                return log_outcome(client, instruction, rejected(r.code, message)).await;
            }
        }
    }

    client.batch_execute("SAVEPOINT pgfanout_instruction").await?;
    let mut rows: i64 = 0;
    let mut failure = None;
    let marker = statements.get(client, "SELECT pg_logical_emit_message(true, 'pgfanout', $1::text)").await?;
    if let Err(e) = client.execute(&marker, &[&instruction.instruction_id]).await {
        failure = Some(e);
    }
    for (i, p) in planned.iter().enumerate() {
        if failure.is_some() {
            break;
        }
        let result = async {
            let stmt = statements.get(client, &p.sql).await?;
            let params: Vec<&(dyn ToSql + Sync)> = p.params.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
            client.execute(&stmt, &params).await
        }
        .await;
        match result {
            Ok(n) => rows = rows.saturating_add(i64::try_from(n).unwrap_or(i64::MAX)),
            Err(e) => {
                tracing::debug!(operation = i + 1, error = %e, "instruction failed");
                failure = Some(e);
            }
        }
    }
    if let Some(e) = failure {
        if pg::is_transient(&e) {
            return Err(e);
        }
        client.batch_execute("ROLLBACK TO SAVEPOINT pgfanout_instruction").await?;
        let code = pg::sqlstate(&e).unwrap_or("XX000").to_string();
        if code.starts_with("42") {
            // The catalog may be stale (a column or table changed): look it up again next time.
            catalog.invalidate();
        }
        let status = classify_definite(&code);
        let message = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_else(|| e.to_string());
        let result = InstructionResult { status, ..rejected(&code, message) };
        return log_outcome(client, instruction, result).await;
    }
    let result = InstructionResult {
        instruction_id: instruction.instruction_id.clone(),
        status: ResultStatus::Committed,
        error_code: None,
        error_message: None,
        rows_affected: rows,
        commit_lsn: None,
        executed_at: now_micros(),
    };
    let outcome = log_outcome(client, instruction, result).await?;
    client.batch_execute("RELEASE SAVEPOINT pgfanout_instruction").await?;
    Ok(outcome)
}

/// Definite PostgreSQL errors: bad data, constraint violations and references to things
/// that do not exist are the instruction's fault (`rejected`); anything else is `failed`.
fn classify_definite(sqlstate: &str) -> ResultStatus {
    if ["22", "23", "42", "2F"].iter().any(|class| sqlstate.starts_with(class)) {
        ResultStatus::Rejected
    } else {
        ResultStatus::Failed
    }
}

fn validate_header(instruction: &Instruction) -> Option<Rejection> {
    if uuid::Uuid::parse_str(&instruction.instruction_id).is_err() {
        return Some(Rejection::new("PGF06", "instruction_id must be a UUID"));
    }
    if instruction.operations.is_empty() {
        return Some(Rejection::new("PGF05", "an instruction needs at least one operation"));
    }
    None
}

/// Writes the outcome row inside the current transaction. A unique violation means another
/// executor logged the same id concurrently: its outcome stands.
async fn log_outcome(
    client: &Client,
    instruction: &Instruction,
    result: InstructionResult,
) -> Result<Outcome, tokio_postgres::Error> {
    client.batch_execute("SAVEPOINT pgfanout_log").await?;
    let inserted = client
        .execute(
            "INSERT INTO pgfanout.instruction_log
                 (instruction_id, issued_by, status, error_code, error_message, rows_affected, executed_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[
                &result.instruction_id,
                &instruction.issued_by,
                &result.status.as_str(),
                &result.error_code,
                &result.error_message,
                &result.rows_affected,
                &result.executed_at,
            ],
        )
        .await;
    match inserted {
        Ok(_) => {
            client.batch_execute("RELEASE SAVEPOINT pgfanout_log").await?;
            Ok(Outcome::Done(result))
        }
        Err(e) if pg::sqlstate(&e) == Some("23505") => {
            client.batch_execute("ROLLBACK TO SAVEPOINT pgfanout_log").await?;
            if result.status == ResultStatus::Committed {
                // Undo this execution's effects too: the other one counts.
                client.batch_execute("ROLLBACK TO SAVEPOINT pgfanout_instruction").await?;
            }
            Ok(Outcome::LoggedElsewhere)
        }
        Err(e) => Err(e),
    }
}

async fn load_logged(client: &Client, ids: &[&str]) -> Result<HashMap<String, InstructionResult>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT instruction_id, status, error_code, error_message, rows_affected, commit_lsn, executed_at
               FROM pgfanout.instruction_log WHERE instruction_id = ANY($1)",
            &[&ids],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let result = InstructionResult {
                instruction_id: r.get(0),
                status: ResultStatus::parse(r.get(1)).unwrap_or(ResultStatus::Failed),
                error_code: r.get(2),
                error_message: r.get(3),
                rows_affected: r.get(4),
                commit_lsn: r.get(5),
                executed_at: r.get(6),
            };
            (result.instruction_id.clone(), result)
        })
        .collect())
}

/// After COMMIT: stamps committed instructions with an LSN at or after their commit record
/// (`pg_current_wal_insert_lsn()` read after the commit returned), then reads every result
/// back from the log, so first deliveries and redeliveries report the same stored values.
async fn finish(
    client: &Client,
    batch: &[Instruction],
    outcomes: Vec<Option<Outcome>>,
) -> Result<Vec<InstructionResult>, tokio_postgres::Error> {
    let ids: Vec<&str> = batch.iter().map(|i| i.instruction_id.as_str()).collect();
    client
        .execute(
            "UPDATE pgfanout.instruction_log
                SET commit_lsn = (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint
              WHERE instruction_id = ANY($1) AND status = 'committed' AND commit_lsn IS NULL",
            &[&ids],
        )
        .await?;
    let logged = load_logged(client, &ids).await?;
    let mut results = Vec::with_capacity(batch.len());
    for (instruction, outcome) in batch.iter().zip(outcomes) {
        let stored = logged.get(&instruction.instruction_id).cloned();
        let result = match (stored, outcome) {
            (Some(r), _) => r,
            // Not logged although executed: only possible for a log row removed meanwhile.
            (None, Some(Outcome::Done(r))) => r,
            (None, _) => InstructionResult {
                instruction_id: instruction.instruction_id.clone(),
                status: ResultStatus::Failed,
                error_code: Some("PGF07".into()),
                error_message: Some("the outcome of this instruction could not be read back".into()),
                rows_affected: 0,
                commit_lsn: None,
                executed_at: now_micros(),
            },
        };
        results.push(result);
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn definite_errors_are_classified() {
        assert_eq!(classify_definite("23505"), ResultStatus::Rejected);
        assert_eq!(classify_definite("22P02"), ResultStatus::Rejected);
        assert_eq!(classify_definite("42703"), ResultStatus::Rejected);
        assert_eq!(classify_definite("XX000"), ResultStatus::Failed);
    }
}

//! What the executor knows about PostgreSQL between batches: the tables instructions may
//! write and their catalog descriptions, and each connection's prepared statements.
//!
//! Both are caches: a schema change shows up as an error, after which the catalog is read
//! again ([`Catalog::invalidate`]); a new connection starts with no statements.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use tokio_postgres::{Client, Statement};

use super::plan::{printable, Rejection, UNKNOWN_TABLE};
use crate::pg::{self, TableInfo, TableName};

/// Which tables instructions may write.
#[derive(Debug, Clone)]
pub enum AllowedTables {
    /// The tables of this publication (read again when a table is not found).
    Publication(String),
    /// An explicit list.
    List(HashSet<TableName>),
}

/// Tables the executor may write and their catalog descriptions, cached.
pub struct Catalog {
    allowed: AllowedTables,
    allowed_now: HashSet<TableName>,
    allowed_loaded: Option<Instant>,
    tables: HashMap<TableName, TableInfo>,
}

/// How long a miss in the allowed set waits before the publication is read again.
const ALLOWED_REFRESH: Duration = Duration::from_secs(2);

impl Catalog {
    pub fn new(allowed: AllowedTables) -> Self {
        let allowed_now = match &allowed {
            AllowedTables::List(list) => list.clone(),
            AllowedTables::Publication(_) => HashSet::new(),
        };
        Catalog { allowed, allowed_now, allowed_loaded: None, tables: HashMap::new() }
    }

    /// Forgets cached table descriptions (after a schema change showed up as an error).
    pub fn invalidate(&mut self) {
        self.tables.clear();
        self.allowed_loaded = None;
    }

    pub(super) async fn lookup(
        &mut self,
        client: &Client,
        raw: &str,
    ) -> Result<Result<TableInfo, Rejection>, tokio_postgres::Error> {
        let Some(name) = TableName::parse(raw) else {
            return Ok(Err(Rejection::new(UNKNOWN_TABLE, format!("{:?} is not a table name (schema.table)", printable(raw)))));
        };
        if let AllowedTables::Publication(publication) = &self.allowed {
            if !self.allowed_now.contains(&name) && self.allowed_loaded.is_none_or(|t| t.elapsed() > ALLOWED_REFRESH) {
                self.allowed_now = pg::publication_tables(client, publication).await?.into_iter().collect();
                self.allowed_loaded = Some(Instant::now());
            }
        }
        if !self.allowed_now.contains(&name) {
            return Ok(Err(Rejection::new(
                UNKNOWN_TABLE,
                format!("table {:?} is not one the executor may write", printable(raw)),
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
    pub(super) async fn get(&mut self, client: &Client, sql: &str) -> Result<Statement, tokio_postgres::Error> {
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

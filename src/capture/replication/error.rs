//! Errors of the replication connection, with advice for the usual misconfigurations.

use crate::byte_reader::Truncated;

#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error("replication connection I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("{}", describe_server_error(.code, .message, .detail.as_deref(), .hint.as_deref()))]
    Server { code: String, message: String, detail: Option<String>, hint: Option<String> },
    #[error("replication protocol error: {0}")]
    Protocol(String),
    #[error("replication authentication failed: {0}")]
    Auth(String),
    #[error("invalid replication connection settings: {0}")]
    Config(String),
}

impl From<Truncated> for ReplicationError {
    fn from(t: Truncated) -> Self {
        ReplicationError::Protocol(format!("truncated {}", t.what))
    }
}

impl ReplicationError {
    /// Whether retrying later (on a new connection) may succeed ([`crate::sqlstate`]).
    pub fn is_transient(&self) -> bool {
        match self {
            ReplicationError::Io(_) => true,
            ReplicationError::Server { code, .. } => crate::sqlstate::is_transient(Some(code)),
            _ => false,
        }
    }

    /// The SQLSTATE of a server error.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            ReplicationError::Server { code, .. } => Some(code),
            _ => None,
        }
    }
}

fn describe_server_error(code: &str, message: &str, detail: Option<&str>, hint: Option<&str>) -> String {
    let mut s = format!("server error {code}: {message}");
    if let Some(d) = detail {
        s.push_str("; detail: ");
        s.push_str(d);
    }
    if let Some(h) = hint {
        s.push_str("; hint: ");
        s.push_str(h);
    }
    if let Some(advice) = advice_for(code, message) {
        s.push_str(" (");
        s.push_str(advice);
        s.push(')');
    }
    s
}

fn advice_for(code: &str, message: &str) -> Option<&'static str> {
    Some(match code {
        "42704" if message.contains("publication") => {
            "create the publication with CREATE PUBLICATION, or fix the configured publication name"
        }
        "42704" => "the replication slot does not exist: create it, or fix the configured slot name",
        "42710" => "the replication slot already exists: reuse it, or drop it with pg_drop_replication_slot()",
        "55000" if message.contains("wal_level") => {
            "set wal_level = logical in postgresql.conf and restart PostgreSQL"
        }
        "55006" => "the replication slot is in use by another process: stop that consumer or wait for it to exit",
        "42501" => "the role needs REPLICATION: ALTER ROLE <name> WITH REPLICATION",
        "28000" => "allow the connection in pg_hba.conf; logical replication connections match the database name, not the `replication` keyword",
        "28P01" => "check the configured user and password",
        "3D000" => "check the configured dbname",
        "53400" => "all replication slots are in use: raise max_replication_slots or drop unused slots",
        "53300" => "too many connections or max_wal_senders reached: raise max_wal_senders or close other replication clients",
        "57P03" => "the server is starting up or shutting down; retry later",
        _ => return None,
    })
}

//! What a PostgreSQL SQLSTATE says about retrying, for every connection pgfanout makes
//! (the executor's, capture's regular and replication connections).
//!
//! One rule, because the components must agree on what "try again later" means:
//! - class 08 (connection exception) and no SQLSTATE at all (the connection itself
//!   failed): the server may be back on a new connection;
//! - 40001 serialization failure, 40P01 deadlock: the transaction lost a race and is
//!   rolled back whole, so running it again is safe;
//! - 55P03 lock not available, 55006 object in use (a replication slot held by a
//!   consumer that is going away): another session holds what is needed, for now;
//! - 57P01/57P02/57P03: the server is shutting down, crashed, or starting up;
//! - class 53 (insufficient resources) only for 53100 disk full, 53200 out of memory and
//!   53300 too many connections, which pass as the server's load changes. 53400
//!   configuration limit exceeded (e.g. every `max_replication_slots` in use) does not
//!   change until someone changes the configuration: retrying would hide it, so it stops
//!   the component with its advice instead.

/// Whether an error with this SQLSTATE (`None`: no SQLSTATE, the connection failed) may
/// succeed when retried later.
pub fn is_transient(code: Option<&str>) -> bool {
    match code {
        None => true,
        Some(code) => {
            code.starts_with("08")
                || matches!(
                    code,
                    "40001" | "40P01" | "55P03" | "55006" | "57P01" | "57P02" | "57P03" | "53100" | "53200" | "53300"
                )
        }
    }
}

/// Whether a definite error is the statement's own fault: bad data (22), a constraint
/// violation (23), a reference to something that does not exist or a privilege (42), or
/// an SQL routine exception (2F). Anything else definite is the server's or the setup's.
pub fn is_statement_fault(code: &str) -> bool {
    ["22", "23", "42", "2F"].iter().any(|class| code.starts_with(class))
}

/// The SQLSTATE of a regular connection's error, if the server sent one.
pub fn of(err: &tokio_postgres::Error) -> Option<&str> {
    err.code().map(|c| c.code())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_transient_rule() {
        for code in [None, Some("08006"), Some("08P01"), Some("40001"), Some("40P01"), Some("55P03"), Some("55006")] {
            assert!(is_transient(code), "{code:?}");
        }
        for code in ["57P01", "57P02", "57P03", "53100", "53200", "53300"] {
            assert!(is_transient(Some(code)), "{code}");
        }
        for code in ["53400", "42704", "23505", "28P01", "3D000", "XX000", "25P02"] {
            assert!(!is_transient(Some(code)), "{code}");
        }
    }

    #[test]
    fn statement_faults_by_class() {
        for code in ["22P02", "23505", "42703", "2F005"] {
            assert!(is_statement_fault(code), "{code}");
        }
        for code in ["XX000", "53400", "25P02", "40001"] {
            assert!(!is_statement_fault(code), "{code}");
        }
    }
}

//! Quoting for SQL text, shared by PostgreSQL (regular and replication connections) and the
//! devices' SQLite stores, whose rules for these two forms are the same.
//!
//! Identifiers reach SQL text only from a catalog (PostgreSQL's, or the contract's table
//! and column names) and are always quoted; values are bound parameters wherever the
//! statement allows them, and literals only where it does not (DDL, replication commands).

/// `"ident"` with embedded double quotes doubled.
pub fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// `'literal'` with embedded single quotes doubled.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_quotes_are_doubled() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal(&quote_ident("p'q")), "'\"p''q\"'");
    }
}

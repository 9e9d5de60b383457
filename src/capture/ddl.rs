//! DDL on published tables, learnt where it commits.
//!
//! pgoutput's Relation messages say what a table looks like only before its next change,
//! and never what a statement did to the rows it did not write: `ADD COLUMN … DEFAULT`
//! fills every row without a WAL record per row, `ALTER COLUMN TYPE` and a volatile default
//! rewrite the table outside the logical stream, a rename or a drop leaves no trace in it
//! at all. So `pgfanout setup` installs an event trigger (`pgfanout_ddl`, on
//! `ddl_command_end`, the SQL in `ddl.sql`) that compares the publications' tables with
//! what it recorded after the previous statement (`pgfanout.published_shapes`: each
//! table's name and published columns, by OID) and, when they differ, writes a
//! *transactional* logical message `pgfanout.ddl` in the statement's own transaction:
//! tables that left a publication under a name (dropped, renamed, removed from it) and
//! tables to copy again (columns added, renamed, retyped or dropped; renamed; joined the
//! publication; a new key, when the table is also dropped first). Capture therefore reads it at the statement's commit, in WAL order with
//! every change around it, and a statement rolled back says nothing.
//!
//! What capture does with it ([`super::recopy`]): a `drop` delta for each table gone, and
//! an online copy of each table to copy, versioned so that no change committed after it is
//! undone; the transaction's flush position waits for both.
//!
//! The trigger never makes a user's statement fail (its errors become warnings), costs
//! nothing for DML (event triggers fire on DDL only) and does nothing when no published
//! table changed. Creating an event trigger needs a superuser: without one, `setup` says
//! so and DDL reaches devices as it did before (columns added as rows bring them).

use serde::Deserialize;
use tokio_postgres::Client;

use crate::pg;

/// Prefix of the event trigger's logical messages.
pub const DDL_PREFIX: &str = "pgfanout.ddl";

/// The table the trigger keeps, and its functions.
const FUNCTIONS_SQL: &str = include_str!("ddl.sql");

const TRIGGER_SQL: &str = "CREATE EVENT TRIGGER pgfanout_ddl ON ddl_command_end EXECUTE FUNCTION pgfanout.on_ddl_command_end()";

/// What `setup` could do about DDL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DdlTrigger {
    Installed,
    /// The role may not create event triggers; the reason, to show.
    NotPermitted(String),
}

/// Installs (idempotently) the event trigger that tells capture about DDL on published
/// tables. Needs schema `pgfanout` ([`pg::ensure_schema`]).
pub async fn install_trigger(client: &Client) -> Result<DdlTrigger, tokio_postgres::Error> {
    client.batch_execute(FUNCTIONS_SQL).await?;
    let existed = client.query_opt("SELECT 1 FROM pg_event_trigger WHERE evtname = 'pgfanout_ddl'", &[]).await?.is_some();
    if !existed {
        match client.batch_execute(TRIGGER_SQL).await {
            Ok(()) => {}
            // Racing another `setup`.
            Err(e) if pg::sqlstate(&e) == Some("42710") => {}
            Err(e) if pg::sqlstate(&e) == Some("42501") => {
                return Ok(DdlTrigger::NotPermitted(format!(
                    "the event trigger pgfanout_ddl was not created ({}): run `pgfanout setup` once as a superuser, \
                     or DDL on published tables needs the manual steps in the README",
                    e.as_db_error().map_or_else(|| e.to_string(), |d| d.message().to_string())
                )));
            }
            Err(e) => return Err(e),
        }
    }
    // A first installation records the tables as they are (devices have them from the
    // snapshot); later runs report what changed while the trigger was disabled, if anything.
    client.execute("SELECT pgfanout.sync_published_shapes($1)", &[&existed]).await?;
    Ok(DdlTrigger::Installed)
}

/// What one DDL message asks of this capture's publication.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DdlChanges {
    /// Tables (`schema.table`) that devices drop.
    pub drop: Vec<String>,
    /// Tables copied again, by their current name.
    pub copy: Vec<String>,
}

impl DdlChanges {
    pub fn is_empty(&self) -> bool {
        self.drop.is_empty() && self.copy.is_empty()
    }

    /// Adds what a later message of the same transaction asks.
    pub fn extend(&mut self, other: DdlChanges) {
        for t in other.drop {
            if !self.drop.contains(&t) {
                self.drop.push(t);
            }
        }
        for t in other.copy {
            if !self.copy.contains(&t) {
                self.copy.push(t);
            }
        }
    }
}

#[derive(Deserialize)]
struct Message {
    #[serde(default)]
    drop: Vec<(String, String)>,
    #[serde(default)]
    copy: Vec<(String, String)>,
}

/// Reads a `pgfanout.ddl` message's content: the changes for `publication`. A message that
/// does not parse says nothing (logged; the changes it describes then need a manual step).
pub fn parse(content: &[u8], publication: &str) -> DdlChanges {
    let message: Message = match serde_json::from_slice(content) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(error = %e, "a pgfanout.ddl message could not be read; ignored");
            return DdlChanges::default();
        }
    };
    let ours = |list: Vec<(String, String)>| list.into_iter().filter(|(p, _)| p == publication).map(|(_, t)| t).collect();
    DdlChanges { drop: ours(message.drop), copy: ours(message.copy) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_is_read_for_one_publication_and_garbage_says_nothing() {
        let content = br#"{"copy": [["pgfanout", "public.t2"], ["other", "public.x"]], "drop": [["pgfanout", "public.t"]]}"#;
        let changes = parse(content, "pgfanout");
        assert_eq!(changes, DdlChanges { drop: vec!["public.t".into()], copy: vec!["public.t2".into()] });
        assert!(parse(content, "nope").is_empty());
        assert!(parse(b"\xff{", "pgfanout").is_empty());
        let mut all = changes.clone();
        all.extend(parse(br#"{"copy": [["pgfanout", "public.t2"], ["pgfanout", "public.u"]]}"#, "pgfanout"));
        assert_eq!(all.copy, vec!["public.t2".to_string(), "public.u".into()]);
    }
}

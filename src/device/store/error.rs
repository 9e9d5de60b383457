//! What can go wrong with a store.

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("store file: {0}")]
    Io(std::io::Error),
    #[error("store {0} is in use by another process (a running device or replay); stop it first")]
    InUse(std::path::PathBuf),
    #[error("the store has layout version {found}, this pgfanout knows {known}: use the matching pgfanout, or move the file away and let the device rebuild it from the topic")]
    Layout { found: i64, known: i64 },
}

/// Why one delta was not applied: the store failed, or the delta makes no sense (it is
/// then recorded as rejected, and the batch goes on).
pub(super) enum ApplyError {
    Sqlite(rusqlite::Error),
    /// A delta that decodes but makes no sense (no key, reserved column names...).
    Invalid(String),
}

impl From<rusqlite::Error> for ApplyError {
    fn from(e: rusqlite::Error) -> Self {
        ApplyError::Sqlite(e)
    }
}

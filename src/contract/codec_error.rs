//! What both Avro decoders of the contracts (the generic one in [`super::codec`] and the
//! borrowing delta reader) report, and the limit they share; apart from both so that
//! neither depends on the other for it.

/// Why a record could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("undecodable {what}: {reason}")]
    Decode { what: &'static str, reason: String },
    #[error("cannot encode {what}: {reason}")]
    Encode { what: &'static str, reason: String },
}

/// Longest array accepted in a record (operations, columns): bounds the work a hostile
/// length prefix can cause.
pub(super) const MAX_ARRAY_LEN: usize = 1_000_000;

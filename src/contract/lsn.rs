//! WAL positions (log sequence numbers) as PostgreSQL writes them (`16/B374D848`) and as
//! the contracts carry them (an Avro `long`).
//!
//! An LSN is an unsigned 64-bit byte position in the WAL; the contracts carry it as a
//! signed long because Avro has no unsigned type, and use negative values for "none".
//! Conversions from a long therefore fail on negative values instead of wrapping.

use std::fmt;
use std::str::FromStr;

/// A position in PostgreSQL's write-ahead log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(u64);

/// Why a text or a long is not an LSN.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LsnError {
    #[error("invalid LSN {0:?} (expected X/Y in hexadecimal)")]
    Syntax(String),
    #[error("LSN {0} is out of range")]
    OutOfRange(i128),
}

impl Lsn {
    pub const ZERO: Lsn = Lsn(0);

    pub const fn new(position: u64) -> Lsn {
        Lsn(position)
    }

    pub const fn get(self) -> u64 {
        self.0
    }

    pub fn checked_add(self, bytes: u64) -> Option<Lsn> {
        self.0.checked_add(bytes).map(Lsn)
    }

    /// The distance in bytes from `earlier`, if it is not later than `self`.
    pub fn checked_sub(self, earlier: Lsn) -> Option<u64> {
        self.0.checked_sub(earlier.0)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl FromStr for Lsn {
    type Err = LsnError;

    /// PostgreSQL's `X/Y` notation: two hexadecimal numbers of at most eight digits.
    fn from_str(s: &str) -> Result<Lsn, LsnError> {
        let bad = || LsnError::Syntax(s.to_string());
        let (hi, lo) = s.trim().split_once('/').ok_or_else(bad)?;
        let part = |p: &str| {
            if p.is_empty() || p.len() > 8 || !p.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(bad());
            }
            u32::from_str_radix(p, 16).map_err(|_| bad())
        };
        Ok(Lsn((u64::from(part(hi)?) << 32) | u64::from(part(lo)?)))
    }
}

impl From<u64> for Lsn {
    fn from(position: u64) -> Lsn {
        Lsn(position)
    }
}

impl From<Lsn> for u64 {
    fn from(lsn: Lsn) -> u64 {
        lsn.0
    }
}

impl TryFrom<i64> for Lsn {
    type Error = LsnError;

    /// From the contracts' long; negative values ("none") are not positions.
    fn try_from(long: i64) -> Result<Lsn, LsnError> {
        u64::try_from(long).map(Lsn).map_err(|_| LsnError::OutOfRange(i128::from(long)))
    }
}

impl TryFrom<Lsn> for i64 {
    type Error = LsnError;

    fn try_from(lsn: Lsn) -> Result<i64, LsnError> {
        i64::try_from(lsn.0).map_err(|_| LsnError::OutOfRange(i128::from(lsn.0)))
    }
}

impl rusqlite::types::ToSql for Lsn {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        let long = i64::try_from(*self).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
        Ok(rusqlite::types::ToSqlOutput::from(long))
    }
}

impl rusqlite::types::FromSql for Lsn {
    fn column_result(value: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Lsn> {
        let long = i64::column_result(value)?;
        Lsn::try_from(long).map_err(|_| rusqlite::types::FromSqlError::OutOfRange(long))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trips_as_postgres_writes_it() {
        let lsn: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(lsn.get(), 0x16_B374_D848);
        assert_eq!(lsn.to_string(), "16/B374D848");
        assert_eq!(Lsn::ZERO.to_string(), "0/0");
        assert_eq!(" 0/1 ".parse::<Lsn>(), Ok(Lsn::new(1)));
        for bad in ["", "16", "/1", "1/", "g/1", "1/123456789", "1/2/3", "+1/2"] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn longs_convert_without_wrapping() {
        assert_eq!(Lsn::try_from(5_i64), Ok(Lsn::new(5)));
        assert!(Lsn::try_from(-1_i64).is_err());
        assert!(i64::try_from(Lsn::new(u64::MAX)).is_err());
        assert_eq!(i64::try_from(Lsn::new(7)), Ok(7));
    }

    #[test]
    fn arithmetic_is_checked_and_ordered() {
        assert!(Lsn::new(1) < Lsn::new(2));
        assert_eq!(Lsn::new(1).checked_add(2), Some(Lsn::new(3)));
        assert_eq!(Lsn::new(u64::MAX).checked_add(1), None);
        assert_eq!(Lsn::new(5).checked_sub(Lsn::new(3)), Some(2));
        assert_eq!(Lsn::new(3).checked_sub(Lsn::new(5)), None);
    }
}

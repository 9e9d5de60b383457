//! libpq connection strings, `key=value` pairs or a `postgres://` URL, as both kinds of
//! PostgreSQL connection read them: the regular ones (tokio-postgres, [`crate::pg`]) and
//! the replication client's.
//!
//! The TLS settings (`sslmode`, `sslrootcert`) are taken out here, once, because neither
//! client understands all of libpq's modes ([`crate::tls`] does); everything else is
//! passed on as pairs, for each client to interpret.

use crate::tls::{SslMode, Tls};

/// What is wrong with a connection string; the message names the part.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConninfoError(pub String);

/// A parsed connection string: its TLS settings and the remaining pairs, in order.
#[derive(Clone, PartialEq, Eq)]
pub struct Conninfo {
    pub pairs: Vec<(String, String)>,
    pub tls: Tls,
}

impl Conninfo {
    /// Parses either form and takes out `sslmode` and `sslrootcert` (the last of each
    /// counts, as in libpq).
    pub fn parse(s: &str) -> Result<Conninfo, ConninfoError> {
        let (mut mode, mut root_cert) = (None, None);
        let mut pairs = Vec::new();
        for (key, value) in parse_pairs(s)? {
            match key.as_str() {
                "sslmode" => mode = Some(value),
                "sslrootcert" => root_cert = Some(value),
                _ => pairs.push((key, value)),
            }
        }
        let tls = Tls::new(mode.as_deref(), root_cert.as_deref()).map_err(ConninfoError)?;
        Ok(Conninfo { pairs, tls })
    }

    /// `key='value'` pairs for tokio-postgres, whose own `sslmode` knows only disable,
    /// prefer and require: the stricter modes become `require`, and [`Tls`] checks the rest.
    pub fn to_tokio_postgres(&self) -> String {
        let mut out: Vec<String> = self.pairs.iter().map(|(k, v)| format!("{k}={}", quote_value(v))).collect();
        let mode = match self.tls.mode {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => "require",
        };
        out.push(format!("sslmode={mode}"));
        out.join(" ")
    }
}

/// The session settings that decide how PostgreSQL writes a value as text, pinned on every
/// session whose text reaches a device or is compared with one: the replication session
/// (startup parameters), the snapshot's reader and `verify` (`SET`). Without them the text
/// would follow the server's, the database's or the role's settings: `ALTER DATABASE …
/// SET TimeZone` would change every timestamptz on devices (`…17:30:00+05:30` instead of
/// `…12:00:00+00`), `DateStyle` every date, `IntervalStyle` every interval, a low
/// `extra_float_digits` would round floats, `bytea_output = escape` would break bytea, and
/// `lc_monetary` would change money. The same instant always has the same text.
pub const TEXT_OUTPUT_SETTINGS: [(&str, &str); 6] = [
    ("TimeZone", "UTC"),
    ("DateStyle", "ISO, MDY"),
    ("IntervalStyle", "postgres"),
    ("extra_float_digits", "1"),
    ("bytea_output", "hex"),
    ("lc_monetary", "C"),
];

/// [`TEXT_OUTPUT_SETTINGS`] as `SET` statements (`SET LOCAL` with `local`, for inside a
/// transaction that should leave the session as it was), each ending in `; `.
pub fn text_output_settings_sql(local: bool) -> String {
    let scope = if local { "LOCAL " } else { "" };
    TEXT_OUTPUT_SETTINGS.iter().map(|(name, value)| format!("SET {scope}{name} = '{value}'; ")).collect()
}

/// A libpq key=value value, quoted.
fn quote_value(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// The key/value pairs of a connection string in either form.
pub fn parse_pairs(s: &str) -> Result<Vec<(String, String)>, ConninfoError> {
    let s = s.trim();
    if s.starts_with("postgres://") || s.starts_with("postgresql://") {
        parse_url(s)
    } else {
        parse_key_values(s)
    }
}

fn parse_key_values(s: &str) -> Result<Vec<(String, String)>, ConninfoError> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(ConninfoError(format!("missing \"=\" after {key:?} in connection string")));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    None => return Err(ConninfoError(format!("unterminated quoted value for {key:?} in connection string"))),
                    Some('\'') => break,
                    Some('\\') => match chars.next() {
                        Some(c) => value.push(c),
                        None => return Err(ConninfoError(format!("unterminated quoted value for {key:?} in connection string"))),
                    },
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    if let Some(e) = chars.next() {
                        value.push(e);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        out.push((key, value));
    }
}

fn parse_url(s: &str) -> Result<Vec<(String, String)>, ConninfoError> {
    let rest = s.strip_prefix("postgresql://").or_else(|| s.strip_prefix("postgres://")).unwrap_or(s);
    let (rest, query) = match rest.split_once('?') {
        Some((a, q)) => (a, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match rest.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (rest, None),
    };
    let mut out = Vec::new();
    let hostport = match authority.rsplit_once('@') {
        Some((userinfo, hostport)) => {
            let (user, password) = match userinfo.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (userinfo, None),
            };
            out.push(("user".to_owned(), percent_decode(user)?));
            if let Some(p) = password {
                out.push(("password".to_owned(), percent_decode(p)?));
            }
            hostport
        }
        None => authority,
    };
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or_else(|| ConninfoError("unterminated IPv6 address in URL".into()))?;
        (host, after.strip_prefix(':'))
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    out.push(("host".to_owned(), percent_decode(host)?));
    if let Some(p) = port {
        out.push(("port".to_owned(), percent_decode(p)?));
    }
    if let Some(db) = path {
        out.push(("dbname".to_owned(), percent_decode(db)?));
    }
    for param in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = param.split_once('=').ok_or_else(|| ConninfoError(format!("URL parameter {param:?} has no value")))?;
        out.push((percent_decode(k)?, percent_decode(v)?));
    }
    Ok(out)
}

fn percent_decode(s: &str) -> Result<String, ConninfoError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .filter(|h| h.bytes().all(|c| c.is_ascii_hexdigit()))
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| ConninfoError(format!("invalid percent-encoding in {s:?}")))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ConninfoError("percent-decoded URL part is not UTF-8".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{SslMode, Tls};

    /// The string for tokio-postgres and the TLS settings.
    fn split_conninfo(s: &str) -> Result<(String, Tls), String> {
        let c = Conninfo::parse(s).map_err(|e| e.to_string())?;
        Ok((c.to_tokio_postgres(), c.tls))
    }

    #[test]
    fn modes_and_the_rest_of_the_connection_string() {
        let (rest, tls) = split_conninfo("host=db port=5433 user=a password='x y' sslmode=verify-full").unwrap();
        assert_eq!(rest, "host='db' port='5433' user='a' password='x y' sslmode=require");
        assert_eq!(tls, Tls { mode: SslMode::VerifyFull, root_cert: None });
        assert!(tls.verifies());
        let (rest, tls) = split_conninfo("postgres://u:p%27q@h:1/d?sslmode=disable").unwrap();
        assert_eq!(rest, "user='u' password='p\\'q' host='h' port='1' dbname='d' sslmode=disable");
        assert_eq!(tls.mode, SslMode::Disable);
        let (_, tls) = split_conninfo("host=h").unwrap();
        assert_eq!(tls, Tls::default());
        assert!(!tls.verifies());
    }

    #[test]
    fn bad_settings_are_explained() {
        assert!(split_conninfo("host=h sslmode=sometimes").unwrap_err().contains("invalid sslmode"));
        assert!(split_conninfo("host=h sslmode=require sslrootcert=/no/such/ca.pem")
            .unwrap_err()
            .contains("not a readable file"));
    }
}

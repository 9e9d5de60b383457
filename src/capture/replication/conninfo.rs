//! Connection settings of the replication connection, parsed from a libpq key=value string
//! or a postgres:// URL.

use std::fmt;

use super::ReplicationError;
use crate::tls::Tls;

/// Connection settings for a replication connection.
#[derive(Clone, PartialEq, Eq)]
pub struct ReplicationConfig {
    /// Host name, IP address, or (starting with `/`) a Unix-domain socket
    /// directory.
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub dbname: String,
    pub application_name: String,
    pub tls: Tls,
}

impl fmt::Debug for ReplicationConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplicationConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("dbname", &self.dbname)
            .field("application_name", &self.application_name)
            .field("tls", &self.tls)
            .finish()
    }
}

const DEFAULT_APPLICATION_NAME: &str = "pgfanout";

impl ReplicationConfig {
    /// Parses a libpq connection string, either `key=value` pairs
    /// (`host=127.0.0.1 port=5432 user=postgres password=x dbname=d`) or a
    /// `postgres://user:password@host:port/dbname?param=value` URL.
    /// Defaults: host `localhost`, port 5432, user `postgres`, dbname = user,
    /// application_name `pgfanout`.
    pub fn from_conninfo(s: &str) -> Result<Self, ReplicationError> {
        let pairs = parse_pairs(s)?;
        let (mut sslmode, mut sslrootcert) = (None, None);
        let mut cfg = ReplicationConfig {
            host: "localhost".into(),
            port: 5432,
            user: "postgres".into(),
            password: None,
            dbname: String::new(),
            application_name: String::new(),
            tls: Tls::default(),
        };
        let mut fallback_app = None;
        let mut hostaddr = None;
        for (key, value) in pairs {
            match key.as_str() {
                "host" if !value.is_empty() => cfg.host = value,
                "host" => {}
                "hostaddr" if !value.is_empty() => hostaddr = Some(value),
                "hostaddr" => {}
                "port" if value.is_empty() => {}
                "port" => {
                    cfg.port = value
                        .parse()
                        .map_err(|_| ReplicationError::Config(format!("invalid port {value:?}")))?
                }
                "user" if !value.is_empty() => cfg.user = value,
                "user" => {}
                "password" => cfg.password = Some(value),
                "dbname" => cfg.dbname = value,
                "application_name" => cfg.application_name = value,
                "fallback_application_name" => fallback_app = Some(value),
                "sslmode" => sslmode = Some(value),
                "sslrootcert" => sslrootcert = Some(value),
                // Accepted for compatibility with connection strings shared
                // with regular clients; they do not change this client.
                "connect_timeout" | "replication" | "target_session_attrs" | "keepalives"
                | "keepalives_idle" | "keepalives_interval" | "keepalives_count" | "client_encoding" => {}
                other => {
                    return Err(ReplicationError::Config(format!(
                        "unsupported connection option {other:?} (supported: host, hostaddr, port, user, password, dbname, application_name, sslmode, sslrootcert)"
                    )))
                }
            }
        }
        cfg.tls = Tls::new(sslmode.as_deref(), sslrootcert.as_deref()).map_err(ReplicationError::Config)?;
        if let Some(addr) = hostaddr {
            cfg.host = addr;
        }
        if cfg.host.contains(',') {
            return Err(ReplicationError::Config(format!("multiple hosts are not supported: {:?}", cfg.host)));
        }
        if cfg.dbname.is_empty() {
            cfg.dbname = cfg.user.clone();
        }
        if cfg.application_name.is_empty() {
            cfg.application_name = fallback_app.unwrap_or_else(|| DEFAULT_APPLICATION_NAME.into());
        }
        Ok(cfg)
    }
}

/// The key/value pairs of a connection string in either form.
pub(crate) fn parse_pairs(s: &str) -> Result<Vec<(String, String)>, ReplicationError> {
    let s = s.trim();
    if s.starts_with("postgres://") || s.starts_with("postgresql://") {
        parse_url(s)
    } else {
        parse_key_values(s)
    }
}

fn parse_key_values(s: &str) -> Result<Vec<(String, String)>, ReplicationError> {
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
            return Err(ReplicationError::Config(format!("missing \"=\" after {key:?} in connection string")));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    None => {
                        return Err(ReplicationError::Config(format!(
                            "unterminated quoted value for {key:?} in connection string"
                        )))
                    }
                    Some('\'') => break,
                    Some('\\') => match chars.next() {
                        Some(c) => value.push(c),
                        None => {
                            return Err(ReplicationError::Config(format!(
                                "unterminated quoted value for {key:?} in connection string"
                            )))
                        }
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

fn parse_url(s: &str) -> Result<Vec<(String, String)>, ReplicationError> {
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
        let (host, after) =
            v6.split_once(']').ok_or_else(|| ReplicationError::Config("unterminated IPv6 address in URL".into()))?;
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
        let (k, v) =
            param.split_once('=').ok_or_else(|| ReplicationError::Config(format!("URL parameter {param:?} has no value")))?;
        out.push((percent_decode(k)?, percent_decode(v)?));
    }
    Ok(out)
}

fn percent_decode(s: &str) -> Result<String, ReplicationError> {
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
                .ok_or_else(|| ReplicationError::Config(format!("invalid percent-encoding in {s:?}")))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ReplicationError::Config("percent-decoded URL part is not UTF-8".into()))
}

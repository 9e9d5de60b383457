//! Connection settings of the replication connection, read from a libpq connection string
//! ([`crate::conninfo`]).

use std::fmt;

use super::ReplicationError;
use crate::conninfo::{Conninfo, ConninfoError};
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
        let Conninfo { pairs, tls } = Conninfo::parse(s)?;
        let mut cfg = ReplicationConfig {
            host: "localhost".into(),
            port: 5432,
            user: "postgres".into(),
            password: None,
            dbname: String::new(),
            application_name: String::new(),
            tls,
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

impl From<ConninfoError> for ReplicationError {
    fn from(e: ConninfoError) -> Self {
        ReplicationError::Config(e.0)
    }
}

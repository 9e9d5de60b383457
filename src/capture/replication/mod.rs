//! A minimal client for PostgreSQL logical replication connections.
//!
//! It opens a `replication=database` connection, authenticates (trust,
//! cleartext password, MD5 or SCRAM-SHA-256), runs replication commands
//! over the simple query protocol and streams the copy-both data of
//! `START_REPLICATION`. The XLogData payloads it hands out are raw pgoutput
//! messages, to be decoded with [`super::pgoutput::decode`].
//!
//! TLS follows libpq's `sslmode` and `sslrootcert` ([`crate::tls`]).

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use bytes::BytesMut;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::frontend;

pub use super::pgoutput::Lsn;
use crate::byte_reader::ByteReader;
use crate::conninfo::TEXT_OUTPUT_SETTINGS;
use crate::quote::{quote_ident, quote_literal};
use crate::tls::SslMode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Upper bound for the TCP connect, authentication and startup phase.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

mod config;
mod error;
mod stream;
mod wire;

use wire::{log_notice, server_error, unexpected, Conn, Socket, READ_CHUNK};

pub use config::ReplicationConfig;
pub use error::ReplicationError;
pub use stream::{ReplicationEvent, ReplicationStream, CLOSE_TIMEOUT};

/// Formats an LSN the way PostgreSQL does (`16/B374D848`); [`crate::contract::Lsn`] for
/// positions kept as raw `u64`.
pub fn format_lsn(lsn: Lsn) -> String {
    crate::contract::Lsn::new(lsn).to_string()
}

/// Parses an LSN in PostgreSQL's `X/Y` hexadecimal notation.
pub fn parse_lsn(s: &str) -> Result<Lsn, ReplicationError> {
    s.parse::<crate::contract::Lsn>().map(u64::from).map_err(|_| ReplicationError::Protocol(format!("invalid LSN {s:?}")))
}

/// Result of `IDENTIFY_SYSTEM`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemInfo {
    pub systemid: String,
    pub timeline: u32,
    pub xlogpos: Lsn,
    pub dbname: Option<String>,
}

/// Result of `CREATE_REPLICATION_SLOT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedSlot {
    pub slot_name: String,
    pub consistent_point: Lsn,
    /// Exported snapshot; usable with `SET TRANSACTION SNAPSHOT` by another
    /// session until the next command runs on this connection.
    pub snapshot_name: Option<String>,
}

/// Rows of a simple query, every value in text format.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueryResult {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Option<String>>>,
}

impl QueryResult {
    fn value(&self, row: usize, column: &str) -> Result<Option<&str>, ReplicationError> {
        let idx = self
            .columns
            .iter()
            .position(|c| c == column)
            .ok_or_else(|| ReplicationError::Protocol(format!("result has no column {column:?}")))?;
        let row = self.rows.get(row).ok_or_else(|| ReplicationError::Protocol("result has too few rows".into()))?;
        Ok(row.get(idx).and_then(|v| v.as_deref()))
    }

    fn required(&self, row: usize, column: &str) -> Result<&str, ReplicationError> {
        self.value(row, column)?.ok_or_else(|| ReplicationError::Protocol(format!("column {column:?} is NULL")))
    }
}

/// A replication connection in command mode.
pub struct ReplicationClient {
    conn: Conn,
    parameters: HashMap<String, String>,
    backend_pid: Option<i32>,
}

impl fmt::Debug for ReplicationClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplicationClient").field("backend_pid", &self.backend_pid).finish_non_exhaustive()
    }
}

impl ReplicationClient {
    /// Connects with `replication=database`, authenticates and waits for
    /// the server to be ready. The whole phase is bounded by
    /// [`CONNECT_TIMEOUT`].
    pub async fn connect(cfg: &ReplicationConfig) -> Result<Self, ReplicationError> {
        match tokio::time::timeout(CONNECT_TIMEOUT, Self::connect_inner(cfg)).await {
            Ok(result) => result,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("connecting to {}:{} timed out after {}s", cfg.host, cfg.port, CONNECT_TIMEOUT.as_secs()),
            )
            .into()),
        }
    }

    async fn connect_inner(cfg: &ReplicationConfig) -> Result<Self, ReplicationError> {
        let socket: Box<dyn Socket> = if cfg.host.starts_with('/') {
            #[cfg(unix)]
            {
                let path = format!("{}/.s.PGSQL.{}", cfg.host.trim_end_matches('/'), cfg.port);
                Box::new(tokio::net::UnixStream::connect(path).await?)
            }
            #[cfg(not(unix))]
            {
                return Err(ReplicationError::Config("Unix-domain sockets are not available".into()));
            }
        } else {
            let mut tcp = tokio::net::TcpStream::connect((cfg.host.as_str(), cfg.port)).await?;
            tcp.set_nodelay(true)?;
            if cfg.tls.mode == SslMode::Disable {
                Box::new(tcp)
            } else {
                let mut request = BytesMut::new();
                frontend::ssl_request(&mut request);
                tcp.write_all(&request).await?;
                match tcp.read_u8().await? {
                    b'S' => Box::new(cfg.tls.handshake(&cfg.host, tcp).await?),
                    b'N' if cfg.tls.mode == SslMode::Prefer => Box::new(tcp),
                    b'N' => {
                        return Err(ReplicationError::Config(format!(
                            "the server at {}:{} does not accept TLS connections, which the connection string requires (sslmode)",
                            cfg.host, cfg.port
                        )))
                    }
                    other => return Err(ReplicationError::Protocol(format!("unexpected answer {other:#x} to an SSLRequest"))),
                }
            }
        };
        let mut client = ReplicationClient {
            conn: Conn { socket, rbuf: BytesMut::with_capacity(READ_CHUNK), wbuf: BytesMut::with_capacity(1024) },
            parameters: HashMap::new(),
            backend_pid: None,
        };
        let params = [
            ("user", cfg.user.as_str()),
            ("database", cfg.dbname.as_str()),
            ("replication", "database"),
            ("application_name", cfg.application_name.as_str()),
            ("client_encoding", "UTF8"),
        ];
        // pgoutput writes values in the walsender's settings; startup parameters win over
        // the server's, the database's and the role's.
        frontend::startup_message(params.into_iter().chain(TEXT_OUTPUT_SETTINGS), &mut client.conn.wbuf)?;
        client.conn.flush().await?;
        client.authenticate(cfg).await?;
        client.read_until_ready("startup").await?;
        tracing::debug!(
            host = %cfg.host,
            port = cfg.port,
            user = %cfg.user,
            backend_pid = client.backend_pid,
            "replication connection established"
        );
        Ok(client)
    }

    fn password<'a>(cfg: &'a ReplicationConfig, method: &str) -> Result<&'a str, ReplicationError> {
        cfg.password.as_deref().ok_or_else(|| {
            ReplicationError::Auth(format!(
                "the server requested {method} authentication for user {:?} but no password is configured",
                cfg.user
            ))
        })
    }

    async fn authenticate(&mut self, cfg: &ReplicationConfig) -> Result<(), ReplicationError> {
        let mut scram: Option<ScramSha256> = None;
        loop {
            let frame = self.conn.expect_frame().await?;
            match frame.tag {
                b'R' => {}
                b'E' => return Err(server_error(&frame.body)),
                b'N' => {
                    log_notice(&frame.body);
                    continue;
                }
                b'v' => return Err(ReplicationError::Protocol("server does not support protocol version 3.0".into())),
                other => return Err(unexpected(other, "authentication")),
            }
            let mut body = ByteReader::new(&frame.body);
            match body.i32("authentication request")? {
                0 => return Ok(()),
                3 => {
                    let pw = Self::password(cfg, "cleartext password")?;
                    frontend::password_message(pw.as_bytes(), &mut self.conn.wbuf)?;
                }
                5 => {
                    let salt = body.array::<4>("MD5 salt")?;
                    let pw = Self::password(cfg, "MD5 password")?;
                    let hash = md5_hash(cfg.user.as_bytes(), pw.as_bytes(), salt);
                    frontend::password_message(hash.as_bytes(), &mut self.conn.wbuf)?;
                }
                10 => {
                    let mut offered = Vec::new();
                    loop {
                        let m = body.cstr("SASL mechanism list")?;
                        if m.is_empty() {
                            break;
                        }
                        offered.push(String::from_utf8_lossy(m).into_owned());
                    }
                    if !offered.iter().any(|m| m == SCRAM_SHA_256) {
                        return Err(ReplicationError::Auth(format!(
                            "server offers SASL mechanisms {offered:?}; only {SCRAM_SHA_256} is supported"
                        )));
                    }
                    let pw = Self::password(cfg, "SCRAM-SHA-256")?;
                    let s = ScramSha256::new(pw.as_bytes(), ChannelBinding::unsupported());
                    frontend::sasl_initial_response(SCRAM_SHA_256, s.message(), &mut self.conn.wbuf)?;
                    scram = Some(s);
                }
                11 => {
                    let s =
                        scram.as_mut().ok_or_else(|| ReplicationError::Protocol("SASL continue without SASL start".into()))?;
                    s.update(body.rest()).map_err(|e| ReplicationError::Auth(format!("SCRAM exchange failed: {e}")))?;
                    frontend::sasl_response(s.message(), &mut self.conn.wbuf)?;
                }
                12 => {
                    let s = scram.as_mut().ok_or_else(|| ReplicationError::Protocol("SASL final without SASL start".into()))?;
                    s.finish(body.rest())
                        .map_err(|e| ReplicationError::Auth(format!("server SCRAM signature did not verify: {e}")))?;
                    continue;
                }
                code => {
                    let name = match code {
                        2 => "Kerberos V5",
                        6 => "SCM credentials",
                        7 | 8 => "GSSAPI",
                        9 => "SSPI",
                        _ => "unknown",
                    };
                    return Err(ReplicationError::Auth(format!(
                        "unsupported authentication method {name} (request {code}); configure trust, password, md5 or scram-sha-256 in pg_hba.conf"
                    )));
                }
            }
            self.conn.flush().await?;
        }
    }

    /// Consumes messages until ReadyForQuery; an ErrorResponse seen on the
    /// way is returned after the server is ready again.
    async fn read_until_ready(&mut self, during: &str) -> Result<(), ReplicationError> {
        let mut error = None;
        loop {
            let frame = self.conn.frame_or_pending(&mut error).await?;
            match frame.tag {
                b'Z' => return error.map_or(Ok(()), Err),
                b'E' => {
                    if error.is_none() {
                        error = Some(server_error(&frame.body));
                    }
                }
                b'N' => log_notice(&frame.body),
                b'S' => self.record_parameter(&frame.body),
                b'K' => {
                    self.backend_pid = ByteReader::new(&frame.body).i32("BackendKeyData").ok();
                }
                b'C' | b'I' => {}
                other => return Err(unexpected(other, during)),
            }
        }
    }

    fn record_parameter(&mut self, body: &[u8]) {
        let mut b = ByteReader::new(body);
        if let (Ok(k), Ok(v)) = (b.cstr("parameter name"), b.cstr("parameter value")) {
            self.parameters.insert(String::from_utf8_lossy(k).into_owned(), String::from_utf8_lossy(v).into_owned());
        }
    }

    /// A run-time parameter reported by the server (`server_version`, ...).
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.parameters.get(name).map(String::as_str)
    }

    /// Process id of the walsender serving this connection.
    pub fn backend_pid(&self) -> Option<i32> {
        self.backend_pid
    }

    /// Runs one command over the simple query protocol and returns the rows
    /// of its (last) result set.
    pub async fn simple_query(&mut self, sql: &str) -> Result<QueryResult, ReplicationError> {
        frontend::query(sql, &mut self.conn.wbuf)?;
        self.conn.flush().await?;
        let mut result = QueryResult::default();
        let mut error = None;
        loop {
            let frame = self.conn.frame_or_pending(&mut error).await?;
            match frame.tag {
                b'T' => {
                    result = QueryResult::default();
                    let mut b = ByteReader::new(&frame.body);
                    let n = b.i16("RowDescription")?;
                    for _ in 0..n {
                        let name = b.cstr("RowDescription")?;
                        b.take(18, "RowDescription")?;
                        result.columns.push(String::from_utf8_lossy(name).into_owned());
                    }
                }
                b'D' => {
                    let mut b = ByteReader::new(&frame.body);
                    let n = b.i16("DataRow")?;
                    let mut row = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
                    for _ in 0..n {
                        let len = b.i32("DataRow")?;
                        if len < 0 {
                            row.push(None);
                        } else {
                            let v = b.take(usize::try_from(len).unwrap_or(usize::MAX), "DataRow")?;
                            row.push(Some(String::from_utf8_lossy(v).into_owned()));
                        }
                    }
                    result.rows.push(row);
                }
                b'C' | b'I' => {}
                b'E' => {
                    if error.is_none() {
                        error = Some(server_error(&frame.body));
                    }
                }
                b'N' => log_notice(&frame.body),
                b'S' => self.record_parameter(&frame.body),
                b'Z' => return error.map_or(Ok(result), Err),
                other => return Err(unexpected(other, "simple query")),
            }
        }
    }

    pub async fn identify_system(&mut self) -> Result<SystemInfo, ReplicationError> {
        let r = self.simple_query("IDENTIFY_SYSTEM").await?;
        let timeline = r.required(0, "timeline")?;
        Ok(SystemInfo {
            systemid: r.required(0, "systemid")?.to_owned(),
            timeline: timeline.parse().map_err(|_| ReplicationError::Protocol(format!("invalid timeline {timeline:?}")))?,
            xlogpos: parse_lsn(r.required(0, "xlogpos")?)?,
            dbname: r.value(0, "dbname")?.map(str::to_owned),
        })
    }

    /// Creates a logical slot using the pgoutput plugin (PostgreSQL 15+
    /// syntax). With `export_snapshot`, the returned snapshot stays valid
    /// only until the next command on this connection.
    pub async fn create_logical_slot(&mut self, slot: &str, export_snapshot: bool) -> Result<CreatedSlot, ReplicationError> {
        self.create_slot(slot, "", if export_snapshot { "export" } else { "nothing" }).await
    }

    /// Creates a temporary logical slot (dropped when this connection closes) and exports
    /// its snapshot, which stays valid until the next command on this connection.
    pub async fn create_temporary_slot_with_snapshot(&mut self, slot: &str) -> Result<CreatedSlot, ReplicationError> {
        self.create_slot(slot, " TEMPORARY", "export").await
    }

    async fn create_slot(&mut self, slot: &str, temporary: &str, snapshot: &str) -> Result<CreatedSlot, ReplicationError> {
        let sql = format!("CREATE_REPLICATION_SLOT {}{temporary} LOGICAL pgoutput (SNAPSHOT '{snapshot}')", quote_ident(slot));
        let r = self.simple_query(&sql).await?;
        Ok(CreatedSlot {
            slot_name: r.required(0, "slot_name")?.to_owned(),
            consistent_point: parse_lsn(r.required(0, "consistent_point")?)?,
            snapshot_name: r.value(0, "snapshot_name")?.map(str::to_owned),
        })
    }

    /// Drops a replication slot; with `wait`, waits until the slot is no
    /// longer active instead of failing with 55006.
    pub async fn drop_slot(&mut self, slot: &str, wait: bool) -> Result<(), ReplicationError> {
        let sql = format!("DROP_REPLICATION_SLOT {}{}", quote_ident(slot), if wait { " WAIT" } else { "" });
        self.simple_query(&sql).await.map(drop)
    }

    /// Starts streaming pgoutput (protocol version 1, with logical decoding
    /// messages) from `start` for the given publication.
    pub async fn start_replication(
        mut self,
        slot: &str,
        start: Lsn,
        publication: &str,
    ) -> Result<ReplicationStream, ReplicationError> {
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {} (proto_version '1', publication_names {}, messages 'true')",
            quote_ident(slot),
            format_lsn(start),
            quote_literal(&quote_ident(publication)),
        );
        frontend::query(&sql, &mut self.conn.wbuf)?;
        self.conn.flush().await?;
        loop {
            let frame = self.conn.expect_frame().await?;
            match frame.tag {
                b'W' => break,
                b'E' => {
                    let err = server_error(&frame.body);
                    // The connection is consumed either way; the server's
                    // error is the one worth reporting.
                    let _ = self.read_until_ready("START_REPLICATION").await;
                    return Err(err);
                }
                b'N' => log_notice(&frame.body),
                b'S' => self.record_parameter(&frame.body),
                other => return Err(unexpected(other, "START_REPLICATION")),
            }
        }
        tracing::info!(slot, start = %format_lsn(start), publication, "logical replication started");
        Ok(ReplicationStream::new(self.conn))
    }
}

#[cfg(test)]
mod tests;

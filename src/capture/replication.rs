//! A minimal client for PostgreSQL logical replication connections.
//!
//! It opens a `replication=database` connection, authenticates (trust,
//! cleartext password, MD5 or SCRAM-SHA-256), runs replication commands
//! over the simple query protocol and streams the copy-both data of
//! `START_REPLICATION`. The XLogData payloads it hands out are raw pgoutput
//! messages, to be decoded with [`super::pgoutput::decode`].
//!
//! TLS is not supported: `sslmode` values that demand it are rejected.

use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes, BytesMut};
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::{backend, frontend};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub use super::pgoutput::Lsn;

/// Upper bound for the TCP connect, authentication and startup phase.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound for draining the copy stream in [`ReplicationStream::close`].
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest backend message accepted (PostgreSQL's own limit is 1 GiB of
/// data plus a little framing).
const MAX_MESSAGE_LEN: usize = (1 << 30) + 64 * 1024;
const READ_CHUNK: usize = 64 * 1024;
/// Microseconds between 1970-01-01 and 2000-01-01.
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error("replication connection I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("{}", describe_server_error(.code, .message, .detail.as_deref(), .hint.as_deref()))]
    Server {
        code: String,
        message: String,
        detail: Option<String>,
        hint: Option<String>,
    },
    #[error("replication protocol error: {0}")]
    Protocol(String),
    #[error("replication authentication failed: {0}")]
    Auth(String),
    #[error("invalid replication connection settings: {0}")]
    Config(String),
}

impl ReplicationError {
    /// Whether retrying later (on a new connection) may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            ReplicationError::Io(_) => true,
            ReplicationError::Server { code, .. } => {
                code.starts_with("08")
                    || matches!(
                        code.as_str(),
                        "57P01" | "57P02" | "57P03" | "55006" | "53300"
                    )
            }
            _ => false,
        }
    }

    /// The SQLSTATE of a server error.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            ReplicationError::Server { code, .. } => Some(code),
            _ => None,
        }
    }
}

fn describe_server_error(
    code: &str,
    message: &str,
    detail: Option<&str>,
    hint: Option<&str>,
) -> String {
    let mut s = format!("server error {code}: {message}");
    if let Some(d) = detail {
        s.push_str("; detail: ");
        s.push_str(d);
    }
    if let Some(h) = hint {
        s.push_str("; hint: ");
        s.push_str(h);
    }
    if let Some(advice) = advice_for(code, message) {
        s.push_str(" (");
        s.push_str(advice);
        s.push(')');
    }
    s
}

fn advice_for(code: &str, message: &str) -> Option<&'static str> {
    Some(match code {
        "42704" if message.contains("publication") => {
            "create the publication with CREATE PUBLICATION, or fix the configured publication name"
        }
        "42704" => "the replication slot does not exist: create it, or fix the configured slot name",
        "42710" => "the replication slot already exists: reuse it, or drop it with pg_drop_replication_slot()",
        "55000" if message.contains("wal_level") => {
            "set wal_level = logical in postgresql.conf and restart PostgreSQL"
        }
        "55006" => "the replication slot is in use by another process: stop that consumer or wait for it to exit",
        "42501" => "the role needs REPLICATION: ALTER ROLE <name> WITH REPLICATION",
        "28000" => "allow the connection in pg_hba.conf; logical replication connections match the database name, not the `replication` keyword",
        "28P01" => "check the configured user and password",
        "3D000" => "check the configured dbname",
        "53400" => "all replication slots are in use: raise max_replication_slots or drop unused slots",
        "53300" => "too many connections or max_wal_senders reached: raise max_wal_senders or close other replication clients",
        "57P03" => "the server is starting up or shutting down; retry later",
        _ => return None,
    })
}

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
        let s = s.trim();
        let pairs = if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            parse_url(s)?
        } else {
            parse_key_values(s)?
        };
        let mut cfg = ReplicationConfig {
            host: "localhost".into(),
            port: 5432,
            user: "postgres".into(),
            password: None,
            dbname: String::new(),
            application_name: String::new(),
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
                "sslmode" => match value.as_str() {
                    "" | "disable" | "allow" | "prefer" => {}
                    other => {
                        return Err(ReplicationError::Config(format!(
                            "sslmode={other} is not supported: the replication client does not speak TLS; use sslmode=disable or prefer"
                        )))
                    }
                },
                // Accepted for compatibility with connection strings shared
                // with regular clients; they do not change this client.
                "connect_timeout" | "replication" | "target_session_attrs" | "keepalives"
                | "keepalives_idle" | "keepalives_interval" | "keepalives_count" | "client_encoding" => {}
                other => {
                    return Err(ReplicationError::Config(format!(
                        "unsupported connection option {other:?} (supported: host, hostaddr, port, user, password, dbname, application_name, sslmode)"
                    )))
                }
            }
        }
        if let Some(addr) = hostaddr {
            cfg.host = addr;
        }
        if cfg.host.contains(',') {
            return Err(ReplicationError::Config(format!(
                "multiple hosts are not supported: {:?}",
                cfg.host
            )));
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
            return Err(ReplicationError::Config(format!(
                "missing \"=\" after {key:?} in connection string"
            )));
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
    let rest = s
        .strip_prefix("postgresql://")
        .or_else(|| s.strip_prefix("postgres://"))
        .unwrap_or(s);
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
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| ReplicationError::Config("unterminated IPv6 address in URL".into()))?;
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
        let (k, v) = param.split_once('=').ok_or_else(|| {
            ReplicationError::Config(format!("URL parameter {param:?} has no value"))
        })?;
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
                .ok_or_else(|| {
                    ReplicationError::Config(format!("invalid percent-encoding in {s:?}"))
                })?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out)
        .map_err(|_| ReplicationError::Config("percent-decoded URL part is not UTF-8".into()))
}

/// Formats an LSN the way PostgreSQL does (`16/B374D848`).
pub fn format_lsn(lsn: Lsn) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// Parses an LSN in PostgreSQL's `X/Y` hexadecimal notation.
pub fn parse_lsn(s: &str) -> Result<Lsn, ReplicationError> {
    let bad = || ReplicationError::Protocol(format!("invalid LSN {s:?}"));
    let (hi, lo) = s.trim().split_once('/').ok_or_else(bad)?;
    let part = |p: &str| {
        if p.is_empty() || p.len() > 8 || !p.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(bad());
        }
        u32::from_str_radix(p, 16).map_err(|_| bad())
    };
    Ok((u64::from(part(hi)?) << 32) | u64::from(part(lo)?))
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
            .ok_or_else(|| {
                ReplicationError::Protocol(format!("result has no column {column:?}"))
            })?;
        let row = self
            .rows
            .get(row)
            .ok_or_else(|| ReplicationError::Protocol("result has too few rows".into()))?;
        Ok(row.get(idx).and_then(|v| v.as_deref()))
    }

    fn required(&self, row: usize, column: &str) -> Result<&str, ReplicationError> {
        self.value(row, column)?
            .ok_or_else(|| ReplicationError::Protocol(format!("column {column:?} is NULL")))
    }
}

trait Socket: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Socket for T {}

/// One backend message: its tag and its body (without the length word).
struct Frame {
    tag: u8,
    body: Bytes,
}

/// Framed connection: buffered reads of backend messages and writes of
/// frontend messages.
struct Conn {
    socket: Box<dyn Socket>,
    rbuf: BytesMut,
    wbuf: BytesMut,
}

impl Conn {
    /// Takes one complete message off the read buffer, if there is one.
    fn try_frame(&mut self) -> Result<Option<Frame>, ReplicationError> {
        let Some(header) = backend::Header::parse(&self.rbuf)? else {
            return Ok(None);
        };
        let len = usize::try_from(header.len())
            .map_err(|_| ReplicationError::Protocol("negative message length".into()))?;
        if len > MAX_MESSAGE_LEN {
            return Err(ReplicationError::Protocol(format!(
                "backend message of {len} bytes exceeds the 1 GiB limit"
            )));
        }
        let total = len + 1;
        if self.rbuf.len() < total {
            self.rbuf.reserve(total - self.rbuf.len());
            return Ok(None);
        }
        let mut body = self.rbuf.split_to(total).freeze();
        body.advance(5);
        Ok(Some(Frame {
            tag: header.tag(),
            body,
        }))
    }

    /// Reads the next message; `None` on a clean end of stream between
    /// messages.
    async fn read_frame(&mut self) -> Result<Option<Frame>, ReplicationError> {
        loop {
            if let Some(frame) = self.try_frame()? {
                return Ok(Some(frame));
            }
            if self.rbuf.capacity() - self.rbuf.len() < READ_CHUNK / 4 {
                self.rbuf.reserve(READ_CHUNK);
            }
            if self.socket.read_buf(&mut self.rbuf).await? == 0 {
                if self.rbuf.is_empty() {
                    return Ok(None);
                }
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "server closed the connection in the middle of a message",
                )
                .into());
            }
        }
    }

    async fn expect_frame(&mut self) -> Result<Frame, ReplicationError> {
        self.read_frame().await?.ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "server closed the connection",
            )
            .into()
        })
    }

    /// Like [`expect_frame`](Self::expect_frame), but when the connection
    /// fails after the server reported an error (a FATAL error closes it),
    /// that error is the one returned.
    async fn frame_or_pending(
        &mut self,
        pending: &mut Option<ReplicationError>,
    ) -> Result<Frame, ReplicationError> {
        match self.expect_frame().await {
            Ok(frame) => Ok(frame),
            Err(e) => Err(pending.take().unwrap_or(e)),
        }
    }

    async fn flush(&mut self) -> Result<(), ReplicationError> {
        let result = self.socket.write_all(&self.wbuf).await;
        self.wbuf.clear();
        result?;
        self.socket.flush().await?;
        Ok(())
    }
}

/// Cursor over a backend message body; every read is bounds-checked.
struct Body<'a>(&'a [u8]);

impl<'a> Body<'a> {
    fn truncated(what: &str) -> ReplicationError {
        ReplicationError::Protocol(format!("truncated {what}"))
    }
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], ReplicationError> {
        if n > self.0.len() {
            return Err(Self::truncated(what));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], ReplicationError> {
        let (head, rest) = self
            .0
            .split_first_chunk::<N>()
            .ok_or_else(|| Self::truncated(what))?;
        self.0 = rest;
        Ok(*head)
    }
    fn u8(&mut self, what: &str) -> Result<u8, ReplicationError> {
        Ok(self.array::<1>(what)?[0])
    }
    fn i16(&mut self, what: &str) -> Result<i16, ReplicationError> {
        Ok(i16::from_be_bytes(self.array(what)?))
    }
    fn i32(&mut self, what: &str) -> Result<i32, ReplicationError> {
        Ok(i32::from_be_bytes(self.array(what)?))
    }
    fn i64(&mut self, what: &str) -> Result<i64, ReplicationError> {
        Ok(i64::from_be_bytes(self.array(what)?))
    }
    fn cstr(&mut self, what: &str) -> Result<&'a [u8], ReplicationError> {
        let end = self
            .0
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| Self::truncated(what))?;
        let s = self.take(end, what)?;
        self.take(1, what)?;
        Ok(s)
    }
}

/// Error and notice fields by their one-letter code.
fn parse_fields(body: &[u8]) -> HashMap<u8, String> {
    let mut fields = HashMap::new();
    let mut b = Body(body);
    while let Ok(code) = b.u8("field") {
        if code == 0 {
            break;
        }
        match b.cstr("field") {
            Ok(v) => {
                fields.insert(code, String::from_utf8_lossy(v).into_owned());
            }
            Err(_) => break,
        }
    }
    fields
}

fn server_error(body: &[u8]) -> ReplicationError {
    let mut f = parse_fields(body);
    ReplicationError::Server {
        code: f.remove(&b'C').unwrap_or_else(|| "XX000".into()),
        message: f.remove(&b'M').unwrap_or_else(|| "(no message)".into()),
        detail: f.remove(&b'D'),
        hint: f.remove(&b'H'),
    }
}

fn log_notice(body: &[u8]) {
    let f = parse_fields(body);
    let get = |k: u8| f.get(&k).map(String::as_str).unwrap_or("");
    tracing::info!(
        severity = get(b'V'),
        code = get(b'C'),
        "postgres replication notice: {}",
        get(b'M')
    );
}

fn unexpected(tag: u8, during: &str) -> ReplicationError {
    ReplicationError::Protocol(format!(
        "unexpected backend message {:?} during {during}",
        char::from(tag)
    ))
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn now_pg_micros() -> i64 {
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    unix.saturating_sub(PG_EPOCH_OFFSET_MICROS)
}

/// A replication connection in command mode.
pub struct ReplicationClient {
    conn: Conn,
    parameters: HashMap<String, String>,
    backend_pid: Option<i32>,
}

impl fmt::Debug for ReplicationClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplicationClient")
            .field("backend_pid", &self.backend_pid)
            .finish_non_exhaustive()
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
                format!(
                    "connecting to {}:{} timed out after {}s",
                    cfg.host,
                    cfg.port,
                    CONNECT_TIMEOUT.as_secs()
                ),
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
                return Err(ReplicationError::Config(
                    "Unix-domain sockets are not available".into(),
                ));
            }
        } else {
            let tcp = tokio::net::TcpStream::connect((cfg.host.as_str(), cfg.port)).await?;
            tcp.set_nodelay(true)?;
            Box::new(tcp)
        };
        let mut client = ReplicationClient {
            conn: Conn {
                socket,
                rbuf: BytesMut::with_capacity(READ_CHUNK),
                wbuf: BytesMut::with_capacity(1024),
            },
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
        frontend::startup_message(params, &mut client.conn.wbuf)?;
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
                b'v' => {
                    return Err(ReplicationError::Protocol(
                        "server does not support protocol version 3.0".into(),
                    ))
                }
                other => return Err(unexpected(other, "authentication")),
            }
            let mut body = Body(&frame.body);
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
                    frontend::sasl_initial_response(
                        SCRAM_SHA_256,
                        s.message(),
                        &mut self.conn.wbuf,
                    )?;
                    scram = Some(s);
                }
                11 => {
                    let s = scram.as_mut().ok_or_else(|| {
                        ReplicationError::Protocol("SASL continue without SASL start".into())
                    })?;
                    s.update(body.0).map_err(|e| {
                        ReplicationError::Auth(format!("SCRAM exchange failed: {e}"))
                    })?;
                    frontend::sasl_response(s.message(), &mut self.conn.wbuf)?;
                }
                12 => {
                    let s = scram.as_mut().ok_or_else(|| {
                        ReplicationError::Protocol("SASL final without SASL start".into())
                    })?;
                    s.finish(body.0).map_err(|e| {
                        ReplicationError::Auth(format!(
                            "server SCRAM signature did not verify: {e}"
                        ))
                    })?;
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
                    self.backend_pid = Body(&frame.body).i32("BackendKeyData").ok();
                }
                b'C' | b'I' => {}
                other => return Err(unexpected(other, during)),
            }
        }
    }

    fn record_parameter(&mut self, body: &[u8]) {
        let mut b = Body(body);
        if let (Ok(k), Ok(v)) = (b.cstr("parameter name"), b.cstr("parameter value")) {
            self.parameters.insert(
                String::from_utf8_lossy(k).into_owned(),
                String::from_utf8_lossy(v).into_owned(),
            );
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
                    let mut b = Body(&frame.body);
                    let n = b.i16("RowDescription")?;
                    for _ in 0..n {
                        let name = b.cstr("RowDescription")?;
                        b.take(18, "RowDescription")?;
                        result
                            .columns
                            .push(String::from_utf8_lossy(name).into_owned());
                    }
                }
                b'D' => {
                    let mut b = Body(&frame.body);
                    let n = b.i16("DataRow")?;
                    let mut row = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
                    for _ in 0..n {
                        let len = b.i32("DataRow")?;
                        if len < 0 {
                            row.push(None);
                        } else {
                            let v =
                                b.take(usize::try_from(len).unwrap_or(usize::MAX), "DataRow")?;
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
            timeline: timeline.parse().map_err(|_| {
                ReplicationError::Protocol(format!("invalid timeline {timeline:?}"))
            })?,
            xlogpos: parse_lsn(r.required(0, "xlogpos")?)?,
            dbname: r.value(0, "dbname")?.map(str::to_owned),
        })
    }

    /// Creates a logical slot using the pgoutput plugin (PostgreSQL 15+
    /// syntax). With `export_snapshot`, the returned snapshot stays valid
    /// only until the next command on this connection.
    pub async fn create_logical_slot(
        &mut self,
        slot: &str,
        export_snapshot: bool,
    ) -> Result<CreatedSlot, ReplicationError> {
        let sql = format!(
            "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput (SNAPSHOT '{}')",
            quote_ident(slot),
            if export_snapshot { "export" } else { "nothing" }
        );
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
        let sql = format!(
            "DROP_REPLICATION_SLOT {}{}",
            quote_ident(slot),
            if wait { " WAIT" } else { "" }
        );
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
        Ok(ReplicationStream {
            conn: self.conn,
            state: StreamState::Streaming,
        })
    }
}

/// One message of the replication stream.
#[derive(Debug, Clone, PartialEq)]
pub enum ReplicationEvent {
    /// WAL data; `data` is one raw pgoutput message.
    XLogData {
        wal_start: Lsn,
        wal_end: Lsn,
        send_time: i64,
        data: Bytes,
    },
    /// Server heartbeat. When `reply_requested` is set, answer soon with
    /// [`ReplicationStream::send_status`] or the server will time the
    /// connection out (`wal_sender_timeout`).
    Keepalive {
        wal_end: Lsn,
        send_time: i64,
        reply_requested: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamState {
    Streaming,
    /// The server ended the copy stream and is back in command mode.
    Ended,
    /// Reading or writing failed; the connection is unusable.
    Failed,
}

/// A replication connection in copy-both mode.
///
/// [`next_event`](Self::next_event) is cancellation safe (partial messages
/// stay buffered); [`send_status`](Self::send_status) is not.
pub struct ReplicationStream {
    conn: Conn,
    state: StreamState,
}

impl fmt::Debug for ReplicationStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplicationStream")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl ReplicationStream {
    /// The next replication message; `None` once the server has ended the
    /// copy stream.
    pub async fn next_event(&mut self) -> Result<Option<ReplicationEvent>, ReplicationError> {
        match self.state {
            StreamState::Streaming => {}
            StreamState::Ended => return Ok(None),
            StreamState::Failed => return Err(stream_failed()),
        }
        let result = self.next_event_inner().await;
        match result {
            Ok(Some(_)) => {}
            Ok(None) => self.state = StreamState::Ended,
            Err(_) => self.state = StreamState::Failed,
        }
        result
    }

    async fn next_event_inner(&mut self) -> Result<Option<ReplicationEvent>, ReplicationError> {
        loop {
            let Some(frame) = self.conn.read_frame().await? else {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "server closed the connection during replication",
                )
                .into());
            };
            match frame.tag {
                b'd' => return parse_copy_data(frame.body).map(Some),
                b'c' => {
                    // The server ended the stream: finish our side and wait
                    // for it to return to command mode.
                    frontend::copy_done(&mut self.conn.wbuf);
                    self.conn.flush().await?;
                    self.drain_to_ready().await?;
                    return Ok(None);
                }
                b'E' => return Err(server_error(&frame.body)),
                b'N' => log_notice(&frame.body),
                b'S' => {}
                other => return Err(unexpected(other, "replication streaming")),
            }
        }
    }

    /// Sends a Standby Status Update. `flush` is the position up to which
    /// the server may discard WAL and advance the slot.
    pub async fn send_status(
        &mut self,
        write: Lsn,
        flush: Lsn,
        apply: Lsn,
        reply_requested: bool,
    ) -> Result<(), ReplicationError> {
        match self.state {
            StreamState::Streaming => {}
            StreamState::Ended => {
                return Err(ReplicationError::Protocol(
                    "cannot send a status update: the server ended the replication stream".into(),
                ))
            }
            StreamState::Failed => return Err(stream_failed()),
        }
        let mut payload = [0u8; 34];
        payload[0] = b'r';
        payload[1..9].copy_from_slice(&write.to_be_bytes());
        payload[9..17].copy_from_slice(&flush.to_be_bytes());
        payload[17..25].copy_from_slice(&apply.to_be_bytes());
        payload[25..33].copy_from_slice(&now_pg_micros().to_be_bytes());
        payload[33] = u8::from(reply_requested);
        frontend::CopyData::new(&payload[..])?.write(&mut self.conn.wbuf);
        let result = self.conn.flush().await;
        if result.is_err() {
            self.state = StreamState::Failed;
        }
        result
    }

    /// Ends the stream: CopyDone, waits (bounded by [`CLOSE_TIMEOUT`]) for
    /// the server to return to command mode, then Terminate. The connection
    /// is closed in every case.
    pub async fn close(mut self) -> Result<(), ReplicationError> {
        let drained = if self.state == StreamState::Streaming {
            frontend::copy_done(&mut self.conn.wbuf);
            match self.conn.flush().await {
                Ok(()) => match tokio::time::timeout(CLOSE_TIMEOUT, self.drain_to_ready()).await {
                    Ok(r) => r,
                    Err(_) => Err(ReplicationError::Protocol(format!(
                        "server did not end the copy stream within {}s",
                        CLOSE_TIMEOUT.as_secs()
                    ))),
                },
                Err(e) => Err(e),
            }
        } else {
            Ok(())
        };
        frontend::terminate(&mut self.conn.wbuf);
        // Best effort: the server may already have closed its side.
        let _ = self.conn.flush().await;
        let _ = self.conn.socket.shutdown().await;
        drained
    }

    /// Discards remaining copy data until ReadyForQuery.
    async fn drain_to_ready(&mut self) -> Result<(), ReplicationError> {
        let mut error = None;
        loop {
            let frame = self.conn.frame_or_pending(&mut error).await?;
            match frame.tag {
                b'd' | b'c' | b'C' | b'S' => {}
                b'N' => log_notice(&frame.body),
                b'E' => {
                    if error.is_none() {
                        error = Some(server_error(&frame.body));
                    }
                }
                b'Z' => {
                    self.state = StreamState::Ended;
                    return error.map_or(Ok(()), Err);
                }
                other => return Err(unexpected(other, "end of replication")),
            }
        }
    }
}

fn stream_failed() -> ReplicationError {
    std::io::Error::new(
        std::io::ErrorKind::NotConnected,
        "the replication stream failed earlier; reconnect",
    )
    .into()
}

fn parse_copy_data(body: Bytes) -> Result<ReplicationEvent, ReplicationError> {
    let mut b = Body(&body);
    match b.u8("CopyData")? {
        b'w' => {
            let wal_start = b.i64("XLogData")? as u64;
            let wal_end = b.i64("XLogData")? as u64;
            let send_time = b.i64("XLogData")?;
            let mut data = body;
            data.advance(25);
            Ok(ReplicationEvent::XLogData {
                wal_start,
                wal_end,
                send_time,
                data,
            })
        }
        b'k' => {
            let wal_end = b.i64("Keepalive")? as u64;
            let send_time = b.i64("Keepalive")?;
            let reply_requested = b.u8("Keepalive")? != 0;
            Ok(ReplicationEvent::Keepalive {
                wal_end,
                send_time,
                reply_requested,
            })
        }
        other => Err(ReplicationError::Protocol(format!(
            "unknown replication message {:?} in CopyData",
            char::from(other)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trip() {
        assert_eq!(format_lsn(0), "0/0");
        assert_eq!(format_lsn(0x16_B374_D848), "16/B374D848");
        assert_eq!(parse_lsn("16/B374D848").unwrap(), 0x16_B374_D848);
        assert_eq!(parse_lsn("0/1a").unwrap(), 0x1a);
        assert_eq!(parse_lsn("FFFFFFFF/FFFFFFFF").unwrap(), u64::MAX);
        for bad in [
            "",
            "/",
            "1/",
            "/1",
            "1",
            "1/2/3",
            "+1/2",
            "1/-2",
            "123456789/0",
            "g/0",
        ] {
            assert!(parse_lsn(bad).is_err(), "{bad:?}");
        }
        for lsn in [1u64, 0xFFFF_FFFF, 0x1_0000_0000, u64::MAX] {
            assert_eq!(parse_lsn(&format_lsn(lsn)).unwrap(), lsn);
        }
    }

    #[test]
    fn conninfo_key_values() {
        let c = ReplicationConfig::from_conninfo(
            "host=127.0.0.1 port=5433 user=app password='it''s \\'x\\' me' dbname = shop",
        );
        // libpq does not treat '' as an escape: the value ends at the second quote.
        assert!(c.is_err());
        let c = ReplicationConfig::from_conninfo(
            "host=127.0.0.1 port=5433 user=app password='a \\'b\\' c' dbname = shop application_name=x",
        )
        .unwrap();
        assert_eq!(c.host, "127.0.0.1");
        assert_eq!(c.port, 5433);
        assert_eq!(c.user, "app");
        assert_eq!(c.password.as_deref(), Some("a 'b' c"));
        assert_eq!(c.dbname, "shop");
        assert_eq!(c.application_name, "x");
    }

    #[test]
    fn conninfo_defaults() {
        let c = ReplicationConfig::from_conninfo("").unwrap();
        assert_eq!(c.host, "localhost");
        assert_eq!(c.port, 5432);
        assert_eq!(c.user, "postgres");
        assert_eq!(c.password, None);
        assert_eq!(c.dbname, "postgres");
        assert_eq!(c.application_name, "pgfanout");
        let c = ReplicationConfig::from_conninfo("user=bob").unwrap();
        assert_eq!(c.dbname, "bob");
    }

    #[test]
    fn conninfo_urls() {
        let c = ReplicationConfig::from_conninfo(
            "postgres://rep%40l:p%3Ass@db.example:6543/my%20db?application_name=cdc&sslmode=disable",
        )
        .unwrap();
        assert_eq!(c.host, "db.example");
        assert_eq!(c.port, 6543);
        assert_eq!(c.user, "rep@l");
        assert_eq!(c.password.as_deref(), Some("p:ss"));
        assert_eq!(c.dbname, "my db");
        assert_eq!(c.application_name, "cdc");

        let c = ReplicationConfig::from_conninfo("postgresql://[::1]:5000").unwrap();
        assert_eq!(c.host, "::1");
        assert_eq!(c.port, 5000);
        assert_eq!(c.dbname, "postgres");

        let c = ReplicationConfig::from_conninfo("postgresql:///d?host=%2Ftmp%2Fpg").unwrap();
        assert_eq!(c.host, "/tmp/pg");
        assert_eq!(c.dbname, "d");

        let c = ReplicationConfig::from_conninfo("postgres://u@h").unwrap();
        assert_eq!((c.user.as_str(), c.host.as_str(), c.port), ("u", "h", 5432));
    }

    #[test]
    fn conninfo_errors() {
        for bad in [
            "host",
            "port=abc",
            "password='open",
            "sslmode=require",
            "frobnicate=1",
            "postgres://h:99999",
            "postgres://h/db?x",
            "postgres://u%zz@h",
            "host=a,b",
        ] {
            assert!(
                matches!(
                    ReplicationConfig::from_conninfo(bad),
                    Err(ReplicationError::Config(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn debug_redacts_password() {
        let c = ReplicationConfig::from_conninfo("password=hunter2").unwrap();
        let s = format!("{c:?}");
        assert!(!s.contains("hunter2"), "{s}");
        assert!(s.contains("redacted"));
    }

    #[test]
    fn transient_classification() {
        let server = |code: &str| ReplicationError::Server {
            code: code.into(),
            message: "m".into(),
            detail: None,
            hint: None,
        };
        for code in ["57P01", "57P02", "57P03", "08006", "08P01", "55006"] {
            assert!(server(code).is_transient(), "{code}");
        }
        for code in ["42704", "55000", "42501", "28P01", "XX000"] {
            assert!(!server(code).is_transient(), "{code}");
        }
        assert!(ReplicationError::Io(std::io::ErrorKind::ConnectionReset.into()).is_transient());
        assert!(!ReplicationError::Protocol("x".into()).is_transient());
        let msg = server("42501").to_string();
        assert!(msg.contains("REPLICATION"), "{msg}");
        let msg = ReplicationError::Server {
            code: "55000".into(),
            message: "logical decoding requires wal_level >= logical".into(),
            detail: None,
            hint: None,
        }
        .to_string();
        assert!(msg.contains("wal_level = logical"), "{msg}");
    }

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    fn conn_with(bytes: &[u8]) -> Conn {
        let (client, _server) = tokio::io::duplex(64);
        Conn {
            socket: Box::new(client),
            rbuf: BytesMut::from(bytes),
            wbuf: BytesMut::new(),
        }
    }

    #[test]
    fn frames_split_from_buffer() {
        let mut bytes = frame(b'Z', b"I");
        bytes.extend(frame(b'd', b"kxyz"));
        let full = bytes.len();
        // Every prefix yields only the complete frames it contains.
        for len in 0..=full {
            let mut c = conn_with(&bytes[..len]);
            let mut n = 0;
            while let Some(f) = c.try_frame().unwrap() {
                assert!(f.tag == b'Z' || f.tag == b'd');
                n += 1;
            }
            assert_eq!(
                n,
                if len == full {
                    2
                } else if len >= 6 {
                    1
                } else {
                    0
                }
            );
        }
    }

    #[test]
    fn garbled_frames_are_errors() {
        let mut c = conn_with(&[b'd', 0, 0, 0, 3]);
        assert!(c.try_frame().is_err());
        let mut c = conn_with(&[b'd', 0xff, 0xff, 0xff, 0xff]);
        assert!(c.try_frame().is_err());
        let mut c = conn_with(&[b'd', 0x7f, 0xff, 0xff, 0xff]);
        assert!(matches!(c.try_frame(), Err(ReplicationError::Protocol(_))));
    }

    #[tokio::test]
    async fn reads_frames_across_partial_socket_reads() {
        use tokio::io::AsyncWriteExt as _;
        let (client, mut server) = tokio::io::duplex(7);
        let mut c = Conn {
            socket: Box::new(client),
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
        };
        let mut bytes = frame(b'd', &[b'k'; 100]);
        bytes.extend(frame(b'Z', b"I"));
        let writer = tokio::spawn(async move {
            server.write_all(&bytes).await.unwrap();
        });
        let f = c.read_frame().await.unwrap().unwrap();
        assert_eq!((f.tag, f.body.len()), (b'd', 100));
        let f = c.read_frame().await.unwrap().unwrap();
        assert_eq!((f.tag, &f.body[..]), (b'Z', &b"I"[..]));
        writer.await.unwrap();
        assert!(c.read_frame().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn eof_inside_a_frame_is_an_error() {
        let (client, server) = tokio::io::duplex(64);
        drop(server);
        let mut c = Conn {
            socket: Box::new(client),
            rbuf: BytesMut::from(&[b'd', 0, 0, 0, 9, 1][..]),
            wbuf: BytesMut::new(),
        };
        assert!(matches!(c.read_frame().await, Err(ReplicationError::Io(_))));
    }

    #[test]
    fn copy_data_parsing() {
        let mut w = vec![b'w'];
        w.extend_from_slice(&1u64.to_be_bytes());
        w.extend_from_slice(&2u64.to_be_bytes());
        w.extend_from_slice(&3i64.to_be_bytes());
        w.extend_from_slice(b"Bpayload");
        assert_eq!(
            parse_copy_data(Bytes::from(w.clone())).unwrap(),
            ReplicationEvent::XLogData {
                wal_start: 1,
                wal_end: 2,
                send_time: 3,
                data: Bytes::from_static(b"Bpayload")
            }
        );
        for len in 0..25 {
            assert!(parse_copy_data(Bytes::copy_from_slice(&w[..len])).is_err());
        }
        let mut k = vec![b'k'];
        k.extend_from_slice(&9u64.to_be_bytes());
        k.extend_from_slice(&8i64.to_be_bytes());
        k.push(1);
        assert_eq!(
            parse_copy_data(Bytes::from(k.clone())).unwrap(),
            ReplicationEvent::Keepalive {
                wal_end: 9,
                send_time: 8,
                reply_requested: true
            }
        );
        for len in 0..k.len() {
            assert!(parse_copy_data(Bytes::copy_from_slice(&k[..len])).is_err());
        }
        assert!(parse_copy_data(Bytes::from_static(b"zzz")).is_err());
    }

    #[test]
    fn error_fields() {
        let body = b"SERROR\0VERROR\0C42704\0Mreplication slot \"s\" does not exist\0\0";
        let e = server_error(body);
        assert_eq!(e.sqlstate(), Some("42704"));
        let msg = e.to_string();
        assert!(msg.contains("does not exist"), "{msg}");
        assert!(msg.contains("create it"), "{msg}");
        // Garbled fields do not panic.
        let _ = server_error(b"C4270");
        let _ = server_error(b"");
    }
}

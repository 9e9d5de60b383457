//! Framing of the PostgreSQL wire protocol for the replication connection: buffered,
//! cancel-safe reads of backend messages and bounds-checked parsing of their bodies.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes, BytesMut};
use postgres_protocol::message::backend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::byte_reader::ByteReader;

use super::ReplicationError;
use crate::contract::PG_EPOCH_OFFSET_MICROS;

/// The largest backend message accepted (PostgreSQL's own limit is 1 GiB of
/// data plus a little framing).
const MAX_MESSAGE_LEN: usize = (1 << 30) + 64 * 1024;
pub(super) const READ_CHUNK: usize = 64 * 1024;
/// Messages this large own their buffer (see [`Conn::try_frame`]).
const LARGE_MESSAGE: usize = 1 << 20;

pub(super) trait Socket: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Socket for T {}

/// One backend message: its tag and its body (without the length word).
pub(super) struct Frame {
    pub(super) tag: u8,
    pub(super) body: Bytes,
}

/// Framed connection: buffered reads of backend messages and writes of
/// frontend messages.
pub(super) struct Conn {
    pub(super) socket: Box<dyn Socket>,
    pub(super) rbuf: BytesMut,
    pub(super) wbuf: BytesMut,
}

impl Conn {
    /// Takes one complete message off the read buffer, if there is one.
    pub(super) fn try_frame(&mut self) -> Result<Option<Frame>, ReplicationError> {
        let Some(header) = backend::Header::parse(&self.rbuf)? else {
            return Ok(None);
        };
        let len = usize::try_from(header.len()).map_err(|_| ReplicationError::Protocol("negative message length".into()))?;
        if len > MAX_MESSAGE_LEN {
            return Err(ReplicationError::Protocol(format!("backend message of {len} bytes exceeds the 1 GiB limit")));
        }
        let total = len + 1;
        if self.rbuf.len() < total {
            self.rbuf.reserve(total - self.rbuf.len());
            return Ok(None);
        }
        let mut body = if total >= LARGE_MESSAGE {
            // The message takes the buffer with it and the few bytes read past it move to a
            // new one: a split would leave the read buffer sharing (and keeping alive) the
            // message's allocation, and values decoded in place need it unshared.
            let rest = BytesMut::from(&self.rbuf[total..]);
            self.rbuf.truncate(total);
            std::mem::replace(&mut self.rbuf, rest).freeze()
        } else {
            self.rbuf.split_to(total).freeze()
        };
        body.advance(5);
        Ok(Some(Frame { tag: header.tag(), body }))
    }

    /// Reads the next message; `None` on a clean end of stream between
    /// messages.
    pub(super) async fn read_frame(&mut self) -> Result<Option<Frame>, ReplicationError> {
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

    pub(super) async fn expect_frame(&mut self) -> Result<Frame, ReplicationError> {
        self.read_frame()
            .await?
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "server closed the connection").into())
    }

    /// Like [`expect_frame`](Self::expect_frame), but when the connection
    /// fails after the server reported an error (a FATAL error closes it),
    /// that error is the one returned.
    pub(super) async fn frame_or_pending(&mut self, pending: &mut Option<ReplicationError>) -> Result<Frame, ReplicationError> {
        match self.expect_frame().await {
            Ok(frame) => Ok(frame),
            Err(e) => Err(pending.take().unwrap_or(e)),
        }
    }

    pub(super) async fn flush(&mut self) -> Result<(), ReplicationError> {
        let result = self.socket.write_all(&self.wbuf).await;
        self.wbuf.clear();
        result?;
        self.socket.flush().await?;
        Ok(())
    }
}

/// Error and notice fields by their one-letter code.
pub(super) fn parse_fields(body: &[u8]) -> HashMap<u8, String> {
    let mut fields = HashMap::new();
    let mut b = ByteReader::new(body);
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

pub(super) fn server_error(body: &[u8]) -> ReplicationError {
    let mut f = parse_fields(body);
    ReplicationError::Server {
        code: f.remove(&b'C').unwrap_or_else(|| "XX000".into()),
        message: f.remove(&b'M').unwrap_or_else(|| "(no message)".into()),
        detail: f.remove(&b'D'),
        hint: f.remove(&b'H'),
    }
}

pub(super) fn log_notice(body: &[u8]) {
    let f = parse_fields(body);
    let get = |k: u8| f.get(&k).map(String::as_str).unwrap_or("");
    tracing::info!(severity = get(b'V'), code = get(b'C'), "postgres replication notice: {}", get(b'M'));
}

pub(super) fn unexpected(tag: u8, during: &str) -> ReplicationError {
    ReplicationError::Protocol(format!("unexpected backend message {:?} during {during}", char::from(tag)))
}

pub(super) fn now_pg_micros() -> i64 {
    let unix =
        SystemTime::now().duration_since(UNIX_EPOCH).map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX)).unwrap_or(0);
    unix.saturating_sub(PG_EPOCH_OFFSET_MICROS)
}

//! The replication connection in copy-both mode: XLogData and keepalives in, standby
//! status updates out.

use std::fmt;
use std::time::Duration;

use bytes::{Buf, Bytes};
use postgres_protocol::message::frontend;
use tokio::io::AsyncWriteExt;

use super::wire::{log_notice, now_pg_micros, server_error, unexpected, Conn};
use super::{Lsn, ReplicationError};
use crate::byte_reader::ByteReader;

/// Upper bound for draining the copy stream in [`ReplicationStream::close`].
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// One message of the replication stream.
#[derive(Debug, Clone, PartialEq)]
pub enum ReplicationEvent {
    /// WAL data; `data` is one raw pgoutput message.
    XLogData { wal_start: Lsn, wal_end: Lsn, send_time: i64, data: Bytes },
    /// Server heartbeat. When `reply_requested` is set, answer soon with
    /// [`ReplicationStream::send_status`] or the server will time the
    /// connection out (`wal_sender_timeout`).
    Keepalive { wal_end: Lsn, send_time: i64, reply_requested: bool },
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
        f.debug_struct("ReplicationStream").field("state", &self.state).finish_non_exhaustive()
    }
}

impl ReplicationStream {
    pub(super) fn new(conn: Conn) -> Self {
        ReplicationStream { conn, state: StreamState::Streaming }
    }

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

    /// The next XLogData or keepalive if the whole message is already buffered, without
    /// reading from the socket; `None` when it is not (or another kind of message comes
    /// next: [`next_event`](Self::next_event) handles those). Lets the caller take a burst
    /// of messages in one go instead of waiting on the socket for each.
    pub fn next_buffered_event(&mut self) -> Result<Option<ReplicationEvent>, ReplicationError> {
        if self.state != StreamState::Streaming || self.conn.rbuf.first() != Some(&b'd') {
            return Ok(None);
        }
        let result = match self.conn.try_frame() {
            Ok(Some(frame)) => parse_copy_data(frame.body).map(Some),
            other => other.map(|_| None),
        };
        if result.is_err() {
            self.state = StreamState::Failed;
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
                b'C' => {
                    // The command ended without a CopyDone first (a server shutting down).
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
    std::io::Error::new(std::io::ErrorKind::NotConnected, "the replication stream failed earlier; reconnect").into()
}

pub(super) fn parse_copy_data(body: Bytes) -> Result<ReplicationEvent, ReplicationError> {
    let mut b = ByteReader::new(&body);
    match b.u8("CopyData")? {
        b'w' => {
            let wal_start = b.i64("XLogData")? as u64;
            let wal_end = b.i64("XLogData")? as u64;
            let send_time = b.i64("XLogData")?;
            let mut data = body;
            data.advance(25);
            Ok(ReplicationEvent::XLogData { wal_start, wal_end, send_time, data })
        }
        b'k' => {
            let wal_end = b.i64("Keepalive")? as u64;
            let send_time = b.i64("Keepalive")?;
            let reply_requested = b.u8("Keepalive")? != 0;
            Ok(ReplicationEvent::Keepalive { wal_end, send_time, reply_requested })
        }
        other => Err(ReplicationError::Protocol(format!("unknown replication message {:?} in CopyData", char::from(other)))),
    }
}

//! Framing on the TCP links: a 24-byte header (magic, op, sequence number, payload bytes) then
//! the payload. Values travel in the host's byte order; all supported targets are little-endian.

use crate::DistError;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

const _: () = assert!(cfg!(target_endian = "little"), "the TCP transport sends f32 in little-endian byte order");

/// "ALDT": alignment-distributed transport.
const MAGIC: u32 = 0x414c_4454;

/// What a message is; collectives put extra data (the broadcast root) in the high bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Hello = 1,
    Table = 2,
    PeerHello = 3,
    AllGather = 10,
    ReduceScatter = 11,
    Broadcast = 12,
    Barrier = 13,
    BroadcastBytes = 14,
}

impl Op {
    /// The collective's name in error messages.
    pub(crate) fn name(code: u32) -> String {
        let base = match code & 0xff {
            1 => "rendezvous hello",
            2 => "rendezvous table",
            3 => "mesh hello",
            10 => "all_gather",
            11 => "reduce_scatter",
            12 => "broadcast",
            13 => "barrier",
            14 => "broadcast (bytes)",
            _ => "unknown message",
        };
        if code >> 8 != 0 {
            format!("{base} (root {})", code >> 8)
        } else {
            base.to_string()
        }
    }
}

/// One message's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub op: u32,
    pub seq: u64,
    pub bytes: u64,
}

/// Writes a header and its payload.
pub(crate) fn send(mut stream: &TcpStream, header: Header, payload: &[u8]) -> io::Result<()> {
    let mut head = [0u8; 24];
    head[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    head[4..8].copy_from_slice(&header.op.to_le_bytes());
    head[8..16].copy_from_slice(&header.seq.to_le_bytes());
    head[16..24].copy_from_slice(&header.bytes.to_le_bytes());
    stream.write_all(&head)?;
    stream.write_all(payload)?;
    stream.flush()
}

/// Reads a header; a wrong magic number is `InvalidData`.
pub(crate) fn recv_header(mut stream: &TcpStream) -> io::Result<Header> {
    let mut head = [0u8; 24];
    stream.read_exact(&mut head)?;
    let word = |range: std::ops::Range<usize>| -> u64 {
        let mut bytes = [0u8; 8];
        bytes[..range.len()].copy_from_slice(&head[range]);
        u64::from_le_bytes(bytes)
    };
    if word(0..4) as u32 != MAGIC {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "not an alignment-distributed message (bad magic)"));
    }
    Ok(Header { op: word(4..8) as u32, seq: word(8..16), bytes: word(16..24) })
}

/// Reads exactly `out.len()` bytes of payload.
pub(crate) fn recv_payload(mut stream: &TcpStream, out: &mut [u8]) -> io::Result<()> {
    stream.read_exact(out)
}

/// Translates a socket error into the crate's error: a closed or reset connection is
/// [`DistError::PeerClosed`], an expired socket timeout [`DistError::Timeout`].
pub(crate) fn io_error(rank: usize, peer: usize, op: &str, error: io::Error, timeout: Duration) -> DistError {
    use io::ErrorKind::*;
    match error.kind() {
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe | NotConnected => {
            DistError::PeerClosed { rank, peer, op: op.to_string() }
        }
        WouldBlock | TimedOut => DistError::Timeout { rank, peer, op: op.to_string(), timeout },
        InvalidData => DistError::Protocol { rank, peer, detail: format!("during {op}: {error}") },
        _ => DistError::Io { rank, peer, op: op.to_string(), source: error },
    }
}

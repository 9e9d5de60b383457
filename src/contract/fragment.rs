//! Fragments: a delta too large for one Kafka record, sent as several.
//!
//! PostgreSQL accepts values up to 1 GB; Kafka refuses records above the topic's
//! `max.message.bytes` (and librdkafka above the producer's `message.max.bytes`), both about
//! 1 MB by default. A delta whose encoding exceeds capture's `--fragment-bytes` is sent as
//! consecutive records, each carrying one slice of the delta's ordinary encoding as its
//! value and a [`FRAGMENT_HEADER`] saying which delta it belongs to (its version
//! `(commit_lsn, seq)`), which slice it is and how many there are, and the whole encoding's
//! length.
//!
//! Why a header and slices of the ordinary encoding, rather than a new kind of delta in the
//! schema: the reassembled bytes *are* the whole delta's encoding, so a device decodes and
//! applies them exactly as if they had come in one record; every other record, the schema
//! and the records already in a topic stay byte for byte what they were; and the slices are
//! written straight from the delta ([`encode_window`]), so capture never holds a second
//! whole copy of a large value. A reader that does not know the header finds a value that is
//! not a delta and rejects it, as it would any undecodable record.
//!
//! The fragments of a delta go to the delta's partition, in order, between the row's earlier
//! and later versions. Each has a Kafka key of its own ([`fragment_key`]): the last one the
//! delta's key, the others that key with their index. With the delta's key on every
//! fragment, a compacted topic would keep only the last one, and a rebuild would lack the
//! row; with its own key, each slice of the row's newest version is kept. No checksum is added: Kafka
//! checks every record batch (CRC-32C), the length is checked on reassembly, and the
//! reassembled bytes must decode as a delta.

use super::codec_error::CodecError;
use super::delta_writer::{write_delta, Out};
use super::Delta;

/// Kafka header of a fragment record: a [`FragmentHeader`], [`FragmentHeader::LEN`] bytes.
pub const FRAGMENT_HEADER: &str = "pgfanout.fragment";

/// Capture's default `--fragment-bytes`: safely below Kafka's default 1 MB record limit
/// (`max.message.bytes` 1,048,588 on the topic, `message.max.bytes` 1,000,000 in the
/// producer), leaving room for the key, the headers and the batch's framing.
pub const DEFAULT_FRAGMENT_BYTES: usize = 900 * 1024;

/// Which slice of which delta a fragment record carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FragmentHeader {
    /// The whole delta's version.
    pub commit_lsn: i64,
    pub seq: i64,
    /// This slice's position, from 0.
    pub index: u32,
    /// How many slices the delta has; the last one has index `count - 1`.
    pub count: u32,
    /// Length of the whole delta's encoding.
    pub total_len: u64,
}

impl FragmentHeader {
    /// Encoded length: five big-endian integers.
    pub const LEN: usize = 8 + 8 + 4 + 4 + 8;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[0..8].copy_from_slice(&self.commit_lsn.to_be_bytes());
        out[8..16].copy_from_slice(&self.seq.to_be_bytes());
        out[16..20].copy_from_slice(&self.index.to_be_bytes());
        out[20..24].copy_from_slice(&self.count.to_be_bytes());
        out[24..32].copy_from_slice(&self.total_len.to_be_bytes());
        out
    }

    /// Reads a header; any byte string gives a header or an error, never a panic.
    pub fn decode(bytes: &[u8]) -> Result<FragmentHeader, CodecError> {
        let bad = |reason: &str| CodecError::Decode { what: "fragment header", reason: reason.to_string() };
        let b: &[u8; Self::LEN] = bytes.try_into().map_err(|_| bad("not 32 bytes"))?;
        let (lsn, rest) = b.split_first_chunk::<8>().ok_or_else(|| bad("short"))?;
        let (seq, rest) = rest.split_first_chunk::<8>().ok_or_else(|| bad("short"))?;
        let (index, rest) = rest.split_first_chunk::<4>().ok_or_else(|| bad("short"))?;
        let (count, rest) = rest.split_first_chunk::<4>().ok_or_else(|| bad("short"))?;
        let (total, _) = rest.split_first_chunk::<8>().ok_or_else(|| bad("short"))?;
        let h = FragmentHeader {
            commit_lsn: i64::from_be_bytes(*lsn),
            seq: i64::from_be_bytes(*seq),
            index: u32::from_be_bytes(*index),
            count: u32::from_be_bytes(*count),
            total_len: u64::from_be_bytes(*total),
        };
        if h.count == 0 || h.index >= h.count {
            return Err(bad("index out of range"));
        }
        Ok(h)
    }

    /// Whether this is the delta's last slice.
    pub fn is_last(&self) -> bool {
        self.index + 1 == self.count
    }
}

/// Encodes `delta` into `out` (replacing what it held) as long as the encoding stays within
/// `limit` bytes; returns the encoding's whole length. When that is above `limit`, `out`
/// holds only its first `limit` bytes and the delta goes out in fragments.
pub fn encode_bounded(delta: &Delta, limit: usize, out: &mut Vec<u8>) -> usize {
    out.clear();
    let mut sink = Window { out, start: 0, end: limit, pos: 0 };
    write_delta(delta, &mut sink);
    sink.pos
}

/// Writes the bytes `start..end` of `delta`'s encoding into `out`, replacing what it held:
/// one fragment, without the rest of the encoding ever being held.
pub fn encode_window(delta: &Delta, start: usize, end: usize, out: &mut Vec<u8>) {
    out.clear();
    write_delta(delta, &mut Window { out, start, end, pos: 0 });
}

/// The Kafka key of the fragment `header` of a delta keyed `key`: the delta's own key for
/// the last fragment, so that it supersedes the row's earlier records as a whole delta
/// would; for the others, `key`, the byte 0x1e and the index in decimal. No delta key ends
/// that way (each ends with a whole canonical value: see [`super::delta_kafka_key`]), so a
/// fragment's key never stands for a row. A fragment of an older version that a newer one
/// does not overwrite (it had more slices, or the row became small or was deleted) stays in
/// a compacted topic; a device drops it as an incomplete set.
pub fn fragment_key(key: &[u8], header: &FragmentHeader) -> Vec<u8> {
    let mut out = key.to_vec();
    if !header.is_last() {
        out.push(0x1e);
        out.extend_from_slice(header.index.to_string().as_bytes());
    }
    out
}

/// How many fragments of at most `fragment_bytes` an encoding of `len` bytes takes.
pub fn fragment_count(len: usize, fragment_bytes: usize) -> usize {
    len.div_ceil(fragment_bytes.max(1))
}

/// Keeps the bytes of the encoding between `start` and `end`, counts them all.
struct Window<'a> {
    out: &'a mut Vec<u8>,
    start: usize,
    end: usize,
    /// Bytes of the encoding written so far.
    pos: usize,
}

impl Out for Window<'_> {
    #[inline]
    fn put(&mut self, bytes: &[u8]) {
        let from = self.pos;
        self.pos += bytes.len();
        if self.pos <= self.start || from >= self.end {
            return;
        }
        let lo = self.start.saturating_sub(from);
        let hi = (self.end - from).min(bytes.len());
        if let Some(part) = bytes.get(lo..hi) {
            self.out.extend_from_slice(part);
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::contract::codec::encode_delta;
    use crate::contract::delta_reader::tests::delta;

    #[test]
    fn each_fragment_has_its_own_key_and_the_last_has_the_rows() {
        let header = |index| FragmentHeader { commit_lsn: 1, seq: 0, index, count: 3, total_len: 9 };
        let keys: Vec<Vec<u8>> = (0..3).map(|i| fragment_key(b"public.t\x1fid=i1", &header(i))).collect();
        assert_eq!(keys, [&b"public.t\x1fid=i1\x1e0"[..], b"public.t\x1fid=i1\x1e1", b"public.t\x1fid=i1"]);
    }

    proptest! {
        /// The fragments, in order, are exactly the whole encoding; a delta within the
        /// limit is encoded whole.
        #[test]
        fn fragments_concatenate_to_the_whole_encoding(d in delta(), size in 1usize..64) {
            let whole = encode_delta(&d).unwrap();
            let mut out = Vec::new();
            let len = encode_bounded(&d, size, &mut out);
            prop_assert_eq!(len, whole.len());
            prop_assert_eq!(&out[..], &whole[..whole.len().min(size)]);
            let mut joined = Vec::new();
            for i in 0..fragment_count(len, size) {
                encode_window(&d, i * size, (i + 1) * size, &mut out);
                prop_assert!(!out.is_empty() && out.len() <= size);
                joined.extend_from_slice(&out);
            }
            prop_assert_eq!(joined, whole);
        }

        #[test]
        fn any_header_bytes_give_a_header_or_an_error(bytes in prop::collection::vec(any::<u8>(), 0..40)) {
            if let Ok(h) = FragmentHeader::decode(&bytes) {
                prop_assert!(h.index < h.count);
                prop_assert_eq!(&h.encode()[..], &bytes[..]);
            }
        }
    }

    #[test]
    fn header_round_trips() {
        let h = FragmentHeader { commit_lsn: i64::MAX, seq: -1, index: 6, count: 7, total_len: 1 << 40 };
        assert_eq!(FragmentHeader::decode(&h.encode()).unwrap(), h);
        assert!(h.is_last());
        let bad = FragmentHeader { index: 7, ..h };
        assert!(FragmentHeader::decode(&bad.encode()).is_err());
        assert!(FragmentHeader::decode(&h.encode()[..31]).is_err());
    }
}

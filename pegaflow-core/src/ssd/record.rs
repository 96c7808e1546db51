//! The SSD tier's index log: an append-only file of fixed-format records, one per block
//! written (`PUT`) or dropped (`DROP`), replayed at start.
//!
//! Layout (little endian): a 32-byte header (`magic`, `version` 2, alignment, capacity),
//! then records `len: u32 | kind: u8 | body | check: u32`, where `check` is the low half
//! of xxh3-64 over `kind | body`. Replay stops at the first record that is short or fails
//! its check (a write torn by a crash): everything after it is ignored and cut off.

use xxhash_rust::xxh3::xxh3_64;

/// First bytes of an index file.
pub const MAGIC: &[u8; 8] = b"PFSSDIX1";
/// Bytes of the file header.
pub const HEADER_LEN: usize = 32;
/// Format version: 2 records virtual positions (see [`BlockRecord::offset`]).
const VERSION: u32 = 2;
const KIND_PUT: u8 = 1;
const KIND_DROP: u8 = 2;
const KIND_LAYOUT: u8 = 3;
/// Most layers a layout record holds.
pub const MAX_LAYOUT_LAYERS: usize = 4096;
/// Longest namespace a record holds.
pub const MAX_NAMESPACE_LEN: usize = 1024;
const PUT_FIXED: usize = 8 + 8 + 4 + 4 + 8 + 8 + 32 + 2;
const MAX_BODY: usize = 12 + 8 * MAX_LAYOUT_LAYERS;

/// What identifies a stored block: its namespace (model and layout), content hash, the
/// TP part it holds and a fingerprint of that part's layout.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BlockId {
    /// The namespace the block was saved in.
    pub namespace: String,
    /// The block's 32-byte content hash.
    pub hash: [u8; 32],
    /// Which part of the block (TP rank) these bytes are.
    pub part: u32,
    /// Fingerprint of the part's layout: a block is served only to the layout it was
    /// saved from.
    pub layout: u64,
}

/// One block stored in a data file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockRecord {
    /// Which block.
    pub id: BlockId,
    /// Order of writing (the log's replay order).
    pub seq: u64,
    /// Virtual position of the extent: the write head's position counted over every lap
    /// of the circular data file (aligned; the byte offset in the file is this modulo the
    /// capacity). A later write over the extent shows as a head past `offset + capacity`.
    pub offset: u64,
    /// Payload bytes (the extent is this, rounded up to the alignment).
    pub len: u32,
    /// xxh3-64 of the payload, verified on every read.
    pub checksum: u64,
}

/// A replayed log entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A block was written.
    Put(BlockRecord),
    /// The block at this offset was dropped (e.g. it failed its checksum).
    Drop(u64),
    /// A part layout: its fingerprint and the bytes of each layer, in order (what a
    /// restarted server needs to rebuild the blocks of that layout).
    Layout(u64, Vec<u64>),
}

/// The index file's header fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Alignment of extents in the data file.
    pub align: u32,
    /// Usable bytes of the data file.
    pub capacity: u64,
}

impl Header {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..8].copy_from_slice(MAGIC);
        out[8..12].copy_from_slice(&VERSION.to_le_bytes());
        out[12..16].copy_from_slice(&self.align.to_le_bytes());
        out[16..24].copy_from_slice(&self.capacity.to_le_bytes());
        out
    }

    /// Decodes a header; `None` when it is not one of ours.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < HEADER_LEN || &bytes[..8] != MAGIC || u32_at(bytes, 8)? != VERSION {
            return None;
        }
        Some(Self { align: u32_at(bytes, 12)?, capacity: u64_at(bytes, 16)? })
    }
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 9);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.push(kind);
    out.extend_from_slice(body);
    let check = xxh3_64(&out[4..]) as u32;
    out.extend_from_slice(&check.to_le_bytes());
    out
}

/// The bytes of a `PUT` record. The namespace is cut to [`MAX_NAMESPACE_LEN`] bytes
/// (callers keep namespaces shorter).
pub fn encode_put(record: &BlockRecord) -> Vec<u8> {
    let ns = record.id.namespace.as_bytes();
    let ns = &ns[..ns.len().min(MAX_NAMESPACE_LEN)];
    let mut body = Vec::with_capacity(PUT_FIXED + ns.len());
    body.extend_from_slice(&record.seq.to_le_bytes());
    body.extend_from_slice(&record.offset.to_le_bytes());
    body.extend_from_slice(&record.len.to_le_bytes());
    body.extend_from_slice(&record.id.part.to_le_bytes());
    body.extend_from_slice(&record.checksum.to_le_bytes());
    body.extend_from_slice(&record.id.layout.to_le_bytes());
    body.extend_from_slice(&record.id.hash);
    body.extend_from_slice(&(ns.len() as u16).to_le_bytes());
    body.extend_from_slice(ns);
    frame(KIND_PUT, &body)
}

/// The bytes of a `LAYOUT` record (at most [`MAX_LAYOUT_LAYERS`] layers are kept).
pub fn encode_layout(fingerprint: u64, layer_bytes: &[u64]) -> Vec<u8> {
    let layers = &layer_bytes[..layer_bytes.len().min(MAX_LAYOUT_LAYERS)];
    let mut body = Vec::with_capacity(12 + 8 * layers.len());
    body.extend_from_slice(&fingerprint.to_le_bytes());
    body.extend_from_slice(&(layers.len() as u32).to_le_bytes());
    for bytes in layers {
        body.extend_from_slice(&bytes.to_le_bytes());
    }
    frame(KIND_LAYOUT, &body)
}

fn decode_layout(body: &[u8]) -> Option<EntryRef<'static>> {
    let count = u32_at(body, 8)? as usize;
    if count > MAX_LAYOUT_LAYERS || body.len() != 12 + 8 * count {
        return None;
    }
    let layers = (0..count).map(|i| u64_at(body, 12 + 8 * i)).collect::<Option<Vec<u64>>>()?;
    Some(EntryRef::Layout(u64_at(body, 0)?, layers))
}

/// The bytes of a `DROP` record.
pub fn encode_drop(offset: u64) -> Vec<u8> {
    frame(KIND_DROP, &offset.to_le_bytes())
}

/// A `PUT` record read in place: the namespace borrows the log (replaying a million
/// blocks allocates nothing per block).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PutRef<'a> {
    /// The namespace.
    pub namespace: &'a str,
    /// The content hash.
    pub hash: [u8; 32],
    /// The part field (see [`BlockId::part`]).
    pub part: u32,
    /// The layout fingerprint.
    pub layout: u64,
    /// Order of writing.
    pub seq: u64,
    /// Virtual position.
    pub offset: u64,
    /// Payload bytes.
    pub len: u32,
    /// xxh3-64 of the payload.
    pub checksum: u64,
}

impl PutRef<'_> {
    /// An owned record.
    pub fn to_record(&self) -> BlockRecord {
        BlockRecord {
            id: BlockId { namespace: self.namespace.to_owned(), hash: self.hash, part: self.part, layout: self.layout },
            seq: self.seq,
            offset: self.offset,
            len: self.len,
            checksum: self.checksum,
        }
    }
}

/// A replayed entry, read in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryRef<'a> {
    /// A block was written.
    Put(PutRef<'a>),
    /// The block at this position was dropped.
    Drop(u64),
    /// A part layout.
    Layout(u64, Vec<u64>),
}

fn decode_put(body: &[u8]) -> Option<PutRef<'_>> {
    let ns_len = usize::from(u16_at(body, PUT_FIXED - 2)?);
    if body.len() != PUT_FIXED + ns_len {
        return None;
    }
    Some(PutRef {
        namespace: std::str::from_utf8(&body[PUT_FIXED..]).ok()?,
        seq: u64_at(body, 0)?,
        offset: u64_at(body, 8)?,
        len: u32_at(body, 16)?,
        part: u32_at(body, 20)?,
        checksum: u64_at(body, 24)?,
        layout: u64_at(body, 32)?,
        hash: body.get(40..72)?.try_into().ok()?,
    })
}

/// Replays the records after the header, calling `each` for every entry in order;
/// returns the length of the valid prefix of `log` (where a torn or corrupt record
/// starts, or its end).
pub fn replay_each<'a>(log: &'a [u8], mut each: impl FnMut(EntryRef<'a>)) -> usize {
    let mut at = HEADER_LEN.min(log.len());
    while let Some(len) = u32_at(log, at).map(|l| l as usize) {
        let end = at + 4 + 1 + len + 4;
        if len > MAX_BODY || end > log.len() {
            break;
        }
        let kind = log[at + 4];
        let body = &log[at + 5..at + 5 + len];
        let check = u32_at(log, end - 4).unwrap_or(0);
        if xxh3_64(&log[at + 4..end - 4]) as u32 != check {
            break;
        }
        let entry = match kind {
            KIND_PUT => decode_put(body).map(EntryRef::Put),
            KIND_DROP if len == 8 => u64_at(body, 0).map(EntryRef::Drop),
            KIND_LAYOUT => decode_layout(body),
            _ => None,
        };
        let Some(entry) = entry else { break };
        each(entry);
        at = end;
    }
    at
}

/// Replays the records after the header into owned entries (see [`replay_each`]).
pub fn replay(log: &[u8]) -> (Vec<Entry>, usize) {
    let mut entries = Vec::new();
    let valid = replay_each(log, |entry| {
        entries.push(match entry {
            EntryRef::Put(put) => Entry::Put(put.to_record()),
            EntryRef::Drop(position) => Entry::Drop(position),
            EntryRef::Layout(fingerprint, layers) => Entry::Layout(fingerprint, layers),
        });
    });
    (entries, valid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: u64, ns: &str) -> BlockRecord {
        BlockRecord {
            id: BlockId { namespace: ns.into(), hash: [seq as u8; 32], part: 1, layout: 77 },
            seq,
            offset: seq * 4096,
            len: 5000,
            checksum: 0xfeed_beef,
        }
    }

    fn log_of(parts: &[Vec<u8>]) -> Vec<u8> {
        let mut log = Header { align: 4096, capacity: 1 << 30 }.encode().to_vec();
        for p in parts {
            log.extend_from_slice(p);
        }
        log
    }

    #[test]
    fn records_replay_in_order() {
        let log = log_of(&[
            encode_layout(77, &[65536, 65536]),
            encode_put(&record(1, "llama")),
            encode_drop(4096),
            encode_put(&record(2, "")),
        ]);
        let (entries, valid) = replay(&log);
        assert_eq!(valid, log.len());
        assert_eq!(
            entries,
            vec![
                Entry::Layout(77, vec![65536, 65536]),
                Entry::Put(record(1, "llama")),
                Entry::Drop(4096),
                Entry::Put(record(2, ""))
            ]
        );
        assert_eq!(Header::decode(&log), Some(Header { align: 4096, capacity: 1 << 30 }));
        assert_eq!(Header::decode(b"not a header at all, no no no no"), None);
    }

    #[test]
    fn a_torn_or_corrupt_record_ends_the_replay() {
        let good = encode_put(&record(1, "m"));
        let second = encode_put(&record(2, "m"));
        for cut in 1..second.len() {
            let log = log_of(&[good.clone(), second[..cut].to_vec()]);
            let (entries, valid) = replay(&log);
            assert_eq!(entries.len(), 1, "cut at {cut}");
            assert_eq!(valid, HEADER_LEN + good.len());
        }
        let mut flipped = second.clone();
        flipped[20] ^= 1;
        let log = log_of(&[good.clone(), flipped, encode_put(&record(3, "m"))]);
        let (entries, valid) = replay(&log);
        assert_eq!((entries.len(), valid), (1, HEADER_LEN + good.len()), "nothing after a bad record");
    }
}

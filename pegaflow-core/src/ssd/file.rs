//! One SSD cache path: a data file written as a circular log of aligned extents, and its
//! index log ([`super::record`]).
//!
//! - Allocation is a write head moving forward through the data file and wrapping at its
//!   end: the blocks a new extent overlaps are the oldest ones, and they are evicted.
//!   Writes are sequential, nothing fragments, and replay needs no record of evictions: a
//!   later `PUT` over an earlier extent replaces it.
//! - A block is written (data first, then its `PUT` record), so a crash between the two
//!   leaves a block that was never indexed; every read checks the payload's xxh3-64, and
//!   a mismatch is an error the caller turns into a miss (and a `DROP` record).
//! - The index file is locked (`flock`): a second server on the same path fails to
//!   start. The data file gets its full capacity at open (`fallocate`), so a disk without
//!   the room fails at start rather than mid-write.
//! - I/O is positional (`pread`/`pwrite`), with `O_DIRECT` where the file system allows
//!   it (buffered otherwise: tmpfs, some network file systems), through an aligned bounce
//!   buffer.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::xxh3_64;

use super::SsdError;
use super::io::AlignedBuf;
use super::record::{self, BlockId, BlockRecord, Entry, Header};

/// Extent alignment: the logical block size of every common NVMe (512 B or 4 KiB).
pub const ALIGN: u64 = 4096;
/// Replaced records the index log may carry beyond twice the live ones before it is
/// rewritten.
const COMPACT_SLACK: usize = 4096;
/// The data file's name inside a directory path.
pub const DATA_FILE: &str = "pegaflow-ssd.data";

/// How the data file is read and written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoMode {
    /// `O_DIRECT`: no page cache.
    Direct,
    /// Through the page cache (the file system refused `O_DIRECT`).
    Buffered,
}

/// One cache path's data and index files.
#[derive(Debug)]
pub struct BlockFile {
    data_path: PathBuf,
    index_path: PathBuf,
    data: File,
    index: File,
    mode: IoMode,
    capacity: u64,
    head: u64,
    next_seq: u64,
    /// Live blocks by offset.
    live: BTreeMap<u64, BlockRecord>,
    /// Records in the index log (live or replaced): rewritten when far above the live.
    records: usize,
    /// Part layouts by fingerprint: each layer's bytes.
    layouts: HashMap<u64, Vec<u64>>,
}

/// The error of `op` on `path` (the path is copied only when there is an error).
fn io<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> SsdError + 'a {
    move |source| SsdError::Io { path: path.to_path_buf(), op, source }
}

fn aligned_up(n: u64) -> u64 {
    n.div_ceil(ALIGN) * ALIGN
}

impl BlockFile {
    /// Opens (creating if needed) the cache at `path` — a directory (the files go inside)
    /// or a file path (the index beside it, `.index` appended) — with `capacity` bytes,
    /// and replays its index. Fails with a clear error on a bad path, a locked path or a
    /// disk without the room.
    pub fn open(path: &Path, capacity: u64) -> Result<Self, SsdError> {
        let data_path = if path.is_dir() { path.join(DATA_FILE) } else { path.to_path_buf() };
        let mut index_name = data_path.clone().into_os_string();
        index_name.push(".index");
        let index_path = PathBuf::from(index_name);
        let capacity = capacity / ALIGN * ALIGN;
        if capacity == 0 {
            return Err(SsdError::Config(format!("{}: capacity below {ALIGN} bytes", path.display())));
        }
        // Appends only: records go after the valid ones (a torn tail is cut first).
        let mut index = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&index_path)
            .map_err(io(&index_path, "open"))?;
        lock(&index, &index_path)?;
        let (data, mode) = open_data(&data_path)?;
        reserve(&data, &data_path, capacity)?;

        let mut log = Vec::new();
        index.read_to_end(&mut log).map_err(io(&index_path, "read"))?;
        let header = Header { align: ALIGN as u32, capacity };
        let mut file = Self {
            data_path,
            index_path,
            data,
            index,
            mode,
            capacity,
            head: 0,
            next_seq: 0,
            live: BTreeMap::new(),
            records: 0,
            layouts: HashMap::new(),
        };
        match Header::decode(&log) {
            Some(old) if old.align == header.align => {
                let (entries, valid) = record::replay(&log);
                file.replay(entries);
                if valid < log.len() || old.capacity != capacity {
                    // Cut a torn tail (and rewrite after a capacity change) so that new
                    // records follow valid ones.
                    file.rewrite_index()?;
                }
            }
            _ => {
                if !log.is_empty() {
                    tracing::warn!(path = %file.index_path.display(), "SSD index unreadable or from another layout: starting empty");
                }
                file.index.set_len(0).map_err(io(&file.index_path, "truncate"))?;
                file.index.write_all(&header.encode()).map_err(io(&file.index_path, "write"))?;
            }
        }
        Ok(file)
    }

    fn replay(&mut self, entries: Vec<Entry>) {
        for entry in entries {
            match entry {
                Entry::Layout(fingerprint, layers) => {
                    self.layouts.insert(fingerprint, layers);
                }
                Entry::Put(rec) => {
                    self.records += 1;
                    let end = rec.offset + aligned_up(u64::from(rec.len));
                    if end > self.capacity || rec.offset % ALIGN != 0 || !self.layouts.contains_key(&rec.id.layout) {
                        continue; // beyond a shrunk capacity, or a layout never recorded
                    }
                    self.evict_range(rec.offset, end);
                    self.next_seq = self.next_seq.max(rec.seq + 1);
                    self.head = end;
                    self.live.insert(rec.offset, rec);
                }
                Entry::Drop(offset) => {
                    self.live.remove(&offset);
                }
            }
        }
        if self.head >= self.capacity {
            self.head = 0;
        }
    }

    /// Rewrites the index with the live blocks only (in write order).
    fn rewrite_index(&mut self) -> Result<(), SsdError> {
        let mut records: Vec<&BlockRecord> = self.live.values().collect();
        records.sort_by_key(|r| r.seq);
        let mut log = Header { align: ALIGN as u32, capacity: self.capacity }.encode().to_vec();
        let used: std::collections::BTreeSet<u64> = records.iter().map(|r| r.id.layout).collect();
        for fingerprint in used {
            if let Some(layers) = self.layouts.get(&fingerprint) {
                log.extend_from_slice(&record::encode_layout(fingerprint, layers));
            }
        }
        for rec in records {
            log.extend_from_slice(&record::encode_put(rec));
        }
        let path = &self.index_path;
        self.index.set_len(0).map_err(io(path, "truncate"))?;
        self.index.write_all(&log).map_err(io(path, "write"))?;
        self.index.sync_data().map_err(io(path, "sync"))?;
        self.records = self.live.len();
        Ok(())
    }

    /// The data file's path.
    pub fn path(&self) -> &Path {
        &self.data_path
    }

    /// How the data file does I/O.
    pub fn mode(&self) -> IoMode {
        self.mode
    }

    /// Usable bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The layer sizes of the part layout `fingerprint`, if recorded.
    pub fn layout(&self, fingerprint: u64) -> Option<&[u64]> {
        self.layouts.get(&fingerprint).map(Vec::as_slice)
    }

    /// Records a part layout (each layer's bytes) under `fingerprint`, once; blocks of
    /// that layout may be written afterwards.
    pub fn add_layout(&mut self, fingerprint: u64, layer_bytes: &[u64]) -> Result<(), SsdError> {
        if layer_bytes.is_empty() || layer_bytes.len() > record::MAX_LAYOUT_LAYERS {
            return Err(SsdError::Config(format!("a layout of {} layers", layer_bytes.len())));
        }
        match self.layouts.get(&fingerprint) {
            Some(known) if known == layer_bytes => Ok(()),
            Some(_) => Err(SsdError::Config(format!("layout fingerprint {fingerprint:#x} names two layouts"))),
            None => {
                self.append(&record::encode_layout(fingerprint, layer_bytes))?;
                self.layouts.insert(fingerprint, layer_bytes.to_vec());
                Ok(())
            }
        }
    }

    /// The blocks stored (and indexed), oldest first.
    pub fn blocks(&self) -> Vec<&BlockRecord> {
        let mut out: Vec<&BlockRecord> = self.live.values().collect();
        out.sort_by_key(|r| r.seq);
        out
    }

    /// Removes the live blocks overlapping `[start, end)`; returns them.
    fn evict_range(&mut self, start: u64, end: u64) -> Vec<BlockRecord> {
        let overlapping: Vec<u64> = self
            .live
            .range(..end)
            .rev()
            .take_while(|(offset, rec)| **offset + aligned_up(u64::from(rec.len)) > start)
            .map(|(offset, _)| *offset)
            .collect();
        // Found backwards from the end; returned oldest (lowest offset) first.
        overlapping.into_iter().rev().filter_map(|o| self.live.remove(&o)).collect()
    }

    /// Stores `data` as block `id` at the write head (wrapping at the end of the file).
    /// Returns its record and the oldest blocks its extent replaced.
    pub fn write(&mut self, id: BlockId, data: &[u8]) -> Result<(BlockRecord, Vec<BlockRecord>), SsdError> {
        let len = u32::try_from(data.len()).map_err(|_| SsdError::Config("a block above 4 GiB".into()))?;
        let extent = aligned_up(data.len() as u64);
        if !self.layouts.contains_key(&id.layout) {
            return Err(SsdError::Config(format!("block of unrecorded layout {:#x} (add_layout first)", id.layout)));
        }
        if extent > self.capacity {
            return Err(SsdError::Config(format!("a {extent}-byte block does not fit {} bytes", self.capacity)));
        }
        if self.head + extent > self.capacity {
            self.head = 0;
        }
        let offset = self.head;
        let evicted = self.evict_range(offset, offset + extent);
        let mut buf = AlignedBuf::new(extent as usize);
        buf.bytes_mut()[..data.len()].copy_from_slice(data);
        self.data.write_all_at(buf.bytes(), offset).map_err(io(&self.data_path, "write"))?;
        let rec = BlockRecord { id, seq: self.next_seq, offset, len, checksum: xxh3_64(data) };
        // Indexed only once the data is written: a crash in between leaves no record.
        self.append(&record::encode_put(&rec))?;
        self.next_seq += 1;
        self.head = offset + extent;
        self.live.insert(offset, rec.clone());
        self.records += 1;
        if self.records > 2 * self.live.len() + COMPACT_SLACK {
            self.rewrite_index()?;
        }
        Ok((rec, evicted))
    }

    /// Reads block `rec` into `out` (its payload length) and verifies its checksum.
    pub fn read(&self, rec: &BlockRecord, out: &mut [u8]) -> Result<(), SsdError> {
        if out.len() != rec.len as usize {
            return Err(SsdError::Config(format!("a {}-byte buffer for a {}-byte block", out.len(), rec.len)));
        }
        self.read_at(rec.offset, rec.checksum, out)
    }

    /// Reads the block of `out.len()` payload bytes at `offset` into `out` and verifies
    /// it against `checksum`.
    pub fn read_at(&self, offset: u64, checksum: u64, out: &mut [u8]) -> Result<(), SsdError> {
        let mut buf = AlignedBuf::new(aligned_up(out.len() as u64) as usize);
        self.data.read_exact_at(buf.bytes_mut(), offset).map_err(io(&self.data_path, "read"))?;
        let payload = &buf.bytes()[..out.len()];
        if xxh3_64(payload) != checksum {
            return Err(SsdError::Corrupt { path: self.data_path.clone(), offset });
        }
        out.copy_from_slice(payload);
        Ok(())
    }

    /// Forgets the block at `offset` (it failed its checksum, say), durably.
    pub fn drop_block(&mut self, offset: u64) -> Result<Option<BlockRecord>, SsdError> {
        let Some(rec) = self.live.remove(&offset) else { return Ok(None) };
        self.append(&record::encode_drop(offset))?;
        Ok(Some(rec))
    }

    fn append(&mut self, bytes: &[u8]) -> Result<(), SsdError> {
        self.index.write_all(bytes).map_err(io(&self.index_path, "append"))
    }
}

fn open_data(path: &Path) -> Result<(File, IoMode), SsdError> {
    let mut options = OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false);
    match options.clone().custom_flags(libc::O_DIRECT).open(path) {
        Ok(file) => Ok((file, IoMode::Direct)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            tracing::warn!(path = %path.display(), "the file system refuses O_DIRECT: SSD cache I/O goes through the page cache");
            Ok((options.open(path).map_err(io(path, "open"))?, IoMode::Buffered))
        }
        Err(e) => Err(io(path, "open")(e)),
    }
}

fn lock(file: &File, path: &Path) -> Result<(), SsdError> {
    // SAFETY: flock on a descriptor this process owns; no memory is passed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Err(SsdError::Locked(path.to_path_buf()));
    }
    Err(io(path, "lock")(err))
}

/// Gives the data file its capacity up front: a disk without the room fails now.
fn reserve(file: &File, path: &Path, capacity: u64) -> Result<(), SsdError> {
    let len = libc::off_t::try_from(capacity).map_err(|_| SsdError::Config("capacity too large".into()))?;
    // SAFETY: fallocate on a descriptor this process owns; no memory is passed.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EFBIG) => Err(SsdError::NoSpace { path: path.to_path_buf(), capacity }),
        Some(libc::EOPNOTSUPP) => {
            // No preallocation here: a sparse file of the full length, if there is room.
            let meta = file.metadata().map_err(io(path, "stat"))?;
            let stat = nix::sys::statvfs::fstatvfs(file).map_err(|e| io(path, "statvfs")(e.into()))?;
            let free = stat.blocks_available().saturating_mul(stat.fragment_size());
            if free.saturating_add(meta.len()) < capacity {
                return Err(SsdError::NoSpace { path: path.to_path_buf(), capacity });
            }
            if meta.len() < capacity {
                file.set_len(capacity).map_err(io(path, "truncate"))?;
            }
            Ok(())
        }
        _ => Err(io(path, "fallocate")(err)),
    }
}

//! One SSD cache path: a data file written as a circular log of aligned extents, and its
//! index log ([`super::record`]).
//!
//! - Allocation is a write head moving forward through the data file and wrapping at its
//!   end: the blocks a new extent overlaps are the oldest ones. Positions are virtual
//!   (counted over every lap, the file offset is the position modulo the capacity), so
//!   whether a block was overwritten follows from its position and the head alone: the
//!   file keeps no per-block state in memory (a restarted server with a million blocks
//!   holds them once, in the tier's index), and replay needs no record of evictions.
//! - A block is written (data first, then its `PUT` record), so a crash between the two
//!   leaves a block that was never indexed; every read checks the payload's xxh3-64, and
//!   a mismatch is an error the caller turns into a miss (and a `DROP` record).
//! - The index file is locked (`flock`): a second server on the same path fails to
//!   start. The data file gets its full capacity at open (`fallocate`), so a disk without
//!   the room fails at start rather than mid-write.
//! - I/O is positional (`pread`/`pwrite`), with `O_DIRECT` where the file system allows
//!   it (buffered otherwise: tmpfs, some network file systems), through an aligned bounce
//!   buffer.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::xxh3_64;

use super::SsdError;
use super::io::{AlignedBuf, IO_ALIGN};
use super::record::{self, BlockId, BlockRecord, EntryRef, Header, PutRef};

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
    /// Virtual position of the write head.
    head: u64,
    next_seq: u64,
    /// Virtual positions of the blocks written within the last lap, oldest first: how
    /// many records of the index log are still live (8 bytes per block).
    recent: VecDeque<u64>,
    /// Records in the index log (live or replaced): rewritten when far above the live.
    records: usize,
    /// Part layouts by fingerprint: each layer's bytes.
    layouts: HashMap<u64, Vec<u64>>,
    /// The live blocks found at open, until taken.
    replayed: Vec<BlockRecord>,
    /// The index log was replayed: blocks may be written.
    recovered: bool,
}

/// Space reserved at the write head for one block (see [`BlockFile::reserve`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reserved {
    /// Virtual position.
    pub position: u64,
    /// Byte offset in the data file.
    pub offset: u64,
    /// Bytes of the extent (the payload rounded up to [`ALIGN`]).
    pub extent: u64,
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
        let mut replayed = Vec::new();
        let mut file = Self::open_each(path, capacity, |put| replayed.push(put.to_record()))?;
        file.replayed = replayed;
        Ok(file)
    }

    /// [`Self::open`], handing each live block found to `each` (oldest first) instead
    /// of keeping them: nothing is allocated per block.
    pub fn open_each(path: &Path, capacity: u64, each: impl FnMut(&PutRef<'_>)) -> Result<Self, SsdError> {
        let mut file = Self::prepare(path, capacity)?;
        file.recover(each)?;
        Ok(file)
    }

    /// The part of [`Self::open`] that can fail on a bad path, a locked one or a disk
    /// without the room (fast: files opened, locked, reserved). [`Self::recover`] must
    /// follow before blocks are written.
    pub fn prepare(path: &Path, capacity: u64) -> Result<Self, SsdError> {
        let data_path = if path.is_dir() { path.join(DATA_FILE) } else { path.to_path_buf() };
        let mut index_name = data_path.clone().into_os_string();
        index_name.push(".index");
        let index_path = PathBuf::from(index_name);
        let capacity = capacity / ALIGN * ALIGN;
        if capacity == 0 {
            return Err(SsdError::Config(format!("{}: capacity below {ALIGN} bytes", path.display())));
        }
        // Appends only: records go after the valid ones (a torn tail is cut first).
        let index = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&index_path)
            .map_err(io(&index_path, "open"))?;
        lock(&index, &index_path)?;
        let (data, mode) = open_data(&data_path)?;
        reserve(&data, &data_path, capacity)?;
        Ok(Self {
            data_path,
            index_path,
            data,
            index,
            mode,
            capacity,
            head: 0,
            next_seq: 0,
            recent: VecDeque::new(),
            records: 0,
            layouts: HashMap::new(),
            replayed: Vec::new(),
            recovered: false,
        })
    }

    /// Replays the index log (the slow part of [`Self::open`]: a million blocks take a
    /// fraction of a second), handing each live block to `each`, oldest first.
    pub fn recover(&mut self, each: impl FnMut(&PutRef<'_>)) -> Result<(), SsdError> {
        if self.recovered {
            return Ok(());
        }
        let mut log = Vec::new();
        self.index.seek(SeekFrom::Start(0)).map_err(io(&self.index_path, "seek"))?;
        self.index.read_to_end(&mut log).map_err(io(&self.index_path, "read"))?;
        let header = Header { align: ALIGN as u32, capacity: self.capacity };
        match Header::decode(&log) {
            Some(old) if old == header => {
                let valid = self.replay(&log, each);
                let torn = valid < log.len();
                drop(log);
                if torn {
                    // Cut a torn tail so that new records follow valid ones.
                    self.rewrite_index()?;
                }
            }
            _ => {
                if !log.is_empty() {
                    // Another capacity maps positions to other file offsets: the old
                    // blocks cannot be found again.
                    tracing::warn!(path = %self.index_path.display(), "SSD index unreadable, of another format or capacity: starting empty");
                }
                self.index.set_len(0).map_err(io(&self.index_path, "truncate"))?;
                self.index.write_all(&header.encode()).map_err(io(&self.index_path, "write"))?;
            }
        }
        self.recovered = true;
        Ok(())
    }

    /// Replays the index log: layouts, the head and sequence first, then hands the blocks
    /// still live (not overwritten, not dropped) to `each`, oldest first. Returns the
    /// length of the log's valid prefix.
    fn replay(&mut self, log: &[u8], mut each: impl FnMut(&PutRef<'_>)) -> usize {
        let mut dropped = HashSet::new();
        let capacity = self.capacity;
        let fits = |put: &PutRef<'_>| {
            put.offset.is_multiple_of(ALIGN) && put.offset % capacity + aligned_up(u64::from(put.len)) <= capacity
        };
        let valid = record::replay_each(log, |entry| match entry {
            EntryRef::Layout(fingerprint, layers) => {
                self.layouts.insert(fingerprint, layers);
            }
            EntryRef::Put(put) => {
                self.records += 1;
                if fits(&put) {
                    self.next_seq = self.next_seq.max(put.seq + 1);
                    self.head = self.head.max(put.offset + aligned_up(u64::from(put.len)));
                }
            }
            EntryRef::Drop(position) => {
                dropped.insert(position);
            }
        });
        let (head, layouts) = (self.head, &self.layouts);
        let mut recent = VecDeque::new();
        record::replay_each(&log[..valid], |entry| {
            if let EntryRef::Put(put) = entry
                && fits(&put)
                && head <= put.offset.saturating_add(capacity)
                && !dropped.contains(&put.offset)
                && layouts.contains_key(&put.layout)
            {
                recent.push_back(put.offset);
                each(&put);
            }
        });
        self.recent = recent;
        valid
    }

    /// Whether the block written at virtual position `position` is still in the file (no
    /// later write reached its extent).
    pub fn is_live(&self, position: u64) -> bool {
        self.head <= position.saturating_add(self.capacity)
    }

    /// The live blocks found when the file was opened, oldest first (once: later calls
    /// return nothing).
    pub fn take_replayed(&mut self) -> Vec<BlockRecord> {
        std::mem::take(&mut self.replayed)
    }

    /// Rewrites the index with the live blocks only (in write order), from the log on
    /// disk (the file keeps no records in memory).
    fn rewrite_index(&mut self) -> Result<(), SsdError> {
        let mut old = Vec::new();
        let path = self.index_path.clone();
        self.index.seek(SeekFrom::Start(0)).map_err(io(&path, "seek"))?;
        self.index.read_to_end(&mut old).map_err(io(&path, "read"))?;
        let mut dropped = HashSet::new();
        let valid = record::replay_each(&old, |entry| {
            if let EntryRef::Drop(position) = entry {
                dropped.insert(position);
            }
        });
        let mut log = Header { align: ALIGN as u32, capacity: self.capacity }.encode().to_vec();
        let mut layouts: Vec<(&u64, &Vec<u64>)> = self.layouts.iter().collect();
        layouts.sort_unstable_by_key(|(fingerprint, _)| **fingerprint);
        for (fingerprint, layers) in layouts {
            log.extend_from_slice(&record::encode_layout(*fingerprint, layers));
        }
        let mut kept = 0;
        let head = self.head;
        record::replay_each(&old[..valid], |entry| {
            if let EntryRef::Put(put) = entry
                && head <= put.offset.saturating_add(self.capacity)
                && !dropped.contains(&put.offset)
            {
                log.extend_from_slice(&record::encode_put(&put.to_record()));
                kept += 1;
            }
        });
        drop(old);
        self.index.set_len(0).map_err(io(&path, "truncate"))?;
        self.index.write_all(&log).map_err(io(&path, "write"))?;
        self.index.sync_data().map_err(io(&path, "sync"))?;
        self.records = kept;
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
        if !self.recovered {
            return Err(SsdError::Config("the index log is not replayed yet (recover first)".into()));
        }
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

    /// Stores `data` as block `id` at the write head (wrapping at the end of the file,
    /// over the oldest blocks). Returns its record.
    pub fn write(&mut self, id: BlockId, data: &[u8]) -> Result<BlockRecord, SsdError> {
        let len = u32::try_from(data.len()).map_err(|_| SsdError::Config("a block above 4 GiB".into()))?;
        let reserved = self.reserve(id.layout, data.len() as u64)?;
        let mut buf = AlignedBuf::new(reserved.extent as usize);
        buf.bytes_mut()[..data.len()].copy_from_slice(data);
        self.data.write_all_at(buf.bytes(), reserved.offset).map_err(io(&self.data_path, "write"))?;
        self.commit(id, &reserved, len, xxh3_64(data))
    }

    /// Space for a block of `len` payload bytes of layout `layout` at the write head
    /// (wrapping at the end of the file, over the oldest blocks); the head moves past it.
    /// Write the extent at [`Reserved::offset`] of [`Self::data`], then [`Self::commit`]
    /// it (space reserved and never committed is skipped, like an overwritten block).
    pub fn reserve(&mut self, layout: u64, len: u64) -> Result<Reserved, SsdError> {
        if !self.recovered {
            return Err(SsdError::Config("the index log is not replayed yet (recover first)".into()));
        }
        if !self.layouts.contains_key(&layout) {
            return Err(SsdError::Config(format!("block of unrecorded layout {layout:#x} (add_layout first)")));
        }
        let extent = aligned_up(len);
        if extent > self.capacity || len > u64::from(u32::MAX) {
            return Err(SsdError::Config(format!("a {extent}-byte block does not fit {} bytes", self.capacity)));
        }
        if self.head % self.capacity + extent > self.capacity {
            // No room before the end: the next lap starts at the file's beginning.
            self.head = self.head.div_ceil(self.capacity) * self.capacity;
        }
        let position = self.head;
        self.head = position + extent;
        Ok(Reserved { position, offset: position % self.capacity, extent })
    }

    /// Records block `id` (`len` bytes, xxh3-64 `checksum`) written into `reserved`.
    /// Indexed only once the data is written: a crash in between leaves no record.
    pub fn commit(
        &mut self,
        id: BlockId,
        reserved: &Reserved,
        len: u32,
        checksum: u64,
    ) -> Result<BlockRecord, SsdError> {
        let rec = BlockRecord { id, seq: self.next_seq, offset: reserved.position, len, checksum };
        self.append(&record::encode_put(&rec))?;
        self.next_seq += 1;
        self.recent.push_back(reserved.position);
        while self.recent.front().is_some_and(|p| !self.is_live(*p)) {
            self.recent.pop_front();
        }
        self.records += 1;
        if self.records > 2 * self.recent.len() + COMPACT_SLACK {
            self.rewrite_index()?;
        }
        Ok(rec)
    }

    /// The write head's virtual position.
    pub fn head(&self) -> u64 {
        self.head
    }

    /// The data file, for reads the caller runs itself (see [`Self::offset_of`] and
    /// [`Self::check`]).
    pub fn data(&self) -> &File {
        &self.data
    }

    /// The byte offset in the data file of virtual position `position`.
    pub fn offset_of(&self, position: u64) -> u64 {
        position % self.capacity
    }

    /// Checks `payload`, read from virtual position `position`, against `checksum`:
    /// overwritten meanwhile, or not the bytes written.
    pub fn check(&self, position: u64, payload: &[u8], checksum: u64) -> Result<(), SsdError> {
        if !self.is_live(position) {
            return Err(SsdError::Overwritten(position));
        }
        if xxh3_64(payload) != checksum {
            return Err(SsdError::Corrupt { path: self.data_path.clone(), offset: self.offset_of(position) });
        }
        Ok(())
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
        if !self.is_live(offset) {
            return Err(SsdError::Overwritten(offset));
        }
        let mut buf = AlignedBuf::new(aligned_up(out.len() as u64) as usize);
        self.data.read_exact_at(buf.bytes_mut(), self.offset_of(offset)).map_err(io(&self.data_path, "read"))?;
        let payload = &buf.bytes()[..out.len()];
        // Overwritten while it was read is not a corruption: checked first.
        self.check(offset, payload, checksum)?;
        out.copy_from_slice(payload);
        Ok(())
    }

    /// Forgets the block at virtual position `offset` (it failed its checksum, say),
    /// durably.
    pub fn drop_block(&mut self, offset: u64) -> Result<(), SsdError> {
        if self.is_live(offset) {
            self.append(&record::encode_drop(offset))?;
            self.records += 1;
        }
        Ok(())
    }

    fn append(&mut self, bytes: &[u8]) -> Result<(), SsdError> {
        self.index.write_all(bytes).map_err(io(&self.index_path, "append"))
    }
}

fn open_data(path: &Path) -> Result<(File, IoMode), SsdError> {
    let mut options = OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false);
    match options.clone().custom_flags(libc::O_DIRECT).open(path) {
        Ok(file) => {
            let alignment = direct_io_alignment(&file);
            if fits_extents(alignment) {
                return Ok((file, IoMode::Direct));
            }
            tracing::warn!(
                path = %path.display(), ?alignment,
                "the device's direct I/O alignment does not fit 4 KiB extents: SSD cache I/O goes through the page cache"
            );
            Ok((options.open(path).map_err(io(path, "open"))?, IoMode::Buffered))
        }
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            tracing::warn!(path = %path.display(), "the file system refuses O_DIRECT: SSD cache I/O goes through the page cache");
            Ok((options.open(path).map_err(io(path, "open"))?, IoMode::Buffered))
        }
        Err(e) => Err(io(path, "open")(e)),
    }
}

/// Whether direct I/O of [`ALIGN`]-aligned extents from [`IO_ALIGN`]-aligned buffers
/// suits a file of direct I/O `alignment` (offset, memory): unknown counts as yes, an
/// offset alignment of 0 means the file takes no direct I/O.
pub(crate) fn fits_extents(alignment: Option<(u32, u32)>) -> bool {
    alignment.is_none_or(|(offset, memory)| offset != 0 && u64::from(offset) <= ALIGN && memory as usize <= IO_ALIGN)
}

/// The file's direct I/O alignment (offset, memory) in bytes, when the kernel tells it
/// (`statx` with `STATX_DIOALIGN`, Linux 6.1 on); `None` when it does not.
fn direct_io_alignment(file: &File) -> Option<(u32, u32)> {
    // SAFETY: an all-zero `statx` is a valid value of this plain C struct.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: statx on a descriptor this process owns (`AT_EMPTY_PATH` with an empty,
    // NUL-terminated path), writing into `stx`, which outlives the call.
    let rc =
        unsafe { libc::statx(file.as_raw_fd(), c"".as_ptr(), libc::AT_EMPTY_PATH, libc::STATX_DIOALIGN, &mut stx) };
    (rc == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0).then_some((stx.stx_dio_offset_align, stx.stx_dio_mem_align))
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

//! Batched positional I/O for the SSD tier: `io_uring` where the kernel lets this process
//! use it, else `pread`/`pwrite` one after the other (seccomp profiles, such as Docker's
//! default, refuse `io_uring_setup`), with one warning saying which.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::ptr::NonNull;
use std::time::{Duration, Instant};

use io_uring::{IoUring, opcode, types};

/// Alignment of I/O buffers (and offsets, and lengths) for `O_DIRECT`.
pub const IO_ALIGN: usize = 4096;

/// A zeroed buffer whose start is aligned for `O_DIRECT`. Its bytes live on the heap and
/// never move while the buffer exists (a queued I/O may point at them).
pub struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// `len` zero bytes.
    pub fn new(len: usize) -> Self {
        let raw = vec![0u8; len + IO_ALIGN];
        let start = raw.as_ptr().align_offset(IO_ALIGN);
        Self { raw, start, len }
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }

    /// The bytes, writable.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf").field("len", &self.len).finish()
    }
}

/// Memory lent to one operation by its caller (the pool's bytes of a block), so a block
/// goes between the pool and the SSD without a copy. Aligned for `O_DIRECT`.
#[derive(Debug)]
pub struct LentBuf {
    ptr: NonNull<u8>,
    len: usize,
}

impl LentBuf {
    /// `len` bytes at `ptr`; `None` unless both are multiples of [`IO_ALIGN`] (and `len`
    /// is not zero): unaligned memory goes through an [`AlignedBuf`] instead.
    ///
    /// # Safety
    ///
    /// The `len` bytes at `ptr` must stay allocated, and nothing else may write them (nor
    /// read them, when the operation is a read) until the operation holding this buffer
    /// has been handed back by [`IoEngine::run`]. An operation the engine never hands
    /// back (its ring failed) may still be running in the kernel: a read's memory must
    /// then never be used again; a write's may be, but what lands in the file is
    /// undefined.
    pub unsafe fn new(ptr: NonNull<u8>, len: usize) -> Option<Self> {
        let aligned = (ptr.as_ptr() as usize).is_multiple_of(IO_ALIGN) && len.is_multiple_of(IO_ALIGN);
        (aligned && len > 0).then_some(Self { ptr, len })
    }
}

// SAFETY: a `LentBuf` is exclusive access to its bytes for as long as it lives (the
// contract of `LentBuf::new`), as an owned buffer would be: moving it to another thread
// moves that access with it.
unsafe impl Send for LentBuf {}

/// The bytes of one operation: owned by it, or lent by its caller.
#[derive(Debug)]
pub enum IoBuf {
    /// A buffer of the operation's own.
    Owned(AlignedBuf),
    /// The caller's memory (see [`LentBuf::new`]).
    Lent(LentBuf),
}

impl IoBuf {
    /// Number of bytes.
    pub fn len(&self) -> usize {
        match self {
            IoBuf::Owned(buf) => buf.len,
            IoBuf::Lent(buf) => buf.len,
        }
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        match self {
            IoBuf::Owned(buf) => buf.bytes(),
            // SAFETY: `LentBuf::new`'s contract: the bytes are allocated and this buffer
            // has them to itself while it lives.
            IoBuf::Lent(buf) => unsafe { std::slice::from_raw_parts(buf.ptr.as_ptr(), buf.len) },
        }
    }

    /// The bytes, writable.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        match self {
            IoBuf::Owned(buf) => buf.bytes_mut(),
            // SAFETY: as in `bytes`, and `&mut self` makes this the only view.
            IoBuf::Lent(buf) => unsafe { std::slice::from_raw_parts_mut(buf.ptr.as_ptr(), buf.len) },
        }
    }
}

impl From<AlignedBuf> for IoBuf {
    fn from(buf: AlignedBuf) -> Self {
        IoBuf::Owned(buf)
    }
}

/// Read into, or write from, a buffer at a file offset.
#[derive(Debug)]
pub enum IoOp {
    /// Fill the buffer from the offset.
    Read {
        /// Byte offset in the file.
        offset: u64,
        /// Where the bytes go (its whole length is read).
        buf: IoBuf,
    },
    /// Write the buffer at the offset.
    Write {
        /// Byte offset in the file.
        offset: u64,
        /// The bytes (its whole length is written).
        buf: IoBuf,
    },
}

impl IoOp {
    fn len(&self) -> usize {
        match self {
            IoOp::Read { buf, .. } | IoOp::Write { buf, .. } => buf.len(),
        }
    }
}

/// Which mechanism an [`IoEngine`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoKind {
    /// `io_uring`, up to the queue depth in flight.
    Uring,
    /// `pread`/`pwrite`, one at a time.
    Positional,
}

/// Runs batches of I/O on one thread.
pub struct IoEngine {
    ring: Option<IoUring>,
    depth: usize,
}

impl std::fmt::Debug for IoEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoEngine").field("kind", &self.kind()).field("depth", &self.depth).finish()
    }
}

impl IoEngine {
    /// An engine keeping up to `depth` operations in flight; `io_uring` unless refused
    /// (or `uring` is false).
    pub fn new(depth: u32, uring: bool) -> Self {
        let depth = depth.max(1);
        let ring = if uring {
            match IoUring::new(depth.next_power_of_two()) {
                Ok(ring) => Some(ring),
                Err(e) => {
                    tracing::warn!(error = %e, "io_uring unavailable: SSD cache I/O uses pread/pwrite");
                    None
                }
            }
        } else {
            None
        };
        Self { ring, depth: depth as usize }
    }

    /// Operations kept in flight.
    pub fn depth(&self) -> usize {
        self.depth
    }

    /// The mechanism in use.
    pub fn kind(&self) -> IoKind {
        if self.ring.is_some() { IoKind::Uring } else { IoKind::Positional }
    }

    /// Runs `ops` on `file` and hands each back with its outcome, in order. A short read
    /// or write is an error (aligned `O_DIRECT` I/O of whole extents is never short on a
    /// healthy device). Should the ring itself fail, operations it still held are left
    /// out (their buffers are leaked: the kernel may still use them); those not yet
    /// started come back with the error.
    pub fn run(&mut self, file: &File, ops: Vec<IoOp>) -> Vec<(IoOp, io::Result<()>)> {
        self.run_timed(file, ops).into_iter().map(|(op, result, _)| (op, result)).collect()
    }

    /// [`IoEngine::run`], with each operation's latency (from its submission until its
    /// completion was seen).
    pub fn run_timed(&mut self, file: &File, ops: Vec<IoOp>) -> Vec<(IoOp, io::Result<()>, Duration)> {
        let mut out: Vec<Option<(IoOp, io::Result<()>, Duration)>> = (0..ops.len()).map(|_| None).collect();
        let mut pending = ops.into_iter().enumerate();
        let outcome =
            self.stream(file, || pending.next(), |end| out[end.tag] = Some((end.op, end.result, end.latency)));
        if let Err(e) = outcome {
            for (tag, op) in pending {
                out[tag] = Some((op, Err(io::Error::new(e.kind(), e.to_string())), Duration::ZERO));
            }
        }
        out.into_iter().flatten().collect()
    }

    /// Runs operations as `next` hands them out (each with a tag of the caller's), up to
    /// the depth in flight, and hands each to `done` as it completes (in completion
    /// order) — so buffers can go round, as in fio. Each operation is submitted as soon
    /// as it is handed out: none waits for others of a batch to be issued (measured
    /// faster for small blocks, docs/benchmarks.md). Returns once `next` gave `None` and
    /// everything handed out completed. Should the ring itself fail, operations in flight
    /// are leaked (the kernel may still use their buffers) and the error is returned.
    pub fn stream(
        &mut self,
        file: &File,
        mut next: impl FnMut() -> Option<(usize, IoOp)>,
        mut done: impl FnMut(Completed),
    ) -> io::Result<()> {
        match self.ring.as_mut() {
            Some(ring) => stream_uring(ring, self.depth, file, &mut next, &mut done),
            None => {
                while let Some((tag, mut op)) = next() {
                    let t0 = Instant::now();
                    let result = match &mut op {
                        IoOp::Read { offset, buf } => file.read_exact_at(buf.bytes_mut(), *offset),
                        IoOp::Write { offset, buf } => file.write_all_at(buf.bytes(), *offset),
                    };
                    done(Completed { tag, op, result, latency: t0.elapsed() });
                }
                Ok(())
            }
        }
    }
}

/// An operation that ended: the caller's tag, the operation (its buffer back), its
/// outcome and its latency (from submission until its completion was seen).
#[derive(Debug)]
pub struct Completed {
    /// What the caller tagged the operation with.
    pub tag: usize,
    /// The operation, buffer included.
    pub op: IoOp,
    /// Its outcome: a short read or write is an error.
    pub result: io::Result<()>,
    /// From its submission until its completion was seen.
    pub latency: Duration,
}

/// Whether a failed `io_uring_enter` only asks to be called again (after reaping).
fn retryable(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::Interrupted || matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EBUSY))
}

fn stream_uring(
    ring: &mut IoUring,
    depth: usize,
    file: &File,
    next: &mut dyn FnMut() -> Option<(usize, IoOp)>,
    done: &mut dyn FnMut(Completed),
) -> io::Result<()> {
    let fd = types::Fd(file.as_raw_fd());
    // In flight: (tag, operation, submitted at) by ring slot (the entries' user data).
    let mut slots: Vec<Option<(usize, IoOp, Instant)>> = (0..depth).map(|_| None).collect();
    let mut free: Vec<usize> = (0..depth).rev().collect();
    let mut exhausted = false;
    let failed = 'ring: loop {
        while !exhausted {
            let Some(&slot) = free.last() else { break };
            let Some((tag, op)) = next() else {
                exhausted = true;
                break;
            };
            let (_, op, at) = slots[slot].insert((tag, op, Instant::now()));
            let len = op.len() as u32;
            let entry = match op {
                IoOp::Read { offset, buf } => {
                    opcode::Read::new(fd, buf.bytes_mut().as_mut_ptr(), len).offset(*offset).build()
                }
                IoOp::Write { offset, buf } => {
                    opcode::Write::new(fd, buf.bytes().as_ptr(), len).offset(*offset).build()
                }
            }
            .user_data(slot as u64);
            *at = Instant::now();
            // SAFETY: the entry points into the buffer of the operation held in
            // `slots[slot]`, which is neither dropped nor touched until its completion is
            // reaped below (or leaked if the ring fails); its bytes (heap or lent) do not
            // move when the operation does. The submission queue has room: it holds
            // `depth` rounded up to a power of two, and at most `depth` operations are
            // out at once.
            if unsafe { ring.submission().push(&entry) }.is_err() {
                break 'ring Some(io::Error::other("SSD submission queue full"));
            }
            free.pop();
            match ring.submit() {
                Ok(_) => {}
                Err(e) if retryable(&e) => break, // reap first; it stays queued
                Err(e) => break 'ring Some(e),
            }
        }
        if free.len() == depth && exhausted {
            break None;
        }
        if let Err(e) = ring.submit_and_wait(1)
            && !retryable(&e)
        {
            break Some(e);
        }
        for cqe in ring.completion() {
            let slot = cqe.user_data() as usize;
            let Some((tag, op, at)) = slots.get_mut(slot).and_then(Option::take) else { continue };
            free.push(slot);
            let result = match cqe.result() {
                n if n < 0 => Err(io::Error::from_raw_os_error(-n)),
                n if n as usize != op.len() => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short SSD I/O")),
                _ => Ok(()),
            };
            done(Completed { tag, op, result, latency: at.elapsed() });
        }
    };
    match failed {
        None => Ok(()),
        Some(e) => {
            // Operations still in flight may keep using their buffers: leaked.
            for slot in &mut slots {
                if let Some(op) = slot.take() {
                    std::mem::forget(op);
                }
            }
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A new empty file in the temporary directory (the caller removes it).
    fn scratch_file() -> (std::path::PathBuf, File) {
        let path = std::env::temp_dir().join(format!("pegaflow-io-{}", uuid::Uuid::new_v4().simple()));
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        (path, file)
    }

    fn round_trip(uring: bool) -> IoKind {
        let (path, file) = scratch_file();
        let mut engine = IoEngine::new(8, uring);
        let writes = (0..40u64)
            .map(|i| {
                let mut buf = AlignedBuf::new(IO_ALIGN * 2);
                buf.bytes_mut().fill(i as u8 + 1);
                IoOp::Write { offset: i * 2 * IO_ALIGN as u64, buf: buf.into() }
            })
            .collect();
        assert!(engine.run(&file, writes).iter().all(|(_, r)| r.is_ok()));
        let reads: Vec<IoOp> = (0..40u64)
            .rev()
            .map(|i| IoOp::Read { offset: i * 2 * IO_ALIGN as u64, buf: AlignedBuf::new(IO_ALIGN * 2).into() })
            .collect();
        let done = engine.run(&file, reads);
        assert_eq!(done.len(), 40);
        for (k, (op, result)) in done.iter().enumerate() {
            assert!(result.is_ok(), "{result:?}");
            let IoOp::Read { buf, .. } = op else { panic!("a read") };
            assert!(buf.bytes().iter().all(|&b| b == 40 - k as u8), "in order, byte for byte");
        }
        let timed = engine.run_timed(&file, vec![IoOp::Read { offset: 0, buf: AlignedBuf::new(IO_ALIGN).into() }]);
        assert!(timed[0].1.is_ok() && timed[0].2 > Duration::ZERO);
        // Reading past the end is a short read: an error, not garbage.
        let past = vec![IoOp::Read { offset: 80 * IO_ALIGN as u64, buf: AlignedBuf::new(IO_ALIGN).into() }];
        assert!(engine.run(&file, past)[0].1.is_err());
        std::fs::remove_file(&path).unwrap();
        engine.kind()
    }

    #[test]
    fn positional_io_round_trips() {
        assert_eq!(round_trip(false), IoKind::Positional);
    }

    #[test]
    fn io_uring_round_trips_where_allowed() {
        // Where the kernel refuses io_uring, the engine says so and still works.
        let kind = round_trip(true);
        assert_eq!(kind, if IoUring::new(2).is_ok() { IoKind::Uring } else { IoKind::Positional });
    }

    #[test]
    fn lent_memory_is_written_from_and_read_into_in_place() {
        for uring in [false, true] {
            let (path, file) = scratch_file();
            let mut region = AlignedBuf::new(4 * IO_ALIGN);
            region.bytes_mut()[..2 * IO_ALIGN].fill(7);
            let base = NonNull::new(region.bytes_mut().as_mut_ptr()).unwrap();
            // SAFETY: `region` outlives both runs and is not touched while they hold it.
            let first = unsafe { LentBuf::new(base, 2 * IO_ALIGN) }.unwrap();
            let mut engine = IoEngine::new(4, uring);
            let written = engine.run(&file, vec![IoOp::Write { offset: 0, buf: IoBuf::Lent(first) }]);
            assert!(written[0].1.is_ok());
            // SAFETY: as above; the second half of the region.
            let second = unsafe { LentBuf::new(base.add(2 * IO_ALIGN), 2 * IO_ALIGN) }.unwrap();
            let read = engine.run(&file, vec![IoOp::Read { offset: 0, buf: IoBuf::Lent(second) }]);
            assert!(read[0].1.is_ok());
            drop((written, read));
            assert!(region.bytes().iter().all(|&b| b == 7), "the bytes went out and came back in place");
            std::fs::remove_file(&path).unwrap();
        }
    }

    #[test]
    fn streamed_operations_come_back_to_be_used_again() {
        for uring in [false, true] {
            let (path, file) = scratch_file();
            let mut engine = IoEngine::new(4, uring);
            // 64 writes through 4 buffers: each one is refilled once it came back.
            let spare = std::cell::RefCell::new((0..4).map(|_| AlignedBuf::new(IO_ALIGN)).collect::<Vec<_>>());
            let mut issued = 0u64;
            let mut tags = Vec::new();
            let outcome = engine.stream(
                &file,
                || {
                    if issued == 64 {
                        return None;
                    }
                    let mut buf = spare.borrow_mut().pop().expect("a buffer is free whenever a slot is");
                    buf.bytes_mut().fill(issued as u8 + 1);
                    issued += 1;
                    Some((issued as usize - 1, IoOp::Write { offset: (issued - 1) * IO_ALIGN as u64, buf: buf.into() }))
                },
                |end| {
                    assert!(end.result.is_ok(), "{:?}", end.result);
                    tags.push(end.tag);
                    let IoOp::Write { buf: IoBuf::Owned(buf), .. } = end.op else { panic!("the write comes back") };
                    spare.borrow_mut().push(buf);
                },
            );
            assert!(outcome.is_ok());
            tags.sort_unstable();
            assert_eq!(tags, (0..64).collect::<Vec<_>>(), "every operation completed once");
            let reads =
                (0..64u64).map(|i| IoOp::Read { offset: i * IO_ALIGN as u64, buf: AlignedBuf::new(IO_ALIGN).into() });
            for (i, (op, result)) in engine.run(&file, reads.collect()).into_iter().enumerate() {
                assert!(result.is_ok());
                let IoOp::Read { buf, .. } = op else { panic!("a read") };
                assert!(buf.bytes().iter().all(|&b| b == i as u8 + 1), "block {i} byte for byte");
            }
            std::fs::remove_file(&path).unwrap();
        }
    }

    #[test]
    fn only_aligned_memory_is_lent() {
        let mut region = AlignedBuf::new(3 * IO_ALIGN);
        let base = NonNull::new(region.bytes_mut().as_mut_ptr()).unwrap();
        // SAFETY: none of these is used for I/O.
        unsafe {
            assert!(LentBuf::new(base, IO_ALIGN).is_some());
            assert!(LentBuf::new(base.add(512), IO_ALIGN).is_none(), "unaligned start");
            assert!(LentBuf::new(base, IO_ALIGN + 512).is_none(), "unaligned length");
            assert!(LentBuf::new(base, 0).is_none());
        }
    }

    #[test]
    fn buffers_are_aligned() {
        for len in [1, 4096, 10_000] {
            let buf = AlignedBuf::new(len);
            assert_eq!(buf.bytes().as_ptr() as usize % IO_ALIGN, 0);
            assert_eq!(buf.bytes().len(), len);
        }
    }
}

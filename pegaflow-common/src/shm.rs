//! Shared memory that a client hands the server by descriptor: a sealed `memfd`.
//!
//! The client creates the memory ([`SharedMemory::create`]: `memfd_create`, sized, then
//! sealed against shrinking and growing) and passes the descriptor over the server's Unix
//! socket. The server maps it with [`SharedMemory::from_fd`], which refuses anything it
//! could fault on or should not touch: not a regular file, not on tmpfs (hugetlbfs faults
//! when huge pages run out), not sealed against shrinking (a client truncating its memory
//! mid-copy would kill the server with SIGBUS), not open for reading and writing, or
//! shorter than required. The descriptor is closed once mapped; the mapping lives as long
//! as the value. The server never opens a path a client names.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use memmap2::Advice;
use memmap2::{MmapOptions, MmapRaw};
use nix::fcntl::{FcntlArg, OFlag, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::sys::stat::{SFlag, fstat};
use nix::sys::statfs::{TMPFS_MAGIC, fstatfs};

/// Why client memory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    /// Not a memory file the server can map safely (wrong kind, wrong file system).
    #[error("{0}")]
    Unsupported(String),
    /// The memory is not sealed against shrinking: the client could truncate it while the
    /// server copies (permanent: create it with `SharedMemory::create` / `memfd` + seals).
    #[error("memory is not sealed against shrinking (F_SEAL_SHRINK): create it as a sealed memfd")]
    NotSealed,
    /// The descriptor is not open for reading and writing.
    #[error("memory descriptor is not open for reading and writing")]
    NotReadWrite,
    /// The memory is shorter than required.
    #[error("memory has {len} bytes, need at least {min}")]
    TooSmall {
        /// Its size.
        len: u64,
        /// The size required.
        min: u64,
    },
    /// The memory is larger than the server may still map.
    #[error("memory has {len} bytes; the server may map at most {max} more client bytes")]
    TooLarge {
        /// Its size.
        len: u64,
        /// What is left of the server's budget.
        max: u64,
    },
    /// The memory's pages could not all be allocated and mapped.
    #[error("cannot fault in the memory's pages: {0}")]
    Populate(#[source] std::io::Error),
    /// Any other OS failure.
    #[error("{what}: {source}")]
    Os {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

fn os(what: &'static str) -> impl FnOnce(nix::Error) -> ShmError {
    move |e| ShmError::Os { what, source: e.into() }
}

/// Live server-side mappings of client memory, for the `pegaflow_client_mappings` gauge
/// and its cap.
static MAPPED: AtomicI64 = AtomicI64::new(0);
/// Their bytes, for the `--max-client-memory` cap.
static MAPPED_BYTES: AtomicU64 = AtomicU64::new(0);

/// Client memory mapped by this process through [`SharedMemory::from_fd`] and still alive.
pub fn client_mappings() -> i64 {
    MAPPED.load(Ordering::Relaxed)
}

/// Bytes of those mappings.
pub fn client_mapped_bytes() -> u64 {
    MAPPED_BYTES.load(Ordering::Relaxed)
}

/// A read-write `MAP_SHARED` mapping of a sealed memory file.
pub struct SharedMemory {
    base: NonNull<u8>,
    len: u64,
    /// Kept by the creator only, to hand to the server; the server closes it once mapped.
    fd: Option<OwnedFd>,
    counted: bool,
    _map: MmapRaw,
}

// SAFETY: the mapping is plain shared bytes; callers coordinate access to ranges and only
// raw pointers leave this type.
unsafe impl Send for SharedMemory {}
// SAFETY: as above.
unsafe impl Sync for SharedMemory {}

impl SharedMemory {
    /// Creates `len` bytes of zeroed memory as a memfd named `name` (shown in
    /// `/proc/<pid>/maps` as `/memfd:<name>`), sealed against
    /// shrinking, growing and further sealing, and maps it (client side).
    pub fn create(name: &str, len: u64) -> Result<Self, ShmError> {
        if len == 0 {
            return Err(ShmError::TooSmall { len, min: 1 });
        }
        let name = name.replace('\0', "");
        let fd = memfd_create(name.as_str(), MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING)
            .map_err(os("memfd_create"))?;
        let size = libc::off_t::try_from(len).map_err(|_| ShmError::TooSmall { len: 0, min: len })?;
        nix::unistd::ftruncate(&fd, size).map_err(os("ftruncate"))?;
        let seals = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL;
        fcntl(&fd, FcntlArg::F_ADD_SEALS(seals)).map_err(os("sealing the memfd"))?;
        let map = MmapOptions::new()
            .len(len as usize)
            .map_raw(fd.as_raw_fd())
            .map_err(|source| ShmError::Os { what: "mmap", source })?;
        Self::wrap(map, len, Some(fd), false)
    }

    /// Maps client memory received as `fd`, of `min_len..=max_len` bytes, after checking
    /// that the server can never fault on it (see the module docs); `fd` is closed before
    /// this returns.
    pub fn from_fd(fd: OwnedFd, min_len: u64, max_len: u64) -> Result<Self, ShmError> {
        let stat = fstat(fd.as_fd()).map_err(os("fstat"))?;
        if SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
            return Err(ShmError::Unsupported("the descriptor is not a memory file (memfd)".into()));
        }
        if fstatfs(&fd).map_err(os("fstatfs"))?.filesystem_type() != TMPFS_MAGIC {
            return Err(ShmError::Unsupported(
                "the memory is not on tmpfs/shmem (use memfd_create without MFD_HUGETLB)".into(),
            ));
        }
        let flags = OFlag::from_bits_truncate(fcntl(&fd, FcntlArg::F_GETFL).map_err(os("F_GETFL"))?);
        if flags & OFlag::O_ACCMODE != OFlag::O_RDWR {
            return Err(ShmError::NotReadWrite);
        }
        let seals = SealFlag::from_bits_truncate(fcntl(&fd, FcntlArg::F_GET_SEALS).map_err(os("F_GET_SEALS"))?);
        if !seals.contains(SealFlag::F_SEAL_SHRINK) {
            return Err(ShmError::NotSealed);
        }
        if seals.intersects(SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_FUTURE_WRITE) {
            return Err(ShmError::Unsupported("the memory is sealed against writing".into()));
        }
        // Sealed against shrinking: from now on the size can only grow, so it is read after
        // the seals (a size read before could be shrunk and sealed in between).
        let len = u64::try_from(fstat(fd.as_fd()).map_err(os("fstat"))?.st_size).unwrap_or(0);
        if len < min_len.max(1) {
            return Err(ShmError::TooSmall { len, min: min_len.max(1) });
        }
        if len > max_len {
            return Err(ShmError::TooLarge { len, max: max_len });
        }
        let map_len =
            usize::try_from(len).map_err(|_| ShmError::Unsupported(format!("{len} bytes cannot be mapped")))?;
        let map = MmapOptions::new()
            .len(map_len)
            .map_raw(fd.as_raw_fd())
            .map_err(|source| ShmError::Os { what: "mmap", source })?;
        drop(fd);
        match map.advise(Advice::PopulateWrite) {
            Ok(()) => {}
            // Before Linux 5.14: nothing to populate with; pages fault in on first copy.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => return Err(ShmError::Populate(e)),
        }
        MAPPED.fetch_add(1, Ordering::Relaxed);
        MAPPED_BYTES.fetch_add(len, Ordering::Relaxed);
        Self::wrap(map, len, None, true)
    }

    fn wrap(map: MmapRaw, len: u64, fd: Option<OwnedFd>, counted: bool) -> Result<Self, ShmError> {
        let Some(base) = NonNull::new(map.as_mut_ptr()) else {
            if counted {
                MAPPED.fetch_sub(1, Ordering::Relaxed);
                MAPPED_BYTES.fetch_sub(len, Ordering::Relaxed);
            }
            return Err(ShmError::Os { what: "mmap", source: std::io::Error::other("null mapping") });
        };
        Ok(Self { base, len, fd, counted, _map: map })
    }

    /// The descriptor to hand to the server (creator side only).
    pub fn fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.fd.as_ref().map(|fd| fd.as_fd())
    }

    /// Mapped bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True for an empty mapping (never created).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Pointer to byte `offset`, if `offset + len` is inside the mapping.
    pub fn ptr_at(&self, offset: u64, len: u64) -> Option<NonNull<u8>> {
        if offset.checked_add(len)? > self.len {
            return None;
        }
        let offset = usize::try_from(offset).ok()?;
        // SAFETY: `offset <= self.len`, the length of the live mapping at `base`.
        Some(unsafe { self.base.add(offset) })
    }
}

impl Drop for SharedMemory {
    fn drop(&mut self) {
        if self.counted {
            MAPPED.fetch_sub(1, Ordering::Relaxed);
            MAPPED_BYTES.fetch_sub(self.len, Ordering::Relaxed);
        }
    }
}

impl std::fmt::Debug for SharedMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedMemory").field("len", &self.len).finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dup(fd: std::os::fd::BorrowedFd<'_>) -> OwnedFd {
        fd.try_clone_to_owned().unwrap()
    }

    #[test]
    fn creator_and_server_share_bytes() {
        let created = SharedMemory::create("pegaflow-test", 4096).unwrap();
        let server = SharedMemory::from_fd(dup(created.fd().unwrap()), 4096, u64::MAX).unwrap();
        // (The mapping counters are process-wide and other tests map concurrently: the
        // end-to-end tests check them through the server's metrics.)
        assert!(client_mappings() >= 1 && client_mapped_bytes() >= 4096);
        assert_eq!(server.len(), 4096);
        assert!(server.fd().is_none(), "the server keeps no descriptor");
        // SAFETY: byte 10 is inside both 4096-byte mappings and nothing else touches it.
        unsafe { created.ptr_at(10, 1).unwrap().write(42) };
        // SAFETY: as above.
        assert_eq!(unsafe { server.ptr_at(10, 1).unwrap().read() }, 42);
        assert!(server.ptr_at(4096, 1).is_none());
        assert!(matches!(
            SharedMemory::from_fd(dup(created.fd().unwrap()), 4097, u64::MAX),
            Err(ShmError::TooSmall { .. })
        ));
        assert!(matches!(
            SharedMemory::from_fd(dup(created.fd().unwrap()), 1, 4095),
            Err(ShmError::TooLarge { len: 4096, max: 4095 })
        ));
        // Sealed: the creator itself can no longer shrink it.
        let fd = created.fd().unwrap();
        assert!(nix::unistd::ftruncate(fd, 100).is_err());
        drop(server);
    }

    #[test]
    fn unsealed_read_only_and_non_tmpfs_memory_is_refused() {
        let unsealed = memfd_create("unsealed", MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING).unwrap();
        nix::unistd::ftruncate(&unsealed, 4096).unwrap();
        let sparse = unsealed.try_clone().unwrap();
        assert!(matches!(SharedMemory::from_fd(unsealed, 1, u64::MAX), Err(ShmError::NotSealed)));
        // Sealed but never allocated: mapping it allocates (and accounts) every page now.
        fcntl(&sparse, FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK)).unwrap();
        let mapped = SharedMemory::from_fd(sparse, 1, u64::MAX).unwrap();
        // SAFETY: byte 4095 is inside the 4096-byte mapping and nothing else touches it.
        assert_eq!(unsafe { mapped.ptr_at(4095, 1).unwrap().read() }, 0);

        // A regular file on disk (or /dev/shm via open(2)) cannot carry seals at all.
        let dir = std::env::temp_dir().join(format!("pegaflow-shm-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("file");
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        file.set_len(4096).unwrap();
        let err = SharedMemory::from_fd(OwnedFd::from(file), 1, u64::MAX).unwrap_err();
        assert!(matches!(err, ShmError::Unsupported(_) | ShmError::NotSealed), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();

        let created = SharedMemory::create("ro", 4096).unwrap();
        let ro = nix::fcntl::open(
            format!("/proc/self/fd/{}", created.fd().unwrap().as_raw_fd()).as_str(),
            OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .unwrap();
        assert!(matches!(SharedMemory::from_fd(ro, 1, u64::MAX), Err(ShmError::NotReadWrite)));

        // A pipe is not a memory file.
        let (r, _w) = nix::unistd::pipe().unwrap();
        assert!(matches!(SharedMemory::from_fd(r, 1, u64::MAX), Err(ShmError::Unsupported(_))));
    }
}

//! Shared-memory files under `/dev/shm`: name validation and mapping.
//!
//! Clients name a file; the server only ever opens `/dev/shm/<name>` with a validated
//! name, checks its size before mapping (a short file would SIGBUS on access), and
//! never creates or unlinks client files.

use std::fs::{File, OpenOptions};
use std::path::PathBuf;
use std::ptr::NonNull;

use memmap2::{MmapMut, MmapOptions};

/// Directory holding shared-memory files.
pub const SHM_DIR: &str = "/dev/shm";
const MAX_NAME_LEN: usize = 200;

/// Why a shared-memory file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    /// The name is empty, too long, or has characters other than `[A-Za-z0-9._-]`.
    #[error("invalid shared-memory name {0:?}: use 1-200 characters of [A-Za-z0-9._-], not starting with '.'")]
    InvalidName(String),
    /// No such file.
    #[error("shared-memory file {0:?} does not exist")]
    NotFound(String),
    /// The file is shorter than required.
    #[error("shared-memory file {name:?} has {len} bytes, need at least {min}")]
    TooSmall {
        /// The file.
        name: String,
        /// Its size.
        len: u64,
        /// The size required.
        min: u64,
    },
    /// Any other OS failure.
    #[error("shared-memory file {name:?}: {source}")]
    Io {
        /// The file.
        name: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Checks a client-supplied name and returns its path.
pub fn shm_path(name: &str) -> Result<PathBuf, ShmError> {
    let valid = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !valid {
        return Err(ShmError::InvalidName(name.to_owned()));
    }
    Ok(PathBuf::from(SHM_DIR).join(name))
}

/// A read-write mapping of a whole shared-memory file.
pub struct ShmMapping {
    name: String,
    base: NonNull<u8>,
    len: u64,
    file: File,
    _map: MmapMut,
}

// SAFETY: the mapping is plain shared bytes; callers coordinate access to ranges.
unsafe impl Send for ShmMapping {}
// SAFETY: as above; only raw pointers are handed out.
unsafe impl Sync for ShmMapping {}

impl ShmMapping {
    /// Maps an existing file of at least `min_len` bytes.
    pub fn open(name: &str, min_len: u64) -> Result<Self, ShmError> {
        let path = shm_path(name)?;
        let io = |source: std::io::Error| ShmError::Io { name: name.to_owned(), source };
        let file = OpenOptions::new().read(true).write(true).open(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound { ShmError::NotFound(name.to_owned()) } else { io(e) }
        })?;
        Self::map(name, file, min_len)
    }

    /// Creates a new file of `len` bytes (fails if it exists) and maps it.
    pub fn create(name: &str, len: u64) -> Result<Self, ShmError> {
        let path = shm_path(name)?;
        let io = |source: std::io::Error| ShmError::Io { name: name.to_owned(), source };
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(&path).map_err(io)?;
        if let Err(e) = file.set_len(len) {
            let _ = std::fs::remove_file(&path);
            return Err(io(e));
        }
        Self::map(name, file, len)
    }

    fn map(name: &str, file: File, min_len: u64) -> Result<Self, ShmError> {
        let io = |source: std::io::Error| ShmError::Io { name: name.to_owned(), source };
        let len = file.metadata().map_err(io)?.len();
        if len < min_len.max(1) {
            return Err(ShmError::TooSmall { name: name.to_owned(), len, min: min_len.max(1) });
        }
        // SAFETY: the file is a shared-memory object whose size was checked above; other
        // processes may write it concurrently, which is why only raw pointers leave here.
        let mut map = unsafe { MmapOptions::new().map_mut(&file) }.map_err(io)?;
        let base =
            NonNull::new(map.as_mut_ptr()).ok_or_else(|| io(std::io::Error::other("mmap returned a null pointer")))?;
        Ok(Self { name: name.to_owned(), base, len, file, _map: map })
    }

    /// Fails unless the file still holds every mapped byte.
    ///
    /// Touching a mapped page past the end of a file that was shrunk after mapping raises
    /// SIGBUS, so copies check this first. A client that shrinks the file *during* a copy
    /// can still fault the server; clients must not resize registered files.
    pub fn check_intact(&self) -> Result<(), ShmError> {
        let len = self.file.metadata().map_err(|source| ShmError::Io { name: self.name.clone(), source })?.len();
        if len < self.len {
            return Err(ShmError::TooSmall { name: self.name.clone(), len, min: self.len });
        }
        Ok(())
    }

    /// The file's name under `/dev/shm`.
    pub fn name(&self) -> &str {
        &self.name
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

/// Removes `/dev/shm/<name>`; a missing file is not an error.
pub fn unlink(name: &str) -> Result<(), ShmError> {
    let path = shm_path(name)?;
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ShmError::Io { name: name.to_owned(), source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_names() {
        assert!(shm_path("pegaflow-kv_1.a").is_ok());
        for bad in ["", ".hidden", "a/b", "../x", "sp ace", &"x".repeat(201)] {
            assert!(matches!(shm_path(bad), Err(ShmError::InvalidName(_))), "{bad}");
        }
    }

    #[test]
    fn create_open_and_size_checks() {
        let name = format!("pegaflow-test-{}", uuid::Uuid::new_v4().simple());
        let created = ShmMapping::create(&name, 4096).unwrap();
        assert!(ShmMapping::create(&name, 4096).is_err(), "create must not reuse a file");
        let opened = ShmMapping::open(&name, 4096).unwrap();
        assert_eq!(opened.len(), 4096);
        assert!(matches!(ShmMapping::open(&name, 4097), Err(ShmError::TooSmall { .. })));
        // Both mappings see the same bytes.
        // SAFETY: byte 10 is inside both 4096-byte mappings and nothing else touches it.
        unsafe { created.ptr_at(10, 1).unwrap().write(42) };
        // SAFETY: as above.
        assert_eq!(unsafe { opened.ptr_at(10, 1).unwrap().read() }, 42);
        assert!(opened.ptr_at(4096, 1).is_none());
        opened.check_intact().unwrap();
        std::fs::OpenOptions::new().write(true).open(shm_path(&name).unwrap()).unwrap().set_len(100).unwrap();
        assert!(matches!(opened.check_intact(), Err(ShmError::TooSmall { len: 100, .. })));
        unlink(&name).unwrap();
        assert!(matches!(ShmMapping::open(&name, 1), Err(ShmError::NotFound(_))));
        unlink(&name).unwrap();
    }
}

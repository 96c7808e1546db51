//! The Unix socket's file: a directory nobody else controls, a stale socket replaced, a
//! live one never stolen, mode 0660.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;

use tokio::net::UnixListener;

/// Binds the Unix socket at `path` (mode 0660: the server's user and group may connect).
pub fn bind_unix(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        prepare_dir(dir)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() || !is_socket(&meta) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket: not replacing it", path.display()),
            ));
        }
        Ok(_) => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!("another server listens on {}", path.display()),
                ));
            }
            std::fs::remove_file(path)?; // left behind by a server that died
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(listener)
}

/// Removes the socket file at shutdown (only if it is still a socket).
pub fn remove_socket(path: &Path) {
    if std::fs::symlink_metadata(path).is_ok_and(|m| is_socket(&m)) {
        let _ = std::fs::remove_file(path);
    }
}

fn is_socket(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::FileTypeExt;
    meta.file_type().is_socket()
}

/// Creates `dir` (0755) if missing; refuses one that another user owns or anyone else may
/// write to (someone could swap the socket for theirs).
fn prepare_dir(dir: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new().recursive(true).mode(0o755).create(dir)?;
            Ok(())
        }
        Err(e) => Err(e),
        Ok(meta) => {
            let me = nix::unistd::geteuid().as_raw();
            let sticky_shared = meta.mode() & 0o1000 != 0; // like /tmp: others cannot replace our file
            if meta.file_type().is_symlink() || !meta.is_dir() {
                return Err(refused(dir, "is not a directory"));
            }
            if meta.uid() != me && meta.uid() != 0 {
                return Err(refused(dir, "belongs to another user"));
            }
            if meta.mode() & 0o022 != 0 && !sticky_shared {
                return Err(refused(dir, "is writable by other users"));
            }
            Ok(())
        }
    }
}

fn refused(dir: &Path, why: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::PermissionDenied, format!("socket directory {} {why}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn binds_replaces_stale_sockets_and_never_steals_live_ones() {
        let dir = std::env::temp_dir().join(format!("pegaflow-uds-test-{}", std::process::id()));
        let path = dir.join("nested").join("s.sock");
        let listener = bind_unix(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        assert_eq!(bind_unix(&path).unwrap_err().kind(), std::io::ErrorKind::AddrInUse);
        drop(listener); // the file stays behind, like after a crash
        let again = bind_unix(&path).unwrap();
        drop(again);
        remove_socket(&path);
        assert!(!path.exists());
        // A regular file (or a link) in its place is never replaced.
        std::fs::write(&path, b"data").unwrap();
        assert_eq!(bind_unix(&path).unwrap_err().kind(), std::io::ErrorKind::AlreadyExists);
        std::fs::remove_file(&path).unwrap();
        // A directory anyone may write to is refused.
        let open = dir.join("open");
        std::fs::create_dir_all(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert_eq!(bind_unix(&open.join("s.sock")).unwrap_err().kind(), std::io::ErrorKind::PermissionDenied);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! One relay per spool. Two relays on one spool would each deliver (and recycle) the other's
//! messages, so the spool folder is locked for as long as a [`Spool`](super::Spool) is open:
//! an exclusive lock (`flock`, through `File::try_lock`) on `<dir>/lock`, which also holds the owner's PID for the message the
//! second relay prints. The kernel drops the lock when the process ends, however it ends, so a
//! stale lock file never keeps a relay from starting.

use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The spool folder is locked by another process.
#[derive(Debug, thiserror::Error)]
#[error("{} is in use by another exorelay process{}; stop it first, or give this relay its own [queue] dir", dir.display(), pid.map(|p| format!(" (PID {p})")).unwrap_or_default())]
pub struct Locked {
    pub dir: PathBuf,
    /// The PID the lock file names, when it could be read.
    pub pid: Option<u32>,
}

/// Why the spool could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Locked(#[from] Locked),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Holds the lock until dropped.
#[derive(Debug)]
pub struct SpoolLock {
    _file: std::fs::File,
}

impl SpoolLock {
    /// Locks the spool at `root` (which must exist) for this process and records its PID.
    pub fn acquire(root: &Path) -> Result<SpoolLock, OpenError> {
        let path = root.join("lock");
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                return Err(Locked {
                    dir: root.to_path_buf(),
                    pid: text.trim().parse().ok(),
                }
                .into());
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(io::Error::new(e.kind(), format!("{}: {e}", path.display())).into());
            }
        }
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        file.set_len(0)?;
        file.rewind()?;
        writeln!(file, "{}", std::process::id())?;
        Ok(SpoolLock { _file: file })
    }

    /// Fails with [`Locked`] if another process holds the spool at `root` now; takes nothing.
    /// For a relay to say so before it binds its ports (the real lock is taken by `Spool::open`).
    pub fn probe(root: &Path) -> Result<(), OpenError> {
        if !root.join("lock").exists() {
            return Ok(());
        }
        Self::acquire(root).map(drop)
    }
}

//! The refresh token of a delegated account, kept in `<state_dir>/<account>.refresh-token`.
//!
//! Contract:
//! - the file is JSON ([`Grant`]): the refresh token, when it was obtained, and who signed in
//!   when that is known. It is created with mode 0600 (open with the mode, never chmod after),
//!   and its folder with 0700 when this module creates it;
//! - [`TokenStore::save`] is atomic: a temporary file in the same folder is written and
//!   fsynced, renamed over the old file, and the folder is fsynced. A crash leaves the old
//!   grant or the new one, never a torn file. Entra rotates the refresh token on every use, so
//!   the caller saves the newest one *before* it uses the access token that came with it;
//! - [`TokenStore::save_rotation`] saves a rotated token only while the file still holds the
//!   token it replaces: an `exorelay login` that wrote a newer sign-in in the meantime is kept
//!   (the relay's refresh of the older grant must not overwrite it);
//! - [`TokenStore::load`] reads the file on every call (a fresh `exorelay login` is picked up by
//!   a running relay); a missing file is `Ok(None)` (never signed in), not an error;
//! - the token never appears in `Debug` output, errors or logs.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// What a sign-in left behind.
#[derive(Clone, Serialize, Deserialize)]
pub struct Grant {
    pub refresh_token: String,
    /// When this refresh token was issued to us (a sign-in or the last rotation).
    pub obtained_at: DateTime<Utc>,
    /// Who signed in (`upn` or `preferred_username` of the access token), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

impl fmt::Debug for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Grant")
            .field("obtained_at", &self.obtained_at)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a token file written by exorelay login ({why})")]
    Corrupt { path: String, why: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

/// One account's token file.
#[derive(Debug, Clone)]
pub struct TokenStore {
    path: PathBuf,
}

impl TokenStore {
    pub fn new(path: impl Into<PathBuf>) -> TokenStore {
        TokenStore { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stored grant; `None` when nobody has signed in yet.
    pub fn load(&self) -> Result<Option<Grant>, StoreError> {
        let shown = self.path.display().to_string();
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StoreError::Read {
                    path: shown,
                    source,
                });
            }
        };
        // Only the kind and position of the problem: serde_json's message can quote a value,
        // and the value may be a token.
        let grant: Grant = serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
            path: shown.clone(),
            why: format!(
                "{:?} error at line {} column {}",
                e.classify(),
                e.line(),
                e.column()
            ),
        })?;
        if grant.refresh_token.is_empty() {
            return Err(StoreError::Corrupt {
                path: shown,
                why: "empty refresh_token".into(),
            });
        }
        Ok(Some(grant))
    }

    /// Saves `rotated` if the file still holds `replaced` (the refresh token it was obtained
    /// with); `Ok(false)` when a newer sign-in is in the file, which is then left alone.
    /// The check and the write hold the file's lock, so a sign-in written by `exorelay login`
    /// cannot land between them and be overwritten.
    pub fn save_rotation(&self, replaced: &str, rotated: &Grant) -> Result<bool, StoreError> {
        let _lock = self.lock()?;
        if let Ok(Some(current)) = self.load()
            && current.refresh_token != replaced
        {
            return Ok(false);
        }
        self.write(rotated).map(|()| true)
    }

    /// Replaces the stored grant atomically (temp file, fsync, rename, fsync of the folder).
    pub fn save(&self, grant: &Grant) -> Result<(), StoreError> {
        let _lock = self.lock()?;
        self.write(grant)
    }

    /// An exclusive `flock` on `.<name>.lock` beside the file, held until dropped: the relay's
    /// rotation and `exorelay login` (other processes) take turns.
    fn lock(&self) -> Result<std::fs::File, StoreError> {
        use std::os::fd::AsRawFd;
        let err = |source| StoreError::Write {
            path: self.path.display().to_string(),
            source,
        };
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(err)?;
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(dir.join(format!(".{name}.lock")))
            .map_err(err)?;
        // SAFETY: flock on a descriptor this function owns; the lock ends when `file` closes.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        Ok(file)
    }

    fn write(&self, grant: &Grant) -> Result<(), StoreError> {
        let err = |source| StoreError::Write {
            path: self.path.display().to_string(),
            source,
        };
        let mut body =
            serde_json::to_vec_pretty(grant).map_err(|e| err(std::io::Error::other(e)))?;
        body.push(b'\n');
        write_private(&self.path, &body).map_err(err)?;
        // `exorelay login` and `doctor` run as root write files the relay must still read.
        self.hand_to_relay_user();
        Ok(())
    }
}

impl TokenStore {
    /// Run as root (`sudo exorelay login`), the file and its folder would be root's and the
    /// relay, running as its own user, could not read them. So they are given to the owner of
    /// the folder above the state folder (`/var/lib/exorelay` belongs to the relay's user),
    /// unless that is root too. Best effort: a failure leaves root's files, which the relay
    /// reports as unreadable with the path.
    pub fn hand_to_relay_user(&self) {
        use std::os::unix::fs::MetadataExt;
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        let Some(dir) = self.path.parent() else {
            return;
        };
        let Some(owner) = std::path::absolute(dir)
            .ok()
            .and_then(|d| d.parent().map(Path::to_path_buf))
            .and_then(|p| std::fs::metadata(p).ok())
        else {
            return;
        };
        if owner.uid() == 0 {
            return;
        }
        for p in [dir, self.path.as_path()] {
            if let Err(e) = std::os::unix::fs::chown(p, Some(owner.uid()), Some(owner.gid())) {
                tracing::warn!(path = %p.display(), error = %e, "cannot give the sign-in file to the relay's user");
            }
        }
    }
}

/// Removes temporary files a crash left in the state folder (they may hold a refresh token).
/// Called at start, before anything writes there.
pub fn remove_stale_temps(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && name.ends_with(".tmp") {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Replaces `path` with `body` atomically and durably: a 0600 temp file beside it (created with
/// that mode, never widened), fsync, rename, fsync of the folder (created 0700 if missing).
/// A crash leaves either the old file or the new one, never a mix.
pub fn write_private(path: &Path, body: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{:016x}.tmp", fastrand::u64(..)));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(body)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(&dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn save_is_private_and_load_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::new(dir.path().join("state/contoso.refresh-token"));
        assert!(
            store.load().unwrap().is_none(),
            "missing file = not signed in"
        );
        let grant = Grant {
            refresh_token: "rt-one".into(),
            obtained_at: Utc::now(),
            user: Some("relay@contoso.com".into()),
        };
        store.save(&grant).unwrap();
        let mode = std::fs::metadata(store.path())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let dir_mode = std::fs::metadata(dir.path().join("state"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dir_mode, 0o700);
        store
            .save(&Grant {
                refresh_token: "rt-two".into(),
                ..grant
            })
            .unwrap();
        let back = store.load().unwrap().unwrap();
        assert_eq!(back.refresh_token, "rt-two", "the newest token is kept");
        assert_eq!(back.user.as_deref(), Some("relay@contoso.com"));
        assert!(!format!("{back:?}").contains("rt-two"));
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("state"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.ends_with(".lock"))
            .collect();
        assert_eq!(leftovers.len(), 1, "no temporary files left: {leftovers:?}");
    }

    #[test]
    fn a_rotation_never_overwrites_a_newer_sign_in() {
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::new(dir.path().join("a.refresh-token"));
        let grant = |t: &str| Grant {
            refresh_token: t.into(),
            obtained_at: Utc::now(),
            user: None,
        };
        store.save(&grant("old")).unwrap();
        assert!(store.save_rotation("old", &grant("rotated")).unwrap());
        assert_eq!(store.load().unwrap().unwrap().refresh_token, "rotated");
        // exorelay login wrote a new sign-in while a refresh of "rotated" was in the air.
        store.save(&grant("new-login")).unwrap();
        assert!(
            !store
                .save_rotation("rotated", &grant("rotated-again"))
                .unwrap()
        );
        assert_eq!(store.load().unwrap().unwrap().refresh_token, "new-login");
    }

    #[test]
    fn corrupt_file_is_an_error_that_does_not_quote_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.refresh-token");
        for text in [
            "secret-garbage",
            "\"secret-garbage\"",
            "{\"refresh_token\": [\"secret-garbage\"]}",
        ] {
            std::fs::write(&path, text).unwrap();
            let e = TokenStore::new(&path).load().unwrap_err().to_string();
            assert!(e.contains("not a token file"), "{e}");
            assert!(!e.contains("secret-garbage"), "{e}");
        }
    }

    /// `sudo exorelay login` leaves files the relay's user owns (the owner of the folder above
    /// the state folder), not root's.
    #[test]
    fn root_hands_the_sign_in_to_the_relay_user() {
        use std::os::unix::fs::MetadataExt;
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("var-lib-exorelay");
        std::fs::create_dir(&home).unwrap();
        std::os::unix::fs::chown(&home, Some(4321), Some(4322)).unwrap();
        let store = TokenStore::new(home.join("state/frontdesk.refresh-token"));
        store
            .save(&Grant {
                refresh_token: "rt".into(),
                obtained_at: Utc::now(),
                user: None,
            })
            .unwrap();
        for p in [home.join("state"), store.path().to_path_buf()] {
            let m = std::fs::metadata(&p).unwrap();
            assert_eq!((m.uid(), m.gid()), (4321, 4322), "{}", p.display());
        }
    }

    /// While the relay holds the lock between its check and its write, a sign-in written by
    /// another process waits; and stale temporary files are cleaned at start.
    #[test]
    fn a_sign_in_waits_for_a_rotation_in_progress() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/frontdesk.refresh-token");
        let grant = |t: &str| Grant {
            refresh_token: t.into(),
            obtained_at: Utc::now(),
            user: None,
        };
        TokenStore::new(&path).save(&grant("old")).unwrap();
        let held = TokenStore::new(&path).lock().unwrap();
        let p = path.clone();
        let login = std::thread::spawn(move || TokenStore::new(&p).save(&grant("new")));
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(
            !login.is_finished(),
            "the sign-in did not wait for the lock"
        );
        // The relay's rotation of "old" would be written here, under the lock.
        drop(held);
        login.join().unwrap().unwrap();
        let kept = TokenStore::new(&path).load().unwrap().unwrap();
        assert_eq!(kept.refresh_token, "new");
        // A later rotation of the older grant does not overwrite the new sign-in.
        assert!(
            !TokenStore::new(&path)
                .save_rotation("old", &grant("old-2"))
                .unwrap()
        );

        std::fs::write(
            path.parent()
                .unwrap()
                .join(".frontdesk.refresh-token.1234.tmp"),
            "rt",
        )
        .unwrap();
        remove_stale_temps(path.parent().unwrap());
        let left: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
}

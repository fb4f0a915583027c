//! The pool of spare `tmp/spare-N` files.
//!
//! Files are recycled rather than created and deleted: a delivered message's two files are
//! renamed back into `tmp/` and reused for the next message. Creating and deleting an inode per
//! file is the most expensive thing a busy spool does (on ext4 without a journal each new inode
//! scans every inode freed in the last half minute), and a message's whole life then touches no
//! inode allocator at all. At most [`MAX_SPARES`] spare files are kept. A small spare keeps its
//! old bytes and is overwritten in place (emptying and refilling a file frees and reallocates
//! its disk blocks every time); the next writer cuts it to its own length before the fsync.
//!
//! Durable removal: a file taken out of a message area is *reclaimed* (renamed into `tmp/`) but
//! not handed out again until that rename is durable, i.e. until the folder it left has been
//! fsynced after it. Otherwise a power cut could bring back `queue/A.eml` naming an inode that
//! meanwhile holds message B's bytes, and A's recipients would get B. Reclaimed files wait in a
//! `pending` list; the publisher releases the ones from `queue/` with the directory fsync it
//! does for each commit batch anyway (so the hot path pays no extra fsync), and a writer that
//! finds no free spare settles the whole list itself with one fsync per folder. Large files are
//! emptied only when released, for the same reason. (`tmp/` itself needs no fsync: if the new
//! name is lost in a crash, the inode is lost too, never shared.)
//!
//! Contract: a file in the free list is not part of any message, not even after a crash (it is
//! empty or holds at most [`KEEP_STALE`] stale bytes, its length recorded here); `take` hands it
//! to exactly one writer, which writes from the start and cuts the file to its own length before
//! fsyncing it; whatever file is in `tmp/` at startup was never acknowledged.

use std::collections::BTreeSet;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// How many emptied files the spool keeps for reuse: enough for a backlog of 4,096 messages
/// (two files each) to drain without deleting an inode. Deleting is what makes creating
/// expensive later (ext4 without a journal skips every inode freed in the last minute or more),
/// and a spare costs only an empty inode and 8 bytes here.
pub const MAX_SPARES: usize = 8192;

/// Spare files up to this size keep their stale bytes; larger ones are emptied, so that a
/// delivered 20 MB message gives its disk space back.
pub(super) const KEEP_STALE: u64 = 64 * 1024;

/// Mode of every file in the spool, whatever the umask.
pub(super) const FILE_MODE: u32 = 0o600;

/// A file renamed into `tmp/` whose removal from `from` is not durable yet.
pub(super) struct Reclaimed {
    n: u64,
    len: io::Result<u64>,
    from: PathBuf,
}

pub(super) struct Spares {
    tmp: PathBuf,
    /// (N, stale length) of the spare `spare-N` files ready for reuse.
    free: Mutex<Vec<(u64, u64)>>,
    /// Reclaimed files waiting for their removal to become durable.
    pending: Mutex<Vec<Reclaimed>>,
    pub(super) next: AtomicU64,
    /// Held while creating a file: creating takes `tmp/`'s directory lock, and many threads
    /// creating at once spin on that lock in the kernel (a third of the relay's CPU when a burst
    /// outgrows the pool); waiting here sleeps instead.
    create: Mutex<()>,
    /// Held by the one writer settling the pending files; the others wait for its release.
    settling: Mutex<()>,
}

impl Spares {
    pub(super) fn new(tmp: PathBuf) -> Spares {
        Spares {
            tmp,
            free: Mutex::new(Vec::new()),
            pending: Mutex::new(Vec::new()),
            next: AtomicU64::new(0),
            create: Mutex::new(()),
            settling: Mutex::new(()),
        }
    }

    /// How many files wait in the free list.
    pub(super) fn free_len(&self) -> usize {
        self.free.lock().map(|f| f.len()).unwrap_or(0)
    }

    /// How many files wait in `tmp/` for reuse: free, or reclaimed and waiting to be released.
    pub(super) fn kept_len(&self) -> usize {
        self.free_len() + self.pending.lock().map(|p| p.len()).unwrap_or(0)
    }

    fn name(&self) -> (u64, PathBuf) {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        (n, self.path(n))
    }

    fn path(&self, n: u64) -> PathBuf {
        self.tmp.join(format!("spare-{n}"))
    }

    fn take(&self) -> Option<(PathBuf, u64)> {
        let (n, stale) = self.free.lock().ok()?.pop()?;
        Some((self.path(n), stale))
    }

    /// N of a `tmp/spare-N` path.
    fn number(path: &Path) -> Option<u64> {
        path.file_name()?
            .to_str()?
            .strip_prefix("spare-")?
            .parse()
            .ok()
    }

    /// A file to write from its start, open for writing, with the length of its stale bytes:
    /// a spare one when there is one, else a new one (stale length 0).
    pub(super) fn open(&self) -> io::Result<(PathBuf, std::fs::File, u64)> {
        loop {
            while let Some((path, stale)) = self.take() {
                // A spare that cannot be opened (removed by hand) is forgotten; the next is tried.
                if let Ok(f) = std::fs::OpenOptions::new().write(true).open(&path) {
                    return Ok((path, f, stale));
                }
            }
            // No free spare: settle the reclaimed ones (one fsync per folder they left) rather
            // than allocate an inode, unless there are none or settling fails. One thread
            // settles; the others wait for it (one fsync) and take what it released, which is
            // cheaper than creating files (see the module header).
            let _settling = self.settling.lock();
            if self.free_len() > 0 {
                continue;
            }
            if self.settle().unwrap_or(0) == 0 {
                break;
            }
        }
        let _one_at_a_time = self.create.lock();
        loop {
            let (_, path) = self.name();
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(FILE_MODE)
                .open(&path)
            {
                Ok(f) => {
                    // The umask may have taken bits away from the mode asked for.
                    f.set_permissions(std::fs::Permissions::from_mode(FILE_MODE))?;
                    return Ok((path, f, 0));
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Keeps `path` (a file in `tmp/` that is part of no message, even after a crash) for reuse,
    /// emptying it when it is large, or removes it when the pool is full or it cannot be handled.
    /// Never fails: a file it cannot handle is removed at startup.
    pub(super) fn recycle(&self, path: PathBuf) {
        let len = std::fs::metadata(&path).map(|m| m.len());
        self.keep(path, len);
    }

    /// `recycle` for a file whose length the caller knows.
    pub(super) fn keep(&self, path: PathBuf, len: io::Result<u64>) {
        let stale = len.and_then(|len| {
            if len <= KEEP_STALE {
                return Ok(len);
            }
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|f| f.set_len(0))
                .map(|()| 0)
        });
        if let (Ok(stale), Some(n), Ok(mut free)) = (stale, Self::number(&path), self.free.lock())
            && free.len() < MAX_SPARES
        {
            free.push((n, stale));
            return;
        }
        let _ = std::fs::remove_file(&path);
    }

    /// Takes `path` (a file of a message in some area) out of its area into `tmp/`, where it
    /// waits until its removal is durable (see the module header). Fails like `rename`,
    /// leaving the file where it was.
    pub(super) fn reclaim(&self, path: &Path) -> io::Result<()> {
        let (n, spare) = self.name();
        std::fs::rename(path, &spare)?;
        let from = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let len = std::fs::metadata(&spare).map(|m| m.len());
        match self.pending.lock() {
            Ok(mut pending) => pending.push(Reclaimed { n, len, from }),
            // Cannot track it: better an inode freed than one reused too early.
            Err(_) => {
                let _ = std::fs::remove_file(&spare);
            }
        }
        Ok(())
    }

    /// The reclaimed files that left `dir`, taken out of the pending list. The caller fsyncs
    /// `dir` *after* this call and then hands them to [`release`](Self::release), or gives them
    /// back with [`unsettled`](Self::unsettled) when the fsync fails.
    pub(super) fn pending_from(&self, dir: &Path) -> Vec<Reclaimed> {
        let Ok(mut pending) = self.pending.lock() else {
            return Vec::new();
        };
        let (mine, rest) = std::mem::take(&mut *pending)
            .into_iter()
            .partition(|r| r.from == dir);
        *pending = rest;
        mine
    }

    /// Reclaimed files whose removal is durable now: into the free list.
    pub(super) fn release(&self, batch: Vec<Reclaimed>) {
        for r in batch {
            self.keep(self.path(r.n), r.len);
        }
    }

    /// Reclaimed files whose removal could not be made durable: back to the pending list.
    pub(super) fn unsettled(&self, batch: Vec<Reclaimed>) {
        match self.pending.lock() {
            Ok(mut pending) => pending.extend(batch),
            Err(_) => {
                for r in batch {
                    let _ = std::fs::remove_file(self.path(r.n));
                }
            }
        }
    }

    /// Makes every pending removal durable (one fsync per folder) and releases those files.
    /// Returns how many were released.
    pub(super) fn settle(&self) -> io::Result<usize> {
        let batch = match self.pending.lock() {
            Ok(mut pending) => std::mem::take(&mut *pending),
            Err(_) => return Ok(0),
        };
        if batch.is_empty() {
            return Ok(0);
        }
        let dirs: BTreeSet<PathBuf> = batch.iter().map(|r| r.from.clone()).collect();
        for dir in dirs {
            if let Err(e) = super::fsync_dir(&dir) {
                self.unsettled(batch);
                return Err(e);
            }
        }
        let n = batch.len();
        self.release(batch);
        Ok(n)
    }

    /// Writes `bytes` as a file's whole content and fsyncs it; returns its path in `tmp/`.
    pub(super) fn write_synced(&self, bytes: &[u8]) -> io::Result<PathBuf> {
        let (path, mut f, stale) = self.open()?;
        match f
            .write_all(bytes)
            .and_then(|_| finish(&f, bytes.len() as u64, stale))
        {
            Ok(()) => Ok(path),
            Err(e) => {
                drop(f);
                self.recycle(path);
                Err(e)
            }
        }
    }
}

/// Cuts a file written from its start to `len` bytes when stale bytes lie beyond, then fsyncs it.
pub(super) fn finish(f: &std::fs::File, len: u64, stale: u64) -> io::Result<()> {
    if stale > len {
        f.set_len(len)?;
    }
    f.sync_all()
}

//! The durable spool: one `<ID>.eml` body and one `<ID>.json` meta file per message.
//!
//! Layout under `[queue] dir` (folders mode 0700, files 0600, whatever the umask):
//! - `lock`     held (`flock`) by the one relay using this spool, and naming its PID;
//! - `tmp/`     `spare-N` files: being written, or kept for reuse (`spares.rs`); at startup
//!   every one becomes a spare, since nothing in `tmp/` was ever acknowledged;
//! - `queue/`   committed messages waiting for delivery;
//! - `hold/`    messages an administrator put on hold (not delivered until released);
//! - `failed/`  messages given up on, kept for the administrator;
//! - `deleted/` messages an administrator deleted, kept `keep_deleted` from their deletion (the
//!   meta records when) so a slip is recoverable, then pruned with a log line;
//! - `corrupt/` what recovery could not read and every message whose body failed its
//!   length/CRC32C check (`check.rs`), quarantined with a loud log line, never deleted, never sent.
//!
//! Moving a message between areas renames the meta first, then the body. Recovery
//! (`recover.rs`) treats the meta as the authority: a body whose meta sits in another area is
//! moved to it.
//!
//! Commit protocol (the only way a message enters `queue/`):
//! 1. the body is streamed into a `tmp/` file, its length and CRC32C counted, and fsynced;
//! 2. the meta, recording that length and CRC, is written to another `tmp/` file and fsynced;
//! 3. the body is renamed into `queue/<ID>.eml`, then the meta (the meta is the commit marker);
//! 4. `queue/` itself is fsynced;
//! 5. only then may the SMTP session answer `250 ... queued as <ID>`.
//!
//! Steps 1-2 are `writer.rs`; steps 3-5 are group-committed by one thread (`publisher.rs`).
//! Files are recycled through a pool of spares (`spares.rs`); a file leaves a message area for
//! the pool at once, but is handed out again only after its removal is durable, so no crash can
//! leave a queued name on another message's bytes. The CRC is the second line of defence:
//! recovery and every delivery attempt ([`Spool::verify`]) check the body before any byte of it
//! goes upstream.

pub mod check;
mod ids;
pub mod lock;
pub mod meta;
mod publisher;
mod recover;
mod spares;
mod writer;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use publisher::{PublishRequest, publisher};
use spares::Spares;

pub use check::{Corruption, VerifyError};
pub use ids::{id_time, is_queue_id, new_queue_id};
pub use lock::{Locked, OpenError, SpoolLock};
pub use meta::{Client, Meta, Recipient, RecipientStatus};
pub use spares::MAX_SPARES;
pub use writer::MessageWriter;

/// Why a spool operation failed, in terms an SMTP reply can use.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("the spool holds {0} messages, its configured maximum")]
    Full(usize),
    #[error("the disk holding the spool is full")]
    NoSpace,
    #[error("spool I/O error: {0}")]
    Io(#[from] io::Error),
}

impl SpoolError {
    fn from_io(e: io::Error) -> SpoolError {
        match e.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => SpoolError::NoSpace,
            _ => SpoolError::Io(e),
        }
    }
}

/// What recovery found at startup.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Committed messages, oldest first.
    pub messages: Vec<Meta>,
    /// Bodies without a meta removed from `queue/` (never acknowledged to a client). Half-written
    /// files in `tmp/` are not counted: they look like the spare files kept there.
    pub removed: usize,
    /// Messages or files moved to `corrupt/`: unreadable metas, bodies without a meta outside
    /// `queue/`, and queued bodies that failed their length/CRC32C check.
    pub quarantined: usize,
}

/// What a delivery attempt may do with a queued message, by [`Spool::check_before_delivery`].
#[derive(Debug)]
pub enum Checked {
    /// The body is the one its meta describes (or an old meta that cannot tell): send it.
    Sound,
    /// The body did not match; the message is in `corrupt/` now. Never send it.
    Quarantined(Corruption),
    /// The body could not be read now: do not send; try again later.
    Unreadable(io::Error),
}

/// A spool folder a committed message can be in.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Area {
    Queue,
    Hold,
    Failed,
    Deleted,
}

impl Area {
    pub const ALL: [Area; 4] = [Area::Queue, Area::Hold, Area::Failed, Area::Deleted];

    pub fn name(self) -> &'static str {
        match self {
            Area::Queue => "queue",
            Area::Hold => "hold",
            Area::Failed => "failed",
            Area::Deleted => "deleted",
        }
    }
}

pub struct Spool {
    tmp: PathBuf,
    queue: PathBuf,
    hold: PathBuf,
    failed: PathBuf,
    deleted: PathBuf,
    corrupt: PathBuf,
    count: Arc<AtomicUsize>,
    max_messages: usize,
    spares: Arc<Spares>,
    publisher: Mutex<std::sync::mpsc::Sender<PublishRequest>>,
    committed_rx: Mutex<Option<mpsc::UnboundedReceiver<Meta>>>,
    /// Held for as long as the spool is open: one relay per spool.
    _lock: SpoolLock,
}

/// Mode of every folder in the spool, whatever the umask.
const DIR_MODE: u32 = 0o700;

fn fsync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Creates `dir` if needed and gives it `mode` (the umask may have taken bits away).
fn make_dir(dir: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)))
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.display())))
}

impl Spool {
    /// Opens (creating if needed) the spool at `root`, locks it for this process and recovers
    /// what is in it. Fails with [`OpenError::Locked`] when another process has it open.
    pub fn open(root: &Path, max_messages: usize) -> Result<(Spool, Recovered), OpenError> {
        let created = !root.exists();
        make_dir(root, DIR_MODE).or_else(|e| {
            // An existing folder someone else owns keeps its mode; ours below are still 0700.
            if created { Err(e) } else { Ok(()) }
        })?;
        let lock = SpoolLock::acquire(root)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let (ptx, prx) = std::sync::mpsc::channel();
        let count = Arc::new(AtomicUsize::new(0));
        let spares = Arc::new(Spares::new(root.join("tmp")));
        {
            let (queue, count, spares, committed) =
                (root.join("queue"), count.clone(), spares.clone(), tx);
            std::thread::Builder::new()
                .name("spool-commit".into())
                .spawn(move || publisher(prx, queue, count, spares, committed))?;
        }
        let spool = Spool {
            tmp: root.join("tmp"),
            queue: root.join("queue"),
            hold: root.join("hold"),
            failed: root.join("failed"),
            deleted: root.join("deleted"),
            corrupt: root.join("corrupt"),
            count,
            max_messages,
            spares,
            publisher: Mutex::new(ptx),
            committed_rx: Mutex::new(Some(rx)),
            _lock: lock,
        };
        for d in [
            &spool.tmp,
            &spool.queue,
            &spool.hold,
            &spool.failed,
            &spool.deleted,
            &spool.corrupt,
        ] {
            make_dir(d, DIR_MODE)?;
        }
        let recovered = spool.recover()?;
        spool
            .count
            .store(recovered.messages.len(), Ordering::SeqCst);
        Ok((spool, recovered))
    }

    /// The receiver of the metas of messages committed from now on; the forwarder takes it once.
    pub fn take_committed(&self) -> Option<mpsc::UnboundedReceiver<Meta>> {
        self.committed_rx.lock().ok()?.take()
    }

    pub fn len(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// How many files in `tmp/` wait in the pool for reuse (every other file there is being
    /// written right now).
    pub fn spare_files(&self) -> usize {
        self.spares.kept_len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn body_path(&self, id: &str) -> PathBuf {
        self.queue.join(format!("{id}.eml"))
    }

    pub fn failed_dir(&self) -> &Path {
        &self.failed
    }

    pub fn dir(&self, area: Area) -> &Path {
        match area {
            Area::Queue => &self.queue,
            Area::Hold => &self.hold,
            Area::Failed => &self.failed,
            Area::Deleted => &self.deleted,
        }
    }

    /// The area holding this message's meta, if any.
    pub fn locate(&self, id: &str) -> Option<Area> {
        if !is_queue_id(id) {
            return None;
        }
        Area::ALL
            .into_iter()
            .find(|a| self.dir(*a).join(format!("{id}.json")).is_file())
    }

    pub fn load_in(&self, area: Area, id: &str) -> io::Result<Meta> {
        let bytes = std::fs::read(self.dir(area).join(format!("{id}.json")))?;
        Meta::decode(&bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    pub fn body_in(&self, area: Area, id: &str) -> PathBuf {
        self.dir(area).join(format!("{id}.eml"))
    }

    /// IDs of the messages in `area`, oldest first.
    pub fn ids(&self, area: Area) -> io::Result<Vec<String>> {
        let mut ids: Vec<String> = std::fs::read_dir(self.dir(area))?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix(".json"))
                    .map(str::to_string)
            })
            .filter(|id| is_queue_id(id))
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Moves a message between areas (meta first, then body), writing `meta` as its new meta
    /// when given. Keeps the queue count. A message moved to `deleted/` gets its deletion time
    /// recorded in its meta (`deleted_at`): `keep_deleted` counts from there.
    pub fn move_message(
        &self,
        id: &str,
        from: Area,
        to: Area,
        meta: Option<&Meta>,
    ) -> io::Result<()> {
        let (fd, td) = (self.dir(from), self.dir(to));
        let stamped;
        let meta = if to == Area::Deleted {
            let mut m = match meta {
                Some(m) => m.clone(),
                None => self.load_in(from, id)?,
            };
            m.deleted_at = Some(chrono::Utc::now());
            stamped = m;
            Some(&stamped)
        } else if let Some(m) = meta.filter(|m| m.deleted_at.is_some()) {
            // Brought back from deleted/: no longer deleted.
            stamped = Meta {
                deleted_at: None,
                ..m.clone()
            };
            Some(&stamped)
        } else {
            meta
        };
        match meta {
            Some(m) => {
                let tmp = self.spares.write_synced(&m.encode())?;
                std::fs::rename(&tmp, td.join(format!("{id}.json")))?;
                self.spares.reclaim(&fd.join(format!("{id}.json")))?;
            }
            None => std::fs::rename(fd.join(format!("{id}.json")), td.join(format!("{id}.json")))?,
        }
        std::fs::rename(fd.join(format!("{id}.eml")), td.join(format!("{id}.eml")))?;
        fsync_dir(td)?;
        fsync_dir(fd)?;
        if from == Area::Queue && to != Area::Queue {
            self.count.fetch_sub(1, Ordering::SeqCst);
        }
        if to == Area::Queue && from != Area::Queue {
            self.count.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }

    /// Proves the spool can take a file right now (for readiness checks).
    pub fn check_writable(&self) -> Result<(), String> {
        let probe = self.tmp.join(format!("ready-{}", fastrand::u64(..)));
        let r = std::fs::write(&probe, b"ok").map_err(|e| e.to_string());
        let _ = std::fs::remove_file(&probe);
        r
    }

    /// Removes the deleted messages whose deletion is older than `keep`, logging each one.
    /// Returns how many.
    pub fn prune_deleted(&self, keep: std::time::Duration) -> usize {
        self.prune_deleted_at(keep, chrono::Utc::now())
    }

    /// [`prune_deleted`](Self::prune_deleted) as of `now`. A message deleted by a version that
    /// did not record the deletion time is stamped `now` and kept `keep` from here: never pruned
    /// sooner than an administrator could expect.
    pub fn prune_deleted_at(
        &self,
        keep: std::time::Duration,
        now: chrono::DateTime<chrono::Utc>,
    ) -> usize {
        let keep = chrono::Duration::from_std(keep).unwrap_or(chrono::Duration::MAX);
        let mut n = 0;
        for id in self.ids(Area::Deleted).unwrap_or_default() {
            let mut meta = match self.load_in(Area::Deleted, &id) {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(queue_id = %id, error = %e, "spool: cannot read a deleted message's meta; not pruned");
                    continue;
                }
            };
            let Some(deleted_at) = meta.deleted_at else {
                meta.deleted_at = Some(now);
                if let Err(e) = self.rewrite_in(Area::Deleted, &meta) {
                    tracing::warn!(queue_id = %id, error = %e, "spool: cannot record a deleted message's deletion time");
                }
                continue;
            };
            if deleted_at
                .checked_add_signed(keep)
                .is_some_and(|until| until <= now)
            {
                let json = self.deleted.join(format!("{id}.json"));
                match std::fs::remove_file(&json) {
                    Ok(()) => {
                        let _ = std::fs::remove_file(self.deleted.join(format!("{id}.eml")));
                        tracing::info!(queue_id = %id, %deleted_at, "deleted message pruned (keep_deleted has passed)");
                        n += 1;
                    }
                    Err(e) => {
                        tracing::warn!(queue_id = %id, error = %e, "spool: cannot prune a deleted message")
                    }
                }
            }
        }
        n
    }

    /// Starts a new message. Fails with [`SpoolError::Full`] when the spool is at its limit.
    pub async fn create(&self) -> Result<MessageWriter, SpoolError> {
        let n = self.len();
        if n >= self.max_messages {
            return Err(SpoolError::Full(n));
        }
        Ok(MessageWriter::new(new_queue_id(), self.spares.clone()))
    }

    /// Reads the meta of a queued message.
    pub fn load(&self, id: &str) -> io::Result<Meta> {
        let bytes = std::fs::read(self.queue.join(format!("{id}.json")))?;
        Meta::decode(&bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// Replaces the meta of a queued message atomically (after a delivery attempt).
    pub fn update(&self, meta: &Meta) -> io::Result<()> {
        self.rewrite_in(Area::Queue, meta)
    }

    /// Replaces the meta of a message in `area` atomically.
    fn rewrite_in(&self, area: Area, meta: &Meta) -> io::Result<()> {
        let dir = self.dir(area);
        let tmp = self.spares.write_synced(&meta.encode())?;
        std::fs::rename(&tmp, dir.join(format!("{}.json", meta.id)))?;
        fsync_dir(dir)
    }

    /// Removes a delivered message: meta first, so a crash in between leaves an orphan body
    /// that recovery deletes rather than a message delivered twice. Both files go back to the
    /// pool of spare files.
    ///
    /// The removal is not fsynced here: losing it in a crash only means the message is delivered
    /// once more after restart, never lost, and it saves a directory fsync per delivered message
    /// (the next commit batch's fsync of `queue/` makes it durable). The files are handed out
    /// again only after that fsync (see `spares.rs`), so the message's name can never come back
    /// on another message's bytes.
    pub fn remove(&self, id: &str) -> io::Result<()> {
        self.spares
            .reclaim(&self.queue.join(format!("{id}.json")))?;
        let body = self.queue.join(format!("{id}.eml"));
        if self.spares.reclaim(&body).is_err() {
            let _ = std::fs::remove_file(&body);
        }
        self.count.fetch_sub(1, Ordering::SeqCst);
        Ok(())
    }

    /// Moves a message given up on into `failed/` with its final meta.
    pub fn fail(&self, meta: &Meta) -> io::Result<()> {
        let id = &meta.id;
        let tmp = self.spares.write_synced(&meta.encode())?;
        std::fs::rename(&tmp, self.failed.join(format!("{id}.json")))?;
        std::fs::rename(
            self.queue.join(format!("{id}.eml")),
            self.failed.join(format!("{id}.eml")),
        )?;
        fsync_dir(&self.failed)?;
        self.spares
            .reclaim(&self.queue.join(format!("{id}.json")))?;
        self.count.fetch_sub(1, Ordering::SeqCst);
        fsync_dir(&self.queue)
    }

    fn quarantine(&self, area: Area, name: &str) -> io::Result<()> {
        std::fs::rename(self.dir(area).join(name), self.corrupt.join(name))
    }

    /// Checks a queued message's body against the length and CRC32C its meta records (see
    /// `check.rs`): what every delivery attempt runs before any byte goes upstream. Reads the
    /// whole body (from the page cache, for a message just written). Blocking.
    pub fn verify(&self, meta: &Meta) -> Result<(), VerifyError> {
        check::verify_file(&self.body_path(&meta.id), meta.size, meta.crc32c)
    }

    /// Moves a queued message whose body failed [`verify`](Self::verify) into `corrupt/`, with
    /// a loud log line, so it is never delivered; it is kept there for inspection. Blocking.
    pub fn quarantine_corrupt(&self, meta: &Meta, why: &Corruption) -> io::Result<()> {
        let id = &meta.id;
        tracing::error!(queue_id = %id, reason = %why, "spool: message body does not match its meta; moved to corrupt/ and NOT delivered");
        self.quarantine(Area::Queue, &format!("{id}.json"))?;
        self.count.fetch_sub(1, Ordering::SeqCst);
        match self.quarantine(Area::Queue, &format!("{id}.eml")) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        fsync_dir(&self.corrupt)?;
        fsync_dir(&self.queue)
    }

    /// [`verify`](Self::verify) off the async threads, and [`quarantine_corrupt`] when the body
    /// is corrupt: the hook a delivery attempt calls before sending.
    ///
    /// [`quarantine_corrupt`]: Self::quarantine_corrupt
    pub async fn check_before_delivery(self: &Arc<Self>, meta: &Meta) -> Checked {
        let (spool, meta) = (self.clone(), meta.clone());
        tokio::task::spawn_blocking(move || match spool.verify(&meta) {
            Ok(()) => Checked::Sound,
            Err(VerifyError::Corrupt(why)) => match spool.quarantine_corrupt(&meta, &why) {
                Ok(()) => Checked::Quarantined(why),
                Err(e) => Checked::Unreadable(io::Error::new(
                    e.kind(),
                    format!("{why}; and cannot move it to corrupt/: {e}"),
                )),
            },
            Err(VerifyError::Io(e)) => Checked::Unreadable(e),
        })
        .await
        .unwrap_or_else(|e| Checked::Unreadable(io::Error::other(e.to_string())))
    }
}

#[cfg(test)]
mod tests;

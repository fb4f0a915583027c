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
        self.spares.free_len()
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
mod tests {
    use super::spares::KEEP_STALE;
    use super::writer::BUFFER;
    use super::*;
    use std::sync::Arc;

    fn meta() -> Meta {
        Meta {
            version: meta::FORMAT_VERSION,
            id: String::new(),
            received_at: chrono::Utc::now(),
            account: "local".into(),
            mail_from: "a@b".into(),
            recipients: vec![Recipient {
                address: "c@d".into(),
                status: RecipientStatus::Pending,
                attempts: 0,
                last_reply: None,
            }],
            client: Client {
                ip: "127.0.0.1".parse().unwrap(),
                helo: "h".into(),
                login: None,
                tls: false,
            },
            size: 0,
            crc32c: None,
            eight_bit: false,
            smtputf8: false,
            attempts: 0,
            next_attempt_at: None,
            requeued_at: None,
            deleted_at: None,
        }
    }

    #[tokio::test]
    async fn commit_then_recover() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, rec) = Spool::open(dir.path(), 10).unwrap();
        assert!(rec.messages.is_empty());
        let spool = Arc::new(spool);
        let mut w = spool.create().await.unwrap();
        w.write(b"Subject: x\r\n\r\nbody\r\n").await.unwrap();
        let id = w.commit(&spool, meta()).await.unwrap();
        assert_eq!(spool.len(), 1);
        // A half-written message and an orphan body, as a crash would leave them.
        std::fs::write(dir.path().join("tmp").join("spare-77"), b"Subject: half").unwrap();
        std::fs::write(
            dir.path()
                .join("queue")
                .join(format!("{}.eml", new_queue_id())),
            b"x",
        )
        .unwrap();
        // Garbage meta for another message.
        let bad = new_queue_id();
        std::fs::write(dir.path().join("queue").join(format!("{bad}.eml")), b"x").unwrap();
        std::fs::write(
            dir.path().join("queue").join(format!("{bad}.json")),
            b"{garbage",
        )
        .unwrap();
        drop(spool);

        let (spool, rec) = Spool::open(dir.path(), 10).unwrap();
        let spool = Arc::new(spool);
        assert_eq!(rec.messages.len(), 1);
        assert_eq!(rec.messages[0].id, id);
        assert_eq!(rec.messages[0].size, 20);
        assert_eq!(rec.removed, 1);
        assert_eq!(rec.quarantined, 1);
        assert!(
            dir.path()
                .join("corrupt")
                .join(format!("{bad}.json"))
                .exists()
        );
        assert_eq!(
            std::fs::read(spool.body_path(&id)).unwrap(),
            b"Subject: x\r\n\r\nbody\r\n"
        );
        // Only spare files are left in tmp/, and the half-written one is the next to be reused.
        for f in std::fs::read_dir(dir.path().join("tmp")).unwrap() {
            assert!(
                f.unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("spare-")
            );
        }
        let mut w = spool.create().await.unwrap();
        w.write(b"x").await.unwrap();
        let next = w.commit(&spool, meta()).await.unwrap();
        assert_eq!(std::fs::read(spool.body_path(&next)).unwrap(), b"x");
    }

    async fn commit_body(spool: &Arc<Spool>, chunks: &[&[u8]]) -> String {
        let mut w = spool.create().await.unwrap();
        for c in chunks {
            w.write(c).await.unwrap();
        }
        w.commit(spool, meta()).await.unwrap()
    }

    fn spare_lengths(dir: &Path) -> Vec<u64> {
        let mut v: Vec<u64> = std::fs::read_dir(dir.join("tmp"))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .collect();
        v.sort();
        v
    }

    #[tokio::test]
    async fn delivered_files_are_reused_and_cut_to_length() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(Spool::open(dir.path(), 10).unwrap().0);
        let inode = |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
        let long = vec![b'L'; 5000];
        let id = commit_body(&spool, &[&long]).await;
        let body_inode = inode(&spool.body_path(&id));
        spool.remove(&id).unwrap();
        assert_eq!(spool.len(), 0);
        assert_eq!(spool.locate(&id), None);
        // Small spares keep their bytes (no blocks freed and reallocated)...
        let lengths = spare_lengths(dir.path());
        assert_eq!(lengths.len(), 2, "body and meta kept as spares");
        assert_eq!(lengths[1], 5000);
        // ...and the next messages overwrite those same files, cut to their own length.
        let id2 = commit_body(&spool, &[b"Subject: again\r\n", b"\r\nx\r\n"]).await;
        assert_eq!(
            std::fs::read(spool.body_path(&id2)).unwrap(),
            b"Subject: again\r\n\r\nx\r\n"
        );
        let new_inodes = [
            inode(&spool.body_path(&id2)),
            inode(&spool.dir(Area::Queue).join(format!("{id2}.json"))),
        ];
        assert!(
            new_inodes.contains(&body_inode),
            "the delivered body's inode is reused"
        );
        assert!(spare_lengths(dir.path()).is_empty());
        let meta2 = spool.load(&id2).unwrap();
        assert_eq!(meta2.size, 21);
        spool.remove(&id2).unwrap();

        // A large body streams through the file in pieces and is emptied when recycled.
        let chunk: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
        let id3 = commit_body(&spool, &[&chunk, &chunk, b"tail", &chunk[..10]]).await;
        let mut want = [&chunk[..], &chunk[..], b"tail", &chunk[..10]].concat();
        assert_eq!(std::fs::read(spool.body_path(&id3)).unwrap(), want);
        assert_eq!(spool.load(&id3).unwrap().size, want.len() as u64);
        spool.remove(&id3).unwrap();
        // Emptied once its removal is durable (not before: a crash could bring its name back).
        assert!(spare_lengths(dir.path()).iter().any(|l| *l > KEEP_STALE));
        assert_eq!(spool.spares.settle().unwrap(), 2);
        assert!(spare_lengths(dir.path()).iter().all(|l| *l <= KEEP_STALE));
        // A body larger than the buffer written into a spare holding shorter stale bytes.
        want.truncate(BUFFER + 7);
        let id4 = commit_body(&spool, &[&want[..BUFFER - 1], &want[BUFFER - 1..]]).await;
        assert_eq!(std::fs::read(spool.body_path(&id4)).unwrap(), want);
    }

    #[tokio::test]
    async fn aborted_messages_leave_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(Spool::open(dir.path(), 10).unwrap().0);
        let mut small = spool.create().await.unwrap();
        small.write(b"Subject: never\r\n").await.unwrap();
        small.abort().await;
        assert!(
            spare_lengths(dir.path()).is_empty(),
            "a small body never reached a file"
        );
        let mut big = spool.create().await.unwrap();
        big.write(&vec![b'b'; BUFFER + 1]).await.unwrap();
        big.abort().await;
        assert_eq!(
            spare_lengths(dir.path()),
            vec![0],
            "emptied and kept as a spare"
        );
        assert!(spool.ids(Area::Queue).unwrap().is_empty());
    }

    /// A fresh spool in a temporary folder holding one committed message.
    async fn spool_with_one_message() -> (tempfile::TempDir, Arc<Spool>, String) {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(dir.path(), 10).unwrap();
        let spool = Arc::new(spool);
        let w = spool.create().await.unwrap();
        let id = w.commit(&spool, meta()).await.unwrap();
        (dir, spool, id)
    }

    #[tokio::test]
    async fn moves_between_areas_survive_a_crash_halfway() {
        let (dir, spool, id) = spool_with_one_message().await;
        spool
            .move_message(&id, Area::Queue, Area::Hold, None)
            .unwrap();
        assert_eq!(spool.locate(&id), Some(Area::Hold));
        assert_eq!(spool.len(), 0);
        // Simulate a crash in the middle of a release: meta moved back, body not yet.
        std::fs::rename(
            dir.path().join(format!("hold/{id}.json")),
            dir.path().join(format!("queue/{id}.json")),
        )
        .unwrap();
        drop(spool);
        let (spool, rec) = Spool::open(dir.path(), 10).unwrap();
        assert_eq!(
            rec.messages.len(),
            1,
            "the meta decides where the message is"
        );
        assert!(spool.body_path(&id).exists());
        assert_eq!(spool.len(), 1);
        assert!(id_time(&id).is_some_and(|t| (chrono::Utc::now() - t).num_seconds() < 60));
    }

    #[tokio::test]
    async fn deleted_messages_are_pruned_after_keep() {
        let (_dir, spool, id) = spool_with_one_message().await;
        spool
            .move_message(&id, Area::Queue, Area::Deleted, None)
            .unwrap();
        assert_eq!(
            spool.prune_deleted(std::time::Duration::from_secs(3600)),
            0,
            "kept while young"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(spool.prune_deleted(std::time::Duration::from_millis(1)), 1);
        assert_eq!(spool.locate(&id), None);
    }

    #[tokio::test]
    async fn full_spool_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(dir.path(), 1).unwrap();
        let spool = Arc::new(spool);
        let w = spool.create().await.unwrap();
        w.commit(&spool, meta()).await.unwrap();
        assert!(matches!(spool.create().await, Err(SpoolError::Full(1))));
    }
}

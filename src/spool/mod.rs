//! The durable spool: one `<ID>.eml` body and one `<ID>.json` meta file per message.
//!
//! Layout under `[queue] dir`:
//! - `tmp/`     `spare-N` files: being written, or emptied and kept for reuse (see below); at
//!   startup every one is emptied, since nothing in `tmp/` was ever acknowledged;
//! - `queue/`   committed messages waiting for delivery;
//! - `hold/`    messages an administrator put on hold (not delivered until released);
//! - `failed/`  messages given up on, kept for the administrator;
//! - `deleted/` messages an administrator deleted, kept until pruned so a slip is recoverable;
//! - `corrupt/` files recovery could not read, quarantined with a loud log line, never deleted.
//!
//! Moving a message between areas renames the meta first, then the body. Recovery treats the
//! meta as the authority: a body whose meta sits in another area is moved to it.
//!
//! Commit protocol (the only way a message enters `queue/`):
//! 1. the body is streamed into `tmp/<ID>.eml` and fsynced;
//! 2. the meta is written to `tmp/<ID>.json` and fsynced;
//! 3. the body is renamed into `queue/`, then the meta (the meta is the commit marker);
//! 4. `queue/` itself is fsynced;
//! 5. only then may the SMTP session answer `250 ... queued as <ID>`.
//!
//! Files are recycled rather than created and deleted: a delivered message's two files are
//! renamed back into `tmp/` and reused for the next message. Creating and deleting an inode per
//! file is the most expensive thing a busy spool does (on ext4 without a journal each new inode
//! scans every inode freed in the last half minute), and a message's whole life then touches no
//! inode allocator at all. At most [`MAX_SPARES`] spare files are kept. A small spare keeps its
//! old bytes and is overwritten in place (emptying and refilling a file frees and reallocates
//! its disk blocks every time); the next writer cuts it to its own length before the fsync.
//!
//! Steps 3-4 are group-committed: one publisher thread takes every commit that is ready, renames
//! them all and fsyncs `queue/` once for the whole batch; each session gets its answer only after
//! that fsync. While one fsync runs the next batch gathers, so under load many messages share one
//! directory fsync and no one waits for a timer.

pub mod meta;

use std::collections::{HashMap, HashSet};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

pub use meta::{Client, Meta, Recipient, RecipientStatus};

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

/// How many emptied files the spool keeps for reuse: enough for a backlog of 4,096 messages
/// (two files each) to drain without deleting an inode. Deleting is what makes creating
/// expensive later (ext4 without a journal skips every inode freed in the last minute or more),
/// and a spare costs only an empty inode and 8 bytes here.
pub const MAX_SPARES: usize = 8192;

/// Spare files up to this size keep their stale bytes; larger ones are emptied, so that a
/// delivered 20 MB message gives its disk space back.
const KEEP_STALE: u64 = 64 * 1024;

/// The pool of spare `tmp/spare-N` files.
///
/// Contract: a file in the pool is not part of any message (it is empty or holds at most
/// [`KEEP_STALE`] stale bytes, its length recorded here); `take` hands it to exactly one writer,
/// which writes from the start and cuts the file to its own length before fsyncing it;
/// whatever file is in `tmp/` at startup was never acknowledged.
struct Spares {
    tmp: PathBuf,
    /// (N, stale length) of the spare `spare-N` files.
    free: Mutex<Vec<(u64, u64)>>,
    next: AtomicU64,
    /// Held while creating a file: creating takes `tmp/`'s directory lock, and many threads
    /// creating at once spin on that lock in the kernel (a third of the relay's CPU when a burst
    /// outgrows the pool); waiting here sleeps instead.
    create: Mutex<()>,
}

impl Spares {
    fn name(&self) -> PathBuf {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        self.tmp.join(format!("spare-{n}"))
    }

    fn take(&self) -> Option<(PathBuf, u64)> {
        let (n, stale) = self.free.lock().ok()?.pop()?;
        Some((self.tmp.join(format!("spare-{n}")), stale))
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
    fn open(&self) -> io::Result<(PathBuf, std::fs::File, u64)> {
        while let Some((path, stale)) = self.take() {
            // A spare that cannot be opened (removed by hand) is forgotten; the next one is tried.
            if let Ok(f) = std::fs::OpenOptions::new().write(true).open(&path) {
                return Ok((path, f, stale));
            }
        }
        let _one_at_a_time = self.create.lock();
        loop {
            let path = self.name();
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(f) => return Ok((path, f, 0)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Keeps `path` (a file in `tmp/`) for reuse, emptying it when it is large, or removes it
    /// when the pool is full or it cannot be handled. Never fails: a file it cannot handle is
    /// removed at startup.
    fn recycle(&self, path: PathBuf) {
        let len = std::fs::metadata(&path).map(|m| m.len());
        self.keep(path, len);
    }

    /// `recycle` for a file whose length the caller knows.
    fn keep(&self, path: PathBuf, len: io::Result<u64>) {
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

    /// Takes `path` (a file of a message in some area) out of its area into the pool. Fails
    /// like `rename`, leaving the file where it was.
    fn reclaim(&self, path: &Path) -> io::Result<()> {
        let spare = self.name();
        std::fs::rename(path, &spare)?;
        self.recycle(spare);
        Ok(())
    }

    /// Writes `bytes` as a file's whole content and fsyncs it; returns its path in `tmp/`.
    fn write_synced(&self, bytes: &[u8]) -> io::Result<PathBuf> {
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
fn finish(f: &std::fs::File, len: u64, stale: u64) -> io::Result<()> {
    if stale > len {
        f.set_len(len)?;
    }
    f.sync_all()
}

/// What recovery found at startup.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Committed messages, oldest first.
    pub messages: Vec<Meta>,
    /// Bodies without a meta removed from `queue/` (never acknowledged to a client). Half-written
    /// files in `tmp/` are not counted: they look like the spare files kept there.
    pub removed: usize,
    /// Files moved to `corrupt/`.
    pub quarantined: usize,
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
}

/// A message whose files are written and fsynced in `tmp/`, waiting to be made visible.
struct PublishRequest {
    /// What the meta file says, handed to the forwarder so it need not read it back.
    meta_value: Meta,
    /// The fsynced body and meta files in `tmp/`.
    body: PathBuf,
    meta: PathBuf,
    done: tokio::sync::oneshot::Sender<io::Result<()>>,
}

/// The group-commit loop; ends when the spool (the only sender) is dropped.
fn publisher(
    rx: std::sync::mpsc::Receiver<PublishRequest>,
    queue: PathBuf,
    count: Arc<AtomicUsize>,
    committed: mpsc::UnboundedSender<Meta>,
) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
        }
        let mut renamed = Vec::with_capacity(batch.len());
        for req in batch {
            let id = &req.meta_value.id;
            let r = std::fs::rename(&req.body, queue.join(format!("{id}.eml")))
                .and_then(|_| std::fs::rename(&req.meta, queue.join(format!("{id}.json"))));
            match r {
                Ok(()) => renamed.push(req),
                Err(e) => {
                    let _ = req.done.send(Err(e));
                }
            }
        }
        if renamed.is_empty() {
            continue;
        }
        match fsync_dir(&queue) {
            Ok(()) => {
                for req in renamed {
                    count.fetch_add(1, Ordering::SeqCst);
                    let _ = req.done.send(Ok(()));
                    let _ = committed.send(req.meta_value);
                }
            }
            Err(e) => {
                // Not durable: take the files back out so nothing unacknowledged is delivered.
                for req in renamed {
                    let id = &req.meta_value.id;
                    let _ = std::fs::remove_file(queue.join(format!("{id}.json")));
                    let _ = std::fs::remove_file(queue.join(format!("{id}.eml")));
                    let _ = req.done.send(Err(io::Error::new(e.kind(), e.to_string())));
                }
            }
        }
    }
}

static LAST_ID_MICROS: AtomicU64 = AtomicU64::new(0);

/// A new queue ID: 13 hex digits of microseconds since the epoch (strictly increasing within
/// the process, so IDs sort by arrival), then 4 random hex digits against clashes across
/// restarts with a clock that stepped back.
pub fn new_queue_id() -> String {
    let now = chrono::Utc::now().timestamp_micros().max(0) as u64;
    let mut prev = LAST_ID_MICROS.load(Ordering::Relaxed);
    let micros = loop {
        let next = now.max(prev + 1);
        match LAST_ID_MICROS.compare_exchange_weak(prev, next, Ordering::Relaxed, Ordering::Relaxed)
        {
            Ok(_) => break next,
            Err(p) => prev = p,
        }
    };
    format!("{:013X}{:04X}", micros, fastrand::u16(..))
}

/// True for strings that look like our queue IDs (guards every path built from an ID).
/// When a queue ID was made (its first 13 hex digits are microseconds since the epoch).
pub fn id_time(id: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    let micros = i64::from_str_radix(id.get(..13)?, 16).ok()?;
    chrono::DateTime::from_timestamp_micros(micros)
}

pub fn is_queue_id(s: &str) -> bool {
    s.len() == 17
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

impl Spool {
    /// Opens (creating if needed) the spool at `root` and recovers what is in it.
    pub fn open(root: &Path, max_messages: usize) -> io::Result<(Spool, Recovered)> {
        let (tx, rx) = mpsc::unbounded_channel();
        let (ptx, prx) = std::sync::mpsc::channel();
        let count = Arc::new(AtomicUsize::new(0));
        {
            let (queue, count, committed) = (root.join("queue"), count.clone(), tx);
            std::thread::Builder::new()
                .name("spool-commit".into())
                .spawn(move || publisher(prx, queue, count, committed))?;
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
            spares: Arc::new(Spares {
                tmp: root.join("tmp"),
                free: Mutex::new(Vec::new()),
                next: AtomicU64::new(0),
                create: Mutex::new(()),
            }),
            publisher: Mutex::new(ptx),
            committed_rx: Mutex::new(Some(rx)),
        };
        for d in [
            &spool.tmp,
            &spool.queue,
            &spool.hold,
            &spool.failed,
            &spool.deleted,
            &spool.corrupt,
        ] {
            std::fs::create_dir_all(d)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", d.display())))?;
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
        self.spares.free.lock().map(|f| f.len()).unwrap_or(0)
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
    /// when given. Keeps the queue count.
    pub fn move_message(
        &self,
        id: &str,
        from: Area,
        to: Area,
        meta: Option<&Meta>,
    ) -> io::Result<()> {
        let (fd, td) = (self.dir(from), self.dir(to));
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

    /// Removes deleted messages older than `keep` (by queue ID time). Returns how many.
    pub fn prune_deleted(&self, keep: std::time::Duration) -> usize {
        let cutoff = chrono::Utc::now()
            - chrono::Duration::from_std(keep).unwrap_or(chrono::Duration::days(7));
        let mut n = 0;
        for id in self.ids(Area::Deleted).unwrap_or_default() {
            if id_time(&id).is_some_and(|t| t < cutoff) {
                let _ = std::fs::remove_file(self.deleted.join(format!("{id}.eml")));
                if std::fs::remove_file(self.deleted.join(format!("{id}.json"))).is_ok() {
                    n += 1;
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
        Ok(MessageWriter {
            id: new_queue_id(),
            buf: Vec::with_capacity(16 * 1024),
            file: None,
            written: 0,
            spares: self.spares.clone(),
        })
    }

    /// Reads the meta of a queued message.
    pub fn load(&self, id: &str) -> io::Result<Meta> {
        let bytes = std::fs::read(self.queue.join(format!("{id}.json")))?;
        Meta::decode(&bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// Replaces the meta of a queued message atomically (after a delivery attempt).
    pub fn update(&self, meta: &Meta) -> io::Result<()> {
        let tmp = self.spares.write_synced(&meta.encode())?;
        std::fs::rename(&tmp, self.queue.join(format!("{}.json", meta.id)))?;
        fsync_dir(&self.queue)
    }

    /// Removes a delivered message: meta first, so a crash in between leaves an orphan body
    /// that recovery deletes rather than a message delivered twice. Both files go back to the
    /// pool of spare files, emptied.
    ///
    /// The removal is not fsynced: losing it in a crash only means the message is delivered once
    /// more after restart, never lost, and it saves a directory fsync per delivered message (the
    /// next commit's fsync of `queue/` makes it durable anyway).
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

    /// Startup recovery. Idempotent; never deletes anything that was acknowledged.
    fn recover(&self) -> io::Result<Recovered> {
        let mut out = Recovered::default();
        // Nothing in tmp/ was acknowledged: half-written messages become spares like the rest.
        let mut highest = 0;
        for entry in std::fs::read_dir(&self.tmp)? {
            let entry = entry?;
            if !entry.file_type()?.is_file() {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            match name
                .strip_prefix("spare-")
                .and_then(|n| n.parse::<u64>().ok())
            {
                Some(n) => {
                    highest = highest.max(n + 1);
                    self.spares
                        .keep(entry.path(), entry.metadata().map(|m| m.len()));
                }
                None => std::fs::remove_file(entry.path())?,
            }
        }
        self.spares.next.fetch_max(highest, Ordering::Relaxed);
        // What each area holds.
        let mut bodies: HashMap<Area, HashSet<String>> = HashMap::new();
        let mut metas: HashMap<Area, HashSet<String>> = HashMap::new();
        for area in Area::ALL {
            for entry in std::fs::read_dir(self.dir(area))? {
                let entry = entry?;
                let name = entry.file_name().to_string_lossy().into_owned();
                match name.rsplit_once('.') {
                    Some((id, "eml")) if is_queue_id(id) => {
                        bodies.entry(area).or_default().insert(id.to_string());
                    }
                    Some((id, "json")) if is_queue_id(id) => {
                        metas.entry(area).or_default().insert(id.to_string());
                    }
                    _ => {
                        tracing::warn!(file = %entry.path().display(), "unexpected file in the spool; left alone")
                    }
                }
            }
        }
        let has = |m: &HashMap<Area, HashSet<String>>, a: Area, id: &str| {
            m.get(&a).is_some_and(|s| s.contains(id))
        };
        // 1. A meta in two areas (a crash inside `fail`): keep the one beside its body.
        for area in Area::ALL {
            let ids: Vec<String> = metas
                .get(&area)
                .map(|s| s.iter().cloned().collect())
                .unwrap_or_default();
            for id in ids {
                let twin = Area::ALL
                    .into_iter()
                    .find(|b| *b != area && has(&metas, *b, &id));
                if let Some(b) = twin
                    && !has(&bodies, area, &id)
                    && has(&bodies, b, &id)
                {
                    std::fs::remove_file(self.dir(area).join(format!("{id}.json")))?;
                    if let Some(s) = metas.get_mut(&area) {
                        s.remove(&id);
                    }
                }
            }
        }
        // 2. Bodies follow their meta; a queue body without any meta was never acknowledged.
        for area in Area::ALL {
            let ids: Vec<String> = bodies
                .get(&area)
                .map(|s| s.iter().cloned().collect())
                .unwrap_or_default();
            for id in ids {
                if has(&metas, area, &id) {
                    continue;
                }
                let name = format!("{id}.eml");
                if let Some(b) = Area::ALL.into_iter().find(|b| has(&metas, *b, &id)) {
                    std::fs::rename(self.dir(area).join(&name), self.dir(b).join(&name))?;
                    bodies.entry(b).or_default().insert(id.clone());
                } else if area == Area::Queue {
                    std::fs::remove_file(self.queue.join(&name))?;
                    out.removed += 1;
                } else {
                    tracing::error!(queue_id = %id, area = area.name(), "spool: body without meta; moved to corrupt/ for inspection");
                    self.quarantine(area, &name)?;
                    out.quarantined += 1;
                }
                if let Some(s) = bodies.get_mut(&area) {
                    s.remove(&id);
                }
            }
        }
        // 3. Metas must have a body and parse.
        for area in Area::ALL {
            let mut ids: Vec<String> = metas
                .get(&area)
                .map(|s| s.iter().cloned().collect())
                .unwrap_or_default();
            ids.sort();
            for id in ids {
                if !has(&bodies, area, &id) {
                    tracing::error!(queue_id = %id, area = area.name(), "spool: meta file without its body; moved to corrupt/ for inspection");
                    self.quarantine(area, &format!("{id}.json"))?;
                    out.quarantined += 1;
                    continue;
                }
                let parsed = self
                    .load_in(area, &id)
                    .map_err(|e| e.to_string())
                    .and_then(|m| {
                        if m.id == id {
                            Ok(m)
                        } else {
                            Err(format!("meta names ID {}", m.id))
                        }
                    });
                match parsed {
                    Ok(meta) if area == Area::Queue => out.messages.push(meta),
                    Ok(_) => {}
                    Err(reason) => {
                        tracing::error!(queue_id = %id, area = area.name(), %reason, "spool: unreadable meta file; message moved to corrupt/ for inspection");
                        self.quarantine(area, &format!("{id}.json"))?;
                        self.quarantine(area, &format!("{id}.eml"))?;
                        out.quarantined += 1;
                    }
                }
            }
        }
        for area in Area::ALL {
            fsync_dir(self.dir(area))?;
        }
        Ok(out)
    }
}

/// Bytes a message gathers in memory before they go to its file: a small message (nearly all
/// of them) touches the disk once, in its commit, where open, write and fsync are one blocking
/// call; a large one streams through this buffer, so memory per session stays bounded.
const BUFFER: usize = 128 * 1024;

/// A message being written. Dropping it without [`commit`](Self::commit) leaves at most a file
/// in `tmp/` that [`abort`](Self::abort) or the next startup takes back.
pub struct MessageWriter {
    id: String,
    /// Bytes not written to the file yet.
    buf: Vec<u8>,
    /// The spare file in `tmp/`, opened once the body outgrows `buf`.
    file: Option<BodyFile>,
    written: u64,
    spares: Arc<Spares>,
}

struct BodyFile {
    path: PathBuf,
    file: tokio::fs::File,
    /// Length of the stale bytes the spare held (see [`Spares`]).
    stale: u64,
}

impl MessageWriter {
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), SpoolError> {
        self.written += bytes.len() as u64;
        if self.buf.len() + bytes.len() <= BUFFER {
            self.buf.extend_from_slice(bytes);
            return Ok(());
        }
        let body = match &mut self.file {
            Some(body) => body,
            None => {
                let spares = self.spares.clone();
                let (path, file, stale) = tokio::task::spawn_blocking(move || spares.open())
                    .await
                    .map_err(|e| SpoolError::Io(io::Error::other(e.to_string())))?
                    .map_err(SpoolError::from_io)?;
                self.file.insert(BodyFile {
                    path,
                    file: tokio::fs::File::from_std(file),
                    stale,
                })
            }
        };
        body.file
            .write_all(&self.buf)
            .await
            .map_err(SpoolError::from_io)?;
        self.buf.clear();
        if bytes.len() >= BUFFER {
            body.file
                .write_all(bytes)
                .await
                .map_err(SpoolError::from_io)?;
        } else {
            self.buf.extend_from_slice(bytes);
        }
        Ok(())
    }

    /// Writes what is left of the body, cuts the file to the body's length and fsyncs it.
    /// Returns the file's path; on failure the error and the path to take back, if any.
    async fn finish_body(
        file: Option<BodyFile>,
        buf: Vec<u8>,
        len: u64,
        spares: Arc<Spares>,
    ) -> Result<PathBuf, (io::Error, Option<PathBuf>)> {
        let joined = |r: Result<_, tokio::task::JoinError>| {
            r.unwrap_or_else(|e| Err((io::Error::other(e.to_string()), None)))
        };
        match file {
            None => joined(
                tokio::task::spawn_blocking(move || {
                    let (path, mut f, stale) = spares.open().map_err(|e| (e, None))?;
                    match f.write_all(&buf).and_then(|_| finish(&f, len, stale)) {
                        Ok(()) => Ok(path),
                        Err(e) => Err((e, Some(path))),
                    }
                })
                .await,
            ),
            Some(BodyFile {
                path,
                mut file,
                stale,
            }) => {
                let written = async {
                    file.write_all(&buf).await?;
                    file.flush().await
                }
                .await;
                if let Err(e) = written {
                    return Err((e, Some(path)));
                }
                let file = file.into_std().await;
                joined(
                    tokio::task::spawn_blocking(move || match finish(&file, len, stale) {
                        Ok(()) => Ok(path),
                        Err(e) => Err((e, Some(path))),
                    })
                    .await,
                )
            }
        }
    }

    /// Durably commits the message. `meta.id` and `meta.size` are filled in here. When this
    /// returns `Ok`, the message survives a crash and the client may be told 250.
    pub async fn commit(
        self,
        spool: &std::sync::Arc<Spool>,
        mut meta: Meta,
    ) -> Result<String, SpoolError> {
        meta.id = self.id.clone();
        meta.size = self.written;
        let id = self.id;
        let meta_value = meta.clone();
        let spares = self.spares.clone();
        // The body's write + fsync and the meta file's are independent: run them on two
        // blocking threads at once. Both must succeed before the message is published.
        let (body, meta_file) = tokio::join!(
            Self::finish_body(self.file, self.buf, self.written, self.spares.clone()),
            tokio::task::spawn_blocking(move || spares.write_synced(&meta.encode()))
        );
        let meta_file = meta_file
            .map_err(|e| io::Error::other(e.to_string()))
            .and_then(|r| r);
        // The files to take back if the message is not published.
        let files = [
            match &body {
                Ok(path) => Some(path.clone()),
                Err((_, path)) => path.clone(),
            },
            meta_file.as_ref().ok().cloned(),
        ];
        let result = match (body, meta_file) {
            (Err((e, _)), _) | (Ok(_), Err(e)) => Err(e),
            (Ok(body), Ok(meta)) => {
                let (done, wait) = tokio::sync::oneshot::channel();
                let sent = spool
                    .publisher
                    .lock()
                    .map_err(|_| io::Error::other("spool publisher lock poisoned"))
                    .and_then(|p| {
                        p.send(PublishRequest {
                            meta_value,
                            body,
                            meta,
                            done,
                        })
                        .map_err(|_| io::Error::other("spool publisher stopped"))
                    });
                match sent {
                    Ok(()) => wait
                        .await
                        .unwrap_or_else(|_| Err(io::Error::other("spool publisher stopped"))),
                    Err(e) => Err(e),
                }
            }
        };
        match result {
            Ok(()) => Ok(id),
            Err(e) => {
                // Still in tmp/ (the publisher takes failed renames back out of the queue).
                let spares = self.spares;
                let _ = tokio::task::spawn_blocking(move || {
                    for f in files.into_iter().flatten() {
                        spares.recycle(f);
                    }
                })
                .await;
                Err(SpoolError::from_io(e))
            }
        }
    }

    /// Throws the partial message away.
    pub async fn abort(self) {
        if let Some(body) = self.file {
            drop(body.file);
            let (spares, path) = (self.spares, body.path);
            let _ = tokio::task::spawn_blocking(move || spares.recycle(path)).await;
        }
    }
}

#[cfg(test)]
mod tests {
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
            eight_bit: false,
            smtputf8: false,
            attempts: 0,
            next_attempt_at: None,
            requeued_at: None,
        }
    }

    #[test]
    fn ids_sort_by_arrival_and_validate() {
        let a = new_queue_id();
        let b = new_queue_id();
        assert!(a < b, "{a} {b}");
        assert!(is_queue_id(&a));
        assert!(!is_queue_id("../../etc/passwd"));
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

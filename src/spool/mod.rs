//! The durable spool: one `<ID>.eml` body and one `<ID>.json` meta file per message.
//!
//! Layout under `[queue] dir`:
//! - `tmp/`     files being written; anything here at startup is removed (never acknowledged);
//! - `queue/`   committed messages waiting for delivery;
//! - `failed/`  messages given up on, kept for the administrator;
//! - `corrupt/` files recovery could not read, quarantined with a loud log line, never deleted.
//!
//! Commit protocol (the only way a message enters `queue/`):
//! 1. the body is streamed into `tmp/<ID>.eml` and fsynced;
//! 2. the meta is written to `tmp/<ID>.json` and fsynced;
//! 3. the body is renamed into `queue/`, then the meta (the meta is the commit marker);
//! 4. `queue/` itself is fsynced;
//! 5. only then may the SMTP session answer `250 ... queued as <ID>`.
//!
//! Steps 3-4 are done by [`Spool::publish`], which takes no per-message state beyond the ID, so
//! several sessions' commits can later share one directory fsync without a format change.

pub mod meta;

use std::collections::{BTreeMap, HashSet};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

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

/// What recovery found at startup.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Committed messages, oldest first.
    pub messages: Vec<Meta>,
    /// Half-written files removed (never acknowledged to a client).
    pub removed: usize,
    /// Files moved to `corrupt/`.
    pub quarantined: usize,
}

pub struct Spool {
    tmp: PathBuf,
    queue: PathBuf,
    failed: PathBuf,
    corrupt: PathBuf,
    count: AtomicUsize,
    max_messages: usize,
    committed_tx: mpsc::UnboundedSender<String>,
    committed_rx: Mutex<Option<mpsc::UnboundedReceiver<String>>>,
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
        let spool = Spool {
            tmp: root.join("tmp"),
            queue: root.join("queue"),
            failed: root.join("failed"),
            corrupt: root.join("corrupt"),
            count: AtomicUsize::new(0),
            max_messages,
            committed_tx: tx,
            committed_rx: Mutex::new(Some(rx)),
        };
        for d in [&spool.tmp, &spool.queue, &spool.failed, &spool.corrupt] {
            std::fs::create_dir_all(d)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", d.display())))?;
        }
        let recovered = spool.recover()?;
        spool
            .count
            .store(recovered.messages.len(), Ordering::SeqCst);
        Ok((spool, recovered))
    }

    /// The receiver of IDs committed from now on; the forwarder takes it once.
    pub fn take_committed(&self) -> Option<mpsc::UnboundedReceiver<String>> {
        self.committed_rx.lock().ok()?.take()
    }

    pub fn len(&self) -> usize {
        self.count.load(Ordering::SeqCst)
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

    /// Starts a new message. Fails with [`SpoolError::Full`] when the spool is at its limit.
    pub async fn create(&self) -> Result<MessageWriter, SpoolError> {
        let n = self.len();
        if n >= self.max_messages {
            return Err(SpoolError::Full(n));
        }
        let id = new_queue_id();
        let path = self.tmp.join(format!("{id}.eml"));
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .await
            .map_err(SpoolError::from_io)?;
        Ok(MessageWriter {
            id,
            path,
            file: tokio::io::BufWriter::with_capacity(128 * 1024, file),
            written: 0,
        })
    }

    /// Makes a fully written, fsynced message visible in `queue/` (steps 3-4 of the protocol).
    fn publish(&self, id: &str) -> io::Result<()> {
        std::fs::rename(
            self.tmp.join(format!("{id}.eml")),
            self.queue.join(format!("{id}.eml")),
        )?;
        std::fs::rename(
            self.tmp.join(format!("{id}.json")),
            self.queue.join(format!("{id}.json")),
        )?;
        fsync_dir(&self.queue)
    }

    fn write_file_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        f.write_all(bytes)?;
        f.sync_all()
    }

    /// Reads the meta of a queued message.
    pub fn load(&self, id: &str) -> io::Result<Meta> {
        let bytes = std::fs::read(self.queue.join(format!("{id}.json")))?;
        Meta::decode(&bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// Replaces the meta of a queued message atomically (after a delivery attempt).
    pub fn update(&self, meta: &Meta) -> io::Result<()> {
        let tmp = self.tmp.join(format!("{}.json.upd", meta.id));
        Self::write_file_synced(&tmp, &meta.encode())?;
        std::fs::rename(&tmp, self.queue.join(format!("{}.json", meta.id)))?;
        fsync_dir(&self.queue)
    }

    /// Removes a delivered message: meta first, so a crash in between leaves an orphan body
    /// that recovery deletes rather than a message delivered twice.
    pub fn remove(&self, id: &str) -> io::Result<()> {
        std::fs::remove_file(self.queue.join(format!("{id}.json")))?;
        let _ = std::fs::remove_file(self.queue.join(format!("{id}.eml")));
        self.count.fetch_sub(1, Ordering::SeqCst);
        fsync_dir(&self.queue)
    }

    /// Moves a message given up on into `failed/` with its final meta.
    pub fn fail(&self, meta: &Meta) -> io::Result<()> {
        let id = &meta.id;
        let tmp = self.tmp.join(format!("{id}.json.fail"));
        Self::write_file_synced(&tmp, &meta.encode())?;
        std::fs::rename(&tmp, self.failed.join(format!("{id}.json")))?;
        std::fs::rename(
            self.queue.join(format!("{id}.eml")),
            self.failed.join(format!("{id}.eml")),
        )?;
        fsync_dir(&self.failed)?;
        std::fs::remove_file(self.queue.join(format!("{id}.json")))?;
        self.count.fetch_sub(1, Ordering::SeqCst);
        fsync_dir(&self.queue)
    }

    fn quarantine(&self, name: &str) -> io::Result<()> {
        std::fs::rename(self.queue.join(name), self.corrupt.join(name))
    }

    /// Startup recovery. Idempotent; never deletes anything that was acknowledged.
    fn recover(&self) -> io::Result<Recovered> {
        let mut out = Recovered::default();
        for entry in std::fs::read_dir(&self.tmp)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                std::fs::remove_file(entry.path())?;
                out.removed += 1;
            }
        }
        let mut bodies = HashSet::new();
        let mut metas = BTreeMap::new();
        for entry in std::fs::read_dir(&self.queue)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            match name.rsplit_once('.') {
                Some((id, "eml")) if is_queue_id(id) => {
                    bodies.insert(id.to_string());
                }
                Some((id, "json")) if is_queue_id(id) => {
                    metas.insert(id.to_string(), entry.path());
                }
                _ => {
                    tracing::warn!(file = %entry.path().display(), "unexpected file in the spool's queue folder; left alone")
                }
            }
        }
        for (id, path) in &metas {
            if !bodies.contains(id) {
                if self.failed.join(format!("{id}.eml")).exists() {
                    // Crash in the middle of `fail`: the failed copy is complete.
                    std::fs::remove_file(path)?;
                    continue;
                }
                tracing::error!(queue_id = %id, "spool: meta file without its body; moved to corrupt/ for inspection");
                self.quarantine(&format!("{id}.json"))?;
                out.quarantined += 1;
                continue;
            }
            let parsed = std::fs::read(path)
                .map_err(|e| e.to_string())
                .and_then(|b| Meta::decode(&b))
                .and_then(|m| {
                    if &m.id == id {
                        Ok(m)
                    } else {
                        Err(format!("meta names ID {}", m.id))
                    }
                });
            match parsed {
                Ok(meta) => out.messages.push(meta),
                Err(reason) => {
                    tracing::error!(queue_id = %id, %reason, "spool: unreadable meta file; message moved to corrupt/ for inspection");
                    self.quarantine(&format!("{id}.json"))?;
                    self.quarantine(&format!("{id}.eml"))?;
                    out.quarantined += 1;
                }
            }
        }
        for id in bodies {
            if !metas.contains_key(&id) {
                // Renamed in but never committed: the client got no 250 for it.
                std::fs::remove_file(self.queue.join(format!("{id}.eml")))?;
                out.removed += 1;
            }
        }
        fsync_dir(&self.queue)?;
        Ok(out)
    }
}

/// A message being written. Dropping it without [`commit`](Self::commit) leaves a file in
/// `tmp/` that [`abort`](Self::abort) or the next startup removes.
pub struct MessageWriter {
    id: String,
    path: PathBuf,
    file: tokio::io::BufWriter<tokio::fs::File>,
    written: u64,
}

impl MessageWriter {
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), SpoolError> {
        self.file
            .write_all(bytes)
            .await
            .map_err(SpoolError::from_io)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Durably commits the message. `meta.id` and `meta.size` are filled in here. When this
    /// returns `Ok`, the message survives a crash and the client may be told 250.
    pub async fn commit(
        mut self,
        spool: &std::sync::Arc<Spool>,
        mut meta: Meta,
    ) -> Result<String, SpoolError> {
        self.file.flush().await.map_err(SpoolError::from_io)?;
        self.file
            .get_ref()
            .sync_all()
            .await
            .map_err(SpoolError::from_io)?;
        meta.id = self.id.clone();
        meta.size = self.written;
        let spool = spool.clone();
        let id = self.id.clone();
        let tmp_meta = self.path.with_extension("json");
        drop(self.file);
        let result = tokio::task::spawn_blocking(move || -> io::Result<()> {
            Spool::write_file_synced(&tmp_meta, &meta.encode())?;
            spool.publish(&meta.id)?;
            spool.count.fetch_add(1, Ordering::SeqCst);
            let _ = spool.committed_tx.send(meta.id.clone());
            Ok(())
        })
        .await
        .map_err(|e| SpoolError::Io(io::Error::other(e.to_string())))?;
        match result {
            Ok(()) => Ok(id),
            Err(e) => {
                let _ = std::fs::remove_file(&self.path);
                let _ = std::fs::remove_file(self.path.with_extension("json"));
                Err(SpoolError::from_io(e))
            }
        }
    }

    /// Throws the partial message away.
    pub async fn abort(self) {
        drop(self.file);
        let _ = tokio::fs::remove_file(&self.path).await;
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
        let half = spool.create().await.unwrap();
        std::mem::forget(half);
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
        assert_eq!(rec.messages.len(), 1);
        assert_eq!(rec.messages[0].id, id);
        assert_eq!(rec.messages[0].size, 20);
        assert_eq!(rec.removed, 2);
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
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
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

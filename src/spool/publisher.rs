//! Steps 3-5 of the commit protocol, group-committed: one publisher thread takes every commit
//! that is ready, renames them all into `queue/` and fsyncs `queue/` once for the whole batch;
//! each session gets its answer only after that fsync. While one fsync runs the next batch
//! gathers, so under load many messages share one directory fsync and no one waits for a timer.
//!
//! The same fsync makes durable the removals from `queue/` that finished before it started, so
//! the files they freed are released into the spare pool here (see `spares.rs`); when no
//! commit comes for [`IDLE`], the publisher settles the pending removals on its own.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::mpsc;

use super::Meta;
use super::spares::Spares;

/// How long the publisher waits for a commit before it settles pending removals on its own.
const IDLE: std::time::Duration = std::time::Duration::from_millis(50);

/// A message whose files are written and fsynced in `tmp/`, waiting to be made visible.
pub(super) struct PublishRequest {
    /// What the meta file says, handed to the forwarder so it need not read it back.
    pub meta_value: Meta,
    /// The fsynced body and meta files in `tmp/`.
    pub body: PathBuf,
    pub meta: PathBuf,
    pub done: tokio::sync::oneshot::Sender<io::Result<()>>,
}

/// The group-commit loop; ends when the spool (the only sender) is dropped.
pub(super) fn publisher(
    rx: std::sync::mpsc::Receiver<PublishRequest>,
    queue: PathBuf,
    count: Arc<AtomicUsize>,
    spares: Arc<Spares>,
    committed: mpsc::UnboundedSender<Meta>,
) {
    loop {
        let first = match rx.recv_timeout(IDLE) {
            Ok(first) => first,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                // Idle: make the removals of delivered messages durable so that their files
                // are free for the next burst (writers would otherwise create new ones).
                let _ = spares.settle();
                continue;
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        };
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
        // Taken before the fsync: only removals that finished before it are covered by it.
        let removed = spares.pending_from(&queue);
        match super::fsync_dir(&queue) {
            Ok(()) => {
                spares.release(removed);
                for req in renamed {
                    count.fetch_add(1, Ordering::SeqCst);
                    let _ = req.done.send(Ok(()));
                    let _ = committed.send(req.meta_value);
                }
            }
            Err(e) => {
                spares.unsettled(removed);
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

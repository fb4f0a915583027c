//! Writing one message: steps 1-2 of the commit protocol (body and meta written and fsynced in
//! `tmp/`), then the hand-over to the publisher for steps 3-5. The body's CRC32C is computed as
//! its bytes arrive and recorded in the meta with its length (see `check.rs`).

use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;

use super::check::Crc;
use super::publisher::PublishRequest;
use super::spares::{Spares, finish};
use super::{Meta, Spool, SpoolError};

/// Bytes a message gathers in memory before they go to its file: a small message (nearly all
/// of them) touches the disk once, in its commit, where open, write and fsync are one blocking
/// call; a large one streams through this buffer, so memory per session stays bounded.
pub(super) const BUFFER: usize = 128 * 1024;

/// A message being written. Dropping it without [`commit`](Self::commit) leaves at most a file
/// in `tmp/` that [`abort`](Self::abort) or the next startup takes back.
pub struct MessageWriter {
    id: String,
    /// Bytes not written to the file yet.
    buf: Vec<u8>,
    /// The spare file in `tmp/`, opened once the body outgrows `buf`.
    file: Option<BodyFile>,
    written: u64,
    /// CRC32C of the `written` bytes.
    crc: Crc,
    spares: Arc<Spares>,
}

struct BodyFile {
    path: PathBuf,
    file: tokio::fs::File,
    /// Length of the stale bytes the spare held (see [`Spares`]).
    stale: u64,
}

impl MessageWriter {
    pub(super) fn new(id: String, spares: Arc<Spares>) -> MessageWriter {
        MessageWriter {
            id,
            buf: Vec::with_capacity(16 * 1024),
            file: None,
            written: 0,
            crc: Crc::default(),
            spares,
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), SpoolError> {
        self.written += bytes.len() as u64;
        self.crc.update(bytes);
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

    /// Durably commits the message. `meta.id`, `meta.size` and `meta.crc32c` are filled in here. When this
    /// returns `Ok`, the message survives a crash and the client may be told 250.
    pub async fn commit(
        self,
        spool: &std::sync::Arc<Spool>,
        mut meta: Meta,
    ) -> Result<String, SpoolError> {
        meta.id = self.id.clone();
        meta.size = self.written;
        meta.crc32c = Some(self.crc.value());
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

    /// Throws the partial message away. The file goes back to the spare pool only after any
    /// write still in flight on it has landed (tokio's file writes run on a blocking thread and
    /// finish after `write` returns), so that write cannot land in the next message's body.
    pub async fn abort(self) {
        if let Some(body) = self.file {
            drop(body.file.into_std().await);
            let (spares, path) = (self.spares, body.path);
            let _ = tokio::task::spawn_blocking(move || spares.recycle(path)).await;
        }
    }
}

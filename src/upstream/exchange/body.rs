//! The outgoing message as a (possibly rewritten) header section in memory plus the rest of the
//! spooled file streamed in chunks, so a 20 MB scan costs a few hundred KiB per connection.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Headers larger than this are sent as they are (no rewrite), streamed like the body.
const MAX_HEAD: usize = 1024 * 1024;
const CHUNK: usize = 64 * 1024;

pub struct OutgoingBody {
    head: Vec<u8>,
    path: PathBuf,
    /// Where the streamed part starts in the file, and where it stops (a final CRLF is left
    /// out: lettre sends CRLF "." CRLF itself).
    rest: (u64, u64),
}

impl OutgoingBody {
    /// Reads the header section of `path` and passes it through `edit`.
    pub fn load(path: &Path, edit: impl FnOnce(&[u8]) -> Vec<u8>) -> std::io::Result<OutgoingBody> {
        let mut f = std::fs::File::open(path)?;
        let len = f.metadata()?.len();
        let mut head = vec![0u8; (len as usize).min(MAX_HEAD)];
        f.read_exact(&mut head)?;
        let head_end = head
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|p| p + 4);
        let (head, rest_start) = match head_end {
            Some(end) => (edit(&head[..end]), end as u64),
            None if (len as usize) <= MAX_HEAD => (edit(&head), len),
            None => (Vec::new(), 0),
        };
        let mut last = [0u8; 2];
        let ends_crlf = len >= 2 && {
            f.seek(SeekFrom::Start(len - 2))?;
            f.read_exact(&mut last)?;
            &last == b"\r\n"
        };
        let mut out = OutgoingBody {
            head,
            path: path.to_path_buf(),
            rest: (rest_start, len),
        };
        if ends_crlf {
            if rest_start < len {
                out.rest.1 = len - 2;
            } else if out.head.ends_with(b"\r\n") {
                out.head.truncate(out.head.len() - 2);
            }
        }
        Ok(out)
    }

    /// Bytes that will be sent (for the SIZE parameter).
    pub fn len(&self) -> usize {
        self.head.len() + (self.rest.1.saturating_sub(self.rest.0)) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The message in chunks. A read error ends the stream early and sets `failed`; the caller
    /// must then treat the attempt as failed.
    pub fn chunks<'a>(&'a self, failed: &'a std::sync::atomic::AtomicBool) -> Chunks<'a> {
        Chunks {
            body: self,
            file: None,
            pos: None,
            failed,
        }
    }
}

pub struct Chunks<'a> {
    body: &'a OutgoingBody,
    file: Option<std::fs::File>,
    pos: Option<u64>,
    failed: &'a std::sync::atomic::AtomicBool,
}

impl Iterator for Chunks<'_> {
    type Item = Vec<u8>;

    fn next(&mut self) -> Option<Vec<u8>> {
        let (start, end) = self.body.rest;
        let Some(pos) = self.pos else {
            self.pos = Some(start);
            return Some(self.body.head.clone());
        };
        if pos >= end || self.failed.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        if self.file.is_none() {
            match std::fs::File::open(&self.body.path)
                .and_then(|mut f| f.seek(SeekFrom::Start(pos)).map(|_| f))
            {
                Ok(f) => self.file = Some(f),
                Err(_) => {
                    self.failed
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    return None;
                }
            }
        }
        let want = ((end - pos) as usize).min(CHUNK);
        let mut buf = vec![0u8; want];
        match self.file.as_mut().map(|f| f.read_exact(&mut buf)) {
            Some(Ok(())) => {
                self.pos = Some(pos + want as u64);
                Some(buf)
            }
            _ => {
                self.failed
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_edited_rest_streamed_final_crlf_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.eml");
        let body: Vec<u8> = (0..200_000).map(|i| b'a' + (i % 26) as u8).collect();
        let mut msg = b"Subject: x\r\n\r\n".to_vec();
        msg.extend_from_slice(&body);
        msg.extend_from_slice(b"\r\n");
        std::fs::write(&p, &msg).unwrap();
        let out = OutgoingBody::load(&p, |h| [b"X-New: 1\r\n".as_slice(), h].concat()).unwrap();
        let sent: Vec<u8> = out.chunks(&Default::default()).flatten().collect();
        let mut expected = b"X-New: 1\r\nSubject: x\r\n\r\n".to_vec();
        expected.extend_from_slice(&body);
        assert_eq!(sent, expected);
        assert_eq!(out.len(), expected.len());
        // A message that is all header.
        std::fs::write(&p, b"Subject: y\r\n\r\n").unwrap();
        let out = OutgoingBody::load(&p, |h| h.to_vec()).unwrap();
        assert_eq!(
            out.chunks(&Default::default())
                .flatten()
                .collect::<Vec<u8>>(),
            b"Subject: y\r\n"
        );
    }
}

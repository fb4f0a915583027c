//! The outgoing MIME message for Graph: the header section (edited: sender policy, `Bcc:` for
//! envelope-only recipients) in memory, everything after it as byte ranges of the spooled file,
//! and a request body that base64-encodes those pieces as it streams them. At most
//! [`CHANNEL_CHUNKS`] × [`CHUNK`] bytes of a message are in memory per request, whatever its size.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hyper::body::{Bytes, Frame};
use mail_parser::{HeaderName, MessageParser};

/// Headers larger than this are sent as they are (no edits), streamed like the body.
const MAX_HEAD: usize = 1024 * 1024;
/// Raw bytes read and encoded at a time (a multiple of 3, so chunks encode without padding).
const CHUNK: usize = 48 * 1024;
const CHANNEL_CHUNKS: usize = 4;

/// A piece of the outgoing MIME message.
#[derive(Debug, Clone)]
pub enum Piece {
    Bytes(Bytes),
    /// `start..end` of the spooled file.
    File(u64, u64),
}

/// The outgoing MIME message: pieces of memory and of the spooled file.
#[derive(Debug, Clone)]
pub struct Mime {
    pub path: PathBuf,
    pub pieces: Vec<Piece>,
}

/// The spooled message split at the end of its header section.
pub struct Spooled {
    pub path: PathBuf,
    /// The header section including the empty line, or empty when it is too large to edit.
    pub head: Vec<u8>,
    /// Where the rest starts in the file, and the file's length.
    pub rest: (u64, u64),
}

impl Spooled {
    pub fn load(path: &Path) -> std::io::Result<Spooled> {
        let mut f = std::fs::File::open(path)?;
        let len = f.metadata()?.len();
        let mut head = vec![0u8; (len as usize).min(MAX_HEAD)];
        f.read_exact(&mut head)?;
        match memchr::memmem::find(&head, b"\r\n\r\n") {
            Some(p) => {
                head.truncate(p + 4);
                let end = head.len() as u64;
                Ok(Spooled {
                    path: path.to_path_buf(),
                    head,
                    rest: (end, len),
                })
            }
            None if (len as usize) <= MAX_HEAD => Ok(Spooled {
                path: path.to_path_buf(),
                head,
                rest: (len, len),
            }),
            None => Ok(Spooled {
                path: path.to_path_buf(),
                head: Vec::new(),
                rest: (0, len),
            }),
        }
    }
}

impl Mime {
    pub fn new(path: &Path, head: Vec<u8>, rest: &[(u64, u64)]) -> Mime {
        let mut pieces = vec![Piece::Bytes(Bytes::from(head))];
        pieces.extend(
            rest.iter()
                .filter(|(s, e)| e > s)
                .map(|&(s, e)| Piece::File(s, e)),
        );
        Mime {
            path: path.to_path_buf(),
            pieces,
        }
    }

    pub fn len(&self) -> u64 {
        self.pieces
            .iter()
            .map(|p| match p {
                Piece::Bytes(b) => b.len() as u64,
                Piece::File(s, e) => e - s,
            })
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Length of the base64 text of the message (no line breaks, padded).
    pub fn base64_len(&self) -> u64 {
        self.len().div_ceil(3) * 4
    }

    /// The request body: the message base64-encoded, read from the spool as the request goes
    /// out. A read error fails the request (the attempt is then temporary).
    pub fn base64_body(&self) -> reqwest::Body {
        let (tx, rx) = tokio::sync::mpsc::channel(CHANNEL_CHUNKS);
        let mime = self.clone();
        let size = self.base64_len();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = mime.encode_into(&tx) {
                let _ = tx.blocking_send(Err(e));
            }
        });
        reqwest::Body::wrap(ChannelBody { rx, size })
    }

    fn encode_into(
        &self,
        tx: &tokio::sync::mpsc::Sender<std::io::Result<Bytes>>,
    ) -> std::io::Result<()> {
        let mut file: Option<std::fs::File> = None;
        let mut pending: Vec<u8> = Vec::with_capacity(CHUNK + 3);
        let send = |raw: &[u8]| -> bool {
            let text = STANDARD.encode(raw);
            tx.blocking_send(Ok(Bytes::from(text))).is_ok()
        };
        for piece in &self.pieces {
            match piece {
                Piece::Bytes(b) => {
                    let mut rest: &[u8] = b;
                    while !rest.is_empty() {
                        let take = (CHUNK - pending.len()).min(rest.len());
                        pending.extend_from_slice(&rest[..take]);
                        rest = &rest[take..];
                        if pending.len() == CHUNK {
                            if !send(&pending) {
                                return Ok(());
                            }
                            pending.clear();
                        }
                    }
                }
                Piece::File(start, end) => {
                    let f = match &mut file {
                        Some(f) => f,
                        None => file.insert(std::fs::File::open(&self.path)?),
                    };
                    f.seek(SeekFrom::Start(*start))?;
                    let mut left = end - start;
                    while left > 0 {
                        let want = ((CHUNK - pending.len()) as u64).min(left) as usize;
                        let at = pending.len();
                        pending.resize(at + want, 0);
                        f.read_exact(&mut pending[at..])?;
                        left -= want as u64;
                        if pending.len() == CHUNK {
                            if !send(&pending) {
                                return Ok(());
                            }
                            pending.clear();
                        }
                    }
                }
            }
        }
        if !pending.is_empty() {
            send(&pending);
        }
        Ok(())
    }
}

/// A request body fed by the encoding thread.
struct ChannelBody {
    rx: tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>,
    size: u64,
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.rx.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data)))
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.size)
    }
}

/// Adds `Bcc:` for the envelope recipients that no `To:`, `Cc:` or `Bcc:` header names: Graph
/// takes the recipients from the headers, so without it they would receive nothing. `head`
/// is a header section ending with its empty line; returns it edited, and the addresses added.
pub fn add_bcc(head: &[u8], recipients: &[String]) -> (Vec<u8>, Vec<String>) {
    let named: Vec<String> = match MessageParser::default().parse_headers(head) {
        Some(m) => m
            .headers()
            .iter()
            .filter(|h| matches!(h.name, HeaderName::To | HeaderName::Cc | HeaderName::Bcc))
            .filter_map(|h| h.value.as_address())
            .flat_map(|a| {
                a.iter()
                    .filter_map(|x| x.address().map(str::to_ascii_lowercase))
                    .collect::<Vec<_>>()
            })
            .collect(),
        None => Vec::new(),
    };
    let mut missing: Vec<String> = Vec::new();
    for r in recipients {
        let lower = r.to_ascii_lowercase();
        if !named.contains(&lower) && !missing.iter().any(|m| m.eq_ignore_ascii_case(r)) {
            missing.push(r.clone());
        }
    }
    if missing.is_empty() {
        return (head.to_vec(), missing);
    }
    let field = format!(
        "Bcc: {}\r\n",
        missing
            .iter()
            .map(|a| format!("<{a}>"))
            .collect::<Vec<_>>()
            .join(",\r\n ")
    );
    let at = if head.ends_with(b"\r\n\r\n") {
        head.len() - 2
    } else {
        head.len()
    };
    let mut out = Vec::with_capacity(head.len() + field.len());
    out.extend_from_slice(&head[..at]);
    if at == head.len() && !head.is_empty() && !head.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(field.as_bytes());
    out.extend_from_slice(&head[at..]);
    (out, missing)
}

/// The `Message-ID` of a header section, with its angle brackets (what Graph reports as the
/// message's `internetMessageId`).
pub fn message_id(head: &[u8]) -> Option<String> {
    let m = MessageParser::default().parse_headers(head)?;
    let id = m.message_id()?.trim();
    (!id.is_empty()).then(|| format!("<{id}>"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bcc_lists_only_envelope_recipients_missing_from_the_headers() {
        let head = b"From: a@x\r\nTo: B <b@x>, c@x\r\nCc: d@x\r\n\r\n";
        let rcpts: Vec<String> = ["b@x", "C@x", "d@x", "e@x", "f@x"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let (out, added) = add_bcc(head, &rcpts);
        assert_eq!(added, vec!["e@x", "f@x"]);
        assert_eq!(
            out,
            b"From: a@x\r\nTo: B <b@x>, c@x\r\nCc: d@x\r\nBcc: <e@x>,\r\n <f@x>\r\n\r\n"
        );
        let (same, none) = add_bcc(head, &rcpts[..3]);
        assert_eq!(same, head);
        assert!(none.is_empty());
    }

    #[tokio::test]
    async fn body_is_the_base64_of_head_and_file_ranges() {
        use http_body_util::BodyExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m");
        let data: Vec<u8> = (0..300_001u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let mime = Mime::new(
            &p,
            b"H: 1\r\n\r\n".to_vec(),
            &[(10, 200_000), (250_000, 300_001)],
        );
        let mut expected = b"H: 1\r\n\r\n".to_vec();
        expected.extend_from_slice(&data[10..200_000]);
        expected.extend_from_slice(&data[250_000..]);
        assert_eq!(mime.len(), expected.len() as u64);
        let body = mime.base64_body().collect().await.unwrap().to_bytes();
        assert_eq!(body.len() as u64, mime.base64_len());
        assert_eq!(STANDARD.decode(&body).unwrap(), expected);
    }
}

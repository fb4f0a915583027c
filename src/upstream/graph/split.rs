//! Large messages: the top-level parts of a `multipart/*` message found by scanning the spooled
//! file line by line (never holding the message), so the draft can be created from the MIME
//! without its large base64 attachments and those uploaded separately, decoded as they are read.

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use mail_parser::{HeaderName, MessageParser};

/// Lines longer than this make the message unsplittable (it is then sent as one piece).
const MAX_LINE: u64 = 64 * 1024;
/// A part's header section is parsed up to this size.
const MAX_PART_HEAD: usize = 64 * 1024;

/// One top-level part of the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// Start of its delimiter line, and start of the next delimiter line: removing
    /// `start..end` leaves a well-formed multipart.
    pub start: u64,
    pub end: u64,
    /// Start of its (encoded) body.
    pub body_start: u64,
    pub content_type: String,
    pub name: String,
    /// Base64-encoded leaf part: its decoded size (`None`: not an uploadable attachment).
    pub decoded_size: Option<u64>,
}

impl Part {
    pub fn raw_len(&self) -> u64 {
        self.end - self.start
    }
}

/// The `boundary` of a `multipart/*` header section, if it is one.
pub fn boundary(head: &[u8]) -> Option<String> {
    let m = MessageParser::default().parse_headers(head)?;
    let ct = m.header(HeaderName::ContentType)?.as_content_type()?;
    if !ct.ctype().eq_ignore_ascii_case("multipart") {
        return None;
    }
    ct.attribute("boundary").map(str::to_string)
}

fn describe(headers: &[u8]) -> (String, String, bool, bool) {
    let Some(m) = MessageParser::default().parse_headers(headers) else {
        return (
            "application/octet-stream".into(),
            "attachment".into(),
            false,
            false,
        );
    };
    let ct = m
        .header(HeaderName::ContentType)
        .and_then(|v| v.as_content_type());
    let multipart = ct.is_some_and(|c| c.ctype().eq_ignore_ascii_case("multipart"));
    let content_type = ct
        .map(|c| match c.subtype() {
            Some(s) => format!("{}/{s}", c.ctype()),
            None => c.ctype().to_string(),
        })
        .unwrap_or_else(|| "text/plain".into());
    let name = m
        .header(HeaderName::ContentDisposition)
        .and_then(|v| v.as_content_type())
        .and_then(|d| d.attribute("filename"))
        .or_else(|| ct.and_then(|c| c.attribute("name")))
        .unwrap_or("attachment")
        .to_string();
    let base64 = m
        .header(HeaderName::ContentTransferEncoding)
        .and_then(|v| v.as_text())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("base64"));
    (content_type, name, base64 && !multipart, multipart)
}

struct Open {
    start: u64,
    head: Vec<u8>,
    body_start: Option<u64>,
    b64_chars: u64,
    pad: u64,
}

/// Scans `from..` of `path` for the top-level parts delimited by `boundary`. Returns no parts
/// when the structure cannot be followed (no closing delimiter, overlong lines).
pub fn scan(path: &Path, from: u64, boundary: &str) -> std::io::Result<Vec<Part>> {
    let mut f = std::fs::File::open(path)?;
    f.seek(SeekFrom::Start(from))?;
    let mut r = BufReader::with_capacity(64 * 1024, f);
    let delim = format!("--{boundary}");
    let mut pos = from;
    let mut line = Vec::with_capacity(256);
    let mut parts = Vec::new();
    let mut open: Option<Open> = None;
    let close = |o: Open, end: u64, parts: &mut Vec<Part>| {
        let (content_type, name, base64, _) = describe(&o.head);
        let decoded_size =
            (base64 && o.b64_chars.is_multiple_of(4)).then(|| o.b64_chars / 4 * 3 - o.pad.min(2));
        parts.push(Part {
            start: o.start,
            end,
            body_start: o.body_start.unwrap_or(end),
            content_type,
            name,
            decoded_size,
        });
    };
    loop {
        line.clear();
        let n = (&mut r).take(MAX_LINE).read_until(b'\n', &mut line)? as u64;
        if n == 0 {
            return Ok(Vec::new());
        }
        if n == MAX_LINE && !line.ends_with(b"\n") {
            return Ok(Vec::new());
        }
        let trimmed = line.trim_ascii_end();
        if trimmed.starts_with(delim.as_bytes()) {
            let tail = &trimmed[delim.len()..];
            if tail.is_empty() || tail == b"--" {
                if let Some(o) = open.take() {
                    close(o, pos, &mut parts);
                }
                if tail == b"--" {
                    return Ok(parts);
                }
                open = Some(Open {
                    start: pos,
                    head: Vec::new(),
                    body_start: None,
                    b64_chars: 0,
                    pad: 0,
                });
                pos += n;
                continue;
            }
        }
        if let Some(o) = &mut open {
            match o.body_start {
                None if trimmed.is_empty() => o.body_start = Some(pos + n),
                None => {
                    if o.head.len() + line.len() <= MAX_PART_HEAD {
                        o.head.extend_from_slice(&line);
                    }
                }
                Some(_) => {
                    for &b in trimmed {
                        if b == b'=' {
                            o.pad += 1;
                            o.b64_chars += 1;
                        } else if !b.is_ascii_whitespace() {
                            o.b64_chars += 1;
                        }
                    }
                }
            }
        }
        pos += n;
    }
}

/// Decodes base64 text fed in arbitrary pieces (line breaks and other whitespace skipped).
#[derive(Default)]
pub struct Decoder {
    carry: Vec<u8>,
}

impl Decoder {
    /// Decodes what can be decoded of `text` so far, appending to `out`.
    pub fn feed(&mut self, text: &[u8], out: &mut Vec<u8>) -> Result<(), base64::DecodeError> {
        self.carry
            .extend(text.iter().copied().filter(|b| !b.is_ascii_whitespace()));
        let whole = self.carry.len() / 4 * 4;
        if whole > 0 {
            STANDARD.decode_vec(&self.carry[..whole], out)?;
            self.carry.drain(..whole);
        }
        Ok(())
    }

    /// Whether all fed text has been decoded (no dangling characters).
    pub fn finished(&self) -> bool {
        self.carry.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_top_level_parts_and_attachment_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m");
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 253) as u8).collect();
        let b64 = STANDARD.encode(&data);
        let lines: Vec<&str> = b64
            .as_bytes()
            .chunks(76)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        let head = "Content-Type: multipart/mixed; boundary=\"XX\"\r\n\r\n";
        let msg = format!(
            "{head}preamble\r\n--XX\r\nContent-Type: text/plain\r\n\r\nhello\r\n--XX\r\nContent-Type: application/pdf; name=\"a.pdf\"\r\nContent-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=\"scan.pdf\"\r\n\r\n{}\r\n--XX--\r\nepilogue\r\n",
            lines.join("\r\n")
        );
        std::fs::write(&p, &msg).unwrap();
        assert_eq!(boundary(head.as_bytes()).as_deref(), Some("XX"));
        let parts = scan(&p, head.len() as u64, "XX").unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].decoded_size, None);
        assert_eq!(parts[1].decoded_size, Some(10_000));
        assert_eq!(parts[1].name, "scan.pdf");
        assert_eq!(parts[1].content_type, "application/pdf");
        // Removing the attachment leaves a well-formed multipart.
        let mut rest = msg.as_bytes()[..parts[1].start as usize].to_vec();
        rest.extend_from_slice(&msg.as_bytes()[parts[1].end as usize..]);
        assert!(
            String::from_utf8(rest)
                .unwrap()
                .ends_with("hello\r\n--XX--\r\nepilogue\r\n")
        );
        // Decoding in odd pieces gives the bytes back.
        let body = &msg.as_bytes()[parts[1].body_start as usize..parts[1].end as usize];
        let mut d = Decoder::default();
        let mut out = Vec::new();
        for piece in body.chunks(1001) {
            d.feed(piece, &mut out).unwrap();
        }
        assert!(d.finished());
        assert_eq!(out, data);
    }
}

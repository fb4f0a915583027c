//! The one way into the spool (Postfix's `cleanup`): SMTP, HTTP submission, delivery status
//! notifications and `send-test` all describe a new message as a [`Submission`] and pass its
//! bytes through the same [`Normalizer`], so every message in the queue has
//! - envelope addresses checked by one rule ([`parse_address`]),
//! - one `Received:` line in one format ([`Submission::received_header`]),
//! - CRLF line ends only (bare CR and LF become CRLF; [`DotReader`] is the single place that
//!   decides what a line end is, for dot-stuffed SMTP data and raw HTTP bodies alike),
//! - `Date:`, `Message-ID:` and `From:` present: added at the end of the header section when the
//!   client left them out (old devices do), for every account kind.
//!
//! Everything else in the message is kept byte for byte: no header is rewritten here, raw 8-bit
//! and ISO-2022-JP headers pass as they came.

use std::net::IpAddr;

use crate::smtp::data::DotReader;
use crate::spool::{Client, Meta, Spool, SpoolError};

/// Longest envelope address accepted (RFC 5321 §4.5.3.1.3: a path is at most 256 octets).
pub const MAX_ADDRESS: usize = 254;

/// The header section is searched for missing fields up to this size; a message whose header
/// section is larger is passed on without additions.
const MAX_HEADER_SCAN: usize = 256 * 1024;

/// Why an envelope address was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("the address is empty")]
    Empty,
    #[error("the address contains a control character, line break or space")]
    Control,
    #[error("the address is longer than {MAX_ADDRESS} characters")]
    TooLong,
    #[error("the address needs the form local-part@domain")]
    NoDomain,
    #[error("the address is not valid ({0})")]
    Invalid(String),
    #[error("unbalanced angle brackets")]
    Brackets,
}

/// Whether an address is a sender (may be the null sender `<>`) or a recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressRole {
    Sender,
    Recipient,
}

/// Takes an envelope address the way devices write it and returns the bare address:
/// `<a@b>`, `a@b`, ` <a@b> `, and `Scan Destination <a@b>` (a display name before the bracket,
/// as some scan-to-mail firmware sends) all give `a@b`. Controls, spaces and line breaks inside
/// the address are refused (they would be header injection in a notification's `To:`). A
/// recipient needs `local@domain`; a sender may be empty (the null sender) or, for devices that
/// only know their own name, have no domain.
pub fn parse_address(raw: &str, role: AddressRole) -> Result<String, AddressError> {
    let s = raw.trim_matches([' ', '\t']);
    let inner = match (s.rfind('<'), s.ends_with('>')) {
        (Some(open), true) => &s[open + 1..s.len() - 1],
        (None, false) => s,
        _ => return Err(AddressError::Brackets),
    };
    if inner.contains(['<', '>']) {
        return Err(AddressError::Brackets);
    }
    if inner.chars().any(|c| c.is_control() || c == ' ') {
        return Err(AddressError::Control);
    }
    if inner.len() > MAX_ADDRESS {
        return Err(AddressError::TooLong);
    }
    match role {
        AddressRole::Sender if inner.is_empty() || !inner.contains('@') => Ok(inner.to_string()),
        AddressRole::Recipient if inner.is_empty() => Err(AddressError::Empty),
        _ => match inner.rsplit_once('@') {
            // The upstream's own rule (lettre's), so nothing accepted here is refused there.
            Some((local, domain)) if !local.is_empty() && !domain.is_empty() => {
                lettre::Address::from_str(inner)
                    .map(|_| inner.to_string())
                    .map_err(|e| AddressError::Invalid(e.to_string()))
            }
            _ => Err(AddressError::NoDomain),
        },
    }
}

use std::str::FromStr;

/// Where a message came from: decides the `with` clause of its `Received:` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A device over SMTP; `esmtp` when it greeted with EHLO.
    Smtp { esmtp: bool },
    /// `POST /api/v1/messages`.
    Http,
    /// A delivery status notification the relay wrote itself.
    Dsn,
    /// `exorelay send-test`.
    SendTest,
}

/// A new message's envelope and origin, before it has a queue ID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submission {
    pub source: Source,
    pub client: Client,
    /// Envelope sender, already through [`parse_address`]; empty for the null sender.
    pub mail_from: String,
    /// Envelope recipients, each through [`parse_address`].
    pub recipients: Vec<String>,
    /// The client declared 8-bit data (BODY=8BITMIME); 8-bit bytes seen are added at commit.
    pub eight_bit: bool,
    pub smtputf8: bool,
}

impl Submission {
    /// The trace header prepended to the message (RFC 5321 §4.4; `with` values per RFC 3848).
    pub fn received_header(&self, hostname: &str, id: &str) -> String {
        let with = match (self.source, self.client.tls, self.client.login.is_some()) {
            (Source::Smtp { esmtp: false }, false, false) => "SMTP",
            (Source::Smtp { .. }, true, true) => "ESMTPSA",
            (Source::Smtp { .. }, true, false) => "ESMTPS",
            (Source::Smtp { .. }, false, true) => "ESMTPA",
            (Source::Smtp { .. }, false, false) => "ESMTP",
            (Source::Http, true, _) => "HTTPS",
            (Source::Http, false, _) => "HTTP",
            (Source::Dsn | Source::SendTest, _, _) => "local",
        };
        let from = match self.source {
            Source::Smtp { .. } | Source::Http => format!(
                "from {} ([{}])\r\n\t",
                printable(&self.client.helo),
                self.client.ip
            ),
            Source::Dsn | Source::SendTest => String::new(),
        };
        let for_clause = match self.recipients.as_slice() {
            [one] => format!("\r\n\tfor <{}>", printable(one)),
            _ => String::new(),
        };
        let date = chrono::Utc::now().to_rfc2822();
        format!(
            "Received: {from}by {hostname} (exorelay) with {with} id {id}{for_clause}; {date}\r\n"
        )
    }

    /// The normaliser for this message's bytes: `Received:` first, then the content with line
    /// ends normalised and missing header fields added. `dotted` for SMTP DATA (dot-stuffed,
    /// ends at CRLF.CRLF); raw otherwise.
    pub fn normalizer(&self, hostname: &str, id: &str, dotted: bool) -> Normalizer {
        let from = if self.mail_from.is_empty() {
            format!("MAILER-DAEMON@{hostname}")
        } else {
            self.mail_from.clone()
        };
        let missing = MissingHeaders {
            date: chrono::Utc::now().to_rfc2822(),
            message_id: format!("<{id}@{hostname}>"),
            from,
        };
        Normalizer {
            reader: if dotted {
                DotReader::new()
            } else {
                DotReader::raw()
            },
            headers: HeaderCleanup::Scanning {
                buf: Vec::new(),
                checked: 0,
                seen: Seen::default(),
                missing,
            },
            prelude: Some(self.received_header(hostname, id)),
            scratch: Vec::new(),
        }
    }

    /// The spool meta for this message, delivered through `account`.
    pub fn meta(&self, account: &str) -> Meta {
        let mut meta = Meta::new(
            account,
            &self.mail_from,
            &self.recipients,
            self.client.clone(),
        );
        meta.eight_bit = self.eight_bit;
        meta.smtputf8 = self.smtputf8;
        meta
    }

    /// Queues a message that is whole in memory (HTTP, DSN, send-test): normalises `raw`,
    /// writes it and commits it. Returns the queue ID once the message is durable.
    pub async fn enqueue(
        mut self,
        spool: &std::sync::Arc<Spool>,
        hostname: &str,
        account: &str,
        raw: &[u8],
    ) -> Result<String, SpoolError> {
        let mut writer = spool.create().await?;
        let mut n = self.normalizer(hostname, writer.id(), false);
        let mut out = Vec::with_capacity(raw.len() + 512);
        let mut input = raw;
        n.feed(&mut input, &mut out);
        n.finish(&mut out);
        self.eight_bit |= n.eight_bit();
        if let Err(e) = writer.write(&out).await {
            writer.abort().await;
            return Err(e);
        }
        writer.commit(spool, self.meta(account)).await
    }
}

/// Drops what must not reach a header: controls and anything outside printable ASCII.
fn printable(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_graphic())
        .take(255)
        .collect()
}

/// A message's bytes on their way to the spool: framing (dot-stuffed or raw) and line ends via
/// [`DotReader`], then the header policy.
#[derive(Debug)]
pub struct Normalizer {
    reader: DotReader,
    headers: HeaderCleanup,
    /// The `Received:` line, written before the first content byte.
    prelude: Option<String>,
    scratch: Vec<u8>,
}

impl Normalizer {
    /// Consumes `input`, appending normalised bytes to `out`. For dotted input, returns true
    /// once the end of data has been consumed (what follows stays in `input`), after which the
    /// header section has been flushed into `out` too.
    pub fn feed(&mut self, input: &mut &[u8], out: &mut Vec<u8>) -> bool {
        if let Some(p) = self.prelude.take() {
            out.extend_from_slice(p.as_bytes());
        }
        let done = match &mut self.headers {
            HeaderCleanup::Passing => self.reader.feed(input, out),
            scanning => {
                self.scratch.clear();
                let done = self.reader.feed(input, &mut self.scratch);
                scanning.feed(&self.scratch, out);
                done
            }
        };
        if done {
            self.headers.finish(out);
        }
        done
    }

    /// The end of raw input: a last line without a line end gets CRLF; missing headers of a
    /// message that was all header are added.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if let Some(p) = self.prelude.take() {
            out.extend_from_slice(p.as_bytes());
        }
        self.scratch.clear();
        self.reader.finish(&mut self.scratch);
        match &mut self.headers {
            HeaderCleanup::Passing => out.extend_from_slice(&self.scratch),
            scanning => scanning.feed(&self.scratch, out),
        }
        self.headers.finish(out);
    }

    /// Bare CR or LF line ends normalised so far.
    pub fn bare_line_endings(&self) -> u64 {
        self.reader.bare_line_endings
    }

    /// 8-bit bytes seen in the content.
    pub fn eight_bit(&self) -> bool {
        self.reader.eight_bit
    }
}

#[derive(Debug, Default)]
struct Seen {
    date: bool,
    message_id: bool,
    from: bool,
}

#[derive(Debug)]
struct MissingHeaders {
    date: String,
    message_id: String,
    from: String,
}

/// The header policy over CRLF-only bytes: holds the header section back until its end is
/// known, then writes it with the missing fields appended.
#[derive(Debug)]
enum HeaderCleanup {
    Scanning {
        buf: Vec<u8>,
        /// Bytes of `buf` already judged to be header lines.
        checked: usize,
        seen: Seen,
        missing: MissingHeaders,
    },
    Passing,
}

impl HeaderCleanup {
    fn feed(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        let HeaderCleanup::Scanning {
            buf,
            checked,
            seen,
            missing,
        } = self
        else {
            out.extend_from_slice(bytes);
            return;
        };
        buf.extend_from_slice(bytes);
        while let Some(len) = memchr::memmem::find(&buf[*checked..], b"\r\n") {
            let line = &buf[*checked..*checked + len];
            let kind = classify(line);
            match kind {
                Line::Field(name) => {
                    seen.date |= name.eq_ignore_ascii_case(b"date");
                    seen.message_id |= name.eq_ignore_ascii_case(b"message-id");
                    seen.from |= name.eq_ignore_ascii_case(b"from");
                    *checked += len + 2;
                }
                Line::Continuation if *checked > 0 => *checked += len + 2,
                Line::Blank => {
                    // The header section ends here: what is missing goes in front of the blank
                    // line.
                    out.extend_from_slice(&buf[..*checked]);
                    add_missing(seen, missing, out);
                    out.extend_from_slice(&buf[*checked..]);
                    *self = HeaderCleanup::Passing;
                    return;
                }
                Line::Body | Line::Continuation if *checked == 0 => {
                    // No header at all, the text starts at once: the fields go in front of it,
                    // with the blank line that separates them from the text.
                    add_missing(seen, missing, out);
                    out.extend_from_slice(b"\r\n");
                    out.extend_from_slice(buf);
                    *self = HeaderCleanup::Passing;
                    return;
                }
                Line::Body | Line::Continuation => {
                    // A line that is neither a field nor the blank line, after some fields: the
                    // header section is malformed, and where it ends is a guess. Adding fields
                    // or a blank line here could push real headers (MIME-Version,
                    // Content-Type) into the body, so the message passes exactly as it came.
                    out.extend_from_slice(buf);
                    *self = HeaderCleanup::Passing;
                    return;
                }
            }
        }
        if buf.len() > MAX_HEADER_SCAN {
            out.extend_from_slice(buf);
            *self = HeaderCleanup::Passing;
        }
    }

    /// No more input: a message that was all header section gets its missing fields at its end.
    fn finish(&mut self, out: &mut Vec<u8>) {
        if let HeaderCleanup::Scanning {
            buf,
            checked,
            seen,
            missing,
        } = self
        {
            out.extend_from_slice(&buf[..*checked]);
            add_missing(seen, missing, out);
            if *checked < buf.len() {
                out.extend_from_slice(b"\r\n");
                out.extend_from_slice(&buf[*checked..]);
            }
        }
        *self = HeaderCleanup::Passing;
    }
}

fn add_missing(seen: &Seen, missing: &MissingHeaders, out: &mut Vec<u8>) {
    if !seen.date {
        out.extend_from_slice(format!("Date: {}\r\n", missing.date).as_bytes());
    }
    if !seen.message_id {
        out.extend_from_slice(format!("Message-ID: {}\r\n", missing.message_id).as_bytes());
    }
    if !seen.from {
        out.extend_from_slice(format!("From: <{}>\r\n", missing.from).as_bytes());
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line<'a> {
    Field(&'a [u8]),
    Continuation,
    Blank,
    Body,
}

/// A header field line is `name:` with a name of printable ASCII other than `:` (RFC 5322
/// §2.2), allowing the obsolete white space before the colon (`Subject : x`, §4.5); raw 8-bit
/// bytes after the colon are fine (old devices send them).
fn classify(line: &[u8]) -> Line<'_> {
    match line.first() {
        None => Line::Blank,
        Some(b' ' | b'\t') => Line::Continuation,
        Some(_) => match memchr::memchr(b':', line) {
            Some(colon) => {
                let name = trim_wsp_end(&line[..colon]);
                if !name.is_empty() && name.iter().all(|&b| (33..=126).contains(&b)) {
                    Line::Field(name)
                } else {
                    Line::Body
                }
            }
            None => Line::Body,
        },
    }
}

fn trim_wsp_end(mut s: &[u8]) -> &[u8] {
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// Client details for messages the relay makes itself (DSNs, send-test).
pub fn local_client(hostname: &str) -> Client {
    Client {
        ip: IpAddr::from([127, 0, 0, 1]),
        helo: hostname.to_string(),
        login: None,
        tls: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(from: &str) -> Submission {
        Submission {
            source: Source::Smtp { esmtp: true },
            client: Client {
                ip: IpAddr::from([192, 0, 2, 7]),
                helo: "scanner".into(),
                login: None,
                tls: false,
            },
            mail_from: from.into(),
            recipients: vec!["boss@example.com".into()],
            eight_bit: false,
            smtputf8: false,
        }
    }

    fn raw(s: &Submission, input: &[u8]) -> String {
        let mut n = s.normalizer("relay.test", "ID1", false);
        let mut out = Vec::new();
        let mut i = input;
        n.feed(&mut i, &mut out);
        n.finish(&mut out);
        String::from_utf8(out).unwrap()
    }

    fn without_received(s: &str) -> &str {
        let end = s.find("; ").unwrap();
        &s[s[end..].find("\r\n").unwrap() + end + 2..]
    }

    #[test]
    fn addresses_as_devices_write_them() {
        use AddressRole::*;
        for (raw, want) in [
            ("<a@b.example>", "a@b.example"),
            ("a@b.example", "a@b.example"),
            ("  <a@b.example>  ", "a@b.example"),
            ("Scan Destination <a@b.example>", "a@b.example"),
            ("\"Büro, 2F\" <a@b.example>", "a@b.example"),
        ] {
            assert_eq!(parse_address(raw, Recipient).as_deref(), Ok(want), "{raw}");
        }
        assert_eq!(parse_address("<>", Sender).as_deref(), Ok(""));
        assert_eq!(parse_address("scanner", Sender).as_deref(), Ok("scanner"));
        assert_eq!(parse_address("<>", Recipient), Err(AddressError::Empty));
        assert_eq!(
            parse_address("boss", Recipient),
            Err(AddressError::NoDomain)
        );
        assert_eq!(
            parse_address("a@b\r\nBcc: x@y", Recipient),
            Err(AddressError::Control)
        );
        assert_eq!(parse_address("a@b\0", Sender), Err(AddressError::Control));
        assert_eq!(parse_address("<a@b", Sender), Err(AddressError::Brackets));
        assert!(matches!(
            parse_address("a@b.example,c@d.example", Recipient),
            Err(AddressError::Invalid(_))
        ));
        assert!(matches!(
            parse_address("a;b@example.com", Sender),
            Err(AddressError::Invalid(_))
        ));
        assert_eq!(
            parse_address(&format!("{}@b", "a".repeat(300)), Sender),
            Err(AddressError::TooLong)
        );
    }

    #[test]
    fn missing_date_message_id_and_from_are_added_at_the_end_of_the_header() {
        let out = raw(
            &sub("scanner@printer.local"),
            b"Subject: scan\nX-A: 1\n\nbody\n",
        );
        assert!(out.starts_with("Received: from scanner ([192.0.2.7])\r\n\tby relay.test (exorelay) with ESMTP id ID1\r\n\tfor <boss@example.com>; "));
        let rest = without_received(&out);
        let (head, body) = rest.split_once("\r\n\r\n").unwrap();
        assert_eq!(body, "body\r\n");
        let lines: Vec<&str> = head.split("\r\n").collect();
        assert_eq!(lines[0], "Subject: scan");
        assert_eq!(lines[1], "X-A: 1");
        assert!(lines[2].starts_with("Date: "));
        assert_eq!(lines[3], "Message-ID: <ID1@relay.test>");
        assert_eq!(lines[4], "From: <scanner@printer.local>");
    }

    #[test]
    fn present_fields_are_kept_and_nothing_added() {
        let msg = "From: a@b\r\nDATE: x\r\nMessage-Id: <m@x>\r\n\r\nbody\r\n";
        let out = raw(&sub("a@b"), msg.as_bytes());
        assert_eq!(without_received(&out), msg);
    }

    #[test]
    fn body_without_header_gets_headers_and_a_blank_line() {
        let out = raw(&sub(""), b"hello world\r\nsecond\r\n");
        let rest = without_received(&out);
        assert!(
            rest.ends_with("From: <MAILER-DAEMON@relay.test>\r\n\r\nhello world\r\nsecond\r\n"),
            "{rest}"
        );
    }

    #[test]
    fn a_malformed_header_section_passes_unchanged() {
        // A line that is no field in the middle of the headers: nothing is added, nothing moved.
        let msg = "From: a@b\r\nX-Scanner \u{e9}t\u{e9}: 1\r\nMIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\nbody\r\n";
        let out = raw(&sub("a@b"), msg.as_bytes());
        assert_eq!(without_received(&out), msg);
        // The obsolete space before the colon is still a field.
        let msg = "Subject : scan\r\nMIME-Version: 1.0\r\n\r\nbody\r\n";
        let out = raw(&sub("a@b"), msg.as_bytes());
        let rest = without_received(&out);
        assert!(
            rest.starts_with("Subject : scan\r\nMIME-Version: 1.0\r\nDate: "),
            "{rest}"
        );
        assert!(rest.ends_with("From: <a@b>\r\n\r\nbody\r\n"), "{rest}");
    }

    #[test]
    fn raw_8bit_and_iso_2022_jp_headers_pass_unchanged() {
        let mut msg = b"Subject: caf\xe9 \x1b$B$3$s\x1b(B\r\nFrom: x@y\r\nDate: d\r\nMessage-ID: <a@b>\r\n\r\n\x82\xa0\r\n".to_vec();
        let mut n = sub("x@y").normalizer("h", "I", false);
        let mut out = Vec::new();
        let mut input = &msg[..];
        n.feed(&mut input, &mut out);
        n.finish(&mut out);
        assert!(n.eight_bit());
        let start = memchr::memmem::find(&out, b"Subject").unwrap();
        assert_eq!(&out[start..], &msg[..]);
        msg.clear();
    }

    #[test]
    fn dotted_input_ends_at_crlf_dot_crlf_and_flushes_headers() {
        let mut n = sub("a@b").normalizer("h", "I", true);
        let mut out = Vec::new();
        let mut input: &[u8] = b"Subject: s\r\n.\r\nQUIT\r\n";
        assert!(n.feed(&mut input, &mut out));
        assert_eq!(input, b"QUIT\r\n");
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("Subject: s\r\nDate: "), "{text}");
        assert!(text.ends_with("From: <a@b>\r\n"), "{text}");
    }

    #[test]
    fn header_split_across_feeds() {
        let s = sub("a@b");
        let msg = b"Subject: x\r\nFrom: q@r\r\n\r\nbody\r\n";
        for split in 0..msg.len() {
            let mut n = s.normalizer("h", "I", false);
            let mut out = Vec::new();
            let (a, b) = msg.split_at(split);
            let mut i = a;
            n.feed(&mut i, &mut out);
            let mut i = b;
            n.feed(&mut i, &mut out);
            n.finish(&mut out);
            let text = String::from_utf8(out).unwrap();
            let rest = without_received(&text);
            assert!(
                rest.starts_with("Subject: x\r\nFrom: q@r\r\nDate: "),
                "split {split}: {rest}"
            );
            assert!(
                rest.ends_with("Message-ID: <I@h>\r\n\r\nbody\r\n"),
                "split {split}: {rest}"
            );
        }
    }
}

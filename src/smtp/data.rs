//! The DATA reader: the one place that decides where a message ends.
//!
//! Rules (the SMTP-smuggling defence):
//! - only the exact bytes `CR LF . CR LF` end the message (or `. CR LF` as its very first line):
//!   a `.` line that was begun by a bare LF or bare CR, or ended by one, is content. Postfix and
//!   Exchange read bare line ends differently from us, so any other spelling of "end of data" is
//!   where a smuggled second message would hide;
//! - every bare CR and bare LF inside the message becomes CRLF before it reaches the spool, so no
//!   ambiguous line ending is ever forwarded (Postfix's `smtpd_forbid_bare_newline = normalize`);
//! - a leading dot is removed from lines that have more after it (RFC 5321 §4.5.2).

use memchr::memchr2;

/// Published SMTP-smuggling end-of-data spellings (SEC Consult's catalogue and the follow-ups
/// by Postfix and Sendmail). None of them ends DATA here; the tests, unit and end to end, use
/// this list.
#[doc(hidden)]
pub const FALSE_END_OF_DATA: &[&[u8]] = &[
    b"\n.\n",
    b"\n.\r\n",
    b"\r.\r",
    b"\r.\n",
    b"\r.\r\n",
    b"\r\n.\r",
    b"\r\n.\n",
    b"\r\n.\r\r\n",
    b"\r\n\x00.\r\n",
    b"\r\n.\x00\r\n",
    b"\n\n.\n\n",
    b"\r\r.\r\r",
    b"\r\n .\r\n",
    b"\r\n.. \r\n",
];

#[derive(Debug, Clone, Default)]
pub struct DotReader {
    /// The next byte does not start a line (false at the start of the message).
    mid_line: bool,
    /// The current line was begun by a bare CR or LF, so a lone `.` on it is content.
    after_bare: bool,
    /// A line-leading dot seen and not yet emitted or dropped.
    held_dot: bool,
    /// The last byte was a CR whose partner has not been seen yet.
    pending_cr: bool,
    /// Bare CR or LF line endings normalised so far.
    pub bare_line_endings: u64,
    /// Any byte >= 0x80 seen.
    pub eight_bit: bool,
    /// Raw content (HTTP submission, generated messages): no dot-stuffing and no end marker;
    /// only the line-end rules apply, and [`DotReader::finish`] ends the message.
    raw: bool,
}

impl DotReader {
    /// A reader for SMTP DATA: dot-stuffed, ended by `CRLF.CRLF`.
    pub fn new() -> DotReader {
        DotReader::default()
    }

    /// A reader for a message that is not dot-stuffed: bytes are only normalised.
    pub fn raw() -> DotReader {
        DotReader {
            raw: true,
            ..DotReader::default()
        }
    }

    /// The end of raw input: a trailing bare CR becomes CRLF, and a last line without a line
    /// end gets one.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if std::mem::take(&mut self.pending_cr) {
            self.end_line(out, true);
        } else if self.mid_line {
            self.end_line(out, false);
        }
    }

    /// Ends the current line in the output; `bare` when the input ended it with a lone CR or LF.
    fn end_line(&mut self, out: &mut Vec<u8>, bare: bool) {
        out.extend_from_slice(b"\r\n");
        self.mid_line = false;
        self.after_bare = bare;
        if bare {
            self.bare_line_endings += 1;
        }
    }

    /// Consumes bytes from `input` and appends message content to `out`. Returns true once the
    /// terminating `CRLF.CRLF` has been consumed; whatever follows it is left in `input`
    /// (pipelined commands).
    pub fn feed(&mut self, input: &mut &[u8], out: &mut Vec<u8>) -> bool {
        let buf = *input;
        let mut i = 0;
        while i < buf.len() {
            let b = buf[i];
            if self.pending_cr {
                self.pending_cr = false;
                if b == b'\n' {
                    i += 1;
                    if self.held_dot {
                        self.held_dot = false;
                        if !self.after_bare {
                            // CRLF "." CRLF: the end of the data.
                            *input = &buf[i..];
                            return true;
                        }
                        // A "." line begun by a bare line end: content.
                        out.push(b'.');
                    }
                    self.end_line(out, false);
                    continue;
                }
                // A bare CR: it still ends the line, written as CRLF; `b` is looked at again.
                if self.held_dot {
                    self.held_dot = false;
                    out.push(b'.');
                }
                self.end_line(out, true);
                continue;
            }
            if self.held_dot {
                match b {
                    b'\r' => {
                        self.pending_cr = true;
                        i += 1;
                        continue;
                    }
                    b'\n' => {
                        // "." ended by a bare LF: content, not the end of the message.
                        self.held_dot = false;
                        out.push(b'.');
                        self.end_line(out, true);
                        i += 1;
                        continue;
                    }
                    _ => {
                        // A stuffed dot: drop it and read `b` as content.
                        self.held_dot = false;
                        self.mid_line = true;
                    }
                }
            } else if !self.raw && !self.mid_line && b == b'.' {
                self.held_dot = true;
                i += 1;
                continue;
            }
            let rest = &buf[i..];
            match memchr2(b'\r', b'\n', rest) {
                None => {
                    self.copy(rest, out);
                    self.mid_line = true;
                    i = buf.len();
                }
                Some(off) => {
                    self.copy(&rest[..off], out);
                    i += off + 1;
                    if rest[off] == b'\r' {
                        self.mid_line = true;
                        self.pending_cr = true;
                    } else {
                        self.end_line(out, true);
                    }
                }
            }
        }
        *input = &[];
        false
    }

    fn copy(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        if !self.eight_bit && bytes.iter().any(|&b| b >= 0x80) {
            self.eight_bit = true;
        }
        out.extend_from_slice(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Feeds `wire` in chunks of `chunk` bytes; returns (message, done, leftover).
    fn read(wire: &[u8], chunk: usize) -> (Vec<u8>, bool, Vec<u8>) {
        let mut r = DotReader::new();
        let mut out = Vec::new();
        for (n, piece) in wire.chunks(chunk.max(1)).enumerate() {
            let mut input = piece;
            if r.feed(&mut input, &mut out) {
                let consumed_before: usize =
                    wire.chunks(chunk.max(1)).take(n).map(|c| c.len()).sum();
                let used = piece.len() - input.len();
                return (out, true, wire[consumed_before + used..].to_vec());
            }
        }
        (out, false, Vec::new())
    }

    fn stuff(msg: &[u8]) -> Vec<u8> {
        let mut w = Vec::new();
        for line in msg.split_inclusive(|&b| b == b'\n') {
            if line.first() == Some(&b'.') {
                w.push(b'.');
            }
            w.extend_from_slice(line);
        }
        w.extend_from_slice(b".\r\n");
        w
    }

    #[test]
    fn plain_message_and_pipelined_tail() {
        let (msg, done, rest) = read(b"Subject: a\r\n\r\nhi\r\n..dot\r\n.\r\nQUIT\r\n", 1000);
        assert!(done);
        assert_eq!(msg, b"Subject: a\r\n\r\nhi\r\n.dot\r\n");
        assert_eq!(rest, b"QUIT\r\n");
    }

    #[test]
    fn empty_message() {
        let (msg, done, _) = read(b".\r\n", 10);
        assert!(done);
        assert!(msg.is_empty());
    }

    #[test]
    fn bare_lf_is_normalised_and_never_ends_data() {
        let wire = b"a\nb\r\nsmuggle\n.\nMAIL FROM:<evil@x>\r\nx\r\r\n.\r\n";
        for chunk in 1..wire.len() {
            let (msg, done, rest) = read(wire, chunk);
            assert!(done, "chunk {chunk}");
            assert!(rest.is_empty());
            assert_eq!(
                msg, b"a\r\nb\r\nsmuggle\r\n.\r\nMAIL FROM:<evil@x>\r\nx\r\n\r\n",
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn dot_bare_cr_is_not_the_end() {
        let (msg, done, _) = read(b"x\r\n.\rMAIL\r\n.\r\n", 3);
        assert!(done);
        assert_eq!(msg, b"x\r\n.\r\nMAIL\r\n");
    }

    #[test]
    fn raw_mode_only_normalises() {
        let mut r = DotReader::raw();
        let mut out = Vec::new();
        let mut input: &[u8] = b"a\n.\r\n..b\r\n.\r";
        assert!(!r.feed(&mut input, &mut out));
        r.finish(&mut out);
        assert_eq!(out, b"a\r\n.\r\n..b\r\n.\r\n");
        let mut r = DotReader::raw();
        let mut out = Vec::new();
        let mut input: &[u8] = b"no line end";
        r.feed(&mut input, &mut out);
        r.finish(&mut out);
        assert_eq!(out, b"no line end\r\n");
    }

    #[test]
    fn eight_bit_detected() {
        let mut r = DotReader::new();
        let mut out = Vec::new();
        let mut input: &[u8] = "Subject: caf\u{e9}\r\n".as_bytes();
        r.feed(&mut input, &mut out);
        assert!(r.eight_bit);
    }

    /// The reference model of where DATA ends: the first `CR LF . CR LF`, or `. CR LF` as the
    /// very first line. Returns the index just past the terminator.
    fn model_end(wire: &[u8]) -> Option<usize> {
        if wire.starts_with(b".\r\n") {
            return Some(3);
        }
        wire.windows(5)
            .position(|w| w == b"\r\n.\r\n")
            .map(|p| p + 5)
    }

    #[test]
    fn smuggling_catalogue_never_ends_data_at_any_split() {
        for seq in FALSE_END_OF_DATA {
            let mut wire = b"Subject: x\r\n\r\nbody".to_vec();
            wire.extend_from_slice(seq);
            let smuggled = b"MAIL FROM:<evil@x>\r\nRCPT TO:<victim@y>\r\nDATA\r\nforged\r\n";
            wire.extend_from_slice(smuggled);
            wire.extend_from_slice(b"\r\n.\r\nQUIT\r\n");
            for split in 0..=wire.len() {
                let mut r = DotReader::new();
                let mut out = Vec::new();
                let (a, b) = wire.split_at(split);
                let mut input = a;
                let mut done = r.feed(&mut input, &mut out);
                let mut rest = [input, b].concat();
                if !done {
                    let mut input = b;
                    done = r.feed(&mut input, &mut out);
                    rest = input.to_vec();
                }
                assert!(done, "{seq:?} split {split}");
                assert_eq!(rest, b"QUIT\r\n", "{seq:?} split {split}: ended early");
                let text = String::from_utf8_lossy(&out);
                assert!(
                    text.contains("MAIL FROM:<evil@x>"),
                    "{seq:?}: smuggled part is content"
                );
                for (i, &c) in out.iter().enumerate() {
                    assert!(
                        c != b'\n' || (i > 0 && out[i - 1] == b'\r'),
                        "{seq:?}: bare LF kept"
                    );
                    assert!(
                        c != b'\r' || out.get(i + 1) == Some(&b'\n'),
                        "{seq:?}: bare CR kept"
                    );
                }
            }
        }
    }

    #[test]
    fn lf_dot_crlf_is_content() {
        // The review's case: a bare LF before ".\r\n" used to end DATA.
        let (msg, done, rest) = read(b"body\n.\r\nMAIL FROM:<evil@x>\r\n.\r\n", 1000);
        assert!(done);
        assert!(rest.is_empty());
        assert_eq!(msg, b"body\r\n.\r\nMAIL FROM:<evil@x>\r\n");
        let (msg, _, rest) = read(b"body\r.\r\nRSET\r\n.\r\n", 1);
        assert!(rest.is_empty());
        assert_eq!(msg, b"body\r\n.\r\nRSET\r\n");
    }

    proptest! {
        #[test]
        fn ends_exactly_where_the_model_says(
            wire in proptest::collection::vec(prop_oneof![
                4 => Just(b'\r'), 4 => Just(b'\n'), 4 => Just(b'.'), 2 => Just(b'a'), 1 => Just(0u8)
            ], 0..120),
            chunk in 1usize..9,
        ) {
            let (_, done, rest) = read(&wire, chunk);
            match model_end(&wire) {
                Some(end) => {
                    prop_assert!(done);
                    prop_assert_eq!(rest, wire[end..].to_vec());
                }
                None => prop_assert!(!done),
            }
        }

        #[test]
        fn crlf_messages_round_trip(lines in proptest::collection::vec("[ -~]{0,20}", 0..20), chunk in 1usize..40) {
            let msg: Vec<u8> = lines.iter().flat_map(|l| format!("{l}\r\n").into_bytes()).collect();
            let (out, done, rest) = read(&stuff(&msg), chunk);
            prop_assert!(done);
            prop_assert!(rest.is_empty());
            prop_assert_eq!(out, msg);
        }

        #[test]
        fn output_never_has_bare_line_endings(wire in proptest::collection::vec(prop_oneof![Just(b'\r'), Just(b'\n'), Just(b'.'), Just(b'a')], 0..200), chunk in 1usize..17) {
            let (out, _, _) = read(&wire, chunk);
            for (i, &b) in out.iter().enumerate() {
                if b == b'\n' { prop_assert!(i > 0 && out[i - 1] == b'\r'); }
                if b == b'\r' { prop_assert!(out.get(i + 1) == Some(&b'\n')); }
            }
        }
    }
}

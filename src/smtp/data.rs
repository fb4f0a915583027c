//! The DATA reader: the one place that decides where a message ends.
//!
//! Rules (the SMTP-smuggling defence):
//! - only `CRLF . CRLF` ends the message; a `.` line ended by a bare LF or bare CR does not;
//! - every bare CR and bare LF inside the message becomes CRLF before it reaches the spool, so no
//!   ambiguous line ending is ever forwarded (Postfix's `smtpd_forbid_bare_newline = normalize`);
//! - a leading dot is removed from lines that have more after it (RFC 5321 §4.5.2).

use memchr::memchr2;

#[derive(Debug, Clone, Default)]
pub struct DotReader {
    /// The next byte starts a line (true at the start of the message).
    mid_line: bool,
    /// A line-leading dot seen and not yet emitted or dropped.
    held_dot: bool,
    /// The last byte was a CR whose partner has not been seen yet.
    pending_cr: bool,
    /// Bare CR or LF line endings normalised so far.
    pub bare_line_endings: u64,
    /// Any byte >= 0x80 seen.
    pub eight_bit: bool,
}

impl DotReader {
    pub fn new() -> DotReader {
        DotReader::default()
    }

    fn end_line(&mut self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"\r\n");
        self.mid_line = false;
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
                        // The line was exactly "." with CRLF: end of data.
                        self.held_dot = false;
                        *input = &buf[i..];
                        return true;
                    }
                    self.end_line(out);
                    continue;
                }
                // A bare CR: it still ends the line, written as CRLF; `b` is looked at again.
                self.bare_line_endings += 1;
                if self.held_dot {
                    self.held_dot = false;
                    out.push(b'.');
                }
                self.end_line(out);
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
                        self.bare_line_endings += 1;
                        out.push(b'.');
                        self.end_line(out);
                        i += 1;
                        continue;
                    }
                    _ => {
                        // A stuffed dot: drop it and read `b` as content.
                        self.held_dot = false;
                        self.mid_line = true;
                    }
                }
            } else if !self.mid_line && b == b'.' {
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
                        self.bare_line_endings += 1;
                        self.end_line(out);
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
    fn eight_bit_detected() {
        let mut r = DotReader::new();
        let mut out = Vec::new();
        let mut input: &[u8] = "Subject: caf\u{e9}\r\n".as_bytes();
        r.feed(&mut input, &mut out);
        assert!(r.eight_bit);
    }

    proptest! {
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

#![no_main]
//! Drives the SMTP session state machine with arbitrary bytes through a fake driver (the spool
//! always works, one password is right), in arbitrary read sizes. It must never panic or stall,
//! and whatever it commits must be free of bare CR/LF (the smuggling defence).
use std::sync::Arc;

use exorelay::config::AuthMode;
use exorelay::smtp::session::{AuthOutcome, Session, SessionParams, Step};
use libfuzzer_sys::fuzz_target;

/// Maps raw input into something close to SMTP so the fuzzer reaches deep states quickly.
fn smtpish(data: &[u8]) -> Vec<u8> {
    const WORDS: [&[u8]; 16] = [
        b"EHLO x\r\n",
        b"HELO\n",
        b"MAIL FROM:<a@b>\r\n",
        b"RCPT TO:<c@d>\r\n",
        b"DATA\r\n",
        b"\r\n.\r\n",
        b".\r\n",
        b"AUTH PLAIN AHUAcHc=\r\n",
        b"AUTH LOGIN\r\n",
        b"STARTTLS\r\n",
        b"RSET\r\n",
        b"\n.\n",
        b"..",
        b"\r",
        b"\n",
        b"QUIT\r\n",
    ];
    let mut out = Vec::with_capacity(data.len() * 4);
    for &b in data {
        if b >= 0xF0 {
            out.extend_from_slice(WORDS[(b & 0x0F) as usize]);
        } else {
            out.push(b);
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let (split, raw) = match data.split_first() {
        Some((s, rest)) => ((*s as usize % 64) + 1, rest),
        None => return,
    };
    let input = smtpish(raw);
    let params = Arc::new(SessionParams {
        hostname: "fuzz.test".into(),
        starttls: true,
        auth: AuthMode::Optional,
        plaintext_auth: true,
        max_message_size: 4096,
        max_recipients: 3,
        max_errors: 20,
    });
    let mut s = Session::new(params, "127.0.0.1".parse().unwrap(), true, false);
    let mut body = Vec::new();
    for piece in input.chunks(split) {
        let mut rest = piece;
        let mut guard = 0;
        loop {
            guard += 1;
            assert!(guard < 100_000, "session does not make progress");
            match s.advance(&mut rest) {
                Step::Read => {
                    if rest.is_empty() {
                        break;
                    }
                }
                Step::Authenticate(c) => {
                    let ok = if c.password == "pw" {
                        AuthOutcome::Success
                    } else {
                        AuthOutcome::Failure
                    };
                    s.auth_result(&c.user, ok);
                }
                Step::OpenMessage => {
                    body.clear();
                    s.message_opened(Ok("ID".into()));
                }
                Step::Body => {
                    body.extend_from_slice(s.body());
                    s.body_written(Ok(()));
                }
                Step::Commit { .. } => {
                    for (i, &b) in body.iter().enumerate() {
                        if b == b'\n' {
                            assert!(i > 0 && body[i - 1] == b'\r', "bare LF committed");
                        }
                        if b == b'\r' {
                            assert_eq!(body.get(i + 1), Some(&b'\n'), "bare CR committed");
                        }
                    }
                    s.committed(Ok("ID"));
                }
                Step::AbortMessage => body.clear(),
                Step::StartTls => {
                    rest = &[];
                    s.tls_started();
                }
                Step::Close => return,
            }
        }
        s.outbox().clear();
    }
});

//! SMTP replies as data. Every reply the relay sends is built here, so the wording and the
//! enhanced status codes (RFC 3463) live in one place.

use std::borrow::Cow;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// Enhanced status code such as "2.0.0"; empty only where RFC 2034 forbids one
    /// (the 220 greeting and 334 SASL challenges).
    pub enhanced: &'static str,
    /// One or more lines; each becomes its own reply line.
    pub text: Cow<'static, str>,
}

impl Reply {
    pub fn new(code: u16, enhanced: &'static str, text: impl Into<Cow<'static, str>>) -> Reply {
        Reply {
            code,
            enhanced,
            text: text.into(),
        }
    }

    pub fn is_error(&self) -> bool {
        self.code >= 400
    }

    /// Appends the wire form (`code[-| ]enhanced text\r\n` per line) to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let lines: Vec<&str> = self.text.split('\n').collect();
        let last = lines.len().saturating_sub(1);
        for (i, line) in lines.iter().enumerate() {
            let sep = if i == last { ' ' } else { '-' };
            let line = line.trim_end_matches('\r');
            let mut s = format!("{}{}", self.code, sep);
            if !self.enhanced.is_empty() {
                s.push_str(self.enhanced);
                if !line.is_empty() {
                    s.push(' ');
                }
            }
            s.push_str(line);
            s.push_str("\r\n");
            out.extend_from_slice(s.as_bytes());
        }
    }
}

// The replies used by the session, named by meaning.
pub fn ok() -> Reply {
    Reply::new(250, "2.0.0", "OK")
}
pub fn bye(host: &str) -> Reply {
    Reply::new(221, "2.0.0", format!("{host} closing connection"))
}
pub fn syntax(text: impl Into<Cow<'static, str>>) -> Reply {
    Reply::new(501, "5.5.4", text)
}
pub fn bad_sequence(text: &'static str) -> Reply {
    Reply::new(503, "5.5.1", text)
}
pub fn unrecognized() -> Reply {
    Reply::new(500, "5.5.1", "Command unrecognized")
}
pub fn not_implemented() -> Reply {
    Reply::new(502, "5.5.1", "Command not implemented")
}
pub fn line_too_long() -> Reply {
    Reply::new(500, "5.5.2", "Line too long")
}
pub fn too_many_errors() -> Reply {
    Reply::new(421, "4.7.0", "Too many errors on this connection, closing")
}
pub fn timeout(host: &str) -> Reply {
    Reply::new(
        421,
        "4.4.2",
        format!("{host} timeout waiting for client input, closing connection"),
    )
}
pub fn shutting_down(host: &str) -> Reply {
    Reply::new(
        421,
        "4.3.0",
        format!("{host} is shutting down, try again later"),
    )
}
pub fn too_many_connections() -> Reply {
    Reply::new(421, "4.7.0", "Too many connections, try again later")
}
pub fn too_many_connections_from_client() -> Reply {
    Reply::new(
        421,
        "4.7.0",
        "Too many connections from your address, try again later",
    )
}
pub fn too_many_strangers() -> Reply {
    Reply::new(
        421,
        "4.7.0",
        "Too many connections from outside the allowed networks, try again later",
    )
}
pub fn too_many_not_logged_in_from_client() -> Reply {
    Reply::new(
        421,
        "4.7.0",
        "Too many connections from your address that have not logged in, try again later",
    )
}
pub fn banned() -> Reply {
    Reply::new(
        421,
        "4.7.0",
        "Too many failed logins from your address; try again later",
    )
}
pub fn local_error() -> Reply {
    Reply::new(451, "4.3.0", "Local error in processing, try again later")
}
pub fn storage_full() -> Reply {
    Reply::new(452, "4.3.1", "Insufficient system storage, try again later")
}
pub fn message_too_big(max: u64) -> Reply {
    Reply::new(
        552,
        "5.3.4",
        format!("Message size exceeds fixed maximum message size ({max} bytes)"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_line_reply() {
        let mut out = Vec::new();
        Reply::new(250, "", "a\nb\nc").write_to(&mut out);
        assert_eq!(out, b"250-a\r\n250-b\r\n250 c\r\n");
        out.clear();
        Reply::new(550, "5.7.1", "Relaying denied").write_to(&mut out);
        assert_eq!(out, b"550 5.7.1 Relaying denied\r\n");
        out.clear();
        Reply::new(334, "", "").write_to(&mut out);
        assert_eq!(out, b"334 \r\n");
    }
}

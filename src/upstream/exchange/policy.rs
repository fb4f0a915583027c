//! Sender policy for Exchange: the `From:` header becomes the mailbox, keeping the device's
//! display name; the original address goes to `Reply-To` when there is none; missing `Date` and
//! `Message-ID` are added. Edits are byte splices of the header section: every other byte of
//! the message, the body above all, stays exactly as it was.

use mail_parser::{HeaderName, MessageParser};

/// What [`rewrite`] did, for the log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Rewritten {
    pub original_from: Option<String>,
    pub added: Vec<&'static str>,
}

fn unfold(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    text.replace("\r\n", "")
        .replace('\n', "")
        .trim()
        .to_string()
}

/// Splits a raw `From:` value into (display name as written, address).
fn split_from(value: &str) -> (Option<String>, String) {
    if let (Some(lt), Some(gt)) = (value.find('<'), value.rfind('>'))
        && lt < gt
    {
        let display = value[..lt].trim();
        let addr = value[lt + 1..gt].trim().to_string();
        return ((!display.is_empty()).then(|| display.to_string()), addr);
    }
    // "addr (Name)" or a bare address.
    if let (Some(open), Some(close)) = (value.find('('), value.rfind(')'))
        && open < close
    {
        let name = value[open + 1..close].trim();
        let addr = value[..open].trim().to_string();
        return ((!name.is_empty()).then(|| name.to_string()), addr);
    }
    (None, value.trim().to_string())
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// A display name safe to put before `<mailbox>`: kept verbatim when it is already quoted or
/// an encoded word or plain words, quoted otherwise.
fn display_phrase(display: &str) -> String {
    let plain = display
        .chars()
        .all(|c| c.is_alphanumeric() || " !#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii());
    let quoted = display.starts_with('"') && display.ends_with('"') && display.len() >= 2;
    if quoted || display.starts_with("=?") || plain {
        display.to_string()
    } else {
        quote(display)
    }
}

/// Rewrites the header section of `msg` (which starts with our `Received:` header).
/// `mailbox` is the address Exchange sends as; `hostname` is used for a new Message-ID.
pub fn rewrite(msg: &[u8], mailbox: &str, hostname: &str, queue_id: &str) -> (Vec<u8>, Rewritten) {
    let mut report = Rewritten::default();
    let Some(parsed) = MessageParser::default().parse_headers(msg) else {
        return (msg.to_vec(), report);
    };
    let headers = parsed.headers();
    let insert_at = headers
        .first()
        .filter(|h| matches!(&h.name, HeaderName::Received))
        .map(|h| h.offset_end as usize)
        .unwrap_or(0);
    let from = headers.iter().find(|h| h.name == HeaderName::From);
    let has = |n: HeaderName| headers.iter().any(|h| h.name == n);

    let mut added = String::new();
    let mut splice: Option<(usize, usize, String)> = None;
    match from {
        Some(h) => {
            let raw_value = &msg[h.offset_start as usize..(h.offset_end as usize).min(msg.len())];
            let value = unfold(raw_value);
            let (display, old_addr) = split_from(&value);
            if old_addr.eq_ignore_ascii_case(mailbox) {
                // Already the mailbox: nothing to change in From.
            } else {
                let phrase = match &display {
                    Some(d) => display_phrase(d),
                    None => quote(&old_addr),
                };
                splice = Some((
                    h.offset_field as usize,
                    h.offset_end as usize,
                    format!("From: {phrase} <{mailbox}>\r\n"),
                ));
                if !has(HeaderName::ReplyTo) && old_addr.contains('@') {
                    // The raw value keeps its original folding and encoding.
                    let raw = String::from_utf8_lossy(raw_value);
                    let raw = raw.trim_end_matches(['\r', '\n']);
                    added.push_str(&format!(
                        "Reply-To:{}{raw}\r\n",
                        if raw.starts_with([' ', '\t']) {
                            ""
                        } else {
                            " "
                        }
                    ));
                    report.added.push("Reply-To");
                }
                report.original_from = Some(old_addr);
            }
        }
        None => {
            added.push_str(&format!("From: <{mailbox}>\r\n"));
            report.added.push("From");
        }
    }
    if !has(HeaderName::Date) {
        added.push_str(&format!("Date: {}\r\n", chrono::Utc::now().to_rfc2822()));
        report.added.push("Date");
    }
    if !has(HeaderName::MessageId) {
        added.push_str(&format!(
            "Message-ID: <{queue_id}.{}@{hostname}>\r\n",
            chrono::Utc::now().timestamp()
        ));
        report.added.push("Message-ID");
    }

    let mut out = Vec::with_capacity(msg.len() + added.len() + 128);
    match splice {
        Some((start, end, new_from)) => {
            let (first, second) = if insert_at <= start {
                (insert_at, start)
            } else {
                (start, start)
            };
            out.extend_from_slice(&msg[..first]);
            out.extend_from_slice(added.as_bytes());
            out.extend_from_slice(&msg[first..second]);
            out.extend_from_slice(new_from.as_bytes());
            out.extend_from_slice(&msg[end.min(msg.len())..]);
        }
        None => {
            out.extend_from_slice(&msg[..insert_at]);
            out.extend_from_slice(added.as_bytes());
            out.extend_from_slice(&msg[insert_at..]);
        }
    }
    (out, report)
}

#[cfg(test)]
mod tests {
    use super::*;

    const RCVD: &str = "Received: from x ([127.0.0.1])\r\n\tby relay (exorelay) with ESMTP id A; Tue, 1 Jan 2030 00:00:00 +0000\r\n";

    fn body_of(m: &[u8]) -> &[u8] {
        let pos = m.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        &m[pos..]
    }

    #[test]
    fn display_name_kept_reply_to_added() {
        let msg = format!(
            "{RCVD}From: \"Scanner 2F\" <scanner@printer.local>\r\nSubject: s\r\nDate: x\r\nMessage-ID: <a@b>\r\n\r\nbody\r\n"
        );
        let (out, rep) = rewrite(msg.as_bytes(), "relay@contoso.com", "relay.lan", "ID");
        let text = String::from_utf8(out.clone()).unwrap();
        assert!(
            text.contains("From: \"Scanner 2F\" <relay@contoso.com>\r\n"),
            "{text}"
        );
        assert!(
            text.contains("Reply-To: \"Scanner 2F\" <scanner@printer.local>\r\n"),
            "{text}"
        );
        assert!(text.starts_with(RCVD));
        assert_eq!(rep.original_from.as_deref(), Some("scanner@printer.local"));
        assert_eq!(body_of(&out), b"\r\n\r\nbody\r\n");
    }

    #[test]
    fn bare_address_becomes_display_name_and_missing_headers_added() {
        let msg = format!("{RCVD}From: scanner@printer.local\r\nSubject: s\r\n\r\nbody\r\n");
        let (out, rep) = rewrite(msg.as_bytes(), "relay@contoso.com", "relay.lan", "ID1");
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("From: \"scanner@printer.local\" <relay@contoso.com>\r\n"),
            "{text}"
        );
        assert!(text.contains("\r\nDate: "), "{text}");
        assert!(text.contains("\r\nMessage-ID: <ID1."), "{text}");
        assert_eq!(rep.added, ["Reply-To", "Date", "Message-ID"]);
    }

    #[test]
    fn folded_encoded_from_and_iso2022jp_body_untouched() {
        let body: &[u8] = b"\r\n\x1b$B$3$s$K$A$O\x1b(B\r\n\x82\xb1\r\n";
        let mut msg = format!("{RCVD}Subject: =?ISO-2022-JP?B?GyRCJDMkcyRLJEEkTxsoQg==?=\r\nFrom: =?ISO-2022-JP?B?GyRCJDMkcxsoQg==?=\r\n <scanner@printer.local>\r\nReply-To: other@x.example\r\nDate: d\r\nMessage-ID: <m@x>\r\n").into_bytes();
        msg.extend_from_slice(body);
        let (out, rep) = rewrite(&msg, "relay@contoso.com", "h", "ID");
        let text = String::from_utf8_lossy(&out);
        assert!(
            text.contains("From: =?ISO-2022-JP?B?GyRCJDMkcxsoQg==?= <relay@contoso.com>\r\n"),
            "{text}"
        );
        assert!(text.contains("Subject: =?ISO-2022-JP?B?GyRCJDMkcyRLJEEkTxsoQg==?=\r\n"));
        assert!(
            !text.contains("Reply-To: =?"),
            "existing Reply-To must win: {text}"
        );
        assert!(rep.added.is_empty());
        assert!(out.ends_with(body));
    }

    #[test]
    fn from_already_mailbox_is_left_alone() {
        let msg = format!(
            "{RCVD}From: Relay <relay@contoso.com>\r\nDate: d\r\nMessage-ID: <m@x>\r\n\r\nb\r\n"
        );
        let (out, rep) = rewrite(msg.as_bytes(), "relay@contoso.com", "h", "ID");
        assert_eq!(out, msg.as_bytes());
        assert_eq!(rep, Rewritten::default());
    }
}

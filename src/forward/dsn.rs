//! Delivery status notifications (RFC 3464 `multipart/report`) for messages given up on.

use crate::spool::{Meta, RecipientStatus};

/// The enhanced status code at the start of an SMTP reply text ("550 5.1.10 ..." → "5.1.10").
fn enhanced_code(reply: &str) -> Option<&str> {
    reply.split_whitespace().find(|w| {
        let parts: Vec<&str> = w.split('.').collect();
        parts.len() == 3
            && matches!(parts[0], "4" | "5")
            && parts[1..]
                .iter()
                .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// The header section of `message` (without the blank line), at most 64 KiB.
pub fn header_section(message: &[u8]) -> &[u8] {
    let end = message
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 2)
        .unwrap_or(message.len());
    &message[..end.min(64 * 1024)]
}

/// Builds the report sent to `to` for the failed recipients of `meta`.
pub fn build(meta: &Meta, original_headers: &[u8], hostname: &str, to: &str) -> Vec<u8> {
    let boundary = format!("exorelay-dsn-{}", meta.id);
    let date = chrono::Utc::now().to_rfc2822();
    let failed: Vec<_> = meta
        .recipients
        .iter()
        .filter(|r| r.status == RecipientStatus::Failed)
        .collect();
    let mut text = format!(
        "This is the mail relay exorelay at {hostname}.\r\n\r\nYour message (queue ID {}, received {}) could not be delivered to the following recipients:\r\n\r\n",
        meta.id,
        meta.received_at.to_rfc2822()
    );
    for r in &failed {
        text.push_str(&format!(
            "  <{}>\r\n    {}\r\n",
            r.address,
            r.last_reply.as_deref().unwrap_or("no reason recorded")
        ));
    }
    text.push_str("\r\nThe message's headers are attached. If you are not the administrator of this relay, forward this report to them.\r\n");

    let mut status = format!(
        "Reporting-MTA: dns; {hostname}\r\nX-Exorelay-Queue-ID: {}\r\nArrival-Date: {}\r\n",
        meta.id,
        meta.received_at.to_rfc2822()
    );
    for r in &failed {
        let reply = r.last_reply.as_deref().unwrap_or("");
        let code = enhanced_code(reply).unwrap_or(if reply.contains("max_age") {
            "4.4.7"
        } else {
            "5.0.0"
        });
        let diag: String = reply.chars().filter(|c| !c.is_control()).collect();
        status.push_str(&format!(
            "\r\nFinal-Recipient: rfc822; {}\r\nAction: failed\r\nStatus: {code}\r\nDiagnostic-Code: smtp; {diag}\r\n",
            r.address
        ));
    }

    let mut out = format!(
        "From: Mail Delivery System <MAILER-DAEMON@{hostname}>\r\nTo: <{to}>\r\nSubject: Undelivered Mail Returned to Sender\r\nDate: {date}\r\nMessage-ID: <{}.dsn@{hostname}>\r\nAuto-Submitted: auto-replied\r\nMIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status; boundary=\"{boundary}\"\r\n\r\n--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n{text}\r\n--{boundary}\r\nContent-Type: message/delivery-status\r\n\r\n{status}\r\n--{boundary}\r\nContent-Type: text/rfc822-headers\r\n\r\n",
        meta.id
    )
    .into_bytes();
    out.extend_from_slice(original_headers);
    if !original_headers.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_sections() {
        assert_eq!(
            enhanced_code("550 5.1.10 RESOLVER.ADR.RecipientNotFound"),
            Some("5.1.10")
        );
        assert_eq!(enhanced_code("no code here 1.2"), None);
        assert_eq!(
            header_section(b"A: b\r\nC: d\r\n\r\nbody"),
            b"A: b\r\nC: d\r\n"
        );
    }
}

//! The metadata file `<ID>.json` beside each `<ID>.eml`: envelope and delivery state.
//!
//! The meta file is the commit marker: a body without it was never acknowledged. It is
//! rewritten (through `tmp/` and a rename) after every delivery attempt, so it always holds the
//! per-recipient truth.

use std::net::IpAddr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub version: u32,
    pub id: String,
    pub received_at: DateTime<Utc>,
    /// The account (upstream) this message goes out through.
    pub account: String,
    /// Envelope sender; empty for the null sender `<>`.
    pub mail_from: String,
    pub recipients: Vec<Recipient>,
    pub client: Client,
    /// Size of the spooled body in bytes (including the `Received:` header we added).
    pub size: u64,
    /// CRC32C of the spooled body. With `size`, checked before every delivery attempt and at
    /// recovery; absent in metas written before it existed, whose bodies cannot be checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crc32c: Option<u32>,
    /// The client declared or sent 8-bit data.
    #[serde(default)]
    pub eight_bit: bool,
    /// The client asked for SMTPUTF8.
    #[serde(default)]
    pub smtputf8: bool,
    #[serde(default)]
    pub attempts: u32,
    #[serde(default)]
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// Set when an administrator sends a failed message back to the queue: `max_age` then
    /// counts from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requeued_at: Option<DateTime<Utc>>,
    /// When an administrator deleted the message: `keep_deleted` counts from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipient {
    pub address: String,
    pub status: RecipientStatus,
    #[serde(default)]
    pub attempts: u32,
    /// The last reply or error seen for this recipient, for the administrator.
    #[serde(default)]
    pub last_reply: Option<String>,
    /// Set when the recipient was delivered through another account than the message's own
    /// (failover): which one and why. Absent in metas written before failover existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<Via>,
}

/// The fallback account that delivered a recipient, and the cause of the failover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Via {
    pub account: String,
    pub cause: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecipientStatus {
    Pending,
    Delivered,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Client {
    pub ip: IpAddr,
    pub helo: String,
    /// The AUTH identity, when the device logged in.
    pub login: Option<String>,
    pub tls: bool,
}

impl Meta {
    /// A new message's meta: every recipient pending, no attempt yet. `id` and `size` are
    /// filled in when the spool commits it.
    pub fn new(account: &str, mail_from: &str, recipients: &[String], client: Client) -> Meta {
        Meta {
            version: FORMAT_VERSION,
            id: String::new(),
            received_at: Utc::now(),
            account: account.to_string(),
            mail_from: mail_from.to_string(),
            recipients: recipients
                .iter()
                .map(|a| Recipient {
                    address: a.clone(),
                    status: RecipientStatus::Pending,
                    attempts: 0,
                    last_reply: None,
                    via: None,
                })
                .collect(),
            client,
            size: 0,
            crc32c: None,
            eight_bit: false,
            smtputf8: false,
            attempts: 0,
            next_attempt_at: None,
            requeued_at: None,
            deleted_at: None,
        }
    }

    pub fn pending(&self) -> impl Iterator<Item = &Recipient> {
        self.recipients
            .iter()
            .filter(|r| r.status == RecipientStatus::Pending)
    }

    pub fn encode(&self) -> Vec<u8> {
        // Serialising plain data with string keys cannot fail.
        let mut v = serde_json::to_vec_pretty(self).unwrap_or_default();
        v.push(b'\n');
        v
    }

    pub fn decode(bytes: &[u8]) -> Result<Meta, String> {
        let meta: Meta = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if meta.version != FORMAT_VERSION {
            return Err(format!("unsupported format version {}", meta.version));
        }
        Ok(meta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_round_trips() {
        let m = Meta {
            version: FORMAT_VERSION,
            id: "0123456789ABCDEF0".into(),
            received_at: Utc::now(),
            account: "local".into(),
            mail_from: "scanner@printer.local".into(),
            recipients: vec![Recipient {
                address: "a@b.example".into(),
                status: RecipientStatus::Pending,
                attempts: 0,
                last_reply: None,
                via: Some(Via {
                    account: "graph".into(),
                    cause: "SMTP AUTH is disabled".into(),
                }),
            }],
            client: Client {
                ip: "127.0.0.1".parse().unwrap(),
                helo: "x".into(),
                login: None,
                tls: false,
            },
            size: 42,
            crc32c: Some(0xE306_9283),
            eight_bit: true,
            smtputf8: false,
            attempts: 0,
            next_attempt_at: None,
            requeued_at: None,
            deleted_at: Some(Utc::now()),
        };
        assert_eq!(Meta::decode(&m.encode()), Ok(m));
        assert!(Meta::decode(b"{not json").is_err());
    }

    /// A meta written before checksums and deletion times existed still loads: its body is
    /// simply not checkable.
    #[test]
    fn metas_from_before_checksums_load() {
        let old = br#"{
  "version": 1,
  "id": "0123456789ABCDEF0",
  "received_at": "2026-11-20T10:00:00Z",
  "account": "local",
  "mail_from": "scanner@printer.local",
  "recipients": [{"address": "a@b.example", "status": "pending", "attempts": 0, "last_reply": null}],
  "client": {"ip": "127.0.0.1", "helo": "x", "login": null, "tls": false},
  "size": 42,
  "eight_bit": false,
  "smtputf8": false,
  "attempts": 0,
  "next_attempt_at": null
}"#;
        let m = Meta::decode(old).unwrap();
        assert_eq!((m.size, m.crc32c, m.deleted_at), (42, None, None));
        assert_eq!(m.recipients[0].via, None);
        let text = String::from_utf8(m.encode()).unwrap();
        assert!(!text.contains("crc32c") && !text.contains("via"), "{text}");
    }
}

//! Credential lifecycle: a client secret expires within 24 months and a certificate at its
//! notAfter, and on that day every message stops. The watcher reads each account's expiries (the
//! certificate's notAfter from `certificate_file`, a secret's from `client_secret_expires`),
//! publishes them as `exorelay_credential_expiry_timestamp_seconds{account,credential}`, and as
//! each warning threshold ([`THRESHOLDS`] days ahead, then expired) is crossed: logs a warning,
//! shows it on the status page and in `/readyz`, and mails `admin_address` when one is set.
//!
//! The decision ([`notice_for`]) is pure and takes the time as an argument; the watcher only reads
//! files, the clock and acts.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{AccountConfig, AccountKind, Config};
use crate::forward::Status;
use crate::metrics::Metrics;
use crate::spool::Spool;

/// Days before expiry at which the administrator is warned, furthest first.
pub const THRESHOLDS: [i64; 4] = [30, 14, 7, 1];

/// How often the watcher looks (expiries only change when files or the config do).
const CHECK_EVERY: Duration = Duration::from_secs(3600);

/// One credential of one account and when it expires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expiry {
    pub account: String,
    /// `certificate` or `client_secret`.
    pub credential: &'static str,
    pub expires: DateTime<Utc>,
}

/// A warning about one credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// The threshold crossed (days ahead), or 0 once expired.
    pub level: i64,
    pub text: String,
}

/// The warning due for `e` at `now`, if any: the smallest threshold not yet passed, or expired.
pub fn notice_for(e: &Expiry, now: DateTime<Utc>) -> Option<Notice> {
    let left = e.expires - now;
    let what = match e.credential {
        "certificate" => "certificate",
        _ => "client secret",
    };
    let fix = match e.credential {
        "certificate" => {
            "create a new certificate, upload it to the app registration (Certificates & secrets > Certificates) and point certificate_file and private_key_file at it"
        }
        _ => {
            "create a new client secret (App registrations > Certificates & secrets), write its Value into client_secret_file, update client_secret_expires; the next token request reads the file, no restart needed"
        }
    };
    let day = e.expires.format("%Y-%m-%d");
    if left <= chrono::Duration::zero() {
        return Some(Notice {
            level: 0,
            text: format!(
                "the {what} of account {} expired on {day}: no mail goes out through it. Fix: {fix}",
                e.account
            ),
        });
    }
    let days = left.num_days();
    let level = THRESHOLDS
        .iter()
        .rev()
        .find(|t| left <= chrono::Duration::days(**t))?;
    Some(Notice {
        level: *level,
        text: format!(
            "the {what} of account {} expires on {day}, in {} day(s). Fix before then: {fix}",
            e.account,
            days.max(0)
        ),
    })
}

/// The expiries the configuration and credential files give. A certificate that cannot be read
/// is skipped here (the token request reports it with its own advice).
pub fn expiries(config: &Config) -> Vec<Expiry> {
    let mut out = Vec::new();
    for a in config
        .accounts
        .iter()
        .filter(|a| matches!(a.kind, AccountKind::Exchange | AccountKind::Graph))
    {
        if let Some(expires) = certificate_expiry(a) {
            out.push(Expiry {
                account: a.name.clone(),
                credential: "certificate",
                expires,
            });
        }
        if let Some(date) = a.client_secret_expires
            && let Some(at) = date.and_hms_opt(0, 0, 0)
        {
            out.push(Expiry {
                account: a.name.clone(),
                credential: "client_secret",
                expires: at.and_utc(),
            });
        }
    }
    out
}

fn certificate_expiry(a: &AccountConfig) -> Option<DateTime<Utc>> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let path = a.certificate_file.as_ref()?;
    let der = CertificateDer::pem_file_iter(path).ok()?.next()?.ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    DateTime::from_timestamp(cert.validity().not_after.timestamp(), 0)
}

/// Runs until `shutdown`: checks at once, then every hour.
pub async fn watch(
    config: Arc<Config>,
    spool: Arc<Spool>,
    metrics: Arc<Metrics>,
    status: Arc<Status>,
    shutdown: CancellationToken,
) {
    // The highest level already announced per credential, so each threshold is told once.
    let mut told: HashMap<(String, &'static str), i64> = HashMap::new();
    let mut tick = tokio::time::interval(CHECK_EVERY);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let cfg = config.clone();
        let found = tokio::task::spawn_blocking(move || expiries(&cfg))
            .await
            .unwrap_or_default();
        let now = Utc::now();
        let mut per_account: HashMap<String, Vec<Notice>> = HashMap::new();
        for e in &found {
            metrics.set_credential_expiry(&e.account, e.credential, e.expires.timestamp());
            let Some(n) = notice_for(e, now) else {
                continue;
            };
            per_account
                .entry(e.account.clone())
                .or_default()
                .push(n.clone());
            let key = (e.account.clone(), e.credential);
            if told.get(&key).is_some_and(|l| *l <= n.level) {
                continue;
            }
            told.insert(key, n.level);
            if n.level == 0 {
                error!(account = %e.account, credential = e.credential, "{}", n.text);
            } else {
                warn!(account = %e.account, credential = e.credential, days = n.level, "{}", n.text);
            }
            mail_admin(&config, &spool, e, &n).await;
        }
        for a in &config.accounts {
            status.set_credential_notices(&a.name, per_account.remove(&a.name).unwrap_or_default());
        }
    }
}

/// Queues the notice to `admin_address` through the credential's own account (it still works
/// until the day itself), like any other message.
async fn mail_admin(config: &Config, spool: &Arc<Spool>, e: &Expiry, n: &Notice) {
    let Some(admin) = &config.queue.admin_address else {
        return;
    };
    let host = &config.hostname;
    let subject = if n.level == 0 {
        format!(
            "exorelay: the credential of account {} has expired",
            e.account
        )
    } else {
        format!(
            "exorelay: the credential of account {} expires in {} day(s) or less",
            e.account, n.level
        )
    };
    let body = format!(
        "From: exorelay <MAILER-DAEMON@{host}>\r\nTo: <{admin}>\r\nSubject: {subject}\r\nAuto-Submitted: auto-generated\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nThis is the mail relay exorelay at {host}.\r\n\r\n{}\r\n",
        n.text
    );
    let submission = crate::submission::Submission {
        source: crate::submission::Source::Dsn,
        client: crate::submission::local_client(host),
        mail_from: String::new(),
        recipients: vec![admin.clone()],
        eight_bit: false,
        smtputf8: false,
    };
    match submission
        .enqueue(spool, host, &e.account, body.as_bytes())
        .await
    {
        Ok(id) => {
            info!(queue_id = %id, account = %e.account, to = %admin, "credential expiry notice queued")
        }
        Err(err) => {
            error!(account = %e.account, error = %err, "cannot queue the credential expiry notice")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_on_a_test_clock() {
        let expires = DateTime::parse_from_rfc3339("2027-05-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let e = Expiry {
            account: "contoso".into(),
            credential: "client_secret",
            expires,
        };
        let at = |days_before: i64, hours: i64| {
            expires - chrono::Duration::days(days_before) + chrono::Duration::hours(hours)
        };
        let level = |t| notice_for(&e, t).map(|n| n.level);
        assert_eq!(level(at(31, 0)), None, "more than 30 days ahead: quiet");
        assert_eq!(level(at(30, 0)), Some(30));
        assert_eq!(level(at(15, 0)), Some(30));
        assert_eq!(level(at(14, 0)), Some(14));
        assert_eq!(level(at(7, 0)), Some(7));
        assert_eq!(level(at(2, 0)), Some(7));
        assert_eq!(level(at(1, 0)), Some(1));
        assert_eq!(level(at(0, 1)), Some(0), "expired");
        let n = notice_for(&e, at(14, 0)).unwrap();
        assert!(
            n.text.contains("2027-05-01")
                && n.text.contains("in 14 day(s)")
                && n.text.contains("client_secret_file"),
            "{}",
            n.text
        );
        let cert = Expiry {
            credential: "certificate",
            ..e
        };
        assert!(
            notice_for(&cert, at(0, 1))
                .unwrap()
                .text
                .contains("certificate_file")
        );
    }
}

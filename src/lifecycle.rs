//! Credential lifecycle: a client secret expires within 24 months and a certificate at its
//! notAfter, and on that day every message stops. The watcher reads each account's expiries (the
//! certificate's notAfter from `certificate_file`, a secret's from `client_secret_expires`),
//! publishes them as `exorelay_credential_expiry_timestamp_seconds{account,credential}`, and as
//! each warning threshold ([`THRESHOLDS`] days ahead, then expired) is crossed: logs a warning,
//! shows it on the status page and in `/readyz`, and mails `admin_address` when one is set.
//!
//! Each threshold is announced once per credential and expiry date: what was announced is kept in
//! `<state_dir>/credential-notices.json` ([`Announced`]), so a restart or a reload does not mail
//! the administrator again, and a renewed credential (a new expiry date) starts afresh.
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

/// The thresholds already announced, by credential and expiry date, kept in a file so they are
/// announced once, not once per start. A missing or unreadable file means nothing announced
/// (the worst case is one repeated warning).
#[derive(Debug, Default)]
pub struct Announced {
    path: Option<std::path::PathBuf>,
    levels: std::collections::BTreeMap<String, i64>,
}

impl Announced {
    pub fn load(path: std::path::PathBuf) -> Announced {
        let levels = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Announced {
            path: Some(path),
            levels,
        }
    }

    fn key(e: &Expiry) -> String {
        format!(
            "{}/{}/{}",
            e.account,
            e.credential,
            e.expires.format("%Y-%m-%d")
        )
    }

    /// Whether `n` for `e` is news (a threshold not announced yet); records it if so.
    pub fn is_news(&mut self, e: &Expiry, n: &Notice) -> bool {
        let key = Self::key(e);
        if self.levels.get(&key).is_some_and(|l| *l <= n.level) {
            return false;
        }
        self.levels.insert(key, n.level);
        if let Some(path) = &self.path {
            let body = serde_json::to_vec_pretty(&self.levels).unwrap_or_default();
            if let Err(err) = crate::oauth::store::write_private(path, &body) {
                warn!(file = %path.display(), error = %err, "cannot record the credential notices announced; they may be announced again after a restart");
            }
        }
        true
    }
}

/// Runs until `shutdown`: checks at once, then every hour.
pub async fn watch(
    config: Arc<Config>,
    spool: Arc<Spool>,
    metrics: Arc<Metrics>,
    status: Arc<Status>,
    shutdown: CancellationToken,
) {
    let mut told = Announced::load(config.state_dir().join("credential-notices.json"));
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
        // A credential no longer configured (a secret replaced by a certificate) loses its
        // series, so its old date does not keep an alert firing.
        for a in &config.accounts {
            for credential in crate::metrics::CREDENTIALS {
                if !found
                    .iter()
                    .any(|e| e.account == a.name && e.credential == credential)
                {
                    metrics.remove_credential_expiry(&a.name, credential);
                }
            }
        }
        for e in &found {
            metrics.set_credential_expiry(&e.account, e.credential, e.expires.timestamp());
            let Some(n) = notice_for(e, now) else {
                continue;
            };
            per_account
                .entry(e.account.clone())
                .or_default()
                .push(n.clone());
            if !told.is_news(e, &n) {
                continue;
            }
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

    /// A threshold is announced once per credential and expiry date, across restarts (the
    /// record is a file), and a renewed credential is announced afresh.
    #[test]
    fn announced_once_across_restarts_and_afresh_after_renewal() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("state/credential-notices.json");
        let expires = DateTime::parse_from_rfc3339("2027-05-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let e = Expiry {
            account: "contoso".into(),
            credential: "client_secret",
            expires,
        };
        let n = |level| Notice {
            level,
            text: String::new(),
        };
        let mut first = Announced::load(file.clone());
        assert!(first.is_news(&e, &n(30)));
        assert!(!first.is_news(&e, &n(30)), "told once");
        let mut after_restart = Announced::load(file.clone());
        assert!(
            !after_restart.is_news(&e, &n(30)),
            "not again after a restart"
        );
        assert!(
            after_restart.is_news(&e, &n(14)),
            "the next threshold is news"
        );
        let renewed = Expiry {
            expires: expires + chrono::Duration::days(730),
            ..e.clone()
        };
        assert!(Announced::load(file.clone()).is_news(&renewed, &n(30)));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // An unreadable record means nothing announced, not a failure.
        std::fs::write(&file, "not json").unwrap();
        assert!(Announced::load(file).is_news(&e, &n(30)));
    }
}

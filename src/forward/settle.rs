//! What an attempt's per-recipient outcomes mean for the message, decided without I/O:
//! [`settle`] updates the meta (recipient status, attempts, expiry, next attempt) and says where
//! the message goes; the forwarder persists, reports and sends DSNs according to the result.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::spool::{Meta, RecipientStatus};
use crate::upstream::Outcome;

/// Where the message goes after the attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Recipients are still pending: stays in `queue/`, tried again after the delay.
    Retry(Duration),
    /// Every recipient delivered: removed from the spool.
    Delivered,
    /// No recipient pending and at least one failed: moved to `failed/`, with a DSN.
    Failed { expired: bool },
    /// Exchange refused the message's sender (SendAs): moved to `hold/` for the administrator,
    /// recipients still pending, until released.
    Hold,
}

/// The result of one attempt, and the meta as it must be persisted.
#[derive(Debug, Clone)]
pub struct Settlement {
    pub meta: Meta,
    pub disposition: Disposition,
    pub delivered: usize,
    pub deferred: usize,
    pub failed: usize,
    /// Not tried because of the account's state (not counted as an attempt).
    pub skipped: usize,
    /// Recipients that failed permanently in this attempt, with Exchange's reply.
    pub refused: Vec<(String, String)>,
    pub last_problem: Option<String>,
}

/// The retry policy `settle` applies.
pub struct Policy<'a> {
    pub max_age: Duration,
    /// The delay before the next attempt after `attempts` counted attempts (with jitter).
    pub backoff: &'a (dyn Fn(u32) -> Duration + Sync),
}

/// A message only held back by its account's state is looked at again after this; the
/// account's state decides when it actually goes.
const HELD_BACK: Duration = Duration::from_secs(1);

/// Applies `outcomes` (one per address in `recipients`, in order; missing ones count as a
/// temporary failure) to `meta` at wall time `now`. Pure.
pub fn settle(
    mut meta: Meta,
    recipients: &[String],
    outcomes: &[Outcome],
    now: DateTime<Utc>,
    policy: &Policy<'_>,
) -> Settlement {
    let (mut delivered, mut deferred, mut failed, mut skipped) = (0, 0, 0, 0);
    let mut refused = Vec::new();
    let mut last_problem = None;
    let mut sender_refused = false;
    let missing = Outcome::Temporary("upstream gave no result for this recipient".into());
    for (addr, outcome) in recipients
        .iter()
        .zip(outcomes.iter().chain(std::iter::repeat(&missing)))
    {
        let Some(r) = meta
            .recipients
            .iter_mut()
            .find(|r| &r.address == addr && r.status == RecipientStatus::Pending)
        else {
            continue;
        };
        match outcome {
            Outcome::Delivered(reply) => {
                r.attempts += 1;
                r.status = RecipientStatus::Delivered;
                r.last_reply = Some(reply.clone());
                delivered += 1;
            }
            Outcome::Temporary(reply) => {
                r.attempts += 1;
                r.last_reply = Some(reply.clone());
                last_problem = Some(reply.clone());
                deferred += 1;
            }
            Outcome::Permanent(reply) => {
                r.attempts += 1;
                r.status = RecipientStatus::Failed;
                r.last_reply = Some(reply.clone());
                last_problem = Some(reply.clone());
                failed += 1;
                refused.push((addr.clone(), reply.clone()));
            }
            Outcome::NotAttempted(reason) => {
                r.last_reply = Some(format!("waiting: {reason}"));
                skipped += 1;
            }
            Outcome::SenderRefused(reply) => {
                r.attempts += 1;
                r.last_reply = Some(reply.clone());
                last_problem = Some(reply.clone());
                sender_refused = true;
            }
        }
    }
    if delivered + deferred + failed > 0 || sender_refused {
        meta.attempts += 1;
    }
    let age = (now - meta.requeued_at.unwrap_or(meta.received_at))
        .to_std()
        .unwrap_or_default();
    let expired = !sender_refused && deferred + skipped > 0 && age >= policy.max_age;
    if expired {
        for r in meta
            .recipients
            .iter_mut()
            .filter(|r| r.status == RecipientStatus::Pending)
        {
            r.status = RecipientStatus::Failed;
            let last = r.last_reply.take().unwrap_or_default();
            r.last_reply = Some(format!(
                "gave up after {} in the queue (max_age); last error: {last}",
                humantime::format_duration(policy.max_age)
            ));
        }
    }
    let any_failed = meta
        .recipients
        .iter()
        .any(|r| r.status == RecipientStatus::Failed);
    let disposition = if sender_refused && meta.pending().count() > 0 {
        Disposition::Hold
    } else if meta.pending().count() > 0 {
        Disposition::Retry(if deferred == 0 && skipped > 0 {
            HELD_BACK
        } else {
            (policy.backoff)(meta.attempts.max(1))
        })
    } else if any_failed {
        Disposition::Failed { expired }
    } else {
        Disposition::Delivered
    };
    meta.next_attempt_at = match disposition {
        Disposition::Retry(d) => {
            Some(now + chrono::Duration::from_std(d).unwrap_or(chrono::Duration::hours(1)))
        }
        _ => None,
    };
    Settlement {
        meta,
        disposition,
        delivered,
        deferred,
        failed,
        skipped,
        refused,
        last_problem,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::Client;

    fn meta(to: &[&str]) -> Meta {
        let to: Vec<String> = to.iter().map(|s| s.to_string()).collect();
        let client = Client {
            ip: std::net::IpAddr::from([127, 0, 0, 1]),
            helo: "printer".into(),
            login: None,
            tls: false,
        };
        Meta::new("contoso", "scanner@printer.local", &to, client)
    }

    fn policy(backoff: &(dyn Fn(u32) -> Duration + Sync)) -> Policy<'_> {
        Policy {
            max_age: Duration::from_secs(3600),
            backoff,
        }
    }

    fn pending(m: &Meta) -> Vec<String> {
        m.pending().map(|r| r.address.clone()).collect()
    }

    #[test]
    fn outcomes_per_recipient() {
        let backoff = |n: u32| Duration::from_secs(60 * u64::from(n));
        let m = meta(&["a@x", "b@x", "c@x", "d@x"]);
        let now = m.received_at;
        let s = settle(
            m.clone(),
            &pending(&m),
            &[
                Outcome::Delivered("250 ok".into()),
                Outcome::Temporary("451 busy".into()),
                Outcome::Permanent("550 no such user".into()),
            ],
            now,
            &policy(&backoff),
        );
        assert_eq!((s.delivered, s.deferred, s.failed, s.skipped), (1, 2, 1, 0));
        assert_eq!(
            s.refused,
            [("c@x".to_string(), "550 no such user".to_string())]
        );
        assert_eq!(s.disposition, Disposition::Retry(Duration::from_secs(60)));
        assert_eq!(
            pending(&s.meta),
            ["b@x", "d@x"],
            "only the deferred stay pending"
        );
        assert_eq!(s.meta.attempts, 1);
        assert_eq!(
            s.meta.next_attempt_at,
            Some(now + chrono::Duration::seconds(60))
        );
        assert_eq!(
            s.meta.recipients[3].last_reply.as_deref(),
            Some("upstream gave no result for this recipient")
        );

        // The next attempt delivers the rest: a permanent failure earlier sends it to failed/.
        let s2 = settle(
            s.meta.clone(),
            &pending(&s.meta),
            &[
                Outcome::Delivered("250".into()),
                Outcome::Delivered("250".into()),
            ],
            now,
            &policy(&backoff),
        );
        assert_eq!(s2.disposition, Disposition::Failed { expired: false });
        assert_eq!(s2.meta.next_attempt_at, None);
    }

    #[test]
    fn a_refused_sender_holds_the_message_with_its_recipients_pending() {
        let backoff = |_: u32| Duration::from_secs(60);
        let m = meta(&["a@x", "b@x"]);
        let now = m.received_at + chrono::Duration::hours(2);
        let s = settle(
            m.clone(),
            &pending(&m),
            &[
                Outcome::SenderRefused("554 5.2.252 SendAsDenied (fix: SendAs)".into()),
                Outcome::SenderRefused("554 5.2.252 SendAsDenied (fix: SendAs)".into()),
            ],
            now,
            &policy(&backoff),
        );
        // Not expired although older than max_age: it waits for the administrator.
        assert_eq!(s.disposition, Disposition::Hold);
        assert_eq!(pending(&s.meta), ["a@x", "b@x"]);
        assert_eq!(s.meta.attempts, 1);
        assert_eq!(s.meta.next_attempt_at, None);
        assert!(s.last_problem.unwrap().contains("SendAsDenied"));
    }

    #[test]
    fn all_delivered_leaves_the_queue() {
        let backoff = |_| Duration::from_secs(60);
        let m = meta(&["a@x"]);
        let s = settle(
            m.clone(),
            &pending(&m),
            &[Outcome::Delivered("250".into())],
            m.received_at,
            &policy(&backoff),
        );
        assert_eq!(s.disposition, Disposition::Delivered);
    }

    #[test]
    fn held_back_by_the_account_is_not_an_attempt() {
        let backoff = |_| Duration::from_secs(600);
        let m = meta(&["a@x"]);
        let s = settle(
            m.clone(),
            &pending(&m),
            &[Outcome::NotAttempted("throttled".into())],
            m.received_at,
            &policy(&backoff),
        );
        assert_eq!(s.disposition, Disposition::Retry(HELD_BACK));
        assert_eq!(s.meta.attempts, 0);
        assert_eq!(s.meta.recipients[0].attempts, 0);
    }

    #[test]
    fn past_max_age_the_pending_recipients_fail() {
        let backoff = |_| Duration::from_secs(60);
        let m = meta(&["a@x", "b@x"]);
        let late = m.received_at + chrono::Duration::seconds(3600);
        let s = settle(
            m.clone(),
            &pending(&m),
            &[
                Outcome::Delivered("250".into()),
                Outcome::Temporary("451 busy".into()),
            ],
            late,
            &policy(&backoff),
        );
        assert_eq!(s.disposition, Disposition::Failed { expired: true });
        let last = s.meta.recipients[1].last_reply.clone().unwrap_or_default();
        assert!(
            last.starts_with("gave up after 1h in the queue (max_age); last error: 451 busy"),
            "{last}"
        );
        // Requeued by an administrator: the age counts from then.
        let mut again = m.clone();
        again.requeued_at = Some(late);
        let s = settle(
            again.clone(),
            &pending(&again),
            &[
                Outcome::Temporary("451".into()),
                Outcome::Temporary("451".into()),
            ],
            late,
            &policy(&backoff),
        );
        assert!(matches!(s.disposition, Disposition::Retry(_)));
    }
}

//! Failover: the decisions, without I/O. An `exchange` account may name another configured
//! account as its `fallback`; while the account is paused for a configuration cause, its mail is
//! sent through the fallback's lane instead.
//!
//! Which states fail over (decided here, in [`failover`], and nowhere else):
//! - `Paused` (a configuration cause: SMTP AUTH disabled `5.7.139`, token refused, credential
//!   missing): yes. The account is fine in every other respect, and nothing will go out through
//!   it until an administrator fixes it;
//! - `Throttled` and `Held` (Exchange's rate limits, the daily recipient quota): no. They end by
//!   themselves, soon; mail waits, as it would without a fallback;
//! - `PausedByAdmin`: no. The administrator stopped the account's mail on purpose; it waits;
//! - `Active`: no.
//!
//! While failing over ([`route`] says [`Route::Fallback`]):
//! - the account's own probe goes on, every `probe_interval`, with one message sent through the
//!   account itself; when it works the account is `Active` again, and its mail goes through it
//!   at once (switch-back). Attempts already running through the fallback finish there;
//! - a message the account itself refused (the attempt that paused it, or a failed probe) is due
//!   again at once, so the fallback takes it ([`retry_at`]): it is never the failing probe time
//!   after time;
//! - every other due message of the account is sent through the fallback's lane: its slots and
//!   connections, its upstream (so its rate limits and `rewrite_from`), and its state. A blocked
//!   fallback sends nothing: the mail waits. A paused fallback's probe may be one of these
//!   messages, so a fallback that has no mail of its own still finds out when it works again;
//! - a message is still in exactly one place of the schedule, and attempts are still only
//!   started by taking a waiting message ([`super::schedule`]), so switching over or back never
//!   gives a message a second attempt at the same time.
//!
//! Time is `tokio::time::Instant`, so the tests run on tokio's paused clock.

use serde::Serialize;
use tokio::time::Instant;

use super::account::{Account, Admit, State};
use crate::spool::RecipientStatus;
use crate::spool::meta::Via;

use super::settle::Settlement;

/// An account whose mail goes out through its fallback, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Failover {
    /// The fallback account's name.
    pub to: String,
    /// The cause of the account's pause.
    pub cause: String,
}

impl std::fmt::Display for Failover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "failing over to {}: {}", self.to, self.cause)
    }
}

impl Failover {
    /// What a recipient delivered this way records.
    pub fn via(&self) -> Via {
        Via {
            account: self.to.clone(),
            cause: self.cause.clone(),
        }
    }
}

/// Whether an account in this state, with this `fallback`, fails over now. Pure.
pub fn failover(account: &Account, fallback: Option<&str>) -> Option<Failover> {
    match (&account.state, fallback) {
        (State::Paused { advice, .. }, Some(to)) => Some(Failover {
            to: to.to_string(),
            cause: advice.cause.clone(),
        }),
        _ => None,
    }
}

/// How an account's due messages go out now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Through the account itself, as its state admits (see [`Account::admits`]).
    Own(Admit),
    /// Through the fallback; when `probe`, one message first goes through the account itself,
    /// as its probe.
    Fallback { to: String, probe: bool },
}

/// The routing decision for an account's due messages at `now`. Pure.
pub fn route(account: &Account, fallback: Option<&str>, now: Instant) -> Route {
    let admit = account.admits(now);
    match failover(account, fallback) {
        Some(f) => Route::Fallback {
            to: f.to,
            probe: admit == Admit::Probe,
        },
        None => Route::Own(admit),
    }
}

/// When a failing-over account's mail must be looked at again without an event: its next probe
/// or the end of its fallback's block, whichever comes first; `None` when only an event (an
/// attempt finishing) can change anything.
pub fn wake(account: &Account, fallback: &Account, now: Instant) -> Option<Instant> {
    let until = |a: Admit| match a {
        Admit::Nothing { until } => until,
        Admit::Any | Admit::Probe => None,
    };
    [until(account.admits(now)), until(fallback.admits(now))]
        .into_iter()
        .flatten()
        .min()
}

/// When a message whose attempt just ended is due again. A message that the account itself
/// refused for a configuration cause (a pause signal: the attempt that paused it, or a failed
/// probe) is due at once when the account has a fallback: the fallback takes it, since the
/// account's next probe is `probe_interval` away. Without this, a message that is due again
/// when the next probe is (a retry delay as long as `probe_interval`) would be that probe time
/// after time and never reach the fallback. Pure.
pub fn retry_at(
    retry_at: Option<Instant>,
    paused_by_attempt: bool,
    has_fallback: bool,
    now: Instant,
) -> Option<Instant> {
    match retry_at {
        Some(_) if paused_by_attempt && has_fallback => Some(now),
        other => other,
    }
}

/// Marks the recipients this attempt delivered through the fallback: the meta records which
/// account delivered them and why, and their last reply says so for `queue show`.
pub fn mark_delivered_via(settled: &mut Settlement, attempted: &[String], failover: &Failover) {
    for r in settled.meta.recipients.iter_mut().filter(|r| {
        r.status == RecipientStatus::Delivered && r.via.is_none() && attempted.contains(&r.address)
    }) {
        let reply = r.last_reply.take().unwrap_or_default();
        r.last_reply = Some(format!(
            "delivered via fallback {} because {}: {reply}",
            failover.to, failover.cause
        ));
        r.via = Some(failover.via());
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::advice::Advice;

    fn paused(next_probe: Instant, probing: bool) -> State {
        State::Paused {
            advice: Advice::new("SMTP AUTH is disabled (5.7.139).", "Enable it."),
            next_probe,
            probing,
        }
    }

    fn account(state: State) -> Account {
        Account { state, epoch: 3 }
    }

    /// Every state, with and without a fallback: only a configuration pause fails over, and the
    /// probe still goes through the account itself when it is due.
    #[tokio::test(start_paused = true)]
    async fn only_a_configuration_pause_fails_over() {
        let now = Instant::now();
        let later = now + Duration::from_secs(60);
        let fallback = |probe| Route::Fallback {
            to: "graph".into(),
            probe,
        };
        let table = [
            (State::Active, Some("graph"), Route::Own(Admit::Any)),
            (State::Active, None, Route::Own(Admit::Any)),
            (
                State::Throttled {
                    until: later,
                    reason: "421 4.4.2".into(),
                },
                Some("graph"),
                Route::Own(Admit::Nothing { until: Some(later) }),
            ),
            (
                State::Held {
                    until: later,
                    reason: "quota".into(),
                },
                Some("graph"),
                Route::Own(Admit::Nothing { until: Some(later) }),
            ),
            (
                State::PausedByAdmin,
                Some("graph"),
                Route::Own(Admit::Nothing { until: None }),
            ),
            (paused(later, false), Some("graph"), fallback(false)),
            (paused(now, false), Some("graph"), fallback(true)),
            (paused(now, true), Some("graph"), fallback(false)),
            (paused(now, false), None, Route::Own(Admit::Probe)),
            (
                paused(later, false),
                None,
                Route::Own(Admit::Nothing { until: Some(later) }),
            ),
        ];
        for (state, fb, expected) in table {
            let a = account(state.clone());
            assert_eq!(route(&a, fb, now), expected, "{state:?} with {fb:?}");
            assert_eq!(
                failover(&a, fb).is_some(),
                matches!(expected, Route::Fallback { .. }),
                "{state:?}"
            );
        }
    }

    /// The probe falls due as time passes: the same paused account routes its probe through
    /// itself once `next_probe` is reached, and the text names the fallback and the cause.
    #[tokio::test(start_paused = true)]
    async fn the_probe_falls_due_on_the_clock() {
        let a = account(paused(Instant::now() + Duration::from_secs(30), false));
        assert_eq!(
            route(&a, Some("graph"), Instant::now()),
            Route::Fallback {
                to: "graph".into(),
                probe: false
            }
        );
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(
            route(&a, Some("graph"), Instant::now()),
            Route::Fallback {
                to: "graph".into(),
                probe: true
            }
        );
        let f = failover(&a, Some("graph")).unwrap();
        assert_eq!(
            f.to_string(),
            "failing over to graph: SMTP AUTH is disabled (5.7.139)."
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_the_account_refused_goes_to_the_fallback_at_once() {
        let now = Instant::now();
        let later = Some(now + Duration::from_secs(1));
        // (retry_at, the attempt paused the account, a fallback is configured) -> due
        for (retry, paused, fallback, due) in [
            (later, true, true, Some(now)),
            (later, true, false, later),
            (later, false, true, later),
            (None, true, true, None),
        ] {
            assert_eq!(
                retry_at(retry, paused, fallback, now),
                due,
                "{paused} {fallback}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn wake_is_the_earlier_of_the_probe_and_the_fallbacks_block() {
        let now = Instant::now();
        let probe = now + Duration::from_secs(60);
        let primary = account(paused(probe, false));
        let active = account(State::Active);
        assert_eq!(wake(&primary, &active, now), Some(probe));
        let throttled = account(State::Throttled {
            until: now + Duration::from_secs(10),
            reason: "421".into(),
        });
        assert_eq!(
            wake(&primary, &throttled, now),
            Some(now + Duration::from_secs(10))
        );
        let probing = account(paused(now, true));
        assert_eq!(wake(&probing, &account(State::PausedByAdmin), now), None);
    }
}

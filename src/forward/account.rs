//! An account's delivery state as a state machine: one enum, and every transition in one pure
//! function, [`on_event`]. The forwarder feeds it events (attempts finishing, time passing, an
//! administrator's commands) and acts on the result; the status the HTTP side shows and the
//! `exorelay_account_paused` gauge are derived from it ([`Account::view`], [`Account::paused`]).
//!
//! States:
//! - `Active`: attempts go out, as many as the account's slots allow;
//! - `Throttled { until }`: Exchange asked us to slow down; nothing goes out until `until`, then
//!   `Active` again (no failure counted);
//! - `Paused { advice, next_probe, probing }`: a configuration error; from `next_probe` on, one
//!   message is tried (the probe). Its success makes the account `Active`; a new pause signal
//!   waits `probe_interval` for the next probe; a probe that never reached the upstream lets
//!   another go at once;
//! - `Held { until }`: the daily recipient quota is used up; `Active` again at `until`;
//! - `PausedByAdmin`: nothing goes out and nothing is probed until the administrator resumes it.
//!
//! Rules that are easy to get wrong, stated once:
//! - Resume by the administrator means "try now": whatever the state (paused by an error,
//!   throttled, held, paused by the administrator), the account becomes `Active`, and the next
//!   attempt shows whether the problem is still there.
//! - While paused by the administrator, results of attempts that were already running change
//!   nothing: the administrator's pause lasts until the administrator resumes.
//! - Every move into a blocked state starts a new epoch. An attempt carries the epoch it was
//!   dispatched in; a success from an earlier epoch ("stale": it started before the block) says
//!   nothing about the block and does not lift it, and a stale pause signal does not push back
//!   the probe of the pause already in force. A stale throttle or quota signal still counts:
//!   it is a real reply from Exchange, so it can only extend a block, never shorten one.
//!
//! Time is `tokio::time::Instant`, so the tests run on tokio's paused clock.

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::time::Instant;

use crate::advice::Advice;
use crate::upstream::AccountSignal;

use super::status::AccountState;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    Active,
    Throttled {
        until: Instant,
        reason: String,
    },
    Paused {
        advice: Advice,
        next_probe: Instant,
        /// A probe is in flight; no second one until it reports.
        probing: bool,
    },
    Held {
        until: Instant,
        reason: String,
    },
    PausedByAdmin,
}

/// The state plus the epoch that tells fresh attempt results from stale ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub state: State,
    pub epoch: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Time passed (the forwarder sends it before each dispatch round).
    Tick,
    /// The forwarder sent the probe of a paused account.
    ProbeSent,
    /// An attempt dispatched in `epoch` never reached the upstream (it stood down behind a
    /// block, or its message could not be read): it says nothing about the account, but if it
    /// was the probe, another may go.
    NotSent {
        epoch: u64,
    },
    /// An attempt dispatched in `epoch` reached the upstream and finished.
    Finished {
        epoch: u64,
        signal: Option<AccountSignal>,
    },
    AdminPause,
    AdminResume,
}

/// What the account lets through right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// As many attempts as there are free slots.
    Any,
    /// One attempt, the probe of a paused account (send [`Event::ProbeSent`] with it).
    Probe,
    /// Nothing; look again at `until` (`None`: only an event can change that).
    Nothing { until: Option<Instant> },
}

impl Default for Account {
    fn default() -> Account {
        Account {
            state: State::Active,
            epoch: 0,
        }
    }
}

impl Account {
    /// The account as seen now; no state change (that is [`on_event`] with [`Event::Tick`]).
    pub fn admits(&self, now: Instant) -> Admit {
        match &self.state {
            State::Active => Admit::Any,
            State::Throttled { until, .. } | State::Held { until, .. } => {
                if *until <= now {
                    Admit::Any
                } else {
                    Admit::Nothing {
                        until: Some(*until),
                    }
                }
            }
            State::Paused {
                next_probe,
                probing,
                ..
            } => {
                if *probing {
                    Admit::Nothing { until: None }
                } else if *next_probe <= now {
                    Admit::Probe
                } else {
                    Admit::Nothing {
                        until: Some(*next_probe),
                    }
                }
            }
            State::PausedByAdmin => Admit::Nothing { until: None },
        }
    }

    /// For the `exorelay_account_paused` gauge and readiness: paused by an error or an admin.
    pub fn paused(&self) -> bool {
        matches!(self.state, State::Paused { .. } | State::PausedByAdmin)
    }

    /// The state as the HTTP side shows it, instants turned into wall time.
    pub fn view(&self, now: Instant, wall_now: DateTime<Utc>) -> AccountState {
        let wall = |at: Instant| {
            wall_now
                + chrono::Duration::from_std(at.saturating_duration_since(now))
                    .unwrap_or(chrono::Duration::zero())
        };
        match &self.state {
            // Over, even if no event has said so yet.
            State::Active | State::Throttled { .. } | State::Held { .. }
                if self.admits(now) == Admit::Any =>
            {
                AccountState::Active
            }
            State::Active => AccountState::Active,
            State::Throttled { until, reason } => AccountState::Throttled {
                until: wall(*until),
                reason: reason.clone(),
            },
            State::Paused {
                advice, next_probe, ..
            } => AccountState::Paused {
                next_probe: wall(*next_probe),
                advice: advice.clone(),
            },
            State::Held { until, reason } => AccountState::Held {
                until: wall(*until),
                reason: reason.clone(),
            },
            State::PausedByAdmin => AccountState::Paused {
                next_probe: wall_now,
                advice: admin_advice(),
            },
        }
    }
}

/// The state's name in the `exorelay_account_state` metric.
pub fn metric_name(state: &State) -> &'static str {
    match state {
        State::Active => "active",
        State::Throttled { .. } => "throttled",
        State::Paused { .. } => "paused",
        State::Held { .. } => "held",
        State::PausedByAdmin => "paused_by_admin",
    }
}

/// The state in a few words, for replies to an administrator.
pub fn describe(state: &State) -> &'static str {
    match state {
        State::Active => "active",
        State::Throttled { .. } => "throttled",
        State::Paused { .. } => "paused by a configuration problem",
        State::Held { .. } => "held for its daily quota",
        State::PausedByAdmin => "paused by an administrator",
    }
}

pub fn admin_advice() -> Advice {
    Advice::new(
        "Paused by an administrator.",
        "Resume the account when ready.",
    )
}

/// Every transition of an account. Pure: the same inputs give the same account.
pub fn on_event(
    account: &Account,
    event: &Event,
    now: Instant,
    probe_interval: Duration,
) -> Account {
    use State::*;
    let same = || account.clone();
    let blocked = |state: State| Account {
        state,
        epoch: account.epoch + 1,
    };
    let keep_epoch = |state: State| Account {
        state,
        epoch: account.epoch,
    };
    match (event, &account.state) {
        (Event::AdminPause, PausedByAdmin) => same(),
        (Event::AdminPause, _) => blocked(PausedByAdmin),
        (Event::AdminResume, Active) => same(),
        // Try now; a new epoch, so results of attempts from before do not re-block it.
        (Event::AdminResume, _) => blocked(Active),
        (_, PausedByAdmin) => same(),

        (Event::Tick, Throttled { until, .. } | Held { until, .. }) if *until <= now => {
            keep_epoch(Active)
        }
        (Event::Tick, _) => same(),

        (
            Event::ProbeSent,
            Paused {
                advice,
                next_probe,
                probing: false,
            },
        ) => keep_epoch(Paused {
            advice: advice.clone(),
            next_probe: *next_probe,
            probing: true,
        }),
        (Event::ProbeSent, _) => same(),

        (
            Event::NotSent { epoch },
            Paused {
                advice,
                next_probe,
                probing: true,
            },
        ) if *epoch == account.epoch => keep_epoch(Paused {
            advice: advice.clone(),
            next_probe: *next_probe,
            probing: false,
        }),
        (Event::NotSent { .. }, _) => same(),

        (Event::Finished { epoch, signal }, state) => {
            let fresh = *epoch == account.epoch;
            finished(account, state, fresh, signal.as_ref(), now, probe_interval)
        }
    }
}

fn finished(
    account: &Account,
    state: &State,
    fresh: bool,
    signal: Option<&AccountSignal>,
    now: Instant,
    probe_interval: Duration,
) -> Account {
    use State::*;
    let same = || account.clone();
    let to = |state: State, new_block: bool| Account {
        state,
        epoch: account.epoch + u64::from(new_block),
    };
    let Some(signal) = signal else {
        // A success (or a message-level failure): the account works, if the attempt is recent.
        return match state {
            Paused { .. } if fresh => to(Active, false),
            _ => same(),
        };
    };
    match (signal, state) {
        (AccountSignal::Throttled { wait, reason }, Active) => to(
            Throttled {
                until: now + *wait,
                reason: reason.clone(),
            },
            true,
        ),
        (AccountSignal::Throttled { wait, reason }, Throttled { until, .. }) => to(
            Throttled {
                until: (*until).max(now + *wait),
                reason: reason.clone(),
            },
            false,
        ),
        // The probe was throttled: still paused, probe again once the throttle is over.
        (
            AccountSignal::Throttled { wait, .. },
            Paused {
                advice, next_probe, ..
            },
        ) if fresh => to(
            Paused {
                advice: advice.clone(),
                next_probe: (*next_probe).max(now + *wait),
                probing: false,
            },
            false,
        ),
        (AccountSignal::Throttled { .. }, _) => same(),

        (AccountSignal::Paused(advice), Active | Throttled { .. } | Held { .. }) => to(
            Paused {
                advice: advice.clone(),
                next_probe: now + probe_interval,
                probing: false,
            },
            true,
        ),
        // The probe failed: the next one after `probe_interval`.
        (AccountSignal::Paused(advice), Paused { .. }) if fresh => to(
            Paused {
                advice: advice.clone(),
                next_probe: now + probe_interval,
                probing: false,
            },
            false,
        ),
        (AccountSignal::Paused(_), _) => same(),

        (AccountSignal::QuotaHold { wait, reason }, Active | Throttled { .. }) => to(
            Held {
                until: now + *wait,
                reason: reason.clone(),
            },
            true,
        ),
        (AccountSignal::QuotaHold { wait, reason }, Held { until, .. }) => to(
            Held {
                until: (*until).max(now + *wait),
                reason: reason.clone(),
            },
            false,
        ),
        // The probe got through authentication but hit the quota: held, no longer paused.
        (AccountSignal::QuotaHold { wait, reason }, Paused { .. }) if fresh => to(
            Held {
                until: now + *wait,
                reason: reason.clone(),
            },
            true,
        ),
        (AccountSignal::QuotaHold { .. }, _) => same(),
    }
}

#[cfg(test)]
mod tests;

//! A shared, read-only view of each account's delivery state, for logs, `send-test` and the
//! HTTP side. The forwarder stores each account's state machine ([`super::account::Account`])
//! here after every transition; what readers get ([`AccountState`]) is derived from it when they
//! ask, so the view cannot drift from the state the forwarder acts on. The same holds for
//! failover: whether an account is "failing over to <fallback>: <cause>" is derived from its
//! state and its configured fallback by [`super::failover::failover`].

use std::collections::HashMap;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::advice::Advice;

use super::account::Account;
use super::failover::{Failover, failover};
use super::health::Health;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum AccountState {
    Active,
    /// Exchange asked us to slow down.
    Throttled {
        until: DateTime<Utc>,
        reason: String,
    },
    /// A configuration problem; one message is tried at `next_probe`.
    Paused {
        next_probe: DateTime<Utc>,
        advice: Advice,
    },
    /// The daily recipient quota is used up.
    Held {
        until: DateTime<Utc>,
        reason: String,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct AccountStatus {
    #[serde(flatten)]
    pub state: AccountState,
    /// The upstream has not been reachable for several attempts in a row: the last cause.
    /// Delivery goes on being retried; this is for the administrator.
    pub degraded: Option<String>,
    /// Credentials that expire soon or have expired (see [`crate::lifecycle`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub credential_warnings: Vec<String>,
    /// A credential has expired: nothing goes out through this account.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub credential_expired: bool,
    pub last_success: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    /// While the account's mail goes out through its fallback: which one and why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failover: Option<Failover>,
    /// The same in words: "failing over to <fallback>: <cause>".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failing_over: Option<String>,
}

/// One thing that happened to a message, for the status page.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub time: DateTime<Utc>,
    /// delivered | deferred | failed | paused | resumed | degraded | recovered | failover |
    /// failback
    pub kind: &'static str,
    pub queue_id: String,
    pub account: String,
    pub detail: String,
}

const EVENTS_KEPT: usize = 100;

/// What the forwarder stores per account.
#[derive(Debug, Default)]
struct Stored {
    account: Account,
    health: Health,
    credential_notices: Vec<crate::lifecycle::Notice>,
    last_success: Option<DateTime<Utc>>,
    last_error: Option<String>,
    /// The configured `fallback`.
    fallback: Option<String>,
}

impl Stored {
    fn view(&self) -> AccountStatus {
        let failover = failover(&self.account, self.fallback.as_deref());
        AccountStatus {
            failing_over: failover.as_ref().map(Failover::to_string),
            failover,
            state: self.account.view(tokio::time::Instant::now(), Utc::now()),
            degraded: self.health.degraded.clone(),
            credential_warnings: self
                .credential_notices
                .iter()
                .map(|n| n.text.clone())
                .collect(),
            credential_expired: self.credential_notices.iter().any(|n| n.level == 0),
            last_success: self.last_success,
            last_error: self.last_error.clone(),
        }
    }
}

#[derive(Debug, Default)]
pub struct Status {
    accounts: Mutex<HashMap<String, Stored>>,
    events: Mutex<std::collections::VecDeque<Event>>,
}

impl Status {
    /// Records an account's state (the forwarder calls it after every transition).
    pub(crate) fn set_account(&self, name: &str, account: &Account) {
        if let Ok(mut m) = self.accounts.lock() {
            m.entry(name.to_string()).or_default().account = account.clone();
        }
    }

    /// Records the account's configured fallback (at start and after a reload).
    pub(crate) fn set_fallback(&self, name: &str, fallback: Option<String>) {
        if let Ok(mut m) = self.accounts.lock() {
            m.entry(name.to_string()).or_default().fallback = fallback;
        }
    }

    /// Forgets an account that is no longer configured (a reload removed it).
    pub(crate) fn remove_account(&self, name: &str) {
        if let Ok(mut m) = self.accounts.lock() {
            m.remove(name);
        }
    }

    /// Records whether the account reaches its upstream (see [`super::health`]).
    pub(crate) fn set_health(&self, name: &str, health: &Health) {
        if let Ok(mut m) = self.accounts.lock() {
            m.entry(name.to_string()).or_default().health = health.clone();
        }
    }

    /// Records the account's credential warnings (replacing the previous ones).
    pub fn set_credential_notices(&self, name: &str, notices: Vec<crate::lifecycle::Notice>) {
        if let Ok(mut m) = self.accounts.lock() {
            m.entry(name.to_string()).or_default().credential_notices = notices;
        }
    }

    /// Records the last problem the account reported (a pause's cause and fix).
    pub(crate) fn set_error(&self, name: &str, error: String) {
        if let Ok(mut m) = self.accounts.lock() {
            m.entry(name.to_string()).or_default().last_error = Some(error);
        }
    }

    pub fn delivered(&self, account: &str) {
        if let Ok(mut m) = self.accounts.lock()
            && let Some(e) = m.get_mut(account)
        {
            e.last_success = Some(Utc::now());
        }
    }

    pub fn event(&self, kind: &'static str, queue_id: &str, account: &str, detail: &str) {
        if let Ok(mut e) = self.events.lock() {
            if e.len() >= EVENTS_KEPT {
                e.pop_front();
            }
            e.push_back(Event {
                time: Utc::now(),
                kind,
                queue_id: queue_id.to_string(),
                account: account.to_string(),
                detail: detail.to_string(),
            });
        }
    }

    /// Newest first.
    pub fn recent_events(&self) -> Vec<Event> {
        self.events
            .lock()
            .map(|e| e.iter().rev().cloned().collect())
            .unwrap_or_default()
    }

    pub fn get(&self, account: &str) -> Option<AccountStatus> {
        self.accounts.lock().ok()?.get(account).map(Stored::view)
    }

    pub fn all(&self) -> Vec<(String, AccountStatus)> {
        let mut v: Vec<_> = self
            .accounts
            .lock()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.view())).collect())
            .unwrap_or_default();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

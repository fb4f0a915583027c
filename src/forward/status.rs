//! A shared, read-only view of each account's delivery state, for logs, `send-test` and the
//! HTTP side.

use std::collections::HashMap;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::advice::Advice;

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
    pub last_success: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
}

/// One thing that happened to a message, for the status page.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub time: DateTime<Utc>,
    /// delivered | deferred | failed | paused | resumed
    pub kind: &'static str,
    pub queue_id: String,
    pub account: String,
    pub detail: String,
}

const EVENTS_KEPT: usize = 100;

#[derive(Debug, Default)]
pub struct Status {
    accounts: Mutex<HashMap<String, AccountStatus>>,
    events: Mutex<std::collections::VecDeque<Event>>,
}

impl Status {
    pub fn set(&self, account: &str, state: AccountState, error: Option<String>) {
        if let Ok(mut m) = self.accounts.lock() {
            let e = m.entry(account.to_string()).or_insert(AccountStatus {
                state: AccountState::Active,
                last_success: None,
                last_error: None,
            });
            e.state = state;
            if error.is_some() {
                e.last_error = error;
            }
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
        self.accounts.lock().ok()?.get(account).cloned()
    }

    pub fn all(&self) -> Vec<(String, AccountStatus)> {
        let mut v: Vec<_> = self
            .accounts
            .lock()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

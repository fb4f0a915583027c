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

#[derive(Debug, Default)]
pub struct Status {
    accounts: Mutex<HashMap<String, AccountStatus>>,
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

//! Keeps an idle delegated account's sign-in alive.
//!
//! Entra expires a refresh token after 90 days without use (AADSTS700082). An account that
//! sends mail refreshes its grant with every access token (hourly at most); one that sends
//! nothing would lose its sign-in. So a task per delegated account checks every
//! [`CHECK_EVERY`] and refreshes the grant when it is [`REFRESH_AFTER`] old or more, whether or
//! not mail flows.
//!
//! Where it runs: [`spawn`] is called where the forwarder builds the account's Exchange upstream
//! (`forward::upstream_for`). The task holds only a weak reference to the [`TokenManager`], so
//! it ends by itself when the forwarder (and with it the upstream) is gone; it never keeps a
//! relay alive. Timers are on tokio's clock (tested on the paused clock). A failed keep-alive
//! refresh is logged by the token manager; the account is paused by the next delivery attempt
//! that needs a token, as for any refused grant.

use std::future::Future;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::time::Instant;

use super::TokenManager;

/// How often the age of the grant is looked at.
pub const CHECK_EVERY: Duration = Duration::from_secs(3600);
/// Age of the grant at which an idle account refreshes it.
pub const REFRESH_AFTER: Duration = Duration::from_secs(24 * 3600);

/// What the keep-alive loop needs from a token manager (a seam for the paused-clock test).
pub trait KeepAlive: Send + Sync + 'static {
    fn due(&self, now: Instant) -> bool;
    fn refresh(&self) -> impl Future<Output = ()> + Send;
}

impl KeepAlive for TokenManager {
    fn due(&self, now: Instant) -> bool {
        self.grant_older_than(REFRESH_AFTER, now)
    }

    async fn refresh(&self) {
        if self.refresh_grant().await.is_ok() {
            tracing::info!(account = %self.account, "refreshed the delegated sign-in of an idle account");
        }
    }
}

/// Starts the keep-alive of a delegated account (nothing for other accounts, or outside a
/// tokio runtime).
pub fn spawn(tokens: &Arc<TokenManager>) {
    if !tokens.is_delegated() {
        return;
    }
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(run(Arc::downgrade(tokens)));
    }
}

/// The loop: every [`CHECK_EVERY`], refresh if due; ends when the manager is dropped.
pub async fn run<T: KeepAlive>(tokens: Weak<T>) {
    // The first look comes after a full period, not at once: a reload builds upstreams it may
    // throw away, and their keep-alive must not refresh beside the live one (with single-use
    // refresh tokens, the loser's grant would be spent).
    let mut tick = tokio::time::interval_at(Instant::now() + CHECK_EVERY, CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(t) = tokens.upgrade() else {
            return;
        };
        if t.due(Instant::now()) {
            t.refresh().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A grant refreshed at `last`; each refresh counts and restarts the clock.
    struct Stub {
        last: Mutex<Instant>,
        refreshes: Mutex<Vec<Instant>>,
    }

    impl KeepAlive for Stub {
        fn due(&self, now: Instant) -> bool {
            now.saturating_duration_since(*self.last.lock().unwrap()) >= REFRESH_AFTER
        }
        async fn refresh(&self) {
            let now = Instant::now();
            *self.last.lock().unwrap() = now;
            self.refreshes.lock().unwrap().push(now);
        }
    }

    /// The real manager's decision: by the age of the stored grant, on tokio's clock; nothing
    /// to keep alive before the first sign-in or for app-only accounts.
    #[tokio::test(start_paused = true)]
    async fn a_managers_grant_is_due_a_day_after_it_was_obtained() {
        let dir = tempfile::tempdir().unwrap();
        let mut a: crate::config::AccountConfig = toml::from_str(
            r#"name = "d"
kind = "exchange"
auth = "delegated"
mailbox = "d@contoso.com"
tenant = "contoso.onmicrosoft.com"
client_id = "abc""#,
        )
        .unwrap();
        a.token_file = dir.path().join("d.refresh-token");
        let never = TokenManager::new(&a).unwrap();
        assert!(
            !never.due(Instant::now()),
            "nothing to refresh before a sign-in"
        );

        super::super::store::TokenStore::new(&a.token_file)
            .save(&super::super::store::Grant {
                refresh_token: "rt".into(),
                obtained_at: chrono::Utc::now() - chrono::Duration::hours(1),
                user: None,
            })
            .unwrap();
        let tokens = TokenManager::new(&a).unwrap();
        assert!(!tokens.due(Instant::now()), "an hour-old grant is fresh");
        tokio::time::advance(REFRESH_AFTER - Duration::from_secs(2 * 3600)).await;
        assert!(!tokens.due(Instant::now()));
        tokio::time::advance(Duration::from_secs(2 * 3600)).await;
        assert!(tokens.due(Instant::now()), "due 24 h after it was obtained");

        a.auth = crate::config::AccountAuth::ClientCredentials;
        a.client_secret_file = Some(dir.path().join("secret"));
        std::fs::write(dir.path().join("secret"), "s").unwrap();
        assert!(!TokenManager::new(&a).unwrap().due(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_grant_is_refreshed_daily_and_the_task_ends_with_its_manager() {
        let start = Instant::now();
        let stub = Arc::new(Stub {
            last: Mutex::new(start),
            refreshes: Mutex::new(Vec::new()),
        });
        let task = tokio::spawn(run(Arc::downgrade(&stub)));
        tokio::time::sleep(Duration::from_secs(23 * 3600)).await;
        assert!(
            stub.refreshes.lock().unwrap().is_empty(),
            "not before a day"
        );
        tokio::time::sleep(Duration::from_secs(3 * 24 * 3600)).await;
        let times = stub.refreshes.lock().unwrap().clone();
        assert_eq!(times.len(), 3, "once a day over three idle days: {times:?}");
        for w in times.windows(2) {
            let gap = w[1] - w[0];
            assert!(
                gap >= REFRESH_AFTER && gap <= REFRESH_AFTER + CHECK_EVERY,
                "{gap:?}"
            );
        }
        // 90 days of silence never pass without a refresh.
        assert!(times[0] - start <= REFRESH_AFTER + CHECK_EVERY);
        drop(stub);
        tokio::time::sleep(CHECK_EVERY * 2).await;
        assert!(
            task.is_finished(),
            "the keep-alive ends when its manager is gone"
        );
    }
}

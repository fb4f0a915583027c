//! Device logins: password checks (argon2, off the async threads, a few at a time) and the
//! per-client failure guard that slows down and then refuses password guessing.
//!
//! Contracts:
//! - An attempt is counted *before* its password is checked ([`AuthGuard::reserve`]): failures
//!   plus attempts in flight never exceed `max_auth_failures`, so N parallel guesses against a
//!   limit of 5 run argon2 at most 5 times and the rest are refused unchecked.
//! - A success releases only its own reservation; it never forgives failures, so a client that
//!   knows one password cannot use it to keep guessing others. Failures are forgotten
//!   `auth_ban_time` after the first one of the window, or when a ban ends.
//! - A banned client is refused without running argon2.
//! - At most [`PARALLEL_VERIFICATIONS`] argon2 runs happen at once (each takes about 19 MiB and a
//!   core for tens of milliseconds); others wait their turn.
//! - Clients are counted by [`ClientKey`] (IPv6 per /64).

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use argon2::{Argon2, PasswordHasher, PasswordVerifier};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::client::ClientKey;
use crate::config::UserConfig;
/// Hashes a password the way `[[user]] password_hash` expects it (argon2id, PHC string).
pub fn hash_password(password: &str) -> Result<String, String> {
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// Checked for unknown user names so their answer takes as long as a wrong password. A fixed
/// hash (of a random password nobody kept) with `hash_password`'s parameters: hashing one at
/// start-up would delay the listener by a full argon2 run, and its result is ignored anyway.
const DECOY: &str = "$argon2id$v=19$m=19456,t=2,p=1$+MBfW7Ld2Z2WpItfH1L+Eg$s5tgUfZBQ5ia5WyWKvbJMwKJ52R/DjXHpzgiKP6+E/A";

/// How many argon2 verifications may run at once. Two keeps the worst case near 40 MiB and
/// leaves the other cores to the spool and the forwarder.
pub const PARALLEL_VERIFICATIONS: usize = 2;

/// The configured device accounts.
pub struct Users {
    hashes: HashMap<String, String>,
    verifying: Arc<Semaphore>,
    verifications: AtomicU64,
    in_flight: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
}

impl Users {
    pub fn new(users: &[UserConfig]) -> Users {
        Users {
            hashes: users
                .iter()
                .map(|u| (u.name.clone(), u.password_hash.clone()))
                .collect(),
            verifying: Arc::new(Semaphore::new(PARALLEL_VERIFICATIONS)),
            verifications: AtomicU64::new(0),
            in_flight: Arc::new(AtomicUsize::new(0)),
            peak: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// True if `password` is right for `user`. Runs argon2 on the blocking pool, waiting for one
    /// of the [`PARALLEL_VERIFICATIONS`] slots first. The slot is held by the blocking task
    /// itself, so a caller that gives up early does not let a further run start.
    pub async fn verify(&self, user: &str, password: &str) -> bool {
        let (known, hash) = match self.hashes.get(user) {
            Some(h) => (true, h.clone()),
            None => (false, DECOY.to_string()),
        };
        let Ok(permit) = self.verifying.clone().acquire_owned().await else {
            return false;
        };
        self.verifications.fetch_add(1, Ordering::Relaxed);
        let password = password.to_string();
        let (in_flight, peak) = (self.in_flight.clone(), self.peak.clone());
        let ok = tokio::task::spawn_blocking(move || {
            let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(now, Ordering::SeqCst);
            let ok = Argon2::default()
                .verify_password(password.as_bytes(), hash.as_str())
                .is_ok();
            in_flight.fetch_sub(1, Ordering::SeqCst);
            drop(permit);
            ok
        })
        .await
        .unwrap_or(false);
        known && ok
    }

    /// Password checks started since start-up (known and unknown user names alike).
    pub fn verifications(&self) -> u64 {
        self.verifications.load(Ordering::Relaxed)
    }

    /// The most argon2 runs that were ever in progress at the same moment.
    pub fn peak_parallel_verifications(&self) -> usize {
        self.peak.load(Ordering::SeqCst)
    }
}

/// Why an attempt was refused without checking the password.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The client failed `max_auth_failures` times and is banned until the ban ends.
    Banned,
    /// Failures so far plus attempts still being checked already reach `max_auth_failures`.
    TooManyInFlight,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Refused::Banned => "address is temporarily banned after repeated failures",
            Refused::TooManyInFlight => {
                "other logins from this address are being checked and could use up its failure budget"
            }
        })
    }
}

/// The outcome of a checked attempt, as the guard judges it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Success,
    /// A wrong password; `banned` if it was the one that reached `max_auth_failures`.
    Failure {
        banned: bool,
    },
}

/// One client's failed-login record. Its transitions are pure functions of `now` so they can be
/// tested as a table; [`AuthGuard`] applies them under its lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Record {
    /// Wrong passwords since `window_start`.
    failures: u32,
    /// Attempts reserved and not yet settled.
    pending: u32,
    window_start: Instant,
    banned_until: Option<Instant>,
}

impl Record {
    fn new(now: Instant) -> Record {
        Record {
            failures: 0,
            pending: 0,
            window_start: now,
            banned_until: None,
        }
    }

    /// Forgets failures whose window or ban has ended.
    fn refreshed(mut self, now: Instant, ban: Duration) -> Record {
        match self.banned_until {
            Some(until) if until > now => {}
            Some(_) => {
                self.banned_until = None;
                self.failures = 0;
                self.window_start = now;
            }
            None if now.duration_since(self.window_start) >= ban => {
                self.failures = 0;
                self.window_start = now;
            }
            None => {}
        }
        self
    }

    fn banned(&self, now: Instant) -> bool {
        self.banned_until.is_some_and(|until| until > now)
    }

    fn reserve(self, now: Instant, max: u32, ban: Duration) -> Result<Record, Refused> {
        let mut r = self.refreshed(now, ban);
        if r.banned(now) {
            return Err(Refused::Banned);
        }
        if r.failures.saturating_add(r.pending) >= max {
            return Err(Refused::TooManyInFlight);
        }
        r.pending += 1;
        Ok(r)
    }

    fn settle(self, now: Instant, ok: bool, max: u32, ban: Duration) -> (Record, Verdict) {
        let mut r = self.refreshed(now, ban);
        r.pending = r.pending.saturating_sub(1);
        if ok {
            return (r, Verdict::Success);
        }
        if r.failures == 0 {
            r.window_start = now;
        }
        r.failures = r.failures.saturating_add(1);
        let banned = r.failures >= max;
        if banned {
            r.banned_until = Some(now + ban);
        }
        (r, Verdict::Failure { banned })
    }

    /// Nothing worth keeping: no attempt in flight, no ban, no failure in the window.
    fn idle(&self, now: Instant, ban: Duration) -> bool {
        let r = self.refreshed(now, ban);
        r.pending == 0 && r.failures == 0 && r.banned_until.is_none()
    }
}

/// Failed logins per client. After `max` failures within `ban` the client is refused until
/// `ban` has passed; see the module header for the counting rules.
pub struct AuthGuard {
    max: u32,
    ban: Duration,
    by_client: Mutex<HashMap<ClientKey, Record>>,
}

/// An attempt counted by [`AuthGuard::reserve`]. Settle it with the verification result; one
/// dropped unsettled (the session ended mid-check) counts as a failure.
pub struct Attempt<'a> {
    guard: &'a AuthGuard,
    key: ClientKey,
    settled: bool,
}

impl Attempt<'_> {
    pub fn settle(mut self, ok: bool) -> Verdict {
        self.settled = true;
        self.guard.settle(self.key, ok)
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if !self.settled {
            self.guard.settle(self.key, false);
        }
    }
}

impl AuthGuard {
    pub fn new(max: u32, ban: Duration) -> AuthGuard {
        AuthGuard {
            max: max.max(1),
            ban,
            by_client: Mutex::new(HashMap::new()),
        }
    }

    pub fn is_banned(&self, ip: IpAddr) -> bool {
        let Ok(map) = self.by_client.lock() else {
            return false;
        };
        map.get(&ClientKey::of(ip))
            .is_some_and(|r| r.banned(Instant::now()))
    }

    /// Counts an attempt from `ip` before its password is checked, or refuses it.
    pub fn reserve(&self, ip: IpAddr) -> Result<Attempt<'_>, Refused> {
        let key = ClientKey::of(ip);
        let now = Instant::now();
        // A poisoned lock means a panic elsewhere while holding it; refusing logins is the safe
        // side of that.
        let Ok(mut map) = self.by_client.lock() else {
            return Err(Refused::Banned);
        };
        // Forget idle entries so the map cannot grow without bound.
        if map.len() > 10_000 {
            let ban = self.ban;
            map.retain(|_, r| !r.idle(now, ban));
        }
        let record = map.get(&key).copied().unwrap_or_else(|| Record::new(now));
        let record = record.reserve(now, self.max, self.ban)?;
        map.insert(key, record);
        Ok(Attempt {
            guard: self,
            key,
            settled: false,
        })
    }

    fn settle(&self, key: ClientKey, ok: bool) -> Verdict {
        let now = Instant::now();
        let Ok(mut map) = self.by_client.lock() else {
            return Verdict::Failure { banned: true };
        };
        let record = map.get(&key).copied().unwrap_or_else(|| Record::new(now));
        let (record, verdict) = record.settle(now, ok, self.max, self.ban);
        if record.idle(now, self.ban) {
            map.remove(&key);
        } else {
            map.insert(key, record);
        }
        verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn verify_and_decoy() {
        let hash = hash_password("s3cret").unwrap();
        assert!(hash.starts_with("$argon2id$"));
        let users = Users::new(&[UserConfig {
            name: "dev".into(),
            password_hash: hash,
            account: None,
        }]);
        assert!(users.verify("dev", "s3cret").await);
        assert!(!users.verify("dev", "nope").await);
        assert!(!users.verify("nobody", "s3cret").await);
        // The decoy is a valid hash with the same cost, so unknown names cost a full check.
        let decoy: argon2::PasswordHash = DECOY.try_into().unwrap();
        let ours = hash_password("x").unwrap();
        let ours: argon2::PasswordHash = ours.as_str().try_into().unwrap();
        assert_eq!(decoy.params, ours.params);
    }

    #[tokio::test]
    async fn verifications_run_a_few_at_a_time() {
        let users = Arc::new(Users::new(&[]));
        let checks: Vec<_> = (0..8)
            .map(|i| {
                let users = users.clone();
                tokio::spawn(async move { users.verify("nobody", &format!("guess{i}")).await })
            })
            .collect();
        for c in checks {
            assert!(!c.await.unwrap());
        }
        assert_eq!(users.verifications(), 8);
        let peak = users.peak_parallel_verifications();
        assert!((1..=PARALLEL_VERIFICATIONS).contains(&peak), "{peak}");
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn guard_bans_after_max() {
        let g = AuthGuard::new(3, Duration::from_secs(60));
        let a = ip("127.0.0.9");
        assert_eq!(
            g.reserve(a).unwrap().settle(false),
            Verdict::Failure { banned: false }
        );
        assert_eq!(
            g.reserve(a).unwrap().settle(false),
            Verdict::Failure { banned: false }
        );
        assert_eq!(
            g.reserve(a).unwrap().settle(false),
            Verdict::Failure { banned: true }
        );
        assert!(g.is_banned(a));
        assert_eq!(g.reserve(a).err(), Some(Refused::Banned));
        assert!(!g.is_banned(ip("127.0.0.8")));
    }

    #[test]
    fn attempts_in_flight_count_against_the_limit() {
        let g = AuthGuard::new(5, Duration::from_secs(60));
        let a = ip("192.0.2.7");
        let held: Vec<_> = (0..5).map(|_| g.reserve(a).unwrap()).collect();
        for _ in 0..10 {
            assert_eq!(g.reserve(a).err(), Some(Refused::TooManyInFlight));
        }
        // Another client is not affected.
        assert!(g.reserve(ip("192.0.2.8")).is_ok());
        let verdicts: Vec<_> = held.into_iter().map(|t| t.settle(false)).collect();
        assert_eq!(verdicts.last(), Some(&Verdict::Failure { banned: true }));
        assert!(g.is_banned(a));
    }

    #[test]
    fn success_releases_only_its_own_reservation() {
        let g = AuthGuard::new(3, Duration::from_secs(60));
        let a = ip("192.0.2.7");
        let (x, y) = (g.reserve(a).unwrap(), g.reserve(a).unwrap());
        assert_eq!(x.settle(false), Verdict::Failure { banned: false });
        let right = g.reserve(a).unwrap();
        assert_eq!(right.settle(true), Verdict::Success);
        assert_eq!(y.settle(false), Verdict::Failure { banned: false });
        // Two failures stand; the third bans despite the success in between.
        assert_eq!(
            g.reserve(a).unwrap().settle(false),
            Verdict::Failure { banned: true }
        );
    }

    #[test]
    fn an_abandoned_attempt_counts_as_failed() {
        let g = AuthGuard::new(1, Duration::from_secs(60));
        let a = ip("192.0.2.7");
        drop(g.reserve(a).unwrap());
        assert!(g.is_banned(a));
    }

    #[test]
    fn ipv6_clients_are_counted_per_64() {
        let g = AuthGuard::new(2, Duration::from_secs(60));
        assert!(!matches!(
            g.reserve(ip("2001:db8::1")).unwrap().settle(false),
            Verdict::Failure { banned: true }
        ));
        g.reserve(ip("2001:db8::2:3")).unwrap().settle(false);
        assert!(g.is_banned(ip("2001:db8::ffff")));
        assert!(!g.is_banned(ip("2001:db8:0:1::1")));
    }

    #[tokio::test(start_paused = true)]
    async fn failures_are_forgotten_after_the_window_and_the_ban() {
        let ban = Duration::from_secs(60);
        let g = AuthGuard::new(2, ban);
        let a = ip("192.0.2.7");
        g.reserve(a).unwrap().settle(false);
        tokio::time::advance(ban).await;
        // The first failure's window is over: this one is the first again.
        assert_eq!(
            g.reserve(a).unwrap().settle(false),
            Verdict::Failure { banned: false }
        );
        assert_eq!(
            g.reserve(a).unwrap().settle(false),
            Verdict::Failure { banned: true }
        );
        tokio::time::advance(ban - Duration::from_secs(1)).await;
        assert!(g.is_banned(a));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(!g.is_banned(a));
        assert_eq!(
            g.reserve(a).unwrap().settle(false),
            Verdict::Failure { banned: false }
        );
    }

    #[test]
    fn record_transitions() {
        let t0 = Instant::now();
        let ban = Duration::from_secs(10);
        let r = Record::new(t0);
        let r = r.reserve(t0, 2, ban).unwrap();
        assert_eq!((r.failures, r.pending), (0, 1));
        let (r, v) = r.settle(t0, true, 2, ban);
        assert_eq!((r.failures, r.pending, v), (0, 0, Verdict::Success));
        assert!(r.idle(t0, ban));
        let (r, _) = r.reserve(t0, 2, ban).unwrap().settle(t0, false, 2, ban);
        assert!(!r.idle(t0, ban));
        assert!(r.idle(t0 + ban, ban));
    }
}

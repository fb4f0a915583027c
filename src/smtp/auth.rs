//! Device logins: password checks (argon2, off the async threads) and the per-address failure
//! counter that slows down and then refuses password guessing.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::{Argon2, PasswordHasher, PasswordVerifier};

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

/// The configured device accounts.
pub struct Users {
    hashes: HashMap<String, String>,
}

impl Users {
    pub fn new(users: &[UserConfig]) -> Users {
        Users {
            hashes: users
                .iter()
                .map(|u| (u.name.clone(), u.password_hash.clone()))
                .collect(),
        }
    }

    /// True if `password` is right for `user`. Runs argon2 on the blocking pool.
    pub async fn verify(&self, user: &str, password: &str) -> bool {
        let (known, hash) = match self.hashes.get(user) {
            Some(h) => (true, h.clone()),
            None => (false, DECOY.to_string()),
        };
        let password = password.to_string();
        let ok = tokio::task::spawn_blocking(move || {
            Argon2::default()
                .verify_password(password.as_bytes(), hash.as_str())
                .is_ok()
        })
        .await
        .unwrap_or(false);
        known && ok
    }
}

#[derive(Debug)]
struct Failures {
    count: u32,
    since: Instant,
    banned_until: Option<Instant>,
}

/// Failed logins per client address. After `max` failures within `ban` the address is refused
/// until `ban` has passed.
pub struct AuthGuard {
    max: u32,
    ban: Duration,
    by_ip: Mutex<HashMap<IpAddr, Failures>>,
}

impl AuthGuard {
    pub fn new(max: u32, ban: Duration) -> AuthGuard {
        AuthGuard {
            max: max.max(1),
            ban,
            by_ip: Mutex::new(HashMap::new()),
        }
    }

    pub fn is_banned(&self, ip: IpAddr) -> bool {
        let Ok(mut map) = self.by_ip.lock() else {
            return false;
        };
        let now = Instant::now();
        match map.get(&ip).and_then(|f| f.banned_until) {
            Some(until) if until > now => true,
            Some(_) => {
                map.remove(&ip);
                false
            }
            None => false,
        }
    }

    /// Counts a failure; returns true if the address is now refused.
    pub fn failure(&self, ip: IpAddr) -> bool {
        let Ok(mut map) = self.by_ip.lock() else {
            return false;
        };
        let now = Instant::now();
        // Forget stale entries so the map cannot grow without bound.
        if map.len() > 10_000 {
            let ban = self.ban;
            map.retain(|_, f| {
                f.banned_until.is_some_and(|u| u > now) || now.duration_since(f.since) < ban
            });
        }
        let f = map.entry(ip).or_insert(Failures {
            count: 0,
            since: now,
            banned_until: None,
        });
        if now.duration_since(f.since) > self.ban {
            f.count = 0;
            f.since = now;
        }
        f.count += 1;
        if f.count >= self.max {
            f.banned_until = Some(now + self.ban);
            return true;
        }
        false
    }

    pub fn success(&self, ip: IpAddr) {
        if let Ok(mut map) = self.by_ip.lock() {
            map.remove(&ip);
        }
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

    #[test]
    fn guard_bans_after_max() {
        let g = AuthGuard::new(3, Duration::from_secs(60));
        let ip: IpAddr = "127.0.0.9".parse().unwrap();
        assert!(!g.failure(ip));
        assert!(!g.failure(ip));
        assert!(g.failure(ip));
        assert!(g.is_banned(ip));
        assert!(!g.is_banned("127.0.0.8".parse().unwrap()));
    }
}

//! Connection budgets: who may hold how many SMTP connections at once.
//!
//! Contract, checked when a connection is accepted ([`Limits::admit`]):
//! - Every client (an IPv4 address, or an IPv6 /64; see [`ClientKey`]) holds at most
//!   `max_connections_per_client` connections.
//! - *Strangers* (clients outside `allowed_networks` that have not logged in) draw from their
//!   own pool of `untrusted_max_connections`, and each holds at most
//!   `untrusted_max_connections_per_client` such connections. Everyone else draws from
//!   `max_connections`. Strangers therefore never use up the connections that devices in
//!   `allowed_networks` need, however many of them there are.
//! - A stranger that logs in ([`Admission::logged_in`]) stops counting as a stranger and moves
//!   to the main pool when it has room (otherwise it keeps its stranger slot).
//! - Whatever ends a connection (close, error, panic), dropping its [`Admission`] gives every
//!   slot back.
//!
//! The listener refuses a connection over budget with `421 4.7.0` and closes it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::client::ClientKey;
use super::reply::{self, Reply};
use crate::config::RelayConfig;

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `max_connections` are open.
    Full,
    /// This client already holds `max_connections_per_client`.
    ClientFull,
    /// `untrusted_max_connections` strangers are connected.
    StrangersFull,
    /// This stranger already holds `untrusted_max_connections_per_client` connections that have
    /// not logged in.
    StrangerFull,
}

impl Refusal {
    pub fn reply(self) -> Reply {
        match self {
            Refusal::Full => reply::too_many_connections(),
            Refusal::ClientFull => reply::too_many_connections_from_client(),
            Refusal::StrangersFull => reply::too_many_strangers(),
            Refusal::StrangerFull => reply::too_many_not_logged_in_from_client(),
        }
    }

    /// For the log line.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::Full => "max_connections reached",
            Refusal::ClientFull => "max_connections_per_client reached for this client",
            Refusal::StrangersFull => "untrusted_max_connections reached",
            Refusal::StrangerFull => "untrusted_max_connections_per_client reached for this client",
        }
    }
}

/// Open connections of one client.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Counts {
    open: usize,
    /// Of `open`, those from outside `allowed_networks` that have not logged in.
    strangers: usize,
}

/// The per-client part of the decision; the pools are checked after it.
fn check_client(
    counts: Counts,
    stranger: bool,
    per_client: usize,
    stranger_per_client: usize,
) -> Result<(), Refusal> {
    if counts.open >= per_client {
        return Err(Refusal::ClientFull);
    }
    if stranger && counts.strangers >= stranger_per_client {
        return Err(Refusal::StrangerFull);
    }
    Ok(())
}

/// The budgets of one relay, shared by all its listeners.
pub struct Limits {
    main: Arc<Semaphore>,
    strangers: Arc<Semaphore>,
    per_client: usize,
    stranger_per_client: usize,
    by_client: Mutex<HashMap<ClientKey, Counts>>,
}

/// One admitted connection's slots; dropping it gives them back.
pub struct Admission {
    limits: Arc<Limits>,
    key: ClientKey,
    /// Held for the pool it came from; replaced when a stranger logs in.
    _permit: OwnedSemaphorePermit,
    stranger: bool,
}

impl Limits {
    pub fn new(relay: &RelayConfig) -> Arc<Limits> {
        Arc::new(Limits {
            main: Arc::new(Semaphore::new(relay.max_connections)),
            strangers: Arc::new(Semaphore::new(relay.untrusted_max_connections)),
            per_client: relay.max_connections_per_client,
            stranger_per_client: relay.untrusted_max_connections_per_client,
            by_client: Mutex::new(HashMap::new()),
        })
    }

    /// Admits a connection from `ip`, a stranger unless `network_allowed`.
    pub fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        network_allowed: bool,
    ) -> Result<Admission, Refusal> {
        let key = ClientKey::of(ip);
        let stranger = !network_allowed;
        // Poisoned only by a panic while counting; refusing is the safe side.
        let Ok(mut map) = self.by_client.lock() else {
            return Err(Refusal::Full);
        };
        let counts = map.get(&key).copied().unwrap_or_default();
        check_client(counts, stranger, self.per_client, self.stranger_per_client)?;
        let (pool, full) = if stranger {
            (&self.strangers, Refusal::StrangersFull)
        } else {
            (&self.main, Refusal::Full)
        };
        let permit = pool.clone().try_acquire_owned().map_err(|_| full)?;
        let entry = map.entry(key).or_default();
        entry.open += 1;
        entry.strangers += usize::from(stranger);
        Ok(Admission {
            limits: self.clone(),
            key,
            _permit: permit,
            stranger,
        })
    }
}

impl Admission {
    /// The client logged in: it no longer counts as a stranger, and its slot moves to the main
    /// pool if that has room.
    pub fn logged_in(&mut self) {
        if !self.stranger {
            return;
        }
        self.stranger = false;
        if let Ok(mut map) = self.limits.by_client.lock()
            && let Some(c) = map.get_mut(&self.key)
        {
            c.strangers = c.strangers.saturating_sub(1);
        }
        if let Ok(permit) = self.limits.main.clone().try_acquire_owned() {
            self._permit = permit;
        }
    }

    /// True while this connection counts as a stranger's (outside `allowed_networks`, not
    /// logged in).
    pub fn is_stranger(&self) -> bool {
        self.stranger
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let Ok(mut map) = self.limits.by_client.lock() else {
            return;
        };
        if let Some(c) = map.get_mut(&self.key) {
            c.open = c.open.saturating_sub(1);
            if self.stranger {
                c.strangers = c.strangers.saturating_sub(1);
            }
            if c.open == 0 {
                map.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(
        main: usize,
        strangers: usize,
        per_client: usize,
        stranger_per_client: usize,
    ) -> Arc<Limits> {
        Limits::new(&RelayConfig {
            max_connections: main,
            untrusted_max_connections: strangers,
            max_connections_per_client: per_client,
            untrusted_max_connections_per_client: stranger_per_client,
            ..RelayConfig::default()
        })
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn client_check_table() {
        let c = |open, strangers| Counts { open, strangers };
        let cases = [
            (c(0, 0), false, Ok(())),
            (c(19, 0), false, Ok(())),
            (c(20, 0), false, Err(Refusal::ClientFull)),
            (c(4, 4), true, Ok(())),
            (c(5, 5), true, Err(Refusal::StrangerFull)),
            (c(5, 5), false, Ok(())),
            (c(20, 0), true, Err(Refusal::ClientFull)),
        ];
        for (counts, stranger, want) in cases {
            assert_eq!(
                check_client(counts, stranger, 20, 5),
                want,
                "{counts:?} {stranger}"
            );
        }
    }

    #[test]
    fn per_client_cap_counts_ipv6_per_64_and_mapped_as_ipv4() {
        let l = limits(100, 100, 2, 2);
        let a = l.admit(ip("2001:db8::1"), true).unwrap();
        let _b = l.admit(ip("2001:db8::2"), true).unwrap();
        assert_eq!(
            l.admit(ip("2001:db8::3"), true).err(),
            Some(Refusal::ClientFull)
        );
        assert!(l.admit(ip("2001:db8:0:1::1"), true).is_ok());
        drop(a);
        assert!(l.admit(ip("2001:db8::3"), true).is_ok());

        let _c = l.admit(ip("192.0.2.1"), true).unwrap();
        let _d = l.admit(ip("::ffff:192.0.2.1"), true).unwrap();
        assert_eq!(
            l.admit(ip("192.0.2.1"), true).err(),
            Some(Refusal::ClientFull)
        );
    }

    #[test]
    fn strangers_have_their_own_pool() {
        let l = limits(1, 3, 20, 2);
        let _s: Vec<_> = ["192.0.2.1", "192.0.2.1", "192.0.2.2"]
            .iter()
            .map(|a| l.admit(ip(a), false).unwrap())
            .collect();
        assert_eq!(
            l.admit(ip("192.0.2.3"), false).err(),
            Some(Refusal::StrangersFull)
        );
        // The LAN still gets its connection.
        let lan = l.admit(ip("10.0.0.1"), true).unwrap();
        assert_eq!(l.admit(ip("10.0.0.2"), true).err(), Some(Refusal::Full));
        drop(lan);
        assert!(l.admit(ip("10.0.0.2"), true).is_ok());
    }

    #[test]
    fn a_stranger_that_logs_in_frees_its_stranger_slots() {
        let l = limits(10, 2, 20, 1);
        let mut s = l.admit(ip("192.0.2.1"), false).unwrap();
        assert_eq!(
            l.admit(ip("192.0.2.1"), false).err(),
            Some(Refusal::StrangerFull)
        );
        s.logged_in();
        assert!(!s.is_stranger());
        let t = l.admit(ip("192.0.2.1"), false).unwrap();
        // The logged-in connection moved to the main pool: two more strangers fit.
        let _u = l.admit(ip("192.0.2.2"), false).unwrap();
        drop((s, t));
        let map = l.by_client.lock().unwrap();
        assert!(!map.contains_key(&ClientKey::of(ip("192.0.2.1"))));
    }

    #[test]
    fn slots_come_back_when_a_task_panics() {
        let l = limits(1, 1, 1, 1);
        let l2 = l.clone();
        let r = std::thread::spawn(move || {
            let _a = l2.admit(ip("10.0.0.1"), true).unwrap();
            panic!("session bug");
        })
        .join();
        assert!(r.is_err());
        assert!(l.admit(ip("10.0.0.1"), true).is_ok());
    }
}

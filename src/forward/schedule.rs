//! Where each queued message is in the forwarder: scheduled for a time, waiting for its account
//! (due, but the account is blocked or has no free slot), or in flight (one attempt running).
//!
//! Contract: a message is in exactly one place, so there is at most one attempt per message at a
//! time. The only way to start an attempt is [`Schedule::start_next`], which takes a waiting
//! message and marks it in flight; a message in flight cannot be scheduled, made due or
//! forgotten until [`Schedule::finished`] reports its attempt's end. Making a message due again
//! (an administrator's retry) moves it, it never adds a second copy.
//!
//! Time is `tokio::time::Instant`; persisted wall times are converted by the caller.

use std::collections::{BTreeSet, HashMap, VecDeque};

use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    Scheduled(Instant),
    Waiting,
    InFlight,
}

#[derive(Debug)]
struct Entry {
    account: String,
    place: Place,
}

/// Why a message could not be moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Busy {
    /// An attempt is running for it.
    InFlight,
}

#[derive(Debug, Default)]
pub struct Schedule {
    messages: HashMap<String, Entry>,
    /// Scheduled messages by due time (an index of `Place::Scheduled`).
    timeline: BTreeSet<(Instant, String)>,
    /// Due messages per account, oldest first (an index of `Place::Waiting`).
    waiting: HashMap<String, VecDeque<String>>,
}

impl Schedule {
    pub fn place(&self, id: &str) -> Option<Place> {
        self.messages.get(id).map(|e| e.place)
    }

    /// Schedules a message that is not in flight for `at` (moving it if it is already known).
    pub fn schedule(&mut self, id: &str, account: &str, at: Instant) -> Result<(), Busy> {
        self.leave(id)?;
        self.timeline.insert((at, id.to_string()));
        self.messages.insert(
            id.to_string(),
            Entry {
                account: account.to_string(),
                place: Place::Scheduled(at),
            },
        );
        Ok(())
    }

    /// Forgets a message (held, deleted); refused while its attempt runs.
    pub fn forget(&mut self, id: &str) -> Result<(), Busy> {
        self.leave(id)?;
        self.messages.remove(id);
        Ok(())
    }

    /// Takes a message out of its index, leaving its entry for the caller to replace.
    fn leave(&mut self, id: &str) -> Result<(), Busy> {
        let Some(e) = self.messages.get(id) else {
            return Ok(());
        };
        match e.place {
            Place::InFlight => return Err(Busy::InFlight),
            Place::Scheduled(at) => {
                self.timeline.remove(&(at, id.to_string()));
            }
            Place::Waiting => {
                if let Some(q) = self.waiting.get_mut(&e.account) {
                    q.retain(|w| w != id);
                }
            }
        }
        Ok(())
    }

    /// Moves every message due at `now` to its account's waiting line. `account_for` maps the
    /// account a message names to the one that will send it (e.g. when it is no longer
    /// configured).
    pub fn release_due(&mut self, now: Instant, account_for: impl Fn(&str, &str) -> String) {
        while let Some((at, _)) = self.timeline.first()
            && *at <= now
        {
            let Some((_, id)) = self.timeline.pop_first() else {
                break;
            };
            let Some(e) = self.messages.get_mut(&id) else {
                continue;
            };
            e.account = account_for(&id, &e.account);
            e.place = Place::Waiting;
            self.waiting
                .entry(e.account.clone())
                .or_default()
                .push_back(id);
        }
    }

    /// When the next scheduled message is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.timeline.first().map(|(at, _)| *at)
    }

    pub fn has_waiting(&self, account: &str) -> bool {
        self.waiting.get(account).is_some_and(|q| !q.is_empty())
    }

    /// Starts an attempt: the oldest waiting message of `account` is now in flight.
    pub fn start_next(&mut self, account: &str) -> Option<String> {
        let q = self.waiting.get_mut(account)?;
        while let Some(id) = q.pop_front() {
            if let Some(e) = self.messages.get_mut(&id)
                && e.place == Place::Waiting
            {
                e.place = Place::InFlight;
                return Some(id);
            }
        }
        None
    }

    /// An attempt ended: the message is scheduled for `retry_at`, or gone when `None`.
    pub fn finished(&mut self, id: &str, account: &str, retry_at: Option<Instant>) {
        // In flight, a message is in no index: only its entry goes.
        if self
            .messages
            .get(id)
            .is_some_and(|e| e.place == Place::InFlight)
        {
            self.messages.remove(id);
        }
        if let Some(at) = retry_at {
            let _ = self.schedule(id, account, at);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn same(_: &str, a: &str) -> String {
        a.to_string()
    }

    #[tokio::test(start_paused = true)]
    async fn a_due_message_made_due_again_waits_once() {
        let mut s = Schedule::default();
        let now = Instant::now();
        s.schedule("A", "x", now).unwrap();
        s.release_due(now, same);
        assert_eq!(s.place("A"), Some(Place::Waiting));
        // The administrator's retry of a waiting message moves it; it never adds a copy.
        s.schedule("A", "x", now).unwrap();
        s.release_due(now, same);
        assert_eq!(s.start_next("x").as_deref(), Some("A"));
        assert_eq!(s.start_next("x"), None, "one attempt per message");
        assert_eq!(s.place("A"), Some(Place::InFlight));
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_in_flight_cannot_be_moved() {
        let mut s = Schedule::default();
        let now = Instant::now();
        s.schedule("A", "x", now).unwrap();
        s.release_due(now, same);
        assert_eq!(s.start_next("x").as_deref(), Some("A"));
        assert_eq!(s.schedule("A", "x", now), Err(Busy::InFlight));
        assert_eq!(s.forget("A"), Err(Busy::InFlight));
        let later = now + Duration::from_secs(5);
        s.finished("A", "x", Some(later));
        assert_eq!(s.place("A"), Some(Place::Scheduled(later)));
        assert_eq!(s.next_due(), Some(later));
        s.release_due(now, same);
        assert!(!s.has_waiting("x"), "not due yet");
        tokio::time::advance(Duration::from_secs(5)).await;
        s.release_due(Instant::now(), same);
        assert_eq!(s.start_next("x").as_deref(), Some("A"));
        s.finished("A", "x", None);
        assert_eq!(s.place("A"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn hold_then_release_of_a_waiting_message_leaves_one_copy() {
        let mut s = Schedule::default();
        let now = Instant::now();
        for id in ["A", "B"] {
            s.schedule(id, "x", now).unwrap();
        }
        s.release_due(now, same);
        s.forget("A").unwrap();
        assert_eq!(s.place("A"), None);
        s.schedule("A", "x", now).unwrap();
        s.release_due(now, same);
        let started: Vec<_> = std::iter::from_fn(|| s.start_next("x")).collect();
        assert_eq!(started, ["B", "A"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_makes_a_scheduled_message_due_now() {
        let mut s = Schedule::default();
        let now = Instant::now();
        s.schedule("A", "x", now + Duration::from_secs(600))
            .unwrap();
        s.schedule("A", "x", now).unwrap();
        assert_eq!(s.next_due(), Some(now));
        s.release_due(now, same);
        assert_eq!(s.start_next("x").as_deref(), Some("A"));
        assert_eq!(s.next_due(), None, "no second copy left on the timeline");
    }

    #[tokio::test(start_paused = true)]
    async fn messages_of_an_unknown_account_go_to_the_one_given() {
        let mut s = Schedule::default();
        let now = Instant::now();
        s.schedule("A", "gone", now).unwrap();
        s.release_due(now, |_, _| "x".to_string());
        assert_eq!(s.start_next("gone"), None);
        assert_eq!(s.start_next("x").as_deref(), Some("A"));
    }

    /// Any sequence of commits, retries, holds, releases, deletes, finished attempts and time
    /// passing: an attempt is only ever started for a message that has none running, and every
    /// known message is in exactly one place.
    #[tokio::test(start_paused = true)]
    async fn no_sequence_of_operations_starts_a_second_attempt() {
        let mut rng = fastrand::Rng::with_seed(12);
        let ids = ["A", "B", "C", "D"];
        let mut s = Schedule::default();
        let mut running: Vec<&str> = Vec::new();
        for step in 0..5000 {
            let id = ids[rng.usize(..ids.len())];
            let now = Instant::now();
            match rng.u8(..7) {
                // Commit, retry, release: due now (refused while in flight).
                0 | 1 => {
                    let r = s.schedule(id, "x", now);
                    assert_eq!(r.is_err(), running.contains(&id), "step {step}");
                }
                // Hold or delete.
                2 => {
                    let r = s.forget(id);
                    assert_eq!(r.is_err(), running.contains(&id), "step {step}");
                }
                3 => s.release_due(now, same),
                4 => {
                    if let Some(started) = s.start_next("x") {
                        let started = ids.iter().copied().find(|i| *i == started).unwrap();
                        assert!(!running.contains(&started), "step {step}: second attempt");
                        running.push(started);
                    }
                }
                5 => {
                    if !running.is_empty() {
                        let done = running.swap_remove(rng.usize(..running.len()));
                        let again = rng.bool().then(|| now + Duration::from_secs(rng.u64(0..3)));
                        s.finished(done, "x", again);
                    }
                }
                _ => tokio::time::advance(Duration::from_secs(1)).await,
            }
            for id in ids {
                let in_timeline = s.timeline.iter().filter(|(_, i)| i == id).count();
                let in_waiting = s
                    .waiting
                    .values()
                    .flatten()
                    .filter(|i| i.as_str() == id)
                    .count();
                let expected = match s.place(id) {
                    None | Some(Place::InFlight) => (0, 0),
                    Some(Place::Scheduled(_)) => (1, 0),
                    Some(Place::Waiting) => (0, 1),
                };
                assert_eq!((in_timeline, in_waiting), expected, "step {step}: {id}");
                assert_eq!(s.place(id) == Some(Place::InFlight), running.contains(&id));
            }
        }
    }
}

//! Per-mailbox pacing under Exchange Online's limits: at most N messages in any rate window
//! (30 per minute) and at most M recipients in any 24 hours (10,000).
//!
//! Sends are stamped when Exchange has answered the end of DATA, and a new send starts only
//! while fewer than N stamped or in-flight sends fall in the window. Exchange stamps its own
//! count before we see its answer and after we start, so its view of any window never holds
//! more than N: a burst drains at the allowed rate without provoking a throttle reply.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

const DAY: Duration = Duration::from_secs(24 * 3600);

pub struct Pacer {
    per_window: usize,
    window: Duration,
    per_day: u64,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    sends: VecDeque<Instant>,
    in_flight: usize,
    day: VecDeque<(Instant, u64)>,
    day_in_flight: u64,
}

impl State {
    fn prune(&mut self, now: Instant, window: Duration) {
        while self
            .sends
            .front()
            .is_some_and(|t| now.duration_since(*t) >= window)
        {
            self.sends.pop_front();
        }
        while self
            .day
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) >= DAY)
        {
            self.day.pop_front();
        }
    }
    fn day_total(&self) -> u64 {
        self.day.iter().map(|(_, n)| n).sum::<u64>() + self.day_in_flight
    }
}

/// A reserved send slot; give it back with [`Pacer::finish`].
#[must_use]
pub struct Slot {
    recipients: u64,
}

impl Pacer {
    pub fn new(per_window: u32, window: Duration, per_day: u32) -> Pacer {
        Pacer {
            per_window: per_window.max(1) as usize,
            window,
            per_day: per_day.max(1) as u64,
            state: Mutex::new(State::default()),
        }
    }

    /// Takes over what `old` (the same mailbox's pacer before a reload rebuilt the upstream)
    /// has counted, so a reload never restarts Exchange's per-minute window or the daily
    /// recipient budget from zero. Sends still in flight on `old` count as made now. Returns
    /// false when either was busy at that instant (each lock is held for a few instructions).
    pub fn inherit(&self, old: &Pacer) -> bool {
        let now = Instant::now();
        let taken = {
            let Ok(o) = old.state.try_lock() else {
                return false;
            };
            let mut sends = o.sends.clone();
            sends.extend(std::iter::repeat_n(now, o.in_flight));
            let mut day = o.day.clone();
            if o.day_in_flight > 0 {
                day.push_back((now, o.day_in_flight));
            }
            (sends, day)
        };
        let Ok(mut s) = self.state.try_lock() else {
            return false;
        };
        let (sends, day) = taken;
        s.sends = sends;
        s.day = day;
        s.prune(now, self.window);
        true
    }

    /// Waits for a send slot for a message to `recipients` recipients. `Err(wait)` when the
    /// daily recipient budget is used up: the account should hold for `wait`.
    pub async fn acquire(&self, recipients: usize) -> Result<Slot, Duration> {
        let n = recipients as u64;
        loop {
            let wake = {
                let mut s = self.state.lock().await;
                let now = Instant::now();
                s.prune(now, self.window);
                if s.day_total() + n > self.per_day && s.day_total() > 0 {
                    let wait = s
                        .day
                        .front()
                        .map(|(t, _)| DAY.saturating_sub(now.duration_since(*t)))
                        .unwrap_or(Duration::from_secs(60));
                    return Err(wait);
                }
                if s.sends.len() + s.in_flight < self.per_window {
                    s.in_flight += 1;
                    s.day_in_flight += n;
                    return Ok(Slot { recipients: n });
                }
                match s.sends.front() {
                    Some(t)
                        if s.sends.len() + s.in_flight >= self.per_window
                            && s.in_flight < self.per_window =>
                    {
                        *t + self.window
                    }
                    _ => now + Duration::from_millis(50),
                }
            };
            tokio::time::sleep_until(wake).await;
        }
    }

    /// Returns a slot. `accepted`: recipients Exchange took (counted against the day);
    /// `submitted`: Exchange answered the end of DATA (counted against the rate window).
    pub async fn finish(&self, slot: Slot, submitted: bool, accepted: usize) {
        let mut s = self.state.lock().await;
        s.in_flight = s.in_flight.saturating_sub(1);
        s.day_in_flight = s.day_in_flight.saturating_sub(slot.recipients);
        let now = Instant::now();
        if submitted {
            s.sends.push_back(now);
        }
        if accepted > 0 {
            s.day.push_back((now, accepted as u64));
        }
    }

    /// Time until the oldest counted recipient leaves the 24-hour window.
    pub async fn day_window_frees_in(&self) -> Option<Duration> {
        let s = self.state.lock().await;
        s.day
            .front()
            .map(|(t, _)| DAY.saturating_sub(Instant::now().duration_since(*t)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn never_more_than_n_per_window() {
        let p = std::sync::Arc::new(Pacer::new(3, Duration::from_secs(10), 1000));
        let start = Instant::now();
        let mut done = Vec::new();
        for _ in 0..9 {
            let slot = p.acquire(1).await.unwrap();
            p.finish(slot, true, 1).await;
            done.push(Instant::now().duration_since(start));
        }
        for w in done.windows(4) {
            assert!(w[3] - w[0] >= Duration::from_secs(10), "{done:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn daily_budget_holds() {
        let p = Pacer::new(100, Duration::from_secs(60), 5);
        let slot = p.acquire(4).await.unwrap();
        p.finish(slot, true, 4).await;
        let wait = p.acquire(2).await.err().unwrap();
        assert!(wait > Duration::from_secs(23 * 3600));
        assert!(p.acquire(1).await.is_ok());
    }

    /// The pacer a reload builds for the same mailbox continues the old one's counts: the
    /// window's sends (and those in flight) and the day's recipients.
    #[tokio::test(start_paused = true)]
    async fn a_rebuilt_pacer_continues_the_counts() {
        let old = Pacer::new(3, Duration::from_secs(10), 5);
        for _ in 0..2 {
            let slot = old.acquire(2).await.unwrap();
            old.finish(slot, true, 2).await;
        }
        let _in_flight = old.acquire(1).await.unwrap();
        let new = Pacer::new(3, Duration::from_secs(10), 5);
        assert!(new.inherit(&old));
        // The day's 5 recipients are used up (4 sent, 1 in flight).
        assert!(new.acquire(1).await.is_err(), "daily budget reopened");
        let fresh = Pacer::new(3, Duration::from_secs(10), 100);
        assert!(fresh.inherit(&old));
        // Three sends in this window: the next waits for the window to move on.
        let start = Instant::now();
        let slot = fresh.acquire(1).await.unwrap();
        fresh.finish(slot, true, 1).await;
        assert!(
            Instant::now().duration_since(start) >= Duration::from_secs(9),
            "the per-minute window reopened"
        );
    }
}

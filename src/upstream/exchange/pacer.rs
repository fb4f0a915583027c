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
}

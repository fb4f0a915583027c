//! Retry delays: exponential, capped, with jitter so that a backlog does not retry in lockstep.

use std::time::Duration;

/// Delay before attempt `attempts + 1`: `initial * 2^(attempts-1)`, capped at `max`, ±10 %.
pub fn delay(initial: Duration, max: Duration, attempts: u32) -> Duration {
    let exp = attempts.saturating_sub(1).min(30);
    let base = initial.saturating_mul(1u32 << exp.min(20)).min(max);
    let jitter = 0.9 + fastrand::f64() * 0.2;
    base.mul_f64(jitter).min(max.mul_f64(1.1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_caps() {
        let i = Duration::from_secs(60);
        let m = Duration::from_secs(3600);
        let d1 = delay(i, m, 1).as_secs();
        assert!((54..=66).contains(&d1), "{d1}");
        let d3 = delay(i, m, 3).as_secs();
        assert!((216..=264).contains(&d3), "{d3}");
        let d20 = delay(i, m, 20).as_secs();
        assert!((3240..=3960).contains(&d20), "{d20}");
        assert!(delay(i, m, u32::MAX).as_secs() <= 3960);
    }
}

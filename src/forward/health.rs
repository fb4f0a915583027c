//! Whether an account can reach its upstream at all, beside its [`account`](super::account)
//! state: a temporary failure to connect, finish a TLS handshake or get a token blocks nothing
//! (the messages are retried with backoff as usual), but when it happens on every attempt the
//! administrator must hear of it before `max_age` runs out. After [`DEGRADED_AFTER`] such
//! failures in a row the account is *degraded* (status page, `/readyz`, the
//! `exorelay_account_state` metric) with the last cause; the first attempt that reaches the
//! upstream clears it.

/// Unreachable attempts in a row before the account counts as degraded.
pub const DEGRADED_AFTER: u32 = 3;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Health {
    /// Attempts in a row that could not reach the upstream.
    pub streak: u32,
    /// Set once `streak` reaches [`DEGRADED_AFTER`]: the last failure's cause.
    pub degraded: Option<String>,
}

/// How an attempt went, as far as reaching the upstream is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reach {
    /// It talked to the upstream (whatever the upstream then answered).
    Reached,
    /// Connect, TLS or the token endpoint failed; the cause.
    Unreachable(String),
}

impl Health {
    /// Pure: the health after one more attempt.
    pub fn after(&self, reach: &Reach) -> Health {
        match reach {
            Reach::Reached => Health::default(),
            Reach::Unreachable(cause) => {
                let streak = self.streak.saturating_add(1);
                Health {
                    streak,
                    degraded: (streak >= DEGRADED_AFTER).then(|| cause.clone()),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn degraded_after_three_unreachable_attempts_in_a_row_and_cleared_by_one_that_reaches() {
        let down = Reach::Unreachable("cannot connect to smtp.office365.com:587: refused".into());
        let table: &[(&Reach, u32, bool)] = &[
            (&down, 1, false),
            (&down, 2, false),
            (&down, 3, true),
            (&down, 4, true),
            (&Reach::Reached, 0, false),
            (&down, 1, false),
        ];
        let mut h = Health::default();
        for (i, (reach, streak, degraded)) in table.iter().enumerate() {
            h = h.after(reach);
            assert_eq!(h.streak, *streak, "step {i}");
            assert_eq!(h.degraded.is_some(), *degraded, "step {i}");
        }
        let h = Health::default().after(&down).after(&down).after(&down);
        assert_eq!(
            h.degraded.as_deref(),
            Some("cannot connect to smtp.office365.com:587: refused")
        );
    }
}

//! Administrator-facing explanations: what went wrong and exactly what to do about it.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Advice {
    /// What the relay saw, in plain words (may quote Microsoft's code).
    pub cause: String,
    /// The action that fixes it: a portal step or the exact command to run.
    pub fix: String,
}

impl Advice {
    pub fn new(cause: impl Into<String>, fix: impl Into<String>) -> Advice {
        Advice {
            cause: cause.into(),
            fix: fix.into(),
        }
    }
}

impl fmt::Display for Advice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} Fix: {}", self.cause, self.fix)
    }
}

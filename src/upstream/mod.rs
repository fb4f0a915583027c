//! Where messages go: one [`Upstream`] per configured account. The forwarder owns retries,
//! backoff, expiry, pausing and `failed/`; an upstream makes one attempt and reports, per
//! recipient, what happened, plus anything that concerns the whole account.

pub mod capture;
pub mod exchange;
pub mod graph;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use crate::advice::Advice;
use crate::spool::Meta;

/// One delivery attempt of one message to the recipients still pending.
pub struct Job<'a> {
    pub meta: &'a Meta,
    /// The spooled body (`Received:` header included).
    pub body: PathBuf,
    pub recipients: Vec<String>,
}

/// The result for one recipient of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Delivered(String),
    /// Try again later (4xx, connection trouble, local I/O errors); counts as an attempt.
    Temporary(String),
    /// Never going to work for this recipient (5xx).
    Permanent(String),
    /// Not tried because of the account's state (throttled, paused); not counted.
    NotAttempted(String),
    /// The message's sender may not be used (SendAs refused for a device's own From): the
    /// message is held for the administrator with the advice; the account keeps sending others.
    SenderRefused(String),
}

/// Something about the whole account, learnt during an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccountSignal {
    /// Exchange's rate or connection limit: send nothing for `wait`.
    Throttled { wait: Duration, reason: String },
    /// A configuration problem: nothing will go out until an administrator fixes it.
    Paused(Advice),
    /// The daily recipient quota is used up: hold for `wait`.
    QuotaHold { wait: Duration, reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// One per `Job::recipients`, in order.
    pub outcomes: Vec<Outcome>,
    pub signal: Option<AccountSignal>,
    /// The upstream was not reached at all (connect, TLS handshake or token endpoint failed):
    /// the cause. Blocks nothing; in a row, it marks the account degraded.
    pub unreachable: Option<String>,
}

impl Attempt {
    pub fn all(n: usize, outcome: Outcome) -> Attempt {
        Attempt {
            outcomes: vec![outcome; n],
            signal: None,
            unreachable: None,
        }
    }
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

pub trait Upstream: Send + Sync {
    /// Attempts delivery of `job`.
    fn deliver<'a>(&'a self, job: &'a Job<'a>) -> BoxFuture<'a, Attempt>;

    /// A configuration problem known before any attempt (a delegated account nobody has
    /// signed in to yet): the forwarder starts the account paused with this advice.
    fn blocked_at_start(&self) -> Option<Advice> {
        None
    }

    /// The mailbox's pacing (rate window, daily recipients), for a reload to carry over to
    /// the upstream that replaces this one.
    fn pacer(&self) -> Option<&exchange::pacer::Pacer> {
        None
    }
}

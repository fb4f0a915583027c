//! Where messages go: one [`Upstream`] per configured account. The forwarder owns retries,
//! backoff, expiry and `failed/`; an upstream only makes one attempt and reports, per
//! recipient, what happened.

pub mod capture;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

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
    /// Try again later (4xx, connection trouble, local I/O errors).
    Temporary(String),
    /// Never going to work for this recipient (5xx).
    Permanent(String),
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

pub trait Upstream: Send + Sync {
    /// Attempts delivery; returns one outcome per `job.recipients`, in order.
    fn deliver<'a>(&'a self, job: &'a Job<'a>) -> BoxFuture<'a, Vec<Outcome>>;
}

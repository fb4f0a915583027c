//! The forwarder: takes committed messages from the spool and hands them to their account's
//! upstream, one attempt at a time, keeping per-recipient truth in the meta file.
//!
//! Contract:
//! - a message leaves `queue/` only when every recipient is delivered (removed) or given up on
//!   (moved to `failed/`); a crash at any point leaves it queued, so the worst case is one
//!   repeated attempt, never a lost message;
//! - only recipients still pending are retried; temporary failures back off exponentially
//!   (`retry_initial` doubling up to `retry_max`, ±10 % jitter) until `max_age`;
//! - at most `max_connections` attempts run at once per account.

pub mod backoff;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::config::{AccountKind, Config};
use crate::spool::{Meta, RecipientStatus, Spool};
use crate::upstream::capture::Capture;
use crate::upstream::{Job, Outcome, Upstream};

struct Account {
    upstream: Arc<dyn Upstream>,
    slots: Arc<Semaphore>,
    /// Due messages waiting for a free slot.
    waiting: VecDeque<String>,
}

pub struct Forwarder {
    config: Arc<Config>,
    spool: Arc<Spool>,
    accounts: HashMap<String, Account>,
}

#[derive(Debug, thiserror::Error)]
#[error("account {account:?}: {reason}")]
pub struct ForwarderError {
    pub account: String,
    pub reason: String,
}

/// What a finished attempt tells the scheduler.
struct Done {
    id: String,
    account: String,
    /// When to try again; `None` when the message has left the queue.
    retry_at: Option<DateTime<Utc>>,
}

impl Forwarder {
    pub fn new(config: Arc<Config>, spool: Arc<Spool>) -> Result<Forwarder, ForwarderError> {
        let mut accounts = HashMap::new();
        for a in &config.accounts {
            let upstream: Arc<dyn Upstream> = match a.kind {
                AccountKind::Capture => {
                    let dir = a.dir.clone().unwrap_or_default();
                    Arc::new(Capture::new(dir).map_err(|e| ForwarderError {
                        account: a.name.clone(),
                        reason: format!("cannot create capture folder: {e}"),
                    })?)
                }
            };
            accounts.insert(
                a.name.clone(),
                Account {
                    upstream,
                    slots: Arc::new(Semaphore::new(a.max_connections)),
                    waiting: VecDeque::new(),
                },
            );
        }
        Ok(Forwarder {
            config,
            spool,
            accounts,
        })
    }

    /// Runs until `shutdown`; attempts in progress are tracked by `tracker` and finish on their own.
    pub async fn run(
        mut self,
        recovered: Vec<Meta>,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) {
        let Some(mut committed) = self.spool.take_committed() else {
            error!("forwarder started twice; the second one does nothing");
            return;
        };
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
        // (due time, queue ID, account)
        let mut schedule: BTreeSet<(DateTime<Utc>, String, String)> = BTreeSet::new();
        for m in recovered {
            let due = m.next_attempt_at.unwrap_or(m.received_at);
            schedule.insert((due, m.id, m.account));
        }
        loop {
            let now = Utc::now();
            while let Some(first) = schedule.first() {
                if first.0 > now {
                    break;
                }
                let Some((_, id, account)) = schedule.pop_first() else {
                    break;
                };
                match self.accounts.get_mut(&account) {
                    Some(a) => a.waiting.push_back(id),
                    None => {
                        // The account was removed from the config: use the default one.
                        warn!(queue_id = %id, %account, "message belongs to an account that is no longer configured; using the default account");
                        let default = self.config.accounts[0].name.clone();
                        if let Some(a) = self.accounts.get_mut(&default) {
                            a.waiting.push_back(id);
                        }
                    }
                }
            }
            self.dispatch(&done_tx, &tracker);

            let next_due = schedule.first().map(|f| f.0);
            let sleep = match next_due {
                Some(t) => (t - Utc::now()).to_std().unwrap_or_default(),
                None => std::time::Duration::from_secs(3600),
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(id) = committed.recv() => {
                    match self.spool_account(&id) {
                        Some(account) => { schedule.insert((Utc::now(), id, account)); }
                        None => warn!(queue_id = %id, "committed message vanished before delivery"),
                    }
                }
                Some(done) = done_rx.recv() => {
                    if let Some(at) = done.retry_at {
                        schedule.insert((at, done.id, done.account));
                    }
                }
                _ = tokio::time::sleep(sleep) => {}
            }
        }
    }

    fn spool_account(&self, id: &str) -> Option<String> {
        self.spool.load(id).ok().map(|m| m.account)
    }

    /// Starts waiting messages while their account has free slots.
    fn dispatch(&mut self, done_tx: &mpsc::UnboundedSender<Done>, tracker: &TaskTracker) {
        for (name, account) in self.accounts.iter_mut() {
            while !account.waiting.is_empty() {
                let Ok(permit) = account.slots.clone().try_acquire_owned() else {
                    break;
                };
                let Some(id) = account.waiting.pop_front() else {
                    break;
                };
                let (spool, upstream, config, done_tx, name) = (
                    self.spool.clone(),
                    account.upstream.clone(),
                    self.config.clone(),
                    done_tx.clone(),
                    name.clone(),
                );
                tracker.spawn(async move {
                    let retry_at = attempt(&spool, upstream.as_ref(), &config, &id).await;
                    drop(permit);
                    let _ = done_tx.send(Done {
                        id,
                        account: name,
                        retry_at,
                    });
                });
            }
        }
    }
}

/// One delivery attempt of one message. Returns when to try again, or `None` when the message
/// has left the queue (or cannot be read; it then stays for the administrator).
async fn attempt(
    spool: &Arc<Spool>,
    upstream: &dyn Upstream,
    config: &Config,
    id: &str,
) -> Option<DateTime<Utc>> {
    let mut meta = {
        let (spool, owned_id) = (spool.clone(), id.to_string());
        match tokio::task::spawn_blocking(move || spool.load(&owned_id)).await {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => {
                error!(queue_id = %id, error = %e, "cannot read queued message; left in the spool for inspection");
                return None;
            }
            Err(_) => return None,
        }
    };
    let job = Job {
        meta: &meta,
        body: spool.body_path(id),
        recipients: meta.pending().map(|r| r.address.clone()).collect(),
    };
    let outcomes = if job.recipients.is_empty() {
        Vec::new()
    } else {
        upstream.deliver(&job).await
    };
    let recipients = job.recipients;

    let (mut delivered, mut deferred, mut failed) = (0, 0, 0);
    let mut last_problem = None;
    for (addr, outcome) in recipients
        .iter()
        .zip(outcomes.iter().chain(std::iter::repeat(&Outcome::Temporary(
            "upstream gave no result for this recipient".into(),
        ))))
    {
        let Some(r) = meta
            .recipients
            .iter_mut()
            .find(|r| &r.address == addr && r.status == RecipientStatus::Pending)
        else {
            continue;
        };
        r.attempts += 1;
        match outcome {
            Outcome::Delivered(reply) => {
                r.status = RecipientStatus::Delivered;
                r.last_reply = Some(reply.clone());
                delivered += 1;
            }
            Outcome::Temporary(reply) => {
                r.last_reply = Some(reply.clone());
                last_problem = Some(reply.clone());
                deferred += 1;
            }
            Outcome::Permanent(reply) => {
                r.status = RecipientStatus::Failed;
                r.last_reply = Some(reply.clone());
                last_problem = Some(reply.clone());
                failed += 1;
                warn!(queue_id = %id, recipient = %addr, reply = %reply, "recipient failed permanently");
            }
        }
    }
    meta.attempts += 1;
    let now = Utc::now();
    let age = (now - meta.received_at).to_std().unwrap_or_default();
    let mut expired = false;
    if deferred > 0 && age >= config.queue.max_age {
        expired = true;
        for r in meta
            .recipients
            .iter_mut()
            .filter(|r| r.status == RecipientStatus::Pending)
        {
            r.status = RecipientStatus::Failed;
            let last = r.last_reply.take().unwrap_or_default();
            r.last_reply = Some(format!(
                "gave up after {} in the queue (max_age); last error: {last}",
                humantime::format_duration(config.queue.max_age)
            ));
        }
    }
    let pending_left = meta.pending().count();
    let any_failed = meta
        .recipients
        .iter()
        .any(|r| r.status == RecipientStatus::Failed);

    let retry_at = if pending_left > 0 {
        Some(
            now + backoff::delay(
                config.queue.retry_initial,
                config.queue.retry_max,
                meta.attempts,
            ),
        )
    } else {
        None
    };
    meta.next_attempt_at = retry_at;
    info!(queue_id = %id, account = %meta.account, attempt = meta.attempts, delivered, deferred, failed, expired,
          retry_at = ?retry_at, last_problem = ?last_problem, "delivery attempt");

    let spool2 = spool.clone();
    let result = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        if pending_left > 0 {
            spool2.update(&meta)
        } else if any_failed {
            spool2.fail(&meta)
        } else {
            spool2.remove(&meta.id)
        }
    })
    .await
    .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
    match result {
        Ok(()) => {
            if pending_left == 0 && any_failed {
                warn!(queue_id = %id, "message moved to failed/");
            }
            retry_at
        }
        Err(e) => {
            // The meta on disk still says pending: retrying later is safe (at worst a repeat).
            error!(queue_id = %id, error = %e, "cannot update the spool after a delivery attempt; will retry");
            Some(now + backoff::delay(config.queue.retry_initial, config.queue.retry_max, 1))
        }
    }
}

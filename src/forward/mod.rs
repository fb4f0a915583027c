//! The forwarder: takes committed messages from the spool and hands them to their account's
//! upstream, one attempt at a time, keeping per-recipient truth in the meta file.
//!
//! Contract:
//! - a message leaves `queue/` only when every recipient is delivered (removed) or given up on
//!   (moved to `failed/`, with a delivery status notification); a crash at any point leaves it
//!   queued, so the worst case is one repeated attempt, never a lost message;
//! - only recipients still pending are retried; temporary failures back off exponentially
//!   (`retry_initial` doubling up to `retry_max`, ±10 % jitter) until `max_age`;
//! - at most `max_connections` attempts run at once per account;
//! - an account can be throttled (Exchange's rate limits: wait, count no failure), paused (a
//!   configuration error: keep mail queued, try one message every `probe_interval`) or held
//!   (daily recipient quota). Its state and the advice that goes with it are in [`Status`].

pub mod backoff;
pub mod dsn;
pub mod status;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::config::{AccountKind, Config, DsnTo};
use crate::spool::{Client, Meta, Recipient, RecipientStatus, Spool, meta::FORMAT_VERSION};
use crate::upstream::capture::Capture;
use crate::upstream::exchange::Exchange;
use crate::upstream::{AccountSignal, Job, Outcome, Upstream};
pub use status::{AccountState, Status};

struct Account {
    upstream: Arc<dyn Upstream>,
    slots: Arc<Semaphore>,
    /// Due messages waiting for a free slot or for the account to be usable again.
    waiting: VecDeque<String>,
    /// When the account may send again (throttled, paused, held); `None` when active.
    blocked_until: Option<DateTime<Utc>>,
    paused: bool,
    probing: bool,
}

pub struct Forwarder {
    config: Arc<Config>,
    spool: Arc<Spool>,
    accounts: HashMap<String, Account>,
    status: Arc<Status>,
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
    signal: Option<AccountSignal>,
    delivered: usize,
}

/// Builds the upstream for one account.
pub fn upstream_for(config: &Config, name: &str) -> Result<Arc<dyn Upstream>, ForwarderError> {
    let a = config
        .accounts
        .iter()
        .find(|a| a.name == name)
        .ok_or_else(|| ForwarderError {
            account: name.into(),
            reason: "no such account".into(),
        })?;
    let err = |reason: String| ForwarderError {
        account: a.name.clone(),
        reason,
    };
    Ok(match a.kind {
        AccountKind::Capture => {
            let dir = a.dir.clone().unwrap_or_default();
            Arc::new(
                Capture::new(dir).map_err(|e| err(format!("cannot create capture folder: {e}")))?,
            )
        }
        AccountKind::Exchange => {
            let tokens = Arc::new(crate::oauth::TokenManager::new(a).map_err(err)?);
            Arc::new(Exchange::new(a, &config.hostname, tokens).map_err(err)?)
        }
    })
}

impl Forwarder {
    pub fn new(config: Arc<Config>, spool: Arc<Spool>) -> Result<Forwarder, ForwarderError> {
        let mut accounts = HashMap::new();
        let status = Arc::new(Status::default());
        for a in &config.accounts {
            let upstream = upstream_for(&config, &a.name)?;
            accounts.insert(
                a.name.clone(),
                Account {
                    upstream,
                    slots: Arc::new(Semaphore::new(a.max_connections)),
                    waiting: VecDeque::new(),
                    blocked_until: None,
                    paused: false,
                    probing: false,
                },
            );
            status.set(&a.name, AccountState::Active, None);
        }
        Ok(Forwarder {
            config,
            spool,
            accounts,
            status,
        })
    }

    /// Shared view of every account's state.
    pub fn status(&self) -> Arc<Status> {
        self.status.clone()
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
            while schedule.first().is_some_and(|f| f.0 <= now) {
                let Some((_, id, account)) = schedule.pop_first() else {
                    break;
                };
                let name = if self.accounts.contains_key(&account) {
                    account
                } else {
                    warn!(queue_id = %id, %account, "message belongs to an account that is no longer configured; using the default account");
                    self.config.accounts[0].name.clone()
                };
                if let Some(a) = self.accounts.get_mut(&name) {
                    a.waiting.push_back(id);
                }
            }
            self.dispatch(&done_tx, &tracker);

            let mut wake = schedule.first().map(|f| f.0);
            for a in self.accounts.values() {
                if let Some(until) = a.blocked_until
                    && !a.waiting.is_empty()
                {
                    wake = Some(wake.map_or(until, |w| w.min(until)));
                }
            }
            let sleep = wake
                .map(|t| (t - Utc::now()).to_std().unwrap_or_default())
                .unwrap_or(Duration::from_secs(3600));
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(id) = committed.recv() => {
                    match self.spool.load(&id) {
                        Ok(m) => { schedule.insert((Utc::now(), id, m.account)); }
                        Err(e) => warn!(queue_id = %id, error = %e, "committed message vanished before delivery"),
                    }
                }
                Some(done) = done_rx.recv() => {
                    self.finished(&done);
                    if let Some(at) = done.retry_at {
                        schedule.insert((at, done.id, done.account));
                    }
                }
                _ = tokio::time::sleep(sleep) => {}
            }
        }
    }

    /// Applies what an attempt learnt about its account.
    fn finished(&mut self, done: &Done) {
        let probe = self.config.queue.probe_interval;
        let Some(a) = self.accounts.get_mut(&done.account) else {
            return;
        };
        a.probing = false;
        let now = Utc::now();
        let chrono_dur =
            |d: Duration| chrono::Duration::from_std(d).unwrap_or(chrono::Duration::seconds(60));
        match &done.signal {
            Some(AccountSignal::Throttled { wait, reason }) => {
                let until = now + chrono_dur(*wait);
                if a.blocked_until.is_none_or(|u| u < until) {
                    a.blocked_until = Some(until);
                }
                warn!(account = %done.account, %reason, until = %until, "Exchange throttled the account; slowing down (not counted as a failure)");
                self.status.set(
                    &done.account,
                    AccountState::Throttled {
                        until,
                        reason: reason.clone(),
                    },
                    None,
                );
            }
            Some(AccountSignal::Paused(advice)) => {
                let next = now + chrono_dur(probe);
                a.blocked_until = Some(next);
                if !a.paused {
                    error!(account = %done.account, cause = %advice.cause, fix = %advice.fix, "account paused: mail stays queued until this is fixed");
                }
                a.paused = true;
                self.status.set(
                    &done.account,
                    AccountState::Paused {
                        next_probe: next,
                        advice: advice.clone(),
                    },
                    Some(advice.to_string()),
                );
            }
            Some(AccountSignal::QuotaHold { wait, reason }) => {
                let until = now + chrono_dur(*wait);
                a.blocked_until = Some(until);
                warn!(account = %done.account, %reason, until = %until, "daily recipient quota reached; account held");
                self.status.set(
                    &done.account,
                    AccountState::Held {
                        until,
                        reason: reason.clone(),
                    },
                    None,
                );
            }
            None => {
                if a.paused || a.blocked_until.is_some_and(|u| u <= now) {
                    if a.paused {
                        info!(account = %done.account, "account works again; resuming delivery");
                    }
                    a.paused = false;
                    a.blocked_until = None;
                    self.status.set(&done.account, AccountState::Active, None);
                }
                if done.delivered > 0 {
                    self.status.delivered(&done.account);
                }
            }
        }
    }

    /// Starts waiting messages while their account has free slots and is usable.
    fn dispatch(&mut self, done_tx: &mpsc::UnboundedSender<Done>, tracker: &TaskTracker) {
        let now = Utc::now();
        for (name, account) in self.accounts.iter_mut() {
            let mut limit = usize::MAX;
            if let Some(until) = account.blocked_until {
                if until > now || account.probing {
                    continue;
                }
                // The block is over: a paused account sends one probe; a throttled one resumes.
                if account.paused {
                    limit = 1;
                    account.probing = true;
                    info!(account = %name, "probing a paused account with one message");
                } else {
                    account.blocked_until = None;
                    self.status.set(name, AccountState::Active, None);
                }
            }
            while limit > 0 && !account.waiting.is_empty() {
                let Ok(permit) = account.slots.clone().try_acquire_owned() else {
                    break;
                };
                let Some(id) = account.waiting.pop_front() else {
                    break;
                };
                limit -= 1;
                let (spool, upstream, config, done_tx, name) = (
                    self.spool.clone(),
                    account.upstream.clone(),
                    self.config.clone(),
                    done_tx.clone(),
                    name.clone(),
                );
                tracker.spawn(async move {
                    let done = attempt(&spool, upstream.as_ref(), &config, &id, &name).await;
                    drop(permit);
                    let _ = done_tx.send(done);
                });
            }
        }
    }
}

/// One delivery attempt of one message.
async fn attempt(
    spool: &Arc<Spool>,
    upstream: &dyn Upstream,
    config: &Config,
    id: &str,
    account: &str,
) -> Done {
    let gone = |signal| Done {
        id: id.to_string(),
        account: account.to_string(),
        retry_at: None,
        signal,
        delivered: 0,
    };
    let mut meta = {
        let (spool, owned_id) = (spool.clone(), id.to_string());
        match tokio::task::spawn_blocking(move || spool.load(&owned_id)).await {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => {
                error!(queue_id = %id, error = %e, "cannot read queued message; left in the spool for inspection");
                return gone(None);
            }
            Err(_) => return gone(None),
        }
    };
    let job = Job {
        meta: &meta,
        body: spool.body_path(id),
        recipients: meta.pending().map(|r| r.address.clone()).collect(),
    };
    let result = if job.recipients.is_empty() {
        crate::upstream::Attempt {
            outcomes: Vec::new(),
            signal: None,
        }
    } else {
        upstream.deliver(&job).await
    };
    let recipients = job.recipients;

    let (mut delivered, mut deferred, mut failed, mut skipped) = (0, 0, 0, 0);
    let mut last_problem = None;
    let missing = Outcome::Temporary("upstream gave no result for this recipient".into());
    for (addr, outcome) in recipients
        .iter()
        .zip(result.outcomes.iter().chain(std::iter::repeat(&missing)))
    {
        let Some(r) = meta
            .recipients
            .iter_mut()
            .find(|r| &r.address == addr && r.status == RecipientStatus::Pending)
        else {
            continue;
        };
        match outcome {
            Outcome::Delivered(reply) => {
                r.attempts += 1;
                r.status = RecipientStatus::Delivered;
                r.last_reply = Some(reply.clone());
                delivered += 1;
            }
            Outcome::Temporary(reply) => {
                r.attempts += 1;
                r.last_reply = Some(reply.clone());
                last_problem = Some(reply.clone());
                deferred += 1;
            }
            Outcome::Permanent(reply) => {
                r.attempts += 1;
                r.status = RecipientStatus::Failed;
                r.last_reply = Some(reply.clone());
                last_problem = Some(reply.clone());
                failed += 1;
                warn!(queue_id = %id, recipient = %addr, reply = %reply, "recipient failed permanently");
            }
            Outcome::NotAttempted(reason) => {
                r.last_reply = Some(format!("waiting: {reason}"));
                skipped += 1;
            }
        }
    }
    if delivered + deferred + failed > 0 {
        meta.attempts += 1;
    }
    let now = Utc::now();
    let age = (now - meta.received_at).to_std().unwrap_or_default();
    let mut expired = false;
    if deferred + skipped > 0 && age >= config.queue.max_age {
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

    let retry_at = if pending_left == 0 {
        None
    } else if deferred == 0 && skipped > 0 {
        // Only held back by the account's state: the account gate decides when.
        Some(now + chrono::Duration::seconds(1))
    } else {
        Some(
            now + backoff::delay(
                config.queue.retry_initial,
                config.queue.retry_max,
                meta.attempts.max(1),
            ),
        )
    };
    meta.next_attempt_at = retry_at;
    info!(queue_id = %id, account = %account, attempt = meta.attempts, delivered, deferred, failed, not_attempted = skipped,
          expired, retry_at = ?retry_at, last_problem = ?last_problem, "delivery attempt");

    let spool2 = spool.clone();
    let meta2 = meta.clone();
    let result_io = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        if pending_left > 0 {
            spool2.update(&meta2)
        } else if any_failed {
            spool2.fail(&meta2)
        } else {
            spool2.remove(&meta2.id)
        }
    })
    .await
    .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
    let retry_at = match result_io {
        Ok(()) => {
            if pending_left == 0 && any_failed {
                warn!(queue_id = %id, "message moved to failed/");
                send_dsn(spool, config, &meta).await;
            }
            retry_at
        }
        Err(e) => {
            // The meta on disk still says pending: retrying later is safe (at worst a repeat).
            error!(queue_id = %id, error = %e, "cannot update the spool after a delivery attempt; will retry");
            Some(now + backoff::delay(config.queue.retry_initial, config.queue.retry_max, 1))
        }
    };
    Done {
        id: id.to_string(),
        account: account.to_string(),
        retry_at,
        signal: result.signal,
        delivered,
    }
}

/// Queues a delivery status notification for a failed message, unless it was itself a
/// notification (null sender) or DSNs are off.
async fn send_dsn(spool: &Arc<Spool>, config: &Config, meta: &Meta) {
    let mut to = Vec::new();
    if matches!(config.queue.dsn, DsnTo::Sender | DsnTo::Both) && !meta.mail_from.is_empty() {
        to.push(meta.mail_from.clone());
    }
    if matches!(config.queue.dsn, DsnTo::Admin | DsnTo::Both)
        && let Some(admin) = &config.queue.admin_address
        && !meta.mail_from.is_empty()
    {
        to.push(admin.clone());
    }
    if to.is_empty() {
        return;
    }
    let failed_body = spool.failed_dir().join(format!("{}.eml", meta.id));
    let original = tokio::fs::read(&failed_body).await.unwrap_or_default();
    let headers = dsn::header_section(&original).to_vec();
    let report = dsn::build(meta, &headers, &config.hostname, &to[0]);
    let result = async {
        let mut w = spool.create().await?;
        w.write(&report).await?;
        let dsn_meta = Meta {
            version: FORMAT_VERSION,
            id: String::new(),
            received_at: Utc::now(),
            account: meta.account.clone(),
            mail_from: String::new(),
            recipients: to
                .iter()
                .map(|a| Recipient {
                    address: a.clone(),
                    status: RecipientStatus::Pending,
                    attempts: 0,
                    last_reply: None,
                })
                .collect(),
            client: Client {
                ip: std::net::IpAddr::from([127, 0, 0, 1]),
                helo: config.hostname.clone(),
                login: None,
                tls: false,
            },
            size: 0,
            eight_bit: true,
            smtputf8: false,
            attempts: 0,
            next_attempt_at: None,
        };
        w.commit(spool, dsn_meta).await
    }
    .await;
    match result {
        Ok(dsn_id) => {
            info!(queue_id = %meta.id, dsn_queue_id = %dsn_id, to = ?to, "delivery status notification queued")
        }
        Err(e) => {
            error!(queue_id = %meta.id, error = %e, "cannot queue the delivery status notification")
        }
    }
}

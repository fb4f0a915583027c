//! The forwarder: takes committed messages from the spool and hands them to their account's
//! upstream, one attempt at a time, keeping per-recipient truth in the meta file.
//!
//! Contract:
//! - a message leaves `queue/` only when every recipient is delivered (removed) or given up on
//!   (moved to `failed/`, with a delivery status notification); a crash at any point leaves it
//!   queued, so the worst case is one repeated attempt, never a lost message;
//! - only recipients still pending are retried; temporary failures back off exponentially
//!   (`retry_initial` doubling up to `retry_max`, ±10 % jitter) until `max_age`;
//! - at most `max_connections` attempts talk to an account's upstream at once; twice as many
//!   may be in flight, so reading a message from the spool and recording its outcome overlap
//!   another message's transmission instead of leaving a connection idle;
//! - an account can be throttled (Exchange's rate limits: wait, count no failure), paused (a
//!   configuration error: keep mail queued, try one message every `probe_interval`) or held
//!   (daily recipient quota). Its state and the advice that goes with it are in [`Status`].

pub mod backoff;
pub mod dsn;
pub mod status;

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::config::{AccountKind, Config, DsnTo};
use crate::metrics::{FailedLabels, Metrics};
use crate::spool::{Area, Checked, Client, Meta, RecipientStatus, Spool};
use crate::upstream::capture::Capture;
use crate::upstream::exchange::Exchange;
use crate::upstream::{AccountSignal, Job, Outcome, Upstream};
pub use status::{AccountState, Status};

struct Account {
    upstream: Arc<dyn Upstream>,
    /// Attempts in flight (2 x `max_connections`).
    slots: Arc<Semaphore>,
    /// Attempts talking to the upstream (`max_connections`).
    connections: Arc<Semaphore>,
    /// Bumped by an attempt the moment its upstream signals a block (throttle, pause, quota),
    /// so attempts dispatched before it stand down instead of going out behind it.
    block_epoch: Arc<AtomicU64>,
    /// The block epoch whose signals `finished` has applied; while it lags, a block is known to
    /// have happened but not yet how long it lasts, so nothing new is dispatched.
    applied_epoch: u64,
    /// Due messages waiting for a free slot or for the account to be usable again.
    waiting: VecDeque<String>,
    /// When the account may send again (throttled, paused, held); `None` when active.
    blocked_until: Option<DateTime<Utc>>,
    paused: bool,
    probing: bool,
    /// Paused by an administrator (not by an error): no probes until resumed.
    held_by_admin: bool,
}

/// An administrator's command, from the HTTP side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Deliver now: a queued message skips its backoff; a failed or deleted one is restored.
    Retry(String),
    Hold(String),
    Release(String),
    /// Move to `deleted/` (pruned later, so a slip can be undone with Retry).
    Delete(String),
    PauseAccount(String),
    ResumeAccount(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error("no message or account with that name")]
    NotFound,
    #[error("{0}")]
    Conflict(String),
    #[error("spool error: {0}")]
    Io(String),
    #[error("the relay is shutting down")]
    Stopped,
}

type ControlMsg = (Command, oneshot::Sender<Result<String, ControlError>>);

/// A handle for sending [`Command`]s to the running forwarder.
#[derive(Clone)]
pub struct Control {
    tx: mpsc::Sender<ControlMsg>,
}

impl Control {
    /// Sends a command and waits for the result (a short description of what was done).
    pub async fn send(&self, cmd: Command) -> Result<String, ControlError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send((cmd, tx))
            .await
            .map_err(|_| ControlError::Stopped)?;
        rx.await.map_err(|_| ControlError::Stopped)?
    }
}

pub struct Forwarder {
    config: Arc<Config>,
    spool: Arc<Spool>,
    accounts: HashMap<String, Account>,
    status: Arc<Status>,
    metrics: Arc<Metrics>,
    control_tx: mpsc::Sender<ControlMsg>,
    control_rx: mpsc::Receiver<ControlMsg>,
    /// (due time, queue ID, account), with an index by ID.
    schedule: BTreeSet<(DateTime<Utc>, String, String)>,
    scheduled: HashMap<String, (DateTime<Utc>, String)>,
    in_flight: HashSet<String>,
    /// Metas of just-committed messages, so their first attempt need not read the file back.
    /// Bounded by [`FRESH_MAX`]; an administrator's command on a message drops its entry.
    fresh: HashMap<String, Meta>,
}

/// More than this many waiting fresh messages (a blocked account's backlog) are read from disk.
const FRESH_MAX: usize = 4096;

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
    /// Never reached the upstream: its account was blocked while it waited for a connection.
    /// Says nothing about the account's state.
    stood_down: bool,
}

/// Builds the upstream for one account.
pub fn upstream_for(
    config: &Config,
    name: &str,
    metrics: &Arc<Metrics>,
) -> Result<Arc<dyn Upstream>, ForwarderError> {
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
            let tokens = Arc::new(
                crate::oauth::TokenManager::new(a)
                    .map_err(err)?
                    .with_metrics(metrics.clone()),
            );
            Arc::new(Exchange::new(a, &config.hostname, tokens).map_err(err)?)
        }
    })
}

impl Forwarder {
    pub fn new(
        config: Arc<Config>,
        spool: Arc<Spool>,
        metrics: Arc<Metrics>,
    ) -> Result<Forwarder, ForwarderError> {
        let mut accounts = HashMap::new();
        let status = Arc::new(Status::default());
        for a in &config.accounts {
            let upstream = upstream_for(&config, &a.name, &metrics)?;
            accounts.insert(
                a.name.clone(),
                Account {
                    upstream,
                    slots: Arc::new(Semaphore::new(a.max_connections.saturating_mul(2))),
                    connections: Arc::new(Semaphore::new(a.max_connections)),
                    block_epoch: Arc::new(AtomicU64::new(0)),
                    applied_epoch: 0,
                    waiting: VecDeque::new(),
                    blocked_until: None,
                    paused: false,
                    probing: false,
                    held_by_admin: false,
                },
            );
            status.set(&a.name, AccountState::Active, None);
            metrics
                .account_paused
                .get_or_create(&Metrics::account(&a.name))
                .set(0);
        }
        let (control_tx, control_rx) = mpsc::channel(64);
        Ok(Forwarder {
            config,
            spool,
            accounts,
            status,
            metrics,
            control_tx,
            control_rx,
            schedule: BTreeSet::new(),
            scheduled: HashMap::new(),
            in_flight: HashSet::new(),
            fresh: HashMap::new(),
        })
    }

    pub fn control(&self) -> Control {
        Control {
            tx: self.control_tx.clone(),
        }
    }

    fn schedule_at(&mut self, id: String, account: String, at: DateTime<Utc>) {
        if let Some((old_at, old_account)) =
            self.scheduled.insert(id.clone(), (at, account.clone()))
        {
            self.schedule.remove(&(old_at, id.clone(), old_account));
        }
        self.schedule.insert((at, id, account));
    }

    /// Forgets a message: not scheduled, not waiting (for administrators' commands; O(queue)).
    fn unschedule(&mut self, id: &str) {
        if let Some((at, account)) = self.scheduled.remove(id) {
            self.schedule.remove(&(at, id.to_string(), account));
        }
        for a in self.accounts.values_mut() {
            a.waiting.retain(|w| w != id);
        }
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
        for m in recovered {
            let due = m.next_attempt_at.unwrap_or(m.received_at);
            self.schedule_at(m.id, m.account, due);
        }
        let mut prune = tokio::time::interval(Duration::from_secs(3600));
        loop {
            let now = Utc::now();
            while self.schedule.first().is_some_and(|f| f.0 <= now) {
                let Some((_, id, account)) = self.schedule.pop_first() else {
                    break;
                };
                self.scheduled.remove(&id);
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

            let mut wake = self.schedule.first().map(|f| f.0);
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
                Some(meta) = committed.recv() => {
                    self.metrics.received.get_or_create(&Metrics::account(&meta.account)).inc();
                    let (id, account) = (meta.id.clone(), meta.account.clone());
                    if self.fresh.len() < FRESH_MAX {
                        self.fresh.insert(id.clone(), meta);
                    }
                    self.schedule_at(id, account, Utc::now());
                }
                Some(done) = done_rx.recv() => {
                    self.in_flight.remove(&done.id);
                    self.finished(&done);
                    if let Some(at) = done.retry_at {
                        self.schedule_at(done.id, done.account, at);
                    }
                }
                Some((cmd, reply)) = self.control_rx.recv() => {
                    let result = self.command(cmd).await;
                    let _ = reply.send(result);
                }
                _ = prune.tick() => {
                    let spool = self.spool.clone();
                    let keep = self.config.queue.keep_deleted;
                    let _ = tokio::task::spawn_blocking(move || spool.prune_deleted(keep)).await;
                }
                _ = tokio::time::sleep(sleep) => {}
            }
        }
    }

    /// Carries out an administrator's command. Messages in delivery right now are left alone.
    async fn command(&mut self, cmd: Command) -> Result<String, ControlError> {
        let io = |e: std::io::Error| ControlError::Io(e.to_string());
        let busy = || {
            ControlError::Conflict(
                "a delivery attempt is running right now; try again in a moment".into(),
            )
        };
        if let Command::Retry(id) | Command::Hold(id) | Command::Release(id) | Command::Delete(id) =
            &cmd
        {
            // The meta on disk is the truth from here on.
            self.fresh.remove(id);
        }
        match cmd {
            Command::PauseAccount(name) | Command::ResumeAccount(name)
                if !self.accounts.contains_key(&name) =>
            {
                let _ = name;
                Err(ControlError::NotFound)
            }
            Command::PauseAccount(name) => {
                if let Some(a) = self.accounts.get_mut(&name) {
                    a.held_by_admin = true;
                }
                let advice = crate::advice::Advice::new(
                    "Paused by an administrator.",
                    "Resume the account when ready.",
                );
                self.status.set(
                    &name,
                    AccountState::Paused {
                        next_probe: Utc::now(),
                        advice,
                    },
                    None,
                );
                self.metrics
                    .account_paused
                    .get_or_create(&Metrics::account(&name))
                    .set(1);
                info!(account = %name, "account paused by an administrator");
                Ok(format!("account {name} paused"))
            }
            Command::ResumeAccount(name) => {
                if let Some(a) = self.accounts.get_mut(&name) {
                    a.held_by_admin = false;
                    a.paused = false;
                    a.probing = false;
                    a.blocked_until = None;
                }
                self.status.set(&name, AccountState::Active, None);
                self.metrics
                    .account_paused
                    .get_or_create(&Metrics::account(&name))
                    .set(0);
                info!(account = %name, "account resumed by an administrator");
                Ok(format!("account {name} resumed"))
            }
            Command::Retry(id) | Command::Hold(id) | Command::Release(id) | Command::Delete(id)
                if self.in_flight.contains(&id) =>
            {
                let _ = id;
                Err(busy())
            }
            Command::Retry(id) => match self.spool.locate(&id) {
                Some(Area::Queue) => {
                    let m = self.spool.load(&id).map_err(io)?;
                    self.schedule_at(id.clone(), m.account, Utc::now());
                    Ok(format!("{id} will be tried now"))
                }
                Some(from @ (Area::Failed | Area::Deleted)) => {
                    let mut m = self.spool.load_in(from, &id).map_err(io)?;
                    for r in m
                        .recipients
                        .iter_mut()
                        .filter(|r| r.status == RecipientStatus::Failed)
                    {
                        r.status = RecipientStatus::Pending;
                    }
                    if m.pending().count() == 0 {
                        return Err(ControlError::Conflict(
                            "every recipient was already delivered".into(),
                        ));
                    }
                    m.requeued_at = Some(Utc::now());
                    m.next_attempt_at = None;
                    self.spool
                        .move_message(&id, from, Area::Queue, Some(&m))
                        .map_err(io)?;
                    info!(queue_id = %id, from = from.name(), "message sent back to the queue by an administrator");
                    self.schedule_at(id.clone(), m.account, Utc::now());
                    Ok(format!("{id} is back in the queue"))
                }
                Some(Area::Hold) => Err(ControlError::Conflict(
                    "the message is on hold; release it".into(),
                )),
                None => Err(ControlError::NotFound),
            },
            Command::Hold(id) => match self.spool.locate(&id) {
                Some(Area::Queue) => {
                    self.unschedule(&id);
                    self.spool
                        .move_message(&id, Area::Queue, Area::Hold, None)
                        .map_err(io)?;
                    info!(queue_id = %id, "message put on hold by an administrator");
                    Ok(format!("{id} is on hold"))
                }
                Some(_) => Err(ControlError::Conflict(
                    "only queued messages can be put on hold".into(),
                )),
                None => Err(ControlError::NotFound),
            },
            Command::Release(id) => match self.spool.locate(&id) {
                Some(Area::Hold) => {
                    let m = self.spool.load_in(Area::Hold, &id).map_err(io)?;
                    self.spool
                        .move_message(&id, Area::Hold, Area::Queue, None)
                        .map_err(io)?;
                    info!(queue_id = %id, "message released by an administrator");
                    self.schedule_at(id.clone(), m.account, Utc::now());
                    Ok(format!("{id} released"))
                }
                Some(_) => Err(ControlError::Conflict("the message is not on hold".into())),
                None => Err(ControlError::NotFound),
            },
            Command::Delete(id) => match self.spool.locate(&id) {
                Some(Area::Deleted) => Err(ControlError::Conflict("already deleted".into())),
                Some(from) => {
                    self.unschedule(&id);
                    self.spool
                        .move_message(&id, from, Area::Deleted, None)
                        .map_err(io)?;
                    info!(queue_id = %id, from = from.name(), "message deleted by an administrator (kept in deleted/ until pruned)");
                    Ok(format!(
                        "{id} deleted (recoverable from deleted/ until pruned)"
                    ))
                }
                None => Err(ControlError::NotFound),
            },
        }
    }

    /// Applies what an attempt learnt about its account.
    fn finished(&mut self, done: &Done) {
        if done.stood_down {
            return;
        }
        let probe = self.config.queue.probe_interval;
        let Some(a) = self.accounts.get_mut(&done.account) else {
            return;
        };
        if done.signal.is_some() {
            a.applied_epoch = a.block_epoch.load(Ordering::SeqCst);
        }
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
                self.metrics
                    .throttled
                    .get_or_create(&Metrics::account(&done.account))
                    .inc();
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
                    self.status
                        .event("paused", &done.id, &done.account, &advice.to_string());
                }
                self.metrics
                    .account_paused
                    .get_or_create(&Metrics::account(&done.account))
                    .set(1);
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
                        self.status.event(
                            "resumed",
                            &done.id,
                            &done.account,
                            "account works again",
                        );
                    }
                    self.metrics
                        .account_paused
                        .get_or_create(&Metrics::account(&done.account))
                        .set(0);
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
            if account.held_by_admin
                || account.block_epoch.load(Ordering::SeqCst) != account.applied_epoch
            {
                continue;
            }
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
                let fresh = self.fresh.remove(&id);
                limit -= 1;
                self.in_flight.insert(id.clone());
                let gate = Gate {
                    connections: account.connections.clone(),
                    epoch: account.block_epoch.load(Ordering::SeqCst),
                    block_epoch: account.block_epoch.clone(),
                };
                let (spool, upstream, config, done_tx, name, metrics, status) = (
                    self.spool.clone(),
                    account.upstream.clone(),
                    self.config.clone(),
                    done_tx.clone(),
                    name.clone(),
                    self.metrics.clone(),
                    self.status.clone(),
                );
                tracker.spawn(async move {
                    let ctx = AttemptCtx {
                        spool: &spool,
                        config: &config,
                        metrics: &metrics,
                        status: &status,
                    };
                    let done = attempt(&ctx, upstream.as_ref(), &gate, &id, &name, fresh).await;
                    drop(permit);
                    let _ = done_tx.send(done);
                });
            }
        }
    }
}

/// One delivery attempt of one message.
/// What an attempt needs besides the message.
struct AttemptCtx<'a> {
    spool: &'a Arc<Spool>,
    config: &'a Config,
    metrics: &'a Metrics,
    status: &'a Status,
}

/// An attempt's way to its account's upstream.
struct Gate {
    connections: Arc<Semaphore>,
    /// The account's block epoch when the attempt was dispatched.
    epoch: u64,
    block_epoch: Arc<AtomicU64>,
}

impl Gate {
    /// Runs `deliver` on a free connection; `None` if the account was blocked since dispatch.
    async fn deliver(
        &self,
        upstream: &dyn Upstream,
        job: &Job<'_>,
    ) -> Option<crate::upstream::Attempt> {
        let _connection = self.connections.acquire().await;
        if self.block_epoch.load(Ordering::SeqCst) != self.epoch {
            return None;
        }
        let result = upstream.deliver(job).await;
        if result.signal.is_some() {
            self.block_epoch.fetch_add(1, Ordering::SeqCst);
        }
        Some(result)
    }
}

async fn attempt(
    ctx: &AttemptCtx<'_>,
    upstream: &dyn Upstream,
    gate: &Gate,
    id: &str,
    account: &str,
    fresh: Option<Meta>,
) -> Done {
    let (spool, config) = (ctx.spool, ctx.config);
    let gone = |signal| Done {
        id: id.to_string(),
        account: account.to_string(),
        retry_at: None,
        signal,
        delivered: 0,
        stood_down: false,
    };
    let mut meta = if let Some(m) = fresh {
        m
    } else {
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
    // The body must be the one its meta describes before any byte of it goes upstream.
    match spool.check_before_delivery(&meta).await {
        Checked::Sound => {}
        Checked::Quarantined(_) => {
            ctx.metrics.spool_corrupt.inc();
            return gone(None);
        }
        Checked::Unreadable(e) => {
            error!(queue_id = %id, error = %e, "cannot check the queued body; not sent, will retry");
            let delay = backoff::delay(config.queue.retry_initial, config.queue.retry_max, 1);
            return Done {
                retry_at: Some(Utc::now() + delay),
                ..gone(None)
            };
        }
    }
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
        match gate.deliver(upstream, &job).await {
            Some(r) => r,
            None => {
                // Back to the queue untouched; the account's gate decides when it goes.
                tracing::debug!(queue_id = %id, %account, "account blocked while this message waited for a connection; back to the queue");
                return Done {
                    retry_at: Some(Utc::now()),
                    stood_down: true,
                    ..gone(None)
                };
            }
        }
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
    let age = (now - meta.requeued_at.unwrap_or(meta.received_at))
        .to_std()
        .unwrap_or_default();
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
            let label = Metrics::account(account);
            if pending_left == 0 && any_failed {
                warn!(queue_id = %id, "message moved to failed/");
                let class = if expired { "expired" } else { "permanent" };
                ctx.metrics
                    .failed
                    .get_or_create(&FailedLabels {
                        account: account.to_string(),
                        class: class.into(),
                    })
                    .inc();
                ctx.status.event(
                    "failed",
                    id,
                    account,
                    last_problem.as_deref().unwrap_or(class),
                );
                send_dsn(spool, config, &meta).await;
            } else if pending_left == 0 {
                // Latency first: a scrape that sees the delivery also sees its latency.
                let latency = (now - meta.received_at).to_std().unwrap_or_default();
                ctx.metrics
                    .delivery_latency
                    .get_or_create(&label)
                    .observe(latency.as_secs_f64());
                ctx.metrics.delivered.get_or_create(&label).inc();
                ctx.status.event(
                    "delivered",
                    id,
                    account,
                    &format!("{} recipient(s)", meta.recipients.len()),
                );
            } else if deferred > 0 {
                ctx.metrics.deferred.get_or_create(&label).inc();
                ctx.status.event(
                    "deferred",
                    id,
                    account,
                    last_problem.as_deref().unwrap_or(""),
                );
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
        stood_down: false,
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
        let client = Client {
            ip: std::net::IpAddr::from([127, 0, 0, 1]),
            helo: config.hostname.clone(),
            login: None,
            tls: false,
        };
        let mut dsn_meta = Meta::new(&meta.account, "", &to, client);
        dsn_meta.eight_bit = true;
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

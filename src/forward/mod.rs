//! The forwarder: takes committed messages from the spool and hands them to their account's
//! upstream, one attempt at a time, keeping per-recipient truth in the meta file.
//!
//! Contract:
//! - a message leaves `queue/` only when every recipient is delivered (removed) or given up on
//!   (moved to `failed/`, with a delivery status notification); a crash at any point leaves it
//!   queued, so the worst case is one repeated attempt, never a lost message;
//! - at most one attempt per message at a time: each queued message is in exactly one place
//!   ([`schedule::Schedule`]: scheduled, waiting for its account, or in flight), and attempts are
//!   only created by taking a waiting message. An administrator's retry of a scheduled or waiting
//!   message makes it due now (it moves, it is never queued twice); retry, hold, release and
//!   delete of a message in flight are refused with a conflict;
//! - only recipients still pending are retried; temporary failures back off exponentially
//!   (`retry_initial` doubling up to `retry_max`, ±10 % jitter) until `max_age`;
//! - at most `max_connections` attempts talk to an account's upstream at once; twice as many
//!   may be in flight, so reading a message from the spool and recording its outcome overlap
//!   another message's transmission instead of leaving a connection idle;
//! - an account can be throttled (Exchange's rate limits: wait, count no failure), paused (a
//!   configuration error: keep mail queued, try one message every `probe_interval`), held
//!   (daily recipient quota) or paused by an administrator (until resumed; resume means "try
//!   now"). The states and their transitions are [`account`]; [`Status`] and the
//!   `exorelay_account_paused` gauge are derived from them.
//! - failover: an account with a `fallback` that is paused by a configuration cause has its mail
//!   sent through the fallback account's lane (its limits, upstream and state) while its own
//!   probe goes on; the first probe that works switches it back. Throttled, held and
//!   administrator-paused accounts do not fail over: their mail waits. The decisions and the
//!   state-by-state reasons are [`failover`]; attempts report which account sent them, and a
//!   recipient delivered through the fallback records it in the meta (`via`).
//!
//! Reload ([`Command::Reconfigure`], from `crate::reload`): the new config is used for every
//! decision from then on (retry, max_age, probe_interval, the default account). An account
//! whose config is unchanged keeps its lane (cached token, state); a new or changed one gets
//! the upstream the reload built, and a changed one is tried at once (as after an
//! administrator's resume) unless an administrator paused it. An unchanged account paused by a
//! configuration error is tried at once too: a reload is how an administrator says a credential
//! file was fixed. Attempts already running finish on the upstream they started with. Mail of a
//! removed account, waiting or scheduled, goes through the default account. Nothing queued is
//! dropped or scheduled twice: messages only move between places in [`schedule::Schedule`].
//!
//! Timers run on `tokio::time::Instant`; wall time is used only for what is persisted
//! (`next_attempt_at`) and shown.

pub mod account;
pub mod backoff;
pub mod dsn;
pub mod failover;
pub mod health;
pub mod schedule;
pub mod settle;
pub mod status;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::config::{AccountKind, Config, DsnTo};
use crate::metrics::{FailedLabels, Metrics};
use crate::spool::{Area, Checked, Meta, RecipientStatus, Spool};
use crate::upstream::capture::Capture;
use crate::upstream::exchange::Exchange;
use crate::upstream::{AccountSignal, Job, Upstream};
use account::{Admit, Event};
use schedule::{Place, Schedule};
use settle::{Disposition, Settlement};
pub use status::{AccountState, Status};

#[cfg(test)]
mod tests;

/// One account's way out: its upstream, its limits and its state machine.
struct Lane {
    upstream: Arc<dyn Upstream>,
    /// Attempts in flight (2 x `max_connections`).
    slots: Arc<Semaphore>,
    /// Attempts talking to the upstream (`max_connections`).
    connections: Arc<Semaphore>,
    /// Bumped by an attempt the moment its upstream signals a block (throttle, pause, quota),
    /// so attempts dispatched before it stand down instead of going out behind it.
    signals: Arc<AtomicU64>,
    /// The count of `signals` that [`Forwarder::finished`] has applied; while it lags, a block
    /// is known to have happened but not yet how long it lasts, so nothing new is dispatched.
    applied: u64,
    state: account::Account,
    health: health::Health,
    /// The configured `fallback` account.
    fallback: Option<String>,
    /// The failover last published (log, event, gauge), to see switch-over and switch-back.
    failover: Option<failover::Failover>,
}

impl Lane {
    fn new(upstream: Arc<dyn Upstream>, max_connections: usize, fallback: Option<String>) -> Lane {
        Lane {
            upstream,
            fallback,
            failover: None,
            slots: Arc::new(Semaphore::new(max_connections.saturating_mul(2))),
            connections: Arc::new(Semaphore::new(max_connections)),
            signals: Arc::new(AtomicU64::new(0)),
            applied: 0,
            state: account::Account::default(),
            health: health::Health::default(),
        }
    }

    /// Publishes a new lane's state: status, paused gauge and state gauge.
    fn publish(&self, name: &str, status: &Status, metrics: &Metrics) {
        status.set_account(name, &self.state);
        status.set_fallback(name, self.fallback.clone());
        metrics
            .account_paused
            .get_or_create(&Metrics::account(name))
            .set(i64::from(self.state.paused()));
        metrics.set_account_state(
            name,
            account::metric_name(&self.state.state),
            self.health.degraded.is_some(),
        );
    }
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
    /// Take a reloaded config (see the module header).
    Reconfigure(Reconfigure),
}

/// A reloaded config with a fresh upstream for each of its accounts, built beforehand so that
/// applying it cannot fail. Only new, changed (`changed`) and paused accounts take theirs; the
/// others keep their upstream and its cached token.
#[derive(Clone)]
pub struct Reconfigure {
    pub config: Arc<Config>,
    pub upstreams: HashMap<String, Arc<dyn Upstream>>,
    pub changed: Vec<String>,
}

impl std::fmt::Debug for Reconfigure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut rebuilt: Vec<&String> = self.upstreams.keys().collect();
        rebuilt.sort();
        f.debug_struct("Reconfigure")
            .field("config", &self.config.source)
            .field("upstreams", &rebuilt)
            .field("changed", &self.changed)
            .finish()
    }
}

/// Two reconfigurations are the same when they carry the same config and upstreams.
impl PartialEq for Reconfigure {
    fn eq(&self, other: &Reconfigure) -> bool {
        Arc::ptr_eq(&self.config, &other.config)
            && self.changed == other.changed
            && self.upstreams.len() == other.upstreams.len()
            && self
                .upstreams
                .iter()
                .all(|(k, v)| other.upstreams.get(k).is_some_and(|o| Arc::ptr_eq(v, o)))
    }
}

impl Eq for Reconfigure {}

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
    lanes: HashMap<String, Lane>,
    status: Arc<Status>,
    metrics: Arc<Metrics>,
    control_tx: mpsc::Sender<ControlMsg>,
    control_rx: mpsc::Receiver<ControlMsg>,
    /// Where every queued message is: scheduled, waiting or in flight.
    schedule: Schedule,
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
    /// The account the message waits under in the schedule.
    account: String,
    /// The account whose lane sent the attempt: `account`, or its fallback while failing over.
    sender: String,
    /// The account's epoch when the attempt was dispatched (see [`account`]).
    epoch: u64,
    /// When to try again; `None` when the message has left the queue.
    retry_at: Option<Instant>,
    signal: Option<AccountSignal>,
    delivered: usize,
    /// Never reached the upstream: its account was blocked while it waited for a connection, or
    /// its message could not be read. Says nothing about the account's state.
    stood_down: bool,
    /// The upstream could not be reached (connect, TLS, token endpoint): the cause.
    unreachable: Option<String>,
}

/// The account that sends a message naming `account`: itself, or the default account when it
/// is no longer configured.
fn lane_for(lanes: &HashMap<String, Lane>, default: &str, id: &str, account: &str) -> String {
    if lanes.contains_key(account) {
        return account.to_string();
    }
    warn!(queue_id = %id, %account, "message belongs to an account that is no longer configured; using the default account");
    default.to_string()
}

/// Changes the number of permits of `sem` from `from` to `to`. Growing adds them at once;
/// shrinking takes permits as attempts give them back and never returns them.
fn resize(sem: &Arc<Semaphore>, from: usize, to: usize) {
    if to >= from {
        sem.add_permits(to - from);
        return;
    }
    let excess = (from - to) as u32;
    let sem = sem.clone();
    tokio::spawn(async move {
        if let Ok(p) = sem.acquire_many_owned(excess).await {
            p.forget();
        }
    });
}

/// A persisted wall time as an instant on the forwarder's clock (the past becomes now).
fn instant_of(at: DateTime<Utc>) -> Instant {
    Instant::now() + (at - Utc::now()).to_std().unwrap_or_default()
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
            // Delegated accounts: refresh an idle sign-in daily; ends with the upstream.
            crate::oauth::keepalive::spawn(&tokens);
            Arc::new(Exchange::new(a, &config.hostname, tokens).map_err(err)?)
        }
        AccountKind::Graph => {
            let tokens = Arc::new(
                crate::oauth::TokenManager::new(a)
                    .map_err(err)?
                    .with_metrics(metrics.clone()),
            );
            Arc::new(crate::upstream::graph::Graph::new(a, &config.hostname, tokens).map_err(err)?)
        }
    })
}

impl Forwarder {
    pub fn new(
        config: Arc<Config>,
        spool: Arc<Spool>,
        metrics: Arc<Metrics>,
    ) -> Result<Forwarder, ForwarderError> {
        let build = |name: &str| upstream_for(&config, name, &metrics);
        Self::with_upstreams(config.clone(), spool, metrics.clone(), build)
    }

    /// As [`Forwarder::new`], with each account's upstream from `upstream` (tests script them).
    fn with_upstreams(
        config: Arc<Config>,
        spool: Arc<Spool>,
        metrics: Arc<Metrics>,
        upstream: impl Fn(&str) -> Result<Arc<dyn Upstream>, ForwarderError>,
    ) -> Result<Forwarder, ForwarderError> {
        let mut lanes = HashMap::new();
        let status = Arc::new(Status::default());
        for a in &config.accounts {
            let lane = Lane::new(upstream(&a.name)?, a.max_connections, a.fallback.clone());
            lane.publish(&a.name, &status, &metrics);
            lanes.insert(a.name.clone(), lane);
        }
        let (control_tx, control_rx) = mpsc::channel(64);
        let mut forwarder = Forwarder {
            config,
            spool,
            lanes,
            status,
            metrics,
            control_tx,
            control_rx,
            schedule: Schedule::default(),
            fresh: HashMap::new(),
        };
        // Known before any attempt (a delegated account never signed in): start paused, so the
        // status shows the fix at once; the usual probes and an administrator's resume apply.
        for a in &forwarder.config.accounts.clone() {
            let blocked = forwarder
                .lanes
                .get(&a.name)
                .and_then(|l| l.upstream.blocked_at_start());
            if let Some(advice) = blocked {
                warn!(account = %a.name, cause = %advice.cause, fix = %advice.fix, "account starts paused");
                let event = Event::Finished {
                    epoch: 0,
                    signal: Some(AccountSignal::Paused(advice)),
                };
                forwarder.apply(&a.name, &event);
            }
        }
        Ok(forwarder)
    }

    pub fn control(&self) -> Control {
        Control {
            tx: self.control_tx.clone(),
        }
    }

    /// Shared view of every account's state.
    pub fn status(&self) -> Arc<Status> {
        self.status.clone()
    }

    /// Feeds `event` to an account's state machine and publishes the result: the status the
    /// HTTP side reads and the paused gauge come from here and nowhere else. Returns the states
    /// before and after, for the caller's logs.
    fn apply(&mut self, name: &str, event: &Event) -> Option<(account::Account, account::Account)> {
        let lane = self.lanes.get_mut(name)?;
        let before = lane.state.clone();
        let after = account::on_event(
            &before,
            event,
            Instant::now(),
            self.config.queue.probe_interval,
        );
        if after != before {
            lane.state = after.clone();
            self.status.set_account(name, &after);
            self.metrics
                .account_paused
                .get_or_create(&Metrics::account(name))
                .set(i64::from(after.paused()));
            self.metrics.set_account_state(
                name,
                account::metric_name(&after.state),
                lane.health.degraded.is_some(),
            );
            self.publish_failover(name);
        }
        Some((before, after))
    }

    /// Logs, reports and counts a switch-over to an account's fallback or a switch-back, when
    /// its state or fallback changed which of the two sends its mail.
    fn publish_failover(&mut self, name: &str) {
        let Some(lane) = self.lanes.get_mut(name) else {
            return;
        };
        let now = failover::failover(&lane.state, lane.fallback.as_deref());
        if now == lane.failover {
            return;
        }
        let before = std::mem::replace(&mut lane.failover, now.clone());
        if let Some(old) = &before {
            self.metrics
                .account_failover
                .get_or_create(&Metrics::fallback(name, &old.to))
                .set(0);
        }
        match (&before, &now) {
            (_, Some(f)) => {
                warn!(account = %name, fallback = %f.to, cause = %f.cause, "failing over: this account's mail goes out through its fallback until a probe shows the account works again");
                self.status.event("failover", "", name, &f.to_string());
                self.metrics
                    .account_failover
                    .get_or_create(&Metrics::fallback(name, &f.to))
                    .set(1);
            }
            (Some(old), None) => {
                info!(account = %name, fallback = %old.to, cause = %old.cause, "switching back: this account sends its own mail again");
                self.status.event(
                    "failback",
                    "",
                    name,
                    &format!("sending through {name} again instead of {}", old.to),
                );
            }
            (None, None) => {}
        }
    }

    /// When the run loop must look again without an event: the next scheduled message, or the
    /// end of a block of an account that has messages waiting.
    fn next_wake(&self, now: Instant) -> Instant {
        let blocks = self
            .lanes
            .iter()
            .filter(|(name, _)| self.schedule.has_waiting(name))
            .filter_map(|(_, lane)| {
                match failover::route(&lane.state, lane.fallback.as_deref(), now) {
                    failover::Route::Own(Admit::Nothing { until }) => until,
                    failover::Route::Own(_) => None,
                    failover::Route::Fallback { to, .. } => {
                        let fallback = self.lanes.get(&to)?;
                        failover::wake(&lane.state, &fallback.state, now)
                    }
                }
            });
        blocks
            .chain(self.schedule.next_due())
            .min()
            .unwrap_or(now + Duration::from_secs(3600))
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
            let due = instant_of(m.next_attempt_at.unwrap_or(m.received_at));
            let _ = self.schedule.schedule(&m.id, &m.account, due);
        }
        let mut prune = tokio::time::interval(Duration::from_secs(3600));
        loop {
            let (lanes, default) = (&self.lanes, &self.config.accounts[0].name);
            self.schedule.release_due(Instant::now(), |id, account| {
                lane_for(lanes, default, id, account)
            });
            self.dispatch(&done_tx, &tracker);
            let wake = self.next_wake(Instant::now());
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(meta) = committed.recv() => self.committed(meta),
                Some(done) = done_rx.recv() => {
                    let paused_by_attempt = done.sender == done.account
                        && matches!(done.signal, Some(AccountSignal::Paused(_)));
                    let has_fallback = self
                        .lanes
                        .get(&done.sender)
                        .is_some_and(|l| l.fallback.is_some());
                    let retry_at = failover::retry_at(
                        done.retry_at,
                        paused_by_attempt,
                        has_fallback,
                        Instant::now(),
                    );
                    self.schedule.finished(&done.id, &done.account, retry_at);
                    self.finished(&done);
                }
                Some((cmd, reply)) = self.control_rx.recv() => {
                    // Messages committed before the command must be known first: a hold or
                    // delete of one still in the channel would otherwise race its first attempt.
                    while let Ok(meta) = committed.try_recv() {
                        self.committed(meta);
                    }
                    let result = self.command(cmd).await;
                    let _ = reply.send(result);
                }
                _ = prune.tick() => {
                    let spool = self.spool.clone();
                    let keep = self.config.queue.keep_deleted;
                    let _ = tokio::task::spawn_blocking(move || spool.prune_deleted(keep)).await;
                }
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    /// A message the spool just committed: counted, and due now.
    fn committed(&mut self, meta: Meta) {
        self.metrics
            .received
            .get_or_create(&Metrics::account(&meta.account))
            .inc();
        let (id, account) = (meta.id.clone(), meta.account.clone());
        if self.fresh.len() < FRESH_MAX {
            self.fresh.insert(id.clone(), meta);
        }
        let _ = self.schedule.schedule(&id, &account, Instant::now());
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
            if self.schedule.place(id) == Some(Place::InFlight) {
                return Err(busy());
            }
            // The meta on disk is the truth from here on.
            self.fresh.remove(id);
        }
        match cmd {
            Command::PauseAccount(name) | Command::ResumeAccount(name)
                if !self.lanes.contains_key(&name) =>
            {
                let _ = name;
                Err(ControlError::NotFound)
            }
            Command::PauseAccount(name) => {
                self.apply(&name, &Event::AdminPause);
                info!(account = %name, "account paused by an administrator");
                Ok(format!("account {name} paused"))
            }
            Command::ResumeAccount(name) => {
                self.apply(&name, &Event::AdminResume);
                info!(account = %name, "account resumed by an administrator; trying now");
                Ok(format!("account {name} resumed"))
            }
            Command::Reconfigure(r) => Ok(self.reconfigure(r)),
            Command::Retry(id) => match self.spool.locate(&id) {
                Some(Area::Queue) => {
                    let m = self.spool.load(&id).map_err(io)?;
                    // Moves the message if it is scheduled or waiting; never a second copy.
                    self.schedule
                        .schedule(&id, &m.account, Instant::now())
                        .map_err(|_| busy())?;
                    let lane = self.lanes.get(&m.account);
                    let failover =
                        lane.and_then(|l| failover::failover(&l.state, l.fallback.as_deref()));
                    if let Some(f) = failover {
                        return Ok(format!("{id} will be tried now; its account is {f}"));
                    }
                    Ok(match lane.map(|l| &l.state.state) {
                        Some(account::State::Active) | None => format!("{id} will be tried now"),
                        Some(blocked) => format!(
                            "{id} will be tried now; its account is {}, so it goes first when the account allows",
                            account::describe(blocked)
                        ),
                    })
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
                    self.schedule
                        .schedule(&id, &m.account, Instant::now())
                        .map_err(|_| busy())?;
                    Ok(format!("{id} is back in the queue"))
                }
                Some(Area::Hold) => Err(ControlError::Conflict(
                    "the message is on hold; release it".into(),
                )),
                None => Err(ControlError::NotFound),
            },
            Command::Hold(id) => match self.spool.locate(&id) {
                Some(Area::Queue) => {
                    self.spool
                        .move_message(&id, Area::Queue, Area::Hold, None)
                        .map_err(io)?;
                    self.schedule.forget(&id).map_err(|_| busy())?;
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
                    self.schedule
                        .schedule(&id, &m.account, Instant::now())
                        .map_err(|_| busy())?;
                    Ok(format!("{id} released"))
                }
                Some(_) => Err(ControlError::Conflict("the message is not on hold".into())),
                None => Err(ControlError::NotFound),
            },
            Command::Delete(id) => match self.spool.locate(&id) {
                Some(Area::Deleted) => Err(ControlError::Conflict("already deleted".into())),
                Some(from) => {
                    self.spool
                        .move_message(&id, from, Area::Deleted, None)
                        .map_err(io)?;
                    self.schedule.forget(&id).map_err(|_| busy())?;
                    info!(queue_id = %id, from = from.name(), "message deleted by an administrator (kept in deleted/ until pruned)");
                    Ok(format!(
                        "{id} deleted (recoverable from deleted/ until pruned)"
                    ))
                }
                None => Err(ControlError::NotFound),
            },
        }
    }

    /// Puts a reloaded config in force (see the module header). Cannot fail: the upstreams
    /// were built by the caller.
    fn reconfigure(&mut self, r: Reconfigure) -> String {
        let Reconfigure {
            config,
            mut upstreams,
            changed,
        } = r;
        let old = std::mem::replace(&mut self.config, config.clone());
        let mut retried = Vec::new();
        // Lanes with a new upstream: one that cannot work yet (a delegated account nobody has
        // signed in to) is shown paused at once, as at start.
        let mut renewed = Vec::new();
        for a in &config.accounts {
            let max_changed = old
                .accounts
                .iter()
                .find(|o| o.name == a.name)
                .is_some_and(|o| o.max_connections != a.max_connections);
            let fresh = upstreams.remove(&a.name);
            let Some(lane) = self.lanes.get_mut(&a.name) else {
                let Some(upstream) = fresh else {
                    continue;
                };
                let lane = Lane::new(upstream, a.max_connections, a.fallback.clone());
                lane.publish(&a.name, &self.status, &self.metrics);
                self.lanes.insert(a.name.clone(), lane);
                renewed.push(a.name.clone());
                continue;
            };
            lane.fallback = a.fallback.clone();
            self.status.set_fallback(&a.name, a.fallback.clone());
            if let Some(before) = old
                .accounts
                .iter()
                .find(|o| o.name == a.name)
                .map(|o| o.max_connections)
                && max_changed
            {
                // Resized, not replaced: attempts running hold permits of the same semaphore,
                // so the account never has more connections than the new limit allows once
                // they finish (Exchange allows 3 per mailbox).
                resize(
                    &lane.slots,
                    before.saturating_mul(2),
                    a.max_connections.saturating_mul(2),
                );
                resize(&lane.connections, before, a.max_connections);
            }
            let paused_by_error = matches!(lane.state.state, account::State::Paused { .. });
            let by_admin = matches!(lane.state.state, account::State::PausedByAdmin);
            let is_changed = changed.contains(&a.name);
            // A paused account's upstream remembers its failed token request (and backs off);
            // a fresh one asks Entra again with the credential file as it is now.
            if (is_changed || paused_by_error)
                && let Some(upstream) = fresh
            {
                // The same mailbox keeps Exchange's counts: a reload must not reopen the
                // per-minute window or the daily recipient budget.
                let same_mailbox = old
                    .accounts
                    .iter()
                    .find(|o| o.name == a.name)
                    .is_some_and(|o| o.mailbox == a.mailbox && o.kind == a.kind);
                if same_mailbox
                    && let (Some(new), Some(before)) = (upstream.pacer(), lane.upstream.pacer())
                    && !new.inherit(before)
                {
                    warn!(account = %a.name, "the reload could not carry the sending counts over; they start afresh");
                }
                lane.upstream = upstream;
                renewed.push(a.name.clone());
            }
            if (is_changed && !by_admin) || paused_by_error {
                retried.push(a.name.clone());
            }
        }
        for name in &retried {
            // "Try now", with a new epoch: results of attempts on the old settings are stale.
            self.apply(name, &Event::AdminResume);
            info!(account = %name, "configuration reloaded; trying the account now");
        }
        for name in &renewed {
            let Some(advice) = self
                .lanes
                .get(name)
                .and_then(|l| l.upstream.blocked_at_start())
            else {
                continue;
            };
            if matches!(
                self.lanes.get(name).map(|l| &l.state.state),
                Some(account::State::PausedByAdmin)
            ) {
                continue;
            }
            warn!(account = %name, cause = %advice.cause, fix = %advice.fix, "account paused until it can work");
            let event = Event::Finished {
                epoch: self.lanes.get(name).map(|l| l.state.epoch).unwrap_or(0),
                signal: Some(AccountSignal::Paused(advice)),
            };
            self.apply(name, &event);
        }
        // A fallback added, changed or removed switches over or back now.
        let names: Vec<String> = self.lanes.keys().cloned().collect();
        for name in &names {
            self.publish_failover(name);
        }
        let removed: Vec<String> = self
            .lanes
            .keys()
            .filter(|name| !config.accounts.iter().any(|a| &a.name == *name))
            .cloned()
            .collect();
        for name in &removed {
            if let Some(f) = self.lanes.remove(name).and_then(|l| l.failover) {
                self.metrics
                    .account_failover
                    .remove(&Metrics::fallback(name, &f.to));
            }
            self.status.remove_account(name);
            // No series of an account that is gone (a stale "paused" would keep alerting).
            self.metrics.account_paused.remove(&Metrics::account(name));
            self.metrics.remove_account_credentials(name);
            for state in crate::metrics::ACCOUNT_STATES
                .iter()
                .chain(["degraded"].iter())
            {
                self.metrics
                    .account_state
                    .remove(&crate::metrics::AccountStateLabels {
                        account: name.clone(),
                        state: state.to_string(),
                    });
            }
            // Waiting mail is made due again; `release_due` hands it to the default account.
            let now = Instant::now();
            while let Some(id) = self.schedule.start_next(name) {
                self.schedule.finished(&id, name, Some(now));
            }
            info!(account = %name, "account removed from the configuration; its queued mail goes through the default account");
        }
        format!("configuration in force; accounts tried now: {retried:?}; removed: {removed:?}")
    }

    /// Applies what an attempt learnt about its account, and says so in the logs.
    /// The account concerned is the one that sent the attempt (`done.sender`).
    fn finished(&mut self, done: &Done) {
        if done.stood_down {
            self.apply(&done.sender, &Event::NotSent { epoch: done.epoch });
            return;
        }
        let Some(lane) = self.lanes.get_mut(&done.sender) else {
            return;
        };
        if done.signal.is_some() {
            lane.applied = lane.signals.load(Ordering::SeqCst);
        }
        let name = done.sender.as_str();
        let reach = match &done.unreachable {
            Some(cause) => health::Reach::Unreachable(cause.clone()),
            None => health::Reach::Reached,
        };
        let health = lane.health.after(&reach);
        match (&lane.health.degraded, &health.degraded) {
            (None, Some(cause)) => {
                error!(account = %name, %cause, attempts = health.streak, "account degraded: Exchange has not been reachable for several attempts in a row; mail stays queued and is retried");
                self.status.event("degraded", &done.id, name, cause);
            }
            (Some(_), None) => {
                info!(account = %name, "account reaches its upstream again");
                self.status
                    .event("recovered", &done.id, name, "upstream reachable again");
            }
            _ => {}
        }
        if lane.health.degraded.is_some() != health.degraded.is_some() {
            self.metrics.set_account_state(
                name,
                account::metric_name(&lane.state.state),
                health.degraded.is_some(),
            );
        }
        lane.health = health.clone();
        self.status.set_health(name, &health);
        match &done.signal {
            Some(AccountSignal::Throttled { reason, wait }) => {
                warn!(account = %name, %reason, wait = ?wait, "Exchange throttled the account; slowing down (not counted as a failure)");
                self.metrics
                    .throttled
                    .get_or_create(&Metrics::account(name))
                    .inc();
            }
            Some(AccountSignal::QuotaHold { reason, wait }) => {
                warn!(account = %name, %reason, wait = ?wait, "daily recipient quota reached; account held");
            }
            Some(AccountSignal::Paused(advice)) => {
                self.status.set_error(name, advice.to_string());
            }
            None if done.delivered > 0 => self.status.delivered(name),
            None => {}
        }
        let event = Event::Finished {
            epoch: done.epoch,
            signal: done.signal.clone(),
        };
        let Some((before, after)) = self.apply(name, &event) else {
            return;
        };
        use account::State;
        match (&before.state, &after.state) {
            (State::Paused { .. }, State::Paused { .. }) => {}
            (_, State::Paused { advice, .. }) => {
                error!(account = %name, cause = %advice.cause, fix = %advice.fix, "account paused: mail stays queued until this is fixed");
                self.status
                    .event("paused", &done.id, name, &advice.to_string());
            }
            (State::Paused { .. }, State::Active) => {
                info!(account = %name, "account works again; resuming delivery");
                self.status
                    .event("resumed", &done.id, name, "account works again");
            }
            _ => {}
        }
    }

    /// Starts attempts for waiting messages while the lane that sends them admits them and has
    /// free slots: an account's own lane, or its fallback's while it fails over (see
    /// [`failover`]). This is the only place attempts are created, and each takes a waiting
    /// message from the schedule, so a message never has two attempts at once.
    fn dispatch(&mut self, done_tx: &mpsc::UnboundedSender<Done>, tracker: &TaskTracker) {
        let mut names: Vec<String> = self.lanes.keys().cloned().collect();
        names.sort();
        for name in &names {
            // A throttle or hold whose time is over ends here.
            self.apply(name, &Event::Tick);
        }
        // The waiting lines each lane sends from, with the failover of the borrowed ones.
        let mut lines: HashMap<String, Vec<(String, Option<failover::Failover>)>> = HashMap::new();
        let now = Instant::now();
        for name in &names {
            if !self.schedule.has_waiting(name) {
                continue;
            }
            let Some(lane) = self.lanes.get(name) else {
                continue;
            };
            let f = failover::failover(&lane.state, lane.fallback.as_deref());
            match failover::route(&lane.state, lane.fallback.as_deref(), now) {
                failover::Route::Own(_) => {
                    lines
                        .entry(name.clone())
                        .or_default()
                        .push((name.clone(), None));
                }
                failover::Route::Fallback { to, probe } => {
                    // The probe goes through the account itself, before the fallback takes the
                    // rest, so that it is the oldest waiting message.
                    if probe {
                        let _ = self.launch(name, name, None, true, done_tx, tracker);
                    }
                    if self.lanes.contains_key(&to) {
                        lines.entry(to).or_default().push((name.clone(), f));
                    }
                }
            }
        }
        for sender in &names {
            let Some(mut queue) = lines.remove(sender) else {
                continue;
            };
            let Some(lane) = self.lanes.get(sender) else {
                continue;
            };
            let probe = match lane.state.admits(Instant::now()) {
                Admit::Any => false,
                Admit::Probe => true,
                Admit::Nothing { .. } => continue,
            };
            // Round robin over the sender's own line and the lines it takes over, so neither
            // starves the other.
            let mut turn = 0;
            while !queue.is_empty() {
                turn %= queue.len();
                let (line, f) = queue[turn].clone();
                match self.launch(sender, &line, f, probe, done_tx, tracker) {
                    Launch::Started if probe => break,
                    Launch::Started => turn += 1,
                    Launch::Empty => {
                        queue.remove(turn);
                    }
                    Launch::Blocked => break,
                }
            }
        }
    }

    /// Starts one attempt of the oldest message waiting under `line`, through `sender`'s lane;
    /// `failover` is set when `sender` is `line`'s fallback.
    fn launch(
        &mut self,
        sender: &str,
        line: &str,
        failover: Option<failover::Failover>,
        probe: bool,
        done_tx: &mpsc::UnboundedSender<Done>,
        tracker: &TaskTracker,
    ) -> Launch {
        let Some(lane) = self.lanes.get(sender) else {
            return Launch::Blocked;
        };
        if lane.signals.load(Ordering::SeqCst) != lane.applied {
            return Launch::Blocked;
        }
        let Ok(permit) = lane.slots.clone().try_acquire_owned() else {
            return Launch::Blocked;
        };
        let Some(id) = self.schedule.start_next(line) else {
            return Launch::Empty;
        };
        let gate = Gate {
            connections: lane.connections.clone(),
            seen: lane.signals.load(Ordering::SeqCst),
            signals: lane.signals.clone(),
            epoch: lane.state.epoch,
        };
        let upstream = lane.upstream.clone();
        let fresh = self.fresh.remove(&id);
        let (spool, config, done_tx, metrics, status) = (
            self.spool.clone(),
            self.config.clone(),
            done_tx.clone(),
            self.metrics.clone(),
            self.status.clone(),
        );
        if probe {
            info!(account = %sender, queue_id = %id, "probing a paused account with one message");
            self.apply(sender, &Event::ProbeSent);
        }
        let route = Sending {
            account: line.to_string(),
            sender: sender.to_string(),
            failover,
        };
        let (epoch, owned_id, owned_route) = (gate.epoch, id.clone(), route.clone());
        let run = tokio::spawn(async move {
            let ctx = AttemptCtx {
                spool: &spool,
                config: &config,
                metrics: &metrics,
                status: &status,
            };
            attempt(&ctx, upstream.as_ref(), &gate, &id, &route, fresh).await
        });
        tracker.spawn(async move {
            // A panicking attempt must not leave its message "in flight" for ever (every
            // command on it refused, the account waiting for its signal): it counts as
            // not sent, and the message is tried again later.
            let done = run.await.unwrap_or_else(|e| {
                error!(queue_id = %owned_id, account = %owned_route.sender, error = %e, "delivery attempt crashed; the message stays queued and is tried again in a minute");
                Done {
                    id: owned_id,
                    account: owned_route.account,
                    sender: owned_route.sender,
                    epoch,
                    retry_at: Some(Instant::now() + Duration::from_secs(60)),
                    signal: None,
                    delivered: 0,
                    stood_down: true,
                    unreachable: None,
                }
            });
            drop(permit);
            let _ = done_tx.send(done);
        });
        Launch::Started
    }
}

/// What [`Forwarder::launch`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Launch {
    Started,
    /// No message waits under that line.
    Empty,
    /// The sending lane has no free slot or a block is being applied.
    Blocked,
}

/// Who an attempt is for and who sends it.
#[derive(Debug, Clone)]
struct Sending {
    /// The account the message waits under (its own, or the default after a reload).
    account: String,
    /// The account whose upstream sends it.
    sender: String,
    /// Set when `sender` is `account`'s fallback: the failover in force.
    failover: Option<failover::Failover>,
}

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
    /// The account's signal count when the attempt was dispatched.
    seen: u64,
    signals: Arc<AtomicU64>,
    /// The account's state-machine epoch when the attempt was dispatched; the attempt reports
    /// it, so a result from before a block is recognised as stale.
    epoch: u64,
}

impl Gate {
    /// Runs `deliver` on a free connection; `None` if the account was blocked since dispatch.
    async fn deliver(
        &self,
        upstream: &dyn Upstream,
        job: &Job<'_>,
    ) -> Option<crate::upstream::Attempt> {
        let _connection = self.connections.acquire().await;
        if self.signals.load(Ordering::SeqCst) != self.seen {
            return None;
        }
        let result = upstream.deliver(job).await;
        if result.signal.is_some() {
            self.signals.fetch_add(1, Ordering::SeqCst);
        }
        Some(result)
    }
}

/// One delivery attempt of one message.
async fn attempt(
    ctx: &AttemptCtx<'_>,
    upstream: &dyn Upstream,
    gate: &Gate,
    id: &str,
    route: &Sending,
    fresh: Option<Meta>,
) -> Done {
    let (spool, config) = (ctx.spool, ctx.config);
    let account = route.sender.as_str();
    let gone = |signal| Done {
        id: id.to_string(),
        account: route.account.clone(),
        sender: route.sender.clone(),
        epoch: gate.epoch,
        retry_at: None,
        signal,
        delivered: 0,
        stood_down: true,
        unreachable: None,
    };
    let meta = if let Some(m) = fresh {
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
                retry_at: Some(Instant::now() + delay),
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
        crate::upstream::Attempt::all(0, crate::upstream::Outcome::Delivered(String::new()))
    } else {
        match gate.deliver(upstream, &job).await {
            Some(r) => r,
            None => {
                // Back to the queue untouched; the account's gate decides when it goes.
                tracing::debug!(queue_id = %id, %account, "account blocked while this message waited for a connection; back to the queue");
                return Done {
                    retry_at: Some(Instant::now()),
                    stood_down: true,
                    ..gone(None)
                };
            }
        }
    };
    let recipients = job.recipients;
    let now = Utc::now();
    let backoff =
        |attempts| backoff::delay(config.queue.retry_initial, config.queue.retry_max, attempts);
    let policy = settle::Policy {
        max_age: config.queue.max_age,
        backoff: &backoff,
    };
    let mut settled = settle::settle(meta, &recipients, &result.outcomes, now, &policy);
    if let Some(f) = &route.failover {
        failover::mark_delivered_via(&mut settled, &recipients, f);
    }
    let retry_in = persist(ctx, &settled, route).await;
    Done {
        id: id.to_string(),
        account: route.account.clone(),
        sender: route.sender.clone(),
        epoch: gate.epoch,
        retry_at: retry_in.map(|d| Instant::now() + d),
        signal: result.signal,
        delivered: settled.delivered,
        stood_down: false,
        unreachable: result.unreachable,
    }
}

/// Acts on a settled attempt: writes the meta (or removes the message, or moves it to
/// `failed/` with a DSN), logs, counts and reports. Returns when to try again; when the spool
/// cannot be written, the meta on disk still says pending, so a later retry is safe.
/// Metrics count by the account that sent (the fallback while failing over); the status page's
/// events name the message's account and say when the fallback delivered it.
async fn persist(ctx: &AttemptCtx<'_>, s: &Settlement, route: &Sending) -> Option<Duration> {
    let (spool, config, meta, id) = (ctx.spool, ctx.config, &s.meta, s.meta.id.as_str());
    let account = route.sender.as_str();
    let via = route
        .failover
        .as_ref()
        .map(|f| format!(" via fallback {} because {}", f.to, f.cause))
        .unwrap_or_default();
    for (recipient, reply) in &s.refused {
        warn!(queue_id = %id, %recipient, %reply, "recipient failed permanently");
    }
    let (retry_in, expired) = match s.disposition {
        Disposition::Retry(d) => (Some(d), false),
        Disposition::Failed { expired } => (None, expired),
        Disposition::Delivered | Disposition::Hold => (None, false),
    };
    info!(queue_id = %id, account = %route.account, sent_by = %account, attempt = meta.attempts, delivered = s.delivered, deferred = s.deferred,
          failed = s.failed, not_attempted = s.skipped, expired, retry_at = ?meta.next_attempt_at,
          last_problem = ?s.last_problem, "delivery attempt");

    let (spool2, meta2, disposition) = (spool.clone(), meta.clone(), s.disposition);
    let result_io = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        match disposition {
            Disposition::Retry(_) => spool2.update(&meta2),
            Disposition::Failed { .. } => spool2.fail(&meta2),
            Disposition::Delivered => spool2.remove(&meta2.id),
            Disposition::Hold => {
                spool2.move_message(&meta2.id, Area::Queue, Area::Hold, Some(&meta2))
            }
        }
    })
    .await
    .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
    if let Err(e) = result_io {
        error!(queue_id = %id, error = %e, "cannot update the spool after a delivery attempt; will retry");
        return Some(backoff::delay(
            config.queue.retry_initial,
            config.queue.retry_max,
            1,
        ));
    }
    let label = Metrics::account(account);
    match s.disposition {
        Disposition::Hold => {
            let why = s.last_problem.as_deref().unwrap_or("sender refused");
            warn!(queue_id = %id, account = %account, sender = %meta.mail_from.escape_debug(), reason = %why,
                  "message put on hold: Exchange refused its sender; the account keeps sending other mail; release it once fixed");
            ctx.status.event("held", id, &route.account, why);
        }
        Disposition::Failed { expired } => {
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
                &route.account,
                &format!("{}{via}", s.last_problem.as_deref().unwrap_or(class)),
            );
            send_dsn(spool, config, meta, account).await;
        }
        Disposition::Delivered => {
            // Latency first: a scrape that sees the delivery also sees its latency.
            let latency = (Utc::now() - meta.received_at).to_std().unwrap_or_default();
            ctx.metrics
                .delivery_latency
                .get_or_create(&label)
                .observe(latency.as_secs_f64());
            ctx.metrics.delivered.get_or_create(&label).inc();
            ctx.status.event(
                "delivered",
                id,
                &route.account,
                &format!("{} recipient(s){via}", meta.recipients.len()),
            );
        }
        Disposition::Retry(_) if s.deferred > 0 => {
            ctx.metrics.deferred.get_or_create(&label).inc();
            ctx.status.event(
                "deferred",
                id,
                &route.account,
                &format!("{}{via}", s.last_problem.as_deref().unwrap_or("")),
            );
        }
        Disposition::Retry(_) => {}
    }
    if let Some(f) = &route.failover
        && s.delivered > 0
    {
        ctx.metrics
            .fallback_deliveries
            .get_or_create(&Metrics::fallback(&route.account, &f.to))
            .inc();
    }
    retry_in
}

/// Queues a delivery status notification for a failed message, unless it was itself a
/// notification (null sender) or DSNs are off. It goes out through `sender`, the account that
/// made the attempt (the fallback's own while failing over).
async fn send_dsn(spool: &Arc<Spool>, config: &Config, meta: &Meta, sender: &str) {
    let mut to = Vec::new();
    // A sender without a domain (a device that only knows its own name) cannot get mail.
    let sender_reachable = meta.mail_from.contains('@');
    if matches!(config.queue.dsn, DsnTo::Sender | DsnTo::Both) && sender_reachable {
        to.push(meta.mail_from.clone());
    } else if !meta.mail_from.is_empty() && !sender_reachable {
        info!(queue_id = %meta.id, sender = %meta.mail_from.escape_debug(), "no delivery status notification to a sender without a domain");
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
    let submission = crate::submission::Submission {
        source: crate::submission::Source::Dsn,
        client: crate::submission::local_client(&config.hostname),
        mail_from: String::new(),
        recipients: to.clone(),
        eight_bit: true,
        smtputf8: false,
    };
    let result = submission
        .enqueue(spool, &config.hostname, sender, &report)
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

//! Reload without restart: SIGHUP and `POST /api/v1/reload` both call [`Reloader::reload`],
//! which re-reads the file the relay was started with and puts it in force, or refuses it and
//! leaves the running config exactly as it was.
//!
//! Contract:
//! - the file is loaded and validated exactly as `exorelay check` does; an invalid file is
//!   refused with the same `file:line: field: message`;
//! - settings that cannot change while the relay runs ([`NEEDS_RESTART`]: the spool and the
//!   HTTP side's socket, TLS and limits) are refused, naming the field and "restart exorelay";
//! - everything that can fail is done before anything changes: new SMTP listeners are bound,
//!   every TLS listener's certificate is read again, the upstreams of new and changed accounts
//!   are built (which reads their credential files). If any step fails, what was prepared is dropped (sockets closed) and the old config
//!   stays entirely. Only then is the new config handed to each part (all or nothing);
//! - sessions in progress keep the settings they were accepted with, so none is dropped; a
//!   listener whose address is gone stops accepting, its open sessions finish normally; a
//!   listener whose address stays keeps its socket and accept loop, and new connections get the
//!   new settings (users, networks, limits, TLS mode, certificate);
//! - queued mail is not touched: the forwarder swaps upstreams between attempts (see
//!   `forward`), mail of a removed account goes through the default (first) account;
//! - reloads are serialised: one runs at a time, the next one diffs against its result.
//!
//! Every reload is counted in `exorelay_config_reloads_total{result}` and logged with what it
//! changed or why it was refused (never a secret: only names, addresses and field paths).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::{Config, ConfigError, ListenerConfig};
use crate::forward::{self, Control, ControlError, Status};
use crate::http::HttpSettings;
use crate::metrics::Metrics;
use crate::smtp::listener::{Endpoint, Inbound};
use crate::spool::Spool;

/// A value that readers take a snapshot of (cheap: an `Arc` clone) and a reload replaces as a
/// whole. A reader never sees half of an update.
pub struct Live<T>(RwLock<Arc<T>>);

impl<T> Live<T> {
    pub fn new(value: T) -> Live<T> {
        Live(RwLock::new(Arc::new(value)))
    }

    pub fn get(&self) -> Arc<T> {
        match self.0.read() {
            Ok(v) => v.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn set(&self, value: Arc<T>) {
        match self.0.write() {
            Ok(mut v) => *v = value,
            Err(poisoned) => *poisoned.into_inner() = value,
        }
    }
}

/// Settings a running relay cannot change: the spool is open with them, and the HTTP side's
/// socket, TLS and connection limits are set up once.
pub const NEEDS_RESTART: [&str; 8] = [
    "queue.dir",
    "queue.max_messages",
    "http.listen",
    "http.tls",
    "http.max_connections",
    "http.max_connections_per_client",
    "http.header_timeout",
    "http.request_timeout",
];

fn debug_of(config: &Config, field: &str) -> String {
    let (q, h) = (&config.queue, &config.http);
    match field {
        "queue.dir" => format!("{:?}", q.dir),
        "queue.max_messages" => format!("{:?}", q.max_messages),
        "http.listen" => format!("{:?}", h.listen),
        "http.tls" => format!("{:?}", h.tls),
        "http.max_connections" => format!("{:?}", h.max_connections),
        "http.max_connections_per_client" => format!("{:?}", h.max_connections_per_client),
        "http.header_timeout" => format!("{:?}", h.header_timeout),
        "http.request_timeout" => format!("{:?}", h.request_timeout),
        _ => String::new(),
    }
}

/// Two config parts are the same when their `Debug` renderings are: every field counts, including
/// fields added later, without a comparison to maintain here.
fn same<T: std::fmt::Debug>(a: &T, b: &T) -> bool {
    format!("{a:?}") == format!("{b:?}")
}

/// What becomes of one SMTP listener of the new config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenerPlan {
    /// Same address as the running listener at this index: its socket and accept loop stay.
    Keep(usize),
    /// A new address: bind it.
    Bind,
}

/// The difference between the running config and a new one (pure; see [`plan`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// One per `[[listener]]` of the new config, same order.
    pub listeners: Vec<ListenerPlan>,
    /// Indices of running listeners whose address is no longer configured.
    pub removed_listeners: Vec<usize>,
    /// Accounts that are new or whose settings changed (they get a new upstream).
    pub rebuilt_accounts: Vec<String>,
    /// Whether credential expiry checks must start over (accounts or their notices changed).
    pub lifecycle: bool,
    /// What changed, for the log and the API's answer.
    pub changes: Vec<String>,
}

/// A change the running relay cannot make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeedsRestart {
    pub field: &'static str,
}

/// Decides what a reload from `old` to `new` does, or which field needs a restart.
pub fn plan(old: &Config, new: &Config) -> Result<Plan, NeedsRestart> {
    if let Some(field) = NEEDS_RESTART
        .iter()
        .find(|f| debug_of(old, f) != debug_of(new, f))
    {
        return Err(NeedsRestart { field });
    }
    let mut p = Plan::default();
    // Listeners are matched by configured address, in order (two entries on port 0 are two).
    let mut unmatched: Vec<Option<&ListenerConfig>> = old.listeners.iter().map(Some).collect();
    for l in &new.listeners {
        let found = unmatched
            .iter()
            .position(|o| o.is_some_and(|o| o.address == l.address));
        match found {
            Some(i) => {
                if let Some(o) = unmatched[i].take()
                    && !same(o, l)
                {
                    p.changes.push(format!("listener {} changed", l.address));
                }
                p.listeners.push(ListenerPlan::Keep(i));
            }
            None => {
                p.changes.push(format!("listener {} added", l.address));
                p.listeners.push(ListenerPlan::Bind);
            }
        }
    }
    for (i, o) in unmatched.iter().enumerate() {
        if let Some(o) = o {
            p.changes.push(format!("listener {} removed", o.address));
            p.removed_listeners.push(i);
        }
    }
    for a in &new.accounts {
        match old.accounts.iter().find(|o| o.name == a.name) {
            Some(o) if same(o, a) => {}
            Some(_) => {
                p.changes.push(format!("account {} changed", a.name));
                p.rebuilt_accounts.push(a.name.clone());
            }
            None => {
                p.changes.push(format!("account {} added", a.name));
                p.rebuilt_accounts.push(a.name.clone());
            }
        }
    }
    let default = new.accounts.first().map(|a| a.name.as_str()).unwrap_or("");
    for o in &old.accounts {
        if !new.accounts.iter().any(|a| a.name == o.name) {
            p.changes.push(format!(
                "account {} removed (its queued mail goes through account {default})",
                o.name
            ));
        }
    }
    p.lifecycle = !p.rebuilt_accounts.is_empty()
        || old.accounts.len() != new.accounts.len()
        || old.queue.admin_address != new.queue.admin_address
        || old.hostname != new.hostname;
    let parts: [(&str, bool); 5] = [
        ("hostname", old.hostname == new.hostname),
        ("users", same(&old.users, &new.users)),
        ("relay settings", same(&old.relay, &new.relay)),
        ("queue settings", same(&old.queue, &new.queue)),
        (
            "http.admin_token_file",
            old.http.admin_token_file == new.http.admin_token_file,
        ),
    ];
    for (name, unchanged) in parts {
        if !unchanged {
            p.changes.push(format!("{name} changed"));
        }
    }
    Ok(p)
}

/// The line of `field` (`section.key`) in a TOML text, or of its section when the key is not
/// written (it was removed, so its default applies), or `None`.
pub fn line_of(text: &str, field: &str) -> Option<usize> {
    let (section, key) = field.split_once('.')?;
    let mut in_section = false;
    let mut section_line = None;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.starts_with('[') {
            let name = line.trim_matches(|c| c == '[' || c == ']').trim();
            in_section = name == section;
            if in_section {
                section_line = Some(i + 1);
            }
            continue;
        }
        if in_section
            && let Some(rest) = line.strip_prefix(key)
            && rest.trim_start().starts_with('=')
        {
            return Some(i + 1);
        }
    }
    section_line
}

/// Why a reload was refused; the running config is unchanged in every case.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file is not a valid config (the same message as `exorelay check`).
    #[error("{0}")]
    Invalid(ConfigError),
    /// The file changes a setting that only a restart can change.
    #[error("{0}")]
    NeedsRestart(ConfigError),
    #[error("{file}: listener {address}: cannot listen: {source}")]
    Bind {
        file: String,
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("{file}: listener {address}: {source}")]
    Tls {
        file: String,
        address: SocketAddr,
        source: crate::tls::TlsError,
    },
    #[error("{file}: {source}")]
    Account {
        file: String,
        source: forward::ForwarderError,
    },
    #[error("the relay is shutting down")]
    Stopped,
}

/// What a successful reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    pub changes: Vec<String>,
}

/// One running SMTP listener.
/// Matched to the new config by index into the running config's listeners (see [`plan`]).
struct Running {
    endpoint: Arc<Live<Endpoint>>,
    /// Cancels this listener's accept loop only.
    stop: CancellationToken,
}

/// What the last reload (or the start) put in force.
struct Current {
    config: Arc<Config>,
    listeners: Vec<Running>,
    /// Cancels the credential-expiry watcher started for `config`.
    lifecycle: CancellationToken,
}

/// Owns the running config and every part a reload changes.
pub struct Reloader {
    path: PathBuf,
    current: tokio::sync::Mutex<Current>,
    inbound: Arc<Inbound>,
    http: Option<Arc<Live<HttpSettings>>>,
    control: Control,
    metrics: Arc<Metrics>,
    spool: Arc<Spool>,
    status: Arc<Status>,
    shutdown: CancellationToken,
    /// Accept loops and sessions (the relay waits for them at shutdown).
    sessions: TaskTracker,
    /// The credential-expiry watcher.
    background: TaskTracker,
}

/// The parts of a running relay a [`Reloader`] manages.
pub struct Parts {
    pub inbound: Arc<Inbound>,
    pub http: Option<Arc<Live<HttpSettings>>>,
    pub control: Control,
    pub metrics: Arc<Metrics>,
    pub spool: Arc<Spool>,
    pub status: Arc<Status>,
    pub shutdown: CancellationToken,
    pub sessions: TaskTracker,
    pub background: TaskTracker,
}

impl Reloader {
    /// Starts the accept loop of every listener (`sockets` in `config.listeners` order) and the
    /// credential-expiry watcher. Fails only when a listener's certificate cannot be read.
    pub fn start(
        config: Arc<Config>,
        sockets: Vec<TcpListener>,
        parts: Parts,
    ) -> Result<Reloader, (SocketAddr, crate::tls::TlsError)> {
        let mut endpoints = Vec::new();
        for lc in &config.listeners {
            endpoints.push(Endpoint::new(lc).map_err(|e| (lc.address, e))?);
        }
        let mut reloader = Reloader {
            path: config.source.clone(),
            current: tokio::sync::Mutex::new(Current {
                config: config.clone(),
                listeners: Vec::new(),
                lifecycle: CancellationToken::new(),
            }),
            inbound: parts.inbound,
            http: parts.http,
            control: parts.control,
            metrics: parts.metrics,
            spool: parts.spool,
            status: parts.status,
            shutdown: parts.shutdown,
            sessions: parts.sessions,
            background: parts.background,
        };
        let listeners = sockets
            .into_iter()
            .zip(endpoints)
            .map(|(socket, endpoint)| reloader.spawn_listener(socket, endpoint))
            .collect();
        let lifecycle = reloader.spawn_lifecycle(config);
        let current = reloader.current.get_mut();
        current.listeners = listeners;
        current.lifecycle = lifecycle;
        Ok(reloader)
    }

    fn spawn_listener(&self, socket: TcpListener, endpoint: Endpoint) -> Running {
        let (tls, auth) = (endpoint.lc.tls, endpoint.lc.auth);
        info!(address = %socket.local_addr().map(|a| a.to_string()).unwrap_or_default(), ?tls, ?auth, "listening");
        let endpoint = Arc::new(Live::new(endpoint));
        let stop = self.shutdown.child_token();
        self.sessions.spawn(crate::smtp::listener::serve(
            socket,
            endpoint.clone(),
            self.inbound.clone(),
            stop.clone(),
            self.shutdown.clone(),
            self.sessions.clone(),
        ));
        Running { endpoint, stop }
    }

    fn spawn_lifecycle(&self, config: Arc<Config>) -> CancellationToken {
        let token = self.shutdown.child_token();
        self.background.spawn(crate::lifecycle::watch(
            config,
            self.spool.clone(),
            self.metrics.clone(),
            self.status.clone(),
            token.clone(),
        ));
        token
    }

    /// The config in force.
    pub async fn config(&self) -> Arc<Config> {
        self.current.lock().await.config.clone()
    }

    /// Re-reads the config file and puts it in force, or refuses it (see the module header).
    /// Logs and counts the outcome.
    /// Runs in a task of its own: a caller that goes away (an HTTP client that hangs up, a
    /// request timeout) cannot cut a reload off between handing the forwarder its part and
    /// handing the listeners theirs.
    pub async fn reload(self: &Arc<Self>) -> Result<Reloaded, ReloadError> {
        let me = self.clone();
        tokio::spawn(async move { me.reload_logged().await })
            .await
            .unwrap_or(Err(ReloadError::Stopped))
    }

    async fn reload_logged(&self) -> Result<Reloaded, ReloadError> {
        let result = self.reload_inner().await;
        match &result {
            Ok(r) => {
                self.metrics.reloaded(true);
                info!(config = %self.path.display(), changes = ?r.changes, "configuration reloaded");
            }
            Err(e) => {
                self.metrics.reloaded(false);
                warn!(config = %self.path.display(), error = %e, "configuration reload refused; the running configuration stays");
            }
        }
        result
    }

    async fn reload_inner(&self) -> Result<Reloaded, ReloadError> {
        let mut current = self.current.lock().await;
        let path = self.path.clone();
        let loaded = tokio::task::spawn_blocking(move || Config::load(&path))
            .await
            .map_err(|_| ReloadError::Stopped)?;
        let new = Arc::new(loaded.map_err(ReloadError::Invalid)?);
        let plan = plan(&current.config, &new).map_err(|r| self.needs_restart(r))?;
        let file = self.path.display().to_string();

        // Prepare: everything that can fail, nothing in force yet.
        let mut endpoints = Vec::new();
        for lc in &new.listeners {
            let endpoint = Endpoint::new(lc).map_err(|source| ReloadError::Tls {
                file: file.clone(),
                address: lc.address,
                source,
            })?;
            endpoints.push(endpoint);
        }
        let mut sockets = Vec::new();
        for (lc, p) in new.listeners.iter().zip(&plan.listeners) {
            if *p == ListenerPlan::Bind {
                // A running listener on the same port (a wildcard, or another address being
                // given up) still holds it: binding first keeps the reload all or nothing, so
                // that move needs a restart, and the refusal says so.
                let holder = current
                    .config
                    .listeners
                    .iter()
                    .map(|l| l.address)
                    .find(|a| a.port() == lc.address.port() && *a != lc.address);
                let socket = TcpListener::bind(lc.address).await.map_err(|source| {
                    match holder {
                        Some(old) if source.kind() == std::io::ErrorKind::AddrInUse => {
                            ReloadError::Bind {
                                file: file.clone(),
                                address: lc.address,
                                source: std::io::Error::new(
                                    source.kind(),
                                    format!(
                                        "port {} is held by the running listener {old}; moving a listener to another address on the same port needs a restart (restart exorelay)",
                                        lc.address.port()
                                    ),
                                ),
                            }
                        }
                        _ => ReloadError::Bind {
                            file: file.clone(),
                            address: lc.address,
                            source,
                        },
                    }
                })?;
                sockets.push(Some(socket));
            } else {
                sockets.push(None);
            }
        }
        // New and changed accounts must have an upstream, or the reload is refused. Unchanged
        // ones get one too where it can be built (the forwarder gives it to a paused account,
        // whose old upstream remembers its failure); where it cannot, they keep theirs, and
        // their trouble does not block the reload.
        let mut upstreams = std::collections::HashMap::new();
        for a in &new.accounts {
            match forward::upstream_for(&new, &a.name, &self.metrics) {
                Ok(upstream) => {
                    upstreams.insert(a.name.clone(), upstream);
                }
                Err(source) if plan.rebuilt_accounts.contains(&a.name) => {
                    return Err(ReloadError::Account {
                        file: file.clone(),
                        source,
                    });
                }
                Err(_) => {}
            }
        }
        let inbound = self.inbound.prepare(new.clone());
        let http = self.http.as_ref().map(|_| HttpSettings::new(new.clone()));

        // Apply. The forwarder first: it is the one part that can still say no (shutting down).
        let reconfigure = forward::Reconfigure {
            config: new.clone(),
            upstreams,
            changed: plan.rebuilt_accounts.clone(),
        };
        match self
            .control
            .send(forward::Command::Reconfigure(reconfigure))
            .await
        {
            Ok(_) => {}
            Err(ControlError::Stopped) => return Err(ReloadError::Stopped),
            Err(e) => warn!(error = %e, "the forwarder did not take the new configuration"),
        }
        self.inbound.apply(inbound);
        if let (Some(live), Some(settings)) = (&self.http, http) {
            live.set(Arc::new(settings));
        }
        let mut old: Vec<Option<Running>> = current.listeners.drain(..).map(Some).collect();
        for i in &plan.removed_listeners {
            if let Some(running) = old.get_mut(*i).and_then(Option::take) {
                running.stop.cancel();
            }
        }
        let mut listeners = Vec::new();
        for ((p, endpoint), socket) in plan.listeners.iter().zip(endpoints).zip(sockets) {
            match (p, socket) {
                (ListenerPlan::Keep(i), _) => {
                    if let Some(running) = old.get_mut(*i).and_then(Option::take) {
                        running.endpoint.set(Arc::new(endpoint));
                        listeners.push(running);
                    }
                }
                (ListenerPlan::Bind, Some(socket)) => {
                    listeners.push(self.spawn_listener(socket, endpoint));
                }
                (ListenerPlan::Bind, None) => {}
            }
        }
        current.listeners = listeners;
        if plan.lifecycle {
            current.lifecycle.cancel();
            current.lifecycle = self.spawn_lifecycle(new.clone());
        }
        current.config = new;
        let mut changes = plan.changes;
        if changes.is_empty() {
            changes.push(
                "no setting changed; certificates and the admin token were read again".into(),
            );
        }
        Ok(Reloaded { changes })
    }

    fn needs_restart(&self, r: NeedsRestart) -> ReloadError {
        let text = std::fs::read_to_string(&self.path).unwrap_or_default();
        ReloadError::NeedsRestart(ConfigError {
            file: self.path.clone(),
            line: line_of(&text, r.field),
            field: Some(r.field.to_string()),
            message: format!(
                "cannot be changed while the relay runs; restart exorelay to change {}",
                r.field
            ),
        })
    }

    /// The config file this relay reloads.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Reloads on every SIGHUP until `shutdown` (`systemctl reload` and `kill -HUP` send it).
/// The SIGHUP handler, installed at once: until it is, SIGHUP's default action ends the
/// process (and systemd counts that as a clean stop, so it would not restart it). Call it
/// before anything slow, such as the spool's recovery.
pub fn sighup() -> Option<tokio::signal::unix::Signal> {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            warn!(error = %e, "cannot install the SIGHUP handler; reload with `exorelay reload` instead");
            None
        }
    }
}

pub async fn on_sighup(
    hup: Option<tokio::signal::unix::Signal>,
    reloader: Arc<Reloader>,
    shutdown: CancellationToken,
) {
    let Some(mut hup) = hup else {
        return;
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = hup.recv() => {
                if r.is_none() {
                    return;
                }
                info!("SIGHUP received: reloading the configuration");
                let _ = reloader.reload().await;
            }
        }
    }
}

#[cfg(test)]
mod tests;

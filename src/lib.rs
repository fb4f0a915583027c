//! exorelay: an SMTP relay that lets devices which only speak plain SMTP send mail through
//! Exchange Online. Data flows one way: smtp → spool → forward → upstream.

pub mod admin;
pub mod advice;
pub mod client;
pub mod config;
pub mod diagnose;
pub mod forward;
pub mod http;
pub mod lifecycle;
pub mod metrics;
pub mod oauth;
pub mod reload;
pub mod smtp;
pub mod spool;
pub mod submission;
pub mod tls;
pub mod upstream;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use config::Config;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot listen on {address}: {source}")]
    Bind {
        address: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot open the spool at {dir}: {source}")]
    Spool { dir: String, source: std::io::Error },
    /// Another process has the spool open (exit status 1, and the message names its PID).
    #[error("cannot start: the spool {0}")]
    SpoolLocked(spool::Locked),
    #[error("listener {0}: {1}")]
    Tls(std::net::SocketAddr, tls::TlsError),
    #[error(transparent)]
    Forwarder(#[from] forward::ForwarderError),
    #[error("{0} listeners were bound but the config has {1}")]
    ListenerCount(usize, usize),
}

/// The relay's bound sockets: one per `[[listener]]` (same order) and the HTTP side's.
pub struct Listeners {
    pub smtp: Vec<TcpListener>,
    pub http: Option<TcpListener>,
}

/// Binds every configured listener (separate from [`run`] so tests can bind port 0).
pub async fn bind_listeners(config: &Config) -> Result<Listeners, RunError> {
    let mut smtp = Vec::new();
    for l in &config.listeners {
        let socket = TcpListener::bind(l.address)
            .await
            .map_err(|source| RunError::Bind {
                address: l.address,
                source,
            })?;
        smtp.push(socket);
    }
    let http = match config.http.listen {
        Some(address) => Some(
            TcpListener::bind(address)
                .await
                .map_err(|source| RunError::Bind { address, source })?,
        ),
        None => None,
    };
    Ok(Listeners { smtp, http })
}

/// Runs the relay on already-bound `listeners` (one per `config.listeners`, same order) until
/// `shutdown` is cancelled; then stops accepting, lets sessions finish within
/// `relay.shutdown_grace` and returns. Queued mail stays in the spool. SIGHUP and
/// `POST /api/v1/reload` reload `config.source` meanwhile (see [`reload`]).
pub async fn run(
    config: Arc<Config>,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    tls::install_provider();
    let hup = reload::sighup();
    let Listeners {
        smtp: listeners,
        http: http_listener,
    } = listeners;
    if listeners.len() != config.listeners.len() {
        return Err(RunError::ListenerCount(
            listeners.len(),
            config.listeners.len(),
        ));
    }
    let (spool, recovered) = spool::Spool::open(&config.queue.dir, config.queue.max_messages)
        .map_err(|e| match e {
            spool::OpenError::Locked(locked) => RunError::SpoolLocked(locked),
            spool::OpenError::Io(source) => RunError::Spool {
                dir: config.queue.dir.display().to_string(),
                source,
            },
        })?;
    info!(
        spool = %config.queue.dir.display(),
        queued = recovered.messages.len(),
        removed_unacknowledged = recovered.removed,
        quarantined = recovered.quarantined,
        "spool recovered"
    );
    let spool = Arc::new(spool);
    // The spool's lock is ours now, so no other relay writes the state folder either.
    oauth::store::remove_stale_temps(&config.state_dir());
    let metrics = Arc::new(metrics::Metrics::new());
    metrics.spool_corrupt.inc_by(recovered.quarantined as u64);
    let forwarder = forward::Forwarder::new(config.clone(), spool.clone(), metrics.clone())?;
    let inbound = Arc::new(smtp::listener::Inbound::new(
        config.clone(),
        spool.clone(),
        metrics.clone(),
    ));

    let sessions = TaskTracker::new();
    let deliveries = TaskTracker::new();
    let background = TaskTracker::new();
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let http_live = http_listener
        .as_ref()
        .map(|_| Arc::new(reload::Live::new(http::HttpSettings::new(config.clone()))));
    // The SMTP accept loops, the credential-expiry watcher and every later reload.
    let reloader = Arc::new(
        reload::Reloader::start(
            config.clone(),
            listeners,
            reload::Parts {
                inbound,
                http: http_live.clone(),
                control: forwarder.control(),
                metrics: metrics.clone(),
                spool: spool.clone(),
                status: forwarder.status(),
                shutdown: shutdown.clone(),
                sessions: sessions.clone(),
                background: background.clone(),
            },
        )
        .map_err(|(address, e)| RunError::Tls(address, e))?,
    );
    metrics.config_loaded();
    tokio::spawn(reload::on_sighup(hup, reloader.clone(), shutdown.clone()));
    let http_task = http_listener.zip(http_live).map(|(l, live)| {
        let state = Arc::new(http::AppState::new(
            live,
            spool.clone(),
            metrics.clone(),
            forwarder.status(),
            forwarder.control(),
            ready.clone(),
            Some(reloader.clone()),
        ));
        info!(address = %l.local_addr().map(|a| a.to_string()).unwrap_or_default(), "HTTP side listening");
        let token = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = http::serve(l, state, token).await {
                tracing::error!(error = %e, "HTTP side stopped");
            }
        })
    });
    let forwarder_task =
        tokio::spawn(forwarder.run(recovered.messages, shutdown.clone(), deliveries.clone()));
    ready.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);

    shutdown.cancelled().await;
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    info!(
        "shutting down: no new connections; sessions get {:?} to finish",
        config.relay.shutdown_grace
    );
    sessions.close();
    deliveries.close();
    background.close();
    let _ = forwarder_task.await;
    background.wait().await;
    if let Some(t) = http_task {
        let _ = t.await;
    }
    let limit = config.relay.shutdown_grace + Duration::from_secs(5);
    if tokio::time::timeout(limit, async {
        sessions.wait().await;
        deliveries.wait().await;
    })
    .await
    .is_err()
    {
        warn!("some sessions or deliveries did not finish in time; their mail stays queued");
    }
    info!(queued = spool.len(), "stopped");
    Ok(())
}

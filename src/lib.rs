//! exorelay: an SMTP relay that lets devices which only speak plain SMTP send mail through
//! Exchange Online. Data flows one way: smtp → spool → forward → upstream.

pub mod advice;
pub mod config;
pub mod diagnose;
pub mod forward;
pub mod metrics;
pub mod oauth;
pub mod smtp;
pub mod spool;
pub mod tls;
pub mod upstream;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use config::{Config, TlsMode};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot listen on {address}: {source}")]
    Bind {
        address: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot open the spool at {dir}: {source}")]
    Spool { dir: String, source: std::io::Error },
    #[error("listener {0}: {1}")]
    Tls(std::net::SocketAddr, tls::TlsError),
    #[error(transparent)]
    Forwarder(#[from] forward::ForwarderError),
    #[error("{0} listeners were bound but the config has {1}")]
    ListenerCount(usize, usize),
}

/// Binds every configured listener (separate from [`run`] so tests can bind port 0).
pub async fn bind_listeners(config: &Config) -> Result<Vec<TcpListener>, RunError> {
    let mut out = Vec::new();
    for l in &config.listeners {
        let socket = TcpListener::bind(l.address)
            .await
            .map_err(|source| RunError::Bind {
                address: l.address,
                source,
            })?;
        out.push(socket);
    }
    Ok(out)
}

/// Runs the relay on already-bound `listeners` (one per `config.listeners`, same order) until
/// `shutdown` is cancelled; then stops accepting, lets sessions finish within
/// `relay.shutdown_grace` and returns. Queued mail stays in the spool.
pub async fn run(
    config: Arc<Config>,
    listeners: Vec<TcpListener>,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    tls::install_provider();
    if listeners.len() != config.listeners.len() {
        return Err(RunError::ListenerCount(
            listeners.len(),
            config.listeners.len(),
        ));
    }
    let (spool, recovered) = spool::Spool::open(&config.queue.dir, config.queue.max_messages)
        .map_err(|source| RunError::Spool {
            dir: config.queue.dir.display().to_string(),
            source,
        })?;
    info!(
        spool = %config.queue.dir.display(),
        queued = recovered.messages.len(),
        removed_incomplete = recovered.removed,
        quarantined = recovered.quarantined,
        "spool recovered"
    );
    let spool = Arc::new(spool);
    let metrics = Arc::new(metrics::Metrics::new());
    let forwarder = forward::Forwarder::new(config.clone(), spool.clone(), metrics.clone())?;
    let inbound = Arc::new(smtp::listener::Inbound::new(
        config.clone(),
        spool.clone(),
        metrics.clone(),
    ));

    let sessions = TaskTracker::new();
    let deliveries = TaskTracker::new();
    for (socket, lc) in listeners.into_iter().zip(config.listeners.iter()) {
        let acceptor = match lc.tls {
            TlsMode::None => None,
            _ => Some(TlsAcceptor::from(
                tls::load_server_config(lc).map_err(|e| RunError::Tls(lc.address, e))?,
            )),
        };
        info!(address = %socket.local_addr().map(|a| a.to_string()).unwrap_or_default(), tls = ?lc.tls, auth = ?lc.auth, "listening");
        sessions.spawn(smtp::listener::serve(
            socket,
            lc.clone(),
            acceptor,
            inbound.clone(),
            shutdown.clone(),
            sessions.clone(),
        ));
    }
    let forwarder_task =
        tokio::spawn(forwarder.run(recovered.messages, shutdown.clone(), deliveries.clone()));
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);

    shutdown.cancelled().await;
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    info!(
        "shutting down: no new connections; sessions get {:?} to finish",
        config.relay.shutdown_grace
    );
    sessions.close();
    deliveries.close();
    let _ = forwarder_task.await;
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

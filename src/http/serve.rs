//! The HTTP side's accept loop and connections, driven with hyper directly so every limit has a
//! number (all from `[http]`):
//! - `max_connections` open at once, `max_connections_per_client` from one address. A
//!   connection over either limit is closed as soon as it is accepted, so it holds no file
//!   descriptor and one noisy client cannot take the slots other clients (monitoring probing
//!   `/healthz`) need.
//! - `header_timeout` for the TLS handshake, for each request's headers and for the idle time
//!   of a kept-alive connection (hyper's header read timer starts when it waits for a request).
//! - `request_timeout` for reading a body and answering (see `super::request_timeout`).
//!
//! TLS handshakes run in each connection's own task, never in the accept loop, so silent
//! clients delay nobody. At shutdown the loop stops accepting, each connection finishes the
//! request in hand (at most `request_timeout` more) and is closed.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};

use crate::client::ClientKey;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use super::Peer;

/// The numbers the loop enforces.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub max_connections_per_client: usize,
    pub header_timeout: Duration,
    pub request_timeout: Duration,
}

impl Limits {
    pub fn from_config(c: &crate::config::HttpConfig) -> Limits {
        Limits {
            max_connections: c.max_connections,
            max_connections_per_client: c.max_connections_per_client,
            header_timeout: c.header_timeout,
            request_timeout: c.request_timeout,
        }
    }
}

#[derive(Default)]
struct Counts {
    total: usize,
    /// Per client as SMTP counts them: an IPv4 address, an IPv6 /64.
    per_client: HashMap<ClientKey, usize>,
}

/// Open connections, in total and per client address.
pub struct Slots {
    limits: Limits,
    counts: Mutex<Counts>,
}

/// A connection's place within the limits; given back when dropped.
pub struct Slot {
    slots: Arc<Slots>,
    client: ClientKey,
}

impl Slots {
    pub fn new(limits: Limits) -> Arc<Slots> {
        Arc::new(Slots {
            limits,
            counts: Mutex::new(Counts::default()),
        })
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A slot for a connection from `ip`, or `None` when a limit is reached.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let client = ClientKey::of(ip);
        let mut c = self.counts();
        let mine = c.per_client.get(&client).copied().unwrap_or(0);
        if c.total >= self.limits.max_connections || mine >= self.limits.max_connections_per_client
        {
            return None;
        }
        c.total += 1;
        c.per_client.insert(client, mine + 1);
        Some(Slot {
            slots: self.clone(),
            client,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.slots.counts();
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_client.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                c.per_client.remove(&self.client);
            }
        }
    }
}

/// Accepts connections on `listener` and serves `router` on each until `shutdown`.
pub async fn run(
    listener: TcpListener,
    router: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let slots = Slots::new(limits);
    let connections = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        let (tcp, addr) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors, most likely: wait for some to be given back.
                tracing::warn!(error = %e, "http accept failed");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
        };
        let Some(slot) = slots.admit(addr.ip()) else {
            tracing::debug!(client = %addr, "http connection refused: connection limit reached");
            drop(tcp);
            continue;
        };
        connections.spawn(connection(
            tcp,
            addr,
            slot,
            router.clone(),
            tls.clone(),
            limits,
            shutdown.clone(),
        ));
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

async fn connection(
    tcp: tokio::net::TcpStream,
    addr: SocketAddr,
    _slot: Slot,
    router: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let _ = tcp.set_nodelay(true);
    match tls {
        None => serve_connection(TokioIo::new(tcp), addr, router, limits, shutdown).await,
        Some(acceptor) => {
            let handshake = tokio::time::timeout(limits.header_timeout, acceptor.accept(tcp));
            let stream = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = handshake => r,
            };
            match stream {
                Ok(Ok(s)) => {
                    serve_connection(TokioIo::new(s), addr, router, limits, shutdown).await
                }
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, client = %addr, "http TLS handshake failed")
                }
                Err(_) => tracing::debug!(client = %addr, "http TLS handshake timed out"),
            }
        }
    }
}

async fn serve_connection<I>(
    io: I,
    addr: SocketAddr,
    router: Router,
    limits: Limits,
    shutdown: CancellationToken,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(Peer(addr)));
        let router = router.clone();
        async move { Ok::<_, Infallible>(router.oneshot(req).await.unwrap_or_else(|e| match e {})) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            match tokio::time::timeout(limits.request_timeout, conn.as_mut()).await {
                Ok(r) => r,
                Err(_) => return,
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, client = %addr, "http connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(total: usize, per_client: usize) -> Limits {
        Limits {
            max_connections: total,
            max_connections_per_client: per_client,
            header_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn per_client_and_total_limits() {
        let slots = Slots::new(limits(3, 2));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let c: IpAddr = "192.0.2.3".parse().unwrap();
        let a1 = slots.admit(a).unwrap();
        let _a2 = slots.admit(a).unwrap();
        assert!(slots.admit(a).is_none(), "a is at its own limit");
        let _b1 = slots.admit(b).unwrap();
        assert!(slots.admit(c).is_none(), "total limit");
        drop(a1);
        let _c1 = slots.admit(c).expect("a closed one, so c may come in");
        assert_eq!(slots.counts().total, 3);
    }

    #[test]
    fn an_ipv6_slash_64_is_one_client() {
        let slots = Slots::new(limits(10, 2));
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2::ffff".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        let _a = slots.admit(a).unwrap();
        let _b = slots.admit(b).unwrap();
        assert!(
            slots.admit("2001:db8:1:2::7".parse().unwrap()).is_none(),
            "a third address from the same /64 is the same client"
        );
        assert!(slots.admit(other).is_some());
    }

    #[test]
    fn slots_are_given_back() {
        let slots = Slots::new(limits(1, 1));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..3 {
            let s = slots.admit(a).unwrap();
            drop(s);
        }
        assert!(slots.counts().per_client.is_empty());
    }
}

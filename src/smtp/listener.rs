//! The async driver around [`Session`]: accept loop, connection budgets (see [`super::limits`]),
//! TLS (STARTTLS and implicit), timeouts, spool I/O and graceful shutdown with `421 4.3.0`.
//!
//! Clients outside `allowed_networks` that have not logged in wait at most
//! `untrusted_command_timeout` (never longer than `command_timeout`) for each command and TLS
//! handshake; after a successful AUTH they get the normal timeouts and budget.
//!
//! Reload (see `crate::reload`): each session takes a snapshot of the relay's settings
//! ([`InboundSettings`]) and of its listener's ([`Endpoint`]) when it is accepted and keeps them
//! to its end; a reload only changes what later connections get. A listener's accept loop stops
//! when its own `stop` token is cancelled (the listener was removed from the config); its open
//! sessions go on until they end or the relay shuts down.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info, warn};

use super::auth::{AuthGuard, Users, Verdict};
use super::client::canonical_ip;
use super::limits::{Admission, Limits};
use super::reply;
use super::session::{AuthOutcome, Session, SessionParams, Step};
use crate::config::{Config, ListenerConfig, TlsMode};
use crate::reload::Live;
use crate::spool::{MessageWriter, Spool};

const READ_BUFFER: usize = 64 * 1024;

/// State shared by every listener and session; the settings part is replaced by a reload.
pub struct Inbound {
    pub spool: Arc<Spool>,
    pub metrics: Arc<crate::metrics::Metrics>,
    settings: Live<InboundSettings>,
}

/// What a session is accepted and run under: the config and what is derived from it. Budgets
/// and login failures are kept across reloads unless their own settings change (a connection
/// counts against the budget it was admitted under).
pub struct InboundSettings {
    pub config: Arc<Config>,
    pub users: Arc<Users>,
    pub guard: Arc<AuthGuard>,
    pub limits: Arc<Limits>,
}

impl Inbound {
    pub fn new(
        config: Arc<Config>,
        spool: Arc<Spool>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Inbound {
        let settings = InboundSettings {
            users: Arc::new(Users::new(&config.users)),
            guard: Arc::new(AuthGuard::new(
                config.relay.max_auth_failures,
                config.relay.auth_ban_time,
            )),
            limits: Limits::new(&config.relay),
            config,
        };
        Inbound {
            metrics,
            spool,
            settings: Live::new(settings),
        }
    }

    /// The settings new connections get now.
    pub fn settings(&self) -> Arc<InboundSettings> {
        self.settings.get()
    }

    /// The settings for `config`, reusing the current users, login-failure record and budgets
    /// where their part of the config did not change. Nothing changes until [`Inbound::apply`].
    pub fn prepare(&self, config: Arc<Config>) -> InboundSettings {
        let old = self.settings.get();
        let same =
            |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") == format!("{b:?}");
        let (o, n) = (&old.config.relay, &config.relay);
        InboundSettings {
            users: if same(&old.config.users, &config.users) {
                old.users.clone()
            } else {
                Arc::new(Users::new(&config.users))
            },
            guard: if (o.max_auth_failures, o.auth_ban_time)
                == (n.max_auth_failures, n.auth_ban_time)
            {
                old.guard.clone()
            } else {
                Arc::new(AuthGuard::new(n.max_auth_failures, n.auth_ban_time))
            },
            limits: if (
                o.max_connections,
                o.max_connections_per_client,
                o.untrusted_max_connections,
                o.untrusted_max_connections_per_client,
            ) == (
                n.max_connections,
                n.max_connections_per_client,
                n.untrusted_max_connections,
                n.untrusted_max_connections_per_client,
            ) {
                old.limits.clone()
            } else {
                Limits::new(n)
            },
            config,
        }
    }

    /// Puts prepared settings in force for connections accepted from now on.
    pub fn apply(&self, settings: InboundSettings) {
        self.settings.set(Arc::new(settings));
    }
}

impl InboundSettings {
    fn network_allowed(&self, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        self.config
            .relay
            .allowed_networks
            .iter()
            .any(|n| n.contains(&ip))
    }

    /// Checks a login. The attempt is counted before argon2 runs (see [`AuthGuard::reserve`]),
    /// so refused attempts cost nothing and parallel guesses cannot overshoot the limit.
    async fn authenticate(
        &self,
        metrics: &crate::metrics::Metrics,
        ip: IpAddr,
        user: &str,
        password: &str,
    ) -> AuthOutcome {
        let attempt = match self.guard.reserve(ip) {
            Ok(a) => a,
            Err(why) => {
                warn!(client = %ip, reason = %why, "AUTH refused without checking the password");
                return AuthOutcome::Banned;
            }
        };
        let ok = self.users.verify(user, password).await;
        match attempt.settle(ok) {
            Verdict::Success => {
                info!(client = %ip, user = %user.escape_debug(), "AUTH succeeded");
                AuthOutcome::Success
            }
            Verdict::Failure { banned } => {
                metrics.smtp_auth_failures.inc();
                warn!(client = %ip, user = %user.escape_debug(), banned, "AUTH failed");
                tokio::time::sleep(self.config.relay.auth_failure_delay).await;
                if banned {
                    AuthOutcome::Banned
                } else {
                    AuthOutcome::Failure
                }
            }
        }
    }
}

/// One listener's own settings: its config entry and TLS acceptor (certificate read when the
/// endpoint is built, so a reload picks up a renewed certificate).
pub struct Endpoint {
    pub lc: ListenerConfig,
    pub tls: Option<TlsAcceptor>,
}

impl Endpoint {
    /// Reads the listener's certificate and key, if it uses TLS.
    pub fn new(lc: &ListenerConfig) -> Result<Endpoint, crate::tls::TlsError> {
        let tls = match lc.tls {
            TlsMode::None => None,
            _ => Some(TlsAcceptor::from(crate::tls::load_server_config(lc)?)),
        };
        Ok(Endpoint {
            lc: lc.clone(),
            tls,
        })
    }
}

/// Serves one listener until `stop` (this listener only) or `shutdown` (the relay) is
/// cancelled. Sessions are tracked by `tracker` and watch `shutdown` only: stopping a listener
/// never cuts a session short.
pub async fn serve(
    listener: TcpListener,
    endpoint: Arc<Live<Endpoint>>,
    inbound: Arc<Inbound>,
    stop: CancellationToken,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let local = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = stop.cancelled() => {
                info!(listener = %local, "listener removed from the config: no longer accepting");
                break;
            }
            r = listener.accept() => r,
        };
        let (tcp, peer) = match accepted {
            Ok(x) => {
                backoff = Duration::from_millis(10);
                x
            }
            Err(e) => {
                // Usually EMFILE: wait instead of spinning.
                warn!(error = %e, "accept failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let span = tracing::info_span!("smtp", client = %peer, listener = %local);
        // The session's settings for its whole life, however many reloads come.
        let (settings, endpoint) = (inbound.settings(), endpoint.get());
        let network_allowed = settings.network_allowed(peer.ip());
        let admission = match settings.limits.admit(peer.ip(), network_allowed) {
            Ok(a) => a,
            Err(refusal) => {
                warn!(parent: &span, reason = refusal.reason(), "connection refused");
                tracker.spawn(refuse(tcp, refusal.reply()));
                continue;
            }
        };
        let config = &settings.config;
        let params = Arc::new(SessionParams {
            hostname: config.hostname.clone(),
            starttls: endpoint.lc.tls == TlsMode::Starttls,
            auth: endpoint.lc.auth,
            plaintext_auth: endpoint.lc.plaintext_auth,
            max_message_size: config.relay.max_message_size,
            max_recipients: config.relay.max_recipients,
            max_errors: config.relay.max_errors,
        });
        let (inbound, shutdown) = (inbound.clone(), shutdown.clone());
        inbound.metrics.smtp_sessions.inc();
        tracker.spawn(
            async move {
                inbound.metrics.smtp_active_sessions.inc();
                let metrics = inbound.metrics.clone();
                let accepted = Accepted {
                    tcp,
                    peer,
                    admission,
                };
                let run = Run {
                    settings,
                    endpoint,
                    params,
                };
                connection(accepted, run, inbound, shutdown).await;
                metrics.smtp_active_sessions.dec();
            }
            .instrument(span),
        );
    }
}

/// What one session runs under (fixed when it is accepted).
struct Run {
    settings: Arc<InboundSettings>,
    endpoint: Arc<Endpoint>,
    params: Arc<SessionParams>,
}

async fn refuse(mut tcp: TcpStream, r: reply::Reply) {
    let mut out = Vec::new();
    r.write_to(&mut out);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = tcp.write_all(&out).await;
        let _ = tcp.shutdown().await;
    })
    .await;
}

enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Resolves when the session should be cut off for shutdown: at once when it is idle, at the
/// end of the grace time when it is mid-transaction.
async fn shutdown_due(
    token: &CancellationToken,
    deadline: &mut Option<Instant>,
    grace: Duration,
    busy: bool,
) {
    let due = match *deadline {
        Some(d) => d,
        None => {
            token.cancelled().await;
            *deadline.insert(Instant::now() + grace)
        }
    };
    if busy {
        tokio::time::sleep_until(due).await;
    }
}

async fn flush(conn: &mut Conn, session: &mut Session, limit: Duration) -> io::Result<()> {
    let out = session.outbox();
    if out.is_empty() {
        return Ok(());
    }
    let res = tokio::time::timeout(limit, async {
        conn.write_all(out).await?;
        conn.flush().await
    })
    .await;
    out.clear();
    match res {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "write timed out")),
    }
}

/// A connection that passed the budgets; it holds its slots until it is dropped.
struct Accepted {
    tcp: TcpStream,
    peer: SocketAddr,
    admission: Admission,
}

async fn connection(
    accepted: Accepted,
    run: Run,
    inbound: Arc<Inbound>,
    shutdown: CancellationToken,
) {
    let Accepted {
        tcp,
        peer,
        mut admission,
    } = accepted;
    let Run {
        settings,
        endpoint,
        params,
    } = run;
    let (mode, tls) = (endpoint.lc.tls, endpoint.tls.as_ref());
    let relay = &settings.config.relay;
    // The budget a stranger gets until it logs in; `admission` knows which it is.
    let command_timeout = |a: &Admission| {
        if a.is_stranger() {
            relay.untrusted_command_timeout.min(relay.command_timeout)
        } else {
            relay.command_timeout
        }
    };
    // A stranger must also have logged in within that time of connecting: NOOPs every few
    // seconds would otherwise keep its slot in the stranger budget for ever.
    let login_by = Instant::now() + relay.untrusted_command_timeout.min(relay.command_timeout);
    let ip = canonical_ip(peer.ip());
    let network_allowed = !admission.is_stranger();
    if !network_allowed && settings.guard.is_banned(ip) {
        info!("connection refused: address is temporarily banned after failed logins");
        return refuse(tcp, reply::banned()).await;
    }
    let mut conn = match (mode, tls) {
        (TlsMode::Implicit, Some(acceptor)) => {
            match tokio::time::timeout(command_timeout(&admission), acceptor.accept(tcp)).await {
                Ok(Ok(s)) => Conn::Tls(Box::new(s)),
                Ok(Err(e)) => return info!(error = %e, "TLS handshake failed"),
                Err(_) => return info!("TLS handshake timed out"),
            }
        }
        _ => Conn::Plain(tcp),
    };
    let mut session = Session::new(
        params.clone(),
        ip,
        network_allowed,
        matches!(conn, Conn::Tls(_)),
    );
    let mut buf = vec![0u8; READ_BUFFER];
    let (mut start, mut end) = (0usize, 0usize);
    let mut writer: Option<MessageWriter> = None;
    let mut deadline: Option<Instant> = None;

    loop {
        let mut input = &buf[start..end];
        let step = session.advance(&mut input);
        start = end - input.len();
        match step {
            Step::Read => {
                if flush(&mut conn, &mut session, command_timeout(&admission))
                    .await
                    .is_err()
                {
                    break;
                }
                if start < end {
                    // The session is waiting on us; should not happen, but never spin.
                    warn!("session stalled with unread input; closing");
                    break;
                }
                let mut limit = if session.in_data() {
                    relay.data_timeout
                } else {
                    command_timeout(&admission)
                };
                if admission.is_stranger() {
                    limit = limit.min(login_by.saturating_duration_since(Instant::now()));
                }
                let busy = session.busy();
                tokio::select! {
                    r = tokio::time::timeout(limit, conn.read(&mut buf)) => match r {
                        Ok(Ok(0)) => {
                            if session.busy() {
                                info!("client disconnected mid-transaction; nothing was queued");
                            }
                            break;
                        }
                        Ok(Ok(n)) => {
                            start = 0;
                            end = n;
                        }
                        Ok(Err(e)) => {
                            info!(error = %e, "read error");
                            break;
                        }
                        Err(_) => {
                            info!(in_data = session.in_data(), "client timed out");
                            session.close_with(reply::timeout(&params.hostname));
                        }
                    },
                    _ = shutdown_due(&shutdown, &mut deadline, relay.shutdown_grace, busy) => {
                        session.close_with(reply::shutting_down(&params.hostname));
                    }
                }
            }
            Step::Authenticate(creds) => {
                let outcome = settings
                    .authenticate(&inbound.metrics, ip, &creds.user, &creds.password)
                    .await;
                if outcome == AuthOutcome::Success {
                    admission.logged_in();
                }
                session.auth_result(&creds.user, outcome);
            }
            Step::OpenMessage => match inbound.spool.create().await {
                Ok(w) => {
                    session.message_opened(Ok(w.id().to_string()));
                    writer = Some(w);
                }
                Err(e) => {
                    warn!(error = %e, "cannot accept message: spool refused it");
                    session.message_opened(Err(&e));
                }
            },
            Step::Body => {
                let result = match writer.as_mut() {
                    Some(w) => w.write(session.body()).await,
                    None => Ok(()),
                };
                if let Err(e) = &result {
                    warn!(error = %e, "spool write failed; message will be refused");
                }
                session.body_written(result.as_ref().map(|_| ()));
            }
            Step::Commit {
                submission,
                bare_line_endings,
            } => {
                let Some(w) = writer.take() else {
                    session.committed(Err(&crate::spool::SpoolError::Io(io::Error::other(
                        "no message open",
                    ))));
                    continue;
                };
                let account = &settings
                    .config
                    .account_for(submission.client.login.as_deref())
                    .name;
                let meta = submission.meta(account);
                let (from, rcpts) = (meta.mail_from.clone(), meta.recipients.len());
                match w.commit(&inbound.spool, meta).await {
                    Ok(id) => {
                        info!(queue_id = %id, from = %from.escape_debug(), recipients = rcpts, login = ?submission.client.login,
                              tls = submission.client.tls, bare_line_endings, "message queued");
                        session.committed(Ok(&id));
                    }
                    Err(e) => {
                        warn!(error = %e, "spool commit failed; client told to retry");
                        session.committed(Err(&e));
                    }
                }
            }
            Step::AbortMessage => {
                inbound.metrics.smtp_rejected.inc();
                if let Some(w) = writer.take() {
                    info!(queue_id = %w.id(), size = w.written(), "message refused; partial data discarded");
                    w.abort().await;
                }
            }
            Step::StartTls => {
                if flush(&mut conn, &mut session, command_timeout(&admission))
                    .await
                    .is_err()
                {
                    break;
                }
                // Anything the client sent after STARTTLS, before the handshake, is dropped
                // here: it must not be read as if it had come through TLS (CVE-2011-0411).
                start = 0;
                end = 0;
                let (Conn::Plain(tcp), Some(acceptor)) = (conn, tls) else {
                    break;
                };
                match tokio::time::timeout(command_timeout(&admission), acceptor.accept(tcp)).await
                {
                    Ok(Ok(s)) => {
                        conn = Conn::Tls(Box::new(s));
                        session.tls_started();
                    }
                    Ok(Err(e)) => {
                        info!(error = %e, "STARTTLS handshake failed");
                        break;
                    }
                    Err(_) => {
                        info!("STARTTLS handshake timed out");
                        break;
                    }
                }
            }
            Step::Close => {
                let _ = flush(&mut conn, &mut session, command_timeout(&admission)).await;
                let _ = tokio::time::timeout(Duration::from_secs(5), conn.shutdown()).await;
                break;
            }
        }
    }
    if let Some(w) = writer.take() {
        w.abort().await;
    }
}

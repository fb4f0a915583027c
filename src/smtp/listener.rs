//! The async driver around [`Session`]: accept loop, connection budgets (see [`super::limits`]),
//! TLS (STARTTLS and implicit), timeouts, spool I/O and graceful shutdown with `421 4.3.0`.
//!
//! Clients outside `allowed_networks` that have not logged in wait at most
//! `untrusted_command_timeout` (never longer than `command_timeout`) for each command and TLS
//! handshake; after a successful AUTH they get the normal timeouts and budget.

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
use crate::spool::{MessageWriter, Spool};

const READ_BUFFER: usize = 64 * 1024;

/// State shared by every listener and session.
pub struct Inbound {
    pub config: Arc<Config>,
    pub spool: Arc<Spool>,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub users: Users,
    pub guard: AuthGuard,
    pub limits: Arc<Limits>,
}

impl Inbound {
    pub fn new(
        config: Arc<Config>,
        spool: Arc<Spool>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Inbound {
        Inbound {
            metrics,
            users: Users::new(&config.users),
            guard: AuthGuard::new(config.relay.max_auth_failures, config.relay.auth_ban_time),
            limits: Limits::new(&config.relay),
            config,
            spool,
        }
    }

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
    async fn authenticate(&self, ip: IpAddr, user: &str, password: &str) -> AuthOutcome {
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
                self.metrics.smtp_auth_failures.inc();
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

/// Serves one listener until `shutdown` is cancelled. Sessions are tracked by `tracker`.
pub async fn serve(
    listener: TcpListener,
    lc: ListenerConfig,
    tls: Option<TlsAcceptor>,
    inbound: Arc<Inbound>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let params = Arc::new(SessionParams {
        hostname: inbound.config.hostname.clone(),
        starttls: lc.tls == TlsMode::Starttls,
        auth: lc.auth,
        plaintext_auth: lc.plaintext_auth,
        max_message_size: inbound.config.relay.max_message_size,
        max_recipients: inbound.config.relay.max_recipients,
        max_errors: inbound.config.relay.max_errors,
    });
    let local = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
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
        let network_allowed = inbound.network_allowed(peer.ip());
        let admission = match inbound.limits.admit(peer.ip(), network_allowed) {
            Ok(a) => a,
            Err(refusal) => {
                warn!(parent: &span, reason = refusal.reason(), "connection refused");
                tracker.spawn(refuse(tcp, refusal.reply()));
                continue;
            }
        };
        let (inbound, params, tls, lc_tls, shutdown) = (
            inbound.clone(),
            params.clone(),
            tls.clone(),
            lc.tls,
            shutdown.clone(),
        );
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
                connection(accepted, lc_tls, tls, params, inbound, shutdown).await;
                metrics.smtp_active_sessions.dec();
            }
            .instrument(span),
        );
    }
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
    mode: TlsMode,
    tls: Option<TlsAcceptor>,
    params: Arc<SessionParams>,
    inbound: Arc<Inbound>,
    shutdown: CancellationToken,
) {
    let Accepted {
        tcp,
        peer,
        mut admission,
    } = accepted;
    let relay = &inbound.config.relay;
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
    if !network_allowed && inbound.guard.is_banned(ip) {
        info!("connection refused: address is temporarily banned after failed logins");
        return refuse(tcp, reply::banned()).await;
    }
    let mut conn = match (mode, tls.as_ref()) {
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
                let outcome = inbound.authenticate(ip, &creds.user, &creds.password).await;
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
                let account = &inbound
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
                let (Conn::Plain(tcp), Some(acceptor)) = (conn, tls.as_ref()) else {
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

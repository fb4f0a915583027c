//! The `exchange` account kind: submission to Exchange Online over STARTTLS with AUTH XOAUTH2.
//!
//! lettre is used at connection level (never its `tracing` feature, which logs the bearer
//! token), so each recipient gets its own result. Connections are pooled per account, never more
//! than the forwarder's `max_connections` at once, and not reused once the token they
//! authenticated with has expired. A `535 5.7.3` gets one token refresh and one retry; every
//! other answer is sorted by [`classify`].

pub mod body;
pub mod classify;
pub mod pacer;
pub mod policy;

use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lettre::Address;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{
    AsyncSmtpConnection, Certificate, CertificateStore, TlsParameters,
};
use lettre::transport::smtp::commands::{Data, Ehlo, Mail, Rcpt, Rset};
use lettre::transport::smtp::extension::{ClientId, Extension, MailBodyParameter, MailParameter};
use tracing::{debug, info, warn};

use super::{AccountSignal, Attempt, BoxFuture, Job, Outcome, Upstream};
use crate::advice::Advice;
use crate::config::{AccountConfig, RewriteFrom};
use crate::oauth::{AccessToken, TokenManager};
use classify::{Class, Ctx, Phase, classify, split_lettre_error};
use pacer::Pacer;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// Idle pooled connections older than this are closed rather than reused.
const MAX_IDLE: Duration = Duration::from_secs(60);

struct Pooled {
    conn: AsyncSmtpConnection,
    token: AccessToken,
    idle_since: Instant,
}

pub struct Exchange {
    account: String,
    mailbox: String,
    client_id: String,
    host: String,
    port: u16,
    hello: ClientId,
    hostname: String,
    tls: TlsParameters,
    tokens: Arc<TokenManager>,
    pool: Mutex<Vec<Pooled>>,
    rewrite_from: RewriteFrom,
    pacer: Pacer,
    max_recipients: usize,
    /// How long to back off after a throttle reply: one rate window (a minute for Exchange).
    throttle_wait: Duration,
    /// The server offered PIPELINING (Exchange Online does): MAIL, RCPT and DATA then go out in
    /// one write, two round trips per message instead of four. Learnt at each connect.
    pipelining: std::sync::atomic::AtomicBool,
}

/// Several SMTP commands written at once (RFC 2920); lettre's `command` writes any `Display`.
struct Pipelined(String);

impl std::fmt::Display for Pipelined {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// `outcomes` with every recipient still without one given `fill`.
fn fill_pending(outcomes: Vec<Option<Outcome>>, fill: &Outcome) -> Vec<Outcome> {
    outcomes
        .into_iter()
        .map(|o| o.unwrap_or_else(|| fill.clone()))
        .collect()
}

/// What the envelope phase (MAIL, RCPT, DATA) of a transaction left.
enum Envelope {
    /// DATA was answered 354: send the message; `None` entries are the accepted recipients.
    Send(Vec<Option<Outcome>>),
    /// Finished without sending: the result for the caller.
    Done((Vec<Outcome>, Option<AccountSignal>, bool)),
}

/// Why no usable connection could be had.
enum ConnError {
    /// Connect, TLS handshake or token endpoint failed: Exchange was not reached at all.
    Unreachable(String),
    Temporary(String),
    Class(Class, String),
}

/// Builds rustls parameters for `host`: system roots plus the account's `ca_file`.
pub fn tls_parameters(
    host: &str,
    ca_file: Option<&std::path::Path>,
) -> Result<TlsParameters, String> {
    let mut b =
        TlsParameters::builder(host.to_string()).certificate_store(CertificateStore::Default);
    if let Some(ca) = ca_file {
        let pem =
            std::fs::read(ca).map_err(|e| format!("cannot read ca_file {}: {e}", ca.display()))?;
        b = b.add_root_certificate(
            Certificate::from_pem(&pem)
                .map_err(|e| format!("bad ca_file {}: {e}", ca.display()))?,
        );
    }
    b.build_rustls()
        .map_err(|e| format!("TLS setup for {host}: {e}"))
}

fn timed_out(what: &str) -> String {
    format!("timed out waiting for {what}")
}

impl Exchange {
    pub fn new(
        a: &AccountConfig,
        hostname: &str,
        tokens: Arc<TokenManager>,
    ) -> Result<Exchange, String> {
        let host = a.smtp_host().to_string();
        Ok(Exchange {
            account: a.name.clone(),
            mailbox: a.mailbox.clone().unwrap_or_default(),
            client_id: a.client_id.clone().unwrap_or_default(),
            tls: tls_parameters(&host, a.ca_file.as_deref())?,
            port: a.smtp_port(),
            host,
            hello: ClientId::Domain(hostname.to_string()),
            hostname: hostname.to_string(),
            tokens,
            pool: Mutex::new(Vec::new()),
            rewrite_from: a.rewrite_from,
            pacer: Pacer::new(
                a.max_messages_per_minute,
                a.rate_window,
                a.max_recipients_per_day,
            ),
            max_recipients: a.max_recipients_per_message.max(1),
            throttle_wait: a.rate_window,
            pipelining: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub fn tokens(&self) -> &Arc<TokenManager> {
        &self.tokens
    }

    fn ctx(&self) -> Ctx<'_> {
        Ctx {
            mailbox: &self.mailbox,
            client_id: &self.client_id,
            rewrite_from: self.rewrite_from,
        }
    }

    fn classify_error(&self, phase: Phase, e: &lettre::transport::smtp::Error) -> (Class, String) {
        match split_lettre_error(e) {
            Some((code, text)) => (
                classify(phase, code, &text, &self.ctx()),
                format!("{code} {text}"),
            ),
            None => (Class::Temporary, e.to_string()),
        }
    }

    fn take_pooled(&self) -> Option<Pooled> {
        let mut pool = self.pool.lock().ok()?;
        while let Some(p) = pool.pop() {
            if !p.token.is_expired() && p.idle_since.elapsed() < MAX_IDLE && !p.conn.has_broken() {
                return Some(p);
            }
            debug!(account = %self.account, "closing a stale pooled connection");
            // Dropping closes the socket; a polite QUIT is not worth a round trip here.
        }
        None
    }

    fn put_back(&self, conn: AsyncSmtpConnection, token: AccessToken) {
        if conn.has_broken() {
            return;
        }
        if let Ok(mut pool) = self.pool.lock() {
            pool.push(Pooled {
                conn,
                token,
                idle_since: Instant::now(),
            });
        }
    }

    /// Connects, STARTTLS (required), and authenticates with XOAUTH2.
    pub async fn connect(&self) -> Result<(AsyncSmtpConnection, AccessToken), ConnErrorPublic> {
        self.open(true).await.map_err(ConnErrorPublic)
    }

    async fn open(
        &self,
        may_refresh: bool,
    ) -> Result<(AsyncSmtpConnection, AccessToken), ConnError> {
        let addr = format!("{}:{}", self.host, self.port);
        // Our own socket, so Nagle's algorithm can be turned off: lettre writes the message and
        // its terminating dot separately, and with Nagle each message would wait a delayed ACK.
        let tcp = match tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio::net::TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                return Err(ConnError::Unreachable(format!(
                    "cannot connect to {addr}: {e}"
                )));
            }
            Err(_) => {
                return Err(ConnError::Unreachable(format!(
                    "cannot connect to {addr}: {}",
                    timed_out("the connection")
                )));
            }
        };
        let _ = tcp.set_nodelay(true);
        let greeting = AsyncSmtpConnection::connect_with_transport(Box::new(tcp), &self.hello);
        let mut conn = match tokio::time::timeout(COMMAND_TIMEOUT, greeting).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                let (class, text) = self.classify_error(Phase::Connect, &e);
                return Err(match class {
                    Class::Temporary => {
                        ConnError::Temporary(format!("cannot connect to {addr}: {text}"))
                    }
                    other => ConnError::Class(other, text),
                });
            }
            Err(_) => {
                return Err(ConnError::Unreachable(format!(
                    "cannot connect to {addr}: {}",
                    timed_out("the connection")
                )));
            }
        };
        if !conn.can_starttls() {
            return Err(ConnError::Class(
                Class::Config(Advice::new(
                    format!(
                        "{addr} does not offer STARTTLS; exorelay never sends credentials without TLS."
                    ),
                    "Point smtp_host/smtp_port at Exchange Online's submission endpoint (smtp.office365.com, port 587).",
                )),
                "no STARTTLS".into(),
            ));
        }
        match tokio::time::timeout(
            COMMAND_TIMEOUT,
            conn.starttls(self.tls.clone(), &self.hello),
        )
        .await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) if e.is_tls() || crate::tls::certificate_problem(&e).is_some() => {
                let why = crate::tls::certificate_problem(&e).unwrap_or_else(|| e.to_string());
                return Err(ConnError::Class(
                    Class::Config(classify::untrusted_certificate(&addr, &why)),
                    format!("TLS with {addr}: {why}"),
                ));
            }
            Ok(Err(e)) if split_lettre_error(&e).is_some() => {
                let (class, text) = self.classify_error(Phase::Connect, &e);
                return Err(match class {
                    Class::Temporary => {
                        ConnError::Temporary(format!("STARTTLS with {addr} failed: {text}"))
                    }
                    other => ConnError::Class(other, text),
                });
            }
            Ok(Err(e)) => {
                return Err(ConnError::Unreachable(format!(
                    "STARTTLS with {addr} failed: {e}"
                )));
            }
            Err(_) => {
                return Err(ConnError::Unreachable(format!(
                    "STARTTLS with {addr}: {}",
                    timed_out("the handshake")
                )));
            }
        }
        // lettre keeps only the extensions it knows; PIPELINING is read from our own EHLO.
        if let Ok(Ok(r)) =
            tokio::time::timeout(COMMAND_TIMEOUT, conn.command(Ehlo::new(self.hello.clone()))).await
        {
            let offered = r
                .message()
                .any(|l| l.trim().eq_ignore_ascii_case("PIPELINING"));
            self.pipelining
                .store(offered, std::sync::atomic::Ordering::Relaxed);
        }
        if !conn
            .server_info()
            .supports_auth_mechanism(Mechanism::Xoauth2)
        {
            let masked = conn.server_info().name().contains("***");
            conn.abort().await;
            return Err(ConnError::Class(
                Class::Config(classify::no_xoauth2(&addr, masked)),
                "EHLO after STARTTLS offers no AUTH XOAUTH2".into(),
            ));
        }
        let token = match self.tokens.token().await {
            Ok(t) => t,
            Err(e) if e.config => return Err(ConnError::Class(Class::Config(e.advice), e.error)),
            Err(e) => return Err(ConnError::Unreachable(e.advice.cause)),
        };
        let creds = Credentials::new(self.mailbox.clone(), token.secret().to_string());
        match tokio::time::timeout(COMMAND_TIMEOUT, conn.auth(&[Mechanism::Xoauth2], &creds)).await
        {
            Ok(Ok(_)) => Ok((conn, token)),
            Ok(Err(e)) => {
                let (class, text) = if e.is_client() || split_lettre_error(&e).is_none() {
                    // A 334 error challenge after the token (lettre cannot answer it): the
                    // server refused the token, as with 535 5.7.3.
                    (
                        Class::TokenRefused(classify::challenge_refused(
                            &self.ctx(),
                            &e.to_string(),
                        )),
                        format!("AUTH XOAUTH2: {e}"),
                    )
                } else {
                    self.classify_error(Phase::Auth, &e)
                };
                conn.abort().await;
                match class {
                    Class::TokenRefused(_) if may_refresh => {
                        info!(account = %self.account, reply = %text, "Exchange refused the access token; refreshing it and retrying once");
                        self.tokens.invalidate(&token).await;
                        Box::pin(self.open(false)).await
                    }
                    Class::TokenRefused(advice) => {
                        Err(ConnError::Class(Class::Config(advice), text))
                    }
                    Class::Temporary => {
                        Err(ConnError::Temporary(format!("AUTH at {addr}: {text}")))
                    }
                    other => Err(ConnError::Class(other, text)),
                }
            }
            Err(_) => Err(ConnError::Temporary(format!(
                "AUTH at {addr}: {}",
                timed_out("the reply")
            ))),
        }
    }

    /// A ready connection: pooled if one is usable, else a new one.
    async fn connection(&self) -> Result<(AsyncSmtpConnection, AccessToken, bool), ConnError> {
        if let Some(p) = self.take_pooled() {
            return Ok((p.conn, p.token, true));
        }
        let (c, t) = self.open(true).await?;
        Ok((c, t, false))
    }

    /// One SMTP transaction for `rcpts`. Returns per-recipient outcomes, an account signal, and
    /// whether Exchange answered the end of DATA (for pacing).
    async fn transaction(
        &self,
        from: &str,
        rcpts: &[String],
        message: &body::OutgoingBody,
        eight_bit: bool,
        unreachable: &mut Option<String>,
    ) -> (Vec<Outcome>, Option<AccountSignal>, bool) {
        let n = rcpts.len();
        let mut retried = false;
        let (mut conn, mut token, mut pooled) = match self.connection().await {
            Ok(x) => x,
            Err(e) => return self.conn_failure(e, n, unreachable),
        };
        let sender = if from.is_empty() {
            None
        } else {
            match Address::from_str(from) {
                Ok(a) => Some(a),
                Err(_) => {
                    self.put_back(conn, token);
                    let r = format!(
                        "sender address {from:?} is not valid for Exchange; set rewrite_from = \"always\""
                    );
                    return (vec![Outcome::Permanent(r); n], None, false);
                }
            }
        };
        let mut params = vec![MailParameter::Size(message.len())];
        if eight_bit && conn.server_info().supports_feature(Extension::EightBitMime) {
            params.push(MailParameter::Body(MailBodyParameter::EightBitMime));
        }
        let needs_utf8 = !from.is_ascii() || rcpts.iter().any(|r| !r.is_ascii());
        if needs_utf8 && conn.server_info().supports_feature(Extension::SmtpUtfEight) {
            params.push(MailParameter::SmtpUtfEight);
        }
        if self.pipelining.load(std::sync::atomic::Ordering::Relaxed) {
            let outcomes = match self
                .pipelined_envelope(&mut conn, &mut token, pooled, &sender, &params, rcpts)
                .await
            {
                Ok(Envelope::Send(o)) => o,
                Ok(Envelope::Done(r)) => {
                    if !conn.has_broken() {
                        self.put_back(conn, token);
                    }
                    return r;
                }
                Err(e) => return self.conn_failure(e, n, unreachable),
            };
            return self
                .send_body(conn, token, outcomes, None, message, true)
                .await;
        }
        // MAIL FROM; a pooled connection the server closed meanwhile gets one fresh retry.
        loop {
            match tokio::time::timeout(
                COMMAND_TIMEOUT,
                conn.command(Mail::new(sender.clone(), params.clone())),
            )
            .await
            {
                Ok(Ok(_)) => break,
                Ok(Err(e)) if pooled && !retried && !e.is_permanent() => {
                    debug!(account = %self.account, error = %e, "pooled connection failed at MAIL; opening a new one");
                    retried = true;
                    conn.abort().await;
                    match self.open(true).await {
                        Ok((c, t)) => {
                            conn = c;
                            token = t;
                            pooled = false;
                        }
                        Err(e) => return self.conn_failure(e, n, unreachable),
                    }
                }
                Ok(Err(e)) => {
                    let (class, text) = self.classify_error(Phase::Transaction, &e);
                    conn.abort().await;
                    return self.class_for_all(class, &text, n);
                }
                Err(_) => {
                    conn.abort().await;
                    return (
                        vec![Outcome::Temporary(timed_out("the reply to MAIL FROM")); n],
                        None,
                        false,
                    );
                }
            }
        }
        let mut outcomes: Vec<Option<Outcome>> = vec![None; n];
        let mut signal = None;
        for (i, r) in rcpts.iter().enumerate() {
            let Ok(addr) = Address::from_str(r) else {
                outcomes[i] = Some(Outcome::Permanent(format!(
                    "recipient address {r:?} is not valid"
                )));
                continue;
            };
            match tokio::time::timeout(COMMAND_TIMEOUT, conn.command(Rcpt::new(addr, vec![]))).await
            {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    let (class, text) = self.classify_error(Phase::Transaction, &e);
                    let (o, s) = self.recipient_outcome(class, text);
                    outcomes[i] = Some(o);
                    if s.is_some() {
                        signal = s;
                        for o in outcomes.iter_mut().skip(i + 1) {
                            *o = Some(Outcome::NotAttempted("account paused or throttled".into()));
                        }
                        break;
                    }
                    if conn.has_broken() {
                        break;
                    }
                }
                Err(_) => {
                    conn.abort().await;
                    let fill = Outcome::Temporary(timed_out("the reply to RCPT TO"));
                    return (fill_pending(outcomes, &fill), signal, false);
                }
            }
        }
        let accepted: Vec<usize> = (0..n).filter(|i| outcomes[*i].is_none()).collect();
        if accepted.is_empty() || signal.is_some() || conn.has_broken() {
            let fill = if signal.is_some() {
                Outcome::NotAttempted("account paused or throttled".into())
            } else {
                Outcome::Temporary("connection lost during RCPT".into())
            };
            if !conn.has_broken()
                && tokio::time::timeout(COMMAND_TIMEOUT, conn.command(Rset))
                    .await
                    .is_ok_and(|r| r.is_ok())
            {
                self.put_back(conn, token);
            }
            return (fill_pending(outcomes, &fill), signal, false);
        }
        self.send_body(conn, token, outcomes, signal, message, false)
            .await
    }

    /// MAIL, RCPT and DATA in one write (RFC 2920), then their replies in order. A pooled
    /// connection the server closed meanwhile is replaced once, as in the sequential path.
    async fn pipelined_envelope(
        &self,
        conn: &mut AsyncSmtpConnection,
        token: &mut AccessToken,
        pooled: bool,
        sender: &Option<Address>,
        params: &[MailParameter],
        rcpts: &[String],
    ) -> Result<Envelope, ConnError> {
        let n = rcpts.len();
        let mut outcomes: Vec<Option<Outcome>> = vec![None; n];
        let mut group = Mail::new(sender.clone(), params.to_vec()).to_string();
        let mut sent = Vec::with_capacity(n);
        for (i, r) in rcpts.iter().enumerate() {
            match Address::from_str(r) {
                Ok(addr) => {
                    group.push_str(&Rcpt::new(addr, vec![]).to_string());
                    sent.push(i);
                }
                Err(_) => {
                    outcomes[i] = Some(Outcome::Permanent(format!(
                        "recipient address {r:?} is not valid"
                    )))
                }
            }
        }
        if sent.is_empty() {
            return Ok(Envelope::Done((
                outcomes.into_iter().flatten().collect(),
                None,
                false,
            )));
        }
        group.push_str(&Data.to_string());
        let mut first =
            tokio::time::timeout(COMMAND_TIMEOUT, conn.command(Pipelined(group.clone()))).await;
        if pooled && matches!(&first, Ok(Err(e)) if !e.is_permanent()) {
            debug!(account = %self.account, "pooled connection failed at MAIL; opening a new one");
            conn.abort().await;
            let (c, t) = self.open(true).await?;
            *conn = c;
            *token = t;
            first = tokio::time::timeout(COMMAND_TIMEOUT, conn.command(Pipelined(group))).await;
        }
        let timeout = |what: &str, outcomes: Vec<Option<Outcome>>| {
            let fill = Outcome::Temporary(timed_out(what));
            Envelope::Done((fill_pending(outcomes, &fill), None, false))
        };
        let mail_error = match first {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(e),
            Err(_) => {
                conn.abort().await;
                return Ok(timeout("the reply to MAIL FROM", outcomes));
            }
        };
        // Every reply is read, even after a refusal, so the connection stays in step.
        let mut signal = None;
        for &i in &sent {
            let reply = match tokio::time::timeout(COMMAND_TIMEOUT, conn.read_response()).await {
                Ok(r) => r,
                Err(_) => {
                    conn.abort().await;
                    return Ok(timeout("the reply to RCPT TO", outcomes));
                }
            };
            if let (Err(e), None) = (reply, &mail_error) {
                let (class, text) = self.classify_error(Phase::Transaction, &e);
                let (o, s) = self.recipient_outcome(class, text);
                outcomes[i] = Some(o);
                if s.is_some() && signal.is_none() {
                    signal = s;
                }
            }
        }
        let data = match tokio::time::timeout(COMMAND_TIMEOUT, conn.read_response()).await {
            Ok(r) => r,
            Err(_) => {
                conn.abort().await;
                return Ok(timeout("the reply to DATA", outcomes));
            }
        };
        if let Some(e) = mail_error {
            conn.abort().await;
            let (class, text) = self.classify_error(Phase::Transaction, &e);
            return Ok(Envelope::Done(self.class_for_all(class, &text, n)));
        }
        let any_accepted = outcomes.iter().any(Option::is_none);
        match data {
            Ok(_) if any_accepted && signal.is_none() => Ok(Envelope::Send(outcomes)),
            Ok(_) => {
                // 354 with nothing that should be sent: hang up rather than send a message.
                conn.abort().await;
                let fill = if signal.is_some() {
                    Outcome::NotAttempted("account paused or throttled".into())
                } else {
                    Outcome::Temporary("connection closed after DATA".into())
                };
                Ok(Envelope::Done((
                    fill_pending(outcomes, &fill),
                    signal,
                    false,
                )))
            }
            Err(e) => {
                let (fill, s) = if any_accepted && signal.is_none() {
                    let (class, text) = self.classify_error(Phase::Transaction, &e);
                    self.recipient_outcome(class, text)
                } else {
                    (
                        Outcome::NotAttempted("account paused or throttled".into()),
                        None,
                    )
                };
                let signal = signal.or(s);
                if !conn.has_broken()
                    && !tokio::time::timeout(COMMAND_TIMEOUT, conn.command(Rset))
                        .await
                        .is_ok_and(|r| r.is_ok())
                {
                    conn.abort().await;
                }
                Ok(Envelope::Done((
                    fill_pending(outcomes, &fill),
                    signal,
                    false,
                )))
            }
        }
    }

    /// Sends the message after DATA's 354 and maps the final reply onto the accepted
    /// recipients (the `None` entries of `outcomes`).
    async fn send_body(
        &self,
        mut conn: AsyncSmtpConnection,
        token: AccessToken,
        mut outcomes: Vec<Option<Outcome>>,
        mut signal: Option<AccountSignal>,
        message: &body::OutgoingBody,
        data_sent: bool,
    ) -> (Vec<Outcome>, Option<AccountSignal>, bool) {
        let accepted: Vec<usize> = (0..outcomes.len())
            .filter(|i| outcomes[*i].is_none())
            .collect();
        let read_failed = std::sync::atomic::AtomicBool::new(false);
        let chunks = message.chunks(&read_failed);
        let data = if data_sent {
            Ok(Ok(None))
        } else {
            tokio::time::timeout(COMMAND_TIMEOUT, conn.command(Data))
                .await
                .map(|r| r.map(Some))
        };
        let data_result = match data {
            Ok(Ok(_)) => tokio::time::timeout(
                COMMAND_TIMEOUT + Duration::from_secs(message.len() as u64 / 100_000),
                conn.message_iter(chunks),
            )
            .await
            .map_err(|_| None)
            .and_then(|r| r.map_err(Some)),
            Ok(Err(e)) => Err(Some(e)),
            Err(_) => Err(None),
        };
        let (fill, submitted) = match data_result {
            Ok(_) if read_failed.load(std::sync::atomic::Ordering::Relaxed) => {
                // SMTP cannot take back a message once the final dot is sent: say so loudly.
                tracing::error!(account = %self.account, "reading the spooled message failed while sending it; Exchange may have received it truncated; it stays queued");
                conn.abort().await;
                (
                    Outcome::Temporary("reading the spooled message failed during DATA".into()),
                    true,
                )
            }
            Ok(resp) => {
                let text = format!(
                    "{} {}",
                    u16::from(resp.code()),
                    resp.message().collect::<Vec<_>>().join(" ")
                );
                (Outcome::Delivered(text), true)
            }
            Err(Some(e)) => {
                let (class, text) = self.classify_error(Phase::Transaction, &e);
                let (o, s) = self.recipient_outcome(class, text);
                signal = s;
                (o, e.is_response() || e.is_permanent() || e.is_transient())
            }
            Err(None) => (Outcome::Temporary(timed_out("the reply to DATA")), false),
        };
        for i in accepted {
            outcomes[i] = Some(fill.clone());
        }
        if conn.has_broken() {
            conn.abort().await;
        } else {
            self.put_back(conn, token);
        }
        (
            outcomes
                .into_iter()
                .map(|o| o.unwrap_or_else(|| Outcome::Temporary("no result".into())))
                .collect(),
            signal,
            submitted,
        )
    }

    fn recipient_outcome(&self, class: Class, text: String) -> (Outcome, Option<AccountSignal>) {
        match class {
            Class::Temporary => (Outcome::Temporary(text), None),
            Class::Permanent(None) => (Outcome::Permanent(text), None),
            Class::Permanent(Some(advice)) => (
                Outcome::Permanent(format!("{text} ({} Fix: {})", advice.cause, advice.fix)),
                None,
            ),
            Class::Throttled(wait) => (
                Outcome::NotAttempted(text.clone()),
                Some(AccountSignal::Throttled {
                    wait: wait.min(self.throttle_wait),
                    reason: text,
                }),
            ),
            Class::Config(advice) | Class::TokenRefused(advice) => (
                Outcome::NotAttempted(text),
                Some(AccountSignal::Paused(advice)),
            ),
            Class::SenderDenied(advice) => (
                Outcome::SenderRefused(format!("{text} ({} Fix: {})", advice.cause, advice.fix)),
                None,
            ),
            Class::Quota => (
                Outcome::NotAttempted(text.clone()),
                Some(AccountSignal::QuotaHold {
                    wait: Duration::from_secs(3600),
                    reason: text,
                }),
            ),
        }
    }

    fn class_for_all(
        &self,
        class: Class,
        text: &str,
        n: usize,
    ) -> (Vec<Outcome>, Option<AccountSignal>, bool) {
        let (o, s) = self.recipient_outcome(class, text.to_string());
        (vec![o; n], s, false)
    }

    /// Outcomes when no connection could be had; `unreachable` is set when Exchange was not
    /// reached at all (the forwarder counts those towards "degraded").
    fn conn_failure(
        &self,
        e: ConnError,
        n: usize,
        unreachable: &mut Option<String>,
    ) -> (Vec<Outcome>, Option<AccountSignal>, bool) {
        match e {
            ConnError::Unreachable(t) => {
                *unreachable = Some(t.clone());
                (vec![Outcome::Temporary(t); n], None, false)
            }
            ConnError::Temporary(t) => (vec![Outcome::Temporary(t); n], None, false),
            ConnError::Class(class, text) => self.class_for_all(class, &text, n),
        }
    }

    async fn deliver_job(&self, job: &Job<'_>) -> Attempt {
        let n = job.recipients.len();
        let (mailbox, hostname, id) = (
            self.mailbox.clone(),
            self.hostname.clone(),
            job.meta.id.clone(),
        );
        let rewrite = self.rewrite_from == RewriteFrom::Always;
        let path = job.body.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            body::OutgoingBody::load(&path, |head| {
                if !rewrite {
                    return head.to_vec();
                }
                let (bytes, report) = policy::rewrite(head, &mailbox, &hostname, &id);
                if report.original_from.is_some() || !report.added.is_empty() {
                    debug!(queue_id = %id, original_from = ?report.original_from, added = ?report.added, "sender rewritten for Exchange");
                }
                bytes
            })
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
        let message = match loaded {
            Ok(m) => m,
            Err(e) => {
                return Attempt::all(
                    n,
                    Outcome::Temporary(format!("cannot read the spooled message: {e}")),
                );
            }
        };
        let from = if rewrite {
            self.mailbox.clone()
        } else {
            job.meta.mail_from.clone()
        };
        let mut outcomes = Vec::with_capacity(n);
        let mut signal = None;
        let mut unreachable = None;
        for group in job.recipients.chunks(self.max_recipients) {
            if signal.is_some() {
                outcomes.extend(
                    group
                        .iter()
                        .map(|_| Outcome::NotAttempted("account paused or throttled".into())),
                );
                continue;
            }
            let slot = match self.pacer.acquire(group.len()).await {
                Ok(s) => s,
                Err(wait) => {
                    signal = Some(AccountSignal::QuotaHold {
                        wait,
                        reason: "the mailbox's 24-hour recipient budget (max_recipients_per_day) is used up".into(),
                    });
                    outcomes.extend(
                        group
                            .iter()
                            .map(|_| Outcome::NotAttempted("recipient budget used up".into())),
                    );
                    continue;
                }
            };
            let (group_outcomes, s, submitted) = self
                .transaction(&from, group, &message, job.meta.eight_bit, &mut unreachable)
                .await;
            let accepted = group_outcomes
                .iter()
                .filter(|o| matches!(o, Outcome::Delivered(_)))
                .count();
            self.pacer.finish(slot, submitted, accepted).await;
            if let Some(AccountSignal::QuotaHold { reason, .. }) = &s {
                let wait = self
                    .pacer
                    .day_window_frees_in()
                    .await
                    .unwrap_or(Duration::from_secs(3600));
                signal = Some(AccountSignal::QuotaHold {
                    wait,
                    reason: reason.clone(),
                });
            } else if s.is_some() {
                signal = s;
            }
            outcomes.extend(group_outcomes);
        }
        if let Some(s) = &signal {
            warn!(account = %self.account, queue_id = %job.meta.id, signal = ?s, "account-level condition from Exchange");
        }
        Attempt {
            outcomes,
            signal,
            unreachable,
        }
    }
}

impl Exchange {
    /// For `doctor`: MAIL FROM `from` and RCPT TO `to` on an authenticated connection, then RSET,
    /// so sender restrictions (5.1.8, 5.7.57, 5.7.60 SendAs) show before the first real message.
    /// Nothing is sent. On a refusal: the advice (when it is an account problem) and the reply.
    pub async fn probe_envelope(
        &self,
        conn: &mut AsyncSmtpConnection,
        from: &str,
        to: &str,
    ) -> Result<(), (Option<Advice>, String)> {
        let parse = |a: &str| {
            Address::from_str(a).map_err(|e| (None, format!("address {a:?} is not valid: {e}")))
        };
        let (from, to) = (parse(from)?, parse(to)?);
        let refused = |this: &Exchange, e: &lettre::transport::smtp::Error| {
            let (class, text) = this.classify_error(Phase::Transaction, e);
            match class {
                Class::Config(a)
                | Class::TokenRefused(a)
                | Class::Permanent(Some(a))
                | Class::SenderDenied(a) => (Some(a), text),
                _ => (None, text),
            }
        };
        let step = |r: Result<
            Result<lettre::transport::smtp::response::Response, lettre::transport::smtp::Error>,
            tokio::time::error::Elapsed,
        >,
                    what: &str| match r {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(refused(self, &e)),
            Err(_) => Err((None, timed_out(what))),
        };
        step(
            tokio::time::timeout(COMMAND_TIMEOUT, conn.command(Mail::new(Some(from), vec![])))
                .await,
            "the reply to MAIL FROM",
        )?;
        let rcpt = step(
            tokio::time::timeout(COMMAND_TIMEOUT, conn.command(Rcpt::new(to, vec![]))).await,
            "the reply to RCPT TO",
        );
        let _ = tokio::time::timeout(COMMAND_TIMEOUT, conn.command(Rset)).await;
        rcpt
    }
}

/// A connection failure as `doctor` reports it.
pub struct ConnErrorPublic(ConnError);

impl ConnErrorPublic {
    /// (advice when it is a configuration problem, text)
    pub fn describe(&self) -> (Option<Advice>, String) {
        match &self.0 {
            ConnError::Temporary(t) | ConnError::Unreachable(t) => (None, t.clone()),
            ConnError::Class(Class::Config(a), t) => (Some(a.clone()), t.clone()),
            ConnError::Class(c, t) => (None, format!("{t} ({c:?})")),
        }
    }
}

impl Upstream for Exchange {
    fn deliver<'a>(&'a self, job: &'a Job<'a>) -> BoxFuture<'a, Attempt> {
        Box::pin(self.deliver_job(job))
    }

    fn blocked_at_start(&self) -> Option<Advice> {
        self.tokens.blocked_at_start()
    }

    fn pacer(&self) -> Option<&crate::upstream::exchange::pacer::Pacer> {
        Some(&self.pacer)
    }
}

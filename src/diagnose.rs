//! `exorelay doctor` and `exorelay send-test`: check each account step by step and say exactly
//! what to fix; send one message through the whole path and report its fate.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{AccountConfig, AccountKind, Config};
use crate::oauth::TokenManager;
use crate::oauth::assertion::decode_claims;
use crate::spool::{Meta, Spool};
use crate::upstream::exchange::Exchange;

/// A report printed line by line; `ok` is false once anything failed.
pub struct Report {
    pub text: String,
    pub ok: bool,
}

impl Report {
    fn new() -> Report {
        Report {
            text: String::new(),
            ok: true,
        }
    }
    fn line(&mut self, s: impl AsRef<str>) {
        let _ = writeln!(self.text, "{}", s.as_ref());
    }
    fn pass(&mut self, what: &str, detail: impl AsRef<str>) {
        self.line(format!("  [ok]   {what}: {}", detail.as_ref()));
    }
    fn fail(&mut self, what: &str, cause: impl AsRef<str>, fix: impl AsRef<str>) {
        self.ok = false;
        self.line(format!("  [FAIL] {what}: {}", cause.as_ref()));
        self.line(format!("         fix: {}", fix.as_ref()));
    }
}

fn selected<'a>(
    config: &'a Config,
    account: Option<&str>,
) -> Result<Vec<&'a AccountConfig>, String> {
    match account {
        None => Ok(config.accounts.iter().collect()),
        Some(name) => config
            .accounts
            .iter()
            .find(|a| a.name == name)
            .map(|a| vec![a])
            .ok_or_else(|| {
                let known: Vec<&str> = config.accounts.iter().map(|a| a.name.as_str()).collect();
                format!(
                    "no account named {name:?}; configured: {}",
                    known.join(", ")
                )
            }),
    }
}

fn claim_list(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Array(a) => a
            .iter()
            .filter_map(|x| x.as_str())
            .collect::<Vec<_>>()
            .join(" "),
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// Checks every (or one) account: endpoints, token, claims, TLS, AUTH.
pub async fn doctor(config: &Config, account: Option<&str>) -> Report {
    let mut r = Report::new();
    let accounts = match selected(config, account) {
        Ok(a) => a,
        Err(e) => {
            r.fail("account", e, "pass --account with one of the names above");
            return r;
        }
    };
    for a in accounts {
        match a.kind {
            AccountKind::Capture => {
                r.line(format!("account {} (kind = capture)", a.name));
                let dir = a.dir.clone().unwrap_or_default();
                let probe = dir.join(format!(".doctor-{}", std::process::id()));
                match std::fs::create_dir_all(&dir)
                    .and_then(|_| std::fs::write(&probe, b"x"))
                    .and_then(|_| std::fs::remove_file(&probe))
                {
                    Ok(()) => r.pass("capture folder", format!("{} is writable", dir.display())),
                    Err(e) => r.fail(
                        "capture folder",
                        format!("{}: {e}", dir.display()),
                        "create the folder and give the exorelay user write access",
                    ),
                }
            }
            AccountKind::Exchange => doctor_exchange(config, a, &mut r).await,
            AccountKind::Graph => doctor_graph(config, a, &mut r).await,
        }
    }
    if config
        .accounts
        .iter()
        .any(|a| matches!(a.kind, AccountKind::Exchange | AccountKind::Graph))
    {
        r.line("note: Exchange reports some refusals only later, as a non-delivery report into the sending mailbox (5.7.708 IP not accepted, 5.7.705/5.7.750 tenant sending limits): watch that mailbox's inbox after the first messages.");
    }
    r.line(if r.ok {
        "all checks passed"
    } else {
        "some checks failed; see the fixes above"
    });
    r
}

/// A `graph` account: credential, token (claims: `Mail.Send`, `Mail.ReadWrite`), then a
/// read of the mailbox's Sent Items, which shows mailbox access, application access policies
/// and the permission the Sent Items check needs. Nothing is sent.
async fn doctor_graph(config: &Config, a: &AccountConfig, r: &mut Report) {
    r.line(format!("account {} (kind = graph)", a.name));
    let mailbox = a.mailbox.as_deref().unwrap_or("");
    r.line(format!("  mailbox         {mailbox}"));
    r.line(format!("  token endpoint  {}", a.token_url()));
    r.line(format!("  scope           {}", a.scope()));
    r.line(format!(
        "  Graph           {}/v1.0/users/{mailbox}",
        a.graph_root()
    ));
    if let (Some(cert), Some(key)) = (&a.certificate_file, &a.private_key_file) {
        certificate_check(cert, key, a, r);
    }
    let tokens = match TokenManager::new(a) {
        Ok(t) => Arc::new(t),
        Err(e) => {
            return r.fail(
                "credential",
                e,
                "check client_secret_file / certificate_file / private_key_file",
            );
        }
    };
    match tokens.token().await {
        Ok(t) => {
            let left = t.expires_at.saturating_duration_since(Instant::now());
            r.pass(
                "token",
                format!(
                    "obtained from Entra, valid for {}",
                    humantime::format_duration(Duration::from_secs(left.as_secs()))
                ),
            );
            if let Some(c) = decode_claims(t.secret()) {
                let roles = claim_list(&c["roles"]);
                r.line(format!(
                    "         claims: aud={} roles={roles} tid={}",
                    claim_list(&c["aud"]),
                    claim_list(&c["tid"])
                ));
                clock_check(&c, r);
                for role in ["Mail.Send", "Mail.ReadWrite"] {
                    if !roles.split_whitespace().any(|x| x == role) {
                        r.line(format!("         note: the token has no {role} role; add the Microsoft Graph application permission {role} and grant admin consent"));
                    }
                }
            }
        }
        Err(e) => {
            let code = e.code.map(|c| format!(" [AADSTS{c}]")).unwrap_or_default();
            return r.fail("token", format!("{}{code}", e.advice.cause), e.advice.fix);
        }
    }
    let graph = match crate::upstream::graph::Graph::new(a, &config.hostname, tokens) {
        Ok(g) => g,
        Err(e) => return r.fail("Graph setup", e, "check graph_url and ca_file"),
    };
    match graph.probe_mailbox().await {
        Ok(()) => r.pass(
            "mailbox",
            format!("Graph lets the app read {mailbox}'s Sent Items (nothing sent)"),
        ),
        Err((Some(advice), text)) => r.fail("mailbox", format!("{} [{text}]", advice.cause), advice.fix),
        Err((None, text)) => r.fail(
            "mailbox",
            text,
            "check that this machine may reach the Graph host on port 443, and the app's Mail.ReadWrite permission",
        ),
    }
    if a.rewrite_from == crate::config::RewriteFrom::Never {
        r.line("         note: rewrite_from = \"never\": each device's From: needs SendAs; test one with: exorelay send-test --from <device address> --to <you>");
    }
}

async fn doctor_exchange(config: &Config, a: &AccountConfig, r: &mut Report) {
    r.line(format!("account {} (kind = exchange)", a.name));
    r.line(format!(
        "  mailbox         {}",
        a.mailbox.as_deref().unwrap_or("")
    ));
    r.line(format!("  token endpoint  {}", a.token_url()));
    r.line(format!("  scope           {}", a.scope()));
    r.line(format!(
        "  SMTP            {}:{} (STARTTLS, AUTH XOAUTH2)",
        a.smtp_host(),
        a.smtp_port()
    ));

    match tokio::net::lookup_host((a.smtp_host(), a.smtp_port())).await {
        Ok(addrs) => {
            let list: Vec<String> = addrs.map(|s| s.ip().to_string()).collect();
            r.pass(
                "DNS",
                format!("{} resolves to {}", a.smtp_host(), list.join(", ")),
            );
        }
        Err(e) => {
            r.fail(
                "DNS",
                format!("cannot resolve {}: {e}", a.smtp_host()),
                "check this machine's DNS servers and the smtp_host setting",
            );
            return;
        }
    }
    if let (Some(cert), Some(key)) = (&a.certificate_file, &a.private_key_file) {
        certificate_check(cert, key, a, r);
    }
    let tokens = match TokenManager::new(a) {
        Ok(t) => Arc::new(t),
        Err(e) => {
            return r.fail(
                "credential",
                e,
                "check client_secret_file / certificate_file / private_key_file",
            );
        }
    };
    if tokens.is_delegated() {
        // Delegated: the sign-in must exist; the token check below then uses (and rotates) it.
        match tokens.signed_in() {
            Ok(Some(g)) => r.pass(
                "sign-in",
                format!(
                    "refresh token from {}{} in {}",
                    g.obtained_at.format("%Y-%m-%d %H:%M UTC"),
                    g.user
                        .as_deref()
                        .map(|u| format!(", signed in as {u}"))
                        .unwrap_or_default(),
                    a.token_file.display()
                ),
            ),
            Ok(None) | Err(_) => {
                if let Some(advice) = tokens.blocked_at_start() {
                    return r.fail("sign-in", advice.cause, advice.fix);
                }
            }
        }
    }
    match tokens.token().await {
        Ok(t) => {
            let left = t.expires_at.saturating_duration_since(Instant::now());
            r.pass(
                "token",
                format!(
                    "{} Entra, valid for {}",
                    if tokens.is_delegated() {
                        "refreshed with the stored sign-in at"
                    } else {
                        "obtained from"
                    },
                    humantime::format_duration(Duration::from_secs(left.as_secs()))
                ),
            );
            match decode_claims(t.secret()) {
                Some(c) => {
                    r.line(format!(
                        "         claims: aud={} roles={} scp={} tid={} appid={} exp={}",
                        claim_list(&c["aud"]),
                        claim_list(&c["roles"]),
                        claim_list(&c["scp"]),
                        claim_list(&c["tid"]),
                        claim_list(if c["appid"].is_null() {
                            &c["azp"]
                        } else {
                            &c["appid"]
                        }),
                        c["exp"]
                            .as_i64()
                            .and_then(|e| chrono::DateTime::from_timestamp(e, 0))
                            .map(|d| d.to_rfc3339())
                            .unwrap_or_else(|| "-".into())
                    ));
                    clock_check(&c, r);
                    let roles = claim_list(&c["roles"]);
                    if tokens.is_delegated() {
                        if !claim_list(&c["scp"]).contains("SMTP.Send") {
                            r.line("         note: the token has no SMTP.Send scope; add the delegated permission SMTP.Send (Office 365 Exchange Online) and sign in again");
                        }
                    } else if !roles.contains("SMTP.SendAsApp") {
                        r.line("         note: the token has no SMTP.SendAsApp role; Exchange will refuse it unless RBAC for Applications grants it");
                    }
                }
                None => r.line("         (the token is not a JWT; claims cannot be shown)"),
            }
        }
        Err(e) => {
            let code = e.code.map(|c| format!(" [AADSTS{c}]")).unwrap_or_default();
            return r.fail("token", format!("{}{code}", e.advice.cause), e.advice.fix);
        }
    }
    let exchange = match Exchange::new(a, &config.hostname, tokens) {
        Ok(x) => x,
        Err(e) => return r.fail("TLS setup", e, "check ca_file"),
    };
    match exchange.connect().await {
        Ok((mut conn, _)) => {
            r.pass("SMTP", "connected, STARTTLS done, AUTH XOAUTH2 accepted");
            let mailbox = a.mailbox.as_deref().unwrap_or("");
            match exchange.probe_envelope(&mut conn, mailbox, mailbox).await {
                Ok(()) => r.pass(
                    "sender",
                    format!("MAIL FROM:<{mailbox}> and RCPT TO:<{mailbox}> accepted (then RSET; nothing sent)"),
                ),
                Err((Some(advice), text)) => r.fail("sender", format!("{} [{text}]", advice.cause), advice.fix),
                Err((None, text)) => r.fail(
                    "sender",
                    text,
                    "see the reply; if it persists, run send-test to see what a real message gets",
                ),
            }
            if a.rewrite_from == crate::config::RewriteFrom::Never {
                r.line("         note: rewrite_from = \"never\": each device's From: needs SendAs; test one with: exorelay send-test --from <device address> --to <you>");
            }
            let _ = conn.quit().await;
        }
        Err(e) => {
            let (advice, text) = e.describe();
            match advice {
                Some(a) => r.fail("SMTP AUTH", a.cause, a.fix),
                None => r.fail("SMTP", text, "check smtp_host/smtp_port and that this machine may reach port 587 on the Internet"),
            }
        }
    }
}

/// The client certificate's validity period against this machine's clock: an expired one gives
/// AADSTS1000502 at the next token request; one that expires within 30 days is flagged.
fn certificate_check(
    cert: &std::path::Path,
    key: &std::path::Path,
    a: &AccountConfig,
    r: &mut Report,
) {
    let validity = crate::oauth::assertion::AssertionSigner::load(cert, key, a.assertion_algorithm)
        .and_then(|s| s.validity());
    let (not_before, not_after) = match validity {
        Ok(v) => v,
        Err(e) => {
            return r.fail(
                "certificate",
                e,
                "check certificate_file and private_key_file",
            );
        }
    };
    let now = chrono::Utc::now().timestamp();
    let day = |t: i64| {
        chrono::DateTime::from_timestamp(t, 0)
            .map(|d| d.format("%Y-%m-%d %H:%M UTC").to_string())
            .unwrap_or_else(|| t.to_string())
    };
    let renew = format!(
        "create a new certificate, upload it under App registrations > {} > Certificates & secrets > Certificates, and point certificate_file and private_key_file at it",
        a.client_id.as_deref().unwrap_or("the app")
    );
    if now < not_before {
        r.fail(
            "certificate",
            format!(
                "{} is not valid before {} (is this machine's clock right?)",
                cert.display(),
                day(not_before)
            ),
            "check the clock (timedatectl) or the certificate",
        );
    } else if now > not_after {
        r.fail(
            "certificate",
            format!(
                "{} expired on {} (Entra answers AADSTS1000502)",
                cert.display(),
                day(not_after)
            ),
            renew,
        );
    } else if not_after - now < 30 * 86_400 {
        r.fail(
            "certificate",
            format!(
                "{} expires on {}, in {} days",
                cert.display(),
                day(not_after),
                (not_after - now) / 86_400
            ),
            renew,
        );
    } else {
        r.pass("certificate", format!("valid until {}", day(not_after)));
    }
}

/// Compares this machine's clock with the token's issue time: a clock off by minutes breaks
/// certificate assertions (AADSTS700024) and token expiry.
fn clock_check(claims: &serde_json::Value, r: &mut Report) {
    let Some(iat) = claims["iat"].as_i64() else {
        return;
    };
    let skew = chrono::Utc::now().timestamp() - iat;
    if skew.abs() > 300 {
        r.fail(
            "clock",
            format!("this machine's clock is {skew} s off Entra's (token issued at {iat})"),
            "synchronise the clock: timedatectl set-ntp true (or point chrony/ntpd at a reachable NTP server)",
        );
    } else {
        r.pass("clock", format!("within {} s of Entra's", skew.abs()));
    }
}

/// Sends one test message to `to` through the spool, the forwarder and the account's upstream,
/// using a private spool so a running relay is not disturbed. Waits up to `timeout`.
pub async fn send_test(
    config: &Config,
    account: Option<&str>,
    to: &str,
    from: Option<&str>,
    timeout: Duration,
) -> Report {
    let mut r = Report::new();
    let acct = match selected(config, account).map(|v| v[0].clone()) {
        Ok(a) => a,
        Err(e) => {
            r.fail("account", e, "pass --account with one of the names above");
            return r;
        }
    };
    let dir = std::env::temp_dir().join(format!(
        "exorelay-send-test-{}-{}",
        std::process::id(),
        fastrand::u32(..)
    ));
    let mut cfg = config.clone();
    cfg.accounts = vec![acct.clone()];
    cfg.queue.dir = dir.clone();
    cfg.queue.retry_initial = Duration::from_secs(2);
    cfg.queue.retry_max = Duration::from_secs(10);
    cfg.queue.dsn = crate::config::DsnTo::None;
    let cfg = Arc::new(cfg);
    let result = send_test_in(&cfg, &acct, to, from, timeout, &mut r).await;
    if let Err(e) = result {
        r.fail("send-test", e, "see the message above");
    }
    let _ = std::fs::remove_dir_all(&dir);
    r
}

async fn send_test_in(
    cfg: &Arc<Config>,
    acct: &AccountConfig,
    to: &str,
    from: Option<&str>,
    timeout: Duration,
    r: &mut Report,
) -> Result<(), String> {
    let (spool, _) = Spool::open(&cfg.queue.dir, 10)
        .map_err(|e| format!("cannot create a temporary spool: {e}"))?;
    let spool = Arc::new(spool);
    let forwarder = crate::forward::Forwarder::new(
        cfg.clone(),
        spool.clone(),
        Arc::new(crate::metrics::Metrics::new()),
    )
    .map_err(|e| e.to_string())?;
    let status = forwarder.status();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let tracker = tokio_util::task::TaskTracker::new();
    let task = tokio::spawn(forwarder.run(Vec::new(), shutdown.clone(), tracker.clone()));

    let from = match from {
        Some(f) => crate::submission::parse_address(f, crate::submission::AddressRole::Recipient)
            .map_err(|e| format!("--from {f:?}: {e}"))?,
        None => acct
            .mailbox
            .clone()
            .unwrap_or_else(|| format!("exorelay@{}", cfg.hostname)),
    };
    let now = chrono::Utc::now();
    let msg = format!(
        "From: exorelay <{from}>\r\nTo: <{to}>\r\nSubject: exorelay test message ({acct})\r\nDate: {date}\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nThis test message was sent by `exorelay send-test` on {host} through account {acct:?}.\r\nIf you can read it, the relay's path to its upstream works.\r\n",
        host = cfg.hostname,
        date = now.to_rfc2822(),
        acct = acct.name
    );
    let to = crate::submission::parse_address(to, crate::submission::AddressRole::Recipient)
        .map_err(|e| format!("--to {to:?}: {e}"))?;
    let submission = crate::submission::Submission {
        source: crate::submission::Source::SendTest,
        client: crate::submission::local_client(&cfg.hostname),
        mail_from: from.clone(),
        recipients: vec![to.clone()],
        eight_bit: false,
        smtputf8: false,
    };
    let id = submission
        .enqueue(&spool, &cfg.hostname, &acct.name, msg.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    r.pass("spool", format!("test message queued as {id}"));

    let deadline = Instant::now() + timeout;
    let queued = cfg.queue.dir.join("queue").join(format!("{id}.json"));
    let failed = cfg.queue.dir.join("failed").join(format!("{id}.json"));
    let held = cfg.queue.dir.join("hold").join(format!("{id}.json"));
    let outcome = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if failed.exists() {
            let m = std::fs::read(&failed)
                .ok()
                .and_then(|b| Meta::decode(&b).ok());
            let reason = m
                .and_then(|m| m.recipients.first().and_then(|r| r.last_reply.clone()))
                .unwrap_or_default();
            break Err((
                format!("delivery to {to} failed permanently: {reason}"),
                "check the recipient address and the account's permissions".to_string(),
            ));
        }
        if held.exists() {
            let reason = std::fs::read(&held)
                .ok()
                .and_then(|b| Meta::decode(&b).ok())
                .and_then(|m| m.recipients.first().and_then(|r| r.last_reply.clone()))
                .unwrap_or_default();
            break Err((
                format!(
                    "Exchange refused the sender {from}; the relay would hold such a message: {reason}"
                ),
                "see the fix in the reason above".to_string(),
            ));
        }
        if !queued.exists() {
            break Ok(());
        }
        if let Some(s) = status.get(&acct.name)
            && let crate::forward::AccountState::Paused { advice, .. } = s.state
        {
            break Err((advice.cause, advice.fix));
        }
        if Instant::now() > deadline {
            let last = spool
                .load(&id)
                .ok()
                .and_then(|m| m.recipients.first().and_then(|r| r.last_reply.clone()))
                .unwrap_or_else(|| "no attempt finished".into());
            break Err((
                format!(
                    "not delivered within {}; last result: {last}",
                    humantime::format_duration(timeout)
                ),
                "run `exorelay doctor` for this account".to_string(),
            ));
        }
    };
    shutdown.cancel();
    tracker.close();
    let _ = task.await;
    let _ = tokio::time::timeout(Duration::from_secs(10), tracker.wait()).await;
    match outcome {
        Ok(()) => r.pass(
            "delivery",
            format!("accepted by account {} for {to}", acct.name),
        ),
        Err((cause, fix)) => r.fail("delivery", cause, fix),
    }
    Ok(())
}

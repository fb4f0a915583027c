//! Delivery to Exchange Online, against the project's fake Exchange on loopback.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use support::fake_exchange::*;
use support::*;

/// Credentials and CA files the way an administrator would lay them out (mode 0600).
struct Creds {
    _dir: tempfile::TempDir,
    secret: PathBuf,
    key: PathBuf,
    ca: PathBuf,
}

fn creds(fake: &FakeExchange, secret: &str) -> Creds {
    let dir = tempfile::tempdir().unwrap();
    let private = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    };
    let secret = private("contoso.secret", format!("{secret}\n").as_bytes());
    let key = private("app.key", &std::fs::read(app_key_path()).unwrap());
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &fake.smtp_ca_pem).unwrap();
    Creds {
        _dir: dir,
        secret,
        key,
        ca,
    }
}

fn account(fake: &FakeExchange, c: &Creds, credential: &str, extra: &str) -> String {
    let credential = match credential {
        "secret" => format!("client_secret_file = \"{}\"", c.secret.display()),
        alg => format!(
            "certificate_file = \"{}\"\nprivate_key_file = \"{}\"\nassertion_algorithm = \"{alg}\"",
            app_cert_path().display(),
            c.key.display()
        ),
    };
    format!(
        r#"
[[account]]
name = "contoso"
kind = "exchange"
mailbox = "{MAILBOX}"
tenant = "{TENANT}"
client_id = "{CLIENT_ID}"
{credential}
authority_url = "{}"
smtp_host = "127.0.0.1"
smtp_port = {}
ca_file = "{}"
rate_window = "1s"
{extra}
"#,
        fake.authority(),
        fake.smtp_addr.port(),
        c.ca.display()
    )
}

/// Exchange's reply when the mailbox sends too fast.
const RATE_LIMITED: &str =
    "421 4.4.2 Message submission rate for this client has exceeded the configured limit";

/// A relay whose Exchange account uses a single connection.
async fn one_connection_relay(fake: &FakeExchange, c: &Creds) -> TestRelay {
    TestRelay::start(&relay_config(
        &account(fake, c, "secret", "max_connections = 1"),
        "",
    ))
    .await
}

fn relay_config(account_block: &str, queue_extra: &str) -> String {
    format!(
        r#"
[[listener]]
address = "127.0.0.1:0"
[relay]
allowed_networks = ["127.0.0.1/32"]
[queue]
dir = "{{dir}}/spool"
retry_initial = "200ms"
retry_max = "1s"
probe_interval = "1s"
{queue_extra}
{account_block}
"#
    )
}

async fn wait_delivered(fake: &FakeExchange, n: usize, secs: u64) -> Vec<Delivered> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let d = fake.delivered();
        if d.len() >= n {
            return d;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {n} messages reached the fake Exchange",
            d.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the relay's first account is paused (its HTTP side must listen); returns the
/// account as `/api/v1/accounts` shows it.
async fn wait_paused(relay: &TestRelay, what: &str) -> serde_json::Value {
    let api = format!(
        "http://{}/api/v1/accounts",
        relay.http.expect("[http] listen")
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let v: serde_json::Value = reqwest::get(&api).await.unwrap().json().await.unwrap();
        if v["accounts"][0]["state"] == "paused" {
            return v["accounts"][0].clone();
        }
        assert!(Instant::now() < deadline, "{what}: never paused: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_spool_empty(relay: &TestRelay) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::read_dir(relay.path("spool/queue"))
        .map(|d| d.count())
        .unwrap_or(0)
        > 0
    {
        assert!(Instant::now() < deadline, "spool did not empty");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn submit(relay: &TestRelay, from: &str, to: &[&str], body: &[u8]) -> String {
    let mut c = Dialog::connect(relay.addr()).await;
    c.expect("220").await;
    c.cmd("EHLO printer", "250").await;
    let id = c.send_mail(from, to, body).await;
    c.cmd("QUIT", "221").await;
    id
}

fn body_after_headers(m: &[u8]) -> &[u8] {
    let pos = m
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("header end");
    &m[pos..]
}

fn assert_no_secrets(fake: &FakeExchange) {
    let tokens = fake.issued_tokens();
    let mut secrets: Vec<&str> = tokens.iter().map(String::as_str).collect();
    secrets.push(SECRET);
    assert_logs_clean(&secrets);
}

const JP_MESSAGE: &[u8] = b"From: \"Scanner 2F\" <scanner@printer.local>\r\nTo: boss@contoso.com\r\nSubject: =?ISO-2022-JP?B?GyRCJDMkcyRLJEEkTxsoQg==?=\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=ISO-2022-JP\r\n\r\n\x1b$B$3$s$K$A$O\x1b(B\r\n.leading dot\r\nShift_JIS \x82\xb1\x82\xf1\r\n";

#[tokio::test(flavor = "multi_thread")]
async fn delivers_with_a_secret_and_rewrites_the_sender() {
    let fake = FakeExchange::start().await;
    let c = creds(&fake, SECRET);
    let relay = TestRelay::start(&relay_config(&account(&fake, &c, "secret", ""), "")).await;
    submit(
        &relay,
        "scanner@printer.local",
        &["boss@contoso.com"],
        JP_MESSAGE,
    )
    .await;
    let got = wait_delivered(&fake, 1, 20).await;
    let d = &got[0];
    assert_eq!(d.mailbox, MAILBOX);
    assert_eq!(
        d.mail_from, MAILBOX,
        "envelope sender rewritten to the mailbox"
    );
    assert_eq!(d.rcpts, ["boss@contoso.com"]);
    let text = String::from_utf8_lossy(&d.data);
    assert!(
        text.contains("From: \"Scanner 2F\" <relay@contoso.com>\r\n"),
        "{text}"
    );
    assert!(
        text.contains("Reply-To: \"Scanner 2F\" <scanner@printer.local>\r\n"),
        "{text}"
    );
    assert!(
        text.contains("Subject: =?ISO-2022-JP?B?GyRCJDMkcyRLJEEkTxsoQg==?=\r\n"),
        "{text}"
    );
    assert!(
        text.contains("\r\nDate: ") && text.contains("\r\nMessage-ID: <"),
        "{text}"
    );
    assert!(text.starts_with("Received: from printer"), "{text}");
    assert_eq!(
        body_after_headers(&d.data),
        body_after_headers(JP_MESSAGE),
        "body must be byte-identical"
    );
    assert_eq!(
        fake.state
            .auth_before_tls
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    wait_spool_empty(&relay).await;
    assert_no_secrets(&fake);
}

#[tokio::test(flavor = "multi_thread")]
async fn delivers_with_a_certificate_ps256_and_rs256() {
    let fake = FakeExchange::start().await;
    let c = creds(&fake, SECRET);
    for alg in ["PS256", "RS256"] {
        let relay = TestRelay::start(&relay_config(&account(&fake, &c, alg, ""), "")).await;
        submit(
            &relay,
            "scanner@printer.local",
            &["boss@contoso.com"],
            b"Subject: cert\r\n\r\nx\r\n",
        )
        .await;
        wait_spool_empty(&relay).await;
    }
    assert_eq!(wait_delivered(&fake, 2, 20).await.len(), 2);
    assert_eq!(fake.token_requests(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn one_token_request_per_expiry_however_many_deliveries() {
    let fake = FakeExchange::start().await;
    *fake.state.lifetime.lock().unwrap() = Duration::from_secs(2);
    let c = creds(&fake, SECRET);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.toml");
    std::fs::write(
        &path,
        relay_config(&account(&fake, &c, "secret", ""), "")
            .replace("{dir}", &dir.path().display().to_string()),
    )
    .unwrap();
    let config = exorelay::config::Config::load(&path).unwrap();
    let tokens = Arc::new(exorelay::oauth::TokenManager::new(&config.accounts[0]).unwrap());
    for round in 1..=2u64 {
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let t = tokens.clone();
                tokio::spawn(async move { t.token().await.map(|t| t.secret().to_string()) })
            })
            .collect();
        let mut seen = std::collections::HashSet::new();
        for t in tasks {
            seen.insert(t.await.unwrap().unwrap());
        }
        assert_eq!(seen.len(), 1, "all 20 callers share one token");
        assert_eq!(fake.token_requests(), round);
        assert_eq!(tokens.requests(), round);
        // Refreshed ahead of expiry: half the lifetime for such short tokens.
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }

    // End to end: deliveries across several token lifetimes never present an expired token.
    let relay = TestRelay::start(&relay_config(&account(&fake, &c, "secret", ""), "")).await;
    for i in 0..3 {
        submit(
            &relay,
            "scanner@printer.local",
            &["boss@contoso.com"],
            format!("Subject: t{i}\r\n\r\nx\r\n").as_bytes(),
        )
        .await;
        wait_delivered(&fake, i + 1, 20).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    assert!(
        fake.token_requests() >= 4,
        "tokens were refreshed: {}",
        fake.token_requests()
    );
    assert_no_secrets(&fake);
}

#[tokio::test(flavor = "multi_thread")]
async fn temporary_faults_are_retried_and_throttling_is_not_a_failure() {
    let fake = FakeExchange::start().await;
    let c = creds(&fake, SECRET);
    let relay = one_connection_relay(&fake, &c).await;
    {
        let mut f = fake.faults();
        f.mail_once.push_back("432 4.3.2 Concurrent connections limit exceeded. Visit https://aka.ms/concurrent_sending for more information. [X]".into());
        f.mail_once.push_back(RATE_LIMITED.into());
        f.data_end_once.push_back(
            "451 4.7.500 Server busy. Please try again later from [1.2.3.4]. (AS770)".into(),
        );
        f.drop_mid_data = 1;
    }
    let id = submit(
        &relay,
        "scanner@printer.local",
        &["boss@contoso.com"],
        b"Subject: faults\r\n\r\nbody\r\n",
    )
    .await;
    let got = wait_delivered(&fake, 1, 30).await;
    assert_eq!(got.len(), 1);
    wait_spool_empty(&relay).await;
    let all_hit = {
        let f = fake.faults();
        f.mail_once.is_empty() && f.data_end_once.is_empty() && f.drop_mid_data == 0
    };
    assert!(all_hit, "every fault was hit");
    let logs = logs();
    let attempts: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("delivery attempt") && l.contains(&id))
        .collect();
    // Throttle replies are not counted as attempts; the 451 and the drop are.
    assert!(
        attempts
            .iter()
            .any(|l| l.contains("attempt=3") && l.contains("delivered=1")),
        "{attempts:#?}"
    );
    assert!(logs.contains("Exchange throttled the account"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(fake.delivered().len(), 1, "delivered exactly once");
}

#[tokio::test(flavor = "multi_thread")]
async fn token_refused_by_exchange_is_refreshed_once() {
    let fake = FakeExchange::start().await;
    let c = creds(&fake, SECRET);
    let relay = one_connection_relay(&fake, &c).await;
    fake.faults().close_after_data = true;
    submit(
        &relay,
        "scanner@printer.local",
        &["boss@contoso.com"],
        b"Subject: one\r\n\r\n",
    )
    .await;
    wait_delivered(&fake, 1, 20).await;
    fake.revoke_tokens();
    submit(
        &relay,
        "scanner@printer.local",
        &["boss@contoso.com"],
        b"Subject: two\r\n\r\n",
    )
    .await;
    wait_delivered(&fake, 2, 20).await;
    assert_eq!(fake.token_requests(), 2, "one refresh after 535 5.7.3");
    assert!(logs().contains("refreshing it and retrying once"));
}

#[tokio::test(flavor = "multi_thread")]
async fn smtp_auth_disabled_pauses_the_account_until_fixed() {
    let fake = FakeExchange::start().await;
    let c = creds(&fake, SECRET);
    let relay = TestRelay::start(&relay_config(&account(&fake, &c, "secret", ""), "")).await;
    fake.faults().auth_always = Some(
        "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information. [X]".into(),
    );
    let id = submit(
        &relay,
        "scanner@printer.local",
        &["boss@contoso.com"],
        b"Subject: paused\r\n\r\n",
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    // The log line carries the cause and the exact fix.
    while !logs().lines().any(|l| {
        l.contains("account paused")
            && l.contains("Set-TransportConfig -SmtpClientAuthenticationDisabled $false")
    }) {
        assert!(
            Instant::now() < deadline,
            "account never paused with the right advice"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Mail stays queued while paused, and probes do not burn its attempts.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(relay.path("spool/queue").join(format!("{id}.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(meta["recipients"][0]["status"], "pending");
    assert_eq!(meta["recipients"][0]["attempts"], 0, "{meta}");
    assert!(fake.delivered().is_empty());
    // The administrator fixes it; the next probe delivers.
    fake.faults().auth_always = None;
    wait_delivered(&fake, 1, 20).await;
    wait_spool_empty(&relay).await;
    assert!(logs().contains("account works again"));
}

#[tokio::test(flavor = "multi_thread")]
async fn send_as_denied_holds_that_senders_message_and_the_rest_flows() {
    let fake = FakeExchange::start().await;
    let c = creds(&fake, SECRET);
    let token_dir = tempfile::tempdir().unwrap();
    let token_file = token_dir.path().join("admin.token");
    std::fs::write(&token_file, "send-as-test-admin-token-0123456\n").unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let relay = TestRelay::start(
        &(relay_config(
            &account(&fake, &c, "secret", "rewrite_from = \"never\""),
            "",
        ) + &format!(
            "\n[http]\nlisten = \"127.0.0.1:0\"\nadmin_token_file = \"{}\"\n",
            token_file.display()
        )),
    )
    .await;
    fake.state
        .send_as
        .lock()
        .unwrap()
        .insert("ups@contoso.com".into());
    // One device's From: has no SendAs; another's has.
    let held = submit(
        &relay,
        "scanner@contoso.com",
        &["boss@contoso.com"],
        b"From: scanner@contoso.com\r\nSubject: sendas\r\n\r\nx\r\n",
    )
    .await;
    wait_exists(&relay.path("spool/hold").join(format!("{held}.json"))).await;
    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(relay.path("spool/hold").join(format!("{held}.json"))).unwrap(),
    )
    .unwrap();
    let reply = meta["recipients"][0]["last_reply"].as_str().unwrap();
    assert!(
        reply.contains("Add-RecipientPermission -Identity <sender address>"),
        "{reply}"
    );
    assert_eq!(meta["recipients"][0]["status"], "pending");
    submit(
        &relay,
        "ups@contoso.com",
        &["boss@contoso.com"],
        b"From: ups@contoso.com\r\nSubject: on battery\r\n\r\nx\r\n",
    )
    .await;
    let got = wait_delivered(&fake, 1, 20).await;
    assert_eq!(
        got[0].mail_from, "ups@contoso.com",
        "the other sender's mail flows"
    );
    let http = format!("http://{}", relay.http.unwrap());
    let v: serde_json::Value = reqwest::get(format!("{http}/api/v1/accounts"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["accounts"][0]["state"], "active", "{v}");
    // The administrator grants SendAs and releases the message.
    fake.state
        .send_as
        .lock()
        .unwrap()
        .insert("scanner@contoso.com".into());
    let r = reqwest::Client::new()
        .post(format!("{http}/api/v1/queue/{held}/release"))
        .bearer_auth("send-as-test-admin-token-0123456")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let got = wait_delivered(&fake, 2, 20).await;
    assert_eq!(
        got[1].mail_from, "scanner@contoso.com",
        "rewrite_from = never keeps the sender"
    );
    wait_spool_empty(&relay).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_refused_recipient_does_not_stop_the_others_and_gets_a_dsn() {
    refused_recipient(true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn without_pipelining_commands_go_one_at_a_time_with_the_same_results() {
    refused_recipient(false).await;
}

/// A message to three recipients, the middle one refused, toward a server that does or does
/// not offer PIPELINING: the same outcomes either way, and one connection for the message and
/// its DSN (the refusal left the connection in step).
async fn refused_recipient(pipelining: bool) {
    let fake = FakeExchange::start().await;
    fake.state.pipelining.store(pipelining, Ordering::SeqCst);
    let c = creds(&fake, SECRET);
    let relay = TestRelay::start(&relay_config(&account(&fake, &c, "secret", ""), "")).await;
    fake.faults().rcpt_reject.insert(
        "nobody@contoso.com".into(),
        "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient nobody@contoso.com not found by SMTP address lookup".into(),
    );
    let id = submit(
        &relay,
        "scanner@printer.local",
        &[
            "boss@contoso.com",
            "nobody@contoso.com",
            "clerk@contoso.com",
        ],
        b"Subject: partial\r\n\r\nx\r\n",
    )
    .await;
    let got = wait_delivered(&fake, 2, 20).await;
    assert_eq!(got[0].rcpts, ["boss@contoso.com", "clerk@contoso.com"]);
    // The second delivery is the DSN, to the original sender.
    let dsn = &got[1];
    assert_eq!(dsn.rcpts, ["scanner@printer.local"]);
    let text = String::from_utf8_lossy(&dsn.data);
    // The DSN entered the spool like any message: one Received format, the null sender.
    assert!(
        text.starts_with("Received: by relay.test (exorelay) with local id "),
        "{text}"
    );
    assert!(
        text.contains("Content-Type: multipart/report; report-type=delivery-status"),
        "{text}"
    );
    assert!(
        text.contains("Final-Recipient: rfc822; nobody@contoso.com"),
        "{text}"
    );
    assert!(text.contains("Status: 5.1.10"), "{text}");
    assert!(
        text.contains("Subject: partial"),
        "original headers attached: {text}"
    );
    let failed: serde_json::Value = serde_json::from_slice(
        &std::fs::read(relay.path("spool/failed").join(format!("{id}.json"))).unwrap(),
    )
    .unwrap();
    let statuses: Vec<&str> = failed["recipients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["delivered", "failed", "delivered"]);
    wait_spool_empty(&relay).await;
    let groups = fake.state.pipelined_groups.load(Ordering::SeqCst);
    if pipelining {
        assert_eq!(
            groups, 2,
            "MAIL, RCPT and DATA of both messages in one write each"
        );
    } else {
        assert_eq!(groups, 0, "a command sent before its turn");
    }
    assert_eq!(fake.state.sessions.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_drains_at_the_allowed_rate_without_a_throttle_reply() {
    let fake = FakeExchange::start().await;
    fake.set_rate(30, Duration::from_secs(1));
    let c = creds(&fake, SECRET);
    let relay = TestRelay::start(&relay_config(
        &account(
            &fake,
            &c,
            "secret",
            "max_connections = 3\nmax_messages_per_minute = 30",
        ),
        "max_messages = 1000",
    ))
    .await;
    let total = 300;
    let started = Instant::now();
    let clients: Vec<_> = (0..10)
        .map(|k| {
            let addr = relay.addr();
            tokio::spawn(async move {
                let mut c = Dialog::connect(addr).await;
                c.expect("220").await;
                c.cmd("EHLO burst", "250").await;
                for i in 0..30 {
                    c.send_mail(
                        "scanner@printer.local",
                        &["boss@contoso.com"],
                        format!("Subject: burst {k}-{i}\r\n\r\nx\r\n").as_bytes(),
                    )
                    .await;
                }
            })
        })
        .collect();
    for c in clients {
        c.await.unwrap();
    }
    wait_delivered(&fake, total, 60).await;
    assert_eq!(
        fake.state
            .throttle_replies
            .load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the fake had to throttle"
    );
    assert!(
        fake.state
            .max_conns_seen
            .load(std::sync::atomic::Ordering::SeqCst)
            <= 3
    );
    assert!(
        started.elapsed() >= Duration::from_secs(8),
        "300 messages at 30 per second cannot take less than ~9 s"
    );
    wait_spool_empty(&relay).await;
}

// ---------- doctor and send-test (the real binary) ----------

const BIN: &str = env!("CARGO_BIN_EXE_exorelay");

async fn run_bin(args: Vec<String>) -> (bool, String) {
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(BIN)
            .args(&args)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    })
    .await
    .unwrap()
}

fn write_config(dir: &tempfile::TempDir, text: &str) -> String {
    let path = dir.path().join("exorelay.toml");
    std::fs::write(
        &path,
        text.replace("{dir}", &dir.path().display().to_string()),
    )
    .unwrap();
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn doctor_explains_each_failure_and_passes_when_fixed() {
    let fake = FakeExchange::start().await;
    let dir = tempfile::tempdir().unwrap();

    let good = creds(&fake, SECRET);
    let cfg = write_config(
        &dir,
        &relay_config(&account(&fake, &good, "secret", ""), ""),
    );
    let (ok, out) = run_bin(vec!["doctor".into(), "--config".into(), cfg.clone()]).await;
    assert!(ok, "{out}");
    assert!(
        out.contains("[ok]   token")
            && out.contains("roles=SMTP.SendAsApp")
            && out.contains("aud=https://outlook.office365.com"),
        "{out}"
    );
    assert!(
        out.contains("[ok]   SMTP: connected, STARTTLS done, AUTH XOAUTH2 accepted")
            && out.contains("[ok]   sender: MAIL FROM:<relay@contoso.com>")
            && out.contains("[ok]   clock")
            && out.contains("5.7.708"),
        "{out}"
    );
    assert!(fake.delivered().is_empty(), "doctor sent nothing");
    // Certificate credentials: the certificate's validity is checked too.
    let cert_cfg = write_config(&dir, &relay_config(&account(&fake, &good, "PS256", ""), ""));
    let (ok, out) = run_bin(vec!["doctor".into(), "--config".into(), cert_cfg]).await;
    assert!(ok, "{out}");
    assert!(
        out.contains("[ok]   certificate: valid until 2126-10-31"),
        "{out}"
    );
    // A restricted sender shows at MAIL FROM, before any real message.
    fake.faults()
        .mail_once
        .push_back("550 5.1.8 Access denied, bad outbound sender".into());
    let (ok, out) = run_bin(vec!["doctor".into(), "--config".into(), cfg.clone()]).await;
    assert!(!ok, "{out}");
    assert!(
        out.contains("[FAIL] sender") && out.contains("Restricted entities"),
        "{out}"
    );
    assert!(
        !fake
            .issued_tokens()
            .iter()
            .any(|t| out.contains(t.as_str())),
        "doctor printed a token"
    );

    let bad = creds(&fake, "the-secret-ID-not-its-value");
    let cfg = write_config(&dir, &relay_config(&account(&fake, &bad, "secret", ""), ""));
    let (ok, out) = run_bin(vec!["doctor".into(), "--config".into(), cfg]).await;
    assert!(!ok, "{out}");
    assert!(
        out.contains("AADSTS7000215") && out.contains("Value (not the Secret ID)"),
        "{out}"
    );
    assert!(
        !out.contains("the-secret-ID-not-its-value"),
        "secret printed: {out}"
    );

    let cfg = write_config(
        &dir,
        &relay_config(&account(&fake, &good, "secret", ""), "")
            .replace(TENANT, "contoso-typo.onmicrosoft.com"),
    );
    let (ok, out) = run_bin(vec!["doctor".into(), "--config".into(), cfg]).await;
    assert!(!ok, "{out}");
    assert!(
        out.contains("AADSTS90002") && out.contains("Directory (tenant) ID"),
        "{out}"
    );

    fake.faults().auth_always = Some("535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox. Visit https://aka.ms/smtp_auth_disabled for more information. [X]".into());
    let cfg = write_config(
        &dir,
        &relay_config(&account(&fake, &good, "secret", ""), ""),
    );
    let (ok, out) = run_bin(vec!["doctor".into(), "--config".into(), cfg.clone()]).await;
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!(
            "Set-CASMailbox -Identity {MAILBOX} -SmtpClientAuthenticationDisabled $false"
        )),
        "{out}"
    );

    fake.faults().auth_always = None;
    let (ok, out) = run_bin(vec![
        "send-test".into(),
        "--config".into(),
        cfg,
        "--to".into(),
        "admin@contoso.com".into(),
        "--timeout".into(),
        "30s".into(),
    ])
    .await;
    assert!(ok, "{out}");
    assert!(out.contains("[ok]   delivery"), "{out}");
    let got = wait_delivered(&fake, 1, 10).await;
    assert_eq!(got[0].rcpts, ["admin@contoso.com"]);

    // rewrite_from = "never": send-test --from checks SendAs for one device's address.
    let never = write_config(
        &dir,
        &relay_config(
            &account(&fake, &good, "secret", "rewrite_from = \"never\""),
            "",
        ),
    );
    let send_as = |cfg: String| {
        run_bin(vec![
            "send-test".into(),
            "--config".into(),
            cfg,
            "--to".into(),
            "admin@contoso.com".into(),
            "--from".into(),
            "scanner@contoso.com".into(),
            "--timeout".into(),
            "30s".into(),
        ])
    };
    let (ok, out) = send_as(never.clone()).await;
    assert!(!ok, "{out}");
    assert!(
        out.contains("Add-RecipientPermission -Identity <sender address>"),
        "{out}"
    );
    fake.state
        .send_as
        .lock()
        .unwrap()
        .insert("scanner@contoso.com".into());
    let (ok, out) = send_as(never).await;
    assert!(ok, "{out}");
    let got = wait_delivered(&fake, 2, 10).await;
    assert_eq!(got[1].mail_from, "scanner@contoso.com");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_secret_pauses_the_account_and_fixing_the_file_resumes_it() {
    let fake = FakeExchange::start().await;
    let c = creds(&fake, "copied-the-secret-id-by-mistake");
    let relay = TestRelay::start(&relay_config(&account(&fake, &c, "secret", ""), "")).await;
    let id = submit(
        &relay,
        "scanner@printer.local",
        &["boss@contoso.com"],
        b"Subject: secret\r\n\r\n",
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !logs()
        .lines()
        .any(|l| l.contains("account paused") && l.contains("AADSTS7000215"))
    {
        assert!(Instant::now() < deadline, "no AADSTS7000215 advice");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        relay
            .path("spool/queue")
            .join(format!("{id}.json"))
            .exists(),
        "mail stays queued"
    );
    // The administrator writes the right value; no restart needed.
    std::fs::write(&c.secret, format!("{SECRET}\n")).unwrap();
    wait_delivered(&fake, 1, 20).await;
    wait_spool_empty(&relay).await;
    assert_logs_clean(&["copied-the-secret-id-by-mistake", SECRET]);
}

#[tokio::test(flavor = "multi_thread")]
async fn messages_with_many_recipients_are_split() {
    let fake = FakeExchange::start().await;
    let c = creds(&fake, SECRET);
    let relay = TestRelay::start(&relay_config(
        &account(&fake, &c, "secret", "max_recipients_per_message = 2"),
        "",
    ))
    .await;
    let rcpts = [
        "a@contoso.com",
        "b@contoso.com",
        "c@contoso.com",
        "d@contoso.com",
        "e@contoso.com",
    ];
    submit(
        &relay,
        "scanner@printer.local",
        &rcpts,
        b"Subject: many\r\n\r\nx\r\n",
    )
    .await;
    let got = wait_delivered(&fake, 3, 20).await;
    let groups: Vec<Vec<String>> = got.iter().map(|d| d.rcpts.clone()).collect();
    assert_eq!(
        groups,
        [
            vec!["a@contoso.com", "b@contoso.com"],
            vec!["c@contoso.com", "d@contoso.com"],
            vec!["e@contoso.com"]
        ]
    );
    assert!(
        got.iter().all(|d| d.data == got[0].data),
        "every part carries the same message"
    );
    wait_spool_empty(&relay).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn messages_waiting_for_a_connection_do_not_go_out_behind_a_throttle() {
    let fake = FakeExchange::start().await;
    let c = creds(&fake, SECRET);
    // One connection, so a second attempt is always waiting for it; rate_window (the wait after
    // a throttle reply) is 1 s.
    let relay = one_connection_relay(&fake, &c).await;
    {
        let mut f = fake.faults();
        f.mail_once.push_back(RATE_LIMITED.into());
        // Slow enough that the next messages are dispatched and waiting meanwhile.
        f.mail_fault_delay = Duration::from_millis(500);
    }
    let mut ids = Vec::new();
    for i in 0..4 {
        let body = format!("Subject: burst {i}\r\n\r\nx\r\n");
        ids.push(
            submit(
                &relay,
                "scanner@printer.local",
                &["boss@contoso.com"],
                body.as_bytes(),
            )
            .await,
        );
    }
    wait_delivered(&fake, 4, 30).await;
    wait_spool_empty(&relay).await;
    let log = fake.state.mail_log.lock().unwrap().clone();
    let throttled = log
        .iter()
        .find(|(_, code)| *code == 421)
        .map(|(t, _)| *t)
        .expect("the throttle reply was given");
    for (t, code) in &log {
        if *t > throttled {
            assert!(
                t.duration_since(throttled) >= Duration::from_millis(900),
                "MAIL ({code}) {:?} after the throttle reply: {log:?}",
                t.duration_since(throttled)
            );
        }
    }
    assert_eq!(log.iter().filter(|(_, c)| *c == 250).count(), 4, "{log:?}");
    let logs = logs();
    assert!(
        ids.iter().any(|id| logs
            .lines()
            .any(|l| l.contains(id) && l.contains("waited for a connection; back to the queue"))),
        "an attempt waiting for the connection stood down"
    );
}

/// Failures outside Microsoft's documented replies, before the envelope: each pauses the account
/// with advice that names its cause, keeps the mail queued (nothing bounced, no DSN), and the
/// mail goes out once the fault is gone.
#[tokio::test(flavor = "multi_thread")]
async fn failures_before_the_envelope_pause_and_never_bounce() {
    type Fault = fn(&mut Faults);
    let cases: [(&str, Fault, &str); 6] = [
        (
            "middlebox banner",
            |f| f.greeting = Some("554 5.7.1 Access denied by policy".into()),
            "not one of Exchange Online's replies",
        ),
        (
            "EHLO refused",
            |f| f.ehlo_reply = Some("501 5.5.4 Invalid domain name".into()),
            "greeting or EHLO",
        ),
        (
            "masked banner, AUTH stripped",
            |f| {
                f.masked = true;
                f.no_auth_after_tls = true;
            },
            "inspect esmtp",
        ),
        (
            "tenant MX host",
            |f| f.no_auth_after_tls = true,
            "mail.protection.outlook.com",
        ),
        (
            "334 error challenge",
            |f| f.auth_challenge = true,
            "error challenge (334)",
        ),
        (
            "HVE invalid XOAUTH2 data",
            |f| f.auth_always = Some("501 5.5.124 Invalid XOAUTH2 auth data".into()),
            "XOAUTH2 login data",
        ),
    ];
    for (name, fault, advice) in cases {
        let fake = FakeExchange::start().await;
        let c = creds(&fake, SECRET);
        fault(&mut fake.faults());
        let cfg = relay_config(&account(&fake, &c, "secret", ""), "")
            + "\n[http]\nlisten = \"127.0.0.1:0\"\n";
        let relay = TestRelay::start(&cfg).await;
        let id = submit(
            &relay,
            "scanner@printer.local",
            &["boss@contoso.com"],
            b"Subject: before the envelope\r\n\r\nx\r\n",
        )
        .await;
        let account = wait_paused(&relay, name).await;
        let text = account["advice"].to_string();
        assert!(text.contains(advice), "{name}: advice {text}");
        // The same advice on the status page and in the log.
        let page = reqwest::get(format!("http://{}/", relay.http.unwrap()))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            page.contains(&exorelay::http::html::esc(advice)),
            "{name}: status page"
        );
        assert!(
            logs()
                .lines()
                .any(|l| l.contains("account paused") && l.contains(advice)),
            "{name}: log"
        );
        // Nothing bounced, nothing counted against the message.
        let meta: serde_json::Value = serde_json::from_slice(
            &std::fs::read(relay.path("spool/queue").join(format!("{id}.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(meta["recipients"][0]["status"], "pending", "{name}");
        assert_eq!(
            std::fs::read_dir(relay.path("spool/failed"))
                .unwrap()
                .count(),
            0,
            "{name}"
        );
        // The fault goes away; the next probe delivers.
        *fake.faults() = Faults::default();
        let got = wait_delivered(&fake, 1, 20).await;
        assert_eq!(got.len(), 1, "{name}: only the message, no DSN");
        wait_spool_empty(&relay).await;
    }
}

/// A TLS-inspecting proxy presents a certificate this machine does not trust: the account pauses
/// with advice naming TLS inspection, and mail stays queued.
#[tokio::test(flavor = "multi_thread")]
async fn an_untrusted_server_certificate_pauses_with_tls_inspection_advice() {
    let fake = FakeExchange::start().await;
    let c = creds(&fake, SECRET);
    let other = tempfile::tempdir().unwrap();
    let other_ca = make_cert(other.path()).cert_path;
    let cfg = relay_config(
        &account(&fake, &c, "secret", "")
            .replace(&c.ca.display().to_string(), &other_ca.display().to_string()),
        "",
    ) + "\n[http]\nlisten = \"127.0.0.1:0\"\n";
    let relay = TestRelay::start(&cfg).await;
    let id = submit(
        &relay,
        "scanner@printer.local",
        &["boss@contoso.com"],
        b"Subject: t\r\n\r\nx\r\n",
    )
    .await;
    let account = wait_paused(&relay, "account").await;
    let text = account["advice"].to_string();
    assert!(
        text.contains("TLS inspection") && text.contains("ca_file"),
        "{text}"
    );
    assert!(
        relay
            .path("spool/queue")
            .join(format!("{id}.json"))
            .exists()
    );
    assert!(fake.delivered().is_empty());
}

/// Exchange unreachable (connection refused) on every attempt: nothing is bounced, and after
/// three attempts in a row the account is degraded on the API, /readyz, the metric and the status
/// page; once Exchange answers again, the mail goes out and the mark is gone.
#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_exchange_marks_the_account_degraded_then_recovers() {
    let fake = FakeExchange::start().await;
    let c = creds(&fake, SECRET);
    // A port nothing listens on, until we forward it to the fake.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let cfg = relay_config(
        &account(&fake, &c, "secret", "").replace(
            &format!("smtp_port = {}", fake.smtp_addr.port()),
            &format!("smtp_port = {port}"),
        ),
        "",
    ) + "\n[http]\nlisten = \"127.0.0.1:0\"\n";
    let relay = TestRelay::start(&cfg).await;
    let http = format!("http://{}", relay.http.unwrap());
    let id = submit(
        &relay,
        "scanner@printer.local",
        &["boss@contoso.com"],
        b"Subject: t\r\n\r\nx\r\n",
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let account = loop {
        let v: serde_json::Value = reqwest::get(format!("{http}/api/v1/accounts"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if v["accounts"][0]["degraded"].is_string() {
            break v["accounts"][0].clone();
        }
        assert!(Instant::now() < deadline, "never degraded: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        account["degraded"]
            .as_str()
            .unwrap()
            .contains("cannot connect"),
        "{account}"
    );
    assert_eq!(account["state"], "active", "degraded blocks nothing");
    let ready = reqwest::get(format!("{http}/readyz")).await.unwrap();
    assert_eq!(ready.status(), 503);
    let ready: serde_json::Value = ready.json().await.unwrap();
    assert!(ready["reasons"].to_string().contains("degraded"), "{ready}");
    assert!(
        !ready.to_string().contains("cannot connect"),
        "no causes without a token: {ready}"
    );
    let metrics = reqwest::get(format!("{http}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("exorelay_account_state{account=\"contoso\",state=\"degraded\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("exorelay_account_state{account=\"contoso\",state=\"active\"} 1"),
        "{metrics}"
    );
    let page = reqwest::get(format!("{http}/"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("not been reachable"), "status page");
    // Still queued, still pending: nothing bounced.
    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(relay.path("spool/queue").join(format!("{id}.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(meta["recipients"][0]["status"], "pending");

    // Exchange comes back on that port: a forwarder from it to the fake.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let target = fake.smtp_addr;
    tokio::spawn(async move {
        while let Ok((mut a, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut b) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                }
            });
        }
    });
    wait_delivered(&fake, 1, 20).await;
    let v: serde_json::Value = reqwest::get(format!("{http}/api/v1/accounts"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(v["accounts"][0]["degraded"].is_null(), "{v}");
    let metrics = reqwest::get(format!("{http}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("exorelay_account_state{account=\"contoso\",state=\"degraded\"} 0"),
        "{metrics}"
    );
}

/// Replies inside the transaction: account restrictions pause (the message stays queued, no
/// DSN), a size refusal bounces with advice that names MaxSendSize; each reaches the accounts
/// API or the DSN.
#[tokio::test(flavor = "multi_thread")]
async fn transaction_replies_take_their_table_action() {
    let cases: [(&str, bool, &str, &str); 4] = [
        (
            "550 5.1.8 Access denied, bad outbound sender",
            true,
            "pause",
            "Restricted entities",
        ),
        (
            "554 5.2.0 STOREDRV.Submission.Exception:OutboundSpamException; Failed to process message due to a permanent exception",
            false,
            "pause",
            "Restricted entities",
        ),
        (
            "550 5.7.30 Basic authentication is not supported for Client Submission.",
            true,
            "pause",
            "Basic authentication is retired",
        ),
        (
            "552 5.3.4 Message size exceeds fixed maximum message size",
            false,
            "bounce",
            "MaxSendSize",
        ),
    ];
    for (reply, at_mail, action, advice) in cases {
        let fake = FakeExchange::start().await;
        let c = creds(&fake, SECRET);
        if at_mail {
            fake.faults().mail_once.push_back(reply.into());
        } else {
            fake.faults().data_end_once.push_back(reply.into());
        }
        let cfg = relay_config(&account(&fake, &c, "secret", ""), "")
            + "\n[http]\nlisten = \"127.0.0.1:0\"\n";
        let relay = TestRelay::start(&cfg).await;
        let id = submit(
            &relay,
            "scanner@printer.local",
            &["boss@contoso.com"],
            b"Subject: t\r\n\r\nx\r\n",
        )
        .await;
        if action == "pause" {
            let account = wait_paused(&relay, reply).await;
            assert!(
                account["advice"].to_string().contains(advice),
                "{reply}: {account}"
            );
            // Not bounced: the probe delivers once the fault is gone (it was a one-off).
            let got = wait_delivered(&fake, 1, 20).await;
            assert_eq!(got.len(), 1, "{reply}: no DSN");
        } else {
            // Bounced: the DSN to the sender carries the advice.
            let got = wait_delivered(&fake, 1, 20).await;
            assert_eq!(got[0].rcpts, ["scanner@printer.local"], "{reply}");
            let dsn = String::from_utf8_lossy(&got[0].data);
            assert!(dsn.contains(advice), "{reply}: {dsn}");
            assert!(
                relay
                    .path("spool/failed")
                    .join(format!("{id}.json"))
                    .exists()
            );
        }
        wait_spool_empty(&relay).await;
    }
}

/// The token endpoint behind a TLS-inspecting proxy: the certificate is not trusted, and the
/// account pauses with advice naming TLS inspection (not retried as a network blip).
#[tokio::test(flavor = "multi_thread")]
async fn an_untrusted_token_endpoint_certificate_pauses_with_tls_inspection_advice() {
    let fake = FakeExchange::start().await;
    let c = creds(&fake, SECRET);
    let other = tempfile::tempdir().unwrap();
    let cert = make_cert(other.path());
    let acceptor = {
        use rustls::pki_types::pem::PemObject;
        let chain = rustls::pki_types::CertificateDer::pem_file_iter(&cert.cert_path)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&cert.key_path).unwrap();
        let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
    };
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_port = proxy.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = proxy.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _ = acceptor.accept(tcp).await;
            });
        }
    });
    let cfg = relay_config(
        &account(&fake, &c, "secret", "").replace(
            &fake.authority(),
            &format!("https://127.0.0.1:{proxy_port}"),
        ),
        "",
    ) + "\n[http]\nlisten = \"127.0.0.1:0\"\n";
    let relay = TestRelay::start(&cfg).await;
    submit(
        &relay,
        "scanner@printer.local",
        &["boss@contoso.com"],
        b"Subject: t\r\n\r\nx\r\n",
    )
    .await;
    let account = wait_paused(&relay, "account").await;
    let text = account["advice"].to_string();
    assert!(
        text.contains("TLS inspection") && text.contains(&format!("127.0.0.1:{proxy_port}")),
        "{text}"
    );
}

/// Entra's refusals that need an administrator: each pauses the account (mail stays queued)
/// with the fix for its AADSTS code, on the accounts API.
#[tokio::test(flavor = "multi_thread")]
async fn token_endpoint_refusals_pause_with_their_fix() {
    let cases: [(u32, &str, &str); 6] = [
        (7000229, "invalid_client", "New-MgServicePrincipal -AppId"),
        (900382, "invalid_request", "cloud = \\\"usgov\\\""),
        (1000502, "invalid_client", "certificate_file"),
        (7000112, "unauthorized_client", "Enterprise applications"),
        (500011, "invalid_resource", "set scope explicitly"),
        (530035, "invalid_grant", "Manage security defaults"),
    ];
    for (code, error, fix) in cases {
        let fake = FakeExchange::start().await;
        let c = creds(&fake, SECRET);
        *fake.state.token_error.lock().unwrap() = Some((
            400,
            serde_json::json!({"error": error, "error_description": format!("AADSTS{code}: refused."), "error_codes": [code]}),
        ));
        let cfg = relay_config(&account(&fake, &c, "secret", ""), "")
            + "\n[http]\nlisten = \"127.0.0.1:0\"\n";
        let relay = TestRelay::start(&cfg).await;
        let id = submit(
            &relay,
            "scanner@printer.local",
            &["boss@contoso.com"],
            b"Subject: t\r\n\r\nx\r\n",
        )
        .await;
        let account = wait_paused(&relay, &format!("{code}")).await;
        let advice = account["advice"].to_string();
        assert!(
            advice.contains(&format!("AADSTS{code}")) || code == 530035,
            "{code}: {advice}"
        );
        assert!(advice.contains(fix), "{code}: {advice}");
        assert!(
            relay
                .path("spool/queue")
                .join(format!("{id}.json"))
                .exists(),
            "{code}: still queued"
        );
    }
}

/// A client secret that expires in a few days: the expiry is a metric, the warning is on the
/// accounts API, the status page and /readyz, and the administrator gets one mail; an expired one
/// makes /readyz fail.
#[tokio::test(flavor = "multi_thread")]
async fn credential_expiry_is_warned_ahead_and_expired_fails_readiness() {
    let fake = FakeExchange::start().await;
    let c = creds(&fake, SECRET);
    let soon = (chrono::Utc::now() + chrono::Duration::days(5)).date_naive();
    let cfg = relay_config(
        &account(
            &fake,
            &c,
            "secret",
            &format!("client_secret_expires = {soon}"),
        ),
        "admin_address = \"postmaster@contoso.com\"",
    ) + "\n[http]\nlisten = \"127.0.0.1:0\"\n";
    let relay = TestRelay::start(&cfg).await;
    let http = format!("http://{}", relay.http.unwrap());
    // The notice goes to the administrator through the account, like any message.
    let got = wait_delivered(&fake, 1, 20).await;
    assert_eq!(got[0].rcpts, ["postmaster@contoso.com"]);
    let text = String::from_utf8_lossy(&got[0].data);
    assert!(
        text.contains("expires in 7 day(s) or less") && text.contains(&soon.to_string()),
        "{text}"
    );
    let v: serde_json::Value = reqwest::get(format!("{http}/api/v1/accounts"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let warning = v["accounts"][0]["credential_warnings"][0]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        warning.contains(&format!("expires on {soon}")) && warning.contains("client_secret_file"),
        "{v}"
    );
    let ready: serde_json::Value = reqwest::get(format!("{http}/readyz"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        ready["ready"], true,
        "a warning is not yet a failure: {ready}"
    );
    assert!(
        ready["warnings"][0]
            .as_str()
            .unwrap()
            .contains("expires soon"),
        "{ready}"
    );
    let page = reqwest::get(format!("{http}/"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains(&format!("expires on {soon}")), "status page");
    let metrics = reqwest::get(format!("{http}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let at = soon.and_hms_opt(0, 0, 0).unwrap().and_utc().timestamp();
    assert!(
        metrics.contains(&format!("exorelay_credential_expiry_timestamp_seconds{{account=\"contoso\",credential=\"client_secret\"}} {at}")),
        "{metrics}"
    );
    drop(relay);

    let past = (chrono::Utc::now() - chrono::Duration::days(1)).date_naive();
    let cfg = relay_config(
        &account(
            &fake,
            &c,
            "secret",
            &format!("client_secret_expires = \"{past}\""),
        ),
        "",
    ) + "\n[http]\nlisten = \"127.0.0.1:0\"\n";
    let relay = TestRelay::start(&cfg).await;
    let http = format!("http://{}", relay.http.unwrap());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = reqwest::get(format!("{http}/readyz")).await.unwrap();
        let status = r.status();
        let body: serde_json::Value = r.json().await.unwrap();
        // (Right at start-up it may also say the listeners are not running yet.)
        if body["reasons"].to_string().contains("expired credential") {
            assert_eq!(status, 503, "{body}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "readyz never failed for an expired secret"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

//! Delivery through Microsoft Graph, against the project's fake Graph on loopback.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine;
use support::fake_graph::*;
use support::*;

struct Creds {
    _dir: tempfile::TempDir,
    secret: PathBuf,
}

fn creds(secret: &str) -> Creds {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("graph.secret");
    std::fs::write(&p, format!("{secret}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    Creds {
        _dir: dir,
        secret: p,
    }
}

fn config(fake: &FakeGraph, c: &Creds, extra: &str, http: &str) -> String {
    format!(
        r#"
[[listener]]
address = "127.0.0.1:0"
[relay]
allowed_networks = ["127.0.0.1/32"]
max_message_size = "30MB"
[queue]
dir = "{{dir}}/spool"
retry_initial = "200ms"
retry_max = "1s"
probe_interval = "1s"
[[account]]
name = "contoso"
kind = "graph"
mailbox = "{MAILBOX}"
tenant = "{TENANT}"
client_id = "{CLIENT_ID}"
client_secret_file = "{}"
authority_url = "{url}"
graph_url = "{url}"
rate_window = "1s"
{extra}
{http}
"#,
        c.secret.display(),
        url = fake.url(),
    )
}

async fn start(fake: &FakeGraph, extra: &str) -> (TestRelay, Creds) {
    let c = creds(SECRET);
    let relay = TestRelay::start(&config(fake, &c, extra, "")).await;
    (relay, c)
}

async fn submit(relay: &TestRelay, from: &str, to: &[&str], body: &[u8]) -> String {
    let mut c = Dialog::connect(relay.addr()).await;
    c.expect("220").await;
    c.cmd("EHLO printer", "250").await;
    let id = c.send_mail(from, to, body).await;
    c.cmd("QUIT", "221").await;
    id
}

async fn wait_sent(fake: &FakeGraph, n: usize, secs: u64) -> Vec<Sent> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let s = fake.sent();
        if s.len() >= n {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {n} messages reached the fake Graph",
            s.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_spool_empty(relay: &TestRelay, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while std::fs::read_dir(relay.path("spool/queue"))
        .map(|d| d.count())
        .unwrap_or(0)
        > 0
    {
        assert!(Instant::now() < deadline, "spool did not empty");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn sha256(b: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, b)
        .as_ref()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread")]
async fn small_message_goes_out_byte_intact_with_envelope_only_recipients_as_bcc() {
    let fake = FakeGraph::start().await;
    let (relay, _c) = start(&fake, "").await;
    let body = format!(
        "From: Scanner <{MAILBOX}>\r\nTo: boss@contoso.com\r\nSubject: scan\r\nMessage-ID: <scan-1@printer>\r\n\r\n.leading dot\r\nbody caf\u{e9}\r\n"
    );
    submit(
        &relay,
        MAILBOX,
        &["boss@contoso.com", "archive@contoso.com"],
        body.as_bytes(),
    )
    .await;
    let sent = wait_sent(&fake, 1, 20).await;
    assert_eq!(sent[0].via, "sendMail");
    assert_eq!(
        sent[0].recipients,
        vec!["boss@contoso.com", "archive@contoso.com"]
    );
    assert_eq!(sent[0].from, MAILBOX);
    // Every byte the device sent is there, with our Received: before and Bcc: added.
    let mime = String::from_utf8_lossy(&sent[0].mime).into_owned();
    assert!(mime.starts_with("Received: "), "{mime}");
    let (head, tail) = body.split_once("\r\n\r\n").unwrap();
    assert!(sent[0].mime.ends_with(format!("\r\n\r\n{tail}").as_bytes()));
    assert!(mime.contains(head), "{mime}");
    assert!(mime.contains("Bcc: <archive@contoso.com>\r\n"), "{mime}");
    wait_spool_empty(&relay, 10).await;
    assert_logs_clean(&[SECRET]);
}

#[tokio::test(flavor = "multi_thread")]
async fn large_message_goes_through_a_draft_and_upload_sessions_intact() {
    let fake = FakeGraph::start().await;
    let (relay, _c) = start(&fake, "").await;
    let pdf: Vec<u8> = (0..9_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&pdf);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(76)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    let body = format!(
        "From: <{MAILBOX}>\r\nTo: boss@contoso.com\r\nSubject: big scan\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n--b1\r\nContent-Type: text/plain\r\n\r\nSee attached.\r\n--b1\r\nContent-Type: application/pdf; name=\"scan.pdf\"\r\nContent-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=\"scan.pdf\"\r\n\r\n{}\r\n--b1--\r\n",
        lines.join("\r\n")
    );
    submit(&relay, MAILBOX, &["boss@contoso.com"], body.as_bytes()).await;
    let sent = wait_sent(&fake, 1, 60).await;
    assert_eq!(sent[0].via, "draft");
    assert_eq!(sent[0].attachments.len(), 1);
    let (name, ctype, bytes) = &sent[0].attachments[0];
    assert_eq!(
        (name.as_str(), ctype.as_str()),
        ("scan.pdf", "application/pdf")
    );
    assert_eq!(sha256(bytes), sha256(&pdf), "attachment bytes differ");
    let draft = String::from_utf8_lossy(&sent[0].mime);
    assert!(draft.contains("See attached.\r\n--b1--"), "{draft}");
    assert!(fake.requests("upload") >= 3, "chunks of at most 4 MiB");
    assert!(
        fake.state
            .largest_request
            .load(std::sync::atomic::Ordering::SeqCst)
            <= 4 * 1024 * 1024
    );
    assert_eq!(fake.drafts_left(), 0);
    wait_spool_empty(&relay, 10).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn throttling_waits_retry_after_and_is_not_a_failure() {
    let fake = FakeGraph::start().await;
    for _ in 0..3 {
        fake.fault(Fault::Status(429, "ApplicationThrottled", Some(1)));
    }
    fake.fault(Fault::Status(503, "ServiceUnavailable", Some(1)));
    let (relay, _c) = start(&fake, "").await;
    let started = Instant::now();
    let id = submit(
        &relay,
        MAILBOX,
        &["boss@contoso.com"],
        format!("From: <{MAILBOX}>\r\nSubject: storm\r\n\r\nx\r\n").as_bytes(),
    )
    .await;
    let sent = wait_sent(&fake, 1, 30).await;
    assert_eq!(sent.len(), 1);
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "Retry-After honoured"
    );
    wait_spool_empty(&relay, 10).await;
    assert!(!relay.path(&format!("spool/failed/{id}.json")).exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrency_stays_within_four_requests_per_mailbox() {
    let fake = FakeGraph::start().await;
    *fake.state.delay.lock().unwrap() = Duration::from_millis(100);
    let (relay, _c) = start(&fake, "max_connections = 4").await;
    let mut tasks = Vec::new();
    for i in 0..12 {
        let addr = relay.addr();
        tasks.push(tokio::spawn(async move {
            let mut c = Dialog::connect(addr).await;
            c.expect("220").await;
            c.cmd("EHLO printer", "250").await;
            c.send_mail(
                MAILBOX,
                &["boss@contoso.com"],
                format!("From: <{MAILBOX}>\r\nSubject: {i}\r\n\r\nx\r\n").as_bytes(),
            )
            .await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    wait_sent(&fake, 12, 30).await;
    let st = &fake.state;
    assert!(st.max_in_flight.load(std::sync::atomic::Ordering::SeqCst) <= 4);
    assert_eq!(st.throttled.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn send_as_denied_holds_the_message_with_its_fix() {
    let fake = FakeGraph::start().await;
    let (relay, _c) = start(&fake, "rewrite_from = \"never\"").await;
    let held = submit(
        &relay,
        "scanner@contoso.com",
        &["boss@contoso.com"],
        b"From: scanner@contoso.com\r\nSubject: sendas\r\n\r\nx\r\n",
    )
    .await;
    let path = relay.path("spool/hold").join(format!("{held}.json"));
    wait_exists(&path).await;
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let reply = meta["recipients"][0]["last_reply"].as_str().unwrap();
    assert!(reply.contains("ErrorSendAsDenied"), "{reply}");
    assert!(reply.contains("Add-RecipientPermission"), "{reply}");
    assert!(fake.sent().is_empty());
    // With rewrite_from = "always" (the default) the same device's mail goes out as the mailbox.
    let fake2 = FakeGraph::start().await;
    let (relay2, _c2) = start(&fake2, "").await;
    submit(
        &relay2,
        "scanner@contoso.com",
        &["boss@contoso.com"],
        b"From: scanner@contoso.com\r\nSubject: sendas\r\n\r\nx\r\n",
    )
    .await;
    let sent = wait_sent(&fake2, 1, 20).await;
    assert_eq!(sent[0].from, MAILBOX);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_token_is_refreshed_once_then_pauses_the_account() {
    let fake = FakeGraph::start().await;
    let c = creds(SECRET);
    let token_dir = tempfile::tempdir().unwrap();
    let token_file = token_dir.path().join("admin.token");
    std::fs::write(&token_file, "graph-test-admin-token-012345678\n").unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let relay = TestRelay::start(&config(
        &fake,
        &c,
        "",
        &format!(
            "[http]\nlisten = \"127.0.0.1:0\"\nadmin_token_file = \"{}\"\n",
            token_file.display()
        ),
    ))
    .await;
    let msg = format!("From: <{MAILBOX}>\r\nSubject: t\r\n\r\nx\r\n");
    submit(&relay, MAILBOX, &["boss@contoso.com"], msg.as_bytes()).await;
    wait_sent(&fake, 1, 20).await;
    // The token stops working: one fresh token, and the mail goes out.
    fake.expire_tokens();
    submit(&relay, MAILBOX, &["boss@contoso.com"], msg.as_bytes()).await;
    wait_sent(&fake, 2, 20).await;
    assert_eq!(
        fake.state
            .token_requests
            .load(std::sync::atomic::Ordering::SeqCst),
        2
    );
    // Every token refused (Mail.Send revoked): the account pauses with the fix.
    *fake.state.refuse_tokens.lock().unwrap() = true;
    submit(&relay, MAILBOX, &["boss@contoso.com"], msg.as_bytes()).await;
    let api = format!("http://{}/api/v1/accounts", relay.http.unwrap());
    let deadline = Instant::now() + Duration::from_secs(15);
    let account = loop {
        let v: serde_json::Value = reqwest::get(&api).await.unwrap().json().await.unwrap();
        if v["accounts"][0]["state"] == "paused" {
            break v["accounts"][0].clone();
        }
        assert!(Instant::now() < deadline, "never paused: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let text = account.to_string();
    assert!(text.contains("Mail.Send"), "{text}");
    assert_eq!(fake.sent().len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn no_duplicate_after_sent_then_504() {
    let fake = FakeGraph::start().await;
    fake.fault(Fault::SentThen504);
    let (relay, _c) = start(&fake, "").await;
    submit(
        &relay,
        MAILBOX,
        &["boss@contoso.com"],
        format!("From: <{MAILBOX}>\r\nSubject: once\r\n\r\nx\r\n").as_bytes(),
    )
    .await;
    wait_sent(&fake, 1, 20).await;
    // The relay saw a 504 and retries; the retry finds the message in Sent Items.
    wait_spool_empty(&relay, 20).await;
    assert_eq!(fake.sent().len(), 1, "sent exactly once");
    assert_eq!(fake.requests("sendMail"), 1);
    assert!(fake.requests("sentitems") >= 1, "the retry looked first");
}

#[tokio::test(flavor = "multi_thread")]
async fn inbox_listing_shows_dropped_messages() {
    let fake = FakeGraph::start().await;
    fake.drop_in_inbox(serde_json::json!({"id": "ndr-1", "subject": "Undeliverable: scan"}));
    let tok: serde_json::Value = reqwest::Client::new()
        .post(format!("{}/{TENANT}/oauth2/v2.0/token", fake.url()))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT_ID),
            ("client_secret", SECRET),
            ("scope", SCOPE),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let url = format!(
        "{}/v1.0/users/{MAILBOX}/mailFolders/inbox/messages",
        fake.url()
    );
    let unauth = reqwest::get(&url).await.unwrap();
    assert_eq!(unauth.status(), 401);
    let v: serde_json::Value = reqwest::Client::new()
        .get(&url)
        .bearer_auth(tok["access_token"].as_str().unwrap())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["value"][0]["subject"], "Undeliverable: scan");
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

#[tokio::test(flavor = "multi_thread")]
async fn doctor_and_send_test_work_for_graph_accounts() {
    let fake = FakeGraph::start().await;
    let dir = tempfile::tempdir().unwrap();
    let c = creds(SECRET);
    let path = dir.path().join("exorelay.toml");
    std::fs::write(
        &path,
        config(&fake, &c, "", "").replace("{dir}", &dir.path().display().to_string()),
    )
    .unwrap();
    let cfg = path.display().to_string();
    let (ok, out) = run_bin(vec!["doctor".into(), "--config".into(), cfg.clone()]).await;
    assert!(ok, "{out}");
    assert!(
        out.contains("[ok]   token")
            && out.contains("roles=Mail.Send Mail.ReadWrite")
            && out.contains("[ok]   mailbox")
            && out.contains("scope           https://graph.microsoft.com/.default"),
        "{out}"
    );
    assert!(fake.sent().is_empty(), "doctor sent nothing");
    // An application access policy that leaves the mailbox out: the fix names the policy.
    *fake.state.deny_mailbox.lock().unwrap() =
        Some((403, "ErrorAccessDenied", "Access to OData is disabled."));
    let (ok, out) = run_bin(vec!["doctor".into(), "--config".into(), cfg.clone()]).await;
    assert!(!ok, "{out}");
    assert!(
        out.contains("[FAIL] mailbox") && out.contains("Test-ApplicationAccessPolicy"),
        "{out}"
    );
    *fake.state.deny_mailbox.lock().unwrap() = None;
    let (ok, out) = run_bin(vec![
        "send-test".into(),
        "--config".into(),
        cfg,
        "--to".into(),
        "boss@contoso.com".into(),
    ])
    .await;
    assert!(ok, "{out}");
    let sent = fake.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].recipients, vec!["boss@contoso.com"]);
}

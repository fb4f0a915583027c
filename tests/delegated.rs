//! Delegated sign-in (`auth = "delegated"`), against the fake Entra and Exchange on loopback:
//! `exorelay login` by device code and by browser, refresh-token rotation kept across restarts,
//! and a revoked grant pausing the account until the next sign-in.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use exorelay::config::{AccountConfig, Config};
use exorelay::oauth::login::{self, LoginError};
use support::fake_exchange::*;
use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_exorelay");
const ADMIN_TOKEN: &str = "delegated-test-admin-token-0123";

/// Files that outlive one relay: the admin token, the CA of the fake SMTP side, the state
/// folder (when a test sets it) and a client secret.
struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new(fake: &FakeExchange) -> Files {
        let dir = tempfile::tempdir().unwrap();
        let private = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        };
        private("admin.token", &format!("{ADMIN_TOKEN}\n"));
        private("client.secret", &format!("{SECRET}\n"));
        std::fs::write(dir.path().join("ca.pem"), &fake.smtp_ca_pem).unwrap();
        Files { dir }
    }
    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
}

/// A relay config with one delegated account "frontdesk" and the HTTP side on. `extra_queue`
/// goes into `[queue]`, `extra_account` into the account.
fn relay_config(fake: &FakeExchange, f: &Files, extra_queue: &str, extra_account: &str) -> String {
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
{extra_queue}
[[account]]
name = "frontdesk"
kind = "exchange"
auth = "delegated"
mailbox = "{MAILBOX}"
tenant = "{TENANT}"
client_id = "{CLIENT_ID}"
authority_url = "{authority}"
smtp_host = "127.0.0.1"
smtp_port = {port}
ca_file = "{ca}"
{extra_account}
[http]
listen = "127.0.0.1:0"
admin_token_file = "{token}"
"#,
        authority = fake.authority(),
        port = fake.smtp_addr.port(),
        ca = f.path("ca.pem").display(),
        token = f.path("admin.token").display(),
    )
}

/// The relay's config file as `exorelay login` reads it, pointing at the relay's real HTTP port.
fn config_for_cli(relay: &TestRelay) -> PathBuf {
    let text = std::fs::read_to_string(relay.path("exorelay.toml")).unwrap();
    let port = relay.http.unwrap().port();
    let path = relay.path("cli.toml");
    std::fs::write(
        &path,
        text.replace(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"127.0.0.1:{port}\""),
        ),
    )
    .unwrap();
    path
}

/// A config loaded the way the relay loads it (for calling the login library directly).
fn load(text: &str, dir: &Path) -> Config {
    let path = dir.join("login.toml");
    std::fs::write(&path, text.replace("{dir}", &dir.display().to_string())).unwrap();
    Config::load(&path).unwrap()
}

async fn run_bin(args: Vec<String>) -> (bool, String, String) {
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(BIN)
            .args(&args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

fn login_args(config: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "login".into(),
        "--config".into(),
        config.display().to_string(),
        "--account".into(),
        "frontdesk".into(),
        "--timeout".into(),
        "60s".into(),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// Device code approved at the first poll (for tests about what comes after the sign-in).
async fn quick_login(fake: &FakeExchange, account: &AccountConfig) -> login::SignedIn {
    {
        let mut d = fake.delegated();
        d.device_pending_polls = 0;
        d.device_slow_down = false;
        d.device_outcome = DeviceOutcome::Approve;
        d.device_interval = 0;
    }
    login::device_login(account, Duration::from_secs(30), |_| {})
        .await
        .unwrap()
}

async fn accounts(relay: &TestRelay) -> serde_json::Value {
    reqwest::Client::new()
        .get(format!("http://{}/api/v1/accounts", relay.http.unwrap()))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn wait_paused(relay: &TestRelay, what: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let v = accounts(relay).await;
        if v["accounts"][0]["state"] == "paused" {
            return v["accounts"][0].clone();
        }
        assert!(Instant::now() < deadline, "{what}: never paused: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_delivered(fake: &FakeExchange, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while fake.delivered_count() < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} messages reached the fake Exchange",
            fake.delivered_count()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn queued(relay: &TestRelay) -> usize {
    std::fs::read_dir(relay.path("spool/queue"))
        .map(|d| {
            d.filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".json"))
            })
            .count()
        })
        .unwrap_or(0)
}

async fn submit(relay: &TestRelay, subject: &str) -> String {
    let mut c = Dialog::connect(relay.addr()).await;
    c.expect("220").await;
    c.cmd("EHLO printer", "250").await;
    let id = c
        .send_mail(
            "scanner@printer.local",
            &["boss@contoso.com"],
            format!("Subject: {subject}\r\n\r\nbody\r\n").as_bytes(),
        )
        .await;
    c.cmd("QUIT", "221").await;
    id
}

fn stored_refresh_token(file: &Path) -> String {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(file).unwrap()).unwrap();
    v["refresh_token"].as_str().unwrap().to_string()
}

/// Every token the fake issued, and the client secret: none may be in a log.
fn assert_no_secrets(fake: &FakeExchange, extra: &[&str], in_process_relay: bool) {
    let access = fake.issued_tokens();
    let refresh = fake.delegated().issued_refresh.clone();
    let mut secrets: Vec<&str> = access
        .iter()
        .chain(refresh.iter())
        .map(String::as_str)
        .collect();
    secrets.push(SECRET);
    for e in extra {
        for s in &secrets {
            assert!(!e.contains(s), "a secret was printed by exorelay login");
        }
    }
    if in_process_relay {
        assert_logs_clean(&secrets);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn never_signed_in_starts_paused_then_device_code_login_delivers_the_queued_mail() {
    let fake = FakeExchange::start().await;
    let f = Files::new(&fake);
    let relay = TestRelay::start(&relay_config(&fake, &f, "", "")).await;

    // Not signed in: the relay runs, the account is paused with the fix.
    let account = wait_paused(&relay, "never signed in").await;
    let advice = account["advice"].to_string();
    assert!(
        advice.contains("exorelay login --account frontdesk"),
        "{advice}"
    );
    let id = submit(&relay, "waiting for a sign-in").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        queued(&relay),
        1,
        "mail stays queued while nobody is signed in"
    );
    assert_eq!(fake.delivered_count(), 0);

    // The user signs in by device code: two pending polls and one slow_down first.
    {
        let mut d = fake.delegated();
        d.device_pending_polls = 2;
        d.device_slow_down = true;
        d.device_interval = 0;
    }
    let cli = config_for_cli(&relay);
    let (ok, out, err) = run_bin(login_args(&cli, &[])).await;
    assert!(ok, "login failed: {out}{err}");
    assert!(
        out.contains("https://microsoft.com/devicelogin") && out.contains("enter the code F"),
        "URL and code printed: {out}"
    );
    assert!(out.contains("poll more slowly; next check in 5s"), "{out}");
    assert!(
        out.contains("Signed in as relay@contoso.com for account frontdesk"),
        "{out}"
    );
    assert!(out.contains("told to try the account now"), "{out}");
    let polls = fake.delegated().device_polls.clone();
    assert_eq!(polls.len(), 4, "slow_down, two pending, approved");
    assert!(
        polls[1] - polls[0] >= Duration::from_secs(5),
        "slow_down honoured: the interval grew by 5 s ({:?})",
        polls[1] - polls[0]
    );

    let file = relay.path("state/frontdesk.refresh-token");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the token file is private");

    // The relay resumes by itself and delivers the queued message.
    wait_delivered(&fake, 1).await;
    let d = &fake.delivered()[0];
    assert_eq!(d.mailbox, MAILBOX);
    assert!(String::from_utf8_lossy(&d.data).contains("waiting for a sign-in"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while queued(&relay) > 0 {
        assert!(Instant::now() < deadline, "{id} never left the queue");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(accounts(&relay).await["accounts"][0]["state"], "active");
    assert_no_secrets(&fake, &[&out, &err], true);
}

#[tokio::test(flavor = "multi_thread")]
async fn browser_login_captures_the_code_on_its_own_listener() {
    let fake = FakeExchange::start().await;
    let f = Files::new(&fake);
    let dir = tempfile::tempdir().unwrap();
    let text = relay_config(&fake, &f, "", "");
    let config = load(&text, dir.path());
    let cli = dir.path().join("login.toml");

    // --open hands the URL to xdg-open; a stand-in records what it was given.
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let opened = dir.path().join("opened");
    std::fs::write(
        bin.join("xdg-open"),
        format!("#!/bin/sh\necho \"$1\" > {}\n", opened.display()),
    )
    .unwrap();
    std::fs::set_permissions(bin.join("xdg-open"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut child = std::process::Command::new(BIN)
        .args(login_args(&cli, &["--browser", "--open"]))
        .env("PATH", path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (url, rest) = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut lines = std::io::BufReader::new(stdout).lines();
        let url = lines
            .by_ref()
            .map_while(Result::ok)
            .find_map(|l| {
                l.trim()
                    .starts_with("http://")
                    .then(|| l.trim().to_string())
            })
            .expect("the authorize URL is printed");
        // Keep reading so the child never blocks on a full pipe.
        let rest = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>());
        (url, rest)
    })
    .await
    .unwrap();
    wait_exists(&opened).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::read_to_string(&opened).unwrap().trim() != url {
        assert!(Instant::now() < deadline, "xdg-open was not given the URL");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let authorize = reqwest::Url::parse(&url).unwrap();
    assert!(
        authorize.path().ends_with("/oauth2/v2.0/authorize"),
        "{url}"
    );
    let q: std::collections::HashMap<String, String> =
        authorize.query_pairs().into_owned().collect();
    assert_eq!(q["code_challenge_method"], "S256");
    assert_eq!(q["login_hint"], MAILBOX);
    let redirect = reqwest::Url::parse(&q["redirect_uri"]).unwrap();
    assert_eq!(redirect.host_str(), Some("localhost"));

    // A request with another state (stale tab, forgery) is refused; the listener keeps waiting.
    let port = redirect.port().unwrap();
    let forged = reqwest::get(format!(
        "http://127.0.0.1:{port}/?code=stolen&state=not-the-one"
    ))
    .await
    .unwrap();
    assert_eq!(forged.status(), 400);
    assert!(
        forged
            .text()
            .await
            .unwrap()
            .contains("state does not match")
    );

    // The browser: Entra's consent redirects to the listener, which takes the code itself.
    let browser = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::limited(3))
        .build()
        .unwrap();
    let page = browser.get(&url).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let body = page.text().await.unwrap();
    assert!(body.contains("signed in as relay@contoso.com"), "{body}");
    assert!(body.contains("You can close this tab"), "{body}");
    let (output, rest) = tokio::task::spawn_blocking(move || {
        (child.wait_with_output().unwrap(), rest.join().unwrap())
    })
    .await
    .unwrap();
    assert!(output.status.success());
    let printed = format!(
        "{}{}",
        rest.join("\n"),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        printed.contains("Signed in as relay@contoso.com for account frontdesk"),
        "{printed}"
    );
    let grant = stored_refresh_token(&config.accounts[0].token_file);
    assert_eq!(
        fake.delegated().issued_refresh.last(),
        Some(&grant),
        "the refresh token from the code exchange is stored"
    );

    // The library API: a wrong state is refused before the code is redeemed, and a code
    // redeemed with another login's PKCE verifier is refused by Entra.
    let account = &config.accounts[0];
    let (first_url, first) = login::start_browser_login(account, "http://localhost:1/").unwrap();
    let no_follow = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let back = no_follow.get(first_url.as_str()).send().await.unwrap();
    assert_eq!(back.status(), 302);
    let location = reqwest::Url::parse(back.headers()["location"].to_str().unwrap()).unwrap();
    let param = |k: &str| {
        location
            .query_pairs()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.into_owned())
            .unwrap()
    };
    assert_eq!(param("state"), first.state(), "Entra echoes the state");
    assert!(matches!(
        first.finish(&param("code"), "forged").await,
        Err(LoginError::StateMismatch)
    ));
    let (_, other) = login::start_browser_login(account, "http://localhost:1/").unwrap();
    match other.finish(&param("code"), other.state()).await {
        Err(LoginError::Refused { code, .. }) => assert_eq!(code, Some(501481)),
        other => panic!("a wrong PKCE verifier must be refused: {other:?}"),
    }
    assert_no_secrets(&fake, &[&printed], false);
}

#[tokio::test(flavor = "multi_thread")]
async fn rotated_refresh_token_survives_a_restart() {
    let fake = FakeExchange::start().await;
    let f = Files::new(&fake);
    // A confidential client (with a secret) and a state folder shared by both relays.
    let state = format!("state_dir = \"{}\"", f.path("state").display());
    let secret = format!(
        "client_secret_file = \"{}\"",
        f.path("client.secret").display()
    );
    let text = relay_config(&fake, &f, &state, &secret);
    let dir = tempfile::tempdir().unwrap();
    let config = load(&text, dir.path());
    let signed_in = quick_login(&fake, &config.accounts[0]).await;
    assert_eq!(signed_in.user.as_deref(), Some(MAILBOX));
    let file = f.path("state/frontdesk.refresh-token");
    let from_login = stored_refresh_token(&file);

    let mut relay = TestRelay::start(&text).await;
    submit(&relay, "first").await;
    wait_delivered(&fake, 1).await;
    let after_first = stored_refresh_token(&file);
    assert_ne!(after_first, from_login, "the refresh rotated the token");
    assert_eq!(
        fake.delegated().issued_refresh.last(),
        Some(&after_first),
        "the file holds the newest refresh token"
    );
    relay.stop().await;

    // The login's token was used up; only the rotated one in the file still works.
    let relay = TestRelay::start(&text).await;
    submit(&relay, "second").await;
    wait_delivered(&fake, 2).await;
    assert_eq!(fake.delegated().refreshes, 2);
    assert_eq!(
        fake.delegated().issued_refresh.last().cloned(),
        Some(stored_refresh_token(&file))
    );
    assert_no_secrets(&fake, &[], true);
}

#[tokio::test(flavor = "multi_thread")]
async fn revoked_grant_pauses_until_the_next_login_and_nothing_is_lost() {
    let fake = FakeExchange::start().await;
    let f = Files::new(&fake);
    // Each message on a new connection, so the next one authenticates (no pooled session).
    fake.faults().close_after_data = true;
    let relay = TestRelay::start(&relay_config(&fake, &f, "", "")).await;
    quick_login(&fake, &relay.config.accounts[0]).await;
    // Signed in while the relay runs: it picks the file up (a probe, no restart).
    submit(&relay, "before").await;
    wait_delivered(&fake, 1).await;

    // An administrator revokes the user's sessions (access tokens die with them, as with CAE).
    fake.revoke_grants(50173);
    fake.revoke_tokens();
    let id = submit(&relay, "after the revocation").await;
    let account = wait_paused(&relay, "revoked").await;
    let advice = account["advice"].to_string();
    assert!(
        advice.contains("exorelay login --account frontdesk"),
        "{advice}"
    );
    assert!(
        advice.contains("AADSTS50173"),
        "the cause is named: {advice}"
    );
    assert!(logs().contains("AADSTS50173"), "and logged");
    assert!(
        relay
            .path("spool/queue")
            .join(format!("{id}.json"))
            .exists(),
        "the message stays queued"
    );
    assert_eq!(fake.delivered_count(), 1);

    // The user signs in again; the relay delivers by itself, without a restart.
    quick_login(&fake, &relay.config.accounts[0]).await;
    wait_delivered(&fake, 2).await;
    assert!(String::from_utf8_lossy(&fake.delivered()[1].data).contains("after the revocation"));
    assert_no_secrets(&fake, &[], true);
}

#[tokio::test(flavor = "multi_thread")]
async fn device_code_that_expires_or_is_declined_fails_clearly() {
    let fake = FakeExchange::start().await;
    let f = Files::new(&fake);
    let dir = tempfile::tempdir().unwrap();
    let config = load(&relay_config(&fake, &f, "", ""), dir.path());
    let cli = dir.path().join("login.toml");
    for (outcome, expect) in [
        (DeviceOutcome::Expired, "sign-in code expired"),
        (DeviceOutcome::AccessDenied, "declined (access_denied)"),
        (DeviceOutcome::Declined, "declined (authorization_declined)"),
    ] {
        {
            let mut d = fake.delegated();
            d.device_pending_polls = 1;
            d.device_interval = 0;
            d.device_outcome = outcome;
        }
        let (ok, out, err) = run_bin(login_args(&cli, &[])).await;
        assert!(!ok, "{outcome:?}: a failed sign-in exits non-zero");
        assert!(err.contains(expect), "{outcome:?}: {out}{err}");
        assert!(!config.accounts[0].token_file.exists(), "nothing saved");
    }
    // doctor says the account is not signed in, and how to fix it.
    let (ok, out, _) = run_bin(vec![
        "doctor".into(),
        "--config".into(),
        cli.display().to_string(),
    ])
    .await;
    assert!(!ok, "{out}");
    assert!(out.contains("[FAIL] sign-in"), "{out}");
    assert!(out.contains("exorelay login --account frontdesk"), "{out}");
    // After a sign-in, doctor refreshes with it and reaches AUTH.
    quick_login(&fake, &config.accounts[0]).await;
    let (ok, out, _) = run_bin(vec![
        "doctor".into(),
        "--config".into(),
        cli.display().to_string(),
    ])
    .await;
    assert!(
        out.contains("[ok]   sign-in") && out.contains("signed in as relay@contoso.com"),
        "{out}"
    );
    assert!(out.contains("refreshed with the stored sign-in"), "{out}");
    assert!(out.contains("AUTH XOAUTH2 accepted"), "{out}");
    assert!(ok, "{out}");
    // A non-delegated account is refused with the reason.
    let (ok, _, err) = run_bin(vec![
        "login".into(),
        "--config".into(),
        cli.display().to_string(),
        "--account".into(),
        "nobody".into(),
    ])
    .await;
    assert!(!ok);
    assert!(err.contains("no account \"nobody\""), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn keep_alive_refresh_rotates_the_grant_even_with_a_fresh_access_token() {
    let fake = FakeExchange::start().await;
    let f = Files::new(&fake);
    let dir = tempfile::tempdir().unwrap();
    let config = load(&relay_config(&fake, &f, "", ""), dir.path());
    let account = &config.accounts[0];
    quick_login(&fake, account).await;
    let tokens = exorelay::oauth::TokenManager::new(account).unwrap();
    let first = tokens.token().await.unwrap();
    assert_eq!(fake.delegated().refreshes, 1);
    // The access token is fresh, so deliveries would not refresh; the keep-alive does.
    tokens.refresh_grant().await.unwrap();
    assert_eq!(fake.delegated().refreshes, 2);
    assert_eq!(
        fake.delegated().issued_refresh.last().cloned(),
        Some(stored_refresh_token(&account.token_file)),
        "the newest refresh token is kept"
    );
    let second = tokens.token().await.unwrap();
    assert!(
        !second.same_as(&first),
        "the keep-alive's access token is used from then on"
    );
    assert_eq!(fake.delegated().refreshes, 2, "and cached");
}

/// A delegated account added by a reload, nobody signed in yet: shown paused with the fix at
/// once, as at start, not "active" until its first mail fails.
#[tokio::test(flavor = "multi_thread")]
async fn a_delegated_account_added_by_reload_is_paused_until_a_sign_in() {
    let fake = FakeExchange::start().await;
    let f = Files::new(&fake);
    let relay = TestRelay::start(&relay_config(&fake, &f, "", "")).await;
    wait_paused(&relay, "never signed in").await;
    let path = relay.path("exorelay.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let second = text[text.find("[[account]]").unwrap()..text.find("[http]").unwrap()]
        .replace("name = \"frontdesk\"", "name = \"backdesk\"");
    std::fs::write(&path, text.replace("[http]", &format!("{second}[http]"))).unwrap();
    let r = reqwest::Client::new()
        .post(format!("http://{}/api/v1/reload", relay.http.unwrap()))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let v = accounts(&relay).await;
    let backdesk = v["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "backdesk")
        .unwrap_or_else(|| panic!("{v}"))
        .clone();
    assert_eq!(backdesk["state"], "paused", "{backdesk}");
    assert!(
        backdesk["advice"]
            .to_string()
            .contains("exorelay login --account backdesk"),
        "{backdesk}"
    );
}

//! Reload without restart: SIGHUP to the real binary while mail flows, `POST /api/v1/reload`,
//! `exorelay reload`, refused configs, listener and rule changes, and a paused account fixed by
//! a reload.

mod support;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use support::fake_exchange::*;
use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_exorelay");
const TOKEN: &str = "reload-admin-token-0123456789abcdef";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Writes `bytes` to `path` with mode 0600, atomically (temp file, then rename), as the README
/// tells administrators to.
fn write_private(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------- the real binary ----------

struct Bin {
    child: Child,
    log: PathBuf,
}

impl Bin {
    fn start(config: &Path, dir: &Path, port: u16) -> Bin {
        let log = dir.join("relay.log");
        let err = std::fs::File::create(&log).unwrap();
        let child = Command::new(BIN)
            .args(["run", "--config", config.to_str().unwrap()])
            .current_dir(dir)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !greets(port) {
            assert!(
                Instant::now() < deadline,
                "relay did not start; log: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Bin { child, log }
    }

    fn hup(&self) {
        // SAFETY: kill(2) on our own child's PID, with a valid signal number.
        let r = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGHUP) };
        assert_eq!(r, 0, "kill -HUP failed");
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log holds `needle` `n` times.
    async fn wait_log(&self, needle: &str, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.log().matches(needle).count() < n {
            assert!(
                Instant::now() < deadline,
                "log never said {needle:?} {n} times: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Bin {
    fn drop(&mut self) {
        // SAFETY: as in `hup`.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

fn subject_of(data: &[u8]) -> String {
    let text = String::from_utf8_lossy(data);
    text.lines()
        .find_map(|l| l.strip_prefix("Subject: "))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// One client on one SMTP session, sending messages until told to stop; returns the subjects
/// the relay acknowledged with 250. Any other reply, or a closed session, fails the test.
async fn client(addr: std::net::SocketAddr, name: String, stop: Arc<AtomicBool>) -> Vec<String> {
    let mut c = Dialog::connect(addr).await;
    c.expect("220").await;
    c.cmd("EHLO printer", "250").await;
    let mut acked = Vec::new();
    let mut n = 0;
    while !stop.load(Ordering::SeqCst) {
        let subject = format!("{name}-{n}");
        let body = format!("Subject: {subject}\r\n\r\n{}\r\n", "x".repeat(3000));
        c.send_mail(
            "scanner@printer.local",
            &["boss@example.com"],
            body.as_bytes(),
        )
        .await;
        acked.push(subject);
        n += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.cmd("QUIT", "221").await;
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sighup_with_a_new_secret_while_mail_flows_drops_no_session_and_loses_no_message() {
    let fake = FakeExchange::start().await;
    fake.set_rate(10_000, Duration::from_secs(1));
    let dir = tempfile::tempdir().unwrap();
    let old_secret = dir.path().join("contoso.secret");
    let new_secret = dir.path().join("contoso-2026.secret");
    write_private(&old_secret, format!("{SECRET}\n").as_bytes());
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &fake.smtp_ca_pem).unwrap();
    let port = free_port();
    let config_text = |secret: &Path| {
        format!(
            r#"hostname = "relay.test"
[[listener]]
address = "127.0.0.1:{port}"
[relay]
allowed_networks = ["127.0.0.1/32"]
[queue]
dir = "spool"
retry_initial = "200ms"
retry_max = "1s"
probe_interval = "1s"
[[account]]
name = "contoso"
kind = "exchange"
mailbox = "{MAILBOX}"
tenant = "{TENANT}"
client_id = "{CLIENT_ID}"
client_secret_file = "{}"
authority_url = "{}"
smtp_host = "127.0.0.1"
smtp_port = {}
ca_file = "{}"
rate_window = "1s"
"#,
            secret.display(),
            fake.authority(),
            fake.smtp_addr.port(),
            ca.display()
        )
    };
    let config = dir.path().join("exorelay.toml");
    std::fs::write(&config, config_text(&old_secret)).unwrap();
    let relay = Bin::start(&config, dir.path(), port);
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));

    // Several devices sending continuously over open sessions...
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..3)
        .map(|i| tokio::spawn(client(addr, format!("c{i}"), stop.clone())))
        .collect();
    // ...and one in the middle of DATA when the signal arrives.
    let mut mid = Dialog::connect(addr).await;
    mid.expect("220").await;
    mid.cmd("EHLO printer", "250").await;
    mid.cmd("MAIL FROM:<scanner@printer.local>", "250").await;
    mid.cmd("RCPT TO:<boss@example.com>", "250").await;
    mid.cmd("DATA", "354").await;
    mid.send_raw(b"Subject: mid-data\r\n\r\nfirst half\r\n")
        .await;
    eventually("mail reaches Exchange before the reload", || {
        fake.delivered_count() >= 5
    })
    .await;

    // The rotation: a new secret in a new file, the old one deleted in Entra, then SIGHUP.
    write_private(
        &new_secret,
        format!("{}\n", "new-Secret~Value.67890").as_bytes(),
    );
    fake.faults().accepted_secrets = vec!["new-Secret~Value.67890".to_string()];
    std::fs::write(&config, config_text(&new_secret)).unwrap();
    let (tokens_before, delivered_before) = (fake.token_requests(), fake.delivered_count());
    relay.hup();
    relay.wait_log("configuration reloaded", 1).await;

    mid.send_raw(b"second half\r\n.\r\n").await;
    mid.expect("250 2.0.0 Ok: queued as ").await;
    mid.cmd("QUIT", "221").await;
    // Mail goes on flowing with a token got with the new secret (the old one is refused now).
    eventually("delivery goes on after the reload", || {
        fake.delivered_count() >= delivered_before + 10
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let mut acked = vec!["mid-data".to_string()];
    for c in clients {
        acked.extend(c.await.unwrap());
    }
    eventually("every acknowledged message is delivered", || {
        fake.delivered_count() >= acked.len()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut seen: HashMap<String, usize> = HashMap::new();
    for d in fake.delivered() {
        *seen.entry(subject_of(&d.data)).or_default() += 1;
    }
    for s in &acked {
        assert_eq!(
            seen.get(s),
            Some(&1),
            "{s} delivered {:?} times",
            seen.get(s)
        );
    }
    assert_eq!(seen.len(), acked.len(), "unexpected deliveries: {seen:?}");
    assert!(
        fake.token_requests() > tokens_before,
        "no token was requested after the reload"
    );
    let log = relay.log();
    assert!(!log.contains(SECRET) && !log.contains("new-Secret~Value.67890"));
    assert!(log.contains("account contoso changed"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_config_is_refused_and_the_old_one_keeps_running() {
    let dir = tempfile::tempdir().unwrap();
    let (port, http_port) = (free_port(), free_port());
    let token = dir.path().join("admin.token");
    write_private(&token, format!("{TOKEN}\n").as_bytes());
    let good = format!(
        r#"hostname = "relay.test"
[[listener]]
address = "127.0.0.1:{port}"
[relay]
allowed_networks = ["127.0.0.1/32"]
[queue]
dir = "spool"
[[account]]
name = "local"
kind = "capture"
dir = "capture"
[http]
listen = "127.0.0.1:{http_port}"
admin_token_file = "{}"
"#,
        token.display()
    );
    let config = dir.path().join("exorelay.toml");
    std::fs::write(&config, &good).unwrap();
    let relay = Bin::start(&config, dir.path(), port);
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let base = format!("http://127.0.0.1:{http_port}");
    let http = reqwest::Client::new();

    // A typo on SIGHUP: refused with check's file:line: field message; the old config runs on.
    std::fs::write(
        &config,
        good.replace("[relay]", "[relay]\nmax_mesage_size = \"10MB\""),
    )
    .unwrap();
    relay.hup();
    relay.wait_log("configuration reload refused", 1).await;
    let expected = format!(
        "{}:5: relay.max_mesage_size: unknown field `max_mesage_size`",
        config.display()
    );
    assert!(relay.log().contains(&expected), "{}", relay.log());
    let mut c = Dialog::connect(addr).await;
    c.expect("220").await;
    c.cmd("EHLO printer", "250").await;
    c.send_mail(
        "a@printer.local",
        &["b@example.com"],
        b"Subject: after\r\n\r\nx\r\n",
    )
    .await;

    // The same through the API: 400 with the message; without the token: 401.
    let r = http
        .post(format!("{base}/api/v1/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .post(format!("{base}/api/v1/reload"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: serde_json::Value = r.json().await.unwrap();
    assert!(v["error"].as_str().unwrap().contains(&expected), "{v}");

    // A change only a restart can make: refused, naming the field and the restart.
    std::fs::write(&config, good.replace("dir = \"spool\"", "dir = \"spool2\"")).unwrap();
    let r = http
        .post(format!("{base}/api/v1/reload"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    let v: serde_json::Value = r.json().await.unwrap();
    let e = v["error"].as_str().unwrap();
    assert!(
        e.contains(&format!("{}:7: queue.dir:", config.display()))
            && e.contains("restart exorelay to change queue.dir"),
        "{e}"
    );

    // Still the old config: the same session sends again; then a valid change goes through
    // `exorelay reload`.
    c.send_mail(
        "a@printer.local",
        &["b@example.com"],
        b"Subject: again\r\n\r\nx\r\n",
    )
    .await;
    std::fs::write(&config, good.replace("relay.test", "relay2.test")).unwrap();
    let out = Command::new(BIN)
        .args(["reload", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("configuration reloaded") && stdout.contains("hostname changed"),
        "{stdout}"
    );
    // The open session keeps its name; a new one gets the new.
    let r = c.cmd("EHLO printer", "250").await;
    assert!(
        r.contains("relay.test") && !r.contains("relay2.test"),
        "{r}"
    );
    let mut d = Dialog::connect(addr).await;
    d.expect("220 relay2.test").await;

    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("exorelay_config_reloads_total{result=\"refused\"} 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("exorelay_config_reloads_total{result=\"ok\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("exorelay_config_last_reload_success_timestamp_seconds "),
        "{metrics}"
    );
}

// ---------- in-process relays, reloaded through the API ----------

/// An in-process relay with an admin token; `body` as for [`TestRelay::start`].
async fn relay_with_api(body: &str) -> (TestRelay, tempfile::TempDir) {
    let token_dir = tempfile::tempdir().unwrap();
    let token = token_dir.path().join("admin.token");
    write_private(&token, format!("{TOKEN}\n").as_bytes());
    let relay = TestRelay::start(&format!(
        "{body}\n[http]\nlisten = \"127.0.0.1:0\"\nadmin_token_file = \"{}\"\n",
        token.display()
    ))
    .await;
    (relay, token_dir)
}

/// Rewrites the relay's config file with `edit` and reloads through the API; returns the
/// status and the JSON answer.
async fn reload(
    relay: &TestRelay,
    edit: impl FnOnce(String) -> String,
) -> (u16, serde_json::Value) {
    let path = relay.path("exorelay.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, edit(text)).unwrap();
    let r = reqwest::Client::new()
        .post(format!("http://{}/api/v1/reload", relay.http.unwrap()))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

#[tokio::test]
async fn a_removed_listener_stops_accepting_while_its_open_session_completes() {
    let (relay, _token) = relay_with_api(&basic_config("")).await;
    let old = relay.addr();
    let mut open = Dialog::connect(old).await;
    open.expect("220").await;
    open.cmd("EHLO printer", "250").await;
    open.cmd("MAIL FROM:<a@printer.local>", "250").await;
    open.cmd("RCPT TO:<b@example.com>", "250").await;

    let new_port = free_port();
    let (status, v) = reload(&relay, |t| {
        // The listener's address only (the HTTP side's comes later in the file).
        t.replacen("127.0.0.1:0", &format!("127.0.0.1:{new_port}"), 1)
    })
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["reloaded"], true);
    let changes = v["changes"].to_string();
    assert!(
        changes.contains(&format!("listener 127.0.0.1:{new_port} added"))
            && changes.contains("listener 127.0.0.1:0 removed"),
        "{changes}"
    );

    // The new listener accepts at once (bound before the answer).
    let mut fresh = Dialog::connect(([127, 0, 0, 1], new_port).into()).await;
    fresh.expect("220").await;
    fresh.cmd("EHLO printer", "250").await;
    fresh
        .send_mail(
            "a@printer.local",
            &["b@example.com"],
            b"Subject: new\r\n\r\nx\r\n",
        )
        .await;
    // The old one refuses connections; its open session still completes its message.
    let mut refused = false;
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(old).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "the removed listener still accepts");
    open.cmd("DATA", "354").await;
    open.send_raw(b"Subject: old\r\n\r\nx\r\n.\r\n").await;
    open.expect("250 2.0.0 Ok: queued as ").await;
    open.cmd("QUIT", "221").await;
    let captured = wait_captured(&relay.path("capture"), 2).await;
    assert_eq!(captured.len(), 2);
}

#[tokio::test]
async fn new_rules_apply_to_new_sessions_and_open_sessions_keep_theirs() {
    let (relay, _token) = relay_with_api(&basic_config("")).await;
    let mut open = Dialog::connect(relay.addr()).await;
    open.expect("220").await;
    open.cmd("EHLO printer", "250").await;

    let (status, v) = reload(&relay, |t| {
        t.replace("127.0.0.1/32", "127.0.0.2/32")
            .replace("name = \"scanner\"", "name = \"copier\"")
    })
    .await;
    assert_eq!(status, 200, "{v}");
    let changes = v["changes"].to_string();
    assert!(
        changes.contains("relay settings changed") && changes.contains("users changed"),
        "{changes}"
    );

    // A new session from 127.0.0.1 is no longer in allowed_networks, and "scanner" is gone.
    let mut outsider = Dialog::connect(relay.addr()).await;
    outsider.expect("220").await;
    outsider.cmd("EHLO printer", "250").await;
    outsider.cmd("MAIL FROM:<a@printer.local>", "530").await;
    use base64::Engine;
    let plain = |user: &str| {
        base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{PASSWORD}"))
    };
    outsider
        .cmd(&format!("AUTH PLAIN {}", plain("scanner")), "535")
        .await;
    // The renamed user logs in.
    let mut copier = Dialog::connect(relay.addr()).await;
    copier.expect("220").await;
    copier.cmd("EHLO printer", "250").await;
    copier
        .cmd(&format!("AUTH PLAIN {}", plain("copier")), "235")
        .await;
    copier
        .send_mail(
            "a@printer.local",
            &["b@example.com"],
            b"Subject: copier\r\n\r\nx\r\n",
        )
        .await;
    // 127.0.0.2 is allowed now.
    let mut inside = Dialog::connect_from([127, 0, 0, 2].into(), relay.addr()).await;
    inside.expect("220").await;
    inside.cmd("EHLO printer", "250").await;
    inside
        .send_mail(
            "a@printer.local",
            &["b@example.com"],
            b"Subject: inside\r\n\r\nx\r\n",
        )
        .await;
    // The session opened before the reload still sends without logging in.
    open.send_mail(
        "a@printer.local",
        &["b@example.com"],
        b"Subject: open\r\n\r\nx\r\n",
    )
    .await;
    wait_captured(&relay.path("capture"), 3).await;
}

#[tokio::test]
async fn a_paused_account_fixed_by_a_reload_resumes_at_once() {
    let fake = FakeExchange::start().await;
    let creds = tempfile::tempdir().unwrap();
    let secret = creds.path().join("contoso.secret");
    write_private(&secret, b"a-wrong-secret\n");
    let ca = creds.path().join("ca.pem");
    std::fs::write(&ca, &fake.smtp_ca_pem).unwrap();
    let body = format!(
        r#"
[[listener]]
address = "127.0.0.1:0"
[relay]
allowed_networks = ["127.0.0.1/32"]
[queue]
dir = "{{dir}}/spool"
retry_initial = "200ms"
retry_max = "1s"
probe_interval = "1h"
[[account]]
name = "contoso"
kind = "exchange"
mailbox = "{MAILBOX}"
tenant = "{TENANT}"
client_id = "{CLIENT_ID}"
client_secret_file = "{}"
authority_url = "{}"
smtp_host = "127.0.0.1"
smtp_port = {}
ca_file = "{}"
"#,
        secret.display(),
        fake.authority(),
        fake.smtp_addr.port(),
        ca.display()
    );
    let (relay, _token) = relay_with_api(&body).await;
    let mut c = Dialog::connect(relay.addr()).await;
    c.expect("220").await;
    c.cmd("EHLO printer", "250").await;
    c.send_mail(
        "a@printer.local",
        &["b@example.com"],
        b"Subject: waiting\r\n\r\nx\r\n",
    )
    .await;
    let api = format!("http://{}/api/v1/accounts", relay.http.unwrap());
    let deadline = Instant::now() + Duration::from_secs(15);
    while account_state(&api).await != "paused" {
        assert!(Instant::now() < deadline, "the account never paused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The administrator writes the right Value into the same file and reloads: no hour-long
    // wait for the next probe.
    write_private(&secret, format!("{SECRET}\n").as_bytes());
    let (status, v) = reload(&relay, |t| t).await;
    assert_eq!(status, 200, "{v}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while fake.delivered_count() != 1 {
        assert!(
            Instant::now() < deadline,
            "the waiting message was not delivered after the reload: {}",
            logs()
                .lines()
                .filter(|l| l.contains("exorelay::forward") || l.contains("reload"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(account_state(&api).await, "active");
}

async fn account_state(api: &str) -> String {
    let v: serde_json::Value = reqwest::get(api).await.unwrap().json().await.unwrap();
    v["accounts"][0]["state"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn a_renewed_certificate_is_used_by_new_sessions() {
    let (relay, _token) = relay_with_api(&format!(
        r#"
[[listener]]
address = "127.0.0.1:0"
tls = "starttls"
cert = "{{cert}}"
key = "{{key}}"
{}"#,
        basic_config("")
            .split_once("plaintext_auth = true\n")
            .unwrap()
            .1
    ))
    .await;
    // The certificate files are replaced in place (as certbot or an administrator would).
    let renewed = make_cert(relay.dir.path());
    let (status, v) = reload(&relay, |t| t).await;
    assert_eq!(status, 200, "{v}");
    let mut c = Dialog::connect(relay.addr()).await;
    c.expect("220").await;
    c.cmd("EHLO printer", "250").await;
    c.cmd("STARTTLS", "220").await;
    // Trusting only the renewed certificate: the handshake succeeds only if it is served.
    let mut c = c.into_tls(&renewed.cert_pem).await;
    c.cmd("EHLO printer", "250").await;
    c.send_mail(
        "a@printer.local",
        &["b@example.com"],
        b"Subject: tls\r\n\r\nx\r\n",
    )
    .await;
}

#[tokio::test]
async fn a_port_in_use_refuses_the_whole_reload() {
    let (relay, _token) = relay_with_api(&basic_config("")).await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let (status, v) = reload(&relay, |t| {
        t.replace("hostname = \"relay.test\"", "hostname = \"relay2.test\"")
            .replacen(
                "[relay]",
                &format!("[[listener]]\naddress = \"127.0.0.1:{port}\"\n[relay]"),
                1,
            )
    })
    .await;
    assert_eq!(status, 409, "{v}");
    let e = v["error"].as_str().unwrap();
    assert!(
        e.contains(&format!("listener 127.0.0.1:{port}: cannot listen")),
        "{e}"
    );
    // Nothing of it was applied: the hostname is the old one.
    let mut c = Dialog::connect(relay.addr()).await;
    c.expect("220 relay.test").await;
}

#[tokio::test]
async fn mail_of_a_removed_account_goes_through_the_default_account() {
    let body = basic_config("").replace(
        "[[user]]\nname = \"scanner\"\npassword_hash = \"{hash}\"\n",
        "[[user]]\nname = \"scanner\"\npassword_hash = \"{hash}\"\naccount = \"other\"\n",
    ) + "[[account]]\nname = \"other\"\nkind = \"capture\"\ndir = \"{dir}/other\"\n";
    let (relay, _token) = relay_with_api(&body).await;
    // "other" cannot deliver (a file where its folder should be): its mail stays queued.
    let other = relay.path("other");
    wait_exists(&other).await;
    std::fs::remove_dir_all(&other).unwrap();
    std::fs::write(&other, b"not a folder").unwrap();
    let mut c = Dialog::connect(relay.addr()).await;
    c.expect("220").await;
    c.cmd("EHLO printer", "250").await;
    use base64::Engine;
    let plain = base64::engine::general_purpose::STANDARD.encode(format!("\0scanner\0{PASSWORD}"));
    c.cmd(&format!("AUTH PLAIN {plain}"), "235").await;
    let id = c
        .send_mail(
            "a@printer.local",
            &["b@example.com"],
            b"Subject: orphan\r\n\r\nx\r\n",
        )
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(relay.path(&format!("spool/queue/{id}.json")).exists());

    let (status, v) = reload(&relay, |t| {
        t.replace("account = \"other\"\n", "").replace(
            "[[account]]\nname = \"other\"\nkind = \"capture\"\ndir = \"",
            "# removed: ",
        )
    })
    .await;
    assert_eq!(status, 200, "{v}");
    assert!(
        v["changes"].to_string().contains("account other removed"),
        "{v}"
    );
    let captured = wait_captured(&relay.path("capture"), 1).await;
    assert_eq!(captured[0].0, id);
}

#[tokio::test]
async fn reloads_run_one_at_a_time() {
    let (relay, _token) = relay_with_api(&basic_config("")).await;
    let port = free_port();
    let path = relay.path("exorelay.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replacen(
            "[relay]",
            &format!("[[listener]]\naddress = \"127.0.0.1:{port}\"\n[relay]"),
            1,
        ),
    )
    .unwrap();
    // Run side by side, two reloads would both bind the new port and one would fail.
    let url = format!("http://{}/api/v1/reload", relay.http.unwrap());
    let calls: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let r = reqwest::Client::new()
                    .post(url)
                    .bearer_auth(TOKEN)
                    .send()
                    .await
                    .unwrap();
                (r.status().as_u16(), r.text().await.unwrap())
            })
        })
        .collect();
    let mut added = 0;
    for c in calls {
        let (status, body) = c.await.unwrap();
        assert_eq!(status, 200, "{body}");
        added += usize::from(body.contains("added"));
    }
    assert_eq!(added, 1, "the listener was added more than once");
    let mut c = Dialog::connect(([127, 0, 0, 1], port).into()).await;
    c.expect("220").await;
}

#[tokio::test]
async fn an_administrators_pause_survives_a_reload_and_the_admin_token_is_read_again() {
    let (relay, token) = relay_with_api(&basic_config("")).await;
    let base = format!("http://{}", relay.http.unwrap());
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{base}/api/v1/accounts/local/pause"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The account changes (a new capture folder) and the admin token is replaced.
    let new_token = "a-new-admin-token-fedcba9876543210";
    write_private(
        &token.path().join("admin.token"),
        format!("{new_token}\n").as_bytes(),
    );
    let (status, v) = reload(&relay, |t| t.replace("/capture\"", "/capture2\"")).await;
    assert_eq!(status, 200, "{v}");
    assert!(
        v["changes"].to_string().contains("account local changed"),
        "{v}"
    );
    let api = format!("{base}/api/v1/accounts");
    // Still paused: mail sent now waits for the administrator.
    assert_eq!(account_state(&api).await, "paused");
    let mut c = Dialog::connect(relay.addr()).await;
    c.expect("220").await;
    c.cmd("EHLO printer", "250").await;
    let id = c
        .send_mail(
            "a@printer.local",
            &["b@example.com"],
            b"Subject: new dir\r\n\r\nx\r\n",
        )
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(relay.path(&format!("spool/queue/{id}.json")).exists());
    let old = http
        .post(format!("{base}/api/v1/accounts/local/resume"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(old.status(), 401);
    let new = http
        .post(format!("{base}/api/v1/accounts/local/resume"))
        .bearer_auth(new_token)
        .send()
        .await
        .unwrap();
    assert_eq!(new.status(), 200);
    let captured = wait_captured(&relay.path("capture2"), 1).await;
    assert_eq!(captured[0].0, id);
}

#[tokio::test]
async fn new_queue_settings_apply_to_the_next_decision() {
    let (relay, _token) = relay_with_api(&basic_config("")).await;
    let capture = break_capture(&relay).await;
    let mut c = Dialog::connect(relay.addr()).await;
    c.expect("220").await;
    c.cmd("EHLO printer", "250").await;
    let id = c
        .send_mail(
            "a@printer.local",
            &["b@example.com"],
            b"Subject: old\r\n\r\nx\r\n",
        )
        .await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(relay.path(&format!("spool/queue/{id}.json")).exists());
    // Its next attempt is judged by the new max_age: it is older than that, so it fails.
    let (status, v) = reload(&relay, |t| {
        t.replace("[queue]", "[queue]\nmax_age = \"1s\"")
    })
    .await;
    assert_eq!(status, 200, "{v}");
    let failed = relay.path(&format!("spool/failed/{id}.json"));
    eventually("the message expires under the new max_age", || {
        failed.exists()
    })
    .await;
    repair_capture(&capture);
}

#[tokio::test]
async fn a_new_secret_expiry_date_replaces_the_warning() {
    let fake = FakeExchange::start().await;
    let creds = tempfile::tempdir().unwrap();
    let secret = creds.path().join("contoso.secret");
    write_private(&secret, format!("{SECRET}\n").as_bytes());
    let soon = (chrono::Utc::now() + chrono::Duration::days(5)).date_naive();
    let later = (chrono::Utc::now() + chrono::Duration::days(700)).date_naive();
    let body = format!(
        r#"
[[listener]]
address = "127.0.0.1:0"
[relay]
allowed_networks = ["127.0.0.1/32"]
[queue]
dir = "{{dir}}/spool"
[[account]]
name = "contoso"
kind = "exchange"
mailbox = "{MAILBOX}"
tenant = "{TENANT}"
client_id = "{CLIENT_ID}"
client_secret_file = "{}"
client_secret_expires = "{soon}"
authority_url = "{}"
smtp_host = "127.0.0.1"
smtp_port = {}
"#,
        secret.display(),
        fake.authority(),
        fake.smtp_addr.port(),
    );
    let (relay, _token) = relay_with_api(&body).await;
    let api = format!("http://{}/api/v1/accounts", relay.http.unwrap());
    let warnings = || async {
        let v: serde_json::Value = reqwest::get(api.as_str())
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["accounts"][0]["credential_warnings"]
            .as_array()
            .map(Vec::len)
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while warnings().await == 0 {
        assert!(Instant::now() < deadline, "no expiry warning");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, v) = reload(&relay, |t| t.replace(&soon.to_string(), &later.to_string())).await;
    assert_eq!(status, 200, "{v}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while warnings().await != 0 {
        assert!(Instant::now() < deadline, "the old warning stayed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // No expiry date at all: its series goes, so no stale date keeps an alert firing.
    let series = "exorelay_credential_expiry_timestamp_seconds{account=\"contoso\",credential=\"client_secret\"}";
    let metrics_url = format!("http://{}/metrics", relay.http.unwrap());
    let metrics = || async {
        reqwest::get(metrics_url.as_str())
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    assert!(metrics().await.contains(series));
    let (status, v) = reload(&relay, |t| {
        t.replace(&format!("client_secret_expires = \"{later}\"\n"), "")
    })
    .await;
    assert_eq!(status, 200, "{v}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while metrics().await.contains(series) {
        assert!(
            Instant::now() < deadline,
            "the removed date's series stayed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

//! Failover end to end: an Exchange account ("contoso", the fake Exchange) with
//! `fallback = "spare"`. While the fake answers AUTH with `535 5.7.139`, mail goes out through
//! the fallback; the API, the status page, the log and the metrics say so and why; once the fault
//! is cleared the next probe works and mail goes through "contoso" again.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use support::fake_exchange::*;
use support::*;

const TOKEN: &str = "failover-admin-token-0123456789ab";

const AUTH_DISABLED: &str = "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox. Visit https://aka.ms/smtp_auth_disabled for more information. [X]";

/// Credentials, CA and admin token files under one folder (mode 0600).
struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new(fakes: &[&FakeExchange]) -> Files {
        let dir = tempfile::tempdir().unwrap();
        let private = |name: &str, bytes: &[u8]| {
            let p = dir.path().join(name);
            std::fs::write(&p, bytes).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        };
        private("secret", format!("{SECRET}\n").as_bytes());
        private("admin.token", format!("{TOKEN}\n").as_bytes());
        for (i, fake) in fakes.iter().enumerate() {
            std::fs::write(dir.path().join(format!("ca{i}.pem")), &fake.smtp_ca_pem).unwrap();
        }
        Files { dir }
    }

    /// An exchange account named `name` sending to `fakes[i]`.
    fn exchange(&self, name: &str, fake: &FakeExchange, i: usize, extra: &str) -> String {
        let d = self.dir.path().display();
        format!(
            r#"
[[account]]
name = "{name}"
kind = "exchange"
mailbox = "{MAILBOX}"
tenant = "{TENANT}"
client_id = "{CLIENT_ID}"
client_secret_file = "{d}/secret"
authority_url = "{}"
smtp_host = "127.0.0.1"
smtp_port = {}
ca_file = "{d}/ca{i}.pem"
rate_window = "1s"
{extra}
"#,
            fake.authority(),
            fake.smtp_addr.port(),
        )
    }

    fn relay(&self, accounts: &str) -> String {
        let d = self.dir.path().display();
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
[http]
listen = "127.0.0.1:0"
admin_token_file = "{d}/admin.token"
{accounts}
"#
        )
    }
}

const CAPTURE_SPARE: &str = r#"
[[account]]
name = "spare"
kind = "capture"
dir = "{dir}/capture"
"#;

async fn submit(relay: &TestRelay, subject: &str) -> String {
    let mut c = Dialog::connect(relay.addr()).await;
    c.expect("220").await;
    c.cmd("EHLO printer", "250").await;
    let body = format!("Subject: {subject}\r\n\r\nx\r\n");
    let id = c
        .send_mail(
            "scanner@printer.local",
            &["boss@contoso.com"],
            body.as_bytes(),
        )
        .await;
    c.cmd("QUIT", "221").await;
    id
}

async fn get(relay: &TestRelay, path: &str) -> String {
    let url = format!("http://{}{path}", relay.http.expect("http side bound"));
    let r = reqwest::Client::new()
        .get(url)
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    r.text().await.unwrap()
}

async fn account(relay: &TestRelay, name: &str) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(&get(relay, "/api/v1/accounts").await).unwrap();
    v["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == name)
        .cloned()
        .unwrap()
}

async fn post(relay: &TestRelay, path: &str) -> u16 {
    let url = format!("http://{}{path}", relay.http.expect("http side bound"));
    let r = reqwest::Client::new()
        .post(url)
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    r.status().as_u16()
}

async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(Instant::now() < deadline, "never: {what}\n{}", logs());
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn queued(relay: &TestRelay) -> usize {
    std::fs::read_dir(relay.path("spool/queue"))
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
                .count()
        })
        .unwrap_or(0)
}

fn subjects(captured: &[(String, Vec<u8>)]) -> Vec<String> {
    let mut v: Vec<String> = captured
        .iter()
        .filter_map(|(_, b)| {
            String::from_utf8_lossy(b)
                .lines()
                .find_map(|l| l.strip_prefix("Subject: ").map(str::to_string))
        })
        .collect();
    v.sort();
    v
}

/// Waits until the account's next probe time (shown by the API) has passed.
async fn wait_probe_due(relay: &TestRelay) {
    let a = account(relay, "contoso").await;
    let next: chrono::DateTime<chrono::Utc> = a["next_probe"].as_str().unwrap().parse().unwrap();
    eventually("the probe falls due", async || chrono::Utc::now() > next).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn failover_from_smtp_on_5_7_139_and_back() {
    let fake = FakeExchange::start().await;
    let files = Files::new(&[&fake]);
    let accounts = files.exchange("contoso", &fake, 0, "fallback = \"spare\"") + CAPTURE_SPARE;
    let relay = TestRelay::start(&files.relay(&accounts)).await;
    fake.faults().auth_always = Some(AUTH_DISABLED.into());

    // 5.7.139: the first message goes out through the fallback.
    submit(&relay, "one").await;
    let capture = relay.path("capture");
    wait_captured(&capture, 1).await;
    let a = account(&relay, "contoso").await;
    assert_eq!(a["state"], "paused", "{a}");
    let text = a["failing_over"].as_str().unwrap_or_default();
    assert!(
        text.starts_with("failing over to spare: ") && text.contains("SMTP AUTH is disabled"),
        "{a}"
    );
    assert_eq!(a["failover"]["to"], "spare", "{a}");
    let page = get(&relay, "/").await;
    assert!(page.contains("failing over to spare: "), "{page}");
    let metrics = get(&relay, "/metrics").await;
    assert!(
        metrics.contains("exorelay_account_failover{account=\"contoso\",fallback=\"spare\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "exorelay_fallback_deliveries_total{account=\"contoso\",fallback=\"spare\"} 1"
        ),
        "{metrics}"
    );
    assert!(
        logs()
            .lines()
            .any(|l| l.contains("failing over") && l.contains("5.7.139")),
        "the log names the switch and its cause"
    );

    // More mail while the fault lasts: all of it through the fallback, each message once.
    submit(&relay, "two").await;
    submit(&relay, "three").await;
    let got = wait_captured(&capture, 3).await;
    eventually("the queue empties", async || queued(&relay) == 0).await;
    assert_eq!(subjects(&got), ["one", "three", "two"]);
    assert!(fake.delivered().is_empty());

    // Fixed: the next probe goes through contoso and works; mail goes that way again.
    fake.faults().auth_always = None;
    wait_probe_due(&relay).await;
    submit(&relay, "four").await;
    eventually("the probe delivers", async || fake.delivered().len() == 1).await;
    eventually("switched back", async || {
        account(&relay, "contoso").await["failing_over"].is_null()
    })
    .await;
    submit(&relay, "five").await;
    eventually("delivered by contoso", async || fake.delivered().len() == 2).await;
    eventually("the queue empties", async || queued(&relay) == 0).await;
    let got = wait_captured(&capture, 3).await;
    assert_eq!(got.len(), 3, "nothing more through the fallback");
    let metrics = get(&relay, "/metrics").await;
    assert!(
        metrics.contains("exorelay_account_failover{account=\"contoso\",fallback=\"spare\"} 0"),
        "{metrics}"
    );
    assert!(logs().lines().any(|l| l.contains("switching back")));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_administrators_pause_does_not_fail_over() {
    let fake = FakeExchange::start().await;
    let files = Files::new(&[&fake]);
    let accounts = files.exchange("contoso", &fake, 0, "fallback = \"spare\"") + CAPTURE_SPARE;
    let relay = TestRelay::start(&files.relay(&accounts)).await;
    assert_eq!(post(&relay, "/api/v1/accounts/contoso/pause").await, 200);
    submit(&relay, "held back").await;
    // Several probe intervals: nothing goes anywhere.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(queued(&relay), 1);
    assert!(wait_dir_empty(&relay.path("capture")));
    assert!(fake.delivered().is_empty());
    assert!(account(&relay, "contoso").await["failing_over"].is_null());
    assert_eq!(post(&relay, "/api/v1/accounts/contoso/resume").await, 200);
    eventually("delivered by contoso", async || fake.delivered().len() == 1).await;
}

fn wait_dir_empty(dir: &std::path::Path) -> bool {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0) == 0
}

/// The fallback is a second Exchange account that is refused too: the mail stays queued, in one
/// piece, until the fallback works; then it goes out through it, once.
#[tokio::test(flavor = "multi_thread")]
async fn a_blocked_fallback_keeps_mail_queued() {
    let (fake, second) = (FakeExchange::start().await, FakeExchange::start().await);
    let files = Files::new(&[&fake, &second]);
    let accounts = files.exchange("contoso", &fake, 0, "fallback = \"spare\"")
        + &files.exchange("spare", &second, 1, "");
    let relay = TestRelay::start(&files.relay(&accounts)).await;
    fake.faults().auth_always = Some(AUTH_DISABLED.into());
    second.faults().auth_always = Some(AUTH_DISABLED.into());
    submit(&relay, "waits").await;
    eventually("both paused", async || {
        account(&relay, "spare").await["state"] == "paused"
            && account(&relay, "contoso").await["state"] == "paused"
    })
    .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(queued(&relay), 1, "the mail waits");
    assert!(fake.delivered().is_empty() && second.delivered().is_empty());
    // The fallback works again: its probe (this message) delivers it.
    second.faults().auth_always = None;
    eventually("delivered by the fallback", async || {
        second.delivered().len() == 1
    })
    .await;
    eventually("the queue empties", async || queued(&relay) == 0).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(second.delivered().len(), 1, "once");
    assert!(fake.delivered().is_empty());
}

/// The documented use: SMTP AUTH switched off for the mailbox (5.7.139), and its mail goes out
/// through Microsoft Graph (`kind = "graph"`, the fake Graph) until SMTP works again.
#[tokio::test(flavor = "multi_thread")]
async fn failover_to_graph_on_5_7_139_and_back() {
    use support::fake_graph::{FakeGraph, SECRET as GRAPH_SECRET};
    let fake = FakeExchange::start().await;
    let graph = FakeGraph::start().await;
    let files = Files::new(&[&fake]);
    let graph_secret = files.dir.path().join("graph.secret");
    std::fs::write(&graph_secret, format!("{GRAPH_SECRET}\n")).unwrap();
    std::fs::set_permissions(&graph_secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let accounts = files.exchange("contoso", &fake, 0, "fallback = \"graphout\"")
        + &format!(
            r#"
[[account]]
name = "graphout"
kind = "graph"
mailbox = "{MAILBOX}"
tenant = "{TENANT}"
client_id = "{CLIENT_ID}"
client_secret_file = "{}"
authority_url = "{url}"
graph_url = "{url}"
"#,
            graph_secret.display(),
            url = graph.url(),
        );
    let relay = TestRelay::start(&files.relay(&accounts)).await;
    fake.faults().auth_always = Some(AUTH_DISABLED.into());

    submit(&relay, "through graph").await;
    eventually("sent through Graph", async || graph.sent_count() == 1).await;
    let a = account(&relay, "contoso").await;
    assert!(
        a["failing_over"]
            .as_str()
            .is_some_and(|t| t.starts_with("failing over to graphout: ")),
        "{a}"
    );
    let sent = graph.sent();
    assert_eq!(sent[0].recipients, ["boss@contoso.com"]);
    assert!(String::from_utf8_lossy(&sent[0].mime).contains("Subject: through graph"));
    assert!(fake.delivered().is_empty());

    fake.faults().auth_always = None;
    wait_probe_due(&relay).await;
    submit(&relay, "through smtp").await;
    eventually("the probe delivers over SMTP", async || {
        fake.delivered().len() == 1
    })
    .await;
    eventually("switched back", async || {
        account(&relay, "contoso").await["failing_over"].is_null()
    })
    .await;
    eventually("the queue empties", async || queued(&relay) == 0).await;
    assert_eq!(graph.sent_count(), 1, "each message once");
}

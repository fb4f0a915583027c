//! The forwarder's promise of one delivery attempt per message at a time, end to end: the fake
//! Exchange counts deliveries, the HTTP API sends the administrator's commands, and a restart on
//! the same spool shows what the attempts left behind.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use support::fake_exchange::*;
use support::*;

const TOKEN: &str = "test-admin-token-0123456789abcdef";

/// A relay with an HTTP side and one Exchange account ("contoso") pointing at `fake`, its spool
/// in `spool_root`, so that a second relay can be started on the same spool.
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new(fake: &FakeExchange) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let private = |name: &str, bytes: &[u8]| {
            let p = dir.path().join(name);
            std::fs::write(&p, bytes).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        };
        private("contoso.secret", format!("{SECRET}\n").as_bytes());
        private("admin.token", format!("{TOKEN}\n").as_bytes());
        std::fs::write(dir.path().join("ca.pem"), &fake.smtp_ca_pem).unwrap();
        Setup { dir }
    }

    fn config(&self, fake: &FakeExchange) -> String {
        let d = self.dir.path().display();
        format!(
            r#"
[[listener]]
address = "127.0.0.1:0"
[relay]
allowed_networks = ["127.0.0.1/32"]
[queue]
dir = "{d}/spool"
retry_initial = "200ms"
retry_max = "1s"
probe_interval = "1s"
[http]
listen = "127.0.0.1:0"
admin_token_file = "{d}/admin.token"
[[account]]
name = "contoso"
kind = "exchange"
mailbox = "{MAILBOX}"
tenant = "{TENANT}"
client_id = "{CLIENT_ID}"
client_secret_file = "{d}/contoso.secret"
authority_url = "{}"
smtp_host = "127.0.0.1"
smtp_port = {}
ca_file = "{d}/ca.pem"
rate_window = "1s"
max_connections = 2
"#,
            fake.authority(),
            fake.smtp_addr.port(),
        )
    }

    fn files_in(&self, area: &str) -> Vec<String> {
        std::fs::read_dir(self.dir.path().join("spool").join(area))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

async fn admin(relay: &TestRelay, path: &str) -> (u16, String) {
    let url = format!("http://{}{path}", relay.http.expect("http side bound"));
    let r = reqwest::Client::new()
        .post(url)
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap_or_default())
}

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

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The review's case: a message waits for its paused account, the administrator retries it, then
/// resumes the account. It must go out once, and leave nothing in `queue/` or `corrupt/`.
#[tokio::test(flavor = "multi_thread")]
async fn retry_of_a_message_waiting_for_its_account_delivers_it_once() {
    let fake = FakeExchange::start().await;
    let setup = Setup::new(&fake);
    let mut relay = TestRelay::start(&setup.config(&fake)).await;
    let (code, text) = admin(&relay, "/api/v1/accounts/contoso/pause").await;
    assert_eq!(code, 200, "{text}");
    let id = submit(&relay, "waiting").await;
    // Give the forwarder time to take the message and find its account paused.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (code, text) = admin(&relay, &format!("/api/v1/queue/{id}/retry")).await;
    assert_eq!(code, 200, "{text}");
    assert!(
        text.contains("paused by an administrator"),
        "the reply says why it does not go yet: {text}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(fake.delivered_count(), 0, "nothing goes out while paused");
    let (code, text) = admin(&relay, "/api/v1/accounts/contoso/resume").await;
    assert_eq!(code, 200, "{text}");

    eventually("message delivered", || fake.delivered_count() >= 1).await;
    eventually("queue/ empty", || setup.files_in("queue").is_empty()).await;
    // A second attempt would be running alongside the first; let it finish if there is one.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(fake.delivered_count(), 1, "delivered exactly once");
    relay.stop().await;

    // A restart recovers the spool: nothing is queued again and nothing is quarantined.
    let mut again = TestRelay::start(&setup.config(&fake)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(setup.files_in("queue"), Vec::<String>::new());
    assert_eq!(setup.files_in("corrupt"), Vec::<String>::new());
    assert_eq!(fake.delivered_count(), 1, "nothing delivered after restart");
    again.stop().await;
}

/// The same with an account paused by a configuration error: the retried message waits for the
/// probe, which delivers it once the administrator has fixed the problem.
#[tokio::test(flavor = "multi_thread")]
async fn retry_of_a_message_waiting_for_a_probe_delivers_it_once() {
    let fake = FakeExchange::start().await;
    let setup = Setup::new(&fake);
    fake.faults().auth_always = Some(
        "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. [X]".into(),
    );
    let mut relay = TestRelay::start(&setup.config(&fake)).await;
    let first = submit(&relay, "first").await;
    let accounts = format!(
        "http://{}/api/v1/accounts",
        relay.http.expect("http side bound")
    );
    let paused = || async {
        let v: serde_json::Value = reqwest::get(&accounts).await.unwrap().json().await.unwrap();
        v.to_string().contains("\"state\":\"paused\"")
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !paused().await {
        assert!(Instant::now() < deadline, "account never paused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let second = submit(&relay, "second").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    for id in [&first, &second, &second] {
        let (code, text) = admin(&relay, &format!("/api/v1/queue/{id}/retry")).await;
        assert!(code == 200 || code == 409, "{code} {text}");
    }
    fake.faults().auth_always = None;

    eventually("both delivered", || fake.delivered_count() >= 2).await;
    eventually("queue/ empty", || setup.files_in("queue").is_empty()).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(fake.delivered_count(), 2, "each delivered exactly once");
    relay.stop().await;
    let mut again = TestRelay::start(&setup.config(&fake)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(setup.files_in("queue"), Vec::<String>::new());
    assert_eq!(setup.files_in("corrupt"), Vec::<String>::new());
    assert_eq!(fake.delivered_count(), 2);
    again.stop().await;
}

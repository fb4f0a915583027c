//! Signing a delegated account in from the status page (`/oauth/start/{account}` and
//! `/oauth/callback`), against the fake Entra and Exchange on loopback: the button, the
//! redirect to the authorize URL, the code captured on the callback, the queued mail delivered
//! at once, and every way a forged or stale callback is refused.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use support::fake_exchange::*;
use support::*;

const ADMIN_TOKEN: &str = "signin-test-admin-token-0123456";

struct Page {
    client: reqwest::Client,
    base: String,
    cookie: String,
}

impl Page {
    /// Logs in to the status page of `relay` with the admin token.
    async fn login(relay: &TestRelay) -> Page {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let base = format!("http://{}", relay.http.unwrap());
        let r = client
            .post(format!("{base}/login"))
            .header("origin", &base)
            .form(&[("token", ADMIN_TOKEN)])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 303);
        let cookie = r.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_string();
        Page {
            client,
            base,
            cookie,
        }
    }

    async fn status_page(&self) -> (String, String) {
        let r = self
            .client
            .get(format!("{}/", self.base))
            .header("cookie", &self.cookie)
            .send()
            .await
            .unwrap();
        let csp = r.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .to_string();
        (r.text().await.unwrap(), csp)
    }

    /// Presses the account's "Sign in" button: the answer to the form post.
    async fn press_sign_in(&self, csrf: &str, host: Option<&str>) -> reqwest::Response {
        let mut req = self
            .client
            .post(format!("{}/oauth/start/frontdesk", self.base))
            .header("cookie", &self.cookie)
            .form(&[("csrf", csrf)]);
        req = match host {
            Some(h) => req
                .header("host", h)
                .header("origin", format!("http://{h}")),
            None => req.header("origin", &self.base),
        };
        req.send().await.unwrap()
    }

    async fn get(&self, url: &str) -> reqwest::Response {
        self.client.get(url).send().await.unwrap()
    }
}

fn sign_in_csrf(page: &str) -> String {
    let form = page
        .split("action=\"/oauth/start/frontdesk\"")
        .nth(1)
        .unwrap_or_else(|| panic!("no Sign in button on the page: {page}"));
    form.split("name=\"csrf\" value=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_string()
}

async fn start_relay(fake: &FakeExchange, files: &tempfile::TempDir) -> TestRelay {
    TestRelay::start(&format!(
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
[http]
listen = "127.0.0.1:0"
admin_token_file = "{token}"
"#,
        authority = fake.authority(),
        port = fake.smtp_addr.port(),
        ca = files.path().join("ca.pem").display(),
        token = files.path().join("admin.token").display(),
    ))
    .await
}

fn files(fake: &FakeExchange) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("admin.token");
    std::fs::write(&token, format!("{ADMIN_TOKEN}\n")).unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(dir.path().join("ca.pem"), &fake.smtp_ca_pem).unwrap();
    dir
}

async fn submit(relay: &TestRelay) {
    let mut c = Dialog::connect(relay.addr()).await;
    c.expect("220").await;
    c.cmd("EHLO printer", "250").await;
    c.send_mail(
        "scanner@printer.local",
        &["boss@contoso.com"],
        b"Subject: scan\r\n\r\nbody\r\n",
    )
    .await;
    c.cmd("QUIT", "221").await;
}

fn location(r: &reqwest::Response) -> String {
    r.headers()["location"].to_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn status_page_sign_in_delivers_the_queued_mail_and_refuses_forged_callbacks() {
    init_logs();
    let fake = FakeExchange::start().await;
    let files = files(&fake);
    // A long probe interval: only the sign-in's resume can make the mail go out in time.
    let relay = start_relay(&fake, &files).await;
    submit(&relay).await;
    let token_file = relay.path("state/frontdesk.refresh-token");
    assert!(!token_file.exists());

    let page = Page::login(&relay).await;
    let (html, csp) = page.status_page().await;
    assert!(html.contains("not signed in"), "{html}");
    let csrf = sign_in_csrf(&html);
    // The button's redirect goes on to Entra; the page's form-action must allow that origin.
    let authority = fake.authority();
    assert!(
        csp.contains(&format!(
            "form-action 'self' {}",
            authority.trim_end_matches('/')
        )),
        "{csp}"
    );

    // Without the CSRF token, or from another origin: refused, nothing started.
    let r = page.press_sign_in("not-the-token", None).await;
    assert_eq!(r.status(), 403);

    // Over plain http under a name other than localhost, Entra would refuse the redirect URI:
    // the relay says so instead of sending the admin there.
    let r = page
        .press_sign_in(&csrf, Some("relay.example.lan:8025"))
        .await;
    assert_eq!(r.status(), 400);
    let text = r.text().await.unwrap();
    assert!(text.contains("localhost"), "{text}");
    assert!(
        text.contains("exorelay login --account frontdesk"),
        "{text}"
    );

    // The button: to Entra's authorize URL with PKCE, state and our callback.
    let r = page.press_sign_in(&csrf, None).await;
    assert_eq!(r.status(), 303, "{:?}", r.text().await);
    let authorize = location(&r);
    assert!(authorize.starts_with(&authority), "{authorize}");
    // Entra takes plain http only for localhost: the page at 127.0.0.1 names localhost.
    let callback_uri = format!(
        "http://localhost:{}/oauth/callback",
        relay.http.unwrap().port()
    );
    let url = reqwest::Url::parse(&authorize).unwrap();
    let q: std::collections::HashMap<_, _> = url.query_pairs().into_owned().collect();
    assert_eq!(q["redirect_uri"], callback_uri);
    assert_eq!(q["code_challenge_method"], "S256");

    // The user consents; Entra sends the browser back with a code and the state.
    let r = page.get(&authorize).await;
    assert_eq!(r.status(), 302);
    let back = location(&r);
    assert!(back.starts_with(&callback_uri), "{back}");
    let code = reqwest::Url::parse(&back)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "code")
        .unwrap()
        .1
        .into_owned();

    // A forged callback (the right code, a made-up state) redeems nothing.
    let r = page
        .get(&format!("{callback_uri}?code={code}&state=made-up"))
        .await;
    assert_eq!(r.status(), 400);
    assert!(
        r.text()
            .await
            .unwrap()
            .contains("Unknown or expired sign-in")
    );
    assert!(!token_file.exists());

    // The real one signs in, resumes the account, and the queued message goes out.
    let r = page.get(&back).await;
    let status = r.status();
    let text = r.text().await.unwrap();
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("Signed in as"), "{text}");
    assert!(text.contains("frontdesk"), "{text}");
    let mode = std::fs::metadata(&token_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let deadline = Instant::now() + Duration::from_secs(20);
    while fake.delivered_count() < 1 {
        assert!(
            Instant::now() < deadline,
            "the queued message was not delivered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The page and the API say who signed in.
    let (html, _) = page.status_page().await;
    assert!(html.contains(&format!("signed in as {MAILBOX}")), "{html}");
    let accounts: serde_json::Value = page
        .client
        .get(format!("{}/api/v1/accounts", page.base))
        .header("cookie", &page.cookie)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        accounts["accounts"][0]["sign_in"]["user"], MAILBOX,
        "{accounts}"
    );

    // The same callback again: single use.
    let r = page.get(&back).await;
    assert_eq!(r.status(), 400);

    // Entra's own error (the user declined) is shown with its text.
    let r = page.press_sign_in(&csrf, None).await;
    let authorize = location(&r);
    let state = reqwest::Url::parse(&authorize)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "state")
        .unwrap()
        .1
        .into_owned();
    let r = page
        .get(&format!(
            "{callback_uri}?error=access_denied&error_description=AADSTS65004%3A+User+declined+to+consent&state={state}"
        ))
        .await;
    assert_eq!(r.status(), 400);
    let text = r.text().await.unwrap();
    assert!(text.contains("AADSTS65004"), "{text}");

    let refresh = fake.delegated().issued_refresh.clone();
    let mut secrets: Vec<&str> = refresh.iter().map(String::as_str).collect();
    let access = fake.issued_tokens();
    secrets.extend(access.iter().map(String::as_str));
    secrets.push(&code);
    assert_logs_clean(&secrets);
}

/// The same sign-in in a real browser: the page's form-action policy must let the button's
/// redirect go on to Entra, and the callback must work without the (SameSite=Strict) cookie.
#[tokio::test(flavor = "multi_thread")]
async fn status_page_sign_in_in_headless_chromium() {
    let Some((browser, driver)) = support::browser::chromium() else {
        return;
    };
    let fake = FakeExchange::start().await;
    let files = files(&fake);
    let relay = start_relay(&fake, &files).await;
    submit(&relay).await;
    let base = format!("http://{}", relay.http.unwrap());
    let d = support::browser::Driver::start(&browser, &driver).await;
    d.goto(&format!("{base}/login")).await;
    d.type_into("input[name=token]", ADMIN_TOKEN).await;
    d.click("button").await;
    d.wait_for_text("Sign in with Microsoft").await;
    d.click("button[data-action=signin]").await;
    let page = d.wait_for_text("Signed in as").await;
    assert!(page.contains("frontdesk"), "{page}");
    d.quit().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while fake.delivered_count() < 1 {
        assert!(
            Instant::now() < deadline,
            "the queued message was not delivered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

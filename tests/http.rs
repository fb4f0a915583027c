//! The HTTP side: every endpoint with its error cases, metrics across a scripted run, the status
//! page (escaping, CSRF, buttons) and HTTP submission.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use support::*;

const TOKEN: &str = "test-admin-token-0123456789abcdef";

struct Http {
    relay: TestRelay,
    base: String,
    client: reqwest::Client,
    _token_dir: tempfile::TempDir,
}

impl Http {
    async fn start(extra_relay: &str, queue_extra: &str) -> Http {
        Http::start_full(extra_relay, queue_extra, "").await
    }

    /// A relay with the admin token set, `extra_relay` / `queue_extra` / `http_extra` added to
    /// those sections; returns once the HTTP side answers.
    async fn start_full(extra_relay: &str, queue_extra: &str, http_extra: &str) -> Http {
        init_logs();
        let token_dir = tempfile::tempdir().unwrap();
        let token_file = token_dir.path().join("admin.token");
        std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let cfg = basic_config(extra_relay).replace("[queue]", &format!("[queue]\n{queue_extra}"))
            + &format!(
                "\n[http]\nlisten = \"127.0.0.1:0\"\nadmin_token_file = \"{}\"\n{http_extra}\n",
                token_file.display()
            );
        let relay = TestRelay::start(&cfg).await;
        let base = format!("http://{}", relay.http.expect("http side bound"));
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        // Wait until the HTTP side answers.
        let deadline = Instant::now() + Duration::from_secs(10);
        while client.get(format!("{base}/healthz")).send().await.is_err() {
            assert!(Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Http {
            relay,
            base,
            client,
            _token_dir: token_dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn get_json(&self, path: &str) -> serde_json::Value {
        let r = self.client.get(self.url(path)).send().await.unwrap();
        assert!(r.status().is_success(), "{path}: {}", r.status());
        r.json().await.unwrap()
    }

    async fn post(&self, path: &str, token: Option<&str>) -> reqwest::Response {
        let mut req = self.client.post(self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send().await.unwrap()
    }

    async fn metric(&self, name_and_labels: &str) -> f64 {
        let text = self
            .client
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| {
                l.strip_prefix(name_and_labels)
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0.0)
    }
}

async fn submit_smtp(relay: &TestRelay, subject: &str) -> String {
    let mut c = Dialog::connect(relay.addr()).await;
    c.expect("220").await;
    c.cmd("EHLO t", "250").await;
    let id = c
        .send_mail(
            "scan@printer.local",
            &["boss@example.com"],
            format!("Subject: {subject}\r\n\r\nbody\r\n").as_bytes(),
        )
        .await;
    c.cmd("QUIT", "221").await;
    id
}

async fn wait_for(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn health_readiness_metrics_and_auth_errors() {
    let h = Http::start("", "").await;
    let r = h.client.get(h.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let ready = h.get_json("/readyz").await;
    assert_eq!(ready["ready"], true, "{ready}");
    let r = h.client.get(h.url("/metrics")).send().await.unwrap();
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    let text = r.text().await.unwrap();
    for name in [
        "exorelay_queue_messages",
        "exorelay_smtp_sessions_total",
        "exorelay_account_paused{account=\"local\"}",
        "# EOF",
    ] {
        assert!(text.contains(name), "{name} missing from:\n{text}");
    }
    // Reads are open on loopback; writes need the token.
    let list = h.get_json("/api/v1/queue").await;
    assert_eq!(list["total"], 0);
    let r = h.post("/api/v1/queue/0000000000000000A/retry", None).await;
    assert_eq!(r.status(), 401);
    assert!(r.headers().contains_key("www-authenticate"));
    let r = h
        .post(
            "/api/v1/queue/0000000000000000A/retry",
            Some("wrong-token-wrong-token"),
        )
        .await;
    assert_eq!(r.status(), 401);
    let r = h
        .post("/api/v1/queue/0000000000000000A/retry", Some(TOKEN))
        .await;
    assert_eq!(r.status(), 404, "unknown queue ID");
    let r = h
        .post("/api/v1/queue/..%2F..%2Fetc/retry", Some(TOKEN))
        .await;
    assert_eq!(r.status(), 404);
    let r = h
        .client
        .get(h.url("/api/v1/queue/0000000000000000A"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = h
        .client
        .get(h.url("/api/v1/queue?state=bogus"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = h.post("/api/v1/accounts/nope/pause", Some(TOKEN)).await;
    assert_eq!(r.status(), 404);
    assert_logs_clean(&[TOKEN]);
}

#[tokio::test(flavor = "multi_thread")]
async fn queue_api_hold_release_delete_retry() {
    let h = Http::start("", "").await;
    let capture = break_capture(&h.relay).await;
    let id = submit_smtp(&h.relay, "queued one").await;
    wait_for("a failed attempt", async || {
        h.get_json(&format!("/api/v1/queue/{id}")).await["attempts"] == 1
    })
    .await;

    let list = h.get_json("/api/v1/queue?state=deferred").await;
    assert_eq!(list["total"], 1);
    assert_eq!(list["messages"][0]["id"], id);
    assert_eq!(list["messages"][0]["subject"], "queued one");
    let show = h.get_json(&format!("/api/v1/queue/{id}")).await;
    assert_eq!(show["recipients"][0]["status"], "pending");
    assert!(
        show["recipients"][0]["last_reply"]
            .as_str()
            .unwrap()
            .contains("capture folder"),
        "{show}"
    );
    assert!(
        show.get("body").is_none(),
        "the body is only shown on request"
    );
    let with_body: serde_json::Value = h
        .client
        .get(h.url(&format!("/api/v1/queue/{id}?body=true")))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        with_body["body"]
            .as_str()
            .unwrap()
            .contains("Subject: queued one")
    );
    assert_eq!(h.get_json("/api/v1/queue?account=other").await["total"], 0);
    assert_eq!(h.get_json("/api/v1/queue?older_than=1h").await["total"], 0);

    // A retry attempt on the broken folder may be running right now: that answers 409 until it
    // is over, so ask again.
    let mut status = 409;
    for _ in 0..100 {
        status = h
            .post(&format!("/api/v1/queue/{id}/hold"), Some(TOKEN))
            .await
            .status()
            .as_u16();
        if status != 409 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status, 200);
    assert_eq!(h.get_json("/api/v1/queue?state=held").await["total"], 1);
    assert_eq!(
        h.post(&format!("/api/v1/queue/{id}/retry"), Some(TOKEN))
            .await
            .status(),
        409,
        "held messages must be released"
    );
    assert_eq!(
        h.post(&format!("/api/v1/queue/{id}/release"), Some(TOKEN))
            .await
            .status(),
        200
    );
    assert_eq!(
        h.post(&format!("/api/v1/queue/{id}/bogus"), Some(TOKEN))
            .await
            .status(),
        404
    );
    // Delete (retrying while a delivery runs may answer 409: try again).
    wait_for("delete", async || {
        let r = h
            .client
            .delete(h.url(&format!("/api/v1/queue/{id}")))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        r.status() == 200
    })
    .await;
    assert_eq!(
        h.get_json(&format!("/api/v1/queue/{id}")).await["state"],
        "deleted"
    );
    assert!(
        h.relay
            .path("spool/deleted")
            .join(format!("{id}.eml"))
            .exists()
    );
    // A slip is recoverable: retry brings it back, and it is delivered once the folder works.
    repair_capture(&capture);
    assert_eq!(
        h.post(&format!("/api/v1/queue/{id}/retry"), Some(TOKEN))
            .await
            .status(),
        200
    );
    let got = wait_captured(&capture, 1).await;
    assert_eq!(got[0].0, id);
}

#[tokio::test(flavor = "multi_thread")]
async fn accounts_api_pause_resume_and_readiness() {
    let h = Http::start("", "").await;
    let acc = h.get_json("/api/v1/accounts").await;
    assert_eq!(acc["accounts"][0]["name"], "local");
    assert_eq!(acc["accounts"][0]["state"], "active");
    assert_eq!(
        h.post("/api/v1/accounts/local/pause", None).await.status(),
        401
    );
    assert_eq!(
        h.post("/api/v1/accounts/local/pause", Some(TOKEN))
            .await
            .status(),
        200
    );
    assert_eq!(
        h.get_json("/api/v1/accounts").await["accounts"][0]["state"],
        "paused"
    );
    assert_eq!(
        h.metric("exorelay_account_paused{account=\"local\"}").await,
        1.0
    );
    let r = h.client.get(h.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(
        body["reasons"][0].as_str().unwrap().contains("paused"),
        "{body}"
    );
    // Mail waits while paused...
    let id = submit_smtp(&h.relay, "waits").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        h.relay
            .path("spool/queue")
            .join(format!("{id}.json"))
            .exists()
    );
    // ...and goes once resumed.
    assert_eq!(
        h.post("/api/v1/accounts/local/resume", Some(TOKEN))
            .await
            .status(),
        200
    );
    wait_captured(&h.relay.path("capture"), 1).await;
    assert_eq!(
        h.client
            .get(h.url("/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn http_submission_goes_through_the_spool_like_smtp() {
    let h = Http::start("max_message_size = \"64KB\"", "").await;
    let raw = "From: monitor@nagios.lan\nTo: ops@example.com\nSubject: disk full on srv1\n\nDisk / is 97% full.\n";
    let url =
        h.url("/api/v1/messages?from=monitor@nagios.lan&to=ops@example.com&to=oncall@example.com");
    let r = h
        .client
        .post(&url)
        .header("content-type", "message/rfc822")
        .body(raw)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "refused without the token");
    let r = h
        .client
        .post(&url)
        .bearer_auth(TOKEN)
        .header("content-type", "message/rfc822")
        .body(raw)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let id = r.json::<serde_json::Value>().await.unwrap()["queue_id"]
        .as_str()
        .unwrap()
        .to_string();
    let json = serde_json::json!({"from": "Monitor <monitor@nagios.lan>", "to": ["ops@example.com"], "subject": "Grüße from JSON", "text": "hello\nworld"});
    let r = h
        .client
        .post(h.url("/api/v1/messages"))
        .bearer_auth(TOKEN)
        .json(&json)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let got = wait_captured(&h.relay.path("capture"), 2).await;
    let raw_one = got.iter().find(|(i, _)| *i == id).unwrap();
    let stored = String::from_utf8(strip_received(&raw_one.1).to_vec()).unwrap();
    let (head, body) = stored.split_once("\r\n\r\n").unwrap();
    assert!(
        head.starts_with("From: monitor@nagios.lan\r\nTo: ops@example.com\r\nSubject: disk full on srv1\r\nDate: "),
        "bare LF normalised, missing Date added: {head}"
    );
    assert!(
        head.ends_with(&format!("\r\nMessage-ID: <{id}@relay.test>")),
        "{head}"
    );
    assert_eq!(body, "Disk / is 97% full.\r\n");
    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(h.relay.path("capture").join(format!("{id}.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(
        meta["recipients"],
        serde_json::json!(["ops@example.com", "oncall@example.com"])
    );
    let other = got.iter().find(|(i, _)| *i != id).unwrap();
    let text = String::from_utf8_lossy(&other.1);
    assert!(
        text.contains("Subject: =?utf-8?") && text.contains("hello"),
        "{text}"
    );
    // Errors.
    let r = h
        .client
        .post(h.url("/api/v1/messages?to=a@b"))
        .bearer_auth(TOKEN)
        .header("content-type", "message/rfc822")
        .body(raw)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "no envelope sender");
    let big = "x".repeat(100_000);
    let r = h
        .client
        .post(&url)
        .bearer_auth(TOKEN)
        .header("content-type", "message/rfc822")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let r = h
        .client
        .post(h.url("/api/v1/messages"))
        .bearer_auth(TOKEN)
        .header("content-type", "image/png")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_follow_a_scripted_run() {
    let h = Http::start("", "max_age = \"1s\"").await;
    for i in 0..5 {
        submit_smtp(&h.relay, &format!("m{i}")).await;
    }
    wait_captured(&h.relay.path("capture"), 5).await;
    wait_for("5 delivered", async || {
        h.metric("exorelay_messages_delivered_total{account=\"local\"}")
            .await
            == 5.0
    })
    .await;
    assert_eq!(
        h.metric("exorelay_messages_received_total{account=\"local\"}")
            .await,
        5.0
    );
    assert!(
        h.metric("exorelay_delivery_latency_seconds_count{account=\"local\"}")
            .await
            == 5.0
    );
    // Break delivery: the next message is deferred, then expires (max_age 1s) as class "expired".
    let capture = h.relay.path("capture");
    std::fs::rename(&capture, h.relay.path("capture.bak")).unwrap();
    std::fs::write(&capture, b"broken").unwrap();
    submit_smtp(&h.relay, "doomed").await;
    wait_for("expired failure", async || {
        h.metric("exorelay_messages_failed_total{account=\"local\",class=\"expired\"}")
            .await
            == 1.0
    })
    .await;
    assert!(
        h.metric("exorelay_messages_deferred_total{account=\"local\"}")
            .await
            >= 1.0
    );
    // The DSN counts as received too, once the forwarder has taken its commit notice.
    wait_for("the DSN counted as received", async || {
        h.metric("exorelay_messages_received_total{account=\"local\"}")
            .await
            == 7.0
    })
    .await;
    assert!(h.metric("exorelay_smtp_sessions_total").await >= 6.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn status_page_escapes_and_protects_its_buttons() {
    let h = Http::start("", "").await;
    break_capture(&h.relay).await;
    let id = submit_smtp(&h.relay, "<script>alert(1)</script>").await;
    wait_for("attempt", async || {
        h.get_json(&format!("/api/v1/queue/{id}")).await["attempts"] == 1
    })
    .await;
    let page = h
        .client
        .get(h.url("/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{page}"
    );
    assert!(
        !page.contains("<script>"),
        "the subject must be shown as text"
    );
    assert!(page.contains(&id));
    assert!(
        page.contains("Log in to retry"),
        "anonymous visitors see no buttons"
    );

    // Log in: the cookie is HttpOnly and SameSite=Strict.
    let r = h
        .client
        .post(h.url("/login"))
        .form(&[("token", "wrong")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = h
        .client
        .post(h.url("/login"))
        .form(&[("token", TOKEN)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let session = cookie.split(';').next().unwrap().to_string();
    let page = h
        .client
        .get(h.url("/"))
        .header("cookie", &session)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_string();

    let hold = h.url(&format!("/ui/queue/{id}/hold"));
    let r = h
        .client
        .post(&hold)
        .header("cookie", &session)
        .header("origin", h.origin())
        .form(&[("do", "hold")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "no CSRF token");
    let r = h
        .client
        .post(&hold)
        .header("cookie", &session)
        .header("origin", "http://evil.example")
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "cross-site");
    wait_for("hold via the page", async || {
        let r = h
            .client
            .post(&hold)
            .header("cookie", &session)
            .header("origin", h.origin())
            .form(&[("csrf", csrf.as_str())])
            .send()
            .await
            .unwrap();
        r.status() == 303 && r.headers()["location"].to_str().unwrap().contains("hold")
    })
    .await;
    assert_eq!(
        h.get_json(&format!("/api/v1/queue/{id}")).await["state"],
        "held"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn status_page_paginates_a_big_queue() {
    let h = Http::start("", "").await;
    h.post("/api/v1/accounts/local/pause", Some(TOKEN)).await;
    for i in 0..120 {
        let r = h
            .client
            .post(h.url("/api/v1/messages?from=a@b.example&to=c@d.example"))
            .bearer_auth(TOKEN)
            .header("content-type", "message/rfc822")
            .body(format!("Subject: bulk {i}\r\n\r\nx\r\n"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
    }
    let page = h
        .client
        .get(h.url("/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("Page 1 of 3 (120 messages)"), "{page}");
    assert_eq!(page.matches("<tr data-id=").count(), 50);
    let page3 = h
        .client
        .get(h.url("/?page=3"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(page3.matches("<tr data-id=").count(), 20);
    assert!(page.contains("<b>120</b> queued"));
}

// ---------- headless Chromium ----------

use support::browser::{Driver, chromium};

#[tokio::test(flavor = "multi_thread")]
async fn status_page_in_headless_chromium() {
    let Some((browser, driver)) = chromium() else {
        return;
    };
    let h = Http::start("", "").await;
    assert_eq!(
        h.post("/api/v1/accounts/local/pause", Some(TOKEN))
            .await
            .status(),
        200
    );
    let id = submit_smtp(&h.relay, "Scan from 2nd floor").await;

    let d = Driver::start(&browser, &driver).await;
    d.goto(&h.url("/login")).await;
    d.type_into("#token", TOKEN).await;
    d.click("#login").await;
    let page = d.wait_for_text(&id).await;
    assert!(page.contains("Scan from 2nd floor"));
    assert!(
        page.contains("class=\"bad\">paused"),
        "paused account shown"
    );
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    d.screenshot(&shot).await;
    assert!(std::fs::metadata(&shot).unwrap().len() > 1000);
    eprintln!("status page screenshot: {}", shot.display());

    d.click(&format!(
        "tr[data-id=\"{id}\"] button[data-action=\"retry\"]"
    ))
    .await;
    d.wait_for_text("will be tried now").await;
    d.screenshot(&shot.with_file_name("status-page-after-retry.png"))
        .await;
    d.quit().await;
}

// ---------- the CLI against the running relay ----------

async fn cli(args: Vec<String>) -> (bool, String) {
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_exorelay"))
            .args(&args)
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn queue_and_accounts_commands_talk_to_the_relay() {
    let h = Http::start("", "").await;
    assert_eq!(
        h.post("/api/v1/accounts/local/pause", Some(TOKEN))
            .await
            .status(),
        200
    );
    let id = submit_smtp(&h.relay, "CLI subject").await;
    // The CLI reads the address from the config: point it at the port actually bound.
    let text = std::fs::read_to_string(h.relay.path("exorelay.toml"))
        .unwrap()
        .replace(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"{}\"", h.relay.http.unwrap()),
        );
    let cfg = h.relay.path("cli.toml");
    std::fs::write(&cfg, text).unwrap();
    let c = |args: &[&str]| {
        let mut v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        v.extend(["--config".to_string(), cfg.display().to_string()]);
        v
    };
    let (ok, out) = cli(c(&["queue", "list"])).await;
    assert!(ok, "{out}");
    assert!(
        out.contains(&id) && out.contains("CLI subject") && out.contains("1 of 1 message(s)"),
        "{out}"
    );
    let (ok, out) = cli(c(&["queue", "list", "--json"])).await;
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["messages"][0]["id"], id);
    let (ok, out) = cli(c(&["queue", "show", &id])).await;
    assert!(
        ok && out.contains("boss@example.com") && out.contains("pending"),
        "{out}"
    );
    let (ok, out) = cli(c(&["queue", "hold", &id])).await;
    assert!(ok && out.contains("on hold"), "{out}");
    let (ok, out) = cli(c(&["queue", "list", "--state", "held"])).await;
    assert!(ok && out.contains(&id), "{out}");
    let (ok, out) = cli(c(&["queue", "release", &id])).await;
    assert!(ok, "{out}");
    let (ok, out) = cli(c(&["queue", "hold", "0000000000000000A"])).await;
    assert!(!ok && out.contains("404"), "{out}");
    let (ok, out) = cli(c(&["accounts"])).await;
    assert!(
        ok && out.contains("local") && out.contains("paused") && out.contains("fix:"),
        "{out}"
    );
    let (ok, out) = cli(c(&["accounts", "resume", "local"])).await;
    assert!(ok && out.contains("resumed"), "{out}");
    wait_captured(&h.relay.path("capture"), 1).await;

    // Clear errors when something is off.
    let wrong = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(&h.relay.http.unwrap().port().to_string(), "1");
    std::fs::write(&cfg, wrong).unwrap();
    let (ok, out) = cli(c(&["queue", "list"])).await;
    assert!(
        !ok && out.contains("cannot reach the relay at http://127.0.0.1:1"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn https_when_a_certificate_is_configured() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let cert = make_cert(dir.path());
    let cfg = basic_config("")
        + &format!(
            "\n[http]\nlisten = \"127.0.0.1:0\"\n[http.tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            cert.cert_path.display(),
            cert.key_path.display()
        );
    let relay = TestRelay::start(&cfg).await;
    let addr = relay.http.unwrap();
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(cert.cert_pem.as_bytes()).unwrap())
        .resolve("localhost", addr)
        .build()
        .unwrap();
    let url = format!("https://localhost:{}/healthz", addr.port());
    let deadline = Instant::now() + Duration::from_secs(10);
    let r = loop {
        match client.get(&url).send().await {
            Ok(r) => break r,
            Err(e) => {
                assert!(Instant::now() < deadline, "{e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert_eq!(r.status(), 200);
    // Plain HTTP on the TLS port gets nowhere.
    let plain = reqwest::get(format!("http://127.0.0.1:{}/healthz", addr.port())).await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success());
}

// ---------- hardened edges: auth before the body, sessions, CSRF, Host, limits ----------

use tokio::io::{AsyncReadExt, AsyncWriteExt};

impl Http {
    /// Like `start`, with extra `[http]` keys.
    async fn start_with(http_extra: &str) -> Http {
        Http::start_full("", "", http_extra).await
    }

    fn addr(&self) -> std::net::SocketAddr {
        self.relay.http.unwrap()
    }

    fn origin(&self) -> String {
        self.base.clone()
    }

    /// Logs in through the form; returns the `name=value` cookie pair.
    async fn login(&self) -> String {
        let r = self
            .client
            .post(self.url("/login"))
            .header("origin", self.origin())
            .form(&[("token", TOKEN)])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 303);
        r.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_string()
    }

    /// The CSRF token the page shows to a logged-in session.
    async fn csrf(&self, session: &str) -> String {
        let page = self
            .client
            .get(self.url("/"))
            .header("cookie", session)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        page.split("name=\"csrf\" value=\"")
            .nth(1)
            .unwrap_or_else(|| panic!("no CSRF token on the page: {page}"))
            .split('"')
            .next()
            .unwrap()
            .to_string()
    }
}

/// Sends `request` on a fresh connection and reads the status line, within `within`.
async fn raw_status(addr: std::net::SocketAddr, request: &str, within: Duration) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(within, s.read(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("no answer within {within:?} to {request:?}"))
        .unwrap();
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or("")
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn unauthenticated_large_post_is_refused_before_the_body() {
    let h = Http::start("", "").await;
    let addr = h.addr();
    // 20 MB announced (within max_message_size), not one body byte sent.
    for path in [
        "/api/v1/messages?from=a@b.example&to=c@d.example",
        "/api/v1/accounts/local/pause",
    ] {
        let status = raw_status(
            addr,
            &format!(
                "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: message/rfc822\r\nContent-Length: 20000000\r\n\r\n"
            ),
            Duration::from_secs(3),
        )
        .await;
        assert!(status.starts_with("HTTP/1.1 401"), "{path}: {status}");
    }
    // With a wrong token too.
    let status = raw_status(
        addr,
        &format!(
            "POST /api/v1/messages?from=a@b.example&to=c@d.example HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer wrong-wrong-wrong-wrong\r\nContent-Type: message/rfc822\r\nContent-Length: 20000000\r\n\r\n"
        ),
        Duration::from_secs(3),
    )
    .await;
    assert!(status.starts_with("HTTP/1.1 401"), "{status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn submission_needs_a_mail_or_json_content_type() {
    let h = Http::start("", "").await;
    let url = h.url("/api/v1/messages?from=a@b.example&to=c@d.example");
    for ctype in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        None,
    ] {
        let mut req = h
            .client
            .post(&url)
            .bearer_auth(TOKEN)
            .body("Subject: x\r\n\r\nx\r\n");
        if let Some(c) = ctype {
            req = req.header("content-type", c);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 415, "{ctype:?}");
    }
    // A cookie from the page does not make a cross-site text/plain post work either.
    let session = h.login().await;
    let r = h
        .client
        .post(&url)
        .header("cookie", &session)
        .header("origin", "http://evil.example")
        .header("content-type", "text/plain")
        .body("Subject: x\r\n\r\nx\r\n")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(
        h.get_json("/api/v1/queue").await["total"],
        0,
        "nothing queued"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cookie_sessions_need_csrf_and_same_origin_and_end_at_logout() {
    let h = Http::start("", "").await;
    let session = h.login().await;
    assert!(
        !session.contains(TOKEN),
        "the cookie holds a session secret, not the admin token: {session}"
    );
    let csrf = h.csrf(&session).await;
    let pause = h.url("/api/v1/accounts/local/pause");
    let state = async || h.get_json("/api/v1/accounts").await["accounts"][0]["state"].clone();

    // Foreign origin, missing origin, missing CSRF token: all refused, nothing changes.
    let cases: [(&str, Option<&str>, Option<&str>); 5] = [
        ("foreign origin", Some("http://evil.example"), Some(&csrf)),
        ("null origin", Some("null"), Some(&csrf)),
        ("no origin or referer", None, Some(&csrf)),
        ("no CSRF token", Some(&h.base), None),
        (
            "wrong CSRF token",
            Some(&h.base),
            Some("0123456789abcdef0123456789abcdef"),
        ),
    ];
    for (what, origin, token) in cases {
        let mut req = h.client.post(&pause).header("cookie", &session);
        if let Some(o) = origin {
            req = req.header("origin", o);
        }
        if let Some(t) = token {
            req = req.header("x-csrf-token", t);
        }
        assert_eq!(req.send().await.unwrap().status(), 403, "{what}");
        assert_eq!(state().await, "active", "{what}");
    }
    // Same origin (as Origin, or as Referer when there is no Origin) with the token works.
    let r = h
        .client
        .post(&pause)
        .header("cookie", &session)
        .header("origin", h.origin())
        .header("x-csrf-token", &csrf)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(state().await, "paused");
    let r = h
        .client
        .post(h.url("/api/v1/accounts/local/resume"))
        .header("cookie", &session)
        .header("referer", h.url("/"))
        .header("x-csrf-token", &csrf)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(state().await, "active");
    // The page's form with the token in its body works the same way.
    let r = h
        .client
        .post(h.url("/ui/accounts/local/pause"))
        .header("cookie", &session)
        .header("origin", h.origin())
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(state().await, "paused");

    // Logout ends the session: the same cookie is worth nothing afterwards.
    let r = h
        .client
        .post(h.url("/logout"))
        .header("cookie", &session)
        .header("origin", h.origin())
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let r = h
        .client
        .post(h.url("/api/v1/accounts/local/resume"))
        .header("cookie", &session)
        .header("origin", h.origin())
        .header("x-csrf-token", &csrf)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(state().await, "paused");
    // A made-up session secret is refused too.
    let r = h
        .client
        .post(h.url("/api/v1/accounts/local/resume"))
        .header("cookie", format!("exorelay_session={TOKEN}"))
        .header("origin", h.origin())
        .header("x-csrf-token", &csrf)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_logs_clean(&[TOKEN]);
}

#[tokio::test(flavor = "multi_thread")]
async fn logins_are_rate_limited_per_client() {
    let h = Http::start("", "").await;
    for i in 0..5 {
        let r = h
            .client
            .post(h.url("/login"))
            .form(&[("token", format!("wrong-token-{i}"))])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "attempt {i}");
    }
    // Even the right token is refused while the address is locked out.
    let r = h
        .client
        .post(h.url("/login"))
        .form(&[("token", TOKEN)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    // Bearer calls (CLI, scripts) are not affected.
    assert_eq!(
        h.post("/api/v1/accounts/local/pause", Some(TOKEN))
            .await
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn anonymous_reads_need_a_loopback_host_header() {
    let h = Http::start("", "").await;
    let port = h.addr().port();
    let get = async |host: String, path: &str, token: bool| {
        let mut req = h.client.get(h.url(path)).header("host", host);
        if token {
            req = req.bearer_auth(TOKEN);
        }
        req.send().await.unwrap().status()
    };
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("LocalHost:{port}"),
        "localhost".to_string(),
    ] {
        assert_eq!(
            get(host.clone(), "/api/v1/queue", false).await,
            200,
            "{host}"
        );
    }
    // DNS rebinding: a foreign name that resolves to 127.0.0.1 must not read anything.
    for host in [
        format!("evil.example:{port}"),
        format!("localhost.evil.example:{port}"),
        format!("127.0.0.1.evil.example:{port}"),
    ] {
        assert_eq!(
            get(host.clone(), "/api/v1/queue", false).await,
            403,
            "{host}"
        );
        assert_eq!(
            get(host.clone(), "/api/v1/accounts", false).await,
            403,
            "{host}"
        );
        assert_eq!(get(host.clone(), "/", false).await, 403, "{host}");
        // With the token the Host does not matter (a rebinding page does not have it).
        assert_eq!(
            get(host.clone(), "/api/v1/queue", true).await,
            200,
            "{host}"
        );
    }
    // Health and metrics stay open for monitoring.
    assert_eq!(get("monitor.lan".into(), "/healthz", false).await, 200);
    // Message bodies need the token even on loopback. (Capture is broken so the message stays
    // queued to be read.)
    let _capture = break_capture(&h.relay).await;
    let id = submit_smtp(&h.relay, "secret content").await;
    assert_eq!(
        get(
            format!("127.0.0.1:{port}"),
            &format!("/api/v1/queue/{id}?body=true"),
            false
        )
        .await,
        401
    );
    assert_eq!(
        get(
            format!("127.0.0.1:{port}"),
            &format!("/api/v1/queue/{id}?body=true"),
            true
        )
        .await,
        200
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn silent_connections_do_not_delay_others() {
    // Plain HTTP.
    let h = Http::start("", "").await;
    let mut silent = Vec::new();
    for _ in 0..5 {
        silent.push(tokio::net::TcpStream::connect(h.addr()).await.unwrap());
    }
    let started = Instant::now();
    let status = raw_status(
        h.addr(),
        &format!("GET /healthz HTTP/1.1\r\nHost: {}\r\n\r\n", h.addr()),
        Duration::from_secs(2),
    )
    .await;
    assert!(status.contains("200"), "{status}");
    assert!(started.elapsed() < Duration::from_secs(1));

    // HTTPS: silent clients that never send a ClientHello.
    let dir = tempfile::tempdir().unwrap();
    let cert = make_cert(dir.path());
    let cfg = basic_config("")
        + &format!(
            "\n[http]\nlisten = \"127.0.0.1:0\"\n[http.tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            cert.cert_path.display(),
            cert.key_path.display()
        );
    let relay = TestRelay::start(&cfg).await;
    let addr = relay.http.unwrap();
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(cert.cert_pem.as_bytes()).unwrap())
        .resolve("localhost", addr)
        .timeout(Duration::from_secs(3))
        .build()
        .unwrap();
    let url = format!("https://localhost:{}/healthz", addr.port());
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.get(&url).send().await.is_err() {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut silent_tls = Vec::new();
    for _ in 0..5 {
        silent_tls.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    // A new client, so the request needs a new connection and a new handshake.
    let fresh = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(cert.cert_pem.as_bytes()).unwrap())
        .resolve("localhost", addr)
        .timeout(Duration::from_secs(3))
        .build()
        .unwrap();
    let started = Instant::now();
    let r = fresh.get(&url).send().await.expect("healthz over TLS");
    assert_eq!(r.status(), 200);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

/// Reads until EOF or error; returns whether the connection was closed within `within`.
async fn closed_within(s: &mut tokio::net::TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    tokio::time::timeout(within, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn half_sent_requests_are_cut_off_at_the_limits() {
    let h = Http::start_with(
        "header_timeout = \"2s\"\nrequest_timeout = \"1s\"\nmax_connections = 40\nmax_connections_per_client = 4",
    )
    .await;
    let addr = h.addr();
    // One client (127.0.0.2) opens 30 connections and sends half a request on each.
    let opened = Instant::now();
    let mut hostile = Vec::new();
    for _ in 0..30 {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let mut s = sock.connect(addr).await.unwrap();
        let _ = s
            .write_all(b"GET /api/v1/queue HTTP/1.1\r\nHost: 127.")
            .await;
        hostile.push(s);
    }
    // Another client is served at once.
    let started = Instant::now();
    let status = raw_status(
        addr,
        &format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n"),
        Duration::from_secs(2),
    )
    .await;
    assert!(status.contains("200"), "{status}");
    assert!(started.elapsed() < Duration::from_millis(500));
    // Those over the per-client limit were closed at once; 4 wait for their headers.
    let mut still_open = 0;
    for s in &mut hostile {
        if !closed_within(s, Duration::from_millis(20)).await {
            still_open += 1;
        }
    }
    if opened.elapsed() < Duration::from_millis(1500) {
        assert_eq!(still_open, 4);
    }
    // And those 4 are cut off at header_timeout.
    for s in &mut hostile {
        assert!(closed_within(s, Duration::from_secs(3)).await);
    }
    assert!(
        opened.elapsed() < Duration::from_secs(4),
        "{:?}",
        opened.elapsed()
    );

    // A kept-alive connection that sits idle is closed at header_timeout too.
    let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    idle.write_all(format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let started = Instant::now();
    assert!(closed_within(&mut idle, Duration::from_secs(4)).await);
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );

    // A body that stops halfway is cut off at request_timeout.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!(
            "POST /api/v1/messages?from=a@b.example&to=c@d.example HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: message/rfc822\r\nContent-Length: 1000\r\n\r\nSubject: half\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
        .await
        .expect("cut off at request_timeout")
        .unwrap_or(0);
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(n == 0 || text.starts_with("HTTP/1.1 408"), "{text}");
    assert_eq!(h.get_json("/api/v1/queue").await["total"], 0);
}

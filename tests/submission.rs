//! One way into the spool: SMTP and HTTP submission share the address rules, the `Received:`
//! format and the missing-header policy (`Date`, `Message-ID`, `From` added when absent).

mod support;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use support::*;

const TOKEN: &str = "submission-test-admin-token-0123";

async fn relay_with_http() -> (TestRelay, String, tempfile::TempDir) {
    let token_dir = tempfile::tempdir().unwrap();
    let token_file = token_dir.path().join("admin.token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let cfg = basic_config("")
        + &format!(
            "\n[http]\nlisten = \"127.0.0.1:0\"\nadmin_token_file = \"{}\"\n",
            token_file.display()
        );
    let relay = TestRelay::start(&cfg).await;
    let base = format!("http://{}", relay.http.expect("http side bound"));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while reqwest::get(format!("{base}/healthz")).await.is_err() {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (relay, base, token_dir)
}

/// What real scan-to-mail firmware sends: display names before the bracket, no Date, no
/// Message-ID, HELO only.
#[tokio::test(flavor = "multi_thread")]
async fn scanner_firmware_with_display_names_is_accepted() {
    let relay = TestRelay::start(&basic_config("")).await;
    let mut c = Dialog::connect(relay.addr()).await;
    c.expect("220").await;
    c.cmd("HELO MFP-4F", "250").await;
    c.cmd("MAIL FROM:Scanner 4F <scan4f@printer.local>", "250 2.1.0")
        .await;
    c.cmd("RCPT TO:Scan Destination <boss@example.com>", "250 2.1.5")
        .await;
    c.cmd("RCPT TO:<bad\x01@example.com>", "501 5.1.3").await;
    c.cmd("DATA", "354").await;
    c.send_raw(b"Subject: Scanned image\r\n\r\nscan attached\r\n.\r\n")
        .await;
    let r = c.expect("250 2.0.0").await;
    let id = r.trim().rsplit(' ').next().unwrap().to_string();
    let got = wait_captured(&relay.path("capture"), 1).await;
    let eml = String::from_utf8_lossy(&got[0].1).into_owned();
    assert!(
        eml.starts_with(&format!(
            "Received: from MFP-4F ([127.0.0.1])\r\n\tby relay.test (exorelay) with SMTP id {id}\r\n\tfor <boss@example.com>; "
        )),
        "{eml}"
    );
    assert_eq!(
        masked(&got[0].1),
        format!(
            "Subject: Scanned image\r\nDate: *\r\nMessage-ID: <{id}@relay.test>\r\nFrom: <scan4f@printer.local>\r\n\r\nscan attached\r\n"
        )
    );
    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(relay.path("capture").join(format!("{id}.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(meta["mail_from"], "scan4f@printer.local");
    assert_eq!(meta["recipients"], serde_json::json!(["boss@example.com"]));
}

/// A device that sends no header at all: the relay adds what is missing and the blank line that
/// separates it from the text, so the text stays the body.
#[tokio::test(flavor = "multi_thread")]
async fn a_message_without_any_header_gets_one() {
    let relay = TestRelay::start(&basic_config("")).await;
    let mut c = Dialog::connect(relay.addr()).await;
    c.expect("220").await;
    c.cmd("EHLO ups", "250").await;
    let id = c
        .send_mail(
            "ups@lan.example",
            &["ops@example.com"],
            b"UPS on battery\r\n",
        )
        .await;
    let got = wait_captured(&relay.path("capture"), 1).await;
    assert_eq!(
        masked(&got[0].1),
        format!(
            "Date: *\r\nMessage-ID: <{id}@relay.test>\r\nFrom: <ups@lan.example>\r\n\r\nUPS on battery\r\n"
        )
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn http_envelope_addresses_follow_the_smtp_rules() {
    let (relay, base, _t) = relay_with_http().await;
    let client = reqwest::Client::new();
    let post_raw = |query: &str| {
        client
            .post(format!("{base}/api/v1/messages?{query}"))
            .bearer_auth(TOKEN)
            .header("content-type", "message/rfc822")
            .body("Subject: x\r\n\r\ny\r\n")
            .send()
    };
    for bad in [
        "from=a@x.example%0D%0ABcc:%20evil@y&to=ops@example.com",
        "from=a@x.example&to=ops@example.com%0D%0ABcc:%20evil@y",
        "from=a@x.example&to=nodomain",
        "from=a%00b@x.example&to=ops@example.com",
    ] {
        let r = post_raw(bad).await.unwrap();
        assert_eq!(r.status(), 400, "{bad}");
    }
    let r = client
        .post(format!("{base}/api/v1/messages"))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({"from": "m@x.example", "to": "ops@example.com\r\nBcc: evil@y", "subject": "s", "text": "t"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // A display name is taken like SMTP takes it.
    let r = post_raw("from=Monitor%20%3Cm@x.example%3E&to=Ops%20%3Cops@example.com%3E")
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let id = r.json::<serde_json::Value>().await.unwrap()["queue_id"]
        .as_str()
        .unwrap()
        .to_string();
    let got = wait_captured(&relay.path("capture"), 1).await;
    assert_eq!(got.len(), 1, "nothing refused was queued");
    let eml = String::from_utf8_lossy(&got[0].1).into_owned();
    assert!(
        eml.starts_with(&format!(
            "Received: from http ([127.0.0.1])\r\n\tby relay.test (exorelay) with HTTP id {id}\r\n\tfor <ops@example.com>; "
        )),
        "{eml}"
    );
    assert_eq!(
        masked(&got[0].1),
        format!(
            "Subject: x\r\nDate: *\r\nMessage-ID: <{id}@relay.test>\r\nFrom: <m@x.example>\r\n\r\ny\r\n"
        )
    );
    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(relay.path("capture").join(format!("{id}.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(meta["mail_from"], "m@x.example");
    assert_eq!(meta["recipients"], serde_json::json!(["ops@example.com"]));
}

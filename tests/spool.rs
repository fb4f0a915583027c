//! The spool checking itself, end to end through the in-process relay: a message whose body is
//! changed on disk while it waits in the queue is moved to `corrupt/`, counted in
//! `exorelay_spool_corrupt_total`, and never reaches the upstream; other mail flows on.

mod support;

use std::time::{Duration, Instant};

use support::*;

async fn metrics(relay: &TestRelay) -> String {
    let url = format!("http://{}/metrics", relay.http.expect("http side bound"));
    reqwest::get(url).await.unwrap().text().await.unwrap()
}

/// Waits until `check` holds, polling; fails with `what` after 20 s.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_body_changed_while_queued_goes_to_corrupt_and_is_never_delivered() {
    let cfg = format!("{}\n[http]\nlisten = \"127.0.0.1:0\"\n", basic_config(""));
    let relay = TestRelay::start(&cfg).await;
    let capture = break_capture(&relay).await;

    let mut d = Dialog::connect(relay.addr()).await;
    d.expect("220").await;
    d.cmd("EHLO device", "250").await;
    let id = d
        .send_mail(
            "scanner@printer.local",
            &["alice@example.com"],
            b"Subject: for alice\r\n\r\nsecret for alice\r\n",
        )
        .await;
    let meta = relay.path(&format!("spool/queue/{id}.json"));
    let body = relay.path(&format!("spool/queue/{id}.eml"));
    // Wait for a failed attempt (the capture folder is broken), so the message sits queued.
    eventually("a deferred attempt", || {
        std::fs::read_to_string(&meta).is_ok_and(|m| m.contains("\"attempts\": 1"))
    })
    .await;
    // Another message's bytes in its body file, same length.
    let original = std::fs::read(&body).unwrap();
    let swapped = String::from_utf8(original.clone())
        .unwrap()
        .replace("for alice", "for bobby");
    assert_eq!(swapped.len(), original.len());
    std::fs::write(&body, swapped).unwrap();
    repair_capture(&capture);

    eventually("the message in corrupt/", || {
        relay.path(&format!("spool/corrupt/{id}.json")).exists()
            && relay.path(&format!("spool/corrupt/{id}.eml")).exists()
    })
    .await;
    assert!(!meta.exists() && !body.exists(), "still queued");
    assert!(
        metrics(&relay)
            .await
            .contains("exorelay_spool_corrupt_total 1\n"),
        "the corrupt message is counted"
    );

    // Mail flows on, and only the sound message reaches the capture folder.
    let good = d
        .send_mail(
            "scanner@printer.local",
            &["carol@example.com"],
            b"Subject: for carol\r\n\r\nhello\r\n",
        )
        .await;
    // (The corrupt one left the queue before this was sent: it cannot come later.)
    let captured = wait_captured(&capture, 1).await;
    let ids: Vec<&str> = captured.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, [good.as_str()]);
    assert!(!capture.join(format!("{id}.eml")).exists());
}

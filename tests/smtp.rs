//! Inbound SMTP dialogs against an in-process relay on loopback.

mod support;

use std::time::{Duration, Instant};

use base64::Engine;
use support::*;

fn b64(s: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[tokio::test(flavor = "multi_thread")]
async fn pipelined_rset_and_several_messages_on_one_connection() {
    let relay = TestRelay::start(&basic_config("")).await;
    let mut c = Dialog::connect(relay.addr()).await;
    c.expect("220 relay.test").await;
    // The whole first transaction in one write.
    c.send_raw(
        b"EHLO printer\r\nMAIL FROM:<scan@printer.local>\r\nRCPT TO:<a@example.com>\r\nDATA\r\nSubject: one\r\n\r\nfirst\r\n.\r\n",
    )
    .await;
    let ehlo = c.expect("250").await;
    assert!(
        ehlo.contains("PIPELINING") && ehlo.contains("8BITMIME") && ehlo.contains("SIZE 31457280"),
        "{ehlo}"
    );
    c.expect("250 2.1.0").await;
    c.expect("250 2.1.5").await;
    c.expect("354").await;
    c.expect("250 2.0.0 Ok: queued as").await;
    // RSET mid-transaction forgets the envelope.
    c.cmd("MAIL FROM:<x@printer.local>", "250").await;
    c.cmd("RCPT TO:<dropped@example.com>", "250").await;
    c.cmd("RSET", "250").await;
    c.cmd("RCPT TO:<b@example.com>", "503 5.5.1").await;
    c.send_mail(
        "scan@printer.local",
        &["b@example.com", "c@example.com"],
        b"Subject: two\r\n\r\nsecond\r\n",
    )
    .await;
    c.cmd("QUIT", "221").await;

    let got = wait_captured(&relay.path("capture"), 2).await;
    // Date, Message-ID and From were missing: added at the end of the header section.
    for (n, (id, eml)) in got.iter().enumerate() {
        let (subject, body) = [("one", "first"), ("two", "second")][n];
        assert_eq!(
            masked(eml),
            format!(
                "Subject: {subject}\r\nDate: *\r\nMessage-ID: <{id}@relay.test>\r\nFrom: <scan@printer.local>\r\n\r\n{body}\r\n"
            )
        );
    }
    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(relay.path("capture").join(format!("{}.json", got[1].0))).unwrap(),
    )
    .unwrap();
    assert_eq!(
        meta["recipients"],
        serde_json::json!(["b@example.com", "c@example.com"])
    );
    assert_eq!(meta["mail_from"], "scan@printer.local");
    assert_eq!(meta["client"]["ip"], "127.0.0.1");
    // Delivered messages leave the spool.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_dir(relay.path("spool/queue"))
        .unwrap()
        .count()
        > 0
    {
        assert!(Instant::now() < deadline, "spool not emptied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn relay_policy_from_a_foreign_address() {
    let relay = TestRelay::start(&basic_config("")).await;
    let other = "127.0.0.2".parse().unwrap();

    // Not in allowed_networks and not logged in: refused.
    let mut c = Dialog::connect_from(other, relay.addr()).await;
    c.expect("220").await;
    let ehlo = c.cmd("EHLO dev", "250").await;
    assert!(ehlo.contains("AUTH PLAIN LOGIN"), "{ehlo}");
    c.cmd(
        "MAIL FROM:<a@x.example>",
        "530 5.7.0 Authentication required",
    )
    .await;

    // AUTH PLAIN works.
    c.cmd(
        &format!(
            "AUTH PLAIN {}",
            b64(format!("\0scanner\0{PASSWORD}").as_bytes())
        ),
        "235 2.7.0",
    )
    .await;
    c.send_mail(
        "a@x.example",
        &["r@example.com"],
        b"Subject: plain\r\n\r\nx\r\n",
    )
    .await;

    // AUTH LOGIN works, after HELO too.
    let mut c = Dialog::connect_from(other, relay.addr()).await;
    c.expect("220").await;
    c.cmd("HELO dev", "250").await;
    c.cmd("AUTH LOGIN", "334 VXNlcm5hbWU6").await;
    c.cmd(&b64(b"scanner"), "334 UGFzc3dvcmQ6").await;
    c.cmd(&b64(PASSWORD.as_bytes()), "235").await;
    c.send_mail(
        "b@x.example",
        &["r@example.com"],
        b"Subject: login\r\n\r\ny\r\n",
    )
    .await;

    // A wrong password is refused, after the configured delay.
    let mut c = Dialog::connect_from(other, relay.addr()).await;
    c.expect("220").await;
    c.cmd("EHLO dev", "250").await;
    let t = Instant::now();
    c.cmd(
        &format!("AUTH PLAIN {}", b64(b"\0scanner\0wrong-password")),
        "535 5.7.8",
    )
    .await;
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "failure answered without delay"
    );
    c.cmd("MAIL FROM:<a@x.example>", "530").await;

    let got = wait_captured(&relay.path("capture"), 2).await;
    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(relay.path("capture").join(format!("{}.json", got[0].0))).unwrap(),
    )
    .unwrap();
    assert_eq!(meta["client"]["login"], "scanner");
    assert_eq!(meta["client"]["ip"], "127.0.0.2");
    assert_logs_clean(&[
        PASSWORD,
        &b64(format!("\0scanner\0{PASSWORD}").as_bytes()),
        &b64(PASSWORD.as_bytes()),
        "wrong-password",
    ]);
}

#[tokio::test(flavor = "multi_thread")]
async fn repeated_auth_failures_ban_the_address() {
    let relay = TestRelay::start(&basic_config(
        "max_auth_failures = 2\nauth_ban_time = \"1h\"",
    ))
    .await;
    let other = "127.0.0.5".parse().unwrap();
    let mut c = Dialog::connect_from(other, relay.addr()).await;
    c.expect("220").await;
    c.cmd("EHLO dev", "250").await;
    c.cmd(&format!("AUTH PLAIN {}", b64(b"\0scanner\0bad1")), "535")
        .await;
    c.cmd(
        &format!("AUTH PLAIN {}", b64(b"\0scanner\0bad2")),
        "421 4.7.0",
    )
    .await;
    c.expect_closed().await;
    // New connections from that address are refused outright, even with the right password.
    let mut c = Dialog::connect_from(other, relay.addr()).await;
    c.expect("421 4.7.0").await;
    // Other addresses are unaffected.
    let mut c = Dialog::connect_from("127.0.0.6".parse().unwrap(), relay.addr()).await;
    c.expect("220").await;
}

/// A counter from the relay's `/metrics` (its HTTP side must listen).
async fn metric(relay: &TestRelay, name: &str) -> f64 {
    let url = format!("http://{}/metrics", relay.http.expect("http side bound"));
    let text = reqwest::get(url).await.unwrap().text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not in {text}"))
}

fn with_http(config: String) -> String {
    format!("{config}\n[http]\nlisten = \"127.0.0.1:0\"\n")
}

#[tokio::test(flavor = "multi_thread")]
async fn parallel_password_guesses_are_counted_before_they_are_checked() {
    let relay = TestRelay::start(&with_http(basic_config(
        "max_auth_failures = 5\nauth_ban_time = \"1h\"\nauth_failure_delay = \"10ms\"\n\
         untrusted_max_connections_per_client = 15",
    )))
    .await;
    let guesser = "127.0.0.7".parse().unwrap();
    let mut conns = Vec::new();
    for _ in 0..15 {
        let mut c = Dialog::connect_from(guesser, relay.addr()).await;
        c.expect("220").await;
        c.cmd("EHLO dev", "250").await;
        conns.push(c);
    }
    // All 15 guesses are on the wire before the first answer comes back.
    for (i, c) in conns.iter_mut().enumerate() {
        c.send(&format!(
            "AUTH PLAIN {}",
            b64(format!("\0scanner\0guess{i}").as_bytes())
        ))
        .await;
    }
    let mut wrong = 0;
    let mut refused = 0;
    for c in &mut conns {
        let r = c.reply().await.expect("a reply");
        if r.starts_with("535 5.7.8") {
            wrong += 1;
        } else if r.starts_with("421 4.7.0") {
            refused += 1;
        } else {
            panic!("unexpected reply {r:?}");
        }
    }
    // Only max_auth_failures guesses were ever checked; the fifth failure bans the address.
    assert_eq!(
        metric(&relay, "exorelay_smtp_auth_failures_total").await,
        5.0
    );
    assert_eq!((wrong, refused), (4, 11));
    // The right password is refused too now, without being checked.
    let mut c = Dialog::connect_from(guesser, relay.addr()).await;
    c.expect("421 4.7.0").await;
    assert_eq!(
        metric(&relay, "exorelay_smtp_auth_failures_total").await,
        5.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_successful_login_does_not_reopen_guessing() {
    let relay = TestRelay::start(&basic_config(
        "max_auth_failures = 3\nauth_ban_time = \"1h\"\nauth_failure_delay = \"10ms\"",
    ))
    .await;
    let other = "127.0.0.8".parse().unwrap();
    let mut c = Dialog::connect_from(other, relay.addr()).await;
    c.expect("220").await;
    c.cmd("EHLO dev", "250").await;
    c.cmd(&format!("AUTH PLAIN {}", b64(b"\0scanner\0bad1")), "535")
        .await;
    c.cmd(&format!("AUTH PLAIN {}", b64(b"\0scanner\0bad2")), "535")
        .await;
    // Someone from the same address knows a password (e.g. one device's own login).
    let mut ok = Dialog::connect_from(other, relay.addr()).await;
    ok.expect("220").await;
    ok.cmd("EHLO dev", "250").await;
    ok.cmd(
        &format!(
            "AUTH PLAIN {}",
            b64(format!("\0scanner\0{PASSWORD}").as_bytes())
        ),
        "235",
    )
    .await;
    // That success does not wipe the two failures: the next wrong guess is the third.
    c.cmd(
        &format!("AUTH PLAIN {}", b64(b"\0scanner\0bad3")),
        "421 4.7.0",
    )
    .await;
    c.expect_closed().await;
    // The logged-in session keeps working.
    ok.send_mail(
        "a@x.example",
        &["r@example.com"],
        b"Subject: in\r\n\r\nx\r\n",
    )
    .await;
}

fn starttls_config(plaintext_auth: bool) -> String {
    format!(
        r#"
[[listener]]
address = "127.0.0.1:0"
tls = "starttls"
cert = "{{cert}}"
key = "{{key}}"
plaintext_auth = {plaintext_auth}
[[listener]]
address = "127.0.0.1:0"
tls = "implicit"
cert = "{{cert}}"
key = "{{key}}"
[relay]
allowed_networks = ["127.0.0.1/32"]
auth_failure_delay = "10ms"
[queue]
dir = "{{dir}}/spool"
[[user]]
name = "scanner"
password_hash = "{{hash}}"
[[account]]
name = "local"
kind = "capture"
dir = "{{dir}}/capture"
"#
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn auth_needs_tls_unless_plaintext_auth() {
    let relay = TestRelay::start(&starttls_config(false)).await;
    let other = "127.0.0.2".parse().unwrap();
    let mut c = Dialog::connect_from(other, relay.addr()).await;
    c.expect("220").await;
    let ehlo = c.cmd("EHLO dev", "250").await;
    assert!(
        ehlo.contains("STARTTLS") && !ehlo.contains("AUTH"),
        "{ehlo}"
    );
    c.cmd(
        &format!(
            "AUTH PLAIN {}",
            b64(format!("\0scanner\0{PASSWORD}").as_bytes())
        ),
        "538 5.7.11",
    )
    .await;
    c.cmd("MAIL FROM:<a@x.example>", "530").await;
    c.cmd("STARTTLS", "220").await;
    let mut c = c.into_tls(&relay.cert.cert_pem).await;
    let ehlo = c.cmd("EHLO dev", "250").await;
    assert!(
        !ehlo.contains("STARTTLS") && ehlo.contains("AUTH PLAIN LOGIN"),
        "{ehlo}"
    );
    c.cmd(
        &format!(
            "AUTH PLAIN {}",
            b64(format!("\0scanner\0{PASSWORD}").as_bytes())
        ),
        "235",
    )
    .await;
    c.send_mail(
        "a@x.example",
        &["r@example.com"],
        b"Subject: tls\r\n\r\nz\r\n",
    )
    .await;
    let got = wait_captured(&relay.path("capture"), 1).await;
    let received = String::from_utf8_lossy(&got[0].1);
    assert!(received.contains("with ESMTPSA id"), "{received}");

    // With plaintext_auth the same AUTH works without TLS.
    let relay = TestRelay::start(&starttls_config(true)).await;
    let mut c = Dialog::connect_from(other, relay.addr()).await;
    c.expect("220").await;
    let ehlo = c.cmd("EHLO dev", "250").await;
    assert!(ehlo.contains("AUTH PLAIN LOGIN"), "{ehlo}");
    c.cmd(
        &format!(
            "AUTH PLAIN {}",
            b64(format!("\0scanner\0{PASSWORD}").as_bytes())
        ),
        "235",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn implicit_tls_listener() {
    let relay = TestRelay::start(&starttls_config(false)).await;
    let tcp = tokio::net::TcpStream::connect(relay.addrs[1])
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tls_connector(&relay.cert.cert_pem)
        .connect(name, tcp)
        .await
        .unwrap();
    let mut c = Dialog::from_stream(Box::new(tls));
    c.expect("220").await;
    let ehlo = c.cmd("EHLO dev", "250").await;
    assert!(
        !ehlo.contains("STARTTLS") && ehlo.contains("AUTH PLAIN"),
        "{ehlo}"
    );
    c.send_mail("a@x.example", &["r@example.com"], b"Subject: 465\r\n\r\n")
        .await;
    wait_captured(&relay.path("capture"), 1).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn commands_pipelined_before_starttls_handshake_are_discarded() {
    let relay = TestRelay::start(&starttls_config(false)).await;
    let mut c = Dialog::connect(relay.addr()).await;
    c.expect("220").await;
    c.cmd("EHLO dev", "250").await;
    // A man in the middle appends a command to the plaintext STARTTLS (CVE-2011-0411).
    c.send_raw(b"STARTTLS\r\nMAIL FROM:<injected@evil.example>\r\n")
        .await;
    c.expect("220").await;
    let mut c = c.into_tls(&relay.cert.cert_pem).await;
    c.cmd("EHLO dev", "250").await;
    // Had the injected MAIL survived, this RCPT would be accepted.
    c.cmd("RCPT TO:<r@example.com>", "503 5.5.1").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn limits_and_bad_input_leave_the_server_healthy() {
    let relay = TestRelay::start(&basic_config(
        "max_message_size = \"64KB\"\nmax_errors = 50",
    ))
    .await;
    let mut c = Dialog::connect(relay.addr()).await;
    c.expect("220").await;
    c.cmd("EHLO dev", "250").await;
    // Oversize declared at MAIL.
    c.cmd("MAIL FROM:<a@x.example> SIZE=100000000", "552 5.3.4")
        .await;
    // Too many recipients.
    c.cmd("MAIL FROM:<a@x.example>", "250").await;
    for i in 0..5 {
        c.cmd(&format!("RCPT TO:<r{i}@example.com>"), "250").await;
    }
    c.cmd("RCPT TO:<r6@example.com>", "452 4.5.3").await;
    // Oversize during DATA: drained, then 552; nothing queued.
    c.cmd("DATA", "354").await;
    let line = vec![b'x'; 998];
    for _ in 0..200 {
        c.send_raw(&line).await;
        c.send_raw(b"\r\n").await;
    }
    c.send_raw(b".\r\n").await;
    c.expect("552 5.3.4").await;
    c.cmd("NOOP", "250").await;
    // An overlong command line.
    let long = "X".repeat(20_000);
    c.cmd(&long, "500 5.5.2 Line too long").await;
    // Garbage and NUL bytes.
    c.send_raw(b"\x00\x01\xff\xfe garbage\r\n").await;
    c.expect("500").await;
    c.send_raw(b"MAIL\x00 FROM:<a@b>\r\n").await;
    c.expect("5").await;
    let random: Vec<u8> = (0..4096)
        .map(|_| fastrand::u8(..))
        .filter(|b| *b != b'\n')
        .collect();
    c.send_raw(&random).await;
    c.send_raw(b"\r\n").await;
    c.expect("5").await;
    c.cmd("NOOP", "250").await;
    // Still healthy: a normal message goes through on the same connection and on a new one.
    c.cmd("RSET", "250").await;
    c.send_mail(
        "a@x.example",
        &["r@example.com"],
        b"Subject: after\r\n\r\nok\r\n",
    )
    .await;
    let mut c2 = Dialog::connect(relay.addr()).await;
    c2.expect("220").await;
    c2.cmd("HELO d", "250").await;
    c2.send_mail(
        "a@x.example",
        &["r@example.com"],
        b"Subject: after2\r\n\r\nok\r\n",
    )
    .await;
    let got = wait_captured(&relay.path("capture"), 2).await;
    assert_eq!(got.len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn too_many_errors_closes() {
    let relay = TestRelay::start(&basic_config("max_errors = 3")).await;
    let mut c = Dialog::connect(relay.addr()).await;
    c.expect("220").await;
    c.cmd("FOO", "500").await;
    c.cmd("BAR", "500").await;
    c.cmd("BAZ", "500").await;
    c.expect("421 4.7.0").await;
    c.expect_closed().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_timeout_and_http_and_connection_limit() {
    let relay = TestRelay::start(&basic_config(
        "command_timeout = \"1s\"\nmax_connections = 2",
    ))
    .await;
    let mut idle = Dialog::connect(relay.addr()).await;
    idle.expect("220").await;
    let mut http = Dialog::connect(relay.addr()).await;
    http.expect("220").await;
    // Third connection over the limit.
    let mut third = Dialog::connect(relay.addr()).await;
    third.expect("421 4.7.0").await;
    http.send_raw(b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n")
        .await;
    http.expect("554 5.7.0").await;
    http.expect_closed().await;
    idle.expect("421 4.4.2").await;
    idle.expect_closed().await;
    // Slots are free again.
    let mut c = Dialog::connect(relay.addr()).await;
    c.expect("220").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_address_gets_at_most_20_connections() {
    let relay = TestRelay::start(&basic_config("allowed_networks = [\"127.0.0.0/8\"]")).await;
    let busy = "127.0.0.9".parse().unwrap();
    let mut open = Vec::new();
    for _ in 0..20 {
        let mut c = Dialog::connect_from(busy, relay.addr()).await;
        c.expect("220").await;
        open.push(c);
    }
    let mut over = Dialog::connect_from(busy, relay.addr()).await;
    over.expect("421 4.7.0 Too many connections from your address")
        .await;
    over.expect_closed().await;
    // Other addresses still get in.
    let mut other = Dialog::connect_from("127.0.0.10".parse().unwrap(), relay.addr()).await;
    other.expect("220").await;
    // A connection that ends gives its slot back.
    let mut last = open.pop().unwrap();
    last.cmd("QUIT", "221").await;
    last.expect_closed().await;
    let mut c = eventually_greeted(busy, relay.addr()).await;
    c.cmd("EHLO again", "250").await;
}

/// Connects from `src` until the relay greets with 220 (a slot may take a moment to free up).
async fn eventually_greeted(src: std::net::IpAddr, addr: std::net::SocketAddr) -> Dialog {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut c = Dialog::connect_from(src, addr).await;
        let r = c.reply().await.unwrap_or_default();
        if r.starts_with("220") {
            return c;
        }
        assert!(Instant::now() < deadline, "never greeted: {r:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_strangers_do_not_lock_out_allowed_networks() {
    // 127.0.0.1 is the printer (allowed_networks); 127.0.0.2-4 are outside it.
    let relay = TestRelay::start(&basic_config(
        "max_connections = 4\nuntrusted_max_connections = 6\nuntrusted_max_connections_per_client = 4\n\
         command_timeout = \"1h\"\nuntrusted_command_timeout = \"2s\"\nauth_failure_delay = \"10ms\"",
    ))
    .await;
    let stranger = "127.0.0.2".parse().unwrap();
    let login = format!(
        "AUTH PLAIN {}",
        b64(format!("\0scanner\0{PASSWORD}").as_bytes())
    );
    // One of the stranger's connections logs in at once; it is then no longer a stranger's.
    let mut known = Dialog::connect_from(stranger, relay.addr()).await;
    known.expect("220").await;
    known.cmd("EHLO dev", "250").await;
    known.cmd(&login, "235").await;
    // The same address may still hold untrusted_max_connections_per_client that do not log in...
    let mut idle = Vec::new();
    for _ in 0..4 {
        let mut c = Dialog::connect_from(stranger, relay.addr()).await;
        c.expect("220").await;
        idle.push(c);
    }
    // ...but no more.
    let mut c = Dialog::connect_from(stranger, relay.addr()).await;
    c.expect("421 4.7.0 Too many connections from your address that have not logged in")
        .await;
    c.expect_closed().await;
    // All strangers together hold at most untrusted_max_connections.
    for _ in 0..2 {
        let mut c = Dialog::connect_from("127.0.0.3".parse().unwrap(), relay.addr()).await;
        c.expect("220").await;
        idle.push(c);
    }
    let mut c = Dialog::connect_from("127.0.0.4".parse().unwrap(), relay.addr()).await;
    c.expect("421 4.7.0 Too many connections from outside the allowed networks")
        .await;

    // None of the idle strangers count towards max_connections: with the logged-in client in
    // one slot, the printer gets the other three.
    let mut printers = Vec::new();
    for _ in 0..3 {
        let mut p = Dialog::connect(relay.addr()).await;
        p.expect("220").await;
        printers.push(p);
    }
    printers[0].cmd("EHLO printer", "250").await;
    printers[0]
        .send_mail(
            "scan@printer.local",
            &["r@example.com"],
            b"Subject: x\r\n\r\nx\r\n",
        )
        .await;
    let mut over = Dialog::connect(relay.addr()).await;
    over.expect("421 4.7.0 Too many connections, try again later")
        .await;

    // Strangers that sit idle are dropped after untrusted_command_timeout; the printers and
    // the logged-in client (command_timeout = 1h) are not.
    let t = Instant::now();
    for c in &mut idle {
        c.expect("421 4.4.2").await;
        c.expect_closed().await;
    }
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    known.cmd("NOOP", "250").await;
    printers[1].cmd("NOOP", "250").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn legacy_device_quirks_are_accepted() {
    let relay = TestRelay::start(&basic_config("")).await;
    let mut c = Dialog::connect(relay.addr()).await;
    c.expect("220").await;
    c.send_raw(b"HELO\n").await; // no name, bare LF
    c.expect("250").await;
    c.cmd("MAIL FROM: scanner@printer.local", "250").await;
    c.cmd("RCPT TO:boss@example.com", "250").await;
    c.cmd("DATA", "354").await;
    // 8-bit text without BODY=8BITMIME, bare LF line ends, no Date/Message-ID (added, as
    // Postfix's cleanup does); no QUIT.
    c.send_raw("Subject: Scan fertig\nFrom: Büro <scanner@printer.local>\n\nGrüße\n".as_bytes())
        .await;
    c.send_raw(b"\r\n.\r\n").await;
    c.expect("250").await;
    drop(c);
    let got = wait_captured(&relay.path("capture"), 1).await;
    assert_eq!(
        masked(&got[0].1),
        format!(
            "Subject: Scan fertig\r\nFrom: Büro <scanner@printer.local>\r\nDate: *\r\nMessage-ID: <{}@relay.test>\r\n\r\nGrüße\r\n\r\n",
            got[0].0
        )
    );
    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(relay.path("capture").join(format!("{}.json", got[0].0))).unwrap(),
    )
    .unwrap();
    assert_eq!(meta["mail_from"], "scanner@printer.local");
    assert_eq!(meta["eight_bit"], true);
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_sends_421_and_keeps_queued_mail() {
    let mut relay = TestRelay::start(&basic_config("shutdown_grace = \"1s\"")).await;
    let mut idle = Dialog::connect(relay.addr()).await;
    idle.expect("220").await;
    let mut busy = Dialog::connect(relay.addr()).await;
    busy.expect("220").await;
    busy.cmd("EHLO d", "250").await;
    busy.cmd("MAIL FROM:<a@x.example>", "250").await;
    relay.shutdown.cancel();
    idle.expect("421 4.3.0").await;
    // The busy session may finish its transaction within the grace time.
    busy.cmd("RCPT TO:<r@example.com>", "250").await;
    busy.cmd("DATA", "354").await;
    busy.send_raw(b"Subject: last\r\n\r\n.\r\n").await;
    busy.expect("250").await;
    busy.expect("421 4.3.0").await;
    relay.stop().await;
    // New connections are refused once stopped.
    assert!(tokio::net::TcpStream::connect(relay.addr()).await.is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn temporary_delivery_failure_is_retried_then_delivered() {
    let relay = TestRelay::start(&basic_config("")).await;
    let capture = break_capture(&relay).await;
    let mut c = Dialog::connect(relay.addr()).await;
    c.expect("220").await;
    c.cmd("EHLO d", "250").await;
    let id = c
        .send_mail("a@x.example", &["r@example.com"], b"Subject: retry\r\n\r\n")
        .await;
    // The failed attempt is recorded per recipient, and the message stays queued.
    let meta_path = relay.path("spool/queue").join(format!("{id}.json"));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&meta_path).unwrap()).unwrap();
        if meta["attempts"].as_u64().unwrap_or(0) >= 1 {
            assert_eq!(meta["recipients"][0]["status"], "pending");
            assert!(
                meta["recipients"][0]["last_reply"]
                    .as_str()
                    .unwrap()
                    .contains("capture folder"),
                "{meta}"
            );
            break;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    repair_capture(&capture);
    let got = wait_captured(&capture, 1).await;
    assert_eq!(got[0].0, id);
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_message_moves_to_failed() {
    let mut cfg = basic_config("");
    cfg = cfg.replace(
        "retry_initial = \"200ms\"",
        "retry_initial = \"200ms\"\nmax_age = \"1s\"",
    );
    let relay = TestRelay::start(&cfg).await;
    break_capture(&relay).await;
    let mut c = Dialog::connect(relay.addr()).await;
    c.expect("220").await;
    c.cmd("EHLO d", "250").await;
    let id = c
        .send_mail(
            "a@x.example",
            &["r@example.com"],
            b"Subject: expire\r\n\r\n",
        )
        .await;
    let failed = relay.path("spool/failed").join(format!("{id}.json"));
    let deadline = Instant::now() + Duration::from_secs(15);
    while !failed.exists() {
        assert!(Instant::now() < deadline, "message never moved to failed/");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(&failed).unwrap()).unwrap();
    assert_eq!(meta["recipients"][0]["status"], "failed");
    assert!(
        meta["recipients"][0]["last_reply"]
            .as_str()
            .unwrap()
            .contains("max_age"),
        "{meta}"
    );
    assert!(
        relay
            .path("spool/failed")
            .join(format!("{id}.eml"))
            .exists()
    );
    assert!(
        !relay
            .path("spool/queue")
            .join(format!("{id}.json"))
            .exists()
    );
}

/// Unmounts the small filesystem when the test ends, pass or fail.
struct Mounted(std::path::PathBuf);
impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn full_disk_gets_452_and_loses_nothing() {
    // A 1 MB filesystem for the spool; needs root (CI runs as root).
    let small = tempfile::tempdir().unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(small.path())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("SKIPPED: cannot mount a small tmpfs (needs root)");
        return;
    }
    let _guard = Mounted(small.path().to_path_buf());
    let cfg = basic_config("").replace(
        "dir = \"{dir}/spool\"",
        &format!("dir = \"{}\"", small.path().display()),
    );
    let relay = TestRelay::start(&cfg).await;
    let mut c = Dialog::connect(relay.addr()).await;
    c.expect("220").await;
    c.cmd("EHLO d", "250").await;
    c.send_mail(
        "a@x.example",
        &["r@example.com"],
        b"Subject: before\r\n\r\nfits\r\n",
    )
    .await;
    // 3 MB does not fit: the partial file is removed and the client told to retry later.
    c.cmd("MAIL FROM:<a@x.example>", "250").await;
    c.cmd("RCPT TO:<r@example.com>", "250").await;
    c.cmd("DATA", "354").await;
    let line = [b'y'; 1000];
    for _ in 0..3000 {
        c.send_raw(&line).await;
        c.send_raw(b"\r\n").await;
    }
    c.send_raw(b".\r\n").await;
    c.expect("452 4.3.1").await;
    // The partial file gives its space back (small spares may keep a delivered message's bytes).
    let partial: Vec<_> = std::fs::read_dir(small.path().join("tmp"))
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.metadata().unwrap().len() > 64 * 1024)
        .map(|e| e.file_name())
        .collect();
    assert!(partial.is_empty(), "partial file left behind: {partial:?}");
    // Space is back: the next message is accepted and both good ones are delivered.
    c.send_mail(
        "a@x.example",
        &["r@example.com"],
        b"Subject: after\r\n\r\nfits\r\n",
    )
    .await;
    let got = wait_captured(&relay.path("capture"), 2).await;
    assert_eq!(got.len(), 2);
}

/// A stranger cannot keep its slot by sending NOOPs: it must log in within
/// `untrusted_command_timeout` of connecting, however busy it keeps the connection.
#[tokio::test(flavor = "multi_thread")]
async fn a_stranger_that_never_logs_in_is_closed_however_busy() {
    let relay = TestRelay::start(&basic_config(
        "allowed_networks = [\"10.0.0.0/8\"]\nuntrusted_command_timeout = \"1s\"",
    ))
    .await;
    let mut c = Dialog::connect(relay.addr()).await;
    c.expect("220").await;
    c.cmd("EHLO stranger", "250").await;
    let started = Instant::now();
    let mut closed = false;
    for _ in 0..20 {
        c.send("NOOP").await;
        match c.reply().await {
            Some(r) if r.starts_with("250") => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Some(r) => {
                assert!(r.starts_with("421"), "{r}");
                closed = true;
                break;
            }
            None => {
                closed = true;
                break;
            }
        }
    }
    assert!(closed, "the stranger kept its connection with NOOPs");
    assert!(started.elapsed() < Duration::from_secs(3));
}

//! SMTP smuggling, end to end: every published spelling of a false end-of-data, sent by an
//! allowed client over a real socket, must leave exactly one message (the smuggled commands stay
//! inside its body) and exactly one `250`.

mod support;

use std::time::Duration;

use exorelay::smtp::data::FALSE_END_OF_DATA as VARIANTS;
use support::*;
use tokio::io::AsyncReadExt;

#[tokio::test(flavor = "multi_thread")]
async fn no_false_end_of_data_lets_a_second_message_through() {
    let relay = TestRelay::start(&basic_config("")).await;
    for (n, variant) in VARIANTS.iter().enumerate() {
        let mut c = Dialog::connect(relay.addr()).await;
        c.expect("220").await;
        c.cmd("EHLO d", "250").await;
        c.cmd("MAIL FROM:<a@x.example>", "250").await;
        c.cmd("RCPT TO:<r@example.com>", "250").await;
        c.cmd("DATA", "354").await;
        let mut wire = format!("Subject: variant {n}\r\n\r\nhello").into_bytes();
        wire.extend_from_slice(variant);
        wire.extend_from_slice(
            b"MAIL FROM:<evil@x.example>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\nforged\r\n",
        );
        wire.extend_from_slice(b"\r\n.\r\n");
        c.send_raw(&wire).await;
        let first = c.expect("250 2.0.0").await;
        c.send_raw(b"QUIT\r\n").await;
        // Exactly one reply to the whole DATA, then 221: no reply for smuggled commands.
        let next = c.reply().await.unwrap_or_default();
        assert!(
            next.starts_with("221"),
            "variant {variant:?}: after {first:?} the relay answered {next:?}"
        );
        let got = wait_captured(&relay.path("capture"), n + 1).await;
        assert_eq!(got.len(), n + 1, "variant {variant:?} smuggled a message");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = wait_captured(&relay.path("capture"), VARIANTS.len()).await;
    assert_eq!(got.len(), VARIANTS.len());
    for (_, eml) in &got {
        let text = String::from_utf8_lossy(eml);
        assert!(text.contains("MAIL FROM:<evil@x.example>"), "{text}");
        assert!(!eml.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r'));
    }
}

/// The review's reproduction, byte for byte, split into single-byte writes so every TCP read
/// boundary is exercised.
#[tokio::test(flavor = "multi_thread")]
async fn lf_dot_crlf_split_across_reads_is_content() {
    let relay = TestRelay::start(&basic_config("")).await;
    let mut tcp = tokio::net::TcpStream::connect(relay.addr()).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let wire: &[u8] = b"EHLO d\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<r@example.com>\r\nDATA\r\nbody\n.\r\nMAIL FROM:<evil@x>\r\nRCPT TO:<victim@y>\r\nDATA\r\nforged\r\n.\r\nQUIT\r\n";
    for b in wire {
        use tokio::io::AsyncWriteExt;
        tcp.write_all(&[*b]).await.unwrap();
        tcp.flush().await.unwrap();
    }
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut all))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&all);
    assert_eq!(text.matches("queued as").count(), 1, "{text}");
    let got = wait_captured(&relay.path("capture"), 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(wait_captured(&relay.path("capture"), 1).await.len(), 1);
    assert!(String::from_utf8_lossy(&got[0].1).contains("MAIL FROM:<evil@x>\r\n"));
}

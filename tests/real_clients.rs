//! Real third-party SMTP clients (python smtplib, curl, swaks, msmtp) deliver through the relay
//! into capture byte-identical to what they sent.
//!
//! A client missing from the machine is skipped with a message, unless
//! EXORELAY_REQUIRE_CLIENTS=1 (set by CI, which installs them all).

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::*;

fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !found {
        assert!(
            std::env::var("EXORELAY_REQUIRE_CLIENTS").is_err(),
            "{tool} is required (EXORELAY_REQUIRE_CLIENTS is set) but not installed"
        );
        eprintln!("SKIPPED: {tool} is not installed (apt-get install {tool})");
    }
    found
}

/// Test messages, CRLF line ends, each with a dot-leading line so clients must dot-stuff.
/// All carry Date and Message-ID, which msmtp would otherwise add.
fn messages(tag: &str) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let ids = |name: &str| {
        format!(
            "Date: Tue, 24 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{tag}-{name}@printer.local>\r\n"
        )
    };

    let utf8 = format!(
        "{}From: Jürgen Müller <scanner@printer.local>\r\nTo: boss@example.com\r\nSubject: =?UTF-8?B?U2NhbiDDvGJlcnNpY2h0?= {tag}\r\nX-Raw: Grüße aus dem Büro\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nDer Scan ist fertig: Übersicht.\r\n.leading dot line\r\n..two dots\r\nEnde\r\n",
        ids("utf8")
    );
    out.push(("utf8".to_string(), utf8.into_bytes()));

    let mut attach = format!(
        "{}From: scanner@printer.local\r\nTo: boss@example.com\r\nSubject: attachment {tag}\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"XYZ\"\r\n\r\n--XYZ\r\nContent-Type: text/plain\r\n\r\nSee attachment.\r\n--XYZ\r\nContent-Type: application/pdf; name=\"scan.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\n",
        ids("attachment")
    )
    .into_bytes();
    attach.extend(base64_lines(150_000, 7));
    attach.extend_from_slice(b"--XYZ--\r\n");
    out.push(("attachment".to_string(), attach));

    // ISO-2022-JP (7-bit with escapes) and a Shift_JIS part, passed through unmangled.
    let mut jp = format!(
        "{}From: scanner@printer.local\r\nTo: boss@example.com\r\nSubject: =?ISO-2022-JP?B?GyRCJDMkcyRLJEEkTxsoQg==?= {tag}\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=ISO-2022-JP\r\n\r\n",
        ids("jp")
    )
    .into_bytes();
    jp.extend_from_slice(b"\x1b$B$3$s$K$A$O\x1b(B\r\n.\x1b$B$3\x1b(B\r\n");
    jp.extend_from_slice(b"Shift_JIS: \x82\xb1\x82\xf1\x82\xc9\x82\xbf\x82\xcd\r\n");
    out.push(("iso-2022-jp".to_string(), jp));

    let mut big = format!(
        "{}From: scanner@printer.local\r\nTo: boss@example.com\r\nSubject: big {tag}\r\nContent-Transfer-Encoding: base64\r\n\r\n",
        ids("big")
    )
    .into_bytes();
    big.extend(base64_lines(15 * 1024 * 1024, 3)); // about 20 MB once encoded
    out.push(("20MB".to_string(), big));
    out
}

/// Base64-looking lines (76 chars + CRLF) for `raw` bytes of pseudo-random data.
fn base64_lines(raw: usize, seed: u64) -> Vec<u8> {
    use base64::Engine;
    let mut rng = fastrand::Rng::with_seed(seed);
    let data: Vec<u8> = (0..raw).map(|_| rng.u8(..)).collect();
    let text = base64::engine::general_purpose::STANDARD.encode(data);
    let mut out = Vec::with_capacity(text.len() * 78 / 76 + 2);
    for chunk in text.as_bytes().chunks(76) {
        out.extend_from_slice(chunk);
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn write_messages(dir: &Path, tag: &str) -> Vec<(String, PathBuf, Vec<u8>)> {
    messages(tag)
        .into_iter()
        .map(|(name, bytes)| {
            let p = dir.join(format!("{tag}-{name}.eml"));
            std::fs::write(&p, &bytes).unwrap();
            (name, p, bytes)
        })
        .collect()
}

fn as_is(m: &[u8]) -> Vec<u8> {
    m.to_vec()
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `on_wire` maps a message file to what the client really sends (swaks adds a CRLF).
async fn check_client(
    tool: &str,
    on_wire: fn(&[u8]) -> Vec<u8>,
    send: impl Fn(u16, &Path) -> Command + Send + 'static,
) {
    if !have(tool) {
        return;
    }
    let relay = TestRelay::start(&basic_config("")).await;
    let port = relay.addr().port();
    let msgs = write_messages(relay.dir.path(), tool);
    let paths: Vec<PathBuf> = msgs.iter().map(|m| m.1.clone()).collect();
    tokio::task::spawn_blocking(move || {
        for p in paths {
            run(&mut send(port, &p));
        }
    })
    .await
    .unwrap();
    let got = wait_captured(&relay.path("capture"), msgs.len()).await;
    assert_eq!(got.len(), msgs.len());
    for (name, _, sent) in &msgs {
        let sent = on_wire(sent);
        let found = got
            .iter()
            .any(|(_, eml)| strip_received(eml) == sent.as_slice());
        assert!(
            found,
            "{tool}: message {name:?} did not arrive byte-identical"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn python_smtplib() {
    check_client("python3", as_is, |port, path| {
        let mut c = Command::new("python3");
        c.arg("-c")
            .arg(
                "import smtplib,sys\n\
                 s=smtplib.SMTP('127.0.0.1', int(sys.argv[1]), timeout=60)\n\
                 s.ehlo('pytest')\n\
                 s.sendmail('scanner@printer.local', ['boss@example.com'], open(sys.argv[2],'rb').read())\n\
                 s.quit()\n",
            )
            .arg(port.to_string())
            .arg(path);
        c
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn curl_smtp() {
    check_client("curl", as_is, |port, path| {
        let mut c = Command::new("curl");
        c.args(["-sS", "--url"])
            .arg(format!("smtp://127.0.0.1:{port}/curl"))
            .args([
                "--mail-from",
                "scanner@printer.local",
                "--mail-rcpt",
                "boss@example.com",
                "--upload-file",
            ])
            .arg(path);
        c
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn swaks() {
    check_client(
        "swaks",
        |m| [m, b"\r\n".as_slice()].concat(),
        |port, path| {
            let mut c = Command::new("swaks");
            c.args(["--server", "127.0.0.1", "--port"])
                .arg(port.to_string())
                .args([
                    "--from",
                    "scanner@printer.local",
                    "--to",
                    "boss@example.com",
                    "--silent",
                    "2",
                    "--data",
                ])
                .arg(format!("@{}", path.display()));
            c
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn msmtp() {
    check_client("msmtp", as_is, |port, path| {
        let mut c = Command::new("sh");
        c.arg("-c").arg(format!(
            "msmtp --host=127.0.0.1 --port={port} --auth=off --tls=off --from=scanner@printer.local boss@example.com < '{}'",
            path.display()
        ));
        c
    })
    .await;
}

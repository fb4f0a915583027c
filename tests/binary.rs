//! The real `exorelay` binary: `check` on bad configs, `hash-password`, logs without secrets,
//! SIGTERM, and a kill -9 loop that proves no acknowledged message is ever lost.

mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_exorelay");

fn exorelay(args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).output().expect("run exorelay")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

const GOOD: &str = r#"hostname = "relay.test"

[[listener]]
address = "127.0.0.1:2525"

[relay]
allowed_networks = ["127.0.0.0/8"]

[queue]
dir = "var/spool"

[[account]]
name = "local"
kind = "capture"
dir = "var/capture"
"#;

#[test]
fn check_accepts_the_shipped_configs() {
    use std::os::unix::fs::PermissionsExt;
    let root = env!("CARGO_MANIFEST_DIR");
    // The example refers to /etc/exorelay/contoso.secret: give it one in a scratch folder.
    let scratch = tempfile::tempdir().unwrap();
    let secret = scratch.path().join("contoso.secret");
    std::fs::write(&secret, "value\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let token = scratch.path().join("admin.token");
    std::fs::write(&token, "an-admin-token-of-enough-length\n").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let example = std::fs::read_to_string(format!("{root}/config/exorelay.example.toml"))
        .unwrap()
        .replace("/etc/exorelay/", &format!("{}/", scratch.path().display()));
    let example_path = scratch.path().join("exorelay.example.toml");
    std::fs::write(&example_path, example).unwrap();
    let quickstart = format!("{root}/config/quickstart.toml");
    for file in [quickstart.as_str(), example_path.to_str().unwrap()] {
        let out = Command::new(BIN)
            .args(["check", "--config", file])
            .current_dir(root)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("configuration OK"), "{stdout}");
        assert!(
            !stdout.contains("$argon2"),
            "a password hash was printed: {stdout}"
        );
    }
}

#[test]
fn check_names_the_field_for_typical_mistakes() {
    let cases: Vec<(&str, String, &str)> = vec![
        ("unknown key", GOOD.replace("[relay]", "[relay]\nmax_mesage_size = \"10MB\""), "relay.max_mesage_size: unknown field `max_mesage_size`, expected one of"),
        ("bad address", GOOD.replace("127.0.0.1:2525", "localhost:smtp"), "listener[0].address"),
        (
            "missing cert",
            GOOD.replace("address = \"127.0.0.1:2525\"", "address = \"127.0.0.1:2525\"\ntls = \"starttls\"\ncert = \"no/such/cert.pem\"\nkey = \"no/such/key.pem\""),
            "listener[0].cert: file \"no/such/cert.pem\" not found",
        ),
        ("bad size", GOOD.replace("[relay]", "[relay]\nmax_message_size = \"35 megs\""), "relay.max_message_size: invalid size"),
        (
            "duplicate account",
            format!("{GOOD}\n[[account]]\nname = \"local\"\nkind = \"capture\"\ndir = \"x\"\n"),
            "account[1].name: account name \"local\" is used twice",
        ),
        (
            "user with unknown account",
            GOOD.replace(
                "[queue]",
                "[[user]]\nname = \"scanner\"\npassword_hash = \"$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$6TQcprZ2BZ5IRz4kkVW0SFxeV0TN3J5sJz0L+8iq9bY\"\naccount = \"contoso\"\n\n[queue]",
            ),
            "user[0].account: unknown account \"contoso\"",
        ),
        ("bad duration", GOOD.replace("[queue]", "[queue]\nmax_age = \"forever\""), "queue.max_age: invalid duration"),
        ("open relay", GOOD.replace("127.0.0.0/8", "0.0.0.0/0"), "relay.allowed_networks[0]: 0.0.0.0/0 would let anyone send"),
        ("bad tls mode", GOOD.replace("address = \"127.0.0.1:2525\"", "address = \"127.0.0.1:2525\"\ntls = \"ssl\""), "listener[0].tls: unknown variant `ssl`"),
        (
            "bad password hash",
            GOOD.replace("[queue]", "[[user]]\nname = \"scanner\"\npassword_hash = \"hunter2\"\n\n[queue]"),
            "user[0].password_hash: not a password hash",
        ),
        ("toml syntax", GOOD.replace("[relay]", "[relay"), "exorelay.toml:"),
        (
            "world-readable secret",
            format!("{GOOD}\n[[account]]\nname = \"contoso\"\nkind = \"exchange\"\nmailbox = \"relay@contoso.com\"\ntenant = \"contoso.onmicrosoft.com\"\nclient_id = \"x\"\nclient_secret_file = \"SECRETFILE\"\n"),
            "account[1].client_secret_file:",
        ),
        (
            "common tenant",
            format!("{GOOD}\n[[account]]\nname = \"contoso\"\nkind = \"exchange\"\nmailbox = \"relay@contoso.com\"\ntenant = \"common\"\nclient_id = \"x\"\nclient_secret_file = \"SECRETFILE\"\n"),
            "account[1].tenant: \"common\" cannot be used with client credentials (AADSTS9001023)",
        ),
        (
            "scope without /.default",
            format!("{GOOD}\n[[account]]\nname = \"contoso\"\nkind = \"exchange\"\nmailbox = \"relay@contoso.com\"\ntenant = \"contoso.onmicrosoft.com\"\nclient_id = \"x\"\nclient_secret_file = \"SECRETFILE\"\nscope = \"https://outlook-dod.office365.us\"\n"),
            "account[1].scope: \"https://outlook-dod.office365.us\" must be the Exchange resource of your cloud with /.default",
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("exorelay.toml");
    let secret = dir.path().join("contoso.secret");
    std::fs::write(&secret, "value\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    for (name, text, expected) in cases {
        let mode = if name == "world-readable secret" {
            0o644
        } else {
            0o600
        };
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(mode)).unwrap();
        let text = text.replace("SECRETFILE", &secret.display().to_string());
        std::fs::write(&path, &text).unwrap();
        let out = exorelay(&["check", "--config", path.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{name}: exit code; stderr: {stderr}"
        );
        assert!(
            stderr.contains(expected),
            "{name}: expected {expected:?} in {stderr:?}"
        );
        assert_eq!(
            stderr.trim().lines().count(),
            1,
            "{name}: not one line: {stderr:?}"
        );
        let located = format!("{}:", path.display());
        let after = stderr
            .split_once(&located)
            .map(|(_, rest)| rest)
            .unwrap_or_else(|| panic!("{name}: no file name in {stderr:?}"));
        let has_line = after
            .split(':')
            .next()
            .is_some_and(|l| l.parse::<usize>().is_ok());
        assert!(has_line, "{name}: no line number in {stderr:?}");
    }
}

#[test]
fn hash_password_reads_stdin() {
    let mut child = Command::new(BIN)
        .arg("hash-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"correct horse\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let hash = String::from_utf8(out.stdout).unwrap();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    assert!(!hash.contains("correct horse"));
}

// ---------- a running binary ----------

struct Relay {
    child: Child,
}

impl Relay {
    fn start(config: &Path, dir: &Path, port: u16, log_name: &str) -> Relay {
        let log = dir.join(log_name);
        let err = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(BIN)
            .args(["run", "--config", config.to_str().unwrap()])
            .current_dir(dir)
            .env("RUST_LOG", "trace")
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !support::greets(port) {
            assert!(
                Instant::now() < deadline,
                "relay did not start; log: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Relay { child }
    }

    fn sigterm(mut self) -> std::process::ExitStatus {
        unsafe_kill(self.child.id(), 15);
        self.child.wait().unwrap()
    }
}

fn unsafe_kill(pid: u32, sig: i32) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// A minimal blocking SMTP client; returns the queue ID from the 250.
fn send_one(addr: SocketAddr, subject: &str, auth: Option<&str>) -> Result<String, String> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let mut w = s.try_clone().map_err(|e| e.to_string())?;
    let mut r = BufReader::new(s);
    let mut expect = |code: &str| -> Result<String, String> {
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
                return Err("closed".into());
            }
            if line.as_bytes().get(3) == Some(&b'-') {
                continue;
            }
            return if line.starts_with(code) {
                Ok(line)
            } else {
                Err(line)
            };
        }
    };
    expect("220")?;
    let mut cmd = |line: &str, code: &str, w: &mut TcpStream| -> Result<String, String> {
        w.write_all(format!("{line}\r\n").as_bytes())
            .map_err(|e| e.to_string())?;
        expect(code)
    };
    cmd("EHLO crash-test", "250", &mut w)?;
    if let Some(b64) = auth {
        cmd(&format!("AUTH PLAIN {b64}"), "235", &mut w)?;
    }
    cmd("MAIL FROM:<scanner@printer.local>", "250", &mut w)?;
    cmd("RCPT TO:<boss@example.com>", "250", &mut w)?;
    cmd("DATA", "354", &mut w)?;
    let body = format!("Subject: {subject}\r\n\r\n{}\r\n.\r\n", "x".repeat(2000));
    let reply = cmd(&body, "250", &mut w)?;
    let _ = w.write_all(b"QUIT\r\n");
    Ok(reply.trim().rsplit(' ').next().unwrap_or("").to_string())
}

fn config_for(dir: &Path, port: u16, extra: &str) -> PathBuf {
    let text = format!(
        "hostname = \"relay.test\"\n[[listener]]\naddress = \"127.0.0.1:{port}\"\nplaintext_auth = true\n[relay]\nallowed_networks = [\"127.0.0.1/32\"]\nshutdown_grace = \"2s\"\n{extra}\n[queue]\ndir = \"spool\"\nretry_initial = \"200ms\"\nretry_max = \"1s\"\n[[account]]\nname = \"local\"\nkind = \"capture\"\ndir = \"capture\"\n"
    );
    let path = dir.join("exorelay.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Subjects of captured messages, with how often each was captured.
fn captured_subjects(dir: &Path) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".eml")
            || name.starts_with('.')
            || !dir.join(name.replace(".eml", ".json")).exists()
        {
            continue;
        }
        let mut text = String::new();
        std::fs::File::open(e.path())
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        if let Some(s) = text.lines().find_map(|l| l.strip_prefix("Subject: ")) {
            *out.entry(s.to_string()).or_insert(0) += 1;
        }
    }
    out
}

#[test]
fn logs_never_show_passwords_and_sigterm_is_clean() {
    use base64::Engine;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let password = "Pr1nter-Secret-Value";
    let hash = exorelay::smtp::auth::hash_password(password).unwrap();
    let user = format!("[[user]]\nname = \"printer\"\npassword_hash = \"{hash}\"\n");
    let config = config_for(dir.path(), port, "");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("[queue]", &format!("{user}[queue]"));
    std::fs::write(&config, text).unwrap();
    let relay = Relay::start(&config, dir.path(), port, "relay.log");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let good = base64::engine::general_purpose::STANDARD.encode(format!("\0printer\0{password}"));
    let bad = base64::engine::general_purpose::STANDARD.encode("\0printer\0Wrong-Secret-Value");
    send_one(addr, "with-auth", Some(&good)).unwrap();
    assert!(send_one(addr, "bad-auth", Some(&bad)).is_err());
    let status = relay.sigterm();
    assert!(status.success(), "exit status after SIGTERM: {status:?}");
    let log = std::fs::read_to_string(dir.path().join("relay.log")).unwrap();
    assert!(
        log.contains("AUTH succeeded") && log.contains("AUTH failed"),
        "{log}"
    );
    for secret in [password, "Wrong-Secret-Value", &good, &bad] {
        assert!(!log.contains(secret), "{secret:?} found in the log");
    }
    assert_eq!(
        captured_subjects(&dir.path().join("capture")).get("with-auth"),
        Some(&1)
    );
}

#[test]
fn kill_9_never_loses_an_acknowledged_message() {
    let dir = tempfile::tempdir().unwrap();
    let (port, http_port) = (free_port(), free_port());
    let config = config_for(
        dir.path(),
        port,
        &format!("[http]\nlisten = \"127.0.0.1:{http_port}\"\n"),
    );
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let acked: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let rounds = 25;
    let clients = 8;
    let mut rng = fastrand::Rng::with_seed(0x5eed);
    for round in 0..rounds {
        let mut relay = Relay::start(&config, dir.path(), port, "relay.log");
        let stop = Arc::new(AtomicBool::new(false));
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                let (stop, acked) = (stop.clone(), acked.clone());
                std::thread::spawn(move || {
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let subject = format!("crash-r{round}-c{c}-n{n}");
                        match send_one(addr, &subject, None) {
                            Ok(_) => acked.lock().unwrap().push(subject),
                            Err(_) => break,
                        }
                        n += 1;
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(rng.u64(50..400)));
        relay.child.kill().unwrap(); // SIGKILL
        relay.child.wait().unwrap();
        stop.store(true, Ordering::Relaxed);
        for h in handles {
            h.join().unwrap();
        }
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > rounds,
        "too few messages were sent to prove anything: {}",
        acked.len()
    );

    // Restart once more and let the forwarder drain the spool.
    let relay = Relay::start(&config, dir.path(), port, "relay.log");
    let capture = dir.path().join("capture");
    let deadline = Instant::now() + Duration::from_secs(60);
    let subjects = loop {
        let subjects = captured_subjects(&capture);
        if acked.iter().all(|s| subjects.contains_key(s)) {
            break subjects;
        }
        if Instant::now() > deadline {
            let missing: Vec<_> = acked
                .iter()
                .filter(|s| !subjects.contains_key(*s))
                .collect();
            panic!(
                "{} acknowledged messages missing after restart: {missing:?}",
                missing.len()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let duplicates: usize = subjects.values().map(|n| n - 1).sum();
    let unacked_delivered = subjects.keys().filter(|s| !acked.contains(s)).count();
    eprintln!(
        "crash test: {rounds} kill -9 rounds, {} messages acknowledged, all delivered; {duplicates} duplicates; {unacked_delivered} delivered though the client saw no 250 (killed between commit and reply)",
        acked.len()
    );
    assert_eq!(
        duplicates, 0,
        "capture is keyed by queue ID, so no message may appear twice"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_dir(dir.path().join("spool/queue"))
        .unwrap()
        .count()
        > 0
    {
        assert!(Instant::now() < deadline, "spool did not drain");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Killed transfers leave no stray file: everything in tmp/ is a spare kept for reuse.
    let strays = support::strays_in_tmp(&dir.path().join("spool/tmp"), http_port);
    assert!(strays.is_empty(), "stray files in spool/tmp: {strays:?}");
    assert_eq!(
        std::fs::read_dir(dir.path().join("spool/corrupt"))
            .unwrap()
            .count(),
        0,
        "files quarantined"
    );
    assert!(relay.sigterm().success());
}

#[test]
fn check_refuses_allowed_networks_with_public_addresses() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("exorelay.toml");
    let check = |text: &str| {
        std::fs::write(&path, text).unwrap();
        let out = exorelay(&["check", "--config", path.to_str().unwrap()]);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let nets = |list: &str| GOOD.replace("[\"127.0.0.0/8\"]", list);
    // Two halves are as open as 0.0.0.0/0.
    let (code, stderr) = check(&nets(r#"["127.0.0.0/8", "0.0.0.0/1", "128.0.0.0/1"]"#));
    assert_eq!(code, Some(2), "{stderr}");
    let line = format!(
        "{}:7: relay.allowed_networks[1]: 0.0.0.0/1 includes public",
        path.display()
    );
    assert!(stderr.contains(&line), "{stderr}");
    assert!(stderr.contains("allow_public_networks = true"), "{stderr}");
    for bad in ["8.8.8.0/24", "::/0", "2000::/3", "192.168.0.0/15"] {
        let (code, stderr) = check(&nets(&format!("[\"{bad}\"]")));
        assert_eq!(code, Some(2), "{bad}: {stderr}");
        assert!(
            stderr.contains("relay.allowed_networks[0]"),
            "{bad}: {stderr}"
        );
    }
    // Private, loopback, link-local, CGNAT and ULA space is fine.
    let lan = r#"["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "127.0.0.0/8", "169.254.0.0/16", "100.64.0.0/10", "::1/128", "fe80::/10", "fc00::/7", "::ffff:192.168.1.0/120"]"#;
    let (code, stderr) = check(&nets(lan));
    assert_eq!(code, Some(0), "{stderr}");
    // The override lets a LAN numbered from public space through...
    let public_lan =
        nets(r#"["198.51.100.0/24"]"#).replace("[relay]", "[relay]\nallow_public_networks = true");
    let (code, stderr) = check(&public_lan);
    assert_eq!(code, Some(0), "{stderr}");
    // ...but never "everyone".
    let (code, stderr) = check(&public_lan.replace("198.51.100.0/24", "0.0.0.0/0"));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("open relay"), "{stderr}");
}

/// Waits for `child` to exit within `limit`; kills it and fails the test otherwise.
fn exit_within(child: &mut Child, limit: Duration, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what} was still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A second relay on the same spool would deliver and recycle the first one's mail: it must
/// refuse to start, with exit status 1 and a message naming the first one's PID, whether it
/// was given the same config (same ports) or only the same spool.
#[test]
fn a_second_relay_on_the_same_spool_exits_1_naming_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = config_for(dir.path(), port, "");
    let relay = Relay::start(&config, dir.path(), port, "relay.log");
    let first_pid = relay.child.id();
    let other_ports = dir.path().join("other-ports.toml");
    std::fs::write(
        &other_ports,
        std::fs::read_to_string(&config)
            .unwrap()
            .replace(&format!(":{port}"), &format!(":{}", free_port())),
    )
    .unwrap();
    for second_config in [&config, &other_ports] {
        let mut second = Command::new(BIN)
            .args(["run", "--config", second_config.to_str().unwrap()])
            .current_dir(dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let status = exit_within(&mut second, Duration::from_secs(20), "the second relay");
        let mut output = String::new();
        second
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut output)
            .unwrap();
        second
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut output)
            .unwrap();
        assert_eq!(status.code(), Some(1), "{output}");
        assert!(
            output.contains(&format!("PID {first_pid}")),
            "the message should name the first relay: {output}"
        );
    }
    // The first relay still works.
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    send_one(addr, "after-the-second", None).unwrap();
    let capture = dir.path().join("capture");
    let deadline = Instant::now() + Duration::from_secs(20);
    while captured_subjects(&capture).get("after-the-second") != Some(&1) {
        assert!(Instant::now() < deadline, "not delivered");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(relay.sigterm().success());
}

/// Every spool file is 0600 and folder 0700, every captured file 0640 and the capture folder
/// 0750, whatever the umask the relay was started with.
#[test]
fn files_and_folders_get_their_modes_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }
    fn walk(p: &Path, out: &mut Vec<PathBuf>) {
        out.push(p.to_path_buf());
        if p.is_dir() {
            for e in std::fs::read_dir(p).unwrap() {
                walk(&e.unwrap().path(), out);
            }
        }
    }
    for umask in ["000", "077"] {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let config = config_for(dir.path(), port, "");
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "umask {umask}; exec \"$0\" run --config \"$1\" 2>relay.log"
            ))
            .arg(BIN)
            .arg(&config)
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !support::greets(port) {
            assert!(Instant::now() < deadline, "relay did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        send_one(addr, "modes", None).unwrap();
        let capture = dir.path().join("capture");
        while captured_subjects(&capture).get("modes") != Some(&1) {
            assert!(Instant::now() < deadline, "not delivered");
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut spool = Vec::new();
        walk(&dir.path().join("spool"), &mut spool);
        assert!(spool.iter().any(|p| p.is_file()), "no file in the spool");
        for p in &spool {
            let want = if p.is_dir() { 0o700 } else { 0o600 };
            assert_eq!(mode(p), want, "umask {umask}: {}", p.display());
        }
        let mut captured = Vec::new();
        walk(&capture, &mut captured);
        for p in &captured {
            let want = if p.is_dir() { 0o750 } else { 0o640 };
            assert_eq!(mode(p), want, "umask {umask}: {}", p.display());
        }
        unsafe_kill(child.id(), 15);
        assert!(child.wait().unwrap().success());
    }
}

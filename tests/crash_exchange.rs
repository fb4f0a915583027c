//! Crash loop toward the fake Exchange: the real binary under load is killed with SIGKILL at
//! random moments and restarted. Every message acknowledged with 250 must reach the fake;
//! duplicates (delivered, then killed before the spool recorded it) must stay within what was
//! in flight; nothing may be left in `tmp/`.
//!
//! Rounds: EXORELAY_CRASH_ROUNDS (default 20, the short form CI runs; 100 for the full run).

mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::fake_exchange::*;

fn send(addr: SocketAddr, subject: &str) -> Result<(), String> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let mut w = s.try_clone().map_err(|e| e.to_string())?;
    let mut r = BufReader::new(s);
    let mut expect = |code: &str| -> Result<(), String> {
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
                return Err("closed".into());
            }
            if line.as_bytes().get(3) == Some(&b'-') {
                continue;
            }
            return if line.starts_with(code) {
                Ok(())
            } else {
                Err(line)
            };
        }
    };
    expect("220")?;
    for (cmd, code) in [
        ("EHLO crash", "250"),
        ("MAIL FROM:<scanner@printer.local>", "250"),
        ("RCPT TO:<boss@contoso.com>", "250"),
        ("DATA", "354"),
    ] {
        w.write_all(format!("{cmd}\r\n").as_bytes())
            .map_err(|e| e.to_string())?;
        expect(code)?;
    }
    w.write_all(format!("Subject: {subject}\r\n\r\n{}\r\n.\r\n", "z".repeat(1500)).as_bytes())
        .map_err(|e| e.to_string())?;
    expect("250")?;
    let _ = w.write_all(b"QUIT\r\n");
    Ok(())
}

fn start(cfg: &std::path::Path, dir: &std::path::Path, port: u16) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("relay.log"))
        .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_exorelay"))
        .args(["run", "--config", cfg.to_str().unwrap()])
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !support::greets(port) {
        assert!(Instant::now() < deadline, "relay did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

fn subject_of(data: &[u8]) -> Option<String> {
    String::from_utf8_lossy(data)
        .lines()
        .find_map(|l| l.strip_prefix("Subject: ").map(str::to_string))
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_under_load_toward_exchange_loses_nothing() {
    let rounds: usize = std::env::var("EXORELAY_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let fake = FakeExchange::start().await;
    fake.set_rate(usize::MAX, Duration::from_secs(60));
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &fake.smtp_ca_pem).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let http_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = dir.path().join("exorelay.toml");
    std::fs::write(
        &cfg,
        format!(
            "hostname = \"crash.test\"\n[[listener]]\naddress = \"127.0.0.1:{port}\"\n[relay]\nallowed_networks = [\"127.0.0.1/32\"]\n[http]\nlisten = \"127.0.0.1:{http_port}\"\n[queue]\ndir = \"spool\"\nretry_initial = \"200ms\"\nretry_max = \"1s\"\n[[account]]\nname = \"contoso\"\nkind = \"exchange\"\nmailbox = \"{MAILBOX}\"\ntenant = \"{TENANT}\"\nclient_id = \"{CLIENT_ID}\"\nclient_secret_file = \"{}\"\nauthority_url = \"{}\"\nsmtp_host = \"127.0.0.1\"\nsmtp_port = {}\nca_file = \"{}\"\nmax_connections = 3\nmax_messages_per_minute = 100000\n",
            secret.display(),
            fake.authority(),
            fake.smtp_addr.port(),
            ca.display()
        ),
    )
    .unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let acked: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let mut rng = fastrand::Rng::with_seed(0xC0FFEE);
    for round in 0..rounds {
        let mut child = start(&cfg, dir.path(), port);
        let stop = Arc::new(AtomicBool::new(false));
        let clients: Vec<_> = (0..6)
            .map(|c| {
                let (stop, acked) = (stop.clone(), acked.clone());
                std::thread::spawn(move || {
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let subject = format!("x-r{round}-c{c}-n{n}");
                        match send(addr, &subject) {
                            Ok(()) => acked.lock().unwrap().push(subject),
                            Err(e) => {
                                if n == 0 && round == 0 {
                                    eprintln!("first send failed: {e}");
                                }
                                break;
                            }
                        }
                        n += 1;
                    }
                })
            })
            .collect();
        let pause = rng.u64(30..300);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        child.kill().unwrap();
        child.wait().unwrap();
        stop.store(true, Ordering::Relaxed);
        for c in clients {
            tokio::task::spawn_blocking(move || c.join().unwrap())
                .await
                .unwrap();
        }
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > rounds,
        "too little traffic to prove anything: {}",
        acked.len()
    );

    let mut child = start(&cfg, dir.path(), port);
    let deadline = Instant::now() + Duration::from_secs(90);
    let counts = loop {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for d in fake.delivered() {
            if let Some(s) = subject_of(&d.data) {
                *counts.entry(s).or_insert(0) += 1;
            }
        }
        let queue_empty = std::fs::read_dir(dir.path().join("spool/queue"))
            .map(|d| d.count() == 0)
            .unwrap_or(false);
        if acked.iter().all(|s| counts.contains_key(s)) && queue_empty {
            break counts;
        }
        if Instant::now() > deadline {
            let missing: Vec<_> = acked.iter().filter(|s| !counts.contains_key(*s)).collect();
            panic!(
                "{} acknowledged messages never reached Exchange: {missing:?}",
                missing.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let duplicates: usize = counts.values().map(|n| n - 1).sum();
    eprintln!(
        "crash loop toward Exchange: {rounds} kill -9 rounds, {} acknowledged, all delivered, {duplicates} duplicates",
        acked.len()
    );
    // A duplicate needs a kill between Exchange's 250 and the spool update: at most the
    // deliveries in flight at each kill (3 connections).
    assert!(
        duplicates <= rounds * 3,
        "{duplicates} duplicates is more than was in flight"
    );
    // Killed transfers leave no stray file: everything in tmp/ is a spare kept for reuse.
    let strays = support::strays_in_tmp(&dir.path().join("spool/tmp"), http_port);
    assert!(strays.is_empty(), "stray files in tmp/: {strays:?}");
    // Every body passed its length/CRC32C check at each restart and before each attempt.
    let quarantined = std::fs::read_dir(dir.path().join("spool/corrupt"))
        .unwrap()
        .count();
    assert_eq!(quarantined, 0, "files moved to corrupt/");
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let _ = child.wait();
}

//! `cargo bench --bench relay -- [options]`: runs the real exorelay binary with a capture or
//! fake-Exchange upstream, drives it with a built-in SMTP load generator, verifies that every
//! message arrived intact, and prints a table and a JSON line.
//!
//! Options (defaults in brackets):
//!   --messages N [2000]        messages to send
//!   --size BYTES [2048]        approximate message size (suffixes K, M)
//!   --concurrency C [50]       concurrent client connections
//!   --per-connection M [1]     messages per connection (printers send one)
//!   --upstream capture|exchange|graph [capture]
//!                              graph: the fake Graph (sendMail, base64 MIME over HTTP); messages
//!                              over Graph's 4 MB request limit go through drafts and upload
//!                              sessions, so --size above ~3MB sends a multipart message
//!   --warmup N [0]             first send N messages, unmeasured, and wait for their delivery
//!   --direct                   also drive the fake Exchange directly (STARTTLS + XOAUTH2 per
//!                              connection) for the baseline the relay is compared with
//!
//! Environment: `EXORELAY_BENCH_BIN=/path/to/exorelay` runs that binary instead of this
//! checkout's (build an older commit's release binary to measure a change before and after).
//!
//! The relay's spool and capture folder live in a fresh folder under `$TMPDIR` (default /tmp).
//! Before the relay starts, a disk probe rewrites and fsyncs 2,000 small files there from C
//! threads (as the spool rewrites its recycled files) and prints the rate: the machine's disk
//! varies from day to day, and the relay's figures only compare against the disk they ran on.

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

struct Args {
    messages: usize,
    size: usize,
    concurrency: usize,
    per_connection: usize,
    upstream: String,
    direct: bool,
    warmup: usize,
}

const USAGE: &str = "usage: cargo bench --bench relay -- [--messages N] [--size BYTES] \
[--concurrency C] [--per-connection M] [--upstream capture|exchange|graph] [--warmup N] [--direct]";

/// Says what is wrong with the command line and exits (status 2), like any command-line tool.
fn usage(problem: &str) -> ! {
    if !problem.is_empty() {
        eprintln!("relay bench: {problem}");
    }
    eprintln!("{USAGE}");
    std::process::exit(if problem.is_empty() { 0 } else { 2 })
}

fn number(option: &str, v: &str) -> usize {
    v.parse()
        .unwrap_or_else(|_| usage(&format!("{option} wants a whole number, not {v:?}")))
}

fn parse_size(s: &str) -> usize {
    let s = s.trim().to_ascii_uppercase();
    let (num, mult) = if let Some(n) = s.strip_suffix("MB").or_else(|| s.strip_suffix('M')) {
        (n, 1024 * 1024)
    } else if let Some(n) = s.strip_suffix("KB").or_else(|| s.strip_suffix('K')) {
        (n, 1024)
    } else {
        (s.as_str(), 1)
    };
    number("--size", num) * mult
}

fn args() -> Args {
    let mut a = Args {
        messages: 2000,
        size: 2048,
        concurrency: 50,
        per_connection: 1,
        upstream: "capture".into(),
        direct: false,
        warmup: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = || {
            it.next()
                .unwrap_or_else(|| usage(&format!("{k} needs a value")))
        };
        match k.as_str() {
            "--messages" => a.messages = number(&k, &val()),
            "--size" => a.size = parse_size(&val()),
            "--concurrency" => a.concurrency = number(&k, &val()).max(1),
            "--per-connection" => a.per_connection = number(&k, &val()).max(1),
            "--upstream" => match val().as_str() {
                u @ ("capture" | "exchange" | "graph") => a.upstream = u.into(),
                other => usage(&format!(
                    "--upstream is capture, exchange or graph, not {other:?}"
                )),
            },
            "--direct" => a.direct = true,
            "--warmup" => a.warmup = number(&k, &val()),
            "--bench" => {}
            "--help" | "-h" => usage(""),
            other => usage(&format!("unknown option {other}")),
        }
    }
    a
}

fn proc_field(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// (user, system) CPU seconds of `pid` (fields 14 and 15 of /proc/PID/stat).
fn cpu_split(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    // After the command name come field 3 (state), 4, ...: field N is at index N - 3.
    let f: Vec<&str> = after.split_whitespace().collect();
    let get = |i: usize| {
        f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) as f64 / unsafe_clk_tck()
    };
    (get(11), get(12))
}

fn cpu_seconds(pid: u32) -> f64 {
    let (u, s) = cpu_split(pid);
    u + s
}

fn unsafe_clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// Graph runs with messages over its request limit: [`body_for`] then makes a multipart message
/// whose bulk is one base64 attachment (Graph uploads it separately; a plain text body of that
/// size cannot be sent through Graph at all).
static MULTIPART: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

const ATTACHMENT_HEAD: &str = "Content-Type: application/octet-stream; name=\"bench.bin\"\r\nContent-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=\"bench.bin\"";

/// The attachment of message `i` in a multipart run: about `size` bytes once base64-encoded.
fn attachment_for(i: usize, size: usize) -> Vec<u8> {
    (0..size / 4 * 3)
        .map(|k| (k.wrapping_mul(31).wrapping_add(i) % 251) as u8)
        .collect()
}

fn base64_lines(data: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(data);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(76)
        .map(|c| std::str::from_utf8(c).unwrap_or(""))
        .collect();
    lines.join("\r\n")
}

fn multipart_body(i: usize, attachment: Option<&[u8]>) -> Vec<u8> {
    let part = attachment
        .map(|a| {
            format!(
                "--bench\r\n{ATTACHMENT_HEAD}\r\n\r\n{}\r\n",
                base64_lines(a)
            )
        })
        .unwrap_or_default();
    format!("Subject: bench-{i:08}\r\nMessage-ID: <bench-{i}@load>\r\nFrom: scanner@printer.local\r\nTo: boss@example.com\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"bench\"\r\n\r\n--bench\r\nContent-Type: text/plain\r\n\r\nbench {i}\r\n{part}--bench--\r\n").into_bytes()
}

/// A message Graph sent through a draft, put back together: the uploaded attachment is
/// re-encoded into the place the relay took it from (the draft kept everything else).
fn reassembled(draft_mime: &[u8], attachment: &[u8]) -> Vec<u8> {
    let closing = b"--bench--\r\n";
    let Some(at) = draft_mime
        .windows(closing.len())
        .rposition(|w| w == closing)
    else {
        return draft_mime.to_vec();
    };
    let mut out = draft_mime[..at].to_vec();
    out.extend_from_slice(
        format!(
            "--bench\r\n{ATTACHMENT_HEAD}\r\n\r\n{}\r\n",
            base64_lines(attachment)
        )
        .as_bytes(),
    );
    out.extend_from_slice(&draft_mime[at..]);
    out
}

fn body_for(i: usize, size: usize) -> Vec<u8> {
    if MULTIPART.get().copied().unwrap_or(false) {
        return multipart_body(i, Some(&attachment_for(i, size)));
    }
    let mut b = format!("Subject: bench-{i:08}\r\nMessage-ID: <bench-{i}@load>\r\nFrom: scanner@printer.local\r\nTo: boss@example.com\r\n\r\n").into_bytes();
    let line = format!("{:076}\r\n", i);
    while b.len() + line.len() <= size.max(b.len() + line.len()) && b.len() < size {
        b.extend_from_slice(line.as_bytes());
    }
    b
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn expect(r: &mut BufReader<TcpStream>, code: &str) -> Result<(), String> {
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await.map_err(|e| e.to_string())? == 0 {
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
}

/// One client connection sending `ids`; returns accept latencies (end of data to 250).
async fn client(
    addr: std::net::SocketAddr,
    ids: Vec<usize>,
    size: usize,
) -> Result<Vec<Duration>, String> {
    let s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    s.set_nodelay(true).ok();
    let mut r = BufReader::new(s);
    expect(&mut r, "220").await?;
    r.get_mut()
        .write_all(b"EHLO bench\r\n")
        .await
        .map_err(|e| e.to_string())?;
    expect(&mut r, "250").await?;
    let mut lat = Vec::with_capacity(ids.len());
    for i in ids {
        r.get_mut()
            .write_all(
                b"MAIL FROM:<scanner@printer.local>\r\nRCPT TO:<boss@example.com>\r\nDATA\r\n",
            )
            .await
            .map_err(|e| e.to_string())?;
        expect(&mut r, "250").await?;
        expect(&mut r, "250").await?;
        expect(&mut r, "354").await?;
        r.get_mut()
            .write_all(&body_for(i, size))
            .await
            .map_err(|e| e.to_string())?;
        let t = Instant::now();
        r.get_mut()
            .write_all(b".\r\n")
            .await
            .map_err(|e| e.to_string())?;
        expect(&mut r, "250").await?;
        lat.push(t.elapsed());
    }
    let _ = r.get_mut().write_all(b"QUIT\r\n").await;
    Ok(lat)
}

/// Message numbers of the warm-up messages (left out of the verification).
const WARMUP_BASE: usize = 90_000_000;

/// Sends messages `ids` over `concurrency` connections, `per` messages per connection (they take
/// numbers from a shared counter); returns every accept latency.
async fn send_load(
    addr: std::net::SocketAddr,
    ids: std::ops::Range<usize>,
    concurrency: usize,
    per: usize,
    size: usize,
) -> Vec<Duration> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(ids.start));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (next, end) = (next.clone(), ids.end);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let first = next.fetch_add(per, std::sync::atomic::Ordering::SeqCst);
                if first >= end {
                    break;
                }
                let ids: Vec<usize> = (first..(first + per).min(end)).collect();
                match client(addr, ids, size).await {
                    Ok(l) => lat.extend(l),
                    Err(e) => panic!("client failed: {e}"),
                }
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    lat
}

fn write_config(
    dir: &Path,
    port: u16,
    upstream: &str,
    fake: Option<&support::fake_exchange::FakeExchange>,
    graph: Option<&support::fake_graph::FakeGraph>,
) -> PathBuf {
    let account = match (upstream, fake) {
        ("graph", _) if graph.is_some() => {
            use std::os::unix::fs::PermissionsExt;
            let g = graph.unwrap();
            let secret = dir.join("secret");
            std::fs::write(&secret, support::fake_graph::SECRET).unwrap();
            std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
            format!(
                "[[account]]\nname = \"contoso\"\nkind = \"graph\"\nmailbox = \"{}\"\ntenant = \"{}\"\nclient_id = \"{}\"\nclient_secret_file = \"{}\"\nauthority_url = \"{url}\"\ngraph_url = \"{url}\"\nmax_connections = 4\nmax_messages_per_minute = 1000000\nmax_recipients_per_day = 100000000\n",
                support::fake_graph::MAILBOX,
                support::fake_graph::TENANT,
                support::fake_graph::CLIENT_ID,
                secret.display(),
                url = g.url(),
            )
        }
        ("exchange", Some(f)) => {
            use std::os::unix::fs::PermissionsExt;
            let secret = dir.join("secret");
            std::fs::write(&secret, support::fake_exchange::SECRET).unwrap();
            std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
            let ca = dir.join("ca.pem");
            std::fs::write(&ca, &f.smtp_ca_pem).unwrap();
            format!(
                "[[account]]\nname = \"contoso\"\nkind = \"exchange\"\nmailbox = \"{}\"\ntenant = \"{}\"\nclient_id = \"{}\"\nclient_secret_file = \"{}\"\nauthority_url = \"{}\"\nsmtp_host = \"127.0.0.1\"\nsmtp_port = {}\nca_file = \"{}\"\nmax_connections = 3\nmax_messages_per_minute = 1000000\nmax_recipients_per_day = 100000000\n",
                support::fake_exchange::MAILBOX,
                support::fake_exchange::TENANT,
                support::fake_exchange::CLIENT_ID,
                secret.display(),
                f.authority(),
                f.smtp_addr.port(),
                ca.display()
            )
        }
        _ => "[[account]]\nname = \"local\"\nkind = \"capture\"\ndir = \"capture\"\nmax_connections = 4\n".to_string(),
    };
    let text = format!(
        "hostname = \"bench.local\"\n[[listener]]\naddress = \"127.0.0.1:{port}\"\n[relay]\nallowed_networks = [\"127.0.0.1/32\"]\nmax_connections = 2000\nmax_connections_per_client = 2000\nmax_message_size = \"100MB\"\n[queue]\ndir = \"spool\"\nmax_messages = 10000000\n{account}"
    );
    let p = dir.join("bench.toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn count_captured(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
                .count()
        })
        .unwrap_or(0)
}

/// Verifies every message arrived once with its body intact; returns (missing, corrupt, duplicates).
fn verify(bodies: Vec<Vec<u8>>, n: usize, size: usize) -> (usize, usize, usize) {
    let mut seen = vec![0usize; n];
    let mut corrupt = 0;
    for b in bodies {
        let text = String::from_utf8_lossy(&b);
        let Some(i) = text
            .split("Subject: bench-")
            .nth(1)
            .and_then(|s| s.split("\r\n").next())
            .and_then(|s| s.parse::<usize>().ok())
        else {
            corrupt += 1;
            continue;
        };
        if i >= WARMUP_BASE {
            continue;
        }
        let expected = body_for(i, size);
        let exp_body = &expected[expected.windows(4).position(|w| w == b"\r\n\r\n").unwrap()..];
        let got_body = b.windows(4).position(|w| w == b"\r\n\r\n").map(|p| &b[p..]);
        if got_body != Some(exp_body) || i >= n {
            corrupt += 1;
            continue;
        }
        seen[i] += 1;
    }
    let missing = seen.iter().filter(|c| **c == 0).count();
    let dups = seen.iter().map(|c| c.saturating_sub(1)).sum();
    (missing, corrupt, dups)
}

async fn direct_fake(
    fake: &support::fake_exchange::FakeExchange,
    n: usize,
    size: usize,
    concurrency: usize,
) -> f64 {
    use lettre::transport::smtp::authentication::{Credentials, Mechanism};
    use lettre::transport::smtp::client::{
        AsyncSmtpConnection, Certificate, CertificateStore, TlsParameters,
    };
    use lettre::transport::smtp::extension::ClientId;
    let form = [
        ("client_id", support::fake_exchange::CLIENT_ID),
        ("client_secret", support::fake_exchange::SECRET),
        ("scope", "https://outlook.office365.com/.default"),
        ("grant_type", "client_credentials"),
    ];
    let tok: serde_json::Value = reqwest::Client::new()
        .post(format!(
            "{}/{}/oauth2/v2.0/token",
            fake.authority(),
            support::fake_exchange::TENANT
        ))
        .form(&form)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = tok["access_token"].as_str().unwrap().to_string();
    let tls = TlsParameters::builder("127.0.0.1".into())
        .certificate_store(CertificateStore::None)
        .add_root_certificate(Certificate::from_pem(fake.smtp_ca_pem.as_bytes()).unwrap())
        .build_rustls()
        .unwrap();
    let before = fake.delivered_count();
    let start = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let workers: Vec<_> = (0..concurrency.min(3))
        .map(|_| {
            let (next, tls, token, addr) =
                (next.clone(), tls.clone(), token.clone(), fake.smtp_addr);
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if i >= n {
                        break;
                    }
                    // The fake allows 3 connections per mailbox; a reconnect can race the
                    // previous close, so a refused attempt is simply tried again.
                    for _ in 0..50 {
                        let hello = ClientId::Domain("bench".into());
                        let attempt = async {
                            // Same socket options as the relay's upstream (no Nagle), for a fair baseline.
                            let tcp = TcpStream::connect(addr).await.expect("connect to the fake");
                            tcp.set_nodelay(true).ok();
                            let mut c =
                                AsyncSmtpConnection::connect_with_transport(Box::new(tcp), &hello)
                                    .await?;
                            c.starttls(tls.clone(), &hello).await?;
                            c.auth(
                                &[Mechanism::Xoauth2],
                                &Credentials::new(
                                    support::fake_exchange::MAILBOX.into(),
                                    token.clone(),
                                ),
                            )
                            .await?;
                            let env = lettre::address::Envelope::new(
                                Some(support::fake_exchange::MAILBOX.parse().unwrap()),
                                vec!["boss@example.com".parse().unwrap()],
                            )
                            .unwrap();
                            let body = String::from_utf8(body_for(i, size))
                                .unwrap()
                                .replace("scanner@printer.local", support::fake_exchange::MAILBOX)
                                .into_bytes();
                            c.send(&env, body.strip_suffix(b"\r\n").unwrap_or(&body))
                                .await?;
                            let _ = c.quit().await;
                            Ok::<(), lettre::transport::smtp::Error>(())
                        };
                        match attempt.await {
                            Ok(()) => break,
                            Err(e) if i == 0 => eprintln!("direct send failed (retrying): {e}"),
                            Err(_) => {}
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    assert_eq!(fake.delivered_count() - before, n);
    rate
}

fn main() {
    let a = args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(a));
}

/// The fake Exchange on a runtime of its own, with as many threads as the load generator's:
/// Exchange is another machine, and on the load generator's runtime the fake's replies would
/// queue behind its client tasks.
fn fake_on_its_own_runtime() -> support::fake_exchange::FakeExchange {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fake-exchange")
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let _ = tx.send(support::fake_exchange::FakeExchange::start().await);
            std::future::pending::<()>().await
        });
    });
    rx.recv().expect("the fake Exchange started")
}

/// The fake Graph on a runtime of its own, for the same reason.
fn graph_on_its_own_runtime() -> support::fake_graph::FakeGraph {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fake-graph")
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let _ = tx.send(support::fake_graph::FakeGraph::start().await);
            std::future::pending::<()>().await
        });
    });
    rx.recv().expect("the fake Graph started")
}

/// Fsynced rewrites of 2 KB files per second in `dir` from `writers` threads at once.
fn disk_probe(dir: &Path, writers: usize) -> f64 {
    use std::io::Write;
    let probe = dir.join("disk-probe");
    std::fs::create_dir_all(&probe).unwrap();
    const FILES: usize = 2000;
    let paths: Vec<PathBuf> = (0..FILES).map(|i| probe.join(format!("f{i}"))).collect();
    for p in &paths {
        std::fs::write(p, b"").unwrap();
    }
    let data = vec![b'x'; 2048];
    let start = Instant::now();
    std::thread::scope(|s| {
        for w in 0..writers.min(FILES) {
            let (paths, data) = (&paths, &data);
            s.spawn(move || {
                for p in paths.iter().skip(w).step_by(writers) {
                    let mut f = std::fs::OpenOptions::new()
                        .write(true)
                        .truncate(true)
                        .open(p)
                        .unwrap();
                    f.write_all(data).unwrap();
                    f.sync_all().unwrap();
                }
            });
        }
    });
    // The files stay until the bench's folder goes: freshly deleted inodes would slow the
    // relay's own file creation (ext4 skips them for a while when allocating).
    FILES as f64 / start.elapsed().as_secs_f64()
}

async fn run(a: Args) {
    exorelay::tls::install_provider();
    let dir = tempfile::tempdir().unwrap();
    let disk_rate = disk_probe(dir.path(), a.concurrency);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let fake = if a.upstream == "exchange" || a.direct {
        let f = fake_on_its_own_runtime();
        f.set_rate(usize::MAX, Duration::from_secs(60));
        Some(f)
    } else {
        None
    };
    let direct_rate = match (&fake, a.direct) {
        (Some(f), true) => Some(direct_fake(f, a.messages.min(2000), a.size, a.concurrency).await),
        _ => None,
    };
    let graph = (a.upstream == "graph").then(graph_on_its_own_runtime);
    let _ = MULTIPART.set(a.upstream == "graph" && a.size > 3_000_000);
    let graph_sent = || graph.as_ref().map(|g| g.sent_count()).unwrap_or(0);
    let cfg = write_config(dir.path(), port, &a.upstream, fake.as_ref(), graph.as_ref());
    // EXORELAY_BENCH_BIN runs another build (an older commit's) for before/after comparisons.
    let bin = std::env::var_os("EXORELAY_BENCH_BIN")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_exorelay").into());
    let mut child: Child = Command::new(bin)
        .args(["run", "--config", cfg.to_str().unwrap()])
        .current_dir(dir.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start exorelay");
    let pid = child.id();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "relay did not start");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let idle_rss = proc_field(pid, "VmRSS:");

    // Warm-up (not measured): a relay that has run for a while has its token, pooled upstream
    // connections and spare spool files; the baseline above also fetched its token untimed.
    if a.warmup > 0 {
        let cap = dir.path().join("capture");
        let before = fake.as_ref().map(|f| f.delivered_count()).unwrap_or(0) + graph_sent();
        send_load(
            addr,
            WARMUP_BASE..WARMUP_BASE + a.warmup,
            a.concurrency,
            a.per_connection,
            a.size,
        )
        .await;
        let deadline = Instant::now() + Duration::from_secs(120);
        while match &fake {
            Some(f) if a.upstream == "exchange" => f.delivered_count() - before,
            _ if a.upstream == "graph" => graph_sent() - before,
            _ => count_captured(&cap),
        } < a.warmup
        {
            assert!(Instant::now() < deadline, "warm-up not delivered");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let warmup_captured = count_captured(&dir.path().join("capture"));
    let cpu0 = cpu_seconds(pid);
    let (user0, system0) = cpu_split(pid);
    let delivered_before = fake.as_ref().map(|f| f.delivered_count()).unwrap_or(0) + graph_sent();

    let start = Instant::now();
    let mut lat = send_load(addr, 0..a.messages, a.concurrency, a.per_connection, a.size).await;
    let accept_elapsed = start.elapsed();
    let peak_rss_accept = proc_field(pid, "VmHWM:");
    let cpu_accept = cpu_seconds(pid) - cpu0;

    // End to end.
    let capture = dir.path().join("capture");
    let delivered_now = || match &fake {
        Some(f) if a.upstream == "exchange" => f.delivered_count() - delivered_before,
        _ if a.upstream == "graph" => graph_sent() - delivered_before,
        _ => count_captured(&capture) - warmup_captured,
    };
    let delivered_during_accept = delivered_now();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let done = delivered_now();
        if done >= a.messages {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {done} of {} delivered",
            a.messages
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let e2e_elapsed = start.elapsed();
    let cpu = cpu_seconds(pid) - cpu0;
    let (user, system) = cpu_split(pid);
    let (user, system) = (user - user0, system - system0);
    let peak_rss = proc_field(pid, "VmHWM:");
    let _ = Command::new("kill").arg(pid.to_string()).status();
    let _ = child.wait();

    let bodies: Vec<Vec<u8>> = match &fake {
        Some(f) if a.upstream == "exchange" => f
            .delivered()
            .into_iter()
            .skip(delivered_before)
            .map(|d| d.data)
            .collect(),
        _ if a.upstream == "graph" => graph
            .as_ref()
            .map(|g| g.sent())
            .unwrap_or_default()
            .into_iter()
            .skip(delivered_before)
            .map(|s| match s.attachments.first() {
                Some((_, _, bytes)) => reassembled(&s.mime, bytes),
                None => s.mime,
            })
            .collect(),
        _ => std::fs::read_dir(&capture)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| {
                e.file_name().to_string_lossy().ends_with(".eml")
                    && !e.file_name().to_string_lossy().starts_with('.')
            })
            .map(|e| std::fs::read(e.path()).unwrap())
            .collect(),
    };
    let (missing, corrupt, dups) = verify(bodies, a.messages, a.size);

    lat.sort();
    let accepted_rate = a.messages as f64 / accept_elapsed.as_secs_f64();
    let e2e_rate = a.messages as f64 / e2e_elapsed.as_secs_f64();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "exorelay benchmark: {} messages of ~{} bytes, {} connections, {} per connection, upstream {}",
        a.messages, a.size, a.concurrency, a.per_connection, a.upstream
    );
    println!(
        "  disk probe          {disk_rate:>10.0} fsynced 2 KB rewrites/s ({} writers)",
        a.concurrency
    );
    println!("  accepted            {accepted_rate:>10.1} msg/s");
    println!(
        "  accept latency p50  {:>10.2} ms",
        ms(percentile(&lat, 0.5))
    );
    println!(
        "  accept latency p99  {:>10.2} ms",
        ms(percentile(&lat, 0.99))
    );
    println!(
        "  delivered (e2e)     {e2e_rate:>10.1} msg/s ({delivered_during_accept} while accepting, the rest {:.2} s after)",
        (e2e_elapsed - accept_elapsed).as_secs_f64()
    );
    if let Some(d) = direct_rate {
        println!(
            "  fake driven directly{d:>10.1} msg/s (STARTTLS + XOAUTH2 per connection, 3 at once)"
        );
        println!("  e2e / direct        {:>10.0} %", 100.0 * e2e_rate / d);
    }
    println!(
        "  relay CPU           {cpu:>10.2} s ({cpu_accept:.2} s while accepting; user {user:.2} s, system {system:.2} s)"
    );
    println!(
        "  idle RSS            {:>10.1} MB",
        idle_rss as f64 / 1024.0
    );
    println!(
        "  peak RSS            {:>10.1} MB (accept phase {:.1} MB)",
        peak_rss as f64 / 1024.0,
        peak_rss_accept as f64 / 1024.0
    );
    println!(
        "  verified            {} intact, {missing} missing, {corrupt} corrupt, {dups} duplicates",
        a.messages - missing
    );
    let json = serde_json::json!({
        "messages": a.messages, "size": a.size, "concurrency": a.concurrency, "per_connection": a.per_connection, "upstream": a.upstream,
        "accepted_msg_per_s": accepted_rate, "accept_latency_p50_ms": ms(percentile(&lat, 0.5)), "accept_latency_p99_ms": ms(percentile(&lat, 0.99)),
        "delivered_msg_per_s": e2e_rate, "delivered_during_accept": delivered_during_accept, "direct_fake_msg_per_s": direct_rate, "e2e_over_direct": direct_rate.map(|d| e2e_rate / d), "relay_cpu_s": cpu, "relay_cpu_accept_s": cpu_accept,
        "disk_fsyncs_per_s": disk_rate,
        "idle_rss_mb": idle_rss as f64 / 1024.0, "peak_rss_mb": peak_rss as f64 / 1024.0,
        "missing": missing, "corrupt": corrupt, "duplicates": dups,
    });
    println!("{json}");
    assert!(missing == 0 && corrupt == 0, "messages lost or damaged");
}

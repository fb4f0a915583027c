//! Test harness: an in-process relay on bound loopback listeners, a dialog-style SMTP client,
//! throwaway TLS certificates and a log buffer that tests search for leaked secrets.
#![allow(dead_code)]

pub mod browser;
pub mod fake_exchange;
pub mod fake_graph;

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

use exorelay::config::Config;

// ---------- logs ----------

static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();

#[derive(Clone)]
struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut v) = self.0.lock() {
            v.extend_from_slice(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Sends every log line of this test binary (at trace level) into a buffer.
pub fn init_logs() {
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let w = LogWriter(buf.clone());
        let _ = tracing_subscriber::fmt()
            .with_env_filter("trace")
            .with_ansi(false)
            .with_writer(move || w.clone())
            .try_init();
        buf
    });
}

pub fn logs() -> String {
    LOGS.get()
        .map(|b| {
            String::from_utf8_lossy(&b.lock().map(|v| v.clone()).unwrap_or_default()).into_owned()
        })
        .unwrap_or_default()
}

/// Fails if any of `secrets` appears in the logs so far.
pub fn assert_logs_clean(secrets: &[&str]) {
    let logs = logs();
    assert!(!logs.is_empty(), "log capture is not working");
    for s in secrets {
        assert!(!logs.contains(s), "secret {s:?} leaked into the logs");
    }
}

// ---------- TLS ----------

pub struct TestCert {
    pub cert_pem: String,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
}

pub fn make_cert(dir: &Path) -> TestCert {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("rcgen");
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    std::fs::write(&cert_path, ck.cert.pem()).unwrap();
    std::fs::write(&key_path, ck.signing_key.serialize_pem()).unwrap();
    TestCert {
        cert_pem: ck.cert.pem(),
        cert_path,
        key_path,
    }
}

pub fn tls_connector(cert_pem: &str) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(cert_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

// ---------- relay ----------

pub struct TestRelay {
    pub dir: tempfile::TempDir,
    pub addrs: Vec<SocketAddr>,
    /// The HTTP side's address, when `[http] listen` is set.
    pub http: Option<SocketAddr>,
    pub shutdown: CancellationToken,
    pub task: Option<tokio::task::JoinHandle<Result<(), exorelay::RunError>>>,
    pub config: Arc<Config>,
    pub cert: TestCert,
}

/// A password whose hash the test configs use for user "scanner".
pub const PASSWORD: &str = "Sc4nner-pa55word!";

pub fn password_hash() -> &'static str {
    static H: OnceLock<String> = OnceLock::new();
    H.get_or_init(|| exorelay::smtp::auth::hash_password(PASSWORD).unwrap())
}

impl TestRelay {
    /// Starts a relay. `body` is TOML appended after the generated header; it may use
    /// `{dir}` (the temp folder), `{cert}`, `{key}` and `{hash}`. Listeners must use port 0.
    pub async fn start(body: &str) -> TestRelay {
        init_logs();
        let dir = tempfile::tempdir().unwrap();
        let cert = make_cert(dir.path());
        let text = format!("hostname = \"relay.test\"\n{body}")
            .replace("{dir}", &dir.path().display().to_string())
            .replace("{cert}", &cert.cert_path.display().to_string())
            .replace("{key}", &cert.key_path.display().to_string())
            .replace("{hash}", password_hash());
        let path = dir.path().join("exorelay.toml");
        std::fs::write(&path, &text).unwrap();
        let config =
            Arc::new(Config::load(&path).unwrap_or_else(|e| panic!("test config invalid: {e}")));
        let listeners = exorelay::bind_listeners(&config).await.unwrap();
        let addrs = listeners
            .smtp
            .iter()
            .map(|l| l.local_addr().unwrap())
            .collect();
        let http = listeners.http.as_ref().map(|l| l.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(exorelay::run(config.clone(), listeners, shutdown.clone()));
        TestRelay {
            dir,
            addrs,
            http,
            shutdown,
            task: Some(task),
            config,
            cert,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            t.await.unwrap().unwrap();
        }
    }
}

impl Drop for TestRelay {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Standard config: one plain listener, loopback allowed, user "scanner", capture account.
/// `extra_relay` adds or overrides `[relay]` keys.
pub fn basic_config(extra_relay: &str) -> String {
    let defaults = [
        "allowed_networks = [\"127.0.0.1/32\"]",
        "auth_failure_delay = \"300ms\"",
        "max_message_size = \"30MB\"",
        "max_recipients = 5",
    ];
    let overridden = |line: &str| {
        let key = line.split('=').next().unwrap_or("").trim();
        extra_relay
            .lines()
            .any(|l| l.split('=').next().unwrap_or("").trim() == key)
    };
    let relay: Vec<&str> = defaults
        .iter()
        .copied()
        .filter(|l| !overridden(l))
        .collect();
    format!(
        r#"
[[listener]]
address = "127.0.0.1:0"
plaintext_auth = true
[relay]
{}
{extra_relay}
[queue]
dir = "{{dir}}/spool"
retry_initial = "200ms"
retry_max = "1s"
[[user]]
name = "scanner"
password_hash = "{{hash}}"
[[account]]
name = "local"
kind = "capture"
dir = "{{dir}}/capture"
"#,
        relay.join("\n")
    )
}

/// Breaks capture delivery (a file where the capture folder should be) so mail stays queued;
/// returns the folder's path. Undo with [`repair_capture`].
pub async fn break_capture(relay: &TestRelay) -> PathBuf {
    let capture = relay.path("capture");
    wait_exists(&capture).await;
    std::fs::remove_dir_all(&capture).unwrap();
    std::fs::write(&capture, b"not a folder").unwrap();
    capture
}

pub fn repair_capture(capture: &Path) {
    std::fs::remove_file(capture).unwrap();
    std::fs::create_dir(capture).unwrap();
}

/// Waits until `path` exists (the relay creates its folders as it starts).
pub async fn wait_exists(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until `dir` holds `n` captured messages; returns their `.eml` contents sorted by name.
pub async fn wait_captured(dir: &Path, n: usize) -> Vec<(String, Vec<u8>)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut found: Vec<(String, Vec<u8>)> = Vec::new();
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(id) = name.strip_suffix(".json")
                    && !name.starts_with('.')
                {
                    let body = std::fs::read(dir.join(format!("{id}.eml"))).unwrap();
                    found.push((id.to_string(), body));
                }
            }
        }
        if found.len() >= n {
            found.sort();
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {n} messages captured in {}",
            found.len(),
            dir.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The message as the client sent it: the `Received:` header we prepend is removed.
pub fn strip_received(eml: &[u8]) -> &[u8] {
    assert!(eml.starts_with(b"Received: "), "no Received header first");
    let mut i = 0;
    loop {
        let end = eml[i..]
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("header line end")
            + i
            + 2;
        i = end;
        if !matches!(eml.get(i), Some(b' ') | Some(b'\t')) {
            return &eml[i..];
        }
    }
}

// ---------- dialog client ----------

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

pub struct Dialog {
    io: BufReader<Box<dyn Io>>,
}

impl Dialog {
    pub async fn connect(addr: SocketAddr) -> Dialog {
        let s = TcpStream::connect(addr).await.unwrap();
        Dialog {
            io: BufReader::new(Box::new(s)),
        }
    }

    /// Connects from a chosen loopback source address (e.g. 127.0.0.2).
    pub async fn connect_from(src: IpAddr, addr: SocketAddr) -> Dialog {
        let sock = TcpSocket::new_v4().unwrap();
        sock.bind(SocketAddr::new(src, 0)).unwrap();
        let s = sock.connect(addr).await.unwrap();
        Dialog {
            io: BufReader::new(Box::new(s)),
        }
    }

    pub fn from_stream(s: Box<dyn Io>) -> Dialog {
        Dialog {
            io: BufReader::new(s),
        }
    }

    pub async fn send(&mut self, line: &str) {
        self.send_raw(format!("{line}\r\n").as_bytes()).await;
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        let w = self.io.get_mut();
        w.write_all(bytes).await.unwrap();
        w.flush().await.unwrap();
    }

    /// Reads one (possibly multi-line) reply; `None` at EOF.
    pub async fn reply(&mut self) -> Option<String> {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(Duration::from_secs(20), self.io.read_line(&mut line))
                .await
                .expect("reply timed out")
                .ok()?;
            if n == 0 {
                return if all.is_empty() { None } else { Some(all) };
            }
            all.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                return Some(all);
            }
        }
    }

    /// Reads a reply and asserts it starts with `prefix` (e.g. "250" or "550 5.7.1").
    pub async fn expect(&mut self, prefix: &str) -> String {
        let r = self
            .reply()
            .await
            .unwrap_or_else(|| panic!("connection closed; expected {prefix}"));
        let last = r.lines().last().unwrap_or("");
        assert!(last.starts_with(prefix), "expected {prefix}, got {r:?}");
        r
    }

    pub async fn cmd(&mut self, line: &str, prefix: &str) -> String {
        self.send(line).await;
        self.expect(prefix).await
    }

    /// Asserts the server closed the connection.
    pub async fn expect_closed(&mut self) {
        assert!(self.reply().await.is_none(), "connection still open");
    }

    /// Upgrades with STARTTLS (the 220 must already have been read).
    pub async fn into_tls(self, cert_pem: &str) -> Dialog {
        let inner = self.io.into_inner();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let s = tls_connector(cert_pem).connect(name, inner).await.unwrap();
        Dialog {
            io: BufReader::new(Box::new(s)),
        }
    }

    /// A whole transaction; returns the queue ID from the 250.
    pub async fn send_mail(&mut self, from: &str, to: &[&str], body: &[u8]) -> String {
        self.cmd(&format!("MAIL FROM:<{from}>"), "250").await;
        for r in to {
            self.cmd(&format!("RCPT TO:<{r}>"), "250").await;
        }
        self.cmd("DATA", "354").await;
        let mut stuffed = Vec::with_capacity(body.len() + 16);
        for line in body.split_inclusive(|&b| b == b'\n') {
            if line.starts_with(b".") {
                stuffed.push(b'.');
            }
            stuffed.extend_from_slice(line);
        }
        self.send_raw(&stuffed).await;
        self.send_raw(b".\r\n").await;
        let r = self.expect("250 2.0.0 Ok: queued as ").await;
        r.trim().rsplit(' ').next().unwrap().to_string()
    }
}

/// What in a running relay's spool `tmp/` is neither a spare file kept for reuse nor named like
/// one, judged against the relay's own count of spares (its metrics on loopback `http_port`).
/// Call it while nothing is being received or delivered. Empty when `tmp/` holds only spares.
pub fn strays_in_tmp(tmp: &Path, http_port: u16) -> Vec<String> {
    use std::io::{Read, Write};
    let mut page = String::new();
    if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", http_port)) {
        s.set_read_timeout(Some(Duration::from_secs(5))).ok();
        let _ = s.write_all(b"GET /metrics HTTP/1.0\r\nHost: relay\r\n\r\n");
        let _ = s.read_to_string(&mut page);
    }
    let Some(spares) = page
        .lines()
        .find_map(|l| l.strip_prefix("exorelay_spool_spare_files "))
        .and_then(|n| n.trim().parse::<usize>().ok())
    else {
        return vec![format!(
            "no exorelay_spool_spare_files in the metrics: {page}"
        )];
    };
    let names: Vec<String> = std::fs::read_dir(tmp)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let mut strays: Vec<String> = names
        .iter()
        .filter(|n| !n.starts_with("spare-"))
        .cloned()
        .collect();
    if names.len() != spares {
        strays.push(format!(
            "{} files in tmp/, but the relay keeps {spares} spares",
            names.len()
        ));
    }
    strays
}

/// True if an SMTP server on loopback `port` sends its 220 greeting. A relay binary binds its
/// sockets before start-up work (spool recovery), so a bound port alone does not mean ready.
pub fn greets(port: u16) -> bool {
    use std::io::BufRead;
    let Ok(s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    let mut line = String::new();
    let greeted =
        std::io::BufReader::new(&s).read_line(&mut line).is_ok() && line.starts_with("220");
    let _ = (&s).write_all(b"QUIT\r\n");
    greeted
}

/// A captured message as text without the `Received:` line, with every `Date:` value masked as
/// `*`, so a test can state exactly which headers the relay added (`Date`, `Message-ID`, `From`
/// when the client left them out).
pub fn masked(eml: &[u8]) -> String {
    String::from_utf8_lossy(strip_received(eml))
        .split_inclusive("\r\n")
        .map(|l| {
            if l.starts_with("Date: ") {
                "Date: *\r\n"
            } else {
                l
            }
        })
        .collect()
}

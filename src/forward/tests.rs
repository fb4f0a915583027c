//! The forwarder as a whole on tokio's paused clock, with a scripted upstream: throttle, probe
//! and the review's double-dispatch case, timed by the forwarder's own timers, without sleeps.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Mutex;

use super::*;
use crate::upstream::{Attempt, BoxFuture, Outcome};

/// Replies with the scripted attempts in order, then delivers; records when each call came.
#[derive(Default)]
struct Script {
    replies: Mutex<VecDeque<Attempt>>,
    calls: Mutex<Vec<(Instant, String)>>,
}

impl Upstream for Script {
    fn deliver<'a>(&'a self, job: &'a Job<'a>) -> BoxFuture<'a, Attempt> {
        Box::pin(async move {
            if let Ok(mut c) = self.calls.lock() {
                c.push((Instant::now(), job.meta.id.clone()));
            }
            let next = self.replies.lock().ok().and_then(|mut r| r.pop_front());
            next.unwrap_or_else(|| {
                Attempt::all(job.recipients.len(), Outcome::Delivered("250 ok".into()))
            })
        })
    }
}

impl Script {
    fn calls(&self) -> Vec<(Instant, String)> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }
}

fn blocked(signal: AccountSignal) -> Attempt {
    Attempt {
        outcomes: vec![Outcome::NotAttempted("account blocked".into())],
        signal: Some(signal),
    }
}

struct Harness {
    dir: tempfile::TempDir,
    spool: Arc<Spool>,
    script: Arc<Script>,
    control: Control,
    status: Arc<Status>,
    shutdown: CancellationToken,
}

async fn start(replies: Vec<Attempt>) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        r#"
hostname = "relay.test"
[[listener]]
address = "127.0.0.1:0"
[relay]
allowed_networks = ["127.0.0.1/32"]
[queue]
dir = "{}/spool"
retry_initial = "10s"
retry_max = "1m"
probe_interval = "60s"
[[account]]
name = "contoso"
kind = "capture"
dir = "{}/capture"
"#,
        dir.path().display(),
        dir.path().display()
    );
    let config = Arc::new(Config::parse(Path::new("test.toml"), &text).unwrap());
    let (spool, _) = Spool::open(&dir.path().join("spool"), 100).unwrap();
    let spool = Arc::new(spool);
    let script = Arc::new(Script {
        replies: Mutex::new(replies.into()),
        ..Script::default()
    });
    let upstream: Arc<dyn Upstream> = script.clone();
    let metrics = Arc::new(Metrics::default());
    let forwarder =
        Forwarder::with_upstreams(config, spool.clone(), metrics, |_| Ok(upstream.clone()))
            .unwrap();
    let (control, status) = (forwarder.control(), forwarder.status());
    let shutdown = CancellationToken::new();
    tokio::spawn(forwarder.run(Vec::new(), shutdown.clone(), TaskTracker::new()));
    Harness {
        dir,
        spool,
        script,
        control,
        status,
        shutdown,
    }
}

impl Harness {
    async fn submit(&self) -> String {
        let mut w = self.spool.create().await.unwrap();
        w.write(b"Subject: test\r\n\r\nx\r\n").await.unwrap();
        let client = Client {
            ip: std::net::IpAddr::from([127, 0, 0, 1]),
            helo: "printer".into(),
            login: None,
            tls: false,
        };
        let meta = Meta::new("contoso", "a@printer", &["b@contoso.com".into()], client);
        w.commit(&self.spool, meta).await.unwrap()
    }

    /// Lets the forwarder run for `secs` of (paused, auto-advancing) time.
    async fn run_for(&self, secs: u64) {
        tokio::time::sleep(Duration::from_secs(secs)).await;
    }

    fn queued(&self) -> usize {
        self.spool.ids(Area::Queue).map(|v| v.len()).unwrap_or(0)
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn gaps(calls: &[(Instant, String)]) -> Vec<u64> {
    calls
        .windows(2)
        .map(|w| (w[1].0 - w[0].0).as_secs())
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_throttled_account_waits_the_window_then_delivers() {
    let h = start(vec![blocked(AccountSignal::Throttled {
        wait: Duration::from_secs(30),
        reason: "421 4.4.2 rate".into(),
    })])
    .await;
    h.submit().await;
    h.run_for(10).await;
    assert!(matches!(
        h.status.get("contoso").map(|s| s.state),
        Some(AccountState::Throttled { .. })
    ));
    h.run_for(30).await;
    let calls = h.script.calls();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(
        gaps(&calls),
        [30],
        "the second attempt waits the throttle window"
    );
    assert_eq!(h.queued(), 0);
    assert_eq!(
        h.status.get("contoso").map(|s| s.state),
        Some(AccountState::Active)
    );
}

#[tokio::test(start_paused = true)]
async fn a_paused_account_is_probed_every_probe_interval_until_it_works() {
    let pause = || {
        blocked(AccountSignal::Paused(crate::advice::Advice::new(
            "SMTP AUTH is disabled.",
            "Enable it.",
        )))
    };
    let h = start(vec![pause(), pause()]).await;
    let first = h.submit().await;
    let second = h.submit().await;
    h.run_for(200).await;
    let calls = h.script.calls();
    // One attempt, then one probe a minute until one works, then the rest at once.
    assert_eq!(calls.len(), 4, "{calls:?}");
    assert_eq!(gaps(&calls), [60, 60, 0]);
    assert_eq!(h.queued(), 0);
    let ids: Vec<&str> = calls.iter().map(|(_, id)| id.as_str()).collect();
    assert!(ids.contains(&first.as_str()) && ids.contains(&second.as_str()));
    let status = h.status.get("contoso").unwrap();
    assert_eq!(status.state, AccountState::Active);
    assert!(
        status
            .last_error
            .is_some_and(|e| e.contains("SMTP AUTH is disabled"))
    );
}

#[tokio::test(start_paused = true)]
async fn retry_while_paused_by_the_admin_then_resume_sends_once() {
    let h = start(Vec::new()).await;
    h.control
        .send(Command::PauseAccount("contoso".into()))
        .await
        .unwrap();
    let id = h.submit().await;
    h.run_for(5).await;
    for _ in 0..3 {
        h.control.send(Command::Retry(id.clone())).await.unwrap();
        h.run_for(1).await;
    }
    assert!(h.script.calls().is_empty(), "nothing goes out while paused");
    h.control
        .send(Command::ResumeAccount("contoso".into()))
        .await
        .unwrap();
    h.run_for(60).await;
    assert_eq!(h.script.calls().len(), 1, "delivered exactly once");
    assert_eq!(h.queued(), 0);
    let corrupt = std::fs::read_dir(h.dir.path().join("spool/corrupt"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(corrupt, 0, "nothing quarantined");
}

//! The forwarder as a whole on tokio's paused clock, with a scripted upstream: throttle, probe
//! and the review's double-dispatch case, timed by the forwarder's own timers, without sleeps.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Mutex;

use super::*;
use crate::spool::Client;
use crate::upstream::{Attempt, BoxFuture, Outcome};

mod failover;

/// Replies with the scripted attempts in order (each after its delay), then delivers at once;
/// records when each call came.
#[derive(Default)]
struct Script {
    replies: Mutex<VecDeque<(Duration, Attempt)>>,
    calls: Mutex<Vec<(Instant, String)>>,
}

impl Upstream for Script {
    fn deliver<'a>(&'a self, job: &'a Job<'a>) -> BoxFuture<'a, Attempt> {
        Box::pin(async move {
            if let Ok(mut c) = self.calls.lock() {
                c.push((Instant::now(), job.meta.id.clone()));
            }
            let next = self.replies.lock().ok().and_then(|mut r| r.pop_front());
            let (delay, reply) = next.unwrap_or_else(|| {
                let ok = Attempt::all(job.recipients.len(), Outcome::Delivered("250 ok".into()));
                (Duration::ZERO, ok)
            });
            tokio::time::sleep(delay).await;
            reply
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
        unreachable: None,
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
    start_delayed(replies.into_iter().map(|r| (0, r)).collect(), 0).await
}

/// The harness's config: one capture account "contoso" with two connections, under `dir`.
fn config_in(dir: &Path) -> Arc<Config> {
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
max_connections = 2
"#,
        dir.display(),
        dir.display()
    );
    Arc::new(Config::parse(Path::new("test.toml"), &text).unwrap())
}

/// Each reply comes `secs` after its call. `queued` messages are committed before the forwarder
/// starts, so that they reach it at the same instant (a commit's file work runs on blocking
/// threads, during which the paused clock may move on).
async fn start_delayed(replies: Vec<(u64, Attempt)>, queued: usize) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let config = config_in(dir.path());
    let (spool, _) = Spool::open(&dir.path().join("spool"), 100).unwrap();
    let spool = Arc::new(spool);
    let script = Arc::new(Script {
        replies: Mutex::new(
            replies
                .into_iter()
                .map(|(secs, r)| (Duration::from_secs(secs), r))
                .collect(),
        ),
        ..Script::default()
    });
    let upstream: Arc<dyn Upstream> = script.clone();
    let metrics = Arc::new(Metrics::default());
    let forwarder =
        Forwarder::with_upstreams(config, spool.clone(), metrics, |_| Ok(upstream.clone()))
            .unwrap();
    let (control, status) = (forwarder.control(), forwarder.status());
    for _ in 0..queued {
        commit(&spool).await;
    }
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

/// Commits one message for "contoso" to the spool, as the SMTP side does.
async fn commit(spool: &Arc<Spool>) -> String {
    let mut w = spool.create().await.unwrap();
    w.write(b"Subject: test\r\n\r\nx\r\n").await.unwrap();
    let client = Client {
        ip: std::net::IpAddr::from([127, 0, 0, 1]),
        helo: "printer".into(),
        login: None,
        tls: false,
    };
    let meta = Meta::new("contoso", "a@printer", &["b@contoso.com".into()], client);
    w.commit(spool, meta).await.unwrap()
}

impl Harness {
    async fn submit(&self) -> String {
        commit(&self.spool).await
    }

    /// Lets the forwarder run for `secs` of (paused, auto-advancing) time. Paused time jumps
    /// ahead whenever every task waits, and the spool's commit thread is not a task: stepping
    /// in small increments, with a moment of real time for other threads at each, keeps a
    /// loaded machine from seeing the jump before work those threads finish (a flaky test).
    async fn run_for(&self, secs: u64) {
        let end = Instant::now() + Duration::from_secs(secs);
        let step = Duration::from_millis(50);
        while Instant::now() < end {
            std::thread::sleep(Duration::from_micros(200));
            tokio::time::sleep(step.min(end - Instant::now())).await;
        }
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
    let throttle = AccountSignal::Throttled {
        wait: Duration::from_secs(30),
        reason: "421 4.4.2 rate".into(),
    };
    let h = start_delayed(vec![(0, blocked(throttle))], 1).await;
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
    let pause = || (0, blocked(config_error()));
    let h = start_delayed(vec![pause(), pause()], 2).await;
    h.run_for(200).await;
    let calls = h.script.calls();
    // One attempt, then one probe a minute until one works, then the rest at once.
    assert_eq!(calls.len(), 4, "{calls:?}");
    assert_eq!(gaps(&calls), [60, 60, 0]);
    assert_eq!(h.queued(), 0);
    let ids: std::collections::HashSet<&str> = calls.iter().map(|(_, id)| id.as_str()).collect();
    assert_eq!(ids.len(), 2, "both messages went");
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

fn delivered() -> Attempt {
    Attempt::all(1, Outcome::Delivered("250 ok".into()))
}

fn config_error() -> AccountSignal {
    AccountSignal::Paused(crate::advice::Advice::new(
        "SMTP AUTH is disabled.",
        "Enable it.",
    ))
}

/// Two attempts run at once; the quick one pauses the account, the slow one succeeds later.
/// The late success started before the pause, so it does not lift it: the probe still decides.
#[tokio::test(start_paused = true)]
async fn a_success_from_before_a_pause_does_not_lift_it() {
    let h = start_delayed(vec![(1, blocked(config_error())), (5, delivered())], 3).await;
    h.run_for(10).await;
    assert_eq!(h.script.calls().len(), 2, "{:?}", gaps(&h.script.calls()));
    assert!(matches!(
        h.status.get("contoso").map(|s| s.state),
        Some(AccountState::Paused { .. })
    ));
    assert_eq!(h.queued(), 2, "one delivered, two waiting for the probe");
    h.run_for(60).await;
    let calls = h.script.calls();
    assert_eq!(calls.len(), 4, "{calls:?}");
    assert_eq!(
        (calls[2].0 - calls[0].0).as_secs(),
        61,
        "probe one interval after the pause"
    );
    assert_eq!(h.queued(), 0);
}

/// A retry of a message whose attempt is running is refused; the attempt's result stands.
#[tokio::test(start_paused = true)]
async fn retry_hold_and_delete_of_a_message_in_flight_are_refused() {
    let h = start_delayed(vec![(10, delivered())], 0).await;
    let id = h.submit().await;
    h.run_for(1).await;
    for cmd in [
        Command::Retry(id.clone()),
        Command::Hold(id.clone()),
        Command::Delete(id.clone()),
    ] {
        assert!(
            matches!(h.control.send(cmd).await, Err(ControlError::Conflict(_))),
            "refused while in flight"
        );
    }
    h.run_for(20).await;
    assert_eq!(h.script.calls().len(), 1);
    assert_eq!(h.queued(), 0);
}

/// Signals from an attempt that was running when the administrator paused the account change
/// nothing; resume means "try now", even though that attempt reported a throttle.
#[tokio::test(start_paused = true)]
async fn signals_while_paused_by_the_admin_are_overridden_by_resume() {
    let throttle = AccountSignal::Throttled {
        wait: Duration::from_secs(600),
        reason: "421 4.4.2 rate".into(),
    };
    let h = start_delayed(vec![(5, blocked(throttle))], 0).await;
    h.submit().await;
    h.run_for(1).await;
    h.control
        .send(Command::PauseAccount("contoso".into()))
        .await
        .unwrap();
    h.run_for(10).await;
    let view = h.status.get("contoso").map(|s| s.state);
    assert!(
        matches!(&view, Some(AccountState::Paused { advice, .. }) if advice.cause.contains("administrator")),
        "{view:?}"
    );
    h.control
        .send(Command::ResumeAccount("contoso".into()))
        .await
        .unwrap();
    h.run_for(2).await;
    assert_eq!(
        h.script.calls().len(),
        2,
        "tried again at once, not after 10 minutes"
    );
    assert_eq!(h.queued(), 0);
}

/// A hold sent while the just-committed message may still be on its way to the forwarder: either
/// the hold wins (held, never attempted) or the attempt had started (hold refused, delivered);
/// never both, and nothing is left behind in `queue/`. The forwarder takes in committed messages
/// before it runs a command, and the body check stops an attempt whose body moved away.
#[tokio::test(start_paused = true)]
async fn a_hold_right_after_the_commit_is_not_raced_by_the_first_attempt() {
    for _ in 0..8 {
        // Committed before the forwarder runs: it sits in the channel beside the command.
        let h = start_delayed(Vec::new(), 1).await;
        let id = h.spool.ids(Area::Queue).unwrap()[0].clone();
        let held = h.control.send(Command::Hold(id.clone())).await;
        h.run_for(30).await;
        assert_eq!(h.queued(), 0, "a ghost was left in queue/");
        match held {
            // Taken in first: held, never attempted.
            Ok(_) => {
                assert!(h.script.calls().is_empty(), "a held message was attempted");
                assert_eq!(h.spool.locate(&id), Some(Area::Hold));
            }
            // Or its attempt had already started: the hold is refused and it is delivered.
            Err(ControlError::Conflict(_)) => {
                assert_eq!(h.script.calls().len(), 1);
                assert_eq!(h.spool.locate(&id), None);
            }
            Err(e) => panic!("{e}"),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_reload_swaps_the_upstream_between_attempts_and_sends_nothing_twice() {
    let ok = Attempt::all(1, Outcome::Delivered("250 ok".into()));
    let h = start_delayed(vec![(20, ok)], 1).await;
    h.run_for(5).await;
    assert_eq!(h.script.calls().len(), 1, "one attempt in flight");
    let fresh = Arc::new(Script::default());
    let upstream: Arc<dyn Upstream> = fresh.clone();
    let reconfigure = Reconfigure {
        config: config_in(h.dir.path()),
        upstreams: HashMap::from([("contoso".to_string(), upstream)]),
        changed: vec!["contoso".into()],
    };
    h.control
        .send(Command::Reconfigure(reconfigure))
        .await
        .unwrap();
    let second = h.submit().await;
    h.run_for(30).await;
    assert_eq!(h.queued(), 0);
    assert_eq!(
        h.script.calls().len(),
        1,
        "the attempt in flight finished on the old upstream and was not repeated"
    );
    let calls = fresh.calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].1, second, "new attempts use the new upstream");
}

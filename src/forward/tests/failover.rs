//! Failover through the whole forwarder on tokio's paused clock: an exchange account "smtp"
//! with `fallback = "spare"`, each with its own scripted upstream.

use std::collections::{HashMap as Map, HashSet};

use super::*;

/// Two accounts: "smtp" (exchange, delegated so it needs no credential file here; its upstream is
/// scripted) falling back to "spare".
fn two_accounts(dir: &Path) -> Arc<Config> {
    let text = format!(
        r#"
hostname = "relay.test"
[[listener]]
address = "127.0.0.1:0"
[relay]
allowed_networks = ["127.0.0.1/32"]
[queue]
dir = "{d}/spool"
retry_initial = "10s"
retry_max = "1m"
probe_interval = "60s"
[[account]]
name = "smtp"
kind = "exchange"
mailbox = "relay@contoso.com"
tenant = "contoso.com"
client_id = "abc"
auth = "delegated"
max_connections = 2
fallback = "spare"
[[account]]
name = "spare"
kind = "capture"
dir = "{d}/capture"
max_connections = 2
"#,
        d = dir.display()
    );
    Arc::new(Config::parse(Path::new("test.toml"), &text).unwrap())
}

struct Pair {
    _dir: tempfile::TempDir,
    spool: Arc<Spool>,
    smtp: Arc<Script>,
    spare: Arc<Script>,
    control: Control,
    status: Arc<Status>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
}

async fn start_pair(smtp: Vec<(u64, Attempt)>, spare: Vec<(u64, Attempt)>) -> Pair {
    let script = |r: Vec<(u64, Attempt)>| {
        Arc::new(Script {
            replies: Mutex::new(
                r.into_iter()
                    .map(|(s, a)| (Duration::from_secs(s), a))
                    .collect(),
            ),
            ..Script::default()
        })
    };
    let (smtp, spare) = (script(smtp), script(spare));
    let p = start_parts(smtp.clone(), spare.clone()).await;
    Pair {
        _dir: p.dir,
        spool: p.spool,
        smtp,
        spare,
        control: p.control,
        status: p.status,
        metrics: p.metrics,
        shutdown: p.shutdown,
    }
}

struct PairParts {
    dir: tempfile::TempDir,
    spool: Arc<Spool>,
    control: Control,
    status: Arc<Status>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
}

async fn start_parts<U: Upstream + 'static, V: Upstream + 'static>(
    smtp: Arc<U>,
    spare: Arc<V>,
) -> PairParts {
    let dir = tempfile::tempdir().unwrap();
    let config = two_accounts(dir.path());
    let (spool, _) = Spool::open(&dir.path().join("spool"), 1000).unwrap();
    let spool = Arc::new(spool);
    let (smtp, spare): (Arc<dyn Upstream>, Arc<dyn Upstream>) = (smtp, spare);
    let metrics = Arc::new(Metrics::default());
    let forwarder = Forwarder::with_upstreams(config, spool.clone(), metrics.clone(), |name| {
        Ok(if name == "smtp" {
            smtp.clone()
        } else {
            spare.clone()
        })
    })
    .unwrap();
    let (control, status) = (forwarder.control(), forwarder.status());
    let shutdown = CancellationToken::new();
    tokio::spawn(forwarder.run(Vec::new(), shutdown.clone(), TaskTracker::new()));
    PairParts {
        dir,
        spool,
        control,
        status,
        metrics,
        shutdown,
    }
}

/// Commits one message for "smtp", as the SMTP side does. The spool's commit thread is not a
/// task, so while it works the paused clock would jump to the next timer (a probe, say); a task
/// that keeps the runtime busy holds the clock still until the commit is done.
async fn commit_smtp(spool: &Arc<Spool>) -> String {
    let busy = tokio::spawn(async {
        loop {
            tokio::task::yield_now().await;
        }
    });
    let id = commit_now(spool).await;
    busy.abort();
    id
}

async fn commit_now(spool: &Arc<Spool>) -> String {
    commit_to(spool, &["b@contoso.com"]).await
}

async fn commit_to(spool: &Arc<Spool>, to: &[&str]) -> String {
    let mut w = spool.create().await.unwrap();
    w.write(b"Subject: test\r\n\r\nx\r\n").await.unwrap();
    let client = Client {
        ip: std::net::IpAddr::from([127, 0, 0, 1]),
        helo: "printer".into(),
        login: None,
        tls: false,
    };
    let to: Vec<String> = to.iter().map(|s| s.to_string()).collect();
    let meta = Meta::new("smtp", "a@printer", &to, client);
    w.commit(spool, meta).await.unwrap()
}

impl Pair {
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

    fn metric(&self, line: &str) -> bool {
        self.metrics.encode().lines().any(|l| l == line)
    }

    fn failing_over(&self) -> Option<String> {
        self.status.get("smtp").and_then(|s| s.failing_over)
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn ids(calls: &[(Instant, String)]) -> Vec<String> {
    calls.iter().map(|(_, id)| id.clone()).collect()
}

/// 5.7.139 on "smtp": its mail goes through "spare" at once, the status and metrics say so and
/// why; the probe a minute later goes through "smtp", works, and mail goes through "smtp" again.
#[tokio::test(start_paused = true)]
async fn a_paused_account_fails_over_and_switches_back_after_its_probe_works() {
    let h = start_pair(vec![(0, blocked(config_error()))], Vec::new()).await;
    let first = commit_smtp(&h.spool).await;
    h.run_for(5).await;
    assert_eq!(
        ids(&h.smtp.calls()),
        std::slice::from_ref(&first),
        "the attempt that paused it"
    );
    assert_eq!(
        ids(&h.spare.calls()),
        std::slice::from_ref(&first),
        "then through the fallback"
    );
    assert_eq!(
        h.failing_over().as_deref(),
        Some("failing over to spare: SMTP AUTH is disabled.")
    );
    assert!(h.metric(r#"exorelay_account_failover{account="smtp",fallback="spare"} 1"#));
    assert!(h.metric(r#"exorelay_fallback_deliveries_total{account="smtp",fallback="spare"} 1"#));

    let (a, b) = (commit_smtp(&h.spool).await, commit_smtp(&h.spool).await);
    h.run_for(5).await;
    assert_eq!(
        h.smtp.calls().len(),
        1,
        "nothing more through the paused account"
    );
    let spare: HashSet<String> = ids(&h.spare.calls()).into_iter().collect();
    assert_eq!(spare, HashSet::from([first, a, b]));
    assert_eq!(h.queued(), 0);

    // The probe is due at 60 s; the next message is it, through "smtp", and it works.
    h.run_for(60).await;
    let probe = commit_smtp(&h.spool).await;
    h.run_for(2).await;
    assert_eq!(ids(&h.smtp.calls())[1..], [probe]);
    assert_eq!(h.failing_over(), None, "switched back");
    assert!(h.metric(r#"exorelay_account_failover{account="smtp",fallback="spare"} 0"#));
    let after = commit_smtp(&h.spool).await;
    h.run_for(2).await;
    assert_eq!(ids(&h.smtp.calls())[2..], [after]);
    assert_eq!(h.spare.calls().len(), 3, "the fallback sends nothing more");
    let kinds: Vec<&str> = h.status.recent_events().iter().map(|e| e.kind).collect();
    assert!(
        kinds.contains(&"failover") && kinds.contains(&"failback"),
        "{kinds:?}"
    );
}

/// A recipient delivered through the fallback records which account delivered it and why, in
/// the meta (`via`) and in its last reply; the status event of the delivery says so too.
#[tokio::test(start_paused = true)]
async fn the_meta_records_the_fallback_that_delivered() {
    let part = Attempt {
        outcomes: vec![
            Outcome::Delivered("250 2.0.0 OK".into()),
            Outcome::Temporary("451 4.3.0 busy".into()),
        ],
        signal: None,
        unreachable: None,
    };
    let h = start_pair(vec![(0, blocked(config_error()))], vec![(0, part)]).await;
    let id = commit_to(&h.spool, &["b@contoso.com", "c@contoso.com"]).await;
    h.run_for(3).await;
    let m = h.spool.load(&id).unwrap();
    let via = m.recipients[0].via.as_ref().expect("via recorded");
    assert_eq!(
        (via.account.as_str(), via.cause.as_str()),
        ("spare", "SMTP AUTH is disabled.")
    );
    assert_eq!(
        m.recipients[0].last_reply.as_deref(),
        Some("delivered via fallback spare because SMTP AUTH is disabled.: 250 2.0.0 OK")
    );
    assert_eq!(m.recipients[1].via, None, "deferred, not delivered");
    // A retry later delivers the second recipient through the fallback too.
    h.run_for(30).await;
    assert_eq!(h.queued(), 0);
    let delivered = h
        .status
        .recent_events()
        .into_iter()
        .find(|e| e.kind == "delivered")
        .unwrap();
    assert_eq!(delivered.account, "smtp");
    assert!(
        delivered
            .detail
            .contains("via fallback spare because SMTP AUTH is disabled."),
        "{}",
        delivered.detail
    );
    assert!(h.metric(r#"exorelay_messages_delivered_total{account="spare"} 1"#));
    assert!(
        !h.metrics
            .encode()
            .contains(r#"exorelay_messages_delivered_total{account="smtp"}"#)
    );
}

/// A message that fails permanently on the fallback gets its delivery status notification
/// queued on the fallback, which sends it.
#[tokio::test(start_paused = true)]
async fn the_dsn_of_a_message_failed_on_the_fallback_goes_through_the_fallback() {
    let refused = Attempt::all(1, Outcome::Permanent("550 5.1.1 unknown".into()));
    let h = start_pair(vec![(0, blocked(config_error()))], vec![(0, refused)]).await;
    let id = commit_smtp(&h.spool).await;
    h.run_for(5).await;
    assert_eq!(h.spool.locate(&id), Some(Area::Failed));
    let spare = ids(&h.spare.calls());
    assert_eq!(spare.len(), 2, "the message, then its DSN: {spare:?}");
    assert_eq!(spare[0], id);
    assert_eq!(
        ids(&h.smtp.calls()),
        [id],
        "only the attempt that paused it"
    );
    let dsn = h
        .status
        .recent_events()
        .into_iter()
        .find(|e| e.kind == "delivered" && e.queue_id == spare[1])
        .unwrap();
    assert_eq!(dsn.account, "spare", "queued on the fallback: {dsn:?}");
}

/// Throttling and an administrator's pause do not fail over: the mail waits.
#[tokio::test(start_paused = true)]
async fn throttle_and_admin_pause_do_not_fail_over() {
    let throttle = AccountSignal::Throttled {
        wait: Duration::from_secs(30),
        reason: "421 4.4.2 rate".into(),
    };
    let h = start_pair(vec![(0, blocked(throttle))], Vec::new()).await;
    commit_smtp(&h.spool).await;
    h.run_for(10).await;
    assert!(h.spare.calls().is_empty(), "a throttle waits");
    assert_eq!(h.failing_over(), None);
    h.run_for(30).await;
    assert_eq!(h.smtp.calls().len(), 2, "sent by smtp after the window");
    h.control
        .send(Command::PauseAccount("smtp".into()))
        .await
        .unwrap();
    commit_smtp(&h.spool).await;
    h.run_for(120).await;
    assert!(h.spare.calls().is_empty(), "an administrator's pause waits");
    assert_eq!(h.queued(), 1);
    assert!(!h.metrics.encode().contains("exorelay_account_failover{"));
}

/// A fallback that is blocked too sends nothing: the mail stays queued, in one piece, until one
/// of the two works.
#[tokio::test(start_paused = true)]
async fn a_blocked_fallback_keeps_the_mail_queued() {
    let h = start_pair(
        vec![(0, blocked(config_error())), (0, blocked(config_error()))],
        vec![(0, blocked(config_error())), (0, blocked(config_error()))],
    )
    .await;
    let mut queued = Vec::new();
    for _ in 0..3 {
        queued.push(commit_smtp(&h.spool).await);
    }
    h.run_for(30).await;
    assert_eq!(h.queued(), 3);
    let answer = h.control.send(Command::Retry(queued[2].clone())).await;
    assert!(
        answer
            .as_deref()
            .is_ok_and(|a| a.contains("its account is failing over to spare: ")),
        "{answer:?}"
    );
    assert_eq!(h.smtp.calls().len(), 1);
    assert_eq!(
        h.spare.calls().len(),
        1,
        "the fallback paused on its first attempt"
    );
    assert!(matches!(
        h.status.get("spare").map(|s| s.state),
        Some(AccountState::Paused { .. })
    ));
    // Both probe every minute with one message each; the second probes work.
    h.run_for(200).await;
    assert_eq!(h.queued(), 0);
    let sent: Vec<String> = ids(&h.smtp.calls())
        .into_iter()
        .chain(ids(&h.spare.calls()))
        .collect();
    assert_eq!(sent.len(), 3 + 4, "three deliveries, four refused probes");
}

/// An upstream driven by a seeded random generator, recording every attempt's start and end.
struct Chaos {
    name: &'static str,
    rng: Arc<Mutex<fastrand::Rng>>,
    /// Once set, every attempt delivers.
    healed: Arc<std::sync::atomic::AtomicBool>,
    log: Arc<Mutex<ChaosLog>>,
}

#[derive(Default)]
struct ChaosLog {
    running: HashSet<String>,
    overlaps: Vec<String>,
    delivered: Map<String, usize>,
    attempts: usize,
    /// Each attempt through "smtp": whether it paused the account.
    smtp_paused: Vec<bool>,
}

impl Upstream for Chaos {
    fn deliver<'a>(&'a self, job: &'a Job<'a>) -> BoxFuture<'a, Attempt> {
        Box::pin(async move {
            let id = job.meta.id.clone();
            if let Ok(mut l) = self.log.lock() {
                l.attempts += 1;
                if !l.running.insert(id.clone()) {
                    l.overlaps.push(id.clone());
                }
            }
            let (delay, pick) = {
                let mut r = self.rng.lock().unwrap();
                (r.u64(0..3000), r.u8(..6))
            };
            tokio::time::sleep(Duration::from_millis(delay)).await;
            let healed = self.healed.load(Ordering::SeqCst);
            let n = job.recipients.len();
            let reply = match (healed, pick, self.name) {
                (false, 0 | 1, "smtp") => blocked(config_error()),
                (false, 0, _) => blocked(AccountSignal::Throttled {
                    wait: Duration::from_secs(5),
                    reason: "421 4.4.2 rate".into(),
                }),
                (false, 2, _) => Attempt::all(n, Outcome::Temporary("451 4.3.0 busy".into())),
                _ => Attempt::all(n, Outcome::Delivered("250 ok".into())),
            };
            if let Ok(mut l) = self.log.lock() {
                l.running.remove(&id);
                if self.name == "smtp" {
                    l.smtp_paused.push(reply.signal.is_some());
                }
                if matches!(reply.outcomes.first(), Some(Outcome::Delivered(_))) {
                    *l.delivered.entry(id).or_default() += 1;
                }
            }
            reply
        })
    }
}

/// Any mix of pauses (switch-over), working probes (switch-back), throttles, temporary failures,
/// new mail and administrators' retries: no message ever has two attempts at once, across the
/// account and its fallback, and once both work every message is delivered exactly once.
#[tokio::test(start_paused = true)]
async fn one_attempt_per_message_holds_across_switch_over_and_back() {
    let rng = Arc::new(Mutex::new(fastrand::Rng::with_seed(15)));
    let healed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let log = Arc::new(Mutex::new(ChaosLog::default()));
    let chaos = |name| {
        Arc::new(Chaos {
            name,
            rng: rng.clone(),
            healed: healed.clone(),
            log: log.clone(),
        })
    };
    let h = start_parts(chaos("smtp"), chaos("spare")).await;
    let mut step_rng = fastrand::Rng::with_seed(4);
    let mut all = Vec::new();
    for _ in 0..150 {
        match step_rng.u8(..4) {
            0 | 1 => all.push(commit_smtp(&h.spool).await),
            2 if !all.is_empty() => {
                let id = all[step_rng.usize(..all.len())].clone();
                // Refused while in flight or once delivered; either is fine.
                let _ = h.control.send(Command::Retry(id)).await;
            }
            _ => {}
        }
        let ms = step_rng.u64(0..2000);
        let end = Instant::now() + Duration::from_millis(ms);
        while Instant::now() < end {
            std::thread::sleep(Duration::from_micros(200));
            tokio::time::sleep(Duration::from_millis(50).min(end - Instant::now())).await;
        }
    }
    healed.store(true, Ordering::SeqCst);
    let end = Instant::now() + Duration::from_secs(300);
    while Instant::now() < end && h.spool.ids(Area::Queue).map(|v| v.len()).unwrap_or(1) > 0 {
        std::thread::sleep(Duration::from_micros(200));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let l = log.lock().unwrap();
    assert!(
        l.overlaps.is_empty(),
        "second attempts at once: {:?}",
        l.overlaps
    );
    assert!(l.attempts > all.len(), "the scenario made retries");
    let first_pause = l.smtp_paused.iter().position(|p| *p);
    assert!(
        first_pause.is_some_and(|i| l.smtp_paused[i..].iter().any(|p| !p)),
        "the scenario switched over and back: {:?}",
        l.smtp_paused
    );
    for id in &all {
        assert_eq!(l.delivered.get(id), Some(&1), "{id} delivered exactly once");
    }
    assert_eq!(h.spool.ids(Area::Queue).unwrap().len(), 0);
    let events = h.status.recent_events();
    assert!(events.iter().any(|e| e.kind == "failover"));
    drop(l);
    h.shutdown.cancel();
}

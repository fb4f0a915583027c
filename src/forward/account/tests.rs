//! Every transition of [`on_event`], table-driven, on tokio's paused clock: each case is a
//! sequence of steps (let time pass, send an event, check the state and what it admits).

use super::*;

const PROBE: Duration = Duration::from_secs(60);

fn advice() -> Advice {
    Advice::new("SMTP AUTH is disabled.", "Enable it.")
}

fn throttle(secs: u64) -> AccountSignal {
    AccountSignal::Throttled {
        wait: Duration::from_secs(secs),
        reason: "rate".into(),
    }
}

fn quota(secs: u64) -> AccountSignal {
    AccountSignal::QuotaHold {
        wait: Duration::from_secs(secs),
        reason: "quota".into(),
    }
}

fn done(epoch: u64, signal: Option<AccountSignal>) -> Event {
    Event::Finished { epoch, signal }
}

/// What a step expects, with instants as seconds after the case's start.
#[derive(Debug, Clone, PartialEq)]
enum Want {
    Active,
    Throttled(u64),
    Paused { probe_at: u64, probing: bool },
    Held(u64),
    Admin,
}

/// (seconds to let pass, event, expected state, expected epoch, expected admission)
type Step = (u64, Event, Want, u64, Adm);

#[derive(Debug, Clone, Copy, PartialEq)]
enum Adm {
    Any,
    Probe,
    Until(u64),
    Never,
}

fn check(t0: Instant, a: &Account, want: &Want, epoch: u64, adm: Adm, now: Instant, name: &str) {
    let at = |s: u64| t0 + Duration::from_secs(s);
    let ok = match (&a.state, want) {
        (State::Active, Want::Active) | (State::PausedByAdmin, Want::Admin) => true,
        (State::Throttled { until, .. }, Want::Throttled(s))
        | (State::Held { until, .. }, Want::Held(s)) => *until == at(*s),
        (
            State::Paused {
                next_probe,
                probing,
                ..
            },
            Want::Paused {
                probe_at,
                probing: p,
            },
        ) => *next_probe == at(*probe_at) && probing == p,
        _ => false,
    };
    assert!(ok, "{name}: state {:?}, wanted {want:?}", a.state);
    assert_eq!(a.epoch, epoch, "{name}: epoch");
    let admits = match a.admits(now) {
        Admit::Any => Adm::Any,
        Admit::Probe => Adm::Probe,
        Admit::Nothing { until: None } => Adm::Never,
        Admit::Nothing { until: Some(u) } => Adm::Until((u - t0).as_secs()),
    };
    assert_eq!(admits, adm, "{name}: admits");
}

async fn run(name: &str, start: Account, steps: &[Step]) {
    let t0 = Instant::now();
    let mut a = start;
    for (i, (wait, event, want, epoch, adm)) in steps.iter().enumerate() {
        tokio::time::advance(Duration::from_secs(*wait)).await;
        a = on_event(&a, event, Instant::now(), PROBE);
        check(
            t0,
            &a,
            want,
            *epoch,
            *adm,
            Instant::now(),
            &format!("{name}, step {i}"),
        );
    }
}

fn active() -> Account {
    Account::default()
}

#[tokio::test(start_paused = true)]
async fn every_transition() {
    use Want::*;
    let cases: Vec<(&str, Account, Vec<Step>)> = vec![
        (
            "throttle, wait the window, active again",
            active(),
            vec![
                (
                    0,
                    done(0, Some(throttle(30))),
                    Throttled(30),
                    1,
                    Adm::Until(30),
                ),
                (29, Event::Tick, Throttled(30), 1, Adm::Until(30)),
                (1, Event::Tick, Active, 1, Adm::Any),
            ],
        ),
        (
            "a second throttle extends the window, an earlier end does not shorten it",
            active(),
            vec![
                (
                    0,
                    done(0, Some(throttle(30))),
                    Throttled(30),
                    1,
                    Adm::Until(30),
                ),
                (
                    10,
                    done(0, Some(throttle(40))),
                    Throttled(50),
                    1,
                    Adm::Until(50),
                ),
                (
                    0,
                    done(0, Some(throttle(5))),
                    Throttled(50),
                    1,
                    Adm::Until(50),
                ),
                (40, Event::Tick, Active, 1, Adm::Any),
            ],
        ),
        (
            "pause, probe after probe_interval, probe succeeds",
            active(),
            vec![
                (
                    0,
                    done(0, Some(AccountSignal::Paused(advice()))),
                    Paused {
                        probe_at: 60,
                        probing: false,
                    },
                    1,
                    Adm::Until(60),
                ),
                (
                    59,
                    Event::Tick,
                    Paused {
                        probe_at: 60,
                        probing: false,
                    },
                    1,
                    Adm::Until(60),
                ),
                (
                    1,
                    Event::Tick,
                    Paused {
                        probe_at: 60,
                        probing: false,
                    },
                    1,
                    Adm::Probe,
                ),
                (
                    0,
                    Event::ProbeSent,
                    Paused {
                        probe_at: 60,
                        probing: true,
                    },
                    1,
                    Adm::Never,
                ),
                (
                    0,
                    Event::ProbeSent,
                    Paused {
                        probe_at: 60,
                        probing: true,
                    },
                    1,
                    Adm::Never,
                ),
                (5, done(1, None), Active, 1, Adm::Any),
            ],
        ),
        (
            "probe fails: paused again, next probe one interval later",
            active(),
            vec![
                (
                    0,
                    done(0, Some(AccountSignal::Paused(advice()))),
                    Paused {
                        probe_at: 60,
                        probing: false,
                    },
                    1,
                    Adm::Until(60),
                ),
                (
                    60,
                    Event::ProbeSent,
                    Paused {
                        probe_at: 60,
                        probing: true,
                    },
                    1,
                    Adm::Never,
                ),
                (
                    5,
                    done(1, Some(AccountSignal::Paused(advice()))),
                    Paused {
                        probe_at: 125,
                        probing: false,
                    },
                    1,
                    Adm::Until(125),
                ),
                (
                    65,
                    Event::ProbeSent,
                    Paused {
                        probe_at: 125,
                        probing: true,
                    },
                    1,
                    Adm::Never,
                ),
                (0, done(1, None), Active, 1, Adm::Any),
            ],
        ),
        (
            "a probe that never reached the upstream lets another go",
            active(),
            vec![
                (
                    0,
                    done(0, Some(AccountSignal::Paused(advice()))),
                    Paused {
                        probe_at: 60,
                        probing: false,
                    },
                    1,
                    Adm::Until(60),
                ),
                (
                    60,
                    Event::ProbeSent,
                    Paused {
                        probe_at: 60,
                        probing: true,
                    },
                    1,
                    Adm::Never,
                ),
                // An attempt from before the pause stood down: not the probe.
                (
                    0,
                    Event::NotSent { epoch: 0 },
                    Paused {
                        probe_at: 60,
                        probing: true,
                    },
                    1,
                    Adm::Never,
                ),
                (
                    1,
                    Event::NotSent { epoch: 1 },
                    Paused {
                        probe_at: 60,
                        probing: false,
                    },
                    1,
                    Adm::Probe,
                ),
                (
                    0,
                    Event::NotSent { epoch: 1 },
                    Paused {
                        probe_at: 60,
                        probing: false,
                    },
                    1,
                    Adm::Probe,
                ),
            ],
        ),
        (
            "probe throttled: still paused, probe again after the throttle",
            active(),
            vec![
                (
                    0,
                    done(0, Some(AccountSignal::Paused(advice()))),
                    Paused {
                        probe_at: 60,
                        probing: false,
                    },
                    1,
                    Adm::Until(60),
                ),
                (
                    60,
                    Event::ProbeSent,
                    Paused {
                        probe_at: 60,
                        probing: true,
                    },
                    1,
                    Adm::Never,
                ),
                (
                    0,
                    done(1, Some(throttle(30))),
                    Paused {
                        probe_at: 90,
                        probing: false,
                    },
                    1,
                    Adm::Until(90),
                ),
            ],
        ),
        (
            "probe hits the quota: held, no longer paused",
            active(),
            vec![
                (
                    0,
                    done(0, Some(AccountSignal::Paused(advice()))),
                    Paused {
                        probe_at: 60,
                        probing: false,
                    },
                    1,
                    Adm::Until(60),
                ),
                (
                    60,
                    Event::ProbeSent,
                    Paused {
                        probe_at: 60,
                        probing: true,
                    },
                    1,
                    Adm::Never,
                ),
                (
                    0,
                    done(1, Some(quota(3600))),
                    Held(3660),
                    2,
                    Adm::Until(3660),
                ),
            ],
        ),
        (
            "quota hold until its end",
            active(),
            vec![
                (
                    0,
                    done(0, Some(quota(3600))),
                    Held(3600),
                    1,
                    Adm::Until(3600),
                ),
                (
                    0,
                    done(0, Some(throttle(30))),
                    Held(3600),
                    1,
                    Adm::Until(3600),
                ),
                (3599, Event::Tick, Held(3600), 1, Adm::Until(3600)),
                (1, Event::Tick, Active, 1, Adm::Any),
            ],
        ),
        (
            "a throttled account that reports a configuration error is paused",
            active(),
            vec![
                (
                    0,
                    done(0, Some(throttle(30))),
                    Throttled(30),
                    1,
                    Adm::Until(30),
                ),
                (
                    0,
                    done(0, Some(AccountSignal::Paused(advice()))),
                    Paused {
                        probe_at: 60,
                        probing: false,
                    },
                    2,
                    Adm::Until(60),
                ),
            ],
        ),
        (
            "admin pause and resume",
            active(),
            vec![
                (0, Event::AdminPause, Admin, 1, Adm::Never),
                (0, Event::AdminPause, Admin, 1, Adm::Never),
                (0, Event::Tick, Admin, 1, Adm::Never),
                (0, Event::ProbeSent, Admin, 1, Adm::Never),
                (0, Event::NotSent { epoch: 1 }, Admin, 1, Adm::Never),
                (3600, Event::AdminResume, Active, 2, Adm::Any),
                (0, Event::AdminResume, Active, 2, Adm::Any),
            ],
        ),
        (
            "signals arriving while paused by the admin change nothing",
            active(),
            vec![
                (0, Event::AdminPause, Admin, 1, Adm::Never),
                (0, done(0, Some(throttle(30))), Admin, 1, Adm::Never),
                (
                    0,
                    done(0, Some(AccountSignal::Paused(advice()))),
                    Admin,
                    1,
                    Adm::Never,
                ),
                (0, done(0, Some(quota(60))), Admin, 1, Adm::Never),
                (0, done(0, None), Admin, 1, Adm::Never),
                (0, done(1, None), Admin, 1, Adm::Never),
                (0, Event::AdminResume, Active, 2, Adm::Any),
            ],
        ),
        (
            "resume means try now, whatever blocked the account",
            active(),
            vec![
                (
                    0,
                    done(0, Some(AccountSignal::Paused(advice()))),
                    Paused {
                        probe_at: 60,
                        probing: false,
                    },
                    1,
                    Adm::Until(60),
                ),
                (0, Event::AdminResume, Active, 2, Adm::Any),
                (
                    0,
                    done(2, Some(throttle(30))),
                    Throttled(30),
                    3,
                    Adm::Until(30),
                ),
                (0, Event::AdminResume, Active, 4, Adm::Any),
                (0, done(4, Some(quota(60))), Held(60), 5, Adm::Until(60)),
                (0, Event::AdminResume, Active, 6, Adm::Any),
            ],
        ),
        (
            "stale results from attempts dispatched before a block",
            active(),
            vec![
                (
                    0,
                    done(0, Some(AccountSignal::Paused(advice()))),
                    Paused {
                        probe_at: 60,
                        probing: false,
                    },
                    1,
                    Adm::Until(60),
                ),
                // A success from before the pause does not lift it...
                (
                    1,
                    done(0, None),
                    Paused {
                        probe_at: 60,
                        probing: false,
                    },
                    1,
                    Adm::Until(60),
                ),
                // ...a pause from before it does not push back the probe...
                (
                    1,
                    done(0, Some(AccountSignal::Paused(advice()))),
                    Paused {
                        probe_at: 60,
                        probing: false,
                    },
                    1,
                    Adm::Until(60),
                ),
                // ...nor does a throttle or a quota hold from before it.
                (
                    0,
                    done(0, Some(throttle(300))),
                    Paused {
                        probe_at: 60,
                        probing: false,
                    },
                    1,
                    Adm::Until(60),
                ),
                (
                    0,
                    done(0, Some(quota(300))),
                    Paused {
                        probe_at: 60,
                        probing: false,
                    },
                    1,
                    Adm::Until(60),
                ),
                (
                    58,
                    Event::ProbeSent,
                    Paused {
                        probe_at: 60,
                        probing: true,
                    },
                    1,
                    Adm::Never,
                ),
                // The probe is still out; an old success does not count as its result.
                (
                    0,
                    done(0, None),
                    Paused {
                        probe_at: 60,
                        probing: true,
                    },
                    1,
                    Adm::Never,
                ),
                (0, done(1, None), Active, 1, Adm::Any),
            ],
        ),
        (
            "a stale success does not end a throttle early",
            active(),
            vec![
                (
                    0,
                    done(0, Some(throttle(30))),
                    Throttled(30),
                    1,
                    Adm::Until(30),
                ),
                (1, done(0, None), Throttled(30), 1, Adm::Until(30)),
                (29, Event::Tick, Active, 1, Adm::Any),
                // A throttle reply reaching us late is still a throttle reply.
                (
                    0,
                    done(0, Some(throttle(10))),
                    Throttled(40),
                    2,
                    Adm::Until(40),
                ),
            ],
        ),
        (
            "success while active changes nothing",
            active(),
            vec![
                (0, done(0, None), Active, 0, Adm::Any),
                (0, Event::Tick, Active, 0, Adm::Any),
                (0, Event::ProbeSent, Active, 0, Adm::Any),
                (0, Event::NotSent { epoch: 0 }, Active, 0, Adm::Any),
            ],
        ),
    ];
    for (name, start, steps) in cases {
        run(name, start, &steps).await;
    }
}

#[tokio::test(start_paused = true)]
async fn the_view_and_the_gauge_follow_the_state() {
    let now = Instant::now();
    let wall = Utc::now();
    let a = on_event(&active(), &done(0, Some(throttle(30))), now, PROBE);
    assert!(!a.paused());
    assert!(matches!(
        a.view(now, wall),
        AccountState::Throttled { until, .. } if until == wall + chrono::Duration::seconds(30)
    ));
    let p = on_event(
        &a,
        &done(0, Some(AccountSignal::Paused(advice()))),
        now,
        PROBE,
    );
    assert!(p.paused());
    assert!(matches!(
        p.view(now, wall),
        AccountState::Paused { next_probe, advice: adv } if next_probe == wall + chrono::Duration::seconds(60) && adv == advice()
    ));
    let admin = on_event(&p, &Event::AdminPause, now, PROBE);
    assert!(admin.paused());
    assert!(matches!(
        admin.view(now, wall),
        AccountState::Paused { advice, .. } if advice == admin_advice()
    ));
    let held = on_event(&active(), &done(0, Some(quota(60))), now, PROBE);
    assert!(!held.paused());
    assert!(matches!(held.view(now, wall), AccountState::Held { .. }));
    assert_eq!(active().view(now, wall), AccountState::Active);
    // A throttle whose time is over shows as active before any event says so.
    tokio::time::advance(Duration::from_secs(30)).await;
    assert_eq!(a.view(Instant::now(), wall), AccountState::Active);
}

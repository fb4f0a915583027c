//! The pure part of reloading: what a new config changes, and what it may not change.

use std::path::Path;

use super::*;

const BASE: &str = r#"
hostname = "relay.test"
[[listener]]
address = "127.0.0.1:2525"
[[listener]]
address = "127.0.0.1:2587"
[relay]
allowed_networks = ["127.0.0.1/32"]
[queue]
dir = "var/spool"
[[account]]
name = "local"
kind = "capture"
dir = "var/capture"
[[account]]
name = "other"
kind = "capture"
dir = "var/other"
"#;

fn parse(text: &str) -> Config {
    Config::parse(Path::new("exorelay.toml"), text).unwrap()
}

#[test]
fn the_same_file_changes_nothing() {
    let p = plan(&parse(BASE), &parse(BASE)).unwrap();
    assert_eq!(
        p.listeners,
        vec![ListenerPlan::Keep(0), ListenerPlan::Keep(1)]
    );
    assert!(p.removed_listeners.is_empty());
    assert!(p.rebuilt_accounts.is_empty());
    assert!(p.changes.is_empty(), "{:?}", p.changes);
    assert!(!p.lifecycle);
}

#[test]
fn listeners_are_matched_by_address() {
    let new = BASE.replace("127.0.0.1:2587", "127.0.0.1:2588");
    let p = plan(&parse(BASE), &parse(&new)).unwrap();
    assert_eq!(p.listeners, vec![ListenerPlan::Keep(0), ListenerPlan::Bind]);
    assert_eq!(p.removed_listeners, vec![1]);
    assert!(
        p.changes
            .contains(&"listener 127.0.0.1:2588 added".to_string())
    );
    assert!(
        p.changes
            .contains(&"listener 127.0.0.1:2587 removed".to_string())
    );
}

#[test]
fn a_listener_whose_settings_change_keeps_its_socket() {
    let new = BASE.replace(
        "address = \"127.0.0.1:2525\"",
        "address = \"127.0.0.1:2525\"\nauth = \"off\"",
    );
    let p = plan(&parse(BASE), &parse(&new)).unwrap();
    assert_eq!(p.listeners[0], ListenerPlan::Keep(0));
    assert_eq!(p.changes, vec!["listener 127.0.0.1:2525 changed"]);
}

#[test]
fn two_listeners_on_port_zero_are_two() {
    let text = BASE
        .replace("127.0.0.1:2525", "127.0.0.1:0")
        .replace("127.0.0.1:2587", "127.0.0.1:0");
    let p = plan(&parse(&text), &parse(&text)).unwrap();
    assert_eq!(
        p.listeners,
        vec![ListenerPlan::Keep(0), ListenerPlan::Keep(1)]
    );
}

#[test]
fn changed_new_and_removed_accounts() {
    let new = BASE
        .replace("dir = \"var/other\"", "dir = \"var/other2\"")
        .replace("name = \"local\"", "name = \"fresh\"");
    let p = plan(&parse(BASE), &parse(&new)).unwrap();
    assert_eq!(p.rebuilt_accounts, vec!["fresh", "other"]);
    assert!(p.lifecycle);
    assert!(
        p.changes
            .iter()
            .any(|c| c.starts_with("account local removed")),
        "{:?}",
        p.changes
    );
}

#[test]
fn relay_and_user_changes_are_reported() {
    let new = BASE.replace(
        "allowed_networks = [\"127.0.0.1/32\"]",
        "allowed_networks = [\"127.0.0.2/32\"]",
    );
    let p = plan(&parse(BASE), &parse(&new)).unwrap();
    assert_eq!(p.changes, vec!["relay settings changed"]);
    assert!(!p.lifecycle);
}

#[test]
fn the_spool_and_the_http_socket_need_a_restart() {
    let new = BASE.replace("var/spool", "var/spool2");
    assert_eq!(
        plan(&parse(BASE), &parse(&new)),
        Err(NeedsRestart { field: "queue.dir" })
    );
    let new = format!("{BASE}\n[http]\nlisten = \"127.0.0.1:8025\"\n");
    assert_eq!(
        plan(&parse(BASE), &parse(&new)),
        Err(NeedsRestart {
            field: "http.listen"
        })
    );
}

#[test]
fn line_of_finds_the_key_or_its_section() {
    let text = "a = 1\n[queue]\nmax_age = \"1d\"\ndir = \"x\"\n[http]\n";
    assert_eq!(line_of(text, "queue.dir"), Some(4));
    assert_eq!(line_of(text, "http.listen"), Some(5));
    assert_eq!(line_of(text, "relay.x"), None);
    // A key that merely starts like the one looked for is not it.
    assert_eq!(line_of("[queue]\ndirty = 1\n", "queue.dir"), Some(1));
}

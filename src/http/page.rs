//! The status page: one server-rendered page an administrator can leave open. No script, no
//! external assets (the relay runs on networks without internet). The page is built with
//! `html::Markup`, whose markup comes only from templates in this file and which escapes every
//! value, so nothing that came from a message or a device can become markup.
//!
//! Logging in with the admin token (`/login`, limited per client address) starts a session; the
//! cookie carries the session's random secret, never the token. Buttons are forms that carry the
//! session's CSRF token and are accepted only from this origin (see `auth`).

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};

use super::api::{Filter, account_command, account_views, list, queue_command};
use super::auth::{AdminForm, Reader, SESSION_COOKIE, SESSION_LIFETIME, same_origin, same_secret};
use super::html::Markup;
use super::{AppState, Peer, Refusal};
use crate::spool::Area;

const PAGE_SIZE: usize = 50;

fn ago(t: chrono::DateTime<chrono::Utc>) -> String {
    let secs = (chrono::Utc::now() - t).num_seconds().max(0) as u64;
    match secs {
        0..=59 => format!("{secs}s ago"),
        60..=3599 => format!("{}m ago", secs / 60),
        3600..=86399 => format!("{}h {}m ago", secs / 3600, (secs % 3600) / 60),
        _ => format!(
            "{} ago",
            humantime::format_duration(std::time::Duration::from_secs(secs / 3600 * 3600))
        ),
    }
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em}\
table{border-collapse:collapse;width:100%}th,td{border-bottom:1px solid #ddd;padding:4px 6px;text-align:left;vertical-align:top}\
th{background:#f4f4f4}.ok{color:#176b1d;font-weight:600}.bad{color:#b00020;font-weight:600}.warn{color:#9a5b00;font-weight:600}\
.fix{background:#fff7e0;padding:4px;border-left:3px solid #e0a800;font-family:monospace;white-space:pre-wrap}\
form.inline{display:inline}button{margin:0 2px}.muted{color:#777}.msg{background:#e8f4ff;padding:6px;border-left:3px solid #2a7de1}\
code{font-size:12px}nav a{margin-right:1em}";

/// The document's start, up to and including `<body>`.
pub(super) fn head(h: &mut Markup, title: &str, refresh: bool) {
    h.put(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        &[],
    );
    if refresh {
        h.put("<meta http-equiv=\"refresh\" content=\"30\">", &[]);
    }
    // STYLE is a constant of this file, so it goes in as a template with no placeholders.
    h.put("<title>{}</title><style>", &[&title]);
    h.put(STYLE, &[]);
    h.put("</style></head><body>", &[]);
}

/// A button that posts `action` for `name`; nothing for callers who may not press it (`csrf`
/// is `None`).
fn button(
    h: &mut Markup,
    csrf: Option<&str>,
    kind: &'static str,
    name: &str,
    action: &'static str,
    label: &'static str,
) {
    let Some(csrf) = csrf else {
        return;
    };
    h.put(
        "<form class=\"inline\" method=\"post\" action=\"/ui/{}/{}/{}\"><input type=\"hidden\" name=\"csrf\" value=\"{}\"><button type=\"submit\" name=\"do\" value=\"{}\" data-action=\"{}\">{}</button></form>",
        &[&kind, &name, &action, &csrf, &action, &action, &label],
    );
}

pub async fn status_page(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    reader: Result<Reader, Refusal>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let cred = match reader {
        Ok(Reader(c)) => c,
        Err(r) if r.status == StatusCode::UNAUTHORIZED => {
            return Redirect::to("/login").into_response();
        }
        Err(r) => return r.into_response(),
    };
    let csrf = if state.has_token() { cred.csrf() } else { None };
    let page: usize = q
        .get("page")
        .and_then(|p| p.parse().ok())
        .unwrap_or(1)
        .max(1);
    let view: &'static str = match q.get("state").map(String::as_str) {
        Some("held") => "held",
        Some("failed") => "failed",
        Some("deleted") => "deleted",
        Some("all") => "all",
        _ => "active",
    };
    let filter = Filter {
        state: (view != "active").then(|| view.to_string()),
        account: None,
        older_than: None,
        offset: (page - 1) * PAGE_SIZE,
        limit: PAGE_SIZE,
    };
    let spool = state.spool.clone();
    let f = filter.clone();
    let (counts, (total, messages)) = tokio::task::spawn_blocking(move || {
        let counts: Vec<(Area, Vec<String>)> = [Area::Queue, Area::Hold, Area::Failed]
            .into_iter()
            .map(|a| (a, spool.ids(a).unwrap_or_default()))
            .collect();
        (counts, list(&spool, &f))
    })
    .await
    .unwrap_or_default();

    let mut h = Markup::new();
    let config = state.config();
    let host = config.hostname.as_str();
    head(&mut h, &format!("exorelay on {host}"), true);
    h.put("<h1>exorelay on {}</h1><nav>", &[&host]);
    if let Some(csrf) = csrf {
        h.put(
            "<form class=\"inline\" method=\"post\" action=\"/logout\"><input type=\"hidden\" name=\"csrf\" value=\"{}\"><button>Log out</button></form>",
            &[&csrf],
        );
    } else if state.has_token() {
        h.put(
            "<a href=\"/login\">Log in to retry, hold or delete</a>",
            &[],
        );
    } else {
        h.put(
            "<span class=\"muted\">Read-only: set [http] admin_token_file to enable actions</span>",
            &[],
        );
    }
    h.put(
        " <a href=\"/metrics\">metrics</a> <a href=\"/readyz\">readiness</a></nav>",
        &[],
    );
    if let Some(msg) = q.get("msg") {
        h.put("<p class=\"msg\" id=\"flash\">{}</p>", &[msg]);
    }

    // Summary.
    let count = |a: Area| {
        counts
            .iter()
            .find(|(x, _)| *x == a)
            .map(|(_, v)| v.len())
            .unwrap_or(0)
    };
    let oldest = counts
        .iter()
        .find(|(a, _)| *a == Area::Queue)
        .and_then(|(_, ids)| ids.first())
        .and_then(|id| crate::spool::id_time(id))
        .map(ago)
        .unwrap_or_else(|| "-".into());
    h.put(
        "<p id=\"summary\"><b>{}</b> queued (oldest received {}), <b>{}</b> on hold, <b>{}</b> failed.</p>",
        &[&count(Area::Queue), &oldest, &count(Area::Hold), &count(Area::Failed)],
    );

    // Accounts.
    h.put(
        "<h2>Accounts</h2><table id=\"accounts\"><tr><th>Account</th><th>State</th><th>Last delivery</th><th>Last problem and fix</th><th>Token expires</th><th></th></tr>",
        &[],
    );
    for a in account_views(&state) {
        let text = |k: &str| a[k].as_str().unwrap_or("").to_string();
        let name = text("name");
        let degraded = a["degraded"].as_str();
        let st = match (a["state"].as_str().unwrap_or("active"), degraded) {
            ("active", Some(_)) => "degraded",
            (s, _) => s,
        };
        let class = match st {
            "active" => "ok",
            "paused" => "bad",
            _ => "warn",
        };
        let mut problem = Markup::new();
        // Failover: the paused account's mail goes out through its fallback, say so first.
        if let Some(f) = a["failing_over"].as_str() {
            problem.put("<div class=\"warn\" data-failover>{}</div>", &[&f]);
        }
        for w in a["credential_warnings"].as_array().into_iter().flatten() {
            problem.put("<div class=\"warn\">{}</div>", &[&w.as_str().unwrap_or("")]);
        }
        if let Some(cause) = degraded {
            problem.put(
                "{}<div class=\"fix\">{}</div>",
                &[
                    &format!("Exchange has not been reachable for several attempts in a row: {cause}"),
                    &"Check this machine's Internet access, DNS, firewall and any proxy towards smtp.office365.com:587 and the Entra login host; mail stays queued and is retried.",
                ],
            );
        } else if let Some(adv) = a.get("advice") {
            problem.put(
                "{}<div class=\"fix\">{}</div>",
                &[
                    &adv["cause"].as_str().unwrap_or(""),
                    &adv["fix"].as_str().unwrap_or(""),
                ],
            );
        } else if let Some(r) = a["reason"].as_str() {
            problem.put("{}", &[&r]);
        } else if let Some(e) = a["last_error"].as_str() {
            problem.put("<span class=\"muted\">{}</span>", &[&e]);
        }
        let last = a["last_success"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .map(ago)
            .unwrap_or_else(|| "-".into());
        let expiry = a["token_expires_at"].as_str().unwrap_or("-");
        let mut who = Markup::new();
        match a.get("sign_in") {
            Some(serde_json::Value::Null) => {
                who.put("<br><span class=\"bad\">not signed in</span>", &[]);
            }
            Some(g) => {
                let user = g["user"].as_str().unwrap_or("a user");
                let at = g["at"]
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .map(ago)
                    .unwrap_or_default();
                who.put(
                    "<br><span class=\"muted\">signed in as {} {}</span>",
                    &[&user, &at],
                );
            }
            None => {}
        }
        let mut action = Markup::new();
        if st == "paused" {
            button(&mut action, csrf, "accounts", &name, "resume", "Resume");
        } else {
            button(&mut action, csrf, "accounts", &name, "pause", "Pause");
        }
        if let Some(csrf) = csrf
            && state
                .config()
                .accounts
                .iter()
                .any(|c| c.name == name && c.auth == crate::config::AccountAuth::Delegated)
        {
            action.put(
                "<form class=\"inline\" method=\"post\" action=\"/oauth/start/{}\"><input type=\"hidden\" name=\"csrf\" value=\"{}\"><button type=\"submit\" data-action=\"signin\">Sign in with Microsoft</button></form>",
                &[&name, &csrf],
            );
        }
        h.put(
            "<tr data-account=\"{}\"><td><b>{}</b> <span class=\"muted\">{} {}</span>{}</td><td class=\"{}\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            &[
                &name,
                &name,
                &text("kind"),
                &text("mailbox"),
                &who,
                &class,
                &st,
                &last,
                &problem,
                &expiry,
                &action,
            ],
        );
    }
    h.put("</table>", &[]);

    // Queue.
    h.put("<h2>Messages</h2><p>", &[]);
    for (v, label) in [
        ("active", "queued, held and failed"),
        ("held", "held"),
        ("failed", "failed"),
        ("deleted", "deleted"),
    ] {
        if v == view {
            h.put("<b>{}</b> ", &[&label]);
        } else {
            h.put("<a href=\"/?state={}\">{}</a> ", &[&v, &label]);
        }
    }
    let pages = total.div_ceil(PAGE_SIZE).max(1);
    h.put(
        "</p><table id=\"queue\"><tr><th>Queue ID</th><th>State</th><th>Received</th><th>From</th><th>To</th><th>Subject</th><th>Attempts</th><th>Last reply</th><th></th></tr>",
        &[],
    );
    for m in &messages {
        let mut actions = Markup::new();
        match m.state {
            "held" => button(&mut actions, csrf, "queue", &m.id, "release", "Release"),
            "failed" | "deleted" => button(&mut actions, csrf, "queue", &m.id, "retry", "Retry"),
            _ => {
                button(&mut actions, csrf, "queue", &m.id, "retry", "Retry");
                button(&mut actions, csrf, "queue", &m.id, "hold", "Hold");
            }
        }
        if m.state != "deleted" {
            button(&mut actions, csrf, "queue", &m.id, "delete", "Delete");
        }
        let to = if m.recipients.len() > 3 {
            format!(
                "{} and {} more",
                m.recipients[..3].join(", "),
                m.recipients.len() - 3
            )
        } else {
            m.recipients.join(", ")
        };
        let from = if m.mail_from.is_empty() {
            "<>"
        } else {
            &m.mail_from
        };
        h.put(
            "<tr data-id=\"{}\"><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"subject\">{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            &[
                &m.id,
                &m.id,
                &m.state,
                &ago(m.received_at),
                &from,
                &to,
                &m.subject.as_deref().unwrap_or(""),
                &m.attempts,
                &m.last_reply.as_deref().unwrap_or(""),
                &actions,
            ],
        );
    }
    if messages.is_empty() {
        h.put(
            "<tr><td colspan=\"9\" class=\"muted\">No messages.</td></tr>",
            &[],
        );
    }
    h.put(
        "</table><p id=\"pages\">Page {} of {} ({} messages) ",
        &[&page, &pages, &total],
    );
    if page > 1 {
        h.put(
            "<a href=\"/?state={}&amp;page={}\">previous</a> ",
            &[&view, &(page - 1)],
        );
    }
    if page < pages {
        h.put(
            "<a href=\"/?state={}&amp;page={}\">next</a>",
            &[&view, &(page + 1)],
        );
    }
    h.put("</p>", &[]);

    // Recent activity.
    h.put(
        "<h2>Recent activity</h2><table id=\"events\"><tr><th>When</th><th>What</th><th>Queue ID</th><th>Account</th><th>Detail</th></tr>",
        &[],
    );
    let events = state.status.recent_events();
    for e in events.iter().take(30) {
        let class = match e.kind {
            "delivered" | "resumed" => "ok",
            "failed" | "paused" => "bad",
            _ => "warn",
        };
        h.put(
            "<tr><td>{}</td><td class=\"{}\">{}</td><td><code>{}</code></td><td>{}</td><td>{}</td></tr>",
            &[&ago(e.time), &class, &e.kind, &e.queue_id, &e.account, &e.detail],
        );
    }
    if events.is_empty() {
        h.put(
            "<tr><td colspan=\"5\" class=\"muted\">Nothing yet since the relay started.</td></tr>",
            &[],
        );
    }
    h.put("</table></body></html>", &[]);
    let mut r = Html(h.into_string()).into_response();
    if let Some(csp) = super::signin::status_page_policy(&state, &headers) {
        r.headers_mut().insert(header::CONTENT_SECURITY_POLICY, csp);
    }
    r
}

pub async fn login_form(State(state): State<Arc<AppState>>) -> Response {
    let config = state.config();
    let host = config.hostname.as_str();
    let mut h = Markup::new();
    head(&mut h, "exorelay login", false);
    h.put("<h1>exorelay on {}</h1>", &[&host]);
    if !state.has_token() {
        h.put(
            "<p class=\"bad\">No admin token is configured ([http] admin_token_file).</p>",
            &[],
        );
    }
    h.put(
        "<form method=\"post\" action=\"/login\"><label>Admin token <input type=\"password\" name=\"token\" id=\"token\" autocomplete=\"current-password\" size=\"50\"></label> <button type=\"submit\" id=\"login\">Log in</button></form></body></html>",
        &[],
    );
    Html(h.into_string()).into_response()
}

fn login_refused(status: StatusCode, text: &str) -> Response {
    let mut h = Markup::new();
    h.put(
        "<!doctype html><p>{}. <a href=\"/login\">Try again</a></p>",
        &[&text],
    );
    (status, Html(h.into_string())).into_response()
}

/// Checks the admin token typed into the form and starts a session. Limited per client
/// address (`429` with `Retry-After` while locked out); a foreign `Origin` is refused.
pub async fn login(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
    axum::Form(form): axum::Form<HashMap<String, String>>,
) -> Response {
    let now = tokio::time::Instant::now();
    let ip = peer.0.ip();
    if headers.contains_key(header::ORIGIN)
        && let Err(r) = same_origin(&state, &headers)
    {
        return r.into_response();
    }
    if let Err(wait) = state.sessions.login_allowed(ip, now) {
        tracing::warn!(client = %ip, "status page login refused: too many wrong tokens");
        let mut r = login_refused(
            StatusCode::TOO_MANY_REQUESTS,
            &format!(
                "Too many wrong tokens from this address; try again in {}",
                humantime::format_duration(std::time::Duration::from_secs(wait.as_secs() + 1))
            ),
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(wait.as_secs() + 1));
        return r;
    }
    let given = form.get("token").map(|t| t.trim()).unwrap_or_default();
    let right = state
        .token()
        .as_deref()
        .is_some_and(|expected| !given.is_empty() && same_secret(expected, given));
    if !right {
        state.sessions.login_failed(ip, now);
        tracing::warn!(client = %ip, "status page login failed");
        return login_refused(StatusCode::UNAUTHORIZED, "Wrong admin token");
    }
    state.sessions.login_succeeded(ip);
    let secret = match state.sessions.create(now) {
        Ok((secret, _)) => secret,
        Err(_) => {
            return login_refused(
                StatusCode::INTERNAL_SERVER_ERROR,
                "No random numbers for a session secret",
            );
        }
    };
    let secure = if state.config().http.tls.is_some() {
        "; Secure"
    } else {
        ""
    };
    let cookie = format!(
        "{SESSION_COOKIE}={secret}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}{secure}",
        SESSION_LIFETIME.as_secs()
    );
    let mut r = Redirect::to("/").into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

/// Ends the session named by the cookie (from this origin only) and clears the cookie. Ending
/// a session needs no CSRF token: the worst a forged logout does is log the page out.
pub async fn logout(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(r) = same_origin(&state, &headers) {
        return r.into_response();
    }
    if let Some(secret) = super::auth::cookie(&headers, SESSION_COOKIE) {
        state.sessions.remove(&secret);
    }
    let mut r = Redirect::to("/").into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("exorelay_session=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"),
    );
    r
}

/// The page's buttons: the same command the API would send.
pub async fn ui_action(
    State(state): State<Arc<AppState>>,
    Path((kind, name, action)): Path<(String, String, String)>,
    AdminForm(_, _): AdminForm,
) -> Response {
    let cmd = match kind.as_str() {
        "queue" if crate::spool::is_queue_id(&name) => queue_command(&action, name),
        "accounts" => account_command(&action, name),
        _ => None,
    };
    let Some(cmd) = cmd else {
        return super::error(StatusCode::NOT_FOUND, "unknown action");
    };
    let msg = match state.control.send(cmd).await {
        Ok(m) => m,
        Err(e) => format!("not done: {e}"),
    };
    let encoded: String = msg
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    Redirect::to(&format!("/?msg={encoded}")).into_response()
}

//! Signing a delegated account in from the status page: the same authorization code flow with
//! PKCE as `exorelay login --browser`, with this HTTP side as the redirect target.
//!
//! - `POST /oauth/start/{account}` (a status-page button: admin session, this origin, CSRF
//!   token) starts a sign-in and sends the browser to Entra's authorize URL (`303`). The
//!   redirect URI is this page's own origin plus `/oauth/callback`; Entra accepts a plain-http
//!   redirect only for `localhost`, so over http from another name the button explains the
//!   alternatives instead of sending the admin to an error at Microsoft.
//! - `GET /oauth/callback?code=…&state=…` finishes it. The session cookie is `SameSite=Strict`
//!   and does not come along on the redirect from Microsoft, so the credential here is the
//!   `state`: a random value only the browser that pressed the button was given, single use,
//!   valid for [`PENDING_LIFETIME`]. An unknown or expired `state` redeems nothing.
//! - After a sign-in the account is resumed (the same command as the page's Resume button), so
//!   queued mail goes out at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use tokio::time::Instant;

use super::auth::{AdminForm, is_loopback_host};
use super::html::Markup;
use super::{AppState, page};
use crate::config::{AccountAuth, AccountKind};
use crate::forward::Command;
use crate::oauth::login::{LoginError, PendingLogin, start_browser_login};

/// How long a started sign-in waits for its callback (Entra's codes live about 10 minutes).
pub const PENDING_LIFETIME: Duration = Duration::from_secs(15 * 60);
/// Sign-ins waiting at once; a new one beyond this replaces the oldest.
const MAX_PENDING: usize = 16;

/// Sign-ins started from the page and waiting for Entra's redirect, by `state`.
#[derive(Default)]
pub struct PendingLogins(Mutex<HashMap<String, (PendingLogin, Instant)>>);

impl PendingLogins {
    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<String, (PendingLogin, Instant)>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn insert(&self, login: PendingLogin, now: Instant) {
        let mut t = self.table();
        t.retain(|_, (_, at)| now.duration_since(*at) < PENDING_LIFETIME);
        while t.len() >= MAX_PENDING {
            let Some(oldest) = t
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            t.remove(&oldest);
        }
        t.insert(login.state().to_string(), (login, now));
    }

    /// Takes the sign-in started with `state`, if it is still valid (single use).
    fn take(&self, state: &str, now: Instant) -> Option<PendingLogin> {
        let (login, at) = self.table().remove(state)?;
        (now.duration_since(at) < PENDING_LIFETIME).then_some(login)
    }
}

/// A small page with a heading, a message and a way back.
fn page(status: StatusCode, title: &str, body: Markup) -> Response {
    let mut h = Markup::new();
    page::head(&mut h, title, false);
    h.put(
        "<h1>{}</h1>{}<p><a href=\"/\">Back to the status page</a></p></body></html>",
        &[&title, &body],
    );
    (status, Html(h.into_string())).into_response()
}

fn problem(status: StatusCode, title: &str, cause: &str, fix: &str) -> Response {
    let mut b = Markup::new();
    b.put("<p>{}</p><div class=\"fix\">{}</div>", &[&cause, &fix]);
    page(status, title, b)
}

/// `scheme://host` for Entra to send the browser back to, and whether Entra accepts it. Over
/// plain http only `localhost` is accepted (and matched whatever its port), while `127.0.0.1`
/// needs an edit of the app's manifest and `[::1]` is refused: a loopback address is
/// therefore named `localhost`, with the same port.
fn callback_origin(state: &AppState, headers: &HeaderMap) -> Option<(bool, String)> {
    let host = headers.get(header::HOST)?.to_str().ok()?;
    // A host name, an address and a port; nothing that could end up as markup or policy.
    if host.is_empty()
        || !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
    {
        return None;
    }
    if state.config().http.tls.is_some() {
        return Some((true, format!("https://{host}")));
    }
    if !is_loopback_host(host) {
        return Some((false, format!("http://{host}")));
    }
    let port = match host.rsplit_once(':') {
        Some((_, p)) if p.bytes().all(|b| b.is_ascii_digit()) => format!(":{p}"),
        _ => String::new(),
    };
    Some((true, format!("http://localhost{port}")))
}

/// The status page's "Sign in" button.
pub async fn start(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    AdminForm(_, _): AdminForm,
) -> Response {
    let config = state.config();
    let Some(account) = config.accounts.iter().find(|a| a.name == name) else {
        return super::error(StatusCode::NOT_FOUND, "no account with that name");
    };
    if account.kind != AccountKind::Exchange || account.auth != AccountAuth::Delegated {
        return problem(
            StatusCode::BAD_REQUEST,
            "Sign-in not needed",
            &format!("Account {name:?} does not use auth = \"delegated\"."),
            "Only delegated accounts are signed in by a user; app-only accounts use their client secret or certificate.",
        );
    }
    let Some((allowed, origin)) = callback_origin(&state, &headers) else {
        return super::error(StatusCode::BAD_REQUEST, "the request has no Host header");
    };
    if !allowed {
        return problem(
            StatusCode::BAD_REQUEST,
            "Sign-in needs HTTPS or localhost",
            &format!(
                "Entra sends the browser back to {origin}/oauth/callback, and it accepts a plain-http redirect only for localhost."
            ),
            &format!(
                "Open this page as http://localhost:PORT through an SSH tunnel (ssh -L PORT:127.0.0.1:PORT this-relay), or set [http] tls, or run on the relay: exorelay login --account {name}"
            ),
        );
    }
    let redirect = format!("{origin}/oauth/callback");
    let (url, login) = match start_browser_login(account, &redirect) {
        Ok(v) => v,
        Err(e) => {
            return problem(
                StatusCode::BAD_REQUEST,
                "Cannot start the sign-in",
                &e.to_string(),
                "Check the account's tenant, client_id and authority_url.",
            );
        }
    };
    state.logins.insert(login, Instant::now());
    tracing::info!(account = %name, redirect_uri = %redirect, "status page sign-in started");
    let Ok(location) = HeaderValue::from_str(url.as_str()) else {
        return super::error(StatusCode::INTERNAL_SERVER_ERROR, "unusable authorize URL");
    };
    let mut r = StatusCode::SEE_OTHER.into_response();
    r.headers_mut().insert(header::LOCATION, location);
    r
}

/// The status page's `Content-Security-Policy`: forms post to this origin only, and the
/// sign-in button's redirects may go on to the delegated accounts' Entra authorities and back
/// to the callback's origin (browsers check every redirect after a form post against the
/// posting page's `form-action`, and a page at `127.0.0.1` is called back as `localhost`).
pub fn status_page_policy(state: &AppState, headers: &HeaderMap) -> Option<HeaderValue> {
    let mut origins: Vec<String> = state
        .config()
        .accounts
        .iter()
        .filter(|a| a.kind == AccountKind::Exchange && a.auth == AccountAuth::Delegated)
        .filter_map(|a| reqwest::Url::parse(&a.token_url()).ok())
        .map(|u| u.origin().ascii_serialization())
        .filter(|o| o.starts_with("https://") || o.starts_with("http://"))
        .collect();
    if origins.is_empty() {
        return None;
    }
    if let Some((true, callback)) = callback_origin(state, headers) {
        origins.push(callback);
    }
    origins.sort();
    origins.dedup();
    HeaderValue::from_str(&format!(
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self' {}; frame-ancestors 'none'",
        origins.join(" ")
    ))
    .ok()
}

/// Where Entra sends the browser back.
pub async fn callback(
    State(state): State<Arc<AppState>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let Some(login) = q
        .get("state")
        .and_then(|s| state.logins.take(s, Instant::now()))
    else {
        return problem(
            StatusCode::BAD_REQUEST,
            "Unknown or expired sign-in",
            "This address does not belong to a sign-in started on this status page in the last 15 minutes, or it was used already.",
            "Start the sign-in again with the account's Sign in button.",
        );
    };
    let name = login.account().to_string();
    if let Some(error) = q.get("error") {
        let description = q.get("error_description").map(String::as_str).unwrap_or("");
        tracing::warn!(account = %name, %error, "status page sign-in declined by Entra");
        return problem(
            StatusCode::BAD_REQUEST,
            "Sign-in not completed",
            &format!("Entra answered {error}: {description}"),
            "Sign in again and accept the request. If it names AADSTS50011, register this page's address followed by /oauth/callback as a redirect URI of the app (App registrations > Authentication).",
        );
    }
    let Some(code) = q.get("code") else {
        return problem(
            StatusCode::BAD_REQUEST,
            "Sign-in not completed",
            "Entra's redirect carried no authorization code.",
            "Start the sign-in again.",
        );
    };
    let state_value = login.state().to_string();
    match login.finish(code, &state_value).await {
        Ok(signed) => {
            let user = signed.user.clone().unwrap_or_else(|| "the user".into());
            tracing::info!(account = %name, "status page sign-in completed");
            let resumed = state
                .control
                .send(Command::ResumeAccount(name.clone()))
                .await;
            let mut b = Markup::new();
            b.put(
                "<p class=\"ok\" id=\"signed-in\">Signed in as {} for account {}.</p><p>{}</p>",
                &[
                    &user,
                    &name,
                    &match resumed {
                        Ok(_) => "Delivery through this account resumes now; queued mail goes out."
                            .to_string(),
                        Err(e) => format!(
                            "The account could not be resumed ({e}); it retries at its next probe."
                        ),
                    },
                ],
            );
            page(StatusCode::OK, "Signed in", b)
        }
        Err(e) => {
            tracing::warn!(account = %name, error = %e, "status page sign-in failed");
            let fix = match &e {
                LoginError::Refused { advice, .. } => advice.fix.clone(),
                _ => "Start the sign-in again.".into(),
            };
            problem(
                StatusCode::BAD_GATEWAY,
                "Sign-in failed",
                &e.to_string(),
                &fix,
            )
        }
    }
}

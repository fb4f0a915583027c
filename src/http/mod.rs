//! The HTTP side: health, Prometheus metrics, the queue and account API, HTTP submission, the
//! status page. It only reads state and sends commands to the forwarder; it never reaches into
//! an SMTP session or an upstream connection.
//!
//! Access (decided by the extractors in `auth`, before any body is read): `/healthz`,
//! `/readyz` and `/metrics` are open. Other reads are open on a loopback listener to requests
//! whose `Host` is a loopback name, and need the admin token or a page login otherwise; message
//! bodies need one whenever a token is configured. Every state-changing call needs the admin
//! token as `Authorization: Bearer …`, or the page's session cookie plus this origin plus the
//! session's CSRF token. Connections, timeouts and TLS handshakes are handled in `serve`.
//! `/oauth/callback`, where Entra sends the browser back after a status-page sign-in, carries
//! no credential of ours: the single-use `state` of a sign-in an admin started is its
//! credential (see `signin`).

pub mod api;
pub mod auth;
pub mod html;
pub mod page;
pub mod serve;
pub mod signin;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::forward::{Control, Status};
use crate::metrics::Metrics;
use crate::reload::{Live, Reloader};
use crate::spool::{Area, Spool};

pub use auth::SESSION_COOKIE;

/// Everything the handlers read or command.
pub struct AppState {
    live: Arc<Live<HttpSettings>>,
    pub spool: Arc<Spool>,
    pub metrics: Arc<Metrics>,
    pub status: Arc<Status>,
    pub control: Control,
    /// Set once the SMTP listeners are bound and the forwarder runs.
    pub ready: Arc<AtomicBool>,
    /// Status-page logins and login failures.
    pub sessions: auth::Sessions,
    /// `POST /api/v1/reload`; `None` where the relay cannot reload (the answer is then 503).
    pub reloader: Option<Arc<Reloader>>,
    /// Sign-ins started from the status page, waiting for Entra's redirect.
    pub logins: signin::PendingLogins,
    /// Whether the socket is on loopback (`[http] listen` cannot change without a restart).
    loopback: bool,
}

/// What a reload changes on the HTTP side: the config (accounts, hostname, limits on
/// submissions) and the admin token, read again from `admin_token_file`. A request uses the
/// settings in force when it reads them.
pub struct HttpSettings {
    pub config: Arc<Config>,
    token: Option<String>,
}

impl HttpSettings {
    /// Reads the admin token file of `config`.
    pub fn new(config: Arc<Config>) -> HttpSettings {
        let token = config.http.admin_token();
        HttpSettings { config, token }
    }
}

impl AppState {
    pub fn new(
        live: Arc<Live<HttpSettings>>,
        spool: Arc<Spool>,
        metrics: Arc<Metrics>,
        status: Arc<Status>,
        control: Control,
        ready: Arc<AtomicBool>,
        reloader: Option<Arc<Reloader>>,
    ) -> AppState {
        let loopback = live
            .get()
            .config
            .http
            .listen
            .is_some_and(|l| l.ip().is_loopback());
        let sessions = auth::Sessions::default();
        sessions.bind(live.get().token.as_deref());
        AppState {
            live,
            spool,
            metrics,
            status,
            control,
            ready,
            sessions,
            reloader,
            logins: signin::PendingLogins::default(),
            loopback,
        }
    }

    /// The config in force now.
    pub fn config(&self) -> Arc<Config> {
        self.live.get().config.clone()
    }

    /// The admin token in force now.
    pub fn token(&self) -> Option<String> {
        self.live.get().token.clone()
    }

    pub fn has_token(&self) -> bool {
        self.live.get().token.is_some()
    }
}

/// The client address, for listeners with and without TLS.
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub SocketAddr);

/// Why a request was refused; becomes a JSON error response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub message: String,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut r = error(self.status, self.message);
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"exorelay\""),
            );
        }
        r
    }
}

fn refuse(status: StatusCode, message: &str) -> Refusal {
    Refusal {
        status,
        message: message.to_string(),
    }
}

/// JSON error body `{"error": "..."}`.
pub fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        axum::Json(serde_json::json!({ "error": message.into() })),
    )
        .into_response()
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(axum::extract::State(state): axum::extract::State<Arc<AppState>>) -> Response {
    let listeners = state.ready.load(Ordering::SeqCst);
    let spool = state.spool.clone();
    let spool_ok = tokio::task::spawn_blocking(move || spool.check_writable())
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
    let mut accounts = serde_json::Map::new();
    let mut accounts_ok = true;
    let mut degraded = Vec::new();
    let mut warnings = Vec::new();
    // Names and states only: /readyz answers without a token (and to any Host, for monitoring
    // systems), so causes, advice and mailboxes stay behind /api/v1/accounts.
    for (name, st) in state.status.all() {
        let ok = !matches!(st.state, crate::forward::AccountState::Paused { .. });
        accounts_ok &= ok;
        if !st.credential_warnings.is_empty() {
            warnings.push(format!(
                "account {name}: a credential expires soon; see /api/v1/accounts"
            ));
        }
        if st.credential_expired {
            degraded.push(format!(
                "account {name} has an expired credential; see /api/v1/accounts"
            ));
        }
        if st.degraded.is_some() {
            degraded.push(format!(
                "account {name} is degraded (its upstream is unreachable); see /api/v1/accounts"
            ));
        }
        let state_name = serde_json::to_value(&st.state)
            .ok()
            .and_then(|v| v["state"].as_str().map(str::to_string))
            .unwrap_or_default();
        accounts.insert(
            name,
            serde_json::json!({ "state": state_name, "degraded": st.degraded.is_some() }),
        );
    }
    let none_paused = accounts_ok;
    let accounts_ok = none_paused && degraded.is_empty();
    let ready = listeners && spool_ok.is_ok() && accounts_ok;
    let mut reasons = Vec::new();
    if !listeners {
        reasons.push("SMTP listeners are not running".to_string());
    }
    if let Err(e) = &spool_ok {
        reasons.push(format!("spool is not writable: {e}"));
    }
    if !none_paused {
        reasons.push("an account is paused; see /api/v1/accounts".to_string());
    }
    reasons.extend(degraded);
    let body = serde_json::json!({ "ready": ready, "reasons": reasons, "warnings": warnings, "listeners": listeners, "spool_writable": spool_ok.is_ok(), "accounts": accounts });
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(body)).into_response()
}

async fn metrics(axum::extract::State(state): axum::extract::State<Arc<AppState>>) -> Response {
    let spool = state.spool.clone();
    let (depth, oldest, held) = tokio::task::spawn_blocking(move || {
        let queued = spool.ids(Area::Queue).unwrap_or_default();
        let oldest = queued.first().and_then(|id| crate::spool::id_time(id));
        (
            queued.len(),
            oldest,
            spool.ids(Area::Hold).map(|v| v.len()).unwrap_or(0),
        )
    })
    .await
    .unwrap_or((0, None, 0));
    state.metrics.queue_depth.set(depth as i64);
    state.metrics.held.set(held as i64);
    state
        .metrics
        .spare_files
        .set(state.spool.spare_files() as i64);
    let age = oldest
        .map(|t| (chrono::Utc::now() - t).num_milliseconds() as f64 / 1000.0)
        .unwrap_or(0.0);
    state.metrics.queue_oldest_age.set(age.max(0.0));
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/queue", get(api::queue_list))
        .route(
            "/api/v1/queue/{id}",
            get(api::queue_show).delete(api::queue_delete),
        )
        .route("/api/v1/queue/{id}/{action}", post(api::queue_action))
        .route("/api/v1/accounts", get(api::accounts))
        .route(
            "/api/v1/accounts/{name}/{action}",
            post(api::account_action),
        )
        .route("/api/v1/messages", post(api::submit))
        .route("/api/v1/reload", post(api::reload))
        .route("/", get(page::status_page))
        .route(
            "/login",
            get(page::login_form)
                .post(page::login)
                .layer(axum::extract::DefaultBodyLimit::max(FORM_LIMIT)),
        )
        .route("/logout", post(page::logout))
        .route(
            "/oauth/start/{account}",
            post(signin::start).layer(axum::extract::DefaultBodyLimit::max(FORM_LIMIT)),
        )
        .route("/oauth/callback", get(signin::callback))
        .route(
            "/ui/{kind}/{name}/{action}",
            post(page::ui_action).layer(axum::extract::DefaultBodyLimit::max(FORM_LIMIT)),
        )
        .layer(axum::middleware::from_fn_with_state(
            state.config().http.request_timeout,
            request_timeout,
        ))
        .layer(axum::middleware::from_fn(security_headers))
        .with_state(state)
}

/// The page's forms are a token or a CSRF token and a button: a few hundred bytes.
const FORM_LIMIT: usize = 16 * 1024;

/// Bounds reading the body and answering (`[http] request_timeout`): a client that stops
/// sending halfway through a body gets `408` and the connection is closed.
async fn request_timeout(
    axum::extract::State(limit): axum::extract::State<std::time::Duration>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(r) => r,
        Err(_) => {
            let mut r = error(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request was not completed within {} ([http] request_timeout)",
                    humantime::format_duration(limit)
                ),
            );
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            r
        }
    }
}

/// Headers that keep the page from being framed or sniffed; no external assets are used.
async fn security_headers(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    // A handler may set a narrower-purpose policy of its own (the sign-in redirect).
    if !h.contains_key(header::CONTENT_SECURITY_POLICY) {
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'"),
        );
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// Serves the HTTP side on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let config = state.config();
    let tls = match &config.http.tls {
        Some(t) => Some(tokio_rustls::TlsAcceptor::from(
            crate::tls::server_config_from_files(&t.cert, &t.key).map_err(std::io::Error::other)?,
        )),
        None => None,
    };
    let limits = serve::Limits::from_config(&config.http);
    serve::run(listener, router(state), tls, limits, shutdown).await;
    Ok(())
}

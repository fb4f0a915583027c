//! The HTTP side: health, Prometheus metrics, the queue and account API, HTTP submission, the
//! status page. It only reads state and sends commands to the forwarder; it never reaches into
//! an SMTP session or an upstream connection.
//!
//! Access: `/healthz`, `/readyz` and `/metrics` are open. Other reads are open when the listener
//! is on loopback and need the admin token otherwise. Every state-changing call needs the admin
//! token, as `Authorization: Bearer …` (API) or as the session cookie set by `/login` (status
//! page), in which case the form must also carry the CSRF token and come from this origin.

pub mod api;
pub mod page;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::connect_info::Connected;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::forward::{Control, Status};
use crate::metrics::Metrics;
use crate::spool::{Area, Spool};

pub const SESSION_COOKIE: &str = "exorelay_session";

/// Everything the handlers read or command.
pub struct AppState {
    pub config: Arc<Config>,
    pub spool: Arc<Spool>,
    pub metrics: Arc<Metrics>,
    pub status: Arc<Status>,
    pub control: Control,
    /// Set once the SMTP listeners are bound and the forwarder runs.
    pub ready: Arc<AtomicBool>,
    token: Option<String>,
    loopback: bool,
}

impl AppState {
    pub fn new(
        config: Arc<Config>,
        spool: Arc<Spool>,
        metrics: Arc<Metrics>,
        status: Arc<Status>,
        control: Control,
        ready: Arc<AtomicBool>,
    ) -> AppState {
        let token = config.http.admin_token();
        let loopback = config.http.listen.is_some_and(|l| l.ip().is_loopback());
        AppState {
            config,
            spool,
            metrics,
            status,
            control,
            ready,
            token,
            loopback,
        }
    }

    /// The CSRF token for forms: derived from the admin token, so it needs no server state.
    pub fn csrf(&self) -> String {
        let t = self.token.as_deref().unwrap_or("");
        let d = ring::digest::digest(
            &ring::digest::SHA256,
            format!("exorelay-csrf\0{t}").as_bytes(),
        );
        d.as_ref()
            .iter()
            .take(16)
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }
}

/// The client address, for listeners with and without TLS.
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub SocketAddr);

impl Connected<axum::serve::IncomingStream<'_, TcpListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TcpListener>) -> Self {
        Peer(*stream.remote_addr())
    }
}

impl Connected<axum::serve::IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Self {
        Peer(*stream.remote_addr())
    }
}

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

/// Constant-time comparison of two secrets (compares their SHA-256 digests).
fn same_secret(a: &str, b: &str) -> bool {
    let da = ring::digest::digest(&ring::digest::SHA256, a.as_bytes());
    let db = ring::digest::digest(&ring::digest::SHA256, b.as_bytes());
    da.as_ref()
        .iter()
        .zip(db.as_ref())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == name).then(|| v.to_string())
        })
}

/// How a request proved it is the administrator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    Bearer,
    Cookie,
    /// Nothing presented; allowed only for reads on loopback.
    Anonymous,
}

pub enum Access {
    Read,
    Write,
}

/// Checks the request's credential for `access`; on refusal returns the response to send.
pub fn authorize(
    state: &AppState,
    headers: &HeaderMap,
    access: Access,
) -> Result<Credential, Refusal> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| (t.trim().to_string(), Credential::Bearer));
    let presented =
        bearer.or_else(|| cookie(headers, SESSION_COOKIE).map(|t| (t, Credential::Cookie)));
    let unauthorized = |msg: &str| refuse(StatusCode::UNAUTHORIZED, msg);
    match (&state.token, presented) {
        (Some(expected), Some((given, how))) => {
            if same_secret(expected, &given) {
                Ok(how)
            } else {
                Err(unauthorized("wrong admin token"))
            }
        }
        (Some(_), None) => match access {
            Access::Read if state.loopback => Ok(Credential::Anonymous),
            _ => Err(unauthorized(
                "this call needs the admin token: Authorization: Bearer <token from [http] admin_token_file>",
            )),
        },
        (None, _) => match access {
            Access::Read => Ok(Credential::Anonymous),
            Access::Write => Err(refuse(
                StatusCode::FORBIDDEN,
                "state-changing calls are disabled: set [http] admin_token_file in the config",
            )),
        },
    }
}

/// For cookie-authenticated form posts: the request must come from this origin and carry the
/// CSRF token.
pub fn check_csrf(
    state: &AppState,
    headers: &HeaderMap,
    form_token: Option<&str>,
) -> Result<(), Refusal> {
    let forbidden = |m: &str| refuse(StatusCode::FORBIDDEN, m);
    if let (Some(origin), Some(host)) = (
        headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()),
        headers.get(header::HOST).and_then(|v| v.to_str().ok()),
    ) {
        let origin_host = origin.split("://").nth(1).unwrap_or("");
        if origin != "null" && origin_host != host {
            return Err(forbidden("cross-site request refused"));
        }
    }
    match form_token {
        Some(t) if same_secret(t, &state.csrf()) => Ok(()),
        _ => Err(forbidden("missing or wrong CSRF token; reload the page")),
    }
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
    for (name, st) in state.status.all() {
        let ok = !matches!(st.state, crate::forward::AccountState::Paused { .. });
        accounts_ok &= ok;
        accounts.insert(name, serde_json::to_value(&st).unwrap_or_default());
    }
    let ready = listeners && spool_ok.is_ok() && accounts_ok;
    let mut reasons = Vec::new();
    if !listeners {
        reasons.push("SMTP listeners are not running".to_string());
    }
    if let Err(e) = &spool_ok {
        reasons.push(format!("spool is not writable: {e}"));
    }
    if !accounts_ok {
        reasons.push("an account is paused; see accounts".to_string());
    }
    let body = serde_json::json!({ "ready": ready, "reasons": reasons, "listeners": listeners, "spool_writable": spool_ok.is_ok(), "accounts": accounts });
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
    let max_body = state.config.relay.max_message_size as usize + 64 * 1024;
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
        .route(
            "/api/v1/messages",
            post(api::submit).layer(axum::extract::DefaultBodyLimit::max(max_body)),
        )
        .route("/", get(page::status_page))
        .route("/login", get(page::login_form).post(page::login))
        .route("/logout", post(page::logout))
        .route("/ui/{kind}/{name}/{action}", post(page::ui_action))
        .layer(axum::middleware::from_fn(security_headers))
        .with_state(state)
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
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// A TLS listener for axum: the handshake is bounded so a silent client cannot stall accepts.
pub struct TlsListener {
    inner: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (tcp, addr) = match self.inner.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "http accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            match tokio::time::timeout(
                std::time::Duration::from_secs(10),
                self.acceptor.accept(tcp),
            )
            .await
            {
                Ok(Ok(s)) => return (s, addr),
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, client = %addr, "http TLS handshake failed")
                }
                Err(_) => tracing::debug!(client = %addr, "http TLS handshake timed out"),
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// Serves the HTTP side on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = router(state.clone()).into_make_service_with_connect_info::<Peer>();
    match &state.config.http.tls {
        Some(t) => {
            let config = crate::tls::server_config_from_files(&t.cert, &t.key)
                .map_err(std::io::Error::other)?;
            let tls = TlsListener {
                inner: listener,
                acceptor: tokio_rustls::TlsAcceptor::from(config),
            };
            axum::serve(tls, app)
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await
        }
        None => {
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await
        }
    }
}

//! A fake Microsoft Graph on loopback (axum on 127.0.0.1:0): an Entra-style token endpoint
//! (client credentials with a secret, scope `https://graph.microsoft.com/.default`) and the mail
//! endpoints the relay uses: `sendMail` (base64 MIME), drafts from MIME, upload sessions,
//! `send`, Sent Items search by `internetMessageId`, and an Inbox listing tests can drop
//! messages into (for non-delivery reports).
//!
//! Like Graph it checks the bearer token on every call (401 with `WWW-Authenticate` otherwise)
//! and `Content-Type`, refuses requests over 4 MiB (413), answers 429 with `Retry-After` when
//! more than 4 requests for a mailbox are in flight, refuses a `From:` other than the mailbox
//! unless SendAs is granted (403 `ErrorSendAsDenied`), and derives the recipients from the
//! To/Cc/Bcc headers. Scripted faults: an HTTP error per send request, or "send, then 504".
#![allow(dead_code)]
// Handlers answer with a ready `Response` as their error; boxing it buys nothing in a fake.
#![allow(clippy::result_large_err)]

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use mail_parser::{HeaderName, MessageParser};

pub const TENANT: &str = "contoso.onmicrosoft.com";
pub const CLIENT_ID: &str = "11111111-2222-3333-4444-555555555555";
pub const SECRET: &str = "fake-Graph~Secret.12345";
pub const MAILBOX: &str = "relay@contoso.com";
pub const SCOPE: &str = "https://graph.microsoft.com/.default";
/// Graph's request size limit as the fake enforces it.
pub const REQUEST_LIMIT: usize = 4 * 1024 * 1024;

/// A message Graph accepted for sending.
#[derive(Debug, Clone)]
pub struct Sent {
    pub mailbox: String,
    pub from: String,
    /// Derived from To, Cc and Bcc, lower-cased, in header order.
    pub recipients: Vec<String>,
    /// The MIME Graph was given (for a draft: the draft's MIME, without uploaded attachments).
    pub mime: Vec<u8>,
    /// Attachments uploaded through upload sessions: (name, content type, bytes).
    pub attachments: Vec<(String, String, Vec<u8>)>,
    pub internet_message_id: String,
    /// `sendMail` or `draft`.
    pub via: &'static str,
}

/// What the next send request (sendMail or draft send) gets.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Status, error code and optional Retry-After seconds; nothing is sent.
    Status(u16, &'static str, Option<u64>),
    /// The mail goes out, then the answer is 504 with `Retry-After: 1` (an ambiguous outcome).
    SentThen504,
}

struct Draft {
    mime: Vec<u8>,
    attachments: Vec<(String, String, Vec<u8>)>,
}

struct Upload {
    draft: String,
    name: String,
    content_type: String,
    size: usize,
    data: Vec<u8>,
}

#[derive(Default)]
pub struct GraphState {
    pub tokens: Mutex<HashSet<String>>,
    pub token_requests: AtomicUsize,
    /// Every token refused from now on (a revoked permission).
    pub refuse_tokens: Mutex<bool>,
    pub send_as: Mutex<HashSet<String>>,
    pub faults: Mutex<VecDeque<Fault>>,
    pub sent: Mutex<Vec<Sent>>,
    drafts: Mutex<HashMap<String, Draft>>,
    uploads: Mutex<HashMap<String, Upload>>,
    pub inbox: Mutex<Vec<serde_json::Value>>,
    in_flight: Mutex<HashMap<String, usize>>,
    pub max_in_flight: AtomicUsize,
    pub throttled: AtomicUsize,
    /// Requests per route kind ("sendMail", "draft", "upload", "send", "sentitems", ...).
    pub requests: Mutex<HashMap<&'static str, usize>>,
    /// Largest request body seen.
    pub largest_request: AtomicUsize,
    /// Each request waits this long (to provoke concurrency).
    pub delay: Mutex<Duration>,
    /// Every mailbox call is refused with this status and code (an application access policy
    /// that excludes the mailbox: 403 `ErrorAccessDenied`).
    pub deny_mailbox: Mutex<Option<(u16, &'static str, &'static str)>>,
    addr: Mutex<Option<SocketAddr>>,
}

pub struct FakeGraph {
    pub addr: SocketAddr,
    pub state: Arc<GraphState>,
}

impl FakeGraph {
    pub async fn start() -> FakeGraph {
        let state = Arc::new(GraphState::default());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        *state.addr.lock().unwrap() = Some(addr);
        let app = axum::Router::new()
            .route("/{tenant}/oauth2/v2.0/token", axum::routing::post(token))
            .route("/v1.0/users/{m}/sendMail", axum::routing::post(send_mail))
            .route(
                "/v1.0/users/{m}/messages",
                axum::routing::post(create_draft),
            )
            .route(
                "/v1.0/users/{m}/messages/{id}",
                axum::routing::delete(delete_draft),
            )
            .route(
                "/v1.0/users/{m}/messages/{id}/attachments/createUploadSession",
                axum::routing::post(create_upload),
            )
            .route(
                "/v1.0/users/{m}/messages/{id}/send",
                axum::routing::post(send_draft),
            )
            .route("/upload/{session}", axum::routing::put(put_chunk))
            .route(
                "/v1.0/users/{m}/mailFolders/{folder}/messages",
                axum::routing::get(list_folder),
            )
            .layer(axum::extract::DefaultBodyLimit::max(64 * 1024 * 1024))
            .with_state(state.clone());
        tokio::spawn(async move {
            let _ = axum::serve(l, app).await;
        });
        FakeGraph { addr, state }
    }

    /// The `authority_url` and `graph_url` for the relay's account.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn sent(&self) -> Vec<Sent> {
        self.state.sent.lock().unwrap().clone()
    }

    pub fn sent_count(&self) -> usize {
        self.state.sent.lock().unwrap().len()
    }

    pub fn fault(&self, f: Fault) {
        self.state.faults.lock().unwrap().push_back(f);
    }

    /// Invalidates every token issued so far (the next call gets 401).
    pub fn expire_tokens(&self) {
        self.state.tokens.lock().unwrap().clear();
    }

    /// Drops a message into the mailbox's Inbox (a non-delivery report, say).
    pub fn drop_in_inbox(&self, message: serde_json::Value) {
        self.state.inbox.lock().unwrap().push(message);
    }

    pub fn requests(&self, kind: &str) -> usize {
        *self.state.requests.lock().unwrap().get(kind).unwrap_or(&0)
    }

    pub fn drafts_left(&self) -> usize {
        self.state.drafts.lock().unwrap().len()
    }
}

fn graph_error(status: u16, code: &str, message: &str) -> Response {
    (
        StatusCode::from_u16(status).unwrap(),
        axum::Json(serde_json::json!({"error": {"code": code, "message": message,
            "innerError": {"request-id": "00000000-0000-0000-0000-000000000000", "date": "2026-01-01T00:00:00"}}})),
    )
        .into_response()
}

async fn token(
    State(st): State<Arc<GraphState>>,
    Path(tenant): Path<String>,
    axum::Form(form): axum::Form<HashMap<String, String>>,
) -> Response {
    st.token_requests.fetch_add(1, Ordering::SeqCst);
    let bad = |error: &str, code: u32, text: &str| {
        (
            StatusCode::BAD_REQUEST,
            axum::Json(serde_json::json!({"error": error, "error_description": format!("AADSTS{code}: {text}"), "error_codes": [code]})),
        )
            .into_response()
    };
    if tenant != TENANT {
        return bad("invalid_request", 90002, "Tenant not found.");
    }
    if form.get("client_id").map(String::as_str) != Some(CLIENT_ID) {
        return bad("unauthorized_client", 700016, "Application not found.");
    }
    if form.get("scope").map(String::as_str) != Some(SCOPE) {
        return bad(
            "invalid_scope",
            70011,
            "The provided value for scope is not valid.",
        );
    }
    if form.get("client_secret").map(String::as_str) != Some(SECRET) {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(serde_json::json!({"error": "invalid_client", "error_description": "AADSTS7000215: Invalid client secret provided.", "error_codes": [7000215]})),
        )
            .into_response();
    }
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({"aud": "https://graph.microsoft.com", "roles": ["Mail.Send", "Mail.ReadWrite"],
        "tid": "9999-tenant-guid", "appid": CLIENT_ID, "iat": now, "exp": now + 3599, "jti": format!("{:016x}", fastrand::u64(..))});
    let tok = format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        URL_SAFE_NO_PAD.encode(fastrand::u64(..).to_be_bytes())
    );
    st.tokens.lock().unwrap().insert(tok.clone());
    axum::Json(serde_json::json!({"token_type": "Bearer", "expires_in": 3599, "access_token": tok}))
        .into_response()
}

/// Checks the bearer token and counts the request in flight for the mailbox.
struct Call {
    st: Arc<GraphState>,
    mailbox: String,
}

impl Drop for Call {
    fn drop(&mut self) {
        if let Some(n) = self.st.in_flight.lock().unwrap().get_mut(&self.mailbox) {
            *n -= 1;
        }
    }
}

async fn enter(
    st: &Arc<GraphState>,
    headers: &HeaderMap,
    mailbox: &str,
    kind: &'static str,
    body_len: usize,
) -> Result<Call, Response> {
    *st.requests.lock().unwrap().entry(kind).or_default() += 1;
    st.largest_request.fetch_max(body_len, Ordering::SeqCst);
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if *st.refuse_tokens.lock().unwrap() || !st.tokens.lock().unwrap().contains(auth) {
        let mut r = graph_error(
            401,
            "InvalidAuthenticationToken",
            "Access token is empty or invalid.",
        );
        r.headers_mut().insert(
            "www-authenticate",
            "Bearer realm=\"\", authorization_uri=\"https://login.microsoftonline.com/common/oauth2/authorize\", error=\"invalid_token\"".parse().unwrap(),
        );
        return Err(r);
    }
    if let Some((status, code, message)) = *st.deny_mailbox.lock().unwrap() {
        return Err(graph_error(status, code, message));
    }
    if !mailbox.eq_ignore_ascii_case(MAILBOX) {
        return Err(graph_error(
            404,
            "ErrorInvalidUser",
            "The requested user is invalid.",
        ));
    }
    if body_len > REQUEST_LIMIT {
        return Err((StatusCode::PAYLOAD_TOO_LARGE, "Request Entity Too Large").into_response());
    }
    {
        let mut f = st.in_flight.lock().unwrap();
        let n = f.entry(mailbox.to_ascii_lowercase()).or_default();
        if *n >= 4 {
            st.throttled.fetch_add(1, Ordering::SeqCst);
            let mut r = graph_error(
                429,
                "ApplicationThrottled",
                "Application is over its MailboxConcurrency limit.",
            );
            r.headers_mut().insert("retry-after", "1".parse().unwrap());
            return Err(r);
        }
        *n += 1;
        st.max_in_flight.fetch_max(*n, Ordering::SeqCst);
    }
    let call = Call {
        st: st.clone(),
        mailbox: mailbox.to_ascii_lowercase(),
    };
    let delay = *st.delay.lock().unwrap();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    Ok(call)
}

fn text_plain(headers: &HeaderMap) -> bool {
    headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/plain"))
}

fn decode_mime(headers: &HeaderMap, body: &[u8]) -> Result<Vec<u8>, Response> {
    if !text_plain(headers) {
        return Err(graph_error(
            415,
            "UnsupportedMediaType",
            "Content-Type must be text/plain for MIME.",
        ));
    }
    STANDARD.decode(body).map_err(|_| {
        graph_error(
            400,
            "ErrorMimeContentInvalidBase64String",
            "Invalid base64 string for MIME content.",
        )
    })
}

/// (From address, recipients from To/Cc/Bcc, Message-ID)
fn derive(mime: &[u8]) -> (String, Vec<String>, String) {
    let Some(m) = MessageParser::default().parse(mime) else {
        return (String::new(), Vec::new(), String::new());
    };
    let from = m
        .from()
        .and_then(|a| a.first())
        .and_then(|a| a.address())
        .unwrap_or("")
        .to_ascii_lowercase();
    let mut rcpts = Vec::new();
    for h in m.headers() {
        if matches!(h.name, HeaderName::To | HeaderName::Cc | HeaderName::Bcc)
            && let Some(a) = h.value.as_address()
        {
            rcpts.extend(
                a.iter()
                    .filter_map(|x| x.address().map(str::to_ascii_lowercase)),
            );
        }
    }
    let id = m.message_id().map(|i| format!("<{i}>")).unwrap_or_default();
    (from, rcpts, id)
}

/// Applies the scripted fault and SendAs, then records the message as sent.
fn deliver(
    st: &Arc<GraphState>,
    mailbox: &str,
    mime: Vec<u8>,
    attachments: Vec<(String, String, Vec<u8>)>,
    via: &'static str,
) -> Response {
    let fault = st.faults.lock().unwrap().pop_front();
    if let Some(Fault::Status(status, code, retry)) = &fault {
        let mut r = graph_error(*status, code, "scripted fault");
        if let Some(s) = retry {
            r.headers_mut()
                .insert("retry-after", s.to_string().parse().unwrap());
        }
        return r;
    }
    let (from, recipients, internet_message_id) = derive(&mime);
    if !from.eq_ignore_ascii_case(mailbox) && !st.send_as.lock().unwrap().contains(&from) {
        return graph_error(
            403,
            "ErrorSendAsDenied",
            "The user account which was used to submit this request does not have the right to send mail on behalf of the specified sending account.",
        );
    }
    st.sent.lock().unwrap().push(Sent {
        mailbox: mailbox.to_string(),
        from,
        recipients,
        mime,
        attachments,
        internet_message_id,
        via,
    });
    if matches!(fault, Some(Fault::SentThen504)) {
        let mut r = graph_error(504, "GatewayTimeout", "scripted: sent, then timed out");
        r.headers_mut().insert("retry-after", "1".parse().unwrap());
        return r;
    }
    StatusCode::ACCEPTED.into_response()
}

async fn send_mail(
    State(st): State<Arc<GraphState>>,
    Path(m): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let _call = match enter(&st, &headers, &m, "sendMail", body.len()).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let mime = match decode_mime(&headers, &body) {
        Ok(m) => m,
        Err(r) => return r,
    };
    deliver(&st, &m, mime, Vec::new(), "sendMail")
}

async fn create_draft(
    State(st): State<Arc<GraphState>>,
    Path(m): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let _call = match enter(&st, &headers, &m, "draft", body.len()).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let mime = match decode_mime(&headers, &body) {
        Ok(m) => m,
        Err(r) => return r,
    };
    let (_, _, imid) = derive(&mime);
    let id = format!("draft-{:016x}", fastrand::u64(..));
    st.drafts.lock().unwrap().insert(
        id.clone(),
        Draft {
            mime,
            attachments: Vec::new(),
        },
    );
    (
        StatusCode::CREATED,
        axum::Json(serde_json::json!({"id": id, "internetMessageId": imid, "isDraft": true})),
    )
        .into_response()
}

async fn delete_draft(
    State(st): State<Arc<GraphState>>,
    Path((m, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let _call = match enter(&st, &headers, &m, "delete", 0).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    match st.drafts.lock().unwrap().remove(&id) {
        Some(_) => StatusCode::NO_CONTENT.into_response(),
        None => graph_error(
            404,
            "ErrorItemNotFound",
            "The specified object was not found in the store.",
        ),
    }
}

async fn create_upload(
    State(st): State<Arc<GraphState>>,
    Path((m, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let _call = match enter(&st, &headers, &m, "createUploadSession", body.len()).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    if !st.drafts.lock().unwrap().contains_key(&id) {
        return graph_error(
            404,
            "ErrorItemNotFound",
            "The specified object was not found in the store.",
        );
    }
    let Ok(req) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return graph_error(400, "ErrorInvalidRequest", "bad JSON");
    };
    let item = &req["AttachmentItem"];
    let (Some(name), Some(size)) = (item["name"].as_str(), item["size"].as_u64()) else {
        return graph_error(
            400,
            "ErrorInvalidRequest",
            "AttachmentItem needs name and size",
        );
    };
    if item["attachmentType"].as_str() != Some("file") {
        return graph_error(400, "ErrorInvalidRequest", "attachmentType");
    }
    let session = format!("{:016x}", fastrand::u64(..));
    st.uploads.lock().unwrap().insert(
        session.clone(),
        Upload {
            draft: id,
            name: name.to_string(),
            content_type: item["contentType"].as_str().unwrap_or("").to_string(),
            size: size as usize,
            data: Vec::new(),
        },
    );
    let addr = st.addr.lock().unwrap().unwrap();
    (
        StatusCode::CREATED,
        axum::Json(serde_json::json!({"uploadUrl": format!("http://{addr}/upload/{session}?authtoken=opaque"), "expirationDateTime": "2030-01-01T00:00:00Z"})),
    )
        .into_response()
}

async fn put_chunk(
    State(st): State<Arc<GraphState>>,
    Path(session): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    *st.requests.lock().unwrap().entry("upload").or_default() += 1;
    st.largest_request.fetch_max(body.len(), Ordering::SeqCst);
    // Graph: the upload URL is pre-authorized; a bearer token must not be sent.
    if headers.contains_key("authorization") {
        return graph_error(
            400,
            "InvalidRequest",
            "upload URLs take no Authorization header",
        );
    }
    if body.len() > 4 * 1024 * 1024 {
        return (StatusCode::PAYLOAD_TOO_LARGE, "chunk over 4 MiB").into_response();
    }
    let range = headers
        .get("content-range")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let mut uploads = st.uploads.lock().unwrap();
    let Some(u) = uploads.get_mut(&session) else {
        return graph_error(404, "ErrorItemNotFound", "no such upload session");
    };
    let expected = format!(
        "bytes {}-{}/{}",
        u.data.len(),
        u.data.len() + body.len().max(1) - 1,
        u.size
    );
    if range != expected {
        return graph_error(
            400,
            "InvalidRange",
            &format!("want {expected}, got {range}"),
        );
    }
    u.data.extend_from_slice(&body);
    if u.data.len() < u.size {
        return (
            StatusCode::OK,
            axum::Json(serde_json::json!({"nextExpectedRanges": [format!("{}-", u.data.len())]})),
        )
            .into_response();
    }
    let u = uploads.remove(&session).unwrap();
    drop(uploads);
    if let Some(d) = st.drafts.lock().unwrap().get_mut(&u.draft) {
        d.attachments.push((u.name, u.content_type, u.data));
    }
    StatusCode::CREATED.into_response()
}

async fn send_draft(
    State(st): State<Arc<GraphState>>,
    Path((m, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let _call = match enter(&st, &headers, &m, "send", 0).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let Some(d) = st.drafts.lock().unwrap().remove(&id) else {
        return graph_error(
            404,
            "ErrorItemNotFound",
            "The specified object was not found in the store.",
        );
    };
    let r = deliver(&st, &m, d.mime.clone(), d.attachments.clone(), "draft");
    if r.status() != StatusCode::ACCEPTED && r.status() != StatusCode::GATEWAY_TIMEOUT {
        // Not sent: the draft stays, as in Exchange.
        st.drafts.lock().unwrap().insert(id, d);
    }
    r
}

async fn list_folder(
    State(st): State<Arc<GraphState>>,
    Path((m, folder)): Path<(String, String)>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let kind = match folder.to_ascii_lowercase().as_str() {
        "sentitems" => "sentitems",
        "inbox" => "inbox",
        _ => return graph_error(404, "ErrorInvalidIdMalformed", "unknown folder"),
    };
    let _call = match enter(&st, &headers, &m, kind, 0).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let value: Vec<serde_json::Value> = if kind == "inbox" {
        st.inbox.lock().unwrap().clone()
    } else {
        let wanted = q.get("$filter").and_then(|f| {
            f.strip_prefix("internetMessageId eq '")
                .and_then(|r| r.strip_suffix('\''))
                .map(|r| r.replace("''", "'"))
        });
        st.sent
            .lock()
            .unwrap()
            .iter()
            .filter(|s| wanted.as_ref().is_none_or(|w| *w == s.internet_message_id))
            .map(|s| serde_json::json!({"id": format!("sent-{}", s.internet_message_id), "internetMessageId": s.internet_message_id}))
            .collect()
    };
    axum::Json(serde_json::json!({"value": value})).into_response()
}

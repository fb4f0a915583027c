//! JSON API: the queue (list, show, retry, hold, release, delete), accounts (state, pause,
//! resume) and HTTP submission for tools that can only call webhooks.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequest, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Serialize;

use super::auth::{Admin, Reader};
use super::{AppState, Peer, error};
use crate::forward::{Command, ControlError};
use crate::spool::{Area, Client, Meta, id_time, is_queue_id};
use crate::submission::{AddressRole, Source, Submission, parse_address};

/// One message in a listing.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub id: String,
    /// queued | deferred | held | failed | deleted
    pub state: &'static str,
    pub account: String,
    pub received_at: DateTime<Utc>,
    pub mail_from: String,
    pub recipients: Vec<String>,
    pub pending: usize,
    pub attempts: u32,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub last_reply: Option<String>,
    pub size: u64,
    pub subject: Option<String>,
}

fn state_name(area: Area, meta: &Meta) -> &'static str {
    match area {
        Area::Queue if meta.attempts > 0 => "deferred",
        Area::Queue => "queued",
        Area::Hold => "held",
        Area::Failed => "failed",
        Area::Deleted => "deleted",
    }
}

/// The decoded Subject of a spooled message (reads the first 32 KiB only).
pub fn subject_of(path: &std::path::Path) -> Option<String> {
    use std::io::Read;
    let mut head = vec![0u8; 32 * 1024];
    let n = std::fs::File::open(path).ok()?.read(&mut head).ok()?;
    head.truncate(n);
    let parsed = mail_parser::MessageParser::default().parse_headers(&head)?;
    parsed.subject().map(|s| s.to_string())
}

pub fn summarize(spool: &crate::spool::Spool, area: Area, meta: &Meta) -> Summary {
    Summary {
        id: meta.id.clone(),
        state: state_name(area, meta),
        account: meta.account.clone(),
        received_at: meta.received_at,
        mail_from: meta.mail_from.clone(),
        recipients: meta.recipients.iter().map(|r| r.address.clone()).collect(),
        pending: meta.pending().count(),
        attempts: meta.attempts,
        next_attempt_at: meta.next_attempt_at,
        last_reply: meta
            .recipients
            .iter()
            .rev()
            .find_map(|r| r.last_reply.clone()),
        size: meta.size,
        subject: subject_of(&spool.body_in(area, &meta.id)),
    }
}

/// Filters for listings.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    pub account: Option<String>,
    /// queued (includes deferred) | deferred | held | failed | deleted | all
    pub state: Option<String>,
    pub older_than: Option<std::time::Duration>,
    pub offset: usize,
    pub limit: usize,
}

impl Filter {
    pub fn from_query(q: &HashMap<String, String>) -> Result<Filter, String> {
        let older_than = match q.get("older_than") {
            Some(s) => Some(
                humantime::parse_duration(s)
                    .map_err(|e| format!("older_than: {e} (write e.g. \"30m\" or \"2h\")"))?,
            ),
            None => None,
        };
        let num = |k: &str, d: usize| -> Result<usize, String> {
            q.get(k)
                .map(|v| v.parse().map_err(|_| format!("{k} must be a whole number")))
                .unwrap_or(Ok(d))
        };
        let state = q.get("state").cloned();
        if let Some(s) = &state
            && !["queued", "deferred", "held", "failed", "deleted", "all"].contains(&s.as_str())
        {
            return Err(format!(
                "state must be queued, deferred, held, failed, deleted or all, not {s:?}"
            ));
        }
        Ok(Filter {
            account: q.get("account").cloned(),
            state,
            older_than,
            offset: num("offset", 0)?,
            limit: num("limit", 100)?.min(1000),
        })
    }

    fn areas(&self) -> Vec<Area> {
        match self.state.as_deref() {
            Some("held") => vec![Area::Hold],
            Some("failed") => vec![Area::Failed],
            Some("deleted") => vec![Area::Deleted],
            Some("queued") | Some("deferred") => vec![Area::Queue],
            Some("all") => vec![Area::Queue, Area::Hold, Area::Failed, Area::Deleted],
            _ => vec![Area::Queue, Area::Hold, Area::Failed],
        }
    }
}

/// Lists messages matching `filter`, oldest first; returns (total matching, page).
pub fn list(spool: &crate::spool::Spool, filter: &Filter) -> (usize, Vec<Summary>) {
    let now = Utc::now();
    let mut candidates: Vec<(String, Area)> = Vec::new();
    for area in filter.areas() {
        for id in spool.ids(area).unwrap_or_default() {
            if let Some(min) = filter.older_than {
                let old_enough =
                    id_time(&id).is_some_and(|t| (now - t).to_std().is_ok_and(|age| age >= min));
                if !old_enough {
                    continue;
                }
            }
            candidates.push((id, area));
        }
    }
    candidates.sort();
    let needs_meta = filter.account.is_some()
        || filter.state.as_deref() == Some("deferred")
        || filter.state.as_deref() == Some("queued");
    let mut total = 0;
    let mut page = Vec::new();
    for (id, area) in candidates {
        let meta = if needs_meta || (total >= filter.offset && page.len() < filter.limit) {
            match spool.load_in(area, &id) {
                Ok(m) => Some(m),
                Err(_) => continue,
            }
        } else {
            None
        };
        if let Some(m) = &meta {
            if filter.account.as_ref().is_some_and(|a| a != &m.account) {
                continue;
            }
            match filter.state.as_deref() {
                Some("deferred") if m.attempts == 0 => continue,
                Some("queued") if m.attempts > 0 => continue,
                _ => {}
            }
        }
        if total >= filter.offset
            && page.len() < filter.limit
            && let Some(m) = &meta
        {
            page.push(summarize(spool, area, m));
        }
        total += 1;
    }
    (total, page)
}

pub async fn queue_list(
    State(state): State<Arc<AppState>>,
    _: Reader,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let filter = match Filter::from_query(&q) {
        Ok(f) => f,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let spool = state.spool.clone();
    let f = filter.clone();
    let (total, messages) = tokio::task::spawn_blocking(move || list(&spool, &f))
        .await
        .unwrap_or_default();
    axum::Json(serde_json::json!({ "total": total, "offset": filter.offset, "limit": filter.limit, "messages": messages })).into_response()
}

pub async fn queue_show(
    State(state): State<Arc<AppState>>,
    reader: Reader,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let want_body = q.get("body").is_some_and(|v| v == "true" || v == "1");
    if want_body && !reader.may_read_bodies(&state) {
        return super::Refusal {
            status: StatusCode::UNAUTHORIZED,
            message: "message bodies need the admin token: Authorization: Bearer <token from [http] admin_token_file>".into(),
        }
        .into_response();
    }
    let Some(area) = state.spool.locate(&id) else {
        return error(
            StatusCode::NOT_FOUND,
            format!(
                "no message with queue ID {:?}",
                id.chars().take(40).collect::<String>()
            ),
        );
    };
    let meta = match state.spool.load_in(area, &id) {
        Ok(m) => m,
        Err(e) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot read the message: {e}"),
            );
        }
    };
    let summary = summarize(&state.spool, area, &meta);
    let mut body = serde_json::json!({
        "id": meta.id,
        "state": summary.state,
        "account": meta.account,
        "received_at": meta.received_at,
        "mail_from": meta.mail_from,
        "recipients": meta.recipients,
        "client": meta.client,
        "size": meta.size,
        "attempts": meta.attempts,
        "next_attempt_at": meta.next_attempt_at,
        "subject": summary.subject,
        "eight_bit": meta.eight_bit,
        "smtputf8": meta.smtputf8,
    });
    if want_body {
        match std::fs::read(state.spool.body_in(area, &id)) {
            Ok(b) => {
                body["body"] = serde_json::Value::String(String::from_utf8_lossy(&b).into_owned())
            }
            Err(e) => {
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("cannot read the body: {e}"),
                );
            }
        }
    }
    axum::Json(body).into_response()
}

fn control_response(r: Result<String, ControlError>) -> Response {
    match r {
        Ok(msg) => axum::Json(serde_json::json!({ "ok": true, "result": msg })).into_response(),
        Err(ControlError::NotFound) => error(StatusCode::NOT_FOUND, "no such message or account"),
        Err(ControlError::Conflict(m)) => error(StatusCode::CONFLICT, m),
        Err(e @ ControlError::Stopped) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(e @ ControlError::Io(_)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Maps an action name to a command; `None` for unknown actions.
pub fn queue_command(action: &str, id: String) -> Option<Command> {
    Some(match action {
        "retry" => Command::Retry(id),
        "hold" => Command::Hold(id),
        "release" => Command::Release(id),
        "delete" => Command::Delete(id),
        _ => return None,
    })
}

pub fn account_command(action: &str, name: String) -> Option<Command> {
    Some(match action {
        "pause" => Command::PauseAccount(name),
        "resume" => Command::ResumeAccount(name),
        _ => return None,
    })
}

pub async fn queue_action(
    State(state): State<Arc<AppState>>,
    _: Admin,
    Path((id, action)): Path<(String, String)>,
) -> Response {
    if !is_queue_id(&id) {
        return error(StatusCode::NOT_FOUND, "not a queue ID");
    }
    match queue_command(&action, id) {
        Some(cmd) => control_response(state.control.send(cmd).await),
        None => error(
            StatusCode::NOT_FOUND,
            "unknown action; use retry, hold, release or delete",
        ),
    }
}

pub async fn queue_delete(
    State(state): State<Arc<AppState>>,
    _: Admin,
    Path(id): Path<String>,
) -> Response {
    if !is_queue_id(&id) {
        return error(StatusCode::NOT_FOUND, "not a queue ID");
    }
    control_response(state.control.send(Command::Delete(id)).await)
}

/// `POST /api/v1/reload`: re-reads the config file (as SIGHUP does). `200 {"reloaded": true,
/// "changes": [...]}`; `400 {"error"}` for an invalid file, `409 {"error"}` for a change that
/// needs a restart or could not be prepared (a port in use); the old config stays in both.
pub async fn reload(State(state): State<Arc<AppState>>, _: Admin) -> Response {
    use crate::reload::ReloadError;
    let Some(reloader) = state.reloader.clone() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "this relay cannot reload its configuration",
        );
    };
    match reloader.reload().await {
        Ok(r) => axum::Json(serde_json::json!({ "reloaded": true, "changes": r.changes }))
            .into_response(),
        Err(e @ ReloadError::Invalid(_)) => error(StatusCode::BAD_REQUEST, e.to_string()),
        Err(e @ ReloadError::Stopped) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(e) => error(StatusCode::CONFLICT, e.to_string()),
    }
}

/// One account as the API shows it.
pub fn account_views(state: &AppState) -> Vec<serde_json::Value> {
    state
        .config()
        .accounts
        .iter()
        .map(|a| {
            let st = state.status.get(&a.name);
            let label = crate::metrics::Metrics::account(&a.name);
            let expiry = state.metrics.token_expiry.get_or_create(&label).get();
            let mut v = serde_json::json!({
                "name": a.name,
                "kind": a.kind.name(),
                "mailbox": a.mailbox,
                "token_expires_at": (expiry > 0).then(|| DateTime::<Utc>::from_timestamp(expiry, 0)).flatten(),
            });
            if let Some(st) = st
                && let (Some(obj), Ok(serde_json::Value::Object(more))) = (v.as_object_mut(), serde_json::to_value(&st))
            {
                obj.extend(more);
            }
            // A delegated account: who signed in and when (from its token file; never the token).
            if a.auth == crate::config::AccountAuth::Delegated
                && let Some(obj) = v.as_object_mut()
            {
                let grant = crate::oauth::store::TokenStore::new(&a.token_file).load().ok().flatten();
                obj.insert(
                    "sign_in".into(),
                    grant.map_or(serde_json::Value::Null, |g| {
                        serde_json::json!({"user": g.user, "at": g.obtained_at})
                    }),
                );
            }
            v
        })
        .collect()
}

pub async fn accounts(State(state): State<Arc<AppState>>, _: Reader) -> Response {
    axum::Json(serde_json::json!({ "accounts": account_views(&state) })).into_response()
}

pub async fn account_action(
    State(state): State<Arc<AppState>>,
    _: Admin,
    Path((name, action)): Path<(String, String)>,
) -> Response {
    match account_command(&action, name) {
        Some(cmd) => control_response(state.control.send(cmd).await),
        None => error(StatusCode::NOT_FOUND, "unknown action; use pause or resume"),
    }
}

// ---------- HTTP submission ----------

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonMessage {
    from: String,
    to: OneOrMany,
    subject: String,
    text: String,
    account: Option<String>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// Recipients as given (repeated and/or comma-separated), each checked by the same rule as an
/// SMTP `RCPT TO`.
fn split_addresses(values: &[String]) -> Result<Vec<String>, String> {
    values
        .iter()
        .flat_map(|v| v.split(','))
        .filter(|a| !a.trim().is_empty())
        .map(|a| {
            parse_address(a, AddressRole::Recipient).map_err(|e| format!("recipient {a:?}: {e}"))
        })
        .collect()
}

fn build_json_message(m: &JsonMessage, rcpts: &[String]) -> Result<Vec<u8>, String> {
    use lettre::message::{Mailbox, header::ContentType};
    let from: Mailbox = m.from.parse().map_err(|e| format!("from: {e}"))?;
    let mut b = lettre::Message::builder()
        .from(from)
        .subject(m.subject.clone());
    for r in rcpts {
        b = b.to(r.parse::<Mailbox>().map_err(|e| format!("to {r:?}: {e}"))?);
    }
    let msg = b
        .header(ContentType::TEXT_PLAIN)
        .body(m.text.clone())
        .map_err(|e| e.to_string())?;
    Ok(msg.formatted())
}

/// The body of a submission, read only after the caller was authorised (extractors before it
/// run first) and only when its type is one a browser cannot send cross-site without CORS:
/// `message/rfc822` or `application/json` (anything else, or none, is `415`). At most
/// `max_message_size` plus 64 KB (for JSON framing) is read; more is `413`, decided from
/// `Content-Length` before reading where the client sends one.
pub struct SubmissionBody(pub axum::body::Bytes);

impl FromRequest<Arc<AppState>> for SubmissionBody {
    type Rejection = Response;

    async fn from_request(req: Request, state: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        let ctype = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        let essence = ctype.split(';').next().unwrap_or("").trim();
        if essence != "message/rfc822" && essence != "application/json" {
            return Err(error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "send message/rfc822 (a raw message) or application/json",
            ));
        }
        let max = state.config().relay.max_message_size;
        let limit = max as usize + 64 * 1024;
        let too_large = || {
            error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("message exceeds max_message_size ({max} bytes)"),
            )
        };
        let announced = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if announced.is_some_and(|n| n > limit as u64) {
            return Err(too_large());
        }
        use http_body_util::BodyExt;
        match http_body_util::Limited::new(req.into_body(), limit)
            .collect()
            .await
        {
            Ok(b) => Ok(SubmissionBody(b.to_bytes())),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
            Err(e) => Err(error(
                StatusCode::BAD_REQUEST,
                format!("cannot read the request body: {e}"),
            )),
        }
    }
}

/// `POST /api/v1/messages`: a raw message (`message/rfc822`, envelope from `from`/`to` query
/// parameters or `X-Envelope-From`/`X-Envelope-To` headers) or JSON `{from, to, subject, text}`.
/// Answers 202 with the queue ID once the message is durably in the spool.
pub async fn submit(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    _: Admin,
    headers: HeaderMap,
    Query(q): Query<Vec<(String, String)>>,
    SubmissionBody(body): SubmissionBody,
) -> Response {
    let config = state.config();
    let max = config.relay.max_message_size;
    if body.len() as u64 > max {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("message exceeds max_message_size ({max} bytes)"),
        );
    }
    let ctype = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let query = |k: &str| {
        q.iter()
            .filter(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .collect::<Vec<_>>()
    };
    let header_values = |k: &str| {
        headers
            .get_all(k)
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_string))
            .collect::<Vec<_>>()
    };

    let (mail_from, rcpts, message, account) = if ctype.starts_with("application/json") {
        let m: JsonMessage = match serde_json::from_slice(&body) {
            Ok(m) => m,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("JSON body: {e}; expected {{\"from\", \"to\", \"subject\", \"text\"}}"),
                );
            }
        };
        let rcpts = match &m.to {
            OneOrMany::One(s) => split_addresses(std::slice::from_ref(s)),
            OneOrMany::Many(v) => split_addresses(v),
        };
        let rcpts = match rcpts {
            Ok(r) => r,
            Err(e) => return error(StatusCode::BAD_REQUEST, e),
        };
        let from = match parse_address(&m.from, AddressRole::Sender) {
            Ok(f) => f,
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("from {:?}: {e}", m.from)),
        };
        let built = match build_json_message(&m, &rcpts) {
            Ok(b) => b,
            Err(e) => return error(StatusCode::BAD_REQUEST, e),
        };
        (from, rcpts, built, m.account.clone())
    } else if ctype.starts_with("message/rfc822") {
        let from = query("from")
            .into_iter()
            .chain(header_values("x-envelope-from"))
            .next();
        let rcpts = split_addresses(
            &query("to")
                .into_iter()
                .chain(header_values("x-envelope-to"))
                .collect::<Vec<_>>(),
        );
        let rcpts = match rcpts {
            Ok(r) => r,
            Err(e) => return error(StatusCode::BAD_REQUEST, e),
        };
        let Some(from) = from else {
            return error(
                StatusCode::BAD_REQUEST,
                "the envelope sender is missing: add ?from=ADDR or an X-Envelope-From header",
            );
        };
        let from = match parse_address(&from, AddressRole::Sender) {
            Ok(f) => f,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("envelope sender {from:?}: {e}"),
                );
            }
        };
        (
            from,
            rcpts,
            body.to_vec(),
            query("account").into_iter().next(),
        )
    } else {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send message/rfc822 (a raw message) or application/json",
        );
    };
    if rcpts.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "no recipients: add ?to=ADDR (repeatable) or X-Envelope-To, or \"to\" in JSON",
        );
    }
    if rcpts.len() > config.relay.max_recipients {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "too many recipients (at most {})",
                config.relay.max_recipients
            ),
        );
    }
    let account = match account {
        Some(a) if config.accounts.iter().any(|x| x.name == a) => a,
        Some(a) => return error(StatusCode::BAD_REQUEST, format!("unknown account {a:?}")),
        None => config.accounts[0].name.clone(),
    };
    let n_rcpts = rcpts.len();
    let submission = Submission {
        source: Source::Http,
        client: Client {
            ip: peer.0.ip(),
            helo: "http".into(),
            login: Some("http-api".into()),
            tls: config.http.tls.is_some(),
        },
        mail_from: mail_from.clone(),
        recipients: rcpts,
        eight_bit: false,
        smtputf8: false,
    };
    let written = submission
        .enqueue(&state.spool, &config.hostname, &account, &message)
        .await;
    match written {
        Ok(id) => {
            tracing::info!(queue_id = %id, from = %mail_from.escape_debug(), recipients = n_rcpts, client = %peer.0, "message queued via HTTP");
            (
                StatusCode::ACCEPTED,
                axum::Json(serde_json::json!({ "queue_id": id })),
            )
                .into_response()
        }
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cannot queue the message: {e}; try again later"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_split() {
        assert_eq!(
            split_addresses(&["a@x, <b@y>".into(), "Boss <c@z>".into()]),
            Ok(vec!["a@x".to_string(), "b@y".into(), "c@z".into()])
        );
        assert!(split_addresses(&["a@x\r\nBcc: evil@y".into()]).is_err());
        assert!(split_addresses(&["nodomain".into()]).is_err());
    }
}

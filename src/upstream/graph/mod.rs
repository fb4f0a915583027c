//! The `graph` account kind: sending through Microsoft Graph, for tenants that turned SMTP AUTH
//! off. App-only access (client credentials, secret or certificate, the same [`TokenManager`])
//! for `<graph root>/.default`; the app needs `Mail.Send` and `Mail.ReadWrite` (drafts and the
//! Sent Items check below).
//!
//! Contract of one attempt:
//! - The message goes out as MIME, base64-encoded and streamed from the spool
//!   ([`mime::Mime::base64_body`]): at most a few hundred KiB of it in memory per request.
//! - Graph takes the recipients from the headers, so envelope recipients that no `To:`/`Cc:`/
//!   `Bcc:` names are added as `Bcc:` ([`mime::add_bcc`]); with `rewrite_from = "always"` the
//!   sender policy of the SMTP kind applies to `From:` first. Graph has no envelope: an address
//!   in `To:`/`Cc:` that was not an envelope recipient receives the message too.
//! - Up to [`SENDMAIL_LIMIT`] bytes of base64 (about 3 MB of MIME): one
//!   `POST /v1.0/users/{mailbox}/sendMail`, byte-exact (Exchange sends the MIME "more or less
//!   intact"). Larger: a draft from the MIME without its largest base64 attachments, each of
//!   those uploaded through an upload session in chunks of [`UPLOAD_CHUNK`] (≤ 4 MiB, decoded
//!   as read), then `POST …/messages/{id}/send`. Exchange rebuilds a draft's MIME, so on this
//!   path the headers Exchange regenerates and the uploaded attachments' MIME framing
//!   (boundaries, transfer encoding, inline `Content-ID` placement) are not byte-exact; the
//!   attachments' bytes, the text parts and the other headers are.
//! - Every answer is classified by the one table ([`classify::classify_graph`], Graph rows of
//!   `SIGNATURES`), on Graph's error `code`s (nested `innerError` included), never the message.
//!   A 401 gets one fresh token and one retry. 429/503/504 throttle the account for
//!   `Retry-After` and count as no failure.
//! - No duplicates after an ambiguous outcome. A timeout, dropped connection or 5xx after a
//!   send request went out may mean the mail left. Graph has no idempotency key, so before any
//!   send of a message that was tried before (attempts or a last reply in its spool meta, or an
//!   ambiguous outcome in this process) the relay looks for its `Message-ID` (every spooled
//!   message has one; submission adds it) among Sent Items by `internetMessageId`; found means
//!   delivered. If the look-up itself fails, nothing is sent and the attempt is temporary. This
//!   was chosen over keeping a draft id in the spool meta: it needs no change to the spool's
//!   format, survives restarts the same way, and covers `sendMail` and drafts alike. Its limit:
//!   a message still in transport (not yet in Sent Items) when the retry looks would be sent
//!   again; retries come after backoff (minutes), far longer than that.
//! - Concurrency: the forwarder runs at most `max_connections` (1 to 4, validated: Graph's
//!   limit of 4 concurrent requests per mailbox) deliveries, each one request at a time; the
//!   pacing knobs of the SMTP kind apply as they do there.

pub mod mime;
pub mod split;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::Url;
use serde_json::Value;
use tracing::{debug, info, warn};

use super::exchange::classify::{self, Class, Ctx};
use super::exchange::pacer::Pacer;
use super::exchange::policy;
use super::{AccountSignal, Attempt, BoxFuture, Job, Outcome, Upstream};
use crate::advice::Advice;
use crate::config::{AccountConfig, RewriteFrom};
use crate::oauth::TokenManager;
use mime::{Mime, Spooled};

/// Base64 bytes one request may carry (Graph's limit is about 4 MB per request).
pub const SENDMAIL_LIMIT: u64 = 4_000_000;
/// Bytes per upload-session `PUT`: 12 × 320 KiB, under Graph's 4 MiB.
pub const UPLOAD_CHUNK: usize = 12 * 320 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest `Retry-After` honoured as such; longer ones are capped.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

/// Why a request did not succeed.
#[derive(Debug)]
pub struct Failure {
    pub class: Class,
    pub text: String,
    /// The request may have taken effect (the mail may have gone out).
    pub ambiguous: bool,
    /// Graph or Entra was not reached at all.
    pub unreachable: bool,
    /// The HTTP status, when Graph answered.
    pub status: Option<u16>,
}

impl Failure {
    fn temporary(text: String) -> Failure {
        Failure {
            class: Class::Temporary,
            text,
            ambiguous: false,
            unreachable: false,
            status: None,
        }
    }
}

/// Graph's error codes, outermost first (`error.code`, then each nested `innerError.code`).
pub fn error_codes(body: &Value) -> Vec<String> {
    let mut codes = Vec::new();
    let mut at = body.get("error");
    while let Some(e) = at {
        if let Some(c) = e.get("code").and_then(Value::as_str) {
            codes.push(c.to_string());
        }
        at = e.get("innerError").or_else(|| e.get("innererror"));
    }
    codes
}

pub struct Graph {
    account: String,
    mailbox: String,
    client_id: String,
    root: String,
    hostname: String,
    http: reqwest::Client,
    tokens: Arc<TokenManager>,
    rewrite_from: RewriteFrom,
    pacer: Pacer,
    /// Queue IDs whose last send ended ambiguously in this process.
    ambiguous: Mutex<HashSet<String>>,
}

/// What a send needs besides the message.
struct Prepared {
    spooled: Spooled,
    head: Vec<u8>,
    message_id: Option<String>,
}

impl Graph {
    pub fn new(
        a: &AccountConfig,
        hostname: &str,
        tokens: Arc<TokenManager>,
    ) -> Result<Graph, String> {
        let root = a.graph_root().to_string();
        Url::parse(&root).map_err(|e| format!("graph_url {root:?}: {e}"))?;
        Ok(Graph {
            account: a.name.clone(),
            mailbox: a.mailbox.clone().unwrap_or_default(),
            client_id: a.client_id.clone().unwrap_or_default(),
            root,
            hostname: hostname.to_string(),
            http: crate::oauth::http_client(a.ca_file.as_deref())?,
            tokens,
            rewrite_from: a.rewrite_from,
            pacer: Pacer::new(
                a.max_messages_per_minute,
                a.rate_window,
                a.max_recipients_per_day,
            ),
            ambiguous: Mutex::new(HashSet::new()),
        })
    }

    pub fn tokens(&self) -> &Arc<TokenManager> {
        &self.tokens
    }

    fn ctx(&self) -> Ctx<'_> {
        Ctx {
            mailbox: &self.mailbox,
            client_id: &self.client_id,
            rewrite_from: self.rewrite_from,
        }
    }

    /// `<root>/v1.0/users/<mailbox>/<path...>`, each segment escaped.
    pub fn url(&self, path: &[&str]) -> Result<Url, Failure> {
        let mut u =
            Url::parse(&self.root).map_err(|e| Failure::temporary(format!("graph_url: {e}")))?;
        u.path_segments_mut()
            .map_err(|_| Failure::temporary("graph_url cannot take a path".into()))?
            .pop_if_empty()
            .extend(["v1.0", "users", self.mailbox.as_str()])
            .extend(path);
        Ok(u)
    }

    /// One Graph request with a bearer token: `build` makes it (again after a refused token).
    /// `sends`: the request may send mail, so a failure after it went out is ambiguous.
    pub async fn call(
        &self,
        sends: bool,
        build: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, Failure> {
        let mut refreshed = false;
        loop {
            let token = match self.tokens.token().await {
                Ok(t) => t,
                Err(e) => {
                    return Err(Failure {
                        unreachable: !e.config,
                        class: if e.config {
                            Class::Config(e.advice)
                        } else {
                            Class::Temporary
                        },
                        text: e.error,
                        ambiguous: false,
                        status: None,
                    });
                }
            };
            let sent = build(&self.http).bearer_auth(token.secret()).send().await;
            let resp = match sent {
                Ok(r) => r,
                Err(e) => {
                    let connect = e.is_connect();
                    return Err(Failure {
                        class: Class::Temporary,
                        text: format!("Graph request failed: {}", without_url(&e)),
                        ambiguous: sends && !connect,
                        unreachable: connect,
                        status: None,
                    });
                }
            };
            if resp.status().is_success() {
                return Ok(resp);
            }
            let f = self.failure(resp, sends).await;
            match f.class {
                Class::TokenRefused(_) if !refreshed => {
                    info!(account = %self.account, reply = %f.text, "Graph refused the access token; refreshing it and retrying once");
                    self.tokens.invalidate(&token).await;
                    refreshed = true;
                }
                Class::TokenRefused(advice) => {
                    return Err(Failure {
                        class: Class::Config(advice),
                        ..f
                    });
                }
                _ => return Err(f),
            }
        }
    }

    /// Classifies an unsuccessful answer.
    async fn failure(&self, resp: reqwest::Response, sends: bool) -> Failure {
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|s| Duration::from_secs(s).min(MAX_RETRY_AFTER));
        let www = resp
            .headers()
            .get(reqwest::header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                // Only the error name: the header also carries the authority and resource.
                v.split(',')
                    .map(|p| p.trim().trim_start_matches("Bearer").trim())
                    .find(|p| p.starts_with("error="))
                    .map(str::to_string)
            });
        let body: Value = resp
            .bytes()
            .await
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null);
        let mut codes = error_codes(&body);
        if codes.is_empty() && status == 413 {
            codes.push("RequestEntityTooLarge".into());
        }
        let mut shown = format!("{status} {}", codes.join("/"));
        if let Some(w) = www {
            shown.push_str(&format!(" ({w})"));
        }
        let class = classify::classify_graph(status, &codes, &shown, retry_after, &self.ctx());
        Failure {
            class,
            text: format!("Graph {}", shown.trim_end()),
            ambiguous: sends && status >= 500,
            unreachable: false,
            status: Some(status),
        }
    }

    /// Whether a message with `internet_message_id` is already among Sent Items.
    pub async fn in_sent_items(&self, internet_message_id: &str) -> Result<bool, Failure> {
        let mut url = self.url(&["mailFolders", "sentitems", "messages"])?;
        url.query_pairs_mut()
            .append_pair(
                "$filter",
                &format!(
                    "internetMessageId eq '{}'",
                    internet_message_id.replace('\'', "''")
                ),
            )
            .append_pair("$select", "id");
        let resp = self
            .call(false, |c| c.get(url.clone()).timeout(REQUEST_TIMEOUT))
            .await?;
        let body: Value = resp
            .json()
            .await
            .map_err(|e| Failure::temporary(format!("Sent Items listing: {}", without_url(&e))))?;
        Ok(body
            .get("value")
            .and_then(Value::as_array)
            .is_some_and(|v| !v.is_empty()))
    }

    /// For `doctor`: lists one message of Sent Items. On a refusal: the advice (when it is an
    /// account problem) and the answer.
    pub async fn probe_mailbox(&self) -> Result<(), (Option<Advice>, String)> {
        let describe = |f: Failure| match f.class {
            Class::Config(a)
            | Class::TokenRefused(a)
            | Class::SenderDenied(a)
            | Class::Permanent(Some(a)) => (Some(a), f.text),
            _ => (None, f.text),
        };
        let mut url = self
            .url(&["mailFolders", "sentitems", "messages"])
            .map_err(describe)?;
        url.query_pairs_mut()
            .append_pair("$top", "1")
            .append_pair("$select", "id");
        self.call(false, |c| c.get(url.clone()).timeout(REQUEST_TIMEOUT))
            .await
            .map(|_| ())
            .map_err(describe)
    }

    fn timeout_for(bytes: u64) -> Duration {
        REQUEST_TIMEOUT + Duration::from_secs(bytes / 100_000)
    }

    async fn send_mail(&self, mime: &Mime) -> Result<(), Failure> {
        let url = self.url(&["sendMail"])?;
        let len = mime.base64_len();
        self.call(true, |c| {
            c.post(url.clone())
                .header(reqwest::header::CONTENT_TYPE, "text/plain")
                .header(reqwest::header::CONTENT_LENGTH, len)
                .timeout(Self::timeout_for(len))
                .body(mime.base64_body())
        })
        .await
        .map(|_| ())
    }

    /// Large messages: draft without the big attachments, upload sessions, send.
    async fn send_large(&self, p: &Prepared) -> Result<(), Failure> {
        let too_large = |why: &str| Failure {
            class: Class::Permanent(Some(Advice::new(
                format!("The message is too large for one Graph request and {why}."),
                "Send it through an account of kind = \"exchange\", or have the device send smaller files.",
            ))),
            text: format!("message too large for Graph: {why}"),
            ambiguous: false,
            unreachable: false,
            status: None,
        };
        let Some(boundary) = split::boundary(&p.head) else {
            return Err(too_large("it has no attachments to upload separately"));
        };
        let (path, from) = (p.spooled.path.clone(), p.spooled.rest.0);
        let parts = tokio::task::spawn_blocking(move || split::scan(&path, from, &boundary))
            .await
            .map_err(|e| Failure::temporary(format!("scanning the message: {e}")))?
            .map_err(|e| Failure::temporary(format!("cannot read the spooled message: {e}")))?;
        let mut candidates: Vec<&split::Part> =
            parts.iter().filter(|p| p.decoded_size.is_some()).collect();
        candidates.sort_by_key(|p| std::cmp::Reverse(p.raw_len()));
        let mut uploads: Vec<&split::Part> = Vec::new();
        let draft_of = |uploads: &[&split::Part]| {
            let mut ranges = Vec::new();
            let mut at = p.spooled.rest.0;
            let mut removed: Vec<&&split::Part> = uploads.iter().collect();
            removed.sort_by_key(|u| u.start);
            for u in removed {
                ranges.push((at, u.start));
                at = u.end;
            }
            ranges.push((at, p.spooled.rest.1));
            Mime::new(&p.spooled.path, p.head.clone(), &ranges)
        };
        let mut draft = draft_of(&uploads);
        for c in candidates {
            if draft.base64_len() <= SENDMAIL_LIMIT {
                break;
            }
            uploads.push(c);
            draft = draft_of(&uploads);
        }
        if draft.base64_len() > SENDMAIL_LIMIT {
            return Err(too_large(
                "its text and small parts alone exceed Graph's request limit",
            ));
        }
        let id = self.create_draft(&draft).await?;
        let result = async {
            for part in &uploads {
                self.upload(&id, &p.spooled.path, part).await?;
            }
            let url = self.url(&["messages", &id, "send"])?;
            self.call(true, |c| {
                c.post(url.clone())
                    .header(reqwest::header::CONTENT_LENGTH, 0)
                    .timeout(REQUEST_TIMEOUT)
            })
            .await
            .map(|_| ())
        }
        .await;
        if let Err(f) = &result
            && !f.ambiguous
        {
            // Leave no stray draft behind; the next attempt makes a new one.
            if let Ok(url) = self.url(&["messages", &id]) {
                let _ = self
                    .call(false, |c| c.delete(url.clone()).timeout(REQUEST_TIMEOUT))
                    .await;
            }
        }
        result
    }

    async fn create_draft(&self, draft: &Mime) -> Result<String, Failure> {
        let url = self.url(&["messages"])?;
        let len = draft.base64_len();
        let resp = self
            .call(false, |c| {
                c.post(url.clone())
                    .header(reqwest::header::CONTENT_TYPE, "text/plain")
                    .header(reqwest::header::CONTENT_LENGTH, len)
                    .timeout(Self::timeout_for(len))
                    .body(draft.base64_body())
            })
            .await?;
        let body: Value = resp
            .json()
            .await
            .map_err(|e| Failure::temporary(format!("draft: {}", without_url(&e))))?;
        body.get("id")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| Failure::temporary("Graph created a draft without an id".into()))
    }

    /// Uploads one attachment through an upload session, decoding it from the spool as it goes.
    async fn upload(
        &self,
        draft: &str,
        path: &std::path::Path,
        part: &split::Part,
    ) -> Result<(), Failure> {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        let size = part.decoded_size.unwrap_or(0);
        let url = self.url(&["messages", draft, "attachments", "createUploadSession"])?;
        let request = serde_json::json!({"AttachmentItem": {
            "attachmentType": "file", "name": part.name, "size": size, "contentType": part.content_type,
        }});
        let resp = self
            .call(false, |c| {
                c.post(url.clone()).json(&request).timeout(REQUEST_TIMEOUT)
            })
            .await?;
        let session: Value = resp
            .json()
            .await
            .map_err(|e| Failure::temporary(format!("upload session: {}", without_url(&e))))?;
        let upload_url = session
            .get("uploadUrl")
            .and_then(Value::as_str)
            .and_then(|u| Url::parse(u).ok())
            .ok_or_else(|| Failure::temporary("Graph gave no usable uploadUrl".into()))?;
        let read_err =
            |e: std::io::Error| Failure::temporary(format!("cannot read the spooled message: {e}"));
        let mut file = tokio::fs::File::open(path).await.map_err(read_err)?;
        file.seek(std::io::SeekFrom::Start(part.body_start))
            .await
            .map_err(read_err)?;
        let mut left = part.end - part.body_start;
        let mut decoder = split::Decoder::default();
        let mut pending: Vec<u8> = Vec::with_capacity(UPLOAD_CHUNK + 64 * 1024);
        let mut buf = vec![0u8; 64 * 1024];
        let mut offset: u64 = 0;
        loop {
            while pending.len() < UPLOAD_CHUNK && left > 0 {
                let want = (buf.len() as u64).min(left) as usize;
                file.read_exact(&mut buf[..want]).await.map_err(read_err)?;
                left -= want as u64;
                decoder
                    .feed(&buf[..want], &mut pending)
                    .map_err(|e| Failure::temporary(format!("attachment {}: {e}", part.name)))?;
            }
            if pending.is_empty() {
                break;
            }
            // The chunk leaves as it is; only the decoded overhang (under 48 KiB) is copied.
            let rest = pending.split_off(pending.len().min(UPLOAD_CHUNK));
            let chunk = std::mem::replace(&mut pending, rest);
            pending.reserve(UPLOAD_CHUNK);
            let end = offset + chunk.len() as u64;
            if end > size {
                return Err(Failure::temporary(format!(
                    "attachment {} decodes to more than its {size} bytes",
                    part.name
                )));
            }
            // The upload URL carries its own authorization: no bearer token (Graph's rule).
            let resp = self
                .http
                .put(upload_url.clone())
                .header(
                    reqwest::header::CONTENT_RANGE,
                    format!("bytes {offset}-{}/{size}", end - 1),
                )
                .header(reqwest::header::CONTENT_LENGTH, chunk.len())
                .timeout(Self::timeout_for(chunk.len() as u64))
                .body(chunk)
                .send()
                .await
                .map_err(|e| Failure::temporary(format!("upload: {}", without_url(&e))))?;
            if !resp.status().is_success() {
                return Err(self.failure(resp, false).await);
            }
            offset = end;
        }
        if offset != size || !decoder.finished() {
            return Err(Failure::temporary(format!(
                "attachment {} decoded to {offset} of {size} bytes",
                part.name
            )));
        }
        Ok(())
    }

    fn prepare(&self, job: &Job<'_>) -> std::io::Result<Prepared> {
        let spooled = Spooled::load(&job.body)?;
        let mut head = spooled.head.clone();
        if self.rewrite_from == RewriteFrom::Always && !head.is_empty() {
            let (bytes, report) =
                policy::rewrite(&head, &self.mailbox, &self.hostname, &job.meta.id);
            if report.original_from.is_some() || !report.added.is_empty() {
                debug!(queue_id = %job.meta.id, original_from = ?report.original_from, added = ?report.added, "sender rewritten for Graph");
            }
            head = bytes;
        }
        if !head.is_empty() {
            let (bytes, added) = mime::add_bcc(&head, &job.recipients);
            if !added.is_empty() {
                debug!(queue_id = %job.meta.id, bcc = ?added, "envelope-only recipients added as Bcc for Graph");
            }
            head = bytes;
        }
        let message_id = mime::message_id(&head);
        Ok(Prepared {
            spooled,
            head,
            message_id,
        })
    }

    fn tried_before(&self, job: &Job<'_>) -> bool {
        job.meta.attempts > 0
            || job.meta.recipients.iter().any(|r| r.last_reply.is_some())
            || self
                .ambiguous
                .lock()
                .is_ok_and(|s| s.contains(&job.meta.id))
    }

    /// One send of the prepared message: sendMail when it fits, else the draft path.
    async fn send(&self, p: &Prepared) -> Result<(), Failure> {
        let mime = Mime::new(&p.spooled.path, p.head.clone(), &[p.spooled.rest]);
        if mime.base64_len() <= SENDMAIL_LIMIT {
            match self.send_mail(&mime).await {
                Err(f) if f.status == Some(413) => {
                    debug!(account = %self.account, "sendMail refused the size; sending through a draft");
                }
                other => return other,
            }
        }
        self.send_large(p).await
    }

    async fn deliver_job(&self, job: &Job<'_>) -> Attempt {
        let n = job.recipients.len();
        let prepared = match self.prepare(job) {
            Ok(p) => p,
            Err(e) => {
                return Attempt::all(
                    n,
                    Outcome::Temporary(format!("cannot read the spooled message: {e}")),
                );
            }
        };
        if self.tried_before(job)
            && let Some(id) = &prepared.message_id
        {
            match self.in_sent_items(id).await {
                Ok(true) => {
                    info!(account = %self.account, queue_id = %job.meta.id, message_id = %id, "already in Sent Items after an earlier attempt; not sending again");
                    self.forget_ambiguous(&job.meta.id);
                    return Attempt::all(
                        n,
                        Outcome::Delivered(format!(
                            "found in Sent Items as {id} (sent by an earlier attempt)"
                        )),
                    );
                }
                Ok(false) => {}
                Err(f) => {
                    let f = Failure {
                        text: format!("checking Sent Items before a resend: {}", f.text),
                        ..f
                    };
                    return self.attempt_from(f, n);
                }
            }
        }
        let slot = match self.pacer.acquire(n).await {
            Ok(s) => s,
            Err(wait) => {
                return Attempt {
                    outcomes: vec![Outcome::NotAttempted("recipient budget used up".into()); n],
                    signal: Some(AccountSignal::QuotaHold {
                        wait,
                        reason: "the mailbox's 24-hour recipient budget (max_recipients_per_day) is used up".into(),
                    }),
                    unreachable: None,
                };
            }
        };
        let result = self.send(&prepared).await;
        match result {
            Ok(()) => {
                self.pacer.finish(slot, true, n).await;
                self.forget_ambiguous(&job.meta.id);
                Attempt::all(
                    n,
                    Outcome::Delivered("202 Accepted by Microsoft Graph".into()),
                )
            }
            Err(f) => {
                self.pacer.finish(slot, f.ambiguous, 0).await;
                if f.ambiguous
                    && let Ok(mut s) = self.ambiguous.lock()
                {
                    s.insert(job.meta.id.clone());
                }
                let attempt = self.attempt_from(f, n);
                if let Some(s) = &attempt.signal {
                    warn!(account = %self.account, queue_id = %job.meta.id, signal = ?s, "account-level condition from Graph");
                }
                attempt
            }
        }
    }

    fn forget_ambiguous(&self, id: &str) {
        if let Ok(mut s) = self.ambiguous.lock() {
            s.remove(id);
        }
    }

    fn attempt_from(&self, f: Failure, n: usize) -> Attempt {
        let text = f.text;
        let (outcome, signal) = match f.class {
            Class::Temporary => (Outcome::Temporary(text.clone()), None),
            Class::Permanent(None) => (Outcome::Permanent(text.clone()), None),
            Class::Permanent(Some(a)) => (
                Outcome::Permanent(format!("{text} ({} Fix: {})", a.cause, a.fix)),
                None,
            ),
            Class::Throttled(wait) => (
                Outcome::NotAttempted(text.clone()),
                Some(AccountSignal::Throttled {
                    wait,
                    reason: text.clone(),
                }),
            ),
            Class::Config(a) | Class::TokenRefused(a) => (
                Outcome::NotAttempted(text.clone()),
                Some(AccountSignal::Paused(a)),
            ),
            Class::SenderDenied(a) => (
                Outcome::SenderRefused(format!("{text} ({} Fix: {})", a.cause, a.fix)),
                None,
            ),
            Class::Quota => (
                Outcome::NotAttempted(text.clone()),
                Some(AccountSignal::QuotaHold {
                    wait: Duration::from_secs(3600),
                    reason: text.clone(),
                }),
            ),
        };
        Attempt {
            outcomes: vec![outcome; n],
            signal,
            unreachable: f.unreachable.then_some(text),
        }
    }
}

/// A reqwest error without its URL (upload URLs carry their own authorization).
fn without_url(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    if let Some(u) = e.url() {
        s = s.replace(u.as_str(), "<url>");
    }
    s
}

impl Upstream for Graph {
    fn deliver<'a>(&'a self, job: &'a Job<'a>) -> BoxFuture<'a, Attempt> {
        Box::pin(self.deliver_job(job))
    }

    fn blocked_at_start(&self) -> Option<Advice> {
        self.tokens.blocked_at_start()
    }

    fn pacer(&self) -> Option<&crate::upstream::exchange::pacer::Pacer> {
        Some(&self.pacer)
    }
}

//! Who is calling the HTTP side, decided by axum extractors before any handler (and before any
//! request body) runs.
//!
//! Credentials, strongest first:
//! - `Authorization: Bearer <admin token>` (the CLI, scripts): may read and write; no CSRF
//!   token, since a browser never adds this header by itself.
//! - The status page's session cookie, set by `/login` after the admin token was typed in. The
//!   cookie holds a random session secret (the server keeps a bounded table of sessions, each
//!   valid for [`SESSION_LIFETIME`]); logout removes it. A state-changing call with a cookie must
//!   also come from this origin (`Origin`, or `Referer` when there is no `Origin`; anything else,
//!   including none and `null`, is refused) and carry the session's CSRF token (the
//!   `X-CSRF-Token` header, or the `csrf` field of the page's forms).
//! - Nothing: read-only access, and only on a loopback listener whose request names a loopback
//!   `Host` (`127.0.0.1`, `[::1]`, `localhost`, with any port), so that a page on a foreign
//!   domain that resolves to 127.0.0.1 (DNS rebinding) reads nothing. Message bodies need a
//!   credential whenever an admin token is configured.
//!
//! Login attempts are limited per client address: after [`LOGIN_FAILURES_ALLOWED`] wrong tokens
//! the address gets `429` for [`LOGIN_LOCKOUT`]. Secrets are compared in constant time and never
//! logged.

use std::collections::HashMap;
use std::net::IpAddr;

use crate::client::ClientKey;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use tokio::time::Instant;

use super::{AppState, Refusal, refuse};

pub const SESSION_COOKIE: &str = "exorelay_session";
/// The header API calls authenticated by the session cookie carry the CSRF token in.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// How long a status-page login lasts.
pub const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at once; a new login beyond this ends the one closest to expiry.
pub const MAX_SESSIONS: usize = 32;
/// Wrong tokens one client address may try before it is locked out.
pub const LOGIN_FAILURES_ALLOWED: u32 = 5;
/// How long a locked-out address waits, counted from its first failure.
pub const LOGIN_LOCKOUT: Duration = Duration::from_secs(15 * 60);
/// Client addresses whose failures are remembered; the oldest are forgotten first.
const MAX_TRACKED_CLIENTS: usize = 4096;

/// Constant-time comparison of two secrets (compares their SHA-256 digests, so the lengths do
/// not leak either).
pub fn same_secret(a: &str, b: &str) -> bool {
    let da = ring::digest::digest(&ring::digest::SHA256, a.as_bytes());
    let db = ring::digest::digest(&ring::digest::SHA256, b.as_bytes());
    da.as_ref()
        .iter()
        .zip(db.as_ref())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

fn digest(secret: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, secret.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

fn random_hex(bytes: usize) -> Result<String, ring::error::Unspecified> {
    use ring::rand::SecureRandom;
    let mut buf = vec![0u8; bytes];
    ring::rand::SystemRandom::new().fill(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// One logged-in status page.
#[derive(Debug, Clone)]
pub struct Session {
    /// The token the page's forms and API calls with this cookie must carry.
    pub csrf: String,
    expires: Instant,
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    since: Instant,
}

/// Whether a login attempt from an address may proceed (a pure decision on its failures).
fn login_verdict(failures: Option<&Failures>, now: Instant) -> Result<(), Duration> {
    match failures {
        Some(f) if f.count >= LOGIN_FAILURES_ALLOWED => {
            let until = f.since + LOGIN_LOCKOUT;
            if now < until {
                Err(until - now)
            } else {
                Ok(())
            }
        }
        _ => Ok(()),
    }
}

#[derive(Default)]
struct Table {
    /// Keyed by the SHA-256 of the secret, so the secret itself is not kept in memory.
    sessions: HashMap<[u8; 32], Session>,
    /// Per client as SMTP counts them (an IPv4 address, an IPv6 /64), so rotating addresses
    /// within one's own /64 does not reset the count.
    failures: HashMap<ClientKey, Failures>,
    /// The SHA-256 of the admin token the sessions were opened with (see [`Sessions::bind`]).
    token: Option<[u8; 32]>,
}

/// Sessions and login failures. Never blocks for long: every operation is a few map lookups.
#[derive(Default)]
pub struct Sessions {
    table: Mutex<Table>,
}

impl Sessions {
    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        // A panic while holding the lock cannot leave the maps inconsistent; keep serving.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a session; returns its secret (for the cookie) and the session.
    pub fn create(&self, now: Instant) -> Result<(String, Session), ring::error::Unspecified> {
        let secret = random_hex(32)?;
        let session = Session {
            csrf: random_hex(16)?,
            expires: now + SESSION_LIFETIME,
        };
        let mut t = self.table();
        t.sessions.retain(|_, s| s.expires > now);
        while t.sessions.len() >= MAX_SESSIONS {
            let Some(k) = t
                .sessions
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(k, _)| *k)
            else {
                break;
            };
            t.sessions.remove(&k);
        }
        t.sessions.insert(digest(&secret), session.clone());
        Ok((secret, session))
    }

    /// Ties the sessions to the admin token in force: when it differs from the one they were
    /// opened with (a reload brought a new token), every session ends, so a rotated token also
    /// logs out every status page.
    pub fn bind(&self, token: Option<&str>) {
        let current = token.map(digest);
        let mut t = self.table();
        if t.token != current {
            if t.token.is_some() {
                t.sessions.clear();
            }
            t.token = current;
        }
    }

    /// The live session for `secret`, if any.
    pub fn get(&self, secret: &str, now: Instant) -> Option<Session> {
        let key = digest(secret);
        let mut t = self.table();
        match t.sessions.get(&key) {
            Some(s) if s.expires > now => Some(s.clone()),
            Some(_) => {
                t.sessions.remove(&key);
                None
            }
            None => None,
        }
    }

    pub fn remove(&self, secret: &str) {
        self.table().sessions.remove(&digest(secret));
    }

    /// `Err(retry_after)` while `ip` is locked out after too many wrong tokens.
    pub fn login_allowed(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let ip = ClientKey::of(ip);
        let mut t = self.table();
        let verdict = login_verdict(t.failures.get(&ip), now);
        if verdict.is_ok()
            && t.failures
                .get(&ip)
                .is_some_and(|f| f.since + LOGIN_LOCKOUT <= now)
        {
            t.failures.remove(&ip);
        }
        verdict
    }

    pub fn login_failed(&self, ip: IpAddr, now: Instant) {
        let ip = ClientKey::of(ip);
        let mut t = self.table();
        if !t.failures.contains_key(&ip) && t.failures.len() >= MAX_TRACKED_CLIENTS {
            t.failures.retain(|_, f| f.since + LOGIN_LOCKOUT > now);
            if t.failures.len() >= MAX_TRACKED_CLIENTS
                && let Some(oldest) = t
                    .failures
                    .iter()
                    .min_by_key(|(_, f)| f.since)
                    .map(|(k, _)| *k)
            {
                t.failures.remove(&oldest);
            }
        }
        let f = t.failures.entry(ip).or_insert(Failures {
            count: 0,
            since: now,
        });
        if f.since + LOGIN_LOCKOUT <= now {
            *f = Failures {
                count: 0,
                since: now,
            };
        }
        f.count += 1;
    }

    pub fn login_succeeded(&self, ip: IpAddr) {
        self.table().failures.remove(&ClientKey::of(ip));
    }
}

/// How a request proved who it is.
#[derive(Debug, Clone)]
pub enum Credential {
    Bearer,
    Session(Session),
    /// Nothing presented; reads only, on loopback, with a loopback `Host`.
    Anonymous,
}

impl Credential {
    /// The CSRF token the page must put in its forms, when this caller may press buttons.
    pub fn csrf(&self) -> Option<&str> {
        match self {
            Credential::Bearer => Some(""),
            Credential::Session(s) => Some(&s.csrf),
            Credential::Anonymous => None,
        }
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
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

/// Whether `host` (a `Host` header value) names this machine's loopback interface.
pub fn is_loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((ip6, port)) if port.is_empty() || port.starts_with(':') => ip6,
            _ => return false,
        }
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            Some(_) => return false,
            None => host,
        }
    };
    name.eq_ignore_ascii_case("localhost")
        || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// This request's own origin, `scheme://host`, from its `Host` header.
fn own_origin(state: &AppState, headers: &HeaderMap) -> Option<String> {
    let host = headers.get(header::HOST)?.to_str().ok()?;
    let scheme = if state.config().http.tls.is_some() {
        "https"
    } else {
        "http"
    };
    Some(format!("{scheme}://{host}"))
}

/// Refuses a request whose `Origin` (or, without one, `Referer`) is not this origin.
pub fn same_origin(state: &AppState, headers: &HeaderMap) -> Result<(), Refusal> {
    let forbidden = |m: &str| refuse(StatusCode::FORBIDDEN, m);
    let Some(own) = own_origin(state, headers) else {
        return Err(forbidden("the request has no Host header"));
    };
    let header = |h| headers.get(h).and_then(|v| v.to_str().ok());
    let ok = match (header(header::ORIGIN), header(header::REFERER)) {
        (Some(origin), _) => origin.eq_ignore_ascii_case(&own),
        (None, Some(referer)) => {
            referer.len() >= own.len()
                && referer.is_char_boundary(own.len())
                && referer[..own.len()].eq_ignore_ascii_case(&own)
                && matches!(referer.as_bytes().get(own.len()), None | Some(b'/'))
        }
        (None, None) => false,
    };
    if ok {
        Ok(())
    } else {
        Err(forbidden(
            "cross-site request refused: a logged-in page may only change things from this origin",
        ))
    }
}

/// Who may read: the admin token, a session, or (loopback only, loopback `Host`) anyone.
pub fn read_credential(state: &AppState, headers: &HeaderMap) -> Result<Credential, Refusal> {
    if let (Some(given), Some(expected)) = (bearer(headers), state.token().as_deref()) {
        return if same_secret(expected, given) {
            Ok(Credential::Bearer)
        } else {
            Err(refuse(StatusCode::UNAUTHORIZED, "wrong admin token"))
        };
    }
    state.sessions.bind(state.token().as_deref());
    if let Some(secret) = cookie(headers, SESSION_COOKIE)
        && let Some(s) = state.sessions.get(&secret, Instant::now())
    {
        return Ok(Credential::Session(s));
    }
    if !state.loopback {
        return Err(refuse(
            StatusCode::UNAUTHORIZED,
            "this call needs the admin token: Authorization: Bearer <token from [http] admin_token_file>",
        ));
    }
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    if !host.is_some_and(is_loopback_host) {
        return Err(refuse(
            StatusCode::FORBIDDEN,
            "reading without the admin token is allowed only with Host 127.0.0.1, [::1] or localhost",
        ));
    }
    Ok(Credential::Anonymous)
}

/// Who may change things: the admin token, or a session from this origin. The CSRF token is
/// checked by the caller, which knows where the request carries it.
fn write_credential(state: &AppState, headers: &HeaderMap) -> Result<Credential, Refusal> {
    let token = state.token();
    let Some(expected) = token.as_deref() else {
        return Err(refuse(
            StatusCode::FORBIDDEN,
            "state-changing calls are disabled: set [http] admin_token_file in the config",
        ));
    };
    if let Some(given) = bearer(headers) {
        return if same_secret(expected, given) {
            Ok(Credential::Bearer)
        } else {
            Err(refuse(StatusCode::UNAUTHORIZED, "wrong admin token"))
        };
    }
    if let Some(secret) = cookie(headers, SESSION_COOKIE) {
        state.sessions.bind(Some(expected));
        let Some(session) = state.sessions.get(&secret, Instant::now()) else {
            return Err(refuse(
                StatusCode::UNAUTHORIZED,
                "the login has expired or ended; log in again",
            ));
        };
        same_origin(state, headers)?;
        return Ok(Credential::Session(session));
    }
    Err(refuse(
        StatusCode::UNAUTHORIZED,
        "this call needs the admin token: Authorization: Bearer <token from [http] admin_token_file>",
    ))
}

fn check_csrf(cred: &Credential, given: Option<&str>) -> Result<(), Refusal> {
    match cred {
        Credential::Session(s) if !given.is_some_and(|g| same_secret(g, &s.csrf)) => Err(refuse(
            StatusCode::FORBIDDEN,
            "missing or wrong CSRF token; reload the page",
        )),
        _ => Ok(()),
    }
}

/// A caller allowed to read (see the module comment).
pub struct Reader(pub Credential);

impl Reader {
    /// Message bodies are personal data: without a configured admin token they are readable
    /// like everything else on loopback; with one, only with a credential.
    pub fn may_read_bodies(&self, state: &AppState) -> bool {
        !matches!(self.0, Credential::Anonymous) || !state.has_token()
    }
}

impl FromRequestParts<Arc<AppState>> for Reader {
    type Rejection = Refusal;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        read_credential(state, &parts.headers).map(Reader)
    }
}

/// A caller allowed to change things through the API: the admin token, or a session from this
/// origin whose request carries the CSRF token in `X-CSRF-Token`.
pub struct Admin(pub Credential);

impl FromRequestParts<Arc<AppState>> for Admin {
    type Rejection = Refusal;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let cred = write_credential(state, &parts.headers)?;
        let given = parts.headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok());
        check_csrf(&cred, given)?;
        Ok(Admin(cred))
    }
}

/// A status-page form post by a caller allowed to change things: the credential and origin are
/// checked before the (small, size-limited) form body is read, the CSRF token from its `csrf`
/// field after.
pub struct AdminForm(pub Credential, pub HashMap<String, String>);

impl FromRequest<Arc<AppState>> for AdminForm {
    type Rejection = axum::response::Response;

    async fn from_request(req: Request, state: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        use axum::response::IntoResponse;
        let cred = write_credential(state, req.headers()).map_err(IntoResponse::into_response)?;
        let axum::Form(form) = axum::Form::<HashMap<String, String>>::from_request(req, state)
            .await
            .map_err(IntoResponse::into_response)?;
        check_csrf(&cred, form.get("csrf").map(String::as_str))
            .map_err(IntoResponse::into_response)?;
        Ok(AdminForm(cred, form))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        for h in [
            "127.0.0.1",
            "127.0.0.1:8025",
            "127.1.2.3:1",
            "localhost",
            "LOCALHOST:8025",
            "[::1]",
            "[::1]:8025",
        ] {
            assert!(is_loopback_host(h), "{h}");
        }
        for h in [
            "evil.example",
            "evil.example:8025",
            "localhost.evil.example",
            "127.0.0.1.evil.example:8025",
            "10.0.0.1:8025",
            "[::1].evil:80",
            "[::2]:80",
            "localhost:80x",
            "",
        ] {
            assert!(!is_loopback_host(h), "{h}");
        }
    }

    #[test]
    fn lockout_after_five_failures_for_fifteen_minutes() {
        let s = Sessions::default();
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let other: IpAddr = "192.0.2.8".parse().unwrap();
        let t0 = Instant::now();
        for i in 0..LOGIN_FAILURES_ALLOWED {
            assert!(s.login_allowed(ip, t0).is_ok(), "attempt {i}");
            s.login_failed(ip, t0);
        }
        assert_eq!(s.login_allowed(ip, t0), Err(LOGIN_LOCKOUT));
        assert!(
            s.login_allowed(other, t0).is_ok(),
            "other addresses unaffected"
        );
        let later = t0 + LOGIN_LOCKOUT - Duration::from_secs(1);
        assert_eq!(s.login_allowed(ip, later), Err(Duration::from_secs(1)));
        assert!(s.login_allowed(ip, t0 + LOGIN_LOCKOUT).is_ok());
        // The count starts again after the lockout.
        s.login_failed(ip, t0 + LOGIN_LOCKOUT);
        assert!(s.login_allowed(ip, t0 + LOGIN_LOCKOUT).is_ok());
    }

    #[test]
    fn success_clears_the_count() {
        let s = Sessions::default();
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..LOGIN_FAILURES_ALLOWED - 1 {
            s.login_failed(ip, t0);
        }
        s.login_succeeded(ip);
        s.login_failed(ip, t0);
        assert!(s.login_allowed(ip, t0).is_ok());
    }

    #[test]
    fn sessions_expire_end_and_are_bounded() {
        let s = Sessions::default();
        let t0 = Instant::now();
        let (secret, session) = s.create(t0).unwrap();
        assert_eq!(secret.len(), 64);
        assert_eq!(s.get(&secret, t0).unwrap().csrf, session.csrf);
        assert!(s.get("made-up", t0).is_none());
        assert!(s.get(&secret, t0 + SESSION_LIFETIME).is_none(), "expired");
        let (secret, _) = s.create(t0).unwrap();
        s.remove(&secret);
        assert!(s.get(&secret, t0).is_none(), "logged out");
        // The oldest sessions make room for new ones.
        let first = s.create(t0).unwrap().0;
        for i in 0..MAX_SESSIONS {
            s.create(t0 + Duration::from_secs(1 + i as u64)).unwrap();
        }
        assert!(s.get(&first, t0).is_none());
        assert_eq!(s.table().sessions.len(), MAX_SESSIONS);
    }

    #[test]
    fn a_new_admin_token_ends_every_session() {
        let s = Sessions::default();
        let t0 = Instant::now();
        s.bind(Some("token-one"));
        let (secret, _) = s.create(t0).unwrap();
        s.bind(Some("token-one"));
        assert!(s.get(&secret, t0).is_some(), "same token: still logged in");
        s.bind(Some("token-two"));
        assert!(s.get(&secret, t0).is_none(), "rotated token: logged out");
        let (secret, _) = s.create(t0).unwrap();
        s.bind(Some("token-two"));
        assert!(
            s.get(&secret, t0).is_some(),
            "a login with the new token lasts"
        );
    }

    #[test]
    fn secrets_compare_by_value() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "abcd"));
    }
}

//! Signing a delegated account in (`exorelay login`): device code, or the authorization code
//! flow with PKCE and a one-shot listener on loopback. Both end by writing the refresh token
//! to the account's token file ([`super::store`]), which the running relay picks up by itself.
//!
//! Library API for the browser flow (also used by the HTTP side's status page):
//! ```text
//! pub fn start_browser_login(account: &AccountConfig, redirect_uri: &str)
//!     -> Result<(reqwest::Url, PendingLogin), LoginError>;
//! impl PendingLogin {
//!     pub fn state(&self) -> &str;     // the CSRF `state` sent in the authorize URL
//!     pub fn account(&self) -> &str;
//!     pub async fn finish(&self, code: &str, state: &str) -> Result<SignedIn, LoginError>;
//! }
//! ```
//! `finish` refuses a `state` other than the one sent ([`LoginError::StateMismatch`]) without
//! redeeming the code, and leaves the pending login usable; otherwise it redeems the code with
//! the PKCE verifier at the same `redirect_uri` and saves the refresh token.
//!
//! Device code ([`device_login`]): prints the URL and code through a callback, polls with the
//! oauth2 crate (it keeps polling on `authorization_pending` and adds 5 s to the interval on
//! `slow_down`), and fails with a clear [`LoginError`] on `expired_token`, `access_denied` and
//! `authorization_declined`.
//!
//! Browser ([`browser_login`]): binds `127.0.0.1:PORT` (0: any free port), redirect URI
//! `http://localhost:PORT/` (Entra ignores the port of a `http://localhost` redirect), prints
//! the authorize URL and answers requests on it until one carries the right `state`: a request
//! with another `state` gets an error page and the listener keeps waiting (a stray or forged
//! request cannot end the sign-in), other paths get 404. An `error=` from Entra (the user
//! declined) ends it with a failure. Bounded by a timeout.

use std::path::PathBuf;
use std::time::Duration;

use oauth2::{
    AuthorizationCode, CsrfToken, PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, TokenResponse,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::entra::{self, ClientAuth, EntraError};
use super::store::{Grant, StoreError, TokenStore};
use crate::advice::Advice;
use crate::config::{AccountAuth, AccountConfig, AccountKind};

/// A finished sign-in.
#[derive(Debug, Clone)]
pub struct SignedIn {
    pub account: String,
    /// Who signed in, when the access token says.
    pub user: Option<String>,
    pub token_file: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("account {0:?} is not an exchange account with auth = \"delegated\"")]
    NotDelegated(String),
    #[error("{0}")]
    Setup(String),
    #[error(
        "the sign-in code expired before the sign-in was completed; run exorelay login again and finish it within the time shown"
    )]
    Expired,
    #[error("the sign-in was declined ({0}); run exorelay login again and accept it")]
    Declined(String),
    #[error("the sign-in was not completed within {0:?}; run exorelay login again")]
    TimedOut(Duration),
    #[error(
        "the callback's state does not match the sign-in started here (a stale or forged request)"
    )]
    StateMismatch,
    #[error("Entra refused the sign-in: {advice}")]
    Refused {
        error: String,
        code: Option<u32>,
        advice: Advice,
    },
    #[error("cannot reach Entra: {0}")]
    Unreachable(String),
    #[error(
        "Entra's reply holds no refresh token; the scope must include offline_access and the app needs that delegated permission"
    )]
    NoRefreshToken,
    #[error(
        "signed in as {user}, but account {account:?} sends as {mailbox}: Exchange refuses one user's token for another's mailbox. Nothing was saved; sign in again as {mailbox} (a private browser window keeps the browser from signing you in as yourself)"
    )]
    WrongUser {
        user: String,
        mailbox: String,
        account: String,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn check_account(a: &AccountConfig) -> Result<(), LoginError> {
    if a.kind != AccountKind::Exchange || a.auth != AccountAuth::Delegated {
        return Err(LoginError::NotDelegated(a.name.clone()));
    }
    Ok(())
}

fn refused(a: &AccountConfig, error: &str, code: Option<u32>) -> LoginError {
    let ctx = super::advice::Context {
        account: &a.name,
        tenant: a.tenant.as_deref().unwrap_or(""),
        client_id: a.client_id.as_deref().unwrap_or(""),
        certificate: a.certificate_file.is_some(),
    };
    let (advice, _) = super::advice::advise_delegated(code, error, &ctx);
    LoginError::Refused {
        error: error.to_string(),
        code,
        advice,
    }
}

/// The AADSTS number in a description such as "AADSTS70000: ..." (for errors whose type
/// oauth2 fixes, which drops `error_codes`).
fn aadsts_in(description: Option<&str>) -> Option<u32> {
    let d = description?;
    let rest = &d[d.find("AADSTS")? + 6..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

fn transport_error<E: std::error::Error>(e: &E) -> LoginError {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(&format!(": {inner}"));
        src = inner.source();
    }
    LoginError::Unreachable(s)
}

fn token_error(
    a: &AccountConfig,
    e: oauth2::RequestTokenError<oauth2::HttpClientError<reqwest::Error>, EntraError>,
) -> LoginError {
    use oauth2::RequestTokenError;
    match e {
        RequestTokenError::ServerResponse(r) => refused(a, &r.error, r.code()),
        RequestTokenError::Request(e) => transport_error(&e),
        RequestTokenError::Parse(..) => {
            LoginError::Unreachable("the token endpoint sent a reply that cannot be read".into())
        }
        RequestTokenError::Other(what) => LoginError::Unreachable(what),
    }
}

struct Flow {
    client: entra::EntraClient,
    http: reqwest::Client,
    extra: Vec<(&'static str, String)>,
}

fn flow(a: &AccountConfig) -> Result<Flow, LoginError> {
    check_account(a)?;
    let auth = ClientAuth::of(a);
    let client = entra::client(a, &auth).map_err(LoginError::Setup)?;
    let extra = auth
        .extra_params(a.client_id.as_deref().unwrap_or(""), &a.token_url())
        .map_err(LoginError::Setup)?;
    let http = super::http_client(a.ca_file.as_deref()).map_err(LoginError::Setup)?;
    Ok(Flow {
        client,
        http,
        extra,
    })
}

/// Saves what a successful token response gave: the refresh token, and who signed in.
fn persist(
    a: &AccountConfig,
    access: &str,
    refresh: Option<&oauth2::RefreshToken>,
) -> Result<SignedIn, LoginError> {
    let refresh = refresh.ok_or(LoginError::NoRefreshToken)?;
    let user = entra::signed_in_user(access);
    same_user(a, user.as_deref())?;
    let store = TokenStore::new(&a.token_file);
    store.save(&Grant {
        refresh_token: refresh.secret().clone(),
        obtained_at: chrono::Utc::now(),
        user: user.clone(),
    })?;
    Ok(SignedIn {
        account: a.name.clone(),
        user,
        token_file: std::path::absolute(&a.token_file).unwrap_or_else(|_| a.token_file.clone()),
    })
}

/// XOAUTH2 names the account's `mailbox`, and Exchange refuses one user's token for another's
/// mailbox (`535 5.7.3`, which would pause the account with no clue). A browser's single sign-on
/// easily signs the administrator in instead, so a sign-in as someone else is refused here, with
/// the way out, and nothing is saved.
fn same_user(a: &AccountConfig, user: Option<&str>) -> Result<(), LoginError> {
    match (user, a.mailbox.as_deref()) {
        (Some(user), Some(mailbox)) if !user.eq_ignore_ascii_case(mailbox) => {
            Err(LoginError::WrongUser {
                user: user.to_string(),
                mailbox: mailbox.to_string(),
                account: a.name.clone(),
            })
        }
        _ => Ok(()),
    }
}

// ---------- device code ----------

/// What the device code flow has to tell the person signing in.
#[derive(Debug, Clone)]
pub enum DeviceEvent {
    /// Open `uri` and enter `code` (Entra's own `message` says the same, localised).
    Started {
        uri: String,
        code: String,
        expires_in: Duration,
    },
    /// Entra asked to poll more slowly: the next poll waits `interval`.
    SlowDown { interval: Duration },
}

/// Signs `account` in with the device code flow; `report` is told what to print.
pub async fn device_login(
    account: &AccountConfig,
    timeout: Duration,
    report: impl Fn(DeviceEvent) + Send + Sync,
) -> Result<SignedIn, LoginError> {
    let f = flow(account)?;
    let mut request = f
        .client
        .exchange_device_code()
        .add_scopes(entra::scopes(account));
    for (k, v) in &f.extra {
        request = request.add_extra_param(*k, v.clone());
    }
    let details: oauth2::StandardDeviceAuthorizationResponse = request
        .request_async(&f.http)
        .await
        .map_err(|e| token_error(account, e))?;
    report(DeviceEvent::Started {
        uri: details.verification_uri().to_string(),
        code: details.user_code().secret().clone(),
        expires_in: details.expires_in(),
    });
    let last = std::sync::Mutex::new(details.interval());
    let sleep = |interval: Duration| {
        if let Ok(mut last) = last.lock() {
            if interval > *last {
                report(DeviceEvent::SlowDown { interval });
            }
            *last = interval;
        }
        tokio::time::sleep(interval)
    };
    let mut poll = f.client.exchange_device_access_token(&details);
    for (k, v) in &f.extra {
        poll = poll.add_extra_param(*k, v.clone());
    }
    let response = poll
        .request_async(&f.http, sleep, Some(timeout.min(details.expires_in())))
        .await
        .map_err(|e| {
            use oauth2::DeviceCodeErrorResponseType as T;
            use oauth2::RequestTokenError;
            match e {
                RequestTokenError::ServerResponse(r) => {
                    let code = aadsts_in(r.error_description().map(String::as_str));
                    match r.error() {
                        T::ExpiredToken => LoginError::Expired,
                        T::AccessDenied => LoginError::Declined("access_denied".into()),
                        other if other.as_ref() == "authorization_declined" => {
                            LoginError::Declined("authorization_declined".into())
                        }
                        other => refused(account, other.as_ref(), code),
                    }
                }
                RequestTokenError::Request(e) => transport_error(&e),
                RequestTokenError::Parse(..) => LoginError::Unreachable(
                    "the token endpoint sent a reply that cannot be read".into(),
                ),
                RequestTokenError::Other(what) => LoginError::Unreachable(what),
            }
        })?;
    persist(
        account,
        response.access_token().secret(),
        response.refresh_token(),
    )
}

// ---------- authorization code + PKCE ----------

/// A browser sign-in that was started and waits for its callback.
pub struct PendingLogin {
    account: AccountConfig,
    verifier: PkceCodeVerifier,
    state: CsrfToken,
    redirect_uri: RedirectUrl,
}

/// The authorize URL to send the browser to, and the login waiting for its code.
/// `redirect_uri` is where Entra sends the browser back (it must be registered on the app).
pub fn start_browser_login(
    account: &AccountConfig,
    redirect_uri: &str,
) -> Result<(reqwest::Url, PendingLogin), LoginError> {
    let f = flow(account)?;
    let redirect = RedirectUrl::new(redirect_uri.to_string())
        .map_err(|e| LoginError::Setup(format!("bad redirect URI {redirect_uri:?}: {e}")))?;
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let client = f.client.set_redirect_uri(redirect.clone());
    let mut request = client
        .authorize_url(CsrfToken::new_random)
        .add_scopes(entra::scopes(account))
        .set_pkce_challenge(challenge)
        .add_extra_param("response_mode", "query");
    if let Some(mailbox) = &account.mailbox {
        request = request.add_extra_param("login_hint", mailbox.clone());
    }
    // Let the person choose the mailbox's user rather than whoever the browser is signed in as.
    request = request.add_extra_param("prompt", "select_account");
    let (url, state) = request.url();
    Ok((
        url,
        PendingLogin {
            account: account.clone(),
            verifier,
            state,
            redirect_uri: redirect,
        },
    ))
}

impl PendingLogin {
    /// The `state` value sent in the authorize URL.
    pub fn state(&self) -> &str {
        self.state.secret()
    }

    pub fn account(&self) -> &str {
        &self.account.name
    }

    /// Redeems `code` (checked against `state` first) and saves the refresh token.
    pub async fn finish(&self, code: &str, state: &str) -> Result<SignedIn, LoginError> {
        // Constant-time compare is not needed for a single-use value, but a length check first
        // keeps it simple and exact.
        if state.as_bytes() != self.state.secret().as_bytes() {
            return Err(LoginError::StateMismatch);
        }
        let f = flow(&self.account)?;
        let client = f.client.set_redirect_uri(self.redirect_uri.clone());
        let mut request = client
            .exchange_code(AuthorizationCode::new(code.to_string()))
            .set_pkce_verifier(PkceCodeVerifier::new(self.verifier.secret().clone()));
        for (k, v) in &f.extra {
            request = request.add_extra_param(*k, v.clone());
        }
        let response = request
            .request_async(&f.http)
            .await
            .map_err(|e| token_error(&self.account, e))?;
        persist(
            &self.account,
            response.access_token().secret(),
            response.refresh_token(),
        )
    }
}

/// Signs `account` in through a browser: a one-shot listener on `127.0.0.1:port`, the
/// authorize URL given to `show` (and opened with `xdg-open` when `open`), until `timeout`.
pub async fn browser_login(
    account: &AccountConfig,
    port: u16,
    timeout: Duration,
    open: bool,
    show: impl Fn(&str),
) -> Result<SignedIn, LoginError> {
    check_account(account)?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .map_err(|e| LoginError::Setup(format!("cannot listen on 127.0.0.1:{port}: {e}")))?;
    let port = listener
        .local_addr()
        .map_err(|e| LoginError::Setup(e.to_string()))?
        .port();
    let (url, pending) = start_browser_login(account, &format!("http://localhost:{port}/"))?;
    show(url.as_str());
    if open {
        let _ = std::process::Command::new("xdg-open")
            .arg(url.as_str())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
    }
    tokio::time::timeout(timeout, callback(&listener, &pending))
        .await
        .map_err(|_| LoginError::TimedOut(timeout))?
}

/// What one request to the listener carried.
enum Callback {
    /// Not the callback path (a favicon, a probe): 404, keep waiting.
    Elsewhere,
    Code {
        code: String,
        state: String,
    },
    Error {
        error: String,
        description: String,
        state: Option<String>,
    },
    Incomplete,
}

fn parse_callback(head: &str) -> Callback {
    let target = head
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("GET "))
        .and_then(|l| l.split(' ').next())
        .unwrap_or("");
    let Ok(url) = reqwest::Url::parse(&format!("http://localhost{target}")) else {
        return Callback::Elsewhere;
    };
    if url.path() != "/" {
        return Callback::Elsewhere;
    }
    let get = |k: &str| {
        url.query_pairs()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.into_owned())
    };
    match (get("code"), get("state"), get("error")) {
        (_, state, Some(error)) => Callback::Error {
            error,
            description: get("error_description").unwrap_or_default(),
            state,
        },
        (Some(code), Some(state), None) => Callback::Code { code, state },
        _ => Callback::Incomplete,
    }
}

fn page(status: &str, title: &str, text: &str) -> Vec<u8> {
    let esc = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;")
    };
    let body = format!(
        "<!doctype html><meta charset=\"utf-8\"><title>exorelay: {t}</title><h1>{t}</h1><p>{x}</p>\n",
        t = esc(title),
        x = esc(text)
    );
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

async fn callback(
    listener: &tokio::net::TcpListener,
    pending: &PendingLogin,
) -> Result<SignedIn, LoginError> {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        let mut head = Vec::new();
        let mut buf = [0u8; 2048];
        let read = tokio::time::timeout(Duration::from_secs(10), async {
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                match conn.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        if read.is_err() {
            continue;
        }
        let (reply, done) = match parse_callback(&String::from_utf8_lossy(&head)) {
            Callback::Elsewhere => (page("404 Not Found", "Not found", ""), None),
            Callback::Incomplete => (
                page(
                    "400 Bad Request",
                    "Sign-in not completed",
                    "The request carries no code and state.",
                ),
                None,
            ),
            Callback::Code { state, .. }
            | Callback::Error {
                state: Some(state), ..
            } if state != pending.state() => (
                page(
                    "400 Bad Request",
                    "Sign-in refused",
                    "The state does not match the sign-in started by exorelay login; this page is stale or forged. exorelay login keeps waiting for the right one.",
                ),
                None,
            ),
            // An error without a state cannot be told from a forged one: it ends nothing.
            Callback::Error { state: None, .. } => (
                page(
                    "400 Bad Request",
                    "Sign-in refused",
                    "An error without the sign-in's state; exorelay login keeps waiting.",
                ),
                None,
            ),
            Callback::Code { code, state } => match pending.finish(&code, &state).await {
                Ok(s) => (
                    page(
                        "200 OK",
                        "Signed in",
                        &format!(
                            "exorelay account {} is signed in{}. You can close this tab.",
                            s.account,
                            s.user
                                .as_deref()
                                .map(|u| format!(" as {u}"))
                                .unwrap_or_default()
                        ),
                    ),
                    Some(Ok(s)),
                ),
                Err(e) => (
                    page("400 Bad Request", "Sign-in failed", &e.to_string()),
                    Some(Err(e)),
                ),
            },
            Callback::Error {
                error, description, ..
            } => {
                let e = if matches!(
                    error.as_str(),
                    "access_denied" | "authorization_declined" | "consent_required"
                ) {
                    LoginError::Declined(error.clone())
                } else {
                    refused(&pending.account, &error, aadsts_in(Some(&description)))
                };
                (
                    page("400 Bad Request", "Sign-in failed", &e.to_string()),
                    Some(Err(e)),
                )
            }
        };
        let _ = conn.write_all(&reply).await;
        let _ = conn.shutdown().await;
        if let Some(result) = done {
            return result;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The HTTP side keeps pending logins in shared state and awaits `finish` in a handler.
    #[test]
    fn pending_login_can_live_in_shared_state() {
        fn shared<T: Send + Sync + 'static>() {}
        fn send<T: Send>(_: &T) {}
        shared::<PendingLogin>();
        let mut a: AccountConfig = toml::from_str(
            r#"name = "d"
kind = "exchange"
auth = "delegated"
mailbox = "d@contoso.com"
tenant = "contoso.onmicrosoft.com"
client_id = "abc""#,
        )
        .unwrap();
        a.token_file = PathBuf::from("/nonexistent/d.refresh-token");
        let (url, pending) = start_browser_login(&a, "http://localhost:1/").unwrap();
        assert!(url.as_str().contains("code_challenge_method=S256"));
        let fut = pending.finish("code", "other-state");
        send(&fut);
    }

    #[test]
    fn callback_requests_are_sorted() {
        assert!(matches!(
            parse_callback("GET /?code=abc&state=xyz HTTP/1.1\r\nHost: localhost\r\n\r\n"),
            Callback::Code { ref code, ref state } if code == "abc" && state == "xyz"
        ));
        assert!(matches!(
            parse_callback("GET /favicon.ico HTTP/1.1\r\n\r\n"),
            Callback::Elsewhere
        ));
        assert!(matches!(
            parse_callback("GET /?error=access_denied&error_description=AADSTS65004%3A+no HTTP/1.1\r\n\r\n"),
            Callback::Error { ref error, ref description, .. } if error == "access_denied" && aadsts_in(Some(description)) == Some(65004)
        ));
        assert!(matches!(
            parse_callback("GET /?code=abc HTTP/1.1\r\n\r\n"),
            Callback::Incomplete
        ));
        let p = String::from_utf8(page("200 OK", "t", "<b>&")).unwrap();
        assert!(p.contains("&lt;b&gt;&amp;"));
    }

    fn delegated(mailbox: &str) -> AccountConfig {
        let mut a: AccountConfig = toml::from_str(&format!(
            r#"name = "d"
kind = "exchange"
auth = "delegated"
mailbox = "{mailbox}"
tenant = "contoso.onmicrosoft.com"
client_id = "abc""#
        ))
        .unwrap();
        a.token_file = PathBuf::from("/nonexistent/d.refresh-token");
        a
    }

    /// A sign-in as someone other than the account's mailbox is refused before anything is
    /// saved; the case of the address does not matter.
    #[test]
    fn only_the_mailboxs_user_may_sign_in() {
        let a = delegated("frontdesk@contoso.com");
        assert!(same_user(&a, Some("FrontDesk@Contoso.com")).is_ok());
        assert!(same_user(&a, None).is_ok(), "no claim: nothing to compare");
        let e = same_user(&a, Some("admin@contoso.com")).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("admin@contoso.com")
                && text.contains("sign in again as frontdesk@contoso.com"),
            "{text}"
        );
    }

    /// An error redirect without the sign-in's `state` (any local process can send one) does
    /// not end `exorelay login --browser`; Entra's own, with the state, does.
    #[tokio::test]
    async fn an_error_without_the_state_ends_nothing() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let a = delegated("frontdesk@contoso.com");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_, pending) =
            start_browser_login(&a, &format!("http://localhost:{}/", addr.port())).unwrap();
        let state = pending.state().to_string();
        let waiting = tokio::spawn(async move { callback(&listener, &pending).await });
        let get = |target: String| async move {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            c.write_all(format!("GET {target} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut reply = String::new();
            c.read_to_string(&mut reply).await.unwrap();
            reply
        };
        let forged = get("/?error=access_denied".into()).await;
        assert!(forged.starts_with("HTTP/1.1 400"), "{forged}");
        let wrong = get("/?error=access_denied&state=guessed".into()).await;
        assert!(wrong.starts_with("HTTP/1.1 400"), "{wrong}");
        assert!(!waiting.is_finished(), "a forged error ended the sign-in");
        let real = get(format!("/?error=access_denied&state={state}")).await;
        assert!(real.contains("Sign-in failed"), "{real}");
        let result = waiting.await.unwrap();
        assert!(matches!(result, Err(LoginError::Declined(_))), "{result:?}");
    }
}

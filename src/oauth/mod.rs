//! Access tokens for Exchange Online: client credentials with a secret or a certificate, or a
//! delegated sign-in (`auth = "delegated"`) whose refresh token this module keeps rotating.
//!
//! Contract of [`TokenManager::token`]:
//! - one cache per account; a token is reused until it is close to expiry (10 minutes before, or
//!   half its lifetime for short-lived tokens);
//! - single flight: however many deliveries ask at once, at most one request is in the air;
//! - after a failure, further calls get the same error without a request until a backoff
//!   (1 s doubling to 60 s) has passed, so a broken credential does not hammer Entra;
//! - errors carry Microsoft's `error` and AADSTS code and an [`Advice`] for the administrator.
//!
//! Delegated accounts (contract on top of the above):
//! - every token request reads the account's token file ([`store`]), so a fresh
//!   `exorelay login` is picked up by the running relay without a restart: the file always wins
//!   over memory, and a new sign-in in the file is tried at once, even during a failure backoff;
//! - the refresh grant goes through the oauth2 crate ([`entra`]); the rotated refresh token is
//!   persisted (atomically) *before* the access token is returned, so a crash between the two
//!   loses nothing but the access token; if it cannot be persisted the access token is not used;
//! - no token file yet means "not signed in": [`TokenManager::new`] still succeeds, and
//!   [`TokenManager::blocked_at_start`] gives the "run exorelay login --account NAME" advice the
//!   forwarder starts the account paused with. A refused grant (`invalid_grant`: AADSTS700082,
//!   50173, 70043, 50076, 65001) is a configuration error with that advice, which pauses the
//!   account; mail stays queued;
//! - [`keepalive`] refreshes an idle account's grant once a day, so it never expires from
//!   inactivity (Entra: 90 days).
//!
//! Client credentials use plain reqwest; the delegated flows use the oauth2 crate with
//! [`entra::EntraError`], which keeps Entra's `error_codes` (oauth2's standard error type drops
//! them, and the advice is keyed on them).

pub mod advice;
pub mod assertion;
pub mod entra;
pub mod keepalive;
pub mod login;
mod refresh;
pub mod store;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use crate::advice::Advice;
use crate::config::{AccountAuth, AccountConfig};
use assertion::AssertionSigner;
use entra::ClientAuth;
use refresh::Delegated;
use store::{Grant, StoreError, TokenStore};

/// An access token. Its value never appears in `Debug` output or logs.
#[derive(Clone)]
pub struct AccessToken {
    secret: Arc<str>,
    pub expires_at: Instant,
    pub expires_wall: SystemTime,
    lifetime: Duration,
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessToken")
            .field("expires_wall", &self.expires_wall)
            .finish_non_exhaustive()
    }
}

impl AccessToken {
    pub fn secret(&self) -> &str {
        &self.secret
    }

    fn margin(&self) -> Duration {
        Duration::from_secs(600).min(self.lifetime / 2)
    }

    /// Still usable for a new connection.
    pub fn is_fresh(&self) -> bool {
        self.expires_at.saturating_duration_since(Instant::now()) > self.margin()
    }

    pub fn is_expired(&self) -> bool {
        Instant::now() >= self.expires_at
    }

    pub fn same_as(&self, other: &AccessToken) -> bool {
        Arc::ptr_eq(&self.secret, &other.secret)
    }
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("token request failed: {advice}")]
pub struct TokenError {
    /// Microsoft's `error` value, or a local description (network, parse).
    pub error: String,
    /// `error_codes[0]`, the AADSTS number.
    pub code: Option<u32>,
    /// A configuration problem the administrator must fix (as opposed to a passing fault).
    pub config: bool,
    pub advice: Advice,
}

#[derive(Default)]
struct Cache {
    token: Option<AccessToken>,
    failure: Option<(TokenError, Instant)>,
    failures: u32,
    /// Delegated: the refresh token the last failure was had with (memory only). A different
    /// one in the file is a new sign-in, tried without waiting out the backoff.
    failed_refresh: Option<String>,
}

pub struct TokenManager {
    http: reqwest::Client,
    account: String,
    tenant: String,
    token_url: String,
    client_id: String,
    scope: String,
    /// The app's own credential, read from disk at every token request, so an administrator
    /// who replaces an expired secret or certificate does not have to restart the relay.
    credential: ClientAuth,
    delegated: Option<Delegated>,
    /// Delegated: when the grant was last refreshed, on tokio's clock (for [`keepalive`]).
    refreshed_at: std::sync::Mutex<Option<tokio::time::Instant>>,
    cache: tokio::sync::Mutex<Cache>,
    requests: AtomicU64,
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

/// An HTTP client for Entra: no redirects (SSRF), bounded timeouts, system roots plus `ca_file`.
pub fn http_client(ca_file: Option<&std::path::Path>) -> Result<reqwest::Client, String> {
    let mut b = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(15))
        .timeout(Duration::from_secs(30))
        .user_agent(concat!("exorelay/", env!("CARGO_PKG_VERSION")));
    if let Some(ca) = ca_file {
        let pem =
            std::fs::read(ca).map_err(|e| format!("cannot read ca_file {}: {e}", ca.display()))?;
        for cert in reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| format!("bad ca_file {}: {e}", ca.display()))?
        {
            b = b.add_root_certificate(cert);
        }
    }
    b.build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
}

impl TokenManager {
    /// Builds the manager for an `exchange` account (validated config); reads the credential.
    pub fn new(a: &AccountConfig) -> Result<TokenManager, String> {
        // Read once here so a broken credential fails at startup, not at the first message.
        // A delegated account's missing token file is not an error: it starts paused.
        let credential = ClientAuth::of(a);
        match &credential {
            ClientAuth::Secret(_) => {
                credential.secret()?;
            }
            ClientAuth::Certificate { cert, key, alg } => {
                AssertionSigner::load(cert, key, *alg)?;
            }
            ClientAuth::Public if a.auth == AccountAuth::ClientCredentials => {
                return Err("no credential configured".into());
            }
            ClientAuth::Public => {}
        }
        let delegated = (a.auth == AccountAuth::Delegated).then(|| Delegated {
            store: TokenStore::new(&a.token_file),
            account: a.clone(),
        });
        let refreshed_at = delegated
            .as_ref()
            .and_then(|d| d.store.load().ok().flatten())
            .and_then(|g| (chrono::Utc::now() - g.obtained_at).to_std().ok())
            .and_then(|age| tokio::time::Instant::now().checked_sub(age));
        Ok(TokenManager {
            http: http_client(a.ca_file.as_deref())?,
            account: a.name.clone(),
            tenant: a.tenant.clone().unwrap_or_default(),
            token_url: a.token_url(),
            client_id: a.client_id.clone().unwrap_or_default(),
            scope: a.scope().to_string(),
            credential,
            delegated,
            refreshed_at: std::sync::Mutex::new(refreshed_at),
            cache: tokio::sync::Mutex::new(Cache::default()),
            requests: AtomicU64::new(0),
            metrics: None,
        })
    }

    /// Counts requests and failures and exports the token expiry in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> TokenManager {
        self.metrics = Some(metrics);
        self
    }

    pub fn token_url(&self) -> &str {
        &self.token_url
    }

    pub fn scope(&self) -> &str {
        &self.scope
    }

    /// Token requests sent so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// A usable token, from the cache or from Entra.
    pub async fn token(&self) -> Result<AccessToken, TokenError> {
        self.obtain(false).await
    }

    /// Delegated: refreshes the grant now, whatever the cached access token (the keep-alive of
    /// an idle account). Does nothing for other accounts or before the first sign-in.
    pub async fn refresh_grant(&self) -> Result<(), TokenError> {
        if self.delegated.is_some() {
            self.obtain(true).await?;
        }
        Ok(())
    }

    /// Delegated and signed in, with a grant last refreshed `max_age` ago or more (as of `now`).
    pub fn grant_older_than(&self, max_age: Duration, now: tokio::time::Instant) -> bool {
        let Some(d) = &self.delegated else {
            return false;
        };
        if !d.store.path().exists() {
            return false;
        }
        let at = self.refreshed_at.lock().ok().and_then(|g| *g);
        at.is_none_or(|at| now.saturating_duration_since(at) >= max_age)
    }

    pub fn is_delegated(&self) -> bool {
        self.delegated.is_some()
    }

    /// Delegated: the token file.
    pub fn token_file(&self) -> Option<&std::path::Path> {
        self.delegated.as_ref().map(|d| d.store.path())
    }

    /// Delegated: who signed in and when, from the token file (`None`: not signed in).
    pub fn signed_in(&self) -> Result<Option<Grant>, StoreError> {
        match &self.delegated {
            Some(d) => d.store.load(),
            None => Ok(None),
        }
    }

    /// Why the account cannot send before any attempt: a delegated account nobody has signed
    /// in to yet, or whose token file is unreadable. The forwarder starts it paused with this.
    pub fn blocked_at_start(&self) -> Option<Advice> {
        let d = self.delegated.as_ref()?;
        match d.store.load() {
            Ok(Some(_)) => None,
            Ok(None) => Some(advice::not_signed_in(&self.account, d.store.path(), None)),
            Err(e) => Some(advice::not_signed_in(
                &self.account,
                d.store.path(),
                Some(&e.to_string()),
            )),
        }
    }

    async fn obtain(&self, force: bool) -> Result<AccessToken, TokenError> {
        let mut cache = self.cache.lock().await;
        if !force
            && let Some(t) = &cache.token
            && t.is_fresh()
        {
            return Ok(t.clone());
        }
        let loaded = self.delegated.as_ref().map(|d| d.store.load());
        let file_refresh = match &loaded {
            Some(Ok(Some(g))) => Some(g.refresh_token.clone()),
            _ => None,
        };
        if let Some((err, retry_at)) = &cache.failure
            && Instant::now() < *retry_at
            && (self.delegated.is_none() || cache.failed_refresh == file_refresh)
        {
            return Err(err.clone());
        }
        let label = crate::metrics::Metrics::account(&self.account);
        if let Some(m) = &self.metrics {
            m.token_requests.get_or_create(&label).inc();
        }
        let result = match (&self.delegated, loaded) {
            (Some(d), Some(loaded)) => self.refresh(d, loaded).await,
            _ => self.request().await,
        };
        match result {
            Ok(t) => {
                if let Some(m) = &self.metrics {
                    let exp = t
                        .expires_wall
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0);
                    m.token_expiry.get_or_create(&label).set(exp as i64);
                }
                cache.token = Some(t.clone());
                cache.failure = None;
                cache.failures = 0;
                tracing::info!(account = %self.account, expires_in = ?t.expires_at.saturating_duration_since(Instant::now()), "access token obtained");
                Ok(t)
            }
            Err(e) => {
                if let Some(m) = &self.metrics {
                    m.token_failures.get_or_create(&label).inc();
                }
                cache.failures += 1;
                let backoff =
                    Duration::from_secs(1 << cache.failures.min(6)).min(Duration::from_secs(60));
                cache.failure = Some((e.clone(), Instant::now() + backoff));
                cache.failed_refresh = file_refresh;
                tracing::warn!(account = %self.account, error = %e.error, code = ?e.code, cause = %e.advice.cause, fix = %e.advice.fix, "token request failed");
                Err(e)
            }
        }
    }

    /// Forgets `stale` (Exchange refused it), so the next [`token`](Self::token) asks Entra.
    pub async fn invalidate(&self, stale: &AccessToken) {
        let mut cache = self.cache.lock().await;
        if cache.token.as_ref().is_some_and(|t| t.same_as(stale)) {
            cache.token = None;
        }
    }

    /// Forgets a cached failure so the next call asks again (used by probes and `doctor`).
    pub async fn clear_failure(&self) {
        self.cache.lock().await.failure = None;
    }

    fn fail(&self, error: &str, code: Option<u32>) -> TokenError {
        let ctx = advice::Context {
            account: &self.account,
            tenant: &self.tenant,
            client_id: &self.client_id,
            certificate: self.credential.is_certificate(),
        };
        let (advice, config) = if self.delegated.is_some() {
            advice::advise_delegated(code, error, &ctx)
        } else {
            advice::advise(code, error, &ctx)
        };
        TokenError {
            error: error.to_string(),
            code,
            config,
            advice,
        }
    }

    fn transient(&self, what: String) -> TokenError {
        TokenError {
            error: what.clone(),
            code: None,
            config: false,
            advice: Advice::new(
                format!(
                    "Cannot reach the token endpoint {}: {what}.",
                    self.token_url
                ),
                "Check DNS, the firewall and any HTTP proxy between this machine and the Entra endpoint; exorelay retries on its own.",
            ),
        }
    }

    async fn request(&self) -> Result<AccessToken, TokenError> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let mut form: Vec<(&str, String)> = vec![
            ("client_id", self.client_id.clone()),
            ("scope", self.scope.clone()),
            ("grant_type", "client_credentials".into()),
        ];
        let local = |what: &str, e: String, fix: &str| TokenError {
            error: what.into(),
            code: None,
            config: true,
            advice: Advice::new(format!("{e}."), fix),
        };
        match &self.credential {
            ClientAuth::Public => {
                return Err(local(
                    "credential",
                    "No client secret or certificate is configured".into(),
                    "Set client_secret_file, or certificate_file and private_key_file.",
                ));
            }
            ClientAuth::Secret(_) => {
                let secret = self
                    .credential
                    .secret()
                    .and_then(|s| s.ok_or_else(|| "no client secret".to_string()))
                    .map_err(|e| {
                        local(
                            "client_secret_file",
                            e,
                            "Put the client secret's Value into the file (mode 600).",
                        )
                    })?;
                form.push(("client_secret", secret));
            }
            ClientAuth::Certificate { cert, key, alg } => {
                let fix = "Check certificate_file and private_key_file.";
                let signer = AssertionSigner::load(cert, key, *alg)
                    .map_err(|e| local("certificate_file", e, fix))?;
                let jwt = signer
                    .assertion(&self.client_id, &self.token_url)
                    .map_err(|e| {
                        local(
                            "assertion",
                            format!("Cannot sign the client assertion: {e}"),
                            fix,
                        )
                    })?;
                form.push((
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".into(),
                ));
                form.push(("client_assertion", jwt));
            }
        }
        let sent = Instant::now();
        let response = self
            .http
            .post(&self.token_url)
            .form(&form)
            .send()
            .await
            .map_err(|e| self.send_error(&e))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| self.transient(without_url(&e)))?;
        let json: serde_json::Value = match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(_) if status.is_server_error() => {
                return Err(self.transient(format!("HTTP {status}")));
            }
            Err(_) => {
                return Err(self.fail(&format!("unreadable reply (HTTP {status})"), None));
            }
        };
        if !status.is_success() {
            let error = json["error"].as_str().unwrap_or("unknown_error");
            let code = json["error_codes"]
                .get(0)
                .and_then(|c| c.as_u64())
                .map(|c| c as u32);
            if status.is_server_error() && code.is_none() {
                return Err(self.transient(format!("HTTP {status} ({error})")));
            }
            return Err(self.fail(error, code));
        }
        let Some(token) = json["access_token"].as_str().filter(|t| !t.is_empty()) else {
            return Err(self.fail("reply without access_token", None));
        };
        let expires_in = json["expires_in"]
            .as_u64()
            .or_else(|| json["expires_in"].as_str().and_then(|s| s.parse().ok()))
            .unwrap_or(3599);
        let lifetime = Duration::from_secs(expires_in.max(1));
        Ok(AccessToken {
            secret: Arc::from(token),
            expires_at: sent + lifetime,
            expires_wall: SystemTime::now() + lifetime,
            lifetime,
        })
    }
}

impl TokenManager {
    /// A request that got no answer: an untrusted certificate (configuration) or a passing fault.
    fn send_error(&self, e: &reqwest::Error) -> TokenError {
        match crate::tls::certificate_problem(e) {
            Some(why) => {
                let host = e
                    .url()
                    .map(|u| {
                        format!(
                            "{}:{}",
                            u.host_str().unwrap_or(""),
                            u.port_or_known_default().unwrap_or(443)
                        )
                    })
                    .unwrap_or_else(|| self.token_url.clone());
                TokenError {
                    error: "untrusted_certificate".into(),
                    code: None,
                    config: true,
                    advice: crate::upstream::exchange::classify::untrusted_certificate(&host, &why),
                }
            }
            None => self.transient(without_url(e)),
        }
    }
}

/// reqwest errors print the URL; ours has no secrets in it, but keep messages short.
fn without_url(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    if let Some(url) = e.url() {
        s = s.replace(&format!(" for url ({url})"), "");
    }
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(&format!(": {inner}"));
        src = inner.source();
    }
    s
}

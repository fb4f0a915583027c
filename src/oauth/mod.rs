//! Access tokens for Exchange Online: client credentials with a secret or a certificate.
//!
//! Contract of [`TokenManager::token`]:
//! - one cache per account; a token is reused until it is close to expiry (10 minutes before, or
//!   half its lifetime for short-lived tokens);
//! - single flight: however many deliveries ask at once, at most one request is in the air;
//! - after a failure, further calls get the same error without a request until a backoff
//!   (1 s doubling to 60 s) has passed, so a broken credential does not hammer Entra;
//! - errors carry Microsoft's `error` and AADSTS code and an [`Advice`] for the administrator.
//!
//! Plain reqwest is used rather than the oauth2 crate: Entra's `error_codes` field, which the
//! advice is keyed on, is dropped by oauth2's standard error type.

pub mod advice;
pub mod assertion;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use crate::advice::Advice;
use crate::config::AccountConfig;
use assertion::AssertionSigner;

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

/// Read from disk at every token request, so an administrator who replaces an expired secret
/// or certificate does not have to restart the relay.
enum Credential {
    Secret(std::path::PathBuf),
    Certificate {
        cert: std::path::PathBuf,
        key: std::path::PathBuf,
        alg: crate::config::AssertionAlgorithm,
    },
}

impl Credential {
    fn secret(path: &std::path::Path) -> Result<String, String> {
        let s = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read client_secret_file {}: {e}", path.display()))?;
        let s = s.trim();
        if s.is_empty() {
            return Err(format!("client_secret_file {} is empty", path.display()));
        }
        Ok(s.to_string())
    }
}

#[derive(Default)]
struct Cache {
    token: Option<AccessToken>,
    failure: Option<(TokenError, Instant)>,
    failures: u32,
}

pub struct TokenManager {
    http: reqwest::Client,
    account: String,
    tenant: String,
    token_url: String,
    client_id: String,
    scope: String,
    credential: Credential,
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
        let credential = match (&a.client_secret_file, &a.certificate_file) {
            (Some(f), _) => {
                Credential::secret(f)?;
                Credential::Secret(f.clone())
            }
            (None, Some(cert)) => {
                let key = a.private_key_file.clone().unwrap_or_else(|| cert.clone());
                AssertionSigner::load(cert, &key, a.assertion_algorithm)?;
                Credential::Certificate {
                    cert: cert.clone(),
                    key,
                    alg: a.assertion_algorithm,
                }
            }
            (None, None) => return Err("no credential configured".into()),
        };
        Ok(TokenManager {
            http: http_client(a.ca_file.as_deref())?,
            account: a.name.clone(),
            tenant: a.tenant.clone().unwrap_or_default(),
            token_url: a.token_url(),
            client_id: a.client_id.clone().unwrap_or_default(),
            scope: a.scope().to_string(),
            credential,
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
        let mut cache = self.cache.lock().await;
        if let Some(t) = &cache.token
            && t.is_fresh()
        {
            return Ok(t.clone());
        }
        if let Some((err, retry_at)) = &cache.failure
            && Instant::now() < *retry_at
        {
            return Err(err.clone());
        }
        let label = crate::metrics::Metrics::account(&self.account);
        if let Some(m) = &self.metrics {
            m.token_requests.get_or_create(&label).inc();
        }
        match self.request().await {
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
            certificate: matches!(self.credential, Credential::Certificate { .. }),
        };
        let (advice, config) = advice::advise(code, error, &ctx);
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
            Credential::Secret(path) => {
                let secret = Credential::secret(path).map_err(|e| {
                    local(
                        "client_secret_file",
                        e,
                        "Put the client secret's Value into the file (mode 600).",
                    )
                })?;
                form.push(("client_secret", secret));
            }
            Credential::Certificate { cert, key, alg } => {
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
            .map_err(|e| match crate::tls::certificate_problem(&e) {
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
                        advice: crate::upstream::exchange::classify::untrusted_certificate(
                            &host, &why,
                        ),
                    }
                }
                None => self.transient(without_url(&e)),
            })?;
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

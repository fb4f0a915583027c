//! A fake Exchange Online on loopback: an Entra-style token endpoint (client credentials with
//! a secret or a signed client assertion, AADSTS errors) and an SMTP submission server that
//! demands STARTTLS before AUTH, checks XOAUTH2 bearer tokens against those it issued (one-line
//! and two-step forms), enforces MAIL FROM = mailbox unless SendAs is granted, the 30-per-window
//! rate and 3 connections per mailbox, and plays scripted faults.
//!
//! Delegated flows ([`DelegatedFake`]): a device code endpoint (pending polls, `slow_down`
//! once, `expired_token`, `access_denied` / `authorization_declined` knobs), an authorize
//! endpoint that acts as the user's browser consent (302 to `redirect_uri?code=..&state=..`,
//! echoing `state`) and a token endpoint that checks the PKCE verifier and `redirect_uri`,
//! rotates refresh tokens and accepts each one once (stricter than Entra), and answers
//! `invalid_grant` with the AADSTS code of a revocation. Delegated access tokens carry `upn`
//! and work against the SMTP side's XOAUTH2 check.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

use super::Io;

pub const TENANT: &str = "contoso.onmicrosoft.com";
pub const CLIENT_ID: &str = "11111111-2222-3333-4444-555555555555";
pub const SECRET: &str = "fake-Secret~Value.12345";
pub const MAILBOX: &str = "relay@contoso.com";
/// The delegated scope the fake accepts.
pub const DELEGATED_SCOPE: &str = "https://outlook.office.com/SMTP.Send offline_access";

/// How a device code ends once its pending polls are used up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceOutcome {
    #[default]
    Approve,
    Expired,
    AccessDenied,
    Declined,
}

struct Device {
    pending_left: usize,
    slow_down: bool,
    outcome: DeviceOutcome,
}

struct Code {
    challenge: String,
    redirect_uri: String,
}

/// Delegated-flow state and knobs.
#[derive(Default)]
pub struct DelegatedFake {
    /// Refresh tokens that work (each once).
    pub refresh_tokens: HashSet<String>,
    /// Revoked refresh tokens and the AADSTS code they are refused with.
    pub revoked: HashMap<String, u32>,
    /// Refresh tokens issued, in order.
    pub issued_refresh: Vec<String>,
    /// Successful refresh grants.
    pub refreshes: usize,
    /// Knobs for the next device code: pending polls before the outcome, one slow_down first.
    pub device_pending_polls: usize,
    pub device_slow_down: bool,
    pub device_outcome: DeviceOutcome,
    /// The `interval` the device code endpoint announces (seconds).
    pub device_interval: u64,
    /// When each device-code poll arrived.
    pub device_polls: Vec<Instant>,
    devices: HashMap<String, Device>,
    codes: HashMap<String, Code>,
}

#[derive(Debug, Clone)]
pub struct Delivered {
    pub mailbox: String,
    pub mail_from: String,
    pub rcpts: Vec<String>,
    pub data: Vec<u8>,
}

/// Scripted faults. `*_once` queues are consumed one reply per event; `auth_always` stays until
/// cleared.
#[derive(Debug, Default)]
pub struct Faults {
    pub auth_always: Option<String>,
    pub mail_once: VecDeque<String>,
    pub data_end_once: VecDeque<String>,
    pub data_end_always: Option<String>,
    pub drop_mid_data: usize,
    /// Close the connection after each accepted message (forces the relay to reconnect).
    pub close_after_data: bool,
    pub rcpt_reject: HashMap<String, String>,
    /// How long a scripted MAIL reply (`mail_once`) takes, as a busy server's would.
    pub mail_fault_delay: Duration,
    /// Replaces the `220` banner (a middlebox's refusal, say); the session closes after a 5xx.
    pub greeting: Option<String>,
    /// Replaces every EHLO/HELO reply.
    pub ehlo_reply: Option<String>,
    /// EHLO after STARTTLS offers no AUTH (a tenant MX host, or inspection stripping it).
    pub no_auth_after_tls: bool,
    /// Banner and EHLO name masked with asterisks, as Cisco ASA's `inspect esmtp` does.
    pub masked: bool,
    /// AUTH XOAUTH2 is answered with a Gmail-style `334` error challenge, then `535`.
    pub auth_challenge: bool,
    /// When not empty, the client secrets the token endpoint accepts instead of [`SECRET`]
    /// (while a secret is rotated, Entra accepts the old and the new one).
    pub accepted_secrets: Vec<String>,
}

pub struct FakeState {
    pub http_addr: Mutex<Option<SocketAddr>>,
    pub lifetime: Mutex<Duration>,
    pub token_requests: AtomicU64,
    pub tokens: Mutex<HashMap<String, Instant>>,
    /// Every token ever issued (for log checks), revoked or not.
    pub issued: Mutex<Vec<String>>,
    pub token_error: Mutex<Option<(u16, serde_json::Value)>>,
    pub mailboxes: Mutex<HashSet<String>>,
    pub send_as: Mutex<HashSet<String>>,
    pub faults: Mutex<Faults>,
    pub delivered: Mutex<Vec<Delivered>>,
    pub conns: Mutex<HashMap<String, usize>>,
    pub max_conns_seen: AtomicUsize,
    /// (limit, window, end-of-DATA stamps)
    pub rate: Mutex<(usize, Duration, VecDeque<Instant>)>,
    pub throttle_replies: AtomicUsize,
    pub auth_forms: Mutex<Vec<&'static str>>,
    pub auth_before_tls: AtomicUsize,
    /// Whether EHLO offers PIPELINING (Exchange Online does).
    pub pipelining: AtomicBool,
    /// MAIL commands that arrived with the next command already behind them (RFC 2920 groups).
    pub pipelined_groups: AtomicUsize,
    /// Sessions that authenticated: a client that stays in step reuses one.
    pub sessions: AtomicUsize,
    /// Every MAIL FROM with when it came and the reply code it got.
    pub mail_log: Mutex<Vec<(Instant, u16)>>,
    pub delegated: Mutex<DelegatedFake>,
    app_cert_der: Vec<u8>,
    app_public_key: Vec<u8>,
}

pub struct FakeExchange {
    pub http_addr: SocketAddr,
    pub smtp_addr: SocketAddr,
    pub state: Arc<FakeState>,
    /// CA (self-signed) of the SMTP server's certificate, PEM.
    pub smtp_ca_pem: String,
}

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

pub fn app_cert_path() -> std::path::PathBuf {
    fixture("app-cert.pem")
}
pub fn app_key_path() -> std::path::PathBuf {
    fixture("app-cert.key")
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl FakeExchange {
    pub async fn start() -> FakeExchange {
        let cert_der = CertificateDer::from_pem_file(app_cert_path())
            .unwrap()
            .as_ref()
            .to_vec();
        let key = PrivateKeyDer::from_pem_file(app_key_path()).unwrap();
        let PrivateKeyDer::Pkcs8(pkcs8) = key else {
            panic!("fixture key must be PKCS#8")
        };
        let kp = ring::signature::RsaKeyPair::from_pkcs8(pkcs8.secret_pkcs8_der()).unwrap();
        let public = ring::signature::KeyPair::public_key(&kp).as_ref().to_vec();
        let state = Arc::new(FakeState {
            http_addr: Mutex::new(None),
            lifetime: Mutex::new(Duration::from_secs(3599)),
            token_requests: AtomicU64::new(0),
            tokens: Mutex::new(HashMap::new()),
            issued: Mutex::new(Vec::new()),
            token_error: Mutex::new(None),
            mailboxes: Mutex::new([MAILBOX.to_string()].into_iter().collect()),
            send_as: Mutex::new(HashSet::new()),
            faults: Mutex::new(Faults::default()),
            delivered: Mutex::new(Vec::new()),
            conns: Mutex::new(HashMap::new()),
            max_conns_seen: AtomicUsize::new(0),
            rate: Mutex::new((30, Duration::from_secs(60), VecDeque::new())),
            throttle_replies: AtomicUsize::new(0),
            auth_forms: Mutex::new(Vec::new()),
            auth_before_tls: AtomicUsize::new(0),
            pipelining: AtomicBool::new(true),
            pipelined_groups: AtomicUsize::new(0),
            sessions: AtomicUsize::new(0),
            mail_log: Mutex::new(Vec::new()),
            delegated: Mutex::new(DelegatedFake::default()),
            app_cert_der: cert_der,
            app_public_key: public,
        });

        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http_addr = http.local_addr().unwrap();
        *state.http_addr.lock().unwrap() = Some(http_addr);
        let app = axum::Router::new()
            .route("/{tenant}/oauth2/v2.0/token", axum::routing::post(token))
            .route(
                "/{tenant}/oauth2/v2.0/devicecode",
                axum::routing::post(devicecode),
            )
            .route(
                "/{tenant}/oauth2/v2.0/authorize",
                axum::routing::get(authorize),
            )
            .with_state(state.clone());
        tokio::spawn(async move {
            let _ = axum::serve(http, app).await;
        });

        let ck = rcgen::generate_simple_self_signed(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
        ])
        .unwrap();
        let smtp_ca_pem = ck.cert.pem();
        let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![ck.cert.der().clone()],
            PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into()),
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let smtp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let smtp_addr = smtp.local_addr().unwrap();
        let st = state.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = smtp.accept().await {
                let _ = tcp.set_nodelay(true);
                let (st, acceptor) = (st.clone(), acceptor.clone());
                tokio::spawn(async move {
                    let _ = smtp_session(tcp, acceptor, st).await;
                });
            }
        });
        FakeExchange {
            http_addr,
            smtp_addr,
            state,
            smtp_ca_pem,
        }
    }

    pub fn authority(&self) -> String {
        format!("http://{}", self.http_addr)
    }

    pub fn delivered(&self) -> Vec<Delivered> {
        self.state.delivered.lock().unwrap().clone()
    }

    /// How many messages were accepted (without copying them, for polling under load).
    pub fn delivered_count(&self) -> usize {
        self.state.delivered.lock().unwrap().len()
    }

    pub fn faults(&self) -> std::sync::MutexGuard<'_, Faults> {
        self.state.faults.lock().unwrap()
    }

    pub fn token_requests(&self) -> u64 {
        self.state.token_requests.load(Ordering::SeqCst)
    }

    pub fn issued_tokens(&self) -> Vec<String> {
        self.state.issued.lock().unwrap().clone()
    }

    /// Forgets every issued token, as a revocation would.
    pub fn revoke_tokens(&self) {
        self.state.tokens.lock().unwrap().clear();
    }

    pub fn delegated(&self) -> std::sync::MutexGuard<'_, DelegatedFake> {
        self.state.delegated.lock().unwrap()
    }

    /// Revokes every refresh token issued so far: each is refused with `invalid_grant` and
    /// AADSTS`code` (50173 revoked, 700082 expired, 70043 sign-in frequency, 50076 MFA, 65001
    /// consent). Refresh tokens from a later sign-in work.
    pub fn revoke_grants(&self, code: u32) {
        let mut d = self.state.delegated.lock().unwrap();
        let live: Vec<String> = d.refresh_tokens.drain().collect();
        for t in live {
            d.revoked.insert(t, code);
        }
    }

    pub fn set_rate(&self, limit: usize, window: Duration) {
        let mut r = self.state.rate.lock().unwrap();
        r.0 = limit;
        r.1 = window;
    }
}

fn aad_error(status: StatusCode, error: &str, code: u32, text: &str) -> axum::response::Response {
    let body = serde_json::json!({
        "error": error,
        "error_description": format!("AADSTS{code}: {text}\r\nTrace ID: 0000\r\nCorrelation ID: 1111\r\nTimestamp: 2026-11-24 00:00:00Z"),
        "error_codes": [code],
        "timestamp": "2026-11-24 00:00:00Z",
        "trace_id": "0000",
        "correlation_id": "1111",
        "error_uri": format!("https://login.microsoftonline.com/error?code={code}"),
    });
    (status, axum::Json(body)).into_response()
}

fn verify_assertion(st: &FakeState, jwt: &str, aud: &str) -> Result<(), String> {
    let parts: Vec<&str> = jwt.split('.').collect();
    if parts.len() != 3 {
        return Err("not a JWT".into());
    }
    let header: serde_json::Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(parts[0])
            .map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    let claims: serde_json::Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(parts[1])
            .map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    let sig = URL_SAFE_NO_PAD
        .decode(parts[2])
        .map_err(|e| e.to_string())?;
    let alg: &dyn ring::signature::VerificationAlgorithm = match header["alg"].as_str() {
        Some("PS256") => {
            let want = URL_SAFE_NO_PAD.encode(ring::digest::digest(
                &ring::digest::SHA256,
                &st.app_cert_der,
            ));
            if header["x5t#S256"].as_str() != Some(want.as_str()) {
                return Err("x5t#S256 does not match the registered certificate".into());
            }
            &ring::signature::RSA_PSS_2048_8192_SHA256
        }
        Some("RS256") => {
            let want = URL_SAFE_NO_PAD.encode(ring::digest::digest(
                &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
                &st.app_cert_der,
            ));
            if header["x5t"].as_str() != Some(want.as_str()) {
                return Err("x5t does not match the registered certificate".into());
            }
            &ring::signature::RSA_PKCS1_2048_8192_SHA256
        }
        other => return Err(format!("unsupported alg {other:?}")),
    };
    let input = format!("{}.{}", parts[0], parts[1]);
    ring::signature::UnparsedPublicKey::new(alg, &st.app_public_key)
        .verify(input.as_bytes(), &sig)
        .map_err(|_| "bad signature".to_string())?;
    if claims["aud"].as_str() != Some(aud) {
        return Err(format!("aud {} != {aud}", claims["aud"]));
    }
    if claims["iss"].as_str() != Some(CLIENT_ID) || claims["sub"].as_str() != Some(CLIENT_ID) {
        return Err("iss/sub".into());
    }
    let now = now_secs();
    let exp = claims["exp"].as_u64().unwrap_or(0);
    if exp <= now
        || exp > now + 700
        || claims["nbf"].as_u64().unwrap_or(u64::MAX) > now + 60
        || claims["jti"].as_str().is_none()
    {
        return Err("time claims or jti".into());
    }
    Ok(())
}

async fn token(
    State(st): State<Arc<FakeState>>,
    Path(tenant): Path<String>,
    axum::Form(form): axum::Form<HashMap<String, String>>,
) -> axum::response::Response {
    st.token_requests.fetch_add(1, Ordering::SeqCst);
    if let Some((status, body)) = st.token_error.lock().unwrap().clone() {
        return (StatusCode::from_u16(status).unwrap(), axum::Json(body)).into_response();
    }
    if tenant != TENANT {
        return aad_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            90002,
            &format!("Tenant '{tenant}' not found."),
        );
    }
    if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        if let Some(response) = delegated_token(&st, &form) {
            return response;
        }
        return aad_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            70003,
            "grant type",
        );
    }
    if form.get("client_id").map(String::as_str) != Some(CLIENT_ID) {
        return aad_error(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            700016,
            "Application not found in the directory.",
        );
    }
    if form.get("scope").map(String::as_str) != Some("https://outlook.office365.com/.default") {
        return aad_error(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            70011,
            "The provided value for scope is not valid.",
        );
    }
    match (form.get("client_secret"), form.get("client_assertion")) {
        (Some(s), None) if secret_accepted(&st, s) => {}
        (Some(_), None) => {
            return aad_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                7000215,
                "Invalid client secret provided.",
            );
        }
        (None, Some(jwt)) => {
            let http = st.http_addr.lock().unwrap().unwrap();
            let aud = format!("http://{http}/{TENANT}/oauth2/v2.0/token");
            if form.get("client_assertion_type").map(String::as_str)
                != Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
            {
                return aad_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    7000218,
                    "client_assertion_type",
                );
            }
            if let Err(why) = verify_assertion(&st, jwt, &aud) {
                return aad_error(
                    StatusCode::UNAUTHORIZED,
                    "invalid_client",
                    700027,
                    &format!("Client assertion failed signature validation: {why}"),
                );
            }
        }
        _ => {
            return aad_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                7000218,
                "The request body must contain client_assertion or client_secret.",
            );
        }
    }
    let lifetime = *st.lifetime.lock().unwrap();
    let exp = now_secs() + lifetime.as_secs().max(1);
    let payload = serde_json::json!({
        "aud": "https://outlook.office365.com", "roles": ["SMTP.SendAsApp"], "tid": "9999-tenant-guid",
        "appid": CLIENT_ID, "exp": exp, "iat": now_secs(), "jti": format!("{:016x}", fastrand::u64(..)),
    });
    let tok = format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(payload.to_string()),
        URL_SAFE_NO_PAD.encode(fastrand::u64(..).to_be_bytes())
    );
    st.tokens
        .lock()
        .unwrap()
        .insert(tok.clone(), Instant::now() + lifetime);
    st.issued.lock().unwrap().push(tok.clone());
    axum::Json(serde_json::json!({"token_type": "Bearer", "expires_in": lifetime.as_secs().max(1), "ext_expires_in": lifetime.as_secs().max(1), "access_token": tok}))
        .into_response()
}

fn random_id(prefix: &str) -> String {
    format!(
        "{prefix}{:016x}{:016x}",
        fastrand::u64(..),
        fastrand::u64(..)
    )
}

/// The delegated grants at the token endpoint; `None` for other grant types.
fn delegated_token(
    st: &FakeState,
    form: &HashMap<String, String>,
) -> Option<axum::response::Response> {
    let grant = form.get("grant_type").map(String::as_str)?;
    if !matches!(
        grant,
        "refresh_token" | "authorization_code" | "urn:ietf:params:oauth:grant-type:device_code"
    ) {
        return None;
    }
    let bad = |error: &str, code: u32, text: &str| {
        Some(aad_error(StatusCode::BAD_REQUEST, error, code, text))
    };
    if form.get("client_id").map(String::as_str) != Some(CLIENT_ID) {
        return bad(
            "unauthorized_client",
            700016,
            "Application not found in the directory.",
        );
    }
    if let Some(secret) = form.get("client_secret")
        && secret != SECRET
    {
        return Some(aad_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            7000215,
            "Invalid client secret provided.",
        ));
    }
    // Device-code polls carry no scope (RFC 8628); the device code request had it.
    if grant == "refresh_token" && form.get("scope").map(String::as_str) != Some(DELEGATED_SCOPE) {
        return bad(
            "invalid_scope",
            70011,
            "The provided value for scope is not valid.",
        );
    }
    let mut d = st.delegated.lock().unwrap();
    match grant {
        "refresh_token" => {
            let rt = form.get("refresh_token").cloned().unwrap_or_default();
            if let Some(code) = d.revoked.get(&rt).copied() {
                return bad("invalid_grant", code, "The refresh token has been revoked.");
            }
            // Single use: stricter than Entra, so a relay that keeps an old token is caught.
            if !d.refresh_tokens.remove(&rt) {
                return bad(
                    "invalid_grant",
                    70000,
                    "Provided grant is invalid or malformed.",
                );
            }
            d.refreshes += 1;
        }
        "authorization_code" => {
            let code = form.get("code").cloned().unwrap_or_default();
            let Some(c) = d.codes.remove(&code) else {
                return bad(
                    "invalid_grant",
                    54005,
                    "OAuth2 Authorization code was already redeemed.",
                );
            };
            if form.get("redirect_uri") != Some(&c.redirect_uri) {
                return bad(
                    "invalid_grant",
                    50011,
                    "The redirect URI does not match the one of the authorization request.",
                );
            }
            let verifier = form.get("code_verifier").cloned().unwrap_or_default();
            let challenge = URL_SAFE_NO_PAD.encode(ring::digest::digest(
                &ring::digest::SHA256,
                verifier.as_bytes(),
            ));
            if challenge != c.challenge {
                return bad(
                    "invalid_grant",
                    501481,
                    "The Code_Verifier does not match the code_challenge supplied in the authorization request.",
                );
            }
        }
        _ => {
            d.device_polls.push(Instant::now());
            let dc = form.get("device_code").cloned().unwrap_or_default();
            let Some(dev) = d.devices.get_mut(&dc) else {
                return bad("invalid_grant", 70000, "bad_verification_code");
            };
            if dev.slow_down {
                dev.slow_down = false;
                return bad("slow_down", 70016, "Slow down.");
            }
            if dev.pending_left > 0 {
                dev.pending_left -= 1;
                return bad(
                    "authorization_pending",
                    70016,
                    "OAuth 2.0 device flow error. Authorization is pending.",
                );
            }
            match dev.outcome {
                DeviceOutcome::Approve => {
                    d.devices.remove(&dc);
                }
                DeviceOutcome::Expired => {
                    return bad(
                        "expired_token",
                        70020,
                        "The provided value for the input parameter 'device_code' is not valid. This device code has expired.",
                    );
                }
                DeviceOutcome::AccessDenied => {
                    return bad("access_denied", 70000, "The user denied the request.");
                }
                DeviceOutcome::Declined => {
                    return bad(
                        "authorization_declined",
                        70000,
                        "The end user declined the authorization request.",
                    );
                }
            }
        }
    }
    let refresh = random_id("rt-");
    d.refresh_tokens.insert(refresh.clone());
    d.issued_refresh.push(refresh.clone());
    drop(d);
    let lifetime = *st.lifetime.lock().unwrap();
    let exp = now_secs() + lifetime.as_secs().max(1);
    let payload = serde_json::json!({
        "aud": "https://outlook.office.com", "scp": "SMTP.Send", "upn": MAILBOX,
        "tid": "9999-tenant-guid", "appid": CLIENT_ID, "exp": exp, "iat": now_secs(),
        "jti": format!("{:016x}", fastrand::u64(..)),
    });
    let tok = format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(payload.to_string()),
        URL_SAFE_NO_PAD.encode(fastrand::u64(..).to_be_bytes())
    );
    st.tokens
        .lock()
        .unwrap()
        .insert(tok.clone(), Instant::now() + lifetime);
    st.issued.lock().unwrap().push(tok.clone());
    Some(
        axum::Json(serde_json::json!({
            "token_type": "Bearer", "scope": "https://outlook.office.com/SMTP.Send",
            "expires_in": lifetime.as_secs().max(1), "ext_expires_in": lifetime.as_secs().max(1),
            "access_token": tok, "refresh_token": refresh,
        }))
        .into_response(),
    )
}

async fn devicecode(
    State(st): State<Arc<FakeState>>,
    Path(tenant): Path<String>,
    axum::Form(form): axum::Form<HashMap<String, String>>,
) -> axum::response::Response {
    if tenant != TENANT {
        return aad_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            90002,
            &format!("Tenant '{tenant}' not found."),
        );
    }
    if form.get("client_id").map(String::as_str) != Some(CLIENT_ID) {
        return aad_error(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            700016,
            "Application not found in the directory.",
        );
    }
    if form.get("scope").map(String::as_str) != Some(DELEGATED_SCOPE) {
        return aad_error(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            70011,
            "The provided value for scope is not valid.",
        );
    }
    let mut d = st.delegated.lock().unwrap();
    let device_code = random_id("dc-");
    let user_code = format!("F{:08X}", fastrand::u32(..));
    let dev = Device {
        pending_left: d.device_pending_polls,
        slow_down: d.device_slow_down,
        outcome: d.device_outcome,
    };
    d.devices.insert(device_code.clone(), dev);
    let interval = d.device_interval;
    axum::Json(serde_json::json!({
        "device_code": device_code, "user_code": user_code,
        "verification_uri": "https://microsoft.com/devicelogin",
        "expires_in": 900, "interval": interval,
        "message": format!("To sign in, use a web browser to open the page https://microsoft.com/devicelogin and enter the code {user_code} to authenticate."),
    }))
    .into_response()
}

/// The user's browser at Entra: consent is given at once, and the browser is sent back.
async fn authorize(
    State(st): State<Arc<FakeState>>,
    Path(tenant): Path<String>,
    axum::extract::Query(q): axum::extract::Query<HashMap<String, String>>,
) -> axum::response::Response {
    let ok = tenant == TENANT
        && q.get("client_id").map(String::as_str) == Some(CLIENT_ID)
        && q.get("response_type").map(String::as_str) == Some("code")
        && q.get("code_challenge_method").map(String::as_str) == Some("S256")
        && q.get("scope").map(String::as_str) == Some(DELEGATED_SCOPE);
    let (Some(redirect), Some(challenge), Some(state)) = (
        q.get("redirect_uri"),
        q.get("code_challenge"),
        q.get("state"),
    ) else {
        return (
            StatusCode::BAD_REQUEST,
            "missing redirect_uri, code_challenge or state",
        )
            .into_response();
    };
    if !ok {
        return (StatusCode::BAD_REQUEST, "bad authorize request").into_response();
    }
    let code = random_id("code-");
    st.delegated.lock().unwrap().codes.insert(
        code.clone(),
        Code {
            challenge: challenge.clone(),
            redirect_uri: redirect.clone(),
        },
    );
    let Ok(mut back) = reqwest::Url::parse(redirect) else {
        return (StatusCode::BAD_REQUEST, "bad redirect_uri").into_response();
    };
    back.query_pairs_mut()
        .append_pair("code", &code)
        .append_pair("state", state);
    (
        StatusCode::FOUND,
        [(axum::http::header::LOCATION, back.to_string())],
    )
        .into_response()
}

struct ConnGuard {
    st: Arc<FakeState>,
    mailbox: Option<String>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        if let Some(m) = &self.mailbox
            && let Ok(mut c) = self.st.conns.lock()
            && let Some(n) = c.get_mut(m)
        {
            *n = n.saturating_sub(1);
        }
    }
}

fn ehlo(tls: bool, pipelining: bool, f: &Faults) -> String {
    if let Some(r) = &f.ehlo_reply {
        return format!("{r}\r\n");
    }
    let last = match (tls, f.no_auth_after_tls) {
        (true, false) => "250-AUTH LOGIN XOAUTH2\r\n",
        (true, true) => "",
        (false, _) => "250-STARTTLS\r\n",
    };
    let name = if f.masked {
        "******************************"
    } else {
        "fake.outlook.office365.com Hello [127.0.0.1]"
    };
    let pipelining = if pipelining { "250-PIPELINING\r\n" } else { "" };
    format!(
        "250-{name}\r\n250-SIZE 157286400\r\n{pipelining}250-DSN\r\n250-ENHANCEDSTATUSCODES\r\n{last}250-8BITMIME\r\n250-BINARYMIME\r\n250-CHUNKING\r\n250 SMTPUTF8\r\n"
    )
}

fn check_xoauth2(st: &FakeState, b64: &str) -> Result<String, String> {
    let raw = STANDARD
        .decode(b64.trim())
        .map_err(|_| "501 5.5.2 Cannot Decode response".to_string())?;
    let text = String::from_utf8(raw).map_err(|_| "501 5.5.2 bad".to_string())?;
    let fail = || "535 5.7.3 Authentication unsuccessful [FAKE.prod.outlook.com]".to_string();
    let mut user = None;
    let mut bearer = None;
    for part in text.split('\x01') {
        if let Some(u) = part.strip_prefix("user=") {
            user = Some(u.to_string());
        } else if let Some(a) = part.strip_prefix("auth=Bearer ") {
            bearer = Some(a.to_string());
        }
    }
    let (Some(user), Some(bearer)) = (user, bearer) else {
        return Err(fail());
    };
    let valid = st
        .tokens
        .lock()
        .unwrap()
        .get(&bearer)
        .is_some_and(|exp| *exp > Instant::now());
    if !valid || !st.mailboxes.lock().unwrap().contains(&user) {
        return Err(fail());
    }
    Ok(user)
}

async fn smtp_session(
    tcp: tokio::net::TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    st: Arc<FakeState>,
) -> std::io::Result<()> {
    let mut io: BufReader<Box<dyn Io>> = BufReader::new(Box::new(tcp));
    let mut tls = false;
    let mut guard = ConnGuard {
        st: st.clone(),
        mailbox: None,
    };
    let mut from: Option<String> = None;
    let mut rcpts: Vec<String> = Vec::new();
    let banner = {
        let f = st.faults.lock().unwrap();
        match (&f.greeting, f.masked) {
            (Some(g), _) => format!("{g}\r\n"),
            (None, true) => "220 ***************************************\r\n".to_string(),
            (None, false) => {
                "220 FAKE.outlook.office365.com Microsoft ESMTP MAIL Service ready\r\n".to_string()
            }
        }
    };
    io.get_mut().write_all(banner.as_bytes()).await?;
    if !banner.starts_with("220") {
        return Ok(());
    }
    loop {
        let mut line = String::new();
        if io.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let cmd = line.trim_end().to_string();
        let upper = cmd.to_ascii_uppercase();
        let reply: String = if upper.starts_with("EHLO") || upper.starts_with("HELO") {
            let f = st.faults.lock().unwrap();
            ehlo(tls, st.pipelining.load(Ordering::SeqCst), &f)
        } else if upper == "STARTTLS" {
            io.get_mut()
                .write_all(b"220 2.0.0 SMTP server ready\r\n")
                .await?;
            let inner = io.into_inner();
            // Only a plain TcpStream reaches here: the fake never offers STARTTLS twice.
            let s = acceptor.accept(Downcast(inner)).await?;
            io = BufReader::new(Box::new(s));
            tls = true;
            continue;
        } else if upper.starts_with("AUTH") {
            if !tls {
                st.auth_before_tls.fetch_add(1, Ordering::SeqCst);
                "504 5.7.4 Unrecognized authentication type\r\n".into()
            } else if !upper.starts_with("AUTH XOAUTH2") {
                "504 5.7.4 Unrecognized authentication type\r\n".into()
            } else {
                let initial = cmd.split_whitespace().nth(2).map(str::to_string);
                let payload = match initial {
                    Some(p) => {
                        st.auth_forms.lock().unwrap().push("initial");
                        p
                    }
                    None => {
                        st.auth_forms.lock().unwrap().push("two-step");
                        io.get_mut().write_all(b"334 \r\n").await?;
                        let mut l = String::new();
                        io.read_line(&mut l).await?;
                        l
                    }
                };
                if st.faults.lock().unwrap().auth_challenge {
                    // {"status":"401","schemes":"Bearer"}
                    io.get_mut()
                        .write_all(b"334 eyJzdGF0dXMiOiI0MDEiLCJzY2hlbWVzIjoiQmVhcmVyIn0=\r\n")
                        .await?;
                    let mut l = String::new();
                    io.read_line(&mut l).await?;
                    io.get_mut()
                        .write_all(b"535 5.7.8 Username and Password not accepted\r\n")
                        .await?;
                    continue;
                }
                let forced = st.faults.lock().unwrap().auth_always.clone();
                match (forced, check_xoauth2(&st, &payload)) {
                    (Some(f), _) => format!("{f}\r\n"),
                    (None, Err(e)) => format!("{e}\r\n"),
                    (None, Ok(user)) => {
                        let admitted = {
                            let mut c = st.conns.lock().unwrap();
                            let n = c.entry(user.clone()).or_insert(0);
                            if *n >= 3 {
                                false
                            } else {
                                *n += 1;
                                st.max_conns_seen.fetch_max(*n, Ordering::SeqCst);
                                true
                            }
                        };
                        if admitted {
                            guard.mailbox = Some(user);
                            st.sessions.fetch_add(1, Ordering::SeqCst);
                        }
                        if !admitted {
                            st.throttle_replies.fetch_add(1, Ordering::SeqCst);
                            io.get_mut()
                                .write_all(b"432 4.3.2 Concurrent connections limit exceeded. Visit https://aka.ms/concurrent_sending for more information. [FAKE]\r\n")
                                .await?;
                            return Ok(());
                        }
                        "235 2.7.0 Authentication successful\r\n".into()
                    }
                }
            }
        } else if upper.starts_with("MAIL FROM:") {
            if !io.buffer().is_empty() {
                st.pipelined_groups.fetch_add(1, Ordering::SeqCst);
            }
            if guard.mailbox.is_none() {
                "530 5.7.57 Client not authenticated to send mail. [FAKE]\r\n".into()
            } else if let Some(f) = pop_mail_fault(&st) {
                let delay = st.faults.lock().unwrap().mail_fault_delay;
                tokio::time::sleep(delay).await;
                let code = f.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
                st.mail_log.lock().unwrap().push((Instant::now(), code));
                let close = f.starts_with("421");
                io.get_mut()
                    .write_all(format!("{f}\r\n").as_bytes())
                    .await?;
                if close {
                    return Ok(());
                }
                continue;
            } else {
                let over = {
                    let mut r = st.rate.lock().unwrap();
                    let (limit, window) = (r.0, r.1);
                    let now = Instant::now();
                    while r
                        .2
                        .front()
                        .is_some_and(|t| now.duration_since(*t) >= window)
                    {
                        r.2.pop_front();
                    }
                    r.2.len() >= limit
                };
                if over {
                    st.mail_log.lock().unwrap().push((Instant::now(), 421));
                    st.throttle_replies.fetch_add(1, Ordering::SeqCst);
                    io.get_mut().write_all(b"421 4.4.2 Message submission rate for this client has exceeded the configured limit\r\n").await?;
                    return Ok(());
                }
                st.mail_log.lock().unwrap().push((Instant::now(), 250));
                let addr = cmd[10..].trim().trim_start_matches('<');
                let addr = addr.split('>').next().unwrap_or("").to_string();
                from = Some(addr);
                rcpts.clear();
                "250 2.1.0 Sender OK\r\n".into()
            }
        } else if upper.starts_with("RCPT TO:") {
            let addr = cmd[8..]
                .trim()
                .trim_start_matches('<')
                .split('>')
                .next()
                .unwrap_or("")
                .to_string();
            if from.is_none() {
                "503 5.5.2 Need mail command\r\n".into()
            } else if let Some(r) = st.faults.lock().unwrap().rcpt_reject.get(&addr).cloned() {
                format!("{r}\r\n")
            } else {
                rcpts.push(addr);
                "250 2.1.5 Recipient OK\r\n".into()
            }
        } else if upper == "DATA" {
            if rcpts.is_empty() {
                "503 5.5.2 Need rcpt command\r\n".into()
            } else {
                io.get_mut()
                    .write_all(b"354 Start mail input; end with <CRLF>.<CRLF>\r\n")
                    .await?;
                let drop_now = {
                    let mut f = st.faults.lock().unwrap();
                    if f.drop_mid_data > 0 {
                        f.drop_mid_data -= 1;
                        true
                    } else {
                        false
                    }
                };
                let mut data = Vec::new();
                loop {
                    let mut l = Vec::new();
                    if io.read_until(b'\n', &mut l).await? == 0 {
                        return Ok(());
                    }
                    if drop_now {
                        // Hang up in the middle of the message, without a reply.
                        return Ok(());
                    }
                    if l == b".\r\n" {
                        break;
                    }
                    let l = if l.starts_with(b".") { &l[1..] } else { &l[..] };
                    data.extend_from_slice(l);
                }
                let mailbox = guard.mailbox.clone().unwrap_or_default();
                let mail_from = from.take().unwrap_or_default();
                let scripted = {
                    let mut f = st.faults.lock().unwrap();
                    f.data_end_once
                        .pop_front()
                        .or_else(|| f.data_end_always.clone())
                };
                let may_send_as = mail_from.eq_ignore_ascii_case(&mailbox)
                    || st.send_as.lock().unwrap().contains(&mail_from);
                let header_from_ok = header_from(&data).is_none_or(|f| {
                    f.eq_ignore_ascii_case(&mailbox) || st.send_as.lock().unwrap().contains(&f)
                });
                if let Some(f) = scripted {
                    format!("{f}\r\n")
                } else if !may_send_as || !header_from_ok {
                    format!(
                        "554 5.2.252 SendAsDenied; {mailbox} not allowed to send as {mail_from}; STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied; Failed to process message due to a permanent exception with message [BeginDiagnosticData]Cannot submit message.\r\n"
                    )
                } else {
                    st.rate.lock().unwrap().2.push_back(Instant::now());
                    st.delivered.lock().unwrap().push(Delivered {
                        mailbox,
                        mail_from,
                        rcpts: std::mem::take(&mut rcpts),
                        data,
                    });
                    if st.faults.lock().unwrap().close_after_data {
                        io.get_mut()
                            .write_all(
                                b"250 2.0.0 OK <fake@FAKE.prod.outlook.com> [Hostname=FAKE]\r\n",
                            )
                            .await?;
                        return Ok(());
                    }
                    "250 2.0.0 OK <fake@FAKE.prod.outlook.com> [Hostname=FAKE]\r\n".into()
                }
            }
        } else if upper == "RSET" {
            from = None;
            rcpts.clear();
            "250 2.0.0 Resetting\r\n".into()
        } else if upper == "NOOP" {
            "250 2.0.0 OK\r\n".into()
        } else if upper == "QUIT" {
            io.get_mut()
                .write_all(b"221 2.0.0 Service closing transmission channel\r\n")
                .await?;
            return Ok(());
        } else {
            "500 5.3.3 Unrecognized command\r\n".into()
        };
        io.get_mut().write_all(reply.as_bytes()).await?;
    }
}

fn pop_mail_fault(st: &FakeState) -> Option<String> {
    st.faults.lock().unwrap().mail_once.pop_front()
}

/// The address in the message's `From:` header, if any.
fn header_from(data: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(data);
    let headers = text.split("\r\n\r\n").next()?;
    let mut unfolded = String::new();
    for l in headers.split("\r\n") {
        if l.starts_with([' ', '\t']) {
            unfolded.push_str(l);
        } else {
            unfolded.push('\n');
            unfolded.push_str(l);
        }
    }
    let line = unfolded
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("from:"))?;
    let v = &line[5..];
    match (v.rfind('<'), v.rfind('>')) {
        (Some(a), Some(b)) if a < b => Some(v[a + 1..b].trim().to_string()),
        _ => Some(v.trim().to_string()),
    }
}

/// Lets the boxed plain stream be handed to the TLS acceptor.
struct Downcast(Box<dyn Io>);

impl tokio::io::AsyncRead for Downcast {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Downcast {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut *self.0).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.0).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

/// Whether the token endpoint takes `secret` (see [`Faults::accepted_secrets`]).
fn secret_accepted(st: &FakeState, secret: &str) -> bool {
    let faults = st.faults.lock().unwrap();
    if faults.accepted_secrets.is_empty() {
        secret == SECRET
    } else {
        faults.accepted_secrets.iter().any(|s| s == secret)
    }
}

//! The oauth2 crate set up for Entra ID's v2.0 endpoints, for the delegated flows (device
//! authorization, authorization code + PKCE, refresh-token grant).
//!
//! Entra's error JSON carries `error_codes` (the AADSTS numbers the advice is keyed on), which
//! oauth2's standard error type drops; [`EntraError`] keeps it. The HTTP client is
//! [`super::http_client`] (no redirects, bounded timeouts, `ca_file`). A confidential client's
//! secret goes in the request body (Entra's documented form); a certificate goes as a client
//! assertion through [`ClientAuth::extra_params`].

use std::fmt;

use oauth2::basic::{
    BasicRevocationErrorResponse, BasicTokenIntrospectionResponse, BasicTokenResponse,
};
use oauth2::{
    AuthType, AuthUrl, ClientId, ClientSecret, DeviceAuthorizationUrl, EndpointNotSet, EndpointSet,
    StandardRevocableToken, TokenUrl,
};
use serde::{Deserialize, Serialize};

use super::assertion::AssertionSigner;
use crate::config::{AccountConfig, AssertionAlgorithm};

/// Entra's error response (reference §4.7), with `error_codes` kept.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EntraError {
    pub error: String,
    #[serde(default)]
    pub error_description: Option<String>,
    #[serde(default)]
    pub error_codes: Vec<u32>,
}

impl EntraError {
    /// `error_codes[0]`, the AADSTS number.
    pub fn code(&self) -> Option<u32> {
        self.error_codes.first().copied()
    }
}

impl fmt::Display for EntraError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.error)?;
        if let Some(c) = self.code() {
            write!(f, " (AADSTS{c})")?;
        }
        Ok(())
    }
}

impl oauth2::ErrorResponse for EntraError {}

/// An oauth2 client with Entra's authorize, device code and token endpoints.
pub type EntraClient = oauth2::Client<
    EntraError,
    BasicTokenResponse,
    BasicTokenIntrospectionResponse,
    StandardRevocableToken,
    BasicRevocationErrorResponse,
    EndpointSet,
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointSet,
>;

/// How the app proves itself at the token endpoint. Read from disk at each request, so a
/// replaced secret or certificate needs no restart.
#[derive(Clone)]
pub enum ClientAuth {
    /// A public client: nothing (sending a secret would be AADSTS700025).
    Public,
    Secret(std::path::PathBuf),
    Certificate {
        cert: std::path::PathBuf,
        key: std::path::PathBuf,
        alg: AssertionAlgorithm,
    },
}

impl ClientAuth {
    pub fn of(a: &AccountConfig) -> ClientAuth {
        match (&a.client_secret_file, &a.certificate_file) {
            (Some(f), _) => ClientAuth::Secret(f.clone()),
            (None, Some(cert)) => ClientAuth::Certificate {
                cert: cert.clone(),
                key: a.private_key_file.clone().unwrap_or_else(|| cert.clone()),
                alg: a.assertion_algorithm,
            },
            (None, None) => ClientAuth::Public,
        }
    }

    pub fn is_certificate(&self) -> bool {
        matches!(self, ClientAuth::Certificate { .. })
    }

    /// The client secret, for clients that have one.
    pub fn secret(&self) -> Result<Option<String>, String> {
        match self {
            ClientAuth::Secret(path) => {
                let s = std::fs::read_to_string(path).map_err(|e| {
                    format!("cannot read client_secret_file {}: {e}", path.display())
                })?;
                let s = s.trim();
                if s.is_empty() {
                    return Err(format!("client_secret_file {} is empty", path.display()));
                }
                Ok(Some(s.to_string()))
            }
            _ => Ok(None),
        }
    }

    /// Form fields for a certificate credential (a fresh client assertion); empty otherwise.
    pub fn extra_params(
        &self,
        client_id: &str,
        token_url: &str,
    ) -> Result<Vec<(&'static str, String)>, String> {
        match self {
            ClientAuth::Certificate { cert, key, alg } => {
                // Valid long enough for a device code's polls (Entra's codes live 15 minutes
                // and the crate polls with one request's parameters).
                let jwt = AssertionSigner::load(cert, key, *alg)?
                    .assertion_valid_for(client_id, token_url, 20 * 60)
                    .map_err(|e| format!("cannot sign the client assertion: {e}"))?;
                Ok(vec![
                    (
                        "client_assertion_type",
                        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".to_string(),
                    ),
                    ("client_assertion", jwt),
                ])
            }
            _ => Ok(Vec::new()),
        }
    }
}

/// The client for account `a`, with its secret if it has one.
pub fn client(a: &AccountConfig, auth: &ClientAuth) -> Result<EntraClient, String> {
    let url = |what: &str, u: String| {
        reqwest::Url::parse(&u).map_err(|e| format!("bad {what} URL {u:?}: {e}"))
    };
    let mut c = oauth2::Client::new(ClientId::new(a.client_id.clone().unwrap_or_default()))
        .set_auth_type(AuthType::RequestBody)
        .set_auth_uri(AuthUrl::from_url(url(
            "authorize",
            a.entra_url("authorize"),
        )?))
        .set_device_authorization_url(DeviceAuthorizationUrl::from_url(url(
            "device code",
            a.entra_url("devicecode"),
        )?))
        .set_token_uri(TokenUrl::from_url(url("token", a.token_url())?));
    if let Some(secret) = auth.secret()? {
        c = c.set_client_secret(ClientSecret::new(secret));
    }
    Ok(c)
}

/// The scopes of `a`, as oauth2 wants them.
pub fn scopes(a: &AccountConfig) -> Vec<oauth2::Scope> {
    a.scope()
        .split_whitespace()
        .map(|s| oauth2::Scope::new(s.to_string()))
        .collect()
}

/// Who an access token belongs to (`upn`, `preferred_username` or `unique_name`), read
/// without verifying it; `None` for opaque tokens.
pub fn signed_in_user(access_token: &str) -> Option<String> {
    let claims = super::assertion::decode_claims(access_token)?;
    ["upn", "preferred_username", "unique_name"]
        .iter()
        .find_map(|k| claims.get(*k).and_then(|v| v.as_str()).map(str::to_string))
}

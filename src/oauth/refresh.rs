//! The refresh-token grant of a delegated account, through the oauth2 crate.
//!
//! Contract of [`TokenManager::refresh`]: the grant is read from the token file by the caller
//! (so the file always wins over memory); the rotated refresh token is saved atomically before
//! the access token is returned, and when it cannot be saved the access token is not used
//! (the old refresh token is spent, so the sign-in is lost: the error says to sign in again).
//! A sign-in that `exorelay login` wrote while the refresh was in the air is kept, not
//! overwritten by the rotation of the older grant.
//! Entra's answers keep their AADSTS code ([`super::entra::EntraError`]); a reply body is never
//! quoted in an error, since it may hold a token.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use super::store::{Grant, StoreError, TokenStore};
use super::{AccessToken, TokenError, TokenManager, advice, entra};
use crate::advice::Advice;
use crate::config::AccountConfig;

/// A delegated account's sign-in: its token file, and the account for building the client.
pub(super) struct Delegated {
    pub(super) store: TokenStore,
    pub(super) account: AccountConfig,
}

impl TokenManager {
    /// Maps an oauth2 failure to a [`TokenError`]; a reply body is never quoted (it may hold a
    /// token).
    fn oauth_error(
        &self,
        e: oauth2::RequestTokenError<oauth2::HttpClientError<reqwest::Error>, entra::EntraError>,
    ) -> TokenError {
        use oauth2::{HttpClientError, RequestTokenError};
        match e {
            RequestTokenError::ServerResponse(r) => self.fail(&r.error, r.code()),
            RequestTokenError::Request(HttpClientError::Reqwest(e)) => self.send_error(&e),
            RequestTokenError::Request(other) => self.transient(other.to_string()),
            // Not Entra's shape (a proxy's or gateway's error page or JSON): without Entra's
            // `error` it cannot be a verdict on the sign-in, so it is retried, never a pause.
            RequestTokenError::Parse(_, body) => {
                if serde_json::from_slice::<serde_json::Value>(&body).is_ok() {
                    self.transient("the token endpoint sent JSON that is not Entra's".into())
                } else {
                    self.transient("the token endpoint sent a reply that is not JSON".into())
                }
            }
            RequestTokenError::Other(what) => self.transient(what),
        }
    }

    fn local_config_error(&self, what: &str, cause: String, fix: String) -> TokenError {
        TokenError {
            error: what.into(),
            code: None,
            config: true,
            advice: Advice::new(cause, fix),
        }
    }

    /// The stored grant, or why there is none usable (both pause the account).
    fn stored_grant(
        &self,
        d: &Delegated,
        loaded: Result<Option<Grant>, StoreError>,
    ) -> Result<Grant, TokenError> {
        match loaded {
            Ok(Some(g)) => Ok(g),
            Ok(None) => Err(TokenError {
                error: "not_signed_in".into(),
                code: None,
                config: true,
                advice: advice::not_signed_in(&self.account, d.store.path(), None),
            }),
            Err(e) => Err(TokenError {
                error: "token_file".into(),
                code: None,
                config: true,
                advice: advice::not_signed_in(&self.account, d.store.path(), Some(&e.to_string())),
            }),
        }
    }

    /// Saves the rotated grant (off the async threads: it fsyncs), unless a newer sign-in
    /// was written meanwhile.
    async fn save_rotation(
        &self,
        d: &Delegated,
        replaced: String,
        rotated: Grant,
    ) -> Result<(), TokenError> {
        let store = d.store.clone();
        let saved = tokio::task::spawn_blocking(move || store.save_rotation(&replaced, &rotated))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|r| r.map_err(std::io::Error::other));
        if let Ok(false) = saved {
            tracing::info!(account = %self.account, "a new sign-in was saved during a refresh; keeping it");
        }
        saved
            .map(|_| ())
            .map_err(|e| {
                self.local_config_error(
                    "token_file",
                    format!("The rotated refresh token could not be saved ({e}), so the sign-in is lost."),
                    format!(
                        "Make the state folder {} writable by exorelay, then run exorelay login --account {}.",
                        d.store.path().parent().map(|p| p.display().to_string()).unwrap_or_default(),
                        self.account
                    ),
                )
            })
    }

    /// The refresh-token grant of a delegated account; persists the rotated refresh token
    /// before it returns the access token.
    pub(super) async fn refresh(
        &self,
        d: &Delegated,
        loaded: Result<Option<Grant>, StoreError>,
    ) -> Result<AccessToken, TokenError> {
        let grant = self.stored_grant(d, loaded)?;
        self.requests.fetch_add(1, Ordering::Relaxed);
        let fix =
            || "Check client_secret_file, or certificate_file and private_key_file.".to_string();
        let client = entra::client(&d.account, &self.credential)
            .map_err(|e| self.local_config_error("credential", format!("{e}."), fix()))?;
        let extra = self
            .credential
            .extra_params(&self.client_id, &self.token_url)
            .map_err(|e| self.local_config_error("credential", format!("{e}."), fix()))?;
        let rt = oauth2::RefreshToken::new(grant.refresh_token.clone());
        let mut request = client
            .exchange_refresh_token(&rt)
            .add_scopes(entra::scopes(&d.account));
        for (k, v) in extra {
            request = request.add_extra_param(k, v);
        }
        let sent = Instant::now();
        let response = request
            .request_async(&self.http)
            .await
            .map_err(|e| self.oauth_error(e))?;
        use oauth2::TokenResponse;
        let access = response.access_token().secret().clone();
        if access.is_empty() {
            return Err(self.fail("reply without access_token", None));
        }
        // Entra rotates the refresh token on every use; keep the old one only if none came.
        let replaced = grant.refresh_token.clone();
        let rotated = Grant {
            refresh_token: response
                .refresh_token()
                .map(|r| r.secret().clone())
                .unwrap_or(grant.refresh_token),
            obtained_at: chrono::Utc::now(),
            user: entra::signed_in_user(&access).or(grant.user),
        };
        self.save_rotation(d, replaced, rotated).await?;
        if let Ok(mut at) = self.refreshed_at.lock() {
            *at = Some(tokio::time::Instant::now());
        }
        let lifetime = response
            .expires_in()
            .unwrap_or(Duration::from_secs(3599))
            .max(Duration::from_secs(1));
        Ok(AccessToken {
            secret: Arc::from(access.as_str()),
            expires_at: sent + lifetime,
            expires_wall: SystemTime::now() + lifetime,
            lifetime,
        })
    }
}

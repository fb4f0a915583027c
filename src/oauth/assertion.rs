//! Client assertion JWTs for certificate credentials (Entra "private_key_jwt"), signed with the
//! rustls/ring key loader so no second crypto stack is needed.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rustls::SignatureScheme;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::SigningKey;

use crate::config::AssertionAlgorithm;

pub struct AssertionSigner {
    key: Arc<dyn SigningKey>,
    cert_der: Vec<u8>,
    alg: AssertionAlgorithm,
}

impl std::fmt::Debug for AssertionSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AssertionSigner")
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

impl AssertionSigner {
    /// Loads the certificate (first PEM block) and its private key (`key_file`, or the same file).
    pub fn load(
        cert_file: &std::path::Path,
        key_file: &std::path::Path,
        alg: AssertionAlgorithm,
    ) -> Result<AssertionSigner, String> {
        let cert = CertificateDer::pem_file_iter(cert_file)
            .map_err(|e| format!("cannot read certificate {}: {e}", cert_file.display()))?
            .next()
            .ok_or_else(|| format!("no certificate in {}", cert_file.display()))?
            .map_err(|e| format!("bad certificate in {}: {e}", cert_file.display()))?;
        let key = PrivateKeyDer::from_pem_file(key_file)
            .map_err(|e| format!("cannot read private key {}: {e}", key_file.display()))?;
        let key = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| {
            format!(
                "unsupported private key in {}: {e} (an RSA key is required)",
                key_file.display()
            )
        })?;
        let signer = AssertionSigner {
            key,
            cert_der: cert.as_ref().to_vec(),
            alg,
        };
        signer.scheme()?;
        Ok(signer)
    }

    /// The certificate's validity period (notBefore, notAfter), as Unix seconds.
    pub fn validity(&self) -> Result<(i64, i64), String> {
        let (_, cert) = x509_parser::parse_x509_certificate(&self.cert_der)
            .map_err(|e| format!("cannot parse the certificate: {e}"))?;
        let v = cert.validity();
        Ok((v.not_before.timestamp(), v.not_after.timestamp()))
    }

    fn scheme(&self) -> Result<Box<dyn rustls::sign::Signer>, String> {
        let wanted = match self.alg {
            AssertionAlgorithm::Ps256 => SignatureScheme::RSA_PSS_SHA256,
            AssertionAlgorithm::Rs256 => SignatureScheme::RSA_PKCS1_SHA256,
        };
        self.key.choose_scheme(&[wanted]).ok_or_else(|| {
            "the private key cannot make RSA signatures; Entra needs an RSA certificate".to_string()
        })
    }

    /// A fresh assertion (new `jti`, valid 5 minutes) for `client_id` at `token_url`.
    pub fn assertion(&self, client_id: &str, token_url: &str) -> Result<String, String> {
        self.assertion_valid_for(client_id, token_url, 300)
    }

    /// A fresh assertion valid `secs` seconds (for the interactive sign-in, whose device-code
    /// polls reuse one request for up to the code's 15 minutes).
    pub fn assertion_valid_for(
        &self,
        client_id: &str,
        token_url: &str,
        secs: u64,
    ) -> Result<String, String> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let header = match self.alg {
            AssertionAlgorithm::Ps256 => {
                let thumb = ring::digest::digest(&ring::digest::SHA256, &self.cert_der);
                serde_json::json!({"alg": "PS256", "typ": "JWT", "x5t#S256": URL_SAFE_NO_PAD.encode(thumb.as_ref())})
            }
            AssertionAlgorithm::Rs256 => {
                let thumb =
                    ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &self.cert_der);
                serde_json::json!({"alg": "RS256", "typ": "JWT", "x5t": URL_SAFE_NO_PAD.encode(thumb.as_ref())})
            }
        };
        let jti = format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            fastrand::u32(..),
            fastrand::u16(..),
            fastrand::u16(..0x1000),
            0x8000 | fastrand::u16(..0x4000),
            fastrand::u64(..1 << 48)
        );
        let claims = serde_json::json!({
            "aud": token_url, "iss": client_id, "sub": client_id, "jti": jti,
            "nbf": now, "iat": now, "exp": now + secs,
        });
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig = self
            .scheme()?
            .sign(input.as_bytes())
            .map_err(|e| format!("signing the client assertion failed: {e}"))?;
        Ok(format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig)))
    }
}

/// Decodes the claims of a JWT without checking it (for `doctor` output only).
pub fn decode_claims(jwt: &str) -> Option<serde_json::Value> {
    let payload = jwt.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    serde_json::from_slice(&bytes).ok()
}

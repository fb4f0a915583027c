//! AUTH PLAIN and AUTH LOGIN payloads (RFC 4616, draft-murchison-sasl-login). `*` cancels
//! (RFC 4954 §4) and is handled by the session.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

/// A user name and password from a device. `Debug` never shows the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SaslError {
    /// Not valid base64.
    Encoding,
    /// Decoded, but not the shape the mechanism requires.
    Malformed,
}

pub fn decode_b64(s: &str) -> Result<Vec<u8>, SaslError> {
    let s = s.trim();
    if s == "=" {
        return Ok(Vec::new());
    }
    STANDARD.decode(s).map_err(|_| SaslError::Encoding)
}

pub fn encode_b64(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

/// Decodes a PLAIN response: `authzid NUL authcid NUL password`. An authzid different from the
/// authcid (acting for someone else) is refused.
pub fn decode_plain(b64: &str) -> Result<Credentials, SaslError> {
    let raw = decode_b64(b64)?;
    let mut parts = raw.split(|&b| b == 0);
    let (Some(authz), Some(user), Some(pass), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(SaslError::Malformed);
    };
    let user = String::from_utf8(user.to_vec()).map_err(|_| SaslError::Malformed)?;
    let password = String::from_utf8(pass.to_vec()).map_err(|_| SaslError::Malformed)?;
    if user.is_empty() || (!authz.is_empty() && authz != user.as_bytes()) {
        return Err(SaslError::Malformed);
    }
    Ok(Credentials { user, password })
}

/// Decodes one LOGIN step (user name or password).
pub fn decode_text(b64: &str) -> Result<String, SaslError> {
    String::from_utf8(decode_b64(b64)?).map_err(|_| SaslError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain() {
        let c = decode_plain(&encode_b64(b"\0scanner\0s3cret")).unwrap();
        assert_eq!(c.user, "scanner");
        assert_eq!(c.password, "s3cret");
        assert!(decode_plain(&encode_b64(b"scanner\0scanner\0pw")).is_ok());
        assert_eq!(
            decode_plain(&encode_b64(b"admin\0scanner\0pw")),
            Err(SaslError::Malformed)
        );
        assert_eq!(decode_plain("!!!"), Err(SaslError::Encoding));
        assert!(!format!("{c:?}").contains("s3cret"));
    }
}

//! TLS material for the inbound listeners (rustls with the ring provider only).

use std::path::Path;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::ListenerConfig;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("no certificate configured")]
    Missing,
    #[error("cannot read certificate file {path}: {reason}; it must hold PEM 'CERTIFICATE' blocks")]
    Cert { path: String, reason: String },
    #[error(
        "cannot read private key file {path}: {reason}; it must hold one PEM private key (PKCS#8, PKCS#1 or SEC1)"
    )]
    Key { path: String, reason: String },
    #[error("certificate and key do not fit together: {0}")]
    Mismatch(String),
}

/// Makes sure the process-wide crypto provider is ring; harmless when called twice.
pub fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Loads the listener's certificate chain and key into a server config.
pub fn load_server_config(l: &ListenerConfig) -> Result<Arc<ServerConfig>, TlsError> {
    let (Some(cert), Some(key)) = (&l.cert, &l.key) else {
        return Err(TlsError::Missing);
    };
    server_config_from_files(cert, key)
}

pub fn server_config_from_files(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let cert_err = |reason: String| TlsError::Cert {
        path: cert.display().to_string(),
        reason,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| cert_err(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| cert_err(e.to_string()))?;
    if chain.is_empty() {
        return Err(cert_err("no certificate found".into()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
        path: key.display().to_string(),
        reason: e.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Mismatch(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| TlsError::Mismatch(e.to_string()))?;
    Ok(Arc::new(config))
}

/// If `e` (or anything in its source chain) is a TLS certificate failure, says what rustls
/// objected to. lettre and reqwest report handshake failures as connection errors with the
/// rustls error a few levels down, often inside nested `io::Error`s, whose `source()` skips the
/// error they wrap: so an `io::Error` is looked into with `get_ref()` instead.
pub fn certificate_problem(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<rustls::Error>()
            && matches!(
                r,
                rustls::Error::InvalidCertificate(_)
                    | rustls::Error::NoCertificatesPresented
                    | rustls::Error::UnsupportedNameType
            )
        {
            return Some(r.to_string());
        }
        cur = match err.downcast_ref::<std::io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => err.source(),
        };
    }
    None
}

//! Native TLS (`tls_cert`, `tls_key`): the certificate chain and key are read from their PEM
//! files at start, where a missing, unreadable or mismatched pair stops the server with a
//! message naming both files, and again on `SIGHUP` ([`Tls::reload`]), when a bad pair is
//! refused with the same message and the server keeps the pair it has. A reload changes what
//! new connections are offered; connections already open keep the one they began with.
//!
//! rustls with ring, the provider the rest of the workspace already uses. Only HTTP/1.1 is
//! offered in ALPN, since that is what the server speaks.

use std::path::Path;
use std::sync::{Arc, RwLock};

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsFiles;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the TLS certificate {path}: {reason}")]
    Cert { path: String, reason: String },
    #[error("cannot read the TLS key {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("the TLS key {key} does not belong to the certificate {cert}")]
    Pair { cert: String, key: String },
    #[error("the TLS certificate {cert} and key {key} cannot be used together: {reason}")]
    Unusable {
        cert: String,
        key: String,
        reason: String,
    },
}

/// The TLS configuration new connections are offered, replaceable while serving.
pub struct Tls {
    files: TlsFiles,
    current: RwLock<Arc<ServerConfig>>,
}

impl Tls {
    /// Read and check the pair named by `files`.
    pub fn load(files: &TlsFiles) -> Result<Arc<Tls>, TlsError> {
        let config = server_config(files)?;
        Ok(Arc::new(Tls {
            files: files.clone(),
            current: RwLock::new(config),
        }))
    }

    /// Read the files again; on success new connections get the new pair, on failure nothing
    /// changes.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = server_config(&self.files)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = config;
        Ok(())
    }

    /// The acceptor for a connection accepted now.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let config = self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        tokio_rustls::TlsAcceptor::from(config)
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }
}

fn shown(p: &Path) -> String {
    p.display().to_string()
}

fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let cert_err = |reason: String| TlsError::Cert {
        path: shown(&files.cert),
        reason,
    };
    let key_err = |reason: String| TlsError::Key {
        path: shown(&files.key),
        reason,
    };
    // Read first, so that "cannot read" (missing, permissions) is told apart from "not PEM".
    let cert_pem = std::fs::read(&files.cert).map_err(|e| cert_err(e.to_string()))?;
    let key_pem = std::fs::read(&files.key).map_err(|e| key_err(e.to_string()))?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_err(format!("not a PEM certificate chain ({e})")))?;
    if chain.is_empty() {
        return Err(cert_err(
            "no certificate in it (expected -----BEGIN CERTIFICATE-----)".into(),
        ));
    }
    if key_pem
        .windows(b"ENCRYPTED PRIVATE KEY".len())
        .any(|w| w == b"ENCRYPTED PRIVATE KEY")
        || key_pem
            .windows(b"Proc-Type: 4,ENCRYPTED".len())
            .any(|w| w == b"Proc-Type: 4,ENCRYPTED")
    {
        return Err(key_err(
            "it is encrypted with a passphrase, which a server starting unattended cannot \
             type; decrypt it once (`openssl pkey -in KEY -out KEY.plain`, mode 0600)"
                .into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        key_err(format!(
            "no PEM private key in it (PKCS#8, PKCS#1 or SEC1): {e}"
        ))
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| cert_err(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => TlsError::Pair {
                cert: shown(&files.cert),
                key: shown(&files.key),
            },
            other => TlsError::Unusable {
                cert: shown(&files.cert),
                key: shown(&files.key),
                reason: other.to_string(),
            },
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

//! TLS (and mTLS) on the xDS listener, with rustls.
//!
//! The server certificate and key are read from PEM files and read again
//! when either file changes (checked at each new connection, at most once a
//! second), so a certificate rotated on disk is served to the next
//! connection without a restart; a rotation that cannot be read is logged
//! and the previous certificate kept. With a client CA bundle, client
//! certificates are verified against it (required by default, as istiod's
//! 15012 requires them), and the client's SPIFFE identity (the URI SAN
//! `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`) is handed
//! to the ADS service, which refuses a proxy claiming another namespace
//! (see `server`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

/// How often the certificate files' modification times are looked at.
const RECHECK: Duration = Duration::from_secs(1);

/// Where the xDS TLS listener's credentials come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// PEM certificate chain of the server.
    pub cert_file: PathBuf,
    /// PEM private key of the server.
    pub key_file: PathBuf,
    /// PEM bundle of the CAs that sign client certificates; `None`: no
    /// client certificates (TLS only).
    pub client_ca_file: Option<PathBuf>,
    /// With a client CA: whether a client must present a certificate.
    pub require_client_cert: bool,
}

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or holds no usable PEM item.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// rustls refused the configuration (e.g. a key that does not match).
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// A client's SPIFFE identity, from its certificate's URI SAN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The whole SPIFFE ID, e.g. `spiffe://cluster.local/ns/a/sa/default`.
    pub spiffe_id: String,
    /// Its namespace (`/ns/<namespace>/`), when it follows Istio's form.
    pub namespace: Option<String>,
}

impl PeerIdentity {
    /// The identity in a DER certificate: its first `spiffe://` URI SAN.
    pub fn from_certificate(der: &CertificateDer<'_>) -> Option<Self> {
        let cert = webpki::EndEntityCert::try_from(der).ok()?;
        let spiffe_id = cert
            .valid_uri_names()
            .find(|u| u.starts_with("spiffe://"))?
            .to_string();
        let namespace = {
            let path = spiffe_id.strip_prefix("spiffe://")?.split_once('/')?.1;
            let mut parts = path.split('/');
            match (parts.next(), parts.next()) {
                (Some("ns"), Some(ns)) if !ns.is_empty() => Some(ns.to_string()),
                _ => None,
            }
        };
        Some(PeerIdentity {
            spiffe_id,
            namespace,
        })
    }
}

/// Builds server configurations from [`TlsSettings`], again whenever the
/// files change.
#[derive(Debug)]
pub struct Acceptor {
    settings: TlsSettings,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    config: Arc<ServerConfig>,
    stamps: Vec<Option<SystemTime>>,
    checked: Instant,
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn stamps(s: &TlsSettings) -> Vec<Option<SystemTime>> {
    [
        Some(&s.cert_file),
        Some(&s.key_file),
        s.client_ca_file.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
    .collect()
}

fn build(s: &TlsSettings) -> Result<Arc<ServerConfig>, TlsError> {
    let bad = |path: &Path, reason: String| TlsError::File {
        path: path.to_path_buf(),
        reason,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&read(&s.cert_file)?)
        .collect::<Result<_, _>>()
        .map_err(|e| bad(&s.cert_file, e.to_string()))?;
    if certs.is_empty() {
        return Err(bad(&s.cert_file, "no certificate in the file".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(&read(&s.key_file)?)
        .map_err(|e| bad(&s.key_file, e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &s.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for ca in CertificateDer::pem_slice_iter(&read(path)?) {
                let ca = ca.map_err(|e| bad(path, e.to_string()))?;
                roots.add(ca).map_err(|e| bad(path, e.to_string()))?;
            }
            if roots.is_empty() {
                return Err(bad(path, "no CA certificate in the file".into()));
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if s.require_client_cert {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            builder.with_client_cert_verifier(
                verifier
                    .build()
                    .map_err(|e| TlsError::Config(e.to_string()))?,
            )
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    // gRPC is HTTP/2 only.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

impl Acceptor {
    /// Reads the files once.
    ///
    /// # Errors
    ///
    /// A file that cannot be read or parsed, or a configuration rustls
    /// refuses (a key that does not match the certificate).
    pub fn new(settings: TlsSettings) -> Result<Self, TlsError> {
        let config = build(&settings)?;
        Ok(Acceptor {
            state: Mutex::new(State {
                config,
                stamps: stamps(&settings),
                checked: Instant::now(),
            }),
            settings,
        })
    }

    /// The configuration for a new connection: rebuilt first if a file
    /// changed since the last look (at most once a second).
    pub(crate) fn config(&self) -> Arc<ServerConfig> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.checked.elapsed() >= RECHECK {
            state.checked = Instant::now();
            let now = stamps(&self.settings);
            if now != state.stamps {
                match build(&self.settings) {
                    Ok(config) => {
                        tracing::info!(cert = %self.settings.cert_file.display(), "xDS TLS credentials reloaded");
                        state.config = config;
                        state.stamps = now;
                    }
                    Err(error) => {
                        // Likely mid-rotation (the key written before the
                        // certificate): try again at the next look.
                        tracing::warn!(%error, "xDS TLS credentials changed but cannot be used; serving the previous ones");
                    }
                }
            }
        }
        state.config.clone()
    }
}

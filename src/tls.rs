//! TLS termination: loading the certificate chain and key, ALPN (`h2`, `http/1.1`), and
//! replacing them when the files change or on SIGHUP, without dropping connections.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;

/// The current TLS server configuration; new handshakes use the latest one, connections
/// already established keep theirs.
pub struct Tls {
    cert: PathBuf,
    key: PathBuf,
    current: ArcSwap<ServerConfig>,
    stamp: ArcSwap<(Option<SystemTime>, Option<SystemTime>)>,
}

impl Tls {
    /// Loads the PEM certificate chain and private key named by `[server] tls`.
    pub fn load(cfg: &TlsConfig) -> Result<Tls, String> {
        let config = build(&cfg.cert, &cfg.key)?;
        Ok(Tls {
            cert: cfg.cert.clone(),
            key: cfg.key.clone(),
            current: ArcSwap::from_pointee(config),
            stamp: ArcSwap::from_pointee(stamps(&cfg.cert, &cfg.key)),
        })
    }

    /// An acceptor for the next handshake.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.load_full())
    }

    /// Reloads the files when their modification times changed. A bad new pair is
    /// refused (the old one keeps serving) and reported.
    pub fn reload_if_changed(&self) -> Result<bool, String> {
        let now = stamps(&self.cert, &self.key);
        if **self.stamp.load() == now {
            return Ok(false);
        }
        self.stamp.store(Arc::new(now));
        self.reload().map(|()| true)
    }

    /// Reloads the files unconditionally.
    pub fn reload(&self) -> Result<(), String> {
        let config = build(&self.cert, &self.key)?;
        self.current.store(Arc::new(config));
        Ok(())
    }
}

fn stamps(cert: &Path, key: &Path) -> (Option<SystemTime>, Option<SystemTime>) {
    let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    (m(cert), m(key))
}

fn build(cert: &Path, key: &Path) -> Result<ServerConfig, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("server.tls.cert {}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("server.tls.cert {}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "server.tls.cert {}: no certificate in the file",
            cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("server.tls.key {}: {e}", key.display()))?;
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("server.tls: {e}"))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| format!("server.tls: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

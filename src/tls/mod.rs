//! TLS for every listener: loading the certificate, generating a development one, hot reload.
//!
//! All listeners (HTTPS, and the TURN relay's TLS port) share one [`CertStore`]: a rustls certificate
//! resolver whose key can be swapped while connections are open. A swap affects only handshakes that
//! start after it; established connections keep the session they negotiated. This module never
//! serves anything itself.

mod dev_cert;
mod load;
mod reload;

use std::sync::{Arc, RwLock};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio::sync::watch;

pub use dev_cert::{ensure_dev_cert, renewal_due, DevCert, DevCertReason, DEV_CERT_VALIDITY};
pub use load::{load_certified_key, LoadError};
pub use reload::{spawn_reloader, Fingerprint};

/// The certificate currently served, swappable at run time.
///
/// rustls asks it for a key on every handshake (`resolve`); [`CertStore::replace`] swaps the key, and
/// [`CertStore::subscribe`] lets anyone wait for a reload attempt (tests, metrics) without polling.
#[derive(Debug)]
pub struct CertStore {
    /// The key handed to new handshakes. A std lock: held only to clone an `Arc`, never across await.
    current: RwLock<Arc<CertifiedKey>>,
    /// Counts of reload attempts and the last failure, so waiters can observe them.
    status: watch::Sender<ReloadStatus>,
}

/// What has happened to the certificate since start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadStatus {
    /// Successful replacements.
    pub reloads: u64,
    /// Reload attempts that kept the old certificate because the new files were unusable.
    pub failures: u64,
    /// Why the most recent attempt failed, if it did.
    pub last_error: Option<String>,
}

impl CertStore {
    /// A store serving `key` until replaced.
    pub fn new(key: CertifiedKey) -> Arc<Self> {
        Arc::new(CertStore {
            current: RwLock::new(Arc::new(key)),
            status: watch::Sender::new(ReloadStatus::default()),
        })
    }

    /// Serves `key` to every handshake from now on.
    pub fn replace(&self, key: CertifiedKey) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(key);
        self.status.send_modify(|s| {
            s.reloads += 1;
            s.last_error = None;
        });
    }

    /// Records that new files were refused and the old certificate is still served.
    pub fn record_failure(&self, error: String) {
        self.status.send_modify(|s| {
            s.failures += 1;
            s.last_error = Some(error);
        });
    }

    /// The key new handshakes get.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A receiver that changes on every reload attempt, successful or not.
    pub fn subscribe(&self) -> watch::Receiver<ReloadStatus> {
        self.status.subscribe()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// When the leaf certificate of `key` expires, as Unix seconds (`None` if it cannot be parsed).
pub fn not_after(key: &CertifiedKey) -> Option<i64> {
    let leaf = key.cert.first()?;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    Some(parsed.validity().not_after.timestamp())
}

/// The cipher suites offered, in the server's order of preference (Mozilla's "intermediate"
/// order): AEAD only, forward secret only, AES-128-GCM first (fast everywhere with AES
/// instructions), then AES-256-GCM, then ChaCha20-Poly1305. The server's order decides, not the
/// client's, so a client cannot steer a connection to its weakest common choice.
pub static CIPHER_SUITES: [rustls::SupportedCipherSuite; 9] = {
    use rustls::crypto::ring::cipher_suite::*;
    [
        TLS13_AES_128_GCM_SHA256,
        TLS13_AES_256_GCM_SHA384,
        TLS13_CHACHA20_POLY1305_SHA256,
        TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ]
};

/// A rustls server configuration that takes its certificate from `store`.
///
/// TLS 1.2 and 1.3 with [`CIPHER_SUITES`] in the server's order (`ignore_client_order`), key
/// exchange X25519 then P-256 then P-384 (rustls' order); `alpn` lists the application protocols
/// offered, most preferred first.
pub fn server_config(store: Arc<CertStore>, alpn: &[&[u8]]) -> Arc<ServerConfig> {
    let provider = rustls::crypto::CryptoProvider {
        cipher_suites: CIPHER_SUITES.to_vec(),
        ..rustls::crypto::ring::default_provider()
    };
    let mut config = ServerConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("ring supports TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_cert_resolver(store);
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config.ignore_client_order = true;
    Arc::new(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::crypto::ring::cipher_suite::*;
    use rustls::{ClientConfig, ClientConnection, ServerConnection, SupportedCipherSuite};

    fn dev_store() -> Arc<CertStore> {
        let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let key =
            rustls_pki_types::PrivateKeyDer::Pkcs8(generated.signing_key.serialize_der().into());
        let signing = rustls::crypto::ring::sign::any_supported_type(&key).unwrap();
        CertStore::new(CertifiedKey::new(
            vec![generated.cert.der().clone()],
            signing,
        ))
    }

    /// The suite the server picks for a client offering `offered` in that order.
    fn negotiated(
        offered: &[SupportedCipherSuite],
        version: &'static rustls::SupportedProtocolVersion,
    ) -> SupportedCipherSuite {
        let provider = rustls::crypto::CryptoProvider {
            cipher_suites: offered.to_vec(),
            ..rustls::crypto::ring::default_provider()
        };
        let client = ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let mut client =
            ClientConnection::new(Arc::new(client), "localhost".try_into().unwrap()).unwrap();
        let mut server = ServerConnection::new(server_config(dev_store(), &[])).unwrap();
        let mut hello = Vec::new();
        client.write_tls(&mut hello).unwrap();
        server.read_tls(&mut hello.as_slice()).unwrap();
        server.process_new_packets().unwrap();
        server.negotiated_cipher_suite().expect("the server chose")
    }

    #[test]
    fn the_server_order_decides_not_the_client_order() {
        // A client preferring ChaCha20, then AES-256, then AES-128 still gets AES-128-GCM.
        let tls13 = [
            TLS13_CHACHA20_POLY1305_SHA256,
            TLS13_AES_256_GCM_SHA384,
            TLS13_AES_128_GCM_SHA256,
        ];
        let chosen = negotiated(&tls13, &rustls::version::TLS13);
        assert_eq!(chosen.suite(), TLS13_AES_128_GCM_SHA256.suite());
        let tls12 = [
            TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        ];
        let chosen = negotiated(&tls12, &rustls::version::TLS12);
        assert_eq!(
            chosen.suite(),
            TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256.suite()
        );
    }
}

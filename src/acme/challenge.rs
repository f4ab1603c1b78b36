//! The answers to ACME challenges while an order is open, and the TLS hook that serves them.
//!
//! HTTP-01 answers (token → key authorization) are read by the plain-HTTP listener
//! (`crate::http::redirect`); TLS-ALPN-01 answers (domain → a self-signed certificate carrying the
//! `acmeIdentifier` extension, RFC 8737) are handed out by [`ChallengeResolver`] to a handshake that
//! offers the ALPN protocol `acme-tls/1`. Everything is in memory: answers exist only while an
//! order is being validated and are removed as soon as it ends, so there is nothing to clean up
//! after a crash. This file never talks to the CA.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

/// The ALPN protocol a TLS-ALPN-01 validation offers (RFC 8737, section 6.2).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// The challenge answers currently published. Cheap to read; written only by the ACME task.
#[derive(Default)]
pub struct ChallengeAnswers {
    /// HTTP-01: token → key authorization, served as the body of
    /// `/.well-known/acme-challenge/<token>`.
    http01: RwLock<HashMap<String, String>>,
    /// TLS-ALPN-01: domain (lowercase) → the validation certificate.
    tls_alpn01: RwLock<HashMap<String, Arc<CertifiedKey>>>,
}

impl fmt::Debug for ChallengeAnswers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChallengeAnswers")
            .field("http01", &read(&self.http01).len())
            .field("tls_alpn01", &read(&self.tls_alpn01).len())
            .finish()
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

/// Why a TLS-ALPN-01 validation certificate could not be made.
#[derive(Debug, thiserror::Error)]
#[error("cannot create the TLS-ALPN-01 validation certificate for {domain}: {reason}")]
pub struct ValidationCertError {
    /// The domain being validated.
    pub domain: String,
    /// What rcgen or rustls said.
    pub reason: String,
}

impl ChallengeAnswers {
    /// An empty set, shared between the ACME task and the listeners.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The key authorization for an HTTP-01 `token`, if one is published.
    pub fn http01(&self, token: &str) -> Option<String> {
        read(&self.http01).get(token).cloned()
    }

    /// Publishes an HTTP-01 answer.
    pub fn add_http01(&self, token: String, key_authorization: String) {
        write(&self.http01).insert(token, key_authorization);
    }

    /// Publishes a TLS-ALPN-01 answer: a self-signed certificate for `domain` whose critical
    /// `acmeIdentifier` extension holds `digest` (SHA-256 of the key authorization).
    pub fn add_tls_alpn01(&self, domain: &str, digest: &[u8]) -> Result<(), ValidationCertError> {
        let key = validation_certificate(domain, digest).map_err(|reason| ValidationCertError {
            domain: domain.to_owned(),
            reason,
        })?;
        write(&self.tls_alpn01).insert(domain.to_ascii_lowercase(), Arc::new(key));
        Ok(())
    }

    /// The validation certificate for `domain`, if one is published.
    pub fn tls_alpn01(&self, domain: &str) -> Option<Arc<CertifiedKey>> {
        read(&self.tls_alpn01)
            .get(&domain.to_ascii_lowercase())
            .cloned()
    }

    /// Replaces every answer at once with `http01` (token → key authorization) and `tls_alpn01`
    /// (domain → SHA-256 digest of the key authorization): a handshake or request sees either the
    /// old set or the new one, never none in between.
    pub fn replace_all(
        &self,
        http01: HashMap<String, String>,
        tls_alpn01: &[(String, Vec<u8>)],
    ) -> Result<(), ValidationCertError> {
        let mut certificates = HashMap::with_capacity(tls_alpn01.len());
        for (domain, digest) in tls_alpn01 {
            let key =
                validation_certificate(domain, digest).map_err(|reason| ValidationCertError {
                    domain: domain.clone(),
                    reason,
                })?;
            certificates.insert(domain.to_ascii_lowercase(), Arc::new(key));
        }
        *write(&self.http01) = http01;
        *write(&self.tls_alpn01) = certificates;
        Ok(())
    }

    /// Removes every answer (the order is over, whatever its outcome).
    pub fn clear(&self) {
        write(&self.http01).clear();
        write(&self.tls_alpn01).clear();
    }

    /// How many answers are published (HTTP-01 plus TLS-ALPN-01).
    pub fn len(&self) -> usize {
        read(&self.http01).len() + read(&self.tls_alpn01).len()
    }

    /// Whether no answer is published.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// RFC 8737 section 3: a certificate with the domain as its only SAN and the critical
/// `id-pe-acmeIdentifier` extension.
fn validation_certificate(domain: &str, digest: &[u8]) -> Result<CertifiedKey, String> {
    let mut params =
        rcgen::CertificateParams::new(vec![domain.to_owned()]).map_err(|e| e.to_string())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .custom_extensions
        .push(rcgen::CustomExtension::new_acme_identifier(digest));
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    let der = rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let signer = rustls::crypto::ring::sign::any_supported_type(&der).map_err(|e| e.to_string())?;
    Ok(CertifiedKey::new(vec![cert.der().clone()], signer))
}

/// A certificate resolver for the HTTPS listener: the served certificate for every handshake,
/// except one offering only `acme-tls/1`, which gets the TLS-ALPN-01 answer for its SNI name (or no
/// certificate at all, ending the handshake, when none is published).
#[derive(Debug)]
pub struct ChallengeResolver {
    /// The normal path: the served certificate.
    served: Arc<dyn ResolvesServerCert>,
    /// The published answers.
    answers: Arc<ChallengeAnswers>,
}

impl ResolvesServerCert for ChallengeResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // A validation offers `acme-tls/1` and nothing else (RFC 8737, section 3); a client
        // offering it among others gets the normal certificate and the protocol it prefers.
        let acme = hello.alpn().is_some_and(|mut protocols| {
            protocols.next() == Some(ACME_TLS_ALPN) && protocols.next().is_none()
        });
        if !acme {
            return self.served.resolve(hello);
        }
        self.answers.tls_alpn01(hello.server_name()?)
    }
}

/// `config` with TLS-ALPN-01 answered: its resolver wrapped in a [`ChallengeResolver`] and
/// `acme-tls/1` added to its ALPN list (last, so it is chosen only when it is the only one
/// offered — which is what a validation does).
pub fn answer_tls_alpn01(
    config: Arc<ServerConfig>,
    answers: Arc<ChallengeAnswers>,
) -> Arc<ServerConfig> {
    let mut config = Arc::unwrap_or_clone(config);
    config.cert_resolver = Arc::new(ChallengeResolver {
        served: config.cert_resolver.clone(),
        answers,
    });
    config.alpn_protocols.push(ACME_TLS_ALPN.to_vec());
    Arc::new(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_certificate_carries_the_digest_in_a_critical_extension() {
        let answers = ChallengeAnswers::new();
        let digest = [7u8; 32];
        answers.add_tls_alpn01("Call.Example.com", &digest).unwrap();
        let key = answers.tls_alpn01("call.example.com").expect("published");
        let (_, cert) = x509_parser::parse_x509_certificate(key.cert[0].as_ref()).unwrap();
        let ext = cert
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
            .expect("acmeIdentifier extension");
        assert!(ext.critical);
        // DER OCTET STRING of 32 bytes: 0x04 0x20 then the digest.
        assert_eq!(&ext.value[..2], &[0x04, 0x20]);
        assert_eq!(&ext.value[2..], &digest);
        let san = cert.subject_alternative_name().unwrap().unwrap();
        assert_eq!(san.value.general_names.len(), 1);
        answers.clear();
        assert!(answers.is_empty());
        assert!(answers.tls_alpn01("call.example.com").is_none());
    }

    /// Runs one handshake over memory; the ALPN chosen, or why it failed.
    async fn handshake(
        server: Arc<ServerConfig>,
        root: &rustls_pki_types::CertificateDer<'static>,
        name: &str,
        alpn: &[&[u8]],
    ) -> Result<Option<Vec<u8>>, String> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(root.clone()).unwrap();
        let mut client = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        client.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let (a, b) = tokio::io::duplex(64 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(server);
        let served = tokio::spawn(async move { acceptor.accept(b).await.map(|_| ()) });
        let name = rustls_pki_types::ServerName::try_from(name.to_owned()).unwrap();
        let connected = tokio_rustls::TlsConnector::from(Arc::new(client))
            .connect(name, a)
            .await;
        let _ = served.await;
        connected
            .map(|tls| tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec))
            .map_err(|e| e.to_string())
    }

    #[tokio::test]
    async fn only_a_handshake_offering_just_acme_tls_gets_the_validation_certificate() {
        let normal = rcgen::generate_simple_self_signed(vec!["call.example.com".into()]).unwrap();
        let key = rustls_pki_types::PrivateKeyDer::Pkcs8(normal.signing_key.serialize_der().into());
        let store = crate::tls::CertStore::new(CertifiedKey::new(
            vec![normal.cert.der().clone()],
            rustls::crypto::ring::sign::any_supported_type(&key).unwrap(),
        ));
        let answers = ChallengeAnswers::new();
        answers
            .add_tls_alpn01("call.example.com", &[1; 32])
            .unwrap();
        let validation = answers.tls_alpn01("call.example.com").unwrap().cert[0].clone();
        let config = answer_tls_alpn01(
            crate::tls::server_config(store, &[b"h2", b"http/1.1"]),
            answers.clone(),
        );
        let normal = normal.cert.der().clone();

        // The CA's validation: only acme-tls/1, gets the validation certificate — the only one
        // with the critical acmeIdentifier extension, which a WebPKI client (rightly) refuses.
        let served_validation = "UnsupportedCriticalExtension";
        let acme = handshake(
            config.clone(),
            &validation,
            "call.example.com",
            &[ACME_TLS_ALPN],
        );
        let acme = acme.await.unwrap_err();
        assert!(acme.contains(served_validation), "{acme}");
        // A client offering acme-tls/1 among others gets the app's certificate and protocol.
        let mixed = handshake(
            config.clone(),
            &normal,
            "call.example.com",
            &[ACME_TLS_ALPN, b"h2"],
        );
        assert_eq!(mixed.await, Ok(Some(b"h2".to_vec())));
        // Browsers are unaffected.
        let browser = handshake(config.clone(), &normal, "call.example.com", &[b"http/1.1"]);
        assert_eq!(browser.await, Ok(Some(b"http/1.1".to_vec())));
        // No answer for the name (or none any more): the validation handshake fails.
        let other = handshake(
            config.clone(),
            &validation,
            "other.example.com",
            &[ACME_TLS_ALPN],
        );
        let other = other.await.unwrap_err();
        assert!(!other.contains(served_validation), "{other}");
        answers.clear();
        let late = handshake(config, &validation, "call.example.com", &[ACME_TLS_ALPN]);
        let late = late.await.unwrap_err();
        assert!(!late.contains(served_validation), "{late}");
    }

    #[test]
    fn http01_answers_are_published_and_cleared() {
        let answers = ChallengeAnswers::new();
        answers.add_http01("tok".into(), "tok.thumb".into());
        assert_eq!(answers.http01("tok").as_deref(), Some("tok.thumb"));
        assert_eq!(answers.http01("other"), None);
        answers.clear();
        assert_eq!(answers.http01("tok"), None);
    }
}

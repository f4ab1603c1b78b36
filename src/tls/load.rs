//! Reading a PEM certificate chain and private key from disk, with errors an operator can act on.

use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};

/// Why a certificate/key pair could not be loaded. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be opened or read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file holds no PEM section of the expected kind.
    #[error("{path}: no {what} found (expected PEM with a \"-----BEGIN {marker}\" line)")]
    Missing {
        /// The file.
        path: PathBuf,
        /// "certificate" or "private key".
        what: &'static str,
        /// The expected PEM label.
        marker: &'static str,
    },
    /// The file is PEM but broken.
    #[error("{path}: malformed PEM: {detail}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What the PEM parser found.
        detail: String,
    },
    /// The key is of a type or curve rustls cannot sign with.
    #[error("{path}: unsupported private key: {detail}")]
    UnsupportedKey {
        /// The key file.
        path: PathBuf,
        /// rustls' explanation.
        detail: String,
    },
    /// The key does not belong to the first certificate of the chain.
    #[error("{key}: this private key does not match the certificate in {cert}")]
    Mismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
}

fn pem_error(path: &Path, what: &'static str, marker: &'static str, e: pem::Error) -> LoadError {
    match e {
        pem::Error::Io(source) => LoadError::Read {
            path: path.to_owned(),
            source,
        },
        pem::Error::NoItemsFound => LoadError::Missing {
            path: path.to_owned(),
            what,
            marker,
        },
        other => LoadError::Malformed {
            path: path.to_owned(),
            detail: other.to_string(),
        },
    }
}

/// Loads a chain (leaf first) and its private key, and checks they belong together.
pub fn load_certified_key(cert_path: &Path, key_path: &Path) -> Result<CertifiedKey, LoadError> {
    let cert_err = |e| pem_error(cert_path, "certificate", "CERTIFICATE", e);
    let chain = CertificateDer::pem_file_iter(cert_path)
        .map_err(cert_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(cert_err)?;
    if chain.is_empty() {
        return Err(cert_err(pem::Error::NoItemsFound));
    }
    let key = PrivateKeyDer::from_pem_file(key_path)
        .map_err(|e| pem_error(key_path, "private key", "PRIVATE KEY", e))?;
    let signing_key = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| {
        LoadError::UnsupportedKey {
            path: key_path.to_owned(),
            detail: e.to_string(),
        }
    })?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        Ok(()) => Ok(certified),
        // A key whose public half rustls cannot derive is accepted; the handshake would fail loudly.
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(certified),
        Err(_) => Err(LoadError::Mismatch {
            cert: cert_path.to_owned(),
            key: key_path.to_owned(),
        }),
    }
}

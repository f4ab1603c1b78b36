//! The ACME account and certificate on disk, under `certs-dir/acme/<directory>/`.
//!
//! One subdirectory per ACME directory URL, so a staging account or certificate is never used
//! against production (or the reverse). Directories are created mode 0700 and files written
//! 0600 (the account key and the certificate key are secrets; the chain is not, but nothing else
//! needs to read it). Every file is written to a temporary name and renamed into place, so a crash
//! never leaves half a key; the key is renamed before the chain, so a chain on disk always has
//! its key beside it. This file does no networking.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustls::sign::CertifiedKey;

use super::schedule::CertificateDates;
use crate::tls::{load_certified_key, LoadError};

/// Why the account or certificate could not be stored or read.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A directory or file could not be created or written.
    #[error("{path}: cannot write: {source}")]
    Write {
        /// The path.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The stored account file is not what callgate wrote.
    #[error("{path}: unreadable ACME account ({reason}); move it away to register a new account")]
    Account {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A freshly issued certificate did not load.
    #[error(transparent)]
    Certificate(#[from] LoadError),
}

/// A certificate found on disk, with what scheduling needs to know about it.
pub struct StoredCertificate {
    /// Ready to serve.
    pub key: CertifiedKey,
    /// DNS names it is valid for (lowercase).
    pub names: Vec<String>,
    /// Validity start, Unix seconds.
    pub not_before: i64,
    /// Validity end, Unix seconds.
    pub not_after: i64,
}

impl StoredCertificate {
    /// Its names and validity, for scheduling.
    pub fn dates(&self) -> CertificateDates<'_> {
        CertificateDates {
            names: &self.names,
            not_before: self.not_before,
            not_after: self.not_after,
        }
    }
}

/// Where one ACME directory's account and certificate live.
#[derive(Debug, Clone)]
pub struct AcmeStore {
    /// `certs-dir/acme/<directory slug>`.
    dir: PathBuf,
}

impl AcmeStore {
    /// The store for `directory` (the URL) under `state_dir`; creates it (0700) if needed and
    /// tightens its mode if it exists.
    pub fn open(state_dir: &Path, directory: &str) -> Result<AcmeStore, StoreError> {
        let dir = state_dir.join(slug(directory));
        for d in [state_dir, dir.as_path()] {
            let created = std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(d)
                .and_then(|()| std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)));
            created.map_err(|source| StoreError::Write {
                path: d.to_owned(),
                source,
            })?;
        }
        Ok(AcmeStore { dir })
    }

    /// The directory this store writes to.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The certificate chain file (PEM, leaf first).
    pub fn cert_path(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }

    /// The certificate's private key file (PEM, PKCS#8).
    pub fn key_path(&self) -> PathBuf {
        self.dir.join("key.pem")
    }

    fn account_path(&self) -> PathBuf {
        self.dir.join("account.json")
    }

    /// The stored account credentials (JSON, as instant-acme serializes them), if any.
    pub fn account(&self) -> Result<Option<instant_acme::AccountCredentials>, StoreError> {
        let path = self.account_path();
        let text = match std::fs::read(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(StoreError::Account {
                    path,
                    reason: e.to_string(),
                })
            }
        };
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|e| StoreError::Account {
                path,
                reason: e.to_string(),
            })
    }

    /// Stores the account credentials (mode 0600).
    pub fn save_account(
        &self,
        credentials: &instant_acme::AccountCredentials,
    ) -> Result<(), StoreError> {
        let json = serde_json::to_vec_pretty(credentials).expect("credentials serialize");
        write_private(&self.account_path(), &json)
    }

    /// The stored certificate, if both files are present and load; `None` otherwise (a broken
    /// pair is logged and will be replaced by the next order).
    pub fn certificate(&self) -> Option<StoredCertificate> {
        let (cert, key) = (self.cert_path(), self.key_path());
        if !cert.exists() {
            return None;
        }
        match load_certified_key(&cert, &key) {
            Ok(key) => describe(key),
            Err(e) => {
                tracing::warn!(
                    "ACME: ignoring the stored certificate, a new one will be ordered: {e}"
                );
                None
            }
        }
    }

    /// Stores a newly issued chain and its key (both 0600), then reads them back exactly as a
    /// restart would.
    pub fn save_certificate(
        &self,
        chain_pem: &str,
        key_pem: &str,
    ) -> Result<StoredCertificate, StoreError> {
        write_private(&self.key_path(), key_pem.as_bytes())?;
        write_private(&self.cert_path(), chain_pem.as_bytes())?;
        let key = load_certified_key(&self.cert_path(), &self.key_path())?;
        describe(key).ok_or_else(|| {
            StoreError::Certificate(LoadError::Malformed {
                path: self.cert_path(),
                detail: "the CA's certificate has no readable validity or names".into(),
            })
        })
    }
}

/// Reads the names and validity of the leaf of `key`.
fn describe(key: CertifiedKey) -> Option<StoredCertificate> {
    let leaf = key.cert.first()?;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let names = parsed
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => {
                        Some(d.to_ascii_lowercase())
                    }
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let not_before = parsed.validity().not_before.timestamp();
    let not_after = parsed.validity().not_after.timestamp();
    Some(StoredCertificate {
        key,
        names,
        not_before,
        not_after,
    })
}

/// Writes `bytes` to `path` with mode 0600: to `path.<pid>.tmp` first (so nodes of a cluster
/// that share a certs-dir never write one temporary file together), then renamed over `path`.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
    let written = (|| {
        let _ = std::fs::remove_file(&tmp);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    written.map_err(|source| StoreError::Write {
        path: path.to_owned(),
        source,
    })
}

/// A directory name for an ACME directory URL: host, port and path, with anything but
/// `[A-Za-z0-9.-]` turned into `_` (`acme-v02.api.letsencrypt.org_directory`).
pub(super) fn slug(directory: &str) -> String {
    let rest = directory
        .strip_prefix("https://")
        .unwrap_or(directory)
        .trim_end_matches('/');
    let slug: String = rest
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    slug.trim_start_matches('.').chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_keep_directories_apart_and_cannot_escape() {
        assert_eq!(
            slug("https://acme-v02.api.letsencrypt.org/directory"),
            "acme-v02.api.letsencrypt.org_directory"
        );
        assert_eq!(
            slug("https://acme-staging-v02.api.letsencrypt.org/directory"),
            "acme-staging-v02.api.letsencrypt.org_directory"
        );
        assert_eq!(slug("https://127.0.0.1:14000/dir"), "127.0.0.1_14000_dir");
        assert!(!slug("https://../../etc").contains('/'));
        assert!(!slug("https://..").starts_with('.'));
    }

    #[test]
    fn files_and_directories_are_private() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("certs/acme");
        let store = AcmeStore::open(&state, "https://ca.test/dir").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&state), 0o700);
        assert_eq!(mode(store.dir()), 0o700);

        let cert = rcgen::generate_simple_self_signed(vec!["call.example.com".into()]).unwrap();
        let saved = store
            .save_certificate(&cert.cert.pem(), &cert.signing_key.serialize_pem())
            .unwrap();
        assert_eq!(saved.names, vec!["call.example.com".to_owned()]);
        assert_eq!(mode(&store.key_path()), 0o600);
        assert_eq!(mode(&store.cert_path()), 0o600);
        assert!(store.certificate().is_some(), "a restart finds it");

        // A loose directory mode left by hand is tightened on open.
        std::fs::set_permissions(store.dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
        AcmeStore::open(&state, "https://ca.test/dir").unwrap();
        assert_eq!(mode(store.dir()), 0o700);
        assert!(store.account().unwrap().is_none());
    }
}

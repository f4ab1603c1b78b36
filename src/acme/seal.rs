//! Encryption of the ACME secrets a cluster keeps in Redis: the certificate's private key and the
//! account credentials.
//!
//! Anyone who can read Redis must not get a key that impersonates the site. The sealing key is
//! derived with HKDF-SHA256 from `static-auth-secret` (required in cluster mode, the same on every
//! node); each value is AES-256-GCM with a fresh random 96-bit nonce, and the value's purpose
//! (`"certificate-key"`, `"account"`) as associated data, so a sealed account cannot be passed off
//! as a certificate key. Stored as base64 of `nonce || ciphertext || tag`. Every configured secret
//! can open (so a rotation that keeps the old secret listed still reads what is stored); the first
//! one seals. Pure: no I/O besides the system random source.

use base64::Engine;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::hkdf::{Salt, HKDF_SHA256};
use ring::rand::{SecureRandom, SystemRandom};

/// HKDF salt: names the scheme, so another use of the same secret derives another key.
const SALT: &[u8] = b"callgate acme seal v1";
/// HKDF info.
const INFO: &[u8] = b"AES-256-GCM key for ACME secrets in Redis";

/// Why a stored value could not be opened.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    /// Not base64, or too short to hold a nonce and a tag.
    #[error("the stored {0} is not a sealed value")]
    Malformed(&'static str),
    /// No configured secret opens it: it was sealed with another `static-auth-secret`, or changed.
    #[error(
        "the stored {0} does not open with any static-auth-secret (sealed with another secret, \
         or altered)"
    )]
    Key(&'static str),
}

/// Seals with the first secret's key, opens with any.
pub struct Sealer {
    /// One key per configured secret, the sealing one first.
    keys: Vec<LessSafeKey>,
    /// Nonces.
    random: SystemRandom,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("keys", &self.keys.len())
            .finish()
    }
}

impl Sealer {
    /// Keys derived from `secrets` (the first seals). `None` when there is no secret.
    pub fn new<S: AsRef<[u8]>>(secrets: &[S]) -> Option<Sealer> {
        if secrets.is_empty() {
            return None;
        }
        let keys = secrets.iter().map(|s| derive(s.as_ref())).collect();
        Some(Sealer {
            keys,
            random: SystemRandom::new(),
        })
    }

    /// `plaintext` sealed for `purpose`, as base64 text.
    pub fn seal(&self, purpose: &'static str, plaintext: &[u8]) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        self.random
            .fill(&mut nonce)
            .expect("the system random source works");
        let mut sealed = plaintext.to_vec();
        self.keys[0]
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(purpose.as_bytes()),
                &mut sealed,
            )
            .expect("AES-GCM seals any length we store");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        base64::engine::general_purpose::STANDARD.encode(out)
    }

    /// The plaintext of a value sealed for `purpose` by any of the secrets.
    pub fn open(&self, purpose: &'static str, sealed: &str) -> Result<Vec<u8>, SealError> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(sealed.trim())
            .map_err(|_| SealError::Malformed(purpose))?;
        if bytes.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return Err(SealError::Malformed(purpose));
        }
        let (nonce, body) = bytes.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().expect("split at NONCE_LEN");
        for key in &self.keys {
            let mut buffer = body.to_vec();
            if let Ok(plain) = key.open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(purpose.as_bytes()),
                &mut buffer,
            ) {
                return Ok(plain.to_vec());
            }
        }
        Err(SealError::Key(purpose))
    }
}

/// HKDF-SHA256(salt, secret, info) → an AES-256-GCM key.
fn derive(secret: &[u8]) -> LessSafeKey {
    let prk = Salt::new(HKDF_SHA256, SALT).extract(secret);
    let okm = prk
        .expand(&[INFO], &AES_256_GCM)
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    LessSafeKey::new(UnboundKey::from(okm))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_PEM: &str =
        "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49\n-----END PRIVATE KEY-----\n";

    #[test]
    fn sealed_values_are_not_plaintext_and_open_again() {
        let sealer = Sealer::new(&["0123456789abcdef0123"]).unwrap();
        let sealed = sealer.seal("certificate-key", KEY_PEM.as_bytes());
        assert!(!sealed.contains("PRIVATE KEY"), "{sealed}");
        assert!(!sealed.contains("MIGHAgEAMBMGByqGSM49"));
        assert_eq!(
            sealer.open("certificate-key", &sealed).unwrap(),
            KEY_PEM.as_bytes()
        );
        // A fresh nonce every time: the same key never seals to the same text.
        assert_ne!(sealed, sealer.seal("certificate-key", KEY_PEM.as_bytes()));
    }

    #[test]
    fn another_secret_another_purpose_or_a_changed_byte_does_not_open() {
        let sealer = Sealer::new(&["0123456789abcdef0123"]).unwrap();
        let sealed = sealer.seal("certificate-key", KEY_PEM.as_bytes());
        let other = Sealer::new(&["another-secret-of-20-bytes"]).unwrap();
        assert_eq!(
            other.open("certificate-key", &sealed),
            Err(SealError::Key("certificate-key"))
        );
        assert_eq!(
            sealer.open("account", &sealed),
            Err(SealError::Key("account"))
        );
        let mut bytes = base64::engine::general_purpose::STANDARD
            .decode(&sealed)
            .unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        let altered = base64::engine::general_purpose::STANDARD.encode(bytes);
        assert!(sealer.open("certificate-key", &altered).is_err());
        assert_eq!(
            sealer.open("account", "not base64!"),
            Err(SealError::Malformed("account"))
        );
        assert_eq!(
            sealer.open("account", "AAAA"),
            Err(SealError::Malformed("account"))
        );
    }

    #[test]
    fn a_rotation_that_keeps_the_old_secret_listed_still_opens() {
        let old = Sealer::new(&["old-secret-0123456789"]).unwrap();
        let sealed = old.seal("account", b"{}");
        let rotated = Sealer::new(&["new-secret-0123456789", "old-secret-0123456789"]).unwrap();
        assert_eq!(rotated.open("account", &sealed).unwrap(), b"{}");
        assert!(Sealer::new::<&str>(&[]).is_none());
    }
}

//! The self-signed development certificate written to `certs/` on first start.
//!
//! It exists so that `cargo run --release` serves HTTPS with nothing else installed; it is never a
//! substitute for a real certificate on the internet, and the log line that announces it says so.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Hostnames and addresses the development certificate is valid for.
const DEV_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// A freshly generated development pair, so the caller can announce it.
#[derive(Debug, Clone)]
pub struct DevCert {
    /// Where the certificate was written.
    pub cert: PathBuf,
    /// Where the key was written (mode 0600).
    pub key: PathBuf,
}

/// Generates `cert.pem`/`key.pem` in `dir` unless both exist already.
///
/// Returns `Some` only when it generated a pair. A lone half (cert without key or the reverse) is
/// an operator's mistake, not a first start: it is left alone and loading reports it.
pub fn ensure_dev_cert(dir: &Path) -> std::io::Result<Option<DevCert>> {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    if cert.exists() || key.exists() {
        return Ok(None);
    }
    std::fs::create_dir_all(dir)?;
    let names = DEV_NAMES.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let generated = rcgen::generate_simple_self_signed(names)
        .map_err(|e| std::io::Error::other(format!("generating a certificate: {e}")))?;
    write_private(&key, generated.signing_key.serialize_pem().as_bytes())?;
    std::fs::write(&cert, generated.cert.pem())?;
    Ok(Some(DevCert { cert, key }))
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)?.write_all(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_once_and_the_pair_loads() {
        let dir = std::env::temp_dir().join(format!("callgate-devcert-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let made = ensure_dev_cert(&dir)
            .unwrap()
            .expect("first call generates");
        crate::tls::load_certified_key(&made.cert, &made.key).expect("generated pair loads");
        assert!(
            ensure_dev_cert(&dir).unwrap().is_none(),
            "second call keeps the pair"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&made.key).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "key must not be readable by others");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

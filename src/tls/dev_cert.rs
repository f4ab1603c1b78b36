//! The self-signed development certificate written to `certs/` on first start.
//!
//! It exists so that `cargo run --release` serves HTTPS with nothing else installed; it is never a
//! substitute for a real certificate on the internet, and the log line that announces it says so.
//!
//! It is valid for 27 months, as mkcert's certificates are: browsers and scanners (testssl.sh)
//! refuse or flag any certificate valid for more than 825 days. A development certificate found in
//! the directory that breaks that rule (those written by earlier versions were valid from 1975 to
//! 4096) or that expires within [`RENEW_BEFORE`] is replaced at start. A certificate this module
//! did not write is never touched.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Hostnames and addresses the development certificate is valid for.
const DEV_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// How long a generated development certificate is valid: 27 months (820 days), like mkcert's,
/// inside the 825-day ceiling that browsers and testssl.sh apply.
pub const DEV_CERT_VALIDITY: Duration = Duration::from_secs(820 * 86_400);

/// The longest validity any certificate may have before browsers and scanners object.
pub const MAX_VALIDITY: Duration = Duration::from_secs(825 * 86_400);

/// A development certificate that expires sooner than this is replaced at start.
pub const RENEW_BEFORE: Duration = Duration::from_secs(30 * 86_400);

/// The subject (CN) of the certificates this module writes.
const DEV_SUBJECT: &str = "callgate development certificate";

/// The subject rcgen gave the development certificates of earlier versions (valid 1975–4096).
const OLD_DEV_SUBJECT: &str = "rcgen self signed cert";

/// A freshly generated development pair, so the caller can announce it.
#[derive(Debug, Clone)]
pub struct DevCert {
    /// Where the certificate was written.
    pub cert: PathBuf,
    /// Where the key was written (mode 0600).
    pub key: PathBuf,
    /// Why it was written.
    pub reason: DevCertReason,
}

/// Why a development certificate was (re)generated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DevCertReason {
    /// There was none.
    #[error("no certificate was present")]
    FirstStart,
    /// The one present, a development certificate, is valid for longer than browsers accept.
    #[error("the previous development certificate was valid for {days} days, over the 825-day limit browsers and scanners apply")]
    TooLong {
        /// Its total validity, in days.
        days: u64,
    },
    /// The one present, a development certificate, has expired or expires soon.
    #[error("the previous development certificate expires in less than 30 days")]
    Expiring,
}

/// Generates `cert.pem`/`key.pem` in `dir` unless a usable pair exists already.
///
/// Returns `Some` when it wrote a pair: on first start, or when the certificate there is a
/// development certificate that [`renewal_due`] says must go. A lone half (cert without key or the
/// reverse) is an operator's mistake, not a first start: it is left alone and loading reports it.
pub fn ensure_dev_cert(dir: &Path) -> std::io::Result<Option<DevCert>> {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    let reason = match (cert.exists(), key.exists()) {
        (false, false) => DevCertReason::FirstStart,
        (true, true) => match renewal_due(&std::fs::read(&cert)?, SystemTime::now()) {
            Some(reason) => reason,
            None => return Ok(None),
        },
        _ => return Ok(None),
    };
    std::fs::create_dir_all(dir)?;
    let (cert_pem, key_pem) = generate(SystemTime::now())?;
    // Written beside the targets and renamed over them, so that no reader (the hot-reload poll
    // of another process sharing the directory) ever sees half a file.
    let key_tmp = dir.join("key.pem.new");
    let cert_tmp = dir.join("cert.pem.new");
    let _ = std::fs::remove_file(&key_tmp);
    write_private(&key_tmp, key_pem.as_bytes())?;
    std::fs::write(&cert_tmp, cert_pem)?;
    std::fs::rename(&key_tmp, &key)?;
    std::fs::rename(&cert_tmp, &cert)?;
    Ok(Some(DevCert { cert, key, reason }))
}

/// A new development certificate and key (PEM), valid from `now` for [`DEV_CERT_VALIDITY`].
fn generate(now: SystemTime) -> std::io::Result<(String, String)> {
    let failed = |e: rcgen::Error| std::io::Error::other(format!("generating a certificate: {e}"));
    let names = DEV_NAMES.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let mut params = rcgen::CertificateParams::new(names).map_err(failed)?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, DEV_SUBJECT);
    params.not_before = to_asn1_time(now);
    params.not_after = to_asn1_time(now + DEV_CERT_VALIDITY);
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let key = rcgen::KeyPair::generate().map_err(failed)?;
    let cert = params.self_signed(&key).map_err(failed)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn to_asn1_time(at: SystemTime) -> time::OffsetDateTime {
    let secs = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    time::OffsetDateTime::from_unix_timestamp(secs as i64)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// Whether the certificate in `cert_pem` is a development certificate (one this module writes
/// or wrote) that must be replaced at `now`, and why. Anything else — an operator's certificate,
/// unparsable bytes — gets `None` and is left alone.
pub fn renewal_due(cert_pem: &[u8], now: SystemTime) -> Option<DevCertReason> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem).ok()?;
    let cert = pem.parse_x509().ok()?;
    let subject = cert.subject();
    let common_name = subject.iter_common_name().next()?.as_str().ok()?;
    if subject != cert.issuer() || !matches!(common_name, DEV_SUBJECT | OLD_DEV_SUBJECT) {
        return None;
    }
    let validity = cert.validity();
    let lifetime = validity.not_after.timestamp() - validity.not_before.timestamp();
    if lifetime > MAX_VALIDITY.as_secs() as i64 {
        return Some(DevCertReason::TooLong {
            days: lifetime.max(0) as u64 / 86_400,
        });
    }
    let now = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    (validity.not_after.timestamp() - now < RENEW_BEFORE.as_secs() as i64)
        .then_some(DevCertReason::Expiring)
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

    const DAY: Duration = Duration::from_secs(86_400);

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("callgate-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn generates_once_and_the_pair_loads() {
        let dir = temp_dir("devcert");
        let made = ensure_dev_cert(&dir)
            .unwrap()
            .expect("first call generates");
        assert_eq!(made.reason, DevCertReason::FirstStart);
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

    #[test]
    fn a_generated_certificate_is_valid_27_months_from_now() {
        let now = SystemTime::now();
        let (cert, _) = generate(now).unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(cert.as_bytes()).unwrap();
        let parsed = pem.parse_x509().unwrap();
        let validity = parsed.validity();
        let lifetime = validity.not_after.timestamp() - validity.not_before.timestamp();
        assert_eq!(lifetime, 820 * 86_400);
        let start = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert!((validity.not_before.timestamp() - start).abs() <= 1);
        assert_eq!(renewal_due(cert.as_bytes(), now), None, "fresh: kept");
        assert_eq!(
            renewal_due(cert.as_bytes(), now + DEV_CERT_VALIDITY - 29 * DAY),
            Some(DevCertReason::Expiring)
        );
    }

    #[test]
    fn an_old_development_certificate_valid_until_4096_is_replaced_and_loads() {
        // What earlier versions wrote: rcgen's defaults, valid 1975-01-01 to 4096-01-01.
        let dir = temp_dir("devcert-old");
        std::fs::create_dir_all(&dir).unwrap();
        let old = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        std::fs::write(dir.join("cert.pem"), old.cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), old.signing_key.serialize_pem()).unwrap();
        let made = ensure_dev_cert(&dir).unwrap().expect("replaced");
        assert!(
            matches!(made.reason, DevCertReason::TooLong { days } if days > 700_000),
            "{:?}",
            made.reason
        );
        assert_ne!(std::fs::read_to_string(&made.cert).unwrap(), old.cert.pem());
        crate::tls::load_certified_key(&made.cert, &made.key).expect("new pair loads");
        assert!(ensure_dev_cert(&dir).unwrap().is_none(), "then kept");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_operators_certificate_is_never_replaced() {
        let mut params = rcgen::CertificateParams::new(vec!["call.example".to_string()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "call.example");
        let key = rcgen::KeyPair::generate().unwrap();
        let long_lived = params.self_signed(&key).unwrap();
        assert_eq!(
            renewal_due(long_lived.pem().as_bytes(), SystemTime::now()),
            None
        );
        assert_eq!(renewal_due(b"not a certificate", SystemTime::now()), None);
    }
}

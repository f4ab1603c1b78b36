//! Security headers added to every HTTPS response.
//!
//! The Content-Security-Policy allows only this origin: scripts, styles and images from `'self'`,
//! WebSocket signaling to `'self'` (which CSP Level 3 extends to `wss:` on the same host), camera and
//! screen media as `blob:`/`mediastream:`, no framing, no plugins. The web app needs nothing more;
//! if it ever does, widen the policy here and nowhere else.

use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use std::time::Duration;

/// The policy: no third-party origins, media from capture devices, signaling to ourselves.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data: blob:; media-src 'self' blob: mediastream:; connect-src 'self'; \
     font-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'self'; \
     frame-ancestors 'none'; object-src 'none'";

/// Camera, microphone and screen capture for this origin only; everything else off.
const PERMISSIONS_POLICY: &str = "camera=(self), microphone=(self), display-capture=(self), \
     fullscreen=(self), autoplay=(self), geolocation=(), payment=(), usb=(), interest-cohort=()";

/// The headers, built once at startup.
#[derive(Debug, Clone)]
pub struct SecurityHeaders {
    /// Name/value pairs appended to every HTTPS response.
    pairs: Vec<(HeaderName, HeaderValue)>,
}

impl SecurityHeaders {
    /// Headers with `Strict-Transport-Security: max-age=<hsts_max_age>`.
    pub fn new(hsts_max_age: Duration) -> Self {
        let hsts = format!("max-age={}", hsts_max_age.as_secs());
        let pairs = [
            ("strict-transport-security", hsts.as_str()),
            ("content-security-policy", CONTENT_SECURITY_POLICY),
            ("permissions-policy", PERMISSIONS_POLICY),
            ("x-content-type-options", "nosniff"),
            ("referrer-policy", "no-referrer"),
            ("x-frame-options", "DENY"),
            ("cross-origin-opener-policy", "same-origin"),
            ("cross-origin-resource-policy", "same-origin"),
        ];
        SecurityHeaders {
            pairs: pairs
                .into_iter()
                .map(|(name, value)| {
                    (
                        HeaderName::from_static(name),
                        HeaderValue::from_str(value).expect("static header values are valid"),
                    )
                })
                .collect(),
        }
    }

    /// Adds the headers to a response, replacing any of the same name.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for (name, value) in &self.pairs {
            headers.insert(name.clone(), value.clone());
        }
    }
}

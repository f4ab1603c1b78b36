//! Why an order failed, in terms an operator can act on — a pure reading of the CA's answer.
//!
//! ACME problem types (RFC 8555 section 6.7) are mapped to a small, bounded set of
//! [`FailureReason`]s, which label the failure metric and choose the advice in the log line. No
//! I/O here.

use std::fmt;

/// A bounded classification of failed orders (the `reason` label of
/// `callgate_acme_failures_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureReason {
    /// The CA could not resolve the name (no A/AAAA record, or it points elsewhere).
    NameNotResolved,
    /// The CA resolved the name but could not reach this server, or got a wrong answer on
    /// port 80 (HTTP-01) or 443 (TLS-ALPN-01).
    ChallengeUnreachable,
    /// The CA refused because of a rate limit.
    RateLimited,
    /// The CA refused the account or the order (blocked name, CAA record, bad contact, …).
    Refused,
    /// The ACME directory itself could not be reached (network, TLS, timeout, 5xx).
    DirectoryUnreachable,
    /// The account or certificate could not be written under certs-dir.
    Storage,
    /// Anything else.
    Other,
}

impl FailureReason {
    /// Every reason, in label order.
    pub const ALL: [FailureReason; 7] = [
        FailureReason::NameNotResolved,
        FailureReason::ChallengeUnreachable,
        FailureReason::RateLimited,
        FailureReason::Refused,
        FailureReason::DirectoryUnreachable,
        FailureReason::Storage,
        FailureReason::Other,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            FailureReason::NameNotResolved => "dns",
            FailureReason::ChallengeUnreachable => "unreachable",
            FailureReason::RateLimited => "rate_limited",
            FailureReason::Refused => "refused",
            FailureReason::DirectoryUnreachable => "directory",
            FailureReason::Storage => "storage",
            FailureReason::Other => "other",
        }
    }

    /// What the operator should check, in one sentence.
    pub fn advice(self) -> &'static str {
        match self {
            FailureReason::NameNotResolved => {
                "the CA cannot resolve the name: point its DNS A/AAAA record at this server"
            }
            FailureReason::ChallengeUnreachable => {
                "the CA cannot reach this server: open TCP 443 (tls-alpn-01) or TCP 80 (http-01) \
                 from the internet to https-listen / http-listen"
            }
            FailureReason::RateLimited => {
                "the CA rate-limits this account or name: callgate waits as told and retries"
            }
            FailureReason::Refused => {
                "the CA refused the account or order: check acme-domain, acme-email and CAA records"
            }
            FailureReason::DirectoryUnreachable => {
                "cannot talk to acme-directory: check outbound HTTPS, the URL and acme-directory-ca"
            }
            FailureReason::Storage => {
                "cannot write under certs-dir (check its owner and modes) or, in a cluster, use \
                 Redis (check callgate_redis_up)"
            }
            FailureReason::Other => "see the message for details",
        }
    }

    /// Reads an ACME problem (its type, `urn:ietf:params:acme:error:…`, and its detail) as a
    /// reason. A detail about resolving the name wins over the type: not every CA uses the `dns`
    /// type for that (pebble says `malformed`).
    pub fn from_problem(problem_type: &str, detail: &str) -> FailureReason {
        let detail = detail.to_ascii_lowercase();
        let dns = [
            "dns problem",
            "nxdomain",
            "while resolving",
            "no valid a records",
            "servfail",
        ];
        if dns.iter().any(|d| detail.contains(d)) {
            return FailureReason::NameNotResolved;
        }
        Self::from_problem_type(problem_type)
    }

    /// Reads an ACME problem type (`urn:ietf:params:acme:error:…`) as a reason.
    pub fn from_problem_type(problem_type: &str) -> FailureReason {
        let short = problem_type
            .strip_prefix("urn:ietf:params:acme:error:")
            .unwrap_or(problem_type);
        match short {
            "dns" => FailureReason::NameNotResolved,
            "connection" | "tls" | "incorrectResponse" | "unauthorized" => {
                FailureReason::ChallengeUnreachable
            }
            "rateLimited" => FailureReason::RateLimited,
            "serverInternal" => FailureReason::DirectoryUnreachable,
            "rejectedIdentifier"
            | "caa"
            | "unsupportedIdentifier"
            | "accountDoesNotExist"
            | "invalidContact"
            | "unsupportedContact"
            | "externalAccountRequired"
            | "userActionRequired"
            | "badCSR"
            | "badSignatureAlgorithm"
            | "malformed"
            | "badPublicKey"
            | "badRevocationReason"
            | "compound"
            | "orderNotReady"
            | "alreadyReplaced" => FailureReason::Refused,
            _ => FailureReason::Other,
        }
    }
}

impl fmt::Display for FailureReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// Which failures deserve an error-level log line: the first of each run with the same reason
/// (details such as ports or nonces change from try to try; the reason is what an operator acts
/// on). Repeats go to debug level and to the metric.
#[derive(Debug, Default)]
pub struct FailureLog {
    /// The reason last logged at error level, until a success.
    last: Option<FailureReason>,
}

impl FailureLog {
    /// Records a failure; true if it should be logged at error level.
    pub fn is_news(&mut self, reason: FailureReason) -> bool {
        self.last.replace(reason) != Some(reason)
    }

    /// An order succeeded: the next failure is news again.
    pub fn succeeded(&mut self) {
        self.last = None;
    }
}

/// When a rate-limit message says to retry, as Unix seconds: Let's Encrypt writes
/// "… retry after 2026-12-03 15:04:05 UTC: see …" in the problem detail.
pub fn retry_after_in_detail(detail: &str) -> Option<i64> {
    let at = detail.to_ascii_lowercase().find("retry after ")? + "retry after ".len();
    let stamp = detail.get(at..at + 19)?;
    let format = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");
    let parsed = time::PrimitiveDateTime::parse(stamp, &format).ok()?;
    Some(parsed.assume_utc().unix_timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problem_types_map_to_actionable_reasons() {
        let r =
            |t: &str| FailureReason::from_problem_type(&format!("urn:ietf:params:acme:error:{t}"));
        assert_eq!(r("dns"), FailureReason::NameNotResolved);
        assert_eq!(r("connection"), FailureReason::ChallengeUnreachable);
        assert_eq!(r("unauthorized"), FailureReason::ChallengeUnreachable);
        assert_eq!(r("rateLimited"), FailureReason::RateLimited);
        assert_eq!(r("rejectedIdentifier"), FailureReason::Refused);
        assert_eq!(r("caa"), FailureReason::Refused);
        assert_eq!(r("somethingNew"), FailureReason::Other);
        // Boulder says "dns"; pebble reports an unresolvable name as "malformed".
        assert_eq!(
            FailureReason::from_problem(
                "urn:ietf:params:acme:error:malformed",
                "Error occurred while resolving URL \"call.example.com\": read: connection refused"
            ),
            FailureReason::NameNotResolved
        );
        assert_eq!(
            FailureReason::from_problem(
                "urn:ietf:params:acme:error:dns",
                "DNS problem: NXDOMAIN looking up A for call.example.com"
            ),
            FailureReason::NameNotResolved
        );
        assert_eq!(
            FailureReason::from_problem("urn:ietf:params:acme:error:malformed", "bad JWS"),
            FailureReason::Refused
        );
        let labels: std::collections::HashSet<_> =
            FailureReason::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(labels.len(), FailureReason::ALL.len());
    }

    #[test]
    fn each_reason_is_logged_once_per_run_of_failures() {
        use FailureReason::*;
        let mut log = FailureLog::default();
        let seen: Vec<bool> = [
            NameNotResolved,
            NameNotResolved,
            ChallengeUnreachable,
            NameNotResolved,
        ]
        .into_iter()
        .map(|r| log.is_news(r))
        .collect();
        assert_eq!(seen, [true, false, true, true]);
        log.succeeded();
        assert!(log.is_news(NameNotResolved));
    }

    #[test]
    fn reads_the_retry_time_of_a_rate_limit() {
        let detail = "too many certificates (5) already issued for this exact set of identifiers \
                      in the last 168h0m0s, retry after 2026-12-03 15:04:05 UTC: see https://x";
        assert_eq!(retry_after_in_detail(detail), Some(1_796_310_245));
        assert_eq!(retry_after_in_detail("no time here"), None);
        assert_eq!(retry_after_in_detail("retry after soon"), None);
    }
}

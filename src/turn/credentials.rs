//! TURN REST API credentials (draft-uberti-behave-turn-rest, coturn's `use-auth-secret`): issue them for
//! the signaling layer and check them for the relay.
//!
//! The username is `<unix-expiry>:<user>` and the password is `base64(HMAC-SHA1(secret, username))`, so
//! the relay needs no user database: whoever knows a secret can mint credentials and the relay can
//! check them from the username alone. Several secrets are accepted at once so a secret can be rotated
//! without cutting calls: the first one issues, all of them verify.
//!
//! This module owns the credential arithmetic only. It does no I/O and reads no clock: the caller
//! passes `now`. It must never log a secret or a password.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::prelude::BASE64_STANDARD;
use base64::Engine;
use ring::hmac;
use serde::{Deserialize, Serialize};

/// The default lifetime of issued credentials: one hour, long enough for a call to set up and
/// short enough that a leaked credential is soon useless.
pub const DEFAULT_CREDENTIAL_TTL: Duration = Duration::from_secs(3600);

/// Why a REST username was refused. The relay answers every variant with 401 Unauthorized.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    /// The username has no `:` separating the expiry from the user.
    #[error("the TURN username {0:?} is not of the form <unix-expiry>:<user>")]
    Malformed(String),
    /// The part before the `:` is not a unix timestamp.
    #[error("the TURN username {0:?} does not start with a unix expiry time")]
    BadExpiry(String),
    /// The expiry time has passed.
    #[error("the TURN credentials for {user:?} expired at unix time {expired_at}")]
    Expired {
        /// The user part of the username.
        user: String,
        /// The expiry the username carried.
        expired_at: u64,
    },
}

/// The parts of a REST username once it has been parsed and found unexpired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestUsername<'a> {
    /// Unix time (seconds) after which the credentials are refused.
    pub expires_at: u64,
    /// Who the credentials were issued to (the signaling ID); quotas are counted per user.
    pub user: &'a str,
}

impl<'a> RestUsername<'a> {
    /// Parses `<unix-expiry>:<user>` and refuses it if `expiry < now`, as coturn does (a username
    /// expiring this very second is still accepted).
    pub fn parse(username: &'a str, now: SystemTime) -> Result<Self, CredentialError> {
        let (expiry, user) = username
            .split_once(':')
            .ok_or_else(|| CredentialError::Malformed(username.to_owned()))?;
        if expiry.is_empty() || !expiry.bytes().all(|b| b.is_ascii_digit()) {
            return Err(CredentialError::BadExpiry(username.to_owned()));
        }
        let expires_at: u64 = expiry
            .parse()
            .map_err(|_| CredentialError::BadExpiry(username.to_owned()))?;
        if expires_at < unix_seconds(now) {
            return Err(CredentialError::Expired {
                user: user.to_owned(),
                expired_at: expires_at,
            });
        }
        Ok(RestUsername { expires_at, user })
    }
}

/// A username/password pair handed to one client, plus when it stops working.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedCredential {
    /// `<unix-expiry>:<user>`, to be sent as the STUN USERNAME.
    pub username: String,
    /// `base64(HMAC-SHA1(secret, username))`, the long-term password.
    pub password: String,
    /// Unix time (seconds) after which the relay refuses these credentials.
    pub expires_at: u64,
}

/// The shared secrets of the TURN REST API: issues credentials for the signaling layer and derives
/// the long-term keys the relay checks MESSAGE-INTEGRITY with.
#[derive(Clone)]
pub struct TurnCredentials {
    /// HMAC keys, in order; the first one issues, all of them verify (rotation).
    secrets: Vec<hmac::Key>,
}

impl std::fmt::Debug for TurnCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("TurnCredentials")
            .field("secrets", &self.secrets.len())
            .finish()
    }
}

/// Returned by [`TurnCredentials::new`] when it is given nothing to sign with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("TURN needs at least one non-empty auth secret (static-auth-secret)")]
pub struct NoSecret;

impl TurnCredentials {
    /// Builds the credential authority from the configured secrets, newest first. Empty strings are
    /// refused because an empty HMAC key would let anyone mint credentials.
    pub fn new<S: AsRef<[u8]>>(secrets: &[S]) -> Result<Self, NoSecret> {
        if secrets.is_empty() || secrets.iter().any(|s| s.as_ref().is_empty()) {
            return Err(NoSecret);
        }
        let secrets = secrets
            .iter()
            .map(|s| hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, s.as_ref()))
            .collect();
        Ok(TurnCredentials { secrets })
    }

    /// Issues credentials for `user` valid from `now` for `ttl`, signed with the newest secret.
    pub fn issue(&self, user: &str, now: SystemTime, ttl: Duration) -> IssuedCredential {
        let expires_at = unix_seconds(now).saturating_add(ttl.as_secs());
        let username = format!("{expires_at}:{user}");
        let password = password_for(&self.secrets[0], &username);
        IssuedCredential {
            username,
            password,
            expires_at,
        }
    }

    /// The passwords `username` would have under each accepted secret, newest first. The relay
    /// tries each (through [`long_term_key`]) until MESSAGE-INTEGRITY checks out.
    pub fn passwords<'a>(&'a self, username: &'a str) -> impl Iterator<Item = String> + 'a {
        self.secrets.iter().map(move |k| password_for(k, username))
    }

    /// Whether `password` is right for `username` under any accepted secret and the username has
    /// not expired. Meant for tests and tools; the relay itself checks MESSAGE-INTEGRITY.
    pub fn check_password(
        &self,
        username: &str,
        password: &str,
        now: SystemTime,
    ) -> Result<bool, CredentialError> {
        RestUsername::parse(username, now)?;
        Ok(self.passwords(username).any(|p| {
            // Constant-time comparison: the password is a MAC.
            subtle::ConstantTimeEq::ct_eq(p.as_bytes(), password.as_bytes()).into()
        }))
    }

    /// The WebRTC `iceServers` a client needs to reach this relay: STUN plus every enabled `turn:`
    /// and `turns:` URL, with fresh credentials for `user` valid for `ttl`.
    pub fn ice_servers(
        &self,
        user: &str,
        now: SystemTime,
        ttl: Duration,
        endpoints: &TurnEndpoints,
    ) -> IceServers {
        let credential = self.issue(user, now, ttl);
        let host = endpoints.host_for_url();
        let mut servers = Vec::with_capacity(2);
        if let Some(port) = endpoints.udp_port {
            servers.push(IceServer {
                urls: vec![format!("stun:{host}:{port}")],
                username: None,
                credential: None,
            });
        }
        let mut turn_urls = Vec::with_capacity(3);
        if let Some(port) = endpoints.udp_port {
            turn_urls.push(format!("turn:{host}:{port}?transport=udp"));
        }
        if let Some(port) = endpoints.tcp_port {
            turn_urls.push(format!("turn:{host}:{port}?transport=tcp"));
        }
        for port in [endpoints.tls_port, endpoints.https_port]
            .into_iter()
            .flatten()
        {
            turn_urls.push(format!("turns:{host}:{port}?transport=tcp"));
        }
        if !turn_urls.is_empty() {
            servers.push(IceServer {
                urls: turn_urls,
                username: Some(credential.username.clone()),
                credential: Some(credential.password.clone()),
            });
        }
        IceServers {
            ice_servers: servers,
            expires_at: credential.expires_at,
        }
    }
}

/// Where clients reach the relay, for building ICE server URLs. The gateway fills it from its public
/// host name and the enabled listeners.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TurnEndpoints {
    /// The public host name or IP clients connect to (the TLS certificate's name for `turns:`).
    pub host: String,
    /// The UDP port (`stun:` and `turn:?transport=udp`), or `None` if UDP is off.
    pub udp_port: Option<u16>,
    /// The TCP port (`turn:?transport=tcp`), or `None` if TCP is off.
    pub tcp_port: Option<u16>,
    /// The TLS port (`turns:`), or `None` if TLS is off.
    pub tls_port: Option<u16>,
    /// The HTTPS port, when it also answers TURN over TLS (`turn-on-https-port`): a second
    /// `turns:` URL, for callers whose firewall opens only that port.
    #[serde(default)]
    pub https_port: Option<u16>,
}

impl TurnEndpoints {
    /// IPv6 literals need brackets inside a URL.
    fn host_for_url(&self) -> String {
        if self.host.contains(':') && !self.host.starts_with('[') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        }
    }
}

/// One entry of `RTCConfiguration.iceServers`, serialised with the browser's field names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IceServer {
    /// `stun:`, `turn:` or `turns:` URLs sharing these credentials.
    pub urls: Vec<String>,
    /// The REST username; absent for STUN.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub username: Option<String>,
    /// The REST password; absent for STUN.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub credential: Option<String>,
}

/// What the signaling layer (or the HTTP credentials endpoint) sends a client: the `iceServers` list
/// and when its credentials expire, so the client knows when to ask again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IceServers {
    /// Ready to pass as `new RTCPeerConnection({ iceServers })`.
    pub ice_servers: Vec<IceServer>,
    /// Unix time (seconds) at which the TURN credentials stop working.
    pub expires_at: u64,
}

/// The RFC 5389 long-term key, `MD5(username ":" realm ":" password)`, that MESSAGE-INTEGRITY is an
/// HMAC-SHA1 under.
pub fn long_term_key(username: &str, realm: &str, password: &str) -> Vec<u8> {
    turn::auth::generate_auth_key(username, realm, password)
}

fn password_for(key: &hmac::Key, username: &str) -> String {
    BASE64_STANDARD.encode(hmac::sign(key, username.as_bytes()).as_ref())
}

fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn issues_coturn_compatible_password() {
        // Reference value computed with: echo -n "1700003600:alice" | openssl dgst -sha1 -hmac
        // secret -binary | base64
        let creds = TurnCredentials::new(&["secret"]).unwrap();
        let c = creds.issue("alice", at(1_700_000_000), Duration::from_secs(3600));
        assert_eq!(c.username, "1700003600:alice");
        assert_eq!(c.expires_at, 1_700_003_600);
        assert_eq!(c.password, "LLPLO4qjdVL2qZhwr3eImhn7J20=");
    }

    #[test]
    fn issued_credentials_check_until_expiry() {
        let creds = TurnCredentials::new(&["s3"]).unwrap();
        let c = creds.issue("bob", at(1000), Duration::from_secs(60));
        assert_eq!(
            creds.check_password(&c.username, &c.password, at(1000)),
            Ok(true)
        );
        assert_eq!(
            creds.check_password(&c.username, &c.password, at(1060)),
            Ok(true),
            "expiry second itself is valid (coturn)"
        );
        assert!(matches!(
            creds.check_password(&c.username, &c.password, at(1061)),
            Err(CredentialError::Expired {
                expired_at: 1060,
                ..
            })
        ));
        assert_eq!(
            creds.check_password(&c.username, "wrong", at(1000)),
            Ok(false)
        );
    }

    #[test]
    fn rotation_accepts_every_secret_and_issues_with_the_first() {
        let old = TurnCredentials::new(&["old"]).unwrap();
        let both = TurnCredentials::new(&["new", "old"]).unwrap();
        let new_only = TurnCredentials::new(&["new"]).unwrap();
        let c_old = old.issue("u", at(0), Duration::from_secs(10));
        assert_eq!(
            both.check_password(&c_old.username, &c_old.password, at(0)),
            Ok(true)
        );
        let c_both = both.issue("u", at(0), Duration::from_secs(10));
        assert_eq!(
            new_only.check_password(&c_both.username, &c_both.password, at(0)),
            Ok(true)
        );
        assert_eq!(
            new_only.check_password(&c_old.username, &c_old.password, at(0)),
            Ok(false)
        );
        assert_eq!(both.passwords("1:u").count(), 2);
    }

    #[test]
    fn refuses_empty_secrets() {
        assert_eq!(TurnCredentials::new::<&str>(&[]).unwrap_err(), NoSecret);
        assert_eq!(TurnCredentials::new(&["a", ""]).unwrap_err(), NoSecret);
    }

    #[test]
    fn parses_rest_usernames() {
        let now = at(100);
        assert_eq!(
            RestUsername::parse("200:alice", now),
            Ok(RestUsername {
                expires_at: 200,
                user: "alice"
            })
        );
        // The user part may itself contain ':' — only the first one separates.
        assert_eq!(RestUsername::parse("200:a:b", now).unwrap().user, "a:b");
        assert_eq!(RestUsername::parse("200:", now).unwrap().user, "");
        for bad in ["alice", ""] {
            assert!(matches!(
                RestUsername::parse(bad, now),
                Err(CredentialError::Malformed(_))
            ));
        }
        for bad in [
            ":alice",
            "x1:alice",
            "-5:alice",
            "+5:alice",
            " 5:a",
            "99999999999999999999999:a",
        ] {
            assert!(
                matches!(
                    RestUsername::parse(bad, now),
                    Err(CredentialError::BadExpiry(_))
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            RestUsername::parse("99:alice", now),
            Err(CredentialError::Expired { .. })
        ));
        // The engine's own handler treats the whole username as a number; we must not.
        assert!(RestUsername::parse("100", now).is_err());
    }

    #[test]
    fn error_messages_read_like_sentences() {
        let e = RestUsername::parse("5:alice", at(10)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the TURN credentials for \"alice\" expired at unix time 5"
        );
    }

    #[test]
    fn long_term_key_is_md5_of_user_realm_password() {
        // python3 -c 'import hashlib; print(list(hashlib.md5(b"user:realm:pass").digest()))'
        let k = long_term_key("user", "realm", "pass");
        assert_eq!(k.len(), 16);
        assert_eq!(
            k,
            [
                0x84, 0x93, 0xfb, 0xc5, 0x3b, 0xa5, 0x82, 0xfb, 0x4c, 0x04, 0x4c, 0x45, 0x6b, 0xdc,
                0x40, 0xeb
            ]
        );
    }

    #[test]
    fn ice_servers_list_every_enabled_listener() {
        let creds = TurnCredentials::new(&["s"]).unwrap();
        let endpoints = TurnEndpoints {
            host: "call.example.org".into(),
            udp_port: Some(3478),
            tcp_port: Some(3478),
            tls_port: Some(5349),
            https_port: Some(443),
        };
        let ice = creds.ice_servers("id-7", at(0), DEFAULT_CREDENTIAL_TTL, &endpoints);
        assert_eq!(ice.expires_at, 3600);
        assert_eq!(ice.ice_servers[0].urls, ["stun:call.example.org:3478"]);
        assert_eq!(
            ice.ice_servers[1].urls,
            [
                "turn:call.example.org:3478?transport=udp",
                "turn:call.example.org:3478?transport=tcp",
                "turns:call.example.org:5349?transport=tcp",
                "turns:call.example.org:443?transport=tcp"
            ]
        );
        assert_eq!(ice.ice_servers[1].username.as_deref(), Some("3600:id-7"));
        let json = serde_json::to_value(&ice).unwrap();
        assert!(json["iceServers"][0].get("username").is_none());
        assert_eq!(json["iceServers"][1]["username"], "3600:id-7");
        assert!(json["iceServers"][1]["credential"].is_string());
        assert_eq!(json["expiresAt"], 3600);

        let only_tls = TurnEndpoints {
            host: "2001:db8::1".into(),
            udp_port: None,
            tcp_port: None,
            tls_port: None,
            https_port: Some(443),
        };
        let ice = creds.ice_servers("x", at(0), DEFAULT_CREDENTIAL_TTL, &only_tls);
        assert_eq!(ice.ice_servers.len(), 1);
        assert_eq!(
            ice.ice_servers[0].urls,
            ["turns:[2001:db8::1]:443?transport=tcp"]
        );
    }
}

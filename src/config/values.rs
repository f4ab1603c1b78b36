//! The value types of settings: how each is written in a flag, the environment or the TOML file
//! (`FromStr`, `Deserialize`) and how `check-config` prints it back (`Serialize`, `Display`).
//!
//! Subsystems use these types too (a [`Secret`] is compared where it is checked), so this module
//! depends on nothing else in the crate.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use clap::ValueEnum;
use serde::{Deserialize, Deserializer, Serialize};

/// A listener address, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
    /// Bind here.
    On(SocketAddr),
    /// Do not open this listener.
    Off,
}

impl Listen {
    /// The address, if the listener is on.
    pub fn addr(self) -> Option<SocketAddr> {
        match self {
            Listen::On(addr) => Some(addr),
            Listen::Off => None,
        }
    }
}

impl FromStr for Listen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.eq_ignore_ascii_case("off") {
            return Ok(Listen::Off);
        }
        s.parse()
            .map(Listen::On)
            .map_err(|_| format!("\"{s}\" is neither an address like 0.0.0.0:8080 nor \"off\""))
    }
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listen::On(addr) => addr.fmt(f),
            Listen::Off => f.write_str("off"),
        }
    }
}

impl<'de> Deserialize<'de> for Listen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl Serialize for Listen {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A duration written as seconds: `30`, `30s`, `500ms`, `5m`, `1h` or `365d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seconds(pub Duration);

impl FromStr for Seconds {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, unit) = s.split_at(split);
        let bad = || format!("\"{s}\" is not a duration (examples: 30, 30s, 500ms, 5m, 1h, 365d)");
        let n: u64 = digits.parse().map_err(|_| bad())?;
        let duration = match unit {
            "" | "s" => Duration::from_secs(n),
            "ms" => Duration::from_millis(n),
            "m" => Duration::from_secs(n.checked_mul(60).ok_or_else(bad)?),
            "h" => Duration::from_secs(n.checked_mul(3600).ok_or_else(bad)?),
            "d" => Duration::from_secs(n.checked_mul(86_400).ok_or_else(bad)?),
            _ => return Err(bad()),
        };
        Ok(Seconds(duration))
    }
}

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(Seconds(Duration::from_secs(n))),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl fmt::Display for Seconds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.subsec_millis() == 0 {
            write!(f, "{}s", self.0.as_secs())
        } else {
            write!(f, "{}ms", self.0.as_millis())
        }
    }
}

impl Serialize for Seconds {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl From<Seconds> for Duration {
    fn from(s: Seconds) -> Duration {
        s.0
    }
}

impl From<Duration> for Seconds {
    fn from(d: Duration) -> Seconds {
        Seconds(d)
    }
}

/// A port, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortOrOff {
    /// Listen on this port.
    Port(u16),
    /// No listener.
    Off,
}

impl FromStr for PortOrOff {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.eq_ignore_ascii_case("off") {
            return Ok(PortOrOff::Off);
        }
        s.parse()
            .map(PortOrOff::Port)
            .map_err(|_| format!("\"{s}\" is neither a port number nor \"off\""))
    }
}

impl<'de> Deserialize<'de> for PortOrOff {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u16),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(port) => Ok(PortOrOff::Port(port)),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl Serialize for PortOrOff {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            PortOrOff::Port(port) => s.serialize_u16(*port),
            PortOrOff::Off => s.serialize_str("off"),
        }
    }
}

/// An address range in CIDR notation (a bare address is a /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpRange(pub ipnet::IpNet);

impl FromStr for IpRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        s.parse::<ipnet::IpNet>()
            .or_else(|_| s.parse::<IpAddr>().map(ipnet::IpNet::from))
            .map(IpRange)
            .map_err(|_| format!("\"{s}\" is not an address or CIDR range (e.g. 10.0.0.0/8)"))
    }
}

impl<'de> Deserialize<'de> for IpRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl Serialize for IpRange {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

/// `PUBLIC` or `PUBLIC/PRIVATE`, as coturn's external-ip.
pub(crate) fn parse_external_ip(s: &str) -> Result<(IpAddr, Option<IpAddr>), String> {
    let bad =
        || format!("\"{s}\" must be PUBLIC or PUBLIC/PRIVATE addresses, e.g. 203.0.113.7/10.0.0.5");
    match s.split_once('/') {
        Some((public, private)) => Ok((
            public.trim().parse().map_err(|_| bad())?,
            Some(private.trim().parse().map_err(|_| bad())?),
        )),
        None => Ok((s.trim().parse().map_err(|_| bad())?, None)),
    }
}

/// A secret setting (a token): never printed, compared in constant time.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for the one place that must use it (signing, comparing).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `candidate` equals the secret, in time independent of where they differ.
    pub fn matches(&self, candidate: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        self.0.len() == candidate.len() && bool::from(self.0.as_bytes().ct_eq(candidate))
    }
}

impl FromStr for Secret {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(Secret(s.to_owned()))
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Secret {
        Secret(s)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("***")
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// A checked `https://host[:port]` origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicUrl {
    /// `host` or `host:port`, as it appears in an `Origin` header.
    pub authority: String,
}

impl PublicUrl {
    /// Checks and normalises `https://host[:port]` (lowercase, no trailing slash).
    pub fn parse(s: &str) -> Result<Self, String> {
        let rest = s
            .strip_prefix("https://")
            .ok_or_else(|| format!("\"{s}\" must start with https://"))?;
        let authority = rest.trim_end_matches('/');
        let valid = !authority.is_empty()
            && authority
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b));
        if !valid {
            return Err(format!(
                "\"{s}\" must be https://host or https://host:port, without a path"
            ));
        }
        Ok(PublicUrl {
            authority: authority.to_ascii_lowercase(),
        })
    }
}

impl PublicUrl {
    /// The host part, without port or brackets.
    pub fn host(&self) -> &str {
        let authority = self.authority.as_str();
        if let Some(rest) = authority.strip_prefix('[') {
            return rest.split(']').next().unwrap_or(rest);
        }
        authority.split(':').next().unwrap_or(authority)
    }
}

impl fmt::Display for PublicUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "https://{}", self.authority)
    }
}

impl Serialize for PublicUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Let's Encrypt's production directory, the default `acme-directory`.
pub const LETS_ENCRYPT_PRODUCTION: &str = "https://acme-v02.api.letsencrypt.org/directory";

/// Which ACME challenge callgate answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AcmeChallenge {
    /// TLS-ALPN-01 on the HTTPS listener first, HTTP-01 after a failed validation, and so on.
    Auto,
    /// Only TLS-ALPN-01 (the CA connects to port 443).
    #[value(name = "tls-alpn-01")]
    #[serde(rename = "tls-alpn-01")]
    TlsAlpn01,
    /// Only HTTP-01 (the CA connects to port 80).
    #[value(name = "http-01")]
    #[serde(rename = "http-01")]
    Http01,
}

/// A `redis://` or `rediss://` URL. It may carry a password, so it prints with the user part
/// masked (`redis://***@host:6379`).
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct RedisUrl(String);

impl RedisUrl {
    /// The URL itself, for the one place that connects.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the connection uses TLS (`rediss://`).
    pub fn is_tls(&self) -> bool {
        self.0.starts_with("rediss://")
    }
}

impl FromStr for RedisUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if !(s.starts_with("redis://") || s.starts_with("rediss://")) {
            return Err(format!(
                "\"{}\" must start with redis:// or rediss:// (e.g. redis://10.0.0.5:6379)",
                RedisUrl(s.to_owned())
            ));
        }
        redis::IntoConnectionInfo::into_connection_info(s).map_err(|e| {
            format!(
                "\"{}\" is not a Redis URL like redis://:PASSWORD@HOST:6379/0 ({:?})",
                RedisUrl(s.to_owned()),
                e.kind()
            )
        })?;
        Ok(RedisUrl(s.to_owned()))
    }
}

impl TryFrom<String> for RedisUrl {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some((scheme, rest)) = self.0.split_once("://") else {
            return f.write_str("***");
        };
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        match rest[..authority_end].rfind('@') {
            Some(at) => write!(f, "{scheme}://***{}", &rest[at..]),
            None => f.write_str(&self.0),
        }
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RedisUrl({self})")
    }
}

impl Serialize for RedisUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

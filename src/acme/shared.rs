//! ACME state shared by the nodes of a cluster through Redis (`redis-url` set).
//!
//! One certificate for every node, obtained by one order: the node that wants to order takes a
//! lock with a TTL ([`LOCK_TTL`]) and a fencing token, and keeps renewing it while the order runs;
//! if it dies, the lock lapses and another node takes over. Everything the lock holder writes (the
//! challenge answers, the account, the certificate) goes through a script that checks the lock is
//! still its own, so a node that lost the lock (paused, cut off) cannot overwrite a newer result.
//!
//! Every node [`follow`]s the shared state: it polls one version pair every [`POLL`] (no Redis
//! round trip on an ordinary handshake or request), and on a change loads the certificate into its
//! [`CertStore`] (new handshakes get it; open connections are untouched) and into its own
//! certs-dir copy (a restart without Redis still serves it), or the pending challenge answers into
//! its local [`ChallengeAnswers`] — so the CA's validation can land on any node behind the load
//! balancer. A node acknowledges the challenge version it serves; the orderer tells the CA to
//! validate only once every live node has (or after [`ACK_WAIT`]).
//!
//! Keys, per ACME directory (`cg:acme:<directory slug>:…`), each with a TTL or one per directory:
//! - `lock` — `"<node>:<fence>"`, PX [`LOCK_TTL`]; `fence` — the INCR counter of fencing tokens;
//! - `cert` — hash `version`, `chain` (PEM), `key` (sealed, see [`super::seal`]); replaced whole;
//! - `account` — the account credentials, sealed;
//! - `challenges` — hash `version`, `answers` (JSON), PX [`CHALLENGE_TTL`]; `seen` — hash node →
//!   challenge version it serves, PX [`CHALLENGE_TTL`];
//! - `pause` — the node that failed the last order: while it exists no other node takes the
//!   lock, PX the back-off + [`PAUSE_GRACE`]; `failures` — consecutive failed orders, PX
//!   [`FAILURES_TTL`] (both deleted by the next success);
//! - `ari` — the CA's renewal information for the served certificate, sealed, PX until it should
//!   be asked again; `ari-ask` — the node asking the CA now, PX [`ARI_ASK_TTL`].
//!
//! The lock covers one order attempt only: a failed attempt counts the failure, then sets
//! `pause` and releases the lock in one script. The node that failed retries when its back-off
//! ends; if it died meanwhile, the others take over [`PAUSE_GRACE`] later — with the back-off
//! still doubling from the cluster's count, so the cluster retries no faster than one node
//! would.
//!
//! Renewal information (ARI) is asked by one node at a time (`ari-ask`); the others read its
//! answer from `ari` until the CA's Retry-After.
//!
//! Redis down: nothing is ordered (the lock cannot be taken), every node keeps serving what it
//! has, and picks up any change once Redis answers again.

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use redis::Script;

use super::challenge::ChallengeAnswers;
use super::seal::{SealError, Sealer};
use super::store::AcmeStore;
use crate::cluster::nodes::NODES_KEY;
use crate::cluster::redis::{Redis, RedisError};
use crate::shutdown::Shutdown;
use crate::tls::CertStore;

/// How long the ordering lock lasts without renewal: how soon another node takes over from a node
/// that died mid-order.
pub const LOCK_TTL: Duration = Duration::from_secs(30);
/// How often every node looks for a new certificate or pending challenges.
pub const POLL: Duration = Duration::from_secs(1);
/// How long published challenge answers live (longer than an order may take).
pub const CHALLENGE_TTL: Duration = Duration::from_secs(600);
/// The longest the orderer waits for every live node to serve the challenge answers.
pub const ACK_WAIT: Duration = Duration::from_secs(10);
/// How long the count of consecutive failed orders outlives the last failure (longer than the
/// longest back-off, so the next failure, on whichever node, doubles it).
pub const FAILURES_TTL: Duration = Duration::from_secs(12 * 3600);
/// How much longer than the node that failed an order the other nodes wait before ordering.
pub const PAUSE_GRACE: Duration = Duration::from_secs(5);
/// How long one node has to ask the CA for renewal information before another may.
pub const ARI_ASK_TTL: Duration = Duration::from_secs(60);

/// Why shared ACME state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    /// Redis could not be reached or refused the command.
    #[error("{0}")]
    Redis(#[from] RedisError),
    /// The lock is no longer this node's: another node took over (this one was too slow).
    #[error("the ACME ordering lock passed to another node")]
    Fenced,
    /// A stored secret does not open.
    #[error(transparent)]
    Seal(#[from] SealError),
    /// The cluster's certificate could not be kept under this node's certs-dir.
    #[error("cannot keep the cluster's certificate under certs-dir: {0}")]
    Local(#[from] super::store::StoreError),
    /// A published TLS-ALPN-01 answer could not be turned into a validation certificate.
    #[error("{0}")]
    Validation(String),
    /// A stored value is not what callgate writes.
    #[error("the stored {0} is unreadable")]
    Malformed(&'static str),
}

/// The ordering lock, held by this node: its value is `"<node>:<fence>"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lock(String);

impl Lock {
    /// The fencing token: the value written with the certificate as its version.
    pub fn value(&self) -> &str {
        &self.0
    }
}

/// A certificate as stored in Redis.
pub struct SharedCertificate {
    /// Changes with every stored certificate (the fencing token of the order).
    pub version: String,
    /// PEM chain, leaf first.
    pub chain: String,
    /// PEM private key (opened).
    pub key: String,
}

/// The CA's renewal information for one certificate, as shared between the nodes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AriAnswer {
    /// The certificate's ARI identifier (`<AKI>.<serial>`, base64url).
    pub cert: String,
    /// When to renew (Unix seconds), if the CA named a window.
    pub due: Option<i64>,
    /// When to ask the CA again (Unix seconds).
    pub next_check: i64,
    /// The CA offers no renewal information.
    pub unsupported: bool,
}

/// What one node should do about renewal information now ([`SharedStore::renewal_info`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AriTurn {
    /// Another node asked the CA; here is its answer.
    Answer(AriAnswer),
    /// This node asks the CA, then stores the answer ([`SharedStore::save_renewal_info`]).
    Ask,
    /// Another node is asking the CA now: look again later.
    Wait,
}

/// Challenge answers as published: what every node must answer while an order is validated.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PublishedChallenges {
    /// HTTP-01: token → key authorization.
    pub http01: BTreeMap<String, String>,
    /// TLS-ALPN-01: domain → SHA-256 of the key authorization, hex. Each node makes its own
    /// validation certificate from it (no private key travels).
    pub tls_alpn01: BTreeMap<String, String>,
}

impl PublishedChallenges {
    /// Makes `answers` hold exactly these answers (swapped in at once).
    pub fn apply(&self, answers: &ChallengeAnswers) -> Result<(), SharedError> {
        let digests = self
            .tls_alpn01
            .iter()
            .map(|(domain, hex)| Some((domain.clone(), from_hex(hex)?)))
            .collect::<Option<Vec<_>>>()
            .ok_or(SharedError::Malformed("challenge answers"))?;
        let http01 = self.http01.clone().into_iter().collect();
        answers
            .replace_all(http01, &digests)
            .map_err(|e| SharedError::Validation(e.to_string()))
    }
}

/// `SET lock` if free and the cluster is not backing off (`KEYS[3]`, the pause, unless it is
/// this node's own: the node that failed retries first), or extend it if it is `ARGV[3]`, ours;
/// returns the value or nil.
static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local current = redis.call('GET', KEYS[1])
if current then
  if current == ARGV[3] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return current
  end
  return false
end
local pause = redis.call('GET', KEYS[3])
if pause and pause ~= ARGV[1] then
  return false
end
local value = ARGV[1] .. ':' .. redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
return value
",
    )
});

/// Sets the lock's TTL (`ARGV[2]` ms) if it is still `ARGV[1]`; 1 or 0.
static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
",
    )
});

/// Deletes the lock if it is still `ARGV[1]`.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
",
    )
});

/// A failed order: if the lock (`KEYS[1]`) is still `ARGV[1]`, counts the failure in `KEYS[2]`
/// (TTL `ARGV[2]` ms) and returns the count; 0 if the lock is not ours.
static FAILED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
local failures = redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return failures
",
    )
});

/// The back-off: if the lock (`KEYS[1]`) is still `ARGV[1]`, sets the pause `KEYS[2]` to this
/// node (`ARGV[3]`) for `ARGV[2]` ms and releases the lock, at once. 1 or 0.
static BACK_OFF: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[2])
redis.call('DEL', KEYS[1])
return 1
",
    )
});

/// Fenced write: if the lock (`KEYS[1]`) is still `ARGV[1]`, replaces hash `KEYS[2]` with the
/// field/value pairs in `ARGV[3..]` and, if `ARGV[2]` > 0, sets its TTL (ms). 1 or 0.
static WRITE_HASH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[2])
if #ARGV > 2 then
  redis.call('HSET', KEYS[2], unpack(ARGV, 3))
  if tonumber(ARGV[2]) > 0 then
    redis.call('PEXPIRE', KEYS[2], ARGV[2])
  end
end
return 1
",
    )
});

/// The live nodes (listed in `KEYS[1]` with an alive key) that have not acknowledged challenge
/// version `ARGV[1]` in hash `KEYS[2]`.
static NOT_SEEN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local missing = {}
local listed = redis.call('HGETALL', KEYS[1])
for i = 1, #listed, 2 do
  local node = listed[i]
  if redis.call('EXISTS', 'cg:node:' .. node .. ':alive') == 1
     and redis.call('HGET', KEYS[2], node) ~= ARGV[1] then
    table.insert(missing, node)
  end
end
return missing
",
    )
});

/// One ACME directory's shared state, as seen by one node.
pub struct SharedStore {
    /// The cluster's connection.
    redis: Redis,
    /// This node's `node-id`.
    node: String,
    /// `cg:acme:<directory slug>:`.
    prefix: String,
    /// Opens and seals the secrets.
    sealer: Sealer,
    /// The certificate version this node serves (so its own order is not loaded twice).
    served: Mutex<Option<String>>,
    /// One load at a time (the follower and the ordering task both load; two writing the same
    /// certs-dir files at once would leave the other reading half a pair).
    loading: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for SharedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedStore")
            .field("node", &self.node)
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl SharedStore {
    /// The shared state of ACME `directory` (the URL) for node `node`.
    pub fn new(redis: Redis, node: &str, directory: &str, sealer: Sealer) -> SharedStore {
        SharedStore {
            redis,
            node: node.to_owned(),
            prefix: format!("cg:acme:{}:", super::store::slug(directory)),
            sealer,
            served: Mutex::new(None),
            loading: tokio::sync::Mutex::new(()),
        }
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// Takes the ordering lock if it is free, or extends `held` if it is still ours. `None`:
    /// another node holds it.
    pub async fn acquire(
        &self,
        held: Option<&Lock>,
        ttl: Duration,
    ) -> Result<Option<Lock>, RedisError> {
        let mut invocation = ACQUIRE.prepare_invoke();
        invocation
            .key(self.key("lock"))
            .key(self.key("fence"))
            .key(self.key("pause"))
            .arg(&self.node)
            .arg(millis(ttl))
            .arg(held.map_or("", Lock::value));
        let value: Option<String> = self.redis.script(&invocation).await?;
        Ok(value.map(Lock))
    }

    /// Sets the lock's TTL to `ttl` if it is still ours; `false` if it is not.
    pub async fn renew(&self, lock: &Lock, ttl: Duration) -> Result<bool, RedisError> {
        let mut invocation = RENEW.prepare_invoke();
        invocation
            .key(self.key("lock"))
            .arg(lock.value())
            .arg(millis(ttl));
        let renewed: i64 = self.redis.script(&invocation).await?;
        Ok(renewed == 1)
    }

    /// Gives the lock up (if it is still ours); errors are only logged (it lapses by itself).
    pub async fn release(&self, lock: &Lock) {
        let mut invocation = RELEASE.prepare_invoke();
        invocation.key(self.key("lock")).arg(lock.value());
        if let Err(e) = self.redis.script::<i64>(&invocation).await {
            tracing::debug!("ACME: could not release the ordering lock (it lapses by itself): {e}");
        }
    }

    /// Counts a failed order of `lock`'s holder; returns the cluster's consecutive failures
    /// (this one included), or 0 if the lock is no longer ours.
    pub async fn failed(&self, lock: &Lock) -> Result<u32, RedisError> {
        let mut invocation = FAILED.prepare_invoke();
        invocation
            .key(self.key("lock"))
            .key(self.key("failures"))
            .arg(lock.value())
            .arg(millis(FAILURES_TTL));
        let failures: i64 = self.redis.script(&invocation).await?;
        Ok(failures.clamp(0, i64::from(u32::MAX)) as u32)
    }

    /// Starts the cluster's back-off of `delay` and gives the lock up, in one step: this node
    /// may order again after `delay`, the others after `delay` + [`PAUSE_GRACE`] (so the node
    /// that failed retries first, and if it died meanwhile the others take over by
    /// themselves). Errors are only logged: the lock lapses by itself.
    pub async fn back_off(&self, lock: &Lock, delay: Duration) {
        let mut invocation = BACK_OFF.prepare_invoke();
        invocation
            .key(self.key("lock"))
            .key(self.key("pause"))
            .arg(lock.value())
            .arg(millis(delay + PAUSE_GRACE))
            .arg(&self.node);
        if let Err(e) = self.redis.script::<i64>(&invocation).await {
            tracing::debug!("ACME: could not share the back-off (the lock lapses by itself): {e}");
        }
    }

    /// An order succeeded: the cluster's failure count and back-off go. Errors are only logged
    /// (both expire).
    pub async fn succeeded(&self) {
        let cmd = redis::cmd("DEL")
            .arg(self.key("failures"))
            .arg(self.key("pause"))
            .clone();
        if let Err(e) = self.redis.query::<i64>(&cmd).await {
            tracing::debug!("ACME: could not clear the cluster's back-off (it expires): {e}");
        }
    }

    /// What this node should do about renewal information for certificate `cert` (its ARI
    /// identifier) at `now` (Unix seconds): use the answer another node stored, ask the CA
    /// itself (it is now the one node asking, for [`ARI_ASK_TTL`]), or wait for the node that
    /// is asking.
    pub async fn renewal_info(&self, cert: &str, now: i64) -> Result<AriTurn, SharedError> {
        let cmd = redis::cmd("GET").arg(self.key("ari")).clone();
        if let Some(sealed) = self.redis.query::<Option<String>>(&cmd).await? {
            let json = self.sealer.open("renewal-info", &sealed)?;
            let answer: AriAnswer = serde_json::from_slice(&json)
                .map_err(|_| SharedError::Malformed("renewal information"))?;
            if answer.cert == cert && answer.next_check > now {
                return Ok(AriTurn::Answer(answer));
            }
        }
        let claim = redis::cmd("SET")
            .arg(self.key("ari-ask"))
            .arg(&self.node)
            .arg("NX")
            .arg("PX")
            .arg(millis(ARI_ASK_TTL))
            .clone();
        let claimed: Option<String> = self.redis.query(&claim).await?;
        Ok(match claimed {
            Some(_) => AriTurn::Ask,
            None => AriTurn::Wait,
        })
    }

    /// Stores the CA's renewal information for every node (sealed: it decides when the cluster
    /// renews), until its `next_check` as of `now`, and ends this node's turn to ask.
    pub async fn save_renewal_info(&self, answer: &AriAnswer, now: i64) -> Result<(), SharedError> {
        let json = serde_json::to_vec(answer).expect("renewal information serializes");
        let sealed = self.sealer.seal("renewal-info", &json);
        let ttl =
            Duration::from_secs(answer.next_check.saturating_sub(now).clamp(1, 2 * 86_400) as u64);
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(self.key("ari"))
            .arg(sealed)
            .arg("PX")
            .arg(millis(ttl))
            .ignore();
        pipe.cmd("DEL").arg(self.key("ari-ask")).ignore();
        self.redis.pipeline::<()>(&pipe).await?;
        Ok(())
    }

    /// Renews `lock` every third of [`LOCK_TTL`] for as long as it is awaited; returns when the
    /// lock is lost: taken over, or not renewed for two thirds of its TTL (Redis unreachable), so
    /// the caller stops before another node can take it.
    pub async fn keep(&self, lock: &Lock) -> SharedError {
        let mut renewed = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(LOCK_TTL / 6).await;
            match self.renew(lock, LOCK_TTL).await {
                Ok(true) => renewed = tokio::time::Instant::now(),
                Ok(false) => return SharedError::Fenced,
                Err(e) if renewed.elapsed() >= LOCK_TTL * 2 / 3 => return SharedError::Redis(e),
                Err(_) => {}
            }
        }
    }

    /// Runs `invocation` of [`WRITE_HASH`]; `Fenced` if the lock was no longer `lock`.
    async fn write_hash(
        &self,
        lock: &Lock,
        name: &str,
        ttl: Option<Duration>,
        fields: &[(&str, &str)],
    ) -> Result<(), SharedError> {
        let mut invocation = WRITE_HASH.prepare_invoke();
        invocation
            .key(self.key("lock"))
            .key(self.key(name))
            .arg(lock.value())
            .arg(ttl.map_or(0, millis));
        for (field, value) in fields {
            invocation.arg(*field).arg(*value);
        }
        match self.redis.script::<i64>(&invocation).await? {
            1 => Ok(()),
            _ => Err(SharedError::Fenced),
        }
    }

    /// The stored account credentials, if any.
    pub async fn account(&self) -> Result<Option<instant_acme::AccountCredentials>, SharedError> {
        let cmd = redis::cmd("HGET")
            .arg(self.key("account"))
            .arg("sealed")
            .clone();
        let Some(sealed) = self.redis.query::<Option<String>>(&cmd).await? else {
            return Ok(None);
        };
        let json = self.sealer.open("account", &sealed)?;
        serde_json::from_slice(&json)
            .map(Some)
            .map_err(|_| SharedError::Malformed("ACME account"))
    }

    /// Stores the account credentials, sealed (lock holder only).
    pub async fn save_account(
        &self,
        lock: &Lock,
        credentials: &instant_acme::AccountCredentials,
    ) -> Result<(), SharedError> {
        let json = serde_json::to_vec(credentials).expect("credentials serialize");
        let sealed = self.sealer.seal("account", &json);
        self.write_hash(lock, "account", None, &[("sealed", &sealed)])
            .await
    }

    /// The stored certificate's version, if there is one.
    pub async fn certificate_version(&self) -> Result<Option<String>, RedisError> {
        let cmd = redis::cmd("HGET")
            .arg(self.key("cert"))
            .arg("version")
            .clone();
        self.redis.query(&cmd).await
    }

    /// The stored certificate, its key opened.
    pub async fn certificate(&self) -> Result<Option<SharedCertificate>, SharedError> {
        let cmd = redis::cmd("HMGET")
            .arg(self.key("cert"))
            .arg(&["version", "chain", "key"][..])
            .clone();
        let fields: Vec<Option<String>> = self.redis.query(&cmd).await?;
        let [Some(version), Some(chain), Some(sealed)] = <[Option<String>; 3]>::try_from(fields)
            .map_err(|_| SharedError::Malformed("certificate"))?
        else {
            return Ok(None);
        };
        let key = self.sealer.open("certificate-key", &sealed)?;
        let key = String::from_utf8(key).map_err(|_| SharedError::Malformed("certificate key"))?;
        Ok(Some(SharedCertificate {
            version,
            chain,
            key,
        }))
    }

    /// Stores a newly issued chain and key (sealed) for every node (lock holder only); the
    /// version is the lock's fencing token. This node counts it as served.
    pub async fn save_certificate(
        &self,
        lock: &Lock,
        chain: &str,
        key: &str,
    ) -> Result<(), SharedError> {
        let sealed = self.sealer.seal("certificate-key", key.as_bytes());
        let version = lock.value();
        self.write_hash(
            lock,
            "cert",
            None,
            &[("version", version), ("chain", chain), ("key", &sealed)],
        )
        .await?;
        self.set_served(Some(version.to_owned()));
        Ok(())
    }

    /// Publishes the answers every node must serve (lock holder only); returns their version.
    pub async fn publish_challenges(
        &self,
        lock: &Lock,
        challenges: &PublishedChallenges,
        serial: u32,
    ) -> Result<String, SharedError> {
        let version = format!("{}:{serial}", lock.value());
        let answers = serde_json::to_string(challenges).expect("challenges serialize");
        self.write_hash(
            lock,
            "challenges",
            Some(CHALLENGE_TTL),
            &[("version", &version), ("answers", &answers)],
        )
        .await?;
        Ok(version)
    }

    /// Removes the published answers (the order is over).
    pub async fn clear_challenges(&self, lock: &Lock) {
        if let Err(e) = self.write_hash(lock, "challenges", None, &[]).await {
            tracing::debug!("ACME: could not remove the published challenges (they expire): {e}");
        }
    }

    /// Waits until every live node serves challenge `version`, up to [`ACK_WAIT`]; returns the
    /// nodes that still do not.
    pub async fn wait_seen(&self, version: &str) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + ACK_WAIT;
        loop {
            let mut invocation = NOT_SEEN.prepare_invoke();
            invocation.key(NODES_KEY).key(self.key("seen")).arg(version);
            let missing: Vec<String> = self
                .redis
                .script(&invocation)
                .await
                .unwrap_or_else(|_| vec!["(Redis unreachable)".to_owned()]);
            if missing.is_empty() || tokio::time::Instant::now() >= deadline {
                return missing;
            }
            tokio::time::sleep(POLL / 4).await;
        }
    }

    fn served(&self) -> Option<String> {
        self.served
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_served(&self, version: Option<String>) {
        *self.served.lock().unwrap_or_else(|e| e.into_inner()) = version;
    }

    /// Loads the shared certificate if it is newer than the one served: into `store` (this node's
    /// certs-dir copy) and `certs`. Returns whether it replaced the served one.
    pub async fn load_certificate(
        &self,
        store: &AcmeStore,
        certs: &CertStore,
    ) -> Result<bool, SharedError> {
        let _one_at_a_time = self.loading.lock().await;
        let version = self.certificate_version().await?;
        if version.is_none() || version == self.served() {
            return Ok(false);
        }
        let Some(shared) = self.certificate().await? else {
            return Ok(false);
        };
        let stored = store.save_certificate(&shared.chain, &shared.key)?;
        let current = certs.current();
        if current.cert.first() != stored.key.cert.first() {
            certs.replace(stored.key);
            tracing::info!(
                version = %shared.version,
                names = %stored.names.join(","),
                not_after = stored.not_after,
                "ACME: serving the cluster's certificate"
            );
        }
        self.set_served(Some(shared.version));
        Ok(true)
    }

    /// One look at the shared state: a new certificate, new or ended challenges.
    async fn poll(
        &self,
        store: &AcmeStore,
        certs: &CertStore,
        answers: &ChallengeAnswers,
        seen: &mut Option<String>,
    ) -> Result<(), SharedError> {
        let mut pipe = redis::pipe();
        pipe.cmd("HGET").arg(self.key("cert")).arg("version");
        pipe.cmd("HMGET")
            .arg(self.key("challenges"))
            .arg(&["version", "answers"][..]);
        let (cert_version, (challenge_version, published)): (
            Option<String>,
            (Option<String>, Option<String>),
        ) = self.redis.pipeline(&pipe).await?;
        // Challenges first: a certificate that cannot be loaded must not stop this node from
        // answering the CA.
        let challenges = self
            .follow_challenges(answers, challenge_version, published, seen)
            .await;
        if cert_version.is_some() && cert_version != self.served() {
            self.load_certificate(store, certs).await?;
        }
        challenges
    }

    /// Loads published challenge answers of a new `challenge_version` into `answers` (or clears
    /// them when none are published) and acknowledges the version.
    async fn follow_challenges(
        &self,
        answers: &ChallengeAnswers,
        challenge_version: Option<String>,
        published: Option<String>,
        seen: &mut Option<String>,
    ) -> Result<(), SharedError> {
        if challenge_version == *seen {
            return Ok(());
        }
        match (&challenge_version, published) {
            (Some(version), Some(json)) => {
                let published: PublishedChallenges = serde_json::from_str(&json)
                    .map_err(|_| SharedError::Malformed("challenge answers"))?;
                published.apply(answers)?;
                let mut pipe = redis::pipe();
                pipe.cmd("HSET")
                    .arg(self.key("seen"))
                    .arg(&self.node)
                    .arg(version)
                    .ignore();
                pipe.cmd("PEXPIRE")
                    .arg(self.key("seen"))
                    .arg(millis(CHALLENGE_TTL))
                    .ignore();
                self.redis.pipeline::<()>(&pipe).await?;
                tracing::info!(%version, "ACME: serving the cluster's challenge answers");
            }
            _ => answers.clear(),
        }
        *seen = challenge_version;
        Ok(())
    }
}

/// Every node's follower: every [`POLL`], loads a new shared certificate into `certs` (and its
/// certs-dir copy in `store`) and the pending challenge answers into `answers`, until `shutdown`.
/// Redis errors keep what is served and are retried at the next poll.
pub fn follow(
    shared: Arc<SharedStore>,
    store: AcmeStore,
    certs: Arc<CertStore>,
    answers: Arc<ChallengeAnswers>,
    mut shutdown: Shutdown,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut seen = None;
        // The last problem logged, so a lasting one is logged once, not every second.
        let mut logged: Option<String> = None;
        let mut ticks = tokio::time::interval(POLL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.recv() => return,
                _ = ticks.tick() => {}
            }
            match shared.poll(&store, &certs, &answers, &mut seen).await {
                // Outages are logged once by the Redis connection itself.
                Ok(()) | Err(SharedError::Redis(_)) => logged = None,
                Err(e) => {
                    let text = e.to_string();
                    if logged.as_ref() != Some(&text) {
                        tracing::warn!(
                            "ACME: cannot use the cluster's shared state: {text}; still serving \
                             the current certificate"
                        );
                        logged = Some(text);
                    }
                }
            }
        }
    })
}

fn millis(d: Duration) -> u64 {
    d.as_millis().try_into().unwrap_or(u64::MAX)
}

/// Lowercase hex.
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_challenges_rebuild_the_local_answers() {
        let answers = ChallengeAnswers::new();
        answers.add_http01("stale".into(), "stale.thumb".into());
        let mut published = PublishedChallenges::default();
        published.http01.insert("tok".into(), "tok.thumb".into());
        published
            .tls_alpn01
            .insert("call.example.com".into(), to_hex(&[9u8; 32]));
        let json = serde_json::to_string(&published).unwrap();
        let back: PublishedChallenges = serde_json::from_str(&json).unwrap();
        back.apply(&answers).unwrap();
        assert_eq!(
            answers.http01("stale"),
            None,
            "answers of an ended order go"
        );
        assert_eq!(answers.http01("tok").as_deref(), Some("tok.thumb"));
        let cert = answers.tls_alpn01("call.example.com").expect("published");
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.cert[0].as_ref()).unwrap();
        let ext = parsed
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
            .unwrap();
        assert_eq!(&ext.value[2..], &[9u8; 32]);
    }

    #[test]
    fn hex_round_trips_and_rejects_junk() {
        assert_eq!(
            from_hex(&to_hex(&[0, 1, 0xab, 0xff])),
            Some(vec![0, 1, 0xab, 0xff])
        );
        assert_eq!(from_hex("abc"), None);
        assert_eq!(from_hex("zz"), None);
    }
}

//! The ordering and renewal task: the only part of `acme` that talks to the CA.
//!
//! It runs for the life of the server: sleeps until the stored certificate is due for renewal
//! (or orders at once if there is none, it is expired, or it lacks a configured name), orders
//! through instant-acme, publishes the challenge answers while the CA validates, writes the
//! result under certs-dir and swaps it into the [`CertStore`] — handshakes after the swap get the
//! new certificate, open connections are untouched. A failure keeps the current certificate
//! serving, is logged once with its reason and what to do, counted by reason, and retried with
//! back-off.
//!
//! In a cluster ([`Acme::share`]) the same loop runs on every node, but an order starts only on
//! the node that holds the shared ordering lock (see `shared.rs`); the others wait and load what
//! it stores. Orders and their outcomes are counted on the node that ordered.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use instant_acme::{
    Account, AccountBuilder, AuthorizationStatus, ChallengeType, Identifier, NewAccount, NewOrder,
    OrderStatus, Problem, RetryPolicy,
};
use rustls::sign::CertifiedKey;

use super::challenge::{ChallengeAnswers, ValidationCertError};
use super::failure::{retry_after_in_detail, FailureLog, FailureReason};
use super::metrics::AcmeMetrics;
use super::schedule::{order_due, renew_at, renew_in_window, Backoff};
use super::seal::Sealer;
use super::shared::{
    self, AriAnswer, AriTurn, Lock, PublishedChallenges, SharedError, SharedStore, LOCK_TTL,
};
use super::store::{AcmeStore, StoreError, StoredCertificate};
use crate::cluster::redis::Redis;
use crate::config::{AcmeChallenge, AcmeConfig};
use crate::shutdown::Shutdown;
use crate::tls::CertStore;

/// The longest one order may take, from new-order to the certificate on disk.
const ORDER_TIMEOUT: Duration = Duration::from_secs(300);
/// The longest the task sleeps before looking at the clock and the certificate again.
const MAX_SLEEP: Duration = Duration::from_secs(3600);
/// Cluster mode: how soon to look again for the renewal information another node is asking
/// for (or while Redis cannot be read), in seconds.
const ARI_WAIT: i64 = 60;

/// Why ACME could not be set up at startup. Each names the setting or file to fix.
#[derive(Debug, thiserror::Error)]
pub enum AcmeSetupError {
    /// The state directory under certs-dir is unusable.
    #[error("acme: {0}")]
    Store(#[from] StoreError),
    /// `acme-directory-ca` could not be read or holds no certificate.
    #[error("acme-directory-ca {path}: {reason}")]
    DirectoryCa {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Why one order failed.
#[derive(Debug, thiserror::Error)]
enum OrderError {
    /// The CA answered with a problem, or could not be reached.
    #[error("{0}")]
    Acme(#[from] instant_acme::Error),
    /// A challenge was not validated.
    #[error("{challenge} validation of {domain} failed: {problem}")]
    Validation {
        /// The name.
        domain: String,
        /// The challenge type.
        challenge: &'static str,
        /// The CA's explanation.
        problem: Problem,
    },
    /// The CA offers no challenge callgate can answer for a name.
    #[error("the CA offers no {challenge} challenge for {domain}")]
    NoChallenge {
        /// The name.
        domain: String,
        /// The challenge type wanted.
        challenge: &'static str,
    },
    /// An authorization ended up neither pending nor valid.
    #[error("the authorization for {domain} is {status:?}")]
    Authorization {
        /// The name.
        domain: String,
        /// Its status.
        status: AuthorizationStatus,
    },
    /// The order was marked invalid without a challenge error.
    #[error("the CA marked the order invalid")]
    Invalid,
    /// The TLS-ALPN-01 certificate could not be made.
    #[error(transparent)]
    ValidationCert(#[from] ValidationCertError),
    /// Writing the account or certificate failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The cluster's shared state could not be read or written, or the lock was lost.
    #[error("cluster: {0}")]
    Shared(#[from] SharedError),
    /// The whole order took longer than [`ORDER_TIMEOUT`].
    #[error("the order did not complete within {0:?}")]
    Timeout(Duration),
}

impl OrderError {
    fn problem(&self) -> Option<&Problem> {
        match self {
            OrderError::Acme(instant_acme::Error::Api(problem)) => Some(problem),
            OrderError::Validation { problem, .. } => Some(problem),
            _ => None,
        }
    }

    fn reason(&self) -> FailureReason {
        if let Some(problem) = self.problem() {
            let parts = problem
                .subproblems
                .iter()
                .map(|s| (s.r#type.as_deref(), s.detail.as_deref()))
                .chain([(problem.r#type.as_deref(), problem.detail.as_deref())]);
            return parts
                .map(|(t, d)| FailureReason::from_problem(t.unwrap_or(""), d.unwrap_or("")))
                .find(|r| *r != FailureReason::Other)
                .unwrap_or(FailureReason::Other);
        }
        match self {
            OrderError::Acme(
                instant_acme::Error::Hyper(_)
                | instant_acme::Error::Http(_)
                | instant_acme::Error::Other(_)
                | instant_acme::Error::Timeout(_),
            )
            | OrderError::Timeout(_) => FailureReason::DirectoryUnreachable,
            OrderError::Store(_) | OrderError::Shared(_) => FailureReason::Storage,
            OrderError::Invalid => FailureReason::ChallengeUnreachable,
            OrderError::NoChallenge { .. } | OrderError::Authorization { .. } => {
                FailureReason::Refused
            }
            _ => FailureReason::Other,
        }
    }

    /// How long a rate limit asks to wait, from now.
    fn retry_after(&self, now: i64) -> Option<Duration> {
        let detail = self.problem()?.detail.as_deref()?;
        let at = retry_after_in_detail(detail)?;
        Some(Duration::from_secs(at.saturating_sub(now).max(0) as u64))
    }
}

/// A challenge type callgate can answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Challenge {
    TlsAlpn01,
    Http01,
}

impl Challenge {
    fn name(self) -> &'static str {
        match self {
            Challenge::TlsAlpn01 => "tls-alpn-01",
            Challenge::Http01 => "http-01",
        }
    }

    fn acme_type(self) -> ChallengeType {
        match self {
            Challenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
            Challenge::Http01 => ChallengeType::Http01,
        }
    }
}

/// Which listeners can receive a CA's validation.
#[derive(Debug, Clone, Copy)]
pub struct Listeners {
    /// The HTTPS listener's port (TLS-ALPN-01 is always possible there).
    pub https_port: u16,
    /// The plain-HTTP listener's port, if it is on (HTTP-01 needs it).
    pub http_port: Option<u16>,
}

/// Automatic certificates for one set of names: opened at startup, run as a task.
pub struct Acme {
    /// The settings.
    config: AcmeConfig,
    /// Account and certificate on disk.
    store: AcmeStore,
    /// Challenge answers, shared with the HTTPS and plain-HTTP listeners.
    answers: Arc<ChallengeAnswers>,
    /// The challenges to try, in order; the task moves to the next after a failed validation.
    challenges: Vec<Challenge>,
    /// Trust roots for the directory's TLS when `acme-directory-ca` is set.
    directory_roots: Option<rustls::RootCertStore>,
    /// Cluster mode: the state shared with the other nodes through Redis.
    shared: Option<Arc<SharedStore>>,
}

impl Acme {
    /// Opens the state directory and reads `acme-directory-ca`; nothing is ordered yet.
    pub fn open(config: AcmeConfig, listeners: Listeners) -> Result<Acme, AcmeSetupError> {
        let store = AcmeStore::open(&config.state_dir, &config.directory)?;
        let directory_roots = config.directory_ca.as_deref().map(read_roots).transpose()?;
        let challenges = match (config.challenge, listeners.http_port) {
            (AcmeChallenge::TlsAlpn01, _) | (AcmeChallenge::Auto, None) => {
                vec![Challenge::TlsAlpn01]
            }
            (AcmeChallenge::Http01, _) => vec![Challenge::Http01],
            // The CA validates on 443 and 80: start with the listener that is on its port.
            (AcmeChallenge::Auto, Some(80)) if listeners.https_port != 443 => {
                vec![Challenge::Http01, Challenge::TlsAlpn01]
            }
            (AcmeChallenge::Auto, Some(_)) => vec![Challenge::TlsAlpn01, Challenge::Http01],
        };
        Ok(Acme {
            config,
            store,
            answers: ChallengeAnswers::new(),
            challenges,
            directory_roots,
            shared: None,
        })
    }

    /// Cluster mode: shares the account, the certificate, the challenge answers and the right to
    /// order with the other nodes of `redis` (this node is `node`), sealing keys with `sealer`.
    pub fn share(&mut self, redis: Redis, node: &str, sealer: Sealer) {
        self.shared = Some(Arc::new(SharedStore::new(
            redis,
            node,
            &self.config.directory,
            sealer,
        )));
    }

    /// The certificate chain and key files this task writes (they may not exist yet).
    pub fn files(&self) -> (std::path::PathBuf, std::path::PathBuf) {
        (self.store.cert_path(), self.store.key_path())
    }

    /// The challenge answers the listeners must serve.
    pub fn answers(&self) -> Arc<ChallengeAnswers> {
        self.answers.clone()
    }

    /// The certificate stored by an earlier run, to serve from the start (even if due for
    /// renewal: it is still better than a self-signed one).
    pub fn stored_key(&self) -> Option<CertifiedKey> {
        let stored = self.store.certificate()?;
        (stored.not_after > unix_now()).then_some(stored.key)
    }

    /// Starts the task: it orders and renews into `certs` until `shutdown`, counting in
    /// `metrics`.
    pub fn spawn(
        self,
        certs: Arc<CertStore>,
        metrics: AcmeMetrics,
        shutdown: Shutdown,
    ) -> tokio::task::JoinHandle<()> {
        if let Some(shared) = &self.shared {
            shared::follow(
                shared.clone(),
                self.store.clone(),
                certs.clone(),
                self.answers.clone(),
                shutdown.clone(),
            );
        }
        tokio::spawn(self.run(certs, metrics, shutdown))
    }

    async fn run(self, certs: Arc<CertStore>, metrics: AcmeMetrics, mut shutdown: Shutdown) {
        let mut backoff = Backoff::new(self.config.retry_delay);
        let mut account: Option<Account> = None;
        let mut challenge = 0;
        let mut failure_log = FailureLog::default();
        let mut ari = AriState::default();
        // When the pending order first became due: the gauge stays there while orders fail, so
        // "due more than a day ago" means "failing for a day" (the alert).
        let mut overdue_since: Option<i64> = None;
        // Cluster mode: the ordering lock, while this node holds it (for one order attempt; a
        // failure hands it back with the cluster's back-off, see `shared.rs`).
        let mut held: Option<Lock> = None;
        tracing::info!(
            domains = %self.config.domains.join(","),
            directory = %self.config.directory,
            store = %self.store.dir().display(),
            "ACME: managing the certificate"
        );
        loop {
            let now = unix_now();
            let stored = self.store.certificate();
            let dates = stored.as_ref().map(StoredCertificate::dates);
            if let Some(cert) = stored.as_ref() {
                if order_due(dates, &self.config.domains, None, now) > now {
                    // A usable certificate: ask the CA's renewal information when it is time to.
                    ari.follow(cert);
                    if ari.wants_check(now) {
                        self.renewal_info(&mut ari, &mut account, cert, now).await;
                    }
                }
            }
            let due = order_due(dates, &self.config.domains, ari.due, now);
            let due = if due <= now {
                *overdue_since.get_or_insert(due)
            } else {
                overdue_since = None;
                due
            };
            metrics.next_renewal.set(due as f64);
            if due > now {
                if let (Some(shared), Some(lock)) = (&self.shared, held.take()) {
                    shared.release(&lock).await;
                }
                let wait = Duration::from_secs((due - now) as u64).min(MAX_SLEEP);
                tokio::select! {
                    _ = shutdown.recv() => return,
                    _ = tokio::time::sleep(wait) => continue,
                }
            }

            let lock = match &self.shared {
                None => None,
                Some(shared) => match shared.acquire(held.as_ref(), LOCK_TTL).await {
                    Ok(Some(lock)) => {
                        let fresh = held.as_ref() != Some(&lock);
                        held = Some(lock.clone());
                        if fresh {
                            // Another node may have stored a certificate since this one looked
                            // (loaded here, or by the follower meanwhile): look again, lock held.
                            let _ = shared.load_certificate(&self.store, &certs).await;
                            continue;
                        }
                        Some(lock)
                    }
                    Ok(None) => {
                        held = None;
                        tracing::debug!(
                            "ACME: another node is ordering, or the cluster is backing off after \
                             a failed order; waiting"
                        );
                        tokio::select! {
                            _ = shutdown.recv() => return,
                            _ = tokio::time::sleep(shared::POLL * 2) => continue,
                        }
                    }
                    Err(e) => {
                        held = None;
                        metrics.failed(FailureReason::Storage);
                        let delay = backoff.failed(None);
                        if failure_log.is_news(FailureReason::Storage) {
                            tracing::error!(
                                reason = FailureReason::Storage.label(),
                                retry_in = ?delay,
                                "ACME: cannot take the cluster's ordering lock for {}: {e}. \
                                 Still serving the current certificate.",
                                self.config.domains.join(", "),
                            );
                        }
                        tokio::select! {
                            _ = shutdown.recv() => return,
                            _ = tokio::time::sleep(delay) => continue,
                        }
                    }
                },
            };
            let kind = self.challenges[challenge % self.challenges.len()];
            let renewal = stored.is_some();
            metrics.orders.inc();
            if backoff.failures() == 0 {
                tracing::info!(
                    challenge = kind.name(),
                    renewal,
                    "ACME: ordering a certificate for {}",
                    self.config.domains.join(", ")
                );
            } else {
                tracing::debug!(
                    challenge = kind.name(),
                    failures = backoff.failures(),
                    "ACME: retrying"
                );
            }
            let attempt =
                tokio::time::timeout(ORDER_TIMEOUT, self.order(&mut account, kind, lock.as_ref()));
            let keep = async {
                match (&self.shared, &lock) {
                    (Some(shared), Some(lock)) => shared.keep(lock).await,
                    _ => std::future::pending().await,
                }
            };
            let outcome = tokio::select! {
                _ = shutdown.recv() => {
                    self.answers.clear();
                    if let (Some(shared), Some(lock)) = (&self.shared, &lock) {
                        shared.clear_challenges(lock).await;
                        shared.release(lock).await;
                    }
                    return;
                }
                outcome = attempt => outcome.unwrap_or(Err(OrderError::Timeout(ORDER_TIMEOUT))),
                lost = keep => Err(OrderError::Shared(lost)),
            };
            self.answers.clear();
            if let (Some(shared), Some(lock)) = (&self.shared, &lock) {
                shared.clear_challenges(lock).await;
            }
            match outcome {
                Ok(issued) => {
                    certs.replace(issued.key.clone());
                    if renewal {
                        metrics.issued_renewal.inc();
                    } else {
                        metrics.issued_first.inc();
                    }
                    backoff.succeeded();
                    overdue_since = None;
                    failure_log.succeeded();
                    ari = AriState::default();
                    if let (Some(shared), Some(lock)) = (&self.shared, held.take()) {
                        shared.succeeded().await;
                        shared.release(&lock).await;
                    }
                    tracing::info!(
                        names = %issued.names.join(","),
                        not_after = issued.not_after,
                        renew_at = renew_at(issued.not_before, issued.not_after),
                        "ACME: new certificate obtained and served"
                    );
                }
                Err(error) => {
                    let reason = error.reason();
                    metrics.failed(reason);
                    if reason == FailureReason::DirectoryUnreachable {
                        // Start from the directory again next time (it may have moved).
                        account = None;
                    }
                    let retry_after = error.retry_after(unix_now());
                    let delay = match (&self.shared, held.take()) {
                        (Some(shared), Some(lock)) => {
                            // The back-off is the cluster's: it doubles with every failure on
                            // any node, no node orders before it ends, and the lock goes back
                            // now, so a node that dies while backing off holds nothing.
                            if let Ok(failures @ 1..) = shared.failed(&lock).await {
                                backoff.resume(failures - 1);
                            }
                            let delay = backoff.failed(retry_after);
                            shared.back_off(&lock, delay).await;
                            delay
                        }
                        _ => backoff.failed(retry_after),
                    };
                    let message = with_causes(&error);
                    if failure_log.is_news(reason) {
                        tracing::error!(
                            reason = reason.label(),
                            challenge = kind.name(),
                            retry_in = ?delay,
                            "ACME: could not obtain a certificate for {}: {message}; {}. \
                             Still serving the current certificate.",
                            self.config.domains.join(", "),
                            reason.advice(),
                        );
                    } else {
                        tracing::debug!(
                            reason = reason.label(),
                            failures = backoff.failures(),
                            retry_in = ?delay,
                            "ACME: the same failure again: {message}"
                        );
                    }
                    // Try the other challenge type (with `auto`) when this one could not be
                    // validated or is not offered by the CA.
                    if reason == FailureReason::ChallengeUnreachable
                        || matches!(error, OrderError::NoChallenge { .. })
                    {
                        challenge += 1;
                    }
                    tokio::select! {
                        _ = shutdown.recv() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// One order, from the account to the certificate stored on disk.
    async fn order(
        &self,
        account: &mut Option<Account>,
        challenge: Challenge,
        lock: Option<&Lock>,
    ) -> Result<StoredCertificate, OrderError> {
        let account = match account {
            Some(account) => account.clone(),
            None => account.insert(self.account(lock).await?).clone(),
        };
        let shared = self.shared.as_deref().zip(lock);
        let mut published = PublishedChallenges::default();
        let identifiers: Vec<Identifier> = self
            .config
            .domains
            .iter()
            .map(|d| Identifier::Dns(d.clone()))
            .collect();
        let mut order = account.new_order(&NewOrder::new(&identifiers)).await?;
        let mut authorizations = order.authorizations();
        while let Some(authorization) = authorizations.next().await {
            let mut authorization = authorization?;
            let domain = authorization.identifier().to_string();
            match authorization.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                status => return Err(OrderError::Authorization { domain, status }),
            }
            let mut handle = authorization
                .challenge(challenge.acme_type())
                .ok_or_else(|| OrderError::NoChallenge {
                    domain: domain.clone(),
                    challenge: challenge.name(),
                })?;
            let key_authorization = handle.key_authorization();
            match challenge {
                Challenge::Http01 => {
                    let answer = key_authorization.as_str().to_owned();
                    published
                        .http01
                        .insert(handle.token.clone(), answer.clone());
                    self.answers.add_http01(handle.token.clone(), answer);
                }
                Challenge::TlsAlpn01 => {
                    let digest = key_authorization.digest();
                    published
                        .tls_alpn01
                        .insert(domain.clone(), shared::to_hex(digest.as_ref()));
                    self.answers.add_tls_alpn01(&domain, digest.as_ref())?;
                }
            }
            if let Some((shared, lock)) = shared {
                // The CA's validation may reach any node: every live node must answer first.
                let serial = (published.http01.len() + published.tls_alpn01.len()) as u32;
                let version = shared.publish_challenges(lock, &published, serial).await?;
                let missing = shared.wait_seen(&version).await;
                if !missing.is_empty() {
                    tracing::warn!(
                        nodes = %missing.join(","),
                        "ACME: these nodes do not serve the challenge answers yet; asking the CA \
                         to validate anyway"
                    );
                }
            }
            handle.set_ready().await?;
        }
        let polling = RetryPolicy::new()
            .initial_delay(Duration::from_millis(250))
            .timeout(Duration::from_secs(120));
        let status = order.poll_ready(&polling).await?;
        if status != OrderStatus::Ready {
            return Err(self.validation_error(&mut order, challenge).await);
        }
        let key_pem = order.finalize().await?;
        let chain_pem = order.poll_certificate(&polling).await?;
        if let Some((shared, lock)) = shared {
            // Shared first: a certificate this node serves is one every node can load.
            shared.save_certificate(lock, &chain_pem, &key_pem).await?;
        }
        Ok(self.store.save_certificate(&chain_pem, &key_pem)?)
    }

    /// The CA's reason for an invalid order: the first challenge error it reports.
    async fn validation_error(
        &self,
        order: &mut instant_acme::Order,
        challenge: Challenge,
    ) -> OrderError {
        let mut authorizations = order.authorizations();
        while let Some(authorization) = authorizations.next().await {
            let Ok(mut authorization) = authorization else {
                continue;
            };
            let Ok(state) = authorization.refresh().await else {
                continue;
            };
            let domain = state.identifier().to_string();
            if let Some(problem) = state.challenges.iter().find_map(|c| c.error.clone()) {
                return OrderError::Validation {
                    domain,
                    challenge: challenge.name(),
                    problem,
                };
            }
        }
        OrderError::Invalid
    }

    /// Brings `ari` up to date for `cert`. On one node: asks the CA. In a cluster: one node at
    /// a time asks and stores the answer in Redis; the others use it. With Redis unreachable
    /// nobody asks (the one-third-of-lifetime rule, or the last answer, still holds) until it
    /// answers again.
    async fn renewal_info(
        &self,
        ari: &mut AriState,
        account: &mut Option<Account>,
        cert: &StoredCertificate,
        now: i64,
    ) {
        let Some(shared) = &self.shared else {
            if account.is_none() {
                *account = self.stored_account(ari, now).await;
            }
            ari.refresh(account.as_ref(), cert, now).await;
            return;
        };
        let Some(id) = ari.cert.clone() else {
            return;
        };
        match shared.renewal_info(&id, now).await {
            Ok(AriTurn::Answer(answer)) => ari.adopt(&answer),
            Ok(AriTurn::Wait) => ari.next_check = now + ARI_WAIT,
            Ok(AriTurn::Ask) => {
                if account.is_none() {
                    *account = self.stored_account(ari, now).await;
                }
                ari.refresh(account.as_ref(), cert, now).await;
                // Shared only if the CA answered (or has no renewal information at all).
                if ari.next_check > now {
                    if let Err(e) = shared.save_renewal_info(&ari.answer(id), now).await {
                        tracing::debug!("ACME: could not share the renewal information: {e}");
                    }
                }
            }
            Err(e) => {
                tracing::debug!("ACME: cannot read the cluster's renewal information: {e}");
                ari.next_check = now + ARI_WAIT;
            }
        }
    }

    /// The stored account, for asking about renewal information; `None` (and no new account)
    /// if there is none or the CA cannot be reached now.
    async fn stored_account(&self, ari: &mut AriState, now: i64) -> Option<Account> {
        let credentials = match self.store.account().ok().flatten() {
            Some(credentials) => credentials,
            None => self.shared.as_ref()?.account().await.ok()??,
        };
        let builder = self.builder().ok()?;
        match builder.from_credentials(credentials).await {
            Ok(account) => Some(account),
            Err(e) => {
                tracing::debug!("ACME: cannot reach the directory for renewal information: {e}");
                ari.next_check = now + 3600;
                None
            }
        }
    }

    /// The stored account (the cluster's first, in cluster mode), or a new one (stored at once,
    /// for the cluster too).
    async fn account(&self, lock: Option<&Lock>) -> Result<Account, OrderError> {
        let shared = self.shared.as_deref().zip(lock);
        if let Some((shared, lock)) = shared {
            match shared.account().await? {
                Some(credentials) => {
                    let account = self.builder()?.from_credentials(credentials).await?;
                    return Ok(account);
                }
                None => {
                    // This node's own account from before the cluster, if any, becomes the
                    // cluster's.
                    if let Some(credentials) = self.store.account()? {
                        shared.save_account(lock, &credentials).await?;
                        return Ok(self.builder()?.from_credentials(credentials).await?);
                    }
                }
            }
        } else if let Some(credentials) = self.store.account()? {
            return Ok(self.builder()?.from_credentials(credentials).await?);
        }
        let contact = self.config.email.as_ref().map(|e| format!("mailto:{e}"));
        let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
        let new = NewAccount {
            contact: &contacts,
            terms_of_service_agreed: true,
            only_return_existing: false,
        };
        let (account, credentials) = self
            .builder()?
            .create(&new, self.config.directory.clone(), None)
            .await?;
        if let Some((shared, lock)) = shared {
            shared.save_account(lock, &credentials).await?;
        }
        self.store.save_account(&credentials)?;
        tracing::info!(id = account.id(), "ACME: registered a new account");
        Ok(account)
    }

    /// An HTTP client trusting `acme-directory-ca` if set, the system's roots otherwise.
    fn builder(&self) -> Result<AccountBuilder, instant_acme::Error> {
        let Some(roots) = &self.directory_roots else {
            return Account::builder();
        };
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| instant_acme::Error::Other(Box::new(e)))?
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .enable_http2()
            .build();
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build(connector);
        Ok(Account::builder_with_http(Box::new(client)))
    }
}

/// Reads every certificate of a PEM file into a root store.
fn read_roots(path: &std::path::Path) -> Result<rustls::RootCertStore, AcmeSetupError> {
    use rustls_pki_types::pem::PemObject;
    let error = |reason: String| AcmeSetupError::DirectoryCa {
        path: path.to_owned(),
        reason,
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in
        rustls_pki_types::CertificateDer::pem_file_iter(path).map_err(|e| error(e.to_string()))?
    {
        let cert = cert.map_err(|e| error(e.to_string()))?;
        roots.add(cert).map_err(|e| error(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(error(
            "no certificate found (expected PEM with \"-----BEGIN CERTIFICATE\" lines)".into(),
        ));
    }
    Ok(roots)
}

/// What the CA's renewal information (RFC 9773) said about the current certificate.
#[derive(Debug, Default)]
struct AriState {
    /// The certificate this is about (its ARI identifier); `None`: it has none.
    cert: Option<String>,
    /// When to renew, if the CA named a window.
    due: Option<i64>,
    /// When to ask again (the CA's Retry-After).
    next_check: i64,
    /// The CA has no renewal information; do not ask again.
    unsupported: bool,
}

impl AriState {
    /// Makes this about `cert`: an answer about another certificate (one this node served
    /// before the cluster's new one) no longer applies.
    fn follow(&mut self, cert: &StoredCertificate) {
        let id = cert
            .key
            .cert
            .first()
            .and_then(|leaf| instant_acme::CertificateIdentifier::try_from(leaf).ok())
            .map(|id| id.to_string());
        if id != self.cert {
            *self = AriState {
                unsupported: self.unsupported,
                cert: id,
                ..AriState::default()
            };
        }
    }

    /// Takes another node's answer about the same certificate.
    fn adopt(&mut self, answer: &AriAnswer) {
        self.due = answer.due;
        self.next_check = answer.next_check;
        self.unsupported = answer.unsupported;
    }

    /// This state as an answer to share, about certificate `cert`.
    fn answer(&self, cert: String) -> AriAnswer {
        AriAnswer {
            cert,
            due: self.due,
            next_check: self.next_check,
            unsupported: self.unsupported,
        }
    }

    /// Whether renewal information should be fetched now.
    fn wants_check(&self, now: i64) -> bool {
        !self.unsupported && now >= self.next_check
    }

    /// Asks the CA again if it is time to; failures keep the previous answer (or the
    /// one-third-of-lifetime rule) and are only logged at debug level.
    async fn refresh(&mut self, account: Option<&Account>, cert: &StoredCertificate, now: i64) {
        let Some(account) = account else { return };
        if !self.wants_check(now) {
            return;
        }
        let Some(leaf) = cert.key.cert.first() else {
            return;
        };
        let Ok(id) = instant_acme::CertificateIdentifier::try_from(leaf) else {
            self.unsupported = true;
            return;
        };
        match account.renewal_info(&id).await {
            Ok((info, retry)) => {
                let window = info.suggested_window;
                self.due = Some(renew_in_window(
                    window.start.unix_timestamp(),
                    window.end.unix_timestamp(),
                    rand::random::<f64>(),
                ));
                self.next_check = now + retry.as_secs().clamp(3600, 86_400) as i64;
            }
            Err(instant_acme::Error::Unsupported(_)) => {
                self.unsupported = true;
                // Other nodes read this answer until then (a CA may add it later).
                self.next_check = now + 86_400;
            }
            Err(e) => {
                tracing::debug!("ACME: renewal information unavailable: {e}");
                self.next_check = now + 3600;
            }
        }
    }
}

/// `error` and its sources, "outer: inner: innermost" (hyper's "client error (Connect)" alone
/// does not say that the connection was refused).
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_ca_errors_name_the_file_and_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let error = read_roots(&missing).unwrap_err().to_string();
        assert!(
            error.starts_with(&format!("acme-directory-ca {}: ", missing.display())),
            "{error}"
        );

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let error = read_roots(&empty).unwrap_err().to_string();
        assert!(error.contains("no certificate found"), "{error}");

        let two = dir.path().join("two.pem");
        let a = rcgen::generate_simple_self_signed(vec!["a.test".into()]).unwrap();
        let b = rcgen::generate_simple_self_signed(vec!["b.test".into()]).unwrap();
        std::fs::write(&two, format!("{}{}", a.cert.pem(), b.cert.pem())).unwrap();
        assert_eq!(
            read_roots(&two).unwrap().len(),
            2,
            "every certificate is trusted"
        );
    }

    #[test]
    fn the_default_client_trusts_the_system_roots_with_ring_only() {
        // Without acme-directory-ca the platform verifier is used; it must find a crypto provider
        // (ring is the only one compiled in) rather than fail at the first order.
        assert!(Account::builder().is_ok());
    }

    #[test]
    fn error_messages_include_their_causes() {
        let inner = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let outer = StoreError::Write {
            path: "/x".into(),
            source: inner,
        };
        assert_eq!(with_causes(&outer), "/x: cannot write: refused");
    }
}

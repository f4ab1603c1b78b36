//! [`Gate`]: the front layer's decisions. Every packet a listener receives goes through
//! [`Gate::inbound`] before the engine sees it, and everything the engine sends to a client goes
//! through [`Gate::outbound`].
//!
//! The gate owns the rules that the engine lacks: REST-credential checks with 401 (not 400), the
//! nonce the engine must accept, per-IP rate limits on unauthenticated requests, the peer policy
//! (403), allocation quotas (486), stripping DONT-FRAGMENT and refusing RESERVATION-TOKEN. It does
//! no I/O: it takes bytes, addresses and the time and returns what to do ([`Verdict`],
//! [`Outbound`]) — it reads no clock, holds no socket and no async primitive, so it is unit-tested,
//! fuzzed and benched without sockets. What a verdict asks for beyond sending (holding a reserved
//! port, telling the jumbo table about an allocation or a channel) is done by the listener that
//! asked (`front.rs`). It must never block: the locks it takes guard O(1) map operations.
//!
//! # Nonces
//! The engine keeps every nonce it ever hands out in a map that is only pruned when a client
//! presents an expired one, so a stream of unauthenticated requests grows it without bound. The gate
//! therefore never lets the engine challenge a client: it asks the engine for one nonce through a
//! synthetic request from [`PRIMING_ADDR`] (see [`Gate::priming_request`]), captures the answer in
//! [`Gate::outbound`], answers every 401/438 itself with that nonce, and only forwards requests that
//! carry it. The engine's map grows by one entry per rotation ([`NONCE_ROTATION`]), not per packet.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use ring::hmac;

use super::credentials::{long_term_key, RestUsername, TurnCredentials};
use super::inspect::{self, attr, method, Class, Packet, StunMessage, StunWriter};
use super::limiter::SourceLimiter;
use super::policy::{OwnAddresses, PeerFilter, PeerPolicy, PeerRefusal};
use super::quota::{AllocationKey, AllocationLedger, QuotaExceeded, Transport};
use super::relayed::RelayedPorts;
use super::settings::RelayIps;
use super::source::source_key;
use super::stats::TurnStats;

/// The source address of the synthetic request that primes the engine's nonce. Port 0 cannot be a
/// real UDP or TCP source, and packets claiming it are dropped on the way in.
pub const PRIMING_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);

/// How often a fresh engine nonce is fetched. The engine forgets nonces after an hour.
pub const NONCE_ROTATION: Duration = Duration::from_secs(30 * 60);

/// A nonce older than this is answered 438 by the gate, well before the engine would expire it
/// (and insert a new one into its map).
pub const NONCE_ACCEPTED_FOR: Duration = Duration::from_secs(50 * 60);

/// Above this many remembered keys the cache is cleared (they are re-derived on the next request).
const MAX_VERIFIED_KEYS: usize = 65_536;

/// Source keys the unauthenticated rate limiter tracks at most (about 48 bytes each).
pub const MAX_UNAUTHENTICATED_SOURCES: usize = 65_536;

/// How long an Allocate success is kept to answer the request's retransmissions: a STUN client
/// over UDP gives up on a transaction after 39.5 s (RFC 8489 §6.2.1, default timers).
const ALLOCATE_REPLAY_FOR: Duration = Duration::from_secs(40);

/// An Allocate success the engine sent over UDP, kept for [`ALLOCATE_REPLAY_FOR`].
#[derive(Debug)]
struct AllocateReply {
    /// The transaction it answered.
    transaction: [u8; 12],
    /// The response as sent.
    bytes: Vec<u8>,
    /// When it was sent.
    sent: Instant,
}

/// What the listener should do with an inbound packet.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Hand the packet to the engine unchanged.
    Forward,
    /// Hand the engine this rewritten packet instead (DONT-FRAGMENT stripped and re-signed).
    ForwardRewritten(Vec<u8>),
    /// Hand the packet (or its rewrite) to the engine after putting the port reserved under
    /// `token` in the generator's slot.
    ForwardReserved {
        /// The RESERVATION-TOKEN the request presented.
        token: [u8; 8],
        /// The request re-signed without DONT-FRAGMENT or with LIFETIME adjusted, if needed.
        rewritten: Option<Vec<u8>>,
    },
    /// Hand the ChannelBind to the engine unchanged, and remember `number` → `peer` under
    /// `transaction` until the engine answers (oversized ChannelData follows the engine's
    /// channels; see `jumbo.rs`).
    ForwardBind {
        /// The request's transaction ID, which the engine's answer carries.
        transaction: [u8; 12],
        /// CHANNEL-NUMBER.
        number: u16,
        /// The one XOR-PEER-ADDRESS.
        peer: SocketAddr,
    },
    /// Send these bytes back to the source; the engine never sees the request.
    Reply(Vec<u8>),
    /// Drop the packet silently.
    Drop(DropReason),
}

/// Why a packet was dropped without an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Not STUN or ChannelData, or a STUN class the relay does not accept from clients.
    NotTurn,
    /// The source IP sent too many unauthenticated requests.
    RateLimited,
    /// The engine's nonce is not known yet (only during start-up).
    NotPrimed,
    /// The packet claims the priming address.
    Spoofed,
    /// A Send indication the engine could read differently from the gate (see
    /// [`inspect::Ambiguity`]); indications get no answer.
    Ambiguous,
}

/// What the listener should do with a packet the engine wants to send to a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outbound {
    /// Send it.
    Send,
    /// Do not send it (it answered the gate's own priming request).
    Swallow,
    /// Do not send it: it answered the gate's priming request with the nonce the gate now uses
    /// (whoever waits for the relay to answer requests may go on).
    Primed,
    /// The engine created an allocation on `relayed`: reserve the next port under `reserve` if
    /// the response carries a RESERVATION-TOKEN, tell the jumbo table how to reach the client,
    /// then send.
    AllocatedThenSend {
        /// The relayed address the engine allocated.
        relayed: SocketAddr,
        /// The RESERVATION-TOKEN the engine put in the response, if any.
        reserve: Option<[u8; 8]>,
    },
    /// The engine answered the ChannelBind `transaction` (see [`Verdict::ForwardBind`]): tell the
    /// jumbo table whether the channel is `bound`, then send.
    ChannelBindAnswered {
        /// The ChannelBind's transaction ID.
        transaction: [u8; 12],
        /// Whether the engine bound the channel (a success response).
        bound: bool,
    },
}

/// Which RESERVATION-TOKENs are backed by a held port. The gate asks; the table that holds the
/// ports at the edge (`reservation.rs`) answers, as quinn-proto asks its `TokenLog`: a lookup,
/// never I/O.
pub trait ReservedTokens: Send + Sync {
    /// Whether `token` is backed by a held port at `now`.
    fn is_backed(&self, token: &[u8; 8], now: Instant) -> bool;
}

/// State shared by every listener and every engine instance of one relay.
pub struct GateShared {
    relay_ips: RelayIps,
    max_permissions: usize,
    realm: String,
    credentials: TurnCredentials,
    policy: PeerFilter,
    stats: Arc<TurnStats>,
    /// Per-source rate of unauthenticated requests, keyed by [`source_key`], at most
    /// [`MAX_UNAUTHENTICATED_SOURCES`] sources.
    unauthenticated: Mutex<SourceLimiter>,
    ledger: Mutex<AllocationLedger>,
    verified: Arc<VerifiedKeys>,
    /// The live relayed ports, which are own addresses the policy lets through as peers.
    relayed: Arc<RelayedPorts>,
    /// Which RESERVATION-TOKENs a held port backs.
    reserved: Arc<dyn ReservedTokens>,
    /// Error responses carrying a NONCE the engine has sent: each is one entry in its nonce map.
    engine_nonces: AtomicUsize,
    /// Recent Allocate successes over UDP, by 5-tuple: a retransmitted Allocate (its response was
    /// lost) gets the same success again (RFC 8656 §7.2) instead of the engine's 437, after which
    /// clients allocate anew and the first allocation would hold quota for its whole lifetime.
    allocate_replies: Mutex<HashMap<AllocationKey, AllocateReply>>,
}

/// Long-term keys the gate has just verified, by client address, for [`RestAuthHandler`]: the
/// engine asks its `AuthHandler` for a key by username only, and with several secrets in rotation
/// only the gate knows which one the client used.
///
/// An entry lives from the gate's check of one request to the engine's check of the same request:
/// the engine's read loop handles one request at a time per listening socket and a client always
/// reaches the same socket, and the gate verifies (and remembers) every authenticated request
/// again. So the engine takes the key out when it uses it, and idle allocations hold no entry
/// (it was 180 bytes per allocation while entries stayed).
#[derive(Debug, Default)]
pub struct VerifiedKeys {
    map: Mutex<HashMap<SocketAddr, (String, Vec<u8>)>>,
}

impl VerifiedKeys {
    fn remember(&self, src: SocketAddr, username: &str, key: Vec<u8>) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_VERIFIED_KEYS && !map.contains_key(&src) {
            map.clear();
        }
        map.insert(src, (username.to_owned(), key));
    }

    /// Takes the key verified for `src` if it was for `username`.
    fn take_for(&self, src: SocketAddr, username: &str) -> Option<Vec<u8>> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(&src) {
            Some((u, _)) if u == username => map.remove(&src).map(|(_, k)| k),
            _ => None,
        }
    }

    /// How many keys are remembered (for the bounded-memory test).
    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether no keys are remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The engine's `AuthHandler`: hands it the key the gate verified. The gate has already refused
/// (with 401) anything this would refuse, so an `Err` here only happens for requests the engine
/// processes without the gate having authenticated them — which the gate does not forward.
pub struct RestAuthHandler {
    verified: Arc<VerifiedKeys>,
}

impl turn::auth::AuthHandler for RestAuthHandler {
    fn auth_handle(
        &self,
        username: &str,
        _realm: &str,
        src_addr: SocketAddr,
    ) -> Result<Vec<u8>, turn::Error> {
        self.verified
            .take_for(src_addr, username)
            .ok_or(turn::Error::ErrNoSuchUser)
    }
}

/// Bounded-memory counters for tests and diagnostics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GateMemory {
    /// Source IPs the unauthenticated rate limiter tracks.
    pub rate_limited_ips: usize,
    /// Keys remembered for the engine's `AuthHandler`.
    pub verified_keys: usize,
    /// Allocations (pending and confirmed) in the quota ledger.
    pub ledger_entries: usize,
    /// Allocate successes kept to answer retransmissions.
    pub allocate_replies: usize,
    /// Nonces the engine has issued (each one stays in its map): one per priming, none per
    /// client request.
    pub engine_nonces: usize,
}

/// The rules a gate enforces, taken from [`TurnSettings`](super::TurnSettings).
pub struct GateRules {
    /// `realm`.
    pub realm: String,
    /// The REST secrets.
    pub credentials: TurnCredentials,
    /// Which peers may be relayed to.
    pub policy: PeerPolicy,
    /// `user-quota`.
    pub user_quota: usize,
    /// `total-quota`.
    pub total_quota: usize,
    /// `allocations-per-ip`: allocations one client address (IPv6: one /64) may hold.
    pub allocations_per_ip: usize,
    /// Unauthenticated requests per source IP per second (burst twice that).
    pub unauthenticated_per_ip_per_sec: u32,
    /// The address families relay sockets can have (RFC 6156).
    pub relay_ips: RelayIps,
    /// Distinct peer IPs one allocation may hold permissions for; beyond it CreatePermission and
    /// ChannelBind get 508.
    pub max_permissions_per_allocation: usize,
}

impl GateShared {
    /// Builds the shared state from validated rules; `relayed` is kept by the relay sockets and
    /// `reserved` by whoever holds reserved ports.
    pub fn new(
        rules: GateRules,
        stats: Arc<TurnStats>,
        relayed: Arc<RelayedPorts>,
        reserved: Arc<dyn ReservedTokens>,
    ) -> Arc<Self> {
        let rate = NonZeroU32::new(rules.unauthenticated_per_ip_per_sec).unwrap_or(NonZeroU32::MIN);
        let burst = rate.saturating_mul(NonZeroU32::new(2).unwrap_or(NonZeroU32::MIN));
        Arc::new(GateShared {
            relay_ips: rules.relay_ips,
            max_permissions: rules.max_permissions_per_allocation,
            realm: rules.realm,
            credentials: rules.credentials,
            policy: rules.policy.compile(),
            stats,
            unauthenticated: Mutex::new(SourceLimiter::new(
                rate,
                burst,
                MAX_UNAUTHENTICATED_SOURCES,
            )),
            ledger: Mutex::new(AllocationLedger::new(
                rules.user_quota,
                rules.total_quota,
                rules.allocations_per_ip,
            )),
            verified: Arc::new(VerifiedKeys::default()),
            relayed,
            reserved,
            engine_nonces: AtomicUsize::new(0),
            allocate_replies: Mutex::new(HashMap::new()),
        })
    }

    /// The `AuthHandler` to give the engine.
    pub fn auth_handler(&self) -> RestAuthHandler {
        RestAuthHandler {
            verified: Arc::clone(&self.verified),
        }
    }

    /// Periodic housekeeping: forget idle rate-limiter entries, pending allocations the engine
    /// never answered and Allocate successes too old to be retransmitted.
    pub fn maintain(&self, now: Instant) {
        let mut limiter = self.limiter();
        limiter.retain_recent(now);
        limiter.shrink_to_fit();
        drop(limiter);
        self.ledger().expire_pending(now);
        self.allocate_replies()
            .retain(|_, reply| now.duration_since(reply.sent) < ALLOCATE_REPLAY_FOR);
    }

    /// The engine closed an allocation (its `alloc_close_notify`).
    pub fn allocation_closed(&self, key: &AllocationKey) {
        self.allocate_replies().remove(key);
        if self.ledger().release(key) == Some(true) {
            TurnStats::drop_one(&self.stats.allocations_active);
        }
    }

    /// Sizes of the gate's maps.
    pub fn memory(&self) -> GateMemory {
        GateMemory {
            rate_limited_ips: self.limiter().len(),
            verified_keys: self.verified.len(),
            ledger_entries: self.ledger().total(),
            allocate_replies: self.allocate_replies().len(),
            engine_nonces: self.engine_nonces.load(Ordering::Relaxed),
        }
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, AllocationLedger> {
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn allocate_replies(&self) -> std::sync::MutexGuard<'_, HashMap<AllocationKey, AllocateReply>> {
        self.allocate_replies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The success already sent for this Allocate transaction on this 5-tuple, if recent.
    fn replay_allocate(
        &self,
        key: &AllocationKey,
        transaction: [u8; 12],
        now: Instant,
    ) -> Option<Vec<u8>> {
        let replies = self.allocate_replies();
        let reply = replies.get(key)?;
        let fresh = now.duration_since(reply.sent) < ALLOCATE_REPLAY_FOR;
        (fresh && reply.transaction == transaction).then(|| reply.bytes.clone())
    }

    /// Whether `peer` may be relayed to: the peer policy, and not the relay's own address unless
    /// it is a live relayed address.
    fn check_peer(&self, peer: SocketAddr) -> Result<(), PeerRefusal> {
        self.policy.check_peer(peer, |a| self.relayed.contains(a))
    }

    /// Gives the gate's peer filter the relay's own addresses, once the listeners are bound.
    pub fn set_own_addresses(&self, own: OwnAddresses) {
        self.policy.set_own_addresses(own);
    }

    fn limiter(&self) -> std::sync::MutexGuard<'_, SourceLimiter> {
        self.unauthenticated
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Whether an unauthenticated request from `ip` at `now` is within its source's rate (IPv6
    /// per /64); counts a refusal. The table is bounded under spoofed sources (see
    /// [`SourceLimiter`]); answers to spoofed sources are challenges no larger than the request.
    fn allow_unauthenticated(&self, ip: IpAddr, now: Instant) -> bool {
        if self.limiter().check(source_key(ip), now) {
            true
        } else {
            TurnStats::bump(&self.stats.rate_limited);
            false
        }
    }
}

#[derive(Debug, Default)]
struct NonceState {
    current: Option<(String, Instant)>,
    previous: Option<(String, Instant)>,
}

/// The gate of one engine instance (one engine `Server`; its listeners share its nonce table).
pub struct Gate {
    shared: Arc<GateShared>,
    transport: Transport,
    nonce: RwLock<NonceState>,
}

impl Gate {
    /// A gate for an engine instance serving `transport`.
    pub fn new(shared: Arc<GateShared>, transport: Transport) -> Self {
        Gate {
            shared,
            transport,
            nonce: RwLock::new(NonceState::default()),
        }
    }

    /// The transport this gate's engine serves.
    pub fn transport(&self) -> Transport {
        self.transport
    }

    /// The shared state.
    pub fn shared(&self) -> &Arc<GateShared> {
        &self.shared
    }

    /// The synthetic unauthenticated Allocate whose 401 carries the engine's next nonce.
    pub fn priming_request() -> Vec<u8> {
        let mut w = StunWriter::new(method::ALLOCATE, Class::Request, rand::random());
        w.attribute(0x0019, &[17, 0, 0, 0]);
        w.finish()
    }

    /// Whether the nonce is due for rotation at `now` (or was never fetched).
    pub fn needs_priming(&self, now: Instant) -> bool {
        let n = self.nonce.read().unwrap_or_else(|p| p.into_inner());
        n.current
            .as_ref()
            .is_none_or(|(_, at)| now.saturating_duration_since(*at) >= NONCE_ROTATION)
    }

    fn current_nonce(&self) -> Option<String> {
        let n = self.nonce.read().unwrap_or_else(|p| p.into_inner());
        n.current.as_ref().map(|(s, _)| s.clone())
    }

    fn nonce_accepted(&self, nonce: &str, now: Instant) -> bool {
        let n = self.nonce.read().unwrap_or_else(|p| p.into_inner());
        n.current
            .iter()
            .chain(n.previous.iter())
            .any(|(s, at)| s == nonce && now.saturating_duration_since(*at) < NONCE_ACCEPTED_FOR)
    }

    /// The verdict on relayed data that needs no time (ChannelData: forwarded after a length
    /// check), or `None` when [`Gate::inbound`] must see the packet with the clocks. Lets the
    /// listener read the clocks only for STUN.
    #[inline]
    pub fn inbound_data(packet: &[u8], src: SocketAddr) -> Option<Verdict> {
        match packet.first() {
            Some(0x40..=0x7f) if src.port() != 0 => Some(if inspect::inspect(packet).is_ok() {
                Verdict::Forward
            } else {
                Verdict::Drop(DropReason::NotTurn)
            }),
            _ => None,
        }
    }

    /// Whether [`Gate::outbound`] has anything to say about `packet`: `false` for relayed data
    /// (ChannelData, Data indications), which the listener sends without a look or a clock.
    /// The engine never sends an indication to [`PRIMING_ADDR`] (it holds no allocation there).
    #[inline]
    pub fn outbound_needs_look(packet: &[u8]) -> bool {
        const CLASS_BITS: u16 = 0x0110;
        const INDICATION: u16 = 0x0010;
        match packet {
            [first, second, ..] if first & 0xc0 == 0 => {
                u16::from_be_bytes([*first, *second]) & CLASS_BITS != INDICATION
            }
            _ => false,
        }
    }

    /// Decides what to do with `packet` from `src` arriving at `local`.
    pub fn inbound(
        &self,
        packet: &[u8],
        src: SocketAddr,
        local: SocketAddr,
        wall: SystemTime,
        now: Instant,
    ) -> Verdict {
        if src.port() == 0 {
            return Verdict::Drop(DropReason::Spoofed);
        }
        let msg = match inspect::inspect(packet) {
            Ok(Packet::ChannelData { .. }) => return Verdict::Forward,
            Ok(Packet::Stun(m)) => m,
            Err(_) => return Verdict::Drop(DropReason::NotTurn),
        };
        match msg.class {
            Class::Indication if msg.method == method::SEND => {
                return match msg.ambiguity() {
                    None => Verdict::Forward,
                    Some(_) => Verdict::Drop(DropReason::Ambiguous),
                };
            }
            Class::Request => {}
            _ => return Verdict::Drop(DropReason::NotTurn),
        }
        if msg.method == method::BINDING {
            return if !self.shared.allow_unauthenticated(src.ip(), now) {
                Verdict::Drop(DropReason::RateLimited)
            } else if msg.ambiguity().is_some() {
                Verdict::Reply(StunWriter::error_response(&msg, 400, "Bad Request").finish())
            } else {
                Verdict::Forward
            };
        }
        if !msg.has_integrity() {
            return self.challenge(&msg, src, now, 401, "Unauthorized");
        }
        let (Some(username), Some(realm), Some(nonce)) = (msg.username(), msg.realm(), msg.nonce())
        else {
            if !self.shared.allow_unauthenticated(src.ip(), now) {
                return Verdict::Drop(DropReason::RateLimited);
            }
            return Verdict::Reply(StunWriter::error_response(&msg, 400, "Bad Request").finish());
        };
        if !self.nonce_accepted(nonce, now) {
            return self.challenge(&msg, src, now, 438, "Stale Nonce");
        }
        let Some(key) = self.authenticate(&msg, username, realm, wall) else {
            TurnStats::bump(&self.shared.stats.auth_failures);
            return self.challenge(&msg, src, now, 401, "Unauthorized");
        };
        let hkey = inspect::integrity_key(&key);
        let user = RestUsername::parse(username, wall).map_or("", |u| u.user);
        // One reading of every request: what the engine would read differently is refused.
        if let Some(why) = msg.ambiguity() {
            TurnStats::bump(&self.shared.stats.ambiguous_requests);
            tracing::debug!(%src, user, "refusing an ambiguous request: {why}");
            return signed_error(&msg, 400, "Bad Request", &hkey);
        }
        if msg.method == method::ALLOCATE {
            let replay = self.shared.replay_allocate(
                &(self.transport, src, local),
                msg.transaction_id(),
                now,
            );
            if let Some(reply) = replay {
                tracing::debug!(%src, user, "answering a retransmitted Allocate again");
                return Verdict::Reply(reply);
            }
        }
        self.shared.verified.remember(src, username, key);

        match msg.method {
            method::ALLOCATE => {
                let key = (self.transport, src, local);
                let mut reserved_port = None;
                if let Some(token) = msg.reservation_token() {
                    // The engine never honours tokens; the front does, for the ones it backed.
                    match token.filter(|t| self.shared.reserved.is_backed(t, now)) {
                        Some(t) => reserved_port = Some(t),
                        None => return signed_error(&msg, 508, "Insufficient Capacity", &hkey),
                    }
                }
                // RFC 6156: no REQUESTED-ADDRESS-FAMILY means IPv4. Answer 440 for a family the
                // relay does not have, rather than letting the engine fail with 508.
                let wants_ipv4 = match msg.requested_family() {
                    None | Some(0x01) => true,
                    Some(0x02) => false,
                    Some(_) => {
                        return signed_error(&msg, 440, "Address Family not Supported", &hkey)
                    }
                };
                if self.shared.relay_ips.for_family(wants_ipv4).is_none() {
                    return signed_error(&msg, 440, "Address Family not Supported", &hkey);
                }
                let reserved = self.shared.ledger().reserve(key, user, now);
                if let Err(e) = reserved {
                    let counter = match e {
                        QuotaExceeded::User(_) => &self.shared.stats.quota_hits_user,
                        QuotaExceeded::Total(_) => &self.shared.stats.quota_hits_total,
                        QuotaExceeded::Source(_) => &self.shared.stats.quota_hits_ip,
                    };
                    TurnStats::bump(counter);
                    tracing::debug!(%src, user, "refusing allocation: {e}");
                    return signed_error(&msg, 486, "Allocation Quota Reached", &hkey);
                }
                let rewritten = rewrite_for_engine(&msg, &hkey);
                match (reserved_port, rewritten) {
                    (Some(token), rewritten) => Verdict::ForwardReserved { token, rewritten },
                    (None, Some(bytes)) => Verdict::ForwardRewritten(bytes),
                    (None, None) => Verdict::Forward,
                }
            }
            method::REFRESH => match rewrite_for_engine(&msg, &hkey) {
                Some(bytes) => Verdict::ForwardRewritten(bytes),
                None => Verdict::Forward,
            },
            method::CREATE_PERMISSION | method::CHANNEL_BIND => {
                // The engine grants the first XOR-PEER-ADDRESS (once per peer attribute); the
                // gate checks every one and counts every one against the cap, so nothing the
                // engine acts on went unchecked. ChannelBind names exactly one peer.
                let n = msg.peer_count();
                let bind = msg.method == method::CHANNEL_BIND;
                if n == 0 || (bind && (n != 1 || msg.channel_number().is_none())) {
                    return signed_error(&msg, 400, "Bad Request", &hkey);
                }
                let mut ips = [IpAddr::V4(Ipv4Addr::UNSPECIFIED); inspect::MAX_PEERS];
                for (i, peer) in msg.peers().enumerate() {
                    if let Err(why) = self.shared.check_peer(peer) {
                        TurnStats::bump(&self.shared.stats.refused_peers);
                        tracing::debug!(%src, %peer, user, "refusing peer: {why}");
                        return signed_error(&msg, 403, "Forbidden", &hkey);
                    }
                    ips[i] = peer.ip();
                }
                let key = (self.transport, src, local);
                let admitted = self.shared.ledger().admit_peers(
                    &key,
                    &ips[..n],
                    self.shared.max_permissions,
                    now,
                );
                if let Err(e) = admitted {
                    tracing::debug!(%src, user, "refusing permission: {e}");
                    return signed_error(&msg, 508, "Insufficient Capacity", &hkey);
                }
                match (bind, msg.channel_number(), msg.peers().next()) {
                    (true, Some(number), Some(peer)) => Verdict::ForwardBind {
                        transaction: msg.transaction_id(),
                        number,
                        peer,
                    },
                    _ => Verdict::Forward,
                }
            }
            _ => Verdict::Forward,
        }
    }

    /// Answers 401 or 438 with the realm and the engine's nonce, rate-limited per source IP.
    fn challenge(
        &self,
        msg: &StunMessage<'_>,
        src: SocketAddr,
        now: Instant,
        code: u16,
        reason: &str,
    ) -> Verdict {
        if !self.shared.allow_unauthenticated(src.ip(), now) {
            return Verdict::Drop(DropReason::RateLimited);
        }
        let Some(nonce) = self.current_nonce() else {
            return Verdict::Drop(DropReason::NotPrimed);
        };
        let mut w = StunWriter::error_response(msg, code, reason);
        w.attribute(attr::REALM, self.shared.realm.as_bytes());
        w.attribute(attr::NONCE, nonce.as_bytes());
        Verdict::Reply(w.finish())
    }

    /// Finds the secret whose key makes MESSAGE-INTEGRITY check out; `None` means 401.
    fn authenticate(
        &self,
        msg: &StunMessage<'_>,
        username: &str,
        realm: &str,
        wall: SystemTime,
    ) -> Option<Vec<u8>> {
        if realm != self.shared.realm {
            return None;
        }
        if let Err(e) = RestUsername::parse(username, wall) {
            tracing::debug!("refusing TURN request: {e}");
            return None;
        }
        self.shared
            .credentials
            .passwords(username)
            .map(|password| long_term_key(username, realm, &password))
            .find(|key| msg.integrity_matches(&inspect::integrity_key(key)))
    }

    /// Observes what the engine sends to `dst` at `now`: captures priming answers, and keeps the
    /// quota ledger and allocation counters in step with the engine's Allocate responses. See
    /// [`Gate::outbound_needs_look`] for what a listener may send without asking.
    pub fn outbound(
        &self,
        packet: &[u8],
        dst: SocketAddr,
        local: SocketAddr,
        now: Instant,
    ) -> Outbound {
        // Hot path first: relayed data (ChannelData, Data indications) needs no look.
        let Some(&first) = packet.first() else {
            return Outbound::Send;
        };
        if first & 0xc0 != 0 || packet.len() < 2 {
            return Outbound::Send;
        }
        let typ = u16::from_be_bytes([packet[0], packet[1]]);
        const ALLOCATE_SUCCESS: u16 = 0x0103;
        const ALLOCATE_ERROR: u16 = 0x0113;
        const CHANNEL_BIND_SUCCESS: u16 = 0x0109;
        const CHANNEL_BIND_ERROR: u16 = 0x0119;
        // Error responses (class bits 11) are rare; look for engine-issued nonces in them.
        let mut primed = false;
        if typ & 0x0110 == 0x0110 {
            if let Ok(m) = StunMessage::parse(packet) {
                if let Some(nonce) = m.nonce() {
                    self.shared.engine_nonces.fetch_add(1, Ordering::Relaxed);
                    if dst == PRIMING_ADDR {
                        self.rotate_nonce(nonce.to_owned(), now);
                        primed = true;
                    }
                }
            }
        }
        if dst == PRIMING_ADDR {
            return if primed {
                Outbound::Primed
            } else {
                Outbound::Swallow
            };
        }
        match typ {
            ALLOCATE_SUCCESS => {
                let key = (self.transport, dst, local);
                if self.shared.ledger().confirm(&key) {
                    TurnStats::bump(&self.shared.stats.allocations_created);
                    TurnStats::bump(&self.shared.stats.allocations_active);
                }
                // Only UDP loses responses; a reliable transport never retransmits.
                if self.transport == Transport::Udp && packet.len() >= 20 {
                    let mut transaction = [0u8; 12];
                    transaction.copy_from_slice(&packet[8..20]);
                    let reply = AllocateReply {
                        transaction,
                        bytes: packet.to_vec(),
                        sent: now,
                    };
                    self.shared.allocate_replies().insert(key, reply);
                }
                if let Some(allocated) = allocated_in(packet) {
                    return allocated;
                }
            }
            CHANNEL_BIND_SUCCESS | CHANNEL_BIND_ERROR if packet.len() >= 20 => {
                let mut transaction = [0u8; 12];
                transaction.copy_from_slice(&packet[8..20]);
                return Outbound::ChannelBindAnswered {
                    transaction,
                    bound: typ == CHANNEL_BIND_SUCCESS,
                };
            }
            ALLOCATE_ERROR => {
                // 437 (mismatch) means the 5-tuple already has a live allocation: keep it.
                let mismatch =
                    StunMessage::parse(packet).is_ok_and(|m| error_code(&m) == Some(437));
                if !mismatch
                    && self
                        .shared
                        .ledger()
                        .release(&(self.transport, dst, local))
                        .is_some()
                {
                    TurnStats::bump(&self.shared.stats.allocations_failed);
                }
            }
            _ => {}
        }
        Outbound::Send
    }

    fn rotate_nonce(&self, nonce: String, now: Instant) {
        let mut n = self.nonce.write().unwrap_or_else(|p| p.into_inner());
        n.previous = n.current.take();
        n.current = Some((nonce, now));
    }
}

/// RFC 8656 §7.2/§7.3: the lifetime granted is the requested one clamped to at most an hour, and
/// never below the 10-minute default; 0 in a Refresh deletes the allocation. Returns the value to
/// put in LIFETIME, or `None` if the request may go to the engine as it is.
///
/// The engine uses a requested lifetime only if it is *below* 3600 s (anything else becomes the
/// default), and uses short ones as they are, so the gate sends it 600..=3599.
pub fn engine_lifetime(method: u16, requested: u32) -> Option<u32> {
    const DEFAULT: u32 = 600;
    const ENGINE_MAX: u32 = 3599;
    if method == method::REFRESH && requested == 0 {
        return None;
    }
    let desired = requested.clamp(DEFAULT, ENGINE_MAX);
    (desired != requested).then_some(desired)
}

/// Re-signs an Allocate or Refresh for the engine if it carries DONT-FRAGMENT (the engine would
/// answer 420) or a LIFETIME the engine would misapply.
fn rewrite_for_engine(msg: &StunMessage<'_>, key: &hmac::Key) -> Option<Vec<u8>> {
    let lifetime = msg.lifetime().and_then(|v| engine_lifetime(msg.method, v));
    if !msg.dont_fragment && lifetime.is_none() {
        return None;
    }
    // Linux relay sockets send with DF per path-MTU discovery by default, so accepting
    // DONT-FRAGMENT (as coturn does) is truthful.
    let replace = lifetime.map(|l| (attr::LIFETIME, l.to_be_bytes()));
    Some(inspect::rewrite(msg, &[attr::DONT_FRAGMENT], replace, key))
}

/// An Allocate success: its relayed port and RESERVATION-TOKEN (if any).
fn allocated_in(packet: &[u8]) -> Option<Outbound> {
    let m = StunMessage::parse(packet).ok()?;
    let relayed =
        inspect::decode_xor_address(m.attribute(attr::XOR_RELAYED_ADDRESS)?, &m.transaction_id())?;
    let reserve = m
        .attribute(attr::RESERVATION_TOKEN)
        .and_then(|t| t.try_into().ok());
    Some(Outbound::AllocatedThenSend { relayed, reserve })
}

fn signed_error(msg: &StunMessage<'_>, code: u16, reason: &str, key: &hmac::Key) -> Verdict {
    Verdict::Reply(StunWriter::error_response(msg, code, reason).finish_with_integrity(key))
}

/// The ERROR-CODE of an error response, if any.
pub fn error_code(m: &StunMessage<'_>) -> Option<u16> {
    let raw = m.raw();
    let mut at = inspect::HEADER_LEN;
    while at + 4 <= raw.len() {
        let t = u16::from_be_bytes([raw[at], raw[at + 1]]);
        let l = usize::from(u16::from_be_bytes([raw[at + 2], raw[at + 3]]));
        if t == attr::ERROR_CODE && l >= 4 && at + 8 <= raw.len() {
            return Some(u16::from(raw[at + 6] & 0x7) * 100 + u16::from(raw[at + 7]));
        }
        at += 4 + l.next_multiple_of(4);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::turn::inspect::{encode_xor_address, integrity_key};
    use crate::turn::reservation::PortReservations;

    const REALM: &str = "callgate";

    fn shared(user_quota: usize, total: usize) -> Arc<GateShared> {
        let policy = PeerPolicy {
            allowed: vec!["127.0.0.1/32".parse().unwrap()],
            ..Default::default()
        };
        GateShared::new(
            GateRules {
                realm: REALM.into(),
                credentials: TurnCredentials::new(&["new", "old"]).unwrap(),
                policy,
                user_quota,
                total_quota: total,
                allocations_per_ip: 50,
                unauthenticated_per_ip_per_sec: 5,
                relay_ips: crate::turn::reservation::loopback(),
                max_permissions_per_allocation: 3,
            },
            Arc::new(TurnStats::default()),
            Arc::default(),
            Arc::new(PortReservations::new(
                crate::turn::reservation::loopback(),
                65535,
                0,
            )),
        )
    }

    fn primed_gate(shared: Arc<GateShared>) -> Gate {
        let gate = Gate::new(shared, Transport::Udp);
        assert!(gate.needs_priming(Instant::now()));
        let req = Gate::priming_request();
        let req = StunMessage::parse(&req).unwrap();
        let mut answer = StunWriter::error_response(&req, 401, "");
        answer.attribute(attr::NONCE, b"engine-nonce");
        let out = gate.outbound(&answer.finish(), PRIMING_ADDR, local(), Instant::now());
        assert_eq!(out, Outbound::Primed);
        assert!(!gate.needs_priming(Instant::now()));
        gate
    }

    fn local() -> SocketAddr {
        "192.0.2.100:3478".parse().unwrap()
    }

    fn client(port: u16) -> SocketAddr {
        SocketAddr::from(([198, 51, 100, 7], port))
    }

    struct Req {
        method: u16,
        username: String,
        password: String,
        nonce: &'static str,
        peers: Vec<SocketAddr>,
        dont_fragment: bool,
    }

    impl Req {
        fn new(method: u16, creds: &TurnCredentials, user: &str) -> Self {
            let c = creds.issue(user, SystemTime::now(), Duration::from_secs(600));
            Req {
                method,
                username: c.username,
                password: c.password,
                nonce: "engine-nonce",
                peers: vec![],
                dont_fragment: false,
            }
        }

        fn bytes(&self) -> Vec<u8> {
            let tid = [9u8; 12];
            let mut w = StunWriter::new(self.method, Class::Request, tid);
            w.attribute(0x0019, &[17, 0, 0, 0]);
            if self.method == method::CHANNEL_BIND {
                w.attribute(attr::CHANNEL_NUMBER, &[0x40, 0, 0, 0]);
            }
            for p in &self.peers {
                w.attribute(attr::XOR_PEER_ADDRESS, &encode_xor_address(*p, &tid));
            }
            if self.dont_fragment {
                w.attribute(attr::DONT_FRAGMENT, &[]);
            }
            w.attribute(attr::USERNAME, self.username.as_bytes());
            w.attribute(attr::REALM, REALM.as_bytes());
            w.attribute(attr::NONCE, self.nonce.as_bytes());
            let key = long_term_key(&self.username, REALM, &self.password);
            w.finish_with_integrity(&integrity_key(&key))
        }
    }

    /// An attribute nobody reads (SOFTWARE).
    const SOFTWARE_FOR_TESTS: u16 = 0x8022;

    fn reply_code(v: &Verdict) -> Option<u16> {
        match v {
            Verdict::Reply(b) => error_code(&StunMessage::parse(b).unwrap()),
            _ => None,
        }
    }

    fn inbound(gate: &Gate, bytes: &[u8], src: SocketAddr) -> Verdict {
        gate.inbound(bytes, src, local(), SystemTime::now(), Instant::now())
    }

    #[test]
    fn unauthenticated_requests_get_401_with_realm_and_engine_nonce() {
        let gate = primed_gate(shared(10, 100));
        let v = inbound(&gate, &Gate::priming_request(), client(1));
        let Verdict::Reply(b) = &v else {
            panic!("{v:?}")
        };
        let m = StunMessage::parse(b).unwrap();
        assert_eq!(error_code(&m), Some(401));
        assert_eq!(m.realm(), Some(REALM));
        assert_eq!(m.nonce(), Some("engine-nonce"));
    }

    #[test]
    fn before_priming_unauthenticated_requests_are_dropped() {
        let gate = Gate::new(shared(10, 100), Transport::Udp);
        assert_eq!(
            inbound(&gate, &Gate::priming_request(), client(1)),
            Verdict::Drop(DropReason::NotPrimed)
        );
    }

    #[test]
    fn valid_credentials_under_either_secret_are_forwarded() {
        let s = shared(10, 100);
        let gate = primed_gate(Arc::clone(&s));
        let old = TurnCredentials::new(&["old"]).unwrap();
        let req = Req::new(method::ALLOCATE, &old, "alice");
        assert_eq!(inbound(&gate, &req.bytes(), client(1)), Verdict::Forward);
        // The engine's AuthHandler gets the key the gate verified.
        let handler = s.auth_handler();
        let key = turn::auth::AuthHandler::auth_handle(&handler, &req.username, REALM, client(1));
        assert_eq!(
            key.unwrap(),
            long_term_key(&req.username, REALM, &req.password)
        );
        assert!(turn::auth::AuthHandler::auth_handle(&handler, "x", REALM, client(1)).is_err());
    }

    #[test]
    fn the_engine_takes_the_verified_key_so_idle_allocations_keep_none() {
        let s = shared(10, 100);
        let gate = primed_gate(Arc::clone(&s));
        let creds = TurnCredentials::new(&["old"]).unwrap();
        let handler = s.auth_handler();
        let req = Req::new(method::ALLOCATE, &creds, "alice");
        assert_eq!(inbound(&gate, &req.bytes(), client(1)), Verdict::Forward);
        assert_eq!(s.memory().verified_keys, 1);
        // A different user name does not take it.
        assert!(turn::auth::AuthHandler::auth_handle(&handler, "x", REALM, client(1)).is_err());
        let auth = |h: &RestAuthHandler| {
            turn::auth::AuthHandler::auth_handle(h, &req.username, REALM, client(1))
        };
        assert!(auth(&handler).is_ok());
        assert_eq!(s.memory().verified_keys, 0);
        assert!(auth(&handler).is_err(), "the key is used once");
        // The next request is verified again and its key remembered again.
        let again = Req::new(method::ALLOCATE, &creds, "alice");
        assert_eq!(inbound(&gate, &again.bytes(), client(1)), Verdict::Forward);
        assert!(
            turn::auth::AuthHandler::auth_handle(&handler, &again.username, REALM, client(1))
                .is_ok()
        );
    }

    #[test]
    fn wrong_expired_or_foreign_credentials_get_401() {
        let gate = primed_gate(shared(10, 100));
        let creds = TurnCredentials::new(&["new"]).unwrap();
        let mut wrong = Req::new(method::ALLOCATE, &creds, "a");
        wrong.password = "nope".into();
        assert_eq!(
            reply_code(&inbound(&gate, &wrong.bytes(), client(1))),
            Some(401)
        );

        let mut expired = Req::new(method::ALLOCATE, &creds, "a");
        let c = creds.issue(
            "a",
            SystemTime::now() - Duration::from_secs(7200),
            Duration::from_secs(60),
        );
        expired.username = c.username;
        expired.password = c.password;
        assert_eq!(
            reply_code(&inbound(&gate, &expired.bytes(), client(2))),
            Some(401)
        );

        let other = TurnCredentials::new(&["someone-else"]).unwrap();
        let foreign = Req::new(method::ALLOCATE, &other, "a");
        assert_eq!(
            reply_code(&inbound(&gate, &foreign.bytes(), client(3))),
            Some(401)
        );
        assert_eq!(gate.shared.stats.snapshot().auth_failures, 3);
    }

    #[test]
    fn unknown_nonce_gets_438() {
        let gate = primed_gate(shared(10, 100));
        let creds = TurnCredentials::new(&["new"]).unwrap();
        let mut req = Req::new(method::ALLOCATE, &creds, "a");
        req.nonce = "made-up";
        assert_eq!(
            reply_code(&inbound(&gate, &req.bytes(), client(1))),
            Some(438)
        );
    }

    #[test]
    fn quota_gets_486_and_frees_on_close() {
        let s = shared(2, 100);
        let gate = primed_gate(Arc::clone(&s));
        let creds = TurnCredentials::new(&["new"]).unwrap();
        let req = Req::new(method::ALLOCATE, &creds, "bob").bytes();
        for port in [1, 2] {
            assert_eq!(inbound(&gate, &req, client(port)), Verdict::Forward);
        }
        let v = inbound(&gate, &req, client(3));
        assert_eq!(reply_code(&v), Some(486));
        // The 486 is signed, so the client can trust it.
        let Verdict::Reply(b) = v else { unreachable!() };
        let m = StunMessage::parse(&b).unwrap();
        let c = Req::new(method::ALLOCATE, &creds, "bob");
        assert!(m.integrity_matches(&integrity_key(&long_term_key(
            &c.username,
            REALM,
            &c.password
        ))));
        assert_eq!(s.stats.snapshot().quota_hits_user, 1);

        // Engine confirms allocation 1, then closes it: a slot frees up.
        let success = StunWriter::new(method::ALLOCATE, Class::Success, [9; 12]).finish();
        gate.outbound(&success, client(1), local(), Instant::now());
        assert_eq!(s.stats.snapshot().allocations_active, 1);
        s.allocation_closed(&(Transport::Udp, client(1), local()));
        assert_eq!(s.stats.snapshot().allocations_active, 0);
        assert_eq!(inbound(&gate, &req, client(3)), Verdict::Forward);
        // An engine error response releases the pending slot.
        let parsed = StunMessage::parse(&req).unwrap();
        let err = StunWriter::error_response(&parsed, 508, "").finish();
        gate.outbound(&err, client(2), local(), Instant::now());
        assert_eq!(inbound(&gate, &req, client(4)), Verdict::Forward);
    }

    #[test]
    fn a_retransmitted_allocate_gets_the_same_success_not_a_second_allocation() {
        let s = shared(10, 100);
        let gate = primed_gate(Arc::clone(&s));
        let creds = TurnCredentials::new(&["new"]).unwrap();
        let req = Req::new(method::ALLOCATE, &creds, "bob").bytes();
        assert_eq!(inbound(&gate, &req, client(1)), Verdict::Forward);
        s.verified.take_for(
            client(1),
            &Req::new(method::ALLOCATE, &creds, "bob").username,
        );
        let mut success = StunWriter::new(method::ALLOCATE, Class::Success, [9; 12]);
        success.attribute(attr::LIFETIME, &600u32.to_be_bytes());
        let success = success.finish();
        gate.outbound(&success, client(1), local(), Instant::now());
        assert_eq!(s.memory().allocate_replies, 1);

        // The response was lost; the client sends the same request again.
        assert_eq!(
            inbound(&gate, &req, client(1)),
            Verdict::Reply(success.clone())
        );
        assert_eq!(s.stats.snapshot().allocations_active, 1);
        assert_eq!(
            s.memory().verified_keys,
            0,
            "the engine never sees the replay"
        );
        // Another client's identical bytes, or a new transaction, go to the engine as before.
        assert_eq!(inbound(&gate, &req, client(2)), Verdict::Forward);
        // Forty seconds on, or once the allocation is gone, nothing is replayed.
        let later = Instant::now() + ALLOCATE_REPLAY_FOR;
        let v = gate.inbound(&req, client(1), local(), SystemTime::now(), later);
        assert_ne!(v, Verdict::Reply(success.clone()));
        s.maintain(later);
        assert_eq!(s.memory().allocate_replies, 0);
        gate.outbound(&success, client(3), local(), Instant::now());
        s.allocation_closed(&(Transport::Udp, client(3), local()));
        assert_eq!(s.memory().allocate_replies, 0);
    }

    #[test]
    fn refused_peers_get_403_and_allowed_ones_pass() {
        let gate = primed_gate(shared(10, 100));
        let creds = TurnCredentials::new(&["new"]).unwrap();
        for method in [method::CREATE_PERMISSION, method::CHANNEL_BIND] {
            for peer in [
                "[::ffff:127.0.0.3]:9",
                "0.0.0.0:9",
                "169.254.169.254:80",
                "127.0.0.2:9",
                "10.0.0.1:9",
                "[::1]:9",
                "[64:ff9b::a9fe:a9fe]:80",
            ] {
                let mut req = Req::new(method, &creds, "a");
                req.peers = vec![peer.parse().unwrap()];
                if method == method::CREATE_PERMISSION {
                    // Every peer is checked, not only the first.
                    req.peers.insert(0, "8.8.8.8:1".parse().unwrap());
                }
                assert_eq!(
                    reply_code(&inbound(&gate, &req.bytes(), client(1))),
                    Some(403),
                    "{peer}"
                );
            }
            let mut ok = Req::new(method, &creds, "a");
            ok.peers = vec!["127.0.0.1:9".parse().unwrap()];
            let forwarded = match inbound(&gate, &ok.bytes(), client(1)) {
                Verdict::Forward => method == method::CREATE_PERMISSION,
                Verdict::ForwardBind { number, peer, .. } => {
                    number == 0x4000 && peer == ok.peers[0] && method == method::CHANNEL_BIND
                }
                _ => false,
            };
            assert!(forwarded);
        }
        assert_eq!(gate.shared.stats.snapshot().refused_peers, 14);
    }

    /// Appends one attribute to a finished message (after MESSAGE-INTEGRITY, if it has one).
    fn append(mut bytes: Vec<u8>, typ: u16, value: &[u8]) -> Vec<u8> {
        bytes.extend_from_slice(&typ.to_be_bytes());
        bytes.extend_from_slice(&(value.len() as u16).to_be_bytes());
        bytes.extend_from_slice(value);
        bytes.resize(bytes.len().next_multiple_of(4), 0);
        let len = (bytes.len() - inspect::HEADER_LEN) as u16;
        bytes[2..4].copy_from_slice(&len.to_be_bytes());
        bytes
    }

    /// A signed request with `extra` attributes before MESSAGE-INTEGRITY.
    fn signed_with(req: &Req, extra: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let tid = [9u8; 12];
        let mut w = StunWriter::new(req.method, Class::Request, tid);
        for (t, v) in extra {
            w.attribute(*t, v);
        }
        for p in &req.peers {
            w.attribute(attr::XOR_PEER_ADDRESS, &encode_xor_address(*p, &tid));
        }
        w.attribute(attr::USERNAME, req.username.as_bytes());
        w.attribute(attr::REALM, REALM.as_bytes());
        w.attribute(attr::NONCE, req.nonce.as_bytes());
        let key = long_term_key(&req.username, REALM, &req.password);
        w.finish_with_integrity(&integrity_key(&key))
    }

    #[test]
    fn a_peer_after_message_integrity_gets_400_not_the_engine() {
        let s = shared(10, 100);
        let gate = primed_gate(Arc::clone(&s));
        let creds = TurnCredentials::new(&["new"]).unwrap();
        let req = Req::new(method::CREATE_PERMISSION, &creds, "a");
        let bytes = req.bytes();
        // The engine would grant 10.0.0.1, which the policy refuses; the gate saw no peer.
        let after = append(
            bytes,
            attr::XOR_PEER_ADDRESS,
            &encode_xor_address("10.0.0.1:9".parse().unwrap(), &[9; 12]),
        );
        assert_eq!(reply_code(&inbound(&gate, &after, client(1))), Some(400));
        // FINGERPRINT after MESSAGE-INTEGRITY is fine, anything after FINGERPRINT is not.
        let mut ok = Req::new(method::CREATE_PERMISSION, &creds, "a");
        ok.peers = vec!["8.8.8.8:1".parse().unwrap()];
        let fp = append(ok.bytes(), attr::FINGERPRINT, &[0; 4]);
        assert_eq!(inbound(&gate, &fp, client(1)), Verdict::Forward);
        let fp_then = append(fp, SOFTWARE_FOR_TESTS, b"x");
        assert_eq!(reply_code(&inbound(&gate, &fp_then, client(1))), Some(400));
        assert_eq!(s.stats.snapshot().ambiguous_requests, 2);
    }

    #[test]
    fn peer_addresses_must_decode_strictly() {
        let gate = primed_gate(shared(10, 100));
        let creds = TurnCredentials::new(&["new"]).unwrap();
        let good = encode_xor_address("127.0.0.1:9".parse().unwrap(), &[9; 12]);
        let mut cases: Vec<Vec<u8>> = (5..8).map(|n| good[..n].to_vec()).collect();
        cases.push([&good[..], &[0]].concat()); // 9 bytes
        let mut v6_short = encode_xor_address("[2001:db8::1]:9".parse().unwrap(), &[9; 12]);
        v6_short.truncate(16);
        cases.push(v6_short);
        let mut family_in_first_byte = good.clone();
        family_in_first_byte[0] = 1; // the stun crate reads the family as a u16
        cases.push(family_in_first_byte);
        let mut family_3 = good.clone();
        family_3[1] = 3;
        cases.push(family_3);
        for method in [method::CREATE_PERMISSION, method::CHANNEL_BIND] {
            for value in &cases {
                let req = Req::new(method, &creds, "a");
                let extra = [
                    (attr::CHANNEL_NUMBER, vec![0x40, 0, 0, 0]),
                    (attr::XOR_PEER_ADDRESS, value.clone()),
                ];
                let extra = if method == method::CHANNEL_BIND {
                    &extra[..]
                } else {
                    &extra[1..]
                };
                let bytes = signed_with(&req, extra);
                assert_eq!(
                    reply_code(&inbound(&gate, &bytes, client(1))),
                    Some(400),
                    "{value:?}"
                );
            }
        }
    }

    #[test]
    fn peer_lists_must_be_present_and_channel_bind_names_one() {
        let gate = primed_gate(shared(10, 100));
        let creds = TurnCredentials::new(&["new"]).unwrap();
        let empty = Req::new(method::CREATE_PERMISSION, &creds, "a");
        assert_eq!(
            reply_code(&inbound(&gate, &empty.bytes(), client(1))),
            Some(400)
        );
        let mut two = Req::new(method::CHANNEL_BIND, &creds, "a");
        two.peers = vec!["8.8.8.8:1".parse().unwrap(), "8.8.4.4:1".parse().unwrap()];
        assert_eq!(
            reply_code(&inbound(&gate, &two.bytes(), client(1))),
            Some(400)
        );
        let mut no_number = Req::new(method::CHANNEL_BIND, &creds, "a");
        no_number.method = method::CHANNEL_BIND;
        no_number.peers = vec!["8.8.8.8:1".parse().unwrap()];
        let bytes = signed_with(
            &Req {
                method: method::CHANNEL_BIND,
                ..no_number
            },
            &[],
        );
        assert_eq!(reply_code(&inbound(&gate, &bytes, client(1))), Some(400));
    }

    #[test]
    fn duplicated_attributes_get_400() {
        let gate = primed_gate(shared(10, 100));
        let creds = TurnCredentials::new(&["new"]).unwrap();
        let udp = || (attr::REQUESTED_TRANSPORT, vec![17, 0, 0, 0]);
        let life = |s: u32| (attr::LIFETIME, s.to_be_bytes().to_vec());
        type Attributes = Vec<(u16, Vec<u8>)>;
        let cases: Vec<(u16, Attributes)> = vec![
            (
                method::ALLOCATE,
                vec![udp(), (attr::REQUESTED_TRANSPORT, vec![6, 0, 0, 0])],
            ),
            (method::ALLOCATE, vec![udp(), life(600), life(3000)]),
            (method::REFRESH, vec![life(0), life(600)]),
            (
                method::ALLOCATE,
                vec![
                    udp(),
                    (attr::DONT_FRAGMENT, vec![]),
                    (attr::DONT_FRAGMENT, vec![]),
                ],
            ),
            (
                method::ALLOCATE,
                vec![
                    udp(),
                    (attr::REQUESTED_ADDRESS_FAMILY, vec![1, 0, 0, 0]),
                    (attr::REQUESTED_ADDRESS_FAMILY, vec![2, 0, 0, 0]),
                ],
            ),
            // Lengths the engine would ignore (LIFETIME of 3 bytes reads as no LIFETIME).
            (method::REFRESH, vec![(attr::LIFETIME, vec![0, 0, 0])]),
            (
                method::ALLOCATE,
                vec![udp(), (attr::REQUESTED_ADDRESS_FAMILY, vec![2])],
            ),
            (
                method::ALLOCATE,
                vec![udp(), (attr::EVEN_PORT, vec![0x80, 0])],
            ),
        ];
        for (method, extra) in cases {
            let req = Req::new(method, &creds, "a");
            let bytes = signed_with(&req, &extra);
            assert_eq!(
                reply_code(&inbound(&gate, &bytes, client(1))),
                Some(400),
                "{extra:?}"
            );
        }
        // Two USERNAMEs: the real one first (a wrong first one is simply a 401).
        let req = Req::new(method::REFRESH, &creds, "a");
        let mut w = StunWriter::new(method::REFRESH, Class::Request, [9; 12]);
        w.attribute(attr::USERNAME, req.username.as_bytes());
        w.attribute(attr::USERNAME, b"someone-else");
        w.attribute(attr::REALM, REALM.as_bytes());
        w.attribute(attr::NONCE, req.nonce.as_bytes());
        let key = long_term_key(&req.username, REALM, &req.password);
        let bytes = w.finish_with_integrity(&integrity_key(&key));
        assert_eq!(reply_code(&inbound(&gate, &bytes, client(1))), Some(400));
    }

    #[test]
    fn ambiguous_send_indications_are_dropped() {
        let gate = primed_gate(shared(10, 100));
        let tid = [3u8; 12];
        let peer = encode_xor_address("8.8.8.8:1".parse().unwrap(), &tid);
        let mut w = StunWriter::new(method::SEND, Class::Indication, tid);
        w.attribute(attr::XOR_PEER_ADDRESS, &peer);
        w.attribute(attr::DATA, b"hi");
        let ok = w.finish();
        assert_eq!(inbound(&gate, &ok, client(1)), Verdict::Forward);
        let twice = append(ok, attr::DATA, b"other");
        assert_eq!(
            inbound(&gate, &twice, client(1)),
            Verdict::Drop(DropReason::Ambiguous)
        );
    }

    #[test]
    fn dont_fragment_is_stripped_and_resigned() {
        let gate = primed_gate(shared(10, 100));
        let creds = TurnCredentials::new(&["new"]).unwrap();
        let mut req = Req::new(method::ALLOCATE, &creds, "a");
        req.dont_fragment = true;
        let Verdict::ForwardRewritten(b) = inbound(&gate, &req.bytes(), client(1)) else {
            panic!("not rewritten")
        };
        let m = StunMessage::parse(&b).unwrap();
        assert!(!m.dont_fragment);
        let key = long_term_key(&req.username, REALM, &req.password);
        assert!(m.integrity_matches(&integrity_key(&key)));
    }

    #[test]
    fn unauthenticated_floods_are_rate_limited_per_ip() {
        let s = shared(10, 100);
        let gate = primed_gate(Arc::clone(&s));
        let req = Gate::priming_request();
        let answered = (0..100)
            .filter(|_| matches!(inbound(&gate, &req, client(5)), Verdict::Reply(_)))
            .count();
        assert_eq!(answered, 10, "burst of 2 x 5/s");
        // Another IP is unaffected.
        let other = SocketAddr::from(([203, 0, 113, 1], 5));
        assert!(matches!(inbound(&gate, &req, other), Verdict::Reply(_)));
        assert_eq!(s.stats.snapshot().rate_limited, 90);
        assert_eq!(s.memory().rate_limited_ips, 2);
    }

    /// The limiter runs on the time the gate is given, not on a clock of its own.
    #[test]
    fn the_unauthenticated_rate_refills_with_the_time_passed_in() {
        let s = shared(10, 100);
        let gate = primed_gate(Arc::clone(&s));
        let req = Gate::priming_request();
        let t0 = Instant::now();
        let at = |t: Instant| gate.inbound(&req, client(5), local(), SystemTime::now(), t);
        let answered = (0..20)
            .filter(|_| matches!(at(t0), Verdict::Reply(_)))
            .count();
        assert_eq!(answered, 10, "burst of 2 x 5/s");
        let soon = t0 + Duration::from_millis(199);
        assert_eq!(at(soon), Verdict::Drop(DropReason::RateLimited));
        let refilled = t0 + Duration::from_millis(200);
        assert!(matches!(at(refilled), Verdict::Reply(_)), "one per 200 ms");
        s.maintain(t0 + Duration::from_secs(3));
        assert_eq!(s.memory().rate_limited_ips, 0, "idle sources forgotten");
    }

    #[test]
    fn unauthenticated_limiter_stays_bounded_under_spoofed_sources() {
        let s = shared(10, 100);
        let gate = primed_gate(Arc::clone(&s));
        let req = Gate::priming_request();
        let mut most = 0;
        for i in 0..(MAX_UNAUTHENTICATED_SOURCES as u32 * 3) {
            let spoofed = SocketAddr::from((std::net::Ipv4Addr::from(0x0a00_0000 + i), 5));
            assert!(matches!(inbound(&gate, &req, spoofed), Verdict::Reply(_)));
            most = most.max(s.memory().rate_limited_ips);
        }
        assert!(most <= MAX_UNAUTHENTICATED_SOURCES, "{most}");
        // A real client keeps its rate after the sheds.
        let answered = (0..100)
            .filter(|_| matches!(inbound(&gate, &req, client(5)), Verdict::Reply(_)))
            .count();
        assert_eq!(answered, 10);
    }

    #[test]
    fn unauthenticated_ipv6_sources_are_limited_per_64() {
        let s = shared(10, 100);
        let gate = primed_gate(Arc::clone(&s));
        let req = Gate::priming_request();
        // A fresh address in the same /64 for every request.
        let answered = (0..100u16)
            .filter(|i| {
                let src = SocketAddr::new(
                    std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 7, *i, 1, 2, 3).into(),
                    5,
                );
                matches!(inbound(&gate, &req, src), Verdict::Reply(_))
            })
            .count();
        assert_eq!(answered, 10, "burst of 2 x 5/s for the whole /64");
        assert_eq!(s.memory().rate_limited_ips, 1);
    }

    #[test]
    fn allocations_per_source_address_get_486() {
        let s = shared(1000, 1000);
        let gate = primed_gate(Arc::clone(&s));
        let creds = TurnCredentials::new(&["new"]).unwrap();
        // 50 per address in `shared`; every allocation under a fresh user (anonymous clients).
        for port in 1..=50 {
            let req = Req::new(method::ALLOCATE, &creds, &format!("u{port}"));
            assert_eq!(inbound(&gate, &req.bytes(), client(port)), Verdict::Forward);
        }
        let req = Req::new(method::ALLOCATE, &creds, "u51");
        assert_eq!(
            reply_code(&inbound(&gate, &req.bytes(), client(51))),
            Some(486)
        );
        assert_eq!(s.stats.snapshot().quota_hits_ip, 1);
        let elsewhere = SocketAddr::from(([203, 0, 113, 9], 1));
        assert_eq!(inbound(&gate, &req.bytes(), elsewhere), Verdict::Forward);
    }

    #[test]
    fn permissions_per_allocation_are_capped_with_508() {
        let gate = primed_gate(shared(10, 100));
        let creds = TurnCredentials::new(&["new"]).unwrap();
        let alloc = Req::new(method::ALLOCATE, &creds, "a");
        assert_eq!(inbound(&gate, &alloc.bytes(), client(1)), Verdict::Forward);
        let success = StunWriter::new(method::ALLOCATE, Class::Success, [9; 12]).finish();
        gate.outbound(&success, client(1), local(), Instant::now());
        let mut perm = Req::new(method::CREATE_PERMISSION, &creds, "a");
        perm.peers = ["8.8.8.1:1", "8.8.8.2:1", "8.8.8.3:1"]
            .iter()
            .map(|p| p.parse().unwrap())
            .collect();
        assert_eq!(inbound(&gate, &perm.bytes(), client(1)), Verdict::Forward);
        perm.peers = vec!["8.8.8.1:2".parse().unwrap()];
        assert_eq!(
            inbound(&gate, &perm.bytes(), client(1)),
            Verdict::Forward,
            "same IP"
        );
        let mut bind = Req::new(method::CHANNEL_BIND, &creds, "a");
        bind.peers = vec!["8.8.8.4:1".parse().unwrap()];
        assert_eq!(
            reply_code(&inbound(&gate, &bind.bytes(), client(1))),
            Some(508)
        );
        // Closing the allocation forgets its permissions with it.
        gate.shared()
            .allocation_closed(&(Transport::Udp, client(1), local()));
        assert_eq!(gate.shared().memory().ledger_entries, 0);
    }

    #[test]
    fn other_address_family_gets_440() {
        let gate = primed_gate(shared(10, 100));
        let creds = TurnCredentials::new(&["new"]).unwrap();
        let req = Req::new(method::ALLOCATE, &creds, "a");
        let parsed_bytes = req.bytes();
        let parsed = StunMessage::parse(&parsed_bytes).unwrap();
        let key = integrity_key(&long_term_key(&req.username, REALM, &req.password));
        let v6 = inspect::rewrite(
            &parsed,
            &[],
            Some((attr::REQUESTED_ADDRESS_FAMILY, [2, 0, 0, 0])),
            &key,
        );
        assert_eq!(reply_code(&inbound(&gate, &v6, client(1))), Some(440));
        let v4 = inspect::rewrite(
            &parsed,
            &[],
            Some((attr::REQUESTED_ADDRESS_FAMILY, [1, 0, 0, 0])),
            &key,
        );
        assert_eq!(inbound(&gate, &v4, client(2)), Verdict::Forward);
    }

    #[test]
    fn lifetimes_are_clamped_per_rfc_8656() {
        use method::{ALLOCATE, REFRESH};
        assert_eq!(engine_lifetime(ALLOCATE, 600), None);
        assert_eq!(engine_lifetime(ALLOCATE, 1800), None);
        assert_eq!(engine_lifetime(ALLOCATE, 3599), None);
        assert_eq!(engine_lifetime(ALLOCATE, 3600), Some(3599));
        assert_eq!(engine_lifetime(ALLOCATE, u32::MAX), Some(3599));
        assert_eq!(engine_lifetime(ALLOCATE, 60), Some(600));
        assert_eq!(engine_lifetime(ALLOCATE, 0), Some(600));
        assert_eq!(engine_lifetime(REFRESH, 0), None, "0 deletes");
        assert_eq!(engine_lifetime(REFRESH, 1), Some(600));
        assert_eq!(engine_lifetime(REFRESH, 86_400), Some(3599));
    }

    #[test]
    fn short_lifetime_is_rewritten_and_resigned() {
        let gate = primed_gate(shared(10, 100));
        let creds = TurnCredentials::new(&["new"]).unwrap();
        let req = Req::new(method::REFRESH, &creds, "a");
        let mut bytes = req.bytes();
        // Rebuild with LIFETIME 30 s before integrity.
        let parsed = StunMessage::parse(&bytes).unwrap();
        let key = integrity_key(&long_term_key(&req.username, REALM, &req.password));
        bytes = inspect::rewrite(
            &parsed,
            &[],
            Some((attr::LIFETIME, 30u32.to_be_bytes())),
            &key,
        );
        let Verdict::ForwardRewritten(b) = inbound(&gate, &bytes, client(1)) else {
            panic!("not rewritten")
        };
        let m = StunMessage::parse(&b).unwrap();
        assert_eq!(m.attribute(attr::LIFETIME), Some(&600u32.to_be_bytes()[..]));
        assert!(m.integrity_matches(&key));
    }

    #[test]
    fn channel_data_fast_path_checks_length_only() {
        let gate = Gate::new(shared(10, 100), Transport::Udp);
        assert_eq!(
            Gate::inbound_data(&[0x40, 1, 0, 2, 9, 9], client(1)),
            Some(Verdict::Forward)
        );
        assert_eq!(
            Gate::inbound_data(&[0x40, 1, 0, 9, 9], client(1)),
            Some(Verdict::Drop(DropReason::NotTurn))
        );
        let spoofed = [0x40, 1, 0, 0];
        assert_eq!(Gate::inbound_data(&spoofed, PRIMING_ADDR), None);
        assert_eq!(
            inbound(&gate, &spoofed, PRIMING_ADDR),
            Verdict::Drop(DropReason::Spoofed)
        );
        let binding = Gate::priming_request();
        assert_eq!(Gate::inbound_data(&binding, client(1)), None, "STUN");
    }

    #[test]
    fn relayed_data_goes_out_without_a_look_and_responses_with_one() {
        let indication = StunWriter::new(method::DATA, Class::Indication, [1; 12]).finish();
        assert_eq!(u16::from_be_bytes([indication[0], indication[1]]), 0x0017);
        assert!(!Gate::outbound_needs_look(&indication), "Data indication");
        assert!(!Gate::outbound_needs_look(&[0x40, 0, 0, 0]), "ChannelData");
        assert!(!Gate::outbound_needs_look(&[]));
        for class in [Class::Success, Class::Error] {
            for m in [method::ALLOCATE, method::CHANNEL_BIND, method::REFRESH] {
                let response = StunWriter::new(m, class, [1; 12]).finish();
                assert!(Gate::outbound_needs_look(&response), "{m:#x} {class:?}");
            }
        }
    }

    #[test]
    fn a_channel_bind_names_its_channel_for_the_jumbo_table_and_its_answer_comes_back() {
        let gate = primed_gate(shared(10, 100));
        let creds = TurnCredentials::new(&["new"]).unwrap();
        let mut bind = Req::new(method::CHANNEL_BIND, &creds, "a");
        bind.peers = vec!["8.8.8.8:5000".parse().unwrap()];
        let bytes = bind.bytes();
        let transaction: [u8; 12] = bytes[8..20].try_into().unwrap();
        assert_eq!(
            inbound(&gate, &bytes, client(1)),
            Verdict::ForwardBind {
                transaction,
                number: 0x4000,
                peer: bind.peers[0],
            }
        );
        for (class, bound) in [(Class::Success, true), (Class::Error, false)] {
            let answer = StunWriter::new(method::CHANNEL_BIND, class, transaction).finish();
            assert_eq!(
                gate.outbound(&answer, client(1), local(), Instant::now()),
                Outbound::ChannelBindAnswered { transaction, bound }
            );
        }
    }

    #[test]
    fn drops_what_is_not_a_client_request() {
        let gate = primed_gate(shared(10, 100));
        assert_eq!(
            inbound(&gate, b"GET / HTTP/1.1\r\n", client(1)),
            Verdict::Drop(DropReason::NotTurn)
        );
        let success = StunWriter::new(method::BINDING, Class::Success, [1; 12]).finish();
        assert_eq!(
            inbound(&gate, &success, client(1)),
            Verdict::Drop(DropReason::NotTurn)
        );
        assert_eq!(
            inbound(&gate, &Gate::priming_request(), PRIMING_ADDR),
            Verdict::Drop(DropReason::Spoofed)
        );
        assert_eq!(
            inbound(&gate, &[0x40, 0, 0, 0], client(1)),
            Verdict::Forward
        );
        let binding = StunWriter::new(method::BINDING, Class::Request, [1; 12]).finish();
        assert_eq!(inbound(&gate, &binding, client(1)), Verdict::Forward);
    }
}

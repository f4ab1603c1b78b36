//! The registry in Redis: which node holds each client ID, its epoch, resume token and call state,
//! shared by every node of a cluster.
//!
//! Every operation is one Lua script (sent by SHA with `EVALSHA`, loaded again on `NOSCRIPT`) that
//! reads and writes at most two IDs' hashes, so the rules the memory registry enforces under its
//! locks hold here across nodes: two offers to one idle callee, or two resumes of one ID, cannot
//! both win. The scripts live in `lua/`, one per operation, behind a shared prelude.
//!
//! Every key has a TTL: a live ID's lease is renewed by [`RedisRegistry::refresh`]; a reserved
//! one expires after its grace period; so a node that dies leaves nothing behind for longer than
//! a lease. Resume tokens are stored only as SHA-256 digests: reading Redis does not let anyone
//! take over an ID. A Redis that cannot be reached within the configured timeout yields
//! `Unavailable`, never a panic and never a wait longer than the timeout.
//!
//! This file never decides what a message means (that is the hub) and never touches a socket
//! other than through the Redis connection it is given.

use std::future::Future;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use rand::Rng as _;
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::{Script, Value};

use super::types::{
    Binding, BindingError, CallState, Claim, Freed, Location, NodeId, RegisterError, ResumeError,
    Stale, Takeover, Transition, TransitionError, Unavailable,
};
use crate::signaling::protocol::{ClientId, ResumeToken};

/// The counter every epoch is drawn from: one key, so epochs are unique cluster-wide.
const EPOCH_KEY: &str = "cg:epoch";

/// A random name for this Redis's data set, created when Redis is found empty: a node that sees it
/// change knows Redis lost everything (a restart without persistence) rather than that its IDs
/// expired, and puts its live IDs back. One key, like the counter.
const GENERATION_KEY: &str = "cg:generation";

/// Random draws before a claim gives up with [`RegisterError::NoFreeId`].
const CLAIM_DRAWS: usize = 32;

/// IDs renewed per script by [`RedisRegistry::refresh`]: small enough that one script holds Redis
/// for well under a millisecond, large enough that 100 000 IDs take a few hundred round trips.
const REFRESH_BATCH: usize = 256;

/// The registry's Redis key for an ID's hash.
pub fn id_key(id: ClientId) -> String {
    format!("cg:id:{id}")
}

/// One script per operation, each prefixed with the prelude's helpers.
struct Scripts {
    /// Takes a free ID.
    claim: Script,
    /// Moves an ID to a resuming connection.
    resume: Script,
    /// Reserves a live ID for its grace period.
    detach: Script,
    /// Frees a live ID.
    release: Script,
    /// Frees a reserved ID still at its epoch.
    expire: Script,
    /// Reads a live ID's call state.
    call_state: Script,
    /// Applies a call transition to two IDs.
    transition: Script,
    /// Reads a route to send to an ID, noting that a message is on its way.
    locate: Script,
    /// Renews a node's live IDs' leases.
    refresh: Script,
    /// Puts back a node's live IDs after Redis lost its data.
    restore: Script,
    /// Makes a transition's outcome certain (applied, or fenced off).
    resolve: Script,
    /// Writes a node's knowledge of its live IDs back after an outage.
    write_back: Script,
}

/// Compiled (hashed) once per process; Redis caches the scripts by SHA.
static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| {
    let with_prelude =
        |body: &str| Script::new(&format!("{}\n{body}", include_str!("lua/prelude.lua")));
    Scripts {
        claim: with_prelude(include_str!("lua/claim.lua")),
        resume: with_prelude(include_str!("lua/resume.lua")),
        detach: with_prelude(include_str!("lua/detach.lua")),
        release: with_prelude(include_str!("lua/release.lua")),
        expire: with_prelude(include_str!("lua/expire.lua")),
        call_state: with_prelude(include_str!("lua/call_state.lua")),
        transition: with_prelude(include_str!("lua/transition.lua")),
        locate: with_prelude(include_str!("lua/locate.lua")),
        refresh: with_prelude(include_str!("lua/refresh.lua")),
        restore: with_prelude(include_str!("lua/restore.lua")),
        resolve: with_prelude(include_str!("lua/resolve.lua")),
        write_back: with_prelude(include_str!("lua/write_back.lua")),
    }
});

/// How long before its home's last delivery record nothing may have been sent to an ID for a
/// resume after that home died to trust the record (`lua/resume.lua`): a sender reads the route
/// (stamping `in_at`) at most a route TTL (2 s, `cluster::node`) before it sends, and the
/// rest covers Redis round trips (each bounded by the 1 s timeout) and the home's inbox.
pub const QUIET_WINDOW: Duration = Duration::from_secs(5);

/// What [`RedisRegistry::refresh`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Refreshed {
    /// Leases renewed.
    pub renewed: usize,
    /// IDs Redis had lost (it restarted empty), put back live on this node.
    pub restored: usize,
    /// Bindings this node no longer holds (moved, detached, or gone): their connections are
    /// stale and should be closed so the clients resume.
    pub lost: Vec<Binding>,
}

/// What a node knows of one of its live IDs, for [`RedisRegistry::write_back`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Known {
    /// The ID and the epoch this node holds it at.
    pub binding: Binding,
    /// Its resume token's digest ([`token_digest`]), to put back if Redis lost it.
    pub token: String,
    /// Its call state as this node knows it.
    pub call: CallState,
    /// The node changed the call state while Redis was unreachable: write it.
    pub dirty: bool,
}

/// What [`RedisRegistry::write_back`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WrittenBack {
    /// IDs found held by this node: leases renewed, dirty call states written.
    pub written: usize,
    /// IDs Redis had lost, put back live on this node with their call state and token.
    pub restored: usize,
    /// Bindings this node no longer holds (moved, detached): their connections are stale.
    pub lost: Vec<Binding>,
    /// `(me, other)`: a call another node had made for `me` meanwhile was replaced by this
    /// node's; `other`'s state was reset to idle and its client should be told.
    pub displaced: Vec<(ClientId, ClientId)>,
    /// `(me, peer)`: a call this node decided for `me` during the outage whose `peer` moved to
    /// another node meanwhile and is not in it there; `me` was reset to idle, and both clients
    /// should be told.
    pub broken: Vec<(ClientId, ClientId)>,
}

/// How a transition whose answer never came turned out ([`RedisRegistry::resolve`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolved {
    /// It was applied; the ID's call state now.
    Applied(CallState),
    /// It was not, and never will be; the ID's call state now.
    NotApplied(CallState),
}

/// How the Redis registry behaves; the cluster configuration maps onto this.
#[derive(Clone, Copy, Debug)]
pub struct RegistrySettings {
    /// Decimal digits in a client ID (clamped to 6..=15, as the memory directory does).
    pub id_digits: u8,
    /// TTL of a live ID's key: the resume grace plus the refresh period, so a node that stops
    /// refreshing (it died) leaves its IDs resumable for at least a grace period, then gone.
    pub lease: Duration,
    /// Longest wait for one operation's answer before it fails with `Unavailable`.
    pub timeout: Duration,
}

/// The cluster-wide registry, kept in Redis. Cheap to clone (the connection is shared).
///
/// Generic over the connection so the node's shared, instrumented one (`cluster::redis`'s
/// `RedisConnection`) or a bare [`ConnectionManager`] both fit.
#[derive(Clone)]
pub struct RedisRegistry<C = ConnectionManager> {
    /// The shared, self-reconnecting connection.
    conn: C,
    /// Lowest ID (inclusive) for `id_digits` digits.
    id_low: u64,
    /// Highest ID (exclusive).
    id_high: u64,
    /// A live key's TTL, in milliseconds.
    lease_ms: u64,
    /// Per-operation timeout.
    timeout: Duration,
    /// The generation of Redis's data this node's IDs were made in (see [`GENERATION_KEY`]).
    generation: Arc<Mutex<Option<String>>>,
}

impl<C> RedisRegistry<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// A registry on `conn`. The connection should have its own response timeout too; this one
    /// bounds the whole operation, reconnect waits included.
    pub fn new(conn: C, settings: RegistrySettings) -> Self {
        let digits = u32::from(settings.id_digits.clamp(6, 15));
        Self {
            conn,
            id_low: 10u64.pow(digits - 1),
            id_high: 10u64.pow(digits),
            lease_ms: millis(settings.lease),
            timeout: settings.timeout,
            generation: Arc::new(Mutex::new(None)),
        }
    }

    /// A fresh random ID and token, live on `node`. Retries on collision (the script refuses a
    /// taken ID); [`RegisterError::NoFreeId`] after 32 draws.
    pub async fn claim(&self, node: &NodeId, _now: Instant) -> Result<Claim, RegisterError> {
        let token = ResumeToken::random(&mut rand::rng());
        let digest = token_digest(&token);
        for _ in 0..CLAIM_DRAWS {
            let id = ClientId::new(rand::rng().random_range(self.id_low..self.id_high));
            let mut call = SCRIPTS.claim.prepare_invoke();
            call.key(id_key(id))
                .key(EPOCH_KEY)
                .key(super::bus::held_key(id))
                .key(GENERATION_KEY)
                .arg(node.as_str())
                .arg(&digest)
                .arg(self.lease_ms)
                .arg(random_generation());
            let mut conn = self.conn.clone();
            let reply: Vec<Value> = self.run(call.invoke_async(&mut conn)).await?;
            let epoch = int(reply.first())
                .and_then(|e| u64::try_from(e).ok())
                .ok_or_else(malformed)?;
            if epoch != 0 {
                // Learnt once; later changes are for refresh to notice.
                let mut known = self.generation();
                if known.is_none() {
                    *known = text(reply.get(1)).map(str::to_owned);
                }
                return Ok(Claim {
                    binding: Binding { id, epoch },
                    token,
                });
            }
        }
        Err(RegisterError::NoFreeId)
    }

    /// Moves `target` to `node` if `token` matches and `current` is idle; frees `current`'s own
    /// ID. Checks in the memory directory's order: stale, in call, unknown (or own ID), token.
    pub async fn resume(
        &self,
        current: Binding,
        target: ClientId,
        token: &ResumeToken,
        node: &NodeId,
        _now: Instant,
    ) -> Result<Takeover, ResumeError> {
        let new_token = ResumeToken::random(&mut rand::rng());
        let mut call = SCRIPTS.resume.prepare_invoke();
        call.key(id_key(current.id))
            .key(id_key(target))
            .key(EPOCH_KEY)
            .arg(current.epoch)
            .arg(token_digest(token))
            .arg(token_digest(&new_token))
            .arg(node.as_str())
            .arg(self.lease_ms)
            .arg(millis(QUIET_WINDOW));
        let mut conn = self.conn.clone();
        let reply: Vec<Value> = self.run(call.invoke_async(&mut conn)).await?;
        match int(reply.first()) {
            Some(1) => {
                let parsed = (|| {
                    let epoch = u64::try_from(int(reply.get(1))?).ok()?;
                    let previous_node = NodeId::new(text(reply.get(2))?);
                    let was_live = text(reply.get(3))? == "1";
                    let call = call_state(text(reply.get(4))?, text(reply.get(5))?)?;
                    let previous_epoch = text(reply.get(6))?.parse().ok()?;
                    let quiet = text(reply.get(7))?;
                    let quiet_through = if quiet.is_empty() {
                        None
                    } else {
                        Some(quiet.parse().ok()?)
                    };
                    Some((
                        epoch,
                        previous_node,
                        was_live,
                        call,
                        previous_epoch,
                        quiet_through,
                    ))
                })();
                let (epoch, previous_node, was_live, call, previous_epoch, quiet_through) =
                    parsed.ok_or_else(malformed)?;
                Ok(Takeover {
                    binding: Binding { id: target, epoch },
                    token: new_token,
                    previous_node,
                    was_live,
                    previous_epoch,
                    call,
                    quiet_through,
                })
            }
            Some(-1) => Err(ResumeError::Stale(Stale)),
            Some(-2) => Err(ResumeError::InCall),
            Some(-3) => Err(ResumeError::Unknown),
            Some(-4) => Err(ResumeError::TokenMismatch),
            _ => Err(malformed().into()),
        }
    }

    /// The connection dropped: the ID stays reserved (call kept) for `grace`, then vanishes by
    /// itself unless a resume takes it.
    ///
    /// The key's TTL is `grace` plus [`reservation_margin`]: the detaching node's own timer
    /// calls [`expire`](Self::expire) at `grace`, which frees the ID *and resets its peer's call*;
    /// had the TTL fired first, `expire` would find nothing and the peer would stay in a call with
    /// a ghost. The TTL is the backstop for a node that died.
    pub async fn detach(
        &self,
        binding: Binding,
        _now: Instant,
        grace: Duration,
    ) -> Result<(), BindingError> {
        let mut call = SCRIPTS.detach.prepare_invoke();
        call.key(id_key(binding.id))
            .arg(binding.epoch)
            .arg(millis(grace + reservation_margin(grace)));
        let mut conn = self.conn.clone();
        let done: i64 = self.run(call.invoke_async(&mut conn)).await?;
        if done == 1 {
            Ok(())
        } else {
            Err(Stale.into())
        }
    }

    /// Frees the ID now (the client left). Resets the peer's call to Idle and returns it.
    pub async fn release(&self, binding: Binding) -> Result<Freed, BindingError> {
        let mut call = SCRIPTS.release.prepare_invoke();
        call.key(id_key(binding.id))
            .arg(binding.epoch)
            .arg(binding.id.get());
        let mut conn = self.conn.clone();
        let reply: Vec<Value> = self.run(call.invoke_async(&mut conn)).await?;
        freed(binding.id, &reply)?.ok_or(BindingError::Stale(Stale))
    }

    /// Frees `binding` only if it is still reserved with that epoch (a resume elsewhere wins).
    pub async fn expire(&self, binding: Binding) -> Result<Option<Freed>, Unavailable> {
        let mut call = SCRIPTS.expire.prepare_invoke();
        call.key(id_key(binding.id))
            .arg(binding.epoch)
            .arg(binding.id.get());
        let mut conn = self.conn.clone();
        let reply: Vec<Value> = self.run(call.invoke_async(&mut conn)).await?;
        freed(binding.id, &reply)
    }

    /// The call state of a live binding.
    pub async fn call_state(&self, binding: Binding) -> Result<CallState, BindingError> {
        let mut call = SCRIPTS.call_state.prepare_invoke();
        call.key(id_key(binding.id)).arg(binding.epoch);
        let mut conn = self.conn.clone();
        let reply: Vec<Value> = self.run(call.invoke_async(&mut conn)).await?;
        match int(reply.first()) {
            Some(1) => Ok(call_state(
                text(reply.get(1)).unwrap_or(""),
                text(reply.get(2)).unwrap_or(""),
            )
            .ok_or_else(malformed)?),
            Some(0) => Err(Stale.into()),
            _ => Err(malformed().into()),
        }
    }

    /// Applies one transition atomically to `binding`'s ID and `peer`; returns my new state.
    pub async fn transition(
        &self,
        binding: Binding,
        peer: ClientId,
        t: Transition,
    ) -> Result<CallState, TransitionError> {
        self.transition_op(binding, peer, t, None).await
    }

    /// [`transition`](Self::transition) as operation `op` of this node: recorded with the ID
    /// when applied, refused as outdated (`Unavailable`, logged) if an operation at least as new
    /// was applied or fenced already, so [`resolve`](Self::resolve) can tell whether it ran.
    /// Operation numbers must grow per binding.
    pub async fn transition_op(
        &self,
        binding: Binding,
        peer: ClientId,
        t: Transition,
        op: Option<u64>,
    ) -> Result<CallState, TransitionError> {
        self.run_transition(binding, peer, t, op, false).await
    }

    /// [`transition_op`](Self::transition_op) for a binding whose connection left this node
    /// while Redis could not be told (it may be reserved by now): a reconcile undoing what it
    /// started when a transition it was told had failed ran after all.
    pub async fn transition_departed(
        &self,
        binding: Binding,
        peer: ClientId,
        t: Transition,
        op: u64,
    ) -> Result<CallState, TransitionError> {
        self.run_transition(binding, peer, t, Some(op), true).await
    }

    /// Runs `lua/transition.lua`; `reserved`: a reserved binding counts too.
    async fn run_transition(
        &self,
        binding: Binding,
        peer: ClientId,
        t: Transition,
        op: Option<u64>,
        reserved: bool,
    ) -> Result<CallState, TransitionError> {
        let name = match t {
            Transition::Offer => "offer",
            Transition::Accept => "accept",
            Transition::Decline => "decline",
            Transition::Cancel => "cancel",
            Transition::Hangup => "hangup",
        };
        let mut call = SCRIPTS.transition.prepare_invoke();
        call.key(id_key(binding.id))
            .key(id_key(peer))
            .arg(binding.epoch)
            .arg(name)
            .arg(binding.id.get())
            .arg(peer.get())
            .arg(op.map_or(String::new(), |op| op.to_string()))
            .arg(if reserved { "1" } else { "" });
        let mut conn = self.conn.clone();
        let reply: Vec<Value> = self.run(call.invoke_async(&mut conn)).await?;
        let state = || {
            text(reply.get(1))
                .zip(text(reply.get(2)))
                .and_then(|(phase, peer)| call_state(phase, peer))
                .ok_or_else(|| {
                    malformed();
                    TransitionError::Unavailable
                })
        };
        match int(reply.first()) {
            Some(1) => state(),
            Some(0) => Err(TransitionError::Stale(Stale)),
            Some(2) => {
                let state = state()?;
                let peer = state.peer().ok_or(TransitionError::Unavailable)?;
                Err(TransitionError::AlreadyInCall { peer, state })
            }
            Some(3) => Err(TransitionError::UnknownPeer),
            Some(4) => Err(TransitionError::Busy),
            Some(5) => Err(TransitionError::WrongState(state()?)),
            Some(6) => {
                tracing::warn!(client = %binding.id, ?op, "redis registry: a transition was refused as outdated");
                Err(TransitionError::Unavailable)
            }
            _ => {
                malformed();
                Err(TransitionError::Unavailable)
            }
        }
    }

    /// Makes the outcome of operation `op` (a [`transition_op`](Self::transition_op) whose
    /// answer never came) certain: applied, or fenced so a late copy is refused. `None`: the
    /// binding is stale.
    pub async fn resolve(
        &self,
        binding: Binding,
        op: u64,
    ) -> Result<Option<Resolved>, Unavailable> {
        let mut call = SCRIPTS.resolve.prepare_invoke();
        call.key(id_key(binding.id)).arg(binding.epoch).arg(op);
        let mut conn = self.conn.clone();
        let reply: Vec<Value> = self.run(call.invoke_async(&mut conn)).await?;
        let state = || {
            call_state(
                text(reply.get(1)).unwrap_or(""),
                text(reply.get(2)).unwrap_or(""),
            )
            .ok_or_else(malformed)
        };
        match int(reply.first()) {
            Some(0) => Ok(None),
            Some(1) => Ok(Some(Resolved::Applied(state()?))),
            Some(2) => Ok(Some(Resolved::NotApplied(state()?))),
            _ => Err(malformed()),
        }
    }

    /// Puts what this node knows of its live IDs back into Redis (see `lua/write_back.lua`):
    /// restores missing keys with their call state and token, writes dirty call states, renews
    /// leases. Batches of 256 IDs per script, all in one pipeline. `op` must be at least every
    /// operation number this node gave out so far: late copies of older transitions are then
    /// refused.
    pub async fn write_back(
        &self,
        node: &NodeId,
        known: &[Known],
        op: u64,
    ) -> Result<WrittenBack, Unavailable> {
        let mut done = WrittenBack::default();
        if known.is_empty() {
            return Ok(done);
        }
        let mut pipe = redis::pipe();
        for batch in known.chunks(REFRESH_BATCH) {
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(SCRIPTS.write_back.get_hash()).arg(batch.len() + 1);
            for k in batch {
                cmd.arg(id_key(k.binding.id));
            }
            cmd.arg(EPOCH_KEY)
                .arg(node.as_str())
                .arg(self.lease_ms)
                .arg(op);
            for k in batch {
                let (phase, peer) = phase_and_peer(k.call);
                cmd.arg(k.binding.epoch)
                    .arg(&k.token)
                    .arg(phase)
                    .arg(peer)
                    .arg(u8::from(k.dirty));
            }
            pipe.add_command(cmd);
        }
        let replies = self.pipeline(&pipe, &SCRIPTS.write_back).await?;
        if replies.len() != known.chunks(REFRESH_BATCH).len() {
            return Err(malformed());
        }
        for (batch, reply) in known.chunks(REFRESH_BATCH).zip(&replies) {
            let reply: Vec<Value> = redis::from_redis_value_ref(reply).map_err(|_| malformed())?;
            if reply.len() != 3 * batch.len() {
                return Err(malformed());
            }
            for (k, entry) in batch.iter().zip(reply.chunks(3)) {
                match int(entry.first()) {
                    Some(2) => done.restored += 1,
                    Some(1) => done.written += 1,
                    _ => done.lost.push(k.binding),
                }
                if let Some(other) = text(entry.get(1)).and_then(parse_id) {
                    done.displaced.push((k.binding.id, other));
                }
                if let Some(peer) = text(entry.get(2)).and_then(parse_id) {
                    done.broken.push((k.binding.id, peer));
                }
            }
        }
        Ok(done)
    }

    /// Where an ID is held: one `HMGET`, no script (a single-key read is atomic by itself).
    pub async fn locate(&self, id: ClientId) -> Result<Option<Location>, Unavailable> {
        let mut conn = self.conn.clone();
        let cmd = redis::cmd("HMGET")
            .arg(id_key(id))
            .arg("node")
            .arg("epoch")
            .arg("live")
            .to_owned();
        let (node, epoch, live): (Option<String>, Option<u64>, Option<String>) =
            self.run(cmd.query_async(&mut conn)).await?;
        Ok(match (node, epoch, live) {
            (Some(node), Some(epoch), Some(live)) => Some(Location {
                node: NodeId::new(&node),
                epoch,
                live: live == "1",
            }),
            _ => None,
        })
    }

    /// Like [`locate`](Self::locate), for a node about to send to `id`: also stamps, in the ID's
    /// hash, that a message may be on its way (`in_at`, Redis's clock), which a resume after the
    /// ID's home died compares with the home's delivery record (`lua/resume.lua`). Same one round
    /// trip; the route cache calls it at most once per route TTL per ID it keeps sending to.
    pub async fn locate_to_send(&self, id: ClientId) -> Result<Option<Location>, Unavailable> {
        let mut call = SCRIPTS.locate.prepare_invoke();
        call.key(id_key(id));
        let mut conn = self.conn.clone();
        let reply: Vec<Value> = self.run(call.invoke_async(&mut conn)).await?;
        if reply.is_empty() {
            return Ok(None);
        }
        let parsed = (|| {
            let node = NodeId::new(text(reply.first())?);
            let epoch = text(reply.get(1))?.parse().ok()?;
            let live = text(reply.get(2))? == "1";
            Some(Location { node, epoch, live })
        })();
        parsed.map(Some).ok_or_else(malformed)
    }

    /// Which of `ids` some node holds (live or reserved): one `EXISTS` each, all in one
    /// pipeline, so checking every cross-node call's peer costs one round trip.
    pub async fn held(&self, ids: &[ClientId]) -> Result<Vec<bool>, Unavailable> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for &id in ids {
            pipe.cmd("EXISTS").arg(id_key(id));
        }
        let mut conn = self.conn.clone();
        let found: Vec<i64> = self.run(pipe.query_async(&mut conn)).await?;
        if found.len() != ids.len() {
            return Err(malformed());
        }
        Ok(found.into_iter().map(|n| n == 1).collect())
    }

    /// Renews the lease of this node's live IDs: batches of 256 IDs per script, all batches in
    /// one pipeline (one round trip). IDs that moved, were detached or are gone are reported in
    /// [`Refreshed::lost`]; the node's connections for them are stale.
    ///
    /// After Redis lost its data (a restart without persistence: the generation key changed or
    /// vanished) the missing IDs are put back instead, live on this node, idle and without a
    /// token (a second round trip, only then), so routing to the node's clients recovers by
    /// itself. Deviation from the design's `()` return: the node needs to know what it lost.
    pub async fn refresh(&self, node: &NodeId, live: &[Binding]) -> Result<Refreshed, Unavailable> {
        self.refresh_recording(node, live, |_| None).await
    }

    /// [`refresh`](Self::refresh), also recording for each ID its `high_water` (the highest
    /// `seq` this node numbered for it, taken now, before the round trip): should this node die,
    /// a resume elsewhere by a client that processed that much, to which nothing was sent since,
    /// reports no loss (`lua/refresh.lua`, `lua/resume.lua`).
    pub async fn refresh_recording(
        &self,
        node: &NodeId,
        live: &[Binding],
        high_water: impl Fn(Binding) -> Option<u64>,
    ) -> Result<Refreshed, Unavailable> {
        let mut refreshed = Refreshed::default();
        if live.is_empty() {
            return Ok(refreshed);
        }
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(GENERATION_KEY);
        for batch in live.chunks(REFRESH_BATCH) {
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(SCRIPTS.refresh.get_hash()).arg(batch.len());
            for binding in batch {
                cmd.arg(id_key(binding.id));
            }
            cmd.arg(node.as_str()).arg(self.lease_ms);
            for &binding in batch {
                cmd.arg(binding.epoch);
                match high_water(binding) {
                    Some(seq) => cmd.arg(seq),
                    None => cmd.arg(""),
                };
            }
            pipe.add_command(cmd);
        }
        let replies = self.pipeline(&pipe, &SCRIPTS.refresh).await?;
        let (current, codes) = replies.split_first().ok_or_else(malformed)?;
        let current: Option<String> =
            redis::from_redis_value_ref(current).map_err(|_| malformed())?;
        let mut missing = Vec::new();
        for (batch, codes) in live.chunks(REFRESH_BATCH).zip(codes) {
            let codes: Vec<i64> = redis::from_redis_value_ref(codes).map_err(|_| malformed())?;
            if codes.len() != batch.len() {
                return Err(malformed());
            }
            for (binding, code) in batch.iter().zip(codes) {
                match code {
                    1 => refreshed.renewed += 1,
                    0 => missing.push(*binding),
                    _ => refreshed.lost.push(*binding),
                }
            }
        }
        let reset = {
            let mut known = self.generation();
            match (&current, known.as_ref()) {
                (None, _) => true,
                (Some(now), Some(before)) => now != before,
                (Some(now), None) => {
                    *known = Some(now.clone());
                    false
                }
            }
        };
        if !reset || missing.is_empty() {
            refreshed.lost.extend(missing);
            return Ok(refreshed);
        }
        let generation = random_generation();
        let mut pipe = redis::pipe();
        for batch in missing.chunks(REFRESH_BATCH) {
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(SCRIPTS.restore.get_hash()).arg(batch.len() + 2);
            for binding in batch {
                cmd.arg(id_key(binding.id));
            }
            cmd.arg(EPOCH_KEY)
                .arg(GENERATION_KEY)
                .arg(node.as_str())
                .arg(self.lease_ms)
                .arg(&generation);
            for binding in batch {
                cmd.arg(binding.epoch);
            }
            pipe.add_command(cmd);
        }
        let replies = self.pipeline(&pipe, &SCRIPTS.restore).await?;
        let mut now_known = None;
        for (batch, reply) in missing.chunks(REFRESH_BATCH).zip(&replies) {
            let reply: Vec<Value> = redis::from_redis_value_ref(reply).map_err(|_| malformed())?;
            let (generation, codes) = reply.split_first().ok_or_else(malformed)?;
            now_known = Some(text(Some(generation)).ok_or_else(malformed)?.to_owned());
            for (binding, code) in batch.iter().zip(codes) {
                if int(Some(code)) == Some(1) {
                    refreshed.restored += 1;
                } else {
                    refreshed.lost.push(*binding);
                }
            }
        }
        *self.generation() = now_known;
        if refreshed.restored > 0 {
            tracing::warn!(
                restored = refreshed.restored,
                "redis registry: Redis had lost this node's live IDs (restarted without persistence?); put them back, idle and not resumable"
            );
        }
        Ok(refreshed)
    }

    /// The generation this node knows; a panic elsewhere while holding it leaves a valid value.
    fn generation(&self) -> MutexGuard<'_, Option<String>> {
        self.generation
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends a pipeline of `EVALSHA`s of `script` (and plain commands); on `NOSCRIPT` (Redis
    /// restarted and forgot its scripts) loads the script once and sends the pipeline again.
    async fn pipeline(
        &self,
        pipe: &redis::Pipeline,
        script: &Script,
    ) -> Result<Vec<Value>, Unavailable> {
        let mut conn = self.conn.clone();
        let first: redis::RedisResult<Vec<Value>> =
            match tokio::time::timeout(self.timeout, pipe.query_async(&mut conn)).await {
                Ok(result) => result,
                Err(_) => return Err(self.fail("timed out")),
            };
        match first {
            Ok(replies) => Ok(replies),
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                self.run(script.load_async(&mut conn)).await?;
                self.run(pipe.query_async(&mut conn)).await
            }
            Err(e) => Err(self.fail(&e.to_string())),
        }
    }

    /// Runs one Redis future within the timeout; any error or a timeout is `Unavailable`.
    async fn run<T>(
        &self,
        op: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, Unavailable> {
        match tokio::time::timeout(self.timeout, op).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(self.fail(&e.to_string())),
            Err(_) => Err(self.fail("timed out")),
        }
    }

    /// Notes a failed operation. Debug level only: during an outage every operation fails, and
    /// the connection's owner (`cluster::redis`) logs the outage once and counts it.
    fn fail(&self, why: &str) -> Unavailable {
        tracing::debug!(why, timeout = ?self.timeout, "redis registry operation failed");
        Unavailable
    }
}

/// The form a resume token is stored in: hex SHA-256 of its wire form. A digest, so a copy of
/// Redis's data does not let anyone resume an ID; compared in Lua with `==`, which leaks at most
/// how much of a digest matched — useless for finding a token.
pub fn token_digest(token: &ResumeToken) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.to_string().as_bytes());
    let mut hex = String::with_capacity(64);
    for byte in digest.as_ref() {
        hex.push_str(&format!("{byte:02x}"));
    }
    hex
}

/// How long a reservation's key outlives its grace period, so the holding node's expiry (late by
/// a busy scheduler or a slow Redis) finds it: half the grace, at least one second.
pub fn reservation_margin(grace: Duration) -> Duration {
    (grace / 2).max(Duration::from_secs(1))
}

/// A fresh generation name: 64 random bits in hex.
fn random_generation() -> String {
    format!("{:016x}", rand::rng().random::<u64>())
}

/// A duration in whole milliseconds, at least 1 (Redis refuses `PEXPIRE key 0` as "expire now").
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// Reads `{1, peer or ''}` (freed) or `{0}` (nothing freed).
fn freed(id: ClientId, reply: &[Value]) -> Result<Option<Freed>, Unavailable> {
    match int(reply.first()) {
        Some(1) => {
            let peer = match text(reply.get(1)).ok_or_else(malformed)? {
                "" => None,
                peer => Some(parse_id(peer).ok_or_else(malformed)?),
            };
            Ok(Some(Freed { id, peer }))
        }
        Some(0) => Ok(None),
        _ => Err(malformed()),
    }
}

/// A call state from the hash's `phase` and `peer` fields.
fn call_state(phase: &str, peer: &str) -> Option<CallState> {
    if phase == "idle" {
        return Some(CallState::Idle);
    }
    let peer = parse_id(peer)?;
    match phase {
        "calling" => Some(CallState::Calling { peer }),
        "called" => Some(CallState::Called { peer }),
        "incall" => Some(CallState::InCall { peer }),
        _ => None,
    }
}

/// A call state as the hash's `phase` and `peer` fields.
fn phase_and_peer(state: CallState) -> (&'static str, String) {
    match state {
        CallState::Idle => ("idle", String::new()),
        CallState::Calling { peer } => ("calling", peer.to_string()),
        CallState::Called { peer } => ("called", peer.to_string()),
        CallState::InCall { peer } => ("incall", peer.to_string()),
    }
}

/// A decimal ID as the scripts write it.
fn parse_id(text: &str) -> Option<ClientId> {
    text.parse().ok().map(ClientId::new)
}

/// An integer element of a script's reply.
fn int(value: Option<&Value>) -> Option<i64> {
    match value? {
        Value::Int(n) => Some(*n),
        _ => None,
    }
}

/// A string element of a script's reply.
fn text(value: Option<&Value>) -> Option<&str> {
    match value? {
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok(),
        Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

/// A reply that does not have the shape the script returns: a different script version runs
/// under the same SHA (impossible) or the server is not Redis. Logged, treated as unavailable.
fn malformed() -> Unavailable {
    tracing::warn!("redis registry: a script answered in an unexpected shape");
    Unavailable
}

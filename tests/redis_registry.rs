//! The Redis registry and bus (issue 13) against a real `redis-server` started per test on a free
//! loopback port: every operation and refusal, races between nodes, TTLs, a Redis outage and its
//! end, and the node inbox resubscribing after a Redis restart. Without redis-server the tests
//! print why and pass — except under `CI=true`, where a missing server fails them.

#[path = "support/redis.rs"]
mod redis_support;

use std::future::Future;
use std::time::{Duration, Instant};

use bytes::Bytes;
use callgate::cluster::bus::{
    node_channel, BusEvent, BusKind, BusMessage, BusSettings, Hold, RedisBus,
};
use callgate::cluster::nodes::{BusReaders, NodeInfo, BUS_READS};
use callgate::cluster::publish::Publisher;
use callgate::cluster::registry::{Known, RedisRegistry, Refreshed, RegistrySettings, Resolved};
use callgate::cluster::route::{BusDelivery, RouteSettings, Routes};
use callgate::cluster::types::{
    Binding, BindingError, CallState, NodeId, RegisterError, ResumeError, Stale, Transition,
    TransitionError, Unavailable,
};
use callgate::signaling::delivery::{Envelope, Origin};
use callgate::signaling::protocol::{ClientId, DropReason, MessageKind, ResumeToken, ServerKind};
use redis::aio::ConnectionManager;
use redis::AsyncCommands as _;
use redis_support::RedisServer;

/// The only keys without a TTL: one each, whatever the load (the epoch counter and the name of
/// Redis's data set).
const SINGLETONS: [&str; 2] = ["cg:epoch", "cg:generation"];

/// Per-operation timeout in these tests: what "Unavailable quickly" is measured against.
const TIMEOUT: Duration = Duration::from_millis(500);

/// Scheduling slack on top of [`TIMEOUT`] on a loaded test machine.
const SLACK: Duration = Duration::from_millis(700);

/// A running Redis with a registry and a bus on it, plus a raw connection for assertions.
struct Setup {
    /// The server (stopped when dropped).
    redis: RedisServer,
    /// Opens subscriptions.
    client: redis::Client,
    /// Raw commands for assertions.
    raw: ConnectionManager,
    /// The registry under test.
    registry: RedisRegistry,
    /// The bus under test.
    bus: RedisBus,
    /// Which nodes the bus batches to (none until a test says).
    readers: BusReaders,
}

/// Node names used in the tests.
fn node(name: &str) -> NodeId {
    NodeId::new(name)
}

/// A connection manager that fails fast (the registry's own timeout bounds each operation too).
async fn manager(client: &redis::Client) -> ConnectionManager {
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(TIMEOUT))
        .set_response_timeout(Some(TIMEOUT))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(100));
    client
        .get_connection_manager_with_config(config)
        .await
        .expect("connects to the test's redis-server")
}

/// Starts Redis and builds a registry with `lease` and a bus holding at most 4 messages / 1 KiB
/// per ID for `grace`. `None`: redis-server is missing (outside CI) and the test passes.
async fn setup_with(lease: Duration, grace: Duration) -> Option<Setup> {
    let redis = RedisServer::start()?;
    let url = redis.url();
    Some(setup_on(redis, &url, lease, grace).await)
}

/// A registry and a bus on a running `redis`, connecting with `url`.
async fn setup_on(redis: RedisServer, url: &str, lease: Duration, grace: Duration) -> Setup {
    let client = redis::Client::open(url).expect("a valid URL");
    let raw = manager(&client).await;
    let registry = RedisRegistry::new(
        manager(&client).await,
        RegistrySettings {
            id_digits: 9,
            lease,
            timeout: TIMEOUT,
        },
    );
    let readers = BusReaders::default();
    let bus = RedisBus::with_readers(
        client.clone(),
        manager(&client).await,
        BusSettings {
            held_messages: 4,
            held_bytes: 1024,
            held_bytes_total: 1 << 20,
            grace,
            timeout: TIMEOUT,
        },
        readers.clone(),
    );
    Setup {
        redis,
        client,
        raw,
        registry,
        bus,
        readers,
    }
}

/// The usual setup: leases and grace long enough that nothing expires during a test.
async fn setup() -> Option<Setup> {
    setup_with(Duration::from_secs(60), Duration::from_secs(30)).await
}

impl Setup {
    /// Claims a new live ID on `n`.
    async fn claim(&self, n: &str) -> (Binding, ResumeToken) {
        let claim = self
            .registry
            .claim(&node(n), Instant::now())
            .await
            .expect("claim");
        (claim.binding, claim.token)
    }

    /// The call state of a live binding, which must exist.
    async fn state(&self, binding: Binding) -> CallState {
        self.registry.call_state(binding).await.expect("live")
    }

    /// Every per-client key (`cg:*` except the two singletons) and its PTTL.
    async fn client_keys(&self) -> Vec<(String, i64)> {
        let mut raw = self.raw.clone();
        let keys: Vec<String> = raw.keys("cg:*").await.expect("KEYS");
        let mut out = Vec::new();
        for key in keys
            .into_iter()
            .filter(|k| !SINGLETONS.contains(&k.as_str()))
        {
            let ttl: i64 = raw.pttl(&key).await.expect("PTTL");
            out.push((key, ttl));
        }
        out
    }

    /// Asserts every per-client key has a TTL (PTTL > 0: not -1 "no expiry").
    async fn assert_every_key_expires(&self, after: &str) {
        let keys = self.client_keys().await;
        for (key, ttl) in &keys {
            assert!(*ttl > 0, "after {after}: {key} has PTTL {ttl}, no expiry");
        }
    }
}

/// Polls `check` every 20 ms until it holds, failing after `within`.
async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_claim_is_live_on_its_node_with_a_lease_and_a_digest_of_its_token() {
    let Some(s) = setup().await else { return };
    let (a, token) = s.claim("n1").await;
    assert!(
        (100_000_000..1_000_000_000).contains(&a.id.get()),
        "9 digits: {}",
        a.id
    );
    let at = s.registry.locate(a.id).await.unwrap().expect("located");
    assert_eq!(at.node, node("n1"));
    assert_eq!(at.epoch, a.epoch);
    assert!(at.live);
    assert_eq!(s.state(a).await, CallState::Idle);

    let mut raw = s.raw.clone();
    let stored: String = raw.hget(format!("cg:id:{}", a.id), "token").await.unwrap();
    assert_eq!(stored.len(), 64, "a hex SHA-256");
    assert_ne!(
        stored,
        token.to_string(),
        "the token itself is never stored"
    );
    let ttl: i64 = raw.pttl(format!("cg:id:{}", a.id)).await.unwrap();
    assert!(ttl > 59_000 && ttl <= 60_000, "the lease: {ttl}");

    let (b, _) = s.claim("n1").await;
    assert!(b.epoch > a.epoch, "epochs come from one counter");
    s.assert_every_key_expires("claim").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_claims_from_several_nodes_get_distinct_ids_and_epochs() {
    let Some(s) = setup().await else { return };
    let mut tasks = Vec::new();
    for i in 0..400 {
        let registry = s.registry.clone();
        let n = node(&format!("n{}", i % 4));
        tasks.push(tokio::spawn(async move {
            registry.claim(&n, Instant::now()).await.unwrap().binding
        }));
    }
    let mut ids = std::collections::HashSet::new();
    let mut epochs = std::collections::HashSet::new();
    for task in tasks {
        let binding = task.await.unwrap();
        ids.insert(binding.id);
        epochs.insert(binding.epoch);
    }
    assert_eq!(ids.len(), 400);
    assert_eq!(epochs.len(), 400);
    let keys = s.client_keys().await;
    assert_eq!(keys.len(), 400, "one key per claim, nothing else");
}

#[tokio::test]
async fn a_full_id_space_is_no_free_id_after_32_draws_not_a_hang() {
    let Some(s) = setup().await else { return };
    let registry = RedisRegistry::new(
        s.raw.clone(),
        RegistrySettings {
            id_digits: 6,
            lease: Duration::from_secs(60),
            timeout: Duration::from_secs(5),
        },
    );
    // Every 6-digit ID taken: 900 000 small keys, made inside Redis, 50 000 per script, on a
    // connection without the tests' short timeout.
    let patient =
        redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(60)));
    let mut raw = s
        .client
        .get_multiplexed_async_connection_with_config(&patient)
        .await
        .unwrap();
    let fill = redis::Script::new(
        "for i = ARGV[1], ARGV[2] do redis.call('SET', 'cg:id:' .. i, 1, 'PX', 60000) end",
    );
    for low in (100_000..1_000_000).step_by(50_000) {
        let () = fill
            .arg(low)
            .arg(low + 49_999)
            .invoke_async(&mut raw)
            .await
            .unwrap();
    }
    let refused = registry.claim(&node("n1"), Instant::now()).await;
    assert!(
        matches!(refused, Err(RegisterError::NoFreeId)),
        "{refused:?}"
    );
}

#[tokio::test]
async fn resume_moves_the_id_with_a_new_epoch_and_token_and_frees_the_resumers_own_id() {
    let Some(s) = setup().await else { return };
    let (a, a_token) = s.claim("n1").await;
    let (b, _) = s.claim("n1").await;
    // A is in a call with B, then drops; a new connection on n2 resumes it.
    s.registry
        .transition(a, b.id, Transition::Offer)
        .await
        .unwrap();
    s.registry
        .transition(b, a.id, Transition::Accept)
        .await
        .unwrap();
    s.registry
        .detach(a, Instant::now(), Duration::from_secs(30))
        .await
        .unwrap();
    let (fresh, _) = s.claim("n2").await;

    let took = s
        .registry
        .resume(fresh, a.id, &a_token, &node("n2"), Instant::now())
        .await
        .expect("resumed");
    assert_eq!(took.binding.id, a.id);
    assert!(took.binding.epoch > fresh.epoch);
    assert_eq!(took.previous_node, node("n1"));
    assert!(!took.was_live, "it was reserved");
    assert_eq!(took.previous_epoch, a.epoch);
    assert_eq!(
        took.call,
        CallState::InCall { peer: b.id },
        "the call carries over"
    );
    assert!(
        !took.token.matches(&a_token),
        "a token is good for one resume"
    );

    let at = s.registry.locate(a.id).await.unwrap().unwrap();
    assert_eq!(
        (at.node, at.epoch, at.live),
        (node("n2"), took.binding.epoch, true)
    );
    assert_eq!(
        s.registry.locate(fresh.id).await.unwrap(),
        None,
        "the resumer's own ID is freed"
    );
    assert_eq!(
        s.state(b).await,
        CallState::InCall { peer: a.id },
        "the peer never noticed"
    );
    // The old epoch is stale everywhere.
    assert_eq!(
        s.registry.call_state(a).await,
        Err(BindingError::Stale(Stale))
    );

    // A live holder (a half-open connection) is taken over and reported so.
    let (other, _) = s.claim("n3").await;
    let again = s
        .registry
        .resume(other, a.id, &took.token, &node("n3"), Instant::now())
        .await
        .unwrap();
    assert!(again.was_live);
    assert_eq!(
        again.previous_epoch, took.binding.epoch,
        "the connection to kick"
    );
    assert_eq!(again.previous_node, node("n2"));
    s.assert_every_key_expires("resume").await;
}

#[tokio::test]
async fn resume_refusals_come_in_the_memory_directorys_order() {
    let Some(s) = setup().await else { return };
    let (target, token) = s.claim("n1").await;
    let (me, _) = s.claim("n2").await;
    let (peer, _) = s.claim("n2").await;
    let now = Instant::now();
    let n2 = node("n2");
    let resume = |current: Binding, id: ClientId, token: ResumeToken| {
        let registry = s.registry.clone();
        let n2 = n2.clone();
        async move {
            registry
                .resume(current, id, &token, &n2, now)
                .await
                .map(|_| ())
        }
    };
    let stale = Binding {
        id: me.id,
        epoch: me.epoch + 1000,
    };
    assert_eq!(
        resume(stale, target.id, token.clone()).await,
        Err(ResumeError::Stale(Stale))
    );
    assert_eq!(
        resume(me, me.id, token.clone()).await,
        Err(ResumeError::Unknown),
        "own ID"
    );
    assert_eq!(
        resume(me, ClientId::new(123_456_789), token.clone()).await,
        Err(ResumeError::Unknown)
    );
    let wrong = ResumeToken::random(&mut rand::rng());
    assert_eq!(
        resume(me, target.id, wrong).await,
        Err(ResumeError::TokenMismatch)
    );
    s.registry
        .transition(me, peer.id, Transition::Offer)
        .await
        .unwrap();
    assert_eq!(
        resume(me, target.id, token.clone()).await,
        Err(ResumeError::InCall)
    );
    // Nothing changed by the refusals.
    let at = s.registry.locate(target.id).await.unwrap().unwrap();
    assert_eq!((at.node, at.epoch), (node("n1"), target.epoch));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_racing_to_resume_one_id_exactly_one_wins() {
    let Some(s) = setup().await else { return };
    for round in 0..50 {
        let (target, token) = s.claim("dead").await;
        s.registry
            .detach(target, Instant::now(), Duration::from_secs(30))
            .await
            .unwrap();
        let (x, _) = s.claim("n1").await;
        let (y, _) = s.claim("n2").await;
        let race = |current: Binding, n: &str| {
            let registry = s.registry.clone();
            let token = token.clone();
            let n = node(n);
            tokio::spawn(async move {
                registry
                    .resume(current, target.id, &token, &n, Instant::now())
                    .await
            })
        };
        let (rx, ry) = (race(x, "n1"), race(y, "n2"));
        let (rx, ry) = (rx.await.unwrap(), ry.await.unwrap());
        let winners = [&rx, &ry].iter().filter(|r| r.is_ok()).count();
        assert_eq!(winners, 1, "round {round}: {rx:?} / {ry:?}");
        let loser = if rx.is_ok() { &ry } else { &rx };
        assert!(
            matches!(loser, Err(ResumeError::TokenMismatch)),
            "{loser:?}"
        );
        let won = rx.as_ref().or(ry.as_ref()).unwrap();
        let at = s.registry.locate(target.id).await.unwrap().unwrap();
        assert_eq!(at.epoch, won.binding.epoch);
    }
}

#[tokio::test]
async fn a_detached_id_stays_resumable_for_its_grace_then_vanishes_with_its_held_messages() {
    let Some(s) = setup_with(Duration::from_secs(60), Duration::from_millis(300)).await else {
        return;
    };
    let (a, _) = s.claim("n1").await;
    let (b, _) = s.claim("n1").await;
    s.registry
        .transition(a, b.id, Transition::Offer)
        .await
        .unwrap();
    s.registry
        .detach(a, Instant::now(), Duration::from_millis(300))
        .await
        .unwrap();
    let at = s.registry.locate(a.id).await.unwrap().unwrap();
    assert!(!at.live, "reserved");
    assert_eq!(
        s.registry.call_state(a).await,
        Err(BindingError::Stale(Stale)),
        "not live"
    );
    assert_eq!(
        s.registry
            .detach(a, Instant::now(), Duration::from_millis(300))
            .await,
        Err(BindingError::Stale(Stale)),
        "detached once"
    );
    let held = BusMessage {
        kind: BusKind::Deliver,
        call: None,
        to: a.id,
        epoch: Some(a.epoch),
        origin: Some(Origin {
            from: b.id,
            kind: MessageKind::IceCandidate,
        }),
        server_kind: ServerKind::IceCandidate,
        frame: Bytes::from_static(br#"{"type":"ice-candidate"}"#),
    };
    assert_eq!(s.bus.hold(&held).await.unwrap(), Hold::Held);
    s.assert_every_key_expires("detach and hold").await;
    let mut raw = s.raw.clone();
    let ttl: i64 = raw.pttl(format!("cg:id:{}", a.id)).await.unwrap();
    assert!(
        ttl > 300 && ttl <= 1_300,
        "grace plus margin, not the lease: {ttl}"
    );

    let a_keys = [format!("cg:id:{}", a.id), format!("cg:held:{}", a.id)];
    eventually(
        Duration::from_secs(5),
        "the reservation expires",
        || async {
            let keys = s.client_keys().await;
            !keys.iter().any(|(k, _)| a_keys.contains(k))
        },
    )
    .await;
    assert_eq!(s.registry.locate(a.id).await.unwrap(), None);
}

#[tokio::test]
async fn expire_frees_only_a_reservation_still_at_its_epoch_and_resets_the_peer() {
    let Some(s) = setup().await else { return };
    let (a, token) = s.claim("n1").await;
    let (b, _) = s.claim("n2").await;
    s.registry
        .transition(b, a.id, Transition::Offer)
        .await
        .unwrap();
    assert_eq!(s.registry.expire(a).await, Ok(None), "live: not expired");
    s.registry
        .detach(a, Instant::now(), Duration::from_secs(30))
        .await
        .unwrap();

    // Resumed elsewhere first: the old reservation's expiry does nothing.
    let (c, _) = s.claim("n3").await;
    let took = s
        .registry
        .resume(c, a.id, &token, &node("n3"), Instant::now())
        .await
        .unwrap();
    assert_eq!(s.registry.expire(a).await, Ok(None));
    assert_eq!(
        s.state(took.binding).await,
        CallState::Called { peer: b.id }
    );

    s.registry
        .detach(took.binding, Instant::now(), Duration::from_secs(30))
        .await
        .unwrap();
    let freed = s
        .registry
        .expire(took.binding)
        .await
        .unwrap()
        .expect("freed");
    assert_eq!((freed.id, freed.peer), (a.id, Some(b.id)));
    assert_eq!(
        s.state(b).await,
        CallState::Idle,
        "the caller's call was reset"
    );
    assert_eq!(s.registry.locate(a.id).await.unwrap(), None);
    assert_eq!(s.registry.expire(took.binding).await, Ok(None), "only once");
}

#[tokio::test]
async fn release_frees_the_id_and_returns_the_peer_whose_call_it_reset() {
    let Some(s) = setup().await else { return };
    let (a, _) = s.claim("n1").await;
    let (b, _) = s.claim("n2").await;
    let (c, _) = s.claim("n2").await;
    s.registry
        .transition(a, b.id, Transition::Offer)
        .await
        .unwrap();
    s.registry
        .transition(b, a.id, Transition::Accept)
        .await
        .unwrap();
    let freed = s.registry.release(a).await.unwrap();
    assert_eq!((freed.id, freed.peer), (a.id, Some(b.id)));
    assert_eq!(s.state(b).await, CallState::Idle);
    assert_eq!(s.registry.release(a).await, Err(BindingError::Stale(Stale)));
    let freed = s.registry.release(c).await.unwrap();
    assert_eq!(freed.peer, None, "idle: nobody to tell");
    assert_eq!(s.registry.locate(c.id).await.unwrap(), None);
}

#[tokio::test]
async fn every_transition_and_every_refusal_keeps_both_sides_symmetric() {
    let Some(s) = setup().await else { return };
    let (a, _) = s.claim("n1").await;
    let (b, _) = s.claim("n2").await;
    let (c, _) = s.claim("n2").await;
    let t = |me: Binding, peer: Binding, what: Transition| s.registry.transition(me, peer.id, what);
    use CallState::*;
    use Transition::*;

    // Refusals from idle.
    assert_eq!(
        t(a, b, Accept).await,
        Err(TransitionError::WrongState(Idle))
    );
    assert_eq!(
        t(a, b, Decline).await,
        Err(TransitionError::WrongState(Idle))
    );
    assert_eq!(
        t(a, b, Cancel).await,
        Err(TransitionError::WrongState(Idle))
    );
    assert_eq!(
        t(a, b, Hangup).await,
        Err(TransitionError::WrongState(Idle))
    );
    assert_eq!(
        s.registry
            .transition(a, ClientId::new(123_456_789), Offer)
            .await,
        Err(TransitionError::UnknownPeer)
    );
    assert_eq!(
        t(a, a, Offer).await,
        Err(TransitionError::UnknownPeer),
        "not yourself"
    );

    // Offer, then everything that does not fit it.
    assert_eq!(t(a, b, Offer).await, Ok(Calling { peer: b.id }));
    assert_eq!(s.state(b).await, Called { peer: a.id });
    assert_eq!(
        t(a, c, Offer).await,
        Err(TransitionError::AlreadyInCall {
            peer: b.id,
            state: Calling { peer: b.id }
        })
    );
    assert_eq!(t(c, b, Offer).await, Err(TransitionError::Busy));
    assert_eq!(t(c, a, Offer).await, Err(TransitionError::Busy));
    assert_eq!(
        t(a, b, Accept).await,
        Err(TransitionError::WrongState(Calling { peer: b.id }))
    );
    assert_eq!(
        t(b, a, Cancel).await,
        Err(TransitionError::WrongState(Called { peer: a.id }))
    );
    assert_eq!(
        t(b, c, Accept).await,
        Err(TransitionError::WrongState(Called { peer: a.id })),
        "other peer"
    );

    // Decline ends it on both sides; cancel likewise.
    assert_eq!(t(b, a, Decline).await, Ok(Idle));
    assert_eq!((s.state(a).await, s.state(b).await), (Idle, Idle));
    t(a, b, Offer).await.unwrap();
    assert_eq!(t(a, b, Cancel).await, Ok(Idle));
    assert_eq!((s.state(a).await, s.state(b).await), (Idle, Idle));

    // Accept, then hang up from either side.
    t(a, b, Offer).await.unwrap();
    assert_eq!(t(b, a, Accept).await, Ok(InCall { peer: a.id }));
    assert_eq!(s.state(a).await, InCall { peer: b.id });
    assert_eq!(
        t(a, b, Cancel).await,
        Err(TransitionError::WrongState(InCall { peer: b.id }))
    );
    assert_eq!(t(b, a, Hangup).await, Ok(Idle));
    assert_eq!((s.state(a).await, s.state(b).await), (Idle, Idle));
    t(a, b, Offer).await.unwrap();
    assert_eq!(
        t(a, b, Hangup).await,
        Ok(Idle),
        "hang up works in any phase"
    );
    assert_eq!(s.state(b).await, Idle);

    // A stale binding can do nothing.
    let stale = Binding {
        id: a.id,
        epoch: a.epoch + 1000,
    };
    assert_eq!(t(stale, b, Offer).await, Err(TransitionError::Stale(Stale)));
    s.registry
        .detach(c, Instant::now(), Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(
        t(c, b, Offer).await,
        Err(TransitionError::Stale(Stale)),
        "reserved is not live"
    );

    // A reserved callee can be called (it may resume), and a peer that vanished by TTL
    // does not block hanging up.
    assert_eq!(t(a, c, Offer).await, Ok(Calling { peer: c.id }));
    let mut raw = s.raw.clone();
    let () = raw.del(format!("cg:id:{}", c.id)).await.unwrap();
    assert_eq!(t(a, c, Hangup).await, Ok(Idle));
    s.assert_every_key_expires("transitions").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_callers_racing_to_offer_to_one_idle_callee_exactly_one_wins() {
    let Some(s) = setup().await else { return };
    for round in 0..50 {
        let (callee, _) = s.claim("n3").await;
        let (x, _) = s.claim("n1").await;
        let (y, _) = s.claim("n2").await;
        let offer = |me: Binding| {
            let registry = s.registry.clone();
            tokio::spawn(async move { registry.transition(me, callee.id, Transition::Offer).await })
        };
        let (ox, oy) = (offer(x), offer(y));
        let (ox, oy) = (ox.await.unwrap(), oy.await.unwrap());
        let (winner, loser) = match (&ox, &oy) {
            (Ok(_), Err(TransitionError::Busy)) => (x, y),
            (Err(TransitionError::Busy), Ok(_)) => (y, x),
            other => panic!("round {round}: not exactly one winner: {other:?}"),
        };
        assert_eq!(s.state(callee).await, CallState::Called { peer: winner.id });
        assert_eq!(s.state(loser).await, CallState::Idle);
    }
}

#[tokio::test]
async fn refresh_keeps_a_live_nodes_ids_and_a_silent_nodes_ids_expire() {
    // A lease ten times the refresh period, so a loaded machine's pauses cannot fake an expiry.
    let lease = Duration::from_millis(1_000);
    let Some(s) = setup_with(lease, Duration::from_secs(30)).await else {
        return;
    };
    let (kept, _) = s.claim("alive").await;
    let (moved, token) = s.claim("alive").await;
    let (silent, _) = s.claim("silent").await;
    let (detached, _) = s.claim("alive").await;
    s.registry
        .detach(detached, Instant::now(), Duration::from_secs(10))
        .await
        .unwrap();
    let (resumer, _) = s.claim("other").await;
    let took = s
        .registry
        .resume(resumer, moved.id, &token, &node("other"), Instant::now())
        .await
        .unwrap();

    // "alive" refreshes every 100 ms for 2.5 s (two and a half leases); "silent" never does.
    let alive = node("alive");
    let bindings = [kept, moved, detached];
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(2_500) {
        let refreshed = s.registry.refresh(&alive, &bindings).await.unwrap();
        assert_eq!(refreshed.renewed, 1, "only the ID still live at its epoch");
        assert_eq!(refreshed.restored, 0);
        let mut lost = refreshed.lost.clone();
        lost.sort_by_key(|b| b.epoch);
        assert_eq!(lost, [moved, detached], "moved and detached are stale here");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        s.registry.locate(kept.id).await.unwrap().is_some(),
        "refreshed: still there"
    );
    assert_eq!(
        s.registry.locate(silent.id).await.unwrap(),
        None,
        "not refreshed: gone"
    );
    assert_eq!(
        s.registry.locate(took.binding.id).await.unwrap(),
        None,
        "moved on, not renewed by the old node"
    );
    let mut raw = s.raw.clone();
    let ttl: i64 = raw.pttl(format!("cg:id:{}", detached.id)).await.unwrap();
    assert!(
        ttl > 5_000,
        "a reservation keeps its grace, not the lease: {ttl}"
    );
    assert_eq!(
        s.registry.refresh(&alive, &[]).await,
        Ok(Refreshed::default())
    );
}

#[tokio::test]
async fn refresh_batches_thousands_of_ids_in_one_round_trip() {
    let Some(s) = setup().await else { return };
    let n1 = node("n1");
    let mut live = Vec::new();
    for _ in 0..1_000 {
        live.push(s.claim("n1").await.0);
    }
    let all = Refreshed {
        renewed: 1_000,
        ..Refreshed::default()
    };
    assert_eq!(s.registry.refresh(&n1, &live).await, Ok(all.clone()));
    // Redis forgot the scripts (as after a restart): refresh loads them again.
    let mut raw = s.raw.clone();
    let () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(s.registry.refresh(&n1, &live).await, Ok(all));
}

#[tokio::test]
async fn held_messages_are_capped_exactly_replayed_in_order_once_and_expire() {
    let Some(s) = setup().await else { return };
    let (a, token) = s.claim("n1").await;
    let (b, _) = s.claim("n2").await;
    s.registry
        .detach(a, Instant::now(), Duration::from_secs(30))
        .await
        .unwrap();
    let message = |n: usize, size: usize| BusMessage {
        kind: BusKind::Deliver,
        call: None,
        to: a.id,
        epoch: Some(a.epoch),
        origin: Some(Origin {
            from: b.id,
            kind: MessageKind::IceCandidate,
        }),
        server_kind: ServerKind::IceCandidate,
        frame: Bytes::from(format!("{{\"n\":{n},\"pad\":\"{}\"}}", "x".repeat(size))),
    };
    for n in 0..4 {
        assert_eq!(s.bus.hold(&message(n, 10)).await.unwrap(), Hold::Held);
    }
    assert_eq!(
        s.bus.hold(&message(4, 10)).await.unwrap(),
        Hold::Dropped(DropReason::QueueFull),
        "the fifth of four is refused, not trimmed"
    );
    s.assert_every_key_expires("hold").await;
    let stale = BusMessage {
        epoch: Some(a.epoch + 1000),
        ..message(9, 1)
    };
    assert_eq!(s.bus.hold(&stale).await.unwrap(), Hold::Moved);
    let nobody = BusMessage {
        kind: BusKind::Deliver,
        call: None,
        to: ClientId::new(123_456_789),
        ..message(9, 1)
    };
    assert_eq!(s.bus.hold(&nobody).await.unwrap(), Hold::NoSuchClient);

    // The resuming node takes them all, in order, once.
    let (c, _) = s.claim("n3").await;
    let took = s
        .registry
        .resume(c, a.id, &token, &node("n3"), Instant::now())
        .await
        .unwrap();
    let held = s.bus.take_held(a.id).await.unwrap();
    assert_eq!(held, (0..4).map(|n| message(n, 10)).collect::<Vec<_>>());
    assert!(
        s.bus.take_held(a.id).await.unwrap().is_empty(),
        "never replayed twice"
    );

    // The byte budget (1 KiB) counts from empty again.
    s.registry
        .detach(took.binding, Instant::now(), Duration::from_secs(30))
        .await
        .unwrap();
    let big = |n| BusMessage {
        epoch: Some(took.binding.epoch),
        ..message(n, 600)
    };
    assert_eq!(s.bus.hold(&big(0)).await.unwrap(), Hold::Held);
    assert_eq!(
        s.bus.hold(&big(1)).await.unwrap(),
        Hold::Dropped(DropReason::QueueFull)
    );
    let mut raw = s.raw.clone();
    let ttl: i64 = raw.pttl(format!("cg:held:{}", a.id)).await.unwrap();
    assert!(ttl > 29_000, "held as long as the ID can be resumed: {ttl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_racing_to_take_held_messages_one_gets_all_the_other_none() {
    let Some(s) = setup().await else { return };
    for _ in 0..30 {
        let (a, _) = s.claim("n1").await;
        for n in 0..3u8 {
            let m = BusMessage {
                kind: BusKind::Deliver,
                call: None,
                to: a.id,
                epoch: None,
                origin: None,
                server_kind: ServerKind::IceCandidate,
                frame: Bytes::from(vec![b'0' + n]),
            };
            assert_eq!(s.bus.hold(&m).await.unwrap(), Hold::Held);
        }
        let take = || {
            let bus = s.bus.clone();
            tokio::spawn(async move { bus.take_held(a.id).await.unwrap().len() })
        };
        let (x, y) = (take(), take());
        let mut got = [x.await.unwrap(), y.await.unwrap()];
        got.sort_unstable();
        assert_eq!(got, [0, 3]);
    }
}

#[tokio::test]
async fn send_reaches_the_subscribed_node_and_says_when_nobody_listens() {
    let Some(s) = setup().await else { return };
    let n1 = node("n1");
    let mut inbox = s.bus.subscribe(&n1, 16);
    assert!(matches!(
        inbox.next().await,
        Some(BusEvent::Subscribed { resumed: false })
    ));
    let m = BusMessage {
        kind: BusKind::Deliver,
        call: Some(CallState::Called {
            peer: ClientId::new(444_555_666),
        }),
        to: ClientId::new(111_222_333),
        epoch: Some(7),
        origin: Some(Origin {
            from: ClientId::new(444_555_666),
            kind: MessageKind::VideoOfferRequest,
        }),
        server_kind: ServerKind::IceCandidate,
        frame: Bytes::from_static(br#"{"type":"video-answer-request","offer":{"sdp":"v=0"}}"#),
    };
    let kick = BusMessage::kick(ClientId::new(111_222_333), 6);
    for sent in [&m, &kick] {
        assert!(s.bus.send(&n1, sent).await.unwrap(), "received");
        match inbox.next().await {
            Some(BusEvent::Message(got)) => assert_eq!(&got, sent),
            other => panic!("expected the message, got {other:?}"),
        }
    }
    assert!(
        !s.bus.send(&node("gone"), &m).await.unwrap(),
        "nobody: hold it instead"
    );
    drop(inbox);
    eventually(
        Duration::from_secs(5),
        "the dropped subscription unsubscribes",
        || async { !s.bus.send(&n1, &m).await.unwrap() },
    )
    .await;
    let _ = &s.client;
}

#[tokio::test]
async fn messages_queued_behind_a_publish_share_one_and_each_sender_gets_its_answer_in_order() {
    let Some(s) = setup().await else { return };
    let n1 = node("n1");
    // n1's heartbeat says it reads batches (what a node of this release advertises).
    s.readers.set(&[NodeInfo {
        id: "n1".into(),
        https: "127.0.0.1:1".into(),
        turn: None,
        draining: false,
        bus_reads: BUS_READS,
        link: None,
    }]);
    let mut inbox = s.bus.subscribe(&n1, 1024);
    assert!(matches!(
        inbox.next().await,
        Some(BusEvent::Subscribed { resumed: false })
    ));
    const N: u64 = 100;
    let sent: Vec<BusMessage> = (0..N)
        .map(|n| BusMessage {
            kind: BusKind::Deliver,
            call: None,
            to: ClientId::new(100_000_000 + n % 7),
            epoch: Some(n),
            origin: Some(Origin {
                from: ClientId::new(200_000_000 + n),
                kind: MessageKind::IceCandidate,
            }),
            server_kind: ServerKind::IceCandidate,
            frame: Bytes::from(format!(r#"{{"type":"ice-candidate","n":{n}}}"#)),
        })
        .collect();
    // A test runtime has one thread: all N sends are queued before the node's sender task first
    // runs, so the task takes them all into one PUBLISH (one at a time, they would take N).
    let before = command_calls(&s, "publish").await;
    let answers = futures_util::future::join_all(sent.iter().map(|m| s.bus.send(&n1, m))).await;
    assert!(answers.iter().all(|a| *a == Ok(true)), "{answers:?}");
    assert_eq!(command_calls(&s, "publish").await - before, 1);
    for m in &sent {
        match inbox.next().await {
            Some(BusEvent::Message(got)) => assert_eq!(&got, m),
            other => panic!("expected message {:?}, got {other:?}", m.epoch),
        }
    }

    // Nobody subscribed: every sender of the batch is told, so each holds its own message.
    let gone = node("gone");
    let answers = futures_util::future::join_all(sent.iter().map(|m| s.bus.send(&gone, m))).await;
    assert!(answers.iter().all(|a| *a == Ok(false)), "{answers:?}");

    // One at a time (each waits for its answer): one PUBLISH each, no wait added.
    let before = command_calls(&s, "publish").await;
    for m in &sent[..10] {
        assert_eq!(s.bus.send(&n1, m).await, Ok(true));
        assert!(matches!(inbox.next().await, Some(BusEvent::Message(got)) if &got == m));
    }
    assert_eq!(command_calls(&s, "publish").await - before, 10);
}

#[tokio::test]
async fn a_quiet_nodes_sender_task_ends_and_the_next_message_starts_another() {
    let Some(s) = setup().await else { return };
    let n1 = node("n1");
    let mut inbox = s.bus.subscribe(&n1, 64);
    assert!(matches!(
        inbox.next().await,
        Some(BusEvent::Subscribed { resumed: false })
    ));
    let publisher = Publisher::with_idle(s.raw.clone(), TIMEOUT, Duration::from_millis(100));
    let channel = node_channel(&n1);
    let m = BusMessage::kick(ClientId::new(111_222_333), 6);
    for round in 0..3 {
        assert_eq!(
            publisher.publish(&channel, m.encode()).await,
            Ok(true),
            "{round}"
        );
        assert!(matches!(inbox.next().await, Some(BusEvent::Message(got)) if got == m));
        assert_eq!(publisher.senders(), 1);
        eventually(Duration::from_secs(5), "the sender task ends", || async {
            publisher.senders() == 0
        })
        .await;
    }
    // Sends racing the end of a sender task: every one is answered and arrives, none twice.
    let mut sent = 0;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(95)).await;
        let answers =
            futures_util::future::join_all((0..5).map(|_| publisher.publish(&channel, m.encode())))
                .await;
        assert!(answers.iter().all(|a| *a == Ok(true)), "{answers:?}");
        sent += answers.len();
    }
    for _ in 0..sent {
        assert!(matches!(inbox.next().await, Some(BusEvent::Message(got)) if got == m));
    }
    let extra = tokio::time::timeout(Duration::from_millis(200), inbox.next()).await;
    assert!(extra.is_err(), "a message arrived twice: {extra:?}");
}

#[tokio::test]
async fn a_redis_outage_is_unavailable_within_the_timeout_and_everything_recovers() {
    let Some(mut s) = setup().await else { return };
    let n1 = node("n1");
    let (a, _) = s.claim("n1").await;
    let (b, _) = s.claim("n1").await;
    let mut inbox = s.bus.subscribe(&n1, 16);
    assert!(matches!(
        inbox.next().await,
        Some(BusEvent::Subscribed { resumed: false })
    ));

    s.redis.stop();
    let m = BusMessage {
        kind: BusKind::Deliver,
        call: None,
        to: b.id,
        epoch: None,
        origin: None,
        server_kind: ServerKind::IceCandidate,
        frame: Bytes::from_static(b"{}"),
    };
    // Each operation fails on its own within the timeout (plus scheduling slack), never hangs.
    let bound = TIMEOUT + SLACK;
    let started = Instant::now();
    let claimed = s.registry.claim(&n1, Instant::now()).await;
    assert!(matches!(claimed, Err(RegisterError::Unavailable)));
    assert!(
        started.elapsed() < bound,
        "claim took {:?}",
        started.elapsed()
    );
    let started = Instant::now();
    let resumed = s
        .registry
        .resume(
            a,
            b.id,
            &ResumeToken::random(&mut rand::rng()),
            &n1,
            Instant::now(),
        )
        .await;
    assert!(matches!(resumed, Err(ResumeError::Unavailable)));
    assert!(
        started.elapsed() < bound,
        "resume took {:?}",
        started.elapsed()
    );
    let started = Instant::now();
    let offered = s.registry.transition(a, b.id, Transition::Offer).await;
    assert_eq!(offered, Err(TransitionError::Unavailable));
    assert!(
        started.elapsed() < bound,
        "transition took {:?}",
        started.elapsed()
    );
    let started = Instant::now();
    assert_eq!(s.registry.locate(a.id).await, Err(Unavailable));
    assert!(
        started.elapsed() < bound,
        "locate took {:?}",
        started.elapsed()
    );
    let started = Instant::now();
    let state = s.registry.call_state(a).await;
    assert_eq!(state, Err(BindingError::Unavailable(Unavailable)));
    assert!(
        started.elapsed() < bound,
        "call_state took {:?}",
        started.elapsed()
    );
    let started = Instant::now();
    let detached = s
        .registry
        .detach(a, Instant::now(), Duration::from_secs(1))
        .await;
    assert_eq!(detached, Err(BindingError::Unavailable(Unavailable)));
    assert!(
        started.elapsed() < bound,
        "detach took {:?}",
        started.elapsed()
    );
    let started = Instant::now();
    assert_eq!(s.registry.expire(a).await, Err(Unavailable));
    assert!(
        started.elapsed() < bound,
        "expire took {:?}",
        started.elapsed()
    );
    let started = Instant::now();
    let released = s.registry.release(a).await;
    assert_eq!(released, Err(BindingError::Unavailable(Unavailable)));
    assert!(
        started.elapsed() < bound,
        "release took {:?}",
        started.elapsed()
    );
    let started = Instant::now();
    assert_eq!(s.registry.refresh(&n1, &[a]).await, Err(Unavailable));
    assert!(
        started.elapsed() < bound,
        "refresh took {:?}",
        started.elapsed()
    );
    let started = Instant::now();
    assert_eq!(s.bus.send(&n1, &m).await, Err(Unavailable));
    assert!(
        started.elapsed() < bound,
        "send took {:?}",
        started.elapsed()
    );
    let started = Instant::now();
    assert_eq!(s.bus.hold(&m).await, Err(Unavailable));
    assert!(
        started.elapsed() < bound,
        "hold took {:?}",
        started.elapsed()
    );
    let started = Instant::now();
    assert_eq!(s.bus.take_held(b.id).await, Err(Unavailable));
    assert!(
        started.elapsed() < bound,
        "take_held took {:?}",
        started.elapsed()
    );

    // Redis comes back empty (no persistence): claims work again by themselves, and the node's
    // subscription is back in place and says so.
    s.redis.stop();
    s.redis.restart();
    eventually(Duration::from_secs(10), "claims work again", || async {
        s.registry.claim(&n1, Instant::now()).await.is_ok()
    })
    .await;
    let resumed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match inbox.next().await {
                Some(BusEvent::Subscribed { resumed: true }) => return,
                Some(_) => continue,
                None => panic!("the subscription task ended"),
            }
        }
    })
    .await;
    assert!(resumed.is_ok(), "no resubscription within 10 s");
    assert!(
        s.bus.send(&n1, &m).await.unwrap(),
        "the node receives again"
    );
    match inbox.next().await {
        Some(BusEvent::Message(got)) => assert_eq!(got, m),
        other => panic!("expected the message, got {other:?}"),
    }
    // A fresh Redis lost its scripts: every script-backed operation reloads them.
    let (c, _) = s.claim("n1").await;
    let (d, _) = s.claim("n1").await;
    assert!(s
        .registry
        .transition(c, d.id, Transition::Offer)
        .await
        .is_ok());
}

#[tokio::test]
async fn after_redis_restarts_empty_every_nodes_refresh_puts_its_live_ids_back_and_epochs_stay_unique(
) {
    let Some(mut s) = setup().await else { return };
    // Two nodes, each with its own registry (what each knows of Redis is its own), epochs
    // interleaved between them.
    let other = RedisRegistry::new(
        manager(&s.client).await,
        RegistrySettings {
            id_digits: 9,
            lease: Duration::from_secs(60),
            timeout: TIMEOUT,
        },
    );
    let (n1, n2) = (node("n1"), node("n2"));
    let claim2 = || async { other.claim(&n2, Instant::now()).await.unwrap().binding };
    let (a, a_token) = s.claim("n1").await;
    let b = claim2().await;
    let (a2, _) = s.claim("n1").await;
    let b2 = claim2().await;
    let (left, _) = s.claim("n1").await;
    s.registry.release(left).await.unwrap();
    // Without a data loss, a gone key stays gone.
    let refreshed = s.registry.refresh(&n1, &[a, a2, left]).await.unwrap();
    assert_eq!((refreshed.renewed, refreshed.restored), (2, 0));
    assert_eq!(refreshed.lost, [left]);
    let refreshed = other.refresh(&n2, &[b, b2]).await.unwrap();
    assert_eq!((refreshed.renewed, refreshed.restored), (2, 0));

    s.redis.stop();
    s.redis.restart();
    eventually(Duration::from_secs(10), "Redis answers again", || async {
        let mut raw = s.raw.clone();
        let ping: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut raw).await;
        ping.is_ok() && s.registry.locate(a.id).await.is_ok() && other.locate(b.id).await.is_ok()
    })
    .await;
    assert_eq!(
        s.registry.locate(a.id).await,
        Ok(None),
        "Redis lost everything"
    );
    // A third node claims first; then each node's refresh still sees that Redis was reset.
    let (early, _) = s.claim("n3").await;
    let refreshed = s.registry.refresh(&n1, &[a, a2]).await.unwrap();
    assert_eq!((refreshed.renewed, refreshed.restored), (0, 2));
    assert!(refreshed.lost.is_empty());
    let refreshed = other.refresh(&n2, &[b, b2]).await.unwrap();
    assert_eq!(
        (refreshed.renewed, refreshed.restored),
        (0, 2),
        "the second node too"
    );
    let at = s.registry.locate(a.id).await.unwrap().unwrap();
    assert_eq!((at.node, at.epoch, at.live), (n1.clone(), a.epoch, true));
    let at = s.registry.locate(b2.id).await.unwrap().unwrap();
    assert_eq!((at.node, at.epoch, at.live), (n2.clone(), b2.epoch, true));
    s.assert_every_key_expires("restore").await;

    // The restored IDs work: they can call each other across nodes; new epochs are past every
    // restored one.
    assert_eq!(s.state(a).await, CallState::Idle);
    assert!(s
        .registry
        .transition(a, b.id, Transition::Offer)
        .await
        .is_ok());
    let (c, _) = s.claim("n3").await;
    let highest = [a, a2, b, b2].iter().map(|x| x.epoch).max().unwrap();
    assert!(
        c.epoch > highest,
        "epoch {} reused (highest {highest})",
        c.epoch
    );
    assert!(
        early.epoch <= highest,
        "the early claim came before the counter was raised"
    );
    // The lost token cannot be checked any more: no resume with it.
    assert_eq!(
        s.registry
            .resume(c, a.id, &a_token, &node("n3"), Instant::now())
            .await
            .map(|_| ()),
        Err(ResumeError::TokenMismatch)
    );
    // And the next refreshes just renew.
    let refreshed = s.registry.refresh(&n1, &[a, a2]).await.unwrap();
    assert_eq!((refreshed.renewed, refreshed.restored), (2, 0));
    let refreshed = other.refresh(&n2, &[b, b2]).await.unwrap();
    assert_eq!((refreshed.renewed, refreshed.restored), (2, 0));
}

/// `calls=` of one command in `INFO commandstats` (0 if never called).
async fn command_calls(s: &Setup, command: &str) -> u64 {
    let mut raw = s.raw.clone();
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut raw)
        .await
        .unwrap();
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

/// Median and 99th percentile of `samples`, in microseconds.
fn median_p99(mut samples: Vec<Duration>) -> (u128, u128) {
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize].as_micros();
    (at(0.5), at(0.99))
}

/// Times `rounds` sequential runs of `op` after one warm-up run, and counts the Redis commands named `command` they sent.
async fn measure<F, Fut>(s: &Setup, name: &str, command: &str, rounds: u32, mut op: F) -> u64
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = ()>,
{
    // The first use of a script loads it (NOSCRIPT, SCRIPT LOAD, EVALSHA): once per Redis start.
    op(u32::MAX).await;
    let before = command_calls(s, command).await;
    let mut samples = Vec::new();
    for round in 0..rounds {
        let started = Instant::now();
        op(round).await;
        samples.push(started.elapsed());
    }
    let sent = command_calls(s, command).await - before;
    let (median, p99) = median_p99(samples);
    println!(
        "{name:<18} {:>5.2} {command} per op, median {median} µs, p99 {p99} µs",
        sent as f64 / f64::from(rounds)
    );
    sent
}

/// Prints the numbers docs/PERFORMANCE.md needs (run alone for stable latencies:
/// `cargo test --test redis_registry round_trips -- --nocapture`) and asserts the round trips:
/// exactly one per operation, so a route cache in front of them saves all of them.
#[tokio::test]
async fn round_trips_and_latency_per_operation_on_loopback() {
    let Some(s) = setup().await else { return };
    let (a, _) = s.claim("n1").await;
    let (b, _) = s.claim("n2").await;
    let n1 = node("n1");
    let mut inbox = s.bus.subscribe(&n1, 1024);
    assert!(matches!(
        inbox.next().await,
        Some(BusEvent::Subscribed { .. })
    ));
    const N: u32 = 1_000;

    let sent = measure(&s, "transition", "evalsha", N, |round| {
        let t = if round % 2 == 1 {
            Transition::Offer
        } else {
            Transition::Hangup
        };
        let registry = s.registry.clone();
        async move {
            registry.transition(a, b.id, t).await.unwrap();
        }
    })
    .await;
    assert_eq!(sent, u64::from(N));
    // As a cluster node sends it: with an operation number, recorded in the hash.
    let ops = std::sync::atomic::AtomicU64::new(1_000_000);
    // Starts with a's call going (the warm-up hangs up), ends with it going again.
    let sent = measure(&s, "transition+op", "evalsha", N + 1, |round| {
        let t = if round % 2 == 1 {
            Transition::Hangup
        } else {
            Transition::Offer
        };
        let registry = s.registry.clone();
        let op = ops.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        async move {
            registry.transition_op(a, b.id, t, Some(op)).await.unwrap();
        }
    })
    .await;
    assert_eq!(sent, u64::from(N + 1));
    let sent = measure(&s, "call_state", "evalsha", N, |_| {
        let registry = s.registry.clone();
        async move {
            registry.call_state(a).await.unwrap();
        }
    })
    .await;
    assert_eq!(sent, u64::from(N));
    let sent = measure(&s, "locate", "hmget", N, |_| {
        let registry = s.registry.clone();
        async move {
            registry.locate(b.id).await.unwrap().unwrap();
        }
    })
    .await;
    assert_eq!(sent, u64::from(N), "locate is one HMGET, no script");
    let m = BusMessage {
        kind: BusKind::Deliver,
        call: None,
        to: a.id,
        epoch: Some(a.epoch),
        origin: Some(Origin {
            from: b.id,
            kind: MessageKind::IceCandidate,
        }),
        server_kind: ServerKind::IceCandidate,
        frame: Bytes::from(format!(
            r#"{{"type":"ice-candidate","candidate":"{}"}}"#,
            "x".repeat(200)
        )),
    };
    let sent = measure(&s, "send (publish)", "publish", N, |_| {
        let bus = s.bus.clone();
        let m = m.clone();
        let n1 = n1.clone();
        async move {
            assert!(bus.send(&n1, &m).await.unwrap());
        }
    })
    .await;
    assert_eq!(sent, u64::from(N));
    for _ in 0..N {
        assert!(matches!(inbox.next().await, Some(BusEvent::Message(_))));
    }
    let routes = Routes::new(
        s.registry.clone(),
        s.bus.clone(),
        RouteSettings {
            max_routes: 1_000,
            ttl: Duration::from_secs(60),
        },
    );
    let frame = m.frame.clone();
    let sent = measure(&s, "deliver (cached)", "publish", N, |_| {
        let envelope = Envelope::from_parts(m.server_kind, frame.to_vec(), m.origin);
        let routes = &routes;
        async move {
            assert_eq!(
                routes.deliver(a.id, None, envelope).await,
                BusDelivery::Delivered
            );
        }
    })
    .await;
    assert_eq!(
        sent,
        u64::from(N),
        "one PUBLISH per message on a cached route"
    );
    for _ in 0..=N {
        assert!(matches!(inbox.next().await, Some(BusEvent::Message(_))));
    }
    let sent = measure(&s, "claim", "evalsha", 200, |_| {
        let registry = s.registry.clone();
        async move {
            registry.claim(&node("n3"), Instant::now()).await.unwrap();
        }
    })
    .await;
    assert_eq!(sent, 200, "no collisions among 9-digit IDs here");
    let mut live = Vec::new();
    for _ in 0..1_000 {
        live.push(s.claim("n4").await.0);
    }
    let sent = measure(&s, "refresh 1000 IDs", "evalsha", 20, |_| {
        let registry = s.registry.clone();
        let live = live.clone();
        async move {
            assert_eq!(
                registry.refresh(&node("n4"), &live).await.unwrap().renewed,
                1_000
            );
        }
    })
    .await;
    assert_eq!(sent, 20 * 4, "four scripts of 256 IDs, one pipeline");
}

#[tokio::test]
async fn a_redis_that_accepts_and_never_answers_costs_at_most_the_timeout() {
    // A black hole on loopback: connections are accepted and held, nothing is ever answered
    // (what a half-dead Redis or a dropped route looks like). No redis-server needed.
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("redis://{}/", hole.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = hole.accept().await {
            held.push(socket);
        }
    });
    let client = redis::Client::open(url).unwrap();
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(TIMEOUT))
        .set_response_timeout(Some(TIMEOUT))
        .set_number_of_retries(1);
    let conn = redis::aio::ConnectionManager::new_lazy_with_config(client.clone(), config).unwrap();
    let registry = RedisRegistry::new(
        conn.clone(),
        RegistrySettings {
            id_digits: 9,
            lease: Duration::from_secs(60),
            timeout: TIMEOUT,
        },
    );
    let bus = RedisBus::new(
        client,
        conn,
        BusSettings {
            held_messages: 4,
            held_bytes: 1024,
            held_bytes_total: 1 << 20,
            grace: Duration::from_secs(1),
            timeout: TIMEOUT,
        },
    );
    let bound = TIMEOUT + SLACK;
    let started = Instant::now();
    let claimed = registry.claim(&node("n1"), Instant::now()).await;
    assert!(
        matches!(claimed, Err(RegisterError::Unavailable)),
        "{claimed:?}"
    );
    assert!(
        started.elapsed() < bound,
        "claim took {:?}",
        started.elapsed()
    );
    let started = Instant::now();
    assert_eq!(
        registry.locate(ClientId::new(123_456_789)).await,
        Err(Unavailable)
    );
    assert!(
        started.elapsed() < bound,
        "locate took {:?}",
        started.elapsed()
    );
    let m = BusMessage {
        kind: BusKind::Deliver,
        call: None,
        to: ClientId::new(1),
        epoch: None,
        origin: None,
        server_kind: ServerKind::IceCandidate,
        frame: Bytes::new(),
    };
    let started = Instant::now();
    assert_eq!(bus.send(&node("n1"), &m).await, Err(Unavailable));
    assert!(
        started.elapsed() < bound,
        "send took {:?}",
        started.elapsed()
    );
    // The subscription keeps trying and never claims to be subscribed.
    let mut inbox = bus.subscribe(&node("n1"), 4);
    let event = tokio::time::timeout(TIMEOUT * 4, inbox.next()).await;
    assert!(event.is_err(), "subscribed to a black hole? {event:?}");
}

/// The ACL docs/SECURITY.md ("Redis") recommends for callgate's Redis user: its own keys and
/// channels, the commands its scripts and calls use (registry, bus and membership, the same list
/// as tests/cluster.rs), nothing else.
const CALLGATE_ACL: &str =
    "callgate on >test-only-password resetkeys ~cg:* resetchannels &cg:node:* \
     -@all +hello +auth +ping +evalsha +script|load +hmget +get +publish \
     +subscribe +unsubscribe +exists +incr +hset +hget +pexpire +del +xlen +xadd +hincrby +pttl \
     +xrange +set +time +incrby +zadd +zrem +zrangebyscore +zremrangebyscore +hgetall +hdel";

#[tokio::test]
async fn every_operation_works_as_the_restricted_acl_user_and_nothing_else_does() {
    // On redis-server's command line a directive's words are separate arguments.
    let mut args = vec!["--user"];
    args.extend(CALLGATE_ACL.split_whitespace());
    args.extend(["--user", "default", "off"]);
    let Some(redis) = RedisServer::start_configured(&args) else {
        return;
    };
    let url = format!(
        "redis://callgate:test-only-password@127.0.0.1:{}/",
        redis.addr.port()
    );
    let s = setup_on(
        redis,
        &url,
        Duration::from_secs(60),
        Duration::from_secs(30),
    )
    .await;
    let n1 = node("n1");
    let mut inbox = s.bus.subscribe(&n1, 16);
    assert!(matches!(
        inbox.next().await,
        Some(BusEvent::Subscribed { .. })
    ));
    let (a, a_token) = s.claim("n1").await;
    let (b, _) = s.claim("n1").await;
    s.registry
        .transition(a, b.id, Transition::Offer)
        .await
        .unwrap();
    s.registry
        .transition(b, a.id, Transition::Accept)
        .await
        .unwrap();
    s.registry
        .detach(a, Instant::now(), Duration::from_secs(30))
        .await
        .unwrap();
    let m = BusMessage {
        kind: BusKind::Deliver,
        call: None,
        to: a.id,
        epoch: Some(a.epoch),
        origin: None,
        server_kind: ServerKind::IceCandidate,
        frame: Bytes::from_static(b"{}"),
    };
    assert_eq!(s.bus.hold(&m).await.unwrap(), Hold::Held);
    let (c, _) = s.claim("n1").await;
    let took = s
        .registry
        .resume(c, a.id, &a_token, &n1, Instant::now())
        .await
        .unwrap();
    // The resume's read, its trim and a missed-range marker need nothing more than the ACL.
    let marker = BusMessage::missed(a.id, took.binding.epoch, (3, 4));
    assert!(s.bus.hold_marker(&marker).await.unwrap());
    let read = s.bus.read_held(took.binding).await.unwrap();
    assert_eq!(read.messages.len(), 2);
    s.bus
        .trim_held(a.id, read.cursor.as_deref().unwrap())
        .await
        .unwrap();
    assert_eq!(s.bus.hold(&m).await.unwrap(), Hold::Moved);
    let m = BusMessage {
        epoch: Some(took.binding.epoch),
        ..m
    };
    assert_eq!(s.bus.hold(&m).await.unwrap(), Hold::Held);
    assert_eq!(s.bus.take_held(a.id).await.unwrap().len(), 1);
    assert_eq!(
        s.registry
            .refresh(&n1, &[took.binding, b])
            .await
            .unwrap()
            .renewed,
        2
    );
    assert!(s.registry.locate(a.id).await.unwrap().is_some());
    assert_eq!(
        s.state(took.binding).await,
        CallState::InCall { peer: b.id }
    );
    assert!(s.bus.send(&n1, &m).await.unwrap());
    assert!(matches!(inbox.next().await, Some(BusEvent::Message(_))));
    s.registry
        .detach(b, Instant::now(), Duration::from_secs(30))
        .await
        .unwrap();
    assert!(s.registry.expire(b).await.unwrap().is_some());
    s.registry.release(took.binding).await.unwrap();
    assert!(s.bus.take_orphans(10).await.unwrap().is_empty());

    // And nothing else: no other keys, no admin commands, no other channels.
    let mut raw = s.raw.clone();
    let other: redis::RedisResult<Option<String>> = raw.get("session:42").await;
    let noperm = |e: redis::RedisError| e.code() == Some("NOPERM");
    assert!(noperm(other.unwrap_err()), "another application's key");
    let flush: redis::RedisResult<()> = redis::cmd("FLUSHALL").query_async(&mut raw).await;
    assert!(noperm(flush.unwrap_err()), "FLUSHALL");
    let eval: redis::RedisResult<()> = redis::cmd("EVAL")
        .arg("return 1")
        .arg(0)
        .query_async(&mut raw)
        .await;
    assert!(noperm(eval.unwrap_err()), "no ad-hoc scripts");
    let publish: redis::RedisResult<i64> = raw.publish("other", "x").await;
    assert!(noperm(publish.unwrap_err()), "another channel");
}

#[tokio::test]
async fn a_full_redis_refuses_new_ids_as_unavailable_and_keeps_every_existing_one() {
    // `maxmemory` with `noeviction` (Redis's default policy, the one docs/SECURITY.md asks for):
    // when full, writes fail instead of registry keys being evicted silently.
    let Some(redis) =
        RedisServer::start_configured(&["--maxmemory", "3mb", "--maxmemory-policy", "noeviction"])
    else {
        return;
    };
    let url = redis.url();
    let s = setup_on(
        redis,
        &url,
        Duration::from_secs(60),
        Duration::from_secs(30),
    )
    .await;
    let mut claimed = Vec::new();
    let refused = loop {
        match s.registry.claim(&node("n1"), Instant::now()).await {
            Ok(claim) => claimed.push(claim.binding),
            Err(e) => break e,
        }
        assert!(claimed.len() < 100_000, "3 MB never filled");
    };
    assert_eq!(refused, RegisterError::Unavailable);
    assert!(claimed.len() > 1_000, "only {} IDs fit", claimed.len());
    // Reads and renewals still work; nothing was evicted.
    let refreshed = s.registry.refresh(&node("n1"), &claimed).await.unwrap();
    assert_eq!(refreshed.renewed, claimed.len());
    let m = BusMessage {
        kind: BusKind::Deliver,
        call: None,
        to: claimed[0].id,
        epoch: None,
        origin: None,
        server_kind: ServerKind::IceCandidate,
        frame: Bytes::from(vec![b'x'; 512]),
    };
    assert_eq!(
        s.bus.hold(&m).await,
        Err(Unavailable),
        "a full Redis holds nothing more"
    );
}

/// Routes over the setup's registry and bus.
fn routes(s: &Setup, ttl: Duration) -> Routes {
    Routes::new(
        s.registry.clone(),
        s.bus.clone(),
        RouteSettings { max_routes: 2, ttl },
    )
}

/// An envelope relaying an ICE candidate from `from`.
fn candidate(from: ClientId, n: usize) -> Envelope {
    Envelope::from_parts(
        ServerKind::IceCandidate,
        format!(r#"{{"type":"ice-candidate","n":{n}}}"#).into_bytes(),
        Some(Origin {
            from,
            kind: MessageKind::IceCandidate,
        }),
    )
}

#[tokio::test]
async fn a_cached_route_costs_one_publish_and_no_registry_read_per_message() {
    let Some(s) = setup().await else { return };
    let n2 = node("n2");
    let mut inbox = s.bus.subscribe(&n2, 64);
    assert!(matches!(
        inbox.next().await,
        Some(BusEvent::Subscribed { .. })
    ));
    let (a, _) = s.claim("n1").await;
    let (b, _) = s.claim("n2").await;
    let routes = routes(&s, Duration::from_secs(60));
    let called = CallState::Called { peer: a.id };
    assert_eq!(
        routes.deliver(b.id, Some(called), candidate(a.id, 0)).await,
        BusDelivery::Delivered
    );
    match inbox.next().await {
        Some(BusEvent::Message(m)) => {
            assert_eq!((m.to, m.epoch, m.call), (b.id, Some(b.epoch), Some(called)));
            assert_eq!(&m.frame[..], br#"{"type":"ice-candidate","n":0}"#);
        }
        other => panic!("expected the message, got {other:?}"),
    }
    let (reads, publishes) = (
        command_calls(&s, "hmget").await,
        command_calls(&s, "publish").await,
    );
    for n in 1..=20 {
        assert_eq!(
            routes.deliver(b.id, None, candidate(a.id, n)).await,
            BusDelivery::Delivered
        );
    }
    assert_eq!(
        command_calls(&s, "hmget").await - reads,
        0,
        "no registry read"
    );
    assert_eq!(
        command_calls(&s, "publish").await - publishes,
        20,
        "one PUBLISH each"
    );
    for n in 1..=20 {
        match inbox.next().await {
            Some(BusEvent::Message(m)) => {
                assert_eq!(m.frame, format!(r#"{{"type":"ice-candidate","n":{n}}}"#))
            }
            other => panic!("expected message {n}, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn messages_for_a_dead_nodes_or_a_reserved_id_are_held_and_a_moved_id_is_chased() {
    let Some(s) = setup().await else { return };
    let (a, _) = s.claim("n1").await;
    let routes = routes(&s, Duration::from_secs(60));
    assert_eq!(
        routes
            .deliver(ClientId::new(123_456_789), None, candidate(a.id, 0))
            .await,
        BusDelivery::NoSuchClient
    );

    // b is live on n2, which nobody runs (it died): held for b's resume.
    let (b, b_token) = s.claim("n2").await;
    assert_eq!(
        routes.deliver(b.id, None, candidate(a.id, 1)).await,
        BusDelivery::Held
    );
    // c is reserved: held without a PUBLISH.
    let (c, _) = s.claim("n2").await;
    s.registry
        .detach(c, Instant::now(), Duration::from_secs(30))
        .await
        .unwrap();
    let publishes = command_calls(&s, "publish").await;
    assert_eq!(
        routes.deliver(c.id, None, candidate(a.id, 2)).await,
        BusDelivery::Held
    );
    assert_eq!(command_calls(&s, "publish").await, publishes);

    // b resumes on n3 (running) while a's node still caches "b live on n2": the hold answers
    // that the epoch moved, the route is read again, and the message reaches n3.
    let n3 = node("n3");
    let mut inbox = s.bus.subscribe(&n3, 16);
    assert!(matches!(
        inbox.next().await,
        Some(BusEvent::Subscribed { .. })
    ));
    let (fresh, _) = s.claim("n3").await;
    let took = s
        .registry
        .resume(fresh, b.id, &b_token, &n3, Instant::now())
        .await
        .unwrap();
    let held = s.bus.take_held(b.id).await.unwrap();
    assert_eq!(held.len(), 1, "what arrived while b was away");
    assert_eq!(
        routes.deliver(b.id, None, candidate(a.id, 3)).await,
        BusDelivery::Delivered
    );
    match inbox.next().await {
        Some(BusEvent::Message(m)) => assert_eq!(m.epoch, Some(took.binding.epoch)),
        other => panic!("expected the message, got {other:?}"),
    }

    // A full held stream is reported, not trimmed; a freed ID is no such client.
    for n in 0..3 {
        assert_eq!(
            routes.deliver(c.id, None, candidate(a.id, n)).await,
            BusDelivery::Held
        );
    }
    assert_eq!(
        routes.deliver(c.id, None, candidate(a.id, 9)).await,
        BusDelivery::Dropped(DropReason::QueueFull)
    );
    s.registry.expire(c).await.unwrap();
    assert_eq!(
        routes.deliver(c.id, None, candidate(a.id, 10)).await,
        BusDelivery::NoSuchClient
    );
    assert!(routes.len() <= 2, "the cache is bounded: {}", routes.len());
}

#[tokio::test]
async fn routes_answer_unavailable_when_redis_is_down() {
    let Some(mut s) = setup().await else { return };
    let (a, _) = s.claim("n1").await;
    let (b, _) = s.claim("n2").await;
    let routes = routes(&s, Duration::from_secs(60));
    s.redis.stop();
    let started = Instant::now();
    assert_eq!(
        routes.deliver(b.id, None, candidate(a.id, 0)).await,
        BusDelivery::Unavailable
    );
    assert!(started.elapsed() < TIMEOUT * 2 + SLACK);
}

#[tokio::test]
async fn a_cluster_wide_budget_bounds_what_all_reserved_ids_together_can_hold() {
    let grace = Duration::from_millis(300);
    let Some(s) = setup_with(Duration::from_secs(60), grace).await else {
        return;
    };
    // Per ID 1 KiB, all IDs together 2 KiB: three 800-byte messages for three IDs do not fit.
    let bus = RedisBus::new(
        s.client.clone(),
        manager(&s.client).await,
        BusSettings {
            held_messages: 4,
            held_bytes: 1024,
            held_bytes_total: 2048,
            grace,
            timeout: TIMEOUT,
        },
    );
    let mut ids = Vec::new();
    for _ in 0..3 {
        let (x, _) = s.claim("n1").await;
        s.registry
            .detach(x, Instant::now(), Duration::from_secs(30))
            .await
            .unwrap();
        ids.push(x);
    }
    let big = |to: Binding| BusMessage {
        kind: BusKind::Deliver,
        call: None,
        to: to.id,
        epoch: Some(to.epoch),
        origin: None,
        server_kind: ServerKind::IceCandidate,
        frame: Bytes::from(vec![b'x'; 800]),
    };
    assert_eq!(bus.hold(&big(ids[0])).await.unwrap(), Hold::Held);
    assert_eq!(bus.hold(&big(ids[1])).await.unwrap(), Hold::Held);
    assert_eq!(
        bus.hold(&big(ids[2])).await.unwrap(),
        Hold::Dropped(DropReason::ServerBusy),
        "the third would pass 2 KiB held in all"
    );
    s.assert_every_key_expires("the budget's counters").await;
    // The budget comes back once the windows that counted those bytes have passed.
    eventually(Duration::from_secs(10), "the budget frees up", || async {
        bus.hold(&big(ids[2])).await.unwrap() == Hold::Held
    })
    .await;
}

#[tokio::test]
async fn the_detaching_nodes_expiry_finds_the_reservation_even_late_and_resets_the_peer() {
    // The node's timer fires at the grace, here 150 ms late (a busy node): the key must still be
    // there, or expire finds nothing and the caller stays "calling" a ghost forever.
    let Some(s) = setup().await else { return };
    let grace = Duration::from_millis(300);
    let (a, _) = s.claim("n1").await;
    let (b, _) = s.claim("n2").await;
    s.registry
        .transition(b, a.id, Transition::Offer)
        .await
        .unwrap();
    s.registry.detach(a, Instant::now(), grace).await.unwrap();
    tokio::time::sleep(grace + Duration::from_millis(150)).await;
    let freed = s
        .registry
        .expire(a)
        .await
        .unwrap()
        .expect("still reserved for the node's expiry");
    assert_eq!(freed.peer, Some(b.id));
    assert_eq!(
        s.state(b).await,
        CallState::Idle,
        "the caller was told and reset"
    );
}

#[tokio::test]
async fn messages_held_for_an_id_that_expired_unresumed_are_swept_so_their_senders_are_told() {
    let grace = Duration::from_millis(300);
    let Some(s) = setup_with(Duration::from_secs(60), grace).await else {
        return;
    };
    let candidate = |to: Binding, from: ClientId, n: u8| BusMessage {
        kind: BusKind::Deliver,
        call: None,
        to: to.id,
        epoch: Some(to.epoch),
        origin: Some(Origin {
            from,
            kind: MessageKind::IceCandidate,
        }),
        server_kind: ServerKind::IceCandidate,
        frame: Bytes::from(vec![b'0' + n]),
    };
    let (sender, _) = s.claim("n2").await;
    // `orphan` was reserved on a node that then died: nobody calls expire or take_held for it.
    let (orphan, _) = s.claim("dead").await;
    s.registry
        .detach(orphan, Instant::now(), grace)
        .await
        .unwrap();
    // `resumed` is taken back in time: its messages are replayed, never swept.
    let (resumed, token) = s.claim("dead").await;
    s.registry
        .detach(resumed, Instant::now(), grace)
        .await
        .unwrap();
    // `waiting` is reserved for longer: not due yet.
    let (waiting, _) = s.claim("n3").await;
    s.registry
        .detach(waiting, Instant::now(), Duration::from_secs(30))
        .await
        .unwrap();
    for n in 0..2 {
        for to in [orphan, resumed, waiting] {
            assert_eq!(
                s.bus.hold(&candidate(to, sender.id, n)).await.unwrap(),
                Hold::Held
            );
        }
    }
    s.assert_every_key_expires("holds with the sweep's index")
        .await;
    let (fresh, _) = s.claim("n4").await;
    s.registry
        .resume(fresh, resumed.id, &token, &node("n4"), Instant::now())
        .await
        .unwrap();
    assert_eq!(s.bus.take_held(resumed.id).await.unwrap().len(), 2);

    let deadline = Instant::now() + Duration::from_secs(10);
    let mut swept = Vec::new();
    while swept.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the orphan's messages were never swept"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        swept.extend(s.bus.take_orphans(100).await.unwrap());
    }
    assert_eq!(swept.len(), 1, "only the orphan: {swept:?}");
    let (id, messages) = &swept[0];
    assert_eq!(*id, orphan.id);
    assert_eq!(
        messages
            .iter()
            .map(|m| m.origin.unwrap().from)
            .collect::<Vec<_>>(),
        [sender.id, sender.id],
        "each sender is known, to be told"
    );
    assert!(s.bus.take_orphans(100).await.unwrap().is_empty(), "once");
    assert_eq!(
        s.bus.take_held(waiting.id).await.unwrap().len(),
        2,
        "not swept while resumable"
    );
}

/// A command connection whose next successful answer is lost after Redis ran the command, as
/// when a script's answer times out on its way back.
#[derive(Clone)]
struct LosesAnAnswer {
    /// The real connection.
    inner: ConnectionManager,
    /// Set: the next answer (not an error) is dropped and a timeout returned instead.
    lose: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl redis::aio::ConnectionLike for LosesAnAnswer {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        Box::pin(async move {
            let value = self.inner.req_packed_command(cmd).await?;
            if !matches!(value, redis::Value::ServerError(_))
                && self.lose.swap(false, std::sync::atomic::Ordering::SeqCst)
            {
                let lost = std::io::Error::new(std::io::ErrorKind::TimedOut, "answer lost");
                return Err(redis::RedisError::from(lost));
            }
            Ok(value)
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        self.inner.req_packed_commands(pipeline, offset, count)
    }

    fn get_db(&self) -> i64 {
        self.inner.get_db()
    }
}

/// Issue 13, gap 4: the resuming node's read of the held stream is retry-safe. Redis runs the
/// read and its answer is lost (a timeout): read again, every message is still there; the trim
/// after delivery deletes only what was read, so a message held after the read stays. The old
/// `take_held` deleted in the same step, so a lost answer lost the messages and their senders were
/// never told: shown here too.
#[tokio::test]
async fn a_held_read_whose_answer_is_lost_reads_everything_again_and_trims_only_what_was_read() {
    let Some(s) = setup().await else { return };
    let (a, token) = s.claim("n1").await;
    let (b, _) = s.claim("n2").await;
    s.registry
        .detach(a, Instant::now(), Duration::from_secs(30))
        .await
        .unwrap();
    let message = |n: usize, epoch: u64| BusMessage {
        kind: BusKind::Deliver,
        call: None,
        to: a.id,
        epoch: Some(epoch),
        origin: Some(Origin {
            from: b.id,
            kind: MessageKind::IceCandidate,
        }),
        server_kind: ServerKind::IceCandidate,
        frame: Bytes::from(format!("{{\"n\":{n}}}")),
    };
    for n in 0..3 {
        assert_eq!(s.bus.hold(&message(n, a.epoch)).await.unwrap(), Hold::Held);
    }
    let (c, _) = s.claim("n3").await;
    let took = s
        .registry
        .resume(c, a.id, &token, &node("n3"), Instant::now())
        .await
        .unwrap();
    let lose = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flaky = RedisBus::new(
        s.client.clone(),
        LosesAnAnswer {
            inner: manager(&s.client).await,
            lose: lose.clone(),
        },
        BusSettings {
            held_messages: 4,
            held_bytes: 1024,
            held_bytes_total: 1 << 20,
            grace: Duration::from_secs(30),
            timeout: TIMEOUT,
        },
    );
    // Loads the scripts; reading changes nothing.
    assert_eq!(
        flaky.read_held(took.binding).await.unwrap().messages.len(),
        3
    );
    lose.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(flaky.read_held(took.binding).await.err(), Some(Unavailable));
    let read = flaky.read_held(took.binding).await.unwrap();
    let expected: Vec<BusMessage> = (0..3).map(|n| message(n, a.epoch)).collect();
    assert_eq!(read.messages, expected, "a lost answer loses nothing");
    // One arrives between the read and the trim: it stays, and is read next time.
    assert_eq!(
        s.bus.hold(&message(3, took.binding.epoch)).await.unwrap(),
        Hold::Held
    );
    flaky
        .trim_held(a.id, read.cursor.as_deref().unwrap())
        .await
        .unwrap();
    let rest = flaky.read_held(took.binding).await.unwrap();
    assert_eq!(rest.messages, vec![message(3, took.binding.epoch)]);
    // Only the ID's holder reads: a reader at the old epoch gets nothing.
    assert!(flaky.read_held(a).await.unwrap().messages.is_empty());
    flaky
        .trim_held(a.id, rest.cursor.as_deref().unwrap())
        .await
        .unwrap();
    let mut raw = s.raw.clone();
    let exists: bool = raw.exists(format!("cg:held:{}", a.id)).await.unwrap();
    assert!(!exists, "trimmed to nothing, the stream is gone");

    // What the old take-and-delete did with a lost answer: the messages are gone for good.
    assert_eq!(
        s.bus.hold(&message(4, took.binding.epoch)).await.unwrap(),
        Hold::Held
    );
    assert!(flaky.take_held(a.id).await.unwrap().len() == 1);
    assert_eq!(
        s.bus.hold(&message(5, took.binding.epoch)).await.unwrap(),
        Hold::Held
    );
    lose.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(flaky.take_held(a.id).await.err(), Some(Unavailable));
    assert!(
        flaky.take_held(a.id).await.unwrap().is_empty(),
        "take_held's lost answer lost the message"
    );
}

#[tokio::test]
async fn an_unanswered_transition_is_made_certain_and_a_late_copy_of_a_fenced_one_is_refused() {
    let Some(s) = setup().await else { return };
    let (a, _) = s.claim("n1").await;
    let (b, _) = s.claim("n2").await;
    // Operation 5 never reached Redis: resolving it fences it off, and its late copy is refused.
    assert_eq!(
        s.registry.resolve(a, 5).await,
        Ok(Some(Resolved::NotApplied(CallState::Idle)))
    );
    assert_eq!(
        s.registry
            .transition_op(a, b.id, Transition::Offer, Some(5))
            .await,
        Err(TransitionError::Unavailable)
    );
    assert_eq!(s.state(a).await, CallState::Idle);
    assert_eq!(s.state(b).await, CallState::Idle);
    // Operation 6 ran: resolving says so, with the state it left; a copy of it does not run twice.
    let calling = CallState::Calling { peer: b.id };
    assert_eq!(
        s.registry
            .transition_op(a, b.id, Transition::Offer, Some(6))
            .await,
        Ok(calling)
    );
    assert_eq!(
        s.registry.resolve(a, 6).await,
        Ok(Some(Resolved::Applied(calling)))
    );
    assert_eq!(
        s.registry
            .transition_op(a, b.id, Transition::Cancel, Some(6))
            .await,
        Err(TransitionError::Unavailable)
    );
    assert_eq!(s.state(a).await, calling);
    // A stale binding has nothing to resolve.
    let gone = Binding {
        id: a.id,
        epoch: a.epoch + 1000,
    };
    assert_eq!(s.registry.resolve(gone, 7).await, Ok(None));
    s.assert_every_key_expires("resolve").await;
}

#[tokio::test]
async fn a_write_back_restores_lost_ids_with_call_and_token_and_replaces_a_call_made_meanwhile() {
    let Some(s) = setup().await else { return };
    let n1 = node("n1");
    let (x, x_token) = s.claim("n1").await;
    let (y, _) = s.claim("n1").await;
    let (z, _) = s.claim("n2").await;
    let digest = |t: &ResumeToken| callgate::cluster::registry::token_digest(t);
    // x's key is lost (Redis restarted, or its lease ran out while it was frozen); n1 decided
    // x and y are in a call; meanwhile n2 put y in a call with z.
    let mut raw = s.raw.clone();
    let _: () = raw.del(format!("cg:id:{}", x.id)).await.unwrap();
    s.registry
        .transition(z, y.id, Transition::Offer)
        .await
        .unwrap();
    let known = [
        Known {
            binding: x,
            token: digest(&x_token),
            call: CallState::InCall { peer: y.id },
            dirty: true,
        },
        Known {
            binding: y,
            token: String::new(),
            call: CallState::InCall { peer: x.id },
            dirty: true,
        },
    ];
    let done = s.registry.write_back(&n1, &known, 100).await.unwrap();
    assert_eq!((done.restored, done.written), (1, 1), "{done:?}");
    assert!(done.lost.is_empty());
    assert_eq!(
        done.displaced,
        [(y.id, z.id)],
        "z's call with y was replaced"
    );
    assert_eq!(s.state(x).await, CallState::InCall { peer: y.id });
    assert_eq!(s.state(y).await, CallState::InCall { peer: x.id });
    assert_eq!(s.state(z).await, CallState::Idle);
    // A late copy of an older operation of n1 is refused.
    assert_eq!(
        s.registry
            .transition_op(x, y.id, Transition::Hangup, Some(99))
            .await,
        Err(TransitionError::Unavailable)
    );
    s.assert_every_key_expires("write back").await;
    // The restored x keeps its token: it resumes on another node, call and all.
    let (fresh, _) = s.claim("n2").await;
    let took = s
        .registry
        .resume(fresh, x.id, &x_token, &node("n2"), Instant::now())
        .await
        .expect("resumed with the token put back");
    assert_eq!(took.call, CallState::InCall { peer: y.id });
    // A binding n1 no longer holds is reported lost and left alone.
    let done = s.registry.write_back(&n1, &known[..1], 101).await.unwrap();
    assert_eq!(done.lost, [x]);
    assert_eq!(
        s.registry.locate(x.id).await.unwrap().unwrap().node,
        node("n2")
    );
}

#[tokio::test]
async fn whether_many_peers_are_still_held_is_one_exists_each_in_one_pipeline() {
    let Some(s) = setup().await else { return };
    let (live, _) = s.claim("n1").await;
    let (reserved, _) = s.claim("n2").await;
    let (left, _) = s.claim("n2").await;
    s.registry
        .detach(reserved, Instant::now(), Duration::from_secs(30))
        .await
        .unwrap();
    s.registry.release(left).await.unwrap();
    let never = ClientId::new(123_456_789);
    let ids = [live.id, reserved.id, left.id, never, live.id];
    assert_eq!(
        s.registry.held(&ids).await,
        Ok(vec![true, true, false, false, true])
    );
    assert_eq!(s.registry.held(&[]).await, Ok(vec![]));
    let before = command_calls(&s, "exists").await;
    let many: Vec<ClientId> = (0..500).map(|n| ClientId::new(100_000_000 + n)).collect();
    assert_eq!(s.registry.held(&many).await.unwrap().len(), 500);
    assert_eq!(command_calls(&s, "exists").await - before, 500);
}

#[tokio::test]
async fn a_call_decided_during_an_outage_whose_peer_resumed_elsewhere_meanwhile_is_reset_and_reported(
) {
    let Some(s) = setup().await else { return };
    let n1 = node("n1");
    let (x, x_token) = s.claim("n1").await;
    let (y, y_token) = s.claim("n1").await;
    // n1 put x and y in a call while Redis was out; y resumed on n2 before n1 wrote it back, so
    // Redis gave n2 y's state from before the outage (idle).
    let (fresh, _) = s.claim("n2").await;
    s.registry
        .resume(fresh, y.id, &y_token, &node("n2"), Instant::now())
        .await
        .unwrap();
    let digest = callgate::cluster::registry::token_digest(&x_token);
    let known = [Known {
        binding: x,
        token: digest,
        call: CallState::InCall { peer: y.id },
        dirty: true,
    }];
    let done = s.registry.write_back(&n1, &known, 10).await.unwrap();
    assert_eq!(done.broken, [(x.id, y.id)], "{done:?}");
    assert_eq!(s.state(x).await, CallState::Idle, "the call cannot stand");
    // An idle state has no peer to check.
    let known = [Known {
        binding: x,
        token: String::new(),
        call: CallState::Idle,
        dirty: true,
    }];
    let done = s.registry.write_back(&n1, &known, 11).await.unwrap();
    assert!(done.broken.is_empty(), "{done:?}");
}

//! Scale-out: several callgate nodes behind one load balancer share who-is-where through Redis.
//!
//! Without `redis-url` none of this runs: a single node keeps everything in memory. With it, every
//! node opens one Redis connection ([`redis`]), writes its heartbeat and reads the others'
//! ([`nodes`]), and marks itself draining first when it shuts down. The client registry
//! ([`registry`]) and the bus between nodes ([`bus`], [`route`]) run on that connection.
//!
//! # Layout
//!
//! | file | what it holds |
//! |---|---|
//! | `redis.rs` | the one shared Redis connection: reconnects by itself, times out and times every command, `callgate_redis_*` metrics, one log line per outage |
//! | `nodes.rs` | membership: this node's heartbeat, advertised address, `draining` flag and bus payload version read; the other nodes seen alive, and which of them read batches; stale nodes removed |
//! | `registry.rs` | [`registry::RedisRegistry`]: each client ID's node, epoch, resume token and call state, one Lua script per operation (`lua/`) |
//! | `bus.rs` | [`bus::RedisBus`]: messages to IDs on other nodes (`PUBLISH`), held for reserved IDs (capped streams), the orphan sweep, a node's self-healing subscription |
//! | `publish.rs` | [`publish::Publisher`]: one sender task per destination node; what queues while 4 `PUBLISH`es to it are in flight goes in the next one, as one batch payload — to a node that advertises reading batches; any other gets one `PUBLISH` per message |
//! | `route.rs` | [`route::Routes`]: delivery to an ID on another node — cached route, one `PUBLISH`, or the held stream |
//! | `types.rs` | the registry's vocabulary (hubcore's types) plus `Unavailable` and `BindingError` for the Redis code |
//! | `calls.rs` | [`calls::ClusterRegistry`]: the hub's `Registry` over Redis, with this node's live IDs' call states cached so relays cost no round trip |
//! | `link/` | [`link::Links`]: direct, authenticated, encrypted TCP links between nodes (`cluster-listen`) carrying what `PUBLISH` carries, with no Redis round trip; Redis stays the path to a node without one (see its own Layout) |
//! | `behind.rs` | [`behind::Behind`]: inbox messages for an ID whose dropped client's log is being flushed, queued per ID behind that flush so other IDs' messages go on |
//! | `node.rs` | a node's router over Redis ([`node::NodeRouter`]), its `Bus`, and its tasks: inbox (deliver, hold, kick), lease refresh and peer-gone check, orphan sweep |
//!
//! Every key this module writes has a TTL or a bound (see docs/OPERATIONS.md, "Running several
//! nodes", and docs/SECURITY.md, "Redis"). Dependencies point down: `cluster` uses `config`,
//! `metrics`, `shutdown` and `signaling`'s types; nothing in `signaling` or `turn` imports it.

pub mod behind;
pub mod bus;
pub mod calls;
pub mod link;
pub mod node;
pub mod nodes;
pub mod publish;
pub mod redis;
pub mod registry;
pub mod route;
pub mod types;

//! Scale-out: several callgate nodes behind one load balancer share who-is-where through Redis.
//!
//! Without `redis-url` none of this runs: a single node keeps everything in memory. With it, every
//! node opens one Redis connection ([`redis`]), writes its heartbeat and reads the others'
//! ([`nodes`]), and marks itself draining first when it shuts down.
//!
//! # Layout
//!
//! | file | what it holds |
//! |---|---|
//! | `redis.rs` | the one shared Redis connection: reconnects by itself, times out and times every command, `callgate_redis_*` metrics, one log line per outage |
//! | `nodes.rs` | membership: this node's heartbeat, advertised address and `draining` flag; the other nodes seen alive; stale nodes removed |
//!
//! Every key this module writes has a TTL or a bound (see docs/OPERATIONS.md, "Running several
//! nodes"). Dependencies point down: `cluster` uses `config`, `metrics` and `shutdown`; nothing in
//! `signaling` or `turn` imports it.

pub mod nodes;
pub mod redis;

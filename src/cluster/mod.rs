//! Scale-out: several callgate nodes behind one load balancer share who-is-where through Redis.
//!
//! # Layout
//!
//! | file | what it holds |
//! |---|---|
//! | `registry.rs` | [`registry::RedisRegistry`]: each client ID's node, epoch, resume token and call state, one Lua script per operation (`lua/`) |
//! | `bus.rs` | [`bus::RedisBus`]: messages to IDs on other nodes (`PUBLISH`), held for reserved IDs (capped streams), a node's self-healing subscription |
//! | `route.rs` | [`route::Routes`]: delivery to an ID on another node — cached route, one `PUBLISH`, or the held stream |
//! | `types.rs` | the registry's vocabulary from the cluster design, until `signaling/registry.rs` provides it |
//!
//! Every key this module writes has a TTL or a bound (see docs/SECURITY.md, "Redis").

pub mod bus;
pub mod registry;
pub mod route;
pub mod types;

//! The embedded TURN relay around the `turn` crate.

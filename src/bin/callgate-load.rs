//! `callgate-load`: drives a running callgate over real WSS, as browsers do, and reports what the
//! gateway sustained. See `docs/PERFORMANCE.md` for how to run it and what it measures.
//!
//! The code lives in `src/load/` (declared here, not from `lib.rs`: it is a tool, not part of the
//! server).

#[path = "../load/mod.rs"]
mod load;

fn main() -> std::process::ExitCode {
    load::main()
}

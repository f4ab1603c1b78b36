//! The shape of `src/turn/` (issue 11, "Structure"): its files import each other without a circle,
//! `turn/mod.rs`'s Layout table names every file and draws every arrow, and `gate.rs` — the
//! decisions — reads no clock, holds no socket and no tokio primitive, so it stays testable,
//! fuzzable and benchable without I/O.
//!
//! Read from the source, not the compiler: an arrow is a `super::x` or `crate::turn::x` path in a
//! file's code (comments and `#[cfg(test)]` modules do not count: tests may reach anywhere). Cheap,
//! and fails the moment an arrow runs back up.
//!
//! `CALLGATE_TURN_SRC=<dir>` checks another tree (e.g. an old commit's `src/turn`).

#[path = "support/layout.rs"]
mod layout;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use layout::find_cycle;

fn turn_dir() -> PathBuf {
    match std::env::var_os("CALLGATE_TURN_SRC") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/turn"),
    }
}

/// Every file of the module but `mod.rs`, by module name, with its code: comment lines and
/// everything from the first `#[cfg(test)]` on left out.
fn modules() -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(turn_dir()).expect("src/turn") {
        let path = entry.expect("dir entry").path();
        let Some(name) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        if path.extension().is_none_or(|e| e != "rs") || name == "mod" {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("readable source");
        let code: Vec<&str> = text
            .lines()
            .take_while(|l| l.trim() != "#[cfg(test)]")
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect();
        out.insert(name.to_owned(), code.join("\n"));
    }
    out
}

/// The module names `code` reaches through `super::name` or `crate::turn::name` (also inside
/// `use super::{a, b}` groups).
fn imports(code: &str, names: &BTreeSet<String>) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for prefix in ["super::", "crate::turn::"] {
        for (at, _) in code.match_indices(prefix) {
            let rest = &code[at + prefix.len()..];
            let targets: Vec<&str> = match rest.strip_prefix('{') {
                Some(group) => group[..group.find('}').unwrap_or(group.len())]
                    .split(',')
                    .map(|t| t.trim())
                    .collect(),
                None => vec![rest],
            };
            for t in targets {
                let ident: String = t
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if names.contains(&ident) {
                    found.insert(ident);
                }
            }
        }
    }
    found
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let modules = modules();
    let names: BTreeSet<String> = modules.keys().cloned().collect();
    modules
        .iter()
        .map(|(name, code)| {
            let mut to = imports(code, &names);
            to.remove(name);
            (name.clone(), to)
        })
        .collect()
}

#[test]
fn the_checker_finds_a_circle_and_accepts_layers() {
    let g = |edges: &[(&str, &str)]| {
        let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (a, b) in edges {
            g.entry(a.to_string()).or_default().insert(b.to_string());
            g.entry(b.to_string()).or_default();
        }
        g
    };
    let layered = g(&[("relay", "gate"), ("relay", "udp"), ("udp", "gate")]);
    assert_eq!(find_cycle(&layered), None);
    let circle = g(&[("gate", "jumbo"), ("jumbo", "stream"), ("stream", "gate")]);
    assert_eq!(
        find_cycle(&circle).unwrap(),
        ["gate", "jumbo", "stream", "gate"]
    );
    let names: BTreeSet<String> = ["gate", "peer", "stats"].map(String::from).into();
    assert_eq!(
        imports(
            "use super::{gate::Gate, stats};\nlet x = crate::turn::peer::f();",
            &names
        ),
        names
    );
}

#[test]
fn turn_files_import_each_other_without_a_circle() {
    let graph = graph();
    assert!(graph.len() > 10, "read the module: {graph:?}");
    if let Some(cycle) = find_cycle(&graph) {
        panic!(
            "src/turn has an import circle: {}\nkeep decisions in gate.rs and sockets at the \
             edge; the arrows are drawn in turn/mod.rs's Layout table",
            cycle.join(" → ")
        );
    }
}

#[test]
fn the_layout_table_names_every_file_and_its_arrows() {
    let graph = graph();
    let table = std::fs::read_to_string(turn_dir().join("mod.rs")).expect("mod.rs");
    for (name, to) in &graph {
        let row = table
            .lines()
            .find(|l| l.starts_with(&format!("//! | `{name}.rs` |")))
            .unwrap_or_else(|| panic!("turn/mod.rs's Layout table has no row for {name}.rs"));
        let drawn: BTreeSet<String> = row
            .rsplit('|')
            .nth(1)
            .unwrap_or("")
            .split(',')
            .map(|s| s.trim().trim_matches('`').to_owned())
            .filter(|s| !s.is_empty() && s != "—")
            .collect();
        assert_eq!(
            &drawn, to,
            "the Layout row of {name}.rs draws other arrows than its code has"
        );
    }
}

#[test]
fn the_gate_reads_no_clock_and_holds_no_socket() {
    let modules = modules();
    let gate = &modules["gate"];
    for io in [
        "Instant::now",
        "SystemTime::now",
        "tokio",
        "UdpSocket",
        "TcpStream",
        "TcpListener",
        "std::net::Udp",
        "std::fs",
        ".await",
    ] {
        assert!(!gate.contains(io), "gate.rs does I/O or waits: {io}");
    }
}

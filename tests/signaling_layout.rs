//! The shape of `src/signaling/` (issue 13, "The architecture step"): its files import each other
//! without a circle, nothing in it imports the layers above it (`http`, `metrics`, `server`) or
//! beside it (`turn`, `acme`) — metrics reads signaling's observer hooks, `http::websocket` does
//! the upgrade — `signaling/mod.rs`'s Layout table names every file, and the core (rules, shared
//! table, local table, router) reads no clock and holds no socket.
//!
//! Read from the source, not the compiler: an arrow is a `super::x` or `crate::signaling::x` path
//! in a file's code (comment lines and everything from the first `#[cfg(test)]` on do not count:
//! tests may reach anywhere).
//!
//! `CALLGATE_SIGNALING_SRC=<dir>` checks another tree (e.g. an old commit's `src/signaling`).

#[path = "support/layout.rs"]
mod layout;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use layout::find_cycle;

fn signaling_dir() -> PathBuf {
    match std::env::var_os("CALLGATE_SIGNALING_SRC") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/signaling"),
    }
}

/// The code of one file: comment lines and everything from the first `#[cfg(test)]` on left out.
fn code_of(text: &str) -> String {
    text.lines()
        .take_while(|l| l.trim() != "#[cfg(test)]")
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every file of the module, `mod.rs` included, by module name, with its code.
fn modules() -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(signaling_dir()).expect("src/signaling") {
        let path = entry.expect("dir entry").path();
        let Some(name) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("readable source");
        out.insert(name.to_owned(), code_of(&text));
    }
    out
}

/// The names `code` reaches through one of `prefixes` (also inside `use x::{a, b}` groups) that
/// are in `names`.
fn imports(code: &str, prefixes: &[&str], names: &BTreeSet<String>) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for prefix in prefixes {
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

/// Who imports whom inside `src/signaling` (`mod.rs`, which only declares the files and the
/// limits, is left out of the graph).
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut modules = modules();
    modules.remove("mod");
    let names: BTreeSet<String> = modules.keys().cloned().collect();
    modules
        .iter()
        .map(|(name, code)| {
            let mut to = imports(code, &["super::", "crate::signaling::"], &names);
            to.remove(name);
            (name.clone(), to)
        })
        .collect()
}

/// The crate's top-level modules signaling must not import: the layers above it and its
/// neighbours.
const FORBIDDEN: [&str; 5] = ["http", "metrics", "server", "turn", "acme"];

#[test]
fn the_checker_finds_circles_and_forbidden_arrows() {
    let g = |edges: &[(&str, &str)]| {
        let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (a, b) in edges {
            g.entry(a.to_string()).or_default().insert(b.to_string());
            g.entry(b.to_string()).or_default();
        }
        g
    };
    let layered = g(&[
        ("router", "hub"),
        ("router", "connections"),
        ("hub", "registry"),
    ]);
    assert_eq!(find_cycle(&layered), None);
    let circle = g(&[
        ("hub", "router"),
        ("router", "connections"),
        ("connections", "hub"),
    ]);
    assert_eq!(
        find_cycle(&circle).unwrap(),
        ["connections", "hub", "router", "connections"]
    );
    let forbidden: BTreeSet<String> = FORBIDDEN.map(String::from).into();
    let code = code_of(
        "//! see crate::http::x\nuse crate::{http::text_response, limits};\nlet m = crate::metrics::Metrics::new();\n#[cfg(test)]\nuse crate::turn::x;",
    );
    assert_eq!(
        imports(&code, &["crate::"], &forbidden),
        ["http", "metrics"].map(String::from).into()
    );
}

#[test]
fn signaling_imports_nothing_from_the_layers_above_it() {
    let forbidden: BTreeSet<String> = FORBIDDEN.map(String::from).into();
    let modules = modules();
    assert!(modules.len() > 10, "read the module: {:?}", modules.keys());
    for (name, code) in &modules {
        let found = imports(code, &["crate::"], &forbidden);
        assert!(
            found.is_empty(),
            "signaling/{name}.rs imports crate::{found:?}; arrows point down: `server` → `http` → \
             `signaling`, and `metrics` reads signaling's observer hooks"
        );
    }
}

#[test]
fn signaling_files_import_each_other_without_a_circle() {
    let graph = graph();
    if let Some(cycle) = find_cycle(&graph) {
        panic!(
            "src/signaling has an import circle: {}\nthe hub decides, the router applies, \
             connections and the registry hold state",
            cycle.join(" → ")
        );
    }
}

#[test]
fn the_layout_table_names_every_file() {
    let table = std::fs::read_to_string(signaling_dir().join("mod.rs")).expect("mod.rs");
    for name in graph().keys() {
        assert!(
            table
                .lines()
                .any(|l| l.starts_with(&format!("//! | `{name}.rs` |"))),
            "signaling/mod.rs's Layout table has no row for {name}.rs"
        );
    }
}

#[test]
fn the_core_reads_no_clock_and_holds_no_socket() {
    let modules = modules();
    for core in [
        "hub",
        "registry",
        "connections",
        "router",
        "bus",
        "delivery",
        "protocol",
    ] {
        let code = &modules[core];
        for io in [
            "Instant::now",
            "SystemTime::now",
            "tokio",
            "TcpStream",
            "UdpSocket",
            "std::fs",
            "hyper",
        ] {
            assert!(!code.contains(io), "signaling/{core}.rs does I/O: {io}");
        }
    }
}

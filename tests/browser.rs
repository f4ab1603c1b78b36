//! The web app in a real browser: runs the `tests/e2e` suite (node's test runner driving Debian's
//! Chromium through playwright-core) against this build of the `callgate` binary.
//!
//! It needs `node`, `/usr/bin/chromium` and `tests/e2e/node_modules` (`npm ci --prefix tests/e2e`).
//! Without them the test explains what is missing and passes, except in CI (`CI=true`), where a
//! missing tool is a failure: a browser suite that silently did not run proves nothing.

use std::path::Path;
use std::process::Command;

const CHROMIUM: &str = "/usr/bin/chromium";

/// What is missing to run the browser suite, in words a developer can act on.
fn missing_prerequisites(e2e: &Path) -> Vec<String> {
    let mut missing = Vec::new();
    let node = Command::new("node").arg("--version").output();
    if !matches!(&node, Ok(out) if out.status.success()) {
        missing.push("`node` is not on PATH (apt-get install nodejs npm)".to_owned());
    }
    if !Path::new(CHROMIUM).exists() {
        missing.push(format!(
            "{CHROMIUM} does not exist (apt-get install chromium)"
        ));
    }
    if !e2e.join("node_modules").join("playwright-core").exists() {
        missing.push(format!(
            "{}/node_modules is not installed (npm ci --prefix tests/e2e)",
            e2e.display()
        ));
    }
    missing
}

#[test]
fn the_web_app_works_in_a_real_browser() {
    let e2e = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("e2e");
    let missing = missing_prerequisites(&e2e);
    if !missing.is_empty() {
        let why = format!("the browser tests cannot run: {}", missing.join("; "));
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{why}");
        }
        eprintln!("skipping: {why}");
        return;
    }

    let output = Command::new("node")
        .args(["--test", "--test-reporter=spec"])
        .current_dir(&e2e)
        .env("CALLGATE_BIN", env!("CARGO_BIN_EXE_callgate"))
        .env("CHROMIUM_PATH", CHROMIUM)
        .output()
        .expect("node starts");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(
        output.status.success(),
        "the browser suite failed ({}); its output is above",
        output.status
    );
}

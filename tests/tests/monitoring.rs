//! `deploy/monitoring/`: the alert rules pass promtool's check and their unit tests, and every series the rules and
//! the dashboard query is one a running agent exports, with the labels they read.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::Value;
use sluice_agent::config::sources::yaml;
use sluice_tests::{
    metrics::{agent_with_traffic, documented_metrics},
    require_root, Topology,
};

/// Labels Prometheus gives every series from its scrape target (the PodMonitor's), not the agent.
const TARGET_LABELS: [&str; 5] = ["job", "instance", "pod", "container", "endpoint"];

fn monitoring() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/monitoring")
}

/// The `spec.groups` of the PrometheusRule: the rule groups as Prometheus reads them.
fn rule_groups() -> Value {
    let text = std::fs::read_to_string(monitoring().join("prometheus-rule.yaml")).unwrap();
    let mut documents = Vec::new();
    yaml::documents(&text, |document| documents.push(document.unwrap()));
    assert_eq!(documents[0]["kind"], "PrometheusRule");
    documents[0]["spec"]["groups"].clone()
}

fn run(command: &mut Command) -> String {
    let output = command.output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{command:?}:\n{text}");
    text
}

#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.yaml");
    std::fs::write(&rules, serde_json::json!({ "groups": rule_groups() }).to_string()).unwrap();
    std::fs::copy(monitoring().join("rules-test.yaml"), dir.path().join("rules-test.yaml")).unwrap();

    let checked = run(Command::new("promtool").args(["check", "rules"]).arg(&rules));
    assert!(checked.contains("SUCCESS: 7 rules found"), "{checked}");
    run(Command::new("promtool").args(["test", "rules"]).arg(dir.path().join("rules-test.yaml")));
}

/// Every PromQL expression the rules and the dashboard hold, with where it is.
fn expressions() -> Vec<(String, String)> {
    let mut found = Vec::new();
    for group in rule_groups().as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            found.push((format!("alert {}", rule["alert"]), rule["expr"].as_str().unwrap().to_owned()));
        }
    }
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(monitoring().join("dashboard.json")).unwrap()).unwrap();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            found.push((format!("panel {}", panel["title"]), target["expr"].as_str().unwrap().to_owned()));
        }
    }
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(query) = variable["query"]["query"].as_str() {
            found.push((format!("variable {}", variable["name"]), query.to_owned()));
        }
    }
    found
}

/// The metric names an expression reads (Sluice's and Istio's, and `up`).
fn names_in(expression: &str) -> BTreeSet<String> {
    expression
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|word| word.starts_with("istio_") || word.starts_with("sluice_") || *word == "up")
        .map(str::to_owned)
        .collect()
}

/// The label names an expression reads: in matchers (`{a="…"}`) and groupings (`by (a, b)`, `without (a)`).
fn labels_in(expression: &str) -> BTreeSet<String> {
    let mut labels = BTreeSet::new();
    for (at, _) in expression.match_indices('{') {
        let inside = expression[at + 1..].split('}').next().unwrap_or("");
        for matcher in inside.split(',') {
            let name = matcher.split(['=', '!']).next().unwrap_or("").trim();
            if !name.is_empty() {
                labels.insert(name.to_owned());
            }
        }
    }
    for keyword in ["by", "without"] {
        for (at, _) in expression.match_indices(keyword) {
            let after = expression[at + keyword.len()..].trim_start();
            let word_before =
                expression[..at].chars().next_back().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
            if word_before || !after.starts_with('(') {
                continue;
            }
            let list = after[1..].split(')').next().unwrap_or("");
            labels.extend(list.split(',').map(|label| label.trim().to_owned()).filter(|label| !label.is_empty()));
        }
    }
    labels
}

/// Each sample name in a scrape, with the label names its samples carry.
fn exported(scrape: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut families: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in scrape.lines().filter(|line| !line.starts_with('#') && !line.is_empty()) {
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let labels = families.entry(line[..name_end].to_owned()).or_default();
        if let Some(inside) = line[name_end..].strip_prefix('{').and_then(|rest| rest.split_once('}')) {
            labels.extend(
                inside.0.split("\",").filter_map(|pair| pair.split_once('=')).map(|(k, _)| k.trim().to_owned()),
            );
        }
    }
    families
}

#[test]
fn every_series_the_rules_and_the_dashboard_query_is_one_the_agent_exports() {
    require_root();
    let topology = Topology::new().unwrap();
    let (_agent, _config, _nginx, scrape) = agent_with_traffic(&topology);
    let exported = exported(&scrape);
    let documented = documented_metrics();
    for (place, expression) in expressions() {
        let mut readable: BTreeSet<String> = TARGET_LABELS.iter().map(|label| (*label).to_owned()).collect();
        for name in names_in(&expression) {
            if name == "up" {
                continue;
            }
            let labels = exported.get(&name).or_else(|| {
                // A family without series in this scrape: the table's word for it (and the name's registration is
                // checked by tests/tests/docs.rs).
                let scraped = exported.keys().any(|key| key.starts_with(name.trim_end_matches("_bucket")));
                (!scraped).then(|| documented.get(&name)).flatten()
            });
            let labels = labels.unwrap_or_else(|| panic!("{place} queries {name}, which the agent does not export"));
            readable.extend(labels.iter().cloned());
        }
        for label in labels_in(&expression) {
            assert!(readable.contains(&label), "{place} reads the label {label}, which its series lack: {expression}");
        }
    }
}

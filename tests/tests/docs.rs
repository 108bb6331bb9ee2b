//! The documentation is kept true by the code: the command-line reference is the agent's own help, every metric a
//! running agent exports is in the metrics table (and every one there is exported), every flag the pages name is
//! one the agent takes, and every link leads to a file and heading that exist.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use sluice_tests::{
    agent::binary,
    metrics::{agent_with_traffic, documented_metrics},
    require_root, Topology,
};

/// Set to rewrite `docs/cli.md` from the agent's help instead of comparing it.
const REWRITE: &str = "SLUICE_WRITE_DOCS";
/// The commands `docs/cli.md` documents, after `sluice`.
const COMMANDS: [&str; 8] = ["", "run", "check", "status", "routes", "observe", "cleanup", "version"];
/// Flags the pages name that belong to other programs (curl, cargo, `cargo xtask`).
const OTHER_PROGRAMS_FLAGS: [&str; 7] =
    ["--max-time", "--release", "--resolve", "--profile", "--test", "--time", "--minutes"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn help(command: &str) -> String {
    let mut sluice = Command::new(binary());
    sluice.args(command.split_whitespace()).arg("--help");
    let output = sluice.output().unwrap();
    assert!(output.status.success(), "sluice {command} --help: {output:?}");
    String::from_utf8(output.stdout).unwrap()
}

/// The pages a reader is sent to: the README and everything under docs/.
fn pages() -> Vec<(PathBuf, String)> {
    let mut paths = vec![root().join("README.md")];
    let mut docs: Vec<PathBuf> =
        std::fs::read_dir(root().join("docs")).unwrap().map(|entry| entry.unwrap().path()).collect();
    docs.sort();
    paths.extend(docs.into_iter().filter(|path| path.extension().is_some_and(|ext| ext == "md")));
    paths.into_iter().map(|path| (path.clone(), std::fs::read_to_string(&path).unwrap())).collect()
}

fn cli_reference() -> String {
    let mut page = String::from(
        "# Command line\n\nEvery command and flag of `sluice`, as its own `--help` prints them (this page is generated: \
         `SLUICE_WRITE_DOCS=1 cargo test -p sluice-tests --test docs` writes it again, and `cargo xtask test` fails \
         while it differs from the agent's help).\n",
    );
    for command in COMMANDS {
        let name = format!("sluice {command}");
        page.push_str(&format!("\n## `{}`\n\n```text\n{}```\n", name.trim(), help(command)));
    }
    page
}

#[test]
fn the_command_line_reference_is_the_agents_own_help() {
    let path = root().join("docs/cli.md");
    let expected = cli_reference();
    if std::env::var_os(REWRITE).is_some() {
        std::fs::write(&path, &expected).unwrap();
    }
    let written = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        written == expected,
        "docs/cli.md differs from `sluice --help`: run `{REWRITE}=1 cargo test -p sluice-tests --test docs`"
    );
}

#[test]
fn every_flag_the_pages_name_is_one_the_agent_takes() {
    let helps: String = COMMANDS.iter().map(|command| help(command)).collect();
    let taken = |flag: &str| {
        helps.match_indices(flag).any(|(at, _)| {
            let next = helps[at + flag.len()..].chars().next();
            next.is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '-'))
        })
    };
    for (path, text) in pages() {
        for flag in flags_in(&text) {
            assert!(
                taken(&flag) || OTHER_PROGRAMS_FLAGS.contains(&flag.as_str()),
                "{} names {flag}, which no sluice command takes",
                path.display()
            );
        }
    }
}

/// `--word` occurrences that are not part of a longer word.
fn flags_in(text: &str) -> BTreeSet<String> {
    let mut flags = BTreeSet::new();
    for (at, _) in text.match_indices("--") {
        let before = text[..at].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '-') {
            continue;
        }
        let name: String =
            text[at + 2..].chars().take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-').collect();
        if name.starts_with(|c: char| c.is_ascii_lowercase()) {
            flags.insert(format!("--{}", name.trim_end_matches('-')));
        }
    }
    flags
}

#[test]
fn every_link_leads_to_a_file_and_heading_that_exist() {
    for (path, text) in pages() {
        for target in links_in(&text) {
            if target.starts_with("http://") || target.starts_with("https://") {
                continue;
            }
            let (file, anchor) = target.split_once('#').unwrap_or((&target, ""));
            let file = if file.is_empty() { path.clone() } else { path.parent().unwrap().join(file) };
            assert!(file.exists(), "{} links to {target}, which does not exist", path.display());
            if !anchor.is_empty() {
                let headings = headings_of(&std::fs::read_to_string(&file).unwrap());
                assert!(headings.contains(anchor), "{}: no heading #{anchor} in {}", path.display(), file.display());
            }
        }
    }
}

/// The targets of `[text](target)` links.
fn links_in(text: &str) -> Vec<String> {
    text.match_indices("](")
        .filter_map(|(at, _)| text[at + 2..].split_once(')').map(|(target, _)| target.to_owned()))
        .filter(|target| !target.contains(' '))
        .collect()
}

/// The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces made hyphens.
fn headings_of(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|line| line.starts_with('#'))
        .map(|line| {
            let title = line.trim_start_matches('#').trim().to_lowercase();
            title
                .chars()
                .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
                .map(|c| if c == ' ' { '-' } else { c })
                .collect()
        })
        .collect()
}

#[test]
fn the_metrics_table_is_what_a_running_agent_exports() {
    require_root();
    let topology = Topology::new().unwrap();
    let (_agent, _config, _nginx, scrape) = agent_with_traffic(&topology);
    // Counters' samples are `name_total`, as the table lists them.
    let exported: BTreeSet<String> = scrape
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_once(' '))
        .map(
            |(name, kind)| {
                if kind == "counter" && !name.ends_with("_total") {
                    format!("{name}_total")
                } else {
                    name.into()
                }
            },
        )
        .collect();
    let documented: BTreeSet<String> = documented_metrics().into_keys().collect();
    assert!(exported.len() >= 20, "{scrape}");
    let undocumented: Vec<_> = exported.difference(&documented).collect();
    assert!(undocumented.is_empty(), "exported but not in docs/telemetry.md: {undocumented:?}");
    // What only some traffic fills (TLS refusals, authorization decisions…) is checked against what the agent
    // registers: each name in the table is one the agent's source names.
    let source = agent_source(&root().join("agent/src"));
    for name in &documented {
        let registered = name.strip_suffix("_total").unwrap_or(name);
        assert!(
            source.contains(&format!("\"{registered}\"")),
            "docs/telemetry.md lists {name}, which the agent does not register"
        );
    }
}

/// Every Rust file under `dir`, concatenated.
fn agent_source(dir: &Path) -> String {
    let mut text = String::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            text.push_str(&agent_source(&path));
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            text.push_str(&std::fs::read_to_string(&path).unwrap());
        }
    }
    text
}

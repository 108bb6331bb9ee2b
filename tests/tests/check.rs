//! `sluice check` on the corpus of valid and invalid resources: every invalid resource is rejected alone, with
//! the message Istio's validation would give, in the form `FILE: Kind ns/name: field: reason`.

use std::path::{Path, PathBuf};

fn corpus(dir: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(dir)
}

fn check(paths: &[PathBuf]) -> (bool, String) {
    let output = std::process::Command::new(sluice_tests::agent::binary())
        .arg("check")
        .args(paths)
        .output()
        .expect("running sluice check");
    (output.status.success(), String::from_utf8_lossy(&output.stdout).into_owned())
}

#[test]
fn the_valid_corpus_passes() {
    let (ok, output) = check(&[corpus("valid")]);
    assert!(ok, "{output}");
    assert!(output.contains("15 resources valid, 0 errors, 1 documents of other kinds not read"), "{output}");
}

#[test]
fn every_invalid_resource_is_rejected_with_its_field_and_reason() {
    for entry in std::fs::read_dir(corpus("invalid")).unwrap() {
        let file = entry.unwrap().path();
        let text = std::fs::read_to_string(&file).unwrap();
        let expected: Vec<&str> = text.lines().filter_map(|line| line.strip_prefix("# expect: ")).collect();
        assert!(!expected.is_empty(), "{} has no expect lines", file.display());

        let (ok, output) = check(std::slice::from_ref(&file));

        assert!(!ok, "{}: check passed:\n{output}", file.display());
        for message in &expected {
            let line = format!("{}: {message}", file.display());
            assert!(output.lines().any(|l| l.starts_with(&line)), "missing:\n{line}\nin:\n{output}");
        }
        let errors = output.lines().filter(|l| l.starts_with(&file.display().to_string())).count();
        assert_eq!(errors, expected.len(), "exactly the expected errors:\n{output}");
        assert!(output.contains("1 resources valid"), "the valid neighbour is kept:\n{output}");
    }
}

#[test]
fn the_shipped_examples_all_pass() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
    let (ok, output) = check(&[examples]);
    assert!(ok, "{output}");
    assert!(output.contains("18 resources valid, 0 errors"), "{output}");
    // The seed's Gateway terminates the mesh's mTLS (ISTIO_MUTUAL): served, so nothing is said of it.
    assert!(!output.contains("istio-egress-gateway: spec.servers[0].tls.mode"), "{output}");
}

#[test]
fn a_missing_path_is_an_error_naming_it() {
    let (ok, output) = check(&[corpus("no-such-dir")]);
    assert!(!ok);
    assert!(output.contains("no-such-dir: no such file or directory"), "{output}");
}

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

/// Istio's own rules, one resource a file (`tests/corpus/istio/refused/KIND/RULE.yaml`): each file is refused
/// for exactly the rule its `# expect:` line names, at that field path, and for nothing else.
#[test]
fn what_istio_refuses_is_refused_with_its_field_path() {
    let dir = corpus("istio/refused");
    let (ok, output) = check(std::slice::from_ref(&dir));
    assert!(!ok, "{output}");
    let mut files = 0;
    for kind in std::fs::read_dir(&dir).unwrap() {
        for entry in std::fs::read_dir(kind.unwrap().path()).unwrap() {
            let file = entry.unwrap().path();
            let text = std::fs::read_to_string(&file).unwrap();
            let expect = text.lines().find_map(|line| line.strip_prefix("# expect: "));
            let expect = expect.unwrap_or_else(|| panic!("{} has no expect line", file.display()));
            // `Kind ns/name: field.path: words of the reason`
            let (resource_and_path, reason) = expect.rsplit_once(": ").unwrap();
            let prefix = format!("{}: {resource_and_path}: ", file.display());
            let lines: Vec<&str> = output.lines().filter(|l| l.starts_with(&format!("{}: ", file.display()))).collect();
            assert!(
                lines.len() == 1 && lines[0].starts_with(&prefix) && lines[0][prefix.len()..].contains(reason),
                "expected exactly\n{prefix}…{reason}…\ngot\n{}",
                lines.join("\n")
            );
            files += 1;
        }
    }
    assert!(files >= 200, "the corpus holds {files} rules");
    assert!(output.contains(&format!("0 resources valid, {files} errors")), "{output}");
}

/// What Istio accepts, including what a stricter reader would refuse (weights not adding to 100, a trailing dot,
/// `~/*`, RE2 quoting, delegates, port 0…): every file passes.
#[test]
fn what_istio_accepts_is_accepted() {
    let (ok, output) = check(&[corpus("istio/accepted")]);
    assert!(ok, "{output}");
    let files = std::fs::read_dir(corpus("istio/accepted")).unwrap().count();
    assert!(output.contains(&format!("{} resources valid, 0 errors", files - 1)), "{output}");
    // Where each AuthorizationPolicy applies is said.
    let seed =
        "AuthorizationPolicy default/restrict-egress: ALLOW, applies to workloads of namespace default labelled \
                istio=egressgateway, and the gateway";
    assert!(output.contains(seed), "{output}");
    let targeted =
        "AuthorizationPolicy egress/httpbin-from-default: ALLOW, applies to traffic to ServiceEntry egress/httpbin";
    assert!(output.contains(targeted), "{output}");
    let kernel = "AuthorizationPolicy istio-system/no-ssh: DENY, applies to every workload, and the gateway (the root \
                  namespace's); its rules of addresses and ports alone are also refused in the kernel";
    assert!(output.contains(kernel), "{output}");
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

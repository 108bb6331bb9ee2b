//! `deploy/`: every kustomization renders (`kubectl kustomize`), and what it renders validates against the
//! Kubernetes API's schemas (`kubernetes-validate --strict`, which bundles them); the examples are read by the
//! agent's own validation (`sluice check`).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// The Kubernetes version the manifests are checked against.
const KUBERNETES_VERSION: &str = "1.31.0";

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn output(command: &mut Command) -> (bool, String, String) {
    let output = command.output().unwrap_or_else(|error| panic!("{command:?}: {error}"));
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    (output.status.success(), text(&output.stdout), text(&output.stderr))
}

#[test]
fn every_kustomization_renders_manifests_the_kubernetes_schemas_accept() {
    let validate = sluice_tests::python_tools().join("bin/kubernetes-validate");
    assert!(validate.is_file(), "{} is missing: run `cargo xtask deps` (or `cargo xtask test`)", validate.display());
    let dir = tempfile::tempdir().unwrap();
    for kustomization in ["", "monitoring", "overlays/two-hop", "overlays/forward-proxy", "overlays/routed-egress"] {
        let (rendered, manifests, errors) =
            output(Command::new("kubectl").arg("kustomize").arg(deploy().join(kustomization)));
        assert!(rendered, "kubectl kustomize deploy/{kustomization}:\n{errors}");
        let kinds = manifests.lines().filter(|line| line.starts_with("kind: ")).count();
        assert!(kinds >= 2, "{manifests}");
        let file = dir.path().join("rendered.yaml");
        std::fs::write(&file, &manifests).unwrap();
        let (valid, report, errors) =
            output(Command::new(&validate).args(["--strict", "-k", KUBERNETES_VERSION]).arg(&file));
        assert!(valid, "deploy/{kustomization} does not validate:\n{report}{errors}\n{manifests}");
        // Every kind Kubernetes itself defines was checked (the Prometheus Operator's and Cilium's have no bundled
        // schema).
        let checked = report.lines().filter(|line| line.contains(" passed for resource ")).count();
        let unchecked = report.lines().filter(|line| line.contains("Couldn't find schema for kind")).count();
        assert_eq!(checked + unchecked, kinds, "{report}");
        assert!(
            report.lines().all(|line| !line.contains("Couldn't find schema")
                || line.contains("monitoring.coreos.com")
                || line.contains("cilium.io")),
            "{report}"
        );
    }
}

#[test]
fn each_overlay_adds_what_its_setup_needs() {
    let render = |overlay: &str| output(Command::new("kubectl").arg("kustomize").arg(deploy().join(overlay))).1;
    let forward = render("overlays/forward-proxy");
    assert!(forward.contains("- --forward-proxy-port=3128") && forward.contains("name: sluice-proxy"), "{forward}");
    let two_hop = render("overlays/two-hop");
    for port in ["port: 80", "port: 443", "port: 5432"] {
        assert!(two_hop.contains(port), "{port}:\n{two_hop}");
    }
    // Routed egress: the NIC and Cilium's tunnel devices are intercepted, and Cilium's policy names the Sluice nodes.
    let routed = render("overlays/routed-egress");
    for line in ["- --intercept=default-route", "- --intercept=cilium_vxlan*", "kind: CiliumEgressGatewayPolicy"] {
        assert!(routed.contains(line), "{line}:\n{routed}");
    }
    assert!(routed.contains("sluice.dev/egress-gateway: \"true\""), "{routed}");
}

#[test]
fn the_daemonset_runs_the_image_from_the_node_s_default_route_with_measured_resources() {
    let base = output(Command::new("kubectl").arg("kustomize").arg(deploy())).1;
    assert!(base.contains(&format!("image: {}:{}\n", sluice_tests::image::NAME, sluice_tests::image::tag())), "{base}");
    // Found from the node, not an interface name that exists on some nodes only.
    assert!(base.contains("- --intercept=default-route\n") && !base.contains("--intercept=eth"), "{base}");
    // The node's network sysctls, where the agent sets net.ipv4.tcp_migrate_req for its successor.
    assert!(base.contains("mountPath: /host/proc/sys/net") && base.contains("path: /proc/sys/net"), "{base}");
    for line in ["cpu: 100m", "memory: 128Mi", "memory: 1Gi", "type: Unconfined", "readOnlyRootFilesystem: true"] {
        assert!(base.contains(line), "{line}:\n{base}");
    }
}

#[test]
fn the_daemonset_surges_declares_no_host_ports_and_waits_out_the_drain() {
    let base = output(Command::new("kubectl").arg("kustomize").arg(deploy())).1;
    // A new agent beside the old one, sharing its listeners: the old one drains, no request fails.
    assert!(base.contains("maxSurge: 1") && base.contains("maxUnavailable: 0"), "{base}");
    // On the host's network a container port is a host port, which would keep the surge pod off the node.
    assert!(!base.contains("containerPort"), "{base}");
    // The drain's defaults (--drain-delay 5s, --drain-timeout 20s) fit in the grace period.
    let grace: u64 = base
        .lines()
        .find_map(|line| line.trim().strip_prefix("terminationGracePeriodSeconds: "))
        .and_then(|seconds| seconds.parse().ok())
        .unwrap_or_else(|| panic!("no terminationGracePeriodSeconds:\n{base}"));
    assert!(grace >= 5 + 20, "terminationGracePeriodSeconds {grace}");
}

/// The YAML files of `dir`, relative to the repository.
fn yaml_files(dir: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(dir);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|error| panic!("{}: {error}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    files
}

/// What tests/tools/validate-istio.mjs says of `files`: a line per document.
fn validate_istio(files: &[PathBuf]) -> String {
    let tools = sluice_tests::node_tools();
    assert!(
        tools.join("node_modules/@kubernetes-models/istio").is_dir(),
        "{} lacks Istio's schemas: run `cargo xtask deps` (or `cargo xtask test`)",
        tools.display()
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/validate-istio.mjs");
    let (_, report, errors) = output(Command::new("node").arg(script).arg(&tools).args(files));
    assert!(errors.is_empty(), "{errors}");
    report
}

#[test]
fn the_examples_and_the_accepted_corpus_are_valid_by_istios_crd_schemas() {
    let mut files = Vec::new();
    for dir in ["deploy/examples/seeds", "deploy/examples/sandbox", "tests/corpus/istio/accepted", "tests/corpus/valid"]
    {
        files.extend(yaml_files(dir));
    }
    let report = validate_istio(&files);
    let invalid: Vec<&str> =
        report.lines().filter(|line| !line.starts_with("ok ") && !line.starts_with("no-schema ")).collect();
    assert!(invalid.is_empty(), "documents Istio's API server would refuse:\n{}", invalid.join("\n"));
    let checked = report.lines().filter(|line| line.starts_with("ok ")).count();
    assert!(checked >= 60, "only {checked} documents checked:\n{report}");
    // Kinds without an Istio schema: Kubernetes' own, and the one seed that writes the mesh config as a resource.
    for line in report.lines().filter(|line| line.starts_with("no-schema ")) {
        let known = line.starts_with("no-schema v1 ConfigMap ")
            || line.starts_with("no-schema apps/v1 ")
            || line == "no-schema networking.istio.io/v1beta1 MeshConfig istio-system/istio";
        assert!(known, "{line}");
    }

    // Not vacuous: what the schemas refuse is said, naming the field.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: bad, namespace: egress}\n\
         spec: {hosts: [a.example], ports: [{number: 80, name: http}], resolution: BOGUS}\n",
    )
    .unwrap();
    let report = validate_istio(&[bad]);
    assert!(report.starts_with("invalid ServiceEntry egress/bad: ") && report.contains("spec/resolution"), "{report}");
}

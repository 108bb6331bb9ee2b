//! Every committed fuzz input, replayed through its target's entry point (`sluice_agent::fuzzing`): the seeds
//! (`fuzz/seeds/TARGET/`) and every input a fuzzer found to crash or hang (`fuzz/regressions/TARGET/`, added
//! when the bug is fixed). A target without seeds fails here, so a new target cannot be added half-made.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use sluice_agent::fuzzing::TARGETS;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries.filter_map(|entry| entry.ok().map(|entry| entry.path())).collect(),
        Err(_) => Vec::new(),
    };
    files.retain(|file| file.is_file());
    files.sort();
    files
}

/// What a slow input may take at most in a debug build (libFuzzer's own limit, `-timeout`, is 5 s per input in
/// an optimized one).
const PER_INPUT: Duration = Duration::from_secs(10);

#[test]
fn every_seed_and_every_found_input_is_handled_by_its_target() {
    for (name, target) in TARGETS {
        let seeds = inputs(&fuzz_dir().join("seeds").join(name));
        assert!(!seeds.is_empty(), "fuzz/seeds/{name}/ has no seed");
        let found = inputs(&fuzz_dir().join("regressions").join(name));
        for input in seeds.iter().chain(&found) {
            let bytes = std::fs::read(input).unwrap();
            let started = Instant::now();
            target(&bytes);
            let took = started.elapsed();
            assert!(took < PER_INPUT, "{} took {took:?}", input.display());
        }
    }
}

#[test]
fn every_target_has_a_fuzz_binary() {
    let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap();
    for (name, _) in TARGETS {
        assert!(manifest.contains(&format!("name = \"{name}\"")), "fuzz/Cargo.toml has no [[bin]] {name}");
        let source = fuzz_dir().join("fuzz_targets").join(format!("{name}.rs"));
        let source = std::fs::read_to_string(&source).unwrap_or_else(|e| panic!("{}: {e}", source.display()));
        assert!(source.contains(&format!("sluice_agent::fuzzing::{name}(")), "{source}");
    }
}

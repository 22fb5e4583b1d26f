//! Every input the fuzzers kept (`fuzz/corpus/<target>/`), run through the function the
//! cargo-fuzz target calls, so that CI replays them without a fuzzer. (Engine bugs the
//! targets found are reduced to tests in `fuzz_findings.rs`.)

use std::fs;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use shadow2_machine::fuzz;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

/// The files of `dir`, sorted (none if it does not exist).
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// Runs every file of `fuzz/<kind>/<target>/` through `check`; fails naming each input
/// that panics.
fn replay_dir(kind: &str, target: &str, check: fn(&[u8])) -> usize {
    let files = inputs(&fuzz_dir().join(kind).join(target));
    let mut failed = Vec::new();
    for file in &files {
        let data = fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        if panic::catch_unwind(AssertUnwindSafe(|| check(&data))).is_err() {
            failed.push(file.display().to_string());
        }
    }
    assert!(failed.is_empty(), "inputs that fail: {failed:#?}");
    files.len()
}

#[test]
fn emulate_corpus_replays_clean() {
    let n = replay_dir("corpus", "emulate", fuzz::emulate::check);
    assert!(n > 0, "the emulate corpus is empty");
}

#[test]
fn churn_ops_corpus_replays_clean() {
    let n = replay_dir("corpus", "churn_ops", fuzz::churn_ops::check);
    assert!(n > 0, "the churn_ops corpus is empty");
}

#[test]
fn trace_corpus_replays_clean() {
    let n = replay_dir("corpus", "trace", fuzz::trace::check);
    assert!(n > 0, "the trace corpus is empty");
}

//! `shadow2 run`, `replay` and `bench` as a user runs them: the JSON contract, the issue's
//! example runs, one-line errors, and a record/replay round trip.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Command, Output};

fn shadow2(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shadow2"))
        .args(args)
        .output()
        .expect("run shadow2")
}

fn json(args: &[&str]) -> serde_json::Value {
    let out = shadow2(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.trim().lines().count(), 1, "one JSON object: {text}");
    serde_json::from_str(&text).unwrap()
}

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cli-run");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn check_clean(v: &serde_json::Value) {
    for key in [
        "workload",
        "pair",
        "backend",
        "guest_ops",
        "traps",
        "traps_per_op",
        "guest",
        "demand_faults",
        "traps_per_demand_fault",
        "oracle_mismatches",
        "pool_peak_pages",
        "evictions",
        "max_call_work",
        "wall_s",
    ] {
        assert!(v.get(key).is_some(), "missing {key} in {v}");
    }
    assert!(v["guest_ops"].as_u64().unwrap() > 0);
    assert!(v["traps"]["total"].as_u64().unwrap() > 0);
    assert!(v["traps_per_op"].as_f64().unwrap() > 0.0);
    assert_eq!(v["oracle_mismatches"].as_u64(), Some(0));
    assert_eq!(v["audit_violations"].as_u64(), Some(0));
    assert_eq!(v["data_errors"].as_u64(), Some(0));
    // Every engine call did some work, and none more than the default bound.
    let work = v["max_call_work"].as_u64().unwrap();
    assert!(work > 0, "max_call_work {work}");
    assert!(
        work <= shadow2::DomainConfig::hvm(shadow2::paging::PagingLevels::Four, 1, 64)
            .call_work_bound(),
        "max_call_work {work}"
    );
}

#[test]
fn the_issue_runs_report_clean_results() {
    let v = json(&[
        "run",
        "--workload",
        "forkwait",
        "--pair",
        "4on4",
        "--size",
        "20",
        "--json",
    ]);
    check_clean(&v);
    assert_eq!(v["guest"], "linux64");
    for (guest, pair) in [
        ("windows-pae", "3on3"),
        ("legacy32", "2on3"),
        ("boot", "0on4"),
    ] {
        let v = json(&[
            "run",
            "--guest",
            guest,
            "--pair",
            pair,
            "--workload",
            "forkwait",
            "--size",
            "10",
            "--json",
        ]);
        check_clean(&v);
        assert_eq!(v["guest"], guest);
        assert_eq!(v["pair"], pair);
        assert!(
            v["cow_faults"].as_u64().unwrap() > 0,
            "{guest}: forkwait breaks COW"
        );
    }
}

#[test]
fn a_pair_alone_picks_its_guest_and_the_summary_is_a_table() {
    let out = shadow2(&[
        "run",
        "--pair",
        "2on2",
        "--workload",
        "demand",
        "--size",
        "1",
    ]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("legacy32"), "{text}");
    assert!(text.contains("oracle mismatches"), "{text}");
    assert!(text.contains("traps: emulated_writes"), "{text}");
    assert!(text.contains("max call work"), "{text}");
}

#[test]
fn user_errors_are_one_line_and_fail() {
    for args in [
        &["run", "--workload", "nope"][..],
        &["run", "--guest", "legacy32", "--pair", "4on4"],
        &["run", "--pair", "5on5"],
        &["run", "--size", "0"],
        &["run", "--workload", "demand", "--size", "100000"],
        &["run", "--backend", "qemu"],
        &["run", "--pool-pages", "18446744073709551615"],
        &["run", "--pool-pages", "262145"],
        &["run", "--pool-pages", "0"],
        &["replay", "/nonexistent/trace"],
    ] {
        let out = shadow2(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}

#[test]
fn a_recorded_run_replays_to_the_same_counters() {
    let trace = scratch("mmap.trace");
    let trace_s = trace.to_str().unwrap();
    let recorded = json(&[
        "run",
        "--guest",
        "smp-boot",
        "--workload",
        "mmap-churn",
        "--size",
        "10",
        "--record",
        trace_s,
        "--json",
    ]);
    let replayed = json(&["replay", trace_s, "--json"]);
    for key in [
        "guest_ops",
        "traps",
        "digest",
        "demand_faults",
        "cow_faults",
        "unshadows",
    ] {
        assert_eq!(recorded[key], replayed[key], "{key}");
    }
    // A damaged copy fails with the offset, never a panic.
    let bytes = std::fs::read(&trace).unwrap();
    let cut = scratch("cut.trace");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let out = shadow2(&["replay", cut.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("offset"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn bench_then_report() {
    let out = scratch("bench.json");
    let dir = scratch("report");
    let v = json(&[
        "bench",
        "--guest",
        "legacy32",
        "--workload",
        "kbuild",
        "--scale",
        "0.05",
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]);
    let runs = v["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 3, "legacy32 runs on 3 pairs");
    for r in runs {
        check_clean(r);
    }
    let rep = shadow2(&[
        "report",
        "--input",
        out.to_str().unwrap(),
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert!(rep.status.success());
    let svg = std::fs::read_to_string(dir.join("traps_per_op.svg")).unwrap();
    assert!(svg.contains("traps per guest operation"));
}

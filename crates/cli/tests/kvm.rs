//! `shadow2 run --backend kvm|native` as a user runs it: the JSON contract of the
//! three-way differential, and one line with exit code 2 where the host cannot run it.
//! Where KVM is missing, each test says why it did not run and returns.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output};

fn shadow2(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shadow2"))
        .args(args)
        .output()
        .expect("run shadow2")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Why this host has no KVM, if it has none (as the command itself says it).
fn no_kvm(out: &Output) -> Option<String> {
    let err = stderr(out);
    (out.status.code() == Some(2) && err.starts_with("shadow2: KVM unavailable"))
        .then(|| err.trim().to_string())
}

/// Runs a KVM command that prints one JSON object; `None` (with the reason printed) where
/// the host has no KVM.
fn kvm_json(args: &[&str]) -> Option<(Output, serde_json::Value)> {
    let out = shadow2(args);
    if let Some(why) = no_kvm(&out) {
        eprintln!("skipped: {why}");
        return None;
    }
    let text = String::from_utf8(out.stdout.clone()).unwrap();
    assert_eq!(
        text.trim().lines().count(),
        1,
        "{args:?}: one JSON object: {text}\n{}",
        stderr(&out)
    );
    let v = serde_json::from_str(&text).unwrap();
    Some((out, v))
}

const FORKWAIT_4ON4: [&str; 10] = [
    "run",
    "--backend",
    "kvm",
    "--workload",
    "forkwait",
    "--pair",
    "4on4",
    "--size",
    "2",
    "--json",
];

#[test]
fn a_kvm_run_reports_exits_by_kind_and_both_comparisons() {
    let Some((_, v)) = kvm_json(&FORKWAIT_4ON4) else {
        return;
    };
    assert_eq!(v["backend"], "kvm");
    let ops = v["guest_ops"].as_u64().unwrap();
    assert!(ops > 0);
    let exits = v["vm_exits"].as_object().expect("vm_exits is an object");
    let total = exits["total"].as_u64().unwrap();
    let by_kind: u64 = ["pf_fixed", "pf_propagated", "pf_emulated", "privileged"]
        .iter()
        .map(|k| exits[*k].as_u64().unwrap())
        .sum();
    assert!(by_kind > 0 && by_kind <= total, "{exits:?}");
    let per_op = v["exits_per_op"].as_f64().unwrap();
    assert!(
        (per_op - total as f64 / ops as f64).abs() < 1e-9,
        "{per_op}"
    );
    // Both comparisons were made: 4-level guests run natively on this kind of host.
    assert!(v["differences"]["vs_sim"].is_u64(), "{v}");
    assert!(v["differences"]["vs_native"].is_u64(), "{v}");
    assert!(v.get("native_skipped").is_none(), "{v}");
    assert_eq!(v["audit_violations"].as_u64(), Some(0));
    assert_eq!(v["data_errors"].as_u64(), Some(0));
}

#[test]
fn forkwait_4on4_on_kvm_agrees_with_the_simulator_and_native_kvm() {
    let Some((out, v)) = kvm_json(&FORKWAIT_4ON4) else {
        return;
    };
    assert_eq!(v["differences"]["vs_sim"].as_u64(), Some(0), "{v}");
    assert_eq!(v["differences"]["vs_native"].as_u64(), Some(0), "{v}");
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn a_pair_the_host_cannot_run_is_one_line_and_exit_code_2() {
    let out = shadow2(&["run", "--backend", "kvm", "--pair", "2on3", "--size", "2"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(out.stdout.is_empty());
    if no_kvm(&out).is_none() {
        assert!(
            err.starts_with("shadow2: this host cannot run 2on3 under KVM: "),
            "{err}"
        );
    }
}

#[test]
fn a_guest_native_kvm_cannot_page_is_one_line_and_exit_code_2() {
    let out = shadow2(&[
        "run",
        "--backend",
        "native",
        "--guest",
        "legacy32",
        "--pair",
        "2on4",
        "--size",
        "2",
    ]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(out.stdout.is_empty());
    if no_kvm(&out).is_none() {
        assert!(err.contains("legacy32 cannot run natively"), "{err}");
    }
}

#[test]
fn a_kvm_run_of_a_guest_native_kvm_cannot_page_names_why_vs_native_is_null() {
    let Some((_, v)) = kvm_json(&[
        "run",
        "--backend",
        "kvm",
        "--guest",
        "legacy32",
        "--pair",
        "2on4",
        "--size",
        "2",
        "--json",
    ]) else {
        return;
    };
    assert!(v["differences"]["vs_sim"].is_u64(), "{v}");
    assert!(v["differences"]["vs_native"].is_null(), "{v}");
    let why = v["native_skipped"].as_str().unwrap();
    assert!(why.contains("2-level"), "{why}");
}

#[test]
fn bench_kvm_measures_engine_and_native_and_report_draws_them() {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cli-kvm-bench");
    std::fs::create_dir_all(&dir).unwrap();
    let out_file = dir.join("bench.json");
    let _ = std::fs::remove_file(&out_file);
    let out = shadow2(&[
        "bench",
        "--backend",
        "kvm",
        "--scale",
        "0.002",
        "--out",
        out_file.to_str().unwrap(),
    ]);
    if let Some(why) = no_kvm(&out) {
        eprintln!("skipped: {why}");
        assert_eq!(stderr(&out).trim().lines().count(), 1);
        return;
    }
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("engine/native"), "{text}");
    let bench: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out_file).unwrap()).unwrap();
    let rows = bench["kvm"].as_array().unwrap();
    let workloads: Vec<&str> = rows
        .iter()
        .map(|r| r["workload"].as_str().unwrap())
        .collect();
    assert_eq!(workloads, ["forkwait", "demand"]);
    for r in rows {
        let engine = r["engine_wall_s"].as_f64().unwrap();
        let native = r["native_wall_s"].as_f64().unwrap();
        assert!(engine > 0.0 && native > 0.0, "{r}");
        assert!((r["wall_ratio"].as_f64().unwrap() - engine / native).abs() < 1e-9);
        // Every guest operation ends in at least the executor's exit, on both.
        assert!(r["engine_exits_per_op"].as_f64().unwrap() >= 1.0, "{r}");
        assert!(r["native_exits_per_op"].as_f64().unwrap() >= 1.0, "{r}");
    }
    let report_dir = dir.join("report");
    let rep = shadow2(&[
        "report",
        "--input",
        out_file.to_str().unwrap(),
        "--out",
        report_dir.to_str().unwrap(),
    ]);
    assert!(rep.status.success(), "{}", stderr(&rep));
    for file in ["kvm_wall_ratio.svg", "kvm_exits_per_op.svg", "report.md"] {
        assert!(report_dir.join(file).exists(), "{file} missing");
    }
}

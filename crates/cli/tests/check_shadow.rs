//! Runs the `shadow2` binary's `check shadow`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn shadow2(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_shadow2"))
        .args(args)
        .output()
        .expect("the shadow2 binary runs")
}

#[test]
fn all_pairs_json_reports_every_pair_clean() {
    let out = shadow2(&[
        "check", "shadow", "--pair", "all", "--ops", "1800", "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.trim().lines().count(), 1, "{stdout}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["pairs"].as_u64(), Some(9));
    assert!(report["ops"].as_u64().unwrap() >= 1800);
    assert_eq!(report["audit_violations"].as_u64(), Some(0));
    assert_eq!(report["oracle_mismatches"].as_u64(), Some(0));
    let pairs = report["per_pair"].as_array().unwrap();
    let names: Vec<&str> = pairs.iter().map(|p| p["pair"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "0on2", "2on2", "0on3", "2on3", "3on3", "0on4", "2on4", "3on4", "4on4"
        ]
    );
    for p in pairs {
        assert!(p["accesses"].as_u64().unwrap() > 0, "{p}");
    }
}

#[test]
fn text_mode_ends_with_the_summary_line() {
    let out = shadow2(&[
        "check", "shadow", "--pair", "3on4", "--ops", "300", "--seed", "9",
    ]);
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    let last = stdout.trim_end().lines().last().unwrap();
    assert_eq!(
        last,
        "shadow: 1 pairs, 300 ops, 0 audit violations, 0 oracle mismatches"
    );
}

#[test]
fn same_seed_same_run() {
    let a = shadow2(&[
        "check", "shadow", "--pair", "2on3", "--ops", "400", "--seed", "3", "--json",
    ]);
    let b = shadow2(&[
        "check", "shadow", "--pair", "2on3", "--ops", "400", "--seed", "3", "--json",
    ]);
    let strip = |o: &std::process::Output| {
        let mut v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v.as_object_mut().unwrap().remove("wall_s");
        v
    };
    assert_eq!(strip(&a), strip(&b));
}

#[test]
fn unknown_pair_is_one_clear_error() {
    let out = shadow2(&["check", "shadow", "--pair", "5on4"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("unknown pair"), "{stderr}");
}

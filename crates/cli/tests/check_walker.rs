//! Runs the `shadow2` binary's `check walker`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn shadow2(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_shadow2"))
        .args(args)
        .output()
        .expect("the shadow2 binary runs")
}

#[test]
fn quick_json_reports_cases_and_no_mismatch() {
    let out = shadow2(&["check", "walker", "--json", "--quick"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.trim().lines().count(), 1, "{stdout}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let cases = report["cases"].as_u64().unwrap();
    assert!(cases > 10_000, "{cases}");
    assert_eq!(report["mismatches"].as_u64(), Some(0));
    let modes = report["modes"].as_array().unwrap();
    assert_eq!(modes.len(), 3);
    let per_mode: u64 = modes.iter().map(|m| m["cases"].as_u64().unwrap()).sum();
    assert_eq!(per_mode, cases);
}

#[test]
fn text_mode_ends_with_the_summary_line() {
    let out = shadow2(&["check", "walker", "--quick", "--mode", "2"]);
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    let last = stdout.trim_end().lines().last().unwrap();
    let words: Vec<&str> = last.split(' ').collect();
    assert_eq!(words[0], "walker:");
    assert!(words[1].parse::<u64>().unwrap() > 0, "{last}");
    assert_eq!(&words[2..], ["cases,", "0", "mismatches"], "{last}");
    assert!(stdout.contains("2-level"));
    assert!(!stdout.contains("4-level"));
}

#[test]
fn bad_arguments_fail_on_stderr() {
    let out = shadow2(&["check", "walker", "--stride", "0"]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("stride"));
    let out = shadow2(&["check", "walker", "--mode", "5"]);
    assert!(!out.status.success());
    assert!(!out.stderr.is_empty());
}

#[test]
fn full_json_run_covers_a_million_cases() {
    let out = shadow2(&["check", "walker", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["cases"].as_u64().unwrap() >= 1_000_000, "{report}");
    assert_eq!(report["mismatches"].as_u64(), Some(0));
    assert!(report["first_mismatches"].as_array().unwrap().is_empty());
}

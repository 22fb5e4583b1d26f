//! Runs the `shadow2` binary's `report` on a synthetic `bench.json`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn shadow2(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shadow2"))
        .args(args)
        .output()
        .expect("the shadow2 binary runs")
}

/// A fresh directory for one test.
fn temp_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("report-{name}"));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// One run as `shadow2 run --json` writes it.
fn run(guest: &str, workload: &str, pair: &str, traps_per_op: f64, mismatches: u64) -> String {
    let ops = 10_000_u64;
    let total = (traps_per_op * ops as f64) as u64;
    let series: Vec<String> = (0..=20)
        .map(|i| format!("[{}, {}]", i * 500, 100 + i * (total % 97 + 10)))
        .collect();
    format!(
        r#"{{
  "workload": "{workload}", "guest": "{guest}", "pair": "{pair}", "backend": "sim",
  "size": 32, "seed": 1, "guest_ops": {ops},
  "traps": {{"shadow_fills": {fills}, "cr3_writes": {cr3}, "total": {total}}},
  "traps_per_op": {traps_per_op}, "demand_faults": 2000, "traps_per_demand_fault": {per_df},
  "cow_faults": 12, "kills": 0, "data_errors": 0, "unshadows": 3, "evictions": 0,
  "pool_pages": 4096, "pool_peak_pages": 2200, "oracle_mismatches": {mismatches},
  "audit_violations": 0, "engine_s": 0.02, "engine_us_per_trap": 0.75, "wall_s": 0.5,
  "digest": "deadbeef",
  "pool_series": [{series}]
}}"#,
        fills = total / 2,
        cr3 = total - total / 2,
        per_df = total as f64 / 2000.0,
        series = series.join(", "),
    )
}

fn bench_json() -> String {
    let runs = [
        run("linux", "fork_exec", "4on4", 0.5, 0),
        run("linux", "fork_exec", "3on4", 0.75, 0),
        run("bsd", "fork_exec", "4on4", 0.25, 0),
        run("linux", "mmap_touch", "4on4", 1.5, 2),
        run("bsd", "mmap_touch", "4on4", 0.125, 0),
    ];
    format!(r#"{{"version": 1, "runs": [{}]}}"#, runs.join(",\n"))
}

/// The text of every `<text>` element of an SVG, unescaped enough for plain labels.
fn svg_texts(svg: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = svg;
    while let Some(i) = rest.find("<text") {
        rest = &rest[i..];
        let open_end = rest.find('>').unwrap();
        let close = rest.find("</text>").unwrap();
        out.push(rest[open_end + 1..close].trim().to_owned());
        rest = &rest[close..];
    }
    out
}

#[test]
fn report_writes_three_svgs_and_markdown() {
    let dir = temp_dir("ok");
    let input = dir.join("bench.json");
    fs::write(&input, bench_json()).unwrap();
    let out_dir = dir.join("out");
    let out = shadow2(&[
        "report",
        "--input",
        input.to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let printed: Vec<&str> = stdout.lines().collect();
    let names = [
        "traps_per_op.svg",
        "traps_per_demand_fault.svg",
        "pool_occupancy.svg",
        "report.md",
    ];
    assert_eq!(printed.len(), names.len(), "{stdout}");
    for (line, name) in printed.iter().zip(names) {
        assert_eq!(Path::new(line), out_dir.join(name), "{stdout}");
        assert!(out_dir.join(name).is_file(), "{name} missing");
    }

    let svgs = [
        (
            "traps_per_op.svg",
            &["workload", "traps per guest operation"][..],
        ),
        (
            "traps_per_demand_fault.svg",
            &["workload", "traps per demand fault"][..],
        ),
        (
            "pool_occupancy.svg",
            &["guest operations", "pool pages in use"][..],
        ),
    ];
    for (name, labels) in svgs {
        let svg = fs::read_to_string(out_dir.join(name)).unwrap();
        let head = svg.trim_start();
        assert!(
            head.starts_with("<?xml") || head.starts_with("<svg"),
            "{name}: {}",
            &head[..head.len().min(80)]
        );
        assert!(
            svg.contains("<svg") && svg.trim_end().ends_with("</svg>"),
            "{name}"
        );
        let texts = svg_texts(&svg);
        for label in labels {
            assert!(
                texts.iter().any(|t| t == label),
                "{name}: no <text> {label:?} in {texts:?}"
            );
        }
    }
    // The bar charts name the workloads on the axis and the guest/pair series in a legend.
    let bars = svg_texts(&fs::read_to_string(out_dir.join("traps_per_op.svg")).unwrap());
    for t in [
        "fork_exec",
        "mmap_touch",
        "linux 4on4",
        "linux 3on4",
        "bsd 4on4",
    ] {
        assert!(bars.iter().any(|x| x == t), "no {t:?} in {bars:?}");
    }
    // The pool plot has a legend entry per run.
    let pool = svg_texts(&fs::read_to_string(out_dir.join("pool_occupancy.svg")).unwrap());
    assert!(
        pool.iter().any(|x| x == "linux mmap_touch 4on4"),
        "{pool:?}"
    );

    let md = fs::read_to_string(out_dir.join("report.md")).unwrap();
    for row in [
        "| linux | fork_exec | 4on4 | 10000 | 0.5000 | 2.500 | 0.7500 | 0 |",
        "| linux | fork_exec | 3on4 | 10000 | 0.7500 | 3.750 | 0.7500 | 0 |",
        "| bsd | fork_exec | 4on4 | 10000 | 0.2500 | 1.250 | 0.7500 | 0 |",
        "| linux | mmap_touch | 4on4 | 10000 | 1.500 | 7.500 | 0.7500 | 2 |",
        "| bsd | mmap_touch | 4on4 | 10000 | 0.1250 | 0.6250 | 0.7500 | 0 |",
    ] {
        assert!(md.contains(row), "no row {row:?} in\n{md}");
    }
    assert!(
        md.contains("Highest traps per guest operation: linux mmap_touch"),
        "{md}"
    );
    assert!(
        md.contains("Lowest traps per guest operation: bsd mmap_touch"),
        "{md}"
    );
    assert!(md.contains("Oracle mismatches: 2 in total"), "{md}");
    for name in &names[..3] {
        assert!(
            md.contains(&format!("]({name})")),
            "no link to {name} in\n{md}"
        );
    }
}

#[test]
fn many_runs_keep_the_pool_legend_short() {
    let dir = temp_dir("many");
    let runs: Vec<String> = (0..30)
        .map(|i| run("linux", &format!("w{i}"), "4on4", 0.1 * f64::from(i + 1), 0))
        .collect();
    let input = dir.join("bench.json");
    fs::write(
        &input,
        format!(r#"{{"version": 1, "runs": [{}]}}"#, runs.join(",")),
    )
    .unwrap();
    let out_dir = dir.join("out");
    let out = shadow2(&[
        "report",
        "--input",
        input.to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pool = svg_texts(&fs::read_to_string(out_dir.join("pool_occupancy.svg")).unwrap());
    let entries = pool.iter().filter(|t| t.starts_with("linux w")).count();
    assert_eq!(entries, 12, "{pool:?}");
    assert!(pool.iter().any(|t| t == "18 more runs"), "{pool:?}");
}

#[test]
fn missing_input_is_one_line_on_stderr() {
    let dir = temp_dir("missing");
    let input = dir.join("nope.json");
    let out = shadow2(&[
        "report",
        "--input",
        input.to_str().unwrap(),
        "--out",
        dir.join("out").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("cannot read"), "{stderr}");
    assert!(stderr.contains("nope.json"), "{stderr}");
    assert!(stderr.contains("shadow2 bench"), "{stderr}");
    assert!(!dir.join("out").exists());
}

#[test]
fn unparsable_input_is_one_line_on_stderr() {
    let dir = temp_dir("garbage");
    let input = dir.join("bench.json");
    fs::write(
        &input,
        "{\"version\": 1, \"runs\": [\n{\"guest_ops\": \"many\"}]}",
    )
    .unwrap();
    let out = shadow2(&["report", "--input", input.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("cannot parse"), "{stderr}");
}

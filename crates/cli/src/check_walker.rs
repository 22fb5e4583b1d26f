//! `shadow2 check walker`: the access matrix (walker against SDM rules).

use std::io::Write;
use std::process::ExitCode;
use std::time::Instant;

use clap::ValueEnum;
use shadow2_machine::matrix::{self, MatrixMode, MatrixOptions, MatrixReport};

/// Options of `check walker`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Run only these modes (repeatable; default: all).
    #[arg(long = "mode", value_enum)]
    modes: Vec<ModeArg>,
    /// Run a sampled slice (every 97th case) for a fast smoke test.
    #[arg(long)]
    quick: bool,
    /// Run every N-th enumerated case only.
    #[arg(long, value_name = "N", conflicts_with = "quick")]
    stride: Option<u64>,
    /// How many mismatches to describe.
    #[arg(long, default_value_t = 10)]
    show: usize,
}

/// A paging mode on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ModeArg {
    /// 32-bit paging
    #[value(name = "2", alias = "2-level")]
    Two,
    /// PAE paging
    #[value(name = "3", alias = "pae")]
    Pae,
    /// 4-level paging
    #[value(name = "4", alias = "4-level")]
    Four,
}

impl ModeArg {
    fn mode(self) -> MatrixMode {
        match self {
            ModeArg::Two => MatrixMode::TwoLevel,
            ModeArg::Pae => MatrixMode::Pae,
            ModeArg::Four => MatrixMode::FourLevel,
        }
    }
}

/// Stride of `--quick`.
const QUICK_STRIDE: u64 = 97;

/// Runs the matrix and prints the report; fails (exit code 1) on any mismatch.
pub fn run(args: &Args) -> Result<ExitCode, String> {
    let mut modes: Vec<MatrixMode> = args.modes.iter().map(|m| m.mode()).collect();
    modes.sort();
    modes.dedup();
    if modes.is_empty() {
        modes = MatrixMode::ALL.to_vec();
    }
    let stride = match (args.quick, args.stride) {
        (true, _) => QUICK_STRIDE,
        (false, Some(0)) => return Err("--stride must be at least 1".into()),
        (false, Some(n)) => n,
        (false, None) => 1,
    };
    let opts = MatrixOptions {
        modes,
        stride,
        scenarios: true,
        max_reported: args.show,
    };
    let started = Instant::now();
    let report = matrix::run(&opts);
    let seconds = started.elapsed().as_secs_f64();

    let mut out = std::io::stdout().lock();
    let printed = if args.json {
        print_json(&mut out, &report)
    } else {
        print_text(&mut out, &report, seconds)
    };
    printed.map_err(|e| format!("cannot write the report: {e}"))?;
    Ok(if report.mismatches == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_json(out: &mut impl Write, report: &MatrixReport) -> Result<(), String> {
    let text = serde_json::to_string(report).map_err(|e| e.to_string())?;
    writeln!(out, "{text}").map_err(|e| e.to_string())
}

fn print_text(out: &mut impl Write, report: &MatrixReport, seconds: f64) -> Result<(), String> {
    let w = |out: &mut dyn Write, line: String| writeln!(out, "{line}").map_err(|e| e.to_string());
    for m in &report.modes {
        w(
            out,
            format!(
                "{:8} {:>9} matrix cases, {:>4} scenario accesses, {} mismatches",
                m.name, m.matrix_cases, m.scenario_cases, m.mismatches
            ),
        )?;
    }
    for s in &report.scenarios {
        if s.mismatches > 0 {
            w(
                out,
                format!(
                    "scenario {} ({}): {} mismatches",
                    s.name, s.mode, s.mismatches
                ),
            )?;
        }
    }
    if !report.first_mismatches.is_empty() {
        w(out, "first mismatches:".to_string())?;
        for m in &report.first_mismatches {
            w(out, format!("  {m}"))?;
        }
    }
    w(out, format!("time: {seconds:.2} s"))?;
    w(
        out,
        format!(
            "walker: {} cases, {} mismatches",
            report.cases, report.mismatches
        ),
    )
}

//! `shadow2 replay FILE`: runs a recorded guest-operation stream again on a fresh backend
//! and checks that every operation and every counter comes out the same.

use std::fs::File;
use std::io::BufReader;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use shadow2_guest::trace::{self, read_header};

use crate::progress;
use crate::simrun::{self, MachineOptions};

/// Options of `replay`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The trace file (`shadow2 run --record FILE`).
    file: PathBuf,
    /// Print one JSON object instead of the summary table.
    #[arg(long)]
    json: bool,
}

/// Replays; exit code 1 on any difference (reported with the offset where it happened).
pub fn run(args: &Args) -> Result<ExitCode, String> {
    let name = args.file.display().to_string();
    let open = || File::open(&args.file).map_err(|e| format!("cannot read {name}: {e}"));
    let header = read_header(BufReader::new(open()?)).map_err(|e| format!("{name}: {e}"))?;
    let spec = header.run_spec().map_err(|e| format!("{name}: {e}"))?;
    simrun::check_backend(&header.backend).map_err(|e| format!("{name}: {e}"))?;
    let mut backend = simrun::sim_backend(&spec, MachineOptions::default())?;
    let total = open()?.metadata().map(|m| m.len()).unwrap_or(0);
    let bar = progress::bar(total, "replay");
    let started = Instant::now();
    let outcome = trace::replay_with_total(
        BufReader::new(open()?),
        total,
        &mut backend,
        &mut |done, _| bar.set_position(done),
    );
    bar.finish_and_clear();
    let outcome = outcome.map_err(|e| format!("{name}: {e}"))?;
    let report = backend.report();
    let result = simrun::result_of(&spec, &header.backend, &outcome.counters, &report, started);
    let trailer = format!(
        "replay: {} records, {} guest operations, counters identical to the recording",
        outcome.records, outcome.counters.guest_ops
    );
    simrun::print_run(&result, &report, args.json, Some(&trailer))
}

//! `shadow2 run`: one workload of one guest model on one pair and backend, with a progress
//! bar on a terminal and a summary (or one JSON object).

use std::fs::File;
use std::io::BufWriter;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use shadow2_guest::trace::{Recorder, TraceHeader};

use crate::kvm_cmd;
use crate::progress;
use crate::simrun::{self, Backend, MachineOptions};

/// Options of `run`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Guest OS model: linux64, windows-pae, legacy32, boot, smp-boot (default: the one
    /// the pair suggests, else linux64).
    #[arg(long)]
    guest: Option<String>,
    /// Workload: forkwait, demand, mmap-churn, ctxswitch, kbuild.
    #[arg(long, default_value = "forkwait")]
    workload: String,
    /// Paging pair GonS (default: the guest's first).
    #[arg(long)]
    pair: Option<String>,
    /// Backend: sim; kvm (the engine's shadows on KVM vcpus) or native (the guest's own
    /// tables under KVM), each compared with the other backends.
    #[arg(long, default_value = "sim")]
    backend: String,
    /// Workload size (rounds, MiB, switches or jobs; default per workload).
    #[arg(long)]
    size: Option<u64>,
    /// Seed of the guest model's choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Shadow pool size in pages (1 to 262144, that is 1 GiB).
    #[arg(long)]
    pool_pages: Option<u64>,
    /// Write the guest-operation stream to this trace file (see docs/TRACE.md).
    #[arg(long)]
    record: Option<PathBuf>,
    /// Print one JSON object instead of the summary table.
    #[arg(long)]
    json: bool,
    /// Out-of-sync shadows on or off (default: the simulator's; sim backend only).
    #[arg(long, value_name = "on|off", value_parser = simrun::parse_on_off)]
    out_of_sync: Option<bool>,
}

/// Runs it; exit code 1 if the oracle, the auditor or the guest found anything wrong.
pub fn run(args: &Args) -> Result<ExitCode, String> {
    let backend = simrun::parse_backend(&args.backend)?;
    let spec = simrun::resolve_spec(
        args.guest.as_deref(),
        &args.workload,
        args.pair.as_deref(),
        args.size,
        args.seed,
    )?;
    let pool_pages = args.pool_pages.map(simrun::check_pool_pages).transpose()?;
    if backend != Backend::Sim {
        if args.record.is_some() {
            return Err("--record works with --backend sim only".into());
        }
        if args.out_of_sync.is_some() {
            return Err("--out-of-sync works with --backend sim only".into());
        }
        return kvm_cmd::run(backend, &spec, pool_pages, args.json);
    }
    let opts = MachineOptions {
        pool_pages,
        sample_every: 0,
        out_of_sync: args.out_of_sync,
    };
    let mut backend = simrun::sim_backend(&spec, opts)?;
    let bar = progress::bar(spec.size, &format!("{} {}", spec.guest, spec.workload));
    let mut tick = |done: u64, _total: u64| bar.set_position(done);
    let started = Instant::now();
    let counters = match &args.record {
        None => shadow2_guest::run(&spec, &mut backend, &mut tick),
        Some(path) => {
            let file =
                File::create(path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
            let header = TraceHeader::for_run(&spec, &args.backend);
            let mut recorder = Recorder::new(&mut backend, BufWriter::new(file), header)
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            let counters = shadow2_guest::run(&spec, &mut recorder, &mut tick);
            recorder
                .finish()
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            counters
        }
    };
    bar.finish_and_clear();
    let counters =
        counters.map_err(|e| format!("{} {} on {}: {e}", spec.guest, spec.workload, spec.pair))?;
    let report = backend.report();
    let result = simrun::result_of(&spec, &args.backend, &counters, &report, started);
    simrun::print_run(&result, &report, args.json, None)
}

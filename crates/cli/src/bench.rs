//! `shadow2 bench`: every workload on every pair each guest model runs, with the oracle on,
//! measuring traps per guest operation and engine time per trap; writes `bench.json` for
//! `shadow2 report`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Mutex;
use std::thread;
use std::time::Instant;

use shadow2_guest::{GuestModel, RunSpec, Workload};

use crate::bench_kvm;
use crate::goals;
use crate::progress;
use crate::result::{BenchResults, RunResult, bench_table};
use crate::simrun::{self, Backend, MachineOptions};

/// Options of `bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Multiplies every workload's default size.
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Only this guest model.
    #[arg(long)]
    guest: Option<String>,
    /// Only this workload.
    #[arg(long)]
    workload: Option<String>,
    /// Seed of the guest models' choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Backend: sim (every workload, every pair, in parallel) or kvm (forkwait and demand
    /// on the engine's shadows and natively under KVM, one after the other).
    #[arg(long, default_value = "sim")]
    backend: String,
    /// Where to write the results (read by `shadow2 report`).
    #[arg(long, default_value = "target/shadow2/bench.json")]
    out: PathBuf,
    /// Print one JSON object (the results without pool series) instead of the table.
    #[arg(long)]
    json: bool,
    /// Out-of-sync shadows on or off (default: the simulator's; sim backend only).
    #[arg(long, value_name = "on|off", value_parser = simrun::parse_on_off)]
    out_of_sync: Option<bool>,
}

/// `workload`'s default size times `--scale`, at least 1 and at most its largest.
pub fn scaled_size(workload: Workload, scale: f64) -> Result<u64, String> {
    if !(scale.is_finite() && scale > 0.0 && scale <= 1000.0) {
        return Err(format!("--scale {scale} is out of range (0, 1000]"));
    }
    Ok(((workload.default_size() as f64 * scale).round() as u64).clamp(1, workload.max_size()))
}

/// The bench results already in `path`, if it holds any this build reads.
pub fn existing(path: &Path) -> Result<Option<BenchResults>, String> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(None);
    };
    Ok(serde_json::from_str::<BenchResults>(&text)
        .ok()
        .filter(|b| b.version <= crate::result::BENCH_VERSION))
}

/// Writes bench results to `path`, creating its directory.
pub fn write(path: &Path, bench: &BenchResults) -> Result<(), String> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let json = serde_json::to_string(bench).map_err(|e| e.to_string())?;
    std::fs::write(path, json).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// A bench run: the spec and its pool (None: the default).
type BenchRun = (RunSpec, Option<usize>);

fn specs(args: &Args) -> Result<Vec<BenchRun>, String> {
    let guests: Vec<GuestModel> = match &args.guest {
        Some(g) => vec![simrun::parse_guest(g)?],
        None => GuestModel::ALL.to_vec(),
    };
    let workloads: Vec<Workload> = match &args.workload {
        Some(w) => vec![simrun::parse_workload(w)?],
        None => Workload::ALL.to_vec(),
    };
    let mut out = Vec::new();
    for &guest in &guests {
        for &pair in guest.pairs() {
            for &workload in &workloads {
                let size = scaled_size(workload, args.scale)?;
                let spec = RunSpec {
                    guest,
                    workload,
                    size,
                    pair,
                    seed: args.seed,
                };
                spec.validate().map_err(|e| e.to_string())?;
                out.push((spec, None));
            }
        }
    }
    out.extend(goal_runs(args, &guests, &workloads)?);
    Ok(out)
}

/// The runs issue 12's goal rows need beyond the defaults: every linux64 4on4 workload at
/// 1/16 of the default pool, ctxswitch at a 32-page pool, demand at 256 MiB.
fn goal_runs(
    args: &Args,
    guests: &[GuestModel],
    workloads: &[Workload],
) -> Result<Vec<BenchRun>, String> {
    let mut out = Vec::new();
    if !guests.contains(&GuestModel::Linux64) {
        return Ok(out);
    }
    let pair = shadow2_guest::PairName::new(4, 4);
    for &workload in workloads {
        let spec = RunSpec {
            guest: GuestModel::Linux64,
            workload,
            size: scaled_size(workload, args.scale)?,
            pair,
            seed: args.seed,
        };
        out.push((spec, Some(goals::PRESSURE_POOL_PAGES)));
        if workload == Workload::Ctxswitch {
            out.push((spec, Some(goals::CTXSWITCH_TINY_POOL_PAGES)));
        }
        if workload == Workload::Demand {
            let size = ((goals::POOL_RATIO_DEMAND_MIB as f64 * args.scale).round() as u64)
                .clamp(1, workload.max_size());
            out.push((RunSpec { size, ..spec }, None));
        }
    }
    Ok(out)
}

/// A finished run, and what it found wrong if anything.
type Outcome = Result<(RunResult, Option<String>), String>;

fn one((spec, pool_pages): &BenchRun, out_of_sync: Option<bool>) -> Outcome {
    let opts = MachineOptions {
        pool_pages: *pool_pages,
        sample_every: (spec.size * 20).max(200),
        out_of_sync,
    };
    let mut backend = simrun::sim_backend(spec, opts)?;
    let started = Instant::now();
    let counters = shadow2_guest::run(spec, &mut backend, &mut |_, _| {})
        .map_err(|e| format!("{} {} on {}: {e}", spec.guest, spec.workload, spec.pair))?;
    let report = backend.report();
    let result = simrun::result_of(spec, "sim", &counters, &report, started);
    let problem = simrun::problems(&result, &report);
    Ok((result, problem))
}

/// Runs the bench; exit code 1 if any run found a problem.
pub fn run(args: &Args) -> Result<ExitCode, String> {
    match simrun::parse_backend(&args.backend)? {
        Backend::Sim => {}
        Backend::Kvm => {
            return bench_kvm::run(&bench_kvm::Options {
                scale: args.scale,
                guest: args.guest.as_deref(),
                workload: args.workload.as_deref(),
                seed: args.seed,
                out: &args.out,
                json: args.json,
            });
        }
        Backend::Native => {
            return Err(
                "bench --backend kvm runs native KVM beside the engine; there is no native-only bench"
                    .into(),
            );
        }
    }
    let specs = specs(args)?;
    let bar = progress::bar(specs.len() as u64, "bench");
    let next = Mutex::new(0usize);
    let results: Mutex<Vec<Option<Outcome>>> = Mutex::new(vec![None; specs.len()]);
    let workers = thread::available_parallelism().map_or(2, |n| n.get());
    thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                loop {
                    let i = {
                        let Ok(mut n) = next.lock() else { return };
                        let i = *n;
                        *n += 1;
                        i
                    };
                    let Some(spec) = specs.get(i) else { return };
                    let r = one(spec, args.out_of_sync);
                    if let Ok(mut all) = results.lock()
                        && let Some(slot) = all.get_mut(i)
                    {
                        *slot = Some(r);
                    }
                    bar.inc(1);
                }
            });
        }
    });
    bar.finish_and_clear();
    let results = results
        .into_inner()
        .map_err(|_| "a bench worker panicked".to_string())?;
    let mut runs = Vec::new();
    let mut problems = Vec::new();
    for r in results {
        let (run, problem) = r.ok_or("a bench run did not finish")??;
        runs.push(run);
        problems.extend(problem);
    }
    let mut bench = BenchResults::new(runs);
    bench.goals = goals::issue12(&bench.runs);
    // A KVM bench written to the same file is kept beside the simulator's runs.
    if let Some(before) = existing(&args.out)? {
        bench.kvm = before.kvm;
    }
    write(&args.out, &bench)?;
    if args.json {
        let mut printed = bench.clone();
        for r in &mut printed.runs {
            r.pool_series.clear();
        }
        println!(
            "{}",
            serde_json::to_string(&printed).map_err(|e| e.to_string())?
        );
    } else {
        print!("{}", bench_table(&bench.runs));
        print!("{}", goals::table(&bench.goals));
        let mismatches: u64 = bench.runs.iter().map(|r| r.oracle_mismatches).sum();
        println!(
            "bench: {} runs, {} oracle mismatches; results in {}",
            bench.runs.len(),
            mismatches,
            args.out.display()
        );
    }
    for p in &problems {
        eprintln!("shadow2: {p}");
    }
    Ok(if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

//! `shadow2 bench --backend kvm`: forkwait and demand on the engine's shadows under KVM and
//! natively under KVM, one after the other in the same run, so that the wall-time ratio
//! engine/native compares like with like; exits per guest operation for both.

use std::path::Path;
use std::process::ExitCode;

use shadow2_guest::{GuestModel, GuestOps, RunSpec, Workload};
use shadow2_kvm::{KvmBackend, NativeBackend, Probe};

use crate::kvm_cmd;
use crate::kvmrun::{self, HostProblem};
use crate::result::{BenchResults, KvmBench, ratio};

/// The workloads the KVM bench runs.
const WORKLOADS: [Workload; 2] = [Workload::Forkwait, Workload::Demand];

/// What to run: the guest (linux64 unless named; native KVM must be able to run it), sizes
/// scaled from the defaults.
pub struct Options<'a> {
    /// Multiplies every workload's default size.
    pub scale: f64,
    /// The guest model, if named.
    pub guest: Option<&'a str>,
    /// Only this workload, if named (forkwait or demand).
    pub workload: Option<&'a str>,
    /// The seed of the guest's choices.
    pub seed: u64,
    /// The bench results file to write the `kvm` section into.
    pub out: &'a Path,
    /// Print the results as one JSON object.
    pub json: bool,
}

fn specs(o: &Options<'_>) -> Result<Vec<RunSpec>, String> {
    let guest = match o.guest {
        Some(g) => crate::simrun::parse_guest(g)?,
        None => GuestModel::Linux64,
    };
    let workloads: Vec<Workload> = match o.workload {
        Some(w) => {
            let w = crate::simrun::parse_workload(w)?;
            if !WORKLOADS.contains(&w) {
                return Err(format!(
                    "bench --backend kvm runs forkwait and demand, not {}",
                    w.name()
                ));
            }
            vec![w]
        }
        None => WORKLOADS.to_vec(),
    };
    let pair = guest.pairs()[0];
    workloads
        .into_iter()
        .map(|workload| {
            let spec = RunSpec {
                guest,
                workload,
                size: crate::bench::scaled_size(workload, o.scale)?,
                pair,
                seed: o.seed,
            };
            spec.validate().map_err(|e| e.to_string())?;
            Ok(spec)
        })
        .collect()
}

/// Runs `spec` on `backend`, timed: (wall seconds, guest operations).
fn timed<B: GuestOps>(spec: &RunSpec, backend: &mut B, label: &str) -> Result<(f64, u64), String> {
    let run = kvmrun::run_recorded(spec, backend, label)?;
    if run.counters.data_errors > 0 {
        return Err(format!(
            "{} {} on {label}: {} guest data errors",
            spec.guest, spec.workload, run.counters.data_errors
        ));
    }
    Ok((run.wall_s, run.counters.guest_ops))
}

fn one(probe: &Probe, spec: &RunSpec) -> Result<KvmBench, String> {
    let pool = kvmrun::default_pool_pages(spec)?;
    let config = kvmrun::kvm_config(spec, pool);
    let mut engine = KvmBackend::new(probe, &config)
        .map_err(|e| format!("cannot build the KVM machine: {e}"))?;
    let (engine_wall_s, guest_ops) = timed(spec, &mut engine, "kvm")?;
    let mut native = NativeBackend::new(probe, &config)
        .map_err(|e| format!("cannot build the native KVM machine: {e}"))?;
    let (native_wall_s, native_ops) = timed(spec, &mut native, "native")?;
    if native_ops != guest_ops {
        return Err(format!(
            "{} {}: {guest_ops} guest operations on the engine's shadows, {native_ops} natively",
            spec.guest, spec.workload
        ));
    }
    let per_op = |exits: u64| ratio(exits as f64, guest_ops as f64);
    Ok(KvmBench {
        guest: spec.guest.name().into(),
        workload: spec.workload.name().into(),
        pair: spec.pair.to_string(),
        size: spec.size,
        seed: spec.seed,
        guest_ops,
        engine_wall_s,
        native_wall_s,
        wall_ratio: ratio(engine_wall_s, native_wall_s),
        engine_exits_per_op: per_op(engine.exits().total),
        native_exits_per_op: per_op(native.exits().total),
    })
}

/// The KVM bench as a text table, one line per workload.
pub fn table(rows: &[KvmBench]) -> String {
    let mut out = format!(
        "{:<10}{:>6}{:>11}{:>13}{:>13}{:>15}{:>17}{:>17}\n",
        "workload",
        "size",
        "guest ops",
        "engine wall",
        "native wall",
        "engine/native",
        "engine exits/op",
        "native exits/op"
    );
    for r in rows {
        out.push_str(&format!(
            "{:<10}{:>6}{:>11}{:>13}{:>13}{:>15}{:>17}{:>17}\n",
            r.workload,
            r.size,
            r.guest_ops,
            crate::result::fmt_secs(r.engine_wall_s),
            crate::result::fmt_secs(r.native_wall_s),
            crate::result::fmt_f64(r.wall_ratio),
            crate::result::fmt_f64(r.engine_exits_per_op),
            crate::result::fmt_f64(r.native_exits_per_op)
        ));
    }
    out
}

/// Runs the KVM bench and writes its section into the bench results file (the simulator's
/// runs already there are kept).
pub fn run(o: &Options<'_>) -> Result<ExitCode, String> {
    let specs = specs(o)?;
    let Some(first) = specs.first() else {
        return Err("nothing to run".into());
    };
    let probe = match kvmrun::probe_for(first) {
        Ok(p) => p,
        Err(problem) => return Ok(kvm_cmd::host_problem(&problem)),
    };
    if let Some(why) = crate::native::cannot_run(first) {
        return Ok(kvm_cmd::host_problem(&HostProblem(why)));
    }
    let rows = specs
        .iter()
        .map(|spec| one(&probe, spec))
        .collect::<Result<Vec<_>, _>>()?;
    let mut bench = crate::bench::existing(o.out)?.unwrap_or_else(|| BenchResults::new(Vec::new()));
    bench.kvm = rows;
    crate::bench::write(o.out, &bench)?;
    if o.json {
        let printed = BenchResults {
            runs: Vec::new(),
            ..bench.clone()
        };
        println!(
            "{}",
            serde_json::to_string(&printed).map_err(|e| e.to_string())?
        );
    } else {
        println!("{} on {} under KVM", first.guest, first.pair);
        print!("{}", table(&bench.kvm));
        println!("bench --backend kvm: results in {}", o.out.display());
    }
    Ok(ExitCode::SUCCESS)
}

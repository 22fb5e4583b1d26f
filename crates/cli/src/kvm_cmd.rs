//! `shadow2 run --backend kvm|native`: the workload on KVM, the same spec on the simulator
//! and (where the host can) on native KVM, each with the outcome recorder; the summary adds
//! VM exits by kind, exits per guest operation and the differences between the backends.

use std::collections::BTreeSet;
use std::process::ExitCode;
use std::time::Instant;

use shadow2_guest::RunSpec;

use crate::kvmrun::{self, Comparison, HostProblem};
use crate::native;
use crate::result::{Differences, RunResult};
use crate::simrun::{self, Backend};

/// Exit code of a host that cannot run the command (no KVM, no permission, a pair the
/// probe skips): the user asked for something this machine cannot do.
pub const HOST_PROBLEM: u8 = 2;

/// Prints `problem` as the command's one line and gives the exit code for it.
pub fn host_problem(problem: &HostProblem) -> ExitCode {
    eprintln!("shadow2: {}", problem.0);
    ExitCode::from(HOST_PROBLEM)
}

/// Runs `spec` on `backend` (kvm or native) and compares it with the others.
pub fn run(
    backend: Backend,
    spec: &RunSpec,
    pool_pages: Option<usize>,
    json: bool,
) -> Result<ExitCode, String> {
    let probe = match kvmrun::probe_for(spec) {
        Ok(p) => p,
        Err(problem) => return Ok(host_problem(&problem)),
    };
    let pool = match pool_pages {
        Some(p) => p,
        None => kvmrun::default_pool_pages(spec)?,
    };
    match backend {
        Backend::Kvm => run_kvm(&probe, spec, pool, json),
        Backend::Native => native::run(&probe, spec, pool, json),
        Backend::Sim => Err("the simulator is not a KVM backend".into()),
    }
}

fn run_kvm(
    probe: &shadow2_kvm::Probe,
    spec: &RunSpec,
    pool: usize,
    json: bool,
) -> Result<ExitCode, String> {
    let mut kvm = kvmrun::kvm_backend(probe, spec, pool)?;
    let on_kvm = kvmrun::run_recorded(spec, &mut kvm, "kvm")?;
    let (sim, on_sim) = kvmrun::sim_recorded(spec, pool)?;
    let vs_sim = kvmrun::compare(
        spec,
        &on_kvm,
        kvmrun::kvm_memory(&kvm),
        &on_sim,
        kvmrun::sim_memory(&sim),
        &BTreeSet::new(),
    )?;
    let vs_native = native::compare_with(probe, spec, pool, &on_kvm, kvmrun::kvm_memory(&kvm))?;

    let mut result = kvmrun::kvm_result(spec, &kvm, &on_kvm);
    let sim_report = sim.report();
    let mut sim_result =
        simrun::result_of(spec, "sim", &on_sim.counters, &sim_report, Instant::now());
    sim_result.wall_s = on_sim.wall_s;
    sim_result.fill_ratios();
    result.differences = Some(Differences {
        vs_sim: Some(vs_sim.count()),
        vs_native: vs_native.as_ref().ok().map(Comparison::count),
    });
    result.native_skipped = vs_native.as_ref().err().cloned();

    let mut problems = Vec::new();
    problems.extend(vs_sim.describe("the simulator"));
    if let Ok(c) = &vs_native {
        problems.extend(c.describe("native KVM"));
    }
    problems.extend(simrun::problems(&sim_result, &sim_report));
    problems.extend(engine_problems(&result));

    if json {
        println!(
            "{}",
            serde_json::to_string(&result).map_err(|e| e.to_string())?
        );
    } else {
        print!("{}", result.summary_table());
        print!("{}", exits_table(&result));
        print!(
            "{}",
            kvmrun::side_by_side(&sim_result, &result, &kvm.exits())
        );
        println!(
            "wall time: kvm {}, sim {}",
            crate::result::fmt_secs(result.wall_s),
            crate::result::fmt_secs(sim_result.wall_s)
        );
        println!("{}", differences_line(&result));
    }
    Ok(finish(&problems))
}

/// What the engine's own checks found on a KVM run, in words.
pub fn engine_problems(r: &RunResult) -> Option<String> {
    let mut what = Vec::new();
    if r.audit_violations > 0 {
        what.push(format!("{} audit violations", r.audit_violations));
    }
    if r.data_errors > 0 {
        what.push(format!("{} guest data errors", r.data_errors));
    }
    (!what.is_empty()).then(|| format!("{}: {}", r.name(), what.join("; ")))
}

/// Prints the problems (one line each on stderr) and gives the exit code: 1 if any.
pub fn finish(problems: &[String]) -> ExitCode {
    for p in problems {
        eprintln!("shadow2: {p}");
    }
    if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// VM exits by kind, then exits per guest operation.
pub fn exits_table(r: &RunResult) -> String {
    let mut out = String::new();
    if let Some(exits) = &r.vm_exits {
        let w = exits.keys().map(|k| k.len()).max().unwrap_or(0);
        for (kind, n) in exits {
            out.push_str(&format!("VM exits: {kind:<w$}  {n:>10}\n"));
        }
    }
    if let Some(e) = r.exits_per_op {
        out.push_str(&format!(
            "VM exits per guest operation: {}\n",
            crate::result::fmt_f64(e)
        ));
    }
    out
}

/// "differences: vs sim N, vs native M" (or why native was not compared).
pub fn differences_line(r: &RunResult) -> String {
    let d = r.differences.unwrap_or_default();
    let count = |c: Option<u64>| c.map_or("not compared".to_string(), |n| n.to_string());
    let mut line = format!(
        "differences: vs sim {}, vs native {}",
        count(d.vs_sim),
        count(d.vs_native)
    );
    if let Some(why) = &r.native_skipped {
        line.push_str(&format!(" ({why})"));
    }
    line
}

//! Native KVM: the guest on its own page tables under KVM's paging, no engine. The third
//! backend of the differential.

use std::collections::BTreeSet;
use std::process::ExitCode;

use shadow2_guest::RunSpec;
use shadow2_kvm::{NativeBackend, Probe};

use crate::kvm_cmd;
use crate::kvmrun::{self, Comparison, HostProblem, PageReader, Recorded};
use crate::result::{Differences, RunResult};
use crate::simrun;

/// Guest-physical words a native run owns rather than the guest: none. `NativeBackend`
/// runs the hardware on its own copy of the guest's top-level table, with the hole's entry
/// only there (see its module docs), so every word of guest RAM is the guest's.
fn vmm_words() -> BTreeSet<u64> {
    BTreeSet::new()
}

/// A reader of the native machine's guest-physical memory.
fn native_memory(native: &NativeBackend) -> PageReader<'_> {
    Box::new(|gpa, buf| {
        native
            .read_guest_phys(gpa, buf)
            .map_err(|e| format!("native guest memory at {gpa:#x}: {e}"))
    })
}

/// Builds a native backend for `spec`, or says why this host cannot run it natively.
fn native_backend(probe: &Probe, spec: &RunSpec, pool: usize) -> Result<NativeBackend, String> {
    NativeBackend::new(probe, &kvmrun::kvm_config(spec, pool))
        .map_err(|e| format!("cannot build the native KVM machine: {e}"))
}

/// Runs `spec` natively, recorded.
pub fn recorded(
    probe: &Probe,
    spec: &RunSpec,
    pool: usize,
) -> Result<(NativeBackend, Recorded), String> {
    let mut native = native_backend(probe, spec, pool)?;
    let run = kvmrun::run_recorded(spec, &mut native, "native")?;
    Ok((native, run))
}

/// Why native KVM cannot run `spec`, if it cannot.
pub fn cannot_run(spec: &RunSpec) -> Option<String> {
    NativeBackend::can_run(&spec.paging_levels())
        .err()
        .map(|why| format!("{} cannot run natively: {why}", spec.guest))
}

/// Runs `spec` natively and compares it with `reference`: `Ok(Err(why))` when native KVM
/// cannot run the guest.
pub fn compare_with(
    probe: &Probe,
    spec: &RunSpec,
    pool: usize,
    reference: &Recorded,
    reference_memory: PageReader<'_>,
) -> Result<Result<Comparison, String>, String> {
    if let Some(why) = cannot_run(spec) {
        return Ok(Err(why));
    }
    let (native, run) = recorded(probe, spec, pool)?;
    let comparison = kvmrun::compare(
        spec,
        reference,
        reference_memory,
        &run,
        native_memory(&native),
        &vmm_words(),
    )?;
    Ok(Ok(comparison))
}

/// What a native run did, as a [`RunResult`]: no engine, so no pool and no audit; the
/// faults KVM reflected to the guest are its traps.
fn native_result(spec: &RunSpec, native: &NativeBackend, run: &Recorded) -> RunResult {
    let exits = native.exits();
    let c = &run.counters;
    let mut traps = kvmrun::kvm_traps(&exits, 0);
    traps.remove("fast_path");
    let mut r = RunResult {
        workload: spec.workload.name().into(),
        guest: spec.guest.name().into(),
        pair: spec.pair.to_string(),
        backend: "native".into(),
        size: spec.size,
        seed: spec.seed,
        guest_ops: c.guest_ops,
        traps,
        demand_faults: c.demand_faults,
        workload_steps: c.workload_steps,
        cow_faults: c.cow_faults,
        kills: c.kills,
        data_errors: c.data_errors,
        wall_s: run.wall_s,
        digest: format!("{:016x}", c.digest),
        ..RunResult::default()
    };
    r.fill_ratios();
    kvmrun::set_exits(&mut r, &exits);
    r
}

/// `run --backend native`: the guest natively, compared with the simulator (the engine on
/// KVM is compared with native by `--backend kvm`).
pub fn run(probe: &Probe, spec: &RunSpec, pool: usize, json: bool) -> Result<ExitCode, String> {
    if let Some(why) = cannot_run(spec) {
        return Ok(kvm_cmd::host_problem(&HostProblem(why)));
    }
    let (native, on_native) = recorded(probe, spec, pool)?;
    let (sim, on_sim) = kvmrun::sim_recorded(spec, pool)?;
    let vs_sim = kvmrun::compare(
        spec,
        &on_native,
        native_memory(&native),
        &on_sim,
        kvmrun::sim_memory(&sim),
        &vmm_words(),
    )?;
    let mut result = native_result(spec, &native, &on_native);
    result.differences = Some(Differences {
        vs_sim: Some(vs_sim.count()),
        vs_native: None,
    });
    result.native_skipped = Some("this run is the native one".into());
    let sim_report = sim.report();
    let mut sim_result = simrun::result_of(
        spec,
        "sim",
        &on_sim.counters,
        &sim_report,
        std::time::Instant::now(),
    );
    sim_result.wall_s = on_sim.wall_s;
    sim_result.fill_ratios();
    let mut problems = Vec::new();
    problems.extend(vs_sim.describe("the simulator"));
    problems.extend(simrun::problems(&sim_result, &sim_report));
    problems.extend(kvm_cmd::engine_problems(&result));
    if json {
        println!(
            "{}",
            serde_json::to_string(&result).map_err(|e| e.to_string())?
        );
    } else {
        print!("{}", result.summary_table());
        print!("{}", kvm_cmd::exits_table(&result));
        println!(
            "wall time: native {}, sim {}",
            crate::result::fmt_secs(result.wall_s),
            crate::result::fmt_secs(sim_result.wall_s)
        );
        println!("{}", kvm_cmd::differences_line(&result));
    }
    Ok(kvm_cmd::finish(&problems))
}

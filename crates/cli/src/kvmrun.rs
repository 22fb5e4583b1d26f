//! Running a workload on KVM: the engine's shadows on real vcpus (`kvm`) or the guest's own
//! tables under KVM's paging (`native`), each with the per-operation outcome recorder, and
//! the comparison of two runs (outcomes op by op, final guest memory word by word).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use shadow2::audit::audit;
use shadow2::paging::PagingLevels;
use shadow2::remove::TeardownHints;
use shadow2_guest::outcomes::{self, Outcomes};
use shadow2_guest::{Counters, GuestOps, RunSpec};
use shadow2_kvm::{ExitCounts, KvmBackend, KvmBackendConfig, Probe};
use shadow2_machine::backend::{SimBackend, SimConfig};

use crate::memdiff::{self, MemoryDiff};
use crate::progress;
use crate::result::RunResult;

/// Why this host cannot run a KVM command: one line, printed as is (exit code 2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostProblem(pub String);

/// Probes KVM and checks that it runs `spec`'s pair.
pub fn probe_for(spec: &RunSpec) -> Result<Probe, HostProblem> {
    let probe = Probe::run().map_err(|e| HostProblem(format!("KVM unavailable: {e}")))?;
    let pair = spec.pair.to_string();
    if let Some((_, why)) = probe.skipped.iter().find(|(p, _)| p.name() == pair) {
        return Err(HostProblem(format!(
            "this host cannot run {pair} under KVM: {why}"
        )));
    }
    if !probe.runnable.iter().any(|p| p.name() == pair) {
        return Err(HostProblem(format!(
            "this host cannot run {pair} under KVM: the probe does not list it ({probe})"
        )));
    }
    Ok(probe)
}

/// The shadow pool a run of `spec` gets by default: the simulator's, so both run alike.
pub fn default_pool_pages(spec: &RunSpec) -> Result<usize, String> {
    let levels = PagingLevels::from_count(spec.pair.shadow)
        .ok_or_else(|| format!("no shadow paging with {} levels", spec.pair.shadow))?;
    Ok(SimConfig::new(levels, spec.guest.vcpus(), spec.ram_frames()).pool_pages)
}

/// A KVM backend on the engine's shadows for `spec`.
pub fn kvm_backend(probe: &Probe, spec: &RunSpec, pool_pages: usize) -> Result<KvmBackend, String> {
    KvmBackend::new(probe, &kvm_config(spec, pool_pages))
        .map_err(|e| format!("cannot build the KVM machine: {e}"))
}

/// The KVM machine for `spec`: each vcpu of a guest with several on a thread of its own.
pub fn kvm_config(spec: &RunSpec, pool_pages: usize) -> KvmBackendConfig {
    KvmBackendConfig {
        ram_frames: spec.ram_frames(),
        vcpus: spec.guest.vcpus(),
        pool_pages,
        linear_maps: shadow2_guest::linear_map_hints(spec),
        teardown: TeardownHints::ALL,
        vcpu_threads: spec.guest.vcpus() > 1,
    }
}

/// What one recorded run of a guest did.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// The guest's counters.
    pub counters: Counters,
    /// One outcome hash per guest operation.
    pub hashes: Vec<u64>,
    /// Seconds of wall-clock time for the run.
    pub wall_s: f64,
}

/// Runs `spec` on `backend` with the outcome recorder; a progress bar labelled `label` on a
/// terminal.
pub fn run_recorded<B: GuestOps>(
    spec: &RunSpec,
    backend: &mut B,
    label: &str,
) -> Result<Recorded, String> {
    let bar = progress::bar(
        spec.size,
        &format!("{label}: {} {}", spec.guest, spec.workload),
    );
    let mut tick = |done: u64, _total: u64| bar.set_position(done);
    let mut recorder = Outcomes::new(backend);
    let started = Instant::now();
    let counters = shadow2_guest::run(spec, &mut recorder, &mut tick);
    let wall_s = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let counters = counters.map_err(|e| {
        format!(
            "{} {} on {} ({label}): {e}",
            spec.guest, spec.workload, spec.pair
        )
    })?;
    Ok(Recorded {
        counters,
        hashes: recorder.into_parts().1,
        wall_s,
    })
}

/// How a run differs from another: operations, then final guest memory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Comparison {
    /// Operations whose outcomes differ, plus the difference in their number.
    pub ops: u64,
    /// The first operation that differs.
    pub first_op: Option<usize>,
    /// Final guest memory.
    pub memory: MemoryDiff,
}

impl Comparison {
    /// The count `differences` reports.
    pub fn count(&self) -> u64 {
        self.ops + self.memory.words
    }

    /// Where the first differences are, in words (for stderr), or `None` if there are none.
    pub fn describe(&self, against: &str) -> Option<String> {
        if self.count() == 0 {
            return None;
        }
        let mut what = Vec::new();
        if self.ops > 0 {
            what.push(format!(
                "{} operations differ (first: operation {})",
                self.ops,
                self.first_op.map_or("?".into(), |i| i.to_string())
            ));
        }
        if self.memory.words > 0 {
            what.push(format!(
                "{} words of final guest memory differ (first at gpa {})",
                self.memory.words,
                self.memory
                    .first
                    .map_or("?".into(), |gpa| format!("{gpa:#x}"))
            ));
        }
        Some(format!("against {against}: {}", what.join("; ")))
    }
}

/// Reads a guest page of one backend into the buffer.
pub type PageReader<'a> = Box<dyn FnMut(u64, &mut [u8]) -> Result<(), String> + 'a>;

/// A reader of the simulator's guest-physical memory.
pub fn sim_memory(sim: &SimBackend) -> PageReader<'_> {
    Box::new(|gpa, buf| {
        sim.machine()
            .read_phys(shadow2::Gpa::new(gpa), buf)
            .map_err(|e| format!("simulator memory at {gpa:#x}: {e:?}"))
    })
}

/// A reader of the KVM machine's guest-physical memory.
pub fn kvm_memory(kvm: &KvmBackend) -> PageReader<'_> {
    Box::new(|gpa, buf| {
        kvm.read_guest_phys(gpa, buf)
            .map_err(|e| format!("KVM guest memory at {gpa:#x}: {e}"))
    })
}

/// Compares two recorded runs of `spec` and their final guest memory; words in
/// `left_out` (a backend's own, documented by it) are not compared.
pub fn compare(
    spec: &RunSpec,
    a: &Recorded,
    a_memory: PageReader<'_>,
    b: &Recorded,
    b_memory: PageReader<'_>,
    left_out: &BTreeSet<u64>,
) -> Result<Comparison, String> {
    Ok(Comparison {
        ops: outcomes::differences(&a.hashes, &b.hashes),
        first_op: outcomes::first_difference(&a.hashes, &b.hashes),
        memory: memdiff::compare(spec.ram_frames(), a_memory, b_memory, left_out)?,
    })
}

/// The simulator run of `spec` a KVM run is compared with.
pub fn sim_recorded(spec: &RunSpec, pool_pages: usize) -> Result<(SimBackend, Recorded), String> {
    let opts = crate::simrun::MachineOptions {
        pool_pages: Some(pool_pages),
        sample_every: 0,
        out_of_sync: None,
    };
    let mut sim = crate::simrun::sim_backend(spec, opts)?;
    let recorded = run_recorded(spec, &mut sim, "sim")?;
    Ok((sim, recorded))
}

/// The trap kinds of a KVM run, named as the simulator's where they are the same event:
/// every page fault by the engine's answer, and the privileged instructions (MOV CR0,
/// MOV CR3, INVLPG) together, as the executor traps on each. `fast_path` (propagated faults
/// the engine answered from the shadow entry alone) is a part of `propagated`, from the
/// engine's statistics.
pub fn kvm_traps(exits: &ExitCounts, fast_path: u64) -> BTreeMap<String, u64> {
    let kinds = [
        ("shadow_fills", exits.pf_fixed),
        ("spurious", exits.pf_spurious),
        ("propagated", exits.pf_propagated),
        ("emulated_writes", exits.pf_emulated),
        ("mmio", exits.pf_mmio),
        ("privileged", exits.privileged),
    ];
    let total = kinds.iter().map(|(_, n)| n).sum();
    kinds
        .into_iter()
        .chain([("fast_path", fast_path), (crate::result::TOTAL, total)])
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
}

/// What a run on the engine's shadows under KVM did, as a [`RunResult`].
pub fn kvm_result(spec: &RunSpec, kvm: &KvmBackend, run: &Recorded) -> RunResult {
    // The exits first: the machine stays locked while its domain is read below.
    let exits = kvm.exits();
    let machine = kvm.machine();
    let domain = machine.domain();
    let stats = domain.stats();
    let c = &run.counters;
    let mut r = RunResult {
        workload: spec.workload.name().into(),
        guest: spec.guest.name().into(),
        pair: spec.pair.to_string(),
        backend: "kvm".into(),
        size: spec.size,
        seed: spec.seed,
        guest_ops: c.guest_ops,
        traps: kvm_traps(&exits, stats.fast_path),
        demand_faults: c.demand_faults,
        workload_steps: c.workload_steps,
        cow_faults: c.cow_faults,
        kills: c.kills,
        data_errors: c.data_errors,
        unshadows: stats.unshadows,
        evictions: stats.evictions,
        pool_pages: domain.pool().total_pages() as u64,
        pool_peak_pages: domain.pool().peak_used_pages() as u64,
        max_call_work: stats.max_call_work,
        audit_violations: audit(domain).violations.len() as u64,
        wall_s: run.wall_s,
        digest: format!("{:016x}", c.digest),
        ..RunResult::default()
    };
    r.fill_ratios();
    set_exits(&mut r, &exits);
    r
}

/// Fills `vm_exits` and `exits_per_op`.
pub fn set_exits(r: &mut RunResult, exits: &ExitCounts) {
    r.vm_exits = Some(
        exits
            .by_kind()
            .iter()
            .map(|&(k, v)| (k.to_owned(), v))
            .collect(),
    );
    r.exits_per_op = Some(crate::result::ratio(exits.total as f64, r.guest_ops as f64));
}

/// The simulator's traps next to KVM's exits, kind by kind, as text.
pub fn side_by_side(sim: &RunResult, kvm: &RunResult, exits: &ExitCounts) -> String {
    let sim_trap = |k: &str| sim.traps.get(k).copied().unwrap_or(0);
    let privileged = sim_trap("cr3_writes") + sim_trap("invlpg") + sim_trap("mode_changes");
    let kvm_trap = |k: &str| kvm.traps.get(k).copied().unwrap_or(0);
    let rows: [(&str, Option<u64>, u64); 13] = [
        ("#PF fixed", Some(sim_trap("shadow_fills")), exits.pf_fixed),
        (
            "#PF spurious",
            Some(sim_trap("spurious")),
            exits.pf_spurious,
        ),
        (
            "#PF propagated",
            Some(sim_trap("propagated")),
            exits.pf_propagated,
        ),
        (
            "  of which fast path",
            Some(sim_trap("fast_path")),
            kvm_trap("fast_path"),
        ),
        (
            "#PF emulated",
            Some(sim_trap("emulated_writes")),
            exits.pf_emulated,
        ),
        ("#PF mmio", Some(sim_trap("mmio")), exits.pf_mmio),
        ("CR0/CR3/INVLPG", Some(privileged), exits.privileged),
        ("single steps", None, exits.single_steps),
        ("fetches", None, exits.fetches),
        ("other exceptions", None, exits.other_exceptions),
        ("guest I/O", None, exits.guest_io),
        ("CR3 reloads", None, exits.cr3_reloads),
        ("TLB flushes", None, exits.tlb_flushes),
    ];
    let mut out = format!(
        "{:<22}{:>12}{:>12}\n",
        "sim traps / KVM exits", "sim", "kvm"
    );
    for (label, s, k) in rows {
        let s = s.map_or("-".to_string(), |n| n.to_string());
        out.push_str(&format!("{label:<22}{s:>12}{k:>12}\n"));
    }
    out.push_str(&format!(
        "{:<22}{:>12}{:>12}\n",
        "total",
        sim.total_traps(),
        exits.total
    ));
    out.push_str(
        "(rows with no sim count are the KVM backend's own exits, which a simulated access does \
         not take: guest I/O ends each load and store, a single step each executed \
         instruction (two when a REP instruction traps between iterations), a fetch each \
         instruction fetch; CR3 reloads and TLB flushes are the VMM carrying out the engine's \
         flushes, not exits)\n",
    );
    out
}

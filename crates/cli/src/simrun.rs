//! Running one workload on a backend and turning what it did into a [`RunResult`]: shared
//! by `run`, `bench` and `replay`.

use std::process::ExitCode;
use std::time::Instant;

use shadow2::paging::PagingLevels;
use shadow2::remove::TeardownHints;
use shadow2_guest::{Counters, GuestModel, PairName, RunSpec, Workload};
use shadow2_machine::backend::{SimBackend, SimConfig, SimReport};

use crate::result::RunResult;

/// The backends `--backend` names.
pub const BACKENDS: [&str; 3] = ["sim", "kvm", "native"];

/// A `--backend` value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The simulated machine.
    Sim,
    /// KVM vcpus on the engine's shadows.
    Kvm,
    /// KVM vcpus on the guest's own tables (no engine).
    Native,
}

impl Backend {
    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Sim => "sim",
            Backend::Kvm => "kvm",
            Backend::Native => "native",
        }
    }
}

/// Parses a `--backend` value.
pub fn parse_backend(name: &str) -> Result<Backend, String> {
    match name {
        "sim" => Ok(Backend::Sim),
        "kvm" => Ok(Backend::Kvm),
        "native" => Ok(Backend::Native),
        other => Err(format!(
            "unknown backend {other:?} (one of {})",
            BACKENDS.join(", ")
        )),
    }
}

/// Checks the backend a trace was recorded on: traces replay on the simulator only.
pub fn check_backend(name: &str) -> Result<(), String> {
    match parse_backend(name)? {
        Backend::Sim => Ok(()),
        other => Err(format!(
            "backend {} cannot replay traces (recorded with --backend sim only)",
            other.name()
        )),
    }
}

/// Options of the simulated machine a run may change.
#[derive(Clone, Copy, Debug, Default)]
pub struct MachineOptions {
    /// Shadow pool pages (default: the simulator's).
    pub pool_pages: Option<usize>,
    /// Guest operations between pool-occupancy samples (0: the simulator's default).
    pub sample_every: u64,
    /// Out-of-sync shadows on or off (default: the simulator's).
    pub out_of_sync: Option<bool>,
}

/// Parses an `on`/`off` option value.
pub fn parse_on_off(value: &str) -> Result<bool, String> {
    match value {
        "on" => Ok(true),
        "off" => Ok(false),
        other => Err(format!("{other:?} is not on or off")),
    }
}

/// A `--guest` value.
pub fn parse_guest(name: &str) -> Result<GuestModel, String> {
    GuestModel::from_name(name).ok_or_else(|| {
        let names: Vec<&str> = GuestModel::ALL.iter().map(|m| m.name()).collect();
        format!("unknown guest {name:?} (one of {})", names.join(", "))
    })
}

/// A `--workload` value.
pub fn parse_workload(name: &str) -> Result<Workload, String> {
    Workload::from_name(name).ok_or_else(|| {
        let names: Vec<&str> = Workload::ALL.iter().map(|w| w.name()).collect();
        format!("unknown workload {name:?} (one of {})", names.join(", "))
    })
}

/// The run `--guest`, `--workload`, `--pair` and `--size` ask for; a pair without a guest
/// picks the guest whose levels match, a guest without a pair its first pair.
pub fn resolve_spec(
    guest: Option<&str>,
    workload: &str,
    pair: Option<&str>,
    size: Option<u64>,
    seed: u64,
) -> Result<RunSpec, String> {
    let workload = parse_workload(workload)?;
    let pair = match pair {
        Some(p) => Some(PairName::parse(p).ok_or_else(|| {
            format!(
                "unknown pair {p:?} (GonS with G in 0, 2, 3, 4 and S in 2..=4, G <= S, e.g. 4on4)"
            )
        })?),
        None => None,
    };
    let guest = match (guest, pair) {
        (Some(g), _) => parse_guest(g)?,
        (None, Some(p)) => {
            GuestModel::for_pair(p).ok_or_else(|| format!("no guest model runs on pair {p}"))?
        }
        (None, None) => GuestModel::Linux64,
    };
    let pair = pair.unwrap_or(guest.pairs()[0]);
    let spec = RunSpec {
        guest,
        workload,
        size: size.unwrap_or(workload.default_size()),
        pair,
        seed,
    };
    spec.validate().map_err(|e| e.to_string())?;
    Ok(spec)
}

/// The simulated machine for `spec`: the model's vcpus, RAM and linear-map hints, the
/// pair's shadow levels.
pub fn sim_backend(spec: &RunSpec, opts: MachineOptions) -> Result<SimBackend, String> {
    let levels = PagingLevels::from_count(spec.pair.shadow)
        .ok_or_else(|| format!("no shadow paging with {} levels", spec.pair.shadow))?;
    let mut cfg = SimConfig::new(levels, spec.guest.vcpus(), spec.ram_frames());
    cfg.linear_maps = shadow2_guest::linear_map_hints(spec);
    cfg.teardown = TeardownHints::ALL;
    if let Some(p) = opts.pool_pages {
        cfg.pool_pages = p;
    }
    if opts.sample_every > 0 {
        cfg.sample_every = opts.sample_every;
    }
    if let Some(on) = opts.out_of_sync {
        cfg.out_of_sync = on;
    }
    SimBackend::new(cfg)
}

/// What a run did, from the guest's counters and the simulator's report.
pub fn result_of(
    spec: &RunSpec,
    backend: &str,
    counters: &Counters,
    report: &SimReport,
    started: Instant,
) -> RunResult {
    let t = &report.traps;
    let traps = [
        ("shadow_fills", t.shadow_fills),
        ("spurious", t.spurious),
        ("propagated", t.propagated),
        ("fast_path", t.fast_path),
        ("emulated_writes", t.emulated_writes),
        ("mmio", t.mmio),
        ("cr3_writes", t.cr3_writes),
        ("invlpg", t.invlpg),
        ("mode_changes", t.mode_changes),
        // Fast-path hits are propagated faults too: counted once in the total.
        (crate::result::TOTAL, t.total()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let mut r = RunResult {
        workload: spec.workload.name().into(),
        guest: spec.guest.name().into(),
        pair: spec.pair.to_string(),
        backend: backend.into(),
        size: spec.size,
        seed: spec.seed,
        guest_ops: counters.guest_ops,
        traps,
        demand_faults: counters.demand_faults,
        demand_fault_traps: Some(report.attribution.demand_fault_traps),
        cow_fault_traps: Some(report.attribution.cow_fault_traps),
        workload_steps: counters.workload_steps,
        cow_faults: counters.cow_faults,
        kills: counters.kills,
        data_errors: counters.data_errors,
        unshadows: report.unshadows,
        evictions: report.evictions,
        pool_pages: report.pool_pages as u64,
        pool_peak_pages: report.pool_peak_pages as u64,
        guest_tables_at_pool_peak: Some(report.guest_tables_at_pool_peak as u64),
        max_call_work: report.max_call_work,
        oracle_mismatches: report.oracle_mismatches,
        audit_violations: report.audit_violations,
        engine_s: report.engine_seconds,
        wall_s: started.elapsed().as_secs_f64(),
        digest: format!("{:016x}", counters.digest),
        pool_series: report.pool_series.clone(),
        out_of_sync: Some(report.out_of_sync),
        oos: report
            .out_of_sync
            .then(|| report.oos_stats.iter().cloned().collect()),
        engine_stats: report.stats.iter().cloned().collect(),
        ..RunResult::default()
    };
    r.fill_ratios();
    r
}

/// Whether a run found anything wrong, in words.
pub fn problems(r: &RunResult, details: &SimReport) -> Option<String> {
    let mut what = Vec::new();
    if r.oracle_mismatches > 0 {
        what.push(format!(
            "{} oracle mismatches (first: {})",
            r.oracle_mismatches,
            details.first_mismatches.first().map_or("?", String::as_str)
        ));
    }
    if r.audit_violations > 0 {
        what.push(format!(
            "{} audit violations (first: {})",
            r.audit_violations,
            details
                .first_audit_violations
                .first()
                .map_or("?", String::as_str)
        ));
    }
    if r.data_errors > 0 {
        what.push(format!("{} guest data errors", r.data_errors));
    }
    (!what.is_empty()).then(|| format!("{}: {}", r.name(), what.join("; ")))
}

/// Prints a run: one JSON object (without the pool series), or the summary table and then
/// `trailer`. Exit code 1, with the problems on stderr, if the run found any.
pub fn print_run(
    result: &RunResult,
    report: &SimReport,
    json: bool,
    trailer: Option<&str>,
) -> Result<ExitCode, String> {
    if json {
        let mut printed = result.clone();
        printed.pool_series.clear();
        println!(
            "{}",
            serde_json::to_string(&printed).map_err(|e| e.to_string())?
        );
    } else {
        print!("{}", result.summary_table());
        if let Some(t) = trailer {
            println!("{t}");
        }
    }
    match problems(result, report) {
        Some(p) => {
            eprintln!("shadow2: {p}");
            Ok(ExitCode::FAILURE)
        }
        None => Ok(ExitCode::SUCCESS),
    }
}

/// Checks `--pool-pages`: a pool of 1 to [`DomainConfig::MAX_POOL_PAGES`] pages, refused at
/// once (before anything is built) otherwise.
pub fn check_pool_pages(pages: u64) -> Result<usize, String> {
    let max = shadow2::domain::DomainConfig::MAX_POOL_PAGES;
    usize::try_from(pages)
        .ok()
        .filter(|p| (1..=max).contains(p))
        .ok_or_else(|| {
            format!("--pool-pages must be 1 to {max} (1 GiB of shadow memory), not {pages}")
        })
}

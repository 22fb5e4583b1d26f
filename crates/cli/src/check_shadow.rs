//! `shadow2 check shadow`: random guest page-table churn on the simulator, for each pair,
//! with the auditor after every step and the oracle on every access.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use shadow2::multi::Pair;
use shadow2_machine::churn::{self, ChurnConfig, ChurnReport};

/// Options of `check shadow`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The pair to check ("4on4", "2on3", ...), or "all".
    #[arg(long, default_value = "4on4")]
    pair: String,
    /// Operations in total (split evenly over the pairs).
    #[arg(long, default_value_t = 20_000)]
    ops: u64,
    /// The seed (the same seed gives the same run).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// Runs the check; fails (exit code 1) on any audit violation or oracle mismatch.
pub fn run(args: &Args) -> Result<ExitCode, String> {
    let pairs: Vec<Pair> = if args.pair == "all" {
        Pair::ALL.to_vec()
    } else {
        vec![Pair::from_name(&args.pair).ok_or_else(|| {
            let names: Vec<&str> = Pair::ALL.iter().map(|p| p.name()).collect();
            format!(
                "unknown pair {:?} (one of {} or all)",
                args.pair,
                names.join(", ")
            )
        })?]
    };
    if args.ops == 0 {
        return Err("--ops must be at least 1".into());
    }
    let per_pair = args.ops.div_ceil(pairs.len() as u64);
    let start = Instant::now();
    // Half of each pair's operations run with the smallest pool (constant eviction).
    let jobs: Vec<ChurnConfig> = pairs
        .iter()
        .flat_map(|&pair| {
            let tiny = per_pair / 2;
            [
                ChurnConfig {
                    pair,
                    ops: per_pair - tiny,
                    seed: args.seed,
                    tiny_pool: false,
                },
                ChurnConfig {
                    pair,
                    ops: tiny,
                    seed: args.seed.wrapping_add(1),
                    tiny_pool: true,
                },
            ]
        })
        .filter(|c| c.ops > 0)
        .collect();
    let reports = run_parallel(jobs)?;
    let merged = merge(&pairs, &reports);
    let violations: u64 = merged.iter().map(|r| r.audit_violations).sum();
    let mismatches: u64 = merged
        .iter()
        .map(|r| r.oracle_mismatches + r.lost_dirty_pages)
        .sum();
    let ops: u64 = merged.iter().map(|r| r.ops).sum();
    let wall = start.elapsed().as_secs_f64();
    if args.json {
        let json = serde_json::json!({
            "pairs": merged.len(),
            "ops": ops,
            "audit_violations": violations,
            "oracle_mismatches": mismatches,
            "seed": args.seed,
            "wall_s": wall,
            "per_pair": merged,
        });
        println!("{json}");
    } else {
        for r in &merged {
            println!(
                "{:>5}: {:>7} ops {:>8} accesses {:>6} fills {:>6} propagated ({:>5} fast) {:>5} emulated ({:>4} from instructions) {:>5} evictions {:>4} unshadows {:>3} cleans {:>5} unsyncs {:>5} resyncs {:>4} superpages ({:>4} split) {:>6} prefetched  violations {} mismatches {}",
                r.pair,
                r.ops,
                r.accesses,
                r.traps.shadow_fills,
                r.traps.propagated,
                r.fast_path,
                r.traps.emulated_writes,
                r.instruction_emulations,
                r.evictions,
                r.unshadows,
                r.dirty_cleans,
                r.oos_unsyncs,
                r.oos_resyncs,
                r.superpages_mapped,
                r.superpage_splits,
                r.prefetched,
                r.audit_violations,
                r.oracle_mismatches + r.lost_dirty_pages,
            );
            if let Some(p) = &r.first_problem {
                println!("       first problem: {p}");
            }
        }
        println!(
            "shadow: {} pairs, {} ops, {} audit violations, {} oracle mismatches",
            merged.len(),
            ops,
            violations,
            mismatches
        );
    }
    let failed =
        violations > 0 || mismatches > 0 || merged.iter().any(|r| r.first_problem.is_some());
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Runs the jobs on all cores, each job on its own thread, with a progress bar over the
/// operations of all of them.
fn run_parallel(jobs: Vec<ChurnConfig>) -> Result<Vec<ChurnReport>, String> {
    let workers = thread::available_parallelism().map_or(2, |n| n.get());
    let total: u64 = jobs.iter().map(|j| j.ops).sum();
    let bar = crate::progress::bar(total, "shadow churn");
    let done = Arc::new(AtomicU64::new(0));
    let mut results = Vec::with_capacity(jobs.len());
    for batch in jobs.chunks(workers) {
        let handles: Vec<_> = batch
            .iter()
            .map(|&cfg| {
                let done = Arc::clone(&done);
                thread::spawn(move || churn::run_counted(cfg, &done))
            })
            .collect();
        while !handles.iter().all(|h| h.is_finished()) {
            bar.set_position(done.load(Ordering::Relaxed));
            thread::sleep(Duration::from_millis(100));
        }
        for h in handles {
            match h.join() {
                Ok(Ok(report)) => results.push(report),
                Ok(Err(e)) => return Err(format!("engine error: {e}")),
                Err(_) => return Err("a checker thread panicked".into()),
            }
        }
    }
    bar.finish_and_clear();
    Ok(results)
}

/// Sums the reports of the same pair.
fn merge(pairs: &[Pair], reports: &[ChurnReport]) -> Vec<ChurnReport> {
    pairs
        .iter()
        .map(|p| {
            let mut m = ChurnReport {
                pair: p.name().into(),
                ..ChurnReport::default()
            };
            for r in reports.iter().filter(|r| r.pair == p.name()) {
                m.ops += r.ops;
                m.accesses += r.accesses;
                m.audit_violations += r.audit_violations;
                m.cache_violations += r.cache_violations;
                m.cached_walks += r.cached_walks;
                m.oracle_mismatches += r.oracle_mismatches;
                m.lost_dirty_pages += r.lost_dirty_pages;
                m.dirty_cleans += r.dirty_cleans;
                m.instruction_emulations += r.instruction_emulations;
                m.shadows_created += r.shadows_created;
                m.evictions += r.evictions;
                m.fast_path += r.fast_path;
                m.unshadows += r.unshadows;
                m.out_of_sync_runs += r.out_of_sync_runs;
                m.oos_unsyncs += r.oos_unsyncs;
                m.oos_resyncs += r.oos_resyncs;
                m.superpages_mapped += r.superpages_mapped;
                m.prefetched += r.prefetched;
                m.superpage_splits += r.superpage_splits;
                m.pool_peak_pages = m.pool_peak_pages.max(r.pool_peak_pages);
                m.traps.shadow_fills += r.traps.shadow_fills;
                m.traps.spurious += r.traps.spurious;
                m.traps.propagated += r.traps.propagated;
                m.traps.fast_path += r.traps.fast_path;
                m.traps.emulated_writes += r.traps.emulated_writes;
                m.traps.mmio += r.traps.mmio;
                m.traps.cr3_writes += r.traps.cr3_writes;
                m.traps.invlpg += r.traps.invlpg;
                m.traps.mode_changes += r.traps.mode_changes;
                if m.first_problem.is_none() {
                    m.first_problem.clone_from(&r.first_problem);
                }
            }
            m
        })
        .collect()
}

//! Issue 12's table of trap and memory goals, measured from a bench's runs: each row names
//! the runs it is taken from, the figure measured (the worst of those runs) and its goal.
//! The per-operation costs in walks come from the criterion benches instead
//! (`cargo bench -p shadow2-machine`), which print their own goal column.

use serde::{Deserialize, Serialize};

use crate::result::{RunResult, fmt_f64};

/// One row: a figure measured by the bench next to its goal.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Goal {
    /// What is measured.
    pub what: String,
    /// The measured figure (the worst of the runs it covers); None when the bench had none
    /// of those runs (a filtered bench).
    pub measured: Option<f64>,
    /// The run that gave the figure (guest, workload, pair, pool).
    pub worst_run: String,
    /// The goal: the figure must be at most this.
    pub at_most: f64,
    /// Whether the figure meets the goal.
    pub met: bool,
}

/// The pool size of the default pool-pressure runs: 1/16 of the default pool.
pub const PRESSURE_POOL_PAGES: usize = 128;
/// The pool size of the ctxswitch pressure run.
pub const CTXSWITCH_TINY_POOL_PAGES: usize = 32;
/// The demand size (MiB) of the shadow-memory row.
pub const POOL_RATIO_DEMAND_MIB: u64 = 256;

fn describe(r: &RunResult) -> String {
    format!(
        "{} {} {} (size {}, pool {})",
        r.guest, r.workload, r.pair, r.size, r.pool_pages
    )
}

fn worst<'a>(what: &str, at_most: f64, runs: impl Iterator<Item = (&'a RunResult, f64)>) -> Goal {
    let found = runs.fold(None::<(&RunResult, f64)>, |acc, (r, v)| match acc {
        Some((_, best)) if best >= v => acc,
        _ => Some((r, v)),
    });
    Goal {
        what: what.into(),
        measured: found.map(|(_, v)| v),
        worst_run: found.map(|(r, _)| describe(r)).unwrap_or_default(),
        at_most,
        met: found.is_some_and(|(_, v)| v <= at_most),
    }
}

fn is(r: &RunResult, guest: &str, workload: &str) -> bool {
    r.guest == guest && r.workload == workload
}

/// The default-pool runs: the largest pool among the runs of the same guest, workload, pair
/// and size (the pressure runs are the others).
fn default_pool<'a>(runs: &'a [RunResult], r: &RunResult) -> Option<&'a RunResult> {
    runs.iter()
        .filter(|o| {
            o.guest == r.guest && o.workload == r.workload && o.pair == r.pair && o.size == r.size
        })
        .max_by_key(|o| o.pool_pages)
}

fn is_default_pool(runs: &[RunResult], r: &RunResult) -> bool {
    default_pool(runs, r).is_some_and(|d| d.pool_pages == r.pool_pages)
}

/// Engine time of `r` over the same run at the default pool.
fn pressure_ratio(runs: &[RunResult], r: &RunResult) -> Option<f64> {
    let base = default_pool(runs, r)?;
    (base.pool_pages > r.pool_pages && base.engine_s > 0.0).then(|| r.engine_s / base.engine_s)
}

/// Issue 12's rows from `runs`.
pub fn issue12(runs: &[RunResult]) -> Vec<Goal> {
    let default_runs = || runs.iter().filter(|r| is_default_pool(runs, r));
    let demand = |r: &&RunResult| r.workload == "demand" && r.size != POOL_RATIO_DEMAND_MIB;
    let pae_like = |r: &RunResult| {
        (r.guest == "windows-pae" && (r.pair == "3on3" || r.pair == "3on4"))
            || (r.guest == "boot" && r.pair == "0on3")
    };
    let forkwait_4on4 = || {
        default_runs()
            .filter(|r| is(r, "linux64", "forkwait") && r.pair == "4on4")
            .filter(|r| r.workload_steps > 0)
    };
    vec![
        worst(
            "traps per demand fault, linux64 / legacy32 / boot",
            2.02,
            default_runs()
                .filter(demand)
                .filter(|r| ["linux64", "legacy32", "boot"].contains(&r.guest.as_str()))
                .filter(|r| !pae_like(r))
                .map(|r| (r, r.traps_per_demand_fault)),
        ),
        worst(
            "traps per demand fault, windows-pae (3on3, 3on4), boot 0on3",
            3.0,
            default_runs()
                .filter(demand)
                .filter(|r| pae_like(r))
                .map(|r| (r, r.traps_per_demand_fault)),
        ),
        worst(
            "traps per forkwait round, linux64 4on4 (all kinds)",
            20.0,
            forkwait_4on4().map(|r| (r, r.traps_per_step)),
        ),
        worst(
            "emulated writes per forkwait round, linux64 4on4",
            3.0,
            forkwait_4on4().map(|r| {
                let emulated = r.traps.get("emulated_writes").copied().unwrap_or(0);
                (r, emulated as f64 / r.workload_steps as f64)
            }),
        ),
        worst(
            &format!(
                "shadow pool pages / guest page-table pages (demand {POOL_RATIO_DEMAND_MIB} MiB, at the pool's peak)"
            ),
            1.05,
            runs.iter()
                .filter(|r| r.workload == "demand" && r.size == POOL_RATIO_DEMAND_MIB)
                .filter_map(|r| r.pool_pages_per_guest_table.map(|p| (r, p))),
        ),
        worst(
            &format!(
                "ctxswitch 4on4 engine time at a {CTXSWITCH_TINY_POOL_PAGES}-page pool / at the default pool"
            ),
            2.0,
            runs.iter()
                .filter(|r| is(r, "linux64", "ctxswitch") && r.pair == "4on4")
                .filter(|r| r.pool_pages as usize == CTXSWITCH_TINY_POOL_PAGES)
                .filter_map(|r| pressure_ratio(runs, r).map(|x| (r, x))),
        ),
        worst(
            &format!(
                "engine time at a {PRESSURE_POOL_PAGES}-page pool (1/16) / at the default, every linux64 4on4 workload"
            ),
            2.0,
            runs.iter()
                .filter(|r| r.guest == "linux64" && r.pair == "4on4")
                .filter(|r| r.pool_pages as usize == PRESSURE_POOL_PAGES)
                .filter_map(|r| pressure_ratio(runs, r).map(|x| (r, x))),
        ),
    ]
}

/// The rows as a text table.
pub fn table(goals: &[Goal]) -> String {
    let mut out = String::from("issue 12 goals (worst run of each row):\n");
    let width = goals.iter().map(|g| g.what.len()).max().unwrap_or(0);
    for g in goals {
        let measured = g.measured.map_or("-".into(), fmt_f64);
        let verdict = match (g.measured, g.met) {
            (None, _) => "not measured",
            (_, true) => "met",
            (_, false) => "MISSED",
        };
        out.push_str(&format!(
            "  {:width$}  {:>8}  goal <= {:<6}  {:<12}  {}\n",
            g.what,
            measured,
            fmt_f64(g.at_most),
            verdict,
            g.worst_run,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn run(guest: &str, workload: &str, pair: &str, pool: u64) -> RunResult {
        RunResult {
            guest: guest.into(),
            workload: workload.into(),
            pair: pair.into(),
            pool_pages: pool,
            size: 64,
            ..RunResult::default()
        }
    }

    #[test]
    fn each_row_takes_the_worst_of_its_runs() {
        let mut a = run("linux64", "demand", "4on4", 2048);
        a.traps_per_demand_fault = 2.01;
        let mut b = run("legacy32", "demand", "2on2", 2048);
        b.traps_per_demand_fault = 2.5;
        let mut c = run("boot", "demand", "0on3", 2048);
        c.traps_per_demand_fault = 2.9;
        let goals = issue12(&[a, b, c]);
        assert_eq!(goals[0].measured, Some(2.5));
        assert!(!goals[0].met);
        assert!(goals[0].worst_run.starts_with("legacy32 demand 2on2"));
        assert_eq!(goals[1].measured, Some(2.9));
        assert!(goals[1].met);
        assert_eq!(goals[2].measured, None);
        assert!(!goals[2].met);
        assert!(table(&goals).contains("MISSED"));
        assert!(table(&goals).contains("not measured"));
    }

    #[test]
    fn pressure_rows_compare_with_the_default_pool_run() {
        let mut base = run("linux64", "ctxswitch", "4on4", 2048);
        base.engine_s = 0.1;
        let mut tiny = run("linux64", "ctxswitch", "4on4", 32);
        tiny.engine_s = 0.3;
        let mut sixteenth = run("linux64", "ctxswitch", "4on4", 128);
        sixteenth.engine_s = 0.15;
        let goals = issue12(&[base, tiny, sixteenth]);
        let ctx = &goals[5];
        assert!((ctx.measured.unwrap() - 3.0).abs() < 1e-9);
        assert!(!ctx.met);
        let pressure = &goals[6];
        assert!((pressure.measured.unwrap() - 1.5).abs() < 1e-9);
        assert!(pressure.met);
    }

    #[test]
    fn forkwait_rows_are_per_round() {
        let mut f = run("linux64", "forkwait", "4on4", 2048);
        f.workload_steps = 10;
        f.traps_per_step = 19.0;
        f.traps.insert("emulated_writes".into(), 40);
        let goals = issue12(&[f]);
        assert_eq!(goals[2].measured, Some(19.0));
        assert!(goals[2].met);
        assert_eq!(goals[3].measured, Some(4.0));
        assert!(!goals[3].met);
    }
}

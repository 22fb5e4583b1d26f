//! The result of one workload run (`shadow2 run`) and of a set of them (`shadow2 bench`):
//! the JSON both write, `shadow2 report` reads, and the text tables they print.
//!
//! Every ratio is a plain number, never NaN nor infinite: a ratio whose divisor is 0 is 0
//! ([`ratio`]), and the ratio fields are written as 0 and read back from `null` as 0 should
//! a non-finite value get into them anyway (serde_json cannot write NaN).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The version of [`BenchResults`] written today.
pub const BENCH_VERSION: u32 = 1;

/// The trap kinds, in the order the tables show them (then any other kind, then `total`).
pub const TRAP_KINDS: [&str; 9] = [
    "shadow_fills",
    "spurious",
    "propagated",
    "fast_path",
    "emulated_writes",
    "mmio",
    "cr3_writes",
    "invlpg",
    "mode_changes",
];

/// The key of [`RunResult::traps`] that holds the number of traps of every kind.
pub const TOTAL: &str = "total";

/// One workload run: what `shadow2 run --json` prints and one entry of `bench.json`.
///
/// Fields missing from a JSON object read as their default, so older files still load.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RunResult {
    /// The workload's name.
    pub workload: String,
    /// The guest OS model's name.
    pub guest: String,
    /// The guest-on-shadow paging pair ("4on4", "2on3", ...).
    pub pair: String,
    /// `sim`, `kvm` or `native`.
    pub backend: String,
    /// The workload's size parameter.
    pub size: u64,
    /// The seed of the run.
    pub seed: u64,
    /// Guest operations performed.
    pub guest_ops: u64,
    /// Traps by kind ([`TRAP_KINDS`]) and their sum under [`TOTAL`].
    pub traps: BTreeMap<String, u64>,
    /// Total traps per guest operation.
    #[serde(serialize_with = "finite", deserialize_with = "finite_or_zero")]
    pub traps_per_op: f64,
    /// Faults the guest itself would take without shadowing (demand paging, COW, ...).
    pub demand_faults: u64,
    /// Traps per demand fault: the traps of the user accesses in which the guest kernel
    /// mapped a page on first touch (`demand_fault_traps`), per demand fault; where the
    /// backend does not attribute traps (KVM), all traps per demand fault.
    #[serde(serialize_with = "finite", deserialize_with = "finite_or_zero")]
    pub traps_per_demand_fault: f64,
    /// Traps charged to demand faults: from the start of each user access that took one
    /// to its completion (the fault, the handler's page-table writes and page zeroing, the
    /// retry). None where the backend does not attribute traps.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub demand_fault_traps: Option<u64>,
    /// Traps charged to copy-on-write faults, the same way.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cow_fault_traps: Option<u64>,
    /// `cow_fault_traps` per copy-on-write fault.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traps_per_cow_fault: Option<f64>,
    /// Workload units finished (forkwait rounds, MiB touched, switches, jobs...).
    pub workload_steps: u64,
    /// Total traps per workload unit (per forkwait round, per MiB of demand...).
    #[serde(serialize_with = "finite", deserialize_with = "finite_or_zero")]
    pub traps_per_step: f64,
    /// Copy-on-write faults the guest handled.
    pub cow_faults: u64,
    /// Guest processes killed (by the guest, for a bad access).
    pub kills: u64,
    /// Data read back different from what the guest wrote.
    pub data_errors: u64,
    /// Guest page tables unshadowed.
    pub unshadows: u64,
    /// Shadows evicted for lack of pool space.
    pub evictions: u64,
    /// The shadow pool's size in pages.
    pub pool_pages: u64,
    /// The most pool pages in use at once.
    pub pool_peak_pages: u64,
    /// Simulator runs: guest frames shadowed as page tables when the pool was fullest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_tables_at_pool_peak: Option<u64>,
    /// `pool_peak_pages` / `guest_tables_at_pool_peak`: shadow memory per guest page table
    /// (1.0 is one shadow page per guest table; splinters of guest superpages, extra
    /// shadows of one table in several modes and pages held until a flush add to it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool_pages_per_guest_table: Option<f64>,
    /// The most work one engine call did (shadow and p2m entries read or written).
    pub max_call_work: u64,
    /// Accesses whose outcome differed from the guest oracle's.
    pub oracle_mismatches: u64,
    /// Invariant violations the auditor found.
    pub audit_violations: u64,
    /// Seconds spent in the shadow engine.
    #[serde(serialize_with = "finite", deserialize_with = "finite_or_zero")]
    pub engine_s: f64,
    /// Microseconds of engine time per trap.
    #[serde(serialize_with = "finite", deserialize_with = "finite_or_zero")]
    pub engine_us_per_trap: f64,
    /// Seconds of wall-clock time for the whole run.
    #[serde(serialize_with = "finite", deserialize_with = "finite_or_zero")]
    pub wall_s: f64,
    /// Guest operations per second of wall-clock time: how fast the backend runs guests.
    #[serde(serialize_with = "finite", deserialize_with = "finite_or_zero")]
    pub guest_ops_per_s: f64,
    /// The digest of the guest's final state, in hex.
    pub digest: String,
    /// Pool pages in use over the run: (guest operations so far, pool pages in use).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pool_series: Vec<(u64, u64)>,
    /// Simulator runs: every engine counter (`shadow2::stats::Stats::fields`) by name, to
    /// count where traps and engine time go (prefetched entries, blow-tables, ...).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub engine_stats: BTreeMap<String, u64>,
    /// KVM runs only: VM exits by kind (`ExitCounts::by_kind`, `total` included).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vm_exits: Option<BTreeMap<String, u64>>,
    /// KVM runs only: VM exits (`vm_exits.total`) per guest operation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exits_per_op: Option<f64>,
    /// KVM runs only: how this run's guest-visible results differ from other backends'.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub differences: Option<Differences>,
    /// KVM runs only: why the native comparison was not made (`differences.vs_native` is
    /// null then).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub native_skipped: Option<String>,
    /// Simulator runs: whether out-of-sync shadows were on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub out_of_sync: Option<bool>,
    /// Simulator runs with out-of-sync shadows: the engine's counters of them (pages
    /// unsynced, resyncs by reason).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oos: Option<BTreeMap<String, u64>>,
}

/// Differences between one run and the same guest on another backend: operations whose
/// outcome differs (plus the difference in their number) and 8-byte words of final guest
/// memory that differ. `None` (null) where the comparison was not made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Differences {
    /// Against the simulator.
    pub vs_sim: Option<u64>,
    /// Against native KVM (the guest's own tables, no engine).
    pub vs_native: Option<u64>,
}

/// What `shadow2 bench` writes (`target/shadow2/bench.json`) and `shadow2 report` reads.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct BenchResults {
    /// The format's version: [`BENCH_VERSION`].
    pub version: u32,
    /// The runs, in the order they ran.
    pub runs: Vec<RunResult>,
    /// `shadow2 bench --backend kvm`: engine-KVM against native-KVM, per workload. Absent
    /// from files written before it existed, and from sim-only benches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kvm: Vec<KvmBench>,
    /// Issue 12's goal rows measured from `runs`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub goals: Vec<crate::goals::Goal>,
}

/// One workload run on the engine's shadows under KVM and natively under KVM, one after the
/// other in the same `shadow2 bench --backend kvm`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct KvmBench {
    /// The guest OS model's name.
    pub guest: String,
    /// The workload's name.
    pub workload: String,
    /// The guest-on-shadow pair of the engine's run.
    pub pair: String,
    /// The workload's size parameter.
    pub size: u64,
    /// The seed of both runs.
    pub seed: u64,
    /// Guest operations of the engine's run (the native run does the same ones).
    pub guest_ops: u64,
    /// Seconds of wall-clock time on the engine's shadows.
    #[serde(serialize_with = "finite", deserialize_with = "finite_or_zero")]
    pub engine_wall_s: f64,
    /// Seconds of wall-clock time natively.
    #[serde(serialize_with = "finite", deserialize_with = "finite_or_zero")]
    pub native_wall_s: f64,
    /// `engine_wall_s / native_wall_s`.
    #[serde(serialize_with = "finite", deserialize_with = "finite_or_zero")]
    pub wall_ratio: f64,
    /// VM exits per guest operation on the engine's shadows.
    #[serde(serialize_with = "finite", deserialize_with = "finite_or_zero")]
    pub engine_exits_per_op: f64,
    /// VM exits per guest operation natively.
    #[serde(serialize_with = "finite", deserialize_with = "finite_or_zero")]
    pub native_exits_per_op: f64,
}

impl BenchResults {
    /// Results of the current version.
    #[allow(dead_code, reason = "for shadow2 bench")]
    pub fn new(runs: Vec<RunResult>) -> Self {
        Self {
            version: BENCH_VERSION,
            runs,
            kvm: Vec::new(),
            goals: Vec::new(),
        }
    }
}

/// `num / den`, or 0 when `den` is 0 or the quotient is not finite.
pub fn ratio(num: f64, den: f64) -> f64 {
    let q = num / den;
    if den == 0.0 || !q.is_finite() { 0.0 } else { q }
}

/// Writes a non-finite number as 0.
fn finite<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(if v.is_finite() { *v } else { 0.0 })
}

/// Reads a number, `null` (what serde_json writes for NaN) as 0.
fn finite_or_zero<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    let v = Option::<f64>::deserialize(d)?.unwrap_or(0.0);
    Ok(if v.is_finite() { v } else { 0.0 })
}

impl RunResult {
    /// The number of traps: `traps["total"]` if present, otherwise the sum of the kinds.
    pub fn total_traps(&self) -> u64 {
        self.traps.get(TOTAL).copied().unwrap_or_else(|| {
            self.traps
                .iter()
                .filter(|(k, _)| k.as_str() != TOTAL)
                .map(|(_, v)| *v)
                .sum()
        })
    }

    /// Fills `traps["total"]` (if missing) and the ratios from the counts:
    /// `traps_per_op`, `traps_per_demand_fault`, `traps_per_step`, `engine_us_per_trap`,
    /// `guest_ops_per_s` (call again after changing `wall_s`).
    #[allow(dead_code, reason = "for shadow2 run and bench")]
    pub fn fill_ratios(&mut self) {
        let total = self.total_traps();
        self.traps.entry(TOTAL.to_owned()).or_insert(total);
        let total = total as f64;
        self.traps_per_op = ratio(total, self.guest_ops as f64);
        let demand = self.demand_fault_traps.map_or(total, |t| t as f64);
        self.traps_per_demand_fault = ratio(demand, self.demand_faults as f64);
        self.pool_pages_per_guest_table = self
            .guest_tables_at_pool_peak
            .map(|tables| ratio(self.pool_peak_pages as f64, tables as f64));
        self.traps_per_cow_fault = self
            .cow_fault_traps
            .map(|t| ratio(t as f64, self.cow_faults as f64));
        self.traps_per_step = ratio(total, self.workload_steps as f64);
        self.engine_us_per_trap = ratio(self.engine_s * 1e6, total);
        self.guest_ops_per_s = ratio(self.guest_ops as f64, self.wall_s);
    }

    /// The trap kinds present, in table order: [`TRAP_KINDS`], then others by name; no total.
    fn trap_kinds(&self) -> Vec<(&str, u64)> {
        let known = TRAP_KINDS
            .iter()
            .filter_map(|k| self.traps.get(*k).map(|v| (*k, *v)));
        let others = self
            .traps
            .iter()
            .filter(|(k, _)| k.as_str() != TOTAL && !TRAP_KINDS.contains(&k.as_str()))
            .map(|(k, v)| (k.as_str(), *v));
        known.chain(others).collect()
    }

    /// The text summary `shadow2 run` prints: an aligned two-column table (label, value),
    /// numbers right-aligned, rates after them. Leaves out `pool_series`.
    #[allow(dead_code, reason = "for shadow2 run")]
    pub fn summary_table(&self) -> String {
        enum V {
            Text(String),
            Num(String, String),
        }
        let num = |n: u64, note: String| V::Num(n.to_string(), note);
        let per_op = |n: u64| format!("{} /op", fmt_f64(ratio(n as f64, self.guest_ops as f64)));
        let mut rows: Vec<(String, V)> = vec![
            ("guest".into(), V::Text(self.guest.clone())),
            (
                "workload".into(),
                V::Text(format!("{} (size {})", self.workload, self.size)),
            ),
            ("pair".into(), V::Text(self.pair.clone())),
            ("backend".into(), V::Text(self.backend.clone())),
            ("seed".into(), V::Text(self.seed.to_string())),
            (
                "guest operations".into(),
                num(self.guest_ops, String::new()),
            ),
        ];
        for (kind, n) in self.trap_kinds() {
            rows.push((format!("traps: {kind}"), num(n, per_op(n))));
        }
        let total = self.total_traps();
        rows.extend([
            (
                "traps: total".into(),
                num(total, format!("{} /op", fmt_f64(self.traps_per_op))),
            ),
            (
                "demand faults".into(),
                num(
                    self.demand_faults,
                    format!("{} traps each", fmt_f64(self.traps_per_demand_fault)),
                ),
            ),
            (
                "workload steps".into(),
                num(
                    self.workload_steps,
                    format!("{} traps each", fmt_f64(self.traps_per_step)),
                ),
            ),
            (
                "COW faults".into(),
                num(
                    self.cow_faults,
                    self.traps_per_cow_fault
                        .map(|t| format!("{} traps each", fmt_f64(t)))
                        .unwrap_or_default(),
                ),
            ),
            ("kills".into(), num(self.kills, String::new())),
            ("data errors".into(), num(self.data_errors, String::new())),
            ("unshadows".into(), num(self.unshadows, String::new())),
            ("pool size".into(), num(self.pool_pages, "pages".into())),
            (
                "pool peak".into(),
                num(self.pool_peak_pages, "pages".into()),
            ),
            ("evictions".into(), num(self.evictions, String::new())),
            (
                "max call work".into(),
                num(self.max_call_work, "entries".into()),
            ),
            (
                "oracle mismatches".into(),
                num(self.oracle_mismatches, String::new()),
            ),
            (
                "audit violations".into(),
                num(self.audit_violations, String::new()),
            ),
            (
                "engine time".into(),
                V::Num(
                    fmt_secs(self.engine_s),
                    format!("{} µs/trap", fmt_f64(self.engine_us_per_trap)),
                ),
            ),
            (
                "wall time".into(),
                V::Num(
                    fmt_secs(self.wall_s),
                    format!("{} guest ops/s", self.guest_ops_per_s.round()),
                ),
            ),
        ]);
        if !self.digest.is_empty() {
            rows.push(("digest".into(), V::Text(self.digest.clone())));
        }
        let label_w = rows.iter().map(|(l, _)| width(l)).max().unwrap_or(0);
        let num_w = rows
            .iter()
            .filter_map(|(_, v)| match v {
                V::Num(n, _) => Some(width(n)),
                V::Text(_) => None,
            })
            .max()
            .unwrap_or(0);
        let mut out = String::new();
        for (label, v) in rows {
            let line = match v {
                V::Text(t) => format!("{label:<label_w$}  {t}"),
                V::Num(n, note) if note.is_empty() => format!("{label:<label_w$}  {n:>num_w$}"),
                V::Num(n, note) => format!("{label:<label_w$}  {n:>num_w$}  {note}"),
            };
            let _ = writeln!(out, "{}", line.trim_end());
        }
        out
    }

    /// "guest workload (size N) pair backend": names a run in a sentence.
    pub fn name(&self) -> String {
        format!(
            "{} {} (size {}) {} {}",
            self.guest, self.workload, self.size, self.pair, self.backend
        )
    }
}

/// One line per run, under a header: guest, workload, pair, guest ops, traps/op,
/// traps/demand fault, µs of engine time per trap, oracle mismatches.
#[allow(dead_code, reason = "for shadow2 bench")]
pub fn bench_table(runs: &[RunResult]) -> String {
    let header = [
        "guest",
        "workload",
        "pair",
        "pool",
        "guest ops",
        "traps/op",
        "traps/DF",
        "µs/trap",
        "mismatches",
    ];
    // Text columns left-aligned, numbers right-aligned.
    let left = [true, true, true, false, false, false, false, false, false];
    let rows: Vec<[String; 9]> = runs
        .iter()
        .map(|r| {
            [
                r.guest.clone(),
                r.workload.clone(),
                r.pair.clone(),
                r.pool_pages.to_string(),
                r.guest_ops.to_string(),
                fmt_f64(r.traps_per_op),
                fmt_f64(r.traps_per_demand_fault),
                fmt_f64(r.engine_us_per_trap),
                r.oracle_mismatches.to_string(),
            ]
        })
        .collect();
    let mut widths = header.map(width);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(width(cell));
        }
    }
    let mut out = String::new();
    let header = header.map(str::to_owned);
    for row in std::iter::once(&header).chain(&rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            let pad = " ".repeat(widths[i].saturating_sub(width(cell)));
            if left[i] {
                line.push_str(cell);
                line.push_str(&pad);
            } else {
                line.push_str(&pad);
                line.push_str(cell);
            }
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
    out
}

/// The width of a cell in characters (`µ` is two bytes but one column).
fn width(s: &str) -> usize {
    s.chars().count()
}

/// A ratio with about four significant digits; 0 as "0".
pub fn fmt_f64(x: f64) -> String {
    if !x.is_finite() || x == 0.0 {
        return "0".into();
    }
    let a = x.abs();
    if a >= 1000.0 {
        format!("{x:.0}")
    } else if a >= 100.0 {
        format!("{x:.1}")
    } else if a >= 10.0 {
        format!("{x:.2}")
    } else if a >= 1.0 {
        format!("{x:.3}")
    } else {
        // 0.01234: three more places than the first significant digit's, at most 9.
        let first = (-a.log10()).ceil() as usize;
        let places = (first + 3).min(9);
        format!("{x:.places$}")
    }
}

/// Seconds, to the millisecond (or the microsecond under a second).
pub fn fmt_secs(s: f64) -> String {
    let s = if s.is_finite() { s } else { 0.0 };
    if s >= 1.0 {
        format!("{s:.3} s")
    } else {
        format!("{s:.6} s")
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn sample() -> RunResult {
        let mut r = RunResult {
            workload: "fork_exec".into(),
            guest: "linux".into(),
            pair: "3on4".into(),
            backend: "sim".into(),
            size: 64,
            seed: 7,
            guest_ops: 20_000,
            demand_faults: 2_500,
            workload_steps: 64,
            cow_faults: 321,
            unshadows: 17,
            evictions: 5,
            pool_pages: 1024,
            pool_peak_pages: 777,
            engine_s: 0.05,
            wall_s: 1.5,
            digest: "00ff10ab".into(),
            pool_series: vec![(0, 10), (10_000, 500)],
            ..RunResult::default()
        };
        r.traps.insert("shadow_fills".into(), 4_000);
        r.traps.insert("emulated_writes".into(), 1_000);
        r.traps.insert("cr3_writes".into(), 5_000);
        r.fill_ratios();
        r
    }

    #[test]
    fn ratios_come_from_the_counts() {
        let r = sample();
        assert_eq!(r.traps.get(TOTAL), Some(&10_000));
        assert_eq!(r.total_traps(), 10_000);
        assert!((r.traps_per_op - 0.5).abs() < 1e-12);
        assert!((r.traps_per_demand_fault - 4.0).abs() < 1e-12);
        assert!((r.traps_per_step - 10_000.0 / 64.0).abs() < 1e-9);
        assert!((r.engine_us_per_trap - 5.0).abs() < 1e-9);
        assert!((r.guest_ops_per_s - 20_000.0 / 1.5).abs() < 1e-6);
        assert_eq!(r.traps_per_cow_fault, None);
    }

    #[test]
    fn attributed_traps_are_what_a_fault_costs() {
        let mut r = sample();
        r.demand_fault_traps = Some(5_000);
        r.cow_fault_traps = Some(642);
        r.fill_ratios();
        assert!((r.traps_per_demand_fault - 2.0).abs() < 1e-12);
        assert_eq!(r.traps_per_cow_fault, Some(2.0));
        assert!(r.summary_table().contains("2.000 traps each"));
    }

    #[test]
    fn summary_table_shows_the_numbers() {
        let t = sample().summary_table();
        for needle in [
            "linux",
            "fork_exec (size 64)",
            "3on4",
            "sim",
            "20000",
            "traps: shadow_fills",
            "4000",
            "0.2000 /op",
            "traps: cr3_writes",
            "0.2500 /op",
            "traps: total",
            "10000",
            "0.5000 /op",
            "2500",
            "4.000 traps each",
            "321",
            "1024",
            "777",
            "5.000 µs/trap",
            "0.050000 s",
            "1.500 s",
            "13333 guest ops/s",
            "00ff10ab",
        ] {
            assert!(t.contains(needle), "{needle:?} missing from\n{t}");
        }
        assert!(!t.contains("pool_series"), "{t}");
        // Kinds in table order: fills before emulated writes before CR3 writes, total last.
        let pos = |s: &str| t.find(s).unwrap();
        assert!(pos("shadow_fills") < pos("emulated_writes"));
        assert!(pos("emulated_writes") < pos("cr3_writes"));
        assert!(pos("cr3_writes") < pos("traps: total"));
        // Aligned: every value starts in the same column.
        let line = |start: &str| t.lines().find(|l| l.starts_with(start)).unwrap();
        assert_eq!(
            line("guest ").find("linux"),
            line("pair ").find("3on4"),
            "{t}"
        );
    }

    #[test]
    fn zero_divisors_give_zero_and_json_has_no_nan() {
        let mut r = RunResult::default();
        r.fill_ratios();
        assert_eq!(r.traps_per_op, 0.0);
        assert_eq!(r.traps_per_demand_fault, 0.0);
        assert_eq!(r.traps_per_step, 0.0);
        assert_eq!(r.engine_us_per_trap, 0.0);
        assert_eq!(r.guest_ops_per_s, 0.0);
        // Even a NaN set by hand is written as a number.
        r.traps_per_op = f64::NAN;
        r.wall_s = f64::INFINITY;
        let json = serde_json::to_string(&BenchResults::new(vec![r])).unwrap();
        assert!(!json.contains("null") && !json.contains("NaN"), "{json}");
        let back: BenchResults = serde_json::from_str(&json).unwrap();
        assert_eq!(back.version, BENCH_VERSION);
        assert_eq!(back.runs[0].traps_per_op, 0.0);
        assert_eq!(back.runs[0].wall_s, 0.0);
        // An empty pool series is left out.
        assert!(!json.contains("pool_series"), "{json}");
    }

    #[test]
    fn json_fields_in_declared_order_and_round_trip() {
        let r = sample();
        let json = serde_json::to_string(&r).unwrap();
        let keys = [
            "workload",
            "guest",
            "pair",
            "backend",
            "size",
            "seed",
            "guest_ops",
            "traps",
            "traps_per_op",
            "demand_faults",
            "traps_per_demand_fault",
            "workload_steps",
            "traps_per_step",
            "cow_faults",
            "kills",
            "data_errors",
            "unshadows",
            "evictions",
            "pool_pages",
            "pool_peak_pages",
            "max_call_work",
            "oracle_mismatches",
            "audit_violations",
            "engine_s",
            "engine_us_per_trap",
            "wall_s",
            "guest_ops_per_s",
            "digest",
            "pool_series",
        ];
        let positions: Vec<usize> = keys
            .iter()
            .map(|k| json.find(&format!("\"{k}\":")).expect(k))
            .collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{json}");
        let back: RunResult = serde_json::from_str(&json).unwrap();
        assert_eq!(back.pool_series, r.pool_series);
        assert_eq!(back.traps, r.traps);
        // Old files without some fields (and null ratios) still load.
        let old: RunResult =
            serde_json::from_str(r#"{"workload":"w","traps_per_op":null}"#).unwrap();
        assert_eq!(old.workload, "w");
        assert_eq!(old.traps_per_op, 0.0);
    }

    #[test]
    fn bench_table_has_a_line_per_run_aligned() {
        let a = sample();
        let mut b = sample();
        b.guest = "bsd".into();
        b.oracle_mismatches = 3;
        let t = bench_table(&[a, b]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert!(lines[0].starts_with("guest"));
        assert!(lines[1].contains("linux") && lines[1].contains("0.5000"));
        assert!(lines[2].contains("bsd") && lines[2].ends_with('3'));
        assert_eq!(width(lines[1]), width(lines[2]), "{t}");
        assert_eq!(width(lines[0]), width(lines[1]), "{t}");
    }

    #[test]
    fn a_sim_run_has_none_of_the_kvm_keys() {
        let v = serde_json::to_value(sample()).unwrap();
        for key in ["vm_exits", "exits_per_op", "differences", "native_skipped"] {
            assert!(v.get(key).is_none(), "{key} in {v}");
        }
    }

    #[test]
    fn kvm_keys_round_trip_and_a_comparison_not_made_is_null() {
        let mut r = sample();
        r.vm_exits = Some(BTreeMap::from([("total".to_string(), 9)]));
        r.exits_per_op = Some(1.5);
        r.differences = Some(Differences {
            vs_sim: Some(0),
            vs_native: None,
        });
        r.native_skipped = Some("2-level guest".into());
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["differences"]["vs_sim"], 0);
        assert!(v["differences"]["vs_native"].is_null());
        assert_eq!(v["vm_exits"]["total"], 9);
        let back: RunResult = serde_json::from_value(v).unwrap();
        assert_eq!(back.differences, r.differences);
        assert_eq!(back.vm_exits, r.vm_exits);
        assert_eq!(back.native_skipped, r.native_skipped);
    }

    #[test]
    fn bench_files_without_a_kvm_section_still_load() {
        let old = r#"{"version":1,"runs":[{"workload":"forkwait","traps_per_op":0.5}]}"#;
        let b: BenchResults = serde_json::from_str(old).unwrap();
        assert_eq!(b.runs.len(), 1);
        assert!(b.kvm.is_empty());
        // And a sim-only bench is written without one.
        assert!(!serde_json::to_string(&b).unwrap().contains("kvm"));
        let with = BenchResults {
            kvm: vec![KvmBench {
                workload: "demand".into(),
                wall_ratio: 1.5,
                ..KvmBench::default()
            }],
            ..b
        };
        let back: BenchResults =
            serde_json::from_str(&serde_json::to_string(&with).unwrap()).unwrap();
        assert_eq!(back.kvm.len(), 1);
        assert_eq!(back.kvm[0].wall_ratio, 1.5);
    }

    #[test]
    fn number_formatting() {
        assert_eq!(fmt_f64(0.0), "0");
        assert_eq!(fmt_f64(f64::NAN), "0");
        assert_eq!(fmt_f64(0.5), "0.5000");
        assert_eq!(fmt_f64(0.01234), "0.01234");
        assert_eq!(fmt_f64(1.5), "1.500");
        assert_eq!(fmt_f64(12.345), "12.35");
        assert_eq!(fmt_f64(123.45), "123.5");
        assert_eq!(fmt_f64(12345.6), "12346");
    }
}

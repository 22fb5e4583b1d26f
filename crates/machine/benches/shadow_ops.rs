//! Nanoseconds per shadow-engine operation on the simulated machine, with the bare 4-level
//! guest walk as the unit:
//!
//! - `walk/bare`: `walk_mode::<FourLevel, Gpa, _>` over guest memory (a gfn -> mfn table in
//!   front of [`SparseMemory`]), A/D already set and `AdUpdate::Skip`: the unit.
//! - `walk/p2m`: the same walk with every guest-physical access translated through the p2m
//!   tables, as the engine's own guest walks do (context for the fill's cost).
//! - `fault/fill`: a 4-on-4 user write fault on a 4 KiB page whose L4/L3/L2/L1 shadows exist
//!   but whose shadow L1 entry is empty, and whose guest PTE already has A and D (so the
//!   guest walk writes nothing): `Domain::page_fault` alone.
//! - `fault/fill_ad`: the same fault where the guest PTE has A and D clear, so the walk sets
//!   them and the engine validates that write (a first touch after the guest wrote the PTE).
//! - `cr3/cached`: `set_control` with the other of two CR3s whose top-level shadows are both
//!   cached, then `update_cr3`.
//! - `validate/pte`: a host write of a PTE in a shadowed L1, then
//!   `validate_guest_pt_write(gpa, 8)`; the PTE alternates between two frames, so every
//!   validate rewrites the shadow entry.
//! - `clean/<frames>/<n>`: log-dirty on, `n` pages dirtied by write faults (untimed), then
//!   `clean_dirty()` (timed), for two guest memory sizes; criterion reports it per page.
//!
//! Each case is one [`Case::measure`], which criterion calls through `iter_custom` and which
//! the closing table calls again, so the table's numbers come from the same code, state and
//! setup as criterion's. Run with `cargo bench -p shadow2-machine --bench shadow_ops`
//! (`-- --quick` for a short run); the table goes to stderr at the end.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod timing;

use std::hint::black_box;
use std::time::{Duration, Instant};
use timing::{Case, has_flag, ns_per_op};

use common::walk::WalkCase;
use common::{CYCLE, Guest, L4_A, L4_B, LEAF, PER_L1, SMALL_FRAMES, USER_WRITE, VCPU};
use criterion::{BenchmarkId, Criterion, Throughput};
use shadow2::addr::{Gpa, Maddr};
use shadow2::multi::FaultOutcome;
use shadow2::paging::PhysMem;
use shadow2::paging::bits;

/// Guest frames of the large clean: 16x the small one, with 16x the shadows.
const LARGE_FRAMES: u64 = 16_384;

/// The 4-on-4 fill of an empty shadow L1 entry under existing L4/L3/L2/L1 shadows.
///
/// Resetting between faults: in batches of the 512 pages of the first L1, untimed, the
/// guest PTEs are written with A (and D) clear and the whole L1 is validated, which leaves
/// every shadow L1 entry empty (a guest entry without A is not shadowed), while the L1
/// shadow and everything above it stay. Then, for `fault/fill`, A and D are put back in the
/// guest PTEs by host writes without a validate: the shadow entries stay empty, a state the
/// engine reaches by itself whenever it shadows an L1 whose PTEs were already accessed (a
/// new L1 shadow starts empty and fills on demand) and one the auditor accepts (checked).
/// The timed part is the 512 faults, last page first (a fill prefetches the entries after
/// its own while they are empty: in this order it finds the next one filled and stops),
/// each filling one entry (checked: every entry ends up
/// mapping its page, no shadow is created, and with A/D set every fault is `Fixed`). For
/// `fault/fill_ad` A and D stay clear, so each fault's guest walk sets them and the engine
/// validates that write into the shadow entry (checked: one A/D write-back per fault).
struct FillCase {
    guest: Guest,
    /// Guest A/D already set (`fault/fill`) or clear (`fault/fill_ad`).
    ad_set: bool,
    /// The next page to fault; the batch is reset when it wraps.
    next: u64,
}

impl FillCase {
    fn new(ad_set: bool) -> FillCase {
        let mut guest = Guest::new(SMALL_FRAMES);
        // The first fault builds the L3, L2 and L1 shadows of the first L1's pages.
        assert_eq!(guest.fault(0), FaultOutcome::Fixed);
        let mut case = FillCase {
            guest,
            ad_set,
            next: CYCLE,
        };
        case.check();
        case
    }

    /// Empties every shadow L1 entry of the first L1, leaving the guest PTEs with A/D set
    /// or clear.
    fn reset(&mut self) {
        let g = &mut self.guest;
        let not_accessed = LEAF & !(bits::A | bits::D);
        for i in 0..CYCLE {
            g.host_write(
                Guest::pte_gpa(i),
                Guest::data_gfn(i).base().raw() | not_accessed,
            );
        }
        let _ =
            g.d.validate_guest_pt_write(Guest::l1_gpa(0), PER_L1 * 8)
                .expect("validate");
        if self.ad_set {
            for i in 0..CYCLE {
                g.host_write(Guest::pte_gpa(i), Guest::data_gfn(i).base().raw() | LEAF);
            }
        }
        self.next = 0;
    }

    fn check(&mut self) {
        self.reset();
        self.guest.assert_audit_clean("after a fill reset");
        assert_eq!(
            self.guest.shadow_frame(0),
            None,
            "the reset empties the entries"
        );
        let before = *self.guest.d.stats();
        let _ = self.measure(CYCLE);
        let after = *self.guest.d.stats();
        let ad_writes = after.fault_accessed_bit - before.fault_accessed_bit;
        assert_eq!(ad_writes, if self.ad_set { 0 } else { CYCLE });
        // With A/D set each fault is counted `Fixed`. With A/D clear the engine validates
        // the walk's A/D write into the shadow entry before its fill, which then finds the
        // entry written and counts the fault `Spurious`; either way the entry is filled.
        let fixed = after.fault_fixed - before.fault_fixed;
        let spurious = after.fault_spurious - before.fault_spurious;
        assert_eq!(fixed + spurious, CYCLE);
        if self.ad_set {
            assert_eq!(fixed, CYCLE);
        }
        assert_eq!(after.shadows_created, before.shadows_created);
        for i in 0..CYCLE {
            let want = self.guest.d.guest_frame(Guest::data_gfn(i)).map(|m| m.0);
            assert_eq!(self.guest.shadow_frame(i), want, "page {i} is filled");
        }
        self.guest.assert_audit_clean("after fills");
    }
}

impl Case for FillCase {
    fn measure(&mut self, iters: u64) -> Duration {
        let mut total = Duration::ZERO;
        let mut left = iters;
        while left > 0 {
            if self.next == CYCLE {
                self.reset();
            }
            let batch = left.min(CYCLE - self.next);
            let first = self.next;
            let d = &mut self.guest.d;
            let start = Instant::now();
            for i in first..first + batch {
                // Last page first: each fault's prefetch window (the entries after it) is
                // already filled, so every fault fills its own entry and the prefetch stops
                // at the first entry it reads.
                let page = CYCLE - 1 - i;
                let (outcome, flush) = d
                    .page_fault(VCPU, black_box(Guest::va(page)), USER_WRITE)
                    .expect("fault");
                black_box((outcome, flush.into_vcpus()));
            }
            total += start.elapsed();
            self.next += batch;
            left -= batch;
        }
        total
    }
}

/// A CR3 load of a cached top-level shadow, alternating between address spaces A and B
/// (both L4 shadows were built and pinned before; checked: every load is counted cached
/// and no shadow is created).
struct Cr3Case {
    guest: Guest,
    on_a: bool,
}

impl Cr3Case {
    fn new() -> Cr3Case {
        let mut guest = Guest::new(SMALL_FRAMES);
        assert_eq!(guest.fault(0), FaultOutcome::Fixed);
        guest
            .d
            .set_control(VCPU, Guest::control(L4_B))
            .expect("control");
        let _ = guest.d.update_cr3(VCPU).expect("cr3");
        assert_eq!(guest.fault(1), FaultOutcome::Fixed);
        let mut case = Cr3Case { guest, on_a: false };
        let before = *case.guest.d.stats();
        let _ = case.measure(1000);
        let after = *case.guest.d.stats();
        assert_eq!(after.cr3_cached - before.cr3_cached, 1000);
        assert_eq!(after.shadows_created, before.shadows_created);
        case.guest.assert_audit_clean("after CR3 loads");
        case
    }
}

impl Case for Cr3Case {
    fn measure(&mut self, iters: u64) -> Duration {
        let spaces = [Guest::control(L4_A), Guest::control(L4_B)];
        let mut on_a = self.on_a;
        let d = &mut self.guest.d;
        let start = Instant::now();
        for _ in 0..iters {
            on_a = !on_a;
            let ctl = spaces[usize::from(!on_a)];
            d.set_control(VCPU, black_box(ctl)).expect("control");
            black_box(d.update_cr3(VCPU).expect("cr3").into_vcpus());
        }
        let elapsed = start.elapsed();
        self.on_a = on_a;
        elapsed
    }
}

/// A guest PTE write and its validate: PTE 0 of the first (shadowed, filled) L1 alternates
/// between data pages 0 and 1, so every validate writes a different shadow entry (checked).
struct ValidateCase {
    guest: Guest,
    slot: Maddr,
    gpa: Gpa,
    values: [u64; 2],
    toggle: usize,
}

impl ValidateCase {
    fn new() -> ValidateCase {
        let mut guest = Guest::new(SMALL_FRAMES);
        assert_eq!(guest.fault(0), FaultOutcome::Fixed);
        let gpa = Guest::pte_gpa(0);
        let slot = guest.maddr(gpa);
        let values = [0, 1].map(|i| Guest::data_gfn(i).base().raw() | LEAF);
        let mut case = ValidateCase {
            guest,
            slot,
            gpa,
            values,
            toggle: 0,
        };
        let mut seen = Vec::new();
        for _ in 0..2 {
            let _ = case.measure(1);
            seen.push(case.guest.shadow_frame(0));
        }
        assert_ne!(seen[0], seen[1], "the validates change the shadow entry");
        case.guest.assert_audit_clean("after validates");
        case
    }
}

impl Case for ValidateCase {
    fn measure(&mut self, iters: u64) -> Duration {
        let mut toggle = self.toggle;
        let d = &mut self.guest.d;
        let start = Instant::now();
        for _ in 0..iters {
            toggle ^= 1;
            d.host_mut()
                .write_u64(self.slot, black_box(self.values[toggle]))
                .expect("guest memory");
            black_box(
                d.validate_guest_pt_write(black_box(self.gpa), 8)
                    .expect("validate")
                    .into_vcpus(),
            );
        }
        let elapsed = start.elapsed();
        self.toggle = toggle;
        elapsed
    }
}

/// A log-dirty clean of `dirty` pages. Before log-dirty is enabled every data page of the
/// guest is faulted in writable, so the shadows grow with memory size (32 L1 shadows for
/// 16 Ki frames, 2 for 1 Ki); then each iteration dirties pages `0 .. dirty` by write
/// faults (untimed; checked `Fixed`) and times `clean_dirty()` (checked: it reports exactly
/// those pages).
struct CleanCase {
    guest: Guest,
    dirty: u64,
}

impl CleanCase {
    fn new(frames: u64, dirty: u64) -> CleanCase {
        let mut guest = Guest::new(frames);
        assert!(dirty <= guest.pages);
        // Last page first, so that no fault finds its page prefetched by the one before.
        for i in (0..guest.pages).rev() {
            assert_eq!(guest.fault(i), FaultOutcome::Fixed);
        }
        let _ = guest.d.enable_log_dirty().expect("log-dirty");
        let mut case = CleanCase { guest, dirty };
        let _ = case.measure(2);
        case.guest.assert_audit_clean("after cleans");
        case
    }
}

impl Case for CleanCase {
    fn measure(&mut self, iters: u64) -> Duration {
        let mut total = Duration::ZERO;
        for _ in 0..iters {
            for i in 0..self.dirty {
                assert_eq!(self.guest.fault(i), FaultOutcome::Fixed);
            }
            let d = &mut self.guest.d;
            let start = Instant::now();
            let (bitmap, flush) = d.clean_dirty().expect("clean");
            black_box(flush.into_vcpus());
            total += start.elapsed();
            assert_eq!(bitmap.count() as u64, self.dirty);
        }
        total
    }
}

/// A benchmarked case with its criterion name.
struct Entry {
    name: String,
    /// Units per operation (dirty pages for a clean, else 1).
    units: u64,
    case: Box<dyn Case>,
    /// Target, in bare walks per operation, if the design sets one.
    target: Option<f64>,
}

fn entries() -> Vec<Entry> {
    let op = |name: &str, case: Box<dyn Case>, target: Option<f64>| Entry {
        name: name.to_string(),
        units: 1,
        case,
        target,
    };
    let mut v = vec![
        // Goals from issue 12's table, in bare walks.
        op("walk/bare", Box::new(WalkCase::new(false)), None),
        op("walk/p2m", Box::new(WalkCase::new(true)), Some(1.2)),
        op("fault/fill", Box::new(FillCase::new(true)), Some(6.0)),
        op("fault/fill_ad", Box::new(FillCase::new(false)), None),
        op("cr3/cached", Box::new(Cr3Case::new()), Some(1.0)),
        op("validate/pte", Box::new(ValidateCase::new()), Some(2.0)),
    ];
    for frames in [SMALL_FRAMES, LARGE_FRAMES] {
        for dirty in [64, 512] {
            v.push(Entry {
                name: format!("clean/{frames}/{dirty}"),
                units: dirty,
                case: Box::new(CleanCase::new(frames, dirty)),
                target: None,
            });
        }
    }
    v
}

fn run_criterion(c: &mut Criterion, entries: &mut [Entry]) {
    let mut ops = c.benchmark_group("shadow_ops");
    for e in entries.iter_mut().filter(|e| e.units == 1) {
        let case = &mut e.case;
        ops.bench_function(e.name.as_str(), |b| {
            b.iter_custom(|iters| case.measure(iters))
        });
    }
    ops.finish();
    // The untimed setup of a clean (its dirtying faults) costs 20-25 times the clean, so
    // these get a short measurement to keep the whole run under two minutes.
    let mut clean = c.benchmark_group("clean");
    clean
        .sample_size(10)
        .warm_up_time(Duration::from_millis(150))
        .measurement_time(Duration::from_millis(300));
    for e in entries.iter_mut().filter(|e| e.units > 1) {
        clean.throughput(Throughput::Elements(e.units));
        let id = BenchmarkId::from_parameter(e.name.trim_start_matches("clean/"));
        let case = &mut e.case;
        clean.bench_function(id, |b| b.iter_custom(|iters| case.measure(iters)));
    }
    clean.finish();
}

fn print_table(entries: &mut [Entry], round: Duration, rounds: usize, note: &str) {
    let mut rows = Vec::new();
    for e in entries.iter_mut() {
        // A clean's untimed setup costs 20-25 times the clean: shorter rounds.
        let round = if e.units > 1 { round / 4 } else { round };
        let ns = ns_per_op(e.case.as_mut(), round, rounds, 1 << 30) / e.units as f64;
        rows.push((e.name.clone(), e.units, ns, e.target));
    }
    let unit = rows[0].2;
    eprintln!();
    eprintln!(
        "shadow_ops: ns per operation, median of {rounds} rounds of ~{:.1} ms measured each \
         ({:.2} ms for cleans); unit = walk/bare{note}",
        round.as_secs_f64() * 1e3,
        round.as_secs_f64() * 1e3 / 4.0,
    );
    eprintln!("{:<20} {:>12} {:>10}  target", "operation", "ns", "x walk");
    for (name, units, ns, target) in &rows {
        let label = if *units > 1 {
            format!("{name} /page")
        } else {
            name.clone()
        };
        let ratio = ns / unit;
        let verdict = match target {
            Some(t) if ratio <= *t => format!("<= {t}: met"),
            Some(t) => format!("<= {t}: MISSED by {:.1}x", ratio / t),
            None => String::new(),
        };
        eprintln!("{label:<20} {ns:>12.1} {ratio:>10.2}  {verdict}");
    }
    let per_page = |frames: u64, dirty: u64| {
        rows.iter()
            .find(|r| r.0 == format!("clean/{frames}/{dirty}"))
            .map_or(f64::NAN, |r| r.2)
    };
    for dirty in [64, 512] {
        eprintln!(
            "clean per page, {dirty} dirty: {LARGE_FRAMES} frames / {SMALL_FRAMES} frames = {:.2}",
            per_page(LARGE_FRAMES, dirty) / per_page(SMALL_FRAMES, dirty)
        );
    }
}

fn main() {
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    let mut entries = entries();
    run_criterion(&mut c, &mut entries);
    c.final_summary();
    // Listing, or profiling one case (`--profile-time`): no table.
    if has_flag("--list") || has_flag("--profile-time") {
        return;
    }
    // `cargo bench` passes --bench; without it (`cargo test --benches`) criterion runs each
    // case once, and the table only needs to show that it works.
    if has_flag("--bench") {
        print_table(&mut entries, Duration::from_millis(40), 5, "");
    } else {
        let note = " (test mode: a smoke run, not a measurement)";
        print_table(&mut entries, Duration::from_millis(1), 1, note);
    }
}

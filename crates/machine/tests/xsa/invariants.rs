//! The isolation invariants every XSA replay checks after every step. They are written
//! independently of the engine's auditor: the shadow trees are walked here from each vcpu's
//! root, entry by entry, and every leaf is compared with the guest's own walk of the same
//! address and with the p2m.

use std::collections::{BTreeMap, BTreeSet};

use shadow2::addr::{Gva, Maddr, Mfn};
use shadow2::audit::audit;
use shadow2::domain::Domain;
use shadow2::p2m::P2mType;
use shadow2::paging::bits::{self, cr};
use shadow2::paging::{Access, AccessKind, PagingLevels, PhysMem, Privilege};
use shadow2::stats::Stats;
use shadow2::types::{ShadowKey, ShadowKind};
use shadow2_machine::memory::SparseMemory;
use shadow2_machine::oracle::guest_walk;
use shadow2_machine::sim::ShadowMachine;

type Dom = Domain<SparseMemory>;

/// MAXPHYADDR of the simulated host: frame bits at or above `1 << (48 - 12)` are reserved,
/// and a speculative load through a faulting entry (L1TF) uses only the bits below.
const HOST_FRAME_LIMIT: u64 = 1 << (48 - 12);

/// How many engine calls a step made, and for whom: a step of one call lets the check of
/// shadow-page reuse be exact for the vcpus that kept running during it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Calls {
    /// Possibly several calls (an access that faults, is fixed and retried).
    Several,
    /// Exactly one call, made for vcpu `by` (None: a host call, every vcpu kept running).
    One {
        /// The vcpu the call was made for (it was not running during it).
        by: Option<usize>,
    },
}

/// Checks, after one step of a scenario, everything isolation needs:
/// - the engine's auditor is clean, the oracle saw no mismatch, the domain is alive;
/// - every shadow entry reachable from a vcpu root: upper entries point at live shadow pages
///   of the right level, leaves map only frames the guest's own walk reaches through the p2m
///   (never a pool, p2m-table or hypervisor frame), grant no more than that walk, are not
///   writable over a shadowed page table or a clean guest leaf, keep the guest's protection
///   key, and not-present entries name no machine frame;
/// - every TLB entry of every vcpu maps only frames the domain owns, never writable over a
///   shadowed page table;
/// - the hardware's CR3 and PDPTE registers ([`check_hardware_caches`]);
/// - no shadow page a vcpu could reach at the previous step was reused as another shadow
///   (or given back to the host) without a flush of that vcpu in between
///   ([`check_reuse_after_flush`]);
/// - the work of the step stayed within its bound ([`check_call_work`]).
#[track_caller]
pub fn assert_isolated(m: &ShadowMachine, since: &mut Since, calls: Calls, step: &str) {
    let mut out = Vec::new();
    let d = m.domain();
    let report = audit(d);
    if !report.is_clean() {
        out.push(format!("audit: {:?}", report.violations));
    }
    let (n, first) = m.mismatches();
    if n != 0 {
        out.push(format!("{n} oracle mismatches: {first:?}"));
    }
    if let Some(e) = d.failure() {
        out.push(format!("the domain failed: {e}"));
    }
    let owned = owned_ram(d);
    let reachable: Vec<Reachable> = (0..d.vcpu_count())
        .map(|v| check_shadow_tree(d, v, &mut out))
        .collect();
    check_tlbs(m, &owned, &mut out);
    check_hardware_caches(m, &mut out);
    check_reuse_after_flush(m, since, calls, &mut out);
    check_call_work(d, &since.stats, &mut out);
    *since = Since {
        stats: *d.stats(),
        reachable,
        flushes: flush_counts(m),
    };
    assert!(
        out.is_empty(),
        "{step}: {} isolation violations:\n  {}",
        out.len(),
        out.iter()
            .take(12)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n  ")
    );
}

/// Shadow table pages reachable from one vcpu's root (below the root itself), with the
/// shadow each belonged to.
pub type Reachable = BTreeMap<Mfn, ShadowKey>;

/// What the previous step left: the counters, the pages each vcpu could reach, and how
/// many flushes each vcpu's TLB had seen.
#[derive(Debug, Default)]
pub struct Since {
    stats: Stats,
    reachable: Vec<Reachable>,
    flushes: Vec<u64>,
}

impl Since {
    /// The state of `m` now.
    pub fn now(m: &ShadowMachine) -> Since {
        let d = m.domain();
        let mut ignored = Vec::new();
        Since {
            stats: *d.stats(),
            reachable: (0..d.vcpu_count())
                .map(|v| check_shadow_tree(d, v, &mut ignored))
                .collect(),
            flushes: flush_counts(m),
        }
    }
}

/// Per vcpu: the TLB flushes of any kind (INVLPG, CR3 load, full) so far. Each of them
/// also empties the paging-structure caches of real hardware (SDM 4.10.4.1).
fn flush_counts(m: &ShadowMachine) -> Vec<u64> {
    (0..m.domain().vcpu_count())
        .map(|v| {
            m.cpu(v).map_or(0, |c| {
                let s = c.tlb().stats();
                s.invlpgs + s.non_global_flushes + s.full_flushes
            })
        })
        .collect()
}

/// A shadow page that vcpu `v` could reach at the previous step may sit in `v`'s
/// paging-structure caches until `v` is flushed: reusing it as another shadow, or giving
/// it back to the host, before that flush lets `v` walk it at its old meaning. When the
/// step was one engine call, a vcpu that kept running during it cannot have been flushed
/// before the call's end (the flush is handed out with its result), so any reuse of a
/// page it could reach is too early (deferred free); otherwise a flush of `v` anywhere in
/// the step is accepted.
fn check_reuse_after_flush(m: &ShadowMachine, since: &Since, calls: Calls, out: &mut Vec<String>) {
    let d = m.domain();
    let now = flush_counts(m);
    // A step the host split into several calls (a call preempted, then made again)
    // carried out each call's flush before the next.
    let one_call = d.stats().calls.saturating_sub(since.stats.calls) <= 1;
    for (v, pages) in since.reachable.iter().enumerate() {
        let kept_running = one_call && matches!(calls, Calls::One { by } if by != Some(v));
        let flushed = now.get(v) != since.flushes.get(v);
        if flushed && !kept_running {
            continue;
        }
        for (&page, key) in pages {
            let reused = match d.shadows().containing(page) {
                Some((_, info)) => info.key != *key,
                None => !d.pool().contains(page),
            };
            if reused {
                let when = if kept_running {
                    "within one call, before that call's flush"
                } else {
                    "without a flush of this vcpu"
                };
                out.push(format!(
                    "vcpu {v}: shadow page {page} ({} of frame {:#x}) reused {when}",
                    key.kind.name(),
                    key.frame
                ));
            }
        }
    }
}

/// The machine frames the domain owns as RAM (the p2m's RAM entries, or a PV domain's
/// frames).
pub fn owned_ram(d: &Dom) -> BTreeSet<Mfn> {
    let mut owned = BTreeSet::new();
    match d.p2m() {
        Some(p2m) => {
            let r = p2m.for_each_from(d.host(), shadow2::addr::Gfn::new(0), usize::MAX, |_, e| {
                if e.ty == P2mType::Ram {
                    owned.insert(e.mfn);
                }
            });
            assert!(r.is_ok(), "the p2m cannot be read: {r:?}");
        }
        None => owned.extend(d.owned_frames()),
    }
    owned
}

/// Whether `mfn` belongs to the hypervisor side: a pool page, a p2m table or a declared
/// hypervisor frame.
pub fn forbidden(d: &Dom, mfn: Mfn) -> bool {
    d.pool().contains(mfn)
        || d.p2m().is_some_and(|p| p.owns_table_frame(mfn))
        || d.hypervisor_frames().any(|h| h == mfn)
}

/// The shape of the hardware's tables for the domain's shadow mode.
#[derive(Clone, Copy)]
struct Geometry {
    levels: PagingLevels,
    width: u64,
}

impl Geometry {
    fn of(d: &Dom) -> Geometry {
        let levels = d.config().shadow_levels;
        let width = if levels == PagingLevels::Two { 4 } else { 8 };
        Geometry { levels, width }
    }
    fn entries(self, level: u8) -> u64 {
        match (self.levels, level) {
            (PagingLevels::Two, _) => 1024,
            (PagingLevels::Three, 3) => 4,
            _ => 512,
        }
    }
    fn shift(self, level: u8) -> u32 {
        if self.levels == PagingLevels::Two {
            12 + 10 * u32::from(level - 1)
        } else {
            12 + 9 * u32::from(level - 1)
        }
    }
    fn addr_mask(self) -> u64 {
        if self.width == 4 {
            bits::ADDR_MASK_4
        } else {
            bits::ADDR_MASK_8
        }
    }
    fn canonical(self, va: u64) -> u64 {
        if self.levels == PagingLevels::Four && va & (1 << 47) != 0 {
            va | 0xffff_0000_0000_0000
        } else {
            va
        }
    }
    fn nx(self) -> bool {
        self.levels != PagingLevels::Two
    }
}

/// Rights accumulated down a shadow walk.
#[derive(Clone, Copy)]
struct Rights {
    write: bool,
    user: bool,
    exec: bool,
}

impl Rights {
    fn below(self, entry: u64, g: Geometry, pdpte: bool) -> Rights {
        if pdpte {
            return self;
        }
        Rights {
            write: self.write && entry & bits::RW != 0,
            user: self.user && entry & bits::US != 0,
            exec: self.exec && !(g.nx() && entry & bits::NX != 0),
        }
    }
}

/// The engine's fast-path marker: present with a reserved bit (51) set.
fn is_marker(g: Geometry, e: u64) -> bool {
    g.width == 8 && e & bits::P != 0 && e & (1 << 51) != 0
}

/// The engine's MMIO marker (a marker of type 2).
fn is_mmio_marker(g: Geometry, e: u64) -> bool {
    is_marker(g, e) && e & (7 << 9) == 2 << 9
}

/// The machine frame a faulting entry's address bits below MAXPHYADDR name, if that frame
/// exists on this host (frame 0 is the conventional empty entry and is not counted). A
/// terminal fault on such an entry loads from that frame speculatively (L1TF).
fn names_machine_frame(d: &Dom, e: u64, g: Geometry) -> Option<Mfn> {
    let frame = (e & g.addr_mask() & ((HOST_FRAME_LIMIT << 12) - 1)) >> 12;
    let mfn = Mfn::new(frame);
    (frame != 0 && d.host().contains(mfn)).then_some(mfn)
}

/// Every MMIO marker in the shadows whose address bits below MAXPHYADDR name a machine
/// frame of this host: (slot, entry). The marker carries the guest's frame number, which a
/// terminal fault (L1TF) would use as a machine address.
pub fn mmio_markers_naming_memory(d: &Dom) -> Vec<(Maddr, u64)> {
    let g = Geometry::of(d);
    let mut found = Vec::new();
    for (head, info) in d.shadows().shadows() {
        if !info.key.kind.is_leaf_table() {
            continue;
        }
        let bytes = 4096u64 << info.order;
        for off in (0..bytes).step_by(g.width as usize) {
            let slot = Maddr::new(head.base().raw() + off);
            if let Ok(e) = d.host().read_entry(slot, g.width)
                && is_mmio_marker(g, e)
                && names_machine_frame(d, e, g).is_some()
            {
                found.push((slot, e));
            }
        }
    }
    found
}

struct TreeWalk<'a> {
    d: &'a Dom,
    v: usize,
    g: Geometry,
    out: &'a mut Vec<String>,
    reachable: Reachable,
}

/// Checks every entry reachable from vcpu `v`'s root; returns the table pages reached.
fn check_shadow_tree(d: &Dom, v: usize, out: &mut Vec<String>) -> Reachable {
    let Some(vcpu) = d.vcpu(v) else {
        return Reachable::new();
    };
    let (Some(pair), Some(root)) = (vcpu.pair(), vcpu.root()) else {
        return Reachable::new();
    };
    if pair.guest() == PagingLevels::Zero {
        // A paging-disabled vcpu runs on the p2m itself.
        return Reachable::new();
    }
    for top in vcpu.tops() {
        if d.shadows().containing(top).is_none() {
            out.push(format!("vcpu {v}: top {top} is not a live shadow"));
        }
    }
    let g = Geometry::of(d);
    let top_level = g.levels.count();
    let mut w = TreeWalk {
        d,
        v,
        g,
        out,
        reachable: Reachable::new(),
    };
    let all = Rights {
        write: true,
        user: true,
        exec: true,
    };
    w.table(root, top_level, 0, all);
    w.reachable
}

impl TreeWalk<'_> {
    fn table(&mut self, table: Mfn, level: u8, va_base: u64, rights: Rights) {
        let g = self.g;
        for i in 0..g.entries(level) {
            let slot = Maddr::new(table.base().raw() + i * g.width);
            let Ok(e) = self.d.host().read_entry(slot, g.width) else {
                self.out
                    .push(format!("vcpu {}: shadow slot {slot} unreadable", self.v));
                return;
            };
            let va = g.canonical(va_base | (i << g.shift(level)));
            self.entry(slot, e, level, va, rights);
        }
    }

    fn entry(&mut self, slot: Maddr, e: u64, level: u8, va: u64, rights: Rights) {
        let g = self.g;
        let v = self.v;
        if e & bits::P == 0 || is_marker(g, e) {
            // MMIO markers are checked on their own (`mmio_markers_naming_memory`).
            if !is_mmio_marker(g, e)
                && let Some(frame) = names_machine_frame(self.d, e, g)
            {
                self.out.push(format!(
                    "vcpu {v}: non-present shadow entry {e:#x} at {slot} names machine frame {frame} (L1TF)"
                ));
            }
            return;
        }
        if self.d.config().in_hole(Gva::new(va)) {
            return;
        }
        let pdpte = g.levels == PagingLevels::Three && level == 3;
        let here = rights.below(e, g, pdpte);
        let frame = Mfn::new((e & g.addr_mask()) >> 12);
        let superpage = level > 1 && !pdpte && e & bits::PS != 0;
        if superpage {
            self.superpage(slot, e, level, va, frame, here);
            return;
        }
        if level == 1 {
            self.leaf(slot, e, va, frame, here);
            return;
        }
        match self.d.shadows().containing(frame) {
            Some((head, info)) => {
                let kind = info.key.kind;
                let fits = kind.level() == level - 1 || (kind == ShadowKind::VcpuTop && level > 2);
                if !fits {
                    self.out.push(format!(
                        "vcpu {v}: level-{level} entry at {slot} points at a {} shadow (type confusion)",
                        kind.name()
                    ));
                }
                self.reachable.insert(frame, info.key);
                if self.d.shadows().is_dying(head) {
                    self.out.push(format!(
                        "vcpu {v}: entry at {slot} points at dying shadow {head}"
                    ));
                }
                self.table(frame, level - 1, va, here);
            }
            None => self.out.push(format!(
                "vcpu {v}: level-{level} entry {e:#x} at {slot} points at {frame}, not a live shadow"
            )),
        }
    }

    /// A shadow superpage entry: every frame it maps is checked as a leaf would be
    /// (hypervisor-side, writable over a page table), and its first and last frames
    /// against the guest's own walk.
    fn superpage(&mut self, slot: Maddr, e: u64, level: u8, va: u64, frame: Mfn, rights: Rights) {
        let frames = 1u64 << (self.g.shift(level) - 12);
        // Bit 12 of a superpage entry is PAT, not an address bit.
        let base = Mfn::new(frame.raw() & !(frames - 1));
        for k in 1..frames - 1 {
            let f = Mfn::new(base.raw() + k);
            if f.raw() >= HOST_FRAME_LIMIT {
                break;
            }
            if forbidden(self.d, f) {
                self.out.push(format!(
                    "vcpu {}: superpage {e:#x} at {slot} maps hypervisor-side frame {f}",
                    self.v
                ));
            }
            if rights.write && self.d.shadows().is_page_table(f) {
                self.out.push(format!(
                    "vcpu {}: superpage {e:#x} at {slot} writable over shadowed page table {f}",
                    self.v
                ));
            }
        }
        self.leaf(slot, e, va, base, rights);
        let last = frames - 1;
        self.leaf(
            slot,
            e,
            va + (last << 12),
            Mfn::new(base.raw() + last),
            rights,
        );
    }

    fn leaf(&mut self, slot: Maddr, e: u64, va: u64, frame: Mfn, rights: Rights) {
        let d = self.d;
        let v = self.v;
        let here = format!("vcpu {v}: leaf {e:#x} at {slot} for va {va:#x}");
        if frame.raw() >= HOST_FRAME_LIMIT {
            // Frame bits above MAXPHYADDR: a reserved-bit fault on hardware, no mapping.
            return;
        }
        if forbidden(d, frame) {
            self.out
                .push(format!("{here} maps hypervisor-side frame {frame}"));
        }
        let Some(vcpu) = d.vcpu(v) else { return };
        let out_of_sync_l1 = d.shadows().containing(slot.mfn()).is_some_and(|(_, info)| {
            !info.key.kind.is_fl1() && d.is_out_of_sync(Mfn::new(info.key.frame))
        });
        if out_of_sync_l1 {
            // An out-of-sync L1 shadow follows its snapshot, not the guest's page (the
            // auditor compares it with the snapshot); what it maps must still be the
            // domain's, and writable only where the guest may write a page table natively.
            if rights.write && d.shadows().is_page_table(frame) && !d.is_out_of_sync(frame) {
                self.out
                    .push(format!("{here} writable over shadowed page table {frame}"));
            }
            return;
        }
        let mut ctl = *vcpu.control();
        // The guest's rights alone: no SMEP/SMAP/PKRU verdict for this supervisor read.
        ctl.cr4 &= !(cr::CR4_SMEP | cr::CR4_SMAP | cr::CR4_PKE);
        let read = Access::new(AccessKind::Read, Privilege::Supervisor);
        let t = match guest_walk(d, &ctl, Gva::new(va), read) {
            Ok(t) => t,
            Err(f) => {
                self.out
                    .push(format!("{here}: the guest's walk faults ({:?})", f.fault));
                return;
            }
        };
        match d.guest_frame(t.frame) {
            Some((mfn, P2mType::Ram)) if mfn == frame => {}
            other => self.out.push(format!(
                "{here} maps {frame}, the guest's walk reaches {} = {other:?}",
                t.frame
            )),
        }
        let gp = t.perms;
        if rights.write && !gp.write {
            self.out
                .push(format!("{here} writable, the guest's read-only"));
        }
        if rights.user && !gp.user {
            self.out
                .push(format!("{here} user, the guest's supervisor"));
        }
        if rights.exec && !gp.exec && self.g.nx() {
            self.out.push(format!("{here} executable, the guest's not"));
        }
        if rights.write && t.leaf & bits::D == 0 {
            self.out
                .push(format!("{here} writable while the guest leaf's D is clear"));
        }
        if rights.write && d.shadows().is_page_table(frame) && !d.is_out_of_sync(frame) {
            self.out
                .push(format!("{here} writable over shadowed page table {frame}"));
        }
        let guest_keys =
            vcpu.control().levels() == PagingLevels::Four && vcpu.control().cr4 & cr::CR4_PKE != 0;
        if guest_keys && e & bits::PKEY_MASK != t.leaf & bits::PKEY_MASK {
            self.out.push(format!(
                "{here} has protection key {}, the guest's leaf {}",
                (e & bits::PKEY_MASK) >> bits::PKEY_SHIFT,
                (t.leaf & bits::PKEY_MASK) >> bits::PKEY_SHIFT
            ));
        }
    }
}

/// Every TLB entry of every vcpu maps frames the domain owns, and none is writable over a
/// shadowed page table.
fn check_tlbs(m: &ShadowMachine, owned: &BTreeSet<Mfn>, out: &mut Vec<String>) {
    let d = m.domain();
    for v in 0..d.vcpu_count() {
        let Some(cpu) = m.cpu(v) else { continue };
        for entry in cpu.tlb().entries() {
            let frames = (entry.size.bytes() / 4096).min(1024);
            for k in 0..frames {
                let f = Mfn::new(entry.frame.raw() + k);
                if forbidden(d, f) {
                    out.push(format!(
                        "vcpu {v}: TLB maps {} -> hypervisor-side frame {f}",
                        entry.va
                    ));
                } else if !owned.contains(&f) {
                    out.push(format!(
                        "vcpu {v}: TLB maps {} -> frame {f} the domain does not own",
                        entry.va
                    ));
                }
                if entry.perms.write && d.shadows().is_page_table(f) && !d.is_out_of_sync(f) {
                    out.push(format!(
                        "vcpu {v}: TLB maps {} writable over shadowed page table {f}",
                        entry.va
                    ));
                }
            }
        }
    }
}

/// The hardware state beyond the TLB: each paging vcpu's CR3 is the engine's root for it
/// (a live shadow, or the p2m root while the guest does not page) and, on PAE hardware,
/// each present PDPTE register equals the root's entry in memory and points at a live L2
/// shadow. When the simulated CPU caches paging structures, every cached table frame must
/// be checked here the same way.
pub fn check_hardware_caches(m: &ShadowMachine, out: &mut Vec<String>) {
    let d = m.domain();
    for v in 0..d.vcpu_count() {
        let (Some(cpu), Some(vcpu)) = (m.cpu(v), d.vcpu(v)) else {
            continue;
        };
        if cpu.levels() == PagingLevels::Zero {
            continue;
        }
        let hw = cpu.control();
        let cr3_frame = Mfn::new((hw.cr3 & bits::ADDR_MASK_8) >> 12);
        if vcpu.root() != Some(cr3_frame) {
            out.push(format!(
                "vcpu {v}: hardware CR3 {cr3_frame} but the engine's root is {:?}",
                vcpu.root()
            ));
        }
        let on_p2m = vcpu.pair().is_some_and(|p| p.guest() == PagingLevels::Zero);
        let table_ok = |f: Mfn, level: Option<u8>| {
            if on_p2m {
                return d.p2m().is_some_and(|p| p.owns_table_frame(f));
            }
            match d.shadows().containing(f) {
                Some((head, info)) => {
                    !d.shadows().is_dying(head) && level.is_none_or(|l| info.key.kind.level() == l)
                }
                None => false,
            }
        };
        if !table_ok(cr3_frame, None) {
            out.push(format!(
                "vcpu {v}: hardware CR3 {cr3_frame} is not a live table"
            ));
        }
        if cpu.levels() != PagingLevels::Three {
            continue;
        }
        for (i, &reg) in hw.pdptes.iter().enumerate() {
            let slot = Maddr::new((hw.cr3 & 0xffff_ffe0) + 8 * i as u64);
            let in_memory = d.host().read_u64(slot).ok();
            if reg & bits::P == 0 {
                continue;
            }
            let f = Mfn::new((reg & bits::ADDR_MASK_8) >> 12);
            if !table_ok(f, Some(2)) {
                out.push(format!(
                    "vcpu {v}: PDPTE register {i} = {reg:#x} points at {f}, not a live L2"
                ));
            }
            if in_memory != Some(reg) {
                out.push(format!(
                    "vcpu {v}: PDPTE register {i} = {reg:#x} but the root holds {in_memory:x?} (no reload)"
                ));
            }
        }
    }
}

/// The work one step may do: a step is one host call (or one instruction, a few calls),
/// and none may scan or validate more shadow entries than the whole pool holds (a CR3 load
/// finishes its scan "bounded by the pool"; everything else is bounded by a budget far
/// below). And no engine call so far did more work (`Stats::max_call_work`, the entries
/// each call read or wrote) than the domain's bound for one call.
pub fn check_call_work(d: &Dom, since: &Stats, out: &mut Vec<String>) {
    let call_bound = d.config().call_work_bound();
    if d.stats().max_call_work > call_bound {
        out.push(format!(
            "an engine call did {} work, more than the bound {call_bound}",
            d.stats().max_call_work
        ));
    }
    let per_page = if d.config().shadow_levels == PagingLevels::Two {
        1024
    } else {
        512
    };
    let bound = d.pool().total_pages() as u64 * per_page;
    let s = d.stats();
    let work = (s.scanned_entries - since.scanned_entries)
        + (s.validated_entries - since.validated_entries);
    if work > 2 * bound {
        out.push(format!(
            "the step touched {work} shadow entries, more than twice the pool's {bound}"
        ));
    }
}

/// The checks above can fail: each corruption of a healthy machine is caught.
#[cfg(test)]
mod self_test {
    use std::panic::{AssertUnwindSafe, catch_unwind};

    use shadow2::addr::Mfn;
    use shadow2::multi::Pair;
    use shadow2::paging::bits;

    use crate::engine_support::{DATA, leaf_mappings_of, poke_machine};
    use crate::harness::{DATA_GFN, Xsa};

    /// A 4-on-4 guest with X mapped and read: (machine, X's shadow leaf slot, leaf).
    fn healthy() -> (Xsa, u64, u64) {
        healthy_with_pool(128)
    }

    fn healthy_with_pool(pool: usize) -> (Xsa, u64, u64) {
        let mut x = Xsa::new(Pair::P4on4, 1, pool);
        let cr3 = x.space();
        x.map(cr3, 0x40_3000, DATA_GFN, DATA);
        x.run(0, cr3);
        x.read(0, 0x40_3000).unwrap();
        let mfn = x.mfn(DATA_GFN);
        let (slot, leaf) = leaf_mappings_of(&x.m, mfn)[0];
        (x, slot, leaf)
    }

    fn caught(x: &mut Xsa, expect: &str) {
        let r = catch_unwind(AssertUnwindSafe(|| x.step("corrupted")));
        let msg = match r {
            Ok(()) => panic!("the corruption went unnoticed"),
            Err(e) => e.downcast_ref::<String>().cloned().unwrap_or_default(),
        };
        assert!(msg.contains(expect), "{msg}");
    }

    #[test]
    fn a_leaf_naming_a_pool_frame_is_caught() {
        let (mut x, slot, leaf) = healthy();
        let pool = x.domain().pool().allocated_blocks().next().unwrap().0;
        let bad = (leaf & !bits::ADDR_MASK_8) | pool.base().raw();
        poke_machine(&mut x.m, slot, bad);
        caught(&mut x, "hypervisor-side frame");
    }

    #[test]
    fn a_writable_leaf_over_a_page_table_is_caught() {
        let (mut x, slot, leaf) = healthy();
        let cr3 = x.m.guest_control(0).cr3;
        let l1 = x.t.table_of(&mut x.m, cr3, 0x40_3000, 1);
        let table = x.mfn(l1);
        let bad = (leaf & !bits::ADDR_MASK_8) | table.base().raw() | bits::RW;
        poke_machine(&mut x.m, slot, bad);
        caught(&mut x, "writable over shadowed page table");
    }

    #[test]
    fn a_shadow_page_reused_without_a_flush_is_caught() {
        // The smallest pool: the freed page is the one the next shadows get.
        let (mut x, _, _) = healthy_with_pool(0);
        let mut since = super::Since::now(&x.m);
        let cr3 = x.m.guest_control(0).cr3;
        let l1 = x.t.table_of(&mut x.m, cr3, 0x40_3000, 1);
        // The L1 goes (its shadow page is freed), new tables elsewhere reuse the page.
        let flush =
            x.m.domain_mut()
                .set_p2m(shadow2::addr::Gfn::new(l1), None)
                .unwrap();
        x.m.settle(flush);
        for k in 0..12u64 {
            x.t.map(&mut x.m, cr3, 0x8000_0000 + k * 0x4000_0000, DATA_GFN, DATA);
        }
        for k in 0..12u64 {
            let va = shadow2::addr::Gva::new(0x8000_0000 + k * 0x4000_0000);
            x.m.read(0, va, crate::engine_support::SUP, &mut [0u8; 8])
                .unwrap();
        }
        // As if the host had not carried out the flushes it was handed.
        since.flushes = super::flush_counts(&x.m);
        let r = catch_unwind(AssertUnwindSafe(|| {
            super::assert_isolated(&x.m, &mut since, super::Calls::Several, "corrupted")
        }));
        let msg = r
            .err()
            .and_then(|e| e.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        assert!(msg.contains("reused without a flush"), "{msg}");
    }

    #[test]
    fn a_shadow_page_reused_within_one_call_is_caught() {
        let (mut x, _, _) = healthy_with_pool(0);
        let cr3 = x.m.guest_control(0).cr3;
        // The same reuse as above, labelled as one host call: vcpu 0 counts as having kept
        // running, so the reuse is too early although its TLB was flushed meanwhile.
        let mut since = super::Since::now(&x.m);
        let l1 = x.t.table_of(&mut x.m, cr3, 0x40_3000, 1);
        let flush =
            x.m.domain_mut()
                .set_p2m(shadow2::addr::Gfn::new(l1), None)
                .unwrap();
        x.m.settle(flush);
        for k in 0..12u64 {
            x.t.map(&mut x.m, cr3, 0x8000_0000 + k * 0x4000_0000, DATA_GFN, DATA);
            let va = shadow2::addr::Gva::new(0x8000_0000 + k * 0x4000_0000);
            x.m.read(0, va, crate::engine_support::SUP, &mut [0u8; 8])
                .unwrap();
        }
        // As if all of it had been a single engine call.
        since.stats.calls = x.m.domain().stats().calls - 1;
        let r = catch_unwind(AssertUnwindSafe(|| {
            super::assert_isolated(&x.m, &mut since, super::Calls::One { by: None }, "one call")
        }));
        let msg = r
            .err()
            .and_then(|e| e.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        assert!(msg.contains("before that call's flush"), "{msg}");
    }

    #[test]
    fn a_not_present_entry_naming_memory_is_caught() {
        let (mut x, slot, _) = healthy();
        poke_machine(&mut x.m, slot, Mfn::new(5).base().raw());
        caught(&mut x, "(L1TF)");
    }
}

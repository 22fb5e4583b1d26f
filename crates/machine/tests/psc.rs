//! Paging-structure caches of the simulated CPU (SDM 4.10.3, 4.10.4): in every paging mode a
//! walk that misses the TLB uses a cached upper entry after the entry in memory was cleared,
//! until INVLPG, a CR3 load or a full flush; a fault drops only the entries for its address.
//! Then the machine's hardware-cache check: a cached entry that points at a freed shadow
//! page, at a shadow of the wrong level or at a frame the domain does not own is reported.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod engine_support;

use shadow2::addr::{Gfn, Gva, Maddr, Mfn};
use shadow2::host::MachineMemory;
use shadow2::paging::bits::{self, cr};
use shadow2::paging::{Access, AccessKind, CpuFeatures, PagingLevels, Perms, PhysMem, Privilege};
use shadow2::types::ShadowKind;
use shadow2_machine::cpu::CachedEntry;
use shadow2_machine::sim::ShadowMachine;
use shadow2_machine::{Cpu, CpuFault, PscEntry, SparseMemory};

use engine_support::*;

const PWU: u64 = bits::P | bits::RW | bits::US;

fn read() -> Access {
    Access::new(AccessKind::Read, Privilege::Supervisor)
}

/// Tables in one mode mapping two pages that share every table: `near` and `far` (same
/// leaf table), plus `other` under its own leaf table (and, in 4-level mode, under the same
/// PDPTE but another PDE).
struct Setup {
    mem: SparseMemory,
    cpu: Cpu,
    /// The entry (machine address, width) that points at the shared leaf table.
    pde: (u64, u64),
    /// An upper entry above it (the PML4E in 4-level mode; the PDE otherwise).
    top_entry: (u64, u64),
    near: u64,
    far: u64,
    other: u64,
}

const NEAR: u64 = 0x0040_1000;
const FAR: u64 = 0x0040_5000;
const NEAR_FRAME: u64 = 0x80;
const FAR_FRAME: u64 = 0x81;
const OTHER_FRAME: u64 = 0x82;

fn write_entry(mem: &mut SparseMemory, (addr, width): (u64, u64), value: u64) {
    mem.write_entry(Maddr::new(addr), width, value).unwrap();
}

fn setup(levels: PagingLevels) -> Setup {
    let mut mem = SparseMemory::new(512);
    let mut cpu = Cpu::new(CpuFeatures::KVM_HOST);
    let leaf = |frame: u64| (frame << 12) | PWU;
    match levels {
        PagingLevels::Two => {
            let (pd, pt, pt2) = (0x1000u64, 0x2000u64, 0x3000u64);
            let other = 0x0080_0000u64;
            let pde = (pd + 4 * (NEAR >> 22), 4);
            write_entry(&mut mem, pde, pt | PWU);
            write_entry(&mut mem, (pd + 4 * (other >> 22), 4), pt2 | PWU);
            write_entry(
                &mut mem,
                (pt + 4 * ((NEAR >> 12) & 0x3ff), 4),
                leaf(NEAR_FRAME),
            );
            write_entry(
                &mut mem,
                (pt + 4 * ((FAR >> 12) & 0x3ff), 4),
                leaf(FAR_FRAME),
            );
            write_entry(&mut mem, (pt2, 4), leaf(OTHER_FRAME));
            cpu.load_cr3(&mem, pd).unwrap();
            cpu.set_control(&mem, cr::CR0_PE | cr::CR0_PG | cr::CR0_WP, 0, 0)
                .unwrap();
            Setup {
                mem,
                cpu,
                pde,
                top_entry: pde,
                near: NEAR,
                far: FAR,
                other,
            }
        }
        PagingLevels::Three => {
            let (pdpt, pd, pt, pt2) = (0x1000u64, 0x2000u64, 0x3000u64, 0x4000u64);
            let other = 0x0060_0000u64;
            write_entry(&mut mem, (pdpt, 8), pd | bits::P);
            let pde = (pd + 8 * (NEAR >> 21), 8);
            write_entry(&mut mem, pde, pt | PWU);
            write_entry(&mut mem, (pd + 8 * (other >> 21), 8), pt2 | PWU);
            write_entry(
                &mut mem,
                (pt + 8 * ((NEAR >> 12) & 0x1ff), 8),
                leaf(NEAR_FRAME),
            );
            write_entry(
                &mut mem,
                (pt + 8 * ((FAR >> 12) & 0x1ff), 8),
                leaf(FAR_FRAME),
            );
            write_entry(&mut mem, (pt2, 8), leaf(OTHER_FRAME));
            cpu.load_cr3(&mem, pdpt).unwrap();
            let cr0 = cr::CR0_PE | cr::CR0_PG | cr::CR0_WP;
            cpu.set_control(&mem, cr0, cr::CR4_PAE, cr::EFER_NXE)
                .unwrap();
            Setup {
                mem,
                cpu,
                pde,
                top_entry: pde,
                near: NEAR,
                far: FAR,
                other,
            }
        }
        _ => {
            let (l4, l3, l2, l1, l1b) = (0x1000u64, 0x2000, 0x3000, 0x4000, 0x5000);
            // Same PML4E and PDPTE as NEAR, another PDE.
            let other = 0x0060_0000u64;
            let top_entry = (l4, 8);
            write_entry(&mut mem, top_entry, l3 | PWU);
            write_entry(&mut mem, (l3, 8), l2 | PWU);
            let pde = (l2 + 8 * (NEAR >> 21), 8);
            write_entry(&mut mem, pde, l1 | PWU);
            write_entry(&mut mem, (l2 + 8 * (other >> 21), 8), l1b | PWU);
            write_entry(
                &mut mem,
                (l1 + 8 * ((NEAR >> 12) & 0x1ff), 8),
                leaf(NEAR_FRAME),
            );
            write_entry(
                &mut mem,
                (l1 + 8 * ((FAR >> 12) & 0x1ff), 8),
                leaf(FAR_FRAME),
            );
            write_entry(&mut mem, (l1b, 8), leaf(OTHER_FRAME));
            cpu.load_cr3(&mem, l4).unwrap();
            let cr0 = cr::CR0_PE | cr::CR0_PG | cr::CR0_WP;
            cpu.set_control(&mem, cr0, cr::CR4_PAE, cr::EFER_LME | cr::EFER_NXE)
                .unwrap();
            Setup {
                mem,
                cpu,
                pde,
                top_entry,
                near: NEAR,
                far: FAR,
                other,
            }
        }
    }
}

impl Setup {
    fn frame_of(&mut self, va: u64) -> Result<Mfn, CpuFault> {
        self.cpu
            .translate(&mut self.mem, Gva::new(va), read())
            .map(|t| t.frame)
    }

    /// Walks `near` (caching the walk's upper entries), then clears the entry that points
    /// at the shared leaf table, without any flush.
    fn cache_then_clear_pde(&mut self) {
        assert_eq!(self.frame_of(self.near), Ok(Mfn::new(NEAR_FRAME)));
        write_entry(&mut self.mem, self.pde, 0);
    }

    fn assert_far_faults(&mut self) {
        assert!(
            matches!(self.frame_of(self.far), Err(CpuFault::PageFault { .. })),
            "the walk used a cached entry that should be gone"
        );
    }
}

const MODES: [PagingLevels; 3] = [PagingLevels::Two, PagingLevels::Three, PagingLevels::Four];

#[test]
fn a_cleared_upper_entry_still_leads_to_the_old_leaf_table_until_a_flush() {
    for levels in MODES {
        let mut s = setup(levels);
        s.cache_then_clear_pde();
        let hits = s.cpu.psc().stats().hits;
        // `far` was never walked: no TLB entry; the cached PDE leads to the old table.
        assert_eq!(s.frame_of(s.far), Ok(Mfn::new(FAR_FRAME)), "{levels:?}");
        assert_eq!(s.cpu.psc().stats().hits, hits + 1, "{levels:?}");
        // Without the caches (and without the TLB entry just made), a walk from memory
        // sees the cleared entry.
        s.cpu.set_psc_enabled(false);
        s.cpu.tlb_mut().invlpg(Gva::new(s.far));
        s.assert_far_faults();
    }
}

#[test]
fn the_old_leaf_table_is_read_at_the_cached_frame_even_when_reused() {
    for levels in MODES {
        let mut s = setup(levels);
        s.cache_then_clear_pde();
        // The freed leaf table's frame is reused: whatever it holds now is walked as a
        // leaf table, as hardware would.
        let width = s.pde.1;
        let leaf_table = match levels {
            PagingLevels::Two => 0x2000,
            PagingLevels::Three => 0x3000,
            _ => 0x4000,
        };
        let slot = leaf_table + width * ((FAR >> 12) & if width == 4 { 0x3ff } else { 0x1ff });
        write_entry(&mut s.mem, (slot, width), (0x99 << 12) | PWU);
        assert_eq!(s.frame_of(s.far), Ok(Mfn::new(0x99)), "{levels:?}");
    }
}

#[test]
fn invlpg_of_any_address_cr3_loads_and_full_flushes_remove_every_entry() {
    type Flush = fn(&mut Setup);
    let flushes: [(&str, Flush); 4] = [
        ("INVLPG elsewhere", |s| s.cpu.invlpg(Gva::new(0x7000_0000))),
        ("MOV to CR3", |s| {
            let cr3 = s.cpu.control().cr3;
            s.cpu.load_cr3(&s.mem, cr3).unwrap();
        }),
        ("full flush", |s| s.cpu.flush_tlb_all()),
        ("CR4.PGE toggle", |s| {
            let cr4 = s.cpu.control().cr4;
            s.cpu.set_cr4(&s.mem, cr4 ^ cr::CR4_PGE).unwrap();
        }),
    ];
    for levels in MODES {
        for (name, flush) in flushes {
            let mut s = setup(levels);
            s.cache_then_clear_pde();
            assert!(!s.cpu.psc().is_empty(), "{levels:?} {name}");
            flush(&mut s);
            assert!(s.cpu.psc().is_empty(), "{levels:?} {name}");
            s.assert_far_faults();
        }
    }
}

#[test]
fn controls_read_at_access_time_keep_the_caches() {
    // CR0.WP, CR4.SMAP and RFLAGS.AC change no cached entry (rights are checked at access
    // time), and the SDM lists no invalidation for them.
    for levels in MODES {
        let mut s = setup(levels);
        s.cache_then_clear_pde();
        let ctl = *s.cpu.control();
        s.cpu.set_cr0(&s.mem, ctl.cr0 & !cr::CR0_WP).unwrap();
        s.cpu.set_cr4(&s.mem, ctl.cr4 | cr::CR4_SMAP).unwrap();
        s.cpu.set_rflags(cr::RFLAGS_AC);
        assert_eq!(s.frame_of(s.far), Ok(Mfn::new(FAR_FRAME)), "{levels:?}");
    }
}

#[test]
fn a_fault_drops_the_entries_for_its_address_only() {
    for levels in MODES {
        let mut s = setup(levels);
        assert_eq!(s.frame_of(s.other), Ok(Mfn::new(OTHER_FRAME)));
        s.cache_then_clear_pde();
        // An address under the cleared PDE whose leaf is empty faults through the cached
        // entries; the fault invalidates every entry that would translate it.
        let empty = s.near + 0x1_0000;
        assert!(matches!(s.frame_of(empty), Err(CpuFault::PageFault { .. })));
        s.assert_far_faults();
        // Entries for other addresses survive: in 4-level mode `other` shares the PML4E and
        // PDPTE with the faulting address, so only its PDE entry is left.
        let other_pde = s.cpu.psc().peek(2, Gva::new(s.other));
        assert!(other_pde.is_some(), "{levels:?}");
    }
}

#[test]
fn in_4_level_mode_every_upper_level_is_cached() {
    let mut s = setup(PagingLevels::Four);
    assert_eq!(s.frame_of(s.near), Ok(Mfn::new(NEAR_FRAME)));
    let levels: Vec<u8> = s.cpu.psc().entries().map(|e| e.level).collect();
    assert_eq!(levels, [2, 3, 4]);
    // The PML4E is gone from memory; `other` (another PDE under the cached PDPTE) is still
    // reached through the PDPTE cache.
    write_entry(&mut s.mem, s.top_entry, 0);
    assert_eq!(s.frame_of(s.other), Ok(Mfn::new(OTHER_FRAME)));
}

#[test]
fn cached_rights_are_those_of_the_levels_above() {
    let mut s = setup(PagingLevels::Four);
    // A read-only, supervisor-only PML4E: the cached PDPTE and PDE carry its rights.
    write_entry(&mut s.mem, s.top_entry, 0x2000 | bits::P);
    assert_eq!(s.frame_of(s.near), Ok(Mfn::new(NEAR_FRAME)));
    for e in s.cpu.psc().entries() {
        assert_eq!(
            e.perms,
            Perms {
                write: false,
                user: false,
                exec: true
            },
            "{e:?}"
        );
    }
    write_entry(&mut s.mem, s.top_entry, 0x2000 | PWU);
    // The far page was never walked: a user read goes through the cached rights and faults.
    let user = Access::new(AccessKind::Read, Privilege::User);
    let r = s.cpu.translate(&mut s.mem, Gva::new(s.far), user);
    assert!(matches!(r, Err(CpuFault::PageFault { .. })));
}

// ---------------------------------------------------------------------------------------
// The machine's hardware-cache check.

/// A 4-on-4 machine whose vcpu 0 has walked `VA` through the shadows.
const VA: u64 = 0x40_0000;

fn running_4on4() -> (ShadowMachine, Tables, u64) {
    // One vcpu, a pool far from full: nothing is evicted behind the test's back.
    let mut m = machine(hvm(PagingLevels::Four, 1, 256), 64);
    let mut t = Tables::new(PagingLevels::Four, 8, 64);
    let cr3 = t.new_root(0);
    t.map(&mut m, cr3, VA, 40, DATA);
    t.map(&mut m, cr3, VA + 0x1000, 41, DATA);
    set_mode(&mut m, 0, PagingLevels::Four, cr3);
    read_u64(&mut m, 0, VA).unwrap();
    check(&m);
    (m, t, cr3)
}

fn structure_entries(m: &ShadowMachine) -> Vec<PscEntry> {
    m.cpu(0)
        .unwrap()
        .cached_entries()
        .filter_map(|e| match e {
            CachedEntry::Structure(p) => Some(p),
            CachedEntry::Translation(_) => None,
        })
        .collect()
}

#[test]
fn the_check_accepts_what_a_correct_run_leaves() {
    let (m, _, _) = running_4on4();
    let entries = structure_entries(&m);
    assert_eq!(entries.len(), 3, "{entries:?}");
    assert_eq!(m.check_hardware_caches(), []);
}

#[test]
fn the_check_reports_an_entry_pointing_at_a_freed_shadow_page() {
    let (mut m, mut t, cr3) = running_4on4();
    let l1 = structure_entries(&m)
        .into_iter()
        .find(|e| e.level == 2)
        .unwrap();
    // A vcpu that misses the flush of the guest's unlinking of its leaf table (the engine
    // then frees the leaf shadow): its caches are kept across the write by hand.
    let stale = m.cpu(0).unwrap().clone();
    let pde = t.slot(&mut m, cr3, VA, 2);
    t.write(&mut m, pde, 0);
    check(&m);
    assert_eq!(m.check_hardware_caches(), []);
    assert!(
        m.domain().shadows().containing(l1.table).is_none(),
        "the leaf shadow was not freed: the test does not test anything"
    );
    *m.cpu_mut(0).unwrap() = stale;
    let found = m.check_hardware_caches();
    assert!(
        found
            .iter()
            .any(|v| v.entry == CachedEntry::Structure(l1) && v.what.contains("no shadow page")),
        "{found:?}"
    );
}

#[test]
fn the_check_reports_an_entry_pointing_at_a_shadow_of_another_level() {
    let (mut m, _, _) = running_4on4();
    let entries = structure_entries(&m);
    let l2_shadow = entries.iter().find(|e| e.level == 3).unwrap().table;
    let info = m.domain().shadows().info(l2_shadow).unwrap();
    assert_eq!(info.key.kind, ShadowKind::L2x64);
    // A PDE-cache entry naming the L2 shadow: the page reused one level up.
    let planted = PscEntry {
        level: 2,
        va: Gva::new(0x8000_0000),
        shift: 21,
        table: l2_shadow,
        perms: Perms::ALL,
    };
    m.cpu_mut(0).unwrap().psc_mut().insert(planted);
    let found = m.check_hardware_caches();
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].what.contains("another level"), "{}", found[0]);
    // The same page as a PDPTE-cache entry's table is fine.
    m.cpu_mut(0).unwrap().flush_tlb_all();
    let fine = PscEntry {
        level: 3,
        shift: 30,
        ..planted
    };
    m.cpu_mut(0).unwrap().psc_mut().insert(fine);
    assert_eq!(m.check_hardware_caches(), []);
}

#[test]
fn the_check_reports_a_translation_of_a_frame_the_domain_lost() {
    let (mut m, _, _) = running_4on4();
    let stale = m.cpu(0).unwrap().clone();
    let old = m.ram_frame(Gfn::new(40)).unwrap();
    let flush = m.domain_mut().set_p2m(Gfn::new(40), None).unwrap();
    m.settle(flush);
    m.domain_mut().host_mut().free_block(old, 0);
    assert_eq!(m.check_hardware_caches(), []);
    *m.cpu_mut(0).unwrap() = stale;
    let found = m.check_hardware_caches();
    assert!(
        found.iter().any(
            |v| matches!(v.entry, CachedEntry::Translation(t) if t.frame == old)
                && v.what.contains("not the domain's RAM")
        ),
        "{found:?}"
    );
}

#[test]
fn the_churn_checker_walks_through_the_caches_on_every_pair() {
    use shadow2::multi::Pair;
    use shadow2_machine::churn::{ChurnConfig, run};
    for pair in Pair::ALL {
        let report = run(ChurnConfig {
            pair,
            ops: 1500,
            seed: 3,
            tiny_pool: false,
        })
        .expect("engine failed");
        assert!(report.cached_walks > 0, "{}: {report:?}", pair.name());
        assert_eq!(report.cache_violations, 0, "{:?}", report.first_problem);
    }
}

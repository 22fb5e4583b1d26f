//! Issue 4, item 5: unshadowing a page that is no longer used as a page table, through
//! instructions the simulated CPU executes from guest memory: the fork/exit heuristic (seed
//! optimisation 3: consecutive zeroing writes into one page table with no other fault in
//! between unshadow it) and the teardown hints (seed optimisation 5: a page table zeroed
//! whole, or recycled as data).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod engine_support;

use engine_support::*;
use shadow2::addr::{Gpa, Gva};
use shadow2::domain::DomainConfig;
use shadow2::emulate::{CodeMode, Regs};
use shadow2::multi::Pair;
use shadow2::paging::{PagingLevels, bits};
use shadow2::remove::TeardownHints;
use shadow2_machine::sim::{GuestError, ShadowMachine};

/// The region whose L1 table is torn down (4 MiB apart from everything else, for 32-bit
/// guests); its table is mapped at PT_VA.
const X: u64 = 0x40_0000;
const PT_VA: u64 = 0x80_0000;
const CODE_VA: u64 = 0xc0_0000;
const CODE_GFN: u64 = 95;
/// An address nothing maps.
const UNMAPPED: u64 = 0x2000_0000;
/// Pages of the region mapped (frames 100..).
const MAPPED: u64 = 16;

/// Where each instruction sits in the code page.
const STORE: u64 = 0x00;
const REP_STOS: u64 = 0x10;
const CMPXCHG8B: u64 = 0x20;
const REP_MOVS: u64 = 0x30;

struct Guest {
    m: ShadowMachine,
    t: Tables,
    levels: PagingLevels,
    /// The guest frame of the region's L1 table.
    l1: u64,
    cr3: u64,
}

fn guest(pair: Pair, config: DomainConfig) -> Guest {
    let levels = pair.guest();
    let mut m = machine(config, 160);
    let mut t = Tables::new(levels, 1, 40);
    let cr3 = t.new_root(0x40);
    for i in 0..MAPPED {
        t.map(&mut m, cr3, X + (i << 12), 100 + i, DATA);
    }
    let l1 = t.table_of(&mut m, cr3, X, 1);
    t.map(&mut m, cr3, PT_VA, l1, DATA & !bits::US);
    t.map(&mut m, cr3, CODE_VA, CODE_GFN, DATA & !bits::US);
    let wide = levels == PagingLevels::Four;
    // mov [rdi], rax / mov [edi], eax
    let store: &[u8] = if wide {
        &[0x48, 0x89, 0x07]
    } else {
        &[0x89, 0x07]
    };
    // rep stosq / rep stosd
    let stos: &[u8] = if wide {
        &[0xf3, 0x48, 0xab]
    } else {
        &[0xf3, 0xab]
    };
    // lock cmpxchg8b [edi]
    let cmpxchg8b: &[u8] = &[0xf0, 0x0f, 0xc7, 0x0f];
    // rep movsq / rep movsd
    let movs: &[u8] = if wide {
        &[0xf3, 0x48, 0xa5]
    } else {
        &[0xf3, 0xa5]
    };
    for (at, code) in [
        (STORE, store),
        (REP_STOS, stos),
        (CMPXCHG8B, cmpxchg8b),
        (REP_MOVS, movs),
    ] {
        m.write_phys(Gpa::new((CODE_GFN << 12) + at), code).unwrap();
    }
    set_mode(&mut m, 0, levels, cr3);
    // Warm: the kernel's code, its window on the table, and the region are mapped.
    let mut buf = [0u8; 4];
    m.fetch(0, Gva::new(CODE_VA), SUP, &mut buf).unwrap();
    read_u64(&mut m, 0, PT_VA).unwrap();
    for i in 0..MAPPED {
        read_u64(&mut m, 0, X + (i << 12)).unwrap();
    }
    assert!(m.domain().shadows().is_page_table(mfn_of(&m, l1)));
    check(&m);
    Guest {
        m,
        t,
        levels,
        l1,
        cr3,
    }
}

impl Guest {
    fn regs(&self, at: u64) -> Regs {
        let mut regs = Regs::new(if self.levels == PagingLevels::Four {
            CodeMode::Bits64
        } else {
            CodeMode::Bits32
        });
        regs.rip = CODE_VA + at;
        regs
    }

    fn esize(&self) -> u64 {
        self.t.entry_bytes()
    }

    /// The kernel stores `value` into entry `i` of the table with one MOV (a 32-bit store
    /// in 32-bit code: the low half of a PAE entry, which holds P).
    fn store(&mut self, i: u64, value: u64) {
        let mut regs = self.regs(STORE);
        regs.gpr[Regs::RDI] = PT_VA + i * self.esize();
        regs.gpr[Regs::RAX] = value;
        self.m.exec(0, &mut regs).unwrap();
        assert_eq!(
            regs.rip,
            CODE_VA
                + STORE
                + if self.levels == PagingLevels::Four {
                    3
                } else {
                    2
                }
        );
        check(&self.m);
    }

    fn is_shadowed(&self) -> bool {
        self.m
            .domain()
            .shadows()
            .is_page_table(mfn_of(&self.m, self.l1))
    }

    fn stats(&self) -> shadow2::stats::Stats {
        *self.m.domain().stats()
    }
}

#[test]
fn fork_exit_heuristic_unshadows_after_n_consecutive_zeroing_writes() {
    for pair in PAGING_PAIRS {
        let mut g = guest(pair, hvm(pair.shadow(), 1, 128));
        let n = u64::from(g.m.domain().config().early_unshadow_writes);
        assert_eq!(n, 4);
        let s0 = g.stats();
        for i in 0..n - 1 {
            g.store(i, 0);
            assert!(
                g.is_shadowed(),
                "{pair:?}: unshadowed after {} writes",
                i + 1
            );
        }
        g.store(n - 1, 0);
        assert!(!g.is_shadowed(), "{pair:?}");
        let s = g.stats();
        assert_eq!(s.early_unshadows, s0.early_unshadows + 1, "{pair:?}");
        assert_eq!(s.emulated_writes, s0.emulated_writes + n, "{pair:?}");
        // The rest of the teardown runs natively: one fill to regain write access, no
        // emulation.
        let traps = g.m.traps();
        for i in n..MAPPED {
            g.store(i, 0);
        }
        assert_eq!(
            g.m.traps().emulated_writes,
            traps.emulated_writes,
            "{pair:?}"
        );
        assert!(g.m.traps().total() <= traps.total() + 1, "{pair:?}");
        // The guest sees its own tables: the region is gone.
        for i in [0, MAPPED - 1] {
            let r = read_u64(&mut g.m, 0, X + (i << 12));
            assert!(
                matches!(r, Err(GuestError::PageFault { .. })),
                "{pair:?}: {r:?}"
            );
        }
        // Used as a page table again, it is shadowed again (its mapping at PT_VA loses
        // write access on the way).
        let pte = (120 << 12) | DATA;
        let slot = (g.l1 << 12) + 2 * g.esize();
        g.t.write(&mut g.m, slot, pte);
        write_u64(&mut g.m, 0, X + 0x2000, 0x12).unwrap();
        assert!(g.is_shadowed(), "{pair:?}");
        assert_eq!(phys_u64(&g.m, 120 << 12), 0x12);
        check(&g.m);
    }
}

#[test]
fn another_fault_in_between_ends_the_run() {
    for pair in PAGING_PAIRS {
        let mut g = guest(pair, hvm(pair.shadow(), 1, 128));
        let s0 = g.stats();
        for i in 0..3 {
            g.store(i, 0);
        }
        // A fault the guest sees (an unmapped address): the run is over.
        let r = read_u64(&mut g.m, 0, UNMAPPED);
        assert!(
            matches!(r, Err(GuestError::PageFault { .. })),
            "{pair:?}: {r:?}"
        );
        for i in 3..6 {
            g.store(i, 0);
        }
        assert!(g.is_shadowed(), "{pair:?}");
        g.store(6, 0);
        assert!(!g.is_shadowed(), "{pair:?}");
        assert_eq!(g.stats().early_unshadows, s0.early_unshadows + 1);
        check(&g.m);
    }
}

#[test]
fn a_write_that_maps_something_ends_the_run() {
    for pair in PAGING_PAIRS {
        let mut g = guest(pair, hvm(pair.shadow(), 1, 128));
        for i in 0..3 {
            g.store(i, 0);
        }
        g.store(3, (121 << 12) | DATA);
        for i in 4..7 {
            g.store(i, 0);
        }
        assert!(g.is_shadowed(), "{pair:?}");
        assert_eq!(g.stats().early_unshadows, 0);
        // The PTE written in between took effect through the shadow.
        write_u64(&mut g.m, 0, X + 0x3000, 0x21).unwrap();
        assert_eq!(phys_u64(&g.m, 121 << 12), 0x21);
        g.store(7, 0);
        assert!(!g.is_shadowed(), "{pair:?}");
        check(&g.m);
    }
}

#[test]
fn the_heuristic_is_a_domain_option() {
    for pair in PAGING_PAIRS {
        let config = DomainConfig {
            early_unshadow_writes: 0,
            ..hvm(pair.shadow(), 1, 128)
        };
        let mut g = guest(pair, config);
        for i in 0..MAPPED {
            g.store(i, 0);
        }
        assert!(g.is_shadowed(), "{pair:?}");
        assert_eq!(g.stats().early_unshadows, 0);
        let config = DomainConfig {
            early_unshadow_writes: 2,
            ..hvm(pair.shadow(), 1, 128)
        };
        let mut g = guest(pair, config);
        g.store(0, 0);
        g.store(1, 0);
        assert!(!g.is_shadowed(), "{pair:?}");
        check(&g.m);
    }
}

#[test]
fn the_top_level_table_a_vcpu_runs_on_is_never_unshadowed_early() {
    let mut g = guest(Pair::P4on4, hvm(PagingLevels::Four, 1, 128));
    let top = g.cr3 >> 12;
    let top_va = 0x90_0000;
    g.t.map(&mut g.m, g.cr3, top_va, top, DATA & !bits::US);
    let s0 = g.stats();
    for i in 0..8u64 {
        let mut regs = g.regs(STORE);
        regs.gpr[Regs::RDI] = top_va + (200 + i) * 8;
        regs.gpr[Regs::RAX] = 0;
        g.m.exec(0, &mut regs).unwrap();
        check(&g.m);
    }
    assert_eq!(g.stats().early_unshadows, s0.early_unshadows);
    assert_eq!(g.stats().emulated_writes, s0.emulated_writes + 8);
    assert!(g.m.domain().shadows().is_page_table(mfn_of(&g.m, top)));
}

/// The kernel zeroes the whole table with one REP STOS.
fn zero_whole_table(g: &mut Guest) {
    let mut regs = g.regs(REP_STOS);
    regs.gpr[Regs::RDI] = PT_VA;
    regs.gpr[Regs::RAX] = 0;
    regs.gpr[Regs::RCX] = if g.levels == PagingLevels::Four {
        512
    } else {
        1024
    };
    g.m.exec(0, &mut regs).unwrap();
    assert_eq!(regs.gpr[Regs::RCX], 0);
    assert_eq!(g.t.read(&g.m, (g.l1 << 12) + 4096 - g.esize()), 0);
    check(&g.m);
}

#[test]
fn teardown_hint_a_page_table_zeroed_whole_is_unshadowed() {
    for pair in PAGING_PAIRS {
        let config = DomainConfig {
            teardown: TeardownHints {
                zeroed_page: true,
                data_reuse: false,
            },
            ..hvm(pair.shadow(), 1, 128)
        };
        let mut g = guest(pair, config);
        let s0 = g.stats();
        zero_whole_table(&mut g);
        assert!(!g.is_shadowed(), "{pair:?}");
        let s = g.stats();
        // Unshadowed before the write (issue 12): no entry of it was validated, and the
        // hint after the write found nothing left to do.
        assert_eq!(
            s.overwrite_unshadows,
            s0.overwrite_unshadows + 1,
            "{pair:?}"
        );
        assert_eq!(s.validated_entries, s0.validated_entries, "{pair:?}");
        assert_eq!(s.teardown_zeroed, s0.teardown_zeroed, "{pair:?}");
        assert_eq!(s.emulated_writes, s0.emulated_writes + 1, "{pair:?}");
        // Reused as data: written natively.
        let traps = g.m.traps();
        write_u64(&mut g.m, 0, PT_VA + 0x100, 0).unwrap();
        assert_eq!(g.m.traps().emulated_writes, traps.emulated_writes);
        // The directory still points at it: a walk through it shadows it again, empty.
        let r = read_u64(&mut g.m, 0, X);
        assert!(
            matches!(r, Err(GuestError::PageFault { .. })),
            "{pair:?}: {r:?}"
        );
        check(&g.m);

        // Without the hint the zeroed table stays shadowed (and correct).
        let mut g = guest(pair, hvm(pair.shadow(), 1, 128));
        zero_whole_table(&mut g);
        assert!(g.is_shadowed(), "{pair:?}");
        assert_eq!(g.stats().teardown_zeroed, 0);
        assert_eq!(g.stats().overwrite_unshadows, 0);
        let r = read_u64(&mut g.m, 0, X + 0x5000);
        assert!(
            matches!(r, Err(GuestError::PageFault { .. })),
            "{pair:?}: {r:?}"
        );
        check(&g.m);
    }
}

/// Issue 12: a page copied whole over a shadowed page table (one REP MOVS chunk) unshadows
/// the table before the write, validates none of its entries, and the guest's next walk
/// through it sees exactly the entries copied in (the oracle checks every access).
#[test]
fn a_page_table_overwritten_whole_by_a_copy_is_unshadowed_before_the_write() {
    for pair in PAGING_PAIRS {
        let config = DomainConfig {
            teardown: TeardownHints::ALL,
            ..hvm(pair.shadow(), 1, 128)
        };
        let mut g = guest(pair, config);
        // The source: data page 0 of the region (frame 100), holding a table whose
        // entries map frames 120.. (present, A and D set), the rest zero.
        let esize = g.esize();
        let mut page = vec![0u8; 4096];
        for i in 0..8u64 {
            let e = ((120 + i) << 12) | DATA;
            let at = (i * esize) as usize;
            page[at..at + esize as usize].copy_from_slice(&e.to_le_bytes()[..esize as usize]);
        }
        g.m.write_phys(Gpa::new(100 << 12), &page).unwrap();
        check(&g.m);
        let s0 = g.stats();
        let mut regs = g.regs(REP_MOVS);
        regs.gpr[Regs::RSI] = X;
        regs.gpr[Regs::RDI] = PT_VA;
        // One page of 8-byte (64-bit code) or 4-byte (32-bit code) elements.
        regs.gpr[Regs::RCX] = if g.levels == PagingLevels::Four {
            512
        } else {
            1024
        };
        g.m.exec(0, &mut regs).unwrap();
        assert_eq!(regs.gpr[Regs::RCX], 0, "{pair:?}");
        check(&g.m);
        let s = g.stats();
        assert_eq!(
            s.overwrite_unshadows,
            s0.overwrite_unshadows + 1,
            "{pair:?}"
        );
        assert_eq!(s.validated_entries, s0.validated_entries, "{pair:?}");
        assert!(!g.is_shadowed(), "{pair:?}");
        // The region now maps what was copied in: page 1 is frame 121, page 9 nothing
        // (once the guest has flushed its TLB).
        g.m.flush_all_tlbs();
        g.m.write_phys(Gpa::new(121 << 12), &0x5eed_u64.to_le_bytes())
            .unwrap();
        assert_eq!(
            read_u64(&mut g.m, 0, X + 0x1000).unwrap(),
            0x5eed,
            "{pair:?}"
        );
        assert!(g.is_shadowed(), "{pair:?}: shadowed again by its next use");
        let r = read_u64(&mut g.m, 0, X + 0x9000);
        assert!(
            matches!(r, Err(GuestError::PageFault { .. })),
            "{pair:?}: {r:?}"
        );
        check(&g.m);
    }
}

#[test]
fn teardown_hint_a_page_table_reused_as_data_is_unshadowed() {
    // Present, with bit 50 set: reserved below MAXPHYADDR 52 in PAE and 4-level entries.
    let data = (1u64 << 50) | (0x1234 << 12) | bits::P | bits::RW;
    for pair in [Pair::P3on3, Pair::P3on4, Pair::P4on4] {
        let config = DomainConfig {
            teardown: TeardownHints::ALL,
            ..hvm(pair.shadow(), 1, 128)
        };
        let mut g = guest(pair, config);
        // An ordinary PTE write keeps the table.
        g.store(0, (122 << 12) | DATA);
        assert!(g.is_shadowed(), "{pair:?}");
        let s0 = g.stats();
        if pair.guest() == PagingLevels::Four {
            g.store(1, data);
        } else {
            // A 32-bit kernel writes 8 bytes with LOCK CMPXCHG8B.
            let old = g.t.read(&g.m, (g.l1 << 12) + 8);
            let mut regs = g.regs(CMPXCHG8B);
            regs.gpr[Regs::RDI] = PT_VA + 8;
            regs.gpr[Regs::RAX] = old & 0xffff_ffff;
            regs.gpr[Regs::RDX] = old >> 32;
            regs.gpr[Regs::RBX] = data & 0xffff_ffff;
            regs.gpr[Regs::RCX] = data >> 32;
            g.m.exec(0, &mut regs).unwrap();
            check(&g.m);
        }
        assert_eq!(g.t.read(&g.m, (g.l1 << 12) + 8), data, "{pair:?}");
        assert!(!g.is_shadowed(), "{pair:?}");
        let s = g.stats();
        assert_eq!(s.teardown_data, s0.teardown_data + 1, "{pair:?}");
        assert_eq!(s.early_unshadows, s0.early_unshadows);
        // The guest's walk of that entry faults on the reserved bit, as on hardware.
        let r = read_u64(&mut g.m, 0, X + 0x1000);
        assert!(
            matches!(r, Err(GuestError::PageFault { code, .. }) if code.reserved()),
            "{pair:?}: {r:?}"
        );
        check(&g.m);
    }
}

#[test]
fn teardown_hints_are_off_by_default_and_unshadowing_is_always_safe() {
    let data = (1u64 << 50) | (0x1234 << 12) | bits::P | bits::RW;
    let mut g = guest(Pair::P4on4, hvm(PagingLevels::Four, 1, 128));
    assert_eq!(g.m.domain().config().teardown, TeardownHints::NONE);
    g.store(1, data);
    assert!(g.is_shadowed());
    assert_eq!(g.stats().teardown_data, 0);
    let r = read_u64(&mut g.m, 0, X + 0x1000);
    assert!(
        matches!(r, Err(GuestError::PageFault { code, .. }) if code.reserved()),
        "{r:?}"
    );
    // The other entries still work either way.
    write_u64(&mut g.m, 0, X + 0x4000, 0x44).unwrap();
    assert_eq!(phys_u64(&g.m, 104 << 12), 0x44);
    check(&g.m);
}

//! Type confusion: one guest page used at two levels of the paging hierarchy, or as data and
//! as a table at once; reference counts of shadows that many entries point at.

use shadow2::domain::{ShadowOp, ShadowOpResult};
use shadow2::paging::{PagingLevels, bits};

use crate::engine_support::{DATA, PAGING_PAIRS, TABLE};
use crate::harness::{DATA_GFN, KDATA, Xsa};

const VA_A: u64 = 0x40_0000;
/// Where the table that is also an L1 is used as an L2 (L3 index 1 in PAE and 64-bit).
const VA_B: u64 = 0x4000_0000;
/// A kernel window onto a page table.
const PT_VA: u64 = 0x80_0000;

/// Builds the two-level confusion: frame `f` is the L1 of `VA_A` and, in the space of
/// vcpu 1 (32-bit guests: `f` is its whole L2) or at `VA_B` of the same space, an L2 whose
/// entry 0 names data frame `d`, which therefore is an L1 too. Returns (xsa, f, d, the VA
/// at which `d` is walked as an L1 by vcpu `walker`, walker).
fn two_levels(pair: shadow2::multi::Pair) -> (Xsa, u64, u64, u64, usize) {
    let mut x = Xsa::new(pair, 2, 128);
    let cr3 = x.space();
    let f = x.t.table_of(&mut x.m, cr3, VA_A, 1);
    let d = DATA_GFN;
    // As an L1, entry 0 maps VA_A to `d`; as an L2, it names `d` as an L1.
    x.t.write(&mut x.m, f << 12, (d << 12) | DATA);
    // As an L1, `d` maps its entry 1 to the next data frame.
    let eb = x.t.entry_bytes();
    x.t.write(&mut x.m, (d << 12) + eb, ((d + 1) << 12) | DATA);
    let (other, walker, b_base) = if pair.guest() == PagingLevels::Two {
        (f << 12, 1, 0)
    } else {
        let l3 = x.slot(cr3, VA_B, 3);
        let flags = if pair.guest() == PagingLevels::Three {
            bits::P
        } else {
            TABLE
        };
        x.t.write(&mut x.m, l3, (f << 12) | flags);
        (cr3, 0, VA_B)
    };
    x.run(0, cr3);
    x.run(1, other);
    (x, f, d, b_base, walker)
}

/// XSA-248 family (2017): a PV guest could gain a mapping of a page the hypervisor used
/// internally, through a mapping path whose checks on the target page were incomplete. Replayed: one page is an
/// L1 of one address and an L2 of another, so the data page its entry 0 names is both data
/// (mapped writable at `VA_A`) and an L1 table. Must hold: once the data page is walked as
/// a table, no shadow or TLB entry lets the guest write it directly (writes are emulated
/// and validated), and the views stay consistent with the guest's walk.
#[test]
fn xsa_248_page_used_as_data_and_as_a_table_at_two_levels() {
    for pair in PAGING_PAIRS {
        let (mut x, _f, d, b_base, walker) = two_levels(pair);
        // The data page, writable through VA_A, before anyone walks it as a table.
        x.write(0, VA_A + 0xc00, 0).unwrap();
        // Walking `d` as an L1 makes it a page table: write access must go.
        let via_b = b_base | (1 << 12);
        assert_eq!(x.read(walker, via_b).unwrap(), 0, "{pair:?}");
        // A data write to `d` now is a page-table write: emulated, then visible as a PTE.
        let pte = ((DATA_GFN + 2) << 12) | DATA;
        let at = VA_A + x.t.entry_bytes();
        x.store(0, at, pte).unwrap();
        let traps = x.m.traps();
        assert!(traps.emulated_writes >= 1, "{pair:?}: {traps:?}");
        x.write(0, VA_A + 0x800, 0x1234).unwrap();
        x.m.write_phys(shadow2::addr::Gpa::new((DATA_GFN + 2) << 12), &[7])
            .unwrap();
        x.step("data written behind the table");
        assert_eq!(x.read(walker, via_b).unwrap() & 0xff, 7, "{pair:?}");
        assert!(x.domain().shadows().is_page_table(x.mfn(d)), "{pair:?}");
    }
}

/// XSA-219 (2017): shadow emulation of a guest page-table write held too few references,
/// so the page written could be freed and reused while the emulator still wrote it.
/// Replayed: a kernel writes PTEs with real store instructions through a window onto its
/// own L1, including one mapping that L1 itself, then tears the window and the L1 down.
/// Must hold after every instruction: the L1's shadow is never mapped writable, every
/// shadow entry points at a live shadow, and freed tables leave no stale mapping.
#[test]
fn xsa_219_emulated_pte_writes_into_an_l1_mapping_itself() {
    for pair in PAGING_PAIRS {
        let mut x = Xsa::new(pair, 1, 128);
        let cr3 = x.space();
        let l1 = x.t.table_of(&mut x.m, cr3, VA_A, 1);
        x.map(cr3, PT_VA, l1, KDATA);
        x.run(0, cr3);
        let eb = x.t.entry_bytes();
        let slot = |x: &Xsa, va: u64| PT_VA + x.l1_index(va) * eb;
        for i in 0..4 {
            let va = VA_A + i * 0x1000;
            let at = slot(&x, va);
            x.store(0, at, ((DATA_GFN + i) << 12) | DATA).unwrap();
            x.write(0, va, i).unwrap();
        }
        // The L1 maps itself writable at VA_A + 5 pages: the shadow must keep it read-only.
        let self_va = VA_A + 5 * 0x1000;
        let at = slot(&x, self_va);
        x.store(0, at, (l1 << 12) | DATA).unwrap();
        let own = x.read(0, self_va).unwrap();
        let frame_bits = if pair.guest() == PagingLevels::Two {
            bits::ADDR_MASK_4
        } else {
            bits::ADDR_MASK_8
        };
        assert_eq!(own & frame_bits, DATA_GFN << 12, "{pair:?}");
        // A PTE written through the self-mapping is emulated too.
        let through_self = self_va + x.l1_index(VA_A + 6 * 0x1000) * eb;
        x.store(0, through_self, ((DATA_GFN + 6) << 12) | DATA)
            .unwrap();
        assert_eq!(x.read(0, VA_A + 6 * 0x1000).unwrap(), 0, "{pair:?}");
        // Teardown: every entry cleared by the kernel's store, then the L1 unlinked.
        for i in 0..7 {
            let at = slot(&x, VA_A + i * 0x1000);
            x.store(0, at, 0).unwrap();
        }
        let l2_slot = x.slot(cr3, VA_A, 2);
        x.t.write(&mut x.m, l2_slot, 0);
        x.step("the L1 unlinked");
        x.m.flush_all_tlbs();
        assert!(x.read(0, VA_A).is_err(), "{pair:?}");
        x.step("read after teardown");
    }
}

/// XSA-249 (2017): the shadow code's reference-count overflow check was wrong, so many
/// references to one shadow could wrap its count. Replayed: many L2 entries (and several
/// address spaces) name the same L1, the kernel then clears them one by one. Must hold:
/// the auditor's exact counts, and the shared L1 shadow stays live while any entry names it
/// and is gone (no stale entry, no reuse under a live reference) afterwards.
#[test]
fn xsa_249_many_references_to_one_shadow() {
    for pair in PAGING_PAIRS {
        let mut x = Xsa::new(pair, 1, 256);
        let cr3 = x.space();
        let l1 = x.t.table_of(&mut x.m, cr3, VA_A, 1);
        x.map(cr3, VA_A, DATA_GFN, DATA);
        let l2 = x.t.table_of(&mut x.m, cr3, VA_A, 2);
        // A window onto the L2, in a different L2 region.
        x.map(cr3, PT_VA + 0x20_0000, l2, KDATA);
        x.run(0, cr3);
        let eb = x.t.entry_bytes();
        let span = if pair.guest() == PagingLevels::Two {
            1 << 22
        } else {
            1 << 21
        };
        let first = (VA_A / span) + 8;
        let mut vas = Vec::new();
        for k in 0..24 {
            let idx = first + k;
            let at = PT_VA + 0x20_0000 + idx * eb;
            x.store(0, at, (l1 << 12) | TABLE).unwrap();
            let va = idx * span + (VA_A & (span - 1));
            assert_eq!(x.read(0, va).unwrap(), 0, "{pair:?}");
            vas.push((at, va));
        }
        for (at, va) in vas {
            x.store(0, at, 0).unwrap();
            x.m.invlpg(0, shadow2::addr::Gva::new(va)).unwrap();
            assert!(x.read(0, va).is_err(), "{pair:?}");
        }
        assert_eq!(x.read(0, VA_A).unwrap(), 0, "{pair:?}");
    }
}

/// XSA-250 (2017): shadow mode mishandled the error when a reference could not be taken,
/// leaving a mapping without its reference. Replayed: the same fan-in as XSA-249 but with
/// distinct L1s on the smallest pool, so fills evict and blow tables half-way through the
/// sequence. Must hold: every fault either completes with exact references or leaves
/// nothing behind; the domain never fails.
#[test]
fn xsa_250_reference_taking_under_pool_pressure() {
    for pair in PAGING_PAIRS {
        let config = crate::engine_support::hvm(pair.shadow(), 1, 0);
        let mut x = Xsa::new(pair, 1, config.min_pool_pages());
        let cr3 = x.space();
        x.run(0, cr3);
        for k in 0..40u64 {
            let va = 0x100_0000 + k * 0x40_0000;
            x.map(cr3, va, DATA_GFN + (k % 90), DATA);
            x.step("mapped");
            assert!(x.read(0, va).is_ok(), "{pair:?} {k}");
        }
        for k in 0..40u64 {
            let va = 0x100_0000 + k * 0x40_0000;
            assert!(x.read(0, va).is_ok(), "{pair:?} {k}");
        }
    }
}

/// XSA-251 (2018): a check in log-dirty handling could be triggered by the guest and brought
/// the host down. Replayed: log-dirty mode is enabled and cleaned in small steps while a
/// page is both data and an L1 (the XSA-248 set-up) and is written through both views.
/// Must hold: the domain keeps running, every write marks the page dirty, and nothing is
/// writable that the clean re-protected.
#[test]
fn xsa_251_log_dirty_over_a_page_at_two_levels() {
    for pair in PAGING_PAIRS {
        let (mut x, _f, d, b_base, walker) = two_levels(pair);
        x.write(0, VA_A + 0xc00, 0).unwrap();
        x.host("enable log-dirty", |dm| {
            dm.enable_log_dirty().map(|f| ((), f))
        })
        .unwrap();
        let via_b = b_base | (1 << 12);
        let _ = x.read(walker, via_b);
        x.write(0, VA_A + 0x10, 0x77).unwrap();
        let mut rounds = 0;
        let bitmap = loop {
            let r = x
                .host("clean step", |dm| {
                    dm.shadow_op(ShadowOp::Clean { budget: 2 })
                })
                .unwrap();
            rounds += 1;
            assert!(rounds < 10_000, "{pair:?}: the clean never ends");
            if let ShadowOpResult::Bitmap(b) = r {
                break b;
            }
            x.write(0, VA_A + 0x18, rounds).unwrap();
        };
        assert!(
            bitmap.contains(shadow2::addr::Gfn::new(d)),
            "{pair:?}: the page written is dirty"
        );
        x.write(0, VA_A + 0x20, 1).unwrap();
        let peek = x.host("peek", |dm| dm.shadow_op(ShadowOp::Peek)).unwrap();
        match peek {
            ShadowOpResult::Bitmap(b) => {
                assert!(b.contains(shadow2::addr::Gfn::new(d)), "{pair:?}")
            }
            other => panic!("{pair:?}: {other:?}"),
        }
    }
}

//! Self maps and linear page tables: a guest top-level table naming itself, tables naming
//! each other in a loop, and the Windows-style PAE self-map.

use shadow2::addr::Gva;
use shadow2::multi::Pair;
use shadow2::paging::{PagingLevels, bits};

use crate::engine_support::{DATA, PAGING_PAIRS, TABLE};
use crate::harness::{DATA_GFN, PAE_PAIRS, Xsa};

const X: u64 = 0x40_3000;
/// An address whose L1 maps nothing else the scenario needs (not the kernel's code).
const X2: u64 = 0x100_3000;

/// Where a self-mapped guest sees its page tables: (the linear PTE of `va`, the linear
/// address of the self entry itself).
fn linear(levels: PagingLevels, va: u64) -> (u64, u64) {
    match levels {
        // L4[256]: the PTEs at 0xffff_8000_0000_0000, the L4 itself at 256/256/256/256.
        PagingLevels::Four => {
            let base = 0xffff_8000_0000_0000u64;
            let pte = base + ((va & 0x0000_ffff_ffff_f000) >> 12) * 8;
            let l4 = base | (256 << 30) | (256 << 21) | (256 << 12);
            (pte, l4 + 256 * 8)
        }
        // L2[1023]: the PTEs at 0xffc0_0000, the L2 at 0xffff_f000.
        PagingLevels::Two => (0xffc0_0000 + (va >> 12) * 4, 0xffff_f000 + 1023 * 4),
        // PDEs 0..3 of the L2 of 0xc000_0000 name the four L2s: the PTEs at 0xc000_0000,
        // the PDEs at 0xc060_0000.
        _ => (
            0xc000_0000 + (va >> 12) * 8,
            0xc060_0000 + (0xc000_0000u64 >> 21) * 8,
        ),
    }
}

/// Installs the self map in `cr3` (with the loader's writes).
fn self_map(x: &mut Xsa, cr3: u64) {
    match x.levels() {
        PagingLevels::Four => {
            let top = cr3 & !0xfff;
            x.t.write(&mut x.m, top + 256 * 8, top | TABLE);
        }
        PagingLevels::Two => {
            let top = cr3 & !0xfff;
            x.t.write(&mut x.m, top + 1023 * 4, top | TABLE);
        }
        _ => {
            let l2s: Vec<u64> = (0..4u64)
                .map(|i| x.t.table_of(&mut x.m, cr3, i << 30, 2))
                .collect();
            let l2_3 = l2s[3] << 12;
            for (i, l2) in l2s.iter().enumerate() {
                x.t.write(&mut x.m, l2_3 + 8 * i as u64, (l2 << 12) | TABLE);
            }
        }
    }
}

/// XSA-243 (2017): shadow mode mishandled self-linear mappings (a top-level table naming
/// itself) of translated guests, letting a guest reach memory it should not. Replayed on
/// every pair: the guest self-maps its top level, reads its PTEs through the self map,
/// writes a PTE and then the self entry itself through it with store instructions, and
/// reloads CR3. Must hold: the self-mapped tables are never writable in any shadow or TLB,
/// every write through the map is emulated and validated, and after the self entry is gone
/// the linear addresses fault.
#[test]
fn xsa_243_self_linear_map_written_through_itself() {
    for pair in PAGING_PAIRS {
        let mut x = Xsa::new(pair, 1, 128);
        let cr3 = x.space();
        x.map(cr3, X, DATA_GFN, DATA);
        self_map(&mut x, cr3);
        x.run(0, cr3);
        let levels = x.levels();
        let (pte_va, self_va) = linear(levels, X);
        let frame_bits = if levels == PagingLevels::Two {
            bits::ADDR_MASK_4
        } else {
            bits::ADDR_MASK_8
        };
        let pte = x.read(0, pte_va).unwrap();
        assert_eq!(pte & frame_bits, DATA_GFN << 12, "{pair:?}");
        x.store(0, pte_va, ((DATA_GFN + 1) << 12) | DATA).unwrap();
        x.m.write_phys(shadow2::addr::Gpa::new((DATA_GFN + 1) << 12), &[9])
            .unwrap();
        x.m.invlpg(0, Gva::new(X)).unwrap();
        assert_eq!(x.read(0, X).unwrap() & 0xff, 9, "{pair:?}");
        // The guest removes its self map through the self map.
        x.store(0, self_va, 0).unwrap();
        x.cr3(0, cr3).unwrap();
        assert!(x.read(0, pte_va).is_err(), "{pair:?}");
        assert_eq!(x.read(0, X).unwrap() & 0xff, 9, "{pair:?}");
    }
}

/// XSA-240 (2017): removing the type of a page used in linear page tables recursed without
/// bound when tables named each other in a chain. Replayed (64-bit and 32-bit guests, whose
/// top level can name a peer): two tables of the same level name each other, the guest walks
/// the loop at depth and then breaks it. Must hold: every shadow names a live shadow of the
/// right level, no loop table is ever writable, and breaking the loop tears it down with
/// bounded work.
#[test]
fn xsa_240_tables_naming_each_other_in_a_loop() {
    for pair in [Pair::P4on4, Pair::P2on2, Pair::P2on3, Pair::P2on4] {
        let mut x = Xsa::new(pair, 2, 128);
        let a = x.space();
        let b = x.space();
        let top_a = a & !0xfff;
        let top_b = b & !0xfff;
        let (slot, va) = if pair.guest() == PagingLevels::Four {
            // A[1] -> B, B[1] -> A: VA 1/1/1/x walks A, B, A, B(as L1).
            (8, (1u64 << 39) | (1 << 30) | (1 << 21))
        } else {
            // A[2] -> B (an L1 of A), and B[2] -> A (an L1 of B).
            (8, 2u64 << 22)
        };
        x.t.write(&mut x.m, top_a + slot, top_b | TABLE);
        x.t.write(&mut x.m, top_b + slot, top_a | TABLE);
        x.run(0, a);
        x.run(1, b);
        for page in 0..4u64 {
            let _ = x.read(0, va + page * 0x1000);
            let _ = x.read(1, va + page * 0x1000);
        }
        // Writes through the loop are page-table writes (the tables are shadowed).
        let _ = x.write(0, va + 0x1000 + 0x10, 0);
        x.t.write(&mut x.m, top_a + slot, 0);
        x.step("loop broken in A");
        x.cr3(0, a).unwrap();
        x.cr3(1, b).unwrap();
        for page in 0..4u64 {
            assert!(x.read(0, va + page * 0x1000).is_err(), "{pair:?}");
            let _ = x.read(1, va + page * 0x1000);
        }
    }
}

/// XSA-280 (2018): the fix for XSA-240 conflicted with shadow paging's use of page-table
/// metadata, so a page's shadow bookkeeping could be corrupted when the same page served as
/// a linear page table and a normal one. Replayed: an L1 that is also reached through the
/// self map (as a linear page table) is unlinked from its normal place, recycled as data
/// by the guest, and linked again, with both views in use. Must hold: the shadows of the
/// page appear and go with its uses, never writable while it is a table.
#[test]
fn xsa_280_page_table_also_reached_through_the_self_map_is_recycled() {
    for pair in PAGING_PAIRS {
        let mut x = Xsa::new(pair, 1, 128);
        let cr3 = x.space();
        x.map(cr3, X2, DATA_GFN, DATA);
        let l1 = x.t.table_of(&mut x.m, cr3, X2, 1);
        let l2_slot = x.slot(cr3, X2, 2);
        self_map(&mut x, cr3);
        x.run(0, cr3);
        let (pte_va, _) = linear(x.levels(), X2);
        x.read(0, X2).unwrap();
        x.read(0, pte_va).unwrap();
        // Unlink the L1 and reuse it as a data page mapped writable elsewhere.
        x.t.write(&mut x.m, l2_slot, 0);
        x.cr3(0, cr3).unwrap();
        let reuse = 0x200_0000;
        x.map(cr3, reuse, l1, DATA);
        x.cr3(0, cr3).unwrap();
        x.write(0, reuse, 0).unwrap();
        x.write(0, reuse + 8, 0).unwrap();
        // Link it again as the L1 of X2, now empty but for one new PTE written as data.
        let eb = x.t.entry_bytes();
        let idx = x.l1_index(X2);
        x.store(0, reuse + idx * eb, ((DATA_GFN + 2) << 12) | DATA)
            .unwrap();
        x.t.write(&mut x.m, l2_slot, (l1 << 12) | TABLE);
        x.cr3(0, cr3).unwrap();
        x.read(0, X2).unwrap();
        x.read(0, pte_va).unwrap();
        // Now a table: data writes through `reuse` are emulated.
        x.store(0, reuse + idx * eb, ((DATA_GFN + 3) << 12) | DATA)
            .unwrap();
        x.m.invlpg(0, Gva::new(X2)).unwrap();
        x.m.write_phys(shadow2::addr::Gpa::new((DATA_GFN + 3) << 12), &[3])
            .unwrap();
        assert_eq!(x.read(0, X2).unwrap() & 0xff, 3, "{pair:?}");
    }
}

/// XSA-408 (2022): shadow mode did not flush the TLB enough when a guest changed its
/// tables, so other vcpus kept using translations that were no longer allowed. Replayed on
/// PAE guests with the Windows-style self map and two vcpus on one address space: vcpu 1
/// holds a writable translation of a data page; vcpu 0, through the self map's PDE window,
/// links that page in as an L1 and walks it. Must hold: the moment the page is a shadowed
/// table, no vcpu's TLB may still write it.
#[test]
fn xsa_408_tlb_flush_when_a_page_becomes_a_table_through_the_self_map() {
    for pair in PAE_PAIRS {
        let mut x = Xsa::new(pair, 2, 128);
        let cr3 = x.space();
        let data = DATA_GFN + 5;
        x.map(cr3, X, data, DATA);
        self_map(&mut x, cr3);
        x.run(0, cr3);
        x.run(1, cr3);
        // vcpu 1 writes the page: a writable translation in its TLB.
        x.write(1, X, ((DATA_GFN + 7) << 12) | DATA).unwrap();
        // vcpu 0 makes the page the L1 of 0x3000_0000 through the PDE window.
        let region = 0x3000_0000u64;
        let pde_va = 0xc060_0000 + (region >> 21) * 8;
        x.store(0, pde_va, (data << 12) | TABLE).unwrap();
        assert_eq!(x.read(0, region).unwrap(), 0, "{pair:?}");
        assert!(
            x.domain().shadows().is_page_table(x.mfn(data)),
            "{pair:?}: the page is shadowed now"
        );
        // vcpu 1's write is now a page-table write.
        let before = x.m.traps().emulated_writes;
        x.store(1, X + 8, ((DATA_GFN + 6) << 12) | DATA).unwrap();
        assert!(x.m.traps().emulated_writes > before, "{pair:?}");
    }
}

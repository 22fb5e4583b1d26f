//! The simulated machine end to end: the frame allocator, sparse memory at high addresses,
//! the guest-physical view, and the CPU translating through tables built in machine memory
//! in 2-level, PAE and 4-level modes, with a TLB whose staleness is visible.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

use proptest::prelude::*;

use shadow2::addr::{Gfn, Gpa, Gva, Maddr, Mfn};
use shadow2::host::MachineMemory;
use shadow2::paging::bits::{self, cr};
use shadow2::paging::{
    Access, AccessKind, AdUpdate, ControlState, CpuFeatures, MemError, PageSize, PagingLevels,
    PfErrorCode, PhysMem, Privilege, WalkEnv, walk,
};
use shadow2_machine::{Cpu, CpuFault, GuestPhysView, ReserveError, SparseMemory, Tlb};

const PWU: u64 = bits::P | bits::RW | bits::US;
const SUP: Privilege = Privilege::Supervisor;
const USR: Privilege = Privilege::User;

fn acc(kind: AccessKind, privilege: Privilege) -> Access {
    Access::new(kind, privilege)
}

fn ma(raw: u64) -> Maddr {
    Maddr::new(raw)
}

fn frame(mem: &mut SparseMemory) -> u64 {
    mem.alloc_block(0).expect("a free frame").base().raw()
}

// ---------------------------------------------------------------------------------------
// Table builders: each maps one page, allocating intermediate tables on demand.

/// The next-level table under the 8-byte entry at `slot`, created if absent.
fn table_under(mem: &mut SparseMemory, slot: u64, flags: u64) -> u64 {
    let entry = mem.read_u64(ma(slot)).unwrap();
    if entry & bits::P != 0 {
        return entry & bits::ADDR_MASK_8;
    }
    let table = frame(mem);
    mem.write_u64(ma(slot), table | flags).unwrap();
    table
}

/// 4-level: maps `va` to `pa` with a leaf at `leaf_level` (1, 2 or 3).
fn map_4level(mem: &mut SparseMemory, root: u64, va: u64, pa: u64, leaf_level: u8, leaf: u64) {
    let mut table = root;
    for level in (leaf_level + 1..=4).rev() {
        let index = (va >> (12 + 9 * u32::from(level - 1))) & 0x1ff;
        table = table_under(mem, table + 8 * index, PWU);
    }
    let index = (va >> (12 + 9 * u32::from(leaf_level - 1))) & 0x1ff;
    let ps = if leaf_level > 1 { bits::PS } else { 0 };
    mem.write_u64(ma(table + 8 * index), pa | leaf | ps)
        .unwrap();
}

/// PAE: maps `va` with a 4 KiB leaf (or a 2 MiB one when `big`).
fn map_pae(mem: &mut SparseMemory, pdpt: u64, va: u64, pa: u64, big: bool, leaf: u64) {
    let va = va & 0xffff_ffff;
    let pd = table_under(mem, pdpt + 8 * (va >> 30), bits::P);
    let pde_slot = pd + 8 * ((va >> 21) & 0x1ff);
    if big {
        mem.write_u64(ma(pde_slot), pa | leaf | bits::PS).unwrap();
        return;
    }
    let pt = table_under(mem, pde_slot, PWU);
    mem.write_u64(ma(pt + 8 * ((va >> 12) & 0x1ff)), pa | leaf)
        .unwrap();
}

/// 32-bit: maps `va` with a 4 KiB leaf (or a 4 MiB one when `big`).
fn map_2level(mem: &mut SparseMemory, pd: u64, va: u64, pa: u64, big: bool, leaf: u32) {
    let pde_slot = pd + 4 * ((va >> 22) & 0x3ff);
    if big {
        mem.write_u32(ma(pde_slot), pa as u32 | leaf | bits::PS as u32)
            .unwrap();
        return;
    }
    let pde = mem.read_u32(ma(pde_slot)).unwrap();
    let pt = if pde & 1 != 0 {
        u64::from(pde) & bits::ADDR_MASK_4
    } else {
        let pt = frame(mem);
        mem.write_u32(ma(pde_slot), pt as u32 | PWU as u32).unwrap();
        pt
    };
    mem.write_u32(ma(pt + 4 * ((va >> 12) & 0x3ff)), pa as u32 | leaf)
        .unwrap();
}

/// The 4-level leaf entry mapping `va` (4 KiB pages only), and where it lives.
fn leaf_slot_4level(mem: &SparseMemory, root: u64, va: u64) -> u64 {
    let mut table = root;
    for level in (2..=4u32).rev() {
        let index = (va >> (12 + 9 * (level - 1))) & 0x1ff;
        table = mem.read_u64(ma(table + 8 * index)).unwrap() & bits::ADDR_MASK_8;
    }
    table + 8 * ((va >> 12) & 0x1ff)
}

fn long_mode_cpu(mem: &SparseMemory, root: u64, feat: CpuFeatures, cr4_extra: u64) -> Cpu {
    let mut cpu = Cpu::new(feat);
    cpu.load_cr3(mem, root).unwrap();
    let cr0 = cr::CR0_PE | cr::CR0_PG | cr::CR0_WP;
    let efer = cr::EFER_LME | cr::EFER_NXE;
    cpu.set_control(mem, cr0, cr::CR4_PAE | cr4_extra, efer)
        .unwrap();
    assert_eq!(cpu.levels(), PagingLevels::Four);
    cpu
}

// ---------------------------------------------------------------------------------------
// The allocator.

#[test]
fn blocks_are_naturally_aligned_and_disjoint() {
    let mut mem = SparseMemory::new(1 << 16);
    let mut taken = BTreeSet::new();
    for round in 0..200u32 {
        let order = (round * 7 % 6) as u8;
        let first = mem.alloc_block(order).unwrap().raw();
        assert_eq!(first % (1 << order), 0, "order {order} block at {first:#x}");
        for f in first..first + (1 << order) {
            assert!(taken.insert(f), "frame {f:#x} handed out twice");
        }
    }
    assert_eq!(mem.allocated_frames(), taken.len() as u64);
    assert_eq!(mem.free_frames(), (1 << 16) - taken.len() as u64);
}

#[test]
fn blocks_come_back_zero_filled() {
    let mut mem = SparseMemory::new(64);
    let block = mem.alloc_block(2).unwrap();
    for i in 0..4 {
        mem.write_u64(ma(block.base().raw() + i * 4096 + 8), 0xfeed)
            .unwrap();
    }
    assert_eq!(mem.populated_frames(), 4);
    mem.free_block(block, 2);
    let again = mem.alloc_block(2).unwrap();
    assert_eq!(again, block, "freed blocks are reused first");
    assert_eq!(mem.populated_frames(), 0);
    for i in 0..4 {
        assert_eq!(mem.read_u64(ma(again.base().raw() + i * 4096 + 8)), Ok(0));
    }
}

#[test]
fn frames_written_before_allocation_are_zeroed_too() {
    let mut mem = SparseMemory::new(8);
    mem.write_u64(ma(0x10), 7).unwrap();
    let f = mem.alloc_block(0).unwrap();
    assert_eq!(f, Mfn::new(0));
    assert_eq!(mem.read_u64(ma(0x10)), Ok(0));
}

#[test]
fn double_foreign_and_wrong_order_frees_are_counted_and_ignored() {
    let mut mem = SparseMemory::new(64);
    let a = mem.alloc_block(1).unwrap();
    let b = mem.alloc_block(0).unwrap();
    mem.free_block(a, 1);
    mem.free_block(a, 1);
    mem.free_block(Mfn::new(40), 0);
    mem.free_block(b, 3);
    mem.free_block(Mfn::new(u64::MAX), 63);
    assert_eq!(mem.bad_frees(), 4);
    assert_eq!(mem.allocated_frames(), 1);
    assert_eq!(mem.allocated_block(b), Some(0));
    mem.free_block(b, 0);
    assert_eq!(mem.allocated_frames(), 0);
    assert_eq!(mem.free_frames(), 64);
}

#[test]
fn exhaustion_returns_none_and_freeing_merges_buddies() {
    let mut mem = SparseMemory::new(32);
    let mut all: Vec<Mfn> = std::iter::from_fn(|| mem.alloc_block(0)).collect();
    assert_eq!(all.len(), 32);
    assert_eq!(mem.alloc_block(0), None);
    assert_eq!(mem.alloc_block(6), None);
    all.reverse();
    for f in all {
        mem.free_block(f, 0);
    }
    assert_eq!(
        mem.alloc_block(5),
        Some(Mfn::new(0)),
        "the buddies merged back"
    );
}

#[test]
fn reserved_ranges_are_never_handed_out() {
    let mut mem = SparseMemory::new(1024);
    mem.reserve(Mfn::new(100), 50).unwrap();
    mem.reserve(Mfn::new(120), 50).unwrap();
    assert_eq!(mem.reserved_frames(), 70);
    assert_eq!(
        mem.reserve(Mfn::new(1000), 100),
        Err(ReserveError::OutOfRange)
    );
    let mut got = Vec::new();
    while let Some(f) = mem.alloc_block(2) {
        got.push(f.raw());
    }
    assert!(
        got.iter().all(|&f| f + 4 <= 100 || f >= 170),
        "a block overlaps the reserved range"
    );
    // The reserved frames stay usable as memory.
    mem.write_u64(ma(120 * 4096), 5).unwrap();
    assert_eq!(mem.read_u64(ma(120 * 4096)), Ok(5));
}

#[test]
fn reserving_allocated_frames_is_refused() {
    let mut mem = SparseMemory::new(64);
    let block = mem.alloc_block(3).unwrap();
    assert_eq!(
        mem.reserve(Mfn::new(block.raw() + 5), 1),
        Err(ReserveError::InUse { mfn: block })
    );
}

#[test]
fn a_million_frames_allocate_and_free_cheaply() {
    let start = Instant::now();
    let mut mem = SparseMemory::with_phys_bits(40);
    let frames: Vec<Mfn> = (0..1_000_000)
        .map(|_| mem.alloc_block(0).unwrap())
        .collect();
    assert_eq!(mem.allocated_frames(), 1_000_000);
    assert_eq!(mem.populated_frames(), 0);
    for f in frames {
        mem.free_block(f, 0);
    }
    assert_eq!(mem.allocated_frames(), 0);
    assert_eq!(mem.free_frames(), 1 << 28);
    let huge = mem.alloc_block(20).unwrap();
    assert_eq!(huge.raw() % (1 << 20), 0);
    assert!(start.elapsed().as_secs() < 30, "took {:?}", start.elapsed());
}

#[derive(Clone, Debug)]
enum AllocOp {
    Alloc(u8),
    /// Frees the outstanding block at this index (modulo their number).
    Free(usize),
    /// Frees a block that may or may not be outstanding.
    BadFree(u64, u8),
}

fn alloc_op() -> impl Strategy<Value = AllocOp> {
    prop_oneof![
        (0u8..5).prop_map(AllocOp::Alloc),
        any::<usize>().prop_map(AllocOp::Free),
        (0u64..80, 0u8..4).prop_map(|(f, o)| AllocOp::BadFree(f, o)),
    ]
}

/// Whether some naturally aligned block of `order` is neither handed out nor reserved.
fn fully_free_block_exists(busy: &[bool], order: u8) -> bool {
    busy.chunks(1 << order)
        .any(|chunk| chunk.iter().all(|b| !b))
}

proptest! {
    /// Whatever the sequence, blocks are aligned, disjoint, clear of reservations, the
    /// counts add up, and an allocation fails only if no aligned free block exists.
    #[test]
    fn the_allocator_keeps_its_invariants(
        reserve in (0u64..64, 0u64..12),
        ops in proptest::collection::vec(alloc_op(), 1..200),
    ) {
        // Small enough that allocations often fail, which is when completeness is checked.
        const FRAMES: u64 = 64;
        let mut mem = SparseMemory::new(FRAMES);
        let (r_first, r_len) = (reserve.0, reserve.1.min(FRAMES - reserve.0));
        mem.reserve(Mfn::new(r_first), r_len).unwrap();
        let mut busy = vec![false; FRAMES as usize];
        busy[r_first as usize..(r_first + r_len) as usize].fill(true);
        let mut out: Vec<(Mfn, u8)> = Vec::new();
        for op in ops {
            match op {
                AllocOp::Alloc(order) => match mem.alloc_block(order) {
                    Some(first) => {
                        let f = first.raw() as usize;
                        prop_assert_eq!(f % (1 << order), 0);
                        let block = &mut busy[f..f + (1 << order)];
                        prop_assert!(block.iter().all(|b| !b), "overlap at {:#x}", f);
                        block.fill(true);
                        out.push((first, order));
                    }
                    None => prop_assert!(!fully_free_block_exists(&busy, order)),
                },
                AllocOp::Free(i) if !out.is_empty() => {
                    let (first, order) = out.swap_remove(i % out.len());
                    mem.free_block(first, order);
                    let f = first.raw() as usize;
                    busy[f..f + (1 << order)].fill(false);
                }
                AllocOp::Free(_) => {}
                AllocOp::BadFree(f, order) => {
                    let live = out.contains(&(Mfn::new(f), order));
                    let before = mem.bad_frees();
                    if !live {
                        mem.free_block(Mfn::new(f), order);
                        prop_assert_eq!(mem.bad_frees(), before + 1);
                    }
                }
            }
            let handed: u64 = out.iter().map(|&(_, o)| 1u64 << o).sum();
            prop_assert_eq!(mem.allocated_frames(), handed);
            prop_assert_eq!(mem.free_frames(), FRAMES - handed - r_len);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Sparse memory at high addresses.

#[test]
fn frames_near_1_tib_and_the_top_of_52_bits_cost_one_frame_each() {
    let mut mem = SparseMemory::with_phys_bits(52);
    assert_eq!(mem.frames(), 1 << 40);
    let near_1t = ma((1u64 << 40) - 8);
    let near_top = ma((1u64 << 52) - 8);
    let at_2_40_frames = Mfn::new((1 << 40) - 1).base();
    mem.write_u64(near_1t, 1).unwrap();
    mem.write_u64(near_top, 2).unwrap();
    mem.write_u32(at_2_40_frames, 3).unwrap();
    assert_eq!(mem.read_u64(near_1t), Ok(1));
    assert_eq!(mem.read_u64(near_top), Ok(2));
    assert_eq!(mem.read_u32(at_2_40_frames), Ok(3));
    assert_eq!(mem.populated_frames(), 2);
    assert_eq!(
        mem.read_u64(ma(1 << 52)),
        Err(MemError::Unbacked { addr: 1 << 52 })
    );
    let mut small = SparseMemory::with_phys_bits(40);
    assert_eq!(
        small.write_u64(ma(1 << 40), 1),
        Err(MemError::Unbacked { addr: 1 << 40 })
    );
    small.write_u64(near_1t, 9).unwrap();
    assert_eq!(small.populated_frames(), 1);
}

#[test]
fn allocation_reaches_the_top_of_a_huge_memory_past_a_reservation() {
    let mut mem = SparseMemory::with_phys_bits(52);
    mem.reserve(Mfn::new(0), (1 << 40) - 4).unwrap();
    let a = mem.alloc_block(1).unwrap();
    let b = mem.alloc_block(1).unwrap();
    assert_eq!((a.raw(), b.raw()), ((1 << 40) - 4, (1 << 40) - 2));
    assert_eq!(mem.alloc_block(0), None);
}

// ---------------------------------------------------------------------------------------
// The guest-physical view.

#[test]
fn guest_physical_view_goes_through_the_lookup() {
    let mut mem = SparseMemory::new(64);
    let p2m: HashMap<Gfn, Mfn> = [(Gfn::new(0), Mfn::new(9)), (Gfn::new(1), Mfn::new(3))].into();
    let mut view = GuestPhysView::new(&mut mem, |g| p2m.get(&g).copied());
    view.write_u64(Gpa::new(0x10), 0xabcd).unwrap();
    view.write_u32(Gpa::new(0x1004), 0x77).unwrap();
    assert_eq!(view.to_maddr(Gpa::new(0x10)), Some(ma(0x9010)));
    assert_eq!(
        view.read_u64(Gpa::new(0x2000)),
        Err(MemError::Unbacked { addr: 0x2000 })
    );
    assert_eq!(
        view.read_u32(Gpa::new(0x1002)),
        Err(MemError::Misaligned { addr: 0x1002 })
    );
    view.write_bytes(Gpa::new(0xffe), &[1, 2, 3, 4]).unwrap();
    let mut back = [0; 4];
    view.read_bytes(Gpa::new(0xffe), &mut back).unwrap();
    assert_eq!(back, [1, 2, 3, 4]);
    assert_eq!(mem.read_u64(ma(0x9010)), Ok(0xabcd));
    assert_eq!(mem.read_u32(ma(0x3004)), Ok(0x77));
    assert_eq!(mem.read_u32(ma(0x3000)), Ok(0x0403));
}

#[test]
fn guest_tables_walk_through_the_view_in_guest_frames() {
    let mut mem = SparseMemory::new(64);
    // Guest frames 0..4 live at machine frames 20..24, so a walk must map every table
    // pointer through the lookup.
    let lookup = |g: Gfn| (g.raw() < 4).then(|| Mfn::new(g.raw() + 20));
    let mut view = GuestPhysView::new(&mut mem, lookup);
    view.write_u64(Gpa::new(0x0000), 0x1000 | PWU).unwrap();
    view.write_u64(Gpa::new(0x1000), 0x2000 | PWU).unwrap();
    view.write_u64(Gpa::new(0x2000), 0x3000 | PWU).unwrap();
    view.write_u64(Gpa::new(0x3000 + 8 * 5), 0x7_7000 | PWU)
        .unwrap();
    let ctl = ControlState {
        cr0: cr::CR0_PE | cr::CR0_PG,
        cr4: cr::CR4_PAE,
        efer: cr::EFER_LME | cr::EFER_LMA,
        ..ControlState::default()
    };
    let env = WalkEnv {
        ctl: &ctl,
        feat: &CpuFeatures::KVM_HOST,
        ad: AdUpdate::Set,
    };
    let t = walk::<Gpa, _>(&mut view, env, Gva::new(0x5123), acc(AccessKind::Read, SUP)).unwrap();
    assert_eq!(t.addr, Gpa::new(0x7_7123));
    assert_eq!(t.frame, Gfn::new(0x77));
    assert_ne!(mem.read_u64(ma(23 * 4096 + 8 * 5)).unwrap() & bits::A, 0);
}

// ---------------------------------------------------------------------------------------
// The CPU in each paging mode.

#[test]
fn four_level_translation_sets_accessed_then_dirty() {
    let mut mem = SparseMemory::new(1 << 20);
    let root = frame(&mut mem);
    let data = frame(&mut mem);
    let va = 0x7f12_3456_7000u64;
    map_4level(&mut mem, root, va, data, 1, PWU);
    let mut cpu = long_mode_cpu(&mem, root, CpuFeatures::KVM_HOST, 0);

    let t = cpu
        .translate(&mut mem, Gva::new(va + 0x10), acc(AccessKind::Read, USR))
        .unwrap();
    assert_eq!(t.addr, ma(data + 0x10));
    assert_eq!(t.size, PageSize::Size4K);
    assert!(!t.dirty);
    let leaf = leaf_slot_4level(&mem, root, va);
    assert_eq!(
        mem.read_u64(ma(leaf)).unwrap() & (bits::A | bits::D),
        bits::A
    );
    let l4e = mem.read_u64(ma(root + 8 * ((va >> 39) & 0x1ff))).unwrap();
    assert_ne!(l4e & bits::A, 0, "A is set on every level");

    cpu.write_u64(&mut mem, Gva::new(va + 8), USR, 0x1122)
        .unwrap();
    assert_ne!(mem.read_u64(ma(leaf)).unwrap() & bits::D, 0);
    assert_eq!(cpu.read_u64(&mut mem, Gva::new(va + 8), USR), Ok(0x1122));
    assert_eq!(mem.read_u64(ma(data + 8)), Ok(0x1122));
}

#[test]
fn a_write_through_a_clean_tlb_entry_walks_again_and_sets_dirty() {
    let mut mem = SparseMemory::new(1 << 12);
    let root = frame(&mut mem);
    let data = frame(&mut mem);
    let va = 0x40_0000u64;
    map_4level(&mut mem, root, va, data, 1, PWU);
    let mut cpu = long_mode_cpu(&mem, root, CpuFeatures::KVM_HOST, 0);
    let leaf = leaf_slot_4level(&mem, root, va);

    cpu.read_u64(&mut mem, Gva::new(va), SUP).unwrap();
    assert!(!cpu.tlb().peek(Gva::new(va)).unwrap().dirty);
    let walks = cpu.stats().walks;
    cpu.write_u64(&mut mem, Gva::new(va), SUP, 1).unwrap();
    assert_eq!(
        cpu.stats().walks,
        walks + 1,
        "the clean entry did not serve the write"
    );
    assert_ne!(mem.read_u64(ma(leaf)).unwrap() & bits::D, 0);
    assert!(cpu.tlb().peek(Gva::new(va)).unwrap().dirty);
    // Now dirty in the TLB: the next write is a hit.
    cpu.write_u64(&mut mem, Gva::new(va), SUP, 2).unwrap();
    assert_eq!(cpu.stats().walks, walks + 1);
}

#[test]
fn superpages_in_four_level_mode() {
    let mut mem = SparseMemory::with_phys_bits(46);
    let root = frame(&mut mem);
    let two_m = 0x1_4000_0000u64;
    let one_g = 0x80_0000_0000u64;
    map_4level(&mut mem, root, 0x20_0000, two_m, 2, PWU);
    map_4level(&mut mem, root, 0x4000_0000, one_g, 3, PWU);
    let mut cpu = long_mode_cpu(&mem, root, CpuFeatures::MODERN, 0);
    let r = acc(AccessKind::Read, SUP);
    let t = cpu.translate(&mut mem, Gva::new(0x3f_f008), r).unwrap();
    assert_eq!((t.addr, t.size), (ma(two_m + 0x1f_f008), PageSize::Size2M));
    let t = cpu.translate(&mut mem, Gva::new(0x7fff_f000), r).unwrap();
    assert_eq!(
        (t.addr, t.size),
        (ma(one_g + 0x3fff_f000), PageSize::Size1G)
    );
    // Anywhere inside the superpage hits the same entry.
    let t = cpu.translate(&mut mem, Gva::new(0x4000_1000), r).unwrap();
    assert!(t.from_tlb);
    assert_eq!(t.addr, ma(one_g + 0x1000));
}

#[test]
fn pae_mode_loads_pdptes_and_translates() {
    let mut mem = SparseMemory::new(1 << 12);
    let pdpt = frame(&mut mem);
    let (small, big) = (frame(&mut mem), 0x60_0000u64);
    map_pae(&mut mem, pdpt, 0xc000_1000, small, false, PWU);
    map_pae(&mut mem, pdpt, 0x0080_0000, big, true, PWU);
    let mut cpu = Cpu::new(CpuFeatures::KVM_HOST);
    cpu.load_cr3(&mem, pdpt).unwrap();
    cpu.set_control(&mem, cr::CR0_PE | cr::CR0_PG, cr::CR4_PAE, cr::EFER_NXE)
        .unwrap();
    assert_eq!(cpu.levels(), PagingLevels::Three);
    assert_ne!(
        cpu.control().pdptes[3],
        0,
        "entering PAE paging loads the PDPTEs"
    );

    let w = acc(AccessKind::Write, SUP);
    let t = cpu.translate(&mut mem, Gva::new(0xc000_1abc), w).unwrap();
    assert_eq!(t.addr, ma(small + 0xabc));
    let t = cpu.translate(&mut mem, Gva::new(0x009f_0004), w).unwrap();
    assert_eq!((t.addr, t.size), (ma(big + 0x1f_0004), PageSize::Size2M));
    // 32-bit linear addresses: the upper half is ignored.
    let t = cpu
        .translate(&mut mem, Gva::new(0xffff_0000_c000_1abc), w)
        .unwrap();
    assert_eq!(t.addr, ma(small + 0xabc));
}

#[test]
fn pae_pdpte_changes_need_a_cr3_load_and_reserved_bits_raise_gp() {
    let mut mem = SparseMemory::new(1 << 12);
    let pdpt = frame(&mut mem);
    let data = frame(&mut mem);
    map_pae(&mut mem, pdpt, 0x1000, data, false, PWU);
    let mut cpu = Cpu::new(CpuFeatures::KVM_HOST);
    cpu.load_cr3(&mem, pdpt).unwrap();
    cpu.set_control(&mem, cr::CR0_PE | cr::CR0_PG, cr::CR4_PAE, 0)
        .unwrap();
    let r = acc(AccessKind::Read, SUP);
    let pdpte0 = mem.read_u64(ma(pdpt)).unwrap();
    mem.write_u64(ma(pdpt), 0).unwrap();
    cpu.flush_tlb_all();
    // The PDPTE registers still hold the old entry: no CR3 load happened.
    assert!(cpu.translate(&mut mem, Gva::new(0x1000), r).is_ok());
    cpu.load_cr3(&mem, pdpt).unwrap();
    let fault = cpu.translate(&mut mem, Gva::new(0x1000), r).unwrap_err();
    assert_eq!(fault.error_code(), Some(PfErrorCode(0)));
    // RW in a PDPTE is reserved: the load faults and changes nothing.
    mem.write_u64(ma(pdpt), pdpte0 | bits::RW).unwrap();
    assert_eq!(cpu.load_cr3(&mem, pdpt), Err(CpuFault::GeneralProtection));
    assert_eq!(cpu.control().pdptes[0], 0);
}

#[test]
fn two_level_mode_with_4k_and_4m_pages() {
    let mut mem = SparseMemory::new(1 << 12);
    let pd = frame(&mut mem);
    let data = frame(&mut mem);
    map_2level(&mut mem, pd, 0x0804_8000, data, false, PWU as u32);
    map_2level(
        &mut mem,
        pd,
        0xc000_0000,
        0x80_0000,
        true,
        (bits::P | bits::RW) as u32,
    );
    let mut cpu = Cpu::new(CpuFeatures::KVM_HOST);
    cpu.load_cr3(&mem, pd).unwrap();
    cpu.set_control(&mem, cr::CR0_PE | cr::CR0_PG, cr::CR4_PSE, 0)
        .unwrap();
    assert_eq!(cpu.levels(), PagingLevels::Two);

    cpu.write_u32(&mut mem, Gva::new(0x0804_8ffc), USR, 0xcafe)
        .unwrap();
    assert_eq!(mem.read_u32(ma(data + 0xffc)), Ok(0xcafe));
    let pde = mem.read_u32(ma(pd + 4 * 0x20)).unwrap();
    assert_ne!(pde & bits::A as u32, 0);
    let t = cpu
        .translate(&mut mem, Gva::new(0xc012_3456), acc(AccessKind::Read, SUP))
        .unwrap();
    assert_eq!((t.addr, t.size), (ma(0x92_3456), PageSize::Size4M));
    let big_pde = mem.read_u32(ma(pd + 4 * 0x300)).unwrap();
    assert_eq!(big_pde & (bits::A | bits::D) as u32, bits::A as u32);
    // A user access to the supervisor superpage faults with P|U.
    let fault = cpu
        .translate(&mut mem, Gva::new(0xc000_0000), acc(AccessKind::Read, USR))
        .unwrap_err();
    assert_eq!(
        fault,
        CpuFault::PageFault {
            va: Gva::new(0xc000_0000),
            code: PfErrorCode(PfErrorCode::P | PfErrorCode::U),
        }
    );
}

#[test]
fn paging_disabled_is_the_identity_on_32_bits() {
    let mut mem = SparseMemory::new(1 << 12);
    let mut cpu = Cpu::new(CpuFeatures::KVM_HOST);
    cpu.write_u64(&mut mem, Gva::new(0x1_0000_2000), SUP, 42)
        .unwrap();
    assert_eq!(mem.read_u64(ma(0x2000)), Ok(42));
    assert_eq!(cpu.stats().walks, 0);
    assert!(cpu.tlb().is_empty());
}

// ---------------------------------------------------------------------------------------
// Faults and the TLB.

#[test]
fn a_fault_drops_the_tlb_entry_and_sets_cr2() {
    let mut mem = SparseMemory::new(1 << 12);
    let root = frame(&mut mem);
    let data = frame(&mut mem);
    let va = 0x1000u64;
    map_4level(&mut mem, root, va, data, 1, bits::P | bits::US);
    let mut cpu = long_mode_cpu(&mem, root, CpuFeatures::KVM_HOST, 0);
    cpu.read_u32(&mut mem, Gva::new(va), USR).unwrap();
    assert!(cpu.tlb().peek(Gva::new(va)).is_some());

    let err = cpu
        .write_u32(&mut mem, Gva::new(va + 4), USR, 1)
        .unwrap_err();
    let code = PfErrorCode::P | PfErrorCode::W | PfErrorCode::U;
    assert_eq!(
        err,
        CpuFault::PageFault {
            va: Gva::new(va + 4),
            code: PfErrorCode(code)
        }
    );
    assert_eq!(cpu.cr2(), Gva::new(va + 4));
    assert!(
        cpu.tlb().peek(Gva::new(va)).is_none(),
        "#PF invalidates the page"
    );
    assert_eq!(cpu.stats().faults, 1);
    let leaf = leaf_slot_4level(&mem, root, va);
    assert_eq!(
        mem.read_u64(ma(leaf)).unwrap() & bits::D,
        0,
        "no D on a fault"
    );
}

#[test]
fn fetch_from_a_no_execute_page_reports_i() {
    let mut mem = SparseMemory::new(1 << 12);
    let root = frame(&mut mem);
    let data = frame(&mut mem);
    map_4level(&mut mem, root, 0x1000, data, 1, PWU | bits::NX);
    let mut cpu = long_mode_cpu(&mem, root, CpuFeatures::KVM_HOST, 0);
    let mut insn = [0u8; 4];
    cpu.read_bytes(&mut mem, Gva::new(0x1000), USR, &mut insn)
        .unwrap();
    let fault = cpu
        .fetch(&mut mem, Gva::new(0x1000), USR, &mut insn)
        .unwrap_err();
    let code = PfErrorCode::P | PfErrorCode::U | PfErrorCode::I;
    assert_eq!(fault.error_code(), Some(PfErrorCode(code)));
}

#[test]
fn instruction_bytes_straddling_pages_are_fetched_from_both_frames() {
    let mut mem = SparseMemory::new(1 << 12);
    let root = frame(&mut mem);
    let (a, b) = (frame(&mut mem), frame(&mut mem));
    map_4level(&mut mem, root, 0x1000, b, 1, PWU);
    map_4level(&mut mem, root, 0x2000, a, 1, PWU);
    mem.write_bytes(ma(b + 0xffd), &[0x48, 0x89, 0x07]).unwrap();
    mem.write_bytes(ma(a), &[0xc3]).unwrap();
    let mut cpu = long_mode_cpu(&mem, root, CpuFeatures::KVM_HOST, 0);
    let mut insn = [0u8; 4];
    cpu.fetch(&mut mem, Gva::new(0x1ffd), SUP, &mut insn)
        .unwrap();
    assert_eq!(insn, [0x48, 0x89, 0x07, 0xc3]);
}

#[test]
fn a_write_straddling_pages_checks_both_before_writing() {
    let mut mem = SparseMemory::new(1 << 12);
    let root = frame(&mut mem);
    let (a, b) = (frame(&mut mem), frame(&mut mem));
    map_4level(&mut mem, root, 0x1000, a, 1, PWU);
    map_4level(&mut mem, root, 0x2000, b, 1, bits::P | bits::US);
    let mut cpu = long_mode_cpu(&mem, root, CpuFeatures::KVM_HOST, 0);
    let err = cpu
        .write_u64(&mut mem, Gva::new(0x1ffc), USR, u64::MAX)
        .unwrap_err();
    assert!(matches!(err, CpuFault::PageFault { va, .. } if va == Gva::new(0x2000)));
    assert_eq!(mem.read_u32(ma(a + 0xffc)), Ok(0), "nothing written");
    // Make the second page writable; the write goes through both frames.
    let leaf = leaf_slot_4level(&mem, root, 0x2000);
    mem.write_u64(ma(leaf), b | PWU).unwrap();
    cpu.write_u64(&mut mem, Gva::new(0x1ffc), USR, 0x1111_2222_3333_4444)
        .unwrap();
    assert_eq!(mem.read_u32(ma(a + 0xffc)), Ok(0x3333_4444));
    assert_eq!(mem.read_u32(ma(b)), Ok(0x1111_2222));
    assert_eq!(
        cpu.read_u64(&mut mem, Gva::new(0x1ffc), USR),
        Ok(0x1111_2222_3333_4444)
    );
}

#[test]
fn a_changed_pte_is_invisible_until_invlpg() {
    let mut mem = SparseMemory::new(1 << 12);
    let root = frame(&mut mem);
    let (old, new) = (frame(&mut mem), frame(&mut mem));
    mem.write_u64(ma(old), 0x01d).unwrap();
    mem.write_u64(ma(new), 0x2e3).unwrap();
    let va = Gva::new(0x7000);
    map_4level(&mut mem, root, va.raw(), old, 1, PWU);
    let mut cpu = long_mode_cpu(&mem, root, CpuFeatures::KVM_HOST, 0);
    assert_eq!(cpu.read_u64(&mut mem, va, SUP), Ok(0x01d));

    let leaf = leaf_slot_4level(&mem, root, va.raw());
    mem.write_u64(ma(leaf), new | PWU).unwrap();
    assert_eq!(
        cpu.read_u64(&mut mem, va, SUP),
        Ok(0x01d),
        "stale: no INVLPG yet"
    );
    cpu.invlpg(va);
    assert_eq!(cpu.read_u64(&mut mem, va, SUP), Ok(0x2e3));

    // Removing the mapping altogether is just as invisible until the flush.
    mem.write_u64(ma(leaf), 0).unwrap();
    assert_eq!(cpu.read_u64(&mut mem, va, SUP), Ok(0x2e3));
    cpu.load_cr3(&mem, root).unwrap();
    let fault = cpu.read_u64(&mut mem, va, SUP).unwrap_err();
    assert_eq!(
        fault,
        CpuFault::PageFault {
            va,
            code: PfErrorCode(0)
        }
    );
}

#[test]
fn stale_write_permission_survives_until_flushed() {
    let mut mem = SparseMemory::new(1 << 12);
    let root = frame(&mut mem);
    let data = frame(&mut mem);
    let va = Gva::new(0x9000);
    map_4level(&mut mem, root, va.raw(), data, 1, PWU);
    let mut cpu = long_mode_cpu(&mem, root, CpuFeatures::KVM_HOST, 0);
    cpu.write_u64(&mut mem, va, USR, 1).unwrap();
    let leaf = leaf_slot_4level(&mem, root, va.raw());
    let pte = mem.read_u64(ma(leaf)).unwrap();
    mem.write_u64(ma(leaf), pte & !bits::RW).unwrap();
    // Exactly the bug a shadow engine must not have: write-protecting without a flush.
    cpu.write_u64(&mut mem, va, USR, 2).unwrap();
    assert_eq!(mem.read_u64(ma(data)), Ok(2));
    cpu.invlpg(va);
    assert!(cpu.write_u64(&mut mem, va, USR, 3).is_err());
    assert_eq!(mem.read_u64(ma(data)), Ok(2));
}

fn global_setup(pge: bool) -> (Cpu, SparseMemory, u64, Gva, Gva) {
    let mut mem = SparseMemory::new(1 << 12);
    let root = frame(&mut mem);
    let data = frame(&mut mem);
    let (global, local) = (Gva::new(0xffff_8000_0000_0000), Gva::new(0x1000));
    map_4level(&mut mem, root, global.raw(), data, 1, PWU | bits::G);
    map_4level(&mut mem, root, local.raw(), data, 1, PWU);
    let cr4 = if pge { cr::CR4_PGE } else { 0 };
    let mut cpu = long_mode_cpu(&mem, root, CpuFeatures::KVM_HOST, cr4);
    cpu.read_u64(&mut mem, global, SUP).unwrap();
    cpu.read_u64(&mut mem, local, SUP).unwrap();
    // Unmap both in memory: only the TLB still knows them.
    for va in [global, local] {
        let leaf = leaf_slot_4level(&mem, root, va.raw());
        mem.write_u64(ma(leaf), 0).unwrap();
    }
    (cpu, mem, root, global, local)
}

#[test]
fn global_entries_survive_a_cr3_load_with_pge() {
    let (mut cpu, mut mem, root, global, local) = global_setup(true);
    assert!(cpu.tlb().peek(global).unwrap().global);
    cpu.load_cr3(&mem, root).unwrap();
    assert!(cpu.read_u64(&mut mem, global, SUP).is_ok(), "global kept");
    assert!(
        cpu.read_u64(&mut mem, local, SUP).is_err(),
        "non-global flushed"
    );
    // INVLPG removes a global entry too.
    cpu.invlpg(global);
    assert!(cpu.read_u64(&mut mem, global, SUP).is_err());
}

#[test]
fn without_pge_a_cr3_load_flushes_globals_too() {
    let (mut cpu, mut mem, root, global, local) = global_setup(false);
    assert!(
        !cpu.tlb().peek(global).unwrap().global,
        "G means nothing without PGE"
    );
    cpu.load_cr3(&mem, root).unwrap();
    assert!(cpu.read_u64(&mut mem, global, SUP).is_err());
    assert!(cpu.read_u64(&mut mem, local, SUP).is_err());
}

#[test]
fn toggling_pge_flushes_globals() {
    let (mut cpu, mut mem, _, global, _) = global_setup(true);
    let cr4 = cpu.control().cr4 & !cr::CR4_PGE;
    cpu.set_cr4(&mem, cr4).unwrap();
    assert!(cpu.read_u64(&mut mem, global, SUP).is_err());
}

#[test]
fn a_small_tlb_evicts_and_walks_again() {
    let mut mem = SparseMemory::new(1 << 12);
    let root = frame(&mut mem);
    let data = frame(&mut mem);
    for i in 0..4u64 {
        map_4level(&mut mem, root, 0x1000 * (i + 1), data, 1, PWU);
    }
    let mut cpu = Cpu::with_tlb(CpuFeatures::KVM_HOST, Tlb::new(2));
    cpu.load_cr3(&mem, root).unwrap();
    let cr0 = cr::CR0_PE | cr::CR0_PG;
    cpu.set_control(&mem, cr0, cr::CR4_PAE, cr::EFER_LME)
        .unwrap();
    for round in 0..2 {
        for i in 0..4u64 {
            cpu.read_u64(&mut mem, Gva::new(0x1000 * (i + 1)), SUP)
                .unwrap();
        }
        assert_eq!(
            cpu.stats().walks,
            4 * (round + 1),
            "FIFO of 2 never hits a cycle of 4"
        );
    }
    assert_eq!(cpu.tlb().len(), 2);
    assert_eq!(cpu.tlb().stats().evictions, 6);
}

#[test]
fn protection_keys_are_checked_on_tlb_hits() {
    let mut mem = SparseMemory::new(1 << 12);
    let root = frame(&mut mem);
    let data = frame(&mut mem);
    let va = Gva::new(0x5000);
    map_4level(
        &mut mem,
        root,
        va.raw(),
        data,
        1,
        PWU | (3 << bits::PKEY_SHIFT),
    );
    let mut cpu = long_mode_cpu(&mem, root, CpuFeatures::KVM_HOST, cr::CR4_PKE);
    cpu.write_u64(&mut mem, va, USR, 1).unwrap();
    assert_eq!(cpu.tlb().peek(va).unwrap().pkey, 3);
    cpu.set_pkru(1 << (2 * 3 + 1));
    let fault = cpu.write_u64(&mut mem, va, USR, 2).unwrap_err();
    let code = PfErrorCode::P | PfErrorCode::W | PfErrorCode::U | PfErrorCode::PK;
    assert_eq!(fault.error_code(), Some(PfErrorCode(code)));
    assert!(
        cpu.read_u64(&mut mem, va, USR).is_ok(),
        "write-disable only"
    );
}

#[test]
fn tables_in_unbacked_memory_are_a_memory_fault() {
    let mut mem = SparseMemory::new(16);
    let mut cpu = Cpu::new(CpuFeatures::KVM_HOST);
    cpu.load_cr3(&mem, 0x10_0000).unwrap();
    let cr0 = cr::CR0_PE | cr::CR0_PG;
    cpu.set_control(&mem, cr0, cr::CR4_PAE, cr::EFER_LME)
        .unwrap();
    let err = cpu
        .translate(&mut mem, Gva::new(0), acc(AccessKind::Read, SUP))
        .unwrap_err();
    assert_eq!(
        err,
        CpuFault::Memory(MemError::Unbacked { addr: 0x10_0000 })
    );
}

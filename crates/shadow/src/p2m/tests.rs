use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::cell::Cell;

use proptest::prelude::*;

use super::*;
use crate::addr::Gva;
use crate::host::serial_compare_exchange_u128;
use crate::paging::bits::cr;
use crate::paging::{
    Access, AccessKind, AdUpdate, ControlState, CpuFeatures, FourLevel, PfErrorCode, Privilege,
    ThreeLevel, TwoLevel, WalkEnv, WalkFault, WalkResult, load_pae_pdptes, walk_mode,
};
use crate::paging::{Exchange, serial_compare_exchange_u32, serial_compare_exchange_u64};
use crate::testmem::TestMemory;

const FORMATS: [PagingLevels; 3] = [PagingLevels::Two, PagingLevels::Three, PagingLevels::Four];

const READ_S: Access = Access::new(AccessKind::Read, Privilege::Supervisor);
const WRITE_S: Access = Access::new(AccessKind::Write, Privilege::Supervisor);
const FETCH_S: Access = Access::new(AccessKind::Fetch, Privilege::Supervisor);
const WRITE_U: Access = Access::new(AccessKind::Write, Privilege::User);

/// Data frames tests map: far above the frames `TestMemory` hands out as tables.
const DATA: u64 = 0x8_0000;

fn new_p2m(levels: PagingLevels, frames: u64) -> (P2m, TestMemory) {
    let mut mem = TestMemory::new(frames);
    let p2m = P2m::new(&mut mem, levels).unwrap();
    assert_eq!(mem.outstanding_frames(), 1);
    p2m.check(&mem).unwrap();
    (p2m, mem)
}

fn ram(mfn: u64) -> Option<(Mfn, P2mType)> {
    Some((Mfn::new(mfn), P2mType::Ram))
}

fn mmio(mfn: u64) -> Option<(Mfn, P2mType)> {
    Some((Mfn::new(mfn), P2mType::Mmio))
}

/// Every mapping, by a full iteration with a large budget.
fn all_mappings(p2m: &P2m, mem: &TestMemory) -> BTreeMap<Gfn, P2mEntry> {
    let mut out = BTreeMap::new();
    let mut next = Some(Gfn::new(0));
    while let Some(start) = next {
        next = p2m
            .for_each_from(mem, start, 1 << 16, |gfn, e| {
                assert!(out.insert(gfn, e).is_none(), "{gfn:?} visited twice");
            })
            .unwrap();
    }
    out
}

fn teardown(mut p2m: P2m, mem: &mut TestMemory, budget: usize) {
    let tables = p2m.table_count();
    let mut steps = 0;
    while !p2m.teardown_step(mem, budget) {
        steps += 1;
        assert!(steps <= tables, "teardown does not make progress");
    }
    assert_eq!(mem.outstanding_frames(), 0);
    assert_eq!(p2m.table_count(), 0);
}

/// The linear address a paging-disabled guest uses for `gfn` (sign-extended in 4-level
/// mode, where frames at or above 2^35 are in the upper half).
fn linear(gfn: u64, offset: u64) -> Gva {
    let raw = (gfn << 12) | offset;
    Gva::new((((raw << 16) as i64) >> 16) as u64)
}

/// Walks the p2m as the CPU would with the p2m root in CR3 (CR0.WP=1, no SMEP/SMAP, no
/// NXE, MAXPHYADDR 52).
fn hw_walk(p2m: &P2m, mem: &mut TestMemory, gfn: u64, access: Access) -> WalkResult<Maddr> {
    let feat = CpuFeatures {
        maxphyaddr: 52,
        ..CpuFeatures::KVM_HOST
    };
    let mut ctl = ControlState {
        cr0: cr::CR0_PE | cr::CR0_PG | cr::CR0_WP,
        cr3: p2m.root().base().raw(),
        ..ControlState::default()
    };
    match p2m.levels() {
        PagingLevels::Three => {
            ctl.cr4 = cr::CR4_PAE;
            ctl.pdptes = load_pae_pdptes::<Maddr, _>(&*mem, ctl.cr3, &feat).unwrap();
        }
        PagingLevels::Four => {
            ctl.cr4 = cr::CR4_PAE;
            ctl.efer = cr::EFER_LME | cr::EFER_LMA;
        }
        _ => {}
    }
    assert_eq!(ctl.levels(), p2m.levels());
    let env = WalkEnv {
        ctl: &ctl,
        feat: &feat,
        ad: AdUpdate::Set,
    };
    let va = linear(gfn, 0x9a8);
    match p2m.levels() {
        PagingLevels::Two => walk_mode::<TwoLevel, Maddr, _>(mem, env, va, access),
        PagingLevels::Three => walk_mode::<ThreeLevel, Maddr, _>(mem, env, va, access),
        _ => walk_mode::<FourLevel, Maddr, _>(mem, env, va, access),
    }
}

/// Checks that the hardware walk of `gfn` agrees with `expected`: the frame, writes allowed
/// iff writable, MMIO and holes fault not-present.
fn assert_hw_agrees(p2m: &P2m, mem: &mut TestMemory, gfn: u64, expected: Option<P2mEntry>) {
    let levels = p2m.levels();
    match expected {
        Some(e) if e.ty == P2mType::Ram => {
            for access in [READ_S, FETCH_S] {
                let t = hw_walk(p2m, mem, gfn, access)
                    .unwrap_or_else(|f| panic!("{levels:?} gfn {gfn:#x}: {f:?}"));
                assert_eq!(t.addr, Maddr::new((e.mfn.raw() << 12) | 0x9a8));
                assert_eq!(t.leaf_level, 1);
                assert!(t.perms.user && t.perms.exec);
                assert_eq!(t.perms.write, e.writable);
            }
            for access in [WRITE_S, WRITE_U] {
                let result = hw_walk(p2m, mem, gfn, access);
                if e.writable {
                    assert_eq!(result.unwrap().frame, e.mfn);
                } else {
                    let ec = result.unwrap_err().error_code().unwrap();
                    assert!(ec.present() && ec.write(), "{levels:?}: {ec:?}");
                }
            }
        }
        _ => {
            for access in [READ_S, WRITE_S] {
                let failure = hw_walk(p2m, mem, gfn, access).unwrap_err();
                let WalkFault::PageFault(ec) = failure.fault else {
                    panic!("{levels:?} gfn {gfn:#x}: {failure:?}");
                };
                assert!(!ec.present() && !ec.reserved(), "{levels:?}: {ec:?}");
                assert_eq!(ec.write(), access.is_write());
            }
        }
    }
}

// A host for odd cases: hands out the frames it is told to, remembers what comes back.
#[derive(Debug, Default)]
struct ScriptedHost {
    next: Vec<Mfn>,
    freed: Vec<Mfn>,
}

impl PhysMem<Maddr> for ScriptedHost {
    fn read_u32(&self, _: Maddr) -> Result<u32, MemError> {
        Ok(0)
    }
    fn read_u64(&self, _: Maddr) -> Result<u64, MemError> {
        Ok(0)
    }
    fn write_u32(&mut self, _: Maddr, _: u32) -> Result<(), MemError> {
        Ok(())
    }
    fn write_u64(&mut self, _: Maddr, _: u64) -> Result<(), MemError> {
        Ok(())
    }
    fn compare_exchange_u32(
        &mut self,
        addr: Maddr,
        current: u32,
        new: u32,
    ) -> Result<Exchange<u32>, MemError> {
        serial_compare_exchange_u32(self, addr, current, new)
    }
    fn compare_exchange_u64(
        &mut self,
        addr: Maddr,
        current: u64,
        new: u64,
    ) -> Result<Exchange<u64>, MemError> {
        serial_compare_exchange_u64(self, addr, current, new)
    }
}

impl MachineMemory for ScriptedHost {
    fn alloc_block(&mut self, order: u8) -> Option<Mfn> {
        assert_eq!(order, 0);
        self.next.pop()
    }
    fn free_block(&mut self, first: Mfn, order: u8) {
        assert_eq!(order, 0);
        self.freed.push(first);
    }
    fn compare_exchange_u128(
        &mut self,
        addr: Maddr,
        current: u128,
        new: u128,
    ) -> Result<Exchange<u128>, MemError> {
        serial_compare_exchange_u128(self, addr, current, new)
    }
}

/// A memory whose writes can be made to fail.
#[derive(Debug)]
struct FlakyMem {
    inner: TestMemory,
    fail_writes: bool,
}

impl PhysMem<Maddr> for FlakyMem {
    fn read_u32(&self, addr: Maddr) -> Result<u32, MemError> {
        self.inner.read_u32(addr)
    }
    fn read_u64(&self, addr: Maddr) -> Result<u64, MemError> {
        self.inner.read_u64(addr)
    }
    fn write_u32(&mut self, addr: Maddr, value: u32) -> Result<(), MemError> {
        if self.fail_writes {
            return Err(MemError::ReadOnly { addr: addr.raw() });
        }
        self.inner.write_u32(addr, value)
    }
    fn write_u64(&mut self, addr: Maddr, value: u64) -> Result<(), MemError> {
        if self.fail_writes {
            return Err(MemError::ReadOnly { addr: addr.raw() });
        }
        self.inner.write_u64(addr, value)
    }
    // Through its own writes, so that they fail when writes fail.
    fn compare_exchange_u32(
        &mut self,
        addr: Maddr,
        current: u32,
        new: u32,
    ) -> Result<Exchange<u32>, MemError> {
        serial_compare_exchange_u32(self, addr, current, new)
    }
    fn compare_exchange_u64(
        &mut self,
        addr: Maddr,
        current: u64,
        new: u64,
    ) -> Result<Exchange<u64>, MemError> {
        serial_compare_exchange_u64(self, addr, current, new)
    }
}

impl MachineMemory for FlakyMem {
    fn alloc_block(&mut self, order: u8) -> Option<Mfn> {
        self.inner.alloc_block(order)
    }
    fn free_block(&mut self, first: Mfn, order: u8) {
        self.inner.free_block(first, order)
    }
    fn compare_exchange_u128(
        &mut self,
        addr: Maddr,
        current: u128,
        new: u128,
    ) -> Result<Exchange<u128>, MemError> {
        serial_compare_exchange_u128(self, addr, current, new)
    }
}

/// A read-only view that counts reads.
struct Counting<'a> {
    mem: &'a TestMemory,
    reads: Cell<usize>,
}

impl PhysMem<Maddr> for Counting<'_> {
    fn read_u32(&self, addr: Maddr) -> Result<u32, MemError> {
        self.reads.set(self.reads.get() + 1);
        self.mem.read_u32(addr)
    }
    fn read_u64(&self, addr: Maddr) -> Result<u64, MemError> {
        self.reads.set(self.reads.get() + 1);
        self.mem.read_u64(addr)
    }
    fn write_u32(&mut self, addr: Maddr, _: u32) -> Result<(), MemError> {
        Err(MemError::ReadOnly { addr: addr.raw() })
    }
    fn write_u64(&mut self, addr: Maddr, _: u64) -> Result<(), MemError> {
        Err(MemError::ReadOnly { addr: addr.raw() })
    }
    fn compare_exchange_u32(
        &mut self,
        addr: Maddr,
        _: u32,
        _: u32,
    ) -> Result<Exchange<u32>, MemError> {
        Err(MemError::ReadOnly { addr: addr.raw() })
    }
    fn compare_exchange_u64(
        &mut self,
        addr: Maddr,
        _: u64,
        _: u64,
    ) -> Result<Exchange<u64>, MemError> {
        Err(MemError::ReadOnly { addr: addr.raw() })
    }
}

#[test]
fn p2m_shapes() {
    let expect = [
        (PagingLevels::Two, 1 << 20, 1 << 20),
        (PagingLevels::Three, 1 << 20, 1 << 40),
        (PagingLevels::Four, 1 << 36, 1 << 40),
    ];
    for (levels, max_gfn, max_mfn) in expect {
        let (p2m, mut mem) = new_p2m(levels, 64);
        assert_eq!(p2m.levels(), levels);
        assert_eq!(p2m.max_gfn(), Gfn::new(max_gfn));
        assert_eq!(p2m.max_mfn(), Mfn::new(max_mfn));
        assert_eq!(p2m.mapped_count(), 0);
        assert_eq!(p2m.table_count(), 1);
        assert!(p2m.owns_table_frame(p2m.root()));
        assert_eq!(p2m.table_frames().collect::<Vec<_>>(), [p2m.root()]);
        assert!(!p2m.is_torn_down());
        teardown(p2m, &mut mem, 1);
    }
}

#[test]
fn p2m_new_errors() {
    let mut mem = TestMemory::new(8);
    assert_eq!(
        P2m::new(&mut mem, PagingLevels::Zero).unwrap_err(),
        P2mError::UnsupportedLevels {
            levels: PagingLevels::Zero
        }
    );
    mem.limit_allocs(Some(0));
    assert_eq!(
        P2m::new(&mut mem, PagingLevels::Four).unwrap_err(),
        P2mError::OutOfHostMemory
    );
    assert_eq!(mem.outstanding_frames(), 0);

    // A 2-level or PAE root must be below 4 GiB (a 32-bit CR3); a 4-level one need not.
    let high = Mfn::new(1 << 20);
    for levels in [PagingLevels::Two, PagingLevels::Three] {
        let mut host = ScriptedHost {
            next: alloc::vec![high],
            ..ScriptedHost::default()
        };
        assert_eq!(
            P2m::new(&mut host, levels).unwrap_err(),
            P2mError::BadHostFrame { mfn: high }
        );
        assert_eq!(host.freed, [high]);
    }
    let mut host = ScriptedHost {
        next: alloc::vec![high],
        ..ScriptedHost::default()
    };
    let p2m = P2m::new(&mut host, PagingLevels::Four).unwrap();
    assert_eq!(p2m.root(), high);
}

#[test]
fn p2m_set_lookup_replace_remove() {
    for levels in FORMATS {
        let (mut p2m, mut mem) = new_p2m(levels, 64);
        let top = p2m.max_gfn().raw() - 1;
        let gfns = [0, 1, 511, 512, 1023, 1024, 0x4_0000, top];
        for (i, &gfn) in gfns.iter().enumerate() {
            let old = p2m.set(&mut mem, Gfn::new(gfn), ram(DATA + i as u64));
            assert_eq!(old, Ok(None), "{levels:?} gfn {gfn:#x}");
            assert_eq!(p2m.mapped_count(), i as u64 + 1);
        }
        p2m.check(&mem).unwrap();
        for (i, &gfn) in gfns.iter().enumerate() {
            assert_eq!(
                p2m.lookup(&mem, Gfn::new(gfn)),
                Some(P2mEntry::ram(Mfn::new(DATA + i as u64)))
            );
        }
        for gfn in [2, 510, 513, 0x3_ffff, top - 1] {
            assert_eq!(p2m.lookup(&mem, Gfn::new(gfn)), None, "{levels:?} {gfn:#x}");
            assert_eq!(p2m.try_lookup(&mem, Gfn::new(gfn)), Ok(None));
        }

        // Replace: the old mapping comes back, the new one is writable.
        p2m.set_writable(&mut mem, Gfn::new(512), false).unwrap();
        let old = p2m.set(&mut mem, Gfn::new(512), mmio(0x1234)).unwrap();
        assert_eq!(
            old,
            Some(P2mEntry::ram(Mfn::new(DATA + 3)).with_writable(false))
        );
        assert_eq!(
            p2m.lookup(&mem, Gfn::new(512)),
            Some(P2mEntry::new(Mfn::new(0x1234), P2mType::Mmio))
        );
        assert_eq!(p2m.mapped_count(), gfns.len() as u64);

        // Same mapping again: no change.
        let tables = p2m.table_count();
        assert_eq!(
            p2m.set(&mut mem, Gfn::new(512), mmio(0x1234)).unwrap(),
            Some(P2mEntry::new(Mfn::new(0x1234), P2mType::Mmio))
        );
        assert_eq!(p2m.table_count(), tables);

        // Remove: gone, and removing again (or a hole, or a missing subtree) is a no-op.
        for (i, &gfn) in gfns.iter().enumerate() {
            let old = p2m.set(&mut mem, Gfn::new(gfn), None).unwrap();
            assert!(old.is_some());
            assert_eq!(p2m.lookup(&mem, Gfn::new(gfn)), None);
            assert_eq!(p2m.mapped_count(), (gfns.len() - i - 1) as u64);
        }
        let frames = mem.outstanding_frames();
        assert_eq!(p2m.set(&mut mem, Gfn::new(0), None), Ok(None));
        assert_eq!(p2m.set(&mut mem, Gfn::new(0x2_0000), None), Ok(None));
        assert_eq!(mem.outstanding_frames(), frames, "removal allocated");
        p2m.check(&mem).unwrap();
        assert!(all_mappings(&p2m, &mem).is_empty());
        teardown(p2m, &mut mem, 3);
    }
}

#[test]
fn p2m_entry_formats() {
    for levels in FORMATS {
        let (mut p2m, mut mem) = new_p2m(levels, 64);
        p2m.set(&mut mem, Gfn::new(5), ram(DATA)).unwrap();
        p2m.set(&mut mem, Gfn::new(6), mmio(DATA + 1)).unwrap();
        p2m.set_writable(&mut mem, Gfn::new(6), false).unwrap();

        let t = hw_walk(&p2m, &mut mem, 5, READ_S).unwrap();
        let leaf = (DATA << 12) | (1 << 9) | bits::P | bits::RW | bits::US | bits::A | bits::D;
        assert_eq!(t.leaf, leaf, "{levels:?}");
        for entry in t.path.iter().filter(|e| e.level > 1) {
            let pdpte = levels == PagingLevels::Three && entry.level == 3;
            let flags = if pdpte {
                bits::P
            } else {
                bits::P | bits::RW | bits::US | bits::A
            };
            assert_eq!(
                entry.value & 0xfff,
                flags,
                "{levels:?} level {}",
                entry.level
            );
            assert_eq!(entry.value >> 52, 0);
        }
        assert_eq!(t.path.len(), usize::from(levels.count()));

        let f = hw_walk(&p2m, &mut mem, 6, READ_S).unwrap_err();
        assert_eq!(f.error_code(), Some(PfErrorCode(0)), "{levels:?}");
        assert_eq!(f.path.last().unwrap().value, ((DATA + 1) << 12) | (2 << 9));

        p2m.set_writable(&mut mem, Gfn::new(5), false).unwrap();
        let t = hw_walk(&p2m, &mut mem, 5, READ_S).unwrap();
        assert_eq!(t.leaf, leaf & !bits::RW);
        p2m.check(&mem).unwrap();
    }
}

#[test]
fn p2m_pae_root_holds_only_the_pdpt() {
    let (mut p2m, mut mem) = new_p2m(PagingLevels::Three, 64);
    let top = p2m.max_gfn().raw() - 1;
    for gfn in [0, 0x4_0000, 0x8_0000, top] {
        p2m.set(&mut mem, Gfn::new(gfn), ram(DATA + gfn)).unwrap();
    }
    let root = p2m.root().base().raw();
    for i in 0..4 {
        let pdpte = mem.read_u64(Maddr::new(root + 8 * i)).unwrap();
        assert_eq!(pdpte & 0xfff, bits::P);
        assert_eq!(
            ThreeLevel::pdpte_reserved_bits(pdpte, &CpuFeatures::KVM_HOST),
            0
        );
    }
    for i in 4..512 {
        assert_eq!(mem.read_u64(Maddr::new(root + 8 * i)).unwrap(), 0);
    }
    // A stray word past the PDPT is caught.
    mem.write_u64(Maddr::new(root + 8 * 4), 1).unwrap();
    assert_eq!(
        p2m.check(&mem),
        Err(P2mError::MalformedEntry {
            table: p2m.root(),
            index: 4,
            entry: 1
        })
    );
}

#[test]
fn p2m_root_is_a_hardware_page_table() {
    for levels in FORMATS {
        let (mut p2m, mut mem) = new_p2m(levels, 64);
        let top = p2m.max_gfn().raw() - 1;
        let max_mfn = p2m.max_mfn().raw() - 1;
        let mut expected: BTreeMap<u64, P2mEntry> = BTreeMap::new();
        let cases = [
            (0, P2mEntry::ram(Mfn::new(DATA))),
            (1, P2mEntry::ram(Mfn::new(DATA + 7)).with_writable(false)),
            (0x3ff, P2mEntry::new(Mfn::new(DATA + 2), P2mType::Mmio)),
            (0x400, P2mEntry::ram(Mfn::new(max_mfn))),
            (0xb_8000, P2mEntry::new(Mfn::new(0), P2mType::Mmio)),
            (0xf_ffff, P2mEntry::ram(Mfn::new(DATA + 3))),
            (top, P2mEntry::ram(Mfn::new(DATA + 4))),
        ];
        for (gfn, e) in cases {
            p2m.set_entry(&mut mem, Gfn::new(gfn), Some(e)).unwrap();
            expected.insert(gfn, e);
        }
        for gfn in [
            0,
            1,
            2,
            0x3ff,
            0x400,
            0x401,
            0xb_8000,
            0xf_ffff,
            top,
            top - 1,
        ] {
            assert_hw_agrees(&p2m, &mut mem, gfn, expected.get(&gfn).copied());
        }
        // The walks found every A and D bit already set: the tables are exactly as written.
        p2m.check(&mem).unwrap();
        // Flip writability both ways and look again.
        for gfn in [0, 1] {
            let e = expected.get_mut(&gfn).unwrap();
            e.writable = !e.writable;
            assert_eq!(
                p2m.set_writable(&mut mem, Gfn::new(gfn), e.writable),
                Ok(true)
            );
            assert_hw_agrees(&p2m, &mut mem, gfn, Some(*e));
        }
        teardown(p2m, &mut mem, 2);
    }
}

#[test]
fn p2m_set_writable() {
    for levels in FORMATS {
        let (mut p2m, mut mem) = new_p2m(levels, 64);
        let gfn = Gfn::new(0x123);
        assert_eq!(
            p2m.set_writable(&mut mem, gfn, false),
            Err(P2mError::NotMapped { gfn })
        );
        p2m.set(&mut mem, gfn, ram(DATA)).unwrap();
        let other = Gfn::new(0x124);
        assert_eq!(
            p2m.set_writable(&mut mem, other, false),
            Err(P2mError::NotMapped { gfn: other })
        );
        assert_eq!(p2m.set_writable(&mut mem, gfn, true), Ok(false));
        assert_eq!(p2m.set_writable(&mut mem, gfn, false), Ok(true));
        assert_eq!(p2m.set_writable(&mut mem, gfn, false), Ok(false));
        assert_eq!(
            p2m.lookup(&mem, gfn),
            Some(P2mEntry::ram(Mfn::new(DATA)).with_writable(false))
        );
        assert_eq!(p2m.set_writable(&mut mem, gfn, true), Ok(true));
        assert_eq!(p2m.lookup(&mem, gfn), Some(P2mEntry::ram(Mfn::new(DATA))));
        let out = p2m.max_gfn();
        assert_eq!(
            p2m.set_writable(&mut mem, out, true),
            Err(P2mError::GfnOutOfRange { gfn: out })
        );
        p2m.check(&mem).unwrap();
    }
}

#[test]
fn p2m_rejects_bad_input_without_change() {
    for levels in FORMATS {
        let (mut p2m, mut mem) = new_p2m(levels, 64);
        p2m.set(&mut mem, Gfn::new(3), ram(DATA)).unwrap();
        let frames = mem.outstanding_frames();
        let before = all_mappings(&p2m, &mem);

        for gfn in [p2m.max_gfn().raw(), p2m.max_gfn().raw() + 1, u64::MAX] {
            let gfn = Gfn::new(gfn);
            let err = Err(P2mError::GfnOutOfRange { gfn });
            assert_eq!(p2m.set(&mut mem, gfn, ram(DATA)), err);
            assert_eq!(p2m.set(&mut mem, gfn, None), err);
            assert_eq!(p2m.try_lookup(&mem, gfn), err);
            assert_eq!(p2m.lookup(&mem, gfn), None);
        }
        for mfn in [p2m.max_mfn().raw(), u64::MAX] {
            let mfn = Mfn::new(mfn);
            for ty in [P2mType::Ram, P2mType::Mmio] {
                for gfn in [3, 0x7_0000] {
                    assert_eq!(
                        p2m.set(&mut mem, Gfn::new(gfn), Some((mfn, ty))),
                        Err(P2mError::MfnUnrepresentable { mfn })
                    );
                }
            }
        }
        // A table frame may not be mapped as RAM (the guest would reach the p2m), but an MMIO
        // entry's frame is never mapped and may be anything.
        for mfn in p2m.table_frames().collect::<Vec<_>>() {
            assert_eq!(
                p2m.set(&mut mem, Gfn::new(4), Some((mfn, P2mType::Ram))),
                Err(P2mError::MfnIsTable { mfn })
            );
        }
        assert_eq!(mem.outstanding_frames(), frames);
        assert_eq!(all_mappings(&p2m, &mem), before);
        assert_eq!(p2m.mapped_count(), 1);
        p2m.check(&mem).unwrap();
        let root = p2m.root();
        assert_eq!(p2m.set(&mut mem, Gfn::new(4), mmio(root.raw())), Ok(None));
        p2m.check(&mem).unwrap();
    }
}

#[test]
fn p2m_host_oom_leaves_it_unchanged() {
    for levels in FORMATS {
        let (mut p2m, mut mem) = new_p2m(levels, 64);
        p2m.set(&mut mem, Gfn::new(0), ram(DATA)).unwrap();
        let frames = mem.outstanding_frames();
        let tables = p2m.table_count();
        // A frame far away needs every level below the root anew.
        let far = Gfn::new(p2m.max_gfn().raw() - 1);
        let needed = usize::from(levels.count()) - 1;
        for allowed in 0..needed {
            mem.limit_allocs(Some(allowed));
            assert_eq!(
                p2m.set(&mut mem, far, ram(DATA + 1)),
                Err(P2mError::OutOfHostMemory),
                "{levels:?} with {allowed} allocations"
            );
            assert_eq!(mem.outstanding_frames(), frames);
            assert_eq!(p2m.table_count(), tables);
            assert_eq!(p2m.lookup(&mem, far), None);
            assert_eq!(p2m.mapped_count(), 1);
            p2m.check(&mem).unwrap();
        }
        // Within an existing leaf table no allocation is needed.
        mem.limit_allocs(Some(0));
        assert_eq!(p2m.set(&mut mem, Gfn::new(1), ram(DATA + 2)), Ok(None));
        mem.limit_allocs(Some(needed));
        assert_eq!(p2m.set(&mut mem, far, ram(DATA + 1)), Ok(None));
        assert_eq!(p2m.table_count(), tables + needed);
        p2m.check(&mem).unwrap();
        mem.limit_allocs(None);
        teardown(p2m, &mut mem, 1);
    }
}

#[test]
fn p2m_bad_host_frames_are_refused() {
    // 2-level tables must be below 4 GiB; PAE and 4-level tables need not.
    let high = Mfn::new(1 << 20);
    for levels in FORMATS {
        let mut host = ScriptedHost {
            next: alloc::vec![high, Mfn::new(1)],
            ..ScriptedHost::default()
        };
        let mut p2m = P2m::new(&mut host, levels).unwrap();
        let result = p2m.set(&mut host, Gfn::new(0), ram(DATA));
        if levels == PagingLevels::Two {
            assert_eq!(result, Err(P2mError::BadHostFrame { mfn: high }));
            assert_eq!(host.freed, [high]);
            assert_eq!(p2m.table_count(), 1);
            assert_eq!(p2m.mapped_count(), 0);
        } else {
            assert_eq!(result, Err(P2mError::OutOfHostMemory));
            assert_eq!(host.freed, [high]);
        }
    }
    // A host that hands out a frame the p2m already owns: refused, and not given back.
    let mut host = ScriptedHost {
        next: alloc::vec![Mfn::new(1), Mfn::new(2), Mfn::new(1)],
        ..ScriptedHost::default()
    };
    let mut p2m = P2m::new(&mut host, PagingLevels::Four).unwrap();
    assert_eq!(
        p2m.set(&mut host, Gfn::new(0), ram(DATA)),
        Err(P2mError::BadHostFrame { mfn: Mfn::new(1) })
    );
    assert_eq!(host.freed, [Mfn::new(2)]);
    assert_eq!(p2m.table_count(), 1);
}

#[test]
fn p2m_memory_errors_leave_it_unchanged() {
    for levels in FORMATS {
        let mut mem = FlakyMem {
            inner: TestMemory::new(64),
            fail_writes: false,
        };
        let mut p2m = P2m::new(&mut mem, levels).unwrap();
        p2m.set(&mut mem, Gfn::new(7), ram(DATA)).unwrap();
        mem.fail_writes = true;
        let frames = mem.inner.outstanding_frames();
        let far = Gfn::new(p2m.max_gfn().raw() - 1);
        for gfn in [Gfn::new(7), Gfn::new(8), far] {
            assert!(matches!(
                p2m.set(&mut mem, gfn, ram(DATA + 1)),
                Err(P2mError::Memory(MemError::ReadOnly { .. }))
            ));
        }
        assert!(matches!(
            p2m.set_writable(&mut mem, Gfn::new(7), false),
            Err(P2mError::Memory(_))
        ));
        assert_eq!(mem.inner.outstanding_frames(), frames);
        assert_eq!(p2m.mapped_count(), 1);
        assert_eq!(
            p2m.lookup(&mem, Gfn::new(7)),
            Some(P2mEntry::ram(Mfn::new(DATA)))
        );
        assert_eq!(p2m.lookup(&mem, far), None);
        p2m.check(&mem).unwrap();
        mem.fail_writes = false;
        teardown(p2m, &mut mem.inner, 4);
    }
}

#[test]
fn p2m_check_and_lookup_catch_corruption() {
    for levels in FORMATS {
        let (mut p2m, mut mem) = new_p2m(levels, 64);
        p2m.set(&mut mem, Gfn::new(9), ram(DATA)).unwrap();
        let t = hw_walk(&p2m, &mut mem, 9, READ_S).unwrap();
        let leaf = *t.path.last().unwrap();
        let bytes = if levels == PagingLevels::Two { 4 } else { 8 };
        let table = leaf.addr.mfn();
        let index = (leaf.addr.offset() / bytes) as usize;

        // A flag the p2m never writes (PCD), and a zero type.
        for bad in [leaf.value | bits::PCD, leaf.value & !bits::AVAIL_LOW] {
            mem.write_entry(leaf.addr, bytes, bad).unwrap();
            let err = P2mError::MalformedEntry {
                table,
                index,
                entry: bad,
            };
            assert_eq!(p2m.check(&mem), Err(err));
            assert_eq!(p2m.try_lookup(&mem, Gfn::new(9)), Err(err));
            assert_eq!(p2m.lookup(&mem, Gfn::new(9)), None);
            assert_eq!(
                p2m.for_each_from(&mem, Gfn::new(0), 1 << 20, |_, _| {}),
                Err(err)
            );
        }
        // An entry that appeared behind the p2m's back: counts disagree.
        mem.write_entry(leaf.addr, bytes, leaf.value).unwrap();
        p2m.check(&mem).unwrap();
        let next = Maddr::new(leaf.addr.raw() + bytes);
        mem.write_entry(next, bytes, leaf.value).unwrap();
        assert!(matches!(
            p2m.check(&mem),
            Err(P2mError::Inconsistent { .. })
        ));
        // A RAM entry pointing at a table.
        let root_map = (p2m.root().raw() << 12) | (leaf.value & 0xfff);
        mem.write_entry(next, bytes, root_map).unwrap();
        assert_eq!(
            p2m.check(&mem),
            Err(P2mError::Inconsistent {
                what: "a RAM mapping points at a p2m table",
                mfn: p2m.root()
            })
        );
        mem.write_entry(next, bytes, 0).unwrap();
        // A non-leaf entry with a stray bit (PWT).
        let top = t.path.iter().next().unwrap();
        mem.write_entry(top.addr, bytes, top.value | bits::PWT)
            .unwrap();
        assert!(matches!(
            p2m.check(&mem),
            Err(P2mError::MalformedEntry { .. })
        ));
        assert!(matches!(
            p2m.try_lookup(&mem, Gfn::new(9)),
            Err(P2mError::MalformedEntry { .. })
        ));
        mem.write_entry(top.addr, bytes, top.value).unwrap();
        p2m.check(&mem).unwrap();
    }
}

#[test]
fn p2m_iteration_is_bounded_and_resumes() {
    for levels in FORMATS {
        let (mut p2m, mut mem) = new_p2m(levels, 256);
        let top = p2m.max_gfn().raw() - 1;
        let mut model = BTreeMap::new();
        let gfns = (0..40u64)
            .map(|i| i * 37)
            .chain([1023, 1024, 0x1_0000, 0x8_0001, top - 1, top]);
        for (i, gfn) in gfns.enumerate() {
            let ty = if i % 5 == 0 {
                P2mType::Mmio
            } else {
                P2mType::Ram
            };
            let e = P2mEntry::new(Mfn::new(DATA + i as u64), ty).with_writable(i % 3 != 0);
            p2m.set_entry(&mut mem, Gfn::new(gfn), Some(e)).unwrap();
            model.insert(Gfn::new(gfn), e);
        }
        assert_eq!(all_mappings(&p2m, &mem), model);

        let levels_n = usize::from(levels.count());
        for budget in [1usize, 2, 3, 7, 100, 4096] {
            let mut seen = BTreeMap::new();
            let mut next = Some(Gfn::new(0));
            let mut calls = 0;
            while let Some(start) = next {
                let view = Counting {
                    mem: &mem,
                    reads: Cell::new(0),
                };
                let mut last = None;
                next = p2m
                    .for_each_from(&view, start, budget, |gfn, e| {
                        assert!(gfn >= start && last.is_none_or(|l| gfn > l));
                        last = Some(gfn);
                        seen.insert(gfn, e);
                    })
                    .unwrap();
                // Each visit costs one read, plus at most a walk to reach it.
                assert!(
                    view.reads.get() <= budget * levels_n,
                    "{levels:?} budget {budget}"
                );
                if let Some(n) = next {
                    assert!(n > start, "no progress");
                }
                calls += 1;
                assert!(calls < 1 << 22);
            }
            assert_eq!(seen, model, "{levels:?} budget {budget}");
        }

        // Resuming in the middle visits exactly the rest.
        let middle = Gfn::new(0x1_0000);
        let mut rest = BTreeMap::new();
        let mut next = Some(middle);
        while let Some(start) = next {
            next = p2m
                .for_each_from(&mem, start, 5, |gfn, e| {
                    rest.insert(gfn, e);
                })
                .unwrap();
        }
        let expected: BTreeMap<_, _> = model.range(middle..).map(|(g, e)| (*g, *e)).collect();
        assert_eq!(rest, expected);
        assert_eq!(
            p2m.for_each_from(&mem, p2m.max_gfn(), 1, |_, _| panic!()),
            Ok(None)
        );
        assert_eq!(
            p2m.for_each_from(&mem, Gfn::new(u64::MAX), 1, |_, _| panic!()),
            Ok(None)
        );
    }
}

#[test]
fn p2m_sparse_iteration_skips_empty_subtrees() {
    let (mut p2m, mut mem) = new_p2m(PagingLevels::Four, 64);
    let top = p2m.max_gfn().raw() - 1;
    p2m.set(&mut mem, Gfn::new(0), ram(DATA)).unwrap();
    p2m.set(&mut mem, Gfn::new(top), ram(DATA + 1)).unwrap();
    let mut found = Vec::new();
    let mut calls = 0;
    let mut next = Some(Gfn::new(0));
    while let Some(start) = next {
        next = p2m
            .for_each_from(&mem, start, 64, |gfn, _| found.push(gfn))
            .unwrap();
        calls += 1;
    }
    assert_eq!(found, [Gfn::new(0), Gfn::new(top)]);
    // Two full leaf tables, two L2s and two L3s partly, and the L4: a few thousand visits.
    assert!(calls < 100, "{calls} calls");
}

#[test]
fn p2m_teardown_returns_every_frame() {
    for levels in FORMATS {
        for budget in [0, 1, 2, 1000] {
            let (mut p2m, mut mem) = new_p2m(levels, 256);
            let top = p2m.max_gfn().raw();
            for i in 0..64u64 {
                let gfn = (i * 0x9e37_79b9) % top;
                p2m.set(&mut mem, Gfn::new(gfn), ram(DATA + i)).unwrap();
            }
            p2m.check(&mem).unwrap();
            let tables = p2m.table_count();
            assert_eq!(mem.outstanding_frames(), tables as u64);
            assert!(tables > 4);
            let mut steps = 0;
            while !p2m.teardown_step(&mut mem, budget) {
                steps += 1;
                let freed = tables as u64 - mem.outstanding_frames();
                assert_eq!(freed, (steps * budget.max(1)) as u64);
                // Once teardown has started, nothing else works.
                assert!(p2m.is_torn_down());
                assert_eq!(p2m.lookup(&mem, Gfn::new(0)), None);
                assert_eq!(
                    p2m.set(&mut mem, Gfn::new(0), ram(DATA)),
                    Err(P2mError::TornDown)
                );
                assert_eq!(
                    p2m.set_writable(&mut mem, Gfn::new(0), true),
                    Err(P2mError::TornDown)
                );
                assert_eq!(
                    p2m.for_each_from(&mem, Gfn::new(0), 1, |_, _| {}),
                    Err(P2mError::TornDown)
                );
                assert_eq!(p2m.check(&mem), Err(P2mError::TornDown));
            }
            assert_eq!(mem.outstanding_frames(), 0);
            assert_eq!(p2m.mapped_count(), 0);
            assert!(p2m.teardown_step(&mut mem, budget));
            assert_eq!(mem.free_calls, tables);
        }
    }
}

#[test]
fn p2m_errors_display() {
    let errors = [
        P2mError::UnsupportedLevels {
            levels: PagingLevels::Zero,
        },
        P2mError::GfnOutOfRange { gfn: Gfn::new(1) },
        P2mError::MfnUnrepresentable { mfn: Mfn::new(1) },
        P2mError::MfnIsTable { mfn: Mfn::new(1) },
        P2mError::NotMapped { gfn: Gfn::new(1) },
        P2mError::OutOfHostMemory,
        P2mError::BadHostFrame { mfn: Mfn::new(1) },
        P2mError::TornDown,
        P2mError::Memory(MemError::Unbacked { addr: 0 }),
        P2mError::MalformedEntry {
            table: Mfn::new(1),
            index: 2,
            entry: 3,
        },
        P2mError::Inconsistent {
            what: "x",
            mfn: Mfn::new(1),
        },
    ];
    for e in errors {
        let text = alloc::format!("{e}");
        assert!(!text.is_empty());
        let _: &dyn core::error::Error = &e;
    }
}

/// Where a random operation's guest frame lies.
#[derive(Clone, Copy, Debug)]
enum GfnPick {
    /// Among the first few frames (one leaf table).
    Low(u8),
    /// Just below the top of the range.
    High(u8),
    /// Anywhere in range.
    Anywhere(u64),
    /// Out of range.
    Out(u8),
}

impl GfnPick {
    fn resolve(self, max: u64) -> u64 {
        match self {
            GfnPick::Low(k) => u64::from(k % 24),
            GfnPick::High(k) => max - 1 - u64::from(k % 8),
            GfnPick::Anywhere(x) => x % max,
            GfnPick::Out(k) => max + u64::from(k),
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum MfnPick {
    /// An ordinary data frame.
    Data(u16),
    /// One of the p2m's table frames.
    Table(u8),
    /// Beyond what the format can hold.
    Out(u8),
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Set(GfnPick, Option<(MfnPick, bool)>),
    Writable(GfnPick, bool),
    Lookup(GfnPick),
    LimitAllocs(Option<u8>),
}

fn gfn_pick() -> impl Strategy<Value = GfnPick> {
    prop_oneof![
        4 => any::<u8>().prop_map(GfnPick::Low),
        2 => any::<u8>().prop_map(GfnPick::High),
        3 => any::<u64>().prop_map(GfnPick::Anywhere),
        1 => any::<u8>().prop_map(GfnPick::Out),
    ]
}

fn mfn_pick() -> impl Strategy<Value = MfnPick> {
    prop_oneof![
        8 => any::<u16>().prop_map(MfnPick::Data),
        1 => any::<u8>().prop_map(MfnPick::Table),
        1 => any::<u8>().prop_map(MfnPick::Out),
    ]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (gfn_pick(), proptest::option::weighted(0.8, (mfn_pick(), any::<bool>())))
            .prop_map(|(g, m)| Op::Set(g, m)),
        2 => (gfn_pick(), any::<bool>()).prop_map(|(g, w)| Op::Writable(g, w)),
        2 => gfn_pick().prop_map(Op::Lookup),
        1 => proptest::option::of(0u8..3).prop_map(Op::LimitAllocs),
    ]
}

fn levels_strategy() -> impl Strategy<Value = PagingLevels> {
    prop_oneof![
        Just(PagingLevels::Two),
        Just(PagingLevels::Three),
        Just(PagingLevels::Four),
    ]
}

proptest! {
    #[test]
    fn p2m_random_ops_match_model(
        levels in levels_strategy(),
        ops in proptest::collection::vec(op_strategy(), 1..150),
        teardown_budget in 0usize..5,
    ) {
        let (mut p2m, mut mem) = new_p2m(levels, 512);
        let max_gfn = p2m.max_gfn().raw();
        let max_mfn = p2m.max_mfn().raw();
        let mut model: BTreeMap<u64, P2mEntry> = BTreeMap::new();
        for op in ops {
            let frames = mem.outstanding_frames();
            match op {
                Op::Set(g, m) => {
                    let gfn = g.resolve(max_gfn);
                    let mapping = m.map(|(pick, is_mmio)| {
                        let mfn = match pick {
                            MfnPick::Data(x) => DATA + u64::from(x),
                            MfnPick::Table(x) => {
                                let tables: Vec<Mfn> = p2m.table_frames().collect();
                                tables[usize::from(x) % tables.len()].raw()
                            }
                            MfnPick::Out(x) => max_mfn + u64::from(x),
                        };
                        let ty = if is_mmio { P2mType::Mmio } else { P2mType::Ram };
                        (Mfn::new(mfn), ty)
                    });
                    let expected_err = if gfn >= max_gfn {
                        Some(P2mError::GfnOutOfRange { gfn: Gfn::new(gfn) })
                    } else {
                        match mapping {
                            Some((mfn, _)) if mfn.raw() >= max_mfn => {
                                Some(P2mError::MfnUnrepresentable { mfn })
                            }
                            Some((mfn, P2mType::Ram)) if p2m.owns_table_frame(mfn) => {
                                Some(P2mError::MfnIsTable { mfn })
                            }
                            _ => None,
                        }
                    };
                    let result = p2m.set(&mut mem, Gfn::new(gfn), mapping);
                    match (result, expected_err) {
                        (Err(e), Some(expected)) => {
                            prop_assert_eq!(e, expected);
                            prop_assert_eq!(mem.outstanding_frames(), frames);
                        }
                        (Err(P2mError::OutOfHostMemory), None) => {
                            prop_assert!(mapping.is_some());
                            prop_assert!(!model.contains_key(&gfn));
                            prop_assert_eq!(mem.outstanding_frames(), frames);
                        }
                        (Ok(old), None) => {
                            let new = mapping.map(|(mfn, ty)| P2mEntry::new(mfn, ty));
                            let model_old = match new {
                                Some(e) => model.insert(gfn, e),
                                None => model.remove(&gfn),
                            };
                            prop_assert_eq!(old, model_old);
                            if model_old.is_some() || new.is_none() {
                                prop_assert_eq!(mem.outstanding_frames(), frames);
                            }
                        }
                        (result, expected) => {
                            prop_assert!(false, "set({:#x}) = {:?}, expected {:?}",
                                gfn, result, expected);
                        }
                    }
                }
                Op::Writable(g, writable) => {
                    let gfn = g.resolve(max_gfn);
                    let result = p2m.set_writable(&mut mem, Gfn::new(gfn), writable);
                    if gfn >= max_gfn {
                        prop_assert_eq!(result, Err(P2mError::GfnOutOfRange { gfn: Gfn::new(gfn) }));
                    } else if let Some(e) = model.get_mut(&gfn) {
                        prop_assert_eq!(result, Ok(e.writable != writable));
                        e.writable = writable;
                    } else {
                        prop_assert_eq!(result, Err(P2mError::NotMapped { gfn: Gfn::new(gfn) }));
                    }
                    prop_assert_eq!(mem.outstanding_frames(), frames);
                }
                Op::Lookup(g) => {
                    let gfn = g.resolve(max_gfn);
                    prop_assert_eq!(p2m.lookup(&mem, Gfn::new(gfn)), model.get(&gfn).copied());
                }
                Op::LimitAllocs(limit) => mem.limit_allocs(limit.map(usize::from)),
            }
            prop_assert_eq!(p2m.mapped_count(), model.len() as u64);
            prop_assert_eq!(mem.outstanding_frames(), p2m.table_count() as u64);
        }
        p2m.check(&mem).unwrap();
        let mapped: BTreeMap<u64, P2mEntry> =
            all_mappings(&p2m, &mem).into_iter().map(|(g, e)| (g.raw(), e)).collect();
        prop_assert_eq!(&mapped, &model);
        for (&gfn, &e) in &model {
            prop_assert_eq!(p2m.lookup(&mem, Gfn::new(gfn)), Some(e));
            assert_hw_agrees(&p2m, &mut mem, gfn, Some(e));
        }
        for gfn in [0, 1, max_gfn / 2, max_gfn - 1] {
            if !model.contains_key(&gfn) {
                assert_hw_agrees(&p2m, &mut mem, gfn, None);
            }
        }
        p2m.check(&mem).unwrap();
        mem.limit_allocs(None);
        teardown(p2m, &mut mem, teardown_budget);
    }
}

/// A lookup answered from the cache sees every change: a remap, a write-permission change,
/// a removal and a re-mapping, each right after the entry was cached (fails if any
/// mutator stops forgetting the frame it changes).
#[test]
fn p2m_cached_lookup_sees_every_change() {
    for levels in FORMATS {
        let (mut p2m, mut mem) = new_p2m(levels, 64);
        let g = Gfn::new(9);
        p2m.set(&mut mem, g, ram(DATA)).unwrap();
        assert_eq!(p2m.lookup(&mem, g), Some(P2mEntry::ram(Mfn::new(DATA))));
        // Cached now: a second lookup agrees without reading anything new.
        assert_eq!(p2m.lookup(&mem, g), Some(P2mEntry::ram(Mfn::new(DATA))));
        p2m.set(&mut mem, g, ram(DATA + 1)).unwrap();
        assert_eq!(p2m.lookup(&mem, g), Some(P2mEntry::ram(Mfn::new(DATA + 1))));
        assert!(p2m.set_writable(&mut mem, g, false).unwrap());
        assert_eq!(
            p2m.lookup(&mem, g),
            Some(P2mEntry::ram(Mfn::new(DATA + 1)).with_writable(false))
        );
        assert!(p2m.set_writable(&mut mem, g, true).unwrap());
        assert_eq!(p2m.lookup(&mem, g).map(|e| e.writable), Some(true));
        p2m.set(&mut mem, g, mmio(DATA + 2)).unwrap();
        assert_eq!(p2m.lookup(&mem, g).map(|e| e.ty), Some(P2mType::Mmio));
        p2m.set(&mut mem, g, None).unwrap();
        assert_eq!(p2m.lookup(&mem, g), None);
        p2m.set(&mut mem, g, ram(DATA + 3)).unwrap();
        assert_eq!(p2m.lookup(&mem, g), Some(P2mEntry::ram(Mfn::new(DATA + 3))));
        // A failed change (an unrepresentable frame) leaves the entry as it was.
        let too_big = p2m.max_mfn().raw();
        assert!(p2m.set(&mut mem, g, ram(too_big)).is_err());
        assert_eq!(p2m.lookup(&mem, g), Some(P2mEntry::ram(Mfn::new(DATA + 3))));
        p2m.check(&mem).unwrap();
        // Teardown forgets everything: nothing is answered from the cache afterwards.
        assert!(!p2m.teardown_step(&mut mem, 1) || p2m.table_count() == 0);
        assert_eq!(p2m.lookup(&mem, g), None);
        while !p2m.teardown_step(&mut mem, 4) {}
        assert_eq!(mem.outstanding_frames(), 0);
    }
}

/// Many frames sharing cache slots, remapped in rounds: every lookup agrees with a model
/// and with the uncached walk of the tables.
#[test]
fn p2m_cached_lookups_agree_with_the_tables_under_collisions() {
    for levels in FORMATS {
        let (mut p2m, mut mem) = new_p2m(levels, 256);
        let mut model = BTreeMap::new();
        let gfns: Vec<u64> = (0..1500u64).map(|i| (i * 37) % 4096).collect();
        for round in 0..4u64 {
            for (i, &g) in gfns.iter().enumerate() {
                if (i as u64 + round).is_multiple_of(3) {
                    p2m.set(&mut mem, Gfn::new(g), None).unwrap();
                    model.remove(&g);
                } else {
                    let e = P2mEntry::ram(Mfn::new(DATA + g + round))
                        .with_writable((g + round).is_multiple_of(2));
                    p2m.set_entry(&mut mem, Gfn::new(g), Some(e)).unwrap();
                    model.insert(g, e);
                }
            }
            for _ in 0..2 {
                for &g in &gfns {
                    let got = p2m.lookup(&mem, Gfn::new(g));
                    assert_eq!(got, model.get(&g).copied(), "{levels:?} gfn {g}");
                    assert_eq!(Ok(got), p2m.try_lookup(&mem, Gfn::new(g)));
                }
            }
        }
        p2m.check(&mem).unwrap();
        teardown(p2m, &mut mem, 8);
    }
}

//! A sparse test memory and a page-table builder for every paging mode.

use alloc::collections::{BTreeMap, BTreeSet};

use crate::addr::{Gpa, Gva};
use crate::paging::bits::{self, cr};
use crate::paging::{
    Access, AccessKind, AdUpdate, ControlState, CpuFeatures, FourLevel, MemError, PagingLevels,
    PagingMode, PhysMem, Privilege, ThreeLevel, Translation, TwoLevel, WalkEnv, WalkFault,
    WalkResult, load_pae_pdptes, walk,
};
use crate::paging::{Exchange, serial_compare_exchange_u32, serial_compare_exchange_u64};

/// The three modes with tables.
pub const MODES: [PagingLevels; 3] = [PagingLevels::Two, PagingLevels::Three, PagingLevels::Four];
/// The modes with 8-byte entries (and so NX and MAXPHYADDR-sized frames).
pub const WIDE_MODES: [PagingLevels; 2] = [PagingLevels::Three, PagingLevels::Four];

pub const READ_S: Access = Access::new(AccessKind::Read, Privilege::Supervisor);
pub const WRITE_S: Access = Access::new(AccessKind::Write, Privilege::Supervisor);
pub const FETCH_S: Access = Access::new(AccessKind::Fetch, Privilege::Supervisor);
pub const READ_U: Access = Access::new(AccessKind::Read, Privilege::User);
pub const WRITE_U: Access = Access::new(AccessKind::Write, Privilege::User);
pub const FETCH_U: Access = Access::new(AccessKind::Fetch, Privilege::User);
pub const READ_I: Access = Access::new(AccessKind::Read, Privilege::Implicit);
pub const WRITE_I: Access = Access::new(AccessKind::Write, Privilege::Implicit);

/// Error-code bits, short.
pub const P: u32 = crate::paging::PfErrorCode::P;
pub const W: u32 = crate::paging::PfErrorCode::W;
pub const U: u32 = crate::paging::PfErrorCode::U;
pub const RSVD: u32 = crate::paging::PfErrorCode::RSVD;
pub const I: u32 = crate::paging::PfErrorCode::I;
pub const PK: u32 = crate::paging::PfErrorCode::PK;

/// Entry flags for a fully permissive user page.
pub const URW: u64 = bits::P | bits::RW | bits::US;
/// Entry flags for a writable supervisor page.
pub const SRW: u64 = bits::P | bits::RW;

/// Sparse physical memory: 8-byte words in a map; only registered frames are backed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TestMem {
    words: BTreeMap<u64, u64>,
    frames: BTreeSet<u64>,
    /// How many writes the memory has taken.
    pub writes: usize,
}

impl TestMem {
    pub fn back_frame(&mut self, addr: u64) {
        self.frames.insert(addr >> 12);
    }
    fn check(&self, addr: u64, align: u64) -> Result<(), MemError> {
        if !addr.is_multiple_of(align) {
            return Err(MemError::Misaligned { addr });
        }
        if !self.frames.contains(&(addr >> 12)) {
            return Err(MemError::Unbacked { addr });
        }
        Ok(())
    }
    pub fn peek(&self, addr: u64) -> u64 {
        self.read_u64(Gpa::new(addr)).unwrap()
    }
    pub fn poke(&mut self, addr: u64, value: u64) {
        self.write_u64(Gpa::new(addr), value).unwrap()
    }
}

impl PhysMem<Gpa> for TestMem {
    fn read_u32(&self, addr: Gpa) -> Result<u32, MemError> {
        let a = addr.raw();
        self.check(a, 4)?;
        let word = self.words.get(&(a & !7)).copied().unwrap_or(0);
        Ok((word >> ((a & 4) * 8)) as u32)
    }
    fn read_u64(&self, addr: Gpa) -> Result<u64, MemError> {
        let a = addr.raw();
        self.check(a, 8)?;
        Ok(self.words.get(&a).copied().unwrap_or(0))
    }
    fn write_u32(&mut self, addr: Gpa, value: u32) -> Result<(), MemError> {
        let a = addr.raw();
        self.check(a, 4)?;
        let shift = (a & 4) * 8;
        let word = self.words.entry(a & !7).or_insert(0);
        *word = (*word & !(0xffff_ffffu64 << shift)) | (u64::from(value) << shift);
        self.writes += 1;
        Ok(())
    }
    fn write_u64(&mut self, addr: Gpa, value: u64) -> Result<(), MemError> {
        let a = addr.raw();
        self.check(a, 8)?;
        self.words.insert(a, value);
        self.writes += 1;
        Ok(())
    }
    // Single-threaded: nothing can write between the read and the write.
    fn compare_exchange_u32(
        &mut self,
        addr: Gpa,
        current: u32,
        new: u32,
    ) -> Result<Exchange<u32>, MemError> {
        serial_compare_exchange_u32(self, addr, current, new)
    }
    fn compare_exchange_u64(
        &mut self,
        addr: Gpa,
        current: u64,
        new: u64,
    ) -> Result<Exchange<u64>, MemError> {
        serial_compare_exchange_u64(self, addr, current, new)
    }
}

/// A guest: memory, page tables for one mode, control registers and CPU features.
#[derive(Clone, Debug)]
pub struct Guest {
    pub levels: PagingLevels,
    pub mem: TestMem,
    pub ctl: ControlState,
    pub feat: CpuFeatures,
    pub root: u64,
    next_frame: u64,
}

/// Where the builder allocates tables: well away from the data pages tests map.
const TABLES_BASE: u64 = 0x10_0000;

impl Guest {
    /// A guest with empty tables in mode `levels`: CR0.WP=1, CR4.PSE (2-level) or CR4.PAE,
    /// EFER.NXE (PAE, 4-level) and EFER.LMA (4-level); no SMEP, SMAP, PGE or PKE.
    pub fn new(levels: PagingLevels) -> Guest {
        let mut ctl = ControlState {
            cr0: cr::CR0_PE | cr::CR0_PG | cr::CR0_WP,
            ..ControlState::default()
        };
        match levels {
            PagingLevels::Two => ctl.cr4 = cr::CR4_PSE,
            PagingLevels::Three => {
                ctl.cr4 = cr::CR4_PAE;
                ctl.efer = cr::EFER_NXE;
            }
            PagingLevels::Four => {
                ctl.cr4 = cr::CR4_PAE;
                ctl.efer = cr::EFER_LME | cr::EFER_LMA | cr::EFER_NXE;
            }
            PagingLevels::Zero => {}
        }
        let mut guest = Guest {
            levels,
            mem: TestMem::default(),
            ctl,
            feat: CpuFeatures::KVM_HOST,
            root: 0,
            next_frame: TABLES_BASE,
        };
        guest.root = guest.alloc_table();
        guest.ctl.cr3 = guest.root;
        assert_eq!(guest.ctl.levels(), levels);
        guest
    }

    pub fn alloc_table(&mut self) -> u64 {
        let frame = self.next_frame;
        self.next_frame += 0x1000;
        self.mem.back_frame(frame);
        frame
    }

    pub fn entry_bytes(&self) -> u64 {
        if self.levels == PagingLevels::Two {
            4
        } else {
            8
        }
    }

    pub fn index(&self, va: u64, level: u8) -> u64 {
        (match self.levels {
            PagingLevels::Two => TwoLevel::index(va, level),
            PagingLevels::Three => ThreeLevel::index(va, level),
            _ => FourLevel::index(va, level),
        }) as u64
    }

    pub fn num_levels(&self) -> u8 {
        self.levels.count()
    }

    fn is_pdpt(&self, level: u8) -> bool {
        self.levels == PagingLevels::Three && level == 3
    }

    fn address_mask(&self) -> u64 {
        if self.levels == PagingLevels::Two {
            bits::ADDR_MASK_4
        } else {
            bits::ADDR_MASK_8
        }
    }

    /// The address of the entry at `level` that translates `va`, following present entries.
    pub fn entry_addr(&self, va: u64, level: u8) -> u64 {
        let mut table = self.root;
        for l in (level + 1..=self.num_levels()).rev() {
            let e = self
                .mem
                .read_entry(
                    Gpa::new(table + self.index(va, l) * self.entry_bytes()),
                    self.entry_bytes(),
                )
                .unwrap();
            assert!(
                e & bits::P != 0,
                "entry at level {l} for {va:#x} not present"
            );
            table = e & self.address_mask();
        }
        table + self.index(va, level) * self.entry_bytes()
    }

    pub fn entry(&self, va: u64, level: u8) -> u64 {
        let addr = self.entry_addr(va, level);
        self.mem
            .read_entry(Gpa::new(addr), self.entry_bytes())
            .unwrap()
    }

    /// Overwrites an entry; a PAE PDPTE also goes straight into the PDPTE registers,
    /// bypassing the checks of a CR3 load.
    pub fn set_entry(&mut self, va: u64, level: u8, value: u64) {
        let addr = self.entry_addr(va, level);
        let bytes = self.entry_bytes();
        self.mem.write_entry(Gpa::new(addr), bytes, value).unwrap();
        if self.is_pdpt(level) {
            self.ctl.pdptes[self.index(va, 3) as usize] = value;
        }
    }

    /// ORs `set` into an entry and clears `clear`.
    pub fn modify_entry(&mut self, va: u64, level: u8, set: u64, clear: u64) {
        let value = (self.entry(va, level) | set) & !clear;
        self.set_entry(va, level, value);
    }

    /// Maps `va` to `pa` with a leaf at `leaf_level` (1 for 4 KiB; PS is added above 1),
    /// creating missing tables whose entries get `upper` flags (a PAE PDPTE gets only P).
    pub fn map(&mut self, va: u64, leaf_level: u8, pa: u64, upper: u64, leaf: u64) {
        let bytes = self.entry_bytes();
        let mut table = self.root;
        for level in (leaf_level..=self.num_levels()).rev() {
            let addr = Gpa::new(table + self.index(va, level) * bytes);
            if level == leaf_level {
                let ps = if level > 1 { bits::PS } else { 0 };
                let value = self.encode_frame(level, pa) | leaf | ps;
                self.mem.write_entry(addr, bytes, value).unwrap();
                break;
            }
            let existing = self.mem.read_entry(addr, bytes).unwrap();
            if existing & bits::P != 0 {
                table = existing & self.address_mask();
                continue;
            }
            let next = self.alloc_table();
            let flags = if self.is_pdpt(level) { bits::P } else { upper };
            self.mem.write_entry(addr, bytes, next | flags).unwrap();
            table = next;
        }
        self.reload_pdptes();
    }

    /// Maps a 4 KiB page with the same flags at every level.
    pub fn map_4k(&mut self, va: u64, pa: u64, flags: u64) {
        self.map(va, 1, pa, flags, flags);
    }

    /// The address field of a leaf at `level` mapping `pa` (PSE-36 layout for 4 MiB pages).
    pub fn encode_frame(&self, level: u8, pa: u64) -> u64 {
        if self.levels == PagingLevels::Two && level == 2 {
            (pa & 0xffc0_0000) | (((pa >> 32) & 0xff) << 13)
        } else {
            pa
        }
    }

    /// Loads the PDPTE registers from memory, as a MOV to CR3 does (PAE only).
    pub fn reload_pdptes(&mut self) {
        if self.levels == PagingLevels::Three {
            self.ctl.pdptes = load_pae_pdptes(&self.mem, self.ctl.cr3, &self.feat).unwrap();
        }
    }

    pub fn walk_ad(&mut self, va: u64, access: Access, ad: AdUpdate) -> WalkResult<Gpa> {
        let env = WalkEnv {
            ctl: &self.ctl,
            feat: &self.feat,
            ad,
        };
        walk(&mut self.mem, env, Gva::new(va), access)
    }

    pub fn walk(&mut self, va: u64, access: Access) -> WalkResult<Gpa> {
        self.walk_ad(va, access, AdUpdate::Set)
    }

    /// Walks, asserting success.
    pub fn ok(&mut self, va: u64, access: Access) -> Translation<Gpa> {
        match self.walk(va, access) {
            Ok(t) => t,
            Err(e) => panic!("{:?}: {access:?} at {va:#x} failed: {e:?}", self.levels),
        }
    }

    /// Walks, asserting a page fault that writes nothing; returns the error-code bits.
    pub fn pf(&mut self, va: u64, access: Access) -> u32 {
        let before = self.mem.clone();
        match self.walk(va, access) {
            Ok(t) => panic!("{:?}: {access:?} at {va:#x} succeeded: {t:?}", self.levels),
            Err(e) => {
                assert_eq!(
                    self.mem, before,
                    "{:?}: a faulting walk wrote memory",
                    self.levels
                );
                match e.fault {
                    WalkFault::PageFault(code) => code.bits(),
                    other => panic!("{:?}: expected #PF, got {other:?}", self.levels),
                }
            }
        }
    }

    pub fn set_cr0(&mut self, bit: u64, on: bool) {
        set_bit(&mut self.ctl.cr0, bit, on);
    }
    pub fn set_cr4(&mut self, bit: u64, on: bool) {
        set_bit(&mut self.ctl.cr4, bit, on);
    }
    pub fn set_efer(&mut self, bit: u64, on: bool) {
        set_bit(&mut self.ctl.efer, bit, on);
    }
    pub fn set_ac(&mut self, on: bool) {
        set_bit(&mut self.ctl.rflags, cr::RFLAGS_AC, on);
    }
}

fn set_bit(reg: &mut u64, bit: u64, on: bool) {
    if on {
        *reg |= bit;
    } else {
        *reg &= !bit;
    }
}

/// A user data page used by most tests, and where it lives.
pub const VA: u64 = 0x4030_2123;
pub const PA: u64 = 0x7654_3000;
/// An address at or above 2 GiB (kernel half of a 32-bit space).
pub const HIGH_VA: u64 = 0xc012_3456;

/// A guest in mode `levels` with `VA` mapped by a 4 KiB page with `flags` at every level.
pub fn guest_with_page(levels: PagingLevels, flags: u64) -> Guest {
    let mut g = Guest::new(levels);
    g.map_4k(VA, PA, flags);
    g
}

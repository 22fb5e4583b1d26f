//! A guest that builds and edits its own page tables in any paging mode, reading them back
//! from guest memory (the tables themselves are the model: nothing is cached that a wild
//! write could make stale).

use std::collections::BTreeSet;

use shadow2::addr::{Gfn, Gpa, Gva};
use shadow2::paging::{PagingLevels, bits};

use super::rng::Rng;
use crate::sim::{GuestError, ShadowMachine};

/// One address space: where its top-level table is.
#[derive(Clone, Copy, Debug)]
pub struct Process {
    /// The CR3 value (for PAE, a 32-byte-aligned PDPT address inside a page).
    pub cr3: u64,
}

/// The guest's page-table layout for one paging mode.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub levels: PagingLevels,
    pub entry_bytes: u64,
    pub index_bits: u32,
}

impl Shape {
    pub fn of(levels: PagingLevels) -> Shape {
        match levels {
            PagingLevels::Two => Shape {
                levels,
                entry_bytes: 4,
                index_bits: 10,
            },
            _ => Shape {
                levels,
                entry_bytes: 8,
                index_bits: 9,
            },
        }
    }

    pub fn top_level(&self) -> u8 {
        self.levels.count()
    }

    pub fn shift(&self, level: u8) -> u32 {
        12 + self.index_bits * u32::from(level - 1)
    }

    pub fn index(&self, va: u64, level: u8) -> u64 {
        let entries = if self.levels == PagingLevels::Three && level == 3 {
            4
        } else {
            1u64 << self.index_bits
        };
        (va >> self.shift(level)) & (entries - 1)
    }

    pub fn addr_mask(&self) -> u64 {
        if self.entry_bytes == 4 {
            bits::ADDR_MASK_4
        } else {
            bits::ADDR_MASK_8
        }
    }
}

/// The guest: its frames, its address spaces, and its random choices.
#[derive(Debug)]
pub struct Guest {
    pub shape: Shape,
    pub ram_frames: u64,
    pub processes: Vec<Process>,
    /// Frames currently used as page tables (for the TLB-flush discipline of a correct guest).
    pub page_tables: BTreeSet<Gfn>,
    /// Frames free to become tables.
    pub free: Vec<Gfn>,
    /// Guest frames written since the last log-dirty clean, as the guest knows them.
    pub written: BTreeSet<Gfn>,
    /// Virtual addresses mapped at some point (good targets for accesses).
    pub mapped: Vec<u64>,
    pub nx: bool,
}

/// The guest frame of the kernel's code page.
pub const CODE_GFN: u64 = 0;
/// Bytes between the instructions in the code page.
pub const CODE_STRIDE: u64 = 16;

/// The instructions a kernel of this mode writes page-table entries with. Registers: the
/// entry's address in rDI; the new value in rAX (in EBX:ECX for CMPXCHG8B, in rDX for
/// CMPXCHG, whose rAX holds the expected old value; a bit number in rAX for BTR).
pub fn pte_store_forms(levels: PagingLevels) -> &'static [&'static [u8]] {
    match levels {
        PagingLevels::Four => &[
            &[0x48, 0x89, 0x07],             // mov [rdi], rax
            &[0x48, 0x87, 0x07],             // xchg [rdi], rax
            &[0xf0, 0x48, 0x0f, 0xb1, 0x17], // lock cmpxchg [rdi], rdx
            &[0xf0, 0x48, 0x09, 0x07],       // lock or [rdi], rax
            &[0xf0, 0x48, 0x0f, 0xb3, 0x07], // lock btr [rdi], rax
        ],
        PagingLevels::Three => &[
            &[0xf0, 0x0f, 0xc7, 0x0f], // lock cmpxchg8b [edi]
            &[0x89, 0x07],             // mov [edi], eax (low half)
            &[0xf0, 0x09, 0x07],       // lock or [edi], eax
        ],
        _ => &[
            &[0x89, 0x07],             // mov [edi], eax
            &[0x87, 0x07],             // xchg [edi], eax
            &[0xf0, 0x0f, 0xb1, 0x17], // lock cmpxchg [edi], edx
            &[0xf0, 0x09, 0x07],       // lock or [edi], eax
            &[0xf0, 0x0f, 0xb3, 0x07], // lock btr [edi], eax
        ],
    }
}

/// The L4 slot of the 64-bit self-map, and the linear base it gives.
pub const SELF_MAP_SLOT_4: u64 = 509;
pub const SELF_MAP_BASE_4: u64 = 0xffff_fe80_0000_0000;
/// The 32-bit self-map: L2 entry 1023 points at the L2.
pub const SELF_MAP_BASE_2: u64 = 0xffc0_0000;
/// The Windows-style PAE self-map at 0xC0000000 (the 4 PDs mapped by PDEs 0..3 of PD 3).
pub const SELF_MAP_BASE_3: u64 = 0xc000_0000;

/// Regions of linear address space the guest maps into.
pub fn regions(levels: PagingLevels) -> &'static [u64] {
    match levels {
        PagingLevels::Four => &[
            0x0000_0000_0040_0000,
            0x0000_0000_0080_0000,
            0x0000_7fff_ffe0_0000,
            0xffff_8000_0000_0000,
            0xffff_ff80_0000_0000,
        ],
        _ => &[
            0x0040_0000,
            0x0080_0000,
            0x4000_0000,
            0x8000_0000,
            0xbfc0_0000,
        ],
    }
}

impl Guest {
    pub fn new(levels: PagingLevels, ram_frames: u64, nx: bool) -> Guest {
        // Frame 0 is left alone; the rest are free.
        let free = (1..ram_frames).rev().map(Gfn::new).collect();
        Guest {
            shape: Shape::of(levels),
            ram_frames,
            processes: Vec::new(),
            page_tables: BTreeSet::new(),
            free,
            written: BTreeSet::new(),
            mapped: Vec::new(),
            nx,
        }
    }

    /// Adds frames beyond `ram_frames` to the free frames (page tables may come from them).
    pub fn give_frames(&mut self, gfns: impl IntoIterator<Item = Gfn>) {
        self.free.extend(gfns);
    }

    /// Takes a free frame and zeroes it (through the engine: it may still be shadowed).
    pub fn alloc_frame(&mut self, m: &mut ShadowMachine, rng: &mut Rng) -> Option<Gfn> {
        if self.free.is_empty() {
            return None;
        }
        let i = rng.below(self.free.len() as u64) as usize;
        let gfn = self.free.swap_remove(i);
        let zeros = [0u8; 4096];
        m.write_phys(gfn.base(), &zeros).ok()?;
        self.written.insert(gfn);
        Some(gfn)
    }

    pub fn read_entry(&self, m: &ShadowMachine, gpa: Gpa) -> u64 {
        let mut buf = [0u8; 8];
        let n = self.shape.entry_bytes as usize;
        if m.read_phys(gpa, &mut buf[..n]).is_err() {
            return 0;
        }
        u64::from_le_bytes(buf)
    }

    /// Writes a guest entry through the engine (as a kernel's write that the emulator
    /// performs, or a hypercall).
    pub fn write_entry_phys(
        &mut self,
        m: &mut ShadowMachine,
        gpa: Gpa,
        value: u64,
    ) -> Result<(), GuestError> {
        let n = self.shape.entry_bytes as usize;
        let bytes = value.to_le_bytes();
        self.written.insert(gpa.gfn());
        m.write_phys(gpa, &bytes[..n])
    }

    /// A new address space with an empty top level.
    pub fn new_process(&mut self, m: &mut ShadowMachine, rng: &mut Rng) -> Option<Process> {
        let top = self.alloc_frame(m, rng)?;
        self.page_tables.insert(top);
        let cr3 = if self.shape.levels == PagingLevels::Three {
            // A PDPT at a 32-byte aligned offset that is not the page start.
            top.base().raw() + 32 * (1 + rng.below(100))
        } else {
            top.base().raw()
        };
        let p = Process { cr3 };
        self.processes.push(p);
        // The kernel's code page, where its page-table writing instructions live.
        let (slot, _) = self.ensure_path(m, rng, &p, self.code_va(), 1)?;
        let code = CODE_GFN << 12 | bits::P | bits::A;
        self.write_entry_phys(m, slot, code).ok()?;
        Some(p)
    }

    /// Where the kernel's code page is mapped (supervisor, read-only, executable).
    pub fn code_va(&self) -> u64 {
        match self.shape.levels {
            PagingLevels::Four => 0xffff_ffff_8100_0000,
            _ => 0xd000_0000,
        }
    }

    /// Puts the page-table writing instructions of this mode into the code page, one per
    /// [`CODE_STRIDE`] bytes, and returns how many there are.
    pub fn install_code(&mut self, m: &mut ShadowMachine) -> Result<usize, GuestError> {
        let forms = pte_store_forms(self.shape.levels);
        for (i, form) in forms.iter().enumerate() {
            m.write_phys(Gpa::new((CODE_GFN << 12) + CODE_STRIDE * i as u64), form)?;
        }
        Ok(forms.len())
    }

    /// The guest-physical address of the top-level table (PDPT for PAE).
    fn top_table(&self, p: &Process) -> u64 {
        if self.shape.levels == PagingLevels::Three {
            p.cr3 & 0xffff_ffe0
        } else {
            p.cr3 & self.shape.addr_mask()
        }
    }

    /// The address of the entry at `level` for `va`, creating the tables above it. Returns
    /// the entry's guest-physical address and whether an upper-level entry was written
    /// (so the guest must flush TLBs, or for PAE reload CR3).
    pub fn ensure_path(
        &mut self,
        m: &mut ShadowMachine,
        rng: &mut Rng,
        p: &Process,
        va: u64,
        level: u8,
    ) -> Option<(Gpa, bool)> {
        let mut table = self.top_table(p);
        let mut lvl = self.shape.top_level();
        let mut changed = false;
        loop {
            let addr = Gpa::new(table + self.shape.index(va, lvl) * self.shape.entry_bytes);
            if lvl == level {
                return Some((addr, changed));
            }
            let e = self.read_entry(m, addr);
            let pdpte = self.shape.levels == PagingLevels::Three && lvl == 3;
            let is_table = e & bits::P != 0 && (pdpte || e & bits::PS == 0);
            let next = if is_table && (e & self.shape.addr_mask()) >> 12 < self.ram_frames {
                e & self.shape.addr_mask()
            } else {
                let frame = self.alloc_frame(m, rng)?;
                self.page_tables.insert(frame);
                let flags = if pdpte {
                    bits::P
                } else {
                    let mut f = bits::P | bits::RW | bits::US;
                    if rng.chance(70) {
                        f |= bits::A;
                    }
                    if rng.chance(5) {
                        f &= !bits::RW;
                    }
                    if rng.chance(5) {
                        f &= !bits::US;
                    }
                    f
                };
                self.write_entry_phys(m, addr, frame.base().raw() | flags)
                    .ok()?;
                changed = true;
                frame.base().raw()
            };
            table = next;
            lvl -= 1;
        }
    }

    /// Random leaf flags.
    pub fn random_leaf_flags(&self, rng: &mut Rng, superpage: bool) -> u64 {
        let mut f = 0;
        if rng.chance(92) {
            f |= bits::P;
        }
        if rng.chance(65) {
            f |= bits::RW;
        }
        if rng.chance(70) {
            f |= bits::US;
        }
        if rng.chance(60) {
            f |= bits::A;
        }
        if rng.chance(40) {
            f |= bits::D;
        }
        if rng.chance(10) {
            f |= bits::G;
        }
        if self.nx && self.shape.entry_bytes == 8 && rng.chance(20) {
            f |= bits::NX;
        }
        if superpage {
            f |= bits::PS;
        }
        if rng.chance(3) {
            // A reserved bit: the walk must fault RSVD.
            f |= if self.shape.entry_bytes == 8 {
                1 << 51
            } else if superpage {
                1 << 21
            } else {
                0
            };
        }
        f
    }

    /// A guest frame for a leaf: mostly RAM data, sometimes a page table (linear maps),
    /// sometimes beyond RAM (MMIO / unbacked).
    pub fn random_target(&self, rng: &mut Rng) -> u64 {
        if rng.chance(4) {
            self.ram_frames + rng.below(16)
        } else if rng.chance(8) && !self.page_tables.is_empty() {
            let i = rng.below(self.page_tables.len() as u64) as usize;
            self.page_tables.iter().nth(i).map_or(1, |g| g.raw())
        } else {
            1 + rng.below(self.ram_frames - 1)
        }
    }

    /// A linear address to use: one mapped before, or a fresh one in a region.
    pub fn random_va(&self, rng: &mut Rng) -> u64 {
        if !self.mapped.is_empty() && rng.chance(75) {
            let i = rng.below(self.mapped.len() as u64) as usize;
            return self.mapped[i] + rng.below(512) * 8;
        }
        let regions = regions(self.shape.levels);
        let base = regions[rng.below(regions.len() as u64) as usize];
        base + rng.below(2048) * 4096 + rng.below(512) * 8
    }

    /// The linear address through which the guest edits the entry for `va` at `level`,
    /// if its self-map covers it.
    pub fn self_map_va(&self, va: u64, level: u8) -> Option<Gva> {
        match self.shape.levels {
            PagingLevels::Four if level == 1 => Some(Gva::new(
                SELF_MAP_BASE_4 + (((va & 0xffff_ffff_ffff) >> 12) << 3),
            )),
            PagingLevels::Two if level == 1 => Some(Gva::new(
                SELF_MAP_BASE_2 + (((va & 0xffff_ffff) >> 12) << 2),
            )),
            PagingLevels::Three if level == 1 => Some(Gva::new(
                SELF_MAP_BASE_3 + (((va & 0xffff_ffff) >> 12) << 3),
            )),
            _ => None,
        }
    }

    /// Installs the mode's recursive self-map in a process (64-bit: an L4 slot pointing at
    /// the L4; 32-bit: L2 entry 1023; PAE: Windows-style PDEs 0..3 of PD 3 pointing at the
    /// four PDs). Returns whether anything was written.
    pub fn install_self_map(&mut self, m: &mut ShadowMachine, rng: &mut Rng, p: &Process) -> bool {
        let flags = bits::P | bits::RW | bits::A;
        match self.shape.levels {
            PagingLevels::Four => {
                let top = self.top_table(p);
                let addr = Gpa::new(top + SELF_MAP_SLOT_4 * 8);
                self.write_entry_phys(m, addr, top | flags).is_ok()
            }
            PagingLevels::Two => {
                let top = self.top_table(p);
                self.write_entry_phys(m, Gpa::new(top + 1023 * 4), top | flags)
                    .is_ok()
            }
            PagingLevels::Three => {
                let mut pds = [0u64; 4];
                for (i, pd) in pds.iter_mut().enumerate() {
                    let va = (i as u64) << 30;
                    let Some((addr, _)) = self.ensure_path(m, rng, p, va, 2) else {
                        return false;
                    };
                    *pd = addr.raw() & !0xfff;
                }
                for (i, pd) in pds.iter().enumerate() {
                    let slot = Gpa::new(pds[3] + 8 * i as u64);
                    if self.write_entry_phys(m, slot, pd | flags).is_err() {
                        return false;
                    }
                }
                true
            }
            PagingLevels::Zero => false,
        }
    }
}

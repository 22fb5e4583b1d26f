//! The address-space layout and page-table format of each guest kernel: where it maps
//! physical memory, its own code, user space, and which instructions write its entries.

use shadow2::paging::bits;

use crate::spec::{GuestModel, RunSpec};

/// How the kernel reaches an arbitrary physical frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PhysMap {
    /// Paging off: linear = physical.
    Identity,
    /// A linear map of all RAM at this base (Linux's direct map, 32-bit lowmem).
    Linear(u64),
    /// Per-vcpu mapping windows ("hyperspace"): a frame is mapped into a window slot by
    /// writing the slot's PTE (through the self-map) and invalidating it.
    Window {
        /// The linear address of slot 0.
        base: u64,
    },
}

/// One kernel layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arch {
    /// Paging levels once paging is on (2, 3 or 4).
    pub levels: u8,
    /// The kernel's map of physical memory once paging is on.
    pub phys: PhysMap,
    /// The PAE self-map's PTE base (0xC000_0000), if the kernel edits tables through one.
    pub self_map: Option<u64>,
    /// Where the kernel's code page is mapped once paging is on.
    pub code_va: u64,
    /// Where user text starts, where anonymous mappings go, where the stack is, and the end
    /// of user space.
    pub user_text: u64,
    /// Base of the anonymous-mapping area.
    pub user_mmap: u64,
    /// The user stack (top page).
    pub user_stack: u64,
    /// End of user space (exclusive).
    pub user_end: u64,
    /// Kernel mappings are global (CR4.PGE).
    pub global: bool,
    /// The NX bit exists (EFER.NXE).
    pub nx: bool,
}

/// Guest frame of the kernel image's code page (frame 0 stays unused, as real firmware
/// keeps it).
pub const CODE_GFN: u64 = 1;
/// The PAE self-map base.
pub const PAE_SELF_MAP: u64 = 0xc000_0000;
/// Where PAE PDEs appear through the self-map.
pub const PAE_SELF_MAP_PDES: u64 = 0xc060_0000;

impl Arch {
    /// The layout of a model's kernel once paging is on.
    pub fn of(spec: &RunSpec) -> Arch {
        let levels = match spec.guest {
            GuestModel::Linux64 | GuestModel::SmpBoot => 4,
            GuestModel::WindowsPae => 3,
            GuestModel::Legacy32 => 2,
            GuestModel::Boot => spec.pair.shadow,
        };
        Arch::with_levels(levels)
    }

    /// The layout of the kernel that runs with `levels` paging levels.
    pub fn with_levels(levels: u8) -> Arch {
        match levels {
            4 => Arch {
                levels: 4,
                phys: PhysMap::Linear(0xffff_8880_0000_0000),
                self_map: None,
                code_va: 0xffff_ffff_8100_0000,
                user_text: 0x0000_0000_0040_0000,
                user_mmap: 0x0000_7f00_0000_0000,
                user_stack: 0x0000_7fff_ff00_0000,
                user_end: 0x0000_8000_0000_0000,
                global: true,
                nx: true,
            },
            3 => Arch {
                levels: 3,
                phys: PhysMap::Window { base: 0x8060_0000 },
                self_map: Some(PAE_SELF_MAP),
                code_va: 0x8040_0000,
                user_text: 0x0040_0000,
                user_mmap: 0x1000_0000,
                user_stack: 0x7000_0000,
                user_end: 0x8000_0000,
                global: false,
                nx: true,
            },
            _ => Arch {
                levels: 2,
                phys: PhysMap::Linear(0xc000_0000),
                self_map: None,
                code_va: 0xc000_0000 + (CODE_GFN << 12),
                user_text: 0x0040_0000,
                user_mmap: 0x4000_0000,
                user_stack: 0xbf00_0000,
                user_end: 0xc000_0000,
                global: true,
                nx: false,
            },
        }
    }

    /// Bytes per entry.
    pub fn entry_bytes(&self) -> u64 {
        if self.levels == 2 { 4 } else { 8 }
    }

    /// Entries per table at `level` (PAE's PDPT has 4).
    pub fn entries(&self, level: u8) -> u64 {
        match (self.levels, level) {
            (2, _) => 1024,
            (3, 3) => 4,
            _ => 512,
        }
    }

    /// The shift of the region one entry at `level` covers.
    pub fn shift(&self, level: u8) -> u32 {
        let bits_per = if self.levels == 2 { 10 } else { 9 };
        12 + bits_per * u32::from(level - 1)
    }

    /// The index of `va` in its table at `level`.
    pub fn index(&self, va: u64, level: u8) -> u64 {
        (va >> self.shift(level)) & (self.entries(level) - 1)
    }

    /// The frame an entry points at.
    pub fn entry_gfn(&self, e: u64) -> u64 {
        let mask = if self.levels == 2 {
            bits::ADDR_MASK_4
        } else {
            bits::ADDR_MASK_8
        };
        (e & mask) >> 12
    }

    /// A leaf entry for a user page.
    pub fn user_pte(&self, gfn: u64, writable: bool, exec: bool) -> u64 {
        let mut e = (gfn << 12) | bits::P | bits::US;
        if writable {
            e |= bits::RW;
        }
        if !exec && self.nx {
            e |= bits::NX;
        }
        e
    }

    /// A non-leaf entry for a user page table.
    pub fn user_table_entry(&self, gfn: u64) -> u64 {
        (gfn << 12) | bits::P | bits::RW | bits::US | bits::A
    }

    /// A kernel entry (global if the kernel uses global pages).
    pub fn kernel_entry(&self, gfn: u64, writable: bool, exec: bool, leaf: bool) -> u64 {
        let mut e = (gfn << 12) | bits::P | bits::A;
        if writable {
            e |= bits::RW | if leaf { bits::D } else { 0 };
        }
        if leaf && self.global {
            e |= bits::G;
        }
        if leaf && !exec && self.nx {
            e |= bits::NX;
        }
        e
    }

    /// The first user-half entry of the top-level table, and the first kernel-half one
    /// (entries from there up are shared with the kernel's reference table).
    pub fn kernel_top_first(&self) -> u64 {
        match self.levels {
            4 => 256,
            3 => 2,
            _ => 768,
        }
    }
}

//! Shared helpers for the engine integration tests (`engine_*.rs`, each includes this file
//! as `mod engine_support;`): a machine with RAM, a guest that builds its page tables in
//! its own memory in any paging mode, and the checks every step needs (the auditor clean,
//! no oracle mismatch). Compiled on its own too, as a test crate without tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use shadow2::addr::{Gfn, Gpa, Gva, Maddr, Mfn};
use shadow2::audit::audit;
use shadow2::domain::DomainConfig;
use shadow2::host::MachineMemory;
use shadow2::multi::Pair;
use shadow2::paging::{ControlState, PagingLevels, PhysMem, Privilege, bits, bits::cr};
use shadow2::types::ShadowKind;
use shadow2_machine::sim::{GuestError, ShadowMachine};

/// Every pair in which the guest pages (32-bit, PAE and 64-bit guests on every shadow mode
/// that can run them).
pub const PAGING_PAIRS: [Pair; 6] = [
    Pair::P2on2,
    Pair::P2on3,
    Pair::P3on3,
    Pair::P2on4,
    Pair::P3on4,
    Pair::P4on4,
];

/// Machine frames of every test machine.
pub const MACHINE_FRAMES: u64 = 1 << 15;
pub const SUP: Privilege = Privilege::Supervisor;
pub const USR: Privilege = Privilege::User;
/// Flags of an upper-level guest entry: present, writable, user, already accessed (so no
/// walk ever writes it).
pub const TABLE: u64 = bits::P | bits::RW | bits::US | bits::A;
/// Flags of a data leaf whose A and D are already set (no walk writes it).
pub const DATA: u64 = bits::P | bits::RW | bits::US | bits::A | bits::D;

/// A translated, external domain on `shadow`-level shadows.
pub fn hvm(shadow: PagingLevels, vcpus: usize, pool: usize) -> DomainConfig {
    DomainConfig::hvm(shadow, vcpus, pool)
}

/// A machine running a domain with `config`, guest frames `0..ram` backed by RAM.
pub fn machine(config: DomainConfig, ram: u64) -> ShadowMachine {
    let mut m = ShadowMachine::new(MACHINE_FRAMES, config).expect("a new domain");
    if ram > 0 {
        m.add_ram(Gfn::new(0), ram).expect("RAM");
    }
    m
}

/// The auditor is clean and the oracle saw no mismatch.
#[track_caller]
pub fn check(m: &ShadowMachine) {
    let report = audit(m.domain());
    assert!(
        report.is_clean(),
        "audit violations: {:?}",
        report.violations
    );
    let (n, first) = m.mismatches();
    assert_eq!(n, 0, "oracle mismatches: {first:?}");
    assert_eq!(m.domain().failure(), None, "the domain failed");
}

/// The guest control state for paging mode `levels` with `cr3`: CR0.WP set, CR4.PSE for
/// 32-bit paging, EFER.NXE for PAE and 4-level paging.
pub fn control(levels: PagingLevels, cr3: u64) -> ControlState {
    let mut ctl = ControlState {
        cr0: cr::CR0_PE | cr::CR0_PG | cr::CR0_WP,
        cr3,
        ..ControlState::default()
    };
    match levels {
        PagingLevels::Zero => {
            ctl.cr0 = cr::CR0_PE;
            ctl.cr3 = 0;
        }
        PagingLevels::Two => ctl.cr4 = cr::CR4_PSE,
        PagingLevels::Three => {
            ctl.cr4 = cr::CR4_PAE;
            ctl.efer = cr::EFER_NXE;
        }
        PagingLevels::Four => {
            ctl.cr4 = cr::CR4_PAE;
            ctl.efer = cr::EFER_LME | cr::EFER_LMA | cr::EFER_NXE;
        }
    }
    ctl
}

/// Turns paging mode `levels` on (or off) on vcpu `v` with `cr3`.
#[track_caller]
pub fn set_mode(m: &mut ShadowMachine, v: usize, levels: PagingLevels, cr3: u64) {
    m.set_paging(v, control(levels, cr3)).expect("mode change");
    check(m);
}

/// Reads the 8 bytes at `va`.
pub fn read_u64(m: &mut ShadowMachine, v: usize, va: u64) -> Result<u64, GuestError> {
    let mut buf = [0u8; 8];
    m.read(v, Gva::new(va), SUP, &mut buf)?;
    Ok(u64::from_le_bytes(buf))
}

/// Writes the 8 bytes at `va`.
pub fn write_u64(m: &mut ShadowMachine, v: usize, va: u64, value: u64) -> Result<(), GuestError> {
    m.write(v, Gva::new(va), SUP, &value.to_le_bytes())
}

/// Reads guest-physical memory (8 bytes).
pub fn phys_u64(m: &ShadowMachine, gpa: u64) -> u64 {
    let mut buf = [0u8; 8];
    m.read_phys(Gpa::new(gpa), &mut buf).expect("guest RAM");
    u64::from_le_bytes(buf)
}

/// Reads machine memory (8 bytes).
pub fn machine_u64(m: &ShadowMachine, maddr: u64) -> u64 {
    m.domain()
        .host()
        .read_u64(Maddr::new(maddr))
        .expect("machine memory")
}

/// Writes machine memory behind the engine's back (8 bytes).
pub fn poke_machine(m: &mut ShadowMachine, maddr: u64, value: u64) {
    m.domain_mut()
        .host_mut()
        .write_u64(Maddr::new(maddr), value)
        .expect("machine memory");
}

/// The machine frame behind a guest frame of RAM.
pub fn mfn_of(m: &ShadowMachine, gfn: u64) -> Mfn {
    m.ram_frame(Gfn::new(gfn)).expect("a RAM frame")
}

/// A fresh machine frame from the host (not given to the guest).
pub fn host_frame(m: &mut ShadowMachine) -> Mfn {
    m.domain_mut()
        .host_mut()
        .alloc_block(0)
        .expect("a free frame")
}

/// The shadow-entry width of the domain.
pub fn sentry_bytes(m: &ShadowMachine) -> u64 {
    if m.domain().config().shadow_levels == PagingLevels::Two {
        4
    } else {
        8
    }
}

/// Every present, non-magic shadow leaf entry (in L1 shadows and splinters) that maps
/// machine frame `target`: (slot address, entry).
pub fn leaf_mappings_of(m: &ShadowMachine, target: Mfn) -> Vec<(u64, u64)> {
    let width = sentry_bytes(m);
    let mask = if width == 4 {
        bits::ADDR_MASK_4
    } else {
        bits::ADDR_MASK_8
    };
    let d = m.domain();
    let mut found = Vec::new();
    for (head, info) in d.shadows().shadows() {
        if !info.key.kind.is_leaf_table() {
            continue;
        }
        let bytes = 4096u64 << info.order;
        let mut off = 0;
        while off < bytes {
            let slot = head.base().raw() + off;
            let e = d.host().read_entry(Maddr::new(slot), width).unwrap();
            let magic = width == 8 && e & (1 << 51) != 0;
            if e & bits::P != 0 && !magic && (e & mask) >> 12 == target.raw() {
                found.push((slot, e));
            }
            off += width;
        }
    }
    found
}

/// The kinds of the hashed shadows of guest frame `gfn`.
pub fn kinds_of(m: &ShadowMachine, gfn: u64) -> Vec<ShadowKind> {
    let mfn = mfn_of(m, gfn);
    m.domain()
        .shadows()
        .of_frame(mfn)
        .map(|(k, _)| k.kind)
        .collect()
}

/// A guest that builds page tables in its own memory. Frames come from a list (HVM:
/// guest frames; PV: machine frames the domain owns); every entry is written through the
/// engine (`write_phys`), as a hypercall or an emulated write would.
#[derive(Debug)]
pub struct Tables {
    pub levels: PagingLevels,
    free: Vec<u64>,
}

impl Tables {
    /// A guest in mode `levels` taking its table frames from `first..limit`.
    pub fn new(levels: PagingLevels, first: u64, limit: u64) -> Tables {
        Tables {
            levels,
            free: (first..limit).rev().collect(),
        }
    }

    /// A guest taking its table frames from `frames` (in that order).
    pub fn with_frames(levels: PagingLevels, frames: &[u64]) -> Tables {
        Tables {
            levels,
            free: frames.iter().rev().copied().collect(),
        }
    }

    /// A free frame (zero: fresh RAM is zero-filled and frames are never reused).
    pub fn alloc(&mut self) -> u64 {
        self.free.pop().expect("the guest ran out of frames")
    }

    /// A new address space: its CR3 value. A PAE PDPT sits at byte `pdpt_offset` of its
    /// page (a multiple of 32; ignored in other modes).
    pub fn new_root(&mut self, pdpt_offset: u64) -> u64 {
        let frame = self.alloc() << 12;
        if self.levels == PagingLevels::Three {
            frame + pdpt_offset
        } else {
            frame
        }
    }

    pub fn entry_bytes(&self) -> u64 {
        if self.levels == PagingLevels::Two {
            4
        } else {
            8
        }
    }

    fn shift(&self, level: u8) -> u32 {
        if self.levels == PagingLevels::Two {
            12 + 10 * u32::from(level - 1)
        } else {
            12 + 9 * u32::from(level - 1)
        }
    }

    fn index(&self, va: u64, level: u8) -> u64 {
        let entries = match (self.levels, level) {
            (PagingLevels::Two, _) => 1024,
            (PagingLevels::Three, 3) => 4,
            _ => 512,
        };
        (va >> self.shift(level)) & (entries - 1)
    }

    fn mask(&self) -> u64 {
        if self.levels == PagingLevels::Two {
            bits::ADDR_MASK_4
        } else {
            bits::ADDR_MASK_8
        }
    }

    fn top(&self, cr3: u64) -> u64 {
        match self.levels {
            PagingLevels::Three => cr3 & 0xffff_ffe0,
            _ => cr3 & self.mask(),
        }
    }

    /// Reads a guest entry.
    pub fn read(&self, m: &ShadowMachine, gpa: u64) -> u64 {
        let mut buf = [0u8; 8];
        let n = self.entry_bytes() as usize;
        m.read_phys(Gpa::new(gpa), &mut buf[..n])
            .expect("guest RAM");
        u64::from_le_bytes(buf)
    }

    /// Writes a guest entry through the engine.
    #[track_caller]
    pub fn write(&self, m: &mut ShadowMachine, gpa: u64, value: u64) {
        let n = self.entry_bytes() as usize;
        m.write_phys(Gpa::new(gpa), &value.to_le_bytes()[..n])
            .expect("a guest page-table write");
    }

    /// The guest-physical address of the entry for `va` at `level` in the address space
    /// `cr3`, creating the tables above it (entries with `TABLE` flags, PDPTEs with P).
    pub fn slot(&mut self, m: &mut ShadowMachine, cr3: u64, va: u64, level: u8) -> u64 {
        let mut table = self.top(cr3);
        let mut lvl = self.levels.count();
        loop {
            let addr = table + self.index(va, lvl) * self.entry_bytes();
            if lvl == level {
                return addr;
            }
            let e = self.read(m, addr);
            table = if e & bits::P != 0 {
                e & self.mask()
            } else {
                let frame = self.alloc() << 12;
                let pdpte = self.levels == PagingLevels::Three && lvl == 3;
                let flags = if pdpte { bits::P } else { TABLE };
                self.write(m, addr, frame | flags);
                frame
            };
            lvl -= 1;
        }
    }

    /// Maps the 4 KiB page at `va` to guest frame `gfn` with leaf `flags`; returns the
    /// address of the leaf entry.
    pub fn map(&mut self, m: &mut ShadowMachine, cr3: u64, va: u64, gfn: u64, flags: u64) -> u64 {
        let slot = self.slot(m, cr3, va, 1);
        self.write(m, slot, (gfn << 12) | flags);
        slot
    }

    /// The guest frame of the table holding the entry for `va` at `level` (creating it).
    pub fn table_of(&mut self, m: &mut ShadowMachine, cr3: u64, va: u64, level: u8) -> u64 {
        self.slot(m, cr3, va, level) >> 12
    }
}

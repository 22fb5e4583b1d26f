//! Helpers of the `emulate_ops` benchmark, copied (trimmed) from
//! `crates/machine/tests/engine_support.rs` (a bench cannot include test helpers): a
//! [`ShadowMachine`] with RAM, and a guest that builds its page tables in its own memory.
#![allow(dead_code)]

use shadow2::addr::{Gfn, Gpa, Gva, Mfn};
use shadow2::audit::audit;
use shadow2::domain::DomainConfig;
use shadow2::paging::{ControlState, Privilege, bits, bits::cr};
use shadow2_machine::sim::{GuestError, ShadowMachine};

/// Machine frames of every benchmark machine.
pub const MACHINE_FRAMES: u64 = 1 << 15;
pub const SUP: Privilege = Privilege::Supervisor;
/// Flags of an upper-level guest entry: present, writable, user, already accessed.
pub const TABLE: u64 = bits::P | bits::RW | bits::US | bits::A;
/// Flags of a data leaf whose A and D are already set.
pub const DATA: u64 = bits::P | bits::RW | bits::US | bits::A | bits::D;

/// A machine running a domain with `config`, guest frames `0..ram` backed by RAM.
pub fn machine(config: DomainConfig, ram: u64) -> ShadowMachine {
    let mut m = ShadowMachine::new(MACHINE_FRAMES, config).expect("a new domain");
    m.add_ram(Gfn::new(0), ram).expect("RAM");
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

/// 4-level paging with `cr3`, CR0.WP and EFER.NXE set.
pub fn control4(cr3: u64) -> ControlState {
    ControlState {
        cr0: cr::CR0_PE | cr::CR0_PG | cr::CR0_WP,
        cr3,
        cr4: cr::CR4_PAE,
        efer: cr::EFER_LME | cr::EFER_LMA | cr::EFER_NXE,
        ..ControlState::default()
    }
}

/// Turns 4-level paging on on vcpu `v` with `cr3`.
#[track_caller]
pub fn set_mode4(m: &mut ShadowMachine, v: usize, cr3: u64) {
    m.set_paging(v, control4(cr3)).expect("mode change");
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

/// The machine frame behind a guest frame of RAM.
pub fn mfn_of(m: &ShadowMachine, gfn: u64) -> Mfn {
    m.ram_frame(Gfn::new(gfn)).expect("a RAM frame")
}

/// The number of L1 (leaf-table) shadows in the domain's pool.
pub fn l1_shadows(m: &ShadowMachine) -> usize {
    m.domain()
        .shadows()
        .shadows()
        .filter(|(_, i)| i.key.kind.is_leaf_table())
        .count()
}

/// A 4-level guest that builds page tables in its own memory, taking table frames from a
/// list; every entry is written through the engine (`write_phys`).
#[derive(Debug)]
pub struct Tables {
    free: Vec<u64>,
}

impl Tables {
    /// A guest taking its table frames from `frames` (in that order).
    pub fn with_frames(frames: impl IntoIterator<Item = u64>) -> Tables {
        let mut free: Vec<u64> = frames.into_iter().collect();
        free.reverse();
        Tables { free }
    }

    /// A free frame (zero: fresh RAM is zero-filled and frames are never reused).
    pub fn alloc(&mut self) -> u64 {
        self.free.pop().expect("the guest ran out of frames")
    }

    /// A new address space: its CR3 value.
    pub fn new_root(&mut self) -> u64 {
        self.alloc() << 12
    }

    fn index(va: u64, level: u8) -> u64 {
        (va >> (12 + 9 * u32::from(level - 1))) & 511
    }

    /// Reads a guest entry.
    pub fn read(&self, m: &ShadowMachine, gpa: u64) -> u64 {
        let mut buf = [0u8; 8];
        m.read_phys(Gpa::new(gpa), &mut buf).expect("guest RAM");
        u64::from_le_bytes(buf)
    }

    /// Writes a guest entry through the engine.
    #[track_caller]
    pub fn write(&self, m: &mut ShadowMachine, gpa: u64, value: u64) {
        m.write_phys(Gpa::new(gpa), &value.to_le_bytes())
            .expect("a guest page-table write");
    }

    /// The guest-physical address of the entry for `va` at `level` in the address space
    /// `cr3`, creating the tables above it.
    pub fn slot(&mut self, m: &mut ShadowMachine, cr3: u64, va: u64, level: u8) -> u64 {
        let mut table = cr3 & bits::ADDR_MASK_8;
        let mut lvl = 4;
        loop {
            let addr = table + Self::index(va, lvl) * 8;
            if lvl == level {
                return addr;
            }
            let e = self.read(m, addr);
            table = if e & bits::P != 0 {
                e & bits::ADDR_MASK_8
            } else {
                let frame = self.alloc() << 12;
                self.write(m, addr, frame | TABLE);
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

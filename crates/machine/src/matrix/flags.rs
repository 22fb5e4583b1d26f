//! The vocabulary of a matrix case: paging modes, entry flags, CPU state and accesses, each
//! with a short printable form for mismatch reports.

use core::fmt;

use serde::Serialize;
use shadow2::paging::bits::cr;
use shadow2::paging::{Access, AccessKind, ControlState, CpuFeatures, PagingLevels, Privilege};

/// A paging mode the matrix covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum MatrixMode {
    /// 32-bit paging: 4-byte entries, 4 MiB pages with CR4.PSE, PSE-36.
    TwoLevel,
    /// PAE paging.
    Pae,
    /// 4-level paging.
    FourLevel,
}

impl MatrixMode {
    /// Every mode, in report order.
    pub const ALL: [MatrixMode; 3] = [MatrixMode::TwoLevel, MatrixMode::Pae, MatrixMode::FourLevel];

    /// The architectural mode.
    pub const fn levels(self) -> PagingLevels {
        match self {
            MatrixMode::TwoLevel => PagingLevels::Two,
            MatrixMode::Pae => PagingLevels::Three,
            MatrixMode::FourLevel => PagingLevels::Four,
        }
    }

    /// A short name: "2-level", "PAE", "4-level".
    pub const fn name(self) -> &'static str {
        match self {
            MatrixMode::TwoLevel => "2-level",
            MatrixMode::Pae => "PAE",
            MatrixMode::FourLevel => "4-level",
        }
    }

    /// Whether entries are 8 bytes wide (and so have XD and high address bits).
    pub const fn wide(self) -> bool {
        !matches!(self, MatrixMode::TwoLevel)
    }

    /// The mode with this many levels (2, 3 or 4).
    pub const fn from_levels(n: u8) -> Option<MatrixMode> {
        match n {
            2 => Some(MatrixMode::TwoLevel),
            3 => Some(MatrixMode::Pae),
            4 => Some(MatrixMode::FourLevel),
            _ => None,
        }
    }
}

impl fmt::Display for MatrixMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The flags the matrix varies in one entry, as a small bit set. The high-address flags
/// name *physical-address* bits where that differs from the entry bit: in a 2-level 4 MiB
/// PDE, [`EntryFlags::BIT36`] is entry bit 17 (PSE-36) and [`EntryFlags::BIT13`] is entry
/// bit 13 (physical bit 32).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EntryFlags(pub u16);

impl EntryFlags {
    /// Present.
    pub const P: u16 = 1 << 0;
    /// Writable.
    pub const W: u16 = 1 << 1;
    /// User.
    pub const U: u16 = 1 << 2;
    /// Accessed.
    pub const A: u16 = 1 << 3;
    /// Dirty.
    pub const D: u16 = 1 << 4;
    /// Page size.
    pub const PS: u16 = 1 << 5;
    /// Execute-disable.
    pub const NX: u16 = 1 << 6;
    /// Entry bit 51 (8-byte entries).
    pub const BIT51: u16 = 1 << 7;
    /// Physical-address bit 36.
    pub const BIT36: u16 = 1 << 8;
    /// Entry bit 13 of a large page.
    pub const BIT13: u16 = 1 << 9;
    /// Entry bit 21 of a 4 MiB PDE (always reserved).
    pub const BIT21: u16 = 1 << 10;

    const NAMES: [(u16, &'static str); 11] = [
        (Self::P, "p"),
        (Self::W, "w"),
        (Self::U, "u"),
        (Self::A, "a"),
        (Self::D, "d"),
        (Self::PS, "ps"),
        (Self::NX, "nx"),
        (Self::BIT51, "b51"),
        (Self::BIT36, "pa36"),
        (Self::BIT13, "b13"),
        (Self::BIT21, "b21"),
    ];

    /// Whether every flag of `mask` is set.
    pub const fn has(self, mask: u16) -> bool {
        self.0 & mask == mask
    }
    /// Whether no flag is set.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Display for EntryFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (bit, name) in Self::NAMES {
            if self.0 & bit != 0 {
                if !first {
                    f.write_str("|")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        if first {
            f.write_str("0")?;
        }
        Ok(())
    }
}

/// The CPU state of a case.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CpuFlags {
    /// MAXPHYADDR.
    pub maxphyaddr: u8,
    /// IA32_EFER.NXE
    pub nxe: bool,
    /// CR0.WP
    pub wp: bool,
    /// CR4.PSE (matters in 2-level paging only)
    pub pse: bool,
    /// CR4.SMEP
    pub smep: bool,
    /// CR4.SMAP
    pub smap: bool,
    /// RFLAGS.AC
    pub ac: bool,
    /// CR4.PKE
    pub pke: bool,
    /// PKRU.AD for key 1
    pub pkru_ad: bool,
    /// PKRU.WD for key 1
    pub pkru_wd: bool,
}

/// PKRU with the access- and write-disable bits of key `key` set.
const fn pkru_deny(key: u32) -> u32 {
    0b11 << (2 * key)
}

impl CpuFlags {
    /// Whether none of SMEP, SMAP or PKE is on (the "core" state of the enumeration).
    pub const fn is_core(&self) -> bool {
        !self.smep && !self.smap && !self.pke
    }

    /// The CPU features.
    pub fn features(&self) -> CpuFeatures {
        CpuFeatures {
            maxphyaddr: self.maxphyaddr,
            pdpe1gb: false,
            nx: true,
        }
    }

    /// Control registers for `mode` (CR3 and the PDPTE registers left zero).
    pub fn control(&self, mode: MatrixMode) -> ControlState {
        let mut ctl = ControlState {
            cr0: cr::CR0_PE | cr::CR0_PG,
            ..ControlState::default()
        };
        let set = |on: bool, bit: u64| if on { bit } else { 0 };
        ctl.cr0 |= set(self.wp, cr::CR0_WP);
        ctl.cr4 |= set(self.pse, cr::CR4_PSE)
            | set(self.smep, cr::CR4_SMEP)
            | set(self.smap, cr::CR4_SMAP)
            | set(self.pke, cr::CR4_PKE)
            | set(mode.wide(), cr::CR4_PAE);
        ctl.efer |= set(self.nxe, cr::EFER_NXE)
            | set(mode == MatrixMode::FourLevel, cr::EFER_LME | cr::EFER_LMA);
        ctl.rflags = set(self.ac, cr::RFLAGS_AC);
        ctl.pkru = if self.pke {
            // Key 0 open, key 1 as the case says, key 2 (only ever in a non-leaf entry, where
            // keys mean nothing) fully closed, so a walker using it would fault.
            let ad = if self.pkru_ad { 0b01 << 2 } else { 0 };
            let wd = if self.pkru_wd { 0b10 << 2 } else { 0 };
            ad | wd | pkru_deny(2)
        } else {
            // Every key but 0 closed: with CR4.PKE=0 nothing of this may matter.
            !pkru_deny(0)
        };
        ctl
    }
}

impl fmt::Display for CpuFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "maxphyaddr={}", self.maxphyaddr)?;
        for (on, name) in [
            (self.nxe, "efer.nx"),
            (self.wp, "cr0.wp"),
            (self.pse, "cr4.pse"),
            (self.smep, "cr4.smep"),
            (self.smap, "cr4.smap"),
            (self.ac, "rflags.ac"),
            (self.pke, "cr4.pke"),
            (self.pkru_ad, "pkru.ad1"),
            (self.pkru_wd, "pkru.wd1"),
        ] {
            if on {
                write!(f, " {name}")?;
            }
        }
        Ok(())
    }
}

/// An access, optionally preceded by a supervisor read of the same address ("twice": the
/// second access sees the A bits the first one set).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AccessSpec {
    /// The access checked.
    pub access: Access,
    /// Whether a supervisor read comes first.
    pub twice: bool,
}

impl AccessSpec {
    /// The read done first in a "twice" case.
    pub const WARM_UP: Access = Access::new(AccessKind::Read, Privilege::Supervisor);

    /// Every access the matrix makes: read, write, fetch by user and supervisor, implicit
    /// supervisor reads and writes (implicit accesses are never fetches), each once and twice.
    pub const ALL: [AccessSpec; 16] = {
        let base = [
            Access::new(AccessKind::Read, Privilege::User),
            Access::new(AccessKind::Write, Privilege::User),
            Access::new(AccessKind::Fetch, Privilege::User),
            Access::new(AccessKind::Read, Privilege::Supervisor),
            Access::new(AccessKind::Write, Privilege::Supervisor),
            Access::new(AccessKind::Fetch, Privilege::Supervisor),
            Access::new(AccessKind::Read, Privilege::Implicit),
            Access::new(AccessKind::Write, Privilege::Implicit),
        ];
        let mut all = [AccessSpec {
            access: base[0],
            twice: false,
        }; 16];
        let mut i = 0;
        while i < 16 {
            all[i] = AccessSpec {
                access: base[i % 8],
                twice: i >= 8,
            };
            i += 1;
        }
        all
    };
}

impl fmt::Display for AccessSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", access_name(self.access))?;
        if self.twice {
            f.write_str(" twice")?;
        }
        Ok(())
    }
}

/// "user write", "supervisor fetch", "implicit read", ...
pub fn access_name(access: Access) -> String {
    let who = match access.privilege {
        Privilege::User => "user",
        Privilege::Supervisor => "supervisor",
        Privilege::Implicit => "implicit",
    };
    let what = match access.kind {
        AccessKind::Read => "read",
        AccessKind::Write => "write",
        AccessKind::Fetch => "fetch",
    };
    format!("{who} {what}")
}

//! The CPU state a page walk depends on: features of the (virtual) CPU, control registers,
//! the kind of access, and the page-fault error code.

use super::bits::cr;

/// Paging features of a (virtual) CPU: what CPUID would say.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CpuFeatures {
    /// MAXPHYADDR: physical-address width, 32..=52.
    pub maxphyaddr: u8,
    /// 1 GiB pages in 4-level paging (CPUID.80000001H:EDX.Page1GB).
    pub pdpe1gb: bool,
    /// Execute-disable is available (EFER.NXE may be set).
    pub nx: bool,
}

impl CpuFeatures {
    /// A CPU like the project's KVM hosts: MAXPHYADDR 48, NX, no 1 GiB pages.
    pub const KVM_HOST: CpuFeatures = CpuFeatures {
        maxphyaddr: 48,
        pdpe1gb: false,
        nx: true,
    };
    /// A modern CPU: MAXPHYADDR 46, NX, 1 GiB pages.
    pub const MODERN: CpuFeatures = CpuFeatures {
        maxphyaddr: 46,
        pdpe1gb: true,
        nx: true,
    };

    /// These features with MAXPHYADDR clamped to the architectural range 32..=52.
    pub fn clamped(self) -> CpuFeatures {
        CpuFeatures {
            maxphyaddr: self.maxphyaddr.clamp(32, 52),
            ..self
        }
    }

    /// Mask of physical-address bits above MAXPHYADDR, up to bit 51: reserved in 8-byte
    /// entries of 4-level paging (and, together with bits 62:52, of PAE paging).
    pub fn above_maxphyaddr_mask(self) -> u64 {
        let m = u32::from(self.clamped().maxphyaddr);
        if m >= 52 {
            0
        } else {
            ((1u64 << 52) - 1) & !((1u64 << m) - 1)
        }
    }
}

impl Default for CpuFeatures {
    fn default() -> Self {
        CpuFeatures::KVM_HOST
    }
}

/// The paging mode selected by CR0.PG, CR4.PAE and EFER.LMA (SDM 4.1.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PagingLevels {
    /// Paging disabled: linear addresses are physical addresses ("0-level").
    Zero,
    /// 32-bit paging ("2-level").
    Two,
    /// PAE paging ("3-level").
    Three,
    /// 4-level paging.
    Four,
}

impl PagingLevels {
    /// The number of levels: 0, 2, 3 or 4.
    pub const fn count(self) -> u8 {
        match self {
            PagingLevels::Zero => 0,
            PagingLevels::Two => 2,
            PagingLevels::Three => 3,
            PagingLevels::Four => 4,
        }
    }

    /// The mode with this many levels, if any.
    pub const fn from_count(n: u8) -> Option<PagingLevels> {
        match n {
            0 => Some(PagingLevels::Zero),
            2 => Some(PagingLevels::Two),
            3 => Some(PagingLevels::Three),
            4 => Some(PagingLevels::Four),
            _ => None,
        }
    }
}

/// Control registers and flags that a page walk reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ControlState {
    /// CR0
    pub cr0: u64,
    /// CR3
    pub cr3: u64,
    /// CR4
    pub cr4: u64,
    /// IA32_EFER
    pub efer: u64,
    /// RFLAGS (only AC matters to paging)
    pub rflags: u64,
    /// PKRU (protection keys for user pages)
    pub pkru: u32,
    /// The four PAE PDPTEs, loaded from memory when CR3 was loaded in PAE mode
    /// (SDM 4.4.1): the PAE walker uses these, never memory.
    pub pdptes: [u64; 4],
}

impl ControlState {
    /// The paging mode these registers select.
    pub fn levels(&self) -> PagingLevels {
        if self.cr0 & cr::CR0_PG == 0 {
            PagingLevels::Zero
        } else if self.cr4 & cr::CR4_PAE == 0 {
            PagingLevels::Two
        } else if self.efer & cr::EFER_LMA == 0 {
            PagingLevels::Three
        } else {
            PagingLevels::Four
        }
    }
    /// CR0.WP
    pub fn wp(&self) -> bool {
        self.cr0 & cr::CR0_WP != 0
    }
    /// CR4.PSE
    pub fn pse(&self) -> bool {
        self.cr4 & cr::CR4_PSE != 0
    }
    /// CR4.PGE
    pub fn pge(&self) -> bool {
        self.cr4 & cr::CR4_PGE != 0
    }
    /// CR4.SMEP
    pub fn smep(&self) -> bool {
        self.cr4 & cr::CR4_SMEP != 0
    }
    /// CR4.SMAP
    pub fn smap(&self) -> bool {
        self.cr4 & cr::CR4_SMAP != 0
    }
    /// CR4.PKE
    pub fn pke(&self) -> bool {
        self.cr4 & cr::CR4_PKE != 0
    }
    /// EFER.NXE
    pub fn nxe(&self) -> bool {
        self.efer & cr::EFER_NXE != 0
    }
    /// RFLAGS.AC
    pub fn ac(&self) -> bool {
        self.rflags & cr::RFLAGS_AC != 0
    }
}

/// What an access does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AccessKind {
    /// A data read.
    Read,
    /// A data write.
    Write,
    /// An instruction fetch.
    Fetch,
}

/// Who makes an access (SDM 4.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Privilege {
    /// An explicit access at CPL 3.
    User,
    /// An explicit access at CPL 0, 1 or 2.
    Supervisor,
    /// An implicit supervisor-mode access (to the GDT, IDT, TSS, ...), at any CPL: SMAP
    /// applies to it whatever RFLAGS.AC says.
    Implicit,
}

impl Privilege {
    /// The privilege of an explicit access at `cpl`: CPL 3 is user mode, 0 to 2 supervisor.
    pub const fn of_cpl(cpl: u8) -> Privilege {
        if cpl == 3 {
            Privilege::User
        } else {
            Privilege::Supervisor
        }
    }
}

/// One access to a linear address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Access {
    /// Read, write or fetch.
    pub kind: AccessKind,
    /// User, supervisor or implicit supervisor.
    pub privilege: Privilege,
}

impl Access {
    /// Builds an access.
    pub const fn new(kind: AccessKind, privilege: Privilege) -> Access {
        Access { kind, privilege }
    }
    /// An explicit access at `cpl`.
    pub const fn at_cpl(kind: AccessKind, cpl: u8) -> Access {
        Access {
            kind,
            privilege: Privilege::of_cpl(cpl),
        }
    }
    /// Whether this is a user-mode access.
    pub const fn is_user(self) -> bool {
        matches!(self.privilege, Privilege::User)
    }
    /// Whether this is a write.
    pub const fn is_write(self) -> bool {
        matches!(self.kind, AccessKind::Write)
    }
    /// Whether this is an instruction fetch.
    pub const fn is_fetch(self) -> bool {
        matches!(self.kind, AccessKind::Fetch)
    }
}

/// A page-fault error code (SDM 4.7).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PfErrorCode(pub u32);

impl PfErrorCode {
    /// The fault was a protection violation, not a not-present page.
    pub const P: u32 = 1 << 0;
    /// The access was a write.
    pub const W: u32 = 1 << 1;
    /// The access was a user-mode access.
    pub const U: u32 = 1 << 2;
    /// A reserved bit was set in a paging-structure entry.
    pub const RSVD: u32 = 1 << 3;
    /// The access was an instruction fetch (reported only with SMEP or PAE+NXE).
    pub const I: u32 = 1 << 4;
    /// A protection-key violation.
    pub const PK: u32 = 1 << 5;

    /// Raw bits.
    pub const fn bits(self) -> u32 {
        self.0
    }
    /// Whether all of `mask` is set.
    pub const fn has(self, mask: u32) -> bool {
        self.0 & mask == mask
    }
    /// The P bit: whether the fault is a protection violation rather than not-present.
    pub const fn present(self) -> bool {
        self.has(Self::P)
    }
    /// The W bit.
    pub const fn write(self) -> bool {
        self.has(Self::W)
    }
    /// The U bit.
    pub const fn user(self) -> bool {
        self.has(Self::U)
    }
    /// The RSVD bit.
    pub const fn reserved(self) -> bool {
        self.has(Self::RSVD)
    }
    /// The I/D bit.
    pub const fn fetch(self) -> bool {
        self.has(Self::I)
    }
    /// The PK bit.
    pub const fn pkey(self) -> bool {
        self.has(Self::PK)
    }

    /// The error-code bits that describe `access` (W, U, I) on a CPU in state `ctl`.
    pub fn for_access(access: Access, ctl: &ControlState) -> PfErrorCode {
        Self::for_access_in(access, ctl, ctl.levels())
    }

    /// The error-code bits that describe `access` (W, U, I) in paging mode `levels`, with
    /// the other control bits from `ctl`: I is reported only with CR4.SMEP, or with
    /// EFER.NXE in PAE or 4-level paging (SDM 4.7).
    pub fn for_access_in(access: Access, ctl: &ControlState, levels: PagingLevels) -> PfErrorCode {
        let mut bits = 0;
        if access.is_write() {
            bits |= Self::W;
        }
        if access.is_user() {
            bits |= Self::U;
        }
        let reports_fetch = ctl.smep() || (levels >= PagingLevels::Three && ctl.nxe());
        if access.is_fetch() && reports_fetch {
            bits |= Self::I;
        }
        PfErrorCode(bits)
    }
}

impl core::fmt::Debug for PfErrorCode {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "PfErrorCode({:#x}", self.0)?;
        for (bit, name) in [
            (Self::P, "P"),
            (Self::W, "W"),
            (Self::U, "U"),
            (Self::RSVD, "RSVD"),
            (Self::I, "I"),
            (Self::PK, "PK"),
        ] {
            if self.0 & bit != 0 {
                write!(f, " {name}")?;
            }
        }
        write!(f, ")")
    }
}

//! Architectural bits of paging-structure entries (Intel SDM vol. 3A, 4.3, 4.4.2, 4.5.4).
//!
//! The same bit positions serve 32-bit (4-byte) and 8-byte entries; bits above 31 simply do
//! not exist in a 32-bit entry.

/// Present.
pub const P: u64 = 1 << 0;
/// Read/write: writes allowed through this entry.
pub const RW: u64 = 1 << 1;
/// User/supervisor: user-mode accesses allowed through this entry.
pub const US: u64 = 1 << 2;
/// Page-level write-through.
pub const PWT: u64 = 1 << 3;
/// Page-level cache disable.
pub const PCD: u64 = 1 << 4;
/// Accessed.
pub const A: u64 = 1 << 5;
/// Dirty (leaf entries only).
pub const D: u64 = 1 << 6;
/// Page size in a non-leaf-level entry; PAT in a 4 KiB leaf.
pub const PS: u64 = 1 << 7;
/// PAT in a 4 KiB PTE (same position as [`PS`]).
pub const PAT_4K: u64 = 1 << 7;
/// Global (leaf entries only, honoured with CR4.PGE).
pub const G: u64 = 1 << 8;
/// PAT in a superpage entry.
pub const PAT_LARGE: u64 = 1 << 12;
/// Execute-disable (8-byte entries, EFER.NXE=1 only; reserved otherwise).
pub const NX: u64 = 1 << 63;
/// First bit of the 4-bit protection key in a 4-level leaf (bits 62:59).
pub const PKEY_SHIFT: u32 = 59;
/// The protection-key field of a 4-level leaf.
pub const PKEY_MASK: u64 = 0xf << PKEY_SHIFT;
/// Bits the hardware ignores and software may use in 8-byte entries (11:9).
pub const AVAIL_LOW: u64 = 0x7 << 9;

/// Physical-address bits 51:12 of an 8-byte entry (before MAXPHYADDR is applied).
pub const ADDR_MASK_8: u64 = 0x000f_ffff_ffff_f000;
/// Physical-address bits 31:12 of a 4-byte entry.
pub const ADDR_MASK_4: u64 = 0xffff_f000;

/// Control register and MSR bits used by the walker.
pub mod cr {
    /// CR0.PE
    pub const CR0_PE: u64 = 1 << 0;
    /// CR0.WP
    pub const CR0_WP: u64 = 1 << 16;
    /// CR0.NW: not write-through.
    pub const CR0_NW: u64 = 1 << 29;
    /// CR0.CD: cache disable.
    pub const CR0_CD: u64 = 1 << 30;
    /// CR0.PG
    pub const CR0_PG: u64 = 1 << 31;
    /// CR4.PSE
    pub const CR4_PSE: u64 = 1 << 4;
    /// CR4.PAE
    pub const CR4_PAE: u64 = 1 << 5;
    /// CR4.PGE
    pub const CR4_PGE: u64 = 1 << 7;
    /// CR4.LA57 (5-level paging; not supported by this walker)
    pub const CR4_LA57: u64 = 1 << 12;
    /// CR4.PCIDE
    pub const CR4_PCIDE: u64 = 1 << 17;
    /// CR4.SMEP
    pub const CR4_SMEP: u64 = 1 << 20;
    /// CR4.SMAP
    pub const CR4_SMAP: u64 = 1 << 21;
    /// CR4.PKE
    pub const CR4_PKE: u64 = 1 << 22;
    /// EFER.LME
    pub const EFER_LME: u64 = 1 << 8;
    /// EFER.LMA
    pub const EFER_LMA: u64 = 1 << 10;
    /// EFER.NXE
    pub const EFER_NXE: u64 = 1 << 11;
    /// RFLAGS.AC
    pub const RFLAGS_AC: u64 = 1 << 18;
}

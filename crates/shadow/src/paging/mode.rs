//! Paging modes as types.
//!
//! Each mode is a zero-sized type whose associated constants describe its tables (levels,
//! entry width, entries per table, index shifts, where superpages may be) and whose
//! functions give its reserved-bit masks, so that walkers and shadow code are written once,
//! generically, and monomorphised per mode (the seed's "multiple compilation").

use super::bits;
use super::control::{ControlState, CpuFeatures, PagingLevels};
use crate::addr::PAGE_SHIFT;

/// Size of the page a translation maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PageSize {
    /// 4 KiB
    Size4K,
    /// 2 MiB (PAE and 4-level PDE)
    Size2M,
    /// 4 MiB (32-bit PDE with CR4.PSE)
    Size4M,
    /// 1 GiB (4-level PDPTE)
    Size1G,
}

impl PageSize {
    /// log2 of the size in bytes.
    pub const fn shift(self) -> u32 {
        match self {
            PageSize::Size4K => 12,
            PageSize::Size2M => 21,
            PageSize::Size4M => 22,
            PageSize::Size1G => 30,
        }
    }
    /// The size in bytes.
    pub const fn bytes(self) -> u64 {
        1 << self.shift()
    }
    /// The number of 4 KiB frames covered.
    pub const fn frames(self) -> u64 {
        1 << (self.shift() - PAGE_SHIFT)
    }
}

/// A paging mode: the shape of its tables and its architectural rules.
pub trait PagingMode: 'static + Copy + Default + core::fmt::Debug + Send + Sync {
    /// Which mode this is.
    const LEVELS: PagingLevels;
    /// The number of levels of tables (0 for paging disabled).
    const NUM_LEVELS: u8;
    /// Bytes per entry: 4 or 8.
    const ENTRY_BYTES: u64;
    /// Bits of linear address each level indexes (10 or 9).
    const INDEX_BITS: u32;
    /// Entries in a full table (1024 or 512).
    const ENTRIES_PER_TABLE: usize;
    /// Entries in the top-level table (4 for the PAE PDPT).
    const TOP_ENTRIES: usize;
    /// Width of the linear addresses this mode translates (32 or 48).
    const VA_BITS: u32;
    /// A short name ("2-level", ...).
    const NAME: &'static str;

    /// The linear-address shift of `level` (1 = the leaf-table level).
    fn shift(level: u8) -> u32 {
        PAGE_SHIFT + Self::INDEX_BITS * u32::from(level.saturating_sub(1))
    }

    /// The index into the level-`level` table for `va`.
    fn index(va: u64, level: u8) -> usize {
        let entries = if level == Self::NUM_LEVELS {
            Self::TOP_ENTRIES
        } else {
            Self::ENTRIES_PER_TABLE
        };
        ((va >> Self::shift(level)) as usize) & (entries - 1)
    }

    /// Whether an entry at `level` with PS set maps a page (rather than being reserved or
    /// ignored), given the CPU's features and control state.
    fn superpage_level(level: u8, ctl: &ControlState, feat: &CpuFeatures) -> bool;

    /// Whether PS in an entry at `level` is a reserved bit (a PS the mode cannot honour).
    fn ps_reserved(level: u8, ctl: &ControlState, feat: &CpuFeatures) -> bool;

    /// The page size mapped by a PS entry at `level`.
    fn superpage_size(level: u8) -> PageSize;

    /// The reserved bits of `entry` at `level` (assumed present): a walk that meets any of
    /// them faults with RSVD. `leaf` says whether the entry maps a page (PS honoured, or
    /// level 1).
    fn reserved_bits(
        entry: u64,
        level: u8,
        leaf: bool,
        ctl: &ControlState,
        feat: &CpuFeatures,
    ) -> u64;

    /// The physical address of the table or page `entry` points to.
    fn entry_address(entry: u64, level: u8, leaf: bool) -> u64;

    /// The physical address of the top-level table, from CR3.
    fn root_table(cr3: u64) -> u64;
}

/// Paging disabled: linear = physical ("0-level").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NoPaging;

/// 32-bit paging: 2 levels of 1024 4-byte entries, 4 MiB pages with CR4.PSE.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TwoLevel;

/// PAE paging: a 4-entry PDPT, then 2 levels of 512 8-byte entries; 2 MiB pages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ThreeLevel;

/// 4-level paging: 4 levels of 512 8-byte entries; 2 MiB and (if supported) 1 GiB pages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FourLevel;

fn nx_reserved(ctl: &ControlState) -> u64 {
    if ctl.nxe() { 0 } else { bits::NX }
}

/// Reserved bits inside the address field of a superpage entry: bits between the PAT bit
/// (12) and the page-size boundary, e.g. 20:13 for 2 MiB pages.
fn superpage_low_reserved(size: PageSize) -> u64 {
    ((1u64 << size.shift()) - 1) & !((1u64 << 13) - 1)
}

impl PagingMode for NoPaging {
    const LEVELS: PagingLevels = PagingLevels::Zero;
    const NUM_LEVELS: u8 = 0;
    const ENTRY_BYTES: u64 = 8;
    const INDEX_BITS: u32 = 0;
    const ENTRIES_PER_TABLE: usize = 1;
    const TOP_ENTRIES: usize = 1;
    const VA_BITS: u32 = 32;
    const NAME: &'static str = "0-level";

    fn superpage_level(_: u8, _: &ControlState, _: &CpuFeatures) -> bool {
        false
    }
    fn ps_reserved(_: u8, _: &ControlState, _: &CpuFeatures) -> bool {
        false
    }
    fn superpage_size(_: u8) -> PageSize {
        PageSize::Size4K
    }
    fn reserved_bits(_: u64, _: u8, _: bool, _: &ControlState, _: &CpuFeatures) -> u64 {
        0
    }
    fn entry_address(_: u64, _: u8, _: bool) -> u64 {
        0
    }
    fn root_table(_: u64) -> u64 {
        0
    }
}

impl PagingMode for TwoLevel {
    const LEVELS: PagingLevels = PagingLevels::Two;
    const NUM_LEVELS: u8 = 2;
    const ENTRY_BYTES: u64 = 4;
    const INDEX_BITS: u32 = 10;
    const ENTRIES_PER_TABLE: usize = 1024;
    const TOP_ENTRIES: usize = 1024;
    const VA_BITS: u32 = 32;
    const NAME: &'static str = "2-level";

    fn superpage_level(level: u8, ctl: &ControlState, _: &CpuFeatures) -> bool {
        level == 2 && ctl.pse()
    }
    fn ps_reserved(_: u8, _: &ControlState, _: &CpuFeatures) -> bool {
        // PS in a PDE is ignored when CR4.PSE = 0; a PTE has no PS (bit 7 is PAT).
        false
    }
    fn superpage_size(_: u8) -> PageSize {
        PageSize::Size4M
    }
    fn reserved_bits(
        entry: u64,
        level: u8,
        leaf: bool,
        _: &ControlState,
        feat: &CpuFeatures,
    ) -> u64 {
        if level == 2 && leaf {
            // PSE-36: bits 20:13 hold physical-address bits 39:32, bit 21 is reserved, and
            // so are the bits of 20:13 beyond MAXPHYADDR (SDM table 4-4).
            let m = u32::from(feat.clamped().maxphyaddr).min(40);
            let high_bits = m - 32;
            let reserved = (0x1ffu64 << 13) & !(((1u64 << high_bits) - 1) << 13);
            entry & reserved
        } else {
            0
        }
    }
    fn entry_address(entry: u64, level: u8, leaf: bool) -> u64 {
        if level == 2 && leaf {
            let low = entry & 0xffc0_0000;
            let high = (entry >> 13) & 0xff;
            low | (high << 32)
        } else {
            entry & bits::ADDR_MASK_4
        }
    }
    fn root_table(cr3: u64) -> u64 {
        cr3 & bits::ADDR_MASK_4
    }
}

impl ThreeLevel {
    /// Reserved bits of a PAE PDPTE (SDM table 4-8), checked when CR3 is loaded.
    pub fn pdpte_reserved_bits(entry: u64, feat: &CpuFeatures) -> u64 {
        let above = feat.above_maxphyaddr_mask() | (0xfffu64 << 52);
        // Bits 2:1 and 8:5 are reserved; bit 63 is reserved whatever EFER.NXE says.
        entry & (above | 0x1e6)
    }
}

impl PagingMode for ThreeLevel {
    const LEVELS: PagingLevels = PagingLevels::Three;
    const NUM_LEVELS: u8 = 3;
    const ENTRY_BYTES: u64 = 8;
    const INDEX_BITS: u32 = 9;
    const ENTRIES_PER_TABLE: usize = 512;
    const TOP_ENTRIES: usize = 4;
    const VA_BITS: u32 = 32;
    const NAME: &'static str = "PAE";

    fn superpage_level(level: u8, _: &ControlState, _: &CpuFeatures) -> bool {
        level == 2
    }
    fn ps_reserved(_: u8, _: &ControlState, _: &CpuFeatures) -> bool {
        false
    }
    fn superpage_size(_: u8) -> PageSize {
        PageSize::Size2M
    }
    fn reserved_bits(
        entry: u64,
        level: u8,
        leaf: bool,
        ctl: &ControlState,
        feat: &CpuFeatures,
    ) -> u64 {
        if level == 3 {
            return Self::pdpte_reserved_bits(entry, feat);
        }
        // Bits 62:MAXPHYADDR are reserved in PAE entries (no protection keys here).
        let mut reserved = feat.above_maxphyaddr_mask() | (0x7ffu64 << 52) | nx_reserved(ctl);
        if level == 2 && leaf {
            reserved |= superpage_low_reserved(PageSize::Size2M);
        }
        entry & reserved
    }
    fn entry_address(entry: u64, level: u8, leaf: bool) -> u64 {
        if level == 2 && leaf {
            entry & bits::ADDR_MASK_8 & !(PageSize::Size2M.bytes() - 1)
        } else {
            entry & bits::ADDR_MASK_8
        }
    }
    fn root_table(cr3: u64) -> u64 {
        cr3 & 0xffff_ffe0
    }
}

impl PagingMode for FourLevel {
    const LEVELS: PagingLevels = PagingLevels::Four;
    const NUM_LEVELS: u8 = 4;
    const ENTRY_BYTES: u64 = 8;
    const INDEX_BITS: u32 = 9;
    const ENTRIES_PER_TABLE: usize = 512;
    const TOP_ENTRIES: usize = 512;
    const VA_BITS: u32 = 48;
    const NAME: &'static str = "4-level";

    fn superpage_level(level: u8, _: &ControlState, feat: &CpuFeatures) -> bool {
        level == 2 || (level == 3 && feat.pdpe1gb)
    }
    fn ps_reserved(level: u8, _: &ControlState, feat: &CpuFeatures) -> bool {
        // PS in a PML4E is reserved; in a PDPTE it is reserved without 1 GiB page support
        // (Xen XSA-176 was a walker that did not say so).
        level == 4 || (level == 3 && !feat.pdpe1gb)
    }
    fn superpage_size(level: u8) -> PageSize {
        if level == 3 {
            PageSize::Size1G
        } else {
            PageSize::Size2M
        }
    }
    fn reserved_bits(
        entry: u64,
        level: u8,
        leaf: bool,
        ctl: &ControlState,
        feat: &CpuFeatures,
    ) -> u64 {
        let mut reserved = feat.above_maxphyaddr_mask() | nx_reserved(ctl);
        if Self::ps_reserved(level, ctl, feat) {
            reserved |= bits::PS;
        }
        if leaf && level >= 2 {
            reserved |= superpage_low_reserved(Self::superpage_size(level));
        }
        entry & reserved
    }
    fn entry_address(entry: u64, level: u8, leaf: bool) -> u64 {
        if leaf && level >= 2 {
            entry & bits::ADDR_MASK_8 & !(Self::superpage_size(level).bytes() - 1)
        } else {
            entry & bits::ADDR_MASK_8
        }
    }
    fn root_table(cr3: u64) -> u64 {
        cr3 & bits::ADDR_MASK_8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        assert_eq!(TwoLevel::shift(2), 22);
        assert_eq!(ThreeLevel::shift(3), 30);
        assert_eq!(FourLevel::shift(4), 39);
        assert_eq!(ThreeLevel::index(0xc000_0000, 3), 3);
        assert_eq!(TwoLevel::index(0xffc0_0000, 2), 1023);
        assert_eq!(FourLevel::index(0xffff_8000_0000_0000, 4), 256);
    }

    #[test]
    fn pse36_address_and_reserved_bits() {
        let feat = CpuFeatures {
            maxphyaddr: 36,
            ..CpuFeatures::KVM_HOST
        };
        let ctl = ControlState::default();
        let pde = 0x0040_0000 | (0x3 << 13) | bits::PS | bits::P;
        assert_eq!(TwoLevel::entry_address(pde, 2, true), 0x3_0040_0000);
        assert_eq!(TwoLevel::reserved_bits(pde, 2, true, &ctl, &feat), 0);
        let too_high = pde | (1 << 17);
        assert_eq!(
            TwoLevel::reserved_bits(too_high, 2, true, &ctl, &feat),
            1 << 17
        );
        assert_eq!(
            TwoLevel::reserved_bits(pde | (1 << 21), 2, true, &ctl, &feat),
            1 << 21
        );
    }

    #[test]
    fn four_level_reserved_bits() {
        let feat = CpuFeatures::KVM_HOST;
        let mut ctl = ControlState::default();
        assert_eq!(
            FourLevel::reserved_bits(bits::NX | 1, 1, true, &ctl, &feat),
            bits::NX
        );
        ctl.efer |= super::super::bits::cr::EFER_NXE;
        assert_eq!(
            FourLevel::reserved_bits(bits::NX | 1, 1, true, &ctl, &feat),
            0
        );
        assert_eq!(
            FourLevel::reserved_bits(1 << 51, 1, true, &ctl, &feat),
            1 << 51
        );
        assert_eq!(
            FourLevel::reserved_bits(bits::PS | 1, 4, false, &ctl, &feat),
            bits::PS
        );
        assert_eq!(
            FourLevel::reserved_bits(bits::PS | 1, 3, false, &ctl, &feat),
            bits::PS
        );
        assert_eq!(
            FourLevel::reserved_bits(1 << 13, 2, true, &ctl, &feat),
            1 << 13
        );
        assert_eq!(
            FourLevel::reserved_bits(bits::PKEY_MASK, 1, true, &ctl, &feat),
            0
        );
    }
}

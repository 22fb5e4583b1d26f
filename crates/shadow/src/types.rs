//! Shadow types (seed slide "One shadow for each page table type") and the metadata the
//! engine keeps per shadow and per guest frame.

use crate::addr::{Maddr, Mfn};
use crate::paging::PagingLevels;

/// The kind of a shadow page: which guest page-table type it shadows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ShadowKind {
    /// Shadow of a 32-bit guest L1 (2 contiguous pages on PAE/64-bit shadows).
    L1x32,
    /// Splinter of a 32-bit guest 4 MiB page (2 pages on PAE/64-bit shadows).
    Fl1x32,
    /// Shadow of a 32-bit guest L2 (4 contiguous pages on PAE/64-bit shadows).
    L2x32,
    /// Shadow of a PAE guest L1.
    L1Pae,
    /// Splinter of a PAE guest 2 MiB page.
    Fl1Pae,
    /// Shadow of a PAE guest L2.
    L2Pae,
    /// Shadow of a 64-bit guest L1.
    L1x64,
    /// Splinter of a 64-bit guest 2 MiB page.
    Fl1x64,
    /// Shadow of a 64-bit guest L2.
    L2x64,
    /// Shadow of a 64-bit guest L3.
    L3x64,
    /// Shadow of a 64-bit guest L4.
    L4x64,
    /// A vcpu's own top of the shadow tree when the guest's top level is smaller than the
    /// shadow's (a PAE PDPT, or an L4 with one L3 below it): not in the hash.
    VcpuTop,
}

impl ShadowKind {
    /// Every kind, in a fixed order (bit `i` of a [`KindSet`] is `ALL[i]`).
    pub const ALL: [ShadowKind; 12] = [
        ShadowKind::L1x32,
        ShadowKind::Fl1x32,
        ShadowKind::L2x32,
        ShadowKind::L1Pae,
        ShadowKind::Fl1Pae,
        ShadowKind::L2Pae,
        ShadowKind::L1x64,
        ShadowKind::Fl1x64,
        ShadowKind::L2x64,
        ShadowKind::L3x64,
        ShadowKind::L4x64,
        ShadowKind::VcpuTop,
    ];

    /// The guest paging mode this kind shadows (None for a vcpu top).
    pub const fn guest_levels(self) -> Option<PagingLevels> {
        match self {
            ShadowKind::L1x32 | ShadowKind::Fl1x32 | ShadowKind::L2x32 => Some(PagingLevels::Two),
            ShadowKind::L1Pae | ShadowKind::Fl1Pae | ShadowKind::L2Pae => Some(PagingLevels::Three),
            ShadowKind::L1x64
            | ShadowKind::Fl1x64
            | ShadowKind::L2x64
            | ShadowKind::L3x64
            | ShadowKind::L4x64 => Some(PagingLevels::Four),
            ShadowKind::VcpuTop => None,
        }
    }

    /// The guest table level this kind shadows (1 for L1 and fl1 splinters).
    pub const fn level(self) -> u8 {
        match self {
            ShadowKind::L1x32
            | ShadowKind::Fl1x32
            | ShadowKind::L1Pae
            | ShadowKind::Fl1Pae
            | ShadowKind::L1x64
            | ShadowKind::Fl1x64 => 1,
            ShadowKind::L2x32 | ShadowKind::L2Pae | ShadowKind::L2x64 => 2,
            ShadowKind::L3x64 => 3,
            ShadowKind::L4x64 | ShadowKind::VcpuTop => 4,
        }
    }

    /// Whether entries of this kind map pages (rather than point at lower shadows).
    pub const fn is_leaf_table(self) -> bool {
        self.level() == 1
    }

    /// Whether this is a splinter of a guest superpage (keyed by guest frame, not by a
    /// guest page-table page).
    pub const fn is_fl1(self) -> bool {
        matches!(
            self,
            ShadowKind::Fl1x32 | ShadowKind::Fl1Pae | ShadowKind::Fl1x64
        )
    }

    /// The kind shadowing a guest table of `level` in guest mode `guest`.
    pub const fn for_guest(guest: PagingLevels, level: u8) -> Option<ShadowKind> {
        match (guest, level) {
            (PagingLevels::Two, 1) => Some(ShadowKind::L1x32),
            (PagingLevels::Two, 2) => Some(ShadowKind::L2x32),
            (PagingLevels::Three, 1) => Some(ShadowKind::L1Pae),
            (PagingLevels::Three, 2) => Some(ShadowKind::L2Pae),
            (PagingLevels::Four, 1) => Some(ShadowKind::L1x64),
            (PagingLevels::Four, 2) => Some(ShadowKind::L2x64),
            (PagingLevels::Four, 3) => Some(ShadowKind::L3x64),
            (PagingLevels::Four, 4) => Some(ShadowKind::L4x64),
            _ => None,
        }
    }

    /// The splinter kind for a superpage of guest mode `guest`.
    pub const fn fl1_for_guest(guest: PagingLevels) -> Option<ShadowKind> {
        match guest {
            PagingLevels::Two => Some(ShadowKind::Fl1x32),
            PagingLevels::Three => Some(ShadowKind::Fl1Pae),
            PagingLevels::Four => Some(ShadowKind::Fl1x64),
            PagingLevels::Zero => None,
        }
    }

    /// log2 of the number of contiguous pool pages a shadow of this kind takes, when shadow
    /// tables have `shadow` levels (size-mismatched 2-on-3 and 2-on-4 take 2 or 4 pages).
    pub const fn order(self, shadow: PagingLevels) -> u8 {
        let wide = !matches!(shadow, PagingLevels::Two);
        match self {
            ShadowKind::L1x32 | ShadowKind::Fl1x32 if wide => 1,
            ShadowKind::L2x32 if wide => 2,
            ShadowKind::VcpuTop if matches!(shadow, PagingLevels::Four) => 1,
            _ => 0,
        }
    }

    /// The bit for this kind in a [`KindSet`].
    pub const fn bit(self) -> u16 {
        1 << (self as u16)
    }

    /// A short name, like Xen's ("l1_32", "fl1_pae", ...).
    pub const fn name(self) -> &'static str {
        match self {
            ShadowKind::L1x32 => "l1_32",
            ShadowKind::Fl1x32 => "fl1_32",
            ShadowKind::L2x32 => "l2_32",
            ShadowKind::L1Pae => "l1_pae",
            ShadowKind::Fl1Pae => "fl1_pae",
            ShadowKind::L2Pae => "l2_pae",
            ShadowKind::L1x64 => "l1_64",
            ShadowKind::Fl1x64 => "fl1_64",
            ShadowKind::L2x64 => "l2_64",
            ShadowKind::L3x64 => "l3_64",
            ShadowKind::L4x64 => "l4_64",
            ShadowKind::VcpuTop => "vcpu_top",
        }
    }
}

/// A set of shadow kinds, one bit each.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct KindSet(pub u16);

impl KindSet {
    /// Whether `kind` is in the set.
    pub const fn contains(self, kind: ShadowKind) -> bool {
        self.0 & kind.bit() != 0
    }
    /// The kinds in the set.
    pub fn iter(self) -> impl Iterator<Item = ShadowKind> {
        ShadowKind::ALL
            .into_iter()
            .filter(move |k| self.contains(*k))
    }
}

/// How the guest entries of a shadowed table are read, where that depends on control state
/// rather than on the table: whether PS means a 4 MiB page in 32-bit tables (CR4.PSE) and
/// whether bit 63 is NX or reserved (EFER.NXE). Vcpus that disagree (an SMP guest part-way
/// through boot) get separate shadows of the same page.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Flavor {
    /// CR4.PSE as seen by the 32-bit guest tables.
    pub pse: bool,
    /// EFER.NXE as seen by PAE and 64-bit guest tables.
    pub nxe: bool,
    /// A PAE guest L2 used through PDPTE 3 in an internal domain on PAE shadows: its top
    /// entries cover the hypervisor hole and stay empty. The same page used through
    /// another PDPTE gets its own shadow (Xen's `l2h_pae`), so the hole cannot be reached
    /// through an alias.
    pub high: bool,
    /// For a splinter of a 64-bit guest's superpage on 64-bit shadows: the protection key
    /// (bits 62:59) of the guest entry that maps it, which every splinter entry carries
    /// (keys live only in leaves). Superpages mapped with different keys get separate
    /// splinters. Zero for every other shadow.
    pub pkey: u8,
}

/// The key of a shadow in the hash: the shadowed guest table's machine frame (for a
/// splinter, the guest frame number of the superpage), the kind and the flavor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShadowKey {
    /// The guest page-table frame (as a raw machine frame), or for a splinter the raw guest
    /// frame number of the superpage's first frame; for a vcpu top, the vcpu id.
    pub frame: u64,
    /// The kind.
    pub kind: ShadowKind,
    /// The flavor.
    pub flavor: Flavor,
}

/// What the engine knows about one shadow (a block of 1, 2 or 4 pool pages).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShadowInfo {
    /// Its key.
    pub key: ShadowKey,
    /// log2 of its page count.
    pub order: u8,
    /// References from shadow entries (upper shadows and vcpu tops).
    pub refs: u32,
    /// Whether it is pinned as a top-level shadow (kept while unused, MRU order).
    pub pinned: bool,
    /// When it was last used as a vcpu's top level (for LRU eviction).
    pub last_use: u64,
    /// The last upper shadow entry that took a reference to it: where to unhook it from
    /// without a search.
    pub up: Option<Maddr>,
}

/// What the engine knows about one machine frame of guest memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrameMeta {
    /// Kinds of hashed shadows of this frame (as a guest page table).
    pub kinds: KindSet,
    /// How many hashed shadows this frame has.
    pub shadows: u32,
    /// How many writable shadow L1 entries map this frame.
    pub writable: u32,
    /// The shadow L1 entry that last took `writable` from zero to one (seed future
    /// optimisation 1): usually the only writable mapping left when the page becomes a
    /// page table.
    pub last_writable: Option<Maddr>,
}

impl FrameMeta {
    /// Whether the frame is a shadowed guest page table.
    pub fn is_page_table(&self) -> bool {
        self.shadows > 0
    }
    /// Whether nothing is recorded (the entry can be dropped).
    pub fn is_empty(&self) -> bool {
        self.shadows == 0 && self.writable == 0
    }
}

/// The frame of a shadow head, as a key type for maps of shadows.
pub type ShadowMfn = Mfn;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_mismatched_kinds_take_contiguous_blocks() {
        assert_eq!(ShadowKind::L1x32.order(PagingLevels::Two), 0);
        assert_eq!(ShadowKind::L1x32.order(PagingLevels::Three), 1);
        assert_eq!(ShadowKind::L2x32.order(PagingLevels::Four), 2);
        assert_eq!(ShadowKind::Fl1x32.order(PagingLevels::Four), 1);
        assert_eq!(ShadowKind::L2Pae.order(PagingLevels::Three), 0);
        assert_eq!(ShadowKind::VcpuTop.order(PagingLevels::Four), 1);
        assert_eq!(ShadowKind::VcpuTop.order(PagingLevels::Three), 0);
    }

    #[test]
    fn kinds_by_guest_level() {
        for kind in ShadowKind::ALL {
            if let Some(g) = kind.guest_levels()
                && !kind.is_fl1()
            {
                assert_eq!(ShadowKind::for_guest(g, kind.level()), Some(kind));
            }
        }
        let set = KindSet(ShadowKind::L1x64.bit() | ShadowKind::L2x64.bit());
        assert_eq!(
            set.iter().collect::<alloc::vec::Vec<_>>(),
            [ShadowKind::L1x64, ShadowKind::L2x64]
        );
    }
}

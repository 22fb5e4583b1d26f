//! Guesses from the guest OS's known linear maps (method (b) of remove write access), the
//! shadow-tree lookup they need, and the teardown-hint options.

use alloc::vec::Vec;

use crate::addr::{Maddr, Mfn};
use crate::domain::{Domain, EngineError};
use crate::host::MachineMemory;
use crate::paging::PagingLevels;

/// At most this many top-level shadows are looked through for each guessed address: every
/// vcpu's, then the most recently used pinned ones.
pub const HINT_TOPS: usize = 16;

/// At most this many guest frames of one machine frame are tried against direct maps.
const HINT_GFNS: usize = 4;

/// A linear map the guest OS keeps, from which the engine guesses where a frame is mapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LinearMapHint {
    /// Guest frames `gfn_base..gfn_base + frames` mapped in order from `va_base`: frame
    /// `gfn_base + i` at `va_base + i * 4096` (a kernel's direct map of physical memory).
    /// In a non-translated domain the frame numbers are machine frame numbers.
    DirectMap {
        /// The linear address of the first frame.
        va_base: u64,
        /// The first guest frame mapped.
        gfn_base: u64,
        /// How many frames are mapped.
        frames: u64,
    },
    /// A self-map (recursive slot): the guest's page-table entry for linear address `x` is
    /// itself mapped at `pte_base + (x >> 12) * entry_size`, so the level-`l` table
    /// covering `x` is mapped at that map applied `l` times (Windows keeps one).
    SelfMap {
        /// Where the leaf entries are mapped (the recursive slot's linear address).
        pte_base: u64,
    },
}

impl LinearMapHint {
    /// Where 64-bit Linux maps physical memory (without KASLR): `page_offset_base`.
    pub const LINUX_X86_64_DIRECT_MAP: u64 = 0xffff_8880_0000_0000;
    /// Where 32-bit Linux maps low memory (PAGE_OFFSET with the 3G/1G split).
    pub const LINUX_X86_32_LOWMEM: u64 = 0xc000_0000;
    /// How much memory the 32-bit lowmem map covers at most: 896 MiB, in frames.
    pub const LINUX_X86_32_LOWMEM_FRAMES: u64 = (896 << 20) >> 12;
    /// The L4 slot of the 64-bit Windows self-map before Windows 10 randomised it.
    pub const WINDOWS_X64_SELF_MAP_SLOT: u64 = 0x1ed;
    /// Where 32-bit PAE Windows maps its page tables.
    pub const WINDOWS_PAE_PTE_BASE: u64 = 0xc000_0000;

    /// 64-bit Linux's direct map of guest frames `0..frames`.
    pub const fn linux_x86_64_direct_map(frames: u64) -> LinearMapHint {
        LinearMapHint::DirectMap {
            va_base: Self::LINUX_X86_64_DIRECT_MAP,
            gfn_base: 0,
            frames,
        }
    }

    /// 32-bit Linux's lowmem map of guest frames `0..frames` (at most 896 MiB).
    pub const fn linux_x86_32_lowmem(frames: u64) -> LinearMapHint {
        let frames = if frames < Self::LINUX_X86_32_LOWMEM_FRAMES {
            frames
        } else {
            Self::LINUX_X86_32_LOWMEM_FRAMES
        };
        LinearMapHint::DirectMap {
            va_base: Self::LINUX_X86_32_LOWMEM,
            gfn_base: 0,
            frames,
        }
    }

    /// A 4-level self-map in L4 slot `slot` (0..512).
    pub const fn self_map_4level(slot: u64) -> LinearMapHint {
        let va = (slot & 0x1ff) << 39;
        let va = if va & (1 << 47) != 0 {
            va | 0xffff_0000_0000_0000
        } else {
            va
        };
        LinearMapHint::SelfMap { pte_base: va }
    }

    /// A 32-bit (2-level) self-map in page-directory slot `slot` (0..1024).
    pub const fn self_map_2level(slot: u64) -> LinearMapHint {
        LinearMapHint::SelfMap {
            pte_base: (slot & 0x3ff) << 22,
        }
    }

    /// 64-bit Windows' self-map (the fixed slot of Windows before 10).
    pub const fn windows_x64_self_map() -> LinearMapHint {
        Self::self_map_4level(Self::WINDOWS_X64_SELF_MAP_SLOT)
    }

    /// 32-bit PAE Windows' self-map: four PDEs mapping the four page directories, so that
    /// the PTEs appear at `0xc000_0000` and the PDEs at `0xc060_0000`.
    pub const fn windows_pae_self_map() -> LinearMapHint {
        LinearMapHint::SelfMap {
            pte_base: Self::WINDOWS_PAE_PTE_BASE,
        }
    }
}

/// Per-guest-OS teardown hints (seed optimisation 5): when to take a page's shadows away
/// because it has stopped being a page table, rather than keep emulating writes to it.
/// Both apply to emulated writes (the guest's own instructions run through the emulator).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TeardownHints {
    /// A page table zeroed whole by one emulated write (a REP STOS chunk covering the page)
    /// is unshadowed: the guest is recycling it (Windows' zero-page thread, Linux's
    /// `clear_page` of a freed page), and a table of nothing needs no shadow.
    pub zeroed_page: bool,
    /// A page table written with an entry that cannot be one (present, with reserved bits
    /// set at every level the page is shadowed at) is unshadowed: the guest reuses the page
    /// as data. 32-bit leaf tables have no reserved bits, so this never fires for them.
    pub data_reuse: bool,
}

impl TeardownHints {
    /// No hints.
    pub const NONE: TeardownHints = TeardownHints {
        zeroed_page: false,
        data_reuse: false,
    };
    /// Every hint.
    pub const ALL: TeardownHints = TeardownHints {
        zeroed_page: true,
        data_reuse: true,
    };
}

/// The geometry of a guest paging mode, as the shadow lookups need it.
#[derive(Clone, Copy, Debug)]
struct GuestShape {
    levels: u8,
    index_bits: u32,
    va_bits: u32,
    entry_bytes: u64,
}

impl GuestShape {
    fn of(levels: PagingLevels) -> Option<GuestShape> {
        Some(match levels {
            PagingLevels::Zero => return None,
            PagingLevels::Two => GuestShape {
                levels: 2,
                index_bits: 10,
                va_bits: 32,
                entry_bytes: 4,
            },
            PagingLevels::Three => GuestShape {
                levels: 3,
                index_bits: 9,
                va_bits: 32,
                entry_bytes: 8,
            },
            PagingLevels::Four => GuestShape {
                levels: 4,
                index_bits: 9,
                va_bits: 48,
                entry_bytes: 8,
            },
        })
    }

    fn shift(self, level: u8) -> u32 {
        12 + self.index_bits * u32::from(level.saturating_sub(1))
    }

    /// The level of the hashed top-level shadows (a PAE guest's PDPT is not hashed).
    fn hashed_top(self) -> u8 {
        if self.levels == 3 { 2 } else { self.levels }
    }

    /// Bits of linear address a guest table at `level` spans.
    fn coverage(self, level: u8) -> u32 {
        if level == self.levels {
            self.va_bits
        } else {
            self.shift(level) + self.index_bits
        }
    }

    fn va_mask(self) -> u64 {
        (1u64 << self.va_bits) - 1
    }

    /// Whether `va` is an address of this mode (below 4 GiB, or canonical).
    fn holds(self, va: u64) -> bool {
        if self.va_bits == 32 {
            return va >> 32 == 0;
        }
        let top = va >> 47;
        top == 0 || top == 0x1ffff
    }

    fn sign_extend(self, va: u64) -> u64 {
        if self.va_bits == 48 && va & (1 << 47) != 0 {
            va | 0xffff_0000_0000_0000
        } else {
            va
        }
    }

    /// Where a self-map at `pte_base` maps the level-`level` table covering `x`.
    fn self_map_page(self, pte_base: u64, level: u8, x: u64) -> Option<u64> {
        let mask = self.va_mask();
        let base = pte_base & mask;
        if !self.holds(pte_base) || base & 0xfff != 0 {
            return None;
        }
        let mut y = x & mask;
        for _ in 0..level {
            y = base.wrapping_add((y >> 12) * self.entry_bytes) & mask;
        }
        Some(self.sign_extend(y & !0xfff))
    }
}

/// Shadow-side geometry: shift of a shadow level (10 or 9 index bits a level).
fn shadow_shift(shadow: PagingLevels, level: u8) -> u32 {
    let bits = if shadow == PagingLevels::Two { 10 } else { 9 };
    12 + bits * u32::from(level.saturating_sub(1))
}

impl<H: MachineMemory> Domain<H> {
    /// Replaces the domain's linear-map hints (see [`LinearMapHint`]).
    pub fn set_linear_maps(&mut self, maps: [Option<LinearMapHint>; 4]) {
        self.config.linear_maps = maps;
    }

    /// Whether any linear-map hint is configured.
    pub(crate) fn has_linear_maps(&self) -> bool {
        self.config.linear_maps.iter().any(Option::is_some)
    }

    /// Byte offset, inside the shadow of a guest table at `level`, of the entry for `va`.
    fn soffset(&self, g: GuestShape, level: u8, va: u64) -> u64 {
        let s = self.config.shadow_levels;
        let shift = shadow_shift(s, level);
        let bits = g.coverage(level).saturating_sub(shift);
        ((va >> shift) & ((1u64 << bits) - 1)) * self.sentry_bytes()
    }

    /// The shadow leaf slot that translates `va` under the top-level shadow `top`, found by
    /// walking the shadow entries down (no guest memory is read). None where the walk
    /// stops at an empty or unexpected entry.
    pub(crate) fn probe_leaf_slot(&self, top: Mfn, va: u64) -> Option<Maddr> {
        let info = self.store.info(top)?;
        let g = GuestShape::of(info.key.kind.guest_levels()?)?;
        if !g.holds(va) || info.key.kind.level() != g.hashed_top() {
            return None;
        }
        let mut head = top;
        let mut level = g.hashed_top();
        loop {
            let slot = Maddr::new(head.base().raw() + self.soffset(g, level, va));
            if level == 1 {
                return Some(slot);
            }
            let entry = self.read_sentry(slot).ok()?;
            let child = self.sentry_frame(entry)?;
            let (child_head, child_info) = self.store.containing(child)?;
            let kind = child_info.key.kind;
            if kind.guest_levels() != info.key.kind.guest_levels() {
                return None;
            }
            if kind.is_fl1() {
                let frames_bits = g.shift(level) - 12;
                let index = (va >> 12) & ((1u64 << frames_bits) - 1);
                return Some(Maddr::new(
                    child_head.base().raw() + index * self.sentry_bytes(),
                ));
            }
            if kind.level() + 1 != level {
                return None;
            }
            head = child_head;
            level -= 1;
        }
    }

    /// The top-level shadows a guess is looked up under: every vcpu's, then the most
    /// recently used pinned ones, at most [`HINT_TOPS`].
    fn hint_tops(&self) -> Vec<Mfn> {
        let mut tops: Vec<Mfn> = Vec::new();
        for t in self.vcpus.iter().flat_map(|v| v.tops()) {
            if !tops.contains(&t) && tops.len() < HINT_TOPS {
                tops.push(t);
            }
        }
        if tops.len() < HINT_TOPS {
            let pinned: Vec<Mfn> = self.store.pinned_lru().collect();
            for t in pinned.into_iter().rev() {
                if tops.len() >= HINT_TOPS {
                    break;
                }
                if !tops.contains(&t) {
                    tops.push(t);
                }
            }
        }
        tops
    }

    /// The guest frame numbers a hint may name for machine frame `mfn`.
    fn hint_gfns(&self, mfn: Mfn) -> Vec<u64> {
        match &self.p2m {
            Some(_) => self
                .m2p
                .get(&mfn)
                .map(|s| s.iter().take(HINT_GFNS).map(|g| g.raw()).collect())
                .unwrap_or_default(),
            None => alloc::vec![mfn.raw()],
        }
    }

    /// The linear addresses at which the hints guess `mfn` is mapped under a top-level
    /// shadow of guest shape `g`. `levels`: the guest table levels `mfn` is (becoming) a
    /// page table at, for self-maps; `fault_va`: the address whose walk is making it one.
    fn hint_addresses(
        &self,
        mfn: Mfn,
        g: GuestShape,
        same_mode: bool,
        levels: &[u8],
        fault_va: Option<u64>,
    ) -> Vec<u64> {
        let mut out = Vec::new();
        for hint in self.config.linear_maps.iter().flatten() {
            match *hint {
                LinearMapHint::DirectMap {
                    va_base,
                    gfn_base,
                    frames,
                } => {
                    for gfn in self.hint_gfns(mfn) {
                        let Some(i) = gfn.checked_sub(gfn_base).filter(|&i| i < frames) else {
                            continue;
                        };
                        if let Some(va) = i.checked_mul(4096).and_then(|o| va_base.checked_add(o))
                            && g.holds(va)
                        {
                            out.push(va);
                        }
                    }
                }
                LinearMapHint::SelfMap { pte_base } => {
                    if !same_mode {
                        continue;
                    }
                    for &level in levels {
                        let xs: Vec<u64> = match fault_va {
                            Some(x) => alloc::vec![x],
                            // A top-level table covers every address (a PAE guest's L2s
                            // one quarter each): any address in it finds it.
                            None if level == g.hashed_top() && g.levels == 3 => {
                                (0..4u64).map(|q| q << 30).collect()
                            }
                            None if level == g.hashed_top() => alloc::vec![0],
                            None => continue,
                        };
                        for x in xs {
                            if let Some(va) = g.self_map_page(pte_base, level, x)
                                && !out.contains(&va)
                            {
                                out.push(va);
                            }
                        }
                    }
                }
            }
        }
        out
    }

    /// Method (b): looks up every address the linear-map hints guess for `mfn` under the
    /// top-level shadows in use and rewrites each shadow leaf entry that maps `mfn` with
    /// `pick` (e.g. clears RW). Returns how many entries it changed.
    pub(crate) fn apply_hints(
        &mut self,
        mfn: Mfn,
        pick: impl Fn(u64) -> Option<u64>,
    ) -> Result<u64, EngineError> {
        let mut levels: Vec<u8> = Vec::new();
        let mut mode = None;
        for (key, _) in self.store.of_frame(mfn) {
            if !levels.contains(&key.kind.level()) {
                levels.push(key.kind.level());
            }
            mode = mode.or(key.kind.guest_levels());
        }
        let fault_va = self.remove.fault.map(|f| f.va.raw());
        let mut changed = 0;
        for top in self.hint_tops() {
            let Some(top_mode) = self.store.info(top).and_then(|i| i.key.kind.guest_levels())
            else {
                continue;
            };
            let Some(g) = GuestShape::of(top_mode) else {
                continue;
            };
            let fault_va = fault_va.map(|x| if g.va_bits == 32 { x & 0xffff_ffff } else { x });
            let vas = self.hint_addresses(mfn, g, mode == Some(top_mode), &levels, fault_va);
            for va in vas {
                let Some(slot) = self.probe_leaf_slot(top, va) else {
                    continue;
                };
                let entry = self.read_sentry(slot)?;
                if self.sentry_frame(entry) != Some(mfn) {
                    continue;
                }
                if let Some(new) = pick(entry) {
                    self.set_sentry(slot, new)?;
                    changed += 1;
                }
            }
        }
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_map_pages_follow_the_recursion() {
        let g4 = GuestShape::of(PagingLevels::Four).unwrap_or(GuestShape {
            levels: 0,
            index_bits: 0,
            va_bits: 0,
            entry_bytes: 0,
        });
        let LinearMapHint::SelfMap { pte_base } = LinearMapHint::windows_x64_self_map() else {
            return;
        };
        assert_eq!(pte_base, 0xffff_f680_0000_0000);
        // x = 0x40_5000: L4 0, L3 0, L2 2, L1 5.
        assert_eq!(
            g4.self_map_page(pte_base, 1, 0x40_5000),
            Some(0xffff_f680_0000_2000)
        );
        assert_eq!(
            g4.self_map_page(pte_base, 2, 0x40_5000),
            Some(0xffff_f6fb_4000_0000)
        );
        // The L4 itself: slot 0x1ed at every level.
        assert_eq!(
            g4.self_map_page(pte_base, 4, 0),
            Some(0xffff_f6fb_7dbe_d000)
        );
        let pae = GuestShape::of(PagingLevels::Three).unwrap_or(g4);
        // PAE Windows: PTEs at 0xc000_0000, PDEs at 0xc060_0000.
        assert_eq!(
            pae.self_map_page(0xc000_0000, 1, 0x40_5000),
            Some(0xc000_2000)
        );
        assert_eq!(
            pae.self_map_page(0xc000_0000, 2, 0x4040_5000),
            Some(0xc060_1000)
        );
        let two = GuestShape::of(PagingLevels::Two).unwrap_or(g4);
        let LinearMapHint::SelfMap { pte_base } = LinearMapHint::self_map_2level(0x300) else {
            return;
        };
        assert_eq!(two.self_map_page(pte_base, 1, 0x40_5000), Some(0xc000_1000));
        assert_eq!(two.self_map_page(pte_base, 2, 0), Some(0xc030_0000));
    }

    #[test]
    fn lowmem_hint_is_capped_at_896_mib() {
        assert_eq!(
            LinearMapHint::linux_x86_32_lowmem(1 << 20),
            LinearMapHint::DirectMap {
                va_base: 0xc000_0000,
                gfn_base: 0,
                frames: 0x38000
            }
        );
    }
}

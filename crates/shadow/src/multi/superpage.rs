//! Shadow superpage entries for guest superpages (see [`crate::superpage`] for the index and
//! when they are split): what such an entry says, when one may be written, and what the
//! auditor expects of one.
//!
//! A guest L2 superpage entry is shadowed by `ratio(2)` shadow superpage entries, one per
//! shadow slot of the guest entry: one 2 MiB entry for a PAE or 64-bit guest's 2 MiB page,
//! one 4 MiB entry for a 32-bit guest's 4 MiB page on 2-level shadows, and two 2 MiB entries
//! (its halves, each its own machine region) for a 32-bit guest's 4 MiB page on PAE or
//! 64-bit shadows. A fill writes all of them or none; a split removes those of the machine
//! region concerned only, and the next fill through the guest entry links its splinter in
//! every slot. Guest 1 GiB pages stay hidden (the guest's CPUID has none).

use super::{Engine, Supported};
use crate::addr::{Gfn, Maddr, Mfn};
use crate::domain::guest_mem::gfn_of;
use crate::domain::{Domain, EngineError};
use crate::host::MachineMemory;
use crate::paging::{PagingLevels, PagingMode, bits};
use crate::types::{Flavor, ShadowKey};

/// The most shadow slots one guest entry takes (a 32-bit guest's L2 on wider shadows).
const MAX_RATIO: usize = 2;

impl<G: PagingMode, S: PagingMode> Engine<G, S>
where
    (G, S): Supported,
{
    /// Frames of guest memory one shadow superpage entry maps, as a shift.
    fn sp_frames_shift() -> u32 {
        S::shift(2) - 12
    }

    /// The shadow superpage entry mapping machine frames from `base` for guest superpage
    /// entry `gentry`: the guest's US, PWT, PCD, PAT and (where both have them) NX and
    /// protection key; writable only with the guest's RW and D; never global (as splinter
    /// entries).
    fn superpage_sentry(gentry: u64, base: Mfn, flavor: Flavor) -> u64 {
        let mut e = bits::P | bits::A | bits::D | bits::PS | base.base().raw();
        if gentry & bits::RW != 0 && gentry & bits::D != 0 {
            e |= bits::RW;
        }
        e |= gentry & (bits::US | bits::PWT | bits::PCD | bits::PAT_LARGE);
        if S::ENTRY_BYTES == 8 && G::ENTRY_BYTES == 8 && flavor.nxe {
            e |= gentry & bits::NX;
        }
        if G::LEVELS == PagingLevels::Four && S::LEVELS == PagingLevels::Four {
            e |= gentry & bits::PKEY_MASK;
        }
        e
    }

    /// The guest frame where half `k` of guest superpage entry `gentry` starts.
    fn half_gfn(gentry: u64, k: u64) -> Gfn {
        let first = gfn_of(G::entry_address(gentry, 2, true));
        Gfn::new(first.raw() + (k << Self::sp_frames_shift()))
    }

    /// Whether guest entry `gentry` (index `gindex` of a guest L2) is a superpage that
    /// shadow superpages could map at all (outside the hypervisor hole, every shadow slot of
    /// it a superpage slot, its frames representable).
    fn superpage_candidate<H: MachineMemory>(
        d: &Domain<H>,
        gentry: u64,
        gindex: u64,
        flavor: Flavor,
    ) -> bool {
        S::LEVELS != PagingLevels::Zero
            && Self::ratio(2) as usize <= MAX_RATIO
            && Self::linkable(d, gentry, 2, flavor)
            && Self::is_superpage(d, gentry, 2, flavor)
            && !Self::in_hole_slot(d, 2, gindex, flavor)
    }

    /// The shadow superpage entries for guest L2 entry `gentry` at `gindex`, if it may be
    /// shadowed by superpages now.
    fn superpage_sentries<H: MachineMemory>(
        d: &mut Domain<H>,
        gentry: u64,
        gindex: u64,
        flavor: Flavor,
    ) -> Result<Option<[u64; MAX_RATIO]>, EngineError> {
        if !d.config.superpages || !Self::superpage_candidate(d, gentry, gindex, flavor) {
            return Ok(None);
        }
        // Every half's backing is looked up (and cached) first: a splinter filled instead
        // uses it (`fill_contiguous_splinter`).
        let mut bases = [None; MAX_RATIO];
        for (k, base) in bases.iter_mut().enumerate().take(Self::ratio(2) as usize) {
            *base = d.superpage_backing(Self::half_gfn(gentry, k as u64));
        }
        let mut out = [0; MAX_RATIO];
        for (k, base) in bases.iter().enumerate().take(Self::ratio(2) as usize) {
            let Some(base) = *base else {
                return Ok(None);
            };
            if d.superpage_blocked(base) || !Self::representable(base) {
                return Ok(None);
            }
            if let Some(slot) = out.get_mut(k) {
                *slot = Self::superpage_sentry(gentry, base, flavor);
            }
        }
        Ok(Some(out))
    }

    /// Whether every frame of a superpage from `base` fits a shadow entry.
    fn representable(base: Mfn) -> bool {
        S::ENTRY_BYTES == 8 || base.raw() + (1 << Self::sp_frames_shift()) <= 1 << 20
    }

    /// Writes shadow superpage entries for guest L2 entry `gentry` (index `gindex` of the
    /// guest table shadowed at `head`) when it may be shadowed by superpages; returns whether
    /// it was.
    pub(super) fn map_superpage<H: MachineMemory>(
        d: &mut Domain<H>,
        head: Mfn,
        gindex: u64,
        gentry: u64,
        flavor: Flavor,
    ) -> Result<bool, EngineError> {
        let Some(entries) = Self::superpage_sentries(d, gentry, gindex, flavor)? else {
            return Ok(false);
        };
        let ratio = Self::ratio(2);
        for (k, &new) in entries.iter().enumerate().take(ratio as usize) {
            let slot = Maddr::new(head.base().raw() + (gindex * ratio + k as u64) * S::ENTRY_BYTES);
            if d.read_sentry(slot)? != new {
                d.set_sentry(slot, new)?;
            }
        }
        Ok(true)
    }

    /// Whether a fault through guest L2 entry `gentry` might write shadow superpage entries
    /// (then a planned descent through a splinter is not taken). Reads what is cached only.
    pub(super) fn superpage_possible<H: MachineMemory>(
        d: &Domain<H>,
        gentry: u64,
        gindex: u64,
        flavor: Flavor,
    ) -> bool {
        d.config.superpages
            && Self::superpage_candidate(d, gentry, gindex, flavor)
            && (0..Self::ratio(2)).all(|k| match d.cached_backing(Self::half_gfn(gentry, k)) {
                Some(None) => false,
                Some(Some(base)) => !d.superpage_blocked(base),
                None => true,
            })
    }

    /// Fills every empty entry of the splinter of guest superpage `pde` whose entry for `va`
    /// a fill just wrote at `slot`, when the superpage's backing is known contiguous (a
    /// superpage entry could not map it: a page table in it, log-dirty mode...): each
    /// entry's frame is then known without a p2m lookup, and the guest usually goes on to
    /// the next frames. Each entry is exactly what a fault on it would write. False (nothing
    /// done) when the backing is not known contiguous.
    pub(super) fn fill_contiguous_splinter<H: MachineMemory>(
        d: &mut Domain<H>,
        va: crate::addr::Gva,
        pde: u64,
        pkey: u8,
        slot: Maddr,
    ) -> Result<bool, EngineError> {
        if !d.config.superpages {
            return Ok(false);
        }
        let mut bases = [Mfn::new(0); MAX_RATIO];
        for (k, base) in bases.iter_mut().enumerate().take(Self::ratio(2) as usize) {
            match d.cached_backing(Self::half_gfn(pde, k as u64)) {
                Some(Some(b)) => *base = b,
                _ => return Ok(false),
            }
        }
        let entries = 1u64 << (G::shift(2) - 12);
        let half = 1u64 << Self::sp_frames_shift();
        let index = (va.raw() >> 12) & (entries - 1);
        let head = slot.raw() - index * S::ENTRY_BYTES;
        let first = Self::half_gfn(pde, 0);
        for i in (0..entries).filter(|&i| i != index) {
            let s = Maddr::new(head + i * S::ENTRY_BYTES);
            if d.read_sentry(s)? != 0 {
                continue;
            }
            let Some(base) = bases.get((i / half) as usize) else {
                break;
            };
            let mfn = Mfn::new(base.raw() + i % half);
            let gfn = Gfn::new(first.raw() + i);
            let entry = Self::fl1_sentry_ram(d, pde, mfn, gfn, pkey)?;
            d.set_sentry(s, entry)?;
            d.stats.prefetched += 1;
        }
        Ok(true)
    }

    /// For the auditor: the superpage entry at shadow entry `index` of the L2 shadow with
    /// `key` when one is allowed there now, found from the guest entry and the p2m without
    /// any cache (None: no superpage entry may be there).
    pub(super) fn expected_superpage<H: MachineMemory>(
        d: &Domain<H>,
        key: ShadowKey,
        index: u64,
    ) -> Result<Option<u64>, EngineError> {
        if key.kind.level() != 2 {
            return Ok(None);
        }
        let ratio = Self::ratio(2);
        let gindex = index / ratio;
        let gentry = Self::read_gentry_in(d, Mfn::new(key.frame), gindex)?;
        if !Self::superpage_candidate(d, gentry, gindex, key.flavor) {
            return Ok(None);
        }
        let Some(base) = d.compute_backing(Self::half_gfn(gentry, index % ratio)) else {
            return Ok(None);
        };
        if d.superpage_forbidden_now(base) || !Self::representable(base) {
            return Ok(None);
        }
        Ok(Some(Self::superpage_sentry(gentry, base, key.flavor)))
    }
}

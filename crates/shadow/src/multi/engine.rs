//! Geometry and entry construction, written once for every pair: where a guest entry's
//! shadow entries sit, and what a shadow entry says given the guest entry, the p2m and the
//! permission rules (never more than the guest allows).

use super::{Engine, Supported};
use crate::addr::{Gfn, Gpa, Maddr, Mfn};
use crate::domain::entries::{MAGIC, MAGIC_NOT_PRESENT};
use crate::domain::guest_mem::{FrameCache, gfn_of};
use crate::domain::{Domain, EngineError};
use crate::host::MachineMemory;
use crate::p2m::P2mType;
use crate::paging::{ControlState, PagingLevels, PagingMode, bits, bits::cr};
use crate::types::{Flavor, ShadowKey, ShadowKind};

impl<G: PagingMode, S: PagingMode> Engine<G, S>
where
    (G, S): Supported,
{
    /// The highest guest level shadowed by hashed shadows (the PAE PDPT is not: its
    /// entries are registers loaded at CR3 load).
    pub(super) const HASHED_TOP: u8 = if G::NUM_LEVELS == 3 { 2 } else { G::NUM_LEVELS };

    /// Whether each vcpu needs its own top block above the hashed top.
    pub(super) const NEEDS_VCPU_TOP: bool = G::NUM_LEVELS != 0 && S::NUM_LEVELS > Self::HASHED_TOP;

    /// Bits of linear address a guest table at `level` spans.
    fn coverage(level: u8) -> u32 {
        if level == G::NUM_LEVELS {
            G::VA_BITS
        } else {
            G::shift(level) + G::INDEX_BITS
        }
    }

    /// Byte offset, inside the shadow of a guest table at `level`, of the entry for `va`.
    pub(super) fn soffset(level: u8, va: u64) -> u64 {
        let bits = Self::coverage(level) - S::shift(level);
        ((va >> S::shift(level)) & ((1u64 << bits) - 1)) * S::ENTRY_BYTES
    }

    /// Shadow entries per guest entry at `level` (2 for a 32-bit guest's L2 on PAE or
    /// 64-bit shadows, else 1).
    pub(super) fn ratio(level: u8) -> u64 {
        1 << (G::shift(level) - S::shift(level))
    }

    /// The kind shadowing a guest table at `level`.
    pub(super) fn kind(level: u8) -> Result<ShadowKind, EngineError> {
        ShadowKind::for_guest(G::LEVELS, level).ok_or(EngineError::Internal("no shadow kind"))
    }

    /// The splinter kind for this guest mode.
    pub(super) fn fl1_kind() -> Result<ShadowKind, EngineError> {
        ShadowKind::fl1_for_guest(G::LEVELS).ok_or(EngineError::Internal("no splinter kind"))
    }

    /// Control state carrying just what a flavor says (for reserved-bit and PS rules).
    pub(super) fn flavor_ctl(flavor: Flavor) -> ControlState {
        let mut ctl = ControlState {
            cr0: cr::CR0_PE | cr::CR0_PG,
            ..ControlState::default()
        };
        if flavor.pse {
            ctl.cr4 |= cr::CR4_PSE;
        }
        if flavor.nxe {
            ctl.efer |= cr::EFER_NXE;
        }
        if G::LEVELS == PagingLevels::Three || G::LEVELS == PagingLevels::Four {
            ctl.cr4 |= cr::CR4_PAE;
        }
        if G::LEVELS == PagingLevels::Four {
            ctl.efer |= cr::EFER_LMA | cr::EFER_LME;
        }
        ctl
    }

    /// Whether a guest entry at `level` maps a page under `flavor`.
    pub(super) fn is_superpage<H: MachineMemory>(
        d: &Domain<H>,
        entry: u64,
        level: u8,
        flavor: Flavor,
    ) -> bool {
        level > 1
            && entry & bits::PS != 0
            && G::superpage_level(level, &Self::flavor_ctl(flavor), &d.config.guest_features)
    }

    /// Whether a present guest entry has reserved bits set (its walk faults RSVD).
    pub(super) fn has_reserved<H: MachineMemory>(
        d: &Domain<H>,
        entry: u64,
        level: u8,
        flavor: Flavor,
    ) -> bool {
        let leaf = level == 1 || Self::is_superpage(d, entry, level, flavor);
        G::reserved_bits(
            entry,
            level,
            leaf,
            &Self::flavor_ctl(flavor),
            &d.config.guest_features,
        ) != 0
    }

    /// Whether an upper guest entry may be linked in the shadow: present, accessed, valid.
    pub(super) fn linkable<H: MachineMemory>(
        d: &Domain<H>,
        entry: u64,
        level: u8,
        flavor: Flavor,
    ) -> bool {
        entry & bits::P != 0 && entry & bits::A != 0 && !Self::has_reserved(d, entry, level, flavor)
    }

    /// An upper shadow entry pointing at page `child` for guest entry `gentry`: the guest's
    /// RW (only with D for a superpage, whose splinter's entries cannot hold D), US and NX.
    pub(super) fn upper_sentry(gentry: u64, child: Mfn, superpage: bool, flavor: Flavor) -> u64 {
        let mut e = bits::P | bits::A | child.base().raw();
        if gentry & bits::RW != 0 && (!superpage || gentry & bits::D != 0) {
            e |= bits::RW;
        }
        e |= gentry & bits::US;
        if S::ENTRY_BYTES == 8 && G::ENTRY_BYTES == 8 && flavor.nxe {
            e |= gentry & bits::NX;
        }
        e
    }

    /// The entry for a vcpu top pointing at `child` (PDPTEs hold only P; L4/L3 entries
    /// allow everything, the guest's own levels restrict).
    pub(super) fn top_sentry(child: Mfn, pdpte: bool) -> u64 {
        if pdpte {
            bits::P | child.base().raw()
        } else {
            bits::P | bits::RW | bits::US | bits::A | child.base().raw()
        }
    }

    /// Whether guest frame `mfn` (guest frame number `gfn`) may be mapped writable now.
    pub(super) fn frame_writable<H: MachineMemory>(d: &Domain<H>, mfn: Mfn, gfn: Gfn) -> bool {
        !d.store.is_page_table(mfn)
            && !d.pool.contains(mfn)
            && !d.hypervisor_frames.contains(&mfn)
            && !d.p2m.as_ref().is_some_and(|p| p.owns_table_frame(mfn))
            && d.log_dirty.as_ref().is_none_or(|log| log.is_dirty(gfn))
    }

    /// The entry for a guest frame that is not RAM, keeping the guest leaf's own rights.
    fn not_ram<H: MachineMemory>(d: &Domain<H>, gfn: Gfn, rights: u64) -> u64 {
        d.mmio_layout()
            .and_then(|layout| layout.encode(gfn.raw(), rights))
            .unwrap_or(0)
    }

    /// The shadow L1 entry for a 4 KiB guest entry.
    pub(super) fn leaf_sentry<H: MachineMemory>(
        d: &Domain<H>,
        frames: &FrameCache,
        gentry: u64,
        flavor: Flavor,
    ) -> Result<u64, EngineError> {
        if gentry & bits::P == 0 {
            return Ok(if d.fast_path_on() {
                MAGIC | MAGIC_NOT_PRESENT
            } else {
                0
            });
        }
        if Self::has_reserved(d, gentry, 1, flavor) || gentry & bits::A == 0 {
            return Ok(0);
        }
        let gfn = gfn_of(G::entry_address(gentry, 1, true));
        let Some((mfn, P2mType::Ram)) = frames.guest_frame(d, gfn) else {
            let mut rights = gentry & (bits::RW | bits::US | bits::D);
            if G::ENTRY_BYTES == 8 && flavor.nxe {
                rights |= gentry & bits::NX;
            }
            return Ok(Self::not_ram(d, gfn, rights));
        };
        Self::check_representable(mfn)?;
        let mut e = bits::P | bits::A | bits::D | mfn.base().raw();
        e |= gentry & (bits::US | bits::PWT | bits::PCD | bits::PAT_4K | bits::G);
        if S::ENTRY_BYTES == 8 && G::ENTRY_BYTES == 8 && flavor.nxe {
            e |= gentry & bits::NX;
        }
        if G::LEVELS == PagingLevels::Four && S::LEVELS == PagingLevels::Four {
            e |= gentry & bits::PKEY_MASK;
        }
        if gentry & bits::RW != 0 && gentry & bits::D != 0 && Self::frame_writable(d, mfn, gfn) {
            e |= bits::RW;
        }
        Ok(e)
    }

    /// The protection key a splinter of the superpage that guest entry `gentry` maps gives
    /// its entries: the guest's key where both the guest and the shadows have keys.
    pub(super) fn splinter_pkey(gentry: u64) -> u8 {
        if G::LEVELS == PagingLevels::Four && S::LEVELS == PagingLevels::Four {
            ((gentry & bits::PKEY_MASK) >> bits::PKEY_SHIFT) as u8
        } else {
            0
        }
    }

    /// The splinter entry for frame `gfn` of a guest superpage mapped by `pde`: US set and
    /// NX clear (the upper shadow entry carries the guest's rights), never global, with
    /// protection key `pkey` (the splinter's, see [`Flavor::pkey`]).
    pub(super) fn fl1_sentry<H: MachineMemory>(
        d: &Domain<H>,
        frames: &FrameCache,
        pde: u64,
        gfn: Gfn,
        pkey: u8,
    ) -> Result<u64, EngineError> {
        let Some((mfn, P2mType::Ram)) = frames.guest_frame(d, gfn) else {
            // The upper entry carries the guest's rights; D is not known here, so writes
            // take the slow path.
            return Ok(Self::not_ram(d, gfn, bits::RW | bits::US));
        };
        Self::fl1_sentry_ram(d, pde, mfn, gfn, pkey)
    }

    /// [`Engine::fl1_sentry`] for a frame `gfn` known to be RAM at machine frame `mfn`.
    pub(super) fn fl1_sentry_ram<H: MachineMemory>(
        d: &Domain<H>,
        pde: u64,
        mfn: Mfn,
        gfn: Gfn,
        pkey: u8,
    ) -> Result<u64, EngineError> {
        Self::check_representable(mfn)?;
        let mut e = bits::P | bits::A | bits::D | bits::US | mfn.base().raw();
        e |= (u64::from(pkey) << bits::PKEY_SHIFT) & bits::PKEY_MASK;
        e |= pde & (bits::PWT | bits::PCD);
        if pde & bits::PAT_LARGE != 0 {
            e |= bits::PAT_4K;
        }
        if Self::frame_writable(d, mfn, gfn) {
            e |= bits::RW;
        }
        Ok(e)
    }

    fn check_representable(mfn: Mfn) -> Result<(), EngineError> {
        if S::ENTRY_BYTES == 4 && mfn.raw() >= 1 << 20 {
            return Err(EngineError::Internal(
                "a frame above 4 GiB cannot be mapped by 2-level shadows",
            ));
        }
        Ok(())
    }

    /// Reads the guest entry at `addr` (guest-physical).
    pub(super) fn read_gentry<H: MachineMemory>(
        d: &Domain<H>,
        frames: &FrameCache,
        addr: Gpa,
    ) -> Option<u64> {
        let (mfn, ty) = frames.guest_frame(d, addr.gfn())?;
        if ty != P2mType::Ram {
            return None;
        }
        let m = Maddr::new(mfn.base().raw() | addr.offset());
        d.host.read_entry(m, G::ENTRY_BYTES).ok()
    }

    /// Reads entry `index` of the guest table in machine frame `table`.
    pub(super) fn read_gentry_in<H: MachineMemory>(
        d: &Domain<H>,
        table: Mfn,
        index: u64,
    ) -> Result<u64, EngineError> {
        let m = Maddr::new(table.base().raw() + index * G::ENTRY_BYTES);
        Ok(d.host.read_entry(m, G::ENTRY_BYTES)?)
    }

    /// The shadow that a linkable upper guest entry at `level` leads to, if it exists:
    /// the splinter of a superpage, or the shadow of the next-level table.
    pub(super) fn child_key<H: MachineMemory>(
        d: &Domain<H>,
        frames: &FrameCache,
        gentry: u64,
        level: u8,
        flavor: Flavor,
    ) -> Result<Option<ShadowKey>, EngineError> {
        // Only a top-level shadow can be "high"; what hangs below is shared.
        let flavor = Flavor {
            high: false,
            ..flavor
        };
        if Self::is_superpage(d, gentry, level, flavor) {
            let base = gfn_of(G::entry_address(gentry, level, true));
            return Ok(Some(ShadowKey {
                frame: base.raw(),
                kind: Self::fl1_kind()?,
                flavor: Flavor {
                    pkey: Self::splinter_pkey(gentry),
                    ..flavor
                },
            }));
        }
        let flavor = Flavor { pkey: 0, ..flavor };
        let gfn = gfn_of(G::entry_address(gentry, level, false));
        match frames.guest_frame(d, gfn) {
            Some((mfn, P2mType::Ram)) => Ok(Some(ShadowKey {
                frame: mfn.raw(),
                kind: Self::kind(level - 1)?,
                flavor,
            })),
            _ => Ok(None),
        }
    }

    /// Writes the `ratio(level)` shadow entries for guest entry `gindex` of a shadowed
    /// table at `level`: links to the pages of `child`, or clears them.
    pub(super) fn link<H: MachineMemory>(
        d: &mut Domain<H>,
        head: Mfn,
        level: u8,
        gindex: u64,
        gentry: u64,
        child: Option<Mfn>,
        flavor: Flavor,
    ) -> Result<(), EngineError> {
        let ratio = Self::ratio(level);
        let superpage = Self::is_superpage(d, gentry, level, flavor);
        let hole = Self::in_hole_slot(d, level, gindex, flavor);
        for k in 0..ratio {
            let slot = Maddr::new(head.base().raw() + (gindex * ratio + k) * S::ENTRY_BYTES);
            let new = match child {
                Some(c) if !hole => {
                    let page = Mfn::new(c.raw() + k);
                    Self::check_representable(page)?;
                    Self::upper_sentry(gentry, page, superpage, flavor)
                }
                // The guest may not map the hole: the host's entry stays there.
                _ if hole && S::NUM_LEVELS == 4 => d.hypervisor_l4e(),
                _ => 0,
            };
            // Most links are already in place (a fault under existing shadows relinks
            // each level): an equal entry needs none of a write's bookkeeping.
            if d.read_sentry(slot)? != new {
                d.set_sentry(slot, new)?;
            }
        }
        Ok(())
    }

    /// Whether guest L4 entry `gindex` covers the hypervisor hole (internal mode).
    /// Whether guest entry `gindex` of a table at `level` covers the hypervisor hole
    /// (internal mode): an L4 slot on 64-bit shadows; on 32-bit and PAE shadows the top
    /// 64 MiB, through the 32-bit guest's L2 or a PAE L2 used through PDPTE 3.
    pub(super) fn in_hole_slot<H: MachineMemory>(
        d: &Domain<H>,
        level: u8,
        gindex: u64,
        flavor: Flavor,
    ) -> bool {
        let va = match (G::NUM_LEVELS, level) {
            (4, 4) => crate::addr::gva_from_indices_4level(gindex, 0, 0, 0, 0).raw(),
            (2, 2) => gindex << 22,
            (3, 2) if flavor.high => (3 << 30) | (gindex << 21),
            _ => return false,
        };
        d.config.in_hole(crate::addr::Gva::new(va))
    }

    /// The guest-physical address of a leaf frame `frame`.
    pub(super) fn gpa_of(frame: Gfn, va: u64) -> Gpa {
        Gpa::new(frame.base().raw() | (va & 0xfff))
    }
}

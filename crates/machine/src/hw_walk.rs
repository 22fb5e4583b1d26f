//! The page walk of the simulated CPU (SDM vol. 3A 4.5-4.7, 4.10.3): the architectural walk
//! of whatever tables CR3 names, started at the deepest paging-structure-cache entry that
//! matches the address, and filling those caches with every non-leaf entry it reads.
//!
//! It follows the same rules as the engine's walker (`shadow2::paging::walk`), which never
//! starts below the root; a test checks that the two agree whenever the caches hold nothing
//! stale.

use shadow2::addr::{Gva, Maddr};
use shadow2::paging::bits;
use shadow2::paging::{
    Access, ControlState, CpuFeatures, FourLevel, MemError, PageSize, PagingLevels, PagingMode,
    Perms, PfErrorCode, PhysMem, ThreeLevel, TwoLevel, WalkFault, protection_fault,
};

use crate::psc::{PagingStructureCache, PscEntry};

/// A successful hardware walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HwTranslation {
    /// The machine address of the accessed byte.
    pub addr: Maddr,
    /// The size of the page mapped.
    pub size: PageSize,
    /// The leaf entry after the walk's A/D update.
    pub leaf: u64,
    /// Effective permissions over every level (cached levels included).
    pub perms: Perms,
    /// Whether the leaf is global (G with CR4.PGE).
    pub global: bool,
    /// The leaf's protection key (0 outside 4-level paging with CR4.PKE).
    pub pkey: u8,
}

/// Walks the tables of the paging mode `ctl` selects for `access` at `va`, starting at the
/// deepest entry of `psc` that covers `va`. Sets A on every entry read from memory and D on
/// the leaf of a write, only when the access succeeds. With paging disabled, the identity.
pub fn walk_cached<M>(
    mem: &mut M,
    ctl: &ControlState,
    feat: &CpuFeatures,
    psc: &mut PagingStructureCache,
    va: Gva,
    access: Access,
) -> Result<HwTranslation, WalkFault>
where
    M: PhysMem<Maddr> + ?Sized,
{
    match ctl.levels() {
        PagingLevels::Zero => Ok(HwTranslation {
            addr: Maddr::new(va.low32().raw()),
            size: PageSize::Size4K,
            leaf: 0,
            perms: Perms::ALL,
            global: false,
            pkey: 0,
        }),
        PagingLevels::Two => walk_mode::<TwoLevel, M>(mem, ctl, feat, psc, va, access),
        PagingLevels::Three => walk_mode::<ThreeLevel, M>(mem, ctl, feat, psc, va, access),
        PagingLevels::Four => walk_mode::<FourLevel, M>(mem, ctl, feat, psc, va, access),
    }
}

/// The highest level whose entries go to the paging-structure caches: the top level (a
/// PML4E, or a 32-bit PDE), except that PAE PDPTEs live in their own registers, loaded at
/// CR3 load.
fn highest_cached_level<P: PagingMode>() -> u8 {
    if P::LEVELS == PagingLevels::Three {
        2
    } else {
        P::NUM_LEVELS
    }
}

fn walk_mode<P, M>(
    mem: &mut M,
    ctl: &ControlState,
    feat: &CpuFeatures,
    psc: &mut PagingStructureCache,
    va: Gva,
    access: Access,
) -> Result<HwTranslation, WalkFault>
where
    P: PagingMode,
    M: PhysMem<Maddr> + ?Sized,
{
    let va = if P::VA_BITS == 32 { va.low32() } else { va };
    if P::VA_BITS > 32 && !va.is_canonical(P::VA_BITS) {
        return Err(WalkFault::GeneralProtection);
    }
    let access_bits = PfErrorCode::for_access_in(access, ctl, P::LEVELS).bits();
    let page_fault = |bits: u32| WalkFault::PageFault(PfErrorCode(access_bits | bits));
    let nx_enabled = ctl.nxe() && P::ENTRY_BYTES == 8;

    let (mut table, mut level, mut perms) = match psc.deepest(va, 2, highest_cached_level::<P>()) {
        Some(cached) => (cached.table.base().raw(), cached.level - 1, cached.perms),
        None => (P::root_table(ctl.cr3), P::NUM_LEVELS, Perms::ALL),
    };
    // The entries read from memory (not the PDPTE registers), for the A/D update.
    let mut read: [(Maddr, u8); 4] = [(Maddr::new(0), 0); 4];
    let mut reads = 0;
    let (leaf, leaf_level) = loop {
        let index = P::index(va.raw(), level) as u64;
        let addr = Maddr::new(table.wrapping_add(index * P::ENTRY_BYTES));
        let is_pdpte = P::LEVELS == PagingLevels::Three && level == 3;
        let entry = if is_pdpte {
            ctl.pdptes.get(index as usize).copied().unwrap_or(0)
        } else {
            let entry = mem
                .read_entry(addr, P::ENTRY_BYTES)
                .map_err(WalkFault::Memory)?;
            if let Some(slot) = read.get_mut(reads) {
                *slot = (addr, level);
                reads += 1;
            }
            entry
        };
        if entry & bits::P == 0 {
            return Err(page_fault(0));
        }
        let is_leaf = level == 1 || (entry & bits::PS != 0 && P::superpage_level(level, ctl, feat));
        if P::reserved_bits(entry, level, is_leaf, ctl, feat) != 0 {
            return Err(page_fault(PfErrorCode::P | PfErrorCode::RSVD));
        }
        if !is_pdpte {
            perms.write &= entry & bits::RW != 0;
            perms.user &= entry & bits::US != 0;
            perms.exec &= !(nx_enabled && entry & bits::NX != 0);
        }
        if is_leaf {
            break (entry, level);
        }
        table = P::entry_address(entry, level, false);
        if !is_pdpte {
            psc.insert(PscEntry {
                level,
                va,
                shift: P::shift(level),
                table: Maddr::new(table).mfn(),
                perms,
            });
        }
        level -= 1;
    };

    let pkey = if P::LEVELS == PagingLevels::Four && ctl.pke() {
        ((leaf & bits::PKEY_MASK) >> bits::PKEY_SHIFT) as u8
    } else {
        0
    };
    let pkey_fault =
        P::LEVELS == PagingLevels::Four && ctl.pke() && pkey_denies(access, perms, pkey, ctl);
    let pkey_bits = if pkey_fault {
        PfErrorCode::P | PfErrorCode::PK
    } else {
        0
    };
    match protection_fault(access, perms, ctl) {
        Some(bits) => return Err(page_fault(bits | pkey_bits)),
        None if pkey_fault => return Err(page_fault(pkey_bits)),
        None => {}
    }

    let mut leaf = leaf;
    for &(addr, entry_level) in read.iter().take(reads) {
        let mut set = bits::A;
        if entry_level == leaf_level && access.is_write() {
            set |= bits::D;
        }
        let updated = set_bits(mem, addr, P::ENTRY_BYTES, set).map_err(WalkFault::Memory)?;
        if entry_level == leaf_level {
            leaf = updated;
        }
    }

    let size = if leaf_level == 1 {
        PageSize::Size4K
    } else {
        P::superpage_size(leaf_level)
    };
    let base = P::entry_address(leaf, leaf_level, true);
    Ok(HwTranslation {
        addr: Maddr::new(base | (va.raw() & (size.bytes() - 1))),
        size,
        leaf,
        perms,
        global: ctl.pge() && leaf & bits::G != 0,
        pkey,
    })
}

/// Whether PKRU forbids this data access to a user-mode page (SDM 4.6.2); PKRU is read at
/// access time, never cached.
pub(crate) fn pkey_denies(access: Access, perms: Perms, pkey: u8, ctl: &ControlState) -> bool {
    if access.is_fetch() || !perms.user {
        return false;
    }
    let shift = 2 * u32::from(pkey);
    let access_disable = ctl.pkru >> shift & 1 != 0;
    let write_disable = ctl.pkru >> (shift + 1) & 1 != 0;
    access_disable || (access.is_write() && write_disable && (access.is_user() || ctl.wp()))
}

/// ORs `set` into the entry at `addr` as the CPU's locked A/D update does, re-reading it
/// first: an earlier update of the same walk may have changed it (self-referencing tables).
fn set_bits<M>(mem: &mut M, addr: Maddr, bytes: u64, set: u64) -> Result<u64, MemError>
where
    M: PhysMem<Maddr> + ?Sized,
{
    let old = mem.read_entry(addr, bytes)?;
    let new = old | set;
    if new != old {
        mem.write_entry(addr, bytes, new)?;
    }
    Ok(new)
}

#[cfg(test)]
mod tests;

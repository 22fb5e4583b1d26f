//! Reflecting a change of guest page-table memory into a shadow of that page, and the
//! expected shadow entry for a guest entry (which the auditor compares against).

use super::{Engine, Supported};
use crate::addr::{Gfn, Maddr, Mfn};
use crate::domain::guest_mem::FrameCache;
use crate::domain::{Domain, EngineError};
use crate::host::MachineMemory;
use crate::paging::PagingMode;
use crate::types::ShadowKey;

impl<G: PagingMode, S: PagingMode> Engine<G, S>
where
    (G, S): Supported,
{
    /// Re-derives the shadow entries for guest entries overlapping bytes
    /// `offset..offset+len` of the guest table shadowed by `head`.
    pub(super) fn validate<H: MachineMemory>(
        d: &mut Domain<H>,
        head: Mfn,
        key: ShadowKey,
        offset: u64,
        len: u64,
    ) -> Result<(), EngineError> {
        if len == 0 || key.kind.is_fl1() {
            return Ok(());
        }
        let first = offset / G::ENTRY_BYTES;
        let last = (offset + len - 1) / G::ENTRY_BYTES;
        let entries = G::ENTRIES_PER_TABLE as u64;
        let level = key.kind.level();
        let frames = FrameCache::new();
        for gindex in first..=last.min(entries - 1) {
            d.stats.validated_entries += 1;
            let gentry = Self::read_gentry_in(d, Mfn::new(key.frame), gindex)?;
            if level == 1 {
                let slot = Maddr::new(head.base().raw() + gindex * S::ENTRY_BYTES);
                let new = Self::leaf_sentry(d, &frames, gentry, key.flavor)?;
                d.set_sentry(slot, new)?;
            } else if level == 2 && Self::map_superpage(d, head, gindex, gentry, key.flavor)? {
                // Shadowed by superpage entries (they replace a splinter's link).
            } else {
                let child = Self::existing_child(d, &frames, gentry, level, key)?;
                Self::link(d, head, level, gindex, gentry, child, key.flavor)?;
            }
        }
        Ok(())
    }

    /// The existing shadow an upper guest entry leads to, if it is linkable.
    fn existing_child<H: MachineMemory>(
        d: &Domain<H>,
        frames: &FrameCache,
        gentry: u64,
        level: u8,
        key: ShadowKey,
    ) -> Result<Option<Mfn>, EngineError> {
        if !Self::linkable(d, gentry, level, key.flavor) {
            return Ok(None);
        }
        Ok(Self::child_key(d, frames, gentry, level, key.flavor)?.and_then(|k| d.store.lookup(&k)))
    }

    /// For the auditor: the upper shadow entry at shadow entry `index` of the shadow with
    /// `key` when it is present (None: it must not be present).
    pub(super) fn expected_upper<H: MachineMemory>(
        d: &Domain<H>,
        key: ShadowKey,
        index: u64,
    ) -> Result<Option<u64>, EngineError> {
        let level = key.kind.level();
        let ratio = Self::ratio(level);
        let gindex = index / ratio;
        let gentry = Self::read_gentry_in(d, Mfn::new(key.frame), gindex)?;
        let Some(child) = Self::existing_child(d, &FrameCache::new(), gentry, level, key)? else {
            return Ok(None);
        };
        let superpage = Self::is_superpage(d, gentry, level, key.flavor);
        let page = Mfn::new(child.raw() + index % ratio);
        Ok(Some(Self::upper_sentry(
            gentry, page, superpage, key.flavor,
        )))
    }

    /// For the auditor: the leaf shadow entry at `index` of the L1 shadow or splinter with
    /// `key`, as a fill would write it now.
    pub(super) fn expected_leaf<H: MachineMemory>(
        d: &Domain<H>,
        key: ShadowKey,
        index: u64,
    ) -> Result<Option<u64>, EngineError> {
        if key.kind.is_fl1() {
            // A splinter's entries depend on the p2m and frame state only; its upper entry
            // carries the guest's rights.
            let gfn = Gfn::new(key.frame + index);
            let pkey = key.flavor.pkey;
            return Ok(Some(Self::fl1_sentry(d, &FrameCache::new(), 0, gfn, pkey)?));
        }
        // An out-of-sync page's shadows were validated from its snapshot.
        let table = Mfn::new(key.frame);
        let gentry = match d.synced_entry(table, index * G::ENTRY_BYTES, G::ENTRY_BYTES) {
            Some(entry) => entry,
            None => Self::read_gentry_in(d, table, index)?,
        };
        Ok(Some(Self::leaf_sentry(
            d,
            &FrameCache::new(),
            gentry,
            key.flavor,
        )?))
    }
}

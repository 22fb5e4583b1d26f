//! Shadow superpages (KVM's large-page tracking; Xen splinters every guest superpage): a
//! guest superpage whose machine backing is contiguous RAM aligned to the shadow's superpage
//! size, none of whose frames is a shadowed page table, is shadowed by one superpage entry
//! (PS) in the shadow L2 instead of a splinter.
//!
//! The index kept here makes every question about them a bounded lookup:
//!
//! - `backing`: per guest region (a shadow superpage's worth of guest frames, aligned), the
//!   first machine frame when its p2m maps it to contiguous, aligned RAM (checked once, by
//!   reading the region's p2m entries, and forgotten when the p2m changes any frame of it);
//! - `slots`: per machine region, the shadow entries that map it as a superpage, kept by
//!   `Domain::set_sentry` like every other count. At most [`MAX_SLOTS_PER_REGION`] per region,
//!   so that splitting a region is bounded work.
//!
//! What forbids a superpage entry is looked up when one would be made (a page table, a frame
//! waiting for the write-access scan or having its mappings removed, log-dirty mode on: each a
//! range query), and the entries are split (cleared, with the flush that needs; later faults
//! fill splinters) when it starts to hold: a frame of the region gets its first shadow or has
//! its write access removed (`Domain::find_writable`), its mappings are removed (`set_p2m`,
//! `remove_frame`), or log-dirty mode is enabled.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;

use crate::addr::{Gfn, Maddr, Mfn};
use crate::domain::{Domain, EngineError};
use crate::host::MachineMemory;
use crate::p2m::P2mType;
use crate::paging::{PagingLevels, bits};

/// The most shadow superpage entries mapping one machine region at once: beyond it, faults
/// fill splinters, so that a split never clears more than this many entries.
pub const MAX_SLOTS_PER_REGION: usize = 64;

/// The superpage index of a domain (see the module documentation).
#[derive(Clone, Debug, Default)]
pub struct SuperpageIndex {
    /// Machine region number -> the shadow entries mapping it as a superpage.
    slots: BTreeMap<u64, BTreeSet<Maddr>>,
    /// Guest region number -> its first machine frame when contiguous aligned RAM, or None.
    backing: BTreeMap<u64, Option<Mfn>>,
    /// Entries in `slots`.
    entries: usize,
}

impl SuperpageIndex {
    /// How many shadow superpage entries there are.
    pub fn entries(&self) -> usize {
        self.entries
    }

    /// Every shadow superpage entry, as (machine region number, slot).
    pub fn iter(&self) -> impl Iterator<Item = (u64, Maddr)> + '_ {
        self.slots
            .iter()
            .flat_map(|(r, set)| set.iter().map(move |s| (*r, *s)))
    }

    /// Whether the entry at `slot` is recorded as mapping machine region `region`.
    pub fn holds(&self, region: u64, slot: Maddr) -> bool {
        self.slots.get(&region).is_some_and(|s| s.contains(&slot))
    }

    fn slots_in(&self, region: u64) -> usize {
        self.slots.get(&region).map_or(0, BTreeSet::len)
    }

    fn add(&mut self, region: u64, slot: Maddr) {
        if self.slots.entry(region).or_default().insert(slot) {
            self.entries += 1;
        }
    }

    fn remove(&mut self, region: u64, slot: Maddr) {
        if let Some(set) = self.slots.get_mut(&region) {
            if set.remove(&slot) {
                self.entries -= 1;
            }
            if set.is_empty() {
                self.slots.remove(&region);
            }
        }
    }
}

impl<H: MachineMemory> Domain<H> {
    /// log2 of the frames a shadow superpage maps: 2 MiB in PAE and 4-level shadows, 4 MiB
    /// in 2-level ones.
    pub(crate) fn superpage_order(&self) -> u32 {
        if self.config.shadow_levels == PagingLevels::Two {
            10
        } else {
            9
        }
    }

    /// The machine region a frame lies in.
    fn machine_region(&self, mfn: Mfn) -> u64 {
        mfn.raw() >> self.superpage_order()
    }

    /// Whether `e`, written in a shadow of `level`, is a superpage entry.
    pub(crate) fn is_superpage_sentry(&self, level: u8, e: u64) -> bool {
        level == 2
            && e & bits::P != 0
            && e & bits::PS != 0
            && !crate::domain::entries::is_magic(e)
            && !self.is_hole_entry(e)
    }

    /// Keeps the index exact when the upper entry at `slot` changes from `old` to `new`
    /// (called by `Domain::set_sentry` for every upper entry written).
    pub(crate) fn note_upper_sentry(&mut self, level: u8, slot: Maddr, old: u64, new: u64) {
        if self.is_superpage_sentry(level, old)
            && let Some(m) = self.sentry_frame(old)
        {
            let region = self.machine_region(m);
            self.superpages.remove(region, slot);
        }
        if self.is_superpage_sentry(level, new)
            && let Some(m) = self.sentry_frame(new)
        {
            let region = self.machine_region(m);
            self.superpages.add(region, slot);
            self.stats.superpages_mapped += 1;
        }
    }

    /// The first machine frame of guest region `first..first + 2^order` when it is RAM,
    /// contiguous, aligned and no hypervisor-side frame; cached (for regions whose first
    /// frame is RAM) until the p2m changes a frame of the region.
    pub(crate) fn superpage_backing(&mut self, first: Gfn) -> Option<Mfn> {
        let order = self.superpage_order();
        let region = first.raw() >> order;
        if first.raw() & ((1 << order) - 1) != 0 {
            return None;
        }
        if let Some(known) = self.superpages.backing.get(&region) {
            return *known;
        }
        // Only regions starting with RAM are remembered: so the cache holds at most one
        // answer per region of the guest's RAM, whatever frames its entries name.
        if !matches!(self.guest_frame(first), Some((_, P2mType::Ram))) {
            return None;
        }
        let found = self.compute_backing(first);
        self.stats.add_work(1 << order);
        self.superpages.backing.insert(region, found);
        found
    }

    /// [`Domain::superpage_backing`] from the p2m alone, without the cache.
    pub(crate) fn compute_backing(&self, first: Gfn) -> Option<Mfn> {
        let frames = 1u64 << self.superpage_order();
        let (base, ty) = self.guest_frame(first)?;
        if ty != P2mType::Ram || base.raw() & (frames - 1) != 0 {
            return None;
        }
        let contiguous = match &self.p2m {
            Some(p2m) => {
                let mut next = 0u64;
                let mut ok = true;
                let r = p2m.for_each_from(&self.host, first, frames as usize, |gfn, e| {
                    ok &= gfn.raw() == first.raw() + next
                        && e.ty == P2mType::Ram
                        && e.mfn.raw() == base.raw() + next;
                    next += 1;
                });
                r.is_ok() && ok && next == frames
            }
            None => {
                self.owned
                    .range(base..Mfn::new(base.raw() + frames))
                    .count() as u64
                    == frames
            }
        };
        let clean = (0..frames).all(|i| !self.forbidden(Mfn::new(base.raw() + i)));
        (contiguous && clean).then_some(base)
    }

    /// What the cache knows of the backing of the guest region starting at `first`.
    pub(crate) fn cached_backing(&self, first: Gfn) -> Option<Option<Mfn>> {
        let order = self.superpage_order();
        if first.raw() & ((1 << order) - 1) != 0 {
            return Some(None);
        }
        self.superpages
            .backing
            .get(&(first.raw() >> order))
            .copied()
    }

    /// For the auditor: whether anything forbids a superpage entry over machine region
    /// `base..` now. While log-dirty mode is being enabled, entries made before wait for
    /// their split.
    pub(crate) fn superpage_forbidden_now(&self, base: Mfn) -> bool {
        let end = Mfn::new(base.raw() + (1 << self.superpage_order()));
        let log_dirty = self
            .log_dirty
            .as_ref()
            .is_some_and(|l| l.enabling.is_none());
        log_dirty
            || self.store.any_page_table_in(base, end)
            || self.remove.scan.any_pending_in(base, end)
            || self.mapping_blocked_in(base, end)
    }

    /// Forgets what is known of the backing of the guest region holding `gfn` (its p2m
    /// entry, or ownership of the frame, changes).
    pub(crate) fn forget_superpage_backing(&mut self, gfn: Gfn) {
        let region = gfn.raw() >> self.superpage_order();
        self.superpages.backing.remove(&region);
    }

    /// Whether a superpage entry may not map machine region `base..base + 2^order` now:
    /// log-dirty mode is on, a frame of it is a shadowed page table, waits for the
    /// write-access scan or has its mappings removed, or the region has as many superpage
    /// entries as it may.
    pub(crate) fn superpage_blocked(&self, base: Mfn) -> bool {
        let end = Mfn::new(base.raw() + (1 << self.superpage_order()));
        self.log_dirty.is_some()
            || self.store.any_page_table_in(base, end)
            || self.remove.scan.any_pending_in(base, end)
            || self.mapping_blocked_in(base, end)
            || self.superpages.slots_in(self.machine_region(base)) >= MAX_SLOTS_PER_REGION
    }

    /// Splits every superpage entry mapping the machine region of `mfn`: each is cleared
    /// (the flush it needs is owed), and later faults fill splinters.
    pub(crate) fn split_superpages_of(&mut self, mfn: Mfn) -> Result<(), EngineError> {
        let region = self.machine_region(mfn);
        let slots: Vec<Maddr> = self
            .superpages
            .slots
            .get(&region)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        for slot in slots {
            self.set_sentry(slot, 0)?;
            self.stats.superpage_splits += 1;
        }
        Ok(())
    }

    /// Splits up to `budget` superpage entries of any region (log-dirty mode being enabled):
    /// returns whether none is left, and the first frames of the writable ones split.
    pub(crate) fn split_superpages_step(
        &mut self,
        budget: u64,
    ) -> Result<(bool, Vec<Mfn>), EngineError> {
        let mut written = Vec::new();
        let take = usize::try_from(budget.max(1)).unwrap_or(usize::MAX);
        let slots: Vec<Maddr> = self.superpages.iter().take(take).map(|(_, s)| s).collect();
        for slot in slots {
            let e = self.read_sentry(slot)?;
            if e & bits::RW != 0
                && let Some(m) = self.sentry_frame(e)
            {
                written.push(m);
            }
            self.set_sentry(slot, 0)?;
            self.stats.superpage_splits += 1;
        }
        Ok((self.superpages.entries() == 0, written))
    }
}

#[cfg(test)]
mod tests;

//! What the p2m remembers of its own tables between lookups, so that a lookup is not a
//! full walk of the tables (a third of a fill's and of an emulated write's time went to
//! p2m walks):
//!
//! - the **entries** last found, by guest frame: a hit reads no machine memory;
//! - the **leaf tables** last reached, by the range of guest frames each covers: a miss
//!   then reads one word (the leaf entry) instead of one per level.
//!
//! Coherence: the tables are written only by [`P2m`](super::P2m)'s own `&mut self`
//! methods (a guest can never map a p2m table, and the hardware never writes one: A and D
//! are preset), and each of them forgets the guest frame it is about to change before it
//! changes anything, so a cached entry is always the entry in memory. A leaf table, once
//! linked, stays linked at the same place until teardown (intermediate tables are never
//! freed while the p2m lives), and teardown forgets everything. Only present entries are
//! cached: an absent frame is looked up in the tables every time.

use core::cell::Cell;

use super::P2mEntry;
use crate::addr::Mfn;

/// Entries remembered (a direct-mapped cache: a walk touches 4 or 5 frames, a workload's
/// page tables and hot pages a few hundred).
const ENTRY_SLOTS: usize = 256;
/// Leaf tables remembered (each covers 2 or 4 MiB of guest-physical space).
const LEAF_SLOTS: usize = 32;

/// The p2m's lookup caches. See the module documentation.
#[derive(Debug)]
pub(super) struct LookupCache {
    entries: [Cell<Option<(u64, P2mEntry)>>; ENTRY_SLOTS],
    leaves: [Cell<Option<(u64, Mfn)>>; LEAF_SLOTS],
}

/// The slot of `key` in a table of `slots` (Fibonacci hashing: strided frames spread).
fn slot_of(key: u64, slots: usize) -> usize {
    let hashed = key.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (hashed >> 32) as usize % slots
}

impl LookupCache {
    pub(super) fn new() -> LookupCache {
        LookupCache {
            entries: core::array::from_fn(|_| Cell::new(None)),
            leaves: core::array::from_fn(|_| Cell::new(None)),
        }
    }

    /// The cached entry of guest frame `gfn`.
    #[inline]
    pub(super) fn entry(&self, gfn: u64) -> Option<P2mEntry> {
        match self.entries.get(slot_of(gfn, ENTRY_SLOTS))?.get() {
            Some((g, e)) if g == gfn => Some(e),
            _ => None,
        }
    }

    /// Remembers that guest frame `gfn` maps to `e` in the tables.
    #[inline]
    pub(super) fn remember_entry(&self, gfn: u64, e: P2mEntry) {
        if let Some(slot) = self.entries.get(slot_of(gfn, ENTRY_SLOTS)) {
            slot.set(Some((gfn, e)));
        }
    }

    /// Forgets the entry of guest frame `gfn` (it is about to change).
    #[inline]
    pub(super) fn forget_entry(&self, gfn: u64) {
        if let Some(slot) = self.entries.get(slot_of(gfn, ENTRY_SLOTS))
            && slot.get().is_some_and(|(g, _)| g == gfn)
        {
            slot.set(None);
        }
    }

    /// The cached leaf table covering leaf range `range` (a guest frame number without its
    /// leaf index bits).
    #[inline]
    pub(super) fn leaf(&self, range: u64) -> Option<Mfn> {
        match self.leaves.get(slot_of(range, LEAF_SLOTS))?.get() {
            Some((r, table)) if r == range => Some(table),
            _ => None,
        }
    }

    /// Remembers that leaf table `table` covers leaf range `range`.
    #[inline]
    pub(super) fn remember_leaf(&self, range: u64, table: Mfn) {
        if let Some(slot) = self.leaves.get(slot_of(range, LEAF_SLOTS)) {
            slot.set(Some((range, table)));
        }
    }

    /// Forgets everything (teardown).
    pub(super) fn clear(&self) {
        for slot in &self.entries {
            slot.set(None);
        }
        for slot in &self.leaves {
            slot.set(None);
        }
    }
}

//! Paging-structure caches (SDM vol. 3A 4.10.3): per non-leaf level, the machine frame of
//! the next table and the rights accumulated down to that level, kept by linear-address
//! prefix. A walk that misses the TLB starts at the deepest matching entry and reads the
//! lower table at the cached frame whatever the upper entries in memory say now, so a shadow
//! page freed or reused before the flush that covers it is walked at its old level, as real
//! hardware would walk it.
//!
//! Entries are removed only where the architecture removes them (INVLPG, MOV to CR3, the
//! paging-mode changes, a full flush) and, for the faulting address only, by a page fault
//! (SDM 4.10.4.1).

use std::collections::VecDeque;

use shadow2::addr::{Gva, Mfn};
use shadow2::paging::Perms;

/// The deepest and shallowest levels whose entries can be cached: a PDE (2) up to a PML4E
/// (4). Level 1 entries are leaves: they only ever go to the TLB.
const LOWEST: u8 = 2;
const HIGHEST: u8 = 4;
const LEVELS: usize = (HIGHEST - LOWEST + 1) as usize;

/// One cached paging-structure entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PscEntry {
    /// The level of the cached entry: 4 = PML4E, 3 = PDPTE, 2 = PDE. The table it points
    /// at is one level below.
    pub level: u8,
    /// The first linear address the entry covers (aligned to `1 << shift`).
    pub va: Gva,
    /// How many low linear-address bits the entry does not fix (39, 30, 22 or 21).
    pub shift: u32,
    /// The machine frame of the next-level table.
    pub table: Mfn,
    /// The rights of every entry from the top down to this one (R/W, U/S, XD).
    pub perms: Perms,
}

impl PscEntry {
    /// Whether the entry would be used to translate `va`.
    pub fn covers(&self, va: Gva) -> bool {
        prefix(va, self.shift) == prefix(self.va, self.shift)
    }
}

fn prefix(va: Gva, shift: u32) -> u64 {
    va.raw().checked_shr(shift).unwrap_or(0)
}

/// Paging-structure-cache event counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PscStats {
    /// Walks that started below the root thanks to an entry.
    pub hits: u64,
    /// Entries made.
    pub inserts: u64,
    /// Entries pushed out by the capacity bound.
    pub evictions: u64,
    /// Removals of every entry.
    pub flushes: u64,
}

/// The paging-structure caches of one logical processor: one first-in-first-out cache per
/// level, each bounded by the same capacity.
#[derive(Clone, Debug)]
pub struct PagingStructureCache {
    enabled: bool,
    capacity: usize,
    /// Index `level - LOWEST`; oldest entry first.
    levels: [VecDeque<PscEntry>; LEVELS],
    stats: PscStats,
}

impl Default for PagingStructureCache {
    fn default() -> Self {
        PagingStructureCache::new(PagingStructureCache::DEFAULT_CAPACITY)
    }
}

impl PagingStructureCache {
    /// Entries per level of [`PagingStructureCache::default`].
    pub const DEFAULT_CAPACITY: usize = 32;

    /// Enabled caches of `capacity` entries per level (0: caches nothing).
    pub fn new(capacity: usize) -> PagingStructureCache {
        PagingStructureCache {
            enabled: true,
            capacity,
            levels: Default::default(),
            stats: PscStats::default(),
        }
    }

    /// Whether entries are made at all.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Turns the caches on or off; turning them off drops every entry.
    pub fn set_enabled(&mut self, enabled: bool) {
        self.enabled = enabled;
        if !enabled {
            self.clear();
        }
    }

    /// Entries per level at most.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The number of entries held, every level together.
    pub fn len(&self) -> usize {
        self.levels.iter().map(VecDeque::len).sum()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The event counts so far.
    pub fn stats(&self) -> PscStats {
        self.stats
    }

    /// Zeroes the event counts.
    pub fn reset_stats(&mut self) {
        self.stats = PscStats::default();
    }

    /// The entry at `level` that would translate `va`, if any (not counted).
    pub fn peek(&self, level: u8, va: Gva) -> Option<PscEntry> {
        self.level(level)?.iter().find(|e| e.covers(va)).copied()
    }

    /// The deepest entry at `lowest..=highest` that translates `va`, counted as a hit.
    pub fn deepest(&mut self, va: Gva, lowest: u8, highest: u8) -> Option<PscEntry> {
        let found = (lowest.max(LOWEST)..=highest.min(HIGHEST)).find_map(|l| self.peek(l, va));
        if found.is_some() {
            self.stats.hits += 1;
        }
        found
    }

    /// Caches `entry` (its `va` may be any address it covers), replacing the entry of the
    /// same level and prefix; the oldest entry of the level goes when the level is full.
    pub fn insert(&mut self, mut entry: PscEntry) {
        if !self.enabled || self.capacity == 0 {
            return;
        }
        let capacity = self.capacity;
        entry.va = Gva::new(entry.va.raw() & !low_mask(entry.shift));
        let Some(level) = self.level_mut(entry.level) else {
            return;
        };
        level.retain(|e| !e.covers(entry.va));
        let mut evicted = 0;
        while level.len() >= capacity {
            level.pop_front();
            evicted += 1;
        }
        level.push_back(entry);
        self.stats.evictions += evicted;
        self.stats.inserts += 1;
    }

    /// Removes every entry that would translate `va`, at every level: what a page fault on
    /// `va` does. Returns how many were removed.
    pub fn invalidate(&mut self, va: Gva) -> usize {
        let before = self.len();
        for level in &mut self.levels {
            level.retain(|e| !e.covers(va));
        }
        before - self.len()
    }

    /// Removes every entry (INVLPG, MOV to CR3, a paging-mode change, a full flush).
    pub fn flush(&mut self) {
        self.stats.flushes += 1;
        self.clear();
    }

    /// Every entry, deepest level first, oldest first within a level.
    pub fn entries(&self) -> impl Iterator<Item = &PscEntry> + '_ {
        self.levels.iter().flatten()
    }

    fn clear(&mut self) {
        for level in &mut self.levels {
            level.clear();
        }
    }

    fn level(&self, level: u8) -> Option<&VecDeque<PscEntry>> {
        self.levels.get(usize::from(level.checked_sub(LOWEST)?))
    }

    fn level_mut(&mut self, level: u8) -> Option<&mut VecDeque<PscEntry>> {
        self.levels.get_mut(usize::from(level.checked_sub(LOWEST)?))
    }
}

fn low_mask(shift: u32) -> u64 {
    1u64.checked_shl(shift).map_or(u64::MAX, |b| b - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pde(va: u64, table: u64) -> PscEntry {
        PscEntry {
            level: 2,
            va: Gva::new(va),
            shift: 21,
            table: Mfn::new(table),
            perms: Perms::ALL,
        }
    }

    #[test]
    fn an_entry_covers_its_whole_prefix_and_nothing_else() {
        let mut psc = PagingStructureCache::new(4);
        psc.insert(pde(0x40_1234, 7));
        let e = psc.peek(2, Gva::new(0x5f_ffff)).unwrap();
        assert_eq!((e.va, e.table), (Gva::new(0x40_0000), Mfn::new(7)));
        assert!(psc.peek(2, Gva::new(0x60_0000)).is_none());
        assert!(psc.peek(3, Gva::new(0x40_0000)).is_none());
    }

    #[test]
    fn the_deepest_level_wins_and_counts_a_hit() {
        let mut psc = PagingStructureCache::new(4);
        psc.insert(PscEntry {
            level: 3,
            shift: 30,
            ..pde(0, 1)
        });
        psc.insert(pde(0, 2));
        assert_eq!(
            psc.deepest(Gva::new(0x1000), 2, 4).unwrap().table,
            Mfn::new(2)
        );
        assert_eq!(
            psc.deepest(Gva::new(0x1000), 3, 4).unwrap().table,
            Mfn::new(1)
        );
        assert_eq!(psc.stats().hits, 2);
    }

    #[test]
    fn a_new_entry_for_the_same_prefix_replaces_the_old_one() {
        let mut psc = PagingStructureCache::new(4);
        psc.insert(pde(0x20_0000, 1));
        psc.insert(pde(0x20_0000, 2));
        assert_eq!(psc.len(), 1);
        assert_eq!(psc.peek(2, Gva::new(0x20_0000)).unwrap().table, Mfn::new(2));
    }

    #[test]
    fn each_level_is_bounded_first_in_first_out() {
        let mut psc = PagingStructureCache::new(2);
        for i in 0..3u64 {
            psc.insert(pde(i << 21, i));
        }
        assert!(psc.peek(2, Gva::new(0)).is_none());
        assert!(psc.peek(2, Gva::new(2 << 21)).is_some());
        assert_eq!(psc.stats().evictions, 1);
        assert_eq!(psc.len(), 2);
    }

    #[test]
    fn invalidation_by_address_keeps_other_prefixes() {
        let mut psc = PagingStructureCache::new(4);
        psc.insert(pde(0, 1));
        psc.insert(pde(1 << 21, 2));
        psc.insert(PscEntry {
            level: 3,
            shift: 30,
            ..pde(0, 3)
        });
        assert_eq!(psc.invalidate(Gva::new(0x1000)), 2);
        assert_eq!(
            psc.entries().map(|e| e.table).collect::<Vec<_>>(),
            [Mfn::new(2)]
        );
        psc.flush();
        assert!(psc.is_empty());
    }

    #[test]
    fn disabled_caches_hold_nothing() {
        let mut psc = PagingStructureCache::new(4);
        psc.insert(pde(0, 1));
        psc.set_enabled(false);
        assert!(psc.is_empty());
        psc.insert(pde(0, 1));
        assert!(psc.is_empty());
    }
}

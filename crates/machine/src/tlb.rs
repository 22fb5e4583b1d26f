//! A per-vcpu TLB model: translations cached by virtual page, kept until INVLPG, a CR3 load
//! or a capacity eviction removes them, so that a missing flush shows as a stale access.

use std::collections::VecDeque;

use shadow2::addr::{Gva, Maddr, Mfn};
use shadow2::paging::{PageSize, Perms};

use crate::fx::FxHashMap;

/// Every page size an entry can have, smallest first: the order lookups try them in.
const SIZES: [PageSize; 4] = [
    PageSize::Size4K,
    PageSize::Size2M,
    PageSize::Size4M,
    PageSize::Size1G,
];

/// One cached translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TlbEntry {
    /// The first linear address of the page (aligned to `size` once inserted; any address
    /// inside the page when handed to [`Tlb::insert`]).
    pub va: Gva,
    /// The first 4 KiB machine frame of the page.
    pub frame: Mfn,
    /// The page size of the leaf that mapped it.
    pub size: PageSize,
    /// Effective permissions over every level of the walk (R/W, U/S, XD).
    pub perms: Perms,
    /// Whether the leaf's D bit was set: a write through a clean entry must walk again so
    /// that the walk sets D, as hardware does.
    pub dirty: bool,
    /// Whether the leaf is global (G with CR4.PGE): it survives CR3 loads.
    pub global: bool,
    /// The leaf's protection key (0 outside 4-level paging with CR4.PKE).
    pub pkey: u8,
}

impl TlbEntry {
    /// Whether the page holds `va`.
    pub fn covers(&self, va: Gva) -> bool {
        page_number(va, self.size) == page_number(self.va, self.size)
    }

    /// The machine address `va` (inside the page) translates to.
    pub fn translate(&self, va: Gva) -> Maddr {
        Maddr::new(self.frame.base().raw() | (va.raw() & (self.size.bytes() - 1)))
    }

    /// The U/S bit of the effective permissions: whether this is a user-mode page.
    pub fn user(&self) -> bool {
        self.perms.user
    }
}

/// TLB event counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct TlbStats {
    /// Lookups that found an entry.
    pub hits: u64,
    /// Lookups that found none.
    pub misses: u64,
    /// Entries inserted.
    pub inserts: u64,
    /// Entries pushed out by the capacity bound.
    pub evictions: u64,
    /// INVLPG operations.
    pub invlpgs: u64,
    /// Flushes that keep global entries.
    pub non_global_flushes: u64,
    /// Flushes of everything.
    pub full_flushes: u64,
}

/// Where an entry lives: its page size's shift and its page number at that size.
type Key = (u32, u64);

fn page_number(va: Gva, size: PageSize) -> u64 {
    va.raw() >> size.shift()
}

fn key(va: Gva, size: PageSize) -> Key {
    (size.shift(), page_number(va, size))
}

/// The index of `size` in [`SIZES`].
fn size_index(size: PageSize) -> usize {
    match size {
        PageSize::Size4K => 0,
        PageSize::Size2M => 1,
        PageSize::Size4M => 2,
        PageSize::Size1G => 3,
    }
}

#[derive(Clone, Copy, Debug)]
struct Slot {
    entry: TlbEntry,
    /// Insertion stamp: tells a live FIFO position from one left by a removed entry.
    stamp: u64,
}

/// A fully associative TLB with first-in-first-out replacement.
#[derive(Clone, Debug)]
pub struct Tlb {
    capacity: usize,
    entries: FxHashMap<Key, Slot>,
    /// Live entries of each page size (indexed like [`SIZES`]): a lookup skips the sizes
    /// with none.
    per_size: [usize; SIZES.len()],
    /// Insertion order for eviction. Removed entries leave their positions behind; the
    /// stamps tell them apart, and the queue is compacted when they pile up.
    fifo: VecDeque<(Key, u64)>,
    next_stamp: u64,
    stats: TlbStats,
}

impl Default for Tlb {
    fn default() -> Self {
        Tlb::new(Tlb::DEFAULT_CAPACITY)
    }
}

impl Tlb {
    /// The capacity of [`Tlb::default`]: the size of a current second-level TLB.
    pub const DEFAULT_CAPACITY: usize = 1536;

    /// An empty TLB holding at most `capacity` entries (0: caches nothing).
    pub fn new(capacity: usize) -> Tlb {
        Tlb {
            capacity,
            entries: FxHashMap::default(),
            per_size: [0; SIZES.len()],
            fifo: VecDeque::new(),
            next_stamp: 0,
            stats: TlbStats::default(),
        }
    }

    /// The most entries held at once.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The number of entries held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The event counts so far.
    pub fn stats(&self) -> TlbStats {
        self.stats
    }

    /// Zeroes the event counts.
    pub fn reset_stats(&mut self) {
        self.stats = TlbStats::default();
    }

    /// The entry covering `va`, counted as a hit or a miss. A 4 KiB entry wins over a
    /// superpage entry covering the same address.
    pub fn lookup(&mut self, va: Gva) -> Option<TlbEntry> {
        let found = self.peek(va);
        if found.is_some() {
            self.stats.hits += 1;
        } else {
            self.stats.misses += 1;
        }
        found
    }

    /// The entry covering `va`, without counting anything.
    pub fn peek(&self, va: Gva) -> Option<TlbEntry> {
        SIZES
            .iter()
            .zip(self.per_size)
            .filter(|&(_, live)| live > 0)
            .find_map(|(&size, _)| self.entries.get(&key(va, size)))
            .map(|slot| slot.entry)
    }

    /// Caches `entry` for the page holding `entry.va`, replacing every entry that covers
    /// `entry.va`; evicts the oldest entry when full.
    pub fn insert(&mut self, mut entry: TlbEntry) {
        if self.capacity == 0 {
            return;
        }
        self.remove_covering(entry.va);
        entry.va = Gva::new(entry.va.raw() & !(entry.size.bytes() - 1));
        while self.entries.len() >= self.capacity {
            self.evict_oldest();
        }
        let k = key(entry.va, entry.size);
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        self.entries.insert(k, Slot { entry, stamp });
        self.per_size[size_index(entry.size)] += 1;
        self.fifo.push_back((k, stamp));
        self.stats.inserts += 1;
        self.compact_fifo();
    }

    /// INVLPG: removes every entry covering `va`, superpage or not, global or not. Returns
    /// how many were removed.
    pub fn invlpg(&mut self, va: Gva) -> usize {
        self.stats.invlpgs += 1;
        self.remove_covering(va)
    }

    /// Removes every entry covering `va` like [`Tlb::invlpg`], without counting an INVLPG:
    /// what the CPU does on its own when an access to `va` faults.
    pub fn remove(&mut self, va: Gva) -> usize {
        self.remove_covering(va)
    }

    /// A CR3 load with CR4.PGE=1: removes every entry but the global ones.
    pub fn flush_non_global(&mut self) {
        self.stats.non_global_flushes += 1;
        self.entries.retain(|_, slot| slot.entry.global);
        self.recount();
        self.compact_fifo();
    }

    /// Removes every entry, global ones too.
    pub fn flush_all(&mut self) {
        self.stats.full_flushes += 1;
        self.entries.clear();
        self.per_size = [0; SIZES.len()];
        self.fifo.clear();
    }

    /// Every entry, ordered by linear address then page size.
    pub fn entries(&self) -> Vec<TlbEntry> {
        let mut all: Vec<TlbEntry> = self.entries.values().map(|slot| slot.entry).collect();
        all.sort_by_key(|e| (e.va, e.size));
        all
    }

    fn remove_covering(&mut self, va: Gva) -> usize {
        SIZES
            .iter()
            .filter(|&&size| self.remove_key(key(va, size)))
            .count()
    }

    /// Removes the entry at `k`, if any, keeping the per-size counts.
    fn remove_key(&mut self, k: Key) -> bool {
        match self.entries.remove(&k) {
            Some(slot) => {
                self.per_size[size_index(slot.entry.size)] -= 1;
                true
            }
            None => false,
        }
    }

    /// Counts the live entries of each size again (after a bulk removal).
    fn recount(&mut self) {
        self.per_size = [0; SIZES.len()];
        for slot in self.entries.values() {
            self.per_size[size_index(slot.entry.size)] += 1;
        }
    }

    fn evict_oldest(&mut self) {
        while let Some((k, stamp)) = self.fifo.pop_front() {
            if self.entries.get(&k).is_some_and(|slot| slot.stamp == stamp) {
                self.remove_key(k);
                self.stats.evictions += 1;
                return;
            }
        }
        // Only reachable if the queue lost track of an entry; dropping an arbitrary one
        // keeps the bound, which matters more than the order.
        if let Some(&k) = self.entries.keys().next() {
            self.remove_key(k);
            self.stats.evictions += 1;
        }
    }

    /// Drops queue positions of removed entries once they outnumber the live ones, so the
    /// queue stays proportional to the capacity under INVLPG churn.
    fn compact_fifo(&mut self) {
        if self.fifo.len() > 2 * self.entries.len() + 64 {
            let entries = &self.entries;
            self.fifo
                .retain(|(k, stamp)| entries.get(k).is_some_and(|slot| slot.stamp == *stamp));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(va: u64, size: PageSize, global: bool) -> TlbEntry {
        TlbEntry {
            va: Gva::new(va),
            frame: Mfn::new(va >> 12),
            size,
            perms: Perms::ALL,
            dirty: false,
            global,
            pkey: 0,
        }
    }

    #[test]
    fn hits_and_misses_are_counted() {
        let mut tlb = Tlb::new(8);
        assert_eq!(tlb.lookup(Gva::new(0x1000)), None);
        tlb.insert(entry(0x1234, PageSize::Size4K, false));
        let hit = tlb.lookup(Gva::new(0x1fff)).unwrap();
        assert_eq!(hit.va, Gva::new(0x1000));
        assert_eq!(hit.translate(Gva::new(0x1abc)), Maddr::new(0x1abc));
        assert_eq!(tlb.lookup(Gva::new(0x2000)), None);
        let s = tlb.stats();
        assert_eq!((s.hits, s.misses, s.inserts), (1, 2, 1));
    }

    #[test]
    fn superpage_entries_cover_their_whole_page_and_invlpg_anywhere_removes_them() {
        let mut tlb = Tlb::new(8);
        tlb.insert(entry(0x40_0000, PageSize::Size2M, true));
        let hit = tlb.peek(Gva::new(0x5f_f123)).unwrap();
        assert_eq!(hit.translate(Gva::new(0x5f_f123)), Maddr::new(0x5f_f123));
        assert_eq!(tlb.invlpg(Gva::new(0x42_3000)), 1);
        assert!(tlb.is_empty());
    }

    #[test]
    fn flushes_keep_or_drop_globals() {
        let mut tlb = Tlb::new(8);
        tlb.insert(entry(0x1000, PageSize::Size4K, true));
        tlb.insert(entry(0x2000, PageSize::Size4K, false));
        tlb.flush_non_global();
        assert!(tlb.peek(Gva::new(0x1000)).is_some());
        assert!(tlb.peek(Gva::new(0x2000)).is_none());
        tlb.flush_all();
        assert!(tlb.is_empty());
    }

    #[test]
    fn capacity_evicts_first_in_first_out() {
        let mut tlb = Tlb::new(2);
        tlb.insert(entry(0x1000, PageSize::Size4K, false));
        tlb.insert(entry(0x2000, PageSize::Size4K, false));
        tlb.invlpg(Gva::new(0x1000));
        tlb.insert(entry(0x1000, PageSize::Size4K, false));
        tlb.insert(entry(0x3000, PageSize::Size4K, false));
        // 0x2000 is the oldest live entry; the stale queue slot of the first 0x1000 must
        // not evict the re-inserted one.
        assert!(tlb.peek(Gva::new(0x2000)).is_none());
        assert!(tlb.peek(Gva::new(0x1000)).is_some());
        assert!(tlb.peek(Gva::new(0x3000)).is_some());
        assert_eq!(tlb.stats().evictions, 1);
    }

    #[test]
    fn churn_keeps_the_queue_bounded() {
        let mut tlb = Tlb::new(4);
        for i in 0..10_000u64 {
            tlb.insert(entry(i << 12, PageSize::Size4K, false));
            tlb.invlpg(Gva::new(i << 12));
        }
        assert!(tlb.fifo.len() <= 2 * tlb.capacity() + 65);
    }

    #[test]
    fn every_size_is_found_after_others_come_and_go() {
        let mut tlb = Tlb::new(8);
        tlb.insert(entry(0x20_0000, PageSize::Size2M, false));
        assert!(tlb.peek(Gva::new(0x20_1000)).is_some());
        tlb.insert(entry(0x20_1000, PageSize::Size4K, true));
        tlb.flush_non_global();
        assert_eq!(
            tlb.peek(Gva::new(0x20_1000)).map(|e| e.size),
            Some(PageSize::Size4K)
        );
        assert!(tlb.peek(Gva::new(0x20_2000)).is_none());
        tlb.insert(entry(0x4000_0000, PageSize::Size1G, false));
        tlb.insert(entry(0x40_0000, PageSize::Size4M, false));
        assert_eq!(tlb.invlpg(Gva::new(0x20_1000)), 1);
        assert!(tlb.peek(Gva::new(0x7fff_f000)).is_some());
        assert!(tlb.peek(Gva::new(0x7f_f000)).is_some());
        tlb.flush_all();
        tlb.insert(entry(0x40_0000, PageSize::Size4M, false));
        assert_eq!(
            tlb.peek(Gva::new(0x7f_f000)).map(|e| e.size),
            Some(PageSize::Size4M)
        );
        assert!(tlb.peek(Gva::new(0x7fff_f000)).is_none());
    }

    #[test]
    fn zero_capacity_caches_nothing() {
        let mut tlb = Tlb::new(0);
        tlb.insert(entry(0x1000, PageSize::Size4K, false));
        assert!(tlb.is_empty());
    }
}

//! Log-dirty mode (for live migration): the dirty bitmap, and the record of which shadow
//! entries were made writable since the last clean, so that a clean re-protects exactly
//! those (its cost follows the number of dirty pages, not the size of guest memory).

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;

use crate::addr::{Gfn, Maddr};

/// A set of guest frames, as a sparse bitmap of 64-frame words.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirtyBitmap {
    words: BTreeMap<u64, u64>,
}

impl DirtyBitmap {
    /// An empty bitmap.
    pub fn new() -> DirtyBitmap {
        DirtyBitmap::default()
    }
    /// Sets `gfn`; true if it was clear.
    pub fn set(&mut self, gfn: Gfn) -> bool {
        let word = self.words.entry(gfn.raw() / 64).or_insert(0);
        let bit = 1u64 << (gfn.raw() % 64);
        let was_clear = *word & bit == 0;
        *word |= bit;
        was_clear
    }
    /// Whether `gfn` is set.
    pub fn contains(&self, gfn: Gfn) -> bool {
        self.words
            .get(&(gfn.raw() / 64))
            .is_some_and(|w| w & (1u64 << (gfn.raw() % 64)) != 0)
    }
    /// How many frames are set.
    pub fn count(&self) -> usize {
        self.words.values().map(|w| w.count_ones() as usize).sum()
    }
    /// Whether no frame is set.
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }
    /// The frames set, in order.
    pub fn iter(&self) -> impl Iterator<Item = Gfn> + '_ {
        self.words.iter().flat_map(|(&index, &word)| {
            (0..64u64)
                .filter(move |bit| word & (1 << bit) != 0)
                .map(move |bit| Gfn::new(index * 64 + bit))
        })
    }
    /// The frames set, as a vector.
    pub fn to_vec(&self) -> Vec<Gfn> {
        self.iter().collect()
    }
    /// The raw words: (index of the first frame / 64, bits).
    pub fn words(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.words.iter().map(|(i, w)| (*i, *w))
    }
}

/// The state of log-dirty mode while it is enabled.
#[derive(Clone, Debug, Default)]
pub struct DirtyLog {
    /// Frames written since the last clean.
    pub(crate) dirty: DirtyBitmap,
    /// Shadow L1 entries made writable since the last clean (re-protected by the next).
    pub(crate) writable_slots: BTreeSet<Maddr>,
    /// Clean operations done.
    pub(crate) cleans: u64,
    /// Enabling under way: write access is being removed in bounded steps.
    pub(crate) enabling: Option<Enabling>,
}

/// Log-dirty mode being enabled: where the pass removing write access from every shadow L1
/// entry stands, and how many steps it took so far.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Enabling {
    pub(crate) cursor: crate::remove::sweep::SweepCursor,
    pub(crate) leaves_done: bool,
    pub(crate) steps: u64,
}

impl DirtyLog {
    /// Whether `gfn` may be mapped writable now (it is already dirty).
    pub fn is_dirty(&self, gfn: Gfn) -> bool {
        self.dirty.contains(gfn)
    }
    /// The current bitmap.
    pub fn bitmap(&self) -> &DirtyBitmap {
        &self.dirty
    }
    /// Whether enabling is still under way (some entries may still be writable).
    pub fn is_enabling(&self) -> bool {
        self.enabling.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_sets_counts_and_iterates_in_order() {
        let mut b = DirtyBitmap::new();
        assert!(b.set(Gfn::new(130)));
        assert!(b.set(Gfn::new(1)));
        assert!(!b.set(Gfn::new(130)));
        assert!(b.contains(Gfn::new(1)));
        assert!(!b.contains(Gfn::new(2)));
        assert_eq!(b.count(), 2);
        assert_eq!(b.to_vec(), [Gfn::new(1), Gfn::new(130)]);
    }
}

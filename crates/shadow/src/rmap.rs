//! An optional reverse map (Cargo feature `rmap`): for each guest frame, the shadow L1
//! entries that map it. The seed chose no reverse maps and said the API should let one be
//! added (Linux KVM keeps one); with the feature on, removing write access or every mapping
//! of a frame visits exactly its entries instead of guessing and scanning, at the cost of
//! memory per mapping and bookkeeping on every leaf write. The benchmarks measure both.

use alloc::collections::{BTreeMap, BTreeSet};

use crate::addr::{Maddr, Mfn};

/// Guest frame -> the shadow leaf entries mapping it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReverseMap {
    by_frame: BTreeMap<Mfn, BTreeSet<Maddr>>,
    entries: usize,
}

impl ReverseMap {
    /// An empty map.
    pub fn new() -> ReverseMap {
        ReverseMap::default()
    }

    /// Records that the leaf entry at `slot` maps `mfn`.
    pub fn add(&mut self, mfn: Mfn, slot: Maddr) {
        if self.by_frame.entry(mfn).or_default().insert(slot) {
            self.entries += 1;
        }
    }

    /// Forgets that the leaf entry at `slot` maps `mfn`.
    pub fn remove(&mut self, mfn: Mfn, slot: Maddr) {
        if let Some(set) = self.by_frame.get_mut(&mfn) {
            if set.remove(&slot) {
                self.entries -= 1;
            }
            if set.is_empty() {
                self.by_frame.remove(&mfn);
            }
        }
    }

    /// The leaf entries mapping `mfn`.
    pub fn slots(&self, mfn: Mfn) -> impl Iterator<Item = Maddr> + '_ {
        self.by_frame.get(&mfn).into_iter().flatten().copied()
    }

    /// How many mappings are recorded.
    pub fn len(&self) -> usize {
        self.entries
    }

    /// Whether nothing is recorded.
    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// Every (frame, slot) recorded, for the auditor.
    pub fn iter(&self) -> impl Iterator<Item = (Mfn, Maddr)> + '_ {
        self.by_frame
            .iter()
            .flat_map(|(m, set)| set.iter().map(move |s| (*m, *s)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rmap_adds_and_removes_exactly() {
        let mut r = ReverseMap::new();
        r.add(Mfn::new(5), Maddr::new(0x1000));
        r.add(Mfn::new(5), Maddr::new(0x1008));
        r.add(Mfn::new(5), Maddr::new(0x1008));
        r.add(Mfn::new(6), Maddr::new(0x2000));
        assert_eq!(r.len(), 3);
        assert_eq!(r.slots(Mfn::new(5)).count(), 2);
        r.remove(Mfn::new(5), Maddr::new(0x1000));
        r.remove(Mfn::new(5), Maddr::new(0x1000));
        assert_eq!(r.len(), 2);
        r.remove(Mfn::new(5), Maddr::new(0x1008));
        assert_eq!(r.slots(Mfn::new(5)).count(), 0);
        assert_eq!(
            r.iter().collect::<alloc::vec::Vec<_>>(),
            [(Mfn::new(6), Maddr::new(0x2000))]
        );
    }
}

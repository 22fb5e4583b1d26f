//! The superpage index and the backing cache on a small test memory.

use super::*;
use crate::domain::DomainConfig;
use crate::testmem::TestMemory;

/// A 4-level domain whose guest frames 512..1024 are backed by an aligned machine run: the
/// domain and the run's first frame.
fn domain() -> (Domain<TestMemory>, Mfn) {
    let config = DomainConfig::hvm(PagingLevels::Four, 1, 64);
    let mut d = Domain::new(TestMemory::new(8192), config).unwrap();
    let base = d.host_mut().alloc_block(9).unwrap();
    for i in 0..512 {
        let to = Some((Mfn::new(base.raw() + i), P2mType::Ram));
        let _ = d.set_p2m(Gfn::new(512 + i), to).unwrap();
    }
    (d, base)
}

#[test]
fn the_index_counts_each_slot_once_and_forgets_empty_regions() {
    let mut index = SuperpageIndex::default();
    let slot = Maddr::new(0x1000);
    index.add(7, slot);
    index.add(7, slot);
    index.add(7, Maddr::new(0x1008));
    assert_eq!(index.entries(), 2);
    assert_eq!(index.slots_in(7), 2);
    assert!(index.holds(7, slot) && !index.holds(8, slot));
    index.remove(7, slot);
    index.remove(7, slot);
    index.remove(7, Maddr::new(0x1008));
    assert_eq!(index.entries(), 0);
    assert!(index.slots.is_empty());
}

#[test]
fn contiguous_aligned_ram_is_superpage_backing_until_the_p2m_changes() {
    let (mut d, base) = domain();
    assert_eq!(d.superpage_backing(Gfn::new(512)), Some(base));
    // Not the first frame of a region, or a region with no RAM: no backing.
    assert_eq!(d.superpage_backing(Gfn::new(513)), None);
    assert_eq!(d.superpage_backing(Gfn::new(0)), None);
    // One frame moved: the cached answer goes with the change.
    let other = d.host_mut().alloc_block(0).unwrap();
    let _ = d
        .set_p2m(Gfn::new(700), Some((other, P2mType::Ram)))
        .unwrap();
    assert_eq!(d.cached_backing(Gfn::new(512)), None);
    assert_eq!(d.superpage_backing(Gfn::new(512)), None);
    // Back home: contiguous again.
    let home = Mfn::new(base.raw() + 188);
    let _ = d
        .set_p2m(Gfn::new(700), Some((home, P2mType::Ram)))
        .unwrap();
    assert_eq!(d.superpage_backing(Gfn::new(512)), Some(base));
}

#[test]
fn log_dirty_forbids_superpage_entries() {
    let (mut d, base) = domain();
    assert!(!d.superpage_blocked(base));
    let _ = d.enable_log_dirty().unwrap();
    assert!(d.superpage_blocked(base));
}

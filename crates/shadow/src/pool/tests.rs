use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;

use proptest::prelude::*;

use super::*;
use crate::addr::Maddr;
use crate::host::MachineMemory;
use crate::paging::{Exchange, MemError, PhysMem};
use crate::testmem::TestMemory;

/// A pool of `chunks` chunks grown from a fresh test memory with room for `host_frames`.
fn pool_with(chunks: usize, host_frames: u64) -> (Pool, TestMemory) {
    let mut mem = TestMemory::new(host_frames);
    let mut pool = Pool::new();
    assert_eq!(
        pool.resize_step(&mut mem, chunks * CHUNK_PAGES, usize::MAX),
        Ok(ResizeProgress::Done)
    );
    pool.check().unwrap();
    (pool, mem)
}

/// A tiny deterministic generator for churn tests.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn pool_alloc_and_free_every_order() {
    let (mut pool, _mem) = pool_with(2, 64);
    assert_eq!(pool.total_pages(), 8);
    for order in 0..=MAX_ORDER {
        let first = pool.alloc(order).unwrap();
        assert_eq!(first.raw() % (1 << order), 0);
        assert_eq!(pool.used_pages(), 1 << order);
        assert_eq!(pool.free_pages(), 8 - (1 << order));
        for i in 0..1u64 << order {
            assert!(pool.is_allocated(Mfn::new(first.raw() + i)));
            assert_eq!(
                pool.block_containing(Mfn::new(first.raw() + i)),
                Some((first, order))
            );
        }
        pool.check().unwrap();
        pool.free(first, order).unwrap();
        assert_eq!(pool.used_pages(), 0);
        assert!(!pool.is_allocated(first));
        assert_eq!(pool.free_whole_chunks(), 2);
        pool.check().unwrap();
    }
    assert_eq!(pool.alloc(3), None);
    assert!(!pool.can_alloc(3));
}

#[test]
fn pool_buddies_merge_on_free() {
    let (mut pool, _mem) = pool_with(1, 4);
    let frames: Vec<Mfn> = (0..4).map(|_| pool.alloc(0).unwrap()).collect();
    assert_eq!(pool.alloc(0), None);
    assert!(!pool.can_alloc(0));
    assert_eq!(pool.free_whole_chunks(), 0);
    pool.free(frames[0], 0).unwrap();
    pool.free(frames[3], 0).unwrap();
    assert_eq!(pool.free_pages(), 2);
    assert!(
        !pool.can_alloc(1),
        "two free frames that are not buddies make no order-1 block"
    );
    pool.free(frames[1], 0).unwrap();
    assert!(
        pool.can_alloc(1),
        "frames 0 and 1 merged into an order-1 block"
    );
    assert!(!pool.can_alloc(2));
    pool.free(frames[2], 0).unwrap();
    assert_eq!(pool.free_whole_chunks(), 1);
    let whole = pool.alloc(2).unwrap();
    assert_eq!(whole, chunk_base(frames[0]));
    pool.check().unwrap();
}

#[test]
fn pool_splits_a_half_before_a_whole_chunk() {
    let (mut pool, _mem) = pool_with(2, 8);
    let a = pool.alloc(0).unwrap();
    let b = pool.alloc(0).unwrap();
    let c = pool.alloc(1).unwrap();
    assert_eq!(chunk_base(a), chunk_base(b));
    assert_eq!(
        chunk_base(a),
        chunk_base(c),
        "the order-1 block comes from the split chunk"
    );
    assert_eq!(pool.free_whole_chunks(), 1);
    pool.check().unwrap();
}

#[test]
fn pool_every_block_is_aligned_and_inside_one_chunk() {
    let (mut pool, _mem) = pool_with(16, 128);
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut blocks = Vec::new();
    while let Some(first) = {
        let order = rng.below(3) as u8;
        pool.alloc(order).map(|first| (first, order))
    } {
        blocks.push(first);
    }
    for &(first, order) in &blocks {
        let len = 1u64 << order;
        assert_eq!(first.raw() % len, 0, "{first:?} order {order}");
        assert_eq!(
            chunk_base(first),
            chunk_base(Mfn::new(first.raw() + len - 1))
        );
        assert!(pool.contains(first));
    }
    let mut listed: Vec<(Mfn, u8)> = pool.allocated_blocks().collect();
    blocks.sort();
    listed.sort();
    assert_eq!(listed, blocks);
    pool.check().unwrap();
}

#[test]
fn pool_free_rejects_bad_requests_without_change() {
    let (mut pool, _mem) = pool_with(2, 64);
    let pair = pool.alloc(1).unwrap();
    let single = pool.alloc(0).unwrap();
    let used = pool.used_pages();
    let foreign = Mfn::new(1000);
    assert!(!pool.contains(foreign));
    assert_eq!(
        pool.free(foreign, 0),
        Err(PoolError::ForeignFrame { mfn: foreign })
    );
    assert_eq!(
        pool.free(pair, 3),
        Err(PoolError::InvalidOrder { order: 3 })
    );
    let odd = Mfn::new(pair.raw() + 1);
    assert_eq!(
        pool.free(odd, 1),
        Err(PoolError::Misaligned { mfn: odd, order: 1 })
    );
    assert_eq!(
        pool.free(odd, 0),
        Err(PoolError::NotBlockStart { mfn: odd })
    );
    assert_eq!(
        pool.free(pair, 0),
        Err(PoolError::WrongOrder {
            mfn: pair,
            allocated: 1,
            given: 0
        })
    );
    let free_frame = Mfn::new(single.raw() + 1);
    assert!(pool.contains(free_frame) && !pool.is_allocated(free_frame));
    assert_eq!(
        pool.free(free_frame, 0),
        Err(PoolError::NotAllocated { mfn: free_frame })
    );
    assert_eq!(pool.used_pages(), used);
    pool.check().unwrap();

    pool.free(single, 0).unwrap();
    assert_eq!(
        pool.free(single, 0),
        Err(PoolError::NotAllocated { mfn: single })
    );
    pool.free(pair, 1).unwrap();
    assert_eq!(
        pool.free(pair, 1),
        Err(PoolError::NotAllocated { mfn: pair })
    );
    assert_eq!(pool.used_pages(), 0);
    pool.check().unwrap();
}

#[test]
fn pool_grows_in_bounded_steps() {
    let mut mem = TestMemory::new(256);
    let mut pool = Pool::new();
    let mut steps = Vec::new();
    loop {
        let calls_before = mem.alloc_calls;
        let progress = pool.resize_step(&mut mem, 37, 3).unwrap();
        assert!(
            mem.alloc_calls - calls_before <= 3,
            "a step exceeded its budget"
        );
        pool.check().unwrap();
        steps.push(progress);
        if progress == ResizeProgress::Done {
            break;
        }
    }
    // 37 pages round up to 40 = 10 chunks: 3 + 3 + 3 + 1.
    assert_eq!(
        steps,
        [
            ResizeProgress::More,
            ResizeProgress::More,
            ResizeProgress::More,
            ResizeProgress::Done
        ]
    );
    assert_eq!(pool.total_pages(), 40);
    assert_eq!(pool.free_whole_chunks(), 10);
    assert_eq!(mem.outstanding_frames(), 40);
    assert!(
        mem.outstanding_blocks()
            .iter()
            .all(|&(first, order)| order == CHUNK_ORDER && pool.contains(first))
    );
    assert_eq!(pool.resize_step(&mut mem, 40, 1), Ok(ResizeProgress::Done));
    assert_eq!(
        pool.resize_step(&mut mem, 0, 0),
        Ok(ResizeProgress::More),
        "budget 0 acts as 1"
    );
    assert_eq!(pool.total_pages(), 36);
}

#[test]
fn pool_shrinks_in_bounded_steps_and_asks_for_eviction() {
    let (mut pool, mut mem) = pool_with(8, 64);
    // Fill three chunks with single pages, then keep one frame in each.
    let singles: Vec<Mfn> = (0..12).map(|_| pool.alloc(0).unwrap()).collect();
    let keep: Vec<Mfn> = singles.iter().step_by(4).copied().collect();
    assert_eq!(
        keep.iter()
            .map(|f| chunk_base(*f))
            .collect::<BTreeSet<_>>()
            .len(),
        3
    );
    for frame in singles.iter().copied().filter(|f| !keep.contains(f)) {
        pool.free(frame, 0).unwrap();
    }
    assert_eq!(pool.used_pages(), 3);
    assert_eq!(pool.free_whole_chunks(), 5);
    pool.check().unwrap();

    // Shrink to 2 chunks with budget 2: five whole chunks go in three steps, then eviction.
    let frees_before = mem.free_calls;
    assert_eq!(pool.resize_step(&mut mem, 8, 2), Ok(ResizeProgress::More));
    assert_eq!(pool.resize_step(&mut mem, 8, 2), Ok(ResizeProgress::More));
    assert_eq!(
        pool.resize_step(&mut mem, 8, 2),
        Ok(ResizeProgress::NeedsEviction { pages: 1 })
    );
    assert_eq!(mem.free_calls - frees_before, 5);
    assert_eq!(pool.total_pages(), 12);
    assert_eq!(mem.outstanding_frames(), 12);
    pool.check().unwrap();

    // The engine evicts from the least-used chunk and continues.
    let victim_chunk = pool.least_used_chunk().unwrap();
    let victim = keep
        .iter()
        .copied()
        .find(|f| chunk_base(*f) == victim_chunk)
        .unwrap();
    pool.free(victim, 0).unwrap();
    assert_eq!(pool.resize_step(&mut mem, 8, 2), Ok(ResizeProgress::Done));
    assert_eq!(pool.total_pages(), 8);
    assert!(!pool.contains(victim));
    for &frame in keep.iter().filter(|f| **f != victim) {
        assert!(
            pool.is_allocated(frame),
            "shrinking never takes a chunk in use"
        );
    }

    // Teardown: the two remaining frames must go first.
    assert_eq!(
        pool.drain_step(&mut mem, 8),
        Ok(ResizeProgress::NeedsEviction { pages: 2 })
    );
    for &frame in keep.iter().filter(|f| **f != victim) {
        pool.free(frame, 0).unwrap();
    }
    assert_eq!(pool.drain_step(&mut mem, 8), Ok(ResizeProgress::Done));
    assert_eq!(pool.total_pages(), 0);
    assert_eq!(mem.outstanding_frames(), 0);
    pool.check().unwrap();
}

#[test]
fn pool_eviction_estimate_prefers_least_used_chunks() {
    let (mut pool, mut mem) = pool_with(4, 64);
    // Chunk 0 full, chunk 1 with one frame in use, chunk 2 with two, chunk 3 whole and free.
    let singles: Vec<Mfn> = (0..12).map(|_| pool.alloc(0).unwrap()).collect();
    let chunk_of = |i: usize| chunk_base(singles[4 * i]);
    for &frame in &singles[5..8] {
        pool.free(frame, 0).unwrap();
    }
    for &frame in &singles[10..12] {
        pool.free(frame, 0).unwrap();
    }
    assert_eq!(pool.free_whole_chunks(), 1);
    assert_eq!(pool.least_used_chunk(), Some(chunk_of(1)));
    // Chunks in use by how little they use, the free chunk left out.
    assert_eq!(
        pool.chunks_by_least_use().collect::<Vec<_>>(),
        [chunk_of(1), chunk_of(2), chunk_of(0)]
    );
    let used: BTreeMap<Mfn, usize> = pool.chunks().collect();
    assert_eq!(used.values().copied().collect::<Vec<_>>(), [4, 1, 2, 0]);

    // Emptying the pool: after the whole chunk goes, vacate 1 + 2 + 4 pages.
    assert_eq!(
        pool.resize_step(&mut mem, 0, 10),
        Ok(ResizeProgress::NeedsEviction { pages: 7 })
    );
    assert_eq!(pool.total_pages(), 12);
    // Down to one chunk: vacating the two least-used chunks costs 1 + 2 pages.
    assert_eq!(
        pool.resize_step(&mut mem, 4, 10),
        Ok(ResizeProgress::NeedsEviction { pages: 3 })
    );
    pool.free(singles[4], 0).unwrap();
    assert_eq!(pool.least_used_chunk(), Some(chunk_of(2)));
    assert_eq!(
        pool.resize_step(&mut mem, 4, 10),
        Ok(ResizeProgress::NeedsEviction { pages: 2 })
    );
    assert!(
        !pool.contains(singles[4]),
        "the vacated chunk went back to the host"
    );
    pool.check().unwrap();
}

#[test]
fn pool_growth_stops_when_the_host_runs_out() {
    let mut mem = TestMemory::new(12);
    let mut pool = Pool::new();
    assert_eq!(
        pool.resize_step(&mut mem, 20, 10),
        Err(PoolError::OutOfHostMemory { missing_pages: 8 })
    );
    assert_eq!(pool.total_pages(), 12, "the pool keeps the chunks it got");
    pool.check().unwrap();

    let mut mem = TestMemory::new(64);
    let mut pool = Pool::new();
    mem.limit_allocs(Some(1));
    assert_eq!(
        pool.resize_step(&mut mem, 8, 10),
        Err(PoolError::OutOfHostMemory { missing_pages: 4 })
    );
    mem.limit_allocs(None);
    assert_eq!(pool.resize_step(&mut mem, 8, 10), Ok(ResizeProgress::Done));
    assert_eq!(pool.total_pages(), 8);
}

/// A host that breaks its contract: hands out a misaligned chunk, then a duplicate.
#[derive(Debug, Default)]
struct BrokenHost {
    calls: u64,
    freed: Vec<(Mfn, u8)>,
}

impl PhysMem<Maddr> for BrokenHost {
    fn read_u32(&self, addr: Maddr) -> Result<u32, MemError> {
        Err(MemError::Unbacked { addr: addr.raw() })
    }
    fn read_u64(&self, addr: Maddr) -> Result<u64, MemError> {
        Err(MemError::Unbacked { addr: addr.raw() })
    }
    fn write_u32(&mut self, addr: Maddr, _: u32) -> Result<(), MemError> {
        Err(MemError::Unbacked { addr: addr.raw() })
    }
    fn write_u64(&mut self, addr: Maddr, _: u64) -> Result<(), MemError> {
        Err(MemError::Unbacked { addr: addr.raw() })
    }
    fn compare_exchange_u32(
        &mut self,
        addr: Maddr,
        _: u32,
        _: u32,
    ) -> Result<Exchange<u32>, MemError> {
        Err(MemError::Unbacked { addr: addr.raw() })
    }
    fn compare_exchange_u64(
        &mut self,
        addr: Maddr,
        _: u64,
        _: u64,
    ) -> Result<Exchange<u64>, MemError> {
        Err(MemError::Unbacked { addr: addr.raw() })
    }
}

impl MachineMemory for BrokenHost {
    fn alloc_block(&mut self, _order: u8) -> Option<Mfn> {
        self.calls += 1;
        Some(Mfn::new(if self.calls == 1 { 6 } else { 8 }))
    }
    fn free_block(&mut self, first: Mfn, order: u8) {
        self.freed.push((first, order));
    }
    fn compare_exchange_u128(
        &mut self,
        addr: Maddr,
        _: u128,
        _: u128,
    ) -> Result<Exchange<u128>, MemError> {
        Err(MemError::Unbacked { addr: addr.raw() })
    }
}

#[test]
fn pool_rejects_bad_host_chunks() {
    let mut host = BrokenHost::default();
    let mut pool = Pool::new();
    assert_eq!(
        pool.resize_step(&mut host, 12, 10),
        Err(PoolError::BadHostBlock { mfn: Mfn::new(6) })
    );
    assert_eq!(
        host.freed,
        [(Mfn::new(6), 2)],
        "a misaligned chunk goes back"
    );
    assert_eq!(
        pool.resize_step(&mut host, 12, 10),
        Err(PoolError::BadHostBlock { mfn: Mfn::new(8) })
    );
    assert_eq!(
        pool.total_pages(),
        4,
        "the duplicate is neither added nor given back"
    );
    assert_eq!(host.freed.len(), 1);
    pool.check().unwrap();
}

#[test]
fn pool_tracks_peak_use() {
    let (mut pool, _mem) = pool_with(2, 8);
    let a = pool.alloc(2).unwrap();
    let b = pool.alloc(1).unwrap();
    pool.free(a, 2).unwrap();
    assert_eq!(pool.used_pages(), 2);
    assert_eq!(pool.peak_used_pages(), 6);
    pool.reset_peak();
    assert_eq!(pool.peak_used_pages(), 2);
    pool.free(b, 1).unwrap();
    assert_eq!(pool.peak_used_pages(), 2);
}

#[test]
fn pool_check_detects_corruption() {
    let (mut pool, _mem) = pool_with(2, 8);
    let a = pool.alloc(0).unwrap();
    pool.check().unwrap();
    let mut broken = pool.clone();
    broken.used_pages += 1;
    broken.peak_used_pages += 1;
    assert!(matches!(
        broken.check(),
        Err(PoolError::Inconsistent { .. })
    ));
    let mut broken = pool.clone();
    broken.free_lists[0].insert((3, a));
    assert!(matches!(
        broken.check(),
        Err(PoolError::Inconsistent { .. })
    ));
    let mut broken = pool.clone();
    broken.chunks.insert(chunk_base(a), Chunk::EMPTY);
    assert!(matches!(
        broken.check(),
        Err(PoolError::Inconsistent { .. })
    ));
}

#[test]
fn pool_whole_chunks_return_after_one_page_churn() {
    let (mut pool, _mem) = pool_with(32, 256);
    let mut rng = XorShift(0x1234_5678_9abc_def1);
    let mut live: Vec<Mfn> = Vec::new();
    for _ in 0..20_000 {
        if !live.is_empty() && (rng.below(2) == 0 || !pool.can_alloc(0)) {
            let victim = live.swap_remove(rng.below(live.len()));
            pool.free(victim, 0).unwrap();
        } else {
            live.push(pool.alloc(0).unwrap());
        }
    }
    pool.check().unwrap();
    for frame in live.drain(..) {
        pool.free(frame, 0).unwrap();
    }
    assert_eq!(pool.free_whole_chunks(), 32);
    for _ in 0..32 {
        assert!(pool.alloc(2).is_some());
    }
    pool.check().unwrap();
}

#[test]
fn pool_full_of_single_pages_still_serves_a_whole_free_chunk() {
    let (mut pool, _mem) = pool_with(16, 64);
    let frames: Vec<Mfn> = (0..64).map(|_| pool.alloc(0).unwrap()).collect();
    assert!(!pool.can_alloc(0));
    let chunk = chunk_base(frames[37]);
    // Free the four frames of one chunk in a scrambled order.
    for offset in [2u64, 0, 3, 1] {
        pool.free(Mfn::new(chunk.raw() + offset), 0).unwrap();
    }
    assert_eq!(pool.alloc(2), Some(chunk));
    assert!(!pool.can_alloc(0));

    // Four free frames in four different chunks are not a 4-page block.
    pool.free(chunk, 2).unwrap();
    assert_eq!(pool.alloc(0).map(chunk_base), Some(chunk));
    for frame in frames
        .iter()
        .copied()
        .step_by(4)
        .filter(|f| chunk_base(*f) != chunk)
        .take(3)
    {
        pool.free(frame, 0).unwrap();
    }
    assert_eq!(pool.free_pages(), 6);
    assert!(!pool.can_alloc(2));
    assert!(
        pool.can_alloc(1),
        "the three frames left in `chunk` hold a free pair"
    );
    pool.check().unwrap();
}

#[test]
fn pool_packing_keeps_whole_chunks_under_churn() {
    // Single pages come and go at random, use wandering between a quarter and three quarters
    // of the pool. Over time, the whole free chunks must stay close to the ideal (every
    // used page packed: total chunks - ceil(used / 4)).
    let (mut pool, _mem) = pool_with(64, 256);
    let mut rng = XorShift(0xdead_beef_cafe_f00d);
    let mut live: Vec<Mfn> = Vec::new();
    let (mut whole_sum, mut ideal_sum) = (0usize, 0usize);
    for _ in 0..20_000 {
        let grow = live.len() < 64 || (live.len() < 192 && rng.below(2) == 0);
        if grow {
            live.push(pool.alloc(0).unwrap());
        } else {
            let victim = live.swap_remove(rng.below(live.len()));
            pool.free(victim, 0).unwrap();
        }
        whole_sum += pool.free_whole_chunks();
        ideal_sum += 64 - live.len().div_ceil(CHUNK_PAGES);
    }
    pool.check().unwrap();
    assert!(
        whole_sum * 100 >= ideal_sum * 85,
        "whole free chunks averaged {whole_sum} against an ideal of {ideal_sum}"
    );
}

#[derive(Clone, Debug)]
enum Op {
    Alloc(u8),
    Free(usize),
    FreeBogus(u64, u8),
    Resize { target: usize, budget: usize },
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..=3).prop_map(Op::Alloc),
        4 => any::<usize>().prop_map(Op::Free),
        1 => (0u64..80, 0u8..=3).prop_map(|(mfn, order)| Op::FreeBogus(mfn, order)),
        1 => (0usize..80, 1usize..5).prop_map(|(target, budget)| Op::Resize { target, budget }),
    ]
}

/// Whether the model has a naturally aligned run of `2^order` free frames in some pool chunk.
fn model_has_free_block(pool: &Pool, model: &BTreeMap<Mfn, u8>, order: u8) -> bool {
    let frame_used = |mfn: u64| {
        model
            .iter()
            .any(|(first, o)| first.raw() <= mfn && mfn < first.raw() + (1 << o))
    };
    let len = 1u64 << order;
    pool.chunks().any(|(base, _)| {
        (0..CHUNK_PAGES as u64 / len)
            .any(|i| (0..len).all(|j| !frame_used(base.raw() + i * len + j)))
    })
}

proptest! {
    #[test]
    fn pool_random_alloc_free_matches_model(
        initial_chunks in 0usize..10,
        ops in proptest::collection::vec(op_strategy(), 1..200),
    ) {
        let (mut pool, mut mem) = pool_with(initial_chunks, 64);
        let mut model: BTreeMap<Mfn, u8> = BTreeMap::new();
        for op in ops {
            match op {
                Op::Alloc(order) => match pool.alloc(order) {
                    Some(first) => {
                        prop_assert!(order <= MAX_ORDER);
                        prop_assert_eq!(first.raw() % (1 << order), 0);
                        for j in 0..1u64 << order {
                            let frame = first.raw() + j;
                            prop_assert!(pool.contains(Mfn::new(frame)));
                            let overlaps = model.iter().any(|(f, o)| {
                                f.raw() <= frame && frame < f.raw() + (1 << o)
                            });
                            prop_assert!(!overlaps, "frame {:#x} handed out twice", frame);
                        }
                        model.insert(first, order);
                    }
                    None => prop_assert!(
                        order > MAX_ORDER || !model_has_free_block(&pool, &model, order),
                        "alloc({}) failed with a free aligned block", order
                    ),
                },
                Op::Free(index) => {
                    if let Some((&first, &order)) = model.iter().nth(index % model.len().max(1)) {
                        prop_assert_eq!(pool.free(first, order), Ok(()));
                        model.remove(&first);
                    }
                }
                Op::FreeBogus(raw, order) => {
                    let first = Mfn::new(raw);
                    if model.get(&first) == Some(&order) {
                        prop_assert_eq!(pool.free(first, order), Ok(()));
                        model.remove(&first);
                    } else {
                        let used = pool.used_pages();
                        prop_assert!(pool.free(first, order).is_err());
                        prop_assert_eq!(pool.used_pages(), used);
                    }
                }
                Op::Resize { target, budget } => {
                    for _ in 0..100 {
                        match pool.resize_step(&mut mem, target, budget) {
                            Ok(ResizeProgress::More) => pool.check().unwrap(),
                            Ok(ResizeProgress::Done) => {
                                prop_assert_eq!(pool.total_pages(), target.div_ceil(4) * 4);
                                break;
                            }
                            Ok(ResizeProgress::NeedsEviction { pages }) => {
                                prop_assert!(pages > 0);
                                prop_assert!(pool.total_pages() > target);
                                prop_assert_eq!(pool.free_whole_chunks(), 0);
                                break;
                            }
                            Err(PoolError::OutOfHostMemory { missing_pages }) => {
                                prop_assert!(missing_pages > 0);
                                prop_assert!(pool.total_pages() < target);
                                break;
                            }
                            Err(other) => prop_assert!(false, "unexpected {:?}", other),
                        }
                    }
                    prop_assert_eq!(mem.outstanding_frames(), pool.total_pages() as u64);
                }
            }
            pool.check().unwrap();
            let used: usize = model.values().map(|o| 1usize << o).sum();
            prop_assert_eq!(pool.used_pages(), used);
            prop_assert!(pool.peak_used_pages() >= used);
            let listed: BTreeMap<Mfn, u8> = pool.allocated_blocks().collect();
            prop_assert_eq!(&listed, &model);
            prop_assert_eq!(pool.can_alloc(2), pool.free_whole_chunks() > 0);
        }
    }
}

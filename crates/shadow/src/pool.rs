//! The shadow memory pool: a fixed, dedicated, per-domain set of machine frames that every
//! shadow page comes from (seed slide "Shadow memory pool").
//!
//! Frames arrive from the host in *chunks* of four contiguous frames whose first frame number
//! is a multiple of four (`MachineMemory::alloc_block(2)`), and go back the same way. Inside
//! the pool, blocks of 1, 2 and 4 frames (orders 0, 1, 2), naturally aligned, are handed out
//! buddy-style: a small block splits a chunk, and freed buddies merge again.
//!
//! Xen gave up contiguous multi-page shadows in 2010 because its pool fragmented and a
//! 4-page allocation could fail. Here a 4-page allocation never fails while a whole chunk is
//! free, and small allocations are packed so that whole chunks stay whole: a small block is
//! taken from the smallest free block that fits, and among those from the *fullest* chunk
//! (lowest address on a tie), so lightly used chunks drain and become whole again.
//!
//! Resizing (the control op that sets the pool size) proceeds in bounded steps with a
//! continuation, like every other long operation of the engine.

mod chunk;
mod resize;
#[cfg(test)]
mod tests;

use alloc::collections::{BTreeMap, BTreeSet};
use core::fmt;

use crate::addr::Mfn;
use chunk::{Chunk, Slot};
pub use resize::ResizeProgress;

/// log2 of the number of frames in a chunk (the unit the pool gets from the host).
pub const CHUNK_ORDER: u8 = 2;
/// The number of frames in a chunk.
pub const CHUNK_PAGES: usize = 1 << CHUNK_ORDER;
/// The largest block order the pool hands out (a whole chunk).
pub const MAX_ORDER: u8 = CHUNK_ORDER;

/// What went wrong in a pool operation. No pool operation panics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolError {
    /// The order is larger than [`MAX_ORDER`].
    InvalidOrder {
        /// The order asked for.
        order: u8,
    },
    /// The first frame is not a multiple of `2^order`.
    Misaligned {
        /// The frame given.
        mfn: Mfn,
        /// The order given.
        order: u8,
    },
    /// The frame does not belong to the pool.
    ForeignFrame {
        /// The frame given.
        mfn: Mfn,
    },
    /// The frame is a pool frame but not allocated (a double free).
    NotAllocated {
        /// The frame given.
        mfn: Mfn,
    },
    /// The frame lies inside an allocated block but does not start it.
    NotBlockStart {
        /// The frame given.
        mfn: Mfn,
    },
    /// A block starts at the frame, but of a different order.
    WrongOrder {
        /// The frame given.
        mfn: Mfn,
        /// The order of the block that starts there.
        allocated: u8,
        /// The order given.
        given: u8,
    },
    /// Growing stopped: the host has no more chunks. The pool keeps what it got.
    OutOfHostMemory {
        /// How many more pages the target needed.
        missing_pages: usize,
    },
    /// The host handed out a chunk that is misaligned or already in the pool (a host bug).
    /// A misaligned chunk is given back; a duplicate is not (it is ours).
    BadHostBlock {
        /// The first frame the host returned.
        mfn: Mfn,
    },
    /// [`Pool::check`] found the accounting inconsistent.
    Inconsistent {
        /// Which invariant failed.
        what: &'static str,
        /// The frame (or chunk base) where it failed; zero for totals.
        mfn: Mfn,
    },
}

impl fmt::Display for PoolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PoolError::InvalidOrder { order } => write!(f, "invalid pool block order {order}"),
            PoolError::Misaligned { mfn, order } => {
                write!(f, "frame {mfn} is not aligned for an order-{order} block")
            }
            PoolError::ForeignFrame { mfn } => write!(f, "frame {mfn} is not a pool frame"),
            PoolError::NotAllocated { mfn } => write!(f, "pool frame {mfn} is not allocated"),
            PoolError::NotBlockStart { mfn } => {
                write!(
                    f,
                    "pool frame {mfn} is inside an allocated block, not its start"
                )
            }
            PoolError::WrongOrder {
                mfn,
                allocated,
                given,
            } => write!(
                f,
                "pool block at {mfn} has order {allocated}, freed as order {given}"
            ),
            PoolError::OutOfHostMemory { missing_pages } => {
                write!(
                    f,
                    "host out of memory: pool is {missing_pages} pages short of its target"
                )
            }
            PoolError::BadHostBlock { mfn } => {
                write!(f, "host returned a bad chunk at {mfn}")
            }
            PoolError::Inconsistent { what, mfn } => {
                write!(f, "pool accounting inconsistent at {mfn}: {what}")
            }
        }
    }
}

impl core::error::Error for PoolError {}

/// A free-list key: free frames left in the block's chunk first (fullest chunk first), then
/// the block's first frame.
type FreeKey = (u8, Mfn);

/// The shadow memory pool of one domain. See the module documentation.
#[derive(Clone, Debug, Default)]
pub struct Pool {
    /// Every chunk the pool holds, by first frame.
    chunks: BTreeMap<Mfn, Chunk>,
    /// The maximal free blocks, one set per order.
    free_lists: [BTreeSet<FreeKey>; MAX_ORDER as usize + 1],
    /// Chunk bases by how many of their frames are in use (index 0..=4).
    chunks_by_use: [BTreeSet<Mfn>; CHUNK_PAGES + 1],
    used_pages: usize,
    peak_used_pages: usize,
}

/// The first frame of the chunk holding `mfn`.
fn chunk_base(mfn: Mfn) -> Mfn {
    Mfn::new(mfn.raw() & !(CHUNK_PAGES as u64 - 1))
}

/// The offset of `mfn` inside its chunk.
fn chunk_offset(mfn: Mfn) -> usize {
    (mfn.raw() & (CHUNK_PAGES as u64 - 1)) as usize
}

fn block_pages(order: u8) -> usize {
    1 << order
}

impl Pool {
    /// An empty pool; give it frames with [`Pool::resize_step`].
    pub fn new() -> Pool {
        Pool::default()
    }

    /// Allocates a naturally aligned block of `2^order` frames (order 0, 1 or 2) and returns
    /// its first frame, or `None` if no free block is large enough (or the order is invalid).
    /// Never asks the host for memory; the frames are not zeroed.
    pub fn alloc(&mut self, order: u8) -> Option<Mfn> {
        if order > MAX_ORDER {
            return None;
        }
        let (_, first) = (order..=MAX_ORDER)
            .find_map(|from| self.free_lists[usize::from(from)].first().copied())?;
        let base = chunk_base(first);
        let old = *self.chunks.get(&base)?;
        let mut new = old;
        new.mark_allocated(chunk_offset(first), order);
        self.replace_chunk(base, &old, new);
        self.used_pages += block_pages(order);
        self.peak_used_pages = self.peak_used_pages.max(self.used_pages);
        Some(first)
    }

    /// Frees the block of `order` starting at `first`. Detects invalid orders, misalignment,
    /// foreign frames, double frees, frees from the middle of a block and order mismatches;
    /// on error the pool is unchanged.
    pub fn free(&mut self, first: Mfn, order: u8) -> Result<(), PoolError> {
        if order > MAX_ORDER {
            return Err(PoolError::InvalidOrder { order });
        }
        if !first.raw().is_multiple_of(block_pages(order) as u64) {
            return Err(PoolError::Misaligned { mfn: first, order });
        }
        let base = chunk_base(first);
        let old = *self
            .chunks
            .get(&base)
            .ok_or(PoolError::ForeignFrame { mfn: first })?;
        let offset = chunk_offset(first);
        match old.slots[offset] {
            Slot::Free => return Err(PoolError::NotAllocated { mfn: first }),
            Slot::Tail => return Err(PoolError::NotBlockStart { mfn: first }),
            Slot::Head(allocated) if allocated != order => {
                return Err(PoolError::WrongOrder {
                    mfn: first,
                    allocated,
                    given: order,
                });
            }
            Slot::Head(_) => {}
        }
        let mut new = old;
        new.mark_free(offset, order);
        self.replace_chunk(base, &old, new);
        self.used_pages -= block_pages(order);
        Ok(())
    }

    /// Whether `mfn` is a pool frame, free or in use.
    pub fn contains(&self, mfn: Mfn) -> bool {
        self.chunks.contains_key(&chunk_base(mfn))
    }

    /// Whether `mfn` is a pool frame inside an allocated block.
    pub fn is_allocated(&self, mfn: Mfn) -> bool {
        self.chunks
            .get(&chunk_base(mfn))
            .is_some_and(|chunk| chunk.slots[chunk_offset(mfn)] != Slot::Free)
    }

    /// The allocated block (first frame, order) that contains `mfn`, if any.
    pub fn block_containing(&self, mfn: Mfn) -> Option<(Mfn, u8)> {
        let base = chunk_base(mfn);
        let chunk = self.chunks.get(&base)?;
        let offset = chunk_offset(mfn);
        chunk
            .allocated_blocks()
            .find(|&(start, order)| start <= offset && offset < start + block_pages(order))
            .map(|(start, order)| (Mfn::new(base.raw() + start as u64), order))
    }

    /// Whether [`Pool::alloc`] of `order` would succeed now.
    pub fn can_alloc(&self, order: u8) -> bool {
        order <= MAX_ORDER
            && (order..=MAX_ORDER).any(|from| !self.free_lists[usize::from(from)].is_empty())
    }

    /// The number of frames the pool holds (always a multiple of [`CHUNK_PAGES`]).
    pub fn total_pages(&self) -> usize {
        self.chunks.len() * CHUNK_PAGES
    }

    /// The number of pool frames not in any allocated block.
    pub fn free_pages(&self) -> usize {
        self.total_pages().saturating_sub(self.used_pages)
    }

    /// The number of pool frames in allocated blocks.
    pub fn used_pages(&self) -> usize {
        self.used_pages
    }

    /// The most frames ever in use at once (since creation or [`Pool::reset_peak`]).
    pub fn peak_used_pages(&self) -> usize {
        self.peak_used_pages
    }

    /// Restarts peak tracking from the current use.
    pub fn reset_peak(&mut self) {
        self.peak_used_pages = self.used_pages;
    }

    /// The number of chunks with all four frames free (each can serve a 4-page block).
    pub fn free_whole_chunks(&self) -> usize {
        self.free_lists[usize::from(MAX_ORDER)].len()
    }

    /// Every allocated block as (first frame, order), in frame order.
    pub fn allocated_blocks(&self) -> impl Iterator<Item = (Mfn, u8)> + '_ {
        self.chunks.iter().flat_map(|(base, chunk)| {
            chunk
                .allocated_blocks()
                .map(move |(offset, order)| (Mfn::new(base.raw() + offset as u64), order))
        })
    }

    /// The first frame of every chunk, with how many of its frames are in use, in frame order.
    pub fn chunks(&self) -> impl Iterator<Item = (Mfn, usize)> + '_ {
        self.chunks
            .iter()
            .map(|(base, chunk)| (*base, chunk.used_pages()))
    }

    /// The first frame of a chunk that is in use but has the fewest frames in use: the
    /// cheapest chunk to vacate (evict the shadows in it) when shrinking needs eviction.
    pub fn least_used_chunk(&self) -> Option<Mfn> {
        self.chunks_by_use[1..]
            .iter()
            .find_map(|set| set.first().copied())
    }

    /// The first frames of the chunks in use, fewest frames in use first (the same order
    /// as chunks with equal use are visited by frame); lazily, so taking the first few
    /// costs no more than a few lookups.
    pub fn chunks_by_least_use(&self) -> impl Iterator<Item = Mfn> + '_ {
        self.chunks_by_use[1..]
            .iter()
            .flat_map(|set| set.iter().copied())
    }

    /// Verifies that the chunk states, the free lists, the per-use chunk sets and the totals
    /// agree. Costs O(n log n) in the pool size; meant for the auditor and tests.
    pub fn check(&self) -> Result<(), PoolError> {
        let inconsistent = |what, mfn| Err(PoolError::Inconsistent { what, mfn });
        let mut used = 0;
        let mut expected_free_blocks = [0usize; MAX_ORDER as usize + 1];
        for (&base, chunk) in &self.chunks {
            if chunk_offset(base) != 0 {
                return inconsistent("chunk base is not a multiple of four", base);
            }
            if !chunk.is_well_formed() {
                return inconsistent("chunk slots are not well-formed blocks", base);
            }
            let chunk_used = chunk.used_pages();
            used += chunk_used;
            if !self.chunks_by_use[chunk_used].contains(&base) {
                return inconsistent("chunk missing from its use set", base);
            }
            let key_free = (CHUNK_PAGES - chunk_used) as u8;
            for block in chunk.free_blocks().iter() {
                let first = Mfn::new(base.raw() + u64::from(block.offset));
                if !self.free_lists[usize::from(block.order)].contains(&(key_free, first)) {
                    return inconsistent("free block missing from its free list", first);
                }
                expected_free_blocks[usize::from(block.order)] += 1;
            }
        }
        for (order, list) in self.free_lists.iter().enumerate() {
            if list.len() != expected_free_blocks[order] {
                let stray = list.first().map_or(Mfn::new(0), |&(_, mfn)| mfn);
                return inconsistent("free list holds a block that is not free", stray);
            }
        }
        if self.chunks_by_use.iter().map(BTreeSet::len).sum::<usize>() != self.chunks.len() {
            return inconsistent(
                "use sets hold a chunk more than once or a foreign one",
                Mfn::new(0),
            );
        }
        if used != self.used_pages {
            return inconsistent("used page count disagrees with the chunks", Mfn::new(0));
        }
        if self.peak_used_pages < self.used_pages {
            return inconsistent("peak use is below current use", Mfn::new(0));
        }
        Ok(())
    }

    /// Replaces chunk `base`'s state `old` by `new`, keeping the free lists and use sets in
    /// step. `old` must be the chunk's current state.
    fn replace_chunk(&mut self, base: Mfn, old: &Chunk, new: Chunk) {
        self.unlist_chunk(base, old);
        self.list_chunk(base, &new);
        self.chunks.insert(base, new);
    }

    fn list_chunk(&mut self, base: Mfn, chunk: &Chunk) {
        let used = chunk.used_pages();
        let key_free = (CHUNK_PAGES - used) as u8;
        for block in chunk.free_blocks().iter() {
            let first = Mfn::new(base.raw() + u64::from(block.offset));
            self.free_lists[usize::from(block.order)].insert((key_free, first));
        }
        self.chunks_by_use[used].insert(base);
    }

    fn unlist_chunk(&mut self, base: Mfn, chunk: &Chunk) {
        let used = chunk.used_pages();
        let key_free = (CHUNK_PAGES - used) as u8;
        for block in chunk.free_blocks().iter() {
            let first = Mfn::new(base.raw() + u64::from(block.offset));
            self.free_lists[usize::from(block.order)].remove(&(key_free, first));
        }
        self.chunks_by_use[used].remove(&base);
    }
}

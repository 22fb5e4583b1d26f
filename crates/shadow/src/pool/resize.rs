//! Growing and shrinking the pool in bounded steps (the set-pool-size control op, and
//! teardown).

use super::{CHUNK_ORDER, CHUNK_PAGES, Chunk, MAX_ORDER, Pool, PoolError};
use crate::host::MachineMemory;

/// How far a [`Pool::resize_step`] got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum ResizeProgress {
    /// The pool has reached the target size.
    Done,
    /// The step used its budget; call again with the same target to continue.
    More,
    /// Shrinking needs chunks that have frames in use. Free at least `pages` pages (the
    /// cheapest chunks to vacate are given by [`Pool::least_used_chunk`]) and call again.
    NeedsEviction {
        /// The fewest in-use pages whose freeing lets the pool reach the target.
        pages: usize,
    },
}

impl Pool {
    /// Moves the pool towards `target_pages` (rounded up to a multiple of [`CHUNK_PAGES`]),
    /// doing at most `budget` chunk operations (at least one) with the host.
    ///
    /// Growing takes chunks from `mem` and fails with [`PoolError::OutOfHostMemory`] when the
    /// host has none left (the pool keeps what it got). Shrinking gives back whole free
    /// chunks, highest first, and answers [`ResizeProgress::NeedsEviction`] when only chunks
    /// with frames in use remain above the target. Resizing to 0 is teardown.
    pub fn resize_step<M: MachineMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        target_pages: usize,
        budget: usize,
    ) -> Result<ResizeProgress, PoolError> {
        let target_chunks = target_pages.div_ceil(CHUNK_PAGES);
        let budget = budget.max(1);
        let mut operations = 0;
        loop {
            let chunks = self.chunks.len();
            if chunks == target_chunks {
                return Ok(ResizeProgress::Done);
            }
            if operations == budget {
                return Ok(ResizeProgress::More);
            }
            if chunks < target_chunks {
                let wanted = (target_chunks - chunks).saturating_mul(CHUNK_PAGES);
                self.grow_one(mem, wanted)?;
            } else if !self.release_one_free_chunk(mem) {
                let pages = self.pages_to_vacate(chunks - target_chunks);
                return Ok(ResizeProgress::NeedsEviction { pages });
            }
            operations += 1;
        }
    }

    /// One bounded step of teardown: gives chunks back to the host; same as resizing to 0.
    pub fn drain_step<M: MachineMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        budget: usize,
    ) -> Result<ResizeProgress, PoolError> {
        self.resize_step(mem, 0, budget)
    }

    fn grow_one<M: MachineMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        missing_pages: usize,
    ) -> Result<(), PoolError> {
        let base = mem
            .alloc_block(CHUNK_ORDER)
            .ok_or(PoolError::OutOfHostMemory { missing_pages })?;
        if super::chunk_offset(base) != 0 {
            mem.free_block(base, CHUNK_ORDER);
            return Err(PoolError::BadHostBlock { mfn: base });
        }
        if self.chunks.contains_key(&base) {
            return Err(PoolError::BadHostBlock { mfn: base });
        }
        self.chunks.insert(base, Chunk::EMPTY);
        self.list_chunk(base, &Chunk::EMPTY);
        Ok(())
    }

    /// Gives the highest whole free chunk back to the host; false if there is none.
    fn release_one_free_chunk<M: MachineMemory + ?Sized>(&mut self, mem: &mut M) -> bool {
        let Some(&(_, base)) = self.free_lists[usize::from(MAX_ORDER)].last() else {
            return false;
        };
        self.unlist_chunk(base, &Chunk::EMPTY);
        self.chunks.remove(&base);
        mem.free_block(base, CHUNK_ORDER);
        true
    }

    /// The fewest in-use pages that must be freed so that `excess_chunks` chunks are whole
    /// and free: vacate the least-used chunks first.
    fn pages_to_vacate(&self, excess_chunks: usize) -> usize {
        let mut remaining = excess_chunks.saturating_sub(self.free_whole_chunks());
        let mut pages = 0;
        for (used, set) in self.chunks_by_use.iter().enumerate().skip(1) {
            let taken = remaining.min(set.len());
            pages += taken * used;
            remaining -= taken;
        }
        pages
    }
}

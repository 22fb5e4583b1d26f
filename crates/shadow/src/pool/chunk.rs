//! One pool chunk: four contiguous frames, and which blocks inside it are handed out.
//!
//! The free blocks of a chunk are not stored: under the buddy rule (free buddies always
//! merge) they are a pure function of which frames are in use, so the pool recomputes them
//! whenever a chunk changes and can never hold a stale or unmerged free block.

use super::{CHUNK_PAGES, MAX_ORDER};

/// What one frame of a chunk is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Slot {
    /// Not handed out.
    Free,
    /// The first frame of an allocated block of this order.
    Head(u8),
    /// A later frame of the allocated block whose head precedes it.
    Tail,
}

/// The state of the four frames of one chunk, indexed by offset from the chunk's base.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Chunk {
    pub(super) slots: [Slot; CHUNK_PAGES],
}

/// A free block inside a chunk: its offset from the chunk base and its order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct FreeBlock {
    pub(super) offset: u8,
    pub(super) order: u8,
}

impl Chunk {
    /// A chunk with every frame free.
    pub(super) const EMPTY: Chunk = Chunk {
        slots: [Slot::Free; CHUNK_PAGES],
    };

    /// Bit `i` is set when frame `i` is part of an allocated block.
    pub(super) fn used_mask(&self) -> u8 {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, slot)| **slot != Slot::Free)
            .fold(0, |mask, (i, _)| mask | (1 << i))
    }

    /// How many frames of this chunk are part of allocated blocks.
    pub(super) fn used_pages(&self) -> usize {
        self.used_mask().count_ones() as usize
    }

    /// The maximal free blocks of this chunk (buddies merged).
    pub(super) fn free_blocks(&self) -> FreeBlocks {
        free_blocks_of_mask(self.used_mask())
    }

    /// Marks the block of `order` at `offset` as allocated. The caller has checked that it
    /// lies inside a free block.
    pub(super) fn mark_allocated(&mut self, offset: usize, order: u8) {
        let len = 1usize << order;
        for (i, slot) in self.slots.iter_mut().enumerate().skip(offset).take(len) {
            *slot = if i == offset {
                Slot::Head(order)
            } else {
                Slot::Tail
            };
        }
    }

    /// Marks the block of `order` at `offset` as free. The caller has checked that a block
    /// of exactly that order starts there.
    pub(super) fn mark_free(&mut self, offset: usize, order: u8) {
        let len = 1usize << order;
        for slot in self.slots.iter_mut().skip(offset).take(len) {
            *slot = Slot::Free;
        }
    }

    /// The allocated blocks of this chunk as (offset, order).
    pub(super) fn allocated_blocks(&self) -> impl Iterator<Item = (usize, u8)> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(offset, slot)| match slot {
                Slot::Head(order) => Some((offset, *order)),
                _ => None,
            })
    }

    /// Whether the slots describe well-formed blocks: every head is aligned to its order,
    /// fits in the chunk and is followed by exactly its tails; no tail stands alone.
    pub(super) fn is_well_formed(&self) -> bool {
        let mut offset = 0;
        while offset < CHUNK_PAGES {
            match self.slots[offset] {
                Slot::Free => offset += 1,
                Slot::Tail => return false,
                Slot::Head(order) => {
                    let len = 1usize << order;
                    if order > MAX_ORDER || offset % len != 0 || offset + len > CHUNK_PAGES {
                        return false;
                    }
                    if self.slots[offset + 1..offset + len]
                        .iter()
                        .any(|s| *s != Slot::Tail)
                    {
                        return false;
                    }
                    offset += len;
                }
            }
        }
        true
    }
}

/// Up to four free blocks (a chunk never has more).
#[derive(Clone, Copy, Debug)]
pub(super) struct FreeBlocks {
    items: [FreeBlock; CHUNK_PAGES],
    len: usize,
}

impl FreeBlocks {
    fn push(&mut self, offset: u8, order: u8) {
        if let Some(item) = self.items.get_mut(self.len) {
            *item = FreeBlock { offset, order };
            self.len += 1;
        }
    }

    /// The blocks, in offset order.
    pub(super) fn iter(&self) -> impl Iterator<Item = FreeBlock> + '_ {
        self.items.iter().take(self.len).copied()
    }
}

/// The maximal free blocks of a chunk whose used frames are `used_mask` (bit i = frame i).
pub(super) fn free_blocks_of_mask(used_mask: u8) -> FreeBlocks {
    let mut blocks = FreeBlocks {
        items: [FreeBlock {
            offset: 0,
            order: 0,
        }; CHUNK_PAGES],
        len: 0,
    };
    if used_mask & 0b1111 == 0 {
        blocks.push(0, 2);
        return blocks;
    }
    for half in 0..2u8 {
        let first = 2 * half;
        let half_mask = (used_mask >> first) & 0b11;
        if half_mask == 0 {
            blocks.push(first, 1);
            continue;
        }
        for i in 0..2u8 {
            if half_mask & (1 << i) == 0 {
                blocks.push(first + i, 0);
            }
        }
    }
    blocks
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    fn blocks(mask: u8) -> Vec<(u8, u8)> {
        free_blocks_of_mask(mask)
            .iter()
            .map(|b| (b.offset, b.order))
            .collect()
    }

    #[test]
    fn pool_chunk_free_blocks_merge_buddies() {
        assert_eq!(blocks(0b0000), [(0, 2)]);
        assert_eq!(blocks(0b0001), [(1, 0), (2, 1)]);
        assert_eq!(blocks(0b0011), [(2, 1)]);
        assert_eq!(blocks(0b0101), [(1, 0), (3, 0)]);
        assert_eq!(blocks(0b1100), [(0, 1)]);
        assert_eq!(blocks(0b1111), []);
    }

    #[test]
    fn pool_chunk_free_blocks_cover_exactly_the_free_frames() {
        for mask in 0u8..16 {
            let mut covered = 0u8;
            for block in free_blocks_of_mask(mask).iter() {
                let len = 1u8 << block.order;
                assert_eq!(
                    block.offset % len,
                    0,
                    "mask {mask:#b}: unaligned free block"
                );
                let bits = ((1u8 << len) - 1) << block.offset;
                assert_eq!(covered & bits, 0, "mask {mask:#b}: overlapping free blocks");
                covered |= bits;
            }
            assert_eq!(covered, !mask & 0b1111, "mask {mask:#b}");
        }
    }

    #[test]
    fn pool_chunk_well_formedness() {
        let mut chunk = Chunk::EMPTY;
        chunk.mark_allocated(2, 1);
        chunk.mark_allocated(0, 0);
        assert!(chunk.is_well_formed());
        assert_eq!(chunk.used_mask(), 0b1101);
        assert_eq!(
            chunk.allocated_blocks().collect::<Vec<_>>(),
            [(0, 0), (2, 1)]
        );
        chunk.slots[1] = Slot::Tail;
        assert!(!chunk.is_well_formed());
        let misaligned = Chunk {
            slots: [Slot::Free, Slot::Head(1), Slot::Tail, Slot::Free],
        };
        assert!(!misaligned.is_well_formed());
    }
}

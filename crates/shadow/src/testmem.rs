//! A small machine memory for the engine's unit tests: sparse words over a fixed number of
//! frames starting at frame 0, and an aligned block allocator that checks every free.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use crate::addr::{Maddr, Mfn, PAGE_SHIFT};
use crate::host::{MachineMemory, serial_compare_exchange_u128};
use crate::paging::{
    Exchange, MemError, PhysMem, serial_compare_exchange_u32, serial_compare_exchange_u64,
};

/// Machine memory of `frames` frames (mfn 0 .. frames). Words never written read as zero.
#[derive(Clone, Debug)]
pub(crate) struct TestMemory {
    frames: u64,
    /// Nonzero 8-byte words, by address / 8.
    words: BTreeMap<u64, u64>,
    /// Blocks handed out by `alloc_block`: first frame -> order.
    blocks: BTreeMap<u64, u8>,
    /// How many more `alloc_block` calls may succeed; `None` = no limit but memory size.
    allocs_left: Option<usize>,
    /// How many times `alloc_block` and `free_block` were called.
    pub(crate) alloc_calls: usize,
    pub(crate) free_calls: usize,
}

impl TestMemory {
    /// Memory of `frames` frames, none handed out.
    pub(crate) fn new(frames: u64) -> TestMemory {
        TestMemory {
            frames,
            words: BTreeMap::new(),
            blocks: BTreeMap::new(),
            allocs_left: None,
            alloc_calls: 0,
            free_calls: 0,
        }
    }

    /// Lets only `count` more `alloc_block` calls succeed (`None`: no limit).
    pub(crate) fn limit_allocs(&mut self, count: Option<usize>) {
        self.allocs_left = count;
    }

    /// The blocks currently handed out, as (first frame, order).
    pub(crate) fn outstanding_blocks(&self) -> Vec<(Mfn, u8)> {
        self.blocks
            .iter()
            .map(|(&first, &order)| (Mfn::new(first), order))
            .collect()
    }

    /// The number of frames currently handed out.
    pub(crate) fn outstanding_frames(&self) -> u64 {
        self.blocks.values().map(|&order| 1u64 << order).sum()
    }

    fn overlaps_outstanding(&self, first: u64, len: u64) -> bool {
        // Blocks are at most 2^order frames; anything starting in [first - 2^max, first+len)
        // might overlap, so check the neighbours precisely.
        self.blocks
            .range(first.saturating_sub(1 << 20)..first + len)
            .any(|(&start, &order)| start + (1u64 << order) > first)
    }

    fn word_index(&self, addr: Maddr, size: u64) -> Result<u64, MemError> {
        let raw = addr.raw();
        if !raw.is_multiple_of(size) {
            return Err(MemError::Misaligned { addr: raw });
        }
        if raw >> PAGE_SHIFT >= self.frames {
            return Err(MemError::Unbacked { addr: raw });
        }
        Ok(raw / 8)
    }

    fn set_word(&mut self, index: u64, value: u64) {
        if value == 0 {
            self.words.remove(&index);
        } else {
            self.words.insert(index, value);
        }
    }
}

impl PhysMem<Maddr> for TestMemory {
    fn read_u32(&self, addr: Maddr) -> Result<u32, MemError> {
        let index = self.word_index(addr, 4)?;
        let word = self.words.get(&index).copied().unwrap_or(0);
        let shift = (addr.raw() % 8) * 8;
        Ok((word >> shift) as u32)
    }

    fn read_u64(&self, addr: Maddr) -> Result<u64, MemError> {
        let index = self.word_index(addr, 8)?;
        Ok(self.words.get(&index).copied().unwrap_or(0))
    }

    fn write_u32(&mut self, addr: Maddr, value: u32) -> Result<(), MemError> {
        let index = self.word_index(addr, 4)?;
        let word = self.words.get(&index).copied().unwrap_or(0);
        let shift = (addr.raw() % 8) * 8;
        let new = (word & !(0xffff_ffffu64 << shift)) | (u64::from(value) << shift);
        self.set_word(index, new);
        Ok(())
    }

    fn write_u64(&mut self, addr: Maddr, value: u64) -> Result<(), MemError> {
        let index = self.word_index(addr, 8)?;
        self.set_word(index, value);
        Ok(())
    }

    // Single-threaded: nothing can write between the read and the write.
    fn compare_exchange_u32(
        &mut self,
        addr: Maddr,
        current: u32,
        new: u32,
    ) -> Result<Exchange<u32>, MemError> {
        serial_compare_exchange_u32(self, addr, current, new)
    }

    fn compare_exchange_u64(
        &mut self,
        addr: Maddr,
        current: u64,
        new: u64,
    ) -> Result<Exchange<u64>, MemError> {
        serial_compare_exchange_u64(self, addr, current, new)
    }
}

impl MachineMemory for TestMemory {
    fn alloc_block(&mut self, order: u8) -> Option<Mfn> {
        self.alloc_calls += 1;
        if self.allocs_left == Some(0) || order > 20 {
            return None;
        }
        let len = 1u64 << order;
        let first = (0..self.frames / len)
            .map(|i| i * len)
            .find(|&first| !self.overlaps_outstanding(first, len))?;
        self.blocks.insert(first, order);
        if let Some(left) = self.allocs_left.as_mut() {
            *left -= 1;
        }
        let words_per_frame = 1u64 << (PAGE_SHIFT - 3);
        let range = first * words_per_frame..(first + len) * words_per_frame;
        let stale: Vec<u64> = self.words.range(range).map(|(&index, _)| index).collect();
        for index in stale {
            self.words.remove(&index);
        }
        Some(Mfn::new(first))
    }

    fn free_block(&mut self, first: Mfn, order: u8) {
        self.free_calls += 1;
        match self.blocks.remove(&first.raw()) {
            Some(allocated) if allocated == order => {}
            Some(allocated) => {
                panic!("free_block({first:?}, order {order}) of a block of order {allocated}")
            }
            None => panic!("free_block({first:?}, order {order}) of a block not handed out"),
        }
    }

    fn compare_exchange_u128(
        &mut self,
        addr: Maddr,
        current: u128,
        new: u128,
    ) -> Result<Exchange<u128>, MemError> {
        serial_compare_exchange_u128(self, addr, current, new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn testmem_blocks_are_aligned_disjoint_and_zeroed() {
        let mut mem = TestMemory::new(16);
        let a = mem.alloc_block(0).unwrap();
        let b = mem.alloc_block(2).unwrap();
        assert_eq!(a, Mfn::new(0));
        assert_eq!(b, Mfn::new(4));
        mem.write_u64(b.base(), 7).unwrap();
        mem.free_block(b, 2);
        let c = mem.alloc_block(2).unwrap();
        assert_eq!(c, b);
        assert_eq!(mem.read_u64(c.base()).unwrap(), 0);
        assert_eq!(mem.outstanding_frames(), 5);
        mem.limit_allocs(Some(0));
        assert_eq!(mem.alloc_block(0), None);
    }

    #[test]
    fn testmem_lost_compare_exchange_leaves_memory_and_reports_it() {
        let mut mem = TestMemory::new(1);
        let at = Maddr::new(16);
        mem.write_u64(at, 0x1111_2222_3333_4444).unwrap();
        assert_eq!(
            mem.compare_exchange_u64(at, 5, 6),
            Ok(Exchange::Lost {
                actual: 0x1111_2222_3333_4444
            })
        );
        assert_eq!(
            mem.compare_exchange_u32(Maddr::new(20), 5, 6),
            Ok(Exchange::Lost {
                actual: 0x1111_2222
            })
        );
        assert_eq!(
            mem.compare_exchange_u128(Maddr::new(16), 5, 6),
            Ok(Exchange::Lost {
                actual: 0x1111_2222_3333_4444
            })
        );
        assert_eq!(mem.read_u64(at).unwrap(), 0x1111_2222_3333_4444);
        assert_eq!(
            mem.compare_exchange_u32(Maddr::new(20), 0x1111_2222, 7),
            Ok(Exchange::Swapped)
        );
        assert_eq!(mem.read_u64(at).unwrap(), 0x0000_0007_3333_4444);
    }

    #[test]
    fn testmem_word_access() {
        let mut mem = TestMemory::new(1);
        mem.write_u32(Maddr::new(12), 0xdead_beef).unwrap();
        assert_eq!(mem.read_u64(Maddr::new(8)).unwrap(), 0xdead_beef_0000_0000);
        assert_eq!(mem.read_u32(Maddr::new(12)).unwrap(), 0xdead_beef);
        assert_eq!(
            mem.read_u64(Maddr::new(4)),
            Err(MemError::Misaligned { addr: 4 })
        );
        assert_eq!(
            mem.read_u64(Maddr::new(4096)),
            Err(MemError::Unbacked { addr: 4096 })
        );
    }
}

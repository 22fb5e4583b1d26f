//! What the engine needs from its host: machine memory it can read and write, and machine
//! frames it can be given and give back. Both backends (the simulator and KVM) implement it.

use crate::addr::{Maddr, Mfn};
use crate::paging::{MemError, PhysMem};

/// Machine memory, as the engine sees it: naturally aligned word access plus frame
/// allocation in power-of-two aligned blocks.
pub trait MachineMemory: PhysMem<Maddr> {
    /// Allocates `2^order` contiguous frames whose first frame number is a multiple of
    /// `2^order`, zero-filled; `None` when the host has no such block.
    fn alloc_block(&mut self, order: u8) -> Option<Mfn>;
    /// Gives back a block that [`MachineMemory::alloc_block`] handed out.
    fn free_block(&mut self, first: Mfn, order: u8);

    /// Zero-fills one frame.
    fn zero_frame(&mut self, mfn: Mfn) -> Result<(), MemError> {
        let base = mfn.base().raw();
        for i in 0..512u64 {
            self.write_u64(Maddr::new(base + 8 * i), 0)?;
        }
        Ok(())
    }
}

impl<M: MachineMemory + ?Sized> MachineMemory for &mut M {
    fn alloc_block(&mut self, order: u8) -> Option<Mfn> {
        (**self).alloc_block(order)
    }
    fn free_block(&mut self, first: Mfn, order: u8) {
        (**self).free_block(first, order)
    }
    fn zero_frame(&mut self, mfn: Mfn) -> Result<(), MemError> {
        (**self).zero_frame(mfn)
    }
}

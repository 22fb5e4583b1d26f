//! What the engine needs from its host: machine memory it can read and write, and machine
//! frames it can be given and give back. Both backends (the simulator and KVM) implement it.

use crate::addr::{Maddr, Mfn};
use crate::paging::{Exchange, MemError, PhysMem};

/// Machine memory, as the engine sees it: naturally aligned word access plus frame
/// allocation in power-of-two aligned blocks.
///
/// The guest's vcpus may run on other threads while the engine works (under KVM): every
/// compare-exchange (the 4- and 8-byte ones of [`PhysMem`] and the 16-byte one here) must be
/// atomic against them, as `lock cmpxchg` is. The engine sets guest A/D bits and performs
/// emulated locked instructions with them.
pub trait MachineMemory: PhysMem<Maddr> {
    /// Allocates `2^order` contiguous frames whose first frame number is a multiple of
    /// `2^order`, zero-filled; `None` when the host has no such block.
    fn alloc_block(&mut self, order: u8) -> Option<Mfn>;
    /// Gives back a block that [`MachineMemory::alloc_block`] handed out.
    fn free_block(&mut self, first: Mfn, order: u8);

    /// Atomically writes `new` to the naturally aligned 16 bytes at `addr` (little-endian)
    /// if they hold `current`, as `lock cmpxchg16b` does; else leaves them and reports what
    /// they hold. A host that cannot do this as one atomic access answers
    /// [`MemError::NotAtomic`] with nothing written: the emulator then refuses CMPXCHG16B
    /// (the guest runs it natively) rather than tear it.
    fn compare_exchange_u128(
        &mut self,
        addr: Maddr,
        current: u128,
        new: u128,
    ) -> Result<Exchange<u128>, MemError>;

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
    fn compare_exchange_u128(
        &mut self,
        addr: Maddr,
        current: u128,
        new: u128,
    ) -> Result<Exchange<u128>, MemError> {
        (**self).compare_exchange_u128(addr, current, new)
    }
    fn zero_frame(&mut self, mfn: Mfn) -> Result<(), MemError> {
        (**self).zero_frame(mfn)
    }
}

/// A 16-byte compare-exchange made of reads and writes of its two 8-byte halves: atomic only
/// when nothing else writes `mem` meanwhile (a single-threaded host).
pub fn serial_compare_exchange_u128<M: PhysMem<Maddr> + ?Sized>(
    mem: &mut M,
    addr: Maddr,
    current: u128,
    new: u128,
) -> Result<Exchange<u128>, MemError> {
    if !addr.raw().is_multiple_of(16) {
        return Err(MemError::Misaligned { addr: addr.raw() });
    }
    let high = Maddr::new(addr.raw() + 8);
    let actual = u128::from(mem.read_u64(addr)?) | u128::from(mem.read_u64(high)?) << 64;
    if actual != current {
        return Ok(Exchange::Lost { actual });
    }
    mem.write_u64(addr, new as u64)?;
    mem.write_u64(high, (new >> 64) as u64)?;
    Ok(Exchange::Swapped)
}

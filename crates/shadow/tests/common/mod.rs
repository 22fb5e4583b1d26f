//! Helpers shared by the engine's integration tests.

use std::collections::HashMap;

use shadow2::paging::{
    Exchange, MemError, PhysMem, serial_compare_exchange_u32, serial_compare_exchange_u64,
};
use shadow2::{Gpa, PhysAddr};

/// Sparse guest memory of 8-byte words: only words that were written are backed, so a walk
/// that strays from the recorded tables shows up as a [`MemError::Unbacked`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SparseMem {
    words: HashMap<u64, u64>,
}

impl SparseMem {
    /// Backs the 8-byte word at `addr` (8-aligned) with `value`.
    pub fn insert(&mut self, addr: u64, value: u64) {
        self.words.insert(addr, value);
    }
    /// The 8-byte word at `addr`, if backed.
    pub fn get(&self, addr: u64) -> Option<u64> {
        self.words.get(&addr).copied()
    }
    fn word(&self, addr: u64, align: u64) -> Result<u64, MemError> {
        if !addr.is_multiple_of(align) {
            return Err(MemError::Misaligned { addr });
        }
        self.get(addr & !7).ok_or(MemError::Unbacked { addr })
    }
}

impl PhysMem<Gpa> for SparseMem {
    fn read_u32(&self, addr: Gpa) -> Result<u32, MemError> {
        let a = addr.to_raw();
        Ok((self.word(a, 4)? >> ((a & 4) * 8)) as u32)
    }
    fn read_u64(&self, addr: Gpa) -> Result<u64, MemError> {
        self.word(addr.to_raw(), 8)
    }
    fn write_u32(&mut self, addr: Gpa, value: u32) -> Result<(), MemError> {
        let a = addr.to_raw();
        let shift = (a & 4) * 8;
        let old = self.word(a, 4)?;
        let new = (old & !(0xffff_ffffu64 << shift)) | (u64::from(value) << shift);
        self.words.insert(a & !7, new);
        Ok(())
    }
    fn write_u64(&mut self, addr: Gpa, value: u64) -> Result<(), MemError> {
        let a = addr.to_raw();
        self.word(a, 8)?;
        self.words.insert(a, value);
        Ok(())
    }
    // Single-threaded: nothing can write between the read and the write.
    fn compare_exchange_u32(
        &mut self,
        addr: Gpa,
        current: u32,
        new: u32,
    ) -> Result<Exchange<u32>, MemError> {
        serial_compare_exchange_u32(self, addr, current, new)
    }
    fn compare_exchange_u64(
        &mut self,
        addr: Gpa,
        current: u64,
        new: u64,
    ) -> Result<Exchange<u64>, MemError> {
        serial_compare_exchange_u64(self, addr, current, new)
    }
}

//! The physical-memory view a walker reads paging structures through (and writes A/D bits
//! through, so that the caller sees every write the walk makes).

use crate::addr::PhysAddr;

/// An access to physical memory that cannot be done.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MemError {
    /// Nothing backs this physical address (not RAM, or outside the space).
    Unbacked {
        /// The raw address.
        addr: u64,
    },
    /// The access is not naturally aligned.
    Misaligned {
        /// The raw address.
        addr: u64,
    },
    /// The view refuses to write here.
    ReadOnly {
        /// The raw address.
        addr: u64,
    },
}

/// Naturally aligned 4- and 8-byte access to one physical address space.
pub trait PhysMem<A: PhysAddr> {
    /// Reads the 4-byte word at `addr`.
    fn read_u32(&self, addr: A) -> Result<u32, MemError>;
    /// Reads the 8-byte word at `addr`.
    fn read_u64(&self, addr: A) -> Result<u64, MemError>;
    /// Writes the 4-byte word at `addr`.
    fn write_u32(&mut self, addr: A, value: u32) -> Result<(), MemError>;
    /// Writes the 8-byte word at `addr`.
    fn write_u64(&mut self, addr: A, value: u64) -> Result<(), MemError>;

    /// Reads an entry `bytes` (4 or 8) wide, zero-extended.
    fn read_entry(&self, addr: A, bytes: u64) -> Result<u64, MemError> {
        if bytes == 4 {
            self.read_u32(addr).map(u64::from)
        } else {
            self.read_u64(addr)
        }
    }
    /// Writes an entry `bytes` (4 or 8) wide; a 4-byte write keeps the low 32 bits.
    fn write_entry(&mut self, addr: A, bytes: u64, value: u64) -> Result<(), MemError> {
        if bytes == 4 {
            self.write_u32(addr, value as u32)
        } else {
            self.write_u64(addr, value)
        }
    }
}

impl<A: PhysAddr, M: PhysMem<A> + ?Sized> PhysMem<A> for &mut M {
    fn read_u32(&self, addr: A) -> Result<u32, MemError> {
        (**self).read_u32(addr)
    }
    fn read_u64(&self, addr: A) -> Result<u64, MemError> {
        (**self).read_u64(addr)
    }
    fn write_u32(&mut self, addr: A, value: u32) -> Result<(), MemError> {
        (**self).write_u32(addr, value)
    }
    fn write_u64(&mut self, addr: A, value: u64) -> Result<(), MemError> {
        (**self).write_u64(addr, value)
    }
}

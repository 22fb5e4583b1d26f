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
    /// The host cannot do this access as one atomic operation (a 16-byte compare-exchange
    /// on a host without one): nothing was written.
    NotAtomic {
        /// The raw address.
        addr: u64,
    },
}

/// What a compare-exchange found.
#[must_use]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Exchange<T> {
    /// The word held the expected value and now holds the new one.
    Swapped,
    /// The word held `actual`, not the expected value, and was left unchanged.
    Lost {
        /// What the word held.
        actual: T,
    },
}

/// Naturally aligned 4- and 8-byte access to one physical address space.
///
/// Other agents may write the same memory while the engine runs (vcpus of the guest on
/// other threads): reads and writes of a naturally aligned word must be single accesses
/// (never torn), and the compare-exchanges must be atomic against every such agent, as
/// `lock cmpxchg` is. They have no default on purpose: each view says how it is atomic
/// (a view over memory nothing else writes at the same time may use
/// [`serial_compare_exchange_u32`] and [`serial_compare_exchange_u64`]).
pub trait PhysMem<A: PhysAddr> {
    /// Reads the 4-byte word at `addr`.
    fn read_u32(&self, addr: A) -> Result<u32, MemError>;
    /// Reads the 8-byte word at `addr`.
    fn read_u64(&self, addr: A) -> Result<u64, MemError>;
    /// Writes the 4-byte word at `addr`.
    fn write_u32(&mut self, addr: A, value: u32) -> Result<(), MemError>;
    /// Writes the 8-byte word at `addr`.
    fn write_u64(&mut self, addr: A, value: u64) -> Result<(), MemError>;
    /// Atomically writes `new` to the 4-byte word at `addr` if it holds `current`; else
    /// leaves it and reports what it holds.
    fn compare_exchange_u32(
        &mut self,
        addr: A,
        current: u32,
        new: u32,
    ) -> Result<Exchange<u32>, MemError>;
    /// Atomically writes `new` to the 8-byte word at `addr` if it holds `current`; else
    /// leaves it and reports what it holds.
    fn compare_exchange_u64(
        &mut self,
        addr: A,
        current: u64,
        new: u64,
    ) -> Result<Exchange<u64>, MemError>;

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
    /// Compare-exchanges an entry `bytes` (4 or 8) wide; a 4-byte one compares and writes
    /// the low 32 bits.
    fn compare_exchange_entry(
        &mut self,
        addr: A,
        bytes: u64,
        current: u64,
        new: u64,
    ) -> Result<Exchange<u64>, MemError> {
        if bytes == 4 {
            let found = self.compare_exchange_u32(addr, current as u32, new as u32)?;
            Ok(match found {
                Exchange::Swapped => Exchange::Swapped,
                Exchange::Lost { actual } => Exchange::Lost {
                    actual: u64::from(actual),
                },
            })
        } else {
            self.compare_exchange_u64(addr, current, new)
        }
    }
}

/// A compare-exchange of a 4-byte word made of a read and a write: atomic only when
/// nothing else writes `mem` meanwhile (a single-threaded host, or a view over one).
pub fn serial_compare_exchange_u32<A, M>(
    mem: &mut M,
    addr: A,
    current: u32,
    new: u32,
) -> Result<Exchange<u32>, MemError>
where
    A: PhysAddr,
    M: PhysMem<A> + ?Sized,
{
    let actual = mem.read_u32(addr)?;
    if actual != current {
        return Ok(Exchange::Lost { actual });
    }
    mem.write_u32(addr, new)?;
    Ok(Exchange::Swapped)
}

/// A compare-exchange of an 8-byte word made of a read and a write: atomic only when
/// nothing else writes `mem` meanwhile (a single-threaded host, or a view over one).
pub fn serial_compare_exchange_u64<A, M>(
    mem: &mut M,
    addr: A,
    current: u64,
    new: u64,
) -> Result<Exchange<u64>, MemError>
where
    A: PhysAddr,
    M: PhysMem<A> + ?Sized,
{
    let actual = mem.read_u64(addr)?;
    if actual != current {
        return Ok(Exchange::Lost { actual });
    }
    mem.write_u64(addr, new)?;
    Ok(Exchange::Swapped)
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
    fn compare_exchange_u32(
        &mut self,
        addr: A,
        current: u32,
        new: u32,
    ) -> Result<Exchange<u32>, MemError> {
        (**self).compare_exchange_u32(addr, current, new)
    }
    fn compare_exchange_u64(
        &mut self,
        addr: A,
        current: u64,
        new: u64,
    ) -> Result<Exchange<u64>, MemError> {
        (**self).compare_exchange_u64(addr, current, new)
    }
}

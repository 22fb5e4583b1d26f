//! The VM's guest-physical memory is the engine's machine memory: one vm-memory mapping
//! that KVM runs the vcpus on, handed out frame by frame to the shadow pool, the p2m, the
//! hypervisor area and the guest's RAM. Nothing here maps the pool anywhere: the hardware
//! walks it by (VM-)physical address only.
//!
//! The vcpus run on other threads while the engine works, so every word access here is one
//! atomic access on the mapping: loads and stores of aligned words, and compare-exchanges
//! that are the processor's `lock cmpxchg` (through vm-memory's atomic references). There
//! is no 16-byte compare-exchange: stable Rust has no `AtomicU128` and vm-memory none
//! either, so [`MachineMemory::compare_exchange_u128`] answers [`MemError::NotAtomic`] and
//! the engine's emulator refuses CMPXCHG16B (the guest runs it natively) rather than tear it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use shadow2::paging::{Exchange, MemError, PhysMem};
use shadow2::{MachineMemory, Maddr, Mfn};
use vm_memory::{
    Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, VolatileMemory, volatile_memory::Error,
};

/// The VM's memory with a frame allocator over it.
#[derive(Debug)]
pub struct KvmMemory {
    mem: GuestMemoryMmap<()>,
    frames: u64,
    /// Frames below `first` are never handed out.
    first: u64,
    /// Frames at and above `next` were never handed out.
    next: u64,
    /// Blocks given back, by order.
    free: BTreeMap<u8, BTreeSet<u64>>,
}

/// Frame 0 is never handed out, so that a zero entry can never name a real frame by mistake.
const FIRST_FRAME: u64 = 1;

impl KvmMemory {
    /// Maps `frames` 4 KiB frames of anonymous memory at VM-physical address 0.
    pub fn new(frames: u64) -> Result<KvmMemory, vm_memory::Error> {
        KvmMemory::with_reserved(frames, FIRST_FRAME)
    }

    /// Maps `frames` frames, of which frames `0..reserved` are never handed out (a guest
    /// that runs on its own tables has its RAM there, at its own addresses).
    pub fn with_reserved(frames: u64, reserved: u64) -> Result<KvmMemory, vm_memory::Error> {
        let reserved = reserved.max(FIRST_FRAME);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (frames * 4096) as usize)])?;
        Ok(KvmMemory {
            mem,
            frames,
            first: reserved,
            next: reserved,
            free: BTreeMap::new(),
        })
    }

    /// The mapping (KVM registers it as the VM's memory slot).
    pub fn mmap(&self) -> &GuestMemoryMmap<()> {
        &self.mem
    }

    /// The number of frames.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// Frames handed out and not given back.
    pub fn frames_in_use(&self) -> u64 {
        let freed: u64 = self
            .free
            .iter()
            .map(|(order, set)| (set.len() as u64) << order)
            .sum();
        self.next - self.first - freed
    }

    /// Writes bytes at a VM-physical address.
    pub fn write_bytes(&self, addr: u64, data: &[u8]) -> Result<(), MemError> {
        self.mem
            .write_slice(data, GuestAddress(addr))
            .map_err(|_| MemError::Unbacked { addr })
    }

    /// Reads bytes at a VM-physical address.
    pub fn read_bytes(&self, addr: u64, out: &mut [u8]) -> Result<(), MemError> {
        self.mem
            .read_slice(out, GuestAddress(addr))
            .map_err(|_| MemError::Unbacked { addr })
    }

    fn check(&self, addr: u64, size: u64) -> Result<GuestAddress, MemError> {
        if !addr.is_multiple_of(size) {
            return Err(MemError::Misaligned { addr });
        }
        if !self.mem.address_in_range(GuestAddress(addr + size - 1)) {
            return Err(MemError::Unbacked { addr });
        }
        Ok(GuestAddress(addr))
    }
}

/// The outcome of an atomic compare-exchange as the engine reports it.
fn exchange<T>(result: Result<T, T>) -> Exchange<T> {
    match result {
        Ok(_) => Exchange::Swapped,
        Err(actual) => Exchange::Lost { actual },
    }
}

impl KvmMemory {
    /// Runs `f` on the atomic 4-byte word at `addr` (naturally aligned, inside the mapping).
    fn on_u32<R>(&self, addr: u64, f: impl FnOnce(&AtomicU32) -> R) -> Result<R, MemError> {
        let a = self.check(addr, 4)?;
        let slice = self
            .mem
            .get_slice(a, 4)
            .map_err(|_| MemError::Unbacked { addr })?;
        let word = slice
            .get_atomic_ref::<AtomicU32>(0)
            .map_err(|e| atomic_error(e, addr))?;
        Ok(f(word))
    }

    /// Runs `f` on the atomic 8-byte word at `addr` (naturally aligned, inside the mapping).
    fn on_u64<R>(&self, addr: u64, f: impl FnOnce(&AtomicU64) -> R) -> Result<R, MemError> {
        let a = self.check(addr, 8)?;
        let slice = self
            .mem
            .get_slice(a, 8)
            .map_err(|_| MemError::Unbacked { addr })?;
        let word = slice
            .get_atomic_ref::<AtomicU64>(0)
            .map_err(|e| atomic_error(e, addr))?;
        Ok(f(word))
    }
}

fn atomic_error(error: Error, addr: u64) -> MemError {
    match error {
        Error::Misaligned { .. } => MemError::Misaligned { addr },
        _ => MemError::Unbacked { addr },
    }
}

// Every access is atomic on the shared mapping, so a shared reference is enough: threads
// (the engine's and a vcpu's host side) may use one `KvmMemory` at the same time.
impl PhysMem<Maddr> for &KvmMemory {
    fn read_u32(&self, addr: Maddr) -> Result<u32, MemError> {
        self.on_u32(addr.raw(), |word| word.load(Ordering::SeqCst))
    }
    fn read_u64(&self, addr: Maddr) -> Result<u64, MemError> {
        self.on_u64(addr.raw(), |word| word.load(Ordering::SeqCst))
    }
    fn write_u32(&mut self, addr: Maddr, value: u32) -> Result<(), MemError> {
        self.on_u32(addr.raw(), |word| word.store(value, Ordering::SeqCst))
    }
    fn write_u64(&mut self, addr: Maddr, value: u64) -> Result<(), MemError> {
        self.on_u64(addr.raw(), |word| word.store(value, Ordering::SeqCst))
    }
    fn compare_exchange_u32(
        &mut self,
        addr: Maddr,
        current: u32,
        new: u32,
    ) -> Result<Exchange<u32>, MemError> {
        self.on_u32(addr.raw(), |word| {
            exchange(word.compare_exchange(current, new, Ordering::SeqCst, Ordering::SeqCst))
        })
    }
    fn compare_exchange_u64(
        &mut self,
        addr: Maddr,
        current: u64,
        new: u64,
    ) -> Result<Exchange<u64>, MemError> {
        self.on_u64(addr.raw(), |word| {
            exchange(word.compare_exchange(current, new, Ordering::SeqCst, Ordering::SeqCst))
        })
    }
}

impl PhysMem<Maddr> for KvmMemory {
    fn read_u32(&self, addr: Maddr) -> Result<u32, MemError> {
        (&self).read_u32(addr)
    }
    fn read_u64(&self, addr: Maddr) -> Result<u64, MemError> {
        (&self).read_u64(addr)
    }
    fn write_u32(&mut self, addr: Maddr, value: u32) -> Result<(), MemError> {
        (&*self).write_u32(addr, value)
    }
    fn write_u64(&mut self, addr: Maddr, value: u64) -> Result<(), MemError> {
        (&*self).write_u64(addr, value)
    }
    fn compare_exchange_u32(
        &mut self,
        addr: Maddr,
        current: u32,
        new: u32,
    ) -> Result<Exchange<u32>, MemError> {
        (&*self).compare_exchange_u32(addr, current, new)
    }
    fn compare_exchange_u64(
        &mut self,
        addr: Maddr,
        current: u64,
        new: u64,
    ) -> Result<Exchange<u64>, MemError> {
        (&*self).compare_exchange_u64(addr, current, new)
    }
}

impl MachineMemory for KvmMemory {
    fn alloc_block(&mut self, order: u8) -> Option<Mfn> {
        let count = 1u64 << order;
        let reused = self.free.get_mut(&order).and_then(|set| set.pop_first());
        let first = match reused {
            Some(first) => first,
            None => {
                // Frames skipped to reach the block's alignment go to the single frames.
                let first = self.next.next_multiple_of(count);
                if first + count > self.frames {
                    return None;
                }
                self.free.entry(0).or_default().extend(self.next..first);
                self.next = first + count;
                first
            }
        };
        for i in 0..count {
            self.zero_frame(Mfn::new(first + i)).ok()?;
        }
        Some(Mfn::new(first))
    }

    fn free_block(&mut self, first: Mfn, order: u8) {
        self.free.entry(order).or_default().insert(first.raw());
    }

    fn compare_exchange_u128(
        &mut self,
        addr: Maddr,
        _: u128,
        _: u128,
    ) -> Result<Exchange<u128>, MemError> {
        Err(MemError::NotAtomic { addr: addr.raw() })
    }

    fn zero_frame(&mut self, mfn: Mfn) -> Result<(), MemError> {
        self.write_bytes(mfn.base().raw(), &[0u8; 4096])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lost_compare_exchange_leaves_memory_and_reports_it() {
        let mut m = KvmMemory::new(4).unwrap();
        let at = Maddr::new(0x1010);
        m.write_u64(at, 0x0123_4567_89ab_cdef).unwrap();
        assert_eq!(
            m.compare_exchange_u64(at, 1, 2),
            Ok(Exchange::Lost {
                actual: 0x0123_4567_89ab_cdef
            })
        );
        assert_eq!(
            m.compare_exchange_u32(Maddr::new(0x1014), 1, 2),
            Ok(Exchange::Lost {
                actual: 0x0123_4567
            })
        );
        assert_eq!(m.read_u64(at).unwrap(), 0x0123_4567_89ab_cdef);
        assert_eq!(
            m.compare_exchange_u32(Maddr::new(0x1014), 0x0123_4567, 5),
            Ok(Exchange::Swapped)
        );
        assert_eq!(m.read_u64(at).unwrap(), 0x0000_0005_89ab_cdef);
        assert_eq!(
            m.compare_exchange_u64(Maddr::new(0x1014), 0, 1),
            Err(MemError::Misaligned { addr: 0x1014 })
        );
        // No 16-byte atomic here: refused with nothing written.
        assert_eq!(
            m.compare_exchange_u128(at, 0x0000_0005_89ab_cdef, 1),
            Err(MemError::NotAtomic { addr: 0x1010 })
        );
        assert_eq!(m.read_u64(at).unwrap(), 0x0000_0005_89ab_cdef);
    }

    #[test]
    fn blocks_are_aligned_zeroed_and_reused() {
        let mut m = KvmMemory::new(64).unwrap();
        let a = m.alloc_block(0).unwrap();
        m.write_u64(a.base(), 0xdead).unwrap();
        let b = m.alloc_block(2).unwrap();
        assert_eq!(b.raw() % 4, 0);
        assert_eq!(m.frames_in_use(), 5);
        m.free_block(a, 0);
        let c = m.alloc_block(0).unwrap();
        assert!(
            c != b && c.raw() < b.raw(),
            "a freed or skipped frame is reused first"
        );
        assert_eq!(m.read_u64(a.base()).unwrap(), 0);
        assert!(m.read_u64(Maddr::new(64 * 4096)).is_err());
        assert!(m.read_u64(Maddr::new(4)).is_err());
    }
}

//! The VM's guest-physical memory is the engine's machine memory: one vm-memory mapping
//! that KVM runs the vcpus on, handed out frame by frame to the shadow pool, the p2m, the
//! hypervisor area and the guest's RAM. Nothing here maps the pool anywhere: the hardware
//! walks it by (VM-)physical address only.

use std::collections::{BTreeMap, BTreeSet};

use shadow2::paging::{MemError, PhysMem};
use shadow2::{MachineMemory, Maddr, Mfn};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

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

impl PhysMem<Maddr> for KvmMemory {
    fn read_u32(&self, addr: Maddr) -> Result<u32, MemError> {
        let a = self.check(addr.raw(), 4)?;
        self.mem
            .read_obj(a)
            .map_err(|_| MemError::Unbacked { addr: addr.raw() })
    }
    fn read_u64(&self, addr: Maddr) -> Result<u64, MemError> {
        let a = self.check(addr.raw(), 8)?;
        self.mem
            .read_obj(a)
            .map_err(|_| MemError::Unbacked { addr: addr.raw() })
    }
    fn write_u32(&mut self, addr: Maddr, value: u32) -> Result<(), MemError> {
        let a = self.check(addr.raw(), 4)?;
        self.mem
            .write_obj(value, a)
            .map_err(|_| MemError::Unbacked { addr: addr.raw() })
    }
    fn write_u64(&mut self, addr: Maddr, value: u64) -> Result<(), MemError> {
        let a = self.check(addr.raw(), 8)?;
        self.mem
            .write_obj(value, a)
            .map_err(|_| MemError::Unbacked { addr: addr.raw() })
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

    fn zero_frame(&mut self, mfn: Mfn) -> Result<(), MemError> {
        self.write_bytes(mfn.base().raw(), &[0u8; 4096])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

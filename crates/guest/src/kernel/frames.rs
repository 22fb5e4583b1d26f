//! The kernel's physical frame allocator, with reference counts for shared (copy-on-write
//! and page-cache) frames.

/// Guest frames: a LIFO free list (a freed page table comes straight back as something
/// else, as in a real kernel) and a count of references per frame.
#[derive(Debug)]
pub struct Frames {
    refs: Vec<u32>,
    free: Vec<u64>,
}

impl Frames {
    /// All of `0..ram` free except frame 0 and the kernel image (frame 1).
    pub fn new(ram: u64) -> Frames {
        let free = (super::arch::CODE_GFN + 1..ram).rev().collect();
        Frames {
            refs: vec![0; ram as usize],
            free,
        }
    }

    /// Takes a free frame with one reference.
    pub fn alloc(&mut self) -> Option<u64> {
        let gfn = self.free.pop()?;
        if let Some(r) = self.refs.get_mut(gfn as usize) {
            *r = 1;
        }
        Some(gfn)
    }

    /// Adds a reference.
    pub fn get(&mut self, gfn: u64) {
        if let Some(r) = self.refs.get_mut(gfn as usize) {
            *r += 1;
        }
    }

    /// References to a frame.
    pub fn refs(&self, gfn: u64) -> u32 {
        self.refs.get(gfn as usize).copied().unwrap_or(0)
    }

    /// Drops a reference; the frame is free when none are left. Returns whether it was
    /// freed.
    pub fn put(&mut self, gfn: u64) -> bool {
        let Some(r) = self.refs.get_mut(gfn as usize) else {
            return false;
        };
        if *r == 0 {
            return false;
        }
        *r -= 1;
        if *r == 0 {
            self.free.push(gfn);
            true
        } else {
            false
        }
    }
}

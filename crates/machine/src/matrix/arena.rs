//! A tiny flat guest-physical memory for one matrix case: a handful of 4 KiB pages in one
//! `Vec`, found by a linear search over their frame numbers, and reset by clearing only the
//! words that were touched (a case writes a few entries, so a reset costs a few stores).

use shadow2::addr::Gpa;
use shadow2::paging::{
    Exchange, MemError, PhysMem, serial_compare_exchange_u32, serial_compare_exchange_u64,
};

/// 8-byte words per 4 KiB page.
const WORDS_PER_PAGE: usize = 512;
/// The most pages one case or scenario may back.
pub const MAX_PAGES: usize = 16;
/// How many writes one access may log before the log saturates.
const WRITE_LOG_LEN: usize = 8;

/// Flat guest-physical memory backing at most [`MAX_PAGES`] pages anywhere in the
/// 52-bit physical address space.
#[derive(Clone, Debug)]
pub struct ArenaMem {
    frames: Vec<u64>,
    words: Vec<u64>,
    touched: Vec<usize>,
    write_log: [u64; WRITE_LOG_LEN],
    writes: usize,
}

impl Default for ArenaMem {
    fn default() -> Self {
        ArenaMem::new()
    }
}

impl ArenaMem {
    /// An empty arena (no page backed).
    pub fn new() -> ArenaMem {
        ArenaMem {
            frames: Vec::with_capacity(MAX_PAGES),
            words: vec![0; MAX_PAGES * WORDS_PER_PAGE],
            touched: Vec::with_capacity(64),
            write_log: [0; WRITE_LOG_LEN],
            writes: 0,
        }
    }

    /// Unbacks every page and zeroes every word that was written.
    pub fn clear(&mut self) {
        for &index in &self.touched {
            if let Some(word) = self.words.get_mut(index) {
                *word = 0;
            }
        }
        self.touched.clear();
        self.frames.clear();
        self.forget_writes();
    }

    /// Backs the 4 KiB page holding `addr` (zero-filled if new). Returns false when the
    /// arena is full.
    pub fn back(&mut self, addr: u64) -> bool {
        let frame = addr >> 12;
        if self.frames.contains(&frame) {
            return true;
        }
        if self.frames.len() >= MAX_PAGES {
            return false;
        }
        self.frames.push(frame);
        true
    }

    fn word_index(&self, addr: u64) -> Option<usize> {
        let frame = addr >> 12;
        let slot = self.frames.iter().position(|&f| f == frame)?;
        Some(slot * WORDS_PER_PAGE + ((addr & 0xfff) >> 3) as usize)
    }

    /// The 8-byte word at `addr` (rounded down to 8), if backed.
    pub fn peek(&self, addr: u64) -> Option<u64> {
        self.word_index(addr & !7)
            .and_then(|i| self.words.get(i).copied())
    }

    /// Sets the 8-byte word at `addr` (rounded down to 8), backing its page first; does not
    /// count as a logged write. Returns false when the arena is full.
    pub fn poke(&mut self, addr: u64, value: u64) -> bool {
        if !self.back(addr) {
            return false;
        }
        self.store(addr & !7, value).is_some()
    }

    /// Sets the low 4 bytes (`addr` % 8 == 0) or high 4 bytes (`addr` % 8 == 4) of a word,
    /// backing its page first. Returns false when the arena is full.
    pub fn poke_u32(&mut self, addr: u64, value: u32) -> bool {
        if !self.back(addr) {
            return false;
        }
        let old = self.peek(addr).unwrap_or(0);
        self.store(addr & !7, merge_u32(old, addr, value)).is_some()
    }

    fn store(&mut self, word_addr: u64, value: u64) -> Option<()> {
        let index = self.word_index(word_addr)?;
        let word = self.words.get_mut(index)?;
        *word = value;
        self.touched.push(index);
        Some(())
    }

    /// Forgets the logged writes (before an access whose writes are to be checked).
    pub fn forget_writes(&mut self) {
        self.writes = 0;
    }

    /// The addresses written through [`PhysMem`] since the last [`Self::forget_writes`]
    /// (the first few), and how many writes there were in all.
    pub fn logged_writes(&self) -> (&[u64], usize) {
        let shown = self.writes.min(WRITE_LOG_LEN);
        (&self.write_log[..shown], self.writes)
    }

    fn log_write(&mut self, addr: u64) {
        if let Some(slot) = self.write_log.get_mut(self.writes) {
            *slot = addr;
        }
        self.writes += 1;
    }

    fn checked_index(&self, addr: u64, align: u64) -> Result<usize, MemError> {
        if !addr.is_multiple_of(align) {
            return Err(MemError::Misaligned { addr });
        }
        self.word_index(addr & !7)
            .ok_or(MemError::Unbacked { addr })
    }
}

fn merge_u32(word: u64, addr: u64, value: u32) -> u64 {
    let shift = (addr & 4) * 8;
    (word & !(0xffff_ffffu64 << shift)) | (u64::from(value) << shift)
}

impl PhysMem<Gpa> for ArenaMem {
    fn read_u32(&self, addr: Gpa) -> Result<u32, MemError> {
        let a = addr.raw();
        let index = self.checked_index(a, 4)?;
        let word = self.words.get(index).copied().unwrap_or(0);
        Ok((word >> ((a & 4) * 8)) as u32)
    }
    fn read_u64(&self, addr: Gpa) -> Result<u64, MemError> {
        let index = self.checked_index(addr.raw(), 8)?;
        Ok(self.words.get(index).copied().unwrap_or(0))
    }
    fn write_u32(&mut self, addr: Gpa, value: u32) -> Result<(), MemError> {
        let a = addr.raw();
        let index = self.checked_index(a, 4)?;
        let old = self.words.get(index).copied().unwrap_or(0);
        self.store(a & !7, merge_u32(old, a, value))
            .ok_or(MemError::Unbacked { addr: a })?;
        self.log_write(a);
        Ok(())
    }
    fn write_u64(&mut self, addr: Gpa, value: u64) -> Result<(), MemError> {
        let a = addr.raw();
        self.checked_index(a, 8)?;
        self.store(a, value).ok_or(MemError::Unbacked { addr: a })?;
        self.log_write(a);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backs_pages_anywhere_and_resets_cheaply() {
        let mut mem = ArenaMem::new();
        assert!(mem.poke(0x10_0000_4008, 0xdead_beef_0000_0001));
        assert_eq!(mem.peek(0x10_0000_4008), Some(0xdead_beef_0000_0001));
        assert_eq!(mem.read_u32(Gpa::new(0x10_0000_400c)), Ok(0xdead_beef));
        assert_eq!(
            mem.read_u64(Gpa::new(0x5000)),
            Err(MemError::Unbacked { addr: 0x5000 })
        );
        assert_eq!(
            mem.read_u64(Gpa::new(0x10_0000_4004)),
            Err(MemError::Misaligned {
                addr: 0x10_0000_4004
            })
        );
        mem.clear();
        assert_eq!(mem.peek(0x10_0000_4008), None);
        assert!(mem.back(0x10_0000_4000));
        assert_eq!(mem.peek(0x10_0000_4008), Some(0));
    }

    #[test]
    fn logs_writes_made_through_phys_mem_only() {
        let mut mem = ArenaMem::new();
        assert!(mem.poke_u32(0x3004, 0x1234));
        assert_eq!(mem.peek(0x3000), Some(0x1234 << 32));
        assert_eq!(mem.logged_writes().1, 0);
        mem.write_u32(Gpa::new(0x3000), 7).unwrap();
        assert_eq!(mem.peek(0x3000), Some((0x1234 << 32) | 7));
        assert_eq!(mem.logged_writes(), (&[0x3000u64][..], 1));
        mem.forget_writes();
        assert_eq!(mem.logged_writes().1, 0);
    }

    #[test]
    fn refuses_more_than_max_pages() {
        let mut mem = ArenaMem::new();
        for page in 0..MAX_PAGES as u64 {
            assert!(mem.back(page << 12));
        }
        assert!(!mem.back((MAX_PAGES as u64) << 12));
        assert!(mem.back(0));
    }
}

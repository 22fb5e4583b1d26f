//! Sparse machine memory of 4 KiB frames with a frame allocator, and a guest-physical view
//! of any machine memory through a gfn -> mfn lookup.
//!
//! Only frames that were written to hold storage, so a machine of 1 TiB (or the whole 52-bit
//! space) with a few thousand frames in use costs a few thousand frames of host memory.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use shadow2::addr::{Gfn, Gpa, Maddr, Mfn, PAGE_SHIFT, PAGE_SIZE, PhysAddr};
use shadow2::host::{MachineMemory, serial_compare_exchange_u128};
use shadow2::paging::{
    Exchange, MemError, PhysMem, serial_compare_exchange_u32, serial_compare_exchange_u64,
};

use crate::fx::FxHashMap;

/// 8-byte words per 4 KiB frame.
const WORDS_PER_FRAME: usize = 512;

/// The largest block order the allocator knows: 2^40 frames cover the whole 52-bit
/// physical address space.
pub const MAX_ORDER: u8 = 40;

/// The most frames a [`SparseMemory`] can have (the 52-bit physical address space).
pub const MAX_FRAMES: u64 = 1 << MAX_ORDER;

/// The storage of one populated frame.
type FrameData = Box<[u64; WORDS_PER_FRAME]>;

/// Populated frames by frame number.
type FrameMap = FxHashMap<u64, FrameData>;

/// Why [`SparseMemory::reserve`] refused a range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReserveError {
    /// The range does not lie inside the memory.
    OutOfRange,
    /// A frame of the range is currently handed out by the allocator.
    InUse {
        /// The first block in the way.
        mfn: Mfn,
    },
}

impl fmt::Display for ReserveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReserveError::OutOfRange => write!(f, "range lies outside machine memory"),
            ReserveError::InUse { mfn } => write!(f, "frame {mfn} is allocated"),
        }
    }
}

impl std::error::Error for ReserveError {}

/// Sparse machine memory: frames `0 .. frames` are backed, an untouched frame reads as zero,
/// and a frame gets storage on its first nonzero write.
///
/// It is also a frame allocator ([`MachineMemory`]): blocks of `2^order` naturally aligned
/// frames, handed out zero-filled, never overlapping a block still out or a reserved range.
#[derive(Clone)]
pub struct SparseMemory {
    frames: u64,
    data: FrameMap,
    alloc: FrameAllocator,
    /// Changes made to the contents so far (see [`SparseMemory::changes`]).
    changes: u64,
    /// Frames whose changes are also counted in `watched_changes` ([`SparseMemory::watch`]).
    watched: FxHashMap<u64, ()>,
    watched_changes: u64,
}

impl fmt::Debug for SparseMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Frame contents would drown everything else.
        f.debug_struct("SparseMemory")
            .field("frames", &self.frames)
            .field("populated", &self.data.len())
            .field("allocated", &self.alloc.allocated)
            .field("reserved", &self.alloc.reserved_frames)
            .field("bad_frees", &self.alloc.bad_frees)
            .finish()
    }
}

impl SparseMemory {
    /// Memory of `frames` 4 KiB frames (mfn `0 .. frames`), clamped to [`MAX_FRAMES`].
    pub fn new(frames: u64) -> SparseMemory {
        let frames = frames.min(MAX_FRAMES);
        SparseMemory {
            frames,
            data: FrameMap::default(),
            alloc: FrameAllocator::new(frames),
            changes: 0,
            watched: FxHashMap::default(),
            watched_changes: 0,
        }
    }

    /// Memory filling a `bits`-bit physical address space (e.g. 40 for 1 TiB), with `bits`
    /// clamped to 12..=52.
    pub fn with_phys_bits(bits: u8) -> SparseMemory {
        let bits = u32::from(bits.clamp(12, 52));
        SparseMemory::new(1 << (bits - PAGE_SHIFT))
    }

    /// The number of frames backed (mfn `0 .. frames()`).
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// The number of bytes backed.
    pub fn size_bytes(&self) -> u64 {
        self.frames * PAGE_SIZE
    }

    /// Whether `mfn` is backed by this memory.
    pub fn contains(&self, mfn: Mfn) -> bool {
        mfn.raw() < self.frames
    }

    /// The number of frames holding storage (frames ever written with nonzero data and not
    /// zero-filled since): the host memory this machine really costs.
    pub fn populated_frames(&self) -> usize {
        self.data.len()
    }

    /// Whether `mfn` holds storage.
    pub fn is_populated(&self, mfn: Mfn) -> bool {
        self.data.contains_key(&mfn.raw())
    }

    /// The number of frames currently handed out by the allocator.
    pub fn allocated_frames(&self) -> u64 {
        self.alloc.allocated
    }

    /// The number of frames the allocator could still hand out (neither handed out nor
    /// reserved).
    pub fn free_frames(&self) -> u64 {
        self.frames - self.alloc.allocated - self.alloc.reserved_frames
    }

    /// The number of frames reserved with [`SparseMemory::reserve`].
    pub fn reserved_frames(&self) -> u64 {
        self.alloc.reserved_frames
    }

    /// How many [`MachineMemory::free_block`] calls were ignored: double frees, frees of
    /// blocks never handed out, and frees with an order other than the allocation's.
    pub fn bad_frees(&self) -> u64 {
        self.alloc.bad_frees
    }

    /// The order of the block starting at `first` if the allocator handed it out.
    pub fn allocated_block(&self, first: Mfn) -> Option<u8> {
        self.alloc.outstanding.get(&first.raw()).copied()
    }

    /// Hands out `2^order` contiguous frames aligned to their size, each its own one-frame
    /// allocation (freed one by one with `free_block(frame, 0)`): guest RAM that shadow
    /// superpages can map.
    pub fn alloc_aligned_frames(&mut self, order: u8) -> Option<Mfn> {
        let first = self.alloc.alloc(order)?;
        self.alloc.outstanding.remove(&first);
        for f in first..first + (1u64 << order) {
            self.alloc.outstanding.insert(f, 0);
        }
        self.depopulate(first, 1 << order);
        Some(Mfn::new(first))
    }

    /// Keeps the allocator away from `count` frames starting at `first` (for memory with a
    /// fixed role: guest RAM, a hypervisor area). The frames stay readable and writable.
    /// Reserving frames already reserved is harmless; frames handed out are refused.
    pub fn reserve(&mut self, first: Mfn, count: u64) -> Result<(), ReserveError> {
        let end = first
            .raw()
            .checked_add(count)
            .filter(|&end| end <= self.frames)
            .ok_or(ReserveError::OutOfRange)?;
        self.alloc.reserve(first.raw(), end)
    }

    /// A count that grows with every change to the contents of memory (a word written
    /// with a different value, a frame zero-filled): while it stays the same, every byte
    /// reads as it did, so anything computed from memory alone may be reused.
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// Watches frame `mfn` (populated or not, for good): from now on every change to its
    /// contents is also counted by [`SparseMemory::watched_changes`]. Watching changes
    /// nothing in memory.
    pub fn watch(&mut self, mfn: Mfn) {
        self.watched.insert(mfn.raw(), ());
    }

    /// A count that grows with every change to the contents of a watched frame: while it
    /// stays the same, every watched frame reads as it did.
    pub fn watched_changes(&self) -> u64 {
        self.watched_changes
    }

    /// Counts a change to the contents of frame `mfn`.
    fn changed(&mut self, mfn: u64) {
        self.changes += 1;
        if self.watched.contains_key(&mfn) {
            self.watched_changes += 1;
        }
    }

    /// Reads `buf.len()` bytes starting at `addr`; the range may cross frames. Same result
    /// as [`copy_from_phys`], one frame lookup per frame instead of one per word.
    pub fn read_bytes(&self, addr: Maddr, buf: &mut [u8]) -> Result<(), MemError> {
        let start = addr.raw();
        self.check_bytes(start, buf.len())?;
        let mut done = 0;
        while done < buf.len() {
            let at = start + done as u64;
            let offset = (at % PAGE_SIZE) as usize;
            let n = (PAGE_SIZE as usize - offset).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            match self.data.get(&(at >> PAGE_SHIFT)) {
                Some(frame) => frame_bytes(frame, offset, out),
                None => out.fill(0),
            }
            done += n;
        }
        Ok(())
    }

    /// Writes `data` starting at `addr`; the range may cross frames. Nothing is written
    /// unless the whole range is backed. Same result as [`copy_to_phys`], one frame lookup
    /// per frame instead of two per word.
    pub fn write_bytes(&mut self, addr: Maddr, data: &[u8]) -> Result<(), MemError> {
        let start = addr.raw();
        self.check_bytes(start, data.len())?;
        let mut done = 0;
        while done < data.len() {
            let at = start + done as u64;
            let offset = (at % PAGE_SIZE) as usize;
            let n = (PAGE_SIZE as usize - offset).min(data.len() - done);
            self.write_in_frame(at >> PAGE_SHIFT, offset, &data[done..done + n]);
            done += n;
        }
        Ok(())
    }

    /// The error [`copy_from_phys`] / [`copy_to_phys`] give for `len` bytes at `start`: the
    /// first word outside memory (or past the end of the address space) is unbacked.
    fn check_bytes(&self, start: u64, len: usize) -> Result<(), MemError> {
        check_span(start, len)?;
        if len == 0 {
            return Ok(());
        }
        let last = start + (len as u64 - 1);
        if last >> PAGE_SHIFT < self.frames {
            return Ok(());
        }
        let first_unbacked = (self.frames << PAGE_SHIFT).max(start & !7);
        Err(MemError::Unbacked {
            addr: first_unbacked,
        })
    }

    /// Writes `bytes` at `offset` inside frame `mfn` (the range lies inside the frame).
    fn write_in_frame(&mut self, mfn: u64, offset: usize, bytes: &[u8]) {
        let frame = match self.data.entry(mfn) {
            Entry::Occupied(frame) => frame.into_mut(),
            // An untouched frame already reads as zero: zeros cost no storage.
            Entry::Vacant(_) if bytes.iter().all(|&b| b == 0) => return,
            Entry::Vacant(frame) => frame.insert(Box::new([0; WORDS_PER_FRAME])),
        };
        let mut changed = false;
        let mut done = 0;
        while done < bytes.len() {
            let at = offset + done;
            let (index, skip) = (at / 8, at % 8);
            let old = frame[index];
            let new = if skip == 0
                && let Some(whole) = bytes.get(done..done + 8)
            {
                done += 8;
                u64::from_le_bytes(whole.try_into().unwrap_or_default())
            } else {
                let n = (8 - skip).min(bytes.len() - done);
                let mut word = old.to_le_bytes();
                word[skip..skip + n].copy_from_slice(&bytes[done..done + n]);
                done += n;
                u64::from_le_bytes(word)
            };
            frame[index] = new;
            changed |= new != old;
        }
        if changed {
            self.changed(mfn);
        }
    }

    /// The frame and word index of a naturally aligned `size`-byte access at `addr`.
    #[inline]
    fn locate(&self, addr: Maddr, size: u64) -> Result<(u64, usize), MemError> {
        let raw = addr.raw();
        if !raw.is_multiple_of(size) {
            return Err(MemError::Misaligned { addr: raw });
        }
        let mfn = raw >> PAGE_SHIFT;
        if mfn >= self.frames {
            return Err(MemError::Unbacked { addr: raw });
        }
        Ok((mfn, (addr.offset() / 8) as usize))
    }

    #[inline]
    fn word(&self, mfn: u64, index: usize) -> u64 {
        self.data.get(&mfn).map_or(0, |frame| frame[index])
    }

    fn set_word(&mut self, mfn: u64, index: usize, value: u64) {
        match self.data.get_mut(&mfn) {
            Some(frame) if frame[index] == value => {}
            Some(frame) => {
                frame[index] = value;
                self.changed(mfn);
            }
            // An untouched frame already reads as zero: storing a zero would cost a frame
            // of host memory for nothing.
            None if value == 0 => {}
            None => {
                let mut frame: FrameData = Box::new([0; WORDS_PER_FRAME]);
                frame[index] = value;
                self.data.insert(mfn, frame);
                self.changed(mfn);
            }
        }
    }

    /// Drops the storage of `count` frames from `first`, which zero-fills them.
    fn depopulate(&mut self, first: u64, count: u64) {
        let end = first.saturating_add(count);
        let mut removed = Vec::new();
        if !usize::try_from(count).is_ok_and(|c| c < self.data.len()) {
            self.data.retain(|&mfn, _| {
                let keep = mfn < first || mfn >= end;
                if !keep {
                    removed.push(mfn);
                }
                keep
            });
        } else {
            removed.extend((first..end).filter(|mfn| self.data.remove(mfn).is_some()));
        }
        for mfn in removed {
            self.changed(mfn);
        }
    }
}

/// The bit position of the 4-byte half at `raw` inside its 8-byte word.
fn half_shift(raw: u64) -> u32 {
    if raw & 4 == 0 { 0 } else { 32 }
}

// Every walk and every guest-physical copy reads through these: inlined into the engine's
// generic code, a read is a frame lookup and an index.
impl PhysMem<Maddr> for SparseMemory {
    #[inline]
    fn read_u32(&self, addr: Maddr) -> Result<u32, MemError> {
        let (mfn, index) = self.locate(addr, 4)?;
        Ok((self.word(mfn, index) >> half_shift(addr.raw())) as u32)
    }

    #[inline]
    fn read_u64(&self, addr: Maddr) -> Result<u64, MemError> {
        let (mfn, index) = self.locate(addr, 8)?;
        Ok(self.word(mfn, index))
    }

    fn write_u32(&mut self, addr: Maddr, value: u32) -> Result<(), MemError> {
        let (mfn, index) = self.locate(addr, 4)?;
        let shift = half_shift(addr.raw());
        let old = self.word(mfn, index);
        let new = (old & !(0xffff_ffffu64 << shift)) | (u64::from(value) << shift);
        self.set_word(mfn, index, new);
        Ok(())
    }

    fn write_u64(&mut self, addr: Maddr, value: u64) -> Result<(), MemError> {
        let (mfn, index) = self.locate(addr, 8)?;
        self.set_word(mfn, index, value);
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

impl MachineMemory for SparseMemory {
    fn alloc_block(&mut self, order: u8) -> Option<Mfn> {
        let first = self.alloc.alloc(order)?;
        self.depopulate(first, 1 << order);
        Some(Mfn::new(first))
    }

    fn free_block(&mut self, first: Mfn, order: u8) {
        self.alloc.free(first.raw(), order);
    }

    fn compare_exchange_u128(
        &mut self,
        addr: Maddr,
        current: u128,
        new: u128,
    ) -> Result<Exchange<u128>, MemError> {
        serial_compare_exchange_u128(self, addr, current, new)
    }

    fn zero_frame(&mut self, mfn: Mfn) -> Result<(), MemError> {
        if !self.contains(mfn) {
            return Err(MemError::Unbacked {
                addr: mfn.base().raw(),
            });
        }
        if self.data.remove(&mfn.raw()).is_some() {
            self.changed(mfn.raw());
        }
        Ok(())
    }
}

/// Copies the bytes at `offset..offset + out.len()` of a frame's words into `out`.
fn frame_bytes(frame: &[u64; WORDS_PER_FRAME], offset: usize, out: &mut [u8]) {
    let mut done = 0;
    while done < out.len() {
        let at = offset + done;
        let (index, skip) = (at / 8, at % 8);
        let word = frame[index].to_le_bytes();
        if skip == 0
            && let Some(whole) = out.get_mut(done..done + 8)
        {
            whole.copy_from_slice(&word);
            done += 8;
        } else {
            let n = (8 - skip).min(out.len() - done);
            out[done..done + n].copy_from_slice(&word[skip..skip + n]);
            done += n;
        }
    }
}

/// A buddy-style frame allocator: a bump pointer over frames never handed out, per-order
/// free lists (merging buddies on free) for frames given back, and reserved ranges skipped.
#[derive(Clone, Debug)]
struct FrameAllocator {
    limit: u64,
    /// Frames at and above `next` are free or reserved; below it, every frame is handed
    /// out, on a free list, or reserved, and no free block ends at `next` (it would have
    /// been given back to the bump region, so that no free block straddles `next`).
    next: u64,
    /// Free blocks by order, as first frames. Sorted sets make reuse deterministic (lowest
    /// address first) and let a free find its buddy quickly.
    free: [BTreeSet<u64>; MAX_ORDER as usize + 1],
    /// Blocks handed out: first frame -> order.
    outstanding: BTreeMap<u64, u8>,
    /// Reserved ranges, disjoint and non-adjacent: start -> end (exclusive).
    reserved: BTreeMap<u64, u64>,
    allocated: u64,
    reserved_frames: u64,
    bad_frees: u64,
}

impl FrameAllocator {
    fn new(limit: u64) -> FrameAllocator {
        FrameAllocator {
            limit,
            next: 0,
            free: std::array::from_fn(|_| BTreeSet::new()),
            outstanding: BTreeMap::new(),
            reserved: BTreeMap::new(),
            allocated: 0,
            reserved_frames: 0,
            bad_frees: 0,
        }
    }

    fn alloc(&mut self, order: u8) -> Option<u64> {
        if order > MAX_ORDER {
            return None;
        }
        let first = self.take_free(order).or_else(|| self.bump(order))?;
        self.outstanding.insert(first, order);
        self.allocated += 1 << order;
        Some(first)
    }

    /// The smallest free block of at least `order`, split down to `order`.
    fn take_free(&mut self, order: u8) -> Option<u64> {
        let (mut found, first) = (order..=MAX_ORDER)
            .find_map(|o| self.free[usize::from(o)].pop_first().map(|f| (o, f)))?;
        while found > order {
            found -= 1;
            self.free[usize::from(found)].insert(first + (1 << found));
        }
        Some(first)
    }

    /// A block of never-handed-out frames above the bump pointer.
    fn bump(&mut self, order: u8) -> Option<u64> {
        let size = 1u64 << order;
        let mut cursor = self.next;
        loop {
            let start = cursor.checked_next_multiple_of(size)?;
            let end = start.checked_add(size).filter(|&end| end <= self.limit)?;
            match self.reserved_overlap(start, end) {
                Some(reserved_end) => cursor = reserved_end,
                None => {
                    // The alignment gap stays usable for smaller blocks.
                    let gap_start = std::mem::replace(&mut self.next, end);
                    self.release_range(gap_start, start);
                    return Some(start);
                }
            }
        }
    }

    /// The end of the last reserved range overlapping `start .. end`, if any.
    fn reserved_overlap(&self, start: u64, end: u64) -> Option<u64> {
        self.reserved
            .range(..end)
            .next_back()
            .and_then(|(_, &r_end)| (r_end > start).then_some(r_end))
    }

    fn free(&mut self, first: u64, order: u8) -> bool {
        if self.outstanding.get(&first) != Some(&order) {
            self.bad_frees += 1;
            return false;
        }
        self.outstanding.remove(&first);
        self.allocated -= 1 << order;
        self.insert_free(first, order);
        self.retreat();
        true
    }

    /// Gives free blocks ending at the bump pointer back to the bump region. Without this a
    /// free run below `next` and the untouched frames above it could form a fully free
    /// aligned block that neither the free lists nor the bump pointer would hand out.
    fn retreat(&mut self) {
        while let Some((start, order)) = self.free_block_ending_at_next() {
            self.free[usize::from(order)].remove(&start);
            self.next = start;
        }
    }

    fn free_block_ending_at_next(&self) -> Option<(u64, u8)> {
        (0..=MAX_ORDER).find_map(|order| {
            let size = 1u64 << order;
            let start = self.next.checked_sub(size)?;
            let aligned = start.is_multiple_of(size);
            (aligned && self.free[usize::from(order)].contains(&start)).then_some((start, order))
        })
    }

    /// Puts a block on the free lists, merged with its free buddies.
    fn insert_free(&mut self, mut first: u64, mut order: u8) {
        while order < MAX_ORDER {
            let buddy = first ^ (1 << order);
            if !self.free[usize::from(order)].remove(&buddy) {
                break;
            }
            first = first.min(buddy);
            order += 1;
        }
        self.free[usize::from(order)].insert(first);
    }

    /// Puts every unreserved frame of `lo .. hi` on the free lists.
    fn release_range(&mut self, lo: u64, hi: u64) {
        if lo >= hi {
            return;
        }
        // Ranges are disjoint, so walking back from `hi` meets them in decreasing order and
        // the first one ending at or before `lo` ends the overlap.
        let holes: Vec<(u64, u64)> = self
            .reserved
            .range(..hi)
            .rev()
            .take_while(|&(_, &end)| end > lo)
            .map(|(&start, &end)| (start, end))
            .collect();
        let mut cursor = lo;
        for &(start, end) in holes.iter().rev() {
            self.release_aligned(cursor, start.max(cursor));
            cursor = cursor.max(end);
        }
        self.release_aligned(cursor, hi);
    }

    /// Puts `lo .. hi` on the free lists as maximal naturally aligned blocks.
    fn release_aligned(&mut self, mut lo: u64, hi: u64) {
        while lo < hi {
            let align = lo.trailing_zeros();
            let fit = 63 - (hi - lo).leading_zeros();
            let order = align.min(fit).min(u32::from(MAX_ORDER)) as u8;
            self.insert_free(lo, order);
            lo += 1 << order;
        }
    }

    fn reserve(&mut self, first: u64, end: u64) -> Result<(), ReserveError> {
        if first >= end {
            return Ok(());
        }
        if let Some(block) = self.outstanding_overlap(first, end) {
            return Err(ReserveError::InUse {
                mfn: Mfn::new(block),
            });
        }
        let displaced = self.take_free_overlapping(first, end);
        self.add_reserved(first, end);
        for (start, order) in displaced {
            self.release_range(start, start + (1 << order));
        }
        self.retreat();
        Ok(())
    }

    fn outstanding_overlap(&self, first: u64, end: u64) -> Option<u64> {
        if let Some((&start, _)) = self.outstanding.range(first..end).next() {
            return Some(start);
        }
        self.outstanding
            .range(..first)
            .next_back()
            .filter(|&(&start, &order)| start + (1 << order) > first)
            .map(|(&start, _)| start)
    }

    /// Removes every free block overlapping `first .. end` and returns them.
    fn take_free_overlapping(&mut self, first: u64, end: u64) -> Vec<(u64, u8)> {
        let mut taken = Vec::new();
        for order in 0..=MAX_ORDER {
            let list = &mut self.free[usize::from(order)];
            let lowest = first.saturating_sub((1 << order) - 1);
            let hits: Vec<u64> = list.range(lowest..end).copied().collect();
            for start in hits {
                list.remove(&start);
                taken.push((start, order));
            }
        }
        taken
    }

    /// Adds `first .. end` to the reserved ranges, merging with ranges it touches.
    fn add_reserved(&mut self, first: u64, end: u64) {
        let touching: Vec<(u64, u64)> = self
            .reserved
            .range(..=end)
            .rev()
            .take_while(|&(_, &r_end)| r_end >= first)
            .map(|(&s, &e)| (s, e))
            .collect();
        let (mut lo, mut hi) = (first, end);
        let mut already = 0;
        for (s, e) in touching {
            self.reserved.remove(&s);
            already += e - s;
            lo = lo.min(s);
            hi = hi.max(e);
        }
        self.reserved.insert(lo, hi);
        self.reserved_frames += (hi - lo) - already;
    }
}

/// Reads `buf.len()` bytes at `addr` from any physical memory, through its aligned 8-byte
/// words; the range may cross frames.
pub fn copy_from_phys<A, M>(mem: &M, addr: A, buf: &mut [u8]) -> Result<(), MemError>
where
    A: PhysAddr,
    M: PhysMem<A> + ?Sized,
{
    let start = addr.to_raw();
    check_span(start, buf.len())?;
    let mut done = 0;
    while done < buf.len() {
        let at = start + done as u64;
        let word_addr = at & !7;
        let skip = (at - word_addr) as usize;
        let word = mem.read_u64(A::from_raw(word_addr))?.to_le_bytes();
        let n = (8 - skip).min(buf.len() - done);
        buf[done..done + n].copy_from_slice(&word[skip..skip + n]);
        done += n;
    }
    Ok(())
}

/// Writes `data` at `addr` into any physical memory, through its aligned 8-byte words; the
/// range may cross frames. Every word is read before any is written, so a range that is
/// not wholly backed changes nothing.
pub fn copy_to_phys<A, M>(mem: &mut M, addr: A, data: &[u8]) -> Result<(), MemError>
where
    A: PhysAddr,
    M: PhysMem<A> + ?Sized,
{
    let start = addr.to_raw();
    check_span(start, data.len())?;
    if data.is_empty() {
        return Ok(());
    }
    let first_word = start & !7;
    let end = start + data.len() as u64;
    let mut words = Vec::with_capacity(data.len() / 8 + 2);
    let mut word_addr = first_word;
    while word_addr < end {
        words.push(mem.read_u64(A::from_raw(word_addr))?.to_le_bytes());
        word_addr += 8;
    }
    for (i, byte) in data.iter().enumerate() {
        let at = (start - first_word) as usize + i;
        words[at / 8][at % 8] = *byte;
    }
    for (i, word) in words.iter().enumerate() {
        let word_addr = first_word + 8 * i as u64;
        mem.write_u64(A::from_raw(word_addr), u64::from_le_bytes(*word))?;
    }
    Ok(())
}

/// Refuses a byte range that would run past the end of the 64-bit address space (rounded
/// up to whole words).
fn check_span(start: u64, len: usize) -> Result<(), MemError> {
    (len as u64)
        .checked_add(start)
        .and_then(|end| end.checked_next_multiple_of(8))
        .map(|_| ())
        .ok_or(MemError::Unbacked { addr: start })
}

/// Guest-physical memory seen through a gfn -> mfn lookup over machine memory: the view a
/// guest walk reads through. An unmapped gfn is [`MemError::Unbacked`]; every error names
/// the guest-physical address.
pub struct GuestPhysView<'a, M: ?Sized, F> {
    mem: &'a mut M,
    lookup: F,
}

impl<M: ?Sized, F> fmt::Debug for GuestPhysView<'_, M, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuestPhysView").finish_non_exhaustive()
    }
}

impl<'a, M, F> GuestPhysView<'a, M, F>
where
    M: PhysMem<Maddr> + ?Sized,
    F: Fn(Gfn) -> Option<Mfn>,
{
    /// A view of `mem` in which guest frame `g` is machine frame `lookup(g)`.
    pub fn new(mem: &'a mut M, lookup: F) -> Self {
        GuestPhysView { mem, lookup }
    }

    /// The machine address backing `gpa`, if its frame is mapped.
    pub fn to_maddr(&self, gpa: Gpa) -> Option<Maddr> {
        let mfn = (self.lookup)(gpa.gfn())?;
        Some(Maddr::new(mfn.base().raw() | gpa.offset()))
    }

    /// The machine memory underneath.
    pub fn machine(&mut self) -> &mut M {
        self.mem
    }

    /// Reads `buf.len()` bytes at `gpa`; the range may cross (differently mapped) frames.
    pub fn read_bytes(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), MemError> {
        copy_from_phys(self, gpa, buf)
    }

    /// Writes `data` at `gpa`; the range may cross frames. Nothing is written unless every
    /// frame of the range is mapped and backed.
    pub fn write_bytes(&mut self, gpa: Gpa, data: &[u8]) -> Result<(), MemError> {
        copy_to_phys(self, gpa, data)
    }

    /// The machine address of an aligned `size`-byte access at `gpa`.
    fn resolve(&self, gpa: Gpa, size: u64) -> Result<Maddr, MemError> {
        if !gpa.raw().is_multiple_of(size) {
            return Err(MemError::Misaligned { addr: gpa.raw() });
        }
        self.to_maddr(gpa)
            .ok_or(MemError::Unbacked { addr: gpa.raw() })
    }
}

/// The same error, naming the guest-physical address instead of the machine one.
fn in_guest_space(error: MemError, gpa: Gpa) -> MemError {
    let addr = gpa.raw();
    match error {
        MemError::Unbacked { .. } => MemError::Unbacked { addr },
        MemError::Misaligned { .. } => MemError::Misaligned { addr },
        MemError::ReadOnly { .. } => MemError::ReadOnly { addr },
        MemError::NotAtomic { .. } => MemError::NotAtomic { addr },
    }
}

impl<M, F> PhysMem<Gpa> for GuestPhysView<'_, M, F>
where
    M: PhysMem<Maddr> + ?Sized,
    F: Fn(Gfn) -> Option<Mfn>,
{
    fn read_u32(&self, addr: Gpa) -> Result<u32, MemError> {
        let ma = self.resolve(addr, 4)?;
        self.mem.read_u32(ma).map_err(|e| in_guest_space(e, addr))
    }

    fn read_u64(&self, addr: Gpa) -> Result<u64, MemError> {
        let ma = self.resolve(addr, 8)?;
        self.mem.read_u64(ma).map_err(|e| in_guest_space(e, addr))
    }

    fn write_u32(&mut self, addr: Gpa, value: u32) -> Result<(), MemError> {
        let ma = self.resolve(addr, 4)?;
        self.mem
            .write_u32(ma, value)
            .map_err(|e| in_guest_space(e, addr))
    }

    fn write_u64(&mut self, addr: Gpa, value: u64) -> Result<(), MemError> {
        let ma = self.resolve(addr, 8)?;
        self.mem
            .write_u64(ma, value)
            .map_err(|e| in_guest_space(e, addr))
    }

    fn compare_exchange_u32(
        &mut self,
        addr: Gpa,
        current: u32,
        new: u32,
    ) -> Result<Exchange<u32>, MemError> {
        let ma = self.resolve(addr, 4)?;
        self.mem
            .compare_exchange_u32(ma, current, new)
            .map_err(|e| in_guest_space(e, addr))
    }

    fn compare_exchange_u64(
        &mut self,
        addr: Gpa,
        current: u64,
        new: u64,
    ) -> Result<Exchange<u64>, MemError> {
        let ma = self.resolve(addr, 8)?;
        self.mem
            .compare_exchange_u64(ma, current, new)
            .map_err(|e| in_guest_space(e, addr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_lost_compare_exchange_leaves_memory_and_reports_it() {
        let mut mem = SparseMemory::new(4);
        let at = Maddr::new(0x1010);
        mem.write_u64(at, 0xaaaa_bbbb_cccc_dddd).unwrap();
        mem.write_u64(Maddr::new(0x1018), 9).unwrap();
        assert_eq!(
            mem.compare_exchange_u64(at, 1, 2),
            Ok(Exchange::Lost {
                actual: 0xaaaa_bbbb_cccc_dddd
            })
        );
        assert_eq!(
            mem.compare_exchange_u32(Maddr::new(0x1014), 1, 2),
            Ok(Exchange::Lost {
                actual: 0xaaaa_bbbb
            })
        );
        assert_eq!(
            mem.compare_exchange_u128(at, 1, 2),
            Ok(Exchange::Lost {
                actual: 9 << 64 | 0xaaaa_bbbb_cccc_dddd
            })
        );
        assert_eq!(mem.read_u64(at).unwrap(), 0xaaaa_bbbb_cccc_dddd);
        assert_eq!(mem.read_u64(Maddr::new(0x1018)).unwrap(), 9);
        assert_eq!(
            mem.compare_exchange_u64(at, 0xaaaa_bbbb_cccc_dddd, 3),
            Ok(Exchange::Swapped)
        );
        assert_eq!(mem.read_u64(at).unwrap(), 3);
    }

    fn ma(raw: u64) -> Maddr {
        Maddr::new(raw)
    }

    #[test]
    fn words_read_zero_until_written_and_halves_compose() {
        let mut mem = SparseMemory::new(16);
        assert_eq!(mem.read_u64(ma(0x1008)), Ok(0));
        mem.write_u32(ma(0x100c), 0xdead_beef).unwrap();
        mem.write_u32(ma(0x1008), 0x1234_5678).unwrap();
        assert_eq!(mem.read_u64(ma(0x1008)), Ok(0xdead_beef_1234_5678));
        assert_eq!(mem.read_u32(ma(0x100c)), Ok(0xdead_beef));
        assert_eq!(mem.populated_frames(), 1);
    }

    #[test]
    fn zero_writes_to_untouched_frames_cost_nothing() {
        let mut mem = SparseMemory::new(16);
        mem.write_u64(ma(0x3000), 0).unwrap();
        mem.write_u32(ma(0x3004), 0).unwrap();
        assert_eq!(mem.populated_frames(), 0);
    }

    #[test]
    fn misaligned_and_out_of_range_accesses_fail() {
        let mut mem = SparseMemory::new(4);
        assert_eq!(
            mem.read_u64(ma(0x1004)),
            Err(MemError::Misaligned { addr: 0x1004 })
        );
        assert_eq!(
            mem.write_u32(ma(0x1002), 1),
            Err(MemError::Misaligned { addr: 0x1002 })
        );
        assert_eq!(
            mem.read_u32(ma(0x4000)),
            Err(MemError::Unbacked { addr: 0x4000 })
        );
        assert_eq!(
            mem.write_u64(ma(0x4000), 1),
            Err(MemError::Unbacked { addr: 0x4000 })
        );
    }

    #[test]
    fn bytes_cross_frames_and_partial_ranges_write_nothing() {
        let mut mem = SparseMemory::new(2);
        let data: Vec<u8> = (1..=20).collect();
        mem.write_bytes(ma(0xff6), &data).unwrap();
        let mut back = [0u8; 20];
        mem.read_bytes(ma(0xff6), &mut back).unwrap();
        assert_eq!(&back[..], &data[..]);
        assert_eq!(mem.read_u64(ma(0x1000)).unwrap() & 0xff, 11);
        assert_eq!(
            mem.write_bytes(ma(0x1ffc), &[9; 8]),
            Err(MemError::Unbacked { addr: 0x2000 })
        );
        assert_eq!(mem.read_u32(ma(0x1ffc)), Ok(0));
    }

    #[test]
    fn frame_wise_bytes_agree_with_the_word_wise_copies() {
        // Every start offset near a frame end and lengths crossing one or two frames, on
        // memory with populated and unpopulated frames, and ranges running off the end.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut fast = SparseMemory::new(3);
        let mut slow = SparseMemory::new(3);
        for word in 0..512u64 {
            let value = next();
            fast.write_u64(ma(0x1000 + 8 * word), value).unwrap();
            slow.write_u64(ma(0x1000 + 8 * word), value).unwrap();
        }
        for start in (0xfe0..0x1030).chain(0x1fe0..0x2030).chain(0x2ff0..0x3010) {
            for len in [0usize, 1, 3, 8, 9, 17, 40, 4096, 4100, 8200] {
                let data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                assert_eq!(
                    fast.write_bytes(ma(start), &data),
                    copy_to_phys(&mut slow, ma(start), &data),
                    "write {len} at {start:#x}"
                );
                let (mut a, mut b) = (vec![0u8; len], vec![0u8; len]);
                let read = fast.read_bytes(ma(start), &mut a);
                assert_eq!(
                    read,
                    copy_from_phys(&slow, ma(start), &mut b),
                    "read {len} at {start:#x}"
                );
                if read.is_err() {
                    // What lands in the buffer of a failed read is unspecified.
                    continue;
                }
                let first_diff = a.iter().zip(&b).position(|(x, y)| x != y);
                assert_eq!(first_diff, None, "bytes {len} at {start:#x}");
            }
        }
        let mut all = [vec![0u8; 3 * 4096], vec![0u8; 3 * 4096]];
        fast.read_bytes(ma(0), &mut all[0]).unwrap();
        copy_from_phys(&slow, ma(0), &mut all[1]).unwrap();
        assert!(all[0] == all[1]);
    }

    #[test]
    fn every_change_of_contents_is_counted() {
        let mut mem = SparseMemory::new(8);
        let mut last = mem.changes();
        let mut changed = |mem: &SparseMemory| {
            let now = mem.changes();
            let grew = now != last;
            last = now;
            grew
        };
        mem.write_u64(ma(0x1000), 0).unwrap();
        assert!(
            !changed(&mem),
            "a zero on an untouched frame changes nothing"
        );
        mem.write_u32(ma(0x1004), 7).unwrap();
        assert!(changed(&mem));
        mem.write_u32(ma(0x1004), 7).unwrap();
        assert!(!changed(&mem), "the same value again changes nothing");
        mem.write_u64(ma(0x1000), 1).unwrap();
        assert!(changed(&mem));
        mem.write_bytes(ma(0x1ffe), &[1, 2, 3, 4]).unwrap();
        assert!(changed(&mem));
        mem.write_bytes(ma(0x1ffe), &[1, 2, 3, 4]).unwrap();
        assert!(!changed(&mem));
        assert_eq!(
            mem.compare_exchange_u64(ma(0x1000), 1, 2),
            Ok(Exchange::Swapped)
        );
        assert!(changed(&mem));
        mem.zero_frame(Mfn::new(1)).unwrap();
        assert!(changed(&mem));
        mem.write_u64(ma(0x3000), 5).unwrap();
        assert!(changed(&mem));
        // Handing the frame out again zero-fills it.
        mem.reserve(Mfn::new(0), 3).unwrap();
        let block = mem.alloc_block(0).unwrap();
        assert_eq!(block, Mfn::new(3));
        assert!(changed(&mem));
        assert_eq!(mem.read_u64(ma(0x3000)), Ok(0));
    }

    #[test]
    fn only_changes_to_watched_frames_are_counted_as_watched() {
        let mut mem = SparseMemory::new(8);
        mem.watch(Mfn::new(2));
        mem.watch(Mfn::new(3));
        let mut last = mem.watched_changes();
        let mut changed = |mem: &SparseMemory| {
            let now = mem.watched_changes();
            let grew = now != last;
            last = now;
            grew
        };
        mem.write_u64(ma(0x1000), 5).unwrap();
        mem.write_bytes(ma(0x4000), &[1; 64]).unwrap();
        assert!(!changed(&mem), "frames 1 and 4 are not watched");
        mem.write_u64(ma(0x2000), 0).unwrap();
        assert!(
            !changed(&mem),
            "a zero on an untouched frame changes nothing"
        );
        mem.write_u64(ma(0x2008), 1).unwrap();
        assert!(changed(&mem), "populating a watched frame");
        mem.write_u32(ma(0x200c), 9).unwrap();
        assert!(changed(&mem));
        mem.write_bytes(ma(0x2ffe), &[7, 7, 7, 7]).unwrap();
        assert!(changed(&mem), "a range ending in a watched frame");
        mem.zero_frame(Mfn::new(2)).unwrap();
        assert!(changed(&mem));
        mem.reserve(Mfn::new(0), 3).unwrap();
        assert_eq!(mem.alloc_block(0), Some(Mfn::new(3)));
        assert!(changed(&mem), "handing out a watched frame zero-fills it");
    }

    #[test]
    fn allocator_splits_and_merges_buddies() {
        let mut a = FrameAllocator::new(64);
        let x = a.alloc(0).unwrap();
        let y = a.alloc(0).unwrap();
        assert_eq!((x, y), (0, 1));
        let z = a.alloc(0).unwrap();
        assert!(a.free(x, 0));
        assert!(a.free(y, 0));
        assert!(a.free[1].contains(&0));
        assert_eq!(a.alloc(1), Some(0));
        let big = a.alloc(3).unwrap();
        assert_eq!((z, big), (2, 8));
        // The gap 3..8 became blocks 3 (order 0) and 4 (order 2).
        assert!(a.free[0].contains(&3) && a.free[2].contains(&4));
    }

    #[test]
    fn a_free_run_below_the_bump_pointer_joins_the_frames_above() {
        let mut a = FrameAllocator::new(8);
        let blocks: Vec<u64> = (0..3).map(|_| a.alloc(0).unwrap()).collect();
        assert!(a.free(blocks[2], 0));
        assert!(a.free(blocks[1], 0));
        assert_eq!(a.next, 1);
        // Frame 0 is still out and 1..8 is free again: an order-2 block (4..8) and an
        // order-1 block (2..4) must both come out of it.
        assert_eq!(a.alloc(1), Some(2));
        assert_eq!(a.alloc(2), Some(4));
        assert_eq!(a.alloc(0), Some(1));
    }

    #[test]
    fn bump_skips_reserved_ranges_and_keeps_the_gap() {
        let mut a = FrameAllocator::new(64);
        a.reserve(1, 3).unwrap();
        assert_eq!(a.reserved_frames, 2);
        assert_eq!(a.alloc(1), Some(4));
        assert_eq!(a.alloc(0), Some(0));
        assert_eq!(a.alloc(0), Some(3));
        assert_eq!(a.alloc(0), Some(6));
    }

    #[test]
    fn reserve_carves_free_blocks_and_refuses_allocated_ones() {
        let mut a = FrameAllocator::new(64);
        let block = a.alloc(4).unwrap();
        assert_eq!(
            a.reserve(3, 4),
            Err(ReserveError::InUse { mfn: Mfn::new(0) })
        );
        assert!(a.free(block, 4));
        a.reserve(3, 5).unwrap();
        a.reserve(4, 6).unwrap();
        assert_eq!(a.reserved_frames, 3);
        let mut got = Vec::new();
        while let Some(f) = a.alloc(0) {
            got.push(f);
        }
        assert_eq!(got.len(), 61);
        assert!(!got.contains(&3) && !got.contains(&4) && !got.contains(&5));
    }
}

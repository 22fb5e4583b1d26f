//! Changes to guest memory and to the p2m: every write to a shadowed guest page table is
//! reflected into all its shadows (L1 shadows before L2s before L3s, so no walk sees a new
//! upper entry above an old lower one); a changed p2m entry removes every shadow mapping of
//! the old frame.

use alloc::vec::Vec;

use super::{Domain, DomainConfig, EngineError};
use crate::addr::{Gfn, Gpa, Maddr, Mfn, PAGE_SIZE};
use crate::emulate::AtomicUpdate;
use crate::flush::Flush;
use crate::host::MachineMemory;
use crate::multi::Pair;
use crate::p2m::{P2mEntry, P2mType};
use crate::paging::{Exchange, MemError, PhysMem};

impl<H: MachineMemory> Domain<H> {
    /// Marks a guest frame dirty (log-dirty mode).
    pub(crate) fn mark_dirty(&mut self, gfn: Gfn) {
        if let Some(log) = self.log_dirty.as_mut()
            && log.dirty.set(gfn)
        {
            self.stats.dirty_marked += 1;
        }
    }

    /// Bookkeeping after guest memory at `gpa..gpa+len` (inside one page) changed: the page
    /// is dirty, and every shadow of it is brought up to date.
    pub(crate) fn after_guest_write(&mut self, gpa: Gpa, len: u64) -> Result<(), EngineError> {
        let gfn = gpa.gfn();
        self.mark_dirty(gfn);
        if let Some((mfn, P2mType::Ram)) = self.guest_frame(gfn) {
            self.validate_frame(mfn, gpa.offset(), len)?;
        }
        Ok(())
    }

    /// Reflects bytes `offset..offset+len` of guest frame `mfn` into each of its shadows.
    pub(crate) fn validate_frame(
        &mut self,
        mfn: Mfn,
        offset: u64,
        len: u64,
    ) -> Result<(), EngineError> {
        let mut shadows: Vec<_> = self.store.of_frame(mfn).collect();
        if shadows.is_empty() {
            return Ok(());
        }
        shadows.sort_by_key(|(key, _)| key.kind.level());
        for (key, head) in shadows {
            // A validate earlier in this loop may have torn this shadow down.
            if self.store.lookup(&key) != Some(head) {
                continue;
            }
            let guest = key
                .kind
                .guest_levels()
                .ok_or(EngineError::Internal("hashed shadow without a guest mode"))?;
            let pair = Pair::new(guest, self.config.shadow_levels)
                .ok_or(EngineError::Internal("a shadow of an unsupported pair"))?;
            pair.validate(self, head, key, offset, len)?;
        }
        if self.any_out_of_sync() {
            self.refresh_snapshot(mfn, offset, len)?;
        }
        Ok(())
    }

    /// Writes `data` to guest-physical memory at `gpa` on the guest's behalf (an emulated
    /// instruction, a hypercall) and reflects it into the shadows. May cross pages.
    pub fn write_guest_phys(&mut self, gpa: Gpa, data: &[u8]) -> Result<Flush, EngineError> {
        self.run(|d| {
            d.stats.emulated_writes += 1;
            d.write_guest_phys_now(gpa, data)
        })
        .map(|((), f)| f)
    }

    /// The body of [`Domain::write_guest_phys`], inside an operation already running.
    pub(crate) fn write_guest_phys_now(
        &mut self,
        gpa: Gpa,
        data: &[u8],
    ) -> Result<(), EngineError> {
        let mut pieces = Vec::new();
        let mut done = 0usize;
        while done < data.len() {
            let addr = Gpa::new(gpa.raw().wrapping_add(done as u64));
            let room = (PAGE_SIZE - addr.offset()) as usize;
            let chunk = room.min(data.len() - done);
            let bytes = data
                .get(done..done + chunk)
                .ok_or(EngineError::Internal("write chunk out of range"))?;
            pieces.push((addr, bytes));
            done += chunk;
        }
        self.write_guest_pieces(&pieces)
    }

    /// Writes each `(address, bytes)` piece (each inside one page) to guest-physical memory
    /// on the guest's behalf, all or nothing: every page is checked before any byte is
    /// written, and every shadow of each page is brought up to date after all are written.
    pub(crate) fn write_guest_pieces(
        &mut self,
        pieces: &[(Gpa, &[u8])],
    ) -> Result<(), EngineError> {
        let mut targets = Vec::with_capacity(pieces.len());
        for &(gpa, bytes) in pieces {
            if gpa.offset() + bytes.len() as u64 > PAGE_SIZE {
                return Err(EngineError::Internal("a write piece crosses a page"));
            }
            targets.push(self.writable_ram(gpa.gfn())?);
        }
        for (&(gpa, bytes), mfn) in pieces.iter().zip(&targets) {
            write_bytes(
                &mut self.host,
                Maddr::new(mfn.base().raw() | gpa.offset()),
                bytes,
            )?;
        }
        for &(gpa, bytes) in pieces {
            self.after_guest_write(gpa, bytes.len() as u64)?;
        }
        Ok(())
    }

    /// Writes `new` at `gpa` if the bytes there are `current`, atomically against vcpus
    /// running meanwhile, and reflects it into the shadows: the write of an emulated locked
    /// instruction. The bytes lie in one naturally aligned 8-byte word, or are 16 aligned
    /// ones (the host may not do those: [`AtomicUpdate::Unsupported`]).
    pub(crate) fn compare_exchange_guest_phys(
        &mut self,
        gpa: Gpa,
        current: &[u8],
        new: &[u8],
    ) -> Result<AtomicUpdate, EngineError> {
        let mfn = self.writable_ram(gpa.gfn())?;
        let addr = Maddr::new(mfn.base().raw() | gpa.offset());
        let update = if new.len() == 16 {
            match self
                .host
                .compare_exchange_u128(addr, le_u128(current), le_u128(new))
            {
                Ok(Exchange::Swapped) => AtomicUpdate::Written,
                Ok(Exchange::Lost { .. }) => AtomicUpdate::Lost,
                Err(MemError::NotAtomic { .. }) => AtomicUpdate::Unsupported,
                Err(e) => return Err(e.into()),
            }
        } else {
            exchange_in_word(&mut self.host, addr, current, new)?
        };
        if update == AtomicUpdate::Written {
            self.after_guest_write(gpa, new.len() as u64)?;
        }
        Ok(update)
    }

    /// The machine frame behind guest frame `gfn` for a write on the guest's behalf: RAM,
    /// and not a frame the guest may never reach.
    pub(crate) fn writable_ram(&self, gfn: Gfn) -> Result<Mfn, EngineError> {
        let Some((mfn, P2mType::Ram)) = self.guest_frame(gfn) else {
            return Err(EngineError::BadArgument("write to non-RAM guest memory"));
        };
        if self.forbidden(mfn) {
            return Err(EngineError::Internal(
                "guest memory maps a hypervisor frame",
            ));
        }
        Ok(mfn)
    }

    /// Reads guest-physical memory (for an emulator, or a host inspecting the guest).
    pub fn read_guest_phys(&self, gpa: Gpa, out: &mut [u8]) -> Result<(), EngineError> {
        let mut done = 0usize;
        while done < out.len() {
            let addr = Gpa::new(gpa.raw().wrapping_add(done as u64));
            let room = (PAGE_SIZE - addr.offset()) as usize;
            let chunk = room.min(out.len() - done);
            let Some((mfn, P2mType::Ram)) = self.guest_frame(addr.gfn()) else {
                return Err(EngineError::BadArgument("read of non-RAM guest memory"));
            };
            let dst = out
                .get_mut(done..done + chunk)
                .ok_or(EngineError::Internal("read chunk out of range"))?;
            read_bytes(
                &self.host,
                Maddr::new(mfn.base().raw() | addr.offset()),
                dst,
            )?;
            done += chunk;
        }
        Ok(())
    }

    /// After the host wrote guest page-table memory itself (under the shadow lock), brings
    /// the shadows of `gpa..gpa+len` up to date (Xen's `shadow_validate_guest_pt_write`).
    /// At most [`DomainConfig::MAX_VALIDATE_BYTES`] at a time, inside the guest-physical
    /// address space: anything else is `BadArgument`, before anything changes.
    pub fn validate_guest_pt_write(&mut self, gpa: Gpa, len: u64) -> Result<Flush, EngineError> {
        let end = gpa.raw().checked_add(len);
        if len > DomainConfig::MAX_VALIDATE_BYTES || end.is_none_or(|e| e > 1 << 52) {
            return Err(EngineError::BadArgument(
                "a validated range must lie inside guest-physical space, 64 KiB at most",
            ));
        }
        self.run(|d| {
            let mut done = 0u64;
            while done < len {
                let addr = Gpa::new(gpa.raw().wrapping_add(done));
                let chunk = (PAGE_SIZE - addr.offset()).min(len - done);
                d.after_guest_write(addr, chunk)?;
                done += chunk;
            }
            Ok(())
        })
        .map(|((), f)| f)
    }

    /// One guest entry changed (Xen's `shadow_validate_guest_entry`).
    pub fn validate_guest_entry(&mut self, gpa: Gpa) -> Result<Flush, EngineError> {
        self.validate_guest_pt_write(Gpa::new(gpa.raw() & !7), 8)
    }

    /// Whether a machine frame belongs to the hypervisor side (pool, p2m tables,
    /// hypervisor frames) and so may never be given to the guest.
    pub(crate) fn forbidden(&self, mfn: Mfn) -> bool {
        self.pool.contains(mfn)
            || self.hypervisor_frames.contains(&mfn)
            || self.p2m.as_ref().is_some_and(|p| p.owns_table_frame(mfn))
    }

    /// Declares frames of the hypervisor (a monitor area, trap stubs...): no guest mapping
    /// may point at them.
    pub fn add_hypervisor_frame(&mut self, mfn: Mfn) -> Result<(), EngineError> {
        if self.pool.contains(mfn) || self.m2p.contains_key(&mfn) || self.owned.contains(&mfn) {
            return Err(EngineError::ForbiddenFrame(mfn));
        }
        self.hypervisor_frames.insert(mfn);
        Ok(())
    }

    /// Whether machine frame `mfn` may be given to the guest as memory of type `ty`: below
    /// the host's MAXPHYADDR (the hardware faults on anything beyond), and RAM neither a
    /// hypervisor-side frame nor where MMIO markers point (see [`super::marker`]).
    fn check_guest_frame(&self, mfn: Mfn, ty: P2mType) -> Result<(), EngineError> {
        let width = u32::from(self.config.host_maxphyaddr).saturating_sub(12);
        if mfn.raw() >> width != 0 {
            return Err(EngineError::BadArgument(
                "machine frame beyond the host's MAXPHYADDR",
            ));
        }
        if ty != P2mType::Ram {
            return Ok(());
        }
        if self.forbidden(mfn) {
            return Err(EngineError::ForbiddenFrame(mfn));
        }
        if self
            .mmio_layout()
            .is_some_and(|l| mfn.raw() >= l.first_marked_frame())
        {
            return Err(EngineError::BadArgument(
                "RAM in the upper half of MAXPHYADDR, where MMIO markers point",
            ));
        }
        Ok(())
    }

    /// Changes the p2m entry of `gfn` (translated domains): maps it to a machine frame of
    /// RAM or MMIO, or unmaps it. Every argument is checked, and the p2m tables the entry
    /// needs are made, before anything changes; then every shadow mapping and every shadow
    /// of the old frame is removed (in bounded steps: [`EngineError::Preempted`] leaves the
    /// p2m as it was), and the entry is written. Vcpus whose top-level table was the old
    /// frame get a new root (an empty one, whose walks all fault, when the gfn is no longer
    /// RAM).
    pub fn set_p2m(
        &mut self,
        gfn: Gfn,
        mapping: Option<(Mfn, P2mType)>,
    ) -> Result<Flush, EngineError> {
        self.run(|d| {
            let p2m = d.p2m.as_ref().ok_or(EngineError::BadArgument(
                "a non-translated domain has no p2m",
            ))?;
            if gfn >= p2m.max_gfn() {
                return Err(EngineError::BadArgument("gfn beyond the p2m"));
            }
            if let Some((mfn, ty)) = mapping {
                if mfn >= p2m.max_mfn() {
                    return Err(EngineError::BadArgument(
                        "machine frame the p2m's format cannot hold",
                    ));
                }
                d.check_guest_frame(mfn, ty)?;
            }
            let old = p2m.lookup(&d.host, gfn);
            if let Some(p2m) = d.p2m.as_mut() {
                p2m.ensure_path(&mut d.host, gfn)?;
            }
            if let Some(P2mEntry {
                mfn,
                ty: P2mType::Ram,
                ..
            }) = old
            {
                d.resync_page(mfn, super::oos::ResyncReason::P2m)?;
                d.prealloc_root_rebuilds(mfn)?;
                d.remove_all_mappings(mfn)?;
                d.unshadow(mfn)?;
            }
            let entry = mapping.map(|(mfn, ty)| P2mEntry::new(mfn, ty).with_writable(false));
            if let Some(p2m) = d.p2m.as_mut() {
                p2m.set_entry(&mut d.host, gfn, entry)?;
            }
            d.forget_superpage_backing(gfn);
            d.p2m_writable.remove(&gfn);
            if let Some(P2mEntry {
                mfn,
                ty: P2mType::Ram,
                ..
            }) = old
            {
                d.end_mapping_removal(mfn);
                if let Some(set) = d.m2p.get_mut(&mfn) {
                    set.remove(&gfn);
                    if set.is_empty() {
                        d.m2p.remove(&mfn);
                    }
                }
            }
            if let Some((mfn, P2mType::Ram)) = mapping {
                d.m2p.entry(mfn).or_default().insert(gfn);
            }
            d.pending_flush = d.all_vcpus();
            d.rebuild_roots()
        })
        .map(|((), f)| f)
    }

    /// Gives a machine frame to a non-translated domain.
    pub fn add_frame(&mut self, mfn: Mfn) -> Result<(), EngineError> {
        if self.p2m.is_some() {
            return Err(EngineError::BadArgument(
                "a translated domain takes frames through its p2m",
            ));
        }
        self.check_guest_frame(mfn, P2mType::Ram)?;
        self.forget_superpage_backing(Gfn::new(mfn.raw()));
        self.owned.insert(mfn);
        Ok(())
    }

    /// Takes a machine frame away from a non-translated domain: every mapping and every
    /// shadow of it goes first (in bounded steps, see [`Domain::set_p2m`]). Vcpus whose
    /// top-level table it was get an empty root until it is given back.
    pub fn remove_frame(&mut self, mfn: Mfn) -> Result<Flush, EngineError> {
        self.run(|d| {
            if d.p2m.is_some() {
                return Err(EngineError::BadArgument(
                    "a translated domain gives frames back through its p2m",
                ));
            }
            if !d.owned.contains(&mfn) {
                return Err(EngineError::BadArgument(
                    "the domain does not own the frame",
                ));
            }
            d.resync_page(mfn, super::oos::ResyncReason::P2m)?;
            d.prealloc_root_rebuilds(mfn)?;
            d.remove_all_mappings(mfn)?;
            d.unshadow(mfn)?;
            d.forget_superpage_backing(Gfn::new(mfn.raw()));
            d.owned.remove(&mfn);
            d.end_mapping_removal(mfn);
            d.pending_flush = d.all_vcpus();
            d.rebuild_roots()
        })
        .map(|((), f)| f)
    }

    /// Whether a fast-path MMIO entry naming `gfn` is stale: the gfn became RAM since it
    /// was written. `set_p2m` does not look for such entries (that would scan every L1
    /// shadow); the fast path checks the p2m instead (a few reads), and a stale entry is a
    /// miss that the slow path refills.
    pub(crate) fn mmio_magic_stale(&self, gfn: Gfn) -> bool {
        matches!(self.guest_frame(gfn), Some((_, P2mType::Ram)))
    }
}

/// Writes bytes to machine memory with aligned 8-byte read-modify-writes.
pub(crate) fn write_bytes<M: PhysMem<Maddr> + ?Sized>(
    mem: &mut M,
    addr: Maddr,
    data: &[u8],
) -> Result<(), EngineError> {
    // Whole aligned words are one store each (another vcpu never sees half of one); the
    // bytes of a partly covered word are merged into it by compare-exchange, so that a
    // concurrent write of the word's other bytes is kept.
    let mut at = addr.raw();
    let mut rest = data;
    while !rest.is_empty() {
        let offset = at % 8;
        let take = (8 - offset as usize).min(rest.len());
        let (chunk, tail) = rest.split_at(take);
        let word = Maddr::new(at - offset);
        if take == 8 {
            let mut w = [0u8; 8];
            w.copy_from_slice(chunk);
            mem.write_u64(word, u64::from_le_bytes(w))?;
        } else {
            merge_into_word(mem, word, offset, chunk)?;
        }
        at += take as u64;
        rest = tail;
    }
    Ok(())
}

/// Compare-exchanges one word may lose to concurrent writers before a partial-word store
/// gives up (each loss means another agent stored to the same word in the meantime).
const MAX_MERGE_RACES: usize = 1024;

/// Stores `bytes` at byte `offset` of the aligned word at `word`, keeping its other bytes as
/// they are at the moment of the store.
fn merge_into_word<M: PhysMem<Maddr> + ?Sized>(
    mem: &mut M,
    word: Maddr,
    offset: u64,
    bytes: &[u8],
) -> Result<(), EngineError> {
    let shift = offset * 8;
    let mask = (u64::MAX >> (64 - 8 * bytes.len() as u64)) << shift;
    let mut value = [0u8; 8];
    value[..bytes.len()].copy_from_slice(bytes);
    let value = u64::from_le_bytes(value) << shift;
    let mut old = mem.read_u64(word)?;
    for _ in 0..MAX_MERGE_RACES {
        let new = (old & !mask) | value;
        match mem.compare_exchange_u64(word, old, new)? {
            Exchange::Swapped => return Ok(()),
            Exchange::Lost { actual } => old = actual,
        }
    }
    Err(EngineError::Internal(
        "a partial-word store lost every race to other writers",
    ))
}

/// How many compare-exchanges one update of bytes inside a word tries while only the other
/// bytes of the word change under it.
const MAX_WORD_EXCHANGES: usize = 8;

/// Writes `new` at `addr` if the bytes there are `current` (all inside one naturally aligned
/// 8-byte word), with compare-exchanges of the whole word: a change of the word's other
/// bytes by another agent is no conflict, and is kept.
fn exchange_in_word<M: PhysMem<Maddr> + ?Sized>(
    mem: &mut M,
    addr: Maddr,
    current: &[u8],
    new: &[u8],
) -> Result<AtomicUpdate, EngineError> {
    let offset = addr.raw() % 8;
    let len = new.len() as u64;
    if current.len() != new.len() || len == 0 || offset + len > 8 {
        return Err(EngineError::Internal("a compare-exchange across words"));
    }
    let word_addr = Maddr::new(addr.raw() - offset);
    let shift = offset * 8;
    let mask = u64::MAX >> (64 - 8 * len);
    let (current, new) = (le_u128(current) as u64, le_u128(new) as u64);
    let mut word = mem.read_u64(word_addr)?;
    for _ in 0..MAX_WORD_EXCHANGES {
        if (word >> shift) & mask != current {
            return Ok(AtomicUpdate::Lost);
        }
        let replaced = (word & !(mask << shift)) | (new << shift);
        match mem.compare_exchange_u64(word_addr, word, replaced)? {
            Exchange::Swapped => return Ok(AtomicUpdate::Written),
            Exchange::Lost { actual } => word = actual,
        }
    }
    // The emulator reads again and retries, a bounded number of times.
    Ok(AtomicUpdate::Lost)
}

/// The little-endian value of at most 16 bytes.
fn le_u128(bytes: &[u8]) -> u128 {
    bytes
        .iter()
        .take(16)
        .enumerate()
        .fold(0, |v, (i, &b)| v | (u128::from(b) << (8 * i)))
}

/// Reads bytes from machine memory.
pub(crate) fn read_bytes<M: PhysMem<Maddr> + ?Sized>(
    mem: &M,
    addr: Maddr,
    out: &mut [u8],
) -> Result<(), EngineError> {
    for (i, byte) in out.iter_mut().enumerate() {
        let a = addr.raw() + i as u64;
        let word = mem.read_u64(Maddr::new(a & !7))?;
        *byte = (word >> ((a & 7) * 8)) as u8;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use core::cell::{Cell, RefCell};

    use alloc::collections::BTreeMap;

    use super::write_bytes;
    use crate::addr::Maddr;
    use crate::paging::{Exchange, MemError, PhysMem};

    /// Memory with another agent that stores byte 0xAA at byte 7 of the word at 0, once,
    /// right after the engine's first read of that word.
    #[derive(Default)]
    struct RacingNeighbour {
        words: RefCell<BTreeMap<u64, u64>>,
        raced: Cell<bool>,
        whole_word_writes: usize,
    }

    impl PhysMem<Maddr> for RacingNeighbour {
        fn read_u32(&self, addr: Maddr) -> Result<u32, MemError> {
            let w = self.read_u64(Maddr::new(addr.raw() & !7))?;
            Ok((w >> ((addr.raw() & 4) * 8)) as u32)
        }
        fn read_u64(&self, addr: Maddr) -> Result<u64, MemError> {
            let mut words = self.words.borrow_mut();
            let value = words.get(&addr.raw()).copied().unwrap_or(0);
            if addr.raw() == 0 && !self.raced.replace(true) {
                words.insert(0, (value & !(0xff << 56)) | (0xaa << 56));
            }
            Ok(value)
        }
        fn write_u32(&mut self, _: Maddr, _: u32) -> Result<(), MemError> {
            Err(MemError::NotAtomic { addr: 0 })
        }
        fn write_u64(&mut self, addr: Maddr, value: u64) -> Result<(), MemError> {
            self.whole_word_writes += 1;
            self.words.borrow_mut().insert(addr.raw(), value);
            Ok(())
        }
        fn compare_exchange_u32(
            &mut self,
            _: Maddr,
            _: u32,
            _: u32,
        ) -> Result<Exchange<u32>, MemError> {
            Err(MemError::NotAtomic { addr: 0 })
        }
        fn compare_exchange_u64(
            &mut self,
            addr: Maddr,
            current: u64,
            new: u64,
        ) -> Result<Exchange<u64>, MemError> {
            let mut words = self.words.borrow_mut();
            let actual = words.get(&addr.raw()).copied().unwrap_or(0);
            if actual != current {
                return Ok(Exchange::Lost { actual });
            }
            words.insert(addr.raw(), new);
            Ok(Exchange::Swapped)
        }
    }

    #[test]
    fn a_partial_word_store_keeps_a_concurrent_store_to_the_other_bytes() {
        let mut mem = RacingNeighbour::default();
        write_bytes(&mut mem, Maddr::new(1), &[1, 2, 3]).unwrap();
        let word = mem.words.borrow().get(&0).copied().unwrap_or(0);
        assert_eq!(word, 0xaa00_0000_0302_0100, "{word:#x}");
    }

    #[test]
    fn whole_words_are_stored_whole() {
        let mut mem = RacingNeighbour::default();
        mem.raced.set(true);
        let data: alloc::vec::Vec<u8> = (1..=16).collect();
        write_bytes(&mut mem, Maddr::new(8), &data).unwrap();
        assert_eq!(mem.whole_word_writes, 2, "one store per aligned word");
        assert_eq!(mem.words.borrow().get(&8), Some(&0x0807_0605_0403_0201));
    }
}

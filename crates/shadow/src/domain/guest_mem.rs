//! Guest-physical memory as the engine reads and writes it: through the p2m (translated
//! guests) or directly in the domain's own machine frames (non-translated guests). Writes
//! are logged so that the engine can validate them into shadows and mark them dirty.

use alloc::collections::BTreeSet;
use core::cell::Cell;

use super::Domain;
use crate::addr::{Gfn, Gpa, Maddr, Mfn, PAGE_SHIFT};
use crate::host::MachineMemory;
use crate::p2m::{P2m, P2mType};
use crate::paging::{Exchange, MemError, PhysMem};

/// How guest frames become machine frames.
#[derive(Clone, Copy, Debug)]
pub(crate) enum FrameMap<'a> {
    /// Through the p2m.
    Translated(&'a P2m),
    /// Guest frames are machine frames the domain owns.
    Direct(&'a BTreeSet<Mfn>),
}

impl FrameMap<'_> {
    /// The machine frame and type behind guest frame `gfn`.
    pub(crate) fn lookup<M: PhysMem<Maddr> + ?Sized>(
        &self,
        mem: &M,
        gfn: Gfn,
    ) -> Option<(Mfn, P2mType)> {
        match self {
            FrameMap::Translated(p2m) => p2m.lookup(mem, gfn).map(|e| (e.mfn, e.ty)),
            FrameMap::Direct(owned) => {
                let mfn = Mfn::new(gfn.raw());
                owned.contains(&mfn).then_some((mfn, P2mType::Ram))
            }
        }
    }
}

/// Guest frames a [`FrameCache`] remembers: a walk's tables (at most 4) and its target,
/// with room to spare for a fetch probe's second walk.
const CACHE_LEN: usize = 8;

/// A guest frame and what it is backed by (None: nothing, as far as the map says).
type CachedFrame = (Gfn, Option<(Mfn, P2mType)>);

/// The guest frames one engine operation has looked up, with their answers (absent
/// included), so that a fault pays one p2m lookup per frame instead of one per use: the
/// walk, the descent through the shadows and the leaf all ask about the same few frames.
///
/// Only valid for the operation that made it: the p2m changes between operations, never
/// during one (an operation may flip a p2m entry's writability, which is not cached here),
/// so a cache must never be kept across calls into the engine.
#[derive(Debug)]
pub(crate) struct FrameCache {
    slots: [Cell<Option<CachedFrame>>; CACHE_LEN],
    next: Cell<usize>,
}

impl FrameCache {
    pub(crate) fn new() -> Self {
        FrameCache {
            slots: Default::default(),
            next: Cell::new(0),
        }
    }

    /// The machine frame and type behind `gfn` in `map`.
    pub(crate) fn lookup<M: PhysMem<Maddr> + ?Sized>(
        &self,
        map: &FrameMap<'_>,
        mem: &M,
        gfn: Gfn,
    ) -> Option<(Mfn, P2mType)> {
        for slot in &self.slots {
            match slot.get() {
                Some((g, answer)) if g == gfn => return answer,
                Some(_) => {}
                // Slots fill in order: past the first empty one nothing is cached.
                None => break,
            }
        }
        let answer = map.lookup(mem, gfn);
        let next = self.next.get();
        if let Some(slot) = self.slots.get(next) {
            slot.set(Some((gfn, answer)));
        }
        self.next.set((next + 1) % CACHE_LEN);
        answer
    }

    /// The machine frame and type behind `gfn` in domain `d`.
    pub(crate) fn guest_frame<H: MachineMemory>(
        &self,
        d: &Domain<H>,
        gfn: Gfn,
    ) -> Option<(Mfn, P2mType)> {
        self.lookup(&d.frame_map(), &d.host, gfn)
    }
}

/// The most writes one walk or emulated access logs (a walk writes at most 4 entries).
const LOG_LEN: usize = 8;

/// A guest-physical view over machine memory that logs every write.
#[derive(Debug)]
pub(crate) struct GuestMem<'a, H: ?Sized> {
    pub(crate) host: &'a mut H,
    pub(crate) map: FrameMap<'a>,
    frames: &'a FrameCache,
    writes: [(Gpa, u8); LOG_LEN],
    count: usize,
}

impl<'a, H: MachineMemory + ?Sized> GuestMem<'a, H> {
    pub(crate) fn new(host: &'a mut H, map: FrameMap<'a>, frames: &'a FrameCache) -> Self {
        GuestMem {
            host,
            map,
            frames,
            writes: [(Gpa::new(0), 0); LOG_LEN],
            count: 0,
        }
    }

    /// The writes made through this view: (address, width in bytes).
    pub(crate) fn writes(&self) -> impl Iterator<Item = (Gpa, u8)> + '_ {
        self.writes.iter().take(self.count).copied()
    }

    /// Whether more writes happened than the log holds (the caller must then treat every
    /// page it touched as written).
    pub(crate) fn overflowed(&self) -> bool {
        self.count > LOG_LEN
    }

    fn log(&mut self, addr: Gpa, width: u8) {
        if let Some(slot) = self.writes.get_mut(self.count) {
            *slot = (addr, width);
        }
        self.count += 1;
    }

    /// The machine address of RAM at `gpa`.
    fn ram(&self, gpa: Gpa) -> Result<Maddr, MemError> {
        match self.frames.lookup(&self.map, &*self.host, gpa.gfn()) {
            Some((mfn, P2mType::Ram)) => Ok(Maddr::new(mfn.base().raw() | gpa.offset())),
            _ => Err(MemError::Unbacked { addr: gpa.raw() }),
        }
    }
}

impl<H: MachineMemory + ?Sized> PhysMem<Gpa> for GuestMem<'_, H> {
    fn read_u32(&self, addr: Gpa) -> Result<u32, MemError> {
        let m = self.ram(addr)?;
        self.host.read_u32(m)
    }
    fn read_u64(&self, addr: Gpa) -> Result<u64, MemError> {
        let m = self.ram(addr)?;
        self.host.read_u64(m)
    }
    fn write_u32(&mut self, addr: Gpa, value: u32) -> Result<(), MemError> {
        let m = self.ram(addr)?;
        self.host.write_u32(m, value)?;
        self.log(addr, 4);
        Ok(())
    }
    fn write_u64(&mut self, addr: Gpa, value: u64) -> Result<(), MemError> {
        let m = self.ram(addr)?;
        self.host.write_u64(m, value)?;
        self.log(addr, 8);
        Ok(())
    }
    fn compare_exchange_u32(
        &mut self,
        addr: Gpa,
        current: u32,
        new: u32,
    ) -> Result<Exchange<u32>, MemError> {
        let m = self.ram(addr)?;
        let found = self.host.compare_exchange_u32(m, current, new)?;
        if found == Exchange::Swapped {
            self.log(addr, 4);
        }
        Ok(found)
    }
    fn compare_exchange_u64(
        &mut self,
        addr: Gpa,
        current: u64,
        new: u64,
    ) -> Result<Exchange<u64>, MemError> {
        let m = self.ram(addr)?;
        let found = self.host.compare_exchange_u64(m, current, new)?;
        if found == Exchange::Swapped {
            self.log(addr, 8);
        }
        Ok(found)
    }
}

/// The guest frame of a raw page-table entry address field.
pub(crate) fn gfn_of(addr: u64) -> Gfn {
    Gfn::new(addr >> PAGE_SHIFT)
}

//! Out-of-sync shadows (Xen 2008's OOS, KVM's unsync pages): a guest L1 page table the
//! guest keeps writing is given write access and left out of sync with its shadows instead of
//! having every write emulated; it is brought back in sync where the architecture lets the
//! guest rely on its new entries (a CR3 load, INVLPG, a fault through it, a new use of it
//! as a page table) and where the engine itself must see the truth (log-dirty, the p2m,
//! the bound).
//!
//! Isolation: a page's shadows are validated from its snapshot, taken when it went out of
//! sync, and shadow entries are only ever made from guest entries the guest wrote since
//! (a resync validates the entries that differ from the snapshot, with the usual rules), so
//! a shadow never maps what the guest's entry did not map since the vcpu's last flush, nor
//! a frame the rules forbid. The only writable mappings of a shadowed page table are the
//! ones recorded here (`slots`), and a resync takes them back before it compares.

use alloc::boxed::Box;
use alloc::vec::Vec;

use super::{Domain, EngineError};
use crate::addr::{Maddr, Mfn, PAGE_SIZE};
use crate::host::MachineMemory;
use crate::paging::bits;

/// Writable mappings one out-of-sync page may have (Xen keeps a small fixup table per page
/// too): a write through one more mapping is emulated instead.
pub(crate) const MAX_WRITABLE_SLOTS: usize = 4;

/// Words in a page (the snapshot's unit; one 64-bit entry or two 32-bit ones each).
const WORDS: usize = (PAGE_SIZE / 8) as usize;

/// Why a page was brought back in sync (the counters of [`OosStats`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ResyncReason {
    /// A CR3 load or paging-mode change of any vcpu.
    Cr3,
    /// The page is being shadowed anew (at another level, or another flavor).
    Shadowed,
    /// Log-dirty is being enabled or cleaned.
    LogDirty,
    /// Its p2m entry changes or the frame is taken away.
    P2m,
    /// The bound on out-of-sync pages was reached (the oldest goes).
    Evicted,
    /// The host said the guest flushed every TLB without a CR3 load the engine saw.
    HostFlush,
}

/// Counters of out-of-sync shadows (kept apart from [`crate::stats::Stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OosStats {
    /// Pages that went out of sync.
    pub unsyncs: u64,
    /// Further writable mappings given to a page already out of sync.
    pub extra_writable: u64,
    /// Resyncs at a CR3 load or mode change.
    pub resync_cr3: u64,
    /// Entries brought in sync at INVLPG of their address (the page stays out of sync).
    pub sync_invlpg: u64,
    /// Entries brought in sync by a fault through them (the page stays out of sync).
    pub sync_fault: u64,
    /// Resyncs before the page is shadowed anew (another level or flavor).
    pub resync_shadowed: u64,
    /// Resyncs for log-dirty enable or clean.
    pub resync_log_dirty: u64,
    /// Resyncs before a p2m change of the frame.
    pub resync_p2m: u64,
    /// Resyncs to stay within the bound.
    pub resync_evicted: u64,
    /// Resyncs the host asked for (a guest flush it did not report as a CR3 load).
    pub resync_host_flush: u64,
    /// Records dropped because the page is no longer shadowed (nothing to resync).
    pub dropped: u64,
    /// Guest entries found changed by resyncs (each validated into every shadow).
    pub resynced_words: u64,
}

impl OosStats {
    /// Every counter as (name, value).
    pub fn fields(&self) -> [(&'static str, u64); 12] {
        [
            ("oos_unsyncs", self.unsyncs),
            ("oos_extra_writable", self.extra_writable),
            ("oos_resync_cr3", self.resync_cr3),
            ("oos_sync_invlpg", self.sync_invlpg),
            ("oos_sync_fault", self.sync_fault),
            ("oos_resync_shadowed", self.resync_shadowed),
            ("oos_resync_log_dirty", self.resync_log_dirty),
            ("oos_resync_p2m", self.resync_p2m),
            ("oos_resync_evicted", self.resync_evicted),
            ("oos_resync_host_flush", self.resync_host_flush),
            ("oos_dropped", self.dropped),
            ("oos_resynced_words", self.resynced_words),
        ]
    }

    /// Every resync, whatever its reason.
    pub fn resyncs(&self) -> u64 {
        self.resync_cr3
            + self.resync_shadowed
            + self.resync_log_dirty
            + self.resync_p2m
            + self.resync_evicted
            + self.resync_host_flush
    }

    fn count(&mut self, reason: ResyncReason) {
        let c = match reason {
            ResyncReason::Cr3 => &mut self.resync_cr3,
            ResyncReason::Shadowed => &mut self.resync_shadowed,
            ResyncReason::LogDirty => &mut self.resync_log_dirty,
            ResyncReason::P2m => &mut self.resync_p2m,
            ResyncReason::Evicted => &mut self.resync_evicted,
            ResyncReason::HostFlush => &mut self.resync_host_flush,
        };
        *c += 1;
    }
}

/// One page out of sync.
#[derive(Clone, Debug)]
struct OosPage {
    mfn: Mfn,
    /// The guest page as its shadows were last validated from.
    snapshot: Box<[u64; WORDS]>,
    /// Shadow leaf slots given write access to it by [`Domain::unsync_page`].
    slots: Vec<Maddr>,
}

/// The domain's out-of-sync pages, oldest first, and counters.
#[derive(Clone, Debug, Default)]
pub(crate) struct OutOfSync {
    pages: Vec<OosPage>,
    pub(crate) stats: OosStats,
}

impl OutOfSync {
    fn position(&self, mfn: Mfn) -> Option<usize> {
        self.pages.iter().position(|p| p.mfn == mfn)
    }
}

impl<H: MachineMemory> Domain<H> {
    /// Whether guest frame `mfn` is out of sync: recorded, and shadowed only as L1 (a record
    /// whose shadows are all gone is stale and means nothing).
    pub fn is_out_of_sync(&self, mfn: Mfn) -> bool {
        self.oos.position(mfn).is_some() && self.shadowed_only_as_l1(mfn)
    }

    /// How many pages are out of sync now.
    pub fn out_of_sync_pages(&self) -> usize {
        self.oos
            .pages
            .iter()
            .filter(|p| self.shadowed_only_as_l1(p.mfn))
            .count()
    }

    /// The counters of out-of-sync shadows.
    pub fn out_of_sync_stats(&self) -> OosStats {
        self.oos.stats
    }

    /// Whether any record exists (the cheap test hooks make before looking further).
    pub(crate) fn any_out_of_sync(&self) -> bool {
        !self.oos.pages.is_empty()
    }

    /// Records held, stale ones included (the auditor checks the bound on these).
    pub(crate) fn out_of_sync_records(&self) -> usize {
        self.oos.pages.len()
    }

    /// Whether `mfn` has shadows and every one of them is an L1 (not a splinter, which is
    /// keyed by guest frame and never counted here, nor an upper level).
    pub(crate) fn shadowed_only_as_l1(&self, mfn: Mfn) -> bool {
        let kinds = self.store.frame(mfn).kinds;
        kinds.0 != 0 && kinds.iter().all(|k| k.level() == 1 && !k.is_fl1())
    }

    /// Whether the shadow leaf at `slot` was given write access to out-of-sync page `mfn`.
    pub(crate) fn out_of_sync_slot(&self, mfn: Mfn, slot: Maddr) -> bool {
        self.is_out_of_sync(mfn)
            && self
                .oos
                .position(mfn)
                .and_then(|i| self.oos.pages.get(i))
                .is_some_and(|p| p.slots.contains(&slot))
    }

    /// The guest entry of `width` bytes at byte `offset` of out-of-sync page `mfn` as its
    /// shadows were validated from (None: the page is in sync, read guest memory).
    pub(crate) fn synced_entry(&self, mfn: Mfn, offset: u64, width: u64) -> Option<u64> {
        if !self.is_out_of_sync(mfn) {
            return None;
        }
        let page = self.oos.pages.get(self.oos.position(mfn)?)?;
        let word = *page.snapshot.get((offset / 8) as usize)?;
        Some(if width == 4 {
            (word >> ((offset & 4) * 8)) & 0xffff_ffff
        } else {
            word
        })
    }

    /// Whether the write fault on page table `mfn` may be answered by letting the guest
    /// write it natively through the shadow leaf at `slot`: the option is on, the frame is
    /// shadowed only as L1, with shadow refcounts, no search for its mappings under way,
    /// it is guest RAM the guest may write, and it has room for one more writable mapping.
    pub(crate) fn may_unsync(&self, mfn: Mfn, slot: Maddr) -> bool {
        if !self.config.out_of_sync
            || self.config.max_out_of_sync == 0
            || self.config.refcounts == super::RefcountMode::Guest
            || !self.shadowed_only_as_l1(mfn)
            || self.write_scan_pending(mfn)
            || self.mapping_blocked(mfn)
            || self.pool.contains(mfn)
            || self.hypervisor_frames.contains(&mfn)
            || self.p2m.as_ref().is_some_and(|p| p.owns_table_frame(mfn))
        {
            return false;
        }
        match self.oos.position(mfn).and_then(|i| self.oos.pages.get(i)) {
            Some(page) => page.slots.contains(&slot) || page.slots.len() < MAX_WRITABLE_SLOTS,
            None => true,
        }
    }

    /// Takes page table `mfn` out of sync (a snapshot of it, if it is not already) and
    /// makes the present, read-only shadow leaf at `slot` that maps it writable. The caller
    /// checked [`Domain::may_unsync`] and that the guest's walk allows the write. The page
    /// is being written: it is marked dirty for log-dirty mode.
    pub(crate) fn unsync_page(&mut self, mfn: Mfn, slot: Maddr) -> Result<(), EngineError> {
        let entry = self.read_sentry(slot)?;
        if self.sentry_frame(entry) != Some(mfn) || entry & bits::RW != 0 {
            return Err(EngineError::Internal(
                "an out-of-sync mapping is not a read-only leaf of the page",
            ));
        }
        if self.oos.position(mfn).is_none() {
            self.make_room_out_of_sync()?;
            let mut snapshot = Box::new([0u64; WORDS]);
            for (i, word) in snapshot.iter_mut().enumerate() {
                *word = self
                    .host
                    .read_u64(Maddr::new(mfn.base().raw() + 8 * i as u64))?;
            }
            self.oos.pages.push(OosPage {
                mfn,
                snapshot,
                slots: Vec::new(),
            });
            self.oos.stats.unsyncs += 1;
        } else {
            self.oos.stats.extra_writable += 1;
        }
        self.mark_frame_dirty_for_write(mfn);
        let page = self
            .oos
            .position(mfn)
            .and_then(|i| self.oos.pages.get_mut(i))
            .ok_or(EngineError::Internal("out-of-sync record vanished"))?;
        if !page.slots.contains(&slot) {
            page.slots.push(slot);
        }
        self.set_sentry(slot, entry | bits::RW)?;
        if self.read_sentry(slot)? & bits::RW == 0 {
            return Err(EngineError::Internal(
                "an out-of-sync mapping was refused write access",
            ));
        }
        Ok(())
    }

    /// Marks dirty every guest frame of machine frame `mfn` (log-dirty mode).
    fn mark_frame_dirty_for_write(&mut self, mfn: Mfn) {
        let gfns: Vec<crate::addr::Gfn> = match self.m2p.get(&mfn) {
            Some(set) => set.iter().copied().collect(),
            None => alloc::vec![crate::addr::Gfn::new(mfn.raw())],
        };
        for gfn in gfns {
            self.mark_dirty(gfn);
        }
    }

    /// Makes room for one more out-of-sync page: drops stale records, then resyncs the
    /// oldest while the bound is reached.
    fn make_room_out_of_sync(&mut self) -> Result<(), EngineError> {
        self.drop_stale_out_of_sync();
        while self.oos.pages.len() >= self.config.max_out_of_sync.max(1) {
            let Some(oldest) = self.oos.pages.first().map(|p| p.mfn) else {
                break;
            };
            self.resync_page(oldest, ResyncReason::Evicted)?;
        }
        Ok(())
    }

    /// Forgets the records of pages no longer shadowed only as L1. Such a page has no L1
    /// shadow left to resync, or has just been shadowed at another level, which resyncs it
    /// first (`get_or_create`), so a stale record only remains for a page whose shadows
    /// all went: its leftover writable mappings are then legitimate (not a page table).
    fn drop_stale_out_of_sync(&mut self) {
        let before = self.oos.pages.len();
        let pages = core::mem::take(&mut self.oos.pages);
        let kept: Vec<OosPage> = pages
            .into_iter()
            .filter(|p| self.shadowed_only_as_l1(p.mfn))
            .collect();
        self.oos.pages = kept;
        self.oos.stats.dropped += (before - self.oos.pages.len()) as u64;
    }

    /// Brings page `mfn` back in sync if it is out of sync (else does nothing): takes back
    /// the write access given to it, then validates every guest entry that differs from
    /// the snapshot into every shadow of the page. Bounded: one page, its few writable
    /// slots, 512 words times its shadows. The flush it needs is owed by the call.
    pub(crate) fn resync_page(
        &mut self,
        mfn: Mfn,
        reason: ResyncReason,
    ) -> Result<(), EngineError> {
        let Some(i) = self.oos.position(mfn) else {
            return Ok(());
        };
        let page = self.oos.pages.remove(i);
        if !self.shadowed_only_as_l1(mfn) && self.store.is_page_table(mfn) {
            // Shadowed at another level without a resync first: never meant to happen
            // (get_or_create resyncs), and the shadows cannot be trusted.
            return Err(EngineError::Internal(
                "an out-of-sync page was shadowed at another level",
            ));
        }
        if !self.store.is_page_table(mfn) {
            self.oos.stats.dropped += 1;
            return Ok(());
        }
        self.oos.stats.count(reason);
        // First the write access, so the page stays as it is compared (the host carries
        // the flush out before any vcpu runs again).
        for slot in page.slots {
            let leaf = self
                .store
                .containing(slot.mfn())
                .is_some_and(|(_, info)| info.key.kind.is_leaf_table());
            if !leaf {
                continue;
            }
            let e = self.read_sentry(slot)?;
            if self.sentry_frame(e) == Some(mfn) && e & bits::RW != 0 {
                self.set_sentry(slot, e & !bits::RW)?;
            }
        }
        if self.store.frame(mfn).writable != 0 {
            // Only the recorded slots are ever made writable; if one escaped the record,
            // the general search finds it (or leaves the page's writes emulated).
            self.remove_write_access(mfn)?;
        }
        for (w, old) in page.snapshot.iter().enumerate() {
            let offset = 8 * w as u64;
            let now = self.host.read_u64(Maddr::new(mfn.base().raw() + offset))?;
            if now != *old {
                self.oos.stats.resynced_words += 1;
                self.validate_frame(mfn, offset, 8)?;
            }
        }
        Ok(())
    }

    /// Brings the guest word at byte `offset` of out-of-sync page `mfn` (one 64-bit entry
    /// or two 32-bit ones) into its shadows if it changed since the snapshot, leaving the
    /// page out of sync (KVM syncs the faulting entry the same way): what a fault through
    /// the entry, or INVLPG of its address, needs. Returns whether it changed.
    pub(crate) fn sync_word(
        &mut self,
        mfn: Mfn,
        offset: u64,
        at_invlpg: bool,
    ) -> Result<bool, EngineError> {
        let offset = offset & !7;
        let Some(old) = self.synced_entry(mfn, offset, 8) else {
            return Ok(false);
        };
        let now = self.host.read_u64(Maddr::new(mfn.base().raw() + offset))?;
        if now == old {
            return Ok(false);
        }
        if at_invlpg {
            self.oos.stats.sync_invlpg += 1;
        } else {
            self.oos.stats.sync_fault += 1;
        }
        // Validating an out-of-sync page's range moves its snapshot along.
        self.validate_frame(mfn, offset, 8)?;
        Ok(true)
    }

    /// Brings every out-of-sync page back in sync (a CR3 load, log-dirty, a host flush).
    pub(crate) fn resync_all(&mut self, reason: ResyncReason) -> Result<(), EngineError> {
        self.drop_stale_out_of_sync();
        while let Some(mfn) = self.oos.pages.first().map(|p| p.mfn) {
            self.resync_page(mfn, reason)?;
        }
        Ok(())
    }

    /// After guest memory at `offset..offset+len` of out-of-sync page `mfn` was written on
    /// the guest's behalf and validated into its shadows: the snapshot follows, since it
    /// is what the shadows hold.
    pub(crate) fn refresh_snapshot(
        &mut self,
        mfn: Mfn,
        offset: u64,
        len: u64,
    ) -> Result<(), EngineError> {
        let Some(i) = self.oos.position(mfn) else {
            return Ok(());
        };
        let first = offset / 8;
        let last = (offset + len.max(1) - 1) / 8;
        for w in first..=last.min(WORDS as u64 - 1) {
            let now = self.host.read_u64(Maddr::new(mfn.base().raw() + 8 * w))?;
            if let Some(word) = self
                .oos
                .pages
                .get_mut(i)
                .and_then(|p| p.snapshot.get_mut(w as usize))
            {
                *word = now;
            }
        }
        Ok(())
    }

    /// Forgets every out-of-sync page without resyncing (teardown: the shadows go).
    pub(crate) fn forget_out_of_sync(&mut self) {
        self.oos.pages.clear();
    }

    /// Brings every out-of-sync page back in sync. A host calls this when the guest has
    /// flushed every TLB in a way the engine did not see as a CR3 load (and the engine
    /// calls it itself at CR3 loads). Returns the flush the resync needs.
    pub fn resync_out_of_sync(&mut self) -> Result<crate::flush::Flush, EngineError> {
        self.run(|d| d.resync_all(ResyncReason::HostFlush))
            .map(|((), f)| f)
    }
}

//! Removing write access to a frame that is becoming a page table: (a) the last-writable
//! pointer, (b) the linear-map hints, (c) the bounded brute-force scan.

use alloc::vec::Vec;

use crate::addr::Mfn;
use crate::domain::{Domain, EngineError};
use crate::host::MachineMemory;
use crate::paging::bits;

impl<H: MachineMemory> Domain<H> {
    /// Removes every writable mapping of guest frame `mfn`, which is getting its first
    /// shadow: its direct p2m mappings (vcpus with paging disabled), then (a) the
    /// last-writable pointer, (b) the linear-map hints, (c) the scan of every L1 shadow.
    /// The frame's writable count says when to stop, and proves the search complete.
    ///
    /// Inside a page fault the scan stops after the domain's scan budget: then the frame's
    /// new shadows are dropped and [`EngineError::Preempted`] is returned, which the fault
    /// turns into a retry (see the module documentation).
    pub(crate) fn remove_write_access(&mut self, mfn: Mfn) -> Result<(), EngineError> {
        let may_defer =
            self.remove.fault.is_some() && !self.remove.rebuilding && self.config.scan_budget > 0;
        if self.find_writable(mfn, may_defer)? {
            return Ok(());
        }
        // Not yet: refuse to shadow the frame. Its shadow was just made, is empty and is
        // linked nowhere; the fault is retried and the scan continues then.
        let heads: Vec<Mfn> = self.store.of_frame(mfn).map(|(_, h)| h).collect();
        let unlinked = heads
            .iter()
            .all(|&h| self.store.info(h).is_some_and(|i| i.refs == 0 && !i.pinned));
        if !unlinked {
            // Never happens for a first shadow; finish rather than leave it unsafe.
            self.scan_for_writable(mfn, u64::MAX, false)?;
            self.stats.write_access_by_scan += 1;
            self.remove.scan.forget(mfn);
            return Ok(());
        }
        for head in heads {
            self.store.unhash(head);
        }
        self.stats.write_access_deferred += 1;
        Err(EngineError::Preempted)
    }

    /// Before a CR3 load changes anything: removes every writable mapping of `mfn`, which
    /// is to become a top-level page table, within the scan budget. When the scan is not
    /// done, nothing changed (but the scan's progress) and [`EngineError::Preempted`] is
    /// returned: the host runs the CR3 load again, which goes on with the scan. A root
    /// rebuild (the end of an operation that already changed things) cannot wait: its
    /// scan finishes in the call, in `get_or_create`.
    pub(crate) fn prepare_top_frame(&mut self, mfn: Mfn) -> Result<(), EngineError> {
        if self.store.is_page_table(mfn) || self.remove.rebuilding || self.config.scan_budget == 0 {
            return Ok(());
        }
        if self.find_writable(mfn, true)? {
            Ok(())
        } else {
            self.stats.write_access_deferred += 1;
            Err(EngineError::Preempted)
        }
    }

    /// Methods (a), (b) and (c) for `mfn`; the scan stops at the budget if `may_defer`.
    /// Returns whether no writable mapping is left.
    fn find_writable(&mut self, mfn: Mfn, may_defer: bool) -> Result<bool, EngineError> {
        // A superpage entry over the frame is not counted in its writable mappings.
        self.split_superpages_of(mfn)?;
        self.protect_in_p2m(mfn)?;
        if self.store.frame(mfn).writable == 0 {
            self.remove.scan.forget(mfn);
            return Ok(true);
        }
        let continuing = self.remove.scan.is_pending(mfn);
        if !continuing {
            self.stats.write_access_removals += 1;
        }

        // With a reverse map: exactly the entries that map the frame.
        #[cfg(feature = "rmap")]
        if self.rmap.is_some() {
            self.stats.write_access_by_rmap += 1;
            self.rewrite_rmap_slots(mfn, |e| (e & bits::RW != 0).then_some(e & !bits::RW))?;
            return Ok(true);
        }

        // (a) The entry that last took the count from zero to one.
        if self.store.frame(mfn).last_writable.is_some() {
            self.stats.write_access_pointer_tried += 1;
            self.clear_last_writable(mfn)?;
            if self.store.frame(mfn).writable == 0 {
                self.stats.write_access_by_pointer += 1;
                self.remove.scan.forget(mfn);
                return Ok(true);
            }
        }

        // (b) Where the guest OS's linear maps say the frame is mapped.
        if self.has_linear_maps() {
            self.stats.write_access_hint_tried += 1;
            self.apply_hints(mfn, |e| (e & bits::RW != 0).then_some(e & !bits::RW))?;
            if self.store.frame(mfn).writable == 0 {
                self.stats.write_access_by_hint += 1;
                self.remove.scan.forget(mfn);
                return Ok(true);
            }
        }

        // (c) The scan, in bounded steps.
        if !continuing {
            self.stats.write_access_scan_tried += 1;
        }
        let budget = u64::try_from(self.config.scan_budget).unwrap_or(u64::MAX);
        if self.scan_for_writable(mfn, budget, may_defer)? {
            self.stats.write_access_by_scan += 1;
            self.remove.scan.forget(mfn);
            return Ok(true);
        }
        Ok(false)
    }

    /// Method (a): clears RW in the entry the last-writable pointer of `mfn` names, if it
    /// still is a shadow L1 entry mapping `mfn` writable.
    pub(crate) fn clear_last_writable(&mut self, mfn: Mfn) -> Result<(), EngineError> {
        let Some(slot) = self.store.frame(mfn).last_writable else {
            return Ok(());
        };
        let leaf = self
            .store
            .containing(slot.mfn())
            .is_some_and(|(_, i)| i.key.kind.is_leaf_table());
        if !leaf {
            return Ok(());
        }
        let entry = self.read_sentry(slot)?;
        if self.sentry_frame(entry) == Some(mfn) && entry & bits::RW != 0 {
            self.set_sentry(slot, entry & !bits::RW)?;
        }
        Ok(())
    }

    /// Clears RW in the p2m entries of `mfn`, which vcpus with paging disabled use directly.
    pub(crate) fn protect_in_p2m(&mut self, mfn: Mfn) -> Result<(), EngineError> {
        let Some(p2m) = self.p2m.as_mut() else {
            return Ok(());
        };
        let gfns: Vec<_> = self
            .m2p
            .get(&mfn)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        let mut changed = false;
        for gfn in gfns {
            self.p2m_writable.remove(&gfn);
            changed |= p2m.set_writable(&mut self.host, gfn, false)?;
        }
        if changed {
            self.pending_flush = self.all_vcpus();
        }
        Ok(())
    }

    /// Whether a write-access removal for `mfn` waits for the scan (a fault on it was
    /// answered with a retry).
    pub fn write_scan_pending(&self, mfn: Mfn) -> bool {
        self.remove.scan.is_pending(mfn)
    }

    /// How many frames wait for the write-access scan.
    pub fn write_scans_pending(&self) -> usize {
        self.remove.scan.pending()
    }
}

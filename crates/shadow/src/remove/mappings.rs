//! Removing every shadow mapping of a frame (its p2m entry changed, or it leaves the
//! domain).

use crate::addr::Mfn;
use crate::domain::{Domain, EngineError};
use crate::host::MachineMemory;

impl<H: MachineMemory> Domain<H> {
    /// Removes every shadow mapping of guest frame `mfn`.
    ///
    /// Only writable mappings are counted, so neither the last-writable pointer nor the
    /// linear-map hints can prove that no read-only mapping is left: every L1 shadow is
    /// scanned, in this call. The work is bounded by the number of shadow L1 entries, that
    /// is by the pool size the host fixed for the domain, not by guest memory. The writable
    /// count, which must be zero afterwards, checks the scan.
    pub(crate) fn remove_all_mappings(&mut self, mfn: Mfn) -> Result<(), EngineError> {
        self.stats.mapping_removals += 1;
        #[cfg(feature = "rmap")]
        if self.rmap.is_some() {
            self.remove.scan.forget(mfn);
            return self.rewrite_rmap_slots(mfn, |_| Some(0));
        }
        let leaves = self.leaf_shadows();
        self.rewrite_entries(&leaves, |d, e| {
            (d.sentry_frame(e) == Some(mfn)).then_some(0)
        })?;
        self.remove.scan.forget(mfn);
        if self.store.frame(mfn).writable != 0 {
            return Err(EngineError::Internal("mappings left after a full scan"));
        }
        Ok(())
    }

    /// Rewrites every shadow L1 entry the reverse map records for `mfn` (where `pick`
    /// returns a new value); the frame's writable count must then be zero.
    #[cfg(feature = "rmap")]
    pub(crate) fn rewrite_rmap_slots(
        &mut self,
        mfn: Mfn,
        pick: impl Fn(u64) -> Option<u64>,
    ) -> Result<(), EngineError> {
        let slots: alloc::vec::Vec<crate::addr::Maddr> = self
            .rmap
            .as_ref()
            .map(|r| r.slots(mfn).collect())
            .unwrap_or_default();
        for slot in slots {
            let entry = self.read_sentry(slot)?;
            if self.sentry_frame(entry) == Some(mfn)
                && let Some(new) = pick(entry)
            {
                self.set_sentry(slot, new)?;
            }
        }
        self.remove.scan.forget(mfn);
        if self.store.frame(mfn).writable != 0 {
            return Err(EngineError::Internal(
                "writable mappings missing from the reverse map",
            ));
        }
        Ok(())
    }
}

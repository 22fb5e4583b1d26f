//! Removing every shadow mapping of a frame (its p2m entry changed, or it leaves the
//! domain), in bounded steps.
//!
//! Only writable mappings are counted, so no cheap method can prove that no read-only
//! mapping is left: every L1 shadow is scanned, [`DomainConfig::call_work_budget`] entries
//! per call. A call that has not finished returns [`EngineError::Preempted`] having changed
//! nothing the guest can tell (some of the frame's mappings are gone; they come back on
//! demand); the host calls the same operation again, which goes on from the cursor. While a
//! removal is under way, no new shadow entry may map the frame (a fault that would map it
//! leaves the entry empty and is retried, as KVM retries faults during an invalidation), so
//! one pass finds every mapping.
//!
//! [`DomainConfig::call_work_budget`]: crate::DomainConfig::call_work_budget

use crate::addr::Mfn;
use crate::domain::{Domain, EngineError};
use crate::host::MachineMemory;

use super::sweep::{SweepCursor, SweepEnd};

/// A removal of every mapping of one frame, under way across calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MappingRemoval {
    mfn: Mfn,
    cursor: SweepCursor,
    /// The scan is complete: the operation that asked for it goes on (an unshadow may
    /// still be preempted), and its retry must not scan again. The frame stays blocked
    /// until the operation ends ([`Domain::end_mapping_removal`]).
    done: bool,
}

impl<H: MachineMemory> Domain<H> {
    /// Whether shadow entries may not map `mfn` now (a removal of its mappings is under
    /// way: a fault that would map it is retried until the host finishes the removal).
    pub(crate) fn mapping_blocked(&self, mfn: Mfn) -> bool {
        self.remove.mappings.is_some_and(|r| r.mfn == mfn)
    }

    /// Whether a frame in `from..to` may not be mapped now (see
    /// [`Domain::mapping_blocked`]).
    pub(crate) fn mapping_blocked_in(&self, from: Mfn, to: Mfn) -> bool {
        self.remove
            .mappings
            .is_some_and(|r| r.mfn >= from && r.mfn < to)
    }

    /// The leaf entry `new` as the searches under way let it be written: nothing for a
    /// frame whose mappings are being removed, no write access to a frame waiting for the
    /// write-access scan. So a search's one pass is complete: what it looks for cannot be
    /// made again behind its cursor.
    pub(crate) fn admit_leaf(&self, new: u64) -> u64 {
        let Some(mfn) = self.sentry_frame(new) else {
            return new;
        };
        if self.mapping_blocked(mfn) {
            0
        } else if new & crate::paging::bits::RW != 0 && self.remove.scan.is_pending(mfn) {
            new & !crate::paging::bits::RW
        } else {
            new
        }
    }

    /// Removes every shadow mapping of guest frame `mfn`, in bounded steps: returns
    /// [`EngineError::Preempted`] when the call's budget is spent first (call the operation
    /// again). The writable count, which must be zero at the end, checks the scan.
    pub(crate) fn remove_all_mappings(&mut self, mfn: Mfn) -> Result<(), EngineError> {
        self.split_superpages_of(mfn)?;
        let mut removal = match self.remove.mappings {
            Some(r) if r.mfn == mfn && r.done => return Ok(()),
            Some(r) if r.mfn == mfn => r,
            _ => {
                self.stats.mapping_removals += 1;
                MappingRemoval {
                    mfn,
                    cursor: SweepCursor::default(),
                    done: false,
                }
            }
        };
        let budget = self.config.call_work_budget as u64;
        #[cfg(feature = "rmap")]
        if self.rmap.is_some() {
            self.remove.mappings = Some(removal);
            let left = self.rewrite_rmap_slots_bounded(mfn, budget, |_| Some(0))?;
            if left {
                return Err(EngineError::Preempted);
            }
            self.remove.mappings = Some(MappingRemoval {
                done: true,
                ..removal
            });
            return Ok(());
        }
        let end = self.sweep_shadows(
            &mut removal.cursor,
            budget,
            |i| i.key.kind.is_leaf_table(),
            |d, _, e| (d.sentry_frame(e) == Some(mfn)).then_some(0),
        )?;
        if end == SweepEnd::Budget {
            self.remove.mappings = Some(removal);
            return Err(EngineError::Preempted);
        }
        removal.done = true;
        self.remove.mappings = Some(removal);
        self.remove.scan.forget(mfn);
        if self.store.frame(mfn).writable != 0 {
            return Err(EngineError::Internal("mappings left after a full scan"));
        }
        Ok(())
    }

    /// The operation that removed every mapping of `mfn` is complete: the frame may be
    /// mapped again (through whatever now names it).
    pub(crate) fn end_mapping_removal(&mut self, mfn: Mfn) {
        if self.remove.mappings.is_some_and(|r| r.mfn == mfn) {
            self.remove.mappings = None;
        }
    }

    /// Rewrites every shadow L1 entry the reverse map records for `mfn` (where `pick`
    /// returns a new value); the frame's writable count must then be zero.
    #[cfg(feature = "rmap")]
    pub(crate) fn rewrite_rmap_slots(
        &mut self,
        mfn: Mfn,
        pick: impl Fn(u64) -> Option<u64>,
    ) -> Result<(), EngineError> {
        self.rewrite_rmap_slots_bounded(mfn, u64::MAX, pick)
            .map(|_| ())
    }

    /// [`Domain::rewrite_rmap_slots`] for at most `budget` slots; returns whether slots are
    /// left (then the writable count is not checked).
    #[cfg(feature = "rmap")]
    fn rewrite_rmap_slots_bounded(
        &mut self,
        mfn: Mfn,
        budget: u64,
        pick: impl Fn(u64) -> Option<u64>,
    ) -> Result<bool, EngineError> {
        let take = usize::try_from(budget.max(1)).unwrap_or(usize::MAX);
        let slots: alloc::vec::Vec<crate::addr::Maddr> = self
            .rmap
            .as_ref()
            .map(|r| r.slots(mfn).take(take.saturating_add(1)).collect())
            .unwrap_or_default();
        let left = slots.len() > take;
        for &slot in slots.iter().take(take) {
            let entry = self.read_sentry(slot)?;
            self.stats.add_work(1);
            if self.sentry_frame(entry) == Some(mfn)
                && let Some(new) = pick(entry)
            {
                self.set_sentry(slot, new)?;
            }
        }
        if left {
            return Ok(true);
        }
        self.remove.scan.forget(mfn);
        if self.store.frame(mfn).writable != 0 {
            return Err(EngineError::Internal(
                "writable mappings missing from the reverse map",
            ));
        }
        Ok(false)
    }
}

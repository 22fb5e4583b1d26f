//! Method (c) of remove write access: the brute-force scan of every L1 shadow, in bounded
//! steps with a continuation (see the module documentation of [`crate::remove`]).

use alloc::vec::Vec;

use crate::addr::{Maddr, Mfn, PAGE_SIZE};
use crate::domain::{Domain, EngineError};
use crate::host::MachineMemory;
use crate::paging::bits;

/// At most this many frames wait for the scan at once (a vcpu waits for at most one; the
/// rest are left by guests that gave up). When full, the frame that has waited through the
/// most passes makes room.
const MAX_TARGETS: usize = 8;

/// A position of the scan: a shadow head and a byte offset inside its block. The scan
/// looks next at the first L1 shadow whose head is at or above the head, from the offset if
/// it is that very shadow.
type Position = (u64, u64);

/// A frame waiting for its writable mappings to be found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Target {
    mfn: Mfn,
    /// Where its current pass began.
    start: Position,
    /// Whether the cursor has gone round the end of the shadows since `start`.
    wrapped: bool,
    /// Passes completed that left writable mappings (the guest re-created them).
    passes: u32,
}

impl Target {
    fn pass_complete(&self, at: Position) -> bool {
        self.wrapped && at >= self.start
    }
}

/// The scan's cursor and the frames it works for.
#[derive(Clone, Debug, Default)]
pub(crate) struct WriteScan {
    at: Position,
    targets: Vec<Target>,
}

impl WriteScan {
    /// Whether `mfn` waits for the scan.
    pub(crate) fn is_pending(&self, mfn: Mfn) -> bool {
        self.targets.iter().any(|t| t.mfn == mfn)
    }

    /// Whether a frame in `from..to` waits for the scan.
    pub(crate) fn any_pending_in(&self, from: Mfn, to: Mfn) -> bool {
        self.targets.iter().any(|t| t.mfn >= from && t.mfn < to)
    }

    /// How many frames wait for the scan.
    pub(crate) fn pending(&self) -> usize {
        self.targets.len()
    }

    /// Stops working for `mfn`.
    pub(crate) fn forget(&mut self, mfn: Mfn) {
        self.targets.retain(|t| t.mfn != mfn);
    }

    fn target(&self, mfn: Mfn) -> Option<&Target> {
        self.targets.iter().find(|t| t.mfn == mfn)
    }

    /// Starts working for `mfn` (from the cursor) unless it already is.
    fn join(&mut self, mfn: Mfn) {
        if self.is_pending(mfn) {
            return;
        }
        if self.targets.len() >= MAX_TARGETS {
            let worst = self
                .targets
                .iter()
                .enumerate()
                .max_by_key(|(i, t)| (t.passes, usize::MAX - i))
                .map(|(i, _)| i);
            if let Some(i) = worst {
                self.targets.remove(i);
            }
        }
        self.targets.push(Target {
            mfn,
            start: self.at,
            wrapped: false,
            passes: 0,
        });
    }

    /// Begins a new pass for `mfn` from the cursor.
    fn restart(&mut self, mfn: Mfn) {
        let at = self.at;
        if let Some(t) = self.targets.iter_mut().find(|t| t.mfn == mfn) {
            t.start = at;
            t.wrapped = false;
        }
    }
}

/// How a scan step for one frame ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StepEnd {
    /// The frame has no writable mapping left.
    Done,
    /// The budget ran out first.
    Budget,
    /// A whole pass went by and the frame still has writable mappings (re-created behind
    /// the cursor while the scan was stopped).
    PassComplete,
}

impl<H: MachineMemory> Domain<H> {
    /// Method (c) for `mfn`: scans L1 shadows from the cursor, clearing RW in every entry
    /// that maps a waiting frame writable, until `mfn` has no writable mapping left or
    /// `budget` units of work (an entry read, or a shadow skipped) are spent. Returns
    /// whether the search for `mfn` is complete. With `may_defer` false, or after a pass the
    /// guest defeated, it finishes in this call (one whole pass, bounded by the pool).
    pub(crate) fn scan_for_writable(
        &mut self,
        mfn: Mfn,
        budget: u64,
        may_defer: bool,
    ) -> Result<bool, EngineError> {
        let defeated = self.remove.scan.target(mfn).is_some_and(|t| t.passes > 0);
        self.remove.scan.join(mfn);
        if may_defer && !defeated {
            self.stats.write_access_scan_steps += 1;
            match self.scan_step(mfn, budget)? {
                StepEnd::Done => return Ok(true),
                StepEnd::Budget => return Ok(false),
                StepEnd::PassComplete => {}
            }
        }
        // Finish here: nothing can re-create a writable mapping during this call, so one
        // pass from the cursor finds every one left.
        if may_defer {
            self.stats.write_access_scan_fallbacks += 1;
        }
        self.stats.write_access_scan_steps += 1;
        self.remove.scan.restart(mfn);
        match self.scan_step(mfn, u64::MAX)? {
            StepEnd::Done => Ok(true),
            StepEnd::Budget | StepEnd::PassComplete => {
                self.remove.scan.forget(mfn);
                Err(EngineError::Internal(
                    "writable mappings left after a full scan",
                ))
            }
        }
    }

    /// One bounded step of the scan, for every waiting frame, until `focus` is done, its
    /// pass completes, or the budget is spent.
    fn scan_step(&mut self, focus: Mfn, budget: u64) -> Result<StepEnd, EngineError> {
        let width = self.sentry_bytes();
        let mut left = budget;
        // Wrapping round twice with no shadow in between means there is nothing to scan.
        let mut empty_wraps = 0;
        loop {
            if let Some(end) = self.settle_targets(focus)? {
                return Ok(end);
            }
            if left == 0 {
                return Ok(StepEnd::Budget);
            }
            let (from, off) = self.remove.scan.at;
            let mut next = None;
            let mut resume = None;
            for (head, info) in self.store.shadows_from(Mfn::new(from)) {
                if info.key.kind.is_leaf_table() {
                    next = Some((head, info.order));
                    break;
                }
                resume = Some(head.raw() + (1u64 << info.order));
                self.stats.add_work(1);
                left -= 1;
                if left == 0 {
                    break;
                }
            }
            let Some((head, order)) = next else {
                if left == 0 {
                    // Stopped among upper shadows: resume after the last one skipped.
                    if let Some(after) = resume {
                        self.remove.scan.at = (after, 0);
                    }
                    continue;
                }
                // Past the last shadow: round to the first. A frame that had already gone
                // round once has now seen every shadow since its pass began.
                self.remove.scan.at = (0, 0);
                for t in &mut self.remove.scan.targets {
                    if t.wrapped {
                        t.start = (0, 0);
                    }
                    t.wrapped = true;
                }
                empty_wraps += 1;
                if empty_wraps > 1 {
                    // No L1 shadow at all: no writable mapping can exist.
                    return Ok(self.settle_targets(focus)?.unwrap_or(StepEnd::PassComplete));
                }
                continue;
            };
            empty_wraps = 0;
            let end = PAGE_SIZE << order;
            let mut offset = if head.raw() == from { off } else { 0 };
            while offset < end && left > 0 {
                let slot = Maddr::new(head.base().raw() + offset);
                let entry = self.host.read_entry(slot, width)?;
                self.stats.scanned_entries += 1;
                self.stats.add_work(1);
                left -= 1;
                offset += width;
                if entry & bits::RW != 0
                    && let Some(m) = self.sentry_frame(entry)
                    && self.remove.scan.is_pending(m)
                {
                    self.set_sentry(slot, entry & !bits::RW)?;
                }
            }
            self.remove.scan.at = if offset >= end {
                (head.raw() + (1u64 << order), 0)
            } else {
                (head.raw(), offset)
            };
        }
    }

    /// Drops the waiting frames that have no writable mapping left; for those whose pass
    /// is complete, tries the last-writable pointer again and starts another pass (a frame
    /// defeated twice is dropped: whoever waited for it has given up). Says how the step
    /// ends for `focus`, if it does.
    fn settle_targets(&mut self, focus: Mfn) -> Result<Option<StepEnd>, EngineError> {
        let at = self.remove.scan.at;
        let mut end = None;
        let targets = core::mem::take(&mut self.remove.scan.targets);
        let mut kept = Vec::with_capacity(targets.len());
        for mut t in targets {
            if self.store.frame(t.mfn).writable == 0 {
                if t.mfn == focus {
                    end = Some(StepEnd::Done);
                }
                continue;
            }
            if t.pass_complete(at) {
                self.clear_last_writable(t.mfn)?;
                if self.store.frame(t.mfn).writable == 0 {
                    if t.mfn == focus {
                        end = Some(StepEnd::Done);
                    }
                    continue;
                }
                t.passes += 1;
                t.start = at;
                t.wrapped = false;
                if t.mfn == focus {
                    end = Some(StepEnd::PassComplete);
                } else if t.passes > 1 {
                    continue;
                }
            }
            kept.push(t);
        }
        if end.is_none() && !kept.iter().any(|t| t.mfn == focus) {
            // Not waiting (never the case for a frame the caller just joined): the count
            // alone says whether it is done.
            end = Some(if self.store.frame(focus).writable == 0 {
                StepEnd::Done
            } else {
                StepEnd::PassComplete
            });
        }
        self.remove.scan.targets = kept;
        Ok(end)
    }
}

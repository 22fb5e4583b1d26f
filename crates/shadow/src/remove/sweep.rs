//! A pass over shadows in head order, in bounded steps: the cursor is kept by the caller
//! between engine calls, so a long pass continues where the last call stopped.

use crate::addr::{Maddr, Mfn, PAGE_SIZE};
use crate::domain::{Domain, EngineError};
use crate::host::MachineMemory;
use crate::types::ShadowInfo;

/// Where a pass stands: the next shadow to look at is the first whose head is at or
/// above `head`, from byte `offset` if it is that very shadow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct SweepCursor {
    head: u64,
    offset: u64,
}

impl SweepCursor {
    /// Whether the pass has not reached byte `offset` of the shadow at `head` yet.
    pub(crate) fn not_past(&self, head: Mfn, offset: u64) -> bool {
        (head.raw(), offset) >= (self.head, self.offset)
    }
}

/// How a bounded step of a pass ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SweepEnd {
    /// Every shadow from the cursor to the last has been visited.
    Done,
    /// The budget ran out first; the cursor says where to go on.
    Budget,
}

impl<H: MachineMemory> Domain<H> {
    /// Whether the call in progress has spent its work budget: a long loop stops here and
    /// leaves a continuation.
    pub(crate) fn out_of_work(&self) -> bool {
        self.stats.last_call_work >= self.config.call_work_budget as u64
    }

    /// Visits the entries of the shadows `which` selects, from `cursor` on in head order,
    /// rewriting each for which `pick` returns a new value, until every such shadow has
    /// been visited or `budget` units of work (an entry read, a shadow skipped) are spent.
    /// Shadows made behind the cursor meanwhile are not visited: the caller makes sure
    /// they cannot hold what it looks for.
    pub(crate) fn sweep_shadows(
        &mut self,
        cursor: &mut SweepCursor,
        budget: u64,
        which: impl Fn(&ShadowInfo) -> bool,
        pick: impl FnMut(&Self, Maddr, u64) -> Option<u64>,
    ) -> Result<SweepEnd, EngineError> {
        self.sweep_shadows_until(cursor, budget, which, |_| false, pick)
    }

    /// [`Domain::sweep_shadows`] that also stops, before each shadow, once `done` holds
    /// (the step then ends with [`SweepEnd::Budget`], the cursor where it stopped).
    pub(crate) fn sweep_shadows_until(
        &mut self,
        cursor: &mut SweepCursor,
        budget: u64,
        which: impl Fn(&ShadowInfo) -> bool,
        done: impl Fn(&Self) -> bool,
        mut pick: impl FnMut(&Self, Maddr, u64) -> Option<u64>,
    ) -> Result<SweepEnd, EngineError> {
        let width = self.sentry_bytes();
        let mut left = budget.max(1);
        loop {
            if done(self) {
                return Ok(SweepEnd::Budget);
            }
            let mut next = None;
            let mut skipped = 0;
            let mut after_skipped = None;
            for (head, info) in self.store.shadows_from(Mfn::new(cursor.head)) {
                if which(info) {
                    next = Some((head, info.order));
                    break;
                }
                skipped += 1;
                after_skipped = Some(head.raw() + (1u64 << info.order));
                if skipped == left {
                    break;
                }
            }
            self.stats.add_work(skipped);
            left -= skipped;
            let Some((head, order)) = next else {
                return match after_skipped {
                    Some(after) if left == 0 => {
                        *cursor = SweepCursor {
                            head: after,
                            offset: 0,
                        };
                        Ok(SweepEnd::Budget)
                    }
                    _ => Ok(SweepEnd::Done),
                };
            };
            let end = PAGE_SIZE << order;
            let mut offset = if head.raw() == cursor.head {
                cursor.offset
            } else {
                0
            };
            while offset < end && left > 0 {
                let slot = Maddr::new(head.base().raw() + offset);
                let entry = self.host.read_entry(slot, width)?;
                self.stats.add_work(1);
                left -= 1;
                offset += width;
                if let Some(new) = pick(self, slot, entry) {
                    self.set_sentry(slot, new)?;
                }
            }
            *cursor = if offset >= end {
                SweepCursor {
                    head: head.raw() + (1u64 << order),
                    offset: 0,
                }
            } else {
                SweepCursor {
                    head: head.raw(),
                    offset,
                }
            };
            if left == 0 {
                return Ok(SweepEnd::Budget);
            }
        }
    }
}

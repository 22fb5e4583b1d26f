//! Unshadowing a page: every shadow of it unpinned and unhooked from the entries that point
//! at it (the up pointer first, a scan of the level above last), and the vcpus that ran on
//! one of them given a new root.

use alloc::vec::Vec;

use super::sweep::{SweepCursor, SweepEnd};
use crate::addr::{Gfn, Maddr, Mfn};
use crate::domain::{Domain, EngineError};
use crate::flush::{Flush, VcpuSet};
use crate::host::MachineMemory;
use crate::p2m::P2mType;

/// An unshadow waiting for the scan that unhooks one of its shadows from the upper
/// entries still pointing at it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Unhooking {
    head: Mfn,
    cursor: SweepCursor,
}

impl<H: MachineMemory> Domain<H> {
    /// Removes every shadow of guest frame `mfn`: takes it from the vcpus using it as a
    /// top level (their roots are rebuilt by [`Domain::rebuild_roots`], which the caller
    /// runs once its own change, a p2m update say, is complete), unpins it, unhooks it from
    /// every upper shadow (the up pointer first, a scan if references remain) and unhashes
    /// it. The page is no longer a page table.
    ///
    /// The scan goes in bounded steps: when the call's budget is spent first,
    /// [`EngineError::Preempted`] is returned and the caller's retry goes on (a fault that
    /// meets the shadow meanwhile continues the scan itself, and no upper entry may link
    /// it, so one pass is complete).
    pub(crate) fn unshadow(&mut self, mfn: Mfn) -> Result<(), EngineError> {
        let heads: Vec<Mfn> = self.store.of_frame(mfn).map(|(_, h)| h).collect();
        if heads.is_empty() {
            return Ok(());
        }
        if !heads.iter().any(|&h| self.being_unhooked(h)) {
            self.stats.unshadows += 1;
        }
        self.pending_flush = self.all_vcpus();
        for head in heads {
            self.unshadow_one(head)?;
        }
        Ok(())
    }

    /// [`Domain::unshadow`] for a heuristic, after the write that prompted it is done (so
    /// the call cannot be retried): when the unhooking scan runs out of budget it stays
    /// pending (the shadow stays hashed and in sync, and nothing links it again; a lookup
    /// that meets it goes on with it), and the call succeeds.
    pub(crate) fn unshadow_hinted(&mut self, mfn: Mfn) -> Result<(), EngineError> {
        match self.unshadow(mfn) {
            Err(EngineError::Preempted) => Ok(()),
            other => other,
        }
    }

    /// Unshadows one shadow (see [`Domain::unshadow`]).
    fn unshadow_one(&mut self, head: Mfn) -> Result<(), EngineError> {
        for v in 0..self.vcpus.len() {
            if self.vcpus[v].tops().any(|t| t == head) {
                self.release_vcpu_tops(v)?;
                self.needs_root = self.needs_root.union(VcpuSet::one(v));
            }
        }
        if let Some(dead) = self.store.unpin(head) {
            self.store.unhash(dead);
        }
        self.unhook(head)?;
        if !self.store.is_dying(head) {
            // Neither pinned nor referenced any more, but still hashed.
            self.store.unhash(head);
        }
        Ok(())
    }

    /// Whether the shadow at `head` waits for its unhooking scan.
    pub(crate) fn being_unhooked(&self, head: Mfn) -> bool {
        self.remove.unhooking.is_some_and(|u| u.head == head)
    }

    /// Goes on with the unshadow of `head`, which a lookup just found waiting for its
    /// unhooking scan: finishes it (the shadow is then gone) or answers
    /// [`EngineError::Preempted`].
    pub(crate) fn continue_unshadow(&mut self, head: Mfn) -> Result<(), EngineError> {
        if self.being_unhooked(head) {
            self.unshadow_one(head)?;
        }
        Ok(())
    }

    /// The upper entry `new` as an unhooking scan under way lets it be written: no link to
    /// the shadow being unhooked.
    pub(crate) fn admit_upper(&self, new: u64) -> u64 {
        let Some(u) = self.remove.unhooking else {
            return new;
        };
        let pages = self.store.info(u.head).map_or(1, |i| 1u64 << i.order);
        match self.sentry_frame(new) {
            Some(m) if m >= u.head && m.raw() < u.head.raw() + pages => 0,
            _ => new,
        }
    }

    /// Whether a vcpu runs on a top-level shadow of guest frame `mfn` now.
    pub(crate) fn is_top_in_use(&self, mfn: Mfn) -> bool {
        self.vcpus
            .iter()
            .flat_map(|v| v.tops())
            .any(|t| self.store.info(t).is_some_and(|i| i.key.frame == mfn.raw()))
    }

    /// Removes every shadow of a guest page and lets the guest write it directly (the page
    /// stopped being a page table, or an emulation cannot be done).
    pub fn unshadow_page(&mut self, gfn: Gfn) -> Result<Flush, EngineError> {
        self.run(|d| {
            if let Some((mfn, P2mType::Ram)) = d.guest_frame(gfn) {
                d.unshadow(mfn)?;
                d.rebuild_roots()?;
            }
            Ok(())
        })
        .map(|((), f)| f)
    }

    /// Clears every upper entry that points into the shadow at `head`: the up pointer
    /// first (with the entries next to it that point into the same shadow); while
    /// references remain (the count proves when none is left), a scan of the upper shadows
    /// that stops as soon as the count reaches zero, in bounded steps with a cursor kept
    /// between calls ([`EngineError::Preempted`] when the budget is spent first).
    pub(crate) fn unhook(&mut self, head: Mfn) -> Result<(), EngineError> {
        let Some(info) = self.store.info(head).copied() else {
            self.stop_unhooking(head);
            return Ok(());
        };
        if info.refs == 0 {
            self.stop_unhooking(head);
            return Ok(());
        }
        let pages = 1u64 << info.order;
        let inside =
            move |m: Option<Mfn>| m.is_some_and(|m| m >= head && m.raw() < head.raw() + pages);
        if let Some(up) = info.up {
            let upper = self
                .store
                .containing(up.mfn())
                .is_some_and(|(_, i)| !i.key.kind.is_leaf_table());
            if upper {
                // The up entry and its neighbours: a multi-page shadow is pointed at by
                // consecutive entries (the two or four shadow entries of one 32-bit guest
                // entry, a vcpu top's four PDPTEs), all in one aligned group of four.
                let width = self.sentry_bytes();
                let group = up.raw() & !(4 * width - 1);
                for i in 0..4 {
                    let slot = Maddr::new(group + i * width);
                    if inside(self.sentry_frame(self.read_sentry(slot)?)) {
                        self.set_sentry(slot, 0)?;
                    }
                }
            }
        }
        let referenced = |d: &Self| d.store.info(head).is_some_and(|i| i.refs > 0);
        if !referenced(self) {
            if !self.being_unhooked(head) {
                self.stats.unhook_by_pointer += 1;
            }
            self.stop_unhooking(head);
            return Ok(());
        }
        let mut unhooking = match self.remove.unhooking {
            Some(u) if u.head == head => u,
            _ => {
                self.stats.unhook_by_scan += 1;
                Unhooking {
                    head,
                    cursor: SweepCursor::default(),
                }
            }
        };
        // From here until the scan is done, nothing may link the shadow again.
        self.remove.unhooking = Some(unhooking);
        let budget = (self.config.call_work_budget as u64)
            .saturating_sub(self.stats.last_call_work)
            .max(1);
        let end = self.sweep_shadows_until(
            &mut unhooking.cursor,
            budget,
            |i| !i.key.kind.is_leaf_table(),
            |d| !referenced(d),
            |d, _, e| inside(d.sentry_frame(e)).then_some(0),
        )?;
        if !referenced(self) {
            self.stop_unhooking(head);
            return Ok(());
        }
        if end == SweepEnd::Done {
            self.stop_unhooking(head);
            return Err(EngineError::Internal(
                "references to a shadow left after a full scan",
            ));
        }
        self.remove.unhooking = Some(unhooking);
        Err(EngineError::Preempted)
    }

    fn stop_unhooking(&mut self, head: Mfn) {
        if self.being_unhooked(head) {
            self.remove.unhooking = None;
        }
    }
}

//! Control operations (Xen's `shadow_op`): test mode, log-dirty mode with clean and peek,
//! the pool size, statistics. Long ones go in bounded steps with a continuation.

use alloc::collections::BTreeSet;
use alloc::vec::Vec;

use super::{Domain, DomainConfig, EngineError};
use crate::addr::{Gfn, Maddr, Mfn};
use crate::flush::Flush;
use crate::host::MachineMemory;
use crate::log_dirty::{DirtyBitmap, DirtyLog, Enabling};
use crate::paging::bits;
use crate::pool::ResizeProgress;
use crate::remove::sweep::SweepEnd;
use crate::stats::Stats;

/// A control operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShadowOp {
    /// Audit the domain after every operation; a violation fails the domain.
    EnableTest,
    /// Stop auditing after every operation.
    DisableTest,
    /// Write-protect every page and start logging writes.
    EnableLogDirty,
    /// Stop logging writes.
    DisableLogDirty,
    /// One bounded step of a clean: the bitmap comes back (and is reset) when done.
    Clean {
        /// Shadow entries (and as many p2m entries) to re-protect in this step.
        budget: usize,
    },
    /// The bitmap, without resetting it.
    Peek,
    /// The pool size.
    GetPoolSize,
    /// One bounded step towards a new pool size.
    SetPoolSize {
        /// Target size in pages (at least the domain's minimum).
        pages: usize,
        /// Host chunk operations or evictions in this step.
        budget: usize,
    },
    /// The counters.
    Stats,
}

/// The answer to a control operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShadowOpResult {
    /// Done, nothing to report.
    Done,
    /// Not finished: call again with the same operation.
    More,
    /// A dirty bitmap (clean or peek).
    Bitmap(DirtyBitmap),
    /// The pool size in pages, and how many are in use.
    PoolSize {
        /// Pages in the pool.
        total: usize,
        /// Pages holding shadows.
        used: usize,
    },
    /// The counters.
    Stats(alloc::boxed::Box<Stats>),
}

/// How far a clean got.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CleanProgress {
    /// More entries to re-protect: call again.
    More,
    /// Done: the pages dirtied since the previous clean.
    Done(DirtyBitmap),
}

/// A clean in progress.
#[derive(Clone, Debug, Default)]
pub(crate) struct Cleaning {
    snapshot: DirtyBitmap,
    to_protect: BTreeSet<Maddr>,
    /// Writable p2m entries (vcpus with paging disabled) to re-protect.
    p2m_to_protect: BTreeSet<Gfn>,
    steps: usize,
}

impl<H: MachineMemory> Domain<H> {
    /// Whether the shadow entry at `slot` is writable only because a clean in progress has
    /// not re-protected it yet (its page was dirty when the clean began; a write made
    /// before it is re-protected marks the page dirty again).
    pub(crate) fn awaits_reprotect(&self, slot: Maddr) -> bool {
        self.cleaning
            .as_ref()
            .is_some_and(|c| c.to_protect.contains(&slot))
            || self.awaits_enable_protect(slot)
    }

    /// Whether the p2m entry of `gfn` is writable only because a clean in progress, or
    /// enabling log-dirty mode, has not re-protected it yet.
    pub(crate) fn awaits_p2m_reprotect(&self, gfn: Gfn) -> bool {
        self.cleaning
            .as_ref()
            .is_some_and(|c| c.p2m_to_protect.contains(&gfn))
            || self.log_dirty.as_ref().is_some_and(DirtyLog::is_enabling)
    }

    /// Whether the shadow entry at `slot` is writable only because enabling log-dirty mode
    /// has not reached it yet.
    fn awaits_enable_protect(&self, slot: Maddr) -> bool {
        let Some(enabling) = self.log_dirty.as_ref().and_then(|l| l.enabling) else {
            return false;
        };
        !enabling.leaves_done
            && self.store.containing(slot.mfn()).is_some_and(|(head, _)| {
                enabling
                    .cursor
                    .not_past(head, slot.raw() - head.base().raw())
            })
    }

    /// Runs a control operation.
    pub fn shadow_op(&mut self, op: ShadowOp) -> Result<(ShadowOpResult, Flush), EngineError> {
        match op {
            ShadowOp::EnableTest => {
                self.test_mode = true;
                Ok((ShadowOpResult::Done, Flush::NONE))
            }
            ShadowOp::DisableTest => {
                self.test_mode = false;
                Ok((ShadowOpResult::Done, Flush::NONE))
            }
            ShadowOp::EnableLogDirty => {
                let budget = self.config.call_work_budget;
                self.enable_log_dirty_step(budget).map(|(done, f)| {
                    if done {
                        (ShadowOpResult::Done, f)
                    } else {
                        (ShadowOpResult::More, f)
                    }
                })
            }
            ShadowOp::DisableLogDirty => {
                self.disable_log_dirty();
                Ok((ShadowOpResult::Done, Flush::NONE))
            }
            ShadowOp::Clean { budget } => self.clean_step(budget).map(|(p, f)| match p {
                CleanProgress::More => (ShadowOpResult::More, f),
                CleanProgress::Done(b) => (ShadowOpResult::Bitmap(b), f),
            }),
            ShadowOp::Peek => self
                .peek_dirty()
                .map(|b| (ShadowOpResult::Bitmap(b), Flush::NONE))
                .ok_or(EngineError::BadArgument("log-dirty mode is off")),
            ShadowOp::GetPoolSize => Ok((
                ShadowOpResult::PoolSize {
                    total: self.pool.total_pages(),
                    used: self.pool.used_pages(),
                },
                Flush::NONE,
            )),
            ShadowOp::SetPoolSize { pages, budget } => {
                self.set_pool_size_step(pages, budget)
                    .map(|(p, f)| match p {
                        ResizeProgress::Done => (ShadowOpResult::Done, f),
                        _ => (ShadowOpResult::More, f),
                    })
            }
            ShadowOp::Stats => Ok((
                ShadowOpResult::Stats(alloc::boxed::Box::new(self.stats)),
                Flush::NONE,
            )),
        }
    }

    /// Turns log-dirty mode on: every shadow L1 entry and every writable p2m entry loses
    /// write access. The whole of it, step after step (the guest does not run in between).
    /// Like every whole-operation helper here, it may answer `Preempted` when it needs the
    /// host to carry out a flush first (take it with `take_flush`, then call again).
    pub fn enable_log_dirty(&mut self) -> Result<Flush, EngineError> {
        let budget = self.config.call_work_budget;
        self.steps_in_one_call(|d| {
            d.enable_log_dirty_step(budget)
                .map(|(done, f)| (done.then_some(()), f))
        })
        .map(|((), f)| f)
    }

    /// One bounded step of turning log-dirty mode on: removes write access from shadow L1
    /// entries, then from writable p2m entries, about `budget` entries' work in all;
    /// returns whether it is done. Logging starts with the first step: an entry
    /// made writable later is made so only for a dirty page. If the guest runs between
    /// steps, it may write through an entry not yet protected: every page a later step
    /// protects is therefore counted dirty.
    pub fn enable_log_dirty_step(&mut self, budget: usize) -> Result<(bool, Flush), EngineError> {
        if self
            .log_dirty
            .as_ref()
            .is_some_and(|l| l.enabling.is_none())
        {
            return Err(EngineError::BadArgument("log-dirty mode is already on"));
        }
        self.run(|d| {
            let mut enabling = match d.log_dirty.as_ref().and_then(|l| l.enabling) {
                Some(e) => e,
                None => {
                    // Out-of-sync pages are written without faults: in sync first.
                    d.resync_all(super::oos::ResyncReason::LogDirty)?;
                    d.log_dirty = Some(DirtyLog::default());
                    Enabling::default()
                }
            };
            let later_step = enabling.steps > 0;
            enabling.steps += 1;
            let start = d.stats.last_call_work;
            let budget = budget.max(1) as u64;
            let mut protected: Vec<Mfn> = Vec::new();
            // Superpage entries go first (no new one is made in log-dirty mode); one split in
            // a later step may have been written through meanwhile: all its frames are dirty.
            let (split, written) = d.split_superpages_step(budget)?;
            if later_step {
                for base in written {
                    for i in 0..1u64 << d.superpage_order() {
                        d.mark_frame_dirty(Mfn::new(base.raw() + i));
                    }
                }
            }
            if split && !enabling.leaves_done {
                let mut cursor = enabling.cursor;
                let end = d.sweep_shadows(
                    &mut cursor,
                    budget,
                    |i| i.key.kind.is_leaf_table(),
                    |d, _, e| {
                        let frame = d.sentry_frame(e)?;
                        (e & bits::RW != 0).then(|| {
                            protected.push(frame);
                            e & !bits::RW
                        })
                    },
                )?;
                enabling.cursor = cursor;
                enabling.leaves_done = end == SweepEnd::Done;
            }
            if later_step {
                for mfn in protected {
                    d.mark_frame_dirty(mfn);
                }
            }
            if split && enabling.leaves_done {
                let spent = d.stats.last_call_work - start;
                let left = budget.saturating_sub(spent).max(1);
                for _ in 0..left {
                    let Some(gfn) = d.p2m_writable.pop_first() else {
                        break;
                    };
                    if let Some(p2m) = d.p2m.as_mut() {
                        p2m.set_writable(&mut d.host, gfn, false)?;
                    }
                    d.stats.add_work(1);
                    if later_step {
                        d.mark_dirty(gfn);
                    }
                }
            }
            d.pending_flush = d.all_vcpus();
            let done = split && enabling.leaves_done && d.p2m_writable.is_empty();
            if let Some(log) = d.log_dirty.as_mut() {
                log.enabling = (!done).then_some(enabling);
            }
            Ok(done)
        })
    }

    /// Marks dirty a guest frame of machine frame `mfn` (every guest frame mapping it).
    fn mark_frame_dirty(&mut self, mfn: Mfn) {
        let gfns: Vec<Gfn> = match self.m2p.get(&mfn) {
            Some(set) => set.iter().copied().collect(),
            None => alloc::vec![Gfn::new(mfn.raw())],
        };
        for gfn in gfns {
            self.mark_dirty(gfn);
        }
    }

    /// Turns log-dirty mode off (pages regain write access as they fault).
    pub fn disable_log_dirty(&mut self) {
        self.log_dirty = None;
        self.cleaning = None;
    }

    /// The dirty bitmap, without resetting it.
    pub fn peek_dirty(&self) -> Option<DirtyBitmap> {
        self.log_dirty.as_ref().map(|l| l.dirty.clone())
    }

    /// One bounded step of a clean: re-protects at most `budget` of the shadow entries made
    /// writable since the last clean and as many writable p2m entries, and returns the
    /// bitmap (reset) when all are done. If the guest runs between steps, every page
    /// re-protected in a later step is counted dirty again for the next round (it may have
    /// been written meanwhile).
    pub fn clean_step(&mut self, budget: usize) -> Result<(CleanProgress, Flush), EngineError> {
        if self.log_dirty.is_none() {
            return Err(EngineError::BadArgument("log-dirty mode is off"));
        }
        if self.log_dirty.as_ref().is_some_and(DirtyLog::is_enabling) {
            return Err(EngineError::BadArgument(
                "log-dirty mode is still being enabled",
            ));
        }
        self.run(|d| {
            let mut cleaning = match d.cleaning.take() {
                Some(c) => c,
                None => {
                    // Out-of-sync pages are written without faults: in sync (and
                    // read-only) before the bitmap is taken.
                    d.resync_all(super::oos::ResyncReason::LogDirty)?;
                    let log = d
                        .log_dirty
                        .as_mut()
                        .ok_or(EngineError::Internal("log-dirty state vanished"))?;
                    log.cleans += 1;
                    let snapshot = core::mem::take(&mut log.dirty);
                    let to_protect = core::mem::take(&mut log.writable_slots);
                    Cleaning {
                        snapshot,
                        to_protect,
                        p2m_to_protect: core::mem::take(&mut d.p2m_writable),
                        steps: 0,
                    }
                }
            };
            let later_step = cleaning.steps > 0;
            cleaning.steps += 1;
            for _ in 0..budget.max(1) {
                let Some(slot) = cleaning.to_protect.pop_first() else {
                    break;
                };
                if let Some(gfn) = d.protect_slot(slot)?
                    && later_step
                {
                    d.mark_dirty(gfn);
                }
            }
            // As many writable p2m entries (vcpus with paging disabled).
            for _ in 0..budget.max(1) {
                let Some(gfn) = cleaning.p2m_to_protect.pop_first() else {
                    break;
                };
                if let Some(p2m) = d.p2m.as_mut() {
                    p2m.set_writable(&mut d.host, gfn, false)?;
                }
                d.stats.add_work(1);
                if later_step {
                    d.mark_dirty(gfn);
                }
            }
            d.pending_flush = d.all_vcpus();
            if cleaning.to_protect.is_empty() && cleaning.p2m_to_protect.is_empty() {
                Ok(CleanProgress::Done(cleaning.snapshot))
            } else {
                d.cleaning = Some(cleaning);
                Ok(CleanProgress::More)
            }
        })
    }

    /// A whole clean, step after step (the guest does not run in between).
    pub fn clean_dirty(&mut self) -> Result<(DirtyBitmap, Flush), EngineError> {
        self.steps_in_one_call(|d| {
            d.clean_step(1024).map(|(progress, f)| match progress {
                CleanProgress::Done(bitmap) => (Some(bitmap), f),
                CleanProgress::More => (None, f),
            })
        })
    }

    /// Removes write access from the leaf entry at `slot`, if it still is a writable leaf
    /// entry; returns the guest frame it mapped.
    fn protect_slot(&mut self, slot: Maddr) -> Result<Option<crate::addr::Gfn>, EngineError> {
        let leaf = self
            .store
            .containing(slot.mfn())
            .is_some_and(|(_, i)| i.key.kind.is_leaf_table());
        if !leaf {
            return Ok(None);
        }
        let entry = self.read_sentry(slot)?;
        let Some(mfn) = self.sentry_frame(entry) else {
            return Ok(None);
        };
        if entry & bits::RW == 0 {
            return Ok(None);
        }
        self.set_sentry(slot, entry & !bits::RW)?;
        Ok(self
            .m2p
            .get(&mfn)
            .and_then(|s| s.iter().next().copied())
            .or(Some(crate::addr::Gfn::new(mfn.raw()))))
    }

    /// One bounded step towards a pool of `pages` pages: grows from the host, or shrinks by
    /// giving back free chunks, evicting shadows when no free chunk is left.
    pub fn set_pool_size_step(
        &mut self,
        pages: usize,
        budget: usize,
    ) -> Result<(ResizeProgress, Flush), EngineError> {
        if pages < self.config.min_pool_pages() {
            return Err(EngineError::BadArgument(
                "pool smaller than the domain's minimum",
            ));
        }
        if pages > DomainConfig::MAX_POOL_PAGES {
            return Err(EngineError::BadArgument(
                "pool larger than DomainConfig::MAX_POOL_PAGES",
            ));
        }
        self.pool_target = pages;
        self.run(|d| {
            let progress = d.pool.resize_step(&mut d.host, pages, budget)?;
            if let ResizeProgress::NeedsEviction { .. } = progress {
                if d.limbo.pages() > 0 {
                    // Pages waiting for a flush hold chunks in use: the host carries the
                    // flush out and calls again, and they are free then.
                    return Err(EngineError::Preempted);
                }
                let mut freed = false;
                for _ in 0..budget.max(1) {
                    if d.out_of_work() {
                        return Ok(ResizeProgress::More);
                    }
                    let progressed = d.reap_one()?
                        || match d.vacate_chunk() {
                            // Its unhooking scan goes on in the next step.
                            Err(EngineError::Preempted) => return Ok(ResizeProgress::More),
                            other => other?,
                        }
                        || d.evict_one()?;
                    if progressed {
                        freed = true;
                    } else {
                        break;
                    }
                }
                if !freed {
                    let before = d.pool.used_pages();
                    d.blow_tables()?;
                    if d.pool.used_pages() == before && d.store.dying_count() == 0 {
                        return Err(EngineError::BadArgument(
                            "the pool cannot shrink below what the vcpus' top-level shadows use",
                        ));
                    }
                }
                return Ok(ResizeProgress::More);
            }
            Ok(progress)
        })
    }

    /// Frees the in-use pool chunk with the fewest pages in use that holds no shadow a vcpu
    /// is using: its shadows are unpinned, unhooked from their parents and torn down, so
    /// that shrinking gives back exactly the chunks it asked to vacate.
    fn vacate_chunk(&mut self) -> Result<bool, EngineError> {
        let chunk_of = |m: Mfn| m.raw() >> crate::pool::CHUNK_ORDER;
        // Chunks holding a top some vcpu runs on are skipped: at most a few per vcpu.
        let candidates: Vec<Mfn> = self
            .pool
            .chunks_by_least_use()
            .take(6 * self.vcpus.len() + 1)
            .collect();
        for base in candidates {
            let heads: Vec<Mfn> = self
                .store
                .shadows_from(base)
                .take_while(|(h, _)| chunk_of(*h) == chunk_of(base))
                .map(|(h, _)| h)
                .collect();
            if heads.iter().any(|&h| self.in_use(h)) {
                continue;
            }
            for head in heads {
                if self.store.is_dying(head) {
                    continue;
                }
                if let Some(dead) = self.store.unpin(head) {
                    self.store.unhash(dead);
                }
                self.unhook(head)?;
                if !self.store.is_dying(head) {
                    self.store.unhash(head);
                }
                self.stats.evictions += 1;
            }
            while !self.out_of_work() && self.reap_one()? {}
            self.pending_flush = self.all_vcpus();
            return Ok(true);
        }
        Ok(false)
    }

    /// A whole resize, step after step.
    pub fn set_pool_size(&mut self, pages: usize) -> Result<Flush, EngineError> {
        self.steps_in_one_call(|d| {
            d.set_pool_size_step(pages, 64)
                .map(|(progress, f)| ((progress == ResizeProgress::Done).then_some(()), f))
        })
        .map(|((), f)| f)
    }

    /// Runs the bounded steps of a long operation one after the other, at most
    /// `MAX_STEPS_IN_ONE_CALL` of them (each makes progress), as one call of the
    /// host's: the host carries out no flush in between, so pages torn down by one step are
    /// not reused by the next ([`Domain::run`] releases held pages only between host calls),
    /// and the flushes of all the steps are handed out together at the end, or owed (see
    /// [`Domain::take_flush`]) when a step fails. A step that needs the host's flush first
    /// answers `Preempted`, which ends the operation here; the host calls again.
    fn steps_in_one_call<T>(
        &mut self,
        mut step: impl FnMut(&mut Self) -> Result<(Option<T>, Flush), EngineError>,
    ) -> Result<(T, Flush), EngineError> {
        // The first step starts the host's call; the ones after it continue it.
        let outer = self.in_one_call;
        let mut flush = Flush::NONE;
        let mut steps = 0u32;
        let result = loop {
            steps += 1;
            if steps > MAX_STEPS_IN_ONE_CALL {
                break Err(EngineError::Internal("a long operation made no progress"));
            }
            match step(self) {
                Ok((Some(value), f)) => break Ok((value, flush.merge(f))),
                Ok((None, f)) => flush = flush.merge(f),
                Err(e) => break Err(e),
            }
            self.in_one_call = true;
        };
        self.in_one_call = outer;
        if result.is_err() && !flush.is_empty() && self.failed.is_none() {
            self.pending_flush = self.pending_flush.union(flush.into_vcpus());
            self.flush_owed = true;
        }
        result
    }
}

/// The most steps a whole-operation helper runs: far more than the largest pool needs (a
/// step gives back or protects at least one chunk's or one budget's worth).
const MAX_STEPS_IN_ONE_CALL: u32 = 1 << 20;

//! Domain teardown in bounded steps: every shadow, pool chunk, p2m table and log-dirty
//! structure goes back to the host, at most a budget of them per call.
//!
//! The first step stops every vcpu (no root, no tops) and owes a TLB flush to all of them;
//! from then on the domain accepts no operation but teardown steps
//! ([`EngineError::DomainFailed`]). A failed domain is torn down the same way.

use super::{Domain, EngineError};
use crate::flush::{Flush, VcpuSet};
use crate::hash::ShadowStore;
use crate::host::MachineMemory;
use crate::pool::ResizeProgress;

/// How far a teardown got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TeardownProgress {
    /// More to give back: call [`Domain::teardown_step`] again.
    More,
    /// Everything the domain held is back with the host.
    Done,
}

/// What a teardown gives back next.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum Teardown {
    /// Shadows, back to the pool.
    #[default]
    Shadows,
    /// Pool chunks, back to the host.
    Pool,
    /// P2m tables, back to the host.
    P2m,
    /// Nothing left.
    Done,
}

impl<H: MachineMemory> Domain<H> {
    /// One bounded step of tearing the domain down: gives back at most `budget` (at least
    /// one) shadows, pool chunks or p2m tables. The first step stops every vcpu and returns
    /// the TLB flush their hardware needs; the host must not run a vcpu of the domain again.
    pub fn teardown_step(
        &mut self,
        budget: usize,
    ) -> Result<(TeardownProgress, Flush), EngineError> {
        self.stats.start_call();
        let budget = budget.max(1);
        let mut flush = Flush::NONE;
        let stage = match self.teardown {
            Some(stage) => stage,
            None => {
                self.stop_vcpus();
                flush = Flush::of(self.all_vcpus());
                Teardown::Shadows
            }
        };
        let next = match stage {
            Teardown::Shadows => self.free_shadows(budget)?,
            Teardown::Pool => self.drain_pool(budget)?,
            Teardown::P2m => self.free_p2m(budget),
            Teardown::Done => Teardown::Done,
        };
        self.teardown = Some(next);
        let progress = if next == Teardown::Done {
            TeardownProgress::Done
        } else {
            TeardownProgress::More
        };
        Ok((progress, flush))
    }

    /// Whether a teardown has started (the domain accepts nothing else).
    pub fn is_torn_down(&self) -> bool {
        self.teardown.is_some()
    }

    /// Takes every vcpu off its shadows and forgets the state of operations under way.
    fn stop_vcpus(&mut self) {
        for vcpu in &mut self.vcpus {
            vcpu.tops = [None; 4];
            vcpu.vcpu_top = None;
            vcpu.root = None;
            vcpu.pair = None;
        }
        self.pending_reload = self.all_vcpus();
        self.pending_flush = VcpuSet::NONE;
        self.needs_root = VcpuSet::NONE;
        self.release_reserve();
        self.log_dirty = None;
        self.cleaning = None;
        self.remove = crate::remove::RemoveState::default();
        self.forget_out_of_sync();
    }

    /// Gives up to `budget` shadows, and pages waiting for a flush, back to the pool. Their
    /// entries are not cleared: no vcpu runs on them any more, and the pool's frames go
    /// back to the host next.
    fn free_shadows(&mut self, budget: usize) -> Result<Teardown, EngineError> {
        for _ in 0..budget {
            if let Some((head, order)) = self.limbo.take_one() {
                self.pool.free(head, order)?;
                self.stats.add_work(1);
                continue;
            }
            let Some((head, order)) = self.store.shadows().next().map(|(h, i)| (h, i.order)) else {
                self.store = ShadowStore::new();
                self.superpages = crate::superpage::SuperpageIndex::default();
                #[cfg(feature = "rmap")]
                if self.rmap.is_some() {
                    self.rmap = Some(crate::rmap::ReverseMap::new());
                }
                return Ok(Teardown::Pool);
            };
            self.store.forget(head);
            self.pool.free(head, order)?;
            self.stats.add_work(1);
        }
        Ok(Teardown::Shadows)
    }

    /// Gives up to `budget` pool chunks back to the host.
    fn drain_pool(&mut self, budget: usize) -> Result<Teardown, EngineError> {
        let before = self.pool.total_pages();
        let progress = self.pool.drain_step(&mut self.host, budget)?;
        let chunks = (before - self.pool.total_pages()) / crate::pool::CHUNK_PAGES;
        self.stats.add_work(chunks as u64);
        match progress {
            ResizeProgress::Done => Ok(Teardown::P2m),
            ResizeProgress::More => Ok(Teardown::Pool),
            ResizeProgress::NeedsEviction { .. } => Err(EngineError::Internal(
                "a pool chunk in use after every shadow went",
            )),
        }
    }

    /// Gives up to `budget` p2m tables back to the host.
    fn free_p2m(&mut self, budget: usize) -> Teardown {
        self.m2p.clear();
        self.p2m_writable.clear();
        self.owned.clear();
        let Some(p2m) = self.p2m.as_mut() else {
            return Teardown::Done;
        };
        let before = p2m.table_count();
        let done = p2m.teardown_step(&mut self.host, budget);
        self.stats.add_work((before - p2m.table_count()) as u64);
        if done { Teardown::Done } else { Teardown::P2m }
    }
}

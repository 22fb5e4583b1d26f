//! Deferred free of shadow pages (KVM's zap-then-commit): a shadow torn down while some vcpu's
//! TLB or paging-structure caches may still walk it is not given back to the pool until a
//! flush of every vcpu has been handed out, and the host has carried it out (the host does so
//! before its next call into the domain). Until then the page cannot be reused at another
//! level, where a stale paging-structure-cache entry would read shadow entries as the wrong
//! kind of table.

use alloc::vec::Vec;

use crate::addr::Mfn;
use crate::pool::Pool;

/// Pool blocks waiting for a flush before they can be reused.
#[derive(Clone, Debug, Default)]
pub(crate) struct Limbo {
    /// Torn down since the last flush of every vcpu was handed out.
    awaiting_flush: Vec<(Mfn, u8)>,
    /// Covered by a flush handed out to the host: free once the host calls again.
    flushed: Vec<(Mfn, u8)>,
}

impl Limbo {
    /// A block torn down now.
    pub(crate) fn add(&mut self, head: Mfn, order: u8) {
        self.awaiting_flush.push((head, order));
    }

    /// Whether a flush must be handed out before the blocks torn down so far can be reused.
    pub(crate) fn owes_flush(&self) -> bool {
        !self.awaiting_flush.is_empty()
    }

    /// A flush of every vcpu was handed out: what was torn down before it is safe once the
    /// host calls again.
    pub(crate) fn flush_handed_out(&mut self) {
        self.flushed.append(&mut self.awaiting_flush);
    }

    /// The host called again, so the flushes it was handed are done: the covered blocks go
    /// back to the pool.
    pub(crate) fn release(&mut self, pool: &mut Pool) -> Result<(), crate::pool::PoolError> {
        for (head, order) in core::mem::take(&mut self.flushed) {
            pool.free(head, order)?;
        }
        Ok(())
    }

    /// Takes one block out, whatever it waits for (teardown: no vcpu runs any more).
    pub(crate) fn take_one(&mut self) -> Option<(Mfn, u8)> {
        self.flushed.pop().or_else(|| self.awaiting_flush.pop())
    }

    /// Pages held (allocated in the pool, owned by no shadow).
    pub(crate) fn pages(&self) -> usize {
        self.awaiting_flush
            .iter()
            .chain(&self.flushed)
            .map(|&(_, order)| 1usize << order)
            .sum()
    }
}

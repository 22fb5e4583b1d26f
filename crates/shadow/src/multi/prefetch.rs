//! Prefetch of a leaf table's neighbours on a fill (Xen's `sh_prefetch` for ordinary L1
//! shadows): after the entry a fault needed, the following shadow entries are filled from
//! their guest entries while they are empty, so that a guest walking a table's pages in
//! order (a process re-touching its memory after its shadows were evicted or blown, a
//! context switch back to a process whose top was evicted) pays one fault per run of
//! entries instead of one per page.
//!
//! Each prefetched entry is exactly what a fault on it would write ([`Engine::leaf_sentry`]:
//! never more than the guest allows, read-only while D is clear, while the target is a
//! shadowed page table or clean for log-dirty; the not-present marker for a not-present
//! guest entry), so the auditor's expected entry for it is unchanged. The prefetch stops at
//! the first entry that is not empty: that run was filled before.

use super::{Engine, Supported};
use crate::addr::{Gpa, Gva, Maddr};
use crate::domain::guest_mem::FrameCache;
use crate::domain::{Domain, EngineError};
use crate::host::MachineMemory;
use crate::paging::PagingMode;
use crate::types::Flavor;

/// Entries a fill of an ordinary L1 shadow entry also fills after the one it needs.
pub(super) const PREFETCH_LEAVES: u64 = 32;

impl<G: PagingMode, S: PagingMode> Engine<G, S>
where
    (G, S): Supported,
{
    /// Fills the empty shadow entries after `slot`, the leaf a fill for `va` just wrote
    /// from the guest entry at `gl1e`, up to [`PREFETCH_LEAVES`] of them and the end of
    /// the guest table and of the shadow; stops at the first entry already written.
    pub(super) fn prefetch_leaves<H: MachineMemory>(
        d: &mut Domain<H>,
        frames: &FrameCache,
        va: Gva,
        gl1e: Gpa,
        slot: Maddr,
        flavor: Flavor,
    ) -> Result<(), EngineError> {
        // An out-of-sync table's other entries may differ from its snapshot, which its
        // shadows must follow until the next resync compares against it.
        if Self::l1_out_of_sync(d, frames, gl1e) {
            return Ok(());
        }
        let first = Self::soffset(1, va.raw());
        let Some(base) = slot.raw().checked_sub(first) else {
            return Err(EngineError::Internal("a leaf slot below its shadow"));
        };
        for k in 1..=PREFETCH_LEAVES {
            let gaddr = gl1e.raw() + k * G::ENTRY_BYTES;
            let offset = Self::soffset(1, va.raw().wrapping_add(k << 12));
            // Stop at the end of the guest table or of the shadow.
            if gaddr >> 12 != gl1e.raw() >> 12 || offset <= first {
                break;
            }
            let s = Maddr::new(base + offset);
            if d.read_sentry(s)? != 0 {
                break;
            }
            let Some(gentry) = Self::read_gentry(d, frames, Gpa::new(gaddr)) else {
                break;
            };
            let entry = Self::leaf_sentry(d, frames, gentry, flavor)?;
            if entry != 0 {
                d.set_sentry(s, entry)?;
                d.stats.prefetched += 1;
            }
        }
        Ok(())
    }
}

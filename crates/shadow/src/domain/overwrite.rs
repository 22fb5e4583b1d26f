//! Unshadowing a page table before an emulated write overwrites all of it (issue 12,
//! item 4): a REP STOS chunk or a page-sized REP MOVS that covers a whole shadowed page
//! (a guest zeroing a freed table, copying a page over it) would otherwise be validated
//! entry by entry into every shadow of the page, and the shadows then reaped by the
//! teardown hint. Unshadowing first is always correct (the guest's next use of the page as
//! a table shadows it again, from what it holds then), and the write then reaches a page
//! with no shadows, so nothing is validated.
//!
//! A top-level table a vcpu runs on is left shadowed (it would be shadowed again at once to
//! give the vcpu a root): its write is validated as before.

use super::{Domain, EngineError};
use crate::addr::{Gpa, PAGE_SIZE};
use crate::host::MachineMemory;
use crate::p2m::P2mType;

impl<H: MachineMemory> Domain<H> {
    /// Before the `pieces` of one emulated write are written: unshadows every shadowed
    /// page table a piece covers whole (when the zeroed-page teardown hint is on). Returns
    /// how many pages it unshadowed.
    pub(crate) fn unshadow_overwritten(
        &mut self,
        pieces: &[(Gpa, &[u8])],
    ) -> Result<u64, EngineError> {
        if !self.config.teardown.zeroed_page {
            return Ok(0);
        }
        let mut unshadowed = 0;
        for &(gpa, bytes) in pieces {
            if gpa.offset() != 0 || bytes.len() as u64 != PAGE_SIZE {
                continue;
            }
            let Some((mfn, P2mType::Ram)) = self.guest_frame(gpa.gfn()) else {
                continue;
            };
            if !self.store.is_page_table(mfn) || self.is_top_in_use(mfn) {
                continue;
            }
            self.unshadow_hinted(mfn)?;
            self.stats.overwrite_unshadows += 1;
            unshadowed += 1;
        }
        if unshadowed > 0 {
            self.rebuild_roots()?;
        }
        Ok(unshadowed)
    }
}

//! Finding shadow entries without reverse maps (seed slides "No reverse maps", "future
//! optimization 1", "future optimization 3", "future optimization 5"): remove write access
//! to a frame, remove every mapping of a frame, and unshadow a page. Cheap guesses first,
//! brute force last, and every brute-force search bounded.
//!
//! # Remove write access (a page becomes a page table)
//!
//! [`Domain::remove_write_access`](crate::domain::Domain) runs when a guest frame gets its
//! first shadow. The per-frame count of writable shadow L1 entries ([`FrameMeta::writable`],
//! kept exact by every shadow entry write) says when the search is complete, so each method
//! stops the search as soon as the count reaches zero:
//!
//! - **(a) the last-writable pointer** (seed optimisation 1): the shadow L1 entry that last
//!   took the frame's writable count from zero to one. A page about to become a page table
//!   usually has exactly that one writable mapping (the kernel zeroed it through it).
//! - **(b) the guest OS's linear maps** ([`LinearMapHint`], given in
//!   [`DomainConfig::linear_maps`](crate::domain::DomainConfig) or with
//!   `Domain::set_linear_maps`): a direct map (64-bit Linux at `0xffff_8880_0000_0000`, a
//!   32-bit lowmem map at `0xc000_0000`) says at which linear address the frame's guest frame
//!   is mapped; a self-map (a recursive slot, as Windows keeps) says where the page table
//!   covering the faulting address is mapped. Each guessed address is looked up by walking
//!   the shadows from the top-level shadows in use (each vcpu's, then the most recently used
//!   pinned ones, at most [`HINT_TOPS`]) down to the shadow L1 entry, which loses RW if it
//!   maps the frame writable. A wrong guess costs a few reads and changes nothing.
//! - **(c) a brute-force scan of every L1 shadow, in bounded steps with a continuation.**
//!   The scan's cursor (a shadow head and an offset) lives in the domain and moves round
//!   the L1 shadows in head order; every frame whose removal is pending is served by the
//!   same pass (so vcpus promoting different frames do not undo each other's progress).
//!
//! ## Why the scan can stop half-way, and why that is sound
//!
//! A page fault scans at most [`DomainConfig::scan_budget`](crate::domain::DomainConfig)
//! entries. If the frame still has writable mappings then, the engine **refuses to shadow
//! it yet**: the shadow it was making is dropped (it is empty and linked nowhere), and the
//! fault is answered [`FaultOutcome::Spurious`](crate::multi::FaultOutcome): the guest
//! retries the access, faults again, and the next fault continues the scan where it
//! stopped. The frame is not a page table until its count is zero, so the invariant "no
//! writable mapping of a shadowed page table" holds at every step; in between, the guest
//! may write the page natively, and nothing is out of sync because nothing shadows it.
//!
//! The guest cannot re-create a writable mapping behind the cursor meanwhile: while a
//! frame waits for the scan, every shadow entry written for it is made read-only
//! (`Domain::admit_leaf`), and a write to it faults and is emulated (so the guest makes
//! progress without a writable mapping). One pass is therefore complete. A CR3 load waits
//! the same way before it changes anything (`Domain::prepare_top_frame`): it answers
//! [`EngineError::Preempted`](crate::domain::EngineError) and the host runs it again. Only a
//! root rebuild at the end of an operation that already changed things (an unshadow of a
//! top in use) cannot wait, and finishes its scan in the call, bounded by the pool.
//!
//! # Remove every mapping (a p2m change, a frame leaving the domain)
//!
//! Only writable mappings are counted, so no cheap method can prove that a frame has no
//! read-only mapping left: [`Domain::remove_all_mappings`](crate::domain::Domain) always
//! scans every L1 shadow, in bounded steps of
//! [`DomainConfig::call_work_budget`](crate::domain::DomainConfig) entries. A host call
//! (`set_p2m`, `remove_frame`) whose scan is not done returns
//! [`EngineError::Preempted`](crate::domain::EngineError) with the p2m unchanged and the
//! cursor kept; the host calls it again with the same arguments. Meanwhile no shadow entry
//! may map the frame (faults that would are retried), so one pass is complete, and the
//! writable count checks it at the end. With a reverse map, the frame's recorded entries
//! are removed, as many per call.
//!
//! # Unshadow (a page stops being a page table)
//!
//! Every shadow of the frame is unpinned and unhooked from the upper shadow entries that
//! point at it: the shadow's up pointer first (the last upper entry that took a reference),
//! then, only while references remain (the reference count proves completeness), a scan of
//! the shadows one level up, which stops as soon as the count reaches zero. Unshadowing is
//! always correct: the guest's next use of the page as a page table shadows it again.
//! Beyond an emulation that cannot be done, a page is unshadowed by two heuristics, both in
//! `domain/emulate_ops.rs`:
//!
//! - **the fork/exit heuristic** (seed optimisation 3, Xen's "early unshadow"): after
//!   [`DomainConfig::early_unshadow_writes`](crate::domain::DomainConfig) consecutive
//!   emulated writes by one vcpu, each leaving every entry it touched not present, into the
//!   same page table, with no other shadow fault of that vcpu in between, the page is
//!   unshadowed instead of emulating the remaining ~500 writes of a teardown;
//! - **teardown hints** (seed optimisation 5, [`TeardownHints`]): a page table zeroed whole
//!   by one emulated write (a REP STOS chunk), or written with an entry that cannot be one
//!   (present, with reserved bits set at every level the page is shadowed at: the page was
//!   recycled as data), is unshadowed at once.
//!
//! Neither unshadows a top-level shadow a vcpu is running on (it would only be rebuilt).
//!
//! [`FrameMeta::writable`]: crate::types::FrameMeta::writable

mod hints;
mod mappings;
mod scan;
pub(crate) mod sweep;
mod unshadow;
mod write_access;

use alloc::vec::Vec;

pub use hints::{HINT_TOPS, LinearMapHint, TeardownHints};

use crate::addr::{Gva, Mfn};
use crate::domain::{Domain, EngineError};
use crate::host::MachineMemory;
use crate::multi::FaultOutcome;

/// The page fault in progress, as the searches see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FaultContext {
    /// The faulting linear address (where a self-map hint looks for page tables).
    pub(crate) va: Gva,
}

/// What the searches remember between engine calls.
#[derive(Clone, Debug, Default)]
pub(crate) struct RemoveState {
    /// The brute-force scan for writable mappings and the frames waiting for it.
    pub(crate) scan: scan::WriteScan,
    /// The page fault being handled, if any: a write-access removal inside one may be
    /// deferred (the fault is retried) instead of finishing in the call.
    pub(crate) fault: Option<FaultContext>,
    /// Per vcpu: the page table its last emulated writes cleared entries of, and how many
    /// such writes in a row (the fork/exit heuristic).
    pub(crate) early: Vec<Option<(Mfn, u32)>>,
    /// Whether vcpu roots are being rebuilt at the end of an operation (a CR3 load then
    /// cannot wait for a scan).
    pub(crate) rebuilding: bool,
    /// The unshadow waiting for its unhooking scan, if any.
    pub(crate) unhooking: Option<unshadow::Unhooking>,
    /// The removal of every mapping of a frame under way across calls, if any.
    pub(crate) mappings: Option<mappings::MappingRemoval>,
}

impl<H: MachineMemory> Domain<H> {
    /// Runs the page fault `fault` of vcpu `v` at `va` with the searches' context: a
    /// write-access removal that runs out of budget makes the fault answer
    /// [`FaultOutcome::Spurious`] (the guest retries, the scan continues), and any outcome
    /// but an emulation ends the vcpu's run of emulated teardown writes (the fork/exit
    /// heuristic counts writes with no other fault in between).
    pub(crate) fn shadow_fault(
        &mut self,
        v: usize,
        va: Gva,
        fault: impl FnOnce(&mut Self) -> Result<FaultOutcome, EngineError>,
    ) -> Result<FaultOutcome, EngineError> {
        self.remove.fault = Some(FaultContext { va });
        let result = fault(self);
        self.remove.fault = None;
        let outcome = match result {
            Err(EngineError::Preempted) => FaultOutcome::Spurious,
            other => other?,
        };
        if !matches!(outcome, FaultOutcome::Emulate { .. }) {
            self.note_fault(v);
        }
        Ok(outcome)
    }

    /// A shadow fault of vcpu `v` other than a write to emulate: its run of consecutive
    /// emulated teardown writes (the fork/exit heuristic) is over.
    pub(crate) fn note_fault(&mut self, v: usize) {
        if let Some(slot) = self.remove.early.get_mut(v) {
            *slot = None;
        }
    }
}

//! Shadow page tables for x86 virtualization, after Xen's "Shadow2" (Deegan and Fetterman,
//! Xen Summit 2006).
//!
//! The engine is `no_std` + `alloc`: a hypervisor, VMM or simulator embeds it, gives it a
//! view of machine memory, and calls it on page faults, control-register writes, INVLPG and
//! control operations. See `docs/ARCHITECTURE.md` in the repository for the module map.
//!
//! # Bounded work
//!
//! No call does work that grows with the pool or with guest memory: each reads or writes at
//! most [`DomainConfig::call_work_bound`] shadow and p2m entries
//! ([`DomainConfig::call_work_budget`] plus a small constant), and
//! [`stats::Stats::last_call_work`] / [`stats::Stats::max_call_work`] count them. A long
//! operation stops when its budget is spent and leaves a continuation in the domain:
//!
//! - **Host operations** go in steps. Step APIs answer "more" or "done":
//!   [`Domain::clean_step`], [`Domain::enable_log_dirty_step`],
//!   [`Domain::set_pool_size_step`], [`Domain::teardown_step`] (the whole-operation helpers
//!   such as [`Domain::enable_log_dirty`] just loop over them). `set_p2m` and `remove_frame`
//!   answer [`EngineError::Preempted`] with the p2m unchanged and the cursor kept: the host
//!   calls again with the same arguments. Meanwhile no shadow entry may map the frame
//!   being removed (a fault that would map it is retried), so one pass finds every mapping.
//! - **Guest-triggered operations** (page faults, CR3 loads, mode changes) continue on the
//!   retry of the instruction: a page fault answers [`FaultOutcome::Spurious`]; a CR3 load
//!   or mode change answers [`EngineError::Preempted`] having changed nothing but the
//!   search's progress, and the host re-runs it without advancing RIP. While a frame waits
//!   for the write-access scan, no writable mapping of it can be made (writes to it are
//!   emulated), so one pass of the scan is complete.
//! - Shadows thrown away (eviction, blow-tables, a pool shrink) are queued to die and torn
//!   down while the budget lasts; an allocation that still finds no room answers
//!   `Preempted`, and the retry goes on tearing down.
//! - Fast-path MMIO entries are never searched for: the fast path checks the p2m (a gfn
//!   that became RAM makes the entry a miss, refilled by the slow path).
#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

pub mod addr;
pub mod paging;

pub mod audit;
pub mod domain;
pub mod emulate;
pub mod flush;
pub mod hash;
pub mod host;
pub mod log_dirty;
pub mod multi;
pub mod p2m;
pub mod pool;
pub mod remove;
#[cfg(feature = "rmap")]
pub mod rmap;
pub mod stats;
pub mod superpage;
#[cfg(test)]
pub(crate) mod testmem;
pub mod types;

pub use addr::{Gfn, Gpa, Gva, Maddr, Mfn, PhysAddr};
pub use domain::{Domain, DomainConfig, EngineError, ShadowOp, ShadowOpResult};
pub use flush::{Flush, VcpuSet};
pub use host::MachineMemory;
pub use multi::{FaultOutcome, Pair};

//! Shadow page tables for x86 virtualization, after Xen's "Shadow2" (Deegan and Fetterman,
//! Xen Summit 2006).
//!
//! The engine is `no_std` + `alloc`: a hypervisor, VMM or simulator embeds it, gives it a
//! view of machine memory, and calls it on page faults, control-register writes, INVLPG and
//! control operations. See `docs/ARCHITECTURE.md` in the repository for the module map.
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
#[cfg(test)]
pub(crate) mod testmem;
pub mod types;

pub use addr::{Gfn, Gpa, Gva, Maddr, Mfn, PhysAddr};
pub use domain::{Domain, DomainConfig, EngineError, ShadowOp, ShadowOpResult};
pub use flush::{Flush, VcpuSet};
pub use host::MachineMemory;
pub use multi::{FaultOutcome, Pair};

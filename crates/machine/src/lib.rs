//! The simulated machine: sparse machine memory, vcpus, and a CPU model that translates
//! through any root (the guest's own tables, or the engine's shadow tables) with a TLB and
//! paging-structure caches.
//! Also the access matrix: the walker checked against a separate rules function.

pub mod backend;
pub mod churn;
pub mod cpu;
pub mod fuzz;
mod fx;
pub mod hw_walk;
pub mod matrix;
pub mod memory;
pub mod oracle;
pub mod p2m_memo;
pub mod psc;
pub mod sim;
pub mod tlb;

pub use cpu::{CachedEntry, Cpu, CpuFault, CpuStats, CpuTranslation};
pub use memory::{GuestPhysView, ReserveError, SparseMemory};
pub use psc::{PagingStructureCache, PscEntry, PscStats};
pub use tlb::{Tlb, TlbEntry, TlbStats};

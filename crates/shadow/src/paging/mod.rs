//! x86 paging: entry formats, paging modes as types, and the architectural guest walker.

pub mod bits;
pub mod control;
pub mod memory;
pub mod mode;
pub mod walk;

pub use control::{
    Access, AccessKind, ControlState, CpuFeatures, PagingLevels, PfErrorCode, Privilege,
};
pub use memory::{
    Exchange, MemError, PhysMem, serial_compare_exchange_u32, serial_compare_exchange_u64,
};
pub use mode::{FourLevel, NoPaging, PageSize, PagingMode, ThreeLevel, TwoLevel};
pub use walk::{
    AdUpdate, MAX_RACED_WALKS, PathEntry, PdptLoadError, Perms, Translation, WalkEnv, WalkFailure,
    WalkFault, WalkPath, WalkResult, load_pae_pdptes, protection_fault, walk, walk_mode,
};

#[cfg(test)]
mod tests;

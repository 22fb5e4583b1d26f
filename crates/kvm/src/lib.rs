//! The KVM backend: real x86 execution of guests whose CR3, as KVM sees it, is a shadow root.
//!
//! The VM's memory is the engine's machine memory ([`memory`]); a small hypervisor area
//! ([`hyper`]) sits in the engine's hypervisor hole of every shadow tree; [`vm`] runs a
//! vcpu on the engine's roots and carries page faults, emulations and flushes between the
//! hardware and the engine; [`probe`] says what this host can run.

mod backend;
pub mod executor;
pub mod exits;
pub mod hyper;
#[allow(unsafe_code)]
mod kicks;
pub mod machine;
pub mod memory;
pub mod native;
pub mod probe;
pub mod shadowed;
pub mod sregs;
#[allow(unsafe_code)]
mod vm;
#[allow(unsafe_code)]
mod watchdog;

pub use backend::{VcpuAnswer, VcpuOp};
pub use exits::{ExceptionFrame, ExitCounts, GuestExit};
pub use machine::{KvmConfig, KvmMachine};
pub use memory::KvmMemory;
pub use native::NativeBackend;
pub use probe::{Probe, Unavailable};
pub use shadowed::{KvmBackend, KvmBackendConfig};

use shadow2::EngineError;

/// Why a KVM operation failed.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// The host cannot run the backend.
    #[error("KVM unavailable: {0}")]
    Unavailable(#[from] Unavailable),
    /// A KVM ioctl failed.
    #[error("KVM: {0}")]
    Kvm(#[from] kvm_ioctls::Error),
    /// The VM's memory could not be set up or reached.
    #[error("VM memory: {0}")]
    Memory(String),
    /// The VM has no free frames left.
    #[error("the VM's memory has no free frames left")]
    OutOfFrames,
    /// Assembling hypervisor or guest code failed.
    #[error("assembler: {0}")]
    Asm(String),
    /// The engine refused or failed.
    #[error("engine: {0}")]
    Engine(#[from] EngineError),
    /// The guest died (triple fault, KVM internal error, an exception in ring 0).
    #[error("guest died at rip {rip:#x}: {reason}")]
    Died {
        /// What KVM or the stub reported.
        reason: String,
        /// The last RIP known.
        rip: u64,
    },
    /// The guest ran past the watchdog without an exit the VMM could report.
    #[error("watchdog: no reportable exit within {seconds} s (rip {rip:#x})")]
    Watchdog {
        /// The deadline.
        seconds: f64,
        /// The RIP when it was stopped.
        rip: u64,
    },
}

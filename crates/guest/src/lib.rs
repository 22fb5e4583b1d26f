//! Guest OS models and workloads, written once against the guest-operations interface
//! ([`ops::GuestOps`]) and run on any backend: the simulator (`shadow2-machine`) or KVM.

#![forbid(unsafe_code)]

pub mod counting;
pub mod kernel;
pub mod ops;
pub mod outcomes;
mod rng;
pub mod spec;
pub mod trace;
pub mod workloads;

use core::fmt;

pub use counting::{Counters, Counting};
pub use ops::{Event, Fault, GuestOps, OpError};
pub use spec::{GuestModel, PairName, RunSpec, SpecError, Workload};

/// Why a run stopped early.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunError {
    /// The run cannot be set up as asked.
    Spec(SpecError),
    /// The backend failed.
    Backend(String),
    /// The guest kernel itself crashed: a fault it cannot handle (in a correct run this
    /// means the hypervisor gave it a wrong result).
    GuestPanic(String),
}

impl fmt::Display for RunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunError::Spec(e) => e.fmt(f),
            RunError::Backend(e) => write!(f, "backend failed: {e}"),
            RunError::GuestPanic(e) => write!(f, "guest kernel panic: {e}"),
        }
    }
}

impl From<SpecError> for RunError {
    fn from(e: SpecError) -> RunError {
        RunError::Spec(e)
    }
}

/// Runs `spec` on `backend` (created with [`RunSpec::ram_frames`] of RAM, the model's
/// vcpus and the pair's shadow levels), calling `progress(done, total)` as workload units
/// finish. Returns what the guest did.
pub fn run<B: GuestOps>(
    spec: &RunSpec,
    backend: B,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Counters, RunError> {
    spec.validate()?;
    let mut ops = Counting::new(backend);
    let (mut kernel, init) = kernel::Kernel::boot(spec, &mut ops)?;
    workloads::run(&mut kernel, init, spec, progress)?;
    drop(kernel);
    Ok(ops.counters())
}

/// The linear maps the model's kernel keeps, as hints for the engine's search for
/// writable mappings of a new page table (what a hypervisor configures per guest OS).
pub fn linear_map_hints(spec: &RunSpec) -> Vec<shadow2::remove::LinearMapHint> {
    use shadow2::remove::LinearMapHint;
    let frames = spec.ram_frames();
    match kernel::arch::Arch::of(spec).levels {
        4 => vec![LinearMapHint::linux_x86_64_direct_map(frames)],
        3 => vec![LinearMapHint::windows_pae_self_map()],
        _ => vec![LinearMapHint::linux_x86_32_lowmem(frames)],
    }
}

//! Native KVM: the guest on its own page tables under KVM's paging, no engine. The third
//! backend of the differential.

use std::process::ExitCode;

use shadow2_guest::RunSpec;
use shadow2_kvm::Probe;

use crate::kvm_cmd;
use crate::kvmrun::{Comparison, HostProblem, PageReader, Recorded};

/// Why this build cannot run native KVM.
const NOT_BUILT: &str = "this build has no native KVM backend yet";

/// `run --backend native`.
pub fn run(_probe: &Probe, _spec: &RunSpec, _pool: usize, _json: bool) -> Result<ExitCode, String> {
    Ok(kvm_cmd::host_problem(&HostProblem(NOT_BUILT.into())))
}

/// Runs `spec` natively and compares it with `reference`: `Ok(Err(why))` when native KVM
/// cannot run the guest.
pub fn compare_with(
    _probe: &Probe,
    _spec: &RunSpec,
    _reference: &Recorded,
    _reference_memory: PageReader<'_>,
) -> Result<Result<Comparison, String>, String> {
    Ok(Err(NOT_BUILT.into()))
}

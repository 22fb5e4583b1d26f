//! The trace header: what was run, on what, so that a replay can build the same backend.

use serde::{Deserialize, Serialize};

use crate::spec::{GuestModel, PairName, RunSpec, Workload};

/// The JSON header at the start of a trace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceHeader {
    /// The format version (the recorder writes [`super::VERSION`]; a reader checks that it
    /// equals the binary version field).
    pub version: u16,
    /// The guest model's command-line name (`linux64`...).
    pub guest: String,
    /// The workload's command-line name (`forkwait`...).
    pub workload: String,
    /// The workload size.
    pub size: u64,
    /// The paging pair (`4on4`...).
    pub pair: String,
    /// The seed of the model's random choices.
    pub seed: u64,
    /// Vcpus of the recorded backend (the recorder fills it in from the backend).
    pub vcpus: usize,
    /// Guest RAM of the recorded backend, in 4 KiB frames (filled in from the backend).
    pub ram_frames: u64,
    /// The backend that was recorded (`sim`, `kvm-shadow`...), for information.
    pub backend: String,
    /// What the loader placed, for information (free text, may be empty). The image bytes
    /// themselves are in the trace as `load_image` records.
    #[serde(default)]
    pub image: String,
}

impl TraceHeader {
    /// The header of a run of `spec` on the backend named `backend`.
    pub fn for_run(spec: &RunSpec, backend: impl Into<String>) -> TraceHeader {
        TraceHeader {
            version: super::VERSION,
            guest: spec.guest.name().to_owned(),
            workload: spec.workload.name().to_owned(),
            size: spec.size,
            pair: spec.pair.to_string(),
            seed: spec.seed,
            vcpus: spec.guest.vcpus(),
            ram_frames: spec.ram_frames(),
            backend: backend.into(),
            image: String::new(),
        }
    }

    /// The run this header names, or why its names do not parse.
    pub fn run_spec(&self) -> Result<RunSpec, String> {
        let guest = GuestModel::from_name(&self.guest)
            .ok_or_else(|| format!("unknown guest model {:?}", self.guest))?;
        let workload = Workload::from_name(&self.workload)
            .ok_or_else(|| format!("unknown workload {:?}", self.workload))?;
        let pair =
            PairName::parse(&self.pair).ok_or_else(|| format!("unknown pair {:?}", self.pair))?;
        Ok(RunSpec {
            guest,
            workload,
            size: self.size,
            pair,
            seed: self.seed,
        })
    }
}

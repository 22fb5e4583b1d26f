//! What this host's KVM can run: `/dev/kvm`, its API version, the MAXPHYADDR guests see, and
//! which shadow paging modes the hardware accepts (PVM, for one, pages only in long mode),
//! hence which guest-on-shadow pairs the backend runs and why it skips the others.

use std::fmt;

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::Kvm;
use shadow2::Pair;
use shadow2::paging::PagingLevels;

use crate::sregs;

/// The KVM API version every kvm-ioctls user expects.
const KVM_API_VERSION: i32 = 12;

/// What the host can do.
#[derive(Debug, Clone)]
pub struct Probe {
    /// KVM's API version.
    pub api_version: i32,
    /// MAXPHYADDR from KVM's supported CPUID leaf 0x80000008.
    pub maxphyaddr: u8,
    /// The pairs this host runs.
    pub runnable: Vec<Pair>,
    /// The pairs it skips, each with its reason.
    pub skipped: Vec<(Pair, String)>,
}

/// Why the backend cannot run at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unavailable {
    /// `/dev/kvm` is missing or cannot be opened.
    #[error("/dev/kvm cannot be opened: {0}")]
    NoDevice(String),
    /// The API version is not the stable one.
    #[error("KVM API version {0}, expected {KVM_API_VERSION}")]
    ApiVersion(i32),
    /// A KVM call the backend needs failed.
    #[error("KVM cannot {what}: {why}")]
    Feature {
        /// What was tried.
        what: &'static str,
        /// The error.
        why: String,
    },
    /// No shadow paging mode works on this host.
    #[error("no paging mode usable for shadows")]
    NoPaging,
}

fn feature(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> Unavailable {
    move |e| Unavailable::Feature {
        what,
        why: e.to_string(),
    }
}

impl Probe {
    /// Probes the host. Each shadow mode is tried on a scratch vcpu: the registers that
    /// select it are set and read back (PVM silently drops CR0.PG outside long mode).
    pub fn run() -> Result<Probe, Unavailable> {
        let kvm = Kvm::new().map_err(|e| Unavailable::NoDevice(e.to_string()))?;
        let api_version = kvm.get_api_version();
        if api_version != KVM_API_VERSION {
            return Err(Unavailable::ApiVersion(api_version));
        }
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(feature("report its supported CPUID"))?;
        let maxphyaddr = cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == 0x8000_0008)
            .map_or(36, |e| (e.eax & 0xff) as u8);
        let vm = kvm.create_vm().map_err(feature("create a VM"))?;
        let vcpu = vm.create_vcpu(0).map_err(feature("create a vcpu"))?;
        let mut runnable = Vec::new();
        let mut skipped = Vec::new();
        for shadow in [PagingLevels::Two, PagingLevels::Three, PagingLevels::Four] {
            let accepted = sregs::paging_sticks(&vcpu, shadow).map_err(feature("set SREGS"))?;
            for pair in Pair::ALL.iter().filter(|p| p.shadow() == shadow) {
                if accepted {
                    runnable.push(*pair);
                } else {
                    skipped.push((
                        *pair,
                        format!(
                            "KVM drops CR0.PG for {}-level hardware paging here",
                            shadow.count()
                        ),
                    ));
                }
            }
        }
        if runnable.is_empty() {
            return Err(Unavailable::NoPaging);
        }
        Ok(Probe {
            api_version,
            maxphyaddr,
            runnable,
            skipped,
        })
    }

    /// Whether this host runs `pair`.
    pub fn runs(&self, pair: Pair) -> bool {
        self.runnable.contains(&pair)
    }
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "KVM API {}, MAXPHYADDR {}; runs",
            self.api_version, self.maxphyaddr
        )?;
        for p in &self.runnable {
            write!(f, " {}", p.name())?;
        }
        for (p, why) in &self.skipped {
            write!(f, "; skips {}: {why}", p.name())?;
        }
        Ok(())
    }
}

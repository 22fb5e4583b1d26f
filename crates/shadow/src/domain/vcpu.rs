//! Per-vcpu paging state: the guest's control registers, the M-on-N pair it runs in, and
//! the top-level shadows it uses.

use crate::addr::Mfn;
use crate::multi::Pair;
use crate::paging::{ControlState, PagingLevels, bits::cr};
use crate::types::Flavor;

/// One vcpu as the engine sees it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Vcpu {
    /// The guest's control registers (CR0, CR3, CR4, EFER, RFLAGS, PKRU, PDPTEs).
    pub(crate) ctl: ControlState,
    /// The pair chosen by the last `update_paging_modes`.
    pub(crate) pair: Option<Pair>,
    /// How the guest tables are read (CR4.PSE, EFER.NXE) for the shadows this vcpu uses.
    pub(crate) flavor: Flavor,
    /// The hashed top-level shadows in use: one (64-bit and 32-bit guests) or one per
    /// present PDPTE (PAE guests).
    pub(crate) tops: [Option<Mfn>; 4],
    /// This vcpu's own top above the hashed tops (PDPT, or L4+L3), when the pair needs one.
    pub(crate) vcpu_top: Option<Mfn>,
    /// The machine frame the hardware's CR3 must hold.
    pub(crate) root: Option<Mfn>,
}

impl Vcpu {
    /// The guest's control state.
    pub fn control(&self) -> &ControlState {
        &self.ctl
    }
    /// The pair this vcpu runs in.
    pub fn pair(&self) -> Option<Pair> {
        self.pair
    }
    /// The shadow root (the hardware CR3 frame).
    pub fn root(&self) -> Option<Mfn> {
        self.root
    }
    /// The hashed top-level shadows in use.
    pub fn tops(&self) -> impl Iterator<Item = Mfn> + '_ {
        self.tops.iter().flatten().copied()
    }
    /// This vcpu's own top block, if any.
    pub fn vcpu_top(&self) -> Option<Mfn> {
        self.vcpu_top
    }

    /// The flavor the guest's control state implies.
    pub(crate) fn wanted_flavor(&self) -> Flavor {
        match self.ctl.levels() {
            PagingLevels::Two => Flavor {
                pse: self.ctl.cr4 & cr::CR4_PSE != 0,
                nxe: false,
                high: false,
            },
            PagingLevels::Three | PagingLevels::Four => Flavor {
                pse: false,
                nxe: self.ctl.nxe(),
                high: false,
            },
            PagingLevels::Zero => Flavor::default(),
        }
    }
}

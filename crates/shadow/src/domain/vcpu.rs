//! Per-vcpu paging state: the guest's control registers, the M-on-N pair it runs in, and
//! the top-level shadows it uses.

use crate::addr::{Gpa, Gva, Mfn};
use crate::multi::Pair;
use crate::paging::{ControlState, PagingLevels, PfErrorCode, bits::cr};
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
    /// The control state of the last paging-mode update or CR3 load that succeeded: what
    /// the guest's next control-register write is compared with, and what a refused one
    /// goes back to.
    pub(crate) applied: ControlState,
    /// The instruction (RIP) and address of the last emulation that could not be done on a
    /// page that was shadowed again at once (a table a vcpu runs on): the same again makes
    /// no progress.
    pub(crate) unemulated: Option<(u64, Gpa)>,
    /// The last fault of this vcpu the engine found nothing to fix for (the guest's walk
    /// allows the access and the shadows already did): its address, the hardware's error
    /// code and the count of shadow entries written when it was answered `Spurious`.
    pub(crate) unfixed: Option<(Gva, PfErrorCode, u64)>,
}

/// How a vcpu's root is (re)loaded.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RootLoad {
    /// The PDPTE registers the root uses (PAE guests): read from memory at a CR3 load and at
    /// the mode changes that load them (SDM 4.4.1), kept as they are otherwise.
    pub(crate) pdptes: [u64; 4],
    /// The flavor of the tops.
    pub(crate) flavor: Flavor,
    /// Whether the vcpu's current tops are released first (a new pair or flavor).
    pub(crate) fresh: bool,
}

/// Whether a MOV to CR0/CR4 from `before` to `after` makes the processor load the PDPTE
/// registers: PAE paging is in use afterwards and the write changed CR0.CD, CR0.NW, CR0.PG,
/// CR4.PAE, CR4.PGE, CR4.PSE or CR4.SMEP (SDM vol. 3A 4.4.1). CR0.WP, CR4.SMAP and EFER.NXE
/// changes do not. A new CR3 handed in with the mode is a CR3 load, which loads them too.
pub(crate) fn mode_change_loads_pdptes(before: &ControlState, after: &ControlState) -> bool {
    const CR0_BITS: u64 = cr::CR0_CD | cr::CR0_NW | cr::CR0_PG;
    const CR4_BITS: u64 = cr::CR4_PAE | cr::CR4_PGE | cr::CR4_PSE | cr::CR4_SMEP;
    after.levels() == PagingLevels::Three
        && ((before.cr0 ^ after.cr0) & CR0_BITS != 0
            || (before.cr4 ^ after.cr4) & CR4_BITS != 0
            || before.cr3 != after.cr3)
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
                pkey: 0,
            },
            PagingLevels::Three | PagingLevels::Four => Flavor {
                pse: false,
                nxe: self.ctl.nxe(),
                high: false,
                pkey: 0,
            },
            PagingLevels::Zero => Flavor::default(),
        }
    }
}

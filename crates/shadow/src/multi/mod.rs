//! The M-on-N engine (seed slide "multiple compilation"): generic code over a guest mode `G`
//! and a shadow mode `S`, monomorphised once per supported pair. [`Pair`] is the per-vcpu
//! mode object `update_paging_modes` chooses; calling through it is Xen's
//! `v->arch.shadow.mode->fn(v, ...)`.
//!
//! Geometry: a guest table at level `l` is shadowed at shadow level `l`. Where the guest's
//! entries span more than the shadow's (2-on-3, 2-on-4) one guest entry is shadowed by
//! `ratio(l)` consecutive shadow entries and the shadow takes 2 or 4 contiguous pages. Above
//! the guest's hashed top (the guest L2 for 32-bit and PAE guests) each vcpu has its own top
//! block: a PAE PDPT, or an L4 with one L3.

mod cr3;
mod engine;
mod fault;
mod oos;
mod prefetch;
mod superpage;
mod validate;

use core::marker::PhantomData;

use crate::addr::{Gpa, Gva};
use crate::domain::{Domain, EngineError};
use crate::host::MachineMemory;
use crate::paging::{
    FourLevel, NoPaging, PagingLevels, PagingMode, PfErrorCode, ThreeLevel, TwoLevel,
};
use crate::types::ShadowKey;

/// What the host must do after a page fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultOutcome {
    /// The shadows now allow the access: resume the guest, which retries it.
    Fixed,
    /// Nothing needed changing (another vcpu fixed it, or a stale TLB entry): resume.
    Spurious,
    /// The guest's own tables fault: deliver #PF with this error code (and CR2 = the
    /// faulting address) to the guest.
    Propagate(PfErrorCode),
    /// A write the guest may make but the shadows must not allow directly (the target is a
    /// shadowed page table, or CR0.WP=0 lets the kernel write a read-only page): emulate it
    /// and write through [`Domain::write_guest_phys`].
    Emulate {
        /// The guest-physical address written.
        gpa: Gpa,
    },
    /// An access to MMIO (or unbacked) guest-physical space: emulate the device access.
    Mmio {
        /// The guest-physical address accessed.
        gpa: Gpa,
    },
}

/// A supported M-on-N pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum Pair {
    P0on2,
    P2on2,
    P0on3,
    P2on3,
    P3on3,
    P0on4,
    P2on4,
    P3on4,
    P4on4,
}

/// Marks the guest/shadow mode combinations the engine supports: an unsupported pair does
/// not compile.
pub(crate) trait Supported {}
impl Supported for (NoPaging, TwoLevel) {}
impl Supported for (TwoLevel, TwoLevel) {}
impl Supported for (NoPaging, ThreeLevel) {}
impl Supported for (TwoLevel, ThreeLevel) {}
impl Supported for (ThreeLevel, ThreeLevel) {}
impl Supported for (NoPaging, FourLevel) {}
impl Supported for (TwoLevel, FourLevel) {}
impl Supported for (ThreeLevel, FourLevel) {}
impl Supported for (FourLevel, FourLevel) {}

/// The engine for guest mode `G` on shadow mode `S`.
pub(crate) struct Engine<G, S>(PhantomData<(G, S)>);

macro_rules! dispatch {
    ($pair:expr, $f:ident($($arg:expr),*)) => {
        match $pair {
            Pair::P0on2 => Engine::<NoPaging, TwoLevel>::$f($($arg),*),
            Pair::P2on2 => Engine::<TwoLevel, TwoLevel>::$f($($arg),*),
            Pair::P0on3 => Engine::<NoPaging, ThreeLevel>::$f($($arg),*),
            Pair::P2on3 => Engine::<TwoLevel, ThreeLevel>::$f($($arg),*),
            Pair::P3on3 => Engine::<ThreeLevel, ThreeLevel>::$f($($arg),*),
            Pair::P0on4 => Engine::<NoPaging, FourLevel>::$f($($arg),*),
            Pair::P2on4 => Engine::<TwoLevel, FourLevel>::$f($($arg),*),
            Pair::P3on4 => Engine::<ThreeLevel, FourLevel>::$f($($arg),*),
            Pair::P4on4 => Engine::<FourLevel, FourLevel>::$f($($arg),*),
        }
    };
}

impl Pair {
    /// Every supported pair.
    pub const ALL: [Pair; 9] = [
        Pair::P0on2,
        Pair::P2on2,
        Pair::P0on3,
        Pair::P2on3,
        Pair::P3on3,
        Pair::P0on4,
        Pair::P2on4,
        Pair::P3on4,
        Pair::P4on4,
    ];

    /// The pair for a guest mode on a shadow mode, if supported (M <= N, N >= 2).
    pub fn new(guest: PagingLevels, shadow: PagingLevels) -> Option<Pair> {
        use PagingLevels::*;
        Some(match (guest, shadow) {
            (Zero, Two) => Pair::P0on2,
            (Two, Two) => Pair::P2on2,
            (Zero, Three) => Pair::P0on3,
            (Two, Three) => Pair::P2on3,
            (Three, Three) => Pair::P3on3,
            (Zero, Four) => Pair::P0on4,
            (Two, Four) => Pair::P2on4,
            (Three, Four) => Pair::P3on4,
            (Four, Four) => Pair::P4on4,
            _ => return None,
        })
    }

    /// The guest's paging levels.
    pub fn guest(self) -> PagingLevels {
        dispatch!(self, guest_levels())
    }

    /// The shadow's paging levels.
    pub fn shadow(self) -> PagingLevels {
        dispatch!(self, shadow_levels())
    }

    /// The name used on the command line ("4on4").
    pub fn name(self) -> &'static str {
        match self {
            Pair::P0on2 => "0on2",
            Pair::P2on2 => "2on2",
            Pair::P0on3 => "0on3",
            Pair::P2on3 => "2on3",
            Pair::P3on3 => "3on3",
            Pair::P0on4 => "0on4",
            Pair::P2on4 => "2on4",
            Pair::P3on4 => "3on4",
            Pair::P4on4 => "4on4",
        }
    }

    /// The pair named `name` ("4on4", "2on3", ...).
    pub fn from_name(name: &str) -> Option<Pair> {
        Pair::ALL.into_iter().find(|p| p.name() == name)
    }

    pub(crate) fn update_cr3<H: MachineMemory>(
        self,
        d: &mut Domain<H>,
        v: usize,
        load: crate::domain::RootLoad,
    ) -> Result<(), EngineError> {
        dispatch!(self, update_cr3(d, v, load))
    }

    pub(crate) fn page_fault<H: MachineMemory>(
        self,
        d: &mut Domain<H>,
        v: usize,
        va: Gva,
        ec: PfErrorCode,
    ) -> Result<FaultOutcome, EngineError> {
        dispatch!(self, page_fault(d, v, va, ec))
    }

    pub(crate) fn invlpg<H: MachineMemory>(
        self,
        d: &mut Domain<H>,
        v: usize,
        va: Gva,
    ) -> Result<bool, EngineError> {
        dispatch!(self, invlpg(d, v, va))
    }

    /// Reflects guest entries at byte `offset..offset+len` of the shadowed page into the
    /// shadow at `head` with `key`.
    pub(crate) fn validate<H: MachineMemory>(
        self,
        d: &mut Domain<H>,
        head: crate::addr::Mfn,
        key: ShadowKey,
        offset: u64,
        len: u64,
    ) -> Result<(), EngineError> {
        dispatch!(self, validate(d, head, key, offset, len))
    }

    /// The shadow entry a guest leaf entry gives (for the auditor).
    pub(crate) fn expected_upper<H: MachineMemory>(
        self,
        d: &Domain<H>,
        key: ShadowKey,
        index: u64,
    ) -> Result<Option<u64>, EngineError> {
        dispatch!(self, expected_upper(d, key, index))
    }

    /// The shadow superpage entry allowed at `index` of the L2 shadow with `key` now, if
    /// any (for the auditor).
    pub(crate) fn expected_superpage<H: MachineMemory>(
        self,
        d: &Domain<H>,
        key: ShadowKey,
        index: u64,
    ) -> Result<Option<u64>, EngineError> {
        dispatch!(self, expected_superpage(d, key, index))
    }

    /// The shadow leaf entry a guest entry gives (for the auditor).
    pub(crate) fn expected_leaf<H: MachineMemory>(
        self,
        d: &Domain<H>,
        key: ShadowKey,
        index: u64,
    ) -> Result<Option<u64>, EngineError> {
        dispatch!(self, expected_leaf(d, key, index))
    }
}

impl<G: PagingMode, S: PagingMode> Engine<G, S>
where
    (G, S): Supported,
{
    fn guest_levels() -> PagingLevels {
        G::LEVELS
    }
    fn shadow_levels() -> PagingLevels {
        S::LEVELS
    }
}

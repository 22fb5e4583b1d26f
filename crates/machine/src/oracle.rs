//! The guest oracle: what the guest's own tables say an access must do, computed with the
//! architectural walker over guest-physical memory (no side effects), to compare with what
//! the hardware did on the shadow tables.

use shadow2::addr::{Gfn, Gpa, Gva, Maddr, Mfn};
use shadow2::domain::{Domain, RefcountMode};
use shadow2::host::MachineMemory;
use shadow2::p2m::P2mType;
use shadow2::paging::{
    Access, AdUpdate, ControlState, CpuFeatures, Exchange, MemError, PhysMem, WalkEnv, WalkFault,
    WalkResult, bits, walk,
};

use crate::memory::SparseMemory;
use crate::p2m_memo::P2mMemo;

/// Guest-physical memory of a domain, read-only (the oracle never writes).
#[derive(Debug)]
pub struct GuestReadView<'a, H: MachineMemory, F: FrameLookup<H> = Direct> {
    domain: &'a Domain<H>,
    frames: F,
}

/// How a guest frame becomes a machine frame for the oracle: the domain's answer, asked
/// directly or remembered ([`P2mMemo`]).
pub trait FrameLookup<H: MachineMemory> {
    /// [`Domain::guest_frame`] of `domain` as it is now.
    fn guest_frame(&self, domain: &Domain<H>, gfn: Gfn) -> Option<(Mfn, P2mType)>;
}

/// The domain asked every time.
#[derive(Clone, Copy, Debug, Default)]
pub struct Direct;

impl<H: MachineMemory> FrameLookup<H> for Direct {
    fn guest_frame(&self, domain: &Domain<H>, gfn: Gfn) -> Option<(Mfn, P2mType)> {
        domain.guest_frame(gfn)
    }
}

impl FrameLookup<SparseMemory> for &P2mMemo {
    fn guest_frame(&self, domain: &Domain<SparseMemory>, gfn: Gfn) -> Option<(Mfn, P2mType)> {
        P2mMemo::guest_frame(self, domain, gfn)
    }
}

impl<'a, H: MachineMemory> GuestReadView<'a, H> {
    /// A view of `domain`'s guest memory.
    pub fn new(domain: &'a Domain<H>) -> Self {
        GuestReadView {
            domain,
            frames: Direct,
        }
    }
}

impl<'a, H: MachineMemory, F: FrameLookup<H>> GuestReadView<'a, H, F> {
    /// A view of `domain`'s guest memory whose guest frames are looked up by `frames`.
    pub fn with_frames(domain: &'a Domain<H>, frames: F) -> Self {
        GuestReadView { domain, frames }
    }

    fn maddr(&self, addr: Gpa) -> Result<Maddr, MemError> {
        match self.frames.guest_frame(self.domain, addr.gfn()) {
            Some((mfn, P2mType::Ram)) => Ok(Maddr::new(mfn.base().raw() | addr.offset())),
            _ => Err(MemError::Unbacked { addr: addr.raw() }),
        }
    }
}

impl<H: MachineMemory, F: FrameLookup<H>> PhysMem<Gpa> for GuestReadView<'_, H, F> {
    fn read_u32(&self, addr: Gpa) -> Result<u32, MemError> {
        self.domain.host().read_u32(self.maddr(addr)?)
    }
    fn read_u64(&self, addr: Gpa) -> Result<u64, MemError> {
        self.domain.host().read_u64(self.maddr(addr)?)
    }
    fn write_u32(&mut self, addr: Gpa, _: u32) -> Result<(), MemError> {
        Err(MemError::ReadOnly { addr: addr.raw() })
    }
    fn write_u64(&mut self, addr: Gpa, _: u64) -> Result<(), MemError> {
        Err(MemError::ReadOnly { addr: addr.raw() })
    }
    fn compare_exchange_u32(
        &mut self,
        addr: Gpa,
        _: u32,
        _: u32,
    ) -> Result<Exchange<u32>, MemError> {
        Err(MemError::ReadOnly { addr: addr.raw() })
    }
    fn compare_exchange_u64(
        &mut self,
        addr: Gpa,
        _: u64,
        _: u64,
    ) -> Result<Exchange<u64>, MemError> {
        Err(MemError::ReadOnly { addr: addr.raw() })
    }
}

/// The guest's own walk of `va` for `access`, without touching A/D bits.
pub fn guest_walk<H: MachineMemory>(
    domain: &Domain<H>,
    ctl: &ControlState,
    va: Gva,
    access: Access,
) -> WalkResult<Gpa> {
    guest_walk_with(domain, Direct, ctl, va, access)
}

/// [`guest_walk`] with guest frames looked up by `frames`.
pub fn guest_walk_with<H: MachineMemory, F: FrameLookup<H>>(
    domain: &Domain<H>,
    frames: F,
    ctl: &ControlState,
    va: Gva,
    access: Access,
) -> WalkResult<Gpa> {
    let feat = domain.config().guest_features;
    let env = WalkEnv {
        ctl,
        feat: &feat,
        ad: AdUpdate::Skip,
    };
    walk(
        &mut GuestReadView::with_frames(domain, frames),
        env,
        va,
        access,
    )
}

/// What the guest must see for one access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expected {
    /// The access reaches this machine frame.
    Frame(Mfn),
    /// The access reaches guest-physical space that is not RAM.
    Mmio(Gpa),
    /// #PF with this error code.
    PageFault(u32),
    /// #GP.
    GeneralProtection,
}

/// What the guest's tables and the p2m say `access` at `va` must do.
pub fn expect<H: MachineMemory>(
    domain: &Domain<H>,
    ctl: &ControlState,
    va: Gva,
    access: Access,
) -> Expected {
    let walk = guest_walk(domain, ctl, va, access);
    expect_from_walk(domain, Direct, ctl, access, &walk)
}

/// What `access` must do, given the guest's walk of its address ([`guest_walk`] with the
/// same `ctl` and `access`, on the domain as it is now), with guest frames looked up by
/// `frames`.
pub fn expect_from_walk<H: MachineMemory, F: FrameLookup<H>>(
    domain: &Domain<H>,
    frames: F,
    ctl: &ControlState,
    access: Access,
    walk: &WalkResult<Gpa>,
) -> Expected {
    match walk {
        Ok(t) => match frames.guest_frame(domain, t.frame) {
            // With guest refcounts (PV), page-table pages are read-only to the guest.
            Some((mfn, P2mType::Ram))
                if access.is_write()
                    && domain.config().refcounts == RefcountMode::Guest
                    && domain.shadows().is_page_table(mfn) =>
            {
                Expected::PageFault(
                    shadow2::paging::PfErrorCode::for_access(access, ctl).bits()
                        | shadow2::paging::PfErrorCode::P,
                )
            }
            Some((mfn, P2mType::Ram)) => Expected::Frame(mfn),
            _ => Expected::Mmio(t.addr),
        },
        Err(f) => match f.fault {
            WalkFault::PageFault(ec) => Expected::PageFault(ec.bits()),
            WalkFault::GeneralProtection => Expected::GeneralProtection,
            // A guest table in unbacked space reads as not present (the engine's rule). A
            // walk that sets no A/D bits never contends.
            WalkFault::Memory(_) | WalkFault::Contended => {
                Expected::PageFault(shadow2::paging::PfErrorCode::for_access(access, ctl).bits())
            }
        },
    }
}

/// Whether, after a successful access, the guest's entries carry the A (and, for a write,
/// D) bits the architecture requires. Returns a description of the first missing bit.
pub fn check_accessed_dirty<H: MachineMemory>(
    domain: &Domain<H>,
    ctl: &ControlState,
    va: Gva,
    access: Access,
) -> Option<&'static str> {
    accessed_dirty_from_walk(ctl, access, &guest_walk(domain, ctl, va, access))
}

/// [`check_accessed_dirty`] given the guest's walk of the address ([`guest_walk`] with the
/// same `ctl` and `access`, on the domain as it is after the access).
pub fn accessed_dirty_from_walk(
    ctl: &ControlState,
    access: Access,
    walk: &WalkResult<Gpa>,
) -> Option<&'static str> {
    let Ok(t) = walk else {
        return Some("the guest walk fails after a successful access");
    };
    let pae = ctl.levels() == shadow2::paging::PagingLevels::Three;
    for entry in t.path.iter() {
        if pae && entry.level == 3 {
            continue;
        }
        if entry.value & bits::A == 0 {
            return Some("A clear on an entry a successful access used");
        }
    }
    if access.is_write() && t.leaf_level > 0 && t.leaf & bits::D == 0 {
        return Some("D clear on the leaf of a successful write");
    }
    None
}

/// The CPU features the simulated hardware has.
pub const HOST_FEATURES: CpuFeatures = CpuFeatures::KVM_HOST;

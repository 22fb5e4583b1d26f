//! The shadow page-fault handler: the reserved-bit fast path, the guest walk (with its A/D
//! writes validated into the shadows), the top-down fill, and the decision to propagate,
//! emulate or report MMIO.

use alloc::vec::Vec;

use super::{Engine, FaultOutcome, Supported};
use crate::addr::{Gpa, Gva, Maddr, Mfn};
use crate::domain::entries::{MAGIC, MAGIC_NOT_PRESENT, Magic, decode_magic};
use crate::domain::guest_mem::{FrameMap, GuestMem, gfn_of};
use crate::domain::{Domain, EngineError};
use crate::host::MachineMemory;
use crate::p2m::P2mType;
use crate::paging::{
    Access, AccessKind, AdUpdate, PagingLevels, PagingMode, Perms, PfErrorCode, Privilege, WalkEnv,
    WalkFault, WalkPath, bits, protection_fault, walk_mode,
};
use crate::types::Flavor;

/// Where a descent through the shadows ended: the leaf slot for the address and what the
/// guest says about it.
struct Leaf {
    slot: Maddr,
    /// For a splinter: the guest superpage entry and the frame's guest frame number.
    superpage: Option<(u64, crate::addr::Gfn)>,
}

impl<G: PagingMode, S: PagingMode> Engine<G, S>
where
    (G, S): Supported,
{
    /// The access the hardware error code describes.
    fn access_of(ec: PfErrorCode) -> Access {
        let kind = if ec.fetch() {
            AccessKind::Fetch
        } else if ec.write() {
            AccessKind::Write
        } else {
            AccessKind::Read
        };
        let privilege = if ec.user() {
            Privilege::User
        } else {
            Privilege::Supervisor
        };
        Access::new(kind, privilege)
    }

    /// Whether a fault reported as a supervisor read may have been a fetch: 32-bit shadows
    /// report I only with CR4.SMEP, and a not-present shadow entry says nothing more.
    fn maybe_fetch(ec: PfErrorCode, ctl: &crate::paging::ControlState) -> bool {
        S::LEVELS == PagingLevels::Two
            && !ctl.smep()
            && ctl.smap()
            && !ec.present()
            && !ec.write()
            && !ec.user()
            && !ec.fetch()
    }

    /// Pool blocks a fill may need: one shadow per level below the hashed top, and a
    /// splinter.
    fn fill_orders() -> Result<Vec<u8>, EngineError> {
        let shadow = S::LEVELS;
        let mut orders = Vec::new();
        for level in 1..Self::HASHED_TOP {
            orders.push(Self::kind(level)?.order(shadow));
        }
        orders.push(Self::fl1_kind()?.order(shadow));
        Ok(orders)
    }

    pub(super) fn page_fault<H: MachineMemory>(
        d: &mut Domain<H>,
        v: usize,
        va: Gva,
        ec: PfErrorCode,
    ) -> Result<FaultOutcome, EngineError> {
        if G::NUM_LEVELS == 0 {
            return Self::unpaged_fault(d, va, ec);
        }
        let va = if G::VA_BITS == 32 { va.low32() } else { va };
        let ctl = d.vcpus[v].ctl;
        let access = Self::access_of(ec);
        let guest_ec = PfErrorCode::for_access_in(access, &ctl, G::LEVELS);
        if d.config.in_hole(va) {
            return Ok(FaultOutcome::Propagate(guest_ec));
        }
        if ec.reserved()
            && d.fast_path_on()
            && let Some(outcome) = Self::fast_path(d, v, va, access, guest_ec)?
        {
            return Ok(outcome);
        }

        let orders = Self::fill_orders()?;
        d.prealloc(&orders)?;
        let written_before = d.entries_written;

        let feat = d.config.guest_features;
        let env = WalkEnv {
            ctl: &ctl,
            feat: &feat,
            ad: AdUpdate::Set,
        };
        let map = match &d.p2m {
            Some(p2m) => FrameMap::Translated(p2m),
            None => FrameMap::Direct(&d.owned),
        };
        let mut mem = GuestMem::new(&mut d.host, map);
        let mut result = walk_mode::<G, Gpa, _>(&mut mem, env, va, access);
        let mut read_fault = None;
        if Self::maybe_fetch(ec, &ctl)
            && let Err(f) = &result
            && let Some(read_ec) = f.error_code().filter(|e| e.present())
        {
            // 32-bit shadows without SMEP cannot report I: a supervisor "read" that SMAP
            // forbids may have been a fetch, which SMAP does not restrict. Fill for the
            // fetch; a real read faults again on the filled entry and is propagated then.
            let fetch = Access::new(AccessKind::Fetch, Privilege::Supervisor);
            let mut probe = env;
            probe.ad = AdUpdate::Skip;
            if walk_mode::<G, Gpa, _>(&mut mem, probe, va, fetch).is_ok() {
                read_fault = Some(read_ec);
                result = walk_mode::<G, Gpa, _>(&mut mem, env, va, fetch);
            }
        }
        let overflowed = mem.overflowed();
        let writes: Vec<(Gpa, u8)> = mem.writes().collect();
        if overflowed {
            return Err(EngineError::Internal(
                "a walk wrote more entries than it has",
            ));
        }
        if !writes.is_empty() {
            d.stats.fault_accessed_bit += 1;
        }
        for (gpa, width) in writes {
            d.after_guest_write(gpa, u64::from(width))?;
        }
        let flavor = d.vcpus[v].flavor;

        let t = match result {
            Ok(t) => t,
            Err(failure) => {
                return match failure.fault {
                    WalkFault::PageFault(gec) => {
                        if !gec.present() && failure.path.last().is_some_and(|e| e.level == 1) {
                            Self::install_not_present(d, v, va, &failure.path, flavor)?;
                        }
                        Ok(FaultOutcome::Propagate(gec))
                    }
                    WalkFault::GeneralProtection => Err(EngineError::BadArgument(
                        "#PF reported for a non-canonical address",
                    )),
                    // A guest table in unbacked guest-physical space reads as not present.
                    WalkFault::Memory(_) => Ok(FaultOutcome::Propagate(guest_ec)),
                };
            }
        };

        let gfn = t.frame;
        let target = d.guest_frame(gfn);
        let mfn = match target {
            Some((mfn, P2mType::Ram)) => Some(mfn),
            _ => None,
        };
        if access.is_write()
            && let Some(mfn) = mfn
            && Self::frame_writable_but_dirty(d, mfn, gfn)
        {
            d.mark_dirty(gfn);
            d.stats.fault_log_dirty += 1;
        }
        Self::fill(d, v, va, &t.path, flavor)?;
        // The walk's A/D updates, validated into the shadows, may be what fixed the fault.
        let changed = d.entries_written != written_before;

        if let Some(read_ec) = read_fault {
            // Still ambiguous: RAM was filled and the retry tells; MMIO cannot be retried,
            // so it is taken for the read (code is not fetched from MMIO).
            return Ok(match mfn {
                Some(_) => FaultOutcome::Fixed,
                None => FaultOutcome::Propagate(read_ec),
            });
        }
        let Some(mfn) = mfn else {
            return Ok(FaultOutcome::Mmio {
                gpa: Self::gpa_of(gfn, va.raw()),
            });
        };
        if access.is_write() {
            let wp0_write = !t.perms.write;
            if d.store.is_page_table(mfn) || wp0_write {
                return Ok(FaultOutcome::Emulate {
                    gpa: Self::gpa_of(gfn, va.raw()),
                });
            }
        }
        if changed {
            Ok(FaultOutcome::Fixed)
        } else {
            Ok(FaultOutcome::Spurious)
        }
    }

    /// Whether a write to a page only needs it marked dirty (log-dirty mode, page clean,
    /// nothing else forbids writing).
    fn frame_writable_but_dirty<H: MachineMemory>(
        d: &Domain<H>,
        mfn: Mfn,
        gfn: crate::addr::Gfn,
    ) -> bool {
        d.log_dirty.as_ref().is_some_and(|log| !log.is_dirty(gfn)) && !d.store.is_page_table(mfn)
    }

    /// The reserved-bit fast path: the shadow entry alone says what the guest sees.
    fn fast_path<H: MachineMemory>(
        d: &mut Domain<H>,
        v: usize,
        va: Gva,
        access: Access,
        guest_ec: PfErrorCode,
    ) -> Result<Option<FaultOutcome>, EngineError> {
        let Some(hw) = d.hardware_control(v) else {
            return Ok(None);
        };
        let feat = d.config.guest_features;
        let env = WalkEnv {
            ctl: &hw,
            feat: &feat,
            ad: AdUpdate::Skip,
        };
        let probe = Access::new(AccessKind::Read, Privilege::Supervisor);
        let Err(failure) = walk_mode::<S, Maddr, _>(&mut d.host, env, va, probe) else {
            return Ok(None);
        };
        let Some(last) = failure.path.last() else {
            return Ok(None);
        };
        if last.level != 1 {
            return Ok(None);
        }
        match decode_magic(last.value) {
            Some(Magic::NotPresent) => {
                d.stats.fast_path += 1;
                d.stats.fast_path_not_present += 1;
                Ok(Some(FaultOutcome::Propagate(guest_ec)))
            }
            Some(Magic::Mmio(gfn, rights)) => {
                // The hardware stopped at the reserved bit without checking rights: check
                // them here, from the upper shadow entries (which carry the guest's) and
                // the guest leaf's own, kept in the magic entry.
                let ctl = d.vcpus[v].ctl;
                if ctl.pke() || (access.is_write() && rights & bits::D == 0) {
                    return Ok(None);
                }
                let mut perms = Perms {
                    write: rights & bits::RW != 0,
                    user: rights & bits::US != 0,
                    exec: rights & bits::NX == 0,
                };
                for entry in failure.path.iter().filter(|e| e.level > 1) {
                    if S::LEVELS == PagingLevels::Three && entry.level == 3 {
                        continue;
                    }
                    perms.write &= entry.value & bits::RW != 0;
                    perms.user &= entry.value & bits::US != 0;
                    perms.exec &= entry.value & bits::NX == 0;
                }
                if let Some(denied) = protection_fault(access, perms, &ctl) {
                    d.stats.fast_path += 1;
                    return Ok(Some(FaultOutcome::Propagate(PfErrorCode(
                        guest_ec.bits() | denied,
                    ))));
                }
                d.stats.fast_path += 1;
                d.stats.fast_path_mmio += 1;
                Ok(Some(FaultOutcome::Mmio {
                    gpa: Gpa::new((gfn << 12) | (va.raw() & 0xfff)),
                }))
            }
            None => Ok(None),
        }
    }

    /// Builds the shadows down to the leaf for `va` from a successful guest walk's path and
    /// writes the leaf.
    fn fill<H: MachineMemory>(
        d: &mut Domain<H>,
        v: usize,
        va: Gva,
        path: &WalkPath<Gpa>,
        flavor: Flavor,
    ) -> Result<(), EngineError> {
        let Some(leaf) = Self::descend(d, v, va, path, flavor, true)? else {
            return Ok(());
        };
        let new = match leaf.superpage {
            Some((pde, gfn)) => Self::fl1_sentry(d, pde, gfn)?,
            None => {
                let addr = path
                    .at_level(1)
                    .map(|e| e.addr)
                    .ok_or(EngineError::Internal("walk path without a leaf"))?;
                let gl1e = Self::read_gentry(d, addr).unwrap_or(0);
                Self::leaf_sentry(d, gl1e, flavor)?
            }
        };
        d.set_sentry(leaf.slot, new)
    }

    /// After a walk that failed on a not-present guest L1 entry, writes the not-present
    /// magic into the shadow L1 entry (when the upper levels are shadowable), so that the
    /// next such fault takes the fast path.
    fn install_not_present<H: MachineMemory>(
        d: &mut Domain<H>,
        v: usize,
        va: Gva,
        path: &WalkPath<Gpa>,
        flavor: Flavor,
    ) -> Result<(), EngineError> {
        if !d.fast_path_on() {
            return Ok(());
        }
        if let Some(leaf) = Self::descend(d, v, va, path, flavor, false)?
            && leaf.superpage.is_none()
        {
            d.set_sentry(leaf.slot, MAGIC | MAGIC_NOT_PRESENT)?;
        }
        Ok(())
    }

    /// Walks down the shadows for `va` along the guest `path`, creating missing shadows and
    /// linking them, and returns the leaf slot. Stops (None) where a guest entry cannot be
    /// shadowed yet (A clear, or `strict` is false and an entry is not linkable).
    fn descend<H: MachineMemory>(
        d: &mut Domain<H>,
        v: usize,
        va: Gva,
        path: &WalkPath<Gpa>,
        flavor: Flavor,
        strict: bool,
    ) -> Result<Option<Leaf>, EngineError> {
        let top_index = if G::NUM_LEVELS == 3 {
            ((va.raw() >> 30) & 3) as usize
        } else {
            0
        };
        let Some(mut shadow) = d.vcpus[v].tops.get(top_index).copied().flatten() else {
            return if strict {
                Err(EngineError::Internal(
                    "no top-level shadow for a walked address",
                ))
            } else {
                Ok(None)
            };
        };
        let mut level = Self::HASHED_TOP;
        while level >= 2 {
            let Some(entry) = path.at_level(level) else {
                return Ok(None);
            };
            let gentry = Self::read_gentry(d, entry.addr).unwrap_or(0);
            if !Self::linkable(d, gentry, level, flavor) {
                if strict {
                    return Err(EngineError::Internal("a walked entry is not shadowable"));
                }
                return Ok(None);
            }
            let Some(key) = Self::child_key(d, gentry, level, flavor)? else {
                return Ok(None);
            };
            let (child, _) = d.get_or_create(key)?;
            let gindex = G::index(va.raw(), level) as u64;
            // The child may have been created by an earlier fault; (re)link it anyway: the
            // upper entry may be empty or stale.
            Self::link(d, shadow, level, gindex, gentry, Some(child), flavor)?;
            if key.kind.is_fl1() {
                let frames_shift = G::shift(level) - 12;
                let index = (va.raw() >> 12) & ((1u64 << frames_shift) - 1);
                let base = gfn_of(G::entry_address(gentry, level, true));
                return Ok(Some(Leaf {
                    slot: Maddr::new(child.base().raw() + index * S::ENTRY_BYTES),
                    superpage: Some((gentry, crate::addr::Gfn::new(base.raw() + index))),
                }));
            }
            shadow = child;
            level -= 1;
        }
        Ok(Some(Leaf {
            slot: Maddr::new(shadow.base().raw() + Self::soffset(1, va.raw())),
            superpage: None,
        }))
    }

    /// A fault of a vcpu with paging disabled, running on the p2m itself.
    fn unpaged_fault<H: MachineMemory>(
        d: &mut Domain<H>,
        va: Gva,
        ec: PfErrorCode,
    ) -> Result<FaultOutcome, EngineError> {
        let gpa = Gpa::new(va.low32().raw());
        let gfn = gpa.gfn();
        let Some(p2m) = d.p2m.as_ref() else {
            return Err(EngineError::Internal("paging disabled without a p2m"));
        };
        let Some(entry) = p2m.lookup(&d.host, gfn) else {
            return Ok(FaultOutcome::Mmio { gpa });
        };
        if entry.ty != P2mType::Ram {
            return Ok(FaultOutcome::Mmio { gpa });
        }
        if !ec.write() || entry.writable {
            return Ok(FaultOutcome::Spurious);
        }
        if d.store.is_page_table(entry.mfn) {
            return Ok(FaultOutcome::Emulate { gpa });
        }
        if d.log_dirty.as_ref().is_some_and(|log| !log.is_dirty(gfn)) {
            d.mark_dirty(gfn);
            d.stats.fault_log_dirty += 1;
        }
        if !Self::frame_writable(d, entry.mfn, gfn) {
            return Err(EngineError::Internal(
                "write to a protected frame in the p2m",
            ));
        }
        if let Some(p2m) = d.p2m.as_mut() {
            p2m.set_writable(&mut d.host, gfn, true)?;
        }
        d.p2m_writable.insert(gfn);
        Ok(FaultOutcome::Fixed)
    }

    pub(super) fn invlpg<H: MachineMemory>(_d: &mut Domain<H>, _v: usize, _va: Gva) -> bool {
        // Shadows are kept in sync with every guest write, so no shadow entry is stale;
        // only the hardware TLB may hold the old translation.
        G::NUM_LEVELS != 0
    }
}

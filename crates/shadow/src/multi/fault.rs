//! The shadow page-fault handler: the reserved-bit fast path, the guest walk (with its A/D
//! writes validated into the shadows), the top-down fill, and the decision to propagate,
//! emulate or report MMIO.

use alloc::vec::Vec;

use super::{Engine, FaultOutcome, Supported};
use crate::addr::{Gfn, Gpa, Gva, Maddr, Mfn};
use crate::domain::entries::{MAGIC, MAGIC_NOT_PRESENT, Magic};
use crate::domain::guest_mem::{FrameCache, FrameMap, GuestMem, gfn_of};
use crate::domain::{Domain, EngineError, RefcountMode};
use crate::host::MachineMemory;
use crate::p2m::P2mType;
use crate::paging::{
    Access, AccessKind, AdUpdate, PagingLevels, PagingMode, PathEntry, Perms, PfErrorCode,
    Privilege, Translation, WalkEnv, WalkFailure, WalkFault, WalkPath, bits, protection_fault,
    walk_mode,
};
use crate::types::Flavor;

/// Where a descent through the shadows ended: the leaf slot for the address and what the
/// guest says about it.
#[derive(Clone, Copy)]
struct Leaf {
    slot: Maddr,
    /// For a splinter: the guest superpage entry and the frame's guest frame number.
    superpage: Option<(u64, crate::addr::Gfn)>,
    /// Shadow superpage entries map the address already: there is no leaf to write.
    mapped: bool,
}

/// One upper shadow entry a [`Plan`] (re)writes: guest entry `gentry` at `level` links to
/// the existing shadow `child`.
#[derive(Clone, Copy)]
struct PlannedLink {
    level: u8,
    gentry: u64,
    child: Mfn,
}

/// A descent through shadows that all exist already, worked out without changing anything.
/// Knowing before any change that nothing will be created is what lets a fault skip
/// reserving pool blocks (an operation that creates must reserve before it changes
/// anything, so that it cannot fail half-way).
struct Plan {
    top: Mfn,
    links: [PlannedLink; 4],
    len: usize,
    leaf: Leaf,
}

/// Pool block orders set aside before a fill (at most 3 levels below the hashed top, and a
/// splinter).
struct FillOrders {
    orders: [u8; 4],
    len: usize,
}

impl FillOrders {
    fn as_slice(&self) -> &[u8] {
        self.orders.get(..self.len).unwrap_or(&[])
    }
}

/// How many entries after a filled leaf are marked "guest not present" ahead of time.
const PREFETCH_NOT_PRESENT: u64 = 16;
/// Splinter entries a fill through a guest superpage also fills after the one it needs
/// (Xen's `sh_prefetch`: the guest usually goes on to the next frames of the superpage, and
/// a splinter entry needs only the superpage's entry and the p2m).
const PREFETCH_SPLINTER: u64 = 32;

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
    fn fill_orders() -> Result<FillOrders, EngineError> {
        let shadow = S::LEVELS;
        let mut out = FillOrders {
            orders: [0; 4],
            len: 0,
        };
        let levels = (1..Self::HASHED_TOP).map(Self::kind);
        for kind in levels.chain(core::iter::once(Self::fl1_kind())) {
            let slot = out
                .orders
                .get_mut(out.len)
                .ok_or(EngineError::Internal("more fill levels than a walk has"))?;
            *slot = kind?.order(shadow);
            out.len += 1;
        }
        Ok(out)
    }

    /// Reserves the pool blocks of the deepest fill.
    fn reserve_fill<H: MachineMemory>(d: &mut Domain<H>) -> Result<(), EngineError> {
        d.prealloc(Self::fill_orders()?.as_slice())
    }

    /// Reserves the pool blocks of the deepest fill unless `idle` (the fault will create
    /// nothing) and reserving would evict nothing: then it would only take the blocks and
    /// give them back. When the pool is short (or shrinking), reserving evicts, and a fault
    /// keeps doing so even when it creates nothing: those evictions are part of how a
    /// running guest's shadows make room. True if it reserved, which may have evicted
    /// shadows a [`Plan`] found.
    fn reserve_unless_idle<H: MachineMemory>(
        d: &mut Domain<H>,
        idle: bool,
    ) -> Result<bool, EngineError> {
        let orders = Self::fill_orders()?;
        if idle && d.prealloc_is_idle(orders.as_slice()) {
            return Ok(false);
        }
        d.prealloc(orders.as_slice())?;
        Ok(true)
    }

    /// The A/D bits a successful walk whose leaf is at `leaf_level` makes sure are set in
    /// path entry `e`.
    fn ad_bits(e: &PathEntry<Gpa>, leaf_level: u8, access: Access) -> u64 {
        // PAE PDPTEs are registers: the walk never updates them.
        if G::LEVELS == PagingLevels::Three && e.level == 3 {
            return 0;
        }
        if e.level == leaf_level && access.is_write() {
            bits::A | bits::D
        } else {
            bits::A
        }
    }

    /// Whether a walk that succeeded without A/D updates (`t`) would have written any with
    /// them. If not, the updating walk reads the same entries, writes nothing and returns
    /// the same translation.
    fn walk_would_write(t: &Translation<Gpa>, access: Access) -> bool {
        t.path.iter().any(|e| {
            let need = Self::ad_bits(e, t.leaf_level, access);
            e.value & need != need
        })
    }

    /// Whether no two entries of `path` sit at the same address (a table mapping itself):
    /// then each entry's A/D update is its own, and the value it leaves is foreseeable.
    fn addresses_distinct(path: &WalkPath<Gpa>) -> bool {
        path.iter()
            .enumerate()
            .all(|(i, a)| path.iter().skip(i + 1).all(|b| b.addr != a.addr))
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
        if Self::top_is_back(d, v, va) {
            // The root was built without this guest table; the guest retries on a new one.
            Self::reload_root(d, v)?;
            return Ok(FaultOutcome::Spurious);
        }
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

        Self::resync_walked(d, v, va, access)?;
        let frames = FrameCache::new();
        let flavor = d.vcpus[v].flavor;
        let feat = d.config.guest_features;
        let env = WalkEnv {
            ctl: &ctl,
            feat: &feat,
            ad: AdUpdate::Set,
        };

        // First a walk that writes nothing. Most faults need no A/D update, and then this
        // walk is the one the CPU would do; when, besides, every shadow on the way exists,
        // nothing needs reserving. A fetch probe has its own sequence (below).
        let reserved = if Self::maybe_fetch(ec, &ctl) {
            Self::reserve_fill(d)?;
            true
        } else {
            let probe_env = WalkEnv {
                ad: AdUpdate::Skip,
                ..env
            };
            match Self::guest_walk(d, &frames, probe_env, va, access) {
                Ok(t) if !Self::walk_would_write(&t, access) => {
                    let mut plan = Self::plan(d, &frames, v, va, &t.path, flavor, |e| e.value);
                    if Self::reserve_unless_idle(d, plan.is_some())? {
                        plan = None;
                    }
                    let written_before = d.entries_written;
                    return Self::walked(
                        d,
                        &frames,
                        v,
                        va,
                        access,
                        &t,
                        plan,
                        true,
                        written_before,
                        None,
                        ec,
                    );
                }
                // A faulting walk writes nothing, with A/D updates or without.
                Err(failure) => {
                    let mut plan = None;
                    if Self::installs_not_present(d, &failure) {
                        plan = Self::plan(d, &frames, v, va, &failure.path, flavor, |e| e.value);
                        if Self::reserve_unless_idle(d, plan.is_some())? {
                            plan = None;
                        }
                    } else {
                        Self::reserve_unless_idle(d, true)?;
                    }
                    return Self::walk_failed(d, &frames, v, va, guest_ec, &failure, plan);
                }
                // The walk will set A/D bits. Validating those writes changes no hashed
                // shadow (it can only link existing children, and relinking a child takes
                // the new reference before dropping the old one), so the entries as the
                // walk will leave them tell now whether the fill will create anything.
                Ok(t) => {
                    let after =
                        |e: &PathEntry<Gpa>| e.value | Self::ad_bits(e, t.leaf_level, access);
                    let idle = Self::addresses_distinct(&t.path)
                        && Self::plan(d, &frames, v, va, &t.path, flavor, after).is_some();
                    Self::reserve_unless_idle(d, idle)?
                }
            }
        };

        let mut written_before = d.entries_written;
        let map = match &d.p2m {
            Some(p2m) => FrameMap::Translated(p2m),
            None => FrameMap::Direct(&d.owned),
        };
        let mut mem = GuestMem::new(&mut d.host, map, &frames);
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
        let plan = match &result {
            Ok(t) if !reserved => {
                let now = |e: &PathEntry<Gpa>| Self::read_gentry(d, &frames, e.addr).unwrap_or(0);
                let plan = Self::plan(d, &frames, v, va, &t.path, flavor, now);
                if plan.is_none() {
                    // Not foreseen (see above): reserve now, still counting the validated
                    // A/D writes as changes.
                    let validated = d.entries_written.wrapping_sub(written_before);
                    Self::reserve_fill(d)?;
                    written_before = d.entries_written.wrapping_sub(validated);
                }
                plan
            }
            // Not foreseen either: the walk that succeeded without A/D updates failed with
            // them (an A/D write the memory refused).
            Err(_) if !reserved => {
                Self::reserve_fill(d)?;
                None
            }
            _ => None,
        };
        match result {
            Ok(t) => Self::walked(
                d,
                &frames,
                v,
                va,
                access,
                &t,
                plan,
                false,
                written_before,
                read_fault,
                ec,
            ),
            Err(failure) => Self::walk_failed(d, &frames, v, va, guest_ec, &failure, None),
        }
    }

    /// A walk of the guest's tables through `frames`.
    fn guest_walk<H: MachineMemory>(
        d: &mut Domain<H>,
        frames: &FrameCache,
        env: WalkEnv<'_>,
        va: Gva,
        access: Access,
    ) -> Result<Translation<Gpa>, WalkFailure<Gpa>> {
        let map = match &d.p2m {
            Some(p2m) => FrameMap::Translated(p2m),
            None => FrameMap::Direct(&d.owned),
        };
        let mut mem = GuestMem::new(&mut d.host, map, frames);
        walk_mode::<G, Gpa, _>(&mut mem, env, va, access)
    }

    /// Whether a fault whose walk failed this way writes the not-present magic.
    fn installs_not_present<H: MachineMemory>(d: &Domain<H>, failure: &WalkFailure<Gpa>) -> bool {
        d.fast_path_on()
            && failure.error_code().is_some_and(|gec| !gec.present())
            && failure.path.last().is_some_and(|e| e.level == 1)
    }

    /// The end of a fault whose guest walk failed (its A/D writes, if any, validated).
    /// `plan`: the descent to the leaf, if it was worked out before anything changed
    /// (else the pool blocks of a fill are reserved).
    #[allow(clippy::too_many_arguments)]
    fn walk_failed<H: MachineMemory>(
        d: &mut Domain<H>,
        frames: &FrameCache,
        v: usize,
        va: Gva,
        guest_ec: PfErrorCode,
        failure: &WalkFailure<Gpa>,
        plan: Option<Plan>,
    ) -> Result<FaultOutcome, EngineError> {
        match failure.fault {
            WalkFault::PageFault(gec) => {
                if Self::installs_not_present(d, failure) {
                    Self::install_not_present(d, frames, v, va, &failure.path, plan)?;
                }
                Ok(FaultOutcome::Propagate(gec))
            }
            WalkFault::GeneralProtection => Err(EngineError::BadArgument(
                "#PF reported for a non-canonical address",
            )),
            // A guest table in unbacked guest-physical space reads as not present.
            WalkFault::Memory(_) => Ok(FaultOutcome::Propagate(guest_ec)),
            // Another vcpu keeps rewriting the guest's entries: the guest retries.
            WalkFault::Contended => Ok(FaultOutcome::Spurious),
        }
    }

    /// The end of a fault whose guest walk succeeded (its A/D writes, if any, validated):
    /// fill the shadows and say what the host must do. `plan`: the descent through shadows
    /// that all exist (without one, the pool blocks of a fill are reserved). `current`:
    /// whether `t.path` is what guest memory holds (the walk wrote nothing).
    /// `read_fault`: the read error code of a fault taken for a fetch.
    #[allow(clippy::too_many_arguments)]
    fn walked<H: MachineMemory>(
        d: &mut Domain<H>,
        frames: &FrameCache,
        v: usize,
        va: Gva,
        access: Access,
        t: &Translation<Gpa>,
        plan: Option<Plan>,
        current: bool,
        written_before: u64,
        read_fault: Option<PfErrorCode>,
        ec: PfErrorCode,
    ) -> Result<FaultOutcome, EngineError> {
        let flavor = d.vcpus[v].flavor;
        let gfn = t.frame;
        let target = frames.guest_frame(d, gfn);
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
        if access.is_write()
            && t.leaf_level > 0
            && t.path.last().is_some_and(|e| e.value & bits::D == 0)
        {
            d.stats.fault_dirty_bit += 1;
        }
        let prefetched = Self::fill(d, frames, v, va, &t.path, flavor, plan, current)?;
        // The walk's A/D updates, validated into the shadows, may be what fixed the fault
        // (entries prefetched next to it fix nothing for this access).
        let changed = d.entries_written.wrapping_sub(prefetched) != written_before;

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
            if d.config.refcounts == RefcountMode::Guest && d.store.is_page_table(mfn) {
                // With guest refcounts (PV) a page-table page is read-only to its guest,
                // which updates it through the explicit interface (a hypercall that calls
                // `validate_guest_pt_write`), so a direct write faults as a protection
                // violation instead of being emulated.
                return Ok(FaultOutcome::Propagate(PfErrorCode(
                    PfErrorCode::for_access_in(access, &d.vcpus[v].ctl, G::LEVELS).bits()
                        | PfErrorCode::P,
                )));
            }
            let wp0_write = !t.perms.write;
            if d.store.is_page_table(mfn) || wp0_write || d.write_scan_pending(mfn) {
                if !wp0_write && Self::try_unsync(d, v, va, access, mfn)? {
                    return Ok(FaultOutcome::Fixed);
                }
                return Ok(FaultOutcome::Emulate {
                    gpa: Self::gpa_of(gfn, va.raw()),
                });
            }
        }
        if changed {
            return Ok(FaultOutcome::Fixed);
        }
        // Nothing to fix: if the hardware faults the same way again, it refuses what the
        // guest's tables allow (SMAP with the live RFLAGS.AC, the live PKRU), and the guest
        // gets this code.
        let ctl = d.vcpus[v].ctl;
        let mut code = PfErrorCode::for_access_in(access, &ctl, G::LEVELS).bits() | PfErrorCode::P;
        if G::LEVELS == PagingLevels::Four {
            code |= ec.bits() & PfErrorCode::PK;
        }
        d.fault_unfixed = Some(PfErrorCode(code));
        Ok(FaultOutcome::Spurious)
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
        let Some(mut hw) = d.hardware_control(v) else {
            return Ok(None);
        };
        let feat = d.config.guest_features;
        if S::LEVELS == PagingLevels::Three {
            // PAE hardware walks from its PDPTE registers, loaded from the shadow root.
            match crate::paging::load_pae_pdptes::<Maddr, _>(&d.host, hw.cr3, &feat) {
                Ok(pdptes) => hw.pdptes = pdptes,
                Err(_) => return Ok(None),
            }
        }
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
        if last.level != 1 || Self::fast_path_out_of_sync(d, last.addr) {
            return Ok(None);
        }
        match d.decode_magic(last.value) {
            Some(Magic::NotPresent) => {
                d.stats.fast_path += 1;
                d.stats.fast_path_not_present += 1;
                Ok(Some(FaultOutcome::Propagate(guest_ec)))
            }
            Some(Magic::Mmio(gfn, _)) if d.mmio_magic_stale(crate::addr::Gfn::new(gfn)) => Ok(None),
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
    /// writes the leaf, then prefetches its neighbours. Returns the entries the prefetch
    /// wrote.
    #[allow(clippy::too_many_arguments)]
    fn fill<H: MachineMemory>(
        d: &mut Domain<H>,
        frames: &FrameCache,
        v: usize,
        va: Gva,
        path: &WalkPath<Gpa>,
        flavor: Flavor,
        plan: Option<Plan>,
        current: bool,
    ) -> Result<u64, EngineError> {
        let leaf = match plan {
            Some(plan) => Some(Self::follow(d, va, &plan, flavor)?),
            None => Self::descend(d, frames, v, va, path, flavor, true)?,
        };
        let Some(leaf) = leaf.filter(|l| !l.mapped) else {
            return Ok(0);
        };
        match leaf.superpage {
            Some((pde, gfn)) => {
                let pkey = Self::splinter_pkey(pde);
                let new = Self::fl1_sentry(d, frames, pde, gfn, pkey)?;
                // A first fill of the entry: the splinter may still be empty around it.
                let first = d.read_sentry(leaf.slot)? == 0;
                d.set_sentry(leaf.slot, new)?;
                let before = d.entries_written;
                if !(first && Self::fill_contiguous_splinter(d, va, pde, pkey, leaf.slot)?) {
                    Self::prefetch_splinter(d, frames, va, pde, gfn, pkey, leaf.slot)?;
                }
                Ok(d.entries_written.wrapping_sub(before))
            }
            None => {
                let entry = path
                    .at_level(1)
                    .ok_or(EngineError::Internal("walk path without a leaf"))?;
                // After A/D writes the entry must be read back.
                let gl1e = if current {
                    entry.value
                } else {
                    Self::read_gentry(d, frames, entry.addr).unwrap_or(0)
                };
                let new = Self::leaf_sentry(d, frames, gl1e, flavor)?;
                d.set_sentry(leaf.slot, new)?;
                let before = d.entries_written;
                Self::prefetch_leaves(d, frames, va, entry.addr, leaf.slot, flavor)?;
                Ok(d.entries_written.wrapping_sub(before))
            }
        }
    }

    /// Fills the empty splinter entries after the one a fill through guest superpage `pde`
    /// just wrote at `slot` (for frame `gfn` at `va`), up to [`PREFETCH_SPLINTER`] of them and
    /// the end of the splinter shadow (which covers no more than the superpage). Each is
    /// exactly what a fault on it would write: the upper shadow entry carries the guest's
    /// rights and D, and a frame that may not be written (a page table, log-dirty) is
    /// mapped read-only.
    #[allow(clippy::too_many_arguments)]
    fn prefetch_splinter<H: MachineMemory>(
        d: &mut Domain<H>,
        frames: &FrameCache,
        va: Gva,
        pde: u64,
        gfn: Gfn,
        pkey: u8,
        slot: Maddr,
    ) -> Result<(), EngineError> {
        let first = Self::soffset(1, va.raw());
        let base = slot.raw() - first;
        for k in 1..=PREFETCH_SPLINTER {
            let offset = Self::soffset(1, va.raw() + (k << 12));
            if offset <= first {
                break;
            }
            let s = Maddr::new(base + offset);
            if d.read_sentry(s)? != 0 {
                continue;
            }
            let next = Gfn::new(gfn.raw() + k);
            let entry = Self::fl1_sentry(d, frames, pde, next, pkey)?;
            if entry != 0 {
                d.set_sentry(s, entry)?;
                d.stats.prefetched += 1;
            }
        }
        Ok(())
    }

    /// Marks the empty shadow entries after a not-present leaf whose guest entries are not
    /// present either (Xen's prefetch, for not-present entries only: a read and a write each,
    /// no p2m lookup), so that the demand fault next door takes the fast path. Only on the
    /// propagated-fault path: fills stay as cheap as they were.
    fn prefetch_not_present<H: MachineMemory>(
        d: &mut Domain<H>,
        frames: &FrameCache,
        va: Gva,
        gl1e: Gpa,
        slot: Maddr,
    ) -> Result<(), EngineError> {
        if !d.fast_path_on() || Self::l1_out_of_sync(d, frames, gl1e) {
            return Ok(());
        }
        let first = Self::soffset(1, va.raw());
        let base = slot.raw() - first;
        for k in 1..=PREFETCH_NOT_PRESENT {
            let gaddr = gl1e.raw() + k * G::ENTRY_BYTES;
            let offset = Self::soffset(1, va.raw() + (k << 12));
            // Stop at the end of the guest table or of the shadow.
            if gaddr >> 12 != gl1e.raw() >> 12 || offset <= first {
                break;
            }
            let s = Maddr::new(base + offset);
            if d.read_sentry(s)? != 0 {
                continue;
            }
            if Self::read_gentry(d, frames, Gpa::new(gaddr)).is_some_and(|g| g & bits::P == 0) {
                d.set_sentry(s, MAGIC | MAGIC_NOT_PRESENT)?;
            }
        }
        Ok(())
    }

    /// After a walk that failed on a not-present guest L1 entry, writes the not-present
    /// magic into the shadow L1 entry (when the upper levels are shadowable), so that the
    /// next such fault takes the fast path.
    /// `plan`: the descent, if it was worked out before anything changed (else the pool
    /// blocks of a fill are reserved).
    fn install_not_present<H: MachineMemory>(
        d: &mut Domain<H>,
        frames: &FrameCache,
        v: usize,
        va: Gva,
        path: &WalkPath<Gpa>,
        plan: Option<Plan>,
    ) -> Result<(), EngineError> {
        let flavor = d.vcpus[v].flavor;
        let leaf = match plan {
            Some(plan) => Some(Self::follow(d, va, &plan, flavor)?),
            None => Self::descend(d, frames, v, va, path, flavor, false)?,
        };
        if let Some(leaf) = leaf
            && leaf.superpage.is_none()
            && !leaf.mapped
        {
            d.set_sentry(leaf.slot, MAGIC | MAGIC_NOT_PRESENT)?;
            if let Some(entry) = path.last() {
                Self::prefetch_not_present(d, frames, va, entry.addr, leaf.slot)?;
            }
        }
        Ok(())
    }

    /// Walks down the shadows for `va` along the guest `path`, creating missing shadows and
    /// linking them, and returns the leaf slot. Stops (None) where a guest entry cannot be
    /// shadowed yet (A clear, or `strict` is false and an entry is not linkable).
    fn descend<H: MachineMemory>(
        d: &mut Domain<H>,
        frames: &FrameCache,
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
            let gentry = Self::read_gentry(d, frames, entry.addr).unwrap_or(0);
            if !Self::linkable(d, gentry, level, flavor) {
                if strict {
                    return Err(EngineError::Internal("a walked entry is not shadowable"));
                }
                return Ok(None);
            }
            let gindex = G::index(va.raw(), level) as u64;
            if level == 2 && Self::map_superpage(d, shadow, gindex, gentry, flavor)? {
                return Ok(Some(Leaf {
                    slot: Maddr::new(shadow.base().raw() + Self::soffset(2, va.raw())),
                    superpage: None,
                    mapped: true,
                }));
            }
            let Some(key) = Self::child_key(d, frames, gentry, level, flavor)? else {
                return Ok(None);
            };
            let (child, _) = d.get_or_create(key)?;
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
                    mapped: false,
                }));
            }
            shadow = child;
            level -= 1;
        }
        Ok(Some(Leaf {
            slot: Maddr::new(shadow.base().raw() + Self::soffset(1, va.raw())),
            superpage: None,
            mapped: false,
        }))
    }

    /// The descent [`Engine::descend`] would make along `path` when every shadow on the way
    /// exists and every entry can be linked, worked out without changing anything; None
    /// when something would be created, or the descent would stop or fail (the caller then
    /// reserves and descends). `gentry_of` gives each path entry's value as the descent
    /// will read it.
    #[allow(clippy::too_many_arguments)]
    fn plan<H: MachineMemory>(
        d: &Domain<H>,
        frames: &FrameCache,
        v: usize,
        va: Gva,
        path: &WalkPath<Gpa>,
        flavor: Flavor,
        gentry_of: impl Fn(&PathEntry<Gpa>) -> u64,
    ) -> Option<Plan> {
        let top_index = if G::NUM_LEVELS == 3 {
            ((va.raw() >> 30) & 3) as usize
        } else {
            0
        };
        let top = d.vcpus.get(v)?.tops.get(top_index).copied().flatten()?;
        let mut shadow = top;
        let unused = PlannedLink {
            level: 0,
            gentry: 0,
            child: top,
        };
        let mut links = [unused; 4];
        let mut len = 0;
        let mut level = Self::HASHED_TOP;
        while level >= 2 {
            let gentry = gentry_of(path.at_level(level)?);
            // Not linkable: a strict descent fails and a lax one stops, after linking the
            // levels above; either way the careful path decides.
            if !Self::linkable(d, gentry, level, flavor) {
                return None;
            }
            // A superpage the shadows may map as one: the careful path decides.
            let gindex = G::index(va.raw(), level) as u64;
            if level == 2 && Self::superpage_possible(d, gentry, gindex, flavor) {
                return None;
            }
            let key = Self::child_key(d, frames, gentry, level, flavor).ok()??;
            let child = d.store.lookup(&key)?;
            *links.get_mut(len)? = PlannedLink {
                level,
                gentry,
                child,
            };
            len += 1;
            if key.kind.is_fl1() {
                let frames_shift = G::shift(level) - 12;
                let index = (va.raw() >> 12) & ((1u64 << frames_shift) - 1);
                let base = gfn_of(G::entry_address(gentry, level, true));
                let leaf = Leaf {
                    slot: Maddr::new(child.base().raw() + index * S::ENTRY_BYTES),
                    superpage: Some((gentry, crate::addr::Gfn::new(base.raw() + index))),
                    mapped: false,
                };
                return Some(Plan {
                    top,
                    links,
                    len,
                    leaf,
                });
            }
            shadow = child;
            level -= 1;
        }
        let leaf = Leaf {
            slot: Maddr::new(shadow.base().raw() + Self::soffset(1, va.raw())),
            superpage: None,
            mapped: false,
        };
        Some(Plan {
            top,
            links,
            len,
            leaf,
        })
    }

    /// Writes the links of a [`Plan`], top down, as [`Engine::descend`] would, and returns
    /// its leaf. Linking cannot invalidate a later step: a changed link can only unhash the
    /// old child of its own level, whose kind no other step of the plan has.
    fn follow<H: MachineMemory>(
        d: &mut Domain<H>,
        va: Gva,
        plan: &Plan,
        flavor: Flavor,
    ) -> Result<Leaf, EngineError> {
        let mut shadow = plan.top;
        for link in plan.links.iter().take(plan.len) {
            let gindex = G::index(va.raw(), link.level) as u64;
            Self::link(
                d,
                shadow,
                link.level,
                gindex,
                link.gentry,
                Some(link.child),
                flavor,
            )?;
            shadow = link.child;
        }
        Ok(plan.leaf)
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
}

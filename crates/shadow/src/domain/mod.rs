//! A shadowed domain: its start-of-domain modes, vcpus, pool, p2m, shadows, log-dirty state
//! and statistics, and the operations of seed slide "Interface to the rest of Xen".
//!
//! All of it sits behind one lock, the shadow lock: every operation takes `&mut Domain`, so
//! no shadow can be touched without exclusive access; a host shares a domain between
//! threads through [`ShadowLock`] (with the `std` feature) or its own mutex.

mod config;
mod control;
mod emulate_ops;
pub(crate) mod entries;
pub(crate) mod guest_mem;
mod hole;
mod limbo;
pub(crate) mod marker;
mod memory_ops;
pub(crate) mod oos;
mod overwrite;
mod teardown;
mod vcpu;

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;

pub use config::{DomainConfig, EngineError, GuestFault, RefcountMode};
pub use control::{CleanProgress, ShadowOp, ShadowOpResult};
pub use emulate_ops::EmulateOutcome;
pub use oos::OosStats;
pub use teardown::TeardownProgress;
pub(crate) use vcpu::RootLoad;
pub use vcpu::Vcpu;

use crate::addr::{Gfn, Gva, Mfn};
use crate::flush::{Flush, VcpuSet};
use crate::hash::ShadowStore;
use crate::host::MachineMemory;
use crate::log_dirty::DirtyLog;
use crate::multi::{FaultOutcome, Pair};
use crate::p2m::P2m;
use crate::paging::{ControlState, PagingLevels, PfErrorCode, bits::cr};
use crate::pool::Pool;
use crate::stats::Stats;
use guest_mem::FrameMap;

/// Pool blocks set aside before an operation changes anything, so that the operation
/// cannot fail half-way for want of a shadow page.
#[derive(Clone, Debug, Default)]
pub(crate) struct Reserve {
    blocks: Vec<(Mfn, u8)>,
}

/// A shadowed domain. See the module documentation.
#[derive(Debug)]
pub struct Domain<H: MachineMemory> {
    pub(crate) host: H,
    pub(crate) config: DomainConfig,
    pub(crate) pool: Pool,
    pub(crate) pool_target: usize,
    pub(crate) p2m: Option<P2m>,
    /// Machine frame -> guest frames mapping it (the reverse of the p2m).
    pub(crate) m2p: BTreeMap<Mfn, BTreeSet<Gfn>>,
    /// Frames a non-translated domain owns.
    pub(crate) owned: BTreeSet<Mfn>,
    /// Guest frames whose p2m entry is writable: vcpus with paging disabled run on the p2m,
    /// so entries start read-only and become writable on a first write, and this set is
    /// what log-dirty mode and page-table promotion must re-protect.
    pub(crate) p2m_writable: BTreeSet<Gfn>,
    /// Frames of the hypervisor that no guest mapping may point at.
    pub(crate) hypervisor_frames: BTreeSet<Mfn>,
    pub(crate) store: ShadowStore,
    pub(crate) vcpus: Vec<Vcpu>,
    pub(crate) log_dirty: Option<DirtyLog>,
    pub(crate) cleaning: Option<control::Cleaning>,
    pub(crate) test_mode: bool,
    pub(crate) stats: Stats,
    pub(crate) reserve: Reserve,
    /// TLB flushes owed by the operation in progress.
    pub(crate) pending_flush: VcpuSet,
    /// A failed operation left a flush owed: nothing else runs until the host takes it with
    /// [`Domain::take_flush`].
    pub(crate) flush_owed: bool,
    /// Shadow pages torn down while some vcpu's paging-structure caches may still walk them.
    pub(crate) limbo: limbo::Limbo,
    /// Shadows that hardware may have walked since the last flush handed out: upper entries
    /// pointing at them were cleared, or a vcpu stopped using them as tops, in this operation.
    /// Torn down in this operation, they wait in the limbo for the flush.
    pub(crate) hot: BTreeSet<Mfn>,
    /// Set while a shadow that no hardware can reach is torn down: the references it drops
    /// do not make its children hot.
    pub(crate) reaping_cold: bool,
    /// Set while the steps of a long operation run one after the other inside one host
    /// call (no flush is carried out between them).
    pub(crate) in_one_call: bool,
    /// Vcpus whose hardware must reload CR3 (their root or its PDPTEs changed).
    pub(crate) pending_reload: VcpuSet,
    /// Vcpus whose top-level shadow was removed: their roots are rebuilt at the end of the
    /// operation that removed it.
    pub(crate) needs_root: VcpuSet,
    pub(crate) failed: Option<EngineError>,
    /// Shadow entries changed so far (tells a fix from a spurious fault).
    pub(crate) entries_written: u64,
    /// Set by a fault that found nothing to fix: the error code the guest gets if the
    /// hardware raises the same fault again (see [`Domain::page_fault`]).
    pub(crate) fault_unfixed: Option<PfErrorCode>,
    /// The searches' state between calls: the write-access scan's cursor and the frames
    /// waiting for it, the fork/exit heuristic's per-vcpu run (see [`crate::remove`]).
    pub(crate) remove: crate::remove::RemoveState,
    /// The reverse map, when the domain keeps one.
    #[cfg(feature = "rmap")]
    pub(crate) rmap: Option<crate::rmap::ReverseMap>,
    /// The teardown under way (the domain accepts no other operation).
    pub(crate) teardown: Option<teardown::Teardown>,
    /// The host's L4 entry for the hypervisor hole of every 4-level top (0: none), see
    /// [`Domain::set_hypervisor_l3`].
    pub(crate) hole_entry: u64,
    /// Out-of-sync pages and their snapshots (see [`oos`]).
    pub(crate) oos: oos::OutOfSync,
    /// Shadow superpage entries and what allows them (see [`crate::superpage`]).
    pub(crate) superpages: crate::superpage::SuperpageIndex,
}

impl<H: MachineMemory> Domain<H> {
    /// Creates a domain on `host` with the given start-of-domain modes: builds the pool and
    /// (translated domains) an empty p2m. Every vcpu starts with paging disabled.
    pub fn new(mut host: H, config: DomainConfig) -> Result<Domain<H>, EngineError> {
        if config.vcpus == 0 || config.vcpus > 64 {
            return Err(EngineError::BadArgument("vcpus must be 1..=64"));
        }
        if config.reverse_map && !cfg!(feature = "rmap") {
            return Err(EngineError::BadArgument(
                "a reverse map needs the engine's rmap feature",
            ));
        }
        if !(32..=52).contains(&config.host_maxphyaddr) {
            return Err(EngineError::BadArgument("host MAXPHYADDR must be 32..=52"));
        }
        if config.shadow_levels == PagingLevels::Zero {
            return Err(EngineError::BadArgument(
                "shadow tables need 2, 3 or 4 levels",
            ));
        }
        if config.max_out_of_sync > DomainConfig::MAX_OUT_OF_SYNC {
            return Err(EngineError::BadArgument(
                "more out-of-sync pages than DomainConfig::MAX_OUT_OF_SYNC",
            ));
        }
        if config.pool_pages > DomainConfig::MAX_POOL_PAGES {
            return Err(EngineError::BadArgument(
                "the shadow pool is larger than DomainConfig::MAX_POOL_PAGES",
            ));
        }
        let pool_target = config.pool_pages.max(config.min_pool_pages());
        let mut pool = Pool::new();
        loop {
            match pool.resize_step(&mut host, pool_target, 64)? {
                crate::pool::ResizeProgress::Done => break,
                crate::pool::ResizeProgress::More => {}
                crate::pool::ResizeProgress::NeedsEviction { .. } => {
                    return Err(EngineError::Internal("a new pool needs eviction"));
                }
            }
        }
        let p2m = if config.translated {
            Some(P2m::new(&mut host, config.shadow_levels)?)
        } else {
            None
        };
        let mut config = config;
        config.guest_features.pdpe1gb = false;
        Ok(Domain {
            host,
            config,
            pool,
            pool_target,
            p2m,
            m2p: BTreeMap::new(),
            owned: BTreeSet::new(),
            p2m_writable: BTreeSet::new(),
            hypervisor_frames: BTreeSet::new(),
            store: ShadowStore::new(),
            vcpus: alloc::vec![Vcpu::default(); config.vcpus],
            log_dirty: None,
            cleaning: None,
            test_mode: false,
            stats: Stats::default(),
            reserve: Reserve::default(),
            pending_flush: VcpuSet::NONE,
            flush_owed: false,
            limbo: limbo::Limbo::default(),
            hot: BTreeSet::new(),
            reaping_cold: false,
            in_one_call: false,
            pending_reload: VcpuSet::NONE,
            needs_root: VcpuSet::NONE,
            failed: None,
            entries_written: 0,
            fault_unfixed: None,
            remove: crate::remove::RemoveState::default(),
            #[cfg(feature = "rmap")]
            rmap: config.reverse_map.then(crate::rmap::ReverseMap::new),
            teardown: None,
            hole_entry: 0,
            oos: oos::OutOfSync::default(),
            superpages: crate::superpage::SuperpageIndex::default(),
        })
    }

    /// The start-of-domain modes.
    pub fn config(&self) -> &DomainConfig {
        &self.config
    }
    /// The host (machine memory).
    pub fn host(&self) -> &H {
        &self.host
    }
    /// The host, mutably. Writing guest page tables behind the engine's back breaks the
    /// shadows: call [`Domain::validate_guest_pt_write`] after such a write.
    pub fn host_mut(&mut self) -> &mut H {
        &mut self.host
    }
    /// The shadow pool.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }
    /// The p2m (translated domains).
    pub fn p2m(&self) -> Option<&P2m> {
        self.p2m.as_ref()
    }
    /// The shadows.
    pub fn shadows(&self) -> &ShadowStore {
        &self.store
    }
    /// The shadow superpage entries.
    pub fn superpages(&self) -> &crate::superpage::SuperpageIndex {
        &self.superpages
    }
    /// The counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }
    /// A vcpu.
    pub fn vcpu(&self, v: usize) -> Option<&Vcpu> {
        self.vcpus.get(v)
    }
    /// Number of vcpus.
    pub fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }
    /// Why the domain failed, if it did.
    pub fn failure(&self) -> Option<EngineError> {
        self.failed
    }
    /// Whether log-dirty mode is on.
    pub fn log_dirty_enabled(&self) -> bool {
        self.log_dirty.is_some()
    }
    /// Whether shadow test mode is on.
    pub fn test_mode(&self) -> bool {
        self.test_mode
    }
    /// Hypervisor frames: no guest mapping may point at them.
    pub fn hypervisor_frames(&self) -> impl Iterator<Item = Mfn> + '_ {
        self.hypervisor_frames.iter().copied()
    }
    /// Frames a non-translated domain owns.
    pub fn owned_frames(&self) -> impl Iterator<Item = Mfn> + '_ {
        self.owned.iter().copied()
    }

    /// How guest frames become machine frames in this domain.
    pub(crate) fn frame_map(&self) -> FrameMap<'_> {
        match &self.p2m {
            Some(p2m) => FrameMap::Translated(p2m),
            None => FrameMap::Direct(&self.owned),
        }
    }

    /// The machine frame and type behind a guest frame.
    pub fn guest_frame(&self, gfn: Gfn) -> Option<(Mfn, crate::p2m::P2mType)> {
        self.frame_map().lookup(&self.host, gfn)
    }

    /// Sets a vcpu's guest control registers (the host calls this on CR0/CR3/CR4/EFER
    /// writes, then [`Domain::update_paging_modes`] or [`Domain::update_cr3`]).
    pub fn set_control(&mut self, v: usize, ctl: ControlState) -> Result<(), EngineError> {
        let vcpu = self
            .vcpus
            .get_mut(v)
            .ok_or(EngineError::BadArgument("no such vcpu"))?;
        let pdptes = vcpu.ctl.pdptes;
        vcpu.ctl = ctl;
        // The PDPTE registers only change at a CR3 load, which the engine performs.
        vcpu.ctl.pdptes = pdptes;
        Ok(())
    }

    /// The control state the hardware must run a vcpu with to walk its shadows: paging on,
    /// CR0.WP set (so that read-only shadow entries trap supervisor writes), the shadow
    /// mode's PAE/LMA and NXE (PSE for 2-level shadows), the guest's SMEP/SMAP/PGE where the guest pages, its PKE
    /// where both it and the shadows are 4-level, and CR3 = the shadow root.
    pub fn hardware_control(&self, v: usize) -> Option<ControlState> {
        let vcpu = self.vcpus.get(v)?;
        let root = vcpu.root?;
        let guest = &vcpu.ctl;
        let mut cr4 = 0;
        if guest.levels() != PagingLevels::Zero {
            cr4 |= guest.cr4 & (cr::CR4_SMEP | cr::CR4_SMAP | cr::CR4_PGE);
        }
        // Protection keys exist only in 4-level paging: a 2- or 3-level guest that sets
        // CR4.PKE has none, and 4-level hardware would apply PKRU to its every user access.
        if guest.levels() == PagingLevels::Four && self.config.shadow_levels == PagingLevels::Four {
            cr4 |= guest.cr4 & cr::CR4_PKE;
        }
        let mut efer = 0;
        match self.config.shadow_levels {
            PagingLevels::Four => {
                cr4 |= cr::CR4_PAE;
                efer |= cr::EFER_LME | cr::EFER_LMA | cr::EFER_NXE;
            }
            PagingLevels::Three => {
                cr4 |= cr::CR4_PAE;
                efer |= cr::EFER_NXE;
            }
            // 4 MiB shadow superpage entries.
            PagingLevels::Two => cr4 |= cr::CR4_PSE,
            PagingLevels::Zero => {}
        }
        Some(ControlState {
            cr0: cr::CR0_PE | cr::CR0_PG | cr::CR0_WP,
            cr3: root.base().raw(),
            cr4,
            efer,
            rflags: guest.rflags,
            pkru: guest.pkru,
            pdptes: [0; 4],
        })
    }

    /// Vcpus whose hardware must reload CR3 from [`Domain::hardware_control`] (their root,
    /// or the PDPTEs a PAE root holds, changed). Taking the set clears it.
    pub fn take_reloads(&mut self) -> VcpuSet {
        core::mem::take(&mut self.pending_reload)
    }

    /// Runs `op`, failing the domain on a fatal error and returning the TLB flush the
    /// operation owes. A non-fatal error that leaves a flush owed (the operation changed
    /// shadows before it failed) blocks the domain until the host takes the flush with
    /// [`Domain::take_flush`], so that no owed flush can be lost.
    pub(crate) fn run<T>(
        &mut self,
        op: impl FnOnce(&mut Self) -> Result<T, EngineError>,
    ) -> Result<(T, Flush), EngineError> {
        if self.failed.is_some() || self.teardown.is_some() {
            return Err(EngineError::DomainFailed);
        }
        self.stats.start_call();
        if self.flush_owed {
            return Err(EngineError::FlushOwed);
        }
        // The host carried out every flush it was handed before calling again (but not
        // between the steps of one of its calls).
        if !self.in_one_call {
            if let Err(e) = self.limbo.release(&mut self.pool) {
                self.failed = Some(EngineError::Pool(e));
                return Err(EngineError::Pool(e));
            }
            self.hot.clear();
        }
        let result = op(self);
        self.release_reserve();
        let result = result.and_then(|value| {
            self.reap(8)?;
            if self.test_mode && !crate::audit::audit(self).is_clean() {
                return Err(EngineError::Internal("shadow test mode: the audit failed"));
            }
            Ok(value)
        });
        if self.limbo.owes_flush() {
            self.pending_flush = self.all_vcpus();
        }
        match result {
            Ok(value) => Ok((value, self.hand_out_flush())),
            Err(e) => {
                if e.is_fatal() {
                    self.failed = Some(e);
                } else if !self.pending_flush.is_empty() {
                    self.flush_owed = true;
                }
                Err(e)
            }
        }
    }

    /// The flush owed so far, as a token for the host; a flush of every vcpu lets the shadow
    /// pages torn down before it be reused once the host calls again.
    fn hand_out_flush(&mut self) -> Flush {
        let vcpus = core::mem::take(&mut self.pending_flush);
        let all = self.all_vcpus();
        if vcpus.0 & all.0 == all.0 {
            self.limbo.flush_handed_out();
        }
        if !vcpus.is_empty() {
            self.stats.flushes += 1;
        }
        Flush::of(vcpus)
    }

    /// Hands out the flush that a failed operation owes (it changed shadows before it
    /// failed). After an error, a host calls this and carries the flush out, with
    /// [`Domain::take_reloads`], before the guest runs again; until then every operation
    /// fails with [`EngineError::FlushOwed`].
    pub fn take_flush(&mut self) -> Flush {
        self.flush_owed = false;
        self.hand_out_flush()
    }

    fn check_vcpu(&self, v: usize) -> Result<(), EngineError> {
        if v < self.vcpus.len() {
            Ok(())
        } else {
            Err(EngineError::BadArgument("no such vcpu"))
        }
    }

    /// Chooses the vcpu's M-on-N pair from its control state (CR0.PG, CR4.PAE, EFER.LMA) and
    /// loads its shadow root. Call after any change of CR0, CR4 or EFER. A PAE guest's PDPTE
    /// registers are loaded from memory only by the changes that load them on hardware (SDM
    /// 4.4.1); reserved bits in one give `Guest(GeneralProtection)`. A refused change leaves
    /// the vcpu exactly as it was, its control registers included.
    pub fn update_paging_modes(&mut self, v: usize) -> Result<Flush, EngineError> {
        self.check_vcpu(v)?;
        let result = self.run(|d| {
            d.stats.mode_updates += 1;
            d.resync_all(oos::ResyncReason::Cr3)?;
            let vcpu = &d.vcpus[v];
            let (ctl, before) = (vcpu.ctl, vcpu.applied);
            let levels = ctl.levels();
            let pair =
                Pair::new(levels, d.config.shadow_levels).ok_or(EngineError::UnsupportedPair {
                    guest: levels.count(),
                    shadow: d.config.shadow_levels.count(),
                })?;
            if levels == PagingLevels::Zero && d.p2m.is_none() {
                return Err(EngineError::BadArgument(
                    "a non-translated guest cannot run with paging disabled",
                ));
            }
            let pdptes = if vcpu::mode_change_loads_pdptes(&before, &ctl) {
                d.read_pdptes(ctl.cr3)?
            } else if levels == PagingLevels::Three {
                ctl.pdptes
            } else {
                [0; 4]
            };
            let load = RootLoad {
                pdptes,
                flavor: d.vcpus[v].wanted_flavor(),
                fresh: true,
            };
            pair.update_cr3(d, v, load)?;
            d.vcpus[v].pair = Some(pair);
            d.pending_flush = d.pending_flush.union(VcpuSet::one(v));
            d.vcpus[v].applied = d.vcpus[v].ctl;
            Ok(())
        });
        self.settle_control(v, result)
    }

    /// Loads the shadow of the guest's new CR3 (a cached top-level shadow is reused). Call
    /// after a guest CR3 write. In PAE mode this loads the guest's four PDPTEs, as the
    /// hardware does; reserved bits in a present one give `Guest(GeneralProtection)` and
    /// leave the vcpu as it was.
    pub fn update_cr3(&mut self, v: usize) -> Result<Flush, EngineError> {
        self.check_vcpu(v)?;
        let result = self.run(|d| {
            let pair = d.vcpus[v]
                .pair
                .ok_or(EngineError::BadArgument("update_paging_modes first"))?;
            d.resync_all(oos::ResyncReason::Cr3)?;
            let ctl = d.vcpus[v].ctl;
            let pdptes = if ctl.levels() == PagingLevels::Three {
                d.read_pdptes(ctl.cr3)?
            } else {
                [0; 4]
            };
            let flavor = d.vcpus[v].wanted_flavor();
            let fresh = flavor != d.vcpus[v].flavor;
            pair.update_cr3(
                d,
                v,
                RootLoad {
                    pdptes,
                    flavor,
                    fresh,
                },
            )?;
            d.vcpus[v].applied = d.vcpus[v].ctl;
            Ok(())
        });
        self.settle_control(v, result)
    }

    /// A refused control-register write leaves the vcpu's registers as they were; a
    /// preempted one keeps the new registers, for the host to call again and go on.
    fn settle_control(
        &mut self,
        v: usize,
        result: Result<((), Flush), EngineError>,
    ) -> Result<Flush, EngineError> {
        if result.as_ref().is_err_and(|e| *e != EngineError::Preempted)
            && let Some(vcpu) = self.vcpus.get_mut(v)
            && vcpu.pair.is_some()
        {
            vcpu.ctl = vcpu.applied;
        }
        result.map(|((), f)| f)
    }

    /// Rebuilds the roots of the vcpus whose top-level shadow was removed, with the PDPTE
    /// registers they hold (a rebuild is not a CR3 load: the guest's PDPT is not re-read).
    /// A vcpu whose rebuild fails (the pool needs a flush carried out first) keeps no root
    /// until [`Domain::load_roots`] succeeds.
    pub(crate) fn rebuild_roots(&mut self) -> Result<(), EngineError> {
        // A rebuild is not the guest's own CR3 load: it does no write-access scan.
        self.remove.rebuilding = true;
        let result = self.rebuild_needed_roots();
        self.remove.rebuilding = false;
        result
    }

    fn rebuild_needed_roots(&mut self) -> Result<(), EngineError> {
        for v in 0..self.vcpus.len() {
            if !self.needs_root.contains(v) {
                continue;
            }
            if let Some(pair) = self.vcpus[v].pair {
                let load = RootLoad {
                    pdptes: self.vcpus[v].ctl.pdptes,
                    flavor: self.vcpus[v].flavor,
                    fresh: false,
                };
                pair.update_cr3(self, v, load)?;
            }
            self.needs_root = VcpuSet(self.needs_root.0 & !VcpuSet::one(v).0);
        }
        Ok(())
    }

    /// Vcpus left without a shadow root by an operation that failed or was preempted after
    /// it removed their top-level shadows ([`Domain::hardware_control`] is `None` for them):
    /// the host must not run them until [`Domain::load_roots`] has succeeded.
    pub fn rootless(&self) -> VcpuSet {
        self.needs_root
    }

    /// Rebuilds the roots of the [`Domain::rootless`] vcpus from the registers they hold.
    /// `Preempted` asks for the owed flush ([`Domain::take_flush`]) to be carried out and the
    /// call repeated.
    pub fn load_roots(&mut self) -> Result<Flush, EngineError> {
        self.run(|d| d.rebuild_roots()).map(|((), f)| f)
    }

    /// Reads the PAE PDPTEs named by `cr3` through guest memory (SDM 4.4.1): #GP for
    /// reserved bits in a present one, or a PDPT outside RAM.
    fn read_pdptes(&mut self, cr3: u64) -> Result<[u64; 4], EngineError> {
        let feat = self.config.guest_features;
        let map = match &self.p2m {
            Some(p2m) => guest_mem::FrameMap::Translated(p2m),
            None => guest_mem::FrameMap::Direct(&self.owned),
        };
        let frames = guest_mem::FrameCache::new();
        let mem = guest_mem::GuestMem::new(&mut self.host, map, &frames);
        crate::paging::load_pae_pdptes::<crate::addr::Gpa, _>(&mem, cr3, &feat)
            .map_err(|_| EngineError::Guest(GuestFault::GeneralProtection))
    }

    /// Handles a page fault the hardware raised while running vcpu `v` on its shadows.
    ///
    /// `error_code` is the hardware's. A host that knows the access was an instruction
    /// fetch (CR2 equals RIP) should set I even where the hardware cannot report it
    /// (32-bit shadows without CR4.SMEP); otherwise the engine resolves the ambiguity as
    /// well as it can.
    ///
    /// The guest's walk uses the vcpu's control state, whose RFLAGS.AC and PKRU are copies
    /// the guest can change without an exit. A fault the engine finds nothing to fix for is
    /// answered `Spurious`; raised again at once (same address and error code, no shadow
    /// entry written since), it is propagated, so no fault is retried for ever.
    pub fn page_fault(
        &mut self,
        v: usize,
        va: Gva,
        error_code: PfErrorCode,
    ) -> Result<(FaultOutcome, Flush), EngineError> {
        self.check_vcpu(v)?;
        self.run(|d| {
            d.stats.faults += 1;
            let pair = d.vcpus[v]
                .pair
                .ok_or(EngineError::BadArgument("vcpu has no paging mode yet"))?;
            if !linear_address_fits(pair.guest(), va) {
                return Err(EngineError::BadArgument(
                    "no page fault at this address in the vcpu's mode: a linear address has 32 bits outside long mode and is canonical in it",
                ));
            }
            let start = d.entries_written;
            let previous = d.vcpus[v].unfixed.take();
            d.fault_unfixed = None;
            let outcome = d.shadow_fault(v, va, |d| pair.page_fault(d, v, va, error_code))?;
            let outcome = match (outcome, d.fault_unfixed.take()) {
                // The hardware raised again the fault it raised last, on the same shadow
                // entries (none written since), and the guest's walk still allows the
                // access: what refuses it is state only the hardware sees as it is now
                // (RFLAGS.AC for SMAP, PKRU), not the engine's copy. The guest gets the
                // fault instead of retrying for ever.
                (FaultOutcome::Spurious, Some(code))
                    if previous == Some((va, error_code, start)) && d.entries_written == start =>
                {
                    FaultOutcome::Propagate(code)
                }
                (FaultOutcome::Spurious, Some(_)) => {
                    d.vcpus[v].unfixed = Some((va, error_code, d.entries_written));
                    FaultOutcome::Spurious
                }
                (outcome, _) => outcome,
            };
            match outcome {
                FaultOutcome::Fixed => d.stats.fault_fixed += 1,
                FaultOutcome::Spurious => d.stats.fault_spurious += 1,
                FaultOutcome::Propagate(_) => d.stats.fault_propagated += 1,
                FaultOutcome::Emulate { .. } => d.stats.fault_emulate += 1,
                FaultOutcome::Mmio { .. } => d.stats.fault_mmio += 1,
            }
            Ok(outcome)
        })
    }

    /// INVLPG by the guest: returns whether the hardware must flush `va`, and the flush
    /// the engine needs besides (an out-of-sync page the address's walk goes through is
    /// brought back in sync, which may take rights away).
    pub fn invlpg(&mut self, v: usize, va: Gva) -> Result<(bool, Flush), EngineError> {
        self.check_vcpu(v)?;
        self.run(|d| {
            d.stats.invlpg += 1;
            let pair = d.vcpus[v]
                .pair
                .ok_or(EngineError::BadArgument("vcpu has no paging mode yet"))?;
            pair.invlpg(d, v, va)
        })
    }
}

/// A domain behind a mutex: the shadow lock, for hosts that share a domain between threads.
#[cfg(feature = "std")]
#[derive(Debug)]
pub struct ShadowLock<H: MachineMemory>(std::sync::Mutex<Domain<H>>);

#[cfg(feature = "std")]
impl<H: MachineMemory> ShadowLock<H> {
    /// Wraps a domain.
    pub fn new(domain: Domain<H>) -> Self {
        ShadowLock(std::sync::Mutex::new(domain))
    }
    /// Takes the shadow lock. A poisoned lock (a thread panicked while holding it) is
    /// still handed out: the domain's own state says whether it failed.
    pub fn lock(&self) -> std::sync::MutexGuard<'_, Domain<H>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests;

/// Whether `va` is a linear address a vcpu in `levels` paging can fault on: 32 bits outside
/// long mode, canonical (bits 63:47 equal) in it. The hardware raises #GP, not #PF, for a
/// non-canonical one, so only a host's mistake passes one.
fn linear_address_fits(levels: PagingLevels, va: Gva) -> bool {
    let raw = va.raw();
    if levels == PagingLevels::Four {
        let upper = raw >> 47;
        upper == 0 || upper == (1 << 17) - 1
    } else {
        raw <= u64::from(u32::MAX)
    }
}

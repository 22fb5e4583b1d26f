//! Start-of-domain shadow modes (seed slide "Start-of-domain shadow modes") and the errors
//! of engine operations.

use core::fmt;

use crate::addr::{Gva, Mfn};
use crate::p2m::P2mError;
use crate::paging::{CpuFeatures, PagingLevels};
use crate::pool::PoolError;
use crate::remove::{LinearMapHint, TeardownHints};

/// Whose reference counts keep guest page-table pages typed: the shadow code's own (HVM
/// guests) or the guest's, validated by the hypervisor (PV guests).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RefcountMode {
    /// The engine counts shadow references itself.
    Shadow,
    /// The guest keeps its page-table pages typed itself (PV): they are read-only to it,
    /// and it changes them through the explicit interface (a hypercall that writes and calls
    /// [`crate::Domain::validate_guest_pt_write`]). A direct write to a shadowed page table
    /// is a protection fault for the guest instead of being emulated.
    Guest,
}

/// The modes fixed when a domain is created, and its sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DomainConfig {
    /// Paging levels of the shadow (host) tables: 2, 3 or 4.
    pub shadow_levels: PagingLevels,
    /// Number of vcpus (1..=64).
    pub vcpus: usize,
    /// Initial size of the shadow pool, in pages.
    pub pool_pages: usize,
    /// Translated: guest entries hold guest frames, mapped through the p2m. Otherwise (PV)
    /// they hold machine frames, each checked to belong to the domain.
    pub translated: bool,
    /// External: the hypervisor is not in the guest's address space. Otherwise (internal)
    /// the hypervisor hole ([`DomainConfig::hypervisor_hole`]) is reserved and the guest may
    /// not map over it.
    pub external: bool,
    /// Refcount mode.
    pub refcounts: RefcountMode,
    /// The paging features the guest sees. 1 GiB pages are hidden from shadowed guests.
    pub guest_features: CpuFeatures,
    /// Encode guest-not-present and MMIO entries with reserved bits so that those faults are
    /// handled from the shadow entry alone (seed future optimisation 2). Needs a host
    /// MAXPHYADDR below 52 (a reserved address bit).
    pub fast_path: bool,
    /// Shadow a guest superpage whose machine backing is contiguous aligned RAM, none of it
    /// a page table, by one superpage entry instead of a splinter (see
    /// [`crate::superpage`]). Off: every guest superpage is splintered.
    pub superpages: bool,
    /// MAXPHYADDR of the host (32..=52): the hardware walking the shadows and the p2m
    /// faults on machine addresses at or above it, so no machine frame given to the guest
    /// may lie there. With the fast path, the upper half below it is where MMIO markers
    /// point (so that a speculative load through one, L1TF, reaches no memory): no guest
    /// RAM may lie there either, nor should the host give the pool frames from there.
    pub host_maxphyaddr: u8,
    /// Keep a reverse map of shadow L1 entries (needs the `rmap` feature): removing write
    /// access or every mapping of a frame then visits exactly its entries.
    pub reverse_map: bool,
    /// The guest OS's linear maps (a direct map of physical memory, a self-map), from which
    /// the engine guesses where a frame becoming a page table is mapped writable before it
    /// falls back to scanning every L1 shadow (see [`crate::remove`]). Also settable later
    /// with `Domain::set_linear_maps`.
    pub linear_maps: [Option<LinearMapHint>; 4],
    /// Shadow entries a page fault may scan looking for writable mappings of a frame that is
    /// becoming a page table. When the scan has not finished by then, the fault is answered
    /// `Spurious` (the guest retries) and the next fault continues it (see [`crate::remove`]
    /// for the bound). 0: no budget, a scan always finishes in the fault.
    pub scan_budget: usize,
    /// The fork/exit heuristic (seed future optimisation 3, Xen's early unshadow): after
    /// this many consecutive emulated writes of one vcpu that leave every entry they touch
    /// not present, into the same page table and with no other shadow fault of that vcpu in
    /// between, the page is unshadowed instead of emulating the rest of its teardown.
    /// 0 turns the heuristic off.
    pub early_unshadow_writes: u32,
    /// Per-guest-OS teardown hints (seed future optimisation 5): when to unshadow a page
    /// table a guest is recycling.
    pub teardown: TeardownHints,
    /// Shadow and p2m entries one engine call may read or write in a long operation
    /// (removing every mapping of a frame, enabling log-dirty, a teardown step...) before
    /// it stops and leaves a continuation (see the crate documentation, "Bounded work"). Every
    /// call does at most this much plus [`DomainConfig::CALL_WORK_SLACK`].
    pub call_work_budget: usize,
    /// Out-of-sync shadows (Xen's OOS, KVM's unsync pages): a write fault on a guest page
    /// table shadowed only as L1 gives the faulting mapping write access and leaves the
    /// page out of sync, instead of emulating the write; the page is brought back in sync
    /// at CR3 loads, INVLPG and faults through it, before other uses, log-dirty and p2m
    /// changes (see `domain::oos`). A host whose vcpus run while the engine works (KVM
    /// with vcpu threads) must not turn it on: a resync compares the page after removing
    /// write access, which holds only once the flush is carried out.
    pub out_of_sync: bool,
    /// The most pages out of sync at once (the oldest is resynced to make room).
    pub max_out_of_sync: usize,
}

impl DomainConfig {
    /// A translated, external HVM-style domain with shadow refcounts.
    pub fn hvm(shadow_levels: PagingLevels, vcpus: usize, pool_pages: usize) -> DomainConfig {
        DomainConfig {
            shadow_levels,
            vcpus,
            pool_pages,
            translated: true,
            external: true,
            refcounts: RefcountMode::Shadow,
            guest_features: CpuFeatures {
                pdpe1gb: false,
                ..CpuFeatures::KVM_HOST
            },
            fast_path: true,
            superpages: true,
            host_maxphyaddr: CpuFeatures::KVM_HOST.maxphyaddr,
            reverse_map: cfg!(feature = "rmap"),
            linear_maps: [None; 4],
            scan_budget: DomainConfig::DEFAULT_SCAN_BUDGET,
            early_unshadow_writes: DomainConfig::DEFAULT_EARLY_UNSHADOW_WRITES,
            teardown: TeardownHints::NONE,
            call_work_budget: DomainConfig::DEFAULT_CALL_WORK_BUDGET,
            out_of_sync: false,
            max_out_of_sync: DomainConfig::DEFAULT_MAX_OUT_OF_SYNC,
        }
    }

    /// The default [`DomainConfig::max_out_of_sync`].
    pub const DEFAULT_MAX_OUT_OF_SYNC: usize = 8;

    /// The largest [`DomainConfig::max_out_of_sync`]: a CR3 load resyncs every page out of
    /// sync, 512 words and their validation each, within the call's work bound.
    pub const MAX_OUT_OF_SYNC: usize = 64;

    /// The default [`DomainConfig::scan_budget`]: 128 Ki entries per fault, that is 1 MiB
    /// of shadow memory read (256 pages of PAE or 64-bit L1 shadows, 128 of 2-level ones).
    pub const DEFAULT_SCAN_BUDGET: usize = 1 << 17;

    /// The default [`DomainConfig::early_unshadow_writes`].
    pub const DEFAULT_EARLY_UNSHADOW_WRITES: u32 = 4;

    /// The longest range one [`Domain::validate_guest_pt_write`](crate::domain::Domain::validate_guest_pt_write)
    /// takes: 16 pages, so that one call validates a bounded number of entries.
    pub const MAX_VALIDATE_BYTES: u64 = 16 * 4096;

    /// The largest shadow pool a domain may have (1 GiB of shadow memory).
    pub const MAX_POOL_PAGES: usize = 1 << 18;

    /// The default [`DomainConfig::call_work_budget`]: 128 Ki entries, as many as a page
    /// fault's share of the write-access scan.
    pub const DEFAULT_CALL_WORK_BUDGET: usize = 1 << 17;

    /// The work a call may do beyond its budget, whatever the pool size: the short
    /// operations themselves (a fault's fill, a validated write into each shadow of the
    /// page, eight dying shadows torn down at the end of the call, the last shadow a step
    /// starts on).
    pub const CALL_WORK_SLACK: u64 = 1 << 16;

    /// The most work any one call of this domain may do.
    pub fn call_work_bound(&self) -> u64 {
        (self.call_work_budget as u64).saturating_add(DomainConfig::CALL_WORK_SLACK)
    }

    /// This configuration with `hint` added to its linear maps (in the first free place;
    /// when all four are taken, the last is replaced).
    pub fn with_linear_map(mut self, hint: LinearMapHint) -> DomainConfig {
        match self.linear_maps.iter_mut().find(|m| m.is_none()) {
            Some(slot) => *slot = Some(hint),
            None => {
                if let Some(last) = self.linear_maps.last_mut() {
                    *last = Some(hint);
                }
            }
        }
        self
    }

    /// The linear-address range reserved for the hypervisor in internal mode: the top
    /// 64 MiB of a 32-bit address space, or one 512 GiB L4 slot of a 64-bit one.
    pub fn hypervisor_hole(&self) -> Option<core::ops::Range<u64>> {
        if self.external {
            return None;
        }
        Some(match self.shadow_levels {
            PagingLevels::Four => 0xffff_ff00_0000_0000..0xffff_ff80_0000_0000,
            _ => 0xfc00_0000..0x1_0000_0000,
        })
    }

    /// Whether `va` lies in the hypervisor hole.
    pub fn in_hole(&self, va: Gva) -> bool {
        self.hypervisor_hole()
            .is_some_and(|h| h.contains(&va.raw()))
    }

    /// The smallest pool that always serves a fault: every vcpu's top-level shadows (up to
    /// 6 pages) plus the deepest fill, in whole 4-page chunks.
    pub fn min_pool_pages(&self) -> usize {
        8 * self.vcpus + 16
    }
}

/// A fault the guest must see instead of the operation it attempted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestFault {
    /// #GP(0): e.g. a PAE CR3 load whose PDPTEs have reserved bits set.
    GeneralProtection,
}

/// Why an engine operation failed. Only [`EngineError::Guest`] and argument errors leave the
/// domain running; the others fail the domain cleanly (never the host).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineError {
    /// The guest did something that faults architecturally.
    Guest(GuestFault),
    /// A bad argument (vcpu id, size, frame...).
    BadArgument(&'static str),
    /// The vcpus' paging modes need a pair this domain cannot run (e.g. PAE on 2-level
    /// shadows).
    UnsupportedPair {
        /// Guest levels.
        guest: u8,
        /// Shadow levels.
        shadow: u8,
    },
    /// The pool could not serve a shadow even after evicting everything evictable.
    PoolExhausted,
    /// A pool operation failed.
    Pool(PoolError),
    /// A p2m operation failed.
    P2m(P2mError),
    /// Machine memory could not be accessed where the engine's own structures live.
    Memory {
        /// The raw machine address.
        addr: u64,
    },
    /// An internal invariant was found broken: the domain is failed.
    Internal(&'static str),
    /// The domain was failed by an earlier error and accepts no more operations.
    DomainFailed,
    /// A frame the p2m was asked to map is a pool, p2m-table or hypervisor frame.
    ForbiddenFrame(Mfn),
    /// A bounded step of a long search ran out of budget before the operation could be
    /// done; nothing the guest can see changed, and the operation can be retried. A page
    /// fault never returns it: it answers [`crate::multi::FaultOutcome::Spurious`] instead,
    /// and the guest's retry continues the search.
    Preempted,
    /// A failed operation left a TLB flush owed: take it with `Domain::take_flush` and carry
    /// it out first.
    FlushOwed,
    /// The guest ran again an instruction the emulator cannot do, on a page table a vcpu
    /// runs on (which is shadowed again as soon as it is unshadowed): it would trap for
    /// ever, so the domain is failed (KVM reports the same case as an emulation failure).
    Unemulatable {
        /// The instruction's address.
        rip: u64,
    },
}

impl EngineError {
    /// Whether this error fails the domain.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            EngineError::PoolExhausted
                | EngineError::Memory { .. }
                | EngineError::Internal(_)
                | EngineError::DomainFailed
                | EngineError::Unemulatable { .. }
        )
    }
}

impl fmt::Display for EngineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EngineError::Guest(GuestFault::GeneralProtection) => write!(f, "guest #GP(0)"),
            EngineError::BadArgument(what) => write!(f, "bad argument: {what}"),
            EngineError::UnsupportedPair { guest, shadow } => {
                write!(f, "{guest}-on-{shadow} is not a supported pair")
            }
            EngineError::PoolExhausted => write!(f, "shadow pool exhausted"),
            EngineError::Pool(e) => write!(f, "pool: {e}"),
            EngineError::P2m(e) => write!(f, "p2m: {e}"),
            EngineError::Memory { addr } => write!(f, "machine memory at {addr:#x} unusable"),
            EngineError::Internal(what) => write!(f, "internal error: {what}"),
            EngineError::DomainFailed => write!(f, "the domain has failed"),
            EngineError::ForbiddenFrame(mfn) => {
                write!(
                    f,
                    "frame {mfn} belongs to the hypervisor and cannot be mapped"
                )
            }
            EngineError::Preempted => write!(f, "out of budget: retry the operation"),
            EngineError::FlushOwed => {
                write!(f, "a failed operation owes a TLB flush: take it first")
            }
            EngineError::Unemulatable { rip } => write!(
                f,
                "the guest repeats an instruction at {rip:#x} that cannot be emulated on a page table it runs on"
            ),
        }
    }
}

impl core::error::Error for EngineError {}

impl From<PoolError> for EngineError {
    fn from(e: PoolError) -> Self {
        EngineError::Pool(e)
    }
}

impl From<P2mError> for EngineError {
    fn from(e: P2mError) -> Self {
        EngineError::P2m(e)
    }
}

impl From<crate::paging::MemError> for EngineError {
    fn from(e: crate::paging::MemError) -> Self {
        let addr = match e {
            crate::paging::MemError::Unbacked { addr }
            | crate::paging::MemError::Misaligned { addr }
            | crate::paging::MemError::ReadOnly { addr }
            | crate::paging::MemError::NotAtomic { addr } => addr,
        };
        EngineError::Memory { addr }
    }
}

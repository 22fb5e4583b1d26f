//! A simulated machine running a shadowed domain: each vcpu's hardware (a [`Cpu`] with a
//! TLB and paging-structure caches) walks the engine's shadow tables; every fault goes to
//! the engine; every access is checked against the guest oracle (same frame, never more
//! permission, A/D as required), and [`ShadowMachine::check_hardware_caches`] checks what
//! the hardware still caches between engine calls.

mod cache_check;

pub use cache_check::CacheViolation;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use shadow2::addr::{Gfn, Gpa, Gva, Maddr, Mfn};
use shadow2::domain::{Domain, DomainConfig, EmulateOutcome, EngineError, GuestFault};
use shadow2::emulate::{
    AtomicUpdate, EmuError, EmuFault, EmuMemory, Emulated, Regs, emulate_write, page_pieces,
    serial_compare_exchange,
};
use shadow2::flush::Flush;
use shadow2::host::MachineMemory;
use shadow2::multi::FaultOutcome;
use shadow2::p2m::P2mType;
use shadow2::paging::{
    Access, AccessKind, ControlState, PagingLevels, PfErrorCode, Privilege, WalkResult,
};

use crate::cpu::{Cpu, CpuFault};
use crate::memory::SparseMemory;
use crate::oracle::{self, Expected, HOST_FEATURES};
use crate::p2m_memo::P2mMemo;

/// Traps taken, by kind: each is one exit from the guest to the hypervisor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Traps {
    /// Page faults the engine fixed (shadow fills, A/D and log-dirty faults).
    pub shadow_fills: u64,
    /// Faults that needed nothing (a stale TLB entry).
    pub spurious: u64,
    /// Faults reflected to the guest.
    pub propagated: u64,
    /// Of those, recognised by the reserved-bit fast path.
    pub fast_path: u64,
    /// Writes to shadowed page tables, emulated.
    pub emulated_writes: u64,
    /// MMIO accesses.
    pub mmio: u64,
    /// CR3 writes.
    pub cr3_writes: u64,
    /// INVLPGs.
    pub invlpg: u64,
    /// CR0/CR4/EFER writes.
    pub mode_changes: u64,
}

impl Traps {
    /// Every trap.
    pub fn total(&self) -> u64 {
        self.shadow_fills
            + self.spurious
            + self.propagated
            + self.emulated_writes
            + self.mmio
            + self.cr3_writes
            + self.invlpg
            + self.mode_changes
    }
}

/// What the guest sees instead of a completed access or operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestError {
    /// #PF delivered to the guest (CR2 = `va`).
    PageFault {
        /// The faulting address.
        va: Gva,
        /// The error code.
        code: PfErrorCode,
    },
    /// #GP(0).
    GeneralProtection,
    /// #UD: the simulated CPU executes only the write instructions the emulator decodes.
    InvalidOpcode,
    /// An access to MMIO space (no device model here: reads as nothing, writes dropped).
    Mmio {
        /// The guest-physical address.
        gpa: Gpa,
    },
    /// The engine failed (the domain is dead).
    Engine(EngineError),
}

/// One mismatch between what the hardware and engine did and what the guest's tables say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// The vcpu.
    pub vcpu: usize,
    /// The address.
    pub va: Gva,
    /// The access.
    pub access: Access,
    /// What went wrong.
    pub what: String,
}

/// A shadowed domain on simulated hardware.
#[derive(Debug)]
pub struct ShadowMachine {
    domain: Domain<SparseMemory>,
    cpus: Vec<Cpu>,
    traps: Traps,
    accesses: u64,
    mismatches: Vec<Mismatch>,
    mismatch_count: u64,
    /// Guest frames written by guest accesses since the last [`ShadowMachine::take_written`]
    /// (what the instructions actually did, whatever the guest meant them to do).
    written: BTreeSet<Gfn>,
    /// Time spent inside the engine on the access and trap paths.
    engine_time: Duration,
    /// The p2m's answers to the oracle's walks.
    p2m_memo: P2mMemo,
}

/// Runs `f` (a call into the engine), adding its wall-clock time to `total`.
fn timed<R>(total: &mut Duration, f: impl FnOnce() -> R) -> R {
    let start = Instant::now();
    let r = f();
    *total += start.elapsed();
    r
}

/// At most this many mismatches are kept in full.
const MISMATCH_LOG: usize = 16;
/// A hardware access that needs more engine rounds than this is reported.
const MAX_ROUNDS: usize = 8;
/// An engine call preempted this many times in a row has stopped making progress (each
/// call's work is bounded, so a long search takes at most pool pages / budget rounds).
const MAX_PREEMPTIONS: usize = 1 << 16;

impl ShadowMachine {
    /// A machine of `machine_frames` frames running a new domain.
    pub fn new(machine_frames: u64, config: DomainConfig) -> Result<ShadowMachine, EngineError> {
        let domain = Domain::new(SparseMemory::new(machine_frames), config)?;
        let cpus = (0..config.vcpus).map(|_| Cpu::new(HOST_FEATURES)).collect();
        Ok(ShadowMachine {
            domain,
            cpus,
            traps: Traps::default(),
            accesses: 0,
            mismatches: Vec::new(),
            mismatch_count: 0,
            written: BTreeSet::new(),
            engine_time: Duration::ZERO,
            p2m_memo: P2mMemo::default(),
        })
    }

    /// The domain.
    pub fn domain(&self) -> &Domain<SparseMemory> {
        &self.domain
    }
    /// The domain, mutably (control ops; TLB flushes they return go to [`Self::settle`]).
    pub fn domain_mut(&mut self) -> &mut Domain<SparseMemory> {
        &mut self.domain
    }
    /// Traps so far.
    pub fn traps(&self) -> Traps {
        self.traps
    }
    /// Guest accesses so far.
    pub fn accesses(&self) -> u64 {
        self.accesses
    }
    /// Oracle mismatches so far (the first few in full).
    pub fn mismatches(&self) -> (u64, &[Mismatch]) {
        (self.mismatch_count, &self.mismatches)
    }
    /// The guest frames guest accesses wrote since the last call (hardware writes, emulated
    /// data writes and the writes of instructions the engine emulated), by the guest's own
    /// translation at the time.
    pub fn take_written(&mut self) -> BTreeSet<Gfn> {
        core::mem::take(&mut self.written)
    }

    /// Wall-clock time spent inside the engine so far on the access and trap paths (page
    /// faults, emulation, writes through the engine, CR3 / mode / control updates, INVLPG);
    /// the simulated hardware, the oracle and RAM setup are not counted.
    pub fn engine_time(&self) -> Duration {
        self.engine_time
    }
    /// A vcpu's hardware.
    pub fn cpu(&self, v: usize) -> Option<&Cpu> {
        self.cpus.get(v)
    }
    /// A vcpu's hardware, mutably: for tests that put the hardware in a state the engine
    /// did not lead it to (a vcpu that missed a flush).
    pub fn cpu_mut(&mut self, v: usize) -> Option<&mut Cpu> {
        self.cpus.get_mut(v)
    }
    /// Turns every vcpu's paging-structure caches on (the default) or off.
    pub fn set_psc_enabled(&mut self, enabled: bool) {
        for cpu in &mut self.cpus {
            cpu.set_psc_enabled(enabled);
        }
    }

    fn mismatch(&mut self, vcpu: usize, va: Gva, access: Access, what: String) {
        self.mismatch_count += 1;
        if self.mismatches.len() < MISMATCH_LOG {
            self.mismatches.push(Mismatch {
                vcpu,
                va,
                access,
                what,
            });
        }
    }

    /// Gives guest frames `first..first+count` fresh machine frames of RAM: every aligned
    /// 4 MiB (else 2 MiB) run of guest frames gets a run of machine frames aligned alike, so
    /// that shadow superpages can map it; other frames one by one.
    pub fn add_ram(&mut self, first: Gfn, count: u64) -> Result<(), EngineError> {
        let mut i = 0;
        while i < count {
            let gfn = first.raw() + i;
            let order = [10u8, 9]
                .into_iter()
                .find(|&o| gfn.is_multiple_of(1 << o) && count - i >= 1 << o);
            let (mfn, frames) = match order {
                Some(o) => (self.domain.host_mut().alloc_aligned_frames(o), 1u64 << o),
                None => (self.domain.host_mut().alloc_block(0), 1),
            };
            let mfn = mfn.ok_or(EngineError::BadArgument("machine out of frames"))?;
            for k in 0..frames {
                self.map_ram(Gfn::new(gfn + k), Mfn::new(mfn.raw() + k))?;
            }
            i += frames;
        }
        Ok(())
    }

    /// Gives guest frames `first..first+count` fresh machine frames of RAM in descending
    /// order, so that no two neighbouring guest frames are neighbours in machine memory (no
    /// shadow superpage can map them: tests of the fallback).
    pub fn add_ram_scattered(&mut self, first: Gfn, count: u64) -> Result<(), EngineError> {
        let mut frames = Vec::new();
        for _ in 0..count {
            let mfn = self
                .domain
                .host_mut()
                .alloc_block(0)
                .ok_or(EngineError::BadArgument("machine out of frames"))?;
            frames.push(mfn);
        }
        for (i, mfn) in frames.into_iter().rev().enumerate() {
            self.map_ram(Gfn::new(first.raw() + i as u64), mfn)?;
        }
        Ok(())
    }

    fn map_ram(&mut self, gfn: Gfn, mfn: Mfn) -> Result<(), EngineError> {
        let flush = self.domain.set_p2m(gfn, Some((mfn, P2mType::Ram)))?;
        self.settle(flush);
        Ok(())
    }

    /// Calls into the engine, counting its time. A call that fails may owe a flush (it
    /// changed shadows first): it is taken and carried out here, as a host must.
    fn call<R>(
        &mut self,
        f: impl FnOnce(&mut Domain<SparseMemory>) -> Result<R, EngineError>,
    ) -> Result<R, EngineError> {
        let result = timed(&mut self.engine_time, || f(&mut self.domain));
        if result.is_err() {
            self.settle_failed_call();
        }
        result
    }

    /// What a host does after an engine call failed (or was preempted): takes the flush
    /// the call owes and carries it out, then gives roots back to vcpus that lost theirs.
    /// Tests that call the domain directly use it as the host would.
    pub fn settle_failed_call(&mut self) {
        let flush = self.domain.take_flush();
        self.settle(flush);
        self.restore_roots();
    }

    /// Gives roots back to vcpus that a failed call left without one, carrying out the
    /// flushes the engine asks for first (a vcpu without a root does not run).
    fn restore_roots(&mut self) {
        for _ in 0..MAX_ROUNDS {
            if self.domain.rootless().is_empty() || self.domain.failure().is_some() {
                return;
            }
            match timed(&mut self.engine_time, || self.domain.load_roots()) {
                Ok(flush) => self.settle(flush),
                Err(_) => {
                    let flush = self.domain.take_flush();
                    self.settle(flush);
                }
            }
        }
    }

    /// Carries out a TLB flush the engine asked for, and reloads hardware roots that
    /// changed.
    pub fn settle(&mut self, flush: Flush) {
        let vcpus = flush.into_vcpus();
        for (v, cpu) in self.cpus.iter_mut().enumerate() {
            if vcpus.contains(v) {
                cpu.flush_tlb_all();
            }
        }
        let reloads = self.domain.take_reloads();
        for v in 0..self.cpus.len() {
            if reloads.contains(v) {
                self.load_hardware(v);
            }
        }
    }

    fn load_hardware(&mut self, v: usize) {
        let Some(cpu) = self.cpus.get_mut(v) else {
            return;
        };
        let Some(hw) = self.domain.hardware_control(v) else {
            // No root to run on: nothing cached from the one it lost may be used, and it
            // does not run until it has one again (see `access`).
            cpu.flush_tlb_all();
            return;
        };
        cpu.set_state(hw);
        if hw.levels() == PagingLevels::Three {
            // PAE hardware loads its PDPTEs from the (shadow) root at CR3 load.
            let _ = cpu.load_cr3(self.domain.host(), hw.cr3);
        }
    }

    /// The guest's control state of vcpu `v`.
    pub fn guest_control(&self, v: usize) -> ControlState {
        self.domain
            .vcpu(v)
            .map(|c| *c.control())
            .unwrap_or_default()
    }

    /// MOV to CR0/CR4/WRMSR EFER together (and RFLAGS/PKRU), then the engine picks the
    /// pair. CR3 is taken from `ctl` too. A refused change leaves the vcpu as it was (the
    /// engine restores its registers).
    pub fn set_paging(&mut self, v: usize, ctl: ControlState) -> Result<(), GuestError> {
        self.traps.mode_changes += 1;
        self.call(|d| d.set_control(v, ctl))
            .map_err(GuestError::Engine)?;
        let flush = self
            .retrying(|d| d.update_paging_modes(v))
            .map_err(refused_control)?;
        self.settle(flush);
        Ok(())
    }

    /// MOV to CR3.
    pub fn set_cr3(&mut self, v: usize, cr3: u64) -> Result<(), GuestError> {
        self.traps.cr3_writes += 1;
        let ctl = ControlState {
            cr3,
            ..self.guest_control(v)
        };
        self.call(|d| d.set_control(v, ctl))
            .map_err(GuestError::Engine)?;
        // `update_cr3` always asks for the hardware root to be reloaded, and the reload
        // flushes the whole TLB: the CR3 load's own flush is part of it.
        let flush = self
            .retrying(|d| d.update_cr3(v))
            .map_err(refused_control)?;
        self.settle(flush);
        Ok(())
    }

    /// A guest-triggered engine call, re-executed as hardware re-executes a trapping
    /// instruction while the engine answers `Preempted` (it needed a flush carried out, or
    /// a bounded search to go on, first; it keeps its progress between calls).
    fn retrying<T>(
        &mut self,
        op: impl FnMut(&mut Domain<SparseMemory>) -> Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        self.until_not_preempted(true, op)
    }

    /// Calls `op` again while it answers `Preempted` (each failed call's flush carried
    /// out by `call`), counting a spurious trap each time when the guest re-executes.
    fn until_not_preempted<T>(
        &mut self,
        guest_retries: bool,
        mut op: impl FnMut(&mut Domain<SparseMemory>) -> Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        for _ in 0..MAX_PREEMPTIONS {
            match self.call(&mut op) {
                Err(EngineError::Preempted) if guest_retries => self.traps.spurious += 1,
                Err(EngineError::Preempted) => {}
                other => return other,
            }
        }
        Err(EngineError::Internal("an engine call made no progress"))
    }

    /// A host operation, called again while the engine answers `Preempted` (a bounded step
    /// of it is done, or it needs the flush it handed out carried out first), with each
    /// flush carried out; no guest trap is counted.
    pub fn host_op<T>(
        &mut self,
        op: impl FnMut(&mut Domain<SparseMemory>) -> Result<(T, Flush), EngineError>,
    ) -> Result<T, EngineError> {
        let (value, flush) = self.until_not_preempted(false, op)?;
        self.settle(flush);
        Ok(value)
    }

    /// INVLPG.
    pub fn invlpg(&mut self, v: usize, va: Gva) -> Result<(), GuestError> {
        self.traps.invlpg += 1;
        let (needed, flush) = self.call(|d| d.invlpg(v, va)).map_err(GuestError::Engine)?;
        self.settle(flush);
        if needed && let Some(cpu) = self.cpus.get_mut(v) {
            cpu.invlpg(va);
        }
        Ok(())
    }

    /// Flushes every vcpu's TLB and paging-structure caches, as a guest does after changing
    /// upper-level entries (a CR3 reload on every vcpu, or a global shootdown).
    ///
    /// With out-of-sync shadows such a flush is a sync point, which a real host sees (a
    /// CR3 write or CR4.PGE toggle exits): the engine is told, and its flush carried out.
    pub fn flush_all_tlbs(&mut self) {
        if self.domain.config().out_of_sync
            && let Ok(flush) = self.call(|d| d.resync_out_of_sync())
        {
            self.settle(flush);
        }
        for cpu in &mut self.cpus {
            cpu.flush_tlb_all();
        }
    }

    /// Reads `buf.len()` bytes (inside one page) at `va`.
    pub fn read(
        &mut self,
        v: usize,
        va: Gva,
        privilege: Privilege,
        buf: &mut [u8],
    ) -> Result<(), GuestError> {
        self.load(v, va, Access::new(AccessKind::Read, privilege), buf)
    }

    /// Fetches `buf.len()` bytes (inside one page) at `va`.
    pub fn fetch(
        &mut self,
        v: usize,
        va: Gva,
        privilege: Privilege,
        buf: &mut [u8],
    ) -> Result<(), GuestError> {
        self.load(v, va, Access::new(AccessKind::Fetch, privilege), buf)
    }

    fn load(
        &mut self,
        v: usize,
        va: Gva,
        access: Access,
        buf: &mut [u8],
    ) -> Result<(), GuestError> {
        let Reached::At(addr) = self.access(v, va, access, None)? else {
            return Err(GuestError::Engine(EngineError::Internal(
                "a load was emulated",
            )));
        };
        self.domain
            .host()
            .read_bytes(addr, buf)
            .map_err(|_| GuestError::Engine(EngineError::Internal("load of unbacked memory")))
    }

    /// Writes `data` (inside one page) at `va`.
    pub fn write(
        &mut self,
        v: usize,
        va: Gva,
        privilege: Privilege,
        data: &[u8],
    ) -> Result<(), GuestError> {
        let access = Access::new(AccessKind::Write, privilege);
        match self.access(v, va, access, Some(data)) {
            Ok(Reached::At(addr)) => {
                self.domain.host_mut().write_bytes(addr, data).map_err(|_| {
                    GuestError::Engine(EngineError::Internal("write to unbacked memory"))
                })
            }
            Ok(Reached::Emulated) => Ok(()),
            Ok(Reached::NeedsEmulation(_)) => Err(GuestError::Engine(EngineError::Internal(
                "a data write asked for instruction emulation",
            ))),
            Err(GuestError::Mmio { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Performs the translation part of one access like hardware plus engine, and checks
    /// the result against the oracle.
    fn access(
        &mut self,
        v: usize,
        va: Gva,
        access: Access,
        data: Option<&[u8]>,
    ) -> Result<Reached, GuestError> {
        self.accesses += 1;
        let ctl = self.guest_control(v);
        let walk = self.oracle_walk(&ctl, va, access);
        let expected = oracle::expect_from_walk(&self.domain, &self.p2m_memo, &ctl, access, &walk);
        // The walk holds for the rest of the access while nothing but the hardware's own
        // translation has run (no engine call) and memory reads as it did.
        let mut walk_holds_at = Some(self.domain.host().changes());
        let in_hole = self.domain.config().in_hole(va);
        for _ in 0..MAX_ROUNDS {
            if self.domain.rootless().contains(v) {
                walk_holds_at = None;
                self.restore_roots();
                if self.domain.rootless().contains(v) {
                    return Err(GuestError::Engine(EngineError::Internal(
                        "the vcpu has no shadow root to run on",
                    )));
                }
            }
            let cpu = self
                .cpus
                .get_mut(v)
                .ok_or(GuestError::Engine(EngineError::BadArgument("no such vcpu")))?;
            let result = cpu.translate(self.domain.host_mut(), va, access);
            match result {
                Ok(t) => {
                    if !in_hole && expected != Expected::Frame(t.frame) {
                        self.mismatch(
                            v,
                            va,
                            access,
                            format!(
                                "hardware reached {} but the guest says {expected:?}",
                                t.frame
                            ),
                        );
                    }
                    if !in_hole || access.is_write() {
                        let unchanged = walk_holds_at == Some(self.domain.host().changes());
                        let after = if unchanged {
                            walk
                        } else {
                            self.oracle_walk(&ctl, va, access)
                        };
                        if !in_hole {
                            self.check_ad_of(v, va, access, &ctl, &after);
                        }
                        if access.is_write()
                            && let Ok(t) = after
                        {
                            self.written.insert(t.frame);
                        }
                    }
                    return Ok(Reached::At(t.addr));
                }
                Err(CpuFault::GeneralProtection) => {
                    if expected != Expected::GeneralProtection {
                        self.mismatch(
                            v,
                            va,
                            access,
                            format!("#GP but the guest says {expected:?}"),
                        );
                    }
                    return Err(GuestError::GeneralProtection);
                }
                Err(CpuFault::Memory(e)) => {
                    self.mismatch(
                        v,
                        va,
                        access,
                        format!("hardware walk left machine memory: {e:?}"),
                    );
                    return Err(GuestError::Engine(EngineError::Internal(
                        "shadow walk out of memory",
                    )));
                }
                Err(CpuFault::PageFault { code, .. }) => {
                    // A host knows a fetch fault when CR2 equals RIP, even where the hardware
                    // cannot report I (32-bit paging without SMEP): tell the engine.
                    let code = if access.is_fetch() {
                        PfErrorCode(code.bits() | PfErrorCode::I)
                    } else {
                        code
                    };
                    walk_holds_at = None;
                    let (outcome, flush) = self
                        .call(|d| d.page_fault(v, va, code))
                        .map_err(GuestError::Engine)?;
                    self.settle(flush);
                    match outcome {
                        FaultOutcome::Fixed => self.traps.shadow_fills += 1,
                        FaultOutcome::Spurious => self.traps.spurious += 1,
                        FaultOutcome::Propagate(gec) => {
                            self.traps.propagated += 1;
                            if code.reserved() {
                                self.traps.fast_path += 1;
                            }
                            if !in_hole && expected != Expected::PageFault(gec.bits()) {
                                self.mismatch(
                                    v,
                                    va,
                                    access,
                                    format!("#PF {gec:?} but the guest says {expected:?}"),
                                );
                            }
                            return Err(GuestError::PageFault { va, code: gec });
                        }
                        FaultOutcome::Mmio { gpa } => {
                            self.traps.mmio += 1;
                            if expected != Expected::Mmio(gpa) {
                                self.mismatch(
                                    v,
                                    va,
                                    access,
                                    format!("MMIO at {gpa} but the guest says {expected:?}"),
                                );
                            }
                            return Err(GuestError::Mmio { gpa });
                        }
                        FaultOutcome::Emulate { gpa } => {
                            self.traps.emulated_writes += 1;
                            if data.is_none() && access.is_write() {
                                // An instruction-level write: the caller runs the engine's
                                // emulator on the instruction itself.
                                return Ok(Reached::NeedsEmulation(gpa));
                            }
                            return self.emulate_write(v, va, access, gpa, data, expected, &ctl);
                        }
                    }
                }
            }
        }
        self.mismatch(v, va, access, "the access did not settle".into());
        Err(GuestError::Engine(EngineError::Internal(
            "access did not settle",
        )))
    }

    #[allow(clippy::too_many_arguments)]
    fn emulate_write(
        &mut self,
        v: usize,
        va: Gva,
        access: Access,
        gpa: Gpa,
        data: Option<&[u8]>,
        expected: Expected,
        ctl: &ControlState,
    ) -> Result<Reached, GuestError> {
        let Some(data) = data else {
            self.mismatch(v, va, access, "emulation asked for a read".into());
            return Err(GuestError::Engine(EngineError::Internal(
                "emulate on a read",
            )));
        };
        match (expected, self.domain.guest_frame(gpa.gfn())) {
            (Expected::Frame(m), Some((mfn, _))) if m == mfn => {}
            _ => self.mismatch(
                v,
                va,
                access,
                format!("emulation at {gpa} but the guest says {expected:?}"),
            ),
        }
        // The walk and its A/D writes come before the data write (SDM 4.8), which may
        // rewrite the very entries the walk used (a self-map): judge them as they were.
        self.check_ad(v, va, access, ctl);
        let flush = self
            .call(|d| d.write_guest_phys(gpa, data))
            .map_err(GuestError::Engine)?;
        self.settle(flush);
        self.written.insert(gpa.gfn());
        Ok(Reached::Emulated)
    }

    /// The guest's own walk of `va` (the oracle's), as the domain is now.
    fn oracle_walk(&mut self, ctl: &ControlState, va: Gva, access: Access) -> WalkResult<Gpa> {
        self.p2m_memo.refresh(&mut self.domain);
        oracle::guest_walk_with(&self.domain, &self.p2m_memo, ctl, va, access)
    }

    /// Notes the guest frame a write at `va` reaches through the guest's tables.
    fn note_written(&mut self, ctl: &ControlState, va: Gva, access: Access) {
        if let Ok(t) = oracle::guest_walk(&self.domain, ctl, va, access) {
            self.written.insert(t.frame);
        }
    }

    fn check_ad(&mut self, v: usize, va: Gva, access: Access, ctl: &ControlState) {
        if self.domain.config().in_hole(va) {
            return;
        }
        let walk = oracle::guest_walk(&self.domain, ctl, va, access);
        self.check_ad_of(v, va, access, ctl, &walk);
    }

    /// [`Self::check_ad`] given the guest's walk of `va` as the domain is now.
    fn check_ad_of(
        &mut self,
        v: usize,
        va: Gva,
        access: Access,
        ctl: &ControlState,
        walk: &WalkResult<Gpa>,
    ) {
        if let Some(what) = oracle::accessed_dirty_from_walk(ctl, access, walk) {
            self.mismatch(v, va, access, what.into());
        }
    }

    /// A write on the guest's behalf to guest-physical memory (a hypercall, DMA): through
    /// the engine, which validates shadows and marks the page dirty.
    pub fn write_phys(&mut self, gpa: Gpa, data: &[u8]) -> Result<(), GuestError> {
        let flush = self
            .call(|d| d.write_guest_phys(gpa, data))
            .map_err(GuestError::Engine)?;
        self.settle(flush);
        Ok(())
    }

    /// Reads guest-physical memory.
    pub fn read_phys(&self, gpa: Gpa, out: &mut [u8]) -> Result<(), GuestError> {
        self.domain
            .read_guest_phys(gpa, out)
            .map_err(GuestError::Engine)
    }

    /// The machine frame behind a guest frame, if RAM.
    pub fn ram_frame(&self, gfn: Gfn) -> Option<Mfn> {
        match self.domain.guest_frame(gfn) {
            Some((mfn, P2mType::Ram)) => Some(mfn),
            _ => None,
        }
    }
}

/// Where an access ended up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reached {
    /// The hardware translated it to this machine address.
    At(Maddr),
    /// The engine had the write emulated: the data is already in memory.
    Emulated,
    /// The write needs the engine's emulator run on the faulting instruction.
    NeedsEmulation(Gpa),
}

/// The simulated CPU executing one guest instruction: it decodes with the same emulator the
/// engine uses, but every access goes through the hardware's walk of the shadow tables (and
/// the oracle), so a write to a shadowed page table faults and is handed to the engine's
/// emulator exactly as on real hardware.
struct HwMemory<'a> {
    m: &'a mut ShadowMachine,
    v: usize,
    privilege: Privilege,
    /// Why the last access stopped, beyond what an `EmuFault` can say.
    stop: Option<Stop>,
}

/// Why the simulated CPU stopped an instruction.
#[derive(Clone, Copy, Debug)]
enum Stop {
    /// The engine wants the instruction emulated (its target is a shadowed page table).
    Emulate(Gpa),
    /// The guest sees this instead.
    Guest(GuestError),
}

impl HwMemory<'_> {
    fn translate(&mut self, va: u64, kind: AccessKind) -> Result<Maddr, EmuFault> {
        let access = Access::new(kind, self.privilege);
        match self.m.access(self.v, Gva::new(va), access, None) {
            Ok(Reached::At(addr)) => Ok(addr),
            Ok(Reached::NeedsEmulation(gpa)) => {
                self.stop = Some(Stop::Emulate(gpa));
                Err(EmuFault::GeneralProtection)
            }
            Ok(Reached::Emulated) => {
                self.stop = Some(Stop::Guest(GuestError::Engine(EngineError::Internal(
                    "an instruction access was emulated as data",
                ))));
                Err(EmuFault::GeneralProtection)
            }
            Err(GuestError::PageFault { va, code }) => Err(EmuFault::PageFault {
                va: va.raw(),
                code: code.bits(),
            }),
            Err(GuestError::GeneralProtection) => Err(EmuFault::GeneralProtection),
            Err(e) => {
                self.stop = Some(Stop::Guest(e));
                Err(EmuFault::GeneralProtection)
            }
        }
    }

    fn load(&mut self, va: u64, buf: &mut [u8], kind: AccessKind) -> Result<(), EmuFault> {
        let mut done = 0;
        for (at, n) in page_pieces(va, buf.len()) {
            let addr = self.translate(at, kind)?;
            self.m
                .domain
                .host()
                .read_bytes(addr, &mut buf[done..done + n])
                .map_err(|_| EmuFault::GeneralProtection)?;
            done += n;
        }
        Ok(())
    }
}

impl EmuMemory for HwMemory<'_> {
    fn fetch(&mut self, va: u64, buf: &mut [u8]) -> Result<(), EmuFault> {
        self.load(va, buf, AccessKind::Fetch)
    }
    fn read(&mut self, va: u64, buf: &mut [u8]) -> Result<(), EmuFault> {
        self.load(va, buf, AccessKind::Read)
    }
    fn read_for_write(&mut self, va: u64, buf: &mut [u8]) -> Result<(), EmuFault> {
        self.load(va, buf, AccessKind::Write)
    }
    fn write(&mut self, va: u64, data: &[u8]) -> Result<(), EmuFault> {
        let targets = self.translate_for_write(va, data.len())?;
        let mut done = 0;
        for &(addr, n) in targets.pieces() {
            self.m
                .domain
                .host_mut()
                .write_bytes(addr, &data[done..done + n])
                .map_err(|_| EmuFault::GeneralProtection)?;
            done += n;
        }
        Ok(())
    }
    // Single-threaded: nothing writes between the read and the write. One translation for
    // write of each page serves both, as one locked access of the hardware.
    fn compare_exchange(
        &mut self,
        va: u64,
        current: &[u8],
        new: &[u8],
    ) -> Result<AtomicUpdate, EmuFault> {
        if new.len() != current.len() {
            return serial_compare_exchange(self, va, current, new);
        }
        let mut buf = [0u8; 16];
        let Some(actual) = buf.get_mut(..current.len()) else {
            return Ok(AtomicUpdate::Unsupported);
        };
        let targets = self.translate_for_write(va, current.len())?;
        let mut done = 0;
        for &(addr, n) in targets.pieces() {
            self.m
                .domain
                .host()
                .read_bytes(addr, &mut actual[done..done + n])
                .map_err(|_| EmuFault::GeneralProtection)?;
            done += n;
        }
        if actual != current {
            return Ok(AtomicUpdate::Lost);
        }
        let mut done = 0;
        for &(addr, n) in targets.pieces() {
            self.m
                .domain
                .host_mut()
                .write_bytes(addr, &new[done..done + n])
                .map_err(|_| EmuFault::GeneralProtection)?;
            done += n;
        }
        Ok(AtomicUpdate::Written)
    }
}

/// Where the pages of one write landed, in order: (machine address, length).
struct WriteTargets {
    /// The emulator's writes span at most two pages: those need no allocation.
    few: [(Maddr, usize); 2],
    count: usize,
    more: Vec<(Maddr, usize)>,
}

impl WriteTargets {
    fn pieces(&self) -> impl Iterator<Item = &(Maddr, usize)> {
        self.few[..self.count.min(2)].iter().chain(&self.more)
    }
}

impl HwMemory<'_> {
    /// Translates every page of `va .. va + len` for a write before any byte is written.
    fn translate_for_write(&mut self, va: u64, len: usize) -> Result<WriteTargets, EmuFault> {
        let mut targets = WriteTargets {
            few: [(Maddr::new(0), 0); 2],
            count: 0,
            more: Vec::new(),
        };
        for (at, n) in page_pieces(va, len) {
            let target = (self.translate(at, AccessKind::Write)?, n);
            match targets.few.get_mut(targets.count) {
                Some(slot) => *slot = target,
                None => targets.more.push(target),
            }
            targets.count += 1;
        }
        Ok(targets)
    }
}

/// How many times one instruction may be restarted (after fills, an unshadow) before the
/// simulator calls it stuck.
const MAX_RESTARTS: usize = 16;

impl ShadowMachine {
    /// Executes the write instruction at `regs.rip` on vcpu `v` like hardware: instruction
    /// fetch, operand reads and the write go through the shadow tables; a fault the engine
    /// fixes restarts the instruction; a write to a shadowed page table is emulated by the
    /// engine from the instruction bytes in guest memory. On success `regs` hold the state
    /// after the instruction.
    pub fn exec(&mut self, v: usize, regs: &mut Regs) -> Result<(), GuestError> {
        let privilege = Privilege::of_cpl(regs.cpl);
        for _ in 0..MAX_RESTARTS {
            let mut next = *regs;
            let mut mem = HwMemory {
                m: self,
                v,
                privilege,
                stop: None,
            };
            let result = emulate_write(&mut next, &mut mem);
            let stop = mem.stop;
            match (stop, result) {
                (_, Ok(done)) => {
                    *regs = next;
                    if done.complete {
                        return Ok(());
                    }
                }
                (Some(Stop::Emulate(gpa)), _) => {
                    let (outcome, flush) = self
                        .retrying(|d| d.emulate(v, regs, gpa))
                        .map_err(GuestError::Engine)?;
                    self.settle(flush);
                    // The engine changed guest page tables: a correct guest's own TLB
                    // discipline follows such writes; the shadows were updated in place.
                    if let EmulateOutcome::Done(done) = &outcome {
                        self.note_emulated_writes(v, privilege, gpa, done);
                    }
                    match outcome {
                        EmulateOutcome::Done(done) if done.complete => return Ok(()),
                        EmulateOutcome::Done(_) | EmulateOutcome::Unshadowed => {}
                        EmulateOutcome::Fault(f) => return Err(guest_error(f)),
                        EmulateOutcome::Mmio { gpa } => return Err(GuestError::Mmio { gpa }),
                    }
                }
                (Some(Stop::Guest(e)), _) => return Err(e),
                (None, Err(EmuError::Fault(f))) => return Err(guest_error(f)),
                // The simulated CPU executes only the write instructions the emulator
                // decodes; anything else is an invalid opcode to it.
                (None, Err(EmuError::Unhandled(_))) => return Err(GuestError::InvalidOpcode),
            }
        }
        Err(GuestError::Engine(EngineError::Internal(
            "an instruction did not complete",
        )))
    }
}

impl ShadowMachine {
    /// Notes the frames an instruction the engine emulated wrote: the page its write
    /// faulted on, and every page of the ranges it reports (walked after the write, which
    /// may have changed their translation: the faulting page is named regardless).
    fn note_emulated_writes(&mut self, v: usize, privilege: Privilege, gpa: Gpa, done: &Emulated) {
        self.written.insert(gpa.gfn());
        let ctl = self.guest_control(v);
        let access = Access::new(AccessKind::Write, privilege);
        for range in done.writes.iter() {
            for (at, _) in page_pieces(range.va, range.len) {
                self.note_written(&ctl, Gva::new(at), access);
            }
        }
    }
}

fn guest_error(f: EmuFault) -> GuestError {
    match f {
        EmuFault::PageFault { va, code } => GuestError::PageFault {
            va: Gva::new(va),
            code: PfErrorCode(code),
        },
        EmuFault::GeneralProtection => GuestError::GeneralProtection,
    }
}

/// The guest's view of a refused control-register write: #GP, or the engine's error.
fn refused_control(e: EngineError) -> GuestError {
    match e {
        EngineError::Guest(GuestFault::GeneralProtection) => GuestError::GeneralProtection,
        e => GuestError::Engine(e),
    }
}

//! `KvmMachine`: a domain whose machine memory is a KVM VM's memory, and a vcpu that runs
//! the guest's CPL3 code on the engine's shadow roots. Exceptions come back through the
//! hypervisor area's stubs; page faults go to the engine, whose answer is carried out
//! (retry, emulate and skip, or hand the fault to the caller), and every flush the engine
//! hands out is carried out (see [`KvmMachine::settle`]) before the vcpu runs again.

use kvm_bindings::kvm_regs;
use shadow2::domain::EmulateOutcome;
use shadow2::emulate::{CodeMode, EmuFault, Regs};
use shadow2::multi::FaultOutcome;
use shadow2::p2m::P2mType;
use shadow2::paging::{ControlState, PagingLevels, PfErrorCode};
use shadow2::{Domain, DomainConfig, EngineError, Flush, Gfn, Gpa, Gva, MachineMemory, Mfn};

use crate::KvmError;
use crate::exits::{ExceptionFrame, ExitCounts, GuestExit};
use crate::hyper::{self, HyperArea};
use crate::memory::KvmMemory;
use crate::probe::Probe;
use crate::sregs;
use crate::vm::{RawExit, VcpuRun, Vm, memory_error};

/// Exception vector of #PF.
const PAGE_FAULT: u8 = 14;

/// A VM whose vcpus run guests on the engine's 4-level shadows.
#[derive(Debug)]
pub struct KvmMachine {
    // Dropped before the domain, which owns the memory the VM runs on.
    vm: Vm,
    domain: Domain<KvmMemory>,
    hyper: HyperArea,
    faults: Vec<(u64, FaultOutcome)>,
    /// What [`KvmMachine::run`] handled (the backend's vcpus count their own).
    handled: ExitCounts,
}

/// How to build a [`KvmMachine`].
#[derive(Clone, Debug)]
pub struct KvmConfig {
    /// VM memory in 4 KiB frames (guest RAM, the shadow pool, the p2m and the hypervisor
    /// area all come from it).
    pub frames: u64,
    /// The shadow pool's size in pages.
    pub pool_pages: usize,
    /// Vcpus.
    pub vcpus: usize,
    /// The guest OS's linear maps, handed to the engine (at most 4).
    pub linear_maps: Vec<shadow2::remove::LinearMapHint>,
    /// The guest OS's teardown hints.
    pub teardown: shadow2::remove::TeardownHints,
}

/// Page faults kept in [`KvmMachine::fault_log`].
const FAULT_LOG: usize = 1 << 16;

impl KvmMachine {
    /// A VM of `frames` 4 KiB frames with one vcpu, whose domain has a pool of
    /// `pool_pages`.
    pub fn new(probe: &Probe, frames: u64, pool_pages: usize) -> Result<KvmMachine, KvmError> {
        KvmMachine::with_config(
            probe,
            &KvmConfig {
                frames,
                pool_pages,
                vcpus: 1,
                linear_maps: Vec::new(),
                teardown: shadow2::remove::TeardownHints::NONE,
            },
        )
    }

    /// A VM as `cfg` says.
    pub fn with_config(probe: &Probe, cfg: &KvmConfig) -> Result<KvmMachine, KvmError> {
        if cfg.linear_maps.len() > 4 {
            return Err(EngineError::BadArgument("at most 4 linear-map hints").into());
        }
        let frames = cfg.frames;
        let pool_pages = cfg.pool_pages;
        let mut mem = KvmMemory::new(frames).map_err(memory_error)?;
        let hyper = HyperArea::build(&mut mem, cfg.vcpus)?;
        let mut config = DomainConfig {
            external: false,
            host_maxphyaddr: probe.maxphyaddr,
            ..DomainConfig::hvm(PagingLevels::Four, cfg.vcpus, pool_pages)
        };
        config.guest_features.maxphyaddr = probe.maxphyaddr;
        for (slot, hint) in config.linear_maps.iter_mut().zip(&cfg.linear_maps) {
            *slot = Some(*hint);
        }
        config.teardown = cfg.teardown;
        let mut domain = Domain::new(mem, config)?;
        for &frame in hyper.frames() {
            domain.add_hypervisor_frame(frame)?;
        }
        domain.set_hypervisor_l3(hyper.l3)?;

        let vm = Vm::new(domain.host(), cfg.vcpus)?;
        Ok(KvmMachine {
            vm,
            domain,
            hyper,
            faults: Vec::new(),
            handled: ExitCounts::default(),
        })
    }

    /// The domain.
    pub fn domain(&self) -> &Domain<KvmMemory> {
        &self.domain
    }

    /// The domain, mutably (flushes its calls return go to [`KvmMachine::settle`]).
    pub fn domain_mut(&mut self) -> &mut Domain<KvmMemory> {
        &mut self.domain
    }

    /// VM exits of [`KvmMachine::run`] so far, and the zaps of every flush.
    pub fn exits(&mut self) -> ExitCounts {
        let mut e = self.handled;
        if let Ok(run) = self.vm.vcpu(0) {
            e = e.plus(&run.exits);
        }
        let kicks = self.vm.kicks();
        e.tlb_flushes += kicks.zaps.load(std::sync::atomic::Ordering::Relaxed);
        e.kicks += kicks.signals();
        e
    }

    /// The VM's kick and zap counters.
    pub(crate) fn kicks(&self) -> std::sync::Arc<crate::kicks::Kicks> {
        self.vm.kicks()
    }

    /// The hypervisor area.
    pub fn hyper(&self) -> &HyperArea {
        &self.hyper
    }

    /// Sets the longest time one run of a vcpu may take before the guest is stopped and
    /// [`KvmError::Watchdog`] reported (20 s unless set).
    pub fn set_run_deadline(&mut self, deadline: std::time::Duration) {
        if let Ok(run) = self.vm.vcpu(0) {
            run.set_deadline(deadline);
        }
    }

    /// Hands vcpu `v` to whoever runs it from now on.
    pub(crate) fn take_vcpu(&mut self, v: usize) -> Result<VcpuRun, KvmError> {
        self.vm.take_vcpu(v)
    }

    /// Keeps a page fault and the engine's answer in the fault log.
    pub(crate) fn log_fault(&mut self, cr2: u64, outcome: FaultOutcome) {
        if self.faults.len() < FAULT_LOG {
            self.faults.push((cr2, outcome));
        }
    }

    /// The first page faults the engine handled: CR2 and the engine's answer.
    pub fn fault_log(&self) -> &[(u64, FaultOutcome)] {
        &self.faults
    }

    /// Gives guest frames `first..first+count` fresh frames of VM memory as RAM.
    pub fn add_ram(&mut self, first: Gfn, count: u64) -> Result<(), KvmError> {
        let mut i = 0;
        while i < count {
            let gfn = first.raw() + i;
            // An aligned 2 MiB run of guest frames gets an aligned run of machine frames, so
            // that shadow superpages can map it.
            let order = if gfn.is_multiple_of(512) && count - i >= 512 {
                9
            } else {
                0
            };
            let mfn = self
                .domain
                .host_mut()
                .alloc_block(order)
                .ok_or(KvmError::OutOfFrames)?;
            for k in 0..1u64 << order {
                let flush = self.domain.set_p2m(
                    Gfn::new(gfn + k),
                    Some((Mfn::new(mfn.raw() + k), P2mType::Ram)),
                )?;
                self.settle(flush)?;
            }
            i += 1 << order;
        }
        Ok(())
    }

    /// Writes guest-physical memory as the guest's loader would (page tables written this
    /// way are validated by the engine).
    pub fn write_guest(&mut self, gpa: Gpa, data: &[u8]) -> Result<(), KvmError> {
        let flush = self.domain.write_guest_phys(gpa, data)?;
        self.settle(flush)
    }

    /// Reads guest-physical memory.
    pub fn read_guest(&self, gpa: Gpa, out: &mut [u8]) -> Result<(), KvmError> {
        Ok(self.domain.read_guest_phys(gpa, out)?)
    }

    /// Starts the guest at CPL3 in 64-bit mode: its paging registers `ctl` (4-level) go to
    /// the engine, the hardware gets the engine's root, and the vcpu's registers are set.
    pub fn start_user(&mut self, ctl: ControlState, rip: u64, rsp: u64) -> Result<(), KvmError> {
        self.domain.set_control(0, ctl)?;
        let flush = self.domain.update_paging_modes(0)?;
        let hw = self
            .domain
            .hardware_control(0)
            .ok_or(EngineError::Internal("no root after a mode update"))?;
        let _ = flush.into_vcpus();
        let _ = self.domain.take_reloads();
        let run = self.vm.vcpu(0)?;
        run.init(Some(&hw))?;
        let vcpu = run.fd();
        let mut s = vcpu.get_sregs()?;
        s.cs = sregs::flat(hyper::USER_CS, 3, true, true);
        s.ss = sregs::flat(hyper::USER_DS, 3, false, false);
        s.ds = s.ss;
        s.es = s.ss;
        s.fs = s.ss;
        s.gs = s.ss;
        vcpu.set_sregs(&s)?;
        let regs = kvm_regs {
            rip,
            rsp,
            rflags: 0x2,
            ..kvm_regs::default()
        };
        vcpu.set_regs(&regs)?;
        Ok(())
    }

    /// Sets vcpu `v`'s descriptor tables and its paging registers from the engine (its
    /// root), for the backend's first run of it.
    pub(crate) fn init_vcpu(&mut self, v: usize) -> Result<(), KvmError> {
        let hw = self.domain.hardware_control(v);
        self.vm.vcpu(v)?.init(hw.as_ref())
    }

    /// Carries out a flush the engine handed out, and root changes, before the vcpus run
    /// again: a flush drops every translation KVM caches ([`Vm::zap`]), then each vcpu
    /// named is posted the engine's root for its CR3 (and kicked out of `KVM_RUN` if it
    /// runs on another thread; see [`crate::kicks`]).
    pub fn settle(&mut self, flush: Flush) -> Result<(), KvmError> {
        let flushed = flush.into_vcpus();
        let reloads = self.domain.take_reloads();
        let mut zapped = false;
        for v in 0..self.vm.vcpu_count() {
            if !flushed.contains(v) && !reloads.contains(v) {
                continue;
            }
            let Some(hw) = self.domain.hardware_control(v) else {
                // No root yet (the guest has not started) or none to run on.
                continue;
            };
            if flushed.contains(v) && !zapped {
                // One zap drops what KVM caches for every vcpu.
                self.vm.zap()?;
                zapped = true;
            }
            self.vm.post_paging(v, hw);
        }
        Ok(())
    }

    /// Runs vcpu 0 until it reports, takes a fault it must see, or dies.
    pub fn run(&mut self) -> Result<GuestExit, KvmError> {
        loop {
            match self.run_raw(0)? {
                RawExit::Io { port, value } => {
                    self.handled.guest_io += 1;
                    return Ok(GuestExit::Reported { port, value });
                }
                RawExit::Exception {
                    vector,
                    frame,
                    frame_gpa,
                } => {
                    if let Some(exit) = self.exception(vector, frame, frame_gpa)? {
                        return Ok(exit);
                    }
                }
            }
        }
    }

    /// Runs vcpu `v`, while the machine holds it, until its next exit (see
    /// [`VcpuRun::run_raw`]).
    fn run_raw(&mut self, v: usize) -> Result<RawExit, KvmError> {
        let mem = self.domain.host().mmap();
        self.vm.vcpu(v)?.run_raw(mem, &self.hyper)
    }

    /// Writes back an exception frame the VMM changed (the stub's `iretq` returns to it).
    pub(crate) fn write_frame(
        &mut self,
        frame_gpa: u64,
        frame: &ExceptionFrame,
    ) -> Result<(), KvmError> {
        self.domain
            .host()
            .write_bytes(frame_gpa, &frame.to_bytes())
            .map_err(memory_error)
    }

    /// Handles exception `vector` of vcpu 0, which it reported from its stub. `None`:
    /// resume.
    fn exception(
        &mut self,
        vector: u8,
        mut frame: ExceptionFrame,
        frame_gpa: u64,
    ) -> Result<Option<GuestExit>, KvmError> {
        let regs = self.vm.vcpu(0)?.fd().get_regs()?;
        if vector != PAGE_FAULT {
            self.handled.other_exceptions += 1;
            return Ok(Some(GuestExit::Exception {
                vector,
                error_code: frame.error_code,
                rip: frame.rip,
            }));
        }
        let cr2 = self.vm.vcpu(0)?.fd().get_sregs()?.cr2;
        let code = PfErrorCode(frame.error_code as u32);
        let (outcome, flush) = match self.engine(|d| d.page_fault(0, Gva::new(cr2), code)) {
            // Out of budget (a bounded search goes on): the guest retries the access.
            Err(KvmError::Engine(EngineError::Preempted)) => {
                self.handled.pf_spurious += 1;
                return Ok(None);
            }
            other => other?,
        };
        self.settle(flush)?;
        if self.faults.len() < FAULT_LOG {
            self.faults.push((cr2, outcome));
        }
        match outcome {
            FaultOutcome::Fixed => self.handled.pf_fixed += 1,
            FaultOutcome::Spurious => self.handled.pf_spurious += 1,
            FaultOutcome::Propagate(code) => {
                self.handled.pf_propagated += 1;
                return Ok(Some(GuestExit::PageFault {
                    cr2,
                    code,
                    rip: frame.rip,
                }));
            }
            FaultOutcome::Mmio { gpa } => {
                self.handled.pf_mmio += 1;
                return Ok(Some(GuestExit::Mmio {
                    gpa,
                    rip: frame.rip,
                }));
            }
            FaultOutcome::Emulate { gpa } => {
                self.handled.pf_emulated += 1;
                if let Some(exit) = self.emulate(&regs, &mut frame, gpa)? {
                    return Ok(Some(exit));
                }
                self.write_frame(frame_gpa, &frame)?;
            }
        }
        Ok(None)
    }

    /// Runs the engine's emulator on the guest's instruction at the frame's RIP; on
    /// success the frame (RIP past it, RSP, RFLAGS) and the vcpu's registers are updated.
    fn emulate(
        &mut self,
        regs: &kvm_regs,
        frame: &mut ExceptionFrame,
        gpa: Gpa,
    ) -> Result<Option<GuestExit>, KvmError> {
        let s = self.vm.vcpu(0)?.fd().get_sregs()?;
        let mut r = Regs {
            gpr: [
                regs.rax, regs.rcx, regs.rdx, regs.rbx, frame.rsp, regs.rbp, regs.rsi, regs.rdi,
                regs.r8, regs.r9, regs.r10, regs.r11, regs.r12, regs.r13, regs.r14, regs.r15,
            ],
            rip: frame.rip,
            rflags: frame.rflags,
            fs_base: s.fs.base,
            gs_base: s.gs.base,
            mode: CodeMode::Bits64,
            cpl: frame.cpl(),
        };
        let before = r.gpr;
        let (outcome, flush) = match self.engine(|d| d.emulate(0, &mut r, gpa)) {
            // Out of budget: the instruction runs again, faults again and goes on.
            Err(KvmError::Engine(EngineError::Preempted)) => return Ok(None),
            other => other?,
        };
        self.settle(flush)?;
        match outcome {
            EmulateOutcome::Done(_) => {}
            // The page is no longer shadowed: the guest retries natively.
            EmulateOutcome::Unshadowed => return Ok(None),
            EmulateOutcome::Fault(EmuFault::PageFault { va, code }) => {
                return Ok(Some(GuestExit::PageFault {
                    cr2: va,
                    code: PfErrorCode(code),
                    rip: frame.rip,
                }));
            }
            EmulateOutcome::Fault(EmuFault::GeneralProtection) => {
                return Ok(Some(GuestExit::Exception {
                    vector: 13,
                    error_code: 0,
                    rip: frame.rip,
                }));
            }
            EmulateOutcome::Mmio { gpa } => {
                return Ok(Some(GuestExit::Mmio {
                    gpa,
                    rip: frame.rip,
                }));
            }
        }
        frame.rip = r.rip;
        frame.rflags = r.rflags;
        frame.rsp = r.gpr[Regs::RSP];
        let mut changed = r.gpr;
        changed[Regs::RSP] = before[Regs::RSP];
        if changed != before {
            self.set_gprs(0, &r.gpr)?;
        }
        Ok(None)
    }

    /// Sets vcpu `v`'s general registers (not RSP, which is the stub's) while it sits in
    /// its stub.
    fn set_gprs(&mut self, v: usize, gpr: &[u64; 16]) -> Result<(), KvmError> {
        let run = self.vm.vcpu(v)?;
        run.complete_io()?;
        let vcpu = run.fd();
        let mut regs = vcpu.get_regs()?;
        regs.rax = gpr[0];
        regs.rcx = gpr[1];
        regs.rdx = gpr[2];
        regs.rbx = gpr[3];
        regs.rbp = gpr[5];
        regs.rsi = gpr[6];
        regs.rdi = gpr[7];
        regs.r8 = gpr[8];
        regs.r9 = gpr[9];
        regs.r10 = gpr[10];
        regs.r11 = gpr[11];
        regs.r12 = gpr[12];
        regs.r13 = gpr[13];
        regs.r14 = gpr[14];
        regs.r15 = gpr[15];
        vcpu.set_regs(&regs)?;
        Ok(())
    }

    /// Calls the engine; after an error, the flush the failed call owes is carried out
    /// first, as the engine requires.
    pub(crate) fn engine<R>(
        &mut self,
        f: impl FnOnce(&mut Domain<KvmMemory>) -> Result<R, EngineError>,
    ) -> Result<R, KvmError> {
        match f(&mut self.domain) {
            Ok(r) => Ok(r),
            Err(e) => {
                let flush = self.domain.take_flush();
                self.settle(flush)?;
                self.restore_roots()?;
                Err(e.into())
            }
        }
    }

    /// Gives the vcpu a root again when a failed call took its top away (it must not run
    /// without one), carrying out the flushes that asks for.
    fn restore_roots(&mut self) -> Result<(), KvmError> {
        const ROUNDS: usize = 8;
        for _ in 0..ROUNDS {
            if self.domain.rootless().is_empty() || self.domain.failure().is_some() {
                return Ok(());
            }
            let flush = match self.domain.load_roots() {
                Ok(flush) => flush,
                Err(_) => self.domain.take_flush(),
            };
            self.settle(flush)?;
        }
        if self.domain.rootless().is_empty() {
            Ok(())
        } else {
            Err(EngineError::Internal("the vcpu has no shadow root to run on").into())
        }
    }
}

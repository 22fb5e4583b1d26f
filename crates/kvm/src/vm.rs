//! `KvmMachine`: a domain whose machine memory is a KVM VM's memory, and a vcpu that runs
//! the guest's CPL3 code on the engine's shadow roots. Exceptions come back through the
//! hypervisor area's stubs; page faults go to the engine, whose answer is carried out
//! (retry, emulate and skip, or hand the fault to the caller), and every flush the engine
//! hands out is carried out (see [`KvmMachine::settle`]) before the vcpu runs again.

use std::time::Duration;

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, kvm_regs, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use shadow2::domain::EmulateOutcome;
use shadow2::emulate::{CodeMode, EmuFault, Regs};
use shadow2::multi::FaultOutcome;
use shadow2::p2m::P2mType;
use shadow2::paging::bits::cr;
use shadow2::paging::{ControlState, PagingLevels, PfErrorCode};
use shadow2::{Domain, DomainConfig, EngineError, Flush, Gfn, Gpa, Gva, MachineMemory};
use vm_memory::{GuestAddress, GuestMemory};

use crate::KvmError;
use crate::exits::{ExceptionFrame, ExitCounts, GuestExit};
use crate::hyper::{self, HyperArea};
use crate::memory::KvmMemory;
use crate::probe::Probe;
use crate::sregs;
use crate::watchdog::Watchdog;

/// Exception vector of #PF.
const PAGE_FAULT: u8 = 14;
/// Longest time one [`KvmMachine::run`] may take before the guest is stopped.
const RUN_DEADLINE: Duration = Duration::from_secs(20);

/// A VM whose vcpus run guests on the engine's 4-level shadows.
#[derive(Debug)]
pub struct KvmMachine {
    domain: Domain<KvmMemory>,
    _kvm: Kvm,
    vm: VmFd,
    region: kvm_userspace_memory_region,
    vcpus: Vec<VcpuFd>,
    /// Vcpus whose last exit was an I/O exit KVM has not completed yet.
    io_pending: Vec<bool>,
    /// Vcpus that exited from a ring-0 stub (their segment registers are the stub's).
    in_stub: Vec<bool>,
    hyper: HyperArea,
    exits: ExitCounts,
    faults: Vec<(u64, FaultOutcome)>,
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

/// What one `KVM_RUN` ended with, before any handling.
#[derive(Clone, Copy, Debug)]
pub(crate) enum RawExit {
    /// `out` to `port` from the guest (not a stub).
    Io {
        /// The port.
        port: u16,
        /// The value.
        value: u32,
    },
    /// Exception `vector` from CPL 1-3, its frame at `frame_gpa` on the ring-0 stack.
    Exception {
        /// The vector.
        vector: u8,
        /// The frame the CPU pushed.
        frame: ExceptionFrame,
        /// Where it is.
        frame_gpa: u64,
    },
}

/// Page faults kept in [`KvmMachine::fault_log`].
const FAULT_LOG: usize = 1 << 16;

fn memory_error(e: impl std::fmt::Debug) -> KvmError {
    KvmError::Memory(format!("{e:?}"))
}

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
        let hyper = HyperArea::build(&mut mem)?;
        let host_addr = mem
            .mmap()
            .get_host_address(GuestAddress(0))
            .map_err(memory_error)?;
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

        let kvm = Kvm::new().map_err(|e| KvmError::Unavailable(probe_error(e)))?;
        let vm = kvm.create_vm()?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: frames * 4096,
            userspace_addr: host_addr as u64,
        };
        // SAFETY: the region is the whole vm-memory mapping, which the domain owns and
        // keeps mapped for as long as this machine (and so the VM) lives; nothing else
        // aliases it as Rust references (every access goes through vm-memory's volatile
        // copies).
        unsafe { vm.set_user_memory_region(region)? };
        // The guest sees the host's MAXPHYADDR, so reserved-bit faults match the engine's.
        let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
        let mut vcpus = Vec::with_capacity(cfg.vcpus);
        for id in 0..cfg.vcpus {
            let vcpu = vm.create_vcpu(id as u64)?;
            vcpu.set_cpuid2(&cpuid)?;
            vcpus.push(vcpu);
        }
        Ok(KvmMachine {
            domain,
            _kvm: kvm,
            vm,
            region,
            io_pending: vec![false; vcpus.len()],
            in_stub: vec![false; vcpus.len()],
            vcpus,
            hyper,
            exits: ExitCounts::default(),
            faults: Vec::new(),
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

    /// VM exits so far.
    pub fn exits(&self) -> ExitCounts {
        self.exits
    }

    /// VM exits so far, mutably (the backend counts what it handles itself).
    pub(crate) fn exits_mut(&mut self) -> &mut ExitCounts {
        &mut self.exits
    }

    /// The hypervisor area.
    pub fn hyper(&self) -> &HyperArea {
        &self.hyper
    }

    /// Vcpu `v`.
    pub(crate) fn vcpu(&self, v: usize) -> Result<&VcpuFd, KvmError> {
        self.vcpus
            .get(v)
            .ok_or(KvmError::Engine(EngineError::BadArgument("no such vcpu")))
    }

    /// The first page faults the engine handled: CR2 and the engine's answer.
    pub fn fault_log(&self) -> &[(u64, FaultOutcome)] {
        &self.faults
    }

    /// Gives guest frames `first..first+count` fresh frames of VM memory as RAM.
    pub fn add_ram(&mut self, first: Gfn, count: u64) -> Result<(), KvmError> {
        for i in 0..count {
            let mfn = self
                .domain
                .host_mut()
                .alloc_block(0)
                .ok_or(KvmError::OutOfFrames)?;
            let flush = self
                .domain
                .set_p2m(Gfn::new(first.raw() + i), Some((mfn, P2mType::Ram)))?;
            self.settle(flush)?;
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
        let vcpu = self.vcpu(0)?;
        let mut s = vcpu.get_sregs()?;
        s.cs = sregs::flat(hyper::USER_CS, 3, true, true);
        s.ss = sregs::flat(hyper::USER_DS, 3, false, false);
        s.ds = s.ss;
        s.es = s.ss;
        s.fs = s.ss;
        s.gs = s.ss;
        s.tr = sregs::tss(hyper::TSS_SEL, hyper::TSS_VA, hyper::TSS_LIMIT);
        s.ldt = sregs::no_ldt();
        s.gdt.base = hyper::GDT_VA;
        s.gdt.limit = hyper::GDT_LIMIT;
        s.idt.base = hyper::IDT_VA;
        s.idt.limit = u16::from(hyper::VECTORS) * 16 - 1;
        apply_paging(&mut s, &hw);
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
        let vcpu = self.vcpu(v)?;
        let mut s = vcpu.get_sregs()?;
        s.cs = sregs::flat(hyper::RING1_CS, 1, true, true);
        s.ss = sregs::flat(hyper::RING1_DS, 1, false, false);
        s.ds = s.ss;
        s.es = s.ss;
        s.fs = s.ss;
        s.gs = s.ss;
        s.tr = sregs::tss(hyper::TSS_SEL, hyper::TSS_VA, hyper::TSS_LIMIT);
        s.ldt = sregs::no_ldt();
        s.gdt.base = hyper::GDT_VA;
        s.gdt.limit = hyper::GDT_LIMIT;
        s.idt.base = hyper::IDT_VA;
        s.idt.limit = u16::from(hyper::VECTORS) * 16 - 1;
        if let Some(hw) = hw {
            apply_paging(&mut s, &hw);
        }
        vcpu.set_sregs(&s)?;
        Ok(())
    }

    /// Carries out a flush the engine handed out, and root changes, before the vcpu runs
    /// again. A flush drops every translation KVM caches: on a shadow-MMU KVM (PVM here)
    /// KVM keeps its own shadows of the engine's shadows, write-protected against the
    /// guest but blind to this process's writes, and neither a CR3 reload nor a CR4
    /// change through KVM_SET_SREGS resyncs them (measured: a zapped writable entry stays
    /// usable). Deleting the memory slot and adding it back zaps all of them. Then the
    /// hardware's CR3 is loaded with the engine's root.
    pub fn settle(&mut self, flush: Flush) -> Result<(), KvmError> {
        let flushed = flush.into_vcpus();
        let reloads = self.domain.take_reloads();
        let mut zapped = false;
        for v in 0..self.vcpus.len() {
            if !flushed.contains(v) && !reloads.contains(v) {
                continue;
            }
            let Some(hw) = self.domain.hardware_control(v) else {
                // No root yet (the guest has not started) or none to run on.
                continue;
            };
            if flushed.contains(v) && !zapped {
                // One zap drops what KVM caches for every vcpu.
                let mut gone = self.region;
                gone.memory_size = 0;
                // SAFETY: deleting the slot and adding back the same mapping (see
                // `with_config`).
                unsafe {
                    self.vm.set_user_memory_region(gone)?;
                    self.vm.set_user_memory_region(self.region)?;
                }
                self.exits.tlb_flushes += 1;
                zapped = true;
            }
            let vcpu = self.vcpu(v)?;
            let mut s = vcpu.get_sregs()?;
            apply_paging(&mut s, &hw);
            vcpu.set_sregs(&s)?;
            self.exits.cr3_reloads += 1;
        }
        Ok(())
    }

    /// Runs vcpu 0 until it reports, takes a fault it must see, or dies.
    pub fn run(&mut self) -> Result<GuestExit, KvmError> {
        loop {
            match self.run_raw(0)? {
                RawExit::Io { port, value } => {
                    self.exits.guest_io += 1;
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

    /// Runs vcpu `v` until its next exit: an `out` of the guest to its report port, or an
    /// exception a stub reported. A death (an exit of another kind, an exception in ring
    /// 0, an `out` to a port the guest may not use) or the watchdog is an error.
    pub(crate) fn run_raw(&mut self, v: usize) -> Result<RawExit, KvmError> {
        let _deadline = Watchdog::arm(RUN_DEADLINE);
        let vcpu = self
            .vcpus
            .get_mut(v)
            .ok_or(KvmError::Engine(EngineError::BadArgument("no such vcpu")))?;
        let exit = match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                let mut value = [0u8; 4];
                let n = data.len().min(4);
                value[..n].copy_from_slice(&data[..n]);
                Ok((port, u32::from_le_bytes(value)))
            }
            Ok(other) => Err(format!("{other:?}")),
            Err(e) if e.errno() == libc::EINTR => {
                let rip = vcpu.get_regs().map_or(0, |r| r.rip);
                return Err(KvmError::Watchdog {
                    seconds: RUN_DEADLINE.as_secs(),
                    rip,
                });
            }
            Err(e) => return Err(e.into()),
        };
        self.exits.total += 1;
        let (port, value) = match exit {
            Ok(io) => io,
            Err(reason) => {
                let rip = vcpu.get_regs().map_or(0, |r| r.rip);
                return Err(KvmError::Died { reason, rip });
            }
        };
        if let Some(p) = self.io_pending.get_mut(v) {
            *p = true;
        }
        if let Some(s) = self.in_stub.get_mut(v) {
            *s = port != hyper::GUEST_PORT;
        }
        if port == hyper::GUEST_PORT {
            return Ok(RawExit::Io { port, value });
        }
        let vector = port.wrapping_sub(hyper::STUB_PORT_BASE);
        let regs = self.vcpu(v)?.get_regs()?;
        if vector >= u16::from(hyper::VECTORS) {
            return Err(KvmError::Died {
                reason: format!("I/O to port {port:#x}"),
                rip: regs.rip,
            });
        }
        let frame_gpa = self.frame_gpa(regs.rsp, regs.rip)?;
        let mut bytes = [0u8; ExceptionFrame::BYTES];
        self.domain
            .host()
            .read_bytes(frame_gpa, &mut bytes)
            .map_err(memory_error)?;
        let frame = ExceptionFrame::from_bytes(&bytes);
        if frame.cpl() == 0 {
            return Err(KvmError::Died {
                reason: format!("exception {vector} in ring 0"),
                rip: frame.rip,
            });
        }
        Ok(RawExit::Exception {
            vector: vector as u8,
            frame,
            frame_gpa,
        })
    }

    /// Whether vcpu `v` last exited from a ring-0 stub: its segment registers are the
    /// stub's until it returns to the frame.
    pub(crate) fn in_stub(&self, v: usize) -> bool {
        self.in_stub.get(v).copied().unwrap_or(true)
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
        let regs = self.vcpu(0)?.get_regs()?;
        if vector != PAGE_FAULT {
            self.exits.other_exceptions += 1;
            return Ok(Some(GuestExit::Exception {
                vector,
                error_code: frame.error_code,
                rip: frame.rip,
            }));
        }
        let cr2 = self.vcpu(0)?.get_sregs()?.cr2;
        let code = PfErrorCode(frame.error_code as u32);
        let (outcome, flush) = match self.engine(|d| d.page_fault(0, Gva::new(cr2), code)) {
            // Out of budget (a bounded search goes on): the guest retries the access.
            Err(KvmError::Engine(EngineError::Preempted)) => {
                self.exits.pf_spurious += 1;
                return Ok(None);
            }
            other => other?,
        };
        self.settle(flush)?;
        if self.faults.len() < FAULT_LOG {
            self.faults.push((cr2, outcome));
        }
        match outcome {
            FaultOutcome::Fixed => self.exits.pf_fixed += 1,
            FaultOutcome::Spurious => self.exits.pf_spurious += 1,
            FaultOutcome::Propagate(code) => {
                self.exits.pf_propagated += 1;
                return Ok(Some(GuestExit::PageFault {
                    cr2,
                    code,
                    rip: frame.rip,
                }));
            }
            FaultOutcome::Mmio { gpa } => {
                self.exits.pf_mmio += 1;
                return Ok(Some(GuestExit::Mmio {
                    gpa,
                    rip: frame.rip,
                }));
            }
            FaultOutcome::Emulate { gpa } => {
                self.exits.pf_emulated += 1;
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
        let s = self.vcpu(0)?.get_sregs()?;
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

    /// Completes vcpu `v`'s pending I/O exit, as KVM requires before its registers are
    /// overwritten: one `KVM_RUN` with `immediate_exit` set.
    pub(crate) fn complete_io(&mut self, v: usize) -> Result<(), KvmError> {
        if !self.io_pending.get(v).copied().unwrap_or(false) {
            return Ok(());
        }
        let vcpu = self
            .vcpus
            .get_mut(v)
            .ok_or(KvmError::Engine(EngineError::BadArgument("no such vcpu")))?;
        vcpu.set_kvm_immediate_exit(1);
        let completed = match vcpu.run() {
            Err(e) if e.errno() == libc::EINTR => Ok(()),
            Err(e) => Err(KvmError::from(e)),
            Ok(other) => Err(KvmError::Died {
                reason: format!("completing an I/O exit: {other:?}"),
                rip: 0,
            }),
        };
        vcpu.set_kvm_immediate_exit(0);
        completed?;
        if let Some(p) = self.io_pending.get_mut(v) {
            *p = false;
        }
        self.exits.io_completions += 1;
        Ok(())
    }

    /// Sets vcpu `v`'s general registers (not RSP, which is the stub's) while it sits in
    /// its stub.
    fn set_gprs(&mut self, v: usize, gpr: &[u64; 16]) -> Result<(), KvmError> {
        self.complete_io(v)?;
        let vcpu = self.vcpu(v)?;
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

    /// Where on the ring-0 stacks the exception frame is (the stub's RSP).
    fn frame_gpa(&self, rsp: u64, rip: u64) -> Result<u64, KvmError> {
        let last = rsp + ExceptionFrame::BYTES as u64 - 1;
        match (self.hyper.writable_gpa(rsp), self.hyper.writable_gpa(last)) {
            (Some(gpa), Some(end)) if end == gpa + ExceptionFrame::BYTES as u64 - 1 => Ok(gpa),
            _ => Err(KvmError::Died {
                reason: format!("exception frame at {rsp:#x}, outside the ring-0 stacks"),
                rip,
            }),
        }
    }
}

/// The paging registers the engine wants the hardware to run with.
fn apply_paging(s: &mut kvm_bindings::kvm_sregs, hw: &ControlState) {
    s.cr0 = hw.cr0 | sregs::CR0_FIXED;
    s.cr3 = hw.cr3;
    s.cr4 = hw.cr4;
    s.efer = hw.efer | cr::EFER_LME | cr::EFER_LMA;
}

fn probe_error(e: kvm_ioctls::Error) -> crate::Unavailable {
    crate::Unavailable::NoDevice(e.to_string())
}

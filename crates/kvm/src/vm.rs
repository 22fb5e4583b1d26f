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

/// A VM with one vcpu running a 4-level guest on the engine's 4-level shadows.
#[derive(Debug)]
pub struct KvmMachine {
    domain: Domain<KvmMemory>,
    _kvm: Kvm,
    vm: VmFd,
    region: kvm_userspace_memory_region,
    vcpu: VcpuFd,
    hyper: HyperArea,
    exits: ExitCounts,
    faults: Vec<(u64, FaultOutcome)>,
}

/// Page faults kept in [`KvmMachine::fault_log`].
const FAULT_LOG: usize = 1 << 16;

fn memory_error(e: impl std::fmt::Debug) -> KvmError {
    KvmError::Memory(format!("{e:?}"))
}

impl KvmMachine {
    /// A VM of `frames` 4 KiB frames whose domain has a pool of `pool_pages`.
    pub fn new(probe: &Probe, frames: u64, pool_pages: usize) -> Result<KvmMachine, KvmError> {
        let mut mem = KvmMemory::new(frames).map_err(memory_error)?;
        let hyper = HyperArea::build(&mut mem)?;
        let host_addr = mem
            .mmap()
            .get_host_address(GuestAddress(0))
            .map_err(memory_error)?;
        let mut config = DomainConfig {
            external: false,
            host_maxphyaddr: probe.maxphyaddr,
            ..DomainConfig::hvm(PagingLevels::Four, 1, pool_pages)
        };
        config.guest_features.maxphyaddr = probe.maxphyaddr;
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
        let vcpu = vm.create_vcpu(0)?;
        // The guest sees the host's MAXPHYADDR, so reserved-bit faults match the engine's.
        let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
        vcpu.set_cpuid2(&cpuid)?;
        Ok(KvmMachine {
            domain,
            _kvm: kvm,
            vm,
            region,
            vcpu,
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
        let mut s = self.vcpu.get_sregs()?;
        s.cs = sregs::flat(hyper::USER_CS, 3, true, true);
        s.ss = sregs::flat(hyper::USER_DS, 3, false, false);
        s.ds = s.ss;
        s.es = s.ss;
        s.fs = s.ss;
        s.gs = s.ss;
        s.tr = sregs::tss(hyper::TSS_SEL, hyper::TSS_VA, hyper::TSS_LIMIT);
        s.ldt = sregs::no_ldt();
        s.gdt.base = hyper::GDT_VA;
        s.gdt.limit = 0x4f;
        s.idt.base = hyper::IDT_VA;
        s.idt.limit = u16::from(hyper::VECTORS) * 16 - 1;
        apply_paging(&mut s, &hw);
        self.vcpu.set_sregs(&s)?;
        let regs = kvm_regs {
            rip,
            rsp,
            rflags: 0x2,
            ..kvm_regs::default()
        };
        self.vcpu.set_regs(&regs)?;
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
        if !flushed.contains(0) && !reloads.contains(0) {
            return Ok(());
        }
        let Some(hw) = self.domain.hardware_control(0) else {
            // No root yet (the guest has not started) or none to run on.
            return Ok(());
        };
        if flushed.contains(0) {
            let mut gone = self.region;
            gone.memory_size = 0;
            // SAFETY: deleting the slot and adding back the same mapping (see `new`).
            unsafe {
                self.vm.set_user_memory_region(gone)?;
                self.vm.set_user_memory_region(self.region)?;
            }
            self.exits.tlb_flushes += 1;
        }
        let mut s = self.vcpu.get_sregs()?;
        apply_paging(&mut s, &hw);
        self.vcpu.set_sregs(&s)?;
        self.exits.cr3_reloads += 1;
        Ok(())
    }

    /// Runs the guest until it reports, takes a fault it must see, or dies.
    pub fn run(&mut self) -> Result<GuestExit, KvmError> {
        let _deadline = Watchdog::arm(RUN_DEADLINE);
        loop {
            let exit = match self.vcpu.run() {
                Ok(VcpuExit::IoOut(port, data)) => {
                    let mut value = [0u8; 4];
                    let n = data.len().min(4);
                    value[..n].copy_from_slice(&data[..n]);
                    Ok((port, u32::from_le_bytes(value)))
                }
                Ok(other) => Err(format!("{other:?}")),
                Err(e) if e.errno() == libc::EINTR => {
                    let rip = self.vcpu.get_regs().map_or(0, |r| r.rip);
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
                    let rip = self.vcpu.get_regs().map_or(0, |r| r.rip);
                    return Err(KvmError::Died { reason, rip });
                }
            };
            if port == hyper::GUEST_PORT {
                self.exits.guest_io += 1;
                return Ok(GuestExit::Reported { port, value });
            }
            let vector = port.wrapping_sub(hyper::STUB_PORT_BASE);
            if vector >= u16::from(hyper::VECTORS) {
                let rip = self.vcpu.get_regs().map_or(0, |r| r.rip);
                return Err(KvmError::Died {
                    reason: format!("I/O to port {port:#x}"),
                    rip,
                });
            }
            if let Some(exit) = self.exception(vector as u8)? {
                return Ok(exit);
            }
        }
    }

    /// Handles exception `vector`, which the vcpu reported from its stub. `None`: resume.
    fn exception(&mut self, vector: u8) -> Result<Option<GuestExit>, KvmError> {
        let regs = self.vcpu.get_regs()?;
        let frame_gpa = self.frame_gpa(regs.rsp, regs.rip)?;
        let mut bytes = [0u8; ExceptionFrame::BYTES];
        self.domain
            .host()
            .read_bytes(frame_gpa, &mut bytes)
            .map_err(memory_error)?;
        let mut frame = ExceptionFrame::from_bytes(&bytes);
        if frame.cpl() == 0 {
            return Err(KvmError::Died {
                reason: format!("exception {vector} in ring 0"),
                rip: frame.rip,
            });
        }
        if vector != PAGE_FAULT {
            self.exits.other_exceptions += 1;
            return Ok(Some(GuestExit::Exception {
                vector,
                error_code: frame.error_code,
                rip: frame.rip,
            }));
        }
        let cr2 = self.vcpu.get_sregs()?.cr2;
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
                self.domain
                    .host()
                    .write_bytes(frame_gpa, &frame.to_bytes())
                    .map_err(memory_error)?;
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
        let s = self.vcpu.get_sregs()?;
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
            self.set_gprs(&r.gpr)?;
        }
        Ok(None)
    }

    /// Sets the guest's general registers (not RSP, which is the stub's) while the vcpu
    /// sits in its stub: the pending I/O exit is completed first, as KVM requires.
    fn set_gprs(&mut self, gpr: &[u64; 16]) -> Result<(), KvmError> {
        self.vcpu.set_kvm_immediate_exit(1);
        let completed = match self.vcpu.run() {
            Err(e) if e.errno() == libc::EINTR => Ok(()),
            Err(e) => Err(KvmError::from(e)),
            Ok(other) => Err(KvmError::Died {
                reason: format!("completing an I/O exit: {other:?}"),
                rip: 0,
            }),
        };
        self.vcpu.set_kvm_immediate_exit(0);
        completed?;
        let mut regs = self.vcpu.get_regs()?;
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
        self.vcpu.set_regs(&regs)?;
        Ok(())
    }

    /// Calls the engine; after an error, the flush the failed call owes is carried out
    /// first, as the engine requires.
    fn engine<R>(
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

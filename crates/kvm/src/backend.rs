//! The guest-operations interface ([`GuestOps`]) carried out by real x86 vcpus, on the
//! engine's shadows or on the guest's own tables ([`Paging`] says which). Each operation runs as real instructions at its privilege
//! level (kernel operations at CPL1, user operations at CPL3): loads and stores by the
//! [`executor`](crate::executor)'s `rep movsb`, fetches by the CPU fetching at the address
//! itself, executed instructions single-stepped from the guest's own bytes, and the
//! privileged instructions (MOV CR0, MOV CR3, INVLPG) trapping to the VMM, which calls the
//! engine. Every trap the hardware takes goes to the engine as on a real hypervisor; the
//! guest model sees only the architectural result.
//!
//! Where the engine answers a store with `Emulate`, the VMM writes the store's remaining
//! bytes through the engine ([`Domain::write_guest_phys`]), exactly as the simulator does,
//! so one guest store is one trap on both. An executed instruction is emulated by the
//! engine's own emulator ([`Domain::emulate`]) on the hardware's registers.

use std::fmt;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use iced_x86::{Decoder, DecoderOptions};
use kvm_bindings::{kvm_debugregs, kvm_regs};
use kvm_ioctls::VcpuFd;
use shadow2::EngineError;
use shadow2::domain::EmulateOutcome;
use shadow2::emulate::{CodeMode, EmuFault, Regs};
use shadow2::multi::FaultOutcome;
use shadow2::paging::bits::{self, cr};
use shadow2::paging::{ControlState, PfErrorCode};
use shadow2::{Gpa, Mfn};
use shadow2_guest::{Fault, GuestOps, OpError};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::KvmError;
use crate::executor::{Executor, Privileged};
use crate::exits::{ExceptionFrame, ExitCounts};
use crate::hyper::{self, HyperArea};
use crate::kicks::Kicks;
use crate::memory::KvmMemory;
use crate::sregs;
use crate::vm::{RawExit, VcpuRun};

/// Exception vectors the backend tells apart.
const DEBUG: u8 = 1;
const INVALID_OPCODE: u8 = 6;
const GENERAL_PROTECTION: u8 = 13;
const PAGE_FAULT: u8 = 14;
/// RFLAGS.TF.
const TRAP_FLAG: u64 = 1 << 8;
/// RFLAGS bit 1, always set.
const RFLAGS_FIXED: u64 = 1 << 1;
/// HLT: what a fetch finds at its address (it #GPs at CPL 1 and 3).
const HLT: u8 = 0xf4;
/// Traps one operation may take before the backend gives up on it (the engine makes
/// progress on every trap; a guest operation touches one page).
const MAX_TRAPS_PER_OP: usize = 256;

/// The segment registers a vcpu holds: the hardware CPL (1 or 3) and whether CS is 64-bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Segments {
    cpl: u8,
    long: bool,
    fs_base: u64,
    gs_base: u64,
}

/// What differs between a vcpu running on the engine's shadows and one running on the
/// guest's own tables: who answers a page fault, and who carries out the privileged
/// operations.
pub(crate) trait Paging: Send + 'static {
    /// Hands vcpu `v` to the backend, which runs it from then on.
    fn take_vcpu(&mut self, v: usize) -> Result<VcpuRun, KvmError>;
    /// The VM's kick and zap counters (read without the machine's lock).
    fn kicks(&self) -> Arc<Kicks>;
    /// The VM's memory.
    fn mem(&self) -> &KvmMemory;
    /// The hypervisor area.
    fn hyper(&self) -> &HyperArea;
    /// The CR3 the hardware runs vcpu `v` on, if it has one.
    fn hardware_cr3(&self, v: usize) -> Option<u64>;
    /// The host's MAXPHYADDR.
    fn maxphyaddr(&self) -> u8;
    /// The guest's own control registers of vcpu `v`.
    fn guest_control(&self, v: usize) -> ControlState;
    /// Whether machine frame `mfn` is the guest's RAM (never the hypervisor's or the
    /// shadow pool's).
    fn is_guest_ram(&self, mfn: Mfn) -> bool;
    /// The answer to a page fault of vcpu `v` at `cr2`.
    fn page_fault(
        &mut self,
        v: usize,
        cr2: u64,
        code: PfErrorCode,
    ) -> Result<FaultOutcome, KvmError>;
    /// Writes the rest of a store whose page fault was answered `Emulate`.
    fn write_emulated(&mut self, gpa: Gpa, data: &[u8]) -> Result<(), KvmError>;
    /// Emulates the instruction at `regs` after its page fault was answered `Emulate`;
    /// `None`: preempted, the instruction runs again.
    fn emulate(
        &mut self,
        v: usize,
        regs: &mut Regs,
        gpa: Gpa,
    ) -> Result<Option<EmulateOutcome>, KvmError>;
    /// Carries out a privileged operation that trapped (`arg`: the new CR0, CR3 or the
    /// INVLPG address; `ctl`: the guest's new control registers).
    fn privileged(
        &mut self,
        v: usize,
        op: Privileged,
        arg: u64,
        ctl: ControlState,
    ) -> Result<(), OpError>;
    /// Writes guest-physical memory as the loader does.
    fn load_image(&mut self, gpa: Gpa, data: &[u8]) -> Result<(), KvmError>;
    /// Reads guest-physical memory.
    fn read_guest_phys(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), KvmError>;
    /// Called after every guest operation.
    fn after_op(&mut self) -> Result<(), KvmError> {
        Ok(())
    }
}

/// The hardware privilege level of a guest operation at `cpl`: the guest kernel runs at
/// CPL1 (supervisor, as CPL0 is, for paging), user code at CPL3.
fn hardware_cpl(cpl: u8) -> u8 {
    if cpl == 3 { 3 } else { 1 }
}

fn ioctl(e: kvm_ioctls::Error) -> OpError {
    backend(e.into())
}

fn backend(e: KvmError) -> OpError {
    OpError::Backend(e.to_string())
}

fn page_fault(va: u64, code: u32) -> OpError {
    OpError::Fault(Fault::PageFault { va, code })
}

/// How an engine answer to a trap continues the operation.
enum Next {
    /// Run the vcpu again (the stub returns to the guest).
    Resume,
    /// The operation is over, with this result.
    Done(Result<(), OpError>),
}

impl<P: Paging> Runner<P> {
    /// Loads the segment registers for `seg` (when they are not already there) and then
    /// `regs`, after completing the vcpu's pending I/O exit.
    fn load(&mut self, seg: Segments, regs: &kvm_regs) -> Result<(), KvmError> {
        self.run.complete_io()?;
        if self.run.in_stub() || self.segments != Some(seg) {
            let vcpu = self.run.fd();
            let mut s = vcpu.get_sregs()?;
            let (cs, ss) = match (seg.cpl, seg.long) {
                (3, true) => (hyper::USER_CS, hyper::USER_DS),
                (3, false) => (hyper::USER_CS32, hyper::USER_DS),
                (_, true) => (hyper::RING1_CS, hyper::RING1_DS),
                (_, false) => (hyper::RING1_CS32, hyper::RING1_DS),
            };
            s.cs = sregs::flat(cs, seg.cpl, true, seg.long);
            s.ss = sregs::flat(ss, seg.cpl, false, false);
            s.ds = s.ss;
            s.es = s.ss;
            s.fs = s.ss;
            s.gs = s.ss;
            s.fs.base = seg.fs_base;
            s.gs.base = seg.gs_base;
            vcpu.set_sregs(&s)?;
            self.segments = Some(seg);
        }
        self.fd().set_regs(regs)?;
        Ok(())
    }

    /// RFLAGS for the executor at `cpl`: the guest's AC (which decides SMAP for supervisor
    /// accesses).
    fn executor_rflags(&self, v: usize, cpl: u8) -> u64 {
        if cpl < 3 {
            RFLAGS_FIXED | (self.lock().guest_control(v).rflags & cr::RFLAGS_AC)
        } else {
            RFLAGS_FIXED
        }
    }

    fn executor_segments(cpl: u8) -> Segments {
        Segments {
            cpl,
            long: true,
            fs_base: 0,
            gs_base: 0,
        }
    }

    fn run_once(&mut self) -> Result<RawExit, OpError> {
        self.run.run_raw(&self.mem, &self.hyper).map_err(backend)
    }

    /// A page fault of vcpu `v` at the frame: the answer, counted.
    fn page_fault(
        &mut self,
        v: usize,
        frame: &ExceptionFrame,
    ) -> Result<(u64, FaultOutcome), OpError> {
        let cr2 = self.fd().get_sregs().map(|r| r.cr2).map_err(ioctl)?;
        let code = PfErrorCode(frame.error_code as u32);
        let outcome = self.lock().page_fault(v, cr2, code).map_err(backend)?;
        let exits = self.exits();
        match outcome {
            FaultOutcome::Fixed => exits.pf_fixed += 1,
            FaultOutcome::Spurious => exits.pf_spurious += 1,
            FaultOutcome::Propagate(_) => exits.pf_propagated += 1,
            FaultOutcome::Emulate { .. } => exits.pf_emulated += 1,
            FaultOutcome::Mmio { .. } => exits.pf_mmio += 1,
        }
        Ok((cr2, outcome))
    }

    /// Another exception of the guest's: its architectural fault, or the backend's error.
    fn other_exception(&mut self, vector: u8, frame: &ExceptionFrame) -> Result<(), OpError> {
        self.exits().other_exceptions += 1;
        match vector {
            GENERAL_PROTECTION => Err(OpError::Fault(Fault::GeneralProtection)),
            INVALID_OPCODE => Err(OpError::Fault(Fault::InvalidOpcode)),
            _ => Err(OpError::Backend(format!(
                "exception {vector} (error code {:#x}) at {:#x}",
                frame.error_code, frame.rip
            ))),
        }
    }

    /// A load (`Some(buf)`) or store of the operation's bytes at `va`, by the executor's
    /// `rep movsb` at `cpl`.
    fn copy(
        &mut self,
        v: usize,
        va: u64,
        cpl: u8,
        load: Option<&mut [u8]>,
        data: &[u8],
    ) -> Result<(), OpError> {
        let hw = hardware_cpl(cpl);
        let (buffer_va, buffer_gpa) = self
            .hyper
            .buffer(v, hw)
            .ok_or_else(|| OpError::Backend(format!("vcpu {v} has no mailbox")))?;
        let len = load.as_ref().map_or(data.len(), |b| b.len());
        if load.is_none() {
            self.write_own(buffer_gpa, data)?;
        }
        let (rsi, rdi) = if load.is_some() {
            (va, buffer_va)
        } else {
            (buffer_va, va)
        };
        let regs = kvm_regs {
            rsi,
            rdi,
            rcx: len as u64,
            rip: Executor::base(hw) + self.executor.copy,
            rflags: self.executor_rflags(v, hw),
            ..kvm_regs::default()
        };
        self.load(Self::executor_segments(hw), &regs)
            .map_err(backend)?;
        let copy_rip = regs.rip;
        for _ in 0..MAX_TRAPS_PER_OP {
            match self.run_once()? {
                RawExit::Io { .. } => {
                    self.exits().guest_io += 1;
                    if let Some(buf) = load {
                        self.read_own(buffer_gpa, buf)?;
                    }
                    return Ok(());
                }
                RawExit::Exception {
                    vector: PAGE_FAULT,
                    frame,
                    ..
                } => {
                    let (cr2, outcome) = self.page_fault(v, &frame)?;
                    match outcome {
                        FaultOutcome::Fixed | FaultOutcome::Spurious => {}
                        FaultOutcome::Propagate(code) => return Err(page_fault(cr2, code.0)),
                        // No devices: a load of MMIO reads zeros, a store goes nowhere.
                        FaultOutcome::Mmio { .. } => {
                            if let Some(buf) = load {
                                buf.fill(0);
                            }
                            return Ok(());
                        }
                        FaultOutcome::Emulate { gpa } => {
                            if load.is_some() || frame.rip != copy_rip {
                                return Err(OpError::Backend(format!(
                                    "the engine asked to emulate a load at {cr2:#x}"
                                )));
                            }
                            let left = self.fd().get_regs().map(|r| r.rcx).map_err(ioctl)? as usize;
                            let done = len.saturating_sub(left).min(data.len());
                            return self
                                .lock()
                                .write_emulated(gpa, &data[done..])
                                .map_err(backend);
                        }
                    }
                }
                RawExit::Exception { vector, frame, .. } => {
                    return self.other_exception(vector, &frame);
                }
            }
        }
        Err(OpError::Backend(format!(
            "an access at {va:#x} trapped {MAX_TRAPS_PER_OP} times"
        )))
    }

    /// Where the hardware would fetch `va` from through vcpu `v`'s tables now (a walk of
    /// the 4-level tables its CR3 names, no side effects), if they map it.
    fn hardware_translate(&self, v: usize, va: u64) -> Option<u64> {
        let m = self.lock();
        let mem = m.mem();
        let width = m.maxphyaddr();
        let mut table = m.hardware_cr3(v)? & bits::ADDR_MASK_8;
        for level in (1..=4u32).rev() {
            let index = (va >> (12 + 9 * (level - 1))) & 511;
            let mut e = [0u8; 8];
            mem.read_bytes(table + index * 8, &mut e).ok()?;
            let e = u64::from_le_bytes(e);
            if e & bits::P == 0 {
                return None;
            }
            let addr = e & bits::ADDR_MASK_8;
            if width < 52 && addr >> width != 0 {
                // Reserved address bits (the engine's markers): the hardware faults.
                return None;
            }
            if level > 1 && level < 4 && e & bits::PS != 0 {
                let span = 1u64 << (12 + 9 * (level - 1));
                return Some((addr & !(span - 1)) + (va & (span - 1)));
            }
            table = addr;
        }
        Some(table + (va & 0xfff))
    }

    /// An instruction fetch at `va`: the vcpu jumps there at `cpl` and the CPU fetches
    /// through its tables, with every trap that takes; the byte it finds is a HLT the VMM
    /// puts there for the run (and takes away before anything else looks at the page), so
    /// nothing of the guest's runs. The bytes returned are the page's own.
    fn fetch_at(&mut self, v: usize, va: u64, cpl: u8, buf: &mut [u8]) -> Result<(), OpError> {
        let hw = hardware_cpl(cpl);
        for _ in 0..MAX_TRAPS_PER_OP {
            let regs = kvm_regs {
                rip: va,
                rflags: self.executor_rflags(v, hw),
                ..kvm_regs::default()
            };
            self.load(Self::executor_segments(hw), &regs)
                .map_err(backend)?;
            let target = self
                .hardware_translate(v, va)
                .filter(|&maddr| self.lock().is_guest_ram(Mfn::new(maddr >> 12)));
            let saved = match target {
                Some(maddr) => Some((maddr, self.patch(maddr, HLT).map_err(backend)?)),
                None => None,
            };
            let exit = self.run_once();
            if let Some((maddr, old)) = saved {
                self.patch(maddr, old).map_err(backend)?;
            }
            match exit? {
                RawExit::Exception {
                    vector: GENERAL_PROTECTION,
                    frame,
                    ..
                } if frame.rip == va && saved.is_some() => {
                    self.exits().fetches += 1;
                    let maddr = saved.map_or(0, |(m, _)| m);
                    return self
                        .lock()
                        .mem()
                        .read_bytes(maddr, buf)
                        .map_err(|e| OpError::Backend(format!("fetch: {e:?}")));
                }
                RawExit::Exception {
                    vector: PAGE_FAULT,
                    frame,
                    ..
                } => {
                    let (cr2, outcome) = self.page_fault(v, &frame)?;
                    match outcome {
                        FaultOutcome::Fixed | FaultOutcome::Spurious => {}
                        FaultOutcome::Propagate(code) => return Err(page_fault(cr2, code.0)),
                        FaultOutcome::Mmio { .. } => {
                            buf.fill(0);
                            return Ok(());
                        }
                        FaultOutcome::Emulate { .. } => {
                            return Err(OpError::Backend(format!(
                                "the engine asked to emulate a fetch at {cr2:#x}"
                            )));
                        }
                    }
                }
                RawExit::Io { port, .. } => {
                    return Err(OpError::Backend(format!(
                        "a fetch at {va:#x} ran to an I/O to port {port:#x}"
                    )));
                }
                RawExit::Exception { vector, frame, .. } => {
                    return self.other_exception(vector, &frame);
                }
            }
        }
        Err(OpError::Backend(format!(
            "a fetch at {va:#x} trapped {MAX_TRAPS_PER_OP} times"
        )))
    }

    /// Writes `byte` at `maddr`, returning the byte that was there.
    fn patch(&mut self, maddr: u64, byte: u8) -> Result<u8, KvmError> {
        let m = self.lock();
        let mem = m.mem();
        let mut old = [0u8; 1];
        mem.read_bytes(maddr, &mut old)
            .map_err(|e| KvmError::Memory(format!("{e:?}")))?;
        mem.write_bytes(maddr, &[byte])
            .map_err(|e| KvmError::Memory(format!("{e:?}")))?;
        Ok(old[0])
    }

    /// The guest's registers as the hardware has them at an exception frame (RSP, RIP and
    /// RFLAGS from the frame, without the single-step flag), in the guest's mode.
    fn regs_at(&mut self, frame: &ExceptionFrame, like: &Regs) -> Result<Regs, KvmError> {
        let r = self.fd().get_regs()?;
        Ok(Regs {
            gpr: [
                r.rax, r.rcx, r.rdx, r.rbx, frame.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10,
                r.r11, r.r12, r.r13, r.r14, r.r15,
            ],
            rip: frame.rip,
            rflags: frame.rflags & !TRAP_FLAG,
            ..*like
        })
    }

    /// Executes the guest's instruction at `regs.rip`, single-stepped.
    fn exec_one(&mut self, v: usize, regs: &mut Regs) -> Result<(), OpError> {
        let hw = hardware_cpl(regs.cpl);
        let long = match regs.mode {
            CodeMode::Bits64 => true,
            CodeMode::Bits32 => false,
            CodeMode::Bits16 => {
                return Err(OpError::Backend(
                    "16-bit code cannot run under this backend".into(),
                ));
            }
        };
        let g = &regs.gpr;
        let hwregs = kvm_regs {
            rax: g[0],
            rcx: g[1],
            rdx: g[2],
            rbx: g[3],
            rsp: g[4],
            rbp: g[5],
            rsi: g[6],
            rdi: g[7],
            r8: g[8],
            r9: g[9],
            r10: g[10],
            r11: g[11],
            r12: g[12],
            r13: g[13],
            r14: g[14],
            r15: g[15],
            rip: regs.rip,
            rflags: regs.rflags | RFLAGS_FIXED | TRAP_FLAG,
        };
        let seg = Segments {
            cpl: hw,
            long,
            fs_base: regs.fs_base,
            gs_base: regs.gs_base,
        };
        self.load(seg, &hwregs).map_err(backend)?;
        let mut breakpoint = false;
        let result = self.step(v, regs, &mut breakpoint);
        if breakpoint {
            let cleared = kvm_debugregs::default();
            self.run.fd().set_debug_regs(&cleared).map_err(ioctl)?;
        }
        result
    }

    /// Runs the single-stepped instruction of [`Backend::exec_one`] to its end.
    fn step(&mut self, v: usize, regs: &mut Regs, breakpoint: &mut bool) -> Result<(), OpError> {
        for _ in 0..MAX_TRAPS_PER_OP {
            let (vector, frame, frame_gpa) = match self.run_once()? {
                RawExit::Io { port, .. } => {
                    return Err(OpError::Backend(format!(
                        "the instruction at {:#x} did I/O to port {port:#x}",
                        regs.rip
                    )));
                }
                RawExit::Exception {
                    vector,
                    frame,
                    frame_gpa,
                } => (vector, frame, frame_gpa),
            };
            match vector {
                // A REP string instruction traps between iterations (SDM vol. 3A 18.3.1.4):
                // it runs on without single-stepping, to a code breakpoint just past it.
                DEBUG if frame.rip == regs.rip && !*breakpoint => {
                    self.exits().single_steps += 1;
                    let next = self.next_rip(v, regs).map_err(backend)?;
                    let dr = kvm_debugregs {
                        db: [next, 0, 0, 0],
                        // L0, an instruction breakpoint (R/W0 = 0, LEN0 = 0).
                        dr7: 1 | (1 << 10),
                        ..kvm_debugregs::default()
                    };
                    self.fd().set_debug_regs(&dr).map_err(ioctl)?;
                    *breakpoint = true;
                    let mut resumed = frame;
                    resumed.rflags &= !TRAP_FLAG;
                    self.write_own(frame_gpa, &resumed.to_bytes())?;
                }
                DEBUG if frame.rip != regs.rip => {
                    self.exits().single_steps += 1;
                    *regs = self.regs_at(&frame, regs).map_err(backend)?;
                    return Ok(());
                }
                PAGE_FAULT => match self.exec_fault(v, &frame, regs)? {
                    Next::Resume => {}
                    Next::Done(result) => return result,
                },
                _ => return self.other_exception(vector, &frame),
            }
        }
        Err(OpError::Backend(format!(
            "the instruction at {:#x} trapped {MAX_TRAPS_PER_OP} times",
            regs.rip
        )))
    }

    /// The address just past the instruction at `regs.rip`, decoded from the bytes the
    /// hardware fetched it from.
    fn next_rip(&self, v: usize, regs: &Regs) -> Result<u64, KvmError> {
        let maddr = self
            .hardware_translate(v, regs.rip)
            .ok_or(KvmError::Engine(EngineError::Internal(
                "a trapped instruction is not mapped",
            )))?;
        let room = (4096 - (regs.rip & 0xfff)).min(15) as usize;
        let mut bytes = [0u8; 15];
        self.lock()
            .mem()
            .read_bytes(maddr, &mut bytes[..room])
            .map_err(|e| KvmError::Memory(format!("{e:?}")))?;
        let bitness = if regs.mode == CodeMode::Bits64 {
            64
        } else {
            32
        };
        let mut d = Decoder::with_ip(bitness, &bytes[..room], regs.rip, DecoderOptions::NONE);
        let ins = d.decode();
        if ins.is_invalid() {
            return Err(EngineError::Internal("a trapped instruction does not decode").into());
        }
        Ok(ins.next_ip())
    }

    /// A page fault of a single-stepped instruction.
    fn exec_fault(
        &mut self,
        v: usize,
        frame: &ExceptionFrame,
        regs: &mut Regs,
    ) -> Result<Next, OpError> {
        let (cr2, outcome) = self.page_fault(v, frame)?;
        match outcome {
            FaultOutcome::Fixed | FaultOutcome::Spurious => Ok(Next::Resume),
            FaultOutcome::Propagate(code) => Ok(Next::Done(Err(page_fault(cr2, code.0)))),
            FaultOutcome::Mmio { gpa } => Ok(Next::Done(Err(OpError::Backend(format!(
                "an instruction touched MMIO at {gpa} (no devices)"
            ))))),
            FaultOutcome::Emulate { gpa } => {
                let mut r = self.regs_at(frame, regs).map_err(backend)?;
                let Some(outcome) = self.lock().emulate(v, &mut r, gpa).map_err(backend)? else {
                    // Out of budget: the instruction runs again, faults again and goes on.
                    return Ok(Next::Resume);
                };
                Ok(match outcome {
                    EmulateOutcome::Done(_) => {
                        *regs = r;
                        Next::Done(Ok(()))
                    }
                    // The page is no longer shadowed: the instruction runs natively.
                    EmulateOutcome::Unshadowed => Next::Resume,
                    EmulateOutcome::Fault(EmuFault::PageFault { va, code }) => {
                        Next::Done(Err(page_fault(va, code)))
                    }
                    EmulateOutcome::Fault(EmuFault::GeneralProtection) => {
                        Next::Done(Err(OpError::Fault(Fault::GeneralProtection)))
                    }
                    EmulateOutcome::Mmio { gpa } => Next::Done(Err(OpError::Backend(format!(
                        "an instruction touched MMIO at {gpa} (no devices)"
                    )))),
                })
            }
        }
    }

    /// A privileged operation: the executor's instruction for it runs at CPL1 and #GPs;
    /// the VMM recognises it and carries the operation out.
    fn privileged(
        &mut self,
        v: usize,
        op: Privileged,
        rax: u64,
        ctl: ControlState,
    ) -> Result<(), OpError> {
        let entry = Executor::base(1) + self.executor.privileged_entry(op);
        let regs = kvm_regs {
            rax,
            rip: entry,
            rflags: self.executor_rflags(v, 1),
            ..kvm_regs::default()
        };
        self.load(Self::executor_segments(1), &regs)
            .map_err(backend)?;
        match self.run_once()? {
            RawExit::Exception {
                vector: GENERAL_PROTECTION,
                frame,
                ..
            } if frame.rip == entry => {}
            RawExit::Exception { vector, frame, .. } => {
                return Err(OpError::Backend(format!(
                    "the executor's privileged instruction took exception {vector} at {:#x}",
                    frame.rip
                )));
            }
            RawExit::Io { .. } => {
                return Err(OpError::Backend(
                    "a privileged instruction did not trap at CPL1".into(),
                ));
            }
        }
        self.exits().privileged += 1;
        self.lock().privileged(v, op, rax, ctl)
    }
}

/// One vcpu's runner: it carries out guest operations on its vcpu, calling the machine
/// (under the shadow lock) for every trap. It runs on the backend's thread, or on a thread
/// of its own.
pub(crate) struct Runner<P> {
    v: usize,
    run: VcpuRun,
    m: Arc<Mutex<P>>,
    /// The VM's memory, for the mailboxes and exception frames (no lock needed).
    mem: GuestMemoryMmap<()>,
    hyper: HyperArea,
    executor: Executor,
    /// The segment registers the vcpu holds, when known.
    segments: Option<Segments>,
}

/// A guest operation for a vcpu (what [`GuestOps`] asks, as a value, so that it can be
/// started on a vcpu's thread and waited for later).
#[derive(Debug)]
pub enum VcpuOp {
    Read { va: u64, cpl: u8, len: usize },
    Write { va: u64, cpl: u8, data: Vec<u8> },
    Fetch { va: u64, cpl: u8, len: usize },
    Exec(Regs),
    Privileged(Privileged, u64, ControlState),
}

/// What a runner answers: the bytes loaded or the registers after an instruction, and its
/// exit counts so far.
#[derive(Debug)]
struct Reply {
    result: Result<VcpuAnswer, OpError>,
    exits: ExitCounts,
}

/// What a [`VcpuOp`] ends with.
#[derive(Debug)]
pub enum VcpuAnswer {
    /// A store, a control-register write or an INVLPG completed.
    Done,
    /// The bytes a load or fetch got.
    Bytes(Vec<u8>),
    /// The registers after an executed instruction.
    Regs(Regs),
}

impl<P: Paging> Runner<P> {
    fn new(v: usize, run: VcpuRun, m: Arc<Mutex<P>>) -> Runner<P> {
        let (mem, hyper) = {
            let guard = lock(&m);
            (guard.mem().mmap().clone(), guard.hyper().clone())
        };
        let executor = hyper.executor;
        Runner {
            v,
            run,
            m,
            mem,
            hyper,
            executor,
            segments: None,
        }
    }

    fn lock(&self) -> MutexGuard<'_, P> {
        lock(&self.m)
    }

    fn fd(&self) -> &VcpuFd {
        self.run.fd()
    }

    /// Writes one of this vcpu's own pages of the hypervisor area (its mailboxes, its
    /// exception frames): no other vcpu and not the engine touches them, so no lock.
    fn write_own(&self, gpa: u64, bytes: &[u8]) -> Result<(), OpError> {
        self.mem
            .write_slice(bytes, GuestAddress(gpa))
            .map_err(|e| OpError::Backend(format!("hypervisor area at {gpa:#x}: {e}")))
    }

    /// Reads one of this vcpu's own pages of the hypervisor area.
    fn read_own(&self, gpa: u64, buf: &mut [u8]) -> Result<(), OpError> {
        self.mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|e| OpError::Backend(format!("hypervisor area at {gpa:#x}: {e}")))
    }

    fn exits(&mut self) -> &mut ExitCounts {
        &mut self.run.exits
    }

    /// Carries out one guest operation.
    fn serve(&mut self, cmd: VcpuOp) -> Reply {
        let v = self.v;
        let result = match cmd {
            VcpuOp::Read { va, cpl, len } => {
                let mut buf = vec![0u8; len];
                self.copy(v, va, cpl, Some(&mut buf), &[])
                    .map(|()| VcpuAnswer::Bytes(buf))
            }
            VcpuOp::Write { va, cpl, data } => self
                .copy(v, va, cpl, None, &data)
                .map(|()| VcpuAnswer::Done),
            VcpuOp::Fetch { va, cpl, len } => {
                let mut buf = vec![0u8; len];
                self.fetch_at(v, va, cpl, &mut buf)
                    .map(|()| VcpuAnswer::Bytes(buf))
            }
            VcpuOp::Exec(mut regs) => self.exec_one(v, &mut regs).map(|()| VcpuAnswer::Regs(regs)),
            VcpuOp::Privileged(op, arg, ctl) => {
                self.privileged(v, op, arg, ctl).map(|()| VcpuAnswer::Done)
            }
        };
        Reply {
            result,
            exits: self.run.exits,
        }
    }
}

fn lock<P>(m: &Mutex<P>) -> MutexGuard<'_, P> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A vcpu's runner, on the backend's thread or on its own.
enum Vcpu<P> {
    Here(Box<Runner<P>>),
    Thread {
        to: Option<Sender<VcpuOp>>,
        from: Receiver<Reply>,
        thread: Option<JoinHandle<()>>,
        exits: ExitCounts,
    },
}

impl<P> fmt::Debug for Vcpu<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Vcpu::Here(r) => write!(f, "vcpu {} here", r.v),
            Vcpu::Thread { .. } => f.write_str("vcpu on its own thread"),
        }
    }
}

impl<P> Drop for Vcpu<P> {
    fn drop(&mut self) {
        if let Vcpu::Thread { to, thread, .. } = self {
            // Closing the channel ends the thread's loop.
            drop(to.take());
            if let Some(t) = thread.take() {
                let _ = t.join();
            }
        }
    }
}

/// Guest operations on KVM vcpus, with the paging `P` gives them: every vcpu on the
/// backend's thread, or each on a thread of its own (the machine, the engine in it, behind
/// one lock: the shadow lock).
#[derive(Debug)]
pub(crate) struct Backend<P> {
    m: Arc<Mutex<P>>,
    kicks: Arc<Kicks>,
    vcpus: Vec<Vcpu<P>>,
    ram_frames: u64,
    ops: u64,
}

impl<P: Paging> Backend<P> {
    /// A backend on `m`, whose vcpus are ready to run: on threads of their own if
    /// `threads`.
    pub(crate) fn on(
        mut m: P,
        ram_frames: u64,
        vcpus: usize,
        threads: bool,
    ) -> Result<Backend<P>, KvmError> {
        let runs = (0..vcpus)
            .map(|v| m.take_vcpu(v))
            .collect::<Result<Vec<_>, _>>()?;
        let kicks = m.kicks();
        let m = Arc::new(Mutex::new(m));
        let mut out = Vec::with_capacity(vcpus);
        for (v, run) in runs.into_iter().enumerate() {
            let runner = Runner::new(v, run, Arc::clone(&m));
            if !threads {
                out.push(Vcpu::Here(Box::new(runner)));
                continue;
            }
            let (to, commands) = channel::<VcpuOp>();
            let (replies, from) = channel::<Reply>();
            let thread = std::thread::Builder::new()
                .name(format!("vcpu{v}"))
                .spawn(move || {
                    let mut runner = runner;
                    while let Ok(cmd) = commands.recv() {
                        if replies.send(runner.serve(cmd)).is_err() {
                            break;
                        }
                    }
                })
                .map_err(|e| KvmError::Memory(format!("cannot start a vcpu thread: {e}")))?;
            out.push(Vcpu::Thread {
                to: Some(to),
                from,
                thread: Some(thread),
                exits: ExitCounts::default(),
            });
        }
        Ok(Backend {
            m,
            kicks,
            vcpus: out,
            ram_frames,
            ops: 0,
        })
    }

    /// The machine, locked.
    pub(crate) fn machine(&self) -> MutexGuard<'_, P> {
        lock(&self.m)
    }

    /// Guest operations carried out (image loads not counted).
    pub(crate) fn guest_ops(&self) -> u64 {
        self.ops
    }

    /// VM exits so far, every vcpu's and the machine's.
    pub(crate) fn machine_exits(&self) -> ExitCounts {
        let mut total = ExitCounts::default();
        for vcpu in &self.vcpus {
            let e = match vcpu {
                Vcpu::Here(r) => r.run.exits,
                Vcpu::Thread { exits, .. } => *exits,
            };
            total = total.plus(&e);
        }
        total.tlb_flushes += self.kicks.zaps.load(std::sync::atomic::Ordering::Relaxed);
        total.kicks += self.kicks.signals();
        total
    }

    fn check_vcpu(&self, v: usize) -> Result<(), OpError> {
        if v < self.vcpus.len() {
            Ok(())
        } else {
            Err(OpError::Backend(format!("no vcpu {v}")))
        }
    }

    fn check_access(&self, v: usize, va: u64, len: usize, what: &str) -> Result<(), OpError> {
        self.check_vcpu(v)?;
        let room = 4096 - (va & 0xfff);
        if len as u64 > room || len == 0 {
            return Err(OpError::Backend(format!(
                "a {what} of {len} bytes at {va:#x} is empty or crosses a page boundary"
            )));
        }
        Ok(())
    }

    /// Starts `op` on vcpu `v`, which must run on a thread of its own, without waiting for
    /// it: other vcpus can be driven meanwhile (and run while this one is in `KVM_RUN`).
    pub(crate) fn start(&mut self, v: usize, op: VcpuOp) -> Result<(), OpError> {
        match self.vcpus.get_mut(v) {
            Some(Vcpu::Thread { to, .. }) => {
                if to.as_ref().is_some_and(|t| t.send(op).is_ok()) {
                    self.ops += 1;
                    Ok(())
                } else {
                    Err(OpError::Backend(format!("vcpu {v}'s thread is gone")))
                }
            }
            _ => Err(OpError::Backend(format!(
                "vcpu {v} does not run on a thread of its own"
            ))),
        }
    }

    /// Waits for the operation started on vcpu `v`.
    pub(crate) fn wait(&mut self, v: usize) -> Result<VcpuAnswer, OpError> {
        let reply = match self.vcpus.get_mut(v) {
            Some(Vcpu::Thread { from, exits, .. }) => {
                let reply = from
                    .recv()
                    .map_err(|_| OpError::Backend(format!("vcpu {v}'s thread is gone")))?;
                *exits = reply.exits;
                reply
            }
            _ => {
                return Err(OpError::Backend(format!(
                    "vcpu {v} does not run on a thread of its own"
                )));
            }
        };
        self.machine().after_op().map_err(backend)?;
        reply.result
    }

    /// Has vcpu `v` carry out `cmd`, then the machine's bookkeeping after it.
    fn call(&mut self, v: usize, cmd: VcpuOp) -> Result<VcpuAnswer, OpError> {
        let Some(Vcpu::Here(r)) = self.vcpus.get_mut(v) else {
            self.start(v, cmd)?;
            return self.wait(v);
        };
        let reply = r.serve(cmd);
        self.ops += 1;
        self.machine().after_op().map_err(backend)?;
        reply.result
    }
}

fn done(answer: Result<VcpuAnswer, OpError>) -> Result<(), OpError> {
    answer.map(|_| ())
}

fn unexpected() -> OpError {
    OpError::Backend("a vcpu answered another operation".into())
}

impl<P: Paging> GuestOps for Backend<P> {
    fn vcpus(&self) -> usize {
        self.vcpus.len()
    }

    fn ram_frames(&self) -> u64 {
        self.ram_frames
    }

    fn load_image(&mut self, gpa: u64, data: &[u8]) -> Result<(), OpError> {
        let end = gpa
            .checked_add(data.len() as u64)
            .ok_or_else(|| OpError::Backend(format!("an image at {gpa:#x} wraps around")))?;
        if end > self.ram_frames.saturating_mul(4096) {
            return Err(OpError::Backend(format!(
                "an image at {gpa:#x}..{end:#x} is outside guest RAM ({} frames)",
                self.ram_frames
            )));
        }
        if data.is_empty() {
            return Ok(());
        }
        self.machine()
            .load_image(Gpa::new(gpa), data)
            .map_err(backend)
    }

    fn read(&mut self, vcpu: usize, va: u64, cpl: u8, buf: &mut [u8]) -> Result<(), OpError> {
        self.check_access(vcpu, va, buf.len(), "load")?;
        let len = buf.len();
        match self.call(vcpu, VcpuOp::Read { va, cpl, len })? {
            VcpuAnswer::Bytes(b) if b.len() == len => {
                buf.copy_from_slice(&b);
                Ok(())
            }
            _ => Err(unexpected()),
        }
    }

    fn write(&mut self, vcpu: usize, va: u64, cpl: u8, data: &[u8]) -> Result<(), OpError> {
        self.check_access(vcpu, va, data.len(), "store")?;
        let data = data.to_vec();
        done(self.call(vcpu, VcpuOp::Write { va, cpl, data }))
    }

    fn fetch(&mut self, vcpu: usize, va: u64, cpl: u8, buf: &mut [u8]) -> Result<(), OpError> {
        self.check_access(vcpu, va, buf.len(), "fetch")?;
        let len = buf.len();
        match self.call(vcpu, VcpuOp::Fetch { va, cpl, len })? {
            VcpuAnswer::Bytes(b) if b.len() == len => {
                buf.copy_from_slice(&b);
                Ok(())
            }
            _ => Err(unexpected()),
        }
    }

    fn exec(&mut self, vcpu: usize, regs: &mut Regs) -> Result<(), OpError> {
        self.check_vcpu(vcpu)?;
        match self.call(vcpu, VcpuOp::Exec(*regs))? {
            VcpuAnswer::Regs(r) => {
                *regs = r;
                Ok(())
            }
            _ => Err(unexpected()),
        }
    }

    fn set_control(&mut self, vcpu: usize, ctl: ControlState) -> Result<(), OpError> {
        self.check_vcpu(vcpu)?;
        done(self.call(vcpu, VcpuOp::Privileged(Privileged::Control, ctl.cr0, ctl)))
    }

    fn set_cr3(&mut self, vcpu: usize, cr3: u64) -> Result<(), OpError> {
        self.check_vcpu(vcpu)?;
        let ctl = ControlState {
            cr3,
            ..self.machine().guest_control(vcpu)
        };
        done(self.call(vcpu, VcpuOp::Privileged(Privileged::Cr3, cr3, ctl)))
    }

    fn invlpg(&mut self, vcpu: usize, va: u64) -> Result<(), OpError> {
        self.check_vcpu(vcpu)?;
        let ctl = self.machine().guest_control(vcpu);
        done(self.call(vcpu, VcpuOp::Privileged(Privileged::Invlpg, va, ctl)))
    }
}

/// Implements [`GuestOps`] and the common inherent methods of a public backend that wraps
/// a [`Backend`].
macro_rules! public_backend {
    ($name:ident) => {
        impl $name {
            /// VM exits so far, by kind.
            pub fn exits(&self) -> $crate::exits::ExitCounts {
                self.0.machine_exits()
            }

            /// Guest operations carried out (image loads not counted).
            pub fn guest_ops(&self) -> u64 {
                self.0.guest_ops()
            }

            /// Starts `op` on vcpu `v` (which runs on a thread of its own) without waiting
            /// for it, so that several vcpus run at once; [`Self::wait`] gets its answer.
            pub fn start(&mut self, v: usize, op: $crate::backend::VcpuOp) -> Result<(), OpError> {
                self.0.start(v, op)
            }

            /// Waits for the operation started on vcpu `v`.
            pub fn wait(&mut self, v: usize) -> Result<$crate::backend::VcpuAnswer, OpError> {
                self.0.wait(v)
            }

            /// Reads guest-physical memory (to compare a run's final memory with another
            /// backend's).
            pub fn read_guest_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), KvmError> {
                $crate::backend::Paging::read_guest_phys(
                    &*self.0.machine(),
                    shadow2::Gpa::new(gpa),
                    buf,
                )
            }
        }

        impl shadow2_guest::GuestOps for $name {
            fn vcpus(&self) -> usize {
                self.0.vcpus()
            }
            fn ram_frames(&self) -> u64 {
                self.0.ram_frames()
            }
            fn load_image(&mut self, gpa: u64, data: &[u8]) -> Result<(), OpError> {
                self.0.load_image(gpa, data)
            }
            fn read(&mut self, v: usize, va: u64, cpl: u8, buf: &mut [u8]) -> Result<(), OpError> {
                self.0.read(v, va, cpl, buf)
            }
            fn write(&mut self, v: usize, va: u64, cpl: u8, data: &[u8]) -> Result<(), OpError> {
                self.0.write(v, va, cpl, data)
            }
            fn fetch(&mut self, v: usize, va: u64, cpl: u8, buf: &mut [u8]) -> Result<(), OpError> {
                self.0.fetch(v, va, cpl, buf)
            }
            fn exec(&mut self, v: usize, regs: &mut Regs) -> Result<(), OpError> {
                self.0.exec(v, regs)
            }
            fn set_control(&mut self, v: usize, ctl: ControlState) -> Result<(), OpError> {
                self.0.set_control(v, ctl)
            }
            fn set_cr3(&mut self, v: usize, cr3: u64) -> Result<(), OpError> {
                self.0.set_cr3(v, cr3)
            }
            fn invlpg(&mut self, v: usize, va: u64) -> Result<(), OpError> {
                self.0.invlpg(v, va)
            }
        }
    };
}
pub(crate) use public_backend;

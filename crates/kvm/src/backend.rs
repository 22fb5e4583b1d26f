//! [`KvmBackend`]: the guest-operations interface ([`GuestOps`]) carried out by real x86
//! vcpus on the engine's shadows. Each operation runs as real instructions at its privilege
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

use kvm_bindings::kvm_regs;
use shadow2::domain::{EmulateOutcome, EngineError, GuestFault};
use shadow2::emulate::{CodeMode, EmuFault, Regs};
use shadow2::multi::FaultOutcome;
use shadow2::paging::bits::{self, cr};
use shadow2::paging::{ControlState, PfErrorCode};
use shadow2::remove::{LinearMapHint, TeardownHints};
use shadow2::{Gfn, Gpa, Gva, Mfn};
use shadow2_guest::{Event, Fault, GuestOps, OpError};

use crate::KvmError;
use crate::executor::{Executor, Privileged};
use crate::exits::{ExceptionFrame, ExitCounts};
use crate::hyper;
use crate::probe::Probe;
use crate::sregs;
use crate::vm::{KvmConfig, KvmMachine, RawExit};

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
/// Frames of VM memory beyond RAM, pool and p2m (the hypervisor area, slack).
const SLACK_FRAMES: u64 = 256;

/// How to build a [`KvmBackend`].
#[derive(Clone, Debug)]
pub struct KvmBackendConfig {
    /// Guest RAM: guest frames `0..ram_frames`.
    pub ram_frames: u64,
    /// Vcpus.
    pub vcpus: usize,
    /// The shadow pool's size in pages.
    pub pool_pages: usize,
    /// The guest OS's linear maps, handed to the engine.
    pub linear_maps: Vec<LinearMapHint>,
    /// The guest OS's teardown hints.
    pub teardown: TeardownHints,
}

/// The segment registers a vcpu holds: the hardware CPL (1 or 3) and whether CS is 64-bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Segments {
    cpl: u8,
    long: bool,
    fs_base: u64,
    gs_base: u64,
}

/// Guest operations on KVM vcpus running on the engine's shadows.
#[derive(Debug)]
pub struct KvmBackend {
    m: KvmMachine,
    ram_frames: u64,
    executor: Executor,
    segments: Vec<Option<Segments>>,
    ops: u64,
}

/// The hardware privilege level of a guest operation at `cpl`: the guest kernel runs at
/// CPL1 (supervisor, as CPL0 is, for paging), user code at CPL3.
fn hardware_cpl(cpl: u8) -> u8 {
    if cpl == 3 { 3 } else { 1 }
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

impl KvmBackend {
    /// A VM for `cfg` on this host: RAM given to the guest, every vcpu starting with paging
    /// disabled on the p2m, as the simulator's do.
    pub fn new(probe: &Probe, cfg: &KvmBackendConfig) -> Result<KvmBackend, KvmError> {
        let pool = cfg.pool_pages as u64;
        let p2m = cfg.ram_frames.div_ceil(512) + cfg.ram_frames.div_ceil(512 * 512) + 16;
        let frames = cfg.ram_frames + pool + pool / 2 + p2m + SLACK_FRAMES;
        let mut m = KvmMachine::with_config(
            probe,
            &KvmConfig {
                frames,
                pool_pages: cfg.pool_pages,
                vcpus: cfg.vcpus,
                linear_maps: cfg.linear_maps.clone(),
                teardown: cfg.teardown,
            },
        )?;
        m.add_ram(Gfn::new(0), cfg.ram_frames)?;
        for v in 0..cfg.vcpus {
            let flush = m.domain_mut().update_paging_modes(v)?;
            m.settle(flush)?;
            m.init_vcpu(v)?;
        }
        let executor = m.hyper().executor;
        Ok(KvmBackend {
            m,
            ram_frames: cfg.ram_frames,
            executor,
            segments: vec![None; cfg.vcpus],
            ops: 0,
        })
    }

    /// The machine (its domain, exits and fault log).
    pub fn machine(&self) -> &KvmMachine {
        &self.m
    }

    /// VM exits so far, by kind.
    pub fn exits(&self) -> ExitCounts {
        self.m.exits()
    }

    /// Guest operations carried out (image loads not counted).
    pub fn guest_ops(&self) -> u64 {
        self.ops
    }

    /// Reads guest-physical memory (to compare a run's final memory with another
    /// backend's).
    pub fn read_guest_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), KvmError> {
        self.m.read_guest(Gpa::new(gpa), buf)
    }

    fn check_vcpu(&self, v: usize) -> Result<(), OpError> {
        if v < self.segments.len() {
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

    /// Loads the segment registers for `seg` (only when they change) and then `regs`,
    /// after completing the vcpu's pending I/O exit.
    fn load(&mut self, v: usize, seg: Segments, regs: &kvm_regs) -> Result<(), KvmError> {
        self.m.complete_io(v)?;
        if self.m.in_stub(v) || self.segments.get(v).copied().flatten() != Some(seg) {
            let vcpu = self.m.vcpu(v)?;
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
            if let Some(slot) = self.segments.get_mut(v) {
                *slot = Some(seg);
            }
        }
        self.m.vcpu(v)?.set_regs(regs)?;
        Ok(())
    }

    /// RFLAGS for the executor at `cpl`: the guest's AC (which decides SMAP for supervisor
    /// accesses).
    fn executor_rflags(&self, v: usize, cpl: u8) -> u64 {
        let guest = self.m.domain().vcpu(v).map_or(0, |c| c.control().rflags);
        if cpl < 3 {
            RFLAGS_FIXED | (guest & cr::RFLAGS_AC)
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

    /// A page fault of vcpu `v` at the frame: the engine's answer, counted. `Emulate` and
    /// `Mmio` are left to the caller.
    fn page_fault(
        &mut self,
        v: usize,
        frame: &ExceptionFrame,
    ) -> Result<(u64, FaultOutcome), KvmError> {
        let cr2 = self.m.vcpu(v)?.get_sregs()?.cr2;
        let code = PfErrorCode(frame.error_code as u32);
        let (outcome, flush) = match self.m.engine(|d| d.page_fault(v, Gva::new(cr2), code)) {
            // Out of budget (a bounded search goes on): the guest retries the access.
            Err(KvmError::Engine(EngineError::Preempted)) => {
                (FaultOutcome::Spurious, { shadow2::Flush::NONE })
            }
            other => other?,
        };
        self.m.settle(flush)?;
        let exits = self.m.exits_mut();
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
        self.m.exits_mut().other_exceptions += 1;
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
        let buffer_gpa = self.m.hyper().buffer_gpa(hw);
        let buffer_va = if hw == 3 {
            hyper::USER_MAILBOX_VA
        } else {
            hyper::MAILBOX_VA
        };
        let len = load.as_ref().map_or(data.len(), |b| b.len());
        if load.is_none() {
            self.m
                .domain()
                .host()
                .write_bytes(buffer_gpa, data)
                .map_err(|e| OpError::Backend(format!("mailbox: {e:?}")))?;
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
        self.load(v, Self::executor_segments(hw), &regs)
            .map_err(backend)?;
        let copy_rip = regs.rip;
        for _ in 0..MAX_TRAPS_PER_OP {
            match self.m.run_raw(v).map_err(backend)? {
                RawExit::Io { .. } => {
                    self.m.exits_mut().guest_io += 1;
                    if let Some(buf) = load {
                        self.m
                            .domain()
                            .host()
                            .read_bytes(buffer_gpa, buf)
                            .map_err(|e| OpError::Backend(format!("mailbox: {e:?}")))?;
                    }
                    return Ok(());
                }
                RawExit::Exception {
                    vector: PAGE_FAULT,
                    frame,
                    ..
                } => {
                    let (cr2, outcome) = self.page_fault(v, &frame).map_err(backend)?;
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
                            let left = self.m.vcpu(v).map_err(backend)?.get_regs();
                            let left = left.map_err(|e| backend(e.into()))?.rcx as usize;
                            let done = len.saturating_sub(left).min(data.len());
                            return self.store_through_engine(gpa, &data[done..]);
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

    /// The rest of a store the engine had emulated: written through the engine, which
    /// validates the shadows of the page table it lands in.
    fn store_through_engine(&mut self, gpa: Gpa, data: &[u8]) -> Result<(), OpError> {
        let flush = self
            .m
            .engine(|d| d.write_guest_phys(gpa, data))
            .map_err(backend)?;
        self.m.settle(flush).map_err(backend)
    }

    /// Where the hardware would fetch `va` from through vcpu `v`'s shadows now (a walk of
    /// the shadow tables, no side effects), if they map it.
    fn shadow_translate(&self, v: usize, va: u64) -> Option<u64> {
        let d = self.m.domain();
        let hw = d.hardware_control(v)?;
        let mem = d.host();
        let mut table = hw.cr3 & bits::ADDR_MASK_8;
        for level in (1..=4u32).rev() {
            let index = (va >> (12 + 9 * (level - 1))) & 511;
            let mut e = [0u8; 8];
            mem.read_bytes(table + index * 8, &mut e).ok()?;
            let e = u64::from_le_bytes(e);
            if e & bits::P == 0 {
                return None;
            }
            let addr = e & bits::ADDR_MASK_8;
            let width = d.config().host_maxphyaddr;
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
    /// through the shadows, with every trap that takes; the byte it finds is a HLT the
    /// VMM puts there for the run (and takes away before anything else looks at the page),
    /// so nothing of the guest's runs. The bytes returned are the page's own.
    fn fetch_at(&mut self, v: usize, va: u64, cpl: u8, buf: &mut [u8]) -> Result<(), OpError> {
        let hw = hardware_cpl(cpl);
        for _ in 0..MAX_TRAPS_PER_OP {
            let regs = kvm_regs {
                rip: va,
                rflags: self.executor_rflags(v, hw),
                ..kvm_regs::default()
            };
            self.load(v, Self::executor_segments(hw), &regs)
                .map_err(backend)?;
            let target = self
                .shadow_translate(v, va)
                .filter(|&maddr| self.patchable(maddr));
            let saved = match target {
                Some(maddr) => Some((maddr, self.patch(maddr, &[HLT]).map_err(backend)?)),
                None => None,
            };
            let exit = self.m.run_raw(v);
            if let Some((maddr, old)) = saved {
                self.patch(maddr, &[old]).map_err(backend)?;
            }
            match exit.map_err(backend)? {
                RawExit::Exception {
                    vector: GENERAL_PROTECTION,
                    frame,
                    ..
                } if frame.rip == va && saved.is_some() => {
                    self.m.exits_mut().fetches += 1;
                    let maddr = saved.map_or(0, |(m, _)| m);
                    return self
                        .m
                        .domain()
                        .host()
                        .read_bytes(maddr, buf)
                        .map_err(|e| OpError::Backend(format!("fetch: {e:?}")));
                }
                RawExit::Exception {
                    vector: PAGE_FAULT,
                    frame,
                    ..
                } => {
                    let (cr2, outcome) = self.page_fault(v, &frame).map_err(backend)?;
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

    /// Whether the VMM may put a byte at machine address `maddr`: guest RAM, never the
    /// hypervisor's or the shadow pool's frames.
    fn patchable(&self, maddr: u64) -> bool {
        let mfn = Mfn::new(maddr >> 12);
        let d = self.m.domain();
        !d.hypervisor_frames().any(|f| f == mfn) && !d.pool().contains(mfn)
    }

    /// Writes `bytes` at `maddr`, returning the first byte that was there.
    fn patch(&mut self, maddr: u64, bytes: &[u8]) -> Result<u8, KvmError> {
        let mem = self.m.domain().host();
        let mut old = [0u8; 1];
        mem.read_bytes(maddr, &mut old)
            .map_err(|e| KvmError::Memory(format!("{e:?}")))?;
        mem.write_bytes(maddr, bytes)
            .map_err(|e| KvmError::Memory(format!("{e:?}")))?;
        Ok(old[0])
    }

    /// The guest's registers as the hardware has them at an exception frame (RSP, RIP and
    /// RFLAGS from the frame, without the single-step flag), in the guest's mode.
    fn regs_at(&self, v: usize, frame: &ExceptionFrame, like: &Regs) -> Result<Regs, KvmError> {
        let r = self.m.vcpu(v)?.get_regs()?;
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
        self.load(v, seg, &hwregs).map_err(backend)?;
        for _ in 0..MAX_TRAPS_PER_OP {
            let (vector, frame) = match self.m.run_raw(v).map_err(backend)? {
                RawExit::Io { port, .. } => {
                    return Err(OpError::Backend(format!(
                        "the instruction at {:#x} did I/O to port {port:#x}",
                        regs.rip
                    )));
                }
                RawExit::Exception { vector, frame, .. } => (vector, frame),
            };
            match vector {
                DEBUG => {
                    self.m.exits_mut().single_steps += 1;
                    *regs = self.regs_at(v, &frame, regs).map_err(backend)?;
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

    /// A page fault of a single-stepped instruction.
    fn exec_fault(
        &mut self,
        v: usize,
        frame: &ExceptionFrame,
        regs: &mut Regs,
    ) -> Result<Next, OpError> {
        let (cr2, outcome) = self.page_fault(v, frame).map_err(backend)?;
        match outcome {
            FaultOutcome::Fixed | FaultOutcome::Spurious => Ok(Next::Resume),
            FaultOutcome::Propagate(code) => Ok(Next::Done(Err(page_fault(cr2, code.0)))),
            FaultOutcome::Mmio { gpa } => Ok(Next::Done(Err(OpError::Backend(format!(
                "an instruction touched MMIO at {gpa} (no devices)"
            ))))),
            FaultOutcome::Emulate { gpa } => {
                let mut r = self.regs_at(v, frame, regs).map_err(backend)?;
                let (outcome, flush) = match self.m.engine(|d| d.emulate(v, &mut r, gpa)) {
                    // Out of budget: the instruction runs again, faults again and goes on.
                    Err(KvmError::Engine(EngineError::Preempted)) => return Ok(Next::Resume),
                    other => other.map_err(backend)?,
                };
                self.m.settle(flush).map_err(backend)?;
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
    /// the VMM recognises it and has the engine carry the operation out.
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
        self.load(v, Self::executor_segments(1), &regs)
            .map_err(backend)?;
        match self.m.run_raw(v).map_err(backend)? {
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
        self.m.exits_mut().privileged += 1;
        match op {
            Privileged::Control => {
                self.engine_op(|d| d.set_control(v, ctl).map(|()| shadow2::Flush::NONE))?;
                self.control_op(|d| d.update_paging_modes(v))
            }
            Privileged::Cr3 => {
                self.engine_op(|d| d.set_control(v, ctl).map(|()| shadow2::Flush::NONE))?;
                self.control_op(|d| d.update_cr3(v))
            }
            Privileged::Invlpg => {
                let needed = self
                    .m
                    .engine(|d| d.invlpg(v, Gva::new(rax)))
                    .map_err(backend)?;
                if needed {
                    // KVM keeps its own copy of the shadows; only a zap drops it.
                    self.m
                        .settle(shadow2::Flush::of(shadow2::VcpuSet::one(v)))
                        .map_err(backend)?;
                }
                Ok(())
            }
        }
    }

    fn engine_op(
        &mut self,
        op: impl FnOnce(&mut shadow2::Domain<crate::KvmMemory>) -> Result<shadow2::Flush, EngineError>,
    ) -> Result<(), OpError> {
        let flush = self.m.engine(op).map_err(backend)?;
        self.m.settle(flush).map_err(backend)
    }

    /// A control-register write the engine carries out, called again while it answers
    /// `Preempted`; a refused one is the guest's #GP.
    fn control_op(
        &mut self,
        mut op: impl FnMut(
            &mut shadow2::Domain<crate::KvmMemory>,
        ) -> Result<shadow2::Flush, EngineError>,
    ) -> Result<(), OpError> {
        for _ in 0..MAX_TRAPS_PER_OP {
            match self.m.engine(&mut op) {
                Ok(flush) => return self.m.settle(flush).map_err(backend),
                Err(KvmError::Engine(EngineError::Preempted)) => {
                    self.m.exits_mut().pf_spurious += 1;
                }
                Err(KvmError::Engine(EngineError::Guest(GuestFault::GeneralProtection))) => {
                    return Err(OpError::Fault(Fault::GeneralProtection));
                }
                Err(e) => return Err(backend(e)),
            }
        }
        Err(OpError::Backend(
            "a control-register write made no progress".into(),
        ))
    }

    fn guest_control(&self, v: usize) -> ControlState {
        self.m
            .domain()
            .vcpu(v)
            .map(|c| *c.control())
            .unwrap_or_default()
    }
}

impl GuestOps for KvmBackend {
    fn vcpus(&self) -> usize {
        self.segments.len()
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
        self.m.write_guest(Gpa::new(gpa), data).map_err(backend)
    }

    fn read(&mut self, vcpu: usize, va: u64, cpl: u8, buf: &mut [u8]) -> Result<(), OpError> {
        self.check_access(vcpu, va, buf.len(), "load")?;
        self.ops += 1;
        self.copy(vcpu, va, cpl, Some(buf), &[])
    }

    fn write(&mut self, vcpu: usize, va: u64, cpl: u8, data: &[u8]) -> Result<(), OpError> {
        self.check_access(vcpu, va, data.len(), "store")?;
        self.ops += 1;
        self.copy(vcpu, va, cpl, None, data)
    }

    fn fetch(&mut self, vcpu: usize, va: u64, cpl: u8, buf: &mut [u8]) -> Result<(), OpError> {
        self.check_access(vcpu, va, buf.len(), "fetch")?;
        self.ops += 1;
        self.fetch_at(vcpu, va, cpl, buf)
    }

    fn exec(&mut self, vcpu: usize, regs: &mut Regs) -> Result<(), OpError> {
        self.check_vcpu(vcpu)?;
        self.ops += 1;
        self.exec_one(vcpu, regs)
    }

    fn set_control(&mut self, vcpu: usize, ctl: ControlState) -> Result<(), OpError> {
        self.check_vcpu(vcpu)?;
        self.ops += 1;
        self.privileged(vcpu, Privileged::Control, ctl.cr0 & cr::CR0_PG, ctl)
    }

    fn set_cr3(&mut self, vcpu: usize, cr3: u64) -> Result<(), OpError> {
        self.check_vcpu(vcpu)?;
        self.ops += 1;
        let ctl = ControlState {
            cr3,
            ..self.guest_control(vcpu)
        };
        self.privileged(vcpu, Privileged::Cr3, cr3, ctl)
    }

    fn invlpg(&mut self, vcpu: usize, va: u64) -> Result<(), OpError> {
        self.check_vcpu(vcpu)?;
        self.ops += 1;
        let ctl = self.guest_control(vcpu);
        self.privileged(vcpu, Privileged::Invlpg, va, ctl)
    }

    fn event(&mut self, _event: Event) {}
}

//! `Vm`: a KVM VM whose memory is one [`KvmMemory`] mapping, its vcpus, and one `KVM_RUN`
//! turned into what the VMM acts on: an `out` of the guest, or an exception a ring-0 stub
//! of the hypervisor area reported, with its frame. Both backends (the engine's shadows and
//! native paging) run their vcpus through it.

use std::time::Duration;

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use shadow2::EngineError;
use shadow2::paging::ControlState;
use shadow2::paging::bits::cr;
use vm_memory::{GuestAddress, GuestMemory};

use crate::KvmError;
use crate::exits::{ExceptionFrame, ExitCounts};
use crate::hyper::{self, HyperArea};
use crate::memory::KvmMemory;
use crate::sregs;
use crate::watchdog::Watchdog;

/// Longest time one `KVM_RUN` may take before the guest is stopped.
const RUN_DEADLINE: Duration = Duration::from_secs(20);

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

/// A VM and its vcpus. Its owner must keep the [`KvmMemory`] it was created on mapped for
/// as long as the `Vm` lives (declare the `Vm` before the memory, so it is dropped first).
#[derive(Debug)]
pub(crate) struct Vm {
    vcpus: Vec<VcpuFd>,
    region: kvm_userspace_memory_region,
    vm: VmFd,
    _kvm: Kvm,
    /// Vcpus whose last exit was an I/O exit KVM has not completed yet.
    io_pending: Vec<bool>,
    /// Vcpus that exited from a ring-0 stub (their segment registers are the stub's).
    in_stub: Vec<bool>,
    pub(crate) exits: ExitCounts,
}

pub(crate) fn memory_error(e: impl std::fmt::Debug) -> KvmError {
    KvmError::Memory(format!("{e:?}"))
}

impl Vm {
    /// A VM running on all of `mem`, with `vcpus` vcpus that see the host's CPUID (so the
    /// MAXPHYADDR the guest sees is the host's).
    pub(crate) fn new(mem: &KvmMemory, vcpus: usize) -> Result<Vm, KvmError> {
        let host_addr = mem
            .mmap()
            .get_host_address(GuestAddress(0))
            .map_err(memory_error)?;
        let kvm = Kvm::new()
            .map_err(|e| KvmError::Unavailable(crate::Unavailable::NoDevice(e.to_string())))?;
        let vm = kvm.create_vm()?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: mem.frames() * 4096,
            userspace_addr: host_addr as u64,
        };
        // SAFETY: the region is the whole vm-memory mapping, which the owner keeps mapped
        // for as long as this VM lives (see the type's docs); nothing else aliases it as
        // Rust references (every access goes through vm-memory's volatile copies).
        unsafe { vm.set_user_memory_region(region)? };
        let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
        let mut fds = Vec::with_capacity(vcpus);
        for id in 0..vcpus {
            let vcpu = vm.create_vcpu(id as u64)?;
            vcpu.set_cpuid2(&cpuid)?;
            fds.push(vcpu);
        }
        Ok(Vm {
            io_pending: vec![false; fds.len()],
            in_stub: vec![false; fds.len()],
            vcpus: fds,
            region,
            vm,
            _kvm: kvm,
            exits: ExitCounts::default(),
        })
    }

    /// The number of vcpus.
    pub(crate) fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    /// Vcpu `v`.
    pub(crate) fn vcpu(&self, v: usize) -> Result<&VcpuFd, KvmError> {
        self.vcpus
            .get(v)
            .ok_or(KvmError::Engine(EngineError::BadArgument("no such vcpu")))
    }

    /// Drops every translation KVM caches for every vcpu. On a shadow-MMU KVM (PVM here)
    /// KVM keeps its own shadows of the tables the hardware runs on, write-protected against
    /// the guest but blind to this process's writes, and neither a CR3 reload nor a CR4
    /// change through `KVM_SET_SREGS` resyncs them (measured: a zapped writable entry stays
    /// usable). Deleting the memory slot and adding it back zaps all of them.
    pub(crate) fn zap(&mut self) -> Result<(), KvmError> {
        let mut gone = self.region;
        gone.memory_size = 0;
        // SAFETY: deleting the slot and adding back the same mapping (see `new`).
        unsafe {
            self.vm.set_user_memory_region(gone)?;
            self.vm.set_user_memory_region(self.region)?;
        }
        self.exits.tlb_flushes += 1;
        Ok(())
    }

    /// Loads vcpu `v`'s paging registers with `hw` (long mode always: the hardware pages in
    /// 4 levels here), which also flushes its TLB as a CR3 load does.
    pub(crate) fn load_paging(&mut self, v: usize, hw: &ControlState) -> Result<(), KvmError> {
        let vcpu = self.vcpu(v)?;
        let mut s = vcpu.get_sregs()?;
        apply_paging(&mut s, hw);
        vcpu.set_sregs(&s)?;
        self.exits.cr3_reloads += 1;
        Ok(())
    }

    /// Sets vcpu `v`'s descriptor tables and segments (ring 1, 64-bit) and, if given, its
    /// paging registers.
    pub(crate) fn init_vcpu(
        &mut self,
        v: usize,
        hw: Option<&ControlState>,
    ) -> Result<(), KvmError> {
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
            apply_paging(&mut s, hw);
        }
        vcpu.set_sregs(&s)?;
        Ok(())
    }

    /// Runs vcpu `v` until its next exit: an `out` of the guest to its report port, or an
    /// exception a stub reported. A death (an exit of another kind, an exception in ring
    /// 0, an `out` to a port the guest may not use) or the watchdog is an error.
    pub(crate) fn run_raw(
        &mut self,
        mem: &KvmMemory,
        hyper: &HyperArea,
        v: usize,
    ) -> Result<RawExit, KvmError> {
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
        let frame_gpa = frame_gpa(hyper, regs.rsp, regs.rip)?;
        let mut bytes = [0u8; ExceptionFrame::BYTES];
        mem.read_bytes(frame_gpa, &mut bytes)
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
}

/// Where on the ring-0 stacks the exception frame is (the stub's RSP).
fn frame_gpa(hyper: &HyperArea, rsp: u64, rip: u64) -> Result<u64, KvmError> {
    let last = rsp + ExceptionFrame::BYTES as u64 - 1;
    match (hyper.writable_gpa(rsp), hyper.writable_gpa(last)) {
        (Some(gpa), Some(end)) if end == gpa + ExceptionFrame::BYTES as u64 - 1 => Ok(gpa),
        _ => Err(KvmError::Died {
            reason: format!("exception frame at {rsp:#x}, outside the ring-0 stacks"),
            rip,
        }),
    }
}

/// The paging registers `hw` in the hardware's long mode.
fn apply_paging(s: &mut kvm_bindings::kvm_sregs, hw: &ControlState) {
    s.cr0 = hw.cr0 | sregs::CR0_FIXED;
    s.cr3 = hw.cr3;
    s.cr4 = hw.cr4 | cr::CR4_PAE;
    s.efer = hw.efer | cr::EFER_LME | cr::EFER_LMA;
}

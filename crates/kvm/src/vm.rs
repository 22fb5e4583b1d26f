//! `Vm`: a KVM VM whose memory is one [`KvmMemory`] mapping, its vcpus, and one `KVM_RUN`
//! turned into what the VMM acts on: an `out` of the guest, or an exception a ring-0 stub
//! of the hypervisor area reported, with its frame. Both backends (the engine's shadows and
//! native paging) run their vcpus through it.

use std::time::Duration;

use std::sync::Arc;

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use shadow2::EngineError;
use shadow2::paging::ControlState;
use shadow2::paging::bits::cr;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

use crate::KvmError;
use crate::exits::{ExceptionFrame, ExitCounts};
use crate::hyper::{self, HyperArea};
use crate::kicks::Kicks;
use crate::memory::KvmMemory;
use crate::sregs;
use crate::watchdog::Watchdog;

/// Longest time one `KVM_RUN` may take before the guest is stopped, unless the owner sets
/// another ([`VcpuRun::set_deadline`]).
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

/// A VM, its memory slot, and its vcpus before they are handed to the threads that run
/// them ([`VcpuRun`]). Its owner must keep the [`KvmMemory`] it was created on mapped for as
/// long as the VM and its vcpus live (declare them before the memory, so they are dropped
/// first).
#[derive(Debug)]
pub(crate) struct Vm {
    vcpus: Vec<Option<VcpuRun>>,
    region: kvm_userspace_memory_region,
    vm: VmFd,
    _kvm: Kvm,
    kicks: Arc<Kicks>,
}

/// One vcpu, run by one thread at a time: its fd, what its last exit left pending, its
/// exits, and its watchdog.
#[derive(Debug)]
pub(crate) struct VcpuRun {
    fd: VcpuFd,
    v: usize,
    /// Its last exit was an I/O exit KVM has not completed yet.
    io_pending: bool,
    /// It exited from a ring-0 stub (its segment registers are the stub's).
    in_stub: bool,
    pub(crate) exits: ExitCounts,
    watchdog: Watchdog,
    deadline: Duration,
    kicks: Arc<Kicks>,
}

pub(crate) fn memory_error(e: impl std::fmt::Debug) -> KvmError {
    KvmError::Memory(format!("{e:?}"))
}

fn no_vcpu() -> KvmError {
    KvmError::Engine(EngineError::BadArgument("no such vcpu"))
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
        let kicks = Arc::new(Kicks::new(vcpus));
        let mut runs = Vec::with_capacity(vcpus);
        for id in 0..vcpus {
            let fd = vm.create_vcpu(id as u64)?;
            fd.set_cpuid2(&cpuid)?;
            runs.push(Some(VcpuRun {
                fd,
                v: id,
                io_pending: false,
                in_stub: false,
                exits: ExitCounts::default(),
                watchdog: Watchdog::new(),
                deadline: RUN_DEADLINE,
                kicks: Arc::clone(&kicks),
            }));
        }
        Ok(Vm {
            vcpus: runs,
            region,
            vm,
            _kvm: kvm,
            kicks,
        })
    }

    /// The kick and zap counters, shared with whoever reads them without the machine.
    pub(crate) fn kicks(&self) -> Arc<Kicks> {
        Arc::clone(&self.kicks)
    }

    /// The number of vcpus.
    pub(crate) fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    /// Vcpu `v`, while the VM still holds it.
    pub(crate) fn vcpu(&mut self, v: usize) -> Result<&mut VcpuRun, KvmError> {
        self.vcpus
            .get_mut(v)
            .and_then(Option::as_mut)
            .ok_or_else(no_vcpu)
    }

    /// Hands vcpu `v` to whoever runs it from now on.
    pub(crate) fn take_vcpu(&mut self, v: usize) -> Result<VcpuRun, KvmError> {
        self.vcpus
            .get_mut(v)
            .and_then(Option::take)
            .ok_or_else(no_vcpu)
    }

    /// Drops every translation KVM caches for every vcpu. On a shadow-MMU KVM (PVM here)
    /// KVM keeps its own shadows of the tables the hardware runs on, write-protected against
    /// the guest but blind to this process's writes, and neither a CR3 reload nor a CR4
    /// change through `KVM_SET_SREGS` resyncs them (measured: a zapped writable entry stays
    /// usable). Deleting the memory slot and adding it back zaps all of them, with every
    /// vcpu held out of `KVM_RUN` meanwhile.
    pub(crate) fn zap(&mut self) -> Result<(), KvmError> {
        let mut gone = self.region;
        gone.memory_size = 0;
        let (vm, region) = (&self.vm, self.region);
        // No vcpu may run while the VM has no memory.
        let (result, _) = self.kicks.with_all_out(|| {
            // SAFETY: deleting the slot and adding back the same mapping (see `new`).
            unsafe {
                vm.set_user_memory_region(gone)?;
                vm.set_user_memory_region(region)
            }
        });
        result?;
        self.kicks
            .zaps
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Has vcpu `v` load `hw` before it runs again (kicking it out of `KVM_RUN` if it is in
    /// there on another thread, and waiting until it is out).
    pub(crate) fn post_paging(&mut self, v: usize, hw: ControlState) {
        self.kicks.post(v, hw);
    }
}

impl VcpuRun {
    /// The fd, for register access.
    pub(crate) fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Sets the longest time one `KVM_RUN` may take.
    pub(crate) fn set_deadline(&mut self, deadline: Duration) {
        self.deadline = deadline;
    }

    /// Loads its paging registers with `hw` (long mode always: the hardware pages in 4
    /// levels here), which also flushes its TLB as a CR3 load does.
    fn load_paging(&mut self, hw: &ControlState) -> Result<(), KvmError> {
        let mut s = self.fd.get_sregs()?;
        apply_paging(&mut s, hw);
        self.fd.set_sregs(&s)?;
        self.exits.cr3_reloads += 1;
        Ok(())
    }

    /// Sets its descriptor tables and segments (ring 1, 64-bit) and, if given, its paging
    /// registers.
    pub(crate) fn init(&mut self, hw: Option<&ControlState>) -> Result<(), KvmError> {
        let mut s = self.fd.get_sregs()?;
        s.cs = sregs::flat(hyper::RING1_CS, 1, true, true);
        s.ss = sregs::flat(hyper::RING1_DS, 1, false, false);
        s.ds = s.ss;
        s.es = s.ss;
        s.fs = s.ss;
        s.gs = s.ss;
        s.tr = sregs::tss(
            hyper::tss_sel(self.v),
            hyper::tss_va(self.v),
            hyper::TSS_LIMIT,
        );
        s.ldt = sregs::no_ldt();
        s.gdt.base = hyper::GDT_VA;
        s.gdt.limit = hyper::GDT_LIMIT;
        s.idt.base = hyper::IDT_VA;
        s.idt.limit = u16::from(hyper::VECTORS) * 16 - 1;
        if let Some(hw) = hw {
            apply_paging(&mut s, hw);
        }
        self.fd.set_sregs(&s)?;
        Ok(())
    }

    /// Runs until its next exit: an `out` of the guest to its report port, or an exception
    /// a stub reported (its frame read from `mem`). Paging posted to it is loaded first,
    /// and again after each kick. A death (an exit of another kind, an exception in ring
    /// 0, an `out` to a port the guest may not use) or the watchdog is an error.
    pub(crate) fn run_raw(
        &mut self,
        mem: &GuestMemoryMmap<()>,
        hyper: &HyperArea,
    ) -> Result<RawExit, KvmError> {
        let v = self.v;
        let (port, value) = loop {
            let posted = self.kicks.enter(v);
            if let Some(hw) = posted
                && let Err(e) = self.load_paging(&hw)
            {
                self.kicks.leave(v);
                return Err(e);
            }
            let _deadline = self.watchdog.arm(self.deadline);
            let exit = match self.fd.run() {
                Ok(VcpuExit::IoOut(port, data)) => {
                    let mut value = [0u8; 4];
                    let n = data.len().min(4);
                    value[..n].copy_from_slice(&data[..n]);
                    Ok(Ok((port, u32::from_le_bytes(value))))
                }
                Ok(other) => Ok(Err(format!("{other:?}"))),
                Err(e) => Err(e),
            };
            let kicked = self.kicks.leave(v);
            match exit {
                Ok(Ok(io)) => break io,
                Ok(Err(reason)) => {
                    self.exits.total += 1;
                    let rip = self.fd.get_regs().map_or(0, |r| r.rip);
                    return Err(KvmError::Died { reason, rip });
                }
                // Kicked for a post: load it and go on.
                Err(e) if e.errno() == libc::EINTR && kicked => {}
                Err(e) if e.errno() == libc::EINTR => {
                    let rip = self.fd.get_regs().map_or(0, |r| r.rip);
                    return Err(KvmError::Watchdog {
                        seconds: self.deadline.as_secs_f64(),
                        rip,
                    });
                }
                Err(e) => return Err(e.into()),
            }
        };
        self.exits.total += 1;
        self.io_pending = true;
        self.in_stub = port != hyper::GUEST_PORT;
        if port == hyper::GUEST_PORT {
            return Ok(RawExit::Io { port, value });
        }
        let vector = port.wrapping_sub(hyper::STUB_PORT_BASE);
        let regs = self.fd.get_regs()?;
        if vector >= u16::from(hyper::VECTORS) {
            return Err(KvmError::Died {
                reason: format!("I/O to port {port:#x}"),
                rip: regs.rip,
            });
        }
        let frame_gpa = frame_gpa(hyper, regs.rsp, regs.rip)?;
        let mut bytes = [0u8; ExceptionFrame::BYTES];
        mem.read_slice(&mut bytes, GuestAddress(frame_gpa))
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

    /// Whether it last exited from a ring-0 stub: its segment registers are the stub's
    /// until it returns to the frame.
    pub(crate) fn in_stub(&self) -> bool {
        self.in_stub
    }

    /// Completes its pending I/O exit, as KVM requires before its registers are
    /// overwritten: one `KVM_RUN` with `immediate_exit` set.
    pub(crate) fn complete_io(&mut self) -> Result<(), KvmError> {
        if !self.io_pending {
            return Ok(());
        }
        self.fd.set_kvm_immediate_exit(1);
        let completed = match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR => Ok(()),
            Err(e) => Err(KvmError::from(e)),
            Ok(other) => Err(KvmError::Died {
                reason: format!("completing an I/O exit: {other:?}"),
                rip: 0,
            }),
        };
        self.fd.set_kvm_immediate_exit(0);
        completed?;
        self.io_pending = false;
        self.exits.io_completions += 1;
        Ok(())
    }
}

impl Drop for VcpuRun {
    fn drop(&mut self) {
        self.kicks.release(self.v);
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

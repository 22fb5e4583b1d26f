//! The guest kernel: one model of an x86 OS kernel, parameterised by its layout
//! ([`arch::Arch`]): Linux-like 64-bit with a direct map, Windows-like PAE with a
//! self-map, or a 2-level kernel with a PSE lowmem map. It keeps its page tables only in
//! guest memory, reads them back through its own mappings, writes them with real
//! instructions, and handles the page faults the hypervisor reflects to it.

pub mod arch;
mod boot;
pub mod code;
mod fault;
mod frames;
mod process;
mod pt;

use std::collections::BTreeMap;

use shadow2::paging::ControlState;

use crate::RunError;
use crate::ops::{Event, GuestOps, OpError};
use crate::rng::Rng;
use crate::spec::{GuestModel, RunSpec};
use arch::Arch;
use frames::Frames;

pub use process::Pid;

/// What a user access found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// It completed.
    Done,
    /// The process was killed (a real violation).
    Killed,
}

/// A mapping of a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Vma {
    /// First byte.
    pub start: u64,
    /// End (exclusive).
    pub end: u64,
    /// Writable.
    pub writable: bool,
    /// Executable.
    pub exec: bool,
    /// Backed by the executable file's page cache (page `file_page` at `start`), else
    /// anonymous.
    pub file: Option<u64>,
}

impl Vma {
    fn contains(&self, va: u64) -> bool {
        (self.start..self.end).contains(&va)
    }
}

/// One address space and its task.
#[derive(Clone, Debug)]
struct Process {
    /// The CR3 value.
    cr3: u64,
    /// The top-level table (the PDPT's page for PAE).
    top: u64,
    /// PAE: the four page directories.
    pds: [u64; 4],
    /// PAE: the PDPT's slot in the PDPT pool.
    pdpt_slot: Option<usize>,
    /// The mappings.
    vmas: Vec<Vma>,
    /// What the process stored last at the start of each page it wrote (checked on reads).
    mem: BTreeMap<u64, u64>,
    /// Vcpus that have this address space loaded.
    loaded_on: u64,
}

/// Per-vcpu kernel state.
#[derive(Clone, Copy, Debug, Default)]
struct CpuState {
    ctl: ControlState,
    current: Option<Pid>,
    window: [Option<u64>; WINDOW_SLOTS],
}

/// Mapping-window slots per vcpu: page tables, a destination, a copy source.
const WINDOW_SLOTS: usize = 3;
const SLOT_TABLE: usize = 0;
const SLOT_DST: usize = 1;
const SLOT_SRC: usize = 2;

/// Pages of the executable file in the page cache.
pub const FILE_PAGES: u64 = 16;

/// The kernel.
#[derive(Debug)]
pub struct Kernel<B: GuestOps> {
    ops: B,
    arch: Arch,
    rng: Rng,
    frames: Frames,
    procs: BTreeMap<Pid, Process>,
    next_pid: u32,
    cpus: Vec<CpuState>,
    /// The kernel's reference top-level table (the PAE system PDPT's page), whose kernel
    /// half every process shares.
    kernel_top: u64,
    /// PAE: the shared kernel page directory (PD 2).
    kernel_pd: u64,
    /// PAE: the PDPT pool page and which of its 32-byte slots are used.
    pdpt_pool: Vec<(u64, Vec<bool>)>,
    /// The page-cache frames of the executable file.
    file: Vec<u64>,
    /// While building tables before paging is on: by loader writes (true) or by guest
    /// stores with paging off (false).
    loader: bool,
    pid_of_system: Pid,
    /// PAE: the system process's page directories.
    system_pds: [u64; 4],
    /// `smp-boot`: application processors still in their own modes, with a scratch frame.
    aps: Vec<(usize, u64)>,
}

/// A kernel-level failure: the run is over.
pub(crate) type KResult<T> = Result<T, RunError>;

pub(crate) fn kernel_err(e: OpError, what: &str) -> RunError {
    match e {
        OpError::Backend(b) => RunError::Backend(b),
        OpError::Fault(f) => RunError::GuestPanic(format!("{f} while the kernel {what}")),
    }
}

impl<B: GuestOps> Kernel<B> {
    /// Boots the kernel of `spec` on `ops`: builds its tables (by the loader, or with paging
    /// off for `boot`/`smp-boot`), turns paging on for every vcpu, starts `init`.
    pub fn boot(spec: &RunSpec, ops: B) -> KResult<(Kernel<B>, Pid)> {
        let arch = Arch::of(spec);
        let vcpus = ops.vcpus();
        let ram = ops.ram_frames();
        let mut k = Kernel {
            ops,
            arch,
            rng: Rng::new(spec.seed),
            frames: Frames::new(ram),
            procs: BTreeMap::new(),
            next_pid: 0,
            cpus: vec![CpuState::default(); vcpus],
            kernel_top: 0,
            kernel_pd: 0,
            pdpt_pool: Vec::new(),
            file: Vec::new(),
            loader: !matches!(spec.guest, GuestModel::Boot | GuestModel::SmpBoot),
            pid_of_system: Pid(0),
            system_pds: [0; 4],
            aps: Vec::new(),
        };
        k.build_kernel(spec.guest == GuestModel::SmpBoot)?;
        let init = k.spawn_init()?;
        Ok((k, init))
    }

    /// The backend.
    pub fn ops(&mut self) -> &mut B {
        &mut self.ops
    }

    /// The layout.
    pub fn arch(&self) -> &Arch {
        &self.arch
    }

    /// Vcpus.
    pub fn vcpus(&self) -> usize {
        self.cpus.len()
    }

    /// A random number below `n` from the model's seed.
    pub fn rand_below(&mut self, n: u64) -> u64 {
        self.rng.below(n)
    }

    fn event(&mut self, e: Event) {
        self.ops.event(e);
    }

    fn proc_ref(&self, pid: Pid) -> KResult<&Process> {
        self.procs
            .get(&pid)
            .ok_or_else(|| RunError::GuestPanic(format!("no process {}", pid.0)))
    }

    fn proc_mut(&mut self, pid: Pid) -> KResult<&mut Process> {
        self.procs
            .get_mut(&pid)
            .ok_or_else(|| RunError::GuestPanic(format!("no process {}", pid.0)))
    }

    /// Runs `pid` on vcpu `v` (a CR3 write unless it is already there).
    pub fn switch_to(&mut self, v: usize, pid: Pid) -> KResult<()> {
        let Some(cpu) = self.cpus.get(v) else {
            return Err(RunError::GuestPanic(format!("no vcpu {v}")));
        };
        if cpu.current == Some(pid) {
            return Ok(());
        }
        let prev = cpu.current;
        let cr3 = self.proc_ref(pid)?.cr3;
        self.ops
            .set_cr3(v, cr3)
            .map_err(|e| kernel_err(e, "switched address spaces"))?;
        if let Some(prev) = prev
            && let Some(p) = self.procs.get_mut(&prev)
        {
            p.loaded_on &= !(1 << v);
        }
        self.proc_mut(pid)?.loaded_on |= 1 << v;
        if let Some(cpu) = self.cpus.get_mut(v) {
            cpu.current = Some(pid);
            cpu.ctl.cr3 = cr3;
            // The windows live in the kernel half, shared: a CR3 load flushes their
            // non-global translations, not their contents.
        }
        Ok(())
    }

    /// Invalidates `va` on every vcpu that has `pid` loaded (a TLB shootdown).
    fn shootdown(&mut self, pid: Pid, va: u64) -> KResult<()> {
        let mask = self.proc_ref(pid)?.loaded_on;
        for v in 0..self.cpus.len() {
            if mask & (1 << v) != 0 {
                self.ops
                    .invlpg(v, va)
                    .map_err(|e| kernel_err(e, "invalidated a page"))?;
            }
        }
        Ok(())
    }
}

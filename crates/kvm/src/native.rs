//! [`NativeBackend`]: guest operations on KVM vcpus that run on the guest's own page
//! tables, with no engine: KVM's own paging does the work, so a run here is the reference
//! the engine's runs are compared with. Page faults go straight to the guest; the
//! privileged operations load the guest's registers into the vcpu.
//!
//! The vcpus still need the hypervisor area (descriptor tables, stubs, the executor) in
//! their address space, and the guest's tables must not show it: a guest that reads its
//! own top-level table (to copy the kernel's half into a new one, or to free the user half)
//! would see the VMM's entry. So the hardware runs on a copy of the guest's top-level table
//! with the hole's entry added; every level below is the guest's own, walked and given A/D
//! bits by the hardware. The copy is compared with the guest's table after every guest
//! operation and at every CR3 load, and brought up to date (A bits the hardware set in it
//! go back to the guest's entries); a paging-disabled guest runs on identity tables of the
//! VMM's. This host pages only in long mode: guests with 2- or 3-level paging cannot run
//! natively here ([`NativeBackend::can_run`]).

use std::collections::BTreeMap;

use shadow2::domain::EmulateOutcome;
use shadow2::emulate::Regs;
use shadow2::multi::FaultOutcome;
use shadow2::paging::bits::{self, cr};
use shadow2::paging::{ControlState, PagingLevels, PfErrorCode};
use shadow2::{EngineError, Gpa, MachineMemory, Mfn};
use shadow2_guest::OpError;

use crate::KvmError;
use crate::backend::{Backend, Paging, public_backend};
use crate::executor::Privileged;
use crate::hyper::{self, HyperArea};
use crate::memory::KvmMemory;
use crate::probe::Probe;
use crate::shadowed::KvmBackendConfig;
use crate::vm::{VcpuRun, Vm, memory_error};

/// Frames of VM memory beyond RAM: the hypervisor area, identity tables, top copies.
const EXTRA_FRAMES: u64 = 512;
/// Copies of guest top-level tables kept at once.
const MAX_COPIES: usize = 64;
/// The hole's slot in a 4-level top.
const HOLE_SLOT: usize = ((hyper::HOLE_BASE >> 39) & 511) as usize;

/// A copy of a guest top-level table that the hardware runs on.
#[derive(Clone, Debug)]
struct TopCopy {
    frame: Mfn,
    /// The guest's entries as last copied (the hole's slot holds 0).
    entries: Vec<u64>,
}

/// VM memory and vcpus running guests on their own tables.
#[derive(Debug)]
pub struct NativeMachine {
    // Dropped before the memory it runs on.
    vm: Vm,
    mem: KvmMemory,
    hyper: HyperArea,
    maxphyaddr: u8,
    ram_frames: u64,
    /// Each vcpu's own control registers.
    guest: Vec<ControlState>,
    /// The top-level table each vcpu's hardware runs on.
    hardware_cr3: Vec<u64>,
    /// The identity tables of paging-disabled vcpus.
    identity: u64,
    /// Copies of guest tops, by the guest top's frame.
    copies: BTreeMap<u64, TopCopy>,
}

/// Guest operations on KVM vcpus running on the guest's own tables (no engine).
#[derive(Debug)]
pub struct NativeBackend(Backend<NativeMachine>);

public_backend!(NativeBackend);

impl NativeBackend {
    /// A VM for `cfg` on this host (the pool size is not used): RAM at the guest's own
    /// physical addresses, every vcpu starting with paging disabled.
    pub fn new(probe: &Probe, cfg: &KvmBackendConfig) -> Result<NativeBackend, KvmError> {
        let frames = cfg.ram_frames + EXTRA_FRAMES;
        let mut mem = KvmMemory::with_reserved(frames, cfg.ram_frames).map_err(memory_error)?;
        let hyper = HyperArea::build(&mut mem, cfg.vcpus)?;
        let identity = identity_tables(&mut mem, &hyper, cfg.ram_frames)?;
        let vm = Vm::new(&mem, cfg.vcpus)?;
        let mut m = NativeMachine {
            vm,
            mem,
            hyper,
            maxphyaddr: probe.maxphyaddr,
            ram_frames: cfg.ram_frames,
            guest: vec![ControlState::default(); cfg.vcpus],
            hardware_cr3: vec![identity; cfg.vcpus],
            identity,
            copies: BTreeMap::new(),
        };
        for v in 0..cfg.vcpus {
            let hw = m.hardware(v);
            m.vm.vcpu(v)?.init(Some(&hw))?;
        }
        Ok(NativeBackend(Backend::on(
            m,
            cfg.ram_frames,
            cfg.vcpus,
            cfg.vcpu_threads,
        )?))
    }

    /// Whether a guest whose paging modes are `levels` (each 0, 2, 3 or 4) can run
    /// natively on this host: paging disabled and 4-level paging only (the hardware pages
    /// in long mode here).
    pub fn can_run(levels: &[u8]) -> Result<(), String> {
        match levels.iter().find(|&&l| l != 0 && l != 4) {
            None => Ok(()),
            Some(l) => Err(format!(
                "{l}-level guest paging cannot run natively on this host (long mode only)"
            )),
        }
    }
}

/// Identity tables for a paging-disabled guest: RAM mapped at its own addresses (4 KiB
/// pages, user and writable), nothing else but the hole.
fn identity_tables(mem: &mut KvmMemory, hyper: &HyperArea, ram: u64) -> Result<u64, KvmError> {
    let table = |mem: &mut KvmMemory| {
        mem.alloc_block(0)
            .map(|m| m.base().raw())
            .ok_or(KvmError::OutOfFrames)
    };
    let put = |mem: &KvmMemory, at: u64, value: u64| {
        mem.write_bytes(at, &value.to_le_bytes())
            .map_err(memory_error)
    };
    let upper = bits::P | bits::RW | bits::US | bits::A;
    let l4 = table(mem)?;
    let l3 = table(mem)?;
    put(mem, l4, l3 | upper)?;
    put(mem, l4 + HOLE_SLOT as u64 * 8, hole_entry(hyper))?;
    let mut l2s = BTreeMap::new();
    let mut l1s = BTreeMap::new();
    for gfn in 0..ram {
        let gpa = gfn << 12;
        let l3i = (gpa >> 30) & 511;
        let l2 = match l2s.get(&l3i) {
            Some(&t) => t,
            None => {
                let t = table(mem)?;
                put(mem, l3 + l3i * 8, t | upper)?;
                l2s.insert(l3i, t);
                t
            }
        };
        let l2i = (gpa >> 21) & 511;
        let l1 = match l1s.get(&(l3i, l2i)) {
            Some(&t) => t,
            None => {
                let t = table(mem)?;
                put(mem, l2 + l2i * 8, t | upper)?;
                l1s.insert((l3i, l2i), t);
                t
            }
        };
        put(mem, l1 + ((gpa >> 12) & 511) * 8, gpa | upper | bits::D)?;
    }
    Ok(l4)
}

/// The hole's entry in a top the hardware runs on.
fn hole_entry(hyper: &HyperArea) -> u64 {
    hyper.l3.base().raw() | bits::P | bits::RW | bits::US | bits::A
}

fn op_error(e: KvmError) -> OpError {
    OpError::Backend(e.to_string())
}

impl NativeMachine {
    /// The registers vcpu `v`'s hardware runs with.
    fn hardware(&self, v: usize) -> ControlState {
        let guest = self.guest.get(v).copied().unwrap_or_default();
        let cr3 = self.hardware_cr3.get(v).copied().unwrap_or(self.identity);
        if guest.levels() == PagingLevels::Zero {
            ControlState {
                cr0: cr::CR0_PE | cr::CR0_PG | cr::CR0_WP,
                cr3,
                cr4: cr::CR4_PAE,
                efer: cr::EFER_NXE,
                ..guest
            }
        } else {
            ControlState {
                cr0: guest.cr0 | cr::CR0_PE | cr::CR0_PG,
                cr3,
                cr4: guest.cr4 | cr::CR4_PAE,
                efer: guest.efer,
                ..guest
            }
        }
    }

    fn read_table(&self, at: u64) -> Result<Vec<u64>, KvmError> {
        let mut page = vec![0u8; 4096];
        self.mem.read_bytes(at, &mut page).map_err(memory_error)?;
        Ok(page
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect())
    }

    fn guest_top(&self, v: usize) -> Option<u64> {
        let g = self.guest.get(v)?;
        (g.levels() == PagingLevels::Four).then_some(g.cr3 & bits::ADDR_MASK_8)
    }

    /// Brings the copy of guest top `top` up to date (making one if there is none): A bits
    /// the hardware set in the copy go back to the guest's entries first, then the guest's
    /// entries are copied. Returns whether the copy changed (KVM must then drop what it
    /// caches: it does not see this process's writes).
    fn sync_copy(&mut self, top: u64) -> Result<bool, KvmError> {
        if top >> 12 >= self.ram_frames {
            return Err(KvmError::Died {
                reason: format!("CR3 {top:#x} is outside guest RAM"),
                rip: 0,
            });
        }
        let mut guest = self.read_table(top)?;
        if guest.get(HOLE_SLOT).is_some_and(|&e| e != 0) {
            return Err(KvmError::Died {
                reason: format!(
                    "the guest's top table at {top:#x} maps L4 slot {HOLE_SLOT}, which this backend needs"
                ),
                rip: 0,
            });
        }
        let Some(copy) = self.copies.get(&top) else {
            if self.copies.len() >= MAX_COPIES {
                self.evict_copy()?;
            }
            let frame = self.mem.alloc_block(0).ok_or(KvmError::OutOfFrames)?;
            self.copies.insert(
                top,
                TopCopy {
                    frame,
                    entries: vec![u64::MAX; 512],
                },
            );
            return self.sync_copy(top);
        };
        let frame = copy.frame.base().raw();
        let hardware = self.read_table(frame)?;
        for (i, (g, h)) in guest.iter_mut().zip(&hardware).enumerate() {
            // The hardware set A in the copy of an entry the guest has not changed since.
            if i != HOLE_SLOT
                && h & bits::A != 0
                && *g & bits::A == 0
                && copy.entries.get(i) == Some(g)
            {
                *g |= bits::A;
                self.mem
                    .write_bytes(top + 8 * i as u64, &g.to_le_bytes())
                    .map_err(memory_error)?;
            }
        }
        if copy.entries == guest {
            return Ok(false);
        }
        let mut image = Vec::with_capacity(4096);
        for (i, g) in guest.iter().enumerate() {
            let e = if i == HOLE_SLOT {
                hole_entry(&self.hyper)
            } else {
                *g
            };
            image.extend_from_slice(&e.to_le_bytes());
        }
        self.mem.write_bytes(frame, &image).map_err(memory_error)?;
        if let Some(c) = self.copies.get_mut(&top) {
            c.entries = guest;
        }
        Ok(true)
    }

    /// Drops a copy no vcpu runs on (its frame goes back to the VM's memory).
    fn evict_copy(&mut self) -> Result<(), KvmError> {
        let in_use: Vec<u64> = (0..self.guest.len())
            .filter_map(|v| self.guest_top(v))
            .collect();
        let victim = self
            .copies
            .keys()
            .copied()
            .find(|t| !in_use.contains(t))
            .ok_or(KvmError::OutOfFrames)?;
        if let Some(c) = self.copies.remove(&victim) {
            self.mem.free_block(c.frame, 0);
            // KVM may still hold what it built from the old contents.
            self.vm.zap()?;
        }
        Ok(())
    }

    /// Points vcpu `v`'s hardware at what its guest registers say, syncing its top.
    fn load(&mut self, v: usize) -> Result<(), KvmError> {
        let cr3 = match self.guest_top(v) {
            Some(top) => {
                if self.sync_copy(top)? {
                    self.vm.zap()?;
                }
                self.copies
                    .get(&top)
                    .map_or(self.identity, |c| c.frame.base().raw())
            }
            None => self.identity,
        };
        if let Some(slot) = self.hardware_cr3.get_mut(v) {
            *slot = cr3;
        }
        let hw = self.hardware(v);
        self.vm.post_paging(v, hw);
        Ok(())
    }

    /// After a guest operation: the tops vcpus run on are brought up to date with the
    /// guest's tables (one zap if any changed).
    fn after_op(&mut self) -> Result<(), KvmError> {
        let mut tops: Vec<u64> = (0..self.guest.len())
            .filter_map(|v| self.guest_top(v))
            .collect();
        tops.dedup();
        let mut changed = false;
        for top in tops {
            changed |= self.sync_copy(top)?;
        }
        if changed {
            self.vm.zap()?;
        }
        Ok(())
    }
}

impl Paging for NativeMachine {
    fn take_vcpu(&mut self, v: usize) -> Result<VcpuRun, KvmError> {
        self.vm.take_vcpu(v)
    }

    fn kicks(&self) -> std::sync::Arc<crate::kicks::Kicks> {
        self.vm.kicks()
    }

    fn mem(&self) -> &KvmMemory {
        &self.mem
    }

    fn hyper(&self) -> &HyperArea {
        &self.hyper
    }

    fn hardware_cr3(&self, v: usize) -> Option<u64> {
        self.hardware_cr3.get(v).copied()
    }

    fn maxphyaddr(&self) -> u8 {
        self.maxphyaddr
    }

    fn guest_control(&self, v: usize) -> ControlState {
        self.guest.get(v).copied().unwrap_or_default()
    }

    fn is_guest_ram(&self, mfn: Mfn) -> bool {
        mfn.raw() < self.ram_frames
    }

    fn page_fault(
        &mut self,
        v: usize,
        cr2: u64,
        code: PfErrorCode,
    ) -> Result<FaultOutcome, KvmError> {
        if self.guest_control(v).levels() == PagingLevels::Zero {
            // Paging disabled: only guest-physical memory that is not RAM faults, which the
            // simulator treats as a device with none behind it.
            return Ok(FaultOutcome::Mmio { gpa: Gpa::new(cr2) });
        }
        Ok(FaultOutcome::Propagate(code))
    }

    fn write_emulated(&mut self, _gpa: Gpa, _data: &[u8]) -> Result<(), KvmError> {
        Err(EngineError::Internal("native paging never emulates").into())
    }

    fn emulate(
        &mut self,
        _v: usize,
        _regs: &mut Regs,
        _gpa: Gpa,
    ) -> Result<Option<EmulateOutcome>, KvmError> {
        Err(EngineError::Internal("native paging never emulates").into())
    }

    fn privileged(
        &mut self,
        v: usize,
        op: Privileged,
        _arg: u64,
        ctl: ControlState,
    ) -> Result<(), OpError> {
        match op {
            Privileged::Control | Privileged::Cr3 => {
                let levels = ctl.levels().count();
                NativeBackend::can_run(&[levels]).map_err(OpError::Backend)?;
                if let Some(g) = self.guest.get_mut(v) {
                    *g = ctl;
                }
                self.load(v).map_err(op_error)
            }
            // KVM's paging sees the guest's own table writes; a CR3 load flushes its TLB.
            Privileged::Invlpg => self.load(v).map_err(op_error),
        }
    }

    fn load_image(&mut self, gpa: Gpa, data: &[u8]) -> Result<(), KvmError> {
        self.mem
            .write_bytes(gpa.raw(), data)
            .map_err(memory_error)?;
        // KVM does not see this process's writes: what it cached may be stale.
        if self.guest.iter().any(|g| g.levels() != PagingLevels::Zero) {
            self.vm.zap()?;
        }
        Ok(())
    }

    fn read_guest_phys(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), KvmError> {
        self.mem.read_bytes(gpa.raw(), buf).map_err(memory_error)
    }

    fn after_op(&mut self) -> Result<(), KvmError> {
        NativeMachine::after_op(self)
    }
}

//! [`KvmBackend`]: guest operations on KVM vcpus that run on the engine's shadows. Page
//! faults go to the engine ([`Domain::page_fault`]); its answer is carried out (the vcpu
//! retries, the store or instruction is emulated, or the fault goes to the guest); the
//! privileged operations are the engine's CR0/CR3/INVLPG calls; every flush it hands out is
//! carried out before a vcpu runs again.

use shadow2::domain::{EmulateOutcome, EngineError, GuestFault};
use shadow2::emulate::Regs;
use shadow2::multi::FaultOutcome;
use shadow2::paging::{ControlState, PfErrorCode};
use shadow2::remove::{LinearMapHint, TeardownHints};
use shadow2::{Domain, Flush, Gfn, Gpa, Gva, Mfn, VcpuSet};
use shadow2_guest::{Fault, OpError};

use crate::KvmError;
use crate::backend::{Backend, Paging, public_backend};
use crate::executor::Privileged;
use crate::hyper::HyperArea;
use crate::machine::{KvmConfig, KvmMachine};
use crate::memory::KvmMemory;
use crate::probe::Probe;
use crate::vm::VcpuRun;

/// Frames of VM memory beyond RAM, pool and p2m (the hypervisor area, slack).
const SLACK_FRAMES: u64 = 256;
/// Calls of a preempted control-register write before the backend gives up.
const MAX_PREEMPTIONS: usize = 256;

/// How to build a KVM backend.
#[derive(Clone, Debug)]
pub struct KvmBackendConfig {
    /// Guest RAM: guest frames `0..ram_frames`.
    pub ram_frames: u64,
    /// Vcpus.
    pub vcpus: usize,
    /// The shadow pool's size in pages (the engine's backend only).
    pub pool_pages: usize,
    /// The guest OS's linear maps, handed to the engine.
    pub linear_maps: Vec<LinearMapHint>,
    /// The guest OS's teardown hints.
    pub teardown: TeardownHints,
    /// Each vcpu on a thread of its own (else all on the caller's thread).
    pub vcpu_threads: bool,
}

/// Guest operations on KVM vcpus running on the engine's shadows.
#[derive(Debug)]
pub struct KvmBackend(Backend<KvmMachine>);

public_backend!(KvmBackend);

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
        Ok(KvmBackend(Backend::on(
            m,
            cfg.ram_frames,
            cfg.vcpus,
            cfg.vcpu_threads,
        )?))
    }

    /// The machine (its domain and fault log), locked.
    pub fn machine(&self) -> std::sync::MutexGuard<'_, KvmMachine> {
        self.0.machine()
    }
}

impl KvmMachine {
    /// An engine call that answers with a flush, carried out.
    fn call(
        &mut self,
        op: impl FnOnce(&mut Domain<KvmMemory>) -> Result<Flush, EngineError>,
    ) -> Result<(), OpError> {
        let flush = self
            .engine(op)
            .map_err(|e| OpError::Backend(e.to_string()))?;
        self.settle(flush)
            .map_err(|e| OpError::Backend(e.to_string()))
    }

    /// A control-register write the engine carries out, called again while it answers
    /// `Preempted`; a refused one is the guest's #GP.
    fn control(
        &mut self,
        mut op: impl FnMut(&mut Domain<KvmMemory>) -> Result<Flush, EngineError>,
    ) -> Result<(), OpError> {
        for _ in 0..MAX_PREEMPTIONS {
            match self.engine(&mut op) {
                Ok(flush) => {
                    return self
                        .settle(flush)
                        .map_err(|e| OpError::Backend(e.to_string()));
                }
                // The engine needs another call (a flush carried out, a bounded step done);
                // the VMM calls again at once, no guest exit in between.
                Err(KvmError::Engine(EngineError::Preempted)) => {}
                Err(KvmError::Engine(EngineError::Guest(GuestFault::GeneralProtection))) => {
                    return Err(OpError::Fault(Fault::GeneralProtection));
                }
                Err(e) => return Err(OpError::Backend(e.to_string())),
            }
        }
        Err(OpError::Backend(
            "a control-register write made no progress".into(),
        ))
    }
}

impl Paging for KvmMachine {
    fn take_vcpu(&mut self, v: usize) -> Result<VcpuRun, KvmError> {
        KvmMachine::take_vcpu(self, v)
    }

    fn kicks(&self) -> std::sync::Arc<crate::kicks::Kicks> {
        KvmMachine::kicks(self)
    }

    fn mem(&self) -> &KvmMemory {
        self.domain().host()
    }

    fn hyper(&self) -> &HyperArea {
        KvmMachine::hyper(self)
    }

    fn hardware_cr3(&self, v: usize) -> Option<u64> {
        self.domain().hardware_control(v).map(|c| c.cr3)
    }

    fn maxphyaddr(&self) -> u8 {
        self.domain().config().host_maxphyaddr
    }

    fn guest_control(&self, v: usize) -> ControlState {
        self.domain()
            .vcpu(v)
            .map(|c| *c.control())
            .unwrap_or_default()
    }

    fn is_guest_ram(&self, mfn: Mfn) -> bool {
        let d = self.domain();
        !d.hypervisor_frames().any(|f| f == mfn) && !d.pool().contains(mfn)
    }

    fn page_fault(
        &mut self,
        v: usize,
        cr2: u64,
        code: PfErrorCode,
    ) -> Result<FaultOutcome, KvmError> {
        let (outcome, flush) = match self.engine(|d| d.page_fault(v, Gva::new(cr2), code)) {
            // Out of budget (a bounded search goes on): the guest retries the access.
            Err(KvmError::Engine(EngineError::Preempted)) => (FaultOutcome::Spurious, Flush::NONE),
            other => other?,
        };
        self.settle(flush)?;
        self.log_fault(cr2, outcome);
        Ok(outcome)
    }

    fn write_emulated(&mut self, gpa: Gpa, data: &[u8]) -> Result<(), KvmError> {
        let flush = self.engine(|d| d.write_guest_phys(gpa, data))?;
        self.settle(flush)
    }

    fn emulate(
        &mut self,
        v: usize,
        regs: &mut Regs,
        gpa: Gpa,
    ) -> Result<Option<EmulateOutcome>, KvmError> {
        let (outcome, flush) = match self.engine(|d| d.emulate(v, regs, gpa)) {
            Err(KvmError::Engine(EngineError::Preempted)) => return Ok(None),
            other => other?,
        };
        self.settle(flush)?;
        Ok(Some(outcome))
    }

    fn privileged(
        &mut self,
        v: usize,
        op: Privileged,
        arg: u64,
        ctl: ControlState,
    ) -> Result<(), OpError> {
        match op {
            Privileged::Control => {
                self.call(|d| d.set_control(v, ctl).map(|()| Flush::NONE))?;
                self.control(|d| d.update_paging_modes(v))
            }
            Privileged::Cr3 => {
                self.call(|d| d.set_control(v, ctl).map(|()| Flush::NONE))?;
                self.control(|d| d.update_cr3(v))
            }
            Privileged::Invlpg => {
                let (needed, flush) = self
                    .engine(|d| d.invlpg(v, Gva::new(arg)))
                    .map_err(|e| OpError::Backend(e.to_string()))?;
                if needed || flush != Flush::NONE {
                    // KVM keeps its own copy of the shadows; only a zap drops it.
                    let own = if needed {
                        Flush::of(VcpuSet::one(v))
                    } else {
                        Flush::NONE
                    };
                    self.settle(flush.merge(own))
                        .map_err(|e| OpError::Backend(e.to_string()))?;
                }
                Ok(())
            }
        }
    }

    fn load_image(&mut self, gpa: Gpa, data: &[u8]) -> Result<(), KvmError> {
        self.write_guest(gpa, data)
    }

    fn read_guest_phys(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), KvmError> {
        self.read_guest(gpa, buf)
    }
}

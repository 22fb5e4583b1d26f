//! The simulator backend of the guest-operations interface: [`SimBackend`] runs a guest model
//! ([`shadow2_guest::GuestOps`]) on a [`ShadowMachine`], a shadowed domain on simulated
//! hardware whose every access is checked against the guest oracle. Besides carrying the
//! operations out it samples the shadow pool's occupancy, audits the domain on a cadence of
//! guest operations, and sums everything up in a [`SimReport`].

use std::time::Duration;

use shadow2::addr::{Gfn, Gpa, Gva, PAGE_OFFSET_MASK, PAGE_SIZE};
use shadow2::audit::{AuditReport, audit};
use shadow2::domain::{DomainConfig, EngineError};
use shadow2::emulate::Regs;
use shadow2::paging::{ControlState, PagingLevels, Privilege};
use shadow2::remove::{LinearMapHint, TeardownHints};
use shadow2_guest::{Event, Fault, GuestOps, OpError};

use crate::sim::{CacheViolation, GuestError, Mismatch, ShadowMachine, Traps};

/// How to build a simulated machine for a guest model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimConfig {
    /// Paging levels of the shadow tables (2, 3 or 4).
    pub shadow_levels: PagingLevels,
    /// Number of vcpus (1..=64).
    pub vcpus: usize,
    /// Guest RAM: guest frames `0..ram_frames`, all RAM.
    pub ram_frames: u64,
    /// The shadow pool's size in pages (raised to [`DomainConfig::min_pool_pages`]).
    pub pool_pages: usize,
    /// The guest OS's linear maps, handed to the engine (at most 4).
    pub linear_maps: Vec<LinearMapHint>,
    /// The guest OS's teardown hints.
    pub teardown: TeardownHints,
    /// Guest operations between two samples of the pool's occupancy; 0: no samples.
    pub sample_every: u64,
    /// Guest operations between two full audits of the domain; 0: only the audit of
    /// [`SimBackend::report`].
    pub audit_every: u64,
    /// Out-of-sync shadows ([`DomainConfig::out_of_sync`]), with the engine's default
    /// bound. On by default in the simulator: every workload takes as few or fewer traps
    /// with it (forkwait 4on4: 57.2 -> 44.2 per round, windows-pae demand: 4.01 -> 3.01
    /// per demand fault), and a trap, not the engine's time in it, is what costs on real
    /// hardware. The engine's own default stays off: it is exact only while no vcpu runs
    /// during an engine call (hosts with vcpu threads, such as the KVM backend, keep it off).
    pub out_of_sync: bool,
}

impl SimConfig {
    /// The default pool size, in pages (8 MiB).
    pub const DEFAULT_POOL_PAGES: usize = 2048;
    /// The default [`SimConfig::sample_every`].
    pub const DEFAULT_SAMPLE_EVERY: u64 = 1000;

    /// A machine with `vcpus` vcpus and `ram_frames` frames of RAM on `shadow_levels`-level
    /// shadows: a pool of [`SimConfig::DEFAULT_POOL_PAGES`] (at least the domain's
    /// minimum), no linear-map or teardown hints, a pool sample every
    /// [`SimConfig::DEFAULT_SAMPLE_EVERY`] operations, no periodic audit, and out-of-sync
    /// shadows on.
    pub fn new(shadow_levels: PagingLevels, vcpus: usize, ram_frames: u64) -> SimConfig {
        let min = DomainConfig::hvm(shadow_levels, vcpus, 0).min_pool_pages();
        SimConfig {
            shadow_levels,
            vcpus,
            ram_frames,
            pool_pages: Self::DEFAULT_POOL_PAGES.max(min),
            linear_maps: Vec::new(),
            teardown: TeardownHints::NONE,
            sample_every: Self::DEFAULT_SAMPLE_EVERY,
            audit_every: 0,
            out_of_sync: true,
        }
    }

    /// The engine's configuration for this machine.
    pub fn domain_config(&self) -> Result<DomainConfig, String> {
        if self.linear_maps.len() > 4 {
            return Err(format!(
                "at most 4 linear-map hints, {} given",
                self.linear_maps.len()
            ));
        }
        let mut config = DomainConfig::hvm(self.shadow_levels, self.vcpus, self.pool_pages);
        for (slot, hint) in config.linear_maps.iter_mut().zip(&self.linear_maps) {
            *slot = Some(*hint);
        }
        config.teardown = self.teardown;
        config.out_of_sync = self.out_of_sync;
        Ok(config)
    }
}

/// What a simulated run did, for the run's report.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SimReport {
    /// Traps taken, by kind (guest operations only: loading the image takes none).
    pub traps: Traps,
    /// Traps charged to the demand and copy-on-write faults that caused them.
    pub attribution: TrapAttribution,
    /// Accesses whose result differed from what the guest's own tables say.
    pub oracle_mismatches: u64,
    /// The first of those, in words.
    pub first_mismatches: Vec<String>,
    /// Invariant violations found by the audits run: every periodic audit's plus the one
    /// [`SimBackend::report`] runs (a violation that persists is counted by every audit that
    /// sees it; each audit records at most [`AuditReport::LIMIT`]).
    pub audit_violations: u64,
    /// The first of those, in words, each with the guest operation count of its audit.
    pub first_audit_violations: Vec<String>,
    /// Of the audit violations, entries of a vcpu's TLB or paging-structure caches that
    /// refer to what the domain may not reach (each audit checks the caches too).
    pub cache_violations: u64,
    /// The pool's current size, in pages.
    pub pool_pages: usize,
    /// The most pool pages ever in use at once.
    pub pool_peak_pages: usize,
    /// Guest frames shadowed as page tables when the pool was fullest (at the end of the
    /// first guest operation that reached `pool_peak_pages`).
    pub guest_tables_at_pool_peak: usize,
    /// Top-level shadows unpinned to make room (the engine's `evictions`).
    pub evictions: u64,
    /// The most work one engine call did (the engine's `max_call_work`).
    pub max_call_work: u64,
    /// Pages whose shadows were all removed (the engine's `unshadows`). This includes the
    /// pages unshadowed by the fork/exit heuristic (`early_unshadows`) and by the teardown
    /// hints (`teardown_zeroed`, `teardown_data`): each of those is also one unshadow.
    pub unshadows: u64,
    /// Wall-clock seconds spent inside the engine on guest operations (loading the image
    /// not included).
    pub engine_seconds: f64,
    /// (guest operations so far, pool pages in use), every `sample_every` operations, and a
    /// last sample at the time of the report.
    pub pool_series: Vec<(u64, u64)>,
    /// Every engine counter, by name.
    pub stats: Vec<(String, u64)>,
    /// Whether out-of-sync shadows were on.
    pub out_of_sync: bool,
    /// The engine's counters of out-of-sync shadows, by name.
    pub oos_stats: Vec<(String, u64)>,
}

/// At most this many audit violations are kept in words.
const AUDIT_LOG: usize = 16;

/// The simulated machine as a [`GuestOps`] backend.
#[derive(Debug)]
pub struct SimBackend {
    machine: ShadowMachine,
    vcpus: usize,
    ram_frames: u64,
    sample_every: u64,
    audit_every: u64,
    /// Guest operations so far.
    ops: u64,
    pool_series: Vec<(u64, u64)>,
    audit_violations: u64,
    cache_violations: u64,
    first_audit_violations: Vec<String>,
    /// Engine time spent loading images (not a guest operation).
    load_time: Duration,
    attribution: TrapAttribution,
    /// (pool pages in use, guest frames shadowed as page tables) after the guest operation
    /// that used the most pool pages.
    pool_peak: (usize, usize),
}

/// Traps charged to the guest fault that caused them: every trap from the start of a user
/// access to its completion (the faulting access, the kernel's handler with its page-table
/// writes and the zeroing of a new page, the retry) is the cost of the demand or
/// copy-on-write fault the kernel reported inside that access.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct TrapAttribution {
    /// Traps of user accesses in which the kernel mapped a page on first touch.
    pub demand_fault_traps: u64,
    /// Traps of user accesses in which the kernel broke copy-on-write.
    pub cow_fault_traps: u64,
    /// The open access: the trap count at its start, and what the kernel reported in it.
    #[serde(skip)]
    open: Option<OpenAccess>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct OpenAccess {
    traps_at_start: u64,
    demand: bool,
    cow: bool,
}

impl TrapAttribution {
    /// Follows the guest model's `event`, `traps` being the machine's trap count now.
    pub fn on_event(&mut self, event: Event, traps: u64) {
        match event {
            Event::UserAccess => {
                self.open = Some(OpenAccess {
                    traps_at_start: traps,
                    ..OpenAccess::default()
                });
            }
            Event::DemandFault => {
                if let Some(open) = &mut self.open {
                    open.demand = true;
                }
            }
            Event::CowFault => {
                if let Some(open) = &mut self.open {
                    open.cow = true;
                }
            }
            Event::UserAccessDone => {
                if let Some(open) = self.open.take() {
                    let cost = traps.saturating_sub(open.traps_at_start);
                    if open.demand {
                        self.demand_fault_traps += cost;
                    } else if open.cow {
                        self.cow_fault_traps += cost;
                    }
                }
            }
            Event::Kill | Event::WorkloadStep | Event::DataError => {}
        }
    }
}

/// Machine frames kept beyond RAM, the pool and the p2m tables.
const SLACK_FRAMES: u64 = 1024;

impl SimBackend {
    /// Builds the machine: a translated HVM domain with `cfg`'s modes, guest frames
    /// `0..cfg.ram_frames` backed by RAM, every vcpu with paging disabled.
    pub fn new(cfg: SimConfig) -> Result<SimBackend, String> {
        let config = cfg.domain_config()?;
        let pool = config.pool_pages.max(config.min_pool_pages()) as u64;
        // p2m tables: one leaf table per 512 frames (1024 on 2-level shadows; 512 bounds
        // both), a few upper levels, and every pool chunk rounded up.
        let p2m = cfg.ram_frames.div_ceil(512) + cfg.ram_frames.div_ceil(512 * 512) + 16;
        let frames = cfg
            .ram_frames
            .checked_add(pool.saturating_add(pool / 2))
            .and_then(|f| f.checked_add(p2m))
            .and_then(|f| f.checked_add(SLACK_FRAMES))
            .ok_or_else(|| "the machine is too large".to_string())?;
        let mut machine = ShadowMachine::new(frames, config)
            .map_err(|e| format!("cannot create the domain: {e}"))?;
        machine
            .add_ram(Gfn::new(0), cfg.ram_frames)
            .map_err(|e| format!("cannot give the guest {} frames: {e}", cfg.ram_frames))?;
        // Every vcpu starts with paging disabled, running on the p2m: until the engine has
        // picked that mode the simulated hardware would have no root at all (and would read
        // machine memory directly). Setup, not a guest operation: no trap counted.
        for v in 0..cfg.vcpus {
            let flush = machine
                .domain_mut()
                .update_paging_modes(v)
                .map_err(|e| format!("cannot start vcpu {v}: {e}"))?;
            machine.settle(flush);
        }
        Ok(SimBackend {
            machine,
            vcpus: cfg.vcpus,
            ram_frames: cfg.ram_frames,
            sample_every: cfg.sample_every,
            audit_every: cfg.audit_every,
            ops: 0,
            pool_series: Vec::new(),
            audit_violations: 0,
            cache_violations: 0,
            first_audit_violations: Vec::new(),
            load_time: Duration::ZERO,
            attribution: TrapAttribution::default(),
            pool_peak: (0, 0),
        })
    }

    /// The simulated machine.
    pub fn machine(&self) -> &ShadowMachine {
        &self.machine
    }

    /// Guest operations carried out so far (loads, stores, fetches, instructions, control
    /// register writes, INVLPGs; not image loads).
    pub fn guest_ops(&self) -> u64 {
        self.ops
    }

    /// The run so far, with a fresh audit of the domain.
    pub fn report(&self) -> SimReport {
        let (mismatch_count, kept) = self.machine.mismatches();
        let domain = self.machine.domain();
        let final_audit = audit(domain);
        let final_caches = self.machine.check_hardware_caches();
        let mut first_audit_violations = self.first_audit_violations.clone();
        record_violations(&mut first_audit_violations, self.ops, &final_audit);
        record_cache_violations(&mut first_audit_violations, self.ops, &final_caches);
        let final_violations = final_audit.violations.len() + final_caches.len();
        let mut pool_series = self.pool_series.clone();
        let used = domain.pool().used_pages() as u64;
        if pool_series.last().is_none_or(|&(ops, _)| ops != self.ops) {
            pool_series.push((self.ops, used));
        }
        let stats = domain.stats();
        SimReport {
            traps: self.machine.traps(),
            attribution: self.attribution,
            oracle_mismatches: mismatch_count,
            first_mismatches: kept.iter().map(describe_mismatch).collect(),
            audit_violations: self.audit_violations + final_violations as u64,
            first_audit_violations,
            cache_violations: self.cache_violations + final_caches.len() as u64,
            pool_pages: domain.pool().total_pages(),
            pool_peak_pages: domain.pool().peak_used_pages(),
            guest_tables_at_pool_peak: self.pool_peak.1,
            evictions: stats.evictions,
            max_call_work: stats.max_call_work,
            unshadows: stats.unshadows,
            engine_seconds: self
                .machine
                .engine_time()
                .saturating_sub(self.load_time)
                .as_secs_f64(),
            pool_series,
            stats: stats
                .fields()
                .iter()
                .map(|&(name, value)| (name.to_string(), value))
                .collect(),
            out_of_sync: domain.config().out_of_sync,
            oos_stats: domain
                .out_of_sync_stats()
                .fields()
                .iter()
                .map(|&(name, value)| (name.to_string(), value))
                .collect(),
        }
    }

    /// Counts one guest operation and runs the samples and audits due.
    fn tick(&mut self) {
        self.ops += 1;
        let domain = self.machine.domain();
        let used = domain.pool().used_pages();
        if used > self.pool_peak.0 {
            self.pool_peak = (used, domain.shadows().page_table_count());
        }
        if self.sample_every > 0 && self.ops.is_multiple_of(self.sample_every) {
            let used = self.machine.domain().pool().used_pages() as u64;
            self.pool_series.push((self.ops, used));
        }
        if self.audit_every > 0 && self.ops.is_multiple_of(self.audit_every) {
            let report = audit(self.machine.domain());
            self.audit_violations += report.violations.len() as u64;
            record_violations(&mut self.first_audit_violations, self.ops, &report);
            let caches = self.machine.check_hardware_caches();
            self.audit_violations += caches.len() as u64;
            self.cache_violations += caches.len() as u64;
            record_cache_violations(&mut self.first_audit_violations, self.ops, &caches);
        }
    }

    fn check_vcpu(&self, vcpu: usize) -> Result<(), OpError> {
        if vcpu < self.vcpus {
            Ok(())
        } else {
            Err(OpError::Backend(format!(
                "vcpu {vcpu} does not exist ({} vcpus)",
                self.vcpus
            )))
        }
    }

    /// Checks the arguments of a load, store or fetch.
    fn check_access(&self, vcpu: usize, va: u64, len: usize, what: &str) -> Result<(), OpError> {
        self.check_vcpu(vcpu)?;
        let room = PAGE_SIZE - (va & PAGE_OFFSET_MASK);
        if len as u64 > room {
            return Err(OpError::Backend(format!(
                "a {what} of {len} bytes at {va:#x} crosses a page boundary"
            )));
        }
        Ok(())
    }

    /// A load or fetch: MMIO reads as zeros (there are no devices).
    fn load(
        &mut self,
        vcpu: usize,
        va: u64,
        cpl: u8,
        buf: &mut [u8],
        fetch: bool,
    ) -> Result<(), OpError> {
        let what = if fetch { "fetch" } else { "load" };
        self.check_access(vcpu, va, buf.len(), what)?;
        let privilege = Privilege::of_cpl(cpl);
        let result = if fetch {
            self.machine.fetch(vcpu, Gva::new(va), privilege, buf)
        } else {
            self.machine.read(vcpu, Gva::new(va), privilege, buf)
        };
        self.tick();
        match result {
            Err(GuestError::Mmio { .. }) => {
                buf.fill(0);
                Ok(())
            }
            r => r.map_err(op_error),
        }
    }
}

/// Keeps the first few violations of `report` in words.
fn record_violations(kept: &mut Vec<String>, ops: u64, report: &AuditReport) {
    for v in &report.violations {
        if kept.len() >= AUDIT_LOG {
            break;
        }
        kept.push(format!("after {ops} guest ops: {} at {:#x}", v.what, v.at));
    }
}

/// Keeps the first few hardware-cache violations in words, after the audit's.
fn record_cache_violations(kept: &mut Vec<String>, ops: u64, found: &[CacheViolation]) {
    for v in found {
        if kept.len() >= AUDIT_LOG {
            break;
        }
        kept.push(format!("after {ops} guest ops: {v}"));
    }
}

fn describe_mismatch(m: &Mismatch) -> String {
    format!(
        "vcpu {} {:?} {:?} at {}: {}",
        m.vcpu, m.access.privilege, m.access.kind, m.va, m.what
    )
}

/// What the guest model sees of a simulator error. MMIO is handled by the callers.
fn op_error(e: GuestError) -> OpError {
    match e {
        GuestError::PageFault { va, code } => OpError::Fault(Fault::PageFault {
            va: va.raw(),
            code: code.bits(),
        }),
        GuestError::GeneralProtection => OpError::Fault(Fault::GeneralProtection),
        GuestError::InvalidOpcode => OpError::Fault(Fault::InvalidOpcode),
        GuestError::Mmio { gpa } => OpError::Backend(format!(
            "an instruction touched MMIO at {gpa} (the simulator has no devices)"
        )),
        GuestError::Engine(e) => engine_error(e),
    }
}

fn engine_error(e: EngineError) -> OpError {
    OpError::Backend(format!("engine: {e}"))
}

impl GuestOps for SimBackend {
    fn vcpus(&self) -> usize {
        self.vcpus
    }

    fn ram_frames(&self) -> u64 {
        self.ram_frames
    }

    fn load_image(&mut self, gpa: u64, data: &[u8]) -> Result<(), OpError> {
        let end = gpa
            .checked_add(data.len() as u64)
            .ok_or_else(|| OpError::Backend(format!("an image at {gpa:#x} wraps around")))?;
        if end > self.ram_frames.saturating_mul(PAGE_SIZE) {
            return Err(OpError::Backend(format!(
                "an image at {gpa:#x}..{end:#x} is outside guest RAM ({} frames)",
                self.ram_frames
            )));
        }
        if data.is_empty() {
            return Ok(());
        }
        let before = self.machine.engine_time();
        let result = self.machine.write_phys(Gpa::new(gpa), data);
        self.load_time += self.machine.engine_time().saturating_sub(before);
        result.map_err(op_error)
    }

    fn read(&mut self, vcpu: usize, va: u64, cpl: u8, buf: &mut [u8]) -> Result<(), OpError> {
        self.load(vcpu, va, cpl, buf, false)
    }

    fn write(&mut self, vcpu: usize, va: u64, cpl: u8, data: &[u8]) -> Result<(), OpError> {
        self.check_access(vcpu, va, data.len(), "store")?;
        let result = self
            .machine
            .write(vcpu, Gva::new(va), Privilege::of_cpl(cpl), data);
        self.tick();
        match result {
            // A store to MMIO goes nowhere.
            Err(GuestError::Mmio { .. }) => Ok(()),
            r => r.map_err(op_error),
        }
    }

    fn fetch(&mut self, vcpu: usize, va: u64, cpl: u8, buf: &mut [u8]) -> Result<(), OpError> {
        self.load(vcpu, va, cpl, buf, true)
    }

    /// An instruction that touches MMIO cannot complete without a device model: that is a
    /// backend error, not a guest fault.
    fn exec(&mut self, vcpu: usize, regs: &mut Regs) -> Result<(), OpError> {
        self.check_vcpu(vcpu)?;
        let result = self.machine.exec(vcpu, regs);
        self.tick();
        result.map_err(op_error)
    }

    fn set_control(&mut self, vcpu: usize, ctl: ControlState) -> Result<(), OpError> {
        self.check_vcpu(vcpu)?;
        let result = self.machine.set_paging(vcpu, ctl);
        self.tick();
        result.map_err(op_error)
    }

    fn set_cr3(&mut self, vcpu: usize, cr3: u64) -> Result<(), OpError> {
        self.check_vcpu(vcpu)?;
        let result = self.machine.set_cr3(vcpu, cr3);
        self.tick();
        result.map_err(op_error)
    }

    fn invlpg(&mut self, vcpu: usize, va: u64) -> Result<(), OpError> {
        self.check_vcpu(vcpu)?;
        let result = self.machine.invlpg(vcpu, Gva::new(va));
        self.tick();
        result.map_err(op_error)
    }

    fn event(&mut self, event: Event) {
        let traps = self.machine.traps().total();
        self.attribution.on_event(event, traps);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_access_charges_its_traps_to_the_fault_reported_inside_it() {
        let mut a = TrapAttribution::default();
        a.on_event(Event::UserAccess, 10);
        a.on_event(Event::DemandFault, 11);
        a.on_event(Event::UserAccessDone, 13);
        // An access with no fault reported is charged to nothing.
        a.on_event(Event::UserAccess, 13);
        a.on_event(Event::UserAccessDone, 20);
        a.on_event(Event::UserAccess, 20);
        a.on_event(Event::CowFault, 21);
        a.on_event(Event::UserAccessDone, 24);
        // A fault reported outside any access is not charged.
        a.on_event(Event::DemandFault, 30);
        a.on_event(Event::UserAccessDone, 40);
        assert_eq!(a.demand_fault_traps, 3);
        assert_eq!(a.cow_fault_traps, 4);
    }
}

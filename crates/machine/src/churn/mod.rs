//! `shadow2 check shadow`: random but reproducible guest page-table churn and accesses from
//! two vcpus, for one M-on-N pair, with the auditor and the hardware-cache check after every
//! step and the oracle on every access.
//!
//! The guest builds and edits its tables in its own memory; behaviours include recursive
//! self-maps (one page used as L1 and L2 at once, a Windows-style PAE self-map), PAE PDPTs
//! that are not page-aligned, superpages over page-table pages, tables freed and reused as
//! data, page-table writes through linear addresses (emulated), CR3 switches among many
//! processes, INVLPG, mode switches (SMP boot: one vcpu with paging off while the other
//! pages), a tiny pool that forces eviction, pool resizing, p2m changes, and log-dirty
//! enable/clean/disable with an exactness check.

mod guest;
mod rng;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};

use shadow2::addr::{Gfn, Gpa, Gva, Mfn};
use shadow2::audit::audit;
use shadow2::domain::{DomainConfig, EngineError};
use shadow2::host::MachineMemory;
use shadow2::multi::Pair;
use shadow2::p2m::P2mType;
use shadow2::paging::{
    Access, AccessKind, ControlState, PagingLevels, PhysMem, Privilege, bits, bits::cr,
};

pub use guest::{Guest, pte_store_forms};
pub use rng::Rng;

use crate::oracle;
use crate::sim::{GuestError, ShadowMachine, Traps};
use shadow2::emulate::{CodeMode, Regs};

/// What to run.
#[derive(Clone, Copy, Debug)]
pub struct ChurnConfig {
    /// The pair vcpu 0 runs in.
    pub pair: Pair,
    /// Operations to run.
    pub ops: u64,
    /// The seed.
    pub seed: u64,
    /// Run with the smallest pool the domain allows (eviction all the time).
    pub tiny_pool: bool,
}

/// What a run found.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ChurnReport {
    /// The pair ("4on4").
    pub pair: String,
    /// Operations run.
    pub ops: u64,
    /// Guest accesses (each checked by the oracle).
    pub accesses: u64,
    /// Audit violations found (summed over every audit), hardware-cache violations
    /// included.
    pub audit_violations: u64,
    /// Of those, entries of a vcpu's TLB or paging-structure caches that refer to what the
    /// domain may not reach (summed over every check).
    pub cache_violations: u64,
    /// Oracle mismatches.
    pub oracle_mismatches: u64,
    /// Pages written but missing from a log-dirty clean.
    pub lost_dirty_pages: u64,
    /// Log-dirty cleans checked.
    pub dirty_cleans: u64,
    /// The first problem, described.
    pub first_problem: Option<String>,
    /// Page-table writes done by guest instructions that the engine's emulator performed
    /// from the instruction bytes.
    pub instruction_emulations: u64,
    /// Traps by kind.
    pub traps: Traps,
    /// Shadows created and evictions.
    pub shadows_created: u64,
    /// Top-level shadows evicted.
    pub evictions: u64,
    /// Faults handled on the fast path.
    pub fast_path: u64,
    /// Unshadow operations.
    pub unshadows: u64,
    /// Peak pool use in pages.
    pub pool_peak_pages: usize,
    /// Hardware walks that started at a paging-structure-cache entry instead of the root.
    pub cached_walks: u64,
    /// Runs with out-of-sync shadows on (one of the two runs of a pair, see
    /// [`out_of_sync_for`]).
    pub out_of_sync_runs: u64,
    /// Pages that went out of sync.
    pub oos_unsyncs: u64,
    /// Out-of-sync pages brought back in sync, for any reason.
    pub oos_resyncs: u64,
    /// Shadow superpage entries written (guest superpages over contiguous backing mapped
    /// by one shadow entry).
    pub superpages_mapped: u64,
    /// Shadow superpage entries split (a frame of theirs became a page table, lost its
    /// mappings, or log-dirty mode began).
    pub superpage_splits: u64,
    /// Shadow entries a fill wrote ahead of a fault (L1 and splinter prefetch).
    pub prefetched: u64,
}

impl ChurnReport {
    fn problem(&mut self, what: String) {
        if self.first_problem.is_none() {
            self.first_problem = Some(what);
        }
    }
}

const RAM_FRAMES: u64 = 384;
/// A second RAM area, aligned to 4 MiB and one 4 MiB (two 2 MiB) long, backed by one aligned
/// run of machine frames: where guest superpages can be shadowed by shadow superpages.
const SUPERPAGE_RAM: core::ops::Range<u64> = 1024..2048;
/// Frames of [`SUPERPAGE_RAM`] the guest may also take as page tables (splitting the
/// superpages over them).
const SUPERPAGE_RAM_TABLES: [u64; 2] = [1024 + 7, 1024 + 700];
const MACHINE_FRAMES: u64 = 1 << 16;
const VCPUS: usize = 2;
const NORMAL_POOL: usize = 512;

/// The guest paging mode the tables are built in: the pair's, or for a 0-level pair the
/// shadow's (the second vcpu pages while the first runs with paging off).
pub fn table_levels(pair: Pair) -> PagingLevels {
    match pair.guest() {
        PagingLevels::Zero => pair.shadow(),
        g => g,
    }
}

/// A control state that pages in `levels` on `cr3`, its optional features (CR0.WP, PGE,
/// PSE, NXE, SMEP, SMAP, RFLAGS.AC) picked by `rng`.
pub fn paging_control(levels: PagingLevels, cr3: u64, rng: &mut Rng) -> ControlState {
    let wp = if rng.chance(95) { cr::CR0_WP } else { 0 };
    let pge = if rng.chance(50) { cr::CR4_PGE } else { 0 };
    let mut ctl = ControlState {
        cr0: cr::CR0_PE | cr::CR0_PG | wp,
        cr3,
        ..ControlState::default()
    };
    match levels {
        PagingLevels::Zero => ctl.cr0 = cr::CR0_PE,
        PagingLevels::Two => {
            ctl.cr4 = pge | if rng.chance(85) { cr::CR4_PSE } else { 0 };
        }
        PagingLevels::Three => {
            ctl.cr4 = cr::CR4_PAE | pge;
            ctl.efer = if rng.chance(85) { cr::EFER_NXE } else { 0 };
        }
        PagingLevels::Four => {
            ctl.cr4 = cr::CR4_PAE | pge;
            ctl.efer = cr::EFER_LME | cr::EFER_LMA | if rng.chance(85) { cr::EFER_NXE } else { 0 };
        }
    }
    if levels != PagingLevels::Zero && rng.chance(10) {
        ctl.cr4 |= cr::CR4_SMEP;
    }
    if levels != PagingLevels::Zero && wp != 0 && rng.chance(10) {
        ctl.cr4 |= cr::CR4_SMAP;
        if rng.chance(50) {
            ctl.rflags |= cr::RFLAGS_AC;
        }
    }
    ctl
}

/// The run's state.
struct Churn {
    m: ShadowMachine,
    guest: Guest,
    rng: Rng,
    pair: Pair,
    levels: PagingLevels,
    report: ChurnReport,
    /// Content digests of every RAM page at the last clean (log-dirty on).
    digests: Option<BTreeMap<u64, u64>>,
    /// Page-table frames ever (their A/D bits may be set by walks).
    pt_ever: BTreeSet<Gfn>,
    min_pool: usize,
    /// The machine frame behind the first frame of [`SUPERPAGE_RAM`] at boot: each frame
    /// of the area has its home there, where a p2m change moves it back.
    superpage_home: Option<Mfn>,
    /// Frames of [`SUPERPAGE_RAM`] away from home (a p2m change moved them).
    superpage_away: BTreeSet<u64>,
}

/// Whether a run has out-of-sync shadows on: odd seeds. `check shadow` runs each pair's
/// tiny-pool half with the next seed, so one of its two runs has them, whatever the seed.
pub fn out_of_sync_for(cfg: &ChurnConfig) -> bool {
    cfg.seed % 2 == 1
}

/// Runs one pair.
pub fn run(cfg: ChurnConfig) -> Result<ChurnReport, EngineError> {
    run_counted(cfg, &AtomicU64::new(0))
}

/// [`run`], adding one to `done` after each operation (a progress bar reads it from
/// another thread).
pub fn run_counted(cfg: ChurnConfig, done: &AtomicU64) -> Result<ChurnReport, EngineError> {
    let rng = Rng::new(cfg.seed ^ (cfg.pair as u64).wrapping_mul(0x1000_0001));
    run_observed(cfg, rng, done)
}

/// Runs one pair with the choices of `rng`: at most `cfg.ops` operations, fewer if a
/// byte-string source runs out first (a fuzzer's input, see [`Rng::from_bytes`]).
pub fn run_with(cfg: ChurnConfig, rng: Rng) -> Result<ChurnReport, EngineError> {
    run_observed(cfg, rng, &AtomicU64::new(0))
}

fn run_observed(cfg: ChurnConfig, rng: Rng, done: &AtomicU64) -> Result<ChurnReport, EngineError> {
    let mut churn = Churn::booted(cfg, rng)?;
    for _ in 0..cfg.ops {
        if churn.rng.exhausted() {
            break;
        }
        churn.step()?;
        churn.report.ops += 1;
        done.fetch_add(1, Ordering::Relaxed);
        let a = audit(churn.m.domain());
        if !a.is_clean() {
            churn.report.audit_violations += a.violations.len() as u64;
            churn.report.problem(format!(
                "audit after op {}: {:?}",
                churn.report.ops,
                a.violations.first()
            ));
        }
        let caches = churn.m.check_hardware_caches();
        if let Some(first) = caches.first() {
            churn.report.cache_violations += caches.len() as u64;
            churn.report.audit_violations += caches.len() as u64;
            churn.report.problem(format!(
                "hardware caches after op {}: {first}",
                churn.report.ops
            ));
        }
        if churn.report.first_problem.is_some() && churn.report.audit_violations > 1000 {
            break;
        }
    }
    Ok(churn.finish())
}

impl Churn {
    /// A machine with the guest's first processes, both vcpus paging (or not) as
    /// `cfg.pair` says.
    fn booted(cfg: ChurnConfig, mut rng: Rng) -> Result<Churn, EngineError> {
        let shadow = cfg.pair.shadow();
        let mut config = DomainConfig::hvm(shadow, VCPUS, NORMAL_POOL);
        // Internal mode (a hypervisor hole in the L4) on 64-bit shadows, every other seed.
        config.external = !(shadow == PagingLevels::Four && cfg.seed % 2 == 1);
        config.out_of_sync = out_of_sync_for(&cfg);
        let min_pool = config.min_pool_pages();
        if cfg.tiny_pool {
            config.pool_pages = min_pool;
        }
        let mut m = ShadowMachine::new(MACHINE_FRAMES, config)?;
        m.add_ram(Gfn::new(0), RAM_FRAMES)?;
        m.add_ram(
            Gfn::new(SUPERPAGE_RAM.start),
            SUPERPAGE_RAM.end - SUPERPAGE_RAM.start,
        )?;
        let levels = table_levels(cfg.pair);
        let mut guest = Guest::new(levels, RAM_FRAMES, true);
        guest.give_frames(SUPERPAGE_RAM_TABLES.iter().map(|&g| Gfn::new(g)));
        let mut churn = Churn {
            m,
            guest: Guest::new(levels, RAM_FRAMES, true),
            rng: Rng::new(0),
            pair: cfg.pair,
            levels,
            report: ChurnReport {
                pair: cfg.pair.name().into(),
                ..ChurnReport::default()
            },
            digests: None,
            pt_ever: BTreeSet::new(),
            min_pool,
            superpage_home: None,
            superpage_away: BTreeSet::new(),
        };
        for _ in 0..3 {
            guest.new_process(&mut churn.m, &mut rng);
        }
        churn.guest = guest;
        churn.rng = rng;
        churn.superpage_home = churn.m.ram_frame(Gfn::new(SUPERPAGE_RAM.start));
        churn.boot()?;
        Ok(churn)
    }

    fn boot(&mut self) -> Result<(), EngineError> {
        self.guarded(0, |c| c.guest.install_code(&mut c.m).map(|_| ()))?;
        let cr3 = self.guest.processes.first().map_or(0, |p| p.cr3);
        let main = paging_control(self.pair.guest(), cr3, &mut self.rng);
        let second = paging_control(self.levels, cr3, &mut self.rng);
        self.guarded(0, |c| c.m.set_paging(0, main))?;
        self.guarded(1, |c| c.m.set_paging(1, second))?;
        Ok(())
    }

    /// Runs a guest operation: guest-visible faults are fine (the oracle judged them),
    /// an engine failure is a problem.
    fn guarded(
        &mut self,
        _v: usize,
        op: impl FnOnce(&mut Churn) -> Result<(), GuestError>,
    ) -> Result<(), EngineError> {
        match op(self) {
            Ok(()) | Err(GuestError::PageFault { .. }) | Err(GuestError::GeneralProtection) => {
                Ok(())
            }
            Err(GuestError::Mmio { .. }) | Err(GuestError::InvalidOpcode) => Ok(()),
            Err(GuestError::Engine(e)) => {
                self.report
                    .problem(format!("engine error at op {}: {e}", self.report.ops));
                Err(e)
            }
        }
    }

    fn vcpu_levels(&self, v: usize) -> PagingLevels {
        self.m.guest_control(v).levels()
    }

    fn step(&mut self) -> Result<(), EngineError> {
        let roll = self.rng.below(1000);
        let done = match roll {
            0..=519 => self.op_access(),
            520..=689 => self.op_map(),
            690..=759 => self.op_unmap(),
            760..=799 => self.op_write_pte_linear(),
            800..=839 => self.op_switch_cr3(),
            840..=859 => self.op_invlpg(),
            860..=879 => self.op_recycle_table(),
            880..=889 => self.op_self_map(),
            890..=904 => self.op_mode_switch(),
            905..=914 => self.op_pool_resize(),
            915..=939 => self.op_log_dirty(),
            _ => self.op_p2m_change(),
        };
        self.note_guest_writes();
        done
    }

    /// What the guest's accesses wrote, as the machine saw them: an instruction whose
    /// bytes the guest overwrote writes where those bytes say, not where the guest meant.
    fn note_guest_writes(&mut self) {
        self.guest.written.extend(self.m.take_written());
    }

    fn op_access(&mut self) -> Result<(), EngineError> {
        let v = self.rng.below(VCPUS as u64) as usize;
        let va = if self.vcpu_levels(v) == PagingLevels::Zero {
            // Frame 0 holds the kernel's code.
            (4096 + self.rng.below((RAM_FRAMES + 7) * 4096)) & !7
        } else {
            self.guest.random_va(&mut self.rng)
        };
        let kind = match self.rng.below(100) {
            0..=44 => AccessKind::Read,
            45..=84 => AccessKind::Write,
            _ => AccessKind::Fetch,
        };
        let privilege = if self.rng.chance(50) {
            Privilege::User
        } else {
            Privilege::Supervisor
        };
        let value = self.rng.next_u64();
        self.access(v, Gva::new(va), kind, privilege, value)
    }

    fn access(
        &mut self,
        v: usize,
        va: Gva,
        kind: AccessKind,
        privilege: Privilege,
        value: u64,
    ) -> Result<(), EngineError> {
        let ctl = self.m.guest_control(v);
        let target = oracle::guest_walk(self.m.domain(), &ctl, va, Access::new(kind, privilege))
            .ok()
            .map(|t| t.frame);
        let mut buf = [0u8; 8];
        self.guarded(v, |c| match kind {
            AccessKind::Read => c.m.read(v, va, privilege, &mut buf),
            AccessKind::Fetch => c.m.fetch(v, va, privilege, &mut buf),
            AccessKind::Write => c.m.write(v, va, privilege, &value.to_le_bytes()),
        })?;
        if kind == AccessKind::Write
            && let Some(gfn) = target
        {
            self.guest.written.insert(gfn);
            if self.guest.page_tables.contains(&gfn) {
                // A correct guest flushes after editing its tables.
                self.m.flush_all_tlbs();
            }
        }
        Ok(())
    }

    fn paging_process(&self, v: usize) -> Option<guest::Process> {
        let cr3 = self.m.guest_control(v).cr3;
        self.guest.processes.iter().find(|p| p.cr3 == cr3).copied()
    }

    fn random_process(&mut self) -> Option<guest::Process> {
        let n = self.guest.processes.len() as u64;
        let i = self.rng.below(n) as usize;
        self.guest.processes.get(i).copied()
    }

    /// After editing an entry: a leaf change needs INVLPG of that address on every vcpu;
    /// an upper one a full flush (and for a PAE PDPTE, a CR3 reload).
    fn after_edit(
        &mut self,
        va: u64,
        upper: bool,
        pdpte_of: Option<u64>,
    ) -> Result<(), EngineError> {
        if upper {
            self.m.flush_all_tlbs();
        } else {
            for v in 0..VCPUS {
                self.guarded(v, |c| c.m.invlpg(v, Gva::new(va)))?;
            }
        }
        if let Some(cr3) = pdpte_of {
            for v in 0..VCPUS {
                if self.m.guest_control(v).cr3 == cr3 && self.vcpu_levels(v) == PagingLevels::Three
                {
                    self.guarded(v, |c| c.m.set_cr3(v, cr3))?;
                }
            }
        }
        Ok(())
    }

    fn op_map(&mut self) -> Result<(), EngineError> {
        let Some(p) = self.random_process() else {
            return Ok(());
        };
        let superpage = self.rng.chance(10);
        let level = if superpage { 2 } else { 1 };
        let va = self.guest.random_va(&mut self.rng) & !0xfff;
        let Some((addr, upper)) = self
            .guest
            .ensure_path(&mut self.m, &mut self.rng, &p, va, level)
        else {
            return Ok(());
        };
        let frames_per_superpage = if self.levels == PagingLevels::Two {
            1024
        } else {
            512
        };
        let mut target = self.guest.random_target(&mut self.rng);
        if superpage {
            target &= !(frames_per_superpage - 1);
            if self.rng.chance(50) {
                // Over the aligned RAM area: shadow superpages where nothing forbids them.
                let per_area = (SUPERPAGE_RAM.end - SUPERPAGE_RAM.start) / frames_per_superpage;
                target =
                    SUPERPAGE_RAM.start + self.rng.below(per_area.max(1)) * frames_per_superpage;
            }
        } else if self.rng.chance(3) {
            target = SUPERPAGE_RAM.start + self.rng.below(SUPERPAGE_RAM.end - SUPERPAGE_RAM.start);
        }
        let flags = self.guest.random_leaf_flags(&mut self.rng, superpage);
        let value = (target << 12) | flags;
        self.guarded(0, |c| c.guest.write_entry_phys(&mut c.m, addr, value))?;
        self.note_tables();
        if self.guest.mapped.len() < 256 {
            self.guest.mapped.push(va);
        } else {
            let i = self.rng.below(256) as usize;
            self.guest.mapped[i] = va;
        }
        let pdpte = (upper && self.levels == PagingLevels::Three).then_some(p.cr3);
        self.after_edit(va, upper || superpage, pdpte)
    }

    fn op_unmap(&mut self) -> Result<(), EngineError> {
        let Some(p) = self.random_process() else {
            return Ok(());
        };
        let va = self.guest.random_va(&mut self.rng) & !0xfff;
        let Some((addr, upper)) = self
            .guest
            .ensure_path(&mut self.m, &mut self.rng, &p, va, 1)
        else {
            return Ok(());
        };
        let old = self.guest.read_entry(&self.m, addr);
        let value = match self.rng.below(3) {
            0 => 0,
            1 => old & !bits::RW,
            _ => old & !(bits::A | bits::D),
        };
        self.guarded(0, |c| c.guest.write_entry_phys(&mut c.m, addr, value))?;
        let pdpte = (upper && self.levels == PagingLevels::Three).then_some(p.cr3);
        self.after_edit(va, upper, pdpte)
    }

    /// A kernel editing a PTE through its self-map: the write faults on the read-only
    /// shadow of the page table and is emulated.
    fn op_write_pte_linear(&mut self) -> Result<(), EngineError> {
        let v = self.rng.below(VCPUS as u64) as usize;
        if self.vcpu_levels(v) != self.levels {
            return Ok(());
        }
        let va = self.guest.random_va(&mut self.rng) & !0xfff;
        let Some(pte_va) = self.guest.self_map_va(va, 1) else {
            return Ok(());
        };
        let target = self.guest.random_target(&mut self.rng);
        let value = (target << 12) | self.guest.random_leaf_flags(&mut self.rng, false);
        let ctl = self.m.guest_control(v);
        let access = Access::new(AccessKind::Write, Privilege::Supervisor);
        let walked = oracle::guest_walk(self.m.domain(), &ctl, pte_va, access).ok();
        // The entry's current value (what CMPXCHG expects), when the guest can see it.
        let mut old = [0u8; 8];
        if let Some(t) = walked {
            let _ = self
                .m
                .read_phys(t.addr, &mut old[..self.guest.shape.entry_bytes as usize]);
        }
        let old = u64::from_le_bytes(old);
        let forms = guest::pte_store_forms(self.levels).len() as u64;
        let form = self.rng.below(forms);
        let mut regs = Regs::new(if self.levels == PagingLevels::Four {
            CodeMode::Bits64
        } else {
            CodeMode::Bits32
        });
        regs.rip = self.guest.code_va() + guest::CODE_STRIDE * form;
        regs.gpr[Regs::RDI] = pte_va.raw();
        regs.gpr[Regs::RAX] = value;
        regs.gpr[Regs::RDX] = value;
        if self.levels == PagingLevels::Three && form == 0 {
            regs.gpr[Regs::RAX] = old & 0xffff_ffff;
            regs.gpr[Regs::RDX] = old >> 32;
            regs.gpr[Regs::RBX] = value & 0xffff_ffff;
            regs.gpr[Regs::RCX] = value >> 32;
        } else if form == 2 {
            regs.gpr[Regs::RAX] = if self.rng.chance(80) { old } else { !old };
        } else if form == 4 {
            regs.gpr[Regs::RAX] = self.rng.below(8);
        }
        if self.levels != PagingLevels::Four {
            for r in &mut regs.gpr {
                *r &= 0xffff_ffff;
            }
        }
        self.exec_kernel_store(v, regs)
    }

    /// Runs the store instruction at `regs.rip` on vcpu `v` (what it writes is what its
    /// bytes say: the guest may have overwritten its own code page).
    fn exec_kernel_store(&mut self, v: usize, mut regs: Regs) -> Result<(), EngineError> {
        let emulated = self.m.traps().emulated_writes;
        self.guarded(v, |c| c.m.exec(v, &mut regs))?;
        if self.m.traps().emulated_writes > emulated {
            self.report.instruction_emulations += 1;
        }
        self.m.flush_all_tlbs();
        Ok(())
    }

    fn op_switch_cr3(&mut self) -> Result<(), EngineError> {
        let v = self.rng.below(VCPUS as u64) as usize;
        if self.vcpu_levels(v) == PagingLevels::Zero {
            return Ok(());
        }
        if self.guest.processes.len() < 12 && self.rng.chance(20) {
            self.guest.new_process(&mut self.m, &mut self.rng);
            self.note_tables();
        }
        let Some(p) = self.random_process() else {
            return Ok(());
        };
        self.guarded(v, |c| c.m.set_cr3(v, p.cr3))
    }

    fn op_invlpg(&mut self) -> Result<(), EngineError> {
        let v = self.rng.below(VCPUS as u64) as usize;
        let va = self.guest.random_va(&mut self.rng);
        self.guarded(v, |c| c.m.invlpg(v, Gva::new(va)))
    }

    /// Unlinks an L1 table and reuses its page as data.
    fn op_recycle_table(&mut self) -> Result<(), EngineError> {
        let Some(p) = self.random_process() else {
            return Ok(());
        };
        let va = self.guest.random_va(&mut self.rng) & !0xfff;
        let Some((addr, _)) = self
            .guest
            .ensure_path(&mut self.m, &mut self.rng, &p, va, 2)
        else {
            return Ok(());
        };
        let entry = self.guest.read_entry(&self.m, addr);
        if entry & bits::P == 0 || entry & bits::PS != 0 {
            return Ok(());
        }
        let table = Gfn::new((entry & self.guest.shape.addr_mask()) >> 12);
        if table.raw() >= RAM_FRAMES {
            return Ok(());
        }
        self.guarded(0, |c| c.guest.write_entry_phys(&mut c.m, addr, 0))?;
        self.m.flush_all_tlbs();
        let junk: Vec<u8> = (0..64).map(|_| self.rng.next_u64() as u8).collect();
        let offset = self.rng.below(4096 / 64) * 64;
        self.guest.written.insert(table);
        self.guarded(0, |c| {
            c.m.write_phys(Gpa::new(table.base().raw() + offset), &junk)
        })?;
        self.guest.page_tables.remove(&table);
        self.guest.free.push(table);
        self.m.flush_all_tlbs();
        Ok(())
    }

    fn op_self_map(&mut self) -> Result<(), EngineError> {
        let Some(p) = self.random_process() else {
            return Ok(());
        };
        self.guest.install_self_map(&mut self.m, &mut self.rng, &p);
        self.note_tables();
        self.m.flush_all_tlbs();
        let pdpte = (self.levels == PagingLevels::Three).then_some(p.cr3);
        self.after_edit(0, true, pdpte)
    }

    /// Vcpu 1 turns paging off or on (SMP boot); vcpu 0 changes a paging flag (CR4.PSE,
    /// EFER.NXE, CR0.WP, SMEP/SMAP) within its pair's mode.
    fn op_mode_switch(&mut self) -> Result<(), EngineError> {
        let v = self.rng.below(VCPUS as u64) as usize;
        let Some(p) = self
            .paging_process(v)
            .or_else(|| self.guest.processes.first().copied())
        else {
            return Ok(());
        };
        let levels = if v == 0 {
            self.pair.guest()
        } else if self.vcpu_levels(1) == PagingLevels::Zero {
            self.levels
        } else {
            PagingLevels::Zero
        };
        let ctl = paging_control(levels, p.cr3, &mut self.rng);
        self.guarded(v, |c| c.m.set_paging(v, ctl))
    }

    fn op_pool_resize(&mut self) -> Result<(), EngineError> {
        let target = self.min_pool + self.rng.below(3 * self.min_pool as u64) as usize;
        let resized = self.m.host_op(|d| d.set_pool_size(target).map(|f| ((), f)));
        match resized {
            Ok(()) => Ok(()),
            Err(EngineError::BadArgument(_)) => Ok(()),
            Err(e) => {
                self.report.problem(format!("pool resize failed: {e}"));
                Err(e)
            }
        }
    }

    fn digest_ram(&self) -> BTreeMap<u64, u64> {
        let mut out = BTreeMap::new();
        let mut page = vec![0u8; 4096];
        for g in (0..RAM_FRAMES).chain(SUPERPAGE_RAM) {
            // What `read_phys` of the whole page reads, frame by frame rather than word by
            // word: RAM only, and nothing outside machine memory.
            let Some(mfn) = self.m.ram_frame(Gfn::new(g)) else {
                continue;
            };
            if self
                .m
                .domain()
                .host()
                .read_bytes(mfn.base(), &mut page)
                .is_ok()
            {
                out.insert(g, page_fnv1a(&page));
            }
        }
        out
    }

    fn op_log_dirty(&mut self) -> Result<(), EngineError> {
        if !self.m.domain().log_dirty_enabled() {
            if self.rng.chance(40) {
                self.enable_log_dirty()?;
            }
            return Ok(());
        }
        if self.rng.chance(15) {
            self.m.domain_mut().disable_log_dirty();
            self.digests = None;
            return Ok(());
        }
        self.clean_and_check()
    }

    fn enable_log_dirty(&mut self) -> Result<(), EngineError> {
        self.m.host_op(|d| d.enable_log_dirty().map(|f| ((), f)))?;
        self.digests = Some(self.digest_ram());
        self.guest.written.clear();
        Ok(())
    }

    /// Cleans the dirty log and holds it to what changed and what the guest wrote: a
    /// page whose content changed must be reported; a page reported must have been
    /// written (or be a page table, whose A/D bits walks set).
    fn clean_and_check(&mut self) -> Result<(), EngineError> {
        let bitmap = self.m.host_op(|d| d.clean_dirty())?;
        self.report.dirty_cleans += 1;
        let now = self.digest_ram();
        if let Some(before) = &self.digests {
            for (g, h) in &now {
                if before.get(g) != Some(h) && !bitmap.contains(Gfn::new(*g)) {
                    self.report.lost_dirty_pages += 1;
                    self.report.problem(format!(
                        "log-dirty lost a write to gfn {g:#x} at op {}",
                        self.report.ops
                    ));
                }
            }
        }
        for g in bitmap.iter() {
            let unchanged =
                self.digests.as_ref().and_then(|d| d.get(&g.raw())) == now.get(&g.raw());
            if unchanged && !self.guest.written.contains(&g) && !self.pt_ever.contains(&g) {
                self.report.lost_dirty_pages += 1;
                self.report.problem(format!(
                    "log-dirty reports gfn {g} that nothing wrote, at op {}",
                    self.report.ops
                ));
            }
        }
        self.digests = Some(now);
        self.guest.written.clear();
        Ok(())
    }

    /// Moves a guest frame to a new machine frame (content copied), as page migration or
    /// sharing does: every shadow mapping and shadow of the old frame must go.
    fn op_p2m_change(&mut self) -> Result<(), EngineError> {
        let gfn = if self.rng.chance(25) {
            // Inside the aligned area: splits its superpages and leaves the area
            // non-contiguous, until the frame is moved back home (mostly next time).
            match self.superpage_away.first() {
                Some(&away) if self.rng.chance(75) => Gfn::new(away),
                _ => Gfn::new(
                    SUPERPAGE_RAM.start + self.rng.below(SUPERPAGE_RAM.end - SUPERPAGE_RAM.start),
                ),
            }
        } else {
            Gfn::new(1 + self.rng.below(RAM_FRAMES - 1))
        };
        let Some(old) = self.m.ram_frame(gfn) else {
            return Ok(());
        };
        // A frame of the aligned area away from home goes back (the area is contiguous
        // again); its home frame stays with the area while it is away.
        let home = SUPERPAGE_RAM
            .contains(&gfn.raw())
            .then_some(self.superpage_home)
            .flatten()
            .map(|h| Mfn::new(h.raw() + gfn.raw() - SUPERPAGE_RAM.start));
        let new = match home {
            Some(h) if h != old => Some(h),
            _ => self.m.domain_mut().host_mut().alloc_block(0),
        };
        let Some(new) = new else {
            return Ok(());
        };
        for i in 0..512u64 {
            let host = self.m.domain_mut().host_mut();
            let word = host.read_u64(shadow2::addr::Maddr::new(old.base().raw() + 8 * i))?;
            host.write_u64(shadow2::addr::Maddr::new(new.base().raw() + 8 * i), word)?;
        }
        self.m
            .host_op(|d| d.set_p2m(gfn, Some((new, P2mType::Ram))).map(|f| ((), f)))?;
        if home != Some(old) {
            self.m.domain_mut().host_mut().free_block(old, 0);
        }
        if home.is_some_and(|h| h != new) {
            self.superpage_away.insert(gfn.raw());
        } else {
            self.superpage_away.remove(&gfn.raw());
        }
        Ok(())
    }

    fn note_tables(&mut self) {
        self.pt_ever.extend(self.guest.page_tables.iter().copied());
    }

    fn finish(mut self) -> ChurnReport {
        let (count, list) = self.m.mismatches();
        self.report.oracle_mismatches = count;
        if let Some(first) = list.first() {
            self.report.problem(format!("oracle: {first:?}"));
        }
        self.report.accesses = self.m.accesses();
        self.report.traps = self.m.traps();
        let stats = self.m.domain().stats();
        self.report.shadows_created = stats.shadows_created;
        self.report.superpages_mapped = stats.superpages_mapped;
        self.report.prefetched = stats.prefetched;
        self.report.superpage_splits = stats.superpage_splits;
        self.report.evictions = stats.evictions;
        self.report.fast_path = stats.fast_path;
        self.report.unshadows = stats.unshadows;
        self.report.pool_peak_pages = self.m.domain().pool().peak_used_pages();
        let oos = self.m.domain().out_of_sync_stats();
        self.report.out_of_sync_runs = u64::from(self.m.domain().config().out_of_sync);
        self.report.oos_unsyncs = oos.unsyncs;
        self.report.oos_resyncs = oos.resyncs();
        self.report.cached_walks = (0..VCPUS)
            .filter_map(|v| self.m.cpu(v))
            .map(|cpu| cpu.psc().stats().hits)
            .sum();
        self.report
    }
}

/// FNV-1a of a page, byte by byte; eight zero bytes only multiply by the prime's 8th power,
/// done in one step.
fn page_fnv1a(page: &[u8]) -> u64 {
    const PRIME: u64 = 0x100_0000_01b3;
    let prime_pow8 = (0..8).fold(1u64, |p, _| p.wrapping_mul(PRIME));
    let byte = |h: u64, b: &u8| (h ^ u64::from(*b)).wrapping_mul(PRIME);
    let mut words = page.chunks_exact(8);
    let mut h = (&mut words).fold(0xcbf2_9ce4_8422_2325u64, |h, word| {
        if word == [0u8; 8] {
            h.wrapping_mul(prime_pow8)
        } else {
            word.iter().fold(h, byte)
        }
    });
    h = words.remainder().iter().fold(h, byte);
    h
}

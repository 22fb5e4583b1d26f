//! Multi-access scenarios the flag matrix cannot express: tables shared or aliased between
//! addresses, and control registers changing between accesses. Each access of a scenario is
//! one checked case (walker against rules), counted in the matrix totals. The scenarios are
//! the ones access.c adds after its main loop (each once a KVM bug), plus aliasing of
//! upper-level tables.

use serde::Serialize;
use shadow2::paging::bits::{self, cr};
use shadow2::paging::{Access, AccessKind, ControlState, CpuFeatures, Privilege};

use super::arena::ArenaMem;
use super::check::{Agreed, Probe, check_access};
use super::flags::{CpuFlags, MatrixMode};

/// The counts of one scenario family in one mode.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ScenarioReport {
    /// Scenario name.
    pub name: &'static str,
    /// Paging mode.
    pub mode: MatrixMode,
    /// Accesses checked.
    pub cases: u64,
    /// Accesses where walker and rules disagree.
    pub mismatches: u64,
    /// The first few disagreements.
    #[serde(skip)]
    pub first_mismatches: Vec<String>,
}

impl ScenarioReport {
    /// An empty tally.
    pub fn new(name: &'static str, mode: MatrixMode) -> ScenarioReport {
        ScenarioReport {
            name,
            mode,
            cases: 0,
            mismatches: 0,
            first_mismatches: Vec::new(),
        }
    }
}

/// How many disagreements a scenario report keeps.
const KEPT: usize = 4;

/// A scenario under way: a mode, registers, memory, and the tally.
#[derive(Debug)]
pub struct Scene {
    mode: MatrixMode,
    /// Control registers (tests and scenarios change them between accesses).
    pub ctl: ControlState,
    feat: CpuFeatures,
    /// The memory the tables live in.
    pub mem: ArenaMem,
    report: ScenarioReport,
}

const P: u64 = bits::P;
const W: u64 = bits::RW;
const U: u64 = bits::US;
const PS: u64 = bits::PS;
const URW: u64 = P | W | U;
/// Where every data page of the scenarios lives (1 GiB aligned).
const DATA: u64 = 0x4000_0000;

impl Scene {
    /// A scene with no tables: CR3 at 0x1000 and the registers `cpu` gives.
    pub fn new(name: &'static str, mode: MatrixMode, cpu: CpuFlags) -> Scene {
        let mut ctl = cpu.control(mode);
        ctl.cr3 = 0x1000;
        Scene {
            mode,
            ctl,
            feat: cpu.features(),
            mem: ArenaMem::new(),
            report: ScenarioReport::new(name, mode),
        }
    }

    /// The number of paging levels.
    fn top(&self) -> u8 {
        self.mode.levels().count()
    }

    /// Where the entry for `va` sits in the level-`level` table at `table`.
    pub fn slot(&self, table: u64, va: u64, level: u8) -> u64 {
        let (shift, mask, bytes) = match self.mode {
            MatrixMode::TwoLevel => (12 + 10 * u32::from(level - 1), 0x3ff, 4),
            MatrixMode::Pae if level == 3 => (30, 0x3, 8),
            _ => (12 + 9 * u32::from(level - 1), 0x1ff, 8),
        };
        table + ((va >> shift) & mask) * bytes
    }

    /// Writes an entry (4 or 8 bytes as the mode has them). A PAE PDPTE also goes into the
    /// PDPTE registers, as a CR3 reload would put it there.
    pub fn put(&mut self, addr: u64, value: u64) {
        let stored = if self.mode.wide() {
            self.mem.poke(addr, value)
        } else {
            self.mem.poke_u32(addr, value as u32)
        };
        if !stored {
            self.report.mismatches += 1;
            self.report
                .first_mismatches
                .push(format!("{}: tables exceed the arena", self.report.name));
        }
        let pdpte_register = (addr.wrapping_sub(0x1000) / 8) as usize;
        if self.mode == MatrixMode::Pae
            && (0x1000..0x1020).contains(&addr)
            && let Some(slot) = self.ctl.pdptes.get_mut(pdpte_register)
        {
            *slot = value;
        }
    }

    /// Reads an entry back.
    pub fn get(&self, addr: u64) -> u64 {
        let word = self.mem.peek(addr).unwrap_or(0);
        if self.mode.wide() {
            word
        } else {
            (word >> ((addr & 4) * 8)) & 0xffff_ffff
        }
    }

    /// Maps `va` with fresh tables below the top-level table (one page per level at
    /// `first_table`, `first_table + 0x1000`, ...), `upper` rights on the non-leaf entries,
    /// and `leaf` (already holding its address) at `leaf_level`. Returns the path.
    pub fn map(
        &mut self,
        va: u64,
        first_table: u64,
        upper: u64,
        leaf_level: u8,
        leaf: u64,
    ) -> Vec<u64> {
        let mut path = Vec::new();
        let mut table = self.ctl.cr3 & !0xfff;
        let mut next = first_table;
        for level in (leaf_level..=self.top()).rev() {
            let slot = self.slot(table, va, level);
            path.push(slot);
            if level == leaf_level {
                self.put(slot, leaf);
            } else {
                let rights = if self.mode == MatrixMode::Pae && level == 3 {
                    P
                } else {
                    upper
                };
                self.put(slot, next | rights);
                table = next;
                next += 0x1000;
            }
        }
        path
    }

    /// Checks one access along `path` and counts it; returns what walker and rules agreed
    /// on, or `None` after a disagreement.
    pub fn access(&mut self, va: u64, path: &[u64], access: Access) -> Option<Agreed> {
        self.report.cases += 1;
        let probe = Probe {
            mode: self.mode,
            ctl: &self.ctl,
            feat: &self.feat,
            va,
            path,
            access,
        };
        match check_access(&mut self.mem, &probe) {
            Ok(agreed) => Some(agreed),
            Err(e) => {
                self.report.mismatches += 1;
                if self.report.first_mismatches.len() < KEPT {
                    let where_ = format!("{} ({}) at {va:#x}", self.report.name, self.mode);
                    self.report.first_mismatches.push(format!("{where_}: {e}"));
                }
                None
            }
        }
    }

    /// The tally so far.
    pub fn report(&self) -> &ScenarioReport {
        &self.report
    }

    fn into_report(self) -> ScenarioReport {
        self.report
    }
}

fn cpu(nxe: bool, wp: bool) -> CpuFlags {
    CpuFlags {
        maxphyaddr: 48,
        nxe,
        wp,
        pse: true,
        ..CpuFlags::default()
    }
}

const fn acc(kind: AccessKind, privilege: Privilege) -> Access {
    Access::new(kind, privilege)
}

const READ: AccessKind = AccessKind::Read;
const WRITE: AccessKind = AccessKind::Write;
const FETCH: AccessKind = AccessKind::Fetch;
const USER: Privilege = Privilege::User;
const SUP: Privilege = Privilege::Supervisor;
const IMPLICIT: Privilege = Privilege::Implicit;

/// The eight accesses (implicit accesses are never fetches).
const ACCESSES: [Access; 8] = [
    acc(READ, USER),
    acc(WRITE, USER),
    acc(FETCH, USER),
    acc(READ, SUP),
    acc(WRITE, SUP),
    acc(FETCH, SUP),
    acc(READ, IMPLICIT),
    acc(WRITE, IMPLICIT),
];

/// The large-page size of a mode.
fn large(mode: MatrixMode) -> u64 {
    if mode.wide() { 1 << 21 } else { 1 << 22 }
}

/// A linear address whose indices are all non-zero (upper half in 4-level paging).
fn base_va(mode: MatrixMode) -> u64 {
    match mode {
        MatrixMode::FourLevel => 0xffff_9234_4000_0000 | (0x0b << 21) | 0x1a_5123,
        MatrixMode::Pae => 0x8000_0000 | (0x0b << 21) | 0x1a_5123,
        MatrixMode::TwoLevel => 0xd000_0000 | 0x1a_5123,
    }
}

/// Two PDEs map the same large frame, one read-only and one writable: each alias keeps its
/// own rights and its own A/D bits (access.c's corrupt_hugepage_trigger and
/// check_large_pte_dirty_for_nowp).
pub fn aliased_large_pages(mode: MatrixMode) -> ScenarioReport {
    let mut total = ScenarioReport::new("aliased large pages", mode);
    for wp in [false, true] {
        for who in [USER, SUP, IMPLICIT] {
            let scene = aliased_large_pages_once(mode, wp, who);
            merge(&mut total, scene.into_report());
        }
    }
    total
}

/// One run of [`aliased_large_pages`]; the scene is returned for inspection.
pub fn aliased_large_pages_once(mode: MatrixMode, wp: bool, who: Privilege) -> Scene {
    let mut s = Scene::new("aliased large pages", mode, cpu(true, wp));
    let ro_va = base_va(mode);
    let rw_va = ro_va + large(mode);
    let ro = s.map(ro_va, 0x2000, URW, 2, DATA | P | U | PS);
    let rw = s.map(rw_va, 0x2000, URW, 2, DATA | URW | PS);
    for (va, path, kind) in [
        (ro_va, &ro, READ),
        (rw_va, &rw, READ),
        (rw_va, &rw, WRITE),
        (ro_va, &ro, WRITE),
        (ro_va, &ro, READ),
        (rw_va, &rw, WRITE),
    ] {
        s.access(va, path, acc(kind, who));
    }
    s
}

/// A neighbouring PTE with XD set (a reserved bit without EFER.NXE) does not affect an
/// access through its neighbour in the same table (access.c's check_pfec_on_prefetch_pte).
pub fn nx_neighbour(mode: MatrixMode) -> ScenarioReport {
    let mut total = ScenarioReport::new("XD neighbour PTE", mode);
    if !mode.wide() {
        return total;
    }
    for nxe in [false, true] {
        for access in ACCESSES {
            let s = nx_neighbour_once(mode, nxe, access).0;
            merge(&mut total, s.into_report());
        }
    }
    total
}

/// One run of [`nx_neighbour`]: what the access to the plain page and then the access to
/// its XD neighbour gave.
pub fn nx_neighbour_once(
    mode: MatrixMode,
    nxe: bool,
    access: Access,
) -> (Scene, Option<Agreed>, Option<Agreed>) {
    let mut s = Scene::new("XD neighbour PTE", mode, cpu(nxe, true));
    let va = base_va(mode);
    let neighbour_va = va + 0x1000;
    let path = s.map(va, 0x2000, URW, 1, DATA | URW);
    let mut neighbour_path = path.clone();
    if let Some(last) = neighbour_path.last_mut() {
        *last += 8;
        s.put(*last, (DATA + 0x1000) | URW | bits::NX);
    }
    let plain = s.access(va, &path, access);
    let neighbour = s.access(neighbour_va, &neighbour_path, access);
    (s, plain, neighbour)
}

/// With CR0.WP=0 a supervisor write to a read-only large page succeeds and sets its D bit
/// (access.c's check_large_pte_dirty_for_nowp); user writes still fault.
pub fn large_page_dirty_without_wp(mode: MatrixMode) -> ScenarioReport {
    let mut total = ScenarioReport::new("large-page D with WP=0", mode);
    for user_page in [false, true] {
        for initial in [0, bits::A, bits::A | bits::D] {
            for who in [SUP, IMPLICIT, USER] {
                let mut s = Scene::new("large-page D with WP=0", mode, cpu(true, false));
                let va = base_va(mode);
                let leaf = DATA | P | PS | initial | if user_page { U } else { 0 };
                let path = s.map(va, 0x2000, URW, 2, leaf);
                s.access(va, &path, acc(WRITE, who));
                s.access(va, &path, acc(READ, who));
                merge(&mut total, s.into_report());
            }
        }
    }
    total
}

/// SMEP with CR0.WP=0: a supervisor write to a read-only user page succeeds, and a
/// supervisor fetch from it still faults (access.c's check_smep_andnot_wp).
pub fn smep_without_wp(mode: MatrixMode) -> ScenarioReport {
    let mut total = ScenarioReport::new("SMEP with WP=0", mode);
    for nxe in [false, true] {
        let s = smep_without_wp_once(mode, nxe).0;
        merge(&mut total, s.into_report());
    }
    total
}

/// One run of [`smep_without_wp`]: the outcomes of supervisor write, supervisor fetch,
/// user fetch, supervisor read.
pub fn smep_without_wp_once(mode: MatrixMode, nxe: bool) -> (Scene, Vec<Option<Agreed>>) {
    let mut flags = cpu(nxe, false);
    flags.smep = true;
    let mut s = Scene::new("SMEP with WP=0", mode, flags);
    let va = base_va(mode);
    let path = s.map(va, 0x2000, URW, 1, DATA | P | U);
    let outcomes = [
        acc(WRITE, SUP),
        acc(FETCH, SUP),
        acc(FETCH, USER),
        acc(READ, SUP),
    ]
    .into_iter()
    .map(|a| s.access(va, &path, a))
    .collect();
    (s, outcomes)
}

/// CR0.WP toggled between accesses to the same read-only page: each access obeys the
/// current WP (access.c's check_toggle_cr0_wp).
pub fn toggle_wp(mode: MatrixMode) -> ScenarioReport {
    let mut total = ScenarioReport::new("toggle CR0.WP", mode);
    for user_page in [false, true] {
        for start_wp in [false, true] {
            let s = toggle_wp_once(mode, user_page, start_wp).0;
            merge(&mut total, s.into_report());
        }
    }
    total
}

/// One run of [`toggle_wp`]: (WP, outcome of a supervisor write) for each step.
pub fn toggle_wp_once(
    mode: MatrixMode,
    user_page: bool,
    start_wp: bool,
) -> (Scene, Vec<(bool, Option<Agreed>)>) {
    let mut s = Scene::new("toggle CR0.WP", mode, cpu(true, start_wp));
    let va = base_va(mode);
    let u = if user_page { U } else { 0 };
    let path = s.map(va, 0x2000, URW, 1, DATA | P | u | bits::A);
    let mut steps = Vec::new();
    let mut wp = start_wp;
    for _ in 0..4 {
        s.ctl.cr0 = if wp {
            s.ctl.cr0 | cr::CR0_WP
        } else {
            s.ctl.cr0 & !cr::CR0_WP
        };
        let write = s.access(va, &path, acc(WRITE, SUP));
        s.access(va, &path, acc(WRITE, USER));
        s.access(va, &path, acc(READ, SUP));
        steps.push((wp, write));
        wp = !wp;
    }
    (s, steps)
}

/// Two upper-level entries, one writable user and one read-only supervisor, reference the
/// same lower table: the same PTE gives different effective rights through each (access.c's
/// check_effective_sp_permissions). The shared level is the PDPT in 4-level paging and the
/// PD in PAE and 2-level paging (PAE PDPTEs carry no rights).
pub fn shared_lower_table(mode: MatrixMode) -> ScenarioReport {
    let mut total = ScenarioReport::new("shared lower table", mode);
    for wp in [false, true] {
        for access in ACCESSES {
            let s = shared_lower_table_once(mode, wp, access).0;
            merge(&mut total, s.into_report());
        }
    }
    total
}

/// One run of [`shared_lower_table`]: the outcomes through the RW/user path and through
/// the RO/supervisor path.
pub fn shared_lower_table_once(
    mode: MatrixMode,
    wp: bool,
    access: Access,
) -> (Scene, Option<Agreed>, Option<Agreed>) {
    let mut s = Scene::new("shared lower table", mode, cpu(true, wp));
    let open_va = base_va(mode);
    // The two addresses differ in the index of the level that holds the two upper entries.
    let (split_level, step) = match mode {
        MatrixMode::FourLevel => (3u8, 1u64 << 30),
        MatrixMode::Pae => (2, 1 << 21),
        MatrixMode::TwoLevel => (2, 1 << 22),
    };
    let closed_va = open_va + step;
    let open = s.map(open_va, 0x2000, URW, 1, DATA | URW);
    let mut closed = open.clone();
    // open[i] is the entry at level top - i; the split entry is at index top - split_level.
    let split = usize::from(s.top() - split_level);
    if let (Some(open_entry), Some(closed_entry)) = (open.get(split), closed.get_mut(split)) {
        let shared_table = s.get(*open_entry) & !0xfff & 0x000f_ffff_ffff_ffff;
        let table_base = *open_entry & !0xfff;
        *closed_entry = s.slot(table_base, closed_va, split_level);
        s.put(*closed_entry, shared_table | P);
    }
    let through_open = s.access(open_va, &open, access);
    let through_closed = s.access(closed_va, &closed, access);
    (s, through_open, through_closed)
}

/// PS above the page directory (4-level only): reserved in a PML4E, reserved in a PDPTE
/// without 1 GiB page support, and with it a 1 GiB page whose bits 29:13 are reserved.
pub fn upper_level_page_size(mode: MatrixMode) -> ScenarioReport {
    let mut total = ScenarioReport::new("PS above the PD", mode);
    if mode != MatrixMode::FourLevel {
        return total;
    }
    for pdpe1gb in [false, true] {
        for extra in [0, 1 << 13, 1 << 29] {
            for access in ACCESSES {
                let s = upper_level_page_size_once(pdpe1gb, extra, access).0;
                merge(&mut total, s.into_report());
            }
        }
    }
    total
}

/// One run of [`upper_level_page_size`]: the outcomes through a PDPTE with PS (and `extra`
/// bits) and through a PML4E with PS.
pub fn upper_level_page_size_once(
    pdpe1gb: bool,
    extra: u64,
    access: Access,
) -> (Scene, Option<Agreed>, Option<Agreed>) {
    let mode = MatrixMode::FourLevel;
    let mut s = Scene::new("PS above the PD", mode, cpu(true, true));
    s.feat.pdpe1gb = pdpe1gb;
    let va = base_va(mode);
    let giant = s.map(va, 0x2000, URW, 3, DATA | URW | PS | extra);
    let through_pdpte = s.access(va, &giant, access);
    // Another PML4 slot whose entry has PS set, over an ordinary table.
    let other_va = va ^ (1 << 39);
    let pml4e = s.slot(0x1000, other_va, 4);
    s.put(pml4e, 0x2000 | URW | PS);
    let mut path = giant.clone();
    if let Some(first) = path.first_mut() {
        *first = pml4e;
    }
    let through_pml4e = s.access(other_va, &path, access);
    (s, through_pdpte, through_pml4e)
}

/// Every scenario family of `mode`.
pub fn all(mode: MatrixMode) -> Vec<ScenarioReport> {
    vec![
        aliased_large_pages(mode),
        nx_neighbour(mode),
        large_page_dirty_without_wp(mode),
        smep_without_wp(mode),
        toggle_wp(mode),
        shared_lower_table(mode),
        upper_level_page_size(mode),
    ]
}

fn merge(total: &mut ScenarioReport, part: ScenarioReport) {
    total.cases += part.cases;
    total.mismatches += part.mismatches;
    for m in part.first_mismatches {
        if total.first_mismatches.len() < KEPT {
            total.first_mismatches.push(m);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shadow2::paging::PfErrorCode;

    fn fault(bits: u32) -> Option<Agreed> {
        Some(Err(PfErrorCode(bits)))
    }

    #[test]
    fn every_family_agrees_in_every_mode() {
        for mode in MatrixMode::ALL {
            for report in all(mode) {
                assert_eq!(report.mismatches, 0, "{:?}", report.first_mismatches);
                let empty = (!mode.wide() && report.name == "XD neighbour PTE")
                    || (mode != MatrixMode::FourLevel && report.name == "PS above the PD");
                if !empty {
                    assert!(report.cases > 0, "{} {mode}", report.name);
                }
            }
        }
    }

    #[test]
    fn aliases_keep_their_own_rights_and_dirty_bits() {
        for mode in MatrixMode::ALL {
            let s = aliased_large_pages_once(mode, true, USER);
            assert_eq!(
                s.report().mismatches,
                0,
                "{:?}",
                s.report().first_mismatches
            );
            let ro_va = base_va(mode);
            let rw_va = ro_va + large(mode);
            let ro_pde = s.get(s.slot(pd(mode), ro_va, 2));
            let rw_pde = s.get(s.slot(pd(mode), rw_va, 2));
            assert_eq!(ro_pde & (bits::A | bits::D), bits::A, "{mode}");
            assert_eq!(rw_pde & (bits::A | bits::D), bits::A | bits::D, "{mode}");
        }
    }

    /// Where [`Scene::map`] puts the page directory.
    fn pd(mode: MatrixMode) -> u64 {
        match mode {
            MatrixMode::TwoLevel => 0x1000,
            MatrixMode::Pae => 0x2000,
            MatrixMode::FourLevel => 0x3000,
        }
    }

    #[test]
    fn xd_neighbour_is_reserved_only_without_nxe() {
        for mode in [MatrixMode::Pae, MatrixMode::FourLevel] {
            let (_, plain, neighbour) = nx_neighbour_once(mode, false, acc(READ, USER));
            assert!(matches!(plain, Some(Ok(_))));
            let ec = PfErrorCode::P | PfErrorCode::RSVD | PfErrorCode::U;
            assert_eq!(neighbour, fault(ec));
            let (_, plain, neighbour) = nx_neighbour_once(mode, true, acc(FETCH, SUP));
            assert!(matches!(plain, Some(Ok(_))));
            assert_eq!(neighbour, fault(PfErrorCode::P | PfErrorCode::I));
        }
    }

    #[test]
    fn smep_still_stops_fetches_after_a_wp0_write() {
        for mode in MatrixMode::ALL {
            let (s, outcomes) = smep_without_wp_once(mode, true);
            assert_eq!(
                s.report().mismatches,
                0,
                "{:?}",
                s.report().first_mismatches
            );
            assert!(matches!(outcomes[0], Some(Ok(_))), "{mode}");
            assert_eq!(
                outcomes[1],
                fault(PfErrorCode::P | PfErrorCode::I),
                "{mode}"
            );
            assert!(matches!(outcomes[2], Some(Ok(_))), "{mode}");
            assert!(matches!(outcomes[3], Some(Ok(_))), "{mode}");
        }
    }

    #[test]
    fn supervisor_writes_follow_the_current_wp() {
        for mode in MatrixMode::ALL {
            let (s, steps) = toggle_wp_once(mode, false, true);
            assert_eq!(
                s.report().mismatches,
                0,
                "{:?}",
                s.report().first_mismatches
            );
            for (wp, write) in steps {
                if wp {
                    assert_eq!(write, fault(PfErrorCode::P | PfErrorCode::W), "{mode}");
                } else {
                    assert!(matches!(write, Some(Ok(_))), "{mode}");
                }
            }
        }
    }

    #[test]
    fn the_shared_table_gives_each_path_its_own_rights() {
        for mode in MatrixMode::ALL {
            let (_, open, closed) = shared_lower_table_once(mode, true, acc(WRITE, USER));
            assert!(
                matches!(open, Some(Ok(a)) if a == DATA | (base_va(mode) & 0xfff)),
                "{mode}"
            );
            assert_eq!(
                closed,
                fault(PfErrorCode::P | PfErrorCode::W | PfErrorCode::U),
                "{mode}"
            );
            let (_, _, closed) = shared_lower_table_once(mode, true, acc(WRITE, SUP));
            assert_eq!(closed, fault(PfErrorCode::P | PfErrorCode::W), "{mode}");
            let (_, _, closed) = shared_lower_table_once(mode, false, acc(WRITE, SUP));
            assert!(matches!(closed, Some(Ok(_))), "{mode}");
        }
    }

    #[test]
    fn ps_above_the_pd_is_reserved_or_a_1g_page() {
        let read = acc(READ, SUP);
        let rsvd = fault(PfErrorCode::P | PfErrorCode::RSVD);
        let (s, pdpte, pml4e) = upper_level_page_size_once(false, 0, read);
        assert_eq!((pdpte, pml4e), (rsvd, rsvd));
        assert_eq!(
            s.report().mismatches,
            0,
            "{:?}",
            s.report().first_mismatches
        );
        let (s, pdpte, pml4e) = upper_level_page_size_once(true, 0, acc(WRITE, SUP));
        let va = base_va(MatrixMode::FourLevel);
        assert_eq!(pdpte, Some(Ok(DATA | (va & 0x3fff_ffff))));
        assert_eq!(
            pml4e,
            fault(PfErrorCode::P | PfErrorCode::RSVD | PfErrorCode::W)
        );
        let pdpte_entry = s.get(s.slot(0x2000, va, 3));
        assert_eq!(pdpte_entry & (bits::A | bits::D), bits::A | bits::D);
        let (_, pdpte, _) = upper_level_page_size_once(true, 1 << 13, read);
        assert_eq!(pdpte, rsvd);
        let (_, pdpte, _) = upper_level_page_size_once(true, 1 << 29, read);
        assert_eq!(pdpte, rsvd);
    }

    #[test]
    fn large_page_gets_d_from_a_wp0_supervisor_write() {
        for mode in MatrixMode::ALL {
            let mut s = Scene::new("t", mode, cpu(true, false));
            let va = base_va(mode);
            let path = s.map(va, 0x2000, URW, 2, DATA | P | PS);
            assert!(matches!(s.access(va, &path, acc(WRITE, SUP)), Some(Ok(_))));
            let pde = s.get(*path.last().unwrap());
            assert_eq!(pde & (bits::A | bits::D), bits::A | bits::D, "{mode}");
            assert_eq!(s.report().mismatches, 0);
        }
    }
}

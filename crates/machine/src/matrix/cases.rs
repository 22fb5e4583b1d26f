//! The enumeration of matrix cases, after the design of kvm-unit-tests' x86/access.c (a
//! counter over PTE, PDE, PDPTE, access and CPU flags, minus illegal or meaningless
//! combinations), re-derived here with nested loops so that whole branches are skipped
//! rather than filtered one by one.
//!
//! Two groups:
//! - the *core* group crosses every PDE and PTE flag (P, W, U, A, D, PS, NX, and the
//!   reserved-or-not bits 51, 36, 13, and 21 in 2-level) with every access, EFER.NXE, CR0.WP,
//!   CR4.PSE (2-level), a read-only PDPTE (4-level) and MAXPHYADDR 36, 48 and (8-byte
//!   entries) 52, with SMEP, SMAP and PKE off;
//! - the *feature* group crosses every SMEP / SMAP+AC / PKE+PKRU+key state with the
//!   permission flags only (W, U, PS, NX; A, D and reserved bits are the core group's job).
//!
//! Skip rules, as access.c has them: at most one reserved bit per case (reserved-bit faults
//! are terminal and one is as good as two); bit 13 (and bit 21, and PSE-36 bits) only in a
//! large-page PDE; PKRU bits only with CR4.PKE; RFLAGS.AC only with CR4.SMAP; protection keys
//! only in 4-level paging. Beyond access.c: PTE flags are not varied when the walk never
//! reaches the PTE (PDE not present, reserved, or mapping a large page).

use core::fmt;

use shadow2::addr::gva_from_indices_4level;
use shadow2::paging::{ControlState, CpuFeatures, bits};

use super::arena::ArenaMem;
use super::flags::{AccessSpec, CpuFlags, EntryFlags, MatrixMode};
use super::rules::MAX_PATH;

/// MAXPHYADDR values of the core group: bit 36 reserved (36) or an address bit (48), and
/// in 8-byte entries bit 51 an address bit too (52).
pub fn core_maxphyaddrs(mode: MatrixMode) -> &'static [u8] {
    if mode.wide() {
        &[36, 48, 52]
    } else {
        &[36, 48]
    }
}
/// MAXPHYADDR of the feature group.
pub const FEATURE_MAXPHYADDR: u8 = 48;

/// One matrix case.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Case {
    /// Paging mode.
    pub mode: MatrixMode,
    /// CPU state.
    pub cpu: CpuFlags,
    /// The PDPTE has R/W=0 (4-level only).
    pub pdpte_ro: bool,
    /// The leaf carries protection key 1 and a non-leaf PDE key 2 (4-level only).
    pub pkey: bool,
    /// PDE flags.
    pub pde: EntryFlags,
    /// PTE flags (empty when the PDE maps a page).
    pub pte: EntryFlags,
    /// The access.
    pub access: AccessSpec,
}

impl fmt::Display for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.setup(), self.access)
    }
}

impl Case {
    /// The case without its access: mode, CPU state and entry flags.
    pub fn setup(&self) -> String {
        let mut text = format!(
            "{} [{}] pde={} pte={}",
            self.mode, self.cpu, self.pde, self.pte
        );
        if self.pdpte_ro {
            text.push_str(" pdpte.ro");
        }
        if self.pkey {
            text.push_str(" pkey=1");
        }
        text
    }

    /// Whether the PDE maps a page (PS honoured).
    pub fn pde_is_leaf(&self) -> bool {
        pde_is_leaf(self.mode, &self.cpu, self.pde)
    }
}

fn pde_is_leaf(mode: MatrixMode, cpu: &CpuFlags, pde: EntryFlags) -> bool {
    pde.has(EntryFlags::PS) && (mode.wide() || cpu.pse)
}

/// The flags of this entry that are reserved bits in this state (used only to apply the
/// one-reserved-bit-at-a-time skip rule: the verdict comes from the rules function).
fn reserved_flags(mode: MatrixMode, cpu: &CpuFlags, leaf_pde: bool) -> u16 {
    let mut reserved = 0;
    if cpu.maxphyaddr <= 36 {
        reserved |= EntryFlags::BIT36;
    }
    if mode.wide() {
        if cpu.maxphyaddr < 52 {
            reserved |= EntryFlags::BIT51;
        }
        if !cpu.nxe {
            reserved |= EntryFlags::NX;
        }
        if leaf_pde {
            reserved |= EntryFlags::BIT13;
        }
    } else {
        reserved |= EntryFlags::BIT21;
    }
    reserved
}

/// All subsets of `mask`.
fn subsets(mask: u16) -> impl Iterator<Item = u16> {
    let mut next = Some(0u16);
    core::iter::from_fn(move || {
        let current = next?;
        next = if current == mask {
            None
        } else {
            Some(current.wrapping_sub(mask) & mask)
        };
        Some(current)
    })
}

fn at_most_one(bits: u16) -> bool {
    bits & bits.wrapping_sub(1) == 0
}

/// The PDE variants of a CPU state.
pub fn pde_options(mode: MatrixMode, cpu: &CpuFlags, full: bool) -> Vec<EntryFlags> {
    use EntryFlags as F;
    let mut varied = if full {
        F::P | F::W | F::U | F::A | F::D | F::PS
    } else {
        F::W | F::U | F::PS
    };
    if mode.wide() && (full || cpu.nxe) {
        varied |= F::NX;
    }
    if full {
        varied |= if mode.wide() {
            F::BIT51 | F::BIT36 | F::BIT13
        } else {
            F::BIT36 | F::BIT13 | F::BIT21
        };
    }
    let mut out = Vec::new();
    if !full {
        out.push(EntryFlags(0));
    }
    for set in subsets(varied) {
        let flags = EntryFlags(if full { set } else { set | F::P });
        let leaf = pde_is_leaf(mode, cpu, flags);
        let large_only = if mode.wide() {
            F::BIT13
        } else {
            F::BIT13 | F::BIT21 | F::BIT36
        };
        if !leaf && flags.0 & large_only != 0 {
            continue;
        }
        if !at_most_one(flags.0 & reserved_flags(mode, cpu, leaf)) {
            continue;
        }
        out.push(flags);
    }
    out
}

/// The PTE variants of a CPU state.
pub fn pte_options(mode: MatrixMode, cpu: &CpuFlags, full: bool) -> Vec<EntryFlags> {
    use EntryFlags as F;
    let mut varied = if full {
        F::P | F::W | F::U | F::A | F::D
    } else {
        F::W | F::U
    };
    if mode.wide() && (full || cpu.nxe) {
        varied |= F::NX;
    }
    if full && mode.wide() {
        varied |= F::BIT51 | F::BIT36;
    }
    let mut out = Vec::new();
    if !full {
        out.push(EntryFlags(0));
    }
    for set in subsets(varied) {
        let flags = EntryFlags(if full { set } else { set | F::P });
        if at_most_one(flags.0 & reserved_flags(mode, cpu, false)) {
            out.push(flags);
        }
    }
    out
}

/// The (PDE, PTE) pairs of a CPU state: PTEs are varied only under a PDE the walk goes
/// through.
pub fn entry_pairs(mode: MatrixMode, cpu: &CpuFlags, full: bool) -> Vec<(EntryFlags, EntryFlags)> {
    let ptes = pte_options(mode, cpu, full);
    let mut pairs = Vec::new();
    for pde in pde_options(mode, cpu, full) {
        let leaf = pde_is_leaf(mode, cpu, pde);
        let walk_stops =
            !pde.has(EntryFlags::P) || leaf || pde.0 & reserved_flags(mode, cpu, leaf) != 0;
        if walk_stops {
            pairs.push((pde, EntryFlags(0)));
        } else {
            pairs.extend(ptes.iter().map(|&pte| (pde, pte)));
        }
    }
    pairs
}

/// The CPU states of a mode at one MAXPHYADDR: the core states, then (at
/// [`FEATURE_MAXPHYADDR`]) the feature states.
pub fn cpu_states(mode: MatrixMode, maxphyaddr: u8) -> Vec<CpuFlags> {
    let bools = [false, true];
    let pse_options: &[bool] = if mode.wide() { &[true] } else { &bools };
    let smap_options = [(false, false), (true, false), (true, true)];
    let pke_options: &[(bool, bool, bool)] = if mode == MatrixMode::FourLevel {
        &[
            (false, false, false),
            (true, false, false),
            (true, true, false),
            (true, false, true),
            (true, true, true),
        ]
    } else {
        &[(false, false, false)]
    };
    let mut out = Vec::new();
    for nxe in bools {
        for wp in bools {
            for &pse in pse_options {
                for smep in bools {
                    for (smap, ac) in smap_options {
                        for &(pke, pkru_ad, pkru_wd) in pke_options {
                            let cpu = CpuFlags {
                                maxphyaddr,
                                nxe,
                                wp,
                                pse,
                                smep,
                                smap,
                                ac,
                                pke,
                                pkru_ad,
                                pkru_wd,
                            };
                            if cpu.is_core() || maxphyaddr == FEATURE_MAXPHYADDR {
                                out.push(cpu);
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

/// Calls `f` on every case of `mode`, in a fixed order.
pub fn for_each_case(mode: MatrixMode, mut f: impl FnMut(&Case)) {
    for &maxphyaddr in core_maxphyaddrs(mode) {
        for cpu in cpu_states(mode, maxphyaddr) {
            let full = cpu.is_core();
            let pairs = entry_pairs(mode, &cpu, full);
            let pdpte_options: &[bool] = if mode == MatrixMode::FourLevel {
                &[false, true]
            } else {
                &[false]
            };
            let pkey_options: &[bool] = if mode == MatrixMode::FourLevel && !full {
                &[false, true]
            } else {
                &[false]
            };
            for &pdpte_ro in pdpte_options {
                for &pkey in pkey_options {
                    for &(pde, pte) in &pairs {
                        for access in AccessSpec::ALL {
                            f(&Case {
                                mode,
                                cpu,
                                pdpte_ro,
                                pkey,
                                pde,
                                pte,
                                access,
                            });
                        }
                    }
                }
            }
        }
    }
}

/// How many cases [`for_each_case`] makes for `mode`.
pub fn count_cases(mode: MatrixMode) -> u64 {
    let mut n = 0;
    for_each_case(mode, |_| n += 1);
    n
}

/// A case laid out in memory: the registers and where each entry on the path sits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Control registers (CR3 and, for PAE, the PDPTE registers filled in).
    pub ctl: ControlState,
    /// CPU features.
    pub feat: CpuFeatures,
    /// The linear address accessed.
    pub va: u64,
    /// Where the entries on the path sit, top level first (for PAE, the first is where the
    /// PDPTE register was loaded from).
    pub path: [u64; MAX_PATH],
    /// How many entries of `path` exist.
    pub path_len: usize,
}

impl Layout {
    /// The entry addresses on the path.
    pub fn path(&self) -> &[u64] {
        &self.path[..self.path_len.min(MAX_PATH)]
    }
}

/// Physical base of the data page (1 GiB aligned, so any page size maps it).
const DATA_BASE: u64 = 0x4000_0000;
/// Offset of the 4 KiB data page inside [`DATA_BASE`]'s large page.
const DATA_4K: u64 = 0x5000;
const PML4_AT: u64 = 0x1000;
const PDPT_AT: u64 = 0x2000;
const PD_AT: u64 = 0x3000;
const PT_AT: u64 = 0x4000;

/// Linear-address indices used by the cases: none zero, none shared between levels.
const L4: u64 = 0x124;
const L3: u64 = 0x0d1;
const L3_PAE: u64 = 2;
const L2: u64 = 0x0b3;
const L2_32: u64 = 0x345;
const L1: u64 = 0x1a5;
const L1_32: u64 = 0x1a5;
const OFFSET: u64 = 0x9c8;

/// The entry bits of `flags` in `mode` (`large` for a large-page PDE).
pub fn raw_bits(flags: EntryFlags, mode: MatrixMode, large: bool) -> u64 {
    use EntryFlags as F;
    let mut raw = 0;
    for (flag, bit) in [
        (F::P, bits::P),
        (F::W, bits::RW),
        (F::U, bits::US),
        (F::A, bits::A),
        (F::D, bits::D),
        (F::PS, bits::PS),
        (F::BIT13, 1 << 13),
        (F::BIT21, 1 << 21),
    ] {
        if flags.has(flag) {
            raw |= bit;
        }
    }
    if mode.wide() {
        for (flag, bit) in [(F::NX, bits::NX), (F::BIT51, 1 << 51), (F::BIT36, 1 << 36)] {
            if flags.has(flag) {
                raw |= bit;
            }
        }
    } else if large && flags.has(F::BIT36) {
        // PSE-36: entry bits 20:13 are physical bits 39:32.
        raw |= 1 << (36 - 32 + 13);
    }
    raw
}

/// Builds the tables of `case` in `mem` (which the caller has cleared) and returns its
/// layout, or `None` if the arena is too small (never, for these layouts).
pub fn build(case: &Case, mem: &mut ArenaMem) -> Option<Layout> {
    let mode = case.mode;
    let mut ctl = case.cpu.control(mode);
    let feat = case.cpu.features();
    let leaf_pde = case.pde_is_leaf();
    let key = |k: u64| if case.pkey { k << bits::PKEY_SHIFT } else { 0 };
    let pde_bits = raw_bits(case.pde, mode, leaf_pde);
    let pte_bits = raw_bits(case.pte, mode, false);
    // A non-leaf PDE's high address bits (bit 36, bit 51) move the page table.
    let pt_at = if leaf_pde {
        PT_AT
    } else {
        PT_AT | (pde_bits & ((1 << 36) | (1 << 51)))
    };
    let pde = if leaf_pde {
        DATA_BASE | pde_bits | key(1)
    } else {
        pt_at | pde_bits | key(2)
    };
    let pte = DATA_BASE | DATA_4K | pte_bits | key(1);
    let table = bits::P | bits::RW | bits::US;

    let mut path = [0u64; MAX_PATH];
    let mut len = 0;
    let mut push = |addr: u64| {
        if let Some(slot) = path.get_mut(len) {
            *slot = addr;
            len += 1;
        }
    };
    let va;
    match mode {
        MatrixMode::FourLevel => {
            va = gva_from_indices_4level(L4, L3, L2, L1, OFFSET).raw();
            ctl.cr3 = PML4_AT;
            let pdpte_rw = if case.pdpte_ro { 0 } else { bits::RW };
            let ok = mem.poke(PML4_AT + 8 * L4, PDPT_AT | table)
                && mem.poke(PDPT_AT + 8 * L3, PD_AT | bits::P | bits::US | pdpte_rw)
                && mem.poke(PD_AT + 8 * L2, pde);
            push(PML4_AT + 8 * L4);
            push(PDPT_AT + 8 * L3);
            push(PD_AT + 8 * L2);
            if !ok || (!leaf_pde && !mem.poke(pt_at + 8 * L1, pte)) {
                return None;
            }
            if !leaf_pde {
                push(pt_at + 8 * L1);
            }
        }
        MatrixMode::Pae => {
            va = (L3_PAE << 30) | (L2 << 21) | (L1 << 12) | OFFSET;
            ctl.cr3 = PDPT_AT;
            let pdpte = PD_AT | bits::P;
            if let Some(slot) = ctl.pdptes.get_mut(L3_PAE as usize) {
                *slot = pdpte;
            }
            let ok = mem.poke(PDPT_AT + 8 * L3_PAE, pdpte) && mem.poke(PD_AT + 8 * L2, pde);
            push(PDPT_AT + 8 * L3_PAE);
            push(PD_AT + 8 * L2);
            if !ok || (!leaf_pde && !mem.poke(pt_at + 8 * L1, pte)) {
                return None;
            }
            if !leaf_pde {
                push(pt_at + 8 * L1);
            }
        }
        MatrixMode::TwoLevel => {
            va = (L2_32 << 22) | (L1_32 << 12) | OFFSET;
            ctl.cr3 = PD_AT;
            if !mem.poke_u32(PD_AT + 4 * L2_32, pde as u32) {
                return None;
            }
            push(PD_AT + 4 * L2_32);
            if !leaf_pde {
                if !mem.poke_u32(pt_at + 4 * L1_32, pte as u32) {
                    return None;
                }
                push(pt_at + 4 * L1_32);
            }
        }
    }
    Some(Layout {
        ctl,
        feat,
        va,
        path,
        path_len: len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn subsets_enumerates_each_subset_once() {
        let all: Vec<u16> = subsets(0b1011).collect();
        assert_eq!(all.len(), 8);
        let unique: HashSet<u16> = all.iter().copied().collect();
        assert_eq!(unique.len(), 8);
        assert!(all.iter().all(|s| s & !0b1011 == 0));
    }

    #[test]
    fn skip_rules_hold_for_every_case() {
        for mode in MatrixMode::ALL {
            let mut seen = 0u64;
            for_each_case(mode, |case| {
                seen += 1;
                let leaf = case.pde_is_leaf();
                let reserved_pde = case.pde.0 & reserved_flags(mode, &case.cpu, leaf);
                let reserved_pte = case.pte.0 & reserved_flags(mode, &case.cpu, false);
                assert!(at_most_one(reserved_pde | reserved_pte), "{case}");
                assert!(!case.cpu.ac || case.cpu.smap, "{case}");
                assert!(
                    !(case.cpu.pkru_ad || case.cpu.pkru_wd) || case.cpu.pke,
                    "{case}"
                );
                if !leaf {
                    assert!(!case.pde.has(EntryFlags::BIT13), "{case}");
                }
                if leaf || !case.pde.has(EntryFlags::P) {
                    assert!(case.pte.is_empty(), "{case}");
                }
                if mode != MatrixMode::FourLevel {
                    assert!(!case.pkey && !case.pdpte_ro && !case.cpu.pke, "{case}");
                }
                if !mode.wide() {
                    assert!(!case.pde.has(EntryFlags::NX) && !case.pte.has(EntryFlags::NX));
                    assert!(!case.pte.has(EntryFlags::BIT36));
                }
            });
            assert_eq!(seen, count_cases(mode));
        }
    }

    #[test]
    fn enumeration_counts() {
        let counts: Vec<u64> = MatrixMode::ALL.iter().map(|&m| count_cases(m)).collect();
        // The matrix promises more than a million cases over the three modes, 4-level the
        // biggest and 2-level (fewest flags) the smallest.
        assert!(counts.iter().sum::<u64>() >= 1_000_000, "{counts:?}");
        assert!(counts[0] < counts[1] && counts[1] < counts[2], "{counts:?}");
        // Each CPU state contributes whole blocks of the 16 accesses.
        assert!(counts.iter().all(|c| c % 16 == 0));
    }

    #[test]
    fn pae_core_state_entry_counts() {
        let cpu = CpuFlags {
            maxphyaddr: 36,
            nxe: true,
            wp: true,
            pse: true,
            ..CpuFlags::default()
        };
        // PTE: P W U A D NX free (64) times {none, bit 51, bit 36}.
        assert_eq!(pte_options(MatrixMode::Pae, &cpu, true).len(), 64 * 3);
        // Large PDEs: P W U A D NX (64) times {none, 51, 36, 13}; PDEs to a table: 64 x 3.
        assert_eq!(
            pde_options(MatrixMode::Pae, &cpu, true).len(),
            64 * 4 + 64 * 3
        );
        let wide = CpuFlags {
            maxphyaddr: 48,
            ..cpu
        };
        // Bit 36 is an address bit at MAXPHYADDR 48: free, so it doubles the PTE options.
        assert_eq!(pte_options(MatrixMode::Pae, &wide, true).len(), 64 * 2 * 2);
    }

    #[test]
    fn build_places_the_path_where_the_va_points() {
        let case = Case {
            mode: MatrixMode::FourLevel,
            cpu: CpuFlags {
                maxphyaddr: 48,
                nxe: true,
                wp: true,
                pse: true,
                ..CpuFlags::default()
            },
            pdpte_ro: true,
            pkey: true,
            pde: EntryFlags(EntryFlags::P | EntryFlags::W | EntryFlags::BIT36),
            pte: EntryFlags(EntryFlags::P | EntryFlags::NX),
            access: AccessSpec::ALL[0],
        };
        let mut mem = ArenaMem::new();
        let layout = build(&case, &mut mem).unwrap();
        assert_eq!(layout.path_len, 4);
        let va = layout.va;
        assert_eq!((va >> 39) & 0x1ff, L4);
        assert_eq!(layout.path[3], 0x10_0000_4000 + 8 * ((va >> 12) & 0x1ff));
        let pdpte = mem.peek(layout.path[1]).unwrap();
        assert_eq!(pdpte & bits::RW, 0);
        let pde = mem.peek(layout.path[2]).unwrap();
        assert_eq!(pde, 0x10_0000_4000 | bits::P | bits::RW | (2 << 59));
        let pte = mem.peek(layout.path[3]).unwrap();
        assert_eq!(pte, 0x4000_5000 | bits::P | bits::NX | (1 << 59));
    }

    #[test]
    fn build_two_level_pse36_large_page() {
        let case = Case {
            mode: MatrixMode::TwoLevel,
            cpu: CpuFlags {
                maxphyaddr: 48,
                pse: true,
                ..CpuFlags::default()
            },
            pdpte_ro: false,
            pkey: false,
            pde: EntryFlags(EntryFlags::P | EntryFlags::PS | EntryFlags::BIT36),
            pte: EntryFlags(0),
            access: AccessSpec::ALL[0],
        };
        let mut mem = ArenaMem::new();
        let layout = build(&case, &mut mem).unwrap();
        assert_eq!(layout.path_len, 1);
        let word = mem.peek(layout.path[0]).unwrap();
        let pde = (word >> ((layout.path[0] & 4) * 8)) as u32;
        assert_eq!(pde, 0x4000_0000 | 0x81 | (1 << 17));
    }
}

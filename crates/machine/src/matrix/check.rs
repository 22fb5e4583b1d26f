//! One access checked two ways: the walker on the arena memory, and the rules function on
//! the entries the layout says are on the path. Any difference in fault, error code,
//! physical address, A/D bits or stray writes is a mismatch, described in words.

use shadow2::addr::{Gpa, Gva};
use shadow2::paging::{
    Access, AdUpdate, ControlState, CpuFeatures, PfErrorCode, WalkEnv, WalkFault, walk,
};

use super::arena::ArenaMem;
use super::cases::{Case, build};
use super::flags::{AccessSpec, MatrixMode, access_name};
use super::rules::{MAX_PATH, Situation, judge};

/// One access to check.
#[derive(Clone, Copy, Debug)]
pub struct Probe<'a> {
    /// Paging mode.
    pub mode: MatrixMode,
    /// Control registers.
    pub ctl: &'a ControlState,
    /// CPU features.
    pub feat: &'a CpuFeatures,
    /// Linear address.
    pub va: u64,
    /// Where the entries on the path sit, top level first (for PAE, the first is where the
    /// PDPTE register was loaded from; its value comes from `ctl.pdptes`).
    pub path: &'a [u64],
    /// The access.
    pub access: Access,
}

impl Probe<'_> {
    fn is_pdpte_register(&self, index: usize) -> bool {
        self.mode == MatrixMode::Pae && index == 0
    }

    fn entry_bytes(&self) -> u64 {
        if self.mode.wide() { 8 } else { 4 }
    }
}

/// Reads the entry at `addr` (4 or 8 bytes) from the arena without logging anything.
fn read_entry(mem: &ArenaMem, addr: u64, bytes: u64) -> Option<u64> {
    let word = mem.peek(addr)?;
    Some(if bytes == 4 {
        (word >> ((addr & 4) * 8)) & 0xffff_ffff
    } else {
        word
    })
}

/// What an access did, when walker and rules agree: the physical address or the error code.
pub type Agreed = Result<u64, PfErrorCode>;

/// Checks one access; `Err` describes the first difference.
pub fn check_access(mem: &mut ArenaMem, probe: &Probe<'_>) -> Result<Agreed, String> {
    let bytes = probe.entry_bytes();
    let mut before = [0u64; MAX_PATH];
    let path_len = probe.path.len().min(MAX_PATH);
    for (i, (&addr, slot)) in probe.path.iter().zip(before.iter_mut()).enumerate() {
        *slot = if probe.is_pdpte_register(i) {
            let index = ((probe.va >> 30) & 3) as usize;
            probe.ctl.pdptes.get(index).copied().unwrap_or(0)
        } else {
            read_entry(mem, addr, bytes).ok_or_else(|| format!("{addr:#x} is not backed"))?
        };
    }
    let levels = probe.mode.levels();
    let verdict = judge(&Situation {
        levels,
        ctl: probe.ctl,
        feat: probe.feat,
        va: probe.va,
        access: probe.access,
        path: &before[..path_len],
    })
    .map_err(|e| format!("the rules cannot judge this layout: {e:?}"))?;

    mem.forget_writes();
    let env = WalkEnv {
        ctl: probe.ctl,
        feat: probe.feat,
        ad: AdUpdate::Set,
    };
    let walked = walk(mem, env, Gva::new(probe.va), probe.access);
    let what = access_name(probe.access);
    match (&verdict.outcome, &walked) {
        (Ok(expected), Ok(t)) if t.addr == Gpa::new(*expected) => {}
        (Err(expected), Err(f)) if f.fault == WalkFault::PageFault(*expected) => {}
        (expected, Ok(t)) => {
            return Err(format!(
                "{what}: rules say {expected:x?}, walker translated to {:#x}",
                t.addr.raw()
            ));
        }
        (expected, Err(f)) => {
            return Err(format!(
                "{what}: rules say {expected:x?}, walker faulted {:?}",
                f.fault
            ));
        }
    }

    for (i, &addr) in probe.path.iter().enumerate().take(path_len) {
        if probe.is_pdpte_register(i) {
            continue;
        }
        let expected = if i < verdict.used {
            verdict.after.get(i).copied().unwrap_or(0)
        } else {
            before.get(i).copied().unwrap_or(0)
        };
        let actual = read_entry(mem, addr, bytes).unwrap_or(0);
        if actual != expected {
            return Err(format!(
                "{what}: level-{} entry at {addr:#x} is {actual:#x} after the walk, rules say \
                 {expected:#x}",
                usize::from(levels.count()) - i
            ));
        }
    }
    let (writes, count) = mem.logged_writes();
    let used = &probe.path[..verdict.used.min(path_len)];
    if let Some(stray) = writes.iter().find(|&&w| !used.contains(&w)) {
        return Err(format!(
            "{what}: walker wrote {stray:#x}, which is not an entry the walk used"
        ));
    }
    if count > verdict.used {
        return Err(format!(
            "{what}: walker made {count} writes for {} entries",
            verdict.used
        ));
    }
    Ok(verdict.outcome)
}

/// Builds and checks one matrix case (both accesses of a "twice" case).
pub fn check_case(mem: &mut ArenaMem, case: &Case) -> Result<(), String> {
    mem.clear();
    let layout = build(case, mem).ok_or_else(|| "the arena is too small".to_string())?;
    let mut probe = Probe {
        mode: case.mode,
        ctl: &layout.ctl,
        feat: &layout.feat,
        va: layout.va,
        path: layout.path(),
        access: AccessSpec::WARM_UP,
    };
    if case.access.twice {
        // Whether the warm-up read faults does not matter; that it agrees does.
        let _warm_up: Agreed =
            check_access(mem, &probe).map_err(|e| format!("first access: {e}"))?;
    }
    probe.access = case.access.access;
    check_access(mem, &probe).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matrix::flags::{CpuFlags, EntryFlags};
    use shadow2::paging::{AccessKind, PhysMem, Privilege};

    fn user_write_case() -> Case {
        Case {
            mode: MatrixMode::FourLevel,
            cpu: CpuFlags {
                maxphyaddr: 48,
                nxe: true,
                wp: true,
                pse: true,
                ..CpuFlags::default()
            },
            pdpte_ro: false,
            pkey: false,
            pde: EntryFlags(EntryFlags::P | EntryFlags::W | EntryFlags::U),
            pte: EntryFlags(EntryFlags::P | EntryFlags::W | EntryFlags::U),
            access: AccessSpec {
                access: Access::new(AccessKind::Write, Privilege::User),
                twice: true,
            },
        }
    }

    #[test]
    fn a_good_case_passes_and_sets_a_and_d() {
        let mut mem = ArenaMem::new();
        let case = user_write_case();
        assert_eq!(check_case(&mut mem, &case), Ok(()));
        let layout = build(&case, &mut ArenaMem::new()).unwrap();
        let pte = mem.peek(layout.path[3]).unwrap();
        assert_eq!(pte & 0x60, 0x60);
    }

    #[test]
    fn a_tampered_entry_is_reported() {
        // Give the walker memory that differs from what the rules are shown: the rules see
        // the PTE as the layout built it, but a stray store makes the walker's A/D update
        // land on a changed word, so the comparison of the leaf must fail.
        let mut mem = ArenaMem::new();
        let case = user_write_case();
        mem.clear();
        let layout = build(&case, &mut mem).unwrap();
        let probe = Probe {
            mode: case.mode,
            ctl: &layout.ctl,
            feat: &layout.feat,
            va: layout.va,
            // The path claims the PTE sits one slot further on than it does.
            path: &[
                layout.path[0],
                layout.path[1],
                layout.path[2],
                layout.path[3] + 8,
            ],
            access: case.access.access,
        };
        mem.write_u64(Gpa::new(layout.path[3] + 8), 0x7000 | 0x7)
            .unwrap();
        let err = check_access(&mut mem, &probe).unwrap_err();
        assert!(err.contains("rules say"), "{err}");
    }
}

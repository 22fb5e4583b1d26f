//! Conformance of the architectural walker with real execution: every case recorded under
//! KVM (tests/data/kvm-paging-sample.jsonl.xz, described in the README beside it) must give
//! the same fault, error code, A/D updates and physical address.

mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::BufReader;

use common::SparseMem;
use serde::Deserialize;
use shadow2::paging::bits;
use shadow2::paging::{
    Access, AccessKind, AdUpdate, ControlState, CpuFeatures, PhysMem, WalkEnv, WalkFault, walk,
};
use shadow2::{Gpa, Gva};

const SAMPLE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/data/kvm-paging-sample.jsonl.xz"
);
const EXPECTED_CASES: usize = 21_365;
const PAGE_FAULT_VECTOR: u64 = 14;
const MISMATCHES_SHOWN: usize = 8;

#[derive(Debug, Deserialize)]
struct GuestCpuid {
    maxphyaddr: u8,
    pdpe1gb: u8,
    nx: u8,
}

#[derive(Debug, Deserialize)]
struct Case {
    id: u64,
    variant: String,
    leaf_level: String,
    access: String,
    cpl: u8,
    guest_cpuid: GuestCpuid,
    va: String,
    cr0: String,
    cr4: String,
    efer: String,
    cr3: String,
    rflags: String,
    target_pa: String,
    target_init: String,
    write_value: Option<String>,
    entries_in: BTreeMap<String, String>,
    entry_gpa: BTreeMap<String, String>,
    faulted: bool,
    vector: Option<u64>,
    error_code: Option<String>,
    entries_out: BTreeMap<String, String>,
    read_value: Option<String>,
    target_after: String,
}

fn hex(s: &str) -> Result<u64, String> {
    u64::from_str_radix(s.trim_start_matches("0x"), 16).map_err(|e| format!("bad hex {s:?}: {e}"))
}

fn hex_opt(s: &Option<String>, field: &str) -> Result<u64, String> {
    s.as_deref()
        .ok_or_else(|| format!("missing {field}"))
        .and_then(hex)
}

/// The level number of an `L1`..`L4` key.
fn level_of(key: &str) -> Result<u8, String> {
    key.strip_prefix('L')
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("bad level {key:?}"))
}

fn access_of(case: &Case) -> Result<Access, String> {
    let kind = match case.access.as_str() {
        "read" => AccessKind::Read,
        "write" => AccessKind::Write,
        "fetch" => AccessKind::Fetch,
        other => return Err(format!("unknown access {other:?}")),
    };
    Ok(Access::at_cpl(kind, case.cpl))
}

/// Runs one case; `Err` describes every way the walker disagreed with the CPU.
fn check(case: &Case) -> Result<(), String> {
    let ctl = ControlState {
        cr0: hex(&case.cr0)?,
        cr3: hex(&case.cr3)?,
        cr4: hex(&case.cr4)?,
        efer: hex(&case.efer)?,
        rflags: hex(&case.rflags)?,
        ..ControlState::default()
    };
    let feat = CpuFeatures {
        maxphyaddr: case.guest_cpuid.maxphyaddr,
        pdpe1gb: case.guest_cpuid.pdpe1gb != 0,
        nx: case.guest_cpuid.nx != 0,
    };
    let access = access_of(case)?;
    let target_pa = hex(&case.target_pa)?;

    let mut mem = SparseMem::default();
    // Entries sorted from L4 down to the leaf, each with its address.
    let mut entries = Vec::new();
    for (key, value) in &case.entries_in {
        let gpa = hex(case
            .entry_gpa
            .get(key)
            .ok_or_else(|| format!("no entry_gpa.{key}"))?)?;
        let expected_out = hex(case
            .entries_out
            .get(key)
            .ok_or_else(|| format!("no entries_out.{key}"))?)?;
        entries.push((level_of(key)?, gpa, expected_out));
        mem.insert(gpa, hex(value)?);
    }
    entries.sort_by_key(|&(level, _, _)| std::cmp::Reverse(level));
    mem.insert(target_pa, hex(&case.target_init)?);

    let env = WalkEnv {
        ctl: &ctl,
        feat: &feat,
        ad: AdUpdate::Set,
    };
    let result = walk(&mut mem, env, Gva::new(hex(&case.va)?), access);

    let mut problems = String::new();
    match (&result, case.faulted) {
        (Ok(t), false) => {
            if t.addr != Gpa::new(target_pa) {
                let _ = write!(problems, " addr {:?} != target_pa {target_pa:#x};", t.addr);
            }
            if let Err(p) = perform(case, &mut mem, t.addr) {
                problems.push_str(&p);
            }
        }
        (Err(failure), true) => {
            if case.vector != Some(PAGE_FAULT_VECTOR) {
                let _ = write!(problems, " recorded vector {:?}, walker #PF;", case.vector);
            }
            let expected = hex_opt(&case.error_code, "error_code")?;
            match failure.fault {
                WalkFault::PageFault(code) if u64::from(code.bits()) == expected => {}
                other => {
                    let _ = write!(problems, " fault {other:?} != error code {expected:#x};");
                }
            }
        }
        (Ok(t), true) => {
            let _ = write!(problems, " walker succeeded ({:?}), CPU faulted;", t.addr);
        }
        (Err(failure), false) => {
            let _ = write!(
                problems,
                " walker failed ({:?}), CPU succeeded;",
                failure.fault
            );
        }
    }

    let leaf_level = entries.last().map(|e| e.0);
    for &(level, gpa, expected) in &entries {
        let actual = mem.get(gpa).ok_or_else(|| format!("entry L{level} lost"))?;
        // A faulting walk may or may not set A in the entries above the leaf (SDM 4.8).
        let may_differ = if case.faulted && Some(level) != leaf_level {
            bits::A
        } else {
            0
        };
        if (actual ^ expected) & !may_differ != 0 {
            let _ = write!(problems, " L{level} after {actual:#x} != {expected:#x};");
        }
    }
    let target_after = mem.get(target_pa).unwrap_or_default();
    if target_after != hex(&case.target_after)? {
        let _ = write!(
            problems,
            " target after {target_after:#x} != {};",
            case.target_after
        );
    }

    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// Does the access the CPU did, through the walker's translation.
fn perform(case: &Case, mem: &mut SparseMem, addr: Gpa) -> Result<(), String> {
    match case.access.as_str() {
        "read" => {
            let value = mem.read_u64(addr).map_err(|e| format!(" read: {e:?};"))?;
            let expected = hex_opt(&case.read_value, "read_value")?;
            if value != expected {
                return Err(format!(" read {value:#x} != {expected:#x};"));
            }
        }
        "write" => {
            let value = hex_opt(&case.write_value, "write_value")?;
            mem.write_u64(addr, value)
                .map_err(|e| format!(" write: {e:?};"))?;
        }
        _ => {}
    }
    Ok(())
}

fn load_cases() -> Result<Vec<Case>, String> {
    let file = std::fs::File::open(SAMPLE).map_err(|e| format!("open {SAMPLE}: {e}"))?;
    let mut text = Vec::new();
    lzma_rs::xz_decompress(&mut BufReader::new(file), &mut text)
        .map_err(|e| format!("decompress {SAMPLE}: {e}"))?;
    let text = String::from_utf8(text).map_err(|e| format!("{SAMPLE} is not UTF-8: {e}"))?;
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .enumerate()
        .map(|(n, line)| serde_json::from_str(line).map_err(|e| format!("line {}: {e}", n + 1)))
        .collect()
}

#[test]
fn walker_matches_every_kvm_case() {
    let cases = load_cases().unwrap();
    let mut checked = 0;
    let mut mismatches = Vec::new();
    for case in &cases {
        checked += 1;
        if let Err(problem) = check(case) {
            mismatches.push(format!(
                "case {} ({} {} {} cpl{} va {} cr0 {} cr4 {} efer {} rflags {}):{problem}",
                case.id,
                case.variant,
                case.leaf_level,
                case.access,
                case.cpl,
                case.va,
                case.cr0,
                case.cr4,
                case.efer,
                case.rflags
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {checked} cases disagree with the CPU; the first ones:\n{}",
        mismatches.len(),
        mismatches
            .iter()
            .take(MISMATCHES_SHOWN)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(
        checked, EXPECTED_CASES,
        "every recorded case must be checked"
    );
}

#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The simulator backend of the guest-operations interface: a tiny guest built through
//! `load_image` and driven only through `GuestOps`.

use shadow2::emulate::{CodeMode, Regs};
use shadow2::paging::{ControlState, PagingLevels, bits, bits::cr};
use shadow2_guest::{Fault, GuestOps, OpError};
use shadow2_machine::backend::{SimBackend, SimConfig};

const PAGE: u64 = 4096;
/// Upper-level entries: present, writable, user, accessed.
const TABLE: u64 = bits::P | bits::RW | bits::US | bits::A;
/// A supervisor data leaf with A and D set.
const SUP_DATA: u64 = bits::P | bits::RW | bits::A | bits::D;
/// A user data leaf with A and D set.
const USR_DATA: u64 = SUP_DATA | bits::US;

/// Guest frames of the 4-level guest.
const PML4: u64 = 1;
const PDPT: u64 = 2;
const PD: u64 = 3;
const PT: u64 = 4;
const SUP_FRAME: u64 = 16;
const USR_FRAME: u64 = 17;
const CODE_FRAME: u64 = 18;
const NEW_FRAME: u64 = 19;

/// The 4-level guest's mappings, from 2 MiB up (PML4[0], PDPT[0], PD[1], PT[i]).
const BASE: u64 = 0x20_0000;
const SUP_VA: u64 = BASE;
const USR_VA: u64 = BASE + PAGE;
const CODE_VA: u64 = BASE + 2 * PAGE;
/// The leaf table itself, mapped supervisor-writable (the guest's own view of its PT).
const PT_VA: u64 = BASE + 3 * PAGE;
/// Not present until the guest writes PT[5].
const NEW_VA: u64 = BASE + 5 * PAGE;

fn put_u64(sim: &mut SimBackend, gpa: u64, value: u64) {
    sim.load_image(gpa, &value.to_le_bytes())
        .expect("load_image");
}

fn put_u32(sim: &mut SimBackend, gpa: u64, value: u32) {
    sim.load_image(gpa, &value.to_le_bytes())
        .expect("load_image");
}

fn read_u64(sim: &mut SimBackend, va: u64, cpl: u8) -> Result<u64, OpError> {
    let mut buf = [0u8; 8];
    sim.read(0, va, cpl, &mut buf)?;
    Ok(u64::from_le_bytes(buf))
}

fn long_mode(cr3: u64) -> ControlState {
    ControlState {
        cr0: cr::CR0_PE | cr::CR0_PG | cr::CR0_WP,
        cr3,
        cr4: cr::CR4_PAE,
        efer: cr::EFER_LME | cr::EFER_LMA,
        ..ControlState::default()
    }
}

/// A 4-level guest on 4-level shadows, paging on.
fn four_level_guest(cfg: SimConfig) -> SimBackend {
    let mut sim = SimBackend::new(cfg).expect("a machine");
    put_u64(&mut sim, PML4 * PAGE, (PDPT * PAGE) | TABLE);
    put_u64(&mut sim, PDPT * PAGE, (PD * PAGE) | TABLE);
    put_u64(&mut sim, PD * PAGE + 8, (PT * PAGE) | TABLE);
    put_u64(&mut sim, PT * PAGE, (SUP_FRAME * PAGE) | SUP_DATA);
    put_u64(&mut sim, PT * PAGE + 8, (USR_FRAME * PAGE) | USR_DATA);
    put_u64(&mut sim, PT * PAGE + 16, (CODE_FRAME * PAGE) | SUP_DATA);
    put_u64(&mut sim, PT * PAGE + 24, (PT * PAGE) | SUP_DATA);
    // mov [rdi], rax
    sim.load_image(CODE_FRAME * PAGE, &[0x48, 0x89, 0x07])
        .expect("code");
    put_u64(&mut sim, NEW_FRAME * PAGE, 0x5eed_f00d);
    sim.set_control(0, long_mode(PML4 * PAGE))
        .expect("paging on");
    sim
}

#[track_caller]
fn assert_clean(sim: &SimBackend) {
    let r = sim.report();
    assert_eq!(
        r.oracle_mismatches, 0,
        "mismatches: {:?}",
        r.first_mismatches
    );
    assert_eq!(
        r.audit_violations, 0,
        "audit violations: {:?}",
        r.first_audit_violations
    );
    assert!(r.traps.shadow_fills > 0, "no shadow fills: {:?}", r.traps);
    assert!(r.pool_peak_pages > 0);
    assert!(r.pool_pages >= r.pool_peak_pages);
    assert!(r.engine_seconds > 0.0);
    assert!(r.stats.iter().any(|(n, v)| n == "faults" && *v > 0));
    assert_eq!(sim.machine().domain().failure(), None);
}

#[test]
fn four_level_guest_runs() {
    let mut cfg = SimConfig::new(PagingLevels::Four, 1, 64);
    cfg.sample_every = 1;
    cfg.audit_every = 1;
    let mut sim = four_level_guest(cfg);
    assert_eq!(sim.vcpus(), 1);
    assert_eq!(sim.ram_frames(), 64);

    // Round trip, at the page's end too.
    sim.write(0, SUP_VA + 8, 0, &0x1122_3344_5566_7788u64.to_le_bytes())
        .unwrap();
    assert_eq!(
        read_u64(&mut sim, SUP_VA + 8, 0).unwrap(),
        0x1122_3344_5566_7788
    );
    sim.write(0, USR_VA + PAGE - 4, 3, &[1, 2, 3, 4]).unwrap();
    let mut four = [0u8; 4];
    sim.read(0, USR_VA + PAGE - 4, 3, &mut four).unwrap();
    assert_eq!(four, [1, 2, 3, 4]);

    // A user access to a supervisor page: #PF with P|U (and W for a store).
    assert_eq!(
        read_u64(&mut sim, SUP_VA, 3),
        Err(OpError::Fault(Fault::PageFault {
            va: SUP_VA,
            code: 0b101
        }))
    );
    assert_eq!(
        sim.write(0, SUP_VA + 16, 3, &[0]),
        Err(OpError::Fault(Fault::PageFault {
            va: SUP_VA + 16,
            code: 0b111
        }))
    );

    // Not present: code 0 for a supervisor load, W for a store.
    assert_eq!(
        read_u64(&mut sim, NEW_VA, 0),
        Err(OpError::Fault(Fault::PageFault {
            va: NEW_VA,
            code: 0
        }))
    );
    assert_eq!(
        sim.write(0, NEW_VA + 8, 0, &[0]),
        Err(OpError::Fault(Fault::PageFault {
            va: NEW_VA + 8,
            code: 0b010
        }))
    );

    // The guest maps NEW_FRAME at NEW_VA with `mov [rdi], rax` into its own (shadowed)
    // leaf table; the next access sees it.
    let mut fetched = [0u8; 3];
    sim.fetch(0, CODE_VA, 0, &mut fetched).unwrap();
    assert_eq!(fetched, [0x48, 0x89, 0x07]);
    // The write traps: emulated, or (out-of-sync shadows, the simulator's default) the
    // page goes out of sync and the write runs natively.
    let unsyncs = |sim: &SimBackend| sim.machine().domain().out_of_sync_stats().unsyncs;
    let (emulated_before, unsyncs_before) = (sim.report().traps.emulated_writes, unsyncs(&sim));
    let mut regs = Regs::new(CodeMode::Bits64);
    regs.rip = CODE_VA;
    regs.gpr[Regs::RDI] = PT_VA + 5 * 8;
    regs.gpr[Regs::RAX] = (NEW_FRAME * PAGE) | SUP_DATA;
    sim.exec(0, &mut regs).unwrap();
    assert_eq!(regs.rip, CODE_VA + 3);
    assert!(
        sim.report().traps.emulated_writes > emulated_before || unsyncs(&sim) > unsyncs_before,
        "a write to a shadowed table neither emulated nor out of sync"
    );
    assert_eq!(read_u64(&mut sim, NEW_VA, 0).unwrap(), 0x5eed_f00d);
    assert_eq!(
        read_u64(&mut sim, PT_VA + 5 * 8, 0).unwrap(),
        regs.gpr[Regs::RAX]
    );

    // Unmap it again the same way, INVLPG, and it faults.
    regs.rip = CODE_VA;
    regs.gpr[Regs::RAX] = 0;
    sim.exec(0, &mut regs).unwrap();
    sim.invlpg(0, NEW_VA).unwrap();
    assert_eq!(
        read_u64(&mut sim, NEW_VA, 0),
        Err(OpError::Fault(Fault::PageFault {
            va: NEW_VA,
            code: 0
        }))
    );

    // Reloading CR3 keeps everything working.
    sim.set_cr3(0, PML4 * PAGE).unwrap();
    assert_eq!(
        read_u64(&mut sim, SUP_VA + 8, 0).unwrap(),
        0x1122_3344_5566_7788
    );

    assert_clean(&sim);
    let r = sim.report();
    let ops = sim.guest_ops();
    assert!(ops >= 15, "{ops} ops");
    assert_eq!(r.pool_series.len() as u64, ops);
    assert_eq!(r.pool_series.last().map(|s| s.0), Some(ops));
    assert!(r.traps.cr3_writes == 1 && r.traps.invlpg == 1 && r.traps.mode_changes == 1);
    assert_eq!(
        r.stats.len(),
        shadow2::stats::Stats::default().fields().len()
    );
    serde_json::to_string(&r).expect("the report serialises");
}

#[test]
fn caller_bugs_are_backend_errors() {
    let mut sim = four_level_guest(SimConfig::new(PagingLevels::Four, 2, 64));
    let mut buf = [0u8; 8];
    assert!(matches!(
        sim.read(0, SUP_VA + PAGE - 4, 0, &mut buf),
        Err(OpError::Backend(_))
    ));
    assert!(matches!(
        sim.write(0, SUP_VA + PAGE - 1, 0, &[0, 0]),
        Err(OpError::Backend(_))
    ));
    assert!(matches!(
        sim.read(2, SUP_VA, 0, &mut buf),
        Err(OpError::Backend(_))
    ));
    assert!(matches!(sim.set_cr3(7, 0), Err(OpError::Backend(_))));
    assert!(matches!(
        sim.load_image(64 * PAGE - 4, &[0; 8]),
        Err(OpError::Backend(_))
    ));
    assert!(matches!(
        sim.load_image(u64::MAX - 2, &[0; 8]),
        Err(OpError::Backend(_))
    ));
    // An instruction the simulated CPU does not execute is #UD.
    sim.load_image(CODE_FRAME * PAGE + 16, &[0x90]).unwrap();
    let mut regs = Regs::new(CodeMode::Bits64);
    regs.rip = CODE_VA + 16;
    assert_eq!(
        sim.exec(0, &mut regs),
        Err(OpError::Fault(Fault::InvalidOpcode))
    );
    // Vcpu 1 has paging off: it sees guest-physical memory.
    let mut phys = [0u8; 8];
    sim.read(1, NEW_FRAME * PAGE, 0, &mut phys).unwrap();
    assert_eq!(u64::from_le_bytes(phys), 0x5eed_f00d);
    // Outside RAM is MMIO: reads as zeros, stores dropped.
    let mut mmio = [0xffu8; 8];
    sim.read(1, 1000 * PAGE, 0, &mut mmio).unwrap();
    assert_eq!(mmio, [0; 8]);
    sim.write(1, 1000 * PAGE, 0, &[1, 2, 3]).unwrap();
    assert!(sim.report().traps.mmio >= 2);
    assert!(SimBackend::new(SimConfig::new(PagingLevels::Four, 0, 16)).is_err());
    let r = sim.report();
    assert_eq!(r.oracle_mismatches, 0, "{:?}", r.first_mismatches);
    assert_eq!(r.audit_violations, 0, "{:?}", r.first_audit_violations);
}

#[test]
fn two_level_guest_on_three_level_shadows() {
    // PD at frame 1, PT at frame 2, mappings from 4 MiB (PD[1]).
    const PD2: u64 = 1;
    const PT2: u64 = 2;
    const BASE2: u64 = 0x40_0000;
    let mut cfg = SimConfig::new(PagingLevels::Three, 1, 32);
    cfg.audit_every = 3;
    let mut sim = SimBackend::new(cfg).unwrap();
    let t = |v: u64| u32::try_from(v).unwrap();
    put_u32(&mut sim, PD2 * PAGE + 4, t((PT2 * PAGE) | TABLE));
    put_u32(&mut sim, PT2 * PAGE, t((SUP_FRAME * PAGE) | SUP_DATA));
    put_u32(&mut sim, PT2 * PAGE + 4, t((USR_FRAME * PAGE) | USR_DATA));
    put_u32(&mut sim, PT2 * PAGE + 8, t((CODE_FRAME * PAGE) | SUP_DATA));
    put_u32(&mut sim, PT2 * PAGE + 12, t((PT2 * PAGE) | SUP_DATA));
    // mov [edi], eax
    sim.load_image(CODE_FRAME * PAGE, &[0x89, 0x07]).unwrap();
    put_u32(&mut sim, NEW_FRAME * PAGE, 0x0bad_cafe);
    sim.set_control(
        0,
        ControlState {
            cr0: cr::CR0_PE | cr::CR0_PG | cr::CR0_WP,
            cr3: PD2 * PAGE,
            cr4: cr::CR4_PSE,
            ..ControlState::default()
        },
    )
    .unwrap();

    sim.write(0, BASE2 + PAGE + 12, 3, &[9, 8, 7, 6]).unwrap();
    let mut four = [0u8; 4];
    sim.read(0, BASE2 + PAGE + 12, 3, &mut four).unwrap();
    assert_eq!(four, [9, 8, 7, 6]);
    assert_eq!(
        sim.read(0, BASE2, 3, &mut four),
        Err(OpError::Fault(Fault::PageFault {
            va: BASE2,
            code: 0b101
        }))
    );
    let new_va = BASE2 + 5 * PAGE;
    assert_eq!(
        sim.read(0, new_va, 0, &mut four),
        Err(OpError::Fault(Fault::PageFault {
            va: new_va,
            code: 0
        }))
    );
    let mut regs = Regs::new(CodeMode::Bits32);
    regs.rip = BASE2 + 2 * PAGE;
    regs.gpr[Regs::RDI] = BASE2 + 3 * PAGE + 5 * 4;
    regs.gpr[Regs::RAX] = (NEW_FRAME * PAGE) | SUP_DATA;
    sim.exec(0, &mut regs).unwrap();
    assert_eq!(regs.rip, BASE2 + 2 * PAGE + 2);
    sim.read(0, new_va, 0, &mut four).unwrap();
    assert_eq!(u32::from_le_bytes(four), 0x0bad_cafe);
    assert_clean(&sim);
}

#[test]
fn linear_maps_and_hints_reach_the_engine() {
    let mut cfg = SimConfig::new(PagingLevels::Four, 1, 64);
    cfg.linear_maps = vec![shadow2::remove::LinearMapHint::DirectMap {
        va_base: 0xffff_8880_0000_0000,
        gfn_base: 0,
        frames: 64,
    }];
    cfg.teardown = shadow2::remove::TeardownHints::ALL;
    let config = cfg.domain_config().unwrap();
    assert_eq!(config.linear_maps[0], Some(cfg.linear_maps[0]));
    assert_eq!(config.teardown, shadow2::remove::TeardownHints::ALL);
    let sim = SimBackend::new(cfg.clone()).unwrap();
    assert_eq!(
        sim.machine().domain().config().linear_maps[0],
        Some(cfg.linear_maps[0])
    );
    cfg.linear_maps = vec![cfg.linear_maps[0]; 5];
    assert!(SimBackend::new(cfg).is_err());
}

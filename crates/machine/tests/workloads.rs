//! Every workload on every pair each guest model supports, small, on the simulator with the
//! oracle on every access and a full audit at the end: 0 mismatches, 0 violations, and the
//! guest sees exactly the data it wrote.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use shadow2::paging::PagingLevels;
use shadow2_guest::{GuestModel, RunSpec, Workload};
use shadow2_machine::backend::{SimBackend, SimConfig};

fn small(w: Workload) -> u64 {
    match w {
        Workload::Forkwait => 6,
        Workload::Demand => 2,
        Workload::MmapChurn => 8,
        Workload::Ctxswitch => 40,
        Workload::Kbuild => 5,
    }
}

fn run_one(guest: GuestModel, workload: Workload, pair_index: usize, seed: u64) {
    let pair = guest.pairs()[pair_index];
    let spec = RunSpec {
        guest,
        workload,
        size: small(workload),
        pair,
        seed,
    };
    let levels = PagingLevels::from_count(pair.shadow).unwrap();
    let mut cfg = SimConfig::new(levels, guest.vcpus(), spec.ram_frames());
    cfg.linear_maps = shadow2_guest::linear_map_hints(&spec);
    let mut backend = SimBackend::new(cfg).unwrap();
    let counters = shadow2_guest::run(&spec, &mut backend, &mut |_, _| {})
        .unwrap_or_else(|e| panic!("{guest} {workload} {pair}: {e}"));
    let report = backend.report();
    let what = format!("{guest} {workload} {pair}");
    assert_eq!(
        report.oracle_mismatches, 0,
        "{what}: {:?}",
        report.first_mismatches
    );
    assert_eq!(
        report.audit_violations, 0,
        "{what}: {:?}",
        report.first_audit_violations
    );
    assert_eq!(counters.data_errors, 0, "{what}");
    assert!(counters.guest_ops > 0, "{what}");
    assert_eq!(counters.workload_steps, spec.size, "{what}");
    assert!(report.traps.total() > 0, "{what}");
    if std::env::var("WORKLOAD_STATS").is_ok() {
        eprintln!(
            "{what}: {:?}",
            report
                .stats
                .iter()
                .filter(|(_, n)| *n > 0)
                .collect::<Vec<_>>()
        );
    }
    eprintln!(
        "{what}: {} ops, {} traps {:?}, demand {} cow {} kills {}",
        counters.guest_ops,
        report.traps.total(),
        report.traps,
        counters.demand_faults,
        counters.cow_faults,
        counters.kills
    );
}

macro_rules! cases {
    ($($name:ident: $guest:expr;)*) => {$(
        #[test]
        fn $name() {
            for (i, _) in $guest.pairs().iter().enumerate() {
                for w in Workload::ALL {
                    run_one($guest, w, i, 1);
                }
            }
        }
    )*};
}

cases! {
    linux64: GuestModel::Linux64;
    windows_pae: GuestModel::WindowsPae;
    legacy32: GuestModel::Legacy32;
    boot: GuestModel::Boot;
    smp_boot: GuestModel::SmpBoot;
}

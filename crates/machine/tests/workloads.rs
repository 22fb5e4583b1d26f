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
    run_sized(guest, workload, pair_index, seed, small(workload), None);
}

fn run_sized(
    guest: GuestModel,
    workload: Workload,
    pair_index: usize,
    seed: u64,
    size: u64,
    pool_pages: Option<usize>,
) -> (shadow2_guest::Counters, shadow2_machine::backend::SimReport) {
    run_configured(guest, workload, pair_index, seed, size, |cfg| {
        if let Some(p) = pool_pages {
            cfg.pool_pages = p;
        }
    })
}

fn run_configured(
    guest: GuestModel,
    workload: Workload,
    pair_index: usize,
    seed: u64,
    size: u64,
    configure: impl FnOnce(&mut SimConfig),
) -> (shadow2_guest::Counters, shadow2_machine::backend::SimReport) {
    let pair = guest.pairs()[pair_index];
    let spec = RunSpec {
        guest,
        workload,
        size,
        pair,
        seed,
    };
    let levels = PagingLevels::from_count(pair.shadow).unwrap();
    let mut cfg = SimConfig::new(levels, guest.vcpus(), spec.ram_frames());
    cfg.linear_maps = shadow2_guest::linear_map_hints(&spec);
    cfg.audit_every = 500;
    configure(&mut cfg);
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
    (counters, report)
}

#[test]
fn the_smallest_pool_evicts_and_stays_correct() {
    for guest in GuestModel::ALL {
        for (i, _) in guest.pairs().iter().enumerate() {
            let min = 8 * guest.vcpus() + 16;
            let (_, report) = run_sized(guest, Workload::Ctxswitch, i, 3, 200, Some(min));
            assert!(
                report.evictions > 0,
                "{guest}: no evictions in a pool of {min}"
            );
        }
    }
}

#[test]
fn a_job_that_writes_its_text_is_killed() {
    for guest in GuestModel::ALL {
        let (counters, _) = run_sized(guest, Workload::Kbuild, 0, 1, 16, None);
        assert_eq!(counters.kills, 1, "{guest}");
    }
}

#[test]
fn the_same_seed_gives_the_same_run_and_another_seed_another() {
    let a = run_sized(GuestModel::Linux64, Workload::Kbuild, 0, 7, 6, None).0;
    let b = run_sized(GuestModel::Linux64, Workload::Kbuild, 0, 7, 6, None).0;
    let c = run_sized(GuestModel::Linux64, Workload::Kbuild, 0, 8, 6, None).0;
    assert_eq!(a, b);
    assert_ne!(a.digest, c.digest);
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

#[test]
fn demand_faults_next_door_take_the_fast_path() {
    // The first not-present fault in a table marks its neighbours (prefetch), so most
    // demand faults after it are recognised from the shadow entry alone. 2-level shadows
    // have no reserved bits to mark with. Out of sync, a table's markers may be stale and
    // its faults go the slow way: this is the in-sync engine.
    for (guest, i) in [
        (GuestModel::Linux64, 0),
        (GuestModel::WindowsPae, 0),
        (GuestModel::Legacy32, 1),
    ] {
        let (counters, report) = run_configured(guest, Workload::Demand, i, 1, 4, |cfg| {
            cfg.out_of_sync = false;
        });
        assert!(counters.demand_faults >= 1024, "{guest}");
        assert!(
            report.traps.fast_path * 4 > report.traps.propagated * 3,
            "{guest}: {:?}",
            report.traps
        );
    }
}

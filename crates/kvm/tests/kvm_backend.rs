#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Guest models run on KVM vcpus on the engine's shadows, compared with the same model on
//! the simulator: every value the guest read and every fault it took (the run's digest),
//! and every counter, must be the same. Where KVM is missing or cannot run the pair, each
//! test says why and returns.

use shadow2::Gpa;
use shadow2::paging::PagingLevels;
use shadow2::remove::TeardownHints;
use shadow2_guest::outcomes::{Outcomes, differences, first_difference};
use shadow2_guest::{GuestModel, PairName, RunSpec, Workload};
use shadow2_kvm::{KvmBackend, KvmBackendConfig, NativeBackend, Probe};
use shadow2_machine::backend::{SimBackend, SimConfig};

fn probe_for(pair: PairName) -> Option<Probe> {
    let probe = match Probe::run() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("skipped: {e}");
            return None;
        }
    };
    let runs = probe.runnable.iter().any(|p| p.name() == pair.to_string());
    if !runs {
        eprintln!("skipped: this host cannot run {pair}: {probe}");
        return None;
    }
    Some(probe)
}

fn same_on_both(guest: GuestModel, workload: Workload, pair: &str, size: u64) {
    let pair = PairName::parse(pair).expect("pair");
    let Some(probe) = probe_for(pair) else { return };
    let spec = RunSpec {
        guest,
        workload,
        size,
        pair,
        seed: 1,
    };
    let levels = PagingLevels::from_count(pair.shadow).expect("levels");
    let mut cfg = SimConfig::new(levels, guest.vcpus(), spec.ram_frames());
    cfg.linear_maps = shadow2_guest::linear_map_hints(&spec);
    cfg.teardown = TeardownHints::ALL;
    let pool_pages = cfg.pool_pages;
    let mut sim = Outcomes::new(SimBackend::new(cfg).expect("sim"));
    let on_sim = shadow2_guest::run(&spec, &mut sim, &mut |_, _| {}).expect("sim run");
    let (sim, sim_ops) = sim.into_parts();

    let mut kvm =
        Outcomes::new(KvmBackend::new(&probe, &config(&spec, pool_pages)).expect("kvm backend"));
    let started = std::time::Instant::now();
    let on_kvm = shadow2_guest::run(&spec, &mut kvm, &mut |_, _| {}).expect("kvm run");
    let (kvm, kvm_ops) = kvm.into_parts();
    assert_eq!(
        first_difference(&sim_ops, &kvm_ops),
        None,
        "guest operations that saw different results on KVM: {}",
        differences(&sim_ops, &kvm_ops)
    );
    eprintln!(
        "{} ops in {:?}: {}",
        on_kvm.guest_ops,
        started.elapsed(),
        kvm.exits()
    );
    eprintln!("sim traps: {:?}", sim.report().traps);
    assert_eq!(on_kvm, on_sim, "the guest saw different results on KVM");
    let words = differing_words(
        &spec,
        |gpa, buf| {
            sim.machine()
                .read_phys(Gpa::new(gpa), buf)
                .expect("sim memory")
        },
        |gpa, buf| kvm.read_guest_phys(gpa, buf).expect("kvm memory"),
    );
    assert_eq!(words, 0, "final guest memory differs from the simulator's");

    if let Err(why) = NativeBackend::can_run(&spec.paging_levels()) {
        eprintln!("native skipped: {why}");
        return;
    }
    let mut native =
        Outcomes::new(NativeBackend::new(&probe, &config(&spec, pool_pages)).expect("native"));
    let started = std::time::Instant::now();
    let on_native = shadow2_guest::run(&spec, &mut native, &mut |_, _| {}).expect("native run");
    let (native, native_ops) = native.into_parts();
    assert_eq!(
        first_difference(&sim_ops, &native_ops),
        None,
        "guest operations that saw different results natively: {}",
        differences(&sim_ops, &native_ops)
    );
    eprintln!("native: {:?}: {}", started.elapsed(), native.exits());
    assert_eq!(
        on_native, on_sim,
        "the guest saw different results natively"
    );
    let words = differing_words(
        &spec,
        |gpa, buf| {
            sim.machine()
                .read_phys(Gpa::new(gpa), buf)
                .expect("sim memory")
        },
        |gpa, buf| native.read_guest_phys(gpa, buf).expect("native memory"),
    );
    assert_eq!(words, 0, "final guest memory differs from native's");
}

/// The KVM machine for `spec`, with the simulator's pool size (native paging has none).
fn config(spec: &RunSpec, pool_pages: usize) -> KvmBackendConfig {
    KvmBackendConfig {
        ram_frames: spec.ram_frames(),
        vcpus: spec.guest.vcpus(),
        pool_pages,
        linear_maps: shadow2_guest::linear_map_hints(spec),
        teardown: TeardownHints::ALL,
        vcpu_threads: spec.guest.vcpus() > 1,
    }
}

/// The 8-byte words of guest RAM that differ between two backends (the first few printed).
fn differing_words(
    spec: &RunSpec,
    mut a: impl FnMut(u64, &mut [u8]),
    mut b: impl FnMut(u64, &mut [u8]),
) -> u64 {
    let mut pa = vec![0u8; 4096];
    let mut pb = vec![0u8; 4096];
    let mut n = 0;
    for gfn in 0..spec.ram_frames() {
        a(gfn << 12, &mut pa);
        b(gfn << 12, &mut pb);
        for (i, (x, y)) in pa.chunks_exact(8).zip(pb.chunks_exact(8)).enumerate() {
            if x != y {
                if n < 8 {
                    eprintln!(
                        "gpa {:#x}: {:02x?} vs {:02x?}",
                        (gfn << 12) + 8 * i as u64,
                        x,
                        y
                    );
                }
                n += 1;
            }
        }
    }
    n
}

#[test]
fn linux64_forkwait_4on4_matches_the_simulator() {
    same_on_both(GuestModel::Linux64, Workload::Forkwait, "4on4", 3);
}

#[test]
fn boot_forkwait_0on4_matches_the_simulator() {
    same_on_both(GuestModel::Boot, Workload::Forkwait, "0on4", 3);
}

#[test]
fn legacy32_forkwait_2on4_matches_the_simulator() {
    same_on_both(GuestModel::Legacy32, Workload::Forkwait, "2on4", 3);
}

#[test]
fn windows_pae_forkwait_3on4_matches_the_simulator() {
    same_on_both(GuestModel::WindowsPae, Workload::Forkwait, "3on4", 3);
}

#[test]
fn smp_boot_forkwait_4on4_matches_the_simulator() {
    same_on_both(GuestModel::SmpBoot, Workload::Forkwait, "4on4", 3);
}

#[test]
fn linux64_demand_4on4_matches_the_simulator() {
    same_on_both(GuestModel::Linux64, Workload::Demand, "4on4", 2);
}

//! The shadow pool under a hostile guest: exhaustion by a fork bomb, eviction of the tops
//! vcpus run on, and a pool shrink while they run.

use shadow2::domain::{ShadowOp, ShadowOpResult};

use crate::engine_support::{DATA, PAGING_PAIRS, hvm};
use crate::harness::{DATA_GFN, Xsa};

const X: u64 = 0x40_3000;

/// `n` address spaces, each mapping X to its own data frame (a fork bomb's processes).
fn processes(x: &mut Xsa, n: u64) -> Vec<u64> {
    (0..n)
        .map(|i| {
            let cr3 = x.space();
            x.map(cr3, X, DATA_GFN + i % 90, DATA);
            x.map(cr3, X + 0x1000, DATA_GFN + (i + 1) % 90, DATA);
            cr3
        })
        .collect()
}

/// XSA-410 family (2022): freeing the paging-memory pool could take unbounded time; the
/// family here is the pool under a guest's pressure. Replayed: a fork bomb on the smallest pool
/// the domain accepts: two vcpus switch among 40 address spaces and touch two regions in
/// each, forcing eviction on nearly every switch. Must hold: the domain never fails, every
/// access completes with the guest's data, and no vcpu ever runs on an evicted shadow.
#[test]
fn xsa_410_fork_bomb_on_the_smallest_pool() {
    for pair in PAGING_PAIRS {
        let min = hvm(pair.shadow(), 2, 0).min_pool_pages();
        let mut x = Xsa::new(pair, 2, min);
        let procs = processes(&mut x, 40);
        x.run(0, procs[0]);
        x.run(1, procs[1]);
        for round in 0..2u64 {
            for (i, &cr3) in procs.iter().enumerate() {
                let v = (i + round as usize) % 2;
                x.cr3(v, cr3).unwrap();
                x.write(v, X + 8 * round, i as u64).unwrap();
                assert_eq!(x.read(v, X + 0x1000 + 8 * round).unwrap(), 0, "{pair:?}");
            }
        }
        assert!(x.domain().stats().evictions > 0, "{pair:?}: no eviction");
    }
}

/// XSA-438 (2023): shadow code dropped its reference to a vcpu's top-level shadow too
/// early, so the top could be freed and reused while the vcpu still ran on it. Replayed on
/// the smallest pool: vcpu 0 stays in one address space while vcpu 1 churns through 40
/// others, evicting everything it can. Must hold: vcpu 0's hardware root (and PDPTE
/// registers) always name live shadows, and its accesses keep working.
#[test]
fn xsa_438_a_running_top_survives_eviction_by_another_vcpu() {
    for pair in PAGING_PAIRS {
        let min = hvm(pair.shadow(), 2, 0).min_pool_pages();
        let mut x = Xsa::new(pair, 2, min);
        let procs = processes(&mut x, 41);
        x.run(0, procs[0]);
        x.run(1, procs[1]);
        x.write(0, X, 7).unwrap();
        for &cr3 in &procs[1..] {
            x.cr3(1, cr3).unwrap();
            x.read(1, X).unwrap();
            x.read(1, X + 0x1000).unwrap();
            assert_eq!(x.read(0, X).unwrap(), 7, "{pair:?}");
        }
    }
}

/// XSA-410 family, the host side: the pool is shrunk to its minimum in steps of one chunk
/// while two vcpus run, each step evicting tops, some of them in use; then grown back.
/// Must hold: each step hands out the flushes and reloads it owes, no vcpu runs on a freed
/// page, and the shrink finishes.
#[test]
fn xsa_410_pool_shrink_while_vcpus_run_on_their_tops() {
    for pair in PAGING_PAIRS {
        let config = hvm(pair.shadow(), 2, 0);
        let mut x = Xsa::new(pair, 2, 192);
        let procs = processes(&mut x, 30);
        x.run(0, procs[0]);
        x.run(1, procs[1]);
        for (i, &cr3) in procs.iter().enumerate() {
            x.cr3(i % 2, cr3).unwrap();
            x.read(i % 2, X).unwrap();
        }
        for target in [config.min_pool_pages(), 160] {
            let mut steps = 0;
            loop {
                let r = x.host("pool resize step", |d| {
                    d.shadow_op(ShadowOp::SetPoolSize {
                        pages: target,
                        budget: 1,
                    })
                });
                match r {
                    Ok(ShadowOpResult::Done) => break,
                    Ok(_) | Err(shadow2::domain::EngineError::Preempted) => {}
                    Err(e) => panic!("{pair:?}: {e}"),
                }
                steps += 1;
                assert!(steps < 2000, "{pair:?}: the resize never ends");
                let v = steps % 2;
                x.cr3(v, procs[steps % procs.len()]).unwrap();
                x.read(v, X).unwrap();
            }
            assert_eq!(x.domain().pool().total_pages(), target, "{pair:?}");
        }
    }
}

/// Issue 10, deferred free across the steps of one host call: `set_pool_size` runs its
/// bounded steps one after the other without the host carrying out a flush in between, so
/// pages torn down by one step must not be given back by the next while vcpus may still
/// walk them. Played: two vcpus on wide address spaces, then the whole shrink to the
/// minimum as single host calls (each answered `Preempted` while pages wait for a flush).
/// Must hold: no call gives back or reuses a page a running vcpu could reach before it, and
/// the shrink ends. (Coverage of the whole-operation path: the layout here did not make the
/// engine before its fix give a reachable page back.)
#[test]
fn issue10_a_whole_pool_shrink_in_one_call_waits_for_the_flush() {
    for pair in PAGING_PAIRS {
        let min = hvm(pair.shadow(), 2, 0).min_pool_pages();
        let mut x = Xsa::new(pair, 2, 192);
        let procs = processes(&mut x, 4);
        // Both running address spaces are wide: at the minimum pool their own shadows go.
        let wide: Vec<u64> = (1..28u64).map(|k| X + k * 0x40_0000).collect();
        for (p, &cr3) in procs.iter().take(2).enumerate() {
            for (k, &va) in wide.iter().enumerate() {
                x.map(cr3, va, DATA_GFN + (p * 28 + k) as u64, DATA);
            }
        }
        x.run(0, procs[0]);
        x.run(1, procs[1]);
        for v in 0..2 {
            for &va in &wide {
                x.read(v, va).unwrap();
            }
        }
        let mut calls = 0;
        loop {
            calls += 1;
            assert!(calls < 100, "{pair:?}: the shrink never ends");
            match x.host("whole pool shrink", |d| {
                d.set_pool_size(min).map(|f| ((), f))
            }) {
                Ok(()) => break,
                Err(shadow2::domain::EngineError::Preempted) => {}
                Err(e) => panic!("{pair:?}: {e}"),
            }
        }
        assert_eq!(x.domain().pool().total_pages(), min, "{pair:?}");
        assert_eq!(x.read(0, X).unwrap(), x.read(1, X).unwrap(), "{pair:?}");
    }
}

/// Issue 10, deferred free (the class behind XSA-438's use-after-free): in a fork-heavy
/// run on the smallest pool, vcpu 1's CR3 loads and page faults evict shadows (and blow
/// the tables) to make room while vcpu 0 keeps running on a wide address space. Each is one
/// engine call whose flush reaches vcpu 0 only when the call returns. Must hold: no shadow page vcpu 0 could reach before
/// a fault is reused as another shadow by the end of that fault (it must wait for the
/// flush), and vcpu 0's accesses keep working.
#[test]
fn issue10_faults_never_reuse_a_page_another_vcpu_can_reach() {
    for pair in PAGING_PAIRS {
        let min = hvm(pair.shadow(), 2, 0).min_pool_pages();
        let mut x = Xsa::new(pair, 2, min);
        let procs = processes(&mut x, 30);
        // vcpu 0's space is wide: its shadows fill most of the pool, so vcpu 1's fills
        // need more than evicting idle tops gives.
        let wide: Vec<u64> = (1..28u64).map(|k| X + k * 0x40_0000).collect();
        for (k, &va) in wide.iter().enumerate() {
            x.map(procs[0], va, DATA_GFN + k as u64, DATA);
        }
        x.run(0, procs[0]);
        x.run(1, procs[1]);
        x.write(0, X, 9).unwrap();
        for &va in &wide {
            x.read(0, va).unwrap();
        }
        for &cr3 in &procs[1..] {
            x.cr3(1, cr3).unwrap();
            for va in [X, X + 0x1000, super::harness::CODE_VA] {
                let r = x.fault(1, va);
                assert!(r.is_ok(), "{pair:?}: {r:?}");
            }
            x.read(1, X).unwrap();
            assert_eq!(x.read(0, X).unwrap(), 9, "{pair:?}");
            for &va in &wide {
                x.read(0, va).unwrap();
            }
        }
        assert!(
            x.domain().stats().blow_tables > 0,
            "{pair:?}: the tables were never blown"
        );
    }
}

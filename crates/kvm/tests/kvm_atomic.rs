#![allow(clippy::unwrap_used, clippy::expect_used)]
//! KvmMemory's compare-exchange is one atomic access on the VM's mapping: two threads that
//! increment the same guest word through it (as `lock xadd` would) lose no increment.

use shadow2::paging::{Exchange, PhysMem};
use shadow2::{MachineMemory, Maddr};
use shadow2_kvm::{KvmMemory, Probe};

const INCREMENTS: u64 = 200_000;

/// Adds one to the word at `addr` with a compare-exchange loop; returns the lost races.
fn increment(mut mem: &KvmMemory, addr: Maddr) -> u64 {
    let mut lost = 0;
    let mut seen = mem.read_u64(addr).unwrap();
    loop {
        match mem.compare_exchange_u64(addr, seen, seen + 1).unwrap() {
            Exchange::Swapped => return lost,
            Exchange::Lost { actual } => {
                lost += 1;
                seen = actual;
            }
        }
    }
}

#[test]
fn two_threads_incrementing_through_kvm_memory_lose_nothing() {
    // The memory is the one a VM runs on; without KVM there is no such VM to share it with.
    if let Err(e) = Probe::run() {
        eprintln!("skipped: {e}");
        return;
    }
    let mut mem = KvmMemory::new(16).unwrap();
    let frame = mem.alloc_block(0).unwrap();
    // The next word must survive the hammering of its neighbour.
    let counter = Maddr::new(frame.base().raw() + 64);
    let neighbour = Maddr::new(frame.base().raw() + 72);
    mem.write_u64(neighbour, 0xfeed).unwrap();
    let shared = &mem;
    let lost: u64 = std::thread::scope(|s| {
        let workers: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(move || {
                    (0..INCREMENTS)
                        .map(|_| increment(shared, counter))
                        .sum::<u64>()
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).sum()
    });
    eprintln!("{lost} lost races retried");
    assert_eq!(mem.read_u64(counter).unwrap(), 2 * INCREMENTS);
    assert_eq!(mem.read_u64(neighbour).unwrap(), 0xfeed);
}

#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Vcpus on their own threads running at the same time: while one vcpu is inside `KVM_RUN`
//! (a long load), another changes a page-table entry both use; the engine's flush reaches
//! the running vcpu (kicked out of `KVM_RUN`, its root reloaded) before the change is
//! complete, so the entry is gone for it too. Without KVM the test says why and returns.

use shadow2::paging::ControlState;
use shadow2::paging::bits::{self, cr};
use shadow2::remove::TeardownHints;
use shadow2_guest::{Fault, GuestOps, OpError};
use shadow2_kvm::{KvmBackend, KvmBackendConfig, Probe, VcpuAnswer, VcpuOp};

const L4: u64 = 0x10000;
const L3: u64 = 0x30000;
const L2: u64 = 0x31000;
const L1: u64 = 0x32000;
const VA: u64 = 0x40_0000;
const DATA: u64 = 0x20000;
/// Where the guest's L1 is mapped, writable, for the kernel to edit.
const L1_VA: u64 = VA + 32 * 4096;
const SHARED_PAGE: u64 = 5;
const LONG_READ_PAGE: u64 = 3;

fn backend() -> Option<KvmBackend> {
    let probe = match Probe::run() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("skipped: {e}");
            return None;
        }
    };
    if !probe.runnable.iter().any(|p| p.name() == "4on4") {
        eprintln!("skipped: this host cannot run 4on4: {probe}");
        return None;
    }
    let cfg = KvmBackendConfig {
        ram_frames: 256,
        vcpus: 2,
        pool_pages: 256,
        linear_maps: Vec::new(),
        teardown: TeardownHints::NONE,
        vcpu_threads: true,
    };
    Some(KvmBackend::new(&probe, &cfg).expect("backend"))
}

fn put(b: &mut KvmBackend, gpa: u64, value: u64) {
    b.load_image(gpa, &value.to_le_bytes()).unwrap();
}

fn pte(page: u64) -> u64 {
    (DATA + page * 4096) | bits::P | bits::RW | bits::A | bits::D
}

#[test]
fn a_pte_removed_by_one_vcpu_is_gone_for_another_running_at_the_same_time() {
    let Some(mut b) = backend() else { return };
    let table = bits::P | bits::RW | bits::A;
    put(&mut b, L4, L3 | table);
    put(&mut b, L3 + ((VA >> 30) & 511) * 8, L2 | table);
    put(&mut b, L2 + ((VA >> 21) & 511) * 8, L1 | table);
    for page in 0..16 {
        put(&mut b, L1 + page * 8, pte(page));
        b.load_image(DATA + page * 4096, &[page as u8 + 1; 4096])
            .unwrap();
    }
    put(&mut b, L1 + 32 * 8, L1 | table | bits::D);
    let ctl = ControlState {
        cr0: cr::CR0_PE | cr::CR0_PG | cr::CR0_WP,
        cr3: L4,
        cr4: cr::CR4_PAE,
        efer: cr::EFER_LME | cr::EFER_LMA | cr::EFER_NXE,
        ..ControlState::default()
    };
    let shared = VA + SHARED_PAGE * 4096;
    for v in 0..2 {
        b.set_control(v, ctl).unwrap();
    }
    let mut byte = [0u8; 1];
    for round in 0..20 {
        // Both vcpus use the shared page (it is in both TLBs and shadows).
        for v in 0..2 {
            b.read(v, shared, 0, &mut byte).unwrap();
            assert_eq!(byte[0], SHARED_PAGE as u8 + 1);
        }
        // vcpu 1 runs a long load (kernel rep movsb, emulated by KVM: milliseconds) while
        // vcpu 0 removes the shared page's entry and invalidates it, as a kernel does
        // before a shootdown.
        b.start(
            1,
            VcpuOp::Read {
                va: VA + LONG_READ_PAGE * 4096,
                cpl: 0,
                len: 4096,
            },
        )
        .unwrap();
        b.write(0, L1_VA + SHARED_PAGE * 8, 0, &0u64.to_le_bytes())
            .unwrap();
        b.invlpg(0, shared).unwrap();
        match b.wait(1).unwrap() {
            VcpuAnswer::Bytes(bytes) => {
                assert!(bytes.iter().all(|&x| x == LONG_READ_PAGE as u8 + 1));
            }
            other => panic!("round {round}: {other:?}"),
        }
        // The entry is gone for vcpu 1 too: its access faults (not present).
        match b.read(1, shared, 0, &mut byte) {
            Err(OpError::Fault(Fault::PageFault { va, code })) => {
                assert_eq!(va, shared);
                assert_eq!(code & 1, 0, "not present");
            }
            other => panic!("round {round}: vcpu 1 still reaches the removed page: {other:?}"),
        }
        b.write(
            0,
            L1_VA + SHARED_PAGE * 8,
            0,
            &pte(SHARED_PAGE).to_le_bytes(),
        )
        .unwrap();
    }
    let exits = b.exits();
    eprintln!("{exits}; {} kicks", exits.kicks);
    assert!(
        exits.kicks > 0,
        "vcpu 1 was never in KVM_RUN when vcpu 0 flushed it"
    );
    let audit = shadow2::audit::audit(b.machine().domain());
    assert!(audit.violations.is_empty(), "{:?}", audit.violations);
}

//! p2m changes under live shadows: frames removed or remapped while vcpus hold
//! translations of them, and frames that are page tables (the top level included).

use shadow2::addr::{Gfn, Gpa, Maddr, Mfn};
use shadow2::domain::EngineError;
use shadow2::multi::Pair;
use shadow2::p2m::P2mType;
use shadow2::paging::{PagingLevels, PhysMem};
use shadow2_machine::sim::GuestError;

use crate::engine_support::{DATA, PAGING_PAIRS};
use crate::harness::{DATA_GFN, Xsa};

const X: u64 = 0x40_3000;

/// A guest on two vcpus sharing one address space, both holding a writable translation of
/// X (= `DATA_GFN`).
fn two_vcpus(pair: shadow2::multi::Pair) -> (Xsa, u64) {
    let mut x = Xsa::new(pair, 2, 128);
    let cr3 = x.space();
    x.map(cr3, X, DATA_GFN, DATA);
    x.run(0, cr3);
    x.run(1, cr3);
    x.write(0, X, 1).unwrap();
    x.write(1, X + 8, 2).unwrap();
    (x, cr3)
}

/// A copy of guest frame `gfn` in a fresh host frame.
fn copy_frame(x: &mut Xsa, gfn: u64) -> Mfn {
    let mut page = vec![0u8; 4096];
    x.m.read_phys(Gpa::new(gfn << 12), &mut page).unwrap();
    let mfn = x.host_frame();
    for (i, chunk) in page.chunks(8).enumerate() {
        let word = u64::from_le_bytes(chunk.try_into().unwrap());
        x.m.domain_mut()
            .host_mut()
            .write_u64(Maddr::new(mfn.base().raw() + 8 * i as u64), word)
            .unwrap();
    }
    mfn
}

/// XSA-294 (2019): shadow mode flushed too little when translations changed (with PCIDs),
/// so a vcpu kept using a translation of memory the guest had lost. Replayed on every pair:
/// two vcpus hold writable translations of a frame; the host removes it from the p2m, then
/// gives the gfn a new frame. Must hold: no vcpu's TLB maps the old frame once the call
/// returns, accesses are MMIO while the gfn is empty, and reach the new frame afterwards.
#[test]
fn xsa_294_p2m_removal_of_a_frame_cached_in_two_tlbs() {
    for pair in PAGING_PAIRS {
        let (mut x, _) = two_vcpus(pair);
        let old = x.mfn(DATA_GFN);
        x.set_p2m(DATA_GFN, None).unwrap();
        for v in 0..2 {
            let r = x.read(v, X);
            assert!(matches!(r, Err(GuestError::Mmio { .. })), "{pair:?}: {r:?}");
        }
        let new = x.host_frame();
        assert_ne!(new, old);
        x.set_p2m(DATA_GFN, Some((new, P2mType::Ram))).unwrap();
        for v in 0..2 {
            assert_eq!(x.read(v, X).unwrap(), 0, "{pair:?}");
        }
        x.write(1, X, 5).unwrap();
        assert_eq!(x.read(0, X).unwrap(), 5, "{pair:?}");
    }
}

/// XSA-294, on a page table: the host remaps the gfn of the L1 that maps X, while both
/// vcpus have X in their TLBs, to a copy whose PTE for X names another frame. Must hold:
/// the old L1's shadow is gone, the new frame is shadowed as the guest walks it, and both
/// vcpus see the new translation at once.
#[test]
fn xsa_294_remap_of_a_page_table_frame_while_vcpus_run() {
    for pair in PAGING_PAIRS {
        let (mut x, cr3) = two_vcpus(pair);
        let l1 = x.t.table_of(&mut x.m, cr3, X, 1);
        let copy = copy_frame(&mut x, l1);
        let eb = x.t.entry_bytes();
        let pte = ((DATA_GFN + 1) << 12) | DATA;
        let slot = copy.base().raw() + x.l1_index(X) * eb;
        x.m.domain_mut()
            .host_mut()
            .write_entry(Maddr::new(slot), eb, pte)
            .unwrap();
        x.m.write_phys(Gpa::new((DATA_GFN + 1) << 12), &[0x11])
            .unwrap();
        x.set_p2m(l1, Some((copy, P2mType::Ram))).unwrap();
        for v in 0..2 {
            assert_eq!(x.read(v, X).unwrap() & 0xff, 0x11, "{pair:?} vcpu {v}");
        }
    }
}

/// Issue 10: `set_p2m` of a vcpu's CR3 frame. The host remaps the guest's top-level table
/// to a copy, then removes it (a PAE guest keeps walking through the PDPTE registers it
/// loaded, SDM 4.4.1, so there the L2 its PDPTE names is removed too). Must hold: each
/// call either succeeds and hands out its flush and reloads, or fails having changed
/// nothing (the p2m entry as before); the TLBs never map the frame the guest lost.
#[test]
fn issue10_set_p2m_of_the_cr3_frame_hands_out_everything_it_owes() {
    for pair in PAGING_PAIRS {
        let (mut x, cr3) = two_vcpus(pair);
        let top = cr3 >> 12;
        let pae_l2 =
            (pair.guest() == PagingLevels::Three).then(|| x.t.table_of(&mut x.m, cr3, X, 2));
        let copy = copy_frame(&mut x, top);
        let before = x.domain().guest_frame(Gfn::new(top));
        match x.set_p2m(top, Some((copy, P2mType::Ram))) {
            Ok(()) => {
                for v in 0..2 {
                    assert_eq!(x.read(v, X).unwrap(), 1, "{pair:?}");
                }
            }
            Err(e) => {
                assert!(!e.is_fatal(), "{pair:?}: {e}");
                assert_eq!(x.domain().guest_frame(Gfn::new(top)), before, "{pair:?}");
            }
        }
        let mut lost = vec![top];
        if let Some(l2) = pae_l2 {
            x.set_p2m(top, None).unwrap();
            for v in 0..2 {
                assert_eq!(
                    x.read(v, X).unwrap(),
                    1,
                    "{pair:?}: the PDPTE registers hold"
                );
            }
            lost = vec![l2];
        }
        for gfn in lost {
            let before = x.domain().guest_frame(Gfn::new(gfn));
            match x.set_p2m(gfn, None) {
                Ok(()) => {
                    for v in 0..2 {
                        assert!(x.read(v, X).is_err(), "{pair:?}");
                    }
                }
                Err(e) => {
                    assert!(!e.is_fatal(), "{pair:?}: {e}");
                    assert_eq!(x.domain().guest_frame(Gfn::new(gfn)), before, "{pair:?}");
                }
            }
        }
    }
}

/// Issue 10: `set_p2m` accepted machine frames beyond MAXPHYADDR, one of which has the bit
/// the fast path uses as its marker (bit 51 of an entry), so the access never settles.
/// Must hold: such a frame is refused with an error that leaves the domain running, and
/// nothing changes.
#[test]
fn issue10_set_p2m_refuses_frames_beyond_maxphyaddr() {
    for pair in PAGING_PAIRS {
        let (mut x, _) = two_vcpus(pair);
        for bad in [
            Mfn::new(1 << 39),
            Mfn::new(1 << 36),
            Mfn::new(u64::MAX >> 12),
        ] {
            let before = x.domain().guest_frame(Gfn::new(DATA_GFN));
            let r = x.set_p2m(DATA_GFN, Some((bad, P2mType::Ram)));
            assert!(
                r.as_ref().is_err_and(|e| !e.is_fatal()),
                "{pair:?} {bad}: {r:?}"
            );
            assert_eq!(x.domain().guest_frame(Gfn::new(DATA_GFN)), before);
            assert_eq!(x.read(0, X).unwrap(), 1, "{pair:?}");
        }
    }
}

/// Issue 10, PV side: `remove_frame` of the frame a vcpu's CR3 names (a non-translated
/// domain gives its frames back one by one). Must hold: the call either succeeds and hands
/// out its flush and reloads (the vcpus then fault on the lost top, the hardware runs on
/// no freed shadow), or fails having changed nothing.
#[test]
fn issue10_remove_frame_of_the_cr3_frame_hands_out_everything_it_owes() {
    for pair in [Pair::P2on2, Pair::P2on4, Pair::P4on4] {
        let (mut x, data) = Xsa::pv(pair, 2, 24);
        let cr3 = x.space();
        x.map(cr3, X, data[1], DATA);
        x.run(0, cr3);
        x.run(1, cr3);
        x.write(0, X, 1).unwrap();
        x.write(1, X + 8, 2).unwrap();
        let top = Mfn::new(cr3 >> 12);
        let r = x.host("remove_frame of the CR3 frame", |d| {
            d.remove_frame(top).map(|f| ((), f))
        });
        let owned = x.domain().owned_frames().any(|f| f == top);
        match r {
            Ok(()) => assert!(!owned, "{pair:?}"),
            Err(e) => {
                assert!(!e.is_fatal(), "{pair:?}: {e}");
                assert!(owned, "{pair:?}: failed but the frame is gone");
            }
        }
        for v in 0..2 {
            let _ = x.read(v, X);
        }
    }
}

/// Issue 10: the host takes away the guest table a vcpu's root is built on (the CR3 frame,
/// or for a PAE guest the L2 its PDPTE register names), then gives the gfn its frame back.
/// The vcpus were left on a root without that table (every walk faults), and the engine
/// failed the domain at the next fault, whose guest walk now succeeded below a missing top.
/// Must hold: while the table is gone every access faults; once it is back the vcpus walk
/// it again and see the data they wrote.
#[test]
fn issue10_top_table_taken_away_and_given_back_is_walked_again() {
    for pair in PAGING_PAIRS {
        let (mut x, cr3) = two_vcpus(pair);
        let gfn = if pair.guest() == PagingLevels::Three {
            x.t.table_of(&mut x.m, cr3, X, 2)
        } else {
            cr3 >> 12
        };
        let mfn = x.mfn(gfn);
        x.set_p2m(gfn, None).unwrap();
        for v in 0..2 {
            let r = x.read(v, X);
            assert!(r.is_err(), "{pair:?}: {r:?}");
        }
        x.set_p2m(gfn, Some((mfn, P2mType::Ram))).unwrap();
        for v in 0..2 {
            assert_eq!(x.read(v, X).unwrap(), 1, "{pair:?} vcpu {v}");
            assert_eq!(x.read(v, X + 8).unwrap(), 2, "{pair:?} vcpu {v}");
        }
        x.write(1, X, 7).unwrap();
        assert_eq!(x.read(0, X).unwrap(), 7, "{pair:?}");
    }
}

/// Issue 10, PV side: a non-translated domain gives back the frame its CR3 names, then the
/// host returns it. Must hold: the vcpus fault while it is gone (no freed shadow is
/// walked), and walk it again once it is back.
#[test]
fn issue10_cr3_frame_removed_then_added_back_is_walked_again() {
    for pair in [Pair::P2on2, Pair::P2on4, Pair::P4on4] {
        let (mut x, data) = Xsa::pv(pair, 2, 24);
        let cr3 = x.space();
        x.map(cr3, X, data[1], DATA);
        x.run(0, cr3);
        x.run(1, cr3);
        x.write(0, X, 1).unwrap();
        let top = Mfn::new(cr3 >> 12);
        x.host("remove_frame of the CR3 frame", |d| {
            d.remove_frame(top).map(|f| ((), f))
        })
        .unwrap();
        for v in 0..2 {
            let r = x.read(v, X);
            assert!(r.is_err(), "{pair:?}: {r:?}");
        }
        x.host("add_frame of the CR3 frame", |d| {
            d.add_frame(top).map(|()| ((), shadow2::flush::Flush::NONE))
        })
        .unwrap();
        for v in 0..2 {
            assert_eq!(x.read(v, X).unwrap(), 1, "{pair:?} vcpu {v}");
        }
    }
}

/// Issue 10, the same with the pool full of shadows the vcpus can reach: the root rebuild
/// after the p2m change found no free block (the old top waits for the flush) and
/// answered `Preempted` with the p2m already changed, which tells the host the opposite.
/// Must hold: the call succeeds (its rebuild's blocks set aside before anything changes)
/// or fails having changed nothing; either way the vcpus keep a root and read X.
#[test]
fn issue10_set_p2m_of_the_cr3_frame_with_a_full_pool() {
    for pair in PAGING_PAIRS {
        let mut x = Xsa::new(pair, 2, 0);
        let cr3 = x.space();
        x.map(cr3, X, DATA_GFN, DATA);
        // One L1 per 4 MiB: more than the pool holds.
        let vas: Vec<u64> = (1..48u64).map(|k| X + k * 0x40_0000).collect();
        for &va in &vas {
            x.map(cr3, va, DATA_GFN + 1, DATA);
        }
        x.run(0, cr3);
        x.run(1, cr3);
        x.write(0, X, 1).unwrap();
        for &va in &vas {
            x.read(0, va).unwrap();
            x.read(1, va).unwrap();
        }
        let top = if pair.guest() == PagingLevels::Three {
            x.t.table_of(&mut x.m, cr3, X, 2)
        } else {
            cr3 >> 12
        };
        let copy = copy_frame(&mut x, top);
        let before = x.domain().guest_frame(Gfn::new(top));
        match x.set_p2m(top, Some((copy, P2mType::Ram))) {
            Ok(()) => assert_eq!(x.mfn(top), copy, "{pair:?}"),
            Err(e) => {
                assert!(!e.is_fatal(), "{pair:?}: {e}");
                assert_eq!(
                    x.domain().guest_frame(Gfn::new(top)),
                    before,
                    "{pair:?}: {e} after the p2m changed"
                );
            }
        }
        assert!(x.domain().rootless().is_empty(), "{pair:?}");
        for v in 0..2 {
            assert_eq!(x.read(v, X).unwrap(), 1, "{pair:?} vcpu {v}");
        }
    }
}

/// Issue 10, PV side, a page table below the top: the domain gives back the frame of the
/// L1 that maps X while both vcpus hold X in their TLBs, then gets it back. Must hold: the
/// call hands out its flush (no TLB or paging-structure cache keeps the L1's shadow), X
/// faults while the frame is gone, and is mapped again once it is back.
#[test]
fn issue10_remove_frame_of_a_page_table_while_vcpus_run() {
    for pair in [Pair::P2on2, Pair::P2on4, Pair::P4on4] {
        let (mut x, data) = Xsa::pv(pair, 2, 24);
        let cr3 = x.space();
        x.map(cr3, X, data[1], DATA);
        x.run(0, cr3);
        x.run(1, cr3);
        x.write(0, X, 1).unwrap();
        x.write(1, X + 8, 2).unwrap();
        let l1 = Mfn::new(x.t.table_of(&mut x.m, cr3, X, 1));
        x.host("remove_frame of an L1", |d| {
            d.remove_frame(l1).map(|f| ((), f))
        })
        .unwrap();
        assert!(!x.domain().shadows().is_page_table(l1), "{pair:?}");
        for v in 0..2 {
            let r = x.read(v, X);
            assert!(r.is_err(), "{pair:?}: {r:?}");
        }
        x.host("add_frame of the L1", |d| {
            d.add_frame(l1).map(|()| ((), shadow2::flush::Flush::NONE))
        })
        .unwrap();
        for v in 0..2 {
            assert_eq!(x.read(v, X).unwrap(), 1, "{pair:?} vcpu {v}");
        }
    }
}

/// Issue 10, host-side bad arguments: `remove_frame` of a frame the domain does not own,
/// or on a translated domain (whose frames leave through the p2m), did a full removal scan
/// and owed a flush for nothing. Must hold: refused at once, nothing changes.
#[test]
fn issue10_remove_frame_refuses_frames_the_domain_does_not_own() {
    let (mut x, _) = Xsa::pv(Pair::P4on4, 1, 24);
    let stranger = x.host_frame();
    let flushes = x.domain().stats().flushes;
    let r = x.host("remove_frame of a stranger", |d| {
        d.remove_frame(stranger).map(|f| ((), f))
    });
    assert!(matches!(r, Err(EngineError::BadArgument(_))), "{r:?}");
    assert_eq!(x.domain().stats().flushes, flushes);
    let mut x = Xsa::new(Pair::P4on4, 1, 128);
    let mfn = x.mfn(DATA_GFN);
    let r = x.host("remove_frame on a translated domain", |d| {
        d.remove_frame(mfn).map(|f| ((), f))
    });
    assert!(matches!(r, Err(EngineError::BadArgument(_))), "{r:?}");
    assert_eq!(x.mfn(DATA_GFN), mfn);
}

/// XSA-273 (L1TF) from the host's side: MMIO markers point into the upper half of the
/// host's MAXPHYADDR, so guest RAM there would be what a speculative load through one
/// reads. Must hold: `set_p2m` refuses RAM there (nothing changes) and accepts MMIO there.
#[test]
fn issue10_set_p2m_refuses_ram_where_mmio_markers_point() {
    for pair in PAGING_PAIRS {
        let (mut x, _) = two_vcpus(pair);
        let maxphyaddr = x.domain().config().host_maxphyaddr;
        let upper = Mfn::new(1 << (maxphyaddr - 13));
        let before = x.domain().guest_frame(Gfn::new(DATA_GFN));
        let r = x.set_p2m(DATA_GFN, Some((upper, P2mType::Ram)));
        assert!(
            matches!(r, Err(EngineError::BadArgument(_))),
            "{pair:?}: {r:?}"
        );
        assert_eq!(x.domain().guest_frame(Gfn::new(DATA_GFN)), before);
        assert_eq!(x.read(0, X).unwrap(), 1, "{pair:?}");
        let max_mfn = x.domain().p2m().unwrap().max_mfn();
        if upper < max_mfn {
            x.set_p2m(DATA_GFN + 5, Some((upper, P2mType::Mmio)))
                .unwrap();
        }
    }
}

/// Issue 10, PV side of the MAXPHYADDR check: `add_frame` gave a non-translated domain any
/// frame that was not hypervisor-side, so its page tables could name frames beyond the
/// host's MAXPHYADDR (entries the hardware faults on for ever) or where MMIO markers point.
/// Must hold: both refused, the domain's frames unchanged.
#[test]
fn issue10_add_frame_refuses_frames_beyond_maxphyaddr_or_where_markers_point() {
    for pair in [Pair::P2on4, Pair::P4on4] {
        let (mut x, _) = Xsa::pv(pair, 1, 8);
        let maxphyaddr = x.domain().config().host_maxphyaddr;
        let owned = x.domain().owned_frames().count();
        for bad in [
            Mfn::new(1 << (maxphyaddr - 12)),
            Mfn::new(1 << (maxphyaddr - 13)),
            Mfn::new(u64::MAX >> 12),
        ] {
            let r = x.host("add_frame", |d| {
                d.add_frame(bad).map(|()| ((), shadow2::flush::Flush::NONE))
            });
            assert!(
                matches!(r, Err(EngineError::BadArgument(_))),
                "{pair:?} {bad}: {r:?}"
            );
            assert_eq!(x.domain().owned_frames().count(), owned);
        }
    }
}

/// Issue 10: a guest loads CR3 with a top table at a gfn that is not RAM yet (the CPU
/// refuses no such load; the engine answered #GP), touches memory, and the host then
/// populates the gfn with the table. Must hold: the load succeeds, accesses fault as
/// through a not-present table while the gfn is empty, and the vcpu walks the table once
/// it is RAM, with no CR3 load in between.
#[test]
fn issue10_cr3_naming_a_gfn_the_host_populates_later() {
    for pair in PAGING_PAIRS {
        if pair.guest() == PagingLevels::Three {
            // Its CR3 names the PDPT, read into registers at the load (see pdpte.rs).
            continue;
        }
        let mut x = Xsa::new(pair, 1, 128);
        let old = x.space();
        x.map(old, X, DATA_GFN, DATA);
        x.run(0, old);
        x.write(0, X, 9).unwrap();
        let cr3 = x.space();
        x.map(cr3, X, DATA_GFN, DATA);
        let top = cr3 >> 12;
        let mfn = x.mfn(top);
        x.set_p2m(top, None).unwrap();
        x.cr3(0, cr3).unwrap();
        let r = x.read(0, X);
        assert!(
            matches!(r, Err(GuestError::PageFault { .. })),
            "{pair:?}: {r:?}"
        );
        x.set_p2m(top, Some((mfn, P2mType::Ram))).unwrap();
        assert_eq!(x.read(0, X).unwrap(), 9, "{pair:?}");
    }
}

//! Issue 3, item 1: start-of-domain modes (translated vs non-translated, external vs
//! internal), several vcpus in different paging modes at once sharing memory, and shadow
//! test mode.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod engine_support;

use engine_support::*;
use shadow2::addr::{Gpa, Gva};
use shadow2::domain::{DomainConfig, ShadowOp, ShadowOpResult};
use shadow2::multi::Pair;
use shadow2::paging::{PagingLevels, bits};
use shadow2_machine::sim::{GuestError, ShadowMachine};

/// A non-translated (PV) domain: its frames given with `add_frame`.
fn pv_machine(shadow: PagingLevels, frames: usize) -> (ShadowMachine, Vec<u64>) {
    let config = DomainConfig {
        translated: false,
        ..hvm(shadow, 1, 64)
    };
    let mut m = ShadowMachine::new(MACHINE_FRAMES, config).unwrap();
    let mut owned = Vec::new();
    for _ in 0..frames {
        let mfn = host_frame(&mut m);
        m.domain_mut().add_frame(mfn).unwrap();
        owned.push(mfn.raw());
    }
    assert!(m.domain().p2m().is_none());
    (m, owned)
}

#[test]
fn pv_guest_entries_hold_machine_frames_and_foreign_frames_are_never_mapped() {
    for (shadow, levels) in [
        (PagingLevels::Four, PagingLevels::Four),
        (PagingLevels::Four, PagingLevels::Two),
        (PagingLevels::Three, PagingLevels::Three),
        (PagingLevels::Two, PagingLevels::Two),
    ] {
        let (mut m, owned) = pv_machine(shadow, 16);
        // Tables in the first 8 owned frames; data in the others.
        let mut t = Tables::with_frames(levels, &owned[..8]);
        let cr3 = t.new_root(0x40);
        let data = owned[12];
        let foreign = host_frame(&mut m);
        poke_machine(&mut m, foreign.base().raw(), 0xf0f0_f0f0);
        let pool_frame = m.domain().pool().chunks().next().map(|c| c.0);
        let va_data = 0x40_0000;
        let va_foreign = 0x40_1000;
        let va_pool = 0x40_2000;
        t.map(&mut m, cr3, va_data, data, DATA);
        t.map(&mut m, cr3, va_foreign, foreign.raw(), DATA);
        if let Some(p) = pool_frame {
            t.map(&mut m, cr3, va_pool, p.raw(), DATA);
        }
        set_mode(&mut m, 0, levels, cr3);

        // Owned frames are guest frames: the guest's entry names the machine frame.
        write_u64(&mut m, 0, va_data + 8, 0x1234_5678).unwrap();
        assert_eq!(machine_u64(&m, (data << 12) + 8), 0x1234_5678);
        assert_eq!(read_u64(&mut m, 0, va_data + 8).unwrap(), 0x1234_5678);
        check(&m);

        // A frame the domain does not own is not RAM to it: never mapped.
        let r = read_u64(&mut m, 0, va_foreign);
        assert!(
            matches!(r, Err(GuestError::Mmio { gpa }) if gpa.gfn().raw() == foreign.raw()),
            "{levels:?} on {shadow:?}: {r:?}"
        );
        write_u64(&mut m, 0, va_foreign, 0xbad).unwrap(); // dropped as MMIO
        assert_eq!(machine_u64(&m, foreign.base().raw()), 0xf0f0_f0f0);
        assert!(leaf_mappings_of(&m, foreign).is_empty());
        if let Some(p) = pool_frame {
            assert!(matches!(
                read_u64(&mut m, 0, va_pool),
                Err(GuestError::Mmio { .. })
            ));
            assert!(leaf_mappings_of(&m, p).is_empty());
        }
        check(&m);

        // Taking a frame away removes every mapping of it.
        let data_mfn = shadow2::addr::Mfn::new(data);
        assert!(!leaf_mappings_of(&m, data_mfn).is_empty());
        let flush = m.domain_mut().remove_frame(data_mfn).unwrap();
        m.settle(flush);
        assert!(leaf_mappings_of(&m, data_mfn).is_empty());
        assert!(matches!(
            read_u64(&mut m, 0, va_data),
            Err(GuestError::Mmio { .. })
        ));
        check(&m);
    }
}

#[test]
fn pv_guest_cannot_run_with_paging_disabled_or_take_p2m_calls() {
    let (mut m, owned) = pv_machine(PagingLevels::Four, 8);
    let mut t = Tables::with_frames(PagingLevels::Four, &owned);
    let cr3 = t.new_root(0);
    t.map(&mut m, cr3, 0x1000, owned[7], DATA);
    let r = m.set_paging(0, control(PagingLevels::Zero, 0));
    assert!(matches!(r, Err(GuestError::Engine(_))), "{r:?}");
    assert_eq!(m.domain().failure(), None);
    // A translated-only operation is refused, not a panic.
    let mfn = host_frame(&mut m);
    assert!(
        m.domain_mut()
            .set_p2m(
                shadow2::addr::Gfn::new(3),
                Some((mfn, shadow2::p2m::P2mType::Ram))
            )
            .is_err()
    );
    // The domain still runs once the guest asks for a mode it can have.
    set_mode(&mut m, 0, PagingLevels::Four, cr3);
    write_u64(&mut m, 0, 0x1000, 7).unwrap();
    assert_eq!(read_u64(&mut m, 0, 0x1000).unwrap(), 7);
    check(&m);
}

#[test]
fn translated_domain_rejects_add_frame() {
    let mut m = machine(hvm(PagingLevels::Four, 1, 64), 8);
    let mfn = host_frame(&mut m);
    assert!(m.domain_mut().add_frame(mfn).is_err());
    check(&m);
}

#[test]
fn internal_domain_reserves_the_hypervisor_hole_in_the_l4() {
    for external in [true, false] {
        let config = DomainConfig {
            external,
            ..hvm(PagingLevels::Four, 1, 128)
        };
        let hole = DomainConfig {
            external: false,
            ..config
        }
        .hypervisor_hole()
        .unwrap();
        assert_eq!(config.hypervisor_hole().is_some(), !external);
        let mut m = machine(config, 64);
        let mut t = Tables::new(PagingLevels::Four, 1, 40);
        let cr3 = t.new_root(0);
        let in_hole = hole.start + 0x20_3000;
        let outside = hole.end + 0x1000;
        t.map(&mut m, cr3, in_hole, 50, DATA);
        t.map(&mut m, cr3, outside, 51, DATA);
        set_mode(&mut m, 0, PagingLevels::Four, cr3);

        write_u64(&mut m, 0, outside, 0xaa).unwrap();
        assert_eq!(phys_u64(&m, 51 << 12), 0xaa);
        let r = read_u64(&mut m, 0, in_hole);
        if external {
            assert_eq!(r, Ok(0));
            write_u64(&mut m, 0, in_hole, 0xbb).unwrap();
            assert_eq!(phys_u64(&m, 50 << 12), 0xbb);
        } else {
            assert!(
                matches!(r, Err(GuestError::PageFault { va, .. }) if va == Gva::new(in_hole)),
                "{r:?}"
            );
            let w = write_u64(&mut m, 0, in_hole, 0xbb);
            assert!(matches!(w, Err(GuestError::PageFault { .. })), "{w:?}");
            assert_eq!(phys_u64(&m, 50 << 12), 0, "a write in the hole landed");
            // The shadow L4 slot of the hole stays empty.
            let root = m.domain().vcpu(0).unwrap().root().unwrap();
            let slot = (hole.start >> 39) & 0x1ff;
            assert_eq!(machine_u64(&m, root.base().raw() + 8 * slot), 0);
            assert!(leaf_mappings_of(&m, mfn_of(&m, 50)).is_empty());
        }
        check(&m);
    }
}

#[test]
fn internal_domain_on_32_bit_shadows_reserves_the_top_of_the_address_space() {
    for shadow in [PagingLevels::Two, PagingLevels::Three] {
        let config = DomainConfig {
            external: false,
            ..hvm(shadow, 1, 128)
        };
        let hole = config.hypervisor_hole().unwrap();
        let mut m = machine(config, 64);
        let mut t = Tables::new(PagingLevels::Two, 1, 40);
        let cr3 = t.new_root(0);
        let in_hole = hole.start + 0x5000;
        t.map(&mut m, cr3, in_hole, 50, DATA);
        t.map(&mut m, cr3, 0x40_0000, 51, DATA);
        set_mode(&mut m, 0, PagingLevels::Two, cr3);
        assert_eq!(read_u64(&mut m, 0, 0x40_0000), Ok(0));
        let r = read_u64(&mut m, 0, in_hole);
        assert!(matches!(r, Err(GuestError::PageFault { .. })), "{r:?}");
        assert!(leaf_mappings_of(&m, mfn_of(&m, 50)).is_empty());
        check(&m);
    }
}

#[test]
fn smp_vcpus_in_different_modes_share_memory_in_test_mode() {
    let mut m = machine(hvm(PagingLevels::Four, 4, 256), 128);
    let (r, _) = m.domain_mut().shadow_op(ShadowOp::EnableTest).unwrap();
    assert_eq!(r, ShadowOpResult::Done);
    assert!(m.domain().test_mode());

    let shared = 100u64;
    let mut t4 = Tables::new(PagingLevels::Four, 1, 20);
    let mut t2 = Tables::new(PagingLevels::Two, 20, 40);
    let mut t3 = Tables::new(PagingLevels::Three, 40, 60);
    let cr3_4 = t4.new_root(0);
    let cr3_2 = t2.new_root(0);
    let cr3_3 = t3.new_root(0x20);
    let va4 = 0x7f00_0000_0000;
    let va2 = 0x8040_0000;
    let va3 = 0xc020_0000;
    t4.map(&mut m, cr3_4, va4, shared, DATA);
    t2.map(&mut m, cr3_2, va2, shared, DATA);
    t3.map(&mut m, cr3_3, va3, shared, DATA);

    // vcpu 0 in 4-level mode, vcpu 1 with paging disabled, vcpu 2 in 32-bit mode, vcpu 3
    // in PAE mode: all at once, on 4-level shadows.
    set_mode(&mut m, 0, PagingLevels::Four, cr3_4);
    set_mode(&mut m, 1, PagingLevels::Zero, 0);
    set_mode(&mut m, 2, PagingLevels::Two, cr3_2);
    set_mode(&mut m, 3, PagingLevels::Three, cr3_3);
    let pairs: Vec<_> = (0..4).map(|v| m.domain().vcpu(v).unwrap().pair()).collect();
    assert_eq!(
        pairs,
        [
            Some(Pair::P4on4),
            Some(Pair::P0on4),
            Some(Pair::P2on4),
            Some(Pair::P3on4)
        ]
    );

    // Each vcpu writes its own word of the shared page; every vcpu sees every word.
    let base = [va4, shared << 12, va2, va3];
    for (v, b) in base.iter().enumerate() {
        write_u64(&mut m, v, b + 8 * v as u64, 0x100 + v as u64).unwrap();
        check(&m);
    }
    for (reader, b) in base.iter().enumerate() {
        for writer in 0..4u64 {
            assert_eq!(
                read_u64(&mut m, reader, b + 8 * writer).unwrap(),
                0x100 + writer,
                "vcpu {reader} reading vcpu {writer}'s word"
            );
        }
    }
    check(&m);

    // The paging-disabled vcpu writes a PTE of vcpu 0's tables by physical address: the
    // write is emulated and vcpu 0 sees the new mapping with no fault of its own.
    let l1 = t4.slot(&mut m, cr3_4, va4 + 0x1000, 1);
    let emulated = m.traps().emulated_writes;
    write_u64(&mut m, 1, l1, (101 << 12) | DATA).unwrap();
    assert_eq!(m.traps().emulated_writes, emulated + 1);
    let fills = m.traps().shadow_fills;
    write_u64(&mut m, 1, 101 << 12, 0x5151).unwrap();
    let fills_after_vcpu1 = m.traps().shadow_fills;
    assert_eq!(read_u64(&mut m, 0, va4 + 0x1000).unwrap(), 0x5151);
    assert!(fills_after_vcpu1 <= fills + 1);
    assert_eq!(m.traps().shadow_fills, fills_after_vcpu1);

    // A vcpu changes mode while the others run on: vcpu 2 goes from 32-bit to PAE.
    set_mode(&mut m, 2, PagingLevels::Three, cr3_3);
    assert_eq!(m.domain().vcpu(2).unwrap().pair(), Some(Pair::P3on4));
    assert_eq!(read_u64(&mut m, 2, va3 + 8).unwrap(), 0x101);
    assert_eq!(read_u64(&mut m, 0, va4 + 16).unwrap(), 0x102);
    check(&m);
    assert!(m.domain().test_mode());
    assert_eq!(m.domain().failure(), None);
}

#[test]
fn vcpus_on_32_bit_and_pae_shadows_mix_modes_too() {
    for shadow in [PagingLevels::Two, PagingLevels::Three] {
        let mut m = machine(hvm(shadow, 2, 128), 64);
        let _ = m.domain_mut().shadow_op(ShadowOp::EnableTest).unwrap();
        let mut t2 = Tables::new(PagingLevels::Two, 1, 20);
        let cr3 = t2.new_root(0);
        t2.map(&mut m, cr3, 0x40_0000, 50, DATA);
        set_mode(&mut m, 0, PagingLevels::Two, cr3);
        set_mode(&mut m, 1, PagingLevels::Zero, 0);
        write_u64(&mut m, 1, 50 << 12, 0x77).unwrap();
        assert_eq!(read_u64(&mut m, 0, 0x40_0000).unwrap(), 0x77);
        // Paging disabled runs on the p2m, which is in the shadows' own format.
        let p2m_root = m.domain().p2m().unwrap().root();
        assert_eq!(m.domain().vcpu(1).unwrap().root(), Some(p2m_root));
        check(&m);
    }
}

#[test]
fn test_mode_fails_the_domain_on_a_broken_invariant() {
    let mut m = machine(hvm(PagingLevels::Four, 1, 128), 64);
    let mut t = Tables::new(PagingLevels::Four, 1, 20);
    let cr3 = t.new_root(0);
    t.map(&mut m, cr3, 0x40_0000, 50, DATA);
    set_mode(&mut m, 0, PagingLevels::Four, cr3);
    read_u64(&mut m, 0, 0x40_0000).unwrap();
    let _ = m.domain_mut().shadow_op(ShadowOp::EnableTest).unwrap();
    // Point a shadow leaf entry at another frame; the next operation's audit must catch
    // it.
    let (slot, e) = leaf_mappings_of(&m, mfn_of(&m, 50))[0];
    let other = mfn_of(&m, 51).base().raw();
    poke_machine(&mut m, slot, (e & !bits::ADDR_MASK_8) | other);
    let r = m.domain_mut().invlpg(0, Gva::new(0x40_0000));
    assert!(r.is_err(), "{r:?}");
    assert!(m.domain().failure().is_some());
    // A failed domain refuses further work instead of panicking.
    assert!(
        m.domain_mut()
            .write_guest_phys(Gpa::new(0x1000), &[1])
            .is_err()
    );
    // Switched off, test mode no longer audits (the domain stays failed).
    let _ = m.domain_mut().shadow_op(ShadowOp::DisableTest).unwrap();
    assert!(!m.domain().test_mode());
}

#[test]
fn guest_refcounts_make_page_tables_read_only_to_the_guest() {
    use shadow2::domain::RefcountMode;
    for refcounts in [RefcountMode::Shadow, RefcountMode::Guest] {
        let mut config = hvm(PagingLevels::Four, 1, 128);
        config.refcounts = refcounts;
        let mut m = machine(config, 64);
        let mut t = Tables::new(PagingLevels::Four, 1, 30);
        let cr3 = t.new_root(0);
        let l1 = t.table_of(&mut m, cr3, 0x40_0000, 1);
        t.map(&mut m, cr3, 0x80_0000, l1, DATA);
        t.map(&mut m, cr3, 0x40_0000, 40, DATA);
        set_mode(&mut m, 0, PagingLevels::Four, cr3);
        read_u64(&mut m, 0, 0x40_0000).unwrap();
        let pte = (41 << 12) | DATA;
        let r = write_u64(&mut m, 0, 0x80_0008, pte);
        match refcounts {
            // Shadow refcounts: the write is emulated.
            RefcountMode::Shadow => {
                r.unwrap();
                assert_eq!(t.read(&m, (l1 << 12) + 8), pte);
            }
            // Guest refcounts: a protection fault; the guest uses the explicit interface.
            RefcountMode::Guest => {
                assert!(
                    matches!(r, Err(GuestError::PageFault { code, .. }) if code.present() && code.write()),
                    "{r:?}"
                );
                assert_eq!(t.read(&m, (l1 << 12) + 8), 0);
                t.write(&mut m, (l1 << 12) + 8, pte);
            }
        }
        write_u64(&mut m, 0, 0x40_1000, 5).unwrap();
        assert_eq!(phys_u64(&m, 41 << 12), 5);
        check(&m);
    }
}

#[test]
fn pae_alias_cannot_reach_the_hole_of_an_internal_domain() {
    // PDPTE 0 and PDPTE 3 name the same L2: VA 0x3fc0_0000 and VA 0xffc0_0000 use the same
    // L2 entry. The first is ordinary guest memory, the second lies in the hypervisor hole.
    let config = DomainConfig {
        external: false,
        ..hvm(PagingLevels::Three, 1, 64)
    };
    let mut m = machine(config, 64);
    let mut t = Tables::new(PagingLevels::Three, 1, 30);
    let cr3 = t.new_root(0x40);
    let low = 0x3fc0_0000;
    let high = 0xffc0_0000;
    assert!(m.domain().config().in_hole(Gva::new(high)));
    t.map(&mut m, cr3, low, 40, DATA);
    let pdpte0 = t.read(&m, cr3);
    t.write(&mut m, cr3 + 3 * 8, pdpte0);
    set_mode(&mut m, 0, PagingLevels::Three, cr3);
    write_u64(&mut m, 0, low, 7).unwrap();
    // Through the alias the guest's own tables map the page, but the hole is reserved.
    let r = read_u64(&mut m, 0, high);
    assert!(matches!(r, Err(GuestError::PageFault { .. })), "{r:?}");
    write_u64(&mut m, 0, low + 8, 8).unwrap();
    let r = read_u64(&mut m, 0, high + 8);
    assert!(matches!(r, Err(GuestError::PageFault { .. })), "{r:?}");
    check(&m);
}

//! The fields of a translation: address, frame, size, permissions, global, key and path.

use super::harness::*;
use crate::addr::{Gfn, Gpa, Gva};
use crate::paging::bits::{self, cr};
use crate::paging::{
    AdUpdate, ControlState, CpuFeatures, PageSize, PagingLevels, Perms, WalkEnv, walk,
};

#[test]
fn four_k_translation_fields() {
    for levels in MODES {
        let mut g = guest_with_page(levels, URW);
        let t = g.ok(VA, READ_U);
        assert_eq!(t.addr, Gpa::new(PA | (VA & 0xfff)), "{levels:?}");
        assert_eq!(t.frame, Gfn::new(PA >> 12));
        assert_eq!(t.size, PageSize::Size4K);
        assert_eq!(t.leaf_level, 1);
        assert_eq!(
            t.perms,
            Perms {
                write: true,
                user: true,
                exec: true
            }
        );
        assert!(!t.global);
        assert_eq!(t.pkey, 0);
        assert_eq!(t.path.len(), usize::from(levels.count()));
        let levels_seen: alloc::vec::Vec<u8> = t.path.iter().map(|e| e.level).collect();
        let expected: alloc::vec::Vec<u8> = (1..=levels.count()).rev().collect();
        assert_eq!(levels_seen, expected, "{levels:?}: top level first");
        for e in t.path.iter() {
            assert_eq!(
                e.addr.raw(),
                g.entry_addr(VA, e.level),
                "{levels:?} level {}",
                e.level
            );
        }
        assert_eq!(t.path.last().unwrap().level, 1);
    }
}

#[test]
fn superpage_translation_fields() {
    for levels in MODES {
        let mut g = Guest::new(levels);
        let (size, pa) = if levels == PagingLevels::Two {
            (PageSize::Size4M, 0x8040_0000)
        } else {
            (PageSize::Size2M, 0x8060_0000)
        };
        g.map(VA, 2, pa, URW, URW);
        let t = g.ok(VA, READ_U);
        let offset = VA & (size.bytes() - 1);
        assert_eq!(t.size, size, "{levels:?}");
        assert_eq!(t.addr.raw(), pa + offset, "{levels:?}");
        assert_eq!(
            t.frame.raw(),
            (pa + offset) >> 12,
            "{levels:?}: the 4 KiB frame"
        );
        assert_eq!(t.leaf_level, 2);
        assert_eq!(t.path.len(), usize::from(levels.count() - 1));
    }
}

#[test]
fn perms_combine_every_level() {
    for levels in WIDE_MODES {
        let mut g = guest_with_page(levels, URW);
        g.modify_entry(VA, 2, bits::NX, bits::RW);
        let t = g.ok(VA, READ_U);
        assert_eq!(
            t.perms,
            Perms {
                write: false,
                user: true,
                exec: false
            },
            "{levels:?}"
        );
        g.modify_entry(VA, 1, 0, bits::US);
        let t = g.ok(VA, READ_S);
        assert_eq!(
            t.perms,
            Perms {
                write: false,
                user: false,
                exec: false
            },
            "{levels:?}"
        );
    }
}

#[test]
fn global_needs_g_on_the_leaf_and_cr4_pge() {
    for levels in MODES {
        let mut g = guest_with_page(levels, URW);
        g.set_cr4(cr::CR4_PGE, true);
        assert!(!g.ok(VA, READ_U).global, "{levels:?}: no G");
        g.modify_entry(VA, 1, bits::G, 0);
        assert!(g.ok(VA, READ_U).global, "{levels:?}");
        g.set_cr4(cr::CR4_PGE, false);
        assert!(!g.ok(VA, READ_U).global, "{levels:?}: no PGE");
    }
}

#[test]
fn failure_path_ends_at_the_faulting_entry() {
    for levels in MODES {
        let mut g = guest_with_page(levels, URW);
        g.modify_entry(VA, 2, 0, bits::P);
        let e = g.walk(VA, READ_U).unwrap_err();
        let last = e.path.last().unwrap();
        assert_eq!(last.level, 2, "{levels:?}");
        assert_eq!(last.addr.raw(), g.entry_addr(VA, 2));
        assert_eq!(last.value, g.entry(VA, 2));
        assert_eq!(e.error_code().map(|c| c.bits()), Some(U));
    }
}

#[test]
fn paging_disabled_is_the_identity_on_32_bits() {
    let ctl = ControlState {
        cr0: cr::CR0_PE,
        ..ControlState::default()
    };
    let feat = CpuFeatures::KVM_HOST;
    let mut mem = TestMem::default();
    let env = WalkEnv {
        ctl: &ctl,
        feat: &feat,
        ad: AdUpdate::Set,
    };
    let t = walk(&mut mem, env, Gva::new(0x1_c012_3456), WRITE_U).unwrap();
    assert_eq!(t.addr, Gpa::new(0xc012_3456));
    assert_eq!(t.perms, Perms::ALL);
    assert!(t.path.is_empty());
    assert_eq!(mem.writes, 0);
}

#[test]
fn unbacked_tables_are_memory_failures() {
    for levels in MODES {
        let mut g = guest_with_page(levels, URW);
        g.modify_entry(VA, 2, 0, bits::ADDR_MASK_4);
        g.modify_entry(VA, 2, 0x7fff_f000, 0);
        let e = g.walk(VA, READ_U).unwrap_err();
        assert!(
            matches!(e.fault, crate::paging::WalkFault::Memory(_)),
            "{levels:?}: {e:?}"
        );
    }
}

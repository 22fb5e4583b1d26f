//! Access rights (SDM 4.6): R/W, U/S, CR0.WP, SMEP and SMAP.

use super::harness::*;
use crate::paging::bits::{self, cr};

#[test]
fn wp0_lets_supervisor_write_read_only_supervisor_pages() {
    for levels in MODES {
        let mut g = guest_with_page(levels, bits::P);
        assert_eq!(g.pf(VA, WRITE_S), P | W, "{levels:?} with WP=1");
        g.set_cr0(cr::CR0_WP, false);
        let t = g.ok(VA, WRITE_S);
        assert!(!t.perms.write, "{levels:?}");
        assert!(
            g.entry(VA, 1) & bits::D != 0,
            "{levels:?}: the write dirtied the page"
        );
    }
}

#[test]
fn wp0_lets_supervisor_write_read_only_user_pages() {
    for levels in MODES {
        let mut g = guest_with_page(levels, bits::P | bits::US);
        assert_eq!(g.pf(VA, WRITE_S), P | W, "{levels:?} with WP=1");
        g.set_cr0(cr::CR0_WP, false);
        g.ok(VA, WRITE_S);
    }
}

#[test]
fn supervisor_writes_writable_user_pages_without_smap() {
    for levels in MODES {
        let mut g = guest_with_page(levels, URW);
        g.ok(VA, WRITE_S);
        g.set_cr0(cr::CR0_WP, false);
        g.ok(VA, WRITE_S);
    }
}

#[test]
fn wp0_does_not_help_user_writes() {
    for levels in MODES {
        let mut g = guest_with_page(levels, bits::P | bits::US);
        g.set_cr0(cr::CR0_WP, false);
        assert_eq!(g.pf(VA, WRITE_U), P | W | U, "{levels:?}");
        g.ok(VA, READ_U);
    }
}

#[test]
fn read_only_at_any_level_makes_the_page_read_only() {
    for levels in MODES {
        let g0 = guest_with_page(levels, URW);
        // PAE PDPTEs have no R/W bit.
        let top = if levels == crate::paging::PagingLevels::Three {
            2
        } else {
            levels.count()
        };
        for level in 1..=top {
            let mut g = g0.clone();
            g.modify_entry(VA, level, 0, bits::RW);
            assert_eq!(g.pf(VA, WRITE_U), P | W | U, "{levels:?} level {level}");
            assert_eq!(g.pf(VA, WRITE_S), P | W, "{levels:?} level {level}");
            g.ok(VA, READ_U);
        }
    }
}

#[test]
fn supervisor_at_any_level_makes_the_page_supervisor() {
    for levels in MODES {
        let g0 = guest_with_page(levels, URW);
        let top = if levels == crate::paging::PagingLevels::Three {
            2
        } else {
            levels.count()
        };
        for level in 1..=top {
            let mut g = g0.clone();
            g.modify_entry(VA, level, 0, bits::US);
            assert_eq!(g.pf(VA, READ_U), P | U, "{levels:?} level {level}");
            assert_eq!(g.pf(VA, WRITE_U), P | W | U, "{levels:?} level {level}");
            assert_eq!(g.pf(VA, FETCH_U) & !I, P | U, "{levels:?} level {level}");
            g.ok(VA, READ_S);
            g.ok(VA, WRITE_S);
        }
    }
}

#[test]
fn smep_faults_supervisor_fetches_from_user_pages_with_i() {
    for levels in MODES {
        let mut g = guest_with_page(levels, URW);
        g.set_efer(cr::EFER_NXE, false);
        g.ok(VA, FETCH_S);
        g.set_cr4(cr::CR4_SMEP, true);
        assert_eq!(g.pf(VA, FETCH_S), P | I, "{levels:?}");
        g.ok(VA, FETCH_U);
        g.ok(VA, READ_S);
        g.ok(VA, WRITE_S);
        g.set_ac(true);
        assert_eq!(
            g.pf(VA, FETCH_S),
            P | I,
            "{levels:?}: AC does not lift SMEP"
        );
    }
}

#[test]
fn smep_leaves_supervisor_pages_alone() {
    for levels in MODES {
        let mut g = guest_with_page(levels, SRW);
        g.set_cr4(cr::CR4_SMEP, true);
        g.ok(VA, FETCH_S);
    }
}

#[test]
fn smap_with_ac0_faults_supervisor_data_access_to_user_pages() {
    for levels in MODES {
        let mut g = guest_with_page(levels, URW);
        g.set_cr4(cr::CR4_SMAP, true);
        assert_eq!(g.pf(VA, READ_S), P, "{levels:?}");
        assert_eq!(g.pf(VA, WRITE_S), P | W, "{levels:?}");
        g.set_cr0(cr::CR0_WP, false);
        assert_eq!(
            g.pf(VA, WRITE_S),
            P | W,
            "{levels:?}: WP=0 does not lift SMAP"
        );
        g.ok(VA, FETCH_S);
        g.ok(VA, READ_U);
        g.ok(VA, WRITE_U);
    }
}

#[test]
fn smap_with_ac1_allows_explicit_supervisor_data_access() {
    for levels in MODES {
        let mut g = guest_with_page(levels, URW);
        g.set_cr4(cr::CR4_SMAP, true);
        g.set_ac(true);
        g.ok(VA, READ_S);
        g.ok(VA, WRITE_S);
    }
}

#[test]
fn smap_with_ac1_still_honours_wp_on_read_only_user_pages() {
    for levels in MODES {
        let mut g = guest_with_page(levels, bits::P | bits::US);
        g.set_cr4(cr::CR4_SMAP, true);
        g.set_ac(true);
        assert_eq!(g.pf(VA, WRITE_S), P | W, "{levels:?}");
        g.set_cr0(cr::CR0_WP, false);
        g.ok(VA, WRITE_S);
    }
}

#[test]
fn smap_ignores_ac_for_implicit_supervisor_accesses() {
    for levels in MODES {
        let mut g = guest_with_page(levels, URW);
        g.ok(VA, READ_I);
        g.set_cr4(cr::CR4_SMAP, true);
        for ac in [false, true] {
            g.set_ac(ac);
            assert_eq!(g.pf(VA, READ_I), P, "{levels:?} AC={ac}");
            assert_eq!(g.pf(VA, WRITE_I), P | W, "{levels:?} AC={ac}");
        }
    }
}

#[test]
fn implicit_accesses_are_supervisor_accesses() {
    for levels in MODES {
        let mut g = guest_with_page(levels, bits::P | bits::RW);
        g.ok(VA, READ_I);
        g.ok(VA, WRITE_I);
        g.modify_entry(VA, 1, 0, bits::RW);
        assert_eq!(g.pf(VA, WRITE_I), P | W, "{levels:?}: no U bit");
    }
}

#[test]
fn smap_leaves_supervisor_pages_alone() {
    for levels in MODES {
        let mut g = guest_with_page(levels, SRW);
        g.set_cr4(cr::CR4_SMAP, true);
        g.ok(VA, READ_S);
        g.ok(VA, WRITE_S);
        g.ok(VA, READ_I);
    }
}

//! Execute-disable: honoured only with EFER.NXE, a reserved bit otherwise (SDM 4.6, 4.4.2, 4.5.4).

use super::harness::*;
use crate::paging::PagingLevels;
use crate::paging::bits::{self, cr};

#[test]
fn nx_with_nxe_forbids_fetches_only() {
    for levels in WIDE_MODES {
        let mut g = guest_with_page(levels, URW | bits::NX);
        assert_eq!(g.pf(VA, FETCH_S), P | I, "{levels:?}");
        assert_eq!(g.pf(VA, FETCH_U), P | U | I, "{levels:?}");
        let t = g.ok(VA, READ_U);
        assert!(!t.perms.exec);
        g.ok(VA, WRITE_U);
    }
}

#[test]
fn nx_in_an_upper_entry_forbids_fetches() {
    for levels in WIDE_MODES {
        // PAE PDPTEs have no XD bit, so the highest entry with one is the PDE.
        let top = if levels == PagingLevels::Three { 2 } else { 4 };
        for level in 2..=top {
            let mut g = guest_with_page(levels, URW);
            g.modify_entry(VA, level, bits::NX, 0);
            assert_eq!(g.pf(VA, FETCH_U), P | U | I, "{levels:?} level {level}");
            g.ok(VA, READ_U);
        }
    }
}

#[test]
fn nx_without_nxe_is_a_reserved_bit() {
    for levels in WIDE_MODES {
        let top = if levels == PagingLevels::Three { 2 } else { 4 };
        for level in 1..=top {
            let mut g = guest_with_page(levels, URW);
            g.set_efer(cr::EFER_NXE, false);
            g.modify_entry(VA, level, bits::NX, 0);
            assert_eq!(g.pf(VA, READ_S), P | RSVD, "{levels:?} level {level}");
            assert_eq!(
                g.pf(VA, WRITE_U),
                P | RSVD | W | U,
                "{levels:?} level {level}"
            );
            assert_eq!(
                g.pf(VA, FETCH_U),
                P | RSVD | U,
                "{levels:?} level {level}: no I"
            );
        }
    }
}

#[test]
fn without_nxe_every_page_is_executable() {
    for levels in MODES {
        let mut g = guest_with_page(levels, URW);
        g.set_efer(cr::EFER_NXE, false);
        assert!(g.ok(VA, FETCH_U).perms.exec, "{levels:?}");
    }
}

#[test]
fn two_level_paging_has_no_nx_even_with_nxe() {
    let mut g = guest_with_page(PagingLevels::Two, URW);
    g.set_efer(cr::EFER_NXE, true);
    let t = g.ok(VA, FETCH_U);
    assert!(t.perms.exec);
}

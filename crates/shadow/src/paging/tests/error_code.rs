//! The W, U and I bits of the page-fault error code (SDM 4.7).

use super::harness::*;
use crate::paging::PagingLevels;
use crate::paging::bits::cr;

#[test]
fn u_bit_is_set_for_user_accesses_only() {
    for levels in MODES {
        let mut g = Guest::new(levels);
        assert_eq!(g.pf(VA, READ_U), U, "{levels:?}");
        assert_eq!(g.pf(VA, WRITE_U), U | W, "{levels:?}");
        assert_eq!(g.pf(VA, READ_S), 0, "{levels:?}");
        assert_eq!(g.pf(VA, WRITE_S), W, "{levels:?}");
        assert_eq!(g.pf(VA, READ_I), 0, "{levels:?}");
    }
}

#[test]
fn i_bit_needs_smep_or_nxe_with_wide_entries() {
    for levels in MODES {
        for smep in [false, true] {
            for nxe in [false, true] {
                let mut g = Guest::new(levels);
                g.set_cr4(cr::CR4_SMEP, smep);
                g.set_efer(cr::EFER_NXE, nxe);
                let expect_i = smep || (nxe && levels != PagingLevels::Two);
                let i = if expect_i { I } else { 0 };
                let ctx = alloc::format!("{levels:?} SMEP={smep} NXE={nxe}");
                assert_eq!(g.pf(VA, FETCH_S), i, "{ctx}: not-present");
                assert_eq!(g.pf(VA, FETCH_U), i | U, "{ctx}: not-present");
                assert_eq!(g.pf(VA, READ_S), 0, "{ctx}: reads never have I");
            }
        }
    }
}

#[test]
fn not_present_at_every_level_faults_without_p() {
    for levels in MODES {
        let g0 = guest_with_page(levels, URW);
        for level in 1..=levels.count() {
            let mut g = g0.clone();
            g.modify_entry(VA, level, 0, crate::paging::bits::P);
            assert_eq!(g.pf(VA, WRITE_U), W | U, "{levels:?} level {level}");
            let e = g.walk(VA, READ_S).unwrap_err();
            assert_eq!(e.path.last().map(|p| p.level), Some(level), "{levels:?}");
            assert_eq!(
                e.path.len(),
                usize::from(levels.count() - level + 1),
                "{levels:?}"
            );
        }
    }
}

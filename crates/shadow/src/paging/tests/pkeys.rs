//! Protection keys (SDM 4.6.2): 4-level paging with CR4.PKE, user-mode pages, data accesses.

use super::harness::*;
use crate::paging::PagingLevels;
use crate::paging::bits::{self, PKEY_SHIFT, cr};

const KEY: u32 = 5;

fn pkru_ad(key: u32) -> u32 {
    1 << (2 * key)
}
fn pkru_wd(key: u32) -> u32 {
    1 << (2 * key + 1)
}

/// A 4-level guest with CR4.PKE and a page tagged `KEY` with leaf flags `flags`.
fn keyed(flags: u64) -> Guest {
    let mut g = Guest::new(PagingLevels::Four);
    g.map(VA, 1, PA, URW, flags | (u64::from(KEY) << PKEY_SHIFT));
    g.set_cr4(cr::CR4_PKE, true);
    g
}

#[test]
fn the_key_is_reported_only_with_pke() {
    let mut g = keyed(URW);
    assert_eq!(g.ok(VA, READ_U).pkey, KEY as u8);
    g.set_cr4(cr::CR4_PKE, false);
    g.ctl.pkru = pkru_ad(KEY);
    let t = g.ok(VA, READ_U);
    assert_eq!(t.pkey, 0);
    assert_eq!(
        t.addr.raw(),
        PA | (VA & 0xfff),
        "key bits are not address bits"
    );
}

#[test]
fn access_disable_forbids_user_data_accesses() {
    let mut g = keyed(URW);
    g.ctl.pkru = pkru_ad(KEY);
    assert_eq!(g.pf(VA, READ_U), P | U | PK);
    assert_eq!(g.pf(VA, WRITE_U), P | W | U | PK);
    g.ok(VA, FETCH_U);
}

#[test]
fn write_disable_forbids_user_writes_only() {
    let mut g = keyed(URW);
    g.ctl.pkru = pkru_wd(KEY);
    g.ok(VA, READ_U);
    assert_eq!(g.pf(VA, WRITE_U), P | W | U | PK);
    g.set_cr0(cr::CR0_WP, false);
    assert_eq!(
        g.pf(VA, WRITE_U),
        P | W | U | PK,
        "WP does not matter to user writes"
    );
    g.ok(VA, FETCH_U);
}

#[test]
fn write_disable_binds_supervisor_writes_only_with_wp() {
    let mut g = keyed(URW);
    g.ctl.pkru = pkru_wd(KEY);
    assert_eq!(g.pf(VA, WRITE_S), P | W | PK);
    g.ok(VA, READ_S);
    g.set_cr0(cr::CR0_WP, false);
    g.ok(VA, WRITE_S);
}

#[test]
fn access_disable_forbids_supervisor_data_accesses_to_user_pages() {
    let mut g = keyed(URW);
    g.ctl.pkru = pkru_ad(KEY);
    assert_eq!(g.pf(VA, READ_S), P | PK);
    assert_eq!(g.pf(VA, READ_I), P | PK);
    g.set_cr0(cr::CR0_WP, false);
    assert_eq!(g.pf(VA, WRITE_S), P | W | PK);
    g.ok(VA, FETCH_S);
}

#[test]
fn supervisor_pages_ignore_pkru() {
    let mut g = keyed(SRW);
    g.ctl.pkru = u32::MAX;
    g.ok(VA, READ_S);
    g.ok(VA, WRITE_S);
    g.ok(VA, FETCH_S);
}

#[test]
fn other_keys_do_not_matter() {
    let mut g = keyed(URW);
    g.ctl.pkru = !(pkru_ad(KEY) | pkru_wd(KEY));
    g.ok(VA, READ_U);
    g.ok(VA, WRITE_U);
}

#[test]
fn pk_is_reported_alongside_other_protection_violations() {
    let mut g = keyed(bits::P | bits::US);
    g.ctl.pkru = pkru_wd(KEY);
    assert_eq!(g.pf(VA, WRITE_U), P | W | U | PK);
    let mut g = keyed(URW);
    g.ctl.pkru = pkru_ad(KEY);
    g.set_cr4(cr::CR4_SMAP, true);
    assert_eq!(g.pf(VA, READ_S), P | PK);
    // A fault the key has no part in carries no PK.
    let mut g = keyed(bits::P | bits::US);
    g.ctl.pkru = pkru_ad(KEY + 1);
    assert_eq!(g.pf(VA, WRITE_U), P | W | U);
}

#[test]
fn not_present_and_reserved_faults_carry_no_pk() {
    let mut g = keyed(URW);
    g.ctl.pkru = pkru_ad(KEY);
    let mut reserved = g.clone();
    reserved.modify_entry(VA, 1, 1 << 50, 0);
    assert_eq!(reserved.pf(VA, READ_U), P | RSVD | U);
    g.modify_entry(VA, 1, 0, bits::P);
    assert_eq!(g.pf(VA, READ_U), U);
}

#[test]
fn pae_has_no_protection_keys() {
    let mut g = guest_with_page(PagingLevels::Three, URW);
    g.set_cr4(cr::CR4_PKE, true);
    g.ctl.pkru = u32::MAX;
    let t = g.ok(VA, WRITE_U);
    assert_eq!(t.pkey, 0);
}

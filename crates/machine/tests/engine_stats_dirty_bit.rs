//! A write that only sets D counts as a dirty-bit fault.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod engine_support;

use engine_support::*;
use shadow2::paging::{PagingLevels, bits};

#[test]
fn a_write_that_sets_d_counts_as_a_dirty_bit_fault() {
    let mut m = machine(hvm(PagingLevels::Four, 1, 128), 64);
    let mut t = Tables::new(PagingLevels::Four, 1, 30);
    let cr3 = t.new_root(0);
    // Writable, accessed, D clear: the shadow maps it read-only until the first write.
    let slot = t.map(
        &mut m,
        cr3,
        0x40_0000,
        40,
        bits::P | bits::RW | bits::US | bits::A,
    );
    set_mode(&mut m, 0, PagingLevels::Four, cr3);
    read_u64(&mut m, 0, 0x40_0000).unwrap();
    let before = *m.domain().stats();
    write_u64(&mut m, 0, 0x40_0000, 1).unwrap(); // one fault: the walk sets D
    let after = *m.domain().stats();
    assert_eq!(after.fault_fixed, before.fault_fixed + 1);
    assert_ne!(t.read(&m, slot) & bits::D, 0);
    assert_eq!(after.fault_dirty_bit, before.fault_dirty_bit + 1); // fails: stays 0
    check(&m);
}

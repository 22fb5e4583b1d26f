//! A/D updates racing another agent (a vcpu on another thread) that rewrites an entry
//! between the walk's read and its A/D update (SDM 4.8: the CPU's update is a locked
//! operation, and a walk that finds the entry changed is redone).

use super::harness::*;
use crate::addr::Gpa;
use crate::paging::bits;
use crate::paging::{
    AdUpdate, Exchange, MemError, PhysMem, WalkEnv, WalkFault, serial_compare_exchange_u32,
    serial_compare_exchange_u64, walk,
};

/// Guest memory with another agent that writes `value` at `addr` once, between the walk's
/// read of the entry and its A/D update: at its second read, or at its first
/// compare-exchange, whichever comes first.
struct Racing {
    mem: TestMem,
    addr: u64,
    value: u64,
    reads: core::cell::Cell<usize>,
    raced: core::cell::Cell<bool>,
}

impl Racing {
    fn race(&self, addr: Gpa) -> Option<u64> {
        (addr.raw() == self.addr && !self.raced.replace(true)).then_some(self.value)
    }
}

impl PhysMem<Gpa> for Racing {
    fn read_u32(&self, addr: Gpa) -> Result<u32, MemError> {
        let a = self.read_u64(Gpa::new(addr.raw() & !7))?;
        Ok((a >> ((addr.raw() & 4) * 8)) as u32)
    }
    fn read_u64(&self, addr: Gpa) -> Result<u64, MemError> {
        if addr.raw() == self.addr {
            self.reads.set(self.reads.get() + 1);
            if self.reads.get() == 2
                && let Some(value) = self.race(addr)
            {
                return Ok(value);
            }
            if self.raced.get() {
                return Ok(self.value);
            }
        }
        self.mem.read_u64(addr)
    }
    fn write_u32(&mut self, addr: Gpa, value: u32) -> Result<(), MemError> {
        self.mem.write_u32(addr, value)
    }
    fn write_u64(&mut self, addr: Gpa, value: u64) -> Result<(), MemError> {
        if addr.raw() == self.addr {
            self.value = value;
        }
        self.mem.write_u64(addr, value)
    }
    fn compare_exchange_u32(
        &mut self,
        addr: Gpa,
        current: u32,
        new: u32,
    ) -> Result<Exchange<u32>, MemError> {
        serial_compare_exchange_u32(self, addr, current, new)
    }
    fn compare_exchange_u64(
        &mut self,
        addr: Gpa,
        current: u64,
        new: u64,
    ) -> Result<Exchange<u64>, MemError> {
        if let Some(value) = self.race(addr) {
            self.mem.write_u64(addr, value)?;
        }
        serial_compare_exchange_u64(self, addr, current, new)
    }
}

/// Walks `va` for a user write on a 4-level guest whose leaf entry another agent replaces
/// with `racing` during the walk; returns the result and the leaf entry afterwards.
fn race_leaf(racing: u64) -> (Result<u64, WalkFault>, u64) {
    let g = guest_with_page(crate::paging::PagingLevels::Four, URW);
    let addr = g.entry_addr(VA, 1);
    let mut mem = Racing {
        mem: g.mem.clone(),
        addr,
        value: racing,
        reads: core::cell::Cell::new(0),
        raced: core::cell::Cell::new(false),
    };
    let env = WalkEnv {
        ctl: &g.ctl,
        feat: &g.feat,
        ad: AdUpdate::Set,
    };
    let result = walk(&mut mem, env, crate::addr::Gva::new(VA), WRITE_U);
    let leaf = mem.read_u64(Gpa::new(addr)).unwrap();
    (result.map(|t| t.addr.raw()).map_err(|f| f.fault), leaf)
}

#[test]
fn an_entry_cleared_during_the_walk_gets_no_stale_a_d_and_faults() {
    let (result, leaf) = race_leaf(0);
    assert_eq!(leaf, 0, "A/D written into the not-present entry");
    assert!(
        matches!(result, Err(WalkFault::PageFault(ec)) if !ec.present()),
        "{result:?}"
    );
}

#[test]
fn an_entry_remapped_during_the_walk_is_walked_again() {
    let moved = 0x77_7000 | URW;
    let (result, leaf) = race_leaf(moved);
    assert_eq!(leaf, moved | bits::A | bits::D, "the new entry, updated");
    assert_eq!(result, Ok(0x77_7000 | (VA & 0xfff)));
}

//! The p2m's answers (guest frame -> machine frame and type), remembered for the oracle: its
//! walk of every access asks the p2m for each guest table it reads and for the frame it
//! reaches, and a p2m lookup costs a walk of the p2m's own tables.
//!
//! Exact invalidation: an answer depends on the p2m's root and whether it is torn down
//! (neither changes without the other fields of the key changing, see [`P2mMemo::refresh`])
//! and on the contents of the p2m's table frames. Every table frame is watched in machine
//! memory ([`SparseMemory::watch`]): any change to one (an entry set or cleared, a table
//! linked, a frame freed, an A/D bit the hardware set while running on the p2m, a write
//! behind the engine's back) forgets every answer. A table the p2m adds later is reachable
//! only through an entry written into a watched frame.

use std::cell::RefCell;

use shadow2::addr::{Gfn, Mfn};
use shadow2::domain::Domain;
use shadow2::p2m::P2mType;

use crate::fx::FxHashMap;
use crate::memory::SparseMemory;

/// What the answers hold for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Key {
    root: Mfn,
    torn_down: bool,
    watched_changes: u64,
}

/// Remembered p2m answers of one domain (a translated one; a domain without a p2m is asked
/// every time).
#[derive(Debug, Default)]
pub struct P2mMemo {
    key: Option<Key>,
    answers: RefCell<FxHashMap<u64, Option<(Mfn, P2mType)>>>,
}

impl P2mMemo {
    /// Forgets every answer unless the p2m is as it was when they were given, and watches
    /// every p2m table frame. Call before asking anything after `domain` may have changed.
    pub fn refresh(&mut self, domain: &mut Domain<SparseMemory>) {
        let Some(p2m) = domain.p2m() else {
            self.key = None;
            return;
        };
        let key = Key {
            root: p2m.root(),
            torn_down: p2m.is_torn_down(),
            watched_changes: domain.host().watched_changes(),
        };
        if self.key == Some(key) {
            return;
        }
        self.answers.get_mut().clear();
        let tables: Vec<Mfn> = p2m.table_frames().collect();
        for mfn in tables {
            domain.host_mut().watch(mfn);
        }
        // Watching changes no contents: the key stays what it was computed as.
        self.key = Some(key);
    }

    /// The machine frame and type behind `gfn`: [`Domain::guest_frame`], remembered while
    /// the p2m stays as it was at the last [`P2mMemo::refresh`].
    pub fn guest_frame(&self, domain: &Domain<SparseMemory>, gfn: Gfn) -> Option<(Mfn, P2mType)> {
        if !self.holds_for(domain) {
            return domain.guest_frame(gfn);
        }
        if let Some(&answer) = self.answers.borrow().get(&gfn.raw()) {
            return answer;
        }
        let answer = domain.guest_frame(gfn);
        self.answers.borrow_mut().insert(gfn.raw(), answer);
        answer
    }

    /// Whether the answers are those of `domain` as it is now.
    fn holds_for(&self, domain: &Domain<SparseMemory>) -> bool {
        let (Some(key), Some(p2m)) = (self.key, domain.p2m()) else {
            return false;
        };
        key.root == p2m.root()
            && key.torn_down == p2m.is_torn_down()
            && key.watched_changes == domain.host().watched_changes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shadow2::addr::Maddr;
    use shadow2::domain::DomainConfig;
    use shadow2::host::MachineMemory;
    use shadow2::paging::{PagingLevels, PhysMem, bits};

    use crate::sim::ShadowMachine;

    fn machine() -> ShadowMachine {
        let config = DomainConfig::hvm(PagingLevels::Four, 1, 64);
        let mut m = ShadowMachine::new(1 << 14, config).unwrap();
        m.add_ram(Gfn::new(0), 1200).unwrap();
        m
    }

    /// Every answer the memo gives equals the domain's own for `gfns`.
    #[track_caller]
    fn agrees(memo: &mut P2mMemo, m: &mut ShadowMachine, gfns: &[u64]) {
        memo.refresh(m.domain_mut());
        for &g in gfns {
            let gfn = Gfn::new(g);
            assert_eq!(
                memo.guest_frame(m.domain(), gfn),
                m.domain().guest_frame(gfn),
                "{g}"
            );
            // Asked again: from the memo.
            assert_eq!(
                memo.guest_frame(m.domain(), gfn),
                m.domain().guest_frame(gfn),
                "{g}"
            );
        }
    }

    #[test]
    fn answers_follow_every_p2m_change() {
        let mut m = machine();
        let mut memo = P2mMemo::default();
        let gfns = [0, 1, 511, 512, 1199, 1200, 5000, 1 << 20];
        agrees(&mut memo, &mut m, &gfns);
        assert!(!memo.answers.borrow().is_empty());

        // A mapping removed and one added through the engine.
        let old = m.ram_frame(Gfn::new(1)).unwrap();
        let flush = m.domain_mut().set_p2m(Gfn::new(1), None).unwrap();
        m.settle(flush);
        let flush = m
            .domain_mut()
            .set_p2m(Gfn::new(5000), Some((old, P2mType::Ram)))
            .unwrap();
        m.settle(flush);
        agrees(&mut memo, &mut m, &gfns);
        assert_eq!(memo.guest_frame(m.domain(), Gfn::new(1)), None);
        assert_eq!(
            memo.guest_frame(m.domain(), Gfn::new(5000)),
            Some((old, P2mType::Ram))
        );

        // A leaf entry changed behind the engine's back, in machine memory.
        let p2m = m.domain().p2m().unwrap();
        let (leaf_table, slot) = p2m
            .table_frames()
            .flat_map(|t| (0..512u64).map(move |i| (t, Maddr::new(t.base().raw() + 8 * i))))
            .find(|&(_, a)| {
                let e = m.domain().host().read_u64(a).unwrap();
                e & bits::P != 0 && e & bits::ADDR_MASK_8 == old.base().raw()
            })
            .expect("the p2m entry of gfn 5000");
        m.domain_mut().host_mut().write_u64(slot, 0).unwrap();
        agrees(&mut memo, &mut m, &gfns);
        assert_eq!(memo.guest_frame(m.domain(), Gfn::new(5000)), None);

        // A frame handed out again (zero-filled) that was a p2m table.
        m.domain_mut().host_mut().zero_frame(leaf_table).unwrap();
        agrees(&mut memo, &mut m, &gfns);
    }

    #[test]
    fn without_a_refresh_nothing_stale_is_answered() {
        let mut m = machine();
        let mut memo = P2mMemo::default();
        agrees(&mut memo, &mut m, &[7]);
        let flush = m.domain_mut().set_p2m(Gfn::new(7), None).unwrap();
        m.settle(flush);
        // Not refreshed: the memo sees that the p2m changed and asks the domain.
        assert_eq!(memo.guest_frame(m.domain(), Gfn::new(7)), None);
        let mfn = m.domain_mut().host_mut().alloc_block(0).unwrap();
        let flush = m
            .domain_mut()
            .set_p2m(Gfn::new(7), Some((mfn, P2mType::Ram)))
            .unwrap();
        m.settle(flush);
        assert_eq!(
            memo.guest_frame(m.domain(), Gfn::new(7)),
            Some((mfn, P2mType::Ram))
        );
    }
}

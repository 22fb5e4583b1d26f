//! No guest livelock (issue 10, item 7): a guest controls its instruction bytes and its
//! timing, so it can make the engine meet the same instruction again and again. Every retry
//! must make progress, or the domain is failed cleanly; the host never spins.

use shadow2::addr::Gpa;
use shadow2::domain::{EmulateOutcome, EngineError};
use shadow2::emulate::Regs;

use crate::engine_support::{DATA, PAGING_PAIRS};
use crate::harness::{CODE_GFN, CODE_VA, DATA_GFN, KDATA, Xsa};

const X: u64 = 0x40_3000;
const PT_VA: u64 = 0x80_0000;

/// `inc dword [rdi]` (the emulator does not do it) on the top table the vcpu runs on, which
/// is shadowed again as soon as the engine unshadows it: a guest that re-executes it after
/// the first `Unshadowed` would trap for ever. Must hold on every pair: the first attempt
/// unshadows, the same instruction at the same address again fails the domain with
/// `Unemulatable` (never a host panic, never another `Unshadowed`), and the failed domain
/// refuses every later call.
#[test]
fn issue10_an_unemulatable_instruction_repeated_on_the_running_top_fails_the_domain() {
    for pair in PAGING_PAIRS {
        let mut x = Xsa::new(pair, 1, 128);
        let cr3 = x.space();
        x.map(cr3, X, DATA_GFN, DATA);
        let top = x.map_walk_top(cr3, X, PT_VA);
        x.run(0, cr3);
        x.read(0, X).unwrap();
        x.m.write_phys(Gpa::new(CODE_GFN << 12), &[0xff, 0x07])
            .unwrap();
        let offset = 0xff0;
        let mut regs = Regs::new(x.code_mode());
        regs.rip = CODE_VA;
        regs.gpr[Regs::RDI] = PT_VA + offset;
        let gpa = Gpa::new((top << 12) + offset);
        let first = x.host("emulate on the running top", |d| {
            d.emulate(0, &mut regs, gpa)
        });
        assert_eq!(first, Ok(EmulateOutcome::Unshadowed), "{pair:?}");
        assert!(x.domain().shadows().is_page_table(x.mfn(top)), "{pair:?}");
        let again = x.m.domain_mut().emulate(0, &mut regs, gpa).map(|(o, _)| o);
        assert_eq!(
            again,
            Err(EngineError::Unemulatable { rip: CODE_VA }),
            "{pair:?}"
        );
        assert!(x.domain().failure().is_some(), "{pair:?}");
        let after = x.m.domain_mut().emulate(0, &mut regs, gpa).map(|(o, _)| o);
        assert_eq!(after, Err(EngineError::DomainFailed), "{pair:?}");
    }
}

/// The same instruction on a page table no vcpu runs on: unshadowing it lets the guest's
/// retry write natively, so a second attempt never comes; if the page becomes a table and
/// the instruction is met again, that is progress too (the domain is not failed).
#[test]
fn issue10_an_unemulatable_instruction_on_a_leaf_table_is_not_a_livelock() {
    for pair in PAGING_PAIRS {
        let mut x = Xsa::new(pair, 1, 128);
        let cr3 = x.space();
        x.map(cr3, X, DATA_GFN, DATA);
        let l1 = x.t.table_of(&mut x.m, cr3, X, 1);
        x.map(cr3, PT_VA, l1, KDATA);
        x.run(0, cr3);
        x.read(0, X).unwrap();
        x.m.write_phys(Gpa::new(CODE_GFN << 12), &[0xff, 0x07])
            .unwrap();
        let mut regs = Regs::new(x.code_mode());
        regs.rip = CODE_VA;
        regs.gpr[Regs::RDI] = PT_VA + 0xff0;
        let gpa = Gpa::new((l1 << 12) + 0xff0);
        for round in 0..3 {
            let r = x.host("emulate on an L1", |d| d.emulate(0, &mut regs, gpa));
            assert_eq!(r, Ok(EmulateOutcome::Unshadowed), "{pair:?} round {round}");
            assert!(!x.domain().shadows().is_page_table(x.mfn(l1)), "{pair:?}");
            // The guest reads through the table again: it is shadowed once more.
            x.read(0, X).unwrap();
        }
        assert!(x.domain().failure().is_none(), "{pair:?}");
    }
}

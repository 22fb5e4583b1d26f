//! Per-operation outcomes: a backend wrapper that keeps, for every guest operation, one
//! 64-bit hash of what the guest saw (the bytes it loaded or fetched, the fault it took with
//! CR2 and error code, its registers after an executed instruction), so that two runs of the
//! same guest on different backends can be compared operation by operation.
//!
//! [`Counting`](crate::Counting)'s digest says whether two runs differ; these hashes say
//! where and how often.

use shadow2::emulate::Regs;
use shadow2::paging::ControlState;

use crate::ops::{Event, Fault, GuestOps, OpError};

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// RFLAGS.OF, SF, AF and PF: BT, BTS, BTR and BTC leave them undefined (SDM vol. 2A,
/// "BTS—Bit Test and Set", Flags Affected), and the guest models change page-table entries
/// with LOCK BTR, so two correct CPUs may disagree on them after an executed instruction.
/// Every other bit of RFLAGS is compared.
pub const RFLAGS_UNDEFINED_AFTER_BIT_TEST: u64 = (1 << 11) | (1 << 7) | (1 << 4) | (1 << 2);

/// Which operation a hash is of (so that a load and a store with the same outcome differ).
#[derive(Clone, Copy)]
#[repr(u8)]
enum Kind {
    Read = 1,
    Write,
    Fetch,
    Exec,
    Control,
    Cr3,
    Invlpg,
}

/// FNV-1a, fed field by field.
struct Hasher(u64);

impl Hasher {
    fn new(kind: Kind, vcpu: usize) -> Hasher {
        let mut h = Hasher(FNV_OFFSET);
        h.bytes(&[kind as u8]);
        h.word(vcpu as u64);
        h
    }

    fn bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(FNV_PRIME);
        }
    }

    fn word(&mut self, w: u64) {
        self.bytes(&w.to_le_bytes());
    }

    /// The end of an operation: success (and then `on_success`'s fields) or what went
    /// wrong.
    fn outcome(mut self, r: &Result<(), OpError>, on_success: impl FnOnce(&mut Hasher)) -> u64 {
        match r {
            Ok(()) => {
                self.bytes(b"ok");
                on_success(&mut self);
            }
            Err(OpError::Fault(Fault::PageFault { va, code })) => {
                self.bytes(b"#PF");
                self.word(*va);
                self.word(u64::from(*code));
            }
            Err(OpError::Fault(Fault::GeneralProtection)) => self.bytes(b"#GP"),
            Err(OpError::Fault(Fault::InvalidOpcode)) => self.bytes(b"#UD"),
            // A backend failure ends the run; its words differ between backends, so only
            // the fact is hashed.
            Err(OpError::Backend(_)) => self.bytes(b"backend"),
        }
        self.0
    }
}

fn hash_regs(h: &mut Hasher, regs: &Regs) {
    for g in regs.gpr {
        h.word(g);
    }
    h.word(regs.rip);
    h.word(regs.rflags & !RFLAGS_UNDEFINED_AFTER_BIT_TEST);
    h.word(regs.fs_base);
    h.word(regs.gs_base);
}

/// A backend wrapper that records one hash per guest operation.
#[derive(Debug)]
pub struct Outcomes<B> {
    inner: B,
    hashes: Vec<u64>,
}

impl<B: GuestOps> Outcomes<B> {
    /// Wraps `inner`.
    pub fn new(inner: B) -> Outcomes<B> {
        Outcomes {
            inner,
            hashes: Vec::new(),
        }
    }

    /// One hash per guest operation so far, in order.
    pub fn hashes(&self) -> &[u64] {
        &self.hashes
    }

    /// The backend.
    pub fn inner(&self) -> &B {
        &self.inner
    }

    /// Unwraps: the backend and the hashes.
    pub fn into_parts(self) -> (B, Vec<u64>) {
        (self.inner, self.hashes)
    }
}

/// How many operations differ between two runs' hashes: positions whose hashes differ, plus
/// the operations one run has beyond the other's end. 0 when the runs agree.
pub fn differences(a: &[u64], b: &[u64]) -> u64 {
    let differing = a.iter().zip(b).filter(|(x, y)| x != y).count() as u64;
    differing + a.len().abs_diff(b.len()) as u64
}

/// The index of the first operation at which two runs differ (a differing hash, or the end
/// of the shorter run), if they differ.
pub fn first_difference(a: &[u64], b: &[u64]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or_else(|| (a.len() != b.len()).then(|| a.len().min(b.len())))
}

impl<B: GuestOps> GuestOps for Outcomes<B> {
    fn vcpus(&self) -> usize {
        self.inner.vcpus()
    }
    fn ram_frames(&self) -> u64 {
        self.inner.ram_frames()
    }
    fn load_image(&mut self, gpa: u64, data: &[u8]) -> Result<(), OpError> {
        self.inner.load_image(gpa, data)
    }
    fn read(&mut self, vcpu: usize, va: u64, cpl: u8, buf: &mut [u8]) -> Result<(), OpError> {
        let r = self.inner.read(vcpu, va, cpl, buf);
        let h = Hasher::new(Kind::Read, vcpu).outcome(&r, |h| h.bytes(buf));
        self.hashes.push(h);
        r
    }
    fn write(&mut self, vcpu: usize, va: u64, cpl: u8, data: &[u8]) -> Result<(), OpError> {
        let r = self.inner.write(vcpu, va, cpl, data);
        self.hashes
            .push(Hasher::new(Kind::Write, vcpu).outcome(&r, |_| {}));
        r
    }
    fn fetch(&mut self, vcpu: usize, va: u64, cpl: u8, buf: &mut [u8]) -> Result<(), OpError> {
        let r = self.inner.fetch(vcpu, va, cpl, buf);
        let h = Hasher::new(Kind::Fetch, vcpu).outcome(&r, |h| h.bytes(buf));
        self.hashes.push(h);
        r
    }
    fn exec(&mut self, vcpu: usize, regs: &mut Regs) -> Result<(), OpError> {
        let r = self.inner.exec(vcpu, regs);
        let h = Hasher::new(Kind::Exec, vcpu).outcome(&r, |h| hash_regs(h, regs));
        self.hashes.push(h);
        r
    }
    fn set_control(&mut self, vcpu: usize, ctl: ControlState) -> Result<(), OpError> {
        let r = self.inner.set_control(vcpu, ctl);
        self.hashes
            .push(Hasher::new(Kind::Control, vcpu).outcome(&r, |_| {}));
        r
    }
    fn set_cr3(&mut self, vcpu: usize, cr3: u64) -> Result<(), OpError> {
        let r = self.inner.set_cr3(vcpu, cr3);
        self.hashes
            .push(Hasher::new(Kind::Cr3, vcpu).outcome(&r, |_| {}));
        r
    }
    fn invlpg(&mut self, vcpu: usize, va: u64) -> Result<(), OpError> {
        let r = self.inner.invlpg(vcpu, va);
        self.hashes
            .push(Hasher::new(Kind::Invlpg, vcpu).outcome(&r, |_| {}));
        r
    }
    fn event(&mut self, event: Event) {
        self.inner.event(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shadow2::emulate::CodeMode;

    /// A backend whose every answer is set by the test.
    #[derive(Default)]
    struct Scripted {
        byte: u8,
        fault: Option<Fault>,
        rflags: u64,
        rax: u64,
    }

    impl Scripted {
        fn result(&self) -> Result<(), OpError> {
            self.fault.map_or(Ok(()), |f| Err(OpError::Fault(f)))
        }
    }

    impl GuestOps for Scripted {
        fn vcpus(&self) -> usize {
            1
        }
        fn ram_frames(&self) -> u64 {
            1
        }
        fn load_image(&mut self, _gpa: u64, _data: &[u8]) -> Result<(), OpError> {
            Ok(())
        }
        fn read(&mut self, _v: usize, _va: u64, _cpl: u8, buf: &mut [u8]) -> Result<(), OpError> {
            buf.fill(self.byte);
            self.result()
        }
        fn write(&mut self, _v: usize, _va: u64, _cpl: u8, _data: &[u8]) -> Result<(), OpError> {
            self.result()
        }
        fn fetch(&mut self, _v: usize, _va: u64, _cpl: u8, buf: &mut [u8]) -> Result<(), OpError> {
            buf.fill(self.byte);
            self.result()
        }
        fn exec(&mut self, _v: usize, regs: &mut Regs) -> Result<(), OpError> {
            regs.rflags = self.rflags;
            regs.gpr[Regs::RAX] = self.rax;
            self.result()
        }
        fn set_control(&mut self, _v: usize, _ctl: ControlState) -> Result<(), OpError> {
            self.result()
        }
        fn set_cr3(&mut self, _v: usize, _cr3: u64) -> Result<(), OpError> {
            self.result()
        }
        fn invlpg(&mut self, _v: usize, _va: u64) -> Result<(), OpError> {
            self.result()
        }
    }

    fn regs() -> Regs {
        Regs {
            gpr: [0; 16],
            rip: 0x1000,
            rflags: 2,
            fs_base: 0,
            gs_base: 0,
            mode: CodeMode::Bits64,
            cpl: 0,
        }
    }

    /// Every kind of operation once, on a backend answering as `b` says.
    fn every_op(b: Scripted) -> Vec<u64> {
        let mut o = Outcomes::new(b);
        let mut buf = [0u8; 4];
        let _ = o.read(0, 0x1000, 3, &mut buf);
        let _ = o.write(0, 0x1000, 3, &[1, 2]);
        let _ = o.fetch(0, 0x1000, 3, &mut buf);
        let _ = o.exec(0, &mut regs());
        let _ = o.set_control(0, ControlState::default());
        let _ = o.set_cr3(0, 0x2000);
        let _ = o.invlpg(0, 0x1000);
        o.into_parts().1
    }

    #[test]
    fn one_hash_per_operation_and_none_for_image_loads_or_events() {
        let mut o = Outcomes::new(Scripted::default());
        o.load_image(0, &[1]).unwrap();
        o.event(Event::DemandFault);
        assert!(o.hashes().is_empty());
        assert_eq!(every_op(Scripted::default()).len(), 7);
    }

    #[test]
    fn operations_of_different_kinds_hash_differently() {
        let h = every_op(Scripted::default());
        for (i, a) in h.iter().enumerate() {
            for b in &h[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    #[test]
    fn the_same_answers_give_the_same_hashes() {
        let a = every_op(Scripted {
            byte: 7,
            ..Scripted::default()
        });
        let b = every_op(Scripted {
            byte: 7,
            ..Scripted::default()
        });
        assert_eq!(differences(&a, &b), 0);
        assert_eq!(first_difference(&a, &b), None);
    }

    #[test]
    fn a_byte_loaded_changes_the_loads_and_fetches_only() {
        let a = every_op(Scripted::default());
        let b = every_op(Scripted {
            byte: 1,
            ..Scripted::default()
        });
        assert_eq!(differences(&a, &b), 2);
        assert_eq!(first_difference(&a, &b), Some(0));
    }

    #[test]
    fn a_fault_its_address_and_its_error_code_are_each_seen() {
        let pf = |va, code| Scripted {
            fault: Some(Fault::PageFault { va, code }),
            ..Scripted::default()
        };
        let base = every_op(pf(0x1000, 4));
        assert_eq!(differences(&base, &every_op(Scripted::default())), 7);
        assert_eq!(differences(&base, &every_op(pf(0x2000, 4))), 7);
        assert_eq!(differences(&base, &every_op(pf(0x1000, 5))), 7);
        let gp = Scripted {
            fault: Some(Fault::GeneralProtection),
            ..Scripted::default()
        };
        assert_eq!(differences(&base, &every_op(gp)), 7);
    }

    #[test]
    fn registers_after_exec_count_but_flags_bit_tests_leave_undefined_do_not() {
        let base = every_op(Scripted::default());
        let rax = every_op(Scripted {
            rax: 1,
            ..Scripted::default()
        });
        assert_eq!(differences(&base, &rax), 1);
        assert_eq!(first_difference(&base, &rax), Some(3));
        let zf = every_op(Scripted {
            rflags: 1 << 6,
            ..Scripted::default()
        });
        assert_eq!(differences(&base, &zf), 1);
        let undefined = every_op(Scripted {
            rflags: RFLAGS_UNDEFINED_AFTER_BIT_TEST,
            ..Scripted::default()
        });
        assert_eq!(differences(&base, &undefined), 0);
    }

    #[test]
    fn differences_count_differing_positions_and_the_length_difference() {
        assert_eq!(differences(&[], &[]), 0);
        assert_eq!(differences(&[1, 2, 3], &[1, 9, 3]), 1);
        assert_eq!(differences(&[1, 2, 3], &[1, 2]), 1);
        assert_eq!(differences(&[1], &[2, 3, 4]), 3);
        assert_eq!(first_difference(&[1, 2, 3], &[1, 2]), Some(2));
        assert_eq!(first_difference(&[1, 2], &[1, 2, 3]), Some(2));
        assert_eq!(first_difference(&[5, 2], &[1, 2]), Some(0));
    }
}

//! What a run of the guest ends with, the exception frame the stubs leave on the ring-0
//! stack, and VM exits counted by kind.

use std::fmt;

use shadow2::Gpa;
use shadow2::paging::PfErrorCode;

/// Why [`crate::KvmMachine::run`] returned to its caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestExit {
    /// The guest wrote `value` to its report port.
    Reported {
        /// The port (see [`crate::hyper::GUEST_PORT`]).
        port: u16,
        /// The value (zero-extended).
        value: u32,
    },
    /// A page fault the guest must see (the engine propagated it).
    PageFault {
        /// CR2.
        cr2: u64,
        /// The guest's error code.
        code: PfErrorCode,
        /// The faulting instruction.
        rip: u64,
    },
    /// Another exception of the guest (#GP, #UD...).
    Exception {
        /// The vector.
        vector: u8,
        /// Its error code (0 where the CPU pushes none).
        error_code: u64,
        /// The faulting instruction.
        rip: u64,
    },
    /// An access that reaches guest-physical memory that is not RAM.
    Mmio {
        /// The address.
        gpa: Gpa,
        /// The instruction.
        rip: u64,
    },
}

/// The frame a 64-bit exception pushes (with the stub's dummy error code), from the lowest
/// address: error code, RIP, CS, RFLAGS, RSP, SS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExceptionFrame {
    /// Error code.
    pub error_code: u64,
    /// RIP of the faulting instruction.
    pub rip: u64,
    /// CS (its low two bits are the CPL the exception came from).
    pub cs: u64,
    /// RFLAGS.
    pub rflags: u64,
    /// RSP.
    pub rsp: u64,
    /// SS.
    pub ss: u64,
}

impl ExceptionFrame {
    /// Bytes on the stack.
    pub const BYTES: usize = 48;

    /// The frame from its bytes.
    pub fn from_bytes(b: &[u8; Self::BYTES]) -> ExceptionFrame {
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[8 * i..8 * i + 8]);
            u64::from_le_bytes(w)
        };
        ExceptionFrame {
            error_code: word(0),
            rip: word(1),
            cs: word(2),
            rflags: word(3),
            rsp: word(4),
            ss: word(5),
        }
    }

    /// Its bytes.
    pub fn to_bytes(self) -> [u8; Self::BYTES] {
        let mut b = [0u8; Self::BYTES];
        let words = [
            self.error_code,
            self.rip,
            self.cs,
            self.rflags,
            self.rsp,
            self.ss,
        ];
        for (i, w) in words.iter().enumerate() {
            b[8 * i..8 * i + 8].copy_from_slice(&w.to_le_bytes());
        }
        b
    }

    /// The privilege level the exception came from.
    pub fn cpl(&self) -> u8 {
        (self.cs & 3) as u8
    }
}

/// VM exits by kind, and the work done for them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitCounts {
    /// Every `KVM_RUN` that returned.
    pub total: u64,
    /// Page faults the engine fixed (a shadow entry filled).
    pub pf_fixed: u64,
    /// Page faults the engine found nothing to fix for (the guest retries).
    pub pf_spurious: u64,
    /// Page faults handed to the guest.
    pub pf_propagated: u64,
    /// Page faults whose write the engine emulated.
    pub pf_emulated: u64,
    /// Page faults that reached MMIO.
    pub pf_mmio: u64,
    /// Other exceptions through the stubs.
    pub other_exceptions: u64,
    /// Writes to the guest's report port (the executor's end of an operation).
    pub guest_io: u64,
    /// The executor's privileged instructions (MOV CR0, MOV CR3, INVLPG) trapping with #GP.
    pub privileged: u64,
    /// Single-step traps (#DB) after an executed guest instruction.
    pub single_steps: u64,
    /// Instruction fetches that reached their page (the HLT the VMM put there trapped).
    pub fetches: u64,
    /// Hardware CR3 reloads carried out for the engine's flushes and root changes.
    pub cr3_reloads: u64,
    /// Flushes of every translation KVM caches, carried out for the engine's flushes.
    pub tlb_flushes: u64,
    /// Signals sent to vcpus on other threads to take them out of `KVM_RUN` for a paging
    /// change posted to them (not in `total`).
    pub kicks: u64,
    /// `KVM_RUN` calls with `immediate_exit` that complete an I/O exit before the VMM sets
    /// registers (no guest instruction runs; not in `total`).
    pub io_completions: u64,
}

impl ExitCounts {
    /// The sum of two counts, kind by kind.
    pub fn plus(&self, other: &ExitCounts) -> ExitCounts {
        ExitCounts {
            total: self.total + other.total,
            pf_fixed: self.pf_fixed + other.pf_fixed,
            pf_spurious: self.pf_spurious + other.pf_spurious,
            pf_propagated: self.pf_propagated + other.pf_propagated,
            pf_emulated: self.pf_emulated + other.pf_emulated,
            pf_mmio: self.pf_mmio + other.pf_mmio,
            other_exceptions: self.other_exceptions + other.other_exceptions,
            guest_io: self.guest_io + other.guest_io,
            privileged: self.privileged + other.privileged,
            single_steps: self.single_steps + other.single_steps,
            fetches: self.fetches + other.fetches,
            cr3_reloads: self.cr3_reloads + other.cr3_reloads,
            tlb_flushes: self.tlb_flushes + other.tlb_flushes,
            io_completions: self.io_completions + other.io_completions,
            kicks: self.kicks + other.kicks,
        }
    }

    /// Every count by kind, named as `--json` prints them (`total` first).
    pub fn by_kind(&self) -> [(&'static str, u64); 15] {
        [
            ("total", self.total),
            ("pf_fixed", self.pf_fixed),
            ("pf_spurious", self.pf_spurious),
            ("pf_propagated", self.pf_propagated),
            ("pf_emulated", self.pf_emulated),
            ("pf_mmio", self.pf_mmio),
            ("privileged", self.privileged),
            ("single_steps", self.single_steps),
            ("fetches", self.fetches),
            ("other_exceptions", self.other_exceptions),
            ("guest_io", self.guest_io),
            ("cr3_reloads", self.cr3_reloads),
            ("tlb_flushes", self.tlb_flushes),
            ("io_completions", self.io_completions),
            ("kicks", self.kicks),
        ]
    }
}

impl fmt::Display for ExitCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} exits: #PF fixed {}, spurious {}, propagated {}, emulated {}, mmio {}; privileged {}, single steps {}, fetches {}, other exceptions {}; guest I/O {}; CR3 reloads {}, TLB flushes {}",
            self.total,
            self.pf_fixed,
            self.pf_spurious,
            self.pf_propagated,
            self.pf_emulated,
            self.pf_mmio,
            self.privileged,
            self.single_steps,
            self.fetches,
            self.other_exceptions,
            self.guest_io,
            self.cr3_reloads,
            self.tlb_flushes
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_round_trips_through_bytes() {
        let f = ExceptionFrame {
            error_code: 7,
            rip: 0x40_0010,
            cs: 0x33,
            rflags: 0x202,
            rsp: 0x7000,
            ss: 0x2b,
        };
        assert_eq!(ExceptionFrame::from_bytes(&f.to_bytes()), f);
        assert_eq!(f.cpl(), 3);
    }
}

//! Counts what a guest model asked of its backend: guest operations by kind, the model's
//! events, and a digest of everything the guest read (two backends that run the same guest
//! correctly give the same digest).

use shadow2::emulate::Regs;
use shadow2::paging::ControlState;

use crate::ops::{Event, GuestOps, OpError};

/// Counters of one run, the same whether the guest model ran or a trace was replayed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Counters {
    /// Every guest operation (the sum of the kinds below).
    pub guest_ops: u64,
    /// Loads.
    pub reads: u64,
    /// Stores.
    pub writes: u64,
    /// Instruction fetches.
    pub fetches: u64,
    /// Instructions executed (page-table writes).
    pub execs: u64,
    /// CR0/CR4/EFER writes.
    pub control_writes: u64,
    /// CR3 writes.
    pub cr3_writes: u64,
    /// INVLPGs.
    pub invlpgs: u64,
    /// Operations that ended in a fault delivered to the guest.
    pub faults_delivered: u64,
    /// Pages mapped on first touch by the guest kernel.
    pub demand_faults: u64,
    /// Copy-on-write breaks.
    pub cow_faults: u64,
    /// Processes killed for a real violation.
    pub kills: u64,
    /// Workload units finished.
    pub workload_steps: u64,
    /// Reads that returned data other than what the guest had written.
    pub data_errors: u64,
    /// FNV-1a over every byte the guest loaded or fetched, and every fault it took.
    pub digest: u64,
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
/// `FNV_PRIME` to the 8th power (wrapping): what eight zero bytes do to the digest.
const FNV_PRIME_POW8: u64 = {
    let mut p = 1u64;
    let mut i = 0;
    while i < 8 {
        p = p.wrapping_mul(FNV_PRIME);
        i += 1;
    }
    p
};

impl Counters {
    /// Fresh counters.
    pub fn new() -> Counters {
        Counters {
            digest: FNV_OFFSET,
            ..Counters::default()
        }
    }

    fn mix(&mut self, bytes: &[u8]) {
        // FNV-1a byte by byte; a zero byte only multiplies by the prime, so eight of them
        // multiply by its eighth power (the same value, in one step: guests read mostly
        // zeros).
        let mut words = bytes.chunks_exact(8);
        for word in &mut words {
            if word == [0u8; 8] {
                self.digest = self.digest.wrapping_mul(FNV_PRIME_POW8);
            } else {
                self.mix_bytes(word);
            }
        }
        self.mix_bytes(words.remainder());
    }

    fn mix_bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.digest = (self.digest ^ u64::from(b)).wrapping_mul(FNV_PRIME);
        }
    }

    fn outcome<T>(&mut self, r: &Result<T, OpError>) {
        if let Err(OpError::Fault(f)) = r {
            self.faults_delivered += 1;
            let tag: [u8; 8] = match *f {
                crate::ops::Fault::PageFault { va, code } => {
                    (va ^ u64::from(code) << 48).to_le_bytes()
                }
                crate::ops::Fault::GeneralProtection => [0xd; 8],
                crate::ops::Fault::InvalidOpcode => [0x6; 8],
            };
            self.mix(&tag);
        }
    }
}

/// A backend wrapper that counts.
#[derive(Debug)]
pub struct Counting<B> {
    inner: B,
    counters: Counters,
}

impl<B: GuestOps> Counting<B> {
    /// Wraps `inner`.
    pub fn new(inner: B) -> Counting<B> {
        Counting {
            inner,
            counters: Counters::new(),
        }
    }
    /// The counters so far.
    pub fn counters(&self) -> Counters {
        self.counters
    }
    /// The backend.
    pub fn inner(&self) -> &B {
        &self.inner
    }
    /// The backend, mutably.
    pub fn inner_mut(&mut self) -> &mut B {
        &mut self.inner
    }
    /// Unwraps.
    pub fn into_inner(self) -> B {
        self.inner
    }
}

impl<B: GuestOps> GuestOps for Counting<B> {
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
        self.counters.guest_ops += 1;
        self.counters.reads += 1;
        let r = self.inner.read(vcpu, va, cpl, buf);
        if r.is_ok() {
            self.counters.mix(buf);
        }
        self.counters.outcome(&r);
        r
    }
    fn write(&mut self, vcpu: usize, va: u64, cpl: u8, data: &[u8]) -> Result<(), OpError> {
        self.counters.guest_ops += 1;
        self.counters.writes += 1;
        let r = self.inner.write(vcpu, va, cpl, data);
        self.counters.outcome(&r);
        r
    }
    fn fetch(&mut self, vcpu: usize, va: u64, cpl: u8, buf: &mut [u8]) -> Result<(), OpError> {
        self.counters.guest_ops += 1;
        self.counters.fetches += 1;
        let r = self.inner.fetch(vcpu, va, cpl, buf);
        if r.is_ok() {
            self.counters.mix(buf);
        }
        self.counters.outcome(&r);
        r
    }
    fn exec(&mut self, vcpu: usize, regs: &mut Regs) -> Result<(), OpError> {
        self.counters.guest_ops += 1;
        self.counters.execs += 1;
        let r = self.inner.exec(vcpu, regs);
        if r.is_ok() {
            // CMPXCHG and XCHG return what memory held: part of what the guest saw.
            for g in regs.gpr.iter().take(4) {
                self.counters.mix(&g.to_le_bytes());
            }
        }
        self.counters.outcome(&r);
        r
    }
    fn set_control(&mut self, vcpu: usize, ctl: ControlState) -> Result<(), OpError> {
        self.counters.guest_ops += 1;
        self.counters.control_writes += 1;
        let r = self.inner.set_control(vcpu, ctl);
        self.counters.outcome(&r);
        r
    }
    fn set_cr3(&mut self, vcpu: usize, cr3: u64) -> Result<(), OpError> {
        self.counters.guest_ops += 1;
        self.counters.cr3_writes += 1;
        let r = self.inner.set_cr3(vcpu, cr3);
        self.counters.outcome(&r);
        r
    }
    fn invlpg(&mut self, vcpu: usize, va: u64) -> Result<(), OpError> {
        self.counters.guest_ops += 1;
        self.counters.invlpgs += 1;
        let r = self.inner.invlpg(vcpu, va);
        self.counters.outcome(&r);
        r
    }
    fn event(&mut self, event: Event) {
        match event {
            Event::DemandFault => self.counters.demand_faults += 1,
            Event::CowFault => self.counters.cow_faults += 1,
            Event::Kill => self.counters.kills += 1,
            Event::WorkloadStep => self.counters.workload_steps += 1,
            Event::DataError => self.counters.data_errors += 1,
            Event::UserAccess | Event::UserAccessDone => {}
        }
        self.inner.event(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fnv1a(bytes: &[u8]) -> u64 {
        bytes.iter().fold(FNV_OFFSET, |d, &b| {
            (d ^ u64::from(b)).wrapping_mul(FNV_PRIME)
        })
    }

    #[test]
    fn the_digest_is_fnv1a_byte_by_byte_whatever_the_zero_runs() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut data = vec![0u8; 4099];
        for (i, b) in data.iter_mut().enumerate() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            // Runs of zeros of every length and alignment, between nonzero bytes.
            *b = if (seed >> 8).is_multiple_of(3) || i % 97 < 20 {
                0
            } else {
                seed as u8
            };
        }
        for start in 0..9 {
            for end in [
                start,
                start + 1,
                start + 7,
                start + 8,
                start + 9,
                1000,
                4099,
            ] {
                let piece = &data[start..end];
                let mut c = Counters::new();
                c.mix(&piece[..piece.len() / 2]);
                c.mix(&piece[piece.len() / 2..]);
                assert_eq!(c.digest, fnv1a(piece), "{start}..{end}");
            }
        }
        let mut zeros = Counters::new();
        zeros.mix(&[0; 4096]);
        assert_eq!(zeros.digest, fnv1a(&[0; 4096]));
    }
}

//! Running the write emulator for a vcpu (seed slide "Emulate all writes to page tables"):
//! its linear memory is reached through the guest's own tables at the guest's privilege
//! (A/D set, SMAP honoured), every page written is validated into its shadows at once, and
//! an instruction the emulator cannot do unshadows the page so the guest can write it
//! natively: never a wrong write, never a lost one.

use alloc::vec::Vec;

use super::guest_mem::{FrameCache, FrameMap, GuestMem};
use super::{Domain, EngineError};
use crate::addr::{Gpa, Gva, PAGE_SIZE};
use crate::emulate::{EmuError, EmuFault, EmuMemory, Emulated, Regs, emulate_write};
use crate::flush::Flush;
use crate::host::MachineMemory;
use crate::p2m::P2mType;
use crate::paging::{Access, AccessKind, AdUpdate, PfErrorCode, WalkEnv, WalkFault, walk};

/// What became of an emulation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmulateOutcome {
    /// The instruction was performed; the registers are updated.
    Done(Emulated),
    /// The instruction faults: deliver this to the guest (registers unchanged).
    Fault(EmuFault),
    /// The emulator could not do it: the target page is no longer shadowed; resume the
    /// guest at the same instruction, which now writes natively.
    Unshadowed,
}

/// A vcpu's linear memory as the emulator sees it.
struct VcpuMemory<'a, H: MachineMemory> {
    d: &'a mut Domain<H>,
    v: usize,
    cpl: u8,
    /// An engine failure met inside a memory access (the emulator only knows faults).
    error: Option<EngineError>,
}

impl<H: MachineMemory> VcpuMemory<'_, H> {
    fn fail(&mut self, e: EngineError) -> EmuFault {
        self.error.get_or_insert(e);
        EmuFault::GeneralProtection
    }

    /// Translates `va` for `kind` through the guest's tables, setting A/D as the CPU would
    /// and validating those writes.
    fn translate(&mut self, va: u64, kind: AccessKind) -> Result<Gpa, EmuFault> {
        let ctl = self.d.vcpus.get(self.v).map(|c| c.ctl).unwrap_or_default();
        let feat = self.d.config.guest_features;
        let access = Access::at_cpl(kind, self.cpl);
        let env = WalkEnv {
            ctl: &ctl,
            feat: &feat,
            ad: AdUpdate::Set,
        };
        let frames = FrameCache::new();
        let map = match &self.d.p2m {
            Some(p2m) => FrameMap::Translated(p2m),
            None => FrameMap::Direct(&self.d.owned),
        };
        let mut mem = GuestMem::new(&mut self.d.host, map, &frames);
        let result = walk(&mut mem, env, Gva::new(va), access);
        let writes: Vec<(Gpa, u8)> = mem.writes().collect();
        for (gpa, width) in writes {
            if let Err(e) = self.d.after_guest_write(gpa, u64::from(width)) {
                return Err(self.fail(e));
            }
        }
        match result {
            Ok(t) => Ok(t.addr),
            Err(f) => Err(match f.fault {
                WalkFault::PageFault(ec) => EmuFault::PageFault {
                    va,
                    code: ec.bits(),
                },
                WalkFault::GeneralProtection => EmuFault::GeneralProtection,
                WalkFault::Memory(_) => EmuFault::PageFault {
                    va,
                    code: PfErrorCode::for_access(access, &ctl).bits(),
                },
            }),
        }
    }

    /// The page-sized pieces of `len` bytes at `va`: (linear address, length).
    fn pieces(va: u64, len: usize) -> impl Iterator<Item = (u64, usize)> {
        let mut done = 0usize;
        core::iter::from_fn(move || {
            if done >= len {
                return None;
            }
            let at = va.wrapping_add(done as u64);
            let room = (PAGE_SIZE - (at & (PAGE_SIZE - 1))) as usize;
            let n = room.min(len - done);
            let piece = (at, n);
            done += n;
            Some(piece)
        })
    }

    fn load(&mut self, va: u64, buf: &mut [u8], kind: AccessKind) -> Result<(), EmuFault> {
        let mut done = 0usize;
        for (at, n) in Self::pieces(va, buf.len()) {
            let gpa = self.translate(at, kind)?;
            let Some(out) = buf.get_mut(done..done + n) else {
                return Err(self.fail(EngineError::Internal("emulator buffer")));
            };
            if let Err(e) = self.d.read_guest_phys(gpa, out) {
                return Err(self.fail(e));
            }
            done += n;
        }
        Ok(())
    }
}

impl<H: MachineMemory> EmuMemory for VcpuMemory<'_, H> {
    fn fetch(&mut self, va: u64, buf: &mut [u8]) -> Result<(), EmuFault> {
        self.load(va, buf, AccessKind::Fetch)
    }
    fn read(&mut self, va: u64, buf: &mut [u8]) -> Result<(), EmuFault> {
        self.load(va, buf, AccessKind::Read)
    }
    fn read_for_write(&mut self, va: u64, buf: &mut [u8]) -> Result<(), EmuFault> {
        self.load(va, buf, AccessKind::Write)
    }
    fn write(&mut self, va: u64, data: &[u8]) -> Result<(), EmuFault> {
        // Every page is checked (and its A/D set) before any byte is written.
        let mut targets: Vec<(Gpa, usize)> = Vec::new();
        for (at, n) in Self::pieces(va, data.len()) {
            targets.push((self.translate(at, AccessKind::Write)?, n));
        }
        let mut done = 0usize;
        for (gpa, n) in targets {
            let Some(bytes) = data.get(done..done + n) else {
                return Err(self.fail(EngineError::Internal("emulator buffer")));
            };
            if !matches!(self.d.guest_frame(gpa.gfn()), Some((_, P2mType::Ram))) {
                return Err(self.fail(EngineError::BadArgument("emulated write to non-RAM")));
            }
            if let Err(e) = self.d.write_guest_phys_now(gpa, bytes) {
                return Err(self.fail(e));
            }
            done += n;
        }
        Ok(())
    }
}

impl<H: MachineMemory> Domain<H> {
    /// Emulates the write instruction at `regs.rip` of vcpu `v`, which faulted with
    /// [`crate::multi::FaultOutcome::Emulate`] at `gpa`: performs it through the guest's own
    /// translation, validates every shadow of each page written (so the retried access does
    /// not fault again), and updates `regs`. An instruction the emulator cannot do unshadows
    /// the page at `gpa` and leaves `regs` as they were, so the guest retries it natively.
    pub fn emulate(
        &mut self,
        v: usize,
        regs: &mut Regs,
        gpa: Gpa,
    ) -> Result<(EmulateOutcome, Flush), EngineError> {
        if v >= self.vcpus.len() {
            return Err(EngineError::BadArgument("no such vcpu"));
        }
        self.run(|d| {
            let mut next = *regs;
            let mut mem = VcpuMemory {
                d,
                v,
                cpl: next.cpl,
                error: None,
            };
            let result = emulate_write(&mut next, &mut mem);
            let error = mem.error;
            match (error, result) {
                (Some(e), _) if e.is_fatal() => Err(e),
                (Some(_), _) | (None, Err(EmuError::Unhandled(_))) => {
                    if let Some((mfn, P2mType::Ram)) = d.guest_frame(gpa.gfn()) {
                        d.unshadow(mfn)?;
                        d.rebuild_roots()?;
                    }
                    d.stats.emulation_failures += 1;
                    Ok(EmulateOutcome::Unshadowed)
                }
                (None, Err(EmuError::Fault(f))) => Ok(EmulateOutcome::Fault(f)),
                (None, Ok(done)) => {
                    *regs = next;
                    d.stats.emulated_writes += 1;
                    Ok(EmulateOutcome::Done(done))
                }
            }
        })
    }
}

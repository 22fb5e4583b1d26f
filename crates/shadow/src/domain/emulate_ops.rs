//! Running the write emulator for a vcpu (seed slide "Emulate all writes to page tables"):
//! its linear memory is reached through the guest's own tables at the guest's privilege
//! (A/D set, SMAP honoured), every page written is validated into its shadows at once, and
//! an instruction the emulator cannot do unshadows the page so the guest can write it
//! natively: never a wrong write, never a lost one.
//!
//! After each emulated write, two heuristics decide whether the page is still worth
//! shadowing (unshadowing is always correct: the guest's next use re-shadows it):
//!
//! - **fork/exit** (seed optimisation 3, Xen's "early unshadow"): a vcpu that makes
//!   [`DomainConfig::early_unshadow_writes`] emulated writes in a row, each leaving every
//!   entry it touched not present, into the same page table, with no other shadow fault in
//!   between, is tearing the table down (an exiting process, a parent's copy-on-write pass
//!   after fork): the page is unshadowed, and the rest of the ~500 writes run natively.
//! - **teardown hints** (seed optimisation 5, [`DomainConfig::teardown`]): a page table
//!   zeroed whole by one write (a REP STOS chunk) is being recycled; an entry written with
//!   reserved bits set at every level the page is shadowed at means the page now holds data.
//!   Either unshadows it at once.
//!
//! Neither unshadows a page that is the top-level table a vcpu runs on: it would be
//! shadowed again at once to give the vcpu a root.
//!
//! [`DomainConfig::early_unshadow_writes`]: super::DomainConfig::early_unshadow_writes
//! [`DomainConfig::teardown`]: super::DomainConfig::teardown

use alloc::vec::Vec;

use super::guest_mem::{FrameCache, FrameMap, GuestMem};
use super::{Domain, EngineError};
use crate::addr::{Gpa, Gva, Maddr, Mfn, PAGE_SIZE};
use crate::emulate::{
    AtomicUpdate, EmuError, EmuFault, EmuMemory, Emulated, Regs, emulate_write, page_pieces,
};
use crate::flush::Flush;
use crate::host::MachineMemory;
use crate::p2m::P2mType;
use crate::paging::{
    Access, AccessKind, AdUpdate, ControlState, FourLevel, PagingLevels, PagingMode, PfErrorCode,
    ThreeLevel, TwoLevel, WalkEnv, WalkFault, bits, bits::cr, walk,
};
use crate::types::{Flavor, ShadowKey};

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
    /// The instruction reaches guest-physical `gpa`, which is not RAM: nothing was written
    /// and the registers are unchanged. It is an MMIO access: the device model performs it,
    /// writing any part that is RAM with [`Domain::write_guest_phys`].
    Mmio {
        /// The first address of the instruction's accesses that is not RAM.
        gpa: Gpa,
    },
}

/// A vcpu's linear memory as the emulator sees it.
struct VcpuMemory<'a, H: MachineMemory> {
    d: &'a mut Domain<H>,
    v: usize,
    /// The privilege and RFLAGS.AC of the instruction (the registers handed to
    /// [`Domain::emulate`]), not of the vcpu's saved control state, which may be stale.
    cpl: u8,
    rflags: u64,
    /// An engine failure met inside a memory access (the emulator only knows faults).
    error: Option<EngineError>,
    /// The first guest-physical address the instruction reached that is not RAM: the
    /// access stopped there, before anything was written.
    mmio: Option<Gpa>,
    /// The pieces written (guest-physical address, length, whether every byte was zero).
    written: Vec<(Gpa, usize, bool)>,
}

impl<H: MachineMemory> VcpuMemory<'_, H> {
    fn fail(&mut self, e: EngineError) -> EmuFault {
        self.error.get_or_insert(e);
        EmuFault::GeneralProtection
    }

    /// Translates `va` for `kind` through the guest's tables, setting A/D as the CPU would
    /// and validating those writes.
    fn translate(&mut self, va: u64, kind: AccessKind) -> Result<Gpa, EmuFault> {
        let mut ctl = self.d.vcpus.get(self.v).map(|c| c.ctl).unwrap_or_default();
        ctl.rflags = self.rflags;
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
                // Another vcpu keeps rewriting the entries: the emulation is given up, which
                // unshadows the page so that the guest's retry runs natively.
                WalkFault::Contended => self.fail(EngineError::Preempted),
            }),
        }
    }

    /// Stops the instruction at `gpa` unless it is RAM: an instruction that reaches
    /// anything else is an MMIO access, for the device model.
    fn require_ram(&mut self, gpa: Gpa) -> Result<(), EmuFault> {
        match self.d.guest_frame(gpa.gfn()) {
            Some((_, P2mType::Ram)) => Ok(()),
            _ => {
                self.mmio.get_or_insert(gpa);
                Err(EmuFault::GeneralProtection)
            }
        }
    }

    fn load(&mut self, va: u64, buf: &mut [u8], kind: AccessKind) -> Result<(), EmuFault> {
        let mut done = 0usize;
        for (at, n) in page_pieces(va, buf.len()) {
            let gpa = self.translate(at, kind)?;
            self.require_ram(gpa)?;
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
        // Every page is translated (its A/D set) and found to be RAM before any byte is
        // written: a store that reaches a page that is not RAM writes nothing here.
        let mut pieces: Vec<(Gpa, &[u8])> = Vec::new();
        let mut done = 0usize;
        for (at, n) in page_pieces(va, data.len()) {
            let gpa = self.translate(at, AccessKind::Write)?;
            let Some(bytes) = data.get(done..done + n) else {
                return Err(self.fail(EngineError::Internal("emulator buffer")));
            };
            pieces.push((gpa, bytes));
            done += n;
        }
        for &(gpa, _) in &pieces {
            self.require_ram(gpa)?;
        }
        if let Err(e) = self.d.unshadow_overwritten(&pieces) {
            return Err(self.fail(e));
        }
        if let Err(e) = self.d.write_guest_pieces(&pieces) {
            return Err(self.fail(e));
        }
        for &(gpa, bytes) in &pieces {
            self.written
                .push((gpa, bytes.len(), bytes.iter().all(|&b| b == 0)));
        }
        Ok(())
    }
    fn compare_exchange(
        &mut self,
        va: u64,
        current: &[u8],
        new: &[u8],
    ) -> Result<AtomicUpdate, EmuFault> {
        let len = new.len();
        let in_one_word = len <= 8 && (va % 8) as usize + len <= 8;
        let aligned_pair = len == 16 && va.is_multiple_of(16);
        if current.len() != len || !(in_one_word || aligned_pair) {
            return Ok(AtomicUpdate::Unsupported);
        }
        let gpa = self.translate(va, AccessKind::Write)?;
        self.require_ram(gpa)?;
        let update = match self.d.compare_exchange_guest_phys(gpa, current, new) {
            Ok(update) => update,
            Err(e) => return Err(self.fail(e)),
        };
        if update == AtomicUpdate::Written {
            self.written.push((gpa, len, new.iter().all(|&b| b == 0)));
        }
        Ok(update)
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
                rflags: next.rflags,
                error: None,
                mmio: None,
                written: Vec::new(),
            };
            let result = emulate_write(&mut next, &mut mem);
            let error = mem.error;
            let mmio = mem.mmio;
            let written = core::mem::take(&mut mem.written);
            match (error, result) {
                (Some(e), _) if e.is_fatal() => Err(e),
                // Nothing was written (the access stopped at the page that is not RAM),
                // and unshadowing would not help: the native retry reaches the same page.
                (None, Err(EmuError::Fault(_))) if let Some(gpa) = mmio => {
                    Ok(EmulateOutcome::Mmio { gpa })
                }
                (Some(_), _) | (None, Err(EmuError::Unhandled(_))) => {
                    let mut shadowed_again = false;
                    if let Some((mfn, P2mType::Ram)) = d.guest_frame(gpa.gfn()) {
                        d.unshadow(mfn)?;
                        d.rebuild_roots()?;
                        shadowed_again = d.store.is_page_table(mfn);
                    }
                    d.stats.emulation_failures += 1;
                    d.note_fault(v);
                    let this = Some((regs.rip, gpa));
                    let vcpu = d
                        .vcpus
                        .get_mut(v)
                        .ok_or(EngineError::BadArgument("no such vcpu"))?;
                    if shadowed_again && vcpu.unemulated == this {
                        return Err(EngineError::Unemulatable { rip: regs.rip });
                    }
                    vcpu.unemulated = if shadowed_again { this } else { None };
                    Ok(EmulateOutcome::Unshadowed)
                }
                (None, Err(EmuError::Fault(f))) => Ok(EmulateOutcome::Fault(f)),
                (None, Ok(done)) => {
                    if let Some(vcpu) = d.vcpus.get_mut(v) {
                        vcpu.unemulated = None;
                    }
                    *regs = next;
                    d.stats.emulated_writes += 1;
                    d.after_emulated_write(v, &written)?;
                    Ok(EmulateOutcome::Done(done))
                }
            }
        })
    }
}

/// What one emulated write did to one page table.
#[derive(Clone, Copy, Debug, Default)]
struct PageEffect {
    /// Every entry it touched is now not present.
    cleared: bool,
    /// It wrote the whole page with zeros.
    zeroed: bool,
    /// It left an entry that cannot be one (present, reserved bits set at every level the
    /// page is shadowed at).
    data: bool,
}

impl<H: MachineMemory> Domain<H> {
    /// The heuristics run after an emulated write by vcpu `v` of the `written` pieces: the
    /// fork/exit count and the teardown hints (see the module documentation).
    fn after_emulated_write(
        &mut self,
        v: usize,
        written: &[(Gpa, usize, bool)],
    ) -> Result<(), EngineError> {
        if self.remove.early.len() < self.vcpus.len() {
            self.remove.early.resize(self.vcpus.len(), None);
        }
        let hints = self.config.teardown;
        let mut unshadowed = false;
        // The one page table all pieces cleared entries of, if the write was a teardown
        // write of one table.
        let mut cleared_table: Option<Mfn> = None;
        let mut teardown_write = !written.is_empty();
        for &(gpa, len, zero) in written {
            let Some((mfn, P2mType::Ram)) = self.guest_frame(gpa.gfn()) else {
                teardown_write = false;
                continue;
            };
            if !self.store.is_page_table(mfn) {
                teardown_write = false;
                continue;
            }
            let effect = self.page_effect(v, mfn, gpa, len, zero)?;
            let in_use = self.is_top_in_use(mfn);
            if !in_use && hints.zeroed_page && effect.zeroed {
                self.stats.teardown_zeroed += 1;
                self.unshadow_hinted(mfn)?;
                unshadowed = true;
                teardown_write = false;
                continue;
            }
            if !in_use && hints.data_reuse && effect.data {
                self.stats.teardown_data += 1;
                self.unshadow_hinted(mfn)?;
                unshadowed = true;
                teardown_write = false;
                continue;
            }
            if !effect.cleared || cleared_table.is_some_and(|m| m != mfn) {
                teardown_write = false;
            }
            cleared_table = Some(mfn);
        }
        let threshold = self.config.early_unshadow_writes;
        let run = match (teardown_write && threshold > 0, cleared_table) {
            (true, Some(mfn)) => match self.remove.early.get(v).copied().flatten() {
                Some((m, n)) if m == mfn => Some((mfn, n.saturating_add(1))),
                _ => Some((mfn, 1)),
            },
            _ => None,
        };
        let run = match run {
            Some((mfn, n)) if n >= threshold => {
                if !self.is_top_in_use(mfn) {
                    self.stats.early_unshadows += 1;
                    self.unshadow_hinted(mfn)?;
                    unshadowed = true;
                }
                None
            }
            other => other,
        };
        if let Some(slot) = self.remove.early.get_mut(v) {
            *slot = run;
        }
        if unshadowed {
            self.rebuild_roots()?;
        }
        Ok(())
    }

    /// What the write of `len` bytes at `gpa` (in page table `mfn`; `zero`: every byte
    /// written was zero) left in the table.
    fn page_effect(
        &self,
        v: usize,
        mfn: Mfn,
        gpa: Gpa,
        len: usize,
        zero: bool,
    ) -> Result<PageEffect, EngineError> {
        let len = len as u64;
        let keys: Vec<ShadowKey> = self.store.of_frame(mfn).map(|(k, _)| k).collect();
        let vcpu_levels = self.vcpus.get(v).map(|c| c.ctl.levels());
        // Entries are read at the width of the page's own shadows (the writer's mode if it
        // has none of its own, e.g. a 32-bit and a 64-bit view of one page).
        let narrow = keys
            .first()
            .and_then(|k| k.kind.guest_levels())
            .or(vcpu_levels)
            .is_some_and(|l| l == PagingLevels::Two);
        let width: u64 = if narrow { 4 } else { 8 };
        let first = gpa.offset() & !(width - 1);
        let end = (gpa.offset() + len).div_ceil(width) * width;
        let mut effect = PageEffect {
            cleared: true,
            zeroed: zero && gpa.offset() == 0 && len == PAGE_SIZE,
            data: false,
        };
        let mut offset = first;
        while offset < end.min(PAGE_SIZE) {
            let entry = self
                .host
                .read_entry(Maddr::new(mfn.base().raw() + offset), width)?;
            if entry & bits::P != 0 {
                effect.cleared = false;
                if self.config.teardown.data_reuse
                    && !keys.is_empty()
                    && keys.iter().all(|k| self.reserved_in(k, entry) != 0)
                {
                    effect.data = true;
                }
            }
            offset += width;
        }
        Ok(effect)
    }

    /// The reserved bits of present guest entry `entry` in a table shadowed with `key`.
    fn reserved_in(&self, key: &ShadowKey, entry: u64) -> u64 {
        fn reserved<M: PagingMode>(
            entry: u64,
            level: u8,
            ctl: &ControlState,
            feat: &crate::paging::CpuFeatures,
        ) -> u64 {
            let leaf =
                level == 1 || (entry & bits::PS != 0 && M::superpage_level(level, ctl, feat));
            M::reserved_bits(entry, level, leaf, ctl, feat)
        }
        let Some(levels) = key.kind.guest_levels() else {
            return 0;
        };
        let ctl = flavor_ctl(levels, key.flavor);
        let feat = self.config.guest_features;
        let level = key.kind.level();
        match levels {
            PagingLevels::Two => reserved::<TwoLevel>(entry, level, &ctl, &feat),
            PagingLevels::Three => reserved::<ThreeLevel>(entry, level, &ctl, &feat),
            PagingLevels::Four => reserved::<FourLevel>(entry, level, &ctl, &feat),
            PagingLevels::Zero => 0,
        }
    }
}

/// Control state carrying just what a guest mode and a flavor say about entry formats.
fn flavor_ctl(levels: PagingLevels, flavor: Flavor) -> ControlState {
    let mut ctl = ControlState {
        cr0: cr::CR0_PE | cr::CR0_PG,
        ..ControlState::default()
    };
    if flavor.pse {
        ctl.cr4 |= cr::CR4_PSE;
    }
    if flavor.nxe {
        ctl.efer |= cr::EFER_NXE;
    }
    if matches!(levels, PagingLevels::Three | PagingLevels::Four) {
        ctl.cr4 |= cr::CR4_PAE;
    }
    if levels == PagingLevels::Four {
        ctl.efer |= cr::EFER_LMA | cr::EFER_LME;
    }
    ctl
}

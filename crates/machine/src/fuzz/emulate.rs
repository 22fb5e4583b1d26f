//! The `emulate` target: one instruction, from the input's bytes and registers (RFLAGS,
//! FS/GS bases, CPL, bitness), run twice:
//!
//! 1. by the write emulator alone over a flat memory in which some pages fault: an error
//!    leaves the registers as they were and writes nothing; a success performs at most one
//!    write, as its last memory access, and reports exactly that write;
//! 2. by the engine on a small guest (page tables at every level, a self-map, superpages,
//!    leaves on page tables and beyond RAM, on any of the nine pairs), either as the
//!    simulated CPU executes it (faulting into `Domain::emulate` when it writes a shadowed
//!    table) or through `Domain::emulate` directly with a guest-physical address the host
//!    names: a fault or an instruction the engine gives up leaves registers and guest memory
//!    as they were (A/D bits set by the walks aside), the auditor is clean, and accesses
//!    after it agree with the guest's own walk.

use shadow2::addr::{Gfn, Gpa, Gva, Maddr};
use shadow2::audit::audit;
use shadow2::domain::{DomainConfig, EmulateOutcome};
use shadow2::emulate::{
    AtomicUpdate, CodeMode, EmuFault, EmuMemory, Regs, emulate_write, page_pieces,
    serial_compare_exchange,
};
use shadow2::multi::Pair;
use shadow2::paging::PhysMem;
use shadow2::paging::{PagingLevels, Privilege, bits, bits::cr};

use crate::churn::{Guest, Rng, paging_control, table_levels};
use crate::sim::{GuestError, ShadowMachine};

const RAM_FRAMES: u64 = 64;
const MACHINE_FRAMES: u64 = 1 << 14;
const VCPUS: usize = 2;
const POOL_PAGES: usize = 256;
/// RFLAGS bits an instruction may see: the status flags, DF, AC and RF.
const RFLAGS_CHOSEN: u64 = 0x8d5 | 1 << 10 | 1 << 16 | cr::RFLAGS_AC;

/// Runs the input through both checks; panics on a finding.
pub fn check(data: &[u8]) {
    let mut src = Rng::from_bytes(data);
    let insn = instruction(&mut src);
    let mut flat_regs = Regs::new(code_mode(src.below(3)));
    random_registers(&mut src, &mut flat_regs, &[0x1000, 0x7ff8, 0xffff_f000]);
    flat_regs.rip = 0x4000 + src.below(4096);
    check_flat(&insn, flat_regs, src.below(8));
    check_engine(&mut src, &insn);
}

/// The instruction's bytes: a store form a kernel uses, random bytes, or a store form
/// behind random prefixes.
fn instruction(src: &mut Rng) -> Vec<u8> {
    let levels = [PagingLevels::Two, PagingLevels::Three, PagingLevels::Four];
    let forms = crate::churn::pte_store_forms(levels[src.below(3) as usize]);
    let form = forms
        .get(src.below(forms.len() as u64) as usize)
        .copied()
        .unwrap_or(&[]);
    let mut out = Vec::new();
    match src.below(4) {
        0 => out.extend_from_slice(form),
        1 => {
            for _ in 0..src.below(4) {
                let prefixes = [0x66, 0x67, 0xf0, 0xf2, 0xf3, 0x2e, 0x64, 0x65, 0x48, 0x4c];
                out.push(prefixes[src.below(prefixes.len() as u64) as usize]);
            }
            out.extend_from_slice(form);
        }
        _ => {
            for _ in 0..1 + src.below(15) {
                out.push(src.below(256) as u8);
            }
        }
    }
    out
}

fn code_mode(choice: u64) -> CodeMode {
    match choice {
        0 => CodeMode::Bits16,
        1 => CodeMode::Bits32,
        _ => CodeMode::Bits64,
    }
}

/// Fills the general registers, RFLAGS, the FS/GS bases and the CPL: each register is an
/// address near one of `near`, a small number, or 64 random bits.
fn random_registers(src: &mut Rng, regs: &mut Regs, near: &[u64]) {
    let value = |src: &mut Rng| match src.below(4) {
        0 => {
            let base = near
                .get(src.below(near.len() as u64) as usize)
                .copied()
                .unwrap_or(0);
            let page = base & !0xfff;
            match src.below(3) {
                0 => base,
                1 => page + src.below(512) * 8,
                _ => page + 0xff0 + src.below(16),
            }
        }
        1 => src.below(64),
        2 => src.next_u64(),
        _ => 0,
    };
    for r in &mut regs.gpr {
        *r = value(src);
    }
    if regs.mode != CodeMode::Bits64 {
        for r in &mut regs.gpr {
            *r &= 0xffff_ffff;
        }
    }
    regs.rflags = 0x2 | (src.next_u64() & RFLAGS_CHOSEN);
    if src.chance(10) {
        regs.fs_base = value(src);
    }
    if src.chance(10) {
        regs.gs_base = value(src);
    }
    regs.cpl = if src.chance(25) { 3 } else { 0 };
}

/// A flat linear memory for the emulator alone: the instruction at its RIP, a pattern
/// everywhere else, and pages that fault (one in eight, picked by `salt`).
struct FlatMemory<'a> {
    code_va: u64,
    code: &'a [u8],
    salt: u64,
    /// Every write performed: (address, bytes).
    writes: Vec<(u64, usize)>,
    /// A memory access came after a write.
    access_after_write: bool,
}

impl FlatMemory<'_> {
    fn faults(&self, va: u64) -> bool {
        (va >> 12).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 61 == self.salt
    }

    fn check_pages(&mut self, va: u64, len: usize, code: u32) -> Result<(), EmuFault> {
        if !self.writes.is_empty() {
            self.access_after_write = true;
        }
        for (at, _) in page_pieces(va, len) {
            if self.faults(at) {
                return Err(EmuFault::PageFault { va: at, code });
            }
        }
        Ok(())
    }

    fn fill(&self, va: u64, buf: &mut [u8]) {
        for (i, b) in buf.iter_mut().enumerate() {
            let at = va.wrapping_add(i as u64);
            let in_code = at.wrapping_sub(self.code_va);
            *b = match usize::try_from(in_code).ok().and_then(|i| self.code.get(i)) {
                Some(&c) => c,
                None => (at.wrapping_mul(31) >> 3) as u8,
            };
        }
    }
}

impl EmuMemory for FlatMemory<'_> {
    fn fetch(&mut self, va: u64, buf: &mut [u8]) -> Result<(), EmuFault> {
        self.check_pages(va, buf.len(), 0x10)?;
        self.fill(va, buf);
        Ok(())
    }
    fn read(&mut self, va: u64, buf: &mut [u8]) -> Result<(), EmuFault> {
        self.check_pages(va, buf.len(), 0)?;
        self.fill(va, buf);
        Ok(())
    }
    fn write(&mut self, va: u64, data: &[u8]) -> Result<(), EmuFault> {
        self.check_pages(va, data.len(), 2)?;
        self.writes.push((va, data.len()));
        Ok(())
    }
    // Single-threaded: nothing writes between the read and the write.
    fn compare_exchange(
        &mut self,
        va: u64,
        current: &[u8],
        new: &[u8],
    ) -> Result<AtomicUpdate, EmuFault> {
        serial_compare_exchange(self, va, current, new)
    }
}

/// The emulator's contract over a memory that cannot fail in any other way.
fn check_flat(insn: &[u8], regs: Regs, salt: u64) {
    let mut mem = FlatMemory {
        code_va: regs.rip,
        code: insn,
        salt,
        writes: Vec::new(),
        access_after_write: false,
    };
    let mut after = regs;
    match emulate_write(&mut after, &mut mem) {
        Err(e) => {
            assert_eq!(after, regs, "{e}: registers changed");
            assert!(mem.writes.is_empty(), "{e}: wrote {:?}", mem.writes);
        }
        Ok(done) => {
            assert!(mem.writes.len() <= 1, "several writes: {:?}", mem.writes);
            assert!(!mem.access_after_write, "a memory access after the write");
            let reported: Vec<(u64, usize)> = done.writes.iter().map(|w| (w.va, w.len)).collect();
            assert_eq!(reported, mem.writes, "reported writes differ");
            assert_eq!(done.complete, after.rip != regs.rip, "{done:?}");
        }
    }
}

/// A guest to run one instruction on.
struct Setup {
    m: ShadowMachine,
    guest: Guest,
    /// Page-table entries are this wide.
    entry_bytes: u64,
}

fn build(src: &mut Rng) -> Option<Setup> {
    let pair = *Pair::ALL.get(src.below(Pair::ALL.len() as u64) as usize)?;
    let shadow = pair.shadow();
    let mut config = DomainConfig::hvm(shadow, VCPUS, POOL_PAGES);
    config.external = !(shadow == PagingLevels::Four && src.chance(50));
    if src.chance(30) {
        config.pool_pages = config.min_pool_pages();
    }
    let mut m = ShadowMachine::new(MACHINE_FRAMES, config).ok()?;
    m.add_ram(Gfn::new(0), RAM_FRAMES).ok()?;
    let levels = table_levels(pair);
    let mut guest = Guest::new(levels, RAM_FRAMES, true);
    guest.install_code(&mut m).ok()?;
    let p = guest.new_process(&mut m, src)?;
    if src.chance(70) {
        guest.install_self_map(&mut m, src, &p);
    }
    for _ in 0..src.below(8) {
        let superpage = src.chance(10);
        let va = guest.random_va(src) & !0xfff;
        // Runs of neighbouring pages: writes that straddle two pages of different kinds.
        for page in 0..1 + src.below(2) {
            let va = va + page * 4096;
            let level = if superpage { 2 } else { 1 };
            let (slot, _) = guest.ensure_path(&mut m, src, &p, va, level)?;
            let target = guest.random_target(src);
            let flags = guest.random_leaf_flags(src, superpage);
            let target = if superpage { target & !0x3ff } else { target };
            guest
                .write_entry_phys(&mut m, slot, target << 12 | flags)
                .ok()?;
            guest.mapped.push(va);
        }
    }
    if src.chance(10) {
        // A page table mapped writable, and right after it a frame beyond RAM: a write
        // across the two must be all or nothing.
        let va = guest.random_va(src) & !0xfff;
        let tables = guest.page_tables.len() as u64;
        let table = guest
            .page_tables
            .iter()
            .nth(src.below(tables) as usize)
            .copied()?;
        let beyond = RAM_FRAMES + src.below(4);
        let flags = bits::P | bits::RW | bits::US | bits::A | bits::D;
        for (page, frame) in [table.raw(), beyond].into_iter().enumerate() {
            let va = va + 4096 * page as u64;
            let (slot, _) = guest.ensure_path(&mut m, src, &p, va, 1)?;
            guest
                .write_entry_phys(&mut m, slot, frame << 12 | flags)
                .ok()?;
            guest.mapped.insert(0, va);
        }
    }
    let main = paging_control(pair.guest(), p.cr3, src);
    let second = paging_control(levels, p.cr3, src);
    m.set_paging(0, main).ok()?;
    m.set_paging(1, second).ok()?;
    let entry_bytes = guest.shape.entry_bytes;
    Some(Setup {
        m,
        guest,
        entry_bytes,
    })
}

/// Guest RAM as little-endian words, page by page (read from the host's frames).
fn snapshot(m: &ShadowMachine) -> Vec<Vec<u64>> {
    (0..RAM_FRAMES)
        .map(|g| {
            let Some(mfn) = m.ram_frame(Gfn::new(g)) else {
                return Vec::new();
            };
            (0..512u64)
                .map(|i| {
                    let at = Maddr::new(mfn.base().raw() + 8 * i);
                    m.domain().host().read_u64(at).unwrap_or(0)
                })
                .collect()
        })
        .collect()
}

/// Panics if guest memory differs from `before` other than by A/D bits set in the entries
/// of page tables.
fn assert_unchanged(s: &Setup, before: &[Vec<u64>], what: &str) {
    let after = snapshot(&s.m);
    let narrow = s.entry_bytes == 4;
    for (g, (old, new)) in before.iter().zip(&after).enumerate() {
        if old == new {
            continue;
        }
        let table = s.guest.page_tables.contains(&Gfn::new(g as u64));
        for (i, (a, b)) in old.iter().zip(new).enumerate() {
            // A/D sit in bits 5 and 6 of each entry: both halves of a word of 4-byte ones.
            let ad = bits::A | bits::D;
            let allowed = match (table, narrow) {
                (false, _) => 0,
                (true, false) => ad,
                (true, true) => ad | ad << 32,
            };
            assert!(
                (a ^ b) & !allowed == 0,
                "{what}: gfn {g:#x} offset {:#x} changed from {a:#x} to {b:#x}",
                i * 8
            );
        }
    }
}

fn check_engine(src: &mut Rng, insn: &[u8]) {
    let Some(mut s) = build(src) else {
        return;
    };
    let v = src.below(VCPUS as u64) as usize;
    let ctl = s.m.guest_control(v);
    let paging = ctl.levels() != PagingLevels::Zero;
    let code_base = if paging { s.guest.code_va() } else { 0 };
    let offset = if src.chance(20) {
        4096 - src.below(insn.len() as u64 + 1)
    } else {
        16 * src.below(255)
    };
    if s.m.write_phys(Gpa::new(offset), insn).is_err() {
        return;
    }
    let long = ctl.efer & cr::EFER_LMA != 0;
    // 64-bit code only in long mode; 16- and 32-bit code in any mode (compatibility mode).
    let mode = match src.below(10) {
        0 => CodeMode::Bits16,
        1 => CodeMode::Bits32,
        _ if long => CodeMode::Bits64,
        _ => CodeMode::Bits32,
    };
    let mut near: Vec<u64> = vec![code_base];
    for &va in s.guest.mapped.iter().take(8) {
        near.push(va);
        if let Some(pte) = s.guest.self_map_va(va, 1) {
            near.push(pte.raw());
        }
    }
    let mut regs = Regs::new(mode);
    random_registers(src, &mut regs, &near);
    regs.rip = (code_base + offset) & mode.linear_mask();
    let before_regs = regs;
    let before = snapshot(&s.m);
    if src.chance(70) {
        let result = s.m.exec(v, &mut regs);
        match result {
            Ok(()) => {}
            Err(GuestError::Engine(e)) => panic!("the engine failed executing {insn:02x?}: {e}"),
            Err(e) if regs == before_regs => {
                assert_unchanged(&s, &before, &format!("{e:?} of {insn:02x?}"));
            }
            // A REP instruction that faulted after some chunks: those stay done.
            Err(_) => {}
        }
    } else {
        let gpa = Gpa::new(src.below(RAM_FRAMES + 4) << 12 | src.below(4096));
        match s.m.domain_mut().emulate(v, &mut regs, gpa) {
            Ok((outcome, flush)) => {
                s.m.settle(flush);
                if !matches!(outcome, EmulateOutcome::Done(_)) {
                    assert_eq!(regs, before_regs, "{outcome:?}: registers changed");
                    assert_unchanged(&s, &before, &format!("{outcome:?} of {insn:02x?}"));
                }
            }
            Err(e) if e.is_fatal() => panic!("the engine failed emulating {insn:02x?}: {e}"),
            Err(e) => {
                assert_eq!(regs, before_regs, "{e}: registers changed");
                assert_unchanged(&s, &before, &format!("{e} of {insn:02x?}"));
            }
        }
    }
    let report = audit(s.m.domain());
    assert!(
        report.is_clean(),
        "audit after {insn:02x?}: {:?}",
        report.violations.first()
    );
    // The guest's own discipline after editing its tables, then every address it uses.
    s.m.flush_all_tlbs();
    for &va in &near {
        // Outside long mode a linear address has 32 bits.
        let va = if long { va } else { va & 0xffff_ffff };
        let mut buf = [0u8; 8];
        for privilege in [Privilege::Supervisor, Privilege::User] {
            if let Err(GuestError::Engine(e)) = s.m.read(v, Gva::new(va & !7), privilege, &mut buf)
            {
                panic!("the engine failed reading {va:#x} after {insn:02x?}: {e}");
            }
        }
    }
    let (mismatches, list) = s.m.mismatches();
    assert_eq!(mismatches, 0, "after {insn:02x?}: {:?}", list.first());
}

//! Page-table access: where the kernel reaches a table, how it reads and writes entries
//! (with real instructions), and the walk that finds or builds a leaf table.

use shadow2::emulate::{CodeMode, Regs};
use shadow2::paging::bits::{self, cr};

use super::arch::{CODE_GFN, PAE_SELF_MAP_PDES, PhysMap};
use super::code::Insn;
use super::{KResult, Kernel, Pid, SLOT_DST, SLOT_SRC, SLOT_TABLE, kernel_err};
use crate::RunError;
use crate::ops::GuestOps;

/// A change to one entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum EntryOp {
    /// Fill a not-present entry.
    Install(u64),
    /// Replace a present entry with another, by compare-and-exchange.
    Replace(u64),
    /// Clear it, returning what it held (`ptep_get_and_clear`).
    Take,
    /// Clear R/W (write-protect for copy-on-write).
    ClearRw,
    /// Set bits.
    Or(u64),
}

/// How many times a compare-and-exchange is retried when the hardware changed A/D bits
/// between the read and the write.
const CAS_TRIES: usize = 8;

const ZF: u64 = 1 << 6;

impl<B: GuestOps> Kernel<B> {
    pub(crate) fn cpu_paging(&self, v: usize) -> bool {
        self.cpus
            .get(v)
            .is_some_and(|c| c.ctl.cr0 & cr::CR0_PG != 0)
    }

    fn code_mode(&self, v: usize) -> CodeMode {
        let long = self
            .cpus
            .get(v)
            .is_some_and(|c| c.ctl.efer & cr::EFER_LMA != 0);
        if long {
            CodeMode::Bits64
        } else {
            CodeMode::Bits32
        }
    }

    fn insn_regs(&self, v: usize, insn: Insn) -> Regs {
        let mode = self.code_mode(v);
        let long = mode == CodeMode::Bits64;
        let mut regs = Regs::new(mode);
        regs.rip = if self.cpu_paging(v) {
            self.arch.code_va
        } else {
            CODE_GFN << 12
        } + insn.offset(long);
        regs.cpl = 0;
        regs
    }

    fn run_insn(&mut self, v: usize, regs: &mut Regs, what: &str) -> KResult<()> {
        self.ops.exec(v, regs).map_err(|e| kernel_err(e, what))
    }

    /// The linear address at which the kernel on `v` reaches guest frame `gfn`, through
    /// window `slot` where the kernel has no linear map.
    pub(crate) fn phys_va(&mut self, v: usize, gfn: u64, slot: usize) -> KResult<u64> {
        if !self.cpu_paging(v) {
            return Ok(gfn << 12);
        }
        match self.arch.phys {
            PhysMap::Identity => Ok(gfn << 12),
            PhysMap::Linear(base) => Ok(base + (gfn << 12)),
            PhysMap::Window { base } => {
                let wva = base + ((v * super::WINDOW_SLOTS + slot) as u64) * 4096;
                let cached = self.cpus.get(v).and_then(|c| c.window.get(slot).copied());
                if cached == Some(Some(gfn)) {
                    return Ok(wva);
                }
                let self_map = self.arch.self_map.unwrap_or(super::arch::PAE_SELF_MAP);
                let pte_va = self_map + (wva >> 12) * 8;
                let pte = (gfn << 12) | bits::P | bits::RW | bits::A | bits::D | bits::NX;
                let old = self.read_entry(v, pte_va)?;
                let op = if old & bits::P == 0 {
                    EntryOp::Install(pte)
                } else {
                    EntryOp::Replace(pte)
                };
                self.set_entry(v, pte_va, op)?;
                if old & bits::P != 0 {
                    self.ops
                        .invlpg(v, wva)
                        .map_err(|e| kernel_err(e, "invalidated a window"))?;
                }
                if let Some(c) = self.cpus.get_mut(v)
                    && let Some(w) = c.window.get_mut(slot)
                {
                    *w = Some(gfn);
                }
                Ok(wva)
            }
        }
    }

    /// Where the kernel reaches the level-`level` table `gfn` of `pid` that covers `va`:
    /// through the self-map when the kernel has one (attaching to `pid` first), otherwise
    /// through its map of physical memory.
    pub(crate) fn table_va(
        &mut self,
        v: usize,
        pid: Pid,
        gfn: u64,
        level: u8,
        va: u64,
    ) -> KResult<u64> {
        if let Some(base) = self.arch.self_map
            && level <= 2
            && self.cpu_paging(v)
        {
            self.switch_to(v, pid)?;
            return Ok(if level == 1 {
                base + ((va >> 21) << 12)
            } else {
                PAE_SELF_MAP_PDES + (self.arch.index(va, 3) << 12)
            });
        }
        self.phys_va(v, gfn, SLOT_TABLE)
    }

    /// Reads one entry at linear address `va` (a kernel load).
    pub(crate) fn read_entry(&mut self, v: usize, va: u64) -> KResult<u64> {
        let mut buf = [0u8; 8];
        let n = self.arch.entry_bytes() as usize;
        self.ops
            .read(v, va, 0, &mut buf[..n])
            .map_err(|e| kernel_err(e, "read a page-table entry"))?;
        Ok(u64::from_le_bytes(buf))
    }

    /// Reads a whole table (a kernel load of one page).
    pub(crate) fn read_table(&mut self, v: usize, va: u64) -> KResult<Vec<u64>> {
        let mut page = vec![0u8; 4096];
        self.ops
            .read(v, va, 0, &mut page)
            .map_err(|e| kernel_err(e, "read a page table"))?;
        let eb = self.arch.entry_bytes() as usize;
        Ok(match eb {
            8 => page
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
                .collect(),
            _ => page
                .chunks_exact(4)
                .map(|c| u64::from(u32::from_le_bytes(c.try_into().unwrap_or_default())))
                .collect(),
        })
    }

    /// Changes the entry at linear address `va` with a real instruction; returns the value
    /// it held before.
    pub(crate) fn set_entry(&mut self, v: usize, va: u64, op: EntryOp) -> KResult<u64> {
        // PAE tables, and 4-level tables built with paging off, are written from 32-bit code.
        let wide_in_32bit = self.arch.entry_bytes() == 8 && self.code_mode(v) != CodeMode::Bits64;
        match op {
            EntryOp::ClearRw => {
                let mut regs = self.insn_regs(v, Insn::LockBtr);
                regs.gpr[Regs::RDI] = va;
                regs.gpr[Regs::RAX] = 1; // R/W
                self.run_insn(v, &mut regs, "write-protected an entry")?;
                Ok(0)
            }
            EntryOp::Or(mask) if mask >> 32 == 0 || !wide_in_32bit => {
                let mut regs = self.insn_regs(v, Insn::LockOr);
                regs.gpr[Regs::RDI] = va;
                regs.gpr[Regs::RAX] = mask;
                self.run_insn(v, &mut regs, "set bits in an entry")?;
                Ok(0)
            }
            _ if wide_in_32bit => self.cmpxchg8b(v, va, op),
            EntryOp::Install(new) => {
                let insn = match self.rng.below(3) {
                    0 => Insn::Mov,
                    1 => Insn::Xchg,
                    _ => Insn::Cmpxchg,
                };
                if insn == Insn::Cmpxchg {
                    return self.cmpxchg(v, va, 0, new);
                }
                let mut regs = self.insn_regs(v, insn);
                regs.gpr[Regs::RDI] = va;
                regs.gpr[Regs::RAX] = new;
                self.run_insn(v, &mut regs, "installed an entry")?;
                Ok(0)
            }
            EntryOp::Take => {
                let mut regs = self.insn_regs(v, Insn::Xchg);
                regs.gpr[Regs::RDI] = va;
                regs.gpr[Regs::RAX] = 0;
                self.run_insn(v, &mut regs, "cleared an entry")?;
                Ok(regs.gpr[Regs::RAX] & self.entry_mask())
            }
            EntryOp::Replace(new) | EntryOp::Or(new) => {
                let old = self.read_entry(v, va)?;
                let new = if matches!(op, EntryOp::Or(_)) {
                    old | new
                } else {
                    new
                };
                self.cmpxchg(v, va, old, new)
            }
        }
    }

    fn entry_mask(&self) -> u64 {
        if self.arch.entry_bytes() == 4 {
            0xffff_ffff
        } else {
            u64::MAX
        }
    }

    fn cmpxchg(&mut self, v: usize, va: u64, mut old: u64, new: u64) -> KResult<u64> {
        for _ in 0..CAS_TRIES {
            let mut regs = self.insn_regs(v, Insn::Cmpxchg);
            regs.gpr[Regs::RDI] = va;
            regs.gpr[Regs::RAX] = old;
            regs.gpr[Regs::RDX] = new;
            self.run_insn(v, &mut regs, "exchanged an entry")?;
            if regs.rflags & ZF != 0 {
                return Ok(old);
            }
            // The hardware set A or D meanwhile: CMPXCHG loaded what memory holds.
            old = regs.gpr[Regs::RAX] & self.entry_mask();
        }
        Err(RunError::GuestPanic(format!(
            "compare-and-exchange of the entry at {va:#x} kept failing"
        )))
    }

    fn cmpxchg8b(&mut self, v: usize, va: u64, op: EntryOp) -> KResult<u64> {
        let mut old = match op {
            EntryOp::Install(_) => 0,
            _ => self.read_entry(v, va)?,
        };
        for _ in 0..CAS_TRIES {
            let new = match op {
                EntryOp::Install(n) | EntryOp::Replace(n) => n,
                EntryOp::Take | EntryOp::ClearRw => 0,
                EntryOp::Or(m) => old | m,
            };
            let mut regs = self.insn_regs(v, Insn::Cmpxchg8b);
            regs.gpr[Regs::RDI] = va;
            regs.gpr[Regs::RAX] = old & 0xffff_ffff;
            regs.gpr[Regs::RDX] = old >> 32;
            regs.gpr[Regs::RBX] = new & 0xffff_ffff;
            regs.gpr[Regs::RCX] = new >> 32;
            self.run_insn(v, &mut regs, "exchanged an entry")?;
            if regs.rflags & ZF != 0 {
                return Ok(old);
            }
            old = (regs.gpr[Regs::RDX] << 32) | (regs.gpr[Regs::RAX] & 0xffff_ffff);
        }
        Err(RunError::GuestPanic(format!(
            "CMPXCHG8B of the entry at {va:#x} kept failing"
        )))
    }

    /// Zeroes a frame with REP STOS.
    pub(crate) fn clear_frame(&mut self, v: usize, gfn: u64) -> KResult<()> {
        let va = self.phys_va(v, gfn, SLOT_DST)?;
        let mut regs = self.insn_regs(v, Insn::RepStos);
        let width = if regs.mode == CodeMode::Bits64 { 8 } else { 4 };
        regs.gpr[Regs::RDI] = va;
        regs.gpr[Regs::RCX] = 4096 / width;
        regs.gpr[Regs::RAX] = 0;
        self.run_insn(v, &mut regs, "cleared a page")
    }

    /// Copies a frame with REP MOVS.
    pub(crate) fn copy_frame(&mut self, v: usize, from: u64, to: u64) -> KResult<()> {
        let src = self.phys_va(v, from, SLOT_SRC)?;
        let dst = self.phys_va(v, to, SLOT_DST)?;
        let mut regs = self.insn_regs(v, Insn::RepMovs);
        let width = if regs.mode == CodeMode::Bits64 { 8 } else { 4 };
        regs.gpr[Regs::RSI] = src;
        regs.gpr[Regs::RDI] = dst;
        regs.gpr[Regs::RCX] = 4096 / width;
        self.run_insn(v, &mut regs, "copied a page")
    }

    /// A zeroed frame.
    pub(crate) fn alloc_zeroed(&mut self, v: usize) -> KResult<u64> {
        let gfn = self
            .frames
            .alloc()
            .ok_or_else(|| RunError::GuestPanic("out of memory".into()))?;
        self.clear_frame(v, gfn)?;
        Ok(gfn)
    }

    /// The leaf table of `pid` covering `va` (building the path when `alloc`): its frame,
    /// or `None` when a level is missing and `alloc` is false.
    pub(crate) fn leaf_table(
        &mut self,
        v: usize,
        pid: Pid,
        va: u64,
        alloc: bool,
    ) -> KResult<Option<u64>> {
        let p = self.proc_ref(pid)?;
        let (mut gfn, mut level) = if self.arch.levels == 3 {
            let i = self.arch.index(va, 3) as usize;
            (p.pds.get(i).copied().unwrap_or(0), 2)
        } else {
            (p.top, self.arch.levels)
        };
        while level > 1 {
            let eb = self.arch.entry_bytes();
            let idx = self.arch.index(va, level);
            let tva = self.table_va(v, pid, gfn, level, va)?;
            let e = self.read_entry(v, tva + idx * eb)?;
            if e & bits::P != 0 {
                gfn = self.arch.entry_gfn(e);
            } else {
                if !alloc {
                    return Ok(None);
                }
                // Zeroing goes through its own window slot: `tva` stays valid.
                let new = self.alloc_zeroed(v)?;
                self.set_entry(
                    v,
                    tva + idx * eb,
                    EntryOp::Install(self.arch.user_table_entry(new)),
                )?;
                gfn = new;
            }
            level -= 1;
        }
        Ok(Some(gfn))
    }

    /// The linear address of `pid`'s leaf entry for `va` in leaf table `table`.
    pub(crate) fn leaf_entry_va(
        &mut self,
        v: usize,
        pid: Pid,
        table: u64,
        va: u64,
    ) -> KResult<u64> {
        let tva = self.table_va(v, pid, table, 1, va)?;
        Ok(tva + self.arch.index(va, 1) * self.arch.entry_bytes())
    }
}

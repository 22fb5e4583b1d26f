//! Processes: address spaces created, forked with copy-on-write, exec'd, mapped and
//! unmapped, torn down at exit.

use std::collections::BTreeMap;

use shadow2::paging::bits;

use super::pt::EntryOp;
use super::{FILE_PAGES, KResult, Kernel, Process, SLOT_TABLE, Vma, kernel_err};
use crate::RunError;
use crate::ops::GuestOps;

/// A process id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pid(pub u32);

/// Pages of a new process's heap and stack.
const HEAP_PAGES: u64 = 32;
const STACK_PAGES: u64 = 8;
/// Above this many pages changed at once the kernel reloads CR3 instead of INVLPG each.
const FLUSH_ALL_ABOVE: usize = 32;

impl<B: GuestOps> Kernel<B> {
    /// A new address space sharing the kernel's half: (top, CR3, PAE directories, PDPT
    /// slot).
    fn new_address_space(&mut self, v: usize) -> KResult<(u64, u64, [u64; 4], Option<usize>)> {
        if self.arch.levels == 3 {
            return self.new_pae_space(v);
        }
        let top = self.alloc_zeroed(v)?;
        let eb = self.arch.entry_bytes();
        let from = self.arch.kernel_top_first() * eb;
        let len = (4096 - from) as usize;
        let mut half = vec![0u8; len];
        let src = self.phys_va(v, self.kernel_top, SLOT_TABLE)?;
        self.ops
            .read(v, src + from, 0, &mut half)
            .map_err(|e| kernel_err(e, "read the kernel's top-level table"))?;
        let dst = self.phys_va(v, top, SLOT_TABLE)?;
        self.ops
            .write(v, dst + from, 0, &half)
            .map_err(|e| kernel_err(e, "copied the kernel's top-level entries"))?;
        Ok((top, top << 12, [0; 4], None))
    }

    fn new_pae_space(&mut self, v: usize) -> KResult<(u64, u64, [u64; 4], Option<usize>)> {
        let (pool, slot) = match self
            .pdpt_pool
            .iter()
            .find_map(|(pool, used)| used.iter().position(|u| !u).map(|s| (*pool, s)))
        {
            Some(found) => found,
            None => {
                let pool = self.alloc_zeroed(v)?;
                let mut used = vec![false; 128];
                used[0] = true; // keep every PDPT off the page start
                self.pdpt_pool.push((pool, used));
                (pool, 1)
            }
        };
        if let Some((_, used)) = self.pdpt_pool.iter_mut().find(|(p, _)| *p == pool)
            && let Some(u) = used.get_mut(slot)
        {
            *u = true;
        }
        let mut pds = [0u64; 4];
        for (i, pd) in pds.iter_mut().enumerate() {
            *pd = if i == 2 {
                self.kernel_pd
            } else {
                self.alloc_zeroed(v)?
            };
        }
        for (i, &pd) in pds.iter().enumerate() {
            let at = self.phys_va(v, pds[3], SLOT_TABLE)?;
            self.set_entry(
                v,
                at + 8 * i as u64,
                EntryOp::Install(self.self_map_entry(pd)),
            )?;
        }
        for (i, &pd) in pds.iter().enumerate() {
            let at = self.phys_va(v, pool, SLOT_TABLE)?;
            let entry = at + 32 * slot as u64 + 8 * i as u64;
            self.set_entry(v, entry, EntryOp::Replace((pd << 12) | bits::P))?;
        }
        Ok((pool, (pool << 12) + 32 * slot as u64, pds, Some(slot)))
    }

    fn insert_process(&mut self, p: Process) -> Pid {
        let pid = Pid(self.next_pid);
        self.next_pid += 1;
        self.procs.insert(pid, p);
        pid
    }

    fn standard_vmas(&self) -> Vec<Vma> {
        let a = &self.arch;
        vec![
            Vma {
                start: a.user_text,
                end: a.user_text + FILE_PAGES * 4096,
                writable: false,
                exec: true,
                file: Some(0),
            },
            Vma {
                start: a.user_text + 0x20_0000,
                end: a.user_text + 0x20_0000 + HEAP_PAGES * 4096,
                writable: true,
                exec: false,
                file: None,
            },
            Vma {
                start: a.user_stack - (STACK_PAGES - 1) * 4096,
                end: a.user_stack + 4096,
                writable: true,
                exec: false,
                file: None,
            },
        ]
    }

    /// Starts `init` on vcpu 0.
    pub(super) fn spawn_init(&mut self) -> KResult<Pid> {
        let (top, cr3, pds, pdpt_slot) = self.new_address_space(0)?;
        let pid = self.insert_process(Process {
            cr3,
            top,
            pds,
            pdpt_slot,
            vmas: self.standard_vmas(),
            mem: BTreeMap::new(),
            loaded_on: 0,
        });
        self.switch_to(0, pid)?;
        Ok(pid)
    }

    /// The heap mapping of a process (the second of its standard mappings).
    pub fn heap(&self, pid: Pid) -> Option<Vma> {
        self.procs.get(&pid)?.vmas.get(1).copied()
    }

    /// The text mapping of a process.
    pub fn text(&self, pid: Pid) -> Option<Vma> {
        self.procs.get(&pid)?.vmas.first().copied()
    }

    /// Maps `pages` of fresh anonymous memory (no tables touched until first use).
    pub fn mmap(&mut self, pid: Pid, pages: u64) -> KResult<Vma> {
        let base = self.arch.user_mmap;
        let p = self.proc_mut(pid)?;
        let start = p
            .vmas
            .iter()
            .filter(|m| m.start >= base && m.end <= base + (1 << 30))
            .map(|m| m.end)
            .max()
            .unwrap_or(base);
        // Leave a guard page, and wrap within the area rather than run off its end.
        let start = if start + (pages + 1) * 4096 > base + (1 << 30) {
            base
        } else {
            start + 4096
        };
        let vma = Vma {
            start,
            end: start + pages * 4096,
            writable: true,
            exec: false,
            file: None,
        };
        if p.vmas
            .iter()
            .any(|m| m.start < vma.end && vma.start < m.end)
        {
            return Err(RunError::GuestPanic("mmap area exhausted".into()));
        }
        p.vmas.push(vma);
        Ok(vma)
    }

    /// Unmaps a mapping: clears its entries, frees its pages, shoots down the TLBs.
    pub fn munmap(&mut self, v: usize, pid: Pid, vma: Vma) -> KResult<()> {
        let cleared = self.unmap_range(v, pid, vma.start, vma.end)?;
        self.flush_pages(pid, &cleared)?;
        let p = self.proc_mut(pid)?;
        p.vmas.retain(|m| *m != vma);
        p.mem.retain(|va, _| !vma.contains(*va));
        Ok(())
    }

    /// Invalidates `pages` of `pid` on every vcpu that has it loaded.
    fn flush_pages(&mut self, pid: Pid, pages: &[u64]) -> KResult<()> {
        if pages.len() > FLUSH_ALL_ABOVE {
            let p = self.proc_ref(pid)?;
            let (mask, cr3) = (p.loaded_on, p.cr3);
            for v in 0..self.cpus.len() {
                if mask & (1 << v) != 0 {
                    self.ops
                        .set_cr3(v, cr3)
                        .map_err(|e| kernel_err(e, "flushed a TLB"))?;
                }
            }
            return Ok(());
        }
        for &va in pages {
            self.shootdown(pid, va)?;
        }
        Ok(())
    }

    /// Clears every present leaf entry of `pid` in `start..end`, dropping the frames'
    /// references; returns the pages cleared.
    fn unmap_range(&mut self, v: usize, pid: Pid, start: u64, end: u64) -> KResult<Vec<u64>> {
        let mut cleared = Vec::new();
        for (at, stop) in self.leaf_regions(start, end) {
            for (va, entry, _) in self.present_leaves(v, pid, at, stop)? {
                let old = self.set_entry(v, entry, EntryOp::Take)?;
                if old & bits::P != 0 {
                    self.frames.put(self.arch.entry_gfn(old));
                    cleared.push(va);
                }
            }
        }
        Ok(cleared)
    }

    /// `start..end` cut where one leaf table's coverage ends and the next begins.
    fn leaf_regions(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let region = 1u64 << self.arch.shift(2);
        let mut out = Vec::new();
        let mut at = start;
        while at < end {
            let stop = ((at / region + 1) * region).min(end);
            out.push((at, stop));
            at = stop;
        }
        out
    }

    /// The present leaf entries of `pid` for the pages `at..stop` (inside one leaf
    /// table's coverage), read in one load of the table: (page, the entry's linear
    /// address, its value).
    fn present_leaves(
        &mut self,
        v: usize,
        pid: Pid,
        at: u64,
        stop: u64,
    ) -> KResult<Vec<(u64, u64, u64)>> {
        let Some(table) = self.leaf_table(v, pid, at, false)? else {
            return Ok(Vec::new());
        };
        let tva = self.table_va(v, pid, table, 1, at)?;
        let entries = self.read_table(v, tva)?;
        let eb = self.arch.entry_bytes();
        Ok((at..stop)
            .step_by(4096)
            .filter_map(|va| {
                let idx = self.arch.index(va, 1);
                let e = entries.get(idx as usize).copied()?;
                (e & bits::P != 0).then_some((va, tva + idx * eb, e))
            })
            .collect())
    }

    /// Forks `parent` (running on `v`): the child gets a copy of every mapping, private
    /// writable pages shared copy-on-write (write-protected in both).
    pub fn fork(&mut self, v: usize, parent: Pid) -> KResult<Pid> {
        self.switch_to(v, parent)?;
        let (top, cr3, pds, pdpt_slot) = self.new_address_space(v)?;
        let (vmas, mem) = {
            let p = self.proc_ref(parent)?;
            (p.vmas.clone(), p.mem.clone())
        };
        let child = self.insert_process(Process {
            cr3,
            top,
            pds,
            pdpt_slot,
            vmas: vmas.clone(),
            mem,
            loaded_on: 0,
        });
        let mut protected = Vec::new();
        for vma in &vmas {
            let cow = vma.writable && vma.file.is_none();
            for (at, stop) in self.leaf_regions(vma.start, vma.end) {
                let mut copies = Vec::new();
                for (va, entry, e) in self.present_leaves(v, parent, at, stop)? {
                    let mut ce = e & !bits::A;
                    if cow && e & bits::RW != 0 {
                        self.set_entry(v, entry, EntryOp::ClearRw)?;
                        protected.push(va);
                        ce &= !bits::RW;
                    }
                    self.frames.get(self.arch.entry_gfn(e));
                    copies.push((va, ce));
                }
                if !copies.is_empty() {
                    let table = self.leaf_table(v, child, at, true)?.ok_or_else(|| {
                        RunError::GuestPanic("fork could not build a table".into())
                    })?;
                    for (va, ce) in copies {
                        let at = self.leaf_entry_va(v, child, table, va)?;
                        self.set_entry(v, at, EntryOp::Install(ce))?;
                    }
                }
            }
        }
        self.switch_to(v, parent)?;
        self.flush_pages(parent, &protected)?;
        Ok(child)
    }

    /// Replaces `pid`'s program (running on `v`): its mappings are dropped and it starts
    /// over with fresh text, heap and stack.
    pub fn exec(&mut self, v: usize, pid: Pid) -> KResult<()> {
        self.switch_to(v, pid)?;
        self.drop_user_space(v, pid)?;
        let vmas = self.standard_vmas();
        let cr3 = {
            let p = self.proc_mut(pid)?;
            p.vmas = vmas;
            p.mem.clear();
            p.cr3
        };
        // The old translations must go: exec flushes the TLB.
        self.ops
            .set_cr3(v, cr3)
            .map_err(|e| kernel_err(e, "flushed at exec"))?;
        Ok(())
    }

    /// Clears all of a process's user mappings and frees its user page tables.
    fn drop_user_space(&mut self, v: usize, pid: Pid) -> KResult<()> {
        let vmas = self.proc_ref(pid)?.vmas.clone();
        for vma in &vmas {
            self.unmap_range(v, pid, vma.start, vma.end)?;
        }
        self.free_user_tables(v, pid)
    }

    /// Frees the user half's page tables below the top level (PAE: below the PDs),
    /// clearing the entries that pointed at them.
    fn free_user_tables(&mut self, v: usize, pid: Pid) -> KResult<()> {
        let user_top = self.arch.kernel_top_first();
        if self.arch.levels == 3 {
            let pds = self.proc_ref(pid)?.pds;
            for (i, &pd) in pds.iter().enumerate().take(user_top as usize) {
                let va = (i as u64) << 30;
                self.free_level(v, pid, pd, 2, va)?;
            }
            return Ok(());
        }
        let top = self.proc_ref(pid)?.top;
        self.free_children(v, pid, top, self.arch.levels, 0, user_top)
    }

    /// Frees table `gfn` at `level` (covering from `base`) and everything below it.
    fn free_level(&mut self, v: usize, pid: Pid, gfn: u64, level: u8, base: u64) -> KResult<()> {
        if level > 1 {
            self.free_children(v, pid, gfn, level, base, self.arch.entries(level))?;
        }
        // PAE page directories are freed with the address space, not here.
        if !(self.arch.levels == 3 && level == 2) {
            self.frames.put(gfn);
        }
        Ok(())
    }

    /// Frees what the first `count` entries of table `gfn` at `level` (covering from
    /// `base`) point at, clearing each entry after its subtree is gone.
    fn free_children(
        &mut self,
        v: usize,
        pid: Pid,
        gfn: u64,
        level: u8,
        base: u64,
        count: u64,
    ) -> KResult<()> {
        let tva = self.table_va(v, pid, gfn, level, base)?;
        let entries = self.read_table(v, tva)?;
        let eb = self.arch.entry_bytes();
        for (i, &e) in entries.iter().enumerate().take(count as usize) {
            if e & bits::P == 0 {
                continue;
            }
            let va = base + ((i as u64) << self.arch.shift(level));
            self.free_level(v, pid, self.arch.entry_gfn(e), level - 1, va)?;
            self.set_entry(v, tva + i as u64 * eb, EntryOp::Take)?;
        }
        Ok(())
    }

    /// Ends `pid` (running on `v`): tears its address space down in its own context,
    /// switches `v` to `next`, frees the top level.
    pub fn exit(&mut self, v: usize, pid: Pid, next: Pid) -> KResult<()> {
        self.switch_to(v, pid)?;
        self.drop_user_space(v, pid)?;
        self.switch_to(v, next)?;
        let p = self.proc_ref(pid)?.clone();
        if p.loaded_on != 0 {
            // Still loaded on another vcpu (a thread there): move it off first.
            for other in 0..self.cpus.len() {
                if p.loaded_on & (1 << other) != 0 {
                    self.switch_to(other, next)?;
                }
            }
        }
        if self.arch.levels == 3 {
            for (i, &pd) in p.pds.iter().enumerate() {
                if i != 2 {
                    self.frames.put(pd);
                }
            }
            if let Some(slot) = p.pdpt_slot
                && let Some((_, used)) = self.pdpt_pool.iter_mut().find(|(g, _)| *g == p.top)
                && let Some(u) = used.get_mut(slot)
            {
                *u = false;
            }
        } else {
            self.frames.put(p.top);
        }
        self.procs.remove(&pid);
        Ok(())
    }
}

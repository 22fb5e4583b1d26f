//! User accesses and the kernel's page-fault handler: demand paging, copy-on-write, and
//! killing a process on a real violation.

use shadow2::paging::PfErrorCode;
use shadow2::paging::bits;

use super::boot::file_signature;
use super::pt::EntryOp;
use super::{Access, KResult, Kernel, Pid, Vma};
use crate::RunError;
use crate::ops::{Event, Fault, GuestOps, OpError};

/// How often one access may fault and be handled before the kernel calls it a loop.
const FAULT_TRIES: usize = 4;

/// What a user access does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Fetch,
}

/// What the handler decided.
enum Handled {
    Retry,
    Kill,
}

impl<B: GuestOps> Kernel<B> {
    /// `pid`, running on `v`, reads the first word of the page at `va` and checks it holds what it last
    /// wrote there (or zero, or the file's contents).
    pub fn user_read(&mut self, v: usize, pid: Pid, va: u64) -> KResult<Access> {
        self.user_access(v, pid, va, Kind::Read)
    }

    /// `pid`, running on `v`, writes a fresh value at the start of the page at `va`.
    pub fn user_write(&mut self, v: usize, pid: Pid, va: u64) -> KResult<Access> {
        self.user_access(v, pid, va, Kind::Write)
    }

    /// `pid`, running on `v`, fetches an instruction at `va`.
    pub fn user_fetch(&mut self, v: usize, pid: Pid, va: u64) -> KResult<Access> {
        self.user_access(v, pid, va, Kind::Fetch)
    }

    fn user_access(&mut self, v: usize, pid: Pid, va: u64, kind: Kind) -> KResult<Access> {
        self.switch_to(v, pid)?;
        self.event(Event::UserAccess);
        let result = self.user_access_handling_faults(v, pid, va, kind);
        self.event(Event::UserAccessDone);
        result
    }

    fn user_access_handling_faults(
        &mut self,
        v: usize,
        pid: Pid,
        va: u64,
        kind: Kind,
    ) -> KResult<Access> {
        let page = va & !0xfff;
        let value = self.rng.next_u64();
        for _ in 0..FAULT_TRIES {
            let mut buf = [0u8; 8];
            let result = match kind {
                Kind::Read => self.ops.read(v, page, 3, &mut buf),
                Kind::Fetch => self.ops.fetch(v, page, 3, &mut buf),
                Kind::Write => self.ops.write(v, page, 3, &value.to_le_bytes()),
            };
            match result {
                Ok(()) => {
                    self.after_access(pid, page, kind, value, u64::from_le_bytes(buf))?;
                    return Ok(Access::Done);
                }
                Err(OpError::Fault(Fault::PageFault { va: cr2, code })) => {
                    match self.handle_page_fault(v, pid, cr2, PfErrorCode(code))? {
                        Handled::Retry => {}
                        Handled::Kill => {
                            self.kill(v, pid)?;
                            return Ok(Access::Killed);
                        }
                    }
                }
                Err(OpError::Fault(f)) => {
                    return Err(RunError::GuestPanic(format!(
                        "user access at {va:#x} took {f}"
                    )));
                }
                Err(OpError::Backend(b)) => return Err(RunError::Backend(b)),
            }
        }
        Err(RunError::GuestPanic(format!(
            "the access at {va:#x} kept faulting"
        )))
    }

    fn after_access(
        &mut self,
        pid: Pid,
        page: u64,
        kind: Kind,
        value: u64,
        got: u64,
    ) -> KResult<()> {
        let file_page = self
            .vma_of(pid, page)?
            .and_then(|m| m.file.map(|first| first + (page - m.start) / 4096));
        let p = self.proc_mut(pid)?;
        match kind {
            Kind::Write => {
                p.mem.insert(page, value);
            }
            Kind::Read | Kind::Fetch => {
                let expected = match (p.mem.get(&page), file_page) {
                    (Some(&v), _) => v,
                    (None, Some(i)) => file_signature(i),
                    (None, None) => 0,
                };
                if got != expected {
                    self.event(Event::DataError);
                }
            }
        }
        Ok(())
    }

    fn vma_of(&self, pid: Pid, va: u64) -> KResult<Option<Vma>> {
        Ok(self
            .proc_ref(pid)?
            .vmas
            .iter()
            .find(|m| m.contains(va))
            .copied())
    }

    fn handle_page_fault(
        &mut self,
        v: usize,
        pid: Pid,
        va: u64,
        code: PfErrorCode,
    ) -> KResult<Handled> {
        if code.reserved() || !code.user() {
            return Err(RunError::GuestPanic(format!(
                "unexpected page fault at {va:#x} with error code {:#x}",
                code.bits()
            )));
        }
        let Some(vma) = self.vma_of(pid, va)? else {
            return Ok(Handled::Kill);
        };
        if (code.write() && !vma.writable) || (code.fetch() && !vma.exec) {
            return Ok(Handled::Kill);
        }
        let page = va & !0xfff;
        let table = self
            .leaf_table(v, pid, page, true)?
            .ok_or_else(|| RunError::GuestPanic("no leaf table after building it".into()))?;
        let at = self.leaf_entry_va(v, pid, table, page)?;
        let pte = self.read_entry(v, at)?;
        if pte & bits::P == 0 {
            self.demand_map(v, at, page, &vma, code.write())?;
            return Ok(Handled::Retry);
        }
        if code.write() && pte & bits::RW == 0 {
            self.break_cow(v, pid, at, page, pte)?;
            return Ok(Handled::Retry);
        }
        // The entry already allows the access: another path fixed it (or the TLB was
        // stale); retry after invalidating.
        self.ops
            .invlpg(v, page)
            .map_err(|e| super::kernel_err(e, "invalidated a stale page"))?;
        Ok(Handled::Retry)
    }

    /// Maps the page on first touch. Like Linux, a new anonymous entry is already young (and
    /// dirty for a write): the access that faulted is about to set those bits anyway.
    fn demand_map(&mut self, v: usize, at: u64, page: u64, vma: &Vma, write: bool) -> KResult<()> {
        // `at` is reached through the kernel's linear or self-map, never through the
        // window slots that zeroing uses: it stays valid.
        let pte = match vma.file {
            Some(first) => {
                let i = first + (page - vma.start) / 4096;
                let gfn = self.file.get(i as usize).copied().ok_or_else(|| {
                    RunError::GuestPanic("mapping past the end of the file".into())
                })?;
                self.frames.get(gfn);
                // Page-cache pages are shared: mapped read-only.
                self.arch.user_pte(gfn, false, vma.exec) | bits::A
            }
            None => {
                let gfn = self.alloc_zeroed(v)?;
                let young = bits::A | if write { bits::D } else { 0 };
                self.arch.user_pte(gfn, vma.writable, vma.exec) | young
            }
        };
        self.set_entry(v, at, EntryOp::Install(pte))?;
        self.event(Event::DemandFault);
        Ok(())
    }

    fn break_cow(&mut self, v: usize, pid: Pid, at: u64, page: u64, pte: u64) -> KResult<()> {
        let old = self.arch.entry_gfn(pte);
        if self.frames.refs(old) == 1 {
            // The last user: take the page back writable.
            self.set_entry(v, at, EntryOp::Or(bits::RW))?;
        } else {
            let new = self
                .frames
                .alloc()
                .ok_or_else(|| RunError::GuestPanic("out of memory".into()))?;
            // The copy goes through window slots of its own: `at` stays valid.
            self.copy_frame(v, old, new)?;
            let entry = self.arch.user_pte(new, true, pte & bits::NX == 0) | bits::A | bits::D;
            self.set_entry(v, at, EntryOp::Replace(entry))?;
            self.frames.put(old);
        }
        self.shootdown(pid, page)?;
        self.event(Event::CowFault);
        Ok(())
    }

    /// Kills `pid` (running on `v`): it exits, and `v` goes back to the system process.
    fn kill(&mut self, v: usize, pid: Pid) -> KResult<()> {
        self.event(Event::Kill);
        let system = self.pid_of_system;
        self.exit(v, pid, system)
    }
}

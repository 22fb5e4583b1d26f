//! The workloads, written against the kernel's process interface. With several vcpus,
//! `init` runs a thread on each (one address space loaded everywhere, so its unmaps and
//! write-protects are INVLPG shootdowns) and children are spread over the vcpus.

use crate::RunError;
use crate::kernel::{Access, Kernel, Pid, Vma};
use crate::ops::{Event, GuestOps};
use crate::spec::{RunSpec, Workload};

type WResult = Result<(), RunError>;

/// Runs `spec`'s workload on a booted kernel whose first process is `init`.
pub fn run<B: GuestOps>(
    k: &mut Kernel<B>,
    init: Pid,
    spec: &RunSpec,
    progress: &mut dyn FnMut(u64, u64),
) -> WResult {
    for v in 0..k.vcpus() {
        k.switch_to(v, init)?;
    }
    warm_up(k, init)?;
    let mut w = Run {
        k,
        init,
        size: spec.size,
        done: 0,
        progress,
    };
    match spec.workload {
        Workload::Forkwait => w.forkwait(),
        Workload::Demand => w.demand(),
        Workload::MmapChurn => w.mmap_churn(),
        Workload::Ctxswitch => w.ctxswitch(),
        Workload::Kbuild => w.kbuild(),
    }
}

/// `init` touches its heap, stack and text once.
fn warm_up<B: GuestOps>(k: &mut Kernel<B>, init: Pid) -> WResult {
    let (Some(heap), Some(text)) = (k.heap(init), k.text(init)) else {
        return Err(RunError::GuestPanic("init has no heap".into()));
    };
    for va in pages(&heap) {
        k.user_write(0, init, va)?;
    }
    for va in pages(&text).take(4) {
        k.user_fetch(0, init, va)?;
    }
    let stack = k.arch().user_stack;
    k.user_write(0, init, stack)?;
    Ok(())
}

fn pages(vma: &Vma) -> impl Iterator<Item = u64> + use<> {
    (vma.start..vma.end).step_by(4096)
}

struct Run<'a, B: GuestOps> {
    k: &'a mut Kernel<B>,
    init: Pid,
    size: u64,
    done: u64,
    progress: &'a mut dyn FnMut(u64, u64),
}

impl<B: GuestOps> Run<'_, B> {
    fn step(&mut self) {
        self.done += 1;
        self.k.ops().event(Event::WorkloadStep);
        (self.progress)(self.done, self.size);
    }

    fn vcpus(&self) -> u64 {
        self.k.vcpus() as u64
    }

    fn random_page(&mut self, vma: &Vma) -> u64 {
        let n = (vma.end - vma.start) / 4096;
        vma.start + 4096 * self.k.rand_below(n)
    }

    /// `pid` touches `n` random pages of `vma` on `v`, writing one in `write_every`.
    fn touch(
        &mut self,
        v: usize,
        pid: Pid,
        vma: &Vma,
        n: u64,
        write_every: u64,
    ) -> Result<Access, RunError> {
        for i in 0..n {
            let va = self.random_page(vma);
            let r = if i % write_every == 0 {
                self.k.user_write(v, pid, va)?
            } else {
                self.k.user_read(v, pid, va)?
            };
            if r == Access::Killed {
                return Ok(Access::Killed);
            }
        }
        Ok(Access::Done)
    }

    fn heap(&self, pid: Pid) -> Result<Vma, RunError> {
        self.k
            .heap(pid)
            .ok_or_else(|| RunError::GuestPanic("a process without a heap".into()))
    }

    /// Fork; the child reads and writes a little of what it inherited and exits; the
    /// parent waits, then writes its own pages (taking them back from copy-on-write).
    fn forkwait(&mut self) -> WResult {
        let init = self.init;
        let heap = self.heap(init)?;
        let text = self.k.text(init).unwrap_or(heap);
        for round in 0..self.size {
            let child = self.k.fork(0, init)?;
            let cv = (round % self.vcpus()) as usize;
            if self.touch(cv, child, &heap, 6, 3)? == Access::Done {
                let va = self.random_page(&text);
                self.k.user_fetch(cv, child, va)?;
                let stack = self.k.arch().user_stack;
                self.k.user_write(cv, child, stack)?;
                self.k.exit(cv, child, init)?;
            }
            self.touch(0, init, &heap, 2, 1)?;
            self.step();
        }
        Ok(())
    }

    /// Touch `size` MiB of fresh memory, a MiB per step (spread over the vcpus), then read
    /// it all back.
    fn demand(&mut self) -> WResult {
        let init = self.init;
        let vma = self.k.mmap(init, self.size * 256)?;
        let all: Vec<u64> = pages(&vma).collect();
        for (mib, chunk) in all.chunks(256).enumerate() {
            let v = (mib as u64 % self.vcpus()) as usize;
            for &va in chunk {
                self.k.user_write(v, init, va)?;
            }
            self.step();
        }
        for (i, &va) in all.iter().enumerate() {
            let v = (i as u64 % self.vcpus()) as usize;
            self.k.user_read(v, init, va)?;
        }
        self.k.munmap(0, init, vma)
    }

    /// Map a few pages, touch them, unmap them, over and over.
    fn mmap_churn(&mut self) -> WResult {
        let init = self.init;
        for round in 0..self.size {
            let v = (round % self.vcpus()) as usize;
            let n = 4 + self.k.rand_below(28);
            let vma = self.k.mmap(init, n)?;
            for va in pages(&vma) {
                self.k.user_write(v, init, va)?;
            }
            for va in pages(&vma).step_by(2) {
                self.k.user_read(v, init, va)?;
            }
            self.k.munmap(v, init, vma)?;
            self.step();
        }
        Ok(())
    }

    /// Many processes with a few pages each; switch between them at random.
    fn ctxswitch(&mut self) -> WResult {
        let init = self.init;
        let heap = self.heap(init)?;
        let procs = self.size.clamp(2, 32);
        let mut live: Vec<(Pid, usize)> = Vec::new();
        for i in 0..procs {
            let child = self.k.fork(0, init)?;
            let v = (i % self.vcpus()) as usize;
            if self.touch(v, child, &heap, 4, 1)? == Access::Done {
                live.push((child, v));
            }
        }
        for _ in 0..self.size {
            let Some(&(pid, v)) = live.get(self.k.rand_below(live.len() as u64) as usize) else {
                break;
            };
            self.touch(v, pid, &heap, 2, 2)?;
            self.step();
        }
        for (pid, v) in live {
            self.k.exit(v, pid, init)?;
        }
        Ok(())
    }

    /// A build: `make` (init) forks jobs that exec a compiler, which maps and fills a
    /// heap, reads its text, and exits; up to three run at once, interleaved; one job in
    /// sixteen crashes (writes to its text) and is killed.
    fn kbuild(&mut self) -> WResult {
        let init = self.init;
        let mut live: Vec<Job> = Vec::new();
        let mut started = 0u64;
        while self.done < self.size {
            if live.len() < 3 && started < self.size {
                let v = (started % self.vcpus()) as usize;
                let pid = self.k.fork(0, init)?;
                self.k.exec(v, pid)?;
                let heap = self.k.mmap(pid, 48)?;
                live.push(Job {
                    pid,
                    v,
                    heap,
                    units: 4,
                    crash: started % 16 == 15,
                });
                started += 1;
            }
            let pick = self.k.rand_below(live.len() as u64) as usize;
            let Some(job) = live.get_mut(pick) else {
                break;
            };
            job.units -= 1;
            let job = *job;
            let text = self
                .k
                .text(job.pid)
                .ok_or_else(|| RunError::GuestPanic("a job without text".into()))?;
            let mut state = self.touch(job.v, job.pid, &job.heap, 12, 2)?;
            if state == Access::Done {
                let va = self.random_page(&text);
                state = self.k.user_fetch(job.v, job.pid, va)?;
            }
            if state == Access::Done && job.crash && job.units == 0 {
                state = self.k.user_write(job.v, job.pid, text.start)?;
                if state != Access::Killed {
                    return Err(RunError::GuestPanic("a write to text was allowed".into()));
                }
            }
            if state == Access::Killed || job.units == 0 {
                if state == Access::Done {
                    self.k.exit(job.v, job.pid, init)?;
                }
                live.retain(|j| j.pid != job.pid);
                let make_heap = self.heap(init)?;
                self.touch(0, init, &make_heap, 2, 2)?;
                self.step();
            }
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug)]
struct Job {
    pid: Pid,
    v: usize,
    heap: Vma,
    units: u32,
    crash: bool,
}

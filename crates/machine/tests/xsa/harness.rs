//! The scenario harness: a machine running one guest on one pair, whose page tables the
//! guest builds in its own memory, whose page-table writes are real store instructions
//! executed by the simulated CPU through the shadows, and whose every step is followed by
//! [`assert_isolated`].

use shadow2::addr::{Gfn, Gpa, Gva, Mfn};
use shadow2::domain::{Domain, DomainConfig, EngineError};
use shadow2::emulate::{CodeMode, Regs};
use shadow2::flush::Flush;
use shadow2::multi::Pair;
use shadow2::p2m::P2mType;
use shadow2::paging::{ControlState, PagingLevels, bits};
use shadow2_machine::memory::SparseMemory;
use shadow2_machine::sim::{GuestError, ShadowMachine};

use crate::engine_support::{MACHINE_FRAMES, SUP, Tables, control, hvm, machine};
use crate::invariants::{Calls, Since, assert_isolated};

/// Guest frames of RAM every scenario machine has.
pub const RAM: u64 = 400;
/// Guest frames the guest's page tables come from.
pub const TABLE_FRAMES: core::ops::Range<u64> = 1..240;
/// The kernel's code page: where every instruction a scenario executes sits.
pub const CODE_VA: u64 = 0x60_0000;
pub const CODE_GFN: u64 = 250;
/// Data frames scenarios map (`DATA_GFN..RAM`).
pub const DATA_GFN: u64 = 300;
/// Flags of a supervisor data page with A and D set.
pub const KDATA: u64 = bits::P | bits::RW | bits::A | bits::D;

/// Pairs with a PAE guest.
pub const PAE_PAIRS: [Pair; 2] = [Pair::P3on3, Pair::P3on4];

/// One scenario on one pair.
pub struct Xsa {
    pub pair: Pair,
    pub m: ShadowMachine,
    pub t: Tables,
    since: Since,
    steps: usize,
    /// The guest frame of the kernel's code page.
    code_gfn: u64,
}

impl Xsa {
    /// A machine with `vcpus` vcpus and a pool of `pool` pages running a guest of `pair`'s
    /// mode on its shadow mode.
    pub fn new(pair: Pair, vcpus: usize, pool: usize) -> Xsa {
        Xsa::with_config(pair, hvm(pair.shadow(), vcpus, pool))
    }

    /// A machine for `config` (an HVM domain on `pair`'s shadow mode) running a guest of
    /// `pair`'s mode.
    pub fn with_config(pair: Pair, config: DomainConfig) -> Xsa {
        let m = machine(config, RAM);
        let since = Since::now(&m);
        Xsa {
            pair,
            m,
            t: Tables::new(pair.guest(), TABLE_FRAMES.start, TABLE_FRAMES.end),
            since,
            steps: 0,
            code_gfn: CODE_GFN,
        }
    }

    /// A non-translated (PV) domain on `pair`'s shadow mode owning `frames` machine frames,
    /// from which the guest takes its tables (the first half) and data (the rest): returns
    /// the scenario and the data frames. The code page is the first data frame.
    pub fn pv(pair: Pair, vcpus: usize, frames: usize) -> (Xsa, Vec<u64>) {
        let config = DomainConfig {
            translated: false,
            ..hvm(pair.shadow(), vcpus, 128)
        };
        let mut m = ShadowMachine::new(MACHINE_FRAMES, config).expect("a PV domain");
        let owned: Vec<u64> = (0..frames)
            .map(|_| {
                let mfn = crate::engine_support::host_frame(&mut m);
                m.domain_mut()
                    .add_frame(mfn)
                    .expect("a frame for the guest");
                mfn.raw()
            })
            .collect();
        let (tables, data) = owned.split_at(frames / 2);
        let since = Since::now(&m);
        let x = Xsa {
            pair,
            m,
            t: Tables::with_frames(pair.guest(), tables),
            since,
            steps: 0,
            code_gfn: data[0],
        };
        (x, data[1..].to_vec())
    }

    pub fn levels(&self) -> PagingLevels {
        self.pair.guest()
    }

    pub fn domain(&self) -> &Domain<SparseMemory> {
        self.m.domain()
    }

    /// Checks every isolation invariant after the step just done.
    #[track_caller]
    pub fn step(&mut self, what: &str) {
        self.checked(Calls::Several, what);
    }

    #[track_caller]
    fn checked(&mut self, calls: Calls, what: &str) {
        self.steps += 1;
        let label = format!("{:?} step {} ({what})", self.pair, self.steps);
        assert_isolated(&self.m, &mut self.since, calls, &label);
    }

    /// A new address space with the kernel's code page mapped: its CR3 value (a PAE PDPT
    /// sits at byte 0x40 of its page, as Windows-style guests place them).
    pub fn space(&mut self) -> u64 {
        let cr3 = self.t.new_root(0x40);
        self.t
            .map(&mut self.m, cr3, CODE_VA, self.code_gfn, KDATA & !bits::RW);
        cr3
    }

    /// Maps `va` to `gfn` in `cr3` (the loader's write, through the engine).
    pub fn map(&mut self, cr3: u64, va: u64, gfn: u64, flags: u64) -> u64 {
        self.t.map(&mut self.m, cr3, va, gfn, flags)
    }

    /// Maps, at `window` in `cr3`, the table the guest's walk of `va` starts from (the
    /// root, or for PAE the L2 its PDPTE names), as a kernel page; returns its frame.
    pub fn map_walk_top(&mut self, cr3: u64, va: u64, window: u64) -> u64 {
        let top = if self.pair.guest() == PagingLevels::Three {
            self.t.table_of(&mut self.m, cr3, va, 2)
        } else {
            cr3 >> 12
        };
        self.map(cr3, window, top, KDATA);
        top
    }

    /// Turns the guest's paging mode on vcpu `v` on with `cr3` (or reloads the mode).
    #[track_caller]
    pub fn run(&mut self, v: usize, cr3: u64) {
        let levels = self.levels();
        self.m
            .set_paging(v, control(levels, cr3))
            .expect("the mode change");
        self.step("paging on");
    }

    /// MOV to CR0/CR4/EFER with `ctl` (the guest's control registers otherwise kept).
    pub fn set_control(&mut self, v: usize, ctl: ControlState) -> Result<(), GuestError> {
        let r = self.m.set_paging(v, ctl);
        self.step("mode change");
        r
    }

    /// MOV to CR3.
    pub fn cr3(&mut self, v: usize, cr3: u64) -> Result<(), GuestError> {
        let r = self.m.set_cr3(v, cr3);
        self.checked(Calls::One { by: Some(v) }, "CR3 load");
        r
    }

    /// One page fault taken by vcpu `v` at `va` (a supervisor read of a not-present
    /// entry, as the hardware reports a miss), handed to the engine as one call; the flush
    /// and reloads it returns are carried out. Its outcome, or the engine's error.
    pub fn fault(
        &mut self,
        v: usize,
        va: u64,
    ) -> Result<shadow2::multi::FaultOutcome, EngineError> {
        let r = self
            .m
            .domain_mut()
            .page_fault(v, Gva::new(va), shadow2::paging::PfErrorCode(0));
        let r = r.map(|(outcome, flush)| {
            self.m.settle(flush);
            outcome
        });
        self.checked(Calls::One { by: Some(v) }, "page fault");
        r
    }

    /// A supervisor read of 8 bytes at `va`.
    pub fn read(&mut self, v: usize, va: u64) -> Result<u64, GuestError> {
        let mut buf = [0u8; 8];
        let r = self.m.read(v, Gva::new(va), SUP, &mut buf);
        self.step("read");
        r.map(|()| u64::from_le_bytes(buf))
    }

    /// A supervisor data write of 8 bytes at `va` (not a page-table write).
    pub fn write(&mut self, v: usize, va: u64, value: u64) -> Result<(), GuestError> {
        let r = self.m.write(v, Gva::new(va), SUP, &value.to_le_bytes());
        self.step("write");
        r
    }

    /// The guest's code mode.
    pub fn code_mode(&self) -> CodeMode {
        if self.levels() == PagingLevels::Four {
            CodeMode::Bits64
        } else {
            CodeMode::Bits32
        }
    }

    /// Executes `code` (placed at the start of the code page) at CPL 0 on vcpu `v`, with
    /// the registers `setup` gives.
    pub fn exec(
        &mut self,
        v: usize,
        code: &[u8],
        setup: impl FnOnce(&mut Regs),
    ) -> Result<Regs, GuestError> {
        self.m
            .write_phys(Gpa::new(self.code_gfn << 12), code)
            .expect("the code page");
        let mut regs = Regs::new(self.code_mode());
        regs.rip = CODE_VA;
        setup(&mut regs);
        let r = self.m.exec(v, &mut regs);
        self.step("instruction");
        r.map(|()| regs)
    }

    /// The store a kernel of this mode writes a page-table entry with, through a
    /// mapping of the table at `va`: `mov [rdi], rax` (64-bit), `lock cmpxchg8b [edi]`
    /// (PAE, the old value read first), `mov [edi], eax` (32-bit).
    pub fn store(&mut self, v: usize, va: u64, value: u64) -> Result<(), GuestError> {
        match self.levels() {
            PagingLevels::Four => self
                .exec(v, &[0x48, 0x89, 0x07], |r| {
                    r.gpr[Regs::RDI] = va;
                    r.gpr[Regs::RAX] = value;
                })
                .map(|_| ()),
            PagingLevels::Three => {
                let old = self.read(v, va)?;
                let r = self.exec(v, &[0xf0, 0x0f, 0xc7, 0x0f], |r| {
                    r.gpr[Regs::RDI] = va;
                    r.gpr[Regs::RAX] = old & 0xffff_ffff;
                    r.gpr[Regs::RDX] = old >> 32;
                    r.gpr[Regs::RBX] = value & 0xffff_ffff;
                    r.gpr[Regs::RCX] = value >> 32;
                })?;
                // ZF clear: the entry changed under the guest (hardware set A/D); retry once.
                if r.rflags & (1 << 6) == 0 {
                    return self.store(v, va, value);
                }
                Ok(())
            }
            _ => self
                .exec(v, &[0x89, 0x07], |r| {
                    r.gpr[Regs::RDI] = va;
                    r.gpr[Regs::RAX] = value & 0xffff_ffff;
                })
                .map(|_| ()),
        }
    }

    /// The guest-physical address of the entry for `va` at `level` in `cr3`.
    pub fn slot(&mut self, cr3: u64, va: u64, level: u8) -> u64 {
        self.t.slot(&mut self.m, cr3, va, level)
    }

    /// Reads a guest entry from guest-physical memory.
    pub fn entry(&self, gpa: u64) -> u64 {
        self.t.read(&self.m, gpa)
    }

    /// Index of `va`'s entry in an L1 of this mode.
    pub fn l1_index(&self, va: u64) -> u64 {
        if self.levels() == PagingLevels::Two {
            (va >> 12) & 1023
        } else {
            (va >> 12) & 511
        }
    }

    /// A host call: runs `f` on the domain, carries out the flush it returns (or, when it
    /// fails, the flush it owes, from `take_flush`), checks the invariants. The error, if
    /// any, is returned after the check.
    pub fn host<T>(
        &mut self,
        what: &str,
        f: impl FnOnce(&mut Domain<SparseMemory>) -> Result<(T, Flush), EngineError>,
    ) -> Result<T, EngineError> {
        let r = f(self.m.domain_mut());
        let r = r.map(|(value, flush)| {
            self.m.settle(flush);
            value
        });
        if r.is_err() {
            self.m.settle_failed_call();
        }
        self.checked(Calls::One { by: None }, what);
        r
    }

    /// `set_p2m` as a host call.
    pub fn set_p2m(&mut self, gfn: u64, to: Option<(Mfn, P2mType)>) -> Result<(), EngineError> {
        self.host("set_p2m", |d| d.set_p2m(Gfn::new(gfn), to).map(|f| ((), f)))
    }

    /// The machine frame behind a guest frame of RAM.
    pub fn mfn(&self, gfn: u64) -> Mfn {
        self.m.ram_frame(Gfn::new(gfn)).expect("a RAM frame")
    }

    /// A fresh machine frame from the host, not given to the guest.
    pub fn host_frame(&mut self) -> Mfn {
        crate::engine_support::host_frame(&mut self.m)
    }
}

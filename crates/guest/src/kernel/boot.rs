//! Bringing the kernel up: the image, the kernel's own tables (written by the loader, or by
//! the kernel itself with paging off), paging turned on for every vcpu, and for `smp-boot`
//! application processors that run in other paging modes meanwhile.

use shadow2::paging::ControlState;
use shadow2::paging::bits::{self, cr};

use super::arch::{Arch, CODE_GFN};
use super::code::code_page;
use super::pt::EntryOp;
use super::{FILE_PAGES, KResult, Kernel, Pid, Process, kernel_err};
use crate::RunError;
use crate::ops::GuestOps;

/// The first bytes of page `i` of the executable file.
pub(crate) fn file_signature(i: u64) -> u64 {
    0xf11e_0000_0000_0000 | i
}

/// The control registers of a vcpu with paging on in `levels` levels, at `cr3`.
pub(crate) fn paging_control(arch: &Arch, levels: u8, cr3: u64) -> ControlState {
    let mut ctl = ControlState {
        cr0: cr::CR0_PE | cr::CR0_PG | cr::CR0_WP,
        cr3,
        ..ControlState::default()
    };
    match levels {
        4 => {
            ctl.cr4 = cr::CR4_PAE | if arch.global { cr::CR4_PGE } else { 0 };
            ctl.efer = cr::EFER_LME | cr::EFER_LMA | EFER_NXE;
        }
        3 => {
            ctl.cr4 = cr::CR4_PAE;
            ctl.efer = EFER_NXE;
        }
        _ => {
            ctl.cr4 = cr::CR4_PSE | if arch.global { cr::CR4_PGE } else { 0 };
        }
    }
    ctl
}

const EFER_NXE: u64 = 1 << 11;

fn protected_mode_no_paging() -> ControlState {
    ControlState {
        cr0: cr::CR0_PE,
        ..ControlState::default()
    }
}

impl<B: GuestOps> Kernel<B> {
    fn set_control(&mut self, v: usize, ctl: ControlState) -> KResult<()> {
        self.ops
            .set_control(v, ctl)
            .map_err(|e| kernel_err(e, "changed paging mode"))?;
        if let Some(c) = self.cpus.get_mut(v) {
            c.ctl = ctl;
            c.window = Default::default();
        }
        Ok(())
    }

    /// A new table frame while building before paging is on.
    fn build_table(&mut self) -> KResult<u64> {
        if self.loader {
            let gfn = self
                .frames
                .alloc()
                .ok_or_else(|| RunError::GuestPanic("out of memory at boot".into()))?;
            self.ops
                .load_image(gfn << 12, &[0u8; 4096])
                .map_err(|e| kernel_err(e, "loaded a table"))?;
            Ok(gfn)
        } else {
            self.alloc_zeroed(0)
        }
    }

    /// Writes entry `idx` of table `gfn` before paging is on.
    fn build_entry(&mut self, gfn: u64, idx: u64, value: u64) -> KResult<()> {
        let eb = self.arch.entry_bytes();
        let gpa = (gfn << 12) + idx * eb;
        if self.loader {
            let bytes = value.to_le_bytes();
            self.ops
                .load_image(gpa, &bytes[..eb as usize])
                .map_err(|e| kernel_err(e, "loaded an entry"))
        } else {
            self.set_entry(0, gpa, EntryOp::Install(value))?;
            self.ap_tick()
        }
    }

    /// Loads the image, builds the kernel's tables, turns paging on everywhere.
    pub(super) fn build_kernel(&mut self, smp: bool) -> KResult<()> {
        self.ops
            .load_image(CODE_GFN << 12, &code_page())
            .map_err(|e| kernel_err(e, "loaded its image"))?;
        for i in 0..FILE_PAGES {
            let gfn = self
                .frames
                .alloc()
                .ok_or_else(|| RunError::GuestPanic("out of memory at boot".into()))?;
            let mut page = vec![0x90u8; 4096];
            page[..8].copy_from_slice(&file_signature(i).to_le_bytes());
            self.ops
                .load_image(gfn << 12, &page)
                .map_err(|e| kernel_err(e, "loaded the executable"))?;
            self.file.push(gfn);
        }
        if !self.loader {
            for v in 0..self.cpus.len() {
                self.set_control(v, protected_mode_no_paging())?;
            }
            if smp {
                self.start_application_processors()?;
            }
        }
        let cr3 = match self.arch.levels {
            4 => self.build_4level()?,
            3 => self.build_pae()?,
            _ => self.build_2level()?,
        };
        let system = Pid(0);
        self.next_pid = 1;
        self.procs.insert(
            system,
            Process {
                cr3,
                top: self.kernel_top,
                pds: self.system_pds,
                pdpt_slot: None,
                vmas: Vec::new(),
                mem: Default::default(),
                loaded_on: 0,
            },
        );
        self.pid_of_system = system;
        let ctl = paging_control(&self.arch, self.arch.levels, cr3);
        for v in 0..self.cpus.len() {
            if v > 0 && smp {
                // An application processor leaves its own paging mode first.
                self.set_control(v, protected_mode_no_paging())?;
            }
            self.set_control(v, ctl)?;
            if let Some(c) = self.cpus.get_mut(v) {
                c.current = Some(system);
            }
            if let Some(p) = self.procs.get_mut(&system) {
                p.loaded_on |= 1 << v;
            }
        }
        self.aps.clear();
        Ok(())
    }

    fn build_4level(&mut self) -> KResult<u64> {
        let top = self.build_table()?;
        let ram_bytes = self.frames_total() << 12;
        let l3 = self.build_table()?;
        self.build_entry(top, 273, self.arch.kernel_entry(l3, true, false, false))?;
        let gib = ram_bytes.div_ceil(1 << 30);
        for i in 0..gib {
            let l2 = self.build_table()?;
            self.build_entry(l3, i, self.arch.kernel_entry(l2, true, false, false))?;
            let first = i << 30;
            let last = ram_bytes.min(first + (1 << 30));
            let mut at = first;
            while at < last {
                let e =
                    (at | bits::P | bits::RW | bits::A | bits::D | bits::PS | bits::G) | bits::NX;
                self.build_entry(l2, (at >> 21) & 511, e)?;
                at += 1 << 21;
            }
        }
        let l3c = self.build_table()?;
        let l2c = self.build_table()?;
        let l1c = self.build_table()?;
        self.build_entry(top, 511, self.arch.kernel_entry(l3c, true, false, false))?;
        self.build_entry(l3c, 510, self.arch.kernel_entry(l2c, true, false, false))?;
        self.build_entry(l2c, 8, self.arch.kernel_entry(l1c, true, false, false))?;
        self.build_entry(l1c, 0, self.arch.kernel_entry(CODE_GFN, false, true, true))?;
        self.kernel_top = top;
        Ok(top << 12)
    }

    fn build_2level(&mut self) -> KResult<u64> {
        let pd = self.build_table()?;
        let four_mib = self.frames_total().div_ceil(1024);
        for i in 0..four_mib {
            let e = (i << 22) | bits::P | bits::RW | bits::A | bits::D | bits::PS | bits::G;
            self.build_entry(pd, 768 + i, e)?;
        }
        self.kernel_top = pd;
        Ok(pd << 12)
    }

    fn build_pae(&mut self) -> KResult<u64> {
        let pool = self.build_table()?;
        let mut pds = [0u64; 4];
        for pd in &mut pds {
            *pd = self.build_table()?;
        }
        let kpd = pds[2];
        let code_pt = self.build_table()?;
        let window_pt = self.build_table()?;
        self.build_entry(kpd, 2, self.arch.kernel_entry(code_pt, true, true, false))?;
        self.build_entry(
            kpd,
            3,
            self.arch.kernel_entry(window_pt, true, false, false),
        )?;
        self.build_entry(
            code_pt,
            0,
            self.arch.kernel_entry(CODE_GFN, false, true, true),
        )?;
        for (i, &pd) in pds.iter().enumerate() {
            self.build_entry(pds[3], i as u64, self.self_map_entry(pd))?;
        }
        let slot = 1;
        for (i, &pd) in pds.iter().enumerate() {
            // PDPTEs live 32 bytes into the pool page: not page-aligned.
            self.build_entry(pool, (slot * 4 + i) as u64, (pd << 12) | bits::P)?;
        }
        let mut used = vec![false; 128];
        used[0] = true;
        used[slot] = true;
        self.pdpt_pool.push((pool, used));
        self.kernel_pd = kpd;
        self.kernel_top = pool;
        self.system_pds = pds;
        Ok((pool << 12) + 32 * slot as u64)
    }

    /// A PAE self-map entry: a PDE pointing at a page directory.
    pub(crate) fn self_map_entry(&self, pd: u64) -> u64 {
        (pd << 12) | bits::P | bits::RW | bits::A | bits::D
    }

    fn frames_total(&self) -> u64 {
        self.ops.ram_frames()
    }

    /// `smp-boot`: application processors 1 and 2 turn on 2-level and PAE paging on small
    /// identity tables while the bootstrap processor builds the kernel's tables with paging
    /// off; processor 3 stays unpaged.
    fn start_application_processors(&mut self) -> KResult<()> {
        let two = self.alloc_zeroed(0)?;
        let pdpt = self.alloc_zeroed(0)?;
        let pd = self.alloc_zeroed(0)?;
        let ident = bits::P | bits::RW | bits::A | bits::D | bits::PS;
        // Tables of other formats than the kernel's: plain 4- and 8-byte stores.
        self.ops
            .write(0, two << 12, 0, &(ident as u32).to_le_bytes())
            .map_err(|e| kernel_err(e, "built an AP table"))?;
        self.ops
            .write(0, pdpt << 12, 0, &((pd << 12) | bits::P).to_le_bytes())
            .map_err(|e| kernel_err(e, "built an AP table"))?;
        for i in 0..2u64 {
            self.ops
                .write(0, (pd << 12) + 8 * i, 0, &((i << 21) | ident).to_le_bytes())
                .map_err(|e| kernel_err(e, "built an AP table"))?;
        }
        let modes = [(1usize, 2u8, two << 12), (2, 3, pdpt << 12)];
        for (v, levels, cr3) in modes {
            if v < self.cpus.len() {
                let arch = Arch::with_levels(levels);
                let mut ctl = paging_control(&arch, levels, cr3);
                ctl.cr4 &= !cr::CR4_PGE;
                self.set_control(v, ctl)?;
            }
        }
        for v in 1..self.cpus.len() {
            let scratch = self.alloc_zeroed(0)?;
            self.aps.push((v, scratch));
        }
        Ok(())
    }

    /// One step of every application processor while the bootstrap processor builds: it
    /// writes its scratch page, reads it back, and fetches the kernel's code (all within
    /// the first 4 MiB, identity-mapped in every mode the processors are in).
    fn ap_tick(&mut self) -> KResult<()> {
        let aps = self.aps.clone();
        for (v, scratch) in aps {
            let at = (scratch << 12) + 8 * self.rng.below(512);
            let value = self.rng.next_u64().to_le_bytes();
            self.ops
                .write(v, at, 0, &value)
                .map_err(|e| kernel_err(e, "wrote on an application processor"))?;
            let mut back = [0u8; 8];
            self.ops
                .read(v, at, 0, &mut back)
                .map_err(|e| kernel_err(e, "read on an application processor"))?;
            if back != value {
                self.event(crate::ops::Event::DataError);
            }
            let mut insn = [0u8; 4];
            self.ops
                .fetch(v, CODE_GFN << 12, 0, &mut insn)
                .map_err(|e| kernel_err(e, "fetched on an application processor"))?;
        }
        Ok(())
    }
}

//! Helpers shared by the engine's benchmarks: a flat, fast guest memory and a builder of
//! page tables in every paging mode.
#![allow(dead_code)]

use shadow2::paging::bits::{self, cr};
use shadow2::paging::{
    ControlState, CpuFeatures, FourLevel, MemError, PagingLevels, PagingMode, PhysMem, ThreeLevel,
    TwoLevel, load_pae_pdptes,
};
use shadow2::paging::{Exchange, serial_compare_exchange_u32, serial_compare_exchange_u64};
use shadow2::{Gpa, PhysAddr};

/// Flat guest memory: a `Vec<u64>` indexed by address / 8, from address 0. Accesses cost an
/// index and a bounds check, so benchmarks measure the code using it, not the memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArenaMem {
    words: Vec<u64>,
}

impl ArenaMem {
    /// `bytes` of zeroed memory from address 0.
    pub fn new(bytes: u64) -> ArenaMem {
        ArenaMem {
            words: vec![0; (bytes / 8) as usize],
        }
    }
    /// The size in bytes.
    pub fn len_bytes(&self) -> u64 {
        self.words.len() as u64 * 8
    }
    fn slot(&self, addr: u64) -> Result<usize, MemError> {
        let index = (addr >> 3) as usize;
        if index < self.words.len() {
            Ok(index)
        } else {
            Err(MemError::Unbacked { addr })
        }
    }
}

impl PhysMem<Gpa> for ArenaMem {
    #[inline]
    fn read_u32(&self, addr: Gpa) -> Result<u32, MemError> {
        let a = addr.to_raw();
        if !a.is_multiple_of(4) {
            return Err(MemError::Misaligned { addr: a });
        }
        Ok((self.words[self.slot(a)?] >> ((a & 4) * 8)) as u32)
    }
    #[inline]
    fn read_u64(&self, addr: Gpa) -> Result<u64, MemError> {
        let a = addr.to_raw();
        if !a.is_multiple_of(8) {
            return Err(MemError::Misaligned { addr: a });
        }
        Ok(self.words[self.slot(a)?])
    }
    #[inline]
    fn write_u32(&mut self, addr: Gpa, value: u32) -> Result<(), MemError> {
        let a = addr.to_raw();
        if !a.is_multiple_of(4) {
            return Err(MemError::Misaligned { addr: a });
        }
        let slot = self.slot(a)?;
        let shift = (a & 4) * 8;
        let word = &mut self.words[slot];
        *word = (*word & !(0xffff_ffffu64 << shift)) | (u64::from(value) << shift);
        Ok(())
    }
    #[inline]
    fn write_u64(&mut self, addr: Gpa, value: u64) -> Result<(), MemError> {
        let a = addr.to_raw();
        if !a.is_multiple_of(8) {
            return Err(MemError::Misaligned { addr: a });
        }
        let slot = self.slot(a)?;
        self.words[slot] = value;
        Ok(())
    }
    // Single-threaded: nothing can write between the read and the write.
    fn compare_exchange_u32(
        &mut self,
        addr: Gpa,
        current: u32,
        new: u32,
    ) -> Result<Exchange<u32>, MemError> {
        serial_compare_exchange_u32(self, addr, current, new)
    }
    fn compare_exchange_u64(
        &mut self,
        addr: Gpa,
        current: u64,
        new: u64,
    ) -> Result<Exchange<u64>, MemError> {
        serial_compare_exchange_u64(self, addr, current, new)
    }
}

/// A guest with page tables in one mode, built in an [`ArenaMem`].
#[derive(Clone, Debug)]
pub struct GuestTables {
    /// The memory holding the tables (and anything else).
    pub mem: ArenaMem,
    /// Control registers selecting the mode, CR3 pointing at the tables.
    pub ctl: ControlState,
    /// CPU features.
    pub feat: CpuFeatures,
    next_frame: u64,
}

impl GuestTables {
    /// Empty tables for `levels` in `bytes` of memory; tables are allocated from `tables_at`.
    /// CR0.WP is set; EFER.NXE too in PAE and 4-level mode, CR4.PSE in 2-level mode.
    pub fn new(levels: PagingLevels, bytes: u64, tables_at: u64) -> GuestTables {
        let mut ctl = ControlState {
            cr0: cr::CR0_PE | cr::CR0_PG | cr::CR0_WP,
            ..ControlState::default()
        };
        match levels {
            PagingLevels::Two => ctl.cr4 = cr::CR4_PSE,
            PagingLevels::Three => {
                ctl.cr4 = cr::CR4_PAE;
                ctl.efer = cr::EFER_NXE;
            }
            PagingLevels::Four => {
                ctl.cr4 = cr::CR4_PAE;
                ctl.efer = cr::EFER_LME | cr::EFER_LMA | cr::EFER_NXE;
            }
            PagingLevels::Zero => {}
        }
        let mut tables = GuestTables {
            mem: ArenaMem::new(bytes),
            ctl,
            feat: CpuFeatures::KVM_HOST,
            next_frame: tables_at,
        };
        tables.ctl.cr3 = tables.alloc_frame();
        tables
    }

    /// A zeroed 4 KiB frame for a table.
    pub fn alloc_frame(&mut self) -> u64 {
        let frame = self.next_frame;
        self.next_frame += 0x1000;
        assert!(
            self.next_frame <= self.mem.len_bytes(),
            "arena too small for the tables"
        );
        frame
    }

    fn levels(&self) -> PagingLevels {
        self.ctl.levels()
    }

    fn entry_bytes(&self) -> u64 {
        if self.levels() == PagingLevels::Two {
            4
        } else {
            8
        }
    }

    fn index(&self, va: u64, level: u8) -> u64 {
        (match self.levels() {
            PagingLevels::Two => TwoLevel::index(va, level),
            PagingLevels::Three => ThreeLevel::index(va, level),
            _ => FourLevel::index(va, level),
        }) as u64
    }

    /// Maps the 4 KiB page at `va` to `pa`: the leaf gets `flags`, new upper entries get
    /// `flags` too (a PAE PDPTE only P). Reloads the PAE PDPTEs.
    pub fn map_4k(&mut self, va: u64, pa: u64, flags: u64) {
        let bytes = self.entry_bytes();
        let levels = self.levels();
        let mask = if levels == PagingLevels::Two {
            bits::ADDR_MASK_4
        } else {
            bits::ADDR_MASK_8
        };
        let mut table = self.ctl.cr3 & mask & !0x1f;
        for level in (2..=levels.count()).rev() {
            let addr = Gpa::new(table + self.index(va, level) * bytes);
            let entry = self
                .mem
                .read_entry(addr, bytes)
                .unwrap_or_else(|e| panic!("{e:?}"));
            if entry & bits::P != 0 {
                table = entry & mask;
                continue;
            }
            let next = self.alloc_frame();
            let upper = if levels == PagingLevels::Three && level == 3 {
                bits::P
            } else {
                flags
            };
            self.mem
                .write_entry(addr, bytes, next | upper)
                .unwrap_or_else(|e| panic!("{e:?}"));
            table = next;
        }
        let leaf = Gpa::new(table + self.index(va, 1) * bytes);
        self.mem
            .write_entry(leaf, bytes, pa | flags)
            .unwrap_or_else(|e| panic!("{e:?}"));
        if levels == PagingLevels::Three {
            self.ctl.pdptes = load_pae_pdptes(&self.mem, self.ctl.cr3, &self.feat)
                .unwrap_or_else(|e| panic!("bad PDPTEs: {e:?}"));
        }
    }
}

//! One vcpu of the simulated CPU: control registers, a TLB, and translation through
//! whatever root CR3 names (the guest's own tables, or the engine's shadow tables) in machine
//! memory, as hardware does it.
//!
//! The TLB and the paging-structure caches are honoured exactly as hardware would honour
//! them: a cached translation is used until INVLPG, a CR3 load, a paging-mode change or a
//! fault removes it, and a walk starts at the deepest cached paging-structure entry, so that
//! a missing flush shows up as an access through a stale translation or a walk of a stale
//! table.

use std::fmt;

use shadow2::addr::{Gva, Maddr, Mfn, PAGE_SIZE};
use shadow2::paging::bits::{self, cr};
use shadow2::paging::{
    Access, AccessKind, ControlState, CpuFeatures, MemError, PageSize, PagingLevels, PdptLoadError,
    Perms, PfErrorCode, PhysMem, Privilege, WalkFault, load_pae_pdptes,
};

use crate::hw_walk::{HwTranslation, pkey_denies, walk_cached};
use crate::memory::{copy_from_phys, copy_to_phys};
use crate::psc::{PagingStructureCache, PscEntry};
use crate::tlb::{Tlb, TlbEntry};

/// CR0.NW
const CR0_NW: u64 = 1 << 29;
/// CR0.CD
const CR0_CD: u64 = 1 << 30;

/// Control bits whose change reloads the PAE PDPTEs when PAE paging is in use afterwards
/// (SDM 4.4.1).
const PDPTE_RELOAD_CR0: u64 = cr::CR0_PG | CR0_CD | CR0_NW;
const PDPTE_RELOAD_CR4: u64 = cr::CR4_PAE | cr::CR4_PGE | cr::CR4_PSE | cr::CR4_SMEP;

/// Control bits whose change flushes the whole TLB and every paging-structure cache. NXE is
/// here although the SDM does not list it because cached entries carry execute rights
/// computed under the old NXE. CR0.WP, CR4.SMAP, CR4.PKE and RFLAGS.AC are not: no cached
/// entry depends on them (they are applied at access time), and the SDM lets a processor
/// keep its caches across their changes (4.10.4.1).
const FLUSH_CR0: u64 = cr::CR0_PG;
const FLUSH_CR4: u64 =
    cr::CR4_PGE | cr::CR4_PAE | cr::CR4_PSE | cr::CR4_SMEP | cr::CR4_PCIDE | cr::CR4_LA57;
const FLUSH_EFER: u64 = cr::EFER_LMA | cr::EFER_NXE;

/// An exception (or a non-architectural memory failure) raised by an access or a
/// control-register load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuFault {
    /// #PF: `va` is what CR2 now holds.
    PageFault {
        /// The faulting linear address (CR2).
        va: Gva,
        /// The error code pushed.
        code: PfErrorCode,
    },
    /// #GP(0): a non-canonical address, a reserved PDPTE bit at CR3 load, or an invalid
    /// control-register combination.
    GeneralProtection,
    /// A paging structure or the accessed data lies outside machine memory (not
    /// architectural: the simulator decides what the guest sees).
    Memory(MemError),
}

impl CpuFault {
    /// The page-fault error code, if this is a #PF.
    pub fn error_code(&self) -> Option<PfErrorCode> {
        match self {
            CpuFault::PageFault { code, .. } => Some(*code),
            _ => None,
        }
    }
}

impl fmt::Display for CpuFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CpuFault::PageFault { va, code } => write!(f, "#PF at {va} ({code:?})"),
            CpuFault::GeneralProtection => write!(f, "#GP(0)"),
            CpuFault::Memory(e) => write!(f, "machine memory: {e:?}"),
        }
    }
}

impl std::error::Error for CpuFault {}

/// A successful translation by the CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuTranslation {
    /// The machine address of the accessed byte.
    pub addr: Maddr,
    /// The 4 KiB frame holding it.
    pub frame: Mfn,
    /// The size of the page that mapped it.
    pub size: PageSize,
    /// Effective permissions of the mapping.
    pub perms: Perms,
    /// Whether the leaf's D bit is set (as cached, for a TLB hit).
    pub dirty: bool,
    /// Whether the mapping is global.
    pub global: bool,
    /// The mapping's protection key.
    pub pkey: u8,
    /// Whether the TLB supplied it (no memory was touched).
    pub from_tlb: bool,
}

impl CpuTranslation {
    fn from_entry(entry: &TlbEntry, va: Gva) -> CpuTranslation {
        let addr = entry.translate(va);
        CpuTranslation {
            addr,
            frame: addr.mfn(),
            size: entry.size,
            perms: entry.perms,
            dirty: entry.dirty,
            global: entry.global,
            pkey: entry.pkey,
            from_tlb: true,
        }
    }

    fn from_walk(t: &HwTranslation) -> CpuTranslation {
        CpuTranslation {
            addr: t.addr,
            frame: t.addr.mfn(),
            size: t.size,
            perms: t.perms,
            dirty: t.leaf & bits::D != 0,
            global: t.global,
            pkey: t.pkey,
            from_tlb: false,
        }
    }
}

/// Event counts of one vcpu.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CpuStats {
    /// Translations asked for (one per page an access touches).
    pub translations: u64,
    /// Translations the TLB satisfied without a walk.
    pub tlb_hits: u64,
    /// Page walks made.
    pub walks: u64,
    /// Faults raised by translations.
    pub faults: u64,
    /// Successful CR3 loads.
    pub cr3_loads: u64,
    /// INVLPG instructions.
    pub invlpgs: u64,
}

/// One entry of a CPU's translation caches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CachedEntry {
    /// A final translation (the TLB).
    Translation(TlbEntry),
    /// A non-leaf entry (a paging-structure cache).
    Structure(PscEntry),
}

/// One vcpu: hardware control registers, CPU features, a TLB and paging-structure caches.
#[derive(Clone, Debug)]
pub struct Cpu {
    ctl: ControlState,
    feat: CpuFeatures,
    tlb: Tlb,
    psc: PagingStructureCache,
    cr2: Gva,
    stats: CpuStats,
}

impl Cpu {
    /// A vcpu in protected mode with paging disabled and a TLB of the default size.
    pub fn new(feat: CpuFeatures) -> Cpu {
        Cpu::with_tlb(feat, Tlb::default())
    }

    /// A vcpu in protected mode with paging disabled and the given TLB.
    pub fn with_tlb(feat: CpuFeatures, tlb: Tlb) -> Cpu {
        Cpu {
            ctl: ControlState {
                cr0: cr::CR0_PE,
                ..ControlState::default()
            },
            feat: feat.clamped(),
            tlb,
            psc: PagingStructureCache::default(),
            cr2: Gva::new(0),
            stats: CpuStats::default(),
        }
    }

    /// The control registers (CR3 is the root this CPU walks).
    pub fn control(&self) -> &ControlState {
        &self.ctl
    }

    /// The CPU features.
    pub fn features(&self) -> &CpuFeatures {
        &self.feat
    }

    /// The paging mode in use.
    pub fn levels(&self) -> PagingLevels {
        self.ctl.levels()
    }

    /// CR2: the linear address of the last #PF.
    pub fn cr2(&self) -> Gva {
        self.cr2
    }

    /// The TLB.
    pub fn tlb(&self) -> &Tlb {
        &self.tlb
    }

    /// The TLB, for tests and for flushes the engine asks for.
    pub fn tlb_mut(&mut self) -> &mut Tlb {
        &mut self.tlb
    }

    /// The paging-structure caches.
    pub fn psc(&self) -> &PagingStructureCache {
        &self.psc
    }

    /// The paging-structure caches, for tests that plant an entry.
    pub fn psc_mut(&mut self) -> &mut PagingStructureCache {
        &mut self.psc
    }

    /// Turns the paging-structure caches on (the default) or off (dropping their entries):
    /// off, every walk starts at CR3 as in a CPU that caches final translations only.
    pub fn set_psc_enabled(&mut self, enabled: bool) {
        self.psc.set_enabled(enabled);
    }

    /// Every cached translation and paging-structure entry.
    pub fn cached_entries(&self) -> impl Iterator<Item = CachedEntry> + '_ {
        let translations = self.tlb.entries().into_iter().map(CachedEntry::Translation);
        let structures = self.psc.entries().copied().map(CachedEntry::Structure);
        translations.chain(structures)
    }

    /// The event counts so far.
    pub fn stats(&self) -> CpuStats {
        self.stats
    }

    /// Zeroes the event counts (the TLB's and the paging-structure caches' too).
    pub fn reset_stats(&mut self) {
        self.stats = CpuStats::default();
        self.tlb.reset_stats();
        self.psc.reset_stats();
    }

    /// Installs a whole register state at once, as a VMM loading vcpu state does: no
    /// checks, the PDPTEs taken as given, the TLB and paging-structure caches flushed
    /// entirely.
    pub fn set_state(&mut self, ctl: ControlState) {
        self.ctl = ctl;
        self.flush_tlb_all();
    }

    /// MOV to CR3: in PAE mode loads the four PDPTEs (#GP on a reserved bit, nothing
    /// changed); then flushes the TLB, keeping global entries if CR4.PGE=1, and every
    /// paging-structure cache (globals do not apply to them).
    pub fn load_cr3<M>(&mut self, mem: &M, cr3: u64) -> Result<(), CpuFault>
    where
        M: PhysMem<Maddr> + ?Sized,
    {
        match self.ctl.levels() {
            PagingLevels::Three => self.ctl.pdptes = self.read_pdptes(mem, cr3)?,
            PagingLevels::Four if cr3 & self.cr3_reserved_4level() != 0 => {
                return Err(CpuFault::GeneralProtection);
            }
            _ => {}
        }
        self.ctl.cr3 = cr3;
        if self.ctl.pge() {
            self.flush_tlb_non_global();
        } else {
            self.flush_tlb_all();
        }
        self.stats.cr3_loads += 1;
        Ok(())
    }

    /// Writes CR0, CR4 and EFER together. EFER.LMA follows EFER.LME and CR0.PG as hardware
    /// sets it (the LMA bit passed in is ignored). #GP, changing nothing, for CR0.PG without
    /// CR0.PE, long mode without CR4.PAE, or a PDPTE reload that fails. Entering or
    /// reconfiguring PAE paging reloads the PDPTEs; a change to a paging-mode bit flushes
    /// the whole TLB and every paging-structure cache.
    pub fn set_control<M>(&mut self, mem: &M, cr0: u64, cr4: u64, efer: u64) -> Result<(), CpuFault>
    where
        M: PhysMem<Maddr> + ?Sized,
    {
        let paging = cr0 & cr::CR0_PG != 0;
        let long = paging && efer & cr::EFER_LME != 0;
        if (paging && cr0 & cr::CR0_PE == 0) || (long && cr4 & cr::CR4_PAE == 0) {
            return Err(CpuFault::GeneralProtection);
        }
        let efer = if long {
            efer | cr::EFER_LMA
        } else {
            efer & !cr::EFER_LMA
        };
        let mut next = ControlState {
            cr0,
            cr4,
            efer,
            ..self.ctl
        };
        let (d0, d4, de) = (self.ctl.cr0 ^ cr0, self.ctl.cr4 ^ cr4, self.ctl.efer ^ efer);
        let reload = d0 & PDPTE_RELOAD_CR0 != 0 || d4 & PDPTE_RELOAD_CR4 != 0;
        if next.levels() == PagingLevels::Three && reload {
            next.pdptes = self.read_pdptes(mem, next.cr3)?;
        }
        self.ctl = next;
        if d0 & FLUSH_CR0 != 0 || d4 & FLUSH_CR4 != 0 || de & FLUSH_EFER != 0 {
            self.flush_tlb_all();
        }
        Ok(())
    }

    /// MOV to CR0 (see [`Cpu::set_control`]).
    pub fn set_cr0<M>(&mut self, mem: &M, cr0: u64) -> Result<(), CpuFault>
    where
        M: PhysMem<Maddr> + ?Sized,
    {
        self.set_control(mem, cr0, self.ctl.cr4, self.ctl.efer)
    }

    /// MOV to CR4 (see [`Cpu::set_control`]).
    pub fn set_cr4<M>(&mut self, mem: &M, cr4: u64) -> Result<(), CpuFault>
    where
        M: PhysMem<Maddr> + ?Sized,
    {
        self.set_control(mem, self.ctl.cr0, cr4, self.ctl.efer)
    }

    /// WRMSR to IA32_EFER (see [`Cpu::set_control`]).
    pub fn set_efer<M>(&mut self, mem: &M, efer: u64) -> Result<(), CpuFault>
    where
        M: PhysMem<Maddr> + ?Sized,
    {
        self.set_control(mem, self.ctl.cr0, self.ctl.cr4, efer)
    }

    /// Sets RFLAGS (only AC matters to paging; the TLB is not touched).
    pub fn set_rflags(&mut self, rflags: u64) {
        self.ctl.rflags = rflags;
    }

    /// WRPKRU (checked on every access, so the TLB is not touched).
    pub fn set_pkru(&mut self, pkru: u32) {
        self.ctl.pkru = pkru;
    }

    /// INVLPG: drops every TLB entry covering `va` and every paging-structure-cache entry,
    /// whatever address it covers (SDM 4.10.4.1). A non-canonical address is a no-op, as on
    /// hardware.
    pub fn invlpg(&mut self, va: Gva) {
        self.stats.invlpgs += 1;
        let va = match self.ctl.levels() {
            PagingLevels::Four if !va.is_canonical(48) => return,
            PagingLevels::Four => va,
            _ => va.low32(),
        };
        self.tlb.invlpg(va);
        self.psc.flush();
    }

    /// Flushes the whole TLB, global entries too, and every paging-structure cache.
    pub fn flush_tlb_all(&mut self) {
        self.tlb.flush_all();
        self.psc.flush();
    }

    /// Flushes every non-global TLB entry and every paging-structure cache.
    pub fn flush_tlb_non_global(&mut self) {
        self.tlb.flush_non_global();
        self.psc.flush();
    }

    /// Translates `va` for `access` like hardware: a TLB entry that allows the access is
    /// used without touching memory; otherwise the tables are walked in machine memory
    /// (setting A and D) from the deepest paging-structure-cache entry for `va` (from CR3
    /// without one), and the result cached. A fault drops the TLB entries for the page and
    /// the paging-structure-cache entries for `va` and, for #PF, sets CR2.
    pub fn translate<M>(
        &mut self,
        mem: &mut M,
        va: Gva,
        access: Access,
    ) -> Result<CpuTranslation, CpuFault>
    where
        M: PhysMem<Maddr> + ?Sized,
    {
        self.stats.translations += 1;
        let va = match self.ctl.levels() {
            PagingLevels::Zero => return Ok(unpaged(va)),
            PagingLevels::Four if !va.is_canonical(48) => {
                self.stats.faults += 1;
                return Err(CpuFault::GeneralProtection);
            }
            PagingLevels::Four => va,
            _ => va.low32(),
        };
        if let Some(entry) = self.tlb.lookup(va)
            && self.entry_allows(&entry, access)
        {
            self.stats.tlb_hits += 1;
            return Ok(CpuTranslation::from_entry(&entry, va));
        }
        self.walk_and_fill(mem, va, access)
    }

    /// Reads `buf.len()` bytes at `va`. Every page touched is translated before any byte
    /// is read.
    pub fn read_bytes<M>(
        &mut self,
        mem: &mut M,
        va: Gva,
        privilege: Privilege,
        buf: &mut [u8],
    ) -> Result<(), CpuFault>
    where
        M: PhysMem<Maddr> + ?Sized,
    {
        self.load(mem, va, Access::new(AccessKind::Read, privilege), buf)
    }

    /// Fetches `buf.len()` instruction bytes at `va`.
    pub fn fetch<M>(
        &mut self,
        mem: &mut M,
        va: Gva,
        privilege: Privilege,
        buf: &mut [u8],
    ) -> Result<(), CpuFault>
    where
        M: PhysMem<Maddr> + ?Sized,
    {
        self.load(mem, va, Access::new(AccessKind::Fetch, privilege), buf)
    }

    /// Writes `data` at `va`. Every page touched is translated (for a write) before any
    /// byte is written, so a write that faults on its second page writes nothing.
    pub fn write_bytes<M>(
        &mut self,
        mem: &mut M,
        va: Gva,
        privilege: Privilege,
        data: &[u8],
    ) -> Result<(), CpuFault>
    where
        M: PhysMem<Maddr> + ?Sized,
    {
        let access = Access::new(AccessKind::Write, privilege);
        let segments = self.translate_span(mem, va, data.len(), access)?;
        let mut done = 0;
        for (addr, len) in segments {
            copy_to_phys(mem, addr, &data[done..done + len]).map_err(CpuFault::Memory)?;
            done += len;
        }
        Ok(())
    }

    /// Reads the 8-byte value at `va` (which may straddle two pages).
    pub fn read_u64<M>(
        &mut self,
        mem: &mut M,
        va: Gva,
        privilege: Privilege,
    ) -> Result<u64, CpuFault>
    where
        M: PhysMem<Maddr> + ?Sized,
    {
        if va.raw().is_multiple_of(8) {
            let t = self.translate(mem, va, Access::new(AccessKind::Read, privilege))?;
            return mem.read_u64(t.addr).map_err(CpuFault::Memory);
        }
        let mut bytes = [0; 8];
        self.read_bytes(mem, va, privilege, &mut bytes)?;
        Ok(u64::from_le_bytes(bytes))
    }

    /// Reads the 4-byte value at `va` (which may straddle two pages).
    pub fn read_u32<M>(
        &mut self,
        mem: &mut M,
        va: Gva,
        privilege: Privilege,
    ) -> Result<u32, CpuFault>
    where
        M: PhysMem<Maddr> + ?Sized,
    {
        if va.raw().is_multiple_of(4) {
            let t = self.translate(mem, va, Access::new(AccessKind::Read, privilege))?;
            return mem.read_u32(t.addr).map_err(CpuFault::Memory);
        }
        let mut bytes = [0; 4];
        self.read_bytes(mem, va, privilege, &mut bytes)?;
        Ok(u32::from_le_bytes(bytes))
    }

    /// Writes the 8-byte `value` at `va` (which may straddle two pages).
    pub fn write_u64<M>(
        &mut self,
        mem: &mut M,
        va: Gva,
        privilege: Privilege,
        value: u64,
    ) -> Result<(), CpuFault>
    where
        M: PhysMem<Maddr> + ?Sized,
    {
        if va.raw().is_multiple_of(8) {
            let t = self.translate(mem, va, Access::new(AccessKind::Write, privilege))?;
            return mem.write_u64(t.addr, value).map_err(CpuFault::Memory);
        }
        self.write_bytes(mem, va, privilege, &value.to_le_bytes())
    }

    /// Writes the 4-byte `value` at `va` (which may straddle two pages).
    pub fn write_u32<M>(
        &mut self,
        mem: &mut M,
        va: Gva,
        privilege: Privilege,
        value: u32,
    ) -> Result<(), CpuFault>
    where
        M: PhysMem<Maddr> + ?Sized,
    {
        if va.raw().is_multiple_of(4) {
            let t = self.translate(mem, va, Access::new(AccessKind::Write, privilege))?;
            return mem.write_u32(t.addr, value).map_err(CpuFault::Memory);
        }
        self.write_bytes(mem, va, privilege, &value.to_le_bytes())
    }

    fn load<M>(
        &mut self,
        mem: &mut M,
        va: Gva,
        access: Access,
        buf: &mut [u8],
    ) -> Result<(), CpuFault>
    where
        M: PhysMem<Maddr> + ?Sized,
    {
        let segments = self.translate_span(mem, va, buf.len(), access)?;
        let mut done = 0;
        for (addr, len) in segments {
            copy_from_phys(mem, addr, &mut buf[done..done + len]).map_err(CpuFault::Memory)?;
            done += len;
        }
        Ok(())
    }

    /// Translates every page of `va .. va + len`, in order, into (machine address, length)
    /// pieces.
    fn translate_span<M>(
        &mut self,
        mem: &mut M,
        va: Gva,
        len: usize,
        access: Access,
    ) -> Result<Vec<(Maddr, usize)>, CpuFault>
    where
        M: PhysMem<Maddr> + ?Sized,
    {
        let mut segments = Vec::with_capacity(2);
        let mut done = 0;
        while done < len {
            let at = va.wrapping_add(done as u64);
            let n = ((PAGE_SIZE - at.offset()) as usize).min(len - done);
            let t = self.translate(mem, at, access)?;
            segments.push((t.addr, n));
            done += n;
        }
        Ok(segments)
    }

    fn walk_and_fill<M>(
        &mut self,
        mem: &mut M,
        va: Gva,
        access: Access,
    ) -> Result<CpuTranslation, CpuFault>
    where
        M: PhysMem<Maddr> + ?Sized,
    {
        self.stats.walks += 1;
        match walk_cached(mem, &self.ctl, &self.feat, &mut self.psc, va, access) {
            Ok(t) => {
                self.tlb.insert(tlb_entry(va, &t));
                Ok(CpuTranslation::from_walk(&t))
            }
            Err(fault) => {
                // A fault invalidates the page's translations and every paging-structure
                // entry that would translate the address (SDM 4.10.4.1), so that it does
                // not recur from stale caches.
                self.tlb.remove(va);
                self.psc.invalidate(va);
                self.stats.faults += 1;
                Err(self.raise(fault, va))
            }
        }
    }

    fn raise(&mut self, fault: WalkFault, va: Gva) -> CpuFault {
        match fault {
            WalkFault::PageFault(code) => {
                self.cr2 = va;
                CpuFault::PageFault { va, code }
            }
            WalkFault::GeneralProtection => CpuFault::GeneralProtection,
            WalkFault::Memory(e) => CpuFault::Memory(e),
            // The simulated CPU is the only writer of the tables it walks, so its walk never
            // loses a race; should it, the access could not be done atomically.
            WalkFault::Contended => CpuFault::Memory(MemError::NotAtomic { addr: va.raw() }),
        }
    }

    /// Whether a cached entry may serve `access` under the current control state. A write
    /// through a clean entry may not: only a walk sets D.
    fn entry_allows(&self, entry: &TlbEntry, access: Access) -> bool {
        if access.is_write() && !entry.dirty {
            return false;
        }
        let pkeys = self.ctl.levels() == PagingLevels::Four && self.ctl.pke();
        rights_allow(access, entry.perms, &self.ctl)
            && !(pkeys && pkey_denies(access, entry.perms, entry.pkey, &self.ctl))
    }

    fn read_pdptes<M>(&self, mem: &M, cr3: u64) -> Result<[u64; 4], CpuFault>
    where
        M: PhysMem<Maddr> + ?Sized,
    {
        load_pae_pdptes::<Maddr, M>(mem, cr3, &self.feat).map_err(|e| match e {
            PdptLoadError::ReservedBits { .. } => CpuFault::GeneralProtection,
            PdptLoadError::Memory(e) => CpuFault::Memory(e),
        })
    }

    /// CR3 bits that make MOV to CR3 #GP in 4-level paging without PCIDs: address bits
    /// beyond MAXPHYADDR and bits 63:52.
    fn cr3_reserved_4level(&self) -> u64 {
        self.feat.above_maxphyaddr_mask() | (0xfffu64 << 52)
    }
}

/// The identity translation of paging disabled (32-bit linear addresses).
fn unpaged(va: Gva) -> CpuTranslation {
    let addr = Maddr::new(va.low32().raw());
    CpuTranslation {
        addr,
        frame: addr.mfn(),
        size: PageSize::Size4K,
        perms: Perms::ALL,
        dirty: true,
        global: false,
        pkey: 0,
        from_tlb: false,
    }
}

/// The TLB entry a successful walk of `va` leaves.
fn tlb_entry(va: Gva, t: &HwTranslation) -> TlbEntry {
    let page_offset = va.raw() & (t.size.bytes() - 1);
    TlbEntry {
        va,
        frame: Maddr::new(t.addr.raw() - page_offset).mfn(),
        size: t.size,
        perms: t.perms,
        dirty: t.leaf & bits::D != 0,
        global: t.global,
        pkey: t.pkey,
    }
}

/// SDM 4.6 access rights for cached permissions under the current CR0.WP, CR4.SMEP/SMAP and
/// RFLAGS.AC. The walker applies the same rules during a walk; a TLB hit must apply them
/// again because those controls are read at access time, not cached.
fn rights_allow(access: Access, perms: Perms, ctl: &ControlState) -> bool {
    match access.privilege {
        Privilege::User => match access.kind {
            AccessKind::Read => perms.user,
            AccessKind::Write => perms.user && perms.write,
            AccessKind::Fetch => perms.user && perms.exec,
        },
        Privilege::Supervisor | Privilege::Implicit => {
            let smap_blocks =
                ctl.smap() && perms.user && (access.privilege == Privilege::Implicit || !ctl.ac());
            match access.kind {
                AccessKind::Read => !smap_blocks,
                AccessKind::Write => !smap_blocks && (perms.write || !ctl.wp()),
                AccessKind::Fetch => perms.exec && !(ctl.smep() && perms.user),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::SparseMemory;

    const PRESENT_RW_US: u64 = bits::P | bits::RW | bits::US;

    /// A 4-level CPU with one 4 KiB page: va 0x40_0000 -> machine frame 0x80.
    fn four_level() -> (Cpu, SparseMemory) {
        let mut mem = SparseMemory::new(256);
        let (l4, l3, l2, l1) = (0x1000u64, 0x2000u64, 0x3000u64, 0x4000u64);
        mem.write_u64(Maddr::new(l4), l3 | PRESENT_RW_US).unwrap();
        mem.write_u64(Maddr::new(l3), l2 | PRESENT_RW_US).unwrap();
        mem.write_u64(Maddr::new(l2 + 2 * 8), l1 | PRESENT_RW_US)
            .unwrap();
        mem.write_u64(Maddr::new(l1), 0x80_000 | PRESENT_RW_US)
            .unwrap();
        let mut cpu = Cpu::new(CpuFeatures::KVM_HOST);
        cpu.load_cr3(&mem, l4).unwrap();
        let cr0 = cr::CR0_PE | cr::CR0_PG | cr::CR0_WP;
        cpu.set_control(&mem, cr0, cr::CR4_PAE, cr::EFER_LME | cr::EFER_NXE)
            .unwrap();
        (cpu, mem)
    }

    fn read() -> Access {
        Access::new(AccessKind::Read, Privilege::Supervisor)
    }

    #[test]
    fn long_mode_is_derived_from_lme_and_pg() {
        let (cpu, _) = four_level();
        assert_eq!(cpu.levels(), PagingLevels::Four);
        assert!(cpu.control().efer & cr::EFER_LMA != 0);
    }

    #[test]
    fn invalid_control_combinations_raise_gp_and_change_nothing() {
        let (mut cpu, mem) = four_level();
        let before = *cpu.control();
        let cr0 = cpu.control().cr0;
        assert_eq!(cpu.set_cr4(&mem, 0), Err(CpuFault::GeneralProtection));
        assert_eq!(
            cpu.set_cr0(&mem, cr0 & !cr::CR0_PE),
            Err(CpuFault::GeneralProtection)
        );
        assert_eq!(*cpu.control(), before);
    }

    #[test]
    fn a_hit_touches_no_memory_and_a_miss_walks() {
        let (mut cpu, mut mem) = four_level();
        let va = Gva::new(0x40_0123);
        let first = cpu.translate(&mut mem, va, read()).unwrap();
        assert_eq!(first.addr, Maddr::new(0x80_123));
        assert!(!first.from_tlb);
        let second = cpu.translate(&mut mem, va, read()).unwrap();
        assert!(second.from_tlb);
        let s = cpu.stats();
        assert_eq!((s.translations, s.walks, s.tlb_hits), (2, 1, 1));
    }

    #[test]
    fn non_canonical_addresses_raise_gp_without_a_walk() {
        let (mut cpu, mut mem) = four_level();
        let r = cpu.translate(&mut mem, Gva::new(0x8000_0000_0000), read());
        assert_eq!(r, Err(CpuFault::GeneralProtection));
        assert_eq!(cpu.stats().walks, 0);
    }

    #[test]
    fn cached_rights_are_rechecked_against_live_controls() {
        let (mut cpu, mut mem) = four_level();
        let va = Gva::new(0x40_0000);
        cpu.translate(&mut mem, va, read()).unwrap();
        // SMAP is not a paging-mode bit: no flush, but the hit must honour it.
        let cr4 = cpu.control().cr4 | cr::CR4_SMAP;
        cpu.set_cr4(&mem, cr4).unwrap();
        assert!(cpu.tlb().peek(va).is_some());
        let r = cpu.translate(&mut mem, va, read());
        assert!(matches!(r, Err(CpuFault::PageFault { .. })));
        cpu.set_rflags(cr::RFLAGS_AC);
        assert!(cpu.translate(&mut mem, va, read()).is_ok());
    }

    #[test]
    fn rights_match_the_sdm_table() {
        let ctl = ControlState {
            cr0: cr::CR0_WP,
            ..ControlState::default()
        };
        let ro_user = Perms {
            write: false,
            user: true,
            exec: true,
        };
        let w = |p| Access::new(AccessKind::Write, p);
        assert!(!rights_allow(w(Privilege::Supervisor), ro_user, &ctl));
        assert!(rights_allow(
            w(Privilege::Supervisor),
            ro_user,
            &ControlState::default()
        ));
        assert!(!rights_allow(
            w(Privilege::User),
            ro_user,
            &ControlState::default()
        ));
    }
}

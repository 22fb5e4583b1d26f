//! The architectural page walker (Intel SDM vol. 3A, 4.5-4.7), written once for every mode.
//!
//! Given control state, an access and a physical-memory view, a walk returns the
//! translation or the fault the CPU would raise, and sets the accessed and dirty bits the
//! CPU would set: A on every entry a successful walk used, D on the leaf of a successful
//! write, nothing at all for a faulting access.

use super::bits;
use super::control::{
    Access, AccessKind, ControlState, CpuFeatures, PagingLevels, PfErrorCode, Privilege,
};
use super::memory::{Exchange, MemError, PhysMem};
use super::mode::{FourLevel, NoPaging, PageSize, PagingMode, ThreeLevel, TwoLevel};
use crate::addr::{Gva, PhysAddr};

/// One paging-structure entry a walk read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PathEntry<A: PhysAddr> {
    /// The level of the table holding the entry (1 = leaf table).
    pub level: u8,
    /// Where the entry sits. For PAE PDPTEs, where it was loaded from at CR3 load.
    pub addr: A,
    /// The entry as the walk read it (before any A/D update).
    pub value: u64,
}

/// The entries a walk read, top level first.
#[derive(Clone, Copy, Debug)]
pub struct WalkPath<A: PhysAddr> {
    // Plain entries plus a length (not `Option`s) keep walk results small: they travel by
    // value in every `Result` a walk returns.
    entries: [PathEntry<A>; 4],
    len: u8,
}

impl<A: PhysAddr> Default for WalkPath<A> {
    fn default() -> Self {
        let unused = PathEntry {
            level: 0,
            addr: A::from_raw(0),
            value: 0,
        };
        WalkPath {
            entries: [unused; 4],
            len: 0,
        }
    }
}

impl<A: PhysAddr> PartialEq for WalkPath<A> {
    fn eq(&self, other: &Self) -> bool {
        self.iter().eq(other.iter())
    }
}

impl<A: PhysAddr> Eq for WalkPath<A> {}

impl<A: PhysAddr> WalkPath<A> {
    fn push(&mut self, entry: PathEntry<A>) {
        if let Some(slot) = self.entries.get_mut(usize::from(self.len)) {
            *slot = entry;
            self.len += 1;
        }
    }
    /// The number of entries read.
    pub fn len(&self) -> usize {
        usize::from(self.len)
    }
    /// Whether no entry was read (paging disabled, or a fault before the first read).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The entries, top level first.
    pub fn iter(&self) -> impl Iterator<Item = &PathEntry<A>> + '_ {
        self.entries.iter().take(self.len())
    }
    /// The entry read at `level`, if the walk got there.
    pub fn at_level(&self, level: u8) -> Option<&PathEntry<A>> {
        self.iter().find(|e| e.level == level)
    }
    /// The last entry read.
    pub fn last(&self) -> Option<&PathEntry<A>> {
        self.len().checked_sub(1).and_then(|i| self.entries.get(i))
    }
}

/// Effective permissions of a translation: the combination over every level (SDM 4.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Perms {
    /// R/W set at every level.
    pub write: bool,
    /// U/S set at every level (a user-mode page).
    pub user: bool,
    /// XD clear at every level (or NX not enabled).
    pub exec: bool,
}

impl Perms {
    /// Everything allowed (paging disabled).
    pub const ALL: Perms = Perms {
        write: true,
        user: true,
        exec: true,
    };
}

/// A successful translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation<A: PhysAddr> {
    /// The physical address of the accessed byte.
    pub addr: A,
    /// The 4 KiB frame holding it.
    pub frame: A::Frame,
    /// The size of the page mapped.
    pub size: PageSize,
    /// The level of the leaf entry (1 for 4 KiB pages; 0 with paging disabled).
    pub leaf_level: u8,
    /// The leaf entry after the walk's A/D update.
    pub leaf: u64,
    /// Effective permissions.
    pub perms: Perms,
    /// Whether the leaf is global (G set and CR4.PGE=1).
    pub global: bool,
    /// The leaf's protection key (0 unless 4-level paging with CR4.PKE).
    pub pkey: u8,
    /// The entries read, top level first.
    pub path: WalkPath<A>,
}

/// Why a walk failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkFault {
    /// #PF with this error code.
    PageFault(PfErrorCode),
    /// #GP(0): a non-canonical address in 4-level mode.
    GeneralProtection,
    /// A paging structure lies where the memory view has nothing (not architectural: the
    /// caller decides what the guest sees).
    Memory(MemError),
    /// Another agent (a vcpu running on another thread) kept changing the entries the walk
    /// read before their A/D bits could be set, through [`MAX_RACED_WALKS`] walks: no stale
    /// value was written, and the access is to be retried (a fault answers `Spurious`).
    Contended,
}

/// How many times a walk is redone when an entry it read changed before its A/D update (as
/// the CPU, whose locked A/D update finds the entry changed, walks again).
pub const MAX_RACED_WALKS: usize = 8;

/// How many compare-exchanges one A/D update tries while only the entry's own A/D bits
/// change under it (another agent setting or clearing them).
const MAX_AD_EXCHANGES: usize = 8;

/// A failed walk: the fault, and the entries read before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalkFailure<A: PhysAddr> {
    /// The fault.
    pub fault: WalkFault,
    /// The entries read, top level first; the last one is the faulting entry for #PF.
    pub path: WalkPath<A>,
}

impl<A: PhysAddr> WalkFailure<A> {
    /// The page-fault error code, if the failure is a #PF.
    pub fn error_code(&self) -> Option<PfErrorCode> {
        match self.fault {
            WalkFault::PageFault(ec) => Some(ec),
            _ => None,
        }
    }
}

/// The result of a walk.
pub type WalkResult<A> = Result<Translation<A>, WalkFailure<A>>;

/// Whether a walk writes the accessed and dirty bits the CPU would write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AdUpdate {
    /// Set A and D as the CPU does.
    Set,
    /// Leave memory untouched (an inspection walk).
    Skip,
}

/// Everything a walk depends on besides memory and the address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalkEnv<'a> {
    /// Control registers.
    pub ctl: &'a ControlState,
    /// CPU features.
    pub feat: &'a CpuFeatures,
    /// Whether A/D bits are written.
    pub ad: AdUpdate,
}

/// Walks the tables selected by `ctl` for `access` at `va`.
pub fn walk<A, M>(mem: &mut M, env: WalkEnv<'_>, va: Gva, access: Access) -> WalkResult<A>
where
    A: PhysAddr,
    M: PhysMem<A> + ?Sized,
{
    match env.ctl.levels() {
        PagingLevels::Zero => walk_mode::<NoPaging, A, M>(mem, env, va, access),
        PagingLevels::Two => walk_mode::<TwoLevel, A, M>(mem, env, va, access),
        PagingLevels::Three => walk_mode::<ThreeLevel, A, M>(mem, env, va, access),
        PagingLevels::Four => walk_mode::<FourLevel, A, M>(mem, env, va, access),
    }
}

/// Walks the tables of mode `P`, whatever `ctl` says about the mode. A walk whose A/D
/// update finds an entry changed since it read it is redone, up to [`MAX_RACED_WALKS`] times.
pub fn walk_mode<P, A, M>(mem: &mut M, env: WalkEnv<'_>, va: Gva, access: Access) -> WalkResult<A>
where
    P: PagingMode,
    A: PhysAddr,
    M: PhysMem<A> + ?Sized,
{
    let mut walks = 1;
    loop {
        match walk_once::<P, A, M>(mem, env, va, access) {
            Err(failure) if failure.fault == WalkFault::Contended && walks < MAX_RACED_WALKS => {
                walks += 1;
            }
            result => return result,
        }
    }
}

/// One walk; [`WalkFault::Contended`] if an entry changed between its read and its A/D
/// update.
fn walk_once<P, A, M>(mem: &mut M, env: WalkEnv<'_>, va: Gva, access: Access) -> WalkResult<A>
where
    P: PagingMode,
    A: PhysAddr,
    M: PhysMem<A> + ?Sized,
{
    let WalkEnv { ctl, feat, ad } = env;
    let mut path = WalkPath::default();
    if P::NUM_LEVELS == 0 {
        let addr = A::from_raw(va.low32().raw());
        return Ok(Translation {
            addr,
            frame: addr.frame(),
            size: PageSize::Size4K,
            leaf_level: 0,
            leaf: 0,
            perms: Perms::ALL,
            global: false,
            pkey: 0,
            path,
        });
    }
    // 32-bit and PAE paging translate the low 32 bits of any address; only the wider
    // linear addresses of 4-level paging can be non-canonical.
    let va = if P::VA_BITS == 32 { va.low32() } else { va };
    if P::VA_BITS > 32 && !va.is_canonical(P::VA_BITS) {
        return Err(WalkFailure {
            fault: WalkFault::GeneralProtection,
            path,
        });
    }
    let access_bits = PfErrorCode::for_access_in(access, ctl, P::LEVELS);
    let fault = |bits: u32, path: WalkPath<A>| WalkFailure {
        fault: WalkFault::PageFault(PfErrorCode(access_bits.bits() | bits)),
        path,
    };
    let memory = |e: MemError, path: WalkPath<A>| WalkFailure {
        fault: WalkFault::Memory(e),
        path,
    };

    let nx_enabled = ctl.nxe() && P::ENTRY_BYTES == 8;
    let mut table = P::root_table(ctl.cr3);
    let mut perms = Perms::ALL;
    let mut level = P::NUM_LEVELS;
    let (leaf, leaf_level) = loop {
        let index = P::index(va.raw(), level) as u64;
        let addr = A::from_raw(table.wrapping_add(index * P::ENTRY_BYTES));
        let is_pdpte = P::LEVELS == PagingLevels::Three && level == 3;
        let entry = if is_pdpte {
            ctl.pdptes.get(index as usize).copied().unwrap_or(0)
        } else {
            match mem.read_entry(addr, P::ENTRY_BYTES) {
                Ok(v) => v,
                Err(e) => return Err(memory(e, path)),
            }
        };
        path.push(PathEntry {
            level,
            addr,
            value: entry,
        });
        if entry & bits::P == 0 {
            return Err(fault(0, path));
        }
        let is_leaf = level == 1 || (entry & bits::PS != 0 && P::superpage_level(level, ctl, feat));
        if P::reserved_bits(entry, level, is_leaf, ctl, feat) != 0 {
            return Err(fault(PfErrorCode::P | PfErrorCode::RSVD, path));
        }
        if !is_pdpte {
            perms.write &= entry & bits::RW != 0;
            perms.user &= entry & bits::US != 0;
            perms.exec &= !(nx_enabled && entry & bits::NX != 0);
        }
        if is_leaf {
            break (entry, level);
        }
        table = P::entry_address(entry, level, false);
        level -= 1;
    };

    let pkey = if P::LEVELS == PagingLevels::Four && ctl.pke() {
        ((leaf & bits::PKEY_MASK) >> bits::PKEY_SHIFT) as u8
    } else {
        0
    };
    // PK describes the protection key alone (SDM 4.7): it is reported together with any
    // other protection violation of the same access, not only when the key is the sole cause.
    let pkey_fault =
        P::LEVELS == PagingLevels::Four && ctl.pke() && pkey_denies(access, perms, pkey, ctl);
    let pkey_bits = if pkey_fault {
        PfErrorCode::P | PfErrorCode::PK
    } else {
        0
    };
    match protection_fault(access, perms, ctl) {
        Some(bits) => return Err(fault(bits | pkey_bits, path)),
        None if pkey_fault => return Err(fault(pkey_bits, path)),
        None => {}
    }

    let mut leaf = leaf;
    if ad == AdUpdate::Set {
        for entry in path.iter() {
            if P::LEVELS == PagingLevels::Three && entry.level == 3 {
                continue;
            }
            let mut set = bits::A;
            if entry.level == leaf_level && access.is_write() {
                set |= bits::D;
            }
            match set_bits(mem, entry, P::ENTRY_BYTES, set) {
                Ok(Some(v)) if entry.level == leaf_level => leaf = v,
                Ok(Some(_)) => {}
                Ok(None) => {
                    return Err(WalkFailure {
                        fault: WalkFault::Contended,
                        path,
                    });
                }
                Err(e) => return Err(memory(e, path)),
            }
        }
    }

    let size = if leaf_level == 1 {
        PageSize::Size4K
    } else {
        P::superpage_size(leaf_level)
    };
    let base = P::entry_address(leaf, leaf_level, true);
    let addr = A::from_raw(base | (va.raw() & (size.bytes() - 1)));
    Ok(Translation {
        addr,
        frame: addr.frame(),
        size,
        leaf_level,
        leaf,
        perms,
        global: ctl.pge() && leaf & bits::G != 0,
        pkey,
        path,
    })
}

/// The extra error-code bits (always including P) if `perms` forbid `access`, per SDM 4.6.
pub fn protection_fault(access: Access, perms: Perms, ctl: &ControlState) -> Option<u32> {
    let denied = match access.privilege {
        Privilege::User => {
            !perms.user
                || (access.kind == AccessKind::Write && !perms.write)
                || (access.kind == AccessKind::Fetch && !perms.exec)
        }
        Privilege::Supervisor | Privilege::Implicit => {
            let smap_blocks =
                ctl.smap() && perms.user && (access.privilege == Privilege::Implicit || !ctl.ac());
            match access.kind {
                AccessKind::Read => smap_blocks,
                AccessKind::Write => smap_blocks || (ctl.wp() && !perms.write),
                AccessKind::Fetch => !perms.exec || (ctl.smep() && perms.user),
            }
        }
    };
    denied.then_some(PfErrorCode::P)
}

/// Whether PKRU forbids this data access to a user-mode page (SDM 4.6.2).
fn pkey_denies(access: Access, perms: Perms, pkey: u8, ctl: &ControlState) -> bool {
    if access.is_fetch() || !perms.user {
        return false;
    }
    let access_disable = ctl.pkru >> (2 * u32::from(pkey)) & 1 != 0;
    let write_disable = ctl.pkru >> (2 * u32::from(pkey) + 1) & 1 != 0;
    access_disable || (access.is_write() && write_disable && (access.is_user() || ctl.wp()))
}

/// ORs `set` into the entry the walk read as `seen`, with a compare-exchange as the CPU's
/// locked A/D update, and returns the new value; `None` if the entry changed (beyond its
/// A/D bits) since the walk read it, or kept changing: the walk is then redone, and nothing
/// stale was written. Re-reading here (rather than exchanging from the value the walk read)
/// keeps self-referencing tables right: an earlier update in the same walk may have set
/// A/D in it.
fn set_bits<A, M>(
    mem: &mut M,
    seen: &PathEntry<A>,
    bytes: u64,
    set: u64,
) -> Result<Option<u64>, MemError>
where
    A: PhysAddr,
    M: PhysMem<A> + ?Sized,
{
    let ad = bits::A | bits::D;
    let mut current = mem.read_entry(seen.addr, bytes)?;
    for _ in 0..MAX_AD_EXCHANGES {
        if current & !ad != seen.value & !ad {
            return Ok(None);
        }
        let new = current | set;
        if new == current {
            return Ok(Some(current));
        }
        match mem.compare_exchange_entry(seen.addr, bytes, current, new)? {
            Exchange::Swapped => return Ok(Some(new)),
            Exchange::Lost { actual } => current = actual,
        }
    }
    Ok(None)
}

/// Why loading CR3 in PAE mode fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PdptLoadError {
    /// A present PDPTE has reserved bits set: MOV to CR3 raises #GP(0).
    ReservedBits {
        /// Which PDPTE (0..4).
        index: usize,
    },
    /// The PDPT is not backed by memory.
    Memory(MemError),
}

/// Loads the four PAE PDPTEs named by `cr3`, as MOV to CR3 (or enabling PAE paging) does
/// (SDM 4.4.1): a present entry with a reserved bit set makes the load fail with #GP.
pub fn load_pae_pdptes<A, M>(
    mem: &M,
    cr3: u64,
    feat: &CpuFeatures,
) -> Result<[u64; 4], PdptLoadError>
where
    A: PhysAddr,
    M: PhysMem<A> + ?Sized,
{
    let base = ThreeLevel::root_table(cr3);
    let mut pdptes = [0u64; 4];
    for (index, slot) in pdptes.iter_mut().enumerate() {
        let addr = A::from_raw(base + 8 * index as u64);
        let entry = mem.read_u64(addr).map_err(PdptLoadError::Memory)?;
        if entry & bits::P != 0 && ThreeLevel::pdpte_reserved_bits(entry, feat) != 0 {
            return Err(PdptLoadError::ReservedBits { index });
        }
        *slot = entry;
    }
    Ok(pdptes)
}

//! The p2m: the guest-physical -> machine map of a domain, kept *in page-table format*
//! (seed slide "p2m in page table format").
//!
//! The map is stored as real page tables in machine memory, in the format of the domain's
//! *shadow* (host) paging mode, chosen at creation:
//!
//! | format  | tables                                   | entries | guest frames | machine frames |
//! | ------- | ---------------------------------------- | ------- | ------------ | -------------- |
//! | 2-level | L2, L1 of 1024 entries                   | 4 bytes | < 2^20       | < 2^20         |
//! | PAE     | 4-entry PDPT at offset 0 of the root frame, then L2, L1 of 512 | 8 bytes | < 2^20 | < 2^40 |
//! | 4-level | L4, L3, L2, L1 of 512 entries            | 8 bytes | < 2^36       | < 2^40         |
//!
//! A guest that runs with paging disabled ("0-level") runs with the p2m itself installed as
//! its shadow root: linear address = guest-physical address, so `gfn << 12` translates to
//! `mfn << 12` through the p2m's tables. The root is therefore a valid hardware page-table
//! root of its mode (for 2-level and PAE it lies below 4 GiB, as a 32-bit CR3 requires):
//!
//! - a non-leaf entry is `P|RW|US|A` and the table's frame; a PAE PDPTE is `P` and the frame
//!   (bits 1, 2 and 5..8 are reserved there);
//! - a RAM leaf is `P|US|A|D`, plus `RW` when the mapping is writable, the frame, and the
//!   [`P2mType`] in the available bits 11:9;
//! - an MMIO leaf is *not present* (P=0): only its type, its `RW` bit and its frame are
//!   stored, so that a paging-disabled guest's access to it faults to the hypervisor;
//! - no superpages, no PWT/PCD/PAT (write-back), no G, no NX.
//!
//! A and D are preset, so a CPU walking the p2m never writes to it. For the permissions to
//! hold, the hypervisor runs a paging-disabled guest with CR0.WP=1 (or a supervisor write
//! would ignore a clear RW) and with CR4.SMEP and CR4.SMAP clear (every entry is a user
//! entry).
//!
//! The tables in machine memory are the authoritative copy: [`P2m::lookup`] walks them with
//! direct index arithmetic and no allocation. The [`P2m`] value itself only remembers which
//! frames are its tables and how many guest frames are mapped.
//!
//! Intermediate tables are allocated from the host on demand and are never freed while the
//! p2m lives, only by [`P2m::teardown_step`]: freeing one while a vcpu runs on the p2m would
//! leave it in that CPU's paging-structure caches until a flush, while the host could
//! already have reused the frame. This is also what Xen does.

mod cache;
#[cfg(test)]
mod tests;

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;
use core::fmt;

use crate::addr::{Gfn, Maddr, Mfn, PAGE_SHIFT};
use crate::host::MachineMemory;
use crate::paging::bits;
use crate::paging::{MemError, PagingLevels, PhysMem};
use cache::LookupCache;

/// Flags of a non-leaf entry (a PAE PDPTE excepted).
const TABLE_FLAGS: u64 = bits::P | bits::RW | bits::US | bits::A;
/// Flags of a PAE PDPTE: only P (bits 1, 2 and 5..8 are reserved).
const PDPTE_FLAGS: u64 = bits::P;
/// Flags of a present (RAM) leaf, RW apart.
const RAM_FLAGS: u64 = bits::P | bits::US | bits::A | bits::D;
/// First bit of the type field (the available bits 11:9).
const TYPE_SHIFT: u32 = 9;

/// What kind of guest-physical memory a p2m entry describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum P2mType {
    /// Ordinary RAM: stored present, so a paging-disabled guest accesses it directly.
    Ram,
    /// Emulated MMIO: stored not present, so that every access by a paging-disabled guest
    /// faults to the hypervisor. The frame is stored but never mapped: it is opaque to the
    /// p2m and may be any representable frame.
    Mmio,
}

impl P2mType {
    /// The type code stored in bits 11:9 of an entry (never 0, so that no nonzero entry
    /// with a zero type is valid).
    const fn code(self) -> u64 {
        match self {
            P2mType::Ram => 1,
            P2mType::Mmio => 2,
        }
    }

    const fn from_code(code: u64) -> Option<P2mType> {
        match code {
            1 => Some(P2mType::Ram),
            2 => Some(P2mType::Mmio),
            _ => None,
        }
    }

    /// Whether entries of this type are present in the hardware sense (a paging-disabled
    /// guest reaches the frame without a fault).
    pub const fn is_present(self) -> bool {
        matches!(self, P2mType::Ram)
    }
}

/// One mapping of the p2m.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct P2mEntry {
    /// The machine frame.
    pub mfn: Mfn,
    /// The kind of memory.
    pub ty: P2mType,
    /// Whether a paging-disabled guest may write the frame through the p2m (RW in the
    /// leaf). Cleared by the engine for frames that are shadowed guest page tables, or clean
    /// in log-dirty mode.
    pub writable: bool,
}

impl P2mEntry {
    /// A writable mapping of `mfn` with type `ty`.
    pub const fn new(mfn: Mfn, ty: P2mType) -> P2mEntry {
        P2mEntry {
            mfn,
            ty,
            writable: true,
        }
    }

    /// A writable RAM mapping of `mfn`.
    pub const fn ram(mfn: Mfn) -> P2mEntry {
        P2mEntry::new(mfn, P2mType::Ram)
    }

    /// This entry with `writable` set as given.
    pub const fn with_writable(self, writable: bool) -> P2mEntry {
        P2mEntry { writable, ..self }
    }
}

/// What went wrong in a p2m operation. No p2m operation panics; an operation that fails
/// leaves the p2m unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum P2mError {
    /// The p2m needs a paging mode with tables (2-level, PAE or 4-level).
    UnsupportedLevels {
        /// The mode asked for.
        levels: PagingLevels,
    },
    /// The guest frame lies beyond what the format covers ([`P2m::max_gfn`]).
    GfnOutOfRange {
        /// The frame given.
        gfn: Gfn,
    },
    /// The machine frame does not fit in an entry of the format ([`P2m::max_mfn`]).
    MfnUnrepresentable {
        /// The frame given.
        mfn: Mfn,
    },
    /// A RAM mapping would make a p2m table frame reachable by the guest.
    MfnIsTable {
        /// The frame given.
        mfn: Mfn,
    },
    /// The guest frame has no mapping (for operations that change an existing mapping).
    NotMapped {
        /// The frame given.
        gfn: Gfn,
    },
    /// The host has no frame for a table.
    OutOfHostMemory,
    /// The host handed out a frame the format cannot use as a table (above 4 GiB for a
    /// 2-level table or a PAE root), or one the p2m already owns (a host bug). A frame that
    /// is not the p2m's is given back.
    BadHostFrame {
        /// The frame the host returned.
        mfn: Mfn,
    },
    /// Teardown has started: the p2m can no longer be used.
    TornDown,
    /// Machine memory refused an access to a p2m table.
    Memory(MemError),
    /// A table holds an entry the p2m never writes.
    MalformedEntry {
        /// The table.
        table: Mfn,
        /// The entry's index in the table.
        index: usize,
        /// The entry.
        entry: u64,
    },
    /// [`P2m::check`] found the tables and the bookkeeping disagreeing.
    Inconsistent {
        /// Which invariant failed.
        what: &'static str,
        /// The frame where it failed.
        mfn: Mfn,
    },
}

impl fmt::Display for P2mError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            P2mError::UnsupportedLevels { levels } => {
                write!(f, "a p2m cannot have the format of {levels:?} paging")
            }
            P2mError::GfnOutOfRange { gfn } => {
                write!(f, "guest frame {gfn} is beyond what the p2m covers")
            }
            P2mError::MfnUnrepresentable { mfn } => {
                write!(f, "machine frame {mfn} does not fit in a p2m entry")
            }
            P2mError::MfnIsTable { mfn } => {
                write!(
                    f,
                    "machine frame {mfn} is a p2m table and cannot be mapped as RAM"
                )
            }
            P2mError::NotMapped { gfn } => write!(f, "guest frame {gfn} is not mapped"),
            P2mError::OutOfHostMemory => write!(f, "host out of memory for a p2m table"),
            P2mError::BadHostFrame { mfn } => {
                write!(f, "host returned frame {mfn}, unusable as a p2m table")
            }
            P2mError::TornDown => write!(f, "the p2m is being torn down"),
            P2mError::Memory(e) => write!(f, "p2m table access failed: {e:?}"),
            P2mError::MalformedEntry {
                table,
                index,
                entry,
            } => write!(
                f,
                "p2m table {table} entry {index} is malformed: {entry:#x}"
            ),
            P2mError::Inconsistent { what, mfn } => {
                write!(f, "p2m inconsistent at {mfn}: {what}")
            }
        }
    }
}

impl core::error::Error for P2mError {}

impl From<MemError> for P2mError {
    fn from(e: MemError) -> Self {
        P2mError::Memory(e)
    }
}

/// The shape of one table format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Format {
    /// Levels of tables: 2, 3 or 4.
    levels: u8,
    /// Bytes per entry: 4 or 8.
    entry_bytes: u64,
    /// Guest-frame bits each level indexes: 10 or 9.
    index_bits: u32,
    /// Guest frames covered: `gfn < 2^gfn_bits`.
    gfn_bits: u32,
    /// Machine frames an entry can hold: `mfn < 2^mfn_bits`.
    mfn_bits: u32,
    /// Machine frames the root may be in (a 32-bit CR3 for 2-level and PAE).
    root_mfn_bits: u32,
    /// Whether the top level is a PAE PDPT.
    pae: bool,
}

impl Format {
    const TWO: Format = Format {
        levels: 2,
        entry_bytes: 4,
        index_bits: 10,
        gfn_bits: 20,
        mfn_bits: 20,
        root_mfn_bits: 20,
        pae: false,
    };
    const PAE: Format = Format {
        levels: 3,
        entry_bytes: 8,
        index_bits: 9,
        gfn_bits: 20,
        mfn_bits: 40,
        root_mfn_bits: 20,
        pae: true,
    };
    const FOUR: Format = Format {
        levels: 4,
        entry_bytes: 8,
        index_bits: 9,
        gfn_bits: 36,
        mfn_bits: 40,
        root_mfn_bits: 40,
        pae: false,
    };

    const fn for_levels(levels: PagingLevels) -> Option<Format> {
        match levels {
            PagingLevels::Zero => None,
            PagingLevels::Two => Some(Format::TWO),
            PagingLevels::Three => Some(Format::PAE),
            PagingLevels::Four => Some(Format::FOUR),
        }
    }

    /// Exclusive bound of the guest frames covered.
    const fn max_gfn(self) -> u64 {
        1 << self.gfn_bits
    }

    /// Exclusive bound of the machine frames an entry can hold.
    const fn max_mfn(self) -> u64 {
        1 << self.mfn_bits
    }

    /// Whether `mfn` can be a table at `level`.
    const fn table_frame_ok(self, mfn: Mfn, level: u8) -> bool {
        let width = if level == self.levels {
            self.root_mfn_bits
        } else {
            self.mfn_bits
        };
        mfn.raw() >> width == 0
    }

    /// The index of `gfn` in its level-`level` table.
    #[inline]
    const fn index(self, gfn: u64, level: u8) -> u64 {
        (gfn >> (self.index_bits * (level as u32 - 1))) & ((1 << self.index_bits) - 1)
    }

    /// Guest frames covered by one entry at `level`.
    #[inline]
    const fn span(self, level: u8) -> u64 {
        1 << (self.index_bits * (level as u32 - 1))
    }

    /// Entries in a table at `level`.
    const fn entries(self, level: u8) -> u64 {
        if self.pae && level == self.levels {
            4
        } else {
            1 << self.index_bits
        }
    }

    /// The address of entry `index` of `table`.
    #[inline]
    const fn entry_addr(self, table: Mfn, index: u64) -> Maddr {
        Maddr::new(table.base().raw() + index * self.entry_bytes)
    }

    const fn addr_mask(self) -> u64 {
        if self.entry_bytes == 4 {
            bits::ADDR_MASK_4
        } else {
            bits::ADDR_MASK_8
        }
    }

    /// The entry at `level` (above 1) pointing at table `child`.
    #[inline]
    const fn table_entry(self, child: Mfn, level: u8) -> u64 {
        let flags = if self.pae && level == self.levels {
            PDPTE_FLAGS
        } else {
            TABLE_FLAGS
        };
        (child.raw() << PAGE_SHIFT) | flags
    }

    /// Decodes a non-leaf entry at `level`: the child table, or `None` for an empty entry.
    #[inline]
    fn decode_table(self, entry: u64, level: u8) -> Option<Result<Mfn, ()>> {
        if entry == 0 {
            return None;
        }
        let child = Mfn::new((entry & self.addr_mask()) >> PAGE_SHIFT);
        if self.table_entry(child, level) == entry {
            Some(Ok(child))
        } else {
            Some(Err(()))
        }
    }

    /// The leaf entry for `e`.
    #[inline]
    const fn leaf_entry(e: P2mEntry) -> u64 {
        let rw = if e.writable { bits::RW } else { 0 };
        let flags = match e.ty {
            P2mType::Ram => RAM_FLAGS,
            P2mType::Mmio => 0,
        };
        (e.mfn.raw() << PAGE_SHIFT) | (e.ty.code() << TYPE_SHIFT) | flags | rw
    }

    /// Decodes a leaf entry: the mapping, or `None` for an empty entry. Only the exact
    /// encodings [`Format::leaf_entry`] produces are accepted.
    #[inline]
    fn decode_leaf(self, entry: u64) -> Option<Result<P2mEntry, ()>> {
        if entry == 0 {
            return None;
        }
        let Some(ty) = P2mType::from_code((entry & bits::AVAIL_LOW) >> TYPE_SHIFT) else {
            return Some(Err(()));
        };
        let decoded = P2mEntry {
            mfn: Mfn::new((entry & self.addr_mask()) >> PAGE_SHIFT),
            ty,
            writable: entry & bits::RW != 0,
        };
        if Format::leaf_entry(decoded) == entry {
            Some(Ok(decoded))
        } else {
            Some(Err(()))
        }
    }
}

/// Where a walk down the tables for one guest frame stopped.
enum Reach {
    /// The leaf table exists: here it is.
    Leaf(Mfn),
    /// The entry at `level` of `table` is empty: no table below it.
    Missing {
        /// The deepest table on the path.
        table: Mfn,
        /// Its level (above 1).
        level: u8,
    },
}

/// The guest-physical -> machine map of one domain, kept as page tables in machine memory.
/// See the module documentation.
///
/// A `P2m` owns its table frames: give them back with [`P2m::teardown_step`] before
/// dropping it, or they leak (nothing can free them without the host's memory).
#[derive(Debug)]
pub struct P2m {
    format: Format,
    levels: PagingLevels,
    root: Mfn,
    /// Every table frame, the root included, with its level.
    tables: BTreeMap<Mfn, u8>,
    /// The number of guest frames with an entry (any type).
    mapped: u64,
    /// Teardown has started.
    dying: bool,
    /// A root entry of the host's (its index and value): the hypervisor hole of a
    /// paging-disabled guest, which runs on the root. No guest frame lies under it.
    host_entry: Option<(u64, u64)>,
    /// Entries and leaf tables found by earlier lookups (see `p2m/cache.rs`).
    cache: LookupCache,
}

impl P2m {
    /// An empty p2m in the table format of `levels` (the shadow paging mode), with its root
    /// frame from `mem`.
    pub fn new<M: MachineMemory + ?Sized>(
        mem: &mut M,
        levels: PagingLevels,
    ) -> Result<P2m, P2mError> {
        let format = Format::for_levels(levels).ok_or(P2mError::UnsupportedLevels { levels })?;
        let root = mem.alloc_block(0).ok_or(P2mError::OutOfHostMemory)?;
        if !format.table_frame_ok(root, format.levels) {
            mem.free_block(root, 0);
            return Err(P2mError::BadHostFrame { mfn: root });
        }
        let mut tables = BTreeMap::new();
        tables.insert(root, format.levels);
        Ok(P2m {
            format,
            levels,
            root,
            tables,
            mapped: 0,
            dying: false,
            host_entry: None,
            cache: LookupCache::new(),
        })
    }

    /// The root table: what to install as CR3 for a paging-disabled guest. In the PAE format
    /// the PDPT sits at offset 0 of this frame. Stale once teardown has started.
    pub fn root(&self) -> Mfn {
        self.root
    }

    /// The table format (the shadow paging mode the p2m was created for).
    pub fn levels(&self) -> PagingLevels {
        self.levels
    }

    /// The exclusive bound of the guest frames the format covers: 2^20 for 2-level and PAE,
    /// 2^36 for 4-level.
    pub fn max_gfn(&self) -> Gfn {
        Gfn::new(self.format.max_gfn())
    }

    /// The exclusive bound of the machine frames an entry can hold: 2^20 for 2-level,
    /// 2^40 (52-bit machine addresses) for PAE and 4-level.
    pub fn max_mfn(&self) -> Mfn {
        Mfn::new(self.format.max_mfn())
    }

    /// The number of guest frames with a mapping (of any type).
    pub fn mapped_count(&self) -> u64 {
        self.mapped
    }

    /// The number of table frames the p2m holds, the root included.
    pub fn table_count(&self) -> usize {
        self.tables.len()
    }

    /// Whether `mfn` is one of the p2m's table frames (no guest mapping may point at one).
    pub fn owns_table_frame(&self, mfn: Mfn) -> bool {
        self.tables.contains_key(&mfn)
    }

    /// Every table frame, the root included, in frame order.
    pub fn table_frames(&self) -> impl Iterator<Item = Mfn> + '_ {
        self.tables.keys().copied()
    }

    /// Whether teardown has started.
    pub fn is_torn_down(&self) -> bool {
        self.dying
    }

    fn live(&self) -> Result<(), P2mError> {
        if self.dying {
            Err(P2mError::TornDown)
        } else {
            Ok(())
        }
    }

    fn check_gfn(&self, gfn: Gfn) -> Result<u64, P2mError> {
        if gfn.raw() < self.format.max_gfn() && !self.under_host_entry(gfn.raw()) {
            Ok(gfn.raw())
        } else {
            Err(P2mError::GfnOutOfRange { gfn })
        }
    }

    /// Whether `gfn` lies under the host's root entry.
    fn under_host_entry(&self, gfn: u64) -> bool {
        self.host_entry
            .is_some_and(|(index, _)| self.format.index(gfn, self.format.levels) == index)
    }

    /// Puts the host's `entry` at `index` of the root of a 4-level p2m (the hypervisor
    /// hole a paging-disabled guest, running on the root, needs): from then on no guest
    /// frame under it can be mapped, looked up or visited, and the entry is never read as
    /// a p2m table. The root entry must be empty (no guest frame mapped under it).
    pub fn set_host_entry<M: PhysMem<Maddr> + ?Sized>(
        &mut self,
        mem: &mut M,
        index: u64,
        entry: u64,
    ) -> Result<(), P2mError> {
        self.live()?;
        let f = self.format;
        if f.levels != 4 || index >= f.entries(f.levels) || self.host_entry.is_some() {
            return Err(P2mError::Inconsistent {
                what: "a host entry needs a 4-level p2m and a free root slot",
                mfn: self.root,
            });
        }
        let at = f.entry_addr(self.root, index);
        if mem.read_entry(at, f.entry_bytes)? != 0 {
            return Err(P2mError::Inconsistent {
                what: "guest frames are mapped under the host entry's slot",
                mfn: self.root,
            });
        }
        mem.write_entry(at, f.entry_bytes, entry)?;
        self.host_entry = Some((index, entry));
        Ok(())
    }

    /// Reads entry `index` of `table` (at `level`), as a non-leaf entry.
    #[inline]
    fn read_table<M: PhysMem<Maddr> + ?Sized>(
        &self,
        mem: &M,
        table: Mfn,
        level: u8,
        index: u64,
    ) -> Result<Option<Mfn>, P2mError> {
        let f = self.format;
        let entry = mem.read_entry(f.entry_addr(table, index), f.entry_bytes)?;
        match f.decode_table(entry, level) {
            None => Ok(None),
            Some(Ok(child)) => Ok(Some(child)),
            Some(Err(())) => Err(malformed(table, index, entry)),
        }
    }

    /// Reads entry `index` of leaf table `table`.
    #[inline]
    fn read_leaf<M: PhysMem<Maddr> + ?Sized>(
        &self,
        mem: &M,
        table: Mfn,
        index: u64,
    ) -> Result<Option<P2mEntry>, P2mError> {
        let f = self.format;
        let entry = mem.read_entry(f.entry_addr(table, index), f.entry_bytes)?;
        match f.decode_leaf(entry) {
            None => Ok(None),
            Some(Ok(e)) => Ok(Some(e)),
            Some(Err(())) => Err(malformed(table, index, entry)),
        }
    }

    /// Walks down towards `gfn`'s leaf table.
    #[inline]
    fn reach<M: PhysMem<Maddr> + ?Sized>(&self, mem: &M, gfn: u64) -> Result<Reach, P2mError> {
        let mut table = self.root;
        let mut level = self.format.levels;
        while level > 1 {
            match self.read_table(mem, table, level, self.format.index(gfn, level))? {
                Some(child) => table = child,
                None => return Ok(Reach::Missing { table, level }),
            }
            level -= 1;
        }
        Ok(Reach::Leaf(table))
    }

    /// The mapping of `gfn`; `None` if there is none, if `gfn` is out of range, if teardown
    /// has started, or if the tables cannot be read (see [`P2m::try_lookup`] to tell these
    /// apart). Answered from the entries and leaf tables earlier lookups found where it
    /// can (kept coherent by every change this p2m makes; see `p2m/cache.rs`), else read
    /// from the tables.
    #[inline]
    pub fn lookup<M: PhysMem<Maddr> + ?Sized>(&self, mem: &M, gfn: Gfn) -> Option<P2mEntry> {
        if self.dying {
            return None;
        }
        let g = self.check_gfn(gfn).ok()?;
        if let Some(e) = self.cache.entry(g) {
            return Some(e);
        }
        let range = g >> self.format.index_bits;
        let table = match self.cache.leaf(range) {
            Some(table) => table,
            None => match self.reach(mem, g).ok()? {
                Reach::Leaf(table) => {
                    self.cache.remember_leaf(range, table);
                    table
                }
                Reach::Missing { .. } => return None,
            },
        };
        let e = self
            .read_leaf(mem, table, self.format.index(g, 1))
            .ok()
            .flatten()?;
        self.cache.remember_entry(g, e);
        Some(e)
    }

    /// The mapping of `gfn`, read from the tables (every level, nothing cached), or why
    /// the tables cannot answer.
    pub fn try_lookup<M: PhysMem<Maddr> + ?Sized>(
        &self,
        mem: &M,
        gfn: Gfn,
    ) -> Result<Option<P2mEntry>, P2mError> {
        self.live()?;
        let g = self.check_gfn(gfn)?;
        match self.reach(mem, g)? {
            Reach::Leaf(table) => self.read_leaf(mem, table, self.format.index(g, 1)),
            Reach::Missing { .. } => Ok(None),
        }
    }

    /// Installs, replaces or removes (`None`) the mapping of `gfn`; the new mapping is
    /// writable, also when it replaces a read-only one (use [`P2m::set_entry`] to choose). Returns the old mapping, so that the caller can remove every shadow mapping
    /// of the old frame (and flush the TLBs of vcpus running on the p2m).
    pub fn set<M: MachineMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        gfn: Gfn,
        mapping: Option<(Mfn, P2mType)>,
    ) -> Result<Option<P2mEntry>, P2mError> {
        let entry = mapping.map(|(mfn, ty)| P2mEntry::new(mfn, ty));
        self.set_entry(mem, gfn, entry)
    }

    /// Installs, replaces or removes (`None`) the mapping of `gfn`, with the writability
    /// given. Allocates missing tables from the host (at most one per level below the
    /// root). Returns the old mapping. On error the p2m is unchanged.
    pub fn set_entry<M: MachineMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        gfn: Gfn,
        entry: Option<P2mEntry>,
    ) -> Result<Option<P2mEntry>, P2mError> {
        self.live()?;
        let g = self.check_gfn(gfn)?;
        self.cache.forget_entry(g);
        if let Some(e) = entry {
            if e.mfn.raw() >= self.format.max_mfn() {
                return Err(P2mError::MfnUnrepresentable { mfn: e.mfn });
            }
            if e.ty == P2mType::Ram && self.owns_table_frame(e.mfn) {
                return Err(P2mError::MfnIsTable { mfn: e.mfn });
            }
        }
        let f = self.format;
        match (self.reach(mem, g)?, entry) {
            (Reach::Leaf(table), _) => {
                let index = f.index(g, 1);
                let old = self.read_leaf(mem, table, index)?;
                let new_raw = entry.map_or(0, Format::leaf_entry);
                if entry != old {
                    mem.write_entry(f.entry_addr(table, index), f.entry_bytes, new_raw)?;
                }
                match (old, entry) {
                    (None, Some(_)) => self.mapped += 1,
                    (Some(_), None) => self.mapped -= 1,
                    _ => {}
                }
                Ok(old)
            }
            (Reach::Missing { .. }, None) => Ok(None),
            (Reach::Missing { table, level }, Some(e)) => {
                self.build_path(mem, g, table, level, Some(e))?;
                self.mapped += 1;
                Ok(None)
            }
        }
    }

    /// Makes sure the tables down to `gfn`'s leaf exist (allocating missing ones from the
    /// host, linked with an empty leaf), so that a later [`P2m::set_entry`] of `gfn` needs no
    /// host memory. No mapping changes. On error nothing is linked.
    pub fn ensure_path<M: MachineMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        gfn: Gfn,
    ) -> Result<(), P2mError> {
        self.live()?;
        let g = self.check_gfn(gfn)?;
        match self.reach(mem, g)? {
            Reach::Leaf(_) => Ok(()),
            Reach::Missing { table, level } => self.build_path(mem, g, table, level, None),
        }
    }

    /// Creates the tables below `table` (at `level`) down to a leaf table holding `e` (or
    /// nothing) for `gfn`, and links them in with a single write, last. On error nothing is
    /// linked and every new frame is given back.
    fn build_path<M: MachineMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        gfn: u64,
        table: Mfn,
        level: u8,
        e: Option<P2mEntry>,
    ) -> Result<(), P2mError> {
        let f = self.format;
        // new[i] is the new table at level i + 1, for levels 1 .. level - 1.
        let mut new = [Mfn::new(0); 3];
        let count = usize::from(level - 1);
        for i in 0..count {
            let fresh = match mem.alloc_block(0) {
                Some(mfn) => mfn,
                None => {
                    free_frames(mem, &new[..i]);
                    return Err(P2mError::OutOfHostMemory);
                }
            };
            let ours = self.owns_table_frame(fresh) || new[..i].contains(&fresh);
            if ours || !f.table_frame_ok(fresh, i as u8 + 1) {
                if !ours {
                    mem.free_block(fresh, 0);
                }
                free_frames(mem, &new[..i]);
                return Err(P2mError::BadHostFrame { mfn: fresh });
            }
            new[i] = fresh;
        }
        let fill = |mem: &mut M| -> Result<(), MemError> {
            mem.write_entry(
                f.entry_addr(new[0], f.index(gfn, 1)),
                f.entry_bytes,
                e.map_or(0, Format::leaf_entry),
            )?;
            for i in 1..count {
                let lvl = i as u8 + 1;
                mem.write_entry(
                    f.entry_addr(new[i], f.index(gfn, lvl)),
                    f.entry_bytes,
                    f.table_entry(new[i - 1], lvl),
                )?;
            }
            // The commit point: only now can a CPU walking the p2m see the new tables.
            mem.write_entry(
                f.entry_addr(table, f.index(gfn, level)),
                f.entry_bytes,
                f.table_entry(new[count - 1], level),
            )
        };
        if let Err(err) = fill(mem) {
            free_frames(mem, &new[..count]);
            return Err(P2mError::Memory(err));
        }
        for (i, &mfn) in new[..count].iter().enumerate() {
            self.tables.insert(mfn, i as u8 + 1);
        }
        Ok(())
    }

    /// Sets or clears write permission on the mapping of `gfn` (RW in the leaf); the
    /// mapping stays. Returns whether the entry changed. The caller flushes the TLBs of
    /// vcpus running on the p2m after clearing it.
    pub fn set_writable<M: PhysMem<Maddr> + ?Sized>(
        &mut self,
        mem: &mut M,
        gfn: Gfn,
        writable: bool,
    ) -> Result<bool, P2mError> {
        self.live()?;
        let g = self.check_gfn(gfn)?;
        self.cache.forget_entry(g);
        let Reach::Leaf(table) = self.reach(mem, g)? else {
            return Err(P2mError::NotMapped { gfn });
        };
        let index = self.format.index(g, 1);
        let old = self
            .read_leaf(mem, table, index)?
            .ok_or(P2mError::NotMapped { gfn })?;
        if old.writable == writable {
            return Ok(false);
        }
        let f = self.format;
        let new = Format::leaf_entry(old.with_writable(writable));
        mem.write_entry(f.entry_addr(table, index), f.entry_bytes, new)?;
        Ok(true)
    }

    /// Calls `f` on every mapping from `start` on, in guest-frame order, in one bounded
    /// step: at most `budget` (at least 1) leaf entries or empty upper-level entries are
    /// visited, each after at most one walk of `levels() - 1` table reads. Returns the frame
    /// to continue from, or `None` when the whole range is done.
    pub fn for_each_from<M: PhysMem<Maddr> + ?Sized>(
        &self,
        mem: &M,
        start: Gfn,
        budget: usize,
        mut f: impl FnMut(Gfn, P2mEntry),
    ) -> Result<Option<Gfn>, P2mError> {
        self.live()?;
        let fmt = self.format;
        let max = fmt.max_gfn();
        let mut gfn = start.raw();
        let mut left = budget.max(1);
        while gfn < max {
            if left == 0 {
                return Ok(Some(Gfn::new(gfn)));
            }
            if self.under_host_entry(gfn) {
                left -= 1;
                gfn = (gfn | (fmt.span(fmt.levels) - 1)) + 1;
                continue;
            }
            match self.reach(mem, gfn)? {
                Reach::Missing { level, .. } => {
                    left -= 1;
                    // Skip the whole range the empty entry at `level` covers.
                    gfn = (gfn | (fmt.span(level) - 1)) + 1;
                }
                Reach::Leaf(table) => {
                    let end = ((gfn | (fmt.span(2) - 1)) + 1).min(max);
                    while gfn < end && left > 0 {
                        if let Some(e) = self.read_leaf(mem, table, fmt.index(gfn, 1))? {
                            f(Gfn::new(gfn), e);
                        }
                        left -= 1;
                        gfn += 1;
                    }
                }
            }
        }
        Ok(None)
    }

    /// One bounded step of teardown: gives at most `budget` (at least 1) table frames back
    /// to the host. Returns whether every frame is back. Once teardown has started the p2m
    /// answers [`P2mError::TornDown`] (and [`P2m::lookup`] `None`); no vcpu may still run on
    /// it.
    #[must_use = "teardown is done only when this returns true"]
    pub fn teardown_step<M: MachineMemory + ?Sized>(&mut self, mem: &mut M, budget: usize) -> bool {
        self.dying = true;
        self.mapped = 0;
        self.cache.clear();
        for _ in 0..budget.max(1) {
            match self.tables.pop_last() {
                Some((mfn, _)) => mem.free_block(mfn, 0),
                None => break,
            }
        }
        self.tables.is_empty()
    }

    /// Verifies the whole structure: every table is reachable exactly once from the root at
    /// its level and lies where the format can reference it, every entry has exactly the
    /// format the p2m writes (the PAE root frame is zero past its PDPT), no RAM mapping
    /// points at a table frame, and the mapping count agrees. Reads every table; meant for
    /// the auditor and tests.
    pub fn check<M: PhysMem<Maddr> + ?Sized>(&self, mem: &M) -> Result<(), P2mError> {
        self.live()?;
        let f = self.format;
        let inconsistent = |what, mfn| Err(P2mError::Inconsistent { what, mfn });
        let mut seen = BTreeSet::new();
        let mut stack: Vec<(Mfn, u8)> = alloc::vec![(self.root, f.levels)];
        let mut mapped = 0u64;
        while let Some((table, level)) = stack.pop() {
            if self.tables.get(&table) != Some(&level) {
                return inconsistent("a linked table is not recorded at its level", table);
            }
            if !seen.insert(table) {
                return inconsistent("a table is linked more than once", table);
            }
            if !f.table_frame_ok(table, level) {
                return inconsistent("a table lies beyond what its format can reach", table);
            }
            for index in 0..f.entries(level) {
                if level == f.levels
                    && let Some((host_index, host_entry)) = self.host_entry
                    && index == host_index
                {
                    if mem.read_entry(f.entry_addr(table, index), f.entry_bytes)? != host_entry {
                        return inconsistent("the host's root entry changed", table);
                    }
                    continue;
                }
                if level > 1 {
                    if let Some(child) = self.read_table(mem, table, level, index)? {
                        stack.push((child, level - 1));
                    }
                } else if let Some(e) = self.read_leaf(mem, table, index)? {
                    if e.ty == P2mType::Ram && self.owns_table_frame(e.mfn) {
                        return inconsistent("a RAM mapping points at a p2m table", e.mfn);
                    }
                    mapped += 1;
                }
            }
            if f.pae && level == f.levels {
                for index in f.entries(level)..512 {
                    let entry = mem.read_u64(f.entry_addr(table, index))?;
                    if entry != 0 {
                        return Err(malformed(table, index, entry));
                    }
                }
            }
        }
        if let Some(&stray) = self.tables.keys().find(|mfn| !seen.contains(*mfn)) {
            return inconsistent("a recorded table is not linked", stray);
        }
        if mapped != self.mapped {
            return inconsistent("the mapping count disagrees with the tables", self.root);
        }
        Ok(())
    }
}

fn malformed(table: Mfn, index: u64, entry: u64) -> P2mError {
    P2mError::MalformedEntry {
        table,
        index: index as usize,
        entry,
    }
}

fn free_frames<M: MachineMemory + ?Sized>(mem: &mut M, frames: &[Mfn]) {
    for &mfn in frames {
        mem.free_block(mfn, 0);
    }
}

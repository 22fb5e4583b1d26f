//! The shadow hash: (guest frame, kind, flavor) -> shadow, the per-shadow and per-frame
//! metadata, the pinned top-level shadows in MRU order, and the queue of shadows that have
//! lost their last reference and wait to be torn down in bounded steps.

use alloc::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::addr::{Maddr, Mfn};
use crate::types::{FrameMeta, KindSet, ShadowInfo, ShadowKey, ShadowKind};

/// Every shadow of a domain and what the engine knows about them.
#[derive(Clone, Debug, Default)]
pub struct ShadowStore {
    hash: BTreeMap<ShadowKey, Mfn>,
    info: BTreeMap<Mfn, ShadowInfo>,
    frames: BTreeMap<Mfn, FrameMeta>,
    /// The frames of `frames` with at least one shadow. Every fill asks whether its target
    /// is a page table, and `frames` also holds every frame mapped writable (hundreds of
    /// entries for a few dozen page tables): the small set answers much faster.
    page_tables: BTreeSet<Mfn>,
    /// Pinned top-level shadows by last use: the front is the least recently used.
    mru: BTreeMap<u64, Mfn>,
    /// Shadows out of the hash whose entries still hold references: torn down in steps.
    dying: VecDeque<Mfn>,
    dying_set: BTreeSet<Mfn>,
    clock: u64,
}

impl ShadowStore {
    /// An empty store.
    pub fn new() -> ShadowStore {
        ShadowStore::default()
    }

    /// The shadow with this key.
    pub fn lookup(&self, key: &ShadowKey) -> Option<Mfn> {
        self.hash.get(key).copied()
    }

    /// Records a new shadow at `head` (a freshly allocated, zeroed block).
    pub(crate) fn insert(&mut self, key: ShadowKey, head: Mfn, order: u8) {
        if key.kind != ShadowKind::VcpuTop {
            self.hash.insert(key, head);
        }
        self.info.insert(
            head,
            ShadowInfo {
                key,
                order,
                refs: 0,
                pinned: false,
                last_use: 0,
                up: None,
            },
        );
        if !key.kind.is_fl1() && key.kind != ShadowKind::VcpuTop {
            let meta = self.frames.entry(Mfn::new(key.frame)).or_default();
            meta.shadows += 1;
            meta.kinds = KindSet(meta.kinds.0 | key.kind.bit());
            self.page_tables.insert(Mfn::new(key.frame));
        }
    }

    /// Takes a shadow out of the hash (its entries are cleared later, by the dying queue).
    pub(crate) fn unhash(&mut self, head: Mfn) {
        let Some(info) = self.info.get(&head).copied() else {
            return;
        };
        if self.hash.get(&info.key) == Some(&head) {
            self.hash.remove(&info.key);
        }
        if info.pinned {
            self.mru.remove(&info.last_use);
            if let Some(i) = self.info.get_mut(&head) {
                i.pinned = false;
            }
        }
        let kind = info.key.kind;
        if !kind.is_fl1() && kind != ShadowKind::VcpuTop {
            let frame = Mfn::new(info.key.frame);
            let still_has_kind = self
                .of_frame(frame)
                .any(|(key, _)| key.kind == kind && key != info.key);
            if let Some(meta) = self.frames.get_mut(&frame) {
                meta.shadows = meta.shadows.saturating_sub(1);
                if meta.shadows == 0 {
                    self.page_tables.remove(&frame);
                }
                if !still_has_kind {
                    meta.kinds = KindSet(meta.kinds.0 & !kind.bit());
                }
                if meta.is_empty() {
                    self.frames.remove(&frame);
                }
            }
        }
        if self.dying_set.insert(head) {
            self.dying.push_back(head);
        }
    }

    /// Forgets a shadow whose entries are all clear (its pages go back to the pool).
    pub(crate) fn forget(&mut self, head: Mfn) -> Option<ShadowInfo> {
        self.dying_set.remove(&head);
        self.dying.retain(|m| *m != head);
        self.info.remove(&head)
    }

    /// The next dying shadow to tear down.
    pub(crate) fn next_dying(&self) -> Option<Mfn> {
        self.dying.front().copied()
    }

    /// Whether `head` is waiting to be torn down.
    pub fn is_dying(&self, head: Mfn) -> bool {
        self.dying_set.contains(&head)
    }

    /// How many shadows wait to be torn down.
    pub fn dying_count(&self) -> usize {
        self.dying.len()
    }

    /// The metadata of the shadow whose block starts at `head`.
    pub fn info(&self, head: Mfn) -> Option<&ShadowInfo> {
        self.info.get(&head)
    }

    /// The shadow whose block holds machine frame `mfn`, as (head, info).
    pub fn containing(&self, mfn: Mfn) -> Option<(Mfn, &ShadowInfo)> {
        let (head, info) = self.info.range(..=mfn).next_back()?;
        let within = mfn.raw() - head.raw() < (1u64 << info.order);
        within.then_some((*head, info))
    }

    /// Every shadow (including dying ones), by head.
    pub fn shadows(&self) -> impl Iterator<Item = (Mfn, &ShadowInfo)> + '_ {
        self.info.iter().map(|(m, i)| (*m, i))
    }

    /// Every shadow (including dying ones) whose head is at or above `from`, by head.
    pub fn shadows_from(&self, from: Mfn) -> impl Iterator<Item = (Mfn, &ShadowInfo)> + '_ {
        self.info.range(from..).map(|(m, i)| (*m, i))
    }

    /// Every hashed shadow key and its head.
    pub fn hashed(&self) -> impl Iterator<Item = (&ShadowKey, Mfn)> + '_ {
        self.hash.iter().map(|(k, m)| (k, *m))
    }

    /// The hashed shadows of one guest frame, in kind order (L1s first).
    pub fn of_frame(&self, frame: Mfn) -> impl Iterator<Item = (ShadowKey, Mfn)> + '_ {
        self.hash
            .range(Self::frame_range(frame.raw()))
            .filter(|(k, _)| !k.kind.is_fl1() && k.kind != ShadowKind::VcpuTop)
            .map(|(k, m)| (*k, *m))
    }

    /// The splinters keyed by guest frame number `gfn`.
    pub fn fl1_of_gfn(&self, gfn: u64) -> impl Iterator<Item = (ShadowKey, Mfn)> + '_ {
        self.hash
            .range(Self::frame_range(gfn))
            .filter(|(k, _)| k.kind.is_fl1())
            .map(|(k, m)| (*k, *m))
    }

    fn frame_range(frame: u64) -> core::ops::RangeInclusive<ShadowKey> {
        use crate::types::Flavor;
        let lo = ShadowKey {
            frame,
            kind: ShadowKind::ALL[0],
            flavor: Flavor {
                pse: false,
                nxe: false,
                high: false,
                pkey: 0,
            },
        };
        let hi = ShadowKey {
            frame,
            kind: ShadowKind::VcpuTop,
            flavor: Flavor {
                pse: true,
                nxe: true,
                high: true,
                pkey: u8::MAX,
            },
        };
        lo..=hi
    }

    /// The metadata of guest frame `mfn` (all zero if nothing is recorded).
    pub fn frame(&self, mfn: Mfn) -> FrameMeta {
        self.frames.get(&mfn).copied().unwrap_or_default()
    }

    /// Every guest frame with metadata.
    pub fn frames(&self) -> impl Iterator<Item = (Mfn, &FrameMeta)> + '_ {
        self.frames.iter().map(|(m, f)| (*m, f))
    }

    /// How many guest frames are shadowed page tables.
    pub fn page_table_count(&self) -> usize {
        self.page_tables.len()
    }

    /// Whether a frame in `from..to` is a shadowed guest page table.
    pub fn any_page_table_in(&self, from: Mfn, to: Mfn) -> bool {
        self.page_tables.range(from..to).next().is_some()
    }

    /// Whether `mfn` is a shadowed guest page table.
    pub fn is_page_table(&self, mfn: Mfn) -> bool {
        self.page_tables.contains(&mfn)
    }

    /// Counts a new writable shadow mapping of `mfn` made by the entry at `slot`.
    pub(crate) fn add_writable(&mut self, mfn: Mfn, slot: Maddr) {
        let meta = self.frames.entry(mfn).or_default();
        if meta.writable == 0 {
            meta.last_writable = Some(slot);
        }
        meta.writable += 1;
    }

    /// Counts a writable shadow mapping of `mfn` going away.
    pub(crate) fn remove_writable(&mut self, mfn: Mfn) {
        if let Some(meta) = self.frames.get_mut(&mfn) {
            meta.writable = meta.writable.saturating_sub(1);
            if meta.is_empty() {
                self.frames.remove(&mfn);
            }
        }
    }

    /// Adds a reference to the shadow holding `mfn` from the entry at `from`.
    pub(crate) fn add_ref(&mut self, mfn: Mfn, from: Maddr) {
        let head = self.containing(mfn).map(|(h, _)| h);
        if let Some(info) = head.and_then(|h| self.info.get_mut(&h)) {
            info.refs += 1;
            info.up = Some(from);
        }
    }

    /// Drops a reference to the shadow holding `mfn`; returns its head if that was the
    /// last reference and it is not pinned (the caller unhashes it).
    pub(crate) fn drop_ref(&mut self, mfn: Mfn) -> Option<Mfn> {
        let (head, _) = self.containing(mfn)?;
        let info = self.info.get_mut(&head)?;
        info.refs = info.refs.saturating_sub(1);
        (info.refs == 0 && !info.pinned && !self.dying_set.contains(&head)).then_some(head)
    }

    /// A new tick of the use clock.
    pub(crate) fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// Pins a top-level shadow (or refreshes its place in MRU order).
    pub(crate) fn pin(&mut self, head: Mfn) {
        let now = self.tick();
        if let Some(info) = self.info.get_mut(&head) {
            if info.pinned {
                self.mru.remove(&info.last_use);
            }
            info.pinned = true;
            info.last_use = now;
            self.mru.insert(now, head);
        }
    }

    /// Unpins a shadow; returns its head if nothing else references it.
    pub(crate) fn unpin(&mut self, head: Mfn) -> Option<Mfn> {
        let info = self.info.get_mut(&head)?;
        if !info.pinned {
            return None;
        }
        info.pinned = false;
        self.mru.remove(&info.last_use);
        (info.refs == 0).then_some(head)
    }

    /// Pinned shadows, least recently used first.
    pub fn pinned_lru(&self) -> impl Iterator<Item = Mfn> + '_ {
        self.mru.values().copied()
    }

    /// How many shadows there are of each kind (hashed and vcpu tops; not dying ones).
    pub fn count_by_kind(&self) -> [usize; ShadowKind::ALL.len()] {
        let mut counts = [0; ShadowKind::ALL.len()];
        for (head, info) in &self.info {
            if !self.dying_set.contains(head)
                && let Some(c) = counts.get_mut(info.key.kind as usize)
            {
                *c += 1;
            }
        }
        counts
    }
}

//! The auditor: checks every invariant of the design over a whole domain. Tests run it after
//! every step; shadow test mode runs it after every operation.
//!
//! - every shadow entry agrees with the guest entry, the p2m and the permission rules: it
//!   is empty, or exactly the magic entry the guest entry calls for, or maps the frame the
//!   guest entry names with no more rights than the rules allow;
//! - no writable mapping of a shadowed page table, a pool frame, a p2m table or a
//!   hypervisor frame; in log-dirty mode, none of a page not yet dirty;
//! - reference counts, writable counts, the hash, the per-frame metadata and the pool's
//!   accounting agree with the entries themselves;
//! - every shadow is reachable from a vcpu root, a pinned top, or a dying shadow.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;

use crate::addr::{Maddr, Mfn, PAGE_SIZE};
use crate::domain::Domain;
use crate::domain::entries::is_magic;
use crate::host::MachineMemory;
use crate::multi::Pair;
use crate::paging::{PagingLevels, bits};
use crate::types::ShadowKind;

/// One broken invariant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Violation {
    /// Which invariant.
    pub what: &'static str,
    /// Where (a machine address, frame or guest frame, depending on the invariant).
    pub at: u64,
}

/// What the auditor found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditReport {
    /// Every violation found (at most [`AuditReport::LIMIT`]).
    pub violations: Vec<Violation>,
    /// Shadow entries checked.
    pub entries_checked: u64,
}

impl AuditReport {
    /// The most violations recorded.
    pub const LIMIT: usize = 64;

    /// Whether everything holds.
    pub fn is_clean(&self) -> bool {
        self.violations.is_empty()
    }

    fn fail(&mut self, what: &'static str, at: u64) {
        if self.violations.len() < Self::LIMIT {
            self.violations.push(Violation { what, at });
        }
    }
}

/// Audits the whole domain.
pub fn audit<H: MachineMemory>(d: &Domain<H>) -> AuditReport {
    let mut r = AuditReport::default();
    audit_pool(d, &mut r);
    audit_hash(d, &mut r);
    audit_entries(d, &mut r);
    audit_reachability(d, &mut r);
    audit_vcpus(d, &mut r);
    audit_p2m(d, &mut r);
    if d.out_of_sync_records() > d.config.max_out_of_sync {
        r.fail(
            "more pages out of sync than the domain's bound",
            d.out_of_sync_records() as u64,
        );
    }
    audit_superpage_index(d, &mut r);
    r
}

fn audit_pool<H: MachineMemory>(d: &Domain<H>, r: &mut AuditReport) {
    if d.pool.check().is_err() {
        r.fail("pool accounting inconsistent", 0);
    }
    let mut shadow_pages = 0usize;
    for (head, info) in d.store.shadows() {
        shadow_pages += 1 << info.order;
        if d.pool.block_containing(head) != Some((head, info.order)) {
            r.fail(
                "shadow is not an allocated pool block of its size",
                head.raw(),
            );
        }
    }
    if shadow_pages + d.limbo.pages() != d.pool.used_pages() {
        r.fail(
            "pool pages in use differ from pages held by shadows",
            shadow_pages as u64,
        );
    }
}

fn audit_hash<H: MachineMemory>(d: &Domain<H>, r: &mut AuditReport) {
    for (key, head) in d.store.hashed() {
        match d.store.info(head) {
            Some(info) if info.key == *key => {}
            _ => r.fail("hash entry disagrees with shadow metadata", head.raw()),
        }
        if d.store.is_dying(head) {
            r.fail("a dying shadow is still hashed", head.raw());
        }
    }
    let mut per_frame: BTreeMap<Mfn, u32> = BTreeMap::new();
    for (head, info) in d.store.shadows() {
        let kind = info.key.kind;
        let dying = d.store.is_dying(head);
        if !dying && kind != ShadowKind::VcpuTop && d.store.lookup(&info.key) != Some(head) {
            r.fail("live shadow missing from the hash", head.raw());
        }
        if !dying && !kind.is_fl1() && kind != ShadowKind::VcpuTop {
            *per_frame.entry(Mfn::new(info.key.frame)).or_default() += 1;
        }
    }
    for (mfn, meta) in d.store.frames() {
        if per_frame.get(&mfn).copied().unwrap_or(0) != meta.shadows {
            r.fail("frame shadow count disagrees with the hash", mfn.raw());
        }
    }
    for (mfn, count) in &per_frame {
        if d.store.frame(*mfn).shadows != *count {
            r.fail("shadowed frame without metadata", mfn.raw());
        }
    }
}

fn audit_entries<H: MachineMemory>(d: &Domain<H>, r: &mut AuditReport) {
    let width = d.sentry_bytes();
    let mut refs: BTreeMap<Mfn, u32> = BTreeMap::new();
    #[cfg(feature = "rmap")]
    let mut mapped: BTreeSet<(Mfn, Maddr)> = BTreeSet::new();
    let mut writable: BTreeMap<Mfn, u32> = BTreeMap::new();
    for (head, info) in d.store.shadows() {
        let key = info.key;
        let dying = d.store.is_dying(head);
        let pair = key
            .kind
            .guest_levels()
            .and_then(|g| Pair::new(g, d.config.shadow_levels));
        if let Some(slot) = d.hole_slot(head, key.kind)
            && !dying
            && !d.read_sentry(slot).is_ok_and(|e| d.is_hole_entry(e))
        {
            r.fail(
                "top-level shadow without the hypervisor hole entry",
                slot.raw(),
            );
        }
        let mut offset = 0;
        while offset < PAGE_SIZE << info.order {
            let slot = Maddr::new(head.base().raw() + offset);
            let index = offset / width;
            offset += width;
            let Ok(e) = d.read_sentry(slot) else {
                r.fail("shadow entry unreadable", slot.raw());
                continue;
            };
            if e == 0 {
                continue;
            }
            r.entries_checked += 1;
            if d.is_hole_entry(e) {
                if d.hole_slot(head, key.kind) != Some(slot) {
                    r.fail("hypervisor hole entry outside the hole slot", slot.raw());
                }
                continue;
            }
            let frame = d.sentry_frame(e);
            if d.is_superpage_sentry(key.kind.level(), e) {
                if !dying {
                    check_superpage_entry(d, r, pair, key, index, slot, e);
                }
                continue;
            }
            if key.kind.is_leaf_table() {
                #[cfg(feature = "rmap")]
                if let Some(m) = frame {
                    mapped.insert((m, slot));
                }
                if let Some(m) = frame
                    && e & bits::RW != 0
                {
                    *writable.entry(m).or_default() += 1;
                    check_writable_target(d, r, m, slot);
                }
            } else if let Some(child) = frame {
                match d.store.containing(child) {
                    Some((child_head, _)) => *refs.entry(child_head).or_default() += 1,
                    None => r.fail("upper shadow entry points outside any shadow", slot.raw()),
                }
            } else if is_magic(e) {
                r.fail("magic entry in an upper shadow", slot.raw());
            }
            if dying {
                continue;
            }
            let Some(pair) = pair else {
                check_vcpu_top_entry(d, r, head, frame, slot);
                continue;
            };
            let expected = if key.kind.is_leaf_table() {
                pair.expected_leaf(d, key, index)
            } else {
                pair.expected_upper(d, key, index)
            };
            match expected {
                Err(_) => r.fail("expected shadow entry could not be computed", slot.raw()),
                Ok(None) => r.fail("shadow entry present where the guest has none", slot.raw()),
                Ok(Some(x)) => {
                    if is_magic(e) || is_magic(x) {
                        if e != x && !stale_mmio_magic(d, e) {
                            r.fail("magic entry disagrees with guest entry and p2m", slot.raw());
                        }
                    } else if !(within(e, x, width)
                        || ((d.awaits_reprotect(slot) || out_of_sync_writable(d, e, slot))
                            && within(e & !bits::RW, x, width)))
                    {
                        r.fail(
                            "shadow entry grants more than guest and rules allow",
                            slot.raw(),
                        );
                    } else if width == 8 && e & bits::PKEY_MASK != x & bits::PKEY_MASK {
                        r.fail(
                            "shadow entry's protection key is not the guest's",
                            slot.raw(),
                        );
                    }
                }
            }
        }
    }
    for (head, info) in d.store.shadows() {
        if refs.get(&head).copied().unwrap_or(0) != info.refs {
            r.fail("shadow reference count disagrees with entries", head.raw());
        }
    }
    for (mfn, meta) in d.store.frames() {
        if writable.get(&mfn).copied().unwrap_or(0) != meta.writable {
            r.fail("writable count disagrees with entries", mfn.raw());
        }
    }
    for (mfn, count) in &writable {
        if d.store.frame(*mfn).writable != *count {
            r.fail("writable mappings of a frame without metadata", mfn.raw());
        }
    }
    #[cfg(feature = "rmap")]
    if let Some(rmap) = &d.rmap
        && !rmap.iter().eq(mapped.iter().copied())
    {
        r.fail(
            "reverse map disagrees with the shadow L1 entries",
            rmap.len() as u64,
        );
    }
}

/// A shadow superpage entry: allowed now (the guest entry is such a superpage, its machine
/// backing contiguous aligned RAM, none of it a page table, waiting for a scan or losing its
/// mappings, no log-dirty mode), no more rights than the guest's, and in the index.
fn check_superpage_entry<H: MachineMemory>(
    d: &Domain<H>,
    r: &mut AuditReport,
    pair: Option<Pair>,
    key: crate::types::ShadowKey,
    index: u64,
    slot: Maddr,
    e: u64,
) {
    let width = d.sentry_bytes();
    let Some(frame) = d.sentry_frame(e) else {
        return;
    };
    let region = frame.raw() >> d.superpage_order();
    if !d.superpages.holds(region, slot) {
        r.fail("shadow superpage entry missing from the index", slot.raw());
    }
    let expected = match pair {
        Some(pair) => pair.expected_superpage(d, key, index),
        None => Ok(None),
    };
    match expected {
        Err(_) => r.fail("expected shadow entry could not be computed", slot.raw()),
        Ok(None) => r.fail("shadow superpage entry where none is allowed", slot.raw()),
        Ok(Some(x)) => {
            if !within(e, x, width) || e & bits::PS == 0 {
                r.fail(
                    "shadow superpage entry grants more than guest and rules allow",
                    slot.raw(),
                );
            } else if width == 8 && e & bits::PKEY_MASK != x & bits::PKEY_MASK {
                r.fail(
                    "shadow entry's protection key is not the guest's",
                    slot.raw(),
                );
            }
        }
    }
}

/// Every entry of the superpage index is a superpage entry of a live shadow L2 mapping its
/// region.
fn audit_superpage_index<H: MachineMemory>(d: &Domain<H>, r: &mut AuditReport) {
    for (region, slot) in d.superpages.iter() {
        let live = d
            .store
            .containing(slot.mfn())
            .is_some_and(|(_, i)| i.key.kind.level() == 2);
        let maps = d.read_sentry(slot).is_ok_and(|e| {
            d.is_superpage_sentry(2, e)
                && d.sentry_frame(e).map(|m| m.raw() >> d.superpage_order()) == Some(region)
        });
        if !live || !maps {
            r.fail("superpage index names no superpage entry", slot.raw());
        }
    }
}

/// Whether present entry `e` maps the same frame as `x` with no more rights.
fn within(e: u64, x: u64, width: u64) -> bool {
    let mask = if width == 4 {
        bits::ADDR_MASK_4
    } else {
        bits::ADDR_MASK_8
    };
    x & bits::P != 0
        && e & mask == x & mask
        && (e & bits::RW == 0 || x & bits::RW != 0)
        && (e & bits::US == 0 || x & bits::US != 0)
        && (e & bits::NX != 0 || x & bits::NX == 0)
        && (e & bits::G == 0 || x & bits::G != 0)
}

fn check_writable_target<H: MachineMemory>(
    d: &Domain<H>,
    r: &mut AuditReport,
    m: Mfn,
    slot: Maddr,
) {
    if d.store.is_page_table(m) && !d.out_of_sync_slot(m, slot) {
        r.fail("writable mapping of a shadowed page table", slot.raw());
    }
    if d.pool.contains(m) {
        r.fail("writable mapping of a shadow pool frame", slot.raw());
    }
    if d.hypervisor_frames.contains(&m) {
        r.fail("writable mapping of a hypervisor frame", slot.raw());
    }
    if d.p2m.as_ref().is_some_and(|p| p.owns_table_frame(m)) {
        r.fail("writable mapping of a p2m table", slot.raw());
    }
    if let Some(log) = &d.log_dirty {
        let gfns = d.m2p.get(&m);
        let dirty = match gfns {
            Some(set) => set.iter().any(|g| log.is_dirty(*g)),
            None => log.is_dirty(crate::addr::Gfn::new(m.raw())),
        };
        if !dirty && !d.awaits_reprotect(slot) {
            r.fail(
                "writable mapping of a page not yet dirty in log-dirty mode",
                slot.raw(),
            );
        }
    }
}

fn check_vcpu_top_entry<H: MachineMemory>(
    d: &Domain<H>,
    r: &mut AuditReport,
    head: Mfn,
    frame: Option<Mfn>,
    slot: Maddr,
) {
    let Some(owner) = d.vcpus.iter().find(|v| v.vcpu_top == Some(head)) else {
        r.fail("vcpu top owned by no vcpu", head.raw());
        return;
    };
    let Some(frame) = frame else {
        r.fail("magic entry in a vcpu top", slot.raw());
        return;
    };
    let own_l3 = frame.raw() == head.raw() + 1;
    let top_page = owner.tops().any(|t| {
        let pages = d.store.info(t).map_or(1, |i| 1u64 << i.order);
        frame >= t && frame.raw() < t.raw() + pages
    });
    if !own_l3 && !top_page {
        r.fail(
            "vcpu top entry points at no top-level shadow of its vcpu",
            slot.raw(),
        );
    }
}

fn audit_reachability<H: MachineMemory>(d: &Domain<H>, r: &mut AuditReport) {
    let mut seen: BTreeSet<Mfn> = BTreeSet::new();
    let mut work: Vec<Mfn> = Vec::new();
    for v in &d.vcpus {
        work.extend(v.tops());
        work.extend(v.vcpu_top);
    }
    work.extend(d.store.pinned_lru());
    work.extend(
        d.store
            .shadows()
            .filter(|(h, _)| d.store.is_dying(*h))
            .map(|(h, _)| h),
    );
    let width = d.sentry_bytes();
    while let Some(head) = work.pop() {
        if !seen.insert(head) {
            continue;
        }
        let Some(info) = d.store.info(head) else {
            r.fail("root or pinned shadow without metadata", head.raw());
            continue;
        };
        if info.key.kind.is_leaf_table() {
            continue;
        }
        let mut offset = 0;
        while offset < PAGE_SIZE << info.order {
            let slot = Maddr::new(head.base().raw() + offset);
            offset += width;
            if let Some(child) = d.read_sentry(slot).ok().and_then(|e| d.sentry_frame(e))
                && let Some((child_head, _)) = d.store.containing(child)
            {
                work.push(child_head);
            }
        }
    }
    for (head, _) in d.store.shadows() {
        if !seen.contains(&head) {
            r.fail(
                "shadow unreachable from roots, pinned tops and the dying queue",
                head.raw(),
            );
        }
    }
}

fn audit_vcpus<H: MachineMemory>(d: &Domain<H>, r: &mut AuditReport) {
    for (i, v) in d.vcpus.iter().enumerate() {
        let Some(pair) = v.pair else { continue };
        let at = i as u64;
        if pair.guest() == PagingLevels::Zero {
            if v.root != d.p2m.as_ref().map(|p| p.root()) {
                r.fail("vcpu with paging disabled does not run on the p2m", at);
            }
            continue;
        }
        for top in v.tops() {
            if !d.store.info(top).is_some_and(|info| info.pinned) {
                r.fail("top-level shadow in use is not pinned", top.raw());
            }
        }
        if v.root.is_none() {
            r.fail("paging vcpu without a shadow root", at);
        }
    }
}

fn audit_p2m<H: MachineMemory>(d: &Domain<H>, r: &mut AuditReport) {
    let Some(p2m) = &d.p2m else { return };
    if p2m.check(&d.host).is_err() {
        r.fail("p2m structure inconsistent", p2m.root().raw());
    }
    let mut next = Some(crate::addr::Gfn::new(0));
    while let Some(start) = next {
        let mut bad: Vec<(u64, &'static str)> = Vec::new();
        let result = p2m.for_each_from(&d.host, start, 4096, |gfn, entry| {
            let pooled = d.pool.contains(entry.mfn) || d.hypervisor_frames.contains(&entry.mfn);
            if entry.ty == crate::p2m::P2mType::Ram && pooled {
                bad.push((gfn.raw(), "p2m maps a pool or hypervisor frame"));
            }
            if entry.writable {
                if !d.p2m_writable.contains(&gfn) && !d.awaits_p2m_reprotect(gfn) {
                    bad.push((gfn.raw(), "writable p2m entry not recorded"));
                }
                if d.store.is_page_table(entry.mfn) {
                    bad.push((gfn.raw(), "p2m maps a shadowed page table writable"));
                }
                if d.log_dirty.as_ref().is_some_and(|l| !l.is_dirty(gfn))
                    && !d.awaits_p2m_reprotect(gfn)
                {
                    bad.push((
                        gfn.raw(),
                        "p2m maps a clean page writable in log-dirty mode",
                    ));
                }
            }
        });
        for (at, what) in bad {
            r.fail(what, at);
        }
        match result {
            Ok(n) => next = n,
            Err(_) => {
                r.fail("p2m unreadable", start.raw());
                next = None;
            }
        }
    }
}

/// Whether leaf `e` at `slot` is a writable mapping the engine gave an out-of-sync page
/// table (the only writable mappings a shadowed page table may have).
fn out_of_sync_writable<H: MachineMemory>(d: &Domain<H>, e: u64, slot: Maddr) -> bool {
    d.sentry_frame(e)
        .is_some_and(|m| d.out_of_sync_slot(m, slot))
}

/// Whether `e` is a fast-path MMIO entry whose guest frame has become RAM since: it maps
/// nothing, and the fast path treats it as a miss (see `Domain::mmio_magic_stale`).
fn stale_mmio_magic<H: MachineMemory>(d: &Domain<H>, e: u64) -> bool {
    matches!(
        d.decode_magic(e),
        Some(crate::domain::entries::Magic::Mmio(gfn, _)) if d.mmio_magic_stale(crate::addr::Gfn::new(gfn))
    )
}

//! The hardware-cache invariant: once every flush the engine handed out has been carried
//! out, what each vcpu's TLB and paging-structure caches still hold must be something the
//! domain may reach. A paging-structure entry points at a live shadow page one level below
//! it (or at the vcpu's own top block, or, with paging off, at a p2m table); a cached
//! translation maps guest RAM of the domain, never a pool page, a p2m table or a hypervisor
//! frame, and never writable a shadowed page table.

use std::collections::BTreeSet;
use std::fmt;

use shadow2::addr::{Gfn, Mfn};
use shadow2::domain::Domain;
use shadow2::p2m::P2mType;
use shadow2::paging::PagingLevels;
use shadow2::types::ShadowKind;

use super::ShadowMachine;
use crate::cpu::CachedEntry;
use crate::memory::SparseMemory;
use crate::psc::PscEntry;
use crate::tlb::TlbEntry;

/// A cached entry of a vcpu's hardware that refers to something it must not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheViolation {
    /// The vcpu whose caches hold the entry.
    pub vcpu: usize,
    /// The entry.
    pub entry: CachedEntry,
    /// What is wrong with it.
    pub what: &'static str,
}

impl fmt::Display for CacheViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.entry {
            CachedEntry::Translation(t) => write!(
                f,
                "vcpu {}: TLB entry {} -> {} ({:?}, write {}): {}",
                self.vcpu, t.va, t.frame, t.size, t.perms.write, self.what
            ),
            CachedEntry::Structure(p) => write!(
                f,
                "vcpu {}: level-{} paging-structure entry {} -> {}: {}",
                self.vcpu, p.level, p.va, p.table, self.what
            ),
        }
    }
}

impl ShadowMachine {
    /// Checks every vcpu's TLB and paging-structure caches against the domain (see the
    /// module documentation). Meaningful between engine calls, once their flushes are
    /// settled.
    pub fn check_hardware_caches(&self) -> Vec<CacheViolation> {
        let domain = &self.domain;
        let mut mappable: Option<BTreeSet<Mfn>> = None;
        let mut found = Vec::new();
        for (v, cpu) in self.cpus.iter().enumerate() {
            for entry in cpu.cached_entries() {
                let what = match entry {
                    CachedEntry::Structure(p) => structure_problem(domain, v, &p),
                    CachedEntry::Translation(t) => {
                        let frames = mappable.get_or_insert_with(|| mappable_frames(domain));
                        translation_problem(domain, frames, &t)
                    }
                };
                if let Some(what) = what {
                    found.push(CacheViolation {
                        vcpu: v,
                        entry,
                        what,
                    });
                }
            }
        }
        found
    }
}

/// What is wrong with paging-structure entry `p` of vcpu `v`, if anything.
fn structure_problem(
    domain: &Domain<SparseMemory>,
    v: usize,
    p: &PscEntry,
) -> Option<&'static str> {
    let Some(vcpu) = domain.vcpu(v) else {
        return Some("cached by a vcpu the domain does not have");
    };
    let Some(pair) = vcpu.pair() else {
        return Some("cached by a vcpu that has no shadow root");
    };
    if pair.guest() == PagingLevels::Zero {
        let on_p2m = domain
            .p2m()
            .is_some_and(|p2m| p2m.owns_table_frame(p.table));
        return (!on_p2m).then_some("a paging-disabled vcpu's entry points at no p2m table");
    }
    let wanted = p.level.checked_sub(1)?;
    let Some((head, info)) = domain.shadows().containing(p.table) else {
        return Some("points at no shadow page (freed or never a shadow)");
    };
    let level = if info.key.kind == ShadowKind::VcpuTop {
        if vcpu.vcpu_top() != Some(head) {
            return Some("points into another vcpu's top block");
        }
        vcpu_top_page_level(domain, p.table.raw() - head.raw())
    } else {
        info.key.kind.level()
    };
    (level != wanted).then_some("points at a shadow page of another level")
}

/// The level of page `page` of a vcpu top block: a PAE PDPT, or an L4 followed by its L3.
fn vcpu_top_page_level(domain: &Domain<SparseMemory>, page: u64) -> u8 {
    match (domain.config().shadow_levels, page) {
        (PagingLevels::Four, 0) => 4,
        _ => 3,
    }
}

/// What is wrong with cached translation `t`, if anything.
fn translation_problem(
    domain: &Domain<SparseMemory>,
    mappable: &BTreeSet<Mfn>,
    t: &TlbEntry,
) -> Option<&'static str> {
    let frames = (0..t.size.frames()).map(|i| Mfn::new(t.frame.raw() + i));
    for frame in frames {
        if domain.pool().contains(frame) {
            return Some("maps a shadow pool frame");
        }
        if domain.p2m().is_some_and(|p2m| p2m.owns_table_frame(frame)) {
            return Some("maps a p2m table");
        }
        if domain.hypervisor_frames().any(|h| h == frame) {
            return Some("maps a hypervisor frame");
        }
        if !mappable.contains(&frame) {
            return Some("maps a frame that is not the domain's RAM");
        }
        if t.perms.write
            && t.dirty
            && domain.shadows().is_page_table(frame)
            && !domain.is_out_of_sync(frame)
        {
            return Some("maps a shadowed page table writable");
        }
    }
    None
}

/// The machine frames the domain's guest may reach: its RAM per the p2m, or the frames it
/// owns (non-translated).
fn mappable_frames(domain: &Domain<SparseMemory>) -> BTreeSet<Mfn> {
    let Some(p2m) = domain.p2m() else {
        return domain.owned_frames().collect();
    };
    let mut frames = BTreeSet::new();
    let mut next = Some(Gfn::new(0));
    while let Some(start) = next {
        let step = p2m.for_each_from(domain.host(), start, 4096, |_, entry| {
            if entry.ty == P2mType::Ram {
                frames.insert(entry.mfn);
            }
        });
        // An unreadable (or torn-down) p2m maps nothing: every cached translation is then
        // reported.
        next = step.unwrap_or(None);
    }
    frames
}

//! Loading a vcpu's shadow root for its guest CR3: find (or make) and pin the top-level
//! shadows, read a PAE guest's four PDPTEs as the hardware does, and write the vcpu's own
//! top block where the shadow has more levels than the guest's hashed top.

use super::{Engine, Supported};
use crate::addr::{Maddr, Mfn};
use crate::domain::guest_mem::gfn_of;
use crate::domain::{Domain, EngineError, RootLoad};
use crate::flush::VcpuSet;
use crate::host::MachineMemory;
use crate::p2m::P2mType;
use crate::paging::{PagingLevels, PagingMode, bits};
use crate::types::{Flavor, ShadowKey, ShadowKind};

impl<G: PagingMode, S: PagingMode> Engine<G, S>
where
    (G, S): Supported,
{
    /// Loads the vcpu's root for `load`. Everything that can fail without failing the domain
    /// (the pool needing a flush first, a write-access scan to finish) fails before the vcpu
    /// changes; then, for a fresh load, its old tops are released.
    pub(super) fn update_cr3<H: MachineMemory>(
        d: &mut Domain<H>,
        v: usize,
        load: RootLoad,
    ) -> Result<(), EngineError> {
        d.stats.cr3_loads += 1;
        if G::NUM_LEVELS == 0 {
            if load.fresh {
                d.release_vcpu_tops(v)?;
            }
            d.vcpus[v].flavor = load.flavor;
            d.vcpus[v].ctl.pdptes = load.pdptes;
            d.pending_reload = d.pending_reload.union(VcpuSet::one(v));
            Self::drop_vcpu_top(d, v);
            let root = d
                .p2m
                .as_ref()
                .map(|p| p.root())
                .ok_or(EngineError::Internal("paging disabled without a p2m"))?;
            d.vcpus[v].tops = [None; 4];
            d.vcpus[v].root = Some(root);
            return Ok(());
        }
        let ctl = d.vcpus[v].ctl;
        let flavor = load.flavor;
        let pdptes = load.pdptes;
        let top_kind = Self::kind(Self::HASHED_TOP)?;

        // Every guest frame the new tops shadow, read before anything changes.
        let mut frames: [Option<Mfn>; 4] = [None; 4];
        if G::LEVELS == PagingLevels::Three {
            for (i, pdpte) in pdptes.iter().enumerate() {
                if pdpte & bits::P != 0
                    && let Some((mfn, P2mType::Ram)) =
                        d.guest_frame(gfn_of(pdpte & bits::ADDR_MASK_8))
                {
                    frames[i] = Some(mfn);
                }
            }
        } else {
            // A top table outside RAM (the guest loaded such a CR3, which the CPU does not
            // refuse, or the host took the table away under a running vcpu) reads as not
            // present, as any unbacked guest table does: the root is empty and every walk
            // faults until the gfn is RAM.
            if let Some((mfn, P2mType::Ram)) = d.guest_frame(gfn_of(G::root_table(ctl.cr3))) {
                frames[0] = Some(mfn);
            }
        }
        // A root with no guest table behind it: the vcpu's own top block, every entry empty.
        let empty_root = frames.iter().all(Option::is_none) && G::LEVELS != PagingLevels::Three;
        let own_top = Self::NEEDS_VCPU_TOP || empty_root;

        let mut orders = alloc::vec::Vec::new();
        for (i, frame) in frames.iter().enumerate() {
            let Some(frame) = frame else { continue };
            let key = ShadowKey {
                frame: frame.raw(),
                kind: top_kind,
                flavor: Self::top_flavor(d, flavor, i),
            };
            if d.store.lookup(&key).is_none() {
                orders.push(top_kind.order(S::LEVELS));
            }
        }
        if own_top && d.vcpus[v].vcpu_top.is_none() {
            orders.push(ShadowKind::VcpuTop.order(S::LEVELS));
        }
        for frame in frames.iter().flatten() {
            d.prepare_top_frame(*frame)?;
        }
        d.prealloc_missing(&orders)?;

        if load.fresh {
            d.release_vcpu_tops(v)?;
        }
        d.vcpus[v].flavor = flavor;
        d.vcpus[v].ctl.pdptes = pdptes;
        d.pending_reload = d.pending_reload.union(VcpuSet::one(v));
        let mut cached = true;
        let mut tops: [Option<Mfn>; 4] = [None; 4];
        for (i, frame) in frames.iter().enumerate() {
            let Some(frame) = frame else { continue };
            let key = ShadowKey {
                frame: frame.raw(),
                kind: top_kind,
                flavor: Self::top_flavor(d, flavor, i),
            };
            let (head, created) = d.get_or_create(key)?;
            cached &= !created;
            d.store.pin(head);
            tops[i] = Some(head);
        }
        // The old tops stay pinned (cached), but the hardware may hold them until its reload.
        let old_tops: alloc::vec::Vec<Mfn> = d.vcpus[v].tops().collect();
        d.hot.extend(old_tops);
        d.vcpus[v].tops = tops;
        if cached {
            d.stats.cr3_cached += 1;
        }

        if !own_top {
            Self::drop_vcpu_top(d, v);
            d.vcpus[v].root = tops[0];
            return Ok(());
        }
        let vt = match d.vcpus[v].vcpu_top {
            Some(vt) => vt,
            None => {
                let key = ShadowKey {
                    frame: v as u64,
                    kind: ShadowKind::VcpuTop,
                    flavor,
                };
                let (vt, _) = d.get_or_create(key)?;
                // Held by the vcpu, not by references: its L4 points into its own second
                // page, and emptying it must not free it.
                d.store.pin(vt);
                d.vcpus[v].vcpu_top = Some(vt);
                vt
            }
        };
        if empty_root {
            d.clear_shadow(vt)?;
            d.vcpus[v].root = Some(vt);
            return Ok(());
        }
        let (table, pdpte) = if S::NUM_LEVELS == 4 {
            let l3 = Mfn::new(vt.raw() + 1);
            d.set_sentry(vt.base(), Self::top_sentry(l3, false))?;
            (l3, false)
        } else {
            (vt, true)
        };
        for i in 0..4u64 {
            let child = if G::LEVELS == PagingLevels::Two {
                tops[0].map(|t| Mfn::new(t.raw() + i))
            } else {
                tops.get(i as usize).copied().flatten()
            };
            let entry = child.map_or(0, |c| Self::top_sentry(c, pdpte));
            d.set_sentry(Maddr::new(table.base().raw() + 8 * i), entry)?;
        }
        d.vcpus[v].root = Some(vt);
        Ok(())
    }

    /// Whether the top-level shadow vcpu `v` needs for `va` is missing although the guest
    /// table behind it is RAM now: the root was built while that table was not RAM (the host
    /// took the frame away, or a PDPTE named a gfn the host populated later).
    pub(super) fn top_is_back<H: MachineMemory>(
        d: &Domain<H>,
        v: usize,
        va: crate::addr::Gva,
    ) -> bool {
        let Some(vcpu) = d.vcpus.get(v) else {
            return false;
        };
        let index = if G::LEVELS == PagingLevels::Three {
            ((va.raw() >> 30) & 3) as usize
        } else {
            0
        };
        if vcpu.tops.get(index).copied().flatten().is_some() {
            return false;
        }
        let table = if G::LEVELS == PagingLevels::Three {
            match vcpu.ctl.pdptes.get(index) {
                Some(&pdpte) if pdpte & bits::P != 0 => pdpte & bits::ADDR_MASK_8,
                _ => return false,
            }
        } else {
            G::root_table(vcpu.ctl.cr3)
        };
        matches!(d.guest_frame(gfn_of(table)), Some((_, P2mType::Ram)))
    }

    /// Rebuilds vcpu `v`'s root from the registers it holds (not a CR3 load: a PAE guest's
    /// PDPTEs are not re-read).
    pub(super) fn reload_root<H: MachineMemory>(
        d: &mut Domain<H>,
        v: usize,
    ) -> Result<(), EngineError> {
        let load = RootLoad {
            pdptes: d.vcpus[v].ctl.pdptes,
            flavor: d.vcpus[v].flavor,
            fresh: false,
        };
        Self::update_cr3(d, v, load)
    }

    /// The flavor of top-level shadow `index`: a PAE guest's L2 behind PDPTE 3 gets its own
    /// ("high") shadow when the hypervisor hole sits in its range.
    fn top_flavor<H: MachineMemory>(d: &Domain<H>, flavor: Flavor, index: usize) -> Flavor {
        Flavor {
            high: G::LEVELS == PagingLevels::Three
                && index == 3
                && !d.config.external
                && S::LEVELS != PagingLevels::Four,
            ..flavor
        }
    }

    /// Gives back a vcpu's own top block when its new pair has none.
    fn drop_vcpu_top<H: MachineMemory>(d: &mut Domain<H>, v: usize) {
        if let Some(vt) = d.vcpus[v].vcpu_top.take() {
            d.hot.insert(vt);
            let _ = d.store.unpin(vt);
            d.store.unhash(vt);
        }
    }
}

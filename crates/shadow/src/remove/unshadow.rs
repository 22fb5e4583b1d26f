//! Unshadowing a page: every shadow of it unpinned and unhooked from the entries that point
//! at it (the up pointer first, a scan of the level above last), and the vcpus that ran on
//! one of them given a new root.

use alloc::vec::Vec;

use crate::addr::{Gfn, Maddr, Mfn};
use crate::domain::{Domain, EngineError};
use crate::flush::{Flush, VcpuSet};
use crate::host::MachineMemory;
use crate::p2m::P2mType;
use crate::types::{ShadowInfo, ShadowKind};

impl<H: MachineMemory> Domain<H> {
    /// Removes every shadow of guest frame `mfn`: unpins it, unhooks it from every upper
    /// shadow (the up pointer first, a scan if references remain) and from vcpus using it
    /// as a top level. The page is no longer a page table. Vcpus that lost their root are
    /// rebuilt by [`Domain::rebuild_roots`], which the caller runs once its own change (a
    /// p2m update, say) is complete.
    pub(crate) fn unshadow(&mut self, mfn: Mfn) -> Result<(), EngineError> {
        let heads: Vec<Mfn> = self.store.of_frame(mfn).map(|(_, h)| h).collect();
        if heads.is_empty() {
            return Ok(());
        }
        self.stats.unshadows += 1;
        let mut reload = VcpuSet::NONE;
        for head in heads {
            for v in 0..self.vcpus.len() {
                if self.vcpus[v].tops().any(|t| t == head) {
                    self.release_vcpu_tops(v)?;
                    reload = reload.union(VcpuSet::one(v));
                }
            }
            if let Some(dead) = self.store.unpin(head) {
                self.store.unhash(dead);
            }
            self.unhook(head)?;
            if !self.store.is_dying(head) {
                // Neither pinned nor referenced any more, but still hashed.
                self.store.unhash(head);
            }
        }
        self.pending_flush = self.all_vcpus();
        self.needs_root = self.needs_root.union(reload);
        Ok(())
    }

    /// Whether a vcpu runs on a top-level shadow of guest frame `mfn` now.
    pub(crate) fn is_top_in_use(&self, mfn: Mfn) -> bool {
        self.vcpus
            .iter()
            .flat_map(|v| v.tops())
            .any(|t| self.store.info(t).is_some_and(|i| i.key.frame == mfn.raw()))
    }

    /// Removes every shadow of a guest page and lets the guest write it directly (the page
    /// stopped being a page table, or an emulation cannot be done).
    pub fn unshadow_page(&mut self, gfn: Gfn) -> Result<Flush, EngineError> {
        self.run(|d| {
            if let Some((mfn, P2mType::Ram)) = d.guest_frame(gfn) {
                d.unshadow(mfn)?;
                d.rebuild_roots()?;
            }
            Ok(())
        })
        .map(|((), f)| f)
    }

    /// Clears every upper entry that points into the shadow at `head`: the up pointer
    /// first (with the entries next to it that point into the same shadow); while references remain (the count proves when none is left), the shadows
    /// that can point at it (one level up in its guest mode, and vcpu tops), stopping as
    /// soon as the count reaches zero; then, should any remain, every upper shadow.
    pub(crate) fn unhook(&mut self, head: Mfn) -> Result<(), EngineError> {
        let Some(info) = self.store.info(head).copied() else {
            return Ok(());
        };
        if info.refs == 0 {
            return Ok(());
        }
        let pages = 1u64 << info.order;
        let inside =
            move |m: Option<Mfn>| m.is_some_and(|m| m >= head && m.raw() < head.raw() + pages);
        if let Some(up) = info.up {
            let upper = self
                .store
                .containing(up.mfn())
                .is_some_and(|(_, i)| !i.key.kind.is_leaf_table());
            if upper {
                // The up entry and its neighbours: a multi-page shadow is pointed at by
                // consecutive entries (the two or four shadow entries of one 32-bit guest
                // entry, a vcpu top's four PDPTEs), all in one aligned group of four.
                let width = self.sentry_bytes();
                let group = up.raw() & !(4 * width - 1);
                for i in 0..4 {
                    let slot = Maddr::new(group + i * width);
                    if inside(self.sentry_frame(self.read_sentry(slot)?)) {
                        self.set_sentry(slot, 0)?;
                    }
                }
            }
        }
        let referenced = |d: &Self| d.store.info(head).is_some_and(|i| i.refs > 0);
        if !referenced(self) {
            self.stats.unhook_by_pointer += 1;
            return Ok(());
        }
        self.stats.unhook_by_scan += 1;
        let parents = self.parent_shadows(&info);
        self.rewrite_entries_until(
            &parents,
            |d| !referenced(d),
            |d, _, e| inside(d.sentry_frame(e)).then_some(0),
        )?;
        if referenced(self) {
            let uppers: Vec<(Mfn, u8)> = self
                .store
                .shadows()
                .filter(|(_, i)| !i.key.kind.is_leaf_table())
                .map(|(h, i)| (h, i.order))
                .collect();
            self.rewrite_entries_until(
                &uppers,
                |d| !referenced(d),
                |d, _, e| inside(d.sentry_frame(e)).then_some(0),
            )?;
        }
        Ok(())
    }

    /// The shadows whose entries can point at a shadow like `child`: those of the next
    /// level up in the same guest mode, and vcpu tops.
    fn parent_shadows(&self, child: &ShadowInfo) -> Vec<(Mfn, u8)> {
        let kind = child.key.kind;
        let level = kind.level();
        self.store
            .shadows()
            .filter(|(_, i)| {
                let k = i.key.kind;
                k == ShadowKind::VcpuTop
                    || (k.level() == level + 1 && k.guest_levels() == kind.guest_levels())
            })
            .map(|(h, i)| (h, i.order))
            .collect()
    }
}

//! Finding shadow entries without reverse maps (seed slide "No reverse maps"): remove write
//! access to a frame, remove every mapping of a frame, and unshadow a page. Cheap pointers
//! first (the last-writable-mapping pointer, a shadow's up pointer), brute force last.

use alloc::vec::Vec;

use crate::addr::{Maddr, Mfn, PAGE_SIZE};
use crate::domain::{Domain, EngineError};
use crate::flush::VcpuSet;
use crate::host::MachineMemory;
use crate::paging::bits;

impl<H: MachineMemory> Domain<H> {
    /// Heads of every shadow whose entries map pages (L1s and splinters), dying ones too.
    fn leaf_shadows(&self) -> Vec<(Mfn, u8)> {
        self.store
            .shadows()
            .filter(|(_, i)| i.key.kind.is_leaf_table())
            .map(|(h, i)| (h, i.order))
            .collect()
    }

    /// Heads of every shadow whose entries point at other shadows, dying ones too.
    fn upper_shadows(&self) -> Vec<(Mfn, u8)> {
        self.store
            .shadows()
            .filter(|(_, i)| !i.key.kind.is_leaf_table())
            .map(|(h, i)| (h, i.order))
            .collect()
    }

    /// Rewrites every entry of the listed shadows for which `pick` returns a new value.
    pub(crate) fn rewrite_entries(
        &mut self,
        shadows: &[(Mfn, u8)],
        mut pick: impl FnMut(&Self, u64) -> Option<u64>,
    ) -> Result<(), EngineError> {
        let width = self.sentry_bytes();
        for &(head, order) in shadows {
            let mut offset = 0;
            while offset < PAGE_SIZE << order {
                let slot = Maddr::new(head.base().raw() + offset);
                let entry = self.host.read_entry(slot, width)?;
                self.stats.scanned_entries += 1;
                if let Some(new) = pick(self, entry) {
                    self.set_sentry(slot, new)?;
                }
                offset += width;
            }
        }
        Ok(())
    }

    /// Removes every writable mapping of guest frame `mfn` (it is becoming a page table):
    /// the direct p2m mappings used by vcpus with paging disabled, then the last-writable
    /// pointer, then a scan of every L1 shadow. The frame's writable count proves the
    /// search complete.
    pub(crate) fn remove_write_access(&mut self, mfn: Mfn) -> Result<(), EngineError> {
        self.protect_in_p2m(mfn)?;
        let meta = self.store.frame(mfn);
        if meta.writable == 0 {
            return Ok(());
        }
        self.stats.write_access_removals += 1;
        if let Some(slot) = meta.last_writable {
            let entry = self.read_sentry(slot)?;
            if self.sentry_frame(entry) == Some(mfn)
                && entry & bits::RW != 0
                && self
                    .store
                    .containing(slot.mfn())
                    .is_some_and(|(_, i)| i.key.kind.is_leaf_table())
            {
                self.set_sentry(slot, entry & !bits::RW)?;
            }
        }
        if self.store.frame(mfn).writable == 0 {
            self.stats.write_access_by_pointer += 1;
            return Ok(());
        }
        self.stats.write_access_by_scan += 1;
        let leaves = self.leaf_shadows();
        self.rewrite_entries(&leaves, |d, e| {
            (d.sentry_frame(e) == Some(mfn) && e & bits::RW != 0).then_some(e & !bits::RW)
        })?;
        if self.store.frame(mfn).writable != 0 {
            return Err(EngineError::Internal(
                "writable mappings left after a full scan",
            ));
        }
        Ok(())
    }

    /// Clears RW in the p2m entries of `mfn`, which vcpus with paging disabled use directly.
    pub(crate) fn protect_in_p2m(&mut self, mfn: Mfn) -> Result<(), EngineError> {
        let Some(p2m) = self.p2m.as_mut() else {
            return Ok(());
        };
        let gfns: Vec<_> = self
            .m2p
            .get(&mfn)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        let mut changed = false;
        for gfn in gfns {
            self.p2m_writable.remove(&gfn);
            changed |= p2m.set_writable(&mut self.host, gfn, false)?;
        }
        if changed {
            self.pending_flush = self.all_vcpus();
        }
        Ok(())
    }

    /// Removes every shadow mapping of guest frame `mfn` (its p2m entry changed, or it
    /// leaves the domain).
    pub(crate) fn remove_all_mappings(&mut self, mfn: Mfn) -> Result<(), EngineError> {
        self.stats.mapping_removals += 1;
        let leaves = self.leaf_shadows();
        self.rewrite_entries(&leaves, |d, e| {
            (d.sentry_frame(e) == Some(mfn)).then_some(0)
        })?;
        if self.store.frame(mfn).writable != 0 {
            return Err(EngineError::Internal("mappings left after a full scan"));
        }
        Ok(())
    }

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

    /// Reloads the shadow root of every vcpu that lost it to an unshadow.
    pub(crate) fn rebuild_roots(&mut self) -> Result<(), EngineError> {
        let needs = core::mem::take(&mut self.needs_root);
        for v in 0..self.vcpus.len() {
            if needs.contains(v)
                && let Some(pair) = self.vcpus[v].pair
            {
                pair.update_cr3(self, v)?;
            }
        }
        Ok(())
    }

    /// Removes every shadow of a guest page and lets the guest write it directly (the page
    /// stopped being a page table, or an emulation cannot be done).
    pub fn unshadow_page(
        &mut self,
        gfn: crate::addr::Gfn,
    ) -> Result<crate::flush::Flush, EngineError> {
        self.run(|d| {
            if let Some((mfn, crate::p2m::P2mType::Ram)) = d.guest_frame(gfn) {
                d.unshadow(mfn)?;
                d.rebuild_roots()?;
            }
            Ok(())
        })
        .map(|((), f)| f)
    }

    /// Clears every upper entry that points into the shadow at `head`.
    pub(crate) fn unhook(&mut self, head: Mfn) -> Result<(), EngineError> {
        let Some(info) = self.store.info(head).copied() else {
            return Ok(());
        };
        let pages = 1u64 << info.order;
        let inside = |m: Option<Mfn>| m.is_some_and(|m| m >= head && m.raw() < head.raw() + pages);
        if let Some(up) = info.up {
            let entry = self.read_sentry(up)?;
            let upper = self
                .store
                .containing(up.mfn())
                .is_some_and(|(_, i)| !i.key.kind.is_leaf_table());
            if upper && inside(self.sentry_frame(entry)) {
                self.set_sentry(up, 0)?;
            }
        }
        if self.store.info(head).is_some_and(|i| i.refs > 0) {
            let uppers = self.upper_shadows();
            self.rewrite_entries(&uppers, |d, e| inside(d.sentry_frame(e)).then_some(0))?;
        }
        Ok(())
    }
}

//! Writing shadow entries with exact bookkeeping, and the life of a shadow: allocation
//! from the pool (evicting in LRU order, before anything changes), the dying queue torn down
//! in bounded steps, and throwing everything away as a last resort.

use super::{Domain, EngineError};
use crate::addr::{Maddr, Mfn, PAGE_SIZE};
use crate::flush::VcpuSet;
use crate::host::MachineMemory;
use crate::paging::{PagingLevels, bits};
use crate::types::{ShadowKey, ShadowKind};

pub(crate) use super::marker::{MAGIC, MAGIC_NOT_PRESENT, Magic, is_magic};

impl<H: MachineMemory> Domain<H> {
    /// Bytes per shadow entry.
    pub(crate) fn sentry_bytes(&self) -> u64 {
        if self.config.shadow_levels == PagingLevels::Two {
            4
        } else {
            8
        }
    }

    /// Whether shadow L1 entries may carry magic (reserved-bit) encodings.
    pub(crate) fn fast_path_on(&self) -> bool {
        self.config.fast_path
            && self.config.shadow_levels != PagingLevels::Two
            && super::marker::MmioLayout::new(self.config.host_maxphyaddr).is_some()
    }

    /// The frame a shadow entry points at, if it is present and not magic.
    pub(crate) fn sentry_frame(&self, entry: u64) -> Option<Mfn> {
        if entry & bits::P == 0 || is_magic(entry) || self.is_hole_entry(entry) {
            return None;
        }
        let mask = if self.sentry_bytes() == 4 {
            bits::ADDR_MASK_4
        } else {
            bits::ADDR_MASK_8
        };
        Some(Mfn::new((entry & mask) >> 12))
    }

    /// All vcpus of the domain.
    pub(crate) fn all_vcpus(&self) -> VcpuSet {
        VcpuSet(u64::MAX >> (64 - self.vcpus.len().clamp(1, 64)))
    }

    /// Reads a shadow entry.
    pub(crate) fn read_sentry(&self, slot: Maddr) -> Result<u64, EngineError> {
        Ok(self.host.read_entry(slot, self.sentry_bytes())?)
    }

    /// Writes a shadow entry, keeping every count exact: references to lower shadows from
    /// upper entries, writable mappings of guest frames from leaf entries, the log-dirty
    /// record of entries made writable, and the TLB flush owed when a permission goes.
    pub(crate) fn set_sentry(&mut self, slot: Maddr, new: u64) -> Result<(), EngineError> {
        let kind = self
            .store
            .containing(slot.mfn())
            .map(|(_, info)| info.key.kind)
            .ok_or(EngineError::Internal(
                "shadow entry write outside any shadow",
            ))?;
        let width = self.sentry_bytes();
        let new = if kind.is_leaf_table() {
            self.admit_leaf(new)
        } else {
            self.admit_upper(new)
        };
        let old = self.host.read_entry(slot, width)?;
        self.stats.add_work(1);
        if old == new {
            return Ok(());
        }
        self.host.write_entry(slot, width, new)?;
        self.entries_written += 1;
        let old_frame = self.sentry_frame(old);
        let new_frame = self.sentry_frame(new);
        if kind.is_leaf_table() {
            #[cfg(feature = "rmap")]
            if let Some(rmap) = self.rmap.as_mut()
                && old_frame != new_frame
            {
                if let Some(m) = old_frame {
                    rmap.remove(m, slot);
                }
                if let Some(m) = new_frame {
                    rmap.add(m, slot);
                }
            }
            if let Some(m) = old_frame
                && old & bits::RW != 0
            {
                self.store.remove_writable(m);
            }
            if let Some(m) = new_frame
                && new & bits::RW != 0
            {
                self.store.add_writable(m, slot);
                if let Some(log) = &mut self.log_dirty {
                    log.writable_slots.insert(slot);
                }
            }
        } else {
            // A superpage entry maps guest frames: no shadow below it to count.
            self.note_upper_sentry(kind.level(), slot, old, new);
            let new_child = new_frame.filter(|_| !self.is_superpage_sentry(kind.level(), new));
            let old_child = old_frame.filter(|_| !self.is_superpage_sentry(kind.level(), old));
            // Take the new reference before dropping the old one: relinking the same child
            // with other flags must not let its count touch zero.
            if let Some(child) = new_child {
                self.store.add_ref(child, slot);
            }
            if let Some(child) = old_child {
                if !self.reaping_cold
                    && let Some((head, _)) = self.store.containing(child)
                {
                    self.hot.insert(head);
                }
                if let Some(dead) = self.store.drop_ref(child) {
                    self.store.unhash(dead);
                }
            }
        }
        if old_frame.is_some() && !grants_at_least(old, new, old_frame == new_frame) {
            self.pending_flush = self.all_vcpus();
        }
        Ok(())
    }

    /// Finds or makes the shadow with `key`; a new shadow is empty (every entry not
    /// present, filled on demand). Making the first shadow of a guest frame removes every
    /// writable mapping of it first.
    pub(crate) fn get_or_create(&mut self, key: ShadowKey) -> Result<(Mfn, bool), EngineError> {
        if let Some(head) = self.store.lookup(&key) {
            if !self.being_unhooked(head) {
                return Ok((head, false));
            }
            // Its unshadow waits for a scan: this call goes on with it, then makes anew.
            self.continue_unshadow(head)?;
        }
        if !key.kind.is_fl1() && key.kind != ShadowKind::VcpuTop {
            // Shadowed anew (another level, or flavor): its shadows must agree first.
            self.resync_page(Mfn::new(key.frame), super::oos::ResyncReason::Shadowed)?;
        }
        let order = key.kind.order(self.config.shadow_levels);
        let head = self.take_block(order)?;
        for i in 0..1u64 << order {
            self.host.zero_frame(Mfn::new(head.raw() + i))?;
        }
        let frame = Mfn::new(key.frame);
        let first_of_frame = !key.kind.is_fl1()
            && key.kind != ShadowKind::VcpuTop
            && !self.store.is_page_table(frame);
        self.install_hole(head, key.kind)?;
        self.store.insert(key, head, order);
        self.stats.shadows_created += 1;
        if first_of_frame {
            self.remove_write_access(frame)?;
        }
        Ok((head, true))
    }

    fn take_block(&mut self, order: u8) -> Result<Mfn, EngineError> {
        if let Some(i) = self.reserve.blocks.iter().position(|b| b.1 == order) {
            return Ok(self.reserve.blocks.swap_remove(i).0);
        }
        self.alloc_evicting(order)
    }

    /// Allocates a pool block, freeing dying shadows, then unpinning least recently used
    /// top-level shadows, then throwing every shadow away, until it succeeds.
    fn alloc_evicting(&mut self, order: u8) -> Result<Mfn, EngineError> {
        let mut blown = false;
        loop {
            // Unless nothing else is left to evict: a guest access never fails for a shrink.
            let over_target = !blown && self.over_target(self.pool.used_pages() + (1 << order));
            if !over_target && let Some(m) = self.pool.alloc(order) {
                return Ok(m);
            }
            if self.out_of_work() {
                // The shadows torn down so far stay torn down: the retry goes on from here.
                return Err(EngineError::Preempted);
            }
            if self.reap_one()? || self.evict_one()? {
                continue;
            }
            // Pages torn down in this operation are reusable only after its flush: the
            // operation stops here, hands the flush out, and its retry finds them.
            if self.limbo.pages() > 0 {
                return Err(EngineError::Preempted);
            }
            if blown {
                return Err(EngineError::PoolExhausted);
            }
            self.blow_tables()?;
            blown = true;
        }
    }

    /// Whether `used` pages in use would exceed the pool's target while a shrink is under
    /// way: the pool then serves no more than its target, so that the guest cannot refill
    /// the chunks being given back.
    fn over_target(&self, used: usize) -> bool {
        self.pool.total_pages() > self.pool_target && used > self.pool_target
    }

    /// Whether [`Domain::prealloc`] of `orders` would take its blocks without evicting
    /// anything, so that reserving and releasing them changes nothing and an operation
    /// that will create nothing may skip it. (Sufficient, not necessary: a false answer
    /// only costs a reserve.)
    pub(crate) fn prealloc_is_idle(&self, orders: &[u8]) -> bool {
        let pages: usize = orders.iter().map(|&o| 1usize << o).sum();
        if self.over_target(self.pool.used_pages() + pages) {
            return false;
        }
        // A whole free chunk serves any block; any free page serves a one-page block.
        self.pool.free_whole_chunks() >= orders.len()
            || (orders.iter().all(|&o| o == 0) && self.pool.free_pages() >= orders.len())
    }

    /// Sets aside pool blocks of `orders` before an operation changes anything, so that
    /// the operation cannot run out half-way.
    pub(crate) fn prealloc(&mut self, orders: &[u8]) -> Result<(), EngineError> {
        for &order in orders {
            let block = self.alloc_evicting(order)?;
            self.reserve.blocks.push((block, order));
        }
        Ok(())
    }

    /// [`Domain::prealloc`] of the `orders` the reserve does not hold already (an operation
    /// that set its blocks aside earlier, before it changed anything).
    pub(crate) fn prealloc_missing(&mut self, orders: &[u8]) -> Result<(), EngineError> {
        let mut held: alloc::vec::Vec<u8> = self.reserve.blocks.iter().map(|b| b.1).collect();
        for &order in orders {
            match held.iter().position(|&o| o == order) {
                Some(i) => {
                    held.swap_remove(i);
                }
                None => {
                    let block = self.alloc_evicting(order)?;
                    self.reserve.blocks.push((block, order));
                }
            }
        }
        Ok(())
    }

    /// Sets aside the pool blocks that rebuilding the roots of the vcpus running on a
    /// top-level shadow of guest frame `mfn` may take (a new top for each, and an empty
    /// root block for a vcpu without one), before an operation that unshadows `mfn`
    /// changes anything: its rebuild then cannot fail for want of a page.
    pub(crate) fn prealloc_root_rebuilds(&mut self, mfn: Mfn) -> Result<(), EngineError> {
        let shadow = self.config.shadow_levels;
        let mut orders = alloc::vec::Vec::new();
        for vcpu in &self.vcpus {
            let Some(guest) = vcpu.pair.map(|p| p.guest()) else {
                continue;
            };
            let hashed_top = if guest == PagingLevels::Three {
                2
            } else {
                guest.count()
            };
            let Some(kind) = ShadowKind::for_guest(guest, hashed_top) else {
                continue;
            };
            let on_frame = vcpu
                .tops()
                .filter(|&t| self.store.info(t).is_some_and(|i| i.key.frame == mfn.raw()))
                .count();
            orders.extend(core::iter::repeat_n(kind.order(shadow), on_frame));
            if on_frame > 0 && vcpu.vcpu_top.is_none() {
                orders.push(ShadowKind::VcpuTop.order(shadow));
            }
        }
        self.prealloc(&orders)
    }

    /// Gives unused reserved blocks back to the pool.
    pub(crate) fn release_reserve(&mut self) {
        for (block, order) in core::mem::take(&mut self.reserve.blocks) {
            // A reserved block came from this pool, so freeing it cannot fail; if it does,
            // the pool's own check reports the inconsistency to the auditor.
            let _ = self.pool.free(block, order);
        }
    }

    /// Tears down up to `budget` dying shadows.
    pub(crate) fn reap(&mut self, budget: usize) -> Result<(), EngineError> {
        for _ in 0..budget {
            if !self.reap_one()? {
                break;
            }
        }
        Ok(())
    }

    /// Tears down one dying shadow: clears its entries (dropping its references) and gives
    /// its pages back to the pool. False if none is dying.
    pub(crate) fn reap_one(&mut self) -> Result<bool, EngineError> {
        let Some(head) = self.store.next_dying() else {
            return Ok(false);
        };
        let order = self
            .store
            .info(head)
            .map(|i| i.order)
            .ok_or(EngineError::Internal("dying shadow without metadata"))?;
        let width = self.sentry_bytes();
        let bytes = PAGE_SIZE << order;
        let hot = self.hot.contains(&head);
        self.reaping_cold = !hot;
        let mut offset = 0;
        let mut cleared = Ok(());
        while offset < bytes && cleared.is_ok() {
            let slot = Maddr::new(head.base().raw() + offset);
            self.stats.add_work(1);
            cleared = match self.host.read_entry(slot, width) {
                Ok(0) => Ok(()),
                Ok(_) => self.set_sentry(slot, 0),
                Err(e) => Err(e.into()),
            };
            offset += width;
        }
        self.reaping_cold = false;
        cleared?;
        self.store.forget(head);
        if hot {
            self.limbo.add(head, order);
        } else {
            self.pool.free(head, order)?;
        }
        self.stats.shadows_destroyed += 1;
        Ok(true)
    }

    /// Whether `head` is a top-level shadow some vcpu uses now.
    pub(crate) fn in_use(&self, head: Mfn) -> bool {
        self.vcpus
            .iter()
            .any(|v| v.tops().any(|t| t == head) || v.vcpu_top == Some(head))
    }

    /// Unpins the least recently used top-level shadow that no vcpu uses.
    pub(crate) fn evict_one(&mut self) -> Result<bool, EngineError> {
        let victim = self.store.pinned_lru().find(|&head| !self.in_use(head));
        let Some(head) = victim else {
            return Ok(false);
        };
        if let Some(dead) = self.store.unpin(head) {
            self.store.unhash(dead);
        }
        self.stats.evictions += 1;
        self.pending_flush = self.all_vcpus();
        Ok(true)
    }

    /// Throws away every shadow not needed to keep the vcpus' roots valid: unpins every
    /// unused top and empties the tops in use; everything that falls is queued to die, and
    /// torn down while the call's work budget lasts (the rest by later calls, or by the
    /// allocation that needs the room).
    pub(crate) fn blow_tables(&mut self) -> Result<(), EngineError> {
        self.stats.blow_tables += 1;
        let pinned: alloc::vec::Vec<Mfn> = self.store.pinned_lru().collect();
        for head in pinned {
            if !self.in_use(head) {
                if let Some(dead) = self.store.unpin(head) {
                    self.store.unhash(dead);
                }
                self.stats.evictions += 1;
                self.stats.add_work(1);
            }
        }
        let in_use: alloc::vec::Vec<Mfn> = self.vcpus.iter().flat_map(|v| v.tops()).collect();
        for head in in_use {
            self.clear_shadow(head)?;
        }
        while !self.out_of_work() && self.reap_one()? {}
        self.pending_flush = self.all_vcpus();
        Ok(())
    }

    /// Clears every entry of a shadow (it stays, empty).
    pub(crate) fn clear_shadow(&mut self, head: Mfn) -> Result<(), EngineError> {
        let Some(order) = self.store.info(head).map(|i| i.order) else {
            return Ok(());
        };
        let width = self.sentry_bytes();
        let mut offset = 0;
        while offset < PAGE_SIZE << order {
            let slot = Maddr::new(head.base().raw() + offset);
            self.stats.add_work(1);
            let entry = self.host.read_entry(slot, width)?;
            if entry != 0 && !self.is_hole_entry(entry) {
                self.set_sentry(slot, 0)?;
            }
            offset += width;
        }
        Ok(())
    }

    /// Forgets which top-level shadows a vcpu uses (they stay pinned, in MRU order) and
    /// empties its own top block.
    pub(crate) fn release_vcpu_tops(&mut self, v: usize) -> Result<(), EngineError> {
        let Some(vcpu) = self.vcpus.get_mut(v) else {
            return Err(EngineError::BadArgument("no such vcpu"));
        };
        let released: alloc::vec::Vec<Mfn> = vcpu.tops().chain(vcpu.vcpu_top).collect();
        vcpu.tops = [None; 4];
        vcpu.root = None;
        self.hot.extend(released);
        if let Some(top) = self.vcpus[v].vcpu_top {
            self.clear_shadow(top)?;
        }
        self.pending_reload = self.pending_reload.union(VcpuSet::one(v));
        Ok(())
    }
}

/// Whether shadow entry `new` allows everything `old` allowed (so no flush is needed).
fn grants_at_least(old: u64, new: u64, same_frame: bool) -> bool {
    let present = new & bits::P != 0 && !is_magic(new);
    present
        && same_frame
        && (old & bits::RW == 0 || new & bits::RW != 0)
        && (old & bits::US == 0 || new & bits::US != 0)
        && (old & bits::NX != 0 || new & bits::NX == 0)
}

//! Counters for every kind of fault and outcome (the statistics control op).

/// Engine counters of one domain. Every trap the engine handles is counted once under
/// exactly one of the `fault_*` outcomes, so traps per guest operation can be derived.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Page faults handed to the engine.
    pub faults: u64,
    /// Faults fixed by writing shadow entries (the guest retries).
    pub fault_fixed: u64,
    /// Splinter entries filled ahead of a fault (after the one a fill needed).
    pub prefetched: u64,
    /// Shadow superpage entries written (a guest superpage mapped by one shadow entry).
    pub superpages_mapped: u64,
    /// Shadow superpage entries split (removed because a frame of theirs stopped allowing
    /// them; later faults fill splinters).
    pub superpage_splits: u64,
    /// Faults reflected to the guest, which must see them.
    pub fault_propagated: u64,
    /// Faults that need the write emulated (a write to a shadowed page table).
    pub fault_emulate: u64,
    /// Faults on MMIO space.
    pub fault_mmio: u64,
    /// Faults that needed nothing (another vcpu had already fixed the entry).
    pub fault_spurious: u64,
    /// Faults recognised from the shadow entry alone (reserved-bit fast path).
    pub fast_path: u64,
    /// Of those, guest-not-present faults propagated without a guest walk.
    pub fast_path_not_present: u64,
    /// Of those, MMIO faults.
    pub fast_path_mmio: u64,
    /// Faults that found the shadow L1 entry read-only because the guest entry's D was
    /// clear (the walk set D).
    pub fault_dirty_bit: u64,
    /// Faults that set a guest entry's A bit.
    pub fault_accessed_bit: u64,
    /// Log-dirty faults: first write to a page since the last clean.
    pub fault_log_dirty: u64,
    /// CR3 loads.
    pub cr3_loads: u64,
    /// CR3 loads that found their top-level shadow cached.
    pub cr3_cached: u64,
    /// Paging-mode updates.
    pub mode_updates: u64,
    /// INVLPGs.
    pub invlpg: u64,
    /// Guest page-table writes validated into shadows (entries).
    pub validated_entries: u64,
    /// Writes emulated or performed on the guest's behalf.
    pub emulated_writes: u64,
    /// Instructions the emulator could not do (the page was unshadowed instead).
    pub emulation_failures: u64,
    /// Write-access removals done with the reverse map.
    pub write_access_by_rmap: u64,
    /// Shadows created.
    pub shadows_created: u64,
    /// Shadows destroyed.
    pub shadows_destroyed: u64,
    /// Pages whose shadows were all removed (unshadowed).
    pub unshadows: u64,
    /// Top-level shadows unpinned to make room (LRU eviction).
    pub evictions: u64,
    /// Times every shadow was thrown away to make room.
    pub blow_tables: u64,
    /// Write-access removals when a page became a page table.
    pub write_access_removals: u64,
    /// Of those, satisfied by the last-writable-mapping pointer alone.
    pub write_access_by_pointer: u64,
    /// Of those, completed by a brute-force scan of L1 shadows.
    pub write_access_by_scan: u64,
    /// Tries of the last-writable pointer, method (a) (a deferred removal tries again).
    pub write_access_pointer_tried: u64,
    /// Tries of the linear-map hints, method (b).
    pub write_access_hint_tried: u64,
    /// Removals completed by the linear-map hints.
    pub write_access_by_hint: u64,
    /// Removals that needed the brute-force scan, method (c).
    pub write_access_scan_tried: u64,
    /// Bounded steps of that scan run.
    pub write_access_scan_steps: u64,
    /// Page faults answered with a retry because the scan had not finished within its
    /// budget (the next fault continues it).
    pub write_access_deferred: u64,
    /// Scans finished inside a fault because a pass could not complete them (the guest
    /// re-created writable mappings behind the cursor).
    pub write_access_scan_fallbacks: u64,
    /// Shadow L1 entries scanned by brute-force searches.
    pub scanned_entries: u64,
    /// Mapping removals (p2m changes).
    pub mapping_removals: u64,
    /// Shadows unhooked by their up pointer alone.
    pub unhook_by_pointer: u64,
    /// Shadows that needed a scan of upper shadows to unhook.
    pub unhook_by_scan: u64,
    /// Pages unshadowed by the fork/exit heuristic (consecutive emulated writes clearing
    /// entries of one page table).
    pub early_unshadows: u64,
    /// Pages unshadowed by the zeroed-page teardown hint.
    pub teardown_zeroed: u64,
    /// Pages unshadowed by the data-reuse teardown hint.
    pub teardown_data: u64,
    /// Pages unshadowed before an emulated write overwrote all of them (a page-sized REP
    /// STOS or REP MOVS chunk), instead of validating every entry and reaping after.
    pub overwrite_unshadows: u64,
    /// TLB flushes requested of the host.
    pub flushes: u64,
    /// Pages marked dirty in log-dirty mode.
    pub dirty_marked: u64,
    /// Engine calls made into the domain (guest-triggered and host operations).
    pub calls: u64,
    /// The most work any one engine call did: shadow and p2m entries read or written by
    /// its scans and entry writes (see [`Stats::last_call_work`]). Bounded by
    /// [`DomainConfig::call_work_budget`](crate::DomainConfig::call_work_budget) plus a
    /// small constant per call.
    pub max_call_work: u64,
    /// The work of the last engine call (reset when a call starts). Not a counter, so not
    /// among [`Stats::fields`].
    pub last_call_work: u64,
}

impl Stats {
    /// Every counter as (name, value), in declaration order: the engine has no serde
    /// dependency, so hosts print or serialise these pairs.
    pub fn fields(&self) -> [(&'static str, u64); 50] {
        [
            ("faults", self.faults),
            ("fault_fixed", self.fault_fixed),
            ("prefetched", self.prefetched),
            ("fault_propagated", self.fault_propagated),
            ("fault_emulate", self.fault_emulate),
            ("fault_mmio", self.fault_mmio),
            ("fault_spurious", self.fault_spurious),
            ("fast_path", self.fast_path),
            ("fast_path_not_present", self.fast_path_not_present),
            ("fast_path_mmio", self.fast_path_mmio),
            ("fault_dirty_bit", self.fault_dirty_bit),
            ("fault_accessed_bit", self.fault_accessed_bit),
            ("fault_log_dirty", self.fault_log_dirty),
            ("cr3_loads", self.cr3_loads),
            ("cr3_cached", self.cr3_cached),
            ("mode_updates", self.mode_updates),
            ("invlpg", self.invlpg),
            ("validated_entries", self.validated_entries),
            ("emulated_writes", self.emulated_writes),
            ("emulation_failures", self.emulation_failures),
            ("write_access_by_rmap", self.write_access_by_rmap),
            ("shadows_created", self.shadows_created),
            ("shadows_destroyed", self.shadows_destroyed),
            ("unshadows", self.unshadows),
            ("evictions", self.evictions),
            ("blow_tables", self.blow_tables),
            ("superpages_mapped", self.superpages_mapped),
            ("superpage_splits", self.superpage_splits),
            ("write_access_removals", self.write_access_removals),
            ("write_access_by_pointer", self.write_access_by_pointer),
            ("write_access_by_scan", self.write_access_by_scan),
            (
                "write_access_pointer_tried",
                self.write_access_pointer_tried,
            ),
            ("write_access_hint_tried", self.write_access_hint_tried),
            ("write_access_by_hint", self.write_access_by_hint),
            ("write_access_scan_tried", self.write_access_scan_tried),
            ("write_access_scan_steps", self.write_access_scan_steps),
            ("write_access_deferred", self.write_access_deferred),
            (
                "write_access_scan_fallbacks",
                self.write_access_scan_fallbacks,
            ),
            ("scanned_entries", self.scanned_entries),
            ("mapping_removals", self.mapping_removals),
            ("unhook_by_pointer", self.unhook_by_pointer),
            ("unhook_by_scan", self.unhook_by_scan),
            ("early_unshadows", self.early_unshadows),
            ("teardown_zeroed", self.teardown_zeroed),
            ("teardown_data", self.teardown_data),
            ("overwrite_unshadows", self.overwrite_unshadows),
            ("flushes", self.flushes),
            ("dirty_marked", self.dirty_marked),
            ("calls", self.calls),
            ("max_call_work", self.max_call_work),
        ]
    }

    /// Counts `entries` shadow or p2m entries read or written by the call in progress.
    pub(crate) fn add_work(&mut self, entries: u64) {
        self.last_call_work = self.last_call_work.saturating_add(entries);
        self.max_call_work = self.max_call_work.max(self.last_call_work);
    }

    /// A new engine call starts: its work is counted from zero.
    pub(crate) fn start_call(&mut self) {
        self.calls += 1;
        self.last_call_work = 0;
    }
}

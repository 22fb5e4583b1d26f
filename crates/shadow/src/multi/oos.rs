//! The engine's side of out-of-sync shadows (see `domain::oos`): finding the shadow leaf a
//! write fault came through (to give it write access), and the sync points that depend on
//! an address's walk (a fault through an out-of-sync page, INVLPG).

use super::{Engine, Supported};
use crate::addr::{Gpa, Gva, Maddr, Mfn};
use crate::domain::guest_mem::{FrameCache, FrameMap, GuestMem};
use crate::domain::{Domain, EngineError};
use crate::host::MachineMemory;
use crate::p2m::P2mType;
use crate::paging::{
    Access, AccessKind, AdUpdate, PagingLevels, PagingMode, Privilege, WalkEnv, bits, walk_mode,
};

impl<G: PagingMode, S: PagingMode> Engine<G, S>
where
    (G, S): Supported,
{
    /// The machine frame of the guest L1 table the guest's walk of `va` reads, and the
    /// entry's byte offset in it, if any (a walk without A/D updates: it changes nothing).
    fn walked_l1<H: MachineMemory>(
        d: &mut Domain<H>,
        v: usize,
        va: Gva,
        access: Access,
    ) -> Option<(Mfn, u64)> {
        let ctl = d.vcpus.get(v)?.ctl;
        let feat = d.config.guest_features;
        let env = WalkEnv {
            ctl: &ctl,
            feat: &feat,
            ad: AdUpdate::Skip,
        };
        let frames = FrameCache::new();
        let map = match &d.p2m {
            Some(p2m) => FrameMap::Translated(p2m),
            None => FrameMap::Direct(&d.owned),
        };
        let mut mem = GuestMem::new(&mut d.host, map, &frames);
        let path = match walk_mode::<G, Gpa, _>(&mut mem, env, va, access) {
            Ok(t) => t.path,
            Err(f) => f.path,
        };
        let entry = path.at_level(1)?.addr;
        match frames.guest_frame(d, entry.gfn()) {
            Some((mfn, P2mType::Ram)) => Some((mfn, entry.offset())),
            _ => None,
        }
    }

    /// Before a fault is handled: brings the L1 entry the guest's walk of `va` goes through
    /// in sync if its page is out of sync, so the fault is decided on the guest's entry as
    /// it is (an entry the guest made present or more permissive never faults visibly).
    pub(super) fn resync_walked<H: MachineMemory>(
        d: &mut Domain<H>,
        v: usize,
        va: Gva,
        access: Access,
    ) -> Result<(), EngineError> {
        if !d.any_out_of_sync() {
            return Ok(());
        }
        if let Some((l1, offset)) = Self::walked_l1(d, v, va, access) {
            d.sync_word(l1, offset, false)?;
        }
        Ok(())
    }

    /// Whether the fast path must leave the shadow leaf at `slot` to the slow path: it sits
    /// in an L1 shadow of an out-of-sync page, whose not-present or MMIO markers may be
    /// stale (the slow path resyncs first).
    pub(super) fn fast_path_out_of_sync<H: MachineMemory>(d: &Domain<H>, slot: Maddr) -> bool {
        d.any_out_of_sync()
            && d.store.containing(slot.mfn()).is_some_and(|(_, info)| {
                !info.key.kind.is_fl1() && d.is_out_of_sync(Mfn::new(info.key.frame))
            })
    }

    /// Whether the guest L1 holding the entry at `gl1e` is out of sync: its other entries
    /// may differ from what its shadows were validated from, so nothing may be filled
    /// from them ahead of a fault.
    pub(super) fn l1_out_of_sync<H: MachineMemory>(
        d: &Domain<H>,
        frames: &FrameCache,
        gl1e: Gpa,
    ) -> bool {
        d.any_out_of_sync()
            && matches!(frames.guest_frame(d, gl1e.gfn()), Some((mfn, P2mType::Ram)) if d.is_out_of_sync(mfn))
    }

    /// INVLPG: brings the L1 entry the walk of `va` goes through in sync (the rest of an
    /// out-of-sync page may stay as it is: INVLPG promises nothing for other addresses);
    /// returns whether the hardware must flush `va`.
    pub(super) fn invlpg<H: MachineMemory>(
        d: &mut Domain<H>,
        v: usize,
        va: Gva,
    ) -> Result<bool, EngineError> {
        if G::NUM_LEVELS == 0 {
            return Ok(false);
        }
        if d.any_out_of_sync() {
            let va = if G::VA_BITS == 32 { va.low32() } else { va };
            let probe = Access::new(AccessKind::Read, Privilege::Supervisor);
            if let Some((l1, offset)) = Self::walked_l1(d, v, va, probe) {
                d.sync_word(l1, offset, true)?;
            }
        }
        Ok(true)
    }

    /// A write fault on page table `mfn` that would be emulated: instead, when the page may
    /// go out of sync, gives the shadow leaf the write came through write access (the
    /// guest's walk allowed the write, and the fill just wrote that leaf read-only) and
    /// returns true: the guest retries and writes natively.
    pub(super) fn try_unsync<H: MachineMemory>(
        d: &mut Domain<H>,
        v: usize,
        va: Gva,
        access: Access,
        mfn: Mfn,
    ) -> Result<bool, EngineError> {
        if !d.config.out_of_sync {
            return Ok(false);
        }
        let Some(slot) = Self::shadow_leaf_slot(d, v, va, access) else {
            return Ok(false);
        };
        let entry = d.read_sentry(slot)?;
        if d.sentry_frame(entry) != Some(mfn) || entry & bits::RW != 0 || !d.may_unsync(mfn, slot) {
            return Ok(false);
        }
        d.unsync_page(mfn, slot)?;
        Ok(true)
    }

    /// The shadow leaf slot a write at `va` faults on: the hardware's walk of the shadows
    /// (from the vcpu's shadow root, as the fast path walks them) must end at a level-1
    /// entry that refuses the write for want of RW alone.
    fn shadow_leaf_slot<H: MachineMemory>(
        d: &mut Domain<H>,
        v: usize,
        va: Gva,
        access: Access,
    ) -> Option<Maddr> {
        let mut hw = d.hardware_control(v)?;
        let feat = d.config.guest_features;
        if S::LEVELS == PagingLevels::Three {
            hw.pdptes = crate::paging::load_pae_pdptes::<Maddr, _>(&d.host, hw.cr3, &feat).ok()?;
        }
        // The guest's rights decided the write; the shadow's RW bit alone refuses it.
        hw.cr4 &= !(crate::paging::bits::cr::CR4_SMAP | crate::paging::bits::cr::CR4_PKE);
        let env = WalkEnv {
            ctl: &hw,
            feat: &feat,
            ad: AdUpdate::Skip,
        };
        let write = Access::new(AccessKind::Write, access.privilege);
        let failure = walk_mode::<S, Maddr, _>(&mut d.host, env, va, write).err()?;
        let last = failure.path.last()?;
        let ec = failure.error_code()?;
        (last.level == 1 && ec.present() && ec.write() && last.value & bits::P != 0)
            .then_some(last.addr)
    }
}

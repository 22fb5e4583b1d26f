//! The host's entries in the hypervisor hole of an internal domain on 4-level shadows: the
//! host names one L3 table of its own (its monitor area: descriptor tables, trap stubs,
//! a stack), and the engine links it into the reserved L4 slot of every top-level shadow
//! it builds, so that the hardware finds the host's area whatever shadow it runs on, while
//! the guest's own tables cannot reach it (the guest may not map the hole).

use super::{Domain, EngineError};
use crate::addr::{Maddr, Mfn};
use crate::host::MachineMemory;
use crate::paging::{PagingLevels, bits};
use crate::types::ShadowKind;

impl<H: MachineMemory> Domain<H> {
    /// Links the host's L3 table `l3` into the hypervisor hole of every 4-level top this
    /// domain builds (user and writable at L4: the host's own lower entries decide each
    /// page's rights, so a host that marks no lower entry user keeps the whole area
    /// supervisor-only, and one that runs guest operations at CPL3 can give them a page). `l3` must have been declared with
    /// [`Domain::add_hypervisor_frame`]; the domain must be internal with 4-level shadows,
    /// and no vcpu may have a root yet (call it right after [`Domain::new`]). The entry goes
    /// into the p2m's root too, which a paging-disabled guest runs on; guest frames under
    /// it can no longer be mapped.
    pub fn set_hypervisor_l3(&mut self, l3: Mfn) -> Result<(), EngineError> {
        if self.config.external || self.config.shadow_levels != PagingLevels::Four {
            return Err(EngineError::BadArgument(
                "hole entries need an internal domain on 4-level shadows",
            ));
        }
        if !self.hypervisor_frames.contains(&l3) {
            return Err(EngineError::BadArgument(
                "the hole's L3 must be a declared hypervisor frame",
            ));
        }
        if self.vcpus.iter().any(|v| v.root.is_some()) || self.store.shadows().next().is_some() {
            return Err(EngineError::BadArgument(
                "hole entries must be set before any shadow is built",
            ));
        }
        let width = u32::from(self.config.host_maxphyaddr).saturating_sub(12);
        if l3.raw() >> width != 0 {
            return Err(EngineError::BadArgument(
                "machine frame beyond the host's MAXPHYADDR",
            ));
        }
        let entry = l3.base().raw() | bits::P | bits::RW | bits::US | bits::A;
        // A paging-disabled guest runs on the p2m's root: the hole goes there too.
        if let (Some(p2m), Some(hole)) = (self.p2m.as_mut(), self.config.hypervisor_hole()) {
            p2m.set_host_entry(&mut self.host, (hole.start >> 39) & 511, entry)
                .map_err(|_| EngineError::BadArgument("the p2m maps guest frames in the hole"))?;
        }
        self.hole_entry = entry;
        Ok(())
    }

    /// The L4 entry of the hypervisor hole, 0 when the host set none.
    pub fn hypervisor_l4e(&self) -> u64 {
        self.hole_entry
    }

    /// Whether shadow entry `entry` is the host's hole entry (no shadow behind it).
    pub(crate) fn is_hole_entry(&self, entry: u64) -> bool {
        self.hole_entry != 0 && entry == self.hole_entry
    }

    /// The slot of the hole's entry in a 4-level top, when the host set one.
    pub(crate) fn hole_slot(&self, head: Mfn, kind: ShadowKind) -> Option<Maddr> {
        let top = matches!(kind, ShadowKind::L4x64 | ShadowKind::VcpuTop);
        if self.hole_entry == 0 || !top {
            return None;
        }
        let start = self.config.hypervisor_hole()?.start;
        Some(Maddr::new(head.base().raw() + ((start >> 39) & 511) * 8))
    }

    /// Writes the hole's entry into a new top (it holds no reference: no bookkeeping).
    pub(crate) fn install_hole(&mut self, head: Mfn, kind: ShadowKind) -> Result<(), EngineError> {
        if let Some(slot) = self.hole_slot(head, kind) {
            self.host.write_entry(slot, 8, self.hole_entry)?;
        }
        Ok(())
    }
}

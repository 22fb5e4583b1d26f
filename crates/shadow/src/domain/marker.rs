//! The fast path's magic shadow entries (seed future optimisation 2): leaf entries the
//! hardware faults on with RSVD set (bit 51, reserved while MAXPHYADDR < 52), whose other
//! bits tell the fault handler what the guest entry says without walking it.
//!
//! An MMIO marker carries the guest frame number. A terminal fault does not stop a
//! speculative load from the address the entry names (L1TF), so the number is not kept
//! as a plain address: the top address bit below the host's MAXPHYADDR is always set
//! (the engine maps no RAM in that upper half, see `Domain::set_p2m`), the frame number's
//! low bits sit below it and its high bits above MAXPHYADDR, as KVM keeps its MMIO
//! entries away from cached memory. A frame number that does not fit gets no marker.

use super::Domain;
use crate::host::MachineMemory;
use crate::paging::bits;

/// Marks a shadow L1 entry that the hardware must fault on with RSVD set.
pub(crate) const MAGIC: u64 = bits::P | (1 << MAGIC_BIT);
/// The reserved address bit every magic entry sets.
const MAGIC_BIT: u32 = 51;
/// Magic type: the guest entry is not present.
pub(crate) const MAGIC_NOT_PRESENT: u64 = 1 << 9;
/// Magic type: MMIO.
pub(crate) const MAGIC_MMIO: u64 = 2 << 9;
const MAGIC_TYPE: u64 = 7 << 9;

/// The guest leaf's own rights kept in an MMIO magic entry (at their usual positions), so
/// that the fast path can check the access before calling it MMIO.
pub(crate) const MAGIC_MMIO_RIGHTS: u64 = bits::RW | bits::US | bits::D | bits::NX;

/// A decoded magic entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Magic {
    NotPresent,
    /// MMIO: the guest frame, and the guest leaf's RW/US/D/NX.
    Mmio(u64, u64),
}

pub(crate) fn is_magic(entry: u64) -> bool {
    entry & MAGIC == MAGIC
}

/// Where an MMIO marker keeps its guest frame number, for a host MAXPHYADDR `m`
/// (32..=51): bits 12..m-1 hold the number's low `m - 13` bits, bit m-1 is set, bits
/// m..51 hold the rest (`51 - m` bits). 38 bits in all, whatever `m`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MmioLayout {
    maxphyaddr: u32,
}

impl MmioLayout {
    /// The layout for a host MAXPHYADDR, if it leaves a reserved bit for the marker.
    pub(crate) fn new(maxphyaddr: u8) -> Option<MmioLayout> {
        let maxphyaddr = u32::from(maxphyaddr);
        (32..MAGIC_BIT + 1)
            .contains(&maxphyaddr)
            .then_some(MmioLayout { maxphyaddr })
    }

    fn low_bits(self) -> u32 {
        self.maxphyaddr - 13
    }

    fn high_bits(self) -> u32 {
        MAGIC_BIT - self.maxphyaddr
    }

    /// The bit below MAXPHYADDR every marker sets.
    fn upper_half(self) -> u64 {
        1 << (self.maxphyaddr - 1)
    }

    /// The marker for guest frame `gfn` with the guest leaf's `rights`; None if `gfn`
    /// does not fit.
    pub(crate) fn encode(self, gfn: u64, rights: u64) -> Option<u64> {
        let low = self.low_bits();
        if gfn >> (low + self.high_bits()) != 0 {
            return None;
        }
        let address = ((gfn & ((1 << low) - 1)) << 12)
            | self.upper_half()
            | ((gfn >> low) << self.maxphyaddr);
        Some(MAGIC | MAGIC_MMIO | address | (rights & MAGIC_MMIO_RIGHTS))
    }

    /// What a magic entry says, if `entry` is one this layout makes.
    pub(crate) fn decode(self, entry: u64) -> Option<Magic> {
        if !is_magic(entry) {
            return None;
        }
        match entry & MAGIC_TYPE {
            MAGIC_NOT_PRESENT => Some(Magic::NotPresent),
            MAGIC_MMIO if entry & self.upper_half() != 0 => {
                let low = self.low_bits();
                let gfn = ((entry >> 12) & ((1 << low) - 1))
                    | (((entry >> self.maxphyaddr) & ((1 << self.high_bits()) - 1)) << low);
                Some(Magic::Mmio(gfn, entry & MAGIC_MMIO_RIGHTS))
            }
            _ => None,
        }
    }

    /// The first machine frame of the upper half markers point into.
    pub(crate) fn first_marked_frame(self) -> u64 {
        self.upper_half() >> 12
    }
}

impl<H: MachineMemory> Domain<H> {
    /// The MMIO marker layout, when the fast path is on.
    pub(crate) fn mmio_layout(&self) -> Option<MmioLayout> {
        if self.fast_path_on() {
            MmioLayout::new(self.config.host_maxphyaddr)
        } else {
            None
        }
    }

    /// What a magic shadow entry says (None: not one of this domain's).
    pub(crate) fn decode_magic(&self, entry: u64) -> Option<Magic> {
        match self.mmio_layout() {
            Some(layout) => layout.decode(entry),
            None => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fitting_gfn_round_trips_at_every_width() {
        for m in 32..=51u8 {
            let layout = MmioLayout::new(m).unwrap();
            let rights = bits::RW | bits::NX;
            let fitting = [
                0,
                1,
                0x1234,
                (1 << (m - 13)) - 1,
                1 << (m - 13),
                (1 << 38) - 1,
            ];
            for gfn in fitting.into_iter().filter(|g| g >> 38 == 0) {
                let e = layout.encode(gfn, rights).unwrap();
                assert_eq!(layout.decode(e), Some(Magic::Mmio(gfn, rights)), "m {m}");
                assert!(is_magic(e));
            }
            assert_eq!(layout.encode(1 << 38, 0), None);
        }
        assert_eq!(MmioLayout::new(52), None);
        assert_eq!(MmioLayout::new(31), None);
    }

    #[test]
    fn markers_point_into_the_upper_half_below_maxphyaddr() {
        for m in 32..=51u8 {
            let layout = MmioLayout::new(m).unwrap();
            for gfn in [0, 5, 1000, (1 << 38) - 1] {
                let e = layout.encode(gfn, 0).unwrap();
                let below = e & bits::ADDR_MASK_8 & ((1 << m) - 1);
                assert!(
                    below >> 12 >= layout.first_marked_frame(),
                    "m {m} gfn {gfn}"
                );
                assert!(below >> 12 < 1 << (m - 12), "m {m} gfn {gfn}");
            }
        }
    }

    #[test]
    fn markers_differ_from_the_not_present_marker_and_from_mappings() {
        let layout = MmioLayout::new(48).unwrap();
        let not_present = MAGIC | MAGIC_NOT_PRESENT;
        assert_eq!(layout.decode(not_present), Some(Magic::NotPresent));
        for gfn in [0, 1, 1 << 36] {
            let e = layout.encode(gfn, bits::RW).unwrap();
            assert_ne!(e, not_present);
            // A mapping's frame lies below MAXPHYADDR, so bit 51 is never set in one.
            assert_eq!(
                layout.decode(bits::P | (gfn << 12) & bits::ADDR_MASK_8),
                None
            );
        }
        // An MMIO-typed magic entry without the upper-half bit is none of ours.
        assert_eq!(layout.decode(MAGIC | MAGIC_MMIO | (5 << 12)), None);
    }
}

//! Typed addresses and frame numbers.
//!
//! Guest-physical and machine address spaces are different spaces: mixing a guest frame
//! number with a machine frame number was a real class of bugs in Xen, so every address that
//! crosses an API here is one of these newtypes, never a bare `u64`.

use core::fmt;

/// log2 of the base page size.
pub const PAGE_SHIFT: u32 = 12;
/// The base page size in bytes.
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
/// Mask of the offset within a base page.
pub const PAGE_OFFSET_MASK: u64 = PAGE_SIZE - 1;
/// The architectural upper bound of MAXPHYADDR.
pub const MAX_PHYS_BITS: u8 = 52;

macro_rules! newtype {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        #[repr(transparent)]
        pub struct $name(u64);

        impl $name {
            /// Wraps a raw value.
            #[inline]
            pub const fn new(raw: u64) -> Self {
                Self(raw)
            }

            /// The raw value.
            #[inline]
            pub const fn raw(self) -> u64 {
                self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "({:#x})"), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }
    };
}

newtype!(
    /// A guest frame number: a guest-physical address shifted right by [`PAGE_SHIFT`].
    Gfn,
    "Gfn"
);
newtype!(
    /// A machine frame number: a frame of the host's (or the simulated machine's) memory.
    Mfn,
    "Mfn"
);
newtype!(
    /// A guest virtual (linear) address.
    Gva,
    "Gva"
);
newtype!(
    /// A guest-physical address.
    Gpa,
    "Gpa"
);
newtype!(
    /// A machine (host-physical) address.
    Maddr,
    "Maddr"
);

/// An address in some physical address space, with its frame type.
///
/// The architectural walker is written once over this trait: walking the guest's tables
/// yields guest frames ([`Gpa`] / [`Gfn`]), walking shadow tables yields machine frames
/// ([`Maddr`] / [`Mfn`]).
pub trait PhysAddr: Copy + Eq + Ord + fmt::Debug + 'static {
    /// The frame-number type of this address space.
    type Frame: Copy + Eq + Ord + fmt::Debug + 'static;

    /// Wraps a raw physical address.
    fn from_raw(raw: u64) -> Self;
    /// The raw physical address.
    fn to_raw(self) -> u64;
    /// Wraps a raw frame number.
    fn frame_from_raw(raw: u64) -> Self::Frame;
    /// The raw frame number.
    fn frame_to_raw(frame: Self::Frame) -> u64;

    /// The frame holding this address.
    fn frame(self) -> Self::Frame {
        Self::frame_from_raw(self.to_raw() >> PAGE_SHIFT)
    }
    /// The first address of `frame`.
    fn frame_base(frame: Self::Frame) -> Self {
        Self::from_raw(Self::frame_to_raw(frame) << PAGE_SHIFT)
    }
    /// The offset of this address inside its base page.
    fn page_offset(self) -> u64 {
        self.to_raw() & PAGE_OFFSET_MASK
    }
    /// This address moved by `delta` bytes, or `None` on overflow.
    fn checked_add(self, delta: u64) -> Option<Self> {
        self.to_raw().checked_add(delta).map(Self::from_raw)
    }
}

impl PhysAddr for Gpa {
    type Frame = Gfn;
    #[inline]
    fn from_raw(raw: u64) -> Self {
        Gpa(raw)
    }
    #[inline]
    fn to_raw(self) -> u64 {
        self.0
    }
    #[inline]
    fn frame_from_raw(raw: u64) -> Gfn {
        Gfn(raw)
    }
    #[inline]
    fn frame_to_raw(frame: Gfn) -> u64 {
        frame.0
    }
}

impl PhysAddr for Maddr {
    type Frame = Mfn;
    #[inline]
    fn from_raw(raw: u64) -> Self {
        Maddr(raw)
    }
    #[inline]
    fn to_raw(self) -> u64 {
        self.0
    }
    #[inline]
    fn frame_from_raw(raw: u64) -> Mfn {
        Mfn(raw)
    }
    #[inline]
    fn frame_to_raw(frame: Mfn) -> u64 {
        frame.0
    }
}

impl Gfn {
    /// The first guest-physical address of this frame, or `None` if it does not fit in 64 bits.
    pub fn checked_base(self) -> Option<Gpa> {
        self.0.checked_mul(PAGE_SIZE).map(Gpa)
    }
    /// The first guest-physical address of this frame (frame numbers above 2^52 wrap, which
    /// no architectural frame number can be).
    pub const fn base(self) -> Gpa {
        Gpa(self.0 << PAGE_SHIFT)
    }
    /// The frame `n` frames further on, or `None` on overflow.
    pub fn checked_add(self, n: u64) -> Option<Gfn> {
        self.0.checked_add(n).map(Gfn)
    }
}

impl Mfn {
    /// The first machine address of this frame.
    pub const fn base(self) -> Maddr {
        Maddr(self.0 << PAGE_SHIFT)
    }
    /// The frame `n` frames further on, or `None` on overflow.
    pub fn checked_add(self, n: u64) -> Option<Mfn> {
        self.0.checked_add(n).map(Mfn)
    }
}

impl Gpa {
    /// The guest frame holding this address.
    pub const fn gfn(self) -> Gfn {
        Gfn(self.0 >> PAGE_SHIFT)
    }
    /// The offset inside the base page.
    pub const fn offset(self) -> u64 {
        self.0 & PAGE_OFFSET_MASK
    }
    /// Whether this address lies below `2^maxphyaddr`.
    pub const fn fits(self, maxphyaddr: u8) -> bool {
        maxphyaddr >= 64 || self.0 >> maxphyaddr == 0
    }
}

impl Maddr {
    /// The machine frame holding this address.
    pub const fn mfn(self) -> Mfn {
        Mfn(self.0 >> PAGE_SHIFT)
    }
    /// The offset inside the base page.
    pub const fn offset(self) -> u64 {
        self.0 & PAGE_OFFSET_MASK
    }
}

impl Gva {
    /// The virtual page number (address shifted right by [`PAGE_SHIFT`]).
    pub const fn page(self) -> u64 {
        self.0 >> PAGE_SHIFT
    }
    /// The offset inside the base page.
    pub const fn offset(self) -> u64 {
        self.0 & PAGE_OFFSET_MASK
    }
    /// The base of the page holding this address.
    pub const fn page_base(self) -> Gva {
        Gva(self.0 & !PAGE_OFFSET_MASK)
    }
    /// The address `delta` bytes further on, wrapping as linear addresses do.
    pub const fn wrapping_add(self, delta: u64) -> Gva {
        Gva(self.0.wrapping_add(delta))
    }
    /// Whether the address is canonical for `va_bits` implemented linear-address bits
    /// (48 for 4-level paging): bits 63..va_bits-1 all equal.
    pub const fn is_canonical(self, va_bits: u32) -> bool {
        if va_bits >= 64 {
            return true;
        }
        let shift = 64 - va_bits;
        (((self.0 << shift) as i64) >> shift) as u64 == self.0
    }
    /// The address truncated to 32 bits, as 32-bit and PAE paging see it.
    pub const fn low32(self) -> Gva {
        Gva(self.0 & 0xffff_ffff)
    }
}

/// Builds a `Gva` from a 4-level page-table path (L4..L1 indices and an offset), sign-extended.
pub fn gva_from_indices_4level(l4: u64, l3: u64, l2: u64, l1: u64, offset: u64) -> Gva {
    let raw = ((l4 & 0x1ff) << 39)
        | ((l3 & 0x1ff) << 30)
        | ((l2 & 0x1ff) << 21)
        | ((l1 & 0x1ff) << 12)
        | (offset & PAGE_OFFSET_MASK);
    Gva((((raw << 16) as i64) >> 16) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_addresses() {
        assert!(Gva::new(0x0000_7fff_ffff_ffff).is_canonical(48));
        assert!(Gva::new(0xffff_8000_0000_0000).is_canonical(48));
        assert!(!Gva::new(0x0000_8000_0000_0000).is_canonical(48));
        assert!(!Gva::new(0xfff7_8000_0000_0000).is_canonical(48));
        assert!(Gva::new(0).is_canonical(48));
        assert!(Gva::new(u64::MAX).is_canonical(48));
        assert!(Gva::new(0x00ff_ffff_ffff_ffff).is_canonical(57));
        assert!(!Gva::new(0x0100_0000_0000_0000).is_canonical(57));
    }

    #[test]
    fn frame_conversions_keep_their_space() {
        let gpa = Gpa::new(0x1234_5678);
        assert_eq!(gpa.gfn(), Gfn::new(0x12345));
        assert_eq!(gpa.offset(), 0x678);
        assert_eq!(gpa.gfn().base(), Gpa::new(0x1234_5000));
        assert_eq!(<Gpa as PhysAddr>::frame(gpa), Gfn::new(0x12345));
        let ma = Maddr::new(0xabc_def0);
        assert_eq!(ma.mfn(), Mfn::new(0xabcd));
        assert_eq!(Maddr::frame_base(Mfn::new(3)), Maddr::new(0x3000));
        assert_eq!(Gfn::new(u64::MAX).checked_base(), None);
        assert!(Gpa::new((1 << 48) - 1).fits(48));
        assert!(!Gpa::new(1 << 48).fits(48));
    }

    #[test]
    fn indices_build_canonical_gvas() {
        let va = gva_from_indices_4level(256, 0, 0, 0, 0);
        assert_eq!(va, Gva::new(0xffff_8000_0000_0000));
        assert!(va.is_canonical(48));
        assert_eq!(
            gva_from_indices_4level(1, 2, 3, 4, 5).raw(),
            (1 << 39) | (2 << 30) | (3 << 21) | (4 << 12) | 5
        );
    }
}

//! TLB flushes the engine asks of its host.
//!
//! An engine change that removes a permission or a mapping that the hardware may have cached
//! returns a [`Flush`]: the host must carry it out (flush those vcpus' TLBs and
//! paging-structure caches) before the guest runs again, and before its next call into the
//! domain: shadow pages torn down under the flush are reused from the next call on. It is
//! `#[must_use]`, so a caller cannot drop one by accident. A call that fails may owe one too:
//! the host takes it with `Domain::take_flush` (until then every call is refused with
//! `FlushOwed`).

/// A set of vcpus, by index (up to 64).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VcpuSet(pub u64);

impl VcpuSet {
    /// No vcpu.
    pub const NONE: VcpuSet = VcpuSet(0);
    /// Every vcpu.
    pub const ALL: VcpuSet = VcpuSet(u64::MAX);
    /// Just vcpu `id` (ids of 64 and above are not representable and give the empty set).
    pub fn one(id: usize) -> VcpuSet {
        VcpuSet(1u64.checked_shl(id as u32).unwrap_or(0))
    }
    /// Whether vcpu `id` is in the set.
    pub fn contains(self, id: usize) -> bool {
        1u64.checked_shl(id as u32)
            .is_some_and(|bit| self.0 & bit != 0)
    }
    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
    /// The union of two sets.
    pub fn union(self, other: VcpuSet) -> VcpuSet {
        VcpuSet(self.0 | other.0)
    }
}

/// A TLB flush that the host owes the hardware before the guest runs again.
#[must_use = "the host must flush these vcpus' TLBs before they run guest code again"]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Flush {
    vcpus: VcpuSet,
}

impl Flush {
    /// Nothing to flush.
    pub const NONE: Flush = Flush {
        vcpus: VcpuSet::NONE,
    };

    /// A full TLB flush of `vcpus`.
    pub fn of(vcpus: VcpuSet) -> Flush {
        Flush { vcpus }
    }
    /// Both flushes.
    pub fn merge(self, other: Flush) -> Flush {
        Flush {
            vcpus: self.vcpus.union(other.vcpus),
        }
    }
    /// Whether nothing needs flushing.
    pub fn is_empty(&self) -> bool {
        self.vcpus.is_empty()
    }
    /// The vcpus to flush. Taking the set is how a host acknowledges the token.
    pub fn into_vcpus(self) -> VcpuSet {
        self.vcpus
    }
}

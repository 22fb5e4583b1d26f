//! Guest OS models and workloads, written once against the guest-operations interface.

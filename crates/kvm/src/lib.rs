//! The KVM backend: real x86 execution of guests whose CR3, as KVM sees it, is a shadow root.

//! Replays of the history of Xen's shadow-paging security advisories (XSAs) against this
//! engine. One file per family; every test is named after the advisory it replays, says in
//! its doc comment what the advisory was and what must hold here, and checks the isolation
//! invariants of [`invariants::assert_isolated`] after every step.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../engine_support.rs"]
mod engine_support;

mod emulator;
mod failed_ops;
mod harness;
mod invariants;
mod livelock;
mod long_ops;
mod out_of_sync;
mod p2m_changes;
mod pdpte;
mod pool;
mod prefetch;
mod self_maps;
mod shadow_superpages;
mod superpages;
mod type_confusion;

//! Unit tests of the architectural walker: one test per rule, in every mode it applies to.

mod harness;

mod accessed_dirty;
mod error_code;
mod nx;
mod pae;
mod pkeys;
mod race;
mod recursive;
mod reserved;
mod rights;
mod translation;

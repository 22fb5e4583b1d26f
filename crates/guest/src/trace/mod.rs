//! Trace record and replay of the guest-operation stream.
//!
//! A [`Recorder`] sits between a guest model and its backend: it forwards every
//! [`GuestOps`](crate::ops::GuestOps) call and writes it, with its outcome, to a trace
//! (`shadow2 run --record FILE`). [`replay()`] re-issues a trace on a fresh backend
//! through a [`Counting`](crate::counting::Counting) wrapper (`shadow2 replay FILE`),
//! checks every outcome against the recorded one and, at the end, the replayed
//! [`Counters`](crate::counting::Counters) against the recorded run's. Backends are
//! deterministic, so a faithful replay gives identical counters, digest included.
//!
//! The file format is described byte by byte in `docs/TRACE.md`:
//!
//! ```text
//! "SHADOW2T" | version u16 | header length u32 | header JSON | record* | end record
//! ```
//!
//! Modules, one job each: [`header`] (the JSON header), [`format`](mod@format) (records
//! and their encoding), `decode` (reading one record back), `input` (reading with offsets
//! and length caps), [`error`] (what can go wrong reading a trace), [`record`] (the
//! recorder), [`replay`](mod@replay) (reading and re-issuing).

mod decode;
pub mod error;
pub mod format;
pub mod header;
mod input;
pub mod record;
pub mod replay;

pub use error::{TraceError, TraceErrorKind};
pub use format::{Op, Record};
pub use header::TraceHeader;
pub use record::Recorder;
pub use replay::{ReplayOutcome, TraceReader, read_header, replay, replay_with_total};

/// The first 8 bytes of every trace.
pub const MAGIC: [u8; 8] = *b"SHADOW2T";

/// The format version this build writes and reads.
pub const VERSION: u16 = 1;

/// The largest data of one operation (a store's bytes, a load's or fetch's length, one
/// `load_image` piece, a backend failure message), in bytes.
pub const MAX_DATA: usize = 4096;

/// The largest JSON header, in bytes.
pub const MAX_HEADER: usize = 1 << 20;

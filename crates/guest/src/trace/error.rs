//! What can go wrong reading or replaying a trace: always a byte offset and one line.

use core::fmt;
use std::io;

use crate::counting::Counters;
use crate::ops::OpError;

use super::format::{OutcomeDisplay, counter_fields};

/// A trace that cannot be read or does not replay: where, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceError {
    /// The byte offset in the file: of the field for header problems, of the record's tag
    /// byte for record problems, of the end of the data for a missing end record.
    pub offset: u64,
    /// What is wrong.
    pub kind: TraceErrorKind,
}

/// What is wrong with a trace or its replay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TraceErrorKind {
    /// Reading failed.
    Io {
        /// The I/O error's kind.
        kind: io::ErrorKind,
        /// Its message.
        message: String,
    },
    /// The file does not start with [`MAGIC`](super::MAGIC).
    BadMagic,
    /// The version field names a format this build does not read.
    UnsupportedVersion(u16),
    /// The JSON header is too long, not valid JSON, or disagrees with the binary fields.
    BadHeader(String),
    /// The data ends inside the magic, the header or a record.
    Truncated {
        /// `"magic"`, `"header"` or `"record"`.
        what: &'static str,
        /// Bytes still needed to finish the field being read (at least).
        needed: u64,
    },
    /// A record starts with a tag this build does not know.
    UnknownTag(u8),
    /// A record field holds an impossible value (a length over the cap, a vcpu out of
    /// range, an unknown outcome...).
    BadRecord {
        /// The record's index (0 is the first record after the header).
        record: u64,
        /// What is wrong.
        why: String,
    },
    /// The replayed operation's outcome differs from the recorded one.
    Divergence {
        /// The record's index.
        record: u64,
        /// The operation (`"read"`, `"exec"`...).
        op: &'static str,
        /// What the recorded run got.
        recorded: Result<(), OpError>,
        /// What the replay got.
        replayed: Result<(), OpError>,
    },
    /// The data ends at a record boundary, before any end record.
    MissingEnd,
    /// The end record's count differs from the number of records before it.
    CountMismatch {
        /// The count in the end record.
        recorded: u64,
        /// The records actually in the trace.
        found: u64,
    },
    /// Every outcome matched but the replayed counters differ from the recorded run's.
    CountersMismatch {
        /// The recorded run's counters (from the end record).
        recorded: Box<Counters>,
        /// The replay's counters.
        replayed: Box<Counters>,
    },
    /// Bytes follow the end record.
    TrailingData,
    /// The replay backend is not the shape the trace was recorded on.
    BackendMismatch {
        /// `"vcpus"` or `"RAM frames"`.
        what: &'static str,
        /// The trace's value.
        trace: u64,
        /// The backend's value.
        backend: u64,
    },
}

impl TraceError {
    /// An error at `offset`.
    pub fn new(offset: u64, kind: TraceErrorKind) -> TraceError {
        TraceError { offset, kind }
    }
}

impl fmt::Display for TraceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "offset {}: {}", self.offset, self.kind)
    }
}

impl std::error::Error for TraceError {}

impl fmt::Display for TraceErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TraceErrorKind::Io { message, .. } => write!(f, "read failed: {message}"),
            TraceErrorKind::BadMagic => f.write_str("not a shadow2 trace (bad magic)"),
            TraceErrorKind::UnsupportedVersion(v) => write!(
                f,
                "unsupported trace version {v} (this build reads {})",
                super::VERSION
            ),
            TraceErrorKind::BadHeader(why) => write!(f, "bad header: {why}"),
            TraceErrorKind::Truncated { what, needed } => {
                let s = if *needed == 1 { "" } else { "s" };
                write!(f, "truncated {what} (needed {needed} more byte{s})")
            }
            TraceErrorKind::UnknownTag(t) => write!(f, "unknown record tag {t:#04x}"),
            TraceErrorKind::BadRecord { record, why } => write!(f, "record {record}: {why}"),
            TraceErrorKind::Divergence {
                record,
                op,
                recorded,
                replayed,
            } => write!(
                f,
                "record {record} ({op}) diverged: recorded {}, replay gave {}",
                OutcomeDisplay(recorded),
                OutcomeDisplay(replayed)
            ),
            TraceErrorKind::MissingEnd => f.write_str("trace ends without an end record"),
            TraceErrorKind::CountMismatch { recorded, found } => write!(
                f,
                "end record counts {recorded} records but the trace holds {found}"
            ),
            TraceErrorKind::CountersMismatch { recorded, replayed } => {
                f.write_str("replayed counters differ from the recorded run:")?;
                let mut sep = " ";
                let pairs = counter_fields(recorded)
                    .into_iter()
                    .zip(counter_fields(replayed));
                for ((name, a), (_, b)) in pairs {
                    if a != b {
                        if name == "digest" {
                            write!(f, "{sep}{name} {a:#018x} recorded, {b:#018x} replayed")?;
                        } else {
                            write!(f, "{sep}{name} {a} recorded, {b} replayed")?;
                        }
                        sep = "; ";
                    }
                }
                Ok(())
            }
            TraceErrorKind::TrailingData => f.write_str("data after the end record"),
            TraceErrorKind::BackendMismatch {
                what,
                trace,
                backend,
            } => write!(
                f,
                "the backend has {backend} {what}, the trace was recorded with {trace}"
            ),
        }
    }
}

//! The records of a trace and their byte encoding (`docs/TRACE.md` is the reference):
//! one tag byte, then little-endian fields; variable-length data has a `u32` length
//! prefix and is capped at [`MAX_DATA`] bytes.

use core::fmt;
use std::io;

use shadow2::emulate::{CodeMode, Regs};
use shadow2::paging::ControlState;

use super::MAX_DATA;
use crate::counting::Counters;
use crate::ops::{Event, Fault, OpError};

/// Record tags.
pub(crate) mod tag {
    pub const LOAD_IMAGE: u8 = 0x01;
    pub const READ: u8 = 0x02;
    pub const WRITE: u8 = 0x03;
    pub const FETCH: u8 = 0x04;
    pub const EXEC: u8 = 0x05;
    pub const SET_CONTROL: u8 = 0x06;
    pub const SET_CR3: u8 = 0x07;
    pub const INVLPG: u8 = 0x08;
    pub const EVENT: u8 = 0x10;
    pub const END: u8 = 0xff;
}

/// Outcome tags.
pub(crate) mod outcome {
    pub const OK: u8 = 0;
    pub const PAGE_FAULT: u8 = 1;
    pub const GENERAL_PROTECTION: u8 = 2;
    pub const INVALID_OPCODE: u8 = 3;
    pub const BACKEND: u8 = 4;
}

/// One guest operation with its arguments, as the guest model issued it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// `load_image` of one piece (the recorder splits images at page boundaries).
    LoadImage {
        /// Guest-physical address.
        gpa: u64,
        /// The bytes (at most [`MAX_DATA`]).
        data: Vec<u8>,
    },
    /// A load (its data is not recorded: the digest covers it).
    Read {
        /// The vcpu.
        vcpu: usize,
        /// The linear address.
        va: u64,
        /// The privilege level of the access.
        cpl: u8,
        /// Bytes loaded (at most [`MAX_DATA`]).
        len: usize,
    },
    /// A store.
    Write {
        /// The vcpu.
        vcpu: usize,
        /// The linear address.
        va: u64,
        /// The privilege level of the access.
        cpl: u8,
        /// The bytes stored (at most [`MAX_DATA`]).
        data: Vec<u8>,
    },
    /// An instruction fetch (its data is not recorded).
    Fetch {
        /// The vcpu.
        vcpu: usize,
        /// The linear address.
        va: u64,
        /// The privilege level of the access.
        cpl: u8,
        /// Bytes fetched (at most [`MAX_DATA`]).
        len: usize,
    },
    /// One instruction.
    Exec {
        /// The vcpu.
        vcpu: usize,
        /// The registers before the instruction.
        regs: Regs,
    },
    /// CR0 / CR4 / EFER (and CR3, RFLAGS.AC) together.
    SetControl {
        /// The vcpu.
        vcpu: usize,
        /// Every field as the model passed it (PDPTEs included, though backends ignore them).
        ctl: ControlState,
    },
    /// MOV to CR3.
    SetCr3 {
        /// The vcpu.
        vcpu: usize,
        /// The value.
        cr3: u64,
    },
    /// INVLPG.
    Invlpg {
        /// The vcpu.
        vcpu: usize,
        /// The linear address.
        va: u64,
    },
}

impl Op {
    /// The `GuestOps` method's name.
    pub fn name(&self) -> &'static str {
        match self {
            Op::LoadImage { .. } => "load_image",
            Op::Read { .. } => "read",
            Op::Write { .. } => "write",
            Op::Fetch { .. } => "fetch",
            Op::Exec { .. } => "exec",
            Op::SetControl { .. } => "set_control",
            Op::SetCr3 { .. } => "set_cr3",
            Op::Invlpg { .. } => "invlpg",
        }
    }

    /// The vcpu the operation runs on (none for `load_image`).
    pub fn vcpu(&self) -> Option<usize> {
        match *self {
            Op::LoadImage { .. } => None,
            Op::Read { vcpu, .. }
            | Op::Write { vcpu, .. }
            | Op::Fetch { vcpu, .. }
            | Op::Exec { vcpu, .. }
            | Op::SetControl { vcpu, .. }
            | Op::SetCr3 { vcpu, .. }
            | Op::Invlpg { vcpu, .. } => Some(vcpu),
        }
    }
}

/// One record of a trace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// A guest operation and what came of it.
    Op {
        /// The operation.
        op: Op,
        /// Its outcome; a backend failure's message is clipped to [`MAX_DATA`] bytes
        /// (see [`clip_outcome`]).
        outcome: Result<(), OpError>,
    },
    /// A guest-model event.
    Event(Event),
    /// The last record.
    End {
        /// The number of records before this one.
        records: u64,
        /// The counters of the recorded run.
        counters: Counters,
    },
}

/// `outcome` as a trace stores it: a backend failure's message is clipped to at most
/// [`MAX_DATA`] bytes (at a character boundary).
pub fn clip_outcome(outcome: Result<(), OpError>) -> Result<(), OpError> {
    match outcome {
        Err(OpError::Backend(m)) if m.len() > MAX_DATA => {
            Err(OpError::Backend(clip_message(&m).to_owned()))
        }
        other => other,
    }
}

/// The longest prefix of `m` of at most [`MAX_DATA`] bytes that ends at a character
/// boundary.
fn clip_message(m: &str) -> &str {
    let mut end = m.len().min(MAX_DATA);
    while !m.is_char_boundary(end) {
        end -= 1;
    }
    &m[..end]
}

/// The counters as (name, value) in the order of the end record.
pub(crate) fn counter_fields(c: &Counters) -> [(&'static str, u64); COUNTER_FIELDS] {
    // Exhaustive on purpose: a new field must be added to the format (and the version).
    let Counters {
        guest_ops,
        reads,
        writes,
        fetches,
        execs,
        control_writes,
        cr3_writes,
        invlpgs,
        faults_delivered,
        demand_faults,
        cow_faults,
        kills,
        workload_steps,
        data_errors,
        digest,
    } = *c;
    [
        ("guest_ops", guest_ops),
        ("reads", reads),
        ("writes", writes),
        ("fetches", fetches),
        ("execs", execs),
        ("control_writes", control_writes),
        ("cr3_writes", cr3_writes),
        ("invlpgs", invlpgs),
        ("faults_delivered", faults_delivered),
        ("demand_faults", demand_faults),
        ("cow_faults", cow_faults),
        ("kills", kills),
        ("workload_steps", workload_steps),
        ("data_errors", data_errors),
        ("digest", digest),
    ]
}

pub(crate) const COUNTER_FIELDS: usize = 15;

pub(crate) fn counters_from(v: [u64; COUNTER_FIELDS]) -> Counters {
    let [
        guest_ops,
        reads,
        writes,
        fetches,
        execs,
        control_writes,
        cr3_writes,
        invlpgs,
        faults_delivered,
        demand_faults,
        cow_faults,
        kills,
        workload_steps,
        data_errors,
        digest,
    ] = v;
    Counters {
        guest_ops,
        reads,
        writes,
        fetches,
        execs,
        control_writes,
        cr3_writes,
        invlpgs,
        faults_delivered,
        demand_faults,
        cow_faults,
        kills,
        workload_steps,
        data_errors,
        digest,
    }
}

/// Shows an outcome in an error message: `Ok`, the fault, or the backend failure.
pub(crate) struct OutcomeDisplay<'a>(pub &'a Result<(), OpError>);

impl fmt::Display for OutcomeDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Ok(()) => f.write_str("Ok"),
            Err(OpError::Fault(fault)) => fault.fmt(f),
            Err(OpError::Backend(why)) => write!(f, "backend failure ({why})"),
        }
    }
}

fn event_code(e: Event) -> u8 {
    match e {
        Event::DemandFault => 0,
        Event::CowFault => 1,
        Event::Kill => 2,
        Event::WorkloadStep => 3,
        Event::DataError => 4,
        Event::UserAccess => 5,
        Event::UserAccessDone => 6,
    }
}

pub(crate) fn event_from(code: u8) -> Option<Event> {
    Some(match code {
        0 => Event::DemandFault,
        1 => Event::CowFault,
        2 => Event::Kill,
        3 => Event::WorkloadStep,
        4 => Event::DataError,
        5 => Event::UserAccess,
        6 => Event::UserAccessDone,
        _ => return None,
    })
}

fn mode_code(m: CodeMode) -> u8 {
    match m {
        CodeMode::Bits16 => 16,
        CodeMode::Bits32 => 32,
        CodeMode::Bits64 => 64,
    }
}

pub(crate) fn mode_from(code: u8) -> Option<CodeMode> {
    Some(match code {
        16 => CodeMode::Bits16,
        32 => CodeMode::Bits32,
        64 => CodeMode::Bits64,
        _ => return None,
    })
}

fn invalid(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, why)
}

fn put_len(out: &mut Vec<u8>, len: usize, what: &str) -> io::Result<()> {
    if len > MAX_DATA {
        return Err(invalid(format!(
            "{what} of {len} bytes exceeds the trace limit of {MAX_DATA} bytes per operation"
        )));
    }
    out.extend_from_slice(&(len as u32).to_le_bytes());
    Ok(())
}

fn put_vcpu(out: &mut Vec<u8>, vcpu: usize) -> io::Result<()> {
    let v = u32::try_from(vcpu).map_err(|_| invalid(format!("vcpu {vcpu} is out of range")))?;
    out.extend_from_slice(&v.to_le_bytes());
    Ok(())
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_access(out: &mut Vec<u8>, vcpu: usize, va: u64, cpl: u8) -> io::Result<()> {
    put_vcpu(out, vcpu)?;
    put_u64(out, va);
    out.push(cpl);
    Ok(())
}

fn put_outcome(out: &mut Vec<u8>, outcome: &Result<(), OpError>) {
    match outcome {
        Ok(()) => out.push(outcome::OK),
        Err(OpError::Fault(Fault::PageFault { va, code })) => {
            out.push(outcome::PAGE_FAULT);
            put_u64(out, *va);
            out.extend_from_slice(&code.to_le_bytes());
        }
        Err(OpError::Fault(Fault::GeneralProtection)) => out.push(outcome::GENERAL_PROTECTION),
        Err(OpError::Fault(Fault::InvalidOpcode)) => out.push(outcome::INVALID_OPCODE),
        Err(OpError::Backend(why)) => {
            out.push(outcome::BACKEND);
            let why = clip_message(why);
            out.extend_from_slice(&(why.len() as u32).to_le_bytes());
            out.extend_from_slice(why.as_bytes());
        }
    }
}

impl Record {
    /// Appends the record's bytes to `out`. Fails (appending nothing) when a length is
    /// over [`MAX_DATA`] or a vcpu does not fit 32 bits.
    pub fn encode(&self, out: &mut Vec<u8>) -> io::Result<()> {
        let start = out.len();
        let r = self.encode_unchecked(out);
        if r.is_err() {
            out.truncate(start);
        }
        r
    }

    fn encode_unchecked(&self, out: &mut Vec<u8>) -> io::Result<()> {
        match self {
            Record::Op { op, outcome } => {
                match op {
                    Op::LoadImage { gpa, data } => {
                        out.push(tag::LOAD_IMAGE);
                        put_u64(out, *gpa);
                        put_len(out, data.len(), "image piece")?;
                        out.extend_from_slice(data);
                    }
                    Op::Read { vcpu, va, cpl, len } | Op::Fetch { vcpu, va, cpl, len } => {
                        let is_read = matches!(op, Op::Read { .. });
                        out.push(if is_read { tag::READ } else { tag::FETCH });
                        put_access(out, *vcpu, *va, *cpl)?;
                        put_len(out, *len, if is_read { "load" } else { "fetch" })?;
                    }
                    Op::Write {
                        vcpu,
                        va,
                        cpl,
                        data,
                    } => {
                        out.push(tag::WRITE);
                        put_access(out, *vcpu, *va, *cpl)?;
                        put_len(out, data.len(), "store")?;
                        out.extend_from_slice(data);
                    }
                    Op::Exec { vcpu, regs } => {
                        out.push(tag::EXEC);
                        put_vcpu(out, *vcpu)?;
                        for g in regs.gpr {
                            put_u64(out, g);
                        }
                        for v in [regs.rip, regs.rflags, regs.fs_base, regs.gs_base] {
                            put_u64(out, v);
                        }
                        out.push(mode_code(regs.mode));
                        out.push(regs.cpl);
                    }
                    Op::SetControl { vcpu, ctl } => {
                        out.push(tag::SET_CONTROL);
                        put_vcpu(out, *vcpu)?;
                        for v in [ctl.cr0, ctl.cr3, ctl.cr4, ctl.efer, ctl.rflags] {
                            put_u64(out, v);
                        }
                        out.extend_from_slice(&ctl.pkru.to_le_bytes());
                        for p in ctl.pdptes {
                            put_u64(out, p);
                        }
                    }
                    Op::SetCr3 { vcpu, cr3 } => {
                        out.push(tag::SET_CR3);
                        put_vcpu(out, *vcpu)?;
                        put_u64(out, *cr3);
                    }
                    Op::Invlpg { vcpu, va } => {
                        out.push(tag::INVLPG);
                        put_vcpu(out, *vcpu)?;
                        put_u64(out, *va);
                    }
                }
                put_outcome(out, outcome);
            }
            Record::Event(e) => {
                out.push(tag::EVENT);
                out.push(event_code(*e));
            }
            Record::End { records, counters } => {
                out.push(tag::END);
                put_u64(out, *records);
                for (_, v) in counter_fields(counters) {
                    put_u64(out, v);
                }
            }
        }
        Ok(())
    }
}

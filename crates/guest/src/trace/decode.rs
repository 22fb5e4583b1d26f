//! Decoding one record (`docs/TRACE.md` is the reference): every length capped at
//! [`MAX_DATA`], every vcpu below the trace's count, every code known.

use std::io::Read;

use shadow2::emulate::Regs;
use shadow2::paging::ControlState;

use super::MAX_DATA;
use super::error::TraceErrorKind;
use super::format::{
    COUNTER_FIELDS, Op, Record, counters_from, event_from, mode_from, outcome, tag,
};
use super::input::Input;
use crate::ops::{Fault, OpError};

/// Reads the body of a record whose tag byte has been read. `index` is the record's
/// index and `vcpus` the trace's vcpu count (vcpu fields must be below it). Errors carry
/// no offset: the caller adds the record's.
pub(crate) fn decode_body<R: Read>(
    tag: u8,
    input: &mut Input<R>,
    index: u64,
    vcpus: usize,
) -> Result<Record, TraceErrorKind> {
    let bad = |why: String| TraceErrorKind::BadRecord { record: index, why };
    let vcpu = |input: &mut Input<R>| -> Result<usize, TraceErrorKind> {
        let v = input.u32()?;
        match usize::try_from(v) {
            Ok(v) if v < vcpus => Ok(v),
            _ => Err(bad(format!(
                "vcpu {v} out of range (the trace has {vcpus} vcpus)"
            ))),
        }
    };
    let len = |input: &mut Input<R>| -> Result<usize, TraceErrorKind> {
        let n = input.u32()?;
        match usize::try_from(n) {
            Ok(n) if n <= MAX_DATA => Ok(n),
            _ => Err(bad(format!(
                "length {n} exceeds the limit of {MAX_DATA} bytes"
            ))),
        }
    };
    let op = match tag {
        tag::LOAD_IMAGE => {
            let gpa = input.u64()?;
            let n = len(input)?;
            Op::LoadImage {
                gpa,
                data: input.bytes(n)?,
            }
        }
        tag::READ | tag::FETCH | tag::WRITE => {
            let vcpu = vcpu(input)?;
            let va = input.u64()?;
            let cpl = input.u8()?;
            let n = len(input)?;
            match tag {
                tag::READ => Op::Read {
                    vcpu,
                    va,
                    cpl,
                    len: n,
                },
                tag::FETCH => Op::Fetch {
                    vcpu,
                    va,
                    cpl,
                    len: n,
                },
                _ => Op::Write {
                    vcpu,
                    va,
                    cpl,
                    data: input.bytes(n)?,
                },
            }
        }
        tag::EXEC => {
            let vcpu = vcpu(input)?;
            let mut gpr = [0u64; 16];
            for g in &mut gpr {
                *g = input.u64()?;
            }
            let rip = input.u64()?;
            let rflags = input.u64()?;
            let fs_base = input.u64()?;
            let gs_base = input.u64()?;
            let m = input.u8()?;
            let mode = mode_from(m).ok_or_else(|| bad(format!("unknown code mode {m}")))?;
            let cpl = input.u8()?;
            Op::Exec {
                vcpu,
                regs: Regs {
                    gpr,
                    rip,
                    rflags,
                    fs_base,
                    gs_base,
                    mode,
                    cpl,
                },
            }
        }
        tag::SET_CONTROL => {
            let vcpu = vcpu(input)?;
            let cr0 = input.u64()?;
            let cr3 = input.u64()?;
            let cr4 = input.u64()?;
            let efer = input.u64()?;
            let rflags = input.u64()?;
            let pkru = input.u32()?;
            let mut pdptes = [0u64; 4];
            for p in &mut pdptes {
                *p = input.u64()?;
            }
            Op::SetControl {
                vcpu,
                ctl: ControlState {
                    cr0,
                    cr3,
                    cr4,
                    efer,
                    rflags,
                    pkru,
                    pdptes,
                },
            }
        }
        tag::SET_CR3 => Op::SetCr3 {
            vcpu: vcpu(input)?,
            cr3: input.u64()?,
        },
        tag::INVLPG => Op::Invlpg {
            vcpu: vcpu(input)?,
            va: input.u64()?,
        },
        tag::EVENT => {
            let c = input.u8()?;
            let e = event_from(c).ok_or_else(|| bad(format!("unknown event {c}")))?;
            return Ok(Record::Event(e));
        }
        tag::END => {
            let records = input.u64()?;
            let mut v = [0u64; COUNTER_FIELDS];
            for x in &mut v {
                *x = input.u64()?;
            }
            return Ok(Record::End {
                records,
                counters: counters_from(v),
            });
        }
        other => return Err(TraceErrorKind::UnknownTag(other)),
    };
    let outcome = match input.u8()? {
        outcome::OK => Ok(()),
        outcome::PAGE_FAULT => {
            let va = input.u64()?;
            let code = input.u32()?;
            Err(OpError::Fault(Fault::PageFault { va, code }))
        }
        outcome::GENERAL_PROTECTION => Err(OpError::Fault(Fault::GeneralProtection)),
        outcome::INVALID_OPCODE => Err(OpError::Fault(Fault::InvalidOpcode)),
        outcome::BACKEND => {
            let n = len(input)?;
            let bytes = input.bytes(n)?;
            let why = String::from_utf8(bytes)
                .map_err(|_| bad("backend failure message is not UTF-8".to_owned()))?;
            Err(OpError::Backend(why))
        }
        other => return Err(bad(format!("unknown outcome {other}"))),
    };
    Ok(Record::Op { op, outcome })
}

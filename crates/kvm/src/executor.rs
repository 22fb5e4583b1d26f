//! The guest-resident executor: a few real instructions, assembled at run time, that carry
//! out a guest operation on the vcpu. The VMM points RIP at one of them with the
//! operation's arguments in registers and runs the vcpu: the access happens on the
//! hardware, through the engine's shadows, at the operation's privilege level (the same
//! bytes are mapped twice, in a supervisor page run at CPL1 and a user page run at CPL3),
//! and the routine reports completion with `out` to [`hyper::GUEST_PORT`].
//!
//! - `copy`: `rep movsb` from RSI to RDI, RCX bytes: a load copies from the address into
//!   the operation's buffer, a store from the buffer to the address.
//! - `mov cr0` / `mov cr3` / `invlpg`: privileged instructions that #GP at CPL1 and CPL3; the
//!   VMM recognises the executor's own instruction by its address, carries the operation
//!   out through the engine, and resumes after it.

use iced_x86::code_asm::{CodeAssembler, CodeLabel, al, byte_ptr, cr0, cr3, rax};

use crate::KvmError;
use crate::hyper;

/// Offsets, within the executor's page, of its routines and of the instructions the VMM
/// recognises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Executor {
    /// `rep movsb`, then report.
    pub copy: u64,
    /// `mov cr0, rax`.
    pub mov_cr0: u64,
    /// `mov cr3, rax`.
    pub mov_cr3: u64,
    /// `invlpg [rax]`.
    pub invlpg: u64,
    /// The `out` after each privileged instruction, where the VMM resumes it.
    pub after_mov_cr0: u64,
    /// See [`Executor::after_mov_cr0`].
    pub after_mov_cr3: u64,
    /// See [`Executor::after_mov_cr0`].
    pub after_invlpg: u64,
}

/// The privileged instructions the executor traps on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Privileged {
    /// MOV to CR0 (with CR4 and EFER: the operation sets all three).
    Control,
    /// MOV to CR3.
    Cr3,
    /// INVLPG.
    Invlpg,
}

impl Executor {
    /// Assembles the executor: its bytes (position independent) and their layout.
    pub fn assemble() -> Result<(Vec<u8>, Executor), KvmError> {
        let asm_err = |e: iced_x86::IcedError| KvmError::Asm(e.to_string());
        let mut a = CodeAssembler::new(64).map_err(asm_err)?;
        let port = u32::from(hyper::GUEST_PORT);
        let mut labels: Vec<CodeLabel> = (0..7).map(|_| a.create_label()).collect();
        a.set_label(&mut labels[0]).map_err(asm_err)?;
        a.rep().movsb().map_err(asm_err)?;
        a.out(port, al).map_err(asm_err)?;
        a.set_label(&mut labels[1]).map_err(asm_err)?;
        a.mov(cr0, rax).map_err(asm_err)?;
        a.set_label(&mut labels[2]).map_err(asm_err)?;
        a.out(port, al).map_err(asm_err)?;
        a.set_label(&mut labels[3]).map_err(asm_err)?;
        a.mov(cr3, rax).map_err(asm_err)?;
        a.set_label(&mut labels[4]).map_err(asm_err)?;
        a.out(port, al).map_err(asm_err)?;
        a.set_label(&mut labels[5]).map_err(asm_err)?;
        a.invlpg(byte_ptr(rax)).map_err(asm_err)?;
        a.set_label(&mut labels[6]).map_err(asm_err)?;
        a.out(port, al).map_err(asm_err)?;
        let result = a
            .assemble_options(
                0,
                iced_x86::BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
            )
            .map_err(asm_err)?;
        let at = |i: usize| result.label_ip(&labels[i]).map_err(asm_err);
        let layout = Executor {
            copy: at(0)?,
            mov_cr0: at(1)?,
            after_mov_cr0: at(2)?,
            mov_cr3: at(3)?,
            after_mov_cr3: at(4)?,
            invlpg: at(5)?,
            after_invlpg: at(6)?,
        };
        let bytes = result.inner.code_buffer;
        if bytes.len() > 4096 {
            return Err(KvmError::Asm("the executor does not fit in a page".into()));
        }
        Ok((bytes, layout))
    }

    /// Where the executor's copy run at `cpl` starts.
    pub fn base(cpl: u8) -> u64 {
        if cpl == 3 {
            hyper::EXEC_USER_VA
        } else {
            hyper::EXEC_KERNEL_VA
        }
    }

    /// The privileged instruction at `offset`, and the offset to resume at after it.
    pub fn privileged_at(&self, offset: u64) -> Option<(Privileged, u64)> {
        if offset == self.mov_cr0 {
            Some((Privileged::Control, self.after_mov_cr0))
        } else if offset == self.mov_cr3 {
            Some((Privileged::Cr3, self.after_mov_cr3))
        } else if offset == self.invlpg {
            Some((Privileged::Invlpg, self.after_invlpg))
        } else {
            None
        }
    }

    /// The entry of the privileged instruction of `op`.
    pub fn privileged_entry(&self, op: Privileged) -> u64 {
        match op {
            Privileged::Control => self.mov_cr0,
            Privileged::Cr3 => self.mov_cr3,
            Privileged::Invlpg => self.invlpg,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions, Mnemonic};

    #[test]
    fn layout_names_the_instructions_it_says() {
        let (bytes, x) = Executor::assemble().expect("assembles");
        let mnemonic_at = |offset: u64| {
            let mut d =
                Decoder::with_ip(64, &bytes[offset as usize..], offset, DecoderOptions::NONE);
            d.decode().mnemonic()
        };
        assert_eq!(mnemonic_at(x.copy), Mnemonic::Movsb);
        assert_eq!(mnemonic_at(x.mov_cr0), Mnemonic::Mov);
        assert_eq!(mnemonic_at(x.mov_cr3), Mnemonic::Mov);
        assert_eq!(mnemonic_at(x.invlpg), Mnemonic::Invlpg);
        for after in [x.after_mov_cr0, x.after_mov_cr3, x.after_invlpg] {
            assert_eq!(mnemonic_at(after), Mnemonic::Out);
        }
        assert_eq!(
            x.privileged_at(x.mov_cr3),
            Some((Privileged::Cr3, x.after_mov_cr3))
        );
        assert_eq!(x.privileged_at(x.copy), None);
    }
}

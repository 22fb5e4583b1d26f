//! The hypervisor area: descriptor tables, the TSS with its I/O bitmap, the ring-0 trap
//! stubs, a mailbox and the ring-0 stacks, mapped by the host's own L3 that the engine links
//! into the hypervisor hole of every shadow top (never PML4 slot 256, which PVM refuses at
//! CPL3). Read-only except the stacks and the mailboxes; supervisor-only except the user
//! copy of the executor (read-only) and the user mailbox, which guest operations at CPL3
//! need; no descriptor has to be written by the CPU (accessed bits preset, busy TSS), so all
//! of them stay read-only.

use iced_x86::BlockEncoderOptions;
use iced_x86::code_asm::{CodeAssembler, al, rsp};
use shadow2::paging::bits;
use shadow2::{MachineMemory, Mfn};

use crate::KvmError;
use crate::executor::Executor;
use crate::memory::KvmMemory;

/// First address of the hole (L4 slot 510, the engine's internal-mode reservation).
pub const HOLE_BASE: u64 = 0xffff_ff00_0000_0000;
/// The GDT.
pub const GDT_VA: u64 = HOLE_BASE;
/// The IDT (32 exception gates).
pub const IDT_VA: u64 = HOLE_BASE + 0x1000;
/// The trap stubs.
pub const STUBS_VA: u64 = HOLE_BASE + 0x6000;
/// The executor run at CPL1 (supervisor page).
pub const EXEC_KERNEL_VA: u64 = HOLE_BASE + 0xe000;
/// The executor run at CPL3 (user page).
pub const EXEC_USER_VA: u64 = HOLE_BASE + 0xf000;

/// Vcpus the area has room for (each has its own block: TSS, mailboxes, stacks).
pub const MAX_VCPUS: usize = 8;
/// Where vcpu 0's block starts; vcpu `v`'s is [`BLOCK_BYTES`] further on per vcpu.
const BLOCKS_VA: u64 = HOLE_BASE + 0x10_0000;
const BLOCK_BYTES: u64 = 0x1_0000;
/// Offsets in a vcpu's block.
const TSS_OFFSET: u64 = 0;
const MAILBOX_OFFSET: u64 = 0x4000;
const USER_MAILBOX_OFFSET: u64 = 0x5000;
const STACK_OFFSET: u64 = 0x7000;
const DF_STACK_OFFSET: u64 = 0xa000;

fn block_va(v: usize) -> u64 {
    BLOCKS_VA + v as u64 * BLOCK_BYTES
}

/// Vcpu `v`'s TSS, followed by its I/O bitmap (4 pages).
pub fn tss_va(v: usize) -> u64 {
    block_va(v) + TSS_OFFSET
}

/// Vcpu `v`'s mailbox: the data of its operations at CPL 0-2 (ring 0 and 1 write, the VMM
/// reads).
pub fn mailbox_va(v: usize) -> u64 {
    block_va(v) + MAILBOX_OFFSET
}

/// Vcpu `v`'s user mailbox: the data of its operations at CPL3 (a user page).
pub fn user_mailbox_va(v: usize) -> u64 {
    block_va(v) + USER_MAILBOX_OFFSET
}

/// Vcpu `v`'s ring-0 stack (2 pages below its RSP0, a guard page on each side).
pub fn stack_va(v: usize) -> u64 {
    block_va(v) + STACK_OFFSET
}

/// Vcpu `v`'s TSS.RSP0.
pub fn rsp0(v: usize) -> u64 {
    stack_va(v) + 0x2000
}

/// Vcpu `v`'s #DF stack (IST1, one page).
pub fn df_stack_va(v: usize) -> u64 {
    block_va(v) + DF_STACK_OFFSET
}

/// Vcpu `v`'s TSS.IST1.
pub fn ist1(v: usize) -> u64 {
    df_stack_va(v) + 0x1000
}

/// Vcpu `v`'s TSS selector.
pub fn tss_sel(v: usize) -> u16 {
    FIRST_TSS_SEL + 16 * v as u16
}

/// Ring-0 code (64-bit).
pub const KERNEL_CS: u16 = 0x08;
/// Ring-0 data.
pub const KERNEL_DS: u16 = 0x10;
/// Ring-1 code (64-bit).
pub const RING1_CS: u16 = 0x18 | 1;
/// Ring-1 data.
pub const RING1_DS: u16 = 0x20 | 1;
/// Ring-3 data.
pub const USER_DS: u16 = 0x28 | 3;
/// Ring-3 code (64-bit).
pub const USER_CS: u16 = 0x30 | 3;
/// Ring-1 code (32-bit, compatibility mode).
pub const RING1_CS32: u16 = 0x38 | 1;
/// Ring-3 code (32-bit, compatibility mode).
pub const USER_CS32: u16 = 0x50 | 3;
/// Vcpu 0's TSS (each vcpu's is 16 bytes further on).
const FIRST_TSS_SEL: u16 = 0x60;
/// The GDT's limit.
pub const GDT_LIMIT: u16 = FIRST_TSS_SEL + 16 * MAX_VCPUS as u16 - 1;

/// The port a guest reports to (the only one its I/O bitmap opens: 4 ports from here).
pub const GUEST_PORT: u16 = 0x10;
/// Stub `n` reports exception `n` with `out` to this port plus `n`; the guest may not use
/// these ports, so it cannot fake an exception exit.
pub const STUB_PORT_BASE: u16 = 0xe0;
/// Exceptions with a stub (every architectural one: 0..32, ports 0xE0..0xFF).
pub const VECTORS: u8 = 32;

const TSS_BYTES: u64 = 104;
const IO_BITMAP_BYTES: u64 = 8192;
/// TSS limit: the TSS, the bitmap and the closing all-ones byte.
pub const TSS_LIMIT: u32 = (TSS_BYTES + IO_BITMAP_BYTES) as u32;

/// Exceptions for which the CPU pushes an error code.
fn pushes_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10 | 11 | 12 | 13 | 14 | 17 | 21 | 29 | 30)
}

/// The hypervisor area, built in VM memory.
#[derive(Debug, Clone)]
pub struct HyperArea {
    /// The L3 table the engine links into the hole.
    pub l3: Mfn,
    /// The executor's layout (its copies at [`EXEC_KERNEL_VA`] and [`EXEC_USER_VA`]).
    pub executor: Executor,
    frames: Vec<Mfn>,
    /// Each vcpu's writable pages: (linear address, frame).
    writable: Vec<(u64, Mfn)>,
}

struct Builder<'a> {
    mem: &'a mut KvmMemory,
    frames: Vec<Mfn>,
}

impl Builder<'_> {
    fn alloc(&mut self, order: u8) -> Result<Mfn, KvmError> {
        let m = self.mem.alloc_block(order).ok_or(KvmError::OutOfFrames)?;
        self.frames
            .extend((0..1u64 << order).map(|i| Mfn::new(m.raw() + i)));
        Ok(m)
    }
}

impl HyperArea {
    /// Builds every table and stub in `mem`, with a block (TSS, mailboxes, stacks) for each
    /// of `vcpus` vcpus (at most [`MAX_VCPUS`]).
    pub fn build(mem: &mut KvmMemory, vcpus: usize) -> Result<HyperArea, KvmError> {
        if vcpus == 0 || vcpus > MAX_VCPUS {
            return Err(KvmError::Memory(format!(
                "the hypervisor area has room for 1 to {MAX_VCPUS} vcpus, not {vcpus}"
            )));
        }
        let mut b = Builder {
            mem,
            frames: Vec::new(),
        };
        let l3 = b.alloc(0)?;
        let l2 = b.alloc(0)?;
        let l1 = b.alloc(0)?;
        let gdt = b.alloc(0)?;
        let idt = b.alloc(0)?;
        let stubs = b.alloc(0)?;
        let exec_kernel = b.alloc(0)?;
        let exec_user = b.alloc(0)?;

        // User at the upper levels: each leaf decides (all supervisor but the user
        // executor and the user mailboxes).
        let upper = bits::P | bits::RW | bits::US | bits::A;
        write_u64(b.mem, l3.base().raw(), l2.base().raw() | upper)?;
        write_u64(b.mem, l2.base().raw(), l1.base().raw() | upper)?;
        let read_only = bits::P | bits::A | bits::NX;
        let writable = bits::P | bits::RW | bits::A | bits::D | bits::NX;
        let mut pages: Vec<(u64, Mfn, u64)> = vec![
            (GDT_VA, gdt, read_only),
            (IDT_VA, idt, read_only),
            (STUBS_VA, stubs, bits::P | bits::A),
            (EXEC_KERNEL_VA, exec_kernel, bits::P | bits::A),
            (EXEC_USER_VA, exec_user, bits::P | bits::US | bits::A),
        ];
        let mut writable_pages = Vec::new();
        let mut tsses = Vec::new();
        for v in 0..vcpus {
            let tss = b.alloc(2)?;
            for i in 0..4 {
                pages.push((tss_va(v) + i * 4096, Mfn::new(tss.raw() + i), read_only));
            }
            tsses.push(tss);
            let mailbox = b.alloc(0)?;
            let user_mailbox = b.alloc(0)?;
            let stack = b.alloc(1)?;
            let df_stack = b.alloc(0)?;
            pages.push((mailbox_va(v), mailbox, writable));
            pages.push((user_mailbox_va(v), user_mailbox, writable | bits::US));
            pages.push((df_stack_va(v), df_stack, writable));
            writable_pages.extend([
                (mailbox_va(v), mailbox),
                (user_mailbox_va(v), user_mailbox),
                (df_stack_va(v), df_stack),
            ]);
            for i in 0..2 {
                let page = Mfn::new(stack.raw() + i);
                pages.push((stack_va(v) + i * 4096, page, writable));
                writable_pages.push((stack_va(v) + i * 4096, page));
            }
        }
        for (va, mfn, flags) in pages {
            let index = (va - HOLE_BASE) >> 12;
            write_u64(b.mem, l1.base().raw() + 8 * index, mfn.base().raw() | flags)?;
        }

        write_gdt(b.mem, gdt, vcpus)?;
        let stub_ips = write_stubs(b.mem, stubs)?;
        write_idt(b.mem, idt, &stub_ips)?;
        for (v, tss) in tsses.into_iter().enumerate() {
            write_tss(b.mem, tss, v)?;
        }
        let (code, executor) = Executor::assemble()?;
        for page in [exec_kernel, exec_user] {
            b.mem
                .write_bytes(page.base().raw(), &code)
                .map_err(|e| KvmError::Memory(format!("{e:?}")))?;
        }
        let frames = b.frames;
        Ok(HyperArea {
            l3,
            executor,
            frames,
            writable: writable_pages,
        })
    }

    /// Every frame of the area (declared to the engine as hypervisor frames).
    pub fn frames(&self) -> &[Mfn] {
        &self.frames
    }

    /// Vcpu `v`'s data buffer for operations at `cpl` (its mailbox at CPL 0-2, its user
    /// mailbox at CPL3): linear and VM-physical address.
    pub fn buffer(&self, v: usize, cpl: u8) -> Option<(u64, u64)> {
        let va = if cpl == 3 {
            user_mailbox_va(v)
        } else {
            mailbox_va(v)
        };
        Some((va, self.writable_gpa(va)?))
    }

    /// The VM-physical address of an address in a ring-0 stack or a mailbox, if it is one.
    pub fn writable_gpa(&self, va: u64) -> Option<u64> {
        self.writable.iter().find_map(|&(start, mfn)| {
            (start..start + 4096)
                .contains(&va)
                .then(|| mfn.base().raw() + (va - start))
        })
    }
}

fn write_u64(mem: &KvmMemory, gpa: u64, value: u64) -> Result<(), KvmError> {
    mem.write_bytes(gpa, &value.to_le_bytes())
        .map_err(|e| KvmError::Memory(format!("{e:?}")))
}

/// A code or data descriptor, accessed bit preset. `long`: 64-bit code.
fn descriptor(dpl: u64, code: bool, long: bool) -> u64 {
    let access = 0x80 | (dpl << 5) | 0x10 | if code { 0x0b } else { 0x03 };
    let flags = if long { 0xa } else { 0xc }; // G, and L or D/B
    0xffff | (access << 40) | (0xf << 48) | (flags << 52)
}

fn write_gdt(mem: &KvmMemory, gdt: Mfn, vcpus: usize) -> Result<(), KvmError> {
    let base = gdt.base().raw();
    let entries = [
        (KERNEL_CS, descriptor(0, true, true)),
        (KERNEL_DS, descriptor(0, false, false)),
        (RING1_CS, descriptor(1, true, true)),
        (RING1_DS, descriptor(1, false, false)),
        (USER_DS, descriptor(3, false, false)),
        (USER_CS, descriptor(3, true, true)),
        (RING1_CS32, descriptor(1, true, false)),
        (USER_CS32, descriptor(3, true, false)),
    ];
    for (selector, d) in entries {
        write_u64(mem, base + u64::from(selector & !7), d)?;
    }
    // A busy 64-bit TSS (type 0xB), 16 bytes, per vcpu.
    for v in 0..vcpus {
        let t = tss_va(v);
        let limit = u64::from(TSS_LIMIT);
        let low = (limit & 0xffff)
            | ((t & 0xff_ffff) << 16)
            | (0x8b << 40)
            | (((limit >> 16) & 0xf) << 48)
            | (((t >> 24) & 0xff) << 56);
        write_u64(mem, base + u64::from(tss_sel(v)), low)?;
        write_u64(mem, base + u64::from(tss_sel(v)) + 8, t >> 32)?;
    }
    Ok(())
}

/// Assembles one stub per exception: a dummy error code where the CPU pushes none, `out`
/// to the vector's port (a clean I/O exit to the VMM, which reads the frame on the stack),
/// then drop the error code and return to the (possibly updated) frame.
fn write_stubs(mem: &KvmMemory, stubs: Mfn) -> Result<Vec<u64>, KvmError> {
    let asm_err = |e: iced_x86::IcedError| KvmError::Asm(e.to_string());
    let mut a = CodeAssembler::new(64).map_err(asm_err)?;
    let mut labels = Vec::new();
    for vector in 0..VECTORS {
        let mut label = a.create_label();
        a.set_label(&mut label).map_err(asm_err)?;
        if !pushes_error_code(vector) {
            a.push(0).map_err(asm_err)?;
        }
        a.out(u32::from(STUB_PORT_BASE) + u32::from(vector), al)
            .map_err(asm_err)?;
        a.add(rsp, 8).map_err(asm_err)?;
        a.iretq().map_err(asm_err)?;
        labels.push(label);
    }
    let result = a
        .assemble_options(
            STUBS_VA,
            BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
        )
        .map_err(asm_err)?;
    let bytes = result.inner.code_buffer.clone();
    if bytes.len() > 4096 {
        return Err(KvmError::Asm("the stubs do not fit in a page".into()));
    }
    mem.write_bytes(stubs.base().raw(), &bytes)
        .map_err(|e| KvmError::Memory(format!("{e:?}")))?;
    labels
        .iter()
        .map(|l| result.label_ip(l).map_err(asm_err))
        .collect()
}

fn write_idt(mem: &KvmMemory, idt: Mfn, stub_ips: &[u64]) -> Result<(), KvmError> {
    for (vector, &ip) in stub_ips.iter().enumerate() {
        // #DF runs on its own stack (IST1), whatever state the ring-0 stack is in.
        let ist: u64 = if vector == 8 { 1 } else { 0 };
        let low = (ip & 0xffff)
            | (u64::from(KERNEL_CS) << 16)
            | (ist << 32)
            | (0x8e << 40) // present, DPL0, 64-bit interrupt gate
            | (((ip >> 16) & 0xffff) << 48);
        let at = idt.base().raw() + 16 * vector as u64;
        write_u64(mem, at, low)?;
        write_u64(mem, at + 8, ip >> 32)?;
    }
    Ok(())
}

fn write_tss(mem: &KvmMemory, tss: Mfn, v: usize) -> Result<(), KvmError> {
    let base = tss.base().raw();
    write_u64(mem, base + 4, rsp0(v))?;
    write_u64(mem, base + 0x24, ist1(v))?;
    mem.write_bytes(base + 0x66, &(TSS_BYTES as u16).to_le_bytes())
        .map_err(|e| KvmError::Memory(format!("{e:?}")))?;
    // Every port denied (bit set) but the guest's four, and the closing all-ones byte.
    let mut bitmap = vec![0xffu8; IO_BITMAP_BYTES as usize + 1];
    for port in GUEST_PORT..GUEST_PORT + 4 {
        bitmap[usize::from(port / 8)] &= !(1 << (port % 8));
    }
    mem.write_bytes(base + TSS_BYTES, &bitmap)
        .map_err(|e| KvmError::Memory(format!("{e:?}")))
}

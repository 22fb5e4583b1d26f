//! Segment and control registers as `KVM_SET_SREGS` wants them (the pitfalls measured on
//! this host: CPL comes from SS.DPL, limits are in bytes, `tr.type` 0xB, an unusable LDT,
//! and `apic_base` kept by starting from `KVM_GET_SREGS`).

use kvm_bindings::{kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use shadow2::paging::PagingLevels;
use shadow2::paging::bits::cr;

/// CR0.MP, CR0.ET and CR0.NE: set on every x86-64 CPU since the 486.
pub const CR0_FIXED: u64 = (1 << 1) | (1 << 4) | (1 << 5);

/// A flat segment. `code`: executable (readable); `long`: a 64-bit code segment.
pub fn flat(selector: u16, dpl: u8, code: bool, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        // Accessed bit preset, so the CPU never writes the descriptor.
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// The busy 64-bit TSS at `base`, `limit` bytes long (inclusive).
pub fn tss(selector: u16, base: u64, limit: u32) -> kvm_segment {
    kvm_segment {
        base,
        limit,
        selector,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 0,
        s: 0,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// No LDT.
pub fn no_ldt() -> kvm_segment {
    kvm_segment {
        unusable: 1,
        type_: 0x2,
        ..kvm_segment::default()
    }
}

/// Paging registers that select `levels` hardware paging, CR3 at `cr3`.
pub fn paging(sregs: &mut kvm_sregs, levels: PagingLevels, cr3: u64) {
    sregs.cr0 = cr::CR0_PE | cr::CR0_PG | cr::CR0_WP | CR0_FIXED;
    sregs.cr3 = cr3;
    let (cr4, efer) = match levels {
        PagingLevels::Four => (cr::CR4_PAE, cr::EFER_LME | cr::EFER_LMA | cr::EFER_NXE),
        PagingLevels::Three => (cr::CR4_PAE, cr::EFER_NXE),
        _ => (0, 0),
    };
    sregs.cr4 = cr4;
    sregs.efer = efer;
}

/// Whether KVM keeps paging on in `levels`-level hardware paging (PVM silently drops
/// CR0.PG outside long mode).
pub fn paging_sticks(vcpu: &VcpuFd, levels: PagingLevels) -> Result<bool, kvm_ioctls::Error> {
    let mut s = vcpu.get_sregs()?;
    let long = levels == PagingLevels::Four;
    s.cs = flat(0x08, 0, true, long);
    s.ss = flat(0x10, 0, false, false);
    s.ds = s.ss;
    s.es = s.ss;
    paging(&mut s, levels, 0x1000);
    if vcpu.set_sregs(&s).is_err() {
        return Ok(false);
    }
    let back = vcpu.get_sregs()?;
    Ok(back.cr0 & cr::CR0_PG != 0 && (back.efer & cr::EFER_LMA != 0) == long)
}

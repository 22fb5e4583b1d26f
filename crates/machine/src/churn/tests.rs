//! The churn's own bookkeeping, held to what the machine did.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;

/// A kernel whose code page its own writes overwrote runs what the bytes now say:
/// `and [eax], eax` on a zero page writes it without changing it. Log-dirty rightly
/// reports the page (a write is a write, as for the D flag, SDM 4.8), and the churn must
/// count it as written. It once took the frame from the address the kernel meant to write
/// (rDI) and called the report an over-report (3on4 soak: "log-dirty reports gfn 0x0 that
/// nothing wrote", after a superpage over frame 0 let the guest overwrite its code).
#[test]
fn a_store_from_an_overwritten_code_page_counts_the_frame_it_wrote() {
    const DATA_VA: u64 = 0xd020_0000;
    const FORM: u64 = 1;
    let cfg = ChurnConfig {
        pair: Pair::P3on4,
        ops: 0,
        seed: 10,
        tiny_pool: false,
    };
    let mut c = Churn::booted(cfg, Rng::new(10)).unwrap();
    let p = c.paging_process(0).expect("vcpu 0 runs a process");
    let (slot, _) = c
        .guest
        .ensure_path(&mut c.m, &mut c.rng, &p, DATA_VA, 1)
        .unwrap();
    let data = c.guest.alloc_frame(&mut c.m, &mut c.rng).unwrap();
    let leaf = data.base().raw() | bits::P | bits::RW | bits::A | bits::D;
    c.guest.write_entry_phys(&mut c.m, slot, leaf).unwrap();
    c.after_edit(DATA_VA, true, Some(p.cr3)).unwrap();
    let and_eax_eax = [0x21, 0x00];
    let code = Gpa::new((guest::CODE_GFN << 12) + guest::CODE_STRIDE * FORM);
    c.m.write_phys(code, &and_eax_eax).unwrap();
    c.enable_log_dirty().unwrap();

    let mut regs = Regs::new(CodeMode::Bits32);
    regs.rip = c.guest.code_va() + guest::CODE_STRIDE * FORM;
    regs.gpr[Regs::RAX] = DATA_VA;
    c.exec_kernel_store(0, regs).unwrap();
    c.note_guest_writes();
    let dirty = c.m.domain().peek_dirty().expect("log-dirty is on");
    assert!(dirty.contains(data), "the write was not logged: {dirty:?}");
    assert_eq!(
        c.digests.as_ref().and_then(|d| d.get(&data.raw())),
        c.digest_ram().get(&data.raw()),
        "the page changed"
    );

    c.clean_and_check().unwrap();
    assert_eq!(c.report.lost_dirty_pages, 0, "{:?}", c.report.first_problem);
    assert_eq!(c.m.mismatches().0, 0, "{:?}", c.m.mismatches().1);
}

#[test]
fn page_digest_is_fnv1a_byte_by_byte() {
    let mut page = vec![0u8; 4096];
    for (i, b) in page.iter_mut().enumerate() {
        // Zero runs of every length and alignment between nonzero bytes.
        *b = if i % 89 < 23 || i % 7 == 0 {
            0
        } else {
            (i * 31) as u8
        };
    }
    let reference = page.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    assert_eq!(super::page_fnv1a(&page), reference);
    assert_ne!(super::page_fnv1a(&page), super::page_fnv1a(&[0; 4096]));
}

//! The write emulator and the rights it must honour: a write straddling a page table and a
//! page that is not RAM, SMAP with the RFLAGS.AC handed to the emulator, protection keys in
//! splinters of 2 MiB pages, and CR4.PKE on hardware for guests without keys. These replay
//! issue 10's emulator and protection-key classes.

use shadow2::addr::{Gpa, Gva};
use shadow2::domain::EmulateOutcome;
use shadow2::emulate::Regs;
use shadow2::multi::{FaultOutcome, Pair};
use shadow2::paging::bits::{self, cr};
use shadow2::paging::{PagingLevels, PfErrorCode};
use shadow2_machine::sim::GuestError;

use crate::engine_support::{DATA, PAGING_PAIRS, SUP, TABLE, USR, control};
use crate::harness::{CODE_GFN, CODE_VA, DATA_GFN, KDATA, Xsa};

const X: u64 = 0x40_3000;
const PT_VA: u64 = 0x80_0000;
/// A guest frame that is not RAM.
const HOLE_GFN: u64 = 450;

/// A store that straddles the end of a page-table page (its last entry) and the start of a
/// page that is not RAM. Must hold: all or nothing: either the instruction completes
/// (the page-table part written and validated, the MMIO part given to the device), or it
/// faults having written nothing; the domain keeps running.
#[test]
fn issue10_write_straddling_a_page_table_and_mmio_is_all_or_nothing() {
    for pair in PAGING_PAIRS {
        let mut x = Xsa::new(pair, 1, 128);
        let cr3 = x.space();
        x.map(cr3, X, DATA_GFN, DATA);
        let l1 = x.t.table_of(&mut x.m, cr3, X, 1);
        x.map(cr3, PT_VA, l1, KDATA);
        x.map(cr3, PT_VA + 0x1000, HOLE_GFN, KDATA);
        let eb = x.t.entry_bytes();
        let last = (l1 << 12) + 4096 - eb;
        x.t.write(&mut x.m, last, ((DATA_GFN + 1) << 12) | DATA);
        x.run(0, cr3);
        x.read(0, PT_VA).unwrap();
        let before = x.entry(last);
        let wide = pair.guest() == PagingLevels::Four;
        let (code, width): (&[u8], u64) = if wide {
            (&[0x48, 0x89, 0x07], 8)
        } else {
            (&[0x89, 0x07], 4)
        };
        let at = PT_VA + 0x1000 - width / 2;
        let r = x.exec(0, code, |r| {
            r.gpr[Regs::RDI] = at;
            r.gpr[Regs::RAX] = u64::MAX;
        });
        let after = x.entry(last);
        match r {
            Ok(_) => assert_ne!(after, before, "{pair:?}: completed but not written"),
            Err(GuestError::Engine(e)) => panic!("{pair:?}: the engine failed: {e}"),
            Err(_) => assert_eq!(after, before, "{pair:?}: faulted after a partial write"),
        }
    }
}

/// SMAP and RFLAGS.AC: the emulator must check a supervisor write to a user page with the
/// AC flag of the registers it is handed (the instruction's state), not a copy taken at
/// the last mode change. Replayed on every paging pair with CR4.SMAP: the kernel writes a
/// PTE through a user mapping of its L1 with AC set in the registers and clear in the
/// saved state (must complete), and the reverse (must fault).
#[test]
fn issue10_smap_uses_the_ac_flag_of_the_registers_handed_to_the_emulator() {
    const AC: u64 = cr::RFLAGS_AC;
    for pair in PAGING_PAIRS {
        for (saved_ac, regs_ac) in [(0, AC), (AC, 0)] {
            let mut x = Xsa::new(pair, 1, 128);
            let cr3 = x.space();
            x.map(cr3, X, DATA_GFN, DATA);
            let l1 = x.t.table_of(&mut x.m, cr3, X, 1);
            x.map(cr3, PT_VA, l1, DATA);
            let mut ctl = control(pair.guest(), cr3);
            ctl.cr4 |= cr::CR4_SMAP;
            ctl.rflags = saved_ac;
            x.m.set_paging(0, ctl).unwrap();
            x.step("SMAP on");
            let code: &[u8] = if pair.guest() == PagingLevels::Four {
                &[0x48, 0x89, 0x07]
            } else {
                &[0x89, 0x07]
            };
            x.m.write_phys(Gpa::new(CODE_GFN << 12), code).unwrap();
            let offset = x.l1_index(X) * x.t.entry_bytes();
            let mut regs = Regs::new(x.code_mode());
            regs.rip = CODE_VA;
            regs.rflags = regs_ac;
            regs.gpr[Regs::RDI] = PT_VA + offset;
            regs.gpr[Regs::RAX] = ((DATA_GFN + 1) << 12) | DATA;
            let gpa = Gpa::new((l1 << 12) + offset);
            let r = x.host("emulate", |d| d.emulate(0, &mut regs, gpa));
            match (regs_ac != 0, r) {
                (true, Ok(EmulateOutcome::Done(d))) if d.complete => {}
                (false, Ok(EmulateOutcome::Fault(_))) => {}
                (allowed, other) => panic!("{pair:?}: AC in regs {allowed}: {other:?}"),
            }
        }
    }
}

/// Protection keys in splinters: a 64-bit guest with CR4.PKE maps a 2 MiB user page with
/// key 5, and PKRU denies access to key 5. The engine shadows the superpage with 4 KiB
/// splinter entries when a user fetch (which keys do not restrict) first touches it. Must
/// hold: every splinter entry carries key 5, so a later user read faults with PK as the
/// guest's own walk says.
#[test]
fn issue10_protection_keys_kept_in_splinters_of_2m_pages() {
    let mut x = Xsa::new(Pair::P4on4, 1, 128);
    let cr3 = x.space();
    let region = 0x4000_0000u64 - 0x20_0000;
    let slot = x.slot(cr3, region, 2);
    x.t.write(&mut x.m, slot, (5 << bits::PKEY_SHIFT) | bits::PS | DATA);
    let mut ctl = control(PagingLevels::Four, cr3);
    ctl.cr4 |= cr::CR4_PKE;
    ctl.pkru = 1 << (2 * 5);
    x.m.set_paging(0, ctl).unwrap();
    x.step("PKE on");
    // A user fetch (keys do not apply to fetches) builds the splinter and its TLB entry.
    let mut buf = [0u8; 8];
    x.m.fetch(0, Gva::new(region + 0x1000), USR, &mut buf)
        .unwrap();
    x.step("user fetch");
    let r = x.m.read(0, Gva::new(region + 0x1000), USR, &mut buf);
    x.step("user read under key 5");
    assert!(
        matches!(r, Err(GuestError::PageFault { code, .. }) if code.bits() & (1 << 5) != 0),
        "{r:?}"
    );
}

/// CR4.PKE for guests without keys: 32-bit and PAE paging have no protection keys, so a
/// guest that sets CR4.PKE (harmless there) must not get keys on 4-level hardware, where
/// PKRU would then apply key 0 to every user access. Replayed on 2-on-4 and 3-on-4 with
/// PKRU denying key 0. Must hold: user reads of user pages complete.
#[test]
fn issue10_cr4_pke_not_given_to_hardware_for_guests_without_keys() {
    for pair in [Pair::P2on4, Pair::P3on4] {
        let mut x = Xsa::new(pair, 1, 128);
        let cr3 = x.space();
        x.map(cr3, X, DATA_GFN, DATA);
        let mut ctl = control(pair.guest(), cr3);
        ctl.cr4 |= cr::CR4_PKE;
        ctl.pkru = 1;
        let r = x.set_control(0, ctl);
        assert_eq!(r, Ok(()), "{pair:?}");
        let hw = x.domain().hardware_control(0).unwrap();
        assert_eq!(hw.cr4 & cr::CR4_PKE, 0, "{pair:?}");
        let mut buf = [0u8; 8];
        let r = x.m.read(0, Gva::new(X), USR, &mut buf);
        x.step("user read");
        assert_eq!(r, Ok(()), "{pair:?}");
    }
}

/// No guest livelock: an instruction the emulator cannot do (`inc dword [rdi]`) on the top
/// table a vcpu runs on makes the engine unshadow that page, which it needs again at once.
/// Must hold on every pair: the emulation call completes or unshadows without failing the
/// domain, and the guest's retry of the write (natively, as a plain store) completes in a
/// bounded number of traps.
#[test]
fn issue10_unhandled_instruction_on_the_running_top_makes_progress() {
    for pair in PAGING_PAIRS {
        let mut x = Xsa::new(pair, 1, 128);
        let cr3 = x.space();
        x.map(cr3, X, DATA_GFN, DATA);
        let top = x.map_walk_top(cr3, X, PT_VA);
        x.run(0, cr3);
        x.read(0, X).unwrap();
        x.m.write_phys(Gpa::new(CODE_GFN << 12), &[0xff, 0x07])
            .unwrap();
        // An unused entry near the end of the table.
        let offset = 0xff0;
        let mut regs = Regs::new(x.code_mode());
        regs.rip = CODE_VA;
        regs.gpr[Regs::RDI] = PT_VA + offset;
        let gpa = Gpa::new((top << 12) + offset);
        let r = x.host("emulate on the running top", |d| {
            d.emulate(0, &mut regs, gpa)
        });
        assert!(
            matches!(r, Ok(EmulateOutcome::Unshadowed | EmulateOutcome::Done(_))),
            "{pair:?}: {r:?}"
        );
        let traps = x.m.traps().total();
        x.write(0, PT_VA + offset, 0).unwrap();
        assert!(
            x.m.traps().total() - traps <= 4,
            "{pair:?}: {:?}",
            x.m.traps()
        );
        assert_eq!(x.read(0, X).unwrap(), 0, "{pair:?}");
    }
}

/// A write on the guest's behalf by the host (`write_guest_phys`: a hypercall, a device's
/// DMA) that straddles the last entry of a page table in the guest's last RAM frame and
/// the first frame beyond RAM. Must hold on every pair: refused with nothing written (a
/// failed operation changes nothing), the shadows still agree with the guest's tables.
#[test]
fn issue10_host_write_straddling_a_page_table_and_non_ram_changes_nothing() {
    const LAST_RAM: u64 = crate::harness::RAM - 1;
    for pair in PAGING_PAIRS {
        let mut x = Xsa::new(pair, 1, 128);
        let cr3 = x.space();
        let per_table: u64 = if pair.guest() == PagingLevels::Two {
            1024
        } else {
            512
        };
        // The last entry of the guest's L1 in frame LAST_RAM maps `va`.
        let va = 0x4000_0000 + ((per_table - 1) << 12);
        let l2_slot = x.slot(cr3, va, 2);
        x.t.write(&mut x.m, l2_slot, (LAST_RAM << 12) | TABLE);
        let eb = x.t.entry_bytes();
        let last = (LAST_RAM << 12) + 4096 - eb;
        x.t.write(&mut x.m, last, (DATA_GFN << 12) | DATA);
        x.run(0, cr3);
        let value = x.read(0, va).unwrap();
        let before = x.entry(last);
        let bytes = vec![0xff; 2 * eb as usize];
        let r = x.host("write across the end of RAM", |d| {
            d.write_guest_phys(Gpa::new(last), &bytes).map(|f| ((), f))
        });
        assert!(r.is_err(), "{pair:?}: {r:?}");
        assert_eq!(x.entry(last), before, "{pair:?}: a refused write wrote");
        assert_eq!(x.read(0, va), Ok(value), "{pair:?}");
    }
}

/// An instruction whose source is not RAM (`movsd` from a device page onto the top table
/// the vcpu runs on) is an MMIO access, not one the emulator cannot do: unshadowing the
/// table would not help (the native retry reaches the same device page, and the running
/// top is shadowed again at once). Must hold on every pair: the engine answers MMIO with
/// the device page's address, writes nothing and keeps the table shadowed.
#[test]
fn issue10_emulated_copy_from_non_ram_onto_the_running_top_is_mmio() {
    for pair in PAGING_PAIRS {
        let mut x = Xsa::new(pair, 1, 128);
        let cr3 = x.space();
        x.map(cr3, X, DATA_GFN, DATA);
        let top = x.map_walk_top(cr3, X, PT_VA);
        x.map(cr3, PT_VA + 0x1000, HOLE_GFN, KDATA);
        x.run(0, cr3);
        x.read(0, X).unwrap();
        // movsd: [rdi] <- [rsi], 4 bytes.
        x.m.write_phys(Gpa::new(CODE_GFN << 12), &[0xa5]).unwrap();
        let offset = 0xff0;
        let mut regs = Regs::new(x.code_mode());
        regs.rip = CODE_VA;
        regs.gpr[Regs::RSI] = PT_VA + 0x1000;
        regs.gpr[Regs::RDI] = PT_VA + offset;
        let before_regs = regs;
        let before = x.entry((top << 12) + offset);
        let unshadows = x.domain().stats().unshadows;
        let gpa = Gpa::new((top << 12) + offset);
        let r = x.host("emulate a copy from a device page", |d| {
            d.emulate(0, &mut regs, gpa)
        });
        assert_eq!(
            r,
            Ok(EmulateOutcome::Mmio {
                gpa: Gpa::new(HOLE_GFN << 12)
            }),
            "{pair:?}"
        );
        assert_eq!(regs, before_regs, "{pair:?}");
        assert_eq!(x.entry((top << 12) + offset), before, "{pair:?}");
        assert_eq!(x.domain().stats().unshadows, unshadows, "{pair:?}");
        assert!(
            x.domain().shadows().is_page_table(x.mfn(top)),
            "{pair:?}: the running top was unshadowed"
        );
    }
}

/// Protection keys in a splinter shared by two aliases: a 64-bit guest maps one 2 MiB
/// frame range twice, through an entry with key 0 and one with key 5, and PKRU denies
/// key 5. The splinter of the range is found by its first frame, so the two aliases must
/// not share one (whichever filled it first would give the other its key). Must hold:
/// after a user read through the key-0 alias and a user fetch through the key-5 alias
/// (which keys do not restrict, so both splinters are linked), a user read through the
/// key-5 alias faults with PK and one through the key-0 alias still succeeds.
#[test]
fn issue10_protection_keys_of_two_aliases_of_a_2m_page_stay_apart() {
    let mut x = Xsa::new(Pair::P4on4, 1, 128);
    let cr3 = x.space();
    let keyed = 0x4000_0000u64 - 0x20_0000;
    let open = 0x8000_0000u64 - 0x20_0000;
    let keyed_slot = x.slot(cr3, keyed, 2);
    x.t.write(
        &mut x.m,
        keyed_slot,
        (5 << bits::PKEY_SHIFT) | bits::PS | DATA,
    );
    let open_slot = x.slot(cr3, open, 2);
    x.t.write(&mut x.m, open_slot, bits::PS | DATA);
    let mut ctl = control(PagingLevels::Four, cr3);
    ctl.cr4 |= cr::CR4_PKE;
    ctl.pkru = 1 << (2 * 5);
    x.m.set_paging(0, ctl).unwrap();
    x.step("PKE on");
    let page = DATA_GFN << 12;
    let mut buf = [0u8; 8];
    let r = x.m.read(0, Gva::new(open + page), USR, &mut buf);
    x.step("user read through key 0");
    assert_eq!(r, Ok(()));
    // A user fetch (keys do not apply to fetches) links the key-5 alias's splinter.
    let r = x.m.fetch(0, Gva::new(keyed + page), USR, &mut buf);
    x.step("user fetch through key 5");
    assert_eq!(r, Ok(()));
    let r = x.m.read(0, Gva::new(keyed + page), USR, &mut buf);
    x.step("user read through key 5");
    assert!(
        matches!(r, Err(GuestError::PageFault { code, .. }) if code.bits() & (1 << 5) != 0),
        "{r:?}"
    );
    let r = x.m.read(0, Gva::new(open + page), USR, &mut buf);
    x.step("user read through key 0 again");
    assert_eq!(r, Ok(()));
}

/// The hardware's fault for the live RFLAGS.AC and PKRU, which the engine only has a copy
/// of (CLAC, STAC and WRPKRU do not exit, so the copy is the one handed in at the last
/// control write). Replayed on every paging pair: the copy says AC set (SMAP allows a
/// kernel read of a user page), the shadows are filled, then the guest clears AC and the
/// hardware faults (P, supervisor read) on shadows that already allow the access; on
/// 4-on-4 the same with a key the copy of PKRU allows and the live PKRU denies (P, U, PK).
/// Must hold: the engine cannot fix it, so the same fault again (no shadow entry written
/// in between) is delivered to the guest with the hardware's reason, not answered
/// `Spurious` for ever.
#[test]
fn issue10_a_fault_only_the_live_ac_or_pkru_explains_is_delivered_not_retried_for_ever() {
    const HW_TRIES: usize = 4;
    let smap = PAGING_PAIRS.map(|pair| (pair, 0u64, PfErrorCode::P));
    let pkru = [(
        Pair::P4on4,
        3u64 << bits::PKEY_SHIFT,
        PfErrorCode::P | PfErrorCode::U | PfErrorCode::PK,
    )];
    for (pair, key, hw_code) in smap.into_iter().chain(pkru) {
        let mut x = Xsa::new(pair, 1, 128);
        let cr3 = x.space();
        x.map(cr3, X, DATA_GFN, DATA | key);
        let mut ctl = control(pair.guest(), cr3);
        ctl.cr4 |= cr::CR4_SMAP;
        ctl.rflags = cr::RFLAGS_AC;
        if key != 0 {
            ctl.cr4 |= cr::CR4_PKE;
        }
        x.m.set_paging(0, ctl).unwrap();
        x.step("SMAP on, AC set in the copy");
        let user = hw_code & PfErrorCode::U != 0;
        let mut buf = [0u8; 8];
        let warm =
            x.m.read(0, Gva::new(X), if user { USR } else { SUP }, &mut buf);
        assert_eq!(warm, Ok(()), "{pair:?}");
        x.step("the shadows allow the access");
        let mut answers = Vec::new();
        for _ in 0..HW_TRIES {
            let r = x.host("the hardware's fault", |d| {
                d.page_fault(0, Gva::new(X), PfErrorCode(hw_code))
            });
            let delivered = matches!(r, Ok(FaultOutcome::Propagate(_)));
            answers.push(r);
            if delivered {
                break;
            }
        }
        match answers.last() {
            Some(Ok(FaultOutcome::Propagate(code))) => {
                assert_eq!(code.bits(), hw_code, "{pair:?}: {answers:?}")
            }
            _ => panic!("{pair:?}: retried for ever: {answers:?}"),
        }
        assert!(answers.len() <= 2, "{pair:?}: {answers:?}");
    }
}

//! The paging rules of the Intel SDM vol. 3A, 4.3-4.8, written out as plainly as possible,
//! as a second opinion on the walker.
//!
//! This file deliberately shares nothing with `shadow2::paging::walk` or the `PagingMode`
//! implementations beyond the plain data types: it is handed the values of the entries on
//! the path (it never reads memory) and decides, rule by rule, whether the access faults,
//! with which error code, which entries get A, whether the leaf gets D, and which physical
//! address the access reaches.

use shadow2::paging::{
    Access, AccessKind, ControlState, CpuFeatures, PagingLevels, PfErrorCode, Privilege,
};

/// Longest path: the four entries of 4-level paging.
pub const MAX_PATH: usize = 4;

/// The situation to judge.
#[derive(Clone, Copy, Debug)]
pub struct Situation<'a> {
    /// The paging mode (2-level, PAE or 4-level).
    pub levels: PagingLevels,
    /// Control registers.
    pub ctl: &'a ControlState,
    /// CPU features (MAXPHYADDR, 1 GiB pages).
    pub feat: &'a CpuFeatures,
    /// The linear address.
    pub va: u64,
    /// The access.
    pub access: Access,
    /// The entries on the path, top level first. In PAE paging the first one is the PDPTE
    /// register. Entries the walk never reaches may be left out.
    pub path: &'a [u64],
}

/// What the SDM says happens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// The physical address reached, or the page fault's error code.
    pub outcome: Result<u64, PfErrorCode>,
    /// How many entries of the path the processor reads (up to and including the leaf or
    /// the faulting entry).
    pub used: usize,
    /// The first `used` entries after the access: A and D set where the processor sets them.
    pub after: [u64; MAX_PATH],
}

/// Why the rules cannot judge a situation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RulesError {
    /// The path ends before the walk does.
    PathTooShort,
    /// Paging disabled: nothing to judge.
    NoPaging,
}

const P: u64 = 1 << 0;
const RW: u64 = 1 << 1;
const US: u64 = 1 << 2;
const A: u64 = 1 << 5;
const D: u64 = 1 << 6;
const PS: u64 = 1 << 7;
const XD: u64 = 1 << 63;

/// Bits `hi..=lo` of a 64-bit value (empty when hi < lo).
fn bits(hi: u32, lo: u32) -> u64 {
    if hi < lo {
        return 0;
    }
    let width = hi - lo + 1;
    let ones = if width >= 64 {
        u64::MAX
    } else {
        (1u64 << width) - 1
    };
    ones << lo
}

fn levels_of(levels: PagingLevels) -> u8 {
    match levels {
        PagingLevels::Zero => 0,
        PagingLevels::Two => 2,
        PagingLevels::Three => 3,
        PagingLevels::Four => 4,
    }
}

/// Judges one access. See the module documentation.
pub fn judge(s: &Situation<'_>) -> Result<Verdict, RulesError> {
    let top = levels_of(s.levels);
    if top == 0 {
        return Err(RulesError::NoPaging);
    }
    let mut after = [0u64; MAX_PATH];
    let mut user_address = true;
    let mut writable = true;
    let mut executable = true;
    let mut used = 0;
    let mut leaf = None;

    for level in (1..=top).rev() {
        let entry = *s.path.get(used).ok_or(RulesError::PathTooShort)?;
        if let Some(slot) = after.get_mut(used) {
            *slot = entry;
        }
        used += 1;

        // 4.7: a not-present entry gives a fault with P=0.
        if entry & P == 0 {
            return Ok(fault(s, used, after, 0));
        }
        let maps_page = level == 1 || maps_a_page(s, level, entry);
        // 4.7: a reserved bit in any entry used gives a fault with P=1 and RSVD=1.
        if reserved_bit_set(s, level, maps_page, entry) {
            return Ok(fault(s, used, after, PfErrorCode::P | PfErrorCode::RSVD));
        }
        // 4.6: the rights of a translation combine the entries that control them.
        // PAE PDPTEs have no R/W, U/S or XD bits (4.4.1).
        if !is_pae_pdpte(s.levels, level) {
            user_address &= entry & US != 0;
            writable &= entry & RW != 0;
            executable &= !(execute_disable_enabled(s) && entry & XD != 0);
        }
        if maps_page {
            leaf = Some((level, entry));
            break;
        }
    }
    let Some((leaf_level, leaf_entry)) = leaf else {
        return Err(RulesError::PathTooShort);
    };

    let rights = Rights {
        user_address,
        writable,
        executable,
    };
    let paging_denies = paging_rights_deny(s, rights);
    let key_denies = protection_key_denies(s, rights, leaf_entry);
    if paging_denies || key_denies {
        // 4.7: PK is set whenever the protection key forbids the access, whatever else does.
        let pk = if key_denies { PfErrorCode::PK } else { 0 };
        return Ok(fault(s, used, after, PfErrorCode::P | pk));
    }

    // 4.8: A in every entry used (PAE PDPTEs have none); D in the leaf on a write.
    for (index, value) in after.iter_mut().enumerate().take(used) {
        let level = top - index as u8;
        if is_pae_pdpte(s.levels, level) {
            continue;
        }
        *value |= A;
        if level == leaf_level && s.access.kind == AccessKind::Write {
            *value |= D;
        }
    }
    Ok(Verdict {
        outcome: Ok(physical_address(s, leaf_level, leaf_entry)),
        used,
        after,
    })
}

/// The effective rights of a translation (4.6).
#[derive(Clone, Copy, Debug)]
struct Rights {
    user_address: bool,
    writable: bool,
    executable: bool,
}

fn is_pae_pdpte(levels: PagingLevels, level: u8) -> bool {
    levels == PagingLevels::Three && level == 3
}

/// 4.1.1 / 4.6: XD bits count only with IA32_EFER.NXE=1, and only in PAE and 4-level paging
/// (32-bit entries have no bit 63).
fn execute_disable_enabled(s: &Situation<'_>) -> bool {
    s.ctl.nxe() && s.levels != PagingLevels::Two
}

/// Whether an entry above level 1 maps a page rather than referencing a table.
fn maps_a_page(s: &Situation<'_>, level: u8, entry: u64) -> bool {
    if entry & PS == 0 {
        return false;
    }
    match s.levels {
        // 4.3: a PDE maps a 4 MiB page if PS=1 and CR4.PSE=1; with CR4.PSE=0, PS is ignored.
        PagingLevels::Two => level == 2 && s.ctl.pse(),
        // 4.4.2: a PDE maps a 2 MiB page if PS=1.
        PagingLevels::Three => level == 2,
        // 4.5.4: PDE with PS=1 maps 2 MiB; a PDPTE with PS=1 maps 1 GiB if supported (if not,
        // PS is reserved, which reserved_bit_set reports); PS in a PML4E is reserved.
        PagingLevels::Four => level == 2 || (level == 3 && s.feat.pdpe1gb),
        PagingLevels::Zero => false,
    }
}

/// The reserved-bit rules of tables 4-4 to 4-6 (32-bit), 4-8 to 4-11 (PAE) and 4-14 to
/// 4-19 (4-level), for a present entry.
fn reserved_bit_set(s: &Situation<'_>, level: u8, maps_page: bool, entry: u64) -> bool {
    let m = u32::from(s.feat.maxphyaddr.clamp(32, 52));
    let xd_reserved = if s.ctl.nxe() { 0 } else { XD };
    let reserved = match s.levels {
        PagingLevels::Two => {
            if level == 2 && maps_page {
                // Table 4-4: with PSE-36, bits 20:13 are physical-address bits 39:32; those
                // beyond MAXPHYADDR (at most 40 bits) are reserved, and bit 21 always is.
                let pa_bits_above_32 = m.min(40) - 32;
                bits(21, 21) | bits(20, 13 + pa_bits_above_32)
            } else {
                // Tables 4-5, 4-6: 32-bit PDEs referencing page tables, and PTEs, have none.
                0
            }
        }
        PagingLevels::Three => {
            if level == 3 {
                // Table 4-8: PDPTE bits 2:1, 8:5 and 63:MAXPHYADDR.
                bits(2, 1) | bits(8, 5) | bits(63, m)
            } else {
                // Tables 4-9 to 4-11: bits 62:MAXPHYADDR, bit 63 unless NXE, and bits 20:13 of
                // a 2 MiB PDE.
                let large = if level == 2 && maps_page {
                    bits(20, 13)
                } else {
                    0
                };
                bits(62, m) | xd_reserved | large
            }
        }
        PagingLevels::Four => {
            // Tables 4-14 to 4-19: bits 51:MAXPHYADDR and bit 63 unless NXE everywhere.
            let mut r = bits(51, m) | xd_reserved;
            match level {
                4 => r |= PS,
                3 if !s.feat.pdpe1gb => r |= PS,
                3 if maps_page => r |= bits(29, 13),
                2 if maps_page => r |= bits(20, 13),
                _ => {}
            }
            r
        }
        PagingLevels::Zero => 0,
    };
    entry & reserved != 0
}

/// The access-rights rules of 4.6.1 (paging bits only, no protection keys).
fn paging_rights_deny(s: &Situation<'_>, rights: Rights) -> bool {
    let ctl = s.ctl;
    let access = s.access;
    let supervisor = access.privilege != Privilege::User;
    // SMAP: data accesses to user-mode addresses are refused unless the access is explicit
    // and RFLAGS.AC=1.
    let smap_refuses = ctl.smap() && (access.privilege == Privilege::Implicit || !ctl.ac());

    if !supervisor {
        // User-mode accesses: only user-mode addresses; writes need R/W=1 at every level
        // (whatever CR0.WP says); fetches need XD=0 at every level.
        return match access.kind {
            AccessKind::Read => !rights.user_address,
            AccessKind::Write => !rights.user_address || !rights.writable,
            AccessKind::Fetch => !rights.user_address || !rights.executable,
        };
    }
    match access.kind {
        // Supervisor reads: any supervisor-mode address; user-mode addresses unless SMAP.
        AccessKind::Read => rights.user_address && smap_refuses,
        // Supervisor writes: with CR0.WP=0 any address (SMAP aside); with CR0.WP=1 only where
        // R/W=1 at every level.
        AccessKind::Write => {
            (rights.user_address && smap_refuses) || (ctl.wp() && !rights.writable)
        }
        // Supervisor fetches: XD=0 at every level; never from user-mode addresses with SMEP.
        AccessKind::Fetch => !rights.executable || (rights.user_address && ctl.smep()),
    }
}

/// The protection-key rules of 4.6.2: 4-level paging with CR4.PKE=1, user-mode addresses,
/// data accesses only; the key is the leaf's bits 62:59.
fn protection_key_denies(s: &Situation<'_>, rights: Rights, leaf_entry: u64) -> bool {
    if s.levels != PagingLevels::Four || !s.ctl.pke() {
        return false;
    }
    if !rights.user_address || s.access.kind == AccessKind::Fetch {
        return false;
    }
    let key = (leaf_entry >> 59) & 0xf;
    let access_disabled = (s.ctl.pkru >> (2 * key)) & 1 != 0;
    let write_disabled = (s.ctl.pkru >> (2 * key + 1)) & 1 != 0;
    if access_disabled {
        return true;
    }
    // WD stops user-mode writes always, supervisor-mode writes only with CR0.WP=1.
    let user = s.access.privilege == Privilege::User;
    s.access.kind == AccessKind::Write && write_disabled && (user || s.ctl.wp())
}

/// The error-code bits describing the access itself (4.7): W for writes, U for user-mode
/// accesses, I for fetches when SMEP is on or PAE/4-level paging runs with NXE.
fn access_bits(s: &Situation<'_>) -> u32 {
    let mut code = 0;
    if s.access.kind == AccessKind::Write {
        code |= PfErrorCode::W;
    }
    if s.access.privilege == Privilege::User {
        code |= PfErrorCode::U;
    }
    let reports_fetch = s.ctl.smep() || (s.levels != PagingLevels::Two && s.ctl.nxe());
    if s.access.kind == AccessKind::Fetch && reports_fetch {
        code |= PfErrorCode::I;
    }
    code
}

/// A faulting access: the error code, and no A/D update anywhere (the SDM allows A to be set
/// in entries a faulting walk used; this model, like the walker, sets none, and access.c
/// likewise demands that a faulting access leave the leaf untouched).
fn fault(s: &Situation<'_>, used: usize, after: [u64; MAX_PATH], extra: u32) -> Verdict {
    Verdict {
        outcome: Err(PfErrorCode(access_bits(s) | extra)),
        used,
        after,
    }
}

/// The physical address an access reaches (4.3, 4.4.2, 4.5.4).
fn physical_address(s: &Situation<'_>, leaf_level: u8, leaf: u64) -> u64 {
    let va = s.va;
    match (s.levels, leaf_level) {
        // 4 KiB page, 32-bit PTE: bits 31:12 of the PTE, bits 11:0 of the address.
        (PagingLevels::Two, 1) => (leaf & bits(31, 12)) | (va & bits(11, 0)),
        // 4 MiB page: bits 31:22 of the PDE, PSE-36 bits 20:13 as physical bits 39:32.
        (PagingLevels::Two, _) => {
            (leaf & bits(31, 22)) | (((leaf & bits(20, 13)) >> 13) << 32) | (va & bits(21, 0))
        }
        // 8-byte entries: bits (MAXPHYADDR-1):12 hold the frame (bits above were checked as
        // reserved, so bits 51:12 give the same), cut at the page size.
        (_, 1) => (leaf & bits(51, 12)) | (va & bits(11, 0)),
        (_, 2) => (leaf & bits(51, 21)) | (va & bits(20, 0)),
        _ => (leaf & bits(51, 30)) | (va & bits(29, 0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shadow2::paging::bits::cr;

    const URW: u64 = P | RW | US;

    fn ctl(levels: PagingLevels) -> ControlState {
        let mut c = ControlState {
            cr0: cr::CR0_PG | cr::CR0_PE | cr::CR0_WP,
            ..ControlState::default()
        };
        match levels {
            PagingLevels::Two => c.cr4 = cr::CR4_PSE,
            PagingLevels::Three => c.cr4 = cr::CR4_PAE,
            _ => {
                c.cr4 = cr::CR4_PAE;
                c.efer = cr::EFER_LME | cr::EFER_LMA | cr::EFER_NXE;
            }
        }
        c
    }

    fn judge_with(
        levels: PagingLevels,
        c: &ControlState,
        maxphyaddr: u8,
        path: &[u64],
        access: Access,
    ) -> Verdict {
        let feat = CpuFeatures {
            maxphyaddr,
            pdpe1gb: false,
            nx: true,
        };
        judge(&Situation {
            levels,
            ctl: c,
            feat: &feat,
            va: 0x1234_5678,
            access,
            path,
        })
        .unwrap()
    }

    fn code(v: &Verdict) -> u32 {
        v.outcome.unwrap_err().bits()
    }

    const READ_S: Access = Access::new(AccessKind::Read, Privilege::Supervisor);
    const WRITE_S: Access = Access::new(AccessKind::Write, Privilege::Supervisor);
    const WRITE_U: Access = Access::new(AccessKind::Write, Privilege::User);
    const READ_U: Access = Access::new(AccessKind::Read, Privilege::User);
    const FETCH_S: Access = Access::new(AccessKind::Fetch, Privilege::Supervisor);
    const FETCH_U: Access = Access::new(AccessKind::Fetch, Privilege::User);
    const READ_I: Access = Access::new(AccessKind::Read, Privilege::Implicit);

    #[test]
    fn four_level_success_sets_a_everywhere_and_d_on_the_leaf() {
        let c = ctl(PagingLevels::Four);
        let path = [URW | 0x1000, URW | 0x2000, URW | 0x3000, URW | 0x4000_5000];
        let v = judge_with(PagingLevels::Four, &c, 48, &path, WRITE_U);
        assert_eq!(v.outcome, Ok(0x4000_5678));
        assert_eq!(v.used, 4);
        assert_eq!(
            v.after,
            [path[0] | A, path[1] | A, path[2] | A, path[3] | A | D]
        );
    }

    #[test]
    fn not_present_pde_stops_the_walk_without_a() {
        let c = ctl(PagingLevels::Four);
        let path = [URW | 0x1000, URW | 0x2000, RW | US, URW];
        let v = judge_with(PagingLevels::Four, &c, 48, &path, WRITE_U);
        assert_eq!(code(&v), PfErrorCode::W | PfErrorCode::U);
        assert_eq!(v.used, 3);
        assert_eq!(&v.after[..3], &path[..3]);
    }

    #[test]
    fn reserved_bits_depend_on_maxphyaddr_and_nxe() {
        let mut c = ctl(PagingLevels::Four);
        let bit36 = URW | 0x4000_5000 | (1 << 36);
        let path = [URW, URW, URW, bit36];
        let v36 = judge_with(PagingLevels::Four, &c, 36, &path, READ_S);
        assert_eq!(code(&v36), PfErrorCode::P | PfErrorCode::RSVD);
        let v48 = judge_with(PagingLevels::Four, &c, 48, &path, READ_S);
        assert_eq!(v48.outcome, Ok(0x10_4000_5678));
        c.efer &= !cr::EFER_NXE;
        let nx = [URW, URW, URW, URW | XD];
        let v = judge_with(PagingLevels::Four, &c, 48, &nx, FETCH_S);
        // Without NXE no I bit, and XD is a reserved bit.
        assert_eq!(code(&v), PfErrorCode::P | PfErrorCode::RSVD);
    }

    #[test]
    fn large_page_bit_13_is_reserved_in_pae_but_an_address_bit_in_pse36() {
        let pae = ctl(PagingLevels::Three);
        let pde = URW | PS | 0x4000_0000 | (1 << 13);
        let v = judge_with(PagingLevels::Three, &pae, 36, &[P, pde], READ_U);
        assert_eq!(
            code(&v),
            PfErrorCode::P | PfErrorCode::RSVD | PfErrorCode::U
        );
        let two = ctl(PagingLevels::Two);
        let v = judge_with(PagingLevels::Two, &two, 36, &[pde], READ_U);
        assert_eq!(v.outcome, Ok(0x1_4000_0000 | 0x34_5678));
        // PSE-36 bit 17 is physical bit 36: reserved at MAXPHYADDR 36, not at 40.
        let high = URW | PS | 0x4000_0000 | (1 << 17);
        let v = judge_with(PagingLevels::Two, &two, 36, &[high], READ_U);
        assert!(v.outcome.unwrap_err().reserved());
        let v = judge_with(PagingLevels::Two, &two, 40, &[high], READ_U);
        assert_eq!(v.outcome, Ok(0x10_4000_0000 | 0x34_5678));
    }

    #[test]
    fn two_level_pde_ps_is_ignored_without_cr4_pse() {
        let mut c = ctl(PagingLevels::Two);
        c.cr4 = 0;
        let v = judge_with(
            PagingLevels::Two,
            &c,
            36,
            &[URW | PS | 0x3000, URW | 0x5000],
            READ_S,
        );
        assert_eq!(v.outcome, Ok(0x5678));
        assert_eq!(v.after[0], URW | PS | 0x3000 | A);
        assert_eq!(v.after[1], URW | 0x5000 | A);
    }

    #[test]
    fn wp_governs_supervisor_writes_only() {
        let mut c = ctl(PagingLevels::Three);
        let path = [P, URW | 0x3000, P | US | 0x5000];
        let v = judge_with(PagingLevels::Three, &c, 36, &path, WRITE_S);
        assert_eq!(code(&v), PfErrorCode::P | PfErrorCode::W);
        c.cr0 &= !cr::CR0_WP;
        let v = judge_with(PagingLevels::Three, &c, 36, &path, WRITE_S);
        assert_eq!(v.outcome, Ok(0x5678));
        assert_eq!(v.after, [P, URW | 0x3000 | A, P | US | 0x5000 | A | D, 0]);
        let v = judge_with(PagingLevels::Three, &c, 36, &path, WRITE_U);
        assert_eq!(code(&v), PfErrorCode::P | PfErrorCode::W | PfErrorCode::U);
    }

    #[test]
    fn smep_smap_and_the_fetch_bit() {
        let mut c = ctl(PagingLevels::Two);
        let path = [URW | 0x3000, URW | 0x5000];
        // 32-bit paging: no I bit without SMEP even when EFER.NXE is set.
        c.efer |= cr::EFER_NXE;
        let v = judge_with(
            PagingLevels::Two,
            &c,
            36,
            &[URW | 0x3000, P | RW | 0x5000],
            FETCH_U,
        );
        assert_eq!(code(&v), PfErrorCode::P | PfErrorCode::U);
        c.cr4 |= cr::CR4_SMEP;
        let v = judge_with(PagingLevels::Two, &c, 36, &path, FETCH_S);
        assert_eq!(code(&v), PfErrorCode::P | PfErrorCode::I);
        c.cr4 |= cr::CR4_SMAP;
        c.rflags |= cr::RFLAGS_AC;
        assert!(
            judge_with(PagingLevels::Two, &c, 36, &path, READ_S)
                .outcome
                .is_ok()
        );
        let v = judge_with(PagingLevels::Two, &c, 36, &path, READ_I);
        assert_eq!(code(&v), PfErrorCode::P);
    }

    #[test]
    fn protection_keys_report_pk_even_with_another_violation() {
        let mut c = ctl(PagingLevels::Four);
        c.cr4 |= cr::CR4_PKE;
        c.pkru = 0b1000; // WD for key 1
        let ro_key1 = P | US | (1 << 59) | 0x5000;
        let path = [URW, URW, URW, ro_key1];
        let v = judge_with(PagingLevels::Four, &c, 48, &path, WRITE_U);
        assert_eq!(
            code(&v),
            PfErrorCode::P | PfErrorCode::W | PfErrorCode::U | PfErrorCode::PK
        );
        // Supervisor write with CR0.WP=0: both the R/W and the WD rule let it through.
        c.cr0 &= !cr::CR0_WP;
        assert!(
            judge_with(PagingLevels::Four, &c, 48, &path, WRITE_S)
                .outcome
                .is_ok()
        );
        // Fetches ignore keys; supervisor pages ignore keys.
        c.pkru = 0b0100;
        assert!(
            judge_with(PagingLevels::Four, &c, 48, &path, FETCH_U)
                .outcome
                .is_ok()
        );
        let sup = [URW, URW, URW, P | (1 << 59)];
        assert!(
            judge_with(PagingLevels::Four, &c, 48, &sup, READ_S)
                .outcome
                .is_ok()
        );
    }

    #[test]
    fn a_short_path_is_an_error() {
        let c = ctl(PagingLevels::Four);
        let feat = CpuFeatures::KVM_HOST;
        let s = Situation {
            levels: PagingLevels::Four,
            ctl: &c,
            feat: &feat,
            va: 0,
            access: READ_S,
            path: &[URW, URW],
        };
        assert_eq!(judge(&s), Err(RulesError::PathTooShort));
    }
}

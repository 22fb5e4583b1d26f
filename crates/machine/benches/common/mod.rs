//! A 4-level guest on a 4-level shadow domain over [`SparseMemory`], for the shadow
//! benchmarks: guest frames `0 .. frames` mapped in the p2m, and every data frame mapped by
//! the guest's own tables at consecutive virtual pages, user-writable with A and D set.
//!
//! Guest-physical layout (frame numbers):
//!
//! | gfn | what |
//! | --- | --- |
//! | 1 | L4 of address space A (entry 0 -> the shared L3) |
//! | 2 | L4 of address space B (entry 0 -> the same L3: a second process sharing it) |
//! | 3 | L3 (entry 1 -> L2, so the data pages start at 1 GiB) |
//! | 4 | L2 (entry k -> L1 number k) |
//! | 8 .. 64 | L1s, 512 data pages each |
//! | 64 .. frames | data pages: page `i` is gfn `64 + i`, at `VA_BASE + i * 4 KiB` |
#![allow(dead_code)]

use shadow2::addr::{Gfn, Gpa, Gva, Maddr, Mfn};
use shadow2::domain::{Domain, DomainConfig};
use shadow2::host::MachineMemory;
use shadow2::multi::FaultOutcome;
use shadow2::p2m::P2mType;
use shadow2::paging::bits::{self, cr};
use shadow2::paging::{
    Access, AccessKind, AdUpdate, ControlState, CpuFeatures, FourLevel, PagingLevels, PfErrorCode,
    PhysMem, Privilege, WalkEnv, walk_mode,
};
use shadow2_machine::memory::SparseMemory;

pub mod walk;

/// Guest frames of the domains of every case but the large clean.
pub const SMALL_FRAMES: u64 = 1024;
/// The pages the walk and fault cases cycle through: those of the first L1.
pub const CYCLE: u64 = PER_L1;
/// The access of every walk and fault: a user write.
pub const USER_WRITE_ACCESS: Access = Access::new(AccessKind::Write, Privilege::User);

/// The vcpu every benchmark runs on.
pub const VCPU: usize = 0;
/// The L4 of address space A.
pub const L4_A: u64 = 1;
/// The L4 of address space B.
pub const L4_B: u64 = 2;
/// The L3 both address spaces share.
pub const L3: u64 = 3;
/// The L2.
pub const L2: u64 = 4;
/// The first L1.
pub const L1_FIRST: u64 = 8;
/// The first data page.
pub const DATA_FIRST: u64 = 64;
/// The virtual address of data page 0 (L4 index 0, L3 index 1, L2 index 0, L1 index 0).
pub const VA_BASE: u64 = 0x4000_0000;
/// Data pages one L1 maps.
pub const PER_L1: u64 = 512;
/// Flags of the guest's upper entries: present, user-writable, already accessed (so that a
/// walk through them writes nothing and the shadows can link them).
pub const TABLE: u64 = bits::P | bits::RW | bits::US | bits::A;
/// Flags of the guest's leaf entries: as [`TABLE`], and dirty.
pub const LEAF: u64 = TABLE | bits::D;
/// The error code of a user write through a not-present (or read-only) shadow entry.
pub const USER_WRITE: PfErrorCode = PfErrorCode(PfErrorCode::W | PfErrorCode::U);

/// Machine frames of the simulated host: room for the pool, 16 Ki guest frames and the p2m
/// (sparse, so only frames written cost host memory).
const MACHINE_FRAMES: u64 = 1 << 16;
/// Shadow pool pages: far more than the few dozen shadows any benchmark builds, so nothing
/// is ever evicted.
const POOL_PAGES: usize = 512;

/// A guest and its domain. See the module documentation.
pub struct Guest {
    /// The domain, with vcpu [`VCPU`] running address space A.
    pub d: Domain<SparseMemory>,
    /// Data pages mapped by the guest tables.
    pub pages: u64,
    /// Guest frames mapped in the p2m.
    pub frames: u64,
}

impl Guest {
    /// A guest with `frames` guest frames in the p2m (at least 65, at most
    /// `64 + 56 * 512`), vcpu 0 in 4-level paging on address space A. No shadow exists
    /// below the top level until the first fault.
    pub fn new(frames: u64) -> Guest {
        assert!(frames > DATA_FIRST, "no room for data pages");
        let pages = frames - DATA_FIRST;
        assert!(
            pages.div_ceil(PER_L1) <= DATA_FIRST - L1_FIRST,
            "too many data pages for the L1s' room"
        );
        let config = DomainConfig::hvm(PagingLevels::Four, 1, POOL_PAGES);
        let d = Domain::new(SparseMemory::new(MACHINE_FRAMES), config).expect("domain");
        let mut g = Guest { d, pages, frames };
        for gfn in 0..frames {
            let mfn = g.d.host_mut().alloc_block(0).expect("machine frame");
            let _ =
                g.d.set_p2m(Gfn::new(gfn), Some((mfn, P2mType::Ram)))
                    .expect("p2m entry");
        }
        g.write_pt(entry_gpa(L4_A, 0), (L3 << 12) | TABLE);
        g.write_pt(entry_gpa(L4_B, 0), (L3 << 12) | TABLE);
        g.write_pt(entry_gpa(L3, 1), (L2 << 12) | TABLE);
        for l1 in 0..pages.div_ceil(PER_L1) {
            g.write_pt(entry_gpa(L2, l1), ((L1_FIRST + l1) << 12) | TABLE);
        }
        for i in 0..pages {
            g.write_pt(Self::pte_gpa(i), Self::data_gfn(i).base().raw() | LEAF);
        }
        g.d.set_control(VCPU, Self::control(L4_A)).expect("control");
        let _ = g.d.update_paging_modes(VCPU).expect("paging mode");
        g
    }

    /// The guest control state of 4-level paging with CR3 at the L4 in guest frame `l4`.
    pub fn control(l4: u64) -> ControlState {
        ControlState {
            cr0: cr::CR0_PE | cr::CR0_PG | cr::CR0_WP,
            cr3: l4 << 12,
            cr4: cr::CR4_PAE,
            efer: cr::EFER_LME | cr::EFER_LMA | cr::EFER_NXE,
            ..ControlState::default()
        }
    }

    /// The virtual address of data page `i`.
    pub fn va(i: u64) -> Gva {
        Gva::new(VA_BASE + (i << 12))
    }

    /// The guest frame of data page `i`.
    pub fn data_gfn(i: u64) -> Gfn {
        Gfn::new(DATA_FIRST + i)
    }

    /// The guest-physical address of the L1 entry mapping data page `i`.
    pub fn pte_gpa(i: u64) -> Gpa {
        entry_gpa(L1_FIRST + i / PER_L1, i % PER_L1)
    }

    /// The guest-physical address of the first L1 entry of L1 number `l1`.
    pub fn l1_gpa(l1: u64) -> Gpa {
        Gfn::new(L1_FIRST + l1).base()
    }

    /// The machine address backing guest-physical `gpa`.
    pub fn maddr(&self, gpa: Gpa) -> Maddr {
        let (mfn, _) = self.d.guest_frame(gpa.gfn()).expect("mapped guest frame");
        Maddr::new(mfn.base().raw() | gpa.offset())
    }

    /// The gfn -> mfn map of every mapped guest frame, as a flat table.
    pub fn flat_map(&self) -> Vec<Option<Mfn>> {
        (0..self.frames)
            .map(|g| self.d.guest_frame(Gfn::new(g)).map(|(m, _)| m))
            .collect()
    }

    /// Writes a guest page-table entry behind the engine's back (no validate).
    pub fn host_write(&mut self, gpa: Gpa, value: u64) {
        let m = self.maddr(gpa);
        self.d.host_mut().write_u64(m, value).expect("guest memory");
    }

    /// Writes a guest page-table entry and validates it into the shadows, as a host does.
    pub fn write_pt(&mut self, gpa: Gpa, value: u64) {
        self.host_write(gpa, value);
        let _ = self.d.validate_guest_pt_write(gpa, 8).expect("validate");
    }

    /// A user write fault at data page `i`.
    pub fn fault(&mut self, i: u64) -> FaultOutcome {
        let (outcome, _flush) = self
            .d
            .page_fault(VCPU, Self::va(i), USER_WRITE)
            .expect("page fault");
        outcome
    }

    /// The machine frame the shadows map data page `i` to for a user write, as the
    /// hardware would find it walking the shadow root (`None`: the access would fault).
    pub fn shadow_frame(&mut self, i: u64) -> Option<Mfn> {
        let ctl = self.d.hardware_control(VCPU).expect("shadow root");
        let env = WalkEnv {
            ctl: &ctl,
            feat: &CpuFeatures::KVM_HOST,
            ad: AdUpdate::Skip,
        };
        let access = Access::new(AccessKind::Write, Privilege::User);
        walk_mode::<FourLevel, Maddr, _>(self.d.host_mut(), env, Self::va(i), access)
            .ok()
            .map(|t| t.frame)
    }

    /// Panics unless the auditor finds the domain consistent.
    pub fn assert_audit_clean(&self, what: &str) {
        let report = shadow2::audit::audit(&self.d);
        assert!(
            report.is_clean(),
            "{what}: audit failed: {:?}",
            report.violations
        );
    }
}

/// The guest-physical address of entry `index` of the table in guest frame `table`.
pub fn entry_gpa(table: u64, index: u64) -> Gpa {
    Gpa::new((table << 12) + index * 8)
}

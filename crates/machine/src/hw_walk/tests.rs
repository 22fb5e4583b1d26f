//! The hardware walk against the engine's walker over random tables: equal results and
//! equal A/D writes from a cold cache, and equal results from a warm cache while the tables
//! change only by the walks' own A/D updates.

use super::*;
use crate::churn::Rng;
use crate::memory::SparseMemory;
use shadow2::paging::bits::cr;
use shadow2::paging::{AccessKind, AdUpdate, Privilege, WalkEnv, load_pae_pdptes, walk};

/// Table frames 1..=TABLES point at each other; data frames lie above them.
const TABLES: u64 = 6;

fn random_entry(rng: &mut Rng) -> u64 {
    let mut flags = 0;
    for (bit, percent) in [
        (bits::P, 90),
        (bits::RW, 60),
        (bits::US, 60),
        (bits::PS, 15),
        (bits::G, 20),
        (bits::A, 50),
        (bits::D, 50),
        (bits::NX, 15),
    ] {
        if rng.chance(percent) {
            flags |= bit;
        }
    }
    if rng.chance(3) {
        // An address bit above MAXPHYADDR.
        flags |= 1 << 50;
    }
    let frame = if rng.chance(85) {
        1 + rng.below(TABLES)
    } else {
        1 + TABLES + rng.below(4)
    };
    (frame << 12) | flags | (rng.below(16) << bits::PKEY_SHIFT)
}

fn random_tables(rng: &mut Rng, levels: PagingLevels) -> SparseMemory {
    let mut mem = SparseMemory::new(64);
    for frame in 1..=TABLES {
        for i in 0..8u64 {
            let entry = random_entry(rng);
            if levels == PagingLevels::Two {
                mem.write_u32(Maddr::new((frame << 12) + 4 * i), entry as u32)
                    .unwrap();
            } else {
                mem.write_u64(Maddr::new((frame << 12) + 8 * i), entry)
                    .unwrap();
            }
        }
    }
    if levels == PagingLevels::Three && rng.chance(95) {
        // Mostly a loadable PDPT: without the bits reserved in a PDPTE.
        for i in 0..4u64 {
            let at = Maddr::new((1 << 12) + 8 * i);
            let entry = mem.read_u64(at).unwrap();
            mem.write_u64(at, entry & !(0x1e6 | bits::NX | 1 << 50))
                .unwrap();
        }
    }
    mem
}

fn random_control(rng: &mut Rng, levels: PagingLevels) -> ControlState {
    let mut ctl = ControlState {
        cr0: cr::CR0_PE | cr::CR0_PG,
        cr3: 1 << 12,
        ..ControlState::default()
    };
    let maybe = |rng: &mut Rng, bit: u64| if rng.chance(50) { bit } else { 0 };
    ctl.cr0 |= maybe(rng, cr::CR0_WP);
    ctl.cr4 = maybe(rng, cr::CR4_PGE) | maybe(rng, cr::CR4_SMEP) | maybe(rng, cr::CR4_SMAP);
    ctl.rflags = maybe(rng, cr::RFLAGS_AC);
    match levels {
        PagingLevels::Two => ctl.cr4 |= maybe(rng, cr::CR4_PSE),
        PagingLevels::Three => {
            ctl.cr4 |= cr::CR4_PAE;
            ctl.efer = maybe(rng, cr::EFER_NXE);
        }
        _ => {
            ctl.cr4 |= cr::CR4_PAE | maybe(rng, cr::CR4_PKE);
            ctl.efer = cr::EFER_LME | cr::EFER_LMA | maybe(rng, cr::EFER_NXE);
            ctl.pkru = rng.next_u64() as u32;
        }
    }
    ctl
}

/// An address whose indices stay in the populated first slots of each table.
fn random_va(rng: &mut Rng, levels: PagingLevels) -> Gva {
    let (index_bits, count) = match levels {
        PagingLevels::Two => (10, 2),
        PagingLevels::Three => (9, 3),
        _ => (9, 4),
    };
    let mut va = rng.below(4096);
    for level in 0..count {
        let width = if levels == PagingLevels::Three && level == 2 {
            4
        } else {
            8
        };
        va |= rng.below(width) << (12 + index_bits * level);
    }
    Gva::new(va)
}

fn random_access(rng: &mut Rng) -> Access {
    let kind = match rng.below(3) {
        0 => AccessKind::Read,
        1 => AccessKind::Write,
        _ => AccessKind::Fetch,
    };
    let privilege = match rng.below(3) {
        0 => Privilege::User,
        1 => Privilege::Supervisor,
        _ => Privilege::Implicit,
    };
    Access::new(kind, privilege)
}

fn engine_walk(
    mem: &mut SparseMemory,
    ctl: &ControlState,
    feat: &CpuFeatures,
    va: Gva,
    access: Access,
) -> Result<HwTranslation, WalkFault> {
    let env = WalkEnv {
        ctl,
        feat,
        ad: AdUpdate::Set,
    };
    walk::<Maddr, SparseMemory>(mem, env, va, access)
        .map(|t| HwTranslation {
            addr: t.addr,
            size: t.size,
            leaf: t.leaf,
            perms: t.perms,
            global: t.global,
            pkey: t.pkey,
        })
        .map_err(|f| f.fault)
}

#[test]
fn agrees_with_the_engine_walker_cold_and_warm() {
    let feat = CpuFeatures::KVM_HOST;
    let mut rng = Rng::new(10);
    let mut warm_hits = 0;
    for round in 0..1500 {
        let levels = [PagingLevels::Two, PagingLevels::Three, PagingLevels::Four][round % 3];
        let mut mem = random_tables(&mut rng, levels);
        let mut ctl = random_control(&mut rng, levels);
        if levels == PagingLevels::Three {
            match load_pae_pdptes::<Maddr, SparseMemory>(&mem, ctl.cr3, &feat) {
                Ok(pdptes) => ctl.pdptes = pdptes,
                Err(_) => continue,
            }
        }
        let mut warm = PagingStructureCache::default();
        for _ in 0..40 {
            let va = random_va(&mut rng, levels);
            let access = random_access(&mut rng);
            let mut cold_mem = mem.clone();
            let mut engine_mem = mem.clone();
            let cold = walk_cached(
                &mut cold_mem,
                &ctl,
                &feat,
                &mut PagingStructureCache::default(),
                va,
                access,
            );
            let expected = engine_walk(&mut engine_mem, &ctl, &feat, va, access);
            assert_eq!(cold, expected, "{levels:?} {ctl:?} {va} {access:?}");
            for frame in 1..=TABLES {
                let mut a = [0u8; 64];
                let mut b = [0u8; 64];
                cold_mem
                    .read_bytes(Maddr::new(frame << 12), &mut a)
                    .unwrap();
                engine_mem
                    .read_bytes(Maddr::new(frame << 12), &mut b)
                    .unwrap();
                assert_eq!(a, b, "A/D writes differ in frame {frame}");
            }
            let hits = warm.stats().hits;
            let from_warm = walk_cached(&mut mem, &ctl, &feat, &mut warm, va, access);
            warm_hits += warm.stats().hits - hits;
            let strip = |r: Result<HwTranslation, WalkFault>| {
                r.map(|t| (t.addr, t.size, t.perms, t.global, t.pkey))
            };
            assert_eq!(strip(from_warm), strip(expected), "warm cache: {va}");
        }
    }
    assert!(
        warm_hits > 1000,
        "the warm cache was used {warm_hits} times"
    );
}

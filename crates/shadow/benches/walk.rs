//! Nanoseconds per architectural walk: a successful 4 KiB read in steady state (A already
//! set, so the walk writes nothing), in each paging mode.

mod common;

use std::hint::black_box;

use common::GuestTables;
use criterion::{Criterion, criterion_group, criterion_main};
use shadow2::Gva;
use shadow2::paging::bits;
use shadow2::paging::{Access, AccessKind, AdUpdate, PagingLevels, Privilege, WalkEnv, walk};

const ARENA_BYTES: u64 = 16 << 20;
const TABLES_AT: u64 = 1 << 20;
const DATA_PA: u64 = 0x80_0000;

fn bench_mode(c: &mut Criterion, name: &str, levels: PagingLevels, va: u64) {
    let mut tables = GuestTables::new(levels, ARENA_BYTES, TABLES_AT);
    tables.map_4k(va, DATA_PA, bits::P | bits::RW | bits::US);
    let access = Access::new(AccessKind::Read, Privilege::User);
    let ctl = tables.ctl;
    let feat = tables.feat;
    let env = WalkEnv {
        ctl: &ctl,
        feat: &feat,
        ad: AdUpdate::Set,
    };
    let mut mem = tables.mem;
    // The first walk sets A everywhere; the measured ones find it set.
    let first = walk(&mut mem, env, Gva::new(va), access)
        .unwrap_or_else(|e| panic!("{name}: the page is not mapped: {e:?}"));
    assert_eq!(first.addr.raw(), DATA_PA | (va & 0xfff));
    let before = mem.clone();
    c.bench_function(name, |b| {
        b.iter(|| {
            walk(
                &mut mem,
                black_box(env),
                black_box(Gva::new(va)),
                black_box(access),
            )
        })
    });
    assert!(mem == before, "{name}: the steady state writes nothing");
}

fn walks(c: &mut Criterion) {
    bench_mode(c, "walk/4level", PagingLevels::Four, 0xffff_8123_4567_8abc);
    bench_mode(c, "walk/pae", PagingLevels::Three, 0xc123_4abc);
    bench_mode(c, "walk/2level", PagingLevels::Two, 0xc123_4abc);
}

criterion_group!(benches, walks);
criterion_main!(benches);

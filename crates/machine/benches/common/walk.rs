//! The unit of the shadow benchmarks: the bare 4-level guest walk (over a flat gfn -> mfn
//! table), and the same walk through the p2m (`walk/p2m`), cycling over the pages of the
//! first L1 of [`Guest`].

use std::hint::black_box;
use std::time::{Duration, Instant};

use super::{CYCLE, Guest, SMALL_FRAMES, USER_WRITE_ACCESS};
use crate::timing::Case;
use shadow2::addr::{Gpa, Maddr, Mfn};
use shadow2::p2m::{P2m, P2mType};
use shadow2::paging::{
    AdUpdate, ControlState, CpuFeatures, Exchange, FourLevel, MemError, PhysMem, WalkEnv, walk_mode,
};
use shadow2_machine::memory::{GuestPhysView, SparseMemory};

/// Guest memory read through the p2m tables on every access, as the engine reads it.
pub struct P2mView<'a> {
    host: &'a SparseMemory,
    p2m: &'a P2m,
}

impl P2mView<'_> {
    fn resolve(&self, gpa: Gpa) -> Result<Maddr, MemError> {
        match self.p2m.lookup(self.host, gpa.gfn()) {
            Some(e) if e.ty == P2mType::Ram => Ok(Maddr::new(e.mfn.base().raw() | gpa.offset())),
            _ => Err(MemError::Unbacked { addr: gpa.raw() }),
        }
    }
}

impl PhysMem<Gpa> for P2mView<'_> {
    fn read_u32(&self, addr: Gpa) -> Result<u32, MemError> {
        self.host.read_u32(self.resolve(addr)?)
    }
    fn read_u64(&self, addr: Gpa) -> Result<u64, MemError> {
        self.host.read_u64(self.resolve(addr)?)
    }
    // The benchmarked walks never write (A/D are set and the walk skips A/D updates).
    fn write_u32(&mut self, addr: Gpa, _value: u32) -> Result<(), MemError> {
        Err(MemError::ReadOnly { addr: addr.raw() })
    }
    fn write_u64(&mut self, addr: Gpa, _value: u64) -> Result<(), MemError> {
        Err(MemError::ReadOnly { addr: addr.raw() })
    }
    fn compare_exchange_u32(
        &mut self,
        addr: Gpa,
        _: u32,
        _: u32,
    ) -> Result<Exchange<u32>, MemError> {
        Err(MemError::ReadOnly { addr: addr.raw() })
    }
    fn compare_exchange_u64(
        &mut self,
        addr: Gpa,
        _: u64,
        _: u64,
    ) -> Result<Exchange<u64>, MemError> {
        Err(MemError::ReadOnly { addr: addr.raw() })
    }
}

/// The bare guest walk, over a flat gfn -> mfn table (`through_p2m` false) or through the
/// p2m tables, cycling over the pages of the first L1.
pub struct WalkCase {
    guest: Guest,
    map: Vec<Option<Mfn>>,
    ctl: ControlState,
    feat: CpuFeatures,
    through_p2m: bool,
    next: u64,
}

impl WalkCase {
    pub fn new(through_p2m: bool) -> WalkCase {
        let guest = Guest::new(SMALL_FRAMES);
        let map = guest.flat_map();
        let ctl = Guest::control(super::L4_A);
        let feat = guest.d.config().guest_features;
        let mut case = WalkCase {
            guest,
            map,
            ctl,
            feat,
            through_p2m,
            next: 0,
        };
        case.check();
        case
    }

    /// Every walk of the cycle translates to its data page and writes nothing.
    fn check(&mut self) {
        let env = WalkEnv {
            ctl: &self.ctl,
            feat: &self.feat,
            ad: AdUpdate::Skip,
        };
        let map = &self.map;
        let mut view = GuestPhysView::new(self.guest.d.host_mut(), |g| {
            map.get(g.raw() as usize).copied().flatten()
        });
        for i in 0..CYCLE {
            let t = walk_mode::<FourLevel, Gpa, _>(&mut view, env, Guest::va(i), USER_WRITE_ACCESS)
                .unwrap_or_else(|e| panic!("walk of page {i}: {e:?}"));
            assert_eq!(t.frame, Guest::data_gfn(i));
        }
    }
}

/// `iters` walks over `view`, page after page from `*next`, timed.
fn timed_walks<M: PhysMem<Gpa>>(
    view: &mut M,
    env: WalkEnv<'_>,
    next: &mut u64,
    iters: u64,
) -> Duration {
    let start = Instant::now();
    for _ in 0..iters {
        let va = Guest::va(*next);
        *next = (*next + 1) % CYCLE;
        let _ = black_box(walk_mode::<FourLevel, Gpa, _>(
            view,
            black_box(env),
            black_box(va),
            black_box(USER_WRITE_ACCESS),
        ));
    }
    start.elapsed()
}

impl Case for WalkCase {
    fn measure(&mut self, iters: u64) -> Duration {
        let env = WalkEnv {
            ctl: &self.ctl,
            feat: &self.feat,
            ad: AdUpdate::Skip,
        };
        let mut next = self.next;
        let elapsed = if self.through_p2m {
            let d = &self.guest.d;
            let mut view = P2mView {
                host: d.host(),
                p2m: d.p2m().expect("translated domain"),
            };
            timed_walks(&mut view, env, &mut next, iters)
        } else {
            let map = &self.map;
            let mut view = GuestPhysView::new(self.guest.d.host_mut(), |g| {
                map.get(g.raw() as usize).copied().flatten()
            });
            timed_walks(&mut view, env, &mut next, iters)
        };
        self.next = next;
        elapsed
    }
}

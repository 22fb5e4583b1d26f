//! What to run: a guest OS model, a workload with its size, a paging pair, a seed.

use core::fmt;

/// The guest OS models.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GuestModel {
    /// 4-level Linux-like kernel: direct map, fork with copy-on-write, global kernel pages.
    Linux64,
    /// 3-level PAE Windows-like kernel: recursive self-map at 0xC0000000, PDPTs 32-byte
    /// aligned inside a page, CMPXCHG8B for entry writes.
    WindowsPae,
    /// 2-level kernel with 4 MiB PSE kernel pages and a lowmem linear map.
    Legacy32,
    /// Starts with paging off, builds its tables, turns paging on.
    Boot,
    /// Vcpus in different modes at once, then all 4-level on shared tables, with INVLPG
    /// shootdowns.
    SmpBoot,
}

impl GuestModel {
    /// Every model.
    pub const ALL: [GuestModel; 5] = [
        GuestModel::Linux64,
        GuestModel::WindowsPae,
        GuestModel::Legacy32,
        GuestModel::Boot,
        GuestModel::SmpBoot,
    ];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            GuestModel::Linux64 => "linux64",
            GuestModel::WindowsPae => "windows-pae",
            GuestModel::Legacy32 => "legacy32",
            GuestModel::Boot => "boot",
            GuestModel::SmpBoot => "smp-boot",
        }
    }

    /// Parses a command-line name.
    pub fn from_name(name: &str) -> Option<GuestModel> {
        GuestModel::ALL.into_iter().find(|m| m.name() == name)
    }

    /// The pairs this model runs on, its default first. A pair names the guest's paging
    /// levels when the workload starts and the shadow levels: `boot` starts at 0 and ends
    /// at the shadow's levels; `smp-boot` passes through 0, 2 and 3 on its way to 4.
    pub fn pairs(self) -> &'static [PairName] {
        const P44: &[PairName] = &[PairName::new(4, 4)];
        const PAE: &[PairName] = &[PairName::new(3, 3), PairName::new(3, 4)];
        const TWO: &[PairName] = &[
            PairName::new(2, 2),
            PairName::new(2, 3),
            PairName::new(2, 4),
        ];
        const BOOT: &[PairName] = &[
            PairName::new(0, 4),
            PairName::new(0, 3),
            PairName::new(0, 2),
        ];
        match self {
            GuestModel::Linux64 | GuestModel::SmpBoot => P44,
            GuestModel::WindowsPae => PAE,
            GuestModel::Legacy32 => TWO,
            GuestModel::Boot => BOOT,
        }
    }

    /// The model a pair suggests when no model is named: the one whose guest levels match.
    pub fn for_pair(pair: PairName) -> Option<GuestModel> {
        [
            GuestModel::Linux64,
            GuestModel::WindowsPae,
            GuestModel::Legacy32,
            GuestModel::Boot,
        ]
        .into_iter()
        .find(|m| m.pairs().contains(&pair))
    }

    /// Vcpus the model runs.
    pub fn vcpus(self) -> usize {
        match self {
            GuestModel::SmpBoot => 4,
            GuestModel::Linux64 => 2,
            _ => 1,
        }
    }
}

impl fmt::Display for GuestModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A guest/shadow paging-level pair as the command line names it ("4on4", "0on3"...).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PairName {
    /// Guest paging levels (0: paging off).
    pub guest: u8,
    /// Shadow paging levels.
    pub shadow: u8,
}

impl PairName {
    /// A pair.
    pub const fn new(guest: u8, shadow: u8) -> PairName {
        PairName { guest, shadow }
    }

    /// Parses "GonS".
    pub fn parse(s: &str) -> Option<PairName> {
        let (g, sh) = s.split_once("on")?;
        let guest: u8 = g.parse().ok()?;
        let shadow: u8 = sh.parse().ok()?;
        let valid = matches!(shadow, 2..=4) && matches!(guest, 0 | 2 | 3 | 4) && guest <= shadow;
        valid.then_some(PairName { guest, shadow })
    }
}

impl fmt::Display for PairName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}on{}", self.guest, self.shadow)
    }
}

/// The workloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Workload {
    /// Fork, the child touches a little and exits, the parent waits (Adams & Agesen).
    Forkwait,
    /// Touch N MiB of fresh anonymous memory.
    Demand,
    /// mmap, touch, munmap, over and over.
    MmapChurn,
    /// Many processes with few pages each, switched between by CR3.
    Ctxswitch,
    /// A mix: fork+exec of short-lived jobs that map, touch and write, with switches.
    Kbuild,
}

impl Workload {
    /// Every workload.
    pub const ALL: [Workload; 5] = [
        Workload::Forkwait,
        Workload::Demand,
        Workload::MmapChurn,
        Workload::Ctxswitch,
        Workload::Kbuild,
    ];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Forkwait => "forkwait",
            Workload::Demand => "demand",
            Workload::MmapChurn => "mmap-churn",
            Workload::Ctxswitch => "ctxswitch",
            Workload::Kbuild => "kbuild",
        }
    }

    /// Parses a command-line name.
    pub fn from_name(name: &str) -> Option<Workload> {
        Workload::ALL.into_iter().find(|w| w.name() == name)
    }

    /// What the size parameter counts.
    pub fn size_unit(self) -> &'static str {
        match self {
            Workload::Forkwait => "fork-wait rounds",
            Workload::Demand => "MiB touched",
            Workload::MmapChurn => "map-touch-unmap rounds",
            Workload::Ctxswitch => "context switches",
            Workload::Kbuild => "jobs",
        }
    }

    /// The size of a default run (a few seconds on the simulator).
    pub fn default_size(self) -> u64 {
        match self {
            Workload::Forkwait => 1000,
            Workload::Demand => 64,
            Workload::MmapChurn => 1000,
            Workload::Ctxswitch => 10_000,
            Workload::Kbuild => 200,
        }
    }

    /// The largest size accepted.
    pub fn max_size(self) -> u64 {
        match self {
            Workload::Demand => 512,
            _ => 10_000_000,
        }
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunSpec {
    /// The guest OS model.
    pub guest: GuestModel,
    /// The workload.
    pub workload: Workload,
    /// Its size (see [`Workload::size_unit`]).
    pub size: u64,
    /// The paging pair.
    pub pair: PairName,
    /// The seed of the model's random choices.
    pub seed: u64,
}

/// A run that cannot be set up as asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SpecError {
    /// The model does not run on this pair.
    UnsupportedPair(GuestModel, PairName),
    /// The size is 0 or too large.
    BadSize(Workload, u64),
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SpecError::UnsupportedPair(m, p) => {
                let pairs: Vec<String> = m.pairs().iter().map(|p| p.to_string()).collect();
                write!(
                    f,
                    "guest {m} does not run on pair {p} (it runs on {})",
                    pairs.join(", ")
                )
            }
            SpecError::BadSize(w, s) => write!(
                f,
                "size {s} is out of range for {w} (1..={} {})",
                w.max_size(),
                w.size_unit()
            ),
        }
    }
}

impl RunSpec {
    /// Checks that the model runs on the pair and the size is in range.
    pub fn validate(&self) -> Result<(), SpecError> {
        if !self.guest.pairs().contains(&self.pair) {
            return Err(SpecError::UnsupportedPair(self.guest, self.pair));
        }
        if self.size == 0 || self.size > self.workload.max_size() {
            return Err(SpecError::BadSize(self.workload, self.size));
        }
        Ok(())
    }

    /// Every paging mode the run's vcpus go through, as levels (0: paging disabled): the
    /// boot with paging disabled, the kernel's own mode, and for `smp-boot` the 2- and
    /// 3-level modes its application processors start in.
    pub fn paging_levels(&self) -> Vec<u8> {
        let mut levels = vec![0, crate::kernel::arch::Arch::of(self).levels];
        if self.guest == GuestModel::SmpBoot {
            levels.extend([2, 3]);
        }
        levels.sort_unstable();
        levels.dedup();
        levels
    }

    /// Guest-physical RAM the run needs, in 4 KiB frames.
    pub fn ram_frames(&self) -> u64 {
        let base: u64 = 16 * 256; // 16 MiB: kernel, page tables, page cache, processes
        let extra = match self.workload {
            Workload::Demand => self.size * 256 + self.size, // the pages and their tables
            _ => 0,
        };
        base + extra
    }
}

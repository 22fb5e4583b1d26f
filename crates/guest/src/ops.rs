//! The guest-operations interface: everything a guest model can make a vcpu do, the same for
//! every backend (the simulator, KVM with shadows, KVM native). A backend carries each
//! operation out the way hardware plus hypervisor would, including every trap it causes; the
//! guest model only sees the architectural result.

use core::fmt;

use shadow2::emulate::Regs;
use shadow2::paging::ControlState;

/// What the guest sees instead of a completed operation: an architectural exception, which
/// goes to the guest model's own handler.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fault {
    /// #PF with CR2 = `va` and this error code.
    PageFault {
        /// The faulting linear address (CR2).
        va: u64,
        /// The page-fault error code.
        code: u32,
    },
    /// #GP(0).
    GeneralProtection,
    /// #UD.
    InvalidOpcode,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::PageFault { va, code } => write!(f, "#PF at {va:#x} (error code {code:#x})"),
            Fault::GeneralProtection => f.write_str("#GP(0)"),
            Fault::InvalidOpcode => f.write_str("#UD"),
        }
    }
}

/// Why an operation did not complete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpError {
    /// The guest takes an exception.
    Fault(Fault),
    /// The backend failed (the engine failed the domain, the VM died): the run is over.
    Backend(String),
}

impl fmt::Display for OpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpError::Fault(fault) => write!(f, "guest fault: {fault}"),
            OpError::Backend(why) => write!(f, "backend failed: {why}"),
        }
    }
}

impl From<Fault> for OpError {
    fn from(f: Fault) -> OpError {
        OpError::Fault(f)
    }
}

/// Events a guest model reports about itself (counted by the run, kept in traces so a replay
/// gives the same counters without the model).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Event {
    /// The kernel's page-fault handler mapped a page on first touch (demand-zero or file).
    DemandFault,
    /// The handler broke copy-on-write.
    CowFault,
    /// The handler found a real violation and killed the process.
    Kill,
    /// One unit of the workload finished (a fork-wait round, a MiB touched...).
    WorkloadStep,
    /// The guest read back data different from what it wrote (a wrong translation that the
    /// guest itself can see).
    DataError,
    /// A user access begins: what happens until [`Event::UserAccessDone`] (the access, the
    /// kernel's handling of its faults, the retries) is the cost of that access, and of the
    /// demand or copy-on-write fault reported inside it.
    UserAccess,
    /// The user access begun by the last [`Event::UserAccess`] completed (or its process was
    /// killed).
    UserAccessDone,
}

/// The interface through which a guest model drives vcpus. `cpl` is the privilege level of
/// the access (0 kernel, 3 user). Loads, stores and fetches stay inside one page.
pub trait GuestOps {
    /// How many vcpus the backend runs.
    fn vcpus(&self) -> usize;
    /// Guest-physical RAM, in 4 KiB frames, from frame 0 up.
    fn ram_frames(&self) -> u64;
    /// Writes guest-physical memory before the guest runs (the loader placing the kernel
    /// image): not a guest operation, no traps.
    fn load_image(&mut self, gpa: u64, data: &[u8]) -> Result<(), OpError>;
    /// A load of `buf.len()` bytes at `va`.
    fn read(&mut self, vcpu: usize, va: u64, cpl: u8, buf: &mut [u8]) -> Result<(), OpError>;
    /// A store of `data` at `va`.
    fn write(&mut self, vcpu: usize, va: u64, cpl: u8, data: &[u8]) -> Result<(), OpError>;
    /// An instruction fetch of `buf.len()` bytes at `va`.
    fn fetch(&mut self, vcpu: usize, va: u64, cpl: u8, buf: &mut [u8]) -> Result<(), OpError>;
    /// Executes the one instruction at `regs.rip` (its bytes in guest memory), updating
    /// `regs` when it completes. Models use it for page-table writes.
    fn exec(&mut self, vcpu: usize, regs: &mut Regs) -> Result<(), OpError>;
    /// MOV to CR0 / CR4 and WRMSR EFER together (CR3 and RFLAGS.AC are taken from `ctl`
    /// too; the PDPTE fields are ignored: the backend loads them).
    fn set_control(&mut self, vcpu: usize, ctl: ControlState) -> Result<(), OpError>;
    /// MOV to CR3.
    fn set_cr3(&mut self, vcpu: usize, cr3: u64) -> Result<(), OpError>;
    /// INVLPG.
    fn invlpg(&mut self, vcpu: usize, va: u64) -> Result<(), OpError>;
    /// Reports a guest-model event. Backends ignore it; recorders keep it.
    fn event(&mut self, _event: Event) {}
}

impl<T: GuestOps + ?Sized> GuestOps for &mut T {
    fn vcpus(&self) -> usize {
        (**self).vcpus()
    }
    fn ram_frames(&self) -> u64 {
        (**self).ram_frames()
    }
    fn load_image(&mut self, gpa: u64, data: &[u8]) -> Result<(), OpError> {
        (**self).load_image(gpa, data)
    }
    fn read(&mut self, vcpu: usize, va: u64, cpl: u8, buf: &mut [u8]) -> Result<(), OpError> {
        (**self).read(vcpu, va, cpl, buf)
    }
    fn write(&mut self, vcpu: usize, va: u64, cpl: u8, data: &[u8]) -> Result<(), OpError> {
        (**self).write(vcpu, va, cpl, data)
    }
    fn fetch(&mut self, vcpu: usize, va: u64, cpl: u8, buf: &mut [u8]) -> Result<(), OpError> {
        (**self).fetch(vcpu, va, cpl, buf)
    }
    fn exec(&mut self, vcpu: usize, regs: &mut Regs) -> Result<(), OpError> {
        (**self).exec(vcpu, regs)
    }
    fn set_control(&mut self, vcpu: usize, ctl: ControlState) -> Result<(), OpError> {
        (**self).set_control(vcpu, ctl)
    }
    fn set_cr3(&mut self, vcpu: usize, cr3: u64) -> Result<(), OpError> {
        (**self).set_cr3(vcpu, cr3)
    }
    fn invlpg(&mut self, vcpu: usize, va: u64) -> Result<(), OpError> {
        (**self).invlpg(vcpu, va)
    }
    fn event(&mut self, event: Event) {
        (**self).event(event)
    }
}

//! Paging changes posted to vcpus that run on other threads, and kicks out of `KVM_RUN`.
//!
//! When an engine call on one vcpu's thread changes what another vcpu must run on (its
//! root moved, or its TLB must be flushed), the new paging registers are posted to that
//! vcpu's slot under the shadow lock, and the caller does not return (nor let anyone call
//! the engine again, since it still holds the lock) until the vcpu is either out of
//! `KVM_RUN` or has taken them: a running vcpu is signalled until it exits, and every vcpu
//! takes its slot right before it enters `KVM_RUN` again. So no vcpu runs on a root the
//! engine may free once its flush is handed out (the engine's deferred free counts on it).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use shadow2::paging::ControlState;
use vmm_sys_util::signal::SIGRTMIN;

/// How long a poster waits between two signals to a vcpu that has not left `KVM_RUN`.
const KICK_INTERVAL: Duration = Duration::from_micros(20);

/// One vcpu's side.
#[derive(Debug, Default)]
struct Slot {
    /// Paging registers posted to it, not yet loaded.
    posted: Mutex<Option<ControlState>>,
    /// It is in (or about to enter) `KVM_RUN`.
    running: AtomicBool,
    /// It was signalled for a post (an `EINTR` of its run is a kick, not the watchdog).
    kicked: AtomicBool,
    /// The thread it runs on while `running` may be set.
    thread: Mutex<Option<libc::pthread_t>>,
}

/// The slots of every vcpu of a VM, and the VM-wide pause a zap needs.
#[derive(Debug)]
pub struct Kicks {
    slots: Vec<Slot>,
    /// No vcpu may enter `KVM_RUN` (the VM's memory slot is being replaced).
    paused: AtomicBool,
    /// Signals sent, so far.
    signals: AtomicU64,
    /// Zaps of every translation KVM caches, so far (counted by the VM, read here without
    /// its lock).
    pub(crate) zaps: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Kicks {
    /// Slots for `vcpus` vcpus.
    pub fn new(vcpus: usize) -> Kicks {
        Kicks {
            slots: (0..vcpus).map(|_| Slot::default()).collect(),
            paused: AtomicBool::new(false),
            signals: AtomicU64::new(0),
            zaps: AtomicU64::new(0),
        }
    }

    /// Posts `hw` to vcpu `v` and returns once `v` is out of `KVM_RUN` or has loaded it.
    /// Returns how many signals it took.
    pub fn post(&self, v: usize, hw: ControlState) -> u64 {
        let Some(slot) = self.slots.get(v) else {
            return 0;
        };
        *lock(&slot.posted) = Some(hw);
        let mut signals = 0;
        while slot.running.load(Ordering::SeqCst) && lock(&slot.posted).is_some() {
            {
                let thread = lock(&slot.thread);
                if let Some(t) = *thread
                    && slot.running.load(Ordering::SeqCst)
                {
                    slot.kicked.store(true, Ordering::SeqCst);
                    // SAFETY: `t` is the thread that set `running`; it clears `thread` (under
                    // this lock, held here) before it can exit, so it is alive.
                    unsafe {
                        libc::pthread_kill(t, SIGRTMIN());
                    }
                    signals += 1;
                }
            }
            std::thread::sleep(KICK_INTERVAL);
        }
        self.signals.fetch_add(signals, Ordering::Relaxed);
        signals
    }

    /// Marks vcpu `v` as entering `KVM_RUN` on the calling thread (waiting while the VM is
    /// paused), and takes what was posted to it (to load before it runs).
    pub fn enter(&self, v: usize) -> Option<ControlState> {
        let slot = self.slots.get(v)?;
        {
            let mut thread = lock(&slot.thread);
            if thread.is_none() {
                // SAFETY: pthread_self has no preconditions.
                *thread = Some(unsafe { libc::pthread_self() });
            }
        }
        loop {
            slot.running.store(true, Ordering::SeqCst);
            // Either the pauser sees `running` (and waits for this vcpu to leave), or this
            // vcpu sees the pause and backs off.
            if !self.paused.load(Ordering::SeqCst) {
                break;
            }
            slot.running.store(false, Ordering::SeqCst);
            while self.paused.load(Ordering::SeqCst) {
                std::thread::sleep(KICK_INTERVAL);
            }
        }
        lock(&slot.posted).take()
    }

    /// Runs `f` while no vcpu is in `KVM_RUN`: every vcpu in it is signalled until it is
    /// out, and none enters until `f` returns. (A VM without its memory slot, even for an
    /// instant, must not run: a vcpu that entered then would fault on its own IDT.)
    /// Returns `f`'s result and how many signals it took.
    pub fn with_all_out<R>(&self, f: impl FnOnce() -> R) -> (R, u64) {
        self.paused.store(true, Ordering::SeqCst);
        let mut signals = 0;
        for slot in &self.slots {
            while slot.running.load(Ordering::SeqCst) {
                let thread = lock(&slot.thread);
                if let Some(t) = *thread
                    && slot.running.load(Ordering::SeqCst)
                {
                    slot.kicked.store(true, Ordering::SeqCst);
                    // SAFETY: as in `post`: the thread that set `running` clears `thread`
                    // under this lock before it can exit.
                    unsafe {
                        libc::pthread_kill(t, SIGRTMIN());
                    }
                    signals += 1;
                }
                drop(thread);
                std::thread::sleep(KICK_INTERVAL);
            }
        }
        let result = f();
        self.paused.store(false, Ordering::SeqCst);
        self.signals.fetch_add(signals, Ordering::Relaxed);
        (result, signals)
    }

    /// Signals sent to take vcpus out of `KVM_RUN`, so far.
    pub fn signals(&self) -> u64 {
        self.signals.load(Ordering::Relaxed)
    }

    /// Marks vcpu `v` as out of `KVM_RUN`; returns whether it was kicked since it entered.
    pub fn leave(&self, v: usize) -> bool {
        let Some(slot) = self.slots.get(v) else {
            return false;
        };
        slot.running.store(false, Ordering::SeqCst);
        slot.kicked.swap(false, Ordering::SeqCst)
    }

    /// Vcpu `v`'s thread is done with it (it may run on another thread next).
    pub fn release(&self, v: usize) {
        if let Some(slot) = self.slots.get(v) {
            *lock(&slot.thread) = None;
        }
    }
}

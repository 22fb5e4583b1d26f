//! A deadline for `KVM_RUN`: a helper thread, started once per [`Watchdog`], signals the
//! thread that armed it when the deadline passes, so the ioctl returns `EINTR` instead of
//! running a stuck guest for ever. Arming and disarming take a lock and no system call
//! beyond a wake-up, so every `KVM_RUN` can have one.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::signal::{SIGRTMIN, register_signal_handler};

/// The real-time signal used to kick a vcpu thread out of `KVM_RUN`.
fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn ignore(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

static HANDLER: Once = Once::new();

#[derive(Debug, Default)]
struct State {
    /// When to signal `target`, while armed.
    deadline: Option<(Instant, libc::pthread_t)>,
    quit: bool,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A watchdog thread; [`Watchdog::arm`] sets its deadline for the calling thread.
#[derive(Debug)]
pub struct Watchdog {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// An armed deadline; disarmed when dropped.
#[derive(Debug)]
pub struct Armed<'a> {
    shared: &'a Shared,
}

impl Watchdog {
    /// Starts the watchdog's thread (disarmed).
    pub fn new() -> Watchdog {
        // The handler does nothing: its only use is to interrupt the ioctl (no SA_RESTART).
        HANDLER.call_once(|| {
            let _ = register_signal_handler(kick_signal(), ignore);
        });
        let shared = Arc::new(Shared::default());
        let watched = Arc::clone(&shared);
        let thread = std::thread::spawn(move || watch(&watched));
        Watchdog {
            shared,
            thread: Some(thread),
        }
    }

    /// Arms a deadline `after` from now for the calling thread.
    pub fn arm(&self, after: Duration) -> Armed<'_> {
        // SAFETY: pthread_self has no preconditions and returns the calling thread's id.
        let target = unsafe { libc::pthread_self() };
        self.shared.lock().deadline = Some((Instant::now() + after, target));
        self.shared.changed.notify_one();
        Armed {
            shared: &self.shared,
        }
    }
}

impl Default for Watchdog {
    fn default() -> Watchdog {
        Watchdog::new()
    }
}

fn watch(shared: &Shared) {
    let mut state = shared.lock();
    loop {
        if state.quit {
            return;
        }
        match state.deadline {
            None => {
                state = shared
                    .changed
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            Some((when, target)) => {
                let now = Instant::now();
                if now >= when {
                    state.deadline = None;
                    // SAFETY: `target` armed this deadline and has not disarmed it (that
                    // takes this lock, held here), so it has not returned from the armed
                    // scope and is alive.
                    unsafe {
                        libc::pthread_kill(target, kick_signal());
                    }
                } else {
                    state = shared
                        .changed
                        .wait_timeout(state, when - now)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
            }
        }
    }
}

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        self.shared.lock().deadline = None;
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.shared.lock().quit = true;
        self.shared.changed.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

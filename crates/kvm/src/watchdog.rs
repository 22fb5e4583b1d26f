//! A deadline for `KVM_RUN`: a helper thread signals the vcpu's thread when it passes, so
//! the ioctl returns `EINTR` instead of running a stuck guest for ever.

use std::sync::Once;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::signal::{SIGRTMIN, register_signal_handler};

/// The real-time signal used to kick a vcpu thread out of `KVM_RUN`.
fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn ignore(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// An armed deadline; disarmed when dropped.
#[derive(Debug)]
pub struct Watchdog {
    disarm: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

static HANDLER: Once = Once::new();

impl Watchdog {
    /// Arms a deadline for the calling thread.
    pub fn arm(after: Duration) -> Watchdog {
        // The handler does nothing: its only use is to interrupt the ioctl (no SA_RESTART).
        HANDLER.call_once(|| {
            let _ = register_signal_handler(kick_signal(), ignore);
        });
        // SAFETY: pthread_self has no preconditions and returns the calling thread's id.
        let target = unsafe { libc::pthread_self() };
        let (tx, rx): (Sender<()>, Receiver<()>) = channel();
        let thread = std::thread::spawn(move || {
            if rx.recv_timeout(after) == Err(RecvTimeoutError::Timeout) {
                // SAFETY: `target` is the thread that armed this watchdog; it joins this
                // thread before it can exit (see `Drop`), so the id is still valid.
                unsafe {
                    libc::pthread_kill(target, kick_signal());
                }
            }
        });
        Watchdog {
            disarm: Some(tx),
            thread: Some(thread),
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if let Some(tx) = self.disarm.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

//! Ctrl-C and SIGTERM: the first signal asks every step to stop and every running child to
//! end, so that temporary trees and files are removed on the way out.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, Once};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());
static INSTALL: Once = Once::new();

#[derive(Debug, thiserror::Error)]
#[error("interrupted")]
pub struct Interrupted;

/// Installs the handler (once per process).
pub fn install() {
    INSTALL.call_once(|| {
        let _ = ctrlc::set_handler(|| {
            if INTERRUPTED.swap(true, Ordering::SeqCst) {
                return;
            }
            eprintln!("interrupted: stopping and cleaning up");
            // A child in our process group got the terminal's SIGINT already; one started
            // elsewhere (or a SIGTERM sent to us alone) is asked here. SIGTERM, not SIGKILL:
            // mmdebstrap unmounts what it mounted inside the tree when it is terminated.
            for pid in CHILDREN.lock().unwrap().iter() {
                unsafe {
                    libc::kill(*pid as libc::pid_t, libc::SIGTERM);
                }
            }
        });
    });
}

/// For a process that only waits for `pid` (a build run again inside a user namespace):
/// each signal is passed on to `pid` as SIGTERM, and this process stays until `pid` ends.
/// A terminal's Ctrl-C reaches `pid` directly as well; it reports the interruption.
pub fn forward_to(pid: u32) {
    INSTALL.call_once(|| {
        let _ = ctrlc::set_handler(move || unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        });
    });
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Fails with [`Interrupted`] once a signal arrived; long loops call this between items.
pub fn check() -> Result<(), Interrupted> {
    if interrupted() {
        Err(Interrupted)
    } else {
        Ok(())
    }
}

pub(crate) fn register_child(pid: u32) {
    CHILDREN.lock().unwrap().push(pid);
}

pub(crate) fn unregister_child(pid: u32) {
    CHILDREN.lock().unwrap().retain(|p| *p != pid);
}

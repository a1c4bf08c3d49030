//! Spawning QEMU so that it cannot outlive the process that started it.
//!
//! `Drop` kills a guest's QEMU, but a test binary killed by a CI timeout (SIGKILL) runs no
//! destructors, and a leftover TCG guest eats a core. So QEMU gets `PR_SET_PDEATHSIG(SIGKILL)`.
//! Linux ties that signal to the *thread* that forked, not the process: if a test thread that
//! launched a guest ended, QEMU would die with it. Spawning from one long-lived thread makes
//! the signal fire only when the whole process is gone.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

type Job = (Command, mpsc::Sender<io::Result<Child>>);

fn spawner() -> io::Result<&'static Mutex<mpsc::Sender<Job>>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    if let Some(s) = SPAWNER.get() {
        return Ok(s);
    }
    let (tx, rx) = mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("qemu-spawner".into())
        .spawn(move || {
            // Runs until the process exits: the sender lives in a static and is never dropped.
            for (mut cmd, reply) in rx {
                let _ = reply.send(cmd.spawn());
            }
        })?;
    // A concurrent first call may have won the race; its thread serves everyone and ours
    // ends when `tx` is dropped here.
    Ok(SPAWNER.get_or_init(|| Mutex::new(tx)))
}

/// Spawns `cmd` so that it gets SIGKILL when this process dies.
pub(crate) fn spawn_tied_to_process(mut cmd: Command) -> io::Result<Child> {
    let parent = libc::pid_t::try_from(std::process::id()).map_err(io::Error::other)?;
    let die_with_parent = move || {
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and only affects this child.
        if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // The parent may have died between fork and prctl: then no signal will come.
        // SAFETY: getppid is async-signal-safe and has no preconditions.
        if unsafe { libc::getppid() } != parent {
            return Err(io::Error::other("parent exited while QEMU was starting"));
        }
        Ok(())
    };
    // SAFETY: the closure runs between fork and exec in the child and only calls the
    // async-signal-safe prctl/getppid; it allocates only on the error path, where
    // `io::Error::other` is acceptable because the child is about to fail anyway.
    unsafe {
        cmd.pre_exec(die_with_parent);
    }
    let (reply_tx, reply_rx) = mpsc::channel();
    spawner()?
        .lock()
        .map_err(|_| io::Error::other("QEMU spawner lock poisoned"))?
        .send((cmd, reply_tx))
        .map_err(|_| io::Error::other("QEMU spawner thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("QEMU spawner thread is gone"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A child spawned from a short-lived thread survives that thread (the spawner thread is
    /// its parent thread), and is an ordinary child of this process.
    #[test]
    fn child_outlives_the_calling_thread() {
        let mut child = std::thread::spawn(|| {
            let mut cmd = Command::new("sleep");
            cmd.arg("30");
            spawn_tied_to_process(cmd).unwrap()
        })
        .join()
        .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(
            child.try_wait().unwrap().is_none(),
            "child died with the calling thread"
        );
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn spawn_errors_are_returned() {
        let err = spawn_tied_to_process(Command::new("/nonexistent/qemu")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}

//! Things that apply to the calling thread only: its CPU time, its network namespace, its CPU.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

/// User plus system CPU time the calling thread has used so far (`getrusage(RUSAGE_THREAD)`,
/// microsecond resolution, which is plenty over runs of seconds).
pub fn thread_cpu_time() -> io::Result<Duration> {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `usage` points to writable memory of the right size for the kernel to fill.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_THREAD, usage.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: getrusage returned 0, so it wrote the whole struct (and zeroed() made every byte
    // initialised anyway).
    let usage = unsafe { usage.assume_init() };
    Ok(timeval_to_duration(usage.ru_utime) + timeval_to_duration(usage.ru_stime))
}

fn timeval_to_duration(tv: libc::timeval) -> Duration {
    let secs = u64::try_from(tv.tv_sec).unwrap_or(0);
    let micros = u32::try_from(tv.tv_usec).unwrap_or(0);
    Duration::from_secs(secs) + Duration::from_micros(u64::from(micros))
}

/// Moves the calling thread into the named network namespace (`/var/run/netns/<name>`, as
/// created by `ip netns add`). Sockets the thread creates afterwards live in that namespace;
/// other threads of the process are not affected.
pub fn enter_netns(name: &str) -> io::Result<()> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a network namespace name"),
        ));
    }
    let path = Path::new("/var/run/netns").join(name);
    let file = File::open(&path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    // SAFETY: setns only reads the fd, which `file` keeps open for the duration of the call.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        return Err(io::Error::new(
            err.kind(),
            format!("setns({}): {err}", path.display()),
        ));
    }
    Ok(())
}

/// Pins the calling thread to one CPU, so the sender and the receiver do not share a core
/// and the numbers do not depend on the scheduler's mood.
pub fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("CPU {cpu} is out of range"),
        ));
    }
    // SAFETY: cpu_set_t is plain data; all zeros is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is below CPU_SETSIZE (checked above), so CPU_SET stays inside `set`.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 means the calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_grows_with_work() {
        // Spin until this thread's CPU clock has advanced 20 ms. On a loaded machine that can
        // take far longer than 20 ms of wall time (the thread waits for a core), so the bound
        // is generous; a clock that does not advance with work still fails it.
        let before = thread_cpu_time().unwrap();
        let start = std::time::Instant::now();
        let mut x = 0u64;
        let mut spent = Duration::ZERO;
        while spent < Duration::from_millis(20) && start.elapsed() < Duration::from_secs(20) {
            for _ in 0..10_000 {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
            spent = thread_cpu_time().unwrap() - before;
        }
        assert!(
            spent >= Duration::from_millis(20),
            "{spent:?} after {:?}",
            start.elapsed()
        );
    }

    #[test]
    fn bad_namespace_names_are_refused() {
        for name in ["", "a/b", "..", "."] {
            assert_eq!(
                enter_netns(name).unwrap_err().kind(),
                io::ErrorKind::InvalidInput
            );
        }
        assert!(enter_netns("vnp-does-not-exist-4711").is_err());
    }

    #[test]
    fn out_of_range_cpu_is_refused() {
        assert!(pin_to_cpu(1 << 20).is_err());
    }
}

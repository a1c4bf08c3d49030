//! `ChildGuard`: a child process (and its whole process group) that is killed when the guard
//! drops, with the tail of its stderr kept for error messages.
//!
//! Tests start daemons (registry, vnpd, QEMU) that must never outlive the test, also when the
//! test panics half way. The child gets its own process group so that helpers it forks die with
//! it. stderr is drained by a thread (so the child never blocks on a full pipe), copied to an
//! optional log file and its last lines kept in memory.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How many stderr lines a guard keeps for error messages.
pub const STDERR_TAIL_LINES: usize = 60;

/// Errors starting or waiting for a guarded child.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The program could not be started.
    #[error("cannot start {name} ({program}): {source}")]
    Spawn {
        /// Label of the child.
        name: String,
        /// Program path.
        program: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The child exited while we waited for it to become ready.
    #[error("{name} exited ({status}) while waiting for {what}; stderr tail:\n{tail}")]
    Exited {
        /// Label of the child.
        name: String,
        /// Exit status.
        status: ExitStatus,
        /// What was awaited.
        what: String,
        /// Last stderr lines.
        tail: String,
    },
    /// A readiness condition did not become true in time.
    #[error("{name}: timed out after {timeout:?} waiting for {what}; stderr tail:\n{tail}")]
    Timeout {
        /// Label of the child.
        name: String,
        /// How long we waited.
        timeout: Duration,
        /// What was awaited.
        what: String,
        /// Last stderr lines.
        tail: String,
    },
    /// waitpid failed.
    #[error("{name}: wait failed: {source}")]
    Wait {
        /// Label of the child.
        name: String,
        /// Underlying error.
        source: std::io::Error,
    },
}

/// A running child process killed (with its process group) on drop.
#[derive(Debug)]
pub struct ChildGuard {
    name: String,
    child: Child,
    tail: Arc<Mutex<VecDeque<String>>>,
    drain: Option<JoinHandle<()>>,
    exited: Option<ExitStatus>,
}

impl ChildGuard {
    /// Starts `cmd` in its own process group with stderr captured. stdin and stdout are left
    /// as configured on `cmd` (default: inherited). `log` receives a copy of every stderr line
    /// (appended: a restarted daemon keeps one log).
    pub fn spawn(name: &str, cmd: &mut Command, log: Option<&Path>) -> Result<Self, ProcessError> {
        let program = cmd.get_program().to_string_lossy().into_owned();
        let log_file = match log {
            // Appended to, so that a restarted daemon's log follows its earlier life.
            Some(p) => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|source| ProcessError::Spawn {
                        name: name.to_string(),
                        program: program.clone(),
                        source,
                    })?,
            ),
            None => None,
        };
        let mut child = cmd
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .map_err(|source| ProcessError::Spawn {
                name: name.to_string(),
                program,
                source,
            })?;
        let stderr = child.stderr.take().expect("stderr was piped");
        let tail = Arc::new(Mutex::new(VecDeque::with_capacity(STDERR_TAIL_LINES)));
        let tail2 = Arc::clone(&tail);
        let drain = std::thread::Builder::new()
            .name(format!("stderr-{name}"))
            .spawn(move || drain_stderr(stderr, tail2, log_file))
            .expect("spawn stderr thread");
        Ok(Self {
            name: name.to_string(),
            child,
            tail,
            drain: Some(drain),
            exited: None,
        })
    }

    /// Label given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Process id (also the process group id).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The child's stdin, if it was piped.
    pub fn stdin(&mut self) -> Option<&mut ChildStdin> {
        self.child.stdin.as_mut()
    }

    /// Takes the child's stdout, if it was piped.
    pub fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.child.stdout.take()
    }

    /// The last stderr lines, joined.
    pub fn stderr_tail(&self) -> String {
        let tail = self.tail.lock().unwrap_or_else(|e| e.into_inner());
        tail.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// Exit status if the child has exited, without blocking.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, ProcessError> {
        if let Some(s) = self.exited {
            return Ok(Some(s));
        }
        let s = self.child.try_wait().map_err(|source| ProcessError::Wait {
            name: self.name.clone(),
            source,
        })?;
        self.exited = s;
        Ok(s)
    }

    /// Polls `ready` every 50 ms until it returns `Some`, the child exits or `timeout` passes.
    pub fn wait_until<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut ready: impl FnMut() -> Option<T>,
    ) -> Result<T, ProcessError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = ready() {
                return Ok(v);
            }
            if let Some(status) = self.try_wait()? {
                // Give the drain thread a moment to collect the last words.
                std::thread::sleep(Duration::from_millis(100));
                return Err(ProcessError::Exited {
                    name: self.name.clone(),
                    status,
                    what: what.to_string(),
                    tail: self.stderr_tail(),
                });
            }
            if Instant::now() >= deadline {
                return Err(ProcessError::Timeout {
                    name: self.name.clone(),
                    timeout,
                    what: what.to_string(),
                    tail: self.stderr_tail(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until `path` exists (a socket or pid file the child creates).
    pub fn wait_for_path(&mut self, path: &Path, timeout: Duration) -> Result<(), ProcessError> {
        let what = format!("{} to appear", path.display());
        self.wait_until(&what, timeout, || path.exists().then_some(()))
    }

    /// Sends SIGTERM to the process group and waits up to `grace` for the exit, then SIGKILL.
    /// Returns the exit status.
    pub fn terminate(&mut self, grace: Duration) -> Result<ExitStatus, ProcessError> {
        if let Some(s) = self.try_wait()? {
            return Ok(s);
        }
        signal_group(self.child.id(), libc::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(s) = self.try_wait()? {
                signal_group(self.child.id(), libc::SIGKILL);
                return Ok(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill()
    }

    /// Kills the process group with SIGKILL and reaps the child.
    pub fn kill(&mut self) -> Result<ExitStatus, ProcessError> {
        signal_group(self.child.id(), libc::SIGKILL);
        if let Some(s) = self.exited {
            return Ok(s);
        }
        let s = self.child.wait().map_err(|source| ProcessError::Wait {
            name: self.name.clone(),
            source,
        })?;
        self.exited = Some(s);
        Ok(s)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        // Errors are ignored: there is nobody to report them to, and the kill is best effort
        // against a process that may already be gone.
        let _ = self.kill();
        if let Some(h) = self.drain.take() {
            let _ = h.join();
        }
    }
}

fn signal_group(pgid: u32, sig: libc::c_int) {
    let Ok(pgid) = libc::pid_t::try_from(pgid) else {
        return;
    };
    // SAFETY: kill(2) with a negative pid signals a process group; it has no memory-safety
    // preconditions. The group was created for this child (process_group(0)).
    unsafe {
        libc::kill(-pgid, sig);
    }
}

fn drain_stderr(
    stderr: std::process::ChildStderr,
    tail: Arc<Mutex<VecDeque<String>>>,
    mut log: Option<File>,
) {
    let mut reader = BufReader::new(stderr);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if let Some(f) = log.as_mut() {
            let _ = f.write_all(&buf);
        }
        let line = String::from_utf8_lossy(&buf).trim_end().to_string();
        let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
        if t.len() == STDERR_TAIL_LINES {
            t.pop_front();
        }
        t.push_back(line);
    }
}

/// Processes whose command line contains `needle` (to assert that nothing leaked).
pub fn processes_matching(needle: &str) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return found;
    };
    let me = std::process::id();
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = raw
            .split(|b| *b == 0)
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        if cmdline.contains(needle) {
            found.push((pid, cmdline));
        }
    }
    found
}

/// A scratch directory removed (recursively) on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `/tmp/<prefix>-<pid>-<n>`, unique within and across processes.
    pub fn new(prefix: &str) -> std::io::Result<Self> {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("{prefix}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)?;
        Ok(Self { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_stderr_tail_and_reports_exit() {
        let mut g = ChildGuard::spawn(
            "sh",
            Command::new("sh").args(["-c", "echo one >&2; echo two >&2; exit 3"]),
            None,
        )
        .unwrap();
        let err = g
            .wait_until("never", Duration::from_secs(5), || None::<()>)
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("two"), "{msg}");
        assert!(msg.contains("exit status: 3"), "{msg}");
    }

    #[test]
    fn drop_kills_the_whole_process_group() {
        let dir = TempDir::new("vnp-testkit-pg").unwrap();
        let marker = format!("vnp-testkit-sleeper-{}", std::process::id());
        // The shell forks a grandchild; both must die with the guard.
        let script = format!("sh -c 'sleep 1000; : {marker}' & exec -a {marker} sleep 1000");
        let g = ChildGuard::spawn("sh", Command::new("bash").args(["-c", &script]), None).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while processes_matching(&marker).is_empty() {
            assert!(Instant::now() < deadline, "child did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        while processes_matching(&marker).len() < 2 {
            assert!(Instant::now() < deadline, "grandchild did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(g);
        // The grandchild is reparented when its parent dies; give the kernel a moment.
        let deadline = Instant::now() + Duration::from_secs(2);
        while !processes_matching(&marker).is_empty() {
            assert!(
                Instant::now() < deadline,
                "survivors: {:?}",
                processes_matching(&marker)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(dir);
    }

    #[test]
    fn temp_dir_is_removed() {
        let d = TempDir::new("vnp-testkit-td").unwrap();
        let p = d.path().to_path_buf();
        std::fs::write(p.join("f"), b"x").unwrap();
        drop(d);
        assert!(!p.exists());
    }
}

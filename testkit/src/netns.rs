//! Network namespaces for tests: created with unique names, deleted on drop together with every
//! process still running inside them.
//!
//! [`Fabric`] builds the usual vnp test topology: a "core" namespace holding a bridge on the
//! underlay (198.18.0.0/24), and one namespace per host joined to it by a veth pair. Everything
//! lives inside namespaces created here, so tests never touch the machine's own interfaces and
//! can run in parallel (the same addresses in different namespaces do not collide).

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Errors from namespace and link setup.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// A command could not be started.
    #[error("cannot run {cmd}: {source}")]
    Spawn {
        /// The command line.
        cmd: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// A command exited with failure.
    #[error("{cmd} failed ({status}): {stderr}")]
    Failed {
        /// The command line.
        cmd: String,
        /// Exit status.
        status: std::process::ExitStatus,
        /// Its stderr.
        stderr: String,
    },
    /// Entering the namespace failed.
    #[error("cannot enter network namespace {name}: {source}")]
    Enter {
        /// Namespace name.
        name: String,
        /// Underlying error.
        source: std::io::Error,
    },
}

/// Runs a command to completion, turning a failure exit into an error with its stderr.
pub fn run_checked(cmd: &mut Command) -> Result<Output, NetnsError> {
    let line = format!("{cmd:?}");
    let out = cmd.output().map_err(|source| NetnsError::Spawn {
        cmd: line.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(NetnsError::Failed {
            cmd: line,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out)
}

/// A named network namespace (`ip netns`), deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `<prefix>-<pid>-<n>` with its loopback up.
    pub fn create(prefix: &str) -> Result<Self, NetnsError> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{prefix}-{}-{n}", std::process::id());
        run_checked(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name (as in `ip netns list`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs `program` inside this namespace (`ip netns exec`; the program is
    /// exec'ed, so the child's pid is the program's).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Runs `args[0]` with `args[1..]` inside the namespace; returns its stdout.
    pub fn run(&self, args: &[&str]) -> Result<String, NetnsError> {
        let (prog, rest) = args.split_first().expect("run needs a program");
        let out = run_checked(self.command(prog).args(rest))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) -> Result<String, NetnsError> {
        let out = run_checked(Command::new("ip").args(["-n", &self.name]).args(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `f` on a fresh thread that has entered this namespace, and returns its result.
    /// Sockets created by `f` stay in this namespace after it returns, so a test can talk to
    /// a daemon inside the namespace from its own process.
    pub fn enter<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R, NetnsError> {
        let path = format!("/run/netns/{}", self.name);
        let file = std::fs::File::open(&path).map_err(|source| NetnsError::Enter {
            name: self.name.clone(),
            source,
        })?;
        let name = self.name.clone();
        std::thread::spawn(move || {
            // SAFETY: setns(2) on a valid namespace fd; it changes only this thread's network
            // namespace, and this thread is ours and ends after `f`.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(NetnsError::Enter {
                    name,
                    source: std::io::Error::last_os_error(),
                });
            }
            Ok(f())
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    }

    /// Pids of the processes running in this namespace.
    pub fn pids(&self) -> Vec<u32> {
        Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Joins this namespace and `other` with a veth pair: `self_if` here with `self_addr`,
    /// `other_if` there, without an address (the caller may bridge it). Both ends up.
    pub fn veth_to(
        &self,
        self_if: &str,
        self_addr: Option<(Ipv4Addr, u8)>,
        other: &Netns,
        other_if: &str,
    ) -> Result<(), NetnsError> {
        // Created directly inside the namespaces: names never collide with the root's.
        self.ip(&[
            "link",
            "add",
            self_if,
            "type",
            "veth",
            "peer",
            "name",
            other_if,
            "netns",
            &other.name,
        ])?;
        if let Some((addr, len)) = self_addr {
            self.ip(&["addr", "add", &format!("{addr}/{len}"), "dev", self_if])?;
        }
        self.ip(&["link", "set", self_if, "up"])?;
        other.ip(&["link", "set", other_if, "up"])?;
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Processes inside would keep the namespace alive (and leak): kill them first.
        for _ in 0..50 {
            let pids = self.pids();
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                if let Ok(pid) = libc::pid_t::try_from(pid) {
                    // SAFETY: kill(2) has no memory-safety preconditions.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Names from `ip netns list` that contain `needle` (to assert that nothing leaked).
pub fn namespaces_matching(needle: &str) -> Vec<String> {
    Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.split_whitespace().next())
                .filter(|n| n.contains(needle))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Whether a namespace with exactly this name exists.
pub fn namespace_exists(name: &str) -> bool {
    std::path::Path::new("/run/netns").join(name).exists()
}

/// The underlay prefix used by [`Fabric`]: 198.18.0.0/24, inside the 198.18.0.0/15 benchmark
/// range.
pub const UNDERLAY_PREFIX_LEN: u8 = 24;
/// The core namespace's own address on the underlay bridge (where the registry listens).
pub const CORE_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

/// A core namespace with bridge `br0` plus host namespaces, each joined by veth.
#[derive(Debug)]
pub struct Fabric {
    hosts: Vec<Netns>,
    core: Netns,
}

impl Fabric {
    /// Creates the core namespace (`<prefix>c-<pid>-<n>`) with `br0` at [`CORE_ADDR`].
    pub fn new(prefix: &str) -> Result<Self, NetnsError> {
        let core = Netns::create(&format!("{prefix}c"))?;
        // A fixed MAC: a bridge without one takes the lowest of its ports' addresses, so a
        // host added later (a gateway's namespace) could change it under the hosts' ARP
        // caches and cut them off from the registry until the entries go stale.
        core.ip(&[
            "link",
            "add",
            "br0",
            "address",
            "02:00:c6:12:00:01",
            "type",
            "bridge",
        ])?;
        core.ip(&[
            "addr",
            "add",
            &format!("{CORE_ADDR}/{UNDERLAY_PREFIX_LEN}"),
            "dev",
            "br0",
        ])?;
        core.ip(&["link", "set", "br0", "up"])?;
        Ok(Self {
            hosts: Vec::new(),
            core,
        })
    }

    /// The core namespace.
    pub fn core(&self) -> &Netns {
        &self.core
    }

    /// Adds host `index` (0-based): namespace `<prefix>h<index>-<pid>-<n>` with `eth0` at
    /// 198.18.0.(10 + index)/24, bridged in the core. Returns the host's underlay address.
    pub fn add_host(&mut self, prefix: &str) -> Result<(usize, Ipv4Addr), NetnsError> {
        let index = self.hosts.len();
        let addr = Self::host_addr(index);
        let ns = Netns::create(&format!("{prefix}h{index}"))?;
        let core_if = format!("vh{index}");
        ns.veth_to(
            "eth0",
            Some((addr, UNDERLAY_PREFIX_LEN)),
            &self.core,
            &core_if,
        )?;
        self.core.ip(&["link", "set", &core_if, "master", "br0"])?;
        self.hosts.push(ns);
        wait_reachable(&self.hosts[index], CORE_ADDR)?;
        Ok((index, addr))
    }

    /// Underlay address of host `index`.
    pub fn host_addr(index: usize) -> Ipv4Addr {
        let last = u8::try_from(10 + index).expect("at most 245 hosts");
        Ipv4Addr::new(198, 18, 0, last)
    }

    /// Host namespace `index`.
    pub fn host(&self, index: usize) -> &Netns {
        &self.hosts[index]
    }

    /// Names of all namespaces of this fabric.
    pub fn names(&self) -> Vec<String> {
        std::iter::once(self.core.name().to_string())
            .chain(self.hosts.iter().map(|h| h.name().to_string()))
            .collect()
    }
}

/// Pings `addr` from `ns` until it answers (the bridge needs a moment to forward), up to 5 s.
fn wait_reachable(ns: &Netns, addr: Ipv4Addr) -> Result<(), NetnsError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = ns.run(&["ping", "-c", "1", "-W", "1", &addr.to_string()]);
        match r {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;

    // These tests need root (network namespaces); vnp's tests run as root in CI.

    #[test]
    fn namespace_is_deleted_with_its_processes() {
        let ns = Netns::create("vnptk").unwrap();
        let name = ns.name().to_string();
        let mut child = ns.command("sleep").arg("1000").spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while ns.pids().is_empty() {
            assert!(
                Instant::now() < deadline,
                "sleep never entered the namespace"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(ns);
        let status = child.wait().unwrap();
        assert!(!status.success(), "sleep should have been killed");
        assert!(!namespace_exists(&name));
    }

    #[test]
    fn fabric_hosts_reach_each_other_and_sockets_stay_in_namespace() {
        let mut f = Fabric::new("vnptk").unwrap();
        let (a, addr_a) = f.add_host("vnptk").unwrap();
        let (b, addr_b) = f.add_host("vnptk").unwrap();
        f.host(a)
            .run(&["ping", "-c", "1", "-W", "2", &addr_b.to_string()])
            .unwrap();
        // A socket made inside host b receives a datagram sent from a socket made inside a.
        let rx = f
            .host(b)
            .enter(move || UdpSocket::bind((addr_b, 0)).unwrap())
            .unwrap();
        let port = rx.local_addr().unwrap().port();
        let tx = f
            .host(a)
            .enter(move || UdpSocket::bind((addr_a, 0)).unwrap())
            .unwrap();
        tx.send_to(b"hello", (addr_b, port)).unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 16];
        let (n, from) = rx.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(from.ip(), std::net::IpAddr::V4(addr_a));
        // The root namespace has no such address.
        assert!(UdpSocket::bind((addr_a, 0)).is_err());
        let names = f.names();
        drop(f);
        for n in names {
            assert!(!namespace_exists(&n), "{n} leaked");
        }
    }
}

//! `TapGuest`: a network namespace as a VM on vnpd, through `vnp-tap-frontend` (the event-driven
//! vhost-user frontend over a TAP with `IFF_VNET_HDR`, `tools/tap-frontend/`).
//!
//! The namespace's kernel is the guest: its TCP, `ping`, `iperf3`, `curl`, python servers all
//! work unmodified, and with offloads negotiated it hands vnpd real checksum-offloaded and TSO
//! frames. [`TapGuest::start`] creates the namespace and starts the fixture on a VM's socket
//! with the VM's MAC; [`TapGuest::dhcp`] runs busybox `udhcpc` (the test guests' DHCP client)
//! against vnpd and waits for the lease. Dropping the guest stops `udhcpc` and the fixture and
//! deletes the namespace (killing anything still running in it) and the scratch files.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::netns::{Netns, NetnsError};
use crate::process::{ChildGuard, ProcessError, TempDir};

/// Errors starting or driving a guest.
#[derive(Debug, thiserror::Error)]
pub enum TapGuestError {
    /// Namespace set-up.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// A child process (fixture or udhcpc).
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// Scratch files.
    #[error("scratch files: {0}")]
    Io(#[from] std::io::Error),
    /// No lease in time.
    #[error("no DHCP lease within {timeout:?}; udhcpc events:\n{events}\nfixture:\n{fixture}")]
    NoLease {
        /// How long it waited.
        timeout: Duration,
        /// The events the udhcpc script logged.
        events: String,
        /// The fixture's stderr tail.
        fixture: String,
    },
    /// udhcpc logged a lease, but the namespace has no default route through its router.
    #[error("lease {lease:?} logged, but the default route is {route:?}")]
    NotConfigured {
        /// The lease.
        lease: Lease,
        /// What `ip route show default` printed.
        route: String,
    },
    /// The fixture's output could not be understood.
    #[error("unexpected fixture output: {0}")]
    Output(String),
}

/// How to start a guest.
#[derive(Debug, Clone)]
pub struct TapGuestSpec {
    /// The `vnp-tap-frontend` binary.
    pub binary: PathBuf,
    /// vnpd's vhost-user socket for the VM.
    pub socket: PathBuf,
    /// The VM's MAC address (`aa:bb:cc:dd:ee:ff`).
    pub mac: String,
    /// Namespace name prefix.
    pub prefix: String,
    /// TAP interface name inside the namespace.
    pub ifname: String,
    /// Ask vnpd for offloads (`false` passes `--no-offloads`).
    pub offloads: bool,
    /// Reconnect after a vnpd restart (`--reconnect`) instead of exiting.
    pub reconnect: bool,
    /// More fixture arguments (ring sizes, ...).
    pub extra_args: Vec<String>,
    /// A file that receives a copy of the fixture's stderr.
    pub log: Option<PathBuf>,
    /// How long to wait for the fixture to bring the device up.
    pub start_timeout: Duration,
}

impl TapGuestSpec {
    /// A guest on `socket` with `mac`, offloads asked for, interface `vg0`.
    pub fn new(binary: impl Into<PathBuf>, socket: impl Into<PathBuf>, mac: &str) -> Self {
        TapGuestSpec {
            binary: binary.into(),
            socket: socket.into(),
            mac: mac.to_string(),
            prefix: "vnptg".into(),
            ifname: "vg0".into(),
            offloads: true,
            reconnect: false,
            extra_args: Vec::new(),
            log: None,
            start_timeout: Duration::from_secs(30),
        }
    }
}

/// What DHCP configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The guest's address.
    pub ip: Ipv4Addr,
    /// Prefix length of the network.
    pub prefix_len: u8,
    /// The virtual router.
    pub router: Ipv4Addr,
    /// The network MTU.
    pub mtu: u32,
}

impl Lease {
    /// Parses a `bound ip=... mask=... router=... mtu=...` line of the udhcpc script.
    pub fn parse(line: &str) -> Option<Lease> {
        let fields: BTreeMap<&str, &str> = line
            .split_whitespace()
            .filter_map(|f| f.split_once('='))
            .collect();
        Some(Lease {
            ip: fields.get("ip")?.parse().ok()?,
            prefix_len: fields.get("mask")?.parse().ok()?,
            router: fields.get("router")?.split(',').next()?.parse().ok()?,
            mtu: fields.get("mtu")?.parse().ok()?,
        })
    }
}

/// The fixture's `ready:` line: features acked and offloads named.
fn parse_ready(tail: &str) -> Option<(u64, String)> {
    let line = tail
        .lines()
        .find(|l| l.contains("vnp-tap-frontend: ready:"))?;
    let features = line
        .split("features 0x")
        .nth(1)?
        .split(|c: char| !c.is_ascii_hexdigit())
        .next()?;
    let offloads = line.split("offloads ").nth(1)?.trim().to_string();
    Some((u64::from_str_radix(features, 16).ok()?, offloads))
}

/// Parses the fixture's final `stats k=v ...` line.
pub fn parse_stats(tail: &str) -> Option<BTreeMap<String, u64>> {
    let line = tail
        .lines()
        .rev()
        .find(|l| l.contains("vnp-tap-frontend: stats "))?;
    let (_, kv) = line.split_once("stats ")?;
    kv.split_whitespace()
        .map(|f| {
            let (k, v) = f.split_once('=')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// The udhcpc script: configure address, MTU and default route, then log the event (like the
/// test guests' script). The log comes last because [`TapGuest::dhcp`] returns on it: a test
/// may connect the moment it sees `bound`.
const UDHCPC_SCRIPT: &str = r#"#!/bin/sh
case "$1" in
bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/$mask" broadcast "$broadcast" dev "$interface"
    [ -n "$mtu" ] && ip link set dev "$interface" mtu "$mtu"
    ip route replace default via "${router%% *}" dev "$interface"
    ;;
deconfig)
    ip addr flush dev "$interface"
    ;;
esac
echo "$1 ip=$ip mask=$mask router=$router mtu=$mtu lease=$lease" >> "$VNP_EVENTS"
exit 0
"#;

/// A running namespace guest. Field order is drop order: udhcpc, the fixture, the namespace,
/// the scratch directory.
#[derive(Debug)]
pub struct TapGuest {
    udhcpc: Option<ChildGuard>,
    frontend: Option<ChildGuard>,
    ns: Netns,
    dir: TempDir,
    spec: TapGuestSpec,
    acked: u64,
    offloads: String,
    lease: Option<Lease>,
}

impl TapGuest {
    /// Creates the namespace and starts the fixture in it; returns once the device is up.
    pub fn start(spec: TapGuestSpec) -> Result<TapGuest, TapGuestError> {
        let ns = Netns::create(&spec.prefix)?;
        let dir = TempDir::new(&format!("{}-{}", spec.prefix, ns.name()))?;
        let mut cmd = Command::new(&spec.binary);
        cmd.arg("--socket")
            .arg(&spec.socket)
            .args([
                "--netns",
                ns.name(),
                "--ifname",
                &spec.ifname,
                "--mac",
                &spec.mac,
            ])
            .args(&spec.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if !spec.offloads {
            cmd.arg("--no-offloads");
        }
        if spec.reconnect {
            cmd.arg("--reconnect");
        }
        let name = format!("tap-frontend-{}", ns.name());
        let mut frontend = ChildGuard::spawn(&name, &mut cmd, spec.log.as_deref())?;
        let (acked, offloads) = wait_ready(&mut frontend, spec.start_timeout)?;
        let script = dir.path().join("udhcpc.sh");
        std::fs::write(&script, UDHCPC_SCRIPT)?;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
        Ok(TapGuest {
            udhcpc: None,
            frontend: Some(frontend),
            ns,
            dir,
            spec,
            acked,
            offloads,
            lease: None,
        })
    }

    /// Runs busybox `udhcpc` on the interface (it stays running, renewing the lease) and waits
    /// for the first lease, which its script has configured (address, MTU, default route).
    pub fn dhcp(&mut self, timeout: Duration) -> Result<Lease, TapGuestError> {
        if let Some(lease) = &self.lease {
            return Ok(lease.clone());
        }
        let script = self.dir.path().join("udhcpc.sh");
        let events = self.events_path();
        let mut cmd = self.ns.command("busybox");
        cmd.args(["udhcpc", "-f", "-i", &self.spec.ifname, "-s"])
            .arg(&script)
            .args(["-t", "20", "-T", "1", "-A", "1"])
            .env("VNP_EVENTS", &events)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        let name = format!("udhcpc-{}", self.ns.name());
        self.udhcpc = Some(ChildGuard::spawn(&name, &mut cmd, None)?);
        let deadline = Instant::now() + timeout;
        loop {
            let text = std::fs::read_to_string(&events).unwrap_or_default();
            if let Some(lease) = text
                .lines()
                .filter(|l| l.starts_with("bound "))
                .find_map(Lease::parse)
            {
                self.check_configured(&lease)?;
                self.lease = Some(lease.clone());
                return Ok(lease);
            }
            if Instant::now() >= deadline {
                return Err(TapGuestError::NoLease {
                    timeout,
                    events: text,
                    fixture: self.fixture_stderr(),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The script logs a lease only once it is applied: its default route must be there.
    fn check_configured(&self, lease: &Lease) -> Result<(), TapGuestError> {
        let route = self.ns.ip(&["-4", "route", "show", "default"])?;
        let router = lease.router.to_string();
        let words: Vec<&str> = route.split_whitespace().collect();
        if words.windows(2).any(|w| w == ["via", router.as_str()]) {
            return Ok(());
        }
        Err(TapGuestError::NotConfigured {
            lease: lease.clone(),
            route,
        })
    }

    fn events_path(&self) -> PathBuf {
        self.dir.path().join("udhcpc.events")
    }

    /// The events udhcpc's script logged (`bound ...`, `renew ...`).
    pub fn dhcp_events(&self) -> String {
        std::fs::read_to_string(self.events_path()).unwrap_or_default()
    }

    /// The guest's namespace: run commands in it with [`Netns::command`] / [`Netns::run`].
    pub fn netns(&self) -> &Netns {
        &self.ns
    }

    /// The TAP interface's name inside the namespace.
    pub fn ifname(&self) -> &str {
        &self.spec.ifname
    }

    /// The lease, once [`TapGuest::dhcp`] got one.
    pub fn lease(&self) -> Option<&Lease> {
        self.lease.as_ref()
    }

    /// The virtio features vnpd acked.
    pub fn acked_features(&self) -> u64 {
        self.acked
    }

    /// The offloads negotiated, as the fixture names them (`none`, or e.g.
    /// `CSUM,GUEST_CSUM,HOST_TSO4,...`).
    pub fn offloads(&self) -> &str {
        &self.offloads
    }

    /// The fixture's pid (for CPU accounting from /proc).
    pub fn frontend_pid(&self) -> Option<u32> {
        self.frontend.as_ref().map(ChildGuard::pid)
    }

    /// The last lines the fixture wrote.
    pub fn fixture_stderr(&self) -> String {
        self.frontend
            .as_ref()
            .map(ChildGuard::stderr_tail)
            .unwrap_or_default()
    }

    /// Whether the fixture has exited, and how.
    pub fn fixture_exit(&mut self) -> Result<Option<std::process::ExitStatus>, TapGuestError> {
        match self.frontend.as_mut() {
            Some(f) => Ok(f.try_wait()?),
            None => Ok(None),
        }
    }

    /// Stops the fixture with SIGTERM and returns its final counters (`tx_frames`,
    /// `rx_frames`, drops by reason, ...) and exit status.
    pub fn stop_frontend(
        &mut self,
    ) -> Result<(BTreeMap<String, u64>, std::process::ExitStatus), TapGuestError> {
        let Some(mut f) = self.frontend.take() else {
            return Err(TapGuestError::Output(
                "the fixture was already stopped".into(),
            ));
        };
        let status = f.terminate(Duration::from_secs(10))?;
        // The stderr drain thread needs a moment for the last line.
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let tail = f.stderr_tail();
            if let Some(stats) = parse_stats(&tail) {
                return Ok((stats, status));
            }
            if Instant::now() >= deadline {
                return Err(TapGuestError::Output(format!(
                    "no stats line ({status}):\n{tail}"
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Waits for the fixture's `ready:` line.
fn wait_ready(
    frontend: &mut ChildGuard,
    timeout: Duration,
) -> Result<(u64, String), TapGuestError> {
    let what = "the device to come up (its `ready:` line)";
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(ready) = parse_ready(&frontend.stderr_tail()) {
            return Ok(ready);
        }
        if let Some(status) = frontend.try_wait()? {
            std::thread::sleep(Duration::from_millis(100));
            return Err(ProcessError::Exited {
                name: frontend.name().to_string(),
                status,
                what: what.into(),
                tail: frontend.stderr_tail(),
            }
            .into());
        }
        if Instant::now() >= deadline {
            return Err(ProcessError::Timeout {
                name: frontend.name().to_string(),
                timeout,
                what: what.into(),
                tail: frontend.stderr_tail(),
            }
            .into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The path of the fixture binary next to the running test executable
/// (`target/<profile>/vnp-tap-frontend`), or `VNP_TAP_FRONTEND`.
pub fn default_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("VNP_TAP_FRONTEND") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    dir.join("vnp-tap-frontend")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_are_parsed_from_the_script_log() {
        let l = Lease::parse("bound ip=10.77.0.2 mask=24 router=10.77.0.1 mtu=1452 lease=3600")
            .unwrap();
        assert_eq!(
            l,
            Lease {
                ip: Ipv4Addr::new(10, 77, 0, 2),
                prefix_len: 24,
                router: Ipv4Addr::new(10, 77, 0, 1),
                mtu: 1452
            }
        );
        assert!(Lease::parse("bound ip=10.77.0.2 mask=24 router= mtu=1452").is_none());
    }

    /// The script logs `bound` only after the address and the default route are in place:
    /// [`TapGuest::dhcp`] returns on that line, and a test may connect at once (a `curl`
    /// right after it found no route under load when the line came first). The script runs
    /// in a real shell; an `ip` on its PATH records each call in the events file, in order.
    #[test]
    fn the_lease_is_logged_only_after_it_is_configured() {
        let dir = TempDir::new("vnptg-script-test").unwrap();
        let script = dir.path().join("udhcpc.sh");
        let ip = dir.path().join("ip");
        let events = dir.path().join("events");
        std::fs::write(&script, UDHCPC_SCRIPT).unwrap();
        std::fs::write(&ip, "#!/bin/sh\necho \"ip $*\" >> \"$VNP_EVENTS\"\n").unwrap();
        std::fs::set_permissions(&ip, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = format!(
            "{}:{}",
            dir.path().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let status = Command::new("/bin/sh")
            .arg(&script)
            .arg("bound")
            .env("PATH", path)
            .env("VNP_EVENTS", &events)
            .envs([
                ("interface", "vg0"),
                ("ip", "10.77.0.2"),
                ("mask", "24"),
                ("broadcast", "10.77.0.255"),
                ("router", "10.77.0.1"),
                ("mtu", "1452"),
                ("lease", "3600"),
            ])
            .status()
            .unwrap();
        assert!(status.success());
        let log = std::fs::read_to_string(&events).unwrap();
        let lines: Vec<&str> = log.lines().collect();
        let at = |prefix: &str| {
            lines
                .iter()
                .position(|l| l.starts_with(prefix))
                .unwrap_or_else(|| panic!("no {prefix:?} in:\n{log}"))
        };
        let bound = at("bound ");
        assert_eq!(bound, lines.len() - 1, "bound is the last line:\n{log}");
        assert!(at("ip addr add 10.77.0.2/24") < bound, "{log}");
        assert!(at("ip link set dev vg0 mtu 1452") < bound, "{log}");
        assert!(
            at("ip route replace default via 10.77.0.1 dev vg0") < bound,
            "{log}"
        );
        assert_eq!(Lease::parse(lines[bound]).map(|l| l.mtu), Some(1452));
    }

    #[test]
    fn ready_and_stats_lines_are_parsed() {
        let tail =
            "noise\nvnp-tap-frontend: ready: vg0 on /s.sock, features 0x140008000, offloads none\n";
        assert_eq!(parse_ready(tail), Some((0x1_4000_8000, "none".to_string())));
        assert_eq!(parse_ready("vnp-tap-frontend: reconnected"), None);
        let stats = parse_stats(
            "x\nvnp-tap-frontend: stats tx_frames=5 rx_frames=7\nvnp-tap-frontend: vnpd hung up",
        )
        .unwrap();
        assert_eq!(stats["tx_frames"], 5);
        assert_eq!(stats["rx_frames"], 7);
        assert!(parse_stats("vnp-tap-frontend: stats tx_frames=x").is_none());
    }
}

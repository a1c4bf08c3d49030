//! vnpd's guest edge against real clients: busybox `udhcpc` (the DHCP client of the test
//! guests) and the Linux kernel's own ARP, in a network namespace whose interface is a TAP
//! device served by `vnpd::edge` from this process.
//!
//! Needs root (namespaces, /dev/net/tun) and busybox. Never skips.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vnp_protocol::wire::ethernet::{ethertype, Frame};
use vnp_testkit::netns::Netns;
use vnpd::datapath::frame::{classify, GuestNet, Route, CLASSIFY_PREFIX};
use vnpd::edge::{self, EdgeConfig, EdgeKind, MAX_REPLY_LEN, ROUTER_MAC};

const TAP: &str = "vmtap0";

fn edge_config(lease_secs: u32) -> EdgeConfig {
    EdgeConfig {
        vm_mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
        vm_ip: Ipv4Addr::new(10, 1, 0, 10),
        prefix_len: 24,
        router_ip: Ipv4Addr::new(10, 1, 0, 1),
        router_mac: ROUTER_MAC,
        mtu: 1452,
        hostname: "vm-a".to_string(),
        lease_secs,
        dns: Some(Ipv4Addr::new(10, 1, 0, 53)),
    }
}

/// Opens a TAP device named `name` (no packet-info header) in the calling thread's namespace.
fn open_tap(name: &str) -> std::io::Result<File> {
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    // struct ifreq: ifr_name[16], then ifr_flags (short); 40 bytes in all.
    let mut ifreq = [0u8; 40];
    ifreq[..name.len()].copy_from_slice(name.as_bytes());
    let flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    ifreq[16..18].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq; `ifreq` is 40 bytes, its full size,
    // and outlives the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, ifreq.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file)
}

/// What the edge did while serving the TAP.
#[derive(Debug, Default)]
struct EdgeLog {
    arp_replies: AtomicU64,
    dhcp_replies: AtomicU64,
    drops: AtomicU64,
    ipv4_frames: AtomicU64,
}

/// Serves the TAP with `vnpd::edge` (the guest side of vnpd, minus the virtio rings) until
/// dropped.
struct EdgeServer {
    stop: Arc<AtomicBool>,
    log: Arc<EdgeLog>,
    thread: Option<JoinHandle<()>>,
}

impl EdgeServer {
    fn start(mut tap: File, cfg: EdgeConfig) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(EdgeLog::default());
        let thread = {
            let (stop, log) = (Arc::clone(&stop), Arc::clone(&log));
            std::thread::spawn(move || {
                let mut frame = [0u8; 2048];
                let mut reply = [0u8; MAX_REPLY_LEN];
                while !stop.load(Ordering::Relaxed) {
                    let mut pfd = libc::pollfd {
                        fd: tap.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd, for the duration of the call.
                    let ready = unsafe { libc::poll(&mut pfd, 1, 100) };
                    if ready <= 0 {
                        continue;
                    }
                    let Ok(len) = tap.read(&mut frame) else {
                        break;
                    };
                    let frame = &frame[..len];
                    // vnpd's one classification decides what the edge answers.
                    let net = GuestNet {
                        vm_ip: cfg.vm_ip,
                        prefix_len: cfg.prefix_len,
                        router_ip: cfg.router_ip,
                        mtu: cfg.mtu,
                    };
                    let prefix = &frame[..len.min(CLASSIFY_PREFIX)];
                    match classify(&net, prefix, len) {
                        Ok(Route::Edge(kind @ (EdgeKind::Arp | EdgeKind::Dhcp))) => {
                            match edge::respond(&cfg, kind, frame, &mut reply) {
                                Ok(Some(n)) => {
                                    let is_arp = Frame::new_checked(&reply[..n])
                                        .is_ok_and(|f| f.ethertype() == ethertype::ARP);
                                    let counter = if is_arp {
                                        &log.arp_replies
                                    } else {
                                        &log.dhcp_replies
                                    };
                                    counter.fetch_add(1, Ordering::Relaxed);
                                    tap.write_all(&reply[..n]).expect("write reply to TAP");
                                }
                                Ok(None) => {}
                                Err(_) => {
                                    log.drops.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                        Ok(Route::Tunnel { .. }) => {
                            log.ipv4_frames.fetch_add(1, Ordering::Relaxed);
                        }
                        // IPv6 router solicitations and the like; ICMP is not this test's.
                        Ok(Route::Edge(_)) | Err(_) => {}
                    }
                }
            })
        };
        EdgeServer {
            stop,
            log,
            thread: Some(thread),
        }
    }
}

impl Drop for EdgeServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A namespace with a TAP served by the edge, and a udhcpc script logging its events.
struct Guest {
    server: EdgeServer,
    script: PathBuf,
    events: PathBuf,
    // Dropped last: deleting the namespace kills what still runs in it.
    ns: Netns,
}

impl Guest {
    fn new(cfg: EdgeConfig) -> Guest {
        let ns = Netns::create("vnpedge").expect("create netns");
        let tap = ns
            .enter(|| open_tap(TAP))
            .expect("enter netns")
            .expect("open TAP");
        let mac = cfg
            .vm_mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        ns.ip(&["link", "set", "dev", TAP, "address", &mac])
            .unwrap();
        ns.ip(&["link", "set", "dev", TAP, "up"]).unwrap();
        let tag = format!("{}-{}", std::process::id(), ns.name());
        let events = std::env::temp_dir().join(format!("vnp-udhcpc-{tag}.log"));
        let script = std::env::temp_dir().join(format!("vnp-udhcpc-{tag}.sh"));
        // Like the test guests' script: log the event, configure address, route and MTU.
        std::fs::write(
            &script,
            format!(
                r#"#!/bin/sh
echo "$1 ip=$ip mask=$mask subnet=$subnet router=$router mtu=$mtu hostname=$hostname dns=$dns lease=$lease serverid=$serverid broadcast=$broadcast" >> {events}
case "$1" in
bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/$mask" broadcast "$broadcast" dev "$interface"
    ip link set dev "$interface" mtu "$mtu"
    ip route add default via "$router" dev "$interface"
    ;;
esac
exit 0
"#,
                events = events.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let server = EdgeServer::start(tap, cfg);
        Guest {
            server,
            script,
            events,
            ns,
        }
    }

    fn udhcpc(&self, extra: &[&str]) -> Child {
        let script = self.script.to_str().unwrap();
        self.ns
            .command("busybox")
            .args([
                "udhcpc", "-f", "-i", TAP, "-s", script, "-t", "5", "-T", "1",
            ])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start busybox udhcpc")
    }

    fn events(&self) -> String {
        std::fs::read_to_string(&self.events).unwrap_or_default()
    }

    fn wait_for_event(&self, event: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.events().lines().any(|l| l.starts_with(event)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.script);
        let _ = std::fs::remove_file(&self.events);
    }
}

/// Kills a child on drop (udhcpc runs until told otherwise).
struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "udhcpc did not finish in {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

const EXPECTED_BOUND: &str = "bound ip=10.1.0.10 mask=24 subnet=255.255.255.0 router=10.1.0.1 \
mtu=1452 hostname=vm-a dns=10.1.0.53 lease=3600 serverid=10.1.0.1 broadcast=10.1.0.255";

#[test]
fn udhcpc_configures_the_guest_and_the_kernel_resolves_the_router() {
    let guest = Guest::new(edge_config(3600));
    // -q: exit once bound; -n: fail if no lease; -a: probe the offered address with ARP first
    // (the edge must stay silent for the VM's own address or udhcpc declines it).
    let mut udhcpc = Kill(guest.udhcpc(&["-q", "-n", "-a"]));
    let status = wait_exit(&mut udhcpc.0, Duration::from_secs(30));
    let mut stderr = String::new();
    if let Some(mut e) = udhcpc.0.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    assert!(
        status.success(),
        "udhcpc failed: {status}\n{stderr}\nevents:\n{}",
        guest.events()
    );
    let events = guest.events();
    assert!(
        events.lines().any(|l| l == EXPECTED_BOUND),
        "expected {EXPECTED_BOUND:?} in\n{events}"
    );
    let addr = guest.ns.ip(&["addr", "show", "dev", TAP]).unwrap();
    assert!(addr.contains("inet 10.1.0.10/24"), "{addr}");
    assert!(addr.contains("mtu 1452"), "{addr}");
    assert!(
        guest.server.log.dhcp_replies.load(Ordering::Relaxed) >= 2,
        "OFFER and ACK"
    );

    // The kernel's ARP: any address on or off the subnet resolves to the router MAC.
    for target in ["10.1.0.1", "10.1.0.77"] {
        let out = guest
            .ns
            .command("busybox")
            .args(["arping", "-c", "1", "-w", "3", "-I", TAP, target])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_lowercase();
        assert!(out.status.success(), "arping {target}: {text}");
        assert!(
            text.contains("02:00:76:6e:70:01"),
            "arping {target}: {text}"
        );
    }
    // Traffic beyond the subnet goes to the router: ping an outside address and check that the
    // kernel resolved the gateway and handed the packet to the edge as IPv4.
    let _ = guest
        .ns
        .command("ping")
        .args(["-c", "1", "-W", "1", "203.0.113.9"])
        .output();
    let neigh = guest.ns.ip(&["neigh", "show", "dev", TAP]).unwrap();
    assert!(
        neigh.contains("10.1.0.1 lladdr 02:00:76:6e:70:01"),
        "{neigh}"
    );
    assert!(guest.server.log.ipv4_frames.load(Ordering::Relaxed) >= 1);
    assert!(guest.server.log.arp_replies.load(Ordering::Relaxed) >= 3);
    assert_eq!(guest.server.log.drops.load(Ordering::Relaxed), 0);
}

#[test]
fn the_registry_address_wins_and_leases_renew_by_unicast() {
    // A 4 s lease: udhcpc renews after 2 s with a unicast REQUEST from its configured address,
    // which the kernel can only send after resolving the server (router) by ARP.
    let guest = Guest::new(edge_config(4));
    // -r: the client asks for another address; it gets the VM's.
    let _udhcpc = Kill(guest.udhcpc(&["-r", "10.1.0.99"]));
    assert!(
        guest.wait_for_event("bound", Duration::from_secs(30)),
        "never bound:\n{}",
        guest.events()
    );
    assert!(
        guest.wait_for_event("renew", Duration::from_secs(20)),
        "never renewed:\n{}",
        guest.events()
    );
    let events = guest.events();
    for line in events
        .lines()
        .filter(|l| l.starts_with("bound") || l.starts_with("renew"))
    {
        assert!(line.contains(" ip=10.1.0.10 "), "{line}");
        assert!(line.contains(" lease=4 "), "{line}");
    }
    assert!(
        guest.server.log.dhcp_replies.load(Ordering::Relaxed) >= 3,
        "OFFER, ACK, renewal ACK"
    );
    assert!(
        guest.server.log.arp_replies.load(Ordering::Relaxed) >= 1,
        "server resolved by ARP"
    );
    assert_eq!(guest.server.log.drops.load(Ordering::Relaxed), 0);
}

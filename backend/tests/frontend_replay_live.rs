//! Keeps the replayed conversations (`replay_frontend::conversations`) true to the frontends
//! installed here: a real QEMU 10 guest (boot, then a vnpd restart) and a real `dpdk-testpmd`
//! virtio-user port talk to vnpd, the relay's debug log records every message they send, and the
//! record must equal the replayed sequence message by message (request, ring, `NEED_REPLY`).
//!
//! Needs root, QEMU 10 and the test guest (`scripts/setup`, `scripts/build-guest`), DPDK and
//! hugepages. Never skips itself.

mod dataplane_common;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use dataplane_common::*;
use qemu_launch::{Guest, GuestSpec, MacAddr, NetStatus};
use vnp_testkit::testpmd::{ForwardMode, TestPmd, TestPmdSpec};
use vnpd::datapath::VmPort;

// Its `FileExt` re-export serves other tests.
#[allow(unused_imports)]
mod dataplane_frontend;
mod replay_frontend;

use replay_frontend::conversations as conv;
use replay_frontend::Msg;

/// One frontend message as the relay logged it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    request: String,
    ring: Option<u32>,
    need_reply: bool,
}

/// Collects the relay's "frontend ->" lines, per VM label.
struct RelayLog {
    lines: Mutex<Vec<(String, Seen)>>,
}

impl log::Log for RelayLog {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.target() == "vnpd::device::frontend_relay"
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let text = record.args().to_string();
        if let Some(entry) = parse(&text) {
            self.lines.lock().unwrap().push(entry);
        }
    }

    fn flush(&self) {}
}

/// `vm LABEL: frontend -> NAME flags=0x9 size=8 fds=0 value=0x100000001`.
fn parse(line: &str) -> Option<(String, Seen)> {
    let (label, rest) = line.strip_prefix("vm ")?.split_once(": frontend -> ")?;
    let mut words = rest.split_whitespace();
    let request = words.next()?.to_string();
    let field = |name: &str| {
        rest.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .and_then(|v| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok())
    };
    let flags = field("flags=")?;
    let size = rest
        .split_whitespace()
        .find_map(|w| w.strip_prefix("size="))?
        .parse::<u32>()
        .ok()?;
    let ring = if request.starts_with("SET_VRING") || request == "GET_VRING_BASE" {
        // Ring messages with an 8-byte payload carry the ring in the low word; SET_VRING_ADDR
        // (40 bytes) is logged without a value.
        match size {
            8 => field("value=").map(|v| (v & 0xff) as u32),
            _ => None,
        }
    } else {
        None
    };
    let seen = Seen {
        request,
        ring,
        need_reply: flags & 0x8 != 0,
    };
    Some((label.to_string(), seen))
}

fn relay_log() -> &'static RelayLog {
    static LOG: OnceLock<&'static RelayLog> = OnceLock::new();
    LOG.get_or_init(|| {
        let log: &'static RelayLog = Box::leak(Box::new(RelayLog {
            lines: Mutex::new(Vec::new()),
        }));
        log::set_logger(log).expect("the only logger of this test binary");
        log::set_max_level(log::LevelFilter::Debug);
        log
    })
}

/// Takes what was logged for `label` so far.
fn take(label: &str) -> Vec<Seen> {
    let mut lines = relay_log().lines.lock().unwrap();
    let (mine, rest): (Vec<_>, Vec<_>) = lines.drain(..).partition(|(l, _)| l == label);
    *lines = rest;
    mine.into_iter().map(|(_, s)| s).collect()
}

/// Waits until `label` has logged `n` messages, then takes them.
fn take_when(label: &str, n: usize, timeout: Duration) -> Vec<Seen> {
    let start = Instant::now();
    loop {
        let count = relay_log()
            .lines
            .lock()
            .unwrap()
            .iter()
            .filter(|(l, _)| l == label)
            .count();
        if count >= n || start.elapsed() > timeout {
            return take(label);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn expected(conversation: &[Msg]) -> Vec<Seen> {
    conversation
        .iter()
        .map(|m| Seen {
            request: format!("{:?}", m.step.request()),
            ring: m
                .step
                .ring()
                .filter(|_| !matches!(m.step, replay_frontend::Step::SetVringAddr(_))),
            need_reply: m.need_reply,
        })
        .collect()
}

fn assert_same(what: &str, seen: &[Seen], conversation: &[Msg]) {
    let want = expected(conversation);
    for (i, (s, w)) in seen.iter().zip(&want).enumerate() {
        assert_eq!(s, w, "{what}: message {i} differs\nseen: {seen:#?}");
    }
    assert_eq!(seen.len(), want.len(), "{what}: length\nseen: {seen:#?}");
}

#[test]
fn a_real_qemu_10_says_what_the_replay_says_at_boot_and_after_a_vnpd_restart() {
    relay_log();
    let control = MintingControl::new();
    let (att, secret) = vm("lq", 2, 0x4c, 1);
    let (ip, mac, socket, label) = (
        att.vm_ip,
        att.mac,
        att.socket_path.clone(),
        att.vm_id.clone(),
    );
    let port = Arc::new(VmPort::start(att, control.clone()).expect("port"));
    let udp_port = port.udp_addr().port();
    control.register(&port, ip, &secret);
    let mut spec = GuestSpec::new("replay-live", MacAddr(mac));
    spec.vhost_user_socket = Some(socket.clone());
    spec.queue_pairs = 1;
    let mut guest = Guest::launch(spec).expect("launch guest");
    guest
        .wait_ready(Duration::from_secs(180))
        .expect("guest ready");
    let status = guest
        .wait_network(Duration::from_secs(90))
        .expect("network");
    assert!(matches!(status, NetStatus::Bound { .. }), "{status:?}");
    assert_same("QEMU boot", &take(&label), &conv::qemu_boot());

    // vnpd restarts: same socket, same UDP port; QEMU reconnects on its own.
    match Arc::try_unwrap(port) {
        Ok(port) => port.stop(),
        Err(_) => panic!("only the test holds the port"),
    }
    let (mut att, _) = vm("lq", 2, 0x4c, 1);
    att.socket_path = socket;
    att.udp_port = udp_port;
    let port = Arc::new(VmPort::start(att, control.clone()).expect("port again"));
    control.register(&port, ip, &secret);
    let reconnect = conv::qemu_reconnect();
    let seen = take_when(&label, reconnect.len(), Duration::from_secs(60));
    assert_same("QEMU reconnect", &seen, &reconnect);
    let out = guest
        .run(
            "udhcpc -n -q -i eth0 2>&1 | tail -1",
            Duration::from_secs(60),
        )
        .expect("udhcpc");
    assert!(out.stdout.contains("obtained"), "{}", out.stdout);
}

#[test]
fn a_real_dpdk_virtio_user_says_what_the_replay_says() {
    relay_log();
    let control = MintingControl::new();
    let (att, secret) = vm("ld", 3, 0x4d, 1);
    let (ip, mac, socket, label) = (
        att.vm_ip,
        att.mac,
        att.socket_path.clone(),
        att.vm_id.clone(),
    );
    let port = Arc::new(VmPort::start(att, control.clone()).expect("port"));
    control.register(&port, ip, &secret);
    let mut spec = TestPmdSpec::virtio_user(&socket);
    spec.mode = ForwardMode::RxOnly;
    spec.mac = Some(mac);
    let mut pmd = TestPmd::launch(spec).expect("launch testpmd");
    pmd.wait_link_up(0, Duration::from_secs(30))
        .expect("link up");
    pmd.start().expect("start");
    pmd.stop().expect("stop");
    pmd.quit(Duration::from_secs(30)).expect("quit");
    let whole: Vec<Msg> = [conv::dpdk_start(), conv::dpdk_stop()].concat();
    let seen = take_when(&label, whole.len(), Duration::from_secs(30));
    assert_same("DPDK", &seen, &whole);
}

//! The resume notice (`docs/protocol.md`, "Live migration: the resume notice"): when a
//! migrated VM resumes on the destination, the destination vnpd tells the source vnpd at
//! once, with one UDP datagram authenticated by the VM's secret, so that the source starts
//! forwarding (hairpinning) the VM's stragglers without waiting for the registry's commit of
//! the new endpoint and its watch.
//!
//! Only the source and the destination hold the VM's secret (the registry gives it to the
//! VM's host and to the host it migrates to), so a valid MAC means "the VM's other host says
//! the VM runs at this endpoint now". Replays cannot move anything: the notice names the
//! source's endpoint record by its generation, which the source bumps whenever the VM is
//! registered with it again (a migration back), so a recorded notice never matches a later
//! stay of the VM on the source; within one generation it can only repeat the same hairpin to
//! the same destination. A notice whose clock is more than [`MAX_SKEW_MS`] away is refused too.
//!
//! Everything here is pure: the bytes, the MAC and the decision. The socket is in
//! [`super::notice_listener`].

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::datapath::hairpin::HairpinTarget;

/// First bytes of a notice.
pub const MAGIC: [u8; 4] = *b"VNPR";
/// The one version.
pub const VERSION: u8 = 1;
/// Longest VM id (as in the registry and the state hand-off).
pub const MAX_VM_ID: usize = 64;
/// Bytes of the MAC.
pub const MAC_LEN: usize = 32;
/// Bytes of the nonce.
pub const NONCE_LEN: usize = 8;
/// Bytes after the VM id and before the MAC: source endpoint and generation, destination
/// endpoint, clock, nonce.
const FIXED_TAIL: usize = 4 + 2 + 8 + 4 + 2 + 8 + NONCE_LEN;
/// Longest notice.
pub const MAX_LEN: usize = 6 + MAX_VM_ID + FIXED_TAIL + MAC_LEN;
/// A notice whose clock is further than this from the receiver's is refused (hosts run NTP;
/// a notice is acted on within milliseconds of being sent).
pub const MAX_SKEW_MS: u64 = 30_000;
/// Domain separation of the MAC from every other use of the VM's secret.
const LABEL: &[u8] = b"vnp resume notice v1";

/// "VM `vm_id`, whose endpoint record `from_generation` named `from`, runs at `to` now."
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumeNotice {
    /// The VM's registry id.
    pub vm_id: String,
    /// The source endpoint, as the registry named it when the destination attached the VM.
    pub from: SocketAddrV4,
    /// The generation of that endpoint record.
    pub from_generation: u64,
    /// The VM's endpoint on the destination.
    pub to: SocketAddrV4,
    /// The destination's clock, Unix milliseconds.
    pub unix_ms: u64,
    /// Random: no two notices are alike.
    pub nonce: [u8; NONCE_LEN],
}

/// Why a datagram was not acted on (each counted:
/// `vnpd_resume_notice_total{result}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not a notice: bad magic, version, length or VM id.
    Malformed,
    /// Names a VM not served here.
    UnknownVm,
    /// The MAC is not the VM's.
    BadMac,
    /// Its clock is more than [`MAX_SKEW_MS`] away.
    Stale,
    /// Names another source endpoint or an endpoint generation this host does not (or no
    /// longer) hold for the VM: a replay, or a notice for an older stay.
    OtherGeneration,
    /// Its destination is this very port.
    ToSelf,
}

impl Refusal {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Malformed => "malformed",
            Refusal::UnknownVm => "unknown_vm",
            Refusal::BadMac => "bad_mac",
            Refusal::Stale => "stale",
            Refusal::OtherGeneration => "other_generation",
            Refusal::ToSelf => "to_self",
        }
    }
}

fn body(n: &ResumeNotice) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAX_LEN);
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(n.vm_id.len() as u8);
    out.extend_from_slice(n.vm_id.as_bytes());
    out.extend_from_slice(&n.from.ip().octets());
    out.extend_from_slice(&n.from.port().to_be_bytes());
    out.extend_from_slice(&n.from_generation.to_be_bytes());
    out.extend_from_slice(&n.to.ip().octets());
    out.extend_from_slice(&n.to.port().to_be_bytes());
    out.extend_from_slice(&n.unix_ms.to_be_bytes());
    out.extend_from_slice(&n.nonce);
    out
}

fn mac(secret: &[u8], body: &[u8]) -> Hmac<Sha256> {
    // HMAC takes keys of any length: `new_from_slice` cannot fail for it.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC accepts any key length");
    m.update(LABEL);
    m.update(body);
    m
}

impl ResumeNotice {
    /// The datagram, MACed with the VM's `secret`; `None` for a VM id outside 1..=64 bytes.
    pub fn encode(&self, secret: &[u8]) -> Option<Vec<u8>> {
        if self.vm_id.is_empty() || self.vm_id.len() > MAX_VM_ID {
            return None;
        }
        let mut out = body(self);
        let tag = mac(secret, &out).finalize().into_bytes();
        out.extend_from_slice(&tag);
        Some(out)
    }
}

/// A notice as read, its MAC not checked yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// What it says.
    pub notice: ResumeNotice,
    mac: [u8; MAC_LEN],
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

fn ip_at(b: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3])
}

/// Reads a datagram: exactly one notice, nothing after its MAC.
pub fn decode(bytes: &[u8]) -> Result<Received, Refusal> {
    if bytes.len() < 6 || bytes[..4] != MAGIC || bytes[4] != VERSION {
        return Err(Refusal::Malformed);
    }
    let n = usize::from(bytes[5]);
    if n == 0 || n > MAX_VM_ID || bytes.len() != 6 + n + FIXED_TAIL + MAC_LEN {
        return Err(Refusal::Malformed);
    }
    let vm_id = std::str::from_utf8(&bytes[6..6 + n]).map_err(|_| Refusal::Malformed)?;
    let t = 6 + n;
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&bytes[t + 28..t + 28 + NONCE_LEN]);
    let mut tag = [0u8; MAC_LEN];
    tag.copy_from_slice(&bytes[t + FIXED_TAIL..]);
    Ok(Received {
        notice: ResumeNotice {
            vm_id: vm_id.to_string(),
            from: SocketAddrV4::new(ip_at(bytes, t), u16_at(bytes, t + 4)),
            from_generation: u64_at(bytes, t + 6),
            to: SocketAddrV4::new(ip_at(bytes, t + 14), u16_at(bytes, t + 18)),
            unix_ms: u64_at(bytes, t + 20),
            nonce,
        },
        mac: tag,
    })
}

/// What the source knows of a VM it serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Served {
    /// The VM's port here.
    pub local: SocketAddrV4,
    /// The generation of the endpoint record this host registered for it (`None` while an
    /// incoming VM's registration is on its way: such a port is no source yet).
    pub generation: Option<u64>,
}

/// Decides on a received notice for a VM served here with `secret`: the hairpin to start, or
/// why not. The MAC is compared in constant time. Pure.
pub fn judge(
    received: &Received,
    secret: &[u8],
    served: Served,
    now_unix_ms: u64,
) -> Result<HairpinTarget, Refusal> {
    let n = &received.notice;
    mac(secret, &body(n))
        .verify_slice(&received.mac)
        .map_err(|_| Refusal::BadMac)?;
    if n.unix_ms.abs_diff(now_unix_ms) > MAX_SKEW_MS {
        return Err(Refusal::Stale);
    }
    if n.from != served.local || served.generation != Some(n.from_generation) {
        return Err(Refusal::OtherGeneration);
    }
    if n.to == served.local {
        return Err(Refusal::ToSelf);
    }
    Ok(HairpinTarget {
        to: n.to,
        generation: n.from_generation,
    })
}

/// Outcomes of received notices, by result (`vnpd_resume_notice_total{result}`), and notices
/// sent.
#[derive(Debug, Default)]
pub struct NoticeCounters {
    sent: AtomicU64,
    accepted: AtomicU64,
    refused: [AtomicU64; 6],
}

const REFUSALS: [Refusal; 6] = [
    Refusal::Malformed,
    Refusal::UnknownVm,
    Refusal::BadMac,
    Refusal::Stale,
    Refusal::OtherGeneration,
    Refusal::ToSelf,
];

/// This process's notice counters.
pub static COUNTERS: NoticeCounters = NoticeCounters {
    sent: AtomicU64::new(0),
    accepted: AtomicU64::new(0),
    refused: [const { AtomicU64::new(0) }; 6],
};

impl NoticeCounters {
    /// A notice went out.
    pub fn sent(&self) {
        self.sent.fetch_add(1, Ordering::Relaxed);
    }

    /// A notice started (or confirmed) a hairpin.
    pub fn accepted(&self) {
        self.accepted.fetch_add(1, Ordering::Relaxed);
    }

    /// A datagram was dropped for `why`.
    pub fn refused(&self, why: Refusal) {
        let i = REFUSALS.iter().position(|r| *r == why).unwrap_or(0);
        self.refused[i].fetch_add(1, Ordering::Relaxed);
    }

    /// `(result, count)` pairs: `sent`, `accepted` and each refusal's label.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut v = vec![("sent", g(&self.sent)), ("accepted", g(&self.accepted))];
        v.extend(
            REFUSALS
                .iter()
                .zip(&self.refused)
                .map(|(r, c)| (r.label(), g(c))),
        );
        v
    }

    /// The Prometheus text of these counters.
    pub fn render(&self) -> String {
        let mut out = String::from(
            "# HELP vnpd_resume_notice_total Live-migration resume notices sent and received, \
             by result.\n# TYPE vnpd_resume_notice_total counter\n",
        );
        for (result, n) in self.snapshot() {
            out.push_str(&format!(
                "vnpd_resume_notice_total{{result=\"{result}\"}} {n}\n"
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: [u8; 32] = [0x42; 32];
    const NOW: u64 = 1_800_000_000_000;

    fn ep(host: u8, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, host), port)
    }

    fn notice() -> ResumeNotice {
        ResumeNotice {
            vm_id: "vm-a".into(),
            from: ep(1, 40001),
            from_generation: 17,
            to: ep(2, 40100),
            unix_ms: NOW,
            nonce: [9; NONCE_LEN],
        }
    }

    fn served() -> Served {
        Served {
            local: ep(1, 40001),
            generation: Some(17),
        }
    }

    fn judged(bytes: &[u8], secret: &[u8], s: Served, now: u64) -> Result<HairpinTarget, Refusal> {
        judge(&decode(bytes)?, secret, s, now)
    }

    #[test]
    fn a_notice_round_trips_and_starts_the_hairpin_to_its_destination() {
        let bytes = notice().encode(&SECRET).unwrap();
        assert_eq!(bytes.len(), 6 + 4 + FIXED_TAIL + MAC_LEN);
        assert_eq!(&bytes[..4], b"VNPR");
        assert_eq!(decode(&bytes).unwrap().notice, notice());
        assert_eq!(
            judged(&bytes, &SECRET, served(), NOW + 5),
            Ok(HairpinTarget {
                to: ep(2, 40100),
                generation: 17
            })
        );
    }

    #[test]
    fn the_layout_is_fixed() {
        let bytes = notice().encode(&SECRET).unwrap();
        let t = 10;
        assert_eq!(&bytes[4..6], &[1, 4]);
        assert_eq!(&bytes[6..t], b"vm-a");
        assert_eq!(&bytes[t..t + 6], &[198, 18, 0, 1, 0x9c, 0x41]);
        assert_eq!(&bytes[t + 6..t + 14], &17u64.to_be_bytes());
        assert_eq!(&bytes[t + 14..t + 20], &[198, 18, 0, 2, 0x9c, 0xa4]);
        assert_eq!(&bytes[t + 20..t + 28], &NOW.to_be_bytes());
        assert_eq!(&bytes[t + 28..t + 36], &[9; 8]);
        let expect = mac(&SECRET, &bytes[..t + 36]).finalize().into_bytes();
        assert_eq!(&bytes[t + 36..], &expect[..]);
    }

    #[test]
    fn another_key_or_any_changed_byte_fails_the_mac() {
        let bytes = notice().encode(&SECRET).unwrap();
        assert_eq!(
            judged(&bytes, &[0x43; 32], served(), NOW),
            Err(Refusal::BadMac)
        );
        for i in 6..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x01;
            let got = judged(&b, &SECRET, served(), NOW);
            assert!(
                matches!(got, Err(Refusal::BadMac | Refusal::Malformed)),
                "byte {i}: {got:?}"
            );
        }
    }

    #[test]
    fn a_replay_for_another_stay_or_an_old_clock_moves_nothing() {
        let bytes = notice().encode(&SECRET).unwrap();
        // The VM came back and was registered here again: a newer generation.
        let back = Served {
            generation: Some(23),
            ..served()
        };
        assert_eq!(
            judged(&bytes, &SECRET, back, NOW),
            Err(Refusal::OtherGeneration)
        );
        // Served here on another port, or an incoming port not registered yet.
        let other_port = Served {
            local: ep(1, 40002),
            ..served()
        };
        assert_eq!(
            judged(&bytes, &SECRET, other_port, NOW),
            Err(Refusal::OtherGeneration)
        );
        let unregistered = Served {
            generation: None,
            ..served()
        };
        assert_eq!(
            judged(&bytes, &SECRET, unregistered, NOW),
            Err(Refusal::OtherGeneration)
        );
        assert_eq!(
            judged(&bytes, &SECRET, served(), NOW + MAX_SKEW_MS + 1),
            Err(Refusal::Stale)
        );
        assert_eq!(
            judged(&bytes, &SECRET, served(), NOW - MAX_SKEW_MS - 1),
            Err(Refusal::Stale)
        );
        assert!(judged(&bytes, &SECRET, served(), NOW + MAX_SKEW_MS).is_ok());
    }

    #[test]
    fn a_notice_to_the_source_itself_is_refused() {
        let mut n = notice();
        n.to = n.from;
        let bytes = n.encode(&SECRET).unwrap();
        assert_eq!(judged(&bytes, &SECRET, served(), NOW), Err(Refusal::ToSelf));
    }

    #[test]
    fn malformed_datagrams_are_refused_without_panicking() {
        let bytes = notice().encode(&SECRET).unwrap();
        for len in 0..bytes.len() {
            assert_eq!(decode(&bytes[..len]), Err(Refusal::Malformed), "len {len}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(decode(&longer), Err(Refusal::Malformed));
        for (at, value) in [(0, b'X'), (4, 2), (5, 0), (5, 65), (5, 5)] {
            let mut b = bytes.clone();
            b[at] = value;
            assert_eq!(decode(&b), Err(Refusal::Malformed), "byte {at} = {value}");
        }
        let mut not_utf8 = bytes.clone();
        not_utf8[6] = 0xff;
        assert_eq!(decode(&not_utf8), Err(Refusal::Malformed));
        let mut n = notice();
        n.vm_id = String::new();
        assert!(n.encode(&SECRET).is_none());
        n.vm_id = "x".repeat(65);
        assert!(n.encode(&SECRET).is_none());
        n.vm_id = "x".repeat(64);
        assert_eq!(n.encode(&SECRET).unwrap().len(), MAX_LEN);
    }

    #[test]
    fn counters_render_every_result() {
        let c = NoticeCounters::default();
        c.sent();
        c.accepted();
        c.refused(Refusal::BadMac);
        c.refused(Refusal::BadMac);
        let text = c.render();
        assert!(text.contains("vnpd_resume_notice_total{result=\"sent\"} 1\n"));
        assert!(text.contains("vnpd_resume_notice_total{result=\"bad_mac\"} 2\n"));
        assert!(text.contains("vnpd_resume_notice_total{result=\"other_generation\"} 0\n"));
    }
}

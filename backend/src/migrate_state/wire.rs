//! The hand-off's bytes, pure (no I/O, no clock: the caller passes the time): the state blob
//! ([`VmState`], [`encode`], [`decode`]) and the request/response framing that authenticates
//! it with the VM's secret. Everything decoded here came from the network: versioned, every
//! count bounded before anything is allocated, every field checked, no trailing bytes.
//!
//! Blob (big-endian):
//!
//! | bytes | field |
//! |---|---|
//! | 4 | magic `VNPM` |
//! | 1 | version (1) |
//! | 1 | VM id length n (1..=[`MAX_VM_ID`]) |
//! | n | VM id (UTF-8) |
//! | 4 | flow count (..=[`MAX_FLOWS`]) |
//! | 2 | session count (..=[`MAX_SESSIONS`]) |
//! | 17 each | flow: proto, state, has-mapped, mapped port, guest port, remote address (4), remote port, remaining seconds (4) |
//! | 36 each | session: SHA-256 of the token (32), remaining milliseconds (4) |

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::net::Ipv4Addr;

use crate::bridge::session::{SessionDigest, MAX_SESSIONS, MAX_TTL_SECS};
use crate::nat::table::MAX_INBOUND_FLOWS;
use crate::nat::{FlowKey, FlowState, MovedFlow, Proto};

/// Blob magic.
pub const BLOB_MAGIC: [u8; 4] = *b"VNPM";
/// Request magic.
pub const REQUEST_MAGIC: [u8; 4] = *b"VNPQ";
/// The one version this vnpd writes and reads.
pub const VERSION: u8 = 1;
/// Longest VM id (the registry's ids are shorter).
pub const MAX_VM_ID: usize = 64;
/// Most flows in one blob: every port of the three port spaces plus the inbound flows.
pub const MAX_FLOWS: usize = 3 * 65535 + MAX_INBOUND_FLOWS;
/// Bytes of one flow record.
pub const FLOW_LEN: usize = 17;
/// Bytes of one session record.
pub const SESSION_LEN: usize = 36;
/// Largest blob ([`MAX_FLOWS`] and [`MAX_SESSIONS`] with the longest id): what a reader
/// accepts at most.
pub const MAX_BLOB: usize =
    4 + 1 + 1 + MAX_VM_ID + 4 + 2 + MAX_FLOWS * FLOW_LEN + MAX_SESSIONS * SESSION_LEN;
/// Bytes of the request nonce.
pub const NONCE_LEN: usize = 16;
/// Bytes of a MAC (HMAC-SHA256, untruncated).
pub const MAC_LEN: usize = 32;
/// Longest request.
pub const MAX_REQUEST: usize = 4 + 1 + 1 + MAX_VM_ID + 8 + NONCE_LEN + MAC_LEN;
/// How far a request's time may be from the source's clock (seconds).
pub const REQUEST_SKEW_SECS: u64 = 60;

const REQUEST_LABEL: &[u8] = b"vnp migration state request v1";
const RESPONSE_LABEL: &[u8] = b"vnp migration state response v1";

/// One metadata session: the token's digest (the token itself never leaves the host that
/// issued it) and the time it has left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionRecord {
    /// SHA-256 of the token.
    pub digest: SessionDigest,
    /// Milliseconds until it expires (1..=6 h).
    pub remaining_ms: u32,
}

/// The state that moves with one VM.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmState {
    /// Registry id of the VM.
    pub vm_id: String,
    /// Its live NAT flows.
    pub flows: Vec<MovedFlow>,
    /// Its live metadata sessions.
    pub sessions: Vec<SessionRecord>,
}

/// Why bytes were refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Shorter than its header or its counts say.
    #[error("truncated")]
    Truncated,
    /// Longer than its counts say.
    #[error("trailing bytes")]
    Trailing,
    /// Not this format.
    #[error("bad magic")]
    Magic,
    /// A version this vnpd does not read.
    #[error("unsupported version {0}")]
    Version(u8),
    /// VM id empty, too long or not UTF-8.
    #[error("bad vm id")]
    VmId,
    /// More flows or sessions than a VM can have.
    #[error("too many records")]
    TooMany,
    /// A flow record with an unknown protocol or state, a state of another protocol, a
    /// mapped port 0, or a timer outside its state's timeout.
    #[error("bad flow record {0}")]
    Flow(usize),
    /// A session whose remaining time is 0 or longer than the longest session.
    #[error("bad session record {0}")]
    Session(usize),
}

fn state_code(s: FlowState) -> u8 {
    match s {
        FlowState::TcpHandshake => 0,
        FlowState::TcpEstablished => 1,
        FlowState::TcpHalfClosed { from_opener: true } => 2,
        FlowState::TcpHalfClosed { from_opener: false } => 3,
        FlowState::TcpClosed => 4,
        FlowState::Udp => 5,
        FlowState::Icmp => 6,
    }
}

fn state_of(code: u8, proto: Proto) -> Option<FlowState> {
    let s = match code {
        0 => FlowState::TcpHandshake,
        1 => FlowState::TcpEstablished,
        2 => FlowState::TcpHalfClosed { from_opener: true },
        3 => FlowState::TcpHalfClosed { from_opener: false },
        4 => FlowState::TcpClosed,
        5 => FlowState::Udp,
        6 => FlowState::Icmp,
        _ => return None,
    };
    let fits = match s {
        FlowState::Udp => proto == Proto::Udp,
        FlowState::Icmp => proto == Proto::Icmp,
        _ => proto == Proto::Tcp,
    };
    fits.then_some(s)
}

/// The blob of `state`. Counts beyond the format's bounds are cut (never the case for a real
/// VM's tables, which are bounded the same way).
pub fn encode(state: &VmState) -> Vec<u8> {
    let id = state.vm_id.as_bytes();
    let id = &id[..id.len().min(MAX_VM_ID)];
    let flows = &state.flows[..state.flows.len().min(MAX_FLOWS)];
    let sessions = &state.sessions[..state.sessions.len().min(MAX_SESSIONS)];
    let mut out =
        Vec::with_capacity(12 + id.len() + flows.len() * FLOW_LEN + sessions.len() * SESSION_LEN);
    out.extend_from_slice(&BLOB_MAGIC);
    out.push(VERSION);
    out.push(id.len() as u8);
    out.extend_from_slice(id);
    out.extend_from_slice(&(flows.len() as u32).to_be_bytes());
    out.extend_from_slice(&(sessions.len() as u16).to_be_bytes());
    for f in flows {
        out.push(f.key.proto.index() as u8);
        out.push(state_code(f.state));
        out.push(u8::from(f.mapped.is_some()));
        out.extend_from_slice(&f.mapped.unwrap_or(0).to_be_bytes());
        out.extend_from_slice(&f.key.local_port.to_be_bytes());
        out.extend_from_slice(&f.key.remote.octets());
        out.extend_from_slice(&f.key.remote_port.to_be_bytes());
        out.extend_from_slice(&f.remaining_secs.to_be_bytes());
    }
    for s in sessions {
        out.extend_from_slice(&s.digest);
        out.extend_from_slice(&s.remaining_ms.to_be_bytes());
    }
    out
}

/// A cursor over input bytes.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    fn vm_id(&mut self) -> Result<String, DecodeError> {
        let n = usize::from(self.u8()?);
        if n == 0 || n > MAX_VM_ID {
            return Err(DecodeError::VmId);
        }
        let raw = self.take(n)?;
        std::str::from_utf8(raw)
            .map(str::to_string)
            .map_err(|_| DecodeError::VmId)
    }
}

fn flow_record(b: &[u8], i: usize) -> Result<MovedFlow, DecodeError> {
    let bad = DecodeError::Flow(i);
    let proto = *Proto::ALL.get(usize::from(b[0])).ok_or(bad)?;
    let state = state_of(b[1], proto).ok_or(bad)?;
    let mapped_port = u16::from_be_bytes([b[3], b[4]]);
    let mapped = match b[2] {
        0 if mapped_port == 0 => None,
        1 if mapped_port != 0 => Some(mapped_port),
        _ => return Err(bad),
    };
    let key = FlowKey {
        proto,
        local_port: u16::from_be_bytes([b[5], b[6]]),
        remote: Ipv4Addr::new(b[7], b[8], b[9], b[10]),
        remote_port: u16::from_be_bytes([b[11], b[12]]),
    };
    let remaining_secs = u32::from_be_bytes([b[13], b[14], b[15], b[16]]);
    if remaining_secs == 0 || u64::from(remaining_secs) > state.timeout_secs() {
        return Err(bad);
    }
    if proto == Proto::Icmp && key.remote_port != 0 {
        return Err(bad);
    }
    Ok(MovedFlow {
        key,
        mapped,
        state,
        remaining_secs,
    })
}

/// The state in a blob, every field checked. Fuzz-friendly: any input gives a value or an
/// error, never a panic, and nothing is allocated beyond what the input's length backs.
pub fn decode(bytes: &[u8]) -> Result<VmState, DecodeError> {
    let mut r = Reader(bytes);
    if r.take(4)? != BLOB_MAGIC {
        return Err(DecodeError::Magic);
    }
    match r.u8()? {
        VERSION => {}
        v => return Err(DecodeError::Version(v)),
    }
    let vm_id = r.vm_id()?;
    let n_flows = r.u32()? as usize;
    let n_sessions = usize::from(r.u16()?);
    if n_flows > MAX_FLOWS || n_sessions > MAX_SESSIONS {
        return Err(DecodeError::TooMany);
    }
    let need = n_flows * FLOW_LEN + n_sessions * SESSION_LEN;
    match r.0.len().cmp(&need) {
        std::cmp::Ordering::Less => return Err(DecodeError::Truncated),
        std::cmp::Ordering::Greater => return Err(DecodeError::Trailing),
        std::cmp::Ordering::Equal => {}
    }
    let flows = (0..n_flows)
        .map(|i| flow_record(r.take(FLOW_LEN)?, i))
        .collect::<Result<Vec<_>, _>>()?;
    let max_ms = MAX_TTL_SECS * 1000;
    let sessions = (0..n_sessions)
        .map(|i| {
            let b = r.take(SESSION_LEN)?;
            let mut digest = [0u8; 32];
            digest.copy_from_slice(&b[..32]);
            let remaining_ms = u32::from_be_bytes([b[32], b[33], b[34], b[35]]);
            if remaining_ms == 0 || u64::from(remaining_ms) > max_ms {
                return Err(DecodeError::Session(i));
            }
            Ok(SessionRecord {
                digest,
                remaining_ms,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(VmState {
        vm_id,
        flows,
        sessions,
    })
}

/// A destination's request for a VM's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The VM.
    pub vm_id: String,
    /// The requester's Unix time (seconds).
    pub unix_secs: u64,
    /// Fresh random bytes; the response's MAC covers them (no replayed response is accepted).
    pub nonce: [u8; NONCE_LEN],
    mac: [u8; MAC_LEN],
}

fn hmac(secret: &[u8], label: &[u8], parts: &[&[u8]]) -> Hmac<Sha256> {
    // HMAC takes keys of any length: `new_from_slice` cannot fail for it.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC accepts any key length");
    m.update(label);
    for p in parts {
        m.update(p);
    }
    m
}

fn request_body(vm_id: &str, unix_secs: u64, nonce: &[u8; NONCE_LEN]) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAX_REQUEST);
    out.extend_from_slice(&REQUEST_MAGIC);
    out.push(VERSION);
    out.push(vm_id.len() as u8);
    out.extend_from_slice(vm_id.as_bytes());
    out.extend_from_slice(&unix_secs.to_be_bytes());
    out.extend_from_slice(nonce);
    out
}

/// The request bytes for `vm_id`, authenticated with the VM's `secret`; `None` when the id
/// cannot be framed (empty or longer than [`MAX_VM_ID`]).
pub fn encode_request(
    secret: &[u8],
    vm_id: &str,
    unix_secs: u64,
    nonce: &[u8; NONCE_LEN],
) -> Option<Vec<u8>> {
    if vm_id.is_empty() || vm_id.len() > MAX_VM_ID {
        return None;
    }
    let mut out = request_body(vm_id, unix_secs, nonce);
    let mac = hmac(secret, REQUEST_LABEL, &[&out]).finalize().into_bytes();
    out.extend_from_slice(&mac);
    Some(out)
}

/// The fields of a request (not yet authenticated: see [`Request::verify`]). The framing
/// gives its own length: `bytes` must be exactly one request.
pub fn decode_request(bytes: &[u8]) -> Result<Request, DecodeError> {
    let mut r = Reader(bytes);
    if r.take(4)? != REQUEST_MAGIC {
        return Err(DecodeError::Magic);
    }
    match r.u8()? {
        VERSION => {}
        v => return Err(DecodeError::Version(v)),
    }
    let vm_id = r.vm_id()?;
    let unix_secs = r.u64()?;
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(r.take(NONCE_LEN)?);
    let mut mac = [0u8; MAC_LEN];
    mac.copy_from_slice(r.take(MAC_LEN)?);
    if !r.0.is_empty() {
        return Err(DecodeError::Trailing);
    }
    Ok(Request {
        vm_id,
        unix_secs,
        nonce,
        mac,
    })
}

/// Why an authenticated exchange was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The MAC does not match (not made with this VM's secret).
    #[error("bad MAC")]
    BadMac,
    /// The request's time is more than [`REQUEST_SKEW_SECS`] from ours.
    #[error("request time too far from this host's clock")]
    Stale,
}

impl Request {
    /// Checks the MAC with the VM's `secret` (constant time) and the time against `now_unix`.
    pub fn verify(&self, secret: &[u8], now_unix: u64) -> Result<(), AuthError> {
        let body = request_body(&self.vm_id, self.unix_secs, &self.nonce);
        hmac(secret, REQUEST_LABEL, &[&body])
            .verify_slice(&self.mac)
            .map_err(|_| AuthError::BadMac)?;
        if self.unix_secs.abs_diff(now_unix) > REQUEST_SKEW_SECS {
            return Err(AuthError::Stale);
        }
        Ok(())
    }
}

/// The MAC a response carries after its blob: over the request's nonce and the blob.
pub fn response_mac(secret: &[u8], nonce: &[u8; NONCE_LEN], blob: &[u8]) -> [u8; MAC_LEN] {
    hmac(secret, RESPONSE_LABEL, &[nonce, blob])
        .finalize()
        .into_bytes()
        .into()
}

/// Checks a response's MAC (constant time).
pub fn verify_response(
    secret: &[u8],
    nonce: &[u8; NONCE_LEN],
    blob: &[u8],
    mac: &[u8],
) -> Result<(), AuthError> {
    hmac(secret, RESPONSE_LABEL, &[nonce, blob])
        .verify_slice(mac)
        .map_err(|_| AuthError::BadMac)
}

#[cfg(test)]
mod tests;

//! Target `migrate_state`: what a destination vnpd reads from the network during a live
//! migration (`vnpd::migrate_state::wire`), and the source's reading of the request.
//!
//! Mode bit 0 picks the message:
//! - **state blob** (0): `decode`; a blob it accepts re-encodes to a blob that decodes to the
//!   same state, every record is within the format's bounds, and importing its flows into a
//!   NAT table (blocks from the mode's high bits) keeps the table's invariants: each imported
//!   mapped flow is found on its port and by its key, inside the blocks, and nothing is
//!   imported twice; the table then exports exactly what it took (timers capped at the
//!   state's timeout), and that export moved on to a third table (the VM migrating again, or
//!   back) lands the same flows.
//! - **request** (1): `decode_request`; an accepted request verifies only with the secret that
//!   made it. With mode bit 1 the target also builds a valid request from the input (VM id,
//!   time, nonce), so the MAC path is reached on every such input: it must decode, verify with
//!   the right secret at a time within the skew, and fail with any one byte changed or with
//!   another secret.

use std::collections::HashMap;
use vnpd::migrate_state::wire::{
    self, decode, decode_request, encode, encode_request, AuthError, MAX_VM_ID, NONCE_LEN,
    REQUEST_SKEW_SECS,
};
use vnpd::nat::{MovedFlow, NatTable, PortBlock};

const SECRET: &[u8] = b"the VM's secret, 32 bytes long!!";
const OTHER_SECRET: &[u8] = b"another VM's secret, also 32 b!!";
/// The NAT clock the import runs at.
const NOW: u64 = vnpd::nat::CLOCK_START + 1_000;

/// Runs one input.
pub fn run(data: &[u8]) {
    let (mode, rest) = crate::split_mode(data);
    if mode & 1 == 0 {
        blob(mode, rest);
    } else {
        request(mode, rest);
    }
}

fn blob(mode: u8, bytes: &[u8]) {
    let Ok(state) = decode(bytes) else {
        return;
    };
    assert!(!state.vm_id.is_empty() && state.vm_id.len() <= MAX_VM_ID);
    assert!(state.flows.len() <= wire::MAX_FLOWS);
    for f in &state.flows {
        assert!(f.remaining_secs >= 1, "{f:?}");
        assert!(
            u64::from(f.remaining_secs) <= f.state.timeout_secs(),
            "{f:?}"
        );
        assert_ne!(f.mapped, Some(0), "{f:?}");
    }
    for s in &state.sessions {
        assert!(s.remaining_ms >= 1, "{s:?}");
    }
    assert_eq!(decode(&encode(&state)), Ok(state.clone()), "round trip");
    import(mode, &state.flows);
}

/// Imports `flows` into a table with one or two blocks and checks what it took.
fn import(mode: u8, flows: &[MovedFlow]) {
    let first = 1024 + u16::from(mode >> 2 & 0x0f) * 512;
    let mut blocks = vec![PortBlock::new(first, first + 511).expect("block")];
    if mode & 0x40 != 0 {
        blocks.push(PortBlock::new(60000, 60063).expect("block"));
    }
    let in_blocks = |p: u16| blocks.iter().any(|b| b.contains(p));
    let mut table = NatTable::new(&blocks);
    table.hold_new_flows(NOW + 3);
    let report = table.import(flows, NOW);
    assert!(!table.holding(NOW), "an import ends the hold");
    assert_eq!(
        report.imported + report.conflicts + report.outside_blocks,
        flows.len(),
        "{report:?}"
    );
    // A mapped flow whose key no other record has, and whose port no other mapped record has,
    // inside the blocks, is taken whatever the order.
    let mut keys: HashMap<_, usize> = HashMap::new();
    let mut ports: HashMap<_, usize> = HashMap::new();
    for f in flows {
        *keys.entry(f.key).or_default() += 1;
        if let Some(p) = f.mapped {
            *ports.entry((f.key.proto, p)).or_default() += 1;
        }
    }
    let mut mapped_in_blocks = 0;
    for f in flows {
        let Some(port) = f.mapped.filter(|p| in_blocks(*p)) else {
            continue;
        };
        mapped_in_blocks += 1;
        if keys[&f.key] > 1 || ports[&(f.key.proto, port)] > 1 {
            continue;
        }
        assert_eq!(
            table.lookup_mapped(f.key.proto, port, NOW),
            Some(f.key),
            "{f:?} on its port"
        );
        assert_eq!(table.mapped_port(&f.key, NOW), Some(port), "{f:?} by key");
    }
    let live = table.flows(NOW);
    for v in &live {
        if let Some(p) = v.mapped {
            assert!(in_blocks(p), "{v:?} outside the blocks");
        }
    }
    let mapped_live = live.iter().filter(|v| v.mapped.is_some()).count();
    assert!(
        mapped_live <= mapped_in_blocks,
        "{mapped_live} > {mapped_in_blocks}"
    );
    move_on(&blocks, flows, &table.export(NOW), report.imported);
}

/// The export of the table that took `flows` holds what it took, and moves on unchanged.
fn move_on(blocks: &[PortBlock], flows: &[MovedFlow], exported: &[MovedFlow], imported: usize) {
    assert_eq!(exported.len(), imported, "export after import");
    let by_flow = |v: &[MovedFlow]| -> HashMap<_, MovedFlow> {
        v.iter().map(|f| ((f.key, f.mapped), *f)).collect()
    };
    let sent = by_flow(exported);
    assert_eq!(sent.len(), exported.len(), "a flow exported twice");
    for e in exported {
        assert!(
            flows.iter().any(|f| f.key == e.key
                && f.mapped == e.mapped
                && f.state == e.state
                && e.remaining_secs == f.remaining_secs.min(timeout(f))),
            "{e:?} was not imported"
        );
    }
    let mut next = NatTable::new(blocks);
    let report = next.import(exported, NOW);
    assert_eq!(report.imported, exported.len(), "{report:?}");
    assert_eq!(by_flow(&next.export(NOW)), sent, "moved on");
}

fn timeout(f: &MovedFlow) -> u32 {
    u32::try_from(f.state.timeout_secs()).unwrap_or(u32::MAX)
}

fn request(mode: u8, bytes: &[u8]) {
    if let Ok(req) = decode_request(bytes) {
        // Bytes from the network are never taken for a request made with the secret (only
        // a MAC forged by chance would).
        if req.verify(SECRET, req.unix_secs) == Ok(()) {
            assert_eq!(
                encode_request(SECRET, &req.vm_id, req.unix_secs, &req.nonce).as_deref(),
                Some(bytes),
                "verified, so made with the secret"
            );
        }
    }
    if mode & 2 != 0 {
        valid_request(bytes);
    }
}

/// A request built from `bytes` with the secret: accepted, and refused when altered.
fn valid_request(bytes: &[u8]) {
    let (id_len, rest) = crate::split_mode(bytes);
    let id_len = usize::from(id_len) % (MAX_VM_ID + 1);
    let id: String = rest
        .iter()
        .take(id_len)
        .map(|b| char::from(b'a' + b % 26))
        .collect();
    let rest = rest.get(id_len..).unwrap_or_default();
    let mut nonce = [0u8; NONCE_LEN];
    for (n, b) in nonce.iter_mut().zip(rest) {
        *n = *b;
    }
    let time = rest
        .iter()
        .skip(NONCE_LEN)
        .take(8)
        .fold(0u64, |t, b| t << 8 | u64::from(*b));
    let Some(req) = encode_request(SECRET, &id, time, &nonce) else {
        assert!(id.is_empty(), "a {}-byte id cannot be framed", id.len());
        return;
    };
    let got = decode_request(&req).expect("a request made here decodes");
    assert_eq!(
        (got.vm_id.as_str(), got.unix_secs, got.nonce),
        (id.as_str(), time, nonce)
    );
    assert_eq!(got.verify(SECRET, time), Ok(()));
    let skewed = time.saturating_add(REQUEST_SKEW_SECS + 1);
    if skewed > time.saturating_add(REQUEST_SKEW_SECS) {
        assert_eq!(got.verify(SECRET, skewed), Err(AuthError::Stale));
    }
    assert_eq!(got.verify(OTHER_SECRET, time), Err(AuthError::BadMac));
    // One byte changed anywhere: refused by the framing or by the MAC.
    let at = rest.get(NONCE_LEN + 8).map_or(0, |b| usize::from(*b)) % req.len();
    let mut bad = req.clone();
    bad[at] ^= 1 << (at % 8);
    if let Ok(r) = decode_request(&bad) {
        assert_eq!(
            r.verify(SECRET, r.unix_secs),
            Err(AuthError::BadMac),
            "byte {at}"
        );
    }
    // The response MAC binds the nonce.
    let mac = wire::response_mac(SECRET, &nonce, rest);
    assert!(wire::verify_response(SECRET, &nonce, rest, &mac).is_ok());
    let mut other = nonce;
    other[0] ^= 1;
    assert!(wire::verify_response(SECRET, &other, rest, &mac).is_err());
}

/// Seeds: blobs with flows of every protocol and a session, and requests (plain, and built
/// from the input).
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    use std::net::Ipv4Addr;
    use vnpd::nat::{FlowKey, FlowState, MovedFlow, Proto};
    let flow = |proto, local_port, mapped, state, remaining_secs| MovedFlow {
        key: FlowKey {
            proto,
            local_port,
            remote: Ipv4Addr::new(203, 0, 113, 10),
            remote_port: if proto == Proto::Icmp { 0 } else { 443 },
        },
        mapped,
        state,
        remaining_secs,
    };
    let state = wire::VmState {
        vm_id: "vm-a".into(),
        flows: vec![
            flow(
                Proto::Tcp,
                40001,
                Some(1100),
                FlowState::TcpEstablished,
                300,
            ),
            flow(Proto::Udp, 5353, Some(1101), FlowState::Udp, 20),
            flow(Proto::Icmp, 7, Some(1102), FlowState::Icmp, 10),
            flow(Proto::Tcp, 8080, None, FlowState::TcpHandshake, 5),
        ],
        sessions: vec![wire::SessionRecord {
            digest: [7; 32],
            remaining_ms: 60_000,
        }],
    };
    let blob = encode(&state);
    let request = encode_request(SECRET, "vm-a", 1_700_000_000, &[3; NONCE_LEN]).expect("framed");
    let mut built = vec![4u8];
    built.extend_from_slice(b"vm-a");
    built.extend_from_slice(&[5; NONCE_LEN]);
    built.extend_from_slice(&1_700_000_000u64.to_be_bytes());
    built.push(9);
    let with_mode = |mode: u8, bytes: &[u8]| [&[mode][..], bytes].concat();
    vec![
        ("blob".into(), with_mode(0, &blob)),
        ("blob-two-blocks".into(), with_mode(0x40, &blob)),
        (
            "empty-blob".into(),
            with_mode(
                0,
                &encode(&wire::VmState {
                    vm_id: "x".into(),
                    ..wire::VmState::default()
                }),
            ),
        ),
        ("request".into(), with_mode(1, &request)),
        ("built-request".into(), with_mode(3, &built)),
    ]
}

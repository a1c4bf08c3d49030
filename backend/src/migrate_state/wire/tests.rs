use super::*;

fn state() -> VmState {
    VmState {
        vm_id: "vm-a".into(),
        flows: vec![
            MovedFlow {
                key: FlowKey {
                    proto: Proto::Tcp,
                    local_port: 5555,
                    remote: Ipv4Addr::new(203, 0, 113, 10),
                    remote_port: 8000,
                },
                mapped: Some(20000),
                state: FlowState::TcpHalfClosed { from_opener: false },
                remaining_secs: 200,
            },
            MovedFlow {
                key: FlowKey {
                    proto: Proto::Icmp,
                    local_port: 7,
                    remote: Ipv4Addr::new(1, 1, 1, 1),
                    remote_port: 0,
                },
                mapped: Some(20001),
                state: FlowState::Icmp,
                remaining_secs: 10,
            },
            MovedFlow {
                key: FlowKey {
                    proto: Proto::Udp,
                    local_port: 53,
                    remote: Ipv4Addr::new(203, 0, 113, 10),
                    remote_port: 4000,
                },
                mapped: None,
                state: FlowState::Udp,
                remaining_secs: 30,
            },
        ],
        sessions: vec![SessionRecord {
            digest: [7; 32],
            remaining_ms: 21_600_000,
        }],
    }
}

#[test]
fn round_trip() {
    let s = state();
    let b = encode(&s);
    assert_eq!(b.len(), 4 + 1 + 1 + 4 + 4 + 2 + 3 * FLOW_LEN + SESSION_LEN);
    assert_eq!(decode(&b), Ok(s));
    assert_eq!(
        decode(&encode(&VmState {
            vm_id: "x".into(),
            ..VmState::default()
        }))
        .unwrap()
        .vm_id,
        "x"
    );
}

#[test]
fn every_truncation_and_extension_is_refused() {
    let b = encode(&state());
    for n in 0..b.len() {
        assert!(decode(&b[..n]).is_err(), "prefix of {n} bytes");
    }
    let mut longer = b.clone();
    longer.push(0);
    assert_eq!(decode(&longer), Err(DecodeError::Trailing));
}

/// Offsets in the blob of `state()`: header 14 bytes with "vm-a", flows from 16.
const FLOW0: usize = 16;

fn corrupt(at: usize, value: u8) -> Result<VmState, DecodeError> {
    let mut b = encode(&state());
    b[at] = value;
    decode(&b)
}

#[test]
fn bad_fields_are_refused() {
    assert_eq!(corrupt(0, b'X'), Err(DecodeError::Magic));
    assert_eq!(corrupt(4, 2), Err(DecodeError::Version(2)));
    assert_eq!(corrupt(5, 0), Err(DecodeError::VmId));
    assert_eq!(corrupt(5, 65), Err(DecodeError::VmId));
    assert_eq!(corrupt(6, 0xff), Err(DecodeError::VmId), "not UTF-8");
    // Flow 0: proto, state (of another protocol; unknown), has-mapped, mapped port.
    assert_eq!(corrupt(FLOW0, 3), Err(DecodeError::Flow(0)));
    assert_eq!(
        corrupt(FLOW0 + 1, 5),
        Err(DecodeError::Flow(0)),
        "UDP state on TCP"
    );
    assert_eq!(corrupt(FLOW0 + 1, 7), Err(DecodeError::Flow(0)));
    assert_eq!(corrupt(FLOW0 + 2, 2), Err(DecodeError::Flow(0)));
    assert_eq!(
        corrupt(FLOW0 + 2, 0),
        Err(DecodeError::Flow(0)),
        "unmapped with a port"
    );
    // Remaining time beyond the state's timeout (240 s half closed), and zero.
    let mut b = encode(&state());
    b[FLOW0 + 13..FLOW0 + 17].copy_from_slice(&241u32.to_be_bytes());
    assert_eq!(decode(&b), Err(DecodeError::Flow(0)));
    b[FLOW0 + 13..FLOW0 + 17].copy_from_slice(&0u32.to_be_bytes());
    assert_eq!(decode(&b), Err(DecodeError::Flow(0)));
    // ICMP with a remote port.
    let icmp = FLOW0 + FLOW_LEN;
    assert_eq!(corrupt(icmp + 12, 1), Err(DecodeError::Flow(1)));
    // A session longer than 6 hours, or over.
    let sess = FLOW0 + 3 * FLOW_LEN;
    let mut b = encode(&state());
    b[sess + 32..sess + 36].copy_from_slice(&21_600_001u32.to_be_bytes());
    assert_eq!(decode(&b), Err(DecodeError::Session(0)));
    b[sess + 32..sess + 36].copy_from_slice(&0u32.to_be_bytes());
    assert_eq!(decode(&b), Err(DecodeError::Session(0)));
}

#[test]
fn lying_counts_allocate_nothing() {
    let mut b = encode(&state());
    b[10..14].copy_from_slice(&u32::MAX.to_be_bytes());
    assert_eq!(decode(&b), Err(DecodeError::TooMany));
    b[10..14].copy_from_slice(&(MAX_FLOWS as u32).to_be_bytes());
    assert_eq!(decode(&b), Err(DecodeError::Truncated));
    let mut b = encode(&state());
    b[14..16].copy_from_slice(&(MAX_SESSIONS as u16 + 1).to_be_bytes());
    assert_eq!(decode(&b), Err(DecodeError::TooMany));
}

#[test]
fn requests_are_bound_to_the_secret_and_the_clock() {
    let secret = [9u8; 32];
    let nonce = [1u8; NONCE_LEN];
    let r = encode_request(&secret, "vm-a", 1_000_000, &nonce).unwrap();
    assert!(r.len() <= MAX_REQUEST);
    let req = decode_request(&r).unwrap();
    assert_eq!(
        (req.vm_id.as_str(), req.unix_secs, req.nonce),
        ("vm-a", 1_000_000, nonce)
    );
    assert_eq!(req.verify(&secret, 1_000_000 + REQUEST_SKEW_SECS), Ok(()));
    assert_eq!(req.verify(&secret, 1_000_000 - REQUEST_SKEW_SECS), Ok(()));
    assert_eq!(req.verify(&secret, 1_000_061), Err(AuthError::Stale));
    assert_eq!(req.verify(&[8u8; 32], 1_000_000), Err(AuthError::BadMac));
    // Any changed byte breaks the MAC (or the framing).
    for i in 0..r.len() {
        let mut bad = r.clone();
        bad[i] ^= 1;
        let ok = decode_request(&bad).is_ok_and(|q| q.verify(&secret, 1_000_000).is_ok());
        assert!(!ok, "byte {i}");
    }
    assert!(decode_request(&r[..r.len() - 1]).is_err());
    assert!(encode_request(&secret, "", 0, &nonce).is_none());
    assert!(encode_request(&secret, &"x".repeat(65), 0, &nonce).is_none());
}

#[test]
fn responses_are_bound_to_the_nonce() {
    let secret = [9u8; 32];
    let blob = encode(&state());
    let mac = response_mac(&secret, &[1; NONCE_LEN], &blob);
    assert_eq!(
        verify_response(&secret, &[1; NONCE_LEN], &blob, &mac),
        Ok(())
    );
    assert_eq!(
        verify_response(&secret, &[2; NONCE_LEN], &blob, &mac),
        Err(AuthError::BadMac),
        "a replayed answer to another request"
    );
    assert_eq!(
        verify_response(&[0; 32], &[1; NONCE_LEN], &blob, &mac),
        Err(AuthError::BadMac)
    );
    assert_eq!(
        verify_response(&secret, &[1; NONCE_LEN], &blob[1..], &mac),
        Err(AuthError::BadMac)
    );
}

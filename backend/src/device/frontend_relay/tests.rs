use super::*;

use std::os::linux::net::SocketAddrExt;

const F_PROTOCOL: u64 = 1 << 30;
const F_VERSION_1: u64 = 1 << 32;

fn header(request: FrontendReq, flags: VhostUserHeaderFlag, size: usize) -> MessageHeader {
    MessageHeader::request(request, flags, size)
}

fn enable(index: u32, on: u32) -> Vec<u8> {
    VhostUserVringState::new(index, on).as_slice().to_vec()
}

fn quiet(request: FrontendReq, size: usize) -> MessageHeader {
    header(request, VhostUserHeaderFlag::empty(), size)
}

fn parse(m: &SmallMessage) -> (MessageHeader, [u8; 8]) {
    let mut h = MessageHeader::default();
    h.as_mut_slice().copy_from_slice(&m[..HEADER_LEN]);
    (h, m[HEADER_LEN..].try_into().unwrap())
}

#[test]
fn header_has_the_wire_layout() {
    let h = header(
        FrontendReq::SET_FEATURES,
        VhostUserHeaderFlag::NEED_REPLY,
        8,
    );
    assert_eq!(HEADER_LEN, 12);
    assert_eq!(h.as_slice(), &[2, 0, 0, 0, 0x9, 0, 0, 0, 8, 0, 0, 0]);
    assert_eq!(h.code(), Some(FrontendReq::SET_FEATURES));
    assert!(h.needs_reply());
    let unknown = MessageHeader {
        request: 9999,
        flags: 1,
        size: 0,
    };
    assert_eq!(unknown.code(), None);
}

#[test]
fn absorbs_enable_before_features_and_answers_when_asked() {
    let mut f = EarlyEnableFilter::default();
    assert_eq!(
        f.on_frontend_message(&quiet(FrontendReq::SET_VRING_ENABLE, 8), &enable(0, 1)),
        Verdict::Absorb { reply: None }
    );
    let asking = header(
        FrontendReq::SET_VRING_ENABLE,
        VhostUserHeaderFlag::NEED_REPLY,
        8,
    );
    let Verdict::Absorb { reply: Some(reply) } = f.on_frontend_message(&asking, &enable(1, 0))
    else {
        panic!("expected an absorbed message with a reply");
    };
    let (h, payload) = parse(&reply);
    assert_eq!(h.code(), Some(FrontendReq::SET_VRING_ENABLE));
    assert_eq!(h.flags, VERSION_1 | VhostUserHeaderFlag::REPLY.bits());
    assert_eq!(h.size, 8);
    assert_eq!(payload, [0u8; 8], "zero means success");
    assert_eq!(f.absorbed(), 2);
}

#[test]
fn replays_held_enables_after_features_last_state_per_ring() {
    let mut f = EarlyEnableFilter::default();
    let msg = quiet(FrontendReq::SET_VRING_ENABLE, 8);
    for (index, on) in [(0, 1), (1, 1), (3, 1), (3, 0)] {
        f.on_frontend_message(&msg, &enable(index, on));
    }
    let features = (F_PROTOCOL | F_VERSION_1).to_le_bytes();
    let set_features = quiet(FrontendReq::SET_FEATURES, 8);
    let Verdict::ForwardThenReplay(replay) = f.on_frontend_message(&set_features, &features) else {
        panic!("expected the held enables to be replayed");
    };
    let states: Vec<(u32, u32)> = replay
        .iter()
        .map(|m| {
            let (h, payload) = parse(m);
            assert_eq!(h.code(), Some(FrontendReq::SET_VRING_ENABLE));
            assert_eq!(h.flags, VERSION_1, "no reply asked for");
            assert_eq!(h.size, 8);
            let state = read_payload::<VhostUserVringState>(&payload).unwrap();
            (state.index, state.num)
        })
        .collect();
    assert_eq!(states, vec![(0, 1), (1, 1), (3, 0)]);
    // Replayed once: a later SET_FEATURES (e.g. toggling LOG_ALL) replays nothing.
    assert_eq!(
        f.on_frontend_message(&set_features, &features),
        Verdict::Forward
    );
}

#[test]
fn forwards_enable_once_protocol_features_are_acked() {
    let mut f = EarlyEnableFilter::default();
    let features = (F_PROTOCOL | F_VERSION_1).to_le_bytes();
    assert_eq!(
        f.on_frontend_message(&quiet(FrontendReq::SET_FEATURES, 8), &features),
        Verdict::Forward
    );
    let msg = quiet(FrontendReq::SET_VRING_ENABLE, 8);
    assert_eq!(f.on_frontend_message(&msg, &enable(0, 1)), Verdict::Forward);
    assert_eq!(f.absorbed(), 0);
}

#[test]
fn features_without_protocol_bit_keep_absorbing() {
    // Without PROTOCOL_FEATURES the backend enables rings itself at SET_FEATURES, and a
    // conforming frontend never sends SET_VRING_ENABLE; if one does, the crate would refuse it,
    // so it is absorbed.
    let mut f = EarlyEnableFilter::default();
    let features = F_VERSION_1.to_le_bytes();
    f.on_frontend_message(&quiet(FrontendReq::SET_FEATURES, 8), &features);
    let msg = quiet(FrontendReq::SET_VRING_ENABLE, 8);
    assert_eq!(
        f.on_frontend_message(&msg, &enable(0, 1)),
        Verdict::Absorb { reply: None }
    );
}

#[test]
fn other_messages_pass() {
    let mut f = EarlyEnableFilter::default();
    for request in [1u32, 3, 5, 8, 9, 10, 11, 12, 15, 16, 17, 24, 25, 9999] {
        let h = MessageHeader {
            request,
            flags: VERSION_1,
            size: 0,
        };
        assert_eq!(f.on_frontend_message(&h, &[]), Verdict::Forward);
    }
    // A truncated SET_FEATURES changes nothing and is left to the backend to refuse.
    assert_eq!(
        f.on_frontend_message(&quiet(FrontendReq::SET_FEATURES, 4), &[0; 4]),
        Verdict::Forward
    );
}

/// A relay whose backend end is handed back to the test, connected the way vnpd's daemon
/// connects (`start_client` to the path it is given).
fn relay_with_backend(label: &str) -> (UnixStream, FrontendRelay, UnixStream) {
    let (frontend_side, relay_side) = UnixStream::pair().expect("socketpair");
    let mut backend = None;
    let relay = FrontendRelay::start(relay_side, label, |path| {
        let meta = std::fs::metadata(Path::new(path).parent().unwrap()).unwrap();
        assert_eq!(
            meta.permissions().mode() & 0o777,
            0o700,
            "private directory"
        );
        backend = Some(UnixStream::connect(path)?);
        Ok::<(), io::Error>(())
    })
    .expect("relay");
    (frontend_side, relay, backend.expect("connected"))
}

#[test]
fn relays_messages_with_descriptors_and_absorbs_early_enable() {
    let (frontend_side, relay, backend) = relay_with_backend("test");

    // An early enable that asks for a reply: answered by the relay, never seen by the backend.
    let early = header(
        FrontendReq::SET_VRING_ENABLE,
        VhostUserHeaderFlag::NEED_REPLY,
        8,
    );
    write_message(&frontend_side, early.as_slice(), &enable(0, 1), &[]).expect("send");
    let reply = read_message(&frontend_side).expect("read").expect("reply");
    assert_eq!(
        reply.header.flags,
        VERSION_1 | VhostUserHeaderFlag::REPLY.bits()
    );

    // SET_FEATURES reaches the backend, followed by the held-back enable.
    let features = (F_PROTOCOL | F_VERSION_1).to_le_bytes();
    let set_features = quiet(FrontendReq::SET_FEATURES, 8);
    write_message(&frontend_side, set_features.as_slice(), &features, &[]).expect("send");
    let got = read_message(&backend).expect("read").expect("features");
    assert_eq!(got.header.code(), Some(FrontendReq::SET_FEATURES));
    let got = read_message(&backend).expect("read").expect("replayed");
    assert_eq!(got.header.code(), Some(FrontendReq::SET_VRING_ENABLE));
    assert_eq!(got.payload, enable(0, 1));

    // A message with a descriptor passes through, descriptor included.
    let (probe_a, probe_b) = UnixStream::pair().expect("socketpair");
    let set_call = quiet(FrontendReq::SET_VRING_CALL, 8);
    let fds = [OwnedFd::from(probe_a)];
    write_message(&frontend_side, set_call.as_slice(), &[0; 8], &fds).expect("send");
    let got = read_message(&backend).expect("read").expect("message");
    assert_eq!(got.header.code(), Some(FrontendReq::SET_VRING_CALL));
    assert_eq!(got.fds.len(), 1);
    let mut passed = UnixStream::from(got.fds.into_iter().next().expect("fd"));
    passed.write_all(b"x").expect("write through passed fd");
    let mut byte = [0u8; 1];
    (&probe_b).read_exact(&mut byte).expect("read");
    assert_eq!(&byte, b"x");

    // Backend replies flow back.
    let backend_reply = header(FrontendReq::GET_FEATURES, VhostUserHeaderFlag::REPLY, 8);
    write_message(&backend, backend_reply.as_slice(), &7u64.to_le_bytes(), &[]).expect("send");
    let back = read_message(&frontend_side).expect("read").expect("reply");
    assert_eq!(back.payload, 7u64.to_le_bytes());

    // The frontend hanging up ends both directions.
    drop(frontend_side);
    assert!(read_message(&backend).expect("read").is_none());
    relay.join();
}

#[test]
fn oversized_payload_ends_the_connection() {
    let (frontend_side, relay, backend) = relay_with_backend("big");
    let h = quiet(FrontendReq::GET_FEATURES, MAX_MSG_SIZE + 1);
    (&frontend_side).write_all(h.as_slice()).expect("send");
    assert!(read_message(&backend).expect("read").is_none());
    relay.join();
}

#[test]
fn private_socket_is_gone_once_connected_and_nothing_is_abstract() {
    let (frontend_side, relay, backend) = {
        let (frontend_side, relay_side) = UnixStream::pair().expect("socketpair");
        let mut seen = None;
        let mut backend = None;
        let relay = FrontendRelay::start(relay_side, "gone", |path| {
            seen = Some(PathBuf::from(path));
            backend = Some(UnixStream::connect(path)?);
            Ok::<(), io::Error>(())
        })
        .expect("relay");
        let path = seen.expect("path");
        assert!(!path.exists(), "socket unlinked after the accept");
        assert!(
            !path.parent().unwrap().exists(),
            "private directory removed"
        );
        (frontend_side, relay, backend.expect("backend"))
    };
    // The backend's socket is bound to a path that no longer exists, not to an abstract name.
    let addr = backend.peer_addr().expect("peer addr");
    assert!(addr.as_abstract_name().is_none(), "{addr:?}");
    drop(frontend_side);
    relay.join();
}

#[test]
fn failed_backend_connect_is_an_error_and_cleans_up() {
    let (_frontend_side, relay_side) = UnixStream::pair().expect("socketpair");
    let mut seen = None;
    let err = FrontendRelay::start(relay_side, "fail", |path| {
        seen = Some(PathBuf::from(path));
        Err("daemon refused")
    })
    .expect_err("must fail");
    assert!(err.to_string().contains("daemon refused"), "{err}");
    assert!(!seen.expect("path").parent().unwrap().exists());
}

#[test]
fn a_connection_from_another_process_is_refused() {
    let private = PrivateSocketDir::create("peer").expect("dir");
    let listener = UnixListener::bind(private.socket()).expect("bind");
    // Another process (same user, as only it can enter the 0700 directory) connects first.
    let path = private.socket().to_str().unwrap().to_owned();
    let mut child = std::process::Command::new("python3")
        .args([
            "-c",
            "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); \
             import time; time.sleep(2)",
            &path,
        ])
        .spawn()
        .expect("python3");
    // Wait until the child's connection is queued, then make ours.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let mut pfd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, count 1, zero timeout.
        let ready = unsafe { libc::poll(&mut pfd, 1, 0) };
        if ready > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "child never connected"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let ours = UnixStream::connect(private.socket()).expect("connect");
    let accepted = accept_own_connection(&listener).expect("accept ours");
    // The accepted stream is ours (the child's queued connection was dropped first).
    (&ours).write_all(b"o").expect("write");
    let mut byte = [0u8; 1];
    (&accepted).read_exact(&mut byte).expect("read");
    assert_eq!(&byte, b"o");
    assert_eq!(
        peer_pid(&accepted).expect("pid"),
        std::process::id() as libc::pid_t
    );
    let _ = child.kill();
    let _ = child.wait();
}

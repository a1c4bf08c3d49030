//! Pins the crate behaviour vnpd's frontend relay (`device/frontend_relay.rs`) exists for:
//! `vhost` 0.18's `BackendReqHandler::handle_request` refuses `SET_VRING_ENABLE` until
//! `SET_FEATURES` has acked `VHOST_USER_F_PROTOCOL_FEATURES` (`Error::InactiveFeature`), and
//! `vhost-user-backend` 0.24's `VhostUserDaemon` then drops the connection. QEMU sends exactly
//! that early enable (see `docs/frontends.md`).
//!
//! A bare daemon with a do-nothing backend, no relay: when the first test here fails, the crates
//! take early enables and the relay can be deleted.

use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use vhost::vhost_user::message::{
    FrontendReq, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserU64,
    VhostUserVirtioFeatures, VhostUserVringState,
};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock};
use vm_memory::{ByteValued, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vnpd::device::frontend_relay::{read_message, write_message, MessageHeader};

const VERSION_1: u64 = 1 << 32;

/// The smallest backend the daemon accepts: two queues, no data path.
struct PinBackend;

impl VhostUserBackend for PinBackend {
    type Bitmap = ();
    type Vring = VringRwLock<GuestMemoryAtomic<GuestMemoryMmap<()>>>;

    fn num_queues(&self) -> usize {
        2
    }
    fn max_queue_size(&self) -> usize {
        256
    }
    fn features(&self) -> u64 {
        VERSION_1 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
    }
    fn set_event_idx(&self, _enabled: bool) {}
    // Without an exit event the daemon's drop would wait for its worker forever.
    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }
    fn update_memory(&self, _mem: GuestMemoryAtomic<GuestMemoryMmap<()>>) -> std::io::Result<()> {
        Ok(())
    }
    fn handle_event(
        &self,
        _device_event: u16,
        _evset: EventSet,
        _vrings: &[Self::Vring],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        Ok(())
    }
}

/// A daemon serving one connection, and the frontend's end of it.
fn daemon_and_frontend() -> (VhostUserDaemon<Arc<PinBackend>>, UnixStream, tempdir::Dir) {
    let dir = tempdir::Dir::new();
    let path = dir.0.join("pin.sock");
    let mut listener = Listener::new(&path, true).expect("listen");
    let frontend = UnixStream::connect(&path).expect("connect");
    frontend
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let mut daemon = VhostUserDaemon::new("pin".into(), Arc::new(PinBackend), mem).expect("daemon");
    daemon.start(&mut listener).expect("accept");
    (daemon, frontend, dir)
}

fn send(stream: &UnixStream, request: FrontendReq, payload: &[u8]) {
    let header = MessageHeader::request(request, VhostUserHeaderFlag::empty(), payload.len());
    write_message(stream, header.as_slice(), payload, &[]).expect("send");
}

fn get_features(stream: &UnixStream) -> u64 {
    send(stream, FrontendReq::GET_FEATURES, &[]);
    let reply = read_message(stream).expect("read").expect("reply");
    assert_eq!(reply.header.code(), Some(FrontendReq::GET_FEATURES));
    u64::from_le_bytes(reply.payload[..8].try_into().unwrap())
}

#[test]
fn vhost_crate_refuses_vring_enable_before_set_features() {
    let (mut daemon, frontend, _dir) = daemon_and_frontend();
    send(&frontend, FrontendReq::SET_OWNER, &[]);
    let offered = get_features(&frontend);
    assert_ne!(
        offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
        0,
        "PROTOCOL_FEATURES offered, which is what makes QEMU send early enables"
    );
    // QEMU's order: the ring enable comes before SET_FEATURES.
    send(
        &frontend,
        FrontendReq::SET_VRING_ENABLE,
        VhostUserVringState::new(0, 1).as_slice(),
    );
    assert!(
        read_message(&frontend).expect("read").is_none(),
        "the daemon hangs up instead of taking the enable"
    );
    match daemon.wait() {
        Err(vhost_user_backend::Error::HandleRequest(VhostUserError::InactiveFeature(f))) => {
            assert_eq!(f, VhostUserVirtioFeatures::PROTOCOL_FEATURES);
        }
        other => panic!(
            "vhost now handles SET_VRING_ENABLE before SET_FEATURES differently ({other:?}): \
             the frontend relay may no longer be needed"
        ),
    }
}

#[test]
fn the_same_enable_after_set_features_is_taken() {
    let (mut daemon, frontend, _dir) = daemon_and_frontend();
    send(&frontend, FrontendReq::SET_OWNER, &[]);
    let offered = get_features(&frontend);
    send(
        &frontend,
        FrontendReq::SET_FEATURES,
        VhostUserU64::new(offered).as_slice(),
    );
    send(
        &frontend,
        FrontendReq::SET_VRING_ENABLE,
        VhostUserVringState::new(0, 1).as_slice(),
    );
    // The connection is still served.
    assert_eq!(get_features(&frontend), offered);
    drop(frontend);
    match daemon.wait() {
        Ok(()) | Err(vhost_user_backend::Error::HandleRequest(VhostUserError::Disconnected)) => {}
        other => panic!("the connection ended with {other:?}, not the frontend's hang-up"),
    }
}

/// A private temp directory removed on drop (also when a test fails).
mod tempdir {
    use std::path::PathBuf;

    pub struct Dir(pub PathBuf);

    impl Dir {
        pub fn new() -> Self {
            static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("vnp-pin-{}-{n}", std::process::id()));
            std::fs::create_dir(&dir).expect("temp dir");
            Self(dir)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

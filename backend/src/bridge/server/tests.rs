//! The bridge's state machine against a real TCP/IP stack on the guest side: a second smoltcp
//! interface at the VM's address, its packets carried to and from the [`Server`].

use std::net::Ipv4Addr;

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::{tcp as stcp, udp as sudp};
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpEndpoint};

use super::*;
use crate::bridge::netif::Queues;
use crate::bridge::tree::tests::sample;
use crate::bridge::METADATA_IP;

const VM: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

struct Guest {
    iface: Interface,
    queues: Queues,
    sockets: SocketSet<'static>,
    next_port: u16,
}

fn smol_now() -> smoltcp::time::Instant {
    smoltcp::time::Instant::now()
}

impl Guest {
    fn new() -> Self {
        let mut queues = Queues::new(1452);
        let mut iface = Interface::new(Config::new(HardwareAddress::Ip), &mut queues, smol_now());
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(IpAddress::Ipv4(VM), 24));
        });
        let _ = iface
            .routes_mut()
            .add_default_ipv4_route(Ipv4Addr::new(10, 0, 0, 1));
        Self {
            iface,
            queues,
            sockets: SocketSet::new(Vec::new()),
            next_port: 40000,
        }
    }

    /// Moves packets both ways until neither side has anything to say.
    fn pump(&mut self, server: &mut Server) {
        for _ in 0..50 {
            self.iface
                .poll(smol_now(), &mut self.queues, &mut self.sockets);
            let out: Vec<_> = self.queues.to_guest.drain(..).collect();
            let sent = !out.is_empty();
            for p in out {
                server.packet_from_guest(p);
            }
            server.step(Instant::now());
            let back = server.take_packets_to_guest();
            if !sent && back.is_empty() {
                return;
            }
            self.queues.from_guest.extend(back);
        }
    }

    fn connect(&mut self, server: &mut Server) -> SocketHandle {
        self.connect_to(server, 80)
    }

    fn connect_to(&mut self, server: &mut Server, port: u16) -> SocketHandle {
        let mut s = stcp::Socket::new(
            stcp::SocketBuffer::new(vec![0; 65536]),
            stcp::SocketBuffer::new(vec![0; 65536]),
        );
        self.next_port += 1;
        s.connect(
            self.iface.context(),
            IpEndpoint::new(IpAddress::Ipv4(METADATA_IP), port),
            self.next_port,
        )
        .unwrap();
        let h = self.sockets.add(s);
        self.pump(server);
        h
    }

    fn send(&mut self, server: &mut Server, h: SocketHandle, bytes: &[u8]) {
        self.sockets
            .get_mut::<stcp::Socket>(h)
            .send_slice(bytes)
            .unwrap();
        self.pump(server);
    }

    fn received(&mut self, h: SocketHandle) -> String {
        let s = self.sockets.get_mut::<stcp::Socket>(h);
        let mut out = Vec::new();
        while s.can_recv() {
            s.recv(|b| {
                out.extend_from_slice(b);
                (b.len(), ())
            })
            .unwrap();
        }
        String::from_utf8(out).unwrap()
    }

    fn state(&self, h: SocketHandle) -> stcp::State {
        self.sockets.get::<stcp::Socket>(h).state()
    }
}

fn server(limits: BridgeLimits) -> (Server, Arc<BridgeCounters>) {
    let counters = Arc::new(BridgeCounters::default());
    let names = Names::new(METADATA_IP, "vm-a", VM);
    let mut s = Server::new(names, 1452, limits, counters.clone(), Instant::now());
    s.metadata(sample(), Instant::now());
    (s, counters)
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: metadata\r\nMetadata-Flavor: Google\r\nConnection: close\r\n\r\n")
}

#[test]
fn a_get_over_real_tcp() {
    let (mut srv, counters) = server(BridgeLimits::default());
    let mut g = Guest::new();
    let h = g.connect(&mut srv);
    g.send(
        &mut srv,
        h,
        get("/computeMetadata/v1/instance/hostname").as_bytes(),
    );
    let resp = g.received(h);
    assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{resp}");
    assert!(resp.contains("Metadata-Flavor: Google\r\n"));
    assert!(resp.ends_with("\r\n\r\nvm-a"), "{resp}");
    // Connection: close: the server closed its side.
    assert!(!g.sockets.get::<stcp::Socket>(h).may_recv());
    assert_eq!(counters.get("http_2xx"), 1);
    assert_eq!(counters.get("tcp_conns"), 1);
}

#[test]
fn keep_alive_serves_several_requests_and_the_slot_is_reused() {
    let limits = BridgeLimits {
        max_conns: 1,
        ..BridgeLimits::default()
    };
    let (mut srv, _) = server(limits);
    let mut g = Guest::new();
    let h = g.connect(&mut srv);
    let ka = "GET /computeMetadata/v1/instance/id HTTP/1.1\r\nMetadata-Flavor: Google\r\n\r\n";
    g.send(&mut srv, h, format!("{ka}{ka}").as_bytes());
    let resp = g.received(h);
    assert_eq!(resp.matches("HTTP/1.1 200 OK").count(), 2, "{resp}");
    g.sockets.get_mut::<stcp::Socket>(h).close();
    g.pump(&mut srv);
    srv.step(Instant::now());
    // The one slot listens again.
    let h2 = g.connect(&mut srv);
    assert_eq!(g.state(h2), stcp::State::Established);
}

#[test]
fn connections_past_the_limit_are_refused_and_counted() {
    let limits = BridgeLimits {
        max_conns: 2,
        ..BridgeLimits::default()
    };
    let (mut srv, counters) = server(limits);
    let mut g = Guest::new();
    let a = g.connect(&mut srv);
    let b = g.connect(&mut srv);
    let c = g.connect(&mut srv);
    assert_eq!(g.state(a), stcp::State::Established);
    assert_eq!(g.state(b), stcp::State::Established);
    assert_eq!(g.state(c), stcp::State::Closed, "reset");
    assert_eq!(counters.get("tcp_conns_refused"), 1);
}

#[test]
fn rate_limit_answers_429() {
    let limits = BridgeLimits {
        rate_per_sec: 1,
        burst: 2,
        ..BridgeLimits::default()
    };
    let (mut srv, counters) = server(limits);
    let mut g = Guest::new();
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let h = g.connect(&mut srv);
        g.send(
            &mut srv,
            h,
            get("/computeMetadata/v1/instance/id").as_bytes(),
        );
        statuses.push(g.received(h)[9..12].to_string());
    }
    assert_eq!(statuses, ["200", "200", "429"]);
    assert_eq!(counters.get("http_rate_limited"), 1);
}

#[test]
fn a_hanging_get_returns_when_the_metadata_changes() {
    let (mut srv, counters) = server(BridgeLimits::default());
    let mut g = Guest::new();
    let h = g.connect(&mut srv);
    let path = "/computeMetadata/v1/instance/attributes/startup-script?wait_for_change=true";
    g.send(&mut srv, h, get(path).as_bytes());
    assert_eq!(g.received(h), "", "still waiting");
    assert_eq!(counters.get("http_hanging"), 1);
    // A change elsewhere does not answer it.
    let mut md = sample();
    md.etag = "e2".into();
    md.project.project_id = "other".into();
    srv.metadata(md.clone(), Instant::now());
    g.pump(&mut srv);
    assert_eq!(g.received(h), "");
    md.etag = "e3".into();
    md.instance
        .attributes
        .insert("startup-script".into(), "echo new".into());
    srv.metadata(md, Instant::now());
    g.pump(&mut srv);
    let resp = g.received(h);
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.ends_with("echo new"), "{resp}");
    assert!(resp.contains("ETag: "));
}

#[test]
fn tokens_are_minted_once_and_served_from_the_host() {
    let (mut srv, counters) = server(BridgeLimits::default());
    let mut g = Guest::new();
    let path = "/computeMetadata/v1/instance/service-accounts/default/token";
    let a = g.connect(&mut srv);
    let b = g.connect(&mut srv);
    g.send(&mut srv, a, get(path).as_bytes());
    g.send(&mut srv, b, get(path).as_bytes());
    assert_eq!(srv.take_jobs(), vec![Job::Access], "one mint for both");
    let token = AccessToken {
        access_token: "jwt".into(),
        expires_in: 600,
        token_type: "Bearer".into(),
    };
    srv.job_done(JobDone::Access(Ok(token)), Instant::now());
    g.pump(&mut srv);
    for h in [a, b] {
        let resp = g.received(h);
        assert!(resp.contains("\"access_token\":\"jwt\""), "{resp}");
    }
    let c = g.connect(&mut srv);
    g.send(&mut srv, c, get(path).as_bytes());
    assert!(g.received(c).contains("\"jwt\""));
    assert!(srv.take_jobs().is_empty(), "served from the host's cache");
    assert_eq!(counters.get("tokens_minted"), 1);
    // A failed mint: 503.
    let d = g.connect(&mut srv);
    let id = "/computeMetadata/v1/instance/service-accounts/default/identity?audience=x";
    g.send(&mut srv, d, get(id).as_bytes());
    let job = srv.take_jobs();
    assert_eq!(job.len(), 1);
    srv.job_done(
        JobDone::Identity {
            audience: "x".into(),
            full: false,
            result: Err(SourceError::Unavailable("down".into())),
        },
        Instant::now(),
    );
    g.pump(&mut srv);
    assert!(g.received(d).starts_with("HTTP/1.1 503"));
}

#[test]
fn malformed_oversize_and_slow_requests_are_answered_and_closed() {
    let limits = BridgeLimits {
        request_timeout: Duration::from_millis(100),
        ..BridgeLimits::default()
    };
    let (mut srv, counters) = server(limits);
    let mut g = Guest::new();
    let bad = g.connect(&mut srv);
    g.send(&mut srv, bad, b"\x01\x02 nonsense\r\n\r\n");
    assert!(g.received(bad).starts_with("HTTP/1.1 400"));
    let big = g.connect(&mut srv);
    let mut huge = b"GET /".to_vec();
    huge.resize(20_000, b'a');
    g.send(&mut srv, big, &huge);
    assert!(g.received(big).starts_with("HTTP/1.1 431"));
    let slow = g.connect(&mut srv);
    g.send(&mut srv, slow, b"GET /computeMetadata/v1/ HTTP/1.1\r\n");
    std::thread::sleep(Duration::from_millis(150));
    srv.step(Instant::now());
    g.pump(&mut srv);
    assert!(g.received(slow).starts_with("HTTP/1.1 408"));
    assert_eq!(counters.get("http_malformed"), 1);
    assert_eq!(counters.get("http_oversize"), 1);
    assert_eq!(counters.get("http_slow_clients"), 1);
}

#[test]
fn dns_over_udp() {
    use hickory_proto::op::{Message, MessageType, OpCode, Query};
    use hickory_proto::rr::{Name, RecordType};
    let (mut srv, counters) = server(BridgeLimits::default());
    let mut g = Guest::new();
    let meta = || vec![sudp::PacketMetadata::EMPTY; 4];
    let mut s = sudp::Socket::new(
        sudp::PacketBuffer::new(meta(), vec![0; 2048]),
        sudp::PacketBuffer::new(meta(), vec![0; 2048]),
    );
    s.bind(5353).unwrap();
    let h = g.sockets.add(s);
    let mut q = Message::new(7, MessageType::Query, OpCode::Query);
    q.add_query(Query::query(
        Name::from_ascii("metadata.google.internal.").unwrap(),
        RecordType::A,
    ));
    let to = IpEndpoint::new(IpAddress::Ipv4(METADATA_IP), 53);
    g.sockets
        .get_mut::<sudp::Socket>(h)
        .send_slice(&q.to_vec().unwrap(), to)
        .unwrap();
    g.pump(&mut srv);
    let (reply, _) = g.sockets.get_mut::<sudp::Socket>(h).recv().unwrap();
    let m = Message::from_vec(reply).unwrap();
    assert_eq!(m.metadata.id, 7);
    assert_eq!(m.answers.len(), 1);
    assert_eq!(counters.get("dns_answered"), 1);
}

#[test]
fn a_token_near_expiry_is_not_served_and_a_new_one_is_minted() {
    let (mut srv, counters) = server(BridgeLimits::default());
    let mut g = Guest::new();
    let path = "/computeMetadata/v1/instance/service-accounts/default/token";
    let mint = |srv: &mut Server, g: &mut Guest, value: &str| {
        let h = g.connect(srv);
        g.send(srv, h, get(path).as_bytes());
        assert_eq!(srv.take_jobs(), vec![Job::Access]);
        let token = AccessToken {
            access_token: value.into(),
            expires_in: 2,
            token_type: "Bearer".into(),
        };
        srv.job_done(JobDone::Access(Ok(token)), Instant::now());
        g.pump(srv);
        g.received(h)
    };
    assert!(mint(&mut srv, &mut g, "first").contains("\"first\""));
    // Valid 2 s, served until 0.5 s before expiry: still served at once...
    let h = g.connect(&mut srv);
    g.send(&mut srv, h, get(path).as_bytes());
    assert!(g.received(h).contains("\"first\""));
    assert!(srv.take_jobs().is_empty());
    // ...and after that, a new one is minted and served.
    std::thread::sleep(Duration::from_millis(1600));
    assert!(mint(&mut srv, &mut g, "second").contains("\"second\""));
    assert_eq!(counters.get("tokens_minted"), 2);
}

/// Runs the server, returning the IP TTLs of the packets it sent that carry TCP payload.
fn pump_recording_ttls(g: &mut Guest, srv: &mut Server) -> Vec<u8> {
    let mut ttls = Vec::new();
    for _ in 0..50 {
        g.iface.poll(smol_now(), &mut g.queues, &mut g.sockets);
        let out: Vec<_> = g.queues.to_guest.drain(..).collect();
        let sent = !out.is_empty();
        for p in out {
            srv.packet_from_guest(p);
        }
        srv.step(Instant::now());
        let back = srv.take_packets_to_guest();
        for p in &back {
            let ip = ipv4::Packet::new_checked(&p[..]).unwrap();
            let seg = tcp::Packet::new_checked(ip.payload()).unwrap();
            if !seg.payload().is_empty() {
                ttls.push(ip.ttl());
            }
        }
        if !sent && back.is_empty() {
            break;
        }
        g.queues.from_guest.extend(back);
    }
    ttls
}

fn session_put(ttl: &str) -> String {
    format!("PUT /computeMetadata/v1/token HTTP/1.1\r\nMetadata-Flavor: Google\r\nX-Metadata-Token-TTL-Seconds: {ttl}\r\nContent-Length: 0\r\n\r\n")
}

#[test]
fn session_token_replies_leave_with_ttl_1_and_gate_a_requiring_network() {
    let (mut srv, counters) = server(BridgeLimits::default());
    let mut md = sample();
    md.project.require_session_token = true;
    srv.metadata(md, Instant::now());
    let mut g = Guest::new();

    let h = g.connect(&mut srv);
    g.sockets
        .get_mut::<stcp::Socket>(h)
        .send_slice(session_put("60").as_bytes())
        .unwrap();
    let ttls = pump_recording_ttls(&mut g, &mut srv);
    let resp = g.received(h);
    assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{resp}");
    assert!(
        resp.contains("X-Metadata-Token-TTL-Seconds: 60\r\n"),
        "{resp}"
    );
    let token = resp.rsplit("\r\n\r\n").next().unwrap().to_string();
    assert_eq!(token.len(), 64, "{resp}");
    assert!(!ttls.is_empty() && ttls.iter().all(|t| *t == 1), "{ttls:?}");
    assert_eq!(counters.get("sessions_issued"), 1);

    // Another connection: without the token 401, with it 200, and normal TTLs.
    let h2 = g.connect(&mut srv);
    let name = "/computeMetadata/v1/instance/hostname";
    let no_token = format!("GET {name} HTTP/1.1\r\nMetadata-Flavor: Google\r\n\r\n");
    g.sockets
        .get_mut::<stcp::Socket>(h2)
        .send_slice(no_token.as_bytes())
        .unwrap();
    pump_recording_ttls(&mut g, &mut srv);
    let resp = g.received(h2);
    assert!(resp.starts_with("HTTP/1.1 401 Unauthorized\r\n"), "{resp}");
    let with = format!(
        "GET {name} HTTP/1.1\r\nMetadata-Flavor: Google\r\nX-Metadata-Token: {token}\r\n\r\n"
    );
    g.sockets
        .get_mut::<stcp::Socket>(h2)
        .send_slice(with.as_bytes())
        .unwrap();
    let ttls = pump_recording_ttls(&mut g, &mut srv);
    let resp = g.received(h2);
    assert!(resp.ends_with("\r\n\r\nvm-a"), "{resp}");
    assert!(ttls.iter().all(|t| *t == 64), "{ttls:?}");
    assert_eq!(counters.get("http_unauthorized"), 1);
}

#[test]
fn dns_for_other_names_goes_to_the_forwarder_and_its_answer_to_the_guest() {
    use hickory_proto::op::{Message, MessageType, OpCode, Query};
    use hickory_proto::rr::{Name, RecordType};
    let (mut srv, counters) = server(BridgeLimits::default());
    srv.forward_dns(true);
    let mut g = Guest::new();
    let meta = || vec![sudp::PacketMetadata::EMPTY; 4];
    let mut s = sudp::Socket::new(
        sudp::PacketBuffer::new(meta(), vec![0; 2048]),
        sudp::PacketBuffer::new(meta(), vec![0; 2048]),
    );
    s.bind(5353).unwrap();
    let h = g.sockets.add(s);
    let mut q = Message::new(9, MessageType::Query, OpCode::Query);
    q.add_query(Query::query(
        Name::from_ascii("svc.corp.example.").unwrap(),
        RecordType::A,
    ));
    let to = IpEndpoint::new(IpAddress::Ipv4(METADATA_IP), 53);
    g.sockets
        .get_mut::<sudp::Socket>(h)
        .send_slice(&q.to_vec().unwrap(), to)
        .unwrap();
    g.pump(&mut srv);
    assert!(
        g.sockets.get_mut::<sudp::Socket>(h).recv().is_err(),
        "no answer of its own"
    );
    let mut queries = srv.take_dns_queries();
    assert_eq!(queries.len(), 1);
    let (query, guest) = queries.pop().unwrap();
    assert_eq!(query, q.to_vec().unwrap());
    // The forwarder's answer (here: the query turned into an empty response) reaches the guest.
    let mut answer = Message::from_vec(&query).unwrap();
    answer.metadata.message_type = MessageType::Response;
    srv.dns_answer(&answer.to_vec().unwrap(), guest);
    srv.step(Instant::now());
    g.queues.from_guest.extend(srv.take_packets_to_guest());
    g.pump(&mut srv);
    let (reply, from) = g.sockets.get_mut::<sudp::Socket>(h).recv().unwrap();
    assert_eq!(from.endpoint, to);
    assert_eq!(Message::from_vec(reply).unwrap().metadata.id, 9);
    assert_eq!(counters.get("dns_forward_answered"), 1);
    assert_eq!(counters.get("dns_refused"), 0);
}

#[test]
fn a_bridged_service_gets_the_request_with_the_vms_identity_token() {
    use crate::bridge::service::{ServiceError, ServiceSpec};
    let (mut srv, counters) = server(BridgeLimits::default());
    let upstream: std::net::SocketAddr = "198.18.0.10:9000".parse().unwrap();
    srv.add_service(
        ServiceSpec {
            name: "inv".into(),
            port: 8080,
            upstream,
            audience: "https://inv.example".into(),
        },
        2,
    );
    let mut g = Guest::new();
    let h = g.connect_to(&mut srv, 8080);
    let guest_request =
        "GET /whoami HTTP/1.1\r\nHost: 169.254.169.254:8080\r\nAuthorization: Bearer mine\r\n\r\n";
    g.send(&mut srv, h, guest_request.as_bytes());
    // First the identity token for the service's audience, then the request with it.
    assert_eq!(
        srv.take_jobs(),
        vec![Job::Identity {
            audience: "https://inv.example".into(),
            full: false
        }]
    );
    let token = IdentityToken {
        token: "ID.JWT".into(),
        expires_in: 600,
    };
    srv.job_done(
        JobDone::Identity {
            audience: "https://inv.example".into(),
            full: false,
            result: Ok(token),
        },
        Instant::now(),
    );
    let jobs = srv.take_jobs();
    let [Job::Proxy {
        conn,
        generation,
        upstream: to,
        request,
    }] = jobs.as_slice()
    else {
        panic!("{jobs:?}");
    };
    assert_eq!(*to, upstream);
    let sent = String::from_utf8(request.clone()).unwrap();
    assert!(sent.contains("Authorization: Bearer ID.JWT\r\n"), "{sent}");
    assert!(!sent.contains("mine"), "{sent}");
    let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nvm-a".to_vec();
    srv.job_done(
        JobDone::Proxy {
            conn: *conn,
            generation: *generation,
            result: Ok(answer),
        },
        Instant::now(),
    );
    g.pump(&mut srv);
    assert!(g.received(h).ends_with("\r\n\r\nvm-a"));
    assert!(!g.sockets.get::<stcp::Socket>(h).may_recv(), "closed after");
    // The next request reuses the held token; a failing service answers 504, counted.
    let h2 = g.connect_to(&mut srv, 8080);
    g.send(&mut srv, h2, guest_request.as_bytes());
    let jobs = srv.take_jobs();
    let [Job::Proxy {
        conn, generation, ..
    }] = jobs.as_slice()
    else {
        panic!("{jobs:?}");
    };
    srv.job_done(
        JobDone::Proxy {
            conn: *conn,
            generation: *generation,
            result: Err(ServiceError::Timeout),
        },
        Instant::now(),
    );
    g.pump(&mut srv);
    assert!(g.received(h2).starts_with("HTTP/1.1 504"));
    assert_eq!(
        (
            counters.get("service_requests"),
            counters.get("service_errors")
        ),
        (2, 1)
    );
    // The metadata server on port 80 is untouched.
    let m = g.connect(&mut srv);
    g.send(
        &mut srv,
        m,
        get("/computeMetadata/v1/instance/hostname").as_bytes(),
    );
    assert!(g.received(m).ends_with("vm-a"));
}

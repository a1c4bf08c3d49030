//! The packet loop: one thread, epoll on the VNP socket and the TUN device.
//! VNP in -> receive checks -> outbound translation -> TUN; TUN -> inbound translation ->
//! token for the VM -> VNP out. Every drop is counted by reason.

use crate::Shared;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use vnp_gateway::rx::{check_datagram, check_not_own_address, ExpiryPolicy, RxContext};
use vnp_gateway::services;
use vnp_gateway::tokens::{
    return_token, with_options_flag, ReturnTokens, RETURN_TOKEN_MAX_INNER, RETURN_TOKEN_TTL_SECS,
};
use vnp_gateway::translate::{inbound, outbound};
use vnp_gateway::DropReason;
use vnp_lb::{FlowTable, FlowTimeouts};
use vnp_protocol::token::TokenMinter;
use vnp_protocol::wire::{ipv4, HEADER_LEN};

/// The two descriptors.
#[derive(Debug)]
pub struct Io {
    pub socket: UdpSocket,
    pub tun: File,
}

const SOCKET: u64 = 1;
const TUN: u64 = 2;
/// Packets handled per readiness before looking at the other descriptor.
const BATCH: usize = 64;
/// Load-balanced flows remembered (about 100 bytes each).
const FLOW_TABLE_CAPACITY: usize = 1 << 20;

/// What the gateway needs to hand VMs return tokens for itself (`vnp_gateway::tokens`), so
/// that the replies of flows that came in through it leave through it.
struct ReturnTokenMint<'a> {
    minter: &'a TokenMinter,
    local: SocketAddrV4,
    ttl: u32,
    claims: ReturnTokens,
}

/// Runs until an unrecoverable error.
pub fn run(
    mut io: Io,
    shared: &Shared,
    minter: &TokenMinter,
    local: SocketAddrV4,
    expiry: ExpiryPolicy,
) -> io::Result<()> {
    let ep = epoll::create(true)?;
    for (fd, token) in [(io.socket.as_raw_fd(), SOCKET), (io.tun.as_raw_fd(), TUN)] {
        let event = epoll::Event::new(epoll::Events::EPOLLIN, token);
        epoll::ctl(ep, epoll::ControlOptions::EPOLL_CTL_ADD, fd, event)?;
    }
    let mut events = [epoll::Event::new(epoll::Events::empty(), 0); 4];
    let mut buf = vec![0u8; 65536];
    let mut flows = FlowTable::new(FLOW_TABLE_CAPACITY, FlowTimeouts::default());
    let mut expired_at = crate::lb::now_ms();
    let mut mint = ReturnTokenMint {
        minter,
        local,
        ttl: RETURN_TOKEN_TTL_SECS.min(expiry.max_ttl_secs),
        claims: ReturnTokens::default(),
    };
    loop {
        // Wake at least once a second to expire idle load-balanced flows.
        let now = crate::lb::now_ms();
        if now >= expired_at + 1000 {
            flows.expire(now);
            expired_at = now;
            shared.lb.set_flows(flows.len());
        }
        let n = match epoll::wait(ep, 1000, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        for ev in &events[..n] {
            match ev.data {
                SOCKET => from_vms(&mut io, shared, minter, local, expiry, &mut buf)?,
                _ => from_public(&mut io, shared, &mut flows, &mut mint, &mut buf)?,
            }
        }
    }
}

/// Whether an I/O error just means "nothing more now".
fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

fn from_vms(
    io: &mut Io,
    shared: &Shared,
    minter: &TokenMinter,
    local: SocketAddrV4,
    expiry: ExpiryPolicy,
    buf: &mut [u8],
) -> io::Result<()> {
    for _ in 0..BATCH {
        let (len, src) = match io.socket.recv_from(buf) {
            Ok((len, SocketAddr::V4(src))) => (len, src),
            Ok(_) => continue,
            Err(e) if would_block(&e) => return Ok(()),
            Err(e) => return Err(e),
        };
        let now = crate::control::vnp_gateway_now();
        // Two reference-count bumps under one read lock; the tables themselves are shared.
        let (table, services) = {
            let state = shared.state.read().unwrap_or_else(|e| e.into_inner());
            (Arc::clone(&state.table), Arc::clone(&state.services))
        };
        let ctx = RxContext {
            local,
            network_id: table.network_id,
            network_cidr: table.network_cidr,
            expiry,
        };
        let result = check_datagram(&ctx, minter, &buf[..len], src, now).and_then(|inner| {
            let packet = &mut buf[inner];
            if services::is_probe_answer(&services, &table, packet) {
                // A health check's answer: to the kernel as it is.
                return Ok(packet);
            }
            match services::outbound(&services, &table, packet) {
                Some(reply) => reply?,
                None => {
                    check_not_own_address(*local.ip(), packet)?;
                    outbound(&table, packet)?
                }
            };
            Ok(packet)
        });
        match result {
            Ok(packet) => {
                let sport = source_port(packet);
                // A TUN write takes a whole packet or fails.
                match io.tun.write(packet) {
                    Ok(n) if n == packet.len() => {
                        shared.metrics.port_used(sport, now);
                        count(&shared.metrics.outbound_packets);
                    }
                    Ok(n) => {
                        log::debug!("TUN took {n} of {} bytes", packet.len());
                        shared.metrics.drop(DropReason::SendFailed);
                    }
                    Err(e) => {
                        log::debug!("TUN write: {e}");
                        shared.metrics.drop(DropReason::SendFailed);
                    }
                }
            }
            Err(why) => shared.metrics.drop(why),
        }
    }
    Ok(())
}

fn from_public(
    io: &mut Io,
    shared: &Shared,
    flows: &mut FlowTable,
    mint: &mut ReturnTokenMint<'_>,
    buf: &mut [u8],
) -> io::Result<()> {
    let own = *mint.local.ip();
    for _ in 0..BATCH {
        // The VNP header goes in front of the packet: read the packet after room for it.
        let len = match io.tun.read(&mut buf[HEADER_LEN..]) {
            Ok(len) => len,
            Err(e) if would_block(&e) => return Ok(()),
            Err(e) => return Err(e),
        };
        let now = crate::control::vnp_gateway_now();
        let state = shared.state.read().unwrap_or_else(|e| e.into_inner());
        let packet = &mut buf[HEADER_LEN..HEADER_LEN + len];
        let forwarded = is_forwarded(&state.table, packet);
        let now_ms = crate::lb::now_ms();
        let placed = match services::probe_out(&state.table, own, packet) {
            Some(probe) => probe,
            None => place(shared, &state, flows, packet, now_ms),
        };
        let vm = match placed {
            Ok(vm) => &state.table.vms[vm],
            Err(why) => {
                shared.metrics.drop(why);
                continue;
            }
        };
        if vm.location.is_none() {
            shared.metrics.drop(DropReason::NoLocation);
            continue;
        }
        let Some(route) = state.tokens.get(vm.ip, now).copied() else {
            shared.metrics.drop(DropReason::NoToken);
            let ip = vm.ip;
            drop(state);
            shared
                .wants
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(ip);
            continue;
        };
        let (vm_ip, network_id) = (vm.ip, state.table.network_id);
        drop(state);
        let mut end = HEADER_LEN + len;
        let mut header = route.header;
        if len <= RETURN_TOKEN_MAX_INNER && mint.claims.claim(vm_ip, now) {
            let rt = return_token(
                mint.minter,
                mint.local,
                &route,
                vm_ip,
                network_id,
                (now, mint.ttl),
            );
            if let Some(n) = rt.emit(&mut buf[end..]) {
                end += n;
                header = with_options_flag(header);
            }
        }
        buf[..HEADER_LEN].copy_from_slice(&header);
        match io.socket.send_to(&buf[..end], route.to) {
            Ok(_) => {
                count(&shared.metrics.inbound_packets);
                if forwarded {
                    count(&shared.metrics.forwarded_in_packets);
                }
            }
            Err(e) => {
                log::debug!("send to {}: {e}", route.to);
                shared.metrics.drop(DropReason::SendFailed);
            }
        }
    }
    Ok(())
}

/// The VM a public packet goes to: a load-balanced service's choice, else NAT return traffic
/// or a forwarding rule.
fn place(
    shared: &Shared,
    state: &crate::State,
    flows: &mut FlowTable,
    packet: &mut [u8],
    now_ms: u64,
) -> Result<usize, DropReason> {
    match services::inbound(&state.services, &state.table, flows, packet, now_ms) {
        Some(Ok(placed)) => {
            shared.lb.placed(&state.services, &state.table, &placed);
            Ok(placed.vm)
        }
        Some(Err(why)) => Err(why),
        None => inbound(&state.table, packet),
    }
}

fn count(c: &std::sync::atomic::AtomicU64) {
    c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// The L4 source port of a translated outbound packet (0 for ICMP: echo ids are not ports).
fn source_port(packet: &[u8]) -> u16 {
    let ip = ipv4::Packet::new_unchecked(packet);
    let payload = ip.payload();
    match ip.protocol() {
        ipv4::PROTO_TCP | ipv4::PROTO_UDP if payload.len() >= 2 => {
            u16::from_be_bytes([payload[0], payload[1]])
        }
        _ => 0,
    }
}

/// Whether a public packet's destination port matches a forwarding rule (for the counter).
fn is_forwarded(table: &vnp_gateway::table::NatTable, packet: &[u8]) -> bool {
    let Ok(ip) = ipv4::Packet::new_checked(packet) else {
        return false;
    };
    let payload = ip.payload();
    matches!(ip.protocol(), ipv4::PROTO_TCP | ipv4::PROTO_UDP)
        && payload.len() >= 4
        && table
            .forward_in(ip.protocol(), u16::from_be_bytes([payload[2], payload[3]]))
            .is_some()
}

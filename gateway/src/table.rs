//! The gateway's lookup tables, built from the registry's `GatewayConfig`: which VM owns a
//! public port (NAT blocks, forwarding rules) and what a VM may send. Rebuilt whole on every
//! change (the registry is the only source of truth; nothing here is learned from packets), so
//! two gateways given the same config decide every packet the same way.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use vnp_registry_client::api::{GatewayConfig, L4Proto};
use vnp_registry_client::net::{Ipv4Cidr, PortRange};

/// Index of a VM in [`NatTable::vms`].
pub type VmIndex = usize;

/// What the gateway knows about one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmEntry {
    pub id: String,
    pub ip: Ipv4Addr,
    pub nat_ports: Vec<PortRange>,
    /// Where it is reached (VNP): `None` while on no host.
    pub location: Option<(Ipv4Addr, u16)>,
    /// Pair policy allows it to start outside connections.
    pub egress: bool,
}

/// A forwarding rule as the data path uses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForwardTarget {
    pub vm: VmIndex,
    pub vm_port: u16,
    pub public_port: u16,
}

/// Everything the data path looks up, immutable once built.
#[derive(Debug, Clone)]
pub struct NatTable {
    pub public_addr: Ipv4Addr,
    pub network_cidr: Ipv4Cidr,
    pub network_id: u32,
    pub vms: Vec<VmEntry>,
    /// NAT blocks sorted by first port, with their owner: binary search by port.
    blocks: Vec<(PortRange, VmIndex)>,
    by_ip: HashMap<Ipv4Addr, VmIndex>,
    /// (protocol number, public port) -> target.
    inbound_forwards: HashMap<(u8, u16), ForwardTarget>,
    /// (VM, protocol number, VM port) -> target: replies leaving through a forwarding rule.
    outbound_forwards: HashMap<(VmIndex, u8, u16), ForwardTarget>,
}

impl NatTable {
    /// Builds the tables. Blocks that overlap (which the registry never hands out) are kept
    /// with the first owner only, so a port never has two owners.
    pub fn from_config(cfg: &GatewayConfig) -> NatTable {
        let vms: Vec<VmEntry> = cfg
            .vms
            .iter()
            .map(|v| VmEntry {
                id: v.id.clone(),
                ip: v.ip,
                nat_ports: v.nat_ports.clone(),
                location: v.location.map(|l| (l.host_addr, l.port)),
                egress: v.egress,
            })
            .collect();
        let by_ip = vms.iter().enumerate().map(|(i, v)| (v.ip, i)).collect();
        let index_of: HashMap<&str, VmIndex> = vms
            .iter()
            .enumerate()
            .map(|(i, v)| (v.id.as_str(), i))
            .collect();
        let mut blocks: Vec<(PortRange, VmIndex)> = vms
            .iter()
            .enumerate()
            .flat_map(|(i, v)| v.nat_ports.iter().map(move |b| (*b, i)))
            .collect();
        blocks.sort_by_key(|(b, _)| b.first);
        let mut disjoint: Vec<(PortRange, VmIndex)> = Vec::with_capacity(blocks.len());
        for (b, i) in blocks {
            if disjoint.last().is_none_or(|(last, _)| last.last < b.first) {
                disjoint.push((b, i));
            }
        }
        let mut inbound_forwards = HashMap::new();
        let mut outbound_forwards = HashMap::new();
        for f in cfg
            .forwards
            .iter()
            .filter(|f| f.public_addr == cfg.gateway.public_addr)
        {
            let Some(&vm) = index_of.get(f.vm.as_str()) else {
                continue;
            };
            let target = ForwardTarget {
                vm,
                vm_port: f.vm_port,
                public_port: f.public_port,
            };
            inbound_forwards.insert((f.proto.number(), f.public_port), target);
            outbound_forwards.insert((vm, f.proto.number(), f.vm_port), target);
        }
        NatTable {
            public_addr: cfg.gateway.public_addr,
            network_cidr: cfg.network.cidr,
            network_id: cfg.network.vni,
            vms,
            blocks: disjoint,
            by_ip,
            inbound_forwards,
            outbound_forwards,
        }
    }

    /// The VM with address `ip`.
    pub fn vm_by_ip(&self, ip: Ipv4Addr) -> Option<VmIndex> {
        self.by_ip.get(&ip).copied()
    }

    /// The VM whose NAT blocks hold `port` (return traffic): a binary search over the sorted,
    /// disjoint blocks.
    pub fn nat_owner(&self, port: u16) -> Option<VmIndex> {
        let i = self.blocks.partition_point(|(b, _)| b.first <= port);
        let (block, vm) = self.blocks.get(i.checked_sub(1)?)?;
        block.contains(port).then_some(*vm)
    }

    /// The forwarding rule for inbound `proto` traffic to public `port`.
    pub fn forward_in(&self, proto: u8, port: u16) -> Option<ForwardTarget> {
        self.inbound_forwards.get(&(proto, port)).copied()
    }

    /// The forwarding rule a reply from `vm`'s `proto` port `vm_port` leaves through.
    pub fn forward_out(&self, vm: VmIndex, proto: u8, vm_port: u16) -> Option<ForwardTarget> {
        self.outbound_forwards.get(&(vm, proto, vm_port)).copied()
    }

    /// Number of forwarding rules on this public address.
    pub fn forward_count(&self) -> usize {
        self.inbound_forwards.len()
    }

    /// Whether `proto` is one forwarding rules can name.
    pub fn forwardable(proto: u8) -> bool {
        proto == L4Proto::Tcp.number() || proto == L4Proto::Udp.number()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;
    use vnp_registry_client::api::*;

    pub const PUBLIC: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
    pub const A: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);
    pub const B: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 3);

    fn range(first: u16, last: u16) -> PortRange {
        PortRange { first, last }
    }

    /// VM a: 1024-1535 and 2048-2559, egress; VM b: 1536-2047, no egress, forward 443 -> b:8443.
    pub fn config() -> GatewayConfig {
        let peer = |id: &str, ip, blocks: Vec<PortRange>, egress, last| GatewayPeer {
            id: id.into(),
            ip,
            nat_ports: blocks,
            location: Some(UnderlayAddr {
                host_addr: Ipv4Addr::new(198, 18, 0, last),
                port: 40000,
            }),
            egress,
        };
        GatewayConfig {
            generation: 1,
            gateway: Gateway {
                id: "g1".into(),
                network: "n1".into(),
                vni: 7,
                underlay_addr: Ipv4Addr::new(198, 18, 0, 9),
                port: 6081,
                public_addr: PUBLIC,
                secret_generation: 1,
            },
            network: Network {
                id: "n1".into(),
                vni: 7,
                cidr: "10.1.0.0/24".parse().unwrap(),
                router: Ipv4Addr::new(10, 1, 0, 1),
                mtu: 1400,
                default_policy: PolicyAction::Allow,
                nat_block: 512,
            },
            pool: vec![],
            vms: vec![
                peer("a", A, vec![range(1024, 1535), range(2048, 2559)], true, 1),
                peer("b", B, vec![range(1536, 2047)], false, 2),
            ],
            forwards: vec![ForwardRule {
                id: "web".into(),
                network: "n1".into(),
                public_addr: PUBLIC,
                public_port: 443,
                proto: L4Proto::Tcp,
                vm: "b".into(),
                vm_port: 8443,
            }],
            services: vec![],
            probe_sources: vec![],
        }
    }

    #[test]
    fn lookups() {
        let t = NatTable::from_config(&config());
        assert_eq!(t.nat_owner(1024), Some(0));
        assert_eq!(t.nat_owner(1535), Some(0));
        assert_eq!(t.nat_owner(1536), Some(1));
        assert_eq!(t.nat_owner(2559), Some(0));
        assert_eq!(t.nat_owner(2560), None);
        assert_eq!(t.nat_owner(1023), None);
        assert_eq!(t.nat_owner(0), None);
        assert_eq!(t.vm_by_ip(B), Some(1));
        let f = t.forward_in(6, 443).unwrap();
        assert_eq!((f.vm, f.vm_port), (1, 8443));
        assert_eq!(t.forward_in(17, 443), None);
        assert_eq!(t.forward_out(1, 6, 8443).map(|f| f.public_port), Some(443));
        assert_eq!(t.forward_out(0, 6, 8443), None);
    }

    proptest! {
        /// The binary search agrees with a linear scan over every VM's blocks.
        #[test]
        fn nat_owner_matches_linear_scan(
            starts in proptest::collection::btree_set(1u16..120, 1..30),
            probe in any::<u16>(),
        ) {
            let mut cfg = config();
            cfg.forwards.clear();
            cfg.vms = starts
                .iter()
                .enumerate()
                .map(|(i, s)| GatewayPeer {
                    id: format!("v{i}"),
                    ip: Ipv4Addr::new(10, 1, 1, i as u8),
                    nat_ports: vec![range(s * 512, s * 512 + 511)],
                    location: None,
                    egress: true,
                })
                .collect();
            let t = NatTable::from_config(&cfg);
            let linear = t
                .vms
                .iter()
                .position(|v| v.nat_ports.iter().any(|b| b.contains(probe)));
            prop_assert_eq!(t.nat_owner(probe), linear);
        }
    }
}

//! `vnpctl lb create|list|show|rm|add-member|rm-member`: load-balanced services,
//! `public_addr:port/proto -> a pool of VMs` with health checks (`docs/load-balancing.md`).

use crate::output::{json as to_json, table};
use vnp_registry_client::api::*;
use vnp_registry_client::RegistryClient;

/// `vnpctl lb` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum LbCmd {
    /// Create a service on a gateway's public address.
    Create {
        id: String,
        /// Public address (a gateway's) and port: `203.0.113.1:80`.
        #[arg(long)]
        public: std::net::SocketAddrV4,
        #[arg(long, default_value = "tcp")]
        proto: L4Proto,
        /// Port on the VMs (default the public port).
        #[arg(long)]
        vm_port: Option<u16>,
        /// Pool entries: `vm:ID` or `tag:TAG`, optionally `=WEIGHT` (repeat).
        #[arg(long = "member")]
        members: Vec<String>,
        /// Health check: `tcp`, or `http:/PATH` optionally `=STATUS` (default 200).
        #[arg(long, default_value = "tcp")]
        check: String,
        /// Port the check probes (default the VM port).
        #[arg(long)]
        check_port: Option<u16>,
        #[arg(long, default_value_t = 2000)]
        interval_ms: u64,
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
        #[arg(long, default_value_t = 2)]
        rise: u32,
        #[arg(long, default_value_t = 3)]
        fall: u32,
        /// Maglev table size, a prime (default 65537).
        #[arg(long)]
        table_size: Option<u32>,
    },
    /// List services.
    List {
        #[arg(long)]
        network: Option<String>,
    },
    /// A service, its pool, and its resolved members.
    Show { id: String },
    /// Remove a service.
    Rm { id: String },
    /// Add a pool entry (`vm:ID` or `tag:TAG`, optionally `=WEIGHT`), or change its weight.
    AddMember { id: String, member: String },
    /// Remove a pool entry (`vm:ID` or `tag:TAG`).
    RmMember { id: String, member: String },
}

/// Parses `vm:ID[=W]` or `tag:T[=W]` (weight default 1).
pub fn parse_member(s: &str) -> Result<PoolMember, String> {
    let (selector, weight) = match s.split_once('=') {
        Some((sel, w)) => (
            sel,
            w.parse()
                .map_err(|_| format!("member {s:?}: weight {w:?} is not a number"))?,
        ),
        None => (s, 1),
    };
    let (vm, tag) = match selector.split_once(':') {
        Some(("vm", id)) if !id.is_empty() => (Some(id.to_string()), None),
        Some(("tag", t)) if !t.is_empty() => (None, Some(t.to_string())),
        _ => {
            return Err(format!(
                "member {s:?}: expected vm:ID or tag:TAG, then =WEIGHT"
            ))
        }
    };
    Ok(PoolMember { vm, tag, weight })
}

/// Parses `tcp` or `http:/PATH[=STATUS]`.
pub fn parse_check(s: &str) -> Result<Option<HttpCheck>, String> {
    if s == "tcp" {
        return Ok(None);
    }
    let Some(rest) = s.strip_prefix("http:") else {
        return Err(format!("check {s:?}: expected tcp or http:/PATH[=STATUS]"));
    };
    let (path, status) = match rest.rsplit_once('=') {
        Some((p, st)) => (
            p,
            st.parse()
                .map_err(|_| format!("check {s:?}: status {st:?} is not a number"))?,
        ),
        None => (rest, 200),
    };
    Ok(Some(HttpCheck {
        path: path.to_string(),
        expect_status: status,
    }))
}

fn check_text(s: &Service) -> String {
    let h = &s.health;
    let kind = match &h.http {
        Some(http) => format!("http {} -> {}", http.path, http.expect_status),
        None => "tcp".into(),
    };
    format!(
        "{kind} :{} every {} ms, timeout {} ms, rise {}, fall {}",
        s.check_port(),
        h.interval_ms,
        h.timeout_ms,
        h.rise,
        h.fall
    )
}

/// The services as a table.
pub fn services_table(services: &[Service]) -> String {
    let rows = services
        .iter()
        .map(|s| {
            let pool: Vec<String> = s
                .members
                .iter()
                .map(|m| format!("{}={}", m.selector(), m.weight))
                .collect();
            vec![
                s.id.clone(),
                format!("{}:{}/{}", s.public_addr, s.public_port, s.proto),
                s.vm_port.to_string(),
                pool.join(","),
                s.network.clone(),
            ]
        })
        .collect::<Vec<_>>();
    table(&["ID", "PUBLIC", "VM PORT", "POOL", "NETWORK"], &rows)
}

fn status_text(st: &ServiceStatus) -> String {
    let mut out = services_table(std::slice::from_ref(&st.service));
    out.push_str(&format!(
        "check: {}\ntable size: {}\n",
        check_text(&st.service),
        st.service.table_size
    ));
    let rows = st
        .pool
        .iter()
        .map(|m| vec![m.vm.clone(), m.ip.to_string(), m.weight.to_string()])
        .collect::<Vec<_>>();
    out.push_str(&table(&["VM", "ADDRESS", "WEIGHT"], &rows));
    out.push_str(&views_table(st));
    out
}

/// Each gateway's last reported view: one row per (gateway, member).
fn views_table(st: &ServiceStatus) -> String {
    if st.views.is_empty() {
        return "health: no gateway has reported\n".into();
    }
    let rows = st
        .views
        .iter()
        .flat_map(|v| {
            v.members.iter().map(move |m| {
                vec![
                    v.gateway.clone(),
                    m.vm.clone(),
                    if m.up { "up" } else { "down" }.to_string(),
                    v.reported_at.to_string(),
                ]
            })
        })
        .collect::<Vec<_>>();
    table(&["GATEWAY", "VM", "HEALTH", "REPORTED (UNIX S)"], &rows)
}

/// Runs the subcommand.
pub fn run(c: &RegistryClient, cmd: &LbCmd, json: bool) -> Result<String, String> {
    let e = |e: vnp_registry_client::ClientError| e.to_string();
    let one = |s: Service| {
        if json {
            to_json(&s)
        } else {
            services_table(&[s])
        }
    };
    match cmd {
        LbCmd::Create {
            id,
            public,
            proto,
            vm_port,
            members,
            check,
            check_port,
            interval_ms,
            timeout_ms,
            rise,
            fall,
            table_size,
        } => {
            let spec = ServiceSpec {
                id: id.clone(),
                public_addr: *public.ip(),
                public_port: public.port(),
                proto: *proto,
                vm_port: *vm_port,
                members: members
                    .iter()
                    .map(|m| parse_member(m))
                    .collect::<Result<_, _>>()?,
                health: HealthCheckSpec {
                    http: parse_check(check)?,
                    port: *check_port,
                    interval_ms: *interval_ms,
                    timeout_ms: *timeout_ms,
                    rise: *rise,
                    fall: *fall,
                },
                table_size: *table_size,
            };
            c.create_service(&spec).map(one).map_err(e)
        }
        LbCmd::List { network } => {
            let list = c.list_services(network.as_deref()).map_err(e)?;
            Ok(if json {
                to_json(&list)
            } else {
                services_table(&list)
            })
        }
        LbCmd::Show { id } => {
            let st = c.get_service(id).map_err(e)?;
            Ok(if json { to_json(&st) } else { status_text(&st) })
        }
        LbCmd::Rm { id } => {
            let d = c.delete_service(id).map_err(e)?;
            Ok(if json {
                to_json(&d)
            } else {
                crate::deleted(&d)
            })
        }
        LbCmd::AddMember { id, member } => {
            let m = parse_member(member)?;
            c.add_service_member(id, &m).map(one).map_err(e)
        }
        LbCmd::RmMember { id, member } => {
            let m = parse_member(member)?;
            c.remove_service_member(id, m.vm.as_deref(), m.tag.as_deref())
                .map(one)
                .map_err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members() {
        let m = parse_member("vm:web-1=3").unwrap();
        assert_eq!((m.vm.as_deref(), m.tag, m.weight), (Some("web-1"), None, 3));
        let t = parse_member("tag:web").unwrap();
        assert_eq!((t.vm, t.tag.as_deref(), t.weight), (None, Some("web"), 1));
        for bad in ["web-1", "vm:", "host:a", "vm:a=x", "tag:=2"] {
            assert!(parse_member(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn checks() {
        assert_eq!(parse_check("tcp"), Ok(None));
        let h = parse_check("http:/healthz=204").unwrap().unwrap();
        assert_eq!((h.path.as_str(), h.expect_status), ("/healthz", 204));
        assert_eq!(parse_check("http:/").unwrap().unwrap().expect_status, 200);
        assert!(parse_check("udp").is_err());
        assert!(parse_check("http:/x=ok").is_err());
    }
}

//! vnp demo: a registry, two hosts (network namespaces) each running vnpd, and one QEMU guest
//! per host talking over VNP. Nothing to configure; prints every step; removes everything it
//! created when it ends, also on Ctrl-C.
//!
//! Needs root, QEMU 10 and the guest image (`scripts/demo` runs `scripts/setup` first).

use anyhow::{bail, Context, Result};
use qemu_launch::{migrate, tcp_transfer, Guest, MigrateOptions, TcpTransferSpec};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vnp_e2e::cluster::{wait_dhcp, Cluster, ClusterOptions, NETWORK, NETWORK_CIDR};
use vnp_e2e::edge::{PublicEdge, GATEWAY_PORT, PUBLIC_ADDR, PUBLIC_HOST};
use vnp_e2e::migration::{begin_migration, cancel_slow_migration, destination_spec};
use vnpd_admin_api::AttachmentInfo;

/// What must be removed if the demo is interrupted: the cluster's directory (every process
/// it started mentions it on its command line) and its namespaces.
type Created = Arc<Mutex<Option<(PathBuf, Vec<String>)>>>;

const CMD: Duration = Duration::from_secs(60);
const TRANSFER_BYTES: u64 = 10 * 1024 * 1024;
/// Pings (20 a second) vm-b sends vm-a across its migration.
const PINGS: u32 = 400;

fn say(step: &str) {
    println!("\n== {step}");
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("   | {l}\n"))
        .collect::<String>()
}

fn main() {
    if unsafe_uid() != 0 {
        eprintln!("vnp-demo: must run as root (network namespaces, QEMU); try: sudo scripts/demo");
        std::process::exit(1);
    }
    let created: Created = Arc::new(Mutex::new(None));
    let created2 = Arc::clone(&created);
    let worker = std::thread::spawn(move || run(&created2));
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .expect("signal handlers");
    loop {
        if worker.is_finished() {
            let code = match worker.join() {
                Ok(Ok(())) => {
                    println!("\nvnp demo finished: everything it started has been removed.");
                    0
                }
                Ok(Err(e)) => {
                    eprintln!("\nvnp demo failed: {e:#}");
                    1
                }
                Err(_) => {
                    eprintln!("\nvnp demo failed (panic); everything it started has been removed.");
                    1
                }
            };
            std::process::exit(code);
        }
        if let Some(sig) = signals.pending().next() {
            eprintln!("\nsignal {sig}: stopping and cleaning up");
            let taken = created.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some((dir, namespaces)) = taken {
                emergency_cleanup(&dir, &namespaces);
            }
            std::process::exit(130);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn unsafe_uid() -> u32 {
    // SAFETY: getuid(2) cannot fail and has no preconditions.
    unsafe { libc::getuid() }
}

/// Kills every process of the cluster, deletes its namespaces and its directory. Used when
/// the demo is interrupted in the middle of a step (the normal path cleans up by dropping).
fn emergency_cleanup(dir: &std::path::Path, namespaces: &[String]) {
    let needle = dir.to_string_lossy().to_string();
    for _ in 0..20 {
        let procs = vnp_testkit::process::processes_matching(&needle);
        if procs.is_empty() {
            break;
        }
        for (pid, _) in procs {
            if let Ok(pid) = libc::pid_t::try_from(pid) {
                // SAFETY: kill(2) has no memory-safety preconditions.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for ns in namespaces {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", ns])
            .status();
    }
    let _ = std::fs::remove_dir_all(dir);
    eprintln!(
        "removed {} and namespaces {}",
        dir.display(),
        namespaces.join(", ")
    );
}

fn run(created: &Created) -> Result<()> {
    println!("vnp demo: a registry, two hosts each running vnpd, one QEMU guest per host.");
    println!("Guests talk over VNP: UDP between hosts, every packet checked by token.");

    say("1. Registry and hosts");
    let started = Instant::now();
    let mut cluster = Cluster::start(&ClusterOptions {
        prefix: "vnpdemo".into(),
        ..ClusterOptions::default()
    })
    .context("starting the registry and the hosts")?;
    *created.lock().unwrap_or_else(|e| e.into_inner()) =
        Some((cluster.dir().to_path_buf(), cluster.namespace_names()));
    println!(
        "   dev CA made with `vnpctl ca init`; registry (mutual TLS) at https://198.18.0.1:7443 in namespace {}",
        cluster.fabric().core().name()
    );
    for i in 0..2 {
        let h = cluster.host(i);
        println!(
            "   host {}: namespace {}, underlay {}, vnpd pid {} (admin socket {}, metrics http://{}/metrics)",
            h.id,
            cluster.host_ns(i).name(),
            h.addr,
            h.vnpd_pid().unwrap_or(0),
            h.admin_socket.display(),
            h.metrics_addr()
        );
    }
    println!("   ({:.1}s)", started.elapsed().as_secs_f64());

    say("2. Network and VMs in the registry; a gateway to a public network");
    let rec_a = cluster.create_vm("vm-a", 0, &[])?;
    let rec_b = cluster.create_vm("vm-b", 1, &[])?;
    let mut edge = PublicEdge::create(&mut cluster, "gw1", NETWORK).context("the public edge")?;
    {
        let mut names = cluster.namespace_names();
        names.extend(edge.namespace_names());
        *created.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((cluster.dir().to_path_buf(), names));
    }
    edge.start_gateway(&cluster, 2)
        .with_context(|| edge.logs(&cluster))?;
    println!(
        "   vnp-gateway gw1 at {}:{GATEWAY_PORT} (its own namespace, a TUN to the public side), public address {PUBLIC_ADDR}",
        edge.addr()
    );
    println!("   network {NETWORK} {NETWORK_CIDR}");
    for r in [&rec_a, &rec_b] {
        println!(
            "   {}: address {} mac {} on host {} (udp port {})",
            r.id,
            r.ip,
            r.mac,
            r.host.as_deref().unwrap_or("-"),
            r.host_port.unwrap_or(0)
        );
    }

    say("3. Attach the VMs to vnpd (vnpctl vnpd attach)");
    let att_a = cluster.attach(0, "vm-a")?;
    let att_b = cluster.attach(1, "vm-b")?;
    for a in [&att_a, &att_b] {
        print_attachment(a);
    }

    say("4. Boot the guests (QEMU under TCG, busybox; takes a little while)");
    let t = Instant::now();
    let mut ga = cluster.launch_guest(&att_a)?;
    let mut gb = cluster.launch_guest(&att_b)?;
    println!("   both guests booted ({:.1}s)", t.elapsed().as_secs_f64());

    say("5. DHCP, answered by vnpd from the registry's record");
    for (g, rec) in [(&mut ga, &rec_a), (&mut gb, &rec_b)] {
        let (addr, router, mtu) = wait_dhcp(g).with_context(|| cluster.logs())?;
        println!("   {}: {addr} router {router} mtu {mtu}", g.name());
        if addr != format!("{}/24", rec.ip) {
            bail!("{} got {addr}, the registry says {}", g.name(), rec.ip);
        }
    }

    say(&format!("6. vm-a pings vm-b ({}) across hosts", rec_b.ip));
    let out = guest_cmd(&mut ga, &format!("ping -c 4 -W 5 {}", rec_b.ip))?;
    print!("{}", indent(&out));
    if !out.contains(" 0% packet loss") {
        bail!("ping lost packets\n{}", cluster.logs());
    }

    say("7. vm-a pings its router: vnpd answers ICMP echo itself (the virtual router)");
    let router = att_a.router_ip;
    let out = guest_cmd(&mut ga, &format!("ping -c 2 -W 5 {router}"))?;
    print!("{}", indent(&out));
    if !out.contains(" 0% packet loss") {
        bail!("the virtual router did not answer\n{}", cluster.logs());
    }

    say("8. Metadata: vm-a asks vnpd's service bridge, the way cloud guest agents do");
    show_metadata(&cluster, &mut ga)?;

    say("9. NAT: vm-a downloads from a web server on the public network, through vnpd and the gateway");
    show_nat(&cluster, &mut edge, &mut ga)?;

    say("10. Load balancing: service web on the public address, spread over vm-a and vm-b");
    show_load_balancing(&cluster, &edge, [&mut ga, &mut gb])?;

    say("11. 10 MiB over TCP from vm-a to vm-b (busybox nc), checked with sha256");
    let spec = TcpTransferSpec {
        bytes: TRANSFER_BYTES,
        ..TcpTransferSpec::default()
    };
    let transfer =
        tcp_transfer(&mut ga, &mut gb, rec_b.ip, spec).map_err(|e| anyhow::anyhow!("{e}"))?;
    println!("   sent     sha256 {}", transfer.sent_sha256);
    println!("   received sha256 {}", transfer.received_sha256);
    if !transfer.intact() {
        bail!("transfer damaged: {transfer}\n{}", cluster.logs());
    }
    println!(
        "   match: {} MiB in {:.1}s (guests run under TCG emulation)",
        TRANSFER_BYTES >> 20,
        transfer.elapsed.as_secs_f64()
    );

    say("12. Live migration: vm-a moves to host b's vnpd while vm-b pings it");
    let mut ga = ga;
    cancelled_migration(&cluster, &mut ga, &mut gb, &rec_a.ip.to_string())?;
    let ga = live_migrate(&cluster, ga, &mut gb, &rec_a.ip.to_string())?;

    say("13. Counters (vnpd's Prometheus export, non-zero lines)");
    for i in 0..2 {
        let text = cluster.scrape(i)?;
        println!("   host {}:", cluster.host(i).id);
        for line in text.lines() {
            if line.starts_with('#') || line.ends_with(" 0") {
                continue;
            }
            println!("     {line}");
        }
    }
    println!(
        "   (tx_non_ipv4: the guests' IPv6 neighbour discovery; the virtual network carries IPv4)"
    );

    say("14. Cleaning up: guests, vnpd, registry, namespaces, files");
    let dir = cluster.dir().to_path_buf();
    drop(edge);
    drop(ga);
    drop(gb);
    drop(cluster);
    created.lock().unwrap_or_else(|e| e.into_inner()).take();
    if dir.exists() {
        bail!("{} was not removed", dir.display());
    }
    Ok(())
}

/// A file served by `python3 -m http.server` in the public namespace, fetched by the guest with
/// busybox `wget`; vnpd's NAT table and the gateway's counters afterwards.
fn show_nat(cluster: &Cluster, edge: &mut PublicEdge, g: &mut Guest) -> Result<()> {
    let www = cluster.dir().join("www");
    std::fs::create_dir_all(&www)?;
    let blob: Vec<u8> = (0..(2u64 << 20))
        .map(|i| (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8)
        .collect();
    std::fs::write(www.join("blob"), &blob)?;
    let www = www.to_string_lossy().into_owned();
    let host = PUBLIC_HOST.to_string();
    edge.spawn_public(
        "http-server",
        "python3",
        &[
            "-m",
            "http.server",
            "--bind",
            &host,
            "--directory",
            &www,
            "8000",
        ],
    )?;
    println!(
        "   python3 -m http.server on {PUBLIC_HOST}:8000 in the public namespace (2 MiB file)"
    );
    let url = format!("http://{PUBLIC_HOST}:8000/blob");
    let mut out = String::new();
    for _ in 0..20 {
        out = guest_cmd(
            g,
            &format!("wget -q -O /tmp/blob {url} && sha256sum /tmp/blob"),
        )?;
        if out.contains("/tmp/blob") {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    print!("{}", indent(&format!("$ wget {url} && sha256sum\n{out}")));
    let sum = std::process::Command::new("sha256sum")
        .arg(cluster.dir().join("www/blob"))
        .output()?;
    let sum = String::from_utf8_lossy(&sum.stdout).into_owned();
    let want = sum
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    if out.split_whitespace().next() != Some(want.as_str()) {
        bail!(
            "the download does not match {want}:\n{out}\n{}",
            edge.logs(cluster)
        );
    }
    println!("   sha256 matches the server's file");
    let nat = cluster
        .host(0)
        .admin()
        .nat("vm-a")
        .map_err(|e| anyhow::anyhow!("vnpctl vnpd nat vm-a: {e}"))?;
    println!("   vnpctl vnpd nat vm-a: NAT port blocks {:?}", nat.blocks);
    for f in &nat.flows {
        println!(
            "     {} vm-a:{} -> {}:{} leaves as port {} ({})",
            f.proto,
            f.local_port,
            f.remote,
            f.remote_port,
            f.mapped.map_or("-".to_string(), |p| p.to_string()),
            f.state
        );
    }
    let out_pkts = edge.metric(cluster, "vnp_gateway_outbound_packets_total", &[])?;
    println!("   the gateway sent {out_pkts} packets to the public side with source {PUBLIC_ADDR}");
    Ok(())
}

/// Connections from the public namespace to the service address, answered by the guests'
/// busybox `httpd`.
const LB_CLIENT: &str = r#"
import sys, urllib.request
for i in range(int(sys.argv[2])):
    print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode().strip(), flush=True)
"#;

/// Service `web` (`vnpctl lb create`): the gateway's public address, port 80, to port 8080 of
/// vm-a and vm-b, with TCP health checks the gateway runs through the virtual network. Each
/// guest serves its own name with busybox `httpd`; 40 connections from the public namespace
/// are spread over both by the gateway's Maglev table.
fn show_load_balancing(
    cluster: &Cluster,
    edge: &PublicEdge,
    guests: [&mut Guest; 2],
) -> Result<()> {
    for (g, name) in guests.into_iter().zip(["vm-a", "vm-b"]) {
        guest_cmd(
            g,
            &format!("mkdir -p /tmp/www && echo {name} > /tmp/www/index.html && httpd -p 8080 -h /tmp/www"),
        )?;
    }
    println!("   busybox httpd on port 8080 in vm-a and vm-b, each serving its own name");
    let public = format!("{PUBLIC_ADDR}:80");
    let args = [
        "lb",
        "create",
        "web",
        "--public",
        &public,
        "--vm-port",
        "8080",
        "--member",
        "vm:vm-a",
        "--member",
        "vm:vm-b",
        "--check",
        "tcp",
        "--interval-ms",
        "500",
        "--timeout-ms",
        "400",
    ];
    println!("   $ vnpctl {}", args.join(" "));
    cluster.vnpctl(&args)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = edge.scrape(cluster).unwrap_or_default();
        let up = |vm: &str| {
            vnpd::metrics::prometheus::sample_value(
                &text,
                "vnp_gateway_lb_member_up",
                &[("service", "web"), ("vm", vm)],
            ) == Some(1)
        };
        if up("vm-a") && up("vm-b") {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "the gateway's health checks did not find both guests up\n{}",
                edge.logs(cluster)
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    // The gateway publishes its view through the registry (what `vnpctl lb show` prints).
    loop {
        let st = cluster.registry(|r| r.get_service("web"))?;
        let ups = st
            .views
            .iter()
            .flat_map(|v| &v.members)
            .filter(|m| m.up)
            .count();
        if ups == 2 {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "the gateway did not publish its view: {:?}\n{}",
                st.views,
                edge.logs(cluster)
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    println!("   the gateway's health checks (TCP connect through VNP) found both guests up");
    let url = format!("http://{public}/");
    let out = edge
        .public()
        .command("python3")
        .args(["-c", LB_CLIENT, &url, "40"])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let count = |vm: &str| text.lines().filter(|l| l.trim() == vm).count();
    let (a, b) = (count("vm-a"), count("vm-b"));
    println!("   40 connections to {url} from {PUBLIC_HOST}: {a} answered by vm-a, {b} by vm-b");
    if a + b != 40 || a == 0 || b == 0 {
        bail!(
            "the service did not spread the connections: {text}{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            edge.logs(cluster)
        );
    }
    print!(
        "{}",
        indent(&format!(
            "$ vnpctl lb show web\n{}",
            cluster.vnpctl(&["lb", "show", "web"])?
        ))
    );
    Ok(())
}

/// DNS for `metadata.google.internal` and GETs with busybox `wget`, answered by vnpd on the
/// host from the registry; the access token checked against the registry's published keys.
fn show_metadata(cluster: &Cluster, g: &mut Guest) -> Result<()> {
    const MD: &str = "http://metadata.google.internal/computeMetadata/v1";
    let get = |g: &mut Guest, path: &str| -> Result<String> {
        guest_cmd(
            g,
            &format!("wget -q -O - --header 'Metadata-Flavor: Google' '{MD}/{path}'"),
        )
    };
    let resolved = guest_cmd(
        g,
        "nslookup metadata.google.internal | grep -E '^(Name|Address)' | tail -2",
    )?;
    print!(
        "{}",
        indent(&format!("$ nslookup metadata.google.internal\n{resolved}"))
    );
    for path in [
        "instance/hostname",
        "instance/network-interfaces/0/ip",
        "project/project-id",
    ] {
        let value = get(g, path)?;
        println!("   GET {path} -> {}", value.trim());
    }
    let refused = guest_cmd(
        g,
        &format!("wget -q -O - '{MD}/instance/hostname' 2>&1; true"),
    )?;
    println!(
        "   without the Metadata-Flavor header: {}",
        refused.lines().next().unwrap_or("").trim()
    );
    let body = get(g, "instance/service-accounts/default/token")?;
    let token: serde_json::Value = serde_json::from_str(&body).context("token JSON")?;
    let access = token["access_token"].as_str().unwrap_or_default();
    let jwks = cluster.registry(|r| r.jwks())?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let claims = vnp_registry_client::jwt::verify(access, &jwks, None, now)
        .map_err(|e| anyhow::anyhow!("the access token does not verify: {e:?}"))?;
    println!(
        "   access token ({} s): ES256 JWT, verified with the registry's JWKS: {claims:?}",
        token["expires_in"]
    );
    Ok(())
}

/// A migration cancelled during its pre-copy (`cancel_slow_migration`): the registry's move and host b's incoming attachment are undone, and vm-a, which
/// never stopped on host a, still answers there.
fn cancelled_migration(
    cluster: &Cluster,
    ga: &mut Guest,
    gb: &mut Guest,
    a_ip: &str,
) -> Result<()> {
    println!("   first a migration that is cancelled:");
    let spec = prepare_move(cluster, ga, "vm-a-cancelled")?;
    cancel_slow_migration(ga, spec).map_err(|e| anyhow::anyhow!("{e}\n{}", cluster.logs()))?;
    println!(
        "   QEMU: migration cancelled {} s into a pre-copy slowed to {} MB/s (QMP migrate_cancel)",
        vnp_e2e::migration::CANCEL_AFTER.as_secs(),
        vnp_e2e::migration::SLOW_PRECOPY / 1_000_000
    );
    cluster
        .host(1)
        .admin()
        .detach("vm-a")
        .map_err(|e| anyhow::anyhow!("detaching the incoming vm-a: {e}"))?;
    cluster.registry(|r| r.cancel_migration("vm-a"))?;
    let record = cluster.registry(|r| r.get_vm("vm-a"))?;
    let on_a = record
        .endpoint
        .is_some_and(|ep| ep.host_addr == cluster.host(0).addr);
    if !on_a || record.incoming.is_some() {
        bail!("vm-a did not stay on host a: {record:?}");
    }
    println!(
        "   undone: vnpctl vnpd detach vm-a on {}, vnpctl vm migrate vm-a --cancel; the registry \
         has vm-a on host a with no migration under way",
        cluster.host(1).id
    );
    let ping = guest_cmd(gb, &format!("ping -c 3 -W 5 {a_ip}"))?;
    if !ping.contains("3 packets received") {
        bail!(
            "vm-a does not answer on host a:\n{ping}\n{}",
            cluster.logs()
        );
    }
    println!("   vm-a still answers from host a: vm-b's ping got 3 of 3\n   then the real one:");
    Ok(())
}

/// `vnpctl vm migrate vm-a --host B` and `vnpctl vnpd attach vm-a --incoming` on host b;
/// returns the destination QEMU's spec (named `name`) on host b's socket.
fn prepare_move(cluster: &Cluster, ga: &Guest, name: &str) -> Result<qemu_launch::GuestSpec> {
    let h1 = cluster.host(1).id.clone();
    let att = begin_migration(cluster, "vm-a", 1)?;
    println!(
        "   vnpctl vm migrate vm-a --host {h1}: host a stays the owner until vm-a resumes on {h1}"
    );
    println!(
        "   vnpctl vnpd attach vm-a --incoming on {h1}: {}",
        att.socket_path.display()
    );
    destination_spec(ga, &att.socket_path, name, cluster.dir())
}

/// `vnpctl vm migrate`, an incoming attach on host b, QEMU's migration, and nothing else: host
/// b's vnpd registers the endpoint when the VM resumes there. Returns the migrated guest.
fn live_migrate(cluster: &Cluster, mut ga: Guest, gb: &mut Guest, a_ip: &str) -> Result<Guest> {
    gb.run_ok(
        &format!("ping -i 0.05 -c {PINGS} -W 1 {a_ip} > /tmp/mig-ping.log 2>&1 &"),
        CMD,
    )?;
    let spec = prepare_move(cluster, &ga, "vm-a-migrated")?;
    let (ga2, report) = migrate(&mut ga, spec, &MigrateOptions::default())
        .map_err(|e| anyhow::anyhow!("{e}\n{}", cluster.logs()))?;
    drop(ga);
    println!(
        "   QEMU migrated: {} ms total, {} ms downtime, {} MiB of RAM sent",
        report.total_ms,
        report.downtime_ms,
        report.ram_transferred_bytes >> 20
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let endpoint = loop {
        let ep = cluster.registry(|r| r.get_vm("vm-a"))?.endpoint;
        match ep {
            Some(ep) if ep.host_addr == cluster.host(1).addr => break ep,
            _ if Instant::now() > deadline => {
                bail!("host b did not register vm-a\n{}", cluster.logs())
            }
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    println!(
        "   host b's vnpd registered vm-a at {}:{} (generation {}) when it resumed",
        endpoint.host_addr, endpoint.port, endpoint.generation
    );
    let text = cluster.scrape(1)?;
    let moved = |event: &str| {
        vnpd::metrics::prometheus::sample_value(
            &text,
            "vnpd_migration_state_total",
            &[("event", event)],
        )
        .unwrap_or(0)
    };
    if moved("import") != 1 {
        bail!(
            "host b did not take vm-a's NAT flows from host a\n{}",
            cluster.logs()
        );
    }
    println!(
        "   and took vm-a's state from host a's vnpd: {} NAT flows (its own and the load \
         balancer's, on the same ports), {} metadata sessions",
        moved("flow_imported"),
        moved("session_imported")
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let log = loop {
        let log = gb.run_ok("tail -3 /tmp/mig-ping.log", CMD)?;
        if log.contains("packets transmitted") || Instant::now() > deadline {
            break log;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    println!("   vm-b's 20 pings a second to vm-a across the migration:");
    print!("{}", indent(&log));
    let received = log
        .split(", ")
        .find_map(|p| p.strip_suffix(" packets received"))
        .and_then(|n| n.trim().parse::<u32>().ok());
    if received.is_none_or(|n| n < PINGS * 9 / 10) {
        bail!(
            "the ping across the migration lost too much:\n{log}\n{}",
            cluster.logs()
        );
    }
    Ok(ga2)
}

fn print_attachment(a: &AttachmentInfo) {
    println!(
        "   {} on {}: vhost-user socket {}, UDP {}:{}, {} / {}",
        a.vm_id,
        a.host_addr,
        a.socket_path.display(),
        a.host_addr,
        a.udp_port,
        a.vm_ip,
        a.mac
    );
}

fn guest_cmd(g: &mut Guest, cmd: &str) -> Result<String> {
    let out = g.run(cmd, CMD).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(format!("{}{}", out.stdout, out.stderr))
}

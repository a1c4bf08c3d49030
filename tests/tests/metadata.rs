//! The service bridge seen from real QEMU guests (issue #11): DHCP hands out the metadata
//! address as resolver, busybox `nslookup` resolves `metadata.google.internal` and the VM's own
//! name, busybox `wget` reads metadata paths and credentials (verified against the registry's
//! published keys), a hanging GET returns right after an operator changes an attribute, busybox
//! `nc` publishes an SSH host key that the registry then holds; refused: no header,
//! `X-Forwarded-For`, malformed and oversize requests, requests past the rate limit. A second
//! VM on the same host gets its own metadata, never the first one's: the caller is the port.
//! Then a namespace guest (a TAP behind `vnp-tap-frontend`, the host kernel's stack) reads it
//! with curl and Python's `urllib`.
//!
//! Needs root (network namespaces), QEMU 10 and the guest image (`scripts/setup`); guests run
//! under TCG. Run: `cargo test -p vnp-e2e --test metadata -- --nocapture`.

use std::time::Duration;

use qemu_launch::Guest;
use vnp_e2e::cluster::{assert_nothing_left, Cluster, ClusterOptions};
use vnp_registry_client::jwt;
use vnp_testkit::netns::Fabric;
use vnp_testkit::process::ChildGuard;

const CMD: Duration = Duration::from_secs(60);
const MD: &str = "http://metadata.google.internal/computeMetadata/v1";

fn step(what: &str) {
    eprintln!("[metadata] {what}");
}

/// Runs `cmd` in the guest; (exit status, stdout, stderr).
fn sh(g: &mut Guest, cmd: &str) -> (i32, String, String) {
    let out = g
        .run(cmd, CMD)
        .unwrap_or_else(|e| panic!("{} in {}: {e}", cmd, g.name()));
    (out.status, out.stdout, out.stderr)
}

/// A metadata GET with the flavor header; the body, or a panic with what wget said.
fn md_get(g: &mut Guest, path: &str) -> String {
    let cmd = format!("wget -q -O - --header 'Metadata-Flavor: Google' '{MD}/{path}'");
    let (status, out, err) = sh(g, &cmd);
    assert_eq!(status, 0, "{cmd}: {err}");
    out
}

/// Sends raw bytes (a `printf` format) to the metadata server with busybox `nc`; the answer.
fn raw(g: &mut Guest, printf_fmt: &str) -> String {
    let cmd = format!("printf '{printf_fmt}' | timeout 10 nc 169.254.169.254 80");
    sh(g, &cmd).1
}

/// A client on Python's `urllib` (no proxies): the hostname, a token, the flavor header on the
/// answer, and the status of a request without the header, as JSON.
const URLLIB_CLIENT: &str = r#"
import json, urllib.request, urllib.error
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
base = "http://169.254.169.254/computeMetadata/v1/"
def get(path, headers):
    with opener.open(urllib.request.Request(base + path, headers=headers), timeout=10) as r:
        return r.headers.get("Metadata-Flavor"), r.read().decode()
flavor, hostname = get("instance/hostname", {"Metadata-Flavor": "Google"})
_, token = get("instance/service-accounts/default/token", {"Metadata-Flavor": "Google"})
try:
    get("instance/hostname", {})
    forbidden = 200
except urllib.error.HTTPError as e:
    forbidden = e.code
print(json.dumps({"flavor": flavor, "hostname": hostname, "forbidden": forbidden,
                  "access_token": json.loads(token)["access_token"]}))
"#;

/// A tiny authoritative DNS server for the upstream side (no DNS library): `svc.corp.example`
/// A -> 192.0.2.77; `slow.corp.example` never answered; anything else NXDOMAIN. Prints each
/// question it gets. Args: address, port.
const UPSTREAM_DNS: &str = r#"
import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
while True:
    q, peer = s.recvfrom(512)
    qid, flags, qd = struct.unpack("!HHH", q[:6])
    i, labels = 12, []
    while q[i]:
        labels.append(q[i + 1:i + 1 + q[i]].decode()); i += 1 + q[i]
    name = ".".join(labels).lower(); qtype = struct.unpack("!H", q[i + 1:i + 3])[0]
    question = q[12:i + 5]
    print("query", name, qtype, flush=True)
    if name == "slow.corp.example":
        continue
    rd = flags & 0x0100
    if name == "svc.corp.example" and qtype == 1:
        head = struct.pack("!HHHHHH", qid, 0x8400 | rd, 1, 1, 0, 0)
        answer = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + bytes([192, 0, 2, 77])
        s.sendto(head + question + answer, peer)
    else:
        rcode = 0 if name == "svc.corp.example" else 3
        s.sendto(struct.pack("!HHHHHH", qid, 0x8400 | rd | rcode, 1, 0, 0, 0) + question, peer)
"#;

/// An internal HTTP service on the host network that trusts nothing but the registry's keys:
/// it verifies the bearer token of each request against the JWKS file with PyJWT (ES256, the
/// audience) and answers who called. Args: address, port, JWKS file, audience.
const WHOAMI_SERVICE: &str = r#"
import http.server, json, sys
import jwt
addr, port, jwks_file, audience = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
keys = {k["kid"]: jwt.PyJWK(k).key for k in json.load(open(jwks_file))["keys"]}
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        auth = self.headers.get("Authorization", "")
        try:
            token = auth.removeprefix("Bearer ")
            kid = jwt.get_unverified_header(token)["kid"]
            claims = jwt.decode(token, keys[kid], algorithms=["ES256"], audience=audience)
            code, body = 200, {"vm": claims["vnp"]["vm"], "network": claims["vnp"]["network"],
                               "aud": claims["aud"], "path": self.path,
                               "authorizations": len(self.headers.get_all("Authorization"))}
        except Exception as e:
            code, body = 401, {"error": repr(e)}
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def log_message(self, *a):
        pass
srv = http.server.HTTPServer((addr, port), H)
print("ready", flush=True)
srv.serve_forever()
"#;

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn metadata_served_to_real_guests() {
    let opts = ClusterOptions {
        prefix: "vnpm".into(),
        hosts: 1,
        ..ClusterOptions::default()
    };
    let c = Cluster::start(&opts).expect("cluster");
    let dir = c.dir().to_path_buf();
    let namespaces = c.namespace_names();

    step("registry: vm-a and vm-b on host a; an operator attribute on vm-a");
    let rec_a = c.create_vm("vm-a", 0, &[]).unwrap();
    let rec_b = c.create_vm("vm-b", 0, &[]).unwrap();
    c.registry(|r| r.set_vm_attribute("vm-a", "role", "db"))
        .unwrap();

    step("booting two guests (TCG)");
    let [mut ga, mut gb] = c
        .boot_guests([(0, "vm-a"), (0, "vm-b")])
        .unwrap_or_else(|e| panic!("{e:#}"));

    step("DNS: DHCP names the bridge as resolver; it answers the metadata name and the VM's");
    let (_, resolv, _) = sh(&mut ga, "cat /etc/resolv.conf");
    assert!(resolv.contains("nameserver 169.254.169.254"), "{resolv}");
    let (_, out, err) = sh(&mut ga, "nslookup metadata.google.internal");
    assert!(out.contains("169.254.169.254"), "{out}{err}\n{}", c.logs());
    let (_, out, err) = sh(&mut ga, &format!("nslookup {}", rec_a.hostname));
    assert!(out.contains(&rec_a.ip.to_string()), "{out}{err}");
    let (_, out, err) = sh(&mut ga, "nslookup example.com");
    assert!(
        !out.contains("Address: 93."),
        "other names are refused: {out}{err}"
    );

    step("metadata paths");
    assert_eq!(md_get(&mut ga, "instance/hostname"), rec_a.hostname);
    assert_eq!(md_get(&mut ga, "instance/name"), "vm-a");
    assert_eq!(
        md_get(&mut ga, "instance/network-interfaces/0/ip"),
        rec_a.ip.to_string()
    );
    assert_eq!(md_get(&mut ga, "instance/network-interfaces/0/mtu"), "1452");
    assert_eq!(md_get(&mut ga, "instance/attributes/role"), "db");
    assert!(!md_get(&mut ga, "project/project-id").is_empty());
    let listing = md_get(&mut ga, "instance/");
    assert!(listing.contains("network-interfaces/\n"), "{listing}");
    let json: serde_json::Value =
        serde_json::from_str(&md_get(&mut ga, "instance/?recursive=true")).unwrap();
    assert_eq!(json["name"], "vm-a");
    assert_eq!(json["attributes"]["role"], "db");
    let (_, head, _) = sh(
        &mut ga,
        "wget -S -q -O /dev/null http://169.254.169.254/ 2>&1",
    );
    assert!(head.contains("Metadata-Flavor: Google"), "GET / {head}");

    step("the caller is the port: vm-b reads its own metadata");
    assert_eq!(md_get(&mut gb, "instance/name"), "vm-b");
    assert_eq!(
        md_get(&mut gb, "instance/network-interfaces/0/ip"),
        rec_b.ip.to_string()
    );
    let (status, _, _) = sh(
        &mut gb,
        &format!("wget -q -O - --header 'Metadata-Flavor: Google' '{MD}/instance/attributes/role'"),
    );
    assert_ne!(status, 0, "vm-a's attribute is not vm-b's");

    step("credentials, verified against the registry's JWKS");
    let jwks = c.registry(|r| r.jwks()).unwrap();
    let tok: serde_json::Value =
        serde_json::from_str(&md_get(&mut ga, "instance/service-accounts/default/token")).unwrap();
    assert_eq!(tok["token_type"], "Bearer");
    let access = tok["access_token"].as_str().unwrap();
    jwt::verify(access, &jwks, None, unix_now()).expect("access token verifies");
    let id = md_get(
        &mut ga,
        "instance/service-accounts/default/identity?audience=https://svc.example&format=full",
    );
    let verified = jwt::verify(&id, &jwks, Some("https://svc.example"), unix_now())
        .expect("identity token verifies");
    eprintln!("  identity claims: {verified:?}");
    // Served from the host's cache the second time: the same token.
    let again: serde_json::Value =
        serde_json::from_str(&md_get(&mut ga, "instance/service-accounts/default/token")).unwrap();
    assert_eq!(again["access_token"], tok["access_token"]);

    step("a hanging GET returns within 1 s of an operator's change");
    let hang = format!(
        "a=$(cut -d' ' -f1 /proc/uptime); wget -q -O /tmp/h --header 'Metadata-Flavor: Google' \
         '{MD}/instance/attributes/role?wait_for_change=true&timeout_sec=30'; \
         b=$(cut -d' ' -f1 /proc/uptime); echo \"$a $b\"; cat /tmp/h"
    );
    let (out, changed) = std::thread::scope(|s| {
        let setter = s.spawn(|| {
            std::thread::sleep(Duration::from_secs(3));
            c.registry(|r| r.set_vm_attribute("vm-a", "role", "web"))
        });
        let out = sh(&mut ga, &hang).1;
        (out, setter.join().unwrap())
    });
    changed.unwrap();
    let (times, body) = out.split_once('\n').unwrap_or((&out, ""));
    let t: Vec<f64> = times
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    let waited = t[1] - t[0];
    eprintln!("  hanging GET waited {waited:.2} s (change made at 3 s)");
    assert_eq!(body, "web");
    assert!(waited >= 2.5, "it did not hang: {waited}");
    assert!(
        waited < 4.0,
        "not answered within 1 s of the change: {waited}"
    );

    step("a host key published with nc reaches the registry");
    let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKvnpdtest";
    let put = format!(
        "PUT /computeMetadata/v1/instance/guest-attributes/hostkeys/ssh-ed25519 HTTP/1.1\\r\\n\
         Host: metadata\\r\\nMetadata-Flavor: Google\\r\\nContent-Length: {}\\r\\n\
         Connection: close\\r\\n\\r\\n{key}",
        key.len()
    );
    let answer = raw(&mut ga, &put);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let md = c.registry(|r| r.vm_metadata("vm-a", None)).unwrap();
    assert_eq!(
        md.guest_attributes
            .get("hostkeys/ssh-ed25519")
            .map(String::as_str),
        Some(key)
    );
    assert_eq!(
        md_get(&mut ga, "instance/guest-attributes/hostkeys/ssh-ed25519"),
        key
    );

    step("refused: no header, X-Forwarded-For, malformed, oversize, past the rate");
    let (status, _, err) = sh(&mut ga, &format!("wget -q -O - '{MD}/instance/id'"));
    assert!(status != 0 && err.contains("403"), "no header: {err}");
    let (status, _, err) = sh(
        &mut ga,
        &format!(
            "wget -q -O - --header 'Metadata-Flavor: Google' --header 'X-Forwarded-For: 1.2.3.4' \
             '{MD}/instance/id'"
        ),
    );
    assert!(status != 0 && err.contains("403"), "X-Forwarded-For: {err}");
    let answer = raw(&mut ga, "GARBAGE \\001\\002\\r\\n\\r\\n");
    assert!(answer.starts_with("HTTP/1.1 400"), "malformed: {answer}");
    let (_, answer, _) = sh(
        &mut ga,
        "(printf 'GET / HTTP/1.1\\r\\nX-Big: '; head -c 9000 /dev/zero | tr '\\000' a; \
         printf '\\r\\n\\r\\n') | timeout 10 nc 169.254.169.254 80",
    );
    assert!(answer.starts_with("HTTP/1.1 431"), "oversize: {answer}");
    let (_, count, _) = sh(
        &mut ga,
        "(for i in $(seq 300); do printf 'GET /computeMetadata/v1/instance/id HTTP/1.1\\r\\n\
         Metadata-Flavor: Google\\r\\n\\r\\n'; done; sleep 3) | timeout 20 nc 169.254.169.254 80 \
         | grep -c '429 Too Many Requests'",
    );
    let limited: u32 = count.trim().parse().unwrap_or(0);
    eprintln!("  {limited} of 300 pipelined requests answered 429");
    assert!(limited > 0, "no rate limit: {count}");
    let bridge = |event: &str| {
        c.metric(
            0,
            "vnpd_bridge_events_total",
            &[("vm", "vm-a"), ("event", event)],
        )
        .unwrap()
    };
    assert!(bridge("http_forbidden") >= 2, "403s counted");
    assert!(bridge("http_malformed") >= 1, "malformed counted");
    assert!(bridge("http_oversize") >= 1, "oversize counted");
    assert_eq!(
        bridge("http_rate_limited"),
        u64::from(limited),
        "429s counted"
    );
    assert!(bridge("tokens_minted") >= 2);
    assert_eq!(bridge("guest_attributes_written"), 1);
    assert!(bridge("dns_answered") >= 2 && bridge("dns_refused") >= 1);
    // The guest can still ask once the rate refilled.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(md_get(&mut ga, "instance/name"), "vm-a");

    step("a namespace guest with a full Linux stack: curl and Python urllib");
    c.create_vm("vm-c", 0, &[]).unwrap();
    let att_c = c.attach(0, "vm-c").unwrap();
    let gc = c.tap_guest(&att_c, false).unwrap();
    let (status, name, err) = ns_curl(
        &gc,
        &[
            "-H",
            "Metadata-Flavor: Google",
            "http://169.254.169.254/computeMetadata/v1/instance/name",
        ],
    );
    assert_eq!(name, "vm-c", "curl ({status}): {err}\n{}", c.logs());
    let (_, code, err) = ns_curl(
        &gc,
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "http://169.254.169.254/computeMetadata/v1/instance/name",
        ],
    );
    assert_eq!(code, "403", "curl without the header: {err}");
    let out = gc
        .netns()
        .command("python3")
        .args(["-c", URLLIB_CLIENT])
        .output()
        .expect("python3");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "urllib: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(report["flavor"], "Google");
    assert_eq!(report["hostname"], att_c.hostname.as_str());
    assert_eq!(report["forbidden"], 403);
    let token = report["access_token"].as_str().unwrap();
    let claims = jwt::verify(token, &jwks, None, unix_now()).expect("urllib's token verifies");
    eprintln!("  urllib token claims: {claims:?}");

    drop(gc);
    drop(ga);
    drop(gb);
    drop(c);
    assert_nothing_left(&dir, &namespaces);
}

/// curl in a namespace guest (no proxies, 10 s); (exit status, stdout, stderr).
fn ns_curl(g: &vnp_testkit::tap_guest::TapGuest, args: &[&str]) -> (i32, String, String) {
    let out = g
        .netns()
        .command("curl")
        .args(["-sS", "--noproxy", "*", "-m", "10"])
        .args(args)
        .output()
        .expect("curl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The HTTP status of a GET of `path` with the flavor header and `extra` headers.
fn ns_status(g: &vnp_testkit::tap_guest::TapGuest, path: &str, extra: &[&str]) -> String {
    let url = format!("http://169.254.169.254/computeMetadata/v1/{path}");
    let mut args = vec![
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        "Metadata-Flavor: Google",
    ];
    for h in extra {
        args.extend(["-H", h]);
    }
    args.push(&url);
    ns_curl(g, &args).1
}

/// Starts a Python `script` with `args` in host 0's namespace and waits for its `ready` line;
/// the guard and the rest of its stdout.
fn python_server(
    c: &Cluster,
    name: &str,
    script: &str,
    args: &[&str],
) -> (ChildGuard, std::io::BufReader<std::process::ChildStdout>) {
    let mut child = ChildGuard::spawn(
        name,
        c.host_ns(0)
            .command("/usr/bin/python3")
            .args(["-u", "-c", script])
            .args(args)
            .stdout(std::process::Stdio::piped()),
        None,
    )
    .unwrap_or_else(|e| panic!("{name}: {e}"));
    let mut out = std::io::BufReader::new(child.take_stdout().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line.trim(), "ready", "{name}: {}", child.stderr_tail());
    (child, out)
}

/// Polls `f` every 100 ms until it returns true or `secs` pass.
fn eventually(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    while std::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// The IMDSv2-style session option, a DNS upstream and an external service bridged with the
/// VM's identity, all from a namespace guest (the host kernel's TCP, curl, Python).
#[test]
fn sessions_dns_and_services_from_a_namespace_guest() {
    let upstream_dns = std::net::SocketAddr::from((Fabric::host_addr(0), 5300));
    let whoami = std::net::SocketAddr::from((Fabric::host_addr(0), 9000));
    let opts = ClusterOptions {
        prefix: "vnpms".into(),
        hosts: 1,
        vnpd_config_tables: format!(
            "[bridge]\ndns_upstream = \"{upstream_dns}\"\n\n[[bridge.services]]\n\
             name = \"whoami\"\nport = 8080\nupstream = \"{whoami}\"\n\
             audience = \"https://whoami.internal\"\n"
        ),
        // Short-lived credentials, so that one expires within the test.
        registry_args: vec!["--credential-ttl-secs".into(), "60".into()],
        ..ClusterOptions::default()
    };
    let c = Cluster::start(&opts).expect("cluster");
    let dir = c.dir().to_path_buf();
    let namespaces = c.namespace_names();
    c.create_vm("vm-s", 0, &[]).unwrap();
    let att = c.attach(0, "vm-s").unwrap();
    let g = c.tap_guest(&att, false).unwrap();
    assert_eq!(ns_status(&g, "instance/name", &[]), "200", "{}", c.logs());
    let jwks_file = dir.join("jwks.json");
    let vnpctl = |args: &[&str]| {
        let out = c
            .fabric()
            .core()
            .command(&c.bins().vnpctl)
            .args(["--registry", &c.registry_url(), "--tls-dir"])
            .arg(c.tls_dir())
            .args(args)
            .output()
            .expect("vnpctl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    };
    let (ok, out) = vnpctl(&["jwks", "--out", jwks_file.to_str().unwrap()]);
    assert!(ok, "vnpctl jwks: {out}");

    step("a token read by the guest, verified with vnpctl verify-token");
    let read_token = || {
        let (_, body, err) = ns_curl(
            &g,
            &[
                "-H",
                "Metadata-Flavor: Google",
                "http://169.254.169.254/computeMetadata/v1/instance/service-accounts/default/token",
            ],
        );
        let v: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}{err}"));
        (
            v["access_token"].as_str().unwrap().to_string(),
            v["expires_in"].as_u64().unwrap(),
        )
    };
    let first_read = std::time::Instant::now();
    let (first, expires_in) = read_token();
    assert!(expires_in <= 60, "the registry's 60 s: {expires_in}");
    let (ok, out) = vnpctl(&["verify-token", &first, "--json"]);
    assert!(ok, "vnpctl verify-token (JWKS from the registry): {out}");
    let claims: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(claims["vnp"]["vm"], "vm-s", "{claims}");
    let tampered = format!("{}x", &first[..first.len() - 1]);
    let (ok, out) = vnpctl(&[
        "verify-token",
        &tampered,
        "--jwks",
        jwks_file.to_str().unwrap(),
    ]);
    assert!(!ok && out.contains("refused"), "a tampered token: {out}");

    step("sessions: the operator requires them on the network (vnpctl project set)");
    let session = |on: bool| {
        let flag = if on { "true" } else { "false" };
        let (ok, out) = vnpctl(&[
            "project",
            "set",
            vnp_e2e::cluster::NETWORK,
            "--require-session-token",
            flag,
        ]);
        assert!(ok, "vnpctl project set: {out}");
        out
    };
    let shown = session(true);
    assert!(shown.contains("required"), "{shown}");
    assert!(
        eventually(10, || ns_status(&g, "instance/name", &[]) == "401"),
        "no 401 without a session token: {}",
        c.logs()
    );

    step("PUT /computeMetadata/v1/token: its reply leaves with IP TTL 1 (seen by tcpdump)");
    let mut dump = ChildGuard::spawn(
        "tcpdump",
        g.netns()
            .command("timeout")
            .args(["20", "tcpdump", "-l", "-n", "-v", "-i", g.ifname()])
            .args(["src", "host", "169.254.169.254", "and", "tcp"])
            .stdout(std::process::Stdio::piped()),
        None,
    )
    .expect("tcpdump");
    let dump_out = dump.take_stdout().unwrap();
    std::thread::sleep(Duration::from_millis(800));
    let (status, token, err) = ns_curl(
        &g,
        &[
            "-X",
            "PUT",
            "-H",
            "Metadata-Flavor: Google",
            "-H",
            "X-Metadata-Token-TTL-Seconds: 3",
            "http://169.254.169.254/computeMetadata/v1/token",
        ],
    );
    assert_eq!(status, 0, "PUT: {err}");
    assert_eq!(token.len(), 64, "token: {token}");
    let issued_at = std::time::Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    let _ = dump.kill();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut { dump_out }, &mut text).unwrap();
    // tcpdump -v prints "IP (tos 0x0, ttl N, ..., length L)", then "src > dst: Flags [..], ...".
    // The SYN-ACK leaves before the request is known to be a PUT; everything after it is TTL 1.
    let lines: Vec<&str> = text.lines().collect();
    let ttls: Vec<(&str, &str)> = lines
        .windows(2)
        .filter_map(|w| {
            let ttl = w[0].split("ttl ").nth(1)?.split(',').next()?;
            let flags = w[1].split("Flags [").nth(1)?.split(']').next()?;
            Some((ttl, flags))
        })
        .collect();
    eprintln!("  (TTL, TCP flags) of the bridge's packets on the PUT's connection: {ttls:?}");
    let after_handshake: Vec<_> = ttls.iter().filter(|(_, f)| *f != "S.").collect();
    assert!(
        after_handshake.iter().any(|(_, f)| f.contains('P'))
            && after_handshake.iter().all(|(ttl, _)| *ttl == "1"),
        "the reply to the token PUT must leave with TTL 1:\n{text}"
    );

    step("the token opens the metadata; it expires after its TTL");
    let header = format!("X-Metadata-Token: {token}");
    let (_, name, _) = ns_curl(
        &g,
        &[
            "-H",
            "Metadata-Flavor: Google",
            "-H",
            &header,
            "http://169.254.169.254/computeMetadata/v1/instance/name",
        ],
    );
    assert_eq!(name, "vm-s");
    assert_eq!(
        ns_status(&g, "instance/name", &["X-Metadata-Token: forged"]),
        "401"
    );
    let left = Duration::from_secs(3).saturating_sub(issued_at.elapsed());
    std::thread::sleep(left + Duration::from_millis(300));
    assert_eq!(
        ns_status(&g, "instance/name", &[&header]),
        "401",
        "expired after 3 s"
    );
    let bridge = |event: &str| {
        c.metric(
            0,
            "vnpd_bridge_events_total",
            &[("vm", "vm-s"), ("event", event)],
        )
        .unwrap()
    };
    assert_eq!(bridge("sessions_issued"), 1);
    assert!(bridge("http_unauthorized") >= 3);
    assert!(session(false).contains("optional"));
    assert!(
        eventually(10, || ns_status(&g, "instance/name", &[]) == "200"),
        "optional again"
    );

    step("DNS: busybox nslookup; own names from the bridge, others from the upstream");
    let (upstream, mut upstream_log) = python_server(
        &c,
        "upstream-dns",
        UPSTREAM_DNS,
        &[
            &upstream_dns.ip().to_string(),
            &upstream_dns.port().to_string(),
        ],
    );
    let nslookup = |name: &str| {
        let out = g
            .netns()
            .command("busybox")
            .args(["nslookup", name, "169.254.169.254"])
            .output()
            .expect("busybox nslookup");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    };
    let (ok, out) = nslookup("svc.corp.example");
    assert!(
        ok && out.contains("192.0.2.77"),
        "forwarded: {out}\n{}",
        c.logs()
    );
    let (ok, out) = nslookup("metadata.google.internal");
    assert!(ok && out.contains("169.254.169.254"), "own name: {out}");
    let (ok, out) = nslookup("nothing.corp.example");
    assert!(
        !ok && out.contains("NXDOMAIN"),
        "the upstream's NXDOMAIN: {out}"
    );
    let (ok, out) = nslookup("slow.corp.example");
    assert!(!ok, "never answered upstream: {out}");
    let mut line = String::new();
    let mut asked = Vec::new();
    while asked.len() < 3 {
        line.clear();
        if std::io::BufRead::read_line(&mut upstream_log, &mut line).unwrap_or(0) == 0 {
            break;
        }
        asked.push(line.trim().to_string());
    }
    eprintln!("  upstream saw: {asked:?}");
    assert!(
        asked
            .iter()
            .all(|q| !q.contains("metadata.google.internal")),
        "the bridge's own names never leave the host: {asked:?}"
    );
    assert!(
        asked.iter().any(|q| q == "query svc.corp.example 1"),
        "{asked:?}"
    );
    assert!(bridge("dns_forwarded") >= 3, "forwarded counted");
    assert!(bridge("dns_forward_answered") >= 2);
    assert!(
        eventually(5, || bridge("dns_forward_timeouts") >= 1),
        "the unanswered query timed out, counted"
    );
    drop(upstream);

    step("a bridged service: the guest calls it, the service learns the VM from the token");
    let (service, _) = python_server(
        &c,
        "whoami-service",
        WHOAMI_SERVICE,
        &[
            &whoami.ip().to_string(),
            &whoami.port().to_string(),
            jwks_file.to_str().unwrap(),
            "https://whoami.internal",
        ],
    );
    let (status, body, err) = ns_curl(
        &g,
        &[
            "-H",
            "Authorization: Bearer forged-by-the-guest",
            "http://169.254.169.254:8080/whoami?x=1",
        ],
    );
    assert_eq!(status, 0, "{err}\n{}", c.logs());
    let who: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(who["vm"], "vm-s", "{who}");
    assert_eq!(who["network"], vnp_e2e::cluster::NETWORK);
    assert_eq!(who["aud"], "https://whoami.internal");
    assert_eq!(who["path"], "/whoami?x=1");
    assert_eq!(
        who["authorizations"], 1,
        "the guest's header was replaced: {who}"
    );
    let (_, body, _) = ns_curl(&g, &["http://169.254.169.254:8080/again"]);
    assert!(body.contains("\"vm-s\""), "{body}");
    drop(service);
    let (_, code, _) = ns_curl(
        &g,
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "http://169.254.169.254:8080/down",
        ],
    );
    assert_eq!(code, "502", "the service is gone");
    assert!(bridge("service_requests") >= 3);
    assert!(bridge("service_errors") >= 1);

    step("the access token expires and a new one is served");
    let mut second = first.clone();
    assert!(
        eventually(60, || {
            second = read_token().0;
            second != first
        }),
        "no new token within 60 s of the first"
    );
    let served_for = first_read.elapsed();
    eprintln!("  the first token was served for {served_for:.1?} (60 s lifetime)");
    assert!(served_for < Duration::from_secs(60));
    let (ok, out) = vnpctl(&[
        "verify-token",
        &second,
        "--jwks",
        jwks_file.to_str().unwrap(),
    ]);
    assert!(ok, "the new token verifies: {out}");
    assert!(bridge("tokens_minted") >= 2);

    drop(g);
    drop(c);
    assert_nothing_left(&dir, &namespaces);
}

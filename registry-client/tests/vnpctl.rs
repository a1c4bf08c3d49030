//! `vnpctl` end to end: the real CLI against the real `vnp-registry` over mutual TLS, with the
//! PKI that `vnpctl ca init` / `vnpctl cert` make.
//!
//! The registry binary lives in another package, so the test builds it first (the same cargo,
//! profile and target directory); a failed build fails the test.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

struct Cleanup {
    dir: PathBuf,
    registry: Option<Child>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(mut c) = self.registry.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn registry_binary() -> PathBuf {
    let vnpctl = PathBuf::from(env!("CARGO_BIN_EXE_vnpctl"));
    let dir = vnpctl.parent().unwrap().to_path_buf();
    let cargo = std::env::var_os("CARGO").expect("run me with cargo test");
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "-p",
        "vnp-registry",
        "--bin",
        "vnp-registry",
        "--manifest-path",
    ])
    .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml"));
    if dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let out = cmd.output().expect("running cargo build");
    assert!(
        out.status.success(),
        "building vnp-registry failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bin = dir.join("vnp-registry");
    assert!(bin.is_file(), "{} missing after the build", bin.display());
    bin
}

struct Ctl {
    url: String,
    tls: PathBuf,
}

impl Ctl {
    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_vnpctl"))
            .env_clear()
            .env("VNP_REGISTRY", &self.url)
            .env("VNP_TLS_DIR", &self.tls)
            .args(args)
            .output()
            .expect("run vnpctl")
    }

    /// Runs and expects success; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "vnpctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs and expects failure; returns stderr.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(!out.status.success(), "vnpctl {args:?} should have failed");
        String::from_utf8(out.stderr).unwrap()
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        serde_json::from_str(&self.ok(args)).unwrap()
    }
}

#[test]
fn vnpctl_drives_a_registry_end_to_end() {
    let dir = std::env::temp_dir().join(format!("vnpctl-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut guard = Cleanup {
        dir: dir.clone(),
        registry: None,
    };
    let tls = dir.join("tls");
    let ctl = Ctl {
        url: String::new(),
        tls: tls.clone(),
    };

    // PKI, exactly as an operator would make it.
    assert!(ctl
        .ok(&["ca", "init", "--dir", tls.to_str().unwrap()])
        .contains("server.pem"));
    assert!(ctl
        .fails(&["ca", "init", "--dir", tls.to_str().unwrap()])
        .contains("--force"));
    ctl.ok(&["cert", "host", "--dir", tls.to_str().unwrap(), "--id", "h1"]);
    assert!(tls.join("host-h1.pem").is_file() && tls.join("host-h1.key").is_file());
    assert!(ctl
        .fails(&[
            "cert",
            "host",
            "--dir",
            tls.to_str().unwrap(),
            "--id",
            "Bad_Id"
        ])
        .contains("invalid id"));

    let mut child = Command::new(registry_binary())
        .args(["--listen", "127.0.0.1:0", "--data"])
        .arg(dir.join("data"))
        .arg("--tls-dir")
        .arg(&tls)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn vnp-registry");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    guard.registry = Some(child);
    let addr = line
        .trim()
        .strip_prefix("vnp-registry listening on ")
        .expect("listening line");
    let ctl = Ctl {
        url: format!("https://{addr}"),
        tls,
    };

    assert!(ctl.ok(&["whoami"]).contains("vnp:admin:admin"));
    assert!(ctl.ok(&["metrics"]).contains("vnp_registry_vms 0"));
    let n = ctl.json(&[
        "network",
        "create",
        "n1",
        "--cidr",
        "10.1.0.0/24",
        "--vni",
        "7",
        "--json",
    ]);
    assert_eq!(n["router"], "10.1.0.1");
    ctl.ok(&["host", "create", "h1", "--addr", "198.18.0.1"]);
    ctl.ok(&[
        "host",
        "create",
        "h2",
        "--addr",
        "198.18.0.2",
        "--ports",
        "41000-41009",
    ]);
    let a = ctl.json(&[
        "vm",
        "create",
        "vm-a",
        "--network",
        "n1",
        "--host",
        "h1",
        "--tag",
        "web",
        "--json",
    ]);
    assert_eq!(a["ip"], "10.1.0.2");
    assert_eq!(a["mac"], "02:07:0a:01:00:02");
    let b = ctl.json(&[
        "vm",
        "create",
        "vm-b",
        "--network",
        "n1",
        "--host",
        "h2",
        "--json",
    ]);
    assert_eq!(b["host_port"], 41000);

    // Tables by default.
    let table = ctl.ok(&["vm", "list"]);
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("ID") && lines[0].contains("NETWORK"),
        "{table}"
    );
    assert!(
        lines[1].starts_with("vm-a") && lines[1].contains("10.1.0.2") && lines[1].ends_with("web"),
        "{table}"
    );
    assert_eq!(lines.len(), 3);
    assert!(ctl.ok(&["vm", "show", "vm-b"]).contains("41000"));
    assert_eq!(
        ctl.json(&["network", "list", "--json"])
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // A debugging token, then a policy that forbids it.
    let t = ctl.json(&[
        "token", "issue", "--src-vm", "vm-a", "--dst", "10.1.0.3", "--json",
    ]);
    assert_eq!(t["dst_vm"], "vm-b");
    assert_eq!(t["dst_port"], 41000);
    assert_eq!(t["token"].as_str().unwrap().len(), 16);
    ctl.ok(&[
        "policy",
        "add",
        "no-ab",
        "--network",
        "n1",
        "--deny",
        "vm:vm-a",
        "vm:vm-b",
    ]);
    ctl.ok(&[
        "policy",
        "add",
        "web-ok",
        "--network",
        "n1",
        "--allow",
        "tag:web",
        "any",
    ]);
    let err = ctl.fails(&["token", "issue", "--src-vm", "vm-a", "--dst", "10.1.0.3"]);
    assert!(
        err.contains("policy_denied") && err.contains("no-ab"),
        "{err}"
    );
    assert!(ctl.ok(&["policy", "list"]).contains("no-ab"));
    ctl.ok(&["policy", "delete", "no-ab"]);
    ctl.ok(&["token", "issue", "--src-vm", "vm-a", "--dst", "10.1.0.3"]);
    let err = ctl.fails(&["token", "issue", "--src-vm", "vm-a", "--dst", "203.0.113.9"]);
    assert!(err.contains("no_gateway"), "{err}");
    ctl.ok(&[
        "gateway",
        "create",
        "gw1",
        "--network",
        "n1",
        "--addr",
        "198.18.0.9",
        "--port",
        "6081",
    ]);
    let t = ctl.json(&[
        "token",
        "issue",
        "--src-vm",
        "vm-a",
        "--dst",
        "203.0.113.9",
        "--json",
    ]);
    assert_eq!(
        (t["dst_vm"].clone(), t["dst_port"].clone()),
        (serde_json::Value::Null, 6081.into())
    );

    // Migration step 1 and a watch that sees it.
    let moved = ctl.json(&["vm", "move", "vm-b", "--host", "h1", "--json"]);
    assert_eq!(moved["host"], "h1");
    let w = ctl.json(&[
        "watch",
        "--vm",
        "vm-b",
        "--since",
        "0",
        "--timeout",
        "1",
        "--json",
    ]);
    let kinds: Vec<&str> = w["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["created", "moved"]);
    assert_eq!(
        ctl.json(&["vm", "rotate-secret", "vm-b", "--json"])["secret_generation"],
        2
    );

    // Bad input is refused with the registry's reason.
    assert!(ctl
        .fails(&["vm", "create", "x", "--network", "n1", "--ip", "10.9.0.5"])
        .contains("address_outside_cidr"));
    assert!(ctl
        .fails(&["vm", "create", "x", "--network", "n1", "--ip", "10.1.0.2"])
        .contains("duplicate_ip"));
    assert!(ctl
        .fails(&["network", "create", "n2", "--cidr", "10.2.0.1/24"])
        .contains("host bits"));
    assert!(ctl.fails(&["vm", "show", "nope"]).contains("unknown_vm"));
    assert!(ctl
        .fails(&["network", "delete", "n1"])
        .contains("not_empty"));
    assert!(ctl.fails(&["host", "delete", "h1"]).contains("not_empty"));

    // A host certificate is not an admin.
    let host_err = Command::new(env!("CARGO_BIN_EXE_vnpctl"))
        .env_clear()
        .env("VNP_REGISTRY", &ctl.url)
        .env("VNP_TLS_DIR", &ctl.tls)
        .args(["--cert", ctl.tls.join("host-h1.pem").to_str().unwrap()])
        .args(["--key", ctl.tls.join("host-h1.key").to_str().unwrap()])
        .args(["network", "delete", "n1", "--cascade"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&host_err.stderr).contains("admin_required"));

    let out = ctl.ok(&["network", "delete", "n1", "--cascade"]);
    assert!(
        out.contains("vm/vm-a") && out.contains("gateway/gw1") && out.contains("rule/web-ok"),
        "{out}"
    );
    assert!(ctl
        .json(&["vm", "list", "--json"])
        .as_array()
        .unwrap()
        .is_empty());
    ctl.ok(&["host", "delete", "h1"]);
    assert_eq!(ctl.ok(&["host", "list"]).lines().count(), 2, "header + h2");
}

/// A one-member etcd on a free loopback port (Debian's `etcd`), killed and removed on drop.
struct Etcd {
    child: Child,
    url: String,
}

impl Etcd {
    fn start(dir: &Path) -> Etcd {
        let port = |_| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .unwrap()
        };
        let (client, peer) = (port(0), port(1));
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new("etcd")
            .args(["--name", "m0", "--data-dir"])
            .arg(dir.join("etcd"))
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("m0={peer_url}")])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("etcd.log")).unwrap())
            .spawn()
            .expect("spawn etcd (Debian package etcd-server; scripts/setup installs it)");
        let etcd = Etcd { child, url };
        let t = std::time::Instant::now();
        loop {
            let out = Command::new("etcdctl")
                .env("ETCDCTL_API", "3")
                .args(["--endpoints", &etcd.url, "endpoint", "health"])
                .output()
                .expect("run etcdctl (Debian package etcd-client)");
            if out.status.success() {
                return etcd;
            }
            assert!(
                t.elapsed() < std::time::Duration::from_secs(30),
                "etcd did not start: {}",
                std::fs::read_to_string(dir.join("etcd.log")).unwrap_or_default()
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A child process killed on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the registry binary on a free port with `args`; returns it and its URL.
fn start_registry(bin: &Path, tls: &Path, args: &[&str]) -> (Child, String) {
    let mut child = Command::new(bin)
        .args(["--listen", "127.0.0.1:0", "--tls-dir"])
        .arg(tls)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn vnp-registry");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let Some(addr) = line.trim().strip_prefix("vnp-registry listening on ") else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("registry did not start: {line:?}");
    };
    let url = format!("https://{addr}");
    (child, url)
}

/// The export document without what legitimately differs between two registries holding the
/// same model: sealed secrets are sealed again (a fresh data key) on every write, so only
/// their owners are compared.
fn model_of(export: &serde_json::Value) -> serde_json::Value {
    let mut model = export.clone();
    let owners: Vec<serde_json::Value> = export["secrets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["owner"].clone())
        .collect();
    model["secrets"] = owners.into();
    model
}

/// `vnpctl export` from a registry on redb, `vnpctl import` into one on etcd: the whole model
/// is the same afterwards, and tokens (which depend on the secrets) are identical.
#[test]
fn vnpctl_exports_from_redb_and_imports_into_etcd() {
    let dir = std::env::temp_dir().join(format!("vnpctl-backup-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut guard = Cleanup {
        dir: dir.clone(),
        registry: None,
    };
    let tls = dir.join("tls");
    let keys = dir.join("registry.keys");
    std::fs::write(&keys, format!("k1 {}\n", "7e".repeat(32))).unwrap();
    let keys = keys.to_str().unwrap();
    let setup = Ctl {
        url: String::new(),
        tls: tls.clone(),
    };
    setup.ok(&["ca", "init", "--dir", tls.to_str().unwrap()]);
    let bin = registry_binary();
    // Tokens that never expire, so that two registries mint the very same token.
    let data = dir.join("data");
    let (child, url) = start_registry(
        &bin,
        &tls,
        &[
            "--data",
            data.to_str().unwrap(),
            "--secret-keys",
            keys,
            "--token-ttl",
            "0",
        ],
    );
    guard.registry = Some(child);
    let src = Ctl {
        url,
        tls: tls.clone(),
    };
    src.ok(&[
        "network",
        "create",
        "n1",
        "--cidr",
        "10.1.0.0/24",
        "--vni",
        "7",
    ]);
    src.ok(&["host", "create", "h1", "--addr", "198.18.0.1"]);
    src.ok(&[
        "host",
        "create",
        "h2",
        "--addr",
        "198.18.0.2",
        "--ports",
        "41000-41999",
    ]);
    src.ok(&[
        "vm",
        "create",
        "vm-a",
        "--network",
        "n1",
        "--host",
        "h1",
        "--tag",
        "web",
    ]);
    src.ok(&["vm", "create", "vm-b", "--network", "n1", "--host", "h2"]);
    src.ok(&["vm", "create", "vm-c", "--network", "n1"]);
    src.ok(&["vm", "rotate-secret", "vm-b"]);
    src.ok(&["vm", "move", "vm-c", "--host", "h1"]);
    src.ok(&[
        "gateway",
        "create",
        "gw1",
        "--network",
        "n1",
        "--addr",
        "198.18.0.9",
        "--port",
        "6081",
    ]);
    src.ok(&[
        "policy",
        "add",
        "no-c",
        "--network",
        "n1",
        "--deny",
        "vm:vm-c",
        "external",
    ]);
    let token_args = [
        "token", "issue", "--src-vm", "vm-a", "--dst", "10.1.0.3", "--json",
    ];
    let token = src.json(&token_args);

    let file = dir.join("backup.json");
    let said = src.ok(&["export", "--out", file.to_str().unwrap()]);
    assert!(
        // 3 VMs', a gateway's and the signing key's.
        said.contains("3 VMs") && said.contains("5 sealed secrets"),
        "{said}"
    );
    let exported: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the export holds sealed secrets");

    // The target: a registry on etcd, empty.
    let etcd = Etcd::start(&dir);
    let (child, url) = start_registry(
        &bin,
        &tls,
        &[
            "--store",
            "etcd",
            "--etcd-endpoints",
            &etcd.url,
            "--secret-keys",
            keys,
            "--token-ttl",
            "0",
        ],
    );
    let _etcd_registry = Killed(child);
    let dst = Ctl {
        url,
        tls: tls.clone(),
    };
    let said = dst.ok(&["import", file.to_str().unwrap()]);
    assert!(
        said.contains("1 networks, 2 hosts, 1 gateways, 3 VMs, 1 rules, 5 secrets"),
        "{said}"
    );
    let reexported: serde_json::Value = serde_json::from_str(&dst.ok(&["export"])).unwrap();
    assert_eq!(model_of(&reexported), model_of(&exported));
    for list in [
        &["network", "list", "--json"][..],
        &["host", "list", "--json"],
        &["vm", "list", "--json"],
        &["gateway", "list", "--json"],
        &["policy", "list", "--json"],
    ] {
        assert_eq!(dst.json(list), src.json(list), "{list:?}");
    }
    // Same secrets: the same (never-expiring) token; same policy: the same refusal.
    assert_eq!(dst.json(&token_args), token);
    let denied = ["token", "issue", "--src-vm", "vm-c", "--dst", "203.0.113.9"];
    assert!(dst.fails(&denied).contains("policy_denied"));
    // Only into an empty registry.
    assert!(dst
        .fails(&["import", file.to_str().unwrap()])
        .contains("not_empty"));
}

/// A public key from `ssh-keygen -t ed25519`; `ssh-keygen -lf` printed [`HOST_KEY_FP`].
const HOST_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBJ9rai/pB9SD5mkGSKwxVequTRRNv/zce3O4i5RU8oJ root@a";
const HOST_KEY_FP: &str = "SHA256:yFeY4zEehFtI0nzA1vvAHIr8GGo6YSM6LiyCt564Yv4";

/// Metadata and credentials through vnpctl (issue #11): attributes and projects in the
/// metadata document, host keys a guest published (written here through the host's
/// certificate, as vnpd's service bridge does), tokens verified against the registry's JWKS
/// and an exported JWKS file, key rotation.
#[test]
fn vnpctl_metadata_host_keys_and_tokens() {
    use vnp_registry_client::{ClientConfig, RegistryClient};
    let dir = std::env::temp_dir().join(format!("vnpctl-md-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut guard = Cleanup {
        dir: dir.clone(),
        registry: None,
    };
    let tls = dir.join("tls");
    let setup = Ctl {
        url: String::new(),
        tls: tls.clone(),
    };
    setup.ok(&["ca", "init", "--dir", tls.to_str().unwrap()]);
    setup.ok(&["cert", "host", "--dir", tls.to_str().unwrap(), "--id", "h1"]);
    let data = dir.join("data");
    let (child, url) = start_registry(
        &registry_binary(),
        &tls,
        &["--data", data.to_str().unwrap()],
    );
    guard.registry = Some(child);
    let ctl = Ctl {
        url: url.clone(),
        tls: tls.clone(),
    };
    ctl.ok(&["network", "create", "n1", "--cidr", "10.1.0.0/24"]);
    ctl.ok(&["host", "create", "h1", "--addr", "198.18.0.1"]);
    ctl.ok(&["vm", "create", "a", "--network", "n1", "--host", "h1"]);

    // Attributes and the project show in the document the VM's metadata server serves.
    assert!(ctl
        .ok(&["vm", "set-attr", "a", "role", "web"])
        .contains("role"));
    ctl.ok(&["project", "set", "n1", "--project-id", "acme"]);
    ctl.ok(&["project", "set-attr", "n1", "motd", "hello"]);
    let md = ctl.json(&["vm", "metadata", "a", "--json"]);
    assert_eq!(md["instance"]["attributes"]["role"], "web");
    assert_eq!(md["project"]["project_id"], "acme");
    assert_eq!(md["project"]["attributes"]["motd"], "hello");
    assert!(ctl
        .ok(&["vm", "metadata", "a"])
        .contains("default@acme.vnp.internal"));
    ctl.ok(&["vm", "unset-attr", "a", "role"]);
    assert!(
        ctl.json(&["vm", "metadata", "a", "--json"])["instance"]["attributes"]
            .as_object()
            .unwrap()
            .is_empty()
    );

    // Host keys: none yet, then the one the guest published, with its fingerprint.
    assert!(ctl
        .fails(&["vm", "host-keys", "a"])
        .contains("no host keys"));
    let host = RegistryClient::new(
        ClientConfig::from_files(
            &url,
            &tls.join("ca.pem"),
            &tls.join("host-h1.pem"),
            &tls.join("host-h1.key"),
        )
        .unwrap(),
    )
    .unwrap();
    host.put_guest_attribute("a", "hostkeys", "ssh-ed25519", HOST_KEY)
        .unwrap();
    let shown = ctl.ok(&["vm", "host-keys", "a"]);
    assert!(
        shown.contains("ssh-ed25519") && shown.contains(HOST_KEY_FP),
        "{shown}"
    );
    let known = ctl.ok(&["vm", "host-keys", "a", "--known-hosts"]);
    let blob = HOST_KEY.split(' ').nth(1).unwrap();
    assert_eq!(known, format!("a,10.1.0.2 ssh-ed25519 {blob}\n"));

    // Tokens verify against the registry's JWKS and an exported copy, before and after a
    // rotation; a wrong audience or a changed token does not.
    let token = ctl.ok(&["vm", "identity-token", "a", "--audience", "svc", "--full"]);
    let token = token.trim();
    assert!(ctl
        .ok(&["verify-token", token, "--audience", "svc"])
        .contains("valid"));
    assert!(ctl
        .fails(&["verify-token", token, "--audience", "other"])
        .contains("audience"));
    let mut forged = token.to_string();
    let last = forged.pop().unwrap();
    forged.push(if last == 'A' { 'B' } else { 'A' });
    assert!(ctl.fails(&["verify-token", &forged]).contains("refused"));
    let jwks_file = dir.join("jwks.json");
    ctl.ok(&["jwks", "--out", jwks_file.to_str().unwrap()]);
    let offline = Ctl {
        url: "https://127.0.0.1:1".into(),
        tls: tls.clone(),
    };
    let claims = offline.json(&[
        "verify-token",
        token,
        "--jwks",
        jwks_file.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(claims["google"]["compute_engine"]["project_id"], "acme");
    let keys = ctl.json(&["keys", "rotate", "--json"]);
    assert_eq!(keys.as_array().unwrap().len(), 2);
    assert!(ctl.ok(&["keys", "list"]).contains("retired"));
    assert!(
        ctl.ok(&["verify-token", token]).contains("valid"),
        "old token after rotation"
    );
    let access = ctl.ok(&["vm", "access-token", "a"]);
    assert!(
        offline
            .fails(&[
                "verify-token",
                access.trim(),
                "--jwks",
                jwks_file.to_str().unwrap()
            ])
            .contains("no key"),
        "the new key is not in the old JWKS file"
    );
    assert!(ctl.ok(&["verify-token", access.trim()]).contains("valid"));
}

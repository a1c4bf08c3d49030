//! The `qemu-launch` binary as an operator uses it: help text, dry runs, printed command lines
//! and clear errors for bad input (no QEMU is started by these).

use std::process::{Command, Output, Stdio};

fn cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qemu-launch"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

const VM: [&str; 6] = [
    "--name",
    "vm-a",
    "--socket",
    "/run/vnp/vm-a.sock",
    "--mac",
    "02:00:00:00:00:0a",
];

#[test]
fn help_shows_how_to_start_a_guest_on_vnpd() {
    let o = cli(&["--help"]);
    assert!(o.status.success());
    let (out, _) = text(&o);
    assert!(
        out.contains("qemu-launch run --name vm-a --socket /run/vnp/vm-a.sock --mac"),
        "{out}"
    );
    for sub in ["run", "print", "migrate", "build-guest"] {
        assert!(out.contains(sub), "{sub} missing from help:\n{out}");
    }
}

#[test]
fn dry_run_prints_the_vhost_user_wiring() {
    let mut args = vec!["run", "--dry-run", "--queues", "2"];
    args.extend(VM);
    let o = cli(&args);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.starts_with("qemu-system-x86_64 \\\n"), "{out}");
    assert!(
        out.contains("-chardev socket,id=vnp0,path=/run/vnp/vm-a.sock,reconnect-ms=1000"),
        "{out}"
    );
    assert!(
        out.contains("-netdev vhost-user,id=net0,chardev=vnp0,queues=2"),
        "{out}"
    );
    assert!(
        out.contains("mac=02:00:00:00:00:0a,mq=on,vectors=6"),
        "{out}"
    );
    assert!(
        out.contains("memory-backend-memfd,id=mem,size=256M,share=on"),
        "{out}"
    );
}

#[test]
fn prints_cloud_hypervisor_and_libvirt_equivalents() {
    let mut args = vec!["print", "--cloud-hypervisor"];
    args.extend(VM);
    let (out, err) = text(&cli(&args));
    assert!(out.contains("--memory size=256M,shared=on"), "{out}{err}");
    assert!(
        out.contains(
            "--net vhost_user=true,socket=/run/vnp/vm-a.sock,vhost_mode=client,num_queues=2"
        ),
        "{out}"
    );
    let mut args = vec!["print", "--libvirt"];
    args.extend(VM);
    let (out, _) = text(&cli(&args));
    assert!(out.contains("<interface type='vhostuser'>"), "{out}");
}

#[test]
fn bad_input_gives_clear_errors() {
    let o = cli(&[
        "run",
        "--name",
        "vm-a",
        "--socket",
        "/run/vnp/vm-a.sock",
        "--mac",
        "01:00:5e:00:00:01",
    ]);
    assert!(!o.status.success());
    assert!(text(&o).1.contains("multicast"), "{}", text(&o).1);

    let o = cli(&[
        "run",
        "--name",
        "vm a",
        "--test-netdev",
        "user",
        "--mac",
        "02:00:00:00:00:0a",
        "--dry-run",
    ]);
    assert!(!o.status.success());
    assert!(text(&o).1.contains("guest name"), "{}", text(&o).1);

    let o = cli(&[
        "run",
        "--name",
        "vm-a",
        "--socket",
        "/nonexistent/vm-a.sock",
        "--mac",
        "02:00:00:00:00:0a",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("is vnpd running"), "{}", text(&o).1);

    let o = cli(&["run", "--name", "vm-a", "--socket", "/run/x.sock"]);
    assert!(!o.status.success());
    assert!(text(&o).1.contains("--mac"), "{}", text(&o).1);

    let o = cli(&[
        "migrate",
        "--name",
        "vm-a",
        "--socket",
        "/run/x.sock",
        "--mac",
        "02:00:00:00:00:0a",
    ]);
    assert!(!o.status.success());
    assert!(text(&o).1.contains("--dst-socket"), "{}", text(&o).1);
}

#[test]
fn a_closed_stdout_is_not_a_crash() {
    let mut args = vec!["print", "--libvirt-domain"];
    args.extend(VM);
    let mut child = Command::new(env!("CARGO_BIN_EXE_qemu-launch"))
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    assert!(!String::from_utf8_lossy(&o.stderr).contains("panicked"));
}

/// `qemu-launch` with only the given `VNP_*` variables set.
fn cli_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qemu-launch"));
    for (k, _) in std::env::vars() {
        if k.starts_with("VNP_") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    cmd.args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn registry_comes_from_vnpctls_variables_and_the_old_names_still_work() {
    let by_vm = ["print", "--libvirt", "--name", "vm-a", "--vm", "vm-a"];

    // vnpctl's VNP_REGISTRY without certificates: the error names the missing piece.
    let o = cli_env(&by_vm, &[("VNP_REGISTRY", "https://127.0.0.1:9")]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(err.contains("--registry-ca (VNP_CA)"), "{err}");
    assert!(!err.contains("deprecated"), "{err}");

    // The old names are used, with a warning each; the files are then read (and missing).
    let o = cli_env(
        &by_vm,
        &[
            ("VNP_REGISTRY_URL", "https://127.0.0.1:9"),
            ("VNP_REGISTRY_CA", "/nonexistent/ca.pem"),
            ("VNP_REGISTRY_CERT", "/nonexistent/admin.pem"),
            ("VNP_REGISTRY_KEY", "/nonexistent/admin.key"),
        ],
    );
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("VNP_REGISTRY_URL is deprecated; use VNP_REGISTRY"),
        "{err}"
    );
    assert!(
        err.contains("VNP_REGISTRY_CA is deprecated; use VNP_CA"),
        "{err}"
    );
    assert!(err.contains("/nonexistent/ca.pem"), "{err}");

    // VNP_TLS_DIR supplies the files as for vnpctl.
    let o = cli_env(
        &by_vm,
        &[
            ("VNP_REGISTRY", "https://127.0.0.1:9"),
            ("VNP_TLS_DIR", "/nonexistent/tls"),
        ],
    );
    let (_, err) = text(&o);
    assert!(err.contains("/nonexistent/tls/ca.pem"), "{err}");

    // An exported VNP_REGISTRY does not get in the way of a plain --mac.
    let mut args = vec!["print", "--libvirt"];
    args.extend(VM);
    let o = cli_env(&args, &[("VNP_REGISTRY", "https://127.0.0.1:9")]);
    assert!(o.status.success(), "{}", text(&o).1);
}

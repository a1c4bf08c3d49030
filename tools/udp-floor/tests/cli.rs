//! The `udp-floor` binary end to end: on loopback, and between two network namespaces joined
//! by a veth pair (needs root and `ip`; never skipped).

use std::net::Ipv4Addr;
use std::process::Command;

use vnp_testkit::netns::Netns;

fn udp_floor(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_udp-floor"))
        .args(args)
        .output()
        .expect("run udp-floor")
}

/// The value of `"key":` in a flat part of the JSON line, as a number.
fn json_number(json: &str, key: &str) -> f64 {
    let pattern = format!("\"{key}\":");
    let at = json
        .find(&pattern)
        .unwrap_or_else(|| panic!("no {key} in {json}"))
        + pattern.len();
    let end = json[at..]
        .find([',', '}'])
        .map(|i| at + i)
        .unwrap_or(json.len());
    json[at..end]
        .parse()
        .unwrap_or_else(|e| panic!("{key} in {json}: {e}"))
}

fn json_lines(stdout: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(str::to_string)
        .collect()
}

fn check_run(json: &str, payload: f64) {
    assert_eq!(json_number(json, "payload"), payload);
    assert_eq!(json_number(json, "batch"), 32.0);
    let sent = json_number(json, "sent_pps");
    let received = json_number(json, "received_pps");
    assert!(sent > 1000.0, "sent {sent} pps: {json}");
    assert!(received > 0.0 && received <= sent, "{json}");
    for key in [
        "sender_cpu_ns_per_packet",
        "receiver_cpu_ns_per_packet",
        "total_cpu_ns_per_packet",
    ] {
        let ns = json_number(json, key);
        // A UDP datagram costs the kernel at least ~100 ns and far less than 1 ms.
        assert!((50.0..1_000_000.0).contains(&ns), "{key} = {ns}: {json}");
    }
}

#[test]
fn loopback_runs_each_payload_and_prints_json_and_text() {
    let out = udp_floor(&["--payload", "64,1500", "--seconds", "0.5"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("udp-floor: 64-byte payload"), "{stdout}");
    assert!(stdout.contains("ns per delivered packet"), "{stdout}");
    let runs = json_lines(&out.stdout);
    assert_eq!(runs.len(), 2, "{stdout}");
    check_run(&runs[0], 64.0);
    check_run(&runs[1], 1500.0);
}

#[test]
fn json_only_and_connected_sender() {
    let out = udp_floor(&["--seconds", "0.3", "--format", "json", "--connected"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    check_run(stdout.trim(), 64.0);
}

#[test]
fn a_fixed_rate_sends_at_that_rate() {
    let out = udp_floor(&["--seconds", "0.5", "--format", "json", "--rate", "20000"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    check_run(stdout.trim(), 64.0);
    assert_eq!(json_number(stdout.trim(), "rate"), 20000.0);
    // Never faster than asked (a batch of slack); a loaded machine may fall behind.
    let sent = json_number(stdout.trim(), "sent_pps");
    assert!((8_000.0..=20_100.0).contains(&sent), "{stdout}");
    for bad in ["0", "-5", "nan"] {
        let out = udp_floor(&["--seconds", "0.1", "--rate", bad]);
        assert!(!out.status.success(), "--rate {bad} accepted");
    }
}

#[test]
fn between_two_namespaces_over_veth() {
    let a = Netns::create("vnpfloora").unwrap();
    let b = Netns::create("vnpfloorb").unwrap();
    a.veth_to("fla", Some((Ipv4Addr::new(198, 18, 250, 1), 30)), &b, "flb")
        .unwrap();
    b.ip(&["addr", "add", "198.18.250.2/30", "dev", "flb"])
        .unwrap();
    let out = udp_floor(&[
        "--seconds",
        "0.5",
        "--format",
        "json",
        "--sender-netns",
        a.name(),
        "--receiver-netns",
        b.name(),
        "--bind",
        "198.18.250.2:0",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    check_run(json_lines(&out.stdout)[0].as_str(), 64.0);
}

#[test]
fn nothing_arriving_is_a_failure() {
    // The receiver listens on loopback, the sender sends to a port nobody listens on.
    let out = udp_floor(&["--seconds", "0.2", "--peer", "127.0.0.1:9"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no datagram arrived"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn bad_arguments_are_refused() {
    let out = udp_floor(&["--mode", "send"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--peer"));
    let out = udp_floor(&["--mode", "recv"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("fixed port"));
    let out = udp_floor(&["--seconds", "0"]);
    assert!(!out.status.success());
    let out = udp_floor(&["--sender-netns", "vnp-no-such-ns-4711", "--seconds", "0.1"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("vnp-no-such-ns-4711"));
}

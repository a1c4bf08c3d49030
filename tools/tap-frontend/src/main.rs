//! `vnp-tap-frontend`: see README.md.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use vnp_tap_frontend::features::describe_offloads;
use vnp_tap_frontend::layout::Layout;
use vnp_tap_frontend::run::{run, Options, Stopped};
use vnp_tap_frontend::tap::parse_mac;
use vnp_tap_frontend::{EXIT_DISCONNECTED, EXIT_ERROR};

/// An event-driven vhost-user-net frontend over a TAP with IFF_VNET_HDR: a network namespace
/// as vnpd's guest.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// vnpd's vhost-user socket for the VM.
    #[arg(long)]
    socket: PathBuf,
    /// Network namespace for the TAP (`ip netns` name or a path like /proc/PID/ns/net).
    #[arg(long)]
    netns: Option<String>,
    /// TAP interface name.
    #[arg(long, default_value = "vg0")]
    ifname: String,
    /// MAC address of the interface (the VM's, as the registry assigned it).
    #[arg(long, value_parser = parse_mac)]
    mac: Option<[u8; 6]>,
    /// MTU of the interface (DHCP from vnpd sets the network's anyway).
    #[arg(long)]
    mtu: Option<u32>,
    /// Transmit queue length of the TAP: frames the namespace may queue for the fixture
    /// before the TAP drops them (the kernel's TCP does not see a TAP's queue fill up).
    #[arg(long, default_value_t = 4096)]
    txqueuelen: u32,
    /// Ask vnpd for no checksum or segmentation offload.
    #[arg(long)]
    no_offloads: bool,
    /// Seconds to keep trying to connect (at start, and after a hang-up with --reconnect).
    #[arg(long, default_value_t = 10.0)]
    connect_timeout: f64,
    /// Reconnect when vnpd hangs up (a fresh device, the TAP stays); without it the fixture
    /// exits with status 3.
    #[arg(long)]
    reconnect: bool,
    /// RX ring entries (= RX buffers).
    #[arg(long, default_value_t = Layout::default().rx_size)]
    rx_queue_size: u16,
    /// TX ring entries (= TX buffers).
    #[arg(long, default_value_t = Layout::default().tx_size)]
    tx_queue_size: u16,
    /// Bytes per RX buffer.
    #[arg(long, default_value_t = Layout::default().rx_buf_len)]
    rx_buf_len: u32,
    /// Bytes per TX buffer [default: 69632, which holds a 64 KiB TSO frame; 2048 with
    /// --no-offloads].
    #[arg(long)]
    tx_buf_len: Option<u32>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if !(args.connect_timeout.is_finite() && args.connect_timeout >= 0.0) {
        eprintln!("vnp-tap-frontend: --connect-timeout must be a non-negative number");
        return ExitCode::from(2);
    }
    let opts = Options {
        socket: args.socket,
        netns: args.netns,
        ifname: args.ifname,
        mac: args.mac,
        mtu: args.mtu,
        txqueuelen: Some(args.txqueuelen),
        offloads: !args.no_offloads,
        layout: Layout {
            rx_size: args.rx_queue_size,
            tx_size: args.tx_queue_size,
            rx_buf_len: args.rx_buf_len,
            tx_buf_len: args.tx_buf_len.unwrap_or(if args.no_offloads {
                2048
            } else {
                Layout::default().tx_buf_len
            }),
        },
        connect_timeout: Duration::from_secs_f64(args.connect_timeout),
        reconnect: args.reconnect,
    };
    let mut ready = |acked: u64| {
        eprintln!(
            "vnp-tap-frontend: ready: {} on {}, features {acked:#x}, offloads {}",
            opts.ifname,
            opts.socket.display(),
            describe_offloads(acked)
        );
    };
    match run(&opts, &mut ready) {
        Ok((stopped, stats)) => {
            eprintln!("vnp-tap-frontend: stats {}", stats.line());
            match stopped {
                Stopped::Signal => ExitCode::SUCCESS,
                Stopped::Disconnected => {
                    eprintln!("vnp-tap-frontend: vnpd hung up");
                    ExitCode::from(EXIT_DISCONNECTED)
                }
            }
        }
        Err(e) => {
            eprintln!("vnp-tap-frontend: {e}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

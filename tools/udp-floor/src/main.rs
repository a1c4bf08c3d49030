//! `udp-floor`: measure the kernel's UDP cost per packet with sendmmsg/recvmmsg. See README.md.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use clap::{Parser, ValueEnum};
use vnp_udp_floor::mmsg::{self, SendSpec, ThreadStats};
use vnp_udp_floor::report::RunReport;
use vnp_udp_floor::thread;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Sender and receiver threads in this process.
    Both,
    /// Only send to --peer.
    Send,
    /// Only receive on --bind.
    Recv,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    /// Human lines, then one JSON object per run.
    Both,
    /// Human lines only.
    Text,
    /// One JSON object per run only.
    Json,
}

/// Kernel-floor UDP benchmark: a sendmmsg sender and a recvmmsg receiver, reporting packets/s
/// and CPU time per packet (getrusage RUSAGE_THREAD).
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// UDP payload bytes per datagram; a comma-separated list runs each in turn.
    #[arg(long, value_delimiter = ',', default_value = "64")]
    payload: Vec<usize>,
    /// Seconds the sender sends (receive-only: seconds before it stops once idle).
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Datagrams per sendmmsg/recvmmsg call.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// What this process runs.
    #[arg(long, value_enum, default_value_t = Mode::Both)]
    mode: Mode,
    /// Receiver address (port 0: any free port, in `both` mode).
    #[arg(long, default_value = "127.0.0.1:0")]
    bind: SocketAddrV4,
    /// Where the sender sends (default in `both` mode: the receiver's address).
    #[arg(long)]
    peer: Option<SocketAddrV4>,
    /// Connect the sender's socket instead of naming the peer in every message.
    #[arg(long)]
    connected: bool,
    /// Network namespace (`ip netns` name) the sender thread enters.
    #[arg(long)]
    sender_netns: Option<String>,
    /// Network namespace the receiver thread enters.
    #[arg(long)]
    receiver_netns: Option<String>,
    /// CPU to pin the sender thread to.
    #[arg(long)]
    sender_cpu: Option<usize>,
    /// CPU to pin the receiver thread to.
    #[arg(long)]
    receiver_cpu: Option<usize>,
    /// Receive buffer to ask for, bytes.
    #[arg(long, default_value_t = 8 << 20)]
    rcvbuf: usize,
    /// Datagrams per send as one UDP GSO send (`UDP_SEGMENT`, segment = --payload); 1: off.
    #[arg(long, default_value_t = 1)]
    gso: usize,
    /// Send at this many datagrams (GSO sends) per second instead of as fast as possible, in
    /// full batches with sleeps between: to compare with a partner at the partner's packet
    /// rate.
    #[arg(long)]
    rate: Option<f64>,
    /// Receive with UDP GRO (`UDP_GRO`): coalesced datagrams, counted as their segments.
    #[arg(long)]
    gro: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Both)]
    format: Format,
}

/// Per-thread setup: namespace first (sockets are created after), then CPU.
fn enter(netns: Option<&str>, cpu: Option<usize>) -> Result<(), String> {
    if let Some(name) = netns {
        thread::enter_netns(name).map_err(|e| format!("netns {name}: {e}"))?;
    }
    if let Some(cpu) = cpu {
        thread::pin_to_cpu(cpu).map_err(|e| format!("pin to CPU {cpu}: {e}"))?;
    }
    Ok(())
}

fn receiver_socket(args: &Args) -> Result<UdpSocket, String> {
    let socket = UdpSocket::bind(args.bind).map_err(|e| format!("bind {}: {e}", args.bind))?;
    mmsg::grow_receive_buffer(&socket, args.rcvbuf)
        .map_err(|e| format!("receive buffer of {} bytes: {e}", args.rcvbuf))?;
    Ok(socket)
}

fn send_spec(args: &Args, dst: SocketAddrV4, payload: usize) -> SendSpec {
    SendSpec {
        dst,
        payload,
        batch: args.batch,
        duration: Duration::from_secs_f64(args.seconds),
        connected: args.connected,
        gso_segments: args.gso,
        rate: args.rate,
    }
}

fn run_sender(args: &Args, dst: SocketAddrV4, payload: usize) -> Result<ThreadStats, String> {
    enter(args.sender_netns.as_deref(), args.sender_cpu)?;
    let socket =
        UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).map_err(|e| format!("sender socket: {e}"))?;
    mmsg::run_sender(&socket, &send_spec(args, dst, payload))
        .map_err(|e| format!("send to {dst}: {e}"))
}

fn run_receiver(
    args: &Args,
    payload: usize,
    stop: &AtomicBool,
    bound: Option<mpsc::Sender<Result<SocketAddrV4, String>>>,
) -> Result<ThreadStats, String> {
    let setup = enter(args.receiver_netns.as_deref(), args.receiver_cpu)
        .and_then(|()| receiver_socket(args));
    let socket = match (setup, bound) {
        (Ok(socket), Some(bound)) => {
            let addr = match socket.local_addr() {
                Ok(SocketAddr::V4(addr)) => Ok(addr),
                Ok(other) => Err(format!("receiver bound to non-IPv4 {other}")),
                Err(e) => Err(format!("receiver address: {e}")),
            };
            let _ = bound.send(addr.clone());
            addr?;
            socket
        }
        (Ok(socket), None) => socket,
        (Err(e), bound) => {
            if let Some(bound) = bound {
                let _ = bound.send(Err(e.clone()));
            }
            return Err(e);
        }
    };
    mmsg::run_receiver(&socket, payload, args.batch, args.gro, stop)
        .map_err(|e| format!("receive: {e}"))
}

fn run_both(args: &Args, payload: usize) -> Result<RunReport, String> {
    let stop = Arc::new(AtomicBool::new(false));
    let (bound_tx, bound_rx) = mpsc::channel();
    std::thread::scope(|scope| {
        let receiver = {
            let stop = Arc::clone(&stop);
            scope.spawn(move || run_receiver(args, payload, &stop, Some(bound_tx)))
        };
        let bound = bound_rx
            .recv()
            .map_err(|_| "receiver thread died before binding".to_string())
            .and_then(|r| r);
        let sender_result = bound.and_then(|bound| {
            let dst = args.peer.unwrap_or(bound);
            scope
                .spawn(move || run_sender(args, dst, payload))
                .join()
                .map_err(|_| "sender thread panicked".to_string())?
        });
        stop.store(true, Ordering::Relaxed);
        let receiver_result = receiver
            .join()
            .map_err(|_| "receiver thread panicked".to_string())?;
        let (sender, receiver) = (sender_result?, receiver_result?);
        if receiver.packets == 0 {
            return Err(format!(
                "no datagram arrived ({} sent): check --bind/--peer and the namespaces' routes",
                sender.packets
            ));
        }
        Ok(RunReport {
            payload,
            batch: args.batch,
            gso_segments: args.gso,
            gro: args.gro,
            rate: args.rate,
            sender: Some(sender),
            receiver: Some(receiver),
        })
    })
}

fn run_one(args: &Args, payload: usize) -> Result<RunReport, String> {
    match args.mode {
        Mode::Both => run_both(args, payload),
        Mode::Send => {
            let dst = args.peer.ok_or("--mode send needs --peer")?;
            let sender = run_sender(args, dst, payload)?;
            Ok(RunReport {
                payload,
                batch: args.batch,
                gso_segments: args.gso,
                gro: args.gro,
                rate: args.rate,
                sender: Some(sender),
                receiver: None,
            })
        }
        Mode::Recv => {
            if args.bind.port() == 0 {
                return Err("--mode recv needs --bind with a fixed port".into());
            }
            // Stop after --seconds, once the sender has been quiet for the drain timeout.
            let stop = Arc::new(AtomicBool::new(false));
            let timer = {
                let stop = Arc::clone(&stop);
                let seconds = Duration::from_secs_f64(args.seconds);
                std::thread::spawn(move || {
                    std::thread::sleep(seconds);
                    stop.store(true, Ordering::Relaxed);
                })
            };
            let receiver = run_receiver(args, payload, &stop, None);
            let _ = timer.join();
            Ok(RunReport {
                payload,
                batch: args.batch,
                gso_segments: args.gso,
                gro: args.gro,
                rate: None,
                sender: None,
                receiver: Some(receiver?),
            })
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if !(args.seconds.is_finite() && args.seconds > 0.0) {
        eprintln!("udp-floor: --seconds must be positive");
        return ExitCode::from(2);
    }
    if args.rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
        eprintln!("udp-floor: --rate must be a positive number of datagrams per second");
        return ExitCode::from(2);
    }
    for &payload in &args.payload {
        match run_one(&args, payload) {
            Ok(report) => {
                if args.format != Format::Json {
                    print!("{}", report.to_text());
                }
                if args.format != Format::Text {
                    println!("{}", report.to_json());
                }
            }
            Err(e) => {
                eprintln!("udp-floor: {payload}-byte run failed: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}

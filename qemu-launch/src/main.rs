//! `qemu-launch`: start a guest on vnpd with QEMU, print the cloud-hypervisor and libvirt
//! equivalents, build the test guest, and run a live migration between two vnpd hosts.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use qemu_launch::cmdline::{self, GuestFiles};
use qemu_launch::registry_env::{RegistryArgs, RegistrySettings};
use qemu_launch::{Accel, Guest, GuestImage, GuestSpec, MacAddr, TestNetdev};

mod migrate_cmd;
use migrate_cmd::{run_migration, MigrationSteps};

/// Start guests wired to vnpd (vhost-user), drive them over QMP, run live migrations.
///
/// vnpd listens on one vhost-user socket per VM; QEMU connects to it as the client and
/// reconnects when vnpd restarts. A typical start on a vnpd host:
///
///   qemu-launch run --name vm-a --socket /run/vnp/vm-a.sock --mac 02:00:00:00:00:0a
///
/// Add --dry-run to only print the QEMU command line; `qemu-launch print --cloud-hypervisor`
/// and `print --libvirt` show the same wiring for those VMMs.
#[derive(Debug, Parser)]
#[command(name = "qemu-launch", version, verbatim_doc_comment)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Boot the test guest in QEMU attached to vnpd, wait until it is up, and keep it running
    /// until Ctrl-C/SIGTERM (clean power-off) or until the guest powers off.
    Run {
        #[command(flatten)]
        guest: GuestArgs,
        /// Print the QEMU command line instead of running it.
        #[arg(long)]
        dry_run: bool,
        /// Seconds to wait for the guest to come up.
        #[arg(long, default_value_t = 180)]
        boot_timeout: u64,
        /// Run this shell command in the guest once it is up, print its output, then power off.
        #[arg(long)]
        exec: Option<String>,
    },
    /// Print the command line for a VMM without running anything.
    Print {
        #[command(flatten)]
        guest: GuestArgs,
        #[arg(long, value_enum, default_value_t = Vmm::Qemu)]
        vmm: Vmm,
        /// Shorthand for --vmm cloud-hypervisor.
        #[arg(long, conflicts_with = "vmm")]
        cloud_hypervisor: bool,
        /// Shorthand for --vmm libvirt (an <interface type='vhostuser'> snippet).
        #[arg(long, conflicts_with_all = ["vmm", "cloud_hypervisor"])]
        libvirt: bool,
        /// Shorthand for --vmm libvirt-domain (a complete domain XML for `virsh define`).
        #[arg(long, conflicts_with_all = ["vmm", "cloud_hypervisor", "libvirt"])]
        libvirt_domain: bool,
    },
    /// Live-migrate a running guest between two vnpd hosts (two vhost-user sockets), or
    /// between two QEMUs with an isolated QEMU-only NIC (--test-netdev). Boots the source,
    /// runs --before in it, migrates, runs --after in the destination and prints a JSON report
    /// with total time and downtime.
    ///
    /// SIGINT/SIGTERM during the migration cancels it (QMP migrate_cancel); a second one ends
    /// qemu-launch at once. A failed or cancelled migration undoes the network steps, runs
    /// --after in the source (which kept the guest), prints the JSON with "error" and exits
    /// with status 2; status 1 is any other error (including an undo that failed).
    Migrate {
        #[command(flatten)]
        guest: GuestArgs,
        /// vnpd socket on the destination host (the source uses --socket).
        #[arg(long, requires = "socket", conflicts_with = "dst_host")]
        dst_socket: Option<PathBuf>,
        #[command(flatten)]
        network: NetworkArgs,
        /// Migration stream URI (default: a unix socket next to the destination's files).
        #[arg(long)]
        uri: Option<String>,
        /// Shell command run in the guest before migrating (e.g. start a ping in the background).
        #[arg(long)]
        before: Option<String>,
        /// Shell command run in the guest after migrating (e.g. collect the ping statistics).
        #[arg(long)]
        after: Option<String>,
        #[arg(long, default_value_t = 180)]
        boot_timeout: u64,
        /// Migration downtime limit (ms).
        #[arg(long)]
        downtime_limit_ms: Option<u64>,
        /// Migration bandwidth limit, bytes per second (QEMU's `max-bandwidth`).
        #[arg(long)]
        max_bandwidth: Option<u64>,
    },
    /// Build (or locate the cached) test guest image and print its directory and manifest.
    BuildGuest,
}

/// The network steps `migrate` does itself between two vnpd hosts, and the probe.
#[derive(Debug, Args)]
struct NetworkArgs {
    /// Registry id of the destination host: qemu-launch moves --vm there in the registry and
    /// attaches it as incoming on the destination vnpd (--dst-admin) before migrating.
    #[arg(long, requires_all = ["vm", "dst_admin", "socket"])]
    dst_host: Option<String>,
    /// The destination vnpd's admin socket.
    #[arg(long, requires = "dst_host")]
    dst_admin: Option<PathBuf>,
    /// Send a sequence-numbered echo stream from the guest to this address across the
    /// migration and report the blackout and the packets lost. The source guest's DHCP lease
    /// is awaited first.
    #[arg(long)]
    probe: Option<String>,
    /// Milliseconds between the probe's echo requests.
    #[arg(long, default_value_t = 10, requires = "probe")]
    probe_interval_ms: u32,
    /// Seconds the probe runs before and after the migration.
    #[arg(long, default_value_t = 3, requires = "probe")]
    probe_settle_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Vmm {
    Qemu,
    CloudHypervisor,
    Libvirt,
    LibvirtDomain,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TestNet {
    /// QEMU user networking, restricted: DHCP from QEMU, no traffic leaves QEMU.
    User,
}

#[derive(Debug, Args)]
struct GuestArgs {
    /// Guest name ([A-Za-z0-9_.-], at most 48 characters).
    #[arg(long)]
    name: String,
    /// vnpd's vhost-user socket for this VM.
    #[arg(long, conflicts_with = "test_netdev")]
    socket: Option<PathBuf>,
    /// MAC address of the NIC (or take it from the registry with --vm).
    #[arg(long, conflicts_with = "vm")]
    mac: Option<MacAddr>,
    /// VM id in the registry: the MAC comes from the registry's record.
    #[arg(long)]
    vm: Option<String>,
    /// Registry URL (https://...), as for vnpctl. Deprecated: VNP_REGISTRY_URL.
    #[arg(long, env = "VNP_REGISTRY")]
    registry: Option<String>,
    /// Directory from `vnpctl ca init`: ca.pem, admin.pem, admin.key unless given one by one.
    #[arg(long, env = "VNP_TLS_DIR")]
    tls_dir: Option<PathBuf>,
    /// CA certificate of the registry. Deprecated: VNP_REGISTRY_CA.
    #[arg(long, env = "VNP_CA")]
    registry_ca: Option<PathBuf>,
    /// Client certificate. Deprecated: VNP_REGISTRY_CERT.
    #[arg(long, env = "VNP_CERT")]
    registry_cert: Option<PathBuf>,
    /// Client key. Deprecated: VNP_REGISTRY_KEY.
    #[arg(long, env = "VNP_KEY")]
    registry_key: Option<PathBuf>,
    /// A QEMU-only NIC instead of vnpd (tests, demos without vnpd).
    #[arg(long, value_enum)]
    test_netdev: Option<TestNet>,
    /// virtio-net queue pairs.
    #[arg(long, default_value_t = 1)]
    queues: u16,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    memory: u32,
    #[arg(long, default_value_t = 1)]
    cpus: u16,
    /// tcg (default; works without /dev/kvm) or kvm.
    #[arg(long, default_value = "tcg")]
    accel: Accel,
    /// Directory for console log, QEMU log, QMP and command sockets.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Prebuilt guest image directory (vmlinuz, initramfs.img); default: build/locate it.
    #[arg(long, env = "VNP_GUEST_DIR")]
    guest_dir: Option<PathBuf>,
    /// Extra kernel command line word (repeatable), e.g. vnp.nonet.
    #[arg(long = "kernel-arg")]
    kernel_args: Vec<String>,
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// Extra QEMU argument, appended as given (repeatable), e.g. --qemu-arg=-trace --qemu-arg='vhost_user_*'.
    #[arg(long = "qemu-arg", allow_hyphen_values = true)]
    qemu_args: Vec<String>,
}

impl GuestArgs {
    fn mac(&self) -> Result<MacAddr, String> {
        if let Some(mac) = self.mac {
            return Ok(mac);
        }
        let Some(vm) = &self.vm else {
            return Err(
                "give --mac, or --vm with --registry to take the MAC from the registry".into(),
            );
        };
        let record = self
            .registry_client()?
            .get_vm(vm)
            .map_err(|e| format!("registry: looking up VM {vm}: {e}"))?;
        record
            .mac
            .to_string()
            .parse::<MacAddr>()
            .map_err(|e| format!("registry MAC of {vm}: {e}"))
    }

    fn registry_client(&self) -> Result<vnp_registry_client::RegistryClient, String> {
        let registry = self.registry_settings()?;
        let config = vnp_registry_client::client::ClientConfig::from_files(
            &registry.url,
            &registry.ca,
            &registry.cert,
            &registry.key,
        )
        .map_err(|e| format!("registry client config: {e}"))?;
        vnp_registry_client::client::RegistryClient::new(config)
            .map_err(|e| format!("registry client: {e}"))
    }

    /// The registry connection, from flags, vnpctl's variables, or (with a warning) the
    /// variables qemu-launch read before.
    fn registry_settings(&self) -> Result<RegistrySettings, String> {
        let given = RegistryArgs {
            url: self.registry.clone(),
            tls_dir: self.tls_dir.clone(),
            ca: self.registry_ca.clone(),
            cert: self.registry_cert.clone(),
            key: self.registry_key.clone(),
        };
        let (args, warnings) = given.with_deprecated(|name| std::env::var(name).ok());
        for w in warnings {
            log::warn!("{w}");
        }
        args.settings()
            .map_err(|e| format!("--vm needs the registry: {e}"))
    }

    fn spec(&self) -> Result<GuestSpec, String> {
        let mut spec = GuestSpec::new(self.name.clone(), self.mac()?);
        spec.vhost_user_socket = self.socket.clone();
        spec.test_netdev = self
            .test_netdev
            .map(|TestNet::User| TestNetdev::UserIsolated);
        spec.queue_pairs = self.queues;
        spec.memory_mib = self.memory;
        spec.cpus = self.cpus;
        spec.accel = self.accel;
        spec.work_dir = self.work_dir.clone();
        spec.extra_kernel_args = self.kernel_args.clone();
        spec.qemu_binary = self.qemu.clone();
        spec.extra_qemu_args = self.qemu_args.clone();
        spec.validate().map_err(|e| e.to_string())?;
        Ok(spec)
    }

    fn image(&self) -> Result<GuestImage, String> {
        match &self.guest_dir {
            Some(d) => GuestImage::from_dir(d),
            None => GuestImage::ensure(),
        }
        .map_err(|e| e.to_string())
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("qemu-launch: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode, String> {
    match cli.command {
        Cmd::BuildGuest => {
            let img =
                GuestImage::build(&qemu_launch::image::repo_dir()).map_err(|e| e.to_string())?;
            emit(&format!("{}\n{}", img.dir.display(), img.manifest));
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Print {
            guest,
            vmm,
            cloud_hypervisor,
            libvirt,
            libvirt_domain,
        } => {
            let vmm = if cloud_hypervisor {
                Vmm::CloudHypervisor
            } else if libvirt {
                Vmm::Libvirt
            } else if libvirt_domain {
                Vmm::LibvirtDomain
            } else {
                vmm
            };
            print_command(&guest, vmm)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Run {
            guest,
            dry_run: true,
            ..
        } => {
            print_command(&guest, Vmm::Qemu)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Run {
            guest,
            dry_run: false,
            boot_timeout,
            exec,
        } => run_guest(&guest, boot_timeout, exec.as_deref()),
        Cmd::Migrate {
            guest,
            dst_socket,
            network,
            uri,
            before,
            after,
            boot_timeout,
            downtime_limit_ms,
            max_bandwidth,
        } => run_migration(
            &guest,
            &network,
            dst_socket,
            MigrationSteps {
                uri,
                before,
                after,
                boot_timeout,
                downtime_limit_ms,
                max_bandwidth,
            },
        ),
    }
}

fn planned_files(args: &GuestArgs) -> GuestFiles {
    let dir = args
        .work_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("qemu-launch-{}", args.name)));
    GuestFiles::in_dir(&dir)
}

fn print_command(args: &GuestArgs, vmm: Vmm) -> Result<(), String> {
    let spec = args.spec()?;
    // The libvirt interface fragment needs no image; everything else names the boot files.
    let boot_and_files =
        || -> Result<_, String> { Ok((args.image()?.boot_files(), planned_files(args))) };
    match vmm {
        Vmm::Libvirt => emit(&cmdline::libvirt_interface_xml(&spec)),
        Vmm::LibvirtDomain => {
            let (boot, files) = boot_and_files()?;
            emit(&cmdline::libvirt_domain_xml(&spec, &boot, &files));
        }
        Vmm::Qemu => {
            let (boot, files) = boot_and_files()?;
            let a = cmdline::qemu_args(&spec, &boot, &files, false);
            emit(&format!(
                "{}
",
                cmdline::shell_command(&spec.qemu_binary.to_string_lossy(), &a)
            ));
        }
        Vmm::CloudHypervisor => {
            let (boot, files) = boot_and_files()?;
            let api = files.qmp_socket.with_file_name("ch-api.sock");
            let a = cmdline::cloud_hypervisor_args(&spec, &boot, &files, &api);
            emit(&format!(
                "{}\n",
                cmdline::shell_command("cloud-hypervisor", &a)
            ));
        }
    }
    Ok(())
}

/// Writes to stdout. A closed pipe (`qemu-launch print ... | head`) is not an error worth a
/// panic or a message: the reader has what it wanted.
fn emit(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|_| out.flush());
}

fn stop_flag() -> Result<Arc<AtomicBool>, String> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ] {
        signal_hook::flag::register(sig, Arc::clone(&flag))
            .map_err(|e| format!("installing signal handler: {e}"))?;
    }
    Ok(flag)
}

fn run_guest(args: &GuestArgs, boot_timeout: u64, exec: Option<&str>) -> Result<ExitCode, String> {
    let stop = stop_flag()?;
    let spec = args.spec()?;
    let boot = args.image()?.boot_files();
    let started = std::time::Instant::now();
    let mut guest = Guest::launch_with(spec, &boot, false).map_err(|e| e.to_string())?;
    eprintln!(
        "qemu-launch: {} started (QEMU pid {:?}); files in {}",
        guest.name(),
        guest.pid(),
        guest.work_dir().display()
    );
    guest
        .wait_ready(Duration::from_secs(boot_timeout))
        .map_err(|e| e.to_string())?;
    eprintln!(
        "qemu-launch: {} is up {} ms after QEMU started; console: {}",
        guest.name(),
        started.elapsed().as_millis(),
        guest.files().console_log.display()
    );
    if let Some(cmd) = exec {
        let out = guest
            .run(cmd, Duration::from_secs(300))
            .map_err(|e| e.to_string())?;
        emit(&out.stdout);
        eprint!("{}", out.stderr);
        guest
            .shutdown(Duration::from_secs(30))
            .map_err(|e| e.to_string())?;
        return Ok(ExitCode::from(u8::try_from(out.status).unwrap_or(1)));
    }
    eprintln!(
        "qemu-launch: QMP at {}; Ctrl-C powers the guest off",
        guest.files().qmp_socket.display()
    );
    loop {
        if stop.load(Ordering::Relaxed) {
            eprintln!("qemu-launch: powering {} off", guest.name());
            guest
                .shutdown(Duration::from_secs(30))
                .map_err(|e| e.to_string())?;
            return Ok(ExitCode::SUCCESS);
        }
        if let Some(status) = guest.wait_exit(Duration::from_millis(200)) {
            eprintln!("qemu-launch: QEMU exited ({status})");
            return Ok(if status.success() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
    }
}

//! qemu-launch: start real guests wired to vnpd, drive them over QMP, run live migrations.
//!
//! ```no_run
//! use std::time::Duration;
//! use qemu_launch::{Guest, GuestSpec, MacAddr};
//!
//! let mut spec = GuestSpec::new("vm-a", "02:00:00:00:00:0a".parse::<MacAddr>().unwrap());
//! spec.vhost_user_socket = Some("/run/vnp/vm-a.sock".into());
//! let mut guest = Guest::launch(spec)?;            // builds/locates the guest image, starts QEMU
//! guest.wait_ready(Duration::from_secs(120))?;     // the guest's command channel answers
//! let out = guest.run("ip -4 addr show eth0", Duration::from_secs(10))?;
//! assert_eq!(out.status, 0);
//! guest.shutdown(Duration::from_secs(30))?;        // or just drop it: Drop kills QEMU
//! # Ok::<(), qemu_launch::Error>(())
//! ```

pub mod channel;
pub mod cmdline;
pub mod error;
pub mod guest;
pub mod image;
pub mod libvirt;
pub mod libvirt_domain;
mod lines;
pub mod migration;
pub mod network_move;
pub mod probe;
pub mod qmp;
pub mod registry_env;
mod spawn;
pub mod spec;
pub mod transfer;

pub use channel::CmdOutput;
pub use cmdline::{BootFiles, GuestFiles};
pub use error::{Diagnostics, Error, Result};
pub use guest::{Guest, NetStatus};
pub use image::GuestImage;
pub use libvirt_domain::{LibvirtDomain, Virsh};
pub use migration::{migrate, MigrateOptions, MigrationReport};
pub use qmp::{Qmp, QmpError, VmStatus};
pub use spec::{Accel, GuestSpec, MacAddr, TestNetdev};
pub use transfer::{tcp_transfer, TcpTransfer, TcpTransferSpec};

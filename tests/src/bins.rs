//! Finding (and, under `cargo test`, building) the binaries the end-to-end tests run:
//! `vnpd`, `vnp-registry`, `vnpctl`, `vnp-tap-frontend`, `vnp-gateway` and `qemu-launch`.
//!
//! They belong to other workspace packages, so `cargo test -p vnp-e2e` would not build them on
//! its own. The harness runs `cargo build --bins` for those packages once per test process
//! (a no-op when they are fresh), then looks for them next to the running executable.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Paths of the binaries.
#[derive(Debug, Clone)]
pub struct Bins {
    /// The per-host daemon.
    pub vnpd: PathBuf,
    /// The registry server.
    pub registry: PathBuf,
    /// The admin CLI.
    pub vnpctl: PathBuf,
    /// The namespace guests' vhost-user frontend (`tools/tap-frontend`).
    pub tap_frontend: PathBuf,
    /// The public-edge daemon.
    pub gateway: PathBuf,
    /// The guest launcher (`qemu-launch migrate` between vnpd hosts).
    pub qemu_launch: PathBuf,
}

/// The directory cargo puts binaries in for the running executable's profile
/// (`target/<profile>`), or `VNP_BIN_DIR`.
pub fn bin_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("VNP_BIN_DIR") {
        return Ok(PathBuf::from(d));
    }
    let exe = std::env::current_exe().context("locating the running executable")?;
    let mut dir = exe
        .parent()
        .context("executable has no parent directory")?
        .to_path_buf();
    // Test executables live in target/<profile>/deps.
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    Ok(dir)
}

fn build(dir: &Path) -> Result<()> {
    // Set by `cargo test` and `cargo run`; a binary started directly (scripts/demo) uses
    // what is already built.
    let Some(cargo) = std::env::var_os("CARGO").map(PathBuf::from) else {
        return Ok(());
    };
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--bins", "--manifest-path"])
        .arg(&manifest)
        .args([
            "-p",
            "vnpd",
            "-p",
            "vnp-registry",
            "-p",
            "vnp-registry-client",
            "-p",
            "vnp-tap-frontend",
            "-p",
            "vnp-gateway",
            "-p",
            "qemu-launch",
        ]);
    if dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let out = cmd
        .output()
        .context("running cargo build for the binaries")?;
    if !out.status.success() {
        bail!(
            "cargo build of the e2e binaries failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn locate() -> Result<Bins> {
    let dir = bin_dir()?;
    if std::env::var_os("VNP_E2E_NO_BUILD").is_none() && std::env::var_os("VNP_BIN_DIR").is_none() {
        build(&dir)?;
    }
    let find = |name: &str| -> Result<PathBuf> {
        let p = dir.join(name);
        if !p.is_file() {
            bail!(
                "{} not found: build it with `cargo build --workspace --bins` (or set VNP_BIN_DIR)",
                p.display()
            );
        }
        Ok(p)
    };
    Ok(Bins {
        vnpd: find("vnpd")?,
        registry: find("vnp-registry")?,
        vnpctl: find("vnpctl")?,
        tap_frontend: find("vnp-tap-frontend")?,
        gateway: find("vnp-gateway")?,
        qemu_launch: find("qemu-launch")?,
    })
}

/// The binaries, built and located once per process.
pub fn bins() -> Result<Bins> {
    static BINS: OnceLock<Result<Bins, String>> = OnceLock::new();
    BINS.get_or_init(|| locate().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

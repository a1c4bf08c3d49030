//! The test guest image: Debian kernel + busybox initramfs built by `scripts/build-guest`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::cmdline::BootFiles;
use crate::error::{Error, Result};

/// A built guest image directory (`vmlinuz`, `initramfs.img`, `manifest`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImage {
    pub dir: PathBuf,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// The build manifest (kernel package, modules, hashes), for reports.
    pub manifest: String,
}

impl GuestImage {
    /// Builds the image if its inputs changed, else locates the cached build. Runs the build
    /// script at most once per process; concurrent processes serialize on the script's lock.
    ///
    /// `VNP_GUEST_DIR=DIR` uses a prebuilt image directory instead; `VNP_REPO_DIR` points at
    /// the source tree when the binary runs outside it.
    pub fn ensure() -> Result<GuestImage> {
        static CACHED: OnceLock<std::result::Result<GuestImage, String>> = OnceLock::new();
        CACHED
            .get_or_init(|| {
                if let Some(dir) = std::env::var_os("VNP_GUEST_DIR") {
                    return Self::from_dir(Path::new(&dir)).map_err(|e| e.to_string());
                }
                Self::build(&repo_dir()).map_err(|e| e.to_string())
            })
            .clone()
            .map_err(Error::Image)
    }

    /// Runs `<repo>/scripts/build-guest` and opens what it built.
    pub fn build(repo: &Path) -> Result<GuestImage> {
        let script = repo.join("scripts/build-guest");
        let out = Command::new(&script)
            .arg("--print-dir")
            .output()
            .map_err(|source| Error::Spawn {
                program: script.display().to_string(),
                source,
            })?;
        if !out.status.success() {
            return Err(Error::Image(format!(
                "{} failed ({}):\n{}",
                script.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim_end()
            )));
        }
        let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if dir.is_empty() {
            return Err(Error::Image(format!(
                "{} printed no image directory",
                script.display()
            )));
        }
        Self::from_dir(Path::new(&dir))
    }

    /// Opens an image directory, checking both boot files are there.
    pub fn from_dir(dir: &Path) -> Result<GuestImage> {
        let kernel = dir.join("vmlinuz");
        let initramfs = dir.join("initramfs.img");
        for f in [&kernel, &initramfs] {
            if !f.is_file() {
                return Err(Error::Image(format!(
                    "{} is missing (run scripts/build-guest or `qemu-launch build-guest`)",
                    f.display()
                )));
            }
        }
        let manifest = std::fs::read_to_string(dir.join("manifest")).unwrap_or_default();
        Ok(GuestImage {
            dir: dir.to_path_buf(),
            kernel,
            initramfs,
            manifest,
        })
    }

    pub fn boot_files(&self) -> BootFiles {
        BootFiles {
            kernel: self.kernel.clone(),
            initramfs: self.initramfs.clone(),
        }
    }
}

/// The source tree: `VNP_REPO_DIR`, else the workspace this crate was built from.
pub fn repo_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("VNP_REPO_DIR") {
        return PathBuf::from(d);
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_dir_reports_missing_files() {
        let dir = std::env::temp_dir().join(format!("ql-img-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let err = GuestImage::from_dir(&dir).unwrap_err().to_string();
        assert!(err.contains("vmlinuz is missing"), "{err}");
        std::fs::write(dir.join("vmlinuz"), b"k").unwrap();
        std::fs::write(dir.join("initramfs.img"), b"i").unwrap();
        let img = GuestImage::from_dir(&dir).unwrap();
        assert_eq!(img.boot_files().kernel, dir.join("vmlinuz"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

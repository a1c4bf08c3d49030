//! The guest image build is cached by its inputs and reproducible: a build from the same
//! inputs in a fresh cache gives byte-identical kernel and initramfs, and a second run is a
//! cache hit.

mod common;

use std::path::PathBuf;
use std::process::Command;

use qemu_launch::image::repo_dir;

struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn hashes(manifest: &str) -> Vec<String> {
    manifest
        .lines()
        .filter(|l| l.ends_with("  vmlinuz") || l.ends_with("  initramfs.img"))
        .map(String::from)
        .collect()
}

fn build_in(cache: &std::path::Path) -> (String, String) {
    let out = Command::new(repo_dir().join("scripts/build-guest"))
        .arg("--print-dir")
        .env("VNP_CACHE_DIR", cache)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "build-guest failed: {stderr}");
    (
        String::from_utf8(out.stdout).unwrap().trim().to_string(),
        stderr,
    )
}

#[test]
fn image_build_is_reproducible_and_cached() {
    let reference = common::image();
    let cache = RemoveDir(
        std::env::temp_dir().join(format!("qemu-launch-test-cache-{}", std::process::id())),
    );
    std::fs::create_dir_all(cache.0.join("debs")).unwrap();
    // Reuse the already downloaded kernel package rather than fetching it again.
    let kpkg = reference
        .manifest
        .lines()
        .find_map(|l| l.strip_prefix("kernel_package="))
        .unwrap();
    let deb = repo_dir().join(".cache/debs").join(kpkg);
    std::os::unix::fs::symlink(&deb, cache.0.join("debs").join(kpkg)).unwrap();

    let (dir, stderr) = build_in(&cache.0);
    assert!(
        stderr.contains("building guest"),
        "first build in an empty cache builds: {stderr}"
    );
    let manifest = std::fs::read_to_string(PathBuf::from(&dir).join("manifest")).unwrap();
    assert_eq!(hashes(&manifest).len(), 2);
    assert_eq!(
        hashes(&manifest),
        hashes(&reference.manifest),
        "same inputs, same bytes"
    );
    assert_eq!(
        PathBuf::from(&dir).file_name(),
        reference.dir.file_name(),
        "the cache key depends only on the inputs"
    );

    let (again, stderr) = build_in(&cache.0);
    assert_eq!(again, dir);
    assert!(
        !stderr.contains("building guest"),
        "second run is a cache hit: {stderr}"
    );
}

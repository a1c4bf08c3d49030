//! The "guest memory": one memfd, mapped shared here and handed to vnpd with `SET_MEM_TABLE`.
//! Guest-physical address 0 is the start of the file.
//!
//! Rings and buffers live in it. The fixture never copies packet bytes itself: the kernel
//! reads TAP frames straight into TX buffers (`readv`) and writes RX buffers straight to the
//! TAP (`writev`); only ring entries and the 12-byte virtio-net headers are touched here.
//! vnpd, another process, reads and writes the same pages concurrently, so every access goes
//! through volatile or atomic operations on raw pointers, never through Rust references to
//! plain data.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::AtomicU16;

/// Errors creating the memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// memfd_create, ftruncate or mmap failed.
    #[error("cannot create {size} bytes of guest memory: {source}")]
    Create {
        /// Requested size.
        size: usize,
        /// Underlying error.
        source: io::Error,
    },
}

/// The shared mapping. Unmapped on drop.
#[derive(Debug)]
pub struct GuestRam {
    base: *mut u8,
    len: usize,
    file: File,
}

impl GuestRam {
    /// Creates and maps `len` bytes (rounded up to a page) of zeroed shared memory. Pages are
    /// allocated when first touched (TX buffers sized for TSO frames mostly stay untouched
    /// without offloads).
    pub fn new(len: usize) -> Result<GuestRam, MemoryError> {
        let len = len.div_ceil(4096) * 4096;
        let fail = |source| MemoryError::Create { size: len, source };
        // SAFETY: memfd_create with a valid NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"vnp-tap-frontend".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(fail(io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len as u64).map_err(fail)?;
        // SAFETY: a new shared mapping of the whole file; no existing memory is affected.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(fail(io::Error::last_os_error()));
        }
        Ok(GuestRam {
            base: base.cast(),
            len,
            file,
        })
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never: at least one page).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The memfd (for `SET_MEM_TABLE`).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Where the mapping starts in this process (the region's `userspace_addr`).
    pub fn host_base(&self) -> u64 {
        self.base as u64
    }

    /// A pointer to `len` bytes at guest address `gpa`, or `None` when the range does not fit.
    pub fn ptr(&self, gpa: u64, len: usize) -> Option<*mut u8> {
        let start = usize::try_from(gpa).ok()?;
        let end = start.checked_add(len)?;
        if end > self.len {
            return None;
        }
        // SAFETY: start + len <= self.len, so the result stays inside the mapping.
        Some(unsafe { self.base.add(start) })
    }

    /// The 16-bit ring index at `gpa` (2-byte aligned), as an atomic shared with vnpd.
    ///
    /// # Panics
    /// When `gpa` is outside the mapping or misaligned: ring addresses are chosen by this
    /// program, never by vnpd.
    pub fn atomic_u16(&self, gpa: u64) -> &AtomicU16 {
        assert!(gpa % 2 == 0, "ring index at odd address {gpa:#x}");
        let p = self.ptr(gpa, 2).expect("ring index outside guest memory");
        // SAFETY: `p` is 2-byte aligned, inside the mapping that lives as long as `self`, and
        // every access to it (here and in vnpd) is atomic.
        unsafe { AtomicU16::from_ptr(p.cast()) }
    }

    /// Writes `bytes` at `gpa` (volatile: vnpd may read them at any time).
    ///
    /// # Panics
    /// When the range is outside the mapping (addresses are this program's own).
    pub fn write(&self, gpa: u64, bytes: &[u8]) {
        let p = self
            .ptr(gpa, bytes.len())
            .expect("write outside guest memory");
        for (i, b) in bytes.iter().enumerate() {
            // SAFETY: p..p+len is inside the mapping (checked by `ptr`).
            unsafe { p.wrapping_add(i).write_volatile(*b) };
        }
    }

    /// Reads `out.len()` bytes at `gpa`, or `None` when the range is outside the mapping
    /// (the address may come from vnpd).
    pub fn read(&self, gpa: u64, out: &mut [u8]) -> Option<()> {
        let p = self.ptr(gpa, out.len())?;
        for (i, o) in out.iter_mut().enumerate() {
            // SAFETY: p..p+len is inside the mapping (checked by `ptr`).
            *o = unsafe { p.wrapping_add(i).read_volatile() };
        }
        Some(())
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: base/len are exactly the mapping made in `new`, unmapped once.
        unsafe {
            libc::munmap(self.base.cast(), self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn bounds_are_checked_and_bytes_round_trip() {
        let ram = GuestRam::new(5000).unwrap();
        assert_eq!(ram.len(), 8192);
        assert!(ram.ptr(8190, 2).is_some());
        assert!(ram.ptr(8191, 2).is_none());
        assert!(ram.ptr(u64::MAX, 1).is_none());
        ram.write(100, &[1, 2, 3]);
        let mut out = [0u8; 3];
        ram.read(100, &mut out).unwrap();
        assert_eq!(out, [1, 2, 3]);
        assert!(ram.read(8190, &mut [0u8; 4]).is_none());
        ram.atomic_u16(200).store(0xbeef, Ordering::Release);
        let mut le = [0u8; 2];
        ram.read(200, &mut le).unwrap();
        assert_eq!(u16::from_le_bytes(le), 0xbeef);
    }
}

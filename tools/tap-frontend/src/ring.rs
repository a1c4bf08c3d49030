//! The driver side of one split virtqueue (virtio 1.x, 2.7) in [`GuestRam`]: this program
//! writes descriptors and the available ring, vnpd writes the used ring.
//!
//! Each descriptor `i` is permanently tied to buffer `i` (one buffer, one descriptor, no
//! chains), so posting a buffer is writing its id into the available ring, and a used entry's
//! id names the buffer directly.

use std::sync::atomic::{fence, Ordering};

use crate::memory::GuestRam;

/// `VRING_DESC_F_WRITE`: the device writes this buffer.
pub const DESC_F_WRITE: u16 = 2;
/// `VRING_AVAIL_F_NO_INTERRUPT`: the driver does not want used-buffer notifications.
pub const AVAIL_F_NO_INTERRUPT: u16 = 1;
/// `VRING_USED_F_NO_NOTIFY`: the device does not want available-buffer notifications.
pub const USED_F_NO_NOTIFY: u16 = 1;

/// One used-ring entry: which buffer, and how many bytes vnpd wrote into it (RX) or 0 (TX).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Used {
    /// Buffer (descriptor) id.
    pub id: u16,
    /// Bytes written.
    pub len: u32,
}

/// A used entry that cannot be right: vnpd broke the ring protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("used ring entry names descriptor {id}, but the ring has {size}")]
pub struct BadUsed {
    /// The id vnpd returned.
    pub id: u32,
    /// The ring size.
    pub size: u16,
}

/// Where a ring's three parts live, and the driver's private indices.
#[derive(Debug)]
pub struct SplitRing {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    avail_idx: u16,
    used_seen: u16,
}

impl SplitRing {
    /// Bytes a ring of `size` entries needs (descriptor table, available ring, used ring with
    /// their event words, the used ring 4-byte aligned).
    pub fn footprint(size: u16) -> u64 {
        let n = u64::from(size);
        let avail_end = 16 * n + 6 + 2 * n;
        avail_end.div_ceil(4) * 4 + 6 + 8 * n
    }

    /// A ring of `size` entries laid out from `base` (16-byte aligned), with all indices 0.
    pub fn new(base: u64, size: u16) -> SplitRing {
        assert!(
            size.is_power_of_two(),
            "ring size {size} is not a power of two"
        );
        let n = u64::from(size);
        let desc = base;
        let avail = desc + 16 * n;
        let used = (avail + 6 + 2 * n).div_ceil(4) * 4;
        SplitRing {
            size,
            desc,
            avail,
            used,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    /// Entries.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Guest addresses of the descriptor table, available ring and used ring.
    pub fn addresses(&self) -> (u64, u64, u64) {
        (self.desc, self.avail, self.used)
    }

    /// Zeroes the ring's memory and indices (a fresh device after a reconnect).
    pub fn reset(&mut self, ram: &GuestRam) {
        let bytes = usize::try_from(Self::footprint(self.size)).unwrap_or(0);
        ram.write(self.desc, &vec![0u8; bytes]);
        self.avail_idx = 0;
        self.used_seen = 0;
    }

    /// Writes descriptor `id`: `len` bytes at `addr`, `flags`, no successor.
    pub fn set_desc(&self, ram: &GuestRam, id: u16, addr: u64, len: u32, flags: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        ram.write(self.desc + u64::from(id % self.size) * 16, &d);
    }

    /// Changes only descriptor `id`'s length.
    pub fn set_desc_len(&self, ram: &GuestRam, id: u16, len: u32) {
        ram.write(
            self.desc + u64::from(id % self.size) * 16 + 8,
            &len.to_le_bytes(),
        );
    }

    /// Puts `id` in the next available slot; vnpd sees it after [`SplitRing::publish`].
    pub fn push_avail(&mut self, ram: &GuestRam, id: u16) {
        let slot = self.avail + 4 + u64::from(self.avail_idx % self.size) * 2;
        ram.write(slot, &id.to_le_bytes());
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Makes every pushed entry visible (release: the descriptors and buffers before it).
    pub fn publish(&self, ram: &GuestRam) {
        ram.atomic_u16(self.avail + 2)
            .store(self.avail_idx.to_le(), Ordering::Release);
    }

    /// Whether vnpd wants a kick for what was just published (it did not set
    /// `VRING_USED_F_NO_NOTIFY`). The full fence orders the published index before the flag
    /// read, so that vnpd cannot miss both (virtio 1.x, 2.7.13).
    pub fn needs_kick(&self, ram: &GuestRam) -> bool {
        fence(Ordering::SeqCst);
        let flags = u16::from_le(ram.atomic_u16(self.used).load(Ordering::Relaxed));
        flags & USED_F_NO_NOTIFY == 0
    }

    /// Asks vnpd for used-buffer notifications, or not (`VRING_AVAIL_F_NO_INTERRUPT`). After
    /// turning them on, check [`SplitRing::pending`] once more before sleeping: an entry used
    /// before the flag was seen sends no notification.
    pub fn set_interrupts(&self, ram: &GuestRam, on: bool) {
        let flags = if on { 0 } else { AVAIL_F_NO_INTERRUPT };
        ram.atomic_u16(self.avail)
            .store(flags.to_le(), Ordering::Release);
        fence(Ordering::SeqCst);
    }

    /// Used entries not yet taken (acquire: their buffers' contents are visible after this).
    pub fn pending(&self, ram: &GuestRam) -> u16 {
        let used = u16::from_le(ram.atomic_u16(self.used + 2).load(Ordering::Acquire));
        used.wrapping_sub(self.used_seen)
    }

    /// Takes the next used entry; call only while [`SplitRing::pending`] is non-zero.
    pub fn take_used(&mut self, ram: &GuestRam) -> Result<Used, BadUsed> {
        let slot = self.used + 4 + u64::from(self.used_seen % self.size) * 8;
        let mut e = [0u8; 8];
        ram.read(slot, &mut e)
            .expect("used ring inside guest memory");
        self.used_seen = self.used_seen.wrapping_add(1);
        let id = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
        let len = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
        match u16::try_from(id) {
            Ok(id) if id < self.size => Ok(Used { id, len }),
            _ => Err(BadUsed {
                id,
                size: self.size,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plays the device: marks `id` used with `len` bytes.
    fn device_use(ram: &GuestRam, ring: &SplitRing, id: u32, len: u32) {
        let (_, _, used) = ring.addresses();
        let idx = u16::from_le(ram.atomic_u16(used + 2).load(Ordering::Acquire));
        let slot = used + 4 + u64::from(idx % ring.size()) * 8;
        let mut e = [0u8; 8];
        e[0..4].copy_from_slice(&id.to_le_bytes());
        e[4..8].copy_from_slice(&len.to_le_bytes());
        ram.write(slot, &e);
        ram.atomic_u16(used + 2)
            .store(idx.wrapping_add(1).to_le(), Ordering::Release);
    }

    #[test]
    fn layout_fits_and_aligns() {
        let r = SplitRing::new(0x1000, 256);
        let (desc, avail, used) = r.addresses();
        assert_eq!((desc, avail), (0x1000, 0x2000));
        assert_eq!(used % 4, 0);
        assert!(used >= avail + 6 + 512);
        assert_eq!(used + 6 + 8 * 256, 0x1000 + SplitRing::footprint(256));
    }

    #[test]
    fn posting_publishing_and_harvesting() {
        let ram = GuestRam::new(1 << 20).unwrap();
        let mut r = SplitRing::new(0, 8);
        r.set_desc(&ram, 3, 0x8000, 2048, DESC_F_WRITE);
        let mut d = [0u8; 16];
        ram.read(3 * 16, &mut d).unwrap();
        assert_eq!(u64::from_le_bytes(d[0..8].try_into().unwrap()), 0x8000);
        assert_eq!(u16::from_le_bytes([d[12], d[13]]), DESC_F_WRITE);
        r.set_desc_len(&ram, 3, 100);
        ram.read(3 * 16, &mut d).unwrap();
        assert_eq!(u32::from_le_bytes(d[8..12].try_into().unwrap()), 100);

        r.push_avail(&ram, 3);
        let (_, avail, _) = r.addresses();
        assert_eq!(
            ram.atomic_u16(avail + 2).load(Ordering::Acquire),
            0,
            "not visible before publish"
        );
        r.publish(&ram);
        assert_eq!(ram.atomic_u16(avail + 2).load(Ordering::Acquire), 1);
        assert!(r.needs_kick(&ram));

        assert_eq!(r.pending(&ram), 0);
        device_use(&ram, &r, 3, 60);
        assert_eq!(r.pending(&ram), 1);
        assert_eq!(r.take_used(&ram).unwrap(), Used { id: 3, len: 60 });
        assert_eq!(r.pending(&ram), 0);
        device_use(&ram, &r, 8, 0);
        assert_eq!(
            r.take_used(&ram).unwrap_err(),
            BadUsed { id: 8, size: 8 },
            "an id past the ring is an error, not an index"
        );
    }

    #[test]
    fn indices_wrap_and_reset_clears() {
        let ram = GuestRam::new(1 << 16).unwrap();
        let mut r = SplitRing::new(0, 4);
        for round in 0..70_000u32 {
            r.push_avail(&ram, (round % 4) as u16);
            device_use(&ram, &r, round % 4, round);
            assert_eq!(r.pending(&ram), 1);
            assert_eq!(r.take_used(&ram).unwrap().len, round);
        }
        r.reset(&ram);
        assert_eq!(r.pending(&ram), 0);
        let (_, _, used) = r.addresses();
        assert_eq!(ram.atomic_u16(used + 2).load(Ordering::Acquire), 0);
    }
}

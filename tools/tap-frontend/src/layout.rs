//! Where rings and buffers sit in guest memory (pure arithmetic).
//!
//! Queue 0 is RX (vnpd writes frames for the namespace), queue 1 is TX (frames the namespace
//! sends). Each ring gets a 64 KiB area at the start; RX buffers follow, then TX buffers.
//! Buffer `i` of a queue is always described by descriptor `i`.

use crate::ring::SplitRing;

/// Bytes reserved for each ring's descriptor table, available and used rings.
pub const RING_AREA: u64 = 0x1_0000;
/// Largest ring: vnpd's default `max_queue_size`.
pub const MAX_QUEUE: u16 = 1024;
/// Smallest buffer: a virtio-net header and a full 1500-byte-MTU Ethernet frame, so that a
/// backend that does not spread frames over several buffers can still fill one.
pub const MIN_BUF: u32 = 1536;
/// The largest frame a TAP hands over with TSO (64 KiB of IP packet plus the Ethernet and
/// virtio-net headers), rounded up to a page.
pub const TSO_TX_BUF: u32 = 69_632;

/// Ring sizes and buffer lengths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// RX ring entries (= RX buffers).
    pub rx_size: u16,
    /// TX ring entries (= TX buffers).
    pub tx_size: u16,
    /// Bytes per RX buffer.
    pub rx_buf_len: u32,
    /// Bytes per TX buffer.
    pub tx_buf_len: u32,
}

impl Default for Layout {
    fn default() -> Self {
        Layout {
            rx_size: 1024,
            tx_size: 1024,
            rx_buf_len: 4096,
            tx_buf_len: TSO_TX_BUF,
        }
    }
}

impl Layout {
    /// Checks sizes: rings powers of two up to [`MAX_QUEUE`], buffers at least [`MIN_BUF`]
    /// and 64 KiB + headers at most (a TX descriptor's length is what a TAP read returned).
    pub fn validate(&self) -> Result<(), String> {
        for (name, size) in [("rx", self.rx_size), ("tx", self.tx_size)] {
            if !size.is_power_of_two() || !(2..=MAX_QUEUE).contains(&size) {
                return Err(format!(
                    "{name} queue size {size} is not a power of two in 2..={MAX_QUEUE}"
                ));
            }
        }
        for (name, len) in [("rx", self.rx_buf_len), ("tx", self.tx_buf_len)] {
            if !(MIN_BUF..=TSO_TX_BUF).contains(&len) {
                return Err(format!(
                    "{name} buffer length {len} is not in {MIN_BUF}..={TSO_TX_BUF}"
                ));
            }
        }
        debug_assert!(SplitRing::footprint(MAX_QUEUE) <= RING_AREA);
        Ok(())
    }

    /// Guest address of the RX ring.
    pub fn rx_ring(&self) -> u64 {
        0
    }

    /// Guest address of the TX ring.
    pub fn tx_ring(&self) -> u64 {
        RING_AREA
    }

    /// Guest address of RX buffer `id`.
    pub fn rx_buf(&self, id: u16) -> u64 {
        2 * RING_AREA + u64::from(id) * u64::from(self.rx_buf_len)
    }

    /// Guest address of TX buffer `id`.
    pub fn tx_buf(&self, id: u16) -> u64 {
        self.rx_buf(self.rx_size) + u64::from(id) * u64::from(self.tx_buf_len)
    }

    /// Bytes of guest memory needed.
    pub fn total(&self) -> u64 {
        self.tx_buf(self.tx_size)
    }

    /// Whether a TX buffer holds the largest TSO frame (else offloads must stay off).
    pub fn fits_tso(&self) -> bool {
        self.tx_buf_len >= TSO_TX_BUF
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_layout_is_valid_and_parts_do_not_overlap() {
        let l = Layout::default();
        l.validate().unwrap();
        assert!(l.rx_ring() + SplitRing::footprint(l.rx_size) <= l.tx_ring());
        assert!(l.tx_ring() + SplitRing::footprint(l.tx_size) <= l.rx_buf(0));
        assert_eq!(l.rx_buf(l.rx_size), l.tx_buf(0));
        assert_eq!(
            l.total(),
            2 * RING_AREA + 1024 * 4096 + 1024 * u64::from(TSO_TX_BUF)
        );
        assert!(l.fits_tso());
    }

    #[test]
    fn bad_sizes_are_refused() {
        let ok = Layout::default();
        for bad in [
            Layout {
                rx_size: 1000,
                ..ok
            },
            Layout {
                tx_size: 2048,
                ..ok
            },
            Layout { tx_size: 1, ..ok },
            Layout {
                rx_buf_len: 1000,
                ..ok
            },
            Layout {
                tx_buf_len: 1 << 20,
                ..ok
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        let small = Layout {
            tx_buf_len: 2048,
            ..ok
        };
        small.validate().unwrap();
        assert!(!small.fits_tso());
    }
}

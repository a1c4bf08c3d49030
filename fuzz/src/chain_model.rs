//! A model of a descriptor chain, written from the virtio spec (split virtqueues, section 2.7)
//! and the ring engine's documented rules, against which the descriptor-chain target checks
//! what `vnpd::ring::chain` decides.
//!
//! [`Walk::of`] follows a chain as virtio-queue's iterator does: at most a table's size of
//! descriptors, `next` within the table, an indirect descriptor switches to its table (length a
//! multiple of 16, no indirect table inside another) and the chain continues only there, and a
//! chain stops once its lengths would pass 2^32 bytes. [`tx`] and [`rx`] then say what the ring
//! engine must answer: the first problem met in chain order (too many descriptors, an indirect
//! table that was not negotiated, a buffer of the wrong direction, a buffer outside guest
//! memory), else a chain that stopped while a descriptor asked for a successor, else no bytes;
//! or the segments the chain yields.

use vm_memory::{Bytes, GuestAddress};
use vnpd::ring::chain::{MAX_RX_DESCRIPTORS, MAX_RX_SEGS, MAX_TX_DESCRIPTORS};
use vnpd::ring::{ChainError, GuestMem, GuestSeg};

use crate::chain::in_guest_memory;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// One descriptor as the guest wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

impl Desc {
    fn read(mem: &GuestMem, at: u64) -> Option<Self> {
        let mut raw = [0u8; 16];
        mem.read_slice(&mut raw, GuestAddress(at)).ok()?;
        Some(Self {
            addr: u64::from_le_bytes(raw[..8].try_into().ok()?),
            len: u32::from_le_bytes(raw[8..12].try_into().ok()?),
            flags: u16::from_le_bytes([raw[12], raw[13]]),
            next: u16::from_le_bytes([raw[14], raw[15]]),
        })
    }

    fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

/// The descriptors a chain yields.
#[derive(Debug, Default)]
pub struct Walk {
    descs: Vec<Desc>,
    /// The last descriptor yielded had no successor (otherwise the chain was cut short: a loop,
    /// a `next` out of range, an unreadable descriptor, a bad indirect table, 2^32 bytes).
    complete: bool,
    /// Position of the first descriptor that came from an indirect table.
    indirect_from: Option<usize>,
}

impl Walk {
    /// Follows the chain whose head is descriptor `head` of the `size`-entry table at `table`.
    pub fn of(mem: &GuestMem, table: u64, size: u16, head: u16) -> Self {
        let mut walk = Walk::default();
        let (mut table, mut size, mut index) = (table, u32::from(size), u32::from(head));
        let mut left = size;
        let mut in_indirect = false;
        let mut bytes = 0u32;
        // Bounded: at most `size` descriptors per table and two tables.
        while left > 0 && index < size {
            let Some(desc) = table
                .checked_add(u64::from(index) * 16)
                .and_then(|at| Desc::read(mem, at))
            else {
                return walk;
            };
            if desc.has(F_INDIRECT) {
                if in_indirect || desc.len % 16 != 0 || desc.len / 16 > u32::from(u16::MAX) {
                    return walk;
                }
                (table, size, index, left) = (desc.addr, desc.len / 16, 0, desc.len / 16);
                in_indirect = true;
                walk.indirect_from = Some(walk.descs.len());
                continue;
            }
            let Some(sum) = bytes.checked_add(desc.len) else {
                return walk;
            };
            bytes = sum;
            walk.descs.push(desc);
            if !desc.has(F_NEXT) {
                walk.complete = true;
                return walk;
            }
            index = u32::from(desc.next);
            left -= 1;
        }
        walk
    }
}

/// What the ring engine must answer for a chain.
#[derive(Debug, PartialEq, Eq)]
pub enum Expect {
    /// The chain is usable, with these segments.
    Ok(Vec<GuestSeg>),
    /// This error.
    Err(ChainError),
}

/// A problem with descriptor `i` of the walk common to both directions, in the order the spec
/// rules are applied to a descriptor: the cap, then indirect negotiation.
fn common_problem(walk: &Walk, i: usize, cap: usize, indirect_ok: bool) -> Option<ChainError> {
    if i >= cap {
        return Some(ChainError::TooLong);
    }
    if !indirect_ok && walk.indirect_from == Some(i) {
        return Some(ChainError::Indirect);
    }
    None
}

/// A chain's ending: nothing yielded, cut short, or no bytes.
fn ending(walk: &Walk, segs: Vec<GuestSeg>) -> Expect {
    if walk.descs.is_empty() {
        Expect::Err(ChainError::Empty)
    } else if !walk.complete {
        Expect::Err(ChainError::Broken)
    } else if segs.is_empty() {
        Expect::Err(ChainError::NoBytes)
    } else {
        Expect::Ok(segs)
    }
}

/// The TX answer: every descriptor device-readable and inside guest memory (empty ones are
/// skipped), at most [`MAX_TX_DESCRIPTORS`].
pub fn tx(walk: &Walk, indirect_ok: bool) -> Expect {
    let mut segs = Vec::new();
    for (i, d) in walk.descs.iter().enumerate() {
        if let Some(e) = common_problem(walk, i, MAX_TX_DESCRIPTORS, indirect_ok) {
            return Expect::Err(e);
        }
        if d.has(F_WRITE) {
            return Expect::Err(ChainError::WrongDirection);
        }
        if d.len > 0 {
            if !in_guest_memory(d.addr, u64::from(d.len)) {
                return Expect::Err(ChainError::OutsideMemory);
            }
            segs.push(seg(d));
        }
    }
    ending(walk, segs)
}

/// The RX answer: every descriptor device-writable, at most [`MAX_RX_DESCRIPTORS`]; the first
/// [`MAX_RX_SEGS`] non-empty ones are the buffer and must lie inside guest memory (the rest are
/// not used, so not looked at).
pub fn rx(walk: &Walk, indirect_ok: bool) -> Expect {
    let mut segs = Vec::new();
    for (i, d) in walk.descs.iter().enumerate() {
        if let Some(e) = common_problem(walk, i, MAX_RX_DESCRIPTORS, indirect_ok) {
            return Expect::Err(e);
        }
        if !d.has(F_WRITE) {
            return Expect::Err(ChainError::WrongDirection);
        }
        if d.len > 0 && segs.len() < MAX_RX_SEGS {
            if !in_guest_memory(d.addr, u64::from(d.len)) {
                return Expect::Err(ChainError::OutsideMemory);
            }
            segs.push(seg(d));
        }
    }
    ending(walk, segs)
}

fn seg(d: &Desc) -> GuestSeg {
    GuestSeg {
        addr: GuestAddress(d.addr),
        len: d.len,
    }
}

//! The Maglev lookup table (Eisenbud et al., NSDI 2016), weighted.
//!
//! Each member gets a permutation of the table's slots from two hashes of its id (an offset and a
//! skip; the table size is prime, so every skip visits every slot). Members take turns claiming
//! the next free slot of their permutation until the table is full. With weights, a member earns
//! `weight` credit per round and claims a slot each time its credit reaches the largest weight,
//! so claims (and so shares) are proportional to weights.
//!
//! **Why gateways agree without talking**: the hashes use fixed keys ([`OFFSET_KEY`],
//! [`SKIP_KEY`], [`FLOW_KEY`]), members are sorted by id before the build, and nothing else goes
//! in: two gateways that build from the same healthy members, weights and size hold identical
//! tables, whatever order they learned the members in.

use siphasher::sip::SipHasher13;
use std::hash::Hasher;

use crate::FlowKey;

/// The default table size: a prime, so that every skip generates a full permutation. With it a
/// pool of 1000 members still gets about 65 slots each (the paper wants M ≫ 100 N).
pub const DEFAULT_TABLE_SIZE: u32 = 65_537;

/// Largest accepted table size (memory: 4 bytes per slot).
pub const MAX_TABLE_SIZE: u32 = 16_777_259;

/// Fixed hash keys. Changing any of them moves most flows: they are part of the wire contract
/// between gateways, like the protocol's field layout.
pub const OFFSET_KEY: (u64, u64) = (0x766e_702d_6c62_2d6f, 0x6666_7365_7400_0001);
pub const SKIP_KEY: (u64, u64) = (0x766e_702d_6c62_2d73, 0x6b69_7000_0000_0001);
pub const FLOW_KEY: (u64, u64) = (0x766e_702d_6c62_2d66, 0x6c6f_7700_0000_0001);

/// One pool member: a VM id and its weight. Weight 0 leaves it out of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub id: String,
    pub weight: u32,
}

impl Member {
    pub fn new(id: impl Into<String>, weight: u32) -> Self {
        Self {
            id: id.into(),
            weight,
        }
    }
}

/// Why a table cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    #[error("table size {0} is not a prime (a prime size makes every skip a full permutation)")]
    SizeNotPrime(u32),
    #[error("table size {0} is out of range (3..={MAX_TABLE_SIZE})")]
    SizeOutOfRange(u32),
    #[error("{members} members do not fit a table of {size} slots")]
    TooManyMembers { members: usize, size: u32 },
    #[error("member {0:?} is listed twice")]
    DuplicateMember(String),
}

/// A built lookup table. Empty (no member with weight > 0): every lookup is `None`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// Member ids, sorted; slots hold indices into this.
    members: Vec<String>,
    slots: Vec<u32>,
}

/// A member's walk through the slots: `offset, offset + skip, offset + 2 skip, ...` mod size.
#[derive(Debug, Clone, Copy)]
struct Permutation {
    position: u32,
    skip: u32,
}

impl Permutation {
    fn of(id: &str, size: u32) -> Self {
        let offset = hash_bytes(OFFSET_KEY, id.as_bytes()) % u64::from(size);
        let skip = hash_bytes(SKIP_KEY, id.as_bytes()) % u64::from(size - 1) + 1;
        // Both are below `size`, a u32.
        Self {
            position: offset as u32,
            skip: skip as u32,
        }
    }

    /// The next slot of the walk (then advances).
    fn next(&mut self, size: u32) -> u32 {
        let slot = self.position;
        // position, skip < size <= MAX_TABLE_SIZE < 2^31: the sum cannot overflow.
        self.position += self.skip;
        if self.position >= size {
            self.position -= size;
        }
        slot
    }
}

const EMPTY: u32 = u32::MAX;

impl Table {
    /// Builds the table for `members` (any order) with `size` slots.
    pub fn build(members: &[Member], size: u32) -> Result<Self, BuildError> {
        check_size(size)?;
        let mut pool: Vec<&Member> = members.iter().filter(|m| m.weight > 0).collect();
        pool.sort_by(|a, b| a.id.cmp(&b.id));
        if let Some(pair) = pool.windows(2).find(|p| p[0].id == p[1].id) {
            return Err(BuildError::DuplicateMember(pair[0].id.clone()));
        }
        if pool.len() > size as usize {
            return Err(BuildError::TooManyMembers {
                members: pool.len(),
                size,
            });
        }
        let ids: Vec<String> = pool.iter().map(|m| m.id.clone()).collect();
        if pool.is_empty() {
            return Ok(Self {
                members: ids,
                slots: Vec::new(),
            });
        }
        let weights: Vec<u64> = pool.iter().map(|m| u64::from(m.weight)).collect();
        let slots = populate(&ids, &weights, size);
        Ok(Self {
            members: ids,
            slots,
        })
    }

    /// The member a flow goes to, or `None` for an empty table.
    pub fn lookup(&self, key: &FlowKey) -> Option<&str> {
        self.lookup_index(key).map(|i| self.members[i].as_str())
    }

    /// Index (into [`Table::members`]) of the member a flow goes to.
    pub fn lookup_index(&self, key: &FlowKey) -> Option<usize> {
        if self.slots.is_empty() {
            return None;
        }
        let h = hash_bytes(FLOW_KEY, &key.to_bytes());
        let slot = (h % self.slots.len() as u64) as usize;
        Some(self.slots[slot] as usize)
    }

    /// The members, sorted by id.
    pub fn members(&self) -> &[String] {
        &self.members
    }

    /// Number of slots (0 for an empty table).
    pub fn size(&self) -> usize {
        self.slots.len()
    }

    /// Slots held by each member, in [`Table::members`] order.
    pub fn slot_counts(&self) -> Vec<usize> {
        let mut counts = vec![0usize; self.members.len()];
        for &s in &self.slots {
            counts[s as usize] += 1;
        }
        counts
    }

    /// The member id in slot `i`.
    pub fn slot_owner(&self, i: usize) -> Option<&str> {
        self.slots
            .get(i)
            .map(|&m| self.members[m as usize].as_str())
    }

    /// Fraction of slots whose owner differs between two tables of the same size (1.0 if the
    /// sizes differ): the share of flows without a flow-table entry that would move.
    pub fn disruption(&self, other: &Table) -> f64 {
        if self.size() != other.size() || self.size() == 0 {
            return 1.0;
        }
        let moved = (0..self.size())
            .filter(|&i| self.slot_owner(i) != other.slot_owner(i))
            .count();
        moved as f64 / self.size() as f64
    }
}

/// Fills every slot: members in id order take turns, each claiming a slot when its credit
/// reaches the largest weight.
fn populate(ids: &[String], weights: &[u64], size: u32) -> Vec<u32> {
    let mut slots = vec![EMPTY; size as usize];
    let mut walks: Vec<Permutation> = ids.iter().map(|id| Permutation::of(id, size)).collect();
    let top = weights.iter().copied().max().unwrap_or(1);
    let mut credit = vec![0u64; ids.len()];
    let mut filled = 0u32;
    loop {
        for (i, walk) in walks.iter_mut().enumerate() {
            credit[i] += weights[i];
            if credit[i] < top {
                continue;
            }
            credit[i] -= top;
            // The walk is a full permutation and the table is not full: a free slot is ahead.
            let slot = loop {
                let s = walk.next(size);
                if slots[s as usize] == EMPTY {
                    break s;
                }
            };
            // At most `size` members (checked), so `i` fits a u32.
            slots[slot as usize] = i as u32;
            filled += 1;
            if filled == size {
                return slots;
            }
        }
    }
}

fn check_size(size: u32) -> Result<(), BuildError> {
    if !(3..=MAX_TABLE_SIZE).contains(&size) {
        return Err(BuildError::SizeOutOfRange(size));
    }
    if !is_prime(size) {
        return Err(BuildError::SizeNotPrime(size));
    }
    Ok(())
}

/// Trial division: sizes are at most 2^24, so at most ~4100 divisions.
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n % 2 == 0 {
        return n == 2;
    }
    let mut d = 3u32;
    while u64::from(d) * u64::from(d) <= u64::from(n) {
        if n % d == 0 {
            return false;
        }
        d += 2;
    }
    true
}

fn hash_bytes(key: (u64, u64), bytes: &[u8]) -> u64 {
    let mut h = SipHasher13::new_with_keys(key.0, key.1);
    h.write(bytes);
    h.finish()
}

#[cfg(test)]
mod tests;

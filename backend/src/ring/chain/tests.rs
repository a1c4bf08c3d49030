//! Chain walking on virtio-queue's mock split queue: good chains and every broken kind.

use super::*;
use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueOwnedT, QueueT};

const MEM_SIZE: u64 = 0x10_0000;

fn memory() -> GuestMemoryMmap<()> {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
}

/// Builds a queue holding exactly the given descriptor table (starting at index 0) with one
/// available chain whose head is descriptor 0.
fn queue_with(mem: &GuestMemoryMmap<()>, descs: &[RawDescriptor]) -> Queue {
    let vq = MockSplitQueue::new(mem, 16);
    for (i, d) in descs.iter().enumerate() {
        vq.desc_table().store(i as u16, *d).unwrap();
    }
    vq.avail().ring().ref_at(0).unwrap().store(0u16.to_le());
    vq.avail().idx().store(1u16.to_le());
    vq.create_queue().unwrap()
}

fn tx(descs: &[RawDescriptor]) -> Result<(usize, Vec<GuestSeg>), ChainError> {
    let mem = memory();
    let mut q = queue_with(&mem, descs);
    let table = DescTable::of(&q, false, &mem);
    let chain = q.pop_descriptor_chain(&mem).unwrap();
    let mut tx = TxChain::new();
    let r = tx
        .collect(chain, table, &mem)
        .map(|n| (n, tx.segs().to_vec()));
    if let Ok((n, _)) = &r {
        let mut iovs = Vec::new();
        assert_eq!(tx.push_iovecs(0, *n, &mut iovs), *n);
        assert_eq!(tx.len(), *n);
    }
    r
}

fn rx(descs: &[RawDescriptor]) -> Result<RxBuf, ChainError> {
    let mem = memory();
    let mut q = queue_with(&mem, descs);
    let table = DescTable::of(&q, false, &mem);
    let chain = q.iter(&mem).unwrap().next().unwrap();
    collect_rx_chain(chain, table, &mem)
}

#[test]
fn tx_good_chain_of_two() {
    let (n, segs) = tx(&[
        desc(0x2000, 12, VRING_DESC_F_NEXT, 1),
        desc(0x3000, 100, 0, 0),
    ])
    .unwrap();
    assert_eq!(n, 112);
    assert_eq!(segs.len(), 2);
    assert_eq!(segs[1].addr, GuestAddress(0x3000));
}

#[test]
fn tx_loop_is_broken() {
    assert_eq!(
        tx(&[
            desc(0x2000, 12, VRING_DESC_F_NEXT, 1),
            desc(0x3000, 100, VRING_DESC_F_NEXT, 0),
        ]),
        Err(ChainError::Broken)
    );
}

#[test]
fn tx_next_out_of_range_is_broken() {
    assert_eq!(
        tx(&[desc(0x2000, 12, VRING_DESC_F_NEXT, 200)]),
        Err(ChainError::Broken)
    );
}

#[test]
fn tx_outside_memory() {
    assert_eq!(
        tx(&[desc(MEM_SIZE - 8, 64, 0, 0)]),
        Err(ChainError::OutsideMemory)
    );
    assert_eq!(
        tx(&[desc(u64::MAX - 4, 64, 0, 0)]),
        Err(ChainError::OutsideMemory)
    );
}

#[test]
fn tx_writable_descriptor_is_wrong_direction() {
    assert_eq!(
        tx(&[desc(0x2000, 64, VRING_DESC_F_WRITE, 0)]),
        Err(ChainError::WrongDirection)
    );
}

#[test]
fn tx_zero_length_chain_has_no_bytes() {
    assert_eq!(tx(&[desc(0x2000, 0, 0, 0)]), Err(ChainError::NoBytes));
}

#[test]
fn tx_empty_chain() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    // Head index beyond the queue size: the chain yields nothing.
    vq.avail().ring().ref_at(0).unwrap().store(40u16.to_le());
    vq.avail().idx().store(1u16.to_le());
    let mut q: Queue = vq.create_queue().unwrap();
    let table = DescTable::of(&q, false, &mem);
    let chain = q.pop_descriptor_chain(&mem).unwrap();
    assert_eq!(
        TxChain::new().collect(chain, table, &mem),
        Err(ChainError::Empty)
    );
}

#[test]
fn tx_too_long() {
    // A 256-entry queue with one chain of 100 descriptors.
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 256);
    for i in 0..100u16 {
        let flags = if i < 99 { VRING_DESC_F_NEXT } else { 0 };
        vq.desc_table()
            .store(i, desc(0x8000 + u64::from(i) * 16, 16, flags, i + 1))
            .unwrap();
    }
    vq.avail().ring().ref_at(0).unwrap().store(0u16.to_le());
    vq.avail().idx().store(1u16.to_le());
    let mut q: Queue = vq.create_queue().unwrap();
    let table = DescTable::of(&q, false, &mem);
    let chain = q.pop_descriptor_chain(&mem).unwrap();
    assert_eq!(
        TxChain::new().collect(chain, table, &mem),
        Err(ChainError::TooLong)
    );
}

/// A 256-entry queue with one chain of `n` descriptors of `flags` (plus NEXT).
fn long_chain(mem: &GuestMemoryMmap<()>, n: u16, flags: u32) -> Queue {
    let vq = MockSplitQueue::new(mem, 256);
    for i in 0..n {
        let next = if i + 1 < n { VRING_DESC_F_NEXT } else { 0 };
        vq.desc_table()
            .store(i, desc(0x8000 + u64::from(i) * 16, 16, flags | next, i + 1))
            .unwrap();
    }
    vq.avail().ring().ref_at(0).unwrap().store(0u16.to_le());
    vq.avail().idx().store(1u16.to_le());
    vq.create_queue().unwrap()
}

#[test]
fn rx_chains_are_capped_above_what_guests_without_mergeable_buffers_post() {
    let mem = memory();
    for (n, ok) in [(19u16, true), (64, true), (65, false), (200, false)] {
        let mut q = long_chain(&mem, n, VRING_DESC_F_WRITE);
        let table = DescTable::of(&q, false, &mem);
        let chain = q.pop_descriptor_chain(&mem).unwrap();
        let got = collect_rx_chain(chain, table, &mem);
        if ok {
            assert_eq!(got.unwrap().cap, 16 * MAX_RX_SEGS as u32, "{n} descriptors");
        } else {
            assert_eq!(got, Err(ChainError::TooLong), "{n} descriptors");
        }
    }
}

#[test]
fn indirect_tables_only_when_negotiated() {
    let mem = memory();
    // Head -> an indirect table of two readable descriptors at 0x9000.
    let indirect = [
        desc(0x2000, 12, VRING_DESC_F_NEXT, 1),
        desc(0x3000, 100, 0, 0),
    ];
    for (i, d) in indirect.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(0x9000 + i as u64 * 16))
            .unwrap();
    }
    let head = desc(0x9000, 32, VRING_DESC_F_INDIRECT, 0);
    for allowed in [false, true] {
        let mut q = queue_with(&mem, &[head]);
        let table = DescTable::of(&q, allowed, &mem);
        let chain = q.pop_descriptor_chain(&mem).unwrap();
        let got = TxChain::new().collect(chain, table, &mem);
        if allowed {
            assert_eq!(got, Ok(112));
        } else {
            assert_eq!(got, Err(ChainError::Indirect));
        }
    }
    // Also behind a first, ordinary descriptor, and on RX.
    let mut q = queue_with(
        &mem,
        &[
            desc(0x2000, 64, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1),
            desc(0x9000, 32, VRING_DESC_F_INDIRECT, 0),
        ],
    );
    let table = DescTable::of(&q, false, &mem);
    let chain = q.pop_descriptor_chain(&mem).unwrap();
    assert_eq!(
        collect_rx_chain(chain, table, &mem),
        Err(ChainError::Indirect)
    );
}

#[test]
fn rx_good_chain_resolves_to_host_pieces() {
    let buf = rx(&[
        desc(0x4000, 10, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1),
        desc(0x5000, 30, VRING_DESC_F_WRITE, 0),
    ])
    .unwrap();
    assert_eq!(buf.cap, 40);
    assert_eq!(buf.segs().len(), 2);
    assert!(buf.pieces().is_none(), "not resolved yet");
    let mem = memory();
    let mut resolved = buf;
    resolved.resolve(&mem);
    let pieces = resolved.pieces().unwrap();
    assert_eq!(pieces.len(), 2);
    assert_eq!(
        pieces[1].addr,
        mem.get_host_address(GuestAddress(0x5000)).unwrap() as usize
    );
    // Bytes 8..40 of the buffer: the last 2 of the first segment, all of the second.
    let mut iovs = Vec::new();
    assert_eq!(push_piece_iovecs(pieces, 8, 100, &mut iovs), 32);
    assert_eq!((iovs[0].iov_len, iovs[1].iov_len), (2, 30));
    resolved.unresolve();
    assert!(resolved.pieces().is_none());
}

#[test]
fn rx_readable_descriptor_is_wrong_direction() {
    assert_eq!(
        rx(&[desc(0x4000, 64, 0, 0)]),
        Err(ChainError::WrongDirection)
    );
}

#[test]
fn rx_outside_memory_and_loop() {
    assert_eq!(
        rx(&[desc(MEM_SIZE, 64, VRING_DESC_F_WRITE, 0)]),
        Err(ChainError::OutsideMemory)
    );
    assert_eq!(
        rx(&[desc(0x4000, 64, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 0)]),
        Err(ChainError::Broken)
    );
}

#[test]
fn indirect_flags_are_found_in_a_table_straddling_two_regions() {
    let mem: GuestMemoryMmap<()> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000), (GuestAddress(0x1000), 0x1000)])
            .unwrap();
    let mut q = Queue::new(16).unwrap();
    q.set_size(16);
    q.try_set_desc_table_address(GuestAddress(0xf80)).unwrap();
    let table = DescTable::of(&q, false, &mem);
    assert_eq!(table.host, 0, "not in one piece: read through vm-memory");
    // Descriptor 2 (in the first region) and 12 (in the second) refer to indirect tables.
    for i in [2u64, 12] {
        mem.write_obj(
            (VRING_DESC_F_INDIRECT as u16).to_le(),
            GuestAddress(0xf80 + i * 16 + 12),
        )
        .unwrap();
    }
    let forbidden: Vec<u16> = (0..16).filter(|&i| table.forbids(&mem, i)).collect();
    assert_eq!(forbidden, vec![2, 12]);
    // In one piece: the cached address gives the same answers.
    let one: GuestMemoryMmap<()> = memory();
    for i in [2u64, 12] {
        one.write_obj(
            (VRING_DESC_F_INDIRECT as u16).to_le(),
            GuestAddress(0xf80 + i * 16 + 12),
        )
        .unwrap();
    }
    let table = DescTable::of(&q, false, &one);
    assert_ne!(table.host, 0);
    let forbidden: Vec<u16> = (0..16).filter(|&i| table.forbids(&one, i)).collect();
    assert_eq!(forbidden, vec![2, 12]);
    assert!(
        !DescTable::of(&q, true, &one).forbids(&one, 2),
        "negotiated"
    );
}

#[test]
fn tx_reads_through_host_addresses_straddle_segments() {
    let mem = memory();
    let data: Vec<u8> = (0..112u8).collect();
    mem.write_slice(&data[..12], GuestAddress(0x2000)).unwrap();
    mem.write_slice(&data[12..], GuestAddress(0x3000)).unwrap();
    let mut q = queue_with(
        &mem,
        &[
            desc(0x2000, 12, VRING_DESC_F_NEXT, 1),
            desc(0x3000, 100, 0, 0),
        ],
    );
    let table = DescTable::of(&q, false, &mem);
    let chain = q.pop_descriptor_chain(&mem).unwrap();
    let mut tx = TxChain::new();
    tx.collect(chain, table, &mem).unwrap();
    let mut out = [0u8; 40];
    // SAFETY: `mem`, the snapshot the chain was collected from, is alive.
    assert_eq!(unsafe { tx.read_host(2, &mut out) }, 40);
    assert_eq!(&out[..], &data[2..42]);
    // Past the end: what there is.
    // SAFETY: as above.
    assert_eq!(unsafe { tx.read_host(100, &mut out) }, 12);
    assert_eq!(&out[..12], &data[100..]);
}

#[test]
fn ranges_in_one_region_resolve_directly_and_others_through_the_iterator() {
    let mem: GuestMemoryMmap<()> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000), (GuestAddress(0x1000), 0x1000)])
            .unwrap();
    let host = |a: u64| mem.get_host_address(GuestAddress(a)).unwrap() as usize;
    assert_eq!(
        one_piece(&mem, GuestAddress(0x800), 0x800),
        Some(host(0x800))
    );
    assert_eq!(
        one_piece(&mem, GuestAddress(0x1000), 16),
        Some(host(0x1000))
    );
    assert_eq!(one_piece(&mem, GuestAddress(0xff0), 32), None, "spans two");
    assert_eq!(
        one_piece(&mem, GuestAddress(0x1ff0), 32),
        None,
        "past the end"
    );
    assert_eq!(one_piece(&mem, GuestAddress(0x9000), 1), None, "outside");
    assert_eq!(one_piece(&mem, GuestAddress(0x10), 0), None, "empty");
    assert_eq!(one_piece(&mem, GuestAddress(u64::MAX), 2), None, "wraps");
    // TX: one piece in one region, two across the boundary, an error past the end.
    let mut q = queue_with(
        &mem,
        &[
            desc(0x800, 100, VRING_DESC_F_NEXT, 1),
            desc(0xff0, 32, 0, 0),
        ],
    );
    let table = DescTable::of(&q, false, &mem);
    let mut tx = TxChain::new();
    let chain = q.pop_descriptor_chain(&mem).unwrap();
    assert_eq!(tx.collect(chain, table, &mem), Ok(132));
    let mut iovs = Vec::new();
    assert_eq!(tx.push_iovecs(0, 132, &mut iovs), 132);
    let got: Vec<(usize, usize)> = iovs
        .iter()
        .map(|v| (v.iov_base as usize, v.iov_len))
        .collect();
    assert_eq!(
        got,
        vec![(host(0x800), 100), (host(0xff0), 16), (host(0x1000), 16)]
    );
    let mut q = queue_with(&mem, &[desc(0x1ff0, 32, 0, 0)]);
    let chain = q.pop_descriptor_chain(&mem).unwrap();
    assert_eq!(
        tx.collect(chain, table, &mem),
        Err(ChainError::OutsideMemory)
    );
    // RX: the same split when resolved; a buffer past the end is refused.
    let mut q = queue_with(
        &mem,
        &[
            desc(0x400, 64, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1),
            desc(0xfe0, 64, VRING_DESC_F_WRITE, 0),
        ],
    );
    let chain = q.pop_descriptor_chain(&mem).unwrap();
    let mut buf = collect_rx_chain(chain, table, &mem).unwrap();
    buf.resolve(&mem);
    let pieces: Vec<(usize, u32)> = buf
        .pieces()
        .unwrap()
        .iter()
        .map(|p| (p.addr, p.len))
        .collect();
    assert_eq!(
        pieces,
        vec![(host(0x400), 64), (host(0xfe0), 32), (host(0x1000), 32)]
    );
    let mut q = queue_with(&mem, &[desc(0x1fc0, 128, VRING_DESC_F_WRITE, 0)]);
    let chain = q.pop_descriptor_chain(&mem).unwrap();
    assert_eq!(
        collect_rx_chain(chain, table, &mem).unwrap_err(),
        ChainError::OutsideMemory
    );
}

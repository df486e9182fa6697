"""The virtqueue layer of the real pyvirtiofsd process, driven over its socket by the test
frontend (which plays QEMU 7.2 and a Linux 6.1 guest driver).

Direct and indirect chains, scattered buffers, chains spread over two memory regions with a
gap and a non-zero mmap_offset, a descriptor crossing two adjacent regions, EVENT_IDX on and
off (interrupts when asked, none when suppressed, every completion seen, a new call fd
signalled), 64 requests in
flight on a 1024-entry queue, 16-bit index wrap-around, four request queues, and the hiprio
queue (FORGET, BATCH_FORGET and INTERRUPT take no reply and never wait behind requests).
"""

from __future__ import annotations

import errno
import fcntl
import os
import random
import select
import time
from pathlib import Path

import pytest

from pyvirtiofs.testing import frontend as F
from pyvirtiofs.testing.frontend import (
    FUSE_ROOT_ID, FuseClient, FuseError, GuestRam, Op, Req, VirtioFeature,
)

from .daemon import poison_intact

MiB = 1 << 20
GETATTR_BODY = F.GETATTR_IN.pack(0, 0, 0)


def _data(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


def _roundtrip_file(c: FuseClient, shared, name: str, data: bytes) -> int:
    """CREATE, WRITE (in max_write chunks), READ back, GETATTR, RELEASE; checks the host
    file too.  Returns the node id."""
    e, o = c.create(FUSE_ROOT_ID, name)
    assert c.write_all(e.nodeid, o.fh, 0, data) == len(data)
    assert c.read_all(e.nodeid, o.fh, 0, len(data) + 4096) == data
    assert c.getattr(e.nodeid).attr.size == len(data)
    c.release(e.nodeid, o.fh)
    assert (shared / name).read_bytes() == data
    return e.nodeid


def _getattr_on(c: FuseClient, queue: int, nodeid: int = FUSE_ROOT_ID) -> int:
    return c.submit(Op.GETATTR, nodeid, [GETATTR_BODY], [F.ATTR_OUT_SIZE], queue=queue)


def _call_pending(q) -> bool:
    """Whether the daemon wrote q's call eventfd (the counter is consumed)."""
    try:
        os.eventfd_read(q.call_fd)
        return True
    except BlockingIOError:
        return False


def _avail_event_settles(q, timeout: float = 2.0) -> bool:
    """After its last completion the device re-arms notifications (avail_event = next avail
    index) a moment later: wait for that."""
    deadline = time.monotonic() + timeout
    while q.avail_event != q.avail_idx:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def _spin_until_used(q, want: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while q.used_idx != want & 0xFFFF:
        assert time.monotonic() < deadline, f"used.idx {q.used_idx}, waited for {want}"
        time.sleep(0.001)


# ------------------------------------------------------------------------------------------
# Chain shapes
# ------------------------------------------------------------------------------------------

def test_direct_chains(daemon):
    c = daemon.client(indirect=False)
    assert not c.fe.has_feature(VirtioFeature.INDIRECT_DESC)
    # 128 KiB writes: in header + write_in + 32 data pages + out header + write_out, all in
    # the descriptor table of a 128-entry ring.
    _roundtrip_file(c, Path(daemon.shared_dir), "direct", _data(300_000))
    e, o = c.create(FUSE_ROOT_ID, "shape")
    u = c.submit_write(e.nodeid, o.fh, 0, _data(128 * 1024))
    p = c._pending[u]
    ch = p.queue.inflight[p.head]
    assert ch.indirect_gpa is None and ch.ndesc == 2 + 32 + 2     # 36 table entries
    assert F.WRITE_OUT.unpack_from(c.wait(u).check().data)[0] == 128 * 1024


def test_indirect_chains_longer_than_the_queue(daemon):
    c = daemon.client()
    assert c.fe.has_feature(VirtioFeature.INDIRECT_DESC)
    assert c.max_write == MiB and c.max_read == MiB
    # A 1 MiB WRITE is 256 data pages plus headers: one indirect table of 260 entries on a
    # 128-entry ring (Linux does exactly this; the spec's limit applies to direct chains).
    data = _data(MiB, seed=2)
    e, o = c.create(FUSE_ROOT_ID, "indirect")
    u = c.submit_write(e.nodeid, o.fh, 0, data)
    p = c._pending[u]
    ch = p.queue.inflight[p.head]
    assert ch.indirect_gpa is not None and ch.ndesc == 2 + 256 + 2 > p.queue.size
    assert F.WRITE_OUT.unpack_from(c.wait(u).check().data)[0] == MiB
    assert c.read(e.nodeid, o.fh, 0, MiB) == data
    # Direct and indirect chains in flight together.
    us = []
    for i in range(24):
        us.append(c.submit_read(e.nodeid, o.fh, i * 4096, 4096 + 512, indirect=bool(i % 2),
                                kick=False))
    c.kick_all()
    for i, u in enumerate(us):
        assert c.wait(u).check().data == data[i * 4096:i * 4096 + 4096 + 512]
    c.release(e.nodeid, o.fh)


def test_scattered_odd_sized_buffers(start_daemon):
    """Every descriptor 7 (or 61) bytes, each its own allocation, spread over two regions:
    the 40-byte in header, the 16-byte out header and the attributes all straddle
    descriptors.  Indirect tables, then direct chains."""
    for indirect, seg in ((True, 7), (False, 61)):
        d = start_daemon()
        shared = Path(d.shared_dir)
        c = FuseClient(d.frontend(ram_regions=2, indirect=indirect), scatter=True,
                       seg_size=seg)
        c.init()
        e = c.mkdir(FUSE_ROOT_ID, "d")
        assert c.lookup(FUSE_ROOT_ID, "d").nodeid == e.nodeid
        data = _data(1000 if indirect else 300, seed=seg)
        ent, o = c.create(e.nodeid, "x")
        assert c.write(ent.nodeid, o.fh, 0, data) == len(data)
        assert c.read(ent.nodeid, o.fh, 0, len(data)) == data
        assert (shared / "d" / "x").read_bytes() == data
        assert c.getattr(ent.nodeid).attr.size == len(data)
        assert b"x" in {x.name for x in c.listdir(e.nodeid)}
        assert b"x" in {x.dirent.name for x in c.listdir(e.nodeid, plus=True)}


def test_two_regions_with_a_gap_and_mmap_offset(start_daemon):
    """Two memfds, guest-physical addresses with a 4 GiB hole between them (like the x86
    PCI hole), an mmap_offset that is not a multiple of 2 MiB, round-robin allocation so the
    rings and every chain are spread over both regions.  SET_MEM_TABLE, then ADD_MEM_REG."""
    ram = GuestRam(16 * MiB, gpa_base=0, regions=2, region_gap=1 << 32, mmap_offset=12288)
    try:
        for use_add in (False, True):
            d = start_daemon()
            c = FuseClient(d.frontend(ram=ram, use_add_mem_reg=use_add), scatter=True)
            c.init()
            qs = c.fe.queues
            assert {ram.locate(g)[0].index for q in qs for g in q.addresses()} == {0, 1}
            _roundtrip_file(c, Path(d.shared_dir), "f", _data(200_000, 3))
            assert poison_intact(ram)
            c.close()
            assert d.wait_exit(10) == 0
            for q in qs:
                q.free_rings()
    finally:
        ram.close()


def test_descriptor_across_adjacent_regions(start_daemon):
    """One descriptor may cover the end of one region and the start of the next when they
    are adjacent in guest-physical space; reads and writes must land in both memfds."""
    ram = GuestRam(8 * MiB, gpa_base=0x100000, regions=2, region_gap=0, mmap_offset=4096,
                   policy="first")
    daemon = start_daemon()
    try:
        c = FuseClient(daemon.frontend(ram=ram))
        c.init()
        r0, r1 = ram.regions
        assert r0.end == r1.gpa
        data = _data(10_000, 4)
        # Borrow [r0.end - 5000, r1.gpa + 5000 + 256): untouched by the "first" policy, which
        # keeps everything else at the start of region 0.
        cross = r0.end - 5000
        ram.write(cross, data[:5000])
        ram.write(r1.gpa, data[5000:])
        ram.fill(r1.gpa + 5000, 256, 0xC3)
        e, o = c.create(FUSE_ROOT_ID, "cross")
        u = c.submit(Op.WRITE, e.nodeid, [F.WRITE_IN.pack(o.fh, 0, len(data), 0, 0, 0, 0),
                                          (cross, len(data))], [F.WRITE_OUT.size],
                     hdr_len=40 + 40 + len(data))
        assert F.WRITE_OUT.unpack_from(c.wait(u).check().data)[0] == len(data)
        assert (Path(daemon.shared_dir) / "cross").read_bytes() == data
        ram.fill(cross, 5000, 0)
        ram.fill(r1.gpa, 5000, 0)
        u = c.submit(Op.READ, e.nodeid, [F.READ_IN.pack(o.fh, 0, len(data), 0, 0, 0, 0)],
                     [(cross, len(data))], copy_limit=16)   # the frontend copies per region
        r = c.wait(u).check()
        assert r.used_len == 16 + len(data)
        assert ram.read(cross, 5000) == data[:5000]
        assert ram.read(r1.gpa, 5000) == data[5000:]
        assert ram.read(r1.gpa + 5000, 256) == b"\xc3" * 256
        assert poison_intact(ram)
        c.close()
        assert daemon.wait_exit(10) == 0
    finally:
        ram.close()


# ------------------------------------------------------------------------------------------
# Notifications
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("event_idx", [True, False], ids=["event_idx", "no_event_idx"])
def test_every_completion_seen(daemon, event_idx):
    """Bursts of 1-20 requests: the guest sleeps on the call eventfd whenever the used ring
    is empty, so a missing interrupt shows up as a timeout."""
    c = daemon.client(event_idx=event_idx)
    assert c.fe.has_feature(VirtioFeature.EVENT_IDX) == event_idx
    e, o = c.create(FUSE_ROOT_ID, "f")
    data = _data(64 * 1024, 5)
    c.write(e.nodeid, o.fh, 0, data)
    rng = random.Random(6)
    total = 0
    for _ in range(40):
        us = []
        for _ in range(rng.randint(1, 20)):
            off = rng.randrange(0, len(data) - 100)
            us.append((off, c.submit_read(e.nodeid, o.fh, off, 100, kick=rng.random() < 0.5)))
        c.kick_all()
        for off, u in us:
            assert c.wait(u, timeout=5).check().data == data[off:off + 100]
        total += len(us)
    q = c.fe.queues[1]
    assert q.interrupts > 0
    assert not q.inflight
    if event_idx:
        # The device asks to be kicked for the next chain: avail_event == next avail index.
        assert _avail_event_settles(q), (q.avail_event, q.avail_idx)
    assert total > 100


@pytest.mark.parametrize("event_idx", [True, False], ids=["event_idx", "no_event_idx"])
def test_interrupt_suppression(daemon, event_idx):
    """The daemon interrupts exactly when the driver asks: with EVENT_IDX only when used.idx
    passes used_event, without it only while VRING_AVAIL_F_NO_INTERRUPT is clear."""
    c = daemon.client(event_idx=event_idx, client_kwargs={"request_queue": 1})
    q = c.fe.queues[1]
    c.getattr(FUSE_ROOT_ID)
    _call_pending(q)
    base = q.last_used
    if event_idx:
        q.set_used_event((base + 2) & 0xFFFF)   # interrupt when the 3rd one is used
    else:
        q.set_avail_flags(F.VRING_AVAIL_F_NO_INTERRUPT)
    us = []
    for i in range(3):
        if i == 2 and not event_idx:
            q.set_avail_flags(0)
        us.append(_getattr_on(c, 1))
        _spin_until_used(q, base + i + 1)
        if i < 2:
            time.sleep(0.05)
            assert not _call_pending(q), f"interrupt after completion {i + 1}"
    assert select.select([q.call_fd], [], [], 5)[0], "no interrupt after the 3rd completion"
    for u in us:
        assert c.wait(u).check()


@pytest.mark.parametrize("event_idx", [True, False], ids=["event_idx", "no_event_idx"])
def test_a_new_call_fd_is_signalled(daemon, event_idx):
    """QEMU replaces a ring's call eventfd while the guest runs (masking or unmasking an
    MSI-X vector, a reconnect): an interrupt that went to the old fd, which the frontend may
    no longer watch, must not leave the guest waiting.  The daemon signals the new fd once
    (as libvhost-user does), and interrupts through it afterwards."""
    c = daemon.client(event_idx=event_idx, client_kwargs={"request_queue": 1})
    q = c.fe.queues[1]
    c.getattr(FUSE_ROOT_ID)
    _call_pending(q)
    base = q.last_used
    u = _getattr_on(c, 1)
    _spin_until_used(q, base + 1)   # answered, its interrupt sent to the old fd: ignored
    new = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    c.fe._vring_fd(Req.SET_VRING_CALL, 1, new, need_reply=True)
    assert select.select([new], [], [], 5)[0], "the new call fd was not signalled"
    old, q.call_fd = q.call_fd, new
    os.close(old)
    assert c.wait(u).check()
    _call_pending(q)
    assert c.getattr(FUSE_ROOT_ID)  # later interrupts come through the new fd
    c.fe.sync()


# ------------------------------------------------------------------------------------------
# Depth, wrap-around, several queues
# ------------------------------------------------------------------------------------------

def test_qd64_on_a_1024_entry_queue(daemon):
    """Rounds of 64 WRITEs then 64 READs in flight on a 1024-entry ring (1280 requests: the
    ring wraps), every byte checked."""
    c = daemon.client(queue_size=1024, ram_size=128 * MiB)
    q = c.fe.queues[1]
    assert q.size == 1024
    e, o = c.create(FUSE_ROOT_ID, "qd")
    slot = 8192
    data = bytearray(64 * slot)
    rng = random.Random(8)
    for rnd in range(10):
        writes = []
        for i in range(64):
            n = slot if i == 63 else rng.randint(1, slot)   # the file keeps its size
            chunk = _data(n, rnd * 64 + i)
            data[i * slot:i * slot + n] = chunk
            writes.append((n, c.submit_write(e.nodeid, o.fh, i * slot, chunk, kick=False)))
        assert c.in_flight == 64
        c.kick_all()
        for n, u in writes:
            assert F.WRITE_OUT.unpack_from(c.wait(u).check().data)[0] == n
        reads = []
        for i in range(64):
            off = rng.randrange(0, len(data) - slot)
            n = rng.randint(1, slot)
            reads.append((off, n, c.submit_read(e.nodeid, o.fh, off, n, kick=False)))
        assert c.in_flight == 64
        c.kick_all()
        for off, n, u in reads:
            assert c.wait(u).check().data == data[off:off + n]
    assert q.last_used == 1282 and not q.inflight     # CREATE + 1280 + INIT on queue 1
    assert (Path(daemon.shared_dir) / "qd").read_bytes() == data


def test_qd64_reads_are_exact(daemon):
    """64 READs in flight, each of a different size and offset, each checked byte for byte."""
    c = daemon.client(queue_size=1024, ram_size=128 * MiB)
    data = _data(1 * MiB, 9)
    e, o = c.create(FUSE_ROOT_ID, "exact")
    c.write(e.nodeid, o.fh, 0, data)
    rng = random.Random(10)
    for _ in range(10):
        reqs = []
        for _ in range(64):
            off, n = rng.randrange(0, MiB - 20000), rng.randint(1, 20000)
            reqs.append((off, n, c.submit_read(e.nodeid, o.fh, off, n, kick=False)))
        c.kick_all()
        for off, n, u in reqs:
            assert c.wait(u).check().data == data[off:off + n]


def test_avail_and_used_index_wrap_around(daemon):
    """Restart a ring at avail/used index 65500 (SET_VRING_BASE, the used index taken from
    the ring as after a reconnect) and run 200 requests through the 16-bit wrap."""
    c = daemon.client(client_kwargs={"request_queue": 1})
    fe = c.fe
    q = fe.queues[1]
    c.getattr(FUSE_ROOT_ID)
    assert fe.stop_queue(1) == q.avail_idx
    start = 65500
    q.set_avail_idx(start)
    q.last_used = start
    fe.ram.write_u16(q.used_gpa + 2, start)
    q.set_used_event(start)
    fe._vring_fd(Req.SET_VRING_CALL, 1, q.call_fd)
    fe.setup_vring(q, base=start)
    fe.set_vring_enable(1, True)
    fe.sync()
    for _ in range(25):
        us = [_getattr_on(c, 1) for _ in range(8)]
        for u in us:
            c.wait(u).check()
    assert q.used_idx == (start + 200) & 0xFFFF
    assert q.avail_idx == (start + 200) & 0xFFFF
    assert _avail_event_settles(q), (q.avail_event, q.avail_idx)
    # and the ring still reports the right base
    assert fe.stop_queue(1) == (start + 200) & 0xFFFF


def test_four_request_queues(daemon):
    """num_request_queues=4: requests on each queue, replies on that same queue."""
    c = daemon.client(num_request_queues=4)
    fe = c.fe
    assert fe.max_queues >= 5 and len(fe.queues) == 5
    shared = Path(daemon.shared_dir)
    for i in range(1, 5):
        (shared / f"q{i}").write_bytes(bytes([i]) * 5000)
    nodes = {i: c.lookup(FUSE_ROOT_ID, f"q{i}").nodeid for i in range(1, 5)}
    fhs = {i: c.open(nodes[i]).fh for i in range(1, 5)}
    before = {q.index: q.used_idx for q in fe.queues}
    sent = {i: [] for i in range(1, 5)}
    for round_ in range(4):
        for i in range(1, 5):
            for k in range(4):
                if k % 2:
                    u = c.submit_read(nodes[i], fhs[i], 100 * k, 1000, queue=i, kick=False)
                else:
                    u = c.submit(Op.LOOKUP, FUSE_ROOT_ID, [f"q{i}".encode() + b"\0"],
                                 [F.ENTRY_OUT_SIZE], queue=i, kick=False)
                sent[i].append((k, u))
        c.kick_all()
    for i in range(1, 5):
        for k, u in sent[i]:
            r = c.wait(u).check()
            if k % 2:
                assert r.data == bytes([i]) * 1000
            else:
                assert F.parse_entry(r.data).nodeid == nodes[i]
    for q in fe.queues[1:]:
        assert (q.used_idx - before[q.index]) & 0xFFFF == 16, q
    assert fe.queues[0].used_idx == before[0]       # nothing answered on hiprio


# ------------------------------------------------------------------------------------------
# hiprio
# ------------------------------------------------------------------------------------------

def test_hiprio_forget_and_batch_forget(daemon):
    c = daemon.client()
    shared = Path(daemon.shared_dir)
    (shared / "f").write_bytes(b"x")
    nid = c.lookup(FUSE_ROOT_ID, "f").nodeid
    for _ in range(3):
        assert c.lookup(FUSE_ROOT_ID, "f").nodeid == nid           # 4 references
    hp = c.hiprio
    used0 = hp.used_idx
    c.forget(nid, 1)                                                # no reply: used len 0
    c.batch_forget([(nid, 2), (0xDEADBEEF, 5), (FUSE_ROOT_ID, 1 << 40)])
    assert c.getattr(nid).attr.size == 1                            # one reference left
    c.forget(nid, 1)
    with pytest.raises(FuseError) as ei:
        c.getattr(nid)
    assert ei.value.errno in (errno.EBADF, errno.ENOENT)
    # a large BATCH_FORGET (spread over several pages) and an INTERRUPT of nothing
    ids = [c.lookup(FUSE_ROOT_ID, "f").nodeid for _ in range(3)]
    c.batch_forget([(ids[0], 3)] + [(0x100000 + k, 1) for k in range(2000)])
    c.interrupt(12345)
    assert (hp.used_idx - used0) & 0xFFFF == 5
    assert c.getattr(FUSE_ROOT_ID).attr.mode & 0o040000
    assert c.lookup(FUSE_ROOT_ID, "f").nodeid                       # served afresh


def test_hiprio_does_not_wait_behind_a_blocked_request(daemon):
    """A SETLKW that must wait (the host holds the lock) neither blocks its request queue
    nor the hiprio queue; it completes when the host lets go."""
    c = daemon.client()
    path = Path(daemon.shared_dir) / "locked"
    path.write_bytes(b"data")
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)                     # a classic POSIX lock, host side
        e = c.lookup(FUSE_ROOT_ID, "locked")
        o = c.open(e.nodeid, os.O_RDWR)
        body = F.LK_IN.pack(o.fh, 77, 0, 2**63 - 1, fcntl.F_WRLCK, os.getpid(), 0, 0)
        u_lock = c.submit(Op.SETLKW, e.nodeid, [body], queue=1)
        time.sleep(0.2)
        assert u_lock in c._pending                        # still waiting
        for _ in range(10):
            c.getattr(e.nodeid)                            # same request queue: not stuck
        c.forget(e.nodeid, 0)                              # hiprio: not stuck
        assert c.lookup(FUSE_ROOT_ID, "locked").nodeid == e.nodeid
        fcntl.lockf(fd, fcntl.LOCK_UN)
        assert c.wait(u_lock, timeout=5).check()
        c.release(e.nodeid, o.fh)
    finally:
        os.close(fd)



"""Self-checks of the test frontend's own pieces, no daemon needed: guest RAM and its
allocator, split-ring layout and chain building, EVENT_IDX maths, vhost-user framing, the
QEMU-like handshake order (against a scripted in-process backend), and FUSE encoding and
reply checks (against a fake device that walks the chains in guest RAM)."""

from __future__ import annotations

import os
import socket
import struct
import threading

import pytest

from pyvirtiofs.testing import frontend as F
from pyvirtiofs.testing.frontend import (
    FuseClient, FuseError, GuestRam, Op, ProtocolError, QueueFullError, Req, SplitQueue,
    VhostUserConnection, VhostUserError, VirtioFsFrontend,
)

MiB = 1 << 20


# ------------------------------------------------------------------------------------------
# Guest RAM
# ------------------------------------------------------------------------------------------

def test_ram_single_region_layout():
    with GuestRam(4 * MiB, gpa_base=0x100000) as ram:
        (r,) = ram.regions
        assert r.gpa == 0x100000 and r.size == 4 * MiB
        assert r.uaddr == GuestRam.FAKE_UADDR_BASE != r.gpa
        assert ram.mem_table() == [(0x100000, 4 * MiB, GuestRam.FAKE_UADDR_BASE, 0)]
        assert ram.uaddr(0x100000 + 123) == GuestRam.FAKE_UADDR_BASE + 123
        with pytest.raises(ValueError):
            ram.locate(0xFFFFF)
        with pytest.raises(ValueError):
            ram.locate(0x100000 + 4 * MiB - 4, 8)      # runs off the end


def test_ram_two_regions_gap_and_mmap_offset():
    with GuestRam(8 * MiB, gpa_base=0, regions=2, region_gap=1 << 32, mmap_offset=8192) as ram:
        r0, r1 = ram.regions
        assert (r0.gpa, r0.size) == (0, 4 * MiB)
        assert r1.gpa == 4 * MiB + (1 << 32)
        assert r1.uaddr - r0.uaddr == 1 << 32
        assert r0.mmap_offset == r1.mmap_offset == 8192
        # the part of the memfd before mmap_offset is poison, guest RAM starts after it
        assert os.pread(r0.fd, 16, 0) == bytes([GuestRam.POISON]) * 16
        ram.write(r1.gpa + 5, b"hello")
        assert os.pread(r1.fd, 5, 8192 + 5) == b"hello"
        assert ram.read(r1.gpa + 5, 5) == b"hello"
        with pytest.raises(ValueError):
            ram.locate(r0.end + 10)                  # in the hole


def test_ram_real_uaddr():
    with GuestRam(MiB, uaddr_base="real") as ram:
        import ctypes
        r = ram.regions[0]
        ram.write(r.gpa, b"xyz")
        assert ctypes.string_at(r.uaddr, 3) == b"xyz"


def test_ram_scalar_helpers():
    with GuestRam(MiB) as ram:
        g = ram.alloc(16)
        ram.write_u16(g, 0x1234)
        ram.write_u32(g + 4, 0xDEADBEEF)
        ram.write_u64(g + 8, 2**64 - 1)
        assert ram.read_u16(g) == 0x1234
        assert ram.read_u32(g + 4) == 0xDEADBEEF
        assert ram.read_u64(g + 8) == 2**64 - 1
        assert ram.read(g, 2) == b"\x34\x12"


def test_allocator_alignment_free_and_coalesce():
    with GuestRam(MiB, gpa_base=0x100000) as ram:
        total = ram.free_bytes()
        a = ram.alloc(10, align=16)
        b = ram.alloc(100, align=4096)
        c = ram.alloc(1)
        assert a % 16 == 0 and b % 4096 == 0
        assert ram.alloc_size(b) == 100
        spans = sorted([(a, 10), (b, 100), (c, 1)])
        for (x, n), (y, _) in zip(spans, spans[1:]):
            assert x + n <= y                        # no overlap
        ram.free(b)
        with pytest.raises(ValueError):
            ram.free(b)                              # double free
        ram.free(a)
        ram.free(c)
        assert ram.free_bytes() == total
        assert ram.free_extents() == 1               # everything coalesced back
        assert ram.allocated() == 0


def test_allocator_first_fit_reuses_holes_and_exhausts():
    with GuestRam(64 * 1024) as ram:
        blocks = [ram.alloc(4096, align=4096) for _ in range(16)]
        with pytest.raises(MemoryError):
            ram.alloc(1)
        ram.free(blocks[5])
        assert ram.alloc(4096, align=4096) == blocks[5]
        ram.free(blocks[7])
        ram.free(blocks[8])
        assert ram.alloc(8192, align=4096) == blocks[7]


def test_allocator_round_robin_over_regions():
    with GuestRam(2 * MiB, regions=2) as ram:
        g1, g2, g3 = ram.alloc(8), ram.alloc(8), ram.alloc(8)
        assert ram.locate(g1)[0].index != ram.locate(g2)[0].index
        assert ram.locate(g1)[0].index == ram.locate(g3)[0].index
        assert ram.locate(ram.alloc(8, region=1))[0].index == 1


def test_allocator_never_spans_regions():
    with GuestRam(2 * MiB, regions=2, policy="first") as ram:
        ram.alloc(MiB - 4096)
        g = ram.alloc(8192)                          # does not fit in region 0's tail
        assert ram.locate(g, 8192)[0].index == 1


# ------------------------------------------------------------------------------------------
# Split queue
# ------------------------------------------------------------------------------------------

def test_ring_sizes():
    assert SplitQueue.ring_sizes(128) == (2048, 6 + 256, 6 + 1024)
    assert SplitQueue.ring_sizes(1) == (16, 8, 14)


@pytest.mark.parametrize("bad", [0, 3, 100, 65536])
def test_queue_size_must_be_power_of_two(bad):
    with GuestRam(MiB) as ram:
        with pytest.raises(ValueError):
            SplitQueue(ram, 0, bad)


def _walk(q: SplitQueue, head: int):
    """Follow a chain as a device would: returns [(addr, len, flags)] of data descriptors."""
    out = []
    addr, ln, fl, nxt = q.read_desc(head)
    if fl & F.VRING_DESC_F_INDIRECT:
        table = q.ram.read(addr, ln)
        i = 0
        while True:
            a, n, f, x = F._DESC.unpack_from(table, 16 * i)
            out.append((a, n, f))
            if not f & F.VRING_DESC_F_NEXT:
                return out
            i = x
    i = head
    while True:
        a, n, f, x = q.read_desc(i)
        out.append((a, n, f))
        if not f & F.VRING_DESC_F_NEXT:
            return out
        i = x


def _push_used(q: SplitQueue, head: int, length: int):
    """Play the device: add a used element and bump used.idx."""
    idx = q.used_idx
    struct.pack_into("<II", q._umm, q._uoff + 4 + 8 * (idx % q.size), head, length)
    struct.pack_into("<H", q._umm, q._uoff + 2, (idx + 1) & 0xFFFF)


def _pop_avail(q: SplitQueue, last: int) -> int:
    return q.ram.read_u16(q.avail_gpa + 4 + 2 * (last % q.size))


def test_direct_chain_layout_and_completion():
    with GuestRam(MiB) as ram:
        q = SplitQueue(ram, 1, 8)
        head = q.add_chain([b"abc", b"defg"], [16, 100])
        assert q.num_free == 4
        assert ram.read_u16(q.avail_gpa + 2) == 1 and _pop_avail(q, 0) == head
        segs = _walk(q, head)
        assert [(n, f) for _, n, f in segs] == [(3, 1), (4, 1), (16, 3), (100, 2)]
        assert ram.read(segs[0][0], 3) == b"abc" and ram.read(segs[1][0], 4) == b"defg"
        ram.write(segs[2][0], b"W" * 16)
        ram.write(segs[3][0], b"X" * 4)
        used_before = ram.allocated()
        _push_used(q, head, 20)
        (c,) = q.reap()
        assert (c.head, c.length, c.data) == (head, 20, b"W" * 16 + b"X" * 4)
        assert q.num_free == 8 and not q.inflight
        assert ram.allocated() == used_before - 2    # both buffers freed


def test_indirect_chain_and_max_seg():
    with GuestRam(MiB) as ram:
        q = SplitQueue(ram, 1, 4, indirect=True)
        head = q.add_chain([b"h" * 40, bytes(10000)], [16, 8192], max_seg=4096)
        assert q.num_free == 3                       # one slot for any chain length
        addr, ln, fl, _ = q.read_desc(head)
        assert fl == F.VRING_DESC_F_INDIRECT
        segs = _walk(q, head)
        assert ln == 16 * len(segs)
        assert [n for _, n, _ in segs] == [40, 4096, 4096, 1808, 16, 4096, 4096]
        assert [bool(f & 2) for _, _, f in segs] == [False] * 4 + [True] * 3
        # indirect=False forces a direct chain, which does not fit in 4 descriptors
        with pytest.raises(QueueFullError):
            q.add_chain([b"x"] * 5, [], indirect=False)
        assert q.num_free == 3                       # nothing leaked by the failure


def test_raw_items_and_scatter():
    with GuestRam(2 * MiB, regions=2) as ram:
        q = SplitQueue(ram, 0, 16)
        buf = ram.alloc(64)
        head = q.add_chain([b"a" * 8, b"b" * 8, (buf, 64)], [(buf, 32), 4], scatter=True)
        segs = _walk(q, head)
        assert segs[2][:2] == (buf, 64) and segs[3][:2] == (buf, 32)
        assert {ram.locate(segs[i][0])[0].index for i in (0, 1)} == {0, 1}


def test_zero_length_segments():
    with GuestRam(MiB) as ram:
        q = SplitQueue(ram, 0, 8)
        head = q.add_chain([b""], [0])
        assert [(a, n) for a, n, _ in _walk(q, head)] == [(0, 0), (0, 0)]
        head2 = q.add_chain([b"", b"ab"], [])
        assert [n for _, n, _ in _walk(q, head2)] == [0, 2]


def test_unknown_used_id_and_overlong_len_are_protocol_errors():
    with GuestRam(MiB) as ram:
        q = SplitQueue(ram, 1, 8)
        h = q.add_chain([b"x"], [8])
        _push_used(q, 7, 0)
        with pytest.raises(ProtocolError, match="not the head"):
            q.reap()
        _push_used(q, h, 9)
        with pytest.raises(ProtocolError, match="exceeds"):
            q.reap()


def test_used_idx_jump_is_protocol_error():
    with GuestRam(MiB) as ram:
        q = SplitQueue(ram, 1, 8)
        struct.pack_into("<H", q._umm, q._uoff + 2, 100)
        with pytest.raises(ProtocolError, match="jumped"):
            q.poll_used()


def test_need_event_and_kick_suppression():
    with GuestRam(MiB) as ram:
        q = SplitQueue(ram, 1, 8, event_idx=True)
        q.add_chain([b"x"], [])
        assert q.kick() is True                      # avail_event 0, new 1, old 0
        # device says: wake me when avail.idx passes 5
        struct.pack_into("<H", q._umm, q._avail_event_off, 5)
        for _ in range(3):
            q.add_chain([b"x"], [])
        assert q.kick() is False and q.kicks_suppressed == 1   # idx 4: not past 5
        q.add_chain([b"x"], [])
        q.add_chain([b"x"], [])
        assert q.kick() is True                      # idx 4 -> 6 crosses 5
        assert q.kicks == 2
        assert os.eventfd_read(q.kick_fd) == 2
        q.close()


def test_no_notify_flag_without_event_idx():
    with GuestRam(MiB) as ram:
        q = SplitQueue(ram, 1, 8)
        q.add_chain([b"x"], [])
        struct.pack_into("<H", q._umm, q._uoff, F.VRING_USED_F_NO_NOTIFY)
        assert q.kick() is False
        assert q.kick(force=True) is True
        q.close()


def test_used_event_written_and_wait_timeout():
    with GuestRam(MiB) as ram:
        q = SplitQueue(ram, 1, 8, event_idx=True)
        h = q.add_chain([b"x"], [4])
        with pytest.raises(TimeoutError, match="nothing completed"):
            q.wait(0.05)
        _push_used(q, h, 0)
        os.eventfd_write(q.call_fd, 1)
        (c,) = q.wait(1)
        assert c.head == h and q.interrupts in (0, 1)
        assert ram.read_u16(q.avail_gpa + 4 + 2 * 8) == 1     # used_event = last_used
        q.close()


def test_wrap_around_16bit_indices():
    with GuestRam(MiB) as ram:
        q = SplitQueue(ram, 1, 4)
        q.set_avail_idx(0xFFFE)
        q.last_used = 0xFFFE
        struct.pack_into("<H", q._umm, q._uoff + 2, 0xFFFE)
        for _ in range(3):
            h = q.add_chain([b"x"], [])
            _push_used(q, h, 0)
            assert [c.head for c in q.reap()] == [h]
        assert q.avail_idx == 1 and q.last_used == 1


# ------------------------------------------------------------------------------------------
# vhost-user framing
# ------------------------------------------------------------------------------------------

def test_encode_header():
    b = VhostUserConnection.encode(Req.SET_VRING_NUM, struct.pack("<II", 1, 256))
    assert b == struct.pack("<III", 8, 1, 8) + struct.pack("<II", 1, 256)
    assert VhostUserConnection.decode_header(b) == (8, 1, 8)
    assert VhostUserConnection.encode(1, b"", size=99)[8:12] == struct.pack("<I", 99)


def _pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return VhostUserConnection(a, 5), VhostUserConnection(b, 5)


def test_fd_passing_and_need_reply_flag():
    front, back = _pair()
    efd = os.eventfd(0)
    try:
        front.send(Req.SET_VRING_KICK, struct.pack("<Q", 1), [efd], need_reply=True)
        m = back.recv()
        assert (m.request, m.flags, m.u64()) == (Req.SET_VRING_KICK, 1 | 8, 1)
        assert len(m.fds) == 1
        os.eventfd_write(m.fds[0], 3)                # it really is our eventfd
        assert os.eventfd_read(efd) == 3
        os.close(m.fds[0])
    finally:
        os.close(efd)
        front.close()
        back.close()


def _serve(back, script):
    """Answer requests from a script: {request: reply payload or callable}."""
    def run():
        try:
            while True:
                m = back.recv()
                r = script.get(m.request)
                if callable(r):
                    r = r(m)
                if r is not None:
                    back.send(m.request, r, flags=1 | F.VHOST_USER_REPLY)
                for fd in m.fds:
                    os.close(fd)
        except (ConnectionError, OSError):
            pass
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_call_reply_ack_and_errors():
    front, back = _pair()
    _serve(back, {Req.GET_FEATURES: struct.pack("<Q", 0x1234),
                  Req.SET_OWNER: struct.pack("<Q", 0),
                  Req.SET_FEATURES: struct.pack("<Q", 1),
                  Req.GET_QUEUE_NUM: struct.pack("<Q", 5)})
    try:
        assert front.get_u64(Req.GET_FEATURES) == 0x1234
        assert front.call(Req.SET_OWNER, need_reply=True) is None
        with pytest.raises(VhostUserError):
            front.call(Req.SET_FEATURES, struct.pack("<Q", 0), need_reply=True)
        assert front.get_u64(Req.GET_QUEUE_NUM) == 5
    finally:
        front.close()
        back.close()


def test_reply_with_wrong_request_is_protocol_error():
    front, back = _pair()
    try:
        # the reply is already waiting in the socket when the request goes out
        back.send(Req.GET_QUEUE_NUM, struct.pack("<Q", 1), flags=1 | F.VHOST_USER_REPLY)
        with pytest.raises(ProtocolError, match="request code 17"):
            front.call(Req.GET_FEATURES)
        back.send(Req.GET_FEATURES, struct.pack("<Q", 1), flags=1)   # reply bit missing
        with pytest.raises(ProtocolError, match="flags"):
            front.call(Req.GET_FEATURES)
    finally:
        front.close()
        back.close()


def test_backend_closing_is_connection_error():
    front, back = _pair()
    back.close()
    with pytest.raises(ConnectionError):
        front.call(Req.GET_FEATURES)
    front.close()


# ------------------------------------------------------------------------------------------
# Handshake order against a scripted backend
# ------------------------------------------------------------------------------------------

class ScriptedBackend:
    """Listens on a socket, records every message, answers what needs an answer."""

    def __init__(self, path, features, protocol_features, queues=2, slots=32):
        self.path = path
        self.features = features
        self.protocol_features = protocol_features
        self.queues = queues
        self.slots = slots
        self.log: list[tuple[int, int, bytes, int]] = []   # request, flags, payload, nfds
        self.lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.lsock.bind(path)
        self.lsock.listen(1)
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        s, _ = self.lsock.accept()
        conn = VhostUserConnection(s, 10)
        try:
            while True:
                m = conn.recv()
                self.log.append((m.request, m.flags, m.payload, len(m.fds)))
                for fd in m.fds:
                    os.close(fd)
                reply = None
                if m.request == Req.GET_FEATURES:
                    reply = struct.pack("<Q", self.features)
                elif m.request == Req.GET_PROTOCOL_FEATURES:
                    reply = struct.pack("<Q", self.protocol_features)
                elif m.request == Req.GET_QUEUE_NUM:
                    reply = struct.pack("<Q", self.queues)
                elif m.request == Req.GET_MAX_MEM_SLOTS:
                    reply = struct.pack("<Q", self.slots)
                elif m.request == Req.GET_VRING_BASE:
                    reply = struct.pack("<II", struct.unpack_from("<I", m.payload)[0], 0)
                elif m.flags & F.VHOST_USER_NEED_REPLY:
                    reply = struct.pack("<Q", 0)
                if reply is not None:
                    conn.send(m.request, reply, flags=1 | F.VHOST_USER_REPLY)
        except (ConnectionError, OSError):
            pass
        finally:
            conn.close()
            self.lsock.close()

    def requests(self):
        return [r for r, *_ in self.log]


RUST_LIKE_FEATURES = (1 << 32) | (1 << 28) | (1 << 29) | (1 << 30) | (1 << 26)
RUST_LIKE_PROTOCOL = 0x8A42B   # what virtiofsd-rs 1.13 offers (CONFIG not among them)


def test_handshake_order_like_qemu(tmp_path):
    path = str(tmp_path / "s.sock")
    be = ScriptedBackend(path, RUST_LIKE_FEATURES, RUST_LIKE_PROTOCOL | (1 << 9))
    fe = VirtioFsFrontend(path, queue_size=256)
    try:
        assert fe.stop_queue(1) == 0
    finally:
        fe.close()
    be.thread.join(5)
    R = Req
    per_q_init = [R.SET_VRING_CALL, R.SET_VRING_ERR]
    per_q_start = [R.SET_VRING_NUM, R.SET_VRING_BASE, R.SET_VRING_ADDR, R.SET_VRING_KICK]
    expect = ([R.GET_FEATURES, R.GET_PROTOCOL_FEATURES, R.SET_PROTOCOL_FEATURES,
               R.GET_QUEUE_NUM, R.GET_MAX_MEM_SLOTS, R.SET_OWNER, R.GET_FEATURES]
              + per_q_init * 2
              + [R.SET_VRING_CALL] * 2 + [R.SET_FEATURES, R.ADD_MEM_REG]
              + per_q_start * 2 + [R.SET_VRING_ENABLE] * 2 + [R.SET_VRING_CALL] * 2
              + [R.GET_FEATURES, R.SET_VRING_ENABLE, R.GET_VRING_BASE])
    assert be.requests() == expect
    log = {i: e for i, e in enumerate(be.log)}
    # SET_PROTOCOL_FEATURES: MQ, REPLY_ACK, RESET_DEVICE, CONFIGURE_MEM_SLOTS, never CONFIG
    assert struct.unpack("<Q", log[2][2])[0] == 0xA009
    # SET_FEATURES: VERSION_1 | INDIRECT | EVENT_IDX | PROTOCOL_FEATURES, not LOG_ALL
    sf = next(e for e in be.log if e[0] == R.SET_FEATURES)
    assert struct.unpack("<Q", sf[2])[0] == (1 << 32) | (7 << 28)
    add = next(e for e in be.log if e[0] == R.ADD_MEM_REG)
    assert add[1] == 1 | F.VHOST_USER_NEED_REPLY and add[3] == 1 and len(add[2]) == 40
    _pad, gpa, size, uaddr, off = struct.unpack("<5Q", add[2])
    assert (gpa, size, off) == (0x100000, 64 * MiB, 0) and uaddr != gpa
    num = next(e for e in be.log if e[0] == R.SET_VRING_NUM)
    assert struct.unpack("<II", num[2]) == (0, 256)
    addr = next(e for e in be.log if e[0] == R.SET_VRING_ADDR)
    idx, flags, d, u, a, lg = struct.unpack("<IIQQQQ", addr[2])
    assert idx == 0 and flags == 0 and lg == 0
    assert all(GuestRam.FAKE_UADDR_BASE <= x < GuestRam.FAKE_UADDR_BASE + 64 * MiB
               for x in (d, u, a))
    kicks = [e for e in be.log if e[0] == R.SET_VRING_KICK]
    assert all(e[3] == 1 and struct.unpack("<Q", e[2])[0] in (0, 1) for e in kicks)
    en = [struct.unpack("<II", e[2]) for e in be.log if e[0] == R.SET_VRING_ENABLE]
    assert en == [(0, 1), (1, 1), (1, 0)]


def test_handshake_set_mem_table_two_regions(tmp_path):
    path = str(tmp_path / "s.sock")
    be = ScriptedBackend(path, RUST_LIKE_FEATURES, 0x9)   # MQ + REPLY_ACK only
    ram = GuestRam(8 * MiB, regions=2, region_gap=1 << 32)
    fe = VirtioFsFrontend(path, ram=ram, event_idx=False)
    fe.close()
    ram.close()
    be.thread.join(5)
    assert Req.GET_MAX_MEM_SLOTS not in be.requests()
    mt = next(e for e in be.log if e[0] == Req.SET_MEM_TABLE)
    assert mt[3] == 2 and mt[1] == 1 | F.VHOST_USER_NEED_REPLY
    n, _ = struct.unpack_from("<II", mt[2])
    assert n == 2 and len(mt[2]) == 8 + 2 * 32
    regions = [struct.unpack_from("<4Q", mt[2], 8 + 32 * i) for i in range(2)]
    assert regions[1][0] == regions[0][0] + 4 * MiB + (1 << 32)
    sf = next(e for e in be.log if e[0] == Req.SET_FEATURES)
    assert struct.unpack("<Q", sf[2])[0] == (1 << 32) | (1 << 28) | (1 << 30)


def test_handshake_without_protocol_features(tmp_path):
    path = str(tmp_path / "s.sock")
    be = ScriptedBackend(path, (1 << 32), 0)
    fe = VirtioFsFrontend(path)
    fe.close()
    be.thread.join(5)
    reqs = be.requests()
    assert Req.GET_PROTOCOL_FEATURES not in reqs and Req.SET_VRING_ENABLE not in reqs
    assert Req.SET_MEM_TABLE in reqs


# ------------------------------------------------------------------------------------------
# FUSE encoding against a fake device
# ------------------------------------------------------------------------------------------

class _StubFrontend:
    def __init__(self, ram, nq=2, size=64, indirect=False):
        self.ram = ram
        self.queues = [SplitQueue(ram, i, size, indirect=indirect) for i in range(nq)]


class FakeDevice:
    """Walks available chains and lets a handler produce each reply."""

    def __init__(self, q: SplitQueue):
        self.q = q
        self.last = 0

    def serve(self, handler, used_len=None):
        q = self.q
        while self.last != q.avail_idx:
            head = _pop_avail(q, self.last)
            self.last = (self.last + 1) & 0xFFFF
            segs = _walk(q, head)
            rd = [(a, n) for a, n, f in segs if not f & 2]
            wr = [(a, n) for a, n, f in segs if f & 2]
            req = b"".join(q.ram.read(a, n) for a, n in rd)
            reply = handler(req, [n for _, n in rd], [n for _, n in wr])
            pos = 0
            for a, n in wr:
                chunk = reply[pos:pos + n]
                q.ram.write(a, chunk)
                pos += len(chunk)
            _push_used(q, head, len(reply) if used_len is None else used_len)


def _reply(req: bytes, payload: bytes = b"", error: int = 0, len_delta: int = 0):
    unique = struct.unpack_from("<Q", req, 8)[0]
    return struct.pack("<IiQ", 16 + len(payload) + len_delta, error, unique) + payload


@pytest.fixture
def fuse():
    ram = GuestRam(4 * MiB)
    fe = _StubFrontend(ram)
    c = FuseClient(fe, uid=1000, gid=100, pid=42)
    yield c, FakeDevice(fe.queues[1]), FakeDevice(fe.queues[0])
    for q in fe.queues:
        q.close()
    ram.close()


def _attr(ino=5, size=0, mode=0o100644):
    return F.ATTR.pack(ino, size, 0, 0, 0, 0, 0, 0, 0, mode, 1, 0, 0, 0, 4096, 0)


def test_fuse_lookup_layout_and_decode(fuse):
    c, dev, _ = fuse
    u = c.submit(Op.LOOKUP, 1, [b"name\0"], [F.ENTRY_OUT_SIZE])
    seen = {}

    def h(req, rsizes, wsizes):
        seen.update(req=req, rsizes=rsizes, wsizes=wsizes)
        return _reply(req, F.ENTRY_OUT_HEAD.pack(5, 7, 1, 1, 0, 0) + _attr())
    dev.serve(h)
    r = c.wait(u).check()
    ln, op, unique, nodeid, uid, gid, pid, extlen, pad = F.IN_HEADER.unpack_from(seen["req"])
    assert (ln, op, unique, nodeid, uid, gid, pid, extlen) == (45, 1, u, 1, 1000, 100, 42, 0)
    assert seen["rsizes"] == [40, 5] and seen["wsizes"] == [16, 128]
    e = F.parse_entry(r.data)
    assert e.nodeid == 5 and e.generation == 7 and e.attr.mode == 0o100644


def test_fuse_error_reply(fuse):
    c, dev, _ = fuse
    u = c.submit(Op.LOOKUP, 1, [b"x\0"], [F.ENTRY_OUT_SIZE])
    dev.serve(lambda req, *_: _reply(req, error=-2))
    with pytest.raises(FuseError) as ei:
        c.wait(u).check()
    assert ei.value.errno == 2 and ei.value.opcode == Op.LOOKUP


@pytest.mark.parametrize("mutate,match", [
    (dict(len_delta=1), "out header len"),
    (dict(error=5), "not a negative errno"),
])
def test_fuse_reply_checks(fuse, mutate, match):
    c, dev, _ = fuse
    u = c.submit(Op.GETATTR, 1, [F.GETATTR_IN.pack(0, 0, 0)], [F.ATTR_OUT_SIZE])
    dev.serve(lambda req, *_: _reply(req, b"\0" * 104, **mutate))
    with pytest.raises(ProtocolError, match=match):
        c.wait(u)


def test_fuse_used_len_must_match_header(fuse):
    c, dev, _ = fuse
    u = c.submit(Op.GETATTR, 1, [F.GETATTR_IN.pack(0, 0, 0)], [F.ATTR_OUT_SIZE])
    dev.serve(lambda req, *_: _reply(req, b"\0" * 104), used_len=16)
    with pytest.raises(ProtocolError, match="!= used len 16"):
        c.wait(u)


def test_fuse_wrong_unique_and_error_with_payload(fuse):
    c, dev, _ = fuse
    u = c.submit(Op.GETATTR, 1, [F.GETATTR_IN.pack(0, 0, 0)], [F.ATTR_OUT_SIZE])
    dev.serve(lambda req, *_: struct.pack("<IiQ", 16, 0, 999))
    with pytest.raises(ProtocolError, match="unique 999"):
        c.wait(u)
    u = c.submit(Op.GETATTR, 1, [F.GETATTR_IN.pack(0, 0, 0)], [F.ATTR_OUT_SIZE])
    dev.serve(lambda req, *_: _reply(req, b"\0" * 8, error=-5))
    with pytest.raises(ProtocolError, match="carries 8 payload"):
        c.wait(u)
    assert len(c.violations) == 2


def test_fuse_non_strict_records_violations(fuse):
    c, dev, _ = fuse
    c.strict = False
    u = c.submit(Op.GETATTR, 1, [F.GETATTR_IN.pack(0, 0, 0)], [F.ATTR_OUT_SIZE])
    dev.serve(lambda req, *_: _reply(req, b"\0" * 104, len_delta=-4))
    c.wait(u)
    assert c.violations and "out header len" in c.violations[0]


def test_fuse_write_read_segments_and_out_of_order(fuse):
    c, dev, _ = fuse
    data = bytes(range(256)) * 40        # 10240 bytes -> 3 page descriptors
    uw = c.submit_write(5, 9, 100, data)
    ur = c.submit_read(5, 9, 0, 5000, segments=[1, 999, 4000])
    layouts = []

    def h(req, rsizes, wsizes):
        layouts.append((rsizes, wsizes))
        op = struct.unpack_from("<I", req, 4)[0]
        if op == Op.WRITE:
            fh, off, size, *_ = F.WRITE_IN.unpack_from(req, 40)
            assert (fh, off, size) == (9, 100, len(data)) and req[80:] == data
            return _reply(req, F.WRITE_OUT.pack(size, 0))
        fh, off, size, *_ = F.READ_IN.unpack_from(req, 40)
        return _reply(req, b"r" * 4321)
    dev.serve(h)
    assert layouts[0] == ([40, 40, 4096, 4096, 2048], [16, 8])
    assert layouts[1] == ([40, 40], [16, 1, 999, 4000])
    assert c.wait(ur).data == b"r" * 4321            # waited out of submission order
    assert c.wait(uw).check().data == F.WRITE_OUT.pack(len(data), 0)
    assert c.in_flight == 0


def test_fuse_forget_goes_to_hiprio_as_one_descriptor(fuse):
    c, dev, hi = fuse
    u = c.forget(7, 3, wait=False)
    seen = []
    hi.serve(lambda req, r, w: (seen.append((req, r, w)), b"")[1], used_len=0)
    c.wait(u)
    ((req, r, w),) = seen
    assert r == [48] and w == []
    assert F.IN_HEADER.unpack_from(req)[:4] == (48, Op.FORGET, u, 7)
    assert struct.unpack_from("<Q", req, 40)[0] == 3


def test_fuse_batch_forget_and_bad_used_len(fuse):
    c, _, hi = fuse
    u = c.batch_forget([(7, 1), (8, 2)], wait=False)
    seen = []
    hi.serve(lambda req, r, w: (seen.append((req, r, w)), b"")[1], used_len=0)
    c.wait(u)
    ((req, r, w),) = seen
    assert r == [40 + 8 + 32] and w == []
    assert F.BATCH_FORGET_IN.unpack_from(req, 40) == (2, 0)
    assert F.FORGET_ONE.unpack_from(req, 48) == (7, 1)
    assert F.FORGET_ONE.unpack_from(req, 64) == (8, 2)
    # a device claiming to have written into a chain that has nothing writable
    c.forget(9, wait=False)
    hi.serve(lambda req, r, w: b"", used_len=4)
    with pytest.raises(ProtocolError, match="exceeds"):
        c.poll_completions(0)


def test_fuse_init_encoding(fuse):
    c, dev, _ = fuse
    seen = []

    def h(req, r, w):
        seen.append(req)
        return _reply(req, F.INIT_OUT.pack(7, 38, 131072, F.FUSE_INIT_EXT | F.FUSE_MAX_PAGES,
                                           16, 12, MiB, 1, 256, 0, 1))
    u = c.submit(Op.INIT, 0, [F.INIT_IN.pack(7, 38, 131072, 0x7BFFFFFB, 0xB)], [64])
    dev.serve(h)
    out = F.parse_init_out(c.wait(u).data)
    assert F.INIT_IN.unpack_from(seen[0], 40) == (7, 38, 131072, 0x7BFFFFFB, 0xB)
    assert out.flags == F.FUSE_INIT_EXT | F.FUSE_MAX_PAGES | (1 << 32)
    assert out.max_write == MiB and out.max_pages == 256


def test_parse_dirents():
    def ent(ino, off, name, typ=8):
        raw = F.DIRENT.pack(ino, off, len(name), typ) + name
        return raw + b"\0" * (-len(raw) % 8)
    buf = ent(1, 1, b".", 4) + ent(2, 2, b"file-name") + ent(3, 3, b"12345678")
    ds = F.parse_dirents(buf)
    assert [(d.ino, d.off, d.name, d.type) for d in ds] == [
        (1, 1, b".", 4), (2, 2, b"file-name", 8), (3, 3, b"12345678", 8)]
    plus = (F.ENTRY_OUT_HEAD.pack(9, 0, 1, 1, 0, 0) + _attr(9) + ent(9, 1, b"a"))
    (p,) = F.parse_direntplus(plus)
    assert p.entry.nodeid == 9 and p.dirent.name == b"a"
    with pytest.raises(ProtocolError):
        F.parse_dirents(F.DIRENT.pack(1, 1, 50, 8) + b"short")


def test_struct_sizes_match_fuse_h():
    assert F.IN_HEADER.size == 40 and F.OUT_HEADER.size == 16
    assert F.ENTRY_OUT_SIZE == 128 and F.ATTR_OUT_SIZE == 104
    assert F.INIT_IN.size == F.INIT_OUT.size == 64
    assert F.SETATTR_IN.size == 88 and F.STATFS_OUT.size == 80
    assert F.READ_IN.size == F.WRITE_IN.size == 40 and F.RELEASE_IN.size == 24
    assert F.LK_IN.size == 48 and F.LK_OUT.size == 24 and F.FALLOCATE_IN.size == 32
    assert F.COPY_FILE_RANGE_IN.size == 56 and F.LSEEK_IN.size == 24
    assert F.SETUPMAPPING_IN.size == 40


def test_ring_index_stores_are_never_torn():
    """A device in another process must never see half of a 16-bit index update (struct's
    pack_into writes byte by byte, so the queue must not use it for indices).  The parent
    flips avail.idx between 0x00FF and 0x0100 while a forked "device" reads it."""
    with GuestRam(MiB) as ram:
        q = SplitQueue(ram, 1, 8)
        q.set_avail_idx(0x00FF)
        r, off = ram.locate(q.avail_gpa + 2, 2)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                with memoryview(r.mm)[off:off + 2].cast("H") as v:
                    for _ in range(300_000):
                        if v[0] not in (0x00FF, 0x0100):
                            code = 1
                            break
            finally:
                os._exit(code)
        status = None
        while status is None:
            for _ in range(2000):
                q.set_avail_idx(0x0100)
                q.publish()                  # no heads: rewrites avail.idx through publish
                q.set_avail_idx(0x00FF)
                q.publish()
            p, st = os.waitpid(pid, os.WNOHANG)
            if p:
                status = st
        q.close()
        assert os.waitstatus_to_exitcode(status) == 0, "the device saw a torn avail.idx"


def test_wait_spin():
    with GuestRam(MiB) as ram:
        q = SplitQueue(ram, 1, 8)
        h = q.add_chain([b"x"], [4])
        with pytest.raises(TimeoutError):
            q.wait(0.05, spin=0.01)
        _push_used(q, h, 0)
        (c,) = q.wait(1, spin=0.01)                 # found by polling, no eventfd needed
        assert c.head == h and q.interrupts == 0
        q.close()

"""Issue "hostile guest": a guest (or a frontend) that sends garbage must get an error, have
its request dropped, or have its queue stopped with the error eventfd signalled - while the
real pyvirtiofsd keeps serving the other queues, never touches memory outside the buffers it
was given (canary bytes around every buffer, poison before each memfd's mmap_offset), never
hangs and never logs a Python traceback (the daemon fixture's teardown checks the log).

Three layers: descriptor chains and rings, FUSE messages, vhost-user messages; then
property-based tests (hypothesis) with random chains and random FUSE messages against one
daemon (bounded and derandomized for CI; PYVIRTIOFS_HYPOTHESIS_EXAMPLES=N explores further).
One in-process check with tracemalloc: whatever a request carries, the FUSE server copies only
what it needs.

Zero-length descriptors are not an error: they carry nothing (Linux can produce one for an
empty argument), so they are skipped whatever their address; a chain with nothing else to
read is returned unused, like any request shorter than a FUSE header.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
import struct
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pyvirtiofs.testing import frontend as F
from pyvirtiofs.testing.frontend import (
    FUSE_ROOT_ID, FuseClient, FuseError, GuestRam, Op, ProtoFeature, Req, VhostUserConnection,
    VhostUserError,
)

from .daemon import Daemon, Guarded, assert_no_completion, poison_intact, put_chain, wait_used

MiB = 1 << 20
W = F.VRING_DESC_F_WRITE
NEXT = F.VRING_DESC_F_NEXT
IND = F.VRING_DESC_F_INDIRECT
DESC = struct.Struct("<QIHH")
VRING_STATE = struct.Struct("<II")
VRING_ADDR = struct.Struct("<IIQQQQ")
U64 = struct.Struct("<Q")
MEM_HDR = struct.Struct("<II")
MEM_REGION = struct.Struct("<QQQQ")
SINGLE_REGION = struct.Struct("<QQQQQ")
GETATTR_BODY = F.GETATTR_IN.pack(0, 0, 0)
GAP = 1 << 30                       # between the two guest RAM regions


def getattr_request(unique: int = 0x4242, nodeid: int = FUSE_ROOT_ID) -> bytes:
    return F.IN_HEADER.pack(56, Op.GETATTR, unique, nodeid, 0, 0, 0, 0, 0) + GETATTR_BODY


class Hostile:
    """A daemon with a started frontend (hiprio + 2 request queues, INIT done) on guest RAM
    of two regions with a 1 GiB hole between them and a 4 KiB mmap_offset; the error eventfd
    of every ring is ours; canary buffers in both regions."""

    def __init__(self, daemon: Daemon):
        self.d = daemon
        self.ram = GuestRam(16 * MiB, gpa_base=0x100000, regions=2, region_gap=GAP,
                            mmap_offset=4096, policy="first")
        self.r0, self.r1 = self.ram.regions
        self.fe = daemon.frontend(ram=self.ram, num_request_queues=2)
        for q in self.fe.queues:
            self.fe._vring_fd(Req.SET_VRING_ERR, q.index, q.err_fd)
        self.fe.sync()
        self.c = FuseClient(self.fe)
        self.c.init()
        self.guards = [Guarded(self.ram, 4096) for _ in range(3)]
        self.guards.append(Guarded(self.ram, 4096, region=1))
        # the last bytes of both regions: nothing of the frontend's lives there
        self.edges = [(self.r0.end - 4096, 4096), (self.r1.end - 4096, 4096)]
        for gpa, n in self.edges:
            self.ram.fill(gpa, n, 0x5A)

    def buf(self, size: int, data: bytes | None = None, region: int | None = None) -> Guarded:
        g = Guarded(self.ram, size, region=region)
        if data is not None:
            self.ram.write(g.gpa, data)
        self.guards.append(g)
        return g

    def intact(self) -> bool:
        return (all(g.intact() for g in self.guards) and poison_intact(self.ram)
                and all(self.ram.read(gpa, n) == b"\x5a" * n for gpa, n in self.edges))

    def getattr_on(self, qi: int) -> int:
        return self.c.submit(Op.GETATTR, FUSE_ROOT_ID, [GETATTR_BODY], [F.ATTR_OUT_SIZE],
                             queue=qi)

    def serving(self, *queues: int) -> None:
        for qi in queues:
            r = self.c.wait(self.getattr_on(qi), timeout=5).check()
            assert F.parse_attr_out(r.data).attr.mode & 0o040000

    def raw(self, qi: int, descs) -> F.Completion:
        """Publish a hand-written chain on queue qi and wait for its completion."""
        q = self.fe.queues[qi]
        head, slots = put_chain(q, descs)
        q.add_raw(head)
        q.kick()
        try:
            comp, others = wait_used(q, head)
            assert not others
        finally:
            q.put_desc(slots)
        return comp

    def table(self, entries) -> Guarded:
        """An indirect table (entries: (addr, len, flags, next)) in a guarded buffer."""
        data = b"".join(DESC.pack(a, n, f, x) for a, n, f, x in entries)
        return self.buf(len(data), data)


@pytest.fixture
def h(start_daemon):
    daemon = start_daemon(extra_args=["--xattr"])  # the xattr requests get served too
    hs = Hostile(daemon)
    yield hs
    assert hs.intact(), "the daemon wrote outside the buffers it was given"
    daemon.finish()
    hs.ram.close()


# ------------------------------------------------------------------------------------------
# Descriptor chains: each is returned unused (used length 0), the queue keeps working
# ------------------------------------------------------------------------------------------

def _req(h):
    return h.buf(56, getattr_request())


def _w(h, n=120):
    return h.buf(n)


CHAIN_CASES = {
    # addresses
    "readable outside guest memory": lambda h, r, w: [
        (h.r0.end + 4096, 56, 0, 1), (w.gpa, 120, W, None)],
    "writable outside guest memory": lambda h, r, w: [
        (r.gpa, 56, 0, 1), (h.r1.end + 4096, 120, W, None)],
    "writable below guest memory": lambda h, r, w: [
        (r.gpa, 56, 0, 1), (0x1000, 120, W, None)],
    "writable in the hole between regions": lambda h, r, w: [
        (r.gpa, 56, 0, 1), (h.r0.end + GAP // 2, 120, W, None)],
    "address wraps past 2^64": lambda h, r, w: [
        (r.gpa, 56, 0, 1), (2**64 - 64, 120, W, None)],
    "length overflows its region": lambda h, r, w: [
        (r.gpa, 0xFFFFFFFF, 0, 1), (w.gpa, 120, W, None)],
    "buffer crosses into the hole": lambda h, r, w: [
        (r.gpa, 56, 0, 1), (w.gpa, 120, W, 2), (h.r0.end - 60, 120, W, None)],
    "buffer crosses the end of guest memory": lambda h, r, w: [
        (r.gpa, 56, 0, 1), (w.gpa, 120, W, 2), (h.r1.end - 60, 120, W, None)],
    # chain structure
    "loop": lambda h, r, w: [
        (r.gpa, 56, 0, 1), (w.gpa, 60, W, 2), (w.gpa + 60, 60, W, 1)],
    "self loop": lambda h, r, w: [(r.gpa, 56, NEXT, ("slot", None))],
    "next outside the table": lambda h, r, w: [(r.gpa, 56, NEXT, ("slot", 128 + 5))],
    "chain longer than the queue": None,       # built in the test
    "readable after writable": lambda h, r, w: [
        (r.gpa, 40, 0, 1), (w.gpa, 120, W, 2), (r.gpa + 40, 16, 0, None)],
    # indirect tables
    "indirect inside indirect": lambda h, r, w: [
        (h.table([(h.table([(r.gpa, 56, 0, 0)]).gpa, 16, IND, 0)]).gpa, 16, IND, None)],
    "INDIRECT together with NEXT": lambda h, r, w: [
        (h.table([(r.gpa, 56, 0, 0)]).gpa, 16, IND, 1), (w.gpa, 120, W, None)],
    "indirect table of 20 bytes": lambda h, r, w: [
        (h.table([(r.gpa, 56, NEXT, 1), (w.gpa, 120, W, 0)]).gpa, 20, IND, None)],
    "indirect table of 0 bytes": lambda h, r, w: [(r.gpa, 0, IND, None)],
    "indirect table outside guest memory": lambda h, r, w: [(h.r0.end + 4096, 32, IND, None)],
    "indirect table longer than any queue": lambda h, r, w: [
        (h.table([(r.gpa, 56, NEXT, 1), (w.gpa, 120, W, 0)]).gpa, 16 * 32769, IND, None)],
    "indirect table loops": lambda h, r, w: [
        (h.table([(r.gpa, 56, NEXT, 1), (w.gpa, 120, W | NEXT, 0)]).gpa, 32, IND, None)],
    "indirect next outside its table": lambda h, r, w: [
        (h.table([(r.gpa, 56, NEXT, 7), (w.gpa, 120, W, 0)]).gpa, 32, IND, None)],
    "indirect readable after writable": lambda h, r, w: [
        (h.table([(r.gpa, 40, NEXT, 1), (w.gpa, 120, W | NEXT, 2), (r.gpa + 40, 16, 0, 0)]).gpa,
         48, IND, None)],
    "indirect entry outside guest memory": lambda h, r, w: [
        (h.table([(r.gpa, 56, NEXT, 1), (2**63, 120, W, 0)]).gpa, 32, IND, None)],
    # nothing to read
    "only a zero-length buffer": lambda h, r, w: [(r.gpa, 0, 0, 1), (w.gpa, 120, W, None)],
    "no readable buffer": lambda h, r, w: [(w.gpa, 120, W, None)],
    "header cut short": lambda h, r, w: [(r.gpa, 39, 0, 1), (w.gpa, 120, W, None)],
}


@pytest.mark.parametrize("case", list(CHAIN_CASES))
def test_malformed_chain_is_dropped(h, case):
    q = h.fe.queues[1]
    r, w = _req(h), _w(h)
    if case == "chain longer than the queue":
        # every descriptor of the table in one chain, the last pointing back to the first
        n = q.num_free
        descs = [(r.gpa, 56, 0, 1)] + [(w.gpa, 1, W, i + 1) for i in range(1, n - 1)]
        descs.append((w.gpa, 1, W | NEXT, ("slot", None)))
    else:
        descs = CHAIN_CASES[case](h, r, w)
    comp = h.raw(1, descs)
    assert comp.length == 0, f"{case}: used length {comp.length}"
    assert w.read() == bytes(w.size), f"{case}: the daemon wrote a reply"
    assert not q.error_signalled()
    h.serving(1, 2)                            # the same queue and the other one go on
    assert h.intact()
    if case not in ("only a zero-length buffer", "no readable buffer", "header cut short"):
        h.d.wait_log("dropped a malformed request")


def test_zero_length_buffers_between_real_ones_are_skipped(h):
    """Zero-length descriptors carry nothing (Linux may send one for an empty argument):
    they are skipped, whatever their address, and the request is served."""
    r, w = _req(h), _w(h)
    comp = h.raw(1, [(2**64 - 1, 0, 0, 1), (r.gpa, 40, 0, 2), (0, 0, 0, 3),
                     (r.gpa + 40, 16, 0, 4), (h.r0.end + 8, 0, W, 5), (w.gpa, 16, W, 6),
                     (w.gpa + 16, 0, W, 7), (w.gpa + 16, 104, W, None)])
    assert comp.length == 120
    ln, err, unique = F.OUT_HEADER.unpack(w.read(16))
    assert (ln, err, unique) == (120, 0, 0x4242)
    assert F.parse_attr_out(w.read()[16:]).attr.mode & 0o040000


def test_many_malformed_chains_in_a_row(h):
    """Malformed and valid chains interleaved, many of them: each malformed one is dropped,
    each valid one answered, nothing else moves."""
    q = h.fe.queues[1]
    for i in range(60):
        r, w = _req(h), _w(h)
        if i % 3:
            comp = h.raw(1, [(r.gpa, 56, 0, 1), (2**64 - 8 * i - 64, 120, W, None)])
            assert comp.length == 0
        else:
            comp = h.raw(1, [(r.gpa, 56, 0, 1), (w.gpa, 120, W, None)])
            assert comp.length == 120
    assert not q.error_signalled()
    h.serving(1, 2)


@pytest.mark.parametrize("how", ["avail index jumps", "head index = queue size",
                                 "head index = 0xffff"])
def test_untrustworthy_ring_stops_the_queue(h, how):
    """A ring that cannot be trusted (avail.idx moving by more than the queue size, a head
    index outside the table) stops that queue and signals its error eventfd; hiprio and the
    other request queue go on; a device reset brings the queue back."""
    q = h.fe.queues[1]
    if how == "avail index jumps":
        q.set_avail_idx(q.avail_idx + q.size + 1)
    else:
        q.set_avail_ring(q.avail_idx, q.size if "size" in how else 0xFFFF)
        q.set_avail_idx(q.avail_idx + 1)
    q.kick(force=True)
    deadline = time.monotonic() + 5
    while not q.error_signalled():
        assert time.monotonic() < deadline, "error eventfd not signalled"
        time.sleep(0.01)
    h.d.wait_log("is broken")
    h.serving(2)
    h.c.forget(FUSE_ROOT_ID, 1)                  # hiprio
    # the broken queue serves nothing more until the device is reset
    head = q.add_chain([getattr_request(77)], [16, 104], indirect=False)
    q.kick(force=True)
    assert_no_completion(q, 0.3)
    q.inflight.pop(head, None)
    q.put_desc([head])
    h.c._pending.clear()
    h.c._by_head.clear()
    fe = h.fe
    fe.stop()
    fe.reset_device()
    fe.start()
    for qq in fe.queues:
        fe._vring_fd(Req.SET_VRING_ERR, qq.index, qq.err_fd)
    c = FuseClient(fe)
    c.init()
    h.c = c
    h.serving(1, 2)


# ------------------------------------------------------------------------------------------
# FUSE messages
# ------------------------------------------------------------------------------------------

def _errno_of(c: FuseClient, u: int) -> int:
    return c.wait(u, timeout=5).error


def test_short_fuse_headers_are_dropped(h):
    q = h.fe.queues[1]
    for parts in ([b"\x01" * 20], [b"\x00" * 10, b"\xff" * 29], [getattr_request()[:39]]):
        w = _w(h)
        head = q.add_chain(parts, [(w.gpa, 120)], indirect=False)
        q.kick()
        comp, _ = wait_used(q, head)
        assert comp.length == 0
        assert w.read() == bytes(120)
    h.serving(1, 2)
    h.d.wait_log("shorter than a FUSE header")


@pytest.mark.parametrize("hdr_len", [0, 1, 39, 40, 55, 57, 4096, 2**31, 2**32 - 1])
def test_header_len_disagreeing_with_the_chain(h, hdr_len):
    """GETATTR carries 56 bytes; a header claiming fewer than its arguments or more than
    the chain holds is EINVAL (with the request's unique), more bytes than claimed are
    ignored."""
    u = h.c.submit(Op.GETATTR, FUSE_ROOT_ID, [GETATTR_BODY], [F.ATTR_OUT_SIZE],
                   hdr_len=hdr_len)
    r = h.c.wait(u, timeout=5)
    if hdr_len == 56:
        assert r.error == 0
    else:
        assert r.error == errno.EINVAL, (hdr_len, r)
    # trailing bytes beyond len are ignored
    u = h.c.submit(Op.GETATTR, FUSE_ROOT_ID, [GETATTR_BODY, b"\xee" * 100], [F.ATTR_OUT_SIZE],
                   hdr_len=56)
    assert h.c.wait(u).error == 0
    h.serving(1, 2)


@pytest.mark.parametrize("opcode", [0, 7, 19, 54, 99, 4095, 2**31, 2**32 - 1])
def test_unknown_opcodes_get_enosys(h, opcode):
    r = h.c.raw_request(opcode, FUSE_ROOT_ID, b"\x00" * 64)
    assert r.error == errno.ENOSYS
    h.serving(1, 2)


def test_requests_before_init(daemon):
    c = daemon.client(init=False)
    assert c.raw_request(Op.GETATTR, FUSE_ROOT_ID, GETATTR_BODY).error == errno.EIO
    assert c.raw_request(12345, FUSE_ROOT_ID, b"").error == errno.ENOSYS
    c.init()
    assert c.getattr(FUSE_ROOT_ID)


def test_bogus_and_forgotten_node_ids_and_handles(h):
    c = h.c
    shared = Path(h.d.shared_dir)
    (shared / "f").write_bytes(b"0123456789")
    (shared / "d").mkdir()
    nid = c.lookup(FUSE_ROOT_ID, "f").nodeid
    fh = c.open(nid).fh
    dnid = c.lookup(FUSE_ROOT_ID, "d").nodeid
    dfh = c.opendir(dnid).fh
    bad = (errno.EBADF, errno.ENOENT)
    for node in (0, 0xDEADBEEF, 2**64 - 1):
        for fn in (lambda: c.getattr(node), lambda: c.lookup(node, "f"),
                   lambda: c.mkdir(node, "x"), lambda: c.opendir(node),
                   lambda: c.open(node), lambda: c.statfs(node),
                   lambda: c.listxattr(node), lambda: c.readlink(node)):
            with pytest.raises(FuseError) as ei:
                fn()
            assert ei.value.errno in bad, (node, ei.value)
    for handle in (0, 999, 2**64 - 1):
        for fn in (lambda: c.read(nid, handle, 0, 10), lambda: c.write(nid, handle, 0, b"x"),
                   lambda: c.fsync(nid, handle), lambda: c.readdir(dnid, handle),
                   lambda: c.lseek(nid, handle, 0, os.SEEK_END),
                   lambda: c.fallocate(nid, handle, 0, 10),
                   lambda: c.setlk(nid, handle, 1, flock=True)):
            with pytest.raises(FuseError) as ei:
                fn()
            assert ei.value.errno in bad, (handle, ei.value)
    # a handle of one kind used as another: an error, not a crash
    with pytest.raises(FuseError):
        c.read(nid, dfh, 0, 10)
    with pytest.raises(FuseError):
        c.readdir(dnid, fh)
    # released handles and forgotten node ids are gone
    c.release(nid, fh)
    with pytest.raises(FuseError) as ei:
        c.read(nid, fh, 0, 10)
    assert ei.value.errno in bad
    c.release(nid, fh)                       # twice: harmless
    c.forget(nid, 1)
    with pytest.raises(FuseError) as ei:
        c.getattr(nid)
    assert ei.value.errno in bad
    with pytest.raises(FuseError) as ei:
        c.open(nid)
    assert ei.value.errno in bad
    c.forget(0xDEADBEEF, 7)
    c.forget(FUSE_ROOT_ID, 2**64 - 1)        # the root is never forgotten
    c.batch_forget([(dnid, 1), (dnid, 1), (FUSE_ROOT_ID, 5)])
    h.serving(1, 2)


def test_names_with_slash_or_without_nul(h, tmp_path):
    c = h.c
    shared = Path(h.d.shared_dir)
    (shared / "sub").mkdir()
    before_outside = sorted(os.listdir(tmp_path))
    sub = c.lookup(FUSE_ROOT_ID, "sub").nodeid
    for name in (b"a/b", b"/etc", b"../x", b"..//x", b"sub/../../x", b"/"):
        for fn in (lambda: c.lookup(FUSE_ROOT_ID, name), lambda: c.mkdir(sub, name),
                   lambda: c.create(sub, name), lambda: c.symlink(sub, name, b"t"),
                   lambda: c.mknod(sub, name, stat.S_IFREG | 0o644),
                   lambda: c.rename(sub, b"x", FUSE_ROOT_ID, name),
                   lambda: c.link(sub, FUSE_ROOT_ID, name), lambda: c.unlink(sub, name)):
            with pytest.raises(FuseError) as ei:
                fn()
            assert ei.value.errno in (errno.EINVAL, errno.ENOENT, errno.EPERM), (name, ei.value)
    for name in (b"", b"x" * 256):
        with pytest.raises(FuseError) as ei:
            c.mkdir(sub, name)
        assert ei.value.errno in (errno.EINVAL, errno.ENAMETOOLONG, errno.ENOENT)
    # names without their NUL, and name arguments of the wrong count
    for op, nodeid, args in ((Op.LOOKUP, FUSE_ROOT_ID, [b"sub"]),
                             (Op.MKDIR, sub, [F.MKDIR_IN.pack(0o755, 0), b"noterm"]),
                             (Op.UNLINK, sub, [b"x" * 5000]),
                             (Op.RENAME, sub, [F.RENAME_IN.pack(sub), b"a\0b"]),
                             (Op.SYMLINK, sub, [b"only-one\0"]),
                             (Op.GETXATTR, sub, [F.GETXATTR_IN.pack(100, 0), b"user.x"]),
                             (Op.REMOVEXATTR, sub, [b"user.x"])):
        u = c.submit(op, nodeid, args, [F.ENTRY_OUT_SIZE])
        assert c.wait(u).error in (errno.EINVAL, errno.ENAMETOOLONG, errno.ENOENT), op
    # '..' of the share's root is the root itself
    root_ino = c.getattr(FUSE_ROOT_ID).attr.ino
    assert c.lookup(FUSE_ROOT_ID, "..").attr.ino == root_ino
    assert c.lookup(sub, "..").attr.ino == root_ino
    assert sorted(os.listdir(tmp_path)) == before_outside
    assert sorted(os.listdir(shared)) == ["sub"] and os.listdir(shared / "sub") == []
    h.serving(1, 2)


def test_batch_forget_count_larger_than_the_message(h):
    c = h.c
    (Path(h.d.shared_dir) / "f").write_bytes(b"x")
    nid = c.lookup(FUSE_ROOT_ID, "f").nodeid
    c.lookup(FUSE_ROOT_ID, "f")
    for count in (3, 1000, 2**32 - 1):
        body = F.BATCH_FORGET_IN.pack(count, 0) + F.FORGET_ONE.pack(nid, 1)
        c.wait(c.submit(Op.BATCH_FORGET, 0, [body]))
        if count == 3:
            assert c.getattr(nid)             # one of two references dropped
    with pytest.raises(FuseError):
        c.getattr(nid)
    # bodies too short for their fixed part
    for op, body in ((Op.BATCH_FORGET, b"\x01\x00"), (Op.FORGET, b"\x01"), (Op.INTERRUPT, b"")):
        c.wait(c.submit(op, FUSE_ROOT_ID, [body] if body else []))
    h.d.wait_log("BATCH_FORGET claims")
    h.serving(1, 2)


def test_xattr_values_over_64k(h):
    c = h.c
    (Path(h.d.shared_dir) / "f").write_bytes(b"x")
    nid = c.lookup(FUSE_ROOT_ID, "f").nodeid
    big = b"v" * (64 * 1024 + 1)
    with pytest.raises(FuseError) as ei:
        c.setxattr(nid, "user.big", big)
    assert ei.value.errno == errno.E2BIG
    # a size field of 2^31 with a small value
    ext = bool(c.negotiated & F.FUSE_SETXATTR_EXT)
    head = (F.SETXATTR_IN.pack(2**31, 0, 0, 0) if ext else F.SETXATTR_IN_COMPAT.pack(2**31, 0))
    u = c.submit(Op.SETXATTR, nid, [head, b"user.a\0", b"small"])
    assert c.wait(u).error in (errno.E2BIG, errno.EINVAL)
    # a size field larger than the value carried
    head = (F.SETXATTR_IN.pack(100, 0, 0, 0) if ext else F.SETXATTR_IN_COMPAT.pack(100, 0))
    u = c.submit(Op.SETXATTR, nid, [head, b"user.a\0", b"small"])
    assert c.wait(u).error == errno.EINVAL
    c.setxattr(nid, "user.ok", b"v" * 1000)
    # asked with a huge size, answered with the value; asked with too small a size: ERANGE
    u = c.submit(Op.GETXATTR, nid, [F.GETXATTR_IN.pack(2**32 - 1, 0), b"user.ok\0"], [4096])
    r = c.wait(u).check()
    assert r.data == b"v" * 1000
    with pytest.raises(FuseError) as ei:
        c.getxattr(nid, "user.ok", 10)
    assert ei.value.errno == errno.ERANGE
    # the guest's buffer is smaller than the size it asked for
    g = h.buf(64)
    u = c.submit(Op.GETXATTR, nid, [F.GETXATTR_IN.pack(65536, 0), b"user.ok\0"],
                 [(g.gpa, 64)])
    assert c.wait(u).error == errno.ERANGE
    assert g.intact()
    u = c.submit(Op.LISTXATTR, nid, [F.GETXATTR_IN.pack(2**32 - 1, 0)], [4096])
    assert b"user.ok" in c.wait(u).check().data
    h.serving(1, 2)


def test_numbers_beyond_what_the_host_takes(h):
    """Offsets, sizes, modes, flags and lock ranges that no host system call can take
    (2^64-1 for an off_t, 2^32-1 for an int): EINVAL, not an internal error."""
    c = h.c
    (Path(h.d.shared_dir) / "f").write_bytes(b"x" * 100)
    nid = c.lookup(FUSE_ROOT_ID, "f").nodeid
    fh = c.open(nid, os.O_RDWR).fh
    dfh = c.opendir(FUSE_ROOT_ID).fh
    M, I = 2**64 - 1, 2**32 - 1

    def setattr(valid, fh_=0, size=0, mode=0, t=0):
        return F.SETATTR_IN.pack(valid, 0, fh_, size, 0, t, t, 0, 0, 0, 0, mode, 0, 0, 0, 0)

    cases = [
        (Op.LSEEK, nid, [F.LSEEK_IN.pack(fh, M, os.SEEK_SET, 0)], [8]),
        (Op.LSEEK, nid, [F.LSEEK_IN.pack(fh, 2**63, os.SEEK_DATA, 0)], [8]),
        (Op.GETLK, nid, [F.LK_IN.pack(fh, 1, M, M, fcntl.F_WRLCK, 0, 0, 0)], [24]),
        (Op.GETLK, nid, [F.LK_IN.pack(fh, 1, 0, 10, I, 0, 0, 0)], [24]),
        (Op.SETLK, nid, [F.LK_IN.pack(fh, 1, 2**63, M, fcntl.F_WRLCK, 0, 0, 0)], []),
        (Op.SETLK, nid, [F.LK_IN.pack(fh, 1, 100, 5, fcntl.F_RDLCK, 0, 0, 0)], []),
        (Op.COPY_FILE_RANGE, nid, [F.COPY_FILE_RANGE_IN.pack(fh, M, nid, fh, 0, 10, 0)], [8]),
        (Op.COPY_FILE_RANGE, nid, [F.COPY_FILE_RANGE_IN.pack(fh, 0, nid, fh, M, 10, 0)], [8]),
        (Op.SETATTR, nid, [setattr(F.FATTR_SIZE, size=M)], [F.ATTR_OUT_SIZE]),
        (Op.SETATTR, nid, [setattr(F.FATTR_SIZE | F.FATTR_FH, fh, size=M)], [F.ATTR_OUT_SIZE]),
        (Op.READDIR, FUSE_ROOT_ID, [F.READ_IN.pack(dfh, M, 4096, 0, 0, 0, 0)], [4096]),
        (Op.READDIRPLUS, FUSE_ROOT_ID, [F.READ_IN.pack(dfh, 2**63, 4096, 0, 0, 0, 0)], [4096]),
        (Op.MKNOD, FUSE_ROOT_ID, [F.MKNOD_IN.pack(I, I, 0, 0), b"n\0"], [F.ENTRY_OUT_SIZE]),
        (Op.CREATE, FUSE_ROOT_ID, [F.CREATE_IN.pack(I, I, 0, 0), b"c\0"],
         [F.ENTRY_OUT_SIZE, 16]),
        (Op.TMPFILE, FUSE_ROOT_ID, [F.CREATE_IN.pack(I, I, 0, 0), b"/\0"],
         [F.ENTRY_OUT_SIZE, 16]),
        (Op.OPEN, nid, [F.OPEN_IN.pack(I, 0)], [16]),
        (Op.SETXATTR, nid, [F.SETXATTR_IN.pack(1, I, 0, 0) if h.c.negotiated & F.FUSE_SETXATTR_EXT
                            else F.SETXATTR_IN_COMPAT.pack(1, I), b"user.a\0", b"v"], []),
        (Op.FALLOCATE, nid, [F.FALLOCATE_IN.pack(fh, M, 10, 0, 0)], []),
        (Op.FALLOCATE, nid, [F.FALLOCATE_IN.pack(fh, 0, M, 0, 0)], []),
    ]
    for op, node, args, outs in cases:
        r = c.wait(c.submit(op, node, args, outs), timeout=5)
        assert r.error in (errno.EINVAL, errno.EFBIG, errno.EOVERFLOW, errno.ENXIO), (op, r)
    assert "internal error" not in h.d.log()
    assert (Path(h.d.shared_dir) / "f").read_bytes() == b"x" * 100
    h.serving(1, 2)


def test_reply_buffers_too_small(h):
    """Writable space below the 16-byte out header: nothing is written, used length 0;
    exactly 16 bytes: the error (ERANGE) fits, the attributes do not."""
    q = h.fe.queues[1]
    for n in (1, 8, 15):
        w = _w(h, n)
        head = q.add_chain([getattr_request()], [(w.gpa, n)], indirect=False)
        q.kick()
        comp, _ = wait_used(q, head)
        assert comp.length == 0 and w.read() == bytes(n)
    w = _w(h, 16)
    head = q.add_chain([getattr_request(0x99)], [(w.gpa, 16)], indirect=False)
    q.kick()
    comp, _ = wait_used(q, head)
    assert comp.length == 16
    assert F.OUT_HEADER.unpack(w.read()) == (16, -errno.ERANGE, 0x99)
    h.serving(1, 2)


def test_decoder_copies_only_what_it_needs(tmp_path):
    """In-process: every opcode with 16 MiB of readable bytes behind its arguments; the
    server's Python allocations stay small (it reads arguments and names, takes write data
    as views into guest memory, and bounds what it copies by what it needs)."""
    import tracemalloc

    from pyvirtiofs.fuse import abi
    from pyvirtiofs.fuse.server import FuseServer
    from pyvirtiofs.passthrough import PassthroughFs
    from pyvirtiofs.virtqueue import DescriptorChain

    (tmp_path / "f").write_bytes(b"x" * 100)
    umask = os.umask(0o022)
    try:
        fs = PassthroughFs(str(tmp_path))
    finally:
        os.umask(umask)
    srv = FuseServer(fs)
    big = memoryview(bytearray(16 * MiB))

    def call(op, nodeid, body, tail=None):
        hdr = abi.IN_HEADER.pack(40 + len(body) + (len(tail) if tail else 0), op, 2, nodeid,
                                 0, 0, 0, 0, 0)
        readable = [memoryview(bytearray(hdr + body))] + ([tail] if tail else [])
        out = memoryview(bytearray(8192))
        return srv.serve_request(DescriptorChain(0, readable, [out]))

    init = abi.INIT_IN.pack(7, 38, 0, abi.INIT_EXT) + struct.pack("<I", 0)
    try:
        for op in Op:
            if op in (Op.INIT, Op.DESTROY):
                continue
            call(Op.INIT, 0, init)
            body = bytearray(_ARG.get(op, 0))
            if op == Op.BATCH_FORGET:
                struct.pack_into("<I", body, 0, 2**32 - 1)
            if op in (Op.SETXATTR, Op.GETXATTR):
                struct.pack_into("<I", body, 0, 10)
            body += b"f\0"
            tracemalloc.start()
            try:
                call(op, FUSE_ROOT_ID, bytes(body), big)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert peak < 2 * MiB, f"{op.name}: {peak >> 20} MiB allocated"
    finally:
        fs.close()


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_read_of_2g_is_clipped_to_the_buffer(h):
    c = h.c
    data = os.urandom(64 * 1024)
    (Path(h.d.shared_dir) / "f").write_bytes(data)
    nid = c.lookup(FUSE_ROOT_ID, "f").nodeid
    fh = c.open(nid).fh
    rss = _rss_kib(h.d.pid)
    for size in (2**31, 2**32 - 1):
        g = h.buf(4080)                     # the frontend adds the 16-byte out header
        u = c.submit(Op.READ, nid, [F.READ_IN.pack(fh, 0, size, 0, 0, 0, 0)],
                     [(g.gpa, 4080)])
        r = c.wait(u).check()
        assert r.used_len == 4096
        assert g.read() == data[:4080]
        assert g.intact()
        # READDIR too
        dfh = c.opendir(FUSE_ROOT_ID).fh
        g = h.buf(512)
        u = c.submit(Op.READDIR, FUSE_ROOT_ID, [F.READ_IN.pack(dfh, 0, size, 0, 0, 0, 0)],
                     [(g.gpa, 512)])
        assert c.wait(u).check().used_len <= 16 + 512
        assert g.intact()
    for off in (2**63, 2**64 - 1):
        assert c.wait(c.submit_read(nid, fh, off, 100)).error == errno.EINVAL
    # a WRITE claiming more bytes than it carries
    u = c.submit(Op.WRITE, nid, [F.WRITE_IN.pack(fh, 0, 2**31, 0, 0, 0, 0), b"tiny"],
                 [F.WRITE_OUT.size])
    assert c.wait(u).error == errno.EINVAL
    assert (Path(h.d.shared_dir) / "f").read_bytes() == data
    assert _rss_kib(h.d.pid) - rss < 64 * 1024, "the daemon allocated for the guest's size"
    h.serving(1, 2)


# ------------------------------------------------------------------------------------------
# vhost-user messages
# ------------------------------------------------------------------------------------------

def _refused(fe, request, payload=b"", fds=()):
    """Send with need_reply: the daemon must answer with a failure status."""
    with pytest.raises(VhostUserError):
        fe.conn.call(request, payload, fds, need_reply=True)


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _memfd(size: int) -> int:
    fd = os.memfd_create("hostile", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def _start_and_serve(fe) -> None:
    fe.start()
    c = FuseClient(fe)
    c.init()
    assert c.getattr(FUSE_ROOT_ID)


def test_wrong_payload_sizes(daemon):
    fe = daemon.frontend(start=False)
    efd = os.eventfd(0)
    mfd = _memfd(MiB)
    try:
        for req, payload, fds in (
                (Req.SET_FEATURES, b"\0" * 4, ()),
                (Req.SET_FEATURES, b"\0" * 16, ()),
                (Req.SET_PROTOCOL_FEATURES, b"\0" * 9, ()),
                (Req.SET_VRING_NUM, b"\0" * 4, ()),
                (Req.SET_VRING_NUM, b"\0" * 12, ()),
                (Req.SET_VRING_BASE, b"", ()),
                (Req.SET_VRING_ADDR, b"\0" * 8, ()),
                (Req.SET_VRING_ENABLE, b"\0" * 16, ()),
                (Req.SET_VRING_KICK, b"\0" * 4, (efd,)),
                (Req.SET_VRING_CALL, b"", (efd,)),
                (Req.SET_MEM_TABLE, b"\0" * 4, (mfd,)),
                (Req.SET_MEM_TABLE, MEM_HDR.pack(1, 0), (mfd,)),
                (Req.SET_MEM_TABLE, MEM_HDR.pack(1, 0) + MEM_REGION.pack(0, MiB, 0, 0) + b"x",
                 (mfd,)),
                (Req.ADD_MEM_REG, b"\0" * 32, (mfd,)),
                (Req.REM_MEM_REG, b"\0" * 48, (mfd,))):
            _refused(fe, req, payload, fds)
            daemon.wait_log(f"{req.name} refused")
        assert "Traceback" not in daemon.log()
        _start_and_serve(fe)
    finally:
        os.close(efd)
        os.close(mfd)


def test_missing_and_extra_fds(daemon):
    fe = daemon.frontend(start=False)
    pid = daemon.pid
    efds = [os.eventfd(0) for _ in range(3)]
    mfd = _memfd(MiB)
    try:
        _refused(fe, Req.SET_VRING_KICK, U64.pack(1))                   # no fd, no NOFD flag
        _refused(fe, Req.SET_VRING_CALL, U64.pack(1), efds[:2])          # two fds
        _refused(fe, Req.SET_VRING_ERR, U64.pack(1 | F.VRING_NOFD), efds[:1])  # fd and NOFD
        _refused(fe, Req.SET_VRING_KICK, U64.pack(1 | F.VRING_NOFD))     # polling: unsupported
        table = MEM_HDR.pack(1, 0) + MEM_REGION.pack(0x100000, MiB, 0x7F0000000000, 0)
        _refused(fe, Req.SET_MEM_TABLE, table)                           # no fd
        _refused(fe, Req.SET_MEM_TABLE, table, [mfd, mfd])               # two fds
        _refused(fe, Req.ADD_MEM_REG, SINGLE_REGION.pack(0, 0x100000, MiB, 0x7F0000000000, 0))
        # fds where none belong are closed, not kept: no leak after many of them
        fe.sync()
        before = _fd_count(pid)
        for _ in range(40):
            fe.conn.send(Req.GET_FEATURES, b"", efds)
            assert fe.conn.recv().request == Req.GET_FEATURES
            _refused(fe, Req.SET_VRING_NUM, VRING_STATE.pack(1, 3), efds)
        fe.sync()
        assert _fd_count(pid) <= before + 2
        _start_and_serve(fe)
    finally:
        for fd in efds + [mfd]:
            os.close(fd)


def test_more_fds_than_a_message_may_carry(daemon):
    fe = daemon.frontend(start=False)
    fds = [os.eventfd(0) for _ in range(40)]
    try:
        fe.conn.send(Req.GET_FEATURES, b"", fds)
        with pytest.raises((ConnectionError, OSError)):
            fe.conn.recv()
    finally:
        for fd in fds:
            os.close(fd)
    assert daemon.wait_exit(10) == 0
    assert "file descriptors" in daemon.log()


def test_bad_memory_tables(daemon, tmp_path):
    fe = daemon.frontend(start=False)
    fds = [_memfd(MiB) for _ in range(9)]
    empty = _memfd(0)
    ro_path = tmp_path / "ro"
    ro_path.write_bytes(b"\0" * MiB)
    ro = os.open(ro_path, os.O_RDONLY)
    r, w = os.pipe()
    efd = os.eventfd(0)
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    U = 0x7F0000000000

    def table(regions):
        return MEM_HDR.pack(len(regions), 0) + b"".join(MEM_REGION.pack(*x) for x in regions)

    try:
        nine = [(0x100000 * (i + 1) * 16, MiB, U + i * (1 << 32), 0) for i in range(9)]
        _refused(fe, Req.SET_MEM_TABLE, table(nine), fds)                          # > 8
        _refused(fe, Req.SET_MEM_TABLE, table([]), [])                            # 0
        _refused(fe, Req.SET_MEM_TABLE, table([(0x100000, MiB, U, 0),
                                               (0x180000, MiB, U + (1 << 32), 0)]), fds[:2])
        _refused(fe, Req.SET_MEM_TABLE, table([(0x100000, 0, U, 0)]), fds[:1])     # size 0
        _refused(fe, Req.SET_MEM_TABLE, table([(0x100000, 2 * MiB, U, 0)]), fds[:1])  # > file
        _refused(fe, Req.SET_MEM_TABLE, table([(0x100000, MiB, U, 4096)]), fds[:1])   # offset
        _refused(fe, Req.SET_MEM_TABLE, table([(0x100000, MiB, U, 2**63)]), fds[:1])
        _refused(fe, Req.SET_MEM_TABLE, table([(2**64 - 4096, MiB, U, 0)]), fds[:1])  # wraps
        _refused(fe, Req.SET_MEM_TABLE, table([(0x100000, 2**63, U, 0)]), fds[:1])
        _refused(fe, Req.SET_MEM_TABLE, table([(0x100000, MiB, U, 0)]), [empty])   # empty file
        for bad_fd in (ro, r, efd, dfd):
            _refused(fe, Req.SET_MEM_TABLE, table([(0x100000, 4096, U, 0)]), [bad_fd])
        # the ADD_MEM_REG path: overlapping an existing region, or with a bad fd
        fe.conn.call(Req.ADD_MEM_REG, SINGLE_REGION.pack(0, 0x100000, MiB, U, 0), fds[:1],
                     need_reply=True)
        _refused(fe, Req.ADD_MEM_REG, SINGLE_REGION.pack(0, 0x180000, MiB, U + (1 << 32), 0),
                 fds[1:2])
        _refused(fe, Req.ADD_MEM_REG, SINGLE_REGION.pack(0, 0x80000, MiB, U + (1 << 33), 0),
                 fds[1:2])
        _refused(fe, Req.ADD_MEM_REG, SINGLE_REGION.pack(0, 0x400000, MiB, U, 0), [efd])
        _refused(fe, Req.REM_MEM_REG, SINGLE_REGION.pack(0, 0x900000, MiB, U, 0), fds[1:2])
        fe.conn.call(Req.REM_MEM_REG, SINGLE_REGION.pack(0, 0x100000, MiB, U, 0), fds[:1],
                     need_reply=True)
        assert "Traceback" not in daemon.log()
        _start_and_serve(fe)
    finally:
        for fd in fds + [empty, ro, r, w, efd, dfd]:
            os.close(fd)


def test_rings_outside_memory(daemon):
    fe = daemon.frontend(start=False)
    ram = fe.ram
    r0 = ram.regions[0]
    fe.set_mem_table()
    u = r0.uaddr
    # SET_VRING_ADDR before SET_VRING_NUM: no size yet
    _refused(fe, Req.SET_VRING_ADDR, VRING_ADDR.pack(1, 0, u, u + 8192, u + 4096, 0))
    fe.conn.call(Req.SET_VRING_NUM, VRING_STATE.pack(1, 256), need_reply=True)
    for desc, used, avail in ((u - 4096, u + 8192, u + 4096),          # below the region
                              (u, u + 8192, 0x1000),                    # nowhere
                              (u, u + r0.size - 100, u + 4096),        # runs off the end
                              (u + r0.size - 16, u + 8192, u + 4096),  # table runs off
                              (u + 8, u + 8192, u + 4096),              # misaligned
                              (u, u + 8194, u + 4096),
                              (u, u + 8192, u + 4097),
                              (2**64 - 16, u + 8192, u + 4096)):
        _refused(fe, Req.SET_VRING_ADDR, VRING_ADDR.pack(1, 0, desc, used, avail, 0))
    _refused(fe, Req.SET_VRING_ADDR, VRING_ADDR.pack(5000, 0, u, u + 8192, u + 4096, 0))
    for idx, num in ((1, 0), (1, 3), (1, 65536), (1, 2**31), (300, 128), (2**32 - 1, 128)):
        _refused(fe, Req.SET_VRING_NUM, VRING_STATE.pack(idx, num))
    _refused(fe, Req.SET_VRING_BASE, VRING_STATE.pack(1, 70000))
    _refused(fe, Req.SET_VRING_ENABLE, VRING_STATE.pack(1, 2))
    _refused(fe, Req.SET_FEATURES, U64.pack(fe.backend_features | (1 << 34)))  # packed
    _start_and_serve(fe)


@pytest.mark.parametrize("fd_kind", ["regular file", "pipe with no writer", "socket"])
def test_kick_fd_that_is_not_an_eventfd(daemon, fd_kind, tmp_path):
    """The kick fd must be an eventfd; anything else is refused, or the queue stops with a
    clear log line - never a traceback or a busy loop."""
    c = daemon.client(num_request_queues=2)
    fe = c.fe
    if fd_kind == "regular file":
        p = tmp_path / "kick"
        p.write_bytes(b"")
        bad = os.open(p, os.O_RDWR)
        keep = None
    elif fd_kind == "pipe with no writer":
        bad, keep = os.pipe()
        os.close(keep)
        keep = None
    else:
        a, b = socket.socketpair()
        bad, keep = a.detach(), b
    try:
        try:
            fe.call(Req.SET_VRING_KICK, U64.pack(1), [bad], need_reply=True)
        except VhostUserError:
            pass                                   # refused: fine
        if fd_kind != "socket":                # always readable: the queue must stop
            daemon.wait_log("the kick fd is not a readable eventfd")
        time.sleep(0.2)
        c.wait(c.submit(Op.GETATTR, FUSE_ROOT_ID, [GETATTR_BODY], [F.ATTR_OUT_SIZE],
                        queue=2)).check()
        assert "Traceback" not in daemon.log()
        # not busy-looping: the daemon's CPU time stays low over half a second
        t0 = _cpu_seconds(daemon.pid)
        time.sleep(0.5)
        assert _cpu_seconds(daemon.pid) - t0 < 0.25
    finally:
        os.close(bad)
        if keep is not None:
            keep.close()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_requests_before_set_owner(daemon):
    conn = daemon.connection()
    conn.get_u64(Req.GET_FEATURES)
    conn.get_u64(Req.GET_PROTOCOL_FEATURES)
    conn.set_u64(Req.SET_PROTOCOL_FEATURES, 1 << ProtoFeature.REPLY_ACK, need_reply=True)
    mfd = _memfd(MiB)
    efd = os.eventfd(0)
    table = MEM_HDR.pack(1, 0) + MEM_REGION.pack(0x100000, MiB, 0x7F0000000000, 0)
    try:
        for req, payload, fds in ((Req.SET_MEM_TABLE, table, [mfd]),
                                  (Req.SET_VRING_NUM, VRING_STATE.pack(0, 128), []),
                                  (Req.SET_VRING_KICK, U64.pack(0), [efd]),
                                  (Req.SET_FEATURES, U64.pack(1 << 32), [])):
            with pytest.raises(VhostUserError):
                conn.call(req, payload, fds, need_reply=True)
            daemon.wait_log(f"{req.name} before SET_OWNER")
        conn.call(Req.SET_OWNER, need_reply=True)
        conn.call(Req.SET_MEM_TABLE, table, [mfd], need_reply=True)
        conn.call(Req.SET_VRING_NUM, VRING_STATE.pack(0, 128), need_reply=True)
    finally:
        os.close(mfd)
        os.close(efd)
        conn.close()
    assert daemon.wait_exit(10) == 0


@pytest.mark.parametrize("header", [
    (Req.SET_MEM_TABLE, 0x1, 2**31),               # a payload size of 2^31
    (Req.SET_MEM_TABLE, 0x1, 2**32 - 1),
    (Req.GET_FEATURES, 0x1, 4096 + 64),            # larger than any valid message
    (Req.GET_FEATURES, 0x2, 0),                    # unknown protocol version
    (Req.GET_FEATURES, 0x0, 0),
])
def test_unframeable_message_disconnects_cleanly(daemon, header):
    fe = daemon.frontend(start=False)
    req, flags, size = header
    fe.conn.send_raw(VhostUserConnection.encode(req, b"", flags=flags, size=size) + b"\0" * 64)
    with pytest.raises((ConnectionError, OSError)):
        fe.conn.recv()                          # the daemon hangs up instead of waiting
    assert daemon.wait_exit(10) == 0
    assert "closing the connection" in daemon.log()


def test_unknown_and_unsupported_requests(daemon):
    fe = daemon.frontend(start=False)
    for req in (0, 99, 2**31, Req.SEND_RARP, Req.SET_LOG_BASE + 100, Req.SET_VRING_ENDIAN,
                Req.SET_CONFIG, Req.POSTCOPY_END):
        _refused(fe, req, b"\0" * 8)
    daemon.wait_log("unsupported request 99")
    # a request whose sender waits for a payload we cannot give: hang up, never hang
    fe.conn.send(Req.GET_CONFIG, b"\0" * 12)
    with pytest.raises((ConnectionError, OSError)):
        fe.conn.recv()
    assert daemon.wait_exit(10) == 0


def test_get_vring_base_with_a_bad_payload_hangs_up(daemon):
    fe = daemon.frontend(start=False)
    fe.conn.send(Req.GET_VRING_BASE, b"\0" * 3)
    with pytest.raises((ConnectionError, OSError)):
        fe.conn.recv()
    assert daemon.wait_exit(10) == 0


# ------------------------------------------------------------------------------------------
# Property-based: random chains and random FUSE messages against one daemon
# ------------------------------------------------------------------------------------------

ARENA = 64 * 1024


class Fuzzed:
    """One daemon for the whole module; an arena of guest RAM at the very end of region 1
    (so any length that runs past it runs past guest RAM), canaries below it and in
    region 0."""

    def __init__(self, tmp_path_factory):
        shared = tmp_path_factory.mktemp("fuzzshared")
        (shared / "file").write_bytes(os.urandom(10000))
        (shared / "dir").mkdir()
        self.d = Daemon(shared).start()
        self.ram = GuestRam(8 * MiB, gpa_base=0x100000, regions=2, region_gap=GAP,
                            mmap_offset=4096, policy="first")
        self.r0, self.r1 = self.ram.regions
        self.low = Guarded(self.ram, self.r1.size - ARENA - 512, region=1, canary=256,
                           fill=0x77)
        self.low_bytes = b"\x77" * self.low.size
        self.arena = self.r1.end - ARENA
        assert self.low.gpa + self.low.size + 256 == self.arena
        self.guards = [Guarded(self.ram, 4096) for _ in range(4)]
        self.fe = self.d.frontend(ram=self.ram, num_request_queues=2)
        for q in self.fe.queues:
            self.fe._vring_fd(Req.SET_VRING_ERR, q.index, q.err_fd)
        self.c = FuseClient(self.fe)
        self.c.init()
        self.file = self.c.lookup(FUSE_ROOT_ID, "file").nodeid
        self.dir = self.c.lookup(FUSE_ROOT_ID, "dir").nodeid
        self.fh = self.c.open(self.file, os.O_RDWR).fh
        self.dfh = self.c.opendir(self.dir).fh

    def intact(self) -> bool:
        return (all(g.intact() for g in self.guards) and self.low.intact()
                and self.ram.read(self.low.gpa, self.low.size) == self.low_bytes
                and poison_intact(self.ram))

    def refresh(self) -> None:
        """Fresh references to the test file and directory (a random FORGET or RELEASE may
        have dropped the old ones), so that random requests keep reaching the file system."""
        for nid, fh, op in ((self.file, self.fh, Op.RELEASE), (self.dir, self.dfh, Op.RELEASEDIR)):
            self.c.wait(self.c.submit(op, nid, [F.RELEASE_IN.pack(fh, 0, 0, 0)]))
        self.file = self.c.lookup(FUSE_ROOT_ID, "file").nodeid
        self.dir = self.c.lookup(FUSE_ROOT_ID, "dir").nodeid
        self.fh = self.c.open(self.file, os.O_RDWR).fh
        self.dfh = self.c.opendir(self.dir).fh

    def still_serving(self) -> None:
        for qi in (1, 2):
            u = self.c.submit(Op.GETATTR, FUSE_ROOT_ID, [GETATTR_BODY], [F.ATTR_OUT_SIZE],
                              queue=qi)
            r = self.c.wait(u, timeout=5)
            if r.error == errno.EIO:            # a random DESTROY ended the session
                self.c.init()
                u = self.c.submit(Op.GETATTR, FUSE_ROOT_ID, [GETATTR_BODY],
                                  [F.ATTR_OUT_SIZE], queue=qi)
                r = self.c.wait(u, timeout=5)
            assert r.error == 0, r
        for q in self.fe.queues:
            assert not q.error_signalled()
        self.d.check_log()
        assert self.d.alive()


@pytest.fixture(scope="module")
def fz(tmp_path_factory):
    f = Fuzzed(tmp_path_factory)
    yield f
    try:
        assert f.intact()
        f.d.finish()
    finally:
        f.ram.close()


def _outside(r0, r1):
    return st.one_of(
        st.sampled_from([0, 0x1000, 0xFFFFF, r0.end, r0.end + 4096, r0.end + GAP // 2,
                         r1.gpa - 1, r1.end, r1.end + 1, 2**63, 2**64 - 1, 2**64 - 16]),
        st.integers(r1.end, 2**64 - 1), st.integers(0, 0xFFFFF))


_LENS = st.one_of(st.just(0), st.integers(1, 64), st.integers(1, ARENA),
                  st.sampled_from([16, 40, 56, 120, 2**31, 2**32 - 1, 0xFFFFFFF0]))
_FLAGS = st.one_of(st.sampled_from([0, W, NEXT, W | NEXT, IND, IND | NEXT, IND | W]),
                   st.integers(0, 0xFFFF))


@st.composite
def random_descriptors(draw, fz_layout, depth=0):
    """Anything: random addresses (in the arena or outside guest RAM), lengths, flags and
    next fields, indirect tables of the same."""
    r0, r1, arena = fz_layout
    n = draw(st.integers(1, 6))
    out = []
    for i in range(n):
        if draw(st.integers(0, 3)):
            addr = draw(st.integers(arena, arena + ARENA - 1))
        else:
            addr = draw(_outside(r0, r1))
        length = draw(_LENS)
        flags = draw(_FLAGS)
        if draw(st.integers(0, 4)) == 0:
            nxt = ("slot", draw(st.integers(0, 200)))
        else:
            nxt = i + 1 if i + 1 < n else None
            if nxt is None:
                flags &= ~NEXT
        table = None
        if flags & IND and depth == 0 and draw(st.booleans()):
            table = draw(descriptors(fz_layout, depth=1))
            length = draw(st.sampled_from([16 * len(table), 16 * len(table) + 8, 0]))
        out.append((addr, length, flags, nxt, table))
    return out


@st.composite
def almost_valid_descriptors(draw, fz_layout, depth=0):
    """A well-formed request (the 56-byte GETATTR at the arena's start, split in 1-3
    readable buffers, then 1-4 writable buffers in the arena), with one field of one
    descriptor replaced by something hostile - or nothing replaced."""
    r0, r1, arena = fz_layout
    cuts = sorted(draw(st.lists(st.integers(1, 55), max_size=2, unique=True)))
    bounds = [0, *cuts, 56]
    out = [(arena + a, b - a, 0) for a, b in zip(bounds, bounds[1:])]
    pos = 1024
    for _ in range(draw(st.integers(1, 4))):
        n = draw(st.sampled_from([0, 1, 16, 50, 104, 120, 4096]))
        out.append((arena + pos, n, W))
        pos += n
    chain = [(a, n, f, i + 1 if i + 1 < len(out) else None, None)
             for i, (a, n, f) in enumerate(out)]
    if draw(st.integers(0, 5)):
        i = draw(st.integers(0, len(chain) - 1))
        a, n, f, nxt, t = chain[i]
        what = draw(st.sampled_from(["addr", "len", "flags", "next", "indirect"]))
        if what == "addr":
            a = draw(st.one_of(_outside(r0, r1), st.integers(arena, arena + ARENA - 1)))
        elif what == "len":
            n = draw(_LENS)
        elif what == "flags":
            f = draw(_FLAGS)
        elif what == "next":
            nxt = ("slot", draw(st.integers(0, 200)))
        elif depth == 0:                       # the whole chain behind one indirect entry
            table = draw(almost_valid_descriptors(fz_layout, depth=1))
            return [(arena, draw(st.sampled_from([16 * len(table), 32, 16, 8])),
                     draw(st.sampled_from([IND, IND | NEXT, IND | W])), None, table)]
        chain[i] = (a, n, f, nxt, t)
    return chain


def descriptors(fz_layout, depth=0):
    return st.one_of(random_descriptors(fz_layout, depth),
                     almost_valid_descriptors(fz_layout, depth))


def _write_table(fz, pos: int, entries) -> int:
    """Write an indirect table in the arena at pos; next fields given as positions."""
    gpa = fz.arena + pos
    data = b""
    for i, (a, n, f, nxt, _t) in enumerate(entries):
        x = nxt[1] if isinstance(nxt, tuple) else (nxt or 0)
        if isinstance(nxt, int):
            f |= NEXT
        data += DESC.pack(a, n & 0xFFFFFFFF, f, x & 0xFFFF)
    fz.ram.write(gpa, data[:ARENA - pos])
    return gpa


# Bounded and reproducible for CI; PYVIRTIOFS_HYPOTHESIS_EXAMPLES=5000 explores further
# (with fresh random draws each run).
_EXAMPLES = int(os.environ.get("PYVIRTIOFS_HYPOTHESIS_EXAMPLES", "0"))
_SETTINGS = settings(max_examples=_EXAMPLES or 80, deadline=None, derandomize=not _EXAMPLES,
                     database=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@_SETTINGS
@given(data=st.data())
def test_random_descriptor_chains(fz, data):
    layout = (fz.r0, fz.r1, fz.arena)
    chain = data.draw(descriptors(layout))
    content = data.draw(st.sampled_from(["zeros", "getattr", "getattr", "random"]))
    if content == "zeros":
        fz.ram.fill(fz.arena, ARENA, 0)
    elif content == "getattr":
        fz.ram.fill(fz.arena, ARENA, 0)
        fz.ram.write(fz.arena, getattr_request(0x5151))
    else:
        fz.ram.write(fz.arena, data.draw(st.binary(min_size=64, max_size=64)) * (ARENA // 64))
    q = fz.fe.queues[1]
    for i in q._free:                         # no stale descriptors to wander into
        q.write_desc(i, 0, 0, 0, 0)
    # indirect tables go to the top of the arena (the daemon may overwrite them: fine)
    pos = ARENA - 2048
    descs = []
    for addr, length, flags, nxt, table in chain:
        if table is not None:
            addr = _write_table(fz, pos, table)
            pos += 256
        descs.append((addr, length, flags, nxt))
    head, slots = put_chain(q, descs)
    q.add_raw(head)
    q.kick(force=True)
    try:
        comp, others = wait_used(q, head, timeout=5)
        assert not others
    finally:
        q.put_desc(slots)
    assert comp.length <= ARENA
    event("answered" if comp.length else "returned unused")
    assert fz.intact()
    fz.still_serving()


_OPCODES = st.one_of(st.sampled_from([int(o) for o in Op]),
                     st.sampled_from([int(o) for o in Op]), st.integers(0, 2**32 - 1))
_NOREPLY = {int(Op.FORGET), int(Op.BATCH_FORGET), int(Op.INTERRUPT)}
# Size of each opcode's fixed argument struct; those that start with a file handle.
_ARG = {Op.INIT: 64, Op.GETATTR: 16, Op.SETATTR: 88, Op.MKNOD: 16, Op.MKDIR: 8, Op.RENAME: 8,
        Op.RENAME2: 16, Op.LINK: 8, Op.OPEN: 8, Op.CREATE: 16, Op.TMPFILE: 16, Op.READ: 40,
        Op.WRITE: 40, Op.RELEASE: 24, Op.RELEASEDIR: 24, Op.FLUSH: 24, Op.FSYNC: 16,
        Op.FSYNCDIR: 16, Op.SETXATTR: 16, Op.GETXATTR: 8, Op.LISTXATTR: 8, Op.OPENDIR: 8,
        Op.READDIR: 40, Op.READDIRPLUS: 40, Op.GETLK: 48, Op.SETLK: 48, Op.SETLKW: 48,
        Op.ACCESS: 8, Op.INTERRUPT: 8, Op.FORGET: 8, Op.BATCH_FORGET: 8, Op.FALLOCATE: 32,
        Op.LSEEK: 24, Op.COPY_FILE_RANGE: 56, Op.SYNCFS: 8}
_FH_FIRST = {Op.READ, Op.WRITE, Op.RELEASE, Op.RELEASEDIR, Op.FLUSH, Op.FSYNC, Op.FSYNCDIR,
             Op.READDIR, Op.READDIRPLUS, Op.GETLK, Op.SETLK, Op.SETLKW, Op.FALLOCATE,
             Op.LSEEK, Op.COPY_FILE_RANGE}
_NAMES = st.sampled_from([b"file\0", b"dir\0", b"new\0", b"a\0b\0", b"..\0", b".\0",
                          b"a/b\0", b"\0", b"noterm", b"user.x\0", b"n" * 300 + b"\0"])


@st.composite
def fuse_bodies(draw, opcode, fz):
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=300))
    size = _ARG.get(opcode, draw(st.integers(0, 64)))
    args = bytearray(draw(st.binary(min_size=size, max_size=size)))
    if opcode in _FH_FIRST and draw(st.integers(0, 3)):
        struct.pack_into("<Q", args, 0, draw(st.sampled_from([fz.fh, fz.dfh, 0, 2**64 - 1])))
    if opcode in (Op.READ, Op.WRITE, Op.READDIR, Op.READDIRPLUS, Op.LSEEK, Op.FALLOCATE) \
            and draw(st.booleans()):
        struct.pack_into("<Q", args, 8, draw(st.integers(0, 20000)))
    if opcode in (Op.READ, Op.WRITE, Op.READDIR, Op.READDIRPLUS) and draw(st.booleans()):
        struct.pack_into("<I", args, 16, draw(st.integers(0, 8192)))
    if opcode == Op.FALLOCATE:
        # keep the length small: a real preallocation of random size would fill the host
        # disk, which is not what this test is about
        struct.pack_into("<Q", args, 16, struct.unpack_from("<Q", args, 16)[0] & 0xFFFF)
    tail = b"".join(draw(st.lists(_NAMES, max_size=2)))
    return bytes(args) + tail + draw(st.binary(max_size=64))


@_SETTINGS
@given(data=st.data())
def test_random_fuse_messages(fz, data):
    c = fz.c
    fz.refresh()
    opcode = data.draw(_OPCODES, label="opcode")
    nodeid = data.draw(st.one_of(st.sampled_from([1, fz.file, fz.dir]),
                                 st.sampled_from([0, 1, fz.file, fz.dir, 2**64 - 1]),
                                 st.integers(0, 2**64 - 1)), label="nodeid")
    body = data.draw(fuse_bodies(opcode, fz), label="body")
    reply = data.draw(st.one_of(st.integers(0, 256), st.integers(0, 8192)), label="reply")
    hdr_len = data.draw(st.one_of(st.none(), st.none(), st.integers(0, 2**32 - 1)),
                        label="hdr_len")
    uid = data.draw(st.sampled_from([0, os.getuid(), 1000, 2**32 - 1]), label="uid")
    noreply = opcode in _NOREPLY
    u = c.submit(opcode, nodeid, [body] if body else [], [] if noreply else [reply],
                 hdr_len=hdr_len, uid=uid, gid=uid, noreply=noreply)
    try:
        r = c.wait(u, timeout=2)
    except TimeoutError:
        # only a SETLKW may legitimately wait (for a lock it cannot get): interrupt it
        assert opcode == Op.SETLKW, f"opcode {opcode} got no reply"
        c.interrupt(u)
        r = c.wait(u, timeout=5)
        assert r.error == errno.EINTR
    if not noreply:
        assert r.used_len >= 16
        event("ok" if r.error == 0 else f"errno {errno.errorcode.get(r.error, r.error)}")
    assert fz.intact()
    fz.still_serving()

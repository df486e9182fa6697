"""The DAX window (``--dax-window``) of the real pyvirtiofsd process, through the project's
frontend playing a QEMU with the vhost-user SHMEM series (it reserves region 0, maps the fds
it receives and enforces the SHMEM rules) and a guest: raw FUSE_SETUPMAPPING /
FUSE_REMOVEMAPPING requests, and :class:`DaxDriver`, which behaves like Linux's fs/fuse/dax.c.

What the frontend holds after each request is checked (which file, which file offset, read-only
or read-write), and bytes are compared with the host file through the window itself.
"""

from __future__ import annotations

import errno
import os
import random
import stat
import time
from pathlib import Path

import pytest

from pyvirtiofs.testing import frontend as F
from pyvirtiofs.testing.frontend import (
    FUSE_ROOT_ID, BackendReq, DaxDriver, FrontendError, FuseError, Op, ProtoFeature, Req,
)

PAGE = 4096
MiB = 1 << 20
R, W = F.FUSE_SETUPMAPPING_FLAG_READ, F.FUSE_SETUPMAPPING_FLAG_WRITE
NO_FH = F.NO_FH
DAX_INIT = F.LINUX_6_1_INIT_FLAGS | F.FUSE_MAP_ALIGNMENT | F.FUSE_HAS_INODE_DAX


def pattern(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


class Dax:
    """A daemon with a DAX window, a frontend with SHMEM and an INITed client."""

    def __init__(self, start_daemon, window="16M", extra=(), init_flags=DAX_INIT, **fe_kw):
        self.d = start_daemon(extra_args=(f"--dax-window={window}", *extra))
        self.shared = Path(self.d.shared_dir)
        fe_kw.setdefault("shmem", True)
        self.c = self.d.client(init=False, **fe_kw)
        self.fe = self.c.fe
        self.init = self.c.init(flags=init_flags)
        self.win = self.fe.shmem_regions[0] if self.fe.shmem_regions else None

    def file(self, name: str, data: bytes):
        (self.shared / name).write_bytes(data)
        return self.c.lookup(FUSE_ROOT_ID, name)

    def maps(self):
        """The frontend's mappings as (offset, length, file offset, writable, inode)."""
        return [(m.offset, m.length, m.fd_offset, m.writable, m.ino)
                for m in self.win.mappings()]

    def ino(self, name: str) -> int:
        return os.stat(self.shared / name).st_ino

    def daemon_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.d.pid}/fd"))

    def setup(self, nodeid, foffset, length, moffset, flags=R, fh=NO_FH):
        self.c.setupmapping(nodeid, fh, foffset, length, flags, moffset)

    def remove(self, *ranges, nodeid=FUSE_ROOT_ID):
        self.c.removemapping(nodeid, list(ranges))

    def errno_of(self, fn, *a, **kw) -> int:
        with pytest.raises(FuseError) as ei:
            fn(*a, **kw)
        return ei.value.errno


@pytest.fixture
def dax(start_daemon):
    return Dax(start_daemon)


# ------------------------------------------------------------------------------------------
# Negotiation
# ------------------------------------------------------------------------------------------

def test_window_offered_and_negotiated(dax):
    """SHMEM (with BACKEND_REQ and REPLY_ACK) is offered, GET_SHMEM_CONFIG answers region 0
    of the window's size, and INIT negotiates MAP_ALIGNMENT (4 KiB) and HAS_INODE_DAX."""
    for b in (ProtoFeature.SHMEM, ProtoFeature.BACKEND_REQ, ProtoFeature.REPLY_ACK):
        assert dax.fe.has_protocol(b), b.name
    assert Req.GET_SHMEM_CONFIG in dax.fe.conn.sent
    assert [(r.shmid, r.size) for r in dax.fe.shmem_regions] == [(0, 16 * MiB)]
    assert dax.init.flags & F.FUSE_MAP_ALIGNMENT and dax.init.map_alignment == 12
    assert dax.init.flags & F.FUSE_HAS_INODE_DAX


def test_no_window_by_default(daemon):
    """Without --dax-window: no SHMEM offered, no MAP_ALIGNMENT, SETUPMAPPING is ENOSYS."""
    c = daemon.client(init=False, shmem=True)
    assert not c.fe.backend_protocol_features & (1 << ProtoFeature.SHMEM)
    assert c.fe.shmem_regions == []
    out = c.init(flags=DAX_INIT)
    assert not out.flags & (F.FUSE_MAP_ALIGNMENT | F.FUSE_HAS_INODE_DAX)
    assert out.map_alignment == 0
    with pytest.raises(FuseError) as ei:
        c.setupmapping(FUSE_ROOT_ID, NO_FH, 0, PAGE, R, 0)
    assert ei.value.errno == errno.ENOSYS


def test_frontend_without_shmem(start_daemon):
    """A QEMU without SHMEM (7.2) talks to a daemon with a window: the guest is offered no
    MAP_ALIGNMENT and no per-inode DAX, everything else works, and SETUPMAPPING answers
    EOPNOTSUPP."""
    dx = Dax(start_daemon, shmem=False)
    assert dx.win is None
    assert not dx.init.flags & (F.FUSE_MAP_ALIGNMENT | F.FUSE_HAS_INODE_DAX)
    assert dx.init.map_alignment == 0
    e = dx.file("f", b"x" * PAGE)
    assert dx.errno_of(dx.setup, e.nodeid, 0, PAGE, 0) == errno.EOPNOTSUPP
    assert dx.c.getattr(e.nodeid).attr.size == PAGE


@pytest.mark.parametrize("policy,small,big,directory", [
    ("always", True, True, False), ("inode", False, True, False),
    ("never", False, False, False), (None, True, True, False)])
def test_per_file_dax_flag(start_daemon, policy, small, big, directory):
    """--dax says which files carry FUSE_ATTR_DAX in LOOKUP, GETATTR, CREATE and
    READDIRPLUS replies: every regular file, those of 1 MiB or more, none."""
    extra = (f"--dax={policy}",) if policy else ()
    dx = Dax(start_daemon, extra=extra)
    c = dx.c
    (dx.shared / "d").mkdir()
    es = dx.file("small", b"s" * 1000)
    eb = dx.file("big", b"b" * MiB)
    ed = c.lookup(FUSE_ROOT_ID, "d")

    def dax_flag(attr):
        return bool(attr.flags & F.FUSE_ATTR_DAX)
    assert (dax_flag(es.attr), dax_flag(eb.attr), dax_flag(ed.attr)) == (small, big, directory)
    assert dax_flag(c.getattr(eb.nodeid).attr) == big
    assert dax_flag(c.getattr(es.nodeid).attr) == small
    created, _ = c.create(FUSE_ROOT_ID, "new")
    assert dax_flag(created.attr) == (policy in ("always", None))
    plus = {p.dirent.name: p.entry for p in c.listdir(FUSE_ROOT_ID, plus=True)
            if p.dirent.name not in (b".", b"..")}
    assert dax_flag(plus[b"big"].attr) == big and dax_flag(plus[b"small"].attr) == small


def test_no_dax_flag_without_has_inode_dax(start_daemon):
    """A guest that did not ask for per-inode DAX gets no FUSE_ATTR_DAX flags."""
    dx = Dax(start_daemon, extra=("--dax=always",),
             init_flags=F.LINUX_6_1_INIT_FLAGS & ~F.FUSE_HAS_INODE_DAX | F.FUSE_MAP_ALIGNMENT)
    assert not dx.init.flags & F.FUSE_HAS_INODE_DAX
    assert not dx.file("f", b"x" * MiB).attr.flags & F.FUSE_ATTR_DAX


# ------------------------------------------------------------------------------------------
# SETUPMAPPING / REMOVEMAPPING by the FUSE and SHMEM rules
# ------------------------------------------------------------------------------------------

def test_read_through_the_window(dax):
    data = pattern(6 * PAGE, 1)
    e = dax.file("f", data)
    dax.setup(e.nodeid, 2 * PAGE, 4 * PAGE, 8 * PAGE)
    assert dax.maps() == [(8 * PAGE, 4 * PAGE, 2 * PAGE, False, dax.ino("f"))]
    assert dax.win.read(8 * PAGE, 4 * PAGE) == data[2 * PAGE:]
    # a change on the host is seen through the window at once (the host's page cache)
    with open(dax.shared / "f", "r+b") as f:
        f.seek(3 * PAGE)
        f.write(b"host was here")
    assert dax.win.read(9 * PAGE, 13) == b"host was here"
    # read-only: a write through it faults
    with pytest.raises(FrontendError):
        dax.win.write(8 * PAGE, b"no")


def test_write_through_the_window(dax):
    e = dax.file("f", bytes(8 * PAGE))
    dax.setup(e.nodeid, 4 * PAGE, 4 * PAGE, 0, R | W)
    assert dax.maps() == [(0, 4 * PAGE, 4 * PAGE, True, dax.ino("f"))]
    dax.win.write(PAGE + 7, b"written through the DAX window")
    host = (dax.shared / "f").read_bytes()
    assert host[5 * PAGE + 7:5 * PAGE + 37] == b"written through the DAX window"
    assert len(host) == 8 * PAGE


def test_write_mapping_with_an_open_file(dax):
    """A given fh must be the inode's and, for a write mapping, opened for writing."""
    e = dax.file("f", bytes(4 * PAGE))
    ro = dax.c.open(e.nodeid, os.O_RDONLY)
    rw = dax.c.open(e.nodeid, os.O_RDWR)
    wo = dax.c.open(e.nodeid, os.O_WRONLY)
    assert dax.errno_of(dax.setup, e.nodeid, 0, PAGE, 0, R | W, fh=ro.fh) == errno.EACCES
    assert dax.maps() == []
    dax.setup(e.nodeid, 0, PAGE, 0, R, fh=ro.fh)
    dax.setup(e.nodeid, 0, PAGE, PAGE, R | W, fh=rw.fh)
    dax.setup(e.nodeid, 0, PAGE, 2 * PAGE, R | W, fh=wo.fh)  # mmap needs read: reopened rw
    assert [m[3] for m in dax.maps()] == [False, True, True]
    # a handle that does not exist, or belongs to another inode: EBADF
    other = dax.file("g", bytes(PAGE))
    og = dax.c.open(other.nodeid, os.O_RDWR)
    assert dax.errno_of(dax.setup, e.nodeid, 0, PAGE, 4 * PAGE, R, fh=12345) == errno.EBADF
    assert dax.errno_of(dax.setup, e.nodeid, 0, PAGE, 4 * PAGE, R, fh=og.fh) == errno.EBADF
    assert len(dax.maps()) == 3


def test_refused_requests(dax):
    """Out of the window, misaligned, empty, overflowing, unknown flags, not a regular file,
    unknown inode: errno replies, and the window is untouched."""
    e = dax.file("f", bytes(4 * PAGE))
    size = 16 * MiB
    cases = [
        ((e.nodeid, 0, PAGE, size), errno.EINVAL),                 # starts at the end
        ((e.nodeid, 0, 2 * PAGE, size - PAGE), errno.EINVAL),      # runs past the end
        ((e.nodeid, 0, PAGE, 1 << 63), errno.EINVAL),
        ((e.nodeid, 0, 2 * PAGE, (1 << 64) - PAGE), errno.EINVAL),  # moffset+len overflows
        ((e.nodeid, 0, (1 << 64) - PAGE, 0), errno.EINVAL),         # huge length
        ((e.nodeid, 100, PAGE, 0), errno.EINVAL),                  # foffset misaligned
        ((e.nodeid, 0, PAGE, 100), errno.EINVAL),                  # moffset misaligned
        ((e.nodeid, 0, 100, 0), errno.EINVAL),                     # length misaligned
        ((e.nodeid, 0, 0, 0), errno.EINVAL),                       # empty
        ((e.nodeid, (1 << 64) - PAGE, PAGE, 0), errno.EINVAL),      # file offset overflows
        ((e.nodeid, (1 << 63) - PAGE, 2 * PAGE, 0), errno.EINVAL),
        ((FUSE_ROOT_ID, 0, PAGE, 0), errno.EINVAL),                # a directory
        ((987654, 0, PAGE, 0), errno.EBADF),                       # no such inode
    ]
    for args, want in cases:
        assert dax.errno_of(dax.setup, *args) == want, args
    assert dax.errno_of(dax.c.setupmapping, e.nodeid, NO_FH, 0, PAGE, 8, 0) == errno.EINVAL
    assert dax.maps() == [] and dax.fe.shmem_log == []


def test_exact_overlap_replaces(dax):
    a, b = pattern(4 * PAGE, 2), pattern(4 * PAGE, 3)
    ea, eb = dax.file("a", a), dax.file("b", b)
    dax.setup(ea.nodeid, 0, 4 * PAGE, 4 * PAGE)
    dax.setup(eb.nodeid, 0, 4 * PAGE, 4 * PAGE, R | W)
    assert dax.maps() == [(4 * PAGE, 4 * PAGE, 0, True, dax.ino("b"))]
    assert dax.win.read(4 * PAGE, 4 * PAGE) == b
    # the frontend saw an UNMAP of the old mapping, then the MAP of the new one
    assert [(x.request, x.accepted) for x in dax.fe.shmem_log] == [
        (BackendReq.SHMEM_MAP, True), (BackendReq.SHMEM_UNMAP, True),
        (BackendReq.SHMEM_MAP, True)]


def test_partial_overlap_splits(dax):
    """A new mapping inside an old one leaves the old one's both ends mapped (from the
    right file offsets); one across two old ones trims both."""
    a, b, c = pattern(8 * PAGE, 4), pattern(8 * PAGE, 5), pattern(8 * PAGE, 6)
    ea, eb, ec = dax.file("a", a), dax.file("b", b), dax.file("c", c)
    ia, ib, ic = dax.ino("a"), dax.ino("b"), dax.ino("c")
    dax.setup(ea.nodeid, 0, 8 * PAGE, 0, R | W)
    dax.setup(eb.nodeid, 0, 2 * PAGE, 3 * PAGE)          # in the middle of a
    assert dax.maps() == [(0, 3 * PAGE, 0, True, ia), (3 * PAGE, 2 * PAGE, 0, False, ib),
                          (5 * PAGE, 3 * PAGE, 5 * PAGE, True, ia)]
    assert dax.win.read(0, 8 * PAGE) == a[:3 * PAGE] + b[:2 * PAGE] + a[5 * PAGE:]
    dax.setup(ec.nodeid, 4 * PAGE, 4 * PAGE, 2 * PAGE)    # over a's head end, b, a's tail
    assert dax.maps() == [(0, 2 * PAGE, 0, True, ia), (2 * PAGE, 4 * PAGE, 4 * PAGE, False, ic),
                          (6 * PAGE, 2 * PAGE, 6 * PAGE, True, ia)]
    assert dax.win.read(0, 8 * PAGE) == a[:2 * PAGE] + c[4 * PAGE:] + a[6 * PAGE:]
    # the split pieces are still writable and still the same host file
    dax.win.write(7 * PAGE, b"tail")
    assert (dax.shared / "a").read_bytes()[7 * PAGE:7 * PAGE + 4] == b"tail"
    assert all(x.accepted for x in dax.fe.shmem_log)


def test_removemapping(dax):
    a = pattern(16 * PAGE, 7)
    ea = dax.file("a", a)
    ia = dax.ino("a")
    dax.setup(ea.nodeid, 0, 16 * PAGE, 0)
    dax.remove((4 * PAGE, 4 * PAGE))                    # a hole in the middle
    assert dax.maps() == [(0, 4 * PAGE, 0, False, ia), (8 * PAGE, 8 * PAGE, 8 * PAGE, False, ia)]
    with pytest.raises(FrontendError):
        dax.win.read(4 * PAGE, 1)
    assert dax.win.read(8 * PAGE, PAGE) == a[8 * PAGE:9 * PAGE]
    dax.remove((100 * PAGE, PAGE))                      # nothing mapped there: fine
    dax.remove((0, 4 * PAGE), (8 * PAGE, 8 * PAGE))     # several entries, whole mappings
    assert dax.maps() == []
    # out of the window, misaligned, empty: refused
    for rng in ((16 * MiB, PAGE), (16 * MiB - PAGE, 2 * PAGE), (5, PAGE), (0, 0),
                ((1 << 64) - PAGE, 2 * PAGE)):
        assert dax.errno_of(dax.remove, rng) == errno.EINVAL, rng


def test_removemapping_many_entries(dax):
    """Linux sends up to 256 entries in one REMOVEMAPPING; we take what the message holds."""
    e = dax.file("a", bytes(PAGE))
    for i in range(300):
        dax.setup(e.nodeid, 0, PAGE, 2 * i * PAGE)
    assert len(dax.maps()) == 300
    dax.remove(*[(2 * i * PAGE, PAGE) for i in range(0, 300, 2)])
    assert [m[0] for m in dax.maps()] == [2 * i * PAGE for i in range(1, 300, 2)]
    dax.remove(*[(2 * i * PAGE, PAGE) for i in range(1, 300, 2)])
    assert dax.maps() == []


def test_hostile_removemapping(dax):
    """A count the message does not carry (up to 2^32-1), a count of 0, a short message:
    EINVAL; nothing is removed."""
    e = dax.file("a", bytes(PAGE))
    dax.setup(e.nodeid, 0, PAGE, 0)
    for count, entries in ((0xFFFFFFFF, [(0, PAGE)]), (3, [(0, PAGE)]), (0, [])):
        body = F.REMOVEMAPPING_IN.pack(count) + b"".join(
            F.REMOVEMAPPING_ONE.pack(*x) for x in entries)
        r = dax.c.raw_request(Op.REMOVEMAPPING, e.nodeid, body)
        assert r.error == errno.EINVAL, count
    assert len(dax.maps()) == 1


def test_ten_thousand_mappings(start_daemon):
    """10,000 mappings of 300 files: the daemon holds no fd per mapping or per file; one
    SETUPMAPPING over all of them replaces them (10,000 unmaps in one request); a
    REMOVEMAPPING empties the window."""
    dx = Dax(start_daemon, window="64M")
    nodes = [dx.file(f"f{i}", bytes(PAGE)).nodeid for i in range(300)]
    fds_before = dx.daemon_fds()
    for start in range(0, 10_000, 100):   # 100 requests in flight at a time
        us = [dx.c.submit(Op.SETUPMAPPING, nodes[i % 300], [F.SETUPMAPPING_IN.pack(
                  NO_FH, 0, PAGE, R | (W if i & 1 else 0), i * PAGE)], [], kick=False)
              for i in range(start, start + 100)]
        dx.c.kick_all()
        assert all(dx.c.wait(u).error == 0 for u in us)
    assert len(dx.win.mappings()) == 10_000
    assert dx.daemon_fds() <= fds_before + 2
    dx.setup(nodes[0], 0, PAGE, 0)   # exact overlap of mapping 0 only
    big = dx.file("big", bytes(48 * MiB))
    dx.setup(big.nodeid, 0, 48 * MiB, 0, R | W, )
    assert dx.maps() == [(0, 48 * MiB, 0, True, dx.ino("big"))]
    dx.remove((0, 64 * MiB))
    assert dx.maps() == []
    assert dx.daemon_fds() <= fds_before + 2
    assert dx.d.alive()


# ------------------------------------------------------------------------------------------
# A frontend that refuses or never answers; resets; sessions
# ------------------------------------------------------------------------------------------

def test_frontend_refuses_map(start_daemon):
    dx = Dax(start_daemon, shmem_answer=lambda req: "refuse")
    e = dx.file("f", bytes(PAGE))
    assert dx.errno_of(dx.setup, e.nodeid, 0, PAGE, 0) == errno.EIO
    assert dx.maps() == []
    dx.fe.shmem_answer = None          # the daemon's table did not record the refused one
    dx.setup(e.nodeid, 0, PAGE, 0)
    assert len(dx.maps()) == 1


def test_frontend_never_answers(start_daemon):
    """No answer to SHMEM_MAP: the guest gets ETIMEDOUT after the daemon's timeout (5 s),
    then EIO at once for later mappings; other requests keep working."""
    dx = Dax(start_daemon, shmem_answer=lambda req: "ignore")
    e = dx.file("f", b"abc")
    t = time.monotonic()
    assert dx.errno_of(dx.setup, e.nodeid, 0, PAGE, 0) == errno.ETIMEDOUT
    assert 4 < time.monotonic() - t < 9
    dx.fe.shmem_answer = None
    t = time.monotonic()
    assert dx.errno_of(dx.setup, e.nodeid, 0, PAGE, PAGE) == errno.EIO
    assert time.monotonic() - t < 2
    fh = dx.c.open(e.nodeid).fh
    assert dx.c.read(e.nodeid, fh, 0, 10) == b"abc"


def test_reset_drops_mappings(dax):
    """After a device reset the frontend holds no mapping and the daemon's table is empty
    too: a new session maps the same offsets without the daemon unmapping anything."""
    e = dax.file("f", pattern(4 * PAGE, 8))
    dax.setup(e.nodeid, 0, 4 * PAGE, 0)
    dax.fe.stop()
    dax.fe.reset_device()
    assert dax.maps() == []
    dax.fe.start()
    c = F.FuseClient(dax.fe)
    c.init(flags=DAX_INIT)
    e = c.lookup(FUSE_ROOT_ID, "f")
    n = len(dax.fe.shmem_log)
    c.setupmapping(e.nodeid, NO_FH, 0, 2 * PAGE, R, PAGE)
    assert [x.request for x in dax.fe.shmem_log[n:]] == [BackendReq.SHMEM_MAP]
    assert dax.maps() == [(PAGE, 2 * PAGE, 0, False, dax.ino("f"))]


def test_new_session_unmaps_old_mappings(dax):
    """INIT again (a guest that rebooted without a device reset) or DESTROY: the earlier
    session's mappings are removed."""
    e = dax.file("f", bytes(4 * PAGE))
    dax.setup(e.nodeid, 0, 4 * PAGE, 0)
    dax.c.init(flags=DAX_INIT)
    assert dax.maps() == []
    e = dax.c.lookup(FUSE_ROOT_ID, "f")
    dax.setup(e.nodeid, 0, 4 * PAGE, 0)
    dax.c.destroy()
    assert dax.maps() == []


# ------------------------------------------------------------------------------------------
# The guest driver (Linux fs/fuse/dax.c): 2 MiB ranges, reclaim, reads and writes
# ------------------------------------------------------------------------------------------

def test_driver_reads_and_writes(start_daemon):
    """A 20 MiB file through an 8 MiB window (four 2 MiB ranges): random reads equal the host
    file while ranges are reclaimed under pressure; writes inside the file land in it through
    the window, a write past the end goes through WRITE."""
    dx = Dax(start_daemon, window="8M", init_flags=F.LINUX_6_1_INIT_FLAGS)
    drv = DaxDriver(dx.c)
    drv.init()
    data = bytearray(pattern(20 * MiB, 9))
    e = dx.file("f", bytes(data))
    f = drv.open(e.nodeid)
    assert f.dax
    assert f.read(0, len(data)) == data
    rnd = random.Random(10)
    for _ in range(200):
        off = rnd.randrange(len(data))
        n = rnd.choice((1, 4096, 65536, 3 * MiB))
        assert f.read(off, n) == data[off:off + n]
    assert drv.removes > 0 and drv.removed_ranges >= 10
    assert len(dx.win.mappings()) <= 4
    # every range the frontend holds is 2 MiB of this file at a 2 MiB file offset
    assert all(m[1] == 2 * MiB and m[2] % (2 * MiB) == 0 and m[4] == dx.ino("f")
               for m in dx.maps())
    for _ in range(50):
        off = rnd.randrange(len(data) - 5000)
        chunk = rnd.randbytes(rnd.randrange(1, 5000))
        f.write(off, chunk)
        data[off:off + len(chunk)] = chunk
    f.write(len(data) - 10, b"x" * 30)          # extends: a WRITE request
    data[len(data) - 10:] = b"x" * 30
    assert (dx.shared / "f").read_bytes() == data
    assert f.read(len(data) - 30, 100) == data[-30:]
    f.close()
    drv.evict(e.nodeid)
    assert dx.maps() == []


def test_driver_inode_mode(start_daemon):
    """Mounted with dax=inode and --dax=inode: the big file goes through the window, the
    small one through READ."""
    dx = Dax(start_daemon, window="8M", extra=("--dax=inode",),
             init_flags=F.LINUX_6_1_INIT_FLAGS)
    drv = DaxDriver(dx.c, mode="inode")
    drv.init()
    small, big = pattern(5000, 11), pattern(3 * MiB, 12)
    fs_, fb = drv.open(dx.file("s", small).nodeid), drv.open(dx.file("b", big).nodeid)
    assert (fs_.dax, fb.dax) == (False, True)
    assert fs_.read(0, 10000) == small and fb.read(0, 4 * MiB) == big
    assert {m[4] for m in dx.maps()} == {dx.ino("b")}


@pytest.mark.parametrize("args,message", [
    (["--dax=inode"], "--dax needs --dax-window=SIZE"),
    (["--dax-window=1.5G"], "'1.5G' is not a size"),
    (["--dax-window=1000"], "a multiple of 4096"),
    (["--dax=sometimes", "--dax-window=1G"], "invalid choice: 'sometimes'"),
])
def test_cli_refuses_bad_dax_options(tmp_path, args, message):
    """Refused with a one-line error before anything is created."""
    import subprocess
    import sys

    from .daemon import daemon_env
    sock = tmp_path / "s.sock"
    p = subprocess.run([sys.executable, "-m", "pyvirtiofs", f"--socket-path={sock}",
                        f"--shared-dir={tmp_path}", "--sandbox=none", *args],
                       capture_output=True, text=True, env=daemon_env(), timeout=60)
    assert p.returncode == 2
    assert message in p.stderr and "Traceback" not in p.stderr
    assert not sock.exists()


def test_concurrent_mappings_on_four_queues(start_daemon):
    """Four request queues send overlapping SETUPMAPPINGs and REMOVEMAPPINGs at once: every
    request succeeds and every SHMEM request the daemon sends obeys the frontend's rules (its
    table never disagrees with the frontend's); at the end the whole window is removed."""
    dx = Dax(start_daemon, window="1M", num_request_queues=4)
    files = [dx.file(f"f{i}", pattern(64 * PAGE, 20 + i)) for i in range(4)]
    rnd = random.Random(30)
    pending = []
    for k in range(400):
        q = 1 + k % 4
        moffset = rnd.randrange(256) * PAGE
        length = rnd.randrange(1, min(16, 256 - moffset // PAGE) + 1) * PAGE
        if k % 5 == 4:
            body = F.REMOVEMAPPING_IN.pack(1) + F.REMOVEMAPPING_ONE.pack(moffset, length)
            u = dx.c.submit(Op.REMOVEMAPPING, FUSE_ROOT_ID, [body], [], queue=q, kick=False)
        else:
            e = files[rnd.randrange(4)]
            foffset = rnd.randrange(64 - length // PAGE + 1) * PAGE
            body = F.SETUPMAPPING_IN.pack(NO_FH, foffset, length, R | (W * (k & 1)), moffset)
            u = dx.c.submit(Op.SETUPMAPPING, e.nodeid, [body], [], queue=q, kick=False)
        pending.append(u)
        if len(pending) % 32 == 0:
            dx.c.kick_all()
            for u in pending:
                assert dx.c.wait(u).error == 0
            pending = []
    dx.c.kick_all()
    for u in pending:
        assert dx.c.wait(u).error == 0
    assert [x for x in dx.fe.shmem_log if not x.accepted] == []
    maps = dx.maps()
    assert all(a[0] + a[1] <= b[0] for a, b in zip(maps, maps[1:]))   # no overlaps
    # every mapped byte is the right byte of the right file
    by_ino = {dx.ino(f"f{i}"): (dx.shared / f"f{i}").read_bytes() for i in range(4)}
    for off, ln, foff, _w, ino in maps:
        assert dx.win.read(off, ln) == by_ino[ino][foff:foff + ln]
    dx.remove((0, MiB))
    assert dx.maps() == []


def test_readonly_daemon_refuses_write_mappings(start_daemon):
    dx = Dax(start_daemon, extra=("--readonly",))
    e = dx.file("f", pattern(2 * PAGE, 40))
    assert dx.errno_of(dx.setup, e.nodeid, 0, PAGE, 0, R | W) == errno.EROFS
    dx.setup(e.nodeid, 0, 2 * PAGE, 0, R)
    assert dx.maps() == [(0, 2 * PAGE, 0, False, dx.ino("f"))]
    with pytest.raises(FrontendError):
        dx.win.write(0, b"x")


def test_split_of_a_forgotten_files_mapping(dax):
    """A guest that forgets an inode while its range is still mapped (Linux removes the
    mapping first): a later partial overlap cannot map the rest back (the daemon holds no fd
    and the inode is gone), so those pieces are dropped and logged; the new mapping is made."""
    ea, eb = dax.file("a", pattern(8 * PAGE, 41)), dax.file("b", pattern(8 * PAGE, 42))
    dax.setup(ea.nodeid, 0, 8 * PAGE, 0)
    dax.c.forget(ea.nodeid, 1)                        # waits until the daemon served it
    dax.setup(eb.nodeid, 0, 2 * PAGE, 2 * PAGE)
    assert dax.maps() == [(2 * PAGE, 2 * PAGE, 0, False, dax.ino("b"))]
    dax.d.wait_log("cannot map back")

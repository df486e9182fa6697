"""vhost-user shared memory (protocol feature SHMEM): the backend's plumbing
(:mod:`pyvirtiofs.vhost_user.shmem`) against the project's frontend playing QEMU, over a real
Unix socket.  A tiny device with shared memory regions runs in a backend thread of this
process so that the test can call ``map``/``unmap`` as a device would; the frontend reserves
the regions, maps the fds it receives and answers by the rules.  The DAX window (region 0 of
the real daemon) is tested over the daemon process in test_dax.py.
"""

from __future__ import annotations

import errno
import os
import socket
import tempfile
import threading
import time

import pytest

from pyvirtiofs.testing.frontend import (
    BackendReq, FrontendError, ProtoFeature, VirtioFsFrontend,
)
from pyvirtiofs.vhost_user.backend import VhostUserSession
from pyvirtiofs.vhost_user.device import Device
from pyvirtiofs.vhost_user.shmem import SharedMemory, ShmemError

PAGE = 4096
MiB = 1 << 20


class ShmemDevice(Device):
    """The least a device needs: queues that do nothing, and shared memory regions."""

    def __init__(self, sizes, timeout=5.0):
        self.num_queues = 2
        self.shmem = SharedMemory(sizes, timeout=timeout)
        self.resets = 0
        self.shmem.add_reset_listener(self._dropped)
        self.dropped = 0

    def _dropped(self):
        self.dropped += 1

    def queue_handler(self, index):
        return lambda chain: 0

    def reset(self):
        self.resets += 1


class Rig:
    """A backend serving one frontend on a real socket, in a thread of this process."""

    def __init__(self, sizes, timeout=5.0, **frontend_kw):
        self.dir = tempfile.mkdtemp(prefix="shm-", dir="/tmp")
        self.path = os.path.join(self.dir, "s")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(1)
        self.device = ShmemDevice(sizes, timeout)
        self.backend = VhostUserSession(self.device)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        self.fe = VirtioFsFrontend(self.path, **frontend_kw)

    def _serve(self):
        conn, _ = self.listener.accept()
        self.backend.serve(conn)

    @property
    def shm(self) -> SharedMemory:
        return self.device.shmem

    def close(self):
        self.fe.close()
        self.thread.join(10)
        assert not self.thread.is_alive(), "backend did not end when the frontend left"
        self.listener.close()
        os.unlink(self.path)
        os.rmdir(self.dir)


@pytest.fixture
def rigs():
    made = []

    def make(sizes=(4 * MiB,), **kw):
        kw.setdefault("shmem", True)
        r = Rig(sizes, **kw)
        made.append(r)
        return r
    yield make
    for r in made:
        r.close()


@pytest.fixture
def datafile(tmp_path):
    p = tmp_path / "data"
    p.write_bytes(bytes(range(256)) * (64 * PAGE // 256))  # 64 pages
    fd = os.open(p, os.O_RDWR)
    yield p, fd
    os.close(fd)


def test_offer_and_config(rigs):
    """SHMEM is offered with BACKEND_REQ and REPLY_ACK; GET_SHMEM_CONFIG lists the regions
    by shmid, an unused lower id as size 0; the frontend reserves each."""
    r = rigs(sizes=(0, 8 * MiB))
    fe = r.fe
    for b in (ProtoFeature.SHMEM, ProtoFeature.BACKEND_REQ, ProtoFeature.REPLY_ACK):
        assert fe.has_protocol(b), b.name
    assert [(x.shmid, x.size) for x in fe.shmem_regions] == [(0, 0), (1, 8 * MiB)]
    assert r.shm.available


def test_no_regions_no_offer(rigs):
    r = rigs(sizes=())
    assert not r.fe.backend_protocol_features & (1 << ProtoFeature.SHMEM)
    assert not r.fe.backend_protocol_features & (1 << ProtoFeature.BACKEND_REQ)
    assert r.fe.shmem_regions == []


def test_frontend_without_shmem(rigs):
    """A frontend that does not take SHMEM (QEMU 7.2): map fails with EOPNOTSUPP at once."""
    r = rigs(shmem=False)
    assert not r.fe.has_protocol(ProtoFeature.SHMEM)
    fd = os.open("/dev/zero", os.O_RDONLY)
    try:
        with pytest.raises(ShmemError) as ei:
            r.shm.map(0, fd, 0, 0, PAGE)
        assert ei.value.errno == errno.EOPNOTSUPP
    finally:
        os.close(fd)


def test_map_read_only_and_read_write(rigs, datafile):
    path, fd = datafile
    r = rigs()
    region = r.fe.shmem_regions[0]
    r.shm.map(0, fd, 4 * PAGE, 0, 2 * PAGE, writable=False)
    r.shm.map(0, fd, 0, 16 * PAGE, PAGE, writable=True)
    want = path.read_bytes()
    assert region.read(0, 2 * PAGE) == want[4 * PAGE:6 * PAGE]
    # read-only: a write through it faults
    with pytest.raises(FrontendError):
        region.write(0, b"x")
    # read-write: the bytes land in the host file
    region.write(16 * PAGE + 10, b"through the window")
    assert path.read_bytes()[10:28] == b"through the window"
    st = os.fstat(fd)
    assert [(m.offset, m.length, m.fd_offset, m.writable, m.ino) for m in region.mappings()] == [
        (0, 2 * PAGE, 4 * PAGE, False, st.st_ino), (16 * PAGE, PAGE, 0, True, st.st_ino)]
    # the frontend received the fd and closed it after mmap: our fd is still the only one
    assert {e.request for e in r.fe.shmem_log} == {BackendReq.SHMEM_MAP}
    # unmapped again: the bytes are gone from the window
    r.shm.unmap(0, 0, 2 * PAGE)
    with pytest.raises(FrontendError):
        region.read(0, 1)
    assert [m.offset for m in region.mappings()] == [16 * PAGE]


def test_rules_enforced_by_frontend(rigs, datafile):
    """What the frontend refuses comes back as EIO (and changes nothing)."""
    _, fd = datafile
    r = rigs()
    region = r.fe.shmem_regions[0]
    r.shm.map(0, fd, 0, 4 * PAGE, 4 * PAGE)
    for off, ln in ((4 * PAGE, 4 * PAGE), (2 * PAGE, 4 * PAGE), (6 * PAGE, PAGE),
                    (0, 16 * PAGE)):
        with pytest.raises(ShmemError) as ei:
            r.shm.map(0, fd, 0, off, ln)
        assert ei.value.errno == errno.EIO, (off, ln)
    for off, ln in ((4 * PAGE, 2 * PAGE), (0, 8 * PAGE), (5 * PAGE, 3 * PAGE)):
        with pytest.raises(ShmemError) as ei:
            r.shm.unmap(0, off, ln)  # not one whole mapping
        assert ei.value.errno == errno.EIO
    assert [(m.offset, m.length) for m in region.mappings()] == [(4 * PAGE, 4 * PAGE)]
    assert [e.accepted for e in r.fe.shmem_log] == [True] + [False] * 7


def test_write_mapping_of_read_only_fd_refused(rigs, datafile):
    path, _ = datafile
    r = rigs()
    ro = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(ShmemError) as ei:
            r.shm.map(0, ro, 0, 0, PAGE, writable=True)
        assert ei.value.errno == errno.EIO
        assert "mmap" in r.fe.shmem_log[-1].reason
        assert r.fe.shmem_regions[0].mappings() == []
    finally:
        os.close(ro)


def test_checked_before_sending(rigs, datafile):
    """Requests the frontend must refuse anyway are refused here with EINVAL, unsent."""
    _, fd = datafile
    r = rigs(sizes=(4 * MiB,))
    bad = [(1, 0, 0, PAGE),               # no region 1
           (0, 1, 0, PAGE),               # file offset not page aligned
           (0, 0, 100, PAGE),             # region offset not page aligned
           (0, 0, 0, 100),                # length not page aligned
           (0, 0, 0, 0),                  # empty
           (0, 0, 4 * MiB - PAGE, 2 * PAGE),  # past the end
           (0, 0, 1 << 64, PAGE),         # absurd offsets
           (0, (1 << 63) - PAGE, 0, 2 * PAGE)]  # file range overflows
    for shmid, fo, so, ln in bad:
        with pytest.raises(ShmemError) as ei:
            r.shm.map(shmid, fd, fo, so, ln)
        assert ei.value.errno == errno.EINVAL, (shmid, fo, so, ln)
    assert r.fe.shmem_log == []


def test_refusing_frontend(rigs, datafile):
    _, fd = datafile
    r = rigs(shmem_answer=lambda req: "refuse")
    with pytest.raises(ShmemError) as ei:
        r.shm.map(0, fd, 0, 0, PAGE)
    assert ei.value.errno == errno.EIO
    # the channel is still in step: the next request gets its own answer
    r.fe.shmem_answer = None
    r.shm.map(0, fd, 0, 0, PAGE)
    assert r.fe.shmem_regions[0].read(0, 4) == bytes(range(4))


def test_silent_frontend_times_out(rigs, datafile):
    """A frontend that never answers: ETIMEDOUT after the timeout, then EIO at once (the
    channel is out of step); nothing hangs."""
    _, fd = datafile
    r = rigs(timeout=0.5, shmem_answer=lambda req: "ignore")
    t = time.monotonic()
    with pytest.raises(ShmemError) as ei:
        r.shm.map(0, fd, 0, 0, PAGE)
    assert ei.value.errno == errno.ETIMEDOUT
    assert 0.4 < time.monotonic() - t < 5
    r.fe.shmem_answer = None
    with pytest.raises(ShmemError) as ei:
        r.shm.map(0, fd, 0, 4 * PAGE, PAGE)
    assert ei.value.errno == errno.EIO


def test_closed_channel(rigs, datafile):
    _, fd = datafile
    r = rigs()
    r.fe.backend_channel.sock.shutdown(socket.SHUT_RDWR)
    with pytest.raises(ShmemError) as ei:
        r.shm.map(0, fd, 0, 0, PAGE)
    assert ei.value.errno == errno.EIO


def test_threads_share_the_channel(rigs, datafile):
    """Eight threads mapping and unmapping at once: every request gets its own answer."""
    _, fd = datafile
    r = rigs(sizes=(64 * MiB,))
    errors = []

    def worker(k):
        try:
            for i in range(50):
                off = (k * 64 + i) * PAGE
                r.shm.map(0, fd, (i % 64) * PAGE, off, PAGE, writable=bool(i & 1))
                if i % 3 == 0:
                    r.shm.unmap(0, off, PAGE)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
    ts = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not errors
    maps = r.fe.shmem_regions[0].mappings()
    assert len(maps) == 8 * (50 - 17)
    assert all(e.accepted for e in r.fe.shmem_log)


def test_reset_drops_every_mapping(rigs, datafile):
    _, fd = datafile
    r = rigs()
    r.shm.map(0, fd, 0, 0, PAGE)
    r.fe.reset_device()
    r.fe.sync()
    assert r.fe.shmem_regions[0].mappings() == []
    with pytest.raises(FrontendError):
        r.fe.shmem_regions[0].read(0, 1)
    assert r.device.dropped == 1 and r.device.resets == 1
    # and the same range can be mapped again
    r.shm.map(0, fd, 0, 0, PAGE)
    assert r.fe.shmem_regions[0].read(0, 2) == b"\0\1"


def test_backend_channel_must_be_a_unix_stream_socket(rigs, datafile):
    """SET_BACKEND_REQ_FD with an eventfd or a datagram socket is refused (REPLY_ACK failure);
    the channel already in place keeps working."""
    from pyvirtiofs.testing.frontend import Req, VhostUserError
    _, fd = datafile
    r = rigs()
    efd = os.eventfd(0)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        for bad in (efd, b.fileno()):
            with pytest.raises(VhostUserError):
                r.fe.call(Req.SET_BACKEND_REQ_FD, b"", (bad,), need_reply=True)
    finally:
        os.close(efd)
        a.close()
        b.close()
    r.shm.map(0, fd, 0, 0, PAGE)
    assert len(r.fe.shmem_regions[0].mappings()) == 1


def test_frontend_region_is_fault_safe(tmp_path):
    """The oracle itself: ShmemRegion checks the rules, and an access to an unmapped page, past
    the end of the mapped file or (a write) to a read-only mapping raises FrontendError where a
    plain load would kill the test process with SIGSEGV/SIGBUS."""
    from pyvirtiofs.testing.frontend import ShmemRegion
    p = tmp_path / "one-page"
    p.write_bytes(b"A" * PAGE)
    fd = os.open(p, os.O_RDWR)
    region = ShmemRegion(0, 16 * PAGE)
    try:
        region.map(fd, 0, 0, 4 * PAGE, writable=False)       # 4 pages of a 1-page file
        assert region.read(0, 4) == b"AAAA"
        with pytest.raises(FrontendError):
            region.read(PAGE, 1)                              # past the file's end: SIGBUS
        with pytest.raises(FrontendError):
            region.read(8 * PAGE, 1)                          # reserved, not mapped: SIGSEGV
        with pytest.raises(FrontendError):
            region.write(0, b"x")                             # read-only mapping
        with pytest.raises(FrontendError):
            region.read(16 * PAGE - 1, 2)                     # outside the region
        for args in ((fd, 0, 2 * PAGE, PAGE, False),          # overlaps
                     (fd, 0, 5 * PAGE, 100, False),           # not page aligned
                     (fd, 0, 15 * PAGE, 2 * PAGE, False)):    # past the end
            with pytest.raises(FrontendError):
                region.map(*args)
        with pytest.raises(FrontendError):
            region.unmap(0, PAGE)                             # not a whole mapping
        region.unmap(0, 4 * PAGE)
        assert region.mappings() == []
    finally:
        region.release()
        os.close(fd)

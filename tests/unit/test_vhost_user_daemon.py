"""The vhost-user layer of the real pyvirtiofsd process: QEMU 7.2's handshake (SET_MEM_TABLE
and ADD_MEM_REG), REPLY_ACK, GET_QUEUE_NUM, stopping rings with GET_VRING_BASE and starting
them again, the guest-reboot path (stop, RESET_DEVICE, new memory table, INIT again),
SET_VRING_ENABLE 0, and how the process ends: frontend disconnect, SIGTERM/SIGINT, a frontend
that dies in the middle of a request or of a message.  The CONFIG protocol feature is never
offered (QEMU 7.1-8.0 crash on it for vhost-user-fs).
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import struct
import time
from pathlib import Path

import pytest

from pyvirtiofs.testing import frontend as F
from pyvirtiofs.testing.frontend import (
    DEFAULT_PROTOCOL_FEATURES, FUSE_ROOT_ID, FuseClient, FuseError, GuestRam, Op, ProtoFeature,
    Req, VhostUserError, VirtioFeature,
)

from .daemon import assert_no_completion, wait_used

MiB = 1 << 20
GETATTR_BODY = F.GETATTR_IN.pack(0, 0, 0)
VRING_STATE = struct.Struct("<II")
U64 = struct.Struct("<Q")


def _bit(n):
    return 1 << n


def _getattr_on(c: FuseClient, queue: int, nodeid: int = FUSE_ROOT_ID, kick: bool = True) -> int:
    return c.submit(Op.GETATTR, nodeid, [GETATTR_BODY], [F.ATTR_OUT_SIZE], queue=queue, kick=kick)


def _qemu72_sequence(nvqs: int, mem: list) -> list:
    """What QEMU 7.2's vhost-user-fs sends (see VirtioFsFrontend.negotiate/start)."""
    seq = [Req.GET_FEATURES, Req.GET_PROTOCOL_FEATURES, Req.SET_PROTOCOL_FEATURES,
           Req.GET_QUEUE_NUM]
    if Req.ADD_MEM_REG in mem:
        seq.append(Req.GET_MAX_MEM_SLOTS)
    seq += [Req.SET_OWNER, Req.GET_FEATURES]
    seq += [Req.SET_VRING_CALL, Req.SET_VRING_ERR] * nvqs
    seq += [Req.SET_VRING_CALL] * nvqs + [Req.SET_FEATURES] + mem
    seq += [Req.SET_VRING_NUM, Req.SET_VRING_BASE, Req.SET_VRING_ADDR, Req.SET_VRING_KICK] * nvqs
    seq += [Req.SET_VRING_ENABLE] * nvqs + [Req.SET_VRING_CALL] * nvqs + [Req.GET_FEATURES]
    return seq


# ------------------------------------------------------------------------------------------
# Handshake
# ------------------------------------------------------------------------------------------

def test_offered_features(start_daemon):
    """Virtio and protocol features as QEMU sees them; CONFIG is never offered (QEMU 7.1-8.0
    crash on it)."""
    for extra in ((),):
        d = start_daemon(extra_args=extra)
        fe = d.frontend(start=False)
        feats = fe.backend_features
        for b in (VirtioFeature.VERSION_1, VirtioFeature.INDIRECT_DESC, VirtioFeature.EVENT_IDX,
                  VirtioFeature.PROTOCOL_FEATURES):
            assert feats & _bit(b), VirtioFeature(b).name
        assert not feats & _bit(VirtioFeature.RING_PACKED)
        proto = fe.backend_protocol_features
        assert not proto & _bit(ProtoFeature.CONFIG)
        for b in (ProtoFeature.MQ, ProtoFeature.REPLY_ACK, ProtoFeature.CONFIGURE_MEM_SLOTS,
                  ProtoFeature.RESET_DEVICE):
            assert proto & _bit(b), ProtoFeature(b).name
        # asking for CONFIG anyway is refused (REPLY_ACK is in force from the first SET)
        with pytest.raises(VhostUserError):
            fe.conn.set_u64(Req.SET_PROTOCOL_FEATURES,
                            fe.protocol_features | _bit(ProtoFeature.CONFIG), need_reply=True)
        fe.sync()
        fe.close()
        assert d.wait_exit() == 0


def test_qemu72_handshake_with_set_mem_table(daemon):
    fe = daemon.frontend(protocol_features=DEFAULT_PROTOCOL_FEATURES
                         & ~_bit(ProtoFeature.CONFIGURE_MEM_SLOTS), ram_regions=2)
    assert fe.conn.sent == _qemu72_sequence(2, [Req.SET_MEM_TABLE])
    c = FuseClient(fe)
    c.init()
    assert c.getattr(FUSE_ROOT_ID).attr.mode & 0o040000
    assert "guest memory: 2 region(s)" in daemon.log()


def test_qemu72_handshake_with_add_mem_reg(daemon):
    fe = daemon.frontend(ram_regions=2)
    assert fe.has_protocol(ProtoFeature.CONFIGURE_MEM_SLOTS)
    assert fe.max_mem_slots >= 8
    assert fe.conn.sent == _qemu72_sequence(2, [Req.ADD_MEM_REG, Req.ADD_MEM_REG])
    c = FuseClient(fe)
    c.init()
    assert c.getattr(FUSE_ROOT_ID)


def test_rem_mem_reg_and_add_it_back(daemon):
    """Rings in region 0, a READ's buffer in region 1: with region 1 removed the request
    is returned unused (its buffer is not guest memory any more); added back, it works."""
    ram = GuestRam(16 * MiB, regions=2, policy="first")
    try:
        fe = daemon.frontend(ram=ram)
        c = FuseClient(fe, request_queue=1)
        c.init()
        (Path(daemon.shared_dir) / "f").write_bytes(b"0123456789")
        e = c.lookup(FUSE_ROOT_ID, "f")
        o = c.open(e.nodeid)
        r1 = ram.regions[1]
        q = fe.queues[1]
        assert all(ram.locate(g)[0].index == 0 for g in q.addresses())

        def read_into_region1():
            ram.fill(r1.gpa, 4096, 0xEE)
            head = q.add_chain([F.IN_HEADER.pack(80, Op.READ, 999, e.nodeid, 0, 0, 0, 0, 0),
                                F.READ_IN.pack(o.fh, 0, 10, 0, 0, 0, 0)],
                               [(r1.gpa, 16), (r1.gpa + 16, 10)], indirect=False)
            q.kick()
            comp, others = wait_used(q, head)
            assert not others
            return comp.length

        fe.remove_mem_region(r1)
        assert read_into_region1() == 0
        assert ram.read(r1.gpa, 4096) == b"\xee" * 4096
        fe.add_mem_region(r1)
        assert read_into_region1() == 26
        assert ram.read(r1.gpa + 16, 10) == b"0123456789"
        assert c.getattr(e.nodeid).attr.size == 10
        assert "dropped a malformed request" in daemon.log()
    finally:
        daemon.finish()
        ram.close()


def test_memory_hotplug_while_running(daemon):
    """QEMU adds and removes memory while the rings run (ADD_MEM_REG / REM_MEM_REG): the
    rings go on, and buffers in the new region are served."""
    import mmap
    c = daemon.client(num_request_queues=2, client_kwargs={"request_queue": 1})
    fe = c.fe
    (Path(daemon.shared_dir) / "f").write_bytes(b"hotplugged!")
    e = c.lookup(FUSE_ROOT_ID, "f")
    o = c.open(e.nodeid)
    gpa, size, uaddr = 0x100000000, 2 * MiB, 0x7E0000000000
    fd = os.memfd_create("hotplug", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    mm = mmap.mmap(fd, size)
    region = struct.pack("<QQQQQ", 0, gpa, size, uaddr, 0)
    try:
        us = [_getattr_on(c, 1) for _ in range(8)]
        fe.call(Req.ADD_MEM_REG, region, [fd], need_reply=True)
        for u in us:
            c.wait(u).check()
        q = fe.queues[2]
        head = q.add_chain([F.IN_HEADER.pack(80, Op.READ, 4242, e.nodeid, 0, 0, 0, 0, 0),
                            F.READ_IN.pack(o.fh, 0, 11, 0, 0, 0, 0)],
                           [(gpa + 4096, 16), (gpa + 8192, 11)],
                           copy_limit=0)           # the frontend's RAM does not have it
        q.kick()
        comp, _ = wait_used(q, head)
        assert comp.length == 27
        assert mm[8192:8192 + 11] == b"hotplugged!"
        assert F.OUT_HEADER.unpack(mm[4096:4112]) == (27, 0, 4242)
        fe.call(Req.REM_MEM_REG, region, [fd], need_reply=True)
        for _ in range(4):
            c.wait(_getattr_on(c, 1)).check()
    finally:
        mm.close()
        os.close(fd)


def test_mem_table_sent_again_while_running(daemon):
    fe = daemon.frontend(protocol_features=DEFAULT_PROTOCOL_FEATURES
                         & ~_bit(ProtoFeature.CONFIGURE_MEM_SLOTS), num_request_queues=2)
    c = FuseClient(fe)
    c.init()
    for _ in range(5):
        us = [_getattr_on(c, i) for i in (1, 2) for _ in range(4)]
        fe.set_mem_table()               # same regions, new fds, rings untouched
        for u in us:
            c.wait(u, timeout=5).check()
    assert daemon.log().count("guest memory: 1 region(s)") == 6


def test_reply_ack(start_daemon):
    # need_reply on every request without a reply of its own: each is acknowledged with 0
    d = start_daemon()
    fe = d.frontend(ack_all=True)
    c = FuseClient(fe)
    c.init()
    # a refused request is answered with a non-zero status, and the daemon goes on
    with pytest.raises(VhostUserError) as ei:
        fe.call(Req.SET_VRING_NUM, VRING_STATE.pack(1, 3), need_reply=True)
    assert ei.value.status != 0
    with pytest.raises(VhostUserError):
        fe.call(Req.SET_VRING_ENABLE, VRING_STATE.pack(1, 7), need_reply=True)
    assert c.getattr(FUSE_ROOT_ID)
    log = d.wait_log("SET_VRING_ENABLE refused")
    assert "SET_VRING_NUM refused" in log

    # without REPLY_ACK negotiated the need_reply flag must not produce a reply
    d2 = start_daemon()
    fe2 = d2.frontend(protocol_features=DEFAULT_PROTOCOL_FEATURES & ~_bit(ProtoFeature.REPLY_ACK))
    assert not fe2.reply_ack
    fe2.conn.send(Req.SET_VRING_ENABLE, VRING_STATE.pack(1, 1), need_reply=True)
    fe2.conn.send(Req.SET_VRING_NUM, VRING_STATE.pack(1, 3), need_reply=True)   # refused
    fe2.sync()      # the next message on the socket is GET_FEATURES' own reply
    c2 = FuseClient(fe2)
    c2.init()
    assert c2.getattr(FUSE_ROOT_ID)


def test_get_queue_num(start_daemon):
    d = start_daemon()
    fe = d.frontend(start=False)
    n = fe.max_queues
    # hiprio + at least one request queue; and every queue must be addressable by
    # SET_VRING_KICK/CALL/ERR, whose ring index is 8 bits wide
    assert 2 <= n <= 256
    fe.call(Req.SET_VRING_NUM, VRING_STATE.pack(n - 1, 128), need_reply=True)
    with pytest.raises(VhostUserError):
        fe.call(Req.SET_VRING_NUM, VRING_STATE.pack(n, 128), need_reply=True)
    assert d.wait_log("out of range")
    fe.close()
    assert d.wait_exit() == 0
    # as many request queues as GET_QUEUE_NUM allows (capped to stay quick)
    d2 = start_daemon()
    nq = min(n - 1, 16)
    c = d2.client(num_request_queues=nq, ram_size=128 * MiB)
    us = {i: _getattr_on(c, i, kick=True) for i in range(1, nq + 1)}
    for i, u in us.items():
        assert c.wait(u).check()
        assert c.fe.queues[i].used_idx == (2 if i == 1 else 1)


# ------------------------------------------------------------------------------------------
# Stopping and starting rings
# ------------------------------------------------------------------------------------------

def _restart_ring(fe, q, base):
    """QEMU's vhost_virtqueue_start for one ring (plus SET_VRING_ENABLE 1)."""
    fe._vring_fd(Req.SET_VRING_CALL, q.index, q.call_fd)
    fe.setup_vring(q, base=base)
    fe.set_vring_enable(q.index, True)
    fe.sync()


def test_get_vring_base_stops_the_ring(daemon):
    c = daemon.client(num_request_queues=2)
    fe = c.fe
    q = fe.queues[1]
    for _ in range(5):
        c.wait(_getattr_on(c, 1)).check()
    # without SET_VRING_ENABLE 0 first: GET_VRING_BASE alone stops the ring
    base = fe.stop_queue(1, disable=False)
    assert base == q.avail_idx
    u = _getattr_on(c, 1)                      # published after the stop: not served
    assert_no_completion(q, 0.4)
    c.wait(_getattr_on(c, 2)).check()          # the other request queue is unaffected
    _restart_ring(fe, q, base)
    assert c.wait(u, timeout=5).check()        # served once the ring runs again
    assert fe.stop_queue(1) == q.avail_idx == base + 1


def _host_locked_file(daemon) -> int:
    """A file in the share that a host process (this one) holds write-locked; returns the fd."""
    path = Path(daemon.shared_dir) / "locked"
    path.write_bytes(b"x")
    fd = os.open(path, os.O_RDWR)
    fcntl.lockf(fd, fcntl.LOCK_EX)
    return fd


def test_get_vring_base_finishes_a_waiting_request(daemon):
    """A SETLKW waiting for a host lock when its ring is stopped is answered (EINTR) before
    GET_VRING_BASE returns: no request is left behind on a stopped ring."""
    c = daemon.client()
    fd = _host_locked_file(daemon)
    try:
        e = c.lookup(FUSE_ROOT_ID, "locked")
        o = c.open(e.nodeid, os.O_RDWR)
        q = c.fe.queues[1]
        u = c.submit(Op.SETLKW, e.nodeid,
                     [F.LK_IN.pack(o.fh, 5, 0, 2**63 - 1, fcntl.F_WRLCK, 1, 0, 0)], queue=1)
        c.wait(_getattr_on(c, 1)).check()      # served after the SETLKW was taken up
        assert u in c._pending
        t0 = time.monotonic()
        base = c.fe.stop_queue(1)
        assert time.monotonic() - t0 < 5
        assert base == q.avail_idx
        with pytest.raises(FuseError) as ei:
            c.wait(u, timeout=1).check()
        assert ei.value.errno == errno.EINTR
    finally:
        os.close(fd)


def test_set_vring_enable_0_pauses(daemon):
    c = daemon.client(num_request_queues=2)
    fe = c.fe
    q = fe.queues[1]
    c.wait(_getattr_on(c, 1)).check()
    fe.set_vring_enable(1, False)
    fe.sync()
    us = [_getattr_on(c, 1) for _ in range(3)]
    assert_no_completion(q, 0.4)
    c.wait(_getattr_on(c, 2)).check()
    fe.set_vring_enable(1, True)
    fe.sync()
    for u in us:
        assert c.wait(u, timeout=5).check()


@pytest.mark.parametrize("mem", ["set_mem_table", "add_mem_reg"])
def test_guest_reboot(daemon, mem):
    """QEMU's path through a guest reboot: every ring stopped (SET_VRING_ENABLE 0 +
    GET_VRING_BASE), RESET_DEVICE, a different memory table (SET_MEM_TABLE, or REM_MEM_REG +
    ADD_MEM_REG), the device started again, and a new FUSE session (INIT) that does not see
    the old one's node ids."""
    proto = DEFAULT_PROTOCOL_FEATURES
    if mem == "set_mem_table":
        proto &= ~_bit(ProtoFeature.CONFIGURE_MEM_SLOTS)
    fe = daemon.frontend(protocol_features=proto, num_request_queues=2)
    c = FuseClient(fe)
    c.init()
    (Path(daemon.shared_dir) / "f").write_bytes(b"hello")
    old = c.lookup(FUSE_ROOT_ID, "f").nodeid
    queues = list(fe.queues)
    bases = fe.stop()
    assert bases == [q.avail_idx for q in queues]
    fe.reset_device()
    old_ram = fe.ram
    new_ram = GuestRam(32 * MiB, gpa_base=0x40000000, regions=2, region_gap=1 << 20,
                       mmap_offset=8192)
    if mem == "add_mem_reg":
        for r in old_ram.regions:
            fe.remove_mem_region(r)
    fe.ram = new_ram                   # the frontend closes it (it owned the old one)
    old_ram.close()
    fe.start()
    assert "device reset" in daemon.log()
    c2 = FuseClient(fe)
    with pytest.raises(FuseError) as ei:
        c2.getattr(FUSE_ROOT_ID)       # a fresh device: no FUSE session yet
    assert ei.value.errno == errno.EIO
    c2.init()
    assert c2.lookup(FUSE_ROOT_ID, "f").nodeid
    with pytest.raises(FuseError) as ei:
        c2.getattr(old)                # node ids of the old session are gone
    assert ei.value.errno in (errno.EBADF, errno.ENOENT)
    for i in (1, 2):
        c2.wait(_getattr_on(c2, i)).check()


# ------------------------------------------------------------------------------------------
# How the process ends
# ------------------------------------------------------------------------------------------

def _files_gone(d, timeout=5.0):
    deadline = time.monotonic() + timeout
    while os.path.exists(d.socket_path) or os.path.exists(d.pid_path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_exit_0_when_the_frontend_disconnects(daemon):
    c = daemon.client()
    assert not os.path.exists(daemon.socket_path)   # unlinked once the frontend is in
    assert os.path.exists(daemon.pid_path)
    c.getattr(FUSE_ROOT_ID)
    c.close()
    assert daemon.wait_exit(10) == 0
    assert _files_gone(daemon)
    assert "frontend disconnected" in daemon.log()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_while_listening(daemon, sig):
    daemon.signal(sig)
    assert daemon.wait_exit(10) == 0
    assert _files_gone(daemon)
    assert "stopping on signal" in daemon.log()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_as_soon_as_the_socket_appears(tmp_path, sig):
    """A supervisor may signal the daemon the moment its socket exists, before the pid file
    is written or anything else is set up: still a clean exit 0 with both files removed."""
    from .daemon import Daemon
    for _ in range(8):
        d = Daemon(tmp_path).start(wait=False)
        try:
            deadline = time.monotonic() + 15
            while not os.path.exists(d.socket_path):
                assert d.proc.poll() is None, d.log()
                assert time.monotonic() < deadline
            d.signal(sig)
            assert d.wait_exit(10) == 0, d.log()
            assert _files_gone(d, 1.0), "socket or pid file left behind"
            d.check_log()
        finally:
            d.finish()


def test_sigterm_with_requests_in_flight(daemon):
    c = daemon.client(num_request_queues=2)
    e, o = c.create(FUSE_ROOT_ID, "f")
    c.write(e.nodeid, o.fh, 0, os.urandom(1 << 20))
    for i in range(48):
        c.submit_read(e.nodeid, o.fh, (i * 4096) % (1 << 20), 64 * 1024, kick=True)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(10) == 0
    assert _files_gone(daemon)


def test_sigterm_storm(start_daemon):
    """SIGTERM repeated every half millisecond until the daemon is gone (a supervisor and a
    process-group kill at once): the first one stops it, the others must not turn the clean
    exit into death by signal."""
    for _ in range(3):
        d = start_daemon()
        c = d.client()
        for _ in range(16):
            c.submit(Op.GETATTR, FUSE_ROOT_ID, [GETATTR_BODY], [F.ATTR_OUT_SIZE])
        deadline = time.monotonic() + 10
        while d.proc.poll() is None and time.monotonic() < deadline:
            try:
                os.kill(d.pid, signal.SIGTERM)
            except ProcessLookupError:
                break
            time.sleep(0.0005)
        assert d.wait_exit(10) == 0
        assert _files_gone(d)


def test_frontend_dies_with_requests_in_flight(daemon):
    c = daemon.client(num_request_queues=2)
    e, o = c.create(FUSE_ROOT_ID, "f")
    for i in range(60):
        c.submit_write(e.nodeid, o.fh, i * 65536, os.urandom(65536), kick=True)
    c.close()
    assert daemon.wait_exit(10) == 0
    assert _files_gone(daemon)


def test_frontend_dies_while_a_request_waits(daemon):
    """A SETLKW waiting for a host lock must not keep the daemon alive after its frontend
    is gone."""
    c = daemon.client()
    fd = _host_locked_file(daemon)
    try:
        e = c.lookup(FUSE_ROOT_ID, "locked")
        o = c.open(e.nodeid, os.O_RDWR)
        c.submit(Op.SETLKW, e.nodeid, [F.LK_IN.pack(o.fh, 5, 0, 10, fcntl.F_WRLCK, 1, 0, 0)])
        time.sleep(0.2)
        t0 = time.monotonic()
        c.close()
        assert daemon.wait_exit(10) == 0
        assert time.monotonic() - t0 < 5
    finally:
        os.close(fd)


def test_frontend_dies_in_the_middle_of_a_message(daemon):
    fe = daemon.frontend(start=False)
    # SET_MEM_TABLE header announcing 40 bytes, 10 of them sent, then the frontend is gone
    fe.conn.send_raw(F.VhostUserConnection.encode(Req.SET_MEM_TABLE, b"", size=40) + b"\0" * 10)
    fe.close()
    assert daemon.wait_exit(10) == 0
    assert _files_gone(daemon)
    assert "in the middle of a message" in daemon.log()

"""Guest locks reach the host: they exclude host processes and other guest lock owners."""

import errno
import fcntl
import os
import struct
import subprocess
import sys
import threading
import time

import pytest

from pyvirtiofs.fuse.abi import Opcode
from pyvirtiofs.fuse.server import DEFERRED, FuseServer
from pyvirtiofs.passthrough import PassthroughFs
from pyvirtiofs.virtqueue import DescriptorChain

from .fuse_direct import DirectClient, Reply

OFFSET_MAX = 0x7FFFFFFFFFFFFFFF


@pytest.fixture
def setup(tmp_path):
    (tmp_path / "f").write_bytes(b"x" * 100)
    fs = PassthroughFs(str(tmp_path))
    c = DirectClient(FuseServer(fs))
    c.init()
    r = c.call(Opcode.LOOKUP, 1, b"f\0")
    nodeid = struct.unpack_from("<Q", r.body)[0]
    fh = struct.unpack_from("<Q", c.call(Opcode.OPEN, nodeid, struct.pack("<II", os.O_RDWR, 0)).body)[0]
    yield c, nodeid, fh, tmp_path / "f"
    fs.close()


def lk(fh, owner, start, end, type_, flock=False):
    return struct.pack("<QQQQIIII", fh, owner, start, end, type_, 0, 1 if flock else 0, 0)


def setlkw_chain(nodeid, unique, lock_args, head=3):
    """A SETLKW request as a chain of its own, and the buffer its reply will land in."""
    writable = [memoryview(bytearray(64))]
    hdr = struct.pack("<IIQQIIIHH", 88, Opcode.SETLKW, unique, nodeid, 0, 0, 1, 0, 0)
    return DescriptorChain(head, [memoryview(bytearray(hdr + lk(*lock_args)))], writable), writable


def test_guest_posix_lock_excludes_host_process(setup):
    c, nodeid, fh, path = setup
    assert c.call(Opcode.SETLK, nodeid, lk(fh, 1, 0, 9, fcntl.F_WRLCK)).error == 0
    probe = ("import fcntl,sys\nf=open(sys.argv[1],'r+')\n"
             "try:\n fcntl.lockf(f, fcntl.LOCK_EX|fcntl.LOCK_NB, 10, 0)\n print('got')\n"
             "except OSError:\n print('busy')\n")
    out = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True)
    assert out.stdout.strip() == "busy"
    # outside the locked range the host is free
    probe2 = probe.replace("10, 0)", "10, 50)")
    out = subprocess.run([sys.executable, "-c", probe2, str(path)], capture_output=True, text=True)
    assert out.stdout.strip() == "got"


def test_two_guest_owners_conflict_and_getlk_reports(setup):
    c, nodeid, fh, _ = setup
    assert c.call(Opcode.SETLK, nodeid, lk(fh, 1, 0, OFFSET_MAX, fcntl.F_WRLCK)).error == 0
    r = c.call(Opcode.SETLK, nodeid, lk(fh, 2, 5, 5, fcntl.F_RDLCK))
    assert r.errno == errno.EAGAIN
    g = c.call(Opcode.GETLK, nodeid, lk(fh, 2, 5, 5, fcntl.F_RDLCK))
    start, end, type_, pid = struct.unpack("<QQII", g.body)
    assert (start, end, type_) == (0, OFFSET_MAX, fcntl.F_WRLCK)
    # the same owner may relock (POSIX semantics)
    assert c.call(Opcode.SETLK, nodeid, lk(fh, 1, 5, 5, fcntl.F_RDLCK)).error == 0
    # closing (FLUSH) releases owner 1's locks
    assert c.call(Opcode.FLUSH, nodeid, struct.pack("<QIIQ", fh, 0, 0, 1)).error == 0
    assert c.call(Opcode.SETLK, nodeid, lk(fh, 2, 5, 5, fcntl.F_RDLCK)).error == 0


def test_flock_is_per_open_file(setup):
    c, nodeid, fh, path = setup
    fh2 = struct.unpack_from("<Q", c.call(Opcode.OPEN, nodeid, struct.pack("<II", os.O_RDONLY, 0)).body)[0]
    assert c.call(Opcode.SETLK, nodeid, lk(fh, 1, 0, 0, fcntl.F_WRLCK, flock=True)).error == 0
    assert c.call(Opcode.SETLK, nodeid, lk(fh2, 1, 0, 0, fcntl.F_WRLCK, flock=True)).errno == errno.EAGAIN
    with open(path) as f:
        with pytest.raises(BlockingIOError):
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_setlkw_waits_off_the_queue_and_is_granted(setup):
    c, nodeid, fh, path = setup
    host = open(path, "r+")
    fcntl.lockf(host, fcntl.LOCK_EX, 0, 0)
    done = threading.Event()
    result = {}

    def complete(head, n):
        result["n"] = n
        done.set()

    chain, writable = setlkw_chain(nodeid, 77, (fh, 9, 0, OFFSET_MAX, fcntl.F_WRLCK))
    assert c.server.serve_request(chain, complete) == DEFERRED
    # other requests are served meanwhile
    assert c.call(Opcode.GETATTR, nodeid, bytes(16)).error == 0
    assert not done.wait(0.2)
    fcntl.lockf(host, fcntl.LOCK_UN)
    assert done.wait(5)
    rep = Reply(bytes(writable[0])[:result["n"]])
    assert rep.error == 0 and rep.unique == 77
    host.close()


def test_setlkw_is_interruptible(setup):
    c, nodeid, fh, path = setup
    host = open(path, "r+")
    fcntl.lockf(host, fcntl.LOCK_EX, 0, 0)
    done = threading.Event()
    chain, writable = setlkw_chain(nodeid, 78, (fh, 9, 0, OFFSET_MAX, fcntl.F_WRLCK))
    assert c.server.serve_request(chain, lambda h, n: done.set()) == DEFERRED
    assert c.call(Opcode.INTERRUPT, 0, struct.pack("<Q", 78)) is None
    assert done.wait(5)
    assert Reply(bytes(writable[0])).errno == errno.EINTR
    host.close()


def test_a_wait_that_would_deadlock_gets_edeadlk(setup):
    c, nodeid, fh, path = setup
    # owner 1 holds [0,9], owner 2 holds [20,29]; owner 1 waits for [20,29]
    assert c.call(Opcode.SETLK, nodeid, lk(fh, 1, 0, 9, fcntl.F_WRLCK)).error == 0
    assert c.call(Opcode.SETLK, nodeid, lk(fh, 2, 20, 29, fcntl.F_WRLCK)).error == 0
    done = threading.Event()
    chain, writable = setlkw_chain(nodeid, 90, (fh, 1, 20, 29, fcntl.F_WRLCK))
    assert c.server.serve_request(chain, lambda h, n: done.set()) == DEFERRED
    # owner 2 now waiting for [0,9] would close the cycle: EDEADLK at once
    chain2, w2 = setlkw_chain(nodeid, 91, (fh, 2, 0, 9, fcntl.F_WRLCK), head=4)
    n = c.server.serve_request(chain2, lambda h, n: None)
    assert n != DEFERRED and Reply(bytes(w2[0])[:n]).errno == errno.EDEADLK
    # owner 2 unlocks: owner 1's wait is granted
    assert c.call(Opcode.SETLK, nodeid, lk(fh, 2, 20, 29, fcntl.F_UNLCK)).error == 0
    assert done.wait(5)
    assert Reply(bytes(writable[0])).error == 0


def test_closing_the_file_cancels_the_owners_waiting_lock(setup):
    c, nodeid, fh, path = setup
    host = open(path, "r+")
    fcntl.lockf(host, fcntl.LOCK_EX, 0, 0)
    done = threading.Event()
    chain, writable = setlkw_chain(nodeid, 79, (fh, 42, 0, OFFSET_MAX, fcntl.F_WRLCK))
    assert c.server.serve_request(chain, lambda h, n: done.set()) == DEFERRED
    # the waiting process dies: its close sends FLUSH with its lock owner
    assert c.call(Opcode.FLUSH, nodeid, struct.pack("<QIIQ", fh, 0, 0, 42)).error == 0
    assert done.wait(5)
    assert Reply(bytes(writable[0])).errno == errno.EINTR
    fcntl.lockf(host, fcntl.LOCK_UN)
    time.sleep(0.2)
    # and it never takes the lock afterwards: the host can lock the file again
    fcntl.lockf(host, fcntl.LOCK_EX | fcntl.LOCK_NB, 0, 0)
    host.close()

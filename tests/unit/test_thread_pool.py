"""--thread-pool-size: with several requests waiting, the pool serves them concurrently; every
reply still lands on the right request, byte for byte, and a request that blocks does not hold
up the rest.

The blocking request is real: a host process holds a read lease on a file, so the daemon's
open() of it for writing waits in the kernel until the lease is given up (lease-break-time,
45 s by default, is far longer than the test)."""

import fcntl
import os
import signal

import pytest

from pyvirtiofs.testing.frontend import FUSE_ROOT_ID, OPEN_IN, OPEN_OUT, Op
from pyvirtiofs.testing import frontend as F

from . import test_virtqueue_daemon as vq_tests

F_SETLEASE = 1024


@pytest.fixture
def pooled(start_daemon):
    return start_daemon(extra_args=["--thread-pool-size=4"])


def test_pool_qd64_writes_and_reads_are_exact(pooled):
    vq_tests.test_qd64_on_a_1024_entry_queue(pooled)


def test_pool_qd64_reads_of_every_size(pooled):
    vq_tests.test_qd64_reads_are_exact(pooled)


@pytest.mark.parametrize("pool", [4, 0])
def test_a_blocked_open_holds_up_the_others_only_without_a_pool(start_daemon, tmp_path, pool):
    if os.geteuid() != 0:
        pytest.fail("needs root (CAP_LEASE) to hold a lease on the daemon's file", pytrace=False)
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "leased").write_text("x")
    c = start_daemon(shared, extra_args=[f"--thread-pool-size={pool}"]).client()
    nodeid = c.lookup(FUSE_ROOT_ID, "leased").nodeid
    old = signal.signal(signal.SIGIO, lambda *a: None)  # the lease-break notice comes to us
    lease_fd = os.open(shared / "leased", os.O_RDONLY)
    try:
        fcntl.fcntl(lease_fd, F_SETLEASE, fcntl.F_RDLCK)
        # one batch: the OPEN for writing first (it blocks on the lease), then 20 GETATTRs
        blocked = c.submit(Op.OPEN, nodeid, [OPEN_IN.pack(os.O_WRONLY, 0)], [OPEN_OUT.size],
                           kick=False)
        others = [c.submit(Op.GETATTR, FUSE_ROOT_ID, [bytes(16)], [F.ATTR_OUT_SIZE], kick=False)
                  for _ in range(20)]
        c.kick_all()
        if pool:
            for u in others:  # answered while the OPEN still waits
                assert c.wait(u, timeout=30).check().data
            assert blocked not in c.poll_completions(0.2)
        else:  # the queue's one thread is stuck in open(): nothing behind it is answered
            assert c.poll_completions(1.0) == []
    finally:
        fcntl.fcntl(lease_fd, F_SETLEASE, fcntl.F_UNLCK)
        os.close(lease_fd)
        signal.signal(signal.SIGIO, old)
    assert c.wait(blocked, timeout=30).check().data  # the open goes through once the lease is gone
    if not pool:
        for u in others:
            assert c.wait(u, timeout=30).check().data

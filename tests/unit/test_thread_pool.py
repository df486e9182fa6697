"""--thread-pool-size: with several requests waiting, the pool serves them concurrently; every
reply still lands on the right request, byte for byte, and a request that blocks (a slow
fsync, here a waiting lock) does not hold up the rest."""

import os

import pytest

from . import test_virtqueue_daemon as vq_tests


@pytest.fixture
def pooled(start_daemon):
    return start_daemon(extra_args=["--thread-pool-size=4"])


def test_pool_qd64_writes_and_reads_are_exact(pooled):
    vq_tests.test_qd64_on_a_1024_entry_queue(pooled)


def test_pool_qd64_reads_of_every_size(pooled):
    vq_tests.test_qd64_reads_are_exact(pooled)


def test_pool_threads_serve_the_requests(pooled):
    c = pooled.client(queue_size=1024)
    uniques = [c.submit(3, 1, [bytes(16)], [104], kick=False) for _ in range(200)]  # GETATTR
    c.kick_all()
    for u in uniques:
        assert c.wait(u).check().data
    # main thread + hiprio + request queue, plus the pool's threads (started on demand)
    assert len(os.listdir(f"/proc/{pooled.pid}/task")) > 3

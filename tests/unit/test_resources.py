"""Running out of file descriptors is an errno for the guest, not a crash: every looked-up
inode holds an O_PATH fd, so a tight --rlimit-nofile makes lookups fail with EMFILE, and
forgetting inodes makes room again."""

import errno
import time

import pytest

from pyvirtiofs.testing.frontend import FuseError


def test_fd_exhaustion_answers_emfile_and_recovers(start_daemon, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    for i in range(200):
        (shared / f"f{i}").write_text("x")
    d = start_daemon(shared, extra_args=["--rlimit-nofile=96"])
    c = d.client()
    got, failed = [], []
    for i in range(200):
        try:
            got.append(c.lookup(1, f"f{i}").nodeid)
        except FuseError as e:
            failed.append(e.errno)
    assert got and failed, (len(got), failed[:3])
    assert set(failed) <= {errno.EMFILE, errno.ENFILE}
    c.batch_forget([(n, 1) for n in got])
    # the daemon is alive and has room again (the hiprio queue is served by its own thread)
    for _ in range(100):
        try:
            entry = c.lookup(1, "f199")
            break
        except FuseError as e:
            assert e.errno == errno.EMFILE
            time.sleep(0.05)
    assert entry.attr.size == 1
    assert c.getattr(1).attr.mode & 0o040000

"""SETATTR on a symlink's own inode, at daemon level (the guest's `touch -h` and `lchown`):
times and ownership land on the link on the host, the target keeps its own; a mode change,
which Linux has no way to apply to a symlink, answers EOPNOTSUPP.  With inode file handles
the inode is reopened from its handle for the request; the result must be the same."""

from __future__ import annotations

import errno
import os

import pytest

from pyvirtiofs.testing.frontend import FUSE_ROOT_ID, FuseError


@pytest.mark.parametrize("extra", [[], ["--inode-file-handles=mandatory"]])
def test_symlink_times_and_owner_are_the_links_own(start_daemon, tmp_path, extra):
    if os.geteuid() != 0:
        pytest.fail("needs root: the daemon changes a symlink's owner", pytrace=False)
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "target").write_text("t")
    os.utime(shared / "target", ns=(7_000_000_000, 8_000_000_000))
    c = start_daemon(shared, extra_args=extra).client()
    link = c.symlink(FUSE_ROOT_ID, "link", "target").nodeid

    a = c.setattr(link, atime=(1, 123), mtime=(2, 456))
    st = os.lstat(shared / "link")
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_123, 2_000_000_456)
    assert (a.attr.mtime, a.attr.mtimensec) == (2, 456)  # the reply shows the link, too

    a = c.setattr(link, uid=123, gid=456)
    assert (os.lstat(shared / "link").st_uid, os.lstat(shared / "link").st_gid) == (123, 456)
    assert (a.attr.uid, a.attr.gid) == (123, 456)

    c.setattr(link, atime_now=True, mtime_now=True)
    assert os.lstat(shared / "link").st_mtime_ns > 2_000_000_456

    with pytest.raises(FuseError) as ei:
        c.setattr(link, mode=0o600)
    assert ei.value.errno == errno.EOPNOTSUPP

    st = os.stat(shared / "target")
    assert (st.st_atime_ns, st.st_mtime_ns, st.st_uid, st.st_gid) == \
        (7_000_000_000, 8_000_000_000, 0, 0)
    assert os.readlink(shared / "link") == "target"

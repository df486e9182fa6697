"""Running out of file descriptors is an errno for the guest, not a crash: every looked-up
inode holds an O_PATH fd, so a tight --rlimit-nofile makes lookups fail with EMFILE, and
forgetting inodes makes room again."""

import errno
import os
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


@pytest.mark.parametrize("mode", ["prefer", "mandatory"])
def test_inode_file_handles_need_no_fd_per_inode(start_daemon, tmp_path, mode):
    """With --inode-file-handles, 300 looked-up inodes fit under a 96-fd limit, and every
    operation on them still works (the fd is opened from the handle for one request)."""
    shared = tmp_path / "shared"
    (shared / "dir").mkdir(parents=True)
    for i in range(300):
        (shared / "dir" / f"f{i}").write_text(f"content {i}")
    d = start_daemon(shared, extra_args=["--rlimit-nofile=96", f"--inode-file-handles={mode}"])
    c = d.client()
    dirent = c.lookup(1, "dir")
    nodes = [c.lookup(dirent.nodeid, f"f{i}").nodeid for i in range(300)]
    assert len(set(nodes)) == 300
    assert len(os.listdir(f"/proc/{d.pid}/fd")) < 60
    o = c.open(nodes[123], os.O_RDWR)
    assert c.read(nodes[123], o.fh, 0, 100) == b"content 123"
    c.write(nodes[123], o.fh, 0, b"C")
    c.release(nodes[123], o.fh)
    assert (shared / "dir" / "f123").read_text() == "Content 123"
    entry, opened = c.create(dirent.nodeid, "new")
    c.release(entry.nodeid, opened.fh)
    c.rename(dirent.nodeid, "new", 1, "moved")
    assert (shared / "moved").exists()
    assert len(c.listdir(dirent.nodeid)) >= 300
    assert len(os.listdir(f"/proc/{d.pid}/fd")) < 60


@pytest.mark.parametrize("mode", ["never", "mandatory"])
def test_guest_users_create_files_with_inode_file_handles(start_daemon, tmp_path, mode):
    """A guest user (not root) creates files, directories, nodes and symlinks, owned by that
    user.  With file handles the parent is opened from its handle: before the daemon takes
    the user's fsuid, which drops the capability open_by_handle_at needs (once EPERM)."""
    if os.geteuid() != 0:
        pytest.fail("needs root: the daemon creates files as the guest's uid", pytrace=False)
    shared = tmp_path / "shared"
    (shared / "dir").mkdir(parents=True)
    os.chmod(shared / "dir", 0o777)
    d = start_daemon(shared, extra_args=[f"--inode-file-handles={mode}"])
    c = d.client(client_kwargs={"uid": 1000, "gid": 1000})
    parent = c.lookup(1, "dir").nodeid
    entry, opened = c.create(parent, "file", 0o644)
    c.release(entry.nodeid, opened.fh)
    c.mkdir(parent, "sub", 0o755)
    c.mknod(parent, "fifo", 0o010644)
    c.symlink(parent, "link", "file")
    for name in ("file", "sub", "fifo", "link"):
        st = os.lstat(shared / "dir" / name)
        assert (st.st_uid, st.st_gid) == (1000, 1000), name

"""PathView: an inode-level file system used through paths (the layers of the overlay
example).  Every call gives back the references it took; an open file holds one until release."""

import errno
import importlib.util
import os
import stat
from pathlib import Path

import pytest

import pyvirtiofs
from pyvirtiofs import FsError, PathView
from pyvirtiofs.passthrough import PassthroughFs

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def memory_fs():
    spec = importlib.util.spec_from_file_location("example_memory_fs", EXAMPLES / "memory_fs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.MemoryFs()


def test_a_host_directory_through_paths(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "old").write_bytes(b"old contents")
    v = PathView(PassthroughFs(str(tmp_path)))
    assert sorted(v.readdir("/")) == ["d"]
    assert v.read("/d/old", v.open("/d/old", os.O_RDONLY), 4, 100) == b"contents"
    fh = v.create("/d/new", stat.S_IFREG | 0o640, os.O_WRONLY)
    assert v.write("/d/new", fh, 0, b"hello") == 5
    v.release("/d/new", fh)
    v.mkdir("/d/sub", 0o750)
    v.symlink("/d/sub/link", "../new")
    v.rename("/d/new", "/d/sub/moved", 0)
    v.truncate("/d/sub/moved", 2)
    v.chown("/d/sub/moved", 1234, 5678)
    v.chmod("/d/sub/moved", 0o4711)
    v.utimens("/d/sub/moved", 1_000_000_000, 2_000_000_000)
    st = os.stat(tmp_path / "d" / "sub" / "moved")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 5678, 0o4711)
    assert (st.st_atime_ns, st.st_mtime_ns, st.st_size) == (1_000_000_000, 2_000_000_000, 2)
    assert stat.S_IMODE(os.stat(tmp_path / "d" / "sub").st_mode) == 0o750  # modes as given
    assert v.readlink("/d/sub/link") == "../new"
    assert v.getattr("/d/sub/moved").st_size == 2
    assert v.stat("/d/missing") is None and v.stat("/d/old/below-a-file") is None
    with pytest.raises(FileNotFoundError):
        v.getattr("/d/missing")
    v.unlink("/d/sub/link")
    v.unlink("/d/sub/moved")
    v.rmdir("/d/sub")
    assert sorted(os.listdir(tmp_path / "d")) == ["old"]
    assert v.statfs("/").f_bsize > 0


def test_references_are_given_back(tmp_path):
    fs = memory_fs()
    v = PathView(fs)
    v.mkdir("/a", 0o755)
    v.mkdir("/a/b", 0o755)
    fh = v.create("/a/b/f", stat.S_IFREG | 0o644, os.O_RDWR)
    v.write("/a/b/f", fh, 0, b"x")
    v.symlink("/a/l", "b/f")
    v.link("/a/b/f", "/a/hard")
    v.readdir("/a")
    v.getattr("/a/b/f")
    v.chmod("/a/b/f", 0o600)
    assert v.stat("/a/nope") is None
    with pytest.raises(FsError) as ei:
        v.open("/a/nope/deeper", os.O_RDONLY)
    assert ei.value.errno == errno.ENOENT
    assert len(fs.nodes) == 2  # the root and the file still open (one reference)
    opened = fs.nodes.inode_of(fs.nodes[fh.inode])
    assert fs.nodes.count(opened) == 1
    v.release("/a/b/f", fh)
    again = v.open("/a/hard", os.O_RDONLY)
    assert v.read("/a/hard", again, 0, 10) == b"x"
    v.release("/a/hard", again)
    assert len(fs.nodes) == 1  # the root only: every lookup was forgotten


def test_a_path_view_serves_like_the_file_system_it_views(tmp_path):
    # PathView is a PathFileSystem: served (PathAdapter), the guest sees the directory
    from pyvirtiofs.testing.frontend import FuseClient
    (tmp_path / "share").mkdir()
    (tmp_path / "share" / "f").write_bytes(b"through two adapters")
    sock = str(tmp_path / "s.sock")
    with pyvirtiofs.Server(PathView(PassthroughFs(str(tmp_path / "share"))), sock), \
            FuseClient.connect(sock) as c:
        e = c.lookup(1, b"f")
        fh = c.open(e.nodeid).fh
        assert c.read(e.nodeid, fh, 0, 100) == b"through two adapters"
        c.release(e.nodeid, fh)

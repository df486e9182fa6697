"""The library's public face: what ``import pyvirtiofs`` offers, served to the test frontend
(a vhost-user frontend of its own, playing QEMU and the guest driver)."""

from __future__ import annotations

import asyncio
import errno
import importlib.util
import os
import socket
import stat
import sys
import threading
from pathlib import Path

import pytest

import pyvirtiofs
from pyvirtiofs import Attr, Entry, FileType, FsError, StatFs
from pyvirtiofs.testing.frontend import FuseClient, FuseError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def sock(tmp_path):
    return str(tmp_path / "fs.sock")


def test_public_names_are_exported():
    for name in pyvirtiofs.__all__:
        assert hasattr(pyvirtiofs, name), name
    for name in ("FileSystem", "PathFileSystem", "InodeTable", "serve", "Server", "mount", "mount", "Mount",
                 "FsError", "Attr", "Entry", "DirEntry", "StatFs", "Context", "FileType"):
        assert name in pyvirtiofs.__all__, name
    assert (Path(pyvirtiofs.__file__).parent / "py.typed").exists()


def test_capabilities_belong_to_each_instance():
    a, b = pyvirtiofs.FileSystem(), pyvirtiofs.FileSystem()
    a.capabilities.posix_locks = True
    assert not b.capabilities.posix_locks
    assert not pyvirtiofs.FileSystem().capabilities.posix_locks


def test_file_types_are_named():
    assert FileType.of_mode(stat.S_IFDIR | 0o755) == FileType.DIR == 4
    assert FileType.of_mode(stat.S_IFREG) == FileType.REG == 8
    assert FileType.of_mode(stat.S_IFLNK) == FileType.LNK


class OneFile(pyvirtiofs.FileSystem):
    """getattr and lookup answer the same type; statfs answers a StatFs."""
    def lookup(self, parent, name, ctx):
        if name != b"f":
            raise FsError(errno.ENOENT)
        return self.getattr(2, None, ctx)

    def getattr(self, inode, fh, ctx):
        mode = stat.S_IFDIR | 0o755 if inode == 1 else stat.S_IFREG | 0o600
        return Entry(inode, Attr(st_ino=inode + 100, st_mode=mode, st_size=5), attr_timeout=7)

    def statfs(self, inode):
        return StatFs(f_blocks=1000, f_bfree=10, f_namemax=99)


def test_server_thread_serves_an_inode_filesystem(sock):
    with pyvirtiofs.Server(OneFile(), sock) as server:
        with FuseClient.connect(sock) as c:
            e = c.lookup(1, b"f")
            assert (e.nodeid, e.attr.ino, e.attr.size) == (2, 102, 5)
            a = c.getattr(2)
            assert (a.attr_valid, a.attr.mode) == (7, stat.S_IFREG | 0o600)
            s = c.statfs()
            assert (s.blocks, s.bfree, s.namelen) == (1000, 10, 99)
            with pytest.raises(FuseError) as ei:
                c.lookup(1, b"nope")
            assert ei.value.errno == errno.ENOENT
        assert server.wait(10), "the server did not end when the frontend left"
    assert server.error is None
    assert not os.path.exists(sock)


def test_serve_returns_when_the_frontend_leaves(sock):
    done = threading.Event()

    def run():
        pyvirtiofs.serve(OneFile(), sock)
        done.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    c = FuseClient.connect(sock, connect_timeout=10)
    assert c.lookup(1, b"f").nodeid == 2
    assert not done.is_set()
    c.close()
    assert done.wait(10)


def test_stop_before_any_frontend(sock):
    server = pyvirtiofs.Server(OneFile(), sock)
    assert os.path.exists(sock)  # listening as soon as it is made
    server.stop()
    assert not server.running and server.error is None


def test_bad_arguments_are_refused_clearly(sock):
    with pytest.raises(ValueError, match="queues"):
        pyvirtiofs.serve(OneFile(), sock, queues=0)
    with pytest.raises(TypeError, match="FileSystem"):
        pyvirtiofs.serve(object(), sock)
    path_fs = load_example("path_fs").DictFs()
    with pytest.raises(ValueError, match="unknown cache mode 'sometimes'; choose from never, "
                                         "auto, always, metadata"):
        pyvirtiofs.serve(path_fs, sock, cache="sometimes")
    # an inode-level file system answers its own timeouts and open flags
    with pytest.raises(ValueError, match="cache= is for a PathFileSystem; OneFile answers"):
        pyvirtiofs.Server(OneFile(), sock, cache="never")
    assert not os.path.exists(sock)


FOPEN_DIRECT_IO, FOPEN_KEEP_CACHE, FOPEN_CACHE_DIR = 1, 2, 8


@pytest.mark.parametrize("cache, timeout, file_flags, dir_flags", [
    (None, 1, 0, 0),  # the file system's entry_timeout (1 s), data cached while open
    ("never", 0, FOPEN_DIRECT_IO, 0),
    ("auto", 1, 0, 0),
    ("always", 86400, FOPEN_KEEP_CACHE, FOPEN_CACHE_DIR),
    ("metadata", 86400, FOPEN_DIRECT_IO, 0),
])
def test_cache_mode_of_a_path_filesystem(sock, cache, timeout, file_flags, dir_flags):
    # the same modes as pyvirtiofsd --cache, in what the guest is told
    with pyvirtiofs.Server(load_example("path_fs").DictFs(), sock, cache=cache), \
            FuseClient.connect(sock) as c:
        e = c.lookup(1, b"README")
        assert (e.entry_valid, e.attr_valid) == (timeout, timeout)
        assert c.getattr(e.nodeid).attr_valid == timeout
        assert c.open(e.nodeid).open_flags == file_flags
        assert c.create(1, b"new")[1].open_flags == file_flags
        assert c.opendir(1).open_flags == dir_flags


def test_listen_replaces_a_stale_socket_and_refuses_a_live_one(sock):
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(sock)
    stale.close()  # the file stays, nobody listens
    live = pyvirtiofs.listen(sock)
    try:
        with pytest.raises(pyvirtiofs.SocketInUse):
            pyvirtiofs.listen(sock)
    finally:
        live.close()


def test_listen_leaves_anything_but_a_socket_alone(sock):
    with open(sock, "w") as f:
        f.write("data")
    with pytest.raises(FileExistsError):
        pyvirtiofs.listen(sock)
    with open(sock) as f:
        assert f.read() == "data"


def test_queues_are_offered(sock):
    with pyvirtiofs.Server(OneFile(), sock, queues=3):
        with FuseClient.connect(sock, num_request_queues=3) as c:
            assert c.fe.max_queues == 4
            for q in (1, 2, 3):
                c.request_queue = q
                assert c.lookup(1, b"f").nodeid == 2


# -- the path level -----------------------------------------------------------------------

def test_path_example_through_the_frontend(sock):
    fs = load_example("path_fs").DictFs()
    with pyvirtiofs.Server(fs, sock), FuseClient.connect(sock) as c:
        readme = c.lookup(1, b"README")
        fh = c.open(readme.nodeid).fh
        assert c.read(readme.nodeid, fh, 0, 100) == b"files live in a Python dict\n"
        c.release(readme.nodeid, fh)
        d = c.mkdir(1, b"d")
        e, o = c.create(d.nodeid, b"x")
        assert c.write(e.nodeid, o.fh, 3, b"abc") == 3
        assert c.read(e.nodeid, o.fh, 0, 10) == b"\0\0\0abc"
        c.setattr(e.nodeid, size=4)
        assert c.getattr(e.nodeid).attr.size == 4
        c.release(e.nodeid, o.fh)
        names = sorted(x.name for x in c.listdir(d.nodeid))
        assert names == [b".", b"..", b"x"]
        c.rename(1, b"d", 1, b"e")
        # the node ids the guest holds follow the rename
        assert c.getattr(e.nodeid).attr.size == 4
        assert c.lookup(1, b"e").nodeid == d.nodeid
        assert fs.files["/e/x"] == b"\0\0\0a"
        with pytest.raises(FuseError) as ei:
            c.rmdir(1, b"e")
        assert ei.value.errno == errno.ENOTEMPTY
        c.unlink(d.nodeid, b"x")
        with pytest.raises(FuseError) as ei:
            c.getattr(e.nodeid)
        assert ei.value.errno == errno.ESTALE
        again, o2 = c.create(d.nodeid, b"x")  # the same path, a new file: a new node id
        assert again.nodeid != e.nodeid
        assert "/e/x" in fs.files


def test_setattr_request_applies_to_attributes():
    a = Attr(st_mode=stat.S_IFREG | 0o6755, st_uid=1, st_gid=2, st_atime_ns=10, st_mtime_ns=20,
             st_ctime_ns=30)
    pyvirtiofs.SetattrRequest().apply(a, now=99)  # nothing asked: only the change time moves
    assert (a.st_mode, a.st_uid, a.st_gid, a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns) == \
        (stat.S_IFREG | 0o6755, 1, 2, 10, 20, 99)
    pyvirtiofs.SetattrRequest(mode=stat.S_IFDIR | 0o640, uid=7, atime_ns=0, mtime_now=True
                              ).apply(a, now=100)
    assert (a.st_mode, a.st_uid, a.st_gid) == (stat.S_IFREG | 0o640, 7, 2)  # the type stays
    assert (a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns) == (0, 100, 100)  # 0 is the epoch
    pyvirtiofs.SetattrRequest(size=0).apply(a, now=101)  # truncate: a new modification time
    assert (a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns) == (0, 101, 101)
    for mode, left in ((0o6755, 0o755), (0o6745, 0o2745)):  # sgid without group x: a lock mark
        a.st_mode = stat.S_IFREG | mode
        pyvirtiofs.SetattrRequest(kill_suidgid=True).apply(a)
        assert a.st_mode == stat.S_IFREG | left


def test_inode_table_counts_references():
    t = pyvirtiofs.InodeTable("root")
    a = t.lookup("a")
    assert t.lookup("a") == a and t.count(a) == 2
    assert t.forget(a, 1) is None and t["a" and a] == "a"
    assert t.forget(a, 1) == "a"
    with pytest.raises(FsError) as ei:
        t[a]
    assert ei.value.errno == errno.ESTALE
    assert t.lookup("a") != a  # node ids are never reused
    t.forget(pyvirtiofs.ROOT_INODE, 5)
    assert t[pyvirtiofs.ROOT_INODE] == "root"


# -- coroutines ---------------------------------------------------------------------------

class SlowAsync(pyvirtiofs.PathFileSystem):
    """``/slow`` waits for an asyncio event; ``/fast`` answers at once."""
    def __init__(self):
        self.release_slow = None
        self.loop_thread = None

    async def getattr(self, path):
        self.loop_thread = threading.current_thread().name
        if path == "/slow" and self.release_slow is None:  # the first time only
            self.release_slow = asyncio.Event()
            await self.release_slow.wait()
        if path in ("/", "/slow", "/fast"):
            return Attr(st_mode=(stat.S_IFDIR if path == "/" else stat.S_IFREG) | 0o644)
        raise FsError(errno.ENOENT)

    async def readdir(self, path):
        for name in ("fast", "slow"):
            yield name


def test_coroutine_methods_do_not_hold_the_queue(sock):
    fs = SlowAsync()
    with pyvirtiofs.Server(fs, sock), FuseClient.connect(sock) as c:
        slow = c.submit(1, 1, [b"slow\0"], [128])  # LOOKUP, waits in the event loop
        for _ in range(1000):
            if fs.release_slow is not None:
                break
            threading.Event().wait(0.01)
        assert c.lookup(1, b"fast").nodeid > 1     # the same queue serves the next request
        assert not fs.release_slow.is_set()        # ... while the first one still waits
        assert fs.loop_thread == "pyvirtiofs-aio"
        with pytest.raises(FuseError) as ei:
            c.lookup(1, b"missing")
        assert ei.value.errno == errno.ENOENT
        pyvirtiofs.aio.loop().call_soon_threadsafe(fs.release_slow.set)
        assert c.wait(slow).error == 0
        assert sorted(x.name for x in c.listdir(1)) == [b".", b"..", b"fast", b"slow"]


class AsyncInodeFs(OneFile):
    async def read(self, inode, fh, offset, size):
        await asyncio.sleep(0)
        return b"hello"[offset:offset + size]

    def open(self, inode, flags, ctx):
        return pyvirtiofs.OpenResult(fh=9)


def test_async_read_of_an_inode_filesystem(sock):
    with pyvirtiofs.Server(AsyncInodeFs(), sock), FuseClient.connect(sock) as c:
        fh = c.open(2).fh
        assert c.read(2, fh, 1, 100) == b"ello"


# -- types --------------------------------------------------------------------------------

def test_mypy_is_clean_on_the_public_api():
    from mypy import api as mypy  # pinned in requirements-test.txt
    src = Path(pyvirtiofs.__file__).parent
    files = [str(src / f) for f in ("__init__.py", "filesystem.py", "inodes.py", "pathfs.py",
                                     "serving.py", "aio.py", "hostmount.py", "cache.py")]
    out, err, status = mypy.run(["--strict", "--follow-imports=silent",
                                 "--no-error-summary", "--cache-dir=/dev/null",
                                 "--python-version", "3.11", *files])
    assert status == 0, out + err


def undocumented() -> list[str]:
    import inspect
    missing = []
    for name in pyvirtiofs.__all__:
        obj = getattr(pyvirtiofs, name)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        if not (obj.__doc__ or "").strip():
            missing.append(name)
        if inspect.isclass(obj) and not issubclass(obj, int):
            for attr, member in vars(obj).items():
                if attr.startswith("_") or not inspect.isfunction(member):
                    continue
                if not inspect.getdoc(getattr(obj, attr)):  # an override may inherit its doc
                    missing.append(f"{name}.{attr}")
    return missing


def test_every_public_definition_is_documented():
    """Checked on the Python source (PYVIRTIOFS_PURE=1): classes compiled with mypyc keep no
    docstrings at run time."""
    import json
    import subprocess
    from .daemon import REPO, daemon_env
    env = dict(daemon_env(), PYVIRTIOFS_PURE="1")
    out = subprocess.run([sys.executable, "-c", "import json; from tests.unit.test_public_api "
                          "import undocumented; print(json.dumps(undocumented()))"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    missing = json.loads(out.stdout.splitlines()[-1])
    assert not missing, missing

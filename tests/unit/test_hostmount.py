"""The /dev/fuse transport: a file system mounted on this host by the same FUSE server that
serves VMs (needs root and /dev/fuse; fails, never skips, without them)."""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import shutil
import stat
import tempfile
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import pyvirtiofs
from pyvirtiofs.passthrough import PassthroughFs
from pyvirtiofs.testing import conformance, conformance_runner

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(autouse=True)
def need_fuse():
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.fail("host mounts need root and /dev/fuse", pytrace=False)


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def mounted(path) -> bool:
    return any(line.split()[4] == str(path) for line in open("/proc/self/mountinfo"))


def test_path_example_mounted_on_the_host(tmp_path):
    fs = load_example("path_fs").DictFs()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with pyvirtiofs.Mount(fs, mnt) as m:
        assert mounted(mnt)
        assert os.listdir(mnt) == ["README"]
        (mnt / "d").mkdir()
        data = os.urandom(3 << 20)  # several requests of the largest size
        (mnt / "d" / "f").write_bytes(data)
        os.rename(mnt / "d", mnt / "e")
        assert (mnt / "e" / "f").read_bytes() == data
        assert bytes(fs.files["/e/f"]) == data
        with pytest.raises(OSError) as ei:
            os.rmdir(mnt / "e")
        assert ei.value.errno == errno.ENOTEMPTY
        with pytest.raises(FileNotFoundError):
            os.stat(mnt / "nope")
    assert not m.mounted and not mounted(mnt)
    assert os.listdir(mnt) == []


class ChangingFile(pyvirtiofs.PathFileSystem):
    """One file whose contents change behind the kernel's back (as a network store's do)."""
    def __init__(self):
        self.data = b"old data\n"

    def getattr(self, path):
        if path == "/":
            return pyvirtiofs.Attr(st_mode=stat.S_IFDIR | 0o755, st_nlink=2)
        if path != "/f":
            raise pyvirtiofs.FsError(errno.ENOENT)
        return pyvirtiofs.Attr(st_mode=stat.S_IFREG | 0o644, st_size=len(self.data))

    def readdir(self, path):
        return ["f"]

    def read(self, path, fh, offset, size):
        return self.data[offset:offset + size]


@pytest.mark.parametrize("cache, sees_the_change", [("never", True), ("auto", True),
                                                    ("always", False)])
def test_cache_mode_decides_what_the_kernel_keeps(tmp_path, cache, sees_the_change):
    fs = ChangingFile()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with pyvirtiofs.Mount(fs, mnt, cache=cache):
        assert (mnt / "f").read_bytes() == b"old data\n"
        fs.data = b"NEW DATA\n"  # the same size: only the contents tell
        again = (mnt / "f").read_bytes()  # a new open: "always" keeps the page cache
        assert again == (b"NEW DATA\n" if sees_the_change else b"old data\n")
        if cache != "auto":  # auto trusts attributes for 1 s: either answer is right
            fs.data = b"longer data now\n"
            assert os.stat(mnt / "f").st_size == (16 if sees_the_change else 9)


def test_mount_returns_when_unmounted_from_outside(tmp_path):
    fs = load_example("hello_fs").Hello()
    done = threading.Event()

    def run():
        pyvirtiofs.mount(fs, tmp_path)
        done.set()

    threading.Thread(target=run, daemon=True).start()
    for _ in range(500):
        if mounted(tmp_path):
            break
        done.wait(0.01)
    assert (tmp_path / "hello").read_text() == "hello from Python\n"
    assert not done.is_set()
    subprocess.run(["umount", str(tmp_path)], check=True)
    assert done.wait(10), "mount() did not return after umount"


def test_mount_refuses_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(NotADirectoryError):
        pyvirtiofs.Mount(pyvirtiofs.FileSystem(), f)


@pytest.fixture
def open_tmp():
    """A directory every user can reach (cases run parts as uid 1000; pytest's tmp_path is
    inside a directory only root may enter)."""
    d = Path(tempfile.mkdtemp(prefix="pyvfs-mount-", dir="/tmp"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_conformance_cases_on_a_host_mount_match_the_host(open_tmp):
    """PassthroughFs mounted through /dev/fuse behaves as the directory behind it does
    natively, in every fast conformance case (but the documented known differences)."""
    native, shared, mnt = (open_tmp / n for n in ("native", "shared", "mnt"))
    for d in (native, shared, mnt):
        d.mkdir()

    def run(root):
        out = subprocess.run([sys.executable, conformance.__file__, "--root", str(root),
                              "--fast"], capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    expected = run(native)
    # One serving thread: the kernel drops an OFD lock at close only through the RELEASE it
    # sends in the background, and a second thread could serve the next SETLK (locks_ofd)
    # before that RELEASE. A virtio queue keeps that order; one /dev/fuse reader does too.
    with pyvirtiofs.Mount(PassthroughFs(str(shared)), mnt, threads=1):
        got = run(mnt)
    assert len(expected) >= 35
    differ = [f"{k}: mount {got.get(k)} host {v}" for k, v in expected.items()
              if got.get(k) != v and k not in conformance_runner.KNOWN_DIFFERENCES]
    assert not differ, "\n".join(differ)


def test_memory_example_on_a_host_mount_matches_tmpfs(open_tmp):
    """examples/memory_fs.py against /dev/shm (tmpfs) on this host, in the conformance cases
    within its scope (tests/e2e/test_examples.py runs the same in a guest)."""
    from tests.e2e.test_examples import memory_fs_cases
    ref = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        os.chmod(ref, 0o755)
        cases = memory_fs_cases()

        def run(root):
            out = subprocess.run([sys.executable, conformance.__file__, "--root", str(root),
                                  "--only", cases], capture_output=True, text=True, timeout=600)
            assert out.returncode == 0, out.stderr
            return json.loads(out.stdout)

        expected = run(ref)
        with pyvirtiofs.Mount(load_example("memory_fs").MemoryFs(), open_tmp):
            got = run(open_tmp)
    finally:
        shutil.rmtree(ref, ignore_errors=True)
    assert len(expected) >= 30
    differ = [f"{k}: mount {got.get(k)} tmpfs {v}" for k, v in expected.items()
              if got.get(k) != v]
    assert not differ, "\n".join(differ)


def test_memory_example_renameat2_matches_tmpfs_but_whiteout(open_tmp):
    """rename2_flags is out of the memory example's scope only for RENAME_WHITEOUT (EINVAL
    there): its NOREPLACE and EXCHANGE results are tmpfs's."""
    ref = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        def run(root):
            out = subprocess.run([sys.executable, conformance.__file__, "--root", str(root),
                                  "--only", "rename2_flags"], capture_output=True, text=True,
                                 timeout=120)
            assert out.returncode == 0, out.stderr
            return json.loads(out.stdout)["rename2_flags"]

        expected = run(ref)
        with pyvirtiofs.Mount(load_example("memory_fs").MemoryFs(), open_tmp):
            got = run(open_tmp)
    finally:
        shutil.rmtree(ref, ignore_errors=True)
    whiteout = 7  # the index of the RENAME_WHITEOUT result in the case's list
    assert isinstance(got, list), f"the case failed on the memory file system: {got}"
    assert got[:whiteout] == expected[:whiteout] and len(got[:whiteout]) == whiteout
    assert "EINVAL" in str(got[whiteout]), got

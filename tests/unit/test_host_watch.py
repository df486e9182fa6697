"""Host processes change the tree outside every daemon: the host watcher (python -m
pyvirtiofs.host_watch) bumps the version table for them, so a guest holding cached metadata
through a daemon on that table sees the change with one request."""

import os
import subprocess
import sys
import time

import pytest

from pyvirtiofs.testing.version_client import TableView, VersionedClient

from .daemon import daemon_env

WAIT = 20.0  # seconds the watcher may take on a loaded machine


@pytest.fixture
def watched(start_daemon, tmp_path, table_path):
    tree = tmp_path / "tree"
    (tree / "d1" / "d2").mkdir(parents=True)
    (tree / "f").write_bytes(b"hello")
    (tree / "f").chmod(0o644)
    (tree / "d1" / "d2" / "deep").write_bytes(b"x")
    c = start_daemon(tree, extra_args=(f"--version-table={table_path}",)).client(
        init=False, shmem=True)
    VersionedClient.init(c)
    view = TableView.from_region(c.fe.shmem_regions[1])
    log = open(tmp_path / "watch.log", "wb")
    w = subprocess.Popen([sys.executable, "-m", "pyvirtiofs.host_watch",
                          f"--version-table={table_path}", f"--shared-dir={tree}"],
                         stdout=log, stderr=subprocess.STDOUT, env=daemon_env())
    deadline = time.monotonic() + WAIT
    while b"watching" not in (tmp_path / "watch.log").read_bytes():
        assert w.poll() is None and time.monotonic() < deadline, \
            (tmp_path / "watch.log").read_text()
        time.sleep(0.05)
    yield tree, VersionedClient(c, view), view
    w.terminate()
    assert w.wait(30) == 0
    log.close()
    text = (tmp_path / "watch.log").read_text()
    assert "Traceback" not in text, text
    view.close()


def _changed(b, view, slot, before):
    deadline = time.monotonic() + WAIT
    while view.version(slot) == before:
        assert time.monotonic() < deadline, "the watcher did not bump the slot"
        time.sleep(0.02)


def _one_request(b, fn):
    before = b.requests
    out = fn()
    return out, b.requests - before


def test_host_chmod_and_write_are_bumped(watched):
    tree, b, view = watched
    b.stat("f")
    slot = b._attrs[b.resolve("f")].slot
    v = view.version(slot)
    os.chmod(tree / "f", 0o600)
    _changed(b, view, slot, v)
    attr, n = _one_request(b, lambda: b.stat("f"))
    assert (attr.mode & 0o777, n) == (0o600, 1)
    v = view.version(slot)
    with open(tree / "f", "ab") as f:
        f.write(b" world")
    _changed(b, view, slot, v)
    attr, n = _one_request(b, lambda: b.stat("f"))
    assert (attr.size, n) == (11, 1)


def test_host_rename_unlink_create_are_bumped(watched):
    tree, b, view = watched
    ino = b.stat("f").ino
    root = b._slots[1]
    v = view.version(root)
    os.rename(tree / "f", tree / "g")
    _changed(b, view, root, v)
    attr, n = _one_request(b, lambda: b.stat("g"))
    assert (attr.ino, n) == (ino, 1)
    v = view.version(root)
    os.unlink(tree / "g")
    _changed(b, view, root, v)
    with pytest.raises(OSError):
        b.stat("g")
    v = view.version(root)
    (tree / "new").write_bytes(b"n")
    _changed(b, view, root, v)
    assert b.stat("new").size == 1


def test_directories_created_or_renamed_on_the_host_stay_watched(watched):
    tree, b, view = watched
    root = b._slots[1]
    v = view.version(root)
    os.rename(tree / "d1", tree / "moved")     # watched under its new name
    _changed(b, view, root, v)
    v = view.version(root)
    (tree / "fresh").mkdir()                   # watched from its creation on
    _changed(b, view, root, v)  # handled, and the new directory's watch added with it
    (tree / "fresh" / "inner").write_bytes(b"1")
    for path in ("moved/d2/deep", "fresh/inner"):
        b.stat(path)
        slot = b._attrs[b.resolve(path)].slot
        v = view.version(slot)
        os.chmod(tree / path, 0o640)
        _changed(b, view, slot, v)
        attr, n = _one_request(b, lambda: b.stat(path))
        assert (attr.mode & 0o777, n) == (0o640, 1), path

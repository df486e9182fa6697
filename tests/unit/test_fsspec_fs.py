"""FsspecFs (src/pyvirtiofs/fsspec_fs.py) through the test frontend, over memory:// (fsspec's
in-process store): each semantic the README's object-storage table states."""

from __future__ import annotations

import errno
import hashlib
import os
import time
import uuid

import pytest

import fsspec  # requirements-test.txt pins it: a missing one fails here, loudly

import pyvirtiofs  # noqa: E402
from pyvirtiofs.fsspec_fs import FsspecFs  # noqa: E402
from pyvirtiofs.testing.frontend import FuseClient, FuseError  # noqa: E402


@pytest.fixture
def store():
    """A fresh prefix of the memory store, with one object in a sub-directory."""
    mem = fsspec.filesystem("memory")
    root = f"/t-{uuid.uuid4().hex}"
    mem.pipe_file(f"{root}/docs/a.txt", b"hello object\n")
    yield mem, root
    mem.rm(root, recursive=True)


@pytest.fixture
def client(store, tmp_path):
    mem, root = store
    fs = FsspecFs(mem, root, listing_timeout=0.5, block_size=64 << 10)
    sock = str(tmp_path / "fs.sock")
    with pyvirtiofs.Server(fs, sock), FuseClient.connect(sock) as c:
        yield c


def names(c, nodeid):
    return sorted(e.name for e in c.listdir(nodeid) if e.name not in (b".", b".."))


def err(fn, *args):
    with pytest.raises(FuseError) as ei:
        fn(*args)
    return ei.value.errno


def test_listing_stat_and_ranged_reads(client, store):
    c = client
    mem, root = store
    assert names(c, 1) == [b"docs"]
    d = c.lookup(1, b"docs")
    assert d.attr.mode & 0o170000 == 0o040000
    a = c.lookup(d.nodeid, b"a.txt")
    assert a.attr.size == 13
    fh = c.open(a.nodeid).fh
    assert c.read(a.nodeid, fh, 6, 6) == b"object"
    c.release(a.nodeid, fh)
    assert err(c.lookup, 1, b"missing") == errno.ENOENT
    big = os.urandom(300_000)  # several read-ahead blocks (64 KiB here)
    mem.pipe_file(f"{root}/big", big)
    mem.invalidate_cache()
    time.sleep(0.6)  # the listing cache (0.5 s here) expires
    b = c.lookup(1, b"big")
    fh = c.open(b.nodeid).fh
    got = b"".join(c.read(b.nodeid, fh, off, 65536) for off in range(0, len(big), 65536))
    assert hashlib.sha256(got).digest() == hashlib.sha256(big).digest()
    c.release(b.nodeid, fh)


def test_writes_are_uploaded_at_fsync_and_close_not_before(client, store):
    c = client
    mem, root = store
    e, o = c.create(1, b"new", flags=os.O_WRONLY | os.O_CREAT)
    c.write(e.nodeid, o.fh, 0, b"first ")
    c.write(e.nodeid, o.fh, 6, b"second")
    assert not mem.exists(f"{root}/new")  # in the spool only
    assert c.getattr(e.nodeid).attr.size == 12  # the guest sees its own writes
    c.fsync(e.nodeid, o.fh)
    assert mem.cat_file(f"{root}/new") == b"first second"  # fsync: in the store
    c.write(e.nodeid, o.fh, 12, b"!")
    c.flush(e.nodeid, o.fh)  # close(2)
    assert mem.cat_file(f"{root}/new") == b"first second!"
    c.release(e.nodeid, o.fh)
    assert b"new" in names(c, 1)


def test_rewriting_an_existing_object_keeps_what_is_not_overwritten(client, store):
    c = client
    mem, root = store
    d = c.lookup(1, b"docs")
    a = c.lookup(d.nodeid, b"a.txt")
    fh = c.open(a.nodeid, os.O_WRONLY).fh
    c.write(a.nodeid, fh, 0, b"HELLO")
    c.flush(a.nodeid, fh)
    c.release(a.nodeid, fh)
    assert mem.cat_file(f"{root}/docs/a.txt") == b"HELLO object\n"
    c.setattr(a.nodeid, size=5)  # truncate without a handle
    assert mem.cat_file(f"{root}/docs/a.txt") == b"HELLO"


def test_mkdir_rename_and_delete(client, store):
    c = client
    mem, root = store
    d = c.mkdir(1, b"dir")
    assert names(c, d.nodeid) == []  # an empty prefix, kept by the daemon
    e, o = c.create(d.nodeid, b"f")
    c.write(e.nodeid, o.fh, 0, b"data")
    c.release(e.nodeid, o.fh)
    c.rename(d.nodeid, b"f", d.nodeid, b"g")  # copy + delete
    assert mem.cat_file(f"{root}/dir/g") == b"data" and not mem.exists(f"{root}/dir/f")
    assert err(c.rmdir, 1, b"dir") == errno.ENOTEMPTY
    c.rename(1, b"dir", 1, b"moved")  # a directory: object by object
    assert mem.cat_file(f"{root}/moved/g") == b"data"
    assert not mem.exists(f"{root}/dir/g")
    m = c.lookup(1, b"moved")
    assert err(c.unlink, 1, b"moved") == errno.EISDIR
    c.unlink(m.nodeid, b"g")
    assert not mem.exists(f"{root}/moved/g")
    c.rmdir(1, b"moved")
    assert err(c.lookup, 1, b"moved") == errno.ENOENT
    assert err(c.mkdir, 1, b"docs") == errno.EEXIST


def test_what_an_object_store_cannot_do_answers_precise_errnos(client):
    c = client
    d = c.lookup(1, b"docs")
    a = c.lookup(d.nodeid, b"a.txt")
    assert err(c.link, a.nodeid, 1, b"hard") == errno.EPERM
    assert err(c.symlink, 1, b"sym", b"docs/a.txt") == errno.EPERM
    with pytest.raises(FuseError) as ei:
        c.setattr(a.nodeid, mode=0o600)
    assert ei.value.errno == errno.EPERM
    with pytest.raises(FuseError) as ei:
        c.setattr(a.nodeid, uid=1000)
    assert ei.value.errno == errno.EPERM
    # RENAME_NOREPLACE is refused rather than half-honoured
    assert err(c.rename2, d.nodeid, b"a.txt", d.nodeid, b"c.txt", 1) == errno.EINVAL


def test_an_upload_that_fails_is_reported_at_fsync_and_close(store, tmp_path):
    mem, root = store

    class Failing(type(mem)):
        fail = True

        def open(self, path, mode="rb", **kw):
            if "w" in mode and Failing.fail:
                raise OSError(errno.EIO, "the store said 500")
            return super().open(path, mode, **kw)

    fs = FsspecFs(Failing(), root)
    sock = str(tmp_path / "fs.sock")
    with pyvirtiofs.Server(fs, sock), FuseClient.connect(sock) as c:
        e, o = c.create(1, b"doomed")
        c.write(e.nodeid, o.fh, 0, b"x" * 1000)
        assert err(c.fsync, e.nodeid, o.fh) == errno.EIO
        assert err(c.flush, e.nodeid, o.fh) == errno.EIO
        Failing.fail = False  # the store is back: the spool still holds the data
        c.fsync(e.nodeid, o.fh)
        c.release(e.nodeid, o.fh)
    assert mem.cat_file(f"{root}/doomed") == b"x" * 1000

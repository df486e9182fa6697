"""End-to-end battery: a real Linux guest uses the daemon's share.

One guest boot runs the whole battery so that CI stays fast.  The guest's root
is the host's ``/`` (read-only, over QEMU's 9p), so the guest half of each
check is plain Python run by the host's own interpreter inside the guest.

Each check is a pair of functions:

* ``guest_<name>(d)``: runs in the guest, in the directory ``d`` on the
  virtiofs mount.  It is a generator: the code before ``yield`` makes changes
  and checks them; then the guest syncs and drops its caches (so that what
  follows really asks the daemon again), and the code after ``yield`` checks
  again and returns a JSON-able dict for the host half.
* ``host_<name>(d, data)``: runs on the host after the guest has powered off,
  on the same directory of the shared dir, and checks that the host sees the
  same thing (content, modes, owners, link counts, xattrs, symlinks).

The guest functions and their helpers are shipped to the guest as source
(``inspect.getsource``), so they may only use the standard library and each
other.  Results come back as JSON lines, one per check, and each check is its
own pytest test (``test_check[<name>]``).
"""

from __future__ import annotations

import errno
import hashlib
import inspect
import json
import mmap
import os
import random
import re
import shlex
import stat
import subprocess
import textwrap
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pyvirtiofs.testing import guestvm
from pyvirtiofs.testing.guestvm import GuestError, GuestResult, Share, run_guest

pytestmark = pytest.mark.guest

# ==========================================================================
# Helpers shared by both sides (shipped to the guest as source)
# ==========================================================================


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _pattern(n: int, seed: int) -> bytes:
    """Deterministic pseudo-random bytes (the host regenerates them to compare)."""
    return random.Random(seed).randbytes(n)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _errno(code: int, fn, *args, **kwargs) -> None:
    """Assert that ``fn(*args)`` fails with errno ``code``."""
    want = errno.errorcode[code]
    try:
        fn(*args, **kwargs)
    except OSError as e:
        assert e.errno == code, (
            f"{fn.__name__}{args}: expected {want}, got {errno.errorcode.get(e.errno, e.errno)}")
        return
    raise AssertionError(f"{fn.__name__}{args}: expected {want}, but it succeeded")


def _small_content(i: int) -> bytes:
    return f"small file {i}\n".encode() * (i % 7 + 1)


CHMOD_MODES = {"m600": 0o600, "m640": 0o640, "m755": 0o755, "m4755": 0o4755,
               "m2750": 0o2750, "m000": 0o000}
UTIMES = {"file": (1_234_567_890_123_456_789, 1_500_000_000_987_654_321),
          "dir": (1_000_000_000_000_000_001, 1_100_000_000_999_999_999),
          "far_future": (2**33 * 10**9 + 7, 2**33 * 10**9 + 999_999_999)}
XATTRS = {"user.pyvfs.alpha": b"alpha2", "user.pyvfs.bin": bytes(range(256)) * 4,
          "user.pyvfs.empty": b""}
SPARSE_OFFSET = 5 << 30

# ==========================================================================
# The checks: guest half (generator) and host half
# ==========================================================================


def guest_create(d):
    p = os.path.join(d, "new")
    fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640)
    st = os.fstat(fd)
    os.close(fd)
    assert stat.S_ISREG(st.st_mode) and st.st_size == 0, st
    assert stat.S_IMODE(st.st_mode) == 0o640, oct(st.st_mode)
    _errno(errno.EEXIST, os.open, p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    x = os.path.join(d, "x")
    with open(x, "x") as f:
        f.write("created")
    _errno(errno.EEXIST, open, x, "x")
    m = os.path.join(d, "masked")
    os.close(os.open(m, os.O_CREAT | os.O_WRONLY, 0o666))  # the umask (022) applies
    assert stat.S_IMODE(os.stat(m).st_mode) == 0o644, oct(os.stat(m).st_mode)
    os.mkdir(os.path.join(d, "masked_dir"), 0o777)
    assert stat.S_IMODE(os.stat(os.path.join(d, "masked_dir")).st_mode) == 0o755
    yield
    st = os.stat(p)
    assert st.st_size == 0 and stat.S_IMODE(st.st_mode) == 0o640, st
    assert _read(x) == b"created"
    assert stat.S_IMODE(os.stat(m).st_mode) == 0o644
    return {}


def host_create(d, data):
    st = (d / "new").stat()
    assert st.st_size == 0 and stat.S_IMODE(st.st_mode) == 0o640, st
    assert (d / "x").read_bytes() == b"created"
    assert stat.S_IMODE((d / "masked").stat().st_mode) == 0o644
    assert stat.S_IMODE((d / "masked_dir").stat().st_mode) == 0o755


def guest_write_read(d):
    data = _pattern(8 << 20, 1)
    p = os.path.join(d, "data.bin")
    with open(p, "wb", buffering=0) as f:
        for off in range(0, len(data), 1 << 20):
            assert f.write(data[off:off + (1 << 20)]) == 1 << 20
    assert _sha(_read(p)) == _sha(data)
    odd = _pattern(12345, 2)
    q = os.path.join(d, "odd.bin")
    fd = os.open(q, os.O_CREAT | os.O_RDWR, 0o644)
    assert os.pwrite(fd, odd, 4093) == len(odd)  # unaligned, crosses pages
    os.close(fd)
    yield
    assert _sha(_read(p)) == _sha(data), "read back after drop_caches differs"
    fd = os.open(p, os.O_RDONLY)
    try:
        assert os.pread(fd, 10000, 5_000_001) == data[5_000_001:5_010_001]
        with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as m:
            assert _sha(m[:]) == _sha(data), "mmap read differs"
    finally:
        os.close(fd)
    assert _read(q) == bytes(4093) + odd
    return {"sha": _sha(data), "size": len(data)}


def host_write_read(d, data):
    got = (d / "data.bin").read_bytes()
    assert len(got) == data["size"] and _sha(got) == data["sha"] == _sha(_pattern(8 << 20, 1))
    assert (d / "odd.bin").read_bytes() == bytes(4093) + _pattern(12345, 2)


def guest_mmap_shared(d):
    p = os.path.join(d, "mm.bin")
    _write(p, bytes(65536))
    fd = os.open(p, os.O_RDWR)
    with mmap.mmap(fd, 65536, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
        m[4096:4096 + 11] = b"via mmap!!!"
        m[65536 - 3:] = b"end"
        m.flush()
    os.close(fd)
    yield
    got = _read(p)
    assert got[4096:4107] == b"via mmap!!!" and got[-3:] == b"end" and len(got) == 65536
    return {}


def host_mmap_shared(d, data):
    got = (d / "mm.bin").read_bytes()
    assert len(got) == 65536 and got[4096:4107] == b"via mmap!!!" and got[-3:] == b"end"


def guest_append(d):
    p = os.path.join(d, "app.txt")
    _write(p, b"abc")
    with open(p, "ab") as f:
        f.write(b"def")
    fd = os.open(p, os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"ghi")
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, b"jkl")  # O_APPEND ignores the offset
    os.close(fd)
    assert _read(p) == b"abcdefghijkl", _read(p)
    q = os.path.join(d, "log.txt")
    for i in range(100):
        with open(q, "ab") as f:
            f.write(b"line %d\n" % i)
    yield
    assert _read(p) == b"abcdefghijkl"
    assert _read(q) == b"".join(b"line %d\n" % i for i in range(100))
    return {}


def host_append(d, data):
    assert (d / "app.txt").read_bytes() == b"abcdefghijkl"
    assert (d / "log.txt").read_bytes() == b"".join(b"line %d\n" % i for i in range(100))


def guest_truncate(d):
    p = os.path.join(d, "grow")
    _write(p, b"a" * 1000)
    os.truncate(p, 100000)  # grow by path
    assert os.stat(p).st_size == 100000
    assert _read(p) == b"a" * 1000 + bytes(99000)
    q = os.path.join(d, "shrink")
    _write(q, b"b" * 5000)
    fd = os.open(q, os.O_RDWR)
    os.ftruncate(fd, 10)  # shrink by fd
    assert os.fstat(fd).st_size == 10
    os.close(fd)
    assert _read(q) == b"b" * 10
    r = os.path.join(d, "otrunc")
    _write(r, b"r" * 5000)
    with open(r, "wb") as f:  # O_TRUNC
        f.write(b"new")
    s = os.path.join(d, "grow_then_write")
    _write(s, b"s" * 10)
    with open(s, "r+b") as f:
        f.truncate(3 << 20)
        f.seek(2 << 20)
        f.write(b"middle")
    yield
    assert os.stat(p).st_size == 100000 and _read(p) == b"a" * 1000 + bytes(99000)
    assert _read(q) == b"b" * 10
    assert _read(r) == b"new"
    got = _read(s)
    assert len(got) == 3 << 20 and got[:10] == b"s" * 10 and got[2 << 20:(2 << 20) + 6] == b"middle"
    assert got[10:2 << 20] == bytes((2 << 20) - 10)
    return {}


def host_truncate(d, data):
    assert (d / "grow").read_bytes() == b"a" * 1000 + bytes(99000)
    assert (d / "shrink").read_bytes() == b"b" * 10
    assert (d / "otrunc").read_bytes() == b"new"
    got = (d / "grow_then_write").read_bytes()
    assert len(got) == 3 << 20 and got[:10] == b"s" * 10 and got[2 << 20:(2 << 20) + 6] == b"middle"


def guest_rename(d):
    d1, d2 = os.path.join(d, "d1"), os.path.join(d, "d2")
    os.mkdir(d1)
    os.mkdir(d2)
    j = os.path.join
    # file, same directory
    _write(j(d1, "a"), b"A")
    os.rename(j(d1, "a"), j(d1, "b"))
    assert not os.path.exists(j(d1, "a")) and _read(j(d1, "b")) == b"A"
    # file, across directories
    _write(j(d1, "c"), b"C")
    os.rename(j(d1, "c"), j(d2, "c2"))
    # file over an existing file (an open fd keeps the old content)
    _write(j(d1, "src"), b"new")
    _write(j(d1, "dst"), b"old")
    fd = os.open(j(d1, "dst"), os.O_RDONLY)
    os.rename(j(d1, "src"), j(d1, "dst"))
    assert os.pread(fd, 10, 0) == b"old"
    os.close(fd)
    assert _read(j(d1, "dst")) == b"new" and os.stat(j(d1, "dst")).st_nlink == 1
    # over an existing file in another directory
    _write(j(d2, "over"), b"over-old")
    _write(j(d1, "over_src"), b"over-new")
    os.rename(j(d1, "over_src"), j(d2, "over"))
    # a directory tree, across directories
    os.makedirs(j(d1, "tree", "sub"))
    _write(j(d1, "tree", "sub", "f"), b"F")
    os.rename(j(d1, "tree"), j(d2, "tree_moved"))
    assert _read(j(d2, "tree_moved", "sub", "f")) == b"F"
    # a directory over an empty directory
    os.mkdir(j(d2, "empty"))
    os.mkdir(j(d1, "dirsrc"))
    _write(j(d1, "dirsrc", "g"), b"G")
    os.rename(j(d1, "dirsrc"), j(d2, "empty"))
    # refused: a directory over a non-empty one, file over dir, dir over file
    os.mkdir(j(d2, "full"))
    _write(j(d2, "full", "x"), b"X")
    os.mkdir(j(d1, "ds2"))
    try:
        os.rename(j(d1, "ds2"), j(d2, "full"))
        raise AssertionError("renaming a directory over a non-empty one succeeded")
    except OSError as e:
        assert e.errno in (errno.ENOTEMPTY, errno.EEXIST), e
    _errno(errno.EISDIR, os.rename, j(d1, "b"), j(d2, "full"))
    _errno(errno.ENOTDIR, os.rename, j(d1, "ds2"), j(d1, "b"))
    yield
    assert sorted(os.listdir(d1)) == ["b", "ds2", "dst"], sorted(os.listdir(d1))
    assert sorted(os.listdir(d2)) == ["c2", "empty", "full", "over", "tree_moved"], sorted(os.listdir(d2))
    assert _read(j(d1, "b")) == b"A" and _read(j(d2, "c2")) == b"C"
    assert _read(j(d1, "dst")) == b"new" and _read(j(d2, "over")) == b"over-new"
    assert _read(j(d2, "tree_moved", "sub", "f")) == b"F" and _read(j(d2, "empty", "g")) == b"G"
    return {"d1": sorted(os.listdir(d1)), "d2": sorted(os.listdir(d2))}


def host_rename(d, data):
    d1, d2 = d / "d1", d / "d2"
    assert sorted(os.listdir(d1)) == data["d1"] == ["b", "ds2", "dst"]
    assert sorted(os.listdir(d2)) == data["d2"] == ["c2", "empty", "full", "over", "tree_moved"]
    assert (d1 / "b").read_bytes() == b"A" and (d2 / "c2").read_bytes() == b"C"
    assert (d1 / "dst").read_bytes() == b"new" and (d1 / "dst").stat().st_nlink == 1
    assert (d2 / "over").read_bytes() == b"over-new"
    assert (d2 / "tree_moved" / "sub" / "f").read_bytes() == b"F"
    assert os.listdir(d2 / "empty") == ["g"] and (d2 / "empty" / "g").read_bytes() == b"G"
    assert (d2 / "full" / "x").read_bytes() == b"X"


def guest_hardlink(d):
    j = os.path.join
    f, g, sub = j(d, "f"), j(d, "g"), j(d, "sub")
    _write(f, b"linked")
    os.mkdir(sub)
    os.link(f, g)
    os.link(f, j(sub, "h"))
    sts = [os.stat(p) for p in (f, g, j(sub, "h"))]
    assert [s.st_nlink for s in sts] == [3, 3, 3], [s.st_nlink for s in sts]
    assert len({s.st_ino for s in sts}) == 1
    with open(g, "ab") as fh:
        fh.write(b"+")
    assert _read(f) == b"linked+"
    os.unlink(g)
    assert os.stat(f).st_nlink == 2
    _errno(errno.EEXIST, os.link, f, j(sub, "h"))
    _errno(errno.ENOENT, os.link, j(d, "missing"), j(d, "m2"))
    yield
    st_f, st_h = os.stat(f), os.stat(j(sub, "h"))
    assert st_f.st_nlink == st_h.st_nlink == 2, (st_f.st_nlink, st_h.st_nlink)
    assert st_f.st_ino == st_h.st_ino
    assert not os.path.exists(g) and _read(j(sub, "h")) == b"linked+"
    return {"nlink": 2}


def host_hardlink(d, data):
    st_f, st_h = (d / "f").stat(), (d / "sub" / "h").stat()
    assert st_f.st_nlink == st_h.st_nlink == data["nlink"]
    assert st_f.st_ino == st_h.st_ino
    assert not (d / "g").exists() and (d / "f").read_bytes() == b"linked+"


SYMLINKS = {"rel": "target.txt", "abs": "/nonexistent/dangling", "dirlink": "dir",
            "up": "../symlink/target.txt",
            "long": "/".join(f"seg{i:03d}" for i in range(150))}


def guest_symlink(d):
    j = os.path.join
    _write(j(d, "target.txt"), b"T")
    os.mkdir(j(d, "dir"))
    _write(j(d, "dir", "inside"), b"I")
    for name, target in SYMLINKS.items():
        os.symlink(target, j(d, name))
    for name, target in SYMLINKS.items():
        assert os.readlink(j(d, name)) == target, (name, os.readlink(j(d, name)))
        assert stat.S_ISLNK(os.lstat(j(d, name)).st_mode)
    assert _read(j(d, "rel")) == b"T" and _read(j(d, "up")) == b"T"
    assert _read(j(d, "dirlink", "inside")) == b"I"
    assert not os.path.exists(j(d, "abs")) and os.path.lexists(j(d, "abs"))
    _errno(errno.EEXIST, os.symlink, "x", j(d, "rel"))
    _errno(errno.EINVAL, os.readlink, j(d, "target.txt"))
    yield
    for name, target in SYMLINKS.items():
        assert os.readlink(j(d, name)) == target, name
    assert _read(j(d, "rel")) == b"T"
    assert os.lstat(j(d, "long")).st_size == len(SYMLINKS["long"])
    return {"links": SYMLINKS}


def host_symlink(d, data):
    for name, target in data["links"].items():
        assert (d / name).is_symlink(), name
        assert os.readlink(d / name) == target, name
    assert (d / "rel").read_bytes() == b"T"


def guest_mkdir_rmdir(d):
    j = os.path.join
    a = j(d, "a")
    os.makedirs(j(a, "b", "c"), mode=0o750)
    assert stat.S_IMODE(os.stat(j(a, "b", "c")).st_mode) == 0o750
    os.mkdir(j(a, "gone"))
    os.rmdir(j(a, "gone"))
    _errno(errno.EEXIST, os.mkdir, j(a, "b"))
    _errno(errno.ENOTEMPTY, os.rmdir, a)
    _write(j(a, "file"), b"")
    _errno(errno.ENOTDIR, os.rmdir, j(a, "file"))
    _errno(errno.ENOTDIR, os.mkdir, j(a, "file", "x"))
    _errno(errno.ENOENT, os.rmdir, j(a, "never"))
    os.rmdir(j(a, "b", "c"))
    yield
    assert not os.path.exists(j(a, "b", "c")) and not os.path.exists(j(a, "gone"))
    assert sorted(os.listdir(a)) == ["b", "file"] and os.listdir(j(a, "b")) == []
    return {"nlink_a": os.stat(a).st_nlink, "mode_b": stat.S_IMODE(os.stat(j(a, "b")).st_mode)}


def host_mkdir_rmdir(d, data):
    a = d / "a"
    assert sorted(os.listdir(a)) == ["b", "file"] and os.listdir(a / "b") == []
    assert a.stat().st_nlink == data["nlink_a"]
    assert stat.S_IMODE((a / "b").stat().st_mode) == data["mode_b"]


def guest_readdir_2000(d):
    j = os.path.join
    big = j(d, "big")
    os.mkdir(big)
    names = [f"entry-{i:04d}" for i in range(2000)] + ["n" * 255]
    for n in names:
        os.close(os.open(j(big, n), os.O_CREAT | os.O_WRONLY, 0o644))
    os.mkdir(j(big, "subdir"))
    os.symlink("entry-0000", j(big, "slink"))
    expect = sorted(names + ["subdir", "slink"])
    got = os.listdir(big)
    assert len(got) == len(set(got)), "duplicate entries"
    assert sorted(got) == expect, (len(got), len(expect))
    yield
    got = os.listdir(big)
    assert len(got) == len(set(got)) and sorted(got) == expect, (len(got), len(expect))
    kinds = {e.name: (e.is_dir(follow_symlinks=False), e.is_symlink(), e.is_file(follow_symlinks=False))
             for e in os.scandir(big)}
    assert kinds["subdir"] == (True, False, False) and kinds["slink"] == (False, True, False)
    assert all(kinds[n] == (False, False, True) for n in names)
    return {"count": len(expect), "sha": _sha("\n".join(expect).encode())}


def host_readdir_2000(d, data):
    got = sorted(os.listdir(d / "big"))
    assert len(got) == data["count"] and _sha("\n".join(got).encode()) == data["sha"]


def guest_chmod(d):
    j = os.path.join
    for name, mode in CHMOD_MODES.items():
        _write(j(d, name), b"m")
        os.chmod(j(d, name), mode)
        assert stat.S_IMODE(os.stat(j(d, name)).st_mode) == mode, (name, oct(os.stat(j(d, name)).st_mode))
    os.mkdir(j(d, "sticky"))
    os.chmod(j(d, "sticky"), 0o1777)
    _write(j(d, "fchmod"), b"m")
    fd = os.open(j(d, "fchmod"), os.O_RDONLY)
    os.fchmod(fd, 0o604)
    os.close(fd)
    yield
    modes = {n: stat.S_IMODE(os.stat(j(d, n)).st_mode) for n in [*CHMOD_MODES, "sticky", "fchmod"]}
    assert modes == {**CHMOD_MODES, "sticky": 0o1777, "fchmod": 0o604}, {k: oct(v) for k, v in modes.items()}
    return {"modes": modes}


def host_chmod(d, data):
    got = {n: stat.S_IMODE((d / n).stat().st_mode) for n in data["modes"]}
    assert got == data["modes"] == {**CHMOD_MODES, "sticky": 0o1777, "fchmod": 0o604}, \
        {k: oct(v) for k, v in got.items()}


def guest_chown(d):
    j = os.path.join
    f, g, dd, link = j(d, "f"), j(d, "g"), j(d, "dd"), j(d, "link")
    _write(f, b"o")
    os.chown(f, 1234, 5678)
    os.symlink("f", link)
    os.chown(link, 4321, 8765, follow_symlinks=False)
    os.mkdir(dd)
    os.chown(dd, 1000, 1000)
    _write(g, b"o")
    os.chown(g, 99, 98)
    fd = os.open(g, os.O_RDONLY)
    os.fchown(fd, 2000, -1)  # uid only
    os.close(fd)
    want = {"f": (1234, 5678), "link": (4321, 8765), "dd": (1000, 1000), "g": (2000, 98)}

    def owners():
        return {n: (os.lstat(j(d, n)).st_uid, os.lstat(j(d, n)).st_gid) for n in want}
    assert owners() == want, owners()
    yield
    assert owners() == want, owners()
    return {"owners": want}


def host_chown(d, data):
    got = {n: [os.lstat(d / n).st_uid, os.lstat(d / n).st_gid] for n in data["owners"]}
    assert got == {n: list(v) for n, v in data["owners"].items()}, got


def guest_utimes(d):
    j = os.path.join
    _write(j(d, "file"), b"t")
    _write(j(d, "far_future"), b"t")
    os.mkdir(j(d, "dir"))
    for name, (at, mt) in UTIMES.items():
        os.utime(j(d, name), ns=(at, mt))
        st = os.stat(j(d, name))
        assert (st.st_atime_ns, st.st_mtime_ns) == (at, mt), (name, st.st_atime_ns, st.st_mtime_ns)
    _write(j(d, "now"), b"t")
    os.utime(j(d, "now"), ns=(UTIMES["file"][0], UTIMES["file"][1]))
    os.utime(j(d, "now"))  # UTIME_NOW
    assert abs(os.stat(j(d, "now")).st_mtime - time.time()) < 120
    yield
    for name, (at, mt) in UTIMES.items():
        st = os.stat(j(d, name))
        assert (st.st_atime_ns, st.st_mtime_ns) == (at, mt), (name, st.st_atime_ns, st.st_mtime_ns)
    return {"times": UTIMES, "now_mtime": os.stat(j(d, "now")).st_mtime}


def host_utimes(d, data):
    for name, (at, mt) in data["times"].items():
        st = os.stat(d / name)
        assert (st.st_atime_ns, st.st_mtime_ns) == (at, mt), (name, st.st_atime_ns, st.st_mtime_ns)
    assert abs((d / "now").stat().st_mtime - time.time()) < 600


def guest_statfs(d):
    sv = os.statvfs(d)
    assert sv.f_bsize > 0 and sv.f_frsize > 0 and sv.f_blocks > 0 and sv.f_files > 0, sv
    assert sv.f_bavail <= sv.f_bfree <= sv.f_blocks, sv
    assert sv.f_namemax >= 255, sv
    yield
    return {k: getattr(sv, k) for k in ("f_bsize", "f_frsize", "f_blocks", "f_files", "f_namemax")}


def host_statfs(d, data):
    sv = os.statvfs(d)
    assert sv.f_blocks * sv.f_frsize == data["f_blocks"] * data["f_frsize"], (sv, data)
    assert sv.f_files == data["f_files"] and sv.f_namemax == data["f_namemax"], (sv, data)


def guest_fsync(d):
    p = os.path.join(d, "synced")
    data = _pattern(1 << 20, 3)
    fd = os.open(p, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    os.write(fd, data)
    os.fsync(fd)
    os.write(fd, b"tail")
    os.fdatasync(fd)
    os.close(fd)
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(dfd)
    os.close(dfd)
    os.sync()
    yield
    assert _sha(_read(p)) == _sha(data + b"tail")
    return {"sha": _sha(data + b"tail")}


def host_fsync(d, data):
    assert _sha((d / "synced").read_bytes()) == data["sha"] == _sha(_pattern(1 << 20, 3) + b"tail")


def guest_xattr(d):
    j = os.path.join
    f, dd = j(d, "f"), j(d, "dd")
    _write(f, b"x")
    os.setxattr(f, "user.pyvfs.alpha", b"alpha")
    os.setxattr(f, "user.pyvfs.bin", XATTRS["user.pyvfs.bin"])
    os.setxattr(f, "user.pyvfs.empty", b"")
    os.setxattr(f, "user.pyvfs.gone", b"bye")
    assert os.getxattr(f, "user.pyvfs.alpha") == b"alpha"
    assert os.getxattr(f, "user.pyvfs.gone") == b"bye"
    _errno(errno.EEXIST, os.setxattr, f, "user.pyvfs.alpha", b"x", os.XATTR_CREATE)
    _errno(errno.ENODATA, os.setxattr, f, "user.pyvfs.nope", b"x", os.XATTR_REPLACE)
    os.setxattr(f, "user.pyvfs.alpha", b"alpha2", os.XATTR_REPLACE)
    os.removexattr(f, "user.pyvfs.gone")
    _errno(errno.ENODATA, os.getxattr, f, "user.pyvfs.gone")
    _errno(errno.ENODATA, os.removexattr, f, "user.pyvfs.gone")
    os.mkdir(dd)
    os.setxattr(dd, "user.pyvfs.dir", b"on-a-dir")
    host_made = os.path.join(d, "..", "host_visible", "visible.txt")

    def check():
        assert os.getxattr(host_made, "user.host") == b"from-host", "xattr set by the host"
        for k, v in XATTRS.items():
            assert os.getxattr(f, k) == v, k
        names = sorted(n for n in os.listxattr(f) if n.startswith("user."))
        assert names == sorted(XATTRS), names
        assert os.getxattr(dd, "user.pyvfs.dir") == b"on-a-dir"
        assert [n for n in os.listxattr(dd) if n.startswith("user.")] == ["user.pyvfs.dir"]
    check()
    yield
    check()
    return {"f": {k: v.hex() for k, v in XATTRS.items()}, "dd": {"user.pyvfs.dir": b"on-a-dir".hex()}}


def host_xattr(d, data):
    for name, attrs in data.items():
        p = d / name
        names = sorted(n for n in os.listxattr(p) if n.startswith("user."))
        assert names == sorted(attrs), (name, names)
        for k, v in attrs.items():
            assert os.getxattr(p, k) == bytes.fromhex(v), (name, k)


def guest_sparse_5g(d):
    p = os.path.join(d, "sparse")
    tail = _pattern(1 << 20, 4)
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
    assert os.pwrite(fd, tail, SPARSE_OFFSET) == len(tail)
    assert os.pwrite(fd, b"B" * 100, (4 << 30) - 50) == 100  # across the 4 GiB line
    assert os.fstat(fd).st_size == SPARSE_OFFSET + len(tail)
    os.close(fd)
    yield
    st = os.stat(p)
    assert st.st_size == SPARSE_OFFSET + len(tail), st.st_size
    fd = os.open(p, os.O_RDONLY)
    try:
        assert os.pread(fd, len(tail), SPARSE_OFFSET) == tail, "tail differs"
        assert os.pread(fd, 4096, 1 << 30) == bytes(4096), "hole is not zero"
        assert os.pread(fd, 100, (4 << 30) - 50) == b"B" * 100
        assert os.pread(fd, 50, (4 << 30) - 100) == bytes(50)
        assert os.pread(fd, 10, SPARSE_OFFSET + len(tail)) == b""
    finally:
        os.close(fd)
    return {"size": st.st_size, "blocks": st.st_blocks, "tail_sha": _sha(tail)}


def host_sparse_5g(d, data):
    p = d / "sparse"
    st = p.stat()
    assert st.st_size == data["size"] == SPARSE_OFFSET + (1 << 20)
    assert st.st_blocks * 512 < 64 << 20, f"not sparse on the host: {st.st_blocks} blocks"
    with open(p, "rb") as f:
        f.seek(SPARSE_OFFSET)
        assert _sha(f.read()) == data["tail_sha"] == _sha(_pattern(1 << 20, 4))
        assert os.pread(f.fileno(), 4096, 1 << 30) == bytes(4096)
        assert os.pread(f.fileno(), 100, (4 << 30) - 50) == b"B" * 100


def guest_small_files_1000(d):
    j = os.path.join
    for i in range(1000):
        _write(j(d, f"f{i:04d}"), _small_content(i))
    yield
    assert sorted(os.listdir(d)) == [f"f{i:04d}" for i in range(1000)]
    for i in range(1000):
        assert _read(j(d, f"f{i:04d}")) == _small_content(i), i
    return {"count": 1000}


def host_small_files_1000(d, data):
    assert sorted(os.listdir(d)) == [f"f{i:04d}" for i in range(data["count"])]
    for i in range(data["count"]):
        assert (d / f"f{i:04d}").read_bytes() == _small_content(i), i


def guest_unlink_open(d):
    p = os.path.join(d, "doomed")
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
    os.write(fd, b"still here")
    os.unlink(p)
    assert not os.path.lexists(p)
    assert os.pread(fd, 100, 0) == b"still here"
    os.pwrite(fd, b"+more", 10)
    assert os.pread(fd, 100, 0) == b"still here+more"
    assert os.fstat(fd).st_nlink == 0
    os.close(fd)
    _errno(errno.ENOENT, os.unlink, p)
    yield
    assert os.listdir(d) == []
    return {}


def host_unlink_open(d, data):
    assert os.listdir(d) == []


def guest_errors(d):
    j = os.path.join
    _write(j(d, "file"), b"")
    os.mkdir(j(d, "dir"))
    _errno(errno.ENOENT, os.open, j(d, "missing"), os.O_RDONLY)
    _errno(errno.ENOENT, os.stat, j(d, "missing"))
    _errno(errno.ENOENT, os.rename, j(d, "missing"), j(d, "other"))
    _errno(errno.ENOTDIR, os.listdir, j(d, "file"))
    _errno(errno.ENOTDIR, os.stat, j(d, "file", "x"))
    _errno(errno.EISDIR, os.open, j(d, "dir"), os.O_WRONLY)
    _errno(errno.EISDIR, os.unlink, j(d, "dir"))
    _errno(errno.ENAMETOOLONG, os.open, j(d, "n" * 256), os.O_CREAT | os.O_WRONLY, 0o644)
    yield
    _errno(errno.ENOENT, os.stat, j(d, "missing"))
    return {}


def host_errors(d, data):
    assert sorted(os.listdir(d)) == ["dir", "file"]


def guest_mkfifo(d):
    p = os.path.join(d, "fifo")
    os.mkfifo(p, 0o660)  # the umask (022) takes 0o020 away
    st = os.lstat(p)
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640, oct(st.st_mode)
    yield
    assert stat.S_ISFIFO(os.lstat(p).st_mode)
    return {}


def host_mkfifo(d, data):
    st = os.lstat(d / "fifo")
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640, oct(st.st_mode)


NAMES = ["with space", "\u00fcn\u00efc\u00f8d\u00e9-\u540d\u524d", "new\nline", "-dash", ".hidden",
         "tab\tx", "#hash%pct&", "x" * 255, "trailing.", "..dots"]


def guest_names(d):
    for i, n in enumerate(NAMES):
        _write(os.path.join(d, n), n.encode())
        os.mkdir(os.path.join(d, f"dir {i} {n[:100]}"))
    expect = sorted(NAMES + [f"dir {i} {n[:100]}" for i, n in enumerate(NAMES)])
    assert sorted(os.listdir(d)) == expect
    yield
    assert sorted(os.listdir(d)) == expect
    for n in NAMES:
        assert _read(os.path.join(d, n)) == n.encode(), n
    return {"names": expect}


def host_names(d, data):
    assert sorted(os.listdir(d)) == data["names"]
    for n in NAMES:
        assert (d / n).read_bytes() == n.encode(), n


def guest_exec(d):
    import shutil
    import subprocess
    j = os.path.join
    with open(j(d, "hello.sh"), "w") as f:
        f.write("#!/bin/sh\necho exec-ok \"$@\"\n")
    os.chmod(j(d, "hello.sh"), 0o755)
    with open(j(d, "noexec.sh"), "w") as f:
        f.write("#!/bin/sh\necho should not run\n")
    shutil.copy2("/bin/true", j(d, "true"))  # an ELF binary, mapped from virtiofs
    yield
    out = subprocess.run([j(d, "hello.sh"), "arg"], capture_output=True, text=True, check=True).stdout
    assert out == "exec-ok arg\n", out
    assert subprocess.run([j(d, "true")]).returncode == 0
    _errno(errno.EACCES, subprocess.run, [j(d, "noexec.sh")])
    return {"true_sha": _sha(_read(j(d, "true")))}


def host_exec(d, data):
    assert (d / "hello.sh").stat().st_mode & 0o777 == 0o755
    assert _sha((d / "true").read_bytes()) == data["true_sha"] == _sha(Path("/bin/true").read_bytes())


def guest_copy_file_range(d):
    j = os.path.join
    data = _pattern(3 << 20, 5)
    _write(j(d, "src"), data)
    fin = os.open(j(d, "src"), os.O_RDONLY)
    fout = os.open(j(d, "dst"), os.O_CREAT | os.O_WRONLY, 0o644)
    done = 0
    while done < len(data):
        n = os.copy_file_range(fin, fout, len(data) - done, done, done)
        assert n > 0, n
        done += n
    os.close(fin)
    os.close(fout)
    yield
    assert _sha(_read(j(d, "dst"))) == _sha(data)
    return {"sha": _sha(data)}


def host_copy_file_range(d, data):
    assert _sha((d / "dst").read_bytes()) == data["sha"]


def guest_fallocate(d):
    p = os.path.join(d, "alloc")
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
    os.posix_fallocate(fd, 0, 1 << 20)
    assert os.fstat(fd).st_size == 1 << 20
    os.pwrite(fd, b"head", 0)
    os.close(fd)
    yield
    got = _read(p)
    assert len(got) == 1 << 20 and got[:4] == b"head" and got[4:] == bytes((1 << 20) - 4)
    return {}


def host_fallocate(d, data):
    st = (d / "alloc").stat()
    assert st.st_size == 1 << 20 and st.st_blocks * 512 >= 1 << 20, st
    assert (d / "alloc").read_bytes()[:8] == b"head" + bytes(4)


def guest_odirect(d):
    p = os.path.join(d, "direct")
    data = _pattern(256 << 10, 6)
    buf = mmap.mmap(-1, len(data))  # page-aligned, as O_DIRECT wants
    buf[:] = data
    fd = os.open(p, os.O_CREAT | os.O_WRONLY | os.O_DIRECT, 0o644)
    assert os.write(fd, buf) == len(data)
    os.close(fd)
    yield
    rbuf = mmap.mmap(-1, len(data))
    fd = os.open(p, os.O_RDONLY | os.O_DIRECT)
    assert os.readv(fd, [rbuf]) == len(data)
    os.close(fd)
    assert rbuf[:] == data
    return {"sha": _sha(data)}


def host_odirect(d, data):
    assert _sha((d / "direct").read_bytes()) == data["sha"]


def guest_parallel(d):
    import threading
    j = os.path.join
    errors = []

    def worker(t):
        try:
            os.mkdir(j(d, f"t{t}"))
            for i in range(40):
                p = j(d, f"t{t}", f"f{i}")
                data = _pattern(32 << 10, t * 1000 + i)
                _write(p, data)
                assert _read(p) == data, p
                os.stat(p)
                if i % 3 == 0:
                    os.rename(p, p + ".r")
        except BaseException as e:
            errors.append(f"thread {t}: {e!r}")
    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    yield
    for t in range(8):
        for i in range(40):
            p = j(d, f"t{t}", f"f{i}" + (".r" if i % 3 == 0 else ""))
            assert _read(p) == _pattern(32 << 10, t * 1000 + i), p
    return {"threads": 8, "files": 40}


def host_parallel(d, data):
    for t in range(data["threads"]):
        names = sorted(os.listdir(d / f"t{t}"))
        assert names == sorted(f"f{i}" + (".r" if i % 3 == 0 else "") for i in range(data["files"]))
        for i in range(data["files"]):
            p = d / f"t{t}" / (f"f{i}" + (".r" if i % 3 == 0 else ""))
            assert p.read_bytes() == _pattern(32 << 10, t * 1000 + i), p



HOST_FILES = "host_visible"  # made by the host before the boot


def make_host_files(d: Path) -> None:
    d.mkdir()
    (d / "visible.txt").write_bytes(b"written by the host\n")
    os.chmod(d / "visible.txt", 0o604)
    os.chown(d / "visible.txt", 4242, 2424)
    os.setxattr(d / "visible.txt", "user.host", b"from-host")
    (d / "big.bin").write_bytes(_pattern(3 << 20, 7))
    (d / "sub").mkdir()
    (d / "sub" / "nested.txt").write_bytes(b"nested")
    os.symlink("visible.txt", d / "link")
    (d / "hard1").write_bytes(b"hard")
    os.link(d / "hard1", d / "hard2")
    expect = {}
    for p in sorted(d.rglob("*")):
        st = os.lstat(p)
        e = {"mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid, "nlink": st.st_nlink,
             "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        if p.is_symlink():
            e["target"] = os.readlink(p)
        elif p.is_file():
            e["sha"] = _sha(p.read_bytes())
        expect[str(p.relative_to(d))] = e
    (d / "expect.json").write_text(json.dumps(expect))


def guest_host_visible(d):
    expect = json.loads(_read(os.path.join(d, "expect.json")))
    for rel, e in expect.items():
        p = os.path.join(d, rel)
        st = os.lstat(p)
        got = {"mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid, "nlink": st.st_nlink,
               "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        assert got == {k: e[k] for k in got}, (rel, got, e)
        if "target" in e:
            assert os.readlink(p) == e["target"], rel
        elif "sha" in e:
            assert _sha(_read(p)) == e["sha"], rel
    assert sorted(os.listdir(d)) == sorted([r for r in expect if "/" not in r] + ["expect.json"])
    assert os.stat(os.path.join(d, "hard1")).st_ino == os.stat(os.path.join(d, "hard2")).st_ino
    yield
    assert _read(os.path.join(d, "link")) == b"written by the host\n"
    return {}


def host_host_visible(d, data):
    assert (d / "visible.txt").read_bytes() == b"written by the host\n"


CHECKS = [
    "host_visible", "create", "write_read", "mmap_shared", "append", "truncate", "rename",
    "hardlink", "symlink", "mkdir_rmdir", "readdir_2000", "chmod", "chown", "utimes", "statfs",
    "fsync", "xattr", "sparse_5g", "small_files_1000", "unlink_open", "errors", "mkfifo",
    "names", "exec", "copy_file_range", "fallocate", "odirect", "parallel",
]

# ==========================================================================
# The guest program
# ==========================================================================

RESULT_PREFIX = "PYVFS-CHECK "


def daemon_name() -> str:
    return os.environ.get("PYVIRTIOFS_E2E_DAEMON") or "pyvirtiofsd"


def _drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def _guest_main(root: str, names: list[str]) -> None:
    def emit(name, ok, t, data=None, error=None):
        rec = {"check": name, "ok": ok, "seconds": round(time.monotonic() - t, 3)}
        rec["data" if ok else "error"] = data if ok else error
        print(RESULT_PREFIX + json.dumps(rec), flush=True)

    os.umask(0o022)  # the checks' expected modes assume it
    t_all = time.monotonic()
    pending = []
    for name in names:
        t = time.monotonic()
        try:
            d = os.path.join(root, name)
            os.makedirs(d, exist_ok=True)
            gen = globals()["guest_" + name](d)
            next(gen)
            pending.append((name, gen, time.monotonic() - t))
        except StopIteration as e:
            emit(name, True, t, e.value or {})
        except BaseException:
            emit(name, False, t, error="phase 1: " + traceback.format_exc())
    t_drop = time.monotonic()
    _drop_caches()
    drop = time.monotonic() - t_drop
    for name, gen, spent in pending:
        t = time.monotonic() - spent
        try:
            next(gen)
            emit(name, False, t, error="the check yielded twice")
        except StopIteration as e:
            emit(name, True, t, e.value or {})
        except BaseException:
            emit(name, False, t, error="phase 2 (after drop_caches): " + traceback.format_exc())
    print(RESULT_PREFIX + json.dumps({"done": True, "seconds": round(time.monotonic() - t_all, 3),
                                      "drop_caches": round(drop, 3), "release": os.uname().release,
                                      "cpus": os.cpu_count()}), flush=True)


def guest_program() -> str:
    """The battery as one stand-alone Python file (stdlib only)."""
    funcs = [_sha, _pattern, _read, _write, _errno, _small_content, _drop_caches, _guest_main]
    funcs += [globals()["guest_" + n] for n in CHECKS]
    consts = {k: globals()[k] for k in ("CHMOD_MODES", "UTIMES", "XATTRS", "SPARSE_OFFSET",
                                        "SYMLINKS", "NAMES", "RESULT_PREFIX")}
    parts = ["import errno, hashlib, json, mmap, os, random, stat, sys, time, traceback"]
    parts += [f"{k} = {v!r}" for k, v in consts.items()]
    parts += [textwrap.dedent(inspect.getsource(f)) for f in funcs]
    parts.append("if __name__ == '__main__':\n    _guest_main(sys.argv[1], sys.argv[2:])\n")
    return "\n\n".join(parts)


# ==========================================================================
# pytest side
# ==========================================================================

@dataclass
class Battery:
    kernel: str
    root: Path
    guest: GuestResult
    daemon_status: int | None = None
    daemon_log: str = ""
    results: dict[str, dict] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)


# The battery runs on each guest kernel; 6.12 with two vCPUs and two request queues, the
# set-up in which Linux >= 6.10 spreads requests over several queues (one per CPU).
KERNEL_SETUPS = {"6.1": {}, "6.12": {"smp": 2, "num_request_queues": 2}}


@pytest.fixture(scope="module", params=sorted(KERNEL_SETUPS))
def battery(request, start_daemon_module, tmp_path_factory) -> Battery:
    kernel = request.param
    root = tmp_path_factory.mktemp(f"battery-{kernel}")
    os.chmod(root, 0o755)
    make_host_files(root / HOST_FILES)
    daemon = start_daemon_module(root, "battery")
    program = guest_program()
    assert "PYVFS_EOF" not in program
    script = (guestvm.embed_file("/tmp/battery.py", program)
              + f"exec {shlex.quote(guestvm.guest_python())} /tmp/battery.py \"$PWD\" "
              + f"{' '.join(CHECKS)}\n")
    t0 = time.monotonic()
    try:
        res = run_guest(script, [Share("battery", socket=daemon.socket_path)], hostroot=True,
                        kernel=kernel, timeout=300, daemons=[daemon], **KERNEL_SETUPS[kernel])
    except GuestError as e:
        pytest.fail(f"the battery guest failed ({daemon_name()}, Linux {kernel}):\n{e}\n"
                    f"--- daemon log ---\n{daemon.log[-5000:]}", pytrace=False)
    try:  # the daemon exits by itself once QEMU has gone
        status = daemon.wait(timeout=30)
    except subprocess.TimeoutExpired:
        status = None
    bat = Battery(kernel=kernel, root=root, guest=res, daemon_status=status, daemon_log=daemon.log)
    for line in res.output.splitlines():
        if line.startswith(RESULT_PREFIX):
            rec = json.loads(line[len(RESULT_PREFIX):])
            if rec.get("done"):
                bat.summary = rec
            else:
                bat.results[rec["check"]] = rec
    times = ", ".join(f"{n} {r['seconds']:.2f}" for n, r in bat.results.items())
    print(f"\nbattery against {daemon_name()} on Linux {bat.summary.get('release')}: QEMU wall {res.wall:.1f} s (harness overhead {time.monotonic() - t0 - res.wall:.1f} s"
          f"), script started at guest uptime {res.ready} s, checks {bat.summary.get('seconds')} s; "
          f"per check: {times}")
    for line in bat.daemon_log.splitlines():
        if "requests by opcode" in line or "stopped after" in line:
            print(line)
    return bat


@pytest.mark.parametrize("name", CHECKS)
def test_check(battery: Battery, name: str) -> None:
    rec = battery.results.get(name)
    if rec is None:
        pytest.fail(f"the guest reported no result for {name!r} (guest exit status "
                    f"{battery.guest.status}); output tail:\n"
                    + "\n".join(battery.guest.output.splitlines()[-40:]), pytrace=False)
    if not rec["ok"]:
        pytest.fail(f"guest side of {name!r} failed against {daemon_name()}:\n{rec['error']}",
                    pytrace=False)
    globals()["host_" + name](battery.root / name, rec["data"])


def test_battery_completed(battery: Battery) -> None:
    other = [l for l in battery.guest.output.splitlines() if not l.startswith(RESULT_PREFIX)]
    assert battery.summary.get("done"), "the guest program did not finish:\n" + "\n".join(other[-40:])
    assert battery.guest.status == 0, f"guest exit status {battery.guest.status}:\n" + "\n".join(other[-40:])
    assert battery.daemon_status == 0 and "Traceback" not in battery.daemon_log, (
        f"{daemon_name()} exit status {battery.daemon_status} (None: still running 30 s after "
        f"the guest powered off); log tail:\n{battery.daemon_log[-5000:]}")
    # The battery really ran on the kernel it names, with the CPUs it asked for.
    release = guestvm.prepare_kernel(kernel=battery.kernel).release
    assert battery.summary.get("release") == release, (battery.summary, release)
    assert battery.summary.get("cpus") == KERNEL_SETUPS[battery.kernel].get("smp", 1), battery.summary
    if daemon_name() == "pyvirtiofsd" and KERNEL_SETUPS[battery.kernel].get("num_request_queues"):
        # Linux >= 6.10 used every request queue it was given (one per CPU).
        served = {int(q): int(n) for q, n in re.findall(r"queue (\d+) stopped after (\d+) requests",
                                                       battery.daemon_log)}
        queues = KERNEL_SETUPS[battery.kernel]["num_request_queues"]
        assert all(served.get(q, 0) > 0 for q in range(1, queues + 1)), served


def test_daemon_pidfile_and_exit_on_poweroff(start_daemon, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    daemon = start_daemon(shared, "pid", wait_pidfile=True)
    pidfile = Path(daemon.pidfile)
    assert pidfile.exists(), f"{pidfile} missing while the daemon runs"
    pid_text = pidfile.read_text().strip()
    assert pid_text == str(daemon.pid), f"{pidfile} holds {pid_text!r}, the daemon's pid is {daemon.pid}"
    res = run_guest("echo guest-was-here > from_guest.txt && grep -c virtiofs /proc/mounts",
                    [Share("pidtest", socket=daemon.socket_path)], timeout=120, daemons=[daemon])
    assert res.status == 0, res.output
    assert res.output.strip() == "1", res.output
    try:
        rc = daemon.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("the daemon still runs 30 s after the guest powered off (QEMU disconnected)")
    assert rc == 0, f"daemon exit status {rc} after the guest powered off\n{daemon.log[-3000:]}"
    assert (shared / "from_guest.txt").read_text() == "guest-was-here\n"


def test_several_devices_and_9p(start_daemon, tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for p in (a, b, c):
        p.mkdir()
    (a / "in.txt").write_text("from share a\n")
    da = start_daemon(a, "a")
    db = start_daemon(b, "b")
    script = textwrap.dedent("""\
        set -e
        pwd
        cat in.txt
        cp in.txt /mnt/second/copied.txt
        echo via-9p > /data9p/ninep.txt
        grep -c ' virtiofs ' /proc/mounts
        exit 7
    """)
    res = run_guest(script, [Share("first", socket=da.socket_path),
                             Share("second", socket=db.socket_path),
                             Share("ninep", ninep_dir=str(c), mountpoint="/data9p")],
                    timeout=120, daemons=[da, db])
    assert res.status == 7, res.output
    assert res.output.splitlines() == ["/mnt/first", "from share a", "2"], res.output
    assert (b / "copied.txt").read_text() == "from share a\n"
    assert (c / "ninep.txt").read_text() == "via-9p\n"


def test_mount_failure_is_loud(guest_ready, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    with pytest.raises(GuestError, match="mount of tag broken at /mnt/broken failed"):
        run_guest("touch /mnt/broken/ran", [Share("broken", ninep_dir=str(tmp_path),
                                                  mount_opts="version=9p2000.bogus")], timeout=120)
    assert not marker.exists(), "the script ran although its share was not mounted"

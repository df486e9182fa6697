"""Differential conformance cases: run inside a guest on a reference file system (tmpfs) and on
a virtiofs mount; the results must be equal.

Run as root inside the guest (stdlib only; Python 3.9+):

    python3 conformance.py --root DIR [--only a,b] [--fast] > results.json

Each case gets a fresh empty directory and returns a JSON value that captures what a user
would observe: return values, errno names, file contents, modes, owners, link counts, sizes.
Values that legitimately differ between file systems (st_dev, st_ino, absolute times, block
allocation, statfs counts) are never part of a result; relations between them are.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import mmap
import os
import socket
import stat
import sys
import time
import traceback

CASES = {}
SLOW = set()
libc = ctypes.CDLL(None, use_errno=True)


def case(slow=False):
    def deco(fn):
        CASES[fn.__name__] = fn
        if slow:
            SLOW.add(fn.__name__)
        return fn
    return deco


def E(fn, *a, **kw):
    """Call fn; its return value, or the errno name it failed with."""
    try:
        r = fn(*a, **kw)
        return "ok" if r is None else r
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))


def as_user(uid, gid, fn, umask=0o022):
    """Run fn in a child process with the given credentials; return its JSON result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            os.umask(umask)
            out = json.dumps(fn())
        except BaseException as e:
            out = json.dumps({"exception": repr(e)})
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    data = b""
    while True:
        chunk = os.read(r, 65536)
        if not chunk:
            break
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(data)


def mode(p, follow=False):
    st = os.stat(p) if follow else os.lstat(p)
    return oct(st.st_mode)


def own(p):
    st = os.lstat(p)
    return [st.st_uid, st.st_gid]


def read(p):
    with open(p, "rb") as f:
        return f.read()


def write(p, data, flags=os.O_WRONLY | os.O_CREAT | os.O_TRUNC, m=0o644):
    fd = os.open(p, flags, m)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def sha(data):
    return hashlib.sha256(data).hexdigest()[:16]


# ---------------------------------------------------------------- open flags
@case()
def open_creat_excl(d):
    p = os.path.join(d, "f")
    a = E(lambda: os.close(os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640)))
    b = E(lambda: os.close(os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640)))
    os.symlink("dangling", os.path.join(d, "l"))
    c = E(lambda: os.close(os.open(os.path.join(d, "l"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)))
    return [a, b, c, mode(p)]


@case()
def open_trunc(d):
    p = os.path.join(d, "f")
    write(p, b"x" * 1000)
    os.close(os.open(p, os.O_WRONLY | os.O_TRUNC))
    return [os.stat(p).st_size, read(p)[:1].decode() or "empty"]


@case()
def open_append_concurrent(d):
    p = os.path.join(d, "log")
    write(p, b"")
    pids = []
    for k in range(4):
        pid = os.fork()
        if pid == 0:
            fd = os.open(p, os.O_WRONLY | os.O_APPEND)
            for i in range(300):
                os.write(fd, b"%d:%04d:" % (k, i) + b"z" * 50 + b"\n")
            os.close(fd)
            os._exit(0)
        pids.append(pid)
    for pid in pids:
        os.waitpid(pid, 0)
    lines = read(p).splitlines()
    torn = [ln for ln in lines if len(ln) != 57]
    per = {k: sum(1 for ln in lines if ln.startswith(b"%d:" % k)) for k in range(4)}
    return [len(lines), len(torn), sorted(per.values())]


@case()
def open_direct(d):
    p = os.path.join(d, "f")
    buf = mmap.mmap(-1, 8192)
    buf.write(b"D" * 8192)
    try:
        fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644)
    except OSError as e:
        return ["open", errno.errorcode[e.errno]]
    try:
        n = E(os.pwritev, fd, [buf], 0)
        rb = mmap.mmap(-1, 4096)
        m = E(os.preadv, fd, [rb], 4096)
        return [n, m, rb[:4] == b"DDDD", os.stat(p).st_size]
    finally:
        os.close(fd)


@case()
def open_nofollow_directory_path(d):
    p = os.path.join(d, "f")
    write(p, b"abc")
    os.symlink("f", os.path.join(d, "l"))
    r = [E(lambda: os.close(os.open(os.path.join(d, "l"), os.O_RDONLY | os.O_NOFOLLOW))),
         E(lambda: os.close(os.open(p, os.O_RDONLY | os.O_DIRECTORY))),
         E(lambda: os.close(os.open(d, os.O_RDONLY | os.O_DIRECTORY)))]
    fd = os.open(os.path.join(d, "l"), os.O_PATH | os.O_NOFOLLOW)
    r.append(stat.S_ISLNK(os.fstat(fd).st_mode))
    r.append(E(os.read, fd, 1))
    os.close(fd)
    fd = os.open(p, os.O_PATH)
    r.append(os.fstat(fd).st_size)
    os.close(fd)
    return r


@case()
def open_tmpfile(d):
    try:
        fd = os.open(d, os.O_TMPFILE | os.O_RDWR, 0o600)
    except OSError as e:
        return ["open", errno.errorcode[e.errno]]
    os.write(fd, b"anonymous")
    listed = sorted(os.listdir(d))
    nlink0 = os.fstat(fd).st_nlink
    AT_SYMLINK_FOLLOW = 0x400
    if libc.linkat(-100, f"/proc/self/fd/{fd}".encode(), -100,
                   os.path.join(d, "named").encode(), AT_SYMLINK_FOLLOW) != 0:
        raise OSError(ctypes.get_errno(), "linkat")
    os.close(fd)
    return [listed, nlink0, read(os.path.join(d, "named")).decode(), mode(os.path.join(d, "named"))]


# ---------------------------------------------------------------- permissions
@case()
def perm_eacces_file_and_dir(d):
    p = os.path.join(d, "secret")
    write(p, b"s", m=0o600)
    os.chmod(p, 0o600)
    sub = os.path.join(d, "closed")
    os.mkdir(sub, 0o700)
    os.chmod(d, 0o755)
    return as_user(1000, 1000, lambda: [E(lambda: read(p)), E(os.listdir, sub),
                                        E(write, os.path.join(sub, "x"), b""),
                                        E(write, os.path.join(d, "x"), b"")])


@case()
def perm_sticky_dir(d):
    os.chmod(d, 0o1777)
    write(os.path.join(d, "rootfile"), b"r")
    os.chmod(os.path.join(d, "rootfile"), 0o666)

    def user():
        mine = os.path.join(d, "mine")
        write(mine, b"m")
        return [E(os.unlink, os.path.join(d, "rootfile")),
                E(os.rename, os.path.join(d, "rootfile"), os.path.join(d, "stolen")),
                E(os.unlink, mine), E(write, os.path.join(d, "rootfile"), b"w", os.O_WRONLY)]
    return as_user(1000, 1000, user) + [mode(d)]


@case()
def perm_setgid_dir(d):
    sg = os.path.join(d, "sg")
    os.mkdir(sg)
    os.chown(sg, 0, 1234)
    os.chmod(sg, 0o2777)
    write(os.path.join(sg, "byroot"), b"")

    def user():
        write(os.path.join(sg, "byuser"), b"")
        os.mkdir(os.path.join(sg, "subdir"))
        return [own(os.path.join(sg, "byuser")), mode(os.path.join(sg, "subdir")),
                own(os.path.join(sg, "subdir"))]
    return [own(os.path.join(sg, "byroot"))] + as_user(1000, 1000, user)


@case()
def perm_umask_and_ownership(d):
    os.chmod(d, 0o777)

    def user():
        write(os.path.join(d, "f"), b"", m=0o666)
        os.mkdir(os.path.join(d, "dd"), 0o777)
        os.mkfifo(os.path.join(d, "fifo"), 0o666)
        os.symlink("f", os.path.join(d, "l"))
        return [mode(os.path.join(d, n)) for n in ("f", "dd", "fifo")] + \
               [own(os.path.join(d, n)) for n in ("f", "dd", "fifo", "l")]
    return as_user(1000, 1001, user, umask=0o027)


@case()
def perm_killpriv(d):
    os.chmod(d, 0o777)
    p = os.path.join(d, "prog")
    write(p, b"#!/bin/sh\n")
    os.chown(p, 1000, 1000)
    os.chmod(p, 0o6755)
    before = mode(p)

    def user():
        fd = os.open(p, os.O_WRONLY | os.O_APPEND)
        os.write(fd, b"echo\n")
        os.close(fd)
        return mode(p)
    after_write = as_user(1000, 1000, user)
    os.chmod(p, 0o6755)
    os.chown(p, 1001, 1000)
    after_chown = mode(p)
    os.chmod(p, 0o2755)  # sgid without group exec is a lock marker; with it, sgid is cleared
    return [before, after_write, after_chown]


@case()
def perm_access(d):
    p = os.path.join(d, "f")
    write(p, b"")
    os.chmod(p, 0o640)
    os.chown(p, 0, 1000)
    return as_user(1000, 1000, lambda: [os.access(p, os.R_OK), os.access(p, os.W_OK),
                                        os.access(p, os.X_OK), os.access(p, os.F_OK)]) + \
        as_user(1001, 1001, lambda: [os.access(p, os.R_OK)])


# ---------------------------------------------------------------- setattr
class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


UTIME_NOW, UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2


def utimensat(p, a, m):
    ts = (_Timespec * 2)(_Timespec(*a), _Timespec(*m))
    if libc.utimensat(-100, p.encode(), ts, 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


@case()
def setattr_mode_owner_size(d):
    p = os.path.join(d, "f")
    write(p, b"0123456789")
    out = []
    os.chmod(p, 0o4751)
    out.append(mode(p))
    os.chown(p, 123, 456)
    out.append(own(p))
    os.truncate(p, 4)
    out.append(read(p).decode())
    os.truncate(p, 8)
    out.append(read(p).hex())
    fd = os.open(p, os.O_RDWR)
    os.ftruncate(fd, 2)
    out.append(os.fstat(fd).st_size)
    os.ftruncate(fd, 3)
    out.append(os.pread(fd, 10, 0).hex())
    os.close(fd)
    os.chown(p, -1, 789)
    out.append(own(p))
    return out


@case()
def setattr_times(d):
    p = os.path.join(d, "f")
    write(p, b"x")
    os.utime(p, ns=(1_000_000_123, 2_000_000_456))
    st = os.stat(p)
    out = [st.st_atime_ns, st.st_mtime_ns]
    utimensat(p, (0, UTIME_OMIT), (5, 6))
    st = os.stat(p)
    out += [st.st_atime_ns, st.st_mtime_ns]
    before = time.time_ns()
    utimensat(p, (0, UTIME_NOW), (0, UTIME_OMIT))
    st = os.stat(p)
    out += [st.st_atime_ns >= before - 2_000_000_000, st.st_mtime_ns]
    ct0 = os.stat(p).st_ctime_ns
    time.sleep(0.02)
    os.chmod(p, 0o600)
    out.append(os.stat(p).st_ctime_ns > ct0)
    m0 = os.stat(p).st_mtime_ns
    time.sleep(0.02)
    write(p, b"y", os.O_WRONLY)
    out.append(os.stat(p).st_mtime_ns > m0)
    return out


@case()
def setattr_symlink(d):
    """A symlink's own times (touch -h) and owner (lchown); its target keeps its own."""
    j = os.path.join
    write(j(d, "target"), b"t")
    os.utime(j(d, "target"), ns=(7_000_000_000, 8_000_000_000))
    os.symlink("target", j(d, "l"))
    os.symlink("nowhere", j(d, "dangling"))
    r = [E(os.utime, j(d, "l"), ns=(1_000_000_123, 2_000_000_456), follow_symlinks=False)]
    st = os.lstat(j(d, "l"))
    r.append([st.st_atime_ns, st.st_mtime_ns])
    r.append(E(os.utime, j(d, "dangling"), ns=(3_000_000_000, 4_000_000_000),
               follow_symlinks=False))
    r.append(os.lstat(j(d, "dangling")).st_mtime_ns)
    before = time.time_ns()
    r.append(E(os.utime, j(d, "dangling"), None, follow_symlinks=False))  # UTIME_NOW
    r.append(os.lstat(j(d, "dangling")).st_mtime_ns >= before - 2_000_000_000)
    r.append(E(os.lchown, j(d, "l"), 123, 456))
    r.append(own(j(d, "l")))
    r.append(E(os.lchown, j(d, "l"), -1, 789))
    r.append(own(j(d, "l")))
    st = os.stat(j(d, "target"))
    r.append([st.st_atime_ns, st.st_mtime_ns, st.st_uid, st.st_gid])
    r.append(as_user(1000, 1000, lambda: [
        E(os.utime, j(d, "dangling"), ns=(5, 6), follow_symlinks=False),
        E(os.lchown, j(d, "dangling"), 1000, 1000)]))
    return r


# ---------------------------------------------------------------- links and renames
RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT = 1, 2, 4


def renameat2(a, b, flags):
    if libc.renameat2(-100, a.encode(), -100, b.encode(), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


@case()
def links_hard(d):
    p = os.path.join(d, "f")
    write(p, b"h")
    os.link(p, os.path.join(d, "g"))
    os.mkdir(os.path.join(d, "sub"))
    os.link(p, os.path.join(d, "sub", "h"))
    n = os.stat(p).st_nlink
    os.unlink(os.path.join(d, "g"))
    same = os.stat(p).st_ino == os.stat(os.path.join(d, "sub", "h")).st_ino
    return [n, os.stat(p).st_nlink, same, E(os.link, d, os.path.join(d, "dirlink")),
            os.stat(d).st_nlink]


@case()
def links_symlinks(d):
    j = os.path.join
    os.symlink("nowhere", j(d, "dangling"))
    os.mkdir(j(d, "dir"))
    write(j(d, "dir", "in"), b"i")
    os.symlink("dir", j(d, "todir"))
    long_target = "x" * 4000
    os.symlink(long_target, j(d, "long"))
    os.symlink("loop2", j(d, "loop1"))
    os.symlink("loop1", j(d, "loop2"))
    return [os.readlink(j(d, "dangling")), E(os.stat, j(d, "dangling")),
            os.listdir(j(d, "todir")), read(j(d, "todir", "in")).decode(),
            len(os.readlink(j(d, "long"))), E(lambda: read(j(d, "loop1"))),
            mode(j(d, "dangling"))[:5], os.lstat(j(d, "long")).st_size,
            E(os.readlink, j(d, "dir"))]


@case()
def rename_cases(d):
    j = os.path.join
    write(j(d, "a"), b"A")
    write(j(d, "b"), b"B")
    os.rename(j(d, "a"), j(d, "b"))
    r = [read(j(d, "b")).decode(), os.path.exists(j(d, "a"))]
    os.makedirs(j(d, "d1", "x"))
    os.mkdir(j(d, "d2"))
    os.mkdir(j(d, "empty"))
    r.append(E(os.rename, j(d, "d1"), j(d, "empty")))
    r.append(sorted(os.listdir(d)))
    os.makedirs(j(d, "full", "y"))
    r.append(E(os.rename, j(d, "d2"), j(d, "full")))
    r.append(E(os.rename, j(d, "empty"), j(d, "empty", "x", "inside")))
    r.append(E(os.rmdir, j(d, "full")))
    r.append(E(os.rename, j(d, "b"), j(d, "full")))
    r.append(E(os.rename, j(d, "full"), j(d, "b")))
    os.makedirs(j(d, "p", "q"))
    write(j(d, "p", "q", "f"), b"deep")
    os.rename(j(d, "p", "q", "f"), j(d, "moved"))
    r.append(read(j(d, "moved")).decode())
    return r


@case()
def rename2_flags(d):
    j = os.path.join
    write(j(d, "a"), b"A")
    write(j(d, "b"), b"B")
    r = [E(renameat2, j(d, "a"), j(d, "b"), RENAME_NOREPLACE)]
    r.append(E(renameat2, j(d, "a"), j(d, "c"), RENAME_NOREPLACE))
    r.append(E(renameat2, j(d, "c"), j(d, "b"), RENAME_EXCHANGE))
    r.append([read(j(d, "b")).decode(), read(j(d, "c")).decode()])
    os.mkdir(j(d, "dir"))
    r.append(E(renameat2, j(d, "dir"), j(d, "b"), RENAME_EXCHANGE))
    r.append([stat.S_ISDIR(os.lstat(j(d, "b")).st_mode), read(j(d, "dir")).decode()])
    r.append(E(renameat2, j(d, "c"), j(d, "nope"), RENAME_EXCHANGE))
    w = E(renameat2, j(d, "c"), j(d, "w"), RENAME_WHITEOUT)
    r.append(w)
    if w == "ok":
        st = os.lstat(j(d, "c"))
        r.append([stat.S_ISCHR(st.st_mode), st.st_rdev])
    return r


# ---------------------------------------------------------------- special files
@case()
def special_fifo_socket(d):
    j = os.path.join
    os.mkfifo(j(d, "fifo"), 0o644)
    rfd = os.open(j(d, "fifo"), os.O_RDONLY | os.O_NONBLOCK)
    wfd = os.open(j(d, "fifo"), os.O_WRONLY)
    os.write(wfd, b"through the pipe")
    got = os.read(rfd, 100)
    os.close(rfd)
    os.close(wfd)
    s = socket.socket(socket.AF_UNIX)
    s.bind(j(d, "sock"))
    s.listen(1)
    c = socket.socket(socket.AF_UNIX)
    c.connect(j(d, "sock"))
    a, _ = s.accept()
    c.sendall(b"hi")
    msg = a.recv(2)
    for x in (a, c, s):
        x.close()
    return [got.decode(), msg.decode(), stat.S_ISFIFO(os.lstat(j(d, "fifo")).st_mode),
            stat.S_ISSOCK(os.lstat(j(d, "sock")).st_mode), os.lstat(j(d, "fifo")).st_size]


@case()
def special_devices(d):
    j = os.path.join
    os.mknod(j(d, "null"), 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(j(d, "loop"), 0o600 | stat.S_IFBLK, os.makedev(7, 200))
    os.mknod(j(d, "plain"), 0o600 | stat.S_IFREG)
    os.mknod(j(d, "f2"), 0o600 | stat.S_IFIFO)
    st = os.lstat(j(d, "null"))
    write(j(d, "null"), b"discarded", os.O_WRONLY)
    return [stat.S_ISCHR(st.st_mode), os.major(st.st_rdev), os.minor(st.st_rdev),
            os.minor(os.lstat(j(d, "loop")).st_rdev), stat.S_ISBLK(os.lstat(j(d, "loop")).st_mode),
            read(j(d, "null")).decode() or "empty", mode(j(d, "plain")), mode(j(d, "f2")),
            as_user(1000, 1000, lambda: E(os.mknod, j(d, "n2"), 0o666 | stat.S_IFCHR, os.makedev(1, 3)))]


# ---------------------------------------------------------------- data
@case()
def data_sparse_large(d):
    p = os.path.join(d, "big")
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    off = 5 << 30
    os.pwrite(fd, b"tail-data", off)
    os.pwrite(fd, b"head", 0)
    st = os.fstat(fd)
    r = [st.st_size, os.pread(fd, 9, off).decode(), os.pread(fd, 8, 1 << 30).hex(),
         st.st_blocks * 512 < 1 << 20]
    os.close(fd)
    return r


FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 1, 2, 16


def fallocate(fd, m, off, ln):
    if libc.fallocate64(fd, m, ctypes.c_int64(off), ctypes.c_int64(ln)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


@case()
def data_fallocate_and_seek(d):
    p = os.path.join(d, "f")
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    os.write(fd, b"A" * 65536)
    r = [E(fallocate, fd, 0, 0, 131072), os.fstat(fd).st_size]
    r.append(E(fallocate, fd, FALLOC_FL_KEEP_SIZE, 0, 1 << 20))
    r.append(os.fstat(fd).st_size)
    r.append(E(fallocate, fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4096, 8192))
    r.append(os.pread(fd, 4, 4096).hex() + os.pread(fd, 4, 12288).decode())
    r.append(E(fallocate, fd, FALLOC_FL_ZERO_RANGE, 16384, 4096))
    r.append(os.pread(fd, 2, 16384).hex())
    r.append(E(fallocate, fd, FALLOC_FL_PUNCH_HOLE, 0, 4096))  # PUNCH_HOLE needs KEEP_SIZE
    os.ftruncate(fd, 0)
    os.pwrite(fd, b"D", 1 << 20)
    r.append(E(os.lseek, fd, 0, os.SEEK_DATA))
    r.append(E(os.lseek, fd, 0, os.SEEK_HOLE))
    r.append(E(os.lseek, fd, (1 << 20) + 10, os.SEEK_DATA))
    os.close(fd)
    return r


@case()
def data_copy_file_range(d):
    a, b = os.path.join(d, "a"), os.path.join(d, "b")
    data = os.urandom(300000)
    write(a, data)
    fa, fb = os.open(a, os.O_RDONLY), os.open(b, os.O_RDWR | os.O_CREAT, 0o644)
    n = 0
    while n < 200000:
        k = os.copy_file_range(fa, fb, 200000 - n, 1000 + n, n)
        if k == 0:
            break
        n += k
    os.close(fa)
    os.close(fb)
    return [n, read(b) == data[1000:201000]]


@case()
def data_mmap_shared(d):
    p = os.path.join(d, "f")
    write(p, b"\0" * 8192)
    fd = os.open(p, os.O_RDWR)
    try:
        m = mmap.mmap(fd, 8192, mmap.MAP_SHARED)
    except OSError as e:
        os.close(fd)
        return ["mmap", errno.errorcode[e.errno]]
    m[100:105] = b"MMAP!"
    m.flush()
    seen = os.pread(fd, 5, 100)
    os.pwrite(fd, b"write", 200)
    seen2 = m[200:205]
    m.close()
    os.close(fd)
    return [seen.decode(), seen2.decode(), read(p)[100:105].decode()]


@case()
def data_sync_and_two_processes(d):
    p = os.path.join(d, "f")
    data = os.urandom(1 << 20)
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    os.write(fd, data)
    r = [E(os.fsync, fd), E(os.fdatasync, fd), E(libc.syncfs, fd)]
    os.close(fd)
    rd, wr = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(wr, sha(read(p)).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    r.append(os.read(rd, 100).decode() == sha(data))
    return r


@case()
def data_write_read_patterns(d):
    p = os.path.join(d, "f")
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    chunks = [os.urandom(n) for n in (1, 4095, 4097, 65536, 131072 + 7, 1 << 20)]
    off = 0
    for c in chunks:
        os.pwrite(fd, c, off)
        off += len(c)
    whole = b"".join(chunks)
    r = [os.fstat(fd).st_size, sha(os.pread(fd, off, 0)) == sha(whole),
         os.pread(fd, 10, off + 100), os.pread(fd, 3, 4094).hex() == whole[4094:4097].hex()]
    os.close(fd)
    r[2] = r[2].hex()
    return r


# ---------------------------------------------------------------- directories
@case(slow=True)
def dir_10000_entries(d):
    for i in range(10000):
        os.close(os.open(os.path.join(d, "e%05d" % i), os.O_CREAT | os.O_WRONLY, 0o644))
    names = os.listdir(d)
    return [len(names), len(set(names)), sorted(names)[:2], sorted(names)[-1]]


@case()
def dir_2000_entries(d):
    for i in range(2000):
        os.close(os.open(os.path.join(d, "e%04d" % i), os.O_CREAT | os.O_WRONLY, 0o644))
    names = os.listdir(d)
    return [len(names), len(set(names))]


@case()
def dir_telldir_seekdir(d):
    for i in range(300):
        os.mkdir(os.path.join(d, "d%03d" % i))
    libc.opendir.restype = ctypes.c_void_p
    libc.readdir.restype = ctypes.c_void_p
    libc.readdir.argtypes = [ctypes.c_void_p]
    libc.telldir.argtypes = [ctypes.c_void_p]
    libc.telldir.restype = ctypes.c_long
    libc.seekdir.argtypes = [ctypes.c_void_p, ctypes.c_long]
    libc.closedir.argtypes = [ctypes.c_void_p]
    dp = libc.opendir(d.encode())

    def name(ent):  # struct dirent64: ino u64, off i64, reclen u16, type u8, name
        return ctypes.string_at(ent + 19).decode()
    first = []
    pos = None
    for i in range(150):
        if i == 100:
            pos = libc.telldir(dp)
        first.append(name(libc.readdir(dp)))
    libc.seekdir(dp, pos)
    again = [name(libc.readdir(dp)) for _ in range(50)]
    libc.closedir(dp)
    return [again == first[100:150]]


@case()
def dir_modified_while_reading(d):
    for i in range(500):
        os.close(os.open(os.path.join(d, "a%03d" % i), os.O_CREAT | os.O_WRONLY, 0o644))
    seen = []
    with os.scandir(d) as it:
        for k, e in enumerate(it):
            seen.append(e.name)
            if k == 10:
                for i in range(0, 500, 2):
                    os.unlink(os.path.join(d, "a%03d" % i))
                for i in range(200):
                    os.close(os.open(os.path.join(d, "b%03d" % i), os.O_CREAT | os.O_WRONLY))
    # Nothing twice; every entry that existed throughout was seen.
    kept = {"a%03d" % i for i in range(1, 500, 2)}
    return [len(seen) == len(set(seen)), kept <= set(seen)]


@case()
def dir_names(d):
    allbytes = bytes(b for b in range(1, 256) if b != ord("/"))
    names = [allbytes[i:i + 50] for i in range(0, len(allbytes), 50)] + [b"x" * 255, b" ", b"-"]
    r = []
    for n in names:
        r.append(E(lambda: os.close(os.open(os.path.join(d.encode(), n), os.O_CREAT | os.O_WRONLY, 0o644))))
    listed = set(os.listdir(d.encode()))
    r.append(all(n in listed for n in names))
    r.append(E(lambda: os.close(os.open(os.path.join(d, "y" * 256), os.O_CREAT | os.O_WRONLY))))
    r.append(E(os.mkdir, os.path.join(d, "z" * 256)))
    r.append(E(os.stat, os.path.join(d, "q" * 256)))
    return r


@case()
def dir_deep_tree(d):
    comp = "d" * 200
    path = d
    depth = 0
    while len(path) + len(comp) + 1 < 4000:
        path = os.path.join(path, comp)
        os.mkdir(path)
        depth += 1
    write(os.path.join(path, "leaf"), b"deep")
    r = [read(os.path.join(path, "leaf")).decode(), depth > 10]
    r.append(E(os.mkdir, os.path.join(path, "e" * 100)))
    return r


@case()
def dir_rmdir_and_nlink(d):
    j = os.path.join
    os.makedirs(j(d, "a", "b"))
    os.mkdir(j(d, "a", "c"))
    r = [os.stat(j(d, "a")).st_nlink, E(os.rmdir, j(d, "a")), E(os.rmdir, j(d, "a", "c")),
         os.stat(j(d, "a")).st_nlink, E(os.rmdir, j(d, "a", "nope")),
         E(os.unlink, j(d, "a", "b")), E(os.rmdir, j(d, "a", "b", "."))]
    write(j(d, "f"), b"")
    r.append(E(os.rmdir, j(d, "f")))
    r.append(E(os.mkdir, j(d, "f")))
    r.append(E(os.listdir, j(d, "f")))
    return r


# ---------------------------------------------------------------- xattrs
def getxattr_size(p, name):
    n = libc.getxattr(p.encode(), name.encode(), None, ctypes.c_size_t(0))
    if n < 0:
        e = ctypes.get_errno()
        return errno.errorcode[e]
    return n


@case()
def xattr_user(d):
    p = os.path.join(d, "f")
    write(p, b"")
    r = [E(os.setxattr, p, "user.k", b"v1")]
    r.append(sorted(x for x in os.listxattr(p) if x.startswith("user.")))
    r.append(getxattr_size(p, "user.k"))
    buf = ctypes.create_string_buffer(1)
    r.append(libc.getxattr(p.encode(), b"user.k", buf, ctypes.c_size_t(1)) < 0 and
             errno.errorcode[ctypes.get_errno()])
    r.append(E(os.getxattr, p, "user.missing"))
    r.append(E(os.setxattr, p, "user.k", b"x", os.XATTR_CREATE))
    r.append(E(os.setxattr, p, "user.new", b"x", os.XATTR_REPLACE))
    r.append(E(os.setxattr, p, "user.k", b"v2", os.XATTR_REPLACE))
    r.append(os.getxattr(p, "user.k").decode())
    r.append(E(os.removexattr, p, "user.k"))
    r.append(E(os.removexattr, p, "user.k"))
    r.append(E(os.setxattr, p, "user.big", b"b" * 65536))
    r.append(E(os.setxattr, p, "user.toobig", b"b" * 65537))
    r.append(E(os.setxattr, p, "bogus.ns", b"x"))
    os.mkdir(os.path.join(d, "dir"))
    r.append(E(os.setxattr, os.path.join(d, "dir"), "user.d", b"dirval"))
    v = E(os.getxattr, os.path.join(d, "dir"), "user.d")
    r.append(v.decode() if isinstance(v, bytes) else v)
    os.chmod(p, 0o644)
    r.append(as_user(1000, 1000, lambda: [E(os.setxattr, p, "user.u", b"x"),
                                          E(lambda: os.getxattr(p, "user.big") and None)]))
    return r


@case()
def xattr_trusted_security(d):
    p = os.path.join(d, "f")
    write(p, b"")
    r = [E(os.setxattr, p, "trusted.t", b"tt"), E(os.setxattr, p, "security.s", b"sss")]
    r.append(sorted(x for x in os.listxattr(p) if x in ("trusted.t", "security.s")))
    r.append(as_user(1000, 1000, lambda: [E(os.getxattr, p, "trusted.t"),
                                          sorted(x for x in os.listxattr(p) if x == "trusted.t")]))
    return r


# ---------------------------------------------------------------- stat and statfs
@case()
def stat_fields(d):
    p = os.path.join(d, "f")
    write(p, os.urandom(10000))
    st = os.stat(p)
    sv = os.statvfs(d)
    os.mkdir(os.path.join(d, "sub"))
    return [st.st_size, st.st_nlink, st.st_blocks >= 16, st.st_blksize >= 512, st.st_rdev,
            sv.f_namemax, sv.f_bsize > 0, sv.f_blocks >= sv.f_bfree >= sv.f_bavail,
            os.stat(d).st_nlink]


# ---------------------------------------------------------------- locks
@case()
def locks_between_guest_processes(d):
    p = os.path.join(d, "f")
    write(p, b"0" * 100)
    fd = os.open(p, os.O_RDWR)
    fcntl.lockf(fd, fcntl.LOCK_EX, 10, 0)

    def other():
        f2 = os.open(p, os.O_RDWR)
        out = [E(fcntl.lockf, f2, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 0),
               E(fcntl.lockf, f2, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 50),
               E(fcntl.flock, f2, fcntl.LOCK_EX | fcntl.LOCK_NB)]
        os.close(f2)
        return out
    r = as_user(0, 0, other)
    fcntl.flock(fd, fcntl.LOCK_SH)
    r.append(as_user(0, 0, lambda: E(fcntl.flock, os.open(p, os.O_RDONLY), fcntl.LOCK_EX | fcntl.LOCK_NB)))
    r.append(as_user(0, 0, lambda: E(fcntl.flock, os.open(p, os.O_RDONLY), fcntl.LOCK_SH | fcntl.LOCK_NB)))
    os.close(fd)  # drops both
    r.append(as_user(0, 0, lambda: E(fcntl.lockf, os.open(p, os.O_RDWR), fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 0)))
    return r


@case()
def locks_ofd(d):
    F_OFD_SETLK = 37
    p = os.path.join(d, "f")
    write(p, b"0" * 100)
    a, b = os.open(p, os.O_RDWR), os.open(p, os.O_RDWR)
    import struct
    lk = struct.pack("hhxxxxqqixxxx", fcntl.F_WRLCK, 0, 0, 10, 0)
    r = [E(lambda: fcntl.fcntl(a, F_OFD_SETLK, lk) and None),
         E(lambda: fcntl.fcntl(b, F_OFD_SETLK, lk) and None)]
    os.close(a)
    r.append(E(lambda: fcntl.fcntl(b, F_OFD_SETLK, lk) and None))
    os.close(b)
    return r


@case()
def locks_setlkw_waits(d):
    p = os.path.join(d, "f")
    write(p, b"x")
    rd, wr = os.pipe()
    pid = os.fork()
    if pid == 0:
        fd = os.open(p, os.O_RDWR)
        fcntl.lockf(fd, fcntl.LOCK_EX)
        os.write(wr, b"L")
        time.sleep(0.5)
        os._exit(0)  # exit releases the lock
    os.read(rd, 1)
    fd = os.open(p, os.O_RDWR)
    t0 = time.monotonic()
    fcntl.lockf(fd, fcntl.LOCK_EX)  # blocks until the child exits
    waited = time.monotonic() - t0
    os.waitpid(pid, 0)
    os.close(fd)
    return [waited > 0.2]


def run(root, names):
    results = {}
    for n in names:
        d = os.path.join(root, n)
        os.makedirs(d)
        try:
            results[n] = CASES[n](d)
        except Exception as e:
            results[n] = {"exception": "".join(traceback.format_exception_only(type(e), e)).strip()}
    return results


def main(argv):
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--only", default="")
    ap.add_argument("--fast", action="store_true", help="leave out the slow cases")
    ap.add_argument("--list", action="store_true")
    a = ap.parse_args(argv)
    names = [n for n in CASES if not (a.fast and n in SLOW)]
    if a.only:
        names = [n for n in names if n in a.only.split(",")]
    if a.list:
        print("\n".join(names))
        return 0
    os.umask(0o022)
    print(json.dumps(run(a.root, names), sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

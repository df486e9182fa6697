"""Linux system calls the standard library does not wrap, through ctypes.

Each wrapper raises OSError with the errno, like the os module does.
"""

from __future__ import annotations

import ctypes
import os
import struct
import threading

libc = ctypes.CDLL(None, use_errno=True)  # shared by every ctypes caller in the package
_syscall = libc.syscall
_syscall.restype = ctypes.c_long

# x86-64 system call numbers
SYS_getdents64 = 217
SYS_setfsuid = 122
SYS_setfsgid = 123
SYS_renameat2 = 316

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2


def check(ret: int, what: str) -> int:
    """Turn a failed libc/syscall return (negative, errno set) into an OSError."""
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return ret


def setfsuid(uid: int) -> int:
    """Per-thread file system uid (the raw syscall only affects the calling thread)."""
    return _syscall(SYS_setfsuid, ctypes.c_uint(uid))


def setfsgid(gid: int) -> int:
    return _syscall(SYS_setfsgid, ctypes.c_uint(gid))


CLONE_FS = 0x00000200
_fs_unshared = threading.local()


def own_umask() -> None:
    """Give the calling thread its own umask (and working directory and root) with
    unshare(CLONE_FS), once per thread: umask(2) then changes this thread only, not the
    process a library user runs us in.  Threads it starts later share the new copy."""
    if not getattr(_fs_unshared, "done", False):
        check(libc.unshare(CLONE_FS), "unshare(CLONE_FS)")
        _fs_unshared.done = True


SYS_setgroups = 116
SYS_capget = 125
SYS_capset = 126
_CAP_VERSION_3 = 0x20080522
CAP_DAC_OVERRIDE = 1


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def raise_thread_capability(cap: int) -> None:
    """Put ``cap`` (from the permitted set) into the calling thread's effective set; the
    raw capset changes this thread only.  OSError (EPERM) if it is not permitted."""
    hdr = _CapHeader(_CAP_VERSION_3, 0)
    data = (_CapData * 2)()
    check(_syscall(SYS_capget, ctypes.byref(hdr), data), "capget")
    data[cap // 32].effective |= 1 << (cap % 32)
    check(_syscall(SYS_capset, ctypes.byref(hdr), data), "capset")


def set_thread_groups(gids) -> None:
    """The calling thread's supplementary groups (the raw syscall; glibc's setgroups, and so
    os.setgroups, changes every thread of the process).  Needs CAP_SETGID."""
    arr = (ctypes.c_uint * max(len(gids), 1))(*gids)
    check(_syscall(SYS_setgroups, ctypes.c_size_t(len(gids)), arr), "setgroups")


def renameat2(olddirfd: int, oldname: bytes, newdirfd: int, newname: bytes, flags: int) -> None:
    check(_syscall(SYS_renameat2, olddirfd, ctypes.c_char_p(oldname), newdirfd,
                    ctypes.c_char_p(newname), ctypes.c_uint(flags)), "renameat2")


_fchownat = libc.fchownat


def fchownat_empty(fd: int, uid: int, gid: int) -> None:
    """chown the file an O_PATH fd refers to (works on symlinks too, never follows)."""
    check(_fchownat(fd, b"", ctypes.c_uint(uid & 0xFFFFFFFF), ctypes.c_uint(gid & 0xFFFFFFFF),
                     AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW), "fchownat")


_linkat = libc.linkat


def linkat_empty(fd: int, newdirfd: int, newname: bytes) -> None:
    """Hard-link the file an O_PATH fd refers to (needs CAP_DAC_READ_SEARCH)."""
    check(_linkat(fd, b"", newdirfd, ctypes.c_char_p(newname), AT_EMPTY_PATH), "linkat")


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_utimensat = libc.utimensat


def utimensat(dirfd: int, path: bytes, atime: tuple[int, int], mtime: tuple[int, int],
              flags: int = 0) -> None:
    """Set times; each is (sec, nsec) where nsec may be UTIME_NOW or UTIME_OMIT."""
    ts = (_Timespec * 2)(_Timespec(*atime), _Timespec(*mtime))
    check(_utimensat(dirfd, ctypes.c_char_p(path), ts, flags), "utimensat")


_fallocate = libc.fallocate64
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    check(_fallocate(fd, mode, offset, length), "fallocate")


_syncfs = libc.syncfs


def syncfs(fd: int) -> None:
    check(_syncfs(fd), "syncfs")


_DIRENT64 = struct.Struct("<QqHB")  # d_ino d_off d_reclen d_type, then the name


def getdents64(fd: int, bufsize: int = 32768) -> bytes:
    """One getdents64 call: the raw records (empty at the end); parse with iter_dirents."""
    buf = ctypes.create_string_buffer(bufsize)
    n = check(_syscall(SYS_getdents64, fd, buf, ctypes.c_uint(bufsize)), "getdents64")
    return ctypes.string_at(buf, n)


def iter_dirents(raw: bytes, pos: int = 0):
    """(name, ino, type, next_offset, end) for each record from position ``pos`` on (end:
    where the next record starts), parsed lazily: a caller that stops early (a full reply
    buffer) pays only for what it used."""
    n = len(raw)
    unpack = _DIRENT64.unpack_from
    find = raw.index
    while pos < n:
        ino, off, reclen, dtype = unpack(raw, pos)
        if reclen < 20:  # not a record (the kernel's are at least 24 bytes)
            return
        end = pos + reclen
        yield raw[pos + 19:find(b"\0", pos + 19, end)], ino, dtype, off, end
        pos = end


SYS_name_to_handle_at = 303
SYS_open_by_handle_at = 304
MAX_HANDLE_SZ = 128
_HANDLE_HEAD = struct.Struct("=Ii")  # handle_bytes, handle_type


def name_to_handle_at(dirfd: int, path: bytes, flags: int) -> tuple[bytes, int]:
    """(struct file_handle as bytes, mount id) of a file: a reference that needs no fd."""
    buf = ctypes.create_string_buffer(_HANDLE_HEAD.size + MAX_HANDLE_SZ)
    _HANDLE_HEAD.pack_into(buf, 0, MAX_HANDLE_SZ, 0)
    mount_id = ctypes.c_int(0)
    check(_syscall(SYS_name_to_handle_at, dirfd, ctypes.c_char_p(path), buf,
                    ctypes.byref(mount_id), flags), "name_to_handle_at")
    n, _ = _HANDLE_HEAD.unpack_from(buf)
    return buf.raw[:_HANDLE_HEAD.size + n], mount_id.value


def open_by_handle_at(mount_fd: int, handle: bytes, flags: int) -> int:
    """Open a file from its handle (needs CAP_DAC_READ_SEARCH); ESTALE if it is gone."""
    buf = ctypes.create_string_buffer(handle, len(handle))
    return check(_syscall(SYS_open_by_handle_at, mount_fd, buf, flags | os.O_CLOEXEC),
                  "open_by_handle_at")


# statx(2): the birth time (and attribute bits) that os.stat does not give.
STATX_BASIC_STATS = 0x7FF
STATX_BTIME = 0x800
_STATX_HEAD = struct.Struct("<IIQIIIHxxQQQQ" + "qIxxxx" * 4 + "IIII")  # struct statx up to dev_minor
_statx = libc.statx
_statx.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p)


class Statx:
    """The result of statx(2) with ``os.stat_result``'s ``st_*`` names, plus ``stx_mask`` (what
    the kernel filled), ``st_birthtime_ns`` (None when the file system has no birth time),
    ``stx_attributes`` and ``stx_attributes_mask``."""
    __slots__ = ("stx_mask", "st_blksize", "stx_attributes", "st_nlink", "st_uid", "st_gid",
                 "st_mode", "st_ino", "st_size", "st_blocks", "stx_attributes_mask",
                 "st_atime_ns", "st_birthtime_ns", "st_ctime_ns", "st_mtime_ns", "st_rdev", "st_dev")

    def __init__(self, raw: bytes):
        (self.stx_mask, self.st_blksize, self.stx_attributes, self.st_nlink, self.st_uid,
         self.st_gid, self.st_mode, self.st_ino, self.st_size, self.st_blocks,
         self.stx_attributes_mask, a, an, b, bn, c, cn, m, mn,
         rmaj, rmin, dmaj, dmin) = _STATX_HEAD.unpack_from(raw)
        self.st_atime_ns = a * 1_000_000_000 + an
        self.st_birthtime_ns = b * 1_000_000_000 + bn if self.stx_mask & STATX_BTIME else None
        self.st_ctime_ns = c * 1_000_000_000 + cn
        self.st_mtime_ns = m * 1_000_000_000 + mn
        self.st_rdev = os.makedev(rmaj, rmin)
        self.st_dev = os.makedev(dmaj, dmin)


def statx(fd: int, mask: int = STATX_BASIC_STATS | STATX_BTIME) -> Statx:
    """statx(2) of the file ``fd`` refers to (an O_PATH fd will do)."""
    buf = ctypes.create_string_buffer(256)
    check(_statx(fd, b"", AT_EMPTY_PATH, mask, buf), "statx")
    return Statx(buf.raw)


MS_NOSUID = 2
MNT_DETACH = 2


def mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    check(libc.mount(os.fsencode(source), os.fsencode(target), os.fsencode(fstype),
                     ctypes.c_ulong(flags), os.fsencode(data)), f"mount {target}")


def umount2(target: str, flags: int) -> None:
    check(libc.umount2(os.fsencode(target), flags), f"umount {target}")


STATX_MNT_ID = 0x1000
_STATX_MNT_ID_OFFSET = 144  # struct statx: stx_mnt_id after the dev numbers


def mount_id(dirfd: int, path: bytes, flags: int) -> int:
    """The id of the mount a file lives on (statx STATX_MNT_ID, Linux 5.8+)."""
    buf = ctypes.create_string_buffer(256)
    check(_statx(dirfd, path, flags, STATX_MNT_ID, buf), "statx")
    if not struct.unpack_from("<I", buf, 0)[0] & STATX_MNT_ID:
        raise OSError(95, "statx: no mount id")
    return struct.unpack_from("<Q", buf, _STATX_MNT_ID_OFFSET)[0]

"""The file system API the FUSE server calls.

Inode based and synchronous, in the spirit of pyfuse3's ``Operations``: methods run in the
daemon's worker threads, take inode numbers (the FUSE node ids) and names as ``bytes``, and
report failure by raising :class:`FsError` with an errno.  A method left unimplemented answers
the guest ENOSYS (the guest kernel then stops asking).

Lookup counts: every method that returns an :class:`Entry` (lookup, mknod, mkdir, symlink, link,
create, and each entry of readdirplus) hands the guest one reference to that inode; the guest
gives references back through :meth:`FileSystem.forget`.  An inode must stay valid until its
count drops to zero.  The root inode (``ROOT_INODE``) is never forgotten.

Attributes are any object with ``os.stat_result``'s ``st_*`` names (``os.stat_result`` itself, or
:class:`Attr`).  ``st_ino`` is what the guest sees as the inode number; it need not equal the node id.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from typing import Iterable

ROOT_INODE = 1


class FsError(Exception):
    """A file system error that becomes an errno reply to the guest."""

    def __init__(self, errno_: int, message: str | None = None):
        super().__init__(errno_, message or os.strerror(errno_))
        self.errno = errno_


class Context:
    """Who asks: the credentials of the guest process behind a request (one per request,
    hence a plain slotted class)."""
    __slots__ = ("uid", "gid", "pid", "umask")

    def __init__(self, uid: int, gid: int, pid: int, umask: int = 0):
        self.uid = uid
        self.gid = gid
        self.pid = pid
        self.umask = umask

    def __repr__(self) -> str:
        return f"Context(uid={self.uid}, gid={self.gid}, pid={self.pid}, umask={self.umask:o})"


@dataclass
class Attr:
    """Attributes for file systems that do not have an ``os.stat_result`` at hand."""
    st_ino: int = 0
    st_mode: int = 0
    st_nlink: int = 1
    st_uid: int = 0
    st_gid: int = 0
    st_rdev: int = 0
    st_size: int = 0
    st_blocks: int = 0
    st_blksize: int = 4096
    st_atime_ns: int = 0
    st_mtime_ns: int = 0
    st_ctime_ns: int = 0


class Entry:
    """The answer to a lookup: a node id, its attributes and how long the guest may cache them."""
    __slots__ = ("inode", "attr", "generation", "entry_timeout", "attr_timeout")

    def __init__(self, inode: int, attr, generation: int = 0, entry_timeout: float = 1.0,
                 attr_timeout: float = 1.0):
        self.inode = inode
        self.attr = attr
        self.generation = generation
        self.entry_timeout = entry_timeout
        self.attr_timeout = attr_timeout

    def __repr__(self) -> str:
        return f"Entry(inode={self.inode}, generation={self.generation})"


class DirEntry:
    """One directory entry; ``offset`` is the cookie that continues the listing *after* it."""
    __slots__ = ("name", "ino", "type", "offset")

    def __init__(self, name: bytes, ino: int, type: int, offset: int):
        self.name = name
        self.ino = ino
        self.type = type  # DT_* value
        self.offset = offset

    def __repr__(self) -> str:
        return f"DirEntry({self.name!r}, ino={self.ino}, type={self.type}, offset={self.offset})"


@dataclass
class SetattrRequest:
    """The fields a SETATTR changes; ``None`` means leave as is."""
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | None = None   # UTIME_NOW is expressed as `atime_now`
    mtime_ns: int | None = None
    atime_now: bool = False
    mtime_now: bool = False
    kill_suidgid: bool = False


@dataclass
class OpenResult:
    fh: int
    direct_io: bool = False
    keep_cache: bool = False
    cache_dir: bool = False


@dataclass
class Capabilities:
    """What a file system supports beyond the basic operations (the server negotiates it)."""
    posix_locks: bool = False
    flock_locks: bool = False
    writeback_cache: bool = False
    posix_acl: bool = False
    readdirplus: bool = True           # READDIRPLUS answered (DO_READDIRPLUS, READDIRPLUS_AUTO)
    handle_killpriv_v2: bool = True    # the fs clears suid/sgid when the guest asks
    direct_io_allow_mmap: bool = False  # guests may mmap FOPEN_DIRECT_IO files shared
    extra: dict = field(default_factory=dict)


class FileSystem:
    """Base class; override what your file system supports."""

    capabilities = Capabilities()

    def init(self) -> None:
        """The guest mounted (FUSE_INIT).  May be called again after a guest reboot."""

    def destroy(self) -> None:
        """The guest unmounted or the device was reset: drop every inode and handle."""

    wants_end_request = False  # set True to have end_request() called

    def end_request(self) -> None:
        """Called after every request (in the thread that served it) when
        ``wants_end_request`` is true: per-request clean-up."""

    #: A :class:`pyvirtiofs.version_table.VersionTable` the file system bumps on every metadata
    #: change, or None.  With one, guests may negotiate the version extension
    #: (docs/version-table.md) and the server calls :meth:`version_slot`.
    version_table = None

    def version_slot(self, inode: int) -> int:
        """The version-table slot of an inode (only called when ``version_table`` is set)."""
        raise FsError(errno.ENOSYS)

    def lookup(self, parent: int, name: bytes, ctx: Context) -> Entry:
        raise FsError(errno.ENOSYS)

    def forget(self, inode: int, nlookup: int) -> None:
        """Drop nlookup references.  Must not raise for unknown inodes."""

    def getattr(self, inode: int, fh: int | None, ctx: Context) -> tuple[object, float]:
        raise FsError(errno.ENOSYS)

    def setattr(self, inode: int, fh: int | None, req: SetattrRequest,
                ctx: Context) -> tuple[object, float]:
        raise FsError(errno.ENOSYS)

    def readlink(self, inode: int, ctx: Context) -> bytes:
        raise FsError(errno.ENOSYS)

    def symlink(self, parent: int, name: bytes, target: bytes, ctx: Context) -> Entry:
        raise FsError(errno.ENOSYS)

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, ctx: Context) -> Entry:
        raise FsError(errno.ENOSYS)

    def mkdir(self, parent: int, name: bytes, mode: int, ctx: Context) -> Entry:
        raise FsError(errno.ENOSYS)

    def unlink(self, parent: int, name: bytes, ctx: Context) -> None:
        raise FsError(errno.ENOSYS)

    def rmdir(self, parent: int, name: bytes, ctx: Context) -> None:
        raise FsError(errno.ENOSYS)

    def rename(self, parent: int, name: bytes, new_parent: int, new_name: bytes, flags: int,
               ctx: Context) -> None:
        raise FsError(errno.ENOSYS)

    def link(self, inode: int, new_parent: int, new_name: bytes, ctx: Context) -> Entry:
        raise FsError(errno.ENOSYS)

    def open(self, inode: int, flags: int, ctx: Context) -> OpenResult:
        raise FsError(errno.ENOSYS)

    def create(self, parent: int, name: bytes, mode: int, flags: int,
               ctx: Context) -> tuple[Entry, OpenResult]:
        raise FsError(errno.ENOSYS)

    def tmpfile(self, parent: int, mode: int, flags: int,
                ctx: Context) -> tuple[Entry, OpenResult]:
        """An unnamed file in directory ``parent`` (open(2) with O_TMPFILE)."""
        raise FsError(errno.ENOSYS)

    def read(self, inode: int, fh: int, offset: int, size: int) -> bytes:
        raise FsError(errno.ENOSYS)

    def read_into(self, inode: int, fh: int, offset: int, buffers: list[memoryview]) -> int:
        """Read into guest memory directly; the default copies what :meth:`read` returns."""
        data = memoryview(self.read(inode, fh, offset, sum(len(b) for b in buffers)))
        pos = 0
        for b in buffers:
            k = min(len(b), len(data) - pos)
            b[:k] = data[pos:pos + k]
            pos += k
            if pos == len(data):
                break
        return pos

    def write(self, inode: int, fh: int, offset: int, data: bytes, ctx: Context) -> int:
        raise FsError(errno.ENOSYS)

    def write_from(self, inode: int, fh: int, offset: int, buffers: list[memoryview],
                   kill_priv: bool, ctx: Context) -> int:
        """Write from guest memory directly; the default joins the buffers for :meth:`write`."""
        return self.write(inode, fh, offset, b"".join(buffers), ctx)

    def flush(self, inode: int, fh: int, lock_owner: int) -> None:
        pass

    def release(self, inode: int, fh: int) -> None:
        pass

    def fsync(self, inode: int, fh: int, datasync: bool) -> None:
        raise FsError(errno.ENOSYS)

    def opendir(self, inode: int, ctx: Context) -> OpenResult:
        return OpenResult(fh=0)

    def readdir(self, inode: int, fh: int, offset: int) -> Iterable[DirEntry]:
        """Entries after cookie ``offset`` (0 = from the start), lazily; the server stops
        pulling when the guest's buffer is full and asks again from the last cookie it used."""
        raise FsError(errno.ENOSYS)

    def releasedir(self, inode: int, fh: int) -> None:
        pass

    def fsyncdir(self, inode: int, fh: int, datasync: bool) -> None:
        raise FsError(errno.ENOSYS)

    def statfs(self, inode: int) -> os.statvfs_result:
        raise FsError(errno.ENOSYS)

    def access(self, inode: int, mask: int, ctx: Context) -> None:
        raise FsError(errno.ENOSYS)

    def setxattr(self, inode: int, name: bytes, value: bytes, flags: int, ctx: Context) -> None:
        raise FsError(errno.ENOSYS)

    def getxattr(self, inode: int, name: bytes, ctx: Context) -> bytes:
        raise FsError(errno.ENOSYS)

    def listxattr(self, inode: int, ctx: Context) -> list[bytes]:
        raise FsError(errno.ENOSYS)

    def removexattr(self, inode: int, name: bytes, ctx: Context) -> None:
        raise FsError(errno.ENOSYS)

    def fallocate(self, inode: int, fh: int, mode: int, offset: int, length: int) -> None:
        raise FsError(errno.ENOSYS)

    def lseek(self, inode: int, fh: int, offset: int, whence: int) -> int:
        raise FsError(errno.ENOSYS)

    def copy_file_range(self, inode_in: int, fh_in: int, off_in: int, inode_out: int,
                        fh_out: int, off_out: int, length: int, flags: int) -> int:
        raise FsError(errno.ENOSYS)

    def syncfs(self, inode: int) -> None:
        raise FsError(errno.ENOSYS)

    def map_source(self, inode: int, fh: int | None, writable: bool):
        """DAX (FUSE_SETUPMAPPING): a :class:`pyvirtiofs.dax.MapSource` for the file, whose
        ``open(writable)`` gives a new fd to map.  ``fh`` is None when the guest names only the
        inode (Linux does); a given ``fh`` must be this inode's, and opened for writing when
        ``writable``.  Raise FsError to refuse (EBADF, EACCES, EROFS, ...)."""
        raise FsError(errno.ENOSYS)

    # Locks (only called when capabilities say so).
    def getlk(self, inode: int, fh: int, owner: int, start: int, end: int, type_: int,
              pid: int) -> tuple[int, int, int, int]:
        raise FsError(errno.ENOSYS)

    def setlk(self, inode: int, fh: int, owner: int, start: int, end: int, type_: int,
              pid: int, wait: bool, flock: bool) -> None:
        raise FsError(errno.ENOSYS)

    def begin_lock_wait(self, inode: int, owner: int, start: int, end: int, type_: int,
                        flock: bool) -> None:
        """A SETLKW is about to wait; raise FsError(EDEADLK) if that would deadlock."""

    def end_lock_wait(self, inode: int, owner: int, flock: bool) -> None:
        """The wait announced by :meth:`begin_lock_wait` is over."""

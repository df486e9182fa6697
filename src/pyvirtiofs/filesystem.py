"""The file system API the FUSE server calls (the inode level, as libfuse's low-level API).

Write a subclass of :class:`FileSystem` and override what your file system supports; a method
left alone answers the guest ENOSYS (for most operations the guest kernel then stops asking).
For a file system of paths rather than inodes, see :class:`pyvirtiofs.PathFileSystem`.

Inodes
    Methods take inode numbers (FUSE node ids, ``int``) and names (``bytes``, never containing
    ``/``, never ``.`` or ``..`` except in readdir).  ``ROOT_INODE`` (1) is the root and exists
    from the start.  The node id you return in an :class:`Entry` is yours to choose; it need not
    equal ``st_ino`` (what the guest's ``stat`` shows).

Lookup counts
    Every method that returns an :class:`Entry` -- lookup, mknod, mkdir, symlink, link, create,
    tmpfile, and the server's own lookups for READDIRPLUS -- hands the guest one reference to
    that node id.  The guest returns references through :meth:`FileSystem.forget`, possibly
    much later and in batches.  A node id must stay valid while its count is above zero, even
    after its last name is gone (an unlinked open file), and must not be reused for another
    file while it is.  getattr and setattr also return an :class:`Entry` but hand out no
    reference.  :class:`pyvirtiofs.InodeTable` keeps these counts for you.

Errors
    Raise :class:`FsError` (or let an ``OSError`` escape): the guest gets its errno.  Any other
    exception is a bug: the guest gets EIO and the daemon logs the traceback.

Concurrency
    Methods are called concurrently from several threads: one per request queue, plus the
    thread pool (``thread_pool_size``), plus a thread per waiting lock.  Protect shared state
    yourself (a ``threading.Lock`` is enough for most).  Several requests for the same inode
    or handle may be in progress at once; FORGET may arrive while another request for the same
    node id is being served (the count only reaches zero once the guest has no use for it).

Async
    Any method may be a coroutine function (``async def``); it then runs on an event loop the
    library manages (see :mod:`pyvirtiofs.aio`), and the request queue keeps serving meanwhile.
"""

from __future__ import annotations

import enum
import errno
import os
import stat
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Protocol

if TYPE_CHECKING:
    from .version_table import VersionTable

ROOT_INODE = 1
"""The node id of the root directory; it is never forgotten."""


class FsError(Exception):
    """A file system error that becomes an errno reply to the guest: ``FsError(errno.ENOENT)``."""

    def __init__(self, errno_: int, message: str | None = None):
        super().__init__(errno_, message or os.strerror(errno_))
        self.errno = errno_


class Context:
    """Who asks: the credentials of the guest process behind a request (``uid``, ``gid``,
    ``pid``, and for requests that create something the ``umask`` to apply and
    ``supp_groups``, the caller's supplementary groups the guest sent along)."""
    __slots__ = ("uid", "gid", "pid", "umask", "secctx", "supp_groups")

    def __init__(self, uid: int, gid: int, pid: int, umask: int = 0):
        self.uid = uid
        self.gid = gid
        self.pid = pid
        self.umask = umask
        # (xattr name, value): the security context a new file must get (FUSE_SECURITY_CTX)
        self.secctx: tuple[bytes, bytes] | None = None
        # FUSE_CREATE_SUPP_GROUP: the caller's supplementary group owning the parent directory,
        # when it is not the caller's gid (a creator may need it to write there); () when the
        # guest needed none, None when the guest cannot tell (it lacks the extension)
        self.supp_groups: tuple[int, ...] | None = None

    def __repr__(self) -> str:
        return f"Context(uid={self.uid}, gid={self.gid}, pid={self.pid}, umask={self.umask:o})"


class StatResult(Protocol):
    """What attributes must look like: ``os.stat_result`` and :class:`Attr` both qualify.
    (``st_blksize`` may be missing; 4096 is used then.)"""
    @property
    def st_ino(self) -> int: ...
    @property
    def st_mode(self) -> int: ...
    @property
    def st_nlink(self) -> int: ...
    @property
    def st_uid(self) -> int: ...
    @property
    def st_gid(self) -> int: ...
    @property
    def st_rdev(self) -> int: ...
    @property
    def st_size(self) -> int: ...
    @property
    def st_blocks(self) -> int: ...
    @property
    def st_atime_ns(self) -> int: ...
    @property
    def st_mtime_ns(self) -> int: ...
    @property
    def st_ctime_ns(self) -> int: ...


@dataclass
class Attr:
    """File attributes, for file systems without an ``os.stat_result`` at hand.  Times are in
    nanoseconds since the epoch; ``st_blocks`` counts 512-byte units."""
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
    """A node id with its attributes and how long the guest may cache them (seconds).

    Returned by every method that names a node (lookup, mkdir, create, ...) and by getattr and
    setattr.  ``generation`` must change if a node id is ever reused for another file."""
    __slots__ = ("inode", "attr", "generation", "entry_timeout", "attr_timeout", "submount")

    def __init__(self, inode: int, attr: StatResult, generation: int = 0,
                 entry_timeout: float = 1.0, attr_timeout: float = 1.0,
                 submount: bool = False):
        self.inode = inode
        self.attr = attr
        self.generation = generation
        self.entry_timeout = entry_timeout
        self.attr_timeout = attr_timeout
        # A directory that is a mount point of its own: the guest mounts it separately
        # (its own st_dev) when the session negotiated FUSE_SUBMOUNTS.
        self.submount = submount

    def __repr__(self) -> str:
        return f"Entry(inode={self.inode}, generation={self.generation})"


class FileType(enum.IntEnum):
    """Directory entry types (the ``DT_*`` values of ``<dirent.h>``)."""
    UNKNOWN = 0
    FIFO = 1
    CHR = 2
    DIR = 4
    BLK = 6
    REG = 8
    LNK = 10
    SOCK = 12

    @classmethod
    def of_mode(cls, mode: int) -> "FileType":
        """The entry type of a file with this ``st_mode``."""
        return _TYPE_OF_MODE.get(stat.S_IFMT(mode), cls.UNKNOWN)


_TYPE_OF_MODE = {stat.S_IFIFO: FileType.FIFO, stat.S_IFCHR: FileType.CHR,
                 stat.S_IFDIR: FileType.DIR, stat.S_IFBLK: FileType.BLK,
                 stat.S_IFREG: FileType.REG, stat.S_IFLNK: FileType.LNK,
                 stat.S_IFSOCK: FileType.SOCK}


class DirEntry:
    """One directory entry: ``name``, ``ino`` (shown as d_ino), ``type`` (a :class:`FileType`)
    and ``offset``, the cookie that continues the listing *after* this entry."""
    __slots__ = ("name", "ino", "type", "offset")

    def __init__(self, name: bytes, ino: int, type: int, offset: int):
        self.name = name
        self.ino = ino
        self.type = type
        self.offset = offset

    def __repr__(self) -> str:
        return f"DirEntry({self.name!r}, ino={self.ino}, type={self.type}, offset={self.offset})"


@dataclass
class StatFs:
    """The answer to statfs (the ``os.statvfs_result`` fields the guest uses; an
    ``os.statvfs_result`` is accepted as well)."""
    f_bsize: int = 4096
    f_frsize: int = 4096
    f_blocks: int = 0
    f_bfree: int = 0
    f_bavail: int = 0
    f_files: int = 0
    f_ffree: int = 0
    f_namemax: int = 255


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

    def apply(self, attr: Any, now: int | None = None) -> None:
        """Make these changes to ``attr`` in place: any object with :class:`Attr`'s field
        names (an ``Attr``, a node of yours).  It gets the permission bits of ``mode`` (its
        file type stays), ``uid``, ``gid``, the times (``atime_now``/``mtime_now``: ``now``,
        by default the clock) and ``st_ctime_ns`` = now; ``st_mtime_ns`` = now too when
        ``size`` is set, as truncate(2) does; ``kill_suidgid`` drops suid, and sgid where
        group execution is on.  The size itself is yours to apply to your data."""
        now = time.time_ns() if now is None else now
        if self.mode is not None:
            attr.st_mode = stat.S_IFMT(attr.st_mode) | stat.S_IMODE(self.mode)
        if self.uid is not None:
            attr.st_uid = self.uid
        if self.gid is not None:
            attr.st_gid = self.gid
        if self.kill_suidgid:
            attr.st_mode &= ~(stat.S_ISUID | (stat.S_ISGID if attr.st_mode & stat.S_IXGRP else 0))
        if self.size is not None:
            attr.st_mtime_ns = now
        if self.atime_now or self.atime_ns is not None:
            attr.st_atime_ns = now if self.atime_now else self.atime_ns
        if self.mtime_now or self.mtime_ns is not None:
            attr.st_mtime_ns = now if self.mtime_now else self.mtime_ns
        attr.st_ctime_ns = now


@dataclass
class OpenResult:
    """An open file or directory: ``fh`` is your handle (passed back to read, write, release,
    ...); the flags tell the guest how to cache its data."""
    fh: int
    direct_io: bool = False
    keep_cache: bool = False
    cache_dir: bool = False


@dataclass
class Capabilities:
    """What a file system supports beyond the basic operations (negotiated at FUSE_INIT)."""
    posix_locks: bool = False
    flock_locks: bool = False
    writeback_cache: bool = False
    posix_acl: bool = False            # FUSE_POSIX_ACL: the guest checks ACLs, sends umask
    security_label: bool = False       # FUSE_SECURITY_CTX: new files come with a context
    submounts: bool = False            # FUSE_SUBMOUNTS: Entry.submount is honoured
    readdirplus: bool = True           # READDIRPLUS answered (DO_READDIRPLUS, READDIRPLUS_AUTO)
    # True: the fs clears suid/sgid itself when the guest asks (write_from's ``kill_priv``,
    # SetattrRequest.kill_suidgid, O_TRUNC opens); False: the guest sends a chmod instead.
    handle_killpriv_v2: bool = False
    direct_io_allow_mmap: bool = False  # guests may mmap FOPEN_DIRECT_IO files shared
    # FUSE_ALLOW_IDMAP: the guest may make idmapped mounts; then only creating requests carry
    # the caller's ids (mapped through the mount), every other one uid = gid = 2**32 - 1
    idmapped_mounts: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class _PerInstanceCapabilities:
    """``FileSystem.capabilities``: each instance gets its own :class:`Capabilities` on first
    use (so changing one file system's never changes another's); assigning replaces it."""

    def __get__(self, obj: Any, owner: type | None = None) -> Capabilities:
        if obj is None:
            return Capabilities()
        caps: Capabilities | None = obj.__dict__.get("capabilities")
        if caps is None:
            caps = obj.__dict__["capabilities"] = Capabilities()
        return caps


class FileSystem:
    """Base class of inode-level file systems; override what yours supports.

    See the module documentation for the lookup-count, error and concurrency rules that apply
    to every method."""

    capabilities = _PerInstanceCapabilities()
    """This file system's :class:`Capabilities` (per instance)."""

    wants_end_request = False
    """Set True to have :meth:`end_request` called after every request."""

    # -- session ---------------------------------------------------------------------------
    def init(self) -> None:
        """The guest mounted (FUSE_INIT).  Called again after a guest reboot (after
        :meth:`destroy`)."""

    def destroy(self) -> None:
        """The guest unmounted, rebooted or the device was reset: every lookup count drops to
        zero and every handle is gone (no forget or release follows)."""

    def end_request(self) -> None:
        """Called after every request, in the thread that served it, when
        ``wants_end_request`` is true: per-request clean-up."""

    #: A :class:`pyvirtiofs.version_table.VersionTable` the file system bumps on every metadata
    #: change, or None.  With one, guests may negotiate the version extension
    #: (docs/version-table.md) and the server calls :meth:`version_slot`.
    version_table: VersionTable | None = None

    def version_slot(self, inode: int) -> int:
        """The version-table slot of an inode (only called when ``version_table`` is set)."""
        raise FsError(errno.ENOSYS)

    # -- names and inodes ------------------------------------------------------------------
    def lookup(self, parent: int, name: bytes, ctx: Context) -> Entry:
        """The entry ``name`` in directory ``parent``.  Hands out one reference (the lookup
        count of the returned node id grows by one).  Raise ENOENT when absent."""
        raise FsError(errno.ENOSYS)

    def forget(self, inode: int, nlookup: int) -> None:
        """The guest drops ``nlookup`` references to ``inode``; at zero it may be freed.
        Must not raise, also for node ids it does not know.  Runs on the high-priority queue's
        thread, concurrently with requests that use the same node id."""

    def getattr(self, inode: int, fh: int | None, ctx: Context) -> Entry:
        """The attributes of ``inode`` (``fh`` is the open handle when the guest has one), as
        an :class:`Entry` for that node id; only ``attr`` and ``attr_timeout`` are used.  No
        reference is handed out."""
        raise FsError(errno.ENOSYS)

    def statx(self, inode: int, fh: int | None, ctx: Context) -> Entry:
        """Like :meth:`getattr`, for guests that ask for more (FUSE_STATX, Linux >= 6.6): the
        attributes may also carry ``st_birthtime_ns`` (None or absent: no birth time).
        Unimplemented, the guest falls back to GETATTR for good."""
        raise FsError(errno.ENOSYS)

    def setattr(self, inode: int, fh: int | None, req: SetattrRequest, ctx: Context) -> Entry:
        """Change the attributes named in ``req`` (truncate, chmod, chown, utimens) and return
        the new ones as :meth:`getattr` does.  No reference is handed out."""
        raise FsError(errno.ENOSYS)

    def readlink(self, inode: int, ctx: Context) -> bytes:
        """The target of the symbolic link ``inode``."""
        raise FsError(errno.ENOSYS)

    def symlink(self, parent: int, name: bytes, target: bytes, ctx: Context) -> Entry:
        """Create a symbolic link ``name`` -> ``target``.  Hands out one reference."""
        raise FsError(errno.ENOSYS)

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, ctx: Context) -> Entry:
        """Create a regular file, device, FIFO or socket (``mode`` includes the type; apply
        ``ctx.umask``).  Hands out one reference."""
        raise FsError(errno.ENOSYS)

    def mkdir(self, parent: int, name: bytes, mode: int, ctx: Context) -> Entry:
        """Create a directory (apply ``ctx.umask``).  Hands out one reference."""
        raise FsError(errno.ENOSYS)

    def unlink(self, parent: int, name: bytes, ctx: Context) -> None:
        """Remove the name ``name``; the node lives on while its lookup count is above zero."""
        raise FsError(errno.ENOSYS)

    def rmdir(self, parent: int, name: bytes, ctx: Context) -> None:
        """Remove the empty directory ``name`` (ENOTEMPTY otherwise)."""
        raise FsError(errno.ENOSYS)

    def rename(self, parent: int, name: bytes, new_parent: int, new_name: bytes, flags: int,
               ctx: Context) -> None:
        """Move ``parent/name`` to ``new_parent/new_name``; ``flags`` are renameat2's
        (RENAME_NOREPLACE 1, RENAME_EXCHANGE 2, RENAME_WHITEOUT 4; EINVAL if unsupported).
        Lookup counts move with the nodes: no reference is handed out or dropped."""
        raise FsError(errno.ENOSYS)

    def link(self, inode: int, new_parent: int, new_name: bytes, ctx: Context) -> Entry:
        """Give ``inode`` the new name ``new_parent/new_name``.  Hands out one reference."""
        raise FsError(errno.ENOSYS)

    # -- files -----------------------------------------------------------------------------
    def open(self, inode: int, flags: int, ctx: Context) -> OpenResult:
        """Open the file ``inode`` with ``open(2)`` ``flags`` (O_CREAT and O_EXCL are never
        among them; O_TRUNC may be).  The handle lives until :meth:`release`."""
        raise FsError(errno.ENOSYS)

    def create(self, parent: int, name: bytes, mode: int, flags: int,
               ctx: Context) -> tuple[Entry, OpenResult]:
        """Create and open the regular file ``name`` (apply ``ctx.umask``; EEXIST only when
        ``flags`` has O_EXCL).  Hands out one reference and one handle."""
        raise FsError(errno.ENOSYS)

    def tmpfile(self, parent: int, mode: int, flags: int,
                ctx: Context) -> tuple[Entry, OpenResult]:
        """An unnamed file in directory ``parent`` (open(2) with O_TMPFILE).  Hands out one
        reference and one handle."""
        raise FsError(errno.ENOSYS)

    def read(self, inode: int, fh: int, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes at ``offset``; fewer only at the end of the file."""
        raise FsError(errno.ENOSYS)

    def read_into(self, inode: int, fh: int, offset: int, buffers: list[memoryview]) -> int:
        """Read straight into guest memory (``buffers``, in order); return the bytes read.
        The default copies what :meth:`read` returns: override it to avoid the copy."""
        data = memoryview(self.read(inode, fh, offset, sum(len(b) for b in buffers)))
        return copy_into(data, buffers)

    def write(self, inode: int, fh: int, offset: int, data: bytes, ctx: Context) -> int:
        """Write ``data`` at ``offset`` (at the end for O_APPEND handles, if you honour it);
        return the number of bytes written."""
        raise FsError(errno.ENOSYS)

    def write_from(self, inode: int, fh: int, offset: int, buffers: list[memoryview],
                   kill_priv: bool, ctx: Context) -> int:
        """Write straight from guest memory; ``kill_priv`` (only with
        ``capabilities.handle_killpriv_v2``): drop suid/sgid as a write by an unprivileged
        process would.  The default joins the buffers for :meth:`write`."""
        return self.write(inode, fh, offset, b"".join(buffers), ctx)

    def flush(self, inode: int, fh: int, lock_owner: int) -> None:
        """close(2) of one file descriptor of the handle (there may be several, or none)."""

    def release(self, inode: int, fh: int) -> None:
        """The last reference to the handle is gone; free it.  Its errors are ignored."""

    def fsync(self, inode: int, fh: int, datasync: bool) -> None:
        """Make the file's data (and, unless ``datasync``, metadata) durable."""
        raise FsError(errno.ENOSYS)

    def fallocate(self, inode: int, fh: int, mode: int, offset: int, length: int) -> None:
        """fallocate(2): reserve or punch space (``mode`` flags as fallocate's)."""
        raise FsError(errno.ENOSYS)

    def lseek(self, inode: int, fh: int, offset: int, whence: int) -> int:
        """SEEK_DATA / SEEK_HOLE (other whence values never reach the file system)."""
        raise FsError(errno.ENOSYS)

    def copy_file_range(self, inode_in: int, fh_in: int, off_in: int, inode_out: int,
                        fh_out: int, off_out: int, length: int, flags: int) -> int:
        """Copy ``length`` bytes between two open files without the guest seeing the data;
        return the number copied."""
        raise FsError(errno.ENOSYS)

    # -- directories -----------------------------------------------------------------------
    def opendir(self, inode: int, ctx: Context) -> OpenResult:
        """Open directory ``inode`` for reading; the default hands out handle 0."""
        return OpenResult(fh=0)

    def readdir(self, inode: int, fh: int, offset: int) -> Iterable[DirEntry]:
        """Entries after cookie ``offset`` (0: from the start), lazily; the server stops
        pulling when the guest's buffer is full and asks again from the last cookie it used.
        Include ``.`` and ``..``.  No reference is handed out (for READDIRPLUS see
        :meth:`readdirplus`)."""
        raise FsError(errno.ENOSYS)

    def readdirplus(self, inode: int, fh: int, offset: int,
                    ctx: Context) -> Iterable[tuple[DirEntry, Entry | None]]:
        """For READDIRPLUS: the entries after cookie ``offset``, each with its
        :class:`Entry`, lazily.  Each Entry hands out one reference, as :meth:`lookup` does;
        ``None`` instead for ``.``, ``..`` and an entry that is gone by now (the guest gets a
        plain directory entry).  The server stops pulling when the guest's buffer is full:
        the reference of the last entry pulled, which did not fit, it gives back through
        :meth:`forget`.  The default calls :meth:`readdir` and :meth:`lookup`; override it
        when your listing comes with the attributes."""
        for ent in self.readdir(inode, fh, offset):
            name = ent.name
            if name == b"." or name == b"..":
                yield ent, None
                continue
            try:
                entry = self.lookup(inode, name, ctx)
            except (FsError, OSError):  # gone meanwhile
                entry = None
            yield ent, entry

    def releasedir(self, inode: int, fh: int) -> None:
        """The directory handle is closed."""

    def fsyncdir(self, inode: int, fh: int, datasync: bool) -> None:
        """fsync(2) on a directory."""
        raise FsError(errno.ENOSYS)

    # -- the file system as a whole --------------------------------------------------------
    def statfs(self, inode: int) -> StatFs:
        """Sizes and counts for statfs(2) (``inode`` is any node of the file system)."""
        raise FsError(errno.ENOSYS)

    def syncfs(self, inode: int) -> None:
        """syncfs(2): make everything durable."""
        raise FsError(errno.ENOSYS)

    def map_source(self, inode: int, fh: int | None, writable: bool) -> Any:
        """DAX (FUSE_SETUPMAPPING): a :class:`pyvirtiofs.dax.MapSource` for the file, whose
        ``open(writable)`` gives a new fd to map.  ``fh`` is None when the guest names only the
        inode (Linux does); a given ``fh`` must be this inode's, and opened for writing when
        ``writable``.  Raise FsError to refuse (EBADF, EACCES, EROFS, ...)."""
        raise FsError(errno.ENOSYS)

    def access(self, inode: int, mask: int, ctx: Context) -> None:
        """access(2) with ``mask`` (R_OK, W_OK, X_OK; 0 = F_OK); raise EACCES to refuse."""
        raise FsError(errno.ENOSYS)

    # -- extended attributes ---------------------------------------------------------------
    def setxattr(self, inode: int, name: bytes, value: bytes, flags: int, ctx: Context) -> None:
        """Set extended attribute ``name`` (``flags``: XATTR_CREATE 1, XATTR_REPLACE 2)."""
        raise FsError(errno.ENOSYS)

    def getxattr(self, inode: int, name: bytes, ctx: Context) -> bytes:
        """The value of ``name`` (ENODATA when absent); the server checks the guest's size."""
        raise FsError(errno.ENOSYS)

    def listxattr(self, inode: int, ctx: Context) -> list[bytes]:
        """The names of the extended attributes."""
        raise FsError(errno.ENOSYS)

    def removexattr(self, inode: int, name: bytes, ctx: Context) -> None:
        """Remove ``name`` (ENODATA when absent)."""
        raise FsError(errno.ENOSYS)

    # -- locks (only called when capabilities enable them) ---------------------------------
    def getlk(self, inode: int, fh: int, owner: int, start: int, end: int, type_: int,
              pid: int) -> tuple[int, int, int, int]:
        """F_GETLK: the first conflicting lock as ``(start, end, type, pid)``, or the asked
        range with type F_UNLCK (2) when there is none."""
        raise FsError(errno.ENOSYS)

    def setlk(self, inode: int, fh: int, owner: int, start: int, end: int, type_: int,
              pid: int, wait: bool, flock: bool) -> None:
        """Take or release a lock without blocking (``wait`` is always False: raise EAGAIN and
        the server retries a waiting request from a thread of its own)."""
        raise FsError(errno.ENOSYS)

    def begin_lock_wait(self, inode: int, owner: int, start: int, end: int, type_: int,
                        flock: bool) -> None:
        """A SETLKW is about to wait; raise FsError(EDEADLK) if that would deadlock."""

    def end_lock_wait(self, inode: int, owner: int, flock: bool) -> None:
        """The wait announced by :meth:`begin_lock_wait` is over."""


def copy_into(data: memoryview, buffers: list[memoryview]) -> int:
    """Copy ``data`` into consecutive ``buffers``; return the number of bytes copied."""
    pos = 0
    for b in buffers:
        k = min(len(b), len(data) - pos)
        b[:k] = data[pos:pos + k]
        pos += k
        if pos == len(data):
            break
    return pos

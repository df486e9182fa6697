"""The path level, as libfuse's high-level API and fusepy's ``Operations``: subclass
:class:`PathFileSystem` and implement methods that take paths (``str``, absolute, ``"/"`` is the
root); node ids, lookup counts and handles are kept for you by :class:`PathAdapter`, an
inode-level :class:`FileSystem` built on :class:`InodeTable` and :class:`HandleTable`.
:class:`PathView` goes the other way: an inode-level file system (``PassthroughFs``, yours)
used through paths, to build one file system on others (examples/overlay_fs.py).

:func:`pyvirtiofs.serve` and :func:`pyvirtiofs.mount` take either level.

Errors and concurrency are as for :class:`FileSystem`: raise :class:`FsError` or let an
``OSError`` escape; methods run concurrently in several threads; any may be ``async def``.
Unlinked files: once a name is removed, its node is gone for the path level too, so an open
file whose name was removed answers ESTALE (libfuse's ``hard_remove``).
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
import time
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

from . import aio
from .cache import CachePolicy
from .filesystem import (ROOT_INODE, Context, DirEntry, Entry, FileSystem, FileType, FsError,
                         OpenResult, SetattrRequest, StatFs, StatResult)
from .inodes import HandleTable, InodeTable

_GONE = "//gone"  # the key of a node whose name was removed: matches no real path


class PathFileSystem:
    """Base class of path-level file systems.  ``getattr`` and ``readdir`` make a read-only
    tree; ``open`` and ``read`` make files readable; the rest make it writable.  Anything
    not implemented answers ENOSYS (read-only operations) or EROFS (changes)."""

    entry_timeout: float = 1.0
    """Seconds the guest may cache names and attributes (0: ask every time); a ``cache=``
    mode given to :func:`~pyvirtiofs.serve` or :func:`~pyvirtiofs.mount` takes its place."""

    serve_in_threads: bool = False
    """True when methods wait on something slow (a network store): requests are then taken off
    the queue at once and served in the pool coroutine methods use (:mod:`pyvirtiofs.aio`),
    so one waiting request does not hold up the others."""

    def getattr(self, path: str) -> StatResult:
        """The attributes of ``path`` (an :class:`Attr` or ``os.stat_result``); ENOENT if it
        does not exist.  ``st_ino`` may be 0: the node id is shown then."""
        raise FsError(errno.ENOSYS)

    def readdir(self, path: str) -> Iterable[str]:
        """The names in directory ``path`` (without ``.`` and ``..``)."""
        raise FsError(errno.ENOSYS)

    def readlink(self, path: str) -> str:
        """The target of the symbolic link ``path``."""
        raise FsError(errno.ENOSYS)

    def open(self, path: str, flags: int) -> Any:
        """Open ``path``; whatever you return is the ``fh`` given to read, write and release."""
        return None

    def create(self, path: str, mode: int, flags: int) -> Any:
        """Create and open the regular file ``path`` (``mode`` includes S_IFREG)."""
        raise FsError(errno.EROFS)

    def read(self, path: str, fh: Any, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes at ``offset`` (fewer only at the end of the file)."""
        raise FsError(errno.ENOSYS)

    def write(self, path: str, fh: Any, offset: int, data: bytes) -> int:
        """Write ``data`` at ``offset``; return the number of bytes written."""
        raise FsError(errno.EROFS)

    def truncate(self, path: str, length: int, fh: Any = None) -> None:
        """Set the size of ``path`` (``fh``: the handle, when the guest truncates one)."""
        raise FsError(errno.EROFS)

    def flush(self, path: str, fh: Any) -> None:
        """close(2) of one descriptor of ``fh``."""

    def fsync(self, path: str, fh: Any, datasync: bool) -> None:
        """Make the file durable (default: nothing to do)."""

    def release(self, path: str | None, fh: Any) -> None:
        """The last descriptor of ``fh`` is closed (``path`` is None if it was removed)."""

    def mkdir(self, path: str, mode: int) -> None:
        """Create the directory ``path`` (``mode``: permission bits, umask applied)."""
        raise FsError(errno.EROFS)

    def mknod(self, path: str, mode: int, rdev: int) -> None:
        """Create a regular file, device, FIFO or socket (``mode`` includes the type)."""
        raise FsError(errno.EROFS)

    def symlink(self, path: str, target: str) -> None:
        """Create the symbolic link ``path`` -> ``target``."""
        raise FsError(errno.EROFS)

    def link(self, path: str, new_path: str) -> None:
        """Give the file ``path`` a second name, ``new_path``."""
        raise FsError(errno.EROFS)

    def unlink(self, path: str) -> None:
        """Remove the name ``path`` (not a directory)."""
        raise FsError(errno.EROFS)

    def rmdir(self, path: str) -> None:
        """Remove the empty directory ``path`` (ENOTEMPTY otherwise)."""
        raise FsError(errno.EROFS)

    def rename(self, old: str, new: str, flags: int) -> None:
        """Move ``old`` to ``new`` (replacing it); ``flags`` as renameat2's (EINVAL if set and
        unsupported)."""
        raise FsError(errno.EROFS)

    def chmod(self, path: str, mode: int) -> None:
        """Set the permission bits of ``path``."""
        raise FsError(errno.EROFS)

    def chown(self, path: str, uid: int, gid: int) -> None:
        """``uid``/``gid`` of -1 mean unchanged."""
        raise FsError(errno.EROFS)

    def utimens(self, path: str, atime_ns: int | None, mtime_ns: int | None) -> None:
        """Set times (nanoseconds since the epoch; None: unchanged)."""
        raise FsError(errno.EROFS)

    def statfs(self, path: str) -> StatFs:
        """Sizes and counts for statfs(2); the default reports nothing used and nothing free."""
        return StatFs()


def _path(parent: str, name: bytes) -> str:
    return posixpath.join(parent, os.fsdecode(name))


class PathAdapter(FileSystem):
    """Serves a :class:`PathFileSystem` through the inode-level API.  ``cache`` is a cache
    mode, as the daemon's ``--cache``: ``"never"``, ``"auto"``, ``"always"`` or ``"metadata"``
    (None: ``fs.entry_timeout`` for names and attributes, file data cached while open)."""

    def __init__(self, fs: PathFileSystem, cache: str | None = None):
        names = aio.async_methods(fs)
        self.fs: PathFileSystem = aio.Blocking(fs, names) if names else fs  # type: ignore
        self._has_coroutines = bool(names) or fs.serve_in_threads
        self.cache = (CachePolicy("auto", fs.entry_timeout, False, False) if cache is None
                      else CachePolicy.from_name(cache))
        self.inodes: InodeTable[str] = InodeTable("/")
        self.handles: HandleTable[tuple[int, Any]] = HandleTable()  # fh -> (inode, your fh)

    def destroy(self) -> None:
        self.inodes.clear()
        self.handles.clear()

    def _path(self, inode: int) -> str:
        path = self.inodes[inode]
        if path.startswith(_GONE):
            raise FsError(errno.ESTALE, "the file was removed")
        return path

    def _entry(self, path: str) -> Entry:
        attr = self.fs.getattr(path)  # before taking a reference: ENOENT must not leak one
        inode = self.inodes.lookup(path)
        t = self.cache.timeout
        return Entry(inode, self._with_ino(attr, inode), entry_timeout=t, attr_timeout=t)

    @staticmethod
    def _with_ino(attr: StatResult, inode: int) -> StatResult:
        return attr if attr.st_ino else _AttrView(attr, inode)

    def lookup(self, parent: int, name: bytes, ctx: Context) -> Entry:
        return self._entry(_path(self._path(parent), name))

    def forget(self, inode: int, nlookup: int) -> None:
        self.inodes.forget(inode, nlookup)

    def getattr(self, inode: int, fh: int | None, ctx: Context) -> Entry:
        attr = self.fs.getattr(self._path(inode))
        return Entry(inode, self._with_ino(attr, inode), attr_timeout=self.cache.timeout)

    def setattr(self, inode: int, fh: int | None, req: SetattrRequest, ctx: Context) -> Entry:
        path = self._path(inode)
        if req.mode is not None:
            self.fs.chmod(path, stat.S_IMODE(req.mode))
        if req.uid is not None or req.gid is not None:
            self.fs.chown(path, -1 if req.uid is None else req.uid,
                          -1 if req.gid is None else req.gid)
        if req.size is not None:
            self.fs.truncate(path, req.size, self.handles[fh][1] if fh is not None else None)
        if req.atime_ns is not None or req.mtime_ns is not None or req.atime_now or req.mtime_now:
            now = time.time_ns()
            self.fs.utimens(path, now if req.atime_now else req.atime_ns,
                            now if req.mtime_now else req.mtime_ns)
        return self.getattr(inode, fh, ctx)

    def readlink(self, inode: int, ctx: Context) -> bytes:
        return os.fsencode(self.fs.readlink(self._path(inode)))

    def mkdir(self, parent: int, name: bytes, mode: int, ctx: Context) -> Entry:
        path = _path(self._path(parent), name)
        self.fs.mkdir(path, mode & ~ctx.umask & 0o7777)
        return self._entry(path)

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, ctx: Context) -> Entry:
        path = _path(self._path(parent), name)
        self.fs.mknod(path, mode & ~ctx.umask, rdev)
        return self._entry(path)

    def symlink(self, parent: int, name: bytes, target: bytes, ctx: Context) -> Entry:
        path = _path(self._path(parent), name)
        self.fs.symlink(path, os.fsdecode(target))
        return self._entry(path)

    def link(self, inode: int, new_parent: int, new_name: bytes, ctx: Context) -> Entry:
        path = _path(self._path(new_parent), new_name)
        self.fs.link(self._path(inode), path)
        return self._entry(path)

    def unlink(self, parent: int, name: bytes, ctx: Context) -> None:
        path = _path(self._path(parent), name)
        self.fs.unlink(path)
        self.inodes.detach(path, _GONE)

    def rmdir(self, parent: int, name: bytes, ctx: Context) -> None:
        path = _path(self._path(parent), name)
        self.fs.rmdir(path)
        self.inodes.detach(path, _GONE)

    def rename(self, parent: int, name: bytes, new_parent: int, new_name: bytes, flags: int,
               ctx: Context) -> None:
        old = _path(self._path(parent), name)
        new = _path(self._path(new_parent), new_name)
        self.fs.rename(old, new, flags)
        if flags & 2:  # RENAME_EXCHANGE: swap the two subtrees' keys
            tmp = "//swap" + new
            self._move(new, tmp)
            self._move(old, new)
            self._move(tmp, old)
        else:
            self.inodes.detach(new, _GONE)
            self._move(old, new)

    def _move(self, old: str, new: str) -> None:
        """Rename ``old`` and every path under it."""
        prefix = old + "/"
        for key in self.inodes.keys():
            if key.startswith(prefix):
                self.inodes.rekey(key, new + key[len(old):])
        self.inodes.rekey(old, new)

    def open(self, inode: int, flags: int, ctx: Context) -> OpenResult:
        fh = self.fs.open(self._path(inode), flags)
        return self._opened(self.handles.add((inode, fh)))

    def _opened(self, fh: int, is_dir: bool = False) -> OpenResult:
        c = self.cache
        if is_dir:
            return OpenResult(fh, cache_dir=c.keep_cache)
        return OpenResult(fh, direct_io=c.direct_io, keep_cache=c.keep_cache)

    def create(self, parent: int, name: bytes, mode: int, flags: int,
               ctx: Context) -> tuple[Entry, OpenResult]:
        path = _path(self._path(parent), name)
        fh = self.fs.create(path, stat.S_IFREG | (mode & ~ctx.umask & 0o7777), flags)
        entry = self._entry(path)
        return entry, self._opened(self.handles.add((entry.inode, fh)))

    def read(self, inode: int, fh: int, offset: int, size: int) -> bytes:
        return self.fs.read(self._path(inode), self.handles[fh][1], offset, size)

    def write(self, inode: int, fh: int, offset: int, data: bytes, ctx: Context) -> int:
        return self.fs.write(self._path(inode), self.handles[fh][1], offset, data)

    def flush(self, inode: int, fh: int, lock_owner: int) -> None:
        self.fs.flush(self._path(inode), self.handles[fh][1])

    def fsync(self, inode: int, fh: int, datasync: bool) -> None:
        self.fs.fsync(self._path(inode), self.handles[fh][1], datasync)

    def release(self, inode: int, fh: int) -> None:
        opened = self.handles.pop(fh)
        if opened is not None:
            key = self.inodes.get(inode)
            self.fs.release(None if key is None or key.startswith(_GONE) else key, opened[1])

    def opendir(self, inode: int, ctx: Context) -> OpenResult:
        path = self._path(inode)
        names = [".", ".."] + list(self.fs.readdir(path))
        return self._opened(self.handles.add((inode, names)), is_dir=True)

    def readdir(self, inode: int, fh: int, offset: int) -> Iterable[DirEntry]:
        path = self._path(inode)
        names = self.handles[fh][1]
        for i in range(offset, len(names)):
            name = names[i]
            if name in (".", ".."):
                yield DirEntry(os.fsencode(name), inode, FileType.DIR, i + 1)
                continue
            try:
                attr = self.fs.getattr(posixpath.join(path, name))
            except (FsError, OSError):
                continue  # removed since opendir
            yield DirEntry(os.fsencode(name), attr.st_ino or 0xFFFFFFFF,
                           FileType.of_mode(attr.st_mode), i + 1)

    def releasedir(self, inode: int, fh: int) -> None:
        self.handles.pop(fh)

    def statfs(self, inode: int) -> StatFs:
        return self.fs.statfs("/")


class PathView(PathFileSystem):
    """An inode-level :class:`FileSystem` used through paths, as a :class:`PathFileSystem`:
    each call walks its path one name at a time with ``lookup`` and gives the references back
    when done; an open file keeps one reference until :meth:`release`.  Requests are made as
    ``ctx`` (default: root, umask 0), so modes are applied as given.

    ``PathView(PassthroughFs("/srv/lower"))`` is a host directory, confined to it, by path:
    the layers of examples/overlay_fs.py.  Errors are the file system's (``FsError`` or
    ``OSError``).  Thread-safe as the file system is."""

    def __init__(self, fs: FileSystem, ctx: Context | None = None):
        names = aio.async_methods(fs)
        self.fs: FileSystem = aio.Blocking(fs, names) if names else fs  # type: ignore
        self.ctx = ctx if ctx is not None else Context(0, 0, 0)

    def _walk(self, path: str) -> list[int]:
        """The node ids from the root's child down to ``path``, one reference held on each."""
        held: list[int] = []
        try:
            for name in filter(None, path.split("/")):
                parent = held[-1] if held else ROOT_INODE
                held.append(self.fs.lookup(parent, os.fsencode(name), self.ctx).inode)
        except BaseException:
            self._forget(held)
            raise
        return held

    def _forget(self, held: list[int]) -> None:
        for inode in held:
            self.fs.forget(inode, 1)

    @contextmanager
    def node(self, path: str) -> Iterator[int]:
        """The node id of ``path``, with a reference held until the block ends."""
        held = self._walk(path)
        try:
            yield held[-1] if held else ROOT_INODE
        finally:
            self._forget(held)

    @contextmanager
    def _parent(self, path: str) -> Iterator[tuple[int, bytes]]:
        parent, name = posixpath.split(path)
        with self.node(parent) as inode:
            yield inode, os.fsencode(name)

    def _made(self, entry: Entry) -> None:
        self.fs.forget(entry.inode, 1)  # creating handed out a reference we do not keep

    def getattr(self, path: str) -> StatResult:
        with self.node(path) as inode:
            return self.fs.getattr(inode, None, self.ctx).attr

    def stat(self, path: str) -> StatResult | None:
        """:meth:`getattr`, or None where there is nothing at ``path`` (ENOENT, ENOTDIR)."""
        try:
            return self.getattr(path)
        except (FsError, OSError) as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR):
                return None
            raise

    def readdir(self, path: str) -> list[str]:
        with self.node(path) as inode:
            fh = self.fs.opendir(inode, self.ctx).fh
            try:
                return [os.fsdecode(e.name) for e in self.fs.readdir(inode, fh, 0)
                        if e.name not in (b".", b"..")]
            finally:
                self.fs.releasedir(inode, fh)

    def readlink(self, path: str) -> str:
        with self.node(path) as inode:
            return os.fsdecode(self.fs.readlink(inode, self.ctx))

    def open(self, path: str, flags: int) -> "_Opened":
        held = self._walk(path)  # the file's own reference is kept until release
        inode = held[-1] if held else ROOT_INODE
        try:
            opened = _Opened(inode, self.fs.open(inode, flags, self.ctx).fh, bool(held))
        except BaseException:
            self._forget(held)
            raise
        self._forget(held[:-1])
        return opened

    def create(self, path: str, mode: int, flags: int) -> "_Opened":
        with self._parent(path) as (parent, name):
            entry, opened = self.fs.create(parent, name, mode, flags, self.ctx)
        return _Opened(entry.inode, opened.fh, True)  # keeps create's reference

    def read(self, path: str, fh: "_Opened", offset: int, size: int) -> bytes:
        return self.fs.read(fh.inode, fh.fh, offset, size)

    def write(self, path: str, fh: "_Opened", offset: int, data: bytes) -> int:
        return self.fs.write(fh.inode, fh.fh, offset, data, self.ctx)

    def flush(self, path: str, fh: "_Opened") -> None:
        self.fs.flush(fh.inode, fh.fh, 0)

    def fsync(self, path: str, fh: "_Opened", datasync: bool) -> None:
        self.fs.fsync(fh.inode, fh.fh, datasync)

    def release(self, path: str | None, fh: "_Opened") -> None:
        try:
            self.fs.release(fh.inode, fh.fh)
        finally:
            if fh.referenced:
                self.fs.forget(fh.inode, 1)

    def _setattr(self, path: str, fh: "_Opened | None" = None, **changes: Any) -> None:
        with self.node(path) as inode:
            self.fs.setattr(inode, fh.fh if fh is not None else None,
                            SetattrRequest(**changes), self.ctx)

    def truncate(self, path: str, length: int, fh: Any = None) -> None:
        self._setattr(path, fh, size=length)

    def chmod(self, path: str, mode: int) -> None:
        self._setattr(path, mode=mode)

    def chown(self, path: str, uid: int, gid: int) -> None:
        self._setattr(path, uid=None if uid == -1 else uid, gid=None if gid == -1 else gid)

    def utimens(self, path: str, atime_ns: int | None, mtime_ns: int | None) -> None:
        self._setattr(path, atime_ns=atime_ns, mtime_ns=mtime_ns)

    def mkdir(self, path: str, mode: int) -> None:
        with self._parent(path) as (parent, name):
            self._made(self.fs.mkdir(parent, name, mode, self.ctx))

    def mknod(self, path: str, mode: int, rdev: int) -> None:
        with self._parent(path) as (parent, name):
            self._made(self.fs.mknod(parent, name, mode, rdev, self.ctx))

    def symlink(self, path: str, target: str) -> None:
        with self._parent(path) as (parent, name):
            self._made(self.fs.symlink(parent, name, os.fsencode(target), self.ctx))

    def link(self, path: str, new_path: str) -> None:
        with self.node(path) as inode, self._parent(new_path) as (parent, name):
            self._made(self.fs.link(inode, parent, name, self.ctx))

    def unlink(self, path: str) -> None:
        with self._parent(path) as (parent, name):
            self.fs.unlink(parent, name, self.ctx)

    def rmdir(self, path: str) -> None:
        with self._parent(path) as (parent, name):
            self.fs.rmdir(parent, name, self.ctx)

    def rename(self, old: str, new: str, flags: int) -> None:
        with self._parent(old) as (parent, name), self._parent(new) as (new_parent, new_name):
            self.fs.rename(parent, name, new_parent, new_name, flags, self.ctx)

    def statfs(self, path: str) -> StatFs:
        with self.node(path) as inode:
            return self.fs.statfs(inode)


class _Opened:
    """A file :class:`PathView` opened: its node id (with one reference held, unless it is
    the root) and the file system's handle."""
    __slots__ = ("inode", "fh", "referenced")

    def __init__(self, inode: int, fh: int, referenced: bool):
        self.inode, self.fh, self.referenced = inode, fh, referenced


class _AttrView:
    """Your attributes with the node id as ``st_ino`` (when you left it 0)."""
    __slots__ = ("_a", "st_ino")

    def __init__(self, attr: StatResult, inode: int):
        self._a = attr
        self.st_ino = inode

    def __getattr__(self, name: str) -> Any:
        return getattr(self._a, name)

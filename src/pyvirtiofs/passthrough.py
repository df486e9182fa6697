"""PassthroughFs: serves a host directory tree.

Inodes are O_PATH file descriptors keyed by (st_dev, st_ino), so a name is resolved once, one
component at a time, relative to its parent's fd and with O_NOFOLLOW: the guest cannot name
anything outside the shared directory by path tricks ('/' and '..' never reach a syscall as part
of a path the guest controls, and symlinks are never followed on the host).  Operations that
need a real file descriptor reopen the O_PATH fd through /proc/self/fd, which refers to the very
inode we hold, not to a path that could have been swapped.

File creation runs with the guest's uid/gid as the thread's fsuid/fsgid, so new files belong to
the guest user and permission checks happen as that user.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import threading
from contextlib import contextmanager
from dataclasses import replace

from . import linux, locks
from .cache import CachePolicy
from .compiled import mypyc_attr
from .idmap import IdMap, MappedStat
from .xattrmap import XattrMap
from .filesystem import (ROOT_INODE, Capabilities, Context, DirEntry, Entry, FileSystem, FsError,
                         OpenResult, SetattrRequest)

log = logging.getLogger(__name__)

_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
# Flags the guest may not pass through: creation is separate and we never want a controlling
# terminal.  O_DIRECT (which needs aligned buffers the guest cannot promise for our host file)
# and O_NOATIME (EPERM for files the daemon does not own, when it runs unprivileged) are
# dropped too unless --allow-direct-io / --preserve-noatime say otherwise.
_OPEN_STRIP = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | getattr(os, "O_PATH", 0)
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND
_ACL_XATTRS = (b"system.posix_acl_access", b"system.posix_acl_default")


def _is_mount_point(parent_fd: int, name: bytes | None) -> bool:
    """Whether name in the parent directory is the root of another mount (its mount id
    differs from the parent's); what --announce-submounts tells the guest."""
    if name is None or name in (b".", b".."):
        return False
    try:
        return (linux.mount_id(parent_fd, name, linux.AT_SYMLINK_NOFOLLOW)
                != linux.mount_id(parent_fd, b"", linux.AT_EMPTY_PATH))
    except OSError:
        return False


class _Inode:
    """An inode the guest holds: an O_PATH fd, or (--inode-file-handles) a Linux file handle
    (name_to_handle_at(2)) that is opened for the length of one request only."""
    __slots__ = ("nodeid", "_fd", "file_handle", "opener", "key", "refs", "is_symlink",
                 "is_dir", "is_regular")

    def __init__(self, nodeid, fd, key, mode, file_handle=None, opener=None):
        self.nodeid = nodeid
        self._fd = fd
        self.file_handle = file_handle
        self.opener = opener
        self.key = key
        self.refs = 1
        self.is_symlink = stat.S_ISLNK(mode)
        self.is_dir = stat.S_ISDIR(mode)
        self.is_regular = stat.S_ISREG(mode)

    @property
    def fd(self) -> int:
        fd = self._fd
        return fd if fd is not None else self.opener(self)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)


class _MapSource:
    """What a DAX mapping needs to map its file again (no fd is held: the guest may make
    thousands of mappings)."""
    __slots__ = ("fs", "nodeid", "key")

    def __init__(self, fs, nodeid, key):
        self.fs, self.nodeid, self.key = fs, nodeid, key

    def open(self, writable: bool) -> int:
        return self.fs._open_for_mapping(self.nodeid, self.key, writable)


class _OpenFile:
    """A file or directory the guest opened: the host fd behind the ``fh`` the guest holds
    (for a directory, also what the last getdents64 on it returned: see readdir)."""
    __slots__ = ("fd", "nodeid", "lock", "listing")

    def __init__(self, fd, nodeid):
        self.fd = fd
        self.nodeid = nodeid
        self.lock = threading.Lock()
        self.listing: _Listing | None = None


class _Listing:
    """The records one getdents64 returned, after which the directory fd's position is.
    A reply takes a few dozen of them; the next READDIR, which continues at the cookie of
    the last entry the reply held, starts here instead of at lseek + getdents64 again."""
    __slots__ = ("raw", "resume")

    def __init__(self, raw: bytes):
        self.raw = raw
        self.resume: dict[int, int] = {}  # cookie -> position in raw of the record after it



@mypyc_attr(allow_interpreted_subclasses=True)  # a public class: users may subclass it
class PassthroughFs(FileSystem):
    """The host directory ``root``, served as it is (what pyvirtiofsd serves): confined to
    ``root`` (see the module documentation), thread-safe, and usable inside another program
    (it changes no process-wide state: creations take the guest's umask in their own thread).
    The other arguments are the daemon's options of the same names (README, "Running the
    daemon"); ``cache`` is a mode of :mod:`pyvirtiofs.cache`.  Build on it through paths with
    :class:`pyvirtiofs.PathView` (examples/overlay_fs.py)."""

    def __init__(self, root: str, cache: str = "auto", readonly: bool = False,
                 xattr: bool = True, posix_locks: bool = True, flock: bool = True,
                 inode_file_handles: str = "never", *, writeback: bool = False,
                 allow_direct_io: bool = False, preserve_noatime: bool = False,
                 allow_mmap: bool = False, readdirplus: bool = True,
                 killpriv_v2: bool = True, timeout: float | None = None,
                 version_table=None, uid_map: IdMap | None = None,
                 gid_map: IdMap | None = None, xattrmap: XattrMap | str | None = None,
                 posix_acl: bool = False, security_label: bool = False,
                 announce_submounts: bool = False):
        self.root = os.path.abspath(root)
        if not os.path.isdir(self.root):
            raise ValueError(f"shared directory {root!r} is not a directory")
        self.cache = CachePolicy.from_name(cache)
        if timeout is not None:  # the C virtiofsd's -o timeout=: entries and attributes
            self.cache = replace(self.cache, timeout=timeout)
        self.readonly = readonly
        # ACLs and security labels are extended attributes (virtiofsd: they imply --xattr)
        self.xattr = xattr or posix_acl or security_label
        self.uid_map = uid_map if uid_map is not None and not uid_map.is_identity else None
        self.gid_map = gid_map if gid_map is not None and not gid_map.is_identity else None
        if posix_acl and (self.uid_map or self.gid_map):
            # ACL entries name host ids the guest would read untranslated (virtiofsd refuses
            # the combination too).
            raise ValueError("--posix-acl cannot be combined with --translate-uid/-gid")
        self._map_ids = self.uid_map is not None or self.gid_map is not None
        self.xattrmap = XattrMap.parse(xattrmap) if isinstance(xattrmap, str) else xattrmap
        self.posix_acl = posix_acl
        self.announce_submounts = announce_submounts
        self.writeback = writeback
        self._open_strip = (_OPEN_STRIP | (0 if allow_direct_io else os.O_DIRECT)
                            | (0 if preserve_noatime else os.O_NOATIME))
        self.capabilities = Capabilities(posix_locks=posix_locks, flock_locks=flock,
                                         writeback_cache=writeback, readdirplus=readdirplus,
                                         handle_killpriv_v2=killpriv_v2,
                                         direct_io_allow_mmap=allow_mmap,
                                         posix_acl=posix_acl, security_label=security_label,
                                         submounts=announce_submounts,
                                         idmapped_mounts=True)  # ids matter only to creations
        self._locks = locks.LockTable(lambda nodeid, flags: self._reopen(self._inode(nodeid), flags))
        # Root may create files as the guest's users (fsuid); the sandbox may change it.
        self.privileged = os.geteuid() == 0
        if inode_file_handles not in ("never", "prefer", "mandatory"):
            raise ValueError(f"--inode-file-handles={inode_file_handles}: never, prefer or "
                             "mandatory")
        self.inode_file_handles = inode_file_handles
        # A shared VersionTable (--version-table): every metadata change below bumps it.
        self.version_table = version_table
        self.wants_end_request = inode_file_handles != "never"
        self._request_fds = threading.local()  # O_PATH fds opened from file handles, per request
        # Reopening an O_PATH fd goes through /proc/self/fd/N, relative to this directory fd,
        # so it keeps working after a chroot into the shared directory.
        self._proc_fd = os.open("/proc/self/fd", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._lock = threading.Lock()
        self._cwd_lock = threading.Lock()  # the working directory is process-wide
        self._inodes: dict[int, _Inode] = {}
        self._by_key: dict[tuple[int, ...], _Inode] = {}  # (st_dev, st_ino)
        self._open_files: dict[int, _OpenFile] = {}
        self._next_nodeid = ROOT_INODE + 1
        self._next_fh = 1
        self._open_root()

    def _open_root(self) -> None:
        fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        st = os.stat(fd)
        root = _Inode(ROOT_INODE, fd, (st.st_dev, st.st_ino), st.st_mode)
        self._root_mount_id = None
        # open_by_handle_at wants a real (not O_PATH) fd on the mount
        self._mount_fd: int | None = None
        if self.inode_file_handles != "never":
            self._mount_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                _, self._root_mount_id = linux.name_to_handle_at(fd, b"", linux.AT_EMPTY_PATH)
            except OSError as e:
                if self.inode_file_handles == "mandatory":
                    raise ValueError(f"file handles unsupported on {self.root}: {e}") from None
                log.warning("file handles unsupported on %s (%s): using fds", self.root, e)
                self.inode_file_handles = "never"
                self.wants_end_request = False
        root.refs = 1 << 62  # never forgotten
        self._inodes = {ROOT_INODE: root}
        self._by_key = {root.key: root}

    # -- bookkeeping ----------------------------------------------------------------------
    def _inode(self, nodeid: int) -> _Inode:
        ino = self._inodes.get(nodeid)
        if ino is None:
            raise FsError(errno.EBADF, f"unknown node id {nodeid}")
        return ino

    def _open_file(self, fh: int) -> _OpenFile:
        open_file = self._open_files.get(fh)
        if open_file is None:
            raise FsError(errno.EBADF, f"unknown fh {fh}")
        return open_file

    # -- the version table (--version-table) ------------------------------------------------
    def _bump(self, *keys) -> None:
        """After a metadata change has been made: bump the (st_dev, st_ino) keys given."""
        vt = self.version_table
        if vt is None:
            return
        for key in keys:
            if key is not None:
                vt.bump_inode(*key)

    def _bump_node(self, nodeid: int) -> None:
        ino = self._inodes.get(nodeid)
        if ino is not None and self.version_table is not None:
            self.version_table.bump_inode(*ino.key)

    def _key_at(self, parent: _Inode, name: bytes):
        """The key of a name about to be removed or replaced (None: there is none)."""
        try:
            st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        except OSError:
            return None
        return (st.st_dev, st.st_ino)

    def version_slot(self, inode):
        if self.version_table is None:
            return super().version_slot(inode)
        return self.version_table.slot(*self._inode(inode).key)

    def _new_fh(self, fd: int, nodeid: int) -> int:
        with self._lock:
            fh = self._next_fh
            self._next_fh += 1
            self._open_files[fh] = _OpenFile(fd, nodeid)
        return fh

    def _entry(self, parent: _Inode, name: bytes) -> Entry:
        """Resolve one name under parent and take a lookup reference on the result."""
        # Most lookups find an inode we already hold: fstatat (no symlink following) tells
        # which, and spares the open and close of a new O_PATH fd.
        st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        with self._lock:
            ino = self._by_key.get((st.st_dev, st.st_ino))
            if ino is not None:
                ino.refs += 1
        if ino is not None:
            return self._reply_entry(ino, st, parent, name)
        return self._entry_from_fd(os.open(name, _PATH_FLAGS, dir_fd=parent.fd), parent, name)

    def _entry_from_fd(self, fd: int, parent: _Inode | None = None,
                       name: bytes | None = None) -> Entry:
        """Take a lookup reference on the inode an O_PATH fd refers to (consumes the fd)."""
        try:
            st = os.stat(fd)
        except BaseException:
            os.close(fd)
            raise
        # tuple[int, ...]: one tuple object for the inode and the _by_key dict (compiled,
        # a tuple[int, int] would be unboxed and boxed again for each: 120 bytes an inode)
        key: tuple[int, ...] = (st.st_dev, st.st_ino)
        file_handle = None
        if self.inode_file_handles != "never" and key not in self._by_key:
            file_handle = self._file_handle_of(fd)
        with self._lock:
            ino = self._by_key.get(key)
            if ino is not None:
                ino.refs += 1
            else:
                # With a file handle, keep it, not the fd: a million inodes need no
                # million fds.  Without one, the inode takes over the fd.
                if file_handle is not None:
                    ino = _Inode(self._next_nodeid, None, key, st.st_mode, file_handle,
                                 self._path_fd_from_file_handle)
                else:
                    ino = _Inode(self._next_nodeid, fd, key, st.st_mode)
                    fd = -1
                self._next_nodeid += 1
                self._inodes[ino.nodeid] = ino
                self._by_key[key] = ino
        if fd >= 0:
            os.close(fd)
        return self._reply_entry(ino, st, parent, name)

    def _reply_entry(self, ino: _Inode, st, parent: _Inode | None = None,
                     name: bytes | None = None) -> Entry:
        t = self.cache.timeout
        submount = (self.announce_submounts and parent is not None and ino.is_dir
                    and _is_mount_point(parent.fd, name))
        # positional: keyword arguments cost more than the rest of this method
        return Entry(ino.nodeid, self._guest_attr(st) if self._map_ids else st, 0, t, t,
                     submount)

    # -- ids (--translate-uid/--translate-gid) ----------------------------------------------
    def _guest_attr(self, st):
        """Attributes as the guest sees them: owners in guest ids."""
        if not self._map_ids:
            return st
        uid = self.uid_map.to_guest(st.st_uid) if self.uid_map else st.st_uid
        gid = self.gid_map.to_guest(st.st_gid) if self.gid_map else st.st_gid
        return MappedStat(st, uid, gid)

    def _host_ids(self, uid: int, gid: int) -> tuple[int, int]:
        """Guest ids as host ids (FsError EPERM for forbidden ones)."""
        if self.uid_map is not None:
            uid = self.uid_map.to_host(uid)
        if self.gid_map is not None:
            gid = self.gid_map.to_host(gid)
        return uid, gid

    def reopen_proc_fd(self) -> None:
        """After a fork: /proc/self/fd must be the new process's own fd table."""
        old = self._proc_fd
        self._proc_fd = os.open("/proc/self/fd", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        os.close(old)

    def _mount_fd_for_handles(self) -> int:
        fd = self._mount_fd
        if fd is None:  # inodes get handles only when the mount fd was opened
            raise FsError(errno.EIO, "file handle without a mount fd")
        return fd

    def _reopen(self, ino: _Inode, flags: int) -> int:
        """A real fd for the inode an O_PATH fd holds (never a path the guest could swap)."""
        if ino.file_handle is not None:
            return linux.open_by_handle_at(self._mount_fd_for_handles(), ino.file_handle, flags)
        return os.open(str(ino.fd), flags | os.O_CLOEXEC, dir_fd=self._proc_fd)

    # -- file handles (--inode-file-handles) ------------------------------------------------
    def _file_handle_of(self, fd: int) -> bytes | None:
        try:
            file_handle, mount_id = linux.name_to_handle_at(fd, b"", linux.AT_EMPTY_PATH)
        except OSError as e:
            if self.inode_file_handles == "mandatory":
                raise FsError(errno.EOPNOTSUPP, f"no file handle: {e}") from None
            return None
        if mount_id != self._root_mount_id:
            # Another mount below the share: its file handles need its own mount fd; keep the fd.
            if self.inode_file_handles == "mandatory":
                raise FsError(errno.EOPNOTSUPP, "file on another mount")
            return None
        return file_handle

    def _path_fd_from_file_handle(self, ino: _Inode) -> int:
        """An O_PATH fd for a file-handle-backed inode, shared by the rest of this request and
        closed by end_request()."""
        fds = getattr(self._request_fds, "fds", None)
        if fds is None:
            fds = self._request_fds.fds = {}
        fd = fds.get(ino.nodeid)
        if fd is None:
            fd = linux.open_by_handle_at(self._mount_fd_for_handles(), ino.file_handle,
                                         os.O_PATH | os.O_NOFOLLOW)
            fds[ino.nodeid] = fd
        return fd

    def end_request(self) -> None:
        fds = getattr(self._request_fds, "fds", None)
        if fds:
            self._request_fds.fds = {}
            for fd in fds.values():
                os.close(fd)

    def _check_writable(self) -> None:
        if self.readonly:
            raise FsError(errno.EROFS)

    @contextmanager
    def _as(self, ctx: Context, parent: _Inode):
        """Create files in ``parent`` as the guest user, changing the calling thread only:
        fsuid/fsgid (root daemons only), the umask, and the supplementary group the guest
        sent (FUSE_CREATE_SUPP_GROUP), so the host lets a member of the parent's group write
        there and keeps a setgid bit the guest asked for.  A guest without that extension
        (Linux before 6.3) cannot say which group the caller writes through: as virtiofsd,
        the thread keeps CAP_DAC_OVERRIDE then, and the guest's own permission check
        (default_permissions) is the one that counts.  Without --posix-acl the guest kernel
        applied its umask to the mode already, so the host applies none; with it the guest
        leaves the umask to us (FUSE_DONT_MASK) and the host kernel applies it, unless the
        parent has a default ACL, which it applies instead.  Yields the parent's fd, opened
        before the switch: a non-zero fsuid clears CAP_DAC_READ_SEARCH, which opening a file
        handle (--inode-file-handles) needs."""
        dfd = parent.fd
        uid, gid = self._host_ids(ctx.uid, ctx.gid) if self._map_ids else (ctx.uid, ctx.gid)
        linux.own_umask()  # never the process's: a library user's umask stays theirs
        old_umask = os.umask(ctx.umask if self.posix_acl else 0)
        try:
            if not self.privileged or (uid == 0 and gid == 0):
                yield dfd
                return
            groups = None
            if ctx.supp_groups:
                wanted = [self.gid_map.to_host(g) if self.gid_map is not None else g
                          for g in ctx.supp_groups]  # EPERM for a forbidden one
                groups = os.getgroups()
                try:
                    linux.set_thread_groups(wanted)
                except OSError as e:  # e.g. a user namespace where setgroups is denied
                    log.debug("supplementary groups %s not taken: %s", wanted, e)
                    groups = None
            linux.setfsgid(gid)
            linux.setfsuid(uid)
            try:
                if ctx.supp_groups is None and uid != 0:
                    # setfsuid(0) at the end brings the other file-system capabilities back
                    try:
                        linux.raise_thread_capability(linux.CAP_DAC_OVERRIDE)
                    except OSError:  # --modcaps=-dac_override: the host's check counts
                        pass
                yield dfd
            finally:
                linux.setfsuid(0)
                linux.setfsgid(0)
                if groups is not None:
                    linux.set_thread_groups(groups)
        finally:
            os.umask(old_umask)

    # -- session --------------------------------------------------------------------------
    def init(self) -> None:
        log.info("serving %s (cache=%s%s)", self.root, self.cache.name,
                 ", read-only" if self.readonly else "")

    def destroy(self) -> None:
        self._locks.clear()
        with self._lock:
            open_files, self._open_files = self._open_files, {}
            inodes = [i for i in self._inodes.values() if i.nodeid != ROOT_INODE]
            self._inodes = {ROOT_INODE: self._inodes[ROOT_INODE]}
            root = self._inodes[ROOT_INODE]
            self._by_key = {root.key: root}
        for open_file in open_files.values():
            os.close(open_file.fd)
        for i in inodes:
            i.close()

    def close(self) -> None:
        """Close every fd it holds, the root's too; it cannot serve afterwards."""
        self.destroy()
        os.close(self._inodes[ROOT_INODE].fd)
        os.close(self._proc_fd)
        if self._mount_fd is not None:
            os.close(self._mount_fd)

    # -- names ----------------------------------------------------------------------------
    def lookup(self, parent, name, ctx):
        p = self._inode(parent)
        if name == b"." or (name == b".." and parent == ROOT_INODE):
            name = b"."  # '..' of the share's root is the root itself
        return self._entry(p, name)

    def forget(self, inode, nlookup):
        with self._lock:
            ino = self._inodes.get(inode)
            if ino is None or inode == ROOT_INODE:
                return
            ino.refs -= nlookup
            if ino.refs > 0:
                return
            del self._inodes[inode]
            if self._by_key.get(ino.key) is ino:
                del self._by_key[ino.key]
        ino.close()

    def getattr(self, inode, fh, ctx):
        open_file = self._open_files.get(fh) if fh is not None else None
        fd = open_file.fd if open_file is not None else self._inode(inode).fd
        st = os.stat(fd)
        t = self.cache.timeout
        return Entry(inode, self._guest_attr(st) if self._map_ids else st, 0, t, t)

    def statx(self, inode, fh, ctx):
        open_file = self._open_files.get(fh) if fh is not None else None
        fd = open_file.fd if open_file is not None else self._inode(inode).fd
        return Entry(inode, self._guest_attr(linux.statx(fd)), attr_timeout=self.cache.timeout)

    def setattr(self, inode, fh, req: SetattrRequest, ctx):
        self._check_writable()
        ino = self._inode(inode)
        open_fd = self._open_file(fh).fd if fh is not None else None
        if req.mode is not None:
            if ino.is_symlink:
                raise FsError(errno.EOPNOTSUPP)
            if open_fd is not None:
                os.fchmod(open_fd, stat.S_IMODE(req.mode))
            else:
                os.chmod(str(ino.fd), stat.S_IMODE(req.mode), dir_fd=self._proc_fd)
        if req.uid is not None or req.gid is not None:
            uid = -1 if req.uid is None else req.uid
            gid = -1 if req.gid is None else req.gid
            if self.uid_map is not None and uid != -1:
                uid = self.uid_map.to_host(uid)
            if self.gid_map is not None and gid != -1:
                gid = self.gid_map.to_host(gid)
            linux.fchownat_empty(ino.fd, uid, gid)
            if ino.is_regular:
                self._remove_mapped_capability(ino.fd)
        if req.size is not None:
            if open_fd is not None:
                os.ftruncate(open_fd, req.size)
            elif ino.is_symlink or ino.is_dir:
                raise FsError(errno.EISDIR if ino.is_dir else errno.EINVAL)
            else:
                fd = self._reopen(ino, os.O_WRONLY)
                try:
                    os.ftruncate(fd, req.size)
                finally:
                    os.close(fd)
        if req.kill_suidgid and not ino.is_symlink and not ino.is_dir:
            self._kill_priv(open_fd if open_fd is not None else ino.fd)
        if req.atime_ns is not None or req.mtime_ns is not None or req.atime_now or req.mtime_now:
            def spec(now, ns):
                if now:
                    return (0, linux.UTIME_NOW)
                if ns is None:
                    return (0, linux.UTIME_OMIT)
                return divmod(ns, 1_000_000_000)
            # /proc/self/fd/N names the inode itself, a symlink included (touch -h)
            linux.utimensat(self._proc_fd, str(ino.fd).encode(),
                            spec(req.atime_now, req.atime_ns), spec(req.mtime_now, req.mtime_ns))
        if self.version_table is not None:
            self._bump(ino.key)
        return Entry(inode, self._guest_attr(os.stat(ino.fd)), attr_timeout=self.cache.timeout)

    def readlink(self, inode, ctx):
        ino = self._inode(inode)
        if not ino.is_symlink:
            raise FsError(errno.EINVAL)
        return os.readlink(b"", dir_fd=ino.fd)

    def symlink(self, parent, name, target, ctx):
        self._check_writable()
        p = self._inode(parent)
        with self._as(ctx, p) as dfd:
            os.symlink(target, name, dir_fd=dfd)
        self._label_new(p, name, ctx)
        return self._created(p, name)

    def mknod(self, parent, name, mode, rdev, ctx):
        self._check_writable()
        p = self._inode(parent)
        perm = stat.S_IMODE(mode)  # umask: see _as
        with self._as(ctx, p) as dfd:
            if stat.S_ISREG(mode):
                os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC,
                                 perm, dir_fd=dfd))
            else:
                os.mknod(name, stat.S_IFMT(mode) | perm, rdev, dir_fd=dfd)
        self._label_new(p, name, ctx)
        return self._created(p, name)

    def mkdir(self, parent, name, mode, ctx):
        self._check_writable()
        p = self._inode(parent)
        perm = stat.S_IMODE(mode)  # umask: see _as
        with self._as(ctx, p) as dfd:
            os.mkdir(name, perm, dir_fd=dfd)
        self._label_new(p, name, ctx)
        return self._created(p, name)

    def _created(self, parent: _Inode, name: bytes) -> Entry:
        """The entry of a name just made in parent; bumps both (the entry after its stat:
        the reply carries no version, so its attributes need not be newer than one)."""
        entry = self._entry(parent, name)
        if self.version_table is not None:
            st = entry.attr  # an os.stat_result here (or a MappedStat over one): has st_dev
            self._bump(parent.key, (st.st_dev, st.st_ino))  # type: ignore[attr-defined]
        return entry

    # -- what new files get: a security label ----------------------------------------------
    def _label_new(self, parent: _Inode, name: bytes, ctx: Context, fd: int | None = None):
        """--security-label: give a new file the security context the guest sent with the
        request; a file that cannot get it is removed again and the error returned."""
        if ctx.secctx is None:
            return
        xname, value = ctx.secctx
        try:
            if self.xattrmap is not None:
                xname = self.xattrmap.to_host(xname)
            if fd is not None:
                os.setxattr(fd, xname, value)
            else:
                path_fd = os.open(name, _PATH_FLAGS, dir_fd=parent.fd)
                try:
                    self._setxattr_o_path(path_fd, xname, value)
                finally:
                    os.close(path_fd)
        except BaseException:
            st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                os.rmdir(name, dir_fd=parent.fd)
            else:
                os.unlink(name, dir_fd=parent.fd)
            raise

    def _setxattr_o_path(self, path_fd: int, name: bytes, value: bytes) -> None:
        """setxattr on what an O_PATH fd holds, symlinks and device nodes included: through
        its /proc/self/fd entry, relative to the proc directory as the working directory
        (setxattr has no *at form; the magic link leads to the inode itself)."""
        with self._cwd_lock:
            os.fchdir(self._proc_fd)
            try:
                os.setxattr(str(path_fd), name, value)
            finally:
                os.chdir(self._inodes[ROOT_INODE].fd)

    def unlink(self, parent, name, ctx):
        self._check_writable()
        p = self._inode(parent)
        victim = self._key_at(p, name) if self.version_table is not None else None
        os.unlink(name, dir_fd=p.fd)
        if self.version_table is not None:
            self._bump(p.key, victim)  # the victim's link count changed too

    def rmdir(self, parent, name, ctx):
        self._check_writable()
        p = self._inode(parent)
        victim = self._key_at(p, name) if self.version_table is not None else None
        os.rmdir(name, dir_fd=p.fd)
        if self.version_table is not None:
            self._bump(p.key, victim)

    def rename(self, parent, name, new_parent, new_name, flags, ctx):
        self._check_writable()
        p, q = self._inode(parent), self._inode(new_parent)
        vt = self.version_table
        moved = self._key_at(p, name) if vt is not None else None
        replaced = self._key_at(q, new_name) if vt is not None else None
        if flags:
            linux.renameat2(p.fd, name, q.fd, new_name, flags)
        else:
            os.rename(name, new_name, src_dir_fd=p.fd, dst_dir_fd=q.fd)
        if vt is not None:
            # both directories, the entry moved (ctime, '..') and the one it replaced (nlink)
            self._bump(p.key, q.key if q is not p else None, moved,
                       replaced if replaced != moved else None)

    def link(self, inode, new_parent, new_name, ctx):
        self._check_writable()
        ino, q = self._inode(inode), self._inode(new_parent)
        try:
            linux.linkat_empty(ino.fd, q.fd, new_name)
        except PermissionError:  # no CAP_DAC_READ_SEARCH: go through the fd's magic link
            if ino.is_symlink:
                raise
            os.link(str(ino.fd), new_name, src_dir_fd=self._proc_fd, dst_dir_fd=q.fd,
                    follow_symlinks=True)
        if self.version_table is not None:
            self._bump(ino.key, q.key)  # the link count and the directory
        return self._entry(q, new_name)

    # -- files ----------------------------------------------------------------------------
    def _open_result(self, fh: int, is_dir: bool = False, flags: int = 0) -> OpenResult:
        c = self.cache
        if is_dir:
            return OpenResult(fh, cache_dir=c.keep_cache)
        # O_APPEND bypasses the guest page cache: through it Linux (fuse_fill_write_pages)
        # sends a write that crosses into a page it has not cached as two WRITEs, and the
        # host's O_APPEND puts each at the end of the file as it is then, so another
        # writer's data (another VM, a host process) can land between the halves.  Direct
        # I/O sends each write(2) as one WRITE.  (With --writeback the guest positions
        # appends itself from its cached size: sharing a file between VMs is unsafe then.)
        direct = c.direct_io or bool(flags & os.O_APPEND and not self.writeback)
        return OpenResult(fh, direct_io=direct, keep_cache=c.keep_cache and not direct)

    def _open_flags(self, flags: int, keep: int = 0) -> int:
        """The guest's open flags as the host open gets them."""
        flags &= ~(self._open_strip & ~keep)
        if self.writeback:
            # With a writeback cache the guest reads to fill partial pages of files it opened
            # write-only, and it positions appends itself (from its cached size).
            if flags & os.O_ACCMODE == os.O_WRONLY:
                flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
            flags &= ~os.O_APPEND
        return flags

    def open(self, inode, flags, ctx):
        if flags & _WRITE_FLAGS:
            self._check_writable()
        ino = self._inode(inode)
        if not ino.is_regular:
            # The guest kernel opens only regular files through FUSE (devices and FIFOs are
            # guest-local); opening a host device node or FIFO for a hostile guest would let it
            # reach outside the share or block a worker.
            raise FsError(errno.ELOOP if ino.is_symlink else errno.EACCES)
        fd = self._reopen(ino, self._open_flags(flags))
        if flags & os.O_TRUNC and self.version_table is not None:
            self._bump(ino.key)
        return self._open_result(self._new_fh(fd, inode), flags=flags)

    def create(self, parent, name, mode, flags, ctx):
        self._check_writable()
        p = self._inode(parent)
        flags = (self._open_flags(flags, keep=os.O_EXCL) | os.O_CREAT | os.O_NOFOLLOW
                 | os.O_CLOEXEC)
        perm = stat.S_IMODE(mode)  # umask: see _as
        with self._as(ctx, p) as dfd:
            fd = os.open(name, flags, perm, dir_fd=dfd)
        try:
            self._label_new(p, name, ctx, fd)
            entry = self._entry(p, name)
        except BaseException:
            os.close(fd)
            raise
        if self.version_table is not None:
            self._bump(p.key, (entry.attr.st_dev, entry.attr.st_ino))
        return entry, self._open_result(self._new_fh(fd, entry.inode), flags=flags)

    def tmpfile(self, parent, mode, flags, ctx):
        self._check_writable()
        p = self._inode(parent)
        if not p.is_dir:
            raise FsError(errno.ENOTDIR)
        flags = (self._open_flags(flags) & ~os.O_DIRECTORY) | os.O_TMPFILE
        if not flags & (os.O_WRONLY | os.O_RDWR):
            flags |= os.O_RDWR
        perm = stat.S_IMODE(mode)  # umask: see _as
        with self._as(ctx, p) as dfd:
            fd = os.open(str(dfd), flags | os.O_CLOEXEC, perm, dir_fd=self._proc_fd)
        try:
            entry = self._entry_from_fd(os.open(str(fd), os.O_PATH | os.O_CLOEXEC,
                                                dir_fd=self._proc_fd))
        except BaseException:
            os.close(fd)
            raise
        return entry, self._open_result(self._new_fh(fd, entry.inode), flags=flags)

    def read_into(self, inode, fh, offset, buffers):
        return os.preadv(self._open_file(fh).fd, buffers, offset)

    def read(self, inode, fh, offset, size):
        return os.pread(self._open_file(fh).fd, size, offset)

    def write_from(self, inode, fh, offset, buffers, kill_priv, ctx):
        self._check_writable()
        fd = self._open_file(fh).fd
        n = os.pwritev(fd, buffers, offset) if buffers else 0
        if kill_priv:
            self._kill_priv(fd)
        if self.version_table is not None:
            self._bump_node(inode)  # size and mtime
        return n

    def _kill_priv(self, fd: int) -> None:
        """What the kernel does when an unprivileged process writes or truncates: drop suid,
        sgid (when group-executable) and file capabilities.  The daemon writes as root, whose
        CAP_FSETID would keep them, so the guest asks us (FUSE_HANDLE_KILLPRIV_V2)."""
        st = os.stat(fd)
        m = st.st_mode
        kill = stat.S_ISUID | (stat.S_ISGID if m & stat.S_IXGRP else 0)
        if m & kill:
            if stat.S_ISREG(m):
                try:
                    os.fchmod(fd, stat.S_IMODE(m) & ~kill)
                except OSError:  # an O_PATH fd: through /proc
                    os.chmod(str(fd), stat.S_IMODE(m) & ~kill, dir_fd=self._proc_fd)
        try:
            os.removexattr(fd, "security.capability")
        except OSError:
            pass
        self._remove_mapped_capability(fd)

    def _remove_mapped_capability(self, fd: int) -> None:
        """The kernel drops security.capability on write and chown; when the xattr map
        renames it, the renamed attribute is ours to drop (fd: any fd of the file)."""
        name = self.xattrmap.capability_name if self.xattrmap is not None else None
        if name is None or not stat.S_ISREG(os.stat(fd).st_mode):
            return
        rfd = os.open(str(fd), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=self._proc_fd)
        try:
            os.removexattr(rfd, name)
        except OSError as e:
            if e.errno not in (errno.ENODATA, errno.EOPNOTSUPP):
                raise
        finally:
            os.close(rfd)

    def write(self, inode, fh, offset, data, ctx):
        self._check_writable()
        n = os.pwrite(self._open_file(fh).fd, data, offset)
        if self.version_table is not None:
            self._bump_node(inode)
        return n

    def flush(self, inode, fh, lock_owner):
        # close() semantics: the guest process closed a file, which drops its POSIX locks.
        self._open_file(fh)
        self._locks.release_owner(inode, lock_owner)

    def release(self, inode, fh):
        self._locks.release_file(fh)
        self.releasedir(inode, fh)

    def releasedir(self, inode, fh):
        with self._lock:
            open_file = self._open_files.pop(fh, None)
        if open_file is not None:
            os.close(open_file.fd)

    def fsync(self, inode, fh, datasync):
        fd = self._open_file(fh).fd
        (os.fdatasync if datasync else os.fsync)(fd)

    def fsyncdir(self, inode, fh, datasync):
        self.fsync(inode, fh, datasync)  # (not an alias: mypyc cannot compile one)

    def opendir(self, inode, ctx):
        ino = self._inode(inode)
        if not ino.is_dir:
            raise FsError(errno.ENOTDIR)
        fd = self._reopen(ino, os.O_RDONLY | os.O_DIRECTORY)
        return self._open_result(self._new_fh(fd, inode), is_dir=True)

    def readdir(self, inode, fh, offset):
        open_file = self._open_file(fh)
        # A guest reply holds a few dozen entries (4 KiB, ~24 with READDIRPLUS), so start
        # with a small read and read more only for callers that keep going (what one read
        # returned stays with the open directory until the listing moves past it).
        bufsize = 2048
        while True:
            with open_file.lock:  # the fd's position is shared: seek, read and listing
                listing = open_file.listing
                pos = listing.resume.get(offset) if listing is not None and offset else None
                if pos is None or pos == len(listing.raw):  # (cookie 0: a fresh listing)
                    os.lseek(open_file.fd, offset, os.SEEK_SET)  # cheap where it is already
                    raw = linux.getdents64(open_file.fd, bufsize)
                    listing = open_file.listing = _Listing(raw) if raw else None
                    pos = 0
            if listing is None:
                return
            # Where the caller stopped is remembered when it stops pulling (the generator
            # is closed): after the last entry it took, or the one before (which did not fit
            # its reply), as cookie -> position of the next record.
            last = (offset, pos)
            prev = None
            try:
                for name, ino, dtype, off, end in linux.iter_dirents(listing.raw, pos):
                    prev = last
                    last = (off, end)
                    yield DirEntry(name, ino, dtype, off)
                    offset = off
            finally:
                listing.resume = dict((prev, last) if prev is not None else (last,))
            bufsize = 8192

    def readdirplus(self, inode, fh, offset, ctx):
        parent = self._inode(inode)
        entry_of = self._entry
        for ent in self.readdir(inode, fh, offset):
            name = ent.name
            if name == b"." or name == b"..":
                yield ent, None
                continue
            try:
                entry = entry_of(parent, name)  # a stat; an open only for a new inode
            except OSError:  # gone meanwhile
                entry = None
            yield ent, entry

    def statfs(self, inode):
        return os.statvfs(self._inode(inode).fd)

    def access(self, inode, mask, ctx):
        st = self._guest_attr(os.stat(self._inode(inode).fd))  # compared with guest ids
        if mask == os.F_OK:
            return
        if ctx.uid == 0:
            if mask & os.X_OK and not st.st_mode & 0o111 and not stat.S_ISDIR(st.st_mode):
                raise FsError(errno.EACCES)
            return
        if ctx.uid == st.st_uid:
            bits = st.st_mode >> 6
        elif ctx.gid == st.st_gid:
            bits = st.st_mode >> 3
        else:
            bits = st.st_mode
        if mask & ~bits & 7:
            raise FsError(errno.EACCES)

    def fallocate(self, inode, fh, mode, offset, length):
        self._check_writable()
        linux.fallocate(self._open_file(fh).fd, mode, offset, length)
        if self.version_table is not None:
            self._bump_node(inode)

    def lseek(self, inode, fh, offset, whence):
        if whence not in (os.SEEK_SET, os.SEEK_CUR, os.SEEK_END, os.SEEK_DATA, os.SEEK_HOLE):
            raise FsError(errno.EINVAL)
        return os.lseek(self._open_file(fh).fd, offset, whence)

    def copy_file_range(self, inode_in, fh_in, off_in, inode_out, fh_out, off_out, length, flags):
        self._check_writable()
        if flags:
            raise FsError(errno.EINVAL)
        n = os.copy_file_range(self._open_file(fh_in).fd, self._open_file(fh_out).fd, length,
                               off_in, off_out)
        if self.version_table is not None:
            self._bump_node(inode_out)
        return n

    def syncfs(self, inode):
        fd = self._reopen(self._inode(ROOT_INODE), os.O_RDONLY | os.O_DIRECTORY)
        try:
            linux.syncfs(fd)
        finally:
            os.close(fd)

    # -- DAX ------------------------------------------------------------------------------
    def map_source(self, inode, fh, writable):
        if writable:
            self._check_writable()
        ino = self._inode(inode)
        if not ino.is_regular:
            raise FsError(errno.EINVAL, "only regular files can be mapped")
        if fh is not None:
            open_file = self._open_file(fh)
            if open_file.nodeid != inode:
                raise FsError(errno.EBADF, f"fh {fh} is not node {inode}'s")
            access = fcntl.fcntl(open_file.fd, fcntl.F_GETFL) & os.O_ACCMODE
            if writable and access == os.O_RDONLY:
                raise FsError(errno.EACCES, "write mapping of a file opened read-only")
        return _MapSource(self, inode, ino.key)

    def _open_for_mapping(self, nodeid: int, key, writable: bool) -> int:
        """A new fd on the inode behind a mapping (the same file, or FsError)."""
        with self._lock:
            ino = self._inodes.get(nodeid)
        if ino is None or ino.key != key:
            raise FsError(errno.ESTALE, f"node {nodeid} is no longer {key}")
        return self._reopen(ino, os.O_RDWR if writable else os.O_RDONLY)

    # -- locks ----------------------------------------------------------------------------
    def getlk(self, inode, fh, owner, start, end, type_, pid):
        self._inode(inode)
        return self._locks.getlk(inode, owner, start, end, type_)

    def setlk(self, inode, fh, owner, start, end, type_, pid, wait, flock):
        if flock:
            locks.flock(self._open_file(fh).fd, type_)
        else:
            self._inode(inode)
            self._locks.setlk(inode, fh, owner, start, end, type_)

    def begin_lock_wait(self, inode, owner, start, end, type_, flock):
        if not flock:
            self._locks.begin_wait(inode, owner, start, end, type_)

    def end_lock_wait(self, inode, owner, flock):
        if not flock:
            self._locks.end_wait(owner)

    # -- extended attributes --------------------------------------------------------------
    @contextmanager
    def _xattr_fd(self, inode):
        """xattr calls go through a real fd: O_PATH fds do not support them."""
        if not self.xattr:
            raise FsError(errno.ENOSYS)
        ino = self._inode(inode)
        if ino.is_regular or ino.is_dir:
            fd = self._reopen(ino, os.O_RDONLY | os.O_NONBLOCK)
            try:
                yield fd
            finally:
                os.close(fd)
        else:
            # Symlinks cannot be opened, and opening device nodes or FIFOs on the host is not
            # something a guest may cause; Linux allows no user.* xattrs on them anyway.
            raise FsError(errno.EPERM)

    def _host_xattr_name(self, name: bytes, getting: bool = False) -> bytes:
        """The host name of a guest's xattr name (--xattrmap); without --posix-acl the
        ACL attributes do not exist for the guest (virtiofsd: ENOTSUP)."""
        if not self.posix_acl and name in _ACL_XATTRS:
            raise FsError(errno.EOPNOTSUPP)
        if self.xattrmap is not None:
            return self.xattrmap.to_host(name, getting=getting)
        return name

    def setxattr(self, inode, name, value, flags, ctx):
        self._check_writable()
        name = self._host_xattr_name(name)
        with self._xattr_fd(inode) as fd:
            os.setxattr(fd, name, value, flags)
        if self.version_table is not None:
            self._bump_node(inode)

    def getxattr(self, inode, name, ctx):
        name = self._host_xattr_name(name, getting=True)
        with self._xattr_fd(inode) as fd:
            return os.getxattr(fd, name)

    def listxattr(self, inode, ctx):
        with self._xattr_fd(inode) as fd:
            names = [os.fsencode(n) for n in os.listxattr(fd)]
        if self.xattrmap is not None:
            names = self.xattrmap.to_guest(names)
        if not self.posix_acl:
            names = [n for n in names if n not in _ACL_XATTRS]
        return names

    def removexattr(self, inode, name, ctx):
        self._check_writable()
        name = self._host_xattr_name(name)
        with self._xattr_fd(inode) as fd:
            os.removexattr(fd, name)
        if self.version_table is not None:
            self._bump_node(inode)

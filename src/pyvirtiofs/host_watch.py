"""Bump the version table for changes that host processes make to the tree (not through any
daemon): one watcher per tree, beside the daemons.

    python -m pyvirtiofs.host_watch --version-table=/dev/shm/NAME --shared-dir=DIR

inotify watches every directory of the tree (and each one created later).  Each directory is
held as an O_PATH fd and its watch is added through /proc/self/fd, so a directory renamed on
the host keeps being watched under its new name and names are resolved relative to it without
following symlinks.  For each event, after the change has happened:

* a name created, removed or moved in a directory: the directory's version;
* attributes or contents of a name changed, or a name created or moved in: that inode's;
* the directory's own attributes: the directory's;
* the queue overflowed (events were lost): every claimed slot.

Limits (docs/version-table.md): a removed name's inode is not bumped (it cannot be looked up
any more; the directory is); inotify needs a watch per directory (fs.inotify.max_user_watches)
and this watcher an fd per directory; changes the daemons make are seen here too and bumped a
second time, a little later, so a guest may refresh twice for one change.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import select
import signal
import stat
import struct
import sys
import threading

from .linux import libc
from .version_table import VersionTable, VersionTableError

log = logging.getLogger("pyvirtiofs.host_watch")

IN_MODIFY = 0x2
IN_ATTRIB = 0x4
IN_CLOSE_WRITE = 0x8
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x1000000
IN_EXCL_UNLINK = 0x4000000
IN_ISDIR = 0x40000000
IN_CLOEXEC = os.O_CLOEXEC

WATCH_MASK = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE
              | IN_DELETE | IN_ONLYDIR | IN_EXCL_UNLINK)
_NAMES_CHANGED = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO
_INODE_CHANGED = IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_CREATE | IN_MOVED_TO
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then the NUL-padded name)

_init1 = libc.inotify_init1
_init1.argtypes = [ctypes.c_int]
_add_watch = libc.inotify_add_watch
_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]


class _Dir:
    __slots__ = ("fd", "key")

    def __init__(self, fd: int, key: tuple[int, int]):
        self.fd = fd
        self.key = key


class HostWatcher:
    """Watches a tree with inotify and bumps the table for what changes in it."""

    def __init__(self, root: str, table: VersionTable):
        self.table = table
        self.ifd = _init1(IN_CLOEXEC | os.O_NONBLOCK)
        if self.ifd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self.dirs: dict[int, _Dir] = {}  # watch descriptor -> directory
        self.bumps = 0
        fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._add_tree(fd)

    # -- watches --------------------------------------------------------------------------
    def _add_tree(self, fd: int) -> None:
        """Watch the directory an O_PATH fd holds (consumed) and every directory below it."""
        stack = [fd]
        while stack:
            fd = stack.pop()
            wd = _add_watch(self.ifd, f"/proc/self/fd/{fd}".encode(), WATCH_MASK)
            if wd < 0:
                err = ctypes.get_errno()
                os.close(fd)
                log.warning("cannot watch a directory: %s", os.strerror(err))
                continue
            if wd in self.dirs:  # already watched (seen twice during a move)
                os.close(fd)
                continue
            st = os.stat(fd)
            self.dirs[wd] = _Dir(fd, (st.st_dev, st.st_ino))
            try:
                rfd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
            except OSError:
                continue
            try:
                with os.scandir(rfd) as it:
                    names = [e.name for e in it if e.is_dir(follow_symlinks=False)]
            finally:
                os.close(rfd)
            for name in names:
                try:
                    stack.append(os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW
                                         | os.O_CLOEXEC, dir_fd=fd))
                except OSError:
                    pass  # gone or replaced meanwhile; its parent's event tells us

    # -- events ---------------------------------------------------------------------------
    def poll(self, timeout: float) -> int:
        """Handle what arrives within ``timeout`` seconds; returns the events handled."""
        r, _, _ = select.select([self.ifd], [], [], timeout)
        if not r:
            return 0
        try:
            data = os.read(self.ifd, 1 << 16)
        except BlockingIOError:
            return 0
        n = 0
        off = 0
        while off + _EVENT.size <= len(data):
            wd, mask, _cookie, length = _EVENT.unpack_from(data, off)
            name = data[off + _EVENT.size:off + _EVENT.size + length].rstrip(b"\0")
            off += _EVENT.size + length
            self._event(wd, mask, name)
            n += 1
        return n

    def _bump(self, key) -> None:
        self.table.bump_inode(*key)
        self.bumps += 1

    def _event(self, wd: int, mask: int, name: bytes) -> None:
        if mask & IN_Q_OVERFLOW:
            log.warning("inotify queue overflowed: bumping every slot")
            self.bumps += self.table.bump_all()
            return
        d = self.dirs.get(wd)
        if d is None:
            return
        if mask & IN_IGNORED:  # the directory is gone
            del self.dirs[wd]
            os.close(d.fd)
            return
        if not name:
            if mask & IN_ATTRIB:
                self._bump(d.key)
            return
        if mask & _NAMES_CHANGED:
            self._bump(d.key)
        if mask & _INODE_CHANGED:
            try:
                st = os.stat(name, dir_fd=d.fd, follow_symlinks=False)
            except OSError:
                return  # gone again
            self._bump((st.st_dev, st.st_ino))
            if mask & (IN_CREATE | IN_MOVED_TO) and stat.S_ISDIR(st.st_mode):
                try:
                    self._add_tree(os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW
                                           | os.O_CLOEXEC, dir_fd=d.fd))
                except OSError:
                    pass

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.poll(0.5)

    def close(self) -> None:
        for d in self.dirs.values():
            os.close(d.fd)
        self.dirs.clear()
        os.close(self.ifd)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pyvirtiofs.host_watch",
                                description="bump a version table for host-side changes")
    p.add_argument("--version-table", required=True, metavar="PATH")
    p.add_argument("--shared-dir", required=True, metavar="DIR")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="[%(asctime)s %(levelname)s host_watch] %(message)s")
    if not os.path.isdir(args.shared_dir):
        print(f"host_watch: {args.shared_dir!r} is not a directory", file=sys.stderr)
        return 1
    try:
        table = VersionTable(args.version_table)
    except VersionTableError as e:
        print(f"host_watch: --version-table: {e}", file=sys.stderr)
        return 1
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    signal.signal(signal.SIGINT, lambda *a: stop.set())
    w = HostWatcher(args.shared_dir, table)
    log.info("watching %d directories of %s", len(w.dirs), args.shared_dir)
    try:
        w.run(stop)
    finally:
        log.info("stopping after %d bumps", w.bumps)
        w.close()
        table.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

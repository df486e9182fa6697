"""Guest file locks forwarded to the host, so they hold across VMs and host processes.

* POSIX record locks (fcntl F_SETLK/F_GETLK) of a guest lock owner become open-file-description
  (OFD) locks on a host fd private to that (inode, owner) pair.  OFD locks of different
  descriptions conflict with each other and with classic POSIX locks of host processes, and
  locks of one description merge and split by range exactly like one POSIX owner's, so the
  guest sees POSIX semantics and everyone else sees real locks.  The pair's fd is closed when
  the owner flushes the file (POSIX drops a process's locks on any close).
* flock() locks go to the host fd of the guest's open file, which is per open, like flock.

Blocking requests (SETLKW) are not waited for here: the FUSE server retries the non-blocking
call off the request queue (see :mod:`pyvirtiofs.fuse.server`), so a waiting lock never stalls
other requests and can be cancelled.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading
from typing import Callable

OFFSET_MAX = 0x7FFFFFFFFFFFFFFF
F_RDLCK, F_WRLCK, F_UNLCK = fcntl.F_RDLCK, fcntl.F_WRLCK, fcntl.F_UNLCK
_FLOCK = struct.Struct("hhxxxxqqixxxx")  # struct flock on x86-64 Linux
assert _FLOCK.size == 32

# FUSE lock types are the fcntl ones (0 read, 1 write, 2 unlock).


def _to_len(start: int, end: int) -> int:
    return 0 if end >= OFFSET_MAX else end - start + 1


class LockTable:
    """Per (node id, lock owner) host fds carrying that owner's POSIX locks as OFD locks."""

    def __init__(self, reopen: Callable[[int, int], int]):
        self._reopen = reopen  # (nodeid, flags) -> fd
        self._fds: dict[tuple[int, int], int] = {}
        self._via_fh: dict[int, set[tuple[int, int]]] = {}  # guest file -> owners locking through it
        self._lock = threading.Lock()

    def _owner_fd(self, nodeid: int, owner: int, create: bool) -> int | None:
        key = (nodeid, owner)
        with self._lock:
            fd = self._fds.get(key)
        if fd is not None or not create:
            return fd
        for flags in (os.O_RDWR, os.O_RDONLY, os.O_WRONLY):
            try:
                fd = self._reopen(nodeid, flags)
                break
            except PermissionError:
                continue
        else:
            raise OSError(errno.EACCES, "cannot open the file to lock it")
        with self._lock:
            old = self._fds.setdefault(key, fd)
        if old != fd:
            os.close(fd)
        return old

    def getlk(self, nodeid: int, owner: int, start: int, end: int,
              type_: int) -> tuple[int, int, int, int]:
        fd = self._owner_fd(nodeid, owner, True)
        arg = _FLOCK.pack(type_, os.SEEK_SET, start, _to_len(start, end), 0)
        t, _, s, ln, pid = _FLOCK.unpack(fcntl.fcntl(fd, fcntl.F_OFD_GETLK, arg))
        if t == F_UNLCK:
            return (0, 0, F_UNLCK, 0)
        return (s, OFFSET_MAX if ln == 0 else s + ln - 1, t, max(pid, 0))

    def setlk(self, nodeid: int, fh: int, owner: int, start: int, end: int, type_: int) -> None:
        """Non-blocking; raises BlockingIOError (EAGAIN) when another holder conflicts."""
        fd = self._owner_fd(nodeid, owner, type_ != F_UNLCK)
        if fd is None:
            return  # unlocking what was never locked
        with self._lock:
            self._via_fh.setdefault(fh, set()).add((nodeid, owner))
        arg = _FLOCK.pack(type_, os.SEEK_SET, start, _to_len(start, end), 0)
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, arg)
        except OSError as e:
            if e.errno == errno.EACCES:
                raise BlockingIOError(errno.EAGAIN, "lock held elsewhere") from None
            raise

    def release_owner(self, nodeid: int, owner: int) -> None:
        with self._lock:
            fd = self._fds.pop((nodeid, owner), None)
        if fd is not None:
            os.close(fd)  # drops every lock of this owner on this file

    def release_file(self, fh: int) -> None:
        """The guest's last reference to an open file is gone.  Process-owned POSIX locks were
        dropped by FLUSH already (every close sends one); what remains are OFD locks, whose
        owner is the open file itself, and they end with it."""
        with self._lock:
            owners = self._via_fh.pop(fh, ())
        for nodeid, owner in owners:
            self.release_owner(nodeid, owner)

    def clear(self) -> None:
        with self._lock:
            fds, self._fds = self._fds, {}
            self._via_fh = {}
        for fd in fds.values():
            os.close(fd)


def flock(fd: int, type_: int) -> None:
    """Non-blocking flock on an open file's fd; BlockingIOError when held elsewhere."""
    op = {F_RDLCK: fcntl.LOCK_SH, F_WRLCK: fcntl.LOCK_EX, F_UNLCK: fcntl.LOCK_UN}.get(type_)
    if op is None:
        raise OSError(errno.EINVAL, "bad lock type")
    fcntl.flock(fd, op | (fcntl.LOCK_NB if op != fcntl.LOCK_UN else 0))

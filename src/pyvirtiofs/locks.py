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
    # The guest's range is [start, end] in u64s: refuse what struct flock cannot say (the
    # guest kernel never sends it; fcntl(2) answers EINVAL for such ranges too).
    if start > OFFSET_MAX or end < start:
        raise OSError(errno.EINVAL, "invalid lock range")
    return 0 if end >= OFFSET_MAX else end - start + 1


def _overlaps(a0: int, a1: int, b0: int, b1: int) -> bool:
    return a0 <= b1 and b0 <= a1


class LockTable:
    """Per (node id, lock owner) host fds carrying that owner's POSIX locks as OFD locks.

    It also keeps its own account of the ranges each guest owner holds, for one purpose: a
    guest about to wait for a lock held by another guest owner that is itself waiting (a
    cycle) gets EDEADLK, as the guest kernel would answer for local locks.  Locks of host
    processes and other daemons cannot be part of that account; a cycle through them waits.
    """

    def __init__(self, reopen: Callable[[int, int], int]):
        self._reopen = reopen  # (nodeid, flags) -> fd
        self._fds: dict[tuple[int, int], int] = {}
        self._held: dict[int, list[tuple[int, int, int, int]]] = {}  # nodeid -> (owner, s, e, type)
        self._waiting: dict[int, tuple[int, int, int, int]] = {}     # owner -> (nodeid, s, e, type)
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
        if type_ not in (F_RDLCK, F_WRLCK, F_UNLCK):
            raise OSError(errno.EINVAL, "bad lock type")
        length = _to_len(start, end)
        fd = self._owner_fd(nodeid, owner, True)
        arg = _FLOCK.pack(type_, os.SEEK_SET, start, length, 0)
        t, _, s, ln, pid = _FLOCK.unpack(fcntl.fcntl(fd, fcntl.F_OFD_GETLK, arg))
        if t == F_UNLCK:
            return (0, 0, F_UNLCK, 0)
        return (s, OFFSET_MAX if ln == 0 else s + ln - 1, t, max(pid, 0))

    def setlk(self, nodeid: int, fh: int, owner: int, start: int, end: int, type_: int) -> None:
        """Non-blocking; raises BlockingIOError (EAGAIN) when another holder conflicts."""
        length = _to_len(start, end)
        fd = self._owner_fd(nodeid, owner, type_ != F_UNLCK)
        if fd is None:
            return  # unlocking what was never locked
        with self._lock:
            self._via_fh.setdefault(fh, set()).add((nodeid, owner))
        arg = _FLOCK.pack(type_, os.SEEK_SET, start, length, 0)
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, arg)
        except OSError as e:
            if e.errno == errno.EACCES:
                raise BlockingIOError(errno.EAGAIN, "lock held elsewhere") from None
            raise
        self._account(nodeid, owner, start, end, type_)

    def _account(self, nodeid: int, owner: int, start: int, end: int, type_: int) -> None:
        """Record a granted lock or unlock of [start, end] (POSIX: it replaces the owner's
        own locks on that range, splitting them where needed)."""
        with self._lock:
            out = []
            for o, s, e, t in self._held.get(nodeid, ()):
                if o != owner or not _overlaps(s, e, start, end):
                    out.append((o, s, e, t))
                    continue
                if s < start:
                    out.append((o, s, start - 1, t))
                if e > end:
                    out.append((o, end + 1, e, t))
            if type_ != F_UNLCK:
                out.append((owner, start, end, type_))
            if out:
                self._held[nodeid] = out
            else:
                self._held.pop(nodeid, None)

    def _blockers(self, nodeid: int, owner: int, start: int, end: int, type_: int) -> set[int]:
        return {o for o, s, e, t in self._held.get(nodeid, ())
                if o != owner and _overlaps(s, e, start, end)
                and (t == F_WRLCK or type_ == F_WRLCK)}

    def begin_wait(self, nodeid: int, owner: int, start: int, end: int, type_: int) -> None:
        """Register a waiting lock; raises EDEADLK if waiting would close a cycle of guest
        owners each waiting for the next."""
        with self._lock:
            seen = set()
            todo = list(self._blockers(nodeid, owner, start, end, type_))
            while todo:
                o = todo.pop()
                if o == owner:
                    raise OSError(errno.EDEADLK, "lock wait would deadlock")
                if o in seen or o not in self._waiting:
                    continue
                seen.add(o)
                todo.extend(self._blockers(*self._waiting[o][:1], o, *self._waiting[o][1:]))
            self._waiting[owner] = (nodeid, start, end, type_)

    def end_wait(self, owner: int) -> None:
        with self._lock:
            self._waiting.pop(owner, None)

    def release_owner(self, nodeid: int, owner: int) -> None:
        with self._lock:
            fd = self._fds.pop((nodeid, owner), None)
            held = [h for h in self._held.get(nodeid, ()) if h[0] != owner]
            if held:
                self._held[nodeid] = held
            else:
                self._held.pop(nodeid, None)
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
            self._held = {}
            self._waiting = {}
        for fd in fds.values():
            os.close(fd)


def flock(fd: int, type_: int) -> None:
    """Non-blocking flock on an open file's fd; BlockingIOError when held elsewhere."""
    op = {F_RDLCK: fcntl.LOCK_SH, F_WRLCK: fcntl.LOCK_EX, F_UNLCK: fcntl.LOCK_UN}.get(type_)
    if op is None:
        raise OSError(errno.EINVAL, "bad lock type")
    fcntl.flock(fd, op | (fcntl.LOCK_NB if op != fcntl.LOCK_UN else 0))

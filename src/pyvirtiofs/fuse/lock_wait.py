"""Waiting locks: a SETLKW that found its lock taken is retried in a thread of its own, off the
request queue, until it is granted, fails, or is cancelled (FUSE_INTERRUPT, the lock owner
closing the file, the queue stopping).  The FUSE server starts waits and cancels them; how the
answer reaches the guest is its business (the ``answer`` callback)."""

from __future__ import annotations

import errno
import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable

from ..filesystem import FsError

log = logging.getLogger(__name__)

RETRY_MAX = 0.05  # seconds between attempts, at most (the first retry comes after 1 ms)


@dataclass(frozen=True)
class LockRequest:
    """One lock operation, as FileSystem.setlk takes it."""
    nodeid: int
    fh: int
    owner: int
    start: int
    end: int
    type: int
    pid: int
    flock: bool

    def take(self, fs: Any) -> None:
        """One attempt, without blocking: raises EAGAIN (FsError or BlockingIOError) if taken."""
        fs.setlk(self.nodeid, self.fh, self.owner, self.start, self.end, self.type, self.pid,
                 False, self.flock)


def is_busy(e: BaseException) -> bool:
    """Whether a failed attempt means "taken, try again later"."""
    return isinstance(e, (FsError, OSError)) and e.errno == errno.EAGAIN


class LockWaiter:
    """One waiting lock; ``answer(err)`` is called once at the end (0: granted)."""

    def __init__(self, waits: "LockWaits", fs: Any, lock: LockRequest, unique: int,
                 complete: Any, answer: Callable[[int], None]):
        self.waits, self.fs, self.lock, self.unique = waits, fs, lock, unique
        self.complete = complete  # the completion callback of the queue it came from
        self.answer = answer
        self.cancelled = threading.Event()
        # Held while trying the lock, so that once cancel() returns no attempt is under way
        # and none will follow: a cancelled wait can never take a lock afterwards.
        self.attempt = threading.Lock()

    def cancel(self) -> None:
        with self.attempt:
            self.cancelled.set()

    def run(self) -> None:
        delay = 0.001
        while True:
            if self.cancelled.wait(delay):
                err = errno.EINTR
                break
            try:
                with self.attempt:
                    if self.cancelled.is_set():
                        continue
                    self.lock.take(self.fs)
            except Exception as e:
                if is_busy(e):
                    delay = min(delay * 2, RETRY_MAX)
                    continue
                if isinstance(e, (FsError, OSError)):
                    err = e.errno or errno.EIO
                else:
                    log.exception("internal error in a waiting lock")
                    err = errno.EIO
                break
            err = 0
            break
        self.waits.remove(self.unique)
        try:
            self.fs.end_lock_wait(self.lock.nodeid, self.lock.owner, self.lock.flock)
        except Exception:
            log.exception("end_lock_wait failed")
        self.answer(err)


class LockWaits:
    """The waiting locks of one FUSE server, by request id."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: dict[int, LockWaiter] = {}

    def start(self, fs: Any, lock: LockRequest, unique: int, complete: Any,
              answer: Callable[[int], None]) -> None:
        waiter = LockWaiter(self, fs, lock, unique, complete, answer)
        with self._lock:
            self._waiters[unique] = waiter
        threading.Thread(target=waiter.run, name=f"lockwait-{unique}", daemon=True).start()

    def remove(self, unique: int) -> None:
        with self._lock:
            self._waiters.pop(unique, None)

    def interrupt(self, unique: int) -> None:
        """FUSE_INTERRUPT of request ``unique``: its wait, if any, answers EINTR."""
        with self._lock:
            waiter = self._waiters.get(unique)
        if waiter is not None:
            waiter.cancel()

    def cancel(self, complete: Any = None, owner: tuple[int, int] | None = None) -> None:
        """Cancel the waits completing through ``complete`` (a queue stopping), those of one
        (nodeid, lock owner) (the owner closed the file), or all of them."""
        with self._lock:
            waiters = list(self._waiters.values())
        for w in waiters:
            if ((complete is None or w.complete == complete)
                    and (owner is None or (w.lock.nodeid, w.lock.owner) == owner)):
                w.cancel()

"""One thread per started virtqueue: wait for kicks, pop chains, hand them to a request
handler, publish the replies, and interrupt the guest once per batch.

With a thread pool (``--thread-pool-size``), a worker that finds several requests waiting hands
all but the last to the pool, so a slow request (fsync, a cold read) does not hold up the
others; a lone request is still served inline, which is the fastest path."""

from __future__ import annotations

import logging
import os
import select
import threading
from typing import Callable

from .vhost_user.device import DEFERRED
from .virtqueue import ChainError, DescriptorChain, QueueBroken, Virtqueue

log = logging.getLogger(__name__)

NOTIFY_EVERY = 32  # interrupt the guest at least this often while a batch is long


class QueueWorker:
    def __init__(self, vq: Virtqueue, handler: Callable[..., int], name: str,
                 cancel_pending: Callable[..., None] | None = None, pool=None):
        self.vq = vq
        self.handler = handler  # the device's request handler for this queue
        self.cancel_pending = cancel_pending
        self.pool = pool  # a concurrent.futures executor, or None
        self._deferred = 0  # requests answered later, from other threads
        self._cond = threading.Condition()
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._worker = threading.Thread(target=self._run, name=name, daemon=True)
        self.chain_errors = 0
        self.served = 0  # requests taken off this ring (logged at stop: which queues worked)

    def start(self) -> None:
        self._worker.start()

    def stop(self) -> None:
        """Stop after the request in progress; returns when the thread has finished and no
        deferred reply can touch the ring any more."""
        os.eventfd_write(self._stop_fd, 1)
        if self._worker.is_alive() and self._worker is not threading.current_thread():
            self._worker.join()
        log.info("queue %d stopped after %d requests", self.vq.index, self.served)
        if self.cancel_pending is not None:
            self.cancel_pending(complete=self.complete)
        with self._cond:
            if not self._cond.wait_for(lambda: self._deferred <= 0, timeout=10):
                log.error("queue %d: %d deferred requests did not finish", self.vq.index,
                          self._deferred)
        os.close(self._stop_fd)

    def complete(self, head: int, length: int) -> None:
        """Publish a reply that was deferred (called from another thread)."""
        with self._cond:
            if not self.vq.broken and self.vq.ready:
                self.vq.add_used(head, length)
                self.vq.notify()
            self._deferred -= 1
            self._cond.notify_all()

    def _run(self) -> None:
        vq = self.vq
        if vq.kick_fd is None:  # started only once the frontend gave the kick eventfd
            raise RuntimeError(f"queue {vq.index} started without a kick fd")
        poller = select.poll()
        poller.register(vq.kick_fd, select.POLLIN)
        poller.register(self._stop_fd, select.POLLIN)
        kick_fd, stop_fd = vq.kick_fd, self._stop_fd
        poll = poller.poll
        eventfd_read = os.eventfd_read
        try:
            while True:
                self._drain()
                if vq.broken:
                    return
                ready = poll()
                if (len(ready) != 1 or ready[0][0] != kick_fd) and any(
                        fd == stop_fd for fd, _ in ready):
                    return
                try:
                    eventfd_read(kick_fd)
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError as e:
                    # Not a readable eventfd (a file, a pipe or socket at EOF, ...): the
                    # frontend's kick fd cannot be waited on; stop this queue rather than
                    # spin on it or die with a traceback.
                    raise QueueBroken(f"queue {vq.index}: the kick fd is not a readable "
                                      f"eventfd ({e.strerror or e})") from None
        except QueueBroken as e:
            self._broken(str(e))
        except Exception as e:  # a bug of ours must not take the daemon down
            log.exception("queue %d worker failed", vq.index)
            self._broken(f"internal error: {e}")

    def _pooled(self, chain: DescriptorChain) -> None:
        try:
            n = self.handler(chain, self.complete)
        except Exception:  # the handler answers errors itself; this is a bug of ours
            log.exception("queue %d: pooled request failed", self.vq.index)
            n = 0
        if n != DEFERRED:  # a waiting lock completes (and is counted) later
            self.complete(chain.head, n)

    def _broken(self, why: str) -> None:
        log.error("queue %d is broken and stops until the device is reset: %s", self.vq.index, why)
        self.vq.broken = True
        self.vq.signal_error()

    def _drain(self) -> None:
        """Serve every chain on the ring, then interrupt the guest once (if it wants one) and
        re-arm the kick; loop if chains arrived meanwhile.  Returns when the ring is empty."""
        vq = self.vq
        handler = self.handler
        complete = self.complete
        pop = vq.pop
        add_used = vq.add_used
        pool = self.pool
        served = 0
        try:
            while True:
                added = 0  # used entries since the last interrupt check
                while True:
                    try:
                        chain = pop()
                    except ChainError as e:
                        self.chain_errors += 1
                        if self.chain_errors <= 10:
                            log.warning("dropped a malformed request: %s", e)
                        added += 1
                        continue
                    if chain is None:
                        break
                    served += 1
                    if pool is not None and vq.avail_count():
                        with self._cond:
                            self._deferred += 1
                        pool.submit(self._pooled, chain)
                        continue
                    n = handler(chain, complete)
                    if n == DEFERRED:
                        with self._cond:
                            self._deferred += 1
                        continue
                    add_used(chain.head, n)
                    added += 1
                    if added >= NOTIFY_EVERY:
                        vq.notify()
                        added = 0
                if not vq.end_batch(added > 0):
                    return
        finally:
            self.served += served

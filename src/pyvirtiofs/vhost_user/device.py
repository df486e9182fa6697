"""The contract between the vhost-user backend and a device, in one place (what rust-vmm's
``VhostUserBackend`` trait is to ``vhost-user-backend``): a device subclasses :class:`Device`
and overrides what it needs; every hook but :meth:`Device.queue_handler` has a default.

A request handler takes a descriptor chain and a completion callback and returns the number of
reply bytes it wrote (0: no reply), or :data:`DEFERRED` when it will answer later by calling
``complete(chain.head, length)`` from any thread.  The vhost-user layer knows nothing more of
what requests mean; the FUSE server is one such handler.
"""

from __future__ import annotations

from concurrent.futures import Executor
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:
    from ..virtqueue import DescriptorChain
    from .shmem import SharedMemory

DEFERRED = -2
"""A request handler's answer: the reply will come through the completion callback."""

Completion = Callable[[int, int], None]
"""``complete(head, length)``: publish a deferred reply."""

RequestHandler = Callable[["DescriptorChain", Optional[Completion]], int]


class Device:
    """Base class of devices served by :class:`~pyvirtiofs.vhost_user.backend.VhostUserSession`."""

    num_queues: int = 1
    """How many virtqueues the device has (GET_QUEUE_NUM)."""

    shmem: "SharedMemory | None" = None
    """VIRTIO shared memory regions; with some, the backend offers the SHMEM protocol feature."""

    config_space: bytes | None = None
    """The device's config space (GET_CONFIG); with one, the backend offers the CONFIG protocol
    feature."""

    pool: Executor | None = None
    """Threads that serve requests waiting behind others on a queue (None: the queue's own)."""

    def queue_handler(self, index: int) -> RequestHandler:
        """The request handler of virtqueue ``index``."""
        raise NotImplementedError

    def cancel_pending(self, complete: Completion | None = None) -> None:
        """Cancel deferred requests that answer through ``complete`` (a queue stopping) or,
        with None, all of them; each still answers (with an error).  Default: none exist."""

    def reset(self) -> None:
        """The frontend reset the device (or disconnected): forget all state."""

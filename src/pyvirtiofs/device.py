"""The virtio-fs device: queue 0 is the high-priority queue (FORGET, BATCH_FORGET, INTERRUPT),
queues 1..N carry requests.  Every queue is served by the same FUSE server; each has its own
worker thread (see :mod:`pyvirtiofs.queue_worker`), so hiprio never waits behind requests."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from . import aio
from .dax import DaxWindow
from .filesystem import FileSystem
from .fuse.server import FuseServer
from .vhost_user.device import DEFERRED, Device
from .version_table import GuestMapping
from .vhost_user.shmem import SharedMemory

HIPRIO_QUEUE = 0


TAG_SIZE = 36


def tag_bytes(tag: str) -> bytes:
    """The tag as the config space holds it; ValueError if it cannot."""
    raw = tag.encode()
    if not raw or len(raw) > TAG_SIZE or b"\0" in raw:
        raise ValueError(f"a tag is 1 to {TAG_SIZE} bytes (UTF-8) without NUL")
    return raw


class VirtioFsDevice(Device):
    def __init__(self, fs: FileSystem, num_request_queues: int = 255, thread_pool_size: int = 0,
                 shmem: SharedMemory | None = None, dax_policy: str = "always",
                 tag: str | None = None):
        # We answer GET_QUEUE_NUM with the most we can serve; QEMU sets up as many as its
        # num-request-queues property asks for and leaves the rest untouched.  At most 256
        # queues in all: SET_VRING_KICK/CALL/ERR name their ring in 8 bits (vhost-user.rst),
        # so a queue numbered 256 or more could never be given its eventfds.
        self.fs = fs
        self.shmem = shmem  # VIRTIO shared memory regions, if any (the backend offers them)
        # Region 0 is the DAX window (virtio-fs spec).
        has_window = shmem is not None and bool(shmem.sizes) and shmem.sizes[0] > 0
        self.dax = DaxWindow(shmem, 0) if has_window else None
        self.server = FuseServer(aio.for_server(fs), self.dax, dax_policy)
        # Coroutine methods wait in the aio pool, not on the queue's own thread.
        self._serve_request = (aio.deferring(self.server.serve_request, DEFERRED)
                               if aio.has_coroutines(fs) else self.server.serve_request)
        if fs.version_table is not None:
            # A guest reads the table in shared memory region 1: no region, no extension.
            if shmem is not None:
                self.server.version_table_readable = GuestMapping(
                    fs.version_table, shmem).ensure_mapped
            else:
                self.server.version_table_readable = lambda: False
        self.num_queues = 1 + num_request_queues
        # struct virtio_fs_config: tag[36] (NUL-padded), num_request_queues (le32).  Only
        # with a tag: the backend then offers the CONFIG protocol feature.
        self.config_space = (None if tag is None else
                             tag_bytes(tag).ljust(TAG_SIZE, b"\0")
                             + num_request_queues.to_bytes(4, "little"))
        # Shared by the request queues; only used when a queue has several requests waiting.
        self.pool = (ThreadPoolExecutor(thread_pool_size, thread_name_prefix="pool")
                     if thread_pool_size > 0 else None)

    def queue_handler(self, index: int):
        return self._serve_request

    def cancel_pending(self, complete=None) -> None:
        self.server.cancel_pending(complete=complete)

    def reset(self) -> None:
        self.server.cancel_pending()
        self.server.reset()

"""VIRTIO shared memory regions of a vhost-user device (protocol feature SHMEM).

A device declares its regions as a list of sizes indexed by shmid (0 = that id unused); the
backend offers ``VHOST_USER_PROTOCOL_F_SHMEM`` (with BACKEND_REQ and REPLY_ACK) when any size
is non-zero, and answers ``GET_SHMEM_CONFIG`` with the list.  The frontend (QEMU) reserves each
region in the guest's address space; the device then places file ranges in it by sending
``SHMEM_MAP`` (the fd travels as SCM_RIGHTS) and ``SHMEM_UNMAP`` on the backend channel (the
socket of SET_BACKEND_REQ_FD), each with NEED_REPLY, and waits for the frontend's ack.

Device-side API (what a device needs, all of it)::

    shm = SharedMemory([dax_window_size, version_table_size])   # shmid = index
    device.shmem = shm            # the backend finds it there (VirtioFsDevice(shmem=shm))

    shm.available                 # True once the frontend negotiated SHMEM and gave a channel
    shm.map(shmid, fd, fd_offset, shm_offset, length, writable=False)
    shm.unmap(shmid, shm_offset, length)
    shm.add_reset_listener(fn)    # fn() after the frontend dropped every mapping (device reset)

``map`` and ``unmap`` block until the frontend answers and are safe to call from several
threads (requests go out one at a time).  They raise :class:`ShmemError` (an ``OSError``
whose ``errno`` is meant for the guest) and never hang:

* ``EINVAL``: a request the frontend must refuse anyway (unknown shmid, not page aligned, empty,
  past the region's end); checked here, nothing is sent;
* ``EOPNOTSUPP``: the frontend did not negotiate SHMEM (or has no channel): no shared memory;
* ``EIO``: the frontend answered with a failure (overlap, no resources, ...), or the channel is
  unusable (closed, out of step after a timeout);
* ``ETIMEDOUT``: no answer within ``timeout`` seconds; the channel is then considered out of
  step and every later request fails with ``EIO`` (a late answer could be taken for the
  answer to another request).

The frontend's rules (vhost-user.rst, SHMEM): a map may not overlap an existing mapping; an
unmap names one whole existing mapping; offsets and lengths are page aligned; every mapping is
dropped at device reset.  Callers keep their own table (see :mod:`pyvirtiofs.dax`).

To expose memory read-only to the guest (e.g. a metadata version table as region 1)::

    fd = os.open("/dev/shm/table", os.O_RDONLY)
    shm.map(1, fd, 0, 0, table_size, writable=False)   # after shm.available; again after reset
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
import time
from typing import Callable, Sequence

from . import messages as m

log = logging.getLogger(__name__)

PAGE_SIZE = 4096
DEFAULT_TIMEOUT = 5.0  # seconds a frontend has to answer a SHMEM_MAP/UNMAP


class ShmemError(OSError):
    """A shared memory request that failed; ``errno`` is what the guest should see."""

    def __init__(self, err: int, message: str):
        super().__init__(err, message)


class BackendChannel:
    """The backend's end of the SET_BACKEND_REQ_FD socket: requests with NEED_REPLY, one at a
    time, each waiting for the frontend's REPLY_ACK (a u64, 0 = success)."""

    def __init__(self, sock: socket.socket, timeout: float = DEFAULT_TIMEOUT):
        self.sock = sock
        self.timeout = timeout
        self._lock = threading.Lock()
        self._broken: str | None = None

    def request(self, request: int, payload: bytes, fds: Sequence[int] = ()) -> None:
        """Send one request and wait for its ack; raises ShmemError."""
        name = m.BackendRequest(request).name
        deadline = time.monotonic() + self.timeout
        if not self._lock.acquire(timeout=self.timeout):
            raise ShmemError(errno.ETIMEDOUT, f"{name}: backend channel busy for {self.timeout}s")
        try:
            if self._broken:
                raise ShmemError(errno.EIO, f"{name}: backend channel unusable ({self._broken})")
            data = m.HEADER.pack(request, m.VERSION | m.FLAG_NEED_REPLY, len(payload)) + payload
            try:
                self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
                if fds:
                    sent = socket.send_fds(self.sock, [data], list(fds))
                    if sent < len(data):
                        self.sock.sendall(data[sent:])
                else:
                    self.sock.sendall(data)
                hdr = self._recv(m.HEADER.size, deadline)
                req, flags, size = m.HEADER.unpack(hdr)
                if size > 64:
                    raise _OutOfStep(f"reply claims {size} bytes")
                body = self._recv(size, deadline)
            except socket.timeout:
                self._broken = f"no answer to {name} within {self.timeout}s"
                raise ShmemError(errno.ETIMEDOUT, self._broken) from None
            except _OutOfStep as e:
                self._broken = f"bad reply to {name}: {e}"
                raise ShmemError(errno.EIO, self._broken) from None
            except OSError as e:
                self._broken = f"{name}: {e.strerror or e}"
                raise ShmemError(errno.EIO, self._broken) from None
            if req != request or not flags & m.FLAG_REPLY or len(body) < 8:
                self._broken = (f"reply to {name} is request {req}, flags {flags:#x}, "
                                f"{len(body)} bytes")
                raise ShmemError(errno.EIO, self._broken)
            status = m.U64.unpack_from(body)[0]
            if status:
                raise ShmemError(errno.EIO, f"frontend refused {name} (status {status})")
        finally:
            self._lock.release()

    def _recv(self, n: int, deadline: float) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise _OutOfStep("frontend closed the backend channel")
            buf += chunk
        return bytes(buf)

    def close(self) -> None:
        self.sock.close()


class _OutOfStep(Exception):
    pass


class SharedMemory:
    """A device's VIRTIO shared memory regions, as the backend sees them (see the module
    docstring for the API)."""

    def __init__(self, sizes: Sequence[int], timeout: float = DEFAULT_TIMEOUT):
        sizes = list(sizes)
        while sizes and not sizes[-1]:
            sizes.pop()
        if len(sizes) > m.MAX_SHMEM_REGIONS:
            raise ValueError(f"at most {m.MAX_SHMEM_REGIONS} shared memory regions")
        for s in sizes:
            if s < 0 or s % PAGE_SIZE or s >= 1 << 63:
                raise ValueError(f"shared memory region size {s} is not a multiple of "
                                 f"{PAGE_SIZE} below 2^63")
        self.sizes = sizes
        self.timeout = timeout
        self._negotiated = False
        self._channel: BackendChannel | None = None
        self._listeners: list[Callable[[], None]] = []

    # -- device side ----------------------------------------------------------------------
    @property
    def regions(self) -> bool:
        """Whether there is anything to offer (a non-zero region)."""
        return any(self.sizes)

    @property
    def available(self) -> bool:
        return self._negotiated and self._channel is not None

    def add_reset_listener(self, fn: Callable[[], None]) -> None:
        """``fn()`` is called after the frontend dropped every mapping (device reset or
        disconnect); callers forget their own tables there."""
        self._listeners.append(fn)

    def map(self, shmid: int, fd: int, fd_offset: int, shm_offset: int, length: int,
            writable: bool = False) -> None:
        self._check(shmid, shm_offset, length)
        if fd_offset < 0 or fd_offset % PAGE_SIZE or fd_offset + length > 1 << 63:
            raise ShmemError(errno.EINVAL, f"file offset {fd_offset} not page aligned or too big")
        payload = m.SHMEM_MMAP.pack(shmid, fd_offset, shm_offset, length,
                                    m.SHMEM_MAP_RW if writable else 0)
        self._channel_or_raise().request(m.BackendRequest.SHMEM_MAP, payload, [fd])

    def unmap(self, shmid: int, shm_offset: int, length: int) -> None:
        self._check(shmid, shm_offset, length)
        payload = m.SHMEM_MMAP.pack(shmid, 0, shm_offset, length, 0)
        self._channel_or_raise().request(m.BackendRequest.SHMEM_UNMAP, payload)

    def _check(self, shmid: int, offset: int, length: int) -> None:
        if not 0 <= shmid < len(self.sizes) or not self.sizes[shmid]:
            raise ShmemError(errno.EINVAL, f"no shared memory region {shmid}")
        if offset < 0 or length <= 0 or offset % PAGE_SIZE or length % PAGE_SIZE:
            raise ShmemError(errno.EINVAL, f"range {offset:#x}+{length:#x} not page aligned")
        if offset + length > self.sizes[shmid]:
            raise ShmemError(errno.EINVAL, f"range {offset:#x}+{length:#x} past the end of "
                                           f"region {shmid} ({self.sizes[shmid]:#x})")

    def _channel_or_raise(self) -> BackendChannel:
        ch = self._channel
        if not self._negotiated or ch is None:
            raise ShmemError(errno.EOPNOTSUPP, "the frontend did not set up shared memory "
                                               "(SHMEM, BACKEND_REQ and REPLY_ACK)")
        return ch

    # -- backend side ---------------------------------------------------------------------
    def config_reply(self) -> bytes:
        """GET_SHMEM_CONFIG's answer."""
        sizes = self.sizes + [0] * (m.MAX_SHMEM_REGIONS - len(self.sizes))
        return m.SHMEM_CONFIG.pack(len(self.sizes), 0, *sizes)

    def negotiated(self, yes: bool) -> None:
        self._negotiated = yes

    def attach(self, sock: socket.socket) -> None:
        """A new backend channel (SET_BACKEND_REQ_FD); an earlier one is closed."""
        old, self._channel = self._channel, BackendChannel(sock, self.timeout)
        if old is not None:
            old.close()

    def dropped(self) -> None:
        """The frontend dropped every mapping (device reset)."""
        for fn in self._listeners:
            try:
                fn()
            except Exception:
                log.exception("shared memory reset listener failed")

    def detach(self) -> None:
        """The frontend went away: no channel, no mappings."""
        ch, self._channel = self._channel, None
        self._negotiated = False
        if ch is not None:
            ch.close()
        self.dropped()

"""A vhost-user-fs *frontend* written in plain Python: it plays QEMU and the guest's
virtio-fs driver against any vhost-user-fs backend listening on a Unix socket.

It is an independent oracle: nothing here imports the daemon's own code.  Layers, bottom up:

* :class:`GuestRam` - guest RAM in one or two memfds, with a first-fit allocator for buffers
  and read/write helpers at guest-physical addresses (gpa).  The frontend's "user addresses"
  (uaddr, what SET_VRING_ADDR carries) are deliberately different from the gpas.
* :class:`VhostUserConnection` - vhost-user message framing over the socket (fds as
  SCM_RIGHTS), ``call()`` with REPLY_ACK handling and ``send_raw()`` for hostile input.
* :class:`SplitQueue` - the guest driver's side of one split virtqueue: descriptor table,
  avail and used rings in guest RAM, direct and indirect chains, EVENT_IDX, kick/call
  eventfds, and raw access to every field.
* :class:`VirtioFsFrontend` - connects and performs the same vhost-user message sequence as
  QEMU 7.2's vhost-user-fs device (see :meth:`VirtioFsFrontend.negotiate` and
  :meth:`VirtioFsFrontend.start`).
* :class:`ShmemRegion` - with ``shmem=True``, VIRTIO shared memory regions as a QEMU with the
  vhost-user SHMEM series holds them: GET_SHMEM_CONFIG, each region reserved PROT_NONE, the
  backend channel served (SHMEM_MAP/UNMAP checked against the rules, the fd mapped
  MAP_SHARED | MAP_FIXED, REPLY_ACK), every mapping dropped at reset.
* :class:`DaxDriver` - the guest's DAX driver as Linux's fs/fuse/dax.c: 2 MiB ranges of the
  window, SETUPMAPPING on first access, reclaim with REMOVEMAPPING under pressure.
* :class:`FuseClient` - FUSE requests over the queues, with Linux 6.1's descriptor layout
  (in header, each argument, out header, each reply argument as separate descriptors, data
  split at page boundaries, indirect tables whenever negotiated); a method per opcode, and
  ``submit()``/``wait()`` for several requests in flight.

Only the standard library is used.  Little-endian x86-64 is assumed (as FUSE on Linux is).
"""

from __future__ import annotations

import ctypes
import enum
import errno as _errno
import mmap
import os
import select
import socket
import stat as _stat
import struct
import threading
import time
from bisect import bisect_left
from typing import Iterable, NamedTuple, Sequence

PAGE_SIZE = 4096

__all__ = [
    # errors
    "FrontendError", "ProtocolError", "VhostUserError", "FuseError", "QueueFullError",
    # memory / rings / vhost-user
    "GuestRam", "MemRegion", "VhostUserConnection", "VhostUserMessage", "SplitQueue",
    "Chain", "Completion", "VirtioFsFrontend", "Req", "ProtoFeature", "VirtioFeature",
    "BackendReq", "ShmemRegion", "ShmemMapping", "ShmemRequest", "DaxDriver", "DaxFile",
    # FUSE
    "FuseClient", "Op", "Reply", "Attr", "EntryOut", "AttrOut", "InitOut", "OpenOut",
    "StatfsOut", "Dirent", "DirentPlus", "FileLock", "LINUX_6_1_INIT_FLAGS",
]


# ----------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------

class FrontendError(Exception):
    """Base class of this module's errors."""


class ProtocolError(FrontendError):
    """The backend broke the vhost-user, virtio or FUSE protocol (its fault, not ours)."""


class VhostUserError(FrontendError):
    """The backend answered a REPLY_ACK request with a non-zero status."""

    def __init__(self, request: int, status: int):
        super().__init__(f"vhost-user {_req_name(request)} refused by backend (status {status:#x})")
        self.request = request
        self.status = status


class QueueFullError(FrontendError):
    """Not enough free descriptors for the chain."""


class FuseError(OSError):
    """A FUSE reply carried an error; ``.errno`` is the positive errno."""

    def __init__(self, err: int, opcode: int | None = None):
        name = _errno.errorcode.get(err, str(err))
        msg = os.strerror(err) if err > 0 else "invalid errno"
        if opcode is not None:
            msg = f"{_op_name(opcode)}: {name}: {msg}"
        super().__init__(err, msg)
        self.opcode = opcode


# ----------------------------------------------------------------------------------------
# Numbers
# ----------------------------------------------------------------------------------------

class Req(enum.IntEnum):
    """Frontend -> backend vhost-user requests."""
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43
    GET_SHMEM_CONFIG = 44


#: Requests whose reply is part of the request's definition (need_reply changes nothing).
ALWAYS_REPLY = frozenset({
    Req.GET_FEATURES, Req.GET_PROTOCOL_FEATURES, Req.GET_VRING_BASE, Req.GET_QUEUE_NUM,
    Req.GET_CONFIG, Req.GET_INFLIGHT_FD, Req.GET_MAX_MEM_SLOTS, Req.GET_STATUS,
    Req.POSTCOPY_ADVISE, Req.SET_LOG_BASE, Req.CREATE_CRYPTO_SESSION, Req.GET_SHARED_OBJECT,
    Req.SET_DEVICE_STATE_FD, Req.CHECK_DEVICE_STATE, Req.GET_SHMEM_CONFIG,
})


class ProtoFeature(enum.IntEnum):
    """vhost-user protocol feature bit numbers."""
    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    NET_MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    XEN_MMAP = 17
    SHARED_OBJECT = 18
    DEVICE_STATE = 19
    SHMEM = 20


class VirtioFeature(enum.IntEnum):
    """Virtio feature bit numbers used here."""
    FS_NOTIFICATION = 0
    NOTIFY_ON_EMPTY = 24
    LOG_ALL = 26                 # vhost: VHOST_F_LOG_ALL
    INDIRECT_DESC = 28
    EVENT_IDX = 29
    PROTOCOL_FEATURES = 30       # vhost-user: VHOST_USER_F_PROTOCOL_FEATURES
    VERSION_1 = 32
    ACCESS_PLATFORM = 33
    RING_PACKED = 34


def _bit(n: int) -> int:
    return 1 << n


#: What this frontend asks for by default (never CONFIG: QEMU 7.1-8.0 crash with it).
DEFAULT_PROTOCOL_FEATURES = (_bit(ProtoFeature.MQ) | _bit(ProtoFeature.REPLY_ACK)
                             | _bit(ProtoFeature.CONFIGURE_MEM_SLOTS)
                             | _bit(ProtoFeature.RESET_DEVICE))

VHOST_USER_VERSION = 0x1
VHOST_USER_VERSION_MASK = 0x3
VHOST_USER_REPLY = 1 << 2
VHOST_USER_NEED_REPLY = 1 << 3
VRING_IDX_MASK = 0xFF
VRING_NOFD = 1 << 8
MAX_FDS = 8          # QEMU sends at most 8 fds a message

VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_USED_F_NO_NOTIFY = 1
VRING_AVAIL_F_NO_INTERRUPT = 1


def _req_name(r: int) -> str:
    try:
        return Req(r).name
    except ValueError:
        return f"request {r}"


# vhost-user wire structs
_HDR = struct.Struct("<III")                 # request, flags, size
_U64 = struct.Struct("<Q")
_VRING_STATE = struct.Struct("<II")          # index, num
_VRING_ADDR = struct.Struct("<IIQQQQ")       # index, flags, desc, used, avail, log
_MEM_HDR = struct.Struct("<II")              # nregions, padding
_MEM_REGION = struct.Struct("<QQQQ")         # gpa, size, uaddr, mmap_offset
_SINGLE_MEM_REGION = struct.Struct("<QQQQQ")  # padding, then a region

# virtqueue structs
_DESC = struct.Struct("<QIHH")               # addr, len, flags, next
_USED_ELEM = struct.Struct("<II")            # id, len

_fence_lock = threading.Lock()


def memory_fence() -> None:
    """A full memory barrier: a locked read-modify-write (x86 ``lock cmpxchg``) happens when
    a lock is taken, which orders the store to ``avail.idx`` before the load of
    ``avail_event`` (the Dekker pattern of EVENT_IDX)."""
    _fence_lock.acquire()
    _fence_lock.release()


# ----------------------------------------------------------------------------------------
# Guest RAM
# ----------------------------------------------------------------------------------------

class MemRegion:
    """One memfd-backed region of guest RAM.  ``mm`` maps the region itself (the memfd's
    bytes from ``mmap_offset`` on); the backend must map the fd and add ``mmap_offset``."""

    __slots__ = ("index", "gpa", "size", "uaddr", "mmap_offset", "fd", "mm", "free")

    def __init__(self, index, gpa, size, uaddr, mmap_offset, fd, mm):
        self.index = index
        self.gpa = gpa
        self.size = size
        self.uaddr = uaddr
        self.mmap_offset = mmap_offset
        self.fd = fd
        self.mm = mm
        self.free: list[list[int]] = [[0, size]]   # sorted [start, end) offsets

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def table_entry(self) -> tuple[int, int, int, int]:
        return (self.gpa, self.size, self.uaddr, self.mmap_offset)

    def __repr__(self):
        return (f"MemRegion({self.index}, gpa={self.gpa:#x}, size={self.size:#x}, "
                f"uaddr={self.uaddr:#x}, mmap_offset={self.mmap_offset:#x})")


class GuestRam:
    """Guest RAM: ``regions`` memfds (1 or more), each mmapped here and passed to the backend.

    * ``gpa_base``: guest-physical address of the first region (default 0x100000, so a backend
      that assumes gpa 0 breaks).  Region ``i`` starts at the previous region's end plus
      ``region_gap`` (e.g. ``1 << 32`` to mimic the x86 PCI hole).
    * ``uaddr_base``: the frontend "user address" of the first region, as a QEMU process would
      have it.  Default is a fake 0x7f0000000000 (regions 4 GiB apart) so that a backend
      translating ring addresses with gpas instead of uaddrs fails; pass ``"real"`` to use the
      real address of this process's mapping.
    * ``mmap_offset``: bytes (page multiple) at the start of each memfd that are not guest
      RAM; filled with 0xA5 so a backend ignoring mmap_offset reads garbage.

    Allocation is first-fit with coalescing free lists; by default successive allocations go
    to successive regions in turn (``policy="rr"``) so multi-region translation is exercised.
    """

    FAKE_UADDR_BASE = 0x7F0000000000
    POISON = 0xA5

    def __init__(self, size: int = 64 << 20, *, gpa_base: int = 0x100000, regions: int = 1,
                 region_gap: int = 0, uaddr_base: int | str | None = None,
                 mmap_offset: int = 0, policy: str = "rr", name: str = "pyvirtiofs-guest-ram"):
        if regions < 1:
            raise ValueError("need at least one region")
        if size % (regions * PAGE_SIZE):
            raise ValueError("size must be a multiple of regions * 4096")
        if mmap_offset % mmap.ALLOCATIONGRANULARITY:
            raise ValueError("mmap_offset must be a multiple of the page size")
        if policy not in ("rr", "first"):
            raise ValueError("policy is 'rr' or 'first'")
        self.size = size
        self.policy = policy
        self._rr = 0
        self.regions: list[MemRegion] = []
        self._allocs: dict[int, tuple[MemRegion, int, int]] = {}
        rsize = size // regions
        gpa = gpa_base
        for i in range(regions):
            fd = os.memfd_create(f"{name}-{i}", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, rsize + mmap_offset)
                if mmap_offset:
                    os.pwrite(fd, bytes([self.POISON]) * mmap_offset, 0)
                mm = mmap.mmap(fd, rsize, flags=mmap.MAP_SHARED,
                               prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=mmap_offset)
            except BaseException:
                os.close(fd)
                raise
            if uaddr_base == "real":
                c = ctypes.c_char.from_buffer(mm)
                uaddr = ctypes.addressof(c)
                del c
            else:
                base = self.FAKE_UADDR_BASE if uaddr_base is None else int(uaddr_base)
                uaddr = base + i * (1 << 32)
            self.regions.append(MemRegion(i, gpa, rsize, uaddr, mmap_offset, fd, mm))
            gpa += rsize + region_gap

    # -- addresses --------------------------------------------------------------------

    def locate(self, gpa: int, length: int = 1) -> tuple[MemRegion, int]:
        """(region, offset in region) of ``gpa``; the range must lie inside one region."""
        for r in self.regions:
            if r.gpa <= gpa < r.gpa + r.size:
                off = gpa - r.gpa
                if off + length > r.size:
                    raise ValueError(f"gpa range {gpa:#x}+{length:#x} crosses the end of {r}")
                return r, off
        raise ValueError(f"gpa {gpa:#x} is not guest RAM")

    def uaddr(self, gpa: int) -> int:
        """The frontend user address of ``gpa`` (what SET_VRING_ADDR carries)."""
        r, off = self.locate(gpa)
        return r.uaddr + off

    def mem_table(self) -> list[tuple[int, int, int, int]]:
        return [r.table_entry() for r in self.regions]

    @property
    def fds(self) -> list[int]:
        return [r.fd for r in self.regions]

    # -- access -----------------------------------------------------------------------

    def read(self, gpa: int, n: int) -> bytes:
        r, off = self.locate(gpa, n)
        return r.mm[off:off + n]

    def write(self, gpa: int, data) -> None:
        n = len(data)
        r, off = self.locate(gpa, n)
        r.mm[off:off + n] = data

    def view(self, gpa: int, n: int) -> memoryview:
        """A writable memoryview of guest RAM (release it before closing the RAM)."""
        r, off = self.locate(gpa, n)
        return memoryview(r.mm)[off:off + n]

    def fill(self, gpa: int, n: int, byte: int = 0) -> None:
        r, off = self.locate(gpa, n)
        r.mm[off:off + n] = bytes([byte]) * n

    # Scalars go through memoryview casts: one load/store of the whole width (struct's
    # pack_into/unpack_from copy byte by byte, so another process can see a torn value).
    def _scalar(self, gpa: int, size: int, fmt: str):
        r, off = self.locate(gpa, size)
        if off % size:
            raise ValueError(f"gpa {gpa:#x} is not {size}-byte aligned")
        return memoryview(r.mm)[off:off + size].cast(fmt)

    def read_u16(self, gpa: int) -> int:
        with self._scalar(gpa, 2, "H") as v:
            return v[0]

    def write_u16(self, gpa: int, val: int) -> None:
        with self._scalar(gpa, 2, "H") as v:
            v[0] = val & 0xFFFF

    def read_u32(self, gpa: int) -> int:
        with self._scalar(gpa, 4, "I") as v:
            return v[0]

    def write_u32(self, gpa: int, val: int) -> None:
        with self._scalar(gpa, 4, "I") as v:
            v[0] = val & 0xFFFFFFFF

    def read_u64(self, gpa: int) -> int:
        with self._scalar(gpa, 8, "Q") as v:
            return v[0]

    def write_u64(self, gpa: int, val: int) -> None:
        with self._scalar(gpa, 8, "Q") as v:
            v[0] = val & 0xFFFFFFFFFFFFFFFF

    # -- allocator --------------------------------------------------------------------

    def alloc(self, size: int, align: int = 64, region: int | None = None) -> int:
        """Allocate ``size`` bytes (at least 1) aligned to ``align`` (power of two) inside one
        region; returns the gpa.  Contents are not cleared."""
        if size < 0 or align <= 0 or align & (align - 1):
            raise ValueError("bad size or alignment")
        size = max(size, 1)
        if region is not None:
            order = [self.regions[region]]
        elif self.policy == "rr" and len(self.regions) > 1:
            n = len(self.regions)
            start = self._rr
            self._rr = (self._rr + 1) % n
            order = [self.regions[(start + k) % n] for k in range(n)]
        else:
            order = self.regions
        for r in order:
            gpa = self._alloc_in(r, size, align)
            if gpa is not None:
                off = gpa - r.gpa
                self._allocs[gpa] = (r, off, off + size)
                return gpa
        raise MemoryError(f"guest RAM exhausted: cannot allocate {size} bytes "
                          f"(free: {self.free_bytes()} bytes in {self.free_extents()} extents)")

    @staticmethod
    def _alloc_in(r: MemRegion, size: int, align: int) -> int | None:
        fl = r.free
        mask = align - 1
        base = r.gpa
        for i, ext in enumerate(fl):
            s, e = ext
            a = ((base + s + mask) & ~mask) - base
            if a + size <= e:
                pieces = []
                if a > s:
                    pieces.append([s, a])
                if a + size < e:
                    pieces.append([a + size, e])
                fl[i:i + 1] = pieces
                return base + a
        return None

    def alloc_size(self, gpa: int) -> int:
        """Size of the live allocation at ``gpa``."""
        try:
            _r, s, e = self._allocs[gpa]
        except KeyError:
            raise ValueError(f"{gpa:#x} is not an allocation") from None
        return e - s

    def free(self, gpa: int) -> None:
        r, s, e = self._allocs.pop(gpa, (None, 0, 0))
        if r is None:
            raise ValueError(f"double free or bad pointer {gpa:#x}")
        fl = r.free
        i = bisect_left(fl, [s, e])
        # merge with the previous and next free extents
        if i > 0 and fl[i - 1][1] == s:
            i -= 1
            fl[i][1] = e
        else:
            fl.insert(i, [s, e])
        if i + 1 < len(fl) and fl[i + 1][0] == fl[i][1]:
            fl[i][1] = fl[i + 1][1]
            del fl[i + 1]

    def free_bytes(self) -> int:
        return sum(e - s for r in self.regions for s, e in r.free)

    def free_extents(self) -> int:
        return sum(len(r.free) for r in self.regions)

    def allocated(self) -> int:
        """Number of live allocations."""
        return len(self._allocs)

    def close(self) -> None:
        for r in self.regions:
            try:
                r.mm.close()
            except BufferError:
                pass        # a memoryview is still alive; the mapping dies with it
            try:
                os.close(r.fd)
            except OSError:
                pass
        self.regions = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------------------------
# vhost-user connection
# ----------------------------------------------------------------------------------------

class VhostUserMessage(NamedTuple):
    request: int
    flags: int
    payload: bytes
    fds: list

    def u64(self) -> int:
        if len(self.payload) < 8:
            raise ProtocolError(f"{_req_name(self.request)} reply has {len(self.payload)} "
                                "bytes, wanted a u64")
        return _U64.unpack_from(self.payload)[0]


class VhostUserConnection:
    """One vhost-user socket (the frontend's end of it)."""

    def __init__(self, sock: socket.socket, timeout: float | None = 10.0):
        self.sock = sock
        self.timeout = timeout
        sock.settimeout(timeout)
        self.sent: list[int] = []   # requests sent, in order (handy in tests)

    @classmethod
    def connect(cls, path: str, timeout: float = 10.0, connect_timeout: float = 10.0
                ) -> "VhostUserConnection":
        """Connect, retrying while the socket file is absent or not yet listening."""
        deadline = time.monotonic() + connect_timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                s.connect(os.fspath(path))
                return cls(s, timeout)
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.02)
            except BaseException:
                s.close()
                raise

    @staticmethod
    def encode(request: int, payload: bytes = b"", flags: int = VHOST_USER_VERSION,
               size: int | None = None) -> bytes:
        """Header + payload; ``size`` overrides the header's size field (hostile tests)."""
        return _HDR.pack(request, flags, len(payload) if size is None else size) + payload

    @staticmethod
    def decode_header(data: bytes) -> tuple[int, int, int]:
        return _HDR.unpack_from(data)

    def send(self, request: int, payload: bytes = b"", fds: Sequence[int] = (), *,
             need_reply: bool = False, flags: int | None = None) -> None:
        if flags is None:
            flags = VHOST_USER_VERSION | (VHOST_USER_NEED_REPLY if need_reply else 0)
        self.send_raw(self.encode(request, payload, flags), fds)
        self.sent.append(request)

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send bytes as they are, with ``fds`` attached to the first byte."""
        view = memoryview(data)
        if fds:
            n = socket.send_fds(self.sock, [view], list(fds))
            view = view[n:]
        while view:
            n = self.sock.send(view)
            view = view[n:]

    def _recv_exact(self, n: int, fds: list) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            data, got_fds, _flags, _addr = socket.recv_fds(self.sock, n - len(buf), MAX_FDS)
            fds.extend(got_fds)
            if not data:
                raise ConnectionError("backend closed the vhost-user connection")
            buf += data
        return bytes(buf)

    def recv(self) -> VhostUserMessage:
        fds: list[int] = []
        hdr = self._recv_exact(_HDR.size, fds)
        request, flags, size = _HDR.unpack(hdr)
        if size > 4096 + 64:
            raise ProtocolError(f"backend message {request} claims {size} payload bytes")
        payload = self._recv_exact(size, fds) if size else b""
        return VhostUserMessage(request, flags, payload, fds)

    def call(self, request: int, payload: bytes = b"", fds: Sequence[int] = (),
             need_reply: bool = False) -> VhostUserMessage | None:
        """Send a request; wait for its reply if it has one by definition (returned) or if
        ``need_reply`` (the u64 status is checked, None returned)."""
        self.send(request, payload, fds, need_reply=need_reply)
        natural = request in ALWAYS_REPLY
        if not (natural or need_reply):
            return None
        msg = self.recv()
        if msg.request != request:
            for fd in msg.fds:
                os.close(fd)
            raise ProtocolError(f"reply to {_req_name(request)} has request code {msg.request}")
        if msg.flags & VHOST_USER_VERSION_MASK != VHOST_USER_VERSION or not msg.flags & VHOST_USER_REPLY:
            raise ProtocolError(f"reply to {_req_name(request)} has flags {msg.flags:#x}")
        if natural:
            return msg
        status = msg.u64()
        if status:
            raise VhostUserError(request, status)
        return None

    def get_u64(self, request: int) -> int:
        msg = self.call(request)
        assert msg is not None
        return msg.u64()

    def set_u64(self, request: int, value: int, fds: Sequence[int] = (), need_reply=False):
        return self.call(request, _U64.pack(value), fds, need_reply)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


# ----------------------------------------------------------------------------------------
# Split virtqueue, driver side
# ----------------------------------------------------------------------------------------

class Chain:
    """A descriptor chain the driver made available (bookkeeping for its completion)."""

    __slots__ = ("head", "descs", "allocs", "wsegs", "wcap", "copy_limit", "ndesc",
                 "indirect_gpa", "tag")

    def __init__(self, head, descs, allocs, wsegs, wcap, copy_limit, ndesc, indirect_gpa):
        self.head = head
        self.descs = descs
        self.allocs = allocs
        self.wsegs = wsegs
        self.wcap = wcap
        self.copy_limit = copy_limit
        self.ndesc = ndesc
        self.indirect_gpa = indirect_gpa
        self.tag = None

    def __repr__(self):
        return (f"Chain(head={self.head}, ndesc={self.ndesc}, wcap={self.wcap}, "
                f"indirect={self.indirect_gpa is not None})")


class Completion(NamedTuple):
    head: int
    length: int          # used length as the device wrote it
    data: bytes | None   # bytes the device wrote (up to length, wcap and copy_limit)
    chain: Chain


class SplitQueue:
    """The driver side of one split virtqueue.

    Layout (virtio 1.x, split): descriptor table ``16*size`` bytes (align 16); avail ring
    ``flags, idx, ring[size], used_event`` (``6 + 2*size``, align 2); used ring
    ``flags, idx, ring[size]{id u32, len u32}, avail_event`` (``6 + 8*size``, align 4).
    The three parts are separate allocations (in different regions when RAM is split).

    ``event_idx`` / ``indirect`` say what was negotiated; they drive kick suppression,
    ``used_event`` updates and the automatic choice of indirect tables.
    """

    def __init__(self, ram: GuestRam, index: int, size: int = 128, *, event_idx: bool = False,
                 indirect: bool = False, ring_align: int = 64, region: int | None = None):
        if size < 1 or size > 32768 or size & (size - 1):
            raise ValueError("split queue size must be a power of two <= 32768")
        self.ram = ram
        self.index = index
        self.size = size
        self.event_idx = event_idx
        self.indirect = indirect
        dsz, asz, usz = self.ring_sizes(size)
        self.desc_gpa = ram.alloc(dsz, max(16, ring_align), region)
        self.avail_gpa = ram.alloc(asz, max(2, ring_align), region)
        self.used_gpa = ram.alloc(usz, max(4, ring_align), region)
        for g, n in ((self.desc_gpa, dsz), (self.avail_gpa, asz), (self.used_gpa, usz)):
            ram.fill(g, n, 0)
        r, self._doff = ram.locate(self.desc_gpa, dsz)
        self._dmm = r.mm
        r, self._aoff = ram.locate(self.avail_gpa, asz)
        self._amm = r.mm
        r, self._uoff = ram.locate(self.used_gpa, usz)
        self._umm = r.mm
        self._used_event_off = self._aoff + 4 + 2 * size
        self._avail_event_off = self._uoff + 4 + 8 * size
        # 16-bit views for every index/flag/event field: memoryview item access is a single
        # 16-bit load or store, which the device (another process) must never see torn.
        # avail: [0] flags, [1] idx, [2 + i] ring[i], [2 + size] used_event
        # used:  [0] flags, [1] idx, [2 + 4 * size] avail_event
        self._av = memoryview(self._amm)[self._aoff:self._aoff + asz].cast("H")
        self._uv = memoryview(self._umm)[self._uoff:self._uoff + usz].cast("H")
        self._ue_i = 2 + size          # used_event index in _av
        self._ae_i = 2 + 4 * size      # avail_event index in _uv
        flags = os.EFD_NONBLOCK | os.EFD_CLOEXEC
        self.kick_fd = os.eventfd(0, flags)
        self.call_fd = os.eventfd(0, flags)
        self.err_fd = os.eventfd(0, flags)
        self._poller = select.poll()
        self._poller.register(self.call_fd, select.POLLIN)
        self._free: list[int] = list(range(size - 1, -1, -1))
        self.avail_idx = 0          # shadow of avail.idx
        self.last_used = 0          # next used-ring slot to read
        self._added = 0             # entries published since the last kick decision
        self.inflight: dict[int, Chain] = {}
        self.kicks = 0
        self.kicks_suppressed = 0
        self.interrupts = 0
        self.closed = False

    # -- layout ---------------------------------------------------------------------

    @staticmethod
    def ring_sizes(size: int) -> tuple[int, int, int]:
        """(descriptor table, avail ring, used ring) sizes in bytes, with the event fields."""
        return 16 * size, 6 + 2 * size, 6 + 8 * size

    @property
    def num_free(self) -> int:
        return len(self._free)

    def addresses(self) -> tuple[int, int, int]:
        """Ring gpas: (desc, avail, used)."""
        return self.desc_gpa, self.avail_gpa, self.used_gpa

    # -- raw access (hostile tests) --------------------------------------------------

    def write_desc(self, i: int, addr: int, length: int, flags: int = 0, next: int = 0) -> None:
        """Write descriptor ``i`` of the table (any values; i is taken modulo nothing)."""
        _DESC.pack_into(self._dmm, self._doff + 16 * i, addr & (2**64 - 1),
                        length & 0xFFFFFFFF, flags & 0xFFFF, next & 0xFFFF)

    def read_desc(self, i: int) -> tuple[int, int, int, int]:
        return _DESC.unpack_from(self._dmm, self._doff + 16 * i)

    def take_desc(self, n: int = 1) -> list[int]:
        """Take ``n`` descriptor slots off the free list for raw use (return with put_desc)."""
        if len(self._free) < n:
            raise QueueFullError(f"queue {self.index}: {len(self._free)} free, {n} wanted")
        return [self._free.pop() for _ in range(n)]

    def put_desc(self, idxs: Iterable[int]) -> None:
        self._free.extend(idxs)

    def set_avail_ring(self, slot: int, head: int) -> None:
        self._av[2 + slot % self.size] = head & 0xFFFF

    def set_avail_idx(self, idx: int) -> None:
        """Write avail.idx (and the shadow) as is: lets tests jump it arbitrarily."""
        self.avail_idx = idx & 0xFFFF
        self._av[1] = self.avail_idx

    def set_avail_flags(self, flags: int) -> None:
        self._av[0] = flags & 0xFFFF

    def set_used_event(self, v: int) -> None:
        self._av[self._ue_i] = v & 0xFFFF

    @property
    def used_idx(self) -> int:
        return self._uv[1]

    @property
    def used_flags(self) -> int:
        return self._uv[0]

    @property
    def avail_event(self) -> int:
        return self._uv[self._ae_i]

    def used_elem(self, slot: int) -> tuple[int, int]:
        return _USED_ELEM.unpack_from(self._umm, self._uoff + 4 + 8 * (slot % self.size))

    def add_raw(self, head: int, *, tag=None, publish: bool = True) -> None:
        """Publish a head whose descriptors the test wrote itself; completion of ``head`` is
        accepted (and reported) without freeing anything."""
        ch = Chain(head, [], [], [], 2**32, 0, 0, None)
        ch.tag = tag
        self.inflight[head] = ch
        if publish:
            self.publish(head)

    # -- chains ----------------------------------------------------------------------

    def add_chain(self, readable: Sequence = (), writable: Sequence = (), *,
                  indirect: bool | None = None, publish: bool = True, scatter: bool = False,
                  max_seg: int | None = None, copy_limit: int | None = None) -> int:
        """Make a chain available and return its head.

        ``readable`` items: bytes-like (copied into fresh guest memory), ``int`` (a buffer of
        that size, contents undefined) or ``(gpa, len)`` (existing memory, used as is).
        ``writable`` items: ``int`` sizes or ``(gpa, len)``.  Buffers of one direction share
        one allocation unless ``scatter`` (one allocation a segment, spread over regions).
        ``max_seg`` splits any segment into descriptors of at most that many bytes (Linux
        splits data at page size).  ``indirect``: None = use an indirect table when
        negotiated and the chain has more than one descriptor (what Linux does); True/False
        force it.  ``copy_limit`` caps how many written bytes the completion copies out.
        """
        ram = self.ram
        segs: list[tuple[int, int, int]] = []
        allocs: list[int] = []
        wsegs: list[tuple[int, int]] = []
        try:
            self._place(readable, 0, segs, allocs, scatter, data_ok=True)
            self._place(writable, VRING_DESC_F_WRITE, segs, allocs, scatter, data_ok=False)
            if max_seg:
                split = []
                for gpa, ln, fl in segs:
                    if ln > max_seg:
                        for o in range(0, ln, max_seg):
                            split.append((gpa + o, min(max_seg, ln - o), fl))
                    else:
                        split.append((gpa, ln, fl))
                segs = split
            for gpa, ln, fl in segs:
                if fl & VRING_DESC_F_WRITE:
                    wsegs.append((gpa, ln))
            n = len(segs)
            if n == 0:
                raise ValueError("a chain needs at least one descriptor")
            use_ind = (self.indirect and n > 1) if indirect is None else indirect
            if use_ind:
                tbl = ram.alloc(16 * n, 16)
                allocs.append(tbl)
                buf = bytearray(16 * n)
                last = n - 1
                for i, (gpa, ln, fl) in enumerate(segs):
                    if i < last:
                        _DESC.pack_into(buf, 16 * i, gpa, ln, fl | VRING_DESC_F_NEXT, i + 1)
                    else:
                        _DESC.pack_into(buf, 16 * i, gpa, ln, fl, 0)
                ram.write(tbl, buf)
                idxs = self.take_desc(1)
                _DESC.pack_into(self._dmm, self._doff + 16 * idxs[0], tbl, 16 * n,
                                VRING_DESC_F_INDIRECT, 0)
                ind = tbl
            else:
                idxs = self.take_desc(n)
                dmm, doff = self._dmm, self._doff
                last = n - 1
                for i, (gpa, ln, fl) in enumerate(segs):
                    if i < last:
                        _DESC.pack_into(dmm, doff + 16 * idxs[i], gpa, ln,
                                        fl | VRING_DESC_F_NEXT, idxs[i + 1])
                    else:
                        _DESC.pack_into(dmm, doff + 16 * idxs[i], gpa, ln, fl, 0)
                ind = None
        except BaseException:
            for g in allocs:
                ram.free(g)
            raise
        head = idxs[0]
        wcap = sum(ln for _, ln in wsegs)
        self.inflight[head] = Chain(head, idxs, allocs, wsegs, wcap, copy_limit, n, ind)
        if publish:
            self.publish(head)
        return head

    def _place(self, items, wflag, segs, allocs, scatter, data_ok):
        ram = self.ram
        if scatter:
            for it in items:
                if isinstance(it, tuple):
                    segs.append((it[0], it[1], wflag))
                    continue
                if isinstance(it, int):
                    g = ram.alloc(it, 8)
                    allocs.append(g)
                    segs.append((g, it, wflag))
                else:
                    if not data_ok:
                        raise TypeError("writable items are sizes or (gpa, len)")
                    g = ram.alloc(len(it), 8)
                    allocs.append(g)
                    ram.write(g, it)
                    segs.append((g, len(it), wflag))
            return
        total = 0
        for it in items:
            if isinstance(it, tuple):
                continue
            if isinstance(it, int):
                total += it
            elif data_ok:
                total += len(it)
            else:
                raise TypeError("writable items are sizes or (gpa, len)")
        if total:
            base = ram.alloc(total, 64)
            allocs.append(base)
            r, off = ram.locate(base, total)
            mm = r.mm
        pos = 0
        for it in items:
            if isinstance(it, tuple):
                segs.append((it[0], it[1], wflag))
                continue
            if isinstance(it, int):
                n = it
            else:
                n = len(it)
                if n:
                    mm[off + pos:off + pos + n] = it
            segs.append((base + pos if total else 0, n, wflag))
            pos += n

    def publish(self, *heads: int) -> None:
        """Put heads on the avail ring, then advance avail.idx once."""
        av, mask = self._av, self.size - 1
        idx = self.avail_idx
        for h in heads:
            av[2 + (idx & mask)] = h
            idx = (idx + 1) & 0xFFFF
        # x86 keeps stores in program order: ring entries are visible before the index.
        av[1] = idx
        self.avail_idx = idx
        self._added += len(heads)

    def kick(self, force: bool = False) -> bool:
        """Notify the device if it asked to be notified (EVENT_IDX's avail_event, or the
        used ring's NO_NOTIFY flag); returns whether the eventfd was written."""
        if not force:
            memory_fence()
            if self.event_idx:
                new = self.avail_idx
                old = (new - self._added) & 0xFFFF
                ev = self._uv[self._ae_i]
                need = ((new - ev - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
            else:
                need = self._added > 0 and not self._uv[0] & VRING_USED_F_NO_NOTIFY
            self._added = 0
            if not need:
                self.kicks_suppressed += 1
                return False
        self._added = 0
        os.eventfd_write(self.kick_fd, 1)
        self.kicks += 1
        return True

    # -- completions ---------------------------------------------------------------------

    def poll_used(self) -> list[tuple[int, int]]:
        """Read new used elements (id, len) without blocking; updates used_event."""
        umm, uoff, size = self._umm, self._uoff, self.size
        idx = self._uv[1]              # one 16-bit load; elements are read after it
        last = self.last_used
        pending = (idx - last) & 0xFFFF
        if pending == 0:
            return []
        if pending > size:
            raise ProtocolError(f"queue {self.index}: used.idx jumped from {last} to {idx} "
                                f"(more than the queue size {size})")
        out = []
        unpack = _USED_ELEM.unpack_from
        mask = size - 1
        base = uoff + 4
        while last != idx:
            out.append(unpack(umm, base + 8 * (last & mask)))
            last = (last + 1) & 0xFFFF
        self.last_used = last
        if self.event_idx:
            self._av[self._ue_i] = last
        return out

    def complete(self, elems: Iterable[tuple[int, int]]) -> list[Completion]:
        """Turn used elements into completions: validate, copy written data, free chains."""
        out = []
        errors = []
        ram = self.ram
        for head, length in elems:
            ch = self.inflight.pop(head, None)
            if ch is None:
                errors.append(f"used id {head} is not the head of an in-flight chain")
                continue
            if length > ch.wcap:
                errors.append(f"used len {length} for head {head} exceeds the chain's "
                              f"writable capacity {ch.wcap}")
            data = None
            n = min(length, ch.wcap)
            if ch.copy_limit is not None:
                n = min(n, ch.copy_limit)
            if n and ch.wsegs:
                parts = []
                for gpa, ln in ch.wsegs:
                    take = min(ln, n)
                    parts.append(ram.read(gpa, take))
                    n -= take
                    if not n:
                        break
                data = parts[0] if len(parts) == 1 else b"".join(parts)
            self._free.extend(ch.descs)
            for g in ch.allocs:
                ram.free(g)
            out.append(Completion(head, length, data, ch))
        if errors:
            e = ProtocolError(f"queue {self.index}: " + "; ".join(errors))
            e.completions = out  # type: ignore[attr-defined]
            raise e
        return out

    def reap(self) -> list[Completion]:
        """Non-blocking: completions available now."""
        return self.complete(self.poll_used())

    def _drain_call(self) -> bool:
        try:
            os.eventfd_read(self.call_fd)
        except BlockingIOError:
            return False
        self.interrupts += 1
        return True

    def wait(self, timeout: float | None = 10.0, spin: float = 0.0) -> list[Completion]:
        """Block until at least one completion (or raise TimeoutError).  ``spin``: first
        poll the used ring for up to that many seconds before sleeping on the call eventfd
        (keeps this side's wake-up latency out of latency measurements)."""
        now = time.monotonic()
        deadline = None if timeout is None else now + timeout
        spin_until = now + spin if spin else 0.0
        while True:
            elems = self.poll_used()
            if elems:
                return self.complete(elems)
            if spin_until:
                uv = self._uv
                last = self.last_used
                while uv[1] == last and time.monotonic() < spin_until:
                    pass
                spin_until = 0.0
                continue
            if self.event_idx:
                memory_fence()          # used_event store before re-reading used.idx
                if self.used_idx != self.last_used:
                    continue
            if deadline is None:
                ms = -1
            else:
                rem = deadline - time.monotonic()
                if rem <= 0:
                    raise TimeoutError(self._stuck_message(timeout))
                ms = max(1, int(rem * 1000))
            if self._poller.poll(ms):
                self._drain_call()

    def _stuck_message(self, timeout) -> str:
        return (f"queue {self.index}: nothing completed within {timeout}s: "
                f"avail.idx={self.avail_idx} used.idx={self.used_idx} "
                f"last_used={self.last_used} in flight={len(self.inflight)} "
                f"avail_event={self.avail_event} kicks={self.kicks} "
                f"interrupts={self.interrupts}")

    def error_signalled(self) -> bool:
        """True if the backend wrote the SET_VRING_ERR eventfd (counter is reset)."""
        try:
            os.eventfd_read(self.err_fd)
            return True
        except BlockingIOError:
            return False

    def free_rings(self) -> None:
        for g in (self.desc_gpa, self.avail_gpa, self.used_gpa):
            try:
                self.ram.free(g)
            except ValueError:
                pass

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._av.release()
        self._uv.release()
        for fd in (self.kick_fd, self.call_fd, self.err_fd):
            try:
                os.close(fd)
            except OSError:
                pass

    def __repr__(self):
        return (f"SplitQueue({self.index}, size={self.size}, avail={self.avail_idx}, "
                f"last_used={self.last_used}, inflight={len(self.inflight)})")


# ----------------------------------------------------------------------------------------
# VIRTIO shared memory regions (vhost-user SHMEM), QEMU's side
# ----------------------------------------------------------------------------------------

class BackendReq(enum.IntEnum):
    """Backend -> frontend requests on the backend channel (SET_BACKEND_REQ_FD)."""
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8
    SHMEM_MAP = 9
    SHMEM_UNMAP = 10


_SHMEM_CONFIG = struct.Struct("<II8Q")     # nregions, padding, memory_sizes[8]
_SHMEM_MMAP = struct.Struct("<B7xQQQQ")    # shmid, padding, fd_offset, shm_offset, len, flags
SHMEM_MAP_RW = 1                           # _SHMEM_MMAP flags bit 0: read-write, else read-only

_PROT_NONE, _PROT_READ, _PROT_WRITE = 0, 1, 2
_MAP_SHARED, _MAP_PRIVATE, _MAP_FIXED, _MAP_ANONYMOUS, _MAP_NORESERVE = 1, 2, 0x10, 0x20, 0x4000


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def _load_libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.restype = ctypes.c_int
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    for f in (libc.process_vm_readv, libc.process_vm_writev):
        f.restype = ctypes.c_ssize_t
        f.argtypes = [ctypes.c_int, ctypes.POINTER(_IoVec), ctypes.c_ulong,
                      ctypes.POINTER(_IoVec), ctypes.c_ulong, ctypes.c_ulong]
    return libc


_libc = _load_libc()
_MAP_FAILED = ctypes.c_void_p(-1).value


def _mmap(addr, length, prot, flags, fd=-1, offset=0) -> int:
    got = _libc.mmap(addr, length, prot, flags, fd, offset)
    if got is None or got == _MAP_FAILED:
        e = ctypes.get_errno()
        raise OSError(e, f"mmap: {os.strerror(e)}")
    return got


class ShmemMapping(NamedTuple):
    """One file range the backend placed in a shared memory region."""
    offset: int          # in the region
    length: int
    fd_offset: int
    writable: bool
    dev: int             # the mapped file's st_dev / st_ino (which file it is)
    ino: int

    @property
    def end(self) -> int:
        return self.offset + self.length


class ShmemRegion:
    """A VIRTIO shared memory region as QEMU holds it: an address range reserved PROT_NONE,
    into which the backend's SHMEM_MAP places file ranges (MAP_SHARED | MAP_FIXED).

    Reads and writes go through ``process_vm_readv``/``writev`` on our own process, so an
    access to an unmapped page, past the end of a mapped file or (writes) to a read-only
    mapping raises :class:`FrontendError` (EFAULT) where a plain load would kill us."""

    def __init__(self, shmid: int, size: int):
        self.shmid = shmid
        self.size = size
        self.lock = threading.Lock()
        self._starts: list[int] = []                 # sorted mapping offsets
        self._maps: dict[int, ShmemMapping] = {}
        self.base = (_mmap(None, size, _PROT_NONE, _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE)
                     if size else 0)

    def __repr__(self):
        return f"<ShmemRegion {self.shmid} size={self.size:#x} mappings={len(self._maps)}>"

    # -- table ---------------------------------------------------------------------------
    def mappings(self) -> list[ShmemMapping]:
        with self.lock:
            return [self._maps[o] for o in self._starts]

    def mapping_at(self, offset: int) -> ShmemMapping | None:
        with self.lock:
            i = bisect_left(self._starts, offset + 1) - 1
            if i >= 0:
                mp = self._maps[self._starts[i]]
                if mp.offset <= offset < mp.end:
                    return mp
            return None

    def _overlaps(self, offset: int, length: int) -> ShmemMapping | None:
        i = bisect_left(self._starts, offset + 1) - 1
        if i >= 0 and self._maps[self._starts[i]].end > offset:
            return self._maps[self._starts[i]]
        if i + 1 < len(self._starts) and self._starts[i + 1] < offset + length:
            return self._maps[self._starts[i + 1]]
        return None

    def map(self, fd: int, fd_offset: int, offset: int, length: int, writable: bool) -> None:
        """Apply a SHMEM_MAP; raises FrontendError with the reason when the rules refuse it."""
        if not self.size:
            raise FrontendError(f"region {self.shmid} does not exist")
        if length <= 0 or offset % PAGE_SIZE or length % PAGE_SIZE or fd_offset % PAGE_SIZE:
            raise FrontendError(f"map {offset:#x}+{length:#x} from file offset {fd_offset:#x}: "
                                "not page aligned or empty")
        if offset + length > self.size:
            raise FrontendError(f"map {offset:#x}+{length:#x} past the region's end "
                                f"{self.size:#x}")
        if fd_offset + length > 1 << 63:
            raise FrontendError(f"file offset {fd_offset:#x}+{length:#x} overflows")
        st = os.fstat(fd)
        with self.lock:
            old = self._overlaps(offset, length)
            if old is not None:
                raise FrontendError(f"map {offset:#x}+{length:#x} overlaps the mapping "
                                    f"{old.offset:#x}+{old.length:#x}")
            prot = _PROT_READ | (_PROT_WRITE if writable else 0)
            try:
                _mmap(self.base + offset, length, prot, _MAP_SHARED | _MAP_FIXED, fd, fd_offset)
            except OSError as e:
                # A failed MAP_FIXED may have dropped what was there: reserve it again.
                _mmap(self.base + offset, length, _PROT_NONE,
                      _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE | _MAP_FIXED)
                raise FrontendError(f"mmap of the backend's fd failed: {e.strerror}") from None
            self._maps[offset] = ShmemMapping(offset, length, fd_offset, writable,
                                              st.st_dev, st.st_ino)
            self._starts.insert(bisect_left(self._starts, offset), offset)

    def unmap(self, offset: int, length: int) -> None:
        """Apply a SHMEM_UNMAP: it must name exactly one existing mapping."""
        with self.lock:
            mp = self._maps.get(offset)
            if mp is None or mp.length != length:
                raise FrontendError(f"unmap {offset:#x}+{length:#x} is not a whole mapping")
            self._reserve(offset, length)
            del self._maps[offset]
            self._starts.pop(bisect_left(self._starts, offset))

    def _reserve(self, offset: int, length: int) -> None:
        _mmap(self.base + offset, length, _PROT_NONE,
              _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE | _MAP_FIXED)

    def drop_all(self) -> None:
        """Device reset: every mapping goes."""
        with self.lock:
            if self._maps:
                self._reserve(0, self.size)
            self._maps.clear()
            self._starts.clear()

    def release(self) -> None:
        with self.lock:
            if self.base:
                _libc.munmap(self.base, self.size)
                self.base = 0
            self._maps.clear()
            self._starts.clear()

    # -- access ----------------------------------------------------------------------------
    def _span(self, offset: int, n: int) -> int:
        if offset < 0 or n < 0 or offset + n > self.size or not self.base:
            raise FrontendError(f"access {offset:#x}+{n:#x} outside region {self.shmid} "
                                f"({self.size:#x})")
        return self.base + offset

    def readinto(self, offset: int, buf) -> int:
        """Copy from the region into a writable buffer (bytearray, memoryview, mmap)."""
        view = memoryview(buf).cast("B")
        n = len(view)
        addr = self._span(offset, n)
        if not n:
            return 0
        local = _IoVec(ctypes.addressof(ctypes.c_char.from_buffer(view)), n)
        remote = _IoVec(addr, n)
        got = _libc.process_vm_readv(os.getpid(), ctypes.byref(local), 1,
                                     ctypes.byref(remote), 1, 0)
        if got != n:
            raise FrontendError(f"read of {offset:#x}+{n:#x} in region {self.shmid} faulted "
                                f"(not mapped, or past the end of the mapped file)")
        return n

    def read(self, offset: int, n: int) -> bytes:
        buf = bytearray(n)
        self.readinto(offset, buf)
        return bytes(buf)

    def write(self, offset: int, data) -> None:
        view = memoryview(data).cast("B")
        n = len(view)
        addr = self._span(offset, n)
        if not n:
            return
        src = view if not view.readonly else memoryview(bytearray(view))
        local = _IoVec(ctypes.addressof(ctypes.c_char.from_buffer(src)), n)
        remote = _IoVec(addr, n)
        got = _libc.process_vm_writev(os.getpid(), ctypes.byref(local), 1,
                                      ctypes.byref(remote), 1, 0)
        if got != n:
            raise FrontendError(f"write of {offset:#x}+{n:#x} in region {self.shmid} faulted "
                                "(not mapped, read-only, or past the end of the mapped file)")


class ShmemRequest(NamedTuple):
    """A SHMEM_MAP/UNMAP the backend sent, and what this frontend answered."""
    request: int
    shmid: int
    fd_offset: int
    shm_offset: int
    length: int
    flags: int
    accepted: bool | None    # None: not answered (the ``shmem_answer`` hook said "ignore")
    reason: str


# ----------------------------------------------------------------------------------------
# The virtio-fs device as QEMU drives it
# ----------------------------------------------------------------------------------------

class VirtioFsFrontend:
    """Connects to a vhost-user-fs backend and brings the device up as QEMU 7.2 does.

    Queues: 0 = hiprio, 1..num_request_queues = request queues.

    ``use_add_mem_reg``: None = what QEMU does (ADD_MEM_REG a region when
    CONFIGURE_MEM_SLOTS was negotiated, SET_MEM_TABLE otherwise); True/False force it
    (True needs CONFIGURE_MEM_SLOTS negotiated).  ``ack_all``: with REPLY_ACK, set
    need_reply on every request that has no reply of its own (QEMU does it only for the
    memory table and SET_BACKEND_REQ_FD).  ``backend_req``: also ask for BACKEND_REQ and
    BACKEND_SEND_FD and hand the backend a socket (``self.backend_channel``).

    ``shmem``: also ask for SHMEM (with BACKEND_REQ and REPLY_ACK), as a QEMU with the
    vhost-user shared memory series does: GET_SHMEM_CONFIG, reserve each region
    (``self.shmem_regions``), and serve the backend channel in a thread: SHMEM_MAP and
    SHMEM_UNMAP are checked against the rules (:class:`ShmemRegion`), applied, recorded in
    ``self.shmem_log`` and acknowledged.  ``shmem_answer(request: ShmemRequest)`` may return
    "refuse" (answer failure, map nothing) or "ignore" (never answer) to play a bad frontend.
    Every mapping is dropped at :meth:`reset_device` and :meth:`close`.
    """

    def __init__(self, socket_path: str | os.PathLike, *, num_request_queues: int = 1,
                 queue_size: int = 128, event_idx: bool = True, indirect: bool = True,
                 ram: GuestRam | None = None, ram_size: int = 64 << 20,
                 gpa_base: int = 0x100000, ram_regions: int = 1,
                 use_add_mem_reg: bool | None = None,
                 protocol_features: int = DEFAULT_PROTOCOL_FEATURES,
                 backend_req: bool = False, ack_all: bool = False, shmem: bool = False,
                 shmem_answer=None,
                 timeout: float = 10.0, connect_timeout: float = 10.0,
                 start: bool = True, sync_after_start: bool = True):
        self.socket_path = os.fspath(socket_path)
        self.num_request_queues = num_request_queues
        self.nvqs = 1 + num_request_queues
        self.queue_size = queue_size
        self.want_event_idx = event_idx
        self.want_indirect = indirect
        self.want_protocol_features = protocol_features
        if backend_req:
            self.want_protocol_features |= (_bit(ProtoFeature.BACKEND_REQ)
                                            | _bit(ProtoFeature.BACKEND_SEND_FD))
        if shmem:
            self.want_protocol_features |= (_bit(ProtoFeature.SHMEM)
                                            | _bit(ProtoFeature.BACKEND_REQ)
                                            | _bit(ProtoFeature.REPLY_ACK))
        self.shmem_regions: list[ShmemRegion] = []
        self.shmem_log: list[ShmemRequest] = []
        self.shmem_answer = shmem_answer
        self._channel_thread: threading.Thread | None = None
        self.use_add_mem_reg = use_add_mem_reg
        self.ack_all = ack_all
        self.timeout = timeout
        self.sync_after_start = sync_after_start
        self._own_ram = ram is None
        self.ram = ram if ram is not None else GuestRam(ram_size, gpa_base=gpa_base,
                                                        regions=ram_regions)
        self.queues: list[SplitQueue] = []
        self.backend_features = 0
        self.acked_features = 0
        self.backend_protocol_features = 0
        self.protocol_features = 0
        self.max_queues: int | None = None
        self.max_mem_slots: int | None = None
        self.backend_channel: VhostUserConnection | None = None
        self._masked_fds: list[int] = []
        self._backend_regions: set[tuple[int, int, int, int]] = set()
        self.started = False
        self.conn = VhostUserConnection.connect(self.socket_path, timeout, connect_timeout)
        try:
            self.negotiate()
            if start:
                self.start()
        except BaseException:
            self.close()
            raise

    # -- helpers -----------------------------------------------------------------------

    def has_protocol(self, bit: int) -> bool:
        return bool(self.protocol_features & _bit(bit))

    def has_feature(self, bit: int) -> bool:
        return bool(self.acked_features & _bit(bit))

    @property
    def reply_ack(self) -> bool:
        return self.has_protocol(ProtoFeature.REPLY_ACK)

    def _ack(self, force: bool = False) -> bool:
        return self.reply_ack and (force or self.ack_all)

    def call(self, request: int, payload: bytes = b"", fds: Sequence[int] = (),
             need_reply: bool | None = None):
        """Send a request; need_reply None = this frontend's policy (see ``ack_all``)."""
        if need_reply is None:
            need_reply = self._ack() and request not in ALWAYS_REPLY
        return self.conn.call(request, payload, fds, need_reply)

    def _vring_state(self, request: int, index: int, num: int, need_reply=None):
        return self.call(request, _VRING_STATE.pack(index, num), (), need_reply)

    def _vring_fd(self, request: int, index: int, fd: int | None, need_reply=None):
        if fd is None:
            return self.call(request, _U64.pack(index | VRING_NOFD), (), need_reply)
        return self.call(request, _U64.pack(index), (fd,), need_reply)

    # -- bring-up ------------------------------------------------------------------------

    def negotiate(self) -> None:
        """QEMU's vhost_user_backend_init + vhost_dev_init for vhost-user-fs:
        GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM (MQ),
        GET_MAX_MEM_SLOTS (CONFIGURE_MEM_SLOTS), SET_BACKEND_REQ_FD (BACKEND_REQ),
        SET_OWNER, GET_FEATURES, then per queue SET_VRING_CALL (a "masked" eventfd that is
        later replaced) and SET_VRING_ERR."""
        c = self.conn
        self.backend_features = c.get_u64(Req.GET_FEATURES)
        if self.backend_features & _bit(VirtioFeature.PROTOCOL_FEATURES):
            self.backend_protocol_features = c.get_u64(Req.GET_PROTOCOL_FEATURES)
            self.protocol_features = (self.backend_protocol_features
                                      & self.want_protocol_features)
            c.set_u64(Req.SET_PROTOCOL_FEATURES, self.protocol_features)
            if self.has_protocol(ProtoFeature.MQ):
                self.max_queues = c.get_u64(Req.GET_QUEUE_NUM)
                if self.max_queues < self.nvqs:
                    raise FrontendError(f"backend supports {self.max_queues} queues, "
                                        f"{self.nvqs} needed")
            if self.has_protocol(ProtoFeature.CONFIGURE_MEM_SLOTS):
                self.max_mem_slots = c.get_u64(Req.GET_MAX_MEM_SLOTS)
            if self.has_protocol(ProtoFeature.BACKEND_REQ):
                ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    self.call(Req.SET_BACKEND_REQ_FD, b"", (theirs.fileno(),),
                              need_reply=self.reply_ack)
                finally:
                    theirs.close()
                self.backend_channel = VhostUserConnection(ours, None)
        self.call(Req.SET_OWNER)
        self.backend_features = c.get_u64(Req.GET_FEATURES)
        if self.has_protocol(ProtoFeature.SHMEM):
            self._setup_shmem()
        flags = os.EFD_NONBLOCK | os.EFD_CLOEXEC
        for i in range(self.nvqs):
            fd = os.eventfd(0, flags)
            self._masked_fds.append(fd)
            self._vring_fd(Req.SET_VRING_CALL, i, fd)
            efd = os.eventfd(0, flags)
            self._masked_fds.append(efd)
            self._vring_fd(Req.SET_VRING_ERR, i, efd)

    def _setup_shmem(self) -> None:
        """GET_SHMEM_CONFIG, reserve the regions, serve the backend channel."""
        msg = self.conn.call(Req.GET_SHMEM_CONFIG)
        if len(msg.payload) != _SHMEM_CONFIG.size:
            raise ProtocolError(f"GET_SHMEM_CONFIG reply of {len(msg.payload)} bytes")
        n, _pad, *sizes = _SHMEM_CONFIG.unpack(msg.payload)
        if n > len(sizes):
            raise ProtocolError(f"GET_SHMEM_CONFIG claims {n} regions")
        for i in range(n):
            if sizes[i] % PAGE_SIZE:
                raise ProtocolError(f"shared memory region {i} of {sizes[i]:#x} bytes")
            self.shmem_regions.append(ShmemRegion(i, sizes[i]))
        if self.backend_channel is not None:
            self._channel_thread = threading.Thread(target=self._serve_backend_channel,
                                                    name="backend-channel", daemon=True)
            self._channel_thread.start()

    def _serve_backend_channel(self) -> None:
        ch = self.backend_channel
        while True:
            try:
                msg = ch.recv()
            except (OSError, ConnectionError, ProtocolError):
                return
            try:
                reply = self._backend_request(msg)
            finally:
                for fd in msg.fds:
                    os.close(fd)
            if reply is not None and msg.flags & VHOST_USER_NEED_REPLY:
                try:
                    ch.send(msg.request, _U64.pack(0 if reply else 1),
                            flags=VHOST_USER_VERSION | VHOST_USER_REPLY)
                except OSError:
                    return

    def _backend_request(self, msg: VhostUserMessage) -> bool | None:
        """Handle one backend request: True/False = success/failure, None = no answer."""
        if msg.request not in (BackendReq.SHMEM_MAP, BackendReq.SHMEM_UNMAP):
            return False
        if len(msg.payload) != _SHMEM_MMAP.size:
            self.shmem_log.append(ShmemRequest(msg.request, -1, 0, 0, 0, 0, False,
                                               f"payload of {len(msg.payload)} bytes"))
            return False
        shmid, fd_off, shm_off, length, flags = _SHMEM_MMAP.unpack(msg.payload)
        rec = ShmemRequest(msg.request, shmid, fd_off, shm_off, length, flags, True, "")
        answer = self.shmem_answer(rec) if self.shmem_answer is not None else None
        if answer == "ignore":
            self.shmem_log.append(rec._replace(accepted=None, reason="ignored"))
            return None
        if answer == "refuse":
            self.shmem_log.append(rec._replace(accepted=False, reason="refused by the test"))
            return False
        try:
            if not 0 <= shmid < len(self.shmem_regions):
                raise FrontendError(f"no shared memory region {shmid}")
            region = self.shmem_regions[shmid]
            if msg.request == BackendReq.SHMEM_MAP:
                if len(msg.fds) != 1:
                    raise FrontendError(f"SHMEM_MAP with {len(msg.fds)} fds")
                if flags & ~SHMEM_MAP_RW:
                    raise FrontendError(f"unknown map flags {flags:#x}")
                region.map(msg.fds[0], fd_off, shm_off, length, bool(flags & SHMEM_MAP_RW))
            else:
                region.unmap(shm_off, length)
        except FrontendError as e:
            self.shmem_log.append(rec._replace(accepted=False, reason=str(e)))
            return False
        self.shmem_log.append(rec)
        return True

    def _drop_shmem_mappings(self) -> None:
        for r in self.shmem_regions:
            r.drop_all()

    def _wanted_features(self) -> int:
        want = _bit(VirtioFeature.VERSION_1)
        if self.want_event_idx:
            want |= _bit(VirtioFeature.EVENT_IDX)
        if self.want_indirect:
            want |= _bit(VirtioFeature.INDIRECT_DESC)
        return want

    def start(self) -> None:
        """QEMU's vhost_user_fs_start: per queue SET_VRING_CALL (the guest notifier),
        SET_FEATURES, SET_MEM_TABLE (or ADD_MEM_REG a region), per queue SET_VRING_NUM,
        SET_VRING_BASE, SET_VRING_ADDR, SET_VRING_KICK, then per queue SET_VRING_ENABLE 1
        (with PROTOCOL_FEATURES), then per queue SET_VRING_CALL again (unmask); then a
        GET_FEATURES round trip so everything is processed before the first kick."""
        if self.started:
            raise FrontendError("already started")
        self._drop_queues()                      # rings of an earlier start, if any
        acked = self._wanted_features() & self.backend_features
        if not acked & _bit(VirtioFeature.VERSION_1):
            raise FrontendError("backend does not offer VIRTIO_F_VERSION_1")
        self.acked_features = acked
        ev = bool(acked & _bit(VirtioFeature.EVENT_IDX))
        ind = bool(acked & _bit(VirtioFeature.INDIRECT_DESC))
        self.queues = [SplitQueue(self.ram, i, self.queue_size, event_idx=ev, indirect=ind)
                       for i in range(self.nvqs)]
        for q in self.queues:
            self._vring_fd(Req.SET_VRING_CALL, q.index, q.call_fd)
        value = acked | (self.backend_features & _bit(VirtioFeature.PROTOCOL_FEATURES))
        self.conn.set_u64(Req.SET_FEATURES, value, need_reply=self._ack())
        self.set_mem_table()
        for q in self.queues:
            self.setup_vring(q)
        if self.backend_features & _bit(VirtioFeature.PROTOCOL_FEATURES):
            for q in self.queues:
                self.set_vring_enable(q.index, True)
        for q in self.queues:
            self._vring_fd(Req.SET_VRING_CALL, q.index, q.call_fd)
        if self.sync_after_start:
            self.sync()
        self.started = True

    def set_mem_table(self) -> None:
        use_add = self.use_add_mem_reg
        if use_add is None:
            use_add = self.has_protocol(ProtoFeature.CONFIGURE_MEM_SLOTS)
        if use_add:
            # Like QEMU's shadow table: only regions the backend does not hold yet
            # (the backend keeps its regions across RESET_DEVICE).
            for r in self.ram.regions:
                if r.table_entry() not in self._backend_regions:
                    self.add_mem_region(r)
        else:
            payload = _MEM_HDR.pack(len(self.ram.regions), 0) + b"".join(
                _MEM_REGION.pack(*r.table_entry()) for r in self.ram.regions)
            self.call(Req.SET_MEM_TABLE, payload, self.ram.fds, need_reply=self.reply_ack)
            self._backend_regions = {r.table_entry() for r in self.ram.regions}

    def add_mem_region(self, r: MemRegion) -> None:
        self.call(Req.ADD_MEM_REG, _SINGLE_MEM_REGION.pack(0, *r.table_entry()), (r.fd,),
                  need_reply=self.reply_ack)
        self._backend_regions.add(r.table_entry())

    def remove_mem_region(self, r: MemRegion) -> None:
        # QEMU sends the fd along with REM_MEM_REG too.
        self.call(Req.REM_MEM_REG, _SINGLE_MEM_REGION.pack(0, *r.table_entry()), (r.fd,),
                  need_reply=self.reply_ack)
        self._backend_regions.discard(r.table_entry())

    def setup_vring(self, q: SplitQueue, base: int = 0) -> None:
        self._vring_state(Req.SET_VRING_NUM, q.index, q.size)
        self._vring_state(Req.SET_VRING_BASE, q.index, base)
        ram = self.ram
        self.call(Req.SET_VRING_ADDR, _VRING_ADDR.pack(
            q.index, 0, ram.uaddr(q.desc_gpa), ram.uaddr(q.used_gpa),
            ram.uaddr(q.avail_gpa), 0))
        self._vring_fd(Req.SET_VRING_KICK, q.index, q.kick_fd)

    def set_vring_enable(self, index: int, enable: bool, need_reply=None) -> None:
        self._vring_state(Req.SET_VRING_ENABLE, index, 1 if enable else 0, need_reply)

    def sync(self) -> None:
        """A round trip (GET_FEATURES) so every earlier message has been processed."""
        self.conn.get_u64(Req.GET_FEATURES)

    # -- run time ------------------------------------------------------------------------

    def stop_queue(self, index: int, disable: bool = True) -> int:
        """Stop a ring as QEMU 7.2's vhost_dev_stop does (SET_VRING_ENABLE 0 first when
        protocol features are on, unless ``disable`` is False) and return GET_VRING_BASE's
        answer: the next avail index the backend would have processed."""
        if disable and self.backend_features & _bit(VirtioFeature.PROTOCOL_FEATURES):
            self.set_vring_enable(index, False)
        msg = self._vring_state(Req.GET_VRING_BASE, index, 0)
        if len(msg.payload) < 8:
            raise ProtocolError(f"GET_VRING_BASE reply has {len(msg.payload)} bytes")
        qi, num = _VRING_STATE.unpack_from(msg.payload)
        if qi != index:
            raise ProtocolError(f"GET_VRING_BASE reply is for ring {qi}, asked {index}")
        return num

    def stop(self) -> list[int]:
        """Stop every ring (QEMU's vhost_dev_stop); returns the avail indices."""
        bases = [self.stop_queue(q.index) for q in self.queues]
        self.started = False
        return bases

    def reset_device(self) -> None:
        """RESET_DEVICE if negotiated, else RESET_OWNER; forgets the queues (call
        :meth:`start` again to bring the device back)."""
        if self.has_protocol(ProtoFeature.RESET_DEVICE):
            self.call(Req.RESET_DEVICE)
        else:
            self.call(Req.RESET_OWNER)
        self._drop_shmem_mappings()
        self._drop_queues()
        self.started = False

    def _drop_queues(self) -> None:
        for q in self.queues:
            q.close()
            q.free_rings()
        self.queues = []

    def close(self) -> None:
        """Disconnect (the backend should notice EOF) and free everything."""
        conn = getattr(self, "conn", None)
        if conn is not None:
            conn.close()
        if self.backend_channel is not None:
            try:
                self.backend_channel.sock.shutdown(socket.SHUT_RDWR)  # wakes the thread
            except OSError:
                pass
            if self._channel_thread is not None:
                self._channel_thread.join(10)
            self.backend_channel.close()
        for r in self.shmem_regions:
            r.release()
        for q in self.queues:
            q.close()
        for fd in self._masked_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._masked_fds = []
        if self._own_ram:
            self.ram.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------------------------
# FUSE
# ----------------------------------------------------------------------------------------

class Op(enum.IntEnum):
    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51
    STATX = 52
    COPY_FILE_RANGE_64 = 53


def _op_name(op: int) -> str:
    try:
        return Op(op).name
    except ValueError:
        return f"opcode {op}"


#: Requests that travel on the hiprio queue and get no reply.
NOREPLY_OPS = frozenset({Op.FORGET, Op.BATCH_FORGET, Op.INTERRUPT})

FUSE_ROOT_ID = 1

# init flags (fuse_init_in.flags | flags2 << 32)
FUSE_ASYNC_READ = 1 << 0
FUSE_POSIX_LOCKS = 1 << 1
FUSE_ATOMIC_O_TRUNC = 1 << 3
FUSE_EXPORT_SUPPORT = 1 << 4
FUSE_BIG_WRITES = 1 << 5
FUSE_DONT_MASK = 1 << 6
FUSE_FLOCK_LOCKS = 1 << 10
FUSE_HAS_IOCTL_DIR = 1 << 11
FUSE_AUTO_INVAL_DATA = 1 << 12
FUSE_DO_READDIRPLUS = 1 << 13
FUSE_READDIRPLUS_AUTO = 1 << 14
FUSE_ASYNC_DIO = 1 << 15
FUSE_WRITEBACK_CACHE = 1 << 16
FUSE_NO_OPEN_SUPPORT = 1 << 17
FUSE_PARALLEL_DIROPS = 1 << 18
FUSE_HANDLE_KILLPRIV = 1 << 19
FUSE_POSIX_ACL = 1 << 20
FUSE_MAX_PAGES = 1 << 22
FUSE_CACHE_SYMLINKS = 1 << 23
FUSE_MAP_ALIGNMENT = 1 << 26
FUSE_SUBMOUNTS = 1 << 27
FUSE_HANDLE_KILLPRIV_V2 = 1 << 28
FUSE_SETXATTR_EXT = 1 << 29
FUSE_INIT_EXT = 1 << 30
FUSE_SECURITY_CTX = 1 << 32
FUSE_HAS_INODE_DAX = 1 << 33
FUSE_CREATE_SUPP_GROUP = 1 << 34
FUSE_EXT_GROUPS = 32  # request extension type: struct fuse_supp_groups
FUSE_ALLOW_IDMAP = 1 << 40
FUSE_INVALID_UIDGID = 0xFFFFFFFF  # the ids Linux sends once ALLOW_IDMAP is on, but on creations
FUSE_HAS_EXPIRE_ONLY = 1 << 35

#: What a Linux 6.1.192 guest sends in FUSE_INIT (measured: flags 0x7bfffffb, flags2 0xb).
LINUX_6_1_INIT_FLAGS = 0x0000000B7BFFFFFB
LINUX_MAX_READAHEAD = 128 * 1024

# setattr valid bits
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_LOCKOWNER = 1 << 9
FATTR_CTIME = 1 << 10
FATTR_KILL_SUIDGID = 1 << 11

FUSE_GETATTR_FH = 1
FUSE_LK_FLOCK = 1
FUSE_WRITE_LOCKOWNER = 1 << 1
FUSE_READ_LOCKOWNER = 1 << 1
FUSE_RELEASE_FLUSH = 1
FUSE_FSYNC_FDATASYNC = 1
FUSE_SETUPMAPPING_FLAG_WRITE = 1
FUSE_SETUPMAPPING_FLAG_READ = 2

# wire structs (include/uapi/linux/fuse.h, little-endian)
IN_HEADER = struct.Struct("<IIQQIIIHH")          # 40
OUT_HEADER = struct.Struct("<IiQ")               # 16
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")        # 88
ENTRY_OUT_HEAD = struct.Struct("<QQQQII")        # 40 (+ attr = 128)
ATTR_OUT_HEAD = struct.Struct("<QII")            # 16 (+ attr = 104)
INIT_IN = struct.Struct("<IIIII44x")             # 64
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")      # 64
OPEN_IN = struct.Struct("<II")
CREATE_IN = struct.Struct("<IIII")
OPEN_OUT = struct.Struct("<QII")                 # 16
READ_IN = struct.Struct("<QQIIQII")              # 40
WRITE_IN = struct.Struct("<QQIIQII")             # 40
WRITE_OUT = struct.Struct("<II")
RELEASE_IN = struct.Struct("<QIIQ")              # 24
FLUSH_IN = struct.Struct("<QIIQ")                # 24
FSYNC_IN = struct.Struct("<QII")                 # 16
GETATTR_IN = struct.Struct("<IIQ")               # 16
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")  # 88
MKNOD_IN = struct.Struct("<IIII")
MKDIR_IN = struct.Struct("<II")
RENAME_IN = struct.Struct("<Q")
RENAME2_IN = struct.Struct("<QII")
LINK_IN = struct.Struct("<Q")
STATFS_OUT = struct.Struct("<QQQQQIII28x")       # 80 (padding + spare[6] skipped)
SETXATTR_IN = struct.Struct("<IIII")             # 16 with FUSE_SETXATTR_EXT
SETXATTR_IN_COMPAT = struct.Struct("<II")        # 8
GETXATTR_IN = struct.Struct("<II")
GETXATTR_OUT = struct.Struct("<II")
LK_IN = struct.Struct("<QQQQIIII")               # 48
LK_OUT = struct.Struct("<QQII")                  # 24
ACCESS_IN = struct.Struct("<II")
FORGET_IN = struct.Struct("<Q")
FORGET_ONE = struct.Struct("<QQ")
BATCH_FORGET_IN = struct.Struct("<II")
INTERRUPT_IN = struct.Struct("<Q")
FALLOCATE_IN = struct.Struct("<QQQII")           # 32
LSEEK_IN = struct.Struct("<QQII")                # 24
LSEEK_OUT = struct.Struct("<Q")
COPY_FILE_RANGE_IN = struct.Struct("<QQQQQQQ")   # 56
SYNCFS_IN = struct.Struct("<Q")
DIRENT = struct.Struct("<QQII")                  # 24 + name, padded to 8
SETUPMAPPING_IN = struct.Struct("<QQQQQ")        # 40
REMOVEMAPPING_IN = struct.Struct("<I")
REMOVEMAPPING_ONE = struct.Struct("<QQ")
SECCTX_HEADER = struct.Struct("<II")             # size, nr_secctx
ENTRY_OUT_SIZE = ENTRY_OUT_HEAD.size + ATTR.size
ATTR_OUT_SIZE = ATTR_OUT_HEAD.size + ATTR.size

assert IN_HEADER.size == 40 and OUT_HEADER.size == 16 and ATTR.size == 88
assert ENTRY_OUT_SIZE == 128 and ATTR_OUT_SIZE == 104
assert INIT_IN.size == 64 and INIT_OUT.size == 64 and READ_IN.size == 40
assert SETATTR_IN.size == 88 and STATFS_OUT.size == 80 and LK_IN.size == 48
assert COPY_FILE_RANGE_IN.size == 56 and FALLOCATE_IN.size == 32


class Attr(NamedTuple):
    ino: int
    size: int
    blocks: int
    atime: int
    mtime: int
    ctime: int
    atimensec: int
    mtimensec: int
    ctimensec: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    blksize: int
    flags: int


class EntryOut(NamedTuple):
    nodeid: int
    generation: int
    entry_valid: int
    attr_valid: int
    entry_valid_nsec: int
    attr_valid_nsec: int
    attr: Attr


class AttrOut(NamedTuple):
    attr_valid: int
    attr_valid_nsec: int
    attr: Attr


class InitOut(NamedTuple):
    major: int
    minor: int
    max_readahead: int
    flags: int            # flags | flags2 << 32 (flags2 only when INIT_EXT came back)
    max_background: int
    congestion_threshold: int
    max_write: int
    time_gran: int
    max_pages: int
    map_alignment: int
    raw_flags: int
    raw_flags2: int
    length: int           # bytes of reply payload


class OpenOut(NamedTuple):
    fh: int
    open_flags: int
    padding: int


class StatfsOut(NamedTuple):
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    bsize: int
    namelen: int
    frsize: int


class Dirent(NamedTuple):
    ino: int
    off: int
    type: int
    name: bytes


class DirentPlus(NamedTuple):
    entry: EntryOut
    dirent: Dirent


class FileLock(NamedTuple):
    start: int
    end: int
    type: int
    pid: int


class Reply(NamedTuple):
    unique: int
    error: int            # positive errno, 0 for success
    data: bytes           # payload after the out header
    used_len: int
    opcode: int

    def check(self) -> "Reply":
        if self.error:
            raise FuseError(self.error, self.opcode)
        return self


def parse_attr(data, off: int = 0) -> Attr:
    return Attr._make(ATTR.unpack_from(data, off))


def parse_entry(data, off: int = 0) -> EntryOut:
    h = ENTRY_OUT_HEAD.unpack_from(data, off)
    return EntryOut(*h, parse_attr(data, off + ENTRY_OUT_HEAD.size))


def parse_attr_out(data, off: int = 0) -> AttrOut:
    a, ns, _ = ATTR_OUT_HEAD.unpack_from(data, off)
    return AttrOut(a, ns, parse_attr(data, off + ATTR_OUT_HEAD.size))


def parse_init_out(data) -> InitOut:
    n = len(data)
    buf = bytes(data[:INIT_OUT.size]).ljust(INIT_OUT.size, b"\0")
    (major, minor, ra, flags, maxbg, cong, max_write, time_gran, max_pages, map_align,
     flags2) = INIT_OUT.unpack(buf)
    full = flags | ((flags2 << 32) if flags & FUSE_INIT_EXT else 0)
    return InitOut(major, minor, ra, full, maxbg, cong, max_write, time_gran, max_pages,
                   map_align, flags, flags2, n)


def _fuse_rec_align(n: int) -> int:
    return (n + 7) & ~7


def parse_dirents(data) -> list[Dirent]:
    out = []
    off = 0
    n = len(data)
    while off + DIRENT.size <= n:
        ino, doff, namelen, typ = DIRENT.unpack_from(data, off)
        start = off + DIRENT.size
        if start + namelen > n:
            raise ProtocolError(f"dirent at {off} has a name running past the reply")
        out.append(Dirent(ino, doff, typ, bytes(data[start:start + namelen])))
        off += _fuse_rec_align(DIRENT.size + namelen)
    if off < n and n - off >= DIRENT.size:
        raise ProtocolError("trailing bytes in readdir reply")
    return out


def parse_direntplus(data) -> list[DirentPlus]:
    out = []
    off = 0
    n = len(data)
    while off + ENTRY_OUT_SIZE + DIRENT.size <= n:
        entry = parse_entry(data, off)
        doff_ = off + ENTRY_OUT_SIZE
        ino, doff, namelen, typ = DIRENT.unpack_from(data, doff_)
        start = doff_ + DIRENT.size
        if start + namelen > n:
            raise ProtocolError(f"direntplus at {off} has a name running past the reply")
        out.append(DirentPlus(entry, Dirent(ino, doff, typ, bytes(data[start:start + namelen]))))
        off += ENTRY_OUT_SIZE + _fuse_rec_align(DIRENT.size + namelen)
    return out


def _name(s) -> bytes:
    b = os.fsencode(s)
    return b + b"\0"


def _time_split(t) -> tuple[int, int]:
    if isinstance(t, tuple):
        return int(t[0]), int(t[1])
    if isinstance(t, int):
        return t, 0
    sec = int(t // 1)
    return sec, int(round((t - sec) * 1e9))


_DEFAULT = object()


class _Pending:
    __slots__ = ("unique", "queue", "head", "opcode", "noreply", "submitted")

    def __init__(self, unique, queue, head, opcode, noreply):
        self.unique = unique
        self.queue = queue
        self.head = head
        self.opcode = opcode
        self.noreply = noreply
        self.submitted = time.monotonic()


class FuseClient:
    """FUSE over a :class:`VirtioFsFrontend`, laid out as a Linux 6.1 guest does it.

    Request chain: device-readable ``[in header][arg]...[extension]`` then device-writable
    ``[out header (16)][reply arg]...``; segments longer than ``seg_size`` are split into
    ``seg_size`` descriptors (pages); an indirect table is used whenever INDIRECT_DESC was
    negotiated (``indirect=None``).  FORGET/BATCH_FORGET/INTERRUPT go on the hiprio queue as
    one readable descriptor and nothing writable.

    Every reply is checked: used length >= 16, out header ``len`` == used length,
    ``unique`` matches, error in [-4095, 0], error replies carry no payload; violations
    raise :class:`ProtocolError` (``strict=False`` to only record them in ``violations``).
    """

    def __init__(self, frontend: VirtioFsFrontend, *, uid: int | None = None,
                 gid: int | None = None, pid: int | None = None, timeout: float = 10.0,
                 seg_size: int | None = PAGE_SIZE, indirect: bool | None = None,
                 scatter: bool = False, request_queue: int | None = None,
                 strict: bool = True, spin: float = 0.0):
        if not frontend.queues:
            raise FrontendError("frontend is not started")
        self.fe = frontend
        self.ram = frontend.ram
        self.uid = os.getuid() if uid is None else uid
        self.gid = os.getgid() if gid is None else gid
        self.pid = os.getpid() if pid is None else pid
        self.timeout = timeout
        self.seg_size = seg_size
        self.indirect = indirect
        self.scatter = scatter
        self.request_queue = request_queue
        self.strict = strict
        self.spin = spin                # seconds to busy-poll a queue before sleeping
        self.violations: list[str] = []
        self._rr = 0
        self._unique = 0
        self._pending: dict[int, _Pending] = {}
        self._by_head: dict[tuple[int, int], int] = {}
        self._done: dict[int, Reply | Exception] = {}
        self.init_out: InitOut | None = None
        self.proto_minor = 38
        self.max_write = 128 * 1024
        self.max_read = 128 * 1024
        self.negotiated = 0
        self.send_secctx: bool | None = None   # None: when SECURITY_CTX was negotiated
        # sent with creating requests once CREATE_SUPP_GROUP is negotiated, as Linux sends the
        # parent directory's group when the caller is a member but it is not its fsgid
        self.supp_groups: Sequence[int] = ()

    @classmethod
    def connect(cls, socket_path, *, init: bool = True, client_kwargs: dict | None = None,
                **frontend_kwargs) -> "FuseClient":
        fe = VirtioFsFrontend(socket_path, **frontend_kwargs)
        try:
            c = cls(fe, **(client_kwargs or {}))
            if init:
                c.init()
        except BaseException:
            fe.close()
            raise
        return c

    def close(self) -> None:
        self.fe.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def hiprio(self) -> SplitQueue:
        return self.fe.queues[0]

    def _pick_queue(self, opcode: int) -> SplitQueue:
        qs = self.fe.queues
        if opcode in NOREPLY_OPS:
            return qs[0]
        if self.request_queue is not None:
            return qs[self.request_queue]
        n = len(qs) - 1
        q = qs[1 + self._rr % n]
        self._rr += 1
        return q

    def next_unique(self) -> int:
        self._unique += 2          # Linux steps by 2 (bit 0 marks interrupts)
        return self._unique

    # -- generic submit / wait ----------------------------------------------------------

    def submit(self, opcode: int, nodeid: int = 0, args: Sequence = (),
               out_sizes: Sequence[int] = (), *, queue: int | SplitQueue | None = None,
               unique: int | None = None, uid: int | None = None, gid: int | None = None,
               pid: int | None = None, ext: bytes = b"", hdr_len: int | None = None,
               total_extlen: int | None = None, noreply: bool | None = None,
               kick: bool = True, copy_limit: int | None = None, seg_size=_DEFAULT,
               indirect=_DEFAULT, merge: bool | None = None,
               scatter: bool | None = None) -> int:
        """Queue one request and return its unique.  ``args`` are the in arguments (each its
        own descriptor unless ``merge``); ``out_sizes`` the reply argument sizes (after the
        16-byte out header).  ``hdr_len``/``total_extlen``/``unique`` override header fields
        (hostile tests).  ``kick=False`` defers the notification (see :meth:`kick_all`)."""
        if noreply is None:
            noreply = opcode in NOREPLY_OPS
        if isinstance(queue, SplitQueue):
            q = queue
        elif queue is None:
            q = self._pick_queue(opcode)
        else:
            q = self.fe.queues[queue]
        if unique is None:
            unique = self.next_unique()
        if unique in self._pending:
            raise FrontendError(f"unique {unique} is already in flight")
        body = sum(a if isinstance(a, int) else len(a) for a in args) + len(ext)
        hdr = IN_HEADER.pack(
            IN_HEADER.size + body if hdr_len is None else hdr_len, opcode,
            unique, nodeid, self.uid if uid is None else uid, self.gid if gid is None else gid,
            self.pid if pid is None else pid,
            (len(ext) // 8) if total_extlen is None else total_extlen, 0)
        if merge is None:
            merge = opcode in NOREPLY_OPS
        if merge:
            readable = [hdr + b"".join(args) + ext]
        else:
            readable = [hdr, *args]
            if ext:
                readable.append(ext)
        writable = [] if noreply else [OUT_HEADER.size, *out_sizes]
        head = q.add_chain(
            readable, writable,
            indirect=self.indirect if indirect is _DEFAULT else indirect,
            max_seg=self.seg_size if seg_size is _DEFAULT else seg_size,
            scatter=self.scatter if scatter is None else scatter,
            copy_limit=copy_limit)
        self._pending[unique] = _Pending(unique, q, head, opcode, noreply)
        self._by_head[(q.index, head)] = unique
        if kick:
            q.kick()
        return unique

    def kick_all(self) -> None:
        """Kick every queue that has unannounced requests (after ``submit(kick=False)``)."""
        for q in self.fe.queues:
            if q._added:
                q.kick()

    def _violation(self, msg: str):
        self.violations.append(msg)
        return ProtocolError(msg) if self.strict else None

    def _absorb(self, q: SplitQueue, comps: list[Completion]) -> None:
        for c in comps:
            u = self._by_head.pop((q.index, c.head), None)
            if u is None:
                continue
            p = self._pending.pop(u)
            if p.noreply:
                err = None
                if c.length != 0:
                    err = self._violation(f"{_op_name(p.opcode)} (no reply) completed with "
                                          f"used len {c.length}, expected 0")
                self._done[u] = err or Reply(u, 0, b"", c.length, p.opcode)
                continue
            data = c.data or b""
            if c.length < OUT_HEADER.size or len(data) < OUT_HEADER.size:
                self._done[u] = self._violation(
                    f"{_op_name(p.opcode)} unique {u}: used len {c.length} is shorter than "
                    "the out header") or Reply(u, _errno.EIO, b"", c.length, p.opcode)
                continue
            ln, error, runique = OUT_HEADER.unpack_from(data)
            problems = []
            if ln != c.length:
                problems.append(f"out header len {ln} != used len {c.length}")
            if runique != u:
                problems.append(f"out header unique {runique} != {u}")
            if error > 0 or error < -4095:
                problems.append(f"error {error} is not a negative errno")
            elif error and ln != OUT_HEADER.size:
                problems.append(f"error reply ({error}) carries {ln - 16} payload bytes")
            err = None
            if problems:
                err = self._violation(f"{_op_name(p.opcode)} unique {u}: " + "; ".join(problems))
            self._done[u] = err or Reply(u, -error if error < 0 else 0, data[OUT_HEADER.size:],
                                         c.length, p.opcode)

    def _collect(self, q: SplitQueue, timeout: float | None) -> None:
        try:
            comps = q.wait(timeout, self.spin)
        except ProtocolError as e:
            comps = getattr(e, "completions", [])
            self._absorb(q, comps)
            raise
        self._absorb(q, comps)

    def wait(self, unique: int, timeout: float | None = None) -> Reply:
        """Wait for one request's reply (raises ProtocolError for a malformed one)."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while unique not in self._done:
            p = self._pending.get(unique)
            if p is None:
                raise FrontendError(f"unique {unique} was never submitted (or already waited)")
            rem = deadline - time.monotonic()
            if rem <= 0:
                raise TimeoutError(f"{_op_name(p.opcode)} unique {unique}: no reply within "
                                   f"{timeout}s; {p.queue._stuck_message(timeout)}")
            try:
                self._collect(p.queue, rem)
            except TimeoutError:
                if unique in self._done:
                    break
                raise TimeoutError(f"{_op_name(p.opcode)} unique {unique}: no reply within "
                                   f"{timeout}s; {p.queue._stuck_message(timeout)}") from None
        r = self._done.pop(unique)
        if isinstance(r, Exception):
            raise r
        return r

    def poll_completions(self, timeout: float | None = 0.0) -> list[int]:
        """Reap whatever completed (waiting up to ``timeout`` for the first if nothing has);
        returns the uniques now ready for :meth:`wait` (which then does not block)."""
        queues = {p.queue.index: p.queue for p in self._pending.values()}
        before = set(self._done)
        for q in queues.values():
            self._absorb(q, q.reap())
        if len(self._done) == len(before) and queues and timeout != 0:
            poller = select.poll()
            for q in queues.values():
                poller.register(q.call_fd, select.POLLIN)
            deadline = None if timeout is None else time.monotonic() + timeout
            while len(self._done) == len(before):
                ms = -1 if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
                ready = poller.poll(ms)
                for q in queues.values():
                    q._drain_call()
                    self._absorb(q, q.reap())
                if not ready and deadline is not None and time.monotonic() >= deadline:
                    break
        return [u for u in self._done if u not in before]

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def request(self, opcode: int, nodeid: int = 0, args: Sequence = (),
                out_sizes: Sequence[int] = (), *, timeout: float | None = None, **kw) -> Reply:
        """submit + wait; raises FuseError on an error reply."""
        u = self.submit(opcode, nodeid, args, out_sizes, **kw)
        return self.wait(u, timeout).check()

    def raw_request(self, opcode: int, nodeid: int = 0, body: bytes = b"",
                    reply_size: int = 4096, *, timeout: float | None = None, **kw) -> Reply:
        """One request with ``body`` as a single argument and ``reply_size`` writable bytes
        after the out header; returns the Reply without raising for FUSE errors."""
        args = [body] if body else []
        outs = [reply_size] if reply_size else []
        u = self.submit(opcode, nodeid, args, outs, **kw)
        return self.wait(u, timeout)

    # -- extensions ------------------------------------------------------------------------

    def _create_ext(self) -> bytes:
        """The extensions Linux sends with CREATE, MKDIR, MKNOD and SYMLINK."""
        ext = self._secctx_ext()
        if self.supp_groups and self.negotiated & FUSE_CREATE_SUPP_GROUP:
            body = struct.pack(f"<I{len(self.supp_groups)}I", len(self.supp_groups),
                               *self.supp_groups)
            body += bytes(-len(body) % 8)
            ext += SECCTX_HEADER.pack(SECCTX_HEADER.size + len(body), FUSE_EXT_GROUPS) + body
        return ext

    def _secctx_ext(self) -> bytes:
        send = self.send_secctx
        if send is None:
            send = bool(self.negotiated & FUSE_SECURITY_CTX)
        # Linux with no LSM providing a context: a bare header, nr_secctx 0.
        return SECCTX_HEADER.pack(SECCTX_HEADER.size, 0) if send else b""

    # -- operations ------------------------------------------------------------------------

    def init(self, *, major: int = 7, minor: int = 38, flags: int = LINUX_6_1_INIT_FLAGS,
             max_readahead: int = LINUX_MAX_READAHEAD) -> InitOut:
        body = INIT_IN.pack(major, minor, max_readahead, flags & 0xFFFFFFFF,
                            (flags >> 32) & 0xFFFFFFFF)
        r = self.request(Op.INIT, 0, [body], [INIT_OUT.size])
        out = parse_init_out(r.data)
        self.init_out = out
        if out.major == 7:
            self.proto_minor = min(minor, out.minor)
            self.negotiated = flags & out.flags
            self.max_write = out.max_write or self.max_write
            if out.max_pages and flags & FUSE_MAX_PAGES and out.flags & FUSE_MAX_PAGES:
                self.max_read = out.max_pages * PAGE_SIZE
        return out

    def destroy(self) -> None:
        self.request(Op.DESTROY, 0)

    def lookup(self, parent: int, name) -> EntryOut:
        r = self.request(Op.LOOKUP, parent, [_name(name)], [ENTRY_OUT_SIZE])
        return parse_entry(r.data)

    def forget(self, nodeid: int, nlookup: int = 1, *, wait: bool = True) -> int:
        u = self.submit(Op.FORGET, nodeid, [FORGET_IN.pack(nlookup)])
        if wait:
            self.wait(u)
        return u

    def batch_forget(self, items: Sequence[tuple[int, int]], *, wait: bool = True) -> int:
        body = BATCH_FORGET_IN.pack(len(items), 0) + b"".join(
            FORGET_ONE.pack(n, c) for n, c in items)
        u = self.submit(Op.BATCH_FORGET, 0, [body])
        if wait:
            self.wait(u)
        return u

    def interrupt(self, target_unique: int, *, wait: bool = True) -> int:
        u = self.submit(Op.INTERRUPT, 0, [INTERRUPT_IN.pack(target_unique)],
                        unique=self.next_unique() | 1)
        if wait:
            self.wait(u)
        return u

    def getattr(self, nodeid: int, fh: int | None = None) -> AttrOut:
        body = GETATTR_IN.pack(FUSE_GETATTR_FH if fh is not None else 0, 0, fh or 0)
        r = self.request(Op.GETATTR, nodeid, [body], [ATTR_OUT_SIZE])
        return parse_attr_out(r.data)

    def setattr(self, nodeid: int, *, mode: int | None = None, uid: int | None = None,
                gid: int | None = None, size: int | None = None, atime=None, mtime=None,
                ctime=None, fh: int | None = None, lock_owner: int | None = None,
                atime_now: bool = False, mtime_now: bool = False,
                kill_suidgid: bool = False, valid: int | None = None) -> AttrOut:
        v = 0
        a_s = a_ns = m_s = m_ns = c_s = c_ns = 0
        if mode is not None:
            v |= FATTR_MODE
        if uid is not None:
            v |= FATTR_UID
        if gid is not None:
            v |= FATTR_GID
        if size is not None:
            v |= FATTR_SIZE
        if atime is not None:
            v |= FATTR_ATIME
            a_s, a_ns = _time_split(atime)
        if mtime is not None:
            v |= FATTR_MTIME
            m_s, m_ns = _time_split(mtime)
        if ctime is not None:
            v |= FATTR_CTIME
            c_s, c_ns = _time_split(ctime)
        if fh is not None:
            v |= FATTR_FH
        if lock_owner is not None:
            v |= FATTR_LOCKOWNER
        if atime_now:
            v |= FATTR_ATIME | FATTR_ATIME_NOW
        if mtime_now:
            v |= FATTR_MTIME | FATTR_MTIME_NOW
        if kill_suidgid:
            v |= FATTR_KILL_SUIDGID
        if valid is not None:
            v = valid
        body = SETATTR_IN.pack(v, 0, fh or 0, size or 0, lock_owner or 0, a_s, m_s, c_s,
                               a_ns, m_ns, c_ns, mode or 0, 0, uid or 0, gid or 0, 0)
        r = self.request(Op.SETATTR, nodeid, [body], [ATTR_OUT_SIZE])
        return parse_attr_out(r.data)

    def readlink(self, nodeid: int, size: int = PAGE_SIZE - 1) -> bytes:
        return self.request(Op.READLINK, nodeid, [], [size]).data

    def symlink(self, parent: int, name, target) -> EntryOut:
        args = [_name(name), _name(target)]
        r = self.request(Op.SYMLINK, parent, args, [ENTRY_OUT_SIZE], ext=self._create_ext())
        return parse_entry(r.data)

    def mknod(self, parent: int, name, mode: int, rdev: int = 0, umask: int = 0) -> EntryOut:
        r = self.request(Op.MKNOD, parent, [MKNOD_IN.pack(mode, rdev, umask, 0), _name(name)],
                         [ENTRY_OUT_SIZE], ext=self._create_ext())
        return parse_entry(r.data)

    def mkdir(self, parent: int, name, mode: int = 0o755, umask: int = 0) -> EntryOut:
        r = self.request(Op.MKDIR, parent, [MKDIR_IN.pack(mode | _stat.S_IFDIR, umask),
                                            _name(name)],
                         [ENTRY_OUT_SIZE], ext=self._create_ext())
        return parse_entry(r.data)

    def unlink(self, parent: int, name) -> None:
        self.request(Op.UNLINK, parent, [_name(name)])

    def rmdir(self, parent: int, name) -> None:
        self.request(Op.RMDIR, parent, [_name(name)])

    def rename(self, olddir: int, oldname, newdir: int, newname) -> None:
        self.request(Op.RENAME, olddir, [RENAME_IN.pack(newdir), _name(oldname), _name(newname)])

    def rename2(self, olddir: int, oldname, newdir: int, newname, flags: int = 0) -> None:
        self.request(Op.RENAME2, olddir,
                     [RENAME2_IN.pack(newdir, flags, 0), _name(oldname), _name(newname)])

    def link(self, nodeid: int, newparent: int, newname) -> EntryOut:
        r = self.request(Op.LINK, newparent, [LINK_IN.pack(nodeid), _name(newname)],
                         [ENTRY_OUT_SIZE])
        return parse_entry(r.data)

    def open(self, nodeid: int, flags: int = os.O_RDONLY, open_flags: int = 0) -> OpenOut:
        r = self.request(Op.OPEN, nodeid, [OPEN_IN.pack(flags, open_flags)], [OPEN_OUT.size])
        return OpenOut._make(OPEN_OUT.unpack_from(r.data))

    def create(self, parent: int, name, mode: int = 0o644,
               flags: int = os.O_RDWR | os.O_CREAT, umask: int = 0, open_flags: int = 0
               ) -> tuple[EntryOut, OpenOut]:
        r = self.request(Op.CREATE, parent,
                         [CREATE_IN.pack(flags, mode | _stat.S_IFREG, umask, open_flags),
                          _name(name)],
                         [ENTRY_OUT_SIZE, OPEN_OUT.size], ext=self._create_ext())
        return parse_entry(r.data), OpenOut._make(OPEN_OUT.unpack_from(r.data, ENTRY_OUT_SIZE))

    def submit_read(self, nodeid: int, fh: int, offset: int, size: int, *,
                    segments: Sequence[int] | None = None, read_flags: int = 0,
                    lock_owner: int = 0, flags: int = 0, copy: bool = True, **kw) -> int:
        """Queue a READ; ``segments`` = exact writable descriptor sizes for the data (their
        sum is the capacity; default one segment of ``size``, split at seg_size)."""
        body = READ_IN.pack(fh, offset, size, read_flags, lock_owner, flags, 0)
        outs = list(segments) if segments is not None else [size]
        if segments is not None:
            kw.setdefault("seg_size", None)
        if not copy:
            kw["copy_limit"] = OUT_HEADER.size
        return self.submit(Op.READ, nodeid, [body], outs, **kw)

    def read(self, nodeid: int, fh: int, offset: int, size: int, *,
             segments: Sequence[int] | None = None, read_flags: int = 0, lock_owner: int = 0,
             flags: int = 0, copy: bool = True, timeout: float | None = None, **kw):
        """READ; returns the bytes read (or, with ``copy=False``, only their count)."""
        u = self.submit_read(nodeid, fh, offset, size, segments=segments,
                             read_flags=read_flags, lock_owner=lock_owner, flags=flags,
                             copy=copy, **kw)
        r = self.wait(u, timeout).check()
        return r.data if copy else r.used_len - OUT_HEADER.size

    def submit_write(self, nodeid: int, fh: int, offset: int, data, *, write_flags: int = 0,
                     lock_owner: int = 0, flags: int = 0, **kw) -> int:
        if isinstance(data, int):          # a buffer of that size, contents undefined
            n = data
        else:
            n = len(data)
        body = WRITE_IN.pack(fh, offset, n, write_flags, lock_owner, flags, 0)
        return self.submit(Op.WRITE, nodeid, [body, data], [WRITE_OUT.size], **kw)

    def write(self, nodeid: int, fh: int, offset: int, data, *, write_flags: int = 0,
              lock_owner: int = 0, flags: int = 0, timeout: float | None = None, **kw) -> int:
        """WRITE; returns the count the server wrote.  ``data`` may be an int (size only)."""
        u = self.submit_write(nodeid, fh, offset, data, write_flags=write_flags,
                              lock_owner=lock_owner, flags=flags, **kw)
        r = self.wait(u, timeout).check()
        if len(r.data) < WRITE_OUT.size:
            raise ProtocolError(f"WRITE reply has {len(r.data)} bytes, wanted 8")
        return WRITE_OUT.unpack_from(r.data)[0]

    def write_all(self, nodeid: int, fh: int, offset: int, data) -> int:
        """Write in chunks of the negotiated max_write."""
        mv = memoryview(data)
        done = 0
        while done < len(mv):
            chunk = mv[done:done + self.max_write]
            n = self.write(nodeid, fh, offset + done, chunk)
            if n <= 0:
                raise ProtocolError(f"WRITE of {len(chunk)} bytes wrote {n}")
            done += n
        return done

    def read_all(self, nodeid: int, fh: int, offset: int, size: int) -> bytes:
        """Read in chunks of the negotiated max read size, up to ``size`` or EOF."""
        parts = []
        done = 0
        while done < size:
            want = min(self.max_read, size - done)
            b = self.read(nodeid, fh, offset + done, want)
            if not b:
                break
            parts.append(b)
            done += len(b)
        return b"".join(parts)

    def statfs(self, nodeid: int = FUSE_ROOT_ID) -> StatfsOut:
        r = self.request(Op.STATFS, nodeid, [], [STATFS_OUT.size])
        return StatfsOut._make(STATFS_OUT.unpack_from(r.data))

    def release(self, nodeid: int, fh: int, flags: int = 0, release_flags: int = 0,
                lock_owner: int = 0) -> None:
        self.request(Op.RELEASE, nodeid, [RELEASE_IN.pack(fh, flags, release_flags, lock_owner)])

    def releasedir(self, nodeid: int, fh: int, flags: int = 0) -> None:
        self.request(Op.RELEASEDIR, nodeid, [RELEASE_IN.pack(fh, flags, 0, 0)])

    def fsync(self, nodeid: int, fh: int, datasync: bool = False) -> None:
        self.request(Op.FSYNC, nodeid, [FSYNC_IN.pack(fh, FUSE_FSYNC_FDATASYNC if datasync else 0, 0)])

    def fsyncdir(self, nodeid: int, fh: int, datasync: bool = False) -> None:
        self.request(Op.FSYNCDIR, nodeid,
                     [FSYNC_IN.pack(fh, FUSE_FSYNC_FDATASYNC if datasync else 0, 0)])

    def flush(self, nodeid: int, fh: int, lock_owner: int = 0) -> None:
        self.request(Op.FLUSH, nodeid, [FLUSH_IN.pack(fh, 0, 0, lock_owner)])

    def opendir(self, nodeid: int, flags: int = os.O_RDONLY | os.O_DIRECTORY,
                open_flags: int = 0) -> OpenOut:
        r = self.request(Op.OPENDIR, nodeid, [OPEN_IN.pack(flags, open_flags)], [OPEN_OUT.size])
        return OpenOut._make(OPEN_OUT.unpack_from(r.data))

    def readdir_raw(self, nodeid: int, fh: int, offset: int = 0, size: int = PAGE_SIZE,
                    plus: bool = False) -> bytes:
        body = READ_IN.pack(fh, offset, size, 0, 0, 0, 0)
        return self.request(Op.READDIRPLUS if plus else Op.READDIR, nodeid, [body], [size]).data

    def readdir(self, nodeid: int, fh: int, offset: int = 0, size: int = PAGE_SIZE) -> list[Dirent]:
        return parse_dirents(self.readdir_raw(nodeid, fh, offset, size))

    def readdirplus(self, nodeid: int, fh: int, offset: int = 0,
                    size: int = PAGE_SIZE) -> list[DirentPlus]:
        return parse_direntplus(self.readdir_raw(nodeid, fh, offset, size, plus=True))

    def listdir(self, nodeid: int, plus: bool = False) -> list:
        """opendir + readdir(plus) until empty + releasedir."""
        fh = self.opendir(nodeid).fh
        out: list = []
        off = 0
        try:
            while True:
                batch = self.readdirplus(nodeid, fh, off) if plus else self.readdir(nodeid, fh, off)
                if not batch:
                    break
                out.extend(batch)
                off = (batch[-1].dirent if plus else batch[-1]).off
        finally:
            self.releasedir(nodeid, fh)
        return out

    def access(self, nodeid: int, mask: int) -> None:
        self.request(Op.ACCESS, nodeid, [ACCESS_IN.pack(mask, 0)])

    def setxattr(self, nodeid: int, name, value: bytes, flags: int = 0,
                 setxattr_flags: int = 0) -> None:
        if self.negotiated & FUSE_SETXATTR_EXT:
            head = SETXATTR_IN.pack(len(value), flags, setxattr_flags, 0)
        else:
            head = SETXATTR_IN_COMPAT.pack(len(value), flags)
        self.request(Op.SETXATTR, nodeid, [head, _name(name), bytes(value)])

    def getxattr(self, nodeid: int, name, size: int = 0):
        """With size 0 returns the value's size (int); else the value (bytes)."""
        r = self.request(Op.GETXATTR, nodeid, [GETXATTR_IN.pack(size, 0), _name(name)],
                         [size if size else GETXATTR_OUT.size])
        if size == 0:
            return GETXATTR_OUT.unpack_from(r.data)[0]
        return r.data

    def listxattr(self, nodeid: int, size: int = 0):
        """With size 0 returns the list's size (int); else the names (list of bytes)."""
        r = self.request(Op.LISTXATTR, nodeid, [GETXATTR_IN.pack(size, 0)],
                         [size if size else GETXATTR_OUT.size])
        if size == 0:
            return GETXATTR_OUT.unpack_from(r.data)[0]
        return [n for n in r.data.split(b"\0") if n]

    def removexattr(self, nodeid: int, name) -> None:
        self.request(Op.REMOVEXATTR, nodeid, [_name(name)])

    def fallocate(self, nodeid: int, fh: int, offset: int, length: int, mode: int = 0) -> None:
        self.request(Op.FALLOCATE, nodeid, [FALLOCATE_IN.pack(fh, offset, length, mode, 0)])

    def lseek(self, nodeid: int, fh: int, offset: int, whence: int) -> int:
        r = self.request(Op.LSEEK, nodeid, [LSEEK_IN.pack(fh, offset, whence, 0)], [LSEEK_OUT.size])
        return LSEEK_OUT.unpack_from(r.data)[0]

    def copy_file_range(self, nodeid_in: int, fh_in: int, off_in: int, nodeid_out: int,
                        fh_out: int, off_out: int, length: int, flags: int = 0) -> int:
        body = COPY_FILE_RANGE_IN.pack(fh_in, off_in, nodeid_out, fh_out, off_out, length, flags)
        r = self.request(Op.COPY_FILE_RANGE, nodeid_in, [body], [WRITE_OUT.size])
        return WRITE_OUT.unpack_from(r.data)[0]

    def syncfs(self, nodeid: int = FUSE_ROOT_ID) -> None:
        self.request(Op.SYNCFS, nodeid, [SYNCFS_IN.pack(0)])

    def _lk(self, op, nodeid, fh, owner, start, end, typ, pid, flock, out):
        body = LK_IN.pack(fh, owner, start, end, typ, pid, FUSE_LK_FLOCK if flock else 0, 0)
        return self.request(op, nodeid, [body], [LK_OUT.size] if out else [])

    def getlk(self, nodeid: int, fh: int, owner: int, start: int = 0, end: int = 2**63 - 1,
              type: int = 1, pid: int = 0, flock: bool = False) -> FileLock:  # F_WRLCK = 1
        r = self._lk(Op.GETLK, nodeid, fh, owner, start, end, type, pid, flock, True)
        return FileLock._make(LK_OUT.unpack_from(r.data))

    def setlk(self, nodeid: int, fh: int, owner: int, start: int = 0, end: int = 2**63 - 1,
              type: int = 1, pid: int = 0, flock: bool = False) -> None:
        self._lk(Op.SETLK, nodeid, fh, owner, start, end, type, pid, flock, False)

    def setlkw(self, nodeid: int, fh: int, owner: int, start: int = 0, end: int = 2**63 - 1,
               type: int = 1, pid: int = 0, flock: bool = False) -> None:
        self._lk(Op.SETLKW, nodeid, fh, owner, start, end, type, pid, flock, False)

    def setupmapping(self, nodeid: int, fh: int, foffset: int, length: int, flags: int,
                     moffset: int) -> None:
        self.request(Op.SETUPMAPPING, nodeid,
                     [SETUPMAPPING_IN.pack(fh, foffset, length, flags, moffset)])

    def removemapping(self, nodeid: int, ranges: Sequence[tuple[int, int]]) -> None:
        self.request(Op.REMOVEMAPPING, nodeid,
                     [REMOVEMAPPING_IN.pack(len(ranges)),
                      b"".join(REMOVEMAPPING_ONE.pack(m, n) for m, n in ranges)])


# ----------------------------------------------------------------------------------------
# The guest's DAX driver (as Linux fs/fuse/dax.c)
# ----------------------------------------------------------------------------------------

FUSE_ATTR_DAX = 1 << 1
FUSE_DAX_SHIFT = 21
FUSE_DAX_SZ = 1 << FUSE_DAX_SHIFT          # Linux maps the window in 2 MiB ranges
FUSE_DAX_RECLAIM_THRESHOLD = 20            # % of free ranges below which ranges are reclaimed
FUSE_DAX_RECLAIM_CHUNK = 10                # ranges reclaimed at a time
FUSE_REMOVEMAPPING_MAX_ENTRY = PAGE_SIZE // REMOVEMAPPING_ONE.size
NO_FH = (1 << 64) - 1                      # Linux names only the inode in SETUPMAPPING


class DaxRange(NamedTuple):
    nodeid: int
    index: int          # file offset >> FUSE_DAX_SHIFT
    moffset: int        # window offset
    writable: bool


class DaxDriver:
    """The guest half of DAX, modelled on Linux's fs/fuse/dax.c: the window (shared memory
    region 0) is cut into 2 MiB ranges; a file range is mapped on first access with
    SETUPMAPPING (fh = -1, READ, plus WRITE when written: an existing read-only range is
    upgraded by mapping it again at the same offset); when fewer than 20 % of the ranges are
    free, the least recently used ones are reclaimed (REMOVEMAPPING), and when none is free
    the oldest is taken inline.  Reads and writes inside the file's size go through the
    window; a write that extends the file goes through a WRITE request (as Linux does).
    ``mode`` is the mount option: ``always``, ``inode`` (files whose attributes carry
    FUSE_ATTR_DAX) or ``never``.  Not thread-safe (one test thread drives it).

    Use :meth:`init` instead of :meth:`FuseClient.init` (it asks for MAP_ALIGNMENT and
    HAS_INODE_DAX, as a Linux guest with a DAX window does), then :meth:`open`."""

    def __init__(self, client: "FuseClient", mode: str = "always"):
        fe = client.fe
        if not fe.shmem_regions or not fe.shmem_regions[0].size:
            raise FrontendError("the device has no DAX window (shared memory region 0)")
        if mode not in ("always", "inode", "never"):
            raise ValueError(f"dax={mode}")
        self.client = client
        self.window = fe.shmem_regions[0]
        self.mode = mode
        self.nranges = self.window.size // FUSE_DAX_SZ
        if not self.nranges:
            raise FrontendError(f"a DAX window of {self.window.size:#x} bytes holds no range")
        self.free: list[int] = [i * FUSE_DAX_SZ for i in reversed(range(self.nranges))]
        self.busy: dict[tuple[int, int], DaxRange] = {}   # (nodeid, index) -> range; LRU order
        self.setups = 0          # SETUPMAPPING requests sent
        self.removes = 0         # REMOVEMAPPING requests sent
        self.removed_ranges = 0

    # -- session ----------------------------------------------------------------------------
    def init(self, flags: int = LINUX_6_1_INIT_FLAGS) -> InitOut:
        flags |= FUSE_MAP_ALIGNMENT | FUSE_INIT_EXT
        if self.mode == "inode":       # Linux asks for per-inode DAX only in this mode
            flags |= FUSE_HAS_INODE_DAX
        else:
            flags &= ~FUSE_HAS_INODE_DAX
        out = self.client.init(flags=flags)
        if not out.flags & FUSE_MAP_ALIGNMENT:
            raise FrontendError("the daemon did not negotiate FUSE_MAP_ALIGNMENT")
        # fuse_dax_check_alignment: a range must be a multiple of the alignment
        if out.map_alignment and FUSE_DAX_SZ % (1 << out.map_alignment):
            raise FrontendError(f"map_alignment {out.map_alignment} does not divide 2 MiB")
        if self.mode == "inode" and not out.flags & FUSE_HAS_INODE_DAX:
            self.mode = "never"  # Linux: no per-inode DAX without the daemon's support
        return out

    def uses_dax(self, attr: Attr) -> bool:
        if not _stat.S_ISREG(attr.mode) or self.mode == "never":
            return False
        return self.mode == "always" or bool(attr.flags & FUSE_ATTR_DAX)

    def open(self, nodeid: int, flags: int = os.O_RDWR) -> "DaxFile":
        o = self.client.open(nodeid, flags)
        attr = self.client.getattr(nodeid).attr
        return DaxFile(self, nodeid, o.fh, attr.size, self.uses_dax(attr))

    def reset(self) -> None:
        """After a device reset the frontend dropped every mapping: start afresh."""
        self.free = [i * FUSE_DAX_SZ for i in reversed(range(self.nranges))]
        self.busy.clear()

    # -- ranges -----------------------------------------------------------------------------
    def ranges_of(self, nodeid: int) -> list[DaxRange]:
        return [r for r in self.busy.values() if r.nodeid == nodeid]

    def _range(self, nodeid: int, index: int, write: bool) -> DaxRange:
        key = (nodeid, index)
        r = self.busy.pop(key, None)
        if r is not None:
            if write and not r.writable:     # upgrade: same offset, now writable
                try:
                    self._setup(nodeid, index, r.moffset, True)
                except BaseException:
                    self.busy[key] = r
                    raise
                r = r._replace(writable=True)
            self.busy[key] = r               # most recently used last
            return r
        if not self.free:
            self._reclaim(1)                 # inline: take the oldest range
        moffset = self.free.pop()
        try:
            self._setup(nodeid, index, moffset, write)
        except BaseException:
            self.free.append(moffset)
            raise
        r = DaxRange(nodeid, index, moffset, write)
        self.busy[key] = r
        if len(self.free) * 100 < self.nranges * FUSE_DAX_RECLAIM_THRESHOLD:
            self._reclaim(min(FUSE_DAX_RECLAIM_CHUNK, len(self.busy) - 1))
        return r

    def _setup(self, nodeid: int, index: int, moffset: int, write: bool) -> None:
        flags = FUSE_SETUPMAPPING_FLAG_READ | (FUSE_SETUPMAPPING_FLAG_WRITE if write else 0)
        self.client.setupmapping(nodeid, NO_FH, index << FUSE_DAX_SHIFT, FUSE_DAX_SZ, flags,
                                 moffset)
        self.setups += 1

    def _reclaim(self, n: int) -> None:
        """Free the ``n`` least recently used ranges (REMOVEMAPPING, per inode in one request
        with many entries, as Linux's dmap_removemapping_list)."""
        victims = list(self.busy.values())[:max(n, 0)]
        by_inode: dict[int, list[DaxRange]] = {}
        for r in victims:
            by_inode.setdefault(r.nodeid, []).append(r)
        for nodeid, rs in by_inode.items():
            self._remove(nodeid, rs)

    def _remove(self, nodeid: int, rs: list[DaxRange]) -> None:
        for i in range(0, len(rs), FUSE_REMOVEMAPPING_MAX_ENTRY):
            chunk = rs[i:i + FUSE_REMOVEMAPPING_MAX_ENTRY]
            self.client.removemapping(nodeid, [(r.moffset, FUSE_DAX_SZ) for r in chunk])
            self.removes += 1
            self.removed_ranges += len(chunk)
            for r in chunk:
                del self.busy[(r.nodeid, r.index)]
                self.free.append(r.moffset)

    def evict(self, nodeid: int) -> None:
        """The guest drops an inode (fuse_dax_inode_cleanup): all its ranges go."""
        rs = self.ranges_of(nodeid)
        if rs:
            self._remove(nodeid, rs)

    # -- data -------------------------------------------------------------------------------
    def _pieces(self, nodeid: int, offset: int, buf, writable: bool):
        """(window offset, slice of buf) for each 2 MiB range the access touches, each range
        set up (or upgraded to writable) on the way, as fuse_dax_iomap_begin does."""
        view = memoryview(buf).cast("B")
        pos = 0
        while pos < len(view):
            index, within = divmod(offset + pos, FUSE_DAX_SZ)
            n = min(len(view) - pos, FUSE_DAX_SZ - within)
            r = self._range(nodeid, index, writable)
            yield r.moffset + within, view[pos:pos + n]
            pos += n

    def read(self, nodeid: int, offset: int, buf) -> None:
        for moffset, piece in self._pieces(nodeid, offset, buf, False):
            self.window.readinto(moffset, piece)

    def write(self, nodeid: int, offset: int, data) -> None:
        for moffset, piece in self._pieces(nodeid, offset, data, True):
            self.window.write(moffset, piece)


class DaxFile:
    """An open file of a :class:`DaxDriver` (like a guest file descriptor)."""

    def __init__(self, driver: DaxDriver, nodeid: int, fh: int, size: int, dax: bool):
        self.driver, self.nodeid, self.fh, self.size, self.dax = driver, nodeid, fh, size, dax

    def read(self, offset: int, n: int) -> bytes:
        n = max(0, min(n, self.size - offset))   # i_size bounds a DAX read
        if not self.dax:
            return self.driver.client.read_all(self.nodeid, self.fh, offset, n)
        buf = bytearray(n)
        self.driver.read(self.nodeid, offset, buf)
        return bytes(buf)

    def write(self, offset: int, data) -> int:
        n = len(data)
        if not self.dax or offset + n > self.size:
            # Linux: a write that extends the file goes through WRITE (fuse_dax_direct_write)
            done = self.driver.client.write_all(self.nodeid, self.fh, offset, data)
            self.size = max(self.size, offset + done)
            return done
        self.driver.write(self.nodeid, offset, data)
        return n

    def close(self) -> None:
        self.driver.client.release(self.nodeid, self.fh)   # the ranges stay (per inode)

"""Split virtqueues (virtio 1.x, section 2.7), the device side.

The driver (the guest) owns the descriptor table and the avail ring; the device (us) owns the
used ring.  Everything read from guest memory is untrusted: a chain that points outside guest
memory, loops, mixes the order of readable and writable buffers or nests indirect tables is a
:class:`ChainError` (the request is returned with no reply), and a ring that cannot be trusted
at all (avail index jumping further than the queue size, head index out of range) is
:class:`QueueBroken` (the queue stops and the frontend is told through the error eventfd).

Memory ordering.  The driver and the device run concurrently on other CPUs.  We rely on:
  * single 16/32-bit loads and stores: ring indices are read and written through memoryview
    casts to 'H'/'I', which CPython performs as one aligned C load/store, so a concurrently
    updated index is never seen torn;
  * x86-64's TSO model, which keeps loads in order with loads and stores with stores: reading
    avail.idx before the ring entries, and writing a used element before used.idx, need no
    fence there (virtio's rmb/wmb are compiler barriers only on x86, and a CPython bytecode
    boundary is a compiler barrier);
  * a full fence where x86 *can* reorder, a store followed by a load: publishing used.idx
    then reading used_event / avail.flags, and publishing avail_event then re-reading
    avail.idx.  A LOCK-prefixed instruction is a full fence on x86, and acquiring a CPython
    lock executes one (an atomic compare-exchange): :func:`full_fence` takes a lock of its
    own; :meth:`Virtqueue.end_batch` does both stores, then takes the queue's lock once,
    which fences both directions before the two loads.
On weakly ordered CPUs (arm64) the first two points would need real fences; the daemon refuses
to start there rather than corrupt rings silently (see :data:`ORDERING_IS_SAFE`).
"""

from __future__ import annotations

import functools
import os
import platform
import struct
import threading
from typing import Sequence

from .guest_memory import GuestMemory, GuestMemoryError

ORDERING_IS_SAFE = platform.machine() in ("x86_64", "AMD64", "i686", "i386")

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
MAX_QUEUE_SIZE = 32768

_DESC = struct.Struct("<QIHH")
_DESC_ITER = _DESC.iter_unpack
_DESC_UNPACK_FROM = _DESC.unpack_from
_fence_lock = threading.Lock()
_NO_RING = memoryview(b"")  # the ring views of a queue that is not configured


def full_fence() -> None:
    """A full memory barrier (see the module docstring)."""
    _fence_lock.acquire()
    _fence_lock.release()


# Small tables (a FUSE request's header and arguments, its reply's header and result) in
# Linux's shape: one struct unpack copies the table into a flat tuple; its flags, as a
# tuple, name the shape (the number of readable entries) in this dict; the links must be
# 1, 2, ..., n-1.  Anything else goes to the descriptor-by-descriptor walk.  Larger tables
# take _simple_table.
_SMALL_TABLE_MAX = 8
_SMALL_UNPACK = [None] + [struct.Struct("<" + "QIHH" * n).unpack
                          for n in range(1, _SMALL_TABLE_MAX + 1)]
_SMALL_LINKS = [None] + [tuple(range(1, n)) for n in range(1, _SMALL_TABLE_MAX + 1)]
_SMALL_SHAPES: dict[tuple, int] = {}
for _n in range(1, _SMALL_TABLE_MAX + 1):
    for _k in range(_n + 1):  # _k readable entries, then _n - _k writable ones
        _flags = [VIRTQ_DESC_F_NEXT] * _k + [VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE] * (_n - _k)
        _flags[-1] &= ~VIRTQ_DESC_F_NEXT
        _SMALL_SHAPES[tuple(_flags)] = _k


def _simple_table(raw: bytes) -> tuple[list[int], list[int], int] | None:
    """The addresses and lengths of an indirect table in the shape Linux writes -- entry i
    links to i+1, readable entries then writable ones, nothing else set -- and how many
    entries are readable; or None for any other table (the descriptor-by-descriptor walk
    then judges it).  Flags and links are compared as bytes with the ones the shape has
    (a memcmp each); only addresses and lengths become Python ints.  The shape rules out
    loops, nesting and a readable buffer after a writable one."""
    n = len(raw) >> 4
    mv = memoryview(raw)
    h = mv.cast("H")
    flags = h[6::8].tobytes()
    # a guess at k (a count can match across two flags); the comparison below decides
    k = flags.count(_F_NEXT)
    if flags != (_F_NEXT * k + _F_NEXT_WRITE * (n - k - 1) + _F_WRITE if k < n
                 else _F_NEXT * (n - 1) + _F_NONE):
        return None
    if h[7:-8:8].tobytes() != _links(n):  # the last entry's next is not used
        return None
    return mv.cast("Q")[0::2].tolist(), mv.cast("I")[2::4].tolist(), k


_F_NEXT = VIRTQ_DESC_F_NEXT.to_bytes(2, "little")
_F_WRITE = VIRTQ_DESC_F_WRITE.to_bytes(2, "little")
_F_NEXT_WRITE = (VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE).to_bytes(2, "little")
_F_NONE = bytes(2)


@functools.lru_cache(maxsize=8)
def _links(n: int) -> bytes:
    """Entries 1..n-1 as little-endian u16s: the links of an n-entry table in order."""
    return b"".join(i.to_bytes(2, "little") for i in range(1, n))


class ChainError(Exception):
    """One descriptor chain is malformed; the queue itself is still usable."""


class QueueBroken(Exception):
    """The ring can no longer be trusted; the queue must stop until the device is reset."""


class DescriptorChain:
    """One request taken off a ring: its guest buffers as memoryviews, and the request
    handler's cursor over them.  The chain is its own reader and writer (no other object is
    made per request).  What a handler uses:

    ``head``
        the head descriptor's index (what a deferred ``complete(head, length)`` takes).
    ``readable`` / ``writable``
        lists of memoryviews into guest memory, device-readable then device-writable, in
        chain order.  Buffers contiguous in guest-physical memory are merged into one view,
        so these lists are short (a 1 MiB request in contiguous guest pages is one view):
        hand them to ``os.pwritev`` / ``os.preadv`` as they are.
    ``remaining``
        readable bytes not consumed yet.  A handler may lower it (to ignore trailing bytes);
        never raise it.
    ``read(n) -> bytes``
        copy the next n readable bytes; ``EOFError`` if fewer remain.
    ``read_views(n) -> list[memoryview]``
        the next n readable bytes as views (no copy); ``EOFError`` if fewer remain.
    ``capacity``
        bytes of writable space.
    ``write_at(offset, data) -> end``
        copy data into the writable space at offset; ``EOFError`` if it does not fit.
    ``views_at(offset, n) -> list[memoryview]``
        views of [offset, offset+n) of the writable space, clipped to ``capacity``.

    ``reader()`` and ``writer()`` return the chain itself (older callers took two objects);
    ``Reader`` and ``Writer`` are other names of this class, for annotations.

    Anyone may build one over plain buffers (tests, the host-mount transport):
    ``DescriptorChain(head, [memoryview(request_bytes)], [memoryview(reply_buffer)])``.
    """

    __slots__ = ("head", "readable", "writable", "remaining", "capacity", "_i", "_pos")

    def __init__(self, head: int, readable: list[memoryview], writable: list[memoryview],
                 readable_len: int | None = None, writable_len: int | None = None):
        self.head = head
        self.readable = readable
        self.writable = writable
        self.remaining = (sum(len(v) for v in readable) if readable_len is None
                          else readable_len)
        self.capacity = (sum(len(v) for v in writable) if writable_len is None
                         else writable_len)
        self._i = 0    # the readable view the cursor is in, and the offset in it
        self._pos = 0

    def reader(self) -> "DescriptorChain":
        return self

    def writer(self) -> "DescriptorChain":
        return self

    # -- the device-readable part: a cursor --------------------------------------------------
    def read(self, n: int) -> bytes:
        """Copy the next n bytes out of guest memory; raises EOFError if the chain is shorter."""
        if n > self.remaining:
            raise EOFError(f"request needs {n} more bytes, chain has {self.remaining}")
        self.remaining -= n
        views = self.readable
        i = self._i
        if i < len(views):
            v = views[i]
            pos = self._pos
            end = pos + n
            lv = len(v)
            if end < lv:
                self._pos = end
                return bytes(v[pos:end])
            if end == lv:
                self._i = i + 1
                self._pos = 0
                return bytes(v[pos:end])
        return b"".join(self._take(n))

    def read_views(self, n: int) -> list[memoryview]:
        """The next n bytes as views into guest memory (no copy)."""
        if n > self.remaining:
            raise EOFError(f"request needs {n} more bytes, chain has {self.remaining}")
        self.remaining -= n
        return self._take(n)

    def _take(self, n: int) -> list[memoryview]:
        out = []
        views = self.readable
        i, pos = self._i, self._pos
        while n:
            v = views[i]
            lv = len(v)
            k = lv - pos if lv - pos < n else n
            out.append(v if (pos == 0 and k == lv) else v[pos:pos + k])
            pos += k
            n -= k
            if pos == lv:
                i += 1
                pos = 0
        self._i, self._pos = i, pos
        return out

    # -- the device-writable part: explicit offsets ------------------------------------------
    def views_at(self, offset: int, n: int) -> list[memoryview]:
        """Views of [offset, offset+n) of the writable space (clipped to its capacity)."""
        out = []
        end = min(offset + n, self.capacity)
        pos = 0
        for v in self.writable:
            lv = len(v)
            if pos + lv > offset:
                s = offset - pos if offset > pos else 0
                e = end - pos if end - pos < lv else lv
                if e > s:
                    out.append(v if (s == 0 and e == lv) else v[s:e])
                if pos + lv >= end:
                    break
            pos += lv
        return out

    def write_at(self, offset: int, data) -> int:
        """Copy data in at offset; returns the end offset.  Raises EOFError if it does not fit."""
        n = len(data)
        if offset + n > self.capacity:
            raise EOFError(f"reply of {offset + n} bytes does not fit in {self.capacity}")
        pos = 0
        p = 0
        mv = None
        for v in self.writable:
            lv = len(v)
            if pos + lv > offset:
                s = offset + p - pos
                k = lv - s if lv - s < n - p else n - p
                if p == 0 and k == n:
                    v[s:s + k] = data  # the usual case: one buffer takes it all
                    return offset + n
                if mv is None:
                    mv = memoryview(data).cast("B")
                v[s:s + k] = mv[p:p + k]
                p += k
                if p == n:
                    break
            pos += lv
        return offset + n


Reader = DescriptorChain  # (two lines: a chained assignment is not a type alias to mypy)
Writer = DescriptorChain


class Virtqueue:
    """Device-side state of one split virtqueue."""

    def __init__(self, index: int):
        self.index = index
        self.size = 0
        self.memory: GuestMemory | None = None
        self.desc_addr = self.avail_addr = self.used_addr = 0  # guest-physical
        self.next_avail = 0
        self.next_used = 0
        self.signalled_used: int | None = None
        self.event_idx = False
        self.kick_fd: int | None = None
        self.call_fd: int | None = None
        self.err_fd: int | None = None
        self.enabled = False
        self.broken = False
        self._desc = self._avail16 = self._used16 = self._used32 = _NO_RING
        self._avail_known = 0  # chains avail.idx showed that are not popped yet
        self._mask = 0
        self._used_event_i = self._avail_event_i = 0  # their 16-bit indices in the rings
        self._lock = threading.Lock()

    # -- set-up ---------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._desc is not _NO_RING

    def configure(self, memory: GuestMemory, desc_addr: int, avail_addr: int,
                  used_addr: int) -> None:
        """Map the three ring parts; raises GuestMemoryError if they are not in guest memory."""
        n = self.size
        if not n or n & (n - 1) or n > MAX_QUEUE_SIZE:
            raise GuestMemoryError(f"queue {self.index}: invalid size {n}")
        if desc_addr % 16 or avail_addr % 2 or used_addr % 4:
            raise GuestMemoryError(f"queue {self.index}: misaligned ring addresses")
        desc = memory.view(desc_addr, 16 * n)
        avail = memory.view(avail_addr, 6 + 2 * n)
        used = memory.view(used_addr, 6 + 8 * n)
        self.memory = memory
        self.desc_addr, self.avail_addr, self.used_addr = desc_addr, avail_addr, used_addr
        self._desc = desc
        self._avail16 = avail.cast("H")
        self._used16 = used.cast("H")
        self._used32 = used[:4 + 8 * n].cast("I")
        self._mask = n - 1
        self._used_event_i = 2 + n
        self._avail_event_i = 2 + 4 * n
        self._avail_known = 0
        # Like libvhost-user: the used index is whatever the ring says (it survives reconnects).
        self.next_used = self._used16[1]
        self.signalled_used = None
        self.broken = False

    def remap(self, memory: GuestMemory) -> None:
        """Re-resolve the ring after the memory table changed."""
        if self.ready:
            used = self.next_used
            self.configure(memory, self.desc_addr, self.avail_addr, self.used_addr)
            self.next_used = used

    def reset(self) -> None:
        self._desc = self._avail16 = self._used16 = self._used32 = _NO_RING
        self.memory = None
        self.next_avail = self.next_used = 0
        self._avail_known = 0
        self.signalled_used = None
        self.enabled = False
        self.broken = False

    # -- driver -> device -----------------------------------------------------------------
    def avail_count(self) -> int:
        """Number of chains the driver has published that we have not popped."""
        n = (self._avail16[1] - self.next_avail) & 0xFFFF
        if n > self.size:
            raise QueueBroken(
                f"queue {self.index}: avail index moved by {n}, more than the queue size {self.size}")
        return n

    def set_base(self, next_avail: int) -> None:
        """Where popping starts (SET_VRING_BASE)."""
        self.next_avail = next_avail
        self._avail_known = 0

    def pop(self) -> DescriptorChain | None:
        """Take the next available chain.  Raises ChainError (chain is returned unused
        automatically) or QueueBroken.  avail.idx is read only when the chains it showed
        last time are all popped (a batch of N costs one read, not N)."""
        if not self._avail_known:
            n = (self._avail16[1] - self.next_avail) & 0xFFFF  # avail_count(), inline
            if not n:
                return None
            if n > self.size:
                raise QueueBroken(f"queue {self.index}: avail index moved by {n}, more than "
                                  f"the queue size {self.size}")
            self._avail_known = n
        self._avail_known -= 1
        i = self.next_avail
        head = self._avail16[2 + (i & self._mask)]
        self.next_avail = (i + 1) & 0xFFFF
        if head >= self.size:
            raise QueueBroken(f"queue {self.index}: head descriptor {head} >= queue size {self.size}")
        try:
            return self._walk(head)
        except ChainError as e:
            self.add_used(head, 0)
            raise ChainError(f"queue {self.index}, chain {head}: {e}") from None

    def _walk(self, head: int) -> DescriptorChain:
        """Follow the chain from ``head``: its structure here (links, loops, direction order,
        indirect tables), its addresses in one call to GuestMemory.gather_chain, the one
        place guest addresses are checked.  The descriptors are copied out of guest
        memory once (a table at a time for indirect tables), so the guest changing them
        meanwhile cannot make us see two versions."""
        memory = self.memory
        if memory is None:  # only a configured queue is walked
            raise QueueBroken(f"queue {self.index}: no guest memory")
        ring = self._desc
        d = _DESC_UNPACK_FROM(ring, 16 * head)
        table: list | None = None  # the indirect table's descriptors, once we are in one
        count = self.size
        addrs: Sequence[int] | None = None
        if d[2] == VIRTQ_DESC_F_INDIRECT:  # how Linux sends every request of 2+ buffers
            n = d[1] >> 4
            if not 0 < n <= MAX_QUEUE_SIZE or d[1] & 15:
                raise ChainError(f"indirect table of {d[1]} bytes")
            try:
                raw = memory.view(d[0], d[1])
            except GuestMemoryError as e:
                raise ChainError(str(e)) from None
            if n <= _SMALL_TABLE_MAX:
                t = _SMALL_UNPACK[n](raw)  # the one read of the table
                shape = _SMALL_SHAPES.get(t[2::4])
                if shape is not None and t[3:-4:4] == _SMALL_LINKS[n]:
                    addrs = t[0::4]
                    lens = t[1::4]
                    k = shape
                else:
                    table = [t[i:i + 4] for i in range(0, 4 * n, 4)]
            else:
                simple = _simple_table(bytes(raw))
                if simple is not None:
                    addrs, lens, k = simple
                else:
                    table = list(_DESC_ITER(raw))  # each descriptor read once, into a tuple
            if table is not None:  # (set exactly when addrs is not)
                count = len(table)
                d = table[0]
        if addrs is None:
            addrs, lens, k = self._follow(d, table, count)
        try:
            readable, rlen, writable, wlen = memory.gather_chain(addrs, lens, k)
        except GuestMemoryError as e:
            raise ChainError(str(e)) from None
        return DescriptorChain(head, readable, writable, rlen, wlen)

    def _follow(self, d: tuple, table: list | None, count: int
                ) -> tuple[list[int], list[int], int]:
        """Descriptor by descriptor from d (in ``table`` if not None, else in the ring): the
        addresses and lengths of the non-empty buffers, readable ones first, and how many
        are readable.  Every rule is checked here: loops, chains longer than their table,
        links outside it, nested tables, INDIRECT with NEXT, readable after writable."""
        ring = self._desc
        seen = 0
        addrs: list[int] = []
        lens: list[int] = []
        k = 0            # readable buffers so far
        writable = False
        while True:
            seen += 1
            if seen > count:
                raise ChainError("descriptor chain loops or is longer than its table")
            flags = d[2]
            if flags & VIRTQ_DESC_F_INDIRECT:
                if table is not None:
                    raise ChainError("indirect descriptor inside an indirect table")
                table = list(_DESC_ITER(self._indirect_table(d)))  # read once, as above
                count = len(table)
                seen = 0
                d = table[0]
                continue
            if d[1]:  # zero-length buffers carry nothing: skipped, wherever they point
                if flags & VIRTQ_DESC_F_WRITE:
                    writable = True
                elif writable:
                    raise ChainError("device-readable descriptor after a device-writable one")
                else:
                    k += 1
                addrs.append(d[0])
                lens.append(d[1])
            if not flags & VIRTQ_DESC_F_NEXT:
                return addrs, lens, k
            nxt = d[3]
            if nxt >= count:
                raise ChainError(f"next descriptor {nxt} outside its table of {count}")
            d = table[nxt] if table is not None else _DESC_UNPACK_FROM(ring, 16 * nxt)

    def _guest_memory(self) -> GuestMemory:
        memory = self.memory
        if memory is None:  # only a configured queue is walked
            raise QueueBroken(f"queue {self.index}: no guest memory")
        return memory

    def _indirect_table(self, d: tuple) -> memoryview:
        """The indirect table descriptor d points to, checked (the caller copies it once)."""
        if d[2] & VIRTQ_DESC_F_NEXT:
            raise ChainError("descriptor has both INDIRECT and NEXT")
        length = d[1]
        if length == 0 or length % 16 or length // 16 > MAX_QUEUE_SIZE:
            raise ChainError(f"indirect table of {length} bytes")
        try:
            return self._guest_memory().view(d[0], length)
        except GuestMemoryError as e:
            raise ChainError(str(e)) from None

    def enable_notification(self) -> bool:
        """Ask the driver to kick for chains after the ones popped so far.  Returns True if
        chains arrived meanwhile (the caller must keep popping instead of sleeping)."""
        if self.event_idx:
            self._used16[self._avail_event_i] = self.next_avail
        full_fence()
        return self.avail_count() > 0

    def end_batch(self, added: bool) -> bool:
        """The worker popped every chain it saw: interrupt the guest if it wants to hear of
        the used entries added (``added``: any since the last notify), and ask to be kicked
        for the next chain.  One full fence serves both directions: the stores (used.idx in
        add_used, avail_event here) come before it, the loads of used_event and avail.idx
        after.  Returns True if chains arrived meanwhile: pop them instead of sleeping."""
        if self.event_idx:
            self._used16[self._avail_event_i] = self.next_avail
        with self._lock:  # taking it is the full fence (an atomic compare-exchange)
            if added and self.call_fd is not None and self._need_interrupt():
                try:
                    os.eventfd_write(self.call_fd, 1)  # under the lock: see set_call_fd
                except OSError:
                    pass
            return self._avail16[1] != self.next_avail  # the next pop checks the count

    # -- device -> driver -----------------------------------------------------------------
    def add_used(self, head: int, length: int) -> None:
        with self._lock:
            used = self.next_used
            slot = 1 + 2 * (used & self._mask)
            self._used32[slot] = head
            self._used32[slot + 1] = length
            self.next_used = used = (used + 1) & 0xFFFF
            self._used16[1] = used  # stores stay in order on x86 (TSO)

    def needs_notification(self) -> bool:
        """Whether the driver wants an interrupt for the used entries added since the last one."""
        full_fence()
        return self._wants_interrupt()

    def _wants_interrupt(self) -> bool:
        with self._lock:
            return self._need_interrupt()

    def _need_interrupt(self) -> bool:
        """needs_notification after the fence, with the lock held: vring_need_event(used_event,
        new, old) with EVENT_IDX (virtio 1.x 2.7.10), else the avail ring's NO_INTERRUPT flag."""
        new = self.next_used
        if not self.event_idx:
            return not self._avail16[0] & VRING_AVAIL_F_NO_INTERRUPT
        old = self.signalled_used
        self.signalled_used = new
        if old is None:
            return True
        event = self._avail16[self._used_event_i]
        return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)

    def notify(self) -> None:
        """Signal the call eventfd if the driver wants to hear about new used entries."""
        full_fence()
        with self._lock:
            if self.call_fd is not None and self._need_interrupt():
                try:
                    os.eventfd_write(self.call_fd, 1)
                except OSError:
                    pass

    def set_call_fd(self, fd: int | None) -> None:
        """Interrupt through fd from now on (SET_VRING_CALL); the old one is closed.  Done
        under the lock the interrupting threads hold while they write, so none writes to a
        closed fd -- or to a new file that got its number.  The new fd is signalled once, as
        libvhost-user does: an interrupt that went to the old one (which the frontend may
        no longer watch) must not be lost; a spurious one costs the guest a ring check."""
        with self._lock:
            old, self.call_fd = self.call_fd, fd
            if old is not None:
                os.close(old)
            if fd is not None and self._desc is not None:
                try:
                    os.eventfd_write(fd, 1)
                except OSError:
                    pass

    def set_err_fd(self, fd: int | None) -> None:
        """Report a broken ring through fd from now on (SET_VRING_ERR); the old one is closed."""
        with self._lock:
            old, self.err_fd = self.err_fd, fd
            if old is not None:
                os.close(old)

    def signal_error(self) -> None:
        with self._lock:
            if self.err_fd is not None:
                try:
                    os.eventfd_write(self.err_fd, 1)
                except OSError:
                    pass

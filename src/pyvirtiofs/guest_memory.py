"""Guest memory as the backend sees it.

QEMU hands the daemon the guest's RAM as file descriptors (SET_MEM_TABLE, ADD_MEM_REG).  Each
region is mapped once and then addressed in two ways: by guest-physical address (what descriptor
chains contain) and by frontend user address (what SET_VRING_ADDR contains).

Every access the guest asks for goes through this module, which checks bounds and returns
memoryviews into the mapping: :meth:`GuestMemory.view` for things that must be contiguous (rings,
indirect descriptor tables) and :meth:`GuestMemory.gather` for the buffers of a descriptor chain
(:meth:`GuestMemory.slices` is ``gather`` of one buffer).  ``gather`` is the request path's one
checkpoint: it takes the chain's (addr, len) pairs as the guest wrote them, checks each against
its region once, and merges buffers that follow each other in guest-physical memory within one
region into one view, so a 1 MiB request in 256 page-sized descriptors of contiguous guest RAM
is one view, not 256.  An address outside every region is a *guest* error
(:class:`GuestMemoryError`), never an IndexError escaping from a worker.

A :class:`GuestMemory` is immutable: changing the table builds a new one, and workers holding the
old one keep valid mappings until they drop it (the mmap closes when the last view goes away).
"""

from __future__ import annotations

import bisect
import mmap
import os
from operator import add as _add
from typing import Sequence

PAGE_SIZE = mmap.PAGESIZE


class GuestMemoryError(Exception):
    """The guest named memory it does not have (a guest bug or a hostile guest)."""


class MemoryRegion:
    """One region of the memory table, mapped: ``view`` covers its ``size`` bytes."""

    # (not a dataclass: mypyc cannot compile a dataclass with a memoryview field)
    __slots__ = ("guest_phys_addr", "size", "user_addr", "mmap_offset", "_map", "view")

    def __init__(self, guest_phys_addr: int, size: int, user_addr: int, mmap_offset: int,
                 _map: mmap.mmap, view: memoryview):
        self.guest_phys_addr = guest_phys_addr
        self.size = size
        self.user_addr = user_addr
        self.mmap_offset = mmap_offset
        self._map = _map
        self.view = view

    def __repr__(self) -> str:
        return (f"MemoryRegion(guest_phys_addr={self.guest_phys_addr:#x}, size={self.size:#x}, "
                f"user_addr={self.user_addr:#x}, mmap_offset={self.mmap_offset:#x})")

    @classmethod
    def from_fd(cls, fd: int, guest_phys_addr: int, size: int, user_addr: int,
                mmap_offset: int) -> "MemoryRegion":
        """Map ``size`` bytes of ``fd`` starting at ``mmap_offset``; the caller keeps the fd."""
        if size <= 0:
            raise GuestMemoryError(f"memory region of size {size}")
        if guest_phys_addr + size > 1 << 64 or user_addr + size > 1 << 64:
            raise GuestMemoryError("memory region wraps the address space")
        # mmap offsets must be page aligned; map from the page below and slice.
        aligned = mmap_offset - (mmap_offset % mmap.ALLOCATIONGRANULARITY)
        skew = mmap_offset - aligned
        try:
            file_size = os.fstat(fd).st_size
            if file_size and mmap_offset + size > file_size:
                raise GuestMemoryError(
                    f"region [{mmap_offset:#x}, +{size:#x}) beyond its file ({file_size:#x} bytes)")
            m = mmap.mmap(fd, size + skew, flags=mmap.MAP_SHARED,
                          prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=aligned)
        except (OSError, ValueError, OverflowError) as e:
            raise GuestMemoryError(f"cannot map memory region: {e}") from None
        view = memoryview(m)[skew:skew + size]
        return cls(guest_phys_addr, size, user_addr, mmap_offset, m, view)

    def release(self) -> None:
        """Unmap now if no views are exported, else leave it to the garbage collector."""
        self.view.release()
        try:
            self._map.close()
        except BufferError:
            pass


class GuestMemory:
    """An immutable set of non-overlapping regions."""

    def __init__(self, regions: list[MemoryRegion] | tuple = ()):
        regions = sorted(regions, key=lambda r: r.guest_phys_addr)
        for a, b in zip(regions, regions[1:]):
            if a.guest_phys_addr + a.size > b.guest_phys_addr:
                raise GuestMemoryError(
                    f"memory regions overlap at guest address {b.guest_phys_addr:#x}")
        self.regions: tuple[MemoryRegion, ...] = tuple(regions)
        self._starts = [r.guest_phys_addr for r in self.regions]
        self._by_user = sorted(self.regions, key=lambda r: r.user_addr)
        self._user_starts = [r.user_addr for r in self._by_user]
        # The region the last buffer was in: most guests have one or two regions and chains
        # stay in one, so gather() tries it before a bisect.  Shared by the queue threads;
        # any value it holds is a region of this (immutable) table, so a race is harmless.
        self._hint: MemoryRegion | None = self.regions[0] if self.regions else None

    def with_region(self, region: MemoryRegion) -> "GuestMemory":
        return GuestMemory(self.regions + (region,))

    def without_region(self, guest_phys_addr: int, size: int) -> tuple["GuestMemory", MemoryRegion]:
        for r in self.regions:
            if r.guest_phys_addr == guest_phys_addr and r.size == size:
                return GuestMemory([x for x in self.regions if x is not r]), r
        raise GuestMemoryError(f"no memory region at {guest_phys_addr:#x} of size {size:#x}")

    def release(self) -> None:
        for r in self.regions:
            r.release()

    def _find(self, addr: int) -> MemoryRegion | None:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0:
            r = self.regions[i]
            if addr < r.guest_phys_addr + r.size:
                return r
        return None

    def view(self, addr: int, length: int) -> memoryview:
        """A contiguous view of [addr, addr+length), which must lie in one region."""
        r = self._hint  # as in gather: the region of the last buffer first
        if r is not None and 0 <= addr - r.guest_phys_addr and 0 <= length and (
                addr - r.guest_phys_addr + length <= r.size):
            off = addr - r.guest_phys_addr
            return r.view[off:off + length]
        r = self._find(addr)
        if r is None or length < 0:
            raise GuestMemoryError(f"guest address {addr:#x} is not in guest memory")
        off = addr - r.guest_phys_addr
        if off + length > r.size:
            raise GuestMemoryError(
                f"guest range [{addr:#x}, +{length:#x}) runs past its memory region")
        return r.view[off:off + length]

    def slices(self, addr: int, length: int) -> list[memoryview]:
        """Views covering [addr, addr+length), split where regions meet (they may be adjacent)."""
        if addr < 0 or length < 0:
            raise GuestMemoryError(f"guest range [{addr:#x}, +{length:#x}) is negative")
        return self.gather([addr], [length])[0]

    def gather(self, addrs: Sequence[int], lens: Sequence[int]) -> tuple[list[memoryview], int]:
        """Views covering the buffers [addrs[i], addrs[i] + lens[i]) -- a chain's descriptors
        of one direction, in order -- and their total length.  Each buffer is checked against
        its region once; consecutive buffers that are contiguous in one region become one
        view; a buffer across two adjacent regions becomes one view in each; zero-length
        buffers are skipped (whatever their address).  Addresses and lengths are
        non-negative (they come from the u64/u32 fields of descriptors).  Raises
        GuestMemoryError if any byte is outside guest memory."""
        r = self._hint
        count = len(addrs)
        if count == 1 and r is not None:  # one buffer: no list work
            n = lens[0]
            off = addrs[0] - r.guest_phys_addr
            if 0 <= off and 0 < n and off + n <= r.size:
                return [r.view[off:off + n]], n
        if addrs and r is not None and 0 not in lens:
            # The usual case: every buffer in the region of the last ones.  The loop merges
            # contiguous buffers into runs and checks each run's two ends against the
            # region when it closes (a run is contiguous, so its ends bound every buffer in
            # it); a run outside sends the lot to the buffer-by-buffer checks below.
            base = r.guest_phys_addr
            limit = base + r.size
            view = r.view
            out: list[memoryview] = []
            start = end = addrs[0]
            for addr, n in zip(addrs, lens):
                if addr == end:
                    end += n
                else:
                    if start < base or end > limit:
                        break
                    out.append(view[start - base:end - base])
                    start = addr
                    end = addr + n
            else:
                if start >= base and end <= limit:
                    out.append(view[start - base:end - base])
                    return out, sum(lens)
        out = []
        total = 0
        if r is None:  # no memory at all: only zero-length buffers are fine
            for addr, n in zip(addrs, lens):
                if n:
                    raise GuestMemoryError(f"guest address {addr:#x} is not in guest memory")
            return out, 0
        base, size = r.guest_phys_addr, r.size
        run = None            # the region of the view being grown, and its [start, end)
        start = end = 0
        for addr, n in zip(addrs, lens):
            if not n:
                continue
            total += n
            off = addr - base
            if off < 0 or off + n > size:
                r, off = self._locate(addr, n)
                if off + n > r.size:  # runs into the next region: split there
                    if run is not None:
                        out.append(run.view[start:end])
                    out.extend(self._spanning(r, off, n))
                    run = None
                    continue
                self._hint = r
                base, size = r.guest_phys_addr, r.size
            if r is run and off == end:
                end += n
            else:
                if run is not None:
                    out.append(run.view[start:end])
                run, start, end = r, off, off + n
        if run is not None:
            out.append(run.view[start:end])
        return out, total

    def gather_chain(self, addrs: Sequence[int], lens: Sequence[int], k: int
                     ) -> tuple[list[memoryview], int, list[memoryview], int]:
        """gather() of a chain's buffers in one call: the first k (device-readable) and the
        rest (device-writable), each with its total; a run never merges across k."""
        r = self._hint
        n = len(addrs)
        if n == 2 and k == 1 and r is not None:
            # One buffer each way (a request without arguments, or one whose arguments are
            # contiguous with its header): two comparison chains, two slices.
            base, size = r.guest_phys_addr, r.size
            a0 = addrs[0] - base
            l0 = lens[0]
            a1 = addrs[1] - base
            l1 = lens[1]
            if 0 <= a0 and 0 < l0 and a0 + l0 <= size and 0 <= a1 and 0 < l1 and (
                    a1 + l1 <= size):
                view = r.view
                return [view[a0:a0 + l0]], l0, [view[a1:a1 + l1]], l1
        elif n == 4 and k == 2 and r is not None:
            # Two buffers each way: most FUSE requests (header + argument in, header +
            # result out).  Four comparison chains; each pair merged if contiguous.
            base, size = r.guest_phys_addr, r.size
            a0, a1, a2, a3 = addrs
            l0, l1, l2, l3 = lens
            a0 -= base
            a1 -= base
            a2 -= base
            a3 -= base
            if (0 <= a0 and 0 < l0 and a0 + l0 <= size and 0 <= a1 and 0 < l1
                    and a1 + l1 <= size and 0 <= a2 and 0 < l2 and a2 + l2 <= size
                    and 0 <= a3 and 0 < l3 and a3 + l3 <= size):
                view = r.view
                return ([view[a0:a1 + l1]] if a0 + l0 == a1
                        else [view[a0:a0 + l0], view[a1:a1 + l1]], l0 + l1,
                        [view[a2:a3 + l3]] if a2 + l2 == a3
                        else [view[a2:a2 + l2], view[a3:a3 + l3]], l2 + l3)
        elif 0 < n <= 8 and r is not None:
            # A small request: each buffer checked against the last region in one comparison
            # chain; any that is not plainly inside it sends the lot to gather() below.
            base, size, view = r.guest_phys_addr, r.size, r.view
            views = []
            kv = 0            # how many of the views are readable
            start = end = -1
            i = 0
            for addr, ln in zip(addrs, lens):
                off = addr - base
                if not (0 <= off and 0 < ln and off + ln <= size):
                    break
                if off == end and i != k:
                    end += ln
                else:
                    if start >= 0:
                        views.append(view[start:end])
                    if i == k:
                        kv = len(views)
                    start = off
                    end = off + ln
                i += 1
            else:
                views.append(view[start:end])
                if k >= n:
                    kv = len(views)
                rlen = sum(lens[:k])
                return views[:kv], rlen, views[kv:], sum(lens) - rlen
        readable, rlen = self.gather(addrs[:k], lens[:k])
        writable, wlen = self.gather(addrs[k:], lens[k:]) if k < n else ([], 0)
        return readable, rlen, writable, wlen

    def _locate(self, addr: int, n: int) -> tuple[MemoryRegion, int]:
        """The region holding addr and the offset in it; the range may run into the next
        region only if that one is adjacent (checked by _spanning)."""
        r = self._find(addr)
        if r is None or n < 0:
            raise GuestMemoryError(f"guest address {addr:#x} is not in guest memory")
        return r, addr - r.guest_phys_addr

    def _spanning(self, r: MemoryRegion, off: int, n: int) -> list[memoryview]:
        """Views for a range that starts at off in r and continues into adjacent regions."""
        addr = r.guest_phys_addr + off
        out: list[memoryview] = []
        while n:
            k = min(n, r.size - off)
            out.append(r.view[off:off + k])
            addr += k
            n -= k
            if n:
                nxt = self._find(addr)
                if nxt is None:
                    raise GuestMemoryError(f"guest range runs past guest memory at {addr:#x}")
                r, off = nxt, 0
        return out

    def user_to_guest(self, user_addr: int) -> int:
        """Translate a frontend (QEMU) virtual address into a guest-physical one."""
        i = bisect.bisect_right(self._user_starts, user_addr) - 1
        if i >= 0:
            r = self._by_user[i]
            if user_addr < r.user_addr + r.size:
                return r.guest_phys_addr + (user_addr - r.user_addr)
        raise GuestMemoryError(f"frontend address {user_addr:#x} is not in guest memory")

    @property
    def total_size(self) -> int:
        return sum(r.size for r in self.regions)

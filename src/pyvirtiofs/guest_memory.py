"""Guest memory as the backend sees it.

QEMU hands the daemon the guest's RAM as file descriptors (SET_MEM_TABLE, ADD_MEM_REG).  Each
region is mapped once and then addressed in two ways: by guest-physical address (what descriptor
chains contain) and by frontend user address (what SET_VRING_ADDR contains).

Every access the guest asks for goes through :meth:`GuestMemory.slices` / :meth:`GuestMemory.view`,
which check bounds and return memoryviews into the mapping.  An address outside every region is a
*guest* error (:class:`GuestMemoryError`), never an IndexError escaping from a worker.

A :class:`GuestMemory` is immutable: changing the table builds a new one, and workers holding the
old one keep valid mappings until they drop it (the mmap closes when the last view goes away).
"""

from __future__ import annotations

import bisect
import mmap
import os
from dataclasses import dataclass, field

PAGE_SIZE = mmap.PAGESIZE


class GuestMemoryError(Exception):
    """The guest named memory it does not have (a guest bug or a hostile guest)."""


@dataclass(eq=False)
class MemoryRegion:
    guest_phys_addr: int
    size: int
    user_addr: int
    mmap_offset: int
    _map: mmap.mmap = field(repr=False)
    view: memoryview = field(repr=False)

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
        if length == 0:
            return []
        if addr < 0 or length < 0 or addr + length > 1 << 64:
            raise GuestMemoryError(f"guest range [{addr:#x}, +{length:#x}) wraps")
        out = []
        while length:
            r = self._find(addr)
            if r is None:
                raise GuestMemoryError(f"guest address {addr:#x} is not in guest memory")
            off = addr - r.guest_phys_addr
            n = min(length, r.size - off)
            out.append(r.view[off:off + n])
            addr += n
            length -= n
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

import os

import pytest

from pyvirtiofs.guest_memory import GuestMemory, GuestMemoryError, MemoryRegion


def region(gpa, size, uaddr, offset=0, fill=None):
    fd = os.memfd_create("ram")
    os.ftruncate(fd, offset + size)
    if fill is not None:
        os.pwrite(fd, fill, offset)
    try:
        return MemoryRegion.from_fd(fd, gpa, size, uaddr, offset)
    finally:
        os.close(fd)


def test_translates_guest_physical_and_frontend_addresses():
    mem = GuestMemory([region(0x100000, 0x10000, 0x7F0000000000, fill=b"abc"),
                       region(0x200000, 0x10000, 0x7F0000100000)])
    assert bytes(mem.view(0x100000, 3)) == b"abc"
    assert mem.user_to_guest(0x7F0000100010) == 0x200010
    with pytest.raises(GuestMemoryError):
        mem.user_to_guest(0x7F0000010000)  # just past the first region


def test_mmap_offset_not_page_aligned_is_honoured():
    fd = os.memfd_create("ram")
    os.ftruncate(fd, 0x3000)
    os.pwrite(fd, b"XYZ", 0x1010)
    mem = GuestMemory([MemoryRegion.from_fd(fd, 0, 0x1000, 0x1000, 0x1010)])
    os.close(fd)
    assert bytes(mem.view(0, 3)) == b"XYZ"


@pytest.mark.parametrize("addr,length", [
    (0x0FFFFF, 1),            # just below
    (0x10FFFF, 2),            # runs past the end
    (0x110000, 1),            # just above
    (0xFFFFFFFFFFFFFFFF, 2),  # wraps
])
def test_addresses_outside_memory_are_guest_errors(addr, length):
    mem = GuestMemory([region(0x100000, 0x10000, 0)])
    with pytest.raises(GuestMemoryError):
        mem.slices(addr, length)
    with pytest.raises(GuestMemoryError):
        mem.view(addr, length)


def test_slices_span_adjacent_regions_but_not_holes():
    mem = GuestMemory([region(0, 0x1000, 0), region(0x1000, 0x1000, 0x10000)])
    views = mem.slices(0xFF0, 0x20)
    assert [len(v) for v in views] == [0x10, 0x10]
    with pytest.raises(GuestMemoryError):
        mem.view(0xFF0, 0x20)  # rings must be contiguous in one region
    gap = GuestMemory([region(0, 0x1000, 0), region(0x2000, 0x1000, 0x10000)])
    with pytest.raises(GuestMemoryError):
        gap.slices(0xFF0, 0x20)


def test_overlapping_regions_are_refused():
    with pytest.raises(GuestMemoryError):
        GuestMemory([region(0, 0x2000, 0), region(0x1000, 0x1000, 0x10000)])


def test_region_larger_than_its_file_is_refused():
    fd = os.memfd_create("ram")
    os.ftruncate(fd, 0x1000)
    with pytest.raises(GuestMemoryError):
        MemoryRegion.from_fd(fd, 0, 0x2000, 0, 0)
    os.close(fd)


def test_writes_through_views_reach_the_shared_file():
    fd = os.memfd_create("ram")
    os.ftruncate(fd, 0x1000)
    mem = GuestMemory([MemoryRegion.from_fd(fd, 0x5000, 0x1000, 0, 0)])
    mem.view(0x5100, 4)[:] = b"data"
    assert os.pread(fd, 4, 0x100) == b"data"
    os.close(fd)


def test_remove_region():
    mem = GuestMemory([region(0, 0x1000, 0), region(0x1000, 0x1000, 0x10000)])
    smaller, removed = mem.without_region(0x1000, 0x1000)
    assert removed.guest_phys_addr == 0x1000
    with pytest.raises(GuestMemoryError):
        smaller.view(0x1000, 1)
    with pytest.raises(GuestMemoryError):
        smaller.without_region(0x1000, 0x1000)


def gather(mem, buffers):
    """GuestMemory.gather of (addr, len) pairs."""
    return mem.gather([a for a, _ in buffers], [n for _, n in buffers])


def test_gather_merges_buffers_that_follow_each_other_in_one_region():
    mem = GuestMemory([region(0x100000, 0x10000, 0, fill=bytes(range(256)) * 256)])
    # 16 page-sized descriptors of one contiguous buffer: one view, like a 64 KiB READ
    pages = [(0x100000 + i * 0x1000, 0x1000) for i in range(16)]
    views, total = gather(mem, pages)
    assert total == 0x10000 and [len(v) for v in views] == [0x10000]
    assert bytes(views[0]) == bytes(range(256)) * 256
    # a gap, a step back and a zero-length buffer (at any address) in between
    views, total = gather(mem, [(0x100000, 16), (0x100010, 16), (0xDEAD0000, 0),
                               (0x100040, 8), (0x100000, 4)])
    assert total == 44
    assert [bytes(v) for v in views] == [bytes(range(32)), bytes(range(0x40, 0x48)),
                                         bytes(range(4))]


@pytest.mark.parametrize("order", ["in order", "scattered"])
def test_gather_of_many_pages_keeps_their_order_and_merges_runs(order):
    data = b"".join(i.to_bytes(2, "little") * 2048 for i in range(64))  # page i says i
    mem = GuestMemory([region(0x100000, 0x40000, 0, fill=data)])
    # runs of 1, 3, 2, 1 pages, the third run before the first in memory when scattered
    pages = [5, 10, 11, 12, 2, 3, 40] if order == "scattered" else [5, 6, 7, 8, 9, 10, 11]
    views, total = gather(mem, [(0x100000 + p * 0x1000, 0x1000) for p in pages])
    assert total == 7 * 0x1000
    assert b"".join(views) == b"".join(p.to_bytes(2, "little") * 2048 for p in pages)
    assert len(views) == (4 if order == "scattered" else 1)
    # the last run ends inside a page; the last buffer one byte past the region
    views, _ = gather(mem, [(0x100000, 0x1000), (0x101000, 0x10), (0x120000, 8)])
    assert [len(v) for v in views] == [0x1010, 8]
    with pytest.raises(GuestMemoryError):
        gather(mem, [(0x100000, 0x1000), (0x101000, 0x10), (0x13FFF8, 9)])


@pytest.mark.parametrize("bad", [0, 5, 11])
@pytest.mark.parametrize("where", ["below", "straddling the end", "above"])
def test_gather_of_many_buffers_refuses_any_one_outside(bad, where):
    """12 page-sized buffers (runs of contiguous ones among them), one of them outside the
    region: below it, running past its end, or wholly above it."""
    mem = GuestMemory([region(0x100000, 0x40000, 0), region(0x300000, 0x1000, 0x80000)])
    pages = [(0x100000 + p * 0x1000, 0x1000) for p in (1, 2, 3, 9, 10, 4, 5, 6, 7, 20, 21, 22)]
    gather(mem, pages)  # fine as they are
    pages[bad] = {"below": (0xFF000, 0x1000), "straddling the end": (0x13F800, 0x1000),
                  "above": (0x140000, 0x1000)}[where]
    with pytest.raises(GuestMemoryError):
        gather(mem, pages)


def test_gather_views_write_to_the_guest_addresses_named():
    fd = os.memfd_create("ram")
    os.ftruncate(fd, 0x2000)
    mem = GuestMemory([MemoryRegion.from_fd(fd, 0, 0x1000, 0, 0),
                       MemoryRegion.from_fd(fd, 0x5000, 0x1000, 0x9000, 0x1000)])
    views, _ = gather(mem, [(0x5FFE, 2), (0xFFE, 2), (0x5000, 1)])
    assert [len(v) for v in views] == [2, 2, 1]
    for v, data in zip(views, (b"ab", b"cd", b"e")):
        v[:] = data
    assert os.pread(fd, 2, 0xFFE) == b"cd"
    assert os.pread(fd, 2, 0x1FFE) == b"ab" and os.pread(fd, 1, 0x1000) == b"e"
    os.close(fd)


@pytest.mark.parametrize("buffers", [
    [(0x100000, 16), (0x10FFF0, 0x11)],           # the second runs past the region
    [(0x100000, 16), (0x110000, 1)],              # the second is just above it
    [(0x100000, 16), (0xFFFFFFFFFFFFFFFF, 1)],    # the top of the address space
    [(0x200000, 16), (0x100000, 16)],             # the first is in the hole: no hint helps
])
def test_gather_refuses_any_buffer_outside_memory(buffers):
    mem = GuestMemory([region(0x100000, 0x10000, 0), region(0x300000, 0x1000, 0x20000)])
    with pytest.raises(GuestMemoryError):
        gather(mem, buffers)
    # ... and the region remembered from a good buffer does not let a later bad one through
    gather(mem, [(0x300000, 16)])
    with pytest.raises(GuestMemoryError):
        gather(mem, [(0x300FF0, 0x20)])


def test_gather_splits_a_buffer_across_adjacent_regions():
    mem = GuestMemory([region(0, 0x1000, 0, fill=b"A" * 0x1000),
                       region(0x1000, 0x1000, 0x10000, fill=b"B" * 0x1000)])
    views, total = gather(mem, [(0xF00, 0x100), (0x1000 - 0x10, 0x20), (0x1010, 4)])
    assert total == 0x124
    assert [bytes(v) for v in views] == [b"A" * 0x100, b"A" * 0x10, b"B" * 0x10, b"BBBB"]
    with pytest.raises(GuestMemoryError):
        gather(mem, [(0xFF0, 0x1011)])  # across both and past the end


def test_no_memory_takes_only_empty_buffers():
    assert gather(GuestMemory(), [(0x1000, 0)]) == ([], 0)
    with pytest.raises(GuestMemoryError):
        gather(GuestMemory(), [(0x1000, 1)])

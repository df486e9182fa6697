"""Descriptor chains as the device walks them, in-process on a ring in a memfd: the shapes a
Linux guest writes (direct, indirect, large indirect tables of page-sized buffers) and the
malformed ones a hostile guest can write.  Indirect tables in Linux's shape take a fast
path (one struct unpack for up to 8 entries, memoryview slicing above), anything else the
descriptor-by-descriptor walk; every case runs with a 3-entry and a 9-entry table, and all
must judge alike."""

import ctypes
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvirtiofs.guest_memory import GuestMemory, GuestMemoryError, MemoryRegion
from pyvirtiofs.virtqueue import ChainError, Virtqueue

NEXT, WRITE, INDIRECT = 1, 2, 4
DESC = struct.Struct("<QIHH")
GPA = 0x100000
SIZE = 4 << 20
DESC_AT, AVAIL_AT, USED_AT, TABLE_AT, DATA_AT = 0, 0x1000, 0x2000, 0x4000, 0x10000
QSIZE = 16


class Ring:
    def __init__(self):
        fd = os.memfd_create("ram")
        os.ftruncate(fd, SIZE)
        self.mem = GuestMemory([MemoryRegion.from_fd(fd, GPA, SIZE, 0, 0)])
        os.close(fd)
        self.raw = self.mem.view(GPA, SIZE)
        for i in range(SIZE // 4096):  # every page says where it is
            self.raw[i * 4096:i * 4096 + 8] = (GPA + i * 4096).to_bytes(8, "little")
        self.vq = Virtqueue(0)
        self.vq.size = QSIZE
        self.vq.configure(self.mem, GPA + DESC_AT, GPA + AVAIL_AT, GPA + USED_AT)
        self.avail = 0

    def publish(self, head):
        struct.pack_into("<H", self.raw, AVAIL_AT + 4 + 2 * (self.avail % QSIZE), head)
        self.avail += 1
        struct.pack_into("<H", self.raw, AVAIL_AT + 2, self.avail)

    def indirect(self, descs):
        """Publish descs ((addr, len, flags, next) with NEXT set on all but the last unless
        given) as an indirect table behind descriptor 0."""
        for i, (addr, n, flags, nxt) in enumerate(descs):
            DESC.pack_into(self.raw, TABLE_AT + 16 * i, addr, n, flags, nxt)
        DESC.pack_into(self.raw, DESC_AT, GPA + TABLE_AT, 16 * len(descs), INDIRECT, 0)
        self.publish(0)

    def pop(self):
        used = self.vq.next_used
        try:
            return self.vq.pop()
        except ChainError as e:
            assert self.vq.next_used == (used + 1) & 0xFFFF  # returned unused
            raise e


def pages(first, count, flags, step=1):
    """count page-sized buffers from page `first`, every `step` pages, linked in order."""
    return [(GPA + DATA_AT + (first + i * step) * 4096, 4096, flags | NEXT, 0)
            for i in range(count)]


def linked(descs):
    out = [(a, n, f, i + 1) for i, (a, n, f, _) in enumerate(descs)]
    a, n, f, _ = out[-1]
    out[-1] = (a, n, f & ~NEXT, 0)
    return out


@pytest.fixture
def ring():
    return Ring()


@pytest.mark.parametrize("nread,nwrite", [(1, 1), (2, 2), (2, 0), (3, 5), (1, 256)])
def test_contiguous_pages_become_one_view_each_way(ring, nread, nwrite):
    ring.indirect(linked(pages(0, nread, 0) + pages(nread, nwrite, WRITE)))
    chain = ring.pop()
    assert [len(v) for v in chain.readable] == [4096 * nread]
    assert [len(v) for v in chain.writable] == ([4096 * nwrite] if nwrite else [])
    assert chain.remaining == 4096 * nread and chain.capacity == 4096 * nwrite
    page = chain.read(4096)
    assert int.from_bytes(page[:8], "little") == GPA + DATA_AT
    if nwrite:
        chain.write_at(4096 * (nwrite - 1), b"last page")
        last = DATA_AT + (nread + nwrite - 1) * 4096
        assert bytes(ring.raw[last:last + 9]) == b"last page"


@pytest.mark.parametrize("nwrite", [1, 6])
def test_scattered_pages_keep_their_order(ring, nwrite):
    ring.indirect(linked(pages(10, 1, 0) + pages(40, nwrite, WRITE, step=-2)))
    chain = ring.pop()
    assert [bytes(v[:8]) for v in chain.writable] == [
        (GPA + DATA_AT + (40 - 2 * i) * 4096).to_bytes(8, "little") for i in range(nwrite)]


@pytest.mark.parametrize("bad", [None, 0, 1, 2, 3])
def test_two_buffers_each_way(ring, bad):
    """The commonest FUSE request (header + argument in, header + result out), the four
    buffers apart in memory; then with each one in turn outside guest memory."""
    descs = pages(10, 1, 0) + pages(20, 1, 0) + pages(5, 1, WRITE) + pages(30, 1, WRITE)
    if bad is not None:
        a, n, f, x = descs[bad]
        descs[bad] = (GPA + SIZE - 8, n, f, x)  # starts inside, ends outside
    ring.indirect(linked(descs))
    if bad is not None:
        with pytest.raises(ChainError):
            ring.pop()
        return
    chain = ring.pop()
    at = [(GPA + DATA_AT + p * 4096).to_bytes(8, "little") for p in (10, 20, 5, 30)]
    assert [bytes(v[:8]) for v in chain.readable + chain.writable] == at
    assert chain.remaining == chain.capacity == 8192


def test_zero_length_readable_after_writable_is_skipped(ring):
    descs = linked(pages(0, 1, 0) + pages(1, 5, WRITE))
    descs.insert(3, (0xDEAD0000, 0, NEXT, 0))  # a zero-length readable one amid the writable
    ring.indirect(linked(descs))
    chain = ring.pop()
    assert chain.capacity == 5 * 4096
    assert [len(v) for v in chain.writable] == [5 * 4096]  # the pages around it still merge


@pytest.mark.parametrize("size", [3, 9])
@pytest.mark.parametrize("case", ["loop", "link backwards", "readable after writable",
                                  "readable amid writable", "nested indirect",
                                  "outside memory", "next outside the table",
                                  "across the end of memory"])
def test_malformed_tables_are_chain_errors(ring, size, case):
    descs = linked(pages(0, 1, 0) + pages(1, size - 1, WRITE))
    a, n, f, x = descs[size - 2]
    if case == "loop":
        descs[size - 1] = (descs[size - 1][0], 4096, WRITE | NEXT, 1)
    elif case == "link backwards":  # every flag as Linux sets them, one link to an earlier entry
        descs[size - 2] = (a, n, f, 1)
    elif case == "readable amid writable":
        descs = linked(pages(0, 1, WRITE) + pages(1, 1, 0) + pages(2, size - 2, WRITE))
    elif case == "readable after writable":
        last = descs[size - 1]
        descs[size - 1] = (last[0], last[1], last[2] & ~WRITE, 0)
    elif case == "nested indirect":
        descs[size - 2] = (GPA + TABLE_AT, 32, INDIRECT, x)
    elif case == "outside memory":
        descs[size - 2] = (GPA + SIZE + 4096, n, f, x)
    elif case == "next outside the table":
        descs[size - 2] = (a, n, f, size)
    elif case == "across the end of memory":  # contiguous buffers, the last one past the end
        descs = linked([(GPA + SIZE - (size - 1 - i) * 4096, 4096, WRITE | NEXT, 0)
                        for i in range(size)])
    ring.indirect(descs)
    with pytest.raises(ChainError):
        ring.pop()
    # the queue goes on: the next chain is served
    ring.indirect(linked(pages(0, 1, 0) + pages(1, 1, WRITE)))
    assert ring.pop().capacity == 4096


def test_a_direct_chain_ending_in_an_indirect_table(ring):
    tbl = linked(pages(0, 2, 0) + pages(2, 4, WRITE))
    for i, d in enumerate(tbl):
        DESC.pack_into(ring.raw, TABLE_AT + 16 * i, *d)
    DESC.pack_into(ring.raw, DESC_AT + 16 * 3, GPA + DATA_AT + 50 * 4096, 100, NEXT, 5)
    DESC.pack_into(ring.raw, DESC_AT + 16 * 5, GPA + TABLE_AT, 16 * len(tbl), INDIRECT, 0)
    ring.publish(3)
    chain = ring.pop()
    assert [len(v) for v in chain.readable] == [100, 8192]
    assert [len(v) for v in chain.writable] == [4 * 4096]


# ------------------------------------------------------------------------------------------
# The fast paths against the descriptor-by-descriptor walk, on random tables
# ------------------------------------------------------------------------------------------

def _where(views):
    """Where each view is (its address in this process) and how long: two lists of views
    are the same guest buffers exactly when these agree."""
    return [(ctypes.addressof(ctypes.c_char.from_buffer(v)), len(v)) for v in views]


@st.composite
def tables(draw):
    """Indirect tables of 1-12 entries, most in Linux's shape or close to it: buffers that
    follow each other, page-sized or not, some at the end of memory or past it, a flag or a
    link wrong here and there."""
    n = draw(st.sampled_from([1, 2, 2, 3, 4, 4, 4, 5, 8, 9, 12]))
    k = draw(st.sampled_from([n // 2, n // 2, 1, 0, n, draw(st.integers(0, n))]))
    k = min(k, n)
    at = DATA_AT + draw(st.integers(0, 64)) * 4096
    descs = []
    for i in range(n):
        kind = draw(st.sampled_from(["follow", "follow", "page", "odd", "end", "outside",
                                     "empty"]))
        length = draw(st.sampled_from([16, 40, 4096, 4096, 120])) if kind != "empty" else 0
        if kind == "page":
            at = DATA_AT + draw(st.integers(0, 700)) * 4096
        elif kind == "odd":
            at = DATA_AT + draw(st.integers(0, SIZE - DATA_AT - 8192))
        elif kind == "end":
            at = SIZE - draw(st.sampled_from([8, 4096, 4096 + 16]))
        elif kind == "outside":
            at = draw(st.sampled_from([SIZE, SIZE + 4096, -GPA + 4096, 1 << 40]))
        flags = (WRITE if i >= k else 0) | (NEXT if i < n - 1 else 0)
        if draw(st.integers(0, 19)) == 0:
            flags = draw(st.sampled_from([0, NEXT, WRITE, NEXT | WRITE, INDIRECT, 8, 0x100]))
        nxt = i + 1 if draw(st.integers(0, 9)) else draw(st.integers(0, n + 1))
        descs.append((GPA + at, length, flags, nxt))
        at += length
    return descs


@settings(max_examples=600, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(descs=tables())
def test_fast_paths_judge_like_the_descriptor_walk(ring, descs):
    for i, d in enumerate(descs):
        DESC.pack_into(ring.raw, TABLE_AT + 16 * i, *d)
    head = (GPA + TABLE_AT, 16 * len(descs), INDIRECT, 0)
    DESC.pack_into(ring.raw, DESC_AT, *head)
    vq, mem = ring.vq, ring.mem
    try:  # the reference: the rules one descriptor at a time, gather() per direction
        addrs, lens, k = vq._follow(head, None, QSIZE)
        ref = mem.gather(addrs[:k], lens[:k]), mem.gather(addrs[k:], lens[k:])
    except (ChainError, GuestMemoryError) as e:
        ref = type(e)
    try:
        chain = vq._walk(0)
        got = (_where(chain.readable), chain.remaining), (_where(chain.writable), chain.capacity)
    except ChainError:
        got = ChainError
    if ref in (ChainError, GuestMemoryError):
        assert got is ChainError, descs
    else:
        (rv, rl), (wv, wl) = ref
        assert got == ((_where(rv), rl), (_where(wv), wl)), descs

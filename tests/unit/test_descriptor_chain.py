"""The request handler's side of a descriptor chain: a cursor over the device-readable views
and offset-addressed writes into the device-writable ones, across view boundaries."""

import pytest

from pyvirtiofs.virtqueue import DescriptorChain


def chain(readable=(), writable=()):
    return DescriptorChain(7, [memoryview(bytearray(b)) for b in readable],
                           [memoryview(bytearray(n)) for n in writable])


def test_reads_cross_view_boundaries_and_stop_at_the_end():
    c = chain([b"0123", b"45", b"6789"])
    assert c.remaining == 10 and c.capacity == 0
    assert c.read(3) == b"012"
    assert c.read(3) == b"345"            # spans three views
    assert [bytes(v) for v in c.read_views(3)] == [b"678"]
    assert c.remaining == 1
    with pytest.raises(EOFError):
        c.read(2)
    assert c.read(1) == b"9" and c.read(0) == b""


def test_read_views_are_guest_memory_not_copies():
    buf = bytearray(b"abcdefgh")
    c = DescriptorChain(0, [memoryview(buf)[:4], memoryview(buf)[4:]], [])
    c.read(2)
    views = c.read_views(4)
    assert [bytes(v) for v in views] == [b"cd", b"ef"]
    buf[2:6] = b"CDEF"
    assert [bytes(v) for v in views] == [b"CD", b"EF"]


def test_lowered_remaining_hides_trailing_bytes():
    c = chain([b"header", b"trailing"])
    c.remaining = 6
    assert c.read(6) == b"header"
    with pytest.raises(EOFError):
        c.read(1)


def test_writes_at_offsets_across_views_and_clipped_views():
    c = chain(writable=[16, 3, 8])
    assert c.capacity == 27
    assert c.write_at(14, b"abcdef") == 20
    assert [bytes(v) for v in c.writable] == [bytes(14) + b"ab", b"cde", b"f" + bytes(7)]
    assert [len(v) for v in c.views_at(10, 100)] == [6, 3, 8]   # clipped to the capacity
    assert [len(v) for v in c.views_at(16, 4)] == [3, 1]
    with pytest.raises(EOFError):
        c.write_at(20, b"12345678")
    assert bytes(c.writable[2]) == b"f" + bytes(7)            # nothing written on refusal


def test_the_chain_is_its_own_reader_and_writer():
    c = chain([b"xy"], [4])
    assert c.reader() is c and c.writer() is c

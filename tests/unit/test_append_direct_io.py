"""Opens with O_APPEND bypass the guest page cache under every cache mode (FOPEN_DIRECT_IO):
through the page cache Linux splits a write that crosses into an uncached page into two
WRITEs, which another writer sharing the file can land between (tests/e2e/test_two_guests.py
shows it with two VMs)."""

import os

import pytest

FOPEN_DIRECT_IO = 1
FOPEN_KEEP_CACHE = 2


@pytest.mark.parametrize("cache", ["auto", "always"])
def test_append_opens_are_direct(start_daemon, cache, tmp_path):
    d = start_daemon(extra_args=(f"--cache={cache}",))
    (tmp_path / "shared" / "log").write_bytes(b"")
    c = d.client()
    node = c.lookup(1, "log").nodeid
    plain = c.open(node, os.O_WRONLY)
    append = c.open(node, os.O_WRONLY | os.O_APPEND)
    assert not plain.open_flags & FOPEN_DIRECT_IO
    assert append.open_flags & FOPEN_DIRECT_IO and not append.open_flags & FOPEN_KEEP_CACHE
    _, created = c.create(1, "new", 0o644, flags=os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    assert created.open_flags & FOPEN_DIRECT_IO
    # and the host file still appends: a WRITE at offset 0 lands at the end
    c.write(node, append.fh, 0, b"one\n")
    c.write(node, append.fh, 0, b"two\n")
    assert (tmp_path / "shared" / "log").read_bytes() == b"one\ntwo\n"

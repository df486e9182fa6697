"""READDIR and READDIRPLUS as a guest sees them: every entry exactly once across replies,
references handed out only for the entries the guest got, and a listing that continues,
restarts or jumps back to an earlier cookie sees what the directory holds."""

import os
import struct
import threading

import pytest

from pyvirtiofs.filesystem import Attr, DirEntry, Entry, FileSystem, FileType, FsError
from pyvirtiofs.fuse import abi
from pyvirtiofs.fuse.abi import Opcode
from pyvirtiofs.fuse.server import FuseServer
from pyvirtiofs.passthrough import PassthroughFs

from .fuse_direct import DirectClient

ATTR_MODE = 9  # index of st_mode in abi.ATTR


def parse(body: bytes, plus: bool):
    """[(nodeid or None, name, cookie, fuse_entry_out bytes)] of a READDIR(PLUS) reply."""
    out, pos = [], 0
    while pos < len(body):
        entry = body[pos:pos + 128] if plus else b""
        head = pos + (128 if plus else 0)
        ino, off, namelen, typ = abi.DIRENT_HEAD.unpack_from(body, head)
        name = body[head + 24:head + 24 + namelen]
        nodeid = struct.unpack_from("<Q", entry)[0] if plus else None
        out.append((nodeid, name, off, entry))
        pos = head + ((24 + namelen + 7) & ~7)
    return out


def listing(c, nodeid, fh, plus, size=4096, offset=0, writable_split=None):
    """Every entry after cookie ``offset``, reply by reply (each at most ``size`` bytes)."""
    op = Opcode.READDIRPLUS if plus else Opcode.READDIR
    entries = []
    while True:
        c.unique += 1
        hdr = struct.pack("<IIQQIIIHH", 80, op, c.unique, nodeid, 0, 0, 1, 0, 0)
        raw = c.raw([hdr, abi.READ_IN.pack(fh, offset, size, 0, 0, 0, 0)], 16 + size,
                    writable_split)
        length, err, _ = struct.unpack_from("<IiQ", raw)
        assert err == 0, os.strerror(-err)
        got = parse(raw[16:length], plus)
        if not got:
            return entries
        assert length - 16 <= size
        entries += got
        assert got[-1][2] != offset and len(entries) < 100_000, "the listing does not advance"
        offset = got[-1][2]


def opendir(c, nodeid):
    r = c.call(Opcode.OPENDIR, nodeid, struct.pack("<II", 0, 0))
    assert r.error == 0
    return struct.unpack_from("<Q", r.body)[0]


class CountingFs(FileSystem):
    """A flat directory of ``n`` files that counts the references it hands out."""

    def __init__(self, n):
        self.names = [f"file-{i:03d}".encode() for i in range(n)]
        self.refs: dict[int, int] = {}
        self.lock = threading.Lock()
        self.lookups = 0

    def _attr(self, inode):
        return Attr(st_ino=inode, st_mode=0o100644, st_size=inode)

    def lookup(self, parent, name, ctx):
        if name not in self.names:
            raise FsError(2)
        inode = 100 + self.names.index(name)
        with self.lock:
            self.lookups += 1
            self.refs[inode] = self.refs.get(inode, 0) + 1
        return Entry(inode, self._attr(inode))

    def forget(self, inode, nlookup):
        with self.lock:
            self.refs[inode] -= nlookup

    def getattr(self, inode, fh, ctx):
        return Entry(inode, self._attr(inode))

    def readdir(self, inode, fh, offset):
        everything = [b".", b".."] + self.names
        for i in range(offset, len(everything)):
            yield DirEntry(everything[i], 100 + i, FileType.REG, i + 1)


@pytest.mark.parametrize("size", [200, 500, 4096])
def test_references_are_handed_out_only_for_entries_the_guest_got(size):
    fs = CountingFs(60)
    c = DirectClient(FuseServer(fs))
    c.init()
    got = listing(c, 1, 0, plus=True, size=size)
    assert [n for _, n, _, _ in got] == [b".", b".."] + fs.names
    for nodeid, name, _, _ in got:
        if nodeid:  # the guest forgets what it was given
            c.call(Opcode.FORGET, nodeid, struct.pack("<Q", 1))
    assert fs.lookups >= 60
    assert set(fs.refs.values()) == {0}  # the entry that did not fit was given back


def test_a_file_system_with_its_own_readdirplus_is_not_asked_to_look_up():
    class WithAttrs(CountingFs):
        def readdirplus(self, inode, fh, offset, ctx):
            for ent in self.readdir(inode, fh, offset):
                yield ent, (None if ent.name in (b".", b"..")
                            else Entry(ent.ino, self._attr(ent.ino), attr_timeout=5.0))

        def lookup(self, parent, name, ctx):
            raise AssertionError("lookup called")

    c = DirectClient(FuseServer(WithAttrs(10)))
    c.init()
    got = listing(c, 1, 0, plus=True)
    assert [n for n, _, _, _ in got] == [0, 0] + list(range(102, 112))
    attr_valid = [struct.unpack_from("<Q", e, 24)[0] for _, _, _, e in got[2:]]
    assert attr_valid == [5] * 10


def test_async_lookup_file_system_lists_with_attributes():
    class AsyncFs(CountingFs):
        async def lookup(self, parent, name, ctx):
            return CountingFs.lookup(self, parent, name, ctx)

    from pyvirtiofs import aio
    fs = AsyncFs(30)
    c = DirectClient(FuseServer(aio.for_server(fs)))
    c.init()
    got = listing(c, 1, 0, plus=True, size=600)
    assert [n for n, _, _, _ in got] == [0, 0] + list(range(100, 130))


@pytest.fixture
def share(tmp_path):
    d = tmp_path / "share"
    d.mkdir()
    return d


@pytest.fixture
def passthrough(share):
    fs = PassthroughFs(str(share))
    c = DirectClient(FuseServer(fs))
    c.init()
    yield c
    fs.close()


@pytest.mark.parametrize("plus", [False, True], ids=["READDIR", "READDIRPLUS"])
def test_passthrough_lists_every_entry_once_in_every_reply_layout(passthrough, share, plus):
    names = {f"entry-{i:04d}-{'x' * (i % 17)}".encode() for i in range(700)}
    for n in names:
        (share / n.decode()).touch()
    os.utime(share / sorted(names)[0].decode(), ns=(-1_500_000_001, -3_000_000_000))
    fh = opendir(passthrough, 1)
    lists = {}
    for split in (None, [16, 4096], [5, 700, 3000, 400]):  # direct, Linux's, generic
        got = listing(passthrough, 1, fh, plus, writable_split=split)
        assert sorted(n for _, n, _, _ in got) == sorted(names | {b".", b".."})
        lists[str(split)] = [(n, off) for _, n, off, _ in got]
        if plus:  # each entry's attributes as LOOKUP answers them
            for nodeid, name, _, entry in got[:50]:
                if name in (b".", b".."):
                    assert nodeid == 0 and entry == bytes(128)
                    continue
                r = passthrough.call(Opcode.LOOKUP, 1, name + b"\0")
                assert r.body == entry, name
    assert len(set(map(tuple, lists.values()))) == 1


def test_passthrough_listing_restarts_and_jumps_back(passthrough, share):
    for i in range(400):
        (share / f"f{i:03d}").touch()
    fh = opendir(passthrough, 1)
    first = listing(passthrough, 1, fh, plus=True, size=1024)
    cookies = [off for _, _, off, _ in first]
    # seekdir(telldir) to an earlier cookie: the entries after it, as the first time
    for k in (5, 150, 399):
        again = listing(passthrough, 1, fh, plus=False, offset=cookies[k])
        assert [n for _, n, _, _ in again] == [n for _, n, _, _ in first[k + 1:]]
    # rewinddir: a new listing from cookie 0 sees what changed meanwhile
    (share / "f000").unlink()
    (share / "new").touch()
    names = [n for _, n, _, _ in listing(passthrough, 1, fh, plus=False)]
    assert b"new" in names and b"f000" not in names and len(names) == 402
